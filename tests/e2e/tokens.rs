//! Join tokens: reused, expired, revoked and other-stack tokens are refused;
//! of 50 agents racing one single-use token exactly one joins.

use std::path::Path;

use rollwave_tests::{Agent, AgentSpec, Cluster, wait_for};

fn agent(cluster: &Cluster, dir: &Path, name: &str, token: &str, stack: &str) -> Agent {
    Agent::start(
        dir,
        AgentSpec {
            name: name.into(),
            zone: "z1".into(),
            token: token.into(),
            stack: Some(stack.into()),
            coordinator: cluster.coordinator.addr,
        },
    )
}

/// Starts an agent that must be refused; returns its log.
fn refused(cluster: &Cluster, name: &str, token: &str, stack: &str) -> String {
    let mut agent = agent(cluster, cluster.temp.path(), name, token, stack);
    assert_eq!(agent.wait_exit(), 1, "a refused join exits 1");
    assert!(
        cluster.coordinator.instance_by_hostname(name).is_none(),
        "{name} must not be registered"
    );
    agent.log_text()
}

#[test]
fn reused_expired_revoked_and_other_stack_tokens_are_refused() {
    let mut cluster = Cluster::start(0);
    cluster.coordinator.create_stack("batch");

    let single = cluster.coordinator.create_token("web", 1, "10m");
    cluster.add_agent("first", "z1", &single);
    cluster.coordinator.wait_presence("first", "online");
    let log = refused(&cluster, "reuser", &single, "web");
    assert!(log.contains("is used"), "{log}");

    let short = cluster.coordinator.create_token("web", 1, "1s");
    wait_for("the short token to expire", || {
        let tokens = cluster.coordinator.cli_json(&["token", "list"]);
        tokens
            .as_array()?
            .iter()
            .any(|token| token["status"] == "expired")
            .then_some(())
    });
    let log = refused(&cluster, "late", &short, "web");
    assert!(log.contains("is expired"), "{log}");

    let revoked = cluster.coordinator.create_token("web", 5, "10m");
    let revoked_id = revoked.split('.').nth(1).expect("token id");
    cluster.coordinator.cli(&["token", "revoke", revoked_id]);
    let log = refused(&cluster, "revoked", &revoked, "web");
    assert!(log.contains("is revoked"), "{log}");

    let for_batch = cluster.coordinator.create_token("batch", 1, "10m");
    let log = refused(&cluster, "wrong-stack", &for_batch, "web");
    assert!(log.contains("is for stack \"batch\""), "{log}");
    // The refused join did not spend the token.
    let tokens = cluster.coordinator.cli_json(&["token", "list", "--stack", "batch"]);
    assert_eq!(tokens[0]["uses_left"], 1, "{tokens}");

    let fresh = cluster.coordinator.create_token("web", 1, "10m");
    let mut parts: Vec<String> = fresh.split('.').map(str::to_owned).collect();
    parts[2] = "0".repeat(parts[2].len());
    let log = refused(&cluster, "guesser", &parts.join("."), "web");
    assert!(log.contains("wrong secret"), "{log}");
}

#[test]
fn fifty_agents_racing_one_single_use_token_exactly_one_joins() {
    let cluster = Cluster::start(0);
    let token = cluster.coordinator.create_token("web", 1, "10m");
    let race_dir = cluster.temp.path().join("race");
    let mut agents: Vec<Agent> = (0..50)
        .map(|index| agent(&cluster, &race_dir, &format!("racer-{index}"), &token, "web"))
        .collect();
    // Every loser exits; the winner stays.
    wait_for("49 agents to be refused", || {
        let exited = agents.iter_mut().filter_map(Agent::try_exit_code).count();
        (exited == 49).then_some(())
    });
    let instances = cluster.coordinator.instances();
    assert_eq!(instances.len(), 1, "exactly one instance joined: {instances:?}");
    let winner = instances[0]["hostname"].as_str().expect("hostname").to_owned();
    let still_running: Vec<String> = agents
        .iter_mut()
        .filter_map(|agent| agent.try_exit_code().is_none().then(|| agent.spec.name.clone()))
        .collect();
    assert_eq!(still_running, [winner]);
    let tokens = cluster.coordinator.cli_json(&["token", "list"]);
    assert_eq!(tokens[0]["uses_left"], 0);
}
