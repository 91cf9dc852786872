//! Apps the agent runs itself (a manifest's `[service]`), kept outside the
//! agent's own lifetime so that restarting or upgrading the agent never stops
//! them. Under systemd each app is a transient unit of its own
//! (`rollwave-app-<bundle>`, restarted by systemd); elsewhere it is a process
//! in its own session whose pid is recorded under `state/services/`, and the
//! agent's supervision loop restarts it with backoff when it dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rollwave_release::Service;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::layout::Layout;

/// How long an app gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Restart delays grow from this to [`RESTART_MAX`]; an app that stayed up
/// for [`STABLE_AFTER`] starts again from the bottom.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long to wait for systemd to unload a stopped app unit before reusing its name.
const UNLOAD_WAIT: Duration = Duration::from_secs(5);

/// Who keeps apps running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervision {
    /// systemd is PID 1: one transient unit per app.
    Systemd,
    /// No systemd: the app runs in its own session; the agent restarts it.
    Session,
}

impl Supervision {
    /// systemd when it is running as the init system, the session otherwise.
    pub fn detect() -> Self {
        if Path::new("/run/systemd/system").is_dir() {
            Supervision::Systemd
        } else {
            Supervision::Session
        }
    }
}

/// What is running for a bundle; persisted so a restarted agent finds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub bundle: String,
    pub version: String,
    pub command: Vec<String>,
    pub working_dir: PathBuf,
    pub environment: BTreeMap<String, String>,
    /// Session mode: the app's pid (its session and process group id too).
    pub pid: Option<i32>,
    /// Session mode: the process start time (field 22 of /proc/PID/stat), so a
    /// reused pid is not mistaken for the app.
    pub start_ticks: Option<u64>,
    /// Restarts since the app was last stable.
    #[serde(default)]
    pub restarts: u32,
    pub started_at_unix_ms: i64,
}

/// Starts, stops and watches apps.
#[derive(Debug, Clone)]
pub struct Services {
    layout: Layout,
    supervision: Supervision,
    /// Held by start, stop and each supervision pass: a pass must never see an app that
    /// `stop` is ending as "died" and start it again behind its back.
    changing: Arc<Mutex<()>>,
}

impl Services {
    pub fn new(layout: Layout, supervision: Supervision) -> Self {
        Self {
            layout,
            supervision,
            changing: Arc::new(Mutex::new(())),
        }
    }

    fn record_path(&self, bundle: &str) -> PathBuf {
        self.layout.state_dir().join("services").join(format!("{bundle}.json"))
    }

    fn log_path(&self, bundle: &str) -> PathBuf {
        self.layout.state_dir().join("services").join(format!("{bundle}.log"))
    }

    pub fn unit_name(bundle: &str) -> String {
        format!("rollwave-app-{bundle}")
    }

    pub fn load(&self, bundle: &str) -> Option<ServiceRecord> {
        let bytes = std::fs::read(self.record_path(bundle)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn save(&self, record: &ServiceRecord) -> Result<(), String> {
        let path = self.record_path(&record.bundle);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|error| format!("create {}: {error}", parent.display()))?;
        }
        let bytes = serde_json::to_vec_pretty(record).map_err(|error| error.to_string())?;
        rollwave_trust::files::write_private(&path, &bytes)
            .map_err(|error| format!("write {}: {error}", path.display()))
    }

    /// Starts `version`'s app from its release dir (stopping whatever ran for the bundle).
    pub async fn start(&self, bundle: &str, version: &str, service: &Service) -> Result<(), String> {
        let _changing = self.changing.lock().await;
        self.stop_locked(bundle).await?;
        let release_dir = self.layout.release_dir(bundle, version);
        let mut command = service.command.clone();
        if let Some(program) = command.first_mut()
            && program.contains('/')
            && !program.starts_with('/')
        {
            *program = release_dir.join(&*program).display().to_string();
        }
        let mut record = ServiceRecord {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            command,
            working_dir: release_dir.join(&service.working_directory),
            environment: service.environment.clone(),
            pid: None,
            start_ticks: None,
            restarts: 0,
            started_at_unix_ms: crate::unix_ms(std::time::SystemTime::now()),
        };
        self.launch(&mut record).await?;
        self.save(&record)
    }

    async fn launch(&self, record: &mut ServiceRecord) -> Result<(), String> {
        match self.supervision {
            Supervision::Systemd => {
                let unit = Self::unit_name(&record.bundle);
                // A unit that failed before keeps its name until reset.
                let _ = run_quiet("systemctl", &["reset-failed", &unit]).await;
                let mut args = vec![
                    "--unit".to_owned(),
                    unit,
                    "--collect".to_owned(),
                    "--property=Restart=on-failure".to_owned(),
                    "--property=RestartSec=1".to_owned(),
                    format!("--working-directory={}", record.working_dir.display()),
                    format!("--setenv=ROLLWAVE_BUNDLE={}", record.bundle),
                    format!("--setenv=ROLLWAVE_VERSION={}", record.version),
                ];
                args.extend(
                    record
                        .environment
                        .iter()
                        .map(|(key, value)| format!("--setenv={key}={value}")),
                );
                args.push("--".into());
                args.extend(record.command.iter().cloned());
                let arguments: Vec<&str> = args.iter().map(String::as_str).collect();
                run_quiet("systemd-run", &arguments).await
            }
            Supervision::Session => {
                let log_path = self.log_path(&record.bundle);
                if let Some(parent) = log_path.parent() {
                    std::fs::create_dir_all(parent).map_err(|error| format!("create {}: {error}", parent.display()))?;
                }
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|error| format!("open {}: {error}", log_path.display()))?;
                let log_err = log.try_clone().map_err(|error| error.to_string())?;
                // setsid(1) makes the app a session and group leader without forking
                // (we are not a group leader), so its pid is the one we get back.
                let child = tokio::process::Command::new("setsid")
                    .arg("--")
                    .args(&record.command)
                    .current_dir(&record.working_dir)
                    // The agent's readiness socket is the agent's alone.
                    .env_remove("NOTIFY_SOCKET")
                    .env_remove("WATCHDOG_USEC")
                    .env_remove("WATCHDOG_PID")
                    .env("ROLLWAVE_BUNDLE", &record.bundle)
                    .env("ROLLWAVE_VERSION", &record.version)
                    .envs(&record.environment)
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log_err)
                    .kill_on_drop(false)
                    .spawn()
                    .map_err(|error| format!("start {:?}: {error}", record.command))?;
                let pid = child
                    .id()
                    .and_then(|id| i32::try_from(id).ok())
                    .ok_or("the app exited at once")?;
                // setsid(1) makes the session after the fork: until it has, the app has no
                // process group of its own to signal. Wait for it (it takes microseconds).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while nix::unistd::getpgid(Some(Pid::from_raw(pid))) != Ok(Pid::from_raw(pid))
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                record.pid = Some(pid);
                record.start_ticks = start_ticks(pid);
                record.started_at_unix_ms = crate::unix_ms(std::time::SystemTime::now());
                // Tokio reaps the child when it exits; we track it by pid from here on.
                drop(child);
                Ok(())
            }
        }
    }

    /// Stops the bundle's app, if one runs: SIGTERM to its process group, SIGKILL after a grace period.
    pub async fn stop(&self, bundle: &str) -> Result<(), String> {
        let _changing = self.changing.lock().await;
        self.stop_locked(bundle).await
    }

    async fn stop_locked(&self, bundle: &str) -> Result<(), String> {
        let Some(record) = self.load(bundle) else {
            return Ok(());
        };
        match self.supervision {
            Supervision::Systemd => {
                let unit = Self::unit_name(bundle);
                run_quiet("systemctl", &["stop", &unit]).await?;
                // systemd unloads the stopped (--collect) unit a moment after `stop` returns;
                // until then `systemd-run --unit` with the same name fails ("already loaded").
                let deadline = tokio::time::Instant::now() + UNLOAD_WAIT;
                while unit_loaded(&unit).await && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Supervision::Session => {
                if let Some(pid) = record.pid.filter(|pid| is_alive(*pid, record.start_ticks)) {
                    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                    let deadline = tokio::time::Instant::now() + STOP_GRACE;
                    while is_alive(pid, record.start_ticks) && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    if is_alive(pid, record.start_ticks) {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
            }
        }
        let path = self.record_path(bundle);
        std::fs::remove_file(&path).map_err(|error| format!("remove {}: {error}", path.display()))
    }

    /// One pass of the supervision loop: restarts apps that died (session mode)
    /// or whose unit is gone (under systemd: after a reboot, since transient units
    /// do not survive one, or after it gave up restarting), no sooner than their
    /// backoff allows.
    pub async fn restart_dead(&self) {
        let _changing = self.changing.lock().await;
        let Ok(entries) = std::fs::read_dir(self.layout.state_dir().join("services")) else {
            return;
        };
        let now = crate::unix_ms(std::time::SystemTime::now());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(bundle) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(mut record) = self.load(bundle) else {
                continue;
            };
            let alive = match self.supervision {
                Supervision::Session => record.pid.is_some_and(|pid| is_alive(pid, record.start_ticks)),
                // Loaded in any state (running, restarting) is systemd's to look after.
                Supervision::Systemd => unit_loaded(&Self::unit_name(bundle)).await,
            };
            if alive {
                continue;
            }
            let up_for = Duration::from_millis(u64::try_from(now - record.started_at_unix_ms).unwrap_or(0));
            if up_for >= STABLE_AFTER {
                record.restarts = 0;
            }
            let delay = restart_delay(record.restarts);
            if up_for < delay {
                continue;
            }
            record.restarts += 1;
            tracing::warn!(%bundle, version = %record.version, restarts = record.restarts, "the app died; restarting it");
            if let Err(error) = self.launch(&mut record).await {
                tracing::warn!(%bundle, %error, "cannot restart the app");
                record.started_at_unix_ms = now;
            }
            if let Err(error) = self.save(&record) {
                tracing::warn!(%bundle, %error, "cannot record the restarted app");
            }
        }
    }
}

/// Whether systemd has the unit loaded (in any state); `false` when it cannot say.
async fn unit_loaded(unit: &str) -> bool {
    let Ok(output) = tokio::process::Command::new("systemctl")
        .args(["show", "--property=LoadState", "--value", unit])
        .stdin(Stdio::null())
        .output()
        .await
    else {
        return false;
    };
    output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "loaded"
}

/// Backoff before restart number `restarts + 1`.
pub fn restart_delay(restarts: u32) -> Duration {
    RESTART_INITIAL
        .saturating_mul(1u32 << restarts.min(16))
        .min(RESTART_MAX)
}

/// Whether `pid` is still the process that was started (not a zombie, not a reused pid).
fn is_alive(pid: i32, expected_ticks: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the parenthesised command name, which may itself contain spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return false;
    }
    match expected_ticks {
        Some(expected) => fields.get(19).and_then(|ticks| ticks.parse::<u64>().ok()) == Some(expected),
        None => true,
    }
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

async fn run_quiet(program: &str, args: &[&str]) -> Result<(), String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|error| format!("{program}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_delays_double_up_to_a_cap() {
        let delays: Vec<u64> = (0..7).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(restart_delay(u32::MAX), RESTART_MAX);
    }

    #[tokio::test]
    async fn a_session_app_is_started_watched_restarted_and_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release_dir("web", "1.0")).expect("release dir");
        let services = Services::new(layout, Supervision::Session);
        let service = Service {
            command: vec!["sleep".into(), "300".into()],
            working_directory: ".".into(),
            environment: BTreeMap::new(),
        };
        services.start("web", "1.0", &service).await.expect("start");
        let record = services.load("web").expect("record");
        let pid = record.pid.expect("pid");
        assert!(is_alive(pid, record.start_ticks));

        // Dead: the next pass after the backoff starts it again.
        killpg(Pid::from_raw(pid), Signal::SIGKILL).expect("kill");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let restarted = loop {
            services.restart_dead().await;
            let record = services.load("web").expect("record");
            if record.pid != Some(pid) && record.pid.is_some_and(|pid| is_alive(pid, record.start_ticks)) {
                break record;
            }
            assert!(std::time::Instant::now() < deadline, "not restarted: {record:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(restarted.restarts, 1);

        services.stop("web").await.expect("stop");
        let new_pid = restarted.pid.expect("pid");
        assert!(!is_alive(new_pid, restarted.start_ticks));
        assert!(services.load("web").is_none());
    }
}
