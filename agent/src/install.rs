//! The install state machine, pure: which step of installing a release comes
//! next, what a failure leads to, and where an install resumes after the
//! agent was killed. No I/O, no clock; `installer` carries the steps out and
//! journals every state before acting on it.
//!
//! Success path (steps are skipped when they do not apply):
//!
//! ```text
//! prepare:  Fetch → Unpack → BeforeInstall → AfterInstall
//! activate: ApplicationStop (previous release) → Switch → ApplicationStart → ValidateService → Health
//! ```
//!
//! A failure before the switch leaves `current` untouched; a failure after
//! it switches back and restarts the previous release. After a crash, a
//! prepare step or the switch is redone (each is idempotent); a crash after
//! the switch returns to the previous release.

use serde::{Deserialize, Serialize};

/// One step of an install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Fetch,
    Unpack,
    BeforeInstall,
    AfterInstall,
    ApplicationStop,
    Switch,
    ApplicationStart,
    ValidateService,
    Health,
    /// Point `current` back at the previous release (or remove it on a first install).
    SwitchBack,
    /// Run the previous release's `application_start` again.
    RestartPrevious,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Unpack => "unpack",
            Stage::BeforeInstall => "before_install",
            Stage::AfterInstall => "after_install",
            Stage::ApplicationStop => "application_stop",
            Stage::Switch => "switch",
            Stage::ApplicationStart => "application_start",
            Stage::ValidateService => "validate_service",
            Stage::Health => "health",
            Stage::SwitchBack => "switch_back",
            Stage::RestartPrevious => "restart_previous",
        }
    }

    fn is_hook(self) -> bool {
        matches!(
            self,
            Stage::BeforeInstall
                | Stage::AfterInstall
                | Stage::ApplicationStop
                | Stage::ApplicationStart
                | Stage::ValidateService
                | Stage::RestartPrevious
        )
    }
}

/// What the install is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Download, verify, unpack and run the install hooks; leave `current` alone.
    Prepare,
    /// Prepare if needed, then make the release current.
    Activate,
}

/// Everything the decisions depend on, fixed when the install starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub bundle: String,
    pub version: String,
    pub sha256: String,
    pub goal: Goal,
    pub run_hooks: bool,
    /// A failing `application_stop` of the previous release does not block the install.
    pub ignore_stop_failure: bool,
    /// The release `current` pointed to when the install started.
    pub previous: Option<String>,
    /// The release is on disk with its install hooks done: skip the prepare steps.
    pub already_prepared: bool,
}

/// Where an install stands; journaled after every transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// About to run (or re-run) `stage`. `failure` is set while rolling back.
    Running {
        stage: Stage,
        failure: Option<String>,
    },
    Succeeded,
    Failed {
        /// What went wrong first.
        failure: String,
        /// How the way back went, when there was one: `None` if `current` was never touched.
        rollback: Option<Rollback>,
        /// The new release never served: remove it from disk.
        discard_new_release: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Rollback {
    /// `current` is back on the previous release (or absent on a first install).
    Restored,
    /// The way back failed too; the instance needs attention.
    Broken(String),
}

impl Job {
    fn applies(&self, stage: Stage) -> bool {
        if stage.is_hook() && !self.run_hooks {
            return false;
        }
        match stage {
            Stage::Fetch | Stage::Unpack | Stage::BeforeInstall | Stage::AfterInstall => !self.already_prepared,
            Stage::ApplicationStop => self.goal == Goal::Activate && self.previous.is_some(),
            Stage::Switch | Stage::ApplicationStart | Stage::ValidateService | Stage::Health => {
                self.goal == Goal::Activate
            }
            Stage::SwitchBack => true,
            Stage::RestartPrevious => self.previous.is_some(),
        }
    }

    /// The first stage of the success path after `after` (or from the start).
    fn next_on_success_path(&self, after: Option<Stage>) -> Option<Stage> {
        const PATH: [Stage; 9] = [
            Stage::Fetch,
            Stage::Unpack,
            Stage::BeforeInstall,
            Stage::AfterInstall,
            Stage::ApplicationStop,
            Stage::Switch,
            Stage::ApplicationStart,
            Stage::ValidateService,
            Stage::Health,
        ];
        let start = match after {
            None => 0,
            Some(stage) => PATH.iter().position(|candidate| *candidate == stage)? + 1,
        };
        PATH[start..].iter().copied().find(|stage| self.applies(*stage))
    }

    /// The state an install starts in; `Succeeded` at once when there is nothing to do.
    pub fn start(&self) -> JobState {
        match self.next_on_success_path(None) {
            Some(stage) => JobState::Running { stage, failure: None },
            None => JobState::Succeeded,
        }
    }

    /// `stage` succeeded.
    pub fn on_success(&self, state: &JobState) -> JobState {
        let JobState::Running { stage, failure } = state else {
            return state.clone();
        };
        match (failure, stage) {
            (None, _) => match self.next_on_success_path(Some(*stage)) {
                Some(next) => JobState::Running {
                    stage: next,
                    failure: None,
                },
                None => JobState::Succeeded,
            },
            (Some(failure), Stage::SwitchBack) if self.applies(Stage::RestartPrevious) => JobState::Running {
                stage: Stage::RestartPrevious,
                failure: Some(failure.clone()),
            },
            (Some(failure), _) => JobState::Failed {
                failure: failure.clone(),
                rollback: Some(Rollback::Restored),
                discard_new_release: !self.already_prepared,
            },
        }
    }

    /// `stage` failed with `error`.
    pub fn on_failure(&self, state: &JobState, error: &str) -> JobState {
        let JobState::Running { stage, failure } = state else {
            return state.clone();
        };
        let described = format!("{}: {error}", stage.as_str());
        if let Some(first) = failure {
            // The way back failed: stop and say so, keeping the first failure.
            return JobState::Failed {
                failure: first.clone(),
                rollback: Some(Rollback::Broken(described)),
                discard_new_release: false,
            };
        }
        match stage {
            Stage::Fetch | Stage::Unpack | Stage::BeforeInstall | Stage::AfterInstall => JobState::Failed {
                failure: described,
                rollback: None,
                discard_new_release: !self.already_prepared,
            },
            Stage::ApplicationStop if self.ignore_stop_failure => self.on_success(state),
            // The previous release may be partly stopped, but it is still current: keep
            // the prepared release for another attempt.
            Stage::ApplicationStop => JobState::Failed {
                failure: format!("{described} (retry with the option to ignore application_stop failures)"),
                rollback: None,
                discard_new_release: false,
            },
            // The atomic switch did not happen; the previous release was stopped: start it again.
            Stage::Switch if self.applies(Stage::RestartPrevious) => JobState::Running {
                stage: Stage::RestartPrevious,
                failure: Some(described),
            },
            Stage::Switch => JobState::Failed {
                failure: described,
                rollback: None,
                discard_new_release: !self.already_prepared,
            },
            Stage::ApplicationStart | Stage::ValidateService | Stage::Health => JobState::Running {
                stage: Stage::SwitchBack,
                failure: Some(described),
            },
            Stage::SwitchBack | Stage::RestartPrevious => JobState::Failed {
                failure: described.clone(),
                rollback: Some(Rollback::Broken(described)),
                discard_new_release: false,
            },
        }
    }

    /// Where an install resumes after the agent was killed in `state`.
    pub fn on_restart(&self, state: &JobState) -> JobState {
        match state {
            JobState::Running {
                stage: Stage::ApplicationStart | Stage::ValidateService | Stage::Health,
                failure: None,
            } => JobState::Running {
                stage: Stage::SwitchBack,
                failure: Some("the agent restarted during activation; returned to the previous release".into()),
            },
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn job(goal: Goal, previous: Option<&str>) -> Job {
        Job {
            bundle: "web".into(),
            version: "2.0".into(),
            sha256: "ab".repeat(32),
            goal,
            run_hooks: true,
            ignore_stop_failure: false,
            previous: previous.map(str::to_owned),
            already_prepared: false,
        }
    }

    /// Runs `job` to the end, failing the stages in `failing`; returns the stages run and the end state.
    fn check(job: &Job, failing: &[Stage]) -> (Vec<&'static str>, JobState) {
        let mut state = job.start();
        let mut ran = Vec::new();
        while let JobState::Running { stage, .. } = state {
            ran.push(stage.as_str());
            assert!(ran.len() < 40, "the machine must terminate");
            state = if failing.contains(&stage) {
                job.on_failure(&state, "boom")
            } else {
                job.on_success(&state)
            };
        }
        (ran, state)
    }

    #[test]
    fn activation_runs_the_whole_path() {
        let (ran, end) = check(&job(Goal::Activate, Some("1.0")), &[]);
        assert_eq!(
            ran,
            [
                "fetch",
                "unpack",
                "before_install",
                "after_install",
                "application_stop",
                "switch",
                "application_start",
                "validate_service",
                "health"
            ]
        );
        assert_eq!(end, JobState::Succeeded);
    }

    #[test]
    fn first_install_has_no_stop_and_prepare_stops_before_the_switch() {
        let (ran, _) = check(&job(Goal::Activate, None), &[]);
        assert!(!ran.contains(&"application_stop"));
        let (ran, end) = check(&job(Goal::Prepare, Some("1.0")), &[]);
        assert_eq!(ran, ["fetch", "unpack", "before_install", "after_install"]);
        assert_eq!(end, JobState::Succeeded);
    }

    #[test]
    fn without_hooks_only_files_move() {
        let quiet = Job {
            run_hooks: false,
            ..job(Goal::Activate, Some("1.0"))
        };
        assert_eq!(check(&quiet, &[]).0, ["fetch", "unpack", "switch", "health"]);
    }

    #[test]
    fn a_prepared_release_activates_without_repeating_the_prepare_steps() {
        let prepared = Job {
            already_prepared: true,
            ..job(Goal::Activate, Some("1.0"))
        };
        assert_eq!(check(&prepared, &[]).0[0], "application_stop");
        let nothing = Job {
            already_prepared: true,
            ..job(Goal::Prepare, Some("1.0"))
        };
        assert_eq!(nothing.start(), JobState::Succeeded);
    }

    #[test]
    fn failures_before_the_switch_leave_current_alone() {
        for stage in [Stage::Fetch, Stage::Unpack, Stage::BeforeInstall, Stage::AfterInstall] {
            let (ran, end) = check(&job(Goal::Activate, Some("1.0")), &[stage]);
            assert!(!ran.contains(&"switch"), "{stage:?}");
            assert!(
                matches!(
                    end,
                    JobState::Failed {
                        rollback: None,
                        discard_new_release: true,
                        ..
                    }
                ),
                "{stage:?}: {end:?}"
            );
        }
    }

    #[test]
    fn failures_after_the_switch_switch_back_and_restart_the_previous_release() {
        for stage in [Stage::ApplicationStart, Stage::ValidateService, Stage::Health] {
            let (ran, end) = check(&job(Goal::Activate, Some("1.0")), &[stage]);
            assert_eq!(&ran[ran.len() - 2..], ["switch_back", "restart_previous"], "{stage:?}");
            let JobState::Failed { failure, rollback, .. } = end else {
                panic!("{stage:?} must fail");
            };
            assert!(failure.starts_with(stage.as_str()), "{failure}");
            assert_eq!(rollback, Some(Rollback::Restored));
        }
    }

    #[test]
    fn a_failing_stop_blocks_unless_ignored() {
        let (ran, end) = check(&job(Goal::Activate, Some("1.0")), &[Stage::ApplicationStop]);
        assert!(!ran.contains(&"switch"));
        assert!(
            matches!(
                end,
                JobState::Failed {
                    discard_new_release: false,
                    ..
                }
            ),
            "{end:?}"
        );
        let lenient = Job {
            ignore_stop_failure: true,
            ..job(Goal::Activate, Some("1.0"))
        };
        assert_eq!(check(&lenient, &[Stage::ApplicationStop]).1, JobState::Succeeded);
    }

    #[test]
    fn a_broken_way_back_is_reported_with_the_first_failure() {
        let (_, end) = check(&job(Goal::Activate, Some("1.0")), &[Stage::Health, Stage::SwitchBack]);
        let JobState::Failed { failure, rollback, .. } = end else {
            panic!("must fail");
        };
        assert!(failure.starts_with("health"), "{failure}");
        assert!(matches!(rollback, Some(Rollback::Broken(detail)) if detail.starts_with("switch_back")));
    }

    #[test]
    fn a_crash_after_the_switch_returns_to_the_previous_release() {
        let job = job(Goal::Activate, Some("1.0"));
        let during_start = JobState::Running {
            stage: Stage::ApplicationStart,
            failure: None,
        };
        assert!(matches!(
            job.on_restart(&during_start),
            JobState::Running {
                stage: Stage::SwitchBack,
                failure: Some(_)
            }
        ));
        for stage in [
            Stage::Fetch,
            Stage::Unpack,
            Stage::AfterInstall,
            Stage::Switch,
            Stage::SwitchBack,
        ] {
            let state = JobState::Running { stage, failure: None };
            assert_eq!(job.on_restart(&state), state, "{stage:?} is redone");
        }
    }

    fn any_stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            Just(Stage::Fetch),
            Just(Stage::Unpack),
            Just(Stage::BeforeInstall),
            Just(Stage::AfterInstall),
            Just(Stage::ApplicationStop),
            Just(Stage::Switch),
            Just(Stage::ApplicationStart),
            Just(Stage::ValidateService),
            Just(Stage::Health),
            Just(Stage::SwitchBack),
            Just(Stage::RestartPrevious),
        ]
    }

    proptest! {
        /// Whatever fails, the install ends; if it ends failed after touching
        /// `current`, it went through SwitchBack; it never switches after a failure.
        #[test]
        fn every_install_terminates_and_never_ends_switched_after_failing(
            failing in proptest::collection::vec(any_stage(), 0..4),
            has_previous in any::<bool>(),
            run_hooks in any::<bool>(),
            prepared in any::<bool>(),
        ) {
            let job = Job {
                run_hooks,
                already_prepared: prepared,
                ..job(Goal::Activate, has_previous.then_some("1.0"))
            };
            let (ran, end) = check(&job, &failing);
            let switched_at = ran.iter().position(|stage| *stage == "switch");
            if let (JobState::Failed { .. }, Some(at)) = (&end, switched_at) {
                let switch_failed = failing.contains(&Stage::Switch);
                prop_assert!(switch_failed || ran[at..].contains(&"switch_back"), "{ran:?}");
            }
            let first_failure = ran.iter().position(|stage| failing.iter().any(|f| f.as_str() == *stage));
            if let Some(at) = first_failure {
                prop_assert!(!ran[at + 1..].contains(&"switch"), "no switch after a failure: {ran:?}");
            }
        }
    }
}
