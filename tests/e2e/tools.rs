//! Standard gRPC tooling works against the coordinator: an independent Python
//! grpcio client checks health and lists services through reflection.

use std::process::Command;

use rollwave_tests::Cluster;

/// The Python with grpcio-health-checking and grpcio-reflection; tests/run installs it.
#[test]
fn health_and_reflection_answer_a_python_grpc_client() {
    let cluster = Cluster::start(0);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/grpc_probe.py");
    let output = Command::new(rollwave_tests::test_python())
        .arg(script)
        .arg(cluster.coordinator.addr.to_string())
        .arg(cluster.coordinator.data_dir().join("ca.pem"))
        .arg(rollwave_trust::PUBLIC_SERVER_NAME)
        .output()
        .expect("run the Python probe");
    assert!(
        output.status.success(),
        "probe failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("probe prints JSON");
    let services: Vec<&str> = report["services"]
        .as_array()
        .expect("services")
        .iter()
        .filter_map(|service| service.as_str())
        .collect();
    for expected in [
        "grpc.health.v1.Health",
        "rollwave.v1.AgentService",
        "rollwave.v1.OperatorService",
    ] {
        assert!(
            services.contains(&expected),
            "reflection lists {expected}: {services:?}"
        );
    }
    assert_eq!(report["health"][""], "SERVING", "{report}");
    assert_eq!(report["health"]["rollwave.v1.AgentService"], "SERVING", "{report}");
    assert_eq!(report["health"]["rollwave.v1.OperatorService"], "SERVING", "{report}");
}
