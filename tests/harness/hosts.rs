//! Container hosts for the end-to-end tests: Debian instances that boot a real
//! systemd as PID 1 under `systemd-nspawn -b`, each in its own network namespace
//! on a private test network, driven with `nsenter`, with the coordinator and an
//! S3 server (moto) in a control namespace on the same network.
//!
//! Network rule: the test network is [`SUBNET`]; a blackhole route for it is
//! added in the root namespace before anything else exists, so nothing addressed
//! to it can leave the machine. The bridge lives inside the control namespace, so
//! the root namespace holds no link of the test at all. Everything (containers,
//! overlays, namespaces, the route, processes) is removed on drop, also when a
//! test fails, and leftovers of a crashed run are removed before the next starts.
//!
//! Cgroup rule: every container runs in its own cgroup (`rollwave-hosts/<name>` in
//! each hierarchy systemd manages, see [`ContainerCgroup`]). PID 1 of these machines
//! is not systemd, so `systemd-nspawn --keep-unit` would otherwise create its
//! `payload/` cgroup at the root for every container alike: five systemd instances
//! would then share `/payload/system.slice/<unit>`, and stopping an app in one
//! container fails with EIO on the other containers' processes in the same cgroup.
//!
//! The test thread itself moves into the control namespace ([`Lab::start`]):
//! every process it starts from then on (coordinator, CLI, curl) is on the test
//! network, as an operator's machine would be; it moves back to the root
//! namespace before the cleanup.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde_json::Value;

use crate::{Coordinator, CoordinatorSettings, Process, binary, wait_for};

/// The test network: one /24 inside 10.0.0.0/8 that nothing else on these machines uses.
pub const SUBNET: &str = "10.231.77.0/24";
/// The control namespace's address on the test network (coordinator, S3 server).
pub const CONTROL_IP: &str = "10.231.77.1";
/// Every namespace and machine of these tests starts with this, so leftovers are found.
const PREFIX: &str = "rwh-";
const CONTROL_NETNS: &str = "rwh-ctl";
const BRIDGE: &str = "br0";
const S3_PORT: u16 = 9000;
/// Overlays, logs and the pid record of the running containers.
const WORK_BASE: &str = "/var/tmp/rollwave-hosts";
/// Where the bucket keeps the agent packages (public-read, so plain http:// works too).
const PACKAGE_KEY_PREFIX: &str = "packages";
/// Under this cgroup, in each hierarchy systemd manages, every container gets its own.
const CGROUP_BASE: &str = "rollwave-hosts";
/// How long the processes of a stopped container may take to leave its cgroup.
const CGROUP_EMPTY_DEADLINE: Duration = Duration::from_secs(10);
/// Boots take well under a second here; installs and deployments take longer.
pub const HOST_DEADLINE: Duration = Duration::from_secs(120);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_owned()
}

/// Runs a program to completion; panics if it cannot start.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("run {program} {args:?}: {error}"))
}

/// Runs a program and panics with its output unless it succeeds; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Fails the test (never skips) when a tool the container tests need is missing.
fn require_tools() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the container-host tests need root (network namespaces, mounts, systemd-nspawn)"
    );
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("debootstrap", "debootstrap"),
        ("nsenter", "util-linux"),
        ("ip", "iproute2"),
        ("curl", "curl"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        assert!(
            found,
            "{tool} is missing: apt-get install -y --no-install-recommends {package} (tests/run installs it)"
        );
    }
}

/// The cached Debian root every instance boots from (built by tests/hosts/rootfs.sh).
fn cached_root() -> PathBuf {
    let script = repo_root().join("tests/hosts/rootfs.sh");
    let started = Instant::now();
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|error| panic!("run {}: {error}", script.display()));
    assert!(
        output.status.success(),
        "{} failed: {}",
        script.display(),
        output.status
    );
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if started.elapsed() > Duration::from_secs(5) {
        println!(
            "hosts: built the Debian root in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    assert!(
        path.join("usr/lib/systemd/systemd").exists(),
        "{} has no systemd",
        path.display()
    );
    path
}

/// The Debian packages built by tests/hosts/packages.sh from the binaries under test.
#[derive(Debug, Clone)]
pub struct Packages {
    /// rollwave-agent, revision 1: what instances bootstrap with.
    pub agent: PathBuf,
    /// The same agent, revision 2: the upgrade.
    pub agent_upgrade: PathBuf,
    /// rollwave (the coordinator).
    pub server: PathBuf,
}

impl Packages {
    pub fn find() -> Self {
        let target = binary("rollwave-agent")
            .parent()
            .and_then(Path::parent)
            .expect("binaries live in target/<profile>")
            .to_owned();
        let dir = target.join("debian/hosts");
        let find = |prefix: &str| -> PathBuf {
            std::fs::read_dir(&dir)
                .ok()
                .and_then(|entries| {
                    entries.filter_map(Result::ok).map(|entry| entry.path()).find(|path| {
                        path.file_name()
                            .and_then(|name| name.to_str())
                            .is_some_and(|name| name.starts_with(prefix) && name.ends_with(".deb"))
                    })
                })
                .unwrap_or_else(|| {
                    panic!(
                        "no {prefix}*.deb in {}: run tests/hosts/packages.sh after building the binaries \
                         (tests/run does both)",
                        dir.display()
                    )
                })
        };
        let packages = Self {
            agent: find("rollwave-agent_0.1.0-1_"),
            agent_upgrade: find("rollwave-agent_0.1.0-2_"),
            server: find("rollwave_"),
        };
        // The packages must hold the binaries under test, not an older build.
        let built = std::fs::metadata(binary("rollwave-agent"))
            .and_then(|meta| meta.modified())
            .expect("agent binary mtime");
        let packed = std::fs::metadata(&packages.agent)
            .and_then(|meta| meta.modified())
            .expect("package mtime");
        assert!(
            packed >= built,
            "{} is older than the agent binary: run tests/hosts/packages.sh again",
            packages.agent.display()
        );
        packages
    }
}

pub fn sha256_of(path: &Path) -> String {
    run_ok("sha256sum", &[&path.display().to_string()])
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// Pids of the containers this machine's tests started, so a crashed run's are found.
fn pid_record() -> PathBuf {
    Path::new(WORK_BASE).join("nspawn.pids")
}

fn record_pid(pid: u32) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(pid_record())
        .expect("open the pid record");
    writeln!(file, "{pid}").expect("record a pid");
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\0', " "))
        .unwrap_or_default()
}

/// A cgroup hierarchy that a container's systemd manages: the named v1
/// hierarchy `name=systemd` (hybrid and legacy layouts) or the cgroup2 one.
#[derive(Debug, Clone)]
struct Hierarchy {
    /// Where it is mounted, e.g. `/sys/fs/cgroup/unified`.
    mount_point: PathBuf,
    /// The subtree of the hierarchy that mount shows (`/` unless the mount is a bind of a subtree).
    mount_root: String,
    /// Its key in `/proc/<pid>/cgroup`: `name=systemd`, or empty for cgroup2.
    key: &'static str,
}

impl Hierarchy {
    /// Every mounted `name=systemd` and cgroup2 hierarchy, from `/proc/self/mountinfo`.
    fn all() -> Vec<Self> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
        let mut found: Vec<Self> = Vec::new();
        for line in mounts.lines() {
            // "id parent major:minor root mount-point options [optional fields] - type source super-options"
            let Some((before, after)) = line.split_once(" - ") else {
                continue;
            };
            let fields: Vec<&str> = before.split(' ').collect();
            let tail: Vec<&str> = after.split(' ').collect();
            let (Some(root), Some(point), Some(kind), Some(options)) =
                (fields.get(3), fields.get(4), tail.first(), tail.get(2))
            else {
                continue;
            };
            let key = match *kind {
                "cgroup2" => "",
                "cgroup" if options.split(',').any(|option| option == "name=systemd") => "name=systemd",
                _ => continue,
            };
            // A hierarchy mounted twice is used once.
            if found.iter().any(|known| known.key == key) {
                continue;
            }
            found.push(Self {
                mount_point: PathBuf::from(point),
                mount_root: (*root).to_owned(),
                key,
            });
        }
        found
    }

    fn base(&self) -> PathBuf {
        self.mount_point.join(CGROUP_BASE)
    }
}

/// One container's own cgroup, `rollwave-hosts/<name>` in every hierarchy systemd manages
/// (see the module's cgroup rule). systemd-nspawn is started inside it (through `sh`,
/// which moves itself there and execs nspawn: no `pre_exec` without `unsafe`) and
/// puts itself in `supervisor/` and the container in `payload/` below it.
#[derive(Debug)]
struct ContainerCgroup {
    name: String,
    hierarchies: Vec<Hierarchy>,
}

impl ContainerCgroup {
    /// Creates the cgroup in every hierarchy, after removing what an earlier boot left;
    /// fails the test, naming the cause, if it cannot.
    fn create(name: &str) -> Self {
        let hierarchies = Hierarchy::all();
        assert!(
            !hierarchies.is_empty(),
            "no name=systemd or cgroup2 hierarchy is mounted (see /proc/self/mountinfo): the container-host \
             tests give each container its own cgroup so their systemd instances do not share units; \
             mount one (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        );
        let cgroup = Self {
            name: name.to_owned(),
            hierarchies,
        };
        if let Err(error) = cgroup.remove() {
            panic!("{name}: the cgroup of its previous boot is still in use: {error}");
        }
        for dir in cgroup.dirs() {
            std::fs::create_dir_all(&dir).unwrap_or_else(|error| {
                panic!(
                    "cannot create the cgroup {}: {error}. The container-host tests give each container \
                     its own cgroup (otherwise the containers' systemd instances share units and \
                     stopping one container's app fails with EIO); they need root and a writable \
                     cgroup hierarchy",
                    dir.display()
                )
            });
        }
        cgroup
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|hierarchy| hierarchy.base().join(&self.name))
            .collect()
    }

    /// `program args…` as a command that first moves itself into this cgroup.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(
                r#"while [ "$1" != -- ]; do echo $$ > "$1" || { echo "cannot join the cgroup $1" >&2; exit 125; }; shift; done; shift; exec "$@""#,
            )
            .arg("sh");
        for dir in self.dirs() {
            command.arg(dir.join("cgroup.procs"));
        }
        command.arg("--").arg(program);
        command
    }

    /// Fails the test unless `pid` (the container's PID 1) runs inside this cgroup.
    fn assert_contains(&self, pid: u32) {
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        for hierarchy in &self.hierarchies {
            let expected = format!(
                "{}/{CGROUP_BASE}/{}/",
                hierarchy.mount_root.trim_end_matches('/'),
                self.name
            );
            let actual = membership.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, key, path) = (parts.next()?, parts.next()?, parts.next()?);
                (key == hierarchy.key).then_some(path)
            });
            assert!(
                actual.is_some_and(|path| path.starts_with(&expected)),
                "{}: its systemd runs in cgroup {actual:?} of hierarchy {:?}, not under {expected}",
                self.name,
                hierarchy.mount_point
            );
        }
    }

    /// Removes the cgroup and what the container's systemd created below it, waiting
    /// (up to [`CGROUP_EMPTY_DEADLINE`]) for its last processes to exit.
    fn remove(&self) -> Result<(), String> {
        for dir in self.dirs() {
            remove_cgroup_tree(&dir)?;
        }
        Ok(())
    }
}

/// Removes a cgroup directory and its children, deepest first (a cgroup is removed
/// with rmdir once no process is left in it).
fn remove_cgroup_tree(dir: &Path) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match remove_cgroup_dirs(dir) {
            Ok(()) => return Ok(()),
            Err(error) if started.elapsed() > CGROUP_EMPTY_DEADLINE => {
                return Err(format!(
                    "cannot remove {} after {CGROUP_EMPTY_DEADLINE:?}: {error}",
                    dir.display()
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn remove_cgroup_dirs(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_dirs(&entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Kills whatever still runs in the containers' cgroups (cgroup2's `cgroup.kill`) and
/// removes them: leftovers of a crashed run. Panics if they cannot be removed, since a
/// container sharing a stale cgroup would break the scenario in confusing ways.
fn remove_leftover_cgroups() {
    for hierarchy in Hierarchy::all() {
        let base = hierarchy.base();
        if !base.exists() {
            continue;
        }
        let kill = base.join("cgroup.kill");
        if kill.exists() {
            let _ = std::fs::write(&kill, "1");
        }
        if let Err(error) = remove_cgroup_tree(&base) {
            panic!("leftover container cgroups: {error}; stop the processes listed in its cgroup.procs files");
        }
    }
}

/// Removes everything a previous (crashed) run may have left: containers it
/// started (only pids it recorded, and only if they are still its nspawn
/// processes), overlay mounts under the work dir, namespaces named `rwh-*`,
/// the blackhole route, and the work dir itself.
fn remove_leftovers() {
    if let Ok(text) = std::fs::read_to_string(pid_record()) {
        for pid in text.lines().filter_map(|line| line.trim().parse::<u32>().ok()) {
            let line = cmdline(pid);
            if line.contains("systemd-nspawn") && line.contains(&format!("--machine={PREFIX}")) {
                for child in children(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(child as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut ours: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(WORK_BASE))
        .collect();
    ours.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in ours {
        let _ = run("umount", &["--lazy", point]);
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) {
                let _ = run("ip", &["netns", "del", &name]);
            }
        }
    }
    remove_leftover_cgroups();
    let _ = run("ip", &["route", "del", "blackhole", SUBNET]);
    let _ = std::fs::remove_dir_all(WORK_BASE);
}

/// Direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The test network: the blackhole route in the root namespace and the control
/// namespace with its bridge. Dropped last: removes both.
#[derive(Debug)]
pub struct TestNetwork {
    /// The root network namespace, to return to before the cleanup.
    root_netns: File,
}

impl TestNetwork {
    fn create() -> Self {
        remove_leftovers();
        let root_netns = File::open("/proc/thread-self/ns/net").expect("open the root network namespace");
        // First of all: nothing addressed to the test network may ever leave this machine.
        run_ok("ip", &["route", "add", "blackhole", SUBNET]);
        let network = Self { root_netns };
        std::fs::create_dir_all(WORK_BASE).expect("work dir");
        run_ok("ip", &["netns", "add", CONTROL_NETNS]);
        let address = format!("{CONTROL_IP}/24");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", BRIDGE, "type", "bridge"],
            vec!["addr", "add", &address, "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ] {
            let mut all = vec!["-n", CONTROL_NETNS];
            all.extend(args);
            run_ok("ip", &all);
        }
        network
    }

    /// Moves the calling thread (and everything it starts later) into the control namespace.
    fn enter_control(&self) {
        let namespace = File::open(format!("/run/netns/{CONTROL_NETNS}")).expect("open the control namespace");
        setns(&namespace, CloneFlags::CLONE_NEWNET).expect("enter the control namespace");
    }

    /// Connects a new instance namespace to the bridge: `eth0` inside it at `ip`,
    /// its peer (named `link`) on the bridge.
    fn attach(&self, netns: &str, link: &str, ip: &str) {
        run_ok("ip", &["netns", "add", netns]);
        run_ok(
            "ip",
            &[
                "-n",
                CONTROL_NETNS,
                "link",
                "add",
                link,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
            ],
        );
        run_ok(
            "ip",
            &["-n", CONTROL_NETNS, "link", "set", link, "master", BRIDGE, "up"],
        );
        let address = format!("{ip}/24");
        run_ok("ip", &["-n", netns, "link", "set", "lo", "up"]);
        run_ok("ip", &["-n", netns, "addr", "add", &address, "dev", "eth0"]);
        run_ok("ip", &["-n", netns, "link", "set", "eth0", "up"]);
    }

    /// Unplugs (or plugs back) an instance's cable on the bridge side.
    fn set_link(&self, link: &str, up: bool) {
        run_ok(
            "ip",
            &["-n", CONTROL_NETNS, "link", "set", link, if up { "up" } else { "down" }],
        );
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // Back to the root namespace: the route lives there.
        let _ = setns(&self.root_netns, CloneFlags::CLONE_NEWNET);
        let _ = run("ip", &["netns", "del", CONTROL_NETNS]);
        let _ = run("ip", &["route", "del", "blackhole", SUBNET]);
        let _ = std::fs::remove_dir_all(WORK_BASE);
        // The instances removed their own cgroups; this removes the base they shared.
        for hierarchy in Hierarchy::all() {
            let _ = remove_cgroup_tree(&hierarchy.base());
        }
    }
}

/// One container instance: an overlay over the cached root, its own network
/// namespace, and `systemd-nspawn -b` while it is powered on.
#[derive(Debug)]
pub struct Instance {
    /// Short name: h1, h2, ... (also the agent's hostname).
    pub name: String,
    pub ip: String,
    pub zone: String,
    netns: String,
    link: String,
    dir: PathBuf,
    nspawn: Option<Child>,
    /// The container's own cgroup while it is powered on.
    cgroup: Option<ContainerCgroup>,
    leader: u32,
    boots: u32,
    /// When the last boot was started.
    pub powered_on_at: Instant,
}

impl Instance {
    /// The instance's root file system as the host sees it (writes show up inside).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Starts the container and waits until its systemd has finished booting.
    pub fn power_on(&mut self) {
        assert!(self.nspawn.is_none(), "{} is already on", self.name);
        let log = File::create(self.dir.join(format!("nspawn-{}.log", self.boots))).expect("nspawn log");
        let log_path = self.dir.join(format!("nspawn-{}.log", self.boots));
        self.powered_on_at = Instant::now();
        let cgroup = ContainerCgroup::create(&self.name);
        let child = cgroup
            .command("systemd-nspawn")
            .arg("--boot")
            .arg(format!("--directory={}", self.root().display()))
            .arg(format!("--machine={PREFIX}{}", self.name))
            .arg(format!("--network-namespace-path=/run/netns/{}", self.netns))
            // No systemd on the host: no machined to register with, no scope to create;
            // nspawn stays in the cgroup it starts in (the container's own, see ContainerCgroup).
            .args([
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--link-journal=no",
            ])
            .args(["--resolv-conf=off", "--timezone=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        record_pid(child.id());
        let nspawn_pid = child.id();
        self.nspawn = Some(child);
        self.boots += 1;
        self.leader = wait_for(&format!("{}'s systemd to start", self.name), || {
            if let Some(status) = self.nspawn.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!(
                    "{}: systemd-nspawn exited at start ({status}):\n{}",
                    self.name,
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            children(nspawn_pid).into_iter().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "systemd")
            })
        });
        cgroup.assert_contains(self.leader);
        self.cgroup = Some(cgroup);
        // Until its manager socket exists, systemctl cannot ask; then --wait waits for the boot.
        let state = wait_for(&format!("{} to finish booting", self.name), || {
            let output = self.exec(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            (!state.is_empty() && state != "offline").then_some(state)
        });
        assert!(
            state == "running" || state == "degraded",
            "{} did not boot: {state}\n{}",
            self.name,
            self.sh("systemctl --failed --no-pager; journalctl -b --no-pager | tail -n 40")
                .0
        );
    }

    pub fn is_on(&self) -> bool {
        self.nspawn.is_some()
    }

    /// Runs a command inside the container (all its namespaces, its root), with a clean environment.
    pub fn exec_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        assert!(self.nspawn.is_some(), "{} is powered off", self.name);
        let leader = self.leader.to_string();
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target", &leader, "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
            ])
            .args(["--root", "--wd", "--", "/usr/bin/env", "-i"])
            .arg("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .arg("LANG=C.UTF-8")
            .arg("HOME=/root");
        for (key, value) in env {
            command.arg(format!("{key}={value}"));
        }
        command
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("nsenter into {}: {error}", self.name))
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        self.exec_with_env(args, &[])
    }

    /// Runs a shell snippet inside; returns (stdout + stderr, success).
    pub fn sh(&self, script: &str) -> (String, bool) {
        let output = self.exec(&["/bin/sh", "-c", script]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (text, output.status.success())
    }

    /// Runs a shell snippet inside and returns its trimmed stdout; panics on failure.
    pub fn sh_ok(&self, script: &str) -> String {
        let output = self.exec(&["/bin/sh", "-c", script]);
        assert!(
            output.status.success(),
            "{}: `{script}` failed ({}):\n{}{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// A unit property, such as `MainPID` or `ActiveState`.
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.sh_ok(&format!("systemctl show --property {property} --value {unit}"))
    }

    /// Copies a host file into the instance (through the overlay).
    pub fn put_file(&self, source: &Path, inside: &str, mode: u32) {
        let destination = self.root().join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(destination.parent().expect("a parent dir")).expect("create parent");
        std::fs::copy(source, &destination)
            .unwrap_or_else(|error| panic!("copy {} to {}: {error}", source.display(), destination.display()));
        std::fs::set_permissions(&destination, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    pub fn write_file(&self, inside: &str, contents: &str) {
        let destination = self.root().join(inside.trim_start_matches('/'));
        std::fs::create_dir_all(destination.parent().expect("a parent dir")).expect("create parent");
        std::fs::write(&destination, contents).expect("write into the instance");
    }

    /// The release `current` points at for `bundle`, read from the instance's disk.
    pub fn current(&self, bundle: &str) -> Option<String> {
        std::fs::read_link(self.root().join(format!("var/lib/rollwave/releases/{bundle}/current")))
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    }

    /// Pulls the plug: SIGKILL to the container's PID 1 ends every process in it at once.
    pub fn power_off(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.leader as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let started = Instant::now();
        while child.try_wait().ok().flatten().is_none() {
            if started.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.remove_cgroup();
    }

    /// Removes the container's cgroup once it has stopped (its processes are gone with its PID 1).
    fn remove_cgroup(&mut self) {
        if let Some(cgroup) = self.cgroup.take()
            && let Err(error) = cgroup.remove()
        {
            eprintln!("{}: {error}", self.name);
        }
    }

    /// `systemctl reboot` inside; systemd-nspawn exits when the container reboots,
    /// and the instance is started again on the same disk.
    pub fn reboot(&mut self) {
        let _ = self.exec(&["systemctl", "reboot"]);
        let mut child = self.nspawn.take().expect("powered on");
        let started = Instant::now();
        loop {
            if child.try_wait().expect("poll nspawn").is_some() {
                break;
            }
            assert!(
                started.elapsed() < HOST_DEADLINE,
                "{} did not shut down to reboot",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.remove_cgroup();
        self.power_on();
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.power_off();
        let _ = run("umount", &[&self.root().display().to_string()]);
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}

/// How an instance bootstraps: where the agent package comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageSource {
    /// `s3://BUCKET/KEY`, signed with the test credentials (curl's SigV4 inside).
    S3,
    /// A plain `http://` URL of the same object.
    Http,
    /// A path on the instance's disk.
    LocalPath,
}

/// The whole test site: network, S3 server, coordinator with stack `web`, a
/// versioned bucket holding the agent packages, and the instances.
#[derive(Debug)]
pub struct Lab {
    pub instances: Vec<Instance>,
    pub coordinator: Coordinator,
    pub s3: Process,
    pub bucket: String,
    pub packages: Packages,
    pub work: tempfile::TempDir,
    root: PathBuf,
    /// Last: dropped after every container and process, it removes the network.
    pub network: TestNetwork,
}

impl Lab {
    pub fn start() -> Self {
        require_tools();
        let packages = Packages::find();
        let root = cached_root();
        let network = TestNetwork::create();
        network.enter_control();
        let work = tempfile::Builder::new()
            .prefix("rollwave-hosts-")
            .tempdir()
            .expect("temp dir");

        let python = std::env::var("ROLLWAVE_TEST_PYTHON").unwrap_or_else(|_| {
            panic!("ROLLWAVE_TEST_PYTHON is not set: run the tests through tests/run (it provides moto)")
        });
        let mut command = Command::new(&python);
        command.args(["-m", "moto.server", "-H", CONTROL_IP, "-p", &S3_PORT.to_string()]);
        let s3 = Process::spawn(command, work.path().join("moto.log"));
        let endpoint = Self::s3_endpoint_static();
        wait_for("the S3 server on the test network", || {
            run("curl", &["-fsS", "-o", "/dev/null", &format!("{endpoint}/moto-api/")])
                .status
                .success()
                .then_some(())
        });
        let bucket = "rollwave-hosts".to_owned();
        let script = format!(
            "import boto3, sys\n\
             s3 = boto3.client('s3', endpoint_url='{endpoint}', region_name='us-east-1',\n\
                 aws_access_key_id='test', aws_secret_access_key='test')\n\
             s3.create_bucket(Bucket='{bucket}')\n\
             s3.put_bucket_versioning(Bucket='{bucket}', VersioningConfiguration={{'Status': 'Enabled'}})\n\
             for path in sys.argv[1:]:\n\
             \x20   s3.upload_file(path, '{bucket}', '{PACKAGE_KEY_PREFIX}/' + path.rsplit('/', 1)[-1],\n\
             \x20       ExtraArgs={{'ACL': 'public-read'}})\n"
        );
        run_ok(
            &python,
            &[
                "-c",
                &script,
                &packages.agent.display().to_string(),
                &packages.agent_upgrade.display().to_string(),
            ],
        );

        let coordinator = Coordinator::start_with(
            work.path(),
            CoordinatorSettings {
                listen: format!("{CONTROL_IP}:0"),
                ..CoordinatorSettings::default()
            },
        );
        coordinator.create_stack("web");
        Self {
            instances: Vec::new(),
            coordinator,
            s3,
            bucket,
            packages,
            work,
            root,
            network,
        }
    }

    fn s3_endpoint_static() -> String {
        format!("http://{CONTROL_IP}:{S3_PORT}")
    }

    pub fn s3_endpoint(&self) -> String {
        Self::s3_endpoint_static()
    }

    /// Creates instance h<N> (zone z1, z2, z3 in turn) and powers it on.
    pub fn add_instance(&mut self) -> usize {
        let index = self.instances.len();
        let name = format!("h{}", index + 1);
        let dir = Path::new(WORK_BASE).join(&name);
        for sub in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(sub)).expect("instance dirs");
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.root.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        run_ok(
            "mount",
            &[
                "-t",
                "overlay",
                "overlay",
                "-o",
                &options,
                &dir.join("root").display().to_string(),
            ],
        );
        let netns = format!("{PREFIX}{name}");
        let ip = format!("10.231.77.{}", 11 + index);
        let mut instance = Instance {
            name: name.clone(),
            ip: ip.clone(),
            zone: format!("z{}", index % 3 + 1),
            netns: netns.clone(),
            link: name.clone(),
            dir,
            nspawn: None,
            cgroup: None,
            leader: 0,
            boots: 0,
            powered_on_at: Instant::now(),
        };
        self.network.attach(&netns, &instance.link, &ip);
        // Stand-in for an instance role: the agent reads releases with these credentials.
        instance.write_file(
            "/etc/systemd/system/rollwave-agent.service.d/test-credentials.conf",
            "[Service]\nEnvironment=AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1\n",
        );
        instance.power_on();
        self.instances.push(instance);
        index
    }

    /// Runs packaging/bootstrap.sh on an instance as user data would; returns its output.
    pub fn bootstrap(&self, index: usize, token: &str, source: PackageSource, sha256: &str) -> Output {
        let instance = &self.instances[index];
        instance.put_file(&repo_root().join("packaging/bootstrap.sh"), "/root/bootstrap.sh", 0o755);
        let file_name = self
            .packages
            .agent
            .file_name()
            .and_then(|name| name.to_str())
            .expect("package file name")
            .to_owned();
        let package = match source {
            PackageSource::S3 => format!("s3://{}/{PACKAGE_KEY_PREFIX}/{file_name}", self.bucket),
            PackageSource::Http => format!(
                "{}/{}/{PACKAGE_KEY_PREFIX}/{file_name}",
                self.s3_endpoint(),
                self.bucket
            ),
            PackageSource::LocalPath => {
                instance.put_file(&self.packages.agent, &format!("/root/{file_name}"), 0o644);
                format!("/root/{file_name}")
            }
        };
        let coordinator = self.coordinator.addr.to_string();
        let endpoint = self.s3_endpoint();
        instance.exec_with_env(
            &[
                "/root/bootstrap.sh",
                "--coordinator",
                &coordinator,
                "--token",
                token,
                "--package",
                &package,
                "--sha256",
                sha256,
                "--stack",
                "web",
                "--layer",
                "web",
                "--zone",
                &instance.zone,
                "--hostname",
                &instance.name,
                "--no-imds",
                "--s3-endpoint",
                &endpoint,
                "--s3-region",
                "us-east-1",
                "--ready-timeout",
                "120",
            ],
            &[("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")],
        )
    }

    /// Unplugs an instance from the test network (its processes keep running).
    pub fn cut_off(&self, index: usize) {
        self.network.set_link(&self.instances[index].link, false);
    }

    pub fn reconnect(&self, index: usize) {
        self.network.set_link(&self.instances[index].link, true);
    }

    /// GET http://<instance>:<port><path> from the control namespace; `None` if it fails.
    pub fn http_get(&self, index: usize, port: u16, path: &str) -> Option<String> {
        let url = format!("http://{}:{port}{path}", self.instances[index].ip);
        let output = run("curl", &["-fsS", "--max-time", "2", &url]);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `rollwave status web`.
    pub fn status(&self) -> Value {
        self.coordinator.cli_json(&["status", "web"])
    }
}

/// Waits up to [`HOST_DEADLINE`] for `condition`, naming `what` on timeout.
pub fn wait_long<T>(what: &str, mut condition: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            started.elapsed() < HOST_DEADLINE,
            "timed out after {HOST_DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
