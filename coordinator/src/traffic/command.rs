//! The operator's own drain and undrain scripts, for load balancers Rollwave does not speak to:
//! each is run with the instance id, backend and server as arguments, under a timeout.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::process::Command;
use tokio::time::Instant;

use super::{DrainOutcome, TrafficError, TrafficTarget};

/// How long an undrain command may run.
const DEFAULT_UNDRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of a command's output an error shows (its end, where the reason usually is).
const OUTPUT_TAIL_BYTES: usize = 4096;
/// How long to keep reading output after the command exited, in case something it started still
/// holds the pipe open; its output after that is not waited for.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);

/// Drain and undrain through two executables: `PROGRAM INSTANCE_ID BACKEND SERVER`, exit 0 on
/// success. A drain command is expected to return once the instance is out of service.
#[derive(Clone, Debug)]
pub struct CommandProvider {
    drain_program: PathBuf,
    undrain_program: PathBuf,
    undrain_timeout: Duration,
}

impl CommandProvider {
    pub fn new(drain_program: PathBuf, undrain_program: PathBuf) -> Self {
        CommandProvider {
            drain_program,
            undrain_program,
            undrain_timeout: DEFAULT_UNDRAIN_TIMEOUT,
        }
    }

    /// Bounds the undrain command (the drain command gets the drain's own timeout).
    pub fn with_undrain_timeout(mut self, timeout: Duration) -> Self {
        self.undrain_timeout = timeout;
        self
    }

    pub(super) async fn drain(&self, target: &TrafficTarget, timeout: Duration) -> Result<DrainOutcome, TrafficError> {
        let started = Instant::now();
        run("drain", &self.drain_program, target, timeout).await?;
        Ok(DrainOutcome::Drained {
            waited: started.elapsed(),
        })
    }

    pub(super) async fn undrain(&self, target: &TrafficTarget) -> Result<(), TrafficError> {
        run("undrain", &self.undrain_program, target, self.undrain_timeout).await
    }
}

/// Runs `program` in its own process group with stdout and stderr on one pipe; on timeout kills
/// the whole group, so a script's children do not outlive it.
async fn run(
    action: &'static str,
    program: &Path,
    target: &TrafficTarget,
    timeout: Duration,
) -> Result<(), TrafficError> {
    let start_error = |source| TrafficError::CommandStart {
        action,
        program: program.to_owned(),
        target: Box::new(target.clone()),
        source,
    };
    let wait_error = |source| TrafficError::CommandWait {
        action,
        program: program.to_owned(),
        target: Box::new(target.clone()),
        source,
    };
    let (reader, writer) = std::io::pipe().map_err(start_error)?;
    let mut command = Command::new(program);
    command
        .args([&target.instance_id, &target.backend, &target.server])
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(start_error)?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(start_error)?;
    // The parent's copies of the write end must close, or the pipe never reaches its end.
    drop(command);
    let mut output = pipe::Receiver::from_owned_fd(OwnedFd::from(reader)).map_err(wait_error)?;
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .map(Pid::from_raw)
        .expect("a child that was just spawned and not yet waited for has a pid");

    let mut tail = OutputTail::default();
    let mut buffer = [0u8; 4096];
    let deadline = Instant::now() + timeout;
    let mut status: Option<ExitStatus> = None;
    let mut timed_out = false;
    let mut output_open = true;
    let mut grace_deadline = deadline;
    loop {
        tokio::select! {
            exited = child.wait(), if status.is_none() => {
                status = Some(exited.map_err(wait_error)?);
                grace_deadline = Instant::now() + OUTPUT_GRACE;
            }
            read = output.read(&mut buffer), if output_open => match read {
                Ok(0) | Err(_) => output_open = false,
                Ok(count) => tail.push(&buffer[..count]),
            },
            _ = tokio::time::sleep_until(deadline), if status.is_none() && !timed_out => {
                timed_out = true;
                // The group may already be gone; the child's exit is then reaped above.
                let _ = killpg(group, Signal::SIGKILL);
            }
            _ = tokio::time::sleep_until(grace_deadline), if status.is_some() => break,
        }
        if status.is_some() && !output_open {
            break;
        }
    }
    let status = status.expect("the loop ends only after the child exited");
    if timed_out {
        return Err(TrafficError::CommandTimeout {
            action,
            program: program.to_owned(),
            target: Box::new(target.clone()),
            timeout,
            output_tail: tail.text(),
        });
    }
    if !status.success() {
        return Err(TrafficError::CommandFailed {
            action,
            program: program.to_owned(),
            target: Box::new(target.clone()),
            status: status.to_string(),
            output_tail: tail.text(),
        });
    }
    Ok(())
}

/// The last [`OUTPUT_TAIL_BYTES`] of a command's output.
#[derive(Default)]
struct OutputTail {
    bytes: Vec<u8>,
}

impl OutputTail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > OUTPUT_TAIL_BYTES {
            let excess = self.bytes.len() - OUTPUT_TAIL_BYTES;
            self.bytes.drain(..excess);
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).trim_end().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TrafficTarget {
        TrafficTarget {
            instance_id: "i-0abc".to_owned(),
            backend: "app".to_owned(),
            server: "web 1".to_owned(),
        }
    }

    fn script(directory: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = directory.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
        path
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a test runtime")
    }

    #[test]
    fn passes_the_target_as_arguments() {
        let directory = tempfile::tempdir().expect("temp dir");
        let record = directory.path().join("args");
        let program = script(
            directory.path(),
            "drain",
            &format!("printf '%s|' \"$@\" > '{}'", record.display()),
        );
        runtime()
            .block_on(run("drain", &program, &target(), Duration::from_secs(10)))
            .expect("the script succeeds");
        assert_eq!(std::fs::read_to_string(&record).expect("args"), "i-0abc|app|web 1|");
    }

    #[test]
    fn a_failing_command_reports_the_end_of_its_output() {
        let directory = tempfile::tempdir().expect("temp dir");
        let program = script(
            directory.path(),
            "drain",
            "i=0; while [ $i -lt 2000 ]; do echo \"line $i\"; i=$((i+1)); done; echo 'lb says no' >&2; exit 3",
        );
        let error = runtime()
            .block_on(run("drain", &program, &target(), Duration::from_secs(10)))
            .expect_err("the script fails");
        let TrafficError::CommandFailed {
            status, output_tail, ..
        } = &error
        else {
            panic!("unexpected error: {error}");
        };
        assert!(status.contains('3'), "{status}");
        assert!(output_tail.ends_with("line 1999\nlb says no"), "{output_tail}");
        assert!(!output_tail.contains("line 0\n") && output_tail.len() <= OUTPUT_TAIL_BYTES);
    }

    #[test]
    fn a_hanging_command_is_killed_with_its_children() {
        let directory = tempfile::tempdir().expect("temp dir");
        let pid_file = directory.path().join("child.pid");
        let program = script(
            directory.path(),
            "drain",
            &format!("echo starting; sleep 30 & echo $! > '{}'; wait", pid_file.display()),
        );
        let started = std::time::Instant::now();
        let error = runtime()
            .block_on(run("drain", &program, &target(), Duration::from_millis(300)))
            .expect_err("the script times out");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let TrafficError::CommandTimeout { output_tail, .. } = &error else {
            panic!("unexpected error: {error}");
        };
        assert_eq!(output_tail, "starting");
        let child: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid file")
            .trim()
            .parse()
            .expect("a pid");
        // The killed grandchild is a zombie at most until its parent is reaped; it must not run.
        // SIGKILL takes effect when the process is next scheduled, which on a loaded machine can
        // be a moment after the kill: give it a second, not the 30 of its sleep.
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let gone = || {
            let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            state.is_empty() || state.contains(") Z")
        };
        while !gone() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(gone(), "{state}");
    }

    #[test]
    fn a_command_that_leaves_a_child_holding_its_output_does_not_hang() {
        let directory = tempfile::tempdir().expect("temp dir");
        let pid_file = directory.path().join("child.pid");
        let program = script(
            directory.path(),
            "undrain",
            &format!("sleep 30 & echo $! > '{}'; echo done", pid_file.display()),
        );
        let started = std::time::Instant::now();
        runtime()
            .block_on(run("undrain", &program, &target(), Duration::from_secs(20)))
            .expect("the script succeeds");
        assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
        let child = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse::<i32>().ok());
        if let Some(child) = child {
            let _ = nix::sys::signal::kill(Pid::from_raw(child), Signal::SIGKILL);
        }
    }

    #[test]
    fn a_missing_program_says_so() {
        let error = runtime()
            .block_on(run(
                "drain",
                Path::new("/nonexistent/drain"),
                &target(),
                Duration::from_secs(1),
            ))
            .expect_err("no such program");
        assert!(matches!(error, TrafficError::CommandStart { .. }), "{error}");
        assert!(error.to_string().contains("exists and is executable"), "{error}");
    }
}
