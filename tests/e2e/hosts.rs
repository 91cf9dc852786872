//! Rollwave on real hosts: Debian instances booting systemd under
//! `systemd-nspawn`, each on its own network namespace, installing the agent
//! from its Debian package with `packaging/bootstrap.sh`, as EC2 user data
//! would. The coordinator, the CLI and the S3 server run in a control
//! namespace on the same test network (see `rollwave_tests::hosts`).
//!
//! These tests share one network and the machine's two cores, so they run one
//! at a time (the `hosts` test group in `.config/nextest.toml`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rollwave_tests::fleet;
use rollwave_tests::hosts::{Lab, PackageSource, sha256_of, wait_long};
use serde_json::Value;

/// The sample app's port: busybox httpd serving the release directory.
const APP_PORT: u16 = 8080;
/// Control files the test creates inside an instance to steer hooks.
const CONTROL_DIR: &str = "/var/lib/rollwave-test";

/// Builds and pushes app@version: busybox httpd serving the release (so
/// GET /VERSION says which release answers), run by the agent as its own
/// systemd unit, healthy when it answers. With `hook_waits`, its after_install
/// hook records each run and waits until CONTROL_DIR/proceed-<version> exists.
fn push_app(lab: &Lab, version: &str, hook_waits: bool) {
    let source = lab.work.path().join(format!("src-{version}"));
    std::fs::create_dir_all(source.join("hooks")).expect("source dir");
    std::fs::write(source.join("VERSION"), version).expect("VERSION");
    let mut manifest = String::new();
    if hook_waits {
        let hook = source.join("hooks/wait.sh");
        std::fs::write(
            &hook,
            format!(
                "#!/bin/sh\nmkdir -p {CONTROL_DIR}\necho run >> {CONTROL_DIR}/hook-runs-{version}\n\
                 while [ ! -e {CONTROL_DIR}/proceed-{version} ]; do sleep 0.1; done\n"
            ),
        )
        .expect("hook");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        manifest.push_str("[hooks]\nafter_install = { path = \"hooks/wait.sh\", timeout = \"5m\" }\n\n");
    }
    manifest.push_str(&format!(
        "[service]\ncommand = [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"{APP_PORT}\", \"-h\", \".\"]\n\
         working_directory = \".\"\n\n[[health]]\nhttp = \"http://127.0.0.1:{APP_PORT}/VERSION\"\ntimeout = \"2s\"\n"
    ));
    std::fs::write(source.join("rollwave.toml"), manifest).expect("manifest");
    let archive = lab.work.path().join(format!("app-{version}.zip"));
    rollwave_release::build_from_dir(&source, &archive).expect("build the release");
    let endpoint = lab.s3_endpoint();
    let archive = archive.display().to_string();
    let output = lab.coordinator.try_cli(&[
        "release",
        "push",
        &archive,
        "--bundle",
        "app",
        "--version",
        version,
        "--bucket",
        &lab.bucket,
        "--s3-endpoint",
        &endpoint,
        "--s3-path-style",
    ]);
    assert!(
        output.status.success(),
        "push app@{version}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn start_deployment(lab: &Lab, version: &str, extra: &[&str]) -> String {
    fleet::start_deployment(&lab.coordinator, version, extra)
}

fn show(lab: &Lab, id: &str) -> Value {
    fleet::show_deployment(&lab.coordinator, id)
}

fn wait_finished(lab: &Lab, id: &str) -> Value {
    fleet::wait_deployment_finished(&lab.coordinator, id)
}

fn deploy_and_wait(lab: &Lab, version: &str, extra: &[&str]) -> Value {
    let id = start_deployment(lab, version, extra);
    wait_finished(lab, &id)
}

fn app_status(lab: &Lab) -> Value {
    fleet::bundle_status(&lab.status(), "app").clone()
}

/// A lab with app@1.0 approved (deployed on the empty stack) and app@2.0 pushed
/// but not deployed, so "the newest release" and "the approved release" differ.
fn lab_with_approved_1_0() -> Lab {
    let lab = Lab::start();
    push_app(&lab, "1.0", false);
    let finished = deploy_and_wait(&lab, "1.0", &[]);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    push_app(&lab, "2.0", false);
    lab
}

/// Creates `count` instances and bootstraps them all at once (package from S3,
/// over http and from a local path in turn); returns each one's time from
/// power-on to ready (its boot plus its bootstrap).
fn bootstrap_fleet(lab: &mut Lab, count: usize) -> Vec<Duration> {
    let token = lab
        .coordinator
        .create_token("web", u32::try_from(count).expect("few"), "30m");
    let sha256 = sha256_of(&lab.packages.agent);
    let mut boots = Vec::new();
    for _ in 0..count {
        let index = lab.add_instance();
        boots.push(lab.instances[index].powered_on_at.elapsed());
    }
    let sources = [PackageSource::S3, PackageSource::Http, PackageSource::LocalPath];
    let lab_ref: &Lab = lab;
    let results: Vec<(Duration, std::process::Output)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..count)
            .map(|index| {
                let (token, sha256) = (&token, &sha256);
                scope.spawn(move || {
                    let started = Instant::now();
                    let output = lab_ref.bootstrap(index, token, sources[index % sources.len()], sha256);
                    (started.elapsed(), output)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("bootstrap thread"))
            .collect()
    });
    let mut ready = Vec::new();
    for (index, (took, output)) in results.into_iter().enumerate() {
        let name = &lab.instances[index].name;
        assert!(
            output.status.success(),
            "bootstrap on {name} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let total = boots[index] + took;
        println!(
            "hosts: {name} start -> ready {:.2}s (boot {:.2}s + bootstrap {:.2}s: fetch, verify, install, join, \
             install app@1.0, READY=1)",
            total.as_secs_f64(),
            boots[index].as_secs_f64(),
            took.as_secs_f64()
        );
        ready.push(total);
    }
    ready
}

fn instance_id(lab: &Lab, index: usize) -> String {
    let text = std::fs::read_to_string(lab.instances[index].root().join("etc/rollwave/tls/identity.toml"))
        .expect("identity.toml");
    let identity: toml::Value = toml::from_str(&text).expect("identity parses");
    identity["instance_id"].as_str().expect("instance_id").to_owned()
}

fn index_of(lab: &Lab, id: &str) -> usize {
    (0..lab.instances.len())
        .find(|index| lab.instances[*index].is_on() && instance_id(lab, *index) == id)
        .unwrap_or_else(|| panic!("no instance is {id}"))
}

fn wait_current(lab: &Lab, index: usize, version: &str) {
    let name = lab.instances[index].name.clone();
    wait_long(&format!("{name} to run app@{version}"), || {
        (lab.instances[index].current("app").as_deref() == Some(version)).then_some(())
    });
}

fn wait_serving(lab: &Lab, index: usize, version: &str) {
    let name = lab.instances[index].name.clone();
    wait_long(&format!("{name} to serve app@{version}"), || {
        (lab.http_get(index, APP_PORT, "/VERSION").as_deref() == Some(version)).then_some(())
    });
}

/// GETs the app every 50 ms from the control namespace until stopped; counts
/// failed requests.
struct Prober {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU32>,
    requests: Arc<AtomicU32>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(ip: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU32::new(0));
        let requests = Arc::new(AtomicU32::new(0));
        let url = format!("http://{ip}:{APP_PORT}/VERSION");
        let thread = {
            let (stop, failures, requests) = (stop.clone(), failures.clone(), requests.clone());
            // Spawned from the test thread, so it is on the test network too.
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = rollwave_tests::hosts::run("curl", &["-fsS", "-o", "/dev/null", "--max-time", "2", &url])
                        .status
                        .success();
                    requests.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        Self {
            stop,
            failures,
            requests,
            thread: Some(thread),
        }
    }

    /// Requests made so far.
    fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Stops probing; returns (requests, failures).
    fn finish(mut self) -> (u32, u32) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("prober");
        }
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The agents' and apps' logs of every running instance, for failure messages.
fn agent_journals(lab: &Lab) -> String {
    lab.instances
        .iter()
        .filter(|instance| instance.is_on())
        .map(|instance| {
            let (log, _) = instance
                .sh("journalctl --no-pager -o short-monotonic -u rollwave-agent -u rollwave-app-app | tail -n 60");
            format!("--- {} ---\n{log}", instance.name)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn app_pid(lab: &Lab, index: usize) -> String {
    let pid = lab.instances[index].unit_property("rollwave-app-app.service", "MainPID");
    assert_ne!(pid, "0", "rollwave-app-app runs on {}", lab.instances[index].name);
    pid
}

fn agent_pid(lab: &Lab, index: usize) -> String {
    lab.instances[index].unit_property("rollwave-agent.service", "MainPID")
}

/// Scenario 1: five fresh instances run the bootstrap script; each installs
/// the package, starts the agent under systemd, joins, installs the stack's
/// approved release (1.0, not the newer 2.0) and only then reports ready.
#[test]
fn hosts_five_fresh_instances_bootstrap_into_the_approved_release() {
    let mut lab = lab_with_approved_1_0();
    let ready = bootstrap_fleet(&mut lab, 5);
    let slowest = ready.iter().max().expect("five");
    println!(
        "hosts: slowest start -> ready of 5 instances bootstrapping at once: {:.2}s",
        slowest.as_secs_f64()
    );

    for index in 0..5 {
        let instance = &lab.instances[index];
        // Ready means: installed, running under systemd, joined, on the approved release.
        assert_eq!(instance.current("app").as_deref(), Some("1.0"), "{}", instance.name);
        assert!(
            !instance.root().join("var/lib/rollwave/releases/app/2.0").exists(),
            "{} installed the newest release instead of the approved one",
            instance.name
        );
        assert_eq!(
            instance.unit_property("rollwave-agent.service", "ActiveState"),
            "active"
        );
        assert_eq!(
            instance.unit_property("rollwave-agent.service", "UnitFileState"),
            "enabled"
        );
        assert_eq!(
            instance.sh_ok("dpkg-query --show --showformat '${Version}' rollwave-agent"),
            "0.1.0-1"
        );
        assert_eq!(lab.http_get(index, APP_PORT, "/VERSION").as_deref(), Some("1.0"));
    }
    let app = app_status(&lab);
    assert_eq!(app["approved_version"], "1.0", "{app}");
    assert_eq!(app["running"], serde_json::json!({"1.0": 5}), "{app}");
    let rows = app["instances"].as_array().expect("instances");
    assert_eq!(rows.len(), 5, "{app}");
    for row in rows {
        assert_eq!(row["state"], "ok", "{row}");
        assert_eq!(row["presence"], "online", "{row}");
        assert_eq!(row["running_version"], "1.0", "{row}");
    }
    println!(
        "hosts: rollwave status web:\n{}",
        lab.coordinator.cli(&["status", "web"])
    );

    // Running the script again does no harm: no second join (the token is spent
    // anyway), no reinstall, no restart of the agent.
    let identity_before = instance_id(&lab, 0);
    let agent_before = agent_pid(&lab, 0);
    let again = lab.bootstrap(
        0,
        "rwt1.spent.spent.spent",
        PackageSource::S3,
        &sha256_of(&lab.packages.agent),
    );
    assert!(
        again.status.success(),
        "second run: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        log.contains("already joined") && log.contains("already installed"),
        "{log}"
    );
    assert_eq!(instance_id(&lab, 0), identity_before);
    assert_eq!(agent_pid(&lab, 0), agent_before, "the agent was not restarted");
    assert_eq!(lab.coordinator.instances().len(), 5, "no sixth instance");

    // A package that is not the one named by its sha256 is never installed.
    let fresh = lab.add_instance();
    let wrong = "0".repeat(64);
    let token = lab.coordinator.create_token("web", 1, "10m");
    let refused = lab.bootstrap(fresh, &token, PackageSource::LocalPath, &wrong);
    assert_eq!(
        refused.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("sha256 mismatch"));
    let (_, installed) = lab.instances[fresh].sh("dpkg-query --show rollwave-agent");
    assert!(!installed, "nothing installed after a sha256 mismatch");
}

/// Scenario 2: a rolling deployment across five hosts completes; during the
/// next one, a host is powered off mid-wave and another is cut off the
/// network: both count against the failure threshold, the deployment ends
/// instead of hanging, and the cut-off host converges once it is back.
#[test]
fn hosts_rolling_deployment_survives_a_powered_off_and_a_cut_off_host() {
    let mut lab = lab_with_approved_1_0();
    bootstrap_fleet(&mut lab, 5);

    let started = Instant::now();
    let finished = deploy_and_wait(&lab, "2.0", &[]);
    assert_eq!(finished["status"], "succeeded", "{finished}\n{}", agent_journals(&lab));
    for index in 0..5 {
        wait_current(&lab, index, "2.0");
        wait_serving(&lab, index, "2.0");
    }
    println!(
        "hosts: rolling deployment of 2.0 across 5 hosts ({} waves) took {:.2}s",
        finished["waves"].as_array().map_or(0, Vec::len),
        started.elapsed().as_secs_f64()
    );

    push_app(&lab, "3.0", false);
    let started = Instant::now();
    let id = start_deployment(
        &lab,
        "3.0",
        &[
            "--min-healthy-time",
            "3s",
            "--failure-threshold",
            "2",
            "--healthy-deadline",
            "10s",
            "--progress-deadline",
            "90s",
        ],
    );
    wait_long("the deployment to reach its second wave", || {
        let phase = show(&lab, &id)["phase"].as_str().unwrap_or_default().to_owned();
        phase.starts_with("wave 2/").then_some(())
    });
    let shown = show(&lab, &id);
    let waves = shown["waves"].as_array().expect("waves").len();
    // Victims from the last two waves: they have not switched yet.
    let powered_off_id = fleet::wave_instances(&shown, waves - 1)[0].clone();
    let cut_off_id = fleet::wave_instances(&shown, waves - 2)[0].clone();
    let powered_off = index_of(&lab, &powered_off_id);
    let cut_off = index_of(&lab, &cut_off_id);
    println!(
        "hosts: {waves} waves; powering off {} and cutting off {} during wave 2",
        lab.instances[powered_off].name, lab.instances[cut_off].name
    );
    lab.instances[powered_off].power_off();
    lab.cut_off(cut_off);

    let finished = wait_finished(&lab, &id);
    println!(
        "hosts: deployment of 3.0 with one host powered off and one cut off ended ({}) after {:.2}s",
        finished["status"],
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        finished["status"], "succeeded",
        "two failures are within the threshold: {finished}"
    );
    let failures = finished["failures"].to_string();
    assert!(
        failures.contains(&powered_off_id) && failures.contains(&cut_off_id),
        "both lost hosts are counted as failures: {finished}"
    );
    for index in (0..5).filter(|index| *index != powered_off && *index != cut_off) {
        assert_eq!(lab.instances[index].current("app").as_deref(), Some("3.0"));
        assert_eq!(lab.http_get(index, APP_PORT, "/VERSION").as_deref(), Some("3.0"));
    }
    // The cut-off host kept serving what it had, and never ran a half-installed release.
    assert_eq!(lab.instances[cut_off].current("app").as_deref(), Some("2.0"));
    assert_eq!(app_status(&lab)["approved_version"], "3.0");

    // Back on the network: it converges to the approved release by itself.
    let started = Instant::now();
    lab.reconnect(cut_off);
    wait_current(&lab, cut_off, "3.0");
    wait_serving(&lab, cut_off, "3.0");
    println!(
        "hosts: reconnected host serving 3.0 after {:.2}s",
        started.elapsed().as_secs_f64()
    );
    // So does the powered-off host when it boots again (the agent is enabled).
    let started = Instant::now();
    lab.instances[powered_off].power_on();
    wait_current(&lab, powered_off, "3.0");
    wait_serving(&lab, powered_off, "3.0");
    println!(
        "hosts: powered-off host on again -> serving 3.0 after {:.2}s",
        started.elapsed().as_secs_f64()
    );
    wait_long("status to show all five on 3.0", || {
        let app = app_status(&lab);
        (app["running"] == serde_json::json!({"3.0": 5})).then_some(())
    });
}

/// Scenario 3: `systemctl restart rollwave-agent` in the middle of an install,
/// then a reboot: the release on disk stays consistent, the agent resumes, and
/// the app it supervises keeps serving across the agent restart.
#[test]
fn hosts_agent_restart_mid_install_and_reboot_keep_the_release_consistent() {
    let mut lab = lab_with_approved_1_0();
    bootstrap_fleet(&mut lab, 1);
    wait_serving(&lab, 0, "1.0");
    push_app(&lab, "3.0", true);

    let app_before = app_pid(&lab, 0);
    let agent_before = agent_pid(&lab, 0);
    let prober = Prober::start(&lab.instances[0].ip);
    let id = start_deployment(&lab, "3.0", &["--strategy", "all-at-once"]);
    let hook_runs = PathBuf::from(CONTROL_DIR.trim_start_matches('/')).join("hook-runs-3.0");
    let runs = |lab: &Lab| -> usize {
        std::fs::read_to_string(lab.instances[0].root().join(&hook_runs))
            .map(|text| text.lines().count())
            .unwrap_or(0)
    };
    wait_long("the after_install hook of 3.0 to run", || {
        (runs(&lab) >= 1).then_some(())
    });
    // Restart the agent while it is inside the install (--no-block: the new agent only
    // reports ready once it has finished that install, which waits for the test).
    lab.instances[0].sh_ok("systemctl restart --no-block rollwave-agent");
    wait_long("a new agent process", || {
        let pid = agent_pid(&lab, 0);
        (pid != agent_before && pid != "0").then_some(())
    });
    // The new agent finds the interrupted install in its journal and runs the hook again.
    wait_long("the hook to run again after the restart", || {
        (runs(&lab) >= 2).then_some(())
    });
    assert_eq!(
        lab.instances[0].current("app").as_deref(),
        Some("1.0"),
        "still on 1.0 while 3.0 is being installed"
    );
    assert_eq!(
        app_pid(&lab, 0),
        app_before,
        "the app kept running across the agent restart"
    );
    // Probing ends before the switch: on one host without a load balancer, stopping
    // 1.0 and starting 3.0 on the same port leaves a short gap that a probe may or
    // may not hit (1 run in 5 here); draining around it is the load balancer's job.
    // Ten more probes first, so the restarted agent's recovery is covered too.
    let probed = prober.requests();
    wait_long("ten more probes of the app", || {
        (prober.requests() >= probed + 10).then_some(())
    });
    let (requests, failures) = prober.finish();
    println!("hosts: {requests} requests to the app across the agent restart, {failures} failed");
    assert!(requests > 10, "the prober ran ({requests} requests)");
    assert_eq!(failures, 0, "the app kept serving across the agent restart");
    lab.instances[0].write_file(&format!("{CONTROL_DIR}/proceed-3.0"), "");
    let finished = wait_finished(&lab, &id);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    wait_current(&lab, 0, "3.0");
    wait_serving(&lab, 0, "3.0");
    assert_eq!(runs(&lab), 2, "the hook ran once per agent that reached it");
    assert_eq!(
        lab.instances[0].unit_property("rollwave-agent.service", "ActiveState"),
        "active"
    );
    let release = lab.instances[0].root().join("var/lib/rollwave/releases/app/3.0");
    assert_eq!(
        std::fs::read_to_string(release.join("VERSION")).expect("3.0 unpacked completely"),
        "3.0"
    );

    // A reboot: systemd starts the (enabled) agent again, which starts the app again.
    let identity = instance_id(&lab, 0);
    let started = Instant::now();
    lab.instances[0].reboot();
    wait_serving(&lab, 0, "3.0");
    println!(
        "hosts: reboot -> app serving again in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lab.instances[0].current("app").as_deref(), Some("3.0"));
    assert_eq!(instance_id(&lab, 0), identity, "same identity after the reboot");
    assert_eq!(
        lab.instances[0].unit_property("rollwave-agent.service", "ActiveState"),
        "active"
    );
    wait_long("status to show the instance on 3.0", || {
        let app = app_status(&lab);
        (app["running"] == serde_json::json!({"3.0": 1}) && app["instances"][0]["state"] == "ok").then_some(())
    });
}

/// Field trial: app crashes were invisible. Under systemd the app's unit restarts it by itself
/// (`Restart=on-failure`); the agent reads each restart (`NRestarts`) and its reason
/// (`ExecMainCode`/`ExecMainStatus`) and reports it, so `status` shows it.
#[test]
fn hosts_an_app_systemd_restarted_shows_in_status_with_its_exit() {
    let mut lab = lab_with_approved_1_0();
    bootstrap_fleet(&mut lab, 1);
    wait_serving(&lab, 0, "1.0");
    let before = app_pid(&lab, 0);
    lab.instances[0].sh_ok(&format!("kill -KILL {before}"));
    wait_long("systemd to restart the app", || {
        let pid = lab.instances[0].unit_property("rollwave-app-app.service", "MainPID");
        (pid != before && pid != "0").then_some(())
    });
    let row = wait_long("status to show the restart and why", || {
        let row = app_status(&lab)["instances"][0].clone();
        (row["app_restarts"] == 1 && row["last_exit"] == "killed by signal 9 (SIGKILL)").then_some(row)
    });
    assert!(row["last_exit_at"].is_string(), "{row}");
    wait_serving(&lab, 0, "1.0");
}

/// Scenario 4: upgrading the agent package while no deployment runs keeps the
/// instance's identity, its state and its running app (which keeps serving).
#[test]
fn hosts_agent_package_upgrade_keeps_identity_state_and_app() {
    let mut lab = lab_with_approved_1_0();
    bootstrap_fleet(&mut lab, 1);
    wait_serving(&lab, 0, "1.0");
    let instance = &lab.instances[0];
    let identity_before = std::fs::read(instance.root().join("etc/rollwave/tls/identity.toml")).expect("identity");
    let config_before = std::fs::read(instance.root().join("etc/rollwave/agent.toml")).expect("config");
    let journal_before =
        std::fs::read(instance.root().join("var/lib/rollwave/state/journal/app.json")).expect("journal");
    let app_before = app_pid(&lab, 0);
    let agent_before = agent_pid(&lab, 0);
    let id_before = instance_id(&lab, 0);

    let prober = Prober::start(&instance.ip);
    let file_name = lab
        .packages
        .agent_upgrade
        .file_name()
        .and_then(|name| name.to_str())
        .expect("file name")
        .to_owned();
    instance.put_file(&lab.packages.agent_upgrade, &format!("/root/{file_name}"), 0o644);
    let started = Instant::now();
    let upgrade = instance.exec(&["dpkg", "-i", &format!("/root/{file_name}")]);
    assert!(
        upgrade.status.success(),
        "dpkg -i the upgrade: {}{}",
        String::from_utf8_lossy(&upgrade.stdout),
        String::from_utf8_lossy(&upgrade.stderr)
    );
    println!(
        "hosts: agent package upgrade (dpkg -i, agent restarted and ready) took {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let instance = &lab.instances[0];
    assert_eq!(
        instance.sh_ok("dpkg-query --show --showformat '${Version}' rollwave-agent"),
        "0.1.0-2"
    );
    let agent_after = agent_pid(&lab, 0);
    assert_ne!(agent_after, agent_before, "the upgrade restarted the agent");
    assert_eq!(
        instance.unit_property("rollwave-agent.service", "ActiveState"),
        "active"
    );
    assert_eq!(app_pid(&lab, 0), app_before, "the app was not restarted");
    assert_eq!(
        std::fs::read(instance.root().join("etc/rollwave/tls/identity.toml")).expect("identity"),
        identity_before,
        "identity kept"
    );
    assert_eq!(
        std::fs::read(instance.root().join("etc/rollwave/agent.toml")).expect("config"),
        config_before,
        "the written agent.toml (a conffile) kept"
    );
    assert_eq!(
        std::fs::read(instance.root().join("var/lib/rollwave/state/journal/app.json")).expect("journal"),
        journal_before,
        "install journal unchanged: nothing was reinstalled"
    );
    assert_eq!(instance.current("app").as_deref(), Some("1.0"));
    lab.coordinator.wait_presence("h1", "online");
    let rows = lab.coordinator.instances();
    assert_eq!(rows.len(), 1, "no new instance: {rows:?}");
    assert_eq!(rows[0]["id"], id_before.as_str());
    let (requests, failures) = prober.finish();
    println!("hosts: {requests} requests to the app across the agent upgrade, {failures} failed");
    assert_eq!(failures, 0, "the app kept serving across the agent upgrade");

    // The upgraded agent still works: it takes the next deployment.
    let finished = deploy_and_wait(&lab, "2.0", &["--min-healthy", "0"]);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    wait_serving(&lab, 0, "2.0");

    // Removing the package stops the agent; the app (its own unit) is left alone.
    let instance = &lab.instances[0];
    instance.sh_ok("dpkg --remove rollwave-agent");
    assert_eq!(
        instance.unit_property("rollwave-agent.service", "ActiveState"),
        "inactive"
    );
    assert!(
        instance.root().join("etc/rollwave/tls/identity.toml").exists(),
        "remove keeps the identity"
    );
}

/// The coordinator's package: its own system user, its data dir, started on
/// install in its hardened unit, kept across an upgrade (reinstall), stopped
/// on removal with its data (the CA) kept.
#[test]
fn hosts_server_package_installs_runs_as_its_user_and_stops_on_removal() {
    let mut lab = Lab::start();
    let index = lab.add_instance();
    let instance = &lab.instances[index];
    let file_name = lab
        .packages
        .server
        .file_name()
        .and_then(|name| name.to_str())
        .expect("file name")
        .to_owned();
    instance.put_file(&lab.packages.server, &format!("/root/{file_name}"), 0o644);
    instance.sh_ok(&format!("dpkg -i /root/{file_name}"));
    wait_long("rollwave-server to be active with its data", || {
        let active = instance.unit_property("rollwave-server.service", "ActiveState") == "active";
        (active && instance.sh("test -s /var/lib/rollwave-server/operator.token").1).then_some(())
    });
    assert_eq!(
        instance.sh_ok("stat -c '%U %a' /var/lib/rollwave-server /var/lib/rollwave-server/ca.key"),
        "rollwave 700\nrollwave 600"
    );
    assert_eq!(
        instance.sh_ok("stat -c %U /proc/$(systemctl show -p MainPID --value rollwave-server)"),
        "rollwave"
    );
    // Enough file descriptors for the default connection cap (10000), and a database only
    // the coordinator reads.
    assert_eq!(
        instance.sh_ok(
            "grep 'Max open files' /proc/$(systemctl show -p MainPID --value rollwave-server)/limits | awk '{print $4}'"
        ),
        "16384"
    );
    assert_eq!(
        instance.sh_ok("stat -c %a /var/lib/rollwave-server/rollwave.db /var/lib/rollwave-server/server.lock"),
        "600\n600"
    );
    // The packaged CLI talks to the packaged server.
    let listed = wait_long("the packaged CLI to reach the server", || {
        let (text, ok) = instance.sh("rollwave --config /var/lib/rollwave-server/cli.toml stack list");
        ok.then_some(text)
    });
    println!("hosts: stack list on the packaged server: {listed:?}");
    let ca = instance.sh_ok("sha256sum /var/lib/rollwave-server/ca.pem");
    // Reinstalling (what an upgrade does) keeps the data and restarts the server.
    instance.sh_ok(&format!("dpkg -i /root/{file_name}"));
    assert_eq!(
        instance.sh_ok("sha256sum /var/lib/rollwave-server/ca.pem"),
        ca,
        "same CA"
    );
    wait_long("rollwave-server to be active again", || {
        (instance.unit_property("rollwave-server.service", "ActiveState") == "active").then_some(())
    });
    instance.sh_ok("dpkg --remove rollwave");
    assert_eq!(
        instance.unit_property("rollwave-server.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(
        instance.sh_ok("sha256sum /var/lib/rollwave-server/ca.pem"),
        ca,
        "removal keeps the CA"
    );
}
