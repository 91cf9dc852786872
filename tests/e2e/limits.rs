//! The front door's limits under a flood: connections that never finish a
//! handshake and TLS connections that never make a call cannot fill the
//! connection cap; an operator still gets an answer at once.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollwave_tests::{Coordinator, CoordinatorSettings, wait_for};
use rollwave_trust::PUBLIC_SERVER_NAME;
use tokio::net::{TcpSocket, TcpStream};

/// Connections the flood opens at most: thousands, as in the field trial.
const FLOOD: usize = 2000;
/// Idle TLS connections come from this many loopback addresses (127.0.0.2 and up), each below
/// the per-source limit, so that they reach the connection cap.
const TLS_SOURCES: usize = 40;
/// File descriptors the test process keeps for everything else.
const SPARE_FILES: u64 = 512;

/// Raises this process's soft open-file limit to its hard limit; returns the soft limit.
fn raise_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// File descriptors the process `pid` has open.
/// The sockets `pid` holds open (files such as the database's, which its pool opens lazily, do
/// not count: they would move the baseline for reasons that have nothing to do with connections).
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|entry| {
                std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    })
}

/// A TLS connection from `source` to the public face that finishes its handshake and then says
/// nothing.
async fn idle_tls(source: IpAddr, addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Option<impl Sized> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    let tcp = socket.connect(addr).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from(PUBLIC_SERVER_NAME).ok()?;
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_tls_connections_filled_the_connection_cap_for_good() {
    // Half the flood is raw TCP that never starts a handshake, all from one address (beyond the
    // per-source limit); half finishes TLS from many addresses (beyond the connection cap).
    // The test holds every socket it opens.
    let budget = usize::try_from(raise_file_limit().saturating_sub(SPARE_FILES)).unwrap_or(FLOOD);
    let flood = FLOOD.min(budget);
    // The cap is a fifth of the flood (400 for the full one), so the flood overruns it whatever
    // the machine's open-file limit; far too few descriptors for even that fails here, clearly.
    let cap = flood / 5;
    assert!(
        cap > 64,
        "the open-file limit leaves {budget} descriptors: too few to flood past the connection cap"
    );
    let temp = tempfile::tempdir().expect("temp dir");
    let coordinator = tokio::task::block_in_place(|| {
        Coordinator::start_with(
            temp.path(),
            CoordinatorSettings {
                extra_args: ["--max-connections", &cap.to_string(), "--idle-timeout", "2s"]
                    .map(String::from)
                    .to_vec(),
                ..CoordinatorSettings::default()
            },
        )
    });
    let pid = coordinator.pid();
    let baseline = open_files(pid);
    let addr = coordinator.addr;
    let config = rollwave_trust::operator_client_config(&coordinator.ca_pem()).expect("config");

    let started = Instant::now();
    let mut held_tcp = Vec::new();
    for _ in 0..flood / 2 {
        if let Ok(tcp) = TcpStream::connect(addr).await {
            held_tcp.push(tcp);
        }
    }
    let handshakes: Vec<_> = (0..flood / 2)
        .map(|index| {
            let last_octet = u8::try_from(2 + index % TLS_SOURCES).expect("small");
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet));
            tokio::spawn(idle_tls(source, addr, config.clone()))
        })
        .collect();
    let mut held_tls = Vec::new();
    for handshake in handshakes {
        if let Ok(Some(tls)) = handshake.await {
            held_tls.push(tls);
        }
    }
    eprintln!(
        "flood: {} half-open and {} idle TLS connections opened in {:?}",
        held_tcp.len(),
        held_tls.len(),
        started.elapsed()
    );
    assert!(held_tcp.len() >= flood / 4, "the flood connected");

    // An operator still gets an answer, at once.
    let asked = Instant::now();
    let output = tokio::task::block_in_place(|| coordinator.try_cli(&["stack", "list"]));
    let answered_in = asked.elapsed();
    assert!(
        output.status.success(),
        "the CLI was refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("CLI answered in {answered_in:?} with the flood held open");
    assert!(answered_in < Duration::from_secs(1), "the CLI took {answered_in:?}");

    // The coordinator held at most one source's worth of unauthenticated connections, and
    // closes even those once they idle past --idle-timeout, though the clients keep them open.
    tokio::task::block_in_place(|| {
        wait_for("the idle connections to be closed", || {
            let open = open_files(pid);
            (open <= baseline + 4).then_some(open)
        })
    });
    drop((held_tcp, held_tls));
}
