//! rollwave-agent: the process on every instance. Joins the coordinator once,
//! then keeps a session with it for good, reconnecting with jittered backoff.
//!
//! See ARCHITECTURE.md for the code map and the invariants.

pub mod backoff;
pub mod config;
pub mod health;
pub mod hooks;
pub mod identity;
pub mod imds;
pub mod install;
pub mod installer;
pub mod join;
pub mod journal;
pub mod layout;
pub mod link;
pub mod lock;
pub mod notify;
pub mod reconcile;
pub mod service;

use std::time::SystemTime;

use rollwave_proto::v1 as pb;

use crate::backoff::Backoff;
use crate::config::{AgentConfig, ImdsMode};
use crate::identity::{Identity, IdentityError};
use crate::installer::Installer;
use crate::join::{JoinError, JoinRequest, PendingJoin};
use crate::layout::Layout;
use crate::lock::{LockError, StateDirLock};
use crate::notify::{Notifier, Startup, StoppingOnDrop};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "this instance has not joined yet and agent.toml has no join_token; create one with `rollwave token create --stack STACK`"
    )]
    NoJoinToken,
    #[error("join failed: {0}")]
    Join(JoinError),
    #[error(
        "the coordinator no longer accepts this instance ({0}); it was removed: remove {1} and join again with a new token"
    )]
    Removed(String, String),
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map(|since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

/// What this instance says about itself, from the config, else EC2 metadata.
async fn gather_facts(config: &AgentConfig) -> (pb::InstanceFacts, Option<String>) {
    let mut zone = config.zone.clone();
    let mut instance_id = config.instance_id.clone();
    if config.imds == ImdsMode::Auto && (zone.is_none() || instance_id.is_none()) {
        let metadata = imds::discover().await;
        zone = zone.or(metadata.zone);
        instance_id = instance_id.or(metadata.instance_id);
    }
    let facts = pb::InstanceFacts {
        hostname: config.hostname.clone().unwrap_or_else(local_hostname),
        layer: config.layer.clone(),
        zone: zone.unwrap_or_default(),
        tags: config.tags.clone().into_iter().collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    (facts, instance_id)
}

fn is_refusal(error: &JoinError) -> bool {
    matches!(error, JoinError::Refused(status) if matches!(
        status.code(),
        tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition
    )) || matches!(error, JoinError::WrongStack { .. })
}

/// Joins (retrying while the coordinator cannot be reached) and stores the identity.
async fn join_until_done(
    config: &AgentConfig,
    facts: &pb::InstanceFacts,
    instance_id: Option<String>,
) -> Result<Identity, AgentError> {
    let token = config.join_token.as_ref().ok_or(AgentError::NoJoinToken)?;
    // One key and request id for every attempt of this join, restarts included.
    let pending = PendingJoin::load_or_create(&config.tls_dir).map_err(AgentError::Join)?;
    let mut backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
    loop {
        let request = JoinRequest {
            facts: facts.clone(),
            instance_id: instance_id.clone(),
            expected_stack: config.stack.clone(),
        };
        match join::join(&config.coordinator, token, request, &pending).await {
            Ok(identity) => {
                identity.save(&config.tls_dir)?;
                PendingJoin::remove(&config.tls_dir).map_err(AgentError::Join)?;
                tracing::info!(instance = %identity.instance_id, stack = %identity.stack, "joined");
                return Ok(identity);
            }
            Err(error) if is_refusal(&error) => return Err(AgentError::Join(error)),
            Err(error) => {
                let delay = backoff.next_delay(fastrand::f64());
                tracing::warn!(error = %error, retry_in = ?delay, "join failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Reports queued while the session is down (progress first; health is dropped when half full).
const REPORT_QUEUE: usize = 1024;

/// Stops a background task when the agent's run ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Moves the agent's startup on to `Installing`, then `Ready` or `Failing`: once the first
/// session is in sync (see `link::run_session`), the desired state it brought, if any, must be
/// applied by the reconciler. From then on it follows the reconciler: an install of the
/// approved releases that keeps failing shows as `Failing` until it succeeds.
async fn track_startup(
    mut synced: tokio::sync::watch::Receiver<u64>,
    desired: tokio::sync::watch::Receiver<Option<pb::DesiredState>>,
    mut convergence: tokio::sync::watch::Receiver<reconcile::Convergence>,
    startup: tokio::sync::watch::Sender<Startup>,
) {
    if synced.wait_for(|sessions| *sessions > 0).await.is_err() {
        return;
    }
    let wanted = desired.borrow().as_ref().map(|state| state.epoch);
    if let Some(epoch) = wanted {
        startup.send_replace(Startup::Installing { epoch });
    }
    let wanted = wanted.unwrap_or(0);
    loop {
        let next = match &*convergence.borrow_and_update() {
            reconcile::Convergence::Failing {
                since_unix_ms, reason, ..
            } => Some(Startup::Failing {
                since_unix_ms: *since_unix_ms,
                reason: reason.clone(),
            }),
            reconcile::Convergence::Applied { epoch } if *epoch >= wanted => Some(Startup::Ready),
            _ if wanted == 0 => Some(Startup::Ready),
            _ => None,
        };
        if let Some(next) = next
            && *startup.borrow() != next
        {
            if next == Startup::Ready {
                tracing::info!("ready: connected and the desired state is applied");
            }
            startup.send_replace(next);
        }
        if convergence.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the agent until a permanent error. Never returns `Ok`: callers stop it
/// by dropping the future (on SIGTERM).
pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let _lock = StateDirLock::acquire(&config.state_dir)?;
    // Under systemd (Type=notify): readiness, start-timeout extensions, watchdog, STOPPING=1
    // when this future ends or is dropped (SIGTERM). A no-op without $NOTIFY_SOCKET.
    let notifier = Notifier::from_env();
    let _stopping = StoppingOnDrop(notifier.clone());
    let (startup, startup_receiver) = tokio::sync::watch::channel(Startup::Recovering);
    let _notify = AbortOnDrop(tokio::spawn(notify::run(
        notifier,
        startup_receiver,
        config.ready_fallback,
    )));
    // Finish or roll back installs a killed agent left behind before anything else.
    // With `imds = "off"` nothing may ask the metadata service, the S3 client's chains included.
    let metadata = match config.imds {
        ImdsMode::Auto => rollwave_artifacts::InstanceMetadata::Allowed,
        ImdsMode::Off => rollwave_artifacts::InstanceMetadata::Forbidden,
    };
    let s3 = rollwave_artifacts::client(&config.s3, metadata).await;
    // What the installer repairs on its own (damaged journal, broken `current`) goes to the coordinator.
    let (repairs, repair_queue) = tokio::sync::mpsc::unbounded_channel();
    let installer =
        Installer::new(Layout::new(&config.state_dir), config.install.clone(), Some(s3)).with_repairs(repairs);
    if let Err(error) = installer.recover_all().await {
        tracing::warn!(%error, "cannot recover interrupted installs");
    }
    // Desired state in from the session, reports out to it; both outlive any one session.
    let (desired, desired_receiver) = tokio::sync::watch::channel(None);
    let (reports, mut report_queue) = tokio::sync::mpsc::channel(REPORT_QUEUE);
    let _repairs = AbortOnDrop(tokio::spawn(reconcile::report_repairs(repair_queue, reports.clone())));
    // Keep the apps the agent runs alive (under systemd: start again units a reboot removed),
    // and report every exit of one at once.
    let services = installer.services().clone();
    let exit_reports = reports.clone();
    let _supervision = AbortOnDrop(tokio::spawn(async move {
        loop {
            for exit in services.restart_dead().await {
                reconcile::report_exit(&exit_reports, &exit);
            }
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), services.app_exited()).await;
        }
    }));
    let (convergence, convergence_receiver) = tokio::sync::watch::channel(reconcile::Convergence::Pending);
    let _reconciler = AbortOnDrop(tokio::spawn(reconcile::run(
        installer.clone(),
        desired_receiver,
        reports.clone(),
        convergence,
    )));
    startup.send_replace(Startup::Connecting);
    let (synced, synced_receiver) = tokio::sync::watch::channel(0);
    let _startup = AbortOnDrop(tokio::spawn(track_startup(
        synced_receiver,
        desired.subscribe(),
        convergence_receiver,
        startup,
    )));
    let _health = AbortOnDrop(tokio::spawn(reconcile::report_health(installer.clone(), reports)));
    let (facts, instance_id) = gather_facts(&config).await;
    let mut identity = match Identity::load(&config.tls_dir)? {
        Some(identity) => identity,
        None => join_until_done(&config, &facts, instance_id).await?,
    };
    let mut backoff = Backoff::new(config.reconnect_initial, config.reconnect_max);
    loop {
        let started = std::time::Instant::now();
        let result = link::run_session(
            &config.coordinator,
            &mut identity,
            &config.tls_dir,
            facts.clone(),
            reconcile::observed(&installer),
            &desired,
            &mut report_queue,
            &synced,
        )
        .await;
        match result {
            Ok(()) => backoff.reset(),
            Err(error) if error.is_permanent() => {
                return Err(AgentError::Removed(
                    error.to_string(),
                    Identity::file(&config.tls_dir).display().to_string(),
                ));
            }
            Err(error) if error.is_duplicate_identity() => {
                // Not a fault a quick retry fixes: wait the longest reconnect delay, and say why.
                let delay = config.reconnect_max.mul_f64(0.5 + 0.5 * fastrand::f64());
                tracing::error!(
                    error = %error,
                    retry_in = ?delay,
                    "duplicate identity: another agent with this instance's identity holds a live session \
                     (a copied {} or an image baked after joining); this agent stays disconnected. \
                     Give this host its own identity: stop the agent, remove {}, and join with a new token",
                    config.tls_dir.display(),
                    Identity::file(&config.tls_dir).display(),
                );
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                // A session that lasted a while was healthy: start backing off from the bottom.
                if started.elapsed() > config.reconnect_max {
                    backoff.reset();
                }
                let delay = backoff.next_delay(fastrand::f64());
                tracing::warn!(error = %error, retry_in = ?delay, "session ended; reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;
    use crate::reconcile::Convergence;

    /// Waits (with a deadline) until `startup` says what `wanted` accepts.
    async fn until(startup: &mut watch::Receiver<Startup>, wanted: impl Fn(&Startup) -> bool) -> Startup {
        tokio::time::timeout(Duration::from_secs(10), startup.wait_for(|state| wanted(state)))
            .await
            .expect("in time")
            .expect("the tracker runs")
            .clone()
    }

    /// Field trial: the agent logged "ready: connected and the desired state is applied" after
    /// its install of the approved release had failed. Ready follows the reconciler instead.
    #[tokio::test]
    async fn startup_is_ready_only_once_the_desired_state_is_applied() {
        let (synced, synced_receiver) = watch::channel(0u64);
        let (desired, desired_receiver) = watch::channel(None);
        let (convergence, convergence_receiver) = watch::channel(Convergence::Pending);
        let (startup, mut startup_receiver) = watch::channel(Startup::Connecting);
        let task = tokio::spawn(track_startup(
            synced_receiver,
            desired_receiver,
            convergence_receiver,
            startup,
        ));
        desired.send_replace(Some(pb::DesiredState {
            epoch: 7,
            ..pb::DesiredState::default()
        }));
        synced.send_replace(1);
        assert_eq!(
            until(&mut startup_receiver, |state| *state != Startup::Connecting).await,
            Startup::Installing { epoch: 7 }
        );
        convergence.send_replace(Convergence::Failing {
            epoch: 7,
            since_unix_ms: 5,
            reason: "app@1.0: S3 unreachable".into(),
        });
        assert_eq!(
            until(&mut startup_receiver, |state| matches!(state, Startup::Failing { .. })).await,
            Startup::Failing {
                since_unix_ms: 5,
                reason: "app@1.0: S3 unreachable".into()
            }
        );
        convergence.send_replace(Convergence::Applied { epoch: 7 });
        assert_eq!(
            until(&mut startup_receiver, |state| *state == Startup::Ready).await,
            Startup::Ready
        );
        task.abort();
    }
}
