//! Rolling deployments end to end: a real coordinator, real agents in three
//! zones, releases pushed to the S3 server `tests/run` starts. Wave order is
//! checked against the agents' own records of when they switched (their
//! install journals), not against what the coordinator says.

use rollwave_tests::fleet::{bundle_status, wave_instances};
use rollwave_tests::{Fleet, wait_for};
use serde_json::Value;

/// A fleet of 6 in 3 zones, all on app@1.0 (approved), deployed all at once.
fn fleet_on_v1() -> Fleet {
    let fleet = Fleet::start(6);
    fleet.push("1.0");
    let (ok, deployment) = fleet.deploy_and_watch("1.0", &["--strategy", "all-at-once"]);
    assert!(ok, "first deployment: {deployment}");
    fleet.wait_all_on("1.0");
    fleet
}

#[test]
fn a_rolling_deployment_goes_canary_first_then_zone_by_zone() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &[]);
    assert!(ok, "{deployment}");
    assert_eq!(deployment["status"], "succeeded");
    fleet.wait_all_on("2.0");

    let waves = deployment["waves"].as_array().expect("waves");
    assert_eq!(waves[0]["kind"], "canary");
    assert_eq!(wave_instances(&deployment, 0).len(), 1, "one canary by default");
    // Zone order: the canary's zone first, then the others by name; 25 % of a zone of 2 is 1 per wave.
    let canary_zone = fleet.cluster.agents[fleet.index_of(&wave_instances(&deployment, 0)[0])]
        .spec
        .zone
        .clone();
    let zones: Vec<&str> = waves[1..]
        .iter()
        .map(|wave| wave["zone"].as_str().expect("zone"))
        .collect();
    assert_eq!(zones[0], canary_zone, "the canary's zone goes first: {zones:?}");
    let mut seen: Vec<&str> = Vec::new();
    for zone in &zones {
        if seen.last() != Some(zone) {
            assert!(!seen.contains(zone), "a zone's waves are together: {zones:?}");
            seen.push(zone);
        }
    }
    let mut rest = seen[1..].to_vec();
    rest.sort_unstable();
    assert_eq!(
        seen[1..],
        rest[..],
        "after the canary's zone, zones go by name: {zones:?}"
    );
    for wave in &waves[1..] {
        assert_eq!(wave["instances"].as_array().expect("instances").len(), 1, "batch of 1");
    }

    // The agents' own clocks: every switch of a wave happened before any of the next.
    let switched_at = |instance: &str| -> i64 {
        let index = fleet.index_of(instance);
        let switched: Vec<i64> = fleet
            .activations(index)
            .into_iter()
            .filter(|(version, _)| version == "2.0")
            .map(|(_, at)| at)
            .collect();
        assert_eq!(switched.len(), 1, "{instance} switched to 2.0 exactly once");
        switched[0]
    };
    let mut previous_end = i64::MIN;
    for index in 0..waves.len() {
        let times: Vec<i64> = wave_instances(&deployment, index)
            .iter()
            .map(|id| switched_at(id))
            .collect();
        let start = *times.iter().min().expect("a wave has instances");
        assert!(
            start > previous_end,
            "wave {index} started before wave {} ended",
            index.saturating_sub(1)
        );
        previous_end = *times.iter().max().expect("max");
    }

    let status = fleet.status();
    let app = bundle_status(&status, "app");
    assert_eq!(app["approved_version"], "2.0");
    // What instances run, as they reported it: all six on 2.0, none drifting.
    wait_for("status to show every instance on 2.0", || {
        let status = fleet.status();
        let app = bundle_status(&status, "app").clone();
        (app["running"]["2.0"] == 6).then_some(())
    });
}

#[test]
fn a_release_failing_its_health_check_is_stopped_at_the_canary() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    std::fs::write(fleet.control("unhealthy-2.0"), b"").expect("control");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &["--healthy-deadline", "20s"]);
    assert!(!ok, "a failed deployment exits non-zero");
    assert_eq!(deployment["status"], "failed", "{deployment}");
    let canary = wave_instances(&deployment, 0)[0].clone();
    for index in 0..fleet.cluster.agents.len() {
        assert_eq!(fleet.current(index).as_deref(), Some("1.0"), "agent {index} serves 1.0");
        let activated_v2 = fleet.activations(index).iter().any(|(version, _)| version == "2.0");
        if fleet.instance_id(index) != canary {
            assert!(!activated_v2, "agent {index} is in a later wave and never switched");
        }
    }
    let status = fleet.status();
    assert_eq!(
        bundle_status(&status, "app")["approved_version"],
        "1.0",
        "approved unchanged"
    );
}

/// Field trial: a canary whose activation failed switched itself back, but the coordinator still
/// wished it the failed release, so the next push to it (a reconnect, or as here the next
/// deployment's prepare) activated that release again, undrained, and it answered users.
#[test]
fn a_release_whose_activation_failed_is_not_activated_again_by_a_later_push() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    let unhealthy = fleet.control("unhealthy-2.0");
    std::fs::write(&unhealthy, b"").expect("control");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &["--healthy-deadline", "20s"]);
    assert!(!ok, "{deployment}");
    assert!(
        deployment["failures"][0]
            .as_str()
            .is_some_and(|failure| failure.contains("activation failed")),
        "the agent switched itself back: {deployment}"
    );
    // Activated again, 2.0 would now pass its health check and stay (and be recorded).
    std::fs::remove_file(&unhealthy).expect("control");
    fleet.push("3.0");
    let (ok, deployment) = fleet.deploy_and_watch("3.0", &[]);
    assert!(ok, "{deployment}");
    fleet.wait_all_on("3.0");
    for index in 0..fleet.cluster.agents.len() {
        assert_eq!(
            fleet.switches_to(index, "2.0"),
            0,
            "agent {index} never ran 2.0: {:?}",
            fleet.activations(index)
        );
    }
}

#[test]
fn a_second_deployment_of_the_same_bundle_is_refused_while_one_runs() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    fleet.push("3.0");
    let started = fleet.try_deploy("2.0", &["--min-healthy-time", "5m"]);
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let running: Value = serde_json::from_slice(&started.stdout).expect("deployment JSON");
    let id = running["id"].as_str().expect("id").to_owned();
    let refused = fleet.try_deploy("3.0", &[]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains(&id), "names the running deployment: {message}");

    let paused = fleet.cluster.coordinator.cli_json(&["deployment", "pause", &id]);
    assert_eq!(paused["paused"], true, "{paused}");
    let resumed = fleet.cluster.coordinator.cli_json(&["deployment", "resume", &id]);
    assert_eq!(resumed["paused"], false, "{resumed}");
    let aborted = fleet.cluster.coordinator.try_cli(&["deployment", "abort", &id]);
    assert!(aborted.status.success(), "{}", String::from_utf8_lossy(&aborted.stderr));
    wait_for("the abort to finish", || {
        let shown = fleet.cluster.coordinator.cli_json(&["deployment", "show", &id]);
        (shown["status"] == "aborted").then_some(())
    });
    fleet.wait_all_on("1.0");
    // Every operator action is in the audit trail.
    let events = fleet.cluster.coordinator.cli_json(&["event", "list", "--limit", "200"]);
    let actions: Vec<String> = events
        .as_array()
        .expect("events")
        .iter()
        .filter(|event| event.to_string().contains(&id))
        .filter_map(|event| event["action"].as_str().map(str::to_owned))
        .collect();
    for action in [
        "deployment.pause",
        "deployment.resume",
        "deployment.abort",
        "deployment.aborted",
    ] {
        assert!(actions.iter().any(|seen| seen == action), "{action} in {actions:?}");
    }
}

#[test]
fn rollback_returns_the_stack_to_the_previous_approved_release() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &["--strategy", "all-at-once"]);
    assert!(ok, "{deployment}");
    fleet.wait_all_on("2.0");
    let output = fleet
        .cluster
        .coordinator
        .try_cli(&["rollback", "web", "app", "--watch", "--output", "json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    fleet.wait_all_on("1.0");
    let status = fleet.status();
    assert_eq!(bundle_status(&status, "app")["approved_version"], "1.0");
    // Fast: nothing downloaded again (the journal shows no second prepare of 1.0).
    for index in 0..fleet.cluster.agents.len() {
        let count = fleet
            .activations(index)
            .iter()
            .filter(|(version, _)| version == "1.0")
            .count();
        assert_eq!(count, 2, "agent {index}: 1.0 twice, 2.0 once in between");
    }

    // Field trial: a second rollback rolled forward again (to 2.0). It steps further back, and
    // here there is nothing before 1.0.
    let again = fleet.cluster.coordinator.try_cli(&["rollback", "web", "app"]);
    assert_eq!(again.status.code(), Some(1), "refused: {again:?}");
    let message = String::from_utf8_lossy(&again.stderr);
    assert!(message.contains("no earlier approved release"), "{message}");
    assert_eq!(bundle_status(&fleet.status(), "app")["approved_version"], "1.0");
    // --to picks a release approved before, forward or back.
    let output = fleet
        .cluster
        .coordinator
        .try_cli(&["rollback", "web", "app", "--to", "2.0", "--watch", "--output", "json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    fleet.wait_all_on("2.0");
    assert_eq!(bundle_status(&fleet.status(), "app")["approved_version"], "2.0");
}

#[test]
fn pinned_instances_are_exceptions_until_unpinned() {
    let fleet = fleet_on_v1();
    fleet.push("2.0");
    let (ok, deployment) = fleet.deploy_and_watch("2.0", &["--strategy", "all-at-once"]);
    assert!(ok, "{deployment}");
    fleet.wait_all_on("2.0");
    let pinned = fleet.instance_id(0);
    fleet
        .cluster
        .coordinator
        .cli(&["pin", "web", "app@1.0", "--instances", &pinned]);
    wait_for("the pinned instance to run 1.0", || {
        (fleet.current(0).as_deref() == Some("1.0")).then_some(())
    });
    wait_for("status to show the pin", || {
        let status = fleet.status();
        let row = bundle_status(&status, "app")["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .find(|row| row["instance_id"] == pinned.as_str())
            .cloned()
            .expect("row");
        (row["state"] == "pinned" && row["running_version"] == "1.0").then_some(())
    });
    fleet.cluster.coordinator.cli(&["unpin", "web", "app"]);
    wait_for("the unpinned instance to return to 2.0", || {
        (fleet.current(0).as_deref() == Some("2.0")).then_some(())
    });
}

#[test]
fn a_coordinator_killed_mid_wave_resumes_and_switches_each_instance_once() {
    let mut fleet = fleet_on_v1();
    fleet.push("2.0");
    let id = fleet.start_deployment("2.0", &["--min-healthy-time", "3s"]);
    wait_for("the deployment to reach its second wave", || {
        let phase = fleet.show(&id)["phase"].as_str().unwrap_or_default().to_owned();
        phase.starts_with("wave 2/").then_some(())
    });
    fleet.cluster.coordinator.restart();
    let finished = fleet.wait_finished(&id);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    fleet.wait_all_on("2.0");
    for index in 0..fleet.cluster.agents.len() {
        assert_eq!(
            fleet.switches_to(index, "2.0"),
            1,
            "agent {index} switched to 2.0 exactly once"
        );
    }
    // Never more than one wave's instances switching at a time: switch times of a wave
    // all precede those of the next, across the restart too.
    let mut previous_end = i64::MIN;
    for wave in 0..finished["waves"].as_array().expect("waves").len() {
        let times: Vec<i64> = wave_instances(&finished, wave)
            .iter()
            .flat_map(|id| fleet.activations(fleet.index_of(id)))
            .filter(|(version, _)| version == "2.0")
            .map(|(_, at)| at)
            .collect();
        assert!(
            *times.iter().min().expect("switched") > previous_end,
            "wave {wave} overlapped the one before"
        );
        previous_end = *times.iter().max().expect("switched");
    }
}

#[test]
fn an_instance_joining_mid_deployment_ends_on_the_new_release() {
    let mut fleet = fleet_on_v1();
    fleet.push("2.0");
    let id = fleet.start_deployment("2.0", &["--min-healthy-time", "2s"]);
    wait_for("the deployment to start its waves", || {
        let phase = fleet.show(&id)["phase"].as_str().unwrap_or_default().to_owned();
        phase.starts_with("wave ").then_some(())
    });
    let token = fleet.cluster.coordinator.create_token("web", 1, "10m");
    fleet.cluster.add_agent("late", "z2", &token);
    let late = fleet.cluster.agents.len() - 1;
    let finished = fleet.wait_finished(&id);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    wait_for("the late agent to run 2.0", || {
        (fleet.current(late).as_deref() == Some("2.0")).then_some(())
    });
    let history: Vec<String> = fleet
        .activations(late)
        .into_iter()
        .map(|(version, _)| version)
        .collect();
    assert_eq!(
        history,
        ["1.0", "2.0"],
        "it installed the approved release first, then joined the deployment"
    );
}

#[test]
fn a_killed_agent_counts_against_the_threshold_and_a_dead_fleet_stalls() {
    let mut fleet = fleet_on_v1();
    fleet.push("2.0");
    // An agent of the last wave dies mid-deployment, after it prepared: its activation is
    // never answered, so it fails at the healthy deadline; one failure is allowed.
    let id = fleet.start_deployment(
        "2.0",
        &[
            "--failure-threshold",
            "1",
            "--healthy-deadline",
            "8s",
            "--progress-deadline",
            "60s",
        ],
    );
    wait_for("the deployment to reach its second wave", || {
        let phase = fleet.show(&id)["phase"].as_str().unwrap_or_default().to_owned();
        phase.starts_with("wave 2/").then_some(())
    });
    let shown = fleet.show(&id);
    let last_wave = shown["waves"].as_array().expect("waves").len() - 1;
    let victim_id = wave_instances(&shown, last_wave)[0].clone();
    let victim = fleet.index_of(&victim_id);
    fleet.cluster.agents[victim].kill();
    let finished = fleet.wait_finished(&id);
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let failures = finished["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{finished}");
    assert!(failures[0].to_string().contains(&victim_id), "{finished}");
    for index in (0..fleet.cluster.agents.len()).filter(|index| *index != victim) {
        assert_eq!(fleet.current(index).as_deref(), Some("2.0"), "agent {index}");
    }

    // Every agent gone: nothing can progress, and the progress deadline ends it.
    fleet.push("3.0");
    for agent in &mut fleet.cluster.agents {
        agent.kill();
    }
    let id = fleet.start_deployment("3.0", &["--progress-deadline", "5s", "--min-healthy", "0"]);
    let finished = fleet.wait_finished(&id);
    assert_eq!(finished["status"], "failed", "{finished}");
    assert!(finished["reason"].to_string().contains("stalled"), "{finished}");
}
