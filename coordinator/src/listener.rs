//! The coordinator's TLS front door: accepts TCP connections up to a cap,
//! finishes each TLS handshake within a deadline in its own task (a client
//! that never completes one ties up nothing else), and picks the server
//! configuration by TLS name: the agent face demands a client certificate,
//! the public face does not.
//!
//! Connections that hold a slot without using it cannot keep anyone out:
//! one with no HTTP/2 stream open for the idle timeout is closed; connections
//! not yet authenticated (no agent certificate, no stream ever opened) are
//! limited per source address; and at either limit the oldest such connection
//! is closed to make room rather than the new one refused. Agent connections
//! (the agent face, whose handshake demands a certificate we issued) never
//! count against a source, so fleets behind NAT connect, all at once if need
//! be. [`StreamTracking`] tells the table when streams open and end.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use http_body_util::BodyExt;
use rollwave_trust::AGENT_SERVER_NAME;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// How often the idle sweep runs at most (it runs at a quarter of the idle timeout when shorter).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Bounds on what clients can make the front door hold.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections, handshaking or established, at most.
    pub max_connections: usize,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// A connection with no HTTP/2 stream open for this long is closed.
    pub idle_timeout: Duration,
    /// Connections from one address that have not authenticated yet (no agent certificate,
    /// no stream opened), at most.
    pub max_pending_per_source: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(10),
            max_pending_per_source: 64,
        }
    }
}

/// What the front door knows about one open connection.
#[derive(Debug)]
struct Connection {
    /// Accept order: a lower id is older.
    id: u64,
    peer: SocketAddr,
    /// Asked for the agent face, whose handshake demands a certificate we issued (it is closed
    /// if it has none by the handshake timeout), so it never counts as unauthenticated: a fleet
    /// behind one NAT address reconnecting at once is not mistaken for a flood.
    agent: AtomicBool,
    /// Opened at least one stream.
    streamed: AtomicBool,
    open_streams: AtomicUsize,
    /// Since when no stream has been open (the accept, or the end of its last stream).
    idle_since: Mutex<Instant>,
    closed: AtomicBool,
    /// The task reading the connection, woken to notice `closed`.
    reader: AtomicWaker,
}

impl Connection {
    /// Not yet authenticated: counts against its source address.
    fn is_pending(&self) -> bool {
        !self.agent.load(Ordering::Acquire) && !self.streamed.load(Ordering::Acquire)
    }

    fn is_idle(&self) -> bool {
        self.open_streams.load(Ordering::Acquire) == 0
    }

    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.idle_since.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Makes its reads and writes fail, so whoever holds it (handshake or HTTP/2) drops it.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.reader.wake();
    }

    fn closed_error() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by the coordinator's connection limits",
        )
    }
}

/// The open connections, oldest first, and the rules that make room for new ones.
#[derive(Debug)]
pub struct Connections {
    limits: ListenerLimits,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    by_id: BTreeMap<u64, Arc<Connection>>,
    by_peer: HashMap<SocketAddr, Arc<Connection>>,
}

impl Table {
    fn remove(&mut self, connection: &Connection) {
        self.by_id.remove(&connection.id);
        if self
            .by_peer
            .get(&connection.peer)
            .is_some_and(|entry| entry.id == connection.id)
        {
            self.by_peer.remove(&connection.peer);
        }
    }

    /// Closes the oldest connection that `may_go` allows; returns whether there was one.
    fn close_oldest(&mut self, may_go: impl Fn(&Connection) -> bool) -> Option<Arc<Connection>> {
        let victim = self.by_id.values().find(|connection| may_go(connection)).cloned()?;
        victim.close();
        self.remove(&victim);
        Some(victim)
    }
}

impl Connections {
    pub fn new(limits: ListenerLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::default(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many connections are open.
    pub fn len(&self) -> usize {
        self.table().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes in a new connection from `peer`, closing the oldest unauthenticated one of the same
    /// source at its limit, and the oldest one without a stream at the cap; `None` when every
    /// connection is busy with streams (the new one is refused).
    fn admit(&self, peer: SocketAddr) -> Option<Arc<Connection>> {
        let mut table = self.table();
        let source: IpAddr = peer.ip();
        let pending_here = table
            .by_id
            .values()
            .filter(|connection| connection.peer.ip() == source && connection.is_pending())
            .count();
        if pending_here >= self.limits.max_pending_per_source
            && let Some(victim) =
                table.close_oldest(|connection| connection.peer.ip() == source && connection.is_pending())
        {
            tracing::debug!(peer = %victim.peer, "too many unauthenticated connections from one address; closed the oldest");
        }
        if table.by_id.len() >= self.limits.max_connections {
            match table.close_oldest(Connection::is_idle) {
                Some(victim) => {
                    tracing::debug!(peer = %victim.peer, "connection cap reached; closed the oldest connection without a stream")
                }
                None => return None,
            }
        }
        table.next_id += 1;
        let connection = Arc::new(Connection {
            id: table.next_id,
            peer,
            agent: AtomicBool::new(false),
            streamed: AtomicBool::new(false),
            open_streams: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            closed: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        });
        table.by_id.insert(connection.id, connection.clone());
        table.by_peer.insert(peer, connection.clone());
        Some(connection)
    }

    /// Closes every connection that has had no stream open for the idle timeout.
    fn sweep_idle(&self, now: Instant) {
        let mut table = self.table();
        let idle: Vec<Arc<Connection>> = table
            .by_id
            .values()
            .filter(|connection| connection.is_idle() && connection.idle_for(now) >= self.limits.idle_timeout)
            .cloned()
            .collect();
        for connection in idle {
            tracing::debug!(peer = %connection.peer, "no stream within the idle timeout; closing the connection");
            connection.close();
            table.remove(&connection);
        }
    }

    fn by_peer(&self, peer: &SocketAddr) -> Option<Arc<Connection>> {
        self.table().by_peer.get(peer).cloned()
    }
}

/// One open stream of a connection; the connection counts as busy while any is alive.
struct StreamGuard(Arc<Connection>);

impl StreamGuard {
    fn open(connection: Arc<Connection>) -> Self {
        connection.streamed.store(true, Ordering::Release);
        connection.open_streams.fetch_add(1, Ordering::AcqRel);
        Self(connection)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        // Set the time first: the sweep reads it only once no stream is open.
        *self.0.idle_since.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.open_streams.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tower layer for the gRPC server that counts each request (an HTTP/2 stream) against its
/// connection until its response body ends.
#[derive(Debug, Clone)]
pub struct StreamTracking {
    connections: Arc<Connections>,
}

impl StreamTracking {
    pub fn new(connections: Arc<Connections>) -> Self {
        Self { connections }
    }
}

impl<S> tower::Layer<S> for StreamTracking {
    type Service = TrackedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackedService {
            inner,
            connections: self.connections.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrackedService<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S, RequestBody> tower::Service<http::Request<RequestBody>> for TrackedService<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let guard = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|info| info.get_ref().remote_addr())
            .and_then(|peer| self.connections.by_peer(&peer))
            .map(StreamGuard::open);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                // The guard lives as long as the response body: until the stream ends.
                tonic::body::Body::new(body.map_frame(move |frame| {
                    let _stream = &guard;
                    frame
                }))
            }))
        })
    }
}

/// The two faces of the coordinator.
#[derive(Clone)]
pub struct TlsFaces {
    pub public: Arc<ServerConfig>,
    pub agent: Arc<ServerConfig>,
}

/// A TCP connection in the table until it closes; its reads and writes fail once the table
/// closes it.
pub struct AdmittedStream {
    tcp: TcpStream,
    connection: Arc<Connection>,
    connections: Arc<Connections>,
}

impl Drop for AdmittedStream {
    fn drop(&mut self) {
        self.connections.table().remove(&self.connection);
    }
}

impl Connected for AdmittedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.connection.reader.register(cx.waker());
        if self.connection.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(Connection::closed_error()));
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.connection.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(Connection::closed_error()));
        }
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.connection.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(Connection::closed_error()));
        }
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Established TLS connections, ready for the gRPC server.
pub type Incoming = ReceiverStream<Result<TlsStream<AdmittedStream>, io::Error>>;

/// Starts accepting on `listener` into `connections`; the task ends when the returned stream is
/// dropped.
pub fn accept_tls(listener: TcpListener, faces: TlsFaces, connections: Arc<Connections>) -> Incoming {
    let (sender, receiver) = mpsc::channel(64);
    let limits = connections.limits;
    let sweeping = connections.clone();
    let sweep_sender = sender.clone();
    tokio::spawn(async move {
        let interval = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), SWEEP_INTERVAL);
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => sweeping.sweep_idle(Instant::now()),
                () = sweep_sender.closed() => return,
            }
        }
    });
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            let Some(connection) = connections.admit(peer) else {
                tracing::warn!(%peer, limit = limits.max_connections, "connection cap reached and every connection has a stream open; dropping connection");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let admitted = AdmittedStream {
                tcp,
                connection: connection.clone(),
                connections: connections.clone(),
            };
            let faces = faces.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, handshake(admitted, &connection, &faces)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

async fn handshake(
    admitted: AdmittedStream,
    connection: &Connection,
    faces: &TlsFaces,
) -> io::Result<TlsStream<AdmittedStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), admitted).await?;
    let config = if start.client_hello().server_name() == Some(AGENT_SERVER_NAME) {
        connection.agent.store(true, Ordering::Release);
        faces.agent.clone()
    } else {
        faces.public.clone()
    };
    start.into_stream(config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_connections: usize, max_pending_per_source: usize) -> ListenerLimits {
        ListenerLimits {
            max_connections,
            max_pending_per_source,
            ..ListenerLimits::default()
        }
    }

    fn peer(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn unauthenticated_connections_from_one_source_make_room_oldest_first() {
        let connections = Connections::new(limits(100, 2));
        let first = connections.admit(peer([10, 0, 0, 1], 1)).expect("admitted");
        let second = connections.admit(peer([10, 0, 0, 1], 2)).expect("admitted");
        // Authenticated connections never count: an agent, and a client that made a call.
        let agent = connections.admit(peer([10, 0, 0, 1], 3)).expect("admitted");
        agent.agent.store(true, Ordering::Release);
        let caller = connections.admit(peer([10, 0, 0, 1], 4)).expect("admitted");
        drop(StreamGuard::open(caller.clone()));
        let elsewhere = connections.admit(peer([10, 0, 0, 2], 1)).expect("admitted");

        let third = connections
            .admit(peer([10, 0, 0, 1], 5))
            .expect("the new one is admitted");
        assert!(
            first.closed.load(Ordering::Acquire),
            "the oldest pending one of that source went"
        );
        for kept in [&second, &agent, &caller, &elsewhere, &third] {
            assert!(!kept.closed.load(Ordering::Acquire), "{:?} kept", kept.peer);
        }
        assert_eq!(connections.len(), 5);
    }

    #[test]
    fn at_the_cap_the_oldest_connection_without_a_stream_goes() {
        let connections = Connections::new(limits(3, 100));
        let busy = connections.admit(peer([10, 0, 0, 1], 1)).expect("admitted");
        let _stream = StreamGuard::open(busy.clone());
        let idle = connections.admit(peer([10, 0, 0, 2], 1)).expect("admitted");
        let agent = connections.admit(peer([10, 0, 0, 3], 1)).expect("admitted");
        agent.agent.store(true, Ordering::Release);
        let _agent_session = StreamGuard::open(agent.clone());

        let newcomer = connections.admit(peer([10, 0, 0, 4], 1)).expect("room made");
        assert!(idle.closed.load(Ordering::Acquire));
        assert!(!busy.closed.load(Ordering::Acquire) && !agent.closed.load(Ordering::Acquire));
        assert_eq!(connections.len(), 3);

        // When every connection has a call open, the new one is refused instead.
        let _newcomer_stream = StreamGuard::open(newcomer.clone());
        assert!(connections.admit(peer([10, 0, 0, 5], 1)).is_none());
        assert!(!newcomer.closed.load(Ordering::Acquire));
    }

    #[test]
    fn connections_idle_past_the_timeout_are_closed() {
        let connections = Connections::new(ListenerLimits {
            idle_timeout: Duration::from_secs(10),
            ..ListenerLimits::default()
        });
        let silent = connections.admit(peer([10, 0, 0, 1], 1)).expect("admitted");
        let calling = connections.admit(peer([10, 0, 0, 1], 2)).expect("admitted");
        let stream = StreamGuard::open(calling.clone());
        let finished = connections.admit(peer([10, 0, 0, 1], 3)).expect("admitted");
        drop(StreamGuard::open(finished.clone()));

        let accepted_at = *silent.idle_since.lock().expect("lock");
        connections.sweep_idle(accepted_at + Duration::from_secs(9));
        assert_eq!(connections.len(), 3, "nothing is idle long enough yet");
        connections.sweep_idle(accepted_at + Duration::from_secs(10));
        assert!(silent.closed.load(Ordering::Acquire), "no stream within the timeout");
        assert!(!calling.closed.load(Ordering::Acquire), "a call in progress keeps it");
        // The one whose stream ended counts from the end of that stream.
        let ended_at = *finished.idle_since.lock().expect("lock");
        connections.sweep_idle(ended_at + Duration::from_secs(10));
        assert!(finished.closed.load(Ordering::Acquire));
        drop(stream);
        connections.sweep_idle(Instant::now() + Duration::from_secs(10));
        assert!(connections.is_empty());
    }
}
