//! The README's first command: `rollwave demo` runs the main job end to end
//! (approved release at join, a rolling deployment, a broken release caught
//! at the canary) and leaves nothing running behind.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};

use rollwave_tests::binary;

/// Processes whose command line mentions `dir`: this demo's own (its agents, their apps), never
/// another `rollwave demo` running on the machine, whose directory is elsewhere.
fn processes_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_str().expect("UTF-8 temp path");
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(dir).then_some(cmdline)
        })
        .collect()
}

/// A child killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_demo_runs_the_main_job_and_cleans_up() {
    // The demo makes its directory under TMPDIR: one of the test's own, so that what is left
    // running there is this demo's, whatever other demos run on the machine.
    let temp = tempfile::Builder::new()
        .prefix("demo-test-")
        .tempdir()
        .expect("temp dir");
    // Another demo's process, as a developer's `rollwave demo` on the same machine would have: not ours.
    let _other_demo = KillOnDrop(
        Command::new("sleep")
            .arg0("/tmp/rollwave-demo-someone-elses/agent")
            .arg("600")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a stand-in for another demo"),
    );
    let output = Command::new(binary("rollwave"))
        .args(["demo", "--agents", "3"])
        .env("NO_COLOR", "1")
        .env("TMPDIR", temp.path())
        .output()
        .expect("run rollwave demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "demo failed:\n{text}");
    for step in ["[5/7]", "[6/7]", "[7/7]", "succeeded", "as expected", "approved"] {
        assert!(text.contains(step), "the demo shows {step:?}:\n{text}");
    }
    assert!(
        !text.contains("lost track"),
        "every app was stopped by its agent's records:\n{text}"
    );
    let ran_here = std::fs::read_dir(temp.path())
        .expect("the test's TMPDIR")
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().starts_with("rollwave-demo-"));
    assert!(
        ran_here || text.contains(temp.path().to_str().expect("UTF-8")),
        "the demo did not use the test's TMPDIR:\n{text}"
    );
    let left = processes_under(temp.path());
    assert!(left.is_empty(), "the demo left processes running: {left:?}");
}
