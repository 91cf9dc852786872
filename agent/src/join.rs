//! The first start: trade the join token for an identity.
//!
//! The agent makes its own key (it never leaves the instance), checks the
//! coordinator against the CA fingerprint in the token during the TLS
//! handshake (the secret is sent only after that succeeded), and stores the
//! certificate it receives.
//!
//! The key and a random request id are made once per join and kept in
//! `tls_dir/join.toml` until the join succeeded: a join whose reply was lost
//! (the coordinator was killed after it committed) is asked again with the
//! same request id and key, and the coordinator answers as before instead of
//! counting the token as used.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{CertificateParams, KeyPair};
use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_service_client::AgentServiceClient;
use rollwave_trust::files::write_private;
use rollwave_trust::{ChannelOptions, JoinToken, PUBLIC_SERVER_NAME};
use serde::{Deserialize, Serialize};

use crate::identity::{Identity, IdentityError};
use crate::unix_ms;

/// Random bytes in a join request id.
const REQUEST_ID_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("generate key or signing request: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Trust(#[from] rollwave_trust::Error),
    #[error("the coordinator refused the join: {}", .0.message())]
    Refused(tonic::Status),
    #[error("join token is for stack {token_stack:?} but agent.toml says stack = {configured:?}")]
    WrongStack { token_stack: String, configured: String },
    #[error(transparent)]
    Pending(#[from] IdentityError),
}

/// A join in progress: what the agent keeps across retries and restarts.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingJoin {
    pub request_id: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PendingJoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingJoin")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

impl PendingJoin {
    pub fn file(tls_dir: &Path) -> PathBuf {
        tls_dir.join("join.toml")
    }

    /// The join this agent started before, or a new one (saved before it is used).
    pub fn load_or_create(tls_dir: &Path) -> Result<Self, JoinError> {
        let path = Self::file(tls_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return toml::from_str(&text).map_err(|error| {
                    JoinError::Pending(IdentityError::Corrupt {
                        path,
                        message: error.to_string(),
                    })
                });
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(JoinError::Pending(IdentityError::Read { path, source })),
        }
        let mut random = [0u8; REQUEST_ID_BYTES];
        getrandom::fill(&mut random).map_err(|error| {
            JoinError::Pending(IdentityError::Write {
                path: path.clone(),
                source: std::io::Error::other(error.to_string()),
            })
        })?;
        let pending = Self {
            request_id: random.iter().map(|byte| format!("{byte:02x}")).collect(),
            key_pem: KeyPair::generate()?.serialize_pem(),
        };
        let write_error = |source| {
            JoinError::Pending(IdentityError::Write {
                path: path.clone(),
                source,
            })
        };
        std::fs::create_dir_all(tls_dir).map_err(write_error)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tls_dir, std::fs::Permissions::from_mode(0o700)).map_err(write_error)?;
        }
        let text = toml::to_string(&pending)
            .map_err(|error| std::io::Error::other(error.to_string()))
            .map_err(write_error)?;
        write_private(&path, text.as_bytes()).map_err(write_error)?;
        Ok(pending)
    }

    /// Forgets the join once its identity is saved.
    pub fn remove(tls_dir: &Path) -> Result<(), JoinError> {
        let path = Self::file(tls_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(JoinError::Pending(IdentityError::Write { path, source })),
        }
    }

    fn csr_pem(&self) -> Result<String, JoinError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(CertificateParams::default().serialize_request(&key)?.pem()?)
    }
}

/// A fresh key and a certificate signing request for it.
pub struct KeyRequest {
    pub key_pem: String,
    pub csr_pem: String,
}

pub fn new_key_request() -> Result<KeyRequest, rcgen::Error> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::default().serialize_request(&key)?;
    Ok(KeyRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem()?,
    })
}

/// What the join asks for besides the token.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub facts: pb::InstanceFacts,
    pub instance_id: Option<String>,
    pub expected_stack: Option<String>,
}

pub async fn join(
    coordinator: &str,
    token: &JoinToken,
    request: JoinRequest,
    pending: &PendingJoin,
) -> Result<Identity, JoinError> {
    let csr_pem = pending.csr_pem()?;
    let tls = rollwave_trust::join_client_config(token.ca)?;
    let channel = rollwave_trust::connect(coordinator, tls, PUBLIC_SERVER_NAME, &ChannelOptions::default()).await?;
    let response = AgentServiceClient::new(channel)
        .join(pb::JoinRequest {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            csr_pem,
            facts: Some(request.facts),
            requested_instance_id: request.instance_id.unwrap_or_default(),
            expected_stack: request.expected_stack.clone().unwrap_or_default(),
            request_id: pending.request_id.clone(),
        })
        .await
        .map_err(JoinError::Refused)?
        .into_inner();
    if let Some(configured) = request.expected_stack
        && configured != response.stack
    {
        return Err(JoinError::WrongStack {
            token_stack: response.stack,
            configured,
        });
    }
    Ok(Identity {
        instance_id: response.instance_id,
        stack: response.stack,
        issued_at_ms: unix_ms(SystemTime::now()),
        not_after_ms: response.not_after_unix_ms,
        ca_pem: response.ca_pem,
        certificate_pem: response.certificate_pem,
        key_pem: pending.key_pem.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_agent_retries_its_join_with_the_same_request_id_and_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let tls_dir = dir.path().join("tls");
        let first = PendingJoin::load_or_create(&tls_dir).expect("new join");
        assert_eq!(first.request_id.len(), REQUEST_ID_BYTES * 2);
        let again = PendingJoin::load_or_create(&tls_dir).expect("same join");
        assert_eq!(again, first, "a retry after a restart repeats the join");
        assert!(again.csr_pem().expect("csr").contains("CERTIFICATE REQUEST"));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(PendingJoin::file(&tls_dir))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        PendingJoin::remove(&tls_dir).expect("remove");
        let next = PendingJoin::load_or_create(&tls_dir).expect("new join");
        assert_ne!(next.request_id, first.request_id, "a finished join is never repeated");
        assert_ne!(next.key_pem, first.key_pem);
    }
}
