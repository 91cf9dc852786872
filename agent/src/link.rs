//! The agent's session with the coordinator: one bidirectional stream under
//! the agent TLS name, authenticated by the instance certificate. Says hello,
//! heartbeats, renews the certificate when due, and returns when the session
//! ends so the caller can reconnect with backoff.

use std::time::{Duration, SystemTime};

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_message::Body as AgentBody;
use rollwave_proto::v1::agent_service_client::AgentServiceClient;
use rollwave_proto::v1::coordinator_message::Body as CoordinatorBody;
use rollwave_trust::{AGENT_SERVER_NAME, ChannelOptions};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::identity::{Identity, IdentityError};
use crate::join::new_key_request;
use crate::unix_ms;

/// How long the coordinator has to acknowledge a hello.
const HELLO_ACK_TIMEOUT: Duration = Duration::from_secs(15);
/// Missed heartbeat acknowledgements after which the session counts as dead.
const MISSED_ACKS_LIMIT: u64 = 3;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Trust(#[from] rollwave_trust::Error),
    #[error("coordinator: {}", .0.message())]
    Status(#[from] tonic::Status),
    #[error("the coordinator did not acknowledge the hello in time")]
    NoHelloAck,
    #[error("the coordinator says this is instance {said}, but our certificate is for {ours}")]
    IdentityMismatch { said: String, ours: String },
    #[error("the coordinator stopped answering heartbeats")]
    HeartbeatsUnanswered,
    #[error("the coordinator closed the session")]
    Closed,
    #[error("renew certificate: {0}")]
    Renew(String),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl SessionError {
    /// Errors after which reconnecting cannot help: the coordinator no longer
    /// knows this instance, so it must join again.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SessionError::Status(status) if status.code() == tonic::Code::PermissionDenied)
    }

    /// The coordinator refused the session because another agent with this
    /// identity holds a live one: two hosts share one identity.
    pub fn is_duplicate_identity(&self) -> bool {
        matches!(self, SessionError::Status(status) if status.code() == tonic::Code::AlreadyExists)
    }
}

pub async fn dial(coordinator: &str, identity: &Identity) -> Result<Channel, SessionError> {
    let tls = rollwave_trust::agent_client_config(
        identity.ca_pem.as_bytes(),
        identity.certificate_pem.as_bytes(),
        identity.key_pem.as_bytes(),
    )?;
    let options = ChannelOptions {
        request_timeout: None,
        ..ChannelOptions::default()
    };
    Ok(rollwave_trust::connect(coordinator, tls, AGENT_SERVER_NAME, &options).await?)
}

/// Runs one session until it ends. Renews the certificate when due (saved to
/// `tls_dir`) and returns so the next session uses it.
///
/// `synced` counts sessions that got their first heartbeat acknowledgement.
/// The coordinator queues the desired state it sends with a hello before it
/// reads any heartbeat, so by then `desired` holds it (if there is one): the
/// agent's readiness waits for that moment (see `notify`).
#[allow(clippy::too_many_arguments)]
pub async fn run_session(
    coordinator: &str,
    identity: &mut Identity,
    tls_dir: &std::path::Path,
    facts: pb::InstanceFacts,
    observed: Vec<pb::ObservedRelease>,
    desired: &watch::Sender<Option<pb::DesiredState>>,
    reports: &mut mpsc::Receiver<pb::AgentMessage>,
    synced: &watch::Sender<u64>,
) -> Result<(), SessionError> {
    let channel = dial(coordinator, identity).await?;
    let mut client = AgentServiceClient::new(channel);

    let (outbound, outbound_receiver) = mpsc::channel::<pb::AgentMessage>(16);
    outbound
        .send(pb::AgentMessage {
            body: Some(AgentBody::Hello(pb::Hello {
                instance_id: identity.instance_id.clone(),
                facts: Some(facts),
                observed,
            })),
        })
        .await
        .map_err(|_| SessionError::Closed)?;
    let mut inbound = client
        .session(ReceiverStream::new(outbound_receiver))
        .await?
        .into_inner();

    let ack = match tokio::time::timeout(HELLO_ACK_TIMEOUT, inbound.next()).await {
        Err(_) => return Err(SessionError::NoHelloAck),
        Ok(None) => return Err(SessionError::Closed),
        Ok(Some(message)) => match message?.body {
            Some(CoordinatorBody::HelloAck(ack)) => ack,
            _ => return Err(SessionError::NoHelloAck),
        },
    };
    if ack.instance_id != identity.instance_id {
        return Err(SessionError::IdentityMismatch {
            said: ack.instance_id,
            ours: identity.instance_id.clone(),
        });
    }
    tracing::info!(instance = %identity.instance_id, stack = %ack.stack, "session established");

    let interval = Duration::from_millis(u64::from(ack.heartbeat_interval_ms.max(100)));
    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sequence: u64 = 0;
    let mut acknowledged: u64 = 0;
    let mut announced_sync = false;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                if sequence.saturating_sub(acknowledged) > MISSED_ACKS_LIMIT {
                    return Err(SessionError::HeartbeatsUnanswered);
                }
                if unix_ms(SystemTime::now()) >= identity.renew_at_ms() {
                    renew(&mut client, identity, tls_dir).await?;
                    // Reconnect so the new certificate is the one presented.
                    return Ok(());
                }
                sequence += 1;
                let message = pb::AgentMessage { body: Some(AgentBody::Heartbeat(pb::Heartbeat { sequence })) };
                if outbound.send(message).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            Some(report) = reports.recv() => {
                if outbound.send(report).await.is_err() {
                    return Err(SessionError::Closed);
                }
            }
            message = inbound.next() => match message {
                None => return Err(SessionError::Closed),
                Some(Err(status)) => return Err(status.into()),
                Some(Ok(message)) => match message.body {
                    Some(CoordinatorBody::HeartbeatAck(ack)) => {
                        if !announced_sync {
                            announced_sync = true;
                            synced.send_modify(|sessions| *sessions += 1);
                        }
                        acknowledged = acknowledged.max(ack.sequence);
                    }
                    Some(CoordinatorBody::DesiredState(state)) => {
                        tracing::info!(epoch = state.epoch, deployment = %state.deployment_id, "desired state received");
                        desired.send_replace(Some(state));
                    }
                    Some(CoordinatorBody::Ping(ping)) => {
                        // A second session for our identity arrived: prove this one alive.
                        let pong = pb::AgentMessage { body: Some(AgentBody::Pong(pb::Pong { nonce: ping.nonce })) };
                        if outbound.send(pong).await.is_err() {
                            return Err(SessionError::Closed);
                        }
                    }
                    Some(CoordinatorBody::HelloAck(_)) | None => {}
                },
            },
        }
    }
}

async fn renew(
    client: &mut AgentServiceClient<Channel>,
    identity: &mut Identity,
    tls_dir: &std::path::Path,
) -> Result<(), SessionError> {
    let key = new_key_request().map_err(|error| SessionError::Renew(error.to_string()))?;
    let response = client
        .renew(pb::RenewRequest { csr_pem: key.csr_pem })
        .await?
        .into_inner();
    let renewed = Identity {
        issued_at_ms: unix_ms(SystemTime::now()),
        not_after_ms: response.not_after_unix_ms,
        certificate_pem: response.certificate_pem,
        key_pem: key.key_pem,
        ..identity.clone()
    };
    renewed.save(tls_dir)?;
    *identity = renewed;
    tracing::info!(instance = %identity.instance_id, "certificate renewed");
    Ok(())
}
