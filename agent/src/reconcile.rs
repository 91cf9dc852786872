//! Brings the instance to the coordinator's desired state: prepares and
//! activates the releases it names, one push at a time and newest epoch
//! only (a push older than the last one applied is ignored, also across
//! restarts), reports the outcome of each release as a progress event, and
//! keeps reporting the health of every current release.
//!
//! Level-triggered: a desired state without a deployment (the stack's approved
//! releases, sent when the agent connects) that fails to install is retried
//! with capped, jittered backoff until it succeeds or a newer one arrives, and
//! every report says "install failing since T: reason" meanwhile. A
//! deployment's desired state is not retried here: its rollout decides.
//!
//! Health is never silent: a release whose checks cannot even be read (its
//! directory moved away, its manifest unreadable) is reported unhealthy with
//! the reason, every exit of its app is reported at once, and repeated exits
//! make it unhealthy whatever its checks say (see `service::crash_loop`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_message::Body as AgentBody;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use rollwave_release::HealthCheck;

use crate::backoff::Backoff;
use crate::install::Goal;
use crate::installer::{InstallOutcome, InstallRequest, Installer, Repair, read_manifest};
use crate::journal::Source;
use crate::service::{AppExit, ServiceRecord, crash_loop};

/// How often the health checks of current releases run.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Per-round deadline for the health checks of one release.
const HEALTH_ROUND_DEADLINE: Duration = Duration::from_secs(30);
/// A failed install of the approved releases is retried after this, doubling up to [`RETRY_MAX`],
/// each delay jittered (so a fleet that lost S3 together does not come back together).
const RETRY_INITIAL: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Where applying the coordinator's desired state stands, for readiness and `STATUS=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Convergence {
    /// Nothing handled by this process yet.
    Pending,
    /// The desired state of `epoch` is handled: applied (or ignored as stale), or, for a
    /// deployment's, its outcome reported to the rollout that owns it.
    Applied { epoch: u64 },
    /// Installing the approved releases (desired state `epoch`) keeps failing; retried with backoff.
    Failing {
        epoch: u64,
        since_unix_ms: i64,
        reason: String,
    },
}

/// "install failing since 2026-12-06T03:00:00Z: <reason>": what `STATUS=`, the log and the
/// coordinator's `status` say while an install of the approved releases keeps failing.
pub fn failing_text(since_unix_ms: i64, reason: &str) -> String {
    let since = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(since_unix_ms).unwrap_or(0));
    format!(
        "install failing since {}: {reason}",
        humantime::format_rfc3339_seconds(since)
    )
}

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

/// Applies desired states as they arrive, until `desired` closes, retrying a failed install of
/// the approved releases (see the module doc). `convergence` says how far it got, for the agent's
/// readiness.
pub async fn run(
    installer: Installer,
    mut desired: watch::Receiver<Option<pb::DesiredState>>,
    reports: Reports,
    convergence: watch::Sender<Convergence>,
) {
    let mut applied = load_applied(&installer);
    let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
    let mut failing_since: Option<i64> = None;
    loop {
        let state = desired.borrow_and_update().clone();
        let mut retry_in = None;
        if let Some(state) = state {
            if state.epoch < applied.epoch {
                tracing::info!(
                    epoch = state.epoch,
                    applied = applied.epoch,
                    "ignoring a stale desired state"
                );
                convergence.send_replace(Convergence::Applied { epoch: state.epoch });
            } else {
                // The approved releases are ours to retry; a deployment's are its rollout's.
                let retrying = state.deployment_id.is_empty();
                let failure = apply(&installer, &state, &reports, retrying, &mut failing_since).await;
                if state.epoch > applied.epoch {
                    applied.epoch = state.epoch;
                    save_applied(&installer, &applied);
                }
                match (failure, failing_since) {
                    (Some(reason), Some(since)) if retrying => {
                        let delay = backoff.next_delay(fastrand::f64());
                        tracing::warn!(retry_in = ?delay, "{}", failing_text(since, &reason));
                        convergence.send_replace(Convergence::Failing {
                            epoch: state.epoch,
                            since_unix_ms: since,
                            reason,
                        });
                        retry_in = Some(delay);
                    }
                    _ => {
                        if failing_since.take().is_some() {
                            tracing::info!(epoch = state.epoch, "the install that kept failing is done");
                        }
                        backoff.reset();
                        convergence.send_replace(Convergence::Applied { epoch: state.epoch });
                    }
                }
            }
        }
        match retry_in {
            Some(delay) => {
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    changed = desired.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if desired.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Prepares, then activates, what `state` names; reports each release's outcome. Returns the
/// first failure. When `retrying`, a failure is reported as failing since `failing_since` (set
/// now if it was not).
async fn apply(
    installer: &Installer,
    state: &pb::DesiredState,
    reports: &Reports,
    retrying: bool,
    failing_since: &mut Option<i64>,
) -> Option<String> {
    let deployment_id = Some(state.deployment_id.clone()).filter(|id| !id.is_empty());
    let steps = state
        .prepare
        .iter()
        .map(|release| (Goal::Prepare, release))
        .chain(state.active.iter().map(|release| (Goal::Activate, release)));
    let mut first_failure = None;
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
        let failing_since_unix_ms = match &result {
            Err(_) if retrying => *failing_since.get_or_insert_with(|| crate::unix_ms(SystemTime::now())),
            _ => 0,
        };
        if result.is_err() && first_failure.is_none() {
            first_failure = Some(format!("{}@{}: {message}", release.bundle, release.version));
        }
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
                failing_since_unix_ms,
            }),
        );
        if activated {
            // The coordinator's healthy clock starts at the first report: send one now rather
            // than at the next round of the health loop.
            let checks = health_checks(installer, &release.bundle, &release.version);
            let interval = HEALTH_INTERVAL + round_time(&checks);
            check_and_report(installer, &release.bundle, &release.version, checks, interval, reports).await;
        }
    }
    first_failure
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

/// Releases whose `current` link still names them but whose directory is gone (moved or deleted
/// under the running app). They count as no release for installs (see `Layout::inspect_current`),
/// but health must not go blind on them: each gets an unhealthy verdict saying what is missing.
fn vanished(installer: &Installer) -> Vec<pb::ObservedRelease> {
    let layout = installer.layout();
    crate::journal::BundleJournal::bundles(layout)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|bundle| {
            let target = std::fs::read_link(layout.current_link(&bundle)).ok()?;
            let version = target.to_str()?.to_owned();
            let plain = rollwave_release::validate_version(&version).is_ok() && !version.contains('/');
            (plain && !layout.release_dir(&bundle, &version).exists()).then(|| pb::ObservedRelease {
                sha256: String::new(),
                bundle,
                version,
                state: "missing".into(),
            })
        })
        .collect()
}

/// The health checks of `version` of `bundle` and the directory they run in, or why they
/// cannot run: then the release cannot be healthy either.
fn health_checks(installer: &Installer, bundle: &str, version: &str) -> Result<(Vec<HealthCheck>, PathBuf), String> {
    let dir = installer.layout().release_dir(bundle, version);
    if !dir.is_dir() {
        return Err(format!(
            "the release directory {} is missing (moved or deleted): {bundle}@{version} cannot run; \
             deploy it again or roll back",
            dir.display()
        ));
    }
    let manifest =
        read_manifest(&dir).map_err(|error| format!("cannot read the health checks of {bundle}@{version}: {error}"))?;
    Ok((manifest.health, dir))
}

/// How long one round of these checks may take (bounded by the round deadline).
fn round_time(checks: &Result<(Vec<HealthCheck>, PathBuf), String>) -> Duration {
    checks
        .as_ref()
        .map_or(Duration::ZERO, |(checks, _)| crate::health::round_bound(checks))
        .min(HEALTH_ROUND_DEADLINE)
}

/// The verdict on `version` of `bundle`: its checks' (or why they cannot run), overridden by a
/// crash loop of its app.
async fn verdict(
    installer: &Installer,
    bundle: &str,
    version: &str,
    checks: Result<(Vec<HealthCheck>, PathBuf), String>,
    app: Option<&ServiceRecord>,
) -> Result<(), String> {
    let checked = match checks {
        Err(reason) => Err(reason),
        Ok((checks, dir)) => {
            let log_dir = installer.layout().hook_log_dir().join(bundle);
            let round = crate::health::check_once(&checks, &dir, &log_dir);
            tokio::time::timeout(HEALTH_ROUND_DEADLINE, round)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "the health checks of {bundle}@{version} did not finish within {}",
                        humantime::format_duration(HEALTH_ROUND_DEADLINE)
                    ))
                })
        }
    };
    let now = crate::unix_ms(SystemTime::now());
    let looping = app.and_then(|record| {
        let looping = crash_loop(&record.recent_exits, now)?;
        Some(match &record.last_exit {
            Some(last) => format!("{looping} (last: {})", last.reason),
            None => looping,
        })
    });
    match (checked, looping) {
        (Ok(()), Some(looping)) => Err(looping),
        (Err(failures), Some(looping)) => Err(format!("{looping}; {failures}")),
        (checked, None) => checked,
    }
}

/// The app of `version` of `bundle`, if the agent runs it.
fn app_of(installer: &Installer, bundle: &str, version: &str) -> Option<ServiceRecord> {
    installer
        .services()
        .load(bundle)
        .filter(|record| record.version == version)
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}

/// Runs the health checks of `version` of `bundle` once and reports the verdict; `interval` is
/// the longest the agent lets pass until the next one.
async fn check_and_report(
    installer: &Installer,
    bundle: &str,
    version: &str,
    checks: Result<(Vec<HealthCheck>, PathBuf), String>,
    interval: Duration,
    reports: &Reports,
) -> bool {
    let app = app_of(installer, bundle, version);
    let verdict = verdict(installer, bundle, version, checks, app.as_ref()).await;
    let healthy = verdict.is_ok();
    let last_exit = app.as_ref().and_then(|record| record.last_exit.clone());
    send(
        reports,
        AgentBody::Health(pb::HealthEvent {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            healthy,
            detail: verdict.err().map(|detail| clip(&detail)).unwrap_or_default(),
            observed_at_unix_ms: crate::unix_ms(SystemTime::now()),
            app_exited: false,
            app_restarts: app.as_ref().map_or(0, |record| record.total_restarts),
            last_exit_at_unix_ms: last_exit.as_ref().map_or(0, |exit| exit.at_unix_ms),
            last_exit: last_exit.map(|exit| clip(&exit.reason)).unwrap_or_default(),
            check_interval_ms: millis(interval),
        }),
    );
    healthy
}

/// Reports an exit of an app at once, as an unhealthy verdict with the reason (a crash loop says so).
pub fn report_exit(reports: &Reports, exit: &AppExit) {
    let detail = match &exit.crash_loop {
        Some(looping) => format!("{looping} (last: {})", exit.reason),
        None => format!("the app stopped: {}; the agent restarts it", exit.reason),
    };
    send(
        reports,
        AgentBody::Health(pb::HealthEvent {
            bundle: exit.bundle.clone(),
            version: exit.version.clone(),
            healthy: false,
            detail: clip(&detail),
            observed_at_unix_ms: exit.at_unix_ms,
            app_exited: true,
            app_restarts: exit.restarts,
            last_exit: clip(&exit.reason),
            last_exit_at_unix_ms: exit.at_unix_ms,
            check_interval_ms: 0,
        }),
    );
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
        let releases: Vec<_> = observed(&installer)
            .into_iter()
            .chain(vanished(&installer))
            // The activation runs the health checks itself and reports the outcome; a round
            // now could catch the app between its stop and its start and report a false
            // "unhealthy" (which would hold the next deployment's plan below its floor).
            .filter(|release| !is_activating(&installer, &release.bundle))
            .map(|release| {
                let checks = health_checks(&installer, &release.bundle, &release.version);
                (release, checks)
            })
            .collect();
        // Rounds run one release after the other: the next verdict on each is due within a
        // pause plus every release's round.
        let interval = HEALTH_INTERVAL + releases.iter().map(|(_, checks)| round_time(checks)).sum::<Duration>();
        for (release, checks) in releases {
            let healthy = check_and_report(
                &installer,
                &release.bundle,
                &release.version,
                checks,
                interval,
                &reports,
            )
            .await;
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
                failing_since_unix_ms: 0,
            }),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::installer::InstallSettings;
    use crate::layout::Layout;

    async fn reported_verdict(installer: &Installer, version: &str) -> pb::HealthEvent {
        let (reports, mut queue) = mpsc::channel(8);
        let checks = health_checks(installer, "app", version);
        check_and_report(installer, "app", version, checks, HEALTH_INTERVAL, &reports).await;
        match queue.try_recv().expect("a verdict is always sent").body {
            Some(AgentBody::Health(event)) => event,
            other => panic!("not a health event: {other:?}"),
        }
    }

    /// Field trial: with the running release's directory moved away or its rollwave.toml
    /// unreadable, the agent sent no verdict and the coordinator kept "healthy" forever.
    #[tokio::test]
    async fn a_release_whose_checks_cannot_be_read_is_reported_unhealthy_with_the_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        let installer = Installer::new(layout.clone(), InstallSettings::default(), None);

        let moved = reported_verdict(&installer, "1.0").await;
        assert!(!moved.healthy);
        assert!(
            moved.detail.contains("is missing (moved or deleted)"),
            "{}",
            moved.detail
        );
        assert_eq!(moved.check_interval_ms, 2_000);

        let release = layout.release_dir("app", "2.0");
        std::fs::create_dir_all(release.join("rollwave.toml")).expect("a directory where the manifest should be");
        let unreadable = reported_verdict(&installer, "2.0").await;
        assert!(!unreadable.healthy);
        assert!(
            unreadable
                .detail
                .starts_with("cannot read the health checks of app@2.0: rollwave.toml must be a regular file"),
            "{}",
            unreadable.detail
        );

        std::fs::remove_dir(release.join("rollwave.toml")).expect("remove");
        std::fs::write(
            release.join("rollwave.toml"),
            "[[health]]\ncommand = \"exit 1\"\ntimeout = \"3s\"\n",
        )
        .expect("manifest");
        let failing = reported_verdict(&installer, "2.0").await;
        assert_eq!(
            failing.detail, "exit 1: exit code 1",
            "no 'within 0s' in a periodic verdict"
        );
    }

    #[test]
    fn the_failing_text_names_since_when_and_why() {
        assert_eq!(
            failing_text(1_765_000_000_000, "app@1.0: S3 unreachable"),
            "install failing since 2025-12-06T05:46:40Z: app@1.0: S3 unreachable"
        );
    }
}
