//! `krg sched`: the global scheduler's policies, changed at run time for the
//! whole cluster (through the replicated state).

use super::block_on;
use crate::api::client::request;
use crate::policy::config::{BalancerKind, PlacementKind, SchedConfig};
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;
use clap::Subcommand;
use std::time::Duration;

#[derive(Subcommand)]
pub enum SchedCommand {
    /// Print the policies in force.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Change a policy for the whole cluster (root only).
    #[command(subcommand)]
    Set(SetCommand),
    /// Why each automatic decision was taken, across the cluster.
    Log(super::events::EventsArgs),
}

#[derive(Subcommand)]
pub enum SetCommand {
    /// Which node runs a new job: round-robin, least-loaded or pack.
    Placement { policy: PlacementKind },
    /// Which running job moves where: balance, pack or off.
    Balancer {
        policy: BalancerKind,
        /// How often each node reconsiders its jobs.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Balance when a node's load exceeds the average by this factor.
        #[arg(long)]
        threshold: Option<f64>,
        /// How long a job stays on a node before it may move again.
        #[arg(long, value_parser = humantime::parse_duration)]
        min_residence: Option<Duration>,
    },
}

fn get() -> anyhow::Result<SchedConfig> {
    let ClientResponse::Sched(c) = block_on(request(ClientRequest::SchedShow))? else {
        bail!("krgd answered with something unexpected")
    };
    Ok(c)
}

pub fn print(c: &SchedConfig) {
    println!("placement     {}", c.placement);
    println!("balancer      {}", c.balancer);
    println!(
        "interval      {}",
        humantime::format_duration(Duration::from_millis(c.interval_ms))
    );
    println!("threshold     {}", c.threshold);
    println!(
        "min-residence {}",
        humantime::format_duration(Duration::from_millis(c.min_residence_ms))
    );
}

pub fn run(cmd: SchedCommand) -> anyhow::Result<i32> {
    match cmd {
        SchedCommand::Show { json } => {
            let c = get()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                print(&c);
            }
            Ok(0)
        }
        SchedCommand::Log(a) => super::events::run(a),
        SchedCommand::Set(set) => {
            let mut c = get()?;
            match set {
                SetCommand::Placement { policy } => c.placement = policy,
                SetCommand::Balancer {
                    policy,
                    interval,
                    threshold,
                    min_residence,
                } => {
                    c.balancer = policy;
                    if let Some(i) = interval {
                        c.interval_ms = i.as_millis() as u64;
                    }
                    if let Some(t) = threshold {
                        c.threshold = t;
                    }
                    if let Some(m) = min_residence {
                        c.min_residence_ms = m.as_millis() as u64;
                    }
                }
            }
            let ClientResponse::Sched(now) = block_on(request(ClientRequest::SchedSet(c)))? else {
                bail!("krgd answered with something unexpected")
            };
            print(&now);
            Ok(0)
        }
    }
}
