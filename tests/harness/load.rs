//! A steady load through a load balancer, recording every request's outcome: the zero-downtime
//! proofs count failed requests while a deployment runs. Open loop: requests go out on a fixed
//! schedule whatever the answers take, and latency counts from the scheduled time, so a stall
//! shows up as latency instead of silently lowering the rate. Bounded in count and time.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a load runs, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(180);
/// The most of one response read.
const MAX_RESPONSE: usize = 64 * 1024;

/// One request that did not get a 200.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Unix milliseconds of its scheduled start.
    pub at_ms: i64,
    pub error: String,
}

/// Every request's outcome.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub sent: usize,
    pub failures: Vec<Failure>,
    /// Latencies of the successful requests, sorted.
    pub latencies: Vec<Duration>,
    /// Successful responses per body (the apps answer with their version).
    pub bodies: BTreeMap<String, usize>,
    pub duration: Duration,
}

impl LoadReport {
    /// The `q` quantile (0.0 to 1.0) of the successful requests' latencies.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let last = self.latencies.len() - 1;
        // Nearest rank; the float is bounded by `last`, so the conversion cannot overflow.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let rank = ((last as f64) * q).round() as usize;
        self.latencies[rank.min(last)]
    }

    /// "requests 2400, failed 0, p50 1.9 ms, p99 7.4 ms" and what answered.
    pub fn summary(&self) -> String {
        let answered: Vec<String> = self
            .bodies
            .iter()
            .map(|(body, count)| format!("{body}: {count}"))
            .collect();
        format!(
            "requests {}, failed {}, p50 {:.1} ms, p99 {:.1} ms over {:.1} s (answered by {})",
            self.sent,
            self.failures.len(),
            self.quantile(0.50).as_secs_f64() * 1000.0,
            self.quantile(0.99).as_secs_f64() * 1000.0,
            self.duration.as_secs_f64(),
            answered.join(", ")
        )
    }
}

/// A load running in the background until [`Load::stop`].
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    runner: Option<JoinHandle<LoadReport>>,
}

impl Load {
    /// Sends `GET /` to `127.0.0.1:port`, `per_second` times a second, each on a new connection.
    pub fn start(port: u16, per_second: u32) -> Self {
        Self::start_path(port, per_second, "/")
    }

    /// As [`Load::start`], with `GET path` (an app's slow endpoint, say, for requests that are
    /// still in flight when an instance is taken out).
    pub fn start_path(port: u16, per_second: u32, path: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let runner = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime for the load");
            runtime.block_on(run(port, per_second, path, stopping))
        });
        Load {
            stop,
            runner: Some(runner),
        }
    }

    /// Stops sending, waits for the requests in flight, and reports.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        self.runner
            .take()
            .expect("stopped once")
            .join()
            .expect("the load thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

async fn run(port: u16, per_second: u32, path: &'static str, stop: Arc<AtomicBool>) -> LoadReport {
    let interval = Duration::from_secs(1) / per_second.max(1);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_DURATION {
        let scheduled = ticker.tick().await.into_std();
        let at_ms = unix_ms(SystemTime::now());
        requests.push(tokio::spawn(async move {
            let outcome = tokio::time::timeout(REQUEST_TIMEOUT, get(port, path)).await;
            let outcome = match outcome {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
            };
            (at_ms, scheduled.elapsed(), outcome)
        }));
    }
    let mut report = LoadReport {
        sent: requests.len(),
        ..LoadReport::default()
    };
    for request in requests {
        let (at_ms, latency, outcome) = request.await.expect("a request task");
        match outcome {
            Ok(body) => {
                report.latencies.push(latency);
                *report.bodies.entry(body).or_default() += 1;
            }
            Err(error) => report.failures.push(Failure { at_ms, error }),
        }
    }
    report.latencies.sort();
    report.duration = started.elapsed();
    report
}

/// One GET on a new connection; the body of a 200, else what went wrong.
async fn get(port: u16, path: &str) -> Result<String, String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .map_err(|error| format!("connect: {error}"))?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: proof\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .map_err(|error| format!("send: {error}"))?;
    let mut response = Vec::new();
    (&mut stream)
        .take(u64::try_from(MAX_RESPONSE).unwrap_or(u64::MAX))
        .read_to_end(&mut response)
        .await
        .map_err(|error| format!("read: {error}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(status.to_owned());
    }
    Ok(body.to_owned())
}

fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

/// CPU hogs beside a timing-sensitive test (`stress-ng --cpu N`), so that it proves its claim on
/// a busy machine rather than a quiet one. Stopped when dropped, and bounded by its own timeout
/// whatever happens to the test.
#[derive(Debug)]
pub struct CpuStress {
    child: std::process::Child,
}

impl CpuStress {
    /// Starts `workers` CPU hogs for at most `limit`. Panics when stress-ng is missing: `tests/run`
    /// installs it, and a proof that quietly ran on an idle machine would prove nothing.
    pub fn start(workers: u32, limit: Duration) -> Self {
        let child = std::process::Command::new("stress-ng")
            .arg("--cpu")
            .arg(workers.to_string())
            .arg("--timeout")
            .arg(format!("{}s", limit.as_secs().max(1)))
            .arg("--quiet")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start stress-ng (Debian package stress-ng; tests/run installs it)");
        CpuStress { child }
    }
}

impl Drop for CpuStress {
    fn drop(&mut self) {
        // SIGTERM lets stress-ng stop its workers; it is bounded by --timeout in any case.
        let _ = std::process::Command::new("kill")
            .args(["-s", "TERM", "--", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
