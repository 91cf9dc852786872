//! `rollwave-agent install|rollback` on real files and processes: the
//! on-instance half of verified releases, from a local archive. Hooks are
//! steered at run time through files in a control dir (fail, hang), so one
//! archive per version serves every scenario, including SIGKILL mid-step.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rollwave_tests::{binary, wait_for};

const EVENTS: [&str; 5] = [
    "before_install",
    "after_install",
    "application_stop",
    "application_start",
    "validate_service",
];

/// One instance's state dir plus a control dir that steers the hooks.
struct Instance {
    dir: tempfile::TempDir,
}

struct Release {
    version: String,
    archive: PathBuf,
    sha256: String,
}

impl Instance {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("control")).expect("control dir");
        Self { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn control(&self, name: &str) -> PathBuf {
        self.dir.path().join("control").join(name)
    }

    fn set(&self, name: &str) {
        std::fs::write(self.control(name), b"").expect("control file");
    }

    fn clear(&self, name: &str) {
        let _ = std::fs::remove_file(self.control(name));
    }

    /// A release whose every hook logs `event version previous` to control/events
    /// and obeys control/fail-<event>-<version> and control/hang-<event>-<version>,
    /// where version is the one being installed ($ROLLWAVE_VERSION).
    fn release(&self, version: &str) -> Release {
        let source = self.dir.path().join(format!("src-{version}"));
        std::fs::create_dir_all(source.join("hooks")).expect("source dir");
        let control = self.dir.path().join("control");
        let hook = format!(
            "#!/bin/sh\n\
             c={control}\n\
             e=$ROLLWAVE_LIFECYCLE_EVENT\n\
             echo \"$e $ROLLWAVE_VERSION prev=$ROLLWAVE_PREVIOUS_VERSION dir=$(basename \"$ROLLWAVE_RELEASE_DIR\")\" >> $c/events\n\
             v=$ROLLWAVE_VERSION\n\
             if [ -e $c/hang-$e-$v ]; then touch $c/hanging-$e; sleep 600; fi\n\
             if [ -e $c/fail-$e-$v ]; then echo \"$e of $v fails\"; exit 7; fi\n",
            control = control.display()
        );
        let script = source.join("hooks/hook.sh");
        std::fs::write(&script, hook).expect("hook");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let mut manifest = String::from("[hooks]\n");
        for event in EVENTS {
            manifest.push_str(&format!(
                "{event} = {{ path = \"hooks/hook.sh\", timeout = \"60s\" }}\n"
            ));
        }
        manifest.push_str(&format!(
            "[[health]]\ncommand = \"test ! -e {}/unhealthy-{version}\"\ntimeout = \"5s\"\n",
            control.display()
        ));
        std::fs::write(source.join("rollwave.toml"), manifest).expect("manifest");
        std::fs::write(source.join("VERSION"), version).expect("content");
        std::fs::create_dir_all(source.join("static")).expect("static");
        for index in 0..20 {
            std::fs::write(
                source.join(format!("static/{index}.txt")),
                format!("{version}:{index}\n"),
            )
            .expect("file");
        }
        let archive = self.dir.path().join(format!("{version}.zip"));
        let built = rollwave_release::build_from_dir(&source, &archive).expect("build release");
        Release {
            version: version.to_owned(),
            archive,
            sha256: built.sha256.to_hex(),
        }
    }

    fn command(&self, release: &Release, extra: &[&str]) -> Command {
        let mut command = Command::new(binary("rollwave-agent"));
        command
            .args([
                "install",
                "--bundle",
                "web",
                "--version",
                &release.version,
                "--sha256",
                &release.sha256,
            ])
            .arg("--archive")
            .arg(&release.archive)
            .arg("--root")
            .arg(self.root())
            .args(["--health-deadline", "2s"])
            .args(extra)
            .stdin(Stdio::null());
        command
    }

    fn install(&self, release: &Release, extra: &[&str]) -> Output {
        self.command(release, extra)
            .output()
            .expect("run rollwave-agent install")
    }

    fn rollback(&self) -> Output {
        Command::new(binary("rollwave-agent"))
            .args(["rollback", "--bundle", "web", "--health-deadline", "2s", "--root"])
            .arg(self.root())
            .output()
            .expect("run rollwave-agent rollback")
    }

    fn current(&self) -> Option<String> {
        std::fs::read_link(self.root().join("releases/web/current"))
            .ok()
            .map(|target| target.to_string_lossy().into_owned())
    }

    fn serving(&self) -> Option<String> {
        std::fs::read_to_string(self.root().join("releases/web/current/VERSION")).ok()
    }

    fn on_disk(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root().join("releases/web"))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Event lines logged since the last call.
    fn take_events(&self) -> Vec<String> {
        let path = self.control("events");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        text.lines().map(str::to_owned).collect()
    }

    fn journal(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.root().join("state/journal/web.json")).expect("journal");
        serde_json::from_str(&text).expect("journal is JSON")
    }
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Asserts exit code 1 and returns the error line.
fn refused(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "expected exit 1; stderr: {stderr}");
    let line = stderr
        .lines()
        .rev()
        .find(|line| line.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {stderr}"));
    line.to_owned()
}

#[test]
fn install_upgrade_repeat_and_roll_back() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let v2 = instance.release("2.0");

    let printed = ok(&instance.install(&v1, &[]));
    assert_eq!(printed.trim(), "web@1.0 is current");
    assert_eq!(
        instance.current().as_deref(),
        Some("1.0"),
        "relative link to the version"
    );
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
    assert_eq!(
        instance.take_events(),
        [
            "before_install 1.0 prev= dir=1.0",
            "after_install 1.0 prev= dir=1.0",
            "application_start 1.0 prev= dir=1.0",
            "validate_service 1.0 prev= dir=1.0",
        ]
    );

    let printed = ok(&instance.install(&v1, &[]));
    assert!(printed.contains("nothing to do"), "{printed}");
    assert!(instance.take_events().is_empty(), "a repeat runs no hook");

    let printed = ok(&instance.install(&v2, &["--output", "json"]));
    let report: serde_json::Value = serde_json::from_str(&printed).expect("json");
    assert_eq!(report["outcome"], "activated");
    assert_eq!(report["previous"], "1.0");
    assert_eq!(instance.serving().as_deref(), Some("2.0"));
    assert_eq!(
        instance.take_events(),
        [
            "before_install 2.0 prev=1.0 dir=2.0",
            "after_install 2.0 prev=1.0 dir=2.0",
            "application_stop 2.0 prev=1.0 dir=1.0",
            "application_start 2.0 prev=1.0 dir=2.0",
            "validate_service 2.0 prev=1.0 dir=2.0",
        ],
        "application_stop is the running release's script"
    );

    let printed = ok(&instance.rollback());
    assert!(printed.contains("web@1.0 is current"), "{printed}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
    let events = instance.take_events();
    assert!(
        !events.iter().any(|line| line.starts_with("before_install")),
        "no re-install: {events:?}"
    );
    assert_eq!(instance.on_disk(), ["1.0", "2.0", "current"], "both stay on disk");
}

/// The field trial: a truncated journal made every later install of the bundle fail
/// until someone moved the file aside by hand.
#[test]
fn installs_go_on_after_the_journal_was_truncated() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let v2 = instance.release("2.0");
    let v3 = instance.release("3.0");
    ok(&instance.install(&v1, &[]));
    ok(&instance.install(&v2, &[]));
    let journal = instance.root().join("state/journal/web.json");
    let bytes = std::fs::read(&journal).expect("journal");
    std::fs::write(&journal, &bytes[..bytes.len() / 3]).expect("truncate");
    instance.take_events();

    // The current release: its sha256 went with the journal; the requested one is adopted.
    let printed = ok(&instance.install(&v2, &[]));
    assert!(printed.contains("nothing to do"), "{printed}");
    assert!(instance.take_events().is_empty(), "the running release is left alone");
    let aside: Vec<String> = std::fs::read_dir(instance.root().join("state/journal"))
        .expect("journal dir")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("web.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged journal is kept aside: {aside:?}");
    assert_eq!(instance.journal()["prepared"]["2.0"], v2.sha256.as_str());

    // The next release installs as usual, and 1.0 (its sha256 lost) is verified again when asked for.
    let printed = ok(&instance.install(&v3, &[]));
    assert!(printed.contains("web@3.0 is current (previous: 2.0)"), "{printed}");
    let printed = ok(&instance.install(&v1, &[]));
    assert!(printed.contains("web@1.0 is current"), "{printed}");
    assert!(
        instance
            .take_events()
            .iter()
            .any(|line| line.starts_with("before_install 1.0")),
        "1.0 was installed again from its archive"
    );
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
}

/// The field trial: a damaged `current` left the instance unable to install anything.
#[test]
fn installs_go_on_after_current_was_damaged() {
    /// A name and what it does to `current`.
    type Damage = (&'static str, fn(&Path));
    let damage: [Damage; 3] = [
        ("a directory", |link| {
            std::fs::remove_file(link).expect("remove link");
            std::fs::create_dir(link).expect("directory");
        }),
        ("dangling", |link| {
            std::fs::remove_file(link).expect("remove link");
            std::os::unix::fs::symlink("9.9", link).expect("dangling link");
        }),
        ("garbage", |link| {
            std::fs::remove_file(link).expect("remove link");
            std::fs::write(link, b"\0\0garbage").expect("file");
        }),
    ];
    for (name, damage) in damage {
        let instance = Instance::new();
        let v1 = instance.release("1.0");
        let v2 = instance.release("2.0");
        ok(&instance.install(&v1, &[]));
        damage(&instance.root().join("releases/web/current"));
        instance.take_events();
        let printed = ok(&instance.install(&v2, &[]));
        assert_eq!(printed.trim(), "web@2.0 is current", "{name}: no previous release");
        assert_eq!(instance.serving().as_deref(), Some("2.0"), "{name}");
        assert!(
            !instance
                .take_events()
                .iter()
                .any(|line| line.starts_with("application_stop")),
            "{name}: no stop hook of a release that is not current"
        );
    }
}

#[test]
fn a_wrong_sha256_is_refused_before_anything_is_unpacked() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    ok(&instance.install(&v1, &[]));
    let mut v2 = instance.release("2.0");
    v2.sha256 = "0".repeat(64);
    let error = refused(&instance.install(&v2, &[]));
    assert!(error.contains("sha256 mismatch"), "{error}");
    assert!(error.contains("current release untouched"), "{error}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
    assert_eq!(instance.on_disk(), ["1.0", "current"]);
    let downloads: Vec<_> = std::fs::read_dir(instance.root().join("downloads"))
        .expect("downloads")
        .collect();
    assert!(downloads.is_empty(), "nothing left in downloads: {downloads:?}");
}

#[test]
fn a_first_install_that_fails_leaves_no_release() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    instance.set("fail-after_install-1.0");
    let error = refused(&instance.install(&v1, &[]));
    assert!(
        error.contains("after_install: hooks/hook.sh exit code 7: after_install of 1.0 fails"),
        "{error}"
    );
    assert_eq!(instance.current(), None);
    assert!(instance.on_disk().is_empty(), "{:?}", instance.on_disk());

    instance.clear("fail-after_install-1.0");
    instance.set("unhealthy-1.0");
    let error = refused(&instance.install(&v1, &[]));
    assert!(error.contains("health: not healthy within 2s"), "{error}");
    assert!(error.contains("removed again (it was the first release)"), "{error}");
    assert_eq!(
        instance.current(),
        None,
        "the way back from a first install removes current"
    );
    assert!(instance.on_disk().is_empty(), "{:?}", instance.on_disk());
}

#[test]
fn a_failing_validate_service_switches_back() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let v2 = instance.release("2.0");
    ok(&instance.install(&v1, &[]));
    instance.take_events();
    instance.set("fail-validate_service-2.0");
    let error = refused(&instance.install(&v2, &[]));
    assert!(error.contains("validate_service: hooks/hook.sh exit code 7"), "{error}");
    assert!(error.contains("switched back to 1.0"), "{error}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
    let events = instance.take_events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("application_start 2.0 prev=1.0 dir=1.0"),
        "the previous release is started again: {events:?}"
    );
    assert_eq!(
        instance.on_disk(),
        ["1.0", "current"],
        "the failed release is discarded"
    );
}

#[test]
fn a_failing_application_stop_blocks_unless_ignored() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let v2 = instance.release("2.0");
    ok(&instance.install(&v1, &[]));
    // The running release's stop script fails (the hook is 1.0's, with 2.0 as the new version).
    instance.set("fail-application_stop-2.0");
    let error = refused(&instance.install(&v2, &[]));
    assert!(error.contains("application_stop"), "{error}");
    assert!(error.contains("ignore application_stop failures"), "{error}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));

    instance.take_events();
    ok(&instance.install(&v2, &["--ignore-stop-failure"]));
    assert_eq!(instance.serving().as_deref(), Some("2.0"));
    let events = instance.take_events();
    assert!(
        !events.iter().any(|line| line.starts_with("before_install")),
        "the prepared release is reused: {events:?}"
    );
}

#[test]
fn same_version_with_other_content_is_refused() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    ok(&instance.install(&v1, &[]));
    let other = Instance::new().release("1.0");
    let forged = Release {
        version: "1.0".into(),
        archive: other.archive.clone(),
        sha256: other.sha256.clone(),
    };
    let error = refused(&instance.install(&forged, &[]));
    assert!(error.contains("versions are immutable"), "{error}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
}

#[test]
fn usage_errors_exit_2_and_bad_names_exit_1() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let output = Command::new(binary("rollwave-agent"))
        .args(["install", "--bundle", "web"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let bad = Release {
        version: "current".into(),
        archive: v1.archive.clone(),
        sha256: v1.sha256.clone(),
    };
    let error = refused(&instance.install(&bad, &[]));
    assert!(error.contains("current"), "{error}");
}

#[test]
fn install_refuses_while_an_agent_holds_the_state_dir() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    std::fs::create_dir_all(instance.root().join("state")).expect("state dir");
    let mut holder = Command::new("flock")
        .arg(instance.root().join("state/agent.lock"))
        .args(["sleep", "30"])
        .process_group(0)
        .spawn()
        .expect("flock(1) from util-linux");
    let lock = instance.root().join("state/agent.lock");
    wait_for("flock to hold the lock", || {
        let free = Command::new("flock")
            .arg("-n")
            .arg(&lock)
            .arg("true")
            .status()
            .expect("flock -n");
        (!free.success()).then_some(())
    });
    let error = refused(&instance.install(&v1, &[]));
    assert!(error.contains("another rollwave-agent process"), "{error}");
    // flock and its sleep (which holds the lock) go together.
    let group = format!("-{}", holder.id());
    Command::new("kill")
        .args(["-KILL", "--", &group])
        .status()
        .expect("kill the group");
    holder.wait().expect("reap flock");
    assert_eq!(instance.current(), None);
    ok(&instance.install(&v1, &[]));
}

#[test]
fn a_hostile_archive_is_refused_and_the_old_release_keeps_serving() {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    ok(&instance.install(&v1, &[]));
    // An entry that climbs out of the release dir.
    let archive = instance.dir.path().join("evil.zip");
    {
        let file = std::fs::File::create(&archive).expect("create");
        let mut zip = zip::ZipWriter::new(file);
        zip.start_file("../../escaped.txt", zip::write::SimpleFileOptions::default())
            .expect("entry");
        std::io::Write::write_all(&mut zip, b"pwned").expect("write");
        zip.finish().expect("finish");
    }
    let (digest, _) = rollwave_release::hash_file(&archive).expect("hash");
    let evil = Release {
        version: "6.6.6".into(),
        archive,
        sha256: digest.to_hex(),
    };
    let error = refused(&instance.install(&evil, &[]));
    assert!(error.contains("unpack"), "{error}");
    assert_eq!(instance.serving().as_deref(), Some("1.0"));
    assert_eq!(instance.on_disk(), ["1.0", "current"], "no staging left");
    assert!(!instance.root().join("escaped.txt").exists());
    assert!(!instance.root().join("releases/escaped.txt").exists());
}

/// Kills `install` with SIGKILL once the hook of `event` hangs, then checks
/// that `recover` finishes the install (crash before the switch) or returns
/// to the previous release (crash after it), that no staging dir or hook
/// process is left, and that the upgrade then completes.
fn crash_during(event: &str, expected_after_recovery: &str) {
    let instance = Instance::new();
    let v1 = instance.release("1.0");
    let v2 = instance.release("2.0");
    ok(&instance.install(&v1, &[]));
    instance.set(&format!("hang-{event}-2.0"));
    let mut child = instance.command(&v2, &[]).spawn().expect("spawn install");
    wait_for(&format!("the {event} hook to hang"), || {
        let hanging = instance.control(&format!("hanging-{event}")).exists();
        (hanging && instance.journal()["install"]["hook_group"].is_i64()).then_some(())
    });
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    // Killed mid-step: `current` still names a complete release.
    let serving = instance.serving().expect("current points at a complete release");
    assert!(serving == "1.0" || serving == "2.0", "{serving}");
    let journal = instance.journal();
    assert_eq!(journal["install"]["state"]["state"], "running", "{journal}");

    // The next run recovers first (killing the orphaned hook).
    instance.clear(&format!("hang-{event}-2.0"));
    instance.clear(&format!("hanging-{event}"));
    let output = Command::new(binary("rollwave-agent"))
        .args(["recover", "--root"])
        .arg(instance.root())
        .output()
        .expect("run rollwave-agent recover");
    ok(&output);
    assert_eq!(
        instance.serving().as_deref(),
        Some(expected_after_recovery),
        "after recovering from a crash in {event}"
    );
    assert!(
        !instance.on_disk().iter().any(|name| name.starts_with('.')),
        "no staging or temporary link left: {:?}",
        instance.on_disk()
    );
    assert!(!hook_still_running(instance.dir.path()), "the orphaned hook was killed");

    ok(&instance.install(&v2, &[]));
    assert_eq!(instance.serving().as_deref(), Some("2.0"));
}

/// Whether a hook process (or a child of one) runs in a release under `dir`.
fn hook_still_running(dir: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = std::fs::read_dir("/proc")
            .expect("proc")
            .filter_map(Result::ok)
            .any(|entry| {
                std::fs::read(entry.path().join("environ"))
                    .map(|environ| String::from_utf8_lossy(&environ).contains("ROLLWAVE_LIFECYCLE_EVENT"))
                    .unwrap_or(false)
                    && std::fs::read_link(entry.path().join("cwd"))
                        .map(|cwd| cwd.starts_with(dir))
                        .unwrap_or(false)
            });
        if !found || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn killed_during_before_install_resumes_the_install() {
    crash_during("before_install", "2.0");
}

#[test]
fn killed_during_after_install_resumes_the_install() {
    crash_during("after_install", "2.0");
}

#[test]
fn killed_during_application_stop_resumes_the_install() {
    crash_during("application_stop", "2.0");
}

#[test]
fn killed_during_application_start_returns_to_the_previous_release() {
    crash_during("application_start", "1.0");
}

#[test]
fn killed_during_validate_service_returns_to_the_previous_release() {
    crash_during("validate_service", "1.0");
}

/// Kills a process group when dropped, so a failing test leaves no app behind.
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .status();
    }
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn a_supervised_app_is_restarted_and_survives_agent_restarts() {
    let mut cluster = rollwave_tests::Cluster::start(1);
    let agent = &mut cluster.agents[0];
    agent.kill();
    let root = agent.dir.join("state");
    let control = agent.dir.join("control");
    std::fs::create_dir_all(&control).expect("control dir");

    let source = agent.dir.join("app-src");
    std::fs::create_dir_all(source.join("bin")).expect("source");
    let app = source.join("bin/app");
    std::fs::write(
        &app,
        format!("#!/bin/sh\necho $$ > {}/app.pid\nexec sleep 600\n", control.display()),
    )
    .expect("app");
    std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(
        source.join("rollwave.toml"),
        format!(
            "[service]\ncommand = [\"bin/app\"]\n[[health]]\ncommand = \"test -s {}/app.pid\"\n",
            control.display()
        ),
    )
    .expect("manifest");
    let archive = agent.dir.join("app.zip");
    let built = rollwave_release::build_from_dir(&source, &archive).expect("build");
    let output = Command::new(binary("rollwave-agent"))
        .args([
            "install",
            "--bundle",
            "app",
            "--version",
            "1",
            "--sha256",
            &built.sha256.to_hex(),
        ])
        .arg("--archive")
        .arg(&archive)
        .arg("--root")
        .arg(&root)
        .output()
        .expect("install");
    ok(&output);
    let read_pid = || -> Option<u32> {
        std::fs::read_to_string(control.join("app.pid"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
    };
    let first = read_pid().expect("the app wrote its pid");
    let _first_guard = GroupGuard(first);
    assert!(pid_alive(first), "the app runs after install exits");

    // The agent adopts the app and restarts it when it dies.
    agent.restart();
    Command::new("kill")
        .args(["-KILL", &first.to_string()])
        .status()
        .expect("kill the app");
    let second = wait_for("the agent to restart the app", || {
        read_pid().filter(|pid| *pid != first && pid_alive(*pid))
    });
    let _second_guard = GroupGuard(second);

    // Killing and restarting the agent leaves the app running, untouched.
    agent.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert!(pid_alive(second), "the app survived the agent restart");
    assert_eq!(read_pid(), Some(second), "and was not restarted");
    agent.kill();
    assert!(pid_alive(second), "the app survives the agent stopping");
}
