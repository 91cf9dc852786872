//! Agents join, show up with their zones, go offline when killed, and lose
//! their standing when an operator removes them.

use rollwave_tests::{Cluster, wait_for};

#[test]
fn agents_join_and_appear_with_their_zones() {
    let cluster = Cluster::start(3);
    let instances = cluster.coordinator.instances();
    let mut seen: Vec<(String, String, String)> = instances
        .iter()
        .map(|instance| {
            (
                instance["hostname"].as_str().expect("hostname").to_owned(),
                instance["zone"].as_str().expect("zone").to_owned(),
                instance["stack"].as_str().expect("stack").to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("agent-0".into(), "z1".into(), "web".into()),
            ("agent-1".into(), "z2".into(), "web".into()),
            ("agent-2".into(), "z3".into(), "web".into()),
        ]
    );
    for instance in &instances {
        assert_eq!(instance["presence"], "online");
        assert!(
            instance["id"].as_str().is_some_and(|id| id.starts_with("i-")),
            "{instance}"
        );
        assert!(!instance["certificate_expires"].as_str().unwrap_or_default().is_empty());
    }
    // The identity the agent stored is the one the coordinator shows.
    let identity = cluster.agents[0].identity();
    let shown = cluster
        .coordinator
        .instance_by_hostname("agent-0")
        .expect("agent-0 listed");
    assert_eq!(identity["instance_id"].as_str(), shown["id"].as_str());
}

#[test]
fn a_killed_agent_turns_offline_and_comes_back() {
    let mut cluster = Cluster::start(2);
    cluster.agents[0].kill();
    cluster.coordinator.wait_presence("agent-0", "offline");
    assert_eq!(
        cluster.coordinator.instance_by_hostname("agent-1").expect("agent-1")["presence"],
        "online",
        "the other agent is unaffected"
    );
    let id_before = cluster.agents[0].identity()["instance_id"].clone();
    cluster.agents[0].restart();
    let back = cluster.coordinator.wait_presence("agent-0", "online");
    assert_eq!(
        back["id"].as_str(),
        id_before.as_str(),
        "a restart keeps the identity (no re-join)"
    );
    assert_eq!(cluster.coordinator.instances().len(), 2);
}

#[test]
fn a_removed_instance_loses_its_certificate() {
    let mut cluster = Cluster::start(1);
    let id = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    cluster.coordinator.cli(&["instance", "remove", &id]);
    assert!(cluster.coordinator.instances().is_empty());
    // The agent is told, cannot reconnect with its certificate, and stops with an explanation.
    let code = cluster.agents[0].wait_exit();
    assert_eq!(code, 1);
    let log = cluster.agents[0].log_text();
    assert!(log.contains("join again"), "agent explains what to do: {log}");
    // Its certificate fails at the handshake now.
    let restarted = &mut cluster.agents[0];
    restarted.restart();
    wait_for("the restarted agent to be refused", || {
        restarted.log_text().contains("session ended").then_some(())
    });
    assert!(cluster.coordinator.instances().is_empty(), "nothing re-registered");
}
