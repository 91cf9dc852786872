//! The traffic half of the operator API: a stack's load-balancer settings in and out, converted
//! between the wire and [`TrafficSettings`] here, at the edge.

use std::path::PathBuf;
use std::time::SystemTime;

use rollwave_proto::v1 as pb;
use tonic::Status;

use super::{ServiceError, Shared};
use crate::model::unix_ms;
use crate::traffic::{DEFAULT_DRAIN_TIMEOUT_MS, TrafficSettings};

/// The settings an operator sent, checked.
fn settings_from_proto(settings: pb::TrafficSettings) -> Result<(String, TrafficSettings), Status> {
    let drain_timeout_ms = settings.drain_timeout_ms.unwrap_or(DEFAULT_DRAIN_TIMEOUT_MS);
    let parsed = match settings.provider {
        None => {
            return Err(Status::invalid_argument(
                "no traffic provider: haproxy, aws-elbv2 or command",
            ));
        }
        Some(pb::traffic_settings::Provider::Haproxy(haproxy)) => TrafficSettings::Haproxy {
            runtime_api: haproxy.runtime_api,
            backend: haproxy.backend,
            server: haproxy.server,
            drain_timeout_ms,
        },
        Some(pb::traffic_settings::Provider::AwsElbv2(elbv2)) => TrafficSettings::AwsElbv2 {
            target_groups: elbv2.target_groups,
            target: elbv2.target,
            port: elbv2
                .port
                .map(|port| {
                    u16::try_from(port).map_err(|_| Status::invalid_argument(format!("port {port} is not a port")))
                })
                .transpose()?,
            endpoint: Some(elbv2.endpoint).filter(|endpoint| !endpoint.is_empty()),
            region: Some(elbv2.region).filter(|region| !region.is_empty()),
            drain_timeout_ms,
        },
        Some(pb::traffic_settings::Provider::Command(command)) => TrafficSettings::Command {
            drain: PathBuf::from(command.drain),
            undrain: PathBuf::from(command.undrain),
            backend: command.backend,
            server: command.server,
            drain_timeout_ms,
        },
    };
    parsed
        .validate()
        .map_err(|error| Status::invalid_argument(format!("traffic settings: {error}")))?;
    Ok((settings.layer, parsed))
}

fn settings_to_proto(layer: &str, settings: &TrafficSettings) -> pb::TrafficSettings {
    let provider = match settings {
        TrafficSettings::Haproxy {
            runtime_api,
            backend,
            server,
            ..
        } => pb::traffic_settings::Provider::Haproxy(pb::HaproxyTraffic {
            runtime_api: runtime_api.clone(),
            backend: backend.clone(),
            server: server.clone(),
        }),
        TrafficSettings::AwsElbv2 {
            target_groups,
            target,
            port,
            endpoint,
            region,
            ..
        } => pb::traffic_settings::Provider::AwsElbv2(pb::Elbv2Traffic {
            target_groups: target_groups.clone(),
            target: target.clone(),
            port: port.map(u32::from),
            endpoint: endpoint.clone().unwrap_or_default(),
            region: region.clone().unwrap_or_default(),
        }),
        TrafficSettings::Command {
            drain,
            undrain,
            backend,
            server,
            ..
        } => pb::traffic_settings::Provider::Command(pb::CommandTraffic {
            drain: drain.display().to_string(),
            undrain: undrain.display().to_string(),
            backend: backend.clone(),
            server: server.clone(),
        }),
    };
    pb::TrafficSettings {
        layer: layer.to_owned(),
        drain_timeout_ms: u64::try_from(settings.drain_timeout().as_millis()).ok(),
        provider: Some(provider),
        description: settings.describe(),
    }
}

async fn stack_traffic(shared: &Shared, stack: &str) -> Result<pb::StackTraffic, Status> {
    let settings = shared.store.traffic(stack).await.map_err(ServiceError::from)?;
    Ok(pb::StackTraffic {
        stack: stack.to_owned(),
        settings: settings
            .iter()
            .map(|(layer, settings)| settings_to_proto(layer, settings))
            .collect(),
    })
}

pub async fn set(shared: &Shared, actor: &str, request: pb::SetTrafficRequest) -> Result<pb::StackTraffic, Status> {
    shared
        .store
        .get_stack(&request.stack)
        .await
        .map_err(ServiceError::from)?;
    let settings = request
        .settings
        .ok_or_else(|| Status::invalid_argument("no traffic settings"))?;
    let (layer, settings) = settings_from_proto(settings)?;
    let now = unix_ms(SystemTime::now());
    shared
        .store
        .set_traffic(&request.stack, &layer, &settings, actor, now)
        .await
        .map_err(ServiceError::from)?;
    let target = if layer.is_empty() {
        request.stack.clone()
    } else {
        format!("{}/{layer}", request.stack)
    };
    shared
        .audit(actor, "traffic.set", &target, "ok", settings.describe())
        .await;
    stack_traffic(shared, &request.stack).await
}

pub async fn get(shared: &Shared, request: pb::GetTrafficRequest) -> Result<pb::StackTraffic, Status> {
    shared
        .store
        .get_stack(&request.stack)
        .await
        .map_err(ServiceError::from)?;
    stack_traffic(shared, &request.stack).await
}

pub async fn clear(shared: &Shared, actor: &str, request: pb::ClearTrafficRequest) -> Result<pb::StackTraffic, Status> {
    shared
        .store
        .get_stack(&request.stack)
        .await
        .map_err(ServiceError::from)?;
    let removed = shared
        .store
        .clear_traffic(&request.stack, &request.layer)
        .await
        .map_err(ServiceError::from)?;
    if !removed {
        let what = if request.layer.is_empty() {
            format!("stack {}", request.stack)
        } else {
            format!("layer {} of stack {}", request.layer, request.stack)
        };
        return Err(Status::not_found(format!("{what} has no traffic settings")));
    }
    shared
        .audit(actor, "traffic.clear", &request.stack, "ok", request.layer.clone())
        .await;
    stack_traffic(shared, &request.stack).await
}
