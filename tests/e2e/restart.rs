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
