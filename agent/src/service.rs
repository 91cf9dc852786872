//! Apps the agent runs itself (a manifest's `[service]`), kept outside the
//! agent's own lifetime so that restarting or upgrading the agent never stops
//! them. Under systemd each app is a transient unit of its own
//! (`rollwave-app-<bundle>`, restarted by systemd); elsewhere it is a process
//! in its own session whose pid is recorded under `state/services/`, and the
//! agent's supervision loop restarts it with backoff when it dies.
//!
//! Every exit of an app is an event ([`AppExit`]), with its reason: the exit
//! status of a process this agent started (its waiter task reports it), what
//! systemd logged for each restart of a unit (`NRestarts` counts them), or
//! "unknown" for an app an earlier agent run started. The agent reports each one to the coordinator at once, and
//! the recent ones decide whether the app is in a crash loop ([`crash_loop`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rollwave_release::Service;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, mpsc};

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
/// This many exits of an app within [`CRASH_LOOP_WINDOW`] make it unhealthy, however its
/// health checks do between the exits.
pub const CRASH_LOOP_EXITS: usize = 3;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(60);
/// Why an app exited when nobody could see its exit status: a process an earlier agent run started
/// is not this agent's child.
const UNKNOWN_EXIT: &str = "exited (status unknown: an earlier run of the agent started it)";

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
    /// Restarts since this release's app was started by an install (what `status` shows).
    #[serde(default)]
    pub total_restarts: u32,
    /// When the app exited (unix ms), within the last [`CRASH_LOOP_WINDOW`].
    #[serde(default)]
    pub recent_exits: Vec<i64>,
    /// The last exit: why and when.
    #[serde(default)]
    pub last_exit: Option<ExitRecord>,
    /// Set once the app's death is recorded (and reported), until it runs again: an exit is one event,
    /// however many supervision passes it takes the backoff to restart the app.
    #[serde(default)]
    pub down_since_unix_ms: Option<i64>,
    /// Under systemd: the unit's `NRestarts` when last looked at, so each restart systemd made is one exit.
    #[serde(default)]
    pub systemd_restarts: u32,
}

/// Why and when an app last exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub at_unix_ms: i64,
    pub reason: String,
}

/// One exit of an app, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppExit {
    pub bundle: String,
    pub version: String,
    /// "exited with code 1", "killed by signal 9 (SIGKILL)".
    pub reason: String,
    pub at_unix_ms: i64,
    /// Restarts of this release's app so far.
    pub restarts: u32,
    /// Set when this exit makes a crash loop ([`crash_loop`]).
    pub crash_loop: Option<String>,
}

impl ServiceRecord {
    /// Records an exit at `now_ms` and says what to report.
    fn note_exit(&mut self, reason: String, now_ms: i64) -> AppExit {
        self.recent_exits.retain(|at| within_window(*at, now_ms));
        self.recent_exits.push(now_ms);
        self.last_exit = Some(ExitRecord {
            at_unix_ms: now_ms,
            reason: reason.clone(),
        });
        AppExit {
            bundle: self.bundle.clone(),
            version: self.version.clone(),
            reason,
            at_unix_ms: now_ms,
            restarts: self.total_restarts,
            crash_loop: crash_loop(&self.recent_exits, now_ms),
        }
    }
}

fn within_window(at_ms: i64, now_ms: i64) -> bool {
    let window_ms = i64::try_from(CRASH_LOOP_WINDOW.as_millis()).unwrap_or(i64::MAX);
    at_ms <= now_ms && now_ms - at_ms < window_ms
}

/// The crash-loop rule: [`CRASH_LOOP_EXITS`] or more exits (unix ms) within the
/// [`CRASH_LOOP_WINDOW`] before `now_ms` make the app unhealthy; the verdict says so.
pub fn crash_loop(exits: &[i64], now_ms: i64) -> Option<String> {
    let recent = exits.iter().filter(|at| within_window(**at, now_ms)).count();
    (recent >= CRASH_LOOP_EXITS).then(|| format!("crash loop: {recent} exits in {} s", CRASH_LOOP_WINDOW.as_secs()))
}

/// The exit statuses of the apps this agent process started, as their waiter tasks report them.
/// Lives under the `changing` lock: only a supervision pass, `start` and `stop` read it.
#[derive(Debug)]
struct ExitLog {
    statuses: mpsc::UnboundedReceiver<(i32, String)>,
    /// Apps this process started whose waiter has not reported yet: their exit reason is on its way.
    waiting: BTreeSet<i32>,
    reasons: BTreeMap<i32, String>,
}

impl ExitLog {
    fn collect(&mut self) {
        while let Ok((pid, reason)) = self.statuses.try_recv() {
            self.waiting.remove(&pid);
            self.reasons.insert(pid, reason);
        }
    }
}

/// "exited with code 1", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => describe_signal(signal),
        (None, None) => format!("exited ({status})"),
    }
}

fn describe_signal(signal: i32) -> String {
    match Signal::try_from(signal) {
        Ok(name) => format!("killed by signal {signal} ({})", name.as_str()),
        Err(_) => format!("killed by signal {signal}"),
    }
}

/// Starts, stops and watches apps.
#[derive(Debug, Clone)]
pub struct Services {
    layout: Layout,
    supervision: Supervision,
    /// Held by start, stop and each supervision pass: a pass must never see an app that
    /// `stop` is ending as "died" and start it again behind its back.
    changing: Arc<Mutex<ExitLog>>,
    /// Where the waiter tasks of started apps send (pid, why it exited).
    exit_statuses: mpsc::UnboundedSender<(i32, String)>,
    /// Woken when an app this process started exits, so the supervision loop notices at once.
    exited: Arc<Notify>,
}

impl Services {
    pub fn new(layout: Layout, supervision: Supervision) -> Self {
        let (exit_statuses, statuses) = mpsc::unbounded_channel();
        Self {
            layout,
            supervision,
            changing: Arc::new(Mutex::new(ExitLog {
                statuses,
                waiting: BTreeSet::new(),
                reasons: BTreeMap::new(),
            })),
            exit_statuses,
            exited: Arc::new(Notify::new()),
        }
    }

    /// Returns when an app this process started has exited (or at once if one did since the last call).
    pub async fn app_exited(&self) {
        self.exited.notified().await;
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
        let mut log = self.changing.lock().await;
        self.stop_locked(bundle, &mut log).await?;
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
            total_restarts: 0,
            recent_exits: Vec::new(),
            last_exit: None,
            down_since_unix_ms: None,
            systemd_restarts: 0,
        };
        self.launch(&mut record, &mut log).await?;
        self.save(&record)
    }

    async fn launch(&self, record: &mut ServiceRecord, log: &mut ExitLog) -> Result<(), String> {
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
                run_quiet("systemd-run", &arguments).await?;
                // A new unit counts its restarts from zero.
                record.systemd_restarts = 0;
                record.started_at_unix_ms = crate::unix_ms(std::time::SystemTime::now());
                Ok(())
            }
            Supervision::Session => {
                let log_path = self.log_path(&record.bundle);
                if let Some(parent) = log_path.parent() {
                    std::fs::create_dir_all(parent).map_err(|error| format!("create {}: {error}", parent.display()))?;
                }
                let output = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .map_err(|error| format!("open {}: {error}", log_path.display()))?;
                let output_err = output.try_clone().map_err(|error| error.to_string())?;
                // setsid(1) makes the app a session and group leader without forking
                // (we are not a group leader), so its pid is the one we get back.
                let mut child = tokio::process::Command::new("setsid")
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
                    .stdout(output)
                    .stderr(output_err)
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
                // The waiter reaps the child and says why it exited; supervision goes by pid
                // (also for apps an earlier agent run started, which are not our children).
                log.reasons.remove(&pid);
                log.waiting.insert(pid);
                let statuses = self.exit_statuses.clone();
                let exited = self.exited.clone();
                tokio::spawn(async move {
                    let reason = match child.wait().await {
                        Ok(status) => describe_exit(status),
                        Err(error) => format!("exited (cannot read its exit status: {error})"),
                    };
                    let _ = statuses.send((pid, reason));
                    exited.notify_one();
                });
                Ok(())
            }
        }
    }

    /// Stops the bundle's app, if one runs: SIGTERM to its process group, SIGKILL after a grace period.
    pub async fn stop(&self, bundle: &str) -> Result<(), String> {
        let mut log = self.changing.lock().await;
        self.stop_locked(bundle, &mut log).await
    }

    async fn stop_locked(&self, bundle: &str, log: &mut ExitLog) -> Result<(), String> {
        let Some(record) = self.load(bundle) else {
            return Ok(());
        };
        // A deliberate stop is no exit event: forget what the waiter says about this process.
        if let Some(pid) = record.pid {
            log.collect();
            log.waiting.remove(&pid);
            log.reasons.remove(&pid);
        }
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

    /// One pass of the supervision loop: notes every exit of an app (each one is returned, to be
    /// reported) and restarts apps that died (session mode) or whose unit is gone (under systemd:
    /// after a reboot, since transient units do not survive one, or after it gave up restarting),
    /// no sooner than their backoff allows. Restarts systemd made itself are exits too.
    pub async fn restart_dead(&self) -> Vec<AppExit> {
        let mut log = self.changing.lock().await;
        log.collect();
        let mut exits = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.layout.state_dir().join("services")) else {
            return exits;
        };
        let now = crate::unix_ms(std::time::SystemTime::now());
        let mut watched_pids = BTreeSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(bundle) = name.strip_suffix(".json") else {
                continue;
            };
            let Some(mut record) = self.load(bundle) else {
                continue;
            };
            watched_pids.extend(record.pid);
            let mut changed = false;
            let alive = match self.supervision {
                Supervision::Session => record.pid.is_some_and(|pid| is_alive(pid, record.start_ticks)),
                Supervision::Systemd => {
                    let unit_name = Self::unit_name(bundle);
                    let unit = unit_state(&unit_name).await;
                    // Loaded in any state (running, restarting) is systemd's to look after; each
                    // restart it made since the last pass is an exit. Once restarted, the unit
                    // describes the new process, so the reasons come from its journal.
                    if unit.loaded && unit.restarts > record.systemd_restarts {
                        let count = usize::try_from(unit.restarts - record.systemd_restarts).unwrap_or(usize::MAX);
                        let mut reasons = journal_exits(&unit_name, count).await.into_iter();
                        for _ in 0..count {
                            record.total_restarts = record.total_restarts.saturating_add(1);
                            let reason = reasons
                                .next()
                                .or_else(|| unit.last_exit.clone())
                                .unwrap_or_else(|| "exited (systemd restarted it)".to_owned());
                            exits.push(record.note_exit(reason, now));
                        }
                        record.systemd_restarts = unit.restarts;
                        changed = true;
                    }
                    unit.loaded
                }
            };
            if !alive && record.down_since_unix_ms.is_none() {
                let reason = match (self.supervision, record.pid) {
                    // Its waiter has not said why yet; it wakes the loop when it does.
                    (Supervision::Session, Some(pid)) if log.waiting.contains(&pid) => continue,
                    (Supervision::Session, Some(pid)) => {
                        log.reasons.remove(&pid).unwrap_or_else(|| UNKNOWN_EXIT.to_owned())
                    }
                    (Supervision::Session, None) => UNKNOWN_EXIT.to_owned(),
                    (Supervision::Systemd, _) => {
                        "its unit is gone (stopped outside the agent, a reboot, or systemd gave up restarting it)"
                            .to_owned()
                    }
                };
                let exit = record.note_exit(reason, now);
                tracing::warn!(%bundle, version = %record.version, reason = %exit.reason, "the app exited");
                exits.push(exit);
                record.down_since_unix_ms = Some(now);
                changed = true;
            }
            if !alive {
                let up_for = Duration::from_millis(u64::try_from(now - record.started_at_unix_ms).unwrap_or(0));
                if up_for >= STABLE_AFTER {
                    record.restarts = 0;
                }
                if up_for >= restart_delay(record.restarts) {
                    record.restarts += 1;
                    record.total_restarts = record.total_restarts.saturating_add(1);
                    tracing::warn!(%bundle, version = %record.version, restarts = record.restarts, "restarting the app");
                    match self.launch(&mut record, &mut log).await {
                        Ok(()) => record.down_since_unix_ms = None,
                        Err(error) => {
                            tracing::warn!(%bundle, %error, "cannot restart the app");
                            record.started_at_unix_ms = now;
                        }
                    }
                    watched_pids.extend(record.pid);
                    changed = true;
                }
            }
            if changed && let Err(error) = self.save(&record) {
                tracing::warn!(%bundle, %error, "cannot record the app's state");
            }
        }
        // Exit statuses of processes `stop` ended are of no interest.
        log.reasons.retain(|pid, _| watched_pids.contains(pid));
        exits
    }
}

/// What systemd says about an app's unit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct UnitState {
    loaded: bool,
    /// `NRestarts`: restarts systemd made (`Restart=on-failure`).
    restarts: u32,
    /// The main process's last exit, from `ExecMainCode` and `ExecMainStatus`.
    last_exit: Option<String>,
}

/// Asks systemd about `unit`; not loaded when it cannot say.
async fn unit_state(unit: &str) -> UnitState {
    let Ok(output) = tokio::process::Command::new("systemctl")
        .args([
            "show",
            "--property=LoadState,NRestarts,ExecMainCode,ExecMainStatus",
            unit,
        ])
        .stdin(Stdio::null())
        .output()
        .await
    else {
        return UnitState::default();
    };
    if !output.status.success() {
        return UnitState::default();
    }
    parse_unit_state(&String::from_utf8_lossy(&output.stdout))
}

/// Why the main process of `unit` exited, the last `count` times, oldest first (fewer when the
/// journal does not say).
async fn journal_exits(unit: &str, count: usize) -> Vec<String> {
    let Ok(output) = tokio::process::Command::new("journalctl")
        .args([
            "--unit",
            unit,
            "--output",
            "cat",
            "--no-pager",
            "--quiet",
            "--lines",
            "200",
        ])
        .stdin(Stdio::null())
        .output()
        .await
    else {
        return Vec::new();
    };
    let exits = parse_journal_exits(&String::from_utf8_lossy(&output.stdout));
    exits[exits.len().saturating_sub(count)..].to_vec()
}

/// The exits systemd logged for a unit ("Main process exited, code=killed, status=9/KILL"), in
/// order, as sentences.
fn parse_journal_exits(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once("Main process exited, code=")?;
            let (code, status) = rest.split_once(", status=")?;
            let number: i32 = status.split(['/', ' ']).next()?.trim().parse().ok()?;
            Some(match code.trim() {
                "exited" => format!("exited with code {number}"),
                "killed" => describe_signal(number),
                "dumped" => format!("{} and dumped core", describe_signal(number)),
                other => format!("exited ({other}, status {number})"),
            })
        })
        .collect()
}

/// Parses `systemctl show --property=LoadState,NRestarts,ExecMainCode,ExecMainStatus` output.
fn parse_unit_state(text: &str) -> UnitState {
    let properties: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim(), value.trim()))
        .collect();
    let status: Option<i32> = properties.get("ExecMainStatus").and_then(|value| value.parse().ok());
    // ExecMainCode is a CLD_* code: 1 exited, 2 killed, 3 dumped core.
    let last_exit = match (properties.get("ExecMainCode").copied(), status) {
        (Some("1"), Some(code)) => Some(format!("exited with code {code}")),
        (Some("2"), Some(signal)) => Some(describe_signal(signal)),
        (Some("3"), Some(signal)) => Some(format!("{} and dumped core", describe_signal(signal))),
        _ => None,
    };
    UnitState {
        loaded: properties.get("LoadState") == Some(&"loaded"),
        restarts: properties
            .get("NRestarts")
            .and_then(|value| value.parse().ok())
            .unwrap_or(0),
        last_exit,
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

    /// Field trial: an app that exited 20 s after each start was restarted within a second each time
    /// and nobody heard of it. Every exit must come out of the supervision pass, with its reason.
    #[tokio::test]
    async fn every_exit_of_an_app_is_an_event_with_its_reason_and_a_stop_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.release_dir("web", "1.0")).expect("release dir");
        let services = Services::new(layout, Supervision::Session);
        let service = Service {
            command: vec!["sh".into(), "-c".into(), "sleep 0.2; exit 3".into()],
            working_directory: ".".into(),
            environment: BTreeMap::new(),
        };
        services.start("web", "1.0", &service).await.expect("start");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut exits = Vec::new();
        while exits.len() < 2 {
            assert!(std::time::Instant::now() < deadline, "exits seen: {exits:?}");
            let _ = tokio::time::timeout(Duration::from_millis(500), services.app_exited()).await;
            exits.extend(services.restart_dead().await);
        }
        assert_eq!(exits[0].reason, "exited with code 3", "{exits:?}");
        assert_eq!((exits[0].bundle.as_str(), exits[0].version.as_str()), ("web", "1.0"));
        assert_eq!(exits[0].restarts, 0);
        assert_eq!(exits[1].restarts, 1, "the second exit follows the first restart");
        let record = services.load("web").expect("record");
        assert_eq!(record.recent_exits.len(), 2);
        assert_eq!(
            record.last_exit.as_ref().map(|exit| exit.reason.as_str()),
            Some("exited with code 3")
        );

        // A stop ends the app deliberately: no exit event, and nothing left to restart.
        let sleeper = Service {
            command: vec!["sleep".into(), "300".into()],
            working_directory: ".".into(),
            environment: BTreeMap::new(),
        };
        services.start("web", "1.0", &sleeper).await.expect("start");
        services.stop("web").await.expect("stop");
        assert_eq!(services.restart_dead().await, Vec::new());
    }

    #[test]
    fn three_exits_within_a_minute_are_a_crash_loop() {
        let minute = 60_000;
        let now = 10 * minute;
        let cases: [(&[i64], Option<&str>); 6] = [
            (&[], None),
            (&[now - 1_000, now - 500], None),
            (&[now - 2_000, now - 1_000, now], Some("crash loop: 3 exits in 60 s")),
            (
                &[now - minute + 1, now - 1_000, now],
                Some("crash loop: 3 exits in 60 s"),
            ),
            // One of the three is older than the window.
            (&[now - minute, now - 1_000, now], None),
            (
                &[now - 4_000, now - 3_000, now - 2_000, now - 1_000],
                Some("crash loop: 4 exits in 60 s"),
            ),
        ];
        for (exits, expected) in cases {
            assert_eq!(crash_loop(exits, now).as_deref(), expected, "{exits:?}");
        }
    }

    #[test]
    fn exit_statuses_read_as_sentences() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            describe_exit(std::process::ExitStatus::from_raw(1 << 8)),
            "exited with code 1"
        );
        assert_eq!(
            describe_exit(std::process::ExitStatus::from_raw(9)),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn systemd_restarts_and_exit_statuses_are_read_from_systemctl_show() {
        let unit = parse_unit_state("LoadState=loaded\nNRestarts=4\nExecMainCode=1\nExecMainStatus=2\n");
        assert_eq!(
            unit,
            UnitState {
                loaded: true,
                restarts: 4,
                last_exit: Some("exited with code 2".into()),
            }
        );
        let killed = parse_unit_state("ExecMainCode=2\nExecMainStatus=15\nLoadState=loaded\nNRestarts=0\n");
        assert_eq!(killed.last_exit.as_deref(), Some("killed by signal 15 (SIGTERM)"));
        assert_eq!(parse_unit_state("LoadState=not-found\n"), UnitState::default());
    }

    /// Seen on a host: once systemd has restarted the app, `ExecMainCode` describes the new process
    /// (0), so the reason of each restart is read from the unit's journal.
    #[test]
    fn systemd_exit_reasons_are_read_from_the_units_journal() {
        let journal = "Started rollwave-app-web.\n\
            rollwave-app-web.service: Main process exited, code=killed, status=9/KILL\n\
            rollwave-app-web.service: Failed with result 'signal'.\n\
            rollwave-app-web.service: Scheduled restart job, restart counter is at 1.\n\
            rollwave-app-web.service: Main process exited, code=exited, status=3/NOTIMPLEMENTED\n\
            rollwave-app-web.service: Main process exited, code=dumped, status=11/SEGV\n";
        assert_eq!(
            parse_journal_exits(journal),
            [
                "killed by signal 9 (SIGKILL)",
                "exited with code 3",
                "killed by signal 11 (SIGSEGV) and dumped core"
            ]
        );
    }
}
