//! Which release a rollback returns to, decided the same way on the coordinator (a stack's
//! approvals) and on the instance (the agent's activations): a release history read as an undo
//! stack, so that rolling back twice steps back twice instead of rolling forward again.
//!
//! Each entry of the history, oldest first, is either a release that was put in place by going
//! forward (a deployment, an install) or one that a rollback returned to. Going forward pushes
//! the release; a rollback to `V` pops releases until `V` is on top (or, when `V` is no longer on
//! the stack, say after `--to` picked an older one, empties it and pushes `V`). An agent, which
//! cannot tell a coordinator's switch back from a deployment, reads a release that became current
//! again as a return to it. The release in place is the top of the stack; a plain rollback returns
//! to the one below it.
//!
//! ```text
//! deploy 1.0, deploy 2.0, deploy 4.0          stack 1.0 2.0 4.0   rollback → 2.0
//! … rollback to 2.0                           stack 1.0 2.0       rollback → 1.0 (not 4.0)
//! … rollback to 1.0                           stack 1.0           nothing earlier: refused
//! ```

/// One entry of a release history, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    /// The release was put in place going forward.
    Forward(&'a str),
    /// A rollback returned to the release.
    RolledBackTo(&'a str),
    /// The release became current without saying why (an agent cannot tell a coordinator's switch
    /// back or rollback from a deployment): a return to it when it is on the stack, else forward.
    Became(&'a str),
}

/// The releases a rollback may step back through: the bottom first, the release in place last.
pub fn rollback_stack<'a>(history: impl IntoIterator<Item = Step<'a>>) -> Vec<&'a str> {
    let mut stack: Vec<&'a str> = Vec::new();
    for step in history {
        match step {
            Step::Forward(version) => {
                if stack.last() != Some(&version) {
                    stack.push(version);
                }
            }
            Step::Became(version) if !stack.contains(&version) => stack.push(version),
            Step::RolledBackTo(version) | Step::Became(version) => {
                while stack.last().is_some_and(|top| *top != version) {
                    stack.pop();
                }
                if stack.is_empty() {
                    stack.push(version);
                }
            }
        }
    }
    stack
}

/// The release a plain rollback returns to: the newest release below the one in place that
/// `usable` accepts (the agent asks that it still be on disk), or `None` when there is none.
pub fn rollback_target<'a>(stack: &[&'a str], usable: impl Fn(&str) -> bool) -> Option<&'a str> {
    let (in_place, earlier) = stack.split_last()?;
    earlier
        .iter()
        .rev()
        .copied()
        .find(|version| version != in_place && usable(version))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `+V` goes forward to V, `<V` rolls back to V, `=V` became current (either); returns the stack
    /// and the plain rollback target.
    fn check(script: &str) -> (String, Option<String>) {
        let steps: Vec<Step<'_>> = script
            .split_whitespace()
            .map(|word| match word.split_at(1) {
                ("+", version) => Step::Forward(version),
                ("<", version) => Step::RolledBackTo(version),
                ("=", version) => Step::Became(version),
                _ => panic!("{word:?}: write +V, <V or =V"),
            })
            .collect();
        let stack = rollback_stack(steps);
        let target = rollback_target(&stack, |_| true).map(str::to_owned);
        (stack.join(" "), target)
    }

    #[test]
    fn rolling_back_twice_steps_back_twice() {
        let cases = [
            ("", ("", None)),
            ("+1", ("1", None)),
            ("+1 +2", ("1 2", Some("1"))),
            ("+1 +2 +4", ("1 2 4", Some("2"))),
            // The field trial: 2.0 → 4.0 → rollback → 2.0, and a second rollback went to 4.0 again.
            ("+1 +2 +4 <2", ("1 2", Some("1"))),
            ("+1 +2 +4 <2 <1", ("1", None)),
            // Going forward after a rollback starts a new branch; the rolled-back release is gone.
            ("+1 +2 +4 <2 +5", ("1 2 5", Some("2"))),
            // `--to` an older release skips the ones between.
            ("+1 +2 +3 +4 <1", ("1", None)),
            // A release redeployed on top of itself counts once.
            ("+1 +2 +2", ("1 2", Some("1"))),
            // Rolled back to a release no longer on the stack (history trimmed): it is the bottom.
            ("+3 +4 <1", ("1", None)),
            // Forward to a release seen before (a redeploy of 1 after 2): it goes on top again.
            ("+1 +2 +1", ("1 2 1", Some("2"))),
            // The agent's view: a coordinator's switch back or rollback to 2 reads as a return.
            ("=1 =2 =4 =2", ("1 2", Some("1"))),
            ("=1 =2 =4 =2 =5", ("1 2 5", Some("2"))),
            ("=1 =2 =4 =2 <1", ("1", None)),
        ];
        for (script, (stack, target)) in cases {
            assert_eq!(
                check(script),
                (stack.to_owned(), target.map(str::to_owned)),
                "{script:?}"
            );
        }
    }

    #[test]
    fn the_target_skips_releases_that_are_not_usable() {
        let stack = ["1", "2", "3", "4"];
        assert_eq!(rollback_target(&stack, |version| version != "3"), Some("2"));
        assert_eq!(rollback_target(&stack, |_| false), None);
        // The release in place further down the stack is not a target either.
        assert_eq!(rollback_target(&["1", "2", "1"], |_| true), Some("2"));
        assert_eq!(rollback_target(&["2", "1"], |version| version == "1"), None);
    }
}
