//! `krg nodes`: every member with its state and load.

use super::block_on;
use super::output::{bytes, table};
use crate::api::client::request;
use crate::wire::client::{ClientRequest, ClientResponse, NodeView};
use anyhow::bail;

#[derive(clap::Args)]
pub struct NodesArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: NodesArgs) -> anyhow::Result<i32> {
    let ClientResponse::Nodes(nodes) = block_on(request(ClientRequest::Nodes))? else {
        bail!("krgd answered with something unexpected")
    };
    if args.json {
        let arr: Vec<serde_json::Value> = nodes.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
    } else {
        let rows: Vec<Vec<String>> = nodes.iter().map(to_row).collect();
        print!(
            "{}",
            table(
                &[
                    "ID", "ADDRESS", "HOST", "STATE", "CPUS", "LOAD", "JOBS", "MEM", "FREE",
                    "VERSION"
                ],
                &rows
            )
        );
    }
    Ok(0)
}

fn to_json(n: &NodeView) -> serde_json::Value {
    let l = n.load.clone().unwrap_or_default();
    serde_json::json!({
        "id": n.id.get(),
        "addr": n.addr,
        "hostname": if l.hostname.is_empty() { n.hostname.clone() } else { l.hostname.clone() },
        "state": n.state.as_str(),
        "voter": n.voter,
        "cpus": l.cpus,
        "capacity": l.capacity,
        "load1": l.load1,
        "load5": l.load5,
        "load15": l.load15,
        "mem_total": l.mem_total,
        "mem_free": l.mem_free,
        "jobs": l.jobs,
        "idle": is_idle(n),
        "version": n.version,
    })
}

fn to_row(n: &NodeView) -> Vec<String> {
    let dash = || "-".to_string();
    let host = n
        .load
        .as_ref()
        .map(|l| l.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| n.hostname.clone());
    let state = if n.voter {
        format!("{}*", n.state)
    } else {
        n.state.to_string()
    };
    match &n.load {
        Some(l) => vec![
            n.id.to_string(),
            n.addr.clone(),
            host,
            state,
            if (l.capacity - f64::from(l.cpus)).abs() < 0.01 {
                l.cpus.to_string()
            } else {
                format!("{:.2}/{}", l.capacity, l.cpus)
            },
            format!("{:.2} {:.2} {:.2}", l.load1, l.load5, l.load15),
            if is_idle(n) {
                "idle".to_string()
            } else {
                l.jobs.to_string()
            },
            bytes(l.mem_total),
            bytes(l.mem_free),
            n.version.clone(),
        ],
        None => vec![
            n.id.to_string(),
            n.addr.clone(),
            host,
            state,
            dash(),
            dash(),
            dash(),
            dash(),
            n.version.clone(),
        ],
    }
}

/// No krg job and next to no load: a node consolidation (`pack`) could let
/// power down.
fn is_idle(n: &NodeView) -> bool {
    n.load
        .as_ref()
        .is_some_and(|l| l.jobs == 0 && l.load_short < 0.1 && n.state == krg_types::NodeState::Up)
}
