//! An instance's health as `status` and the planner see it: derived on every read from the last
//! verdict its agent sent (and its presence), never stored, like presence; so an agent that goes
//! silent can never stay "healthy". Also which reports are worth a write to the store.

use crate::store::HealthRow;

/// A verdict stays current for this many of the agent's check intervals; older, it is stale.
pub const STALE_AFTER_INTERVALS: i64 = 3;
/// The check interval assumed when the agent did not say: its pause between rounds (2 s) plus a
/// round of one check at the default timeout (5 s).
pub const DEFAULT_CHECK_INTERVAL_MS: i64 = 7_000;

/// What the coordinator can say about an instance's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// Its latest verdict, current, says healthy, and it is online.
    Healthy,
    /// Its latest verdict, current, says unhealthy.
    Unhealthy,
    /// No verdict yet, or its verdict says healthy but it is not online.
    Unknown,
    /// Its latest verdict is older than [`STALE_AFTER_INTERVALS`] check intervals.
    Stale,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Unknown => "unknown",
            HealthState::Stale => "stale",
        }
    }
}

/// The health of an instance (for one bundle) from its latest verdict, at `now_ms`.
pub fn health_state(verdict: Option<&HealthRow>, online: bool, now_ms: i64) -> HealthState {
    let Some(verdict) = verdict else {
        return HealthState::Unknown;
    };
    let interval_ms = if verdict.check_interval_ms > 0 {
        verdict.check_interval_ms
    } else {
        DEFAULT_CHECK_INTERVAL_MS
    };
    if now_ms.saturating_sub(verdict.observed_at_ms) > interval_ms.saturating_mul(STALE_AFTER_INTERVALS) {
        HealthState::Stale
    } else if !verdict.healthy {
        HealthState::Unhealthy
    } else if online {
        HealthState::Healthy
    } else {
        HealthState::Unknown
    }
}

/// The health of an instance over all its bundles: unhealthy if any bundle is, else stale if
/// any verdict is, else unknown if any is (or there is none), else healthy.
pub fn instance_health_state<'a>(
    verdicts: impl IntoIterator<Item = &'a HealthRow>,
    online: bool,
    now_ms: i64,
) -> HealthState {
    let states: Vec<HealthState> = verdicts
        .into_iter()
        .map(|verdict| health_state(Some(verdict), online, now_ms))
        .collect();
    [HealthState::Unhealthy, HealthState::Stale, HealthState::Unknown]
        .into_iter()
        .find(|worse| states.is_empty() && *worse == HealthState::Unknown || states.contains(worse))
        .unwrap_or(HealthState::Healthy)
}

/// Whether `report` must be written over `stored`: when anything but the time changed, or the
/// stored time is a check interval old (so a stored verdict lags by at most one interval, and a
/// restarted coordinator finds it current, while a steady agent costs a write per interval, not
/// per report).
pub fn needs_write(stored: Option<&HealthRow>, report: &HealthRow) -> bool {
    let Some(stored) = stored else {
        return true;
    };
    let interval_ms = if report.check_interval_ms > 0 {
        report.check_interval_ms
    } else {
        stored.check_interval_ms
    };
    stored.version != report.version
        || stored.healthy != report.healthy
        || stored.detail != report.detail
        || stored.app_restarts != report.app_restarts
        || stored.last_exit != report.last_exit
        || stored.last_exit_at_ms != report.last_exit_at_ms
        || (report.check_interval_ms > 0 && stored.check_interval_ms != report.check_interval_ms)
        || report.observed_at_ms.saturating_sub(stored.observed_at_ms) >= interval_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(healthy: bool, observed_at_ms: i64, check_interval_ms: i64) -> HealthRow {
        HealthRow {
            instance_id: "i-1".into(),
            bundle: "app".into(),
            version: "1.0".into(),
            healthy,
            detail: String::new(),
            since_ms: 0,
            observed_at_ms,
            check_interval_ms,
            app_restarts: 0,
            last_exit: String::new(),
            last_exit_at_ms: 0,
        }
    }

    /// Field trial: an agent that stopped sending verdicts stayed "healthy" forever, and an
    /// instance without any verdict counted as healthy.
    #[test]
    fn health_table() {
        let now = 1_000_000;
        let cases = [
            // (verdict: healthy, age in ms, interval in ms; online) -> state
            (None, true, HealthState::Unknown),
            (Some((true, 0, 2_000)), true, HealthState::Healthy),
            (Some((true, 6_000, 2_000)), true, HealthState::Healthy),
            (Some((true, 6_001, 2_000)), true, HealthState::Stale),
            (Some((false, 6_001, 2_000)), true, HealthState::Stale),
            (Some((false, 1_000, 2_000)), true, HealthState::Unhealthy),
            (Some((false, 1_000, 2_000)), false, HealthState::Unhealthy),
            (Some((true, 1_000, 2_000)), false, HealthState::Unknown),
            // An agent that did not say its interval: the default one.
            (Some((true, 21_000, 0)), true, HealthState::Healthy),
            (Some((true, 21_001, 0)), true, HealthState::Stale),
            // Slow checks: the agent's own interval counts.
            (Some((true, 90_000, 32_000)), true, HealthState::Healthy),
        ];
        for (given, online, expected) in cases {
            let row = given.map(|(healthy, age, interval)| verdict(healthy, now - age, interval));
            assert_eq!(
                health_state(row.as_ref(), online, now),
                expected,
                "{given:?} online={online}"
            );
        }
    }

    #[test]
    fn an_instance_is_healthy_only_if_every_bundle_is() {
        let now = 1_000_000;
        let healthy = verdict(true, now, 2_000);
        let unhealthy = verdict(false, now, 2_000);
        let stale = verdict(true, now - 60_000, 2_000);
        let state = |rows: &[&HealthRow]| instance_health_state(rows.iter().copied(), true, now);
        assert_eq!(state(&[]), HealthState::Unknown);
        assert_eq!(state(&[&healthy]), HealthState::Healthy);
        assert_eq!(state(&[&healthy, &stale]), HealthState::Stale);
        assert_eq!(state(&[&stale, &healthy]), HealthState::Stale);
        assert_eq!(state(&[&stale, &unhealthy]), HealthState::Unhealthy);
        assert_eq!(state(&[&healthy, &unhealthy]), HealthState::Unhealthy);
    }

    #[test]
    fn a_steady_agent_costs_a_write_per_interval_and_any_change_one_at_once() {
        let stored = verdict(true, 10_000, 2_000);
        assert!(needs_write(None, &stored));
        assert!(!needs_write(Some(&stored), &verdict(true, 11_999, 2_000)));
        assert!(needs_write(Some(&stored), &verdict(true, 12_000, 2_000)));
        assert!(needs_write(Some(&stored), &verdict(false, 10_500, 2_000)));
        let exited = HealthRow {
            app_restarts: 1,
            last_exit: "exited with code 1".into(),
            last_exit_at_ms: 10_400,
            ..verdict(true, 10_500, 0)
        };
        assert!(needs_write(Some(&stored), &exited));
    }
}
