//! The coordinator's TLS front door: accepts TCP connections up to a cap,
//! finishes each TLS handshake within a deadline in its own task (a client
//! that never completes one ties up nothing else), and picks the server
//! configuration by TLS name: the agent face demands a client certificate,
//! the public face does not.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rollwave_trust::AGENT_SERVER_NAME;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Bounds on what clients can make the front door hold.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections, handshaking or established, at most.
    pub max_connections: usize,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// The two faces of the coordinator.
#[derive(Clone)]
pub struct TlsFaces {
    pub public: Arc<ServerConfig>,
    pub agent: Arc<ServerConfig>,
}

/// A TCP connection holding one slot of the connection cap until it closes.
pub struct AdmittedStream {
    tcp: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl Connected for AdmittedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp.connect_info()
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for AdmittedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Established TLS connections, ready for the gRPC server.
pub type Incoming = ReceiverStream<Result<TlsStream<AdmittedStream>, io::Error>>;

/// Starts accepting on `listener`; the task ends when the returned stream is dropped.
pub fn accept_tls(listener: TcpListener, faces: TlsFaces, limits: ListenerLimits) -> Incoming {
    let (sender, receiver) = mpsc::channel(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = limits.max_connections, "connection cap reached; dropping connection");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let admitted = AdmittedStream { tcp, _slot: slot };
            let faces = faces.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, handshake(admitted, &faces)).await {
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

async fn handshake(admitted: AdmittedStream, faces: &TlsFaces) -> io::Result<TlsStream<AdmittedStream>> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), admitted).await?;
    let config = if start.client_hello().server_name() == Some(AGENT_SERVER_NAME) {
        faces.agent.clone()
    } else {
        faces.public.clone()
    };
    start.into_stream(config).await
}
