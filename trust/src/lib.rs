//! How the three parties trust each other: the coordinator's CA, pinned by
//! fingerprint in join tokens; the two TLS names the coordinator answers to;
//! and the TLS client channels agents, operators and tests dial with.
//!
//! The coordinator serves one port under two TLS names. The public name
//! ([`PUBLIC_SERVER_NAME`]) serves operators, joins, health and reflection
//! without client certificates. The agent name ([`AGENT_SERVER_NAME`])
//! requires a client certificate issued by the coordinator's CA, so a client
//! without one is refused during the handshake.

mod channel;
pub mod files;
mod fingerprint;
mod pem;
mod pin;
mod token;

pub use channel::{ChannelOptions, agent_client_config, connect, join_client_config, operator_client_config};
pub use fingerprint::Fingerprint;
pub use pem::{parse_certificates, parse_private_key};
pub use pin::PinnedCaVerifier;
pub use token::JoinToken;

/// TLS name for operators, joins, health checks and reflection.
pub const PUBLIC_SERVER_NAME: &str = "rollwave-coordinator";
/// TLS name for agent sessions; the server demands a client certificate here.
pub const AGENT_SERVER_NAME: &str = "agents.rollwave-coordinator";
/// The only application protocol spoken: gRPC over HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Why a trust decision or a secure connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid PEM in {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("invalid join token: {0}")]
    Token(String),
    #[error("invalid fingerprint {value:?}: expected 64 hex digits (sha256 of the CA certificate)")]
    Fingerprint { value: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot connect to {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("invalid coordinator address {addr:?}: {detail}")]
    Address { addr: String, detail: String },
}

/// An error and all its causes on one line: "transport error: tls handshake: ...".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The crypto provider every Rollwave TLS config is built with (ring; see
/// shared/dependencies.md for why there is exactly one).
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
