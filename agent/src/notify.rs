//! Tells systemd how the agent is doing, for `Type=notify` (the sd_notify
//! protocol: one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET`). READY=1 once the agent is connected and runs the
//! approved releases the coordinator sent, or after a fallback when the
//! coordinator stays unreachable or their install keeps failing (STATUS= then
//! says "install failing since T: reason" for as long as it does);
//! EXTEND_TIMEOUT_USEC while recovery or the first install runs; WATCHDOG=1 at
//! half of `$WATCHDOG_USEC`; STATUS= lines for `systemctl status`; STOPPING=1
//! when the agent stops. Without `$NOTIFY_SOCKET` every call is a no-op.
//!
//! The protocol is a few lines of std (no crate): the `sd-notify` crate reads
//! the socket only from the process environment, so tests could not point it
//! at their own socket without mutating the environment (`unsafe` in Rust
//! 2024, and forbidden here).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long the agent tries to reach the coordinator and install the approved
/// releases before it reports ready anyway, so boot is not held up (agent.toml
/// `ready_fallback`). The installed releases keep running meanwhile and the
/// agent keeps trying.
pub const READY_FALLBACK: Duration = Duration::from_secs(90);
/// How often the start timeout is extended while recovery or an install runs.
const EXTEND_EVERY: Duration = Duration::from_secs(10);
/// How far each extension reaches: three missed extensions and systemd gives up.
const EXTEND_BY: Duration = Duration::from_secs(30);

/// Where the agent is on its way to ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// Finishing or rolling back installs a killed agent left behind.
    Recovering,
    /// Joining or opening a session; the fallback clock runs.
    Connecting,
    /// Connected; applying the desired state (this epoch) sent with the hello.
    Installing { epoch: u64 },
    /// Connected, but installing the approved releases keeps failing; the agent retries.
    Failing { since_unix_ms: i64, reason: String },
    /// Connected and the desired state is applied.
    Ready,
}

/// The socket systemd listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// Linux abstract socket (`$NOTIFY_SOCKET` starting with `@`), name without the `@`.
    Abstract(Vec<u8>),
}

/// Sends notifications to the service manager; does nothing when there is none.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`, as systemd sets them.
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok(), std::process::id())
    }

    /// From variables looked up by `var`, for the process `pid` (the watchdog
    /// is ours only when `WATCHDOG_PID` is unset or names us).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, pid: u32) -> Self {
        let target = var("NOTIFY_SOCKET").and_then(|socket| {
            if let Some(name) = socket.strip_prefix('@') {
                Some(Target::Abstract(name.as_bytes().to_vec()))
            } else if socket.starts_with('/') {
                Some(Target::Path(PathBuf::from(socket)))
            } else {
                tracing::warn!(%socket, "ignoring NOTIFY_SOCKET: neither an absolute path nor an abstract name");
                None
            }
        });
        let watchdog_ours = var("WATCHDOG_PID").is_none_or(|value| value.trim().parse() == Ok(pid));
        let watchdog = var("WATCHDOG_USEC")
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && watchdog_ours)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    /// Notifications to the unix socket at `path` (tests bind their own).
    pub fn to_path(path: impl Into<PathBuf>, watchdog: Option<Duration>) -> Self {
        Self {
            target: Some(Target::Path(path.into())),
            watchdog,
        }
    }

    /// Whether a service manager listens at all.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send WATCHDOG=1: half the service manager's timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Sends `lines` as one datagram. Failures are logged, never fatal: the
    /// agent's job does not depend on the service manager hearing it.
    pub fn send(&self, lines: &[String]) {
        let Some(target) = &self.target else {
            return;
        };
        let message = lines.join("\n");
        if let Err(error) = send_datagram(target, message.as_bytes()) {
            tracing::warn!(?target, %error, %message, "cannot notify the service manager");
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[status_line(status)]);
    }

    pub fn ready(&self, status: &str) {
        self.send(&["READY=1".to_owned(), status_line(status)]);
    }

    pub fn extend_timeout(&self, by: Duration) {
        self.send(&[format!("EXTEND_TIMEOUT_USEC={}", by.as_micros())]);
    }

    pub fn watchdog(&self) {
        self.send(&["WATCHDOG=1".to_owned()]);
    }

    pub fn stopping(&self) {
        self.send(&["STOPPING=1".to_owned(), status_line("stopping")]);
    }
}

/// One STATUS= line: the protocol is line based, so newlines would end it early.
fn status_line(status: &str) -> String {
    format!("STATUS={}", status.replace('\n', " "))
}

fn send_datagram(target: &Target, message: &[u8]) -> std::io::Result<usize> {
    let socket = UnixDatagram::unbound()?;
    // Never stall the runtime on a full receive queue; a dropped notification is logged.
    socket.set_nonblocking(true)?;
    match target {
        Target::Path(path) => socket.send_to(message, path),
        Target::Abstract(name) => socket.send_to_addr(message, &SocketAddr::from_abstract_name(name)?),
    }
}

/// Sends STOPPING=1 when dropped, which is how the agent's run ends (SIGTERM
/// drops it) as well as on a fatal error.
#[derive(Debug)]
pub struct StoppingOnDrop(pub Notifier);

impl Drop for StoppingOnDrop {
    fn drop(&mut self) {
        self.0.stopping();
    }
}

fn describe(startup: &Startup) -> String {
    match startup {
        Startup::Recovering => "recovering interrupted installs".to_owned(),
        Startup::Connecting => "connecting to the coordinator".to_owned(),
        Startup::Installing { epoch } => format!("connected; applying the desired state (epoch {epoch})"),
        Startup::Failing { since_unix_ms, reason } => crate::reconcile::failing_text(*since_unix_ms, reason),
        Startup::Ready => "connected; desired state applied".to_owned(),
    }
}

/// Reports `startup` to the service manager until the agent stops: STATUS on
/// every change (also after ready: an install that starts or stops failing
/// says so), READY=1 once (on [`Startup::Ready`], or `fallback` after
/// connecting began while the agent is still connecting or its install keeps
/// failing), EXTEND_TIMEOUT_USEC while recovering or installing, WATCHDOG=1
/// throughout.
pub async fn run(notifier: Notifier, mut startup: watch::Receiver<Startup>, fallback: Duration) {
    if !notifier.is_enabled() {
        return;
    }
    let mut watchdog = notifier.watchdog_interval().map(tokio::time::interval);
    let mut extend = tokio::time::interval(EXTEND_EVERY);
    let mut ready = false;
    let mut connecting_since: Option<Instant> = None;
    let mut current = startup.borrow_and_update().clone();
    let mut watching = true;
    notifier.status(&describe(&current));
    loop {
        if current == Startup::Connecting {
            connecting_since.get_or_insert_with(Instant::now);
        }
        if !ready && current == Startup::Ready {
            ready = true;
            notifier.ready(&describe(&current));
        }
        // Boot waits for a coordinator that answers or an install that works, never for good.
        let fallback_at = connecting_since
            .filter(|_| !ready && matches!(current, Startup::Connecting | Startup::Failing { .. }))
            .map(|since| tokio::time::Instant::from_std(since + fallback));
        let extending = !ready && matches!(current, Startup::Recovering | Startup::Installing { .. });
        tokio::select! {
            changed = startup.changed(), if watching => {
                if changed.is_err() {
                    // The agent's run ended; only the watchdog is left to do until it exits.
                    watching = false;
                    continue;
                }
                current = startup.borrow_and_update().clone();
                // The first Ready carries its own STATUS (above).
                if ready || current != Startup::Ready {
                    notifier.status(&describe(&current));
                }
                if matches!(current, Startup::Recovering | Startup::Installing { .. }) {
                    // A long phase begins: extend at once rather than at the next tick.
                    extend.reset_immediately();
                }
            }
            _ = async { tokio::time::sleep_until(fallback_at.expect("guarded")).await }, if fallback_at.is_some() => {
                ready = true;
                let status = match &current {
                    Startup::Failing { .. } => describe(&current),
                    _ => format!(
                        "coordinator unreachable for {}; running the installed releases, still trying",
                        humantime::format_duration(fallback)
                    ),
                };
                notifier.ready(&status);
            }
            _ = extend.tick(), if extending => notifier.extend_timeout(EXTEND_BY),
            _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => notifier.watchdog(),
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::HashMap;

    /// Receives datagrams on a socket in a temp dir.
    struct Listener {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: tokio::net::UnixDatagram,
    }

    impl Listener {
        fn bind() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("notify.sock");
            let socket = tokio::net::UnixDatagram::bind(&path).expect("bind notify socket");
            Self {
                _dir: dir,
                path,
                socket,
            }
        }

        async fn next(&self) -> String {
            let mut buffer = vec![0; 4096];
            let length = tokio::time::timeout(Duration::from_secs(10), self.socket.recv(&mut buffer))
                .await
                .expect("a notification within 10 s")
                .expect("receive");
            String::from_utf8(buffer[..length].to_vec()).expect("utf-8")
        }

        /// The next notification that is not a watchdog ping.
        async fn next_not_watchdog(&self) -> String {
            loop {
                let message = self.next().await;
                if message != "WATCHDOG=1" {
                    return message;
                }
            }
        }
    }

    fn notifier_from(vars: &[(&str, &str)], pid: u32) -> Notifier {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        Notifier::from_vars(|name| vars.get(name).cloned(), pid)
    }

    #[test]
    fn environment_is_read_as_systemd_sets_it() {
        let none = notifier_from(&[], 7);
        assert!(!none.is_enabled());
        assert_eq!(none.watchdog_interval(), None);

        let path = notifier_from(&[("NOTIFY_SOCKET", "/run/systemd/notify")], 7);
        assert_eq!(path.target, Some(Target::Path("/run/systemd/notify".into())));

        let abstract_name = notifier_from(&[("NOTIFY_SOCKET", "@/org/freedesktop/systemd1/notify/1")], 7);
        assert_eq!(
            abstract_name.target,
            Some(Target::Abstract(b"/org/freedesktop/systemd1/notify/1".to_vec()))
        );

        assert!(!notifier_from(&[("NOTIFY_SOCKET", "relative/notify")], 7).is_enabled());

        let ours = notifier_from(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "7")], 7);
        assert_eq!(ours.watchdog_interval(), Some(Duration::from_secs(15)));
        let unnamed = notifier_from(&[("WATCHDOG_USEC", "30000000")], 7);
        assert_eq!(unnamed.watchdog_interval(), Some(Duration::from_secs(15)));
        let someone_elses = notifier_from(&[("WATCHDOG_USEC", "30000000"), ("WATCHDOG_PID", "8")], 7);
        assert_eq!(someone_elses.watchdog_interval(), None);
    }

    #[tokio::test]
    async fn messages_are_one_datagram_each() {
        let listener = Listener::bind();
        let notifier = Notifier::to_path(&listener.path, None);
        notifier.ready("connected\nfine");
        notifier.extend_timeout(Duration::from_secs(30));
        notifier.stopping();
        assert_eq!(listener.next().await, "READY=1\nSTATUS=connected fine");
        assert_eq!(listener.next().await, "EXTEND_TIMEOUT_USEC=30000000");
        assert_eq!(listener.next().await, "STOPPING=1\nSTATUS=stopping");
    }

    #[tokio::test]
    async fn abstract_socket_names_work() {
        let name = format!("rollwave-notify-test-{}-{}", std::process::id(), fastrand::u64(..));
        let address = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        let socket = UnixDatagram::bind_addr(&address).expect("bind abstract socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        let notifier = notifier_from(&[("NOTIFY_SOCKET", &format!("@{name}"))], 1);
        notifier.watchdog();
        let mut buffer = [0; 64];
        let length = socket.recv(&mut buffer).expect("receive");
        assert_eq!(&buffer[..length], b"WATCHDOG=1");
    }

    #[test]
    fn nothing_is_sent_without_a_service_manager() {
        // No socket, so nothing to send to; this must neither panic nor block.
        let notifier = Notifier::default();
        notifier.ready("ready");
        notifier.stopping();
        drop(StoppingOnDrop(notifier));
    }

    #[tokio::test]
    async fn ready_after_the_desired_state_is_applied() {
        let listener = Listener::bind();
        let notifier = Notifier::to_path(&listener.path, Some(Duration::from_millis(200)));
        let (startup, receiver) = watch::channel(Startup::Recovering);
        let task = tokio::spawn(run(notifier, receiver, Duration::from_secs(3600)));

        assert_eq!(
            listener.next_not_watchdog().await,
            "STATUS=recovering interrupted installs"
        );
        assert_eq!(listener.next_not_watchdog().await, "EXTEND_TIMEOUT_USEC=30000000");
        startup.send_replace(Startup::Connecting);
        assert_eq!(
            listener.next_not_watchdog().await,
            "STATUS=connecting to the coordinator"
        );
        startup.send_replace(Startup::Installing { epoch: 4 });
        assert_eq!(
            listener.next_not_watchdog().await,
            "STATUS=connected; applying the desired state (epoch 4)"
        );
        assert_eq!(listener.next_not_watchdog().await, "EXTEND_TIMEOUT_USEC=30000000");
        startup.send_replace(Startup::Ready);
        assert_eq!(
            listener.next_not_watchdog().await,
            "READY=1\nSTATUS=connected; desired state applied"
        );
        // The watchdog keeps going after ready, also once the agent's run has ended.
        drop(startup);
        assert_eq!(listener.next().await, "WATCHDOG=1");
        task.abort();
    }

    /// Field trial: with S3 unreachable at boot the agent said "ready: connected and the desired
    /// state is applied". Ready waits for the install (up to the fallback), and says why it did not.
    #[tokio::test]
    async fn a_failing_install_holds_ready_until_the_fallback_and_says_so_until_it_works() {
        let listener = Listener::bind();
        let notifier = Notifier::to_path(&listener.path, None);
        let (startup, receiver) = watch::channel(Startup::Connecting);
        let task = tokio::spawn(run(notifier, receiver, Duration::from_millis(500)));
        assert_eq!(listener.next().await, "STATUS=connecting to the coordinator");
        startup.send_replace(Startup::Installing { epoch: 3 });
        assert_eq!(
            listener.next().await,
            "STATUS=connected; applying the desired state (epoch 3)"
        );
        assert_eq!(listener.next().await, "EXTEND_TIMEOUT_USEC=30000000");
        let failing = Startup::Failing {
            since_unix_ms: 1_765_000_000_000,
            reason: "app@1.0: bucket unreachable".into(),
        };
        startup.send_replace(failing);
        let failing_status = "STATUS=install failing since 2025-12-06T05:46:40Z: app@1.0: bucket unreachable";
        assert_eq!(listener.next().await, failing_status);
        assert_eq!(listener.next().await, format!("READY=1\n{failing_status}"));
        startup.send_replace(Startup::Ready);
        assert_eq!(listener.next().await, "STATUS=connected; desired state applied");
        task.abort();
    }

    #[tokio::test]
    async fn ready_after_the_fallback_when_the_coordinator_is_unreachable() {
        let listener = Listener::bind();
        let notifier = Notifier::to_path(&listener.path, None);
        let (_startup, receiver) = watch::channel(Startup::Connecting);
        let task = tokio::spawn(run(notifier, receiver, Duration::from_millis(300)));
        assert_eq!(listener.next().await, "STATUS=connecting to the coordinator");
        assert_eq!(
            listener.next().await,
            "READY=1\nSTATUS=coordinator unreachable for 300ms; running the installed releases, still trying"
        );
        task.abort();
    }
}
