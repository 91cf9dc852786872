//! Agents join, show up with their zones, go offline when killed, and lose
//! their standing when an operator removes them. A join never takes over an
//! existing instance, and a join whose reply was lost is answered again.

use std::sync::Arc;

use rollwave_proto::v1 as pb;
use rollwave_proto::v1::agent_service_client::AgentServiceClient;
use rollwave_tests::{Cluster, Coordinator, wait_for};
use rollwave_trust::{AGENT_SERVER_NAME, ChannelOptions, PUBLIC_SERVER_NAME};

use crate::tls::server_answers;

#[test]
fn agents_join_and_appear_with_their_zones() {
    let cluster = Cluster::start(3);
    let instances = cluster.coordinator.instances();
    let mut seen: Vec<(String, String, String)> = instances
        .iter()
        .map(|instance| {
            (
                instance["hostname"].as_str().expect("hostname").to_owned(),
                instance["zone"].as_str().expect("zone").to_owned(),
                instance["stack"].as_str().expect("stack").to_owned(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("agent-0".into(), "z1".into(), "web".into()),
            ("agent-1".into(), "z2".into(), "web".into()),
            ("agent-2".into(), "z3".into(), "web".into()),
        ]
    );
    for instance in &instances {
        assert_eq!(instance["presence"], "online");
        assert!(
            instance["id"].as_str().is_some_and(|id| id.starts_with("i-")),
            "{instance}"
        );
        assert!(!instance["certificate_expires"].as_str().unwrap_or_default().is_empty());
    }
    // The identity the agent stored is the one the coordinator shows.
    let identity = cluster.agents[0].identity();
    let shown = cluster
        .coordinator
        .instance_by_hostname("agent-0")
        .expect("agent-0 listed");
    assert_eq!(identity["instance_id"].as_str(), shown["id"].as_str());
    // The pending join (key and request id kept for retries) is gone once the identity is saved.
    assert!(!cluster.agents[0].dir.join("tls/join.toml").exists());
}

#[test]
fn a_killed_agent_turns_offline_and_comes_back() {
    let mut cluster = Cluster::start(2);
    cluster.agents[0].kill();
    cluster.coordinator.wait_presence("agent-0", "offline");
    assert_eq!(
        cluster.coordinator.instance_by_hostname("agent-1").expect("agent-1")["presence"],
        "online",
        "the other agent is unaffected"
    );
    let id_before = cluster.agents[0].identity()["instance_id"].clone();
    cluster.agents[0].restart();
    let back = cluster.coordinator.wait_presence("agent-0", "online");
    assert_eq!(
        back["id"].as_str(),
        id_before.as_str(),
        "a restart keeps the identity (no re-join)"
    );
    assert_eq!(cluster.coordinator.instances().len(), 2);
}

#[test]
fn a_removed_instance_loses_its_certificate() {
    let mut cluster = Cluster::start(1);
    let id = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    cluster.coordinator.cli(&["instance", "remove", &id]);
    assert!(cluster.coordinator.instances().is_empty());
    // The agent is told, cannot reconnect with its certificate, and stops with an explanation.
    let code = cluster.agents[0].wait_exit();
    assert_eq!(code, 1);
    let log = cluster.agents[0].log_text();
    assert!(log.contains("join again"), "agent explains what to do: {log}");
    // Its certificate fails at the handshake now.
    let restarted = &mut cluster.agents[0];
    restarted.restart();
    wait_for("the restarted agent to be refused", || {
        restarted.log_text().contains("session ended").then_some(())
    });
    assert!(cluster.coordinator.instances().is_empty(), "nothing re-registered");
}

/// A joiner outside any agent: its own key, and the request id it repeats.
struct Joiner {
    key: rcgen::KeyPair,
    request_id: String,
}

impl Joiner {
    fn new(request_id: &str) -> Self {
        Self {
            key: rcgen::KeyPair::generate().expect("key"),
            request_id: request_id.into(),
        }
    }

    /// Calls Join as an agent would, with `token` and the optional instance id.
    async fn join(
        &self,
        coordinator: &Coordinator,
        token: &str,
        instance_id: Option<&str>,
    ) -> Result<pb::JoinResponse, tonic::Status> {
        let token: rollwave_trust::JoinToken = token.parse().expect("token");
        let tls = rollwave_trust::join_client_config(token.ca).expect("config");
        let channel = rollwave_trust::connect(
            &coordinator.addr.to_string(),
            tls,
            PUBLIC_SERVER_NAME,
            &ChannelOptions::default(),
        )
        .await
        .expect("connect");
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&self.key)
            .expect("csr");
        AgentServiceClient::new(channel)
            .join(pb::JoinRequest {
                token_id: token.id.clone(),
                token_secret: token.secret.clone(),
                csr_pem: csr.pem().expect("csr pem"),
                facts: Some(pb::InstanceFacts {
                    hostname: format!("joiner-{}", self.request_id),
                    ..Default::default()
                }),
                requested_instance_id: instance_id.unwrap_or_default().into(),
                expected_stack: "web".into(),
                request_id: self.request_id.clone(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    fn client_config(&self, joined: &pb::JoinResponse) -> Arc<rustls::ClientConfig> {
        rollwave_trust::agent_client_config(
            joined.ca_pem.as_bytes(),
            joined.certificate_pem.as_bytes(),
            self.key.serialize_pem().as_bytes(),
        )
        .expect("agent config")
    }
}

/// The TLS config of the certificate `agent` holds now.
fn agent_config(agent: &rollwave_tests::Agent) -> Arc<rustls::ClientConfig> {
    let identity = agent.identity();
    let field = |name: &str| identity[name].as_str().expect("identity field").as_bytes().to_vec();
    rollwave_trust::agent_client_config(&field("ca_pem"), &field("certificate_pem"), &field("key_pem")).expect("config")
}

/// Renews the certificate of `config` (as an agent does at two thirds of its life).
async fn renew(
    coordinator: &Coordinator,
    config: Arc<rustls::ClientConfig>,
    ca_pem: &str,
) -> Arc<rustls::ClientConfig> {
    let channel = rollwave_trust::connect(
        &coordinator.addr.to_string(),
        config,
        AGENT_SERVER_NAME,
        &ChannelOptions::default(),
    )
    .await
    .expect("connect");
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .expect("csr");
    let renewed = AgentServiceClient::new(channel)
        .renew(pb::RenewRequest {
            csr_pem: csr.pem().expect("csr pem"),
        })
        .await
        .expect("renew")
        .into_inner();
    rollwave_trust::agent_client_config(
        ca_pem.as_bytes(),
        renewed.certificate_pem.as_bytes(),
        key.serialize_pem().as_bytes(),
    )
    .expect("renewed config")
}

async fn accepted(coordinator: &Coordinator, config: &Arc<rustls::ClientConfig>) -> bool {
    server_answers(coordinator.addr, config.clone(), AGENT_SERVER_NAME).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_cannot_take_over_an_instance_and_its_old_certificates_stay_refused_across_a_restart() {
    let mut cluster = tokio::task::block_in_place(|| Cluster::start(1));
    let id = cluster.agents[0].identity()["instance_id"]
        .as_str()
        .expect("instance id")
        .to_owned();
    let ca_pem = String::from_utf8(cluster.coordinator.ca_pem()).expect("utf-8");
    let old = agent_config(&cluster.agents[0]);
    // The holder renews once: the renewed certificate is the one that survived a restart.
    let renewed = renew(&cluster.coordinator, old.clone(), &ca_pem).await;

    // Another token of the same stack asks for the existing id: refused, and told what to do.
    let second_token = tokio::task::block_in_place(|| cluster.coordinator.create_token("web", 1, "10m"));
    let newcomer = Joiner::new("newcomer");
    let refused = newcomer
        .join(&cluster.coordinator, &second_token, Some(&id))
        .await
        .expect_err("a join for an existing instance is refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused
            .message()
            .contains(&format!("run `rollwave instance remove {id}` first")),
        "{}",
        refused.message()
    );
    // The holder is untouched: online, both its certificates work.
    tokio::task::block_in_place(|| cluster.coordinator.wait_presence("agent-0", "online"));
    assert!(accepted(&cluster.coordinator, &old).await && accepted(&cluster.coordinator, &renewed).await);

    // The operator removes it; then the same join succeeds (the refusal spent nothing).
    tokio::task::block_in_place(|| cluster.coordinator.cli(&["instance", "remove", &id]));
    let joined = newcomer
        .join(&cluster.coordinator, &second_token, Some(&id))
        .await
        .expect("join after removal");
    assert_eq!(joined.instance_id, id);
    let new = newcomer.client_config(&joined);
    for phase in ["after the re-join", "after a coordinator restart"] {
        if phase.contains("restart") {
            tokio::task::block_in_place(|| cluster.coordinator.restart());
        }
        let coordinator = &cluster.coordinator;
        assert!(
            !accepted(coordinator, &old).await,
            "{phase}: the old certificate is refused"
        );
        assert!(
            !accepted(coordinator, &renewed).await,
            "{phase}: the old holder's renewed certificate is refused"
        );
        assert!(accepted(coordinator, &new).await, "{phase}: the new holder is accepted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_join_whose_reply_was_lost_is_answered_again_and_the_token_stays_single_use() {
    let cluster = tokio::task::block_in_place(|| Cluster::start(0));
    let token = tokio::task::block_in_place(|| cluster.coordinator.create_token("web", 1, "10m"));
    let joiner = Joiner::new("lost-reply");
    let first = joiner
        .join(&cluster.coordinator, &token, None)
        .await
        .expect("first join");
    // The reply was lost: the agent asks again with the same key and request id.
    let again = joiner
        .join(&cluster.coordinator, &token, None)
        .await
        .expect("the repeated join is answered, not refused as used");
    assert_eq!(again.instance_id, first.instance_id);
    assert_eq!(again.certificate_pem, first.certificate_pem);
    assert!(
        accepted(&cluster.coordinator, &joiner.client_config(&again)).await,
        "the repeated answer's certificate works"
    );
    // Anyone else (another request id) finds the single-use token used.
    let other = Joiner::new("other")
        .join(&cluster.coordinator, &token, None)
        .await
        .expect_err("the token is spent");
    assert_eq!(other.code(), tonic::Code::PermissionDenied);
    assert!(other.message().contains("is used"), "{}", other.message());
    let instances = tokio::task::block_in_place(|| cluster.coordinator.instances());
    assert_eq!(instances.len(), 1, "one instance, no orphan: {instances:?}");
}
