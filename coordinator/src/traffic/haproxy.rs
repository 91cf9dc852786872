//! HAProxy's runtime API (the `stats socket ... level admin` CLI): drain, put back and read one
//! server, one command per connection, with pure parsers for the answers.
//!
//! Facts measured on HAProxy 2.6 that this module relies on:
//! - `set server B/S state drain|maint|ready` answers a lone newline on success and a sentence
//!   otherwise ("No such server.", "No such backend.").
//! - `show servers state B` gives the exact admin flags and health state but no session counts;
//!   `show stat B 4 -1` gives `scur` but renders states as text (`DRAIN` also means weight 0,
//!   `UP 1/3` while a check is moving), so the state comes from the first and sessions from the
//!   second.
//! - `maint` keeps in-flight sessions running to their end; `ready` counts a server up at once,
//!   before any health check has run, when it leaves `maint`; leaving `drain` after a forced
//!   `health down`, it stays down until its checks pass `rise` times.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::{AdminState, DrainOutcome, OperationalState, ServerState, TrafficError, TrafficTarget};

/// How long one command may take, from connecting to the end of its answer.
const DEFAULT_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a drain looks at the server's current sessions.
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The most of one answer we read; `show stat` of one backend with hundreds of servers fits.
const RESPONSE_LIMIT: usize = 4 * 1024 * 1024;
/// The `show servers state` format this parser understands.
const SERVERS_STATE_VERSION: &str = "1";

// Admin flags of `srv_admin_state` (HAProxy's `SRV_ADMF_*`): forced, inherited, configured,
// resolver and hostname maintenance; forced and inherited drain.
const ADMIN_MAINT_FLAGS: u32 = 0x01 | 0x02 | 0x04 | 0x20 | 0x40;
const ADMIN_DRAIN_FLAGS: u32 = 0x08 | 0x10;
/// `CHK_ST_ENABLED` of `srv_check_state`: the server has active health checks.
const CHECK_ENABLED: u32 = 0x04;

/// Where HAProxy's runtime API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuntimeAddress {
    /// `stats socket /run/haproxy/admin.sock level admin`
    Unix(PathBuf),
    /// `stats socket ipv4@127.0.0.1:9999 level admin`, as `host:port`.
    Tcp(String),
}

impl fmt::Display for RuntimeAddress {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeAddress::Unix(path) => write!(formatter, "unix:{}", path.display()),
            RuntimeAddress::Tcp(address) => write!(formatter, "tcp:{address}"),
        }
    }
}

/// A client of one HAProxy's runtime API.
#[derive(Clone, Debug)]
pub struct HaproxyRuntime {
    address: RuntimeAddress,
    exchange_timeout: Duration,
    poll_interval: Duration,
}

impl HaproxyRuntime {
    pub fn new(address: RuntimeAddress) -> Self {
        HaproxyRuntime {
            address,
            exchange_timeout: DEFAULT_EXCHANGE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// Bounds each command, from connecting to the end of its answer.
    pub fn with_exchange_timeout(mut self, timeout: Duration) -> Self {
        self.exchange_timeout = timeout;
        self
    }

    /// How often a drain reads the server's current sessions.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    pub fn address(&self) -> &RuntimeAddress {
        &self.address
    }

    pub(super) async fn drain(&self, target: &TrafficTarget, timeout: Duration) -> Result<DrainOutcome, TrafficError> {
        self.set_state(target, "drain").await?;
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let sessions = self.current_sessions(target).await?;
            let now = Instant::now();
            if sessions == 0 || now >= deadline {
                self.set_state(target, "maint").await?;
                let waited = started.elapsed();
                return Ok(if sessions == 0 {
                    DrainOutcome::Drained { waited }
                } else {
                    DrainOutcome::TimedOut {
                        waited,
                        remaining_sessions: Some(sessions),
                    }
                });
            }
            tokio::time::sleep_until(deadline.min(now + self.poll_interval)).await;
        }
    }

    /// Puts the server back. With health checks, it goes back marked down, through `drain` (no new
    /// traffic) and a forced `health down`, so that it takes traffic only after HAProxy's own
    /// checks pass `rise` times: `ready` straight from `maint` would count it up at once. Without
    /// checks, `ready` is all there is.
    pub(super) async fn undrain(&self, target: &TrafficTarget) -> Result<(), TrafficError> {
        check_names(target)?;
        let command = format!("show servers state {}", target.backend);
        let response = self.exchange(&command).await?;
        let checked = parse_checks_enabled(&response, &target.backend, &target.server)
            .map_err(|error| error.into_traffic_error(target, &command))?;
        if checked {
            self.set_state(target, "drain").await?;
            let command = format!("set server {}/{} health down", target.backend, target.server);
            let response = self.exchange(&command).await?;
            parse_set_server_response(&response).map_err(|error| error.into_traffic_error(target, &command))?;
        }
        self.set_state(target, "ready").await
    }

    pub(super) async fn state(&self, target: &TrafficTarget) -> Result<ServerState, TrafficError> {
        check_names(target)?;
        let command = format!("show servers state {}", target.backend);
        let response = self.exchange(&command).await?;
        let (admin, operational) = parse_servers_state(&response, &target.backend, &target.server)
            .map_err(|error| error.into_traffic_error(target, &command))?;
        let current_sessions = self.current_sessions(target).await?;
        Ok(ServerState {
            admin,
            operational,
            current_sessions,
        })
    }

    async fn set_state(&self, target: &TrafficTarget, state: &str) -> Result<(), TrafficError> {
        check_names(target)?;
        let command = format!("set server {}/{} state {state}", target.backend, target.server);
        let response = self.exchange(&command).await?;
        parse_set_server_response(&response).map_err(|error| error.into_traffic_error(target, &command))
    }

    async fn current_sessions(&self, target: &TrafficTarget) -> Result<u64, TrafficError> {
        check_names(target)?;
        // Type 4 selects servers, -1 all of them.
        let command = format!("show stat {} 4 -1", target.backend);
        let response = self.exchange(&command).await?;
        parse_stat(&response, &target.backend, &target.server)
            .map_err(|error| error.into_traffic_error(target, &command))
    }

    /// Sends one command on a fresh connection and reads the answer up to the connection's end:
    /// without `prompt`, HAProxy runs one command per connection and then closes it.
    async fn exchange(&self, command: &str) -> Result<String, TrafficError> {
        let address = self.address.to_string();
        let result = tokio::time::timeout(self.exchange_timeout, async {
            match &self.address {
                RuntimeAddress::Unix(path) => {
                    let stream = UnixStream::connect(path)
                        .await
                        .map_err(|source| TrafficError::Connect {
                            address: address.clone(),
                            source,
                        })?;
                    send_and_read(stream, command, &address).await
                }
                RuntimeAddress::Tcp(host_port) => {
                    let stream =
                        TcpStream::connect(host_port.as_str())
                            .await
                            .map_err(|source| TrafficError::Connect {
                                address: address.clone(),
                                source,
                            })?;
                    send_and_read(stream, command, &address).await
                }
            }
        })
        .await;
        match result {
            Ok(answer) => answer,
            Err(_elapsed) => Err(TrafficError::ExchangeTimeout {
                address,
                command: command.to_owned(),
                timeout: self.exchange_timeout,
            }),
        }
    }
}

async fn send_and_read(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    command: &str,
    address: &str,
) -> Result<String, TrafficError> {
    let exchange_error = |source| TrafficError::Exchange {
        address: address.to_owned(),
        command: command.to_owned(),
        source,
    };
    stream
        .write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(exchange_error)?;
    let mut answer = Vec::new();
    // One byte past the limit tells a full answer from a cut one.
    let limit = u64::try_from(RESPONSE_LIMIT).expect("the limit fits in u64") + 1;
    (&mut stream)
        .take(limit)
        .read_to_end(&mut answer)
        .await
        .map_err(exchange_error)?;
    if answer.len() > RESPONSE_LIMIT {
        return Err(TrafficError::ResponseTooLarge {
            address: address.to_owned(),
            command: command.to_owned(),
            limit: RESPONSE_LIMIT,
        });
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// Refuses names HAProxy would not accept, and with them any attempt to smuggle a second command
/// (the CLI splits on `;` and ends a command at a newline).
fn check_names(target: &TrafficTarget) -> Result<(), TrafficError> {
    for (what, name) in [("backend", &target.backend), ("server", &target.server)] {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '_' | '.' | ':'));
        if !valid {
            return Err(TrafficError::InvalidName {
                target: Box::new(target.clone()),
                reason: format!("invalid {what} name {name:?}"),
            });
        }
    }
    Ok(())
}

/// Why an answer was not the one asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResponseError {
    /// HAProxy answered with a message instead of the result ("No such server.").
    Refused(String),
    /// The answer has the right shape but no row for the server.
    ServerNotFound,
    /// The answer is not in a format this module understands.
    Unexpected(String),
}

impl ResponseError {
    fn into_traffic_error(self, target: &TrafficTarget, command: &str) -> TrafficError {
        match self {
            ResponseError::Refused(message) => TrafficError::Refused {
                target: Box::new(target.clone()),
                command: command.to_owned(),
                message,
            },
            ResponseError::ServerNotFound => TrafficError::ServerNotFound {
                target: Box::new(target.clone()),
            },
            ResponseError::Unexpected(reason) => TrafficError::UnexpectedResponse {
                target: Box::new(target.clone()),
                command: command.to_owned(),
                reason,
            },
        }
    }
}

/// The answer to `set server B/S state ...`: nothing but line ends on success, a message otherwise.
pub(crate) fn parse_set_server_response(response: &str) -> Result<(), ResponseError> {
    let message = response.trim();
    if message.is_empty() {
        Ok(())
    } else {
        Err(ResponseError::Refused(message.to_owned()))
    }
}

/// The columns and the row of `backend/server` in the answer to `show servers state B`: a format
/// version line, a `#` header naming the columns, one space-separated row per server.
fn servers_state_row<'a>(
    response: &'a str,
    backend: &str,
    server: &str,
) -> Result<(Vec<&'a str>, Vec<&'a str>), ResponseError> {
    let mut lines = response.lines();
    let version = lines.next().unwrap_or_default().trim();
    let header = lines.next().unwrap_or_default();
    let Some(header) = header.strip_prefix("# ") else {
        return Err(ResponseError::Refused(response.trim().to_owned()));
    };
    if version != SERVERS_STATE_VERSION {
        return Err(ResponseError::Unexpected(format!(
            "format version {version:?}, expected {SERVERS_STATE_VERSION}"
        )));
    }
    let columns: Vec<&str> = header.split_whitespace().collect();
    let backend_column = column_of(&columns, "be_name")?;
    let server_column = column_of(&columns, "srv_name")?;
    for line in lines.filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != columns.len() {
            return Err(ResponseError::Unexpected(format!(
                "a row has {} fields for {} columns: {line:?}",
                fields.len(),
                columns.len()
            )));
        }
        if fields[backend_column] == backend && fields[server_column] == server {
            return Ok((columns, fields));
        }
    }
    Err(ResponseError::ServerNotFound)
}

fn column_of(columns: &[&str], name: &str) -> Result<usize, ResponseError> {
    columns
        .iter()
        .position(|column| *column == name)
        .ok_or_else(|| ResponseError::Unexpected(format!("no column {name}")))
}

/// The number in column `name` of a `show servers state` row.
fn number_in(columns: &[&str], fields: &[&str], name: &str) -> Result<u32, ResponseError> {
    let index = column_of(columns, name)?;
    fields[index]
        .parse::<u32>()
        .map_err(|_| ResponseError::Unexpected(format!("{name} is {:?}, not a number", fields[index])))
}

/// The admin and health state of `backend/server` in the answer to `show servers state B`.
pub(crate) fn parse_servers_state(
    response: &str,
    backend: &str,
    server: &str,
) -> Result<(AdminState, OperationalState), ResponseError> {
    let (columns, fields) = servers_state_row(response, backend, server)?;
    let admin_flags = number_in(&columns, &fields, "srv_admin_state")?;
    let operational = match number_in(&columns, &fields, "srv_op_state")? {
        0 => OperationalState::Stopped,
        1 => OperationalState::Starting,
        2 => OperationalState::Running,
        3 => OperationalState::Stopping,
        other => return Err(ResponseError::Unexpected(format!("unknown srv_op_state {other}"))),
    };
    let admin = if admin_flags & ADMIN_MAINT_FLAGS != 0 {
        AdminState::Maint
    } else if admin_flags & ADMIN_DRAIN_FLAGS != 0 {
        AdminState::Drain
    } else {
        AdminState::Ready
    };
    Ok((admin, operational))
}

/// Whether HAProxy runs health checks on `backend/server` (`srv_check_state` has
/// `CHK_ST_ENABLED`).
pub(crate) fn parse_checks_enabled(response: &str, backend: &str, server: &str) -> Result<bool, ResponseError> {
    let (columns, fields) = servers_state_row(response, backend, server)?;
    Ok(number_in(&columns, &fields, "srv_check_state")? & CHECK_ENABLED != 0)
}

/// The current sessions (`scur`) of `backend/server` in the answer to `show stat`: a `# ` CSV
/// header, then one row per proxy or server.
pub(crate) fn parse_stat(response: &str, backend: &str, server: &str) -> Result<u64, ResponseError> {
    let mut lines = response.lines();
    let Some(header) = lines.next().unwrap_or_default().strip_prefix("# ") else {
        return Err(ResponseError::Refused(response.trim().to_owned()));
    };
    let columns: Vec<&str> = header.split(',').collect();
    let column = |name: &str| {
        columns
            .iter()
            .position(|column| *column == name)
            .ok_or_else(|| ResponseError::Unexpected(format!("no column {name}")))
    };
    let proxy_column = column("pxname")?;
    let server_column = column("svname")?;
    let sessions_column = column("scur")?;
    // Later columns (check descriptions) may be quoted and hold commas; the ones read here come
    // first and never do, so splitting only up to them is exact.
    let needed = proxy_column.max(server_column).max(sessions_column) + 1;
    for line in lines.filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.splitn(needed + 1, ',').collect();
        if fields.len() < needed {
            return Err(ResponseError::Unexpected(format!("a row is too short: {line:?}")));
        }
        if fields[proxy_column] != backend || fields[server_column] != server {
            continue;
        }
        return fields[sessions_column]
            .parse::<u64>()
            .map_err(|_| ResponseError::Unexpected(format!("scur is {:?}, not a number", fields[sessions_column])));
    }
    Err(ResponseError::ServerNotFound)
}

#[cfg(test)]
mod tests;
