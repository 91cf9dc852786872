//! How counts read in messages: "1 wave", "3 waves", never "1 waves".

/// "1 instance", "2 instances": `count` with the noun form that agrees with it.
pub fn count_of(count: usize, one: &str, many: &str) -> String {
    if count == 1 {
        format!("1 {one}")
    } else {
        format!("{count} {many}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wave_is_not_one_waves() {
        assert_eq!(count_of(1, "wave", "waves"), "1 wave");
        assert_eq!(count_of(0, "wave", "waves"), "0 waves");
        assert_eq!(count_of(3, "entry", "entries"), "3 entries");
        let one = crate::rollout::Rollout::new(vec![vec!["i-1".to_owned()]], Default::default(), 1, 0)
            .expect("a one-instance rollout");
        assert_eq!(one.summary(), "not started: 1 target in 1 wave");
        let floor = crate::planner::PlanError::MinHealthyUnreachable {
            min_healthy: "75%".parse().expect("an amount"),
            floor: 1,
            stack_size: 1,
            healthy_total: 1,
        };
        assert!(
            floor
                .to_string()
                .contains("1 of the stack's 1 instance must stay healthy during every wave, and 1 is healthy now"),
            "{floor}"
        );
    }

    #[test]
    fn only_a_running_deployment_can_be_aborted_not_abortd() {
        let refusal = |action| {
            let (_, done) = crate::deployer::control_input(action).expect("a known action");
            crate::deployer::DeployError::NotRunning {
                id: "d-1".into(),
                status: "succeeded".into(),
                done,
            }
            .to_string()
        };
        let prefix = "deployment d-1 is succeeded; only a running deployment can be";
        assert_eq!(refusal("abort"), format!("{prefix} aborted"));
        assert_eq!(refusal("pause"), format!("{prefix} paused"));
        assert_eq!(refusal("resume"), format!("{prefix} resumed"));
    }
}
