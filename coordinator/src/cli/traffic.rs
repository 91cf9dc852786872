//! `rollwave traffic`: the load balancer a stack's deployments drain instances from. Flags become
//! a [`pb::TrafficSettings`]; the coordinator checks and stores them and answers with every
//! setting of the stack.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rollwave_proto::v1 as pb;
use serde::Serialize;

use super::console::outln;
use super::output::{OutputFormat, print_item};
use super::{OperatorClient, call_error};

const TRAFFIC_HELP: &str = "\
A stack with traffic settings drains every instance from its load balancer
before the instance switches releases, and returns it once the agent reports it
healthy (`rollwave deploy --no-drain` skips this for one deployment). An
instance is named in the load balancer by a template filled from its facts:
{instance} (its id), {hostname}, {zone}, {layer} and {tag:NAME} (a [tags] entry
of its agent.toml). Settings for a layer (--layer) apply to that layer's
instances; the others use the stack's.

Examples:
  rollwave traffic set web haproxy --runtime-api unix:/run/haproxy/admin.sock \\
      --backend app --server '{hostname}'
  rollwave traffic set web aws-elbv2 \\
      --target-group arn:aws:elasticloadbalancing:...:targetgroup/web/0123 \\
      --target '{tag:ec2-instance-id}'
  rollwave traffic set web command --drain /usr/local/bin/lb-drain \\
      --undrain /usr/local/bin/lb-undrain
  rollwave traffic show web
  rollwave traffic clear web";

#[derive(Debug, Subcommand)]
#[command(after_help = TRAFFIC_HELP)]
pub enum TrafficCommand {
    /// Set (or replace) the traffic provider of a stack or of one of its layers
    #[command(after_help = TRAFFIC_HELP)]
    Set {
        /// The stack
        stack: String,
        #[command(subcommand)]
        provider: ProviderArgs,
    },
    /// Show a stack's traffic settings
    Show {
        /// The stack
        stack: String,
    },
    /// Remove the traffic settings of a stack (or of one layer): deployments no longer drain
    Clear {
        /// The stack
        stack: String,
        /// Only this layer's settings
        #[arg(long, default_value = "")]
        layer: String,
    },
}

/// Settings every provider takes.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Settings for this layer's instances only (default: the whole stack)
    #[arg(long, default_value = "")]
    pub layer: String,
    /// How long a drain waits for open sessions to end before the instance goes out of service anyway
    /// [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
}

#[derive(Debug, Subcommand)]
pub enum ProviderArgs {
    /// HAProxy's runtime API (`stats socket ... level admin`): drain, wait for sessions, maint; back once healthy
    Haproxy {
        /// unix:/PATH (or a bare absolute path) or tcp:HOST:PORT
        #[arg(long)]
        runtime_api: String,
        /// The backend the instances are servers of
        #[arg(long)]
        backend: String,
        /// The server's name in the backend, as a template
        #[arg(long, default_value = "{hostname}")]
        server: String,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// AWS ELBv2 target groups (ALB, NLB): deregister, wait out the deregistration delay; register once healthy
    #[command(name = "aws-elbv2")]
    AwsElbv2 {
        /// A target group ARN (repeat for several)
        #[arg(long = "target-group", required = true)]
        target_groups: Vec<String>,
        /// The target id (EC2 instance id or IP address), as a template
        #[arg(long, default_value = "{tag:ec2-instance-id}")]
        target: String,
        /// The target's port, when the group does not set one
        #[arg(long)]
        port: Option<u16>,
        /// Another ELBv2 API endpoint (a VPC endpoint, a local test server)
        #[arg(long)]
        endpoint: Option<String>,
        /// The AWS region [default: from the AWS configuration]
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Your own programs, run as PROGRAM INSTANCE_ID BACKEND SERVER; exit 0 when done
    Command {
        /// Absolute path of the drain program; it returns once the instance takes no traffic
        #[arg(long)]
        drain: PathBuf,
        /// Absolute path of the undrain program
        #[arg(long)]
        undrain: PathBuf,
        /// Passed as BACKEND, as is
        #[arg(long, default_value = "")]
        backend: String,
        /// Passed as SERVER, as a template
        #[arg(long, default_value = "{hostname}")]
        server: String,
        #[command(flatten)]
        common: CommonArgs,
    },
}

/// One stack's traffic settings, for `--output json`.
#[derive(Debug, Serialize)]
struct StackTrafficView {
    stack: String,
    settings: Vec<TrafficSettingsView>,
}

#[derive(Debug, Serialize)]
struct TrafficSettingsView {
    /// `null` for the whole stack.
    layer: Option<String>,
    /// "haproxy", "aws-elbv2" or "command".
    provider: String,
    drain_timeout_ms: Option<u64>,
    /// The settings in one line.
    description: String,
}

impl From<pb::StackTraffic> for StackTrafficView {
    fn from(traffic: pb::StackTraffic) -> Self {
        StackTrafficView {
            stack: traffic.stack,
            settings: traffic
                .settings
                .into_iter()
                .map(|settings| TrafficSettingsView {
                    layer: Some(settings.layer).filter(|layer| !layer.is_empty()),
                    provider: match settings.provider {
                        Some(pb::traffic_settings::Provider::Haproxy(_)) => "haproxy",
                        Some(pb::traffic_settings::Provider::AwsElbv2(_)) => "aws-elbv2",
                        Some(pb::traffic_settings::Provider::Command(_)) => "command",
                        None => "",
                    }
                    .to_owned(),
                    drain_timeout_ms: settings.drain_timeout_ms,
                    description: settings.description,
                })
                .collect(),
        }
    }
}

fn request_settings(provider: ProviderArgs) -> pb::TrafficSettings {
    let millis =
        |duration: Option<Duration>| duration.map(|duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
    let (common, provider) = match provider {
        ProviderArgs::Haproxy {
            runtime_api,
            backend,
            server,
            common,
        } => (
            common,
            pb::traffic_settings::Provider::Haproxy(pb::HaproxyTraffic {
                runtime_api,
                backend,
                server,
            }),
        ),
        ProviderArgs::AwsElbv2 {
            target_groups,
            target,
            port,
            endpoint,
            region,
            common,
        } => (
            common,
            pb::traffic_settings::Provider::AwsElbv2(pb::Elbv2Traffic {
                target_groups,
                target,
                port: port.map(u32::from),
                endpoint: endpoint.unwrap_or_default(),
                region: region.unwrap_or_default(),
            }),
        ),
        ProviderArgs::Command {
            drain,
            undrain,
            backend,
            server,
            common,
        } => (
            common,
            pb::traffic_settings::Provider::Command(pb::CommandTraffic {
                drain: drain.display().to_string(),
                undrain: undrain.display().to_string(),
                backend,
                server,
            }),
        ),
    };
    pb::TrafficSettings {
        layer: common.layer,
        drain_timeout_ms: millis(common.drain_timeout),
        provider: Some(provider),
        description: String::new(),
    }
}

/// `rollwave traffic ...`.
pub async fn traffic(client: &mut OperatorClient, command: TrafficCommand, format: OutputFormat) -> anyhow::Result<()> {
    let traffic = match command {
        TrafficCommand::Set { stack, provider } => client
            .set_traffic(pb::SetTrafficRequest {
                stack,
                settings: Some(request_settings(provider)),
            })
            .await
            .map_err(call_error)?
            .into_inner(),
        TrafficCommand::Show { stack } => client
            .get_traffic(pb::GetTrafficRequest { stack })
            .await
            .map_err(call_error)?
            .into_inner(),
        TrafficCommand::Clear { stack, layer } => client
            .clear_traffic(pb::ClearTrafficRequest { stack, layer })
            .await
            .map_err(call_error)?
            .into_inner(),
    };
    let view = StackTrafficView::from(traffic);
    match format {
        OutputFormat::Json => print_item(format, &view),
        OutputFormat::Table => {
            if view.settings.is_empty() {
                outln!(
                    "{}: no traffic provider; deployments switch instances while they take traffic",
                    view.stack
                )?;
            }
            for settings in &view.settings {
                let whose = settings
                    .layer
                    .as_deref()
                    .map_or_else(|| view.stack.clone(), |layer| format!("{} layer {layer}", view.stack));
                outln!("{whose}: {}", settings.description)?;
            }
            Ok(())
        }
    }
}
