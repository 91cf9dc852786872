//! `rollwave.v1.AgentService`: joins, certificate renewals and agent sessions.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_message::Body as AgentBody;
use rollwave_proto::v1::coordinator_message::Body as CoordinatorBody;
use rollwave_trust::Fingerprint;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{ServiceError, Shared, random_hex, secret_hash};
use crate::ca::SignedCertificate;
use crate::enrollment::{JoinAttempt, JoinDecision};
use crate::model::{InstanceFacts, ObservedRelease, unix_ms, validate_name};
use crate::sessions::{Admission, Outbound, PROBE_TIMEOUT, SessionStream, session_stream};
use crate::store::{IssuedCertificate, NewJoin, StoreError};

/// Acknowledgements queued for one agent before the session counts as stuck
/// (desired states do not queue: each session has a slot for the newest one).
const OUTBOUND_QUEUE: usize = 32;
/// Tags an agent may declare, and their sizes: facts are for display.
const MAX_TAGS: usize = 64;
const MAX_FACT_LEN: usize = 256;

#[derive(Debug, Clone)]
pub struct AgentApi {
    shared: Arc<Shared>,
}

impl AgentApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The instance the caller's client certificate identifies.
    fn caller<T>(&self, request: &Request<T>) -> Result<String, ServiceError> {
        let certificates = request.peer_certs().ok_or_else(|| {
            ServiceError::Unauthenticated(
                "a client certificate is required: agents connect under the agent TLS name".into(),
            )
        })?;
        let leaf = certificates
            .first()
            .ok_or_else(|| ServiceError::Unauthenticated("empty client certificate chain".into()))?;
        self.shared
            .issued
            .instance_for(&Fingerprint::of_der(leaf))
            .ok_or_else(|| ServiceError::Unauthenticated("this certificate no longer identifies an instance".into()))
    }

    /// Signs the CSR as `instance_id`'s certificate; returns it with the row to store.
    fn sign(
        &self,
        csr_pem: &str,
        instance_id: &str,
        now: SystemTime,
    ) -> Result<(SignedCertificate, IssuedCertificate), ServiceError> {
        let signed = self.shared.ca.sign_instance_certificate(
            csr_pem,
            instance_id,
            self.shared.settings.certificate_ttl,
            OffsetDateTime::from(now),
        )?;
        let issued = IssuedCertificate {
            fingerprint: signed.fingerprint.to_string(),
            issued_at_ms: unix_ms(now),
            not_after_ms: unix_ms(signed.not_after.into()),
        };
        Ok((signed, issued))
    }

    async fn join(&self, request: pb::JoinRequest) -> Result<pb::JoinResponse, ServiceError> {
        let shared = &self.shared;
        let facts = facts_from_proto(request.facts.unwrap_or_default())?;
        let refused = || ServiceError::PermissionDenied("join token refused: unknown or wrong secret".into());
        let token = match shared.store.get_token(&request.token_id).await {
            Ok(token) => token,
            Err(StoreError::NoSuchToken(_)) => return Err(refused()),
            Err(error) => return Err(error.into()),
        };
        if secret_hash(&request.token_secret) != token.secret_sha256 {
            shared
                .audit(
                    "agent",
                    "instance.join",
                    &token.stack,
                    "denied",
                    format!("token {}: wrong secret", token.id),
                )
                .await;
            return Err(refused());
        }
        if !request.expected_stack.is_empty() && request.expected_stack != token.stack {
            return Err(ServiceError::PermissionDenied(format!(
                "join token {} is for stack {:?}, but this instance is configured for stack {:?}",
                token.id, token.stack, request.expected_stack
            )));
        }
        let instance_id = if request.requested_instance_id.is_empty() {
            format!("i-{}", random_hex(8))
        } else {
            validate_name("instance id", &request.requested_instance_id)?;
            request.requested_instance_id
        };
        if request.request_id.len() > MAX_FACT_LEN {
            return Err(ServiceError::BadRequest(format!(
                "join request id too long: at most {MAX_FACT_LEN} bytes"
            )));
        }
        let now = SystemTime::now();
        let (signed, issued) = self.sign(&request.csr_pem, &instance_id, now)?;
        let attempt = JoinAttempt {
            request_id: request.request_id,
            public_key_sha256: signed.public_key.to_string(),
            stack: token.stack.clone(),
            instance_id,
        };
        let join = NewJoin {
            attempt: &attempt,
            token_id: &token.id,
            facts: &facts,
            certificate: &issued,
            certificate_pem: &signed.pem,
            now_ms: unix_ms(now),
        };
        let outcome = match shared.issued.join(&shared.store, &join).await {
            Ok(decision) => Ok(decision),
            Err(StoreError::JoinRefused(refused)) => Err(refused),
            Err(error) => return Err(error.into()),
        };
        let (instance_id, certificate_pem, not_after_ms) = match outcome {
            Ok(JoinDecision::Create) => (attempt.instance_id, signed.pem, issued.not_after_ms),
            Ok(JoinDecision::Replay(past)) => {
                tracing::info!(instance = %past.instance_id, request = %past.request_id, "join repeated; answered as before");
                (past.instance_id, past.certificate_pem, past.not_after_ms)
            }
            Err(refused) => {
                shared
                    .audit(
                        "agent",
                        "instance.join",
                        &attempt.instance_id,
                        "denied",
                        format!("token {}: {refused}", token.id),
                    )
                    .await;
                return Err(StoreError::JoinRefused(refused).into());
            }
        };
        shared
            .audit(
                &format!("instance:{instance_id}"),
                "instance.join",
                &instance_id,
                "ok",
                format!("stack {} zone {:?} token {}", token.stack, facts.zone, token.id),
            )
            .await;
        tracing::info!(instance = %instance_id, stack = %token.stack, zone = %facts.zone, "instance joined");
        Ok(pb::JoinResponse {
            instance_id,
            stack: token.stack,
            certificate_pem,
            ca_pem: shared.ca.certificate_pem().to_owned(),
            not_after_unix_ms: not_after_ms,
        })
    }

    async fn renew(&self, instance_id: &str, request: pb::RenewRequest) -> Result<pb::RenewResponse, ServiceError> {
        let shared = &self.shared;
        let (signed, issued) = self.sign(&request.csr_pem, instance_id, SystemTime::now())?;
        shared.issued.renew(&shared.store, instance_id, &issued).await?;
        tracing::info!(instance = %instance_id, "certificate renewed");
        Ok(pb::RenewResponse {
            certificate_pem: signed.pem,
            not_after_unix_ms: issued.not_after_ms,
        })
    }

    /// Checks the hello, records it and registers the session.
    async fn open_session(
        &self,
        instance_id: &str,
        peer: &str,
        inbound: &mut Streaming<pb::AgentMessage>,
    ) -> Result<(Outbound, SessionStream, u64), Status> {
        let shared = &self.shared;
        let first = tokio::time::timeout(shared.settings.hello_timeout, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within the hello timeout"))?;
        let hello = match first {
            Some(Ok(pb::AgentMessage {
                body: Some(AgentBody::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be a hello",
                ));
            }
        };
        if !hello.instance_id.is_empty() && hello.instance_id != instance_id {
            shared
                .audit(
                    &format!("instance:{instance_id}"),
                    "session.open",
                    &hello.instance_id,
                    "denied",
                    "tried to speak for another instance".into(),
                )
                .await;
            return Err(Status::permission_denied(format!(
                "this certificate identifies instance {instance_id}; it cannot speak for {}",
                hello.instance_id
            )));
        }
        let facts = facts_from_proto(hello.facts.unwrap_or_default()).map_err(Status::from)?;
        let observed: Vec<ObservedRelease> = hello
            .observed
            .into_iter()
            .map(|release| ObservedRelease {
                bundle: release.bundle,
                version: release.version,
                sha256: release.sha256,
                state: release.state,
            })
            .collect();
        let instance = shared
            .store
            .get_instance(instance_id)
            .await
            .map_err(|error| Status::from(ServiceError::from(error)))?;
        let ack = pb::HelloAck {
            instance_id: instance_id.to_owned(),
            stack: instance.stack,
            heartbeat_interval_ms: u32::try_from(shared.settings.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
        };
        let (sender, receiver) = mpsc::channel(OUTBOUND_QUEUE);
        let (desired, desired_receiver) = watch::channel(None);
        let hello_ack = pb::CoordinatorMessage {
            body: Some(CoordinatorBody::HelloAck(ack)),
        };
        // Before anything of this hello is stored: a duplicate must not overwrite what the live holder said.
        let session_id = match shared
            .sessions
            .admit(instance_id, sender.clone(), desired, PROBE_TIMEOUT)
            .await
        {
            Admission::Opened { session_id, replaced } => {
                if replaced {
                    tracing::info!(instance = %instance_id, %peer, "the previous session did not answer a ping; replaced it");
                }
                session_id
            }
            Admission::Duplicate => return Err(self.refuse_duplicate(instance_id, peer).await),
        };
        let recorded = shared
            .store
            .record_hello(instance_id, &facts, &observed, unix_ms(SystemTime::now()))
            .await;
        if let Err(error) = recorded {
            shared.sessions.close(instance_id, session_id);
            return Err(ServiceError::from(error).into());
        }
        Ok((
            sender,
            session_stream(hello_ack, receiver, desired_receiver),
            session_id,
        ))
    }

    /// Records a refused duplicate (audited once per streak) and says why to its agent.
    async fn refuse_duplicate(&self, instance_id: &str, peer: &str) -> Status {
        let shared = &self.shared;
        let now = unix_ms(SystemTime::now());
        let detail = format!(
            "another live session holds this identity; refused a second session from {peer}: \
             two hosts share one identity (a copied TLS dir, an image baked after joining)"
        );
        tracing::warn!(instance = %instance_id, %peer, "{detail}");
        if shared.sessions.note_duplicate(instance_id, peer, now) {
            shared
                .audit(
                    &format!("instance:{instance_id}"),
                    "session.open",
                    instance_id,
                    "denied",
                    format!("duplicate identity: {detail}"),
                )
                .await;
        }
        Status::already_exists(format!(
            "another live session holds this identity (instance {instance_id}); this host must not use it: \
             stop this agent, remove its tls_dir/identity.toml and join with a new token"
        ))
    }
}

/// Reads the session's messages until it ends, then forgets the session.
async fn serve_session(
    shared: Arc<Shared>,
    instance_id: String,
    session_id: u64,
    mut inbound: Streaming<pb::AgentMessage>,
    outbound: Outbound,
) {
    while let Some(message) = inbound.next().await {
        // A replaced or evicted session speaks for the instance no more.
        if !shared.sessions.is_current(&instance_id, session_id) {
            break;
        }
        let body = match message {
            Ok(pb::AgentMessage { body: Some(body) }) => body,
            Ok(pb::AgentMessage { body: None }) => continue,
            Err(status) => {
                tracing::debug!(instance = %instance_id, %status, "session stream error");
                break;
            }
        };
        match body {
            AgentBody::Heartbeat(heartbeat) => {
                if let Err(error) = shared
                    .store
                    .touch_instance(&instance_id, unix_ms(SystemTime::now()))
                    .await
                {
                    tracing::warn!(instance = %instance_id, %error, "could not record heartbeat");
                }
                let ack = pb::CoordinatorMessage {
                    body: Some(CoordinatorBody::HeartbeatAck(pb::HeartbeatAck {
                        sequence: heartbeat.sequence,
                    })),
                };
                // A full queue means the agent is not reading; its missing acks will tell it.
                let _ = outbound.try_send(Ok(ack));
            }
            AgentBody::Hello(_) => {
                tracing::warn!(instance = %instance_id, "second hello in one session ignored");
            }
            // Damage the agent repaired on its own (see the agent's `reconcile::REPAIR_STEP`).
            AgentBody::Progress(event) if event.step == "repair" => {
                tracing::warn!(instance = %instance_id, bundle = %event.bundle, message = %event.message, "agent repaired damage");
                shared
                    .audit(
                        &format!("instance:{instance_id}"),
                        "instance.repair",
                        &instance_id,
                        "ok",
                        format!("{}: {}", event.bundle, event.message),
                    )
                    .await;
            }
            AgentBody::Progress(event) => {
                tracing::info!(
                    instance = %instance_id, bundle = %event.bundle, version = %event.version,
                    step = %event.step, state = %event.state, message = %event.message, "progress"
                );
                if event.step == "activate" && event.state == "done" {
                    let recorded = shared
                        .store
                        .set_observed_release(&instance_id, &event.bundle, &event.version, "")
                        .await;
                    if let Err(error) = recorded {
                        tracing::warn!(instance = %instance_id, %error, "cannot record the running release");
                    }
                }
                record_install_failure(&shared, &instance_id, &event).await;
                shared.deployer.on_progress(&shared, &instance_id, &event).await;
            }
            AgentBody::Health(event) => {
                shared.deployer.on_health(&shared, &instance_id, &event).await;
            }
            AgentBody::HookOutput(_) => {
                tracing::debug!(instance = %instance_id, "hook output received");
            }
            AgentBody::Pong(pong) => {
                shared.sessions.answer_probe(&instance_id, session_id, pong.nonce);
            }
        }
    }
    shared.sessions.close(&instance_id, session_id);
    tracing::info!(instance = %instance_id, "session ended");
}

/// Keeps the store's list of installs that keep failing in step with the agent's progress: a
/// failure the agent retries (it says since when) is recorded, and audited when it is news;
/// any other outcome for the bundle ends it.
async fn record_install_failure(shared: &Shared, instance_id: &str, event: &pb::ProgressEvent) {
    let target = format!("instance:{instance_id}");
    let release = format!("{}@{}", event.bundle, event.version);
    let outcome = if event.failing_since_unix_ms > 0 && event.state == "failed" {
        let failure = crate::store::InstallFailureRow {
            instance_id: instance_id.to_owned(),
            bundle: event.bundle.clone(),
            version: event.version.clone(),
            reason: event.message.clone(),
            since_ms: event.failing_since_unix_ms,
        };
        shared.store.record_install_failure(&failure).await.map(|news| {
            news.then(|| {
                (
                    "instance.install_failing",
                    "failed",
                    format!("{release}: {}", event.message),
                )
            })
        })
    } else if event.state == "done" {
        // Only an install that worked ends the failure (a deployment's failed prepare does not).
        shared
            .store
            .clear_install_failure(instance_id, &event.bundle)
            .await
            .map(|ended| {
                ended.then(|| {
                    (
                        "instance.install_recovered",
                        "ok",
                        format!("{release}: {}", event.message),
                    )
                })
            })
    } else {
        Ok(None)
    };
    match outcome {
        Ok(Some((action, result, detail))) => {
            tracing::info!(instance = %instance_id, action, %detail, "install status changed");
            shared.audit(&target, action, &target, result, detail).await;
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(instance = %instance_id, %error, "cannot record the install's status"),
    }
}

fn facts_from_proto(facts: pb::InstanceFacts) -> Result<InstanceFacts, ServiceError> {
    for (what, value) in [("layer", &facts.layer), ("zone", &facts.zone)] {
        if !value.is_empty() {
            validate_name(what, value)?;
        }
    }
    let too_long = |value: &str| value.len() > MAX_FACT_LEN;
    if facts.tags.len() > MAX_TAGS
        || facts.tags.iter().any(|(key, value)| too_long(key) || too_long(value))
        || too_long(&facts.hostname)
        || too_long(&facts.agent_version)
    {
        return Err(ServiceError::BadRequest(format!(
            "instance facts too large: at most {MAX_TAGS} tags, {MAX_FACT_LEN} bytes per value"
        )));
    }
    Ok(InstanceFacts {
        hostname: facts.hostname,
        layer: facts.layer,
        zone: facts.zone,
        tags: facts.tags.into_iter().collect::<BTreeMap<_, _>>(),
        agent_version: facts.agent_version,
    })
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        Ok(Response::new(AgentApi::join(self, request.into_inner()).await?))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let instance_id = self.caller(&request)?;
        Ok(Response::new(
            AgentApi::renew(self, &instance_id, request.into_inner()).await?,
        ))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let instance_id = self.caller(&request)?;
        let peer = request
            .remote_addr()
            .map_or_else(|| "an unknown address".to_owned(), |addr| addr.to_string());
        let mut inbound = request.into_inner();
        let (outbound, stream, session_id) = self.open_session(&instance_id, &peer, &mut inbound).await?;
        tracing::info!(instance = %instance_id, "session opened");
        // The instance's wish (approved releases for a new one) goes out first,
        // then deployments of its stack take it on if it is new to them.
        let shared = self.shared.clone();
        let stack = shared
            .store
            .get_instance(&instance_id)
            .await
            .map(|instance| instance.stack)
            .map_err(|error| Status::from(ServiceError::from(error)))?;
        if let Err(error) = crate::wishes::resend(&shared, &instance_id, &stack).await {
            tracing::warn!(instance = %instance_id, %error, "cannot send the instance its desired state");
        }
        shared.deployer.on_hello(&shared, &instance_id, &stack).await;
        tokio::spawn(serve_session(
            self.shared.clone(),
            instance_id,
            session_id,
            inbound,
            outbound,
        ));
        Ok(Response::new(stream))
    }
}
