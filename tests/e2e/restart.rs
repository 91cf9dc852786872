//! A coordinator killed with SIGKILL and restarted loses no stack or
//! instance record, and agents reconnect on their own.

use rollwave_tests::Cluster;

#[test]
fn a_killed_coordinator_restarts_with_everything_and_agents_reconnect() {
    let mut cluster = Cluster::start(3);
    cluster.coordinator.create_stack("batch");
    let before = cluster.coordinator.instances();
    let ids = |instances: &[serde_json::Value]| {
        let mut ids: Vec<String> = instances
            .iter()
            .map(|instance| instance["id"].as_str().expect("id").to_owned())
            .collect();
        ids.sort();
        ids
    };

    cluster.coordinator.kill();
    cluster.coordinator.restart();

    let stacks = cluster.coordinator.cli_json(&["stack", "list"]);
    let names: Vec<&str> = stacks
        .as_array()
        .expect("array")
        .iter()
        .map(|stack| stack["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["batch", "web"]);
    for agent in &cluster.agents {
        cluster.coordinator.wait_presence(&agent.spec.name, "online");
    }
    let after = cluster.coordinator.instances();
    assert_eq!(ids(&after), ids(&before), "same instances, same identities");
    for agent in &mut cluster.agents {
        assert_eq!(
            agent.try_exit_code(),
            None,
            "{} kept running through the outage",
            agent.spec.name
        );
    }
}

/// A second `rollwave server` on a data dir in use used to start, point cli.toml at itself and
/// overwrite deployments with its stale view; it must exit at once, naming the holder.
#[test]
fn a_second_coordinator_on_the_same_data_dir_took_it_over() {
    let temp = tempfile::tempdir().expect("temp dir");
    let coordinator = rollwave_tests::Coordinator::start(temp.path());
    let cli_config = coordinator.data_dir().join("cli.toml");
    let before = std::fs::read(&cli_config).expect("cli.toml");
    let modified_before = std::fs::metadata(&cli_config)
        .and_then(|meta| meta.modified())
        .expect("mtime");

    let mut second = std::process::Command::new(rollwave_tests::binary("rollwave"));
    second
        .arg("server")
        .arg("--data-dir")
        .arg(coordinator.data_dir())
        .arg("--listen")
        .arg("127.0.0.1:0");
    let mut second = rollwave_tests::Process::spawn(second, temp.path().join("second-server.log"));
    let code = rollwave_tests::wait_for("the second server to exit", || second.try_exit_code());
    let log = second.log_text();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(&format!("pid {}", coordinator.pid())),
        "names the holder: {log}"
    );
    assert_eq!(
        std::fs::read(&cli_config).expect("cli.toml"),
        before,
        "cli.toml untouched"
    );
    assert_eq!(
        std::fs::metadata(&cli_config)
            .and_then(|meta| meta.modified())
            .expect("mtime"),
        modified_before,
        "cli.toml not even rewritten"
    );
    // The first one still serves.
    coordinator.cli(&["stack", "list"]);
}
