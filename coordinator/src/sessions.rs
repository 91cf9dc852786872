//! The agents connected right now: one entry per live session, so presence
//! can tell online from offline and removal can end a session at once.
//!
//! What goes to an agent travels two ways. Acknowledgements and the end of a
//! session go through a small queue ([`Outbound`]). The desired state does
//! not: each session holds one slot ([`DesiredSlot`]) with the newest desired
//! state, which a push overwrites. Only the latest desired state matters to
//! an agent, so a slow reader gets that one when it reads next, and no push
//! is ever lost to a full queue (a connected agent sends no second hello that
//! could bring it back).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::CoordinatorMessage;
use rollwave_proto::v1::coordinator_message::Body as CoordinatorBody;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::Status;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// The newest desired state not yet read by the session's stream.
pub type DesiredSlot = watch::Sender<Option<pb::DesiredState>>;

/// What a session's response stream yields.
pub type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

struct Session {
    id: u64,
    outbound: Outbound,
    desired: DesiredSlot,
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
    pub fn open(&self, instance_id: &str, outbound: Outbound, desired: DesiredSlot) -> u64 {
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        let previous = lock(&self.live).insert(instance_id.to_owned(), Session { id, outbound, desired });
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

    /// Puts `state` in the slot of the instance's session, unless the slot
    /// holds a newer epoch (two pushes can race between taking their epochs
    /// and arriving here). `false` only when the instance has no session: it
    /// gets its stored wish with its next hello. Never drops `state` for a
    /// slow reader: the stream sends whatever the slot holds when it reads.
    pub fn push_desired(&self, instance_id: &str, state: pb::DesiredState) -> bool {
        let live = lock(&self.live);
        let Some(session) = live.get(instance_id) else {
            return false;
        };
        session.desired.send_if_modified(|slot| {
            if slot.as_ref().is_some_and(|held| held.epoch >= state.epoch) {
                return false;
            }
            *slot = Some(state);
            true
        });
        true
    }

    pub fn is_connected(&self, instance_id: &str) -> bool {
        lock(&self.live).contains_key(instance_id)
    }

    pub fn count(&self) -> usize {
        lock(&self.live).len()
    }
}

/// The stream a session answers with: `first` (the hello acknowledgement),
/// then the desired state whenever the slot changes, ahead of anything queued
/// on `control` after it. So an agent that sees its first heartbeat
/// acknowledgement has already received the desired state sent with its
/// hello (its readiness relies on that). The stream ends when `control`
/// does.
pub fn session_stream(
    first: CoordinatorMessage,
    control: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
    desired: watch::Receiver<Option<pb::DesiredState>>,
) -> SessionStream {
    struct Parts {
        first: Option<CoordinatorMessage>,
        control: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
        desired: watch::Receiver<Option<pb::DesiredState>>,
        desired_open: bool,
    }
    let parts = Parts {
        first: Some(first),
        control,
        desired,
        desired_open: true,
    };
    Box::pin(futures::stream::unfold(parts, |mut parts| async move {
        if let Some(first) = parts.first.take() {
            return Some((Ok(first), parts));
        }
        loop {
            tokio::select! {
                biased;
                changed = parts.desired.changed(), if parts.desired_open => match changed {
                    Ok(()) => {
                        let state = parts.desired.borrow_and_update().clone();
                        if let Some(state) = state {
                            let message = CoordinatorMessage {
                                body: Some(CoordinatorBody::DesiredState(state)),
                            };
                            return Some((Ok(message), parts));
                        }
                    }
                    // The session was replaced or ended; whatever is queued still goes out.
                    Err(_) => parts.desired_open = false,
                },
                message = parts.control.recv() => return message.map(|message| (message, parts)),
            }
        }
    }))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use tokio_stream::StreamExt;

    use super::*;

    fn desired(epoch: u64) -> pb::DesiredState {
        pb::DesiredState {
            epoch,
            ..pb::DesiredState::default()
        }
    }

    fn heartbeat_ack(sequence: u64) -> CoordinatorMessage {
        CoordinatorMessage {
            body: Some(CoordinatorBody::HeartbeatAck(pb::HeartbeatAck { sequence })),
        }
    }

    /// A session as `grpc::agent` opens it, with a control queue of `queue`.
    fn open(sessions: &Sessions, instance_id: &str, queue: usize) -> (Outbound, SessionStream, u64) {
        let (outbound, control) = mpsc::channel(queue);
        let (slot, desired) = watch::channel(None);
        let hello_ack = CoordinatorMessage {
            body: Some(CoordinatorBody::HelloAck(pb::HelloAck::default())),
        };
        let id = sessions.open(instance_id, outbound.clone(), slot);
        (outbound, session_stream(hello_ack, control, desired), id)
    }

    /// What the agent reads, as short labels, until nothing more is ready.
    async fn read_ready(stream: &mut SessionStream) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(Some(message)) = stream.next().now_or_never() {
            seen.push(match message.map(|message| message.body) {
                Ok(Some(CoordinatorBody::HelloAck(_))) => "hello-ack".to_owned(),
                Ok(Some(CoordinatorBody::HeartbeatAck(ack))) => format!("ack {}", ack.sequence),
                Ok(Some(CoordinatorBody::DesiredState(state))) => format!("desired {}", state.epoch),
                Ok(None) => "empty".to_owned(),
                Err(status) => format!("end: {}", status.message()),
            });
        }
        seen
    }

    #[tokio::test]
    async fn a_newer_session_replaces_and_ends_the_older_one() {
        let sessions = Sessions::default();
        let (_old_outbound, mut old_stream, old) = open(&sessions, "i-1", 4);
        let (_new_outbound, _new_stream, new) = open(&sessions, "i-1", 4);
        assert_eq!(
            read_ready(&mut old_stream).await,
            ["hello-ack", "end: replaced by a newer session of the same instance"],
            "old session told to end"
        );
        sessions.close("i-1", old);
        assert!(
            sessions.is_connected("i-1"),
            "closing the old session keeps the new one"
        );
        sessions.close("i-1", new);
        assert!(!sessions.is_connected("i-1"));
    }

    /// The field trial: with the agent's queue full, a new desired state was dropped
    /// ("sent on its next hello", which a connected agent never sends) and the rollout
    /// failed the instance at its deadline.
    #[tokio::test]
    async fn a_slow_session_gets_the_latest_desired_state_and_no_push_is_dropped() {
        let sessions = Sessions::default();
        let (outbound, mut stream, _) = open(&sessions, "i-1", 2);
        // The agent reads nothing while the queue fills up with acknowledgements.
        let mut queued = 0;
        while outbound.try_send(Ok(heartbeat_ack(queued + 1))).is_ok() {
            queued += 1;
        }
        assert_eq!(queued, 2, "the control queue is full");
        for epoch in 1..=1000 {
            assert!(
                sessions.push_desired("i-1", desired(epoch)),
                "push of epoch {epoch} dropped"
            );
        }
        assert_eq!(
            read_ready(&mut stream).await,
            ["hello-ack", "desired 1000", "ack 1", "ack 2"],
            "the newest desired state, once, and the queued acknowledgements"
        );
        assert!(sessions.push_desired("i-1", desired(1001)));
        assert_eq!(read_ready(&mut stream).await, ["desired 1001"]);
        assert!(
            !sessions.push_desired("i-2", desired(1)),
            "no session, nothing to push to"
        );
    }

    #[tokio::test]
    async fn an_older_desired_state_never_replaces_a_newer_one_in_the_slot() {
        let sessions = Sessions::default();
        let (_outbound, mut stream, _) = open(&sessions, "i-1", 4);
        assert!(sessions.push_desired("i-1", desired(7)));
        assert!(sessions.push_desired("i-1", desired(5)), "a race lost is not a drop");
        assert_eq!(read_ready(&mut stream).await, ["hello-ack", "desired 7"]);
        assert!(sessions.push_desired("i-1", desired(7)));
        assert_eq!(read_ready(&mut stream).await, Vec::<String>::new(), "not sent twice");
    }

    /// The agent counts itself in sync at its first heartbeat acknowledgement, and expects
    /// the desired state sent with its hello to be there by then.
    #[tokio::test]
    async fn the_desired_state_sent_with_the_hello_goes_out_before_later_acknowledgements() {
        let sessions = Sessions::default();
        let (outbound, mut stream, _) = open(&sessions, "i-1", 4);
        assert!(sessions.push_desired("i-1", desired(3)));
        outbound.try_send(Ok(heartbeat_ack(1))).expect("room");
        assert_eq!(read_ready(&mut stream).await, ["hello-ack", "desired 3", "ack 1"]);
    }
}
