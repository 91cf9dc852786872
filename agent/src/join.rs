//! The first start: trade the join token for an identity.
//!
//! The agent makes its own key (it never leaves the instance), checks the
//! coordinator against the CA fingerprint in the token during the TLS
//! handshake (the secret is sent only after that succeeded), and stores the
//! certificate it receives.

use std::time::SystemTime;

use rcgen::{CertificateParams, KeyPair};
use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_service_client::AgentServiceClient;
use rollwave_trust::{ChannelOptions, JoinToken, PUBLIC_SERVER_NAME};

use crate::identity::Identity;
use crate::unix_ms;

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

pub async fn join(coordinator: &str, token: &JoinToken, request: JoinRequest) -> Result<Identity, JoinError> {
    let key = new_key_request()?;
    let tls = rollwave_trust::join_client_config(token.ca)?;
    let channel = rollwave_trust::connect(coordinator, tls, PUBLIC_SERVER_NAME, &ChannelOptions::default()).await?;
    let response = AgentServiceClient::new(channel)
        .join(pb::JoinRequest {
            token_id: token.id.clone(),
            token_secret: token.secret.clone(),
            csr_pem: key.csr_pem,
            facts: Some(request.facts),
            requested_instance_id: request.instance_id.unwrap_or_default(),
            expected_stack: request.expected_stack.clone().unwrap_or_default(),
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
        key_pem: key.key_pem,
    })
}
