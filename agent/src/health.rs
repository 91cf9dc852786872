//! Running a release's health checks: an HTTP GET that must answer 2xx, or
//! a command that must exit 0, each bounded by its own timeout. A release is
//! healthy when every check passes in the same round; rounds repeat until
//! that happens or the deadline passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rollwave_release::HealthCheck;

use crate::hooks::{HookRun, run_hook};

/// Pause between rounds of checks.
const ROUND_INTERVAL: Duration = Duration::from_millis(500);

/// One check's verdict, in words for reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub check: String,
    pub passed: bool,
    pub detail: String,
}

/// Runs every check once.
pub async fn run_round(checks: &[HealthCheck], release_dir: &Path, log_dir: &Path) -> Vec<CheckResult> {
    let mut results = Vec::with_capacity(checks.len());
    for (index, check) in checks.iter().enumerate() {
        results.push(match check {
            HealthCheck::Http { url, timeout } => {
                let outcome = tokio::time::timeout(*timeout, http_get(url)).await;
                let (passed, detail) = match outcome {
                    Err(_) => (
                        false,
                        format!("no answer within {}", humantime::format_duration(*timeout)),
                    ),
                    Ok(Err(error)) => (false, error),
                    Ok(Ok(status)) if (200..300).contains(&status) => (true, format!("HTTP {status}")),
                    Ok(Ok(status)) => (false, format!("HTTP {status}")),
                };
                CheckResult {
                    check: format!("GET {url}"),
                    passed,
                    detail,
                }
            }
            HealthCheck::Command { command, timeout } => {
                let run = HookRun {
                    script: PathBuf::from("/bin/sh"),
                    args: vec!["-c".into(), command.clone()],
                    working_dir: release_dir.to_owned(),
                    timeout: *timeout,
                    run_as: None,
                    env: vec![("ROLLWAVE_RELEASE_DIR".into(), release_dir.display().to_string())],
                    log: log_dir.join(format!("health-{index}.log")),
                };
                let (passed, detail) = match run_hook(&run).await {
                    Ok(outcome) => (outcome.succeeded(), outcome.summary()),
                    Err(error) => (false, error.to_string()),
                };
                CheckResult {
                    check: command.clone(),
                    passed,
                    detail,
                }
            }
        });
    }
    results
}

/// Runs one round: `Ok` when every check passes, else `Err` naming each failing check and why
/// ("GET http://127.0.0.1:8080/health: HTTP 503"). The periodic checks of a running release use this.
pub async fn check_once(checks: &[HealthCheck], release_dir: &Path, log_dir: &Path) -> Result<(), String> {
    let results = run_round(checks, release_dir, log_dir).await;
    let failures: Vec<String> = results
        .iter()
        .filter(|result| !result.passed)
        .map(|result| format!("{}: {}", result.check, result.detail))
        .collect();
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// The longest one round of `checks` can take: each check runs to its timeout at worst.
pub fn round_bound(checks: &[HealthCheck]) -> Duration {
    checks.iter().map(HealthCheck::timeout).sum()
}

/// Repeats rounds until every check passes in one round (`Ok`) or `deadline`
/// passes (`Err` with the last round's failures).
pub async fn wait_healthy(
    checks: &[HealthCheck],
    release_dir: &Path,
    log_dir: &Path,
    deadline: Duration,
) -> Result<(), String> {
    if checks.is_empty() {
        return Ok(());
    }
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let failures = match check_once(checks, release_dir, log_dir).await {
            Ok(()) => return Ok(()),
            Err(failures) => failures,
        };
        if tokio::time::Instant::now() + ROUND_INTERVAL >= give_up {
            return Err(format!(
                "not healthy within {}: {failures}",
                humantime::format_duration(deadline)
            ));
        }
        tokio::time::sleep(ROUND_INTERVAL).await;
    }
}

/// One HTTP/1.1 GET; the status code, or why there was none.
async fn http_get(url: &str) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|error| format!("invalid URL {url}: {error}"))?;
    let host = uri.host().ok_or_else(|| format!("URL {url} has no host"))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|error| format!("connect {host}:{port}: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP handshake: {error}"))?;
    let driver = tokio::spawn(connection);
    let authority = uri
        .authority()
        .map(|authority| authority.as_str().to_owned())
        .unwrap_or(host);
    let path = uri.path_and_query().map_or("/", |path| path.as_str()).to_owned();
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::USER_AGENT, "rollwave-agent health check")
        .body(Empty::<Bytes>::new())
        .map_err(|error| error.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("GET: {error}"));
    driver.abort();
    Ok(response?.status().as_u16())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A one-shot HTTP server on loopback answering every request with `status`.
    async fn server(status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buffer = [0u8; 1024];
                let _ = stream.read(&mut buffer).await;
                let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{address}/health")
    }

    #[tokio::test]
    async fn http_checks_need_a_2xx_and_commands_need_exit_0() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = server(204).await;
        let failing = server(503).await;
        let checks = [
            HealthCheck::Http {
                url: ok,
                timeout: Duration::from_secs(5),
            },
            HealthCheck::Http {
                url: failing,
                timeout: Duration::from_secs(5),
            },
            HealthCheck::Command {
                command: "test -d .".into(),
                timeout: Duration::from_secs(5),
            },
            HealthCheck::Command {
                command: "echo broken; exit 2".into(),
                timeout: Duration::from_secs(5),
            },
            HealthCheck::Http {
                url: "http://127.0.0.1:1/".into(),
                timeout: Duration::from_secs(5),
            },
        ];
        let results = run_round(&checks, dir.path(), dir.path()).await;
        let passed: Vec<bool> = results.iter().map(|result| result.passed).collect();
        assert_eq!(passed, [true, false, true, false, false], "{results:?}");
        assert_eq!(results[1].detail, "HTTP 503");
        assert_eq!(results[3].detail, "exit code 2: broken");
    }

    #[tokio::test]
    async fn waiting_gives_up_at_the_deadline_with_the_reasons() {
        let dir = tempfile::tempdir().expect("temp dir");
        let checks = [HealthCheck::Command {
            command: "exit 1".into(),
            timeout: Duration::from_secs(5),
        }];
        let error = wait_healthy(&checks, dir.path(), dir.path(), Duration::from_secs(1))
            .await
            .expect_err("never healthy");
        assert!(error.contains("exit 1: exit code 1"), "{error}");
        assert!(wait_healthy(&[], dir.path(), dir.path(), Duration::ZERO).await.is_ok());
    }

    /// Field trial: periodic health failures read "not healthy within 0s: ...".
    #[tokio::test]
    async fn a_periodic_round_names_the_failing_check_without_a_deadline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let checks = [
            HealthCheck::Command {
                command: "true".into(),
                timeout: Duration::from_secs(5),
            },
            HealthCheck::Command {
                command: "exit 1".into(),
                timeout: Duration::from_secs(2),
            },
        ];
        let error = check_once(&checks, dir.path(), dir.path())
            .await
            .expect_err("one fails");
        assert_eq!(error, "exit 1: exit code 1");
        assert_eq!(round_bound(&checks), Duration::from_secs(7));
        assert!(check_once(&[], dir.path(), dir.path()).await.is_ok());
    }
}
