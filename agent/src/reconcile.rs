//! Brings the instance to the coordinator's desired state: prepares and
//! activates the releases it names, one push at a time and newest epoch
//! only (a push older than the last one applied is ignored, also across
//! restarts), reports the outcome of each release as a progress event, and
//! keeps reporting the health of every current release.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_message::Body as AgentBody;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::install::Goal;
use crate::installer::{InstallOutcome, InstallRequest, Installer, Repair, read_manifest};
use crate::journal::Source;

/// How often the health checks of current releases run.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Per-round deadline for the health checks of one release.
const HEALTH_ROUND_DEADLINE: Duration = Duration::from_secs(30);

/// The last desired state applied, persisted so stale pushes stay ignored after a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Applied {
    epoch: u64,
}

/// Where the agent's reports go (the session forwards them when connected).
pub type Reports = mpsc::Sender<pb::AgentMessage>;

fn applied_path(installer: &Installer) -> PathBuf {
    installer.layout().state_dir().join("desired.json")
}

fn load_applied(installer: &Installer) -> Applied {
    std::fs::read(applied_path(installer))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn save_applied(installer: &Installer, applied: &Applied) {
    let path = applied_path(installer);
    let result = serde_json::to_vec(applied)
        .map_err(std::io::Error::other)
        .and_then(|bytes| rollwave_trust::files::write_private(&path, &bytes));
    if let Err(error) = result {
        tracing::warn!(path = %path.display(), %error, "cannot record the applied epoch");
    }
}

fn send(reports: &Reports, body: AgentBody) {
    // While disconnected, health reports must not crowd out progress reports.
    if matches!(body, AgentBody::Health(_)) && reports.capacity() < reports.max_capacity() / 2 {
        return;
    }
    if reports.try_send(pb::AgentMessage { body: Some(body) }).is_err() {
        tracing::warn!("report queue full; dropping a report (the coordinator re-asks on reconnect)");
    }
}

fn source_of(release: &pb::ReleaseRef) -> Source {
    Source::S3 {
        bucket: release.bucket.clone(),
        key: release.key.clone(),
        version_id: Some(release.object_version.clone()).filter(|version| !version.is_empty()),
        size: release.size,
    }
}

/// Applies desired states as they arrive, until `desired` closes. `handled`
/// holds the highest epoch applied (or ignored as stale) by this process, for
/// the agent's readiness.
pub async fn run(
    installer: Installer,
    mut desired: watch::Receiver<Option<pb::DesiredState>>,
    reports: Reports,
    handled: watch::Sender<u64>,
) {
    let mut applied = load_applied(&installer);
    loop {
        let state = desired.borrow_and_update().clone();
        if let Some(state) = state {
            if state.epoch < applied.epoch {
                tracing::info!(
                    epoch = state.epoch,
                    applied = applied.epoch,
                    "ignoring a stale desired state"
                );
            } else {
                apply(&installer, &state, &reports).await;
                if state.epoch > applied.epoch {
                    applied.epoch = state.epoch;
                    save_applied(&installer, &applied);
                }
            }
            handled.send_modify(|epoch| *epoch = (*epoch).max(state.epoch));
        }
        if desired.changed().await.is_err() {
            return;
        }
    }
}

/// Prepares, then activates, what `state` names; reports each release's outcome.
async fn apply(installer: &Installer, state: &pb::DesiredState, reports: &Reports) {
    let deployment_id = Some(state.deployment_id.clone()).filter(|id| !id.is_empty());
    let steps = state
        .prepare
        .iter()
        .map(|release| (Goal::Prepare, release))
        .chain(state.active.iter().map(|release| (Goal::Activate, release)));
    for (goal, release) in steps {
        let step = match goal {
            Goal::Prepare => "prepare",
            Goal::Activate => "activate",
        };
        let result = installer
            .install(InstallRequest {
                bundle: release.bundle.clone(),
                version: release.version.clone(),
                sha256: release.sha256.clone(),
                source: source_of(release),
                goal,
                run_hooks: true,
                ignore_stop_failure: false,
                deployment_id: deployment_id.clone(),
                rollback: false,
            })
            .await;
        let (outcome, message) = match &result {
            Ok(InstallOutcome::Unchanged) => ("done", "already in place".to_owned()),
            Ok(InstallOutcome::Prepared) => ("done", "prepared".to_owned()),
            Ok(InstallOutcome::Activated { previous }) => (
                "done",
                match previous {
                    Some(previous) => format!("activated (previous {previous})"),
                    None => "activated".to_owned(),
                },
            ),
            Err(error) => ("failed", clip(&error.to_string())),
        };
        tracing::info!(bundle = %release.bundle, version = %release.version, step, outcome, %message, "desired state step");
        let activated = goal == Goal::Activate && result.is_ok();
        send(
            reports,
            AgentBody::Progress(pb::ProgressEvent {
                epoch: state.epoch,
                deployment_id: state.deployment_id.clone(),
                bundle: release.bundle.clone(),
                version: release.version.clone(),
                step: step.to_owned(),
                state: outcome.to_owned(),
                message,
            }),
        );
        if activated {
            // The coordinator's healthy clock starts at the first report: send one now rather
            // than at the next round of the health loop.
            check_and_report(installer, &release.bundle, &release.version, reports).await;
        }
    }
}

/// Reports carry at most this much of an error (the full text is in the agent's log).
const REPORT_MESSAGE_LIMIT: usize = 1024;

fn clip(message: &str) -> String {
    if message.len() <= REPORT_MESSAGE_LIMIT {
        return message.to_owned();
    }
    let mut end = REPORT_MESSAGE_LIMIT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// What the instance runs now, for hellos and status.
pub fn observed(installer: &Installer) -> Vec<pb::ObservedRelease> {
    let layout = installer.layout();
    let mut releases = Vec::new();
    for bundle in crate::journal::BundleJournal::bundles(layout).unwrap_or_default() {
        let Ok(Some(version)) = layout.current_version(&bundle) else {
            continue;
        };
        let journal = crate::journal::BundleJournal::load(layout, &bundle).unwrap_or_default();
        releases.push(pb::ObservedRelease {
            sha256: journal.prepared.get(&version).cloned().unwrap_or_default(),
            bundle,
            version,
            state: "installed".into(),
        });
    }
    releases
}

/// Runs the health checks of `version` of `bundle` once and reports the verdict.
async fn check_and_report(installer: &Installer, bundle: &str, version: &str, reports: &Reports) -> Option<bool> {
    let dir = installer.layout().release_dir(bundle, version);
    let manifest = read_manifest(&dir).ok()?;
    let log_dir = installer.layout().hook_log_dir().join(bundle);
    let verdict = crate::health::wait_healthy(&manifest.health, &dir, &log_dir, Duration::ZERO);
    let verdict = tokio::time::timeout(HEALTH_ROUND_DEADLINE, verdict)
        .await
        .unwrap_or_else(|_| Err("health checks did not finish in time".into()));
    let healthy = verdict.is_ok();
    send(
        reports,
        AgentBody::Health(pb::HealthEvent {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            healthy,
            detail: verdict.err().unwrap_or_default(),
            observed_at_unix_ms: crate::unix_ms(std::time::SystemTime::now()),
        }),
    );
    Some(healthy)
}

/// Whether an install that switches `bundle` (an activation or a rollback) is under way.
fn is_activating(installer: &Installer, bundle: &str) -> bool {
    crate::journal::BundleJournal::load(installer.layout(), bundle).is_ok_and(|journal| {
        journal.install.is_some_and(|active| {
            active.job.goal == Goal::Activate && matches!(active.state, crate::install::JobState::Running { .. })
        })
    })
}

/// Runs the health checks of every current release, forever, reporting each
/// result (the coordinator decides what "healthy long enough" means).
pub async fn report_health(installer: Installer, reports: Reports) {
    let mut last: BTreeMap<String, (String, bool)> = BTreeMap::new();
    loop {
        for release in observed(&installer) {
            if is_activating(&installer, &release.bundle) {
                // The activation runs the health checks itself and reports the outcome; a round
                // now could catch the app between its stop and its start and report a false
                // "unhealthy" (which would hold the next deployment's plan below its floor).
                continue;
            }
            let Some(healthy) = check_and_report(&installer, &release.bundle, &release.version, &reports).await else {
                continue;
            };
            let now = (release.version.clone(), healthy);
            if last.get(&release.bundle) != Some(&now) {
                tracing::info!(bundle = %release.bundle, version = %release.version, healthy, "health changed");
            }
            last.insert(release.bundle.clone(), now);
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// The progress step under which repairs travel; the coordinator audits them.
pub const REPAIR_STEP: &str = "repair";

/// Sends what the installer repaired on its own (a journal moved aside and
/// rebuilt, a damaged `current`) to the coordinator, for its audit trail.
pub async fn report_repairs(mut repairs: mpsc::UnboundedReceiver<Repair>, reports: Reports) {
    while let Some(repair) = repairs.recv().await {
        send(
            &reports,
            AgentBody::Progress(pb::ProgressEvent {
                epoch: 0,
                deployment_id: String::new(),
                bundle: repair.bundle,
                version: String::new(),
                step: REPAIR_STEP.to_owned(),
                state: "done".to_owned(),
                message: clip(&repair.message),
            }),
        );
    }
}
