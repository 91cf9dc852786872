//! A fleet for deployment scenarios: a [`Cluster`] with stack `web`, a versioned bucket, releases
//! of bundle `app` built and pushed through the CLI, and what the agents themselves recorded (their
//! `current` links and install journals), so tests check the coordinator against the instances.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::{Cluster, S3Bucket, wait_for};

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
        self.cluster.coordinator.try_cli(&args)
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
        let output = self.try_deploy(version, extra);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let started: Value = serde_json::from_slice(&output.stdout).expect("deployment JSON");
        started["id"].as_str().expect("id").to_owned()
    }

    pub fn show(&self, id: &str) -> Value {
        self.cluster.coordinator.cli_json(&["deployment", "show", id])
    }

    /// Waits (up to a few minutes) until the deployment ends; returns it.
    pub fn wait_finished(&self, id: &str) -> Value {
        let started = std::time::Instant::now();
        loop {
            let shown = self.show(id);
            if shown["status"] != "running" {
                return shown;
            }
            assert!(
                started.elapsed() < std::time::Duration::from_secs(240),
                "deployment {id} still running: {shown}"
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }

    pub fn switches_to(&self, index: usize, version: &str) -> usize {
        self.activations(index)
            .iter()
            .filter(|(switched, _)| switched == version)
            .count()
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
