//! The agents connected right now: one entry per live session, so presence
//! can tell online from offline and removal can end a session at once.

use std::collections::HashMap;
use std::sync::Mutex;

use rollwave_proto::v1::CoordinatorMessage;
use tokio::sync::mpsc;
use tonic::Status;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

struct Session {
    id: u64,
    outbound: Outbound,
}

#[derive(Default)]
pub struct Sessions {
    next_id: Mutex<u64>,
    live: Mutex<HashMap<String, Session>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("live", &self.count()).finish()
    }
}

impl Sessions {
    /// Registers the session of `instance_id`, replacing (and ending) an
    /// older one: an agent that reconnects before its old connection timed
    /// out must not be shown twice or receive pushes twice.
    pub fn open(&self, instance_id: &str, outbound: Outbound) -> u64 {
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        let previous = lock(&self.live).insert(instance_id.to_owned(), Session { id, outbound });
        if let Some(previous) = previous {
            let _ = previous
                .outbound
                .try_send(Err(Status::aborted("replaced by a newer session of the same instance")));
        }
        id
    }

    /// Ends the bookkeeping of session `id`, unless a newer one replaced it.
    pub fn close(&self, instance_id: &str, id: u64) {
        let mut live = lock(&self.live);
        if live.get(instance_id).is_some_and(|session| session.id == id) {
            live.remove(instance_id);
        }
    }

    /// Ends the session of a removed instance with `status`.
    pub fn evict(&self, instance_id: &str, status: Status) {
        if let Some(session) = lock(&self.live).remove(instance_id) {
            let _ = session.outbound.try_send(Err(status));
        }
    }

    /// Ends every session with `status` (coordinator shutdown).
    pub fn evict_all(&self, status: Status) {
        for (_, session) in lock(&self.live).drain() {
            let _ = session.outbound.try_send(Err(status.clone()));
        }
    }

    /// Queues `message` on the instance's session; `false` when it has none
    /// (or its queue is full: the agent is not reading, and gets the wish again on its next hello).
    pub fn push(&self, instance_id: &str, message: CoordinatorMessage) -> bool {
        match lock(&self.live).get(instance_id) {
            Some(session) => session.outbound.try_send(Ok(message)).is_ok(),
            None => false,
        }
    }

    pub fn is_connected(&self, instance_id: &str) -> bool {
        lock(&self.live).contains_key(instance_id)
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newer_session_replaces_and_ends_the_older_one() {
        let sessions = Sessions::default();
        let (old_tx, mut old_rx) = mpsc::channel(4);
        let (new_tx, _new_rx) = mpsc::channel(4);
        let old = sessions.open("i-1", old_tx);
        let new = sessions.open("i-1", new_tx);
        assert!(matches!(old_rx.recv().await, Some(Err(_))), "old session told to end");
        sessions.close("i-1", old);
        assert!(
            sessions.is_connected("i-1"),
            "closing the old session keeps the new one"
        );
        sessions.close("i-1", new);
        assert!(!sessions.is_connected("i-1"));
    }
}
