//! Damage on one instance's disk never blocks the fleet: a truncated install
//! journal and a `current` that is not a symlink are repaired by the agent on
//! the next deployment, which succeeds, and the coordinator's audit trail says
//! what was repaired.

use rollwave_tests::Fleet;
use serde_json::Value;

/// The field trial: a truncated agent journal made the next deployment of the whole
/// stack fail until someone moved the file aside; a damaged `current` left the
/// instance unable to install anything.
#[test]
fn a_truncated_journal_and_a_damaged_current_do_not_block_the_next_deployment() {
    let fleet = Fleet::start(2);
    fleet.push("1.0");
    let (ok, deployment) = fleet.deploy_and_watch("1.0", &["--strategy", "all-at-once"]);
    assert!(ok, "first deployment: {deployment}");
    fleet.wait_all_on("1.0");

    let journal = fleet.agent_root(0).join("state/journal/app.json");
    let bytes = std::fs::read(&journal).expect("journal of agent 0");
    std::fs::write(&journal, &bytes[..bytes.len() / 2]).expect("truncate");
    let current = fleet.agent_root(1).join("releases/app/current");
    std::fs::remove_file(&current).expect("remove current of agent 1");
    std::fs::create_dir(&current).expect("a directory where the link was");

    fleet.push("2.0");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &["--strategy", "all-at-once"]);
    assert!(ok, "the deployment after the damage: {deployment}");
    assert_eq!(deployment["status"], "succeeded");
    fleet.wait_all_on("2.0");

    let aside = std::fs::read_dir(fleet.agent_root(0).join("state/journal"))
        .expect("journal dir")
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("app.json.corrupt-"))
        .count();
    assert_eq!(aside, 1, "the damaged journal is kept aside for a look");

    let events = fleet.cluster.coordinator.cli_json(&["event", "list", "--limit", "200"]);
    let repairs: Vec<&Value> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event["action"] == "instance.repair")
        .collect();
    for (index, what) in [(0, "moved aside"), (1, "not a symlink")] {
        let instance = fleet.instance_id(index);
        assert!(
            repairs
                .iter()
                .any(|event| event["target"] == instance.as_str() && event.to_string().contains(what)),
            "an audit event says agent {index} ({instance}) repaired \"{what}\": {repairs:?}"
        );
    }
}
