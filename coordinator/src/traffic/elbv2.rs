//! AWS Elastic Load Balancing v2 (ALB, NLB) as a traffic provider: deregistering an instance's
//! target from its target groups drains it (the load balancer stops new requests and lets
//! in-flight ones finish within the group's deregistration delay), registering it again returns it
//! (through the group's initial health checks before it takes traffic).

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_elasticloadbalancingv2::Client;
use aws_sdk_elasticloadbalancingv2::types::{TargetDescription, TargetHealthStateEnum};
use aws_smithy_http_client::tls;
use tokio::time::Instant;

use super::{AdminState, DrainOutcome, OperationalState, ServerState, TrafficError, TrafficTarget};

/// How often a drain looks at the target's state.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client for the target groups one stack's instances are registered in.
#[derive(Clone, Debug)]
pub struct Elbv2Provider {
    client: Client,
    target_groups: Vec<String>,
    port: Option<u16>,
    poll_interval: Duration,
}

impl Elbv2Provider {
    /// A client on the standard AWS credential chain, with optional endpoint and region overrides.
    pub async fn connect(
        target_groups: Vec<String>,
        port: Option<u16>,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_elasticloadbalancingv2::config::Builder::from(&shared);
        if let Some(endpoint) = endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Elbv2Provider {
            client: Client::from_conf(builder.build()),
            target_groups,
            port,
            poll_interval: POLL_INTERVAL,
        }
    }

    fn description(&self, target: &TrafficTarget) -> TargetDescription {
        let mut description = TargetDescription::builder().id(&target.server);
        if let Some(port) = self.port {
            description = description.port(i32::from(port));
        }
        description.build()
    }

    /// Deregisters the target from every group, then waits (up to `timeout`) until no group still
    /// drains it.
    pub(super) async fn drain(&self, target: &TrafficTarget, timeout: Duration) -> Result<DrainOutcome, TrafficError> {
        let started = Instant::now();
        for group in &self.target_groups {
            let call = self
                .client
                .deregister_targets()
                .target_group_arn(group)
                .targets(self.description(target))
                .send();
            bounded(group, "DeregisterTargets", target, call).await?;
        }
        let deadline = started + timeout;
        loop {
            let mut draining = false;
            for group in &self.target_groups {
                let state = self.state_in(group, target).await?;
                draining |= matches!(
                    state,
                    Some(TargetHealthStateEnum::Draining | TargetHealthStateEnum::UnhealthyDraining)
                );
            }
            let waited = started.elapsed();
            if !draining {
                return Ok(DrainOutcome::Drained { waited });
            }
            if Instant::now() >= deadline {
                // ELBv2 does not count connections; it cuts them at the end of its own deregistration delay.
                return Ok(DrainOutcome::TimedOut {
                    waited,
                    remaining_sessions: None,
                });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Registers the target in every group again.
    pub(super) async fn undrain(&self, target: &TrafficTarget) -> Result<(), TrafficError> {
        for group in &self.target_groups {
            let call = self
                .client
                .register_targets()
                .target_group_arn(group)
                .targets(self.description(target))
                .send();
            bounded(group, "RegisterTargets", target, call).await?;
        }
        Ok(())
    }

    /// The target's state in the first group: in service, draining or out of it.
    pub(super) async fn state(&self, target: &TrafficTarget) -> Result<ServerState, TrafficError> {
        let Some(group) = self.target_groups.first() else {
            return Err(elbv2_error("-", "DescribeTargetHealth", target, "no target group"));
        };
        let state = self.state_in(group, target).await?;
        let (admin, operational) = match state {
            None | Some(TargetHealthStateEnum::Unused) => (AdminState::Maint, OperationalState::Stopped),
            Some(TargetHealthStateEnum::Draining | TargetHealthStateEnum::UnhealthyDraining) => {
                (AdminState::Drain, OperationalState::Stopping)
            }
            Some(TargetHealthStateEnum::Healthy) => (AdminState::Ready, OperationalState::Running),
            Some(TargetHealthStateEnum::Initial) => (AdminState::Ready, OperationalState::Starting),
            Some(_) => (AdminState::Ready, OperationalState::Stopped),
        };
        Ok(ServerState {
            admin,
            operational,
            current_sessions: 0,
        })
    }

    /// The target's health state in `group`, or `None` when it is not registered there.
    async fn state_in(
        &self,
        group: &str,
        target: &TrafficTarget,
    ) -> Result<Option<TargetHealthStateEnum>, TrafficError> {
        let call = self.client.describe_target_health().target_group_arn(group).send();
        let output = bounded(group, "DescribeTargetHealth", target, call).await?;
        Ok(output
            .target_health_descriptions()
            .iter()
            .find(|description| {
                description.target().is_some_and(|registered| {
                    registered.id() == Some(target.server.as_str())
                        && self.port.is_none_or(|port| registered.port() == Some(i32::from(port)))
                })
            })
            .map(|description| {
                description
                    .target_health()
                    .and_then(|health| health.state())
                    .cloned()
                    .unwrap_or(TargetHealthStateEnum::Unused)
            }))
    }
}

/// Runs one API call under [`CALL_TIMEOUT`], naming the group and the call in errors.
async fn bounded<T, E>(
    group: &str,
    call_name: &str,
    target: &TrafficTarget,
    call: impl Future<Output = Result<T, aws_sdk_elasticloadbalancingv2::error::SdkError<E>>>,
) -> Result<T, TrafficError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Err(_) => Err(elbv2_error(
            group,
            call_name,
            target,
            &format!("no answer within {CALL_TIMEOUT:?}"),
        )),
        Ok(Err(error)) => {
            let detail = aws_sdk_elasticloadbalancingv2::error::DisplayErrorContext(&error).to_string();
            Err(elbv2_error(group, call_name, target, &detail))
        }
        Ok(Ok(output)) => Ok(output),
    }
}

fn elbv2_error(group: &str, call: &str, target: &TrafficTarget, detail: &str) -> TrafficError {
    TrafficError::Elbv2 {
        target_group: group.to_owned(),
        call: call.to_owned(),
        target: Box::new(target.clone()),
        detail: detail.to_owned(),
    }
}
