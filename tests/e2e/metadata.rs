//! `imds = "off"` means the agent never asks the EC2 instance metadata
//! service, not even through the AWS SDK's region and credential chains. The
//! agent runs in a network namespace of the test's own with only loopback,
//! which also carries the metadata address (169.254.169.254), where a
//! listener counts connections (this kernel has no dummy interfaces). The same setup with `imds = "auto"`
//! shows that the listener does count what an agent sends there.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use rollwave_tests::{Process, binary, test_python, wait_for};

const METADATA_ADDRESS: &str = "169.254.169.254";

/// Counts TCP connections to the metadata address, closing each at once (so an SDK
/// that tries gives up quickly instead of waiting out its timeouts).
const LISTENER: &str = r#"
import socket, sys
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], 80))
listener.listen(64)
print("listening", flush=True)
while True:
    connection, peer = listener.accept()
    print("connection", peer, flush=True)
    connection.close()
"#;

/// A network namespace with only loopback (which also holds the metadata address);
/// deleted when dropped (drop the processes inside it first).
struct Namespace {
    name: String,
}

impl Namespace {
    fn create() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("rwimds-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name]);
        let namespace = Self { name };
        namespace.ip(&["link", "set", "lo", "up"]);
        namespace.ip(&["addr", "add", &format!("{METADATA_ADDRESS}/32"), "dev", "lo"]);
        // Nothing is routed anywhere: no interface but loopback, no route in the main table.
        let links = output("ip", &["-n", &namespace.name, "-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "only loopback in the namespace:\n{links}");
        let routes = output("ip", &["-n", &namespace.name, "route", "show"]);
        assert!(
            routes.trim().is_empty(),
            "the namespace must have no routes, found:\n{routes}"
        );
        namespace
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// `program args` inside the namespace.
    fn command(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program).args(args);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

fn output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn run(program: &str, args: &[&str]) {
    output(program, args);
}

/// An install of `web` a crash interrupted while it downloaded from S3: the agent
/// resumes it at start, so its S3 client must find credentials (the SDK's default
/// chain ends with the metadata service).
fn interrupted_download_journal(state_dir: &Path) {
    let journal = serde_json::json!({
        "install": {
            "job": {
                "bundle": "web", "version": "1.0", "sha256": "ab".repeat(32), "goal": "activate",
                "run_hooks": false, "ignore_stop_failure": false, "previous": null, "already_prepared": false
            },
            "state": { "state": "running", "stage": "fetch", "failure": null },
            "source": { "kind": "s3", "bucket": "releases", "key": "web/1.0.zip", "version_id": null, "size": 100 },
            "deployment_id": null,
            "hook_group": null
        },
        "prepared": {},
        "history": []
    });
    let dir = state_dir.join("state/journal");
    std::fs::create_dir_all(&dir).expect("journal dir");
    std::fs::write(dir.join("web.json"), journal.to_string()).expect("write journal");
}

/// Runs an agent with `imds` (and no S3 region, no AWS credentials) until it has
/// built its S3 client and tried to resume the download; returns how many
/// connections reached the metadata address.
fn metadata_connections(imds: &str) -> usize {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_dir = dir.path().join("state");
    interrupted_download_journal(&state_dir);
    let config = dir.path().join("agent.toml");
    let token = format!("rwt1.token1.secret1.{}", "cd".repeat(32));
    std::fs::write(
        &config,
        format!(
            "coordinator = \"127.0.0.1:9\"\njoin_token = \"{token}\"\nstack = \"web\"\n\
             state_dir = \"{state}\"\ntls_dir = \"{tls}\"\nimds = \"{imds}\"\n\n\
             [s3]\nendpoint = \"http://127.0.0.1:9\"\nforce_path_style = true\n",
            state = state_dir.display(),
            tls = dir.path().join("tls").display(),
        ),
    )
    .expect("write agent.toml");

    let namespace = Namespace::create();
    let python = test_python();
    let listener = Process::spawn(
        namespace.command(Path::new(&python), &["-c", LISTENER, METADATA_ADDRESS]),
        dir.path().join("listener.log"),
    );
    wait_for("the metadata listener", || {
        listener.log_text().contains("listening").then_some(())
    });
    let mut command = namespace.command(&binary("rollwave-agent"), &["run", "--config"]);
    command.arg(&config);
    // Nothing from the test's environment: no region, no credentials, no
    // AWS_EC2_METADATA_DISABLED, no profile of the machine.
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("AWS_CONFIG_FILE", dir.path().join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("no-aws-credentials"))
        .env("RUST_LOG", "info");
    let agent = Process::spawn(command, dir.path().join("agent.log"));
    // Its first download attempt has been through the credential chain (after the
    // region chain, which runs when the client is built).
    wait_for("the agent's first attempt to resume the download", || {
        agent
            .log_text()
            .contains("download interrupted; will resume")
            .then_some(())
    });
    let connections = listener.log_text().matches("connection").count();
    drop(agent);
    drop(listener);
    drop(namespace);
    connections
}

/// The field trial: without `[s3] region`, an agent with `imds = "off"` still asked
/// 169.254.169.254 (the SDK's region chain ends there, and so does its credential chain).
#[test]
fn an_agent_with_imds_off_never_contacts_the_metadata_service() {
    assert_eq!(
        metadata_connections("off"),
        0,
        "imds = \"off\": no connection may reach the metadata service"
    );
    // The same setup counts the connections of an agent that may ask.
    assert!(
        metadata_connections("auto") > 0,
        "imds = \"auto\" asks for the instance id and zone: the listener must see it"
    );
}
