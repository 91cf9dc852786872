//! A real HAProxy for traffic tests: `haproxy -db` in the foreground with a configuration in its
//! own temp dir (frontend on a free loopback port, runtime API on a unix socket and on TCP),
//! killed when dropped. Tests bring the backend section.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rollwave_coordinator::traffic::{HaproxyRuntime, RuntimeAddress, TrafficProvider};

/// The backend every test configuration names.
pub const BACKEND: &str = "app";

/// One running HAProxy.
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
    directory: tempfile::TempDir,
    pub frontend_port: u16,
    pub tcp_api_port: u16,
}

impl Haproxy {
    /// Starts HAProxy with `backend` (the text of a `backend app` section, servers included)
    /// behind a frontend on a free port.
    pub fn start(backend: &str) -> Self {
        require_haproxy();
        let directory = tempfile::tempdir().expect("temp dir");
        let frontend_port = free_port();
        let tcp_api_port = free_port();
        let socket = directory.path().join("admin.sock");
        let config = format!(
            "global
    stats socket {socket} level admin
    stats socket ipv4@127.0.0.1:{tcp_api_port} level admin
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
frontend web
    bind 127.0.0.1:{frontend_port}
    default_backend {BACKEND}
{backend}",
            socket = socket.display(),
        );
        let config_path = directory.path().join("haproxy.cfg");
        std::fs::write(&config_path, config).expect("write haproxy.cfg");
        let log = std::fs::File::create(directory.path().join("haproxy.log")).expect("create haproxy.log");
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&config_path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        Haproxy {
            child,
            directory,
            frontend_port,
            tcp_api_port,
        }
    }

    /// The runtime API's unix socket.
    pub fn socket(&self) -> PathBuf {
        self.directory.path().join("admin.sock")
    }

    pub fn provider(&self) -> TrafficProvider {
        TrafficProvider::Haproxy(
            HaproxyRuntime::new(RuntimeAddress::Unix(self.socket())).with_exchange_timeout(Duration::from_secs(5)),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("haproxy.log")).unwrap_or_default()
    }

    /// Panics with HAProxy's log if it exited.
    pub fn check_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("haproxy exited ({status}):\n{}", self.log());
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fails loudly when HAProxy is missing: `tests/run` installs it, and nothing is skipped.
pub fn require_haproxy() {
    let installed = Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        installed,
        "haproxy is not installed: run the suite through tests/run, which installs it (apt-get install haproxy)"
    );
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}
