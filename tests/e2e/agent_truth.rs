//! The agent tells the truth (issue 10, items 9-11): an app that keeps exiting, an install that
//! cannot reach S3 at launch, and a release whose checks can no longer be read are all reported,
//! with the reason, instead of passing for healthy.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rollwave_tests::fleet::{bundle_status, wave_instances};
use rollwave_tests::{Fleet, s3, wait_for};
use serde_json::Value;

/// Stops the agents, then the apps they supervise (apps run in their own sessions and outlive
/// their agents), even when the test fails.
struct StopApps<'a>(&'a mut Fleet);

impl Drop for StopApps<'_> {
    fn drop(&mut self) {
        for agent in &mut self.0.cluster.agents {
            agent.kill();
        }
        for agent in &self.0.cluster.agents {
            if let Some(pid) = app_pid(&agent.dir) {
                // `--`: procps reads `kill -KILL -PID` as the signal and then pid -1 otherwise.
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .status();
            }
        }
    }
}

/// The pid of the app the agent in `agent_dir` supervises, from its service record.
fn app_pid(agent_dir: &Path) -> Option<i64> {
    let text = std::fs::read_to_string(agent_dir.join("state/state/services/app.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["pid"]
        .as_i64()
        .filter(|pid| *pid > 1)
}

/// Pushes app@version whose `[service]` runs `script` (sh) and that has no health checks, so that
/// nothing but the app's own exits can tell the release is bad.
fn push_service(fleet: &Fleet, version: &str, script: &str) {
    let source = fleet.work.path().join(format!("service-{version}"));
    std::fs::create_dir_all(&source).expect("source");
    std::fs::write(
        source.join("rollwave.toml"),
        format!("[service]\ncommand = [\"sh\", \"-c\", {script:?}]\n"),
    )
    .expect("manifest");
    fleet.push_source(version, &source);
}

/// The instance row of `app` in `rollwave status web`, for `instance_id`.
fn status_of(fleet: &Fleet, instance_id: &str) -> Value {
    let status = fleet.status();
    bundle_status(&status, "app")["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .find(|row| row["instance_id"] == instance_id)
        .cloned()
        .unwrap_or(Value::Null)
}

/// Field trial: an app that exited 20 s after each start crashed 5 times during its deployment,
/// and the agent, restarting it within a second, kept reporting healthy. With no health check to
/// catch it, the release would pass: now the exit fails the canary, and the deployment rolls back.
#[test]
fn an_app_that_exits_soon_after_it_starts_fails_the_canary_and_is_rolled_back() {
    let mut fleet = Fleet::start(3);
    let fleet = StopApps(&mut fleet);
    let fleet = &*fleet.0;
    push_service(fleet, "1.0", "exec sleep 600");
    let (ok, first) = fleet.deploy_and_watch("1.0", &["--strategy", "all-at-once"]);
    assert!(ok, "first deployment: {first}");
    fleet.wait_all_on("1.0");

    push_service(fleet, "2.0", "sleep 2; exit 1");
    // The minimum healthy time must outlast the app's two seconds; today's checks (none) all pass.
    let output = fleet.cluster.coordinator.try_cli(&[
        "deploy",
        "web",
        "app@2.0",
        "--min-healthy-time",
        "8s",
        "--min-healthy",
        "50%",
        "--watch",
        "--output",
        "json",
    ]);
    let deployment: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "deploy --watch printed no deployment ({error}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        !output.status.success(),
        "a release whose app keeps exiting passed: {deployment}"
    );
    assert_eq!(deployment["status"], "failed", "{deployment}");
    let canary = wave_instances(&deployment, 0);
    assert_eq!(canary.len(), 1, "{deployment}");
    assert_eq!(
        deployment["waves"][0]["instances"][0]["state"], "switched back",
        "{deployment}"
    );
    let failure = deployment["failures"][0].as_str().unwrap_or_default();
    assert!(
        failure.starts_with(&format!("{}: the app exited before it was healthy", canary[0]))
            && failure.contains("exited with code 1"),
        "the canary's failure names the exit: {deployment}"
    );
    // Rolled back: the canary runs 1.0 again and nobody else ever switched to 2.0.
    let canary_index = fleet.index_of(&canary[0]);
    wait_for("the canary to run 1.0 again", || {
        (fleet.current(canary_index).as_deref() == Some("1.0")).then_some(())
    });
    for index in (0..3).filter(|index| *index != canary_index) {
        assert_eq!(fleet.switches_to(index, "2.0"), 0, "agent {index} never runs 2.0");
    }

    // Status shows each exit of an app: kill the canary's app (1.0 again) and read why.
    let pid = app_pid(&fleet.cluster.agents[canary_index].dir).expect("the canary's app runs");
    let killed = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .status()
        .expect("kill");
    assert!(killed.success());
    let row = wait_for("status to show the app's exit and its restart", || {
        let row = status_of(fleet, &canary[0]);
        (row["last_exit"] == "killed by signal 9 (SIGKILL)" && row["app_restarts"] == 1).then_some(row)
    });
    assert!(row["last_exit_at"].is_string(), "{row}");
    let table = fleet.cluster.coordinator.cli(&["status", "web", "--all"]);
    assert!(table.contains(": killed by signal 9 (SIGKILL)"), "{table}");
}

/// Field trial: with the running release's directory moved away (or its rollwave.toml unreadable)
/// the agent sent no verdict and the coordinator showed the last "healthy" forever.
#[test]
fn a_release_whose_checks_cannot_be_read_is_reported_unhealthy_with_the_reason() {
    let fleet = Fleet::start(1);
    fleet.push("1.0");
    let (ok, deployment) = fleet.deploy_and_watch("1.0", &["--strategy", "all-at-once"]);
    assert!(ok, "{deployment}");
    let instance = fleet.instance_id(0);
    let row = wait_for("a healthy verdict", || {
        let row = status_of(&fleet, &instance);
        (row["health"] == "healthy").then_some(row)
    });
    assert_eq!(row["healthy"], true, "`healthy` stays a boolean: {row}");

    let release = fleet.agent_root(0).join("releases/app/1.0");
    let moved = fleet.agent_root(0).join("releases/app/1.0.moved");
    std::fs::rename(&release, &moved).expect("move the release away");
    let row = wait_for("an unhealthy verdict naming the missing directory", || {
        let row = status_of(&fleet, &instance);
        (row["health"] == "unhealthy").then_some(row)
    });
    assert_eq!(row["healthy"], false, "{row}");
    let detail = row["health_detail"].as_str().unwrap_or_default();
    assert!(detail.contains("is missing (moved or deleted)"), "{row}");

    std::fs::rename(&moved, &release).expect("move it back");
    let manifest = release.join("rollwave.toml");
    std::fs::remove_file(&manifest).expect("remove the manifest");
    std::fs::create_dir(&manifest).expect("a directory where the manifest was");
    let row = wait_for("an unhealthy verdict naming the manifest", || {
        let row = status_of(&fleet, &instance);
        let detail = row["health_detail"].as_str().unwrap_or_default().to_owned();
        (row["health"] == "unhealthy" && detail.contains("cannot read the health checks of app@1.0")).then_some(row)
    });
    assert!(
        !row["health_detail"].to_string().contains("within 0s"),
        "periodic verdicts name no deadline: {row}"
    );
}

/// A TCP forwarder from a loopback port to the S3 server, stopped when dropped.
struct Forwarder {
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    fn start(listener: TcpListener, to: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        listener.set_nonblocking(true).expect("nonblocking");
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(server) = TcpStream::connect(&to) else {
                            continue;
                        };
                        let _ = client.set_nonblocking(false);
                        pipe(&client, &server);
                        pipe(&server, &client);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Self { stop }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read) = from.read(&mut buffer) {
            if read == 0 || to.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Field trial: with S3 unreachable at boot the agent gave up after 8 attempts, said it was
/// ready, and `status` showed the instance `missing … healthy` with no reason. Now the install is
/// retried until S3 answers, and meanwhile status and the audit trail say why it is missing.
#[test]
fn an_install_that_cannot_reach_s3_at_launch_is_retried_until_it_can_and_status_says_why() {
    let mut fleet = Fleet::start(0);
    fleet.push("1.0");
    // No instance yet: the release is approved at once, for instances to come.
    let (ok, approved) = fleet.deploy_and_watch("1.0", &[]);
    assert!(ok, "{approved}");

    // The agent's S3 endpoint: a loopback port where nothing listens yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let unreachable = format!("http://127.0.0.1:{port}");
    let token = fleet.cluster.coordinator.create_token("web", 1, "10m");
    fleet.cluster.add_agent_with("agent-0", "z1", &token, |config| {
        config
            .replace(&s3::endpoint(), &unreachable)
            .replace("[install]\n", "[install]\ndownload_attempts = 1\n")
    });
    let instance = wait_for("the agent to join", || {
        fleet
            .cluster
            .coordinator
            .instance_by_hostname("agent-0")
            .and_then(|instance| instance["id"].as_str().map(str::to_owned))
    });
    let row = wait_for("status to say the install is failing", || {
        let row = status_of(&fleet, &instance);
        row["install_failure"].is_string().then_some(row)
    });
    assert_eq!(row["state"], "missing", "{row}");
    let reason = row["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("install failing since "), "{row}");
    assert!(
        reason.contains(&format!("127.0.0.1:{port}")) || reason.contains("dispatch"),
        "the reason names the failure: {row}"
    );
    assert!(row["install_failing_since"].is_string(), "{row}");
    assert_ne!(
        row["health"], "healthy",
        "an instance that runs nothing is not healthy: {row}"
    );
    let events = fleet.cluster.coordinator.cli_json(&["event", "list", "--limit", "200"]);
    let failing = events
        .as_array()
        .expect("events")
        .iter()
        .find(|event| event["action"] == "instance.install_failing")
        .unwrap_or_else(|| panic!("no install_failing event: {events}"));
    assert!(failing["target"].to_string().contains(&instance), "{failing}");

    // S3 answers on that port from now on: the agent installs without a restart.
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("rebind the agent's S3 port");
    let endpoint = s3::endpoint();
    let _forwarder = Forwarder::start(listener, endpoint.trim_start_matches("http://").to_owned());
    let started = Instant::now();
    while fleet.current(0).as_deref() != Some("1.0") {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the agent did not install app@1.0 once S3 answered: {}",
            fleet.cluster.agents[0].log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fleet.cluster.agents[0].try_exit_code(), None, "the same agent process");
    let row = wait_for("status to show the instance on the approved release", || {
        let row = status_of(&fleet, &instance);
        (row["state"] == "ok" && row["install_failure"].is_null()).then_some(row)
    });
    assert_eq!(row["running_version"], "1.0", "{row}");
    let events = fleet.cluster.coordinator.cli_json(&["event", "list", "--limit", "200"]);
    assert!(
        events
            .as_array()
            .expect("events")
            .iter()
            .any(|event| event["action"] == "instance.install_recovered"),
        "{events}"
    );
}
