//! Draining instances through a real HAProxy: its runtime API over a unix socket and TCP, two
//! tiny HTTP servers behind it on loopback, and the command provider with real scripts.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rollwave_coordinator::traffic::{
    AdminState, CommandProvider, DrainOutcome, HaproxyRuntime, OperationalState, RuntimeAddress, ServerState,
    TrafficError, TrafficProvider, TrafficTarget,
};
use rollwave_tests::haproxy::{self, BACKEND};
use rollwave_tests::wait_for;

/// Requests sent through the frontend to see where traffic goes.
const REQUEST_COUNT: usize = 20;

/// A minimal HTTP server answering every request with its own name; `/slow/MS` answers after
/// MS milliseconds, to hold a session open.
struct AppServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl AppServer {
    fn start(name: &'static str) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an app server");
        let address = listener.local_addr().expect("app server address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::spawn(move || {
            for connection in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(connection) = connection {
                    std::thread::spawn(move || answer(connection, name));
                }
            }
        });
        AppServer {
            address,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees the flag and the port closes.
        let _ = TcpStream::connect(self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn answer(mut connection: TcpStream, name: &str) {
    let _ = connection.set_read_timeout(Some(Duration::from_secs(10)));
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        match connection.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(count) => request.extend_from_slice(&buffer[..count]),
        }
    }
    let request = String::from_utf8_lossy(&request);
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    if let Some(delay) = path.split("/slow/").nth(1).and_then(|delay| delay.parse::<u64>().ok()) {
        std::thread::sleep(Duration::from_millis(delay));
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    );
    let _ = connection.write_all(response.as_bytes());
}

/// HAProxy in front of two app servers; the servers stop after HAProxy (fields drop in order), so
/// it never sees them vanish.
struct Haproxy {
    process: haproxy::Haproxy,
    frontend_port: u16,
    tcp_api_port: u16,
    _servers: [AppServer; 2],
}

impl Haproxy {
    /// Starts HAProxy in front of servers `a` and `b` and waits until both pass their checks.
    fn start() -> Self {
        let servers = [AppServer::start("a"), AppServer::start("b")];
        let backend = format!(
            "backend {BACKEND}
    balance roundrobin
    option httpchk GET /health
    # Lets a test hold a session open on `a` on purpose.
    use-server a if {{ path_beg /a/ }}
    server a {a} check inter 100ms fall 2 rise 1
    server b {b} check inter 100ms fall 2 rise 1
",
            a = servers[0].address,
            b = servers[1].address,
        );
        let mut process = haproxy::Haproxy::start(&backend);
        let provider = process.provider();
        let runtime = runtime();
        for server in ["a", "b"] {
            wait_for(&format!("haproxy to run and see server {server} up"), || {
                process.check_running();
                let state = runtime.block_on(provider.state(&target(server))).ok()?;
                (state.operational == OperationalState::Running).then_some(())
            });
        }
        Haproxy {
            frontend_port: process.frontend_port,
            tcp_api_port: process.tcp_api_port,
            process,
            _servers: servers,
        }
    }

    fn socket(&self) -> PathBuf {
        self.process.socket()
    }

    fn provider(&self) -> TrafficProvider {
        self.process.provider()
    }

    /// The bodies (server names) of `count` requests through the frontend.
    fn spread(&self, count: usize) -> Vec<String> {
        (0..count).map(|_| get(self.frontend_port, "/")).collect()
    }
}

/// One GET through the frontend on a fresh connection; returns the body, panics on anything
/// but a 200.
fn get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to the frontend");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    body.to_owned()
}

fn target(server: &str) -> TrafficTarget {
    TrafficTarget {
        instance_id: format!("i-{server}"),
        backend: BACKEND.to_owned(),
        server: server.to_owned(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Starts a slow request pinned to server `a` and waits until HAProxy counts it as a session.
fn hold_a_session_on_a(haproxy: &Haproxy, runtime: &tokio::runtime::Runtime, millis: u64) -> JoinHandle<String> {
    let port = haproxy.frontend_port;
    let request = std::thread::spawn(move || get(port, &format!("/a/slow/{millis}")));
    let provider = haproxy.provider();
    wait_for("the slow request to hold a session on a", || {
        let state = runtime.block_on(provider.state(&target("a"))).expect("read a's state");
        (state.current_sessions == 1).then_some(())
    });
    request
}

#[test]
fn drained_server_gets_no_requests_until_undrained() {
    let haproxy = Haproxy::start();
    let provider = haproxy.provider();
    let runtime = runtime();

    let outcome = runtime
        .block_on(provider.drain(&target("a"), Duration::from_secs(5)))
        .expect("drain a");
    assert!(matches!(outcome, DrainOutcome::Drained { .. }), "{outcome:?}");
    let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
    assert_eq!(
        state,
        ServerState {
            admin: AdminState::Maint,
            operational: OperationalState::Stopped,
            current_sessions: 0
        }
    );
    let bodies = haproxy.spread(REQUEST_COUNT);
    assert!(bodies.iter().all(|body| body == "b"), "a drained, yet: {bodies:?}");

    runtime.block_on(provider.undrain(&target("a"))).expect("undrain a");
    let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
    assert_eq!(state.admin, AdminState::Ready);
    // Back marked down: it takes traffic once HAProxy's own check passes (rise 1, every 100 ms).
    wait_for("a to pass its check again", || {
        let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
        (state.operational == OperationalState::Running).then_some(())
    });
    let bodies = haproxy.spread(REQUEST_COUNT);
    for server in ["a", "b"] {
        assert!(
            bodies.iter().any(|body| body == server),
            "{server} serves again: {bodies:?}"
        );
    }

    // The same API over TCP reads the same state.
    let over_tcp = TrafficProvider::Haproxy(HaproxyRuntime::new(RuntimeAddress::Tcp(format!(
        "127.0.0.1:{}",
        haproxy.tcp_api_port
    ))));
    let state = runtime
        .block_on(over_tcp.state(&target("b")))
        .expect("b's state over TCP");
    assert_eq!(
        (state.admin, state.operational),
        (AdminState::Ready, OperationalState::Running)
    );
}

#[test]
fn drain_waits_for_an_in_flight_request_before_maintenance() {
    let haproxy = Haproxy::start();
    let provider = haproxy.provider();
    let runtime = runtime();
    let slow_request = hold_a_session_on_a(&haproxy, &runtime, 1000);

    let started = Instant::now();
    let drain = runtime.spawn({
        let provider = provider.clone();
        async move { provider.drain(&target("a"), Duration::from_secs(10)).await }
    });
    let draining = wait_for("a to read drain", || {
        let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
        (state.admin == AdminState::Drain).then_some(state)
    });
    assert_eq!(draining.current_sessions, 1, "{draining:?}");
    // New requests go elsewhere while the slow one finishes.
    let bodies = haproxy.spread(4);
    assert!(bodies.iter().all(|body| body == "b"), "{bodies:?}");

    let outcome = runtime.block_on(drain).expect("the drain task").expect("drain a");
    let DrainOutcome::Drained { waited } = outcome else {
        panic!("the drain should finish with no session left: {outcome:?}");
    };
    assert!(
        waited >= Duration::from_millis(500),
        "drained after {waited:?}, before the slow request ended"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(slow_request.join().expect("the slow request"), "a");
    let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
    assert_eq!((state.admin, state.current_sessions), (AdminState::Maint, 0));
}

#[test]
fn drain_timeout_goes_to_maintenance_and_leaves_the_session_to_finish() {
    let haproxy = Haproxy::start();
    let provider = haproxy.provider();
    let runtime = runtime();
    let slow_request = hold_a_session_on_a(&haproxy, &runtime, 2000);

    let outcome = runtime
        .block_on(provider.drain(&target("a"), Duration::from_millis(300)))
        .expect("drain a");
    let DrainOutcome::TimedOut {
        waited,
        remaining_sessions,
    } = outcome
    else {
        panic!("the drain should time out: {outcome:?}");
    };
    assert_eq!(remaining_sessions, Some(1));
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    let state = runtime.block_on(provider.state(&target("a"))).expect("a's state");
    assert_eq!((state.admin, state.current_sessions), (AdminState::Maint, 1));
    // Maintenance does not cut the session: the request still gets its answer.
    assert_eq!(slow_request.join().expect("the slow request"), "a");
}

#[test]
fn unknown_names_are_clear_errors() {
    let haproxy = Haproxy::start();
    let provider = haproxy.provider();
    let runtime = runtime();

    let error = runtime
        .block_on(provider.drain(&target("zz"), Duration::from_secs(1)))
        .expect_err("no server zz");
    assert!(matches!(error, TrafficError::Refused { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("app/zz") && message.contains("No such server.") && message.contains("check the backend"),
        "{message}"
    );

    let error = runtime
        .block_on(provider.state(&target("zz")))
        .expect_err("no server zz");
    assert!(matches!(error, TrafficError::ServerNotFound { .. }), "{error}");
    assert!(error.to_string().contains("no server app/zz"), "{error}");

    let mut other_backend = target("a");
    other_backend.backend = "nope".to_owned();
    let error = runtime
        .block_on(provider.undrain(&other_backend))
        .expect_err("no backend nope");
    assert!(error.to_string().contains("Can't find backend."), "{error}");
    let error = runtime
        .block_on(provider.state(&other_backend))
        .expect_err("no backend nope");
    assert!(error.to_string().contains("Can't find backend."), "{error}");

    let mut injected = target("a");
    injected.server = "a state ready; shutdown frontend web".to_owned();
    let error = runtime
        .block_on(provider.undrain(&injected))
        .expect_err("an invalid name");
    assert!(matches!(error, TrafficError::InvalidName { .. }), "{error}");
    // Nothing reached HAProxy: both servers still serve.
    let bodies = haproxy.spread(REQUEST_COUNT);
    for server in ["a", "b"] {
        assert!(bodies.iter().any(|body| body == server), "{server} serves: {bodies:?}");
    }

    let nowhere = TrafficProvider::Haproxy(HaproxyRuntime::new(RuntimeAddress::Unix(
        haproxy.socket().with_file_name("missing.sock"),
    )));
    let error = runtime.block_on(nowhere.state(&target("a"))).expect_err("no socket");
    assert!(matches!(error, TrafficError::Connect { .. }), "{error}");
    assert!(error.to_string().contains("missing.sock"), "{error}");
}

fn script(directory: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = directory.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("make script executable");
    path
}

#[test]
fn command_provider_runs_the_operators_scripts() {
    let directory = tempfile::tempdir().expect("temp dir");
    let record = directory.path().join("calls");
    let drain = script(
        directory.path(),
        "drain",
        &format!("echo \"drain $*\" >> '{}'", record.display()),
    );
    let undrain = script(
        directory.path(),
        "undrain",
        "echo 'calling the load balancer'; echo 'error: target i-a is not registered' >&2; exit 2",
    );
    let provider = TrafficProvider::Command(CommandProvider::new(drain, undrain.clone()));
    let runtime = runtime();

    let outcome = runtime
        .block_on(provider.drain(&target("a"), Duration::from_secs(10)))
        .expect("the drain script succeeds");
    assert!(matches!(outcome, DrainOutcome::Drained { .. }), "{outcome:?}");
    assert_eq!(std::fs::read_to_string(&record).expect("calls"), "drain i-a app a\n");

    let error = runtime
        .block_on(provider.undrain(&target("a")))
        .expect_err("the undrain script fails");
    let message = error.to_string();
    assert!(matches!(error, TrafficError::CommandFailed { .. }), "{message}");
    assert!(
        message.contains(&undrain.display().to_string())
            && message.contains("app/a")
            && message.contains("calling the load balancer\nerror: target i-a is not registered"),
        "{message}"
    );

    let error = runtime
        .block_on(provider.state(&target("a")))
        .expect_err("no state command");
    assert!(matches!(error, TrafficError::StateUnsupported { .. }), "{error}");
}

#[test]
fn traffic_settings_are_checked_shown_planned_and_cleared() {
    let fleet = rollwave_tests::Fleet::start(1);
    fleet.push("1.0");
    let coordinator = &fleet.cluster.coordinator;

    // Bad settings are refused, naming the field.
    let refused = coordinator.try_cli(&[
        "traffic",
        "set",
        "web",
        "haproxy",
        "--runtime-api",
        "admin.sock",
        "--backend",
        "app",
    ]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("runtime API") && message.contains("unix:/"),
        "{message}"
    );
    let refused = coordinator.try_cli(&[
        "traffic",
        "set",
        "web",
        "haproxy",
        "--runtime-api",
        "/run/a.sock",
        "--backend",
        "app",
        "--server",
        "{nope}",
    ]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown placeholder {nope}"));

    // Without a provider, --drain is refused and the plan says nothing is drained.
    let refused = coordinator.try_cli(&["deploy", "web", "app@1.0", "--drain", "--strategy", "all-at-once"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("has no traffic provider"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let plan = coordinator.cli(&["deploy", "web", "app@1.0", "--plan", "--strategy", "all-at-once"]);
    assert!(
        plan.contains("drain: none: the stack has no traffic provider"),
        "{plan}"
    );

    // With one, the plan names it; all at once drains only when asked (it would empty the load
    // balancer); --no-drain turns it off for one deployment.
    let shown = coordinator.cli(&[
        "traffic",
        "set",
        "web",
        "haproxy",
        "--runtime-api",
        "/run/haproxy/admin.sock",
        "--backend",
        "app",
    ]);
    assert_eq!(
        shown.trim(),
        "web: haproxy at /run/haproxy/admin.sock, server app/{hostname}, drain timeout 30s"
    );
    let plan = coordinator.cli(&["deploy", "web", "app@1.0", "--plan", "--strategy", "all-at-once"]);
    assert!(
        plan.contains("drain: none: all at once would take every instance out"),
        "{plan}"
    );
    let plan = coordinator.cli(&[
        "deploy",
        "web",
        "app@1.0",
        "--plan",
        "--drain",
        "--strategy",
        "all-at-once",
    ]);
    assert!(plan.contains("drain: each instance is drained (haproxy at"), "{plan}");
    let plan = coordinator.cli(&["deploy", "web", "app@1.0", "--plan", "--no-drain", "--min-healthy", "0"]);
    assert!(plan.contains("drain: none: --no-drain"), "{plan}");
    let json = coordinator.cli_json(&["traffic", "show", "web"]);
    assert_eq!(json["settings"][0]["provider"], "haproxy");
    assert_eq!(json["settings"][0]["layer"], serde_json::Value::Null);

    coordinator.cli(&["traffic", "clear", "web"]);
    let cleared = coordinator.cli(&["traffic", "show", "web"]);
    assert!(cleared.contains("no traffic provider"), "{cleared}");
    let again = coordinator.try_cli(&["traffic", "clear", "web"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("has no traffic settings"));
    let events = coordinator.cli(&["event", "list"]);
    assert!(
        events.contains("traffic.set") && events.contains("traffic.clear"),
        "{events}"
    );
}
