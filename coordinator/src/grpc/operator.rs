//! `rollwave.v1.OperatorService`: stacks, instances, join tokens and
//! releases, for authenticated operators only.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rollwave_proto::v1 as pb;
use rollwave_trust::JoinToken;
use tonic::{Request, Response, Status};

use super::{ServiceError, Shared, deployments, random_hex, secret_hash, traffic};
use crate::model::{
    BundleKind, Instance, InvalidInput, JoinTokenRecord, Release, Stack, Stage, parse_sha256, token_terms, unix_ms,
    validate_name,
};
use crate::store::StoreError;

/// The authenticated operator, put into request extensions by [`OperatorAuth`].
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
}

/// Checks `authorization: Bearer <token>` against the operators' token hashes.
#[derive(Debug, Clone, Default)]
pub struct OperatorAuth {
    by_token_hash: Arc<RwLock<HashMap<String, String>>>,
}

impl OperatorAuth {
    pub fn new(operators: impl IntoIterator<Item = (String, String)>) -> Self {
        let map = operators.into_iter().map(|(name, hash)| (hash, name)).collect();
        Self {
            by_token_hash: Arc::new(RwLock::new(map)),
        }
    }

    pub fn check<T>(&self, mut request: Request<T>) -> Result<Request<T>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing operator token: pass --token or set ROLLWAVE_TOKEN"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer <operator token>\""))?;
        let name = self
            .by_token_hash
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&secret_hash(token.trim()))
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown operator token"))?;
        request.extensions_mut().insert(Operator { name });
        Ok(request)
    }
}

impl tonic::service::Interceptor for OperatorAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request)
    }
}

fn operator_of<T>(request: &Request<T>) -> String {
    request
        .extensions()
        .get::<Operator>()
        .map(|operator| operator.name.clone())
        .unwrap_or_else(|| "operator".into())
}

#[derive(Debug, Clone)]
pub struct OperatorApi {
    shared: Arc<Shared>,
}

impl OperatorApi {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn instance_to_proto(&self, instance: Instance, now_ms: i64) -> pb::Instance {
        let presence = self.shared.settings.presence.presence(
            self.shared.sessions.is_connected(&instance.id),
            instance.last_seen_ms,
            now_ms,
        );
        pb::Instance {
            id: instance.id,
            stack: instance.stack,
            hostname: instance.facts.hostname,
            layer: instance.facts.layer,
            zone: instance.facts.zone,
            tags: instance.facts.tags.into_iter().collect(),
            agent_version: instance.facts.agent_version,
            presence: presence.as_str().to_owned(),
            last_seen_unix_ms: instance.last_seen_ms,
            joined_at_unix_ms: instance.joined_at_ms,
            observed: instance
                .observed
                .into_iter()
                .map(|release| pb::InstanceRelease {
                    bundle: release.bundle,
                    version: release.version,
                    sha256: release.sha256,
                    state: release.state,
                })
                .collect(),
            certificate_not_after_unix_ms: instance.certificate_not_after_ms,
        }
    }
}

fn stack_to_proto(stack: Stack) -> pb::Stack {
    pb::Stack {
        name: stack.name,
        stage: stack.stage.as_str().to_owned(),
        created_at_unix_ms: stack.created_at_ms,
        instance_count: stack.instance_count,
    }
}

fn token_to_proto(token: &JoinTokenRecord, now_ms: i64) -> pb::Token {
    pb::Token {
        id: token.id.clone(),
        stack: token.stack.clone(),
        created_at_unix_ms: token.created_at_ms,
        expires_at_unix_ms: token.expires_at_ms,
        uses_left: token.uses_left,
        uses_total: token.uses_total,
        revoked: token.revoked,
        status: token.status(now_ms).as_str().to_owned(),
    }
}

fn release_to_proto(release: Release) -> pb::Release {
    pb::Release {
        bundle: release.bundle,
        kind: release.kind.as_str().to_owned(),
        version: release.version,
        bucket: release.bucket,
        key: release.key,
        object_version: release.object_version,
        sha256: release.sha256.to_hex(),
        size: release.size,
        pushed_by: release.pushed_by,
        pushed_at_unix_ms: release.pushed_at_ms,
    }
}

/// The release a registration asks for, validated; who and when come from the call.
fn release_from_request(
    request: pb::RegisterReleaseRequest,
    pushed_by: String,
    pushed_at_ms: i64,
) -> Result<Release, InvalidInput> {
    let release = Release {
        kind: request.kind.parse::<BundleKind>()?,
        sha256: parse_sha256(&request.sha256)?,
        bundle: request.bundle,
        version: request.version,
        bucket: request.bucket,
        key: request.key,
        object_version: request.object_version,
        size: request.size,
        pushed_by,
        pushed_at_ms,
    };
    release.validate()?;
    Ok(release)
}

fn optional(value: &str) -> Option<&str> {
    (!value.is_empty()).then_some(value)
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for OperatorApi {
    async fn create_stack(&self, request: Request<pb::CreateStackRequest>) -> Result<Response<pb::Stack>, Status> {
        let actor = operator_of(&request);
        let request = request.into_inner();
        validate_name("stack name", &request.name).map_err(ServiceError::from)?;
        let stage: Stage = request.stage.parse().map_err(ServiceError::from)?;
        let shared = &self.shared;
        shared
            .store
            .create_stack(&request.name, stage, unix_ms(SystemTime::now()))
            .await
            .map_err(ServiceError::from)?;
        shared
            .audit(&actor, "stack.create", &request.name, "ok", format!("stage {stage}"))
            .await;
        let stack = shared
            .store
            .get_stack(&request.name)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(stack_to_proto(stack)))
    }

    async fn list_stacks(
        &self,
        _request: Request<pb::ListStacksRequest>,
    ) -> Result<Response<pb::ListStacksResponse>, Status> {
        let stacks = self.shared.store.list_stacks().await.map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListStacksResponse {
            stacks: stacks.into_iter().map(stack_to_proto).collect(),
        }))
    }

    async fn get_stack(&self, request: Request<pb::GetStackRequest>) -> Result<Response<pb::Stack>, Status> {
        let stack = self
            .shared
            .store
            .get_stack(&request.into_inner().name)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(stack_to_proto(stack)))
    }

    async fn list_instances(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let request = request.into_inner();
        let stack = optional(&request.stack);
        if let Some(stack) = stack {
            self.shared.store.get_stack(stack).await.map_err(ServiceError::from)?;
        }
        let instances = self
            .shared
            .store
            .list_instances(stack)
            .await
            .map_err(ServiceError::from)?;
        let now_ms = unix_ms(SystemTime::now());
        Ok(Response::new(pb::ListInstancesResponse {
            instances: instances
                .into_iter()
                .map(|instance| self.instance_to_proto(instance, now_ms))
                .collect(),
        }))
    }

    async fn get_instance(&self, request: Request<pb::GetInstanceRequest>) -> Result<Response<pb::Instance>, Status> {
        let instance = self
            .shared
            .store
            .get_instance(&request.into_inner().id)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(
            self.instance_to_proto(instance, unix_ms(SystemTime::now())),
        ))
    }

    async fn remove_instance(
        &self,
        request: Request<pb::RemoveInstanceRequest>,
    ) -> Result<Response<pb::RemoveInstanceResponse>, Status> {
        let actor = operator_of(&request);
        let id = request.into_inner().id;
        let shared = &self.shared;
        // Forget the certificates (store and memory) before ending the session, so a reconnect fails its handshake.
        shared
            .issued
            .remove_instance(&shared.store, &id)
            .await
            .map_err(ServiceError::from)?;
        shared.sessions.evict(
            &id,
            Status::permission_denied("this instance was removed by an operator"),
        );
        shared.audit(&actor, "instance.remove", &id, "ok", String::new()).await;
        Ok(Response::new(pb::RemoveInstanceResponse {}))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let actor = operator_of(&request);
        let request = request.into_inner();
        let (ttl, uses) =
            token_terms(request.ttl_seconds.map(Duration::from_secs), request.uses).map_err(ServiceError::from)?;
        let now_ms = unix_ms(SystemTime::now());
        let token = JoinToken {
            id: random_hex(6),
            secret: random_hex(16),
            ca: self.shared.ca.fingerprint(),
        };
        let record = JoinTokenRecord {
            id: token.id.clone(),
            stack: request.stack.clone(),
            secret_sha256: secret_hash(&token.secret),
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)),
            uses_total: uses,
            uses_left: uses,
            revoked: false,
        };
        self.shared
            .store
            .create_token(&record, &actor)
            .await
            .map_err(ServiceError::from)?;
        self.shared
            .audit(
                &actor,
                "token.create",
                &record.id,
                "ok",
                format!(
                    "stack {} uses {uses} ttl {}",
                    record.stack,
                    humantime::format_duration(ttl)
                ),
            )
            .await;
        Ok(Response::new(pb::CreateTokenResponse {
            token: token.to_string(),
            info: Some(token_to_proto(&record, now_ms)),
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let request = request.into_inner();
        let tokens = self
            .shared
            .store
            .list_tokens(optional(&request.stack))
            .await
            .map_err(ServiceError::from)?;
        let now_ms = unix_ms(SystemTime::now());
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.iter().map(|token| token_to_proto(token, now_ms)).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let actor = operator_of(&request);
        let id = request.into_inner().id;
        self.shared.store.revoke_token(&id).await.map_err(ServiceError::from)?;
        self.shared
            .audit(&actor, "token.revoke", &id, "ok", String::new())
            .await;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn register_release(
        &self,
        request: Request<pb::RegisterReleaseRequest>,
    ) -> Result<Response<pb::RegisterReleaseResponse>, Status> {
        let actor = operator_of(&request);
        let request = request.into_inner();
        let target = format!("{}@{}", request.bundle, request.version);
        let release =
            release_from_request(request, actor.clone(), unix_ms(SystemTime::now())).map_err(ServiceError::from)?;
        let shared = &self.shared;
        let registration = match shared.store.register_release(&release).await {
            Ok(registration) => registration,
            Err(error @ StoreError::RegistrationRefused(_)) => {
                shared
                    .audit(&actor, "release.register", &target, "refused", error.to_string())
                    .await;
                return Err(ServiceError::from(error).into());
            }
            Err(error) => return Err(ServiceError::from(error).into()),
        };
        let outcome = if registration.already_registered {
            "already registered"
        } else {
            "ok"
        };
        shared
            .audit(
                &actor,
                "release.register",
                &target,
                outcome,
                format!(
                    "{} sha256 {} size {} at {}",
                    registration.release.kind,
                    registration.release.sha256,
                    registration.release.size,
                    registration.release.location()
                ),
            )
            .await;
        Ok(Response::new(pb::RegisterReleaseResponse {
            already_registered: registration.already_registered,
            release: Some(release_to_proto(registration.release)),
        }))
    }

    async fn list_releases(
        &self,
        request: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let request = request.into_inner();
        let releases = self
            .shared
            .store
            .list_releases(optional(&request.bundle))
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(pb::ListReleasesResponse {
            releases: releases.into_iter().map(release_to_proto).collect(),
        }))
    }

    async fn get_release(&self, request: Request<pb::GetReleaseRequest>) -> Result<Response<pb::Release>, Status> {
        let request = request.into_inner();
        let release = self
            .shared
            .store
            .get_release(&request.bundle, &request.version)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(release_to_proto(release)))
    }

    async fn create_deployment(
        &self,
        request: Request<pb::CreateDeploymentRequest>,
    ) -> Result<Response<pb::CreateDeploymentResponse>, Status> {
        let actor = operator_of(&request);
        let request = deployments::request_from_proto(request.into_inner())?;
        let created = self.shared.deployer.create(&self.shared, &actor, request).await?;
        Ok(Response::new(pb::CreateDeploymentResponse {
            plan: Some(deployments::plan_to_proto(&created.plan, &created.drain)),
            deployment: created.deployment,
        }))
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(self.shared.deployer.get(&self.shared, &id).await?))
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        let stack = request.into_inner().stack;
        let stack = Some(stack.as_str()).filter(|stack| !stack.is_empty());
        let deployments = self.shared.deployer.list(&self.shared, stack).await?;
        Ok(Response::new(pb::ListDeploymentsResponse { deployments }))
    }

    async fn control_deployment(
        &self,
        request: Request<pb::ControlDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let actor = operator_of(&request);
        let request = request.into_inner();
        let deployment = self
            .shared
            .deployer
            .control(&self.shared, &actor, &request.id, &request.action)
            .await?;
        Ok(Response::new(deployment))
    }

    async fn rollback_stack(
        &self,
        request: Request<pb::RollbackStackRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let actor = operator_of(&request);
        let deployment = deployments::rollback_stack(&self.shared, &actor, request.into_inner()).await?;
        Ok(Response::new(deployment))
    }

    async fn pin(&self, request: Request<pb::PinRequest>) -> Result<Response<pb::PinResponse>, Status> {
        let actor = operator_of(&request);
        Ok(Response::new(
            deployments::pin(&self.shared, &actor, request.into_inner()).await?,
        ))
    }

    async fn unpin(&self, request: Request<pb::UnpinRequest>) -> Result<Response<pb::UnpinResponse>, Status> {
        let actor = operator_of(&request);
        Ok(Response::new(
            deployments::unpin(&self.shared, &actor, request.into_inner()).await?,
        ))
    }

    async fn get_stack_status(
        &self,
        request: Request<pb::GetStackStatusRequest>,
    ) -> Result<Response<pb::StackStatus>, Status> {
        let stack = request.into_inner().stack;
        Ok(Response::new(deployments::stack_status(&self.shared, &stack).await?))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(
            deployments::list_events(&self.shared, request.into_inner()).await?,
        ))
    }

    async fn set_traffic(&self, request: Request<pb::SetTrafficRequest>) -> Result<Response<pb::StackTraffic>, Status> {
        let actor = operator_of(&request);
        Ok(Response::new(
            traffic::set(&self.shared, &actor, request.into_inner()).await?,
        ))
    }

    async fn get_traffic(&self, request: Request<pb::GetTrafficRequest>) -> Result<Response<pb::StackTraffic>, Status> {
        Ok(Response::new(traffic::get(&self.shared, request.into_inner()).await?))
    }

    async fn clear_traffic(
        &self,
        request: Request<pb::ClearTrafficRequest>,
    ) -> Result<Response<pb::StackTraffic>, Status> {
        let actor = operator_of(&request);
        Ok(Response::new(
            traffic::clear(&self.shared, &actor, request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> pb::RegisterReleaseRequest {
        pb::RegisterReleaseRequest {
            bundle: "site".into(),
            kind: "app".into(),
            version: "1.4.2".into(),
            bucket: "releases".into(),
            key: "releases/site/1.4.2.zip".into(),
            object_version: Some("3HL4kqtJlcpXroDTDmJ".into()),
            sha256: "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed".into(),
            size: 3,
        }
    }

    #[test]
    fn registrations_are_validated_at_the_edge() {
        let release = release_from_request(request(), "admin".into(), 5).expect("valid");
        assert_eq!(
            (release.name(), release.pushed_by.as_str(), release.pushed_at_ms),
            ("site@1.4.2".to_owned(), "admin", 5)
        );
        let cases: Vec<(pb::RegisterReleaseRequest, &str)> = vec![
            (
                pb::RegisterReleaseRequest {
                    bundle: "a/b".into(),
                    ..request()
                },
                "bundle name \"a/b\" is invalid: use 1 to 128 characters",
            ),
            (
                pb::RegisterReleaseRequest {
                    version: "current".into(),
                    ..request()
                },
                "version \"current\" is invalid",
            ),
            (
                pb::RegisterReleaseRequest {
                    kind: "library".into(),
                    ..request()
                },
                "invalid bundle kind \"library\": expected app or cookbook",
            ),
            (
                pb::RegisterReleaseRequest {
                    sha256: "ABC".into(),
                    ..request()
                },
                "invalid sha256 \"ABC\"",
            ),
            (
                pb::RegisterReleaseRequest {
                    bucket: String::new(),
                    ..request()
                },
                "invalid bucket \"\"",
            ),
            (
                pb::RegisterReleaseRequest {
                    key: String::new(),
                    ..request()
                },
                "invalid object key \"\"",
            ),
            (
                pb::RegisterReleaseRequest {
                    object_version: Some(String::new()),
                    ..request()
                },
                "leave it unset for an unversioned bucket",
            ),
        ];
        for (request, fragment) in cases {
            let error = release_from_request(request, "admin".into(), 5).expect_err(fragment);
            assert!(error.to_string().contains(fragment), "{error}");
        }
    }
}
