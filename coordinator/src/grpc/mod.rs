//! The gRPC edge: converts protobuf to domain types on the way in, domain
//! results to protobuf on the way out, and errors to `tonic::Status` in one
//! place ([`ServiceError`]).

pub mod agent;
pub mod deployments;
pub mod operator;
pub mod traffic;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::Status;

use crate::ca::{CaError, CertificateAuthority};
use crate::deployer::Deployer;
use crate::enrollment::JoinRefused;
use crate::identity::IssuedCertificates;
use crate::model::{Event, InvalidInput, unix_ms};
use crate::presence::PresencePolicy;
use crate::registry::RegistrationRefused;
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};

/// Settings the services need at run time.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub certificate_ttl: Duration,
    pub heartbeat_interval: Duration,
    pub hello_timeout: Duration,
    pub presence: PresencePolicy,
}

/// What every service shares: the store, the CA, who is connected.
#[derive(Debug)]
pub struct Shared {
    pub store: Store,
    pub ca: CertificateAuthority,
    pub issued: Arc<IssuedCertificates>,
    pub sessions: Sessions,
    pub settings: ServiceSettings,
    pub deployer: Deployer,
}

impl Shared {
    /// Appends to the audit trail. A failure to record is logged, not fatal:
    /// the change itself is already committed.
    pub async fn audit(&self, actor: &str, action: &str, target: &str, outcome: &str, detail: String) {
        let event = Event {
            at_ms: unix_ms(SystemTime::now()),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome: outcome.to_owned(),
            detail,
            // Derived from the target by the store.
            stack: String::new(),
            instance: String::new(),
        };
        if let Err(error) = self.store.record_event(&event).await {
            tracing::error!(%error, action, target, "could not record audit event");
        }
    }
}

/// Everything a service call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<ServiceError> for Status {
    fn from(error: ServiceError) -> Self {
        let message = error.to_string();
        match error {
            ServiceError::Invalid(_) | ServiceError::BadRequest(_) => Status::invalid_argument(message),
            ServiceError::Ca(CaError::BadRequest(_)) => Status::invalid_argument(message),
            ServiceError::Unauthenticated(_) => Status::unauthenticated(message),
            ServiceError::PermissionDenied(_) => Status::permission_denied(message),
            ServiceError::Store(
                StoreError::NoSuchStack(_) | StoreError::NoSuchInstance(_) | StoreError::NoSuchToken(_),
            ) => Status::not_found(message),
            ServiceError::Store(StoreError::StackExists(_)) => Status::already_exists(message),
            ServiceError::Store(StoreError::JoinRefused(refused)) => match refused {
                JoinRefused::Token { .. } => Status::permission_denied(message),
                JoinRefused::InstanceExists { .. } | JoinRefused::RequestIdReused { .. } => {
                    Status::failed_precondition(message)
                }
            },
            ServiceError::Store(StoreError::NoSuchRelease { .. }) => Status::not_found(message),
            // Another writer changed the deployment first: gRPC's code for a lost concurrency race.
            ServiceError::Store(StoreError::StaleDeployment { .. }) => Status::aborted(message),
            ServiceError::Store(StoreError::NoSuchDeployment(_)) => Status::not_found(message),
            ServiceError::Store(StoreError::RegistrationRefused(refused)) => match refused {
                RegistrationRefused::ChangeKind { .. } => Status::failed_precondition(message),
                RegistrationRefused::ChangeContent { .. } | RegistrationRefused::ChangeLocation { .. } => {
                    Status::already_exists(message)
                }
            },
            ServiceError::Store(_) | ServiceError::Ca(_) => {
                tracing::error!(error = %message, "internal error");
                Status::internal(message)
            }
        }
    }
}

/// Random lowercase hex from the operating system's CSPRNG.
pub fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    getrandom::fill(&mut buffer).expect("the operating system's random source is available");
    hex::encode(buffer)
}

/// sha256 of a secret, hex: the only form in which secrets are stored.
pub fn secret_hash(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}
