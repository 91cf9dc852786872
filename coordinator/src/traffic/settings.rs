//! A stack's traffic settings, as operators set them and the store keeps them: which provider, where
//! it is, how an instance is named there, how long a drain may take. Pure data and validation; the
//! providers themselves live beside this module.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{CommandProvider, Elbv2Provider, HaproxyRuntime, RuntimeAddress, TrafficProvider, TrafficTarget};
use crate::model::InstanceFacts;

/// How long a drain waits for open sessions (or a target's deregistration) by default.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 30_000;

/// The traffic provider of a stack (or of one layer of it) and how instances are named there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "provider", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TrafficSettings {
    /// HAProxy's runtime API.
    Haproxy {
        /// `unix:/run/haproxy/admin.sock`, a bare socket path, or `tcp:HOST:PORT`.
        runtime_api: String,
        /// The backend the instances are servers of.
        backend: String,
        /// The server's name in the backend, as a [name template](render).
        server: String,
        drain_timeout_ms: u64,
    },
    /// AWS Elastic Load Balancing v2 (ALB, NLB) target groups.
    AwsElbv2 {
        /// Target group ARNs the instance is registered in.
        target_groups: Vec<String>,
        /// The target id (an EC2 instance id or an IP address), as a [name template](render).
        target: String,
        /// The target's port, when the target group does not define one per target.
        port: Option<u16>,
        /// Overrides the API endpoint (for a local test server or a VPC endpoint).
        endpoint: Option<String>,
        region: Option<String>,
        drain_timeout_ms: u64,
    },
    /// The operator's own executables: `PROGRAM INSTANCE_ID BACKEND SERVER`.
    Command {
        drain: PathBuf,
        undrain: PathBuf,
        /// Passed to the programs as BACKEND, as is.
        backend: String,
        /// Passed to the programs as SERVER, as a [name template](render).
        server: String,
        drain_timeout_ms: u64,
    },
}

/// Why settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("instance {instance}: {template:?} names {placeholder}, which the instance does not have")]
    Unresolved {
        instance: String,
        template: String,
        placeholder: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl TrafficSettings {
    /// `haproxy`, `aws-elbv2` or `command`.
    pub fn provider_name(&self) -> &'static str {
        match self {
            TrafficSettings::Haproxy { .. } => "haproxy",
            TrafficSettings::AwsElbv2 { .. } => "aws-elbv2",
            TrafficSettings::Command { .. } => "command",
        }
    }

    pub fn drain_timeout(&self) -> Duration {
        let ms = match self {
            TrafficSettings::Haproxy { drain_timeout_ms, .. }
            | TrafficSettings::AwsElbv2 { drain_timeout_ms, .. }
            | TrafficSettings::Command { drain_timeout_ms, .. } => *drain_timeout_ms,
        };
        Duration::from_millis(ms)
    }

    /// One line for plans and `rollwave traffic show`.
    pub fn describe(&self) -> String {
        let timeout = humantime::format_duration(self.drain_timeout());
        match self {
            TrafficSettings::Haproxy {
                runtime_api,
                backend,
                server,
                ..
            } => format!("haproxy at {runtime_api}, server {backend}/{server}, drain timeout {timeout}"),
            TrafficSettings::AwsElbv2 {
                target_groups, target, ..
            } => format!(
                "aws-elbv2 target {target} in {}, drain timeout {timeout}",
                target_groups.join(", ")
            ),
            TrafficSettings::Command {
                drain,
                undrain,
                backend,
                server,
                ..
            } => format!(
                "commands {} / {} for {backend} {server}, drain timeout {timeout}",
                drain.display(),
                undrain.display()
            ),
        }
    }

    /// Checks everything that can be checked before an instance is named.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let check_template = |field: &'static str, template: &str| -> Result<(), SettingsError> {
            if template.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
            parse_template(template)
                .map(|_| ())
                .map_err(|reason| invalid(field, reason))
        };
        match self {
            TrafficSettings::Haproxy {
                runtime_api,
                backend,
                server,
                ..
            } => {
                runtime_address(runtime_api)?;
                if backend.trim().is_empty() {
                    return Err(invalid("backend", "must not be empty"));
                }
                check_template("server", server)
            }
            TrafficSettings::AwsElbv2 {
                target_groups, target, ..
            } => {
                if target_groups.is_empty() {
                    return Err(invalid("target groups", "name at least one target group ARN"));
                }
                if let Some(bad) = target_groups.iter().find(|arn| !arn.starts_with("arn:")) {
                    return Err(invalid("target groups", format!("{bad:?} is not an ARN (arn:...)")));
                }
                check_template("target", target)
            }
            TrafficSettings::Command {
                drain, undrain, server, ..
            } => {
                for (field, program) in [("drain command", drain), ("undrain command", undrain)] {
                    if !program.is_absolute() {
                        return Err(invalid(field, format!("{} is not an absolute path", program.display())));
                    }
                }
                check_template("server", server)
            }
        }
    }

    /// How the provider knows `instance`.
    pub fn target_of(&self, instance: &str, facts: &InstanceFacts) -> Result<TrafficTarget, SettingsError> {
        let (backend, server) = match self {
            TrafficSettings::Haproxy { backend, server, .. } | TrafficSettings::Command { backend, server, .. } => {
                (backend.clone(), server.as_str())
            }
            TrafficSettings::AwsElbv2 { target, .. } => (String::new(), target.as_str()),
        };
        Ok(TrafficTarget {
            instance_id: instance.to_owned(),
            backend,
            server: render(server, instance, facts)?,
        })
    }

    /// The provider these settings describe.
    pub async fn provider(&self) -> Result<TrafficProvider, SettingsError> {
        Ok(match self {
            TrafficSettings::Haproxy { runtime_api, .. } => {
                TrafficProvider::Haproxy(HaproxyRuntime::new(runtime_address(runtime_api)?))
            }
            TrafficSettings::AwsElbv2 {
                target_groups,
                port,
                endpoint,
                region,
                ..
            } => TrafficProvider::Elbv2(
                Elbv2Provider::connect(target_groups.clone(), *port, endpoint.as_deref(), region.as_deref()).await,
            ),
            TrafficSettings::Command { drain, undrain, .. } => {
                TrafficProvider::Command(CommandProvider::new(drain.clone(), undrain.clone()))
            }
        })
    }
}

/// The settings that apply to an instance of `layer`: its layer's, else the stack's (layer "").
pub fn for_layer<'a>(settings: &'a BTreeMap<String, TrafficSettings>, layer: &str) -> Option<&'a TrafficSettings> {
    settings.get(layer).or_else(|| settings.get(""))
}

fn runtime_address(text: &str) -> Result<RuntimeAddress, SettingsError> {
    if let Some(address) = text.strip_prefix("tcp:") {
        if address
            .rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(invalid("runtime API", format!("{text:?}: expected tcp:HOST:PORT")));
        }
        return Ok(RuntimeAddress::Tcp(address.to_owned()));
    }
    let path = text.strip_prefix("unix:").unwrap_or(text);
    if !path.starts_with('/') {
        return Err(invalid(
            "runtime API",
            format!("{text:?}: expected unix:/ABSOLUTE/PATH or tcp:HOST:PORT"),
        ));
    }
    Ok(RuntimeAddress::Unix(PathBuf::from(path)))
}

/// One piece of a name template.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Field(&'a str),
}

/// Splits `{field}` placeholders from text; `{{` and `}}` stand for braces.
fn parse_template(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("{{") {
            pieces.push(Piece::Text("{"));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("}}") {
            pieces.push(Piece::Text("}"));
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let end = after.find('}').ok_or_else(|| format!("{template:?}: unclosed '{{'"))?;
            let field = &after[..end];
            let known = matches!(field, "instance" | "hostname" | "zone" | "layer")
                || field.strip_prefix("tag:").is_some_and(|tag| !tag.is_empty());
            if !known {
                return Err(format!(
                    "{template:?}: unknown placeholder {{{field}}}; use {{instance}}, {{hostname}}, {{zone}}, {{layer}} or {{tag:NAME}}"
                ));
            }
            pieces.push(Piece::Field(field));
            rest = &after[end + 1..];
        } else if rest.starts_with('}') {
            return Err(format!("{template:?}: lone '}}' (write '}}}}' for a brace)"));
        } else {
            let end = rest.find(['{', '}']).unwrap_or(rest.len());
            pieces.push(Piece::Text(&rest[..end]));
            rest = &rest[end..];
        }
    }
    Ok(pieces)
}

/// Fills a name template from an instance: `{instance}` (its id), `{hostname}`, `{zone}`,
/// `{layer}` and `{tag:NAME}` (a tag from its agent.toml). An empty value is an error: a drain
/// of the wrong server is worse than none.
pub fn render(template: &str, instance: &str, facts: &InstanceFacts) -> Result<String, SettingsError> {
    let pieces = parse_template(template).map_err(|reason| invalid("template", reason))?;
    let mut out = String::new();
    for piece in pieces {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Field(field) => {
                let value = match field {
                    "instance" => Some(instance),
                    "hostname" => Some(facts.hostname.as_str()),
                    "zone" => Some(facts.zone.as_str()),
                    "layer" => Some(facts.layer.as_str()),
                    tag => facts.tags.get(&tag["tag:".len()..]).map(String::as_str),
                };
                match value {
                    Some(value) if !value.is_empty() => out.push_str(value),
                    _ => {
                        return Err(SettingsError::Unresolved {
                            instance: instance.to_owned(),
                            template: template.to_owned(),
                            placeholder: format!("{{{field}}}"),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> InstanceFacts {
        InstanceFacts {
            hostname: "web-3".into(),
            layer: "api".into(),
            zone: "eu-west-1b".into(),
            tags: BTreeMap::from([("ec2-id".to_owned(), "i-0abc".to_owned())]),
            agent_version: "0.1.0".into(),
        }
    }

    fn haproxy(runtime_api: &str, server: &str) -> TrafficSettings {
        TrafficSettings::Haproxy {
            runtime_api: runtime_api.into(),
            backend: "app".into(),
            server: server.into(),
            drain_timeout_ms: DEFAULT_DRAIN_TIMEOUT_MS,
        }
    }

    #[test]
    fn templates_name_instances_from_their_facts() {
        let facts = facts();
        let name = |template: &str| render(template, "in-42", &facts);
        assert_eq!(name("{hostname}").as_deref(), Ok("web-3"));
        assert_eq!(name("{zone}-{hostname}").as_deref(), Ok("eu-west-1b-web-3"));
        assert_eq!(name("{tag:ec2-id}").as_deref(), Ok("i-0abc"));
        assert_eq!(name("{instance}").as_deref(), Ok("in-42"));
        assert_eq!(name("{{literal}}").as_deref(), Ok("{literal}"));
        assert_eq!(
            name("{tag:missing}"),
            Err(SettingsError::Unresolved {
                instance: "in-42".into(),
                template: "{tag:missing}".into(),
                placeholder: "{tag:missing}".into()
            })
        );
        let mut bare = facts.clone();
        bare.zone.clear();
        assert!(
            render("{zone}", "in-42", &bare).is_err(),
            "an empty value never names a server"
        );
    }

    #[test]
    fn bad_settings_are_refused_with_the_field_named() {
        assert!(haproxy("unix:/run/haproxy/admin.sock", "{hostname}").validate().is_ok());
        assert!(haproxy("/run/haproxy/admin.sock", "{hostname}").validate().is_ok());
        assert!(haproxy("tcp:127.0.0.1:9999", "{hostname}").validate().is_ok());
        for (runtime_api, server, field) in [
            ("relative.sock", "{hostname}", "runtime API"),
            ("tcp:127.0.0.1", "{hostname}", "runtime API"),
            ("/a.sock", "{nope}", "server"),
            ("/a.sock", "{hostname", "server"),
            ("/a.sock", "a}b", "server"),
            ("/a.sock", " ", "server"),
        ] {
            match haproxy(runtime_api, server).validate() {
                Err(SettingsError::Invalid { field: got, .. }) => assert_eq!(got, field, "{runtime_api} {server}"),
                other => panic!("{runtime_api} {server}: {other:?}"),
            }
        }
        let elbv2 = |groups: Vec<&str>| TrafficSettings::AwsElbv2 {
            target_groups: groups.into_iter().map(str::to_owned).collect(),
            target: "{tag:ec2-id}".into(),
            port: None,
            endpoint: None,
            region: None,
            drain_timeout_ms: 1000,
        };
        assert!(
            elbv2(vec!["arn:aws:elasticloadbalancing:eu-west-1:1:targetgroup/web/1"])
                .validate()
                .is_ok()
        );
        assert!(elbv2(vec![]).validate().is_err());
        assert!(elbv2(vec!["web"]).validate().is_err());
        let command = TrafficSettings::Command {
            drain: "bin/drain".into(),
            undrain: "/bin/undrain".into(),
            backend: "web".into(),
            server: "{hostname}".into(),
            drain_timeout_ms: 1000,
        };
        assert!(matches!(
            command.validate(),
            Err(SettingsError::Invalid {
                field: "drain command",
                ..
            })
        ));
    }

    #[test]
    fn a_layer_uses_its_own_settings_else_the_stacks() {
        let settings = BTreeMap::from([
            (String::new(), haproxy("/stack.sock", "{hostname}")),
            ("db".to_owned(), haproxy("/db.sock", "{hostname}")),
        ]);
        assert_eq!(for_layer(&settings, "db"), settings.get("db"));
        assert_eq!(for_layer(&settings, "api"), settings.get(""));
        let only_db = BTreeMap::from([("db".to_owned(), haproxy("/db.sock", "{hostname}"))]);
        assert_eq!(for_layer(&only_db, "api"), None);
    }

    #[test]
    fn settings_survive_the_store_as_json() {
        let settings = haproxy("unix:/run/haproxy/admin.sock", "{zone}-{hostname}");
        let json = serde_json::to_string(&settings).expect("serialises");
        assert!(json.contains("\"provider\":\"haproxy\""), "{json}");
        assert_eq!(
            serde_json::from_str::<TrafficSettings>(&json).expect("deserialises"),
            settings
        );
    }
}
