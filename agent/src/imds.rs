//! The EC2 instance metadata service (IMDSv2): instance id and availability
//! zone when agent.toml does not give them. Short timeouts and one attempt,
//! so an agent off EC2 starts without waiting.

use std::time::Duration;

use aws_config::imds::Client;
use aws_config::provider_config::ProviderConfig;

const IMDS_TIMEOUT: Duration = Duration::from_secs(1);

/// What the metadata service told us; `None` where it did not answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ec2Metadata {
    pub instance_id: Option<String>,
    pub zone: Option<String>,
}

pub async fn discover() -> Ec2Metadata {
    let http = aws_smithy_http_client::Builder::new().build_http();
    let client = Client::builder()
        .configure(&ProviderConfig::without_region().with_http_client(http))
        .connect_timeout(IMDS_TIMEOUT)
        .read_timeout(IMDS_TIMEOUT)
        .operation_timeout(IMDS_TIMEOUT * 3)
        .max_attempts(1)
        .build();
    let fetch = |path: &'static str| {
        let client = client.clone();
        async move {
            match client.get(path).await {
                Ok(value) => Some(value.as_ref().trim().to_owned()).filter(|value| !value.is_empty()),
                Err(error) => {
                    tracing::debug!(path, %error, "instance metadata not available");
                    None
                }
            }
        }
    };
    let instance_id = fetch("/latest/meta-data/instance-id").await;
    // Off EC2 the first call fails; do not spend another timeout on the second.
    let zone = if instance_id.is_some() {
        fetch("/latest/meta-data/placement/availability-zone").await
    } else {
        None
    };
    Ec2Metadata { instance_id, zone }
}
