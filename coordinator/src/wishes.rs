//! What each instance should run: its *wish* (per bundle, the release to be
//! current, plus releases to prepare ahead of a wave). Wishes are stored
//! before they are sent, each push under a fresh epoch, so an agent can
//! tell a newer wish from an older one even across coordinator restarts.
//! Instances without a wish get the stack's approved releases (pins win).

use rollwave_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use crate::grpc::Shared;
use crate::model::{BundleKind, Release};
use crate::store::StoreError;

/// The stored wish of one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wish {
    /// The deployment that last changed it ("" for approvals and pins).
    pub deployment_id: String,
    /// bundle → version to be current.
    pub active: BTreeMap<String, String>,
    /// (bundle, version) to prepare without switching.
    pub prepare: BTreeSet<(String, String)>,
}

impl Wish {
    /// Current releases of the stack's approvals, with `pins` (bundle → version) winning.
    pub fn baseline(approved: &BTreeMap<String, String>, pins: &BTreeMap<String, String>) -> Self {
        let mut active = approved.clone();
        active.extend(pins.iter().map(|(bundle, version)| (bundle.clone(), version.clone())));
        Self {
            deployment_id: String::new(),
            active,
            prepare: BTreeSet::new(),
        }
    }
}

/// The wish of `instance_id`: the stored one, else the stack's baseline.
pub async fn wish_of(shared: &Shared, instance_id: &str, stack: &str) -> Result<Wish, StoreError> {
    if let Some((_, body)) = shared.store.desired(instance_id).await? {
        return serde_json::from_str(&body)
            .map_err(|error| StoreError::Corrupt(format!("wish of {instance_id}: {error}")));
    }
    baseline_of(shared, instance_id, stack).await
}

/// The stack's approved releases for `instance_id`, with its pins.
pub async fn baseline_of(shared: &Shared, instance_id: &str, stack: &str) -> Result<Wish, StoreError> {
    let approved: BTreeMap<String, String> = shared
        .store
        .approved(stack)
        .await?
        .into_iter()
        .map(|approval| (approval.bundle, approval.version))
        .collect();
    let pins: BTreeMap<String, String> = shared
        .store
        .pins(stack)
        .await?
        .into_iter()
        .filter(|pin| pin.instance_id == instance_id)
        .map(|pin| (pin.bundle, pin.version))
        .collect();
    Ok(Wish::baseline(&approved, &pins))
}

fn release_ref(release: &Release) -> pb::ReleaseRef {
    pb::ReleaseRef {
        bundle: release.bundle.clone(),
        kind: release.kind.as_str().to_owned(),
        version: release.version.clone(),
        bucket: release.bucket.clone(),
        key: release.key.clone(),
        object_version: release.object_version.clone().unwrap_or_default(),
        sha256: release.sha256.to_hex(),
        size: release.size,
    }
}

/// Stores `wish` under a fresh epoch, then sends it if the instance is connected.
pub async fn send(shared: &Shared, instance_id: &str, wish: &Wish) -> Result<(), StoreError> {
    let epoch = shared.store.next_epoch().await?;
    let body = serde_json::to_string(wish).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    shared.store.save_desired(instance_id, epoch, &body).await?;
    push(shared, instance_id, epoch, wish).await
}

/// Sends the stored wish again (after a hello): same epoch, so it is not newer than itself.
pub async fn resend(shared: &Shared, instance_id: &str, stack: &str) -> Result<(), StoreError> {
    match shared.store.desired(instance_id).await? {
        Some((epoch, body)) => {
            let wish: Wish = serde_json::from_str(&body)
                .map_err(|error| StoreError::Corrupt(format!("wish of {instance_id}: {error}")))?;
            push(shared, instance_id, epoch, &wish).await
        }
        None => {
            let wish = baseline_of(shared, instance_id, stack).await?;
            if wish.active.is_empty() {
                return Ok(());
            }
            send(shared, instance_id, &wish).await
        }
    }
}

async fn push(shared: &Shared, instance_id: &str, epoch: u64, wish: &Wish) -> Result<(), StoreError> {
    let mut active = Vec::new();
    for (bundle, version) in &wish.active {
        active.push(shared.store.get_release(bundle, version).await?);
    }
    // Cookbooks first: they set up the host the apps run on.
    active.sort_by_key(|release| (release.kind != BundleKind::Cookbook, release.bundle.clone()));
    let mut prepare = Vec::new();
    for (bundle, version) in &wish.prepare {
        prepare.push(release_ref(&shared.store.get_release(bundle, version).await?));
    }
    let state = pb::DesiredState {
        epoch,
        deployment_id: wish.deployment_id.clone(),
        active: active.iter().map(release_ref).collect(),
        prepare,
    };
    if !shared.sessions.push_desired(instance_id, state) {
        tracing::debug!(instance = %instance_id, epoch, "not connected; the wish is sent on its next hello");
    }
    Ok(())
}
