//! The zero-downtime proof: a real HAProxy in front of six instances in three zones, each serving
//! the release's app under its agent, a steady load through HAProxy for the whole deployment, and
//! every request's outcome counted. Good releases, releases caught at the canary, and an instance
//! killed mid-wave must not fail a single request beyond what HAProxy's own checks take to see a
//! dead server; nothing may be left drained. The ELBv2 provider is proved against the ELBv2 API of
//! the local test server. Each scenario prints its figures.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rollwave_coordinator::traffic::{AdminState, OperationalState, TrafficTarget};
use rollwave_tests::haproxy::{BACKEND, Haproxy, free_port};
use rollwave_tests::load::{CpuStress, Load, LoadReport};
use rollwave_tests::{Fleet, test_python, wait_for};
use serde_json::Value;

/// Requests per second through HAProxy while deployments run.
const LOAD_RATE: u32 = 100;
/// Instances in the proof (two per zone).
const INSTANCES: usize = 6;
/// HAProxy's check interval and thresholds: a dead server is out after `FALL` failed checks.
const CHECK_INTERVAL_MS: u64 = 200;
const FALL: u64 = 2;

/// How a release's app behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum App {
    /// Serves its version, healthy.
    Good,
    /// Serves, but its health endpoint says a dependency is down.
    FailsHealth,
    /// Exits at once.
    DoesNotStart,
    /// Serves and is healthy until its instance's `state/unhealthy` exists: a release that goes
    /// bad after its wave settled.
    GoesBad,
}

/// The first line of the proof's Python scripts: the test interpreter itself, without `site`, so
/// that starting one costs a few milliseconds even on a busy machine (through a version manager's
/// shim, `/usr/bin/env python3` can take a second there, and a health check only two).
fn shebang() -> String {
    format!("#!{} -S", test_python())
}

/// The app: a small Python HTTP server on the port its instance was given in `state/app-port`,
/// three levels above its release directory.
fn app_script(app: App) -> String {
    let (healthy, starts) = match app {
        App::Good => ("True", "True"),
        App::FailsHealth => ("False", "True"),
        App::DoesNotStart => ("True", "False"),
        App::GoesBad => ("not pathlib.Path(\"../../../unhealthy\").exists()", "True"),
    };
    format!(
        r#"{shebang}
# The proof's app: its version on /, its health on /health.
import http.server, os, pathlib, sys, time
if not {starts}:
    sys.exit("app: this release is broken on purpose and does not start")
port = int(pathlib.Path("../../../app-port").read_text())
version = os.environ["ROLLWAVE_VERSION"].encode()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path == "/health":
            status, body = (200, b"ok") if {healthy} else (503, b"database unreachable")
        elif self.path == "/slow":
            # A long request (a report, an upload): still in flight when an instance goes out.
            time.sleep(2)
            status, body = 200, version
        else:
            status, body = 200, version
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"#,
        shebang = shebang()
    )
}

/// The agent's deep health check: the app's own /health, which checks its dependencies.
fn health_check() -> String {
    format!(
        r#"{}
import pathlib, sys, urllib.request
port = int(pathlib.Path("../../../app-port").read_text())
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{{port}}/health", timeout=2) as response:
        print(response.read().decode())
except Exception as error:
    sys.exit(f"GET /health: {{error}}")
"#,
        shebang()
    )
}

const MANIFEST: &str = r#"[service]
command = ["bin/app"]

[[health]]
command = "bin/check"
timeout = "3s"
"#;

/// Six instances serving app@1.0 (approved), each on its own port.
struct Site {
    fleet: Fleet,
    ports: Vec<u16>,
}

impl Site {
    fn start() -> Self {
        let fleet = Fleet::start(INSTANCES);
        let mut ports = Vec::new();
        for agent in &fleet.cluster.agents {
            let port = free_port();
            let state = agent.dir.join("state");
            std::fs::create_dir_all(&state).expect("state dir");
            std::fs::write(state.join("app-port"), port.to_string()).expect("app-port");
            ports.push(port);
        }
        let site = Site { fleet, ports };
        site.push("1.0", App::Good);
        let output = site.deploy("1.0", &["--strategy", "all-at-once", "--no-drain"]);
        assert!(output.0, "first deployment: {}", output.1);
        site.fleet.wait_all_on("1.0");
        site
    }

    fn push(&self, version: &str, app: App) {
        let source = self.fleet.work.path().join(format!("app-src-{version}"));
        std::fs::create_dir_all(source.join("bin")).expect("source dir");
        std::fs::write(source.join("rollwave.toml"), MANIFEST).expect("manifest");
        write_executable(&source.join("bin/app"), &app_script(app));
        write_executable(&source.join("bin/check"), &health_check());
        self.fleet.push_source(version, &source);
    }

    /// `deploy --watch`: whether it succeeded, the deployment, and how long it took.
    fn deploy(&self, version: &str, extra: &[&str]) -> (bool, Value, Duration) {
        let started = Instant::now();
        let (ok, deployment) = self.fleet.deploy_and_watch(version, extra);
        (ok, deployment, started.elapsed())
    }

    fn hostname(&self, index: usize) -> &str {
        &self.fleet.cluster.agents[index].spec.name
    }

    /// HAProxy with one server per instance, named by hostname, checked on /health.
    fn haproxy(&self) -> Haproxy {
        let servers: String = (0..INSTANCES)
            .map(|index| format!("    server {} 127.0.0.1:{}\n", self.hostname(index), self.ports[index]))
            .collect();
        let backend = format!(
            "backend {BACKEND}
    balance roundrobin
    option httpchk GET /health
    http-check expect status 200
    # A refused connection goes to another server; no retry after a request was sent.
    retries 3
    option redispatch 1
    # A check waits up to a second for an answer: on a busy machine the app may take longer than
    # the interval to answer, which is no reason to take it out of rotation.
    timeout check 1s
    default-server check inter {CHECK_INTERVAL_MS}ms fall {FALL} rise 2
{servers}"
        );
        let mut haproxy = Haproxy::start(&backend);
        let provider = haproxy.provider();
        let runtime = runtime();
        for index in 0..INSTANCES {
            let target = self.target(index);
            wait_for(&format!("haproxy to see {} up", self.hostname(index)), || {
                haproxy.check_running();
                let state = runtime.block_on(provider.state(&target)).ok()?;
                (state.operational == OperationalState::Running).then_some(())
            });
        }
        haproxy
    }

    fn target(&self, index: usize) -> TrafficTarget {
        TrafficTarget {
            instance_id: self.fleet.instance_id(index),
            backend: BACKEND.to_owned(),
            server: self.hostname(index).to_owned(),
        }
    }

    /// Points the stack's traffic settings at `haproxy`.
    fn use_haproxy(&self, haproxy: &Haproxy) {
        let runtime_api = format!("unix:{}", haproxy.socket().display());
        let shown = self.fleet.cluster.coordinator.cli(&[
            "traffic",
            "set",
            "web",
            "haproxy",
            "--runtime-api",
            &runtime_api,
            "--backend",
            BACKEND,
            "--server",
            "{hostname}",
            "--drain-timeout",
            "5s",
        ]);
        assert!(shown.contains("haproxy at unix:"), "{shown}");
    }

    /// Waits until HAProxy has every server ready (none drained or in maintenance) and all but
    /// `down` running.
    fn wait_all_in_rotation(&self, haproxy: &Haproxy, down: Option<usize>) {
        let provider = haproxy.provider();
        let runtime = runtime();
        for index in 0..INSTANCES {
            let target = self.target(index);
            let expected = if Some(index) == down {
                OperationalState::Stopped
            } else {
                OperationalState::Running
            };
            wait_for(&format!("{} back in rotation", self.hostname(index)), || {
                let state = runtime.block_on(provider.state(&target)).ok()?;
                (state.admin == AdminState::Ready && state.operational == expected).then_some(())
            });
        }
    }

    /// Drains and undrains the coordinator recorded in the audit trail, as (action, instance, outcome).
    fn traffic_events(&self) -> Vec<(String, String, String)> {
        let events = self
            .fleet
            .cluster
            .coordinator
            .cli_json(&["event", "list", "--limit", "1000"]);
        events
            .as_array()
            .expect("events")
            .iter()
            .filter(|event| {
                event["action"]
                    .as_str()
                    .is_some_and(|action| action.starts_with("traffic."))
            })
            .map(|event| {
                (
                    event["action"].as_str().unwrap_or_default().to_owned(),
                    event["target"].as_str().unwrap_or_default().to_owned(),
                    event["outcome"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn out_of_service(&self) -> Vec<Value> {
        self.fleet.status()["out_of_service"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until the coordinator sees every instance healthy (a health check that ran while an
    /// app restarted may have said otherwise for a moment), as the next plan needs.
    fn wait_all_healthy(&self) {
        wait_for("every instance healthy", || {
            let status = self.fleet.status();
            let instances = status["bundles"][0]["instances"].as_array()?.clone();
            (instances.len() == INSTANCES && instances.iter().all(|instance| instance["healthy"] == true)).then_some(())
        });
    }

    fn current_everywhere(&self) -> Vec<Option<String>> {
        (0..INSTANCES).map(|index| self.fleet.current(index)).collect()
    }
}

impl Drop for Site {
    /// The apps run in their own sessions and outlive their agents: stop the agents (so nothing
    /// restarts an app), then every app's process group.
    fn drop(&mut self) {
        for agent in &mut self.fleet.cluster.agents {
            agent.kill();
        }
        for agent in &self.fleet.cluster.agents {
            kill_app(&agent.dir);
        }
    }
}

/// SIGKILL to the process group of the app the agent in `agent_dir` supervises, if it runs.
fn kill_app(agent_dir: &Path) {
    let record = agent_dir.join("state/state/services/app.json");
    let Ok(text) = std::fs::read_to_string(record) else {
        return;
    };
    let Some(pid) = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|record| record["pid"].as_i64())
    else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // `--` matters: procps-ng 4.0.2 reads `kill -KILL -14827` as the signal then pid -1, all processes.
    let _ = Command::new("kill")
        .args(["-s", "KILL", "--", &format!("-{pid}")])
        .status();
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

fn print_figures(scenario: &str, report: &LoadReport, deployment: Duration) {
    println!(
        "zero-downtime proof, {scenario}: {}; deployment {:.1} s",
        report.summary(),
        deployment.as_secs_f64()
    );
}

/// Options that keep the proof quick: 1 s of health before an instance counts as settled.
const QUICK: [&str; 4] = ["--min-healthy-time", "1s", "--healthy-deadline", "20s"];

/// How long the CPU hogs beside the proof may run at most (the proof takes about two minutes).
const STRESS_LIMIT: Duration = Duration::from_secs(600);

/// Runs alone (see `.config/nextest.toml`), beside two CPU hogs: a busy machine is where the field
/// trial saw a failed release answer users.
#[test]
fn rolling_deployments_under_load_fail_no_request() {
    let _stress = CpuStress::start(2, STRESS_LIMIT);
    let site = Site::start();
    let haproxy = site.haproxy();
    site.use_haproxy(&haproxy);

    // 1. A good release: every instance drained, switched, returned; no request fails.
    site.push("2.0", App::Good);
    let load = Load::start(haproxy.frontend_port, LOAD_RATE);
    let (ok, deployment, took) = site.deploy("2.0", &QUICK);
    site.wait_all_in_rotation(&haproxy, None);
    let report = load.stop();
    print_figures("1 (good release)", &report, took);
    assert!(ok, "{deployment}");
    assert_eq!(deployment["status"], "succeeded");
    assert!(report.failures.is_empty(), "failed requests: {:?}", report.failures);
    assert!(report.sent >= 200, "the load ran: {}", report.summary());
    assert!(
        report.bodies.contains_key("1.0") && report.bodies.contains_key("2.0"),
        "both releases answered during the deployment: {}",
        report.summary()
    );
    assert_eq!(site.current_everywhere(), vec![Some("2.0".to_owned()); INSTANCES]);
    let events = site.traffic_events();
    for index in 0..INSTANCES {
        let instance = site.fleet.instance_id(index);
        for action in ["traffic.drain", "traffic.undrain"] {
            assert_eq!(
                events
                    .iter()
                    .filter(|(done, target, outcome)| done == action && *target == instance && outcome == "ok")
                    .count(),
                1,
                "{action} of {instance} once: {events:?}"
            );
        }
    }
    assert!(site.out_of_service().is_empty(), "{:?}", site.out_of_service());

    // 2 and 3. Releases caught at the canary: one whose health check fails, one whose app does
    // not start. The canary goes back to 2.0 and back into rotation; no request fails.
    for (scenario, version, app) in [
        ("2 (fails its health check)", "3.0", App::FailsHealth),
        ("3 (app does not start)", "4.0", App::DoesNotStart),
    ] {
        site.push(version, app);
        site.wait_all_healthy();
        let load = Load::start(haproxy.frontend_port, LOAD_RATE);
        let (ok, deployment, took) = site.deploy(version, &QUICK);
        site.wait_all_in_rotation(&haproxy, None);
        let report = load.stop();
        print_figures(scenario, &report, took);
        assert!(!ok, "{version} must fail: {deployment}");
        assert_eq!(deployment["status"], "failed", "{deployment}");
        let canary = deployment["waves"][0]["instances"][0]["instance_id"]
            .as_str()
            .expect("a canary")
            .to_owned();
        assert!(
            deployment["failures"][0]
                .as_str()
                .is_some_and(|failure| failure.starts_with(&canary)),
            "the canary failed: {deployment}"
        );
        assert!(
            report.failures.is_empty(),
            "{scenario}: failed requests: {:?}",
            report.failures
        );
        assert_eq!(
            report.bodies.keys().collect::<Vec<_>>(),
            vec!["2.0"],
            "only 2.0 ever answered: {}",
            report.summary()
        );
        assert_eq!(site.current_everywhere(), vec![Some("2.0".to_owned()); INSTANCES]);
        assert!(site.out_of_service().is_empty(), "{:?}", site.out_of_service());
    }
}

/// Field trial: when an instance failed after its wave had settled, every switched instance was
/// switched back at once and without drain, and long requests in flight got HTTP 502. Here the
/// canary goes bad while a later wave runs; the instances that settled on the release go back a
/// batch at a time (one: the floor of 5 of 6 spares one), each drained first, and neither short
/// nor long requests fail.
#[test]
fn a_release_that_goes_bad_after_settling_is_switched_back_drained_in_batches() {
    let site = Site::start();
    let haproxy = site.haproxy();
    site.use_haproxy(&haproxy);
    site.push("5.0", App::GoesBad);
    site.wait_all_healthy();

    let short = Load::start(haproxy.frontend_port, LOAD_RATE);
    // Two-second requests, five a second: about ten always in flight.
    let long = Load::start_path(haproxy.frontend_port, 5, "/slow");
    let started = Instant::now();
    // A second of bake between waves leaves the canary's next health rounds time to report it bad
    // before the last wave, on a busy machine too.
    let mut args = vec!["deploy", "web", "app@5.0", "--output", "json", "--bake", "1s"];
    args.extend(QUICK);
    let created = site.fleet.cluster.coordinator.cli_json(&args);
    let id = created["id"].as_str().expect("deployment id").to_owned();
    let canary_id = created["waves"][0]["instances"][0]["instance_id"]
        .as_str()
        .expect("a canary")
        .to_owned();
    let canary = site.fleet.index_of(&canary_id);
    wait_for("the third wave to start", || {
        let shown = site.fleet.show(&id);
        let summary = shown["summary"].as_str().unwrap_or_default().to_owned();
        let wave: usize = summary
            .strip_prefix("wave ")
            .and_then(|rest| rest.split('/').next())
            .and_then(|number| number.parse().ok())
            .unwrap_or(0);
        assert_ne!(
            shown["status"], "succeeded",
            "finished before the canary went bad: {shown}"
        );
        (wave >= 3).then_some(())
    });
    std::fs::write(site.fleet.agent_root(canary).join("unhealthy"), b"").expect("make the canary go bad");
    let deployment = site.fleet.wait_finished(&id);
    let took = started.elapsed();
    site.wait_all_in_rotation(&haproxy, None);
    let short = short.stop();
    let long = long.stop();
    print_figures("6 (goes bad after settling, short requests)", &short, took);
    print_figures("6 (goes bad after settling, long requests)", &long, took);

    assert_eq!(deployment["status"], "failed", "{deployment}");
    assert!(
        deployment["failures"][0]
            .as_str()
            .is_some_and(|failure| failure.starts_with(&canary_id) && failure.contains("unhealthy after settling")),
        "the canary failed after settling: {deployment}"
    );
    assert!(short.failures.is_empty(), "short requests failed: {:?}", short.failures);
    assert!(long.failures.is_empty(), "long requests failed: {:?}", long.failures);
    assert!(long.sent >= 20, "the long load ran: {}", long.summary());
    assert_eq!(site.current_everywhere(), vec![Some("1.0".to_owned()); INSTANCES]);
    assert!(site.out_of_service().is_empty(), "{:?}", site.out_of_service());

    // Every instance that settled on 5.0 was drained twice (its wave, then its switch back) and
    // switched back by the coordinator, which the audit trail records.
    let traffic = site.traffic_events();
    let events = site
        .fleet
        .cluster
        .coordinator
        .cli_json(&["event", "list", "--limit", "1000"]);
    let switched_back: Vec<String> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["action"] == "deployment.switch_back")
        .filter_map(|event| event["target"].as_str().map(str::to_owned))
        .collect();
    let settled_waves = &deployment["waves"].as_array().expect("waves")[..2];
    for wave in settled_waves {
        for instance in wave["instances"].as_array().expect("instances") {
            let instance = instance["instance_id"].as_str().expect("id");
            let drains = traffic
                .iter()
                .filter(|(action, target, outcome)| action == "traffic.drain" && target == instance && outcome == "ok")
                .count();
            assert_eq!(
                drains, 2,
                "{instance}: drained for its wave and for its switch back: {traffic:?}"
            );
            assert!(
                switched_back.iter().any(|target| target == instance),
                "{instance} switched back by the coordinator: {switched_back:?}"
            );
        }
    }
}

#[test]
fn an_instance_killed_mid_wave_fails_over_and_nothing_stays_drained() {
    let mut site = Site::start();
    let haproxy = site.haproxy();
    site.use_haproxy(&haproxy);
    site.push("2.0", App::Good);

    let load = Load::start(haproxy.frontend_port, LOAD_RATE);
    let started = Instant::now();
    let mut args = vec![
        "deploy",
        "web",
        "app@2.0",
        "--failure-threshold",
        "1",
        "--output",
        "json",
    ];
    args.extend(["--min-healthy-time", "1s", "--healthy-deadline", "8s"]);
    let created = site.fleet.cluster.coordinator.cli_json(&args);
    let id = created["id"].as_str().expect("deployment id").to_owned();
    // The victim is in the last wave, still serving 1.0 when the canary starts.
    let last_wave = created["waves"].as_array().expect("waves").len() - 1;
    let victim_id = created["waves"][last_wave]["instances"][0]["instance_id"]
        .as_str()
        .expect("an instance")
        .to_owned();
    let victim = site.fleet.index_of(&victim_id);
    wait_for("the canary wave to start", || {
        let shown = site.fleet.show(&id);
        shown["phase"]
            .as_str()
            .is_some_and(|phase| phase.starts_with("wave"))
            .then_some(())
    });
    let killed_at_ms = unix_ms();
    site.fleet.cluster.agents[victim].kill();
    kill_app(&site.fleet.cluster.agents[victim].dir);

    let deployment = site.fleet.wait_finished(&id);
    let took = started.elapsed();
    site.wait_all_in_rotation(&haproxy, Some(victim));
    let report = load.stop();
    print_figures("4 (instance killed mid-wave)", &report, took);

    assert_eq!(
        deployment["status"], "succeeded",
        "threshold 1 takes the loss: {deployment}"
    );
    let failures = deployment["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{deployment}");
    assert!(
        failures[0]
            .as_str()
            .is_some_and(|failure| failure.starts_with(&victim_id)),
        "{deployment}"
    );
    for index in (0..INSTANCES).filter(|index| *index != victim) {
        assert_eq!(site.fleet.current(index).as_deref(), Some("2.0"), "instance {index}");
    }
    // Requests fail over: anything that failed did so before HAProxy's checks marked the
    // victim down (FALL checks, plus one interval and a margin for scheduling).
    let window_ms = i64::try_from((FALL + 1) * CHECK_INTERVAL_MS).unwrap_or(i64::MAX) + 1000;
    for failure in &report.failures {
        assert!(
            failure.at_ms >= killed_at_ms - 100 && failure.at_ms <= killed_at_ms + window_ms,
            "a request failed outside the fail-over window ({window_ms} ms after the kill at {killed_at_ms}): {failure:?}"
        );
    }
    assert!(
        site.out_of_service().is_empty(),
        "nothing left drained: {:?}",
        site.out_of_service()
    );
}

#[test]
fn elbv2_targets_are_deregistered_and_registered_in_wave_order() {
    let site = Site::start();
    let endpoint = rollwave_tests::s3::endpoint();
    let work = site.fleet.work.path();
    let group_name = format!("rw-{}", std::process::id());
    let hostnames: Vec<String> = (0..INSTANCES).map(|index| site.hostname(index).to_owned()).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/elbv2_watch.py");
    let output = Command::new(test_python())
        .arg(&script)
        .arg(&endpoint)
        .arg("create")
        .arg(&group_name)
        .args(&hostnames)
        .output()
        .expect("run elbv2_watch.py create");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let arn = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let log = work.join("elbv2.log");
    let mut watcher = Command::new(test_python())
        .arg(&script)
        .arg(&endpoint)
        .arg("watch")
        .arg(&arn)
        .arg(&log)
        .spawn()
        .expect("start the ELBv2 watcher");
    wait_for("the watcher's first record", || {
        std::fs::read_to_string(&log).ok().filter(|text| !text.is_empty())
    });

    let shown = site.fleet.cluster.coordinator.cli(&[
        "traffic",
        "set",
        "web",
        "aws-elbv2",
        "--target-group",
        &arn,
        "--target",
        "{hostname}",
        "--endpoint",
        &endpoint,
        "--region",
        "us-east-1",
        "--drain-timeout",
        "5s",
    ]);
    assert!(shown.contains("aws-elbv2 target {hostname}"), "{shown}");
    site.push("2.0", App::Good);
    let (ok, deployment, took) = site.deploy("2.0", &QUICK);
    std::fs::write(log.with_extension("log.stop"), b"").expect("stop the watcher");
    let _ = watcher.wait();
    println!(
        "zero-downtime proof, 5 (aws-elbv2): deployment {:.1} s",
        took.as_secs_f64()
    );
    assert!(ok, "{deployment}");

    // When each target left the group and came back, from the API's own answers.
    let mut left: std::collections::BTreeMap<String, Vec<(i64, i64)>> = std::collections::BTreeMap::new();
    let mut out_since: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(&log).expect("watch log").lines() {
        let (at, registered) = line.split_once(' ').unwrap_or((line, ""));
        let at: i64 = at.parse().expect("a time");
        let registered: Vec<&str> = registered.split(',').filter(|id| !id.is_empty()).collect();
        for hostname in &hostnames {
            let is_in = registered.contains(&hostname.as_str());
            match (is_in, out_since.get(hostname).copied()) {
                (false, None) => {
                    out_since.insert(hostname.clone(), at);
                }
                (true, Some(since)) => {
                    out_since.remove(hostname);
                    left.entry(hostname.clone()).or_default().push((since, at));
                }
                _ => {}
            }
        }
    }
    assert!(out_since.is_empty(), "left deregistered: {out_since:?}");
    // Every target left exactly once, around its own switch, and the waves never overlapped.
    let mut intervals_by_wave = Vec::new();
    for wave in deployment["waves"].as_array().expect("waves") {
        let mut intervals = Vec::new();
        for instance in wave["instances"].as_array().expect("instances") {
            let index = site.fleet.index_of(instance["instance_id"].as_str().expect("id"));
            let hostname = &hostnames[index];
            let periods = left.get(hostname).cloned().unwrap_or_default();
            assert_eq!(periods.len(), 1, "{hostname} deregistered once: {left:?}");
            let (out, back) = periods[0];
            let switched = site
                .fleet
                .activations(index)
                .iter()
                .filter(|(version, _)| version == "2.0")
                .map(|(_, at)| *at)
                .next()
                .expect("a switch to 2.0");
            assert!(
                out <= switched && switched <= back,
                "{hostname} switched at {switched}, outside its deregistration {out}..{back}"
            );
            intervals.push((out, back));
        }
        intervals_by_wave.push(intervals);
    }
    for pair in intervals_by_wave.windows(2) {
        let earlier_back = pair[0].iter().map(|(_, back)| *back).max().unwrap_or(0);
        let later_out = pair[1].iter().map(|(out, _)| *out).min().unwrap_or(i64::MAX);
        assert!(
            earlier_back <= later_out,
            "a wave was deregistered before the previous one came back: {intervals_by_wave:?}"
        );
    }
}
