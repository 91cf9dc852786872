//! The store's deployment tables: approvals (the approved release per stack
//! and bundle, with history), pins, deployments, the desired state last sent
//! to each instance with its epoch, and the latest health per instance.

use sqlx::Row;

use super::{Store, StoreError};

/// A release approved for a stack (the newest approval per bundle wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    pub stack: String,
    pub bundle: String,
    pub version: String,
    pub deployment_id: String,
    pub approved_at_ms: i64,
}

/// A deliberate exception: this instance runs `version` of `bundle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub instance_id: String,
    pub bundle: String,
    pub version: String,
    pub pinned_by: String,
    pub pinned_at_ms: i64,
}

/// One deployment as stored; `state` is the rollout state as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRow {
    pub id: String,
    /// Bumped by every update; an update names the generation it was computed from.
    pub generation: u64,
    pub stack: String,
    pub bundle: String,
    pub version: String,
    pub epoch: u64,
    pub status: String,
    pub state: String,
    pub created_by: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A new state for a deployment, computed from the row at `expected_generation`.
#[derive(Debug, Clone, Copy)]
pub struct DeploymentUpdate<'a> {
    pub expected_generation: u64,
    pub status: &'a str,
    pub state: &'a str,
    pub now_ms: i64,
    /// The deployment succeeded: approve its release in the same transaction.
    pub approve: bool,
    /// The deployment was a rollback: its approval is recorded as one (see [`Store::approval_history`]).
    pub rollback: bool,
}

/// The latest health an instance reported for a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthRow {
    pub instance_id: String,
    pub bundle: String,
    pub version: String,
    pub healthy: bool,
    pub detail: String,
    pub since_ms: i64,
    pub observed_at_ms: i64,
    /// The longest the agent lets pass between verdicts; 0 when it did not say (then the last
    /// interval recorded is kept).
    pub check_interval_ms: i64,
    /// Restarts of the release's app, and why it last exited ("" if it never did).
    pub app_restarts: i64,
    pub last_exit: String,
    pub last_exit_at_ms: i64,
}

/// An instance whose agent keeps failing to install the approved release of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallFailureRow {
    pub instance_id: String,
    pub bundle: String,
    pub version: String,
    pub reason: String,
    pub since_ms: i64,
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn deployment_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<DeploymentRow, StoreError> {
    Ok(DeploymentRow {
        id: row.try_get("id")?,
        generation: to_u64(row.try_get("generation")?),
        stack: row.try_get("stack")?,
        bundle: row.try_get("bundle")?,
        version: row.try_get("version")?,
        epoch: to_u64(row.try_get("epoch")?),
        status: row.try_get("status")?,
        state: row.try_get("state")?,
        created_by: row.try_get("created_by")?,
        created_at_ms: row.try_get("created_at")?,
        updated_at_ms: row.try_get("updated_at")?,
    })
}

impl Store {
    /// The next epoch: strictly greater than every epoch handed out before.
    pub async fn next_epoch(&self) -> Result<u64, StoreError> {
        let row = sqlx::query("UPDATE counters SET value = value + 1 WHERE name = 'epoch' RETURNING value")
            .fetch_one(&self.pool)
            .await?;
        Ok(to_u64(row.try_get("value")?))
    }

    /// Records `version` as the approved release of `bundle` on `stack`; `rollback` when a rollback returned
    /// the stack to it (see [`Store::approval_history`]).
    pub async fn approve(
        &self,
        stack: &str,
        bundle: &str,
        version: &str,
        deployment_id: &str,
        rollback: bool,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO approvals (stack, bundle, version, deployment_id, approved_at, kind) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(stack)
        .bind(bundle)
        .bind(version)
        .bind(deployment_id)
        .bind(now_ms)
        .bind(if rollback { "rollback" } else { "forward" })
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The approved release of every bundle of `stack`.
    pub async fn approved(&self, stack: &str) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.stack, a.bundle, a.version, a.deployment_id, a.approved_at FROM approvals a \
             WHERE a.stack = $1 AND a.sequence = \
               (SELECT MAX(b.sequence) FROM approvals b WHERE b.stack = a.stack AND b.bundle = a.bundle) \
             ORDER BY a.bundle",
        )
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Approval {
                    stack: row.try_get("stack")?,
                    bundle: row.try_get("bundle")?,
                    version: row.try_get("version")?,
                    deployment_id: row.try_get("deployment_id")?,
                    approved_at_ms: row.try_get("approved_at")?,
                })
            })
            .collect()
    }

    /// Approved versions of `bundle` on `stack`, oldest first, each with whether a rollback approved it.
    pub async fn approval_history(&self, stack: &str, bundle: &str) -> Result<Vec<(String, bool)>, StoreError> {
        let rows =
            sqlx::query("SELECT version, kind FROM approvals WHERE stack = $1 AND bundle = $2 ORDER BY sequence ASC")
                .bind(stack)
                .bind(bundle)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                Ok((row.try_get("version")?, kind == "rollback"))
            })
            .collect()
    }

    pub async fn set_pin(&self, pin: &Pin) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO pins (instance_id, bundle, version, pinned_by, pinned_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (instance_id, bundle) DO UPDATE SET version = $3, pinned_by = $4, pinned_at = $5",
        )
        .bind(&pin.instance_id)
        .bind(&pin.bundle)
        .bind(&pin.version)
        .bind(&pin.pinned_by)
        .bind(pin.pinned_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a pin; returns whether there was one.
    pub async fn remove_pin(&self, instance_id: &str, bundle: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM pins WHERE instance_id = $1 AND bundle = $2")
            .bind(instance_id)
            .bind(bundle)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// The pins of the instances of `stack`.
    pub async fn pins(&self, stack: &str) -> Result<Vec<Pin>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.instance_id, p.bundle, p.version, p.pinned_by, p.pinned_at FROM pins p \
             JOIN instances i ON i.id = p.instance_id WHERE i.stack = $1 ORDER BY p.instance_id, p.bundle",
        )
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Pin {
                    instance_id: row.try_get("instance_id")?,
                    bundle: row.try_get("bundle")?,
                    version: row.try_get("version")?,
                    pinned_by: row.try_get("pinned_by")?,
                    pinned_at_ms: row.try_get("pinned_at")?,
                })
            })
            .collect()
    }

    /// Records the desired state sent to an instance (before it is sent).
    pub async fn save_desired(&self, instance_id: &str, epoch: u64, body: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO desired_states (instance_id, epoch, body) VALUES ($1, $2, $3) \
             ON CONFLICT (instance_id) DO UPDATE SET epoch = $2, body = $3",
        )
        .bind(instance_id)
        .bind(to_i64(epoch))
        .bind(body)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn desired(&self, instance_id: &str) -> Result<Option<(u64, String)>, StoreError> {
        let row = sqlx::query("SELECT epoch, body FROM desired_states WHERE instance_id = $1")
            .bind(instance_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| Ok((to_u64(row.try_get("epoch")?), row.try_get("body")?)))
            .transpose()
    }

    pub async fn create_deployment(&self, row: &DeploymentRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO deployments \
             (id, stack, bundle, version, epoch, status, state, created_by, created_at, updated_at, generation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&row.id)
        .bind(&row.stack)
        .bind(&row.bundle)
        .bind(&row.version)
        .bind(to_i64(row.epoch))
        .bind(&row.status)
        .bind(&row.state)
        .bind(&row.created_by)
        .bind(row.created_at_ms)
        .bind(row.updated_at_ms)
        .bind(to_i64(row.generation))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Stores a deployment's new state (and approves its release when asked), only if the row is
    /// still at the generation the update was computed from; returns the new generation. A writer
    /// with an older view gets [`StoreError::StaleDeployment`] and nothing changes.
    pub async fn update_deployment(&self, id: &str, update: &DeploymentUpdate<'_>) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE deployments SET status = $3, state = $4, updated_at = $5, generation = generation + 1 \
             WHERE id = $1 AND generation = $2 RETURNING generation, stack, bundle, version",
        )
        .bind(id)
        .bind(to_i64(update.expected_generation))
        .bind(update.status)
        .bind(update.state)
        .bind(update.now_ms)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(updated) = updated else {
            let stored = sqlx::query("SELECT generation FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match stored {
                Some(row) => StoreError::StaleDeployment {
                    id: id.to_owned(),
                    expected: update.expected_generation,
                    stored: to_u64(row.try_get("generation")?),
                },
                None => StoreError::NoSuchDeployment(id.to_owned()),
            });
        };
        if update.approve {
            sqlx::query(
                "INSERT INTO approvals (stack, bundle, version, deployment_id, approved_at, kind) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(updated.try_get::<String, _>("stack")?)
            .bind(updated.try_get::<String, _>("bundle")?)
            .bind(updated.try_get::<String, _>("version")?)
            .bind(id)
            .bind(update.now_ms)
            .bind(if update.rollback { "rollback" } else { "forward" })
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(to_u64(updated.try_get("generation")?))
    }

    pub async fn get_deployment(&self, id: &str) -> Result<Option<DeploymentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, generation, stack, bundle, version, epoch, status, state, created_by, created_at, updated_at \
             FROM deployments WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(deployment_from_row).transpose()
    }

    /// Deployments, newest first; only those of `stack` when given; `running_only` for resumption.
    pub async fn list_deployments(
        &self,
        stack: Option<&str>,
        running_only: bool,
    ) -> Result<Vec<DeploymentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, generation, stack, bundle, version, epoch, status, state, created_by, created_at, updated_at \
             FROM deployments WHERE ($1 = '' OR stack = $1) AND ($2 = FALSE OR status = 'running') \
             ORDER BY created_at DESC, id",
        )
        .bind(stack.unwrap_or(""))
        .bind(running_only)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(deployment_from_row).collect()
    }

    /// Records a health report; `since` moves only when the verdict changes.
    pub async fn record_health(&self, health: &HealthRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO instance_health (instance_id, bundle, version, healthy, detail, since, observed_at, \
               check_interval_ms, app_restarts, last_exit, last_exit_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (instance_id, bundle) DO UPDATE SET \
               since = CASE WHEN instance_health.healthy = $4 AND instance_health.version = $3 \
                            THEN instance_health.since ELSE $6 END, \
               version = $3, healthy = $4, detail = $5, observed_at = $7, \
               check_interval_ms = CASE WHEN $8 > 0 THEN $8 ELSE instance_health.check_interval_ms END, \
               app_restarts = $9, last_exit = $10, last_exit_at = $11",
        )
        .bind(&health.instance_id)
        .bind(&health.bundle)
        .bind(&health.version)
        .bind(health.healthy)
        .bind(&health.detail)
        .bind(health.since_ms)
        .bind(health.observed_at_ms)
        .bind(health.check_interval_ms)
        .bind(health.app_restarts)
        .bind(&health.last_exit)
        .bind(health.last_exit_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records that the agent of `failure.instance_id` keeps failing to install a bundle;
    /// `true` when it was not failing before (the failure is news, for the audit trail).
    pub async fn record_install_failure(&self, failure: &InstallFailureRow) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO install_failures (instance_id, bundle, version, reason, since) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (instance_id, bundle) DO NOTHING",
        )
        .bind(&failure.instance_id)
        .bind(&failure.bundle)
        .bind(&failure.version)
        .bind(&failure.reason)
        .bind(failure.since_ms)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            sqlx::query(
                "UPDATE install_failures SET version = $3, reason = $4, since = $5 \
                 WHERE instance_id = $1 AND bundle = $2",
            )
            .bind(&failure.instance_id)
            .bind(&failure.bundle)
            .bind(&failure.version)
            .bind(&failure.reason)
            .bind(failure.since_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Forgets an install failure; `true` when there was one.
    pub async fn clear_install_failure(&self, instance_id: &str, bundle: &str) -> Result<bool, StoreError> {
        let removed = sqlx::query("DELETE FROM install_failures WHERE instance_id = $1 AND bundle = $2")
            .bind(instance_id)
            .bind(bundle)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(removed > 0)
    }

    /// The installs that keep failing on instances of `stack`.
    pub async fn install_failures(&self, stack: &str) -> Result<Vec<InstallFailureRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT f.instance_id, f.bundle, f.version, f.reason, f.since \
             FROM install_failures f JOIN instances i ON i.id = f.instance_id WHERE i.stack = $1 \
             ORDER BY f.instance_id, f.bundle",
        )
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(InstallFailureRow {
                    instance_id: row.try_get("instance_id")?,
                    bundle: row.try_get("bundle")?,
                    version: row.try_get("version")?,
                    reason: row.try_get("reason")?,
                    since_ms: row.try_get("since")?,
                })
            })
            .collect()
    }

    /// Records that `instance_id` now runs `version` of `bundle` (from its progress reports).
    pub async fn set_observed_release(
        &self,
        instance_id: &str,
        bundle: &str,
        version: &str,
        sha256: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Write first, so this transaction holds the write lock before it reads: a read that
        // later upgrades fails at once (SQLITE_BUSY) when another session wrote in between.
        sqlx::query("UPDATE instances SET observed = observed WHERE id = $1")
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query("SELECT observed FROM instances WHERE id = $1")
            .bind(instance_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            return Ok(());
        };
        let text: String = row.try_get("observed")?;
        let mut observed: Vec<crate::model::ObservedRelease> =
            serde_json::from_str(&text).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        observed.retain(|release| release.bundle != bundle);
        observed.push(crate::model::ObservedRelease {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
            sha256: sha256.to_owned(),
            state: "installed".into(),
        });
        observed.sort_by(|a, b| a.bundle.cmp(&b.bundle));
        let text = serde_json::to_string(&observed).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        sqlx::query("UPDATE instances SET observed = $2 WHERE id = $1")
            .bind(instance_id)
            .bind(text)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The latest health of every instance of `stack`.
    pub async fn health(&self, stack: &str) -> Result<Vec<HealthRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT h.instance_id, h.bundle, h.version, h.healthy, h.detail, h.since, h.observed_at, \
               h.check_interval_ms, h.app_restarts, h.last_exit, h.last_exit_at \
             FROM instance_health h JOIN instances i ON i.id = h.instance_id WHERE i.stack = $1 \
             ORDER BY h.instance_id, h.bundle",
        )
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(HealthRow {
                    instance_id: row.try_get("instance_id")?,
                    bundle: row.try_get("bundle")?,
                    version: row.try_get("version")?,
                    healthy: row.try_get("healthy")?,
                    detail: row.try_get("detail")?,
                    since_ms: row.try_get("since")?,
                    observed_at_ms: row.try_get("observed_at")?,
                    check_interval_ms: row.try_get("check_interval_ms")?,
                    app_restarts: row.try_get("app_restarts")?,
                    last_exit: row.try_get("last_exit")?,
                    last_exit_at_ms: row.try_get("last_exit_at")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Stage;

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db")).await.expect("open");
        store.create_stack("web", Stage::Production, 0).await.expect("stack");
        (dir, store)
    }

    #[tokio::test]
    async fn epochs_only_grow() {
        let (_dir, store) = store().await;
        let first = store.next_epoch().await.expect("epoch");
        let second = store.next_epoch().await.expect("epoch");
        assert!(second > first && first > 0);
    }

    fn deployment(id: &str) -> DeploymentRow {
        DeploymentRow {
            id: id.into(),
            generation: 0,
            stack: "web".into(),
            bundle: "app".into(),
            version: "1".into(),
            epoch: 1,
            status: "running".into(),
            state: "{}".into(),
            created_by: "op".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    /// Registers app@1, so deployments of it can be created.
    async fn register_release(store: &Store) {
        sqlx::query("INSERT INTO bundles (name, kind, created_at) VALUES ('app', 'app', 0)")
            .execute(&store.pool)
            .await
            .expect("bundle");
        sqlx::query(
            "INSERT INTO releases (bundle, version, bucket, object_key, sha256, size, pushed_by, pushed_at) \
             VALUES ('app', '1', 'b', 'k', 'aa', 1, 'op', 0)",
        )
        .execute(&store.pool)
        .await
        .expect("release");
    }

    #[tokio::test]
    async fn running_deployments_are_found_and_updated() {
        let (_dir, store) = store().await;
        let mut row = deployment("d1");
        // The release must exist (foreign key); deployments of unknown releases are refused.
        assert!(store.create_deployment(&row).await.is_err());
        register_release(&store).await;
        store.create_deployment(&row).await.expect("create");
        assert_eq!(store.list_deployments(Some("web"), true).await.expect("list").len(), 1);
        let update = DeploymentUpdate {
            expected_generation: 0,
            status: "succeeded",
            state: "{\"x\":1}",
            now_ms: 5,
            approve: true,
            rollback: false,
        };
        assert_eq!(store.update_deployment("d1", &update).await.expect("update"), 1);
        assert!(store.list_deployments(None, true).await.expect("list").is_empty());
        row.status = "succeeded".into();
        row.state = "{\"x\":1}".into();
        row.updated_at_ms = 5;
        row.generation = 1;
        assert_eq!(store.get_deployment("d1").await.expect("get"), Some(row));

        let approved = store.approved("web").await.expect("approved");
        assert_eq!(approved.len(), 1);
        assert_eq!(approved[0].version, "1");
        assert_eq!(
            store.approval_history("web", "app").await.expect("history"),
            [("1".to_owned(), false)]
        );
    }

    #[tokio::test]
    async fn a_stale_coordinator_overwrote_the_finished_deployment() {
        let (_dir, store) = store().await;
        register_release(&store).await;
        store.create_deployment(&deployment("d1")).await.expect("create");
        // Two writers read generation 0; the first finishes the deployment.
        let finished = DeploymentUpdate {
            expected_generation: 0,
            status: "succeeded",
            state: "{\"finished\":true}",
            now_ms: 5,
            approve: true,
            rollback: false,
        };
        assert_eq!(store.update_deployment("d1", &finished).await.expect("first writer"), 1);
        // The second, with its older view, would turn it back into a running one (and approve).
        let stale = DeploymentUpdate {
            expected_generation: 0,
            status: "running",
            state: "{\"stale\":true}",
            now_ms: 6,
            approve: true,
            rollback: false,
        };
        let error = store
            .update_deployment("d1", &stale)
            .await
            .expect_err("stale writer refused");
        assert!(
            matches!(&error, StoreError::StaleDeployment { id, expected: 0, stored: 1 } if id == "d1"),
            "{error:?}"
        );
        let stored = store.get_deployment("d1").await.expect("get").expect("row");
        assert_eq!(
            (stored.status.as_str(), stored.state.as_str(), stored.generation),
            ("succeeded", "{\"finished\":true}", 1)
        );
        assert_eq!(
            store.approval_history("web", "app").await.expect("history"),
            [("1".to_owned(), false)],
            "one approval only"
        );
        // A writer that reloads goes on from the stored generation.
        let next = DeploymentUpdate {
            expected_generation: 1,
            ..stale
        };
        assert_eq!(store.update_deployment("d1", &next).await.expect("fresh writer"), 2);
        let missing = store
            .update_deployment("d2", &next)
            .await
            .expect_err("no such deployment");
        assert!(matches!(missing, StoreError::NoSuchDeployment(_)), "{missing:?}");
    }

    /// An install that keeps failing is news once (for the audit trail), then kept up to date, and
    /// ends once; a verdict keeps the agent's check interval when an exit report does not say it.
    #[tokio::test]
    async fn install_failures_and_health_details_are_kept() {
        let (_dir, store) = store().await;
        sqlx::query("INSERT INTO instances (id, stack, joined_at, last_seen) VALUES ('i-1', 'web', 0, 0)")
            .execute(&store.pool)
            .await
            .expect("instance");
        let failure = InstallFailureRow {
            instance_id: "i-1".into(),
            bundle: "app".into(),
            version: "1.0".into(),
            reason: "S3 unreachable".into(),
            since_ms: 10,
        };
        assert!(store.record_install_failure(&failure).await.expect("record"));
        let again = InstallFailureRow {
            reason: "still unreachable".into(),
            ..failure.clone()
        };
        assert!(!store.record_install_failure(&again).await.expect("record"));
        assert_eq!(store.install_failures("web").await.expect("list"), [again]);
        assert!(store.clear_install_failure("i-1", "app").await.expect("clear"));
        assert!(!store.clear_install_failure("i-1", "app").await.expect("clear"));
        assert!(store.install_failures("web").await.expect("list").is_empty());

        let verdict = HealthRow {
            instance_id: "i-1".into(),
            bundle: "app".into(),
            version: "1.0".into(),
            healthy: true,
            detail: String::new(),
            since_ms: 20,
            observed_at_ms: 20,
            check_interval_ms: 7_000,
            app_restarts: 0,
            last_exit: String::new(),
            last_exit_at_ms: 0,
        };
        store.record_health(&verdict).await.expect("record");
        let exit = HealthRow {
            healthy: false,
            detail: "the app stopped: exited with code 1".into(),
            since_ms: 30,
            observed_at_ms: 30,
            check_interval_ms: 0,
            app_restarts: 0,
            last_exit: "exited with code 1".into(),
            last_exit_at_ms: 30,
            ..verdict.clone()
        };
        store.record_health(&exit).await.expect("record");
        let stored = store.health("web").await.expect("health");
        assert_eq!(
            stored,
            [HealthRow {
                check_interval_ms: 7_000,
                ..exit
            }]
        );
    }
}
