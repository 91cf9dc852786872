//! `rollwave server`: opens the data dir, the store and the CA, then serves
//! the gRPC API on one TLS port with explicit limits until told to stop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollwave_proto::v1::agent_service_server::AgentServiceServer;
use rollwave_proto::v1::operator_service_server::OperatorServiceServer;
use rollwave_trust::files::write_private;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use crate::ca::{CaError, CaFiles, CertificateAuthority, Recovery};
use crate::deployer::Deployer;
use crate::grpc::agent::AgentApi;
use crate::grpc::operator::{OperatorApi, OperatorAuth};
use crate::grpc::{ServiceSettings, Shared, random_hex, secret_hash};
use crate::identity::{AgentCertificateVerifier, IssuedCertificates};
use crate::listener::{Connections, ListenerLimits, StreamTracking, TlsFaces, accept_tls};
use crate::lock::{DataDirLock, LockError};
use crate::model::unix_ms;
use crate::presence::PresencePolicy;
use crate::sessions::Sessions;
use crate::store::{Store, StoreError};

/// The operator created on first start.
const FIRST_OPERATOR: &str = "admin";

/// Limits on what clients may ask of the server.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    pub listener: ListenerLimits,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Unary calls must finish within this; streams are not cut by it.
    pub request_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Largest message an agent may send (hello with observed releases, hook output).
    pub agent_message_max: usize,
    /// Largest message an operator may send.
    pub operator_message_max: usize,
    /// How long shutdown waits for calls in flight.
    pub shutdown_grace: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            listener: ListenerLimits::default(),
            max_concurrent_streams: 64,
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            agent_message_max: 1024 * 1024,
            operator_message_max: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// An operator-supplied CA; otherwise one is created in the data dir.
    pub ca_files: Option<CaFiles>,
    /// Extra DNS names for the serving certificate.
    pub tls_names: Vec<String>,
    pub settings: ServiceSettings,
    pub limits: ServerLimits,
}

impl ServerOptions {
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            ca_files: None,
            tls_names: Vec::new(),
            settings: ServiceSettings {
                certificate_ttl: Duration::from_secs(24 * 3600),
                heartbeat_interval: Duration::from_secs(5),
                hello_timeout: Duration::from_secs(10),
                presence: PresencePolicy::default(),
            },
            limits: ServerLimits::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Locked(#[from] LockError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC reflection setup: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serve: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// The files a data dir holds besides the database.
#[derive(Debug, Clone)]
pub struct DataDirFiles {
    pub database: PathBuf,
    pub ca: CaFiles,
    pub operator_token: PathBuf,
    /// A CLI config pointing at this server, for `rollwave --config`.
    pub cli_config: PathBuf,
}

impl DataDirFiles {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            database: data_dir.join("rollwave.db"),
            ca: CaFiles::in_data_dir(data_dir),
            operator_token: data_dir.join("operator.token"),
            cli_config: data_dir.join("cli.toml"),
        }
    }
}

/// A server that is accepting connections.
/// How often running deployments check their deadlines.
const DEPLOYMENT_TICK: Duration = Duration::from_millis(500);

pub struct RunningServer {
    pub local_addr: SocketAddr,
    pub files: DataDirFiles,
    pub ca_pem: String,
    shared: Arc<Shared>,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Drives running deployments (deadlines, bakes, lost instances).
    ticker: JoinHandle<()>,
    /// Carries out drains and undrains; one cut short is re-sent when the deployment resumes.
    traffic_worker: JoinHandle<()>,
    grace: Duration,
    /// Keeps other coordinators off the data dir while this one serves from it.
    _lock: DataDirLock,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// Ends agent sessions (agents reconnect with backoff), stops accepting,
    /// and waits up to the grace period for calls in flight.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        self.ticker.abort();
        self.traffic_worker.abort();
        self.shared
            .sessions
            .evict_all(tonic::Status::unavailable("coordinator shutting down"));
        let _ = self.shutdown.send(());
        let mut task = self.task;
        match tokio::time::timeout(self.grace, &mut task).await {
            Ok(Ok(result)) => Ok(result?),
            Ok(Err(join_error)) => Err(ServerError::Tls(format!("server task failed: {join_error}"))),
            Err(_) => {
                tracing::warn!("calls still in flight after the grace period; closing them");
                task.abort();
                Ok(())
            }
        }
    }

    /// Waits until the server stops by itself (it only does on errors).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.task).await {
            Ok(result) => Ok(result?),
            Err(join_error) => Err(ServerError::Tls(format!("server task failed: {join_error}"))),
        }
    }
}

/// File descriptors the coordinator needs besides its connections: the database, the listener,
/// logs, outbound clients (S3, load balancers).
const RESERVED_FILES: u64 = 256;

/// Raises the soft limit on open files to what the connection cap needs (up to the hard limit),
/// and warns when even that is too low: past it, accepts fail and the cap is never reached.
fn raise_file_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED_FILES);
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= needed {
        return;
    }
    let target = needed.min(hard);
    if target > soft
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, target, hard)
    {
        tracing::warn!(%error, soft, "cannot raise the open-file limit");
    }
    if hard < needed {
        tracing::warn!(
            max_connections,
            limit = hard,
            "--max-connections needs about {needed} open files but the hard limit is {hard}; \
             raise it (LimitNOFILE= in the unit, ulimit -n) or lower --max-connections"
        );
    }
}

/// Whether a half-written CA may be replaced: only one of ours that nothing on record trusts.
async fn ca_recovery(store: &Store, operator_supplied: bool) -> Result<Recovery, ServerError> {
    if operator_supplied {
        return Ok(Recovery::Refuse(
            "the CA files were supplied with --ca-cert and --ca-key".into(),
        ));
    }
    let certificates = store.list_certificates().await?.len();
    let tokens = store.list_tokens(None).await?.len();
    Ok(if certificates == 0 && tokens == 0 {
        Recovery::NothingIssued
    } else {
        Recovery::Refuse(format!(
            "the database holds {certificates} agent certificate(s) and {tokens} join token(s) issued under it"
        ))
    })
}

/// Creates the first operator and its token file, once.
async fn ensure_operator(store: &Store, files: &DataDirFiles) -> Result<(), ServerError> {
    if !store.list_operators().await?.is_empty() {
        return Ok(());
    }
    let token = random_hex(24);
    // Write the file first: an operator row whose token nobody knows would lock everyone out.
    write_private(&files.operator_token, format!("{token}\n").as_bytes()).map_err(|source| ServerError::DataDir {
        path: files.operator_token.clone(),
        source,
    })?;
    store
        .create_operator(FIRST_OPERATOR, &secret_hash(&token), unix_ms(SystemTime::now()))
        .await?;
    tracing::info!(path = %files.operator_token.display(), "created the first operator token");
    Ok(())
}

fn tls_faces(
    ca: &CertificateAuthority,
    tls_names: &[String],
    issued: Arc<IssuedCertificates>,
) -> Result<TlsFaces, ServerError> {
    let tls_error = |error: &dyn std::fmt::Display| ServerError::Tls(error.to_string());
    let provider = rollwave_trust::crypto_provider();
    let serving = ca.issue_server_certificate(tls_names, OffsetDateTime::now_utc())?;
    let chain = rollwave_trust::parse_certificates("server certificate", serving.certificate_pem.as_bytes())
        .map_err(|error| tls_error(&error))?;
    let key = rollwave_trust::parse_private_key("server key", serving.key_pem.as_bytes())
        .map_err(|error| tls_error(&error))?;

    let mut public = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(&error))?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|error| tls_error(&error))?;
    public.alpn_protocols = vec![rollwave_trust::ALPN_H2.to_vec()];

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.certificate_der().clone())
        .map_err(|error| tls_error(&error))?;
    let chain_verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|error| tls_error(&error))?;
    let mut agent = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(&error))?
        .with_client_cert_verifier(Arc::new(AgentCertificateVerifier::new(chain_verifier, issued)))
        .with_single_cert(chain, key)
        .map_err(|error| tls_error(&error))?;
    agent.alpn_protocols = vec![rollwave_trust::ALPN_H2.to_vec()];
    // No resumption on the agent face: a resumed handshake skips the client
    // verifier, so a certificate revoked since (instance removed) would pass it.
    agent.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    agent.send_tls13_tickets = 0;
    Ok(TlsFaces {
        public: Arc::new(public),
        agent: Arc::new(agent),
    })
}

/// The address a local CLI should dial for a server listening on `listen`.
fn local_dial_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    }
}

fn write_cli_config(files: &DataDirFiles, addr: SocketAddr) -> Result<(), ServerError> {
    let config = format!(
        "# Written by `rollwave server`: use with `rollwave --config {}`.\naddr = \"{}\"\nca = \"{}\"\ntoken_file = \"{}\"\n",
        files.cli_config.display(),
        local_dial_address(addr),
        files.ca.certificate.display(),
        files.operator_token.display(),
    );
    write_private(&files.cli_config, config.as_bytes()).map_err(|source| ServerError::DataDir {
        path: files.cli_config.clone(),
        source,
    })
}

/// Opens everything and starts serving; returns once the port is bound.
pub async fn start(options: ServerOptions) -> Result<RunningServer, ServerError> {
    let data_dir = &options.data_dir;
    std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    // Before anything in the data dir is written: a second server must leave no trace.
    let lock = DataDirLock::acquire(data_dir)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)).map_err(|source| {
            ServerError::DataDir {
                path: data_dir.clone(),
                source,
            }
        })?;
    }
    // Absolute paths, so the cli.toml written below works from any directory.
    let data_dir = std::fs::canonicalize(data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let data_dir = &data_dir;
    let files = DataDirFiles::new(data_dir);
    let store = Store::open(&files.database).await?;
    let ca_files = options.ca_files.clone().unwrap_or_else(|| files.ca.clone());
    let recovery = ca_recovery(&store, options.ca_files.is_some()).await?;
    let (ca, created) = CertificateAuthority::load_or_create(&ca_files, OffsetDateTime::now_utc(), recovery)?;
    if created {
        tracing::info!(fingerprint = %ca.fingerprint(), "created the coordinator CA");
    }
    ensure_operator(&store, &files).await?;

    let issued = Arc::new(IssuedCertificates::from_records(&store.list_certificates().await?));
    let faces = tls_faces(&ca, &options.tls_names, issued.clone())?;
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServerError::Listen {
            addr: options.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServerError::Listen {
        addr: options.listen,
        source,
    })?;
    write_cli_config(&files, local_addr)?;

    let operator_auth = OperatorAuth::new(store.list_operators().await?);
    let ca_pem = ca.certificate_pem().to_owned();
    let shared = Arc::new(Shared {
        store,
        ca,
        issued,
        sessions: Sessions::default(),
        settings: options.settings.clone(),
        deployer: Deployer::default(),
    });

    let limits = &options.limits;
    let agent_service = AgentServiceServer::new(AgentApi::new(shared.clone()))
        .max_decoding_message_size(limits.agent_message_max)
        .max_encoding_message_size(limits.agent_message_max);
    let operator_service = InterceptedService::new(
        OperatorServiceServer::new(OperatorApi::new(shared.clone()))
            .max_decoding_message_size(limits.operator_message_max)
            .max_encoding_message_size(limits.operator_message_max),
        operator_auth,
    );
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServiceServer<AgentApi>>().await;
    health_reporter
        .set_serving::<OperatorServiceServer<OperatorApi>>()
        .await;
    // Both reflection versions: grpcurl asks v1, many clients (grpcio among them) v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(rollwave_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    raise_file_limit(limits.listener.max_connections);
    let connections = Connections::new(limits.listener);
    let incoming = accept_tls(listener, faces, connections.clone());
    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .layer(StreamTracking::new(connections))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(agent_service)
        .add_service(operator_service);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_signal.await;
    }));
    // Drains and undrains, the ones resumed deployments re-send included.
    let traffic_worker = tokio::spawn(crate::deployer::run_traffic_jobs(shared.clone()));
    // Deployments a stopped coordinator left running go on from their persisted state.
    if let Err(error) = shared.deployer.resume_all(&shared).await {
        tracing::error!(%error, "cannot resume running deployments");
    }
    let ticking = shared.clone();
    let ticker = tokio::spawn(async move {
        loop {
            tokio::time::sleep(DEPLOYMENT_TICK).await;
            ticking.deployer.tick(&ticking).await;
        }
    });
    tracing::info!(addr = %local_addr, data_dir = %data_dir.display(), "coordinator listening");
    Ok(RunningServer {
        ticker,
        traffic_worker,
        local_addr,
        files,
        ca_pem,
        shared,
        shutdown,
        task,
        grace: limits.shutdown_grace,
        _lock: lock,
    })
}
