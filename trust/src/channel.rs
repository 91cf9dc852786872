//! TLS client channels to the coordinator.
//!
//! tonic's own TLS settings cannot take a custom verifier (needed for the
//! fingerprint pin), so every client dials through one connector built on
//! tokio-rustls; the TLS name decides which face of the coordinator answers.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{ALPN_H2, Error, Fingerprint, PinnedCaVerifier, parse_certificates, parse_private_key};

/// Timeouts and keepalive for a channel.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    /// Deadline of each unary call; streams are not limited by it.
    pub request_timeout: Option<Duration>,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(Duration::from_secs(30)),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, Error> {
    Ok(ClientConfig::builder_with_provider(crate::crypto_provider()).with_safe_default_protocol_versions()?)
}

fn finish(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

fn roots_from_pem(ca_pem: &[u8]) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for certificate in parse_certificates("CA certificate", ca_pem)? {
        roots.add(certificate)?;
    }
    Ok(roots)
}

/// For operators: trust the coordinator's CA, present no certificate.
pub fn operator_client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, Error> {
    let config = builder()?
        .with_root_certificates(roots_from_pem(ca_pem)?)
        .with_no_client_auth();
    Ok(finish(config))
}

/// For a joining agent: trust only a CA with the pinned fingerprint.
pub fn join_client_config(pin: Fingerprint) -> Result<Arc<ClientConfig>, Error> {
    let config = builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(pin)))
        .with_no_client_auth();
    Ok(finish(config))
}

/// For a joined agent: trust the CA and present the instance certificate.
pub fn agent_client_config(ca_pem: &[u8], certificate_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ClientConfig>, Error> {
    let chain = parse_certificates("agent certificate", certificate_pem)?;
    let key = parse_private_key("agent key", key_pem)?;
    let config = builder()?
        .with_root_certificates(roots_from_pem(ca_pem)?)
        .with_client_auth_cert(chain, key)?;
    Ok(finish(config))
}

/// Dials `addr` (`host:port`) and speaks TLS with `config` under `server_name`.
pub async fn connect(
    addr: &str,
    config: Arc<ClientConfig>,
    server_name: &'static str,
    options: &ChannelOptions,
) -> Result<Channel, Error> {
    let address_error = |detail: String| Error::Address {
        addr: addr.to_owned(),
        detail,
    };
    let uri: Uri = format!("http://{addr}")
        .parse()
        .map_err(|error: tonic::codegen::http::uri::InvalidUri| address_error(error.to_string()))?;
    let mut endpoint = Endpoint::from(uri)
        .connect_timeout(options.connect_timeout)
        .http2_keep_alive_interval(options.keepalive_interval)
        .keep_alive_timeout(options.keepalive_timeout)
        .keep_alive_while_idle(true);
    if let Some(timeout) = options.request_timeout {
        endpoint = endpoint.timeout(timeout);
    }
    let name = ServerName::try_from(server_name)
        .map_err(|error| address_error(error.to_string()))?
        .to_owned();
    let connector = TlsConnector::from(config);
    let dial = tower::service_fn(move |uri: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        async move {
            let authority = uri
                .authority()
                .map(|authority| authority.to_string())
                .ok_or_else(|| std::io::Error::other("address has no host:port"))?;
            let tcp = TcpStream::connect(authority).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(dial)
        .await
        .map_err(|source| Error::Connect {
            addr: addr.to_owned(),
            detail: crate::error_chain(&source),
        })
}
