//! Taking an instance out of its load balancer before it changes release and putting it back
//! once it is healthy: the providers a rolling deployment drains through.
//!
//! One enum dispatches to each provider (no boxed futures, no `async_trait`): [`HaproxyRuntime`]
//! speaks HAProxy's runtime API, [`Elbv2Provider`] AWS ELBv2 target groups, [`CommandProvider`]
//! runs the operator's own scripts. [`TrafficSettings`] is what a stack stores to pick one.

mod command;
mod elbv2;
mod haproxy;
mod settings;

use std::path::PathBuf;
use std::time::Duration;

pub use command::CommandProvider;
pub use elbv2::Elbv2Provider;
pub use haproxy::{HaproxyRuntime, RuntimeAddress};
pub use settings::{DEFAULT_DRAIN_TIMEOUT_MS, SettingsError, TrafficSettings, for_layer, render};

/// How an instance is known to the load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficTarget {
    pub instance_id: String,
    /// HAProxy: the backend's name (for the command provider, passed through as is).
    pub backend: String,
    /// HAProxy: the server's name inside the backend.
    pub server: String,
}

impl std::fmt::Display for TrafficTarget {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}/{} (instance {})",
            self.backend, self.server, self.instance_id
        )
    }
}

/// Where draining took the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DrainOutcome {
    /// No session was left when the target went out of service.
    Drained { waited: Duration },
    /// The drain timeout passed with sessions still open; the target went out of service anyway
    /// and those sessions were left to finish (or fail) on their own. ELBv2 does not count sessions
    /// (`None`): it cuts what is left at the end of its own deregistration delay.
    TimedOut {
        waited: Duration,
        remaining_sessions: Option<u64>,
    },
}

/// What the operator (or the rollout) set: whether the load balancer may send new traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new traffic (if its health checks pass).
    Ready,
    /// Keeps its current sessions but takes no new ones.
    Drain,
    /// Out of service.
    Maint,
}

/// What the load balancer's health checks say, independent of the admin state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperationalState {
    Stopped,
    Starting,
    Running,
    Stopping,
}

/// One server as the load balancer sees it, for status views and for waiting on a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerState {
    pub admin: AdminState,
    pub operational: OperationalState,
    pub current_sessions: u64,
}

/// Why a traffic operation failed, naming the server and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    #[error(
        "haproxy runtime API at {address}: cannot connect: {source}; check that haproxy runs and has `stats socket ... level admin` there"
    )]
    Connect { address: String, source: std::io::Error },
    #[error("haproxy runtime API at {address}: `{command}` failed: {source}")]
    Exchange {
        address: String,
        command: String,
        source: std::io::Error,
    },
    #[error(
        "haproxy runtime API at {address}: `{command}` got no complete answer within {timeout:?}; haproxy may be overloaded or stuck"
    )]
    ExchangeTimeout {
        address: String,
        command: String,
        timeout: Duration,
    },
    #[error("haproxy runtime API at {address}: the answer to `{command}` exceeds {limit} bytes")]
    ResponseTooLarge {
        address: String,
        command: String,
        limit: usize,
    },
    #[error(
        "haproxy refused `{command}` for {target}: {message}; check the backend and server names in the stack's traffic settings"
    )]
    Refused {
        target: Box<TrafficTarget>,
        command: String,
        message: String,
    },
    #[error("haproxy has no server {target}; check the backend and server names in the stack's traffic settings")]
    ServerNotFound { target: Box<TrafficTarget> },
    #[error("cannot read haproxy's answer to `{command}` for {target}: {reason}")]
    UnexpectedResponse {
        target: Box<TrafficTarget>,
        command: String,
        reason: String,
    },
    #[error("{action} command {} for {target}: cannot start: {source}; check that it exists and is executable", program.display())]
    CommandStart {
        action: &'static str,
        program: PathBuf,
        target: Box<TrafficTarget>,
        source: std::io::Error,
    },
    #[error("{action} command {} for {target}: {source}", program.display())]
    CommandWait {
        action: &'static str,
        program: PathBuf,
        target: Box<TrafficTarget>,
        source: std::io::Error,
    },
    #[error("{action} command {} for {target} did not finish within {timeout:?} and was killed; output ends with:\n{output_tail}", program.display())]
    CommandTimeout {
        action: &'static str,
        program: PathBuf,
        target: Box<TrafficTarget>,
        timeout: Duration,
        output_tail: String,
    },
    #[error("{action} command {} for {target} failed ({status}); output ends with:\n{output_tail}", program.display())]
    CommandFailed {
        action: &'static str,
        program: PathBuf,
        target: Box<TrafficTarget>,
        status: String,
        output_tail: String,
    },
    #[error("{target}: {reason}; HAProxy names take only letters, digits, '-', '_', '.' and ':'")]
    InvalidName { target: Box<TrafficTarget>, reason: String },
    #[error("the command traffic provider cannot read the state of {target}: it has only drain and undrain commands")]
    StateUnsupported { target: Box<TrafficTarget> },
    #[error("aws-elbv2 {call} in target group {target_group} for {target}: {detail}")]
    Elbv2 {
        target_group: String,
        call: String,
        target: Box<TrafficTarget>,
        detail: String,
    },
}

/// A load balancer the rollout drains instances from, one variant per kind.
#[derive(Clone, Debug)]
pub enum TrafficProvider {
    Haproxy(HaproxyRuntime),
    Elbv2(Elbv2Provider),
    Command(CommandProvider),
}

impl TrafficProvider {
    /// Stops new traffic to the target, waits (up to `timeout`) for its sessions to end, then
    /// takes it out of service either way; the outcome says which happened.
    pub async fn drain(&self, target: &TrafficTarget, timeout: Duration) -> Result<DrainOutcome, TrafficError> {
        match self {
            TrafficProvider::Haproxy(runtime) => runtime.drain(target, timeout).await,
            TrafficProvider::Elbv2(provider) => provider.drain(target, timeout).await,
            TrafficProvider::Command(provider) => provider.drain(target, timeout).await,
        }
    }

    /// Puts the target back into service. HAProxy counts it up at once, before any health check,
    /// so call this only once the instance is known to be healthy.
    pub async fn undrain(&self, target: &TrafficTarget) -> Result<(), TrafficError> {
        match self {
            TrafficProvider::Haproxy(runtime) => runtime.undrain(target).await,
            TrafficProvider::Elbv2(provider) => provider.undrain(target).await,
            TrafficProvider::Command(provider) => provider.undrain(target).await,
        }
    }

    /// The target's admin and health state and its current sessions.
    pub async fn state(&self, target: &TrafficTarget) -> Result<ServerState, TrafficError> {
        match self {
            TrafficProvider::Haproxy(runtime) => runtime.state(target).await,
            TrafficProvider::Elbv2(provider) => provider.state(target).await,
            TrafficProvider::Command(_) => Err(TrafficError::StateUnsupported {
                target: Box::new(target.clone()),
            }),
        }
    }
}
