//! The agents connected right now: one entry per live session, so presence
//! can tell online from offline and removal can end a session at once.
//!
//! One certificate holds at most one session. When a second session arrives
//! for an instance that has one, the first is probed (a `Ping` over its own
//! stream, answered by the agent's session loop): if it answers within
//! [`PROBE_TIMEOUT`], its agent is alive and the newcomer is refused as a
//! duplicate identity (two hosts share one identity: a copied TLS dir, an
//! image baked after joining); if not, it is dead (a reconnect after a network
//! blip, a stopped process) and the newcomer takes its place. Admissions of
//! one instance run one at a time.
//!
//! The probe is a message of the session protocol rather than an HTTP/2 PING
//! frame: tonic's server (hyper) keeps each connection's h2 ping handle to
//! itself (only its keepalive uses it), so a handler cannot ping the
//! connection of another stream; and an answer from the agent's session loop
//! proves more than one from its HTTP/2 stack.
//!
//! What goes to an agent travels two ways. Acknowledgements, probes and the
//! end of a session go through a small queue ([`Outbound`]). The desired state
//! does not: each session holds one slot ([`DesiredSlot`]) with the newest
//! desired state, which a push overwrites. Only the latest desired state
//! matters to an agent, so a slow reader gets that one when it reads next, and
//! no push is ever lost to a full queue (a connected agent sends no second
//! hello that could bring it back).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::coordinator_message::Body as CoordinatorBody;
use rollwave_proto::v1::{CoordinatorMessage, Ping};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::Status;

pub type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// The newest desired state not yet read by the session's stream.
pub type DesiredSlot = watch::Sender<Option<pb::DesiredState>>;

/// What a session's response stream yields.
pub type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

/// How long a live session's agent has to answer a probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused duplicate stays visible in `status` after its last attempt.
const DUPLICATE_SHOWN_FOR_MS: i64 = 5 * 60 * 1000;

struct Session {
    id: u64,
    outbound: Outbound,
    /// The probe waiting for this session's answer: (nonce, who waits).
    probe: Option<(u64, oneshot::Sender<()>)>,
    desired: DesiredSlot,
}

/// Another host tried to use an identity whose session was alive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DuplicateIdentity {
    /// The address the refused session came from.
    pub peer: String,
    pub first_refused_ms: i64,
    pub last_refused_ms: i64,
    pub refusals: u64,
}

/// What admitting a new session did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The new session is registered; `replaced` when a dead one made way for it.
    Opened { session_id: u64, replaced: bool },
    /// A live session holds the identity: the new one must be refused.
    Duplicate,
}

#[derive(Default)]
pub struct Sessions {
    next_id: Mutex<u64>,
    live: Mutex<HashMap<String, Session>>,
    /// One gate per instance being admitted, so probes of one instance never overlap.
    admitting: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    duplicates: Mutex<HashMap<String, DuplicateIdentity>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("live", &self.count()).finish()
    }
}

impl Sessions {
    fn next_id(&self) -> u64 {
        let mut next = lock(&self.next_id);
        *next += 1;
        *next
    }

    /// Admits a new session of `instance_id` whose messages go to `outbound`:
    /// opened if the instance has no session or its session does not answer a
    /// probe within `probe_timeout` (that one is ended), refused if it answers.
    pub async fn admit(
        &self,
        instance_id: &str,
        outbound: Outbound,
        desired: DesiredSlot,
        probe_timeout: Duration,
    ) -> Admission {
        let gate = lock(&self.admitting).entry(instance_id.to_owned()).or_default().clone();
        let admission = {
            let _admitting = gate.lock().await;
            self.admit_alone(instance_id, outbound, desired, probe_timeout).await
        };
        let mut admitting = lock(&self.admitting);
        // Only the map and this call hold the gate: nobody waits, forget it.
        if admitting
            .get(instance_id)
            .is_some_and(|held| Arc::strong_count(held) == 2)
        {
            admitting.remove(instance_id);
        }
        admission
    }

    async fn admit_alone(
        &self,
        instance_id: &str,
        outbound: Outbound,
        desired: DesiredSlot,
        probe_timeout: Duration,
    ) -> Admission {
        let probe = {
            let mut live = lock(&self.live);
            live.get_mut(instance_id).map(|session| {
                let nonce = self.next_id();
                let (answered, answer) = oneshot::channel();
                session.probe = Some((nonce, answered));
                let ping = CoordinatorMessage {
                    body: Some(CoordinatorBody::Ping(Ping { nonce })),
                };
                // A full queue: the agent is not reading, which is what dead means here.
                let sent = session.outbound.try_send(Ok(ping)).is_ok();
                (session.id, sent, answer)
            })
        };
        let replaced = match probe {
            None => false,
            Some((old_id, sent, answer)) => {
                // A closed answer channel: the session ended (or was replaced) meanwhile.
                let alive = sent && matches!(tokio::time::timeout(probe_timeout, answer).await, Ok(Ok(())));
                if alive {
                    return Admission::Duplicate;
                }
                let mut live = lock(&self.live);
                if live.get(instance_id).is_some_and(|session| session.id == old_id)
                    && let Some(dead) = live.remove(instance_id)
                {
                    let _ = dead.outbound.try_send(Err(Status::aborted(
                        "replaced: a new session of this instance arrived and this one did not answer a ping",
                    )));
                }
                lock(&self.duplicates).remove(instance_id);
                true
            }
        };
        let session_id = self.open(instance_id, outbound, desired);
        Admission::Opened { session_id, replaced }
    }

    /// Registers the session of `instance_id`, replacing (and ending) an
    /// older one. Use [`Sessions::admit`], which decides whether to.
    fn open(&self, instance_id: &str, outbound: Outbound, desired: DesiredSlot) -> u64 {
        let id = self.next_id();
        let session = Session {
            id,
            outbound,
            probe: None,
            desired,
        };
        let previous = lock(&self.live).insert(instance_id.to_owned(), session);
        if let Some(previous) = previous {
            let _ = previous
                .outbound
                .try_send(Err(Status::aborted("replaced by a newer session of the same instance")));
        }
        id
    }

    /// The agent of session `id` answered the probe `nonce`.
    pub fn answer_probe(&self, instance_id: &str, id: u64, nonce: u64) {
        let mut live = lock(&self.live);
        if let Some(session) = live.get_mut(instance_id).filter(|session| session.id == id)
            && session.probe.as_ref().is_some_and(|(waiting, _)| *waiting == nonce)
            && let Some((_, answered)) = session.probe.take()
        {
            let _ = answered.send(());
        }
    }

    /// Whether session `id` is still the one of `instance_id` (not replaced or evicted).
    pub fn is_current(&self, instance_id: &str, id: u64) -> bool {
        lock(&self.live)
            .get(instance_id)
            .is_some_and(|session| session.id == id)
    }

    /// Notes a refused duplicate from `peer`; `true` when it starts a new
    /// streak (nothing refused within the display window), worth an audit event.
    pub fn note_duplicate(&self, instance_id: &str, peer: &str, now_ms: i64) -> bool {
        let mut duplicates = lock(&self.duplicates);
        match duplicates.get_mut(instance_id) {
            Some(seen) if now_ms.saturating_sub(seen.last_refused_ms) < DUPLICATE_SHOWN_FOR_MS => {
                seen.last_refused_ms = now_ms;
                seen.refusals += 1;
                peer.clone_into(&mut seen.peer);
                false
            }
            _ => {
                duplicates.insert(
                    instance_id.to_owned(),
                    DuplicateIdentity {
                        peer: peer.to_owned(),
                        first_refused_ms: now_ms,
                        last_refused_ms: now_ms,
                        refusals: 1,
                    },
                );
                true
            }
        }
    }

    /// The duplicate identity refused for `instance_id` within the display window.
    pub fn duplicate(&self, instance_id: &str, now_ms: i64) -> Option<DuplicateIdentity> {
        lock(&self.duplicates)
            .get(instance_id)
            .filter(|seen| now_ms.saturating_sub(seen.last_refused_ms) < DUPLICATE_SHOWN_FOR_MS)
            .cloned()
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
        lock(&self.duplicates).remove(instance_id);
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

    /// A desired-state slot nobody reads.
    fn slot() -> DesiredSlot {
        watch::channel(None).0
    }

    type Inbox = mpsc::Receiver<Result<CoordinatorMessage, Status>>;

    fn session() -> (Outbound, Inbox) {
        mpsc::channel(4)
    }

    fn opened(admission: Admission) -> u64 {
        match admission {
            Admission::Opened { session_id, .. } => session_id,
            Admission::Duplicate => panic!("expected the session to open"),
        }
    }

    /// Answers the next ping in `inbox` as the agent of session `id` would.
    fn answer_pings(sessions: Arc<Sessions>, id: u64, mut inbox: Inbox) -> tokio::task::JoinHandle<Inbox> {
        tokio::spawn(async move {
            while let Some(message) = inbox.recv().await {
                if let Ok(CoordinatorMessage {
                    body: Some(CoordinatorBody::Ping(ping)),
                }) = message
                {
                    sessions.answer_probe("i-1", id, ping.nonce);
                    break;
                }
            }
            inbox
        })
    }

    #[tokio::test]
    async fn a_second_session_of_a_live_identity_is_refused_and_the_first_keeps_its_place() {
        let sessions = Arc::new(Sessions::default());
        let (first_tx, first_rx) = session();
        let first = opened(sessions.admit("i-1", first_tx, slot(), PROBE_TIMEOUT).await);
        let answering = answer_pings(sessions.clone(), first, first_rx);
        let (second_tx, _second_rx) = session();
        let second = sessions.admit("i-1", second_tx, slot(), PROBE_TIMEOUT).await;
        assert_eq!(second, Admission::Duplicate);
        assert!(sessions.is_current("i-1", first));
        let mut first_rx = answering.await.expect("answering task");
        assert!(first_rx.try_recv().is_err(), "the live session was not told to end");
        assert!(sessions.note_duplicate("i-1", "10.0.0.2:4000", 1_000), "a new streak");
        assert!(
            !sessions.note_duplicate("i-1", "10.0.0.2:4001", 2_000),
            "the same streak"
        );
        let seen = sessions.duplicate("i-1", 2_000).expect("shown");
        assert_eq!((seen.refusals, seen.peer.as_str()), (2, "10.0.0.2:4001"));
        assert_eq!(sessions.duplicate("i-1", 2_000 + DUPLICATE_SHOWN_FOR_MS), None);
    }

    #[tokio::test]
    async fn a_session_that_does_not_answer_is_replaced_by_the_newcomer() {
        let sessions = Sessions::default();
        let (old_tx, mut old_rx) = session();
        let old = opened(sessions.admit("i-1", old_tx, slot(), PROBE_TIMEOUT).await);
        sessions.note_duplicate("i-1", "10.0.0.2:4000", 0);
        let (new_tx, _new_rx) = session();
        // The old session's agent never reads its stream (a stopped process).
        let admission = sessions.admit("i-1", new_tx, slot(), Duration::from_millis(100)).await;
        let Admission::Opened {
            session_id: new,
            replaced,
        } = admission
        else {
            panic!("a dead session must make way: {admission:?}")
        };
        assert!(replaced);
        assert!(matches!(old_rx.recv().await, Some(Ok(_))), "the old session was pinged");
        assert!(matches!(old_rx.recv().await, Some(Err(_))), "then told to end");
        sessions.close("i-1", old);
        assert!(
            sessions.is_current("i-1", new),
            "closing the old session keeps the new one"
        );
        assert_eq!(sessions.duplicate("i-1", 1), None, "a takeover is no duplicate");
        sessions.close("i-1", new);
        assert!(!sessions.is_connected("i-1"));
    }

    #[tokio::test]
    async fn a_session_that_ended_is_replaced_without_waiting_for_the_probe() {
        let sessions = Sessions::default();
        let (old_tx, old_rx) = session();
        opened(sessions.admit("i-1", old_tx, slot(), PROBE_TIMEOUT).await);
        drop(old_rx); // The agent went away; the coordinator has not noticed yet.
        let (new_tx, _new_rx) = session();
        let started = std::time::Instant::now();
        let admission = sessions.admit("i-1", new_tx, slot(), Duration::from_secs(60)).await;
        assert!(
            matches!(admission, Admission::Opened { replaced: true, .. }),
            "{admission:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

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
                Ok(Some(CoordinatorBody::Ping(ping))) => format!("ping {}", ping.nonce),
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
