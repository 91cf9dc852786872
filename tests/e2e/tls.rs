//! The wire's trust rules: the agent face refuses clients without a
//! certificate of ours at the handshake; an agent speaks only for itself; a
//! joining agent never completes a handshake with a coordinator whose CA
//! does not match its token; slow handshakes and oversized messages are bounded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_message::Body;
use rollwave_proto::v1::agent_service_client::AgentServiceClient;
use rollwave_proto::v1::operator_service_client::OperatorServiceClient;
use rollwave_tests::{Agent, AgentSpec, Cluster, Coordinator, CoordinatorSettings, wait_for};
use rollwave_trust::{AGENT_SERVER_NAME, ChannelOptions, PUBLIC_SERVER_NAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether the server speaks HTTP/2 to us over TLS with `config` under `name`:
/// true only if the handshake is accepted and the server sends frames.
pub(crate) async fn server_answers(addr: SocketAddr, config: Arc<rustls::ClientConfig>, name: &'static str) -> bool {
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.ok()?;
        let server_name = rustls_pki_types::ServerName::try_from(name).ok()?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .ok()?;
        tls.write_all(H2_PREFACE).await.ok()?;
        let mut buffer = [0u8; 64];
        let read = tls.read(&mut buffer).await.ok()?;
        (read > 0).then_some(())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// An operator-side channel (public TLS name, no client certificate).
async fn public_channel(coordinator: &Coordinator) -> tonic::transport::Channel {
    let tls = rollwave_trust::operator_client_config(&coordinator.ca_pem()).expect("config");
    rollwave_trust::connect(
        &coordinator.addr.to_string(),
        tls,
        PUBLIC_SERVER_NAME,
        &ChannelOptions::default(),
    )
    .await
    .expect("connect")
}

/// A CA that is not the coordinator's, with a leaf for `name` signed by it.
struct ForeignCa {
    ca_pem: String,
    leaf_pem: String,
    leaf_key_pem: String,
}

fn foreign_ca(name: &str, client: bool) -> ForeignCa {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "impostor CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let mut leaf_params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("leaf params");
    leaf_params.extended_key_usages = vec![if client {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    }];
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).expect("leaf cert");
    ForeignCa {
        ca_pem: ca_cert.pem(),
        leaf_pem: leaf.pem(),
        leaf_key_pem: leaf_key.serialize_pem(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_face_refuses_clients_without_our_certificate_at_the_handshake() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(1));
    let coordinator = &cluster.coordinator;
    let ca = coordinator.ca_pem();
    let no_certificate = rollwave_trust::operator_client_config(&ca).expect("config");

    // Control: the same client is served on the public face, so the checks below can fail.
    assert!(server_answers(coordinator.addr, no_certificate.clone(), PUBLIC_SERVER_NAME).await);
    assert!(
        !server_answers(coordinator.addr, no_certificate, AGENT_SERVER_NAME).await,
        "a client without a certificate must not get past the agent face's handshake"
    );

    let impostor = foreign_ca("i-impostor", true);
    let foreign =
        rollwave_trust::agent_client_config(&ca, impostor.leaf_pem.as_bytes(), impostor.leaf_key_pem.as_bytes())
            .expect("config");
    assert!(
        !server_answers(coordinator.addr, foreign, AGENT_SERVER_NAME).await,
        "a certificate from another CA must be refused"
    );

    let identity = cluster.agents[0].identity();
    let field = |name: &str| identity[name].as_str().expect("identity field").as_bytes().to_vec();
    let genuine = rollwave_trust::agent_client_config(&field("ca_pem"), &field("certificate_pem"), &field("key_pem"))
        .expect("config");
    assert!(
        server_answers(coordinator.addr, genuine, AGENT_SERVER_NAME).await,
        "the agent's own certificate works"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_cannot_speak_for_another_instance() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(2));
    let victim = cluster.agents[1].identity()["instance_id"]
        .as_str()
        .expect("id")
        .to_owned();
    let identity = cluster.agents[0].identity();
    let field = |name: &str| identity[name].as_str().expect("identity field").as_bytes().to_vec();
    let tls = rollwave_trust::agent_client_config(&field("ca_pem"), &field("certificate_pem"), &field("key_pem"))
        .expect("config");
    let options = ChannelOptions {
        request_timeout: None,
        ..ChannelOptions::default()
    };
    let channel = rollwave_trust::connect(&cluster.coordinator.addr.to_string(), tls, AGENT_SERVER_NAME, &options)
        .await
        .expect("agent-0's certificate connects");
    let hello = pb::AgentMessage {
        body: Some(Body::Hello(pb::Hello {
            instance_id: victim.clone(),
            facts: Some(pb::InstanceFacts {
                hostname: "hijacked".into(),
                zone: "z9".into(),
                ..Default::default()
            }),
            observed: Vec::new(),
        })),
    };
    let mut client = AgentServiceClient::new(channel);
    let outcome = match client.session(tokio_stream::iter(vec![hello])).await {
        Err(status) => status,
        Ok(response) => {
            let mut inbound = response.into_inner();
            match inbound.message().await {
                Err(status) => status,
                Ok(message) => panic!("the coordinator accepted a hello for another instance: {message:?}"),
            }
        }
    };
    assert_eq!(outcome.code(), tonic::Code::PermissionDenied, "{outcome:?}");
    let victim_record = tokio::task::block_in_place(|| cluster.coordinator.instance_by_hostname("agent-1"));
    let victim_record = victim_record.expect("victim still listed under its own hostname");
    assert_eq!(victim_record["id"], victim.as_str());
    assert_eq!(victim_record["zone"], "z2", "the victim's record is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joining_agent_never_completes_a_handshake_with_an_unpinned_coordinator() {
    let temp = tempfile::tempdir().expect("temp dir");
    let real = tokio::task::block_in_place(|| {
        let coordinator = Coordinator::start(temp.path());
        coordinator.create_stack("web");
        coordinator
    });
    let token = tokio::task::block_in_place(|| real.create_token("web", 1, "10m"));

    // An impostor coordinator with a valid-looking certificate from its own CA.
    let impostor = foreign_ca(PUBLIC_SERVER_NAME, false);
    let chain =
        rollwave_trust::parse_certificates("leaf", format!("{}{}", impostor.leaf_pem, impostor.ca_pem).as_bytes())
            .expect("chain");
    let key = rollwave_trust::parse_private_key("key", impostor.leaf_key_pem.as_bytes()).expect("key");
    let mut server_config = rustls::ServerConfig::builder_with_provider(rollwave_trust::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    server_config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let impostor_addr = listener.local_addr().expect("addr");
    let completed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let (completed_in_task, failed_in_task) = (completed.clone(), failed.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            match acceptor.accept(tcp).await {
                Ok(_) => completed_in_task.fetch_add(1, Ordering::SeqCst),
                Err(_) => failed_in_task.fetch_add(1, Ordering::SeqCst),
            };
        }
    });

    let agent = tokio::task::block_in_place(|| {
        Agent::start(
            temp.path(),
            AgentSpec {
                name: "trusting".into(),
                zone: "z1".into(),
                token,
                stack: None,
                coordinator: impostor_addr,
            },
        )
    });
    tokio::task::block_in_place(|| {
        wait_for("the agent to reject the impostor", || {
            agent
                .log_text()
                .contains("does not match the join token's fingerprint")
                .then_some(())
        })
    });
    assert!(failed.load(Ordering::SeqCst) >= 1, "the agent did try to connect");
    assert_eq!(
        completed.load(Ordering::SeqCst),
        0,
        "no handshake completed, so no application data (the token secret) was ever sent"
    );
    let tokens = tokio::task::block_in_place(|| real.cli_json(&["token", "list"]));
    assert_eq!(tokens[0]["uses_left"], 1, "the token was not spent anywhere");
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_handshakes_are_dropped_and_oversized_messages_refused() {
    let temp = tempfile::tempdir().expect("temp dir");
    let coordinator = tokio::task::block_in_place(|| {
        Coordinator::start_with(
            temp.path(),
            CoordinatorSettings {
                extra_args: ["--handshake-timeout", "1s", "--max-operator-message", "64KiB"]
                    .map(String::from)
                    .to_vec(),
                ..CoordinatorSettings::default()
            },
        )
    });
    // A client that connects and says nothing is cut off after the handshake timeout.
    let mut silent = TcpStream::connect(coordinator.addr).await.expect("connect");
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer))
        .await
        .expect("the coordinator closed the stalled connection well within 10 s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "no data for a client that never shook hands: {read:?}"
    );

    // An operator message above the limit (--max-operator-message; the default, 4 MiB, would let
    // it through to the handler) is refused without reaching the handler.
    let token: tonic::metadata::MetadataValue<_> = format!("Bearer {}", coordinator.operator_token())
        .parse()
        .expect("header");
    let mut client = OperatorServiceClient::with_interceptor(
        public_channel(&coordinator).await,
        move |mut request: tonic::Request<()>| {
            request.metadata_mut().insert("authorization", token.clone());
            Ok(request)
        },
    );
    let huge = pb::CreateStackRequest {
        name: "x".repeat(100 * 1024),
        stage: "dev".into(),
    };
    let status = client.create_stack(huge).await.expect_err("oversized message refused");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    // The CLI says which limit it ran into.
    let long_name = "x".repeat(100 * 1024);
    let output = tokio::task::block_in_place(|| coordinator.try_cli(&["stack", "create", &long_name]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("--max-operator-message"), "{stderr}");
    // Without a token, nothing is served.
    let status = OperatorServiceClient::new(public_channel(&coordinator).await)
        .list_stacks(pb::ListStacksRequest {})
        .await
        .expect_err("unauthenticated call refused");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}
