//! A fleet for deployment scenarios: a [`Cluster`] with stack `web`, a versioned bucket, releases
//! of bundle `app` built and pushed through the CLI, and what the agents themselves recorded (their
//! `current` links and install journals), so tests check the coordinator against the instances.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Cluster, Coordinator, S3Bucket, wait_for};

/// How long a test deployment may run before the test gives up on it.
const DEPLOYMENT_DEADLINE: Duration = Duration::from_secs(240);

/// A stack `web` with agents, a bucket, and releases of bundle `app`.
pub struct Fleet {
    pub cluster: Cluster,
    pub bucket: S3Bucket,
    pub work: tempfile::TempDir,
}

impl Fleet {
    pub fn start(agents: usize) -> Self {
        Self {
            cluster: Cluster::start(agents),
            bucket: S3Bucket::versioned(),
            work: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn control(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Builds and pushes app@version; its health check fails while control/unhealthy-<version> exists.
    pub fn push(&self, version: &str) {
        let source = self.work.path().join(format!("src-{version}"));
        std::fs::create_dir_all(&source).expect("source");
        std::fs::write(source.join("VERSION"), version).expect("version file");
        std::fs::write(
            source.join("rollwave.toml"),
            format!(
                "[[health]]\ncommand = \"test ! -e {}\"\ntimeout = \"5s\"\n",
                self.control(&format!("unhealthy-{version}")).display()
            ),
        )
        .expect("manifest");
        self.push_source(version, &source);
    }

    /// Builds app@version from `source` (a directory with its rollwave.toml) and pushes it.
    pub fn push_source(&self, version: &str, source: &Path) {
        let archive = self.work.path().join(format!("app-{version}.zip"));
        rollwave_release::build_from_dir(source, &archive).expect("build");
        let mut args = vec![
            "release".to_owned(),
            "push".to_owned(),
            archive.display().to_string(),
            "--bundle".to_owned(),
            "app".to_owned(),
            "--version".to_owned(),
            version.to_owned(),
        ];
        args.extend(self.bucket.push_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let output = self.cluster.coordinator.try_cli(&args);
        assert!(
            output.status.success(),
            "push: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub fn try_deploy(&self, version: &str, extra: &[&str]) -> Output {
        try_deploy(&self.cluster.coordinator, version, extra)
    }

    /// Deploys and watches to the end; returns the final deployment.
    pub fn deploy_and_watch(&self, version: &str, extra: &[&str]) -> (bool, Value) {
        let mut args = vec!["--watch"];
        args.extend(extra);
        let output = self.try_deploy(version, &args);
        let deployment: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "deploy --watch --output json printed no deployment ({error}): {}\n{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.success(), deployment)
    }

    pub fn agent_root(&self, index: usize) -> PathBuf {
        self.cluster.agents[index].dir.join("state")
    }

    pub fn current(&self, index: usize) -> Option<String> {
        std::fs::read_link(self.agent_root(index).join("releases/app/current"))
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    }

    /// (version, unix ms) of every activation the agent recorded.
    pub fn activations(&self, index: usize) -> Vec<(String, i64)> {
        activations_in(&self.agent_root(index))
    }

    pub fn instance_id(&self, index: usize) -> String {
        self.cluster.agents[index].identity()["instance_id"]
            .as_str()
            .expect("instance id")
            .to_owned()
    }

    pub fn index_of(&self, instance_id: &str) -> usize {
        (0..self.cluster.agents.len())
            .find(|index| self.instance_id(*index) == instance_id)
            .unwrap_or_else(|| panic!("no agent is {instance_id}"))
    }

    pub fn wait_all_on(&self, version: &str) {
        for index in 0..self.cluster.agents.len() {
            wait_for(&format!("agent {index} to run {version}"), || {
                (self.current(index).as_deref() == Some(version)).then_some(())
            });
        }
    }

    pub fn status(&self) -> Value {
        self.cluster.coordinator.cli_json(&["status", "web"])
    }

    /// Starts a deployment without watching; returns its id.
    pub fn start_deployment(&self, version: &str, extra: &[&str]) -> String {
        start_deployment(&self.cluster.coordinator, version, extra)
    }

    pub fn show(&self, id: &str) -> Value {
        show_deployment(&self.cluster.coordinator, id)
    }

    /// Waits (up to a few minutes) until the deployment ends; returns it.
    pub fn wait_finished(&self, id: &str) -> Value {
        wait_deployment_finished(&self.cluster.coordinator, id)
    }

    pub fn switches_to(&self, index: usize, version: &str) -> usize {
        self.activations(index)
            .iter()
            .filter(|(switched, _)| switched == version)
            .count()
    }
}

/// `rollwave deploy web app@<version>` with a 1 s minimum healthy time and JSON
/// output, plus `extra` flags; for fleets of any shape (agent processes or container hosts).
pub fn try_deploy(coordinator: &Coordinator, version: &str, extra: &[&str]) -> Output {
    let release = format!("app@{version}");
    let mut args = vec![
        "deploy",
        "web",
        &release,
        "--min-healthy-time",
        "1s",
        "--output",
        "json",
    ];
    args.extend(extra);
    coordinator.try_cli(&args)
}

/// Starts a deployment of app@version without watching; returns its id.
pub fn start_deployment(coordinator: &Coordinator, version: &str, extra: &[&str]) -> String {
    let output = try_deploy(coordinator, version, extra);
    assert!(
        output.status.success(),
        "deploy app@{version}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let started: Value = serde_json::from_slice(&output.stdout).expect("deployment JSON");
    started["id"].as_str().expect("deployment id").to_owned()
}

/// `rollwave deployment show ID`.
pub fn show_deployment(coordinator: &Coordinator, id: &str) -> Value {
    coordinator.cli_json(&["deployment", "show", id])
}

/// Waits (up to [`DEPLOYMENT_DEADLINE`]) until the deployment ends; returns it.
pub fn wait_deployment_finished(coordinator: &Coordinator, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let shown = show_deployment(coordinator, id);
        if shown["status"] != "running" {
            return shown;
        }
        assert!(
            started.elapsed() < DEPLOYMENT_DEADLINE,
            "deployment {id} still running after {DEPLOYMENT_DEADLINE:?}: {shown}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

pub fn activations_in(root: &Path) -> Vec<(String, i64)> {
    let Ok(text) = std::fs::read_to_string(root.join("state/journal/app.json")) else {
        return Vec::new();
    };
    let journal: Value = serde_json::from_str(&text).expect("journal JSON");
    journal["history"]
        .as_array()
        .map(|history| {
            history
                .iter()
                .map(|entry| {
                    (
                        entry["version"].as_str().unwrap_or_default().to_owned(),
                        entry["at_unix_ms"].as_i64().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn wave_instances(deployment: &Value, wave: usize) -> Vec<String> {
    deployment["waves"][wave]["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|instance| {
            // A plan lists ids; a deployment lists instances with their state.
            instance
                .as_str()
                .or_else(|| instance["instance_id"].as_str())
                .expect("instance id")
                .to_owned()
        })
        .collect()
}

pub fn bundle_status<'a>(status: &'a Value, bundle: &str) -> &'a Value {
    status["bundles"]
        .as_array()
        .expect("bundles")
        .iter()
        .find(|entry| entry["bundle"] == bundle)
        .unwrap_or_else(|| panic!("no {bundle} in {status}"))
}
