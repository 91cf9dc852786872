//! `rollwave demo`: the main job on one machine, with embedded defaults. A
//! coordinator and several real agent processes (separate state dirs, three
//! zones) in a temporary directory, shown joining live.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rollwave_proto::v1 as pb;
use tokio::process::{Child, Command};

use crate::cli::DemoArgs;
use crate::cli::output::{InstanceView, OutputFormat, print_list};
use crate::cli::profile::Profile;
use crate::presence::PresencePolicy;
use crate::server::{self, ServerOptions};

const STACK: &str = "demo";
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

/// The agent binary: beside this one (a cargo build puts both in target/), else on PATH.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let beside = std::env::current_exe()?.with_file_name("rollwave-agent");
    if beside.exists() {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("rollwave-agent"))
        .find(|candidate| candidate.exists())
        .context("rollwave-agent not found next to rollwave or on PATH; build it with `cargo build --workspace`")
}

fn write_agent_config(dir: &Path, coordinator: SocketAddr, token: &str, index: usize) -> anyhow::Result<PathBuf> {
    let zone = ZONES[index % ZONES.len()];
    let root = dir.join(format!("agent-{index}"));
    std::fs::create_dir_all(&root)?;
    let config = format!(
        "coordinator = \"{coordinator}\"\njoin_token = \"{token}\"\nstack = \"{STACK}\"\nlayer = \"web\"\nzone = \"{zone}\"\n\
         hostname = \"demo-host-{index}\"\nstate_dir = \"{state}\"\ntls_dir = \"{tls}\"\nimds = \"off\"\n\
         [reconnect]\ninitial = \"200ms\"\nmax = \"2s\"\n",
        state = root.join("state").display(),
        tls = root.join("tls").display(),
    );
    let path = root.join("agent.toml");
    std::fs::write(&path, config)?;
    Ok(path)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let agent = agent_binary()?;
    let workdir = tempfile::Builder::new().prefix("rollwave-demo-").tempdir()?;
    println!("rollwave demo: everything lives in {}", workdir.path().display());

    let mut options = ServerOptions::new(
        workdir.path().join("coordinator"),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
    );
    options.settings.heartbeat_interval = Duration::from_secs(1);
    options.settings.presence = PresencePolicy {
        offline_after: Duration::from_secs(3),
        lost_after: Duration::from_secs(60),
    };
    let server = server::start(options).await?;
    println!(
        "coordinator listening on {} (TLS, CA {})",
        server.local_addr,
        server.files.ca.certificate.display()
    );

    let profile = Profile {
        addr: server.local_addr.to_string(),
        token: std::fs::read_to_string(&server.files.operator_token)?.trim().to_owned(),
        ca_pem: server.ca_pem.clone().into_bytes(),
    };
    let mut client = crate::cli::operator_client(&profile).await?;
    client
        .create_stack(pb::CreateStackRequest {
            name: STACK.into(),
            stage: "dev".into(),
        })
        .await?;
    let token = client
        .create_token(pb::CreateTokenRequest {
            stack: STACK.into(),
            ttl_seconds: 600,
            uses: u32::try_from(args.agents)?,
        })
        .await?
        .into_inner()
        .token;
    println!(
        "stack {STACK:?} created; join token for {} agents issued\n",
        args.agents
    );

    let mut agents: Vec<Child> = Vec::new();
    for index in 0..args.agents {
        let config = write_agent_config(workdir.path(), server.local_addr, &token, index)?;
        let log = std::fs::File::create(config.with_file_name("agent.log"))?;
        let child = Command::new(&agent)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", agent.display()))?;
        println!("started agent {index} in {}", ZONES[index % ZONES.len()]);
        agents.push(child);
    }
    println!();

    let started = Instant::now();
    let mut seen = BTreeSet::new();
    let instances = loop {
        let instances = client
            .list_instances(pb::ListInstancesRequest { stack: STACK.into() })
            .await?
            .into_inner()
            .instances;
        for instance in &instances {
            if instance.presence == "online" && seen.insert(instance.id.clone()) {
                println!(
                    "  + {} joined from {} ({}) after {:.1}s",
                    instance.id,
                    instance.zone,
                    instance.hostname,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if seen.len() == args.agents {
            break instances;
        }
        if started.elapsed() > JOIN_DEADLINE {
            bail!(
                "only {} of {} agents came online within {:?}; see the agent logs under {}",
                seen.len(),
                args.agents,
                JOIN_DEADLINE,
                workdir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("\nall {} agents online:\n", args.agents);
    print_list(
        OutputFormat::Table,
        &instances.into_iter().map(InstanceView::from).collect::<Vec<_>>(),
    )?;

    if args.keep_running {
        println!(
            "\nstill running; try: rollwave --config {} instance list\nCtrl-C to stop",
            server.files.cli_config.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    for agent in &mut agents {
        let _ = agent.start_kill();
        let _ = agent.wait().await;
    }
    server.shutdown().await?;
    println!("\ndemo finished; cleaned up {}", workdir.path().display());
    Ok(())
}
