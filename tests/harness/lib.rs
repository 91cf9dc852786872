//! The end-to-end harness: real `rollwave` and `rollwave-agent` processes on
//! loopback, each in its own temp dir, killed when the test ends (pass or
//! fail). Waiting is always on a condition with a deadline, never a sleep.
//! `s3` adds buckets on the S3 server that `tests/run` starts; `fleet` builds
//! deployment scenarios on both.

pub mod fleet;
pub mod haproxy;
pub mod hosts;
pub mod load;
pub mod s3;

pub use fleet::Fleet;
pub use s3::S3Bucket;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any single wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Where cargo put the binaries under test: the target dir of this test binary.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/e2e-HASH -> target/debug/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which tests/run does)",
        path.display()
    );
    path
}

/// The Python of the test tools venv (gRPC client, moto, boto3), which `tests/run` sets up.
pub fn test_python() -> String {
    std::env::var("ROLLWAVE_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("ROLLWAVE_TEST_PYTHON is not set: run the suite through tests/run, which installs the Python test tools")
    })
}

/// Environment variables that point the CLI at a coordinator or a bucket;
/// removed from every CLI run so a developer's shell cannot leak into a test.
const CLI_SETTINGS_VARS: &[&str] = &[
    "ROLLWAVE_ADDR",
    "ROLLWAVE_TOKEN",
    "ROLLWAVE_CA",
    "ROLLWAVE_CONFIG",
    "ROLLWAVE_S3_BUCKET",
    "ROLLWAVE_S3_ENDPOINT",
    "ROLLWAVE_S3_REGION",
    "ROLLWAVE_S3_PATH_STYLE",
];

/// A `rollwave` command with no coordinator settings at all, plus `env`.
fn rollwave_command(env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary("rollwave"));
    for name in CLI_SETTINGS_VARS {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command
}

/// Runs the CLI without any coordinator (for commands such as `release build`).
pub fn try_rollwave_offline(args: &[&str]) -> Output {
    rollwave_command(&[]).args(args).output().expect("run rollwave")
}

/// Polls `condition` until it returns `Some`, or panics naming `what`.
pub fn wait_for<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Process {
    /// Starts `command` with stdout and stderr going to `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).expect("create log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {command:?}: {error}"));
        Self {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit code, once the process has exited by itself.
    pub fn try_exit_code(&mut self) -> Option<i32> {
        let child = self.child.as_mut()?;
        child
            .try_wait()
            .expect("poll child")
            .map(|status| status.code().unwrap_or(-1))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings for a coordinator under test: short timers so tests are quick.
#[derive(Debug, Clone)]
pub struct CoordinatorSettings {
    pub heartbeat_interval: &'static str,
    pub offline_after: &'static str,
    pub extra_args: Vec<String>,
    /// `--listen`: loopback with a free port, unless a test network needs another address.
    pub listen: String,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: "500ms",
            offline_after: "2s",
            extra_args: Vec::new(),
            listen: "127.0.0.1:0".into(),
        }
    }
}

/// A real `rollwave server` process.
#[derive(Debug)]
pub struct Coordinator {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    settings: CoordinatorSettings,
    process: Process,
    starts: u32,
}

impl Coordinator {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, CoordinatorSettings::default())
    }

    pub fn start_with(dir: &Path, settings: CoordinatorSettings) -> Self {
        let dir = dir.join("coordinator");
        std::fs::create_dir_all(&dir).expect("coordinator dir");
        let process = Self::spawn(&dir, &settings.listen, &settings, 0);
        let config = dir.join("data/cli.toml");
        let addr = wait_for("the coordinator to write cli.toml", || {
            let text = std::fs::read_to_string(&config).ok()?;
            let value: toml::Value = toml::from_str(&text).ok()?;
            value.get("addr")?.as_str()?.parse().ok()
        });
        let coordinator = Self {
            dir,
            addr,
            settings,
            process,
            starts: 1,
        };
        coordinator.wait_ready();
        coordinator
    }

    fn spawn(dir: &Path, listen: &str, settings: &CoordinatorSettings, generation: u32) -> Process {
        let mut command = Command::new(binary("rollwave"));
        command
            .arg("server")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--listen")
            .arg(listen)
            .arg("--heartbeat-interval")
            .arg(settings.heartbeat_interval)
            .arg("--offline-after")
            .arg(settings.offline_after)
            .args(&settings.extra_args)
            .env("RUST_LOG", "info");
        Process::spawn(command, dir.join(format!("server-{generation}.log")))
    }

    fn wait_ready(&self) {
        wait_for("the coordinator to answer", || {
            self.try_cli(&["stack", "list"]).status.success().then_some(())
        });
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.data_dir().join("ca.pem")).expect("ca.pem")
    }

    pub fn operator_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("operator.token"))
            .expect("operator.token")
            .trim()
            .to_owned()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Starts again on the same data dir and port.
    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(&self.dir, &self.addr.to_string(), &self.settings, self.starts);
        self.starts += 1;
        self.wait_ready();
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Runs the CLI against this coordinator.
    pub fn try_cli(&self, args: &[&str]) -> Output {
        self.try_cli_with_env(args, &[])
    }

    /// Runs the CLI against this coordinator with extra environment variables
    /// (`ROLLWAVE_S3_BUCKET`, say). The AWS test credentials that `tests/run`
    /// exports are inherited.
    pub fn try_cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        rollwave_command(env)
            .arg("--config")
            .arg(self.data_dir().join("cli.toml"))
            .args(args)
            .output()
            .expect("run rollwave")
    }

    /// Runs the CLI and returns stdout; panics with stderr on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.try_cli(args);
        assert!(
            output.status.success(),
            "rollwave {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("utf-8 output")
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&self.cli(&all)).expect("valid JSON output")
    }

    pub fn create_stack(&self, name: &str) {
        self.cli(&["stack", "create", name, "--stage", "production"]);
    }

    pub fn create_token(&self, stack: &str, uses: u32, ttl: &str) -> String {
        self.cli(&[
            "token",
            "create",
            "--stack",
            stack,
            "--uses",
            &uses.to_string(),
            "--ttl",
            ttl,
        ])
        .trim()
        .to_owned()
    }

    pub fn instances(&self) -> Vec<Value> {
        match self.cli_json(&["instance", "list"]) {
            Value::Array(items) => items,
            other => panic!("instance list is not an array: {other}"),
        }
    }

    /// The instance whose hostname is `hostname`, once it exists.
    pub fn instance_by_hostname(&self, hostname: &str) -> Option<Value> {
        self.instances()
            .into_iter()
            .find(|instance| instance["hostname"] == hostname)
    }

    pub fn wait_presence(&self, hostname: &str, presence: &str) -> Value {
        wait_for(&format!("{hostname} to be {presence}"), || {
            self.instance_by_hostname(hostname)
                .filter(|instance| instance["presence"] == presence)
        })
    }
}

/// How an agent under test is configured.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub name: String,
    pub zone: String,
    pub token: String,
    pub stack: Option<String>,
    pub coordinator: SocketAddr,
}

/// A real `rollwave-agent run` process with its own state and TLS dirs.
#[derive(Debug)]
pub struct Agent {
    pub spec: AgentSpec,
    pub dir: PathBuf,
    process: Process,
    starts: u32,
}

impl Agent {
    pub fn start(parent: &Path, spec: AgentSpec) -> Self {
        Self::start_with(parent, spec, None, |config| config)
    }

    /// Starts a second host holding a copy of `holder`'s TLS dir (its identity):
    /// an image baked after joining, say. Its own state dir, config and hostname.
    pub fn start_with_identity_of(parent: &Path, spec: AgentSpec, holder: &Agent) -> Self {
        Self::start_with(parent, spec, Some(&holder.dir.join("tls")), |config| config)
    }

    /// Starts an agent, with a copy of the TLS dir `tls_from` if given, whose agent.toml `edit`
    /// rewrites first (the default one is passed in).
    pub fn start_with(
        parent: &Path,
        spec: AgentSpec,
        tls_from: Option<&Path>,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let dir = parent.join(&spec.name);
        std::fs::create_dir_all(&dir).expect("agent dir");
        if let Some(source) = tls_from {
            let tls = dir.join("tls");
            std::fs::create_dir_all(&tls).expect("tls dir");
            for entry in std::fs::read_dir(source).expect("read holder's tls dir") {
                let entry = entry.expect("tls dir entry");
                std::fs::copy(entry.path(), tls.join(entry.file_name())).expect("copy identity");
            }
        }
        let stack_line = spec
            .stack
            .as_ref()
            .map(|stack| format!("stack = \"{stack}\"\n"))
            .unwrap_or_default();
        let config = format!(
            "coordinator = \"{}\"\njoin_token = \"{}\"\n{stack_line}layer = \"web\"\nzone = \"{}\"\nhostname = \"{}\"\n\
             state_dir = \"{}\"\ntls_dir = \"{}\"\nimds = \"off\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"1s\"\n",
            spec.coordinator,
            spec.token,
            spec.zone,
            spec.name,
            dir.join("state").display(),
            dir.join("tls").display(),
        );
        // Releases come from the S3 server tests/run starts; a short health deadline keeps
        // failing releases quick to refuse.
        let mut config = config;
        if let Ok(endpoint) = std::env::var(s3::ENDPOINT_VAR) {
            config.push_str(&format!("[s3]\nendpoint = \"{endpoint}\"\nforce_path_style = true\n"));
        }
        config.push_str("[install]\nhealth_deadline = \"5s\"\n");
        std::fs::write(dir.join("agent.toml"), edit(config)).expect("agent.toml");
        let process = Self::spawn(&dir, 0);
        Self {
            spec,
            dir,
            process,
            starts: 1,
        }
    }

    fn spawn(dir: &Path, generation: u32) -> Process {
        let mut command = Command::new(binary("rollwave-agent"));
        command
            .arg("run")
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .env("RUST_LOG", "info");
        Process::spawn(command, dir.join(format!("agent-{generation}.log")))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the agent process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.process.pid()).expect("pid fits i32");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal the agent");
    }

    pub fn restart(&mut self) {
        self.process.kill();
        self.process = Self::spawn(&self.dir, self.starts);
        self.starts += 1;
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// Waits until the agent exits by itself; returns its exit code.
    pub fn wait_exit(&mut self) -> i32 {
        let name = self.spec.name.clone();
        wait_for(&format!("agent {name} to exit"), || self.process.try_exit_code())
    }

    pub fn try_exit_code(&mut self) -> Option<i32> {
        self.process.try_exit_code()
    }

    /// The identity file the agent wrote after joining.
    pub fn identity(&self) -> toml::Value {
        let text = std::fs::read_to_string(self.dir.join("tls/identity.toml")).expect("identity.toml");
        toml::from_str(&text).expect("identity.toml parses")
    }
}

/// A fleet: one coordinator, one stack, agents spread over zones.
#[derive(Debug)]
pub struct Cluster {
    pub temp: tempfile::TempDir,
    pub coordinator: Coordinator,
    pub agents: Vec<Agent>,
    pub stack: String,
}

impl Cluster {
    /// A coordinator with stack `web` and `n_agents` agents in zones z1..z3, all online.
    pub fn start(n_agents: usize) -> Self {
        let temp = tempfile::Builder::new()
            .prefix("rollwave-e2e-")
            .tempdir()
            .expect("temp dir");
        let coordinator = Coordinator::start(temp.path());
        coordinator.create_stack("web");
        let mut cluster = Self {
            temp,
            coordinator,
            agents: Vec::new(),
            stack: "web".into(),
        };
        if n_agents > 0 {
            let token = cluster
                .coordinator
                .create_token("web", u32::try_from(n_agents).expect("few agents"), "10m");
            for index in 0..n_agents {
                cluster.add_agent(&format!("agent-{index}"), &format!("z{}", index % 3 + 1), &token);
            }
            for agent in &cluster.agents {
                cluster.coordinator.wait_presence(&agent.spec.name, "online");
            }
        }
        cluster
    }

    pub fn add_agent(&mut self, name: &str, zone: &str, token: &str) -> &mut Agent {
        self.add_agent_with(name, zone, token, |config| config)
    }

    /// Adds an agent whose agent.toml `edit` rewrites first.
    pub fn add_agent_with(
        &mut self,
        name: &str,
        zone: &str,
        token: &str,
        edit: impl FnOnce(String) -> String,
    ) -> &mut Agent {
        let spec = AgentSpec {
            name: name.into(),
            zone: zone.into(),
            token: token.into(),
            stack: Some(self.stack.clone()),
            coordinator: self.coordinator.addr,
        };
        self.agents.push(Agent::start_with(self.temp.path(), spec, None, edit));
        self.agents.last_mut().expect("just pushed")
    }
}
