//! The systemd units in `packaging/` pass `systemd-analyze verify` without a
//! single warning, and the real agent speaks the sd_notify protocol its unit
//! relies on (`Type=notify`): READY=1 only once its session is established,
//! and once the approved release is installed, with start-timeout extensions
//! meanwhile, watchdog pings, STOPPING=1 on SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rollwave_tests::{Coordinator, DEADLINE, S3Bucket, binary};

const UNITS: &[&str] = &["rollwave-agent.service", "rollwave-server.service"];

fn packaging_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run systemd-analyze ({error}); install it (Debian: `apt-get install -y systemd`) \
             and run the tests again"
            )
        })
}

#[test]
fn systemd_units_verify_without_any_warning() {
    // The units name /usr/bin/...; verify checks that ExecStart= exists, so point
    // copies of them at the binaries under test.
    let bin_dir = binary("rollwave-agent")
        .parent()
        .expect("binaries live in a directory")
        .to_owned();
    assert_eq!(
        binary("rollwave").parent(),
        Some(bin_dir.as_path()),
        "both binaries in one dir"
    );
    let temp = tempfile::Builder::new()
        .prefix("rollwave-units-")
        .tempdir()
        .expect("temp dir");
    let mut staged = Vec::new();
    for unit in UNITS {
        let text = std::fs::read_to_string(packaging_dir().join(unit)).expect("read unit file");
        assert!(
            text.contains("ExecStart=/usr/bin/"),
            "{unit} starts a binary from /usr/bin"
        );
        let path = temp.path().join(unit);
        std::fs::write(&path, text.replace("/usr/bin/", &format!("{}/", bin_dir.display()))).expect("stage unit");
        staged.push(path.display().to_string());
    }
    let mut args = vec!["verify"];
    args.extend(staged.iter().map(String::as_str));
    let output = systemd_analyze(&args);
    // verify only warns (exit 0) about unknown keys and bad values: any output is a failure.
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "systemd-analyze verify {staged:?}: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
}

#[test]
fn agent_unit_keeps_apps_and_readiness_as_documented() {
    let text = std::fs::read_to_string(packaging_dir().join("rollwave-agent.service")).expect("agent unit");
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .collect();
    for expected in [
        "Type=notify",
        "NotifyAccess=main",
        "KillMode=process",
        "ExecStart=/usr/bin/rollwave-agent run --config /etc/rollwave/agent.toml",
        "StateDirectory=rollwave",
        "ConfigurationDirectory=rollwave",
    ] {
        assert!(settings.contains(&expected), "rollwave-agent.service lacks {expected}");
    }
    for absent in [
        "User=",
        "ProtectSystem=",
        "PrivateTmp=",
        "RestrictSUIDSGID=",
        "NoNewPrivileges=",
    ] {
        assert!(
            !settings.iter().any(|line| line.starts_with(absent)),
            "rollwave-agent.service must not set {absent} (hooks change the host)"
        );
    }
}

/// An agent started with `NOTIFY_SOCKET`, killed when dropped.
struct NotifiedAgent {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
}

impl NotifiedAgent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NotifiedAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects notifications until one satisfies `done`, within the deadline.
fn receive_until(socket: &UnixDatagram, received: &mut Vec<String>, what: &str, done: impl Fn(&str) -> bool) {
    let started = Instant::now();
    let mut buffer = vec![0; 4096];
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}; received {received:?}"
        );
        match socket.recv(&mut buffer) {
            Ok(length) => {
                let message = String::from_utf8_lossy(&buffer[..length]).into_owned();
                let finished = done(&message);
                received.push(message);
                if finished {
                    return;
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => panic!("receive a notification: {error}"),
        }
    }
}

/// Starts `rollwave-agent run` for stack `web` with `NOTIFY_SOCKET` pointing at a
/// socket this test binds (and a 1 s watchdog), reading releases from the test S3 server.
fn start_notified_agent(parent: &Path, coordinator: &Coordinator, token: &str) -> (NotifiedAgent, UnixDatagram) {
    start_notified_agent_with(parent, coordinator, token, |config| config)
}

/// [`start_notified_agent`] with its agent.toml rewritten by `edit` first.
fn start_notified_agent_with(
    parent: &Path,
    coordinator: &Coordinator,
    token: &str,
    edit: impl FnOnce(String) -> String,
) -> (NotifiedAgent, UnixDatagram) {
    let dir = parent.join("notified");
    std::fs::create_dir_all(&dir).expect("agent dir");
    let mut config = format!(
        "coordinator = \"{}\"\njoin_token = \"{token}\"\nstack = \"web\"\nlayer = \"web\"\nzone = \"z1\"\n\
         hostname = \"notified\"\nstate_dir = \"{}\"\ntls_dir = \"{}\"\nimds = \"off\"\n\
         [reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n",
        coordinator.addr,
        dir.join("state").display(),
        dir.join("tls").display(),
    );
    if let Ok(endpoint) = std::env::var(rollwave_tests::s3::ENDPOINT_VAR) {
        config.push_str(&format!("[s3]\nendpoint = \"{endpoint}\"\nforce_path_style = true\n"));
    }
    std::fs::write(dir.join("agent.toml"), edit(config)).expect("agent.toml");

    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let log = dir.join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(binary("rollwave-agent"))
        .arg("run")
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &socket_path)
        // No WATCHDOG_PID: the watchdog is then the main process's, as when systemd sets it.
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone log handle"))
        .stderr(log_file)
        .spawn()
        .expect("spawn rollwave-agent");
    (NotifiedAgent { child, log, dir }, socket)
}

fn is_ready(message: &str) -> bool {
    message.lines().any(|line| line == "READY=1")
}

#[test]
fn agent_notifies_ready_after_its_session_and_stopping_on_sigterm() {
    let temp = tempfile::Builder::new()
        .prefix("rollwave-e2e-")
        .tempdir()
        .expect("temp dir");
    let coordinator = Coordinator::start(temp.path());
    coordinator.create_stack("web");
    let token = coordinator.create_token("web", 1, "10m");
    let (mut agent, socket) = start_notified_agent(temp.path(), &coordinator, &token);

    let mut received = Vec::new();
    receive_until(&socket, &mut received, "READY=1", is_ready);
    // Ready means connected: the session was up before READY=1 was sent.
    let log_at_ready = agent.log_text();
    assert!(
        log_at_ready.contains("session established"),
        "READY=1 before the session was established; agent log:\n{log_at_ready}"
    );
    assert_eq!(
        received.last().map(String::as_str),
        Some("READY=1\nSTATUS=connected; desired state applied"),
        "received {received:?}"
    );
    assert!(
        received
            .iter()
            .any(|message| message == "STATUS=connecting to the coordinator"),
        "a STATUS line while connecting; received {received:?}"
    );
    coordinator.wait_presence("notified", "online");
    receive_until(&socket, &mut received, "a watchdog ping after READY=1", |message| {
        message == "WATCHDOG=1"
    });

    let pid = agent.child.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(kill.success(), "kill -TERM {pid}");
    receive_until(&socket, &mut received, "STOPPING=1", |message| {
        message.lines().any(|line| line == "STOPPING=1")
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().expect("poll the agent") {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "the agent did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "agent exit after SIGTERM: {status}; log:\n{}",
        agent.log_text()
    );
}

#[test]
fn agent_is_ready_only_once_the_approved_release_is_installed() {
    let temp = tempfile::Builder::new()
        .prefix("rollwave-e2e-")
        .tempdir()
        .expect("temp dir");
    let coordinator = Coordinator::start(temp.path());
    coordinator.create_stack("web");
    // app@1.0, whose after_install hook waits until the test creates `proceed`.
    let proceed = temp.path().join("proceed");
    let source = temp.path().join("src");
    std::fs::create_dir_all(source.join("hooks")).expect("source");
    let script = source.join("hooks/wait.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nwhile [ ! -e {} ]; do sleep 0.05; done\n", proceed.display()),
    )
    .expect("hook");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        source.join("rollwave.toml"),
        "[hooks]\nafter_install = { path = \"hooks/wait.sh\", timeout = \"60s\" }\n",
    )
    .expect("manifest");
    let archive = temp.path().join("app-1.0.zip");
    rollwave_release::build_from_dir(&source, &archive).expect("build");
    let bucket = S3Bucket::versioned();
    let mut push = vec!["release".to_owned(), "push".to_owned(), archive.display().to_string()];
    push.extend(["--bundle", "app", "--version", "1.0"].map(str::to_owned));
    push.extend(bucket.push_args());
    let push: Vec<&str> = push.iter().map(String::as_str).collect();
    let output = coordinator.try_cli(&push);
    assert!(
        output.status.success(),
        "push: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // On the empty stack the deployment completes at once and approves 1.0.
    let output = coordinator.try_cli(&["deploy", "web", "app@1.0", "--watch"]);
    assert!(
        output.status.success(),
        "deploy: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    let token = coordinator.create_token("web", 1, "10m");
    let (agent, socket) = start_notified_agent(temp.path(), &coordinator, &token);
    let mut received = Vec::new();
    receive_until(&socket, &mut received, "the install to begin", |message| {
        message.starts_with("STATUS=connected; applying the desired state")
    });
    receive_until(&socket, &mut received, "a start timeout extension", |message| {
        message.starts_with("EXTEND_TIMEOUT_USEC=")
    });
    assert!(
        !received.iter().any(|message| is_ready(message)),
        "READY=1 while the approved release was still installing: {received:?}"
    );
    std::fs::write(&proceed, "").expect("let the hook finish");
    receive_until(&socket, &mut received, "READY=1", is_ready);
    let current = std::fs::read_link(agent.dir.join("state/releases/app/current")).expect("current link");
    assert!(
        current.ends_with("1.0"),
        "READY=1 with app@1.0 current, not {}; log:\n{}",
        current.display(),
        agent.log_text()
    );
}

/// Field trial: with S3 unreachable at boot the agent said READY=1 "connected; desired state
/// applied" although it ran nothing. It says ready only after its fallback then, and why.
#[test]
fn agent_whose_install_keeps_failing_is_ready_only_after_its_fallback_and_says_why() {
    let fleet = rollwave_tests::Fleet::start(0);
    fleet.push("1.0");
    // On the empty stack the deployment completes at once and approves 1.0.
    let (ok, approved) = fleet.deploy_and_watch("1.0", &[]);
    assert!(ok, "{approved}");
    let coordinator = &fleet.cluster.coordinator;
    // A loopback port where nothing listens: S3 is unreachable for good.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let token = coordinator.create_token("web", 1, "10m");
    let (_agent, socket) = start_notified_agent_with(fleet.work.path(), coordinator, &token, |config| {
        format!(
            "ready_fallback = \"3s\"\n{}[install]\ndownload_attempts = 1\n",
            config.replace(&rollwave_tests::s3::endpoint(), &format!("http://127.0.0.1:{port}"))
        )
    });
    let mut received = Vec::new();
    receive_until(&socket, &mut received, "the install to fail", |message| {
        message.starts_with("STATUS=install failing since ")
    });
    assert!(
        !received.iter().any(|message| is_ready(message)),
        "READY=1 before the fallback although nothing runs: {received:?}"
    );
    receive_until(&socket, &mut received, "READY=1 after the fallback", is_ready);
    let ready = received.last().cloned().unwrap_or_default();
    assert!(
        ready.starts_with("READY=1\nSTATUS=install failing since ") && ready.contains("app@1.0: "),
        "READY=1 says why the instance runs nothing: {received:?}"
    );
}
