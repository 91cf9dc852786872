//! Whether an instance is online, offline or lost: derived on every read from
//! its session and its last heartbeat, never stored, so a coordinator restart
//! cannot leave a stale answer behind.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Has a session and heartbeats on time.
    Online,
    /// No session (or heartbeats late), for less than `lost_after`.
    Offline,
    /// Not heard from for `lost_after` or longer: counts neither as healthy
    /// nor as a deployment target.
    Lost,
}

impl Presence {
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Offline => "offline",
            Presence::Lost => "lost",
        }
    }
}

/// How long silence may last before an instance changes presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresencePolicy {
    pub offline_after: Duration,
    pub lost_after: Duration,
}

impl Default for PresencePolicy {
    fn default() -> Self {
        Self {
            offline_after: Duration::from_secs(15),
            lost_after: Duration::from_secs(600),
        }
    }
}

impl PresencePolicy {
    pub fn presence(&self, has_session: bool, last_seen_ms: i64, now_ms: i64) -> Presence {
        let silence_ms = now_ms.saturating_sub(last_seen_ms).max(0);
        let silence = Duration::from_millis(silence_ms.unsigned_abs());
        if silence >= self.lost_after {
            Presence::Lost
        } else if has_session && silence < self.offline_after {
            Presence::Online
        } else {
            Presence::Offline
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_table() {
        let policy = PresencePolicy {
            offline_after: Duration::from_secs(10),
            lost_after: Duration::from_secs(60),
        };
        let cases = [
            // (has_session, silence in seconds, expected)
            (true, 0, Presence::Online),
            (true, 9, Presence::Online),
            (true, 10, Presence::Offline), // session open but heartbeats stopped
            (false, 0, Presence::Offline),
            (false, 59, Presence::Offline),
            (false, 60, Presence::Lost),
            (true, 60, Presence::Lost),
        ];
        for (has_session, silence_s, expected) in cases {
            let now = 1_000_000;
            let last_seen = now - silence_s * 1000;
            assert_eq!(
                policy.presence(has_session, last_seen, now),
                expected,
                "session={has_session} silence={silence_s}s"
            );
        }
    }

    #[test]
    fn a_clock_that_went_backwards_reads_as_fresh() {
        let policy = PresencePolicy::default();
        assert_eq!(policy.presence(true, 2_000, 1_000), Presence::Online);
    }
}
