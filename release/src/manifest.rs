//! The bundle manifest: which hooks run at each lifecycle event, how health is checked and how
//! the app is run, read from `rollwave.toml` or from the `hooks` of a CodeDeploy `appspec.yml`
//! so teams can bring their existing bundles.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::entry_path::{PathViolation, check_entry_path};

/// The Rollwave manifest, at the archive root.
pub const MANIFEST_FILE: &str = "rollwave.toml";

/// CodeDeploy manifests, read when there is no [`MANIFEST_FILE`].
pub const APPSPEC_FILES: [&str; 2] = ["appspec.yml", "appspec.yaml"];

/// Hook timeout when none is given: CodeDeploy's default of 3600 s.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(3600);

/// Health check timeout when none is given.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest timeout accepted anywhere in a manifest.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Longest `run_as` user name (Linux `LOGIN_NAME_MAX` minus the NUL, rounded to useradd's 32).
const MAX_USER_NAME_LEN: usize = 32;

/// A point in a release's life where hooks run, in lifecycle order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LifecycleEvent {
    /// Prepare phase, in the new release's directory, before anything else.
    BeforeInstall,
    /// Prepare phase, after `before_install`; must not touch the running app.
    AfterInstall,
    /// Activate phase: the running release's stop script, before `current` switches.
    ApplicationStop,
    /// Activate phase: after `current` points at the new release.
    ApplicationStart,
    /// Activate phase: after `application_start`, before the health checks.
    ValidateService,
}

impl LifecycleEvent {
    /// Every event, in lifecycle order.
    pub const ALL: [LifecycleEvent; 5] = [
        Self::BeforeInstall,
        Self::AfterInstall,
        Self::ApplicationStop,
        Self::ApplicationStart,
        Self::ValidateService,
    ];

    /// The key used in `rollwave.toml` (`before_install`).
    pub fn manifest_key(self) -> &'static str {
        match self {
            Self::BeforeInstall => "before_install",
            Self::AfterInstall => "after_install",
            Self::ApplicationStop => "application_stop",
            Self::ApplicationStart => "application_start",
            Self::ValidateService => "validate_service",
        }
    }

    /// The name used in CodeDeploy's `appspec.yml` (`BeforeInstall`).
    pub fn appspec_name(self) -> &'static str {
        match self {
            Self::BeforeInstall => "BeforeInstall",
            Self::AfterInstall => "AfterInstall",
            Self::ApplicationStop => "ApplicationStop",
            Self::ApplicationStart => "ApplicationStart",
            Self::ValidateService => "ValidateService",
        }
    }
}

impl fmt::Display for LifecycleEvent {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.manifest_key())
    }
}

/// One script run at a lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Path of the script inside the bundle: relative, normalised, `/`-separated.
    pub path: String,
    /// After this long the hook's whole process group is killed.
    pub timeout: Duration,
    /// User to run the hook as; `None` runs it as the agent's service user.
    pub run_as: Option<String>,
}

/// A health check run after `validate_service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// An HTTP GET that must answer 2xx.
    Http {
        /// An `http://` URL with a host.
        url: String,
        /// Deadline for one attempt.
        timeout: Duration,
    },
    /// A command that must exit 0: a path inside the bundle (`bin/check`) or a command line.
    Command {
        /// The command line, run from the release directory.
        command: String,
        /// Deadline for one attempt.
        timeout: Duration,
    },
}

impl HealthCheck {
    /// Deadline for one attempt of this check.
    pub fn timeout(&self) -> Duration {
        match self {
            Self::Http { timeout, .. } | Self::Command { timeout, .. } => *timeout,
        }
    }
}

/// How the agent runs the app itself, when the manifest has a `[service]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Program and arguments; a relative program with a `/` is a path inside the release.
    pub command: Vec<String>,
    /// Working directory relative to the release directory (`.` for the release itself).
    pub working_directory: String,
    /// Extra environment variables.
    pub environment: BTreeMap<String, String>,
}

/// Which file a manifest was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestSource {
    /// The bundle has no manifest: no hooks, no health checks.
    None,
    /// `rollwave.toml`.
    RollwaveToml,
    /// A CodeDeploy appspec (`appspec.yml` or `appspec.yaml`).
    AppSpec(&'static str),
}

impl ManifestSource {
    /// The file name, for messages.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::None => "(no manifest)",
            Self::RollwaveToml => MANIFEST_FILE,
            Self::AppSpec(file) => file,
        }
    }
}

/// The validated manifest of a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Where the manifest came from.
    pub source: ManifestSource,
    /// Hooks per event, each list run in order; events without hooks are absent.
    pub hooks: BTreeMap<LifecycleEvent, Vec<Hook>>,
    /// Health checks, all of which must pass.
    pub health: Vec<HealthCheck>,
    /// Present when the agent runs the app itself.
    pub service: Option<Service>,
}

/// The manifest files found at the root of a bundle, as text.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManifestTexts<'a> {
    /// Contents of `rollwave.toml`, if present.
    pub rollwave_toml: Option<&'a str>,
    /// Contents of `appspec.yml`, if present.
    pub appspec_yml: Option<&'a str>,
    /// Contents of `appspec.yaml`, if present.
    pub appspec_yaml: Option<&'a str>,
}

impl<'a> ManifestTexts<'a> {
    /// Records `text` if `path` is one of the manifest files; returns whether it was.
    pub fn offer(&mut self, path: &str, text: &'a str) -> bool {
        let slot = match path {
            MANIFEST_FILE => &mut self.rollwave_toml,
            "appspec.yml" => &mut self.appspec_yml,
            "appspec.yaml" => &mut self.appspec_yaml,
            _ => return false,
        };
        *slot = Some(text);
        true
    }

    /// Whether `path` names a manifest file.
    pub fn is_manifest_path(path: &str) -> bool {
        path == MANIFEST_FILE || APPSPEC_FILES.contains(&path)
    }
}

/// An invalid manifest; every message names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// `rollwave.toml` is not valid TOML or does not have the manifest's shape.
    // The parser's error is part of the message and deliberately not the error's `source()`:
    // printed as a chain (`{:#}`), it would otherwise appear twice.
    #[error("{file}: {error}")]
    ParseToml {
        /// The manifest file.
        file: &'static str,
        /// The parser's description, with the line.
        error: Box<toml::de::Error>,
    },
    /// The appspec is not valid YAML or does not have the appspec's shape.
    #[error("{file}: {error}")]
    ParseAppSpec {
        /// The manifest file.
        file: &'static str,
        /// The parser's description, with the line.
        error: Box<serde_norway::Error>,
    },
    /// Both `appspec.yml` and `appspec.yaml` exist and there is no `rollwave.toml`.
    #[error("bundle has both appspec.yml and appspec.yaml; keep one, or add a rollwave.toml")]
    ChooseAppSpec,
    /// A hook path is not a relative, normalised path inside the bundle.
    #[error(
        "{file}: hook {event} path {path:?} is invalid: {violation}; give the script's path relative to the bundle root, such as hooks/start.sh"
    )]
    ValidateHookPath {
        /// The manifest file.
        file: &'static str,
        /// The event the hook belongs to.
        event: LifecycleEvent,
        /// The rejected path.
        path: String,
        /// The rule it breaks.
        violation: PathViolation,
    },
    /// A hook names a script that is not a regular file in the bundle.
    #[error("{file}: hook {event} script {path:?} is not a regular file in the bundle; add it or fix the path")]
    FindHookScript {
        /// The manifest file.
        file: &'static str,
        /// The event the hook belongs to.
        event: LifecycleEvent,
        /// The missing script.
        path: String,
    },
    /// A `run_as` user name is not a plausible Unix user name.
    #[error(
        "{file}: hook {event} run_as {run_as:?} is not a valid user name (1 to 32 characters from a-z A-Z 0-9 . _ -, not starting with -)"
    )]
    ValidateRunAs {
        /// The manifest file.
        file: &'static str,
        /// The event the hook belongs to.
        event: LifecycleEvent,
        /// The rejected user name.
        run_as: String,
    },
    /// A timeout does not parse, is zero or is longer than 24 h.
    #[error("{file}: {field}: timeout {value:?} is invalid: {reason}")]
    ParseTimeout {
        /// The manifest file.
        file: &'static str,
        /// Where the timeout is (`hooks.before_install[0]`, `health[1]`).
        field: String,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A health check is malformed.
    #[error("{file}: health[{index}]: {reason}")]
    ValidateHealthCheck {
        /// The manifest file.
        file: &'static str,
        /// Position of the check in the manifest, from 0.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The `[service]` section is malformed.
    #[error("{file}: service: {reason}")]
    ValidateService {
        /// The manifest file.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The appspec has a `files` or `permissions` section, which Rollwave does not perform.
    #[error(
        "{file}: the {section:?} section is not supported: Rollwave serves the release in place from releases/<bundle>/<version> through the `current` symlink and does not copy files around; move file placement and permission changes into a hook (before_install or after_install) or into the app itself"
    )]
    RefuseAppSpecSection {
        /// The manifest file.
        file: &'static str,
        /// `files` or `permissions`.
        section: &'static str,
    },
    /// The appspec names a lifecycle event Rollwave does not run.
    #[error(
        "{file}: hook event {event:?} is not supported; Rollwave runs BeforeInstall, AfterInstall, ApplicationStop, ApplicationStart and ValidateService (download, install and traffic steps are done by Rollwave itself)"
    )]
    RefuseAppSpecEvent {
        /// The manifest file.
        file: &'static str,
        /// The unsupported event name.
        event: String,
    },
    /// The appspec targets an operating system other than Linux.
    #[error("{file}: os {os:?} is not supported; Rollwave agents run on linux")]
    RefuseAppSpecOs {
        /// The manifest file.
        file: &'static str,
        /// The declared os.
        os: String,
    },
}

// ---- rollwave.toml shape ------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    #[serde(default)]
    hooks: RawHooks,
    #[serde(default)]
    health: Vec<RawHealthCheck>,
    service: Option<RawService>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHooks {
    before_install: Option<OneOrMany<RawHook>>,
    after_install: Option<OneOrMany<RawHook>>,
    application_stop: Option<OneOrMany<RawHook>>,
    application_start: Option<OneOrMany<RawHook>>,
    validate_service: Option<OneOrMany<RawHook>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    path: String,
    timeout: Option<String>,
    run_as: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    http: Option<String>,
    command: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    command: Vec<String>,
    working_directory: Option<String>,
    #[serde(default)]
    environment: BTreeMap<String, String>,
}

/// A hook given as one table or as an array of tables, run in order.
struct OneOrMany<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a hook table or an array of hook tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let one = T::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(OneOrMany(vec![one]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let many = Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(OneOrMany(many))
            }
        }
        deserializer.deserialize_any(Visitor(std::marker::PhantomData))
    }
}

// ---- appspec.yml shape --------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppSpec {
    #[allow(dead_code)]
    version: Option<serde_norway::Value>,
    os: Option<String>,
    files: Option<serde_norway::Value>,
    permissions: Option<serde_norway::Value>,
    hooks: Option<BTreeMap<String, Option<Vec<RawAppSpecHook>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAppSpecHook {
    location: String,
    timeout: Option<u64>,
    runas: Option<String>,
}

// ---- parsing and validation ---------------------------------------------------------------

impl Manifest {
    /// The manifest of a bundle without `rollwave.toml` or appspec: no hooks, no checks.
    pub fn empty() -> Self {
        Self {
            source: ManifestSource::None,
            hooks: BTreeMap::new(),
            health: Vec::new(),
            service: None,
        }
    }

    /// Hooks for `event`, in the order they run (empty if none).
    pub fn hooks_for(&self, event: LifecycleEvent) -> &[Hook] {
        self.hooks.get(&event).map_or(&[], Vec::as_slice)
    }

    /// Reads the manifest of a bundle from its manifest texts and checks every path it names
    /// against `regular_files`, the regular files in the bundle (archive paths such as
    /// `hooks/start.sh`). `rollwave.toml` wins over an appspec; without either the bundle is
    /// valid with no hooks.
    pub fn from_archive_files(
        texts: &ManifestTexts<'_>,
        regular_files: &BTreeSet<String>,
    ) -> Result<Self, ManifestError> {
        let manifest = match (texts.rollwave_toml, texts.appspec_yml, texts.appspec_yaml) {
            (Some(text), _, _) => Self::from_rollwave_toml(text)?,
            (None, Some(_), Some(_)) => return Err(ManifestError::ChooseAppSpec),
            (None, Some(text), None) => Self::from_appspec(APPSPEC_FILES[0], text)?,
            (None, None, Some(text)) => Self::from_appspec(APPSPEC_FILES[1], text)?,
            (None, None, None) => Self::empty(),
        };
        manifest.check_files(regular_files)?;
        Ok(manifest)
    }

    /// Parses and validates `rollwave.toml` on its own, without checking that the files it
    /// names exist (see [`Manifest::check_files`]).
    pub fn from_rollwave_toml(text: &str) -> Result<Self, ManifestError> {
        let file = MANIFEST_FILE;
        let raw: RawManifest = toml::from_str(text).map_err(|error| ManifestError::ParseToml {
            file,
            error: Box::new(error),
        })?;
        let mut hooks = BTreeMap::new();
        let RawHooks {
            before_install,
            after_install,
            application_stop,
            application_start,
            validate_service,
        } = raw.hooks;
        for (event, raw_hooks) in [
            (LifecycleEvent::BeforeInstall, before_install),
            (LifecycleEvent::AfterInstall, after_install),
            (LifecycleEvent::ApplicationStop, application_stop),
            (LifecycleEvent::ApplicationStart, application_start),
            (LifecycleEvent::ValidateService, validate_service),
        ] {
            let Some(OneOrMany(raw_hooks)) = raw_hooks else {
                continue;
            };
            let mut event_hooks = Vec::with_capacity(raw_hooks.len());
            for (index, raw_hook) in raw_hooks.into_iter().enumerate() {
                let field = format!("hooks.{event}[{index}]");
                let timeout = match raw_hook.timeout {
                    Some(value) => parse_timeout(file, &field, &value)?,
                    None => DEFAULT_HOOK_TIMEOUT,
                };
                event_hooks.push(validate_hook(file, event, raw_hook.path, timeout, raw_hook.run_as)?);
            }
            if !event_hooks.is_empty() {
                hooks.insert(event, event_hooks);
            }
        }

        let mut health = Vec::with_capacity(raw.health.len());
        for (index, check) in raw.health.into_iter().enumerate() {
            health.push(validate_health_check(file, index, check)?);
        }

        let service = raw
            .service
            .map(|service| validate_service_section(file, service))
            .transpose()?;
        Ok(Self {
            source: ManifestSource::RollwaveToml,
            hooks,
            health,
            service,
        })
    }

    /// Parses the `hooks` of a CodeDeploy appspec (`file` is `appspec.yml` or `appspec.yaml`),
    /// refusing the sections and events Rollwave does not perform.
    pub fn from_appspec(file: &'static str, text: &str) -> Result<Self, ManifestError> {
        let raw: RawAppSpec = serde_norway::from_str(text).map_err(|error| ManifestError::ParseAppSpec {
            file,
            error: Box::new(error),
        })?;
        for (section, value) in [("files", &raw.files), ("permissions", &raw.permissions)] {
            if value.as_ref().is_some_and(|value| !value.is_null()) {
                return Err(ManifestError::RefuseAppSpecSection { file, section });
            }
        }
        if let Some(os) = raw.os
            && os != "linux"
        {
            return Err(ManifestError::RefuseAppSpecOs { file, os });
        }
        let mut hooks = BTreeMap::new();
        for (event_name, raw_hooks) in raw.hooks.unwrap_or_default() {
            let Some(event) = LifecycleEvent::ALL
                .into_iter()
                .find(|event| event.appspec_name() == event_name)
            else {
                return Err(ManifestError::RefuseAppSpecEvent {
                    file,
                    event: event_name,
                });
            };
            let mut event_hooks = Vec::new();
            for (index, raw_hook) in raw_hooks.unwrap_or_default().into_iter().enumerate() {
                let timeout = match raw_hook.timeout {
                    None => DEFAULT_HOOK_TIMEOUT,
                    Some(seconds) => {
                        let field = format!("hooks.{event_name}[{index}]");
                        check_timeout(file, &field, &seconds.to_string(), Duration::from_secs(seconds))?
                    }
                };
                event_hooks.push(validate_hook(file, event, raw_hook.location, timeout, raw_hook.runas)?);
            }
            if !event_hooks.is_empty() {
                hooks.insert(event, event_hooks);
            }
        }
        Ok(Self {
            source: ManifestSource::AppSpec(file),
            hooks,
            health: Vec::new(),
            service: None,
        })
    }

    /// Checks that every hook script, and every bundle path used as a health command or
    /// service program, is a regular file among `regular_files`.
    pub fn check_files(&self, regular_files: &BTreeSet<String>) -> Result<(), ManifestError> {
        let file = self.source.file_name();
        for (event, hooks) in &self.hooks {
            for hook in hooks {
                if !regular_files.contains(&hook.path) {
                    return Err(ManifestError::FindHookScript {
                        file,
                        event: *event,
                        path: hook.path.clone(),
                    });
                }
            }
        }
        for (index, check) in self.health.iter().enumerate() {
            if let HealthCheck::Command { command, .. } = check
                && let Some(program) = bundle_program(command.split_whitespace().next().unwrap_or(""))
                && !regular_files.contains(program)
            {
                return Err(ManifestError::ValidateHealthCheck {
                    file,
                    index,
                    reason: format!("command {program:?} is not a regular file in the bundle"),
                });
            }
        }
        if let Some(service) = &self.service
            && let Some(program) = service.command.first().and_then(|program| bundle_program(program))
            && !regular_files.contains(program)
        {
            return Err(ManifestError::ValidateService {
                file,
                reason: format!("command {program:?} is not a regular file in the bundle"),
            });
        }
        Ok(())
    }
}

/// The bundle path named by a program word, if it names one: relative and containing a `/`
/// (`bin/check`); `curl` or `/usr/bin/curl` are looked up on the instance instead.
fn bundle_program(program: &str) -> Option<&str> {
    (program.contains('/') && !program.starts_with('/')).then_some(program)
}

fn parse_timeout(file: &'static str, field: &str, value: &str) -> Result<Duration, ManifestError> {
    let duration = humantime::parse_duration(value).map_err(|error| ManifestError::ParseTimeout {
        file,
        field: field.to_owned(),
        value: value.to_owned(),
        reason: format!("{error} (write it like 30s, 5m or 1h)"),
    })?;
    check_timeout(file, field, value, duration)
}

fn check_timeout(file: &'static str, field: &str, value: &str, duration: Duration) -> Result<Duration, ManifestError> {
    let reason = if duration.is_zero() {
        "it must be greater than zero"
    } else if duration > MAX_TIMEOUT {
        "it must be at most 24h"
    } else {
        return Ok(duration);
    };
    Err(ManifestError::ParseTimeout {
        file,
        field: field.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    })
}

fn validate_hook(
    file: &'static str,
    event: LifecycleEvent,
    path: String,
    timeout: Duration,
    run_as: Option<String>,
) -> Result<Hook, ManifestError> {
    if let Err(violation) = check_entry_path(&path) {
        return Err(ManifestError::ValidateHookPath {
            file,
            event,
            path,
            violation,
        });
    }
    if let Some(user) = &run_as
        && !is_user_name(user)
    {
        return Err(ManifestError::ValidateRunAs {
            file,
            event,
            run_as: user.clone(),
        });
    }
    Ok(Hook { path, timeout, run_as })
}

fn is_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= MAX_USER_NAME_LEN
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

fn validate_health_check(file: &'static str, index: usize, raw: RawHealthCheck) -> Result<HealthCheck, ManifestError> {
    let invalid = |reason: String| ManifestError::ValidateHealthCheck { file, index, reason };
    let timeout = match &raw.timeout {
        Some(value) => parse_timeout(file, &format!("health[{index}]"), value)?,
        None => DEFAULT_HEALTH_TIMEOUT,
    };
    match (raw.http, raw.command) {
        (Some(url), None) => {
            check_http_url(&url).map_err(|reason| invalid(format!("http {url:?} is invalid: {reason}")))?;
            Ok(HealthCheck::Http { url, timeout })
        }
        (None, Some(command)) => {
            if command.trim().is_empty() || command.contains('\0') {
                return Err(invalid("command is empty".to_owned()));
            }
            if let Some(program) = command.split_whitespace().next().and_then(bundle_program)
                && let Err(violation) = check_entry_path(program)
            {
                return Err(invalid(format!("command path {program:?} is invalid: {violation}")));
            }
            Ok(HealthCheck::Command { command, timeout })
        }
        (Some(_), Some(_)) => Err(invalid("give either http or command, not both".to_owned())),
        (None, None) => Err(invalid("give one of http or command".to_owned())),
    }
}

/// Checks `http://host[:port][/path]`, without pulling in a URL parser for one scheme.
fn check_http_url(url: &str) -> Result<(), &'static str> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err("it must start with http://");
    };
    if url
        .chars()
        .any(|character| character.is_control() || character.is_whitespace())
    {
        return Err("it must not contain spaces or control characters");
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.contains('@') {
        return Err("credentials in the URL are not supported");
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        // An IPv6 literal: [::1]:8080.
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("the IPv6 host is missing its closing ]");
        };
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("it has no host");
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |port| port == 0)
    {
        return Err("the port must be a number from 1 to 65535");
    }
    Ok(())
}

fn validate_service_section(file: &'static str, raw: RawService) -> Result<Service, ManifestError> {
    let invalid = |reason: String| ManifestError::ValidateService { file, reason };
    let Some(program) = raw.command.first() else {
        return Err(invalid("command must name a program".to_owned()));
    };
    if program.is_empty() || raw.command.iter().any(|argument| argument.contains('\0')) {
        return Err(invalid(
            "command must name a program and contain no NUL bytes".to_owned(),
        ));
    }
    if let Some(path) = bundle_program(program)
        && let Err(violation) = check_entry_path(path)
    {
        return Err(invalid(format!("command path {path:?} is invalid: {violation}")));
    }
    let working_directory = raw.working_directory.unwrap_or_else(|| ".".to_owned());
    if working_directory != "."
        && let Err(violation) = check_entry_path(&working_directory)
    {
        return Err(invalid(format!(
            "working_directory {working_directory:?} is invalid: {violation}; it is relative to the release directory"
        )));
    }
    for (key, value) in &raw.environment {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(invalid(format!(
                "environment variable {key:?} is invalid: names are non-empty without = or NUL, values without NUL"
            )));
        }
    }
    Ok(Service {
        command: raw.command,
        working_directory,
        environment: raw.environment,
    })
}

#[cfg(test)]
mod tests;
