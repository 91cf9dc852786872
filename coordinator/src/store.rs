//! Durable state: the embedded SQLite database under the data dir.
//!
//! Queries use `$N` placeholders and plain types (TEXT, BIGINT, BOOLEAN) so
//! that a PostgreSQL backend can run the same statements; only the connection
//! setup and the migration files are per database. Every write that must not
//! be lost is committed (and, with `synchronous = FULL`, fsynced) before the
//! caller acts on it.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlSafeStr, SqlitePool};

use crate::enrollment::{self, JoinAttempt, JoinDecision, JoinRefused, PastJoin};
use crate::model::{
    BundleKind, Event, EventFilter, Instance, InstanceFacts, JoinTokenRecord, ObservedRelease, Release, Stack, Stage,
};
use crate::registry::{self, Decision, RegistrationRefused};

mod deployments;
mod traffic;

pub use deployments::{Approval, DeploymentRow, DeploymentUpdate, HealthRow, InstallFailureRow, Pin};

/// The SQLite migrations, embedded so the binary carries its own schema.
const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/sqlite/0001_initial.sql")),
    (
        2,
        "deployments",
        include_str!("../migrations/sqlite/0002_deployments.sql"),
    ),
    (3, "traffic", include_str!("../migrations/sqlite/0003_traffic.sql")),
    (
        4,
        "deployment generation",
        include_str!("../migrations/sqlite/0004_deployment_generation.sql"),
    ),
    (5, "joins", include_str!("../migrations/sqlite/0005_joins.sql")),
    (
        6,
        "event scope",
        include_str!("../migrations/sqlite/0006_event_scope.sql"),
    ),
    (
        7,
        "approval kind",
        include_str!("../migrations/sqlite/0007_approval_kind.sql"),
    ),
    (
        8,
        "agent truth",
        include_str!("../migrations/sqlite/0008_agent_truth.sql"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("restrict {path} to its owner (mode 0600): {source}")]
    Permissions {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("migrate database schema: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("stack {0:?} already exists")]
    StackExists(String),
    #[error("stack {0:?} does not exist; create it with `rollwave stack create {0}`")]
    NoSuchStack(String),
    #[error("instance {0:?} does not exist")]
    NoSuchInstance(String),
    #[error("deployment {0:?} does not exist")]
    NoSuchDeployment(String),
    #[error("join token {0:?} does not exist")]
    NoSuchToken(String),
    #[error(transparent)]
    JoinRefused(#[from] JoinRefused),
    #[error("release {bundle}@{version} is not registered; push it with `rollwave release push`")]
    NoSuchRelease { bundle: String, version: String },
    #[error(transparent)]
    RegistrationRefused(#[from] RegistrationRefused),
    #[error(
        "deployment {id} was changed by another writer (stored generation {stored}, this view is generation {expected}); nothing was written: reload the deployment and try again"
    )]
    StaleDeployment { id: String, expected: u64, stored: u64 },
}

/// What registering a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The release as registered: the earlier record when `already_registered`.
    pub release: Release,
    /// The same archive was registered before; nothing changed.
    pub already_registered: bool,
}

/// A newly issued certificate, to record with its instance.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub fingerprint: String,
    pub issued_at_ms: i64,
    pub not_after_ms: i64,
}

/// A join to carry out: the attempt, its token, and the certificate signed for it.
#[derive(Debug, Clone)]
pub struct NewJoin<'a> {
    pub attempt: &'a JoinAttempt,
    pub token_id: &'a str,
    pub facts: &'a InstanceFacts,
    pub certificate: &'a IssuedCertificate,
    pub certificate_pem: &'a str,
    pub now_ms: i64,
}

/// A certificate that currently identifies an instance.
#[derive(Debug, Clone)]
pub struct CertificateRecord {
    pub fingerprint: String,
    pub instance_id: String,
    pub not_after_ms: i64,
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Mode of the database and its side files: they hold operator and token hashes, the audit trail.
const DATABASE_FILE_MODE: u32 = 0o600;

/// Creates the database file owner-only if missing, and tightens an existing one and its
/// `-wal`/`-shm` files (written 0644 by earlier versions). SQLite creates the side files with
/// the main file's mode, so new ones are 0600 too.
fn restrict_database_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(DATABASE_FILE_MODE)
        .open(path)?;
    let mut side_files = vec![path.to_owned()];
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        side_files.push(name.into());
    }
    for file in side_files {
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(DATABASE_FILE_MODE)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database file and brings its schema up to date.
    /// The database and its `-wal`/`-shm` files are readable by the owner only.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        restrict_database_files(path).map_err(|source| StoreError::Permissions {
            path: path.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let migrations = SQLITE_MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    (*description).into(),
                    MigrationType::Simple,
                    sqlx::AssertSqlSafe(*sql).into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations).run(&pool).await?;
        Ok(Self { pool })
    }

    // ---- stacks -------------------------------------------------------

    pub async fn create_stack(&self, name: &str, stage: Stage, now_ms: i64) -> Result<(), StoreError> {
        let result = sqlx::query("INSERT INTO stacks (name, stage, created_at) VALUES ($1, $2, $3)")
            .bind(name)
            .bind(stage.as_str())
            .bind(now_ms)
            .execute(&self.pool)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(error) if is_unique_violation(&error) => Err(StoreError::StackExists(name.to_owned())),
            Err(error) => Err(error.into()),
        }
    }

    pub async fn list_stacks(&self) -> Result<Vec<Stack>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.name, s.stage, s.created_at, \
                    (SELECT COUNT(*) FROM instances i WHERE i.stack = s.name) AS instance_count \
             FROM stacks s ORDER BY s.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(stack_from_row).collect()
    }

    pub async fn get_stack(&self, name: &str) -> Result<Stack, StoreError> {
        let row = sqlx::query(
            "SELECT s.name, s.stage, s.created_at, \
                    (SELECT COUNT(*) FROM instances i WHERE i.stack = s.name) AS instance_count \
             FROM stacks s WHERE s.name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NoSuchStack(name.to_owned()))?;
        stack_from_row(&row)
    }

    // ---- join tokens --------------------------------------------------

    pub async fn create_token(&self, token: &JoinTokenRecord, created_by: &str) -> Result<(), StoreError> {
        self.get_stack(&token.stack).await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, stack, secret_sha256, created_at, created_by, expires_at, uses_total, uses_left, revoked) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, FALSE)",
        )
        .bind(&token.id)
        .bind(&token.stack)
        .bind(&token.secret_sha256)
        .bind(token.created_at_ms)
        .bind(created_by)
        .bind(token.expires_at_ms)
        .bind(i64::from(token.uses_total))
        .bind(i64::from(token.uses_left))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn list_tokens(&self, stack: Option<&str>) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, stack, secret_sha256, created_at, expires_at, uses_total, uses_left, revoked \
             FROM join_tokens WHERE ($1 IS NULL OR stack = $1) ORDER BY created_at, id",
        )
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    pub async fn get_token(&self, id: &str) -> Result<JoinTokenRecord, StoreError> {
        let row = sqlx::query(
            "SELECT id, stack, secret_sha256, created_at, expires_at, uses_total, uses_left, revoked \
             FROM join_tokens WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NoSuchToken(id.to_owned()))?;
        token_from_row(&row)
    }

    pub async fn revoke_token(&self, id: &str) -> Result<(), StoreError> {
        let result = sqlx::query("UPDATE join_tokens SET revoked = TRUE WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        if result.rows_affected() == 0 {
            return Err(StoreError::NoSuchToken(id.to_owned()));
        }
        Ok(())
    }

    // ---- joining and certificates --------------------------------------

    /// Carries out a join following [`enrollment::decide`], in one
    /// transaction: either the token use, the instance, its first certificate
    /// and the record of the join all commit, or nothing does. The
    /// transaction's first statement writes, so concurrent joins queue for
    /// the write lock and each decides on what the previous one committed: of
    /// many joins racing for the last use exactly one commits, and a retried
    /// join sees the join it repeats.
    ///
    /// Call it through [`crate::identity::IssuedCertificates::join`], which
    /// keeps the in-memory copy of the certificates table in step.
    pub async fn join_instance(&self, join: &NewJoin<'_>) -> Result<JoinDecision, StoreError> {
        let attempt = join.attempt;
        let mut tx = self.pool.begin().await?;
        let claimed = sqlx::query("UPDATE join_tokens SET uses_left = uses_left WHERE id = $1")
            .bind(join.token_id)
            .execute(&mut *tx)
            .await?;
        if claimed.rows_affected() != 1 {
            return Err(StoreError::NoSuchToken(join.token_id.to_owned()));
        }
        let token = sqlx::query(
            "SELECT id, stack, secret_sha256, created_at, expires_at, uses_total, uses_left, revoked \
             FROM join_tokens WHERE id = $1",
        )
        .bind(join.token_id)
        .fetch_one(&mut *tx)
        .await?;
        let token = token_from_row(&token)?;
        let past = if attempt.request_id.is_empty() {
            None
        } else {
            sqlx::query(
                "SELECT j.request_id, j.public_key_sha256, j.token_id, i.stack, j.instance_id, j.certificate_pem, j.not_after \
                 FROM joins j JOIN instances i ON i.id = j.instance_id WHERE j.request_id = $1",
            )
            .bind(&attempt.request_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|row| past_join_from_row(&row))
            .transpose()?
        };
        let existing_stack: Option<String> = sqlx::query_scalar("SELECT stack FROM instances WHERE id = $1")
            .bind(&attempt.instance_id)
            .fetch_optional(&mut *tx)
            .await?;
        let decision = enrollment::decide(
            attempt,
            past.as_ref(),
            &token.id,
            token.status(join.now_ms),
            existing_stack.as_deref(),
        )?;
        if let JoinDecision::Replay(_) = decision {
            // Nothing to change: dropping the transaction undoes the claim above.
            return Ok(decision);
        }
        let spent = sqlx::query(
            "UPDATE join_tokens SET uses_left = uses_left - 1 \
             WHERE id = $1 AND uses_left > 0 AND revoked = FALSE AND expires_at > $2",
        )
        .bind(join.token_id)
        .bind(join.now_ms)
        .execute(&mut *tx)
        .await?;
        if spent.rows_affected() != 1 {
            return Err(StoreError::Corrupt(format!(
                "join token {} was active but could not be spent",
                join.token_id
            )));
        }
        let facts = join.facts;
        sqlx::query(
            "INSERT INTO instances (id, stack, hostname, layer, zone, tags, agent_version, joined_at, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(&attempt.instance_id)
        .bind(&attempt.stack)
        .bind(&facts.hostname)
        .bind(&facts.layer)
        .bind(&facts.zone)
        .bind(tags_to_json(&facts.tags))
        .bind(&facts.agent_version)
        .bind(join.now_ms)
        .execute(&mut *tx)
        .await?;
        insert_certificate(&mut tx, &attempt.instance_id, join.certificate).await?;
        if !attempt.request_id.is_empty() {
            sqlx::query(
                "INSERT INTO joins (request_id, public_key_sha256, token_id, instance_id, certificate_pem, not_after, joined_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&attempt.request_id)
            .bind(&attempt.public_key_sha256)
            .bind(join.token_id)
            .bind(&attempt.instance_id)
            .bind(join.certificate_pem)
            .bind(join.certificate.not_after_ms)
            .bind(join.now_ms)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(decision)
    }

    /// Records a renewed certificate. The old one keeps working until it
    /// expires, so a renewal lost on the way back does not lock the agent out.
    /// Fails if the instance was removed meanwhile (the foreign key).
    ///
    /// Call it through [`crate::identity::IssuedCertificates::renew`].
    pub async fn add_certificate(&self, instance_id: &str, certificate: &IssuedCertificate) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_certificate(&mut tx, instance_id, certificate).await?;
        sqlx::query("DELETE FROM certificates WHERE instance_id = $1 AND not_after < $2")
            .bind(instance_id)
            .bind(certificate.issued_at_ms)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn list_certificates(&self) -> Result<Vec<CertificateRecord>, StoreError> {
        let rows = sqlx::query("SELECT fingerprint, instance_id, not_after FROM certificates")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    /// The certificates that identify `instance_id` now.
    pub async fn certificates_of(&self, instance_id: &str) -> Result<Vec<CertificateRecord>, StoreError> {
        let rows = sqlx::query("SELECT fingerprint, instance_id, not_after FROM certificates WHERE instance_id = $1")
            .bind(instance_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(certificate_from_row).collect()
    }

    // ---- instances ----------------------------------------------------

    pub async fn list_instances(&self, stack: Option<&str>) -> Result<Vec<Instance>, StoreError> {
        // Both fragments are constants: nothing from the caller is spliced in.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{INSTANCE_SELECT} WHERE ($1 IS NULL OR i.stack = $1) ORDER BY i.stack, i.zone, i.id"
        )))
        .bind(stack)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(instance_from_row).collect()
    }

    pub async fn get_instance(&self, id: &str) -> Result<Instance, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("{INSTANCE_SELECT} WHERE i.id = $1")))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NoSuchInstance(id.to_owned()))?;
        instance_from_row(&row)
    }

    /// Forgets an instance, every certificate it was issued and its joins.
    ///
    /// Call it through [`crate::identity::IssuedCertificates::remove_instance`].
    pub async fn remove_instance(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM certificates WHERE instance_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let removed = sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if removed.rows_affected() == 0 {
            return Err(StoreError::NoSuchInstance(id.to_owned()));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Stores what the agent said in its hello.
    pub async fn record_hello(
        &self,
        id: &str,
        facts: &InstanceFacts,
        observed: &[ObservedRelease],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        update_facts(&mut tx, id, facts, now_ms).await?;
        let observed = serde_json::to_string(observed).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        sqlx::query("UPDATE instances SET observed = $2 WHERE id = $1")
            .bind(id)
            .bind(observed)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Notes that an instance was heard from.
    pub async fn touch_instance(&self, id: &str, now_ms: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE instances SET last_seen = $2 WHERE id = $1 AND last_seen < $2")
            .bind(id)
            .bind(now_ms)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    // ---- operators ----------------------------------------------------

    /// Creates the operator unless one of that name exists; returns whether it did.
    pub async fn create_operator(&self, name: &str, token_sha256: &str, now_ms: i64) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "INSERT INTO operators (name, token_sha256, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(token_sha256)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() == 1)
    }

    pub async fn operator_by_token(&self, token_sha256: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar("SELECT name FROM operators WHERE token_sha256 = $1")
            .bind(token_sha256)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn list_operators(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT name, token_sha256 FROM operators ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("name")?, row.try_get("token_sha256")?)))
            .collect()
    }

    // ---- releases -----------------------------------------------------

    /// Registers `release` following [`registry::decide`], in one transaction.
    ///
    /// The transaction's first statement writes (claiming the bundle name), so
    /// concurrent registrations queue for the write lock instead of deciding
    /// on what they read before another one committed.
    pub async fn register_release(&self, release: &Release) -> Result<Registration, StoreError> {
        let size = i64::try_from(release.size).map_err(|_| StoreError::Corrupt("release size".into()))?;
        let mut tx = self.pool.begin().await?;
        let created = sqlx::query(
            "INSERT INTO bundles (name, kind, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&release.bundle)
        .bind(release.kind.as_str())
        .bind(release.pushed_at_ms)
        .execute(&mut *tx)
        .await?;
        let registered_kind = if created.rows_affected() == 1 {
            None
        } else {
            let kind: String = sqlx::query_scalar("SELECT kind FROM bundles WHERE name = $1")
                .bind(&release.bundle)
                .fetch_one(&mut *tx)
                .await?;
            Some(parse_kind(&kind)?)
        };
        let registered = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{RELEASE_SELECT} WHERE r.bundle = $1 AND r.version = $2"
        )))
        .bind(&release.bundle)
        .bind(&release.version)
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(release_from_row)
        .transpose()?;
        // A refusal drops the transaction, undoing the bundle claimed above.
        match registry::decide(registered_kind, registered.as_ref(), release)? {
            Decision::AlreadyRegistered => {
                let release = registered.ok_or_else(|| StoreError::Corrupt("no registered release".into()))?;
                Ok(Registration {
                    release,
                    already_registered: true,
                })
            }
            Decision::Insert { .. } => {
                sqlx::query(
                    "INSERT INTO releases (bundle, version, bucket, object_key, object_version, sha256, size, pushed_by, pushed_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&release.bundle)
                .bind(&release.version)
                .bind(&release.bucket)
                .bind(&release.key)
                .bind(release.object_version.as_deref())
                .bind(release.sha256.to_hex())
                .bind(size)
                .bind(&release.pushed_by)
                .bind(release.pushed_at_ms)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(Registration {
                    release: release.clone(),
                    already_registered: false,
                })
            }
        }
    }

    /// Every release, or those of one bundle, by bundle and then push time.
    pub async fn list_releases(&self, bundle: Option<&str>) -> Result<Vec<Release>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{RELEASE_SELECT} WHERE ($1 IS NULL OR r.bundle = $1) ORDER BY r.bundle, r.pushed_at, r.version"
        )))
        .bind(bundle)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(release_from_row).collect()
    }

    pub async fn get_release(&self, bundle: &str, version: &str) -> Result<Release, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{RELEASE_SELECT} WHERE r.bundle = $1 AND r.version = $2"
        )))
        .bind(bundle)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NoSuchRelease {
            bundle: bundle.to_owned(),
            version: version.to_owned(),
        })?;
        release_from_row(&row)
    }

    // ---- audit trail ----------------------------------------------------

    /// Records an audit event, with the stack and instance it concerns derived from its target:
    /// an instance id (the instance and its stack; also once the instance is removed, from its
    /// earlier events), a deployment or join token id (its stack), a stack name, or
    /// `STACK/...` (pins, traffic settings, deployments by release). Other targets (releases)
    /// concern no stack. Derived here, in one place, so no caller can forget it.
    pub async fn record_event(&self, event: &Event) -> Result<(), StoreError> {
        let stack_prefix = event.target.split_once('/').map(|(stack, _)| stack).unwrap_or_default();
        sqlx::query(
            "INSERT INTO events (at, actor, action, target, outcome, detail, stack, instance) VALUES ($1, $2, $3, $4, $5, $6, \
             COALESCE((SELECT stack FROM instances WHERE id = $4), (SELECT stack FROM deployments WHERE id = $4), \
                      (SELECT stack FROM join_tokens WHERE id = $4), (SELECT name FROM stacks WHERE name = $4), \
                      (SELECT name FROM stacks WHERE name = $7), \
                      (SELECT e.stack FROM events e WHERE e.instance = $4 AND e.stack <> '' ORDER BY e.sequence DESC LIMIT 1), \
                      ''), \
             COALESCE((SELECT id FROM instances WHERE id = $4), \
                      (SELECT e.instance FROM events e WHERE e.instance = $4 LIMIT 1), ''))",
        )
        .bind(event.at_ms)
        .bind(&event.actor)
        .bind(&event.action)
        .bind(&event.target)
        .bind(&event.outcome)
        .bind(&event.detail)
        .bind(stack_prefix)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest `filter.limit` events that pass `filter`, oldest first.
    pub async fn list_events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let rows = sqlx::query(
            "SELECT at, actor, action, target, outcome, detail, stack, instance FROM events \
             WHERE ($1 = '' OR stack = $1) AND ($2 = '' OR instance = $2) AND ($3 = '' OR actor = $3) AND at >= $4 \
             ORDER BY sequence DESC LIMIT $5",
        )
        .bind(filter.stack.as_deref().unwrap_or_default())
        .bind(filter.instance.as_deref().unwrap_or_default())
        .bind(filter.actor.as_deref().unwrap_or_default())
        .bind(filter.since_ms.unwrap_or(i64::MIN))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        let mut events = rows
            .iter()
            .map(|row| {
                Ok(Event {
                    at_ms: row.try_get("at")?,
                    actor: row.try_get("actor")?,
                    action: row.try_get("action")?,
                    target: row.try_get("target")?,
                    outcome: row.try_get("outcome")?,
                    detail: row.try_get("detail")?,
                    stack: row.try_get("stack")?,
                    instance: row.try_get("instance")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        events.reverse();
        Ok(events)
    }
}

const INSTANCE_SELECT: &str = "SELECT i.id, i.stack, i.hostname, i.layer, i.zone, i.tags, i.agent_version, \
        i.joined_at, i.last_seen, i.observed, \
        (SELECT MAX(c.not_after) FROM certificates c WHERE c.instance_id = i.id) AS certificate_not_after \
     FROM instances i";

const RELEASE_SELECT: &str = "SELECT r.bundle, b.kind, r.version, r.bucket, r.object_key, r.object_version, \
        r.sha256, r.size, r.pushed_by, r.pushed_at \
     FROM releases r JOIN bundles b ON b.name = r.bundle";

fn parse_kind(kind: &str) -> Result<BundleKind, StoreError> {
    kind.parse()
        .map_err(|error: crate::model::InvalidInput| StoreError::Corrupt(error.to_string()))
}

fn release_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Release, StoreError> {
    let kind: String = row.try_get("kind")?;
    let sha256: String = row.try_get("sha256")?;
    let size: i64 = row.try_get("size")?;
    Ok(Release {
        bundle: row.try_get("bundle")?,
        kind: parse_kind(&kind)?,
        version: row.try_get("version")?,
        bucket: row.try_get("bucket")?,
        key: row.try_get("object_key")?,
        object_version: row.try_get("object_version")?,
        sha256: sha256
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("release sha256 {sha256:?}")))?,
        size: u64::try_from(size).map_err(|_| StoreError::Corrupt("release size".into()))?,
        pushed_by: row.try_get("pushed_by")?,
        pushed_at_ms: row.try_get("pushed_at")?,
    })
}

async fn update_facts(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
    facts: &InstanceFacts,
    now_ms: i64,
) -> Result<(), StoreError> {
    let updated = sqlx::query(
        "UPDATE instances SET hostname = $2, layer = $3, zone = $4, tags = $5, agent_version = $6, \
         last_seen = CASE WHEN last_seen < $7 THEN $7 ELSE last_seen END WHERE id = $1",
    )
    .bind(id)
    .bind(&facts.hostname)
    .bind(&facts.layer)
    .bind(&facts.zone)
    .bind(tags_to_json(&facts.tags))
    .bind(&facts.agent_version)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(StoreError::NoSuchInstance(id.to_owned()));
    }
    Ok(())
}

async fn insert_certificate(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    instance_id: &str,
    certificate: &IssuedCertificate,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO certificates (fingerprint, instance_id, issued_at, not_after) VALUES ($1, $2, $3, $4)")
        .bind(&certificate.fingerprint)
        .bind(instance_id)
        .bind(certificate.issued_at_ms)
        .bind(certificate.not_after_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn tags_to_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).expect("a map of strings always serializes")
}

fn stack_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Stack, StoreError> {
    let stage: String = row.try_get("stage")?;
    let instance_count: i64 = row.try_get("instance_count")?;
    Ok(Stack {
        name: row.try_get("name")?,
        stage: Stage::from_str(&stage).map_err(|error| StoreError::Corrupt(error.to_string()))?,
        created_at_ms: row.try_get("created_at")?,
        instance_count: u32::try_from(instance_count).unwrap_or(u32::MAX),
    })
}

fn certificate_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<CertificateRecord, StoreError> {
    Ok(CertificateRecord {
        fingerprint: row.try_get("fingerprint")?,
        instance_id: row.try_get("instance_id")?,
        not_after_ms: row.try_get("not_after")?,
    })
}

fn past_join_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<PastJoin, StoreError> {
    Ok(PastJoin {
        request_id: row.try_get("request_id")?,
        public_key_sha256: row.try_get("public_key_sha256")?,
        token_id: row.try_get("token_id")?,
        stack: row.try_get("stack")?,
        instance_id: row.try_get("instance_id")?,
        certificate_pem: row.try_get("certificate_pem")?,
        not_after_ms: row.try_get("not_after")?,
    })
}

fn token_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<JoinTokenRecord, StoreError> {
    let uses_total: i64 = row.try_get("uses_total")?;
    let uses_left: i64 = row.try_get("uses_left")?;
    Ok(JoinTokenRecord {
        id: row.try_get("id")?,
        stack: row.try_get("stack")?,
        secret_sha256: row.try_get("secret_sha256")?,
        created_at_ms: row.try_get("created_at")?,
        expires_at_ms: row.try_get("expires_at")?,
        uses_total: u32::try_from(uses_total).map_err(|_| StoreError::Corrupt("uses_total".into()))?,
        uses_left: u32::try_from(uses_left).map_err(|_| StoreError::Corrupt("uses_left".into()))?,
        revoked: row.try_get("revoked")?,
    })
}

fn instance_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Instance, StoreError> {
    let corrupt = |what: &str, error: serde_json::Error| StoreError::Corrupt(format!("{what}: {error}"));
    let tags: String = row.try_get("tags")?;
    let observed: String = row.try_get("observed")?;
    let certificate_not_after: Option<i64> = row.try_get("certificate_not_after")?;
    Ok(Instance {
        id: row.try_get("id")?,
        stack: row.try_get("stack")?,
        facts: InstanceFacts {
            hostname: row.try_get("hostname")?,
            layer: row.try_get("layer")?,
            zone: row.try_get("zone")?,
            tags: serde_json::from_str(&tags).map_err(|error| corrupt("tags", error))?,
            agent_version: row.try_get("agent_version")?,
        },
        joined_at_ms: row.try_get("joined_at")?,
        last_seen_ms: row.try_get("last_seen")?,
        observed: serde_json::from_str(&observed).map_err(|error| corrupt("observed", error))?,
        certificate_not_after_ms: certificate_not_after.unwrap_or(0),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("rollwave.db")).await.expect("open store");
        (dir, store)
    }

    fn mode_of(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn database_files_were_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let database = dir.path().join("rollwave.db");
        let side_files = ["rollwave.db-wal", "rollwave.db-shm"].map(|name| dir.path().join(name));
        {
            let store = Store::open(&database).await.expect("open store");
            store
                .create_stack("web", Stage::Dev, 0)
                .await
                .expect("a write, so the WAL exists");
            for path in std::iter::once(&database).chain(&side_files) {
                assert_eq!(mode_of(path), 0o600, "{}", path.display());
            }
            store.pool.close().await;
        }
        // Files an earlier version left readable by everyone (side files included, as a crash
        // leaves them) are tightened at the next start.
        for path in std::iter::once(&database).chain(&side_files) {
            if !path.exists() {
                std::fs::File::create(path).expect("leftover side file");
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let store = Store::open(&database).await.expect("reopen store");
        store.create_stack("api", Stage::Dev, 0).await.expect("write");
        for path in std::iter::once(&database).chain(&side_files) {
            assert_eq!(mode_of(path), 0o600, "{} after reopening", path.display());
        }
    }

    /// A store with stack `web`, join token `tok1` (2 uses) and instance `i-1` joined with it.
    async fn open_with_instance() -> (tempfile::TempDir, Store) {
        let (dir, store) = open().await;
        store.create_stack("web", Stage::Dev, 1).await.expect("stack");
        store
            .create_token(&token("web", 2, 1_000), "admin")
            .await
            .expect("token");
        join(&store, "r-1", "key-1", "i-1", "aa", 5).await.expect("join");
        (dir, store)
    }

    #[tokio::test]
    async fn events_are_filtered_by_stack_instance_actor_and_time_in_the_query() {
        let (_dir, store) = open_with_instance().await;
        store.create_stack("batch", Stage::Dev, 1).await.expect("stack");
        let event = |at_ms: i64, actor: &str, action: &str, target: &str| Event {
            at_ms,
            actor: actor.into(),
            action: action.into(),
            target: target.into(),
            outcome: "ok".into(),
            detail: String::new(),
            stack: String::new(),
            instance: String::new(),
        };
        for recorded in [
            event(10, "alice", "stack.create", "web"),
            event(11, "bob", "stack.create", "batch"),
            event(12, "alice", "token.create", "tok1"),
            event(13, "instance:i-1", "instance.join", "i-1"),
            event(14, "bob", "pin", "web/app@1.0"),
            event(15, "bob", "traffic.set", "batch/db"),
            event(16, "alice", "release.register", "app@1.0"),
        ] {
            store.record_event(&recorded).await.expect("record");
        }
        store.remove_instance("i-1").await.expect("remove");
        store
            .record_event(&event(17, "alice", "instance.remove", "i-1"))
            .await
            .expect("record");
        let list = |filter: EventFilter| {
            let store = &store;
            async move {
                let events = store
                    .list_events(&EventFilter { limit: 100, ..filter })
                    .await
                    .expect("list");
                events
                    .iter()
                    .map(|event| format!("{} {} {}", event.at_ms, event.action, event.target))
                    .collect::<Vec<_>>()
            }
        };
        let some = |text: &str| Some(text.to_owned());
        assert_eq!(
            list(EventFilter {
                stack: some("web"),
                ..EventFilter::default()
            })
            .await,
            [
                "10 stack.create web",
                "12 token.create tok1",
                "13 instance.join i-1",
                "14 pin web/app@1.0",
                "17 instance.remove i-1"
            ]
        );
        assert_eq!(
            list(EventFilter {
                instance: some("i-1"),
                ..EventFilter::default()
            })
            .await,
            ["13 instance.join i-1", "17 instance.remove i-1"]
        );
        assert_eq!(
            list(EventFilter {
                actor: some("bob"),
                since_ms: Some(12),
                ..EventFilter::default()
            })
            .await,
            ["14 pin web/app@1.0", "15 traffic.set batch/db"]
        );
        let newest = store
            .list_events(&EventFilter {
                limit: 2,
                ..EventFilter::default()
            })
            .await
            .expect("list");
        assert_eq!(newest.iter().map(|event| event.at_ms).collect::<Vec<_>>(), [16, 17]);
        assert_eq!((newest[0].stack.as_str(), newest[0].instance.as_str()), ("", ""));
        assert_eq!((newest[1].stack.as_str(), newest[1].instance.as_str()), ("web", "i-1"));
    }

    fn token(stack: &str, uses: u32, expires_at_ms: i64) -> JoinTokenRecord {
        JoinTokenRecord {
            id: "tok1".into(),
            stack: stack.into(),
            secret_sha256: "hash".into(),
            created_at_ms: 0,
            expires_at_ms,
            uses_total: uses,
            uses_left: uses,
            revoked: false,
        }
    }

    fn certificate(fingerprint: &str) -> IssuedCertificate {
        IssuedCertificate {
            fingerprint: fingerprint.into(),
            issued_at_ms: 10,
            not_after_ms: 1_000,
        }
    }

    /// Joins `instance_id` with token `tok1` as the joiner (`request_id`, `key`).
    pub(crate) async fn join(
        store: &Store,
        request_id: &str,
        key: &str,
        instance_id: &str,
        fingerprint: &str,
        now_ms: i64,
    ) -> Result<JoinDecision, StoreError> {
        let attempt = JoinAttempt {
            request_id: request_id.into(),
            public_key_sha256: key.into(),
            stack: "web".into(),
            instance_id: instance_id.into(),
        };
        store
            .join_instance(&NewJoin {
                attempt: &attempt,
                token_id: "tok1",
                facts: &InstanceFacts::default(),
                certificate: &certificate(fingerprint),
                certificate_pem: &format!("PEM {fingerprint}"),
                now_ms,
            })
            .await
    }

    pub(crate) async fn open_with_token(uses: u32) -> (tempfile::TempDir, Store) {
        let (dir, store) = open().await;
        store.create_stack("web", Stage::Dev, 1).await.expect("stack");
        store
            .create_token(&token("web", uses, 1_000), "admin")
            .await
            .expect("token");
        (dir, store)
    }

    #[tokio::test]
    async fn a_single_use_token_joins_once() {
        let (_dir, store) = open_with_token(1).await;
        join(&store, "r1", "k1", "i-1", "aa", 5).await.expect("first join");
        let second = join(&store, "r2", "k2", "i-2", "bb", 5).await;
        assert!(
            matches!(
                second,
                Err(StoreError::JoinRefused(JoinRefused::Token {
                    status: crate::model::TokenStatus::Used,
                    ..
                }))
            ),
            "{second:?}"
        );
        let instances = store.list_instances(None).await.expect("list");
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].id, "i-1");
        // The failed join left no certificate behind.
        assert_eq!(store.list_certificates().await.expect("certs").len(), 1);
    }

    #[tokio::test]
    async fn a_join_whose_reply_was_lost_is_answered_again_without_spending_the_token() {
        let (_dir, store) = open_with_token(1).await;
        let first = join(&store, "r1", "k1", "i-1", "aa", 5).await.expect("first join");
        assert_eq!(first, JoinDecision::Create);
        // The agent never saw the answer and asks again: same request id and key,
        // a fresh random instance id and certificate that must not be used.
        let again = join(&store, "r1", "k1", "i-other", "bb", 6).await.expect("repeat");
        let JoinDecision::Replay(past) = again else {
            panic!("expected a replay, got {again:?}")
        };
        assert_eq!(
            (past.instance_id.as_str(), past.certificate_pem.as_str()),
            ("i-1", "PEM aa")
        );
        let fingerprints: Vec<String> = store
            .list_certificates()
            .await
            .expect("certs")
            .into_iter()
            .map(|record| record.fingerprint)
            .collect();
        assert_eq!(fingerprints, ["aa"], "the repeat recorded nothing");
        assert_eq!(store.list_instances(None).await.expect("list").len(), 1);
        // Another joiner with the spent token is refused as before.
        let other = join(&store, "r2", "k2", "i-2", "cc", 7).await;
        assert!(
            matches!(other, Err(StoreError::JoinRefused(JoinRefused::Token { .. }))),
            "{other:?}"
        );
        // The request id with another key belongs to someone else.
        let thief = join(&store, "r1", "k-thief", "i-3", "dd", 8).await;
        assert!(
            matches!(thief, Err(StoreError::JoinRefused(JoinRefused::RequestIdReused { .. }))),
            "{thief:?}"
        );
    }

    #[tokio::test]
    async fn racing_repeats_of_one_join_all_get_its_answer() {
        let (_dir, store) = open_with_token(1).await;
        let (first, second, third) = tokio::join!(
            join(&store, "r1", "k1", "i-a", "aa", 5),
            join(&store, "r1", "k1", "i-b", "bb", 5),
            join(&store, "r1", "k1", "i-c", "cc", 5),
        );
        let outcomes = [first, second, third].map(|outcome| outcome.expect("every repeat is answered"));
        let created = outcomes
            .iter()
            .filter(|outcome| **outcome == JoinDecision::Create)
            .count();
        assert_eq!(created, 1, "{outcomes:?}");
        assert_eq!(store.list_instances(None).await.expect("list").len(), 1);
    }

    #[tokio::test]
    async fn a_join_for_an_existing_instance_is_refused_and_changes_nothing() {
        let (_dir, store) = open_with_token(2).await;
        join(&store, "r1", "k1", "i-1", "aa", 5).await.expect("first join");
        let hijack = join(&store, "r2", "k2", "i-1", "bb", 6).await;
        assert!(
            matches!(hijack, Err(StoreError::JoinRefused(JoinRefused::InstanceExists { .. }))),
            "{hijack:?}"
        );
        let certificates = store.list_certificates().await.expect("certs");
        assert_eq!(certificates.len(), 1);
        assert_eq!(certificates[0].fingerprint, "aa", "the holder keeps its certificate");
        assert_eq!(
            store.get_token("tok1").await.expect("token").uses_left,
            1,
            "no use spent"
        );
        // Once the operator removed it, the instance id can join again.
        store.remove_instance("i-1").await.expect("remove");
        join(&store, "r2", "k2", "i-1", "bb", 7)
            .await
            .expect("join after removal");
    }

    #[tokio::test]
    async fn an_expired_token_does_not_join() {
        let (_dir, store) = open().await;
        store.create_stack("web", Stage::Dev, 1).await.expect("stack");
        store.create_token(&token("web", 1, 100), "admin").await.expect("token");
        let result = join(&store, "r1", "k1", "i-1", "aa", 100).await;
        assert!(
            matches!(
                result,
                Err(StoreError::JoinRefused(JoinRefused::Token {
                    status: crate::model::TokenStatus::Expired,
                    ..
                }))
            ),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn removing_an_instance_removes_its_certificates() {
        let (_dir, store) = open_with_token(2).await;
        join(&store, "r1", "k1", "i-1", "aa", 5).await.expect("join");
        store.remove_instance("i-1").await.expect("remove");
        assert!(store.list_certificates().await.expect("certs").is_empty());
        assert!(matches!(
            store.remove_instance("i-1").await,
            Err(StoreError::NoSuchInstance(_))
        ));
    }

    fn release(bundle: &str, kind: BundleKind, version: &str, content: &[u8]) -> Release {
        Release {
            bundle: bundle.into(),
            kind,
            version: version.into(),
            bucket: "releases".into(),
            key: format!("releases/{bundle}/{version}.zip"),
            object_version: Some("v1".into()),
            sha256: rollwave_release::Sha256::of(content),
            size: content.len() as u64,
            pushed_by: "admin".into(),
            pushed_at_ms: 10,
        }
    }

    #[tokio::test]
    async fn releases_register_once_and_refuse_changes() {
        let (_dir, store) = open().await;
        let first = release("web", BundleKind::App, "1.0", b"one");
        let registered = store.register_release(&first).await.expect("register");
        assert_eq!(
            registered,
            Registration {
                release: first.clone(),
                already_registered: false
            }
        );

        // Again, from another operator and upload: the first record stands.
        let again = Release {
            pushed_by: "someone-else".into(),
            object_version: Some("v2".into()),
            pushed_at_ms: 20,
            ..first.clone()
        };
        let repeat = store.register_release(&again).await.expect("repeat");
        assert!(repeat.already_registered);
        assert_eq!(repeat.release, first);

        let changed = store
            .register_release(&release("web", BundleKind::App, "1.0", b"two"))
            .await;
        assert!(
            matches!(
                changed,
                Err(StoreError::RegistrationRefused(
                    RegistrationRefused::ChangeContent { .. }
                ))
            ),
            "{changed:?}"
        );
        let cookbook = store
            .register_release(&release("web", BundleKind::Cookbook, "2.0", b"three"))
            .await;
        assert!(
            matches!(
                cookbook,
                Err(StoreError::RegistrationRefused(RegistrationRefused::ChangeKind { .. }))
            ),
            "{cookbook:?}"
        );

        let unversioned = Release {
            object_version: None,
            ..release("chef", BundleKind::Cookbook, "7", b"four")
        };
        store.register_release(&unversioned).await.expect("second bundle");
        assert_eq!(
            store.get_release("chef", "7").await.expect("get"),
            unversioned,
            "an unversioned release reads back without an object version"
        );
        let all = store.list_releases(None).await.expect("list");
        assert_eq!(all.iter().map(Release::name).collect::<Vec<_>>(), ["chef@7", "web@1.0"]);
        let web = store.list_releases(Some("web")).await.expect("list web");
        assert_eq!(web, [first]);
        assert!(matches!(
            store.get_release("web", "2.0").await,
            Err(StoreError::NoSuchRelease { .. })
        ));
    }

    #[tokio::test]
    async fn racing_registrations_of_one_version_let_exactly_one_win() {
        let (_dir, store) = open().await;
        let (one, other) = (
            release("api", BundleKind::App, "1", b"a"),
            release("api", BundleKind::App, "1", b"b"),
        );
        let (first, second) = tokio::join!(store.register_release(&one), store.register_release(&other));
        assert!(
            first.is_ok() != second.is_ok(),
            "exactly one wins: {first:?} {second:?}"
        );
        assert_eq!(store.list_releases(Some("api")).await.expect("list").len(), 1);
    }

    #[tokio::test]
    async fn duplicate_stack_is_refused_and_data_survives_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("rollwave.db");
        {
            let store = Store::open(&path).await.expect("open");
            store.create_stack("web", Stage::Production, 1).await.expect("stack");
            let again = store.create_stack("web", Stage::Dev, 2).await;
            assert!(matches!(again, Err(StoreError::StackExists(_))), "{again:?}");
        }
        let reopened = Store::open(&path).await.expect("reopen runs migrations idempotently");
        let stack = reopened.get_stack("web").await.expect("stack kept");
        assert_eq!(stack.stage, Stage::Production);
    }
}
