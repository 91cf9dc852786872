//! The README's first command: `rollwave demo` runs the main job end to end
//! (approved release at join, a rolling deployment, a broken release caught
//! at the canary) and leaves nothing running behind.

use std::process::Command;

use rollwave_tests::binary;

/// Processes whose command line mentions a demo directory.
fn demo_processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("rollwave-demo-").then_some(cmdline)
        })
        .collect()
}

#[test]
fn the_demo_runs_the_main_job_and_cleans_up() {
    let output = Command::new(binary("rollwave"))
        .args(["demo", "--agents", "3"])
        .env("NO_COLOR", "1")
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
    let left = demo_processes();
    assert!(left.is_empty(), "the demo left processes running: {left:?}");
}
