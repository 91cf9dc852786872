//! Carries out installs: runs the steps the pure state machine in
//! [`crate::install`] chooses, journaling each state before acting on it,
//! and resumes (or cleanly rolls back) an install a killed agent left
//! behind. Used by the agent and by `rollwave-agent install|rollback`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rollwave_artifacts::{DownloadOptions, download_verified};
use rollwave_release::{LifecycleEvent, Limits, Manifest, ManifestTexts, unpack};

use crate::health;
use crate::hooks::{HookRun, kill_leftover_group, run_hook_with};
use crate::install::{Goal, Job, JobState, Rollback, Stage};
use crate::journal::{ActiveInstall, BundleJournal, JournalError, Source};
use crate::layout::{CurrentLink, Layout, sync_dir};
use crate::service::{Services, Supervision};

/// Releases kept on disk per bundle unless configured otherwise.
pub const DEFAULT_RETENTION: usize = 5;

/// Largest manifest file read from a release (they are a few hundred bytes).
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallRequest {
    pub bundle: String,
    pub version: String,
    /// Lowercase hex.
    pub sha256: String,
    pub source: Source,
    pub goal: Goal,
    pub run_hooks: bool,
    pub ignore_stop_failure: bool,
    pub deployment_id: Option<String>,
    /// A rollback to a release that was current before (recorded as such in the history).
    pub rollback: bool,
}

/// How installs behave on this instance.
#[derive(Debug, Clone)]
pub struct InstallSettings {
    /// Releases kept per bundle (at least 2: current and the rollback target).
    pub retention: usize,
    /// How long a new release may take to pass its health checks.
    pub health_deadline: Duration,
    pub limits: Limits,
    pub download: DownloadOptions,
}

impl Default for InstallSettings {
    fn default() -> Self {
        Self {
            retention: DEFAULT_RETENTION,
            health_deadline: Duration::from_secs(60),
            limits: Limits::default(),
            download: DownloadOptions::default(),
        }
    }
}

/// How an install ended when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The release was already current (or already prepared, for a prepare): nothing done.
    Unchanged,
    /// The release is prepared on disk, ready to activate.
    Prepared,
    /// The release is current.
    Activated { previous: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The request itself is wrong; nothing was touched.
    #[error("{0}")]
    Refused(String),
    /// A step failed; `current` is where the rollback left it.
    #[error("{}", describe_failure(.failure, .rollback, .previous))]
    Failed {
        failure: String,
        rollback: Option<Rollback>,
        /// The release that was current before (`None` on a first install).
        previous: Option<String>,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn describe_failure(failure: &str, rollback: &Option<Rollback>, previous: &Option<String>) -> String {
    match (rollback, previous) {
        (None, _) => format!("{failure}; current release untouched"),
        (Some(Rollback::Restored), Some(previous)) => format!("{failure}; switched back to {previous}"),
        (Some(Rollback::Restored), None) => format!("{failure}; removed again (it was the first release)"),
        (Some(Rollback::Broken(detail)), _) => format!("{failure}; switching back failed too: {detail}"),
    }
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

/// Damage the installer found and repaired on its own (a journal moved aside and
/// rebuilt, a broken `current`), for the coordinator's audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub bundle: String,
    pub message: String,
}

/// Installs releases under one state dir. The caller holds the state dir lock.
#[derive(Debug, Clone)]
pub struct Installer {
    layout: Layout,
    settings: InstallSettings,
    s3: Option<aws_sdk_s3::Client>,
    services: Services,
    repairs: Option<tokio::sync::mpsc::UnboundedSender<Repair>>,
}

impl Installer {
    pub fn new(layout: Layout, settings: InstallSettings, s3: Option<aws_sdk_s3::Client>) -> Self {
        let services = Services::new(layout.clone(), Supervision::detect());
        Self {
            layout,
            settings,
            s3,
            services,
            repairs: None,
        }
    }

    /// Sends every [`Repair`] to `repairs` as well as to the log.
    pub fn with_repairs(mut self, repairs: tokio::sync::mpsc::UnboundedSender<Repair>) -> Self {
        self.repairs = Some(repairs);
        self
    }

    fn report_repair(&self, bundle: &str, message: String) {
        tracing::error!(%bundle, "{message}");
        if let Some(repairs) = &self.repairs {
            let _ = repairs.send(Repair {
                bundle: bundle.to_owned(),
                message,
            });
        }
    }

    /// The journal of `bundle`; an unreadable one is moved aside, rebuilt and reported.
    fn load_journal(&self, bundle: &str) -> Result<BundleJournal, InstallError> {
        let (journal, quarantined) = BundleJournal::load_or_rebuild(&self.layout, bundle)?;
        if let Some(quarantined) = quarantined {
            self.report_repair(bundle, quarantined.describe());
        }
        Ok(journal)
    }

    /// Reports a damaged `current` of `bundle`: it counts as no release, and the
    /// install's switch replaces it.
    fn check_current(&self, bundle: &str) -> Result<(), InstallError> {
        let link = self
            .layout
            .inspect_current(bundle)
            .map_err(io_error(format!("read the current release of {bundle}")))?;
        if let CurrentLink::Damaged(what) = link {
            self.report_repair(
                bundle,
                format!("{what}; it counts as no current release, and this install's switch replaces it"),
            );
        }
        Ok(())
    }

    /// The apps this installer starts and stops.
    pub fn services(&self) -> &Services {
        &self.services
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Finishes (or rolls back) installs that a killed agent left running, for every bundle.
    pub async fn recover_all(&self) -> Result<(), InstallError> {
        for bundle in BundleJournal::bundles(&self.layout)? {
            if let Err(error) = self.recover(&bundle).await {
                tracing::warn!(%bundle, %error, "the interrupted install did not complete");
            }
        }
        Ok(())
    }

    /// Finishes (or rolls back) the install of `bundle` a killed agent left
    /// running; `Ok(None)` if there was none.
    pub async fn recover(&self, bundle: &str) -> Result<Option<InstallOutcome>, InstallError> {
        let mut journal = self.load_journal(bundle)?;
        let Some(active) = journal.install.as_mut() else {
            return Ok(None);
        };
        if !matches!(active.state, JobState::Running { .. }) {
            return Ok(None);
        }
        if let Some(group) = active.hook_group.take() {
            kill_leftover_group(group);
        }
        active.state = active.job.on_restart(&active.state);
        tracing::warn!(%bundle, version = %active.job.version, state = ?active.state, "resuming an interrupted install");
        journal.save(&self.layout, bundle)?;
        self.layout
            .clean_staging(bundle)
            .map_err(io_error(format!("clean staging of {bundle}")))?;
        self.drive(journal).await.map(Some)
    }

    /// Installs (prepares, or prepares and activates) one release.
    pub async fn install(&self, request: InstallRequest) -> Result<InstallOutcome, InstallError> {
        rollwave_release::validate_bundle_name(&request.bundle)
            .map_err(|error| InstallError::Refused(error.to_string()))?;
        rollwave_release::validate_version(&request.version)
            .map_err(|error| InstallError::Refused(error.to_string()))?;
        let sha256 = request.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(InstallError::Refused(format!(
                "invalid sha256 {:?}: expected 64 hexadecimal digits",
                request.sha256
            )));
        }
        let bundle = request.bundle.as_str();
        // An install a crash interrupted comes first, so the disk is consistent again.
        self.recover(bundle).await?;
        self.layout
            .clean_staging(bundle)
            .map_err(io_error(format!("clean staging of {bundle}")))?;

        let mut journal = self.load_journal(bundle)?;
        self.check_current(bundle)?;
        let current = self
            .layout
            .current_version(bundle)
            .map_err(io_error(format!("read the current release of {bundle}")))?;
        let on_disk = self.layout.release_dir(bundle, &request.version).is_dir();
        let already_prepared = match journal.prepared.get(&request.version) {
            Some(known) if *known != sha256 => {
                return Err(InstallError::Refused(format!(
                    "{bundle}@{} is already installed with sha256 {known}, not {sha256}; versions are immutable, \
                     so push the new content as a new version",
                    request.version
                )));
            }
            Some(_) => on_disk,
            None if on_disk && journal.current_is_unverified(&request.version) => {
                // Its journal was rebuilt, and the sha256 went with the damaged file. The
                // directory was unpacked only after its archive was verified, and a version
                // names one archive, so the requested sha256 is taken as its content.
                journal.adopt_current(&request.version, &sha256);
                journal.save(&self.layout, bundle)?;
                self.report_repair(
                    bundle,
                    format!(
                        "{bundle}@{} is current; its sha256 was lost with the journal, so it is taken to be \
                         {sha256} as requested (not verified again)",
                        request.version
                    ),
                );
                true
            }
            None if on_disk && current.as_deref() == Some(request.version.as_str()) => {
                return Err(InstallError::Refused(format!(
                    "{bundle}@{} is current but not in the journal, so its content cannot be checked; \
                     install it under a new version",
                    request.version
                )));
            }
            None => false,
        };
        let is_current = current.as_deref() == Some(request.version.as_str());
        if already_prepared && (is_current || request.goal == Goal::Prepare) {
            return Ok(InstallOutcome::Unchanged);
        }
        let job = Job {
            bundle: bundle.to_owned(),
            version: request.version.clone(),
            sha256,
            goal: request.goal,
            run_hooks: request.run_hooks,
            ignore_stop_failure: request.ignore_stop_failure,
            previous: current,
            already_prepared,
        };
        let state = job.start();
        journal.install = Some(ActiveInstall {
            job,
            state,
            source: request.source,
            deployment_id: request.deployment_id,
            hook_group: None,
            rollback: request.rollback,
        });
        journal.save(&self.layout, bundle)?;
        self.drive(journal).await
    }

    /// Switches `bundle` back to the release that was current before this one, stepping back through the
    /// history (or to `to`, one that was current before), still on disk (no download), running the usual
    /// activation hooks.
    pub async fn rollback(
        &self,
        bundle: &str,
        run_hooks: bool,
        to: Option<&str>,
    ) -> Result<InstallOutcome, InstallError> {
        rollwave_release::validate_bundle_name(bundle).map_err(|error| InstallError::Refused(error.to_string()))?;
        self.recover(bundle).await?;
        let journal = self.load_journal(bundle)?;
        let current = self
            .layout
            .current_version(bundle)
            .map_err(io_error(format!("read the current release of {bundle}")))?;
        let Some(target) = journal.rollback_target(current.as_deref(), to) else {
            return Err(InstallError::Refused(match to {
                Some(to) => format!(
                    "{bundle}@{to} cannot be rolled back to: it is current, was never current here, or is no \
                     longer on disk (current: {})",
                    current.as_deref().unwrap_or("none")
                ),
                None => format!(
                    "no earlier release of {bundle} is on disk to roll back to (current: {})",
                    current.as_deref().unwrap_or("none")
                ),
            }));
        };
        self.install(InstallRequest {
            bundle: bundle.to_owned(),
            version: target.version.clone(),
            sha256: target.sha256.clone(),
            source: Source::OnDisk,
            goal: Goal::Activate,
            run_hooks,
            ignore_stop_failure: true,
            deployment_id: None,
            rollback: true,
        })
        .await
    }

    /// Runs the journaled install to its end.
    async fn drive(&self, mut journal: BundleJournal) -> Result<InstallOutcome, InstallError> {
        let Some(active) = journal.install.clone() else {
            return Ok(InstallOutcome::Unchanged);
        };
        let job = active.job.clone();
        let mut state = active.state.clone();
        while let JobState::Running { stage, .. } = &state {
            let stage = *stage;
            let started = Instant::now();
            tracing::info!(bundle = %job.bundle, version = %job.version, stage = stage.as_str(), "step");
            let result = self.run_stage(stage, &job, &active, &mut journal).await;
            state = match result {
                Ok(()) => job.on_success(&state),
                Err(error) => {
                    tracing::warn!(bundle = %job.bundle, version = %job.version, stage = stage.as_str(), %error, "step failed");
                    job.on_failure(&state, &error)
                }
            };
            tracing::debug!(stage = stage.as_str(), took = ?started.elapsed(), "step done");
            if prepare_done(&job, &state) {
                journal.prepared.insert(job.version.clone(), job.sha256.clone());
            }
            if let Some(install) = journal.install.as_mut() {
                install.state = state.clone();
                install.hook_group = None;
            }
            journal.save(&self.layout, &job.bundle)?;
        }
        self.finish(&job, &active, &state, &mut journal)?;
        journal.save(&self.layout, &job.bundle)?;
        match state {
            JobState::Succeeded => Ok(match job.goal {
                Goal::Prepare => InstallOutcome::Prepared,
                Goal::Activate => InstallOutcome::Activated {
                    previous: job.previous.clone(),
                },
            }),
            JobState::Failed { failure, rollback, .. } => Err(InstallError::Failed {
                failure,
                rollback,
                previous: job.previous.clone(),
            }),
            JobState::Running { .. } => unreachable!("the loop runs until the job ends"),
        }
    }

    /// Bookkeeping once the job has ended: history, discards, retention, downloads.
    fn finish(
        &self,
        job: &Job,
        active: &ActiveInstall,
        state: &JobState,
        journal: &mut BundleJournal,
    ) -> Result<(), InstallError> {
        let bundle = job.bundle.as_str();
        let source = &active.source;
        match state {
            JobState::Succeeded => {
                if job.goal == Goal::Activate {
                    let now = crate::unix_ms(SystemTime::now());
                    journal.record_activation(&job.version, &job.sha256, now, active.rollback);
                }
                self.remove_download(&job.sha256, true);
                self.apply_retention(bundle, &job.version, journal)?;
            }
            JobState::Failed {
                discard_new_release, ..
            } => {
                let current = self.layout.current_version(bundle).ok().flatten();
                if *discard_new_release && current.as_deref() != Some(job.version.as_str()) {
                    journal.prepared.remove(&job.version);
                    let dir = self.layout.release_dir(bundle, &job.version);
                    if dir.exists() {
                        std::fs::remove_dir_all(&dir).map_err(io_error(format!("remove {}", dir.display())))?;
                    }
                }
                // A download that gave up half-way is kept so the next attempt resumes it.
                self.remove_download(&job.sha256, !matches!(source, Source::S3 { .. }));
                let _ = self.layout.clean_staging(bundle);
            }
            JobState::Running { .. } => {}
        }
        Ok(())
    }

    fn remove_download(&self, sha256: &str, partial_too: bool) {
        let _ = std::fs::remove_file(self.layout.complete_download(sha256));
        if partial_too {
            let _ = std::fs::remove_file(self.layout.partial_download(sha256));
        }
    }

    /// Keeps the newest `retention` releases of `bundle` (by last activation;
    /// never-activated ones count as oldest), never removing `current`, the
    /// rollback target or `keep`; removes release dirs no journal entry owns.
    fn apply_retention(&self, bundle: &str, keep: &str, journal: &mut BundleJournal) -> Result<(), InstallError> {
        let current = self
            .layout
            .current_version(bundle)
            .map_err(io_error(format!("read the current release of {bundle}")))?;
        let mut protected: BTreeSet<String> = [Some(keep.to_owned()), current.clone()].into_iter().flatten().collect();
        if let Some(target) = journal.rollback_target(current.as_deref(), None) {
            protected.insert(target.version.clone());
        }
        let on_disk = self
            .layout
            .versions_on_disk(bundle)
            .map_err(io_error(format!("list releases of {bundle}")))?;
        let mut last_active: BTreeMap<&str, usize> = BTreeMap::new();
        for (index, activation) in journal.history.iter().enumerate() {
            last_active.insert(activation.version.as_str(), index + 1);
        }
        let mut ranked: Vec<(usize, String)> = on_disk
            .iter()
            .map(|version| (last_active.get(version.as_str()).copied().unwrap_or(0), version.clone()))
            .collect();
        ranked.sort();
        let retention = self.settings.retention.max(2);
        let mut excess = ranked.len().saturating_sub(retention);
        let mut remove = Vec::new();
        for (_, version) in &ranked {
            let owned = journal.prepared.contains_key(version);
            if protected.contains(version) {
                continue;
            }
            if !owned || excess > 0 {
                remove.push(version.clone());
                excess = excess.saturating_sub(1);
            }
        }
        for version in remove {
            let dir = self.layout.release_dir(bundle, &version);
            tracing::info!(%bundle, %version, "removing an old release (retention)");
            std::fs::remove_dir_all(&dir).map_err(io_error(format!("remove {}", dir.display())))?;
            journal.prepared.remove(&version);
        }
        journal
            .prepared
            .retain(|version, _| self.layout.release_dir(bundle, version).is_dir());
        Ok(())
    }

    /// Carries out one step; `Err` carries the reason for the report.
    async fn run_stage(
        &self,
        stage: Stage,
        job: &Job,
        active: &ActiveInstall,
        journal: &mut BundleJournal,
    ) -> Result<(), String> {
        let bundle = job.bundle.as_str();
        let new_dir = self.layout.release_dir(bundle, &job.version);
        match stage {
            Stage::Fetch => self.fetch(job, &active.source).await,
            Stage::Unpack => self.unpack(job).await,
            Stage::BeforeInstall => {
                self.run_event(LifecycleEvent::BeforeInstall, job, &job.version, active, journal)
                    .await
            }
            Stage::AfterInstall => {
                self.run_event(LifecycleEvent::AfterInstall, job, &job.version, active, journal)
                    .await
            }
            Stage::ApplicationStop => {
                let previous = job.previous.as_deref().ok_or("no previous release")?;
                self.run_event(LifecycleEvent::ApplicationStop, job, previous, active, journal)
                    .await?;
                self.services.stop(bundle).await
            }
            Stage::Switch => self
                .layout
                .switch_current(bundle, &job.version)
                .map_err(|error| format!("switch current to {}: {error}", job.version)),
            Stage::ApplicationStart => {
                self.start_service(bundle, &job.version).await?;
                self.run_event(LifecycleEvent::ApplicationStart, job, &job.version, active, journal)
                    .await
            }
            Stage::ValidateService => {
                self.run_event(LifecycleEvent::ValidateService, job, &job.version, active, journal)
                    .await
            }
            Stage::Health => {
                let manifest = read_manifest(&new_dir)?;
                health::wait_healthy(
                    &manifest.health,
                    &new_dir,
                    &self.layout.hook_log_dir().join(bundle),
                    self.settings.health_deadline,
                )
                .await
            }
            Stage::SwitchBack => {
                // The new release's app goes; the previous release's (if it still runs) stays.
                if self
                    .services
                    .load(bundle)
                    .is_some_and(|record| record.version == job.version)
                {
                    self.services.stop(bundle).await?;
                }
                self.switch_back(job)
            }
            Stage::RestartPrevious => {
                let previous = job.previous.as_deref().ok_or("no previous release")?;
                self.start_service(bundle, previous).await?;
                self.run_event(LifecycleEvent::ApplicationStart, job, previous, active, journal)
                    .await
            }
        }
    }

    /// Starts `version`'s app when its manifest has a `[service]`.
    async fn start_service(&self, bundle: &str, version: &str) -> Result<(), String> {
        let manifest = read_manifest(&self.layout.release_dir(bundle, version))?;
        match &manifest.service {
            Some(service) => self.services.start(bundle, version, service).await,
            None => Ok(()),
        }
    }

    fn switch_back(&self, job: &Job) -> Result<(), String> {
        let bundle = job.bundle.as_str();
        match &job.previous {
            Some(previous) => self
                .layout
                .switch_current(bundle, previous)
                .map_err(|error| format!("switch current back to {previous}: {error}")),
            None => self
                .layout
                .remove_current(bundle)
                .map_err(|error| format!("remove current: {error}")),
        }
    }

    /// Puts the verified archive at `downloads/<sha256>.zip`.
    async fn fetch(&self, job: &Job, source: &Source) -> Result<(), String> {
        let complete = self.layout.complete_download(&job.sha256);
        let partial = self.layout.partial_download(&job.sha256);
        std::fs::create_dir_all(self.layout.downloads_dir())
            .map_err(|error| format!("create downloads dir: {error}"))?;
        if complete.exists() {
            // Left by an earlier run; it was verified then, verify again before trusting it.
            let (digest, _) = rollwave_release::hash_file(&complete).map_err(|error| error.to_string())?;
            if digest.to_hex() == job.sha256 {
                return Ok(());
            }
            let _ = std::fs::remove_file(&complete);
        }
        match source {
            Source::Local { path } => {
                let (path, complete, partial, sha256) = (path.clone(), complete.clone(), partial, job.sha256.clone());
                tokio::task::spawn_blocking(move || copy_verified(&path, &partial, &complete, &sha256))
                    .await
                    .map_err(|error| format!("copy task: {error}"))?
            }
            Source::S3 { .. } => {
                let object = source.pinned(&job.sha256).ok_or("not an S3 source")?;
                let client = self.s3.as_ref().ok_or("no S3 client configured on this agent")?;
                download_verified(client, &object, &partial, &complete, &self.settings.download)
                    .await
                    .map_err(|error| error.to_string())
            }
            Source::OnDisk => Err(format!("{}@{} is not on disk", job.bundle, job.version)),
        }?;
        sync_dir(&self.layout.downloads_dir()).map_err(|error| format!("sync downloads dir: {error}"))
    }

    /// Unpacks the verified archive into staging, checks its manifest, and
    /// renames it into place.
    async fn unpack(&self, job: &Job) -> Result<(), String> {
        let bundle_dir = self.layout.bundle_dir(&job.bundle);
        std::fs::create_dir_all(&bundle_dir).map_err(|error| format!("create {}: {error}", bundle_dir.display()))?;
        let release_dir = self.layout.release_dir(&job.bundle, &job.version);
        if release_dir.exists() {
            // A crash after the rename but before the journal said so: redo it from scratch.
            std::fs::remove_dir_all(&release_dir)
                .map_err(|error| format!("remove {}: {error}", release_dir.display()))?;
        }
        let archive = self.layout.complete_download(&job.sha256);
        let staging = self.layout.staging_dir(&job.bundle, &job.version);
        let limits = self.settings.limits;
        let (staging_for_task, release_for_task) = (staging.clone(), release_dir.clone());
        let outcome = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let report = unpack(&archive, &staging_for_task, limits).map_err(|error| error.to_string())?;
            tracing::debug!(entries = report.entries, bytes = report.bytes_written, "unpacked");
            read_manifest(&staging_for_task)?;
            std::fs::rename(&staging_for_task, &release_for_task)
                .map_err(|error| format!("rename staging into {}: {error}", release_for_task.display()))?;
            Ok(())
        })
        .await
        .map_err(|error| format!("unpack task: {error}"))?;
        if let Err(error) = outcome {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(error);
        }
        sync_dir(&bundle_dir).map_err(|error| format!("sync {}: {error}", bundle_dir.display()))
    }

    /// Runs the hooks `version`'s manifest has for `event`, in order.
    async fn run_event(
        &self,
        event: LifecycleEvent,
        job: &Job,
        version: &str,
        active: &ActiveInstall,
        journal: &mut BundleJournal,
    ) -> Result<(), String> {
        let release_dir = self.layout.release_dir(&job.bundle, version);
        let manifest = read_manifest(&release_dir)?;
        let env = vec![
            ("ROLLWAVE_BUNDLE".to_owned(), job.bundle.clone()),
            ("ROLLWAVE_VERSION".to_owned(), job.version.clone()),
            (
                "ROLLWAVE_PREVIOUS_VERSION".to_owned(),
                job.previous.clone().unwrap_or_default(),
            ),
            ("ROLLWAVE_RELEASE_DIR".to_owned(), release_dir.display().to_string()),
            ("ROLLWAVE_LIFECYCLE_EVENT".to_owned(), event.manifest_key().to_owned()),
            (
                "ROLLWAVE_DEPLOYMENT_ID".to_owned(),
                active.deployment_id.clone().unwrap_or_default(),
            ),
        ];
        for (index, hook) in manifest.hooks_for(event).iter().enumerate() {
            let run = HookRun {
                script: release_dir.join(&hook.path),
                args: Vec::new(),
                working_dir: release_dir.clone(),
                timeout: hook.timeout,
                run_as: hook.run_as.clone(),
                env: env.clone(),
                log: self
                    .layout
                    .hook_log_dir()
                    .join(&job.bundle)
                    .join(format!("{version}-{event}-{index}.log")),
            };
            let layout = &self.layout;
            let bundle = job.bundle.as_str();
            let outcome = run_hook_with(&run, |group| {
                // Journal the group so a restarted agent can kill what this one leaves behind.
                if let Some(install) = journal.install.as_mut() {
                    install.hook_group = Some(group);
                }
                if let Err(error) = journal.save(layout, bundle) {
                    tracing::warn!(%error, "cannot journal the hook's process group");
                }
            })
            .await
            .map_err(|error| error.to_string())?;
            tracing::info!(bundle = %job.bundle, %version, %event, hook = %hook.path, result = %outcome.summary(), "hook ran");
            if !outcome.succeeded() {
                return Err(format!("{} {}", hook.path, outcome.summary()));
            }
        }
        Ok(())
    }
}

/// Whether the prepare phase has just completed (the next state is past it).
fn prepare_done(job: &Job, state: &JobState) -> bool {
    if job.already_prepared {
        return false;
    }
    match state {
        JobState::Succeeded => true,
        JobState::Running { stage, failure: None } => matches!(
            stage,
            Stage::ApplicationStop | Stage::Switch | Stage::ApplicationStart | Stage::ValidateService | Stage::Health
        ),
        _ => false,
    }
}

/// Copies a local archive into the downloads dir, hashing in the same pass;
/// the copy appears under its final name only when the sha256 matches.
fn copy_verified(source: &Path, partial: &Path, complete: &Path, sha256: &str) -> Result<(), String> {
    let mut input = std::fs::File::open(source).map_err(|error| format!("open {}: {error}", source.display()))?;
    let output = std::fs::File::create(partial).map_err(|error| format!("create {}: {error}", partial.display()))?;
    let mut writer = rollwave_release::Sha256Writer::new(std::io::BufWriter::with_capacity(1 << 20, output));
    std::io::copy(&mut input, &mut writer).map_err(|error| format!("copy {}: {error}", source.display()))?;
    let (buffered, digest, _) = writer.finish();
    let file = buffered
        .into_inner()
        .map_err(|error| format!("write {}: {}", partial.display(), error.error()))?;
    if digest.to_hex() != sha256 {
        let _ = std::fs::remove_file(partial);
        return Err(format!(
            "{}: sha256 mismatch (expected {sha256}, got {}); refusing to unpack it",
            source.display(),
            digest.to_hex()
        ));
    }
    file.sync_all()
        .map_err(|error| format!("sync {}: {error}", partial.display()))?;
    std::fs::rename(partial, complete).map_err(|error| format!("rename {}: {error}", partial.display()))
}

/// Reads and validates the manifest of an unpacked release.
pub fn read_manifest(release_dir: &Path) -> Result<Manifest, String> {
    let mut texts: BTreeMap<&str, String> = BTreeMap::new();
    for name in ["rollwave.toml", "appspec.yml", "appspec.yaml"] {
        let path = release_dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(metadata) if metadata.is_file() && metadata.len() <= MAX_MANIFEST_BYTES => {
                let text =
                    std::fs::read_to_string(&path).map_err(|error| format!("read {}: {error}", path.display()))?;
                texts.insert(name, text);
            }
            Ok(_) => return Err(format!("{name} must be a regular file of at most 1 MiB")),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(format!("read {}: {error}", path.display())),
        }
    }
    let mut manifest_texts = ManifestTexts::default();
    for (name, text) in &texts {
        manifest_texts.offer(name, text);
    }
    let files = regular_files(release_dir).map_err(|error| format!("list {}: {error}", release_dir.display()))?;
    Manifest::from_archive_files(&manifest_texts, &files).map_err(|error| error.to_string())
}

/// Relative `/`-separated paths of the regular files under `root`.
fn regular_files(root: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut files = BTreeSet::new();
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        for entry in std::fs::read_dir(root.join(&relative))? {
            let entry = entry?;
            let path = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                files.insert(path.to_string_lossy().into_owned());
            }
        }
    }
    Ok(files)
}
