//! `krg cluster …` and `krg node …`.

use super::block_on;
use crate::api::client::request;
use crate::identity::{ca, StateDir};
use crate::node::config::{DEFAULT_PORT, DEFAULT_STATE_DIR};
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::{bail, Context};
use clap::Subcommand;
use krg_types::NodeState;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Is the cluster up, and how many nodes are in each state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Print a single-use join token for a new node (root only).
    Token {
        /// How long the token stays valid.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Create a new cluster's identity (CA and node 1's certificate) in the
    /// state directory, before krgd first starts. krgd does it by itself
    /// when started on an empty state directory without --join.
    Init {
        #[arg(long, env = "KRG_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Address other nodes will use to reach this one (ip:port).
        #[arg(long)]
        advertise: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Make this machine a member of the cluster of the node at ADDR; then start krgd.
    Join {
        /// A member's node address, ip:port.
        addr: String,
        /// Join token from `krg cluster token` on a member.
        #[arg(long)]
        token: String,
        #[arg(long, env = "KRG_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Address other nodes will use to reach this one (ip:port).
        #[arg(long)]
        advertise: Option<std::net::SocketAddr>,
    },
}

pub fn run(cmd: ClusterCommand) -> anyhow::Result<i32> {
    match cmd {
        ClusterCommand::Status { json } => status(json),
        ClusterCommand::Token { ttl } => {
            let resp = block_on(request(ClientRequest::CreateToken {
                ttl_secs: ttl.as_secs(),
            }))?;
            let ClientResponse::Token(t) = resp else {
                bail!("krgd answered with something unexpected")
            };
            println!("{t}");
            Ok(0)
        }
        ClusterCommand::Init {
            state_dir,
            advertise,
        } => {
            let addr = default_advertise(advertise)?;
            let dir = StateDir::new(&state_dir);
            let (id, _) = ca::init_cluster(&addr)?;
            dir.save_new(&id)?;
            println!(
                "created cluster {} in {}: this machine is node 1 at {addr}; start krgd to bring it up",
                id.meta.cluster_id,
                state_dir.display()
            );
            Ok(0)
        }
    }
}

pub fn run_node(cmd: NodeCommand) -> anyhow::Result<i32> {
    match cmd {
        NodeCommand::Join {
            addr,
            token,
            state_dir,
            advertise,
        } => {
            let ours = default_advertise(advertise)?;
            let dir = StateDir::new(&state_dir);
            if let Some(existing) = dir.load()? {
                bail!(
                    "{} already holds node {} of cluster {}: remove it first to join another cluster",
                    state_dir.display(),
                    existing.meta.node_id,
                    existing.meta.cluster_id
                );
            }
            let id = block_on(crate::join::join(&addr, &token, &ours))?;
            dir.save_new(&id)?;
            println!(
                "joined cluster {} as node {} ({ours}); start krgd to bring it up",
                id.meta.cluster_id, id.meta.node_id
            );
            Ok(0)
        }
    }
}

fn default_advertise(advertise: Option<std::net::SocketAddr>) -> anyhow::Result<String> {
    let cfg = crate::node::config::NodeConfig {
        state_dir: PathBuf::new(),
        socket: PathBuf::new(),
        listen: std::net::SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
        advertise,
        join: None,
        token: None,
        suspect_after: Duration::ZERO,
        down_after: Duration::ZERO,
        gossip_interval: Duration::ZERO,
        load_scope: crate::probe::LoadScope::System,
        init: None,
        view_dir: PathBuf::new(),
        metrics: "none".into(),
        image_store: PathBuf::new(),
        sched_config: None,
        criu_log_level: 2,
        no_cgroup_tuning: true,
    };
    Ok(crate::daemon::advertise_addr(&cfg)
        .context("cannot tell this node's address")?
        .to_string())
}

fn status(json: bool) -> anyhow::Result<i32> {
    let ClientResponse::Status(s) = block_on(request(ClientRequest::Status))? else {
        bail!("krgd answered with something unexpected")
    };
    if json {
        let v = serde_json::json!({
            "cluster_id": s.cluster_id,
            "this_node": s.this_node.get(),
            "leader": s.leader.map(|l| l.get()),
            "voters": s.voters.iter().map(|v| v.get()).collect::<Vec<_>>(),
            "nodes": s.nodes.iter().map(|(id, st)| serde_json::json!({"id": id.get(), "state": st.as_str()})).collect::<Vec<_>>(),
            "applied_index": s.applied_index,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    let count = |want: NodeState| s.nodes.iter().filter(|(_, st)| *st == want).count();
    let mut parts = vec![format!("{} up", count(NodeState::Up))];
    for st in [
        NodeState::Suspect,
        NodeState::Down,
        NodeState::Draining,
        NodeState::Left,
    ] {
        let n = count(st);
        if n > 0 {
            parts.push(format!("{n} {st}"));
        }
    }
    let members = s
        .nodes
        .iter()
        .filter(|(_, st)| *st != NodeState::Left)
        .count();
    let word = if s.leader.is_some() {
        "up"
    } else {
        "degraded (no leader)"
    };
    println!(
        "{word} on {members} node{} ({})",
        if members == 1 { "" } else { "s" },
        parts.join(", ")
    );
    println!(
        "cluster {}, this is node {}, leader {}, voters {}",
        s.cluster_id,
        s.this_node,
        s.leader
            .map_or_else(|| "none".to_string(), |l| format!("node {l}")),
        s.voters
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(if s.leader.is_some() { 0 } else { 1 })
}
