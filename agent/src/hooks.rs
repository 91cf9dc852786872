//! Running a lifecycle hook: in its own process group (so a timeout kills
//! everything it started), with output going to a log file rather than a
//! pipe (so a hook that leaves a background process holding stdout cannot
//! hang the agent), and only the tail of that output kept for the report.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, User};
use tokio::process::Command;

/// Bytes of hook output kept for the report: the end, where the error usually is.
pub const OUTPUT_TAIL: u64 = 16 * 1024;
/// Hook output logs: owner and group only, since hooks may print secrets.
const LOG_MODE: u32 = 0o640;
/// Directories created for hook logs: not listable by others.
const LOG_DIR_MODE: u32 = 0o750;

/// One hook to run.
#[derive(Debug, Clone)]
pub struct HookRun {
    /// Absolute path of the script (or program).
    pub script: PathBuf,
    /// Arguments after the script (empty for lifecycle hooks).
    pub args: Vec<String>,
    /// The release dir the hook belongs to.
    pub working_dir: PathBuf,
    pub timeout: Duration,
    pub run_as: Option<String>,
    /// `ROLLWAVE_*` variables, on top of the agent's own PATH and locale.
    pub env: Vec<(String, String)>,
    /// Where the hook's stdout and stderr go (replaced on each run).
    pub log: PathBuf,
}

/// How a hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Exit code, or `None` when killed by a signal (including our timeout).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// The last [`OUTPUT_TAIL`] bytes of its output, lossily decoded.
    pub output_tail: String,
}

impl HookOutcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// One line for reports: "exit code 3: <last line of output>".
    pub fn summary(&self) -> String {
        let how = if self.timed_out {
            "timed out (its process group was killed)".to_owned()
        } else {
            match self.exit_code {
                Some(code) => format!("exit code {code}"),
                None => "killed by a signal".to_owned(),
            }
        };
        match self.output_tail.lines().rev().find(|line| !line.trim().is_empty()) {
            Some(last) => format!("{how}: {}", last.trim()),
            None => how,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hook {script}: run_as user {user:?} does not exist")]
    NoSuchUser { script: PathBuf, user: String },
    #[error("hook {script}: {source}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hook log {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `hook` to completion or its timeout.
pub async fn run_hook(hook: &HookRun) -> Result<HookOutcome, HookError> {
    run_hook_with(hook, |_| {}).await
}

/// Runs `hook`, telling `on_started` its process group id once it runs (so the
/// caller can journal it and kill a group a crashed agent left behind).
pub async fn run_hook_with(hook: &HookRun, on_started: impl FnOnce(i32)) -> Result<HookOutcome, HookError> {
    let log = create_log(&hook.log).map_err(|source| HookError::Log {
        path: hook.log.clone(),
        source,
    })?;
    let log_for_stderr = log.try_clone().map_err(|source| HookError::Log {
        path: hook.log.clone(),
        source,
    })?;
    let mut command = Command::new(&hook.script);
    command
        .args(&hook.args)
        .current_dir(&hook.working_dir)
        .env_clear()
        .envs(inherited_environment())
        .envs(hook.env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_for_stderr)
        .process_group(0)
        .kill_on_drop(false);
    if let Some(user) = &hook.run_as {
        let account = User::from_name(user)
            .ok()
            .flatten()
            .ok_or_else(|| HookError::NoSuchUser {
                script: hook.script.clone(),
                user: user.clone(),
            })?;
        command
            .uid(account.uid.as_raw())
            .gid(account.gid.as_raw())
            .env("HOME", &account.dir)
            .env("USER", user);
    }
    let mut child = command.spawn().map_err(|source| HookError::Spawn {
        script: hook.script.clone(),
        source,
    })?;
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    if let Some(group) = group {
        on_started(group.as_raw());
    }
    let (status, timed_out) = match tokio::time::timeout(hook.timeout, child.wait()).await {
        Ok(status) => (status, false),
        Err(_) => {
            if let Some(group) = group {
                // Everything the hook started goes with it.
                let _ = killpg(group, Signal::SIGKILL);
            }
            (child.wait().await, true)
        }
    };
    let status = status.map_err(|source| HookError::Spawn {
        script: hook.script.clone(),
        source,
    })?;
    Ok(HookOutcome {
        exit_code: if status.signal().is_some() { None } else { status.code() },
        timed_out,
        output_tail: read_tail(&hook.log, OUTPUT_TAIL),
    })
}

/// Opens `path` for a hook's output, empty, readable by owner and group only
/// (hooks may print secrets); directories it creates are closed to others too.
fn create_log(path: &Path) -> std::io::Result<std::fs::File> {
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(LOG_DIR_MODE)
            .create(parent)?;
    }
    let log = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(LOG_MODE)
        .open(path)?;
    // `mode` applies only to a new file: a log an older agent left keeps its mode otherwise.
    log.set_permissions(std::fs::Permissions::from_mode(LOG_MODE))?;
    Ok(log)
}

/// The parts of the agent's environment a hook may rely on.
fn inherited_environment() -> Vec<(String, String)> {
    const KEEP: [&str; 5] = ["PATH", "LANG", "LC_ALL", "TZ", "HOME"];
    let mut vars: Vec<(String, String)> = KEEP
        .iter()
        .filter_map(|name| std::env::var(name).ok().map(|value| ((*name).to_owned(), value)))
        .collect();
    if !vars.iter().any(|(name, _)| name == "PATH") {
        vars.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    vars
}

/// Kills a process group a previous agent process left running (after a crash).
pub fn kill_leftover_group(group: i32) {
    if group > 1 {
        let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
}

/// The last `limit` bytes of `path` (empty if unreadable).
pub fn read_tail(path: &Path, limit: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let length = file.metadata().map(|metadata| metadata.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(length.saturating_sub(limit)));
    let mut bytes = Vec::new();
    let _ = file.take(limit).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    fn run(dir: &Path, body: &str, timeout: Duration) -> HookOutcome {
        let hook = HookRun {
            script: script(dir, "hook.sh", body),
            args: Vec::new(),
            working_dir: dir.to_owned(),
            timeout,
            run_as: None,
            env: vec![("ROLLWAVE_LIFECYCLE_EVENT".into(), "after_install".into())],
            log: dir.join("logs/hook.log"),
        };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(run_hook(&hook))
            .expect("hook runs")
    }

    fn processes_with_marker(marker: &str) -> usize {
        std::fs::read_dir("/proc")
            .expect("proc")
            .filter_map(Result::ok)
            .filter(|entry| {
                std::fs::read(entry.path().join("cmdline"))
                    .map(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
                    .unwrap_or(false)
            })
            .count()
    }

    #[test]
    fn output_and_environment_reach_the_report() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outcome = run(
            dir.path(),
            "echo \"event=$ROLLWAVE_LIFECYCLE_EVENT\"; exit 3",
            Duration::from_secs(10),
        );
        assert_eq!(outcome.exit_code, Some(3));
        assert!(!outcome.succeeded());
        assert_eq!(outcome.summary(), "exit code 3: event=after_install");
    }

    #[test]
    fn a_hanging_hook_is_killed_with_its_whole_process_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let marker = format!("rollwave-hang-{}", std::process::id());
        let grandchild = script(dir.path(), &format!("{marker}.sh"), "sleep 300");
        // The marker check can see such a process: start one ourselves and stop it.
        {
            use std::os::unix::process::CommandExt;
            let mut control = std::process::Command::new(&grandchild)
                .process_group(0)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn control");
            let deadline = Instant::now() + Duration::from_secs(5);
            while processes_with_marker(&marker) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "the marker check cannot see a running process"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let group = Pid::from_raw(i32::try_from(control.id()).expect("pid"));
            killpg(group, Signal::SIGKILL).expect("kill control group");
            control.wait().expect("reap control");
            wait_until_gone(&marker);
        }

        let started = Instant::now();
        let outcome = run(
            dir.path(),
            &format!("{} &\nsleep 300", grandchild.display()),
            Duration::from_millis(500),
        );
        assert!(outcome.timed_out);
        assert!(started.elapsed() < Duration::from_secs(10));
        wait_until_gone(&marker);
    }

    /// The kernel reaps SIGKILLed orphans shortly after; allow it a moment.
    fn wait_until_gone(marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while processes_with_marker(marker) > 0 {
            assert!(Instant::now() < deadline, "a process of the hook's group is left");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_hook_that_leaves_a_child_holding_stdout_does_not_hang() {
        let dir = tempfile::tempdir().expect("temp dir");
        let started = Instant::now();
        let outcome = run(dir.path(), "sleep 30 &\necho started", Duration::from_secs(20));
        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "returned when the hook exited"
        );
        assert!(outcome.output_tail.contains("started"));
    }

    #[test]
    fn only_the_tail_of_long_output_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let outcome = run(
            dir.path(),
            "i=0; while [ $i -lt 5000 ]; do echo line-$i; i=$((i+1)); done; echo LAST",
            Duration::from_secs(20),
        );
        assert!(outcome.output_tail.len() as u64 <= OUTPUT_TAIL);
        assert!(outcome.output_tail.ends_with("LAST\n"));
        assert!(!outcome.output_tail.contains("line-0\n"));
    }

    #[test]
    fn a_hook_runs_as_its_run_as_user() {
        let Ok(Some(nobody)) = User::from_name("nobody") else {
            panic!("the test needs the standard `nobody` account");
        };
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let hook = HookRun {
            script: script(dir.path(), "hook.sh", "echo \"uid=$(id -u) home=$HOME\""),
            args: Vec::new(),
            working_dir: dir.path().to_owned(),
            timeout: Duration::from_secs(10),
            run_as: Some("nobody".into()),
            env: Vec::new(),
            log: dir.path().join("hook.log"),
        };
        let outcome = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(run_hook(&hook))
            .expect("hook runs");
        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(
            outcome
                .output_tail
                .contains(&format!("uid={} home={}", nobody.uid, nobody.dir.display())),
            "{outcome:?}"
        );
    }

    /// The field trial found hook output logs at 0644: any local user could read what a
    /// hook printed, secrets included.
    #[test]
    fn hook_output_logs_are_readable_by_owner_and_group_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mode = |path: &Path| std::fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        run(dir.path(), "echo secret", Duration::from_secs(10));
        let log = dir.path().join("logs/hook.log");
        assert_eq!(mode(&log), 0o640, "new log");
        assert_eq!(mode(&dir.path().join("logs")), 0o750, "the directory made for it");
        // A log an older agent left behind with 0644 is tightened on the next run.
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let outcome = run(dir.path(), "echo again", Duration::from_secs(10));
        assert_eq!(mode(&log), 0o640, "replaced log");
        assert_eq!(outcome.output_tail, "again\n", "and the old output is gone");
    }

    #[test]
    fn an_unknown_run_as_user_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hook = HookRun {
            script: script(dir.path(), "hook.sh", "true"),
            args: Vec::new(),
            working_dir: dir.path().to_owned(),
            timeout: Duration::from_secs(5),
            run_as: Some("no-such-user-rollwave".into()),
            env: Vec::new(),
            log: dir.path().join("hook.log"),
        };
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(run_hook(&hook));
        assert!(matches!(result, Err(HookError::NoSuchUser { .. })), "{result:?}");
    }
}
