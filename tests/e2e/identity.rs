//! One identity on two hosts (a copied TLS dir, an image baked after
//! joining): while the holder's session is alive the second host is refused,
//! backs off and is shown in `status`; the identity moves only when the
//! holder is dead, whether killed or stopped with its connection still open.

use std::time::Instant;

use nix::sys::signal::Signal;
use rollwave_tests::{Agent, AgentSpec, Cluster, wait_for};

const REFUSED: &str = "another live session holds this identity";

fn refusals(agent: &Agent) -> usize {
    agent.log_text().matches(REFUSED).count()
}

#[test]
fn a_second_host_with_the_same_identity_is_refused_until_the_holder_dies() {
    let cluster = Cluster::start(1);
    let id = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    let spec = AgentSpec {
        name: "copy".into(),
        zone: "z1".into(),
        token: cluster.agents[0].spec.token.clone(),
        stack: Some("web".into()),
        coordinator: cluster.coordinator.addr,
    };
    let started = Instant::now();
    let mut copy = Agent::start_with_identity_of(cluster.temp.path(), spec, &cluster.agents[0]);

    // Refused with the reason, and retried with backoff, not in a hot loop.
    wait_for("the copy to be refused twice", || (refusals(&copy) >= 2).then_some(()));
    let log = copy.log_text();
    assert!(
        log.contains("duplicate identity") && log.contains("join with a new token"),
        "{log}"
    );
    let attempts = refusals(&copy);
    // The harness's agents retry after 0.5 to 1 s (reconnect.max = 1s).
    let most = started.elapsed().as_secs_f64() / 0.5 + 1.0;
    assert!(
        attempts as f64 <= most,
        "{attempts} refusals in {:?}",
        started.elapsed()
    );

    // `status` shows it, in JSON and in the table; the audit trail has it.
    let status = cluster.coordinator.cli_json(&["status", "web"]);
    let shown = status["duplicate_identity"][0].as_str().unwrap_or_default();
    assert!(shown.starts_with(&format!("{id}: {REFUSED}")), "{status}");
    let table = cluster.coordinator.cli(&["status", "web"]);
    assert!(table.contains("duplicate identity (1 instance)"), "{table}");
    let events = cluster.coordinator.cli(&["event", "list"]);
    assert!(
        events
            .lines()
            .any(|line| line.contains("session.open") && line.contains("duplicate identity")),
        "{events}"
    );

    // The holder kept its session all along.
    let holder = cluster
        .coordinator
        .instance_by_hostname("agent-0")
        .expect("holder listed");
    assert_eq!(holder["presence"], "online");
    assert!(
        !cluster.agents[0].log_text().contains("session ended"),
        "the holder was never cut off"
    );

    // Stopped (its connection open, its process silent): the copy takes over.
    cluster.agents[0].signal(Signal::SIGSTOP);
    cluster.coordinator.wait_presence("copy", "online");
    // Resumed, the old holder finds its session replaced and is refused in turn.
    let before = refusals(&cluster.agents[0]);
    cluster.agents[0].signal(Signal::SIGCONT);
    wait_for("the resumed holder to be refused", || {
        (refusals(&cluster.agents[0]) > before).then_some(())
    });
    assert!(
        cluster.coordinator.instance_by_hostname("copy").is_some(),
        "the copy keeps it"
    );

    // Killed: the first agent takes the identity back at its next attempt.
    copy.kill();
    cluster.coordinator.wait_presence("agent-0", "online");
    assert_eq!(cluster.coordinator.instances().len(), 1);
}
