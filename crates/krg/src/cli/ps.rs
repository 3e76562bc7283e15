//! `krg ps`: every job of the cluster, from any node.

use super::block_on;
use super::output::{bytes, table};
use crate::api::client::request;
use crate::job::JobInfo;
use crate::node::now_ms;
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;

#[derive(clap::Args)]
pub struct PsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn fetch() -> anyhow::Result<Vec<JobInfo>> {
    let ClientResponse::Jobs(jobs) = block_on(request(ClientRequest::Ps))? else {
        bail!("krgd answered with something unexpected")
    };
    Ok(jobs)
}

pub fn run(args: PsArgs) -> anyhow::Result<i32> {
    let jobs = fetch()?;
    if args.json {
        let arr: Vec<serde_json::Value> = jobs.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&arr)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = jobs.iter().map(to_row).collect();
    print!(
        "{}",
        table(
            &["GPID", "USER", "HOME", "NODE", "STATE", "TIME", "RSS", "ELAPSED", "COMMAND"],
            &rows
        )
    );
    Ok(0)
}

fn to_json(j: &JobInfo) -> serde_json::Value {
    serde_json::json!({
        "gpid": j.gpid.to_string(),
        "gpid_raw": j.gpid.raw(),
        "user": j.user,
        "uid": j.uid,
        "home": j.home.get(),
        "node": j.node.map(|n| n.get()),
        "state": j.state.as_str(),
        "cpu_seconds": j.cpu_ns as f64 / 1e9,
        "rss": j.rss_bytes,
        "elapsed_seconds": now_ms().saturating_sub(j.started_ms) as f64 / 1000.0,
        "started_ms": j.started_ms,
        "cmd": j.command,
    })
}

/// `[[hh:]mm:]ss` as ps prints times.
pub fn clock(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m:02}:{s:02}")
    }
}

fn to_row(j: &JobInfo) -> Vec<String> {
    vec![
        j.gpid.to_string(),
        j.user.clone(),
        j.home.to_string(),
        j.node.map_or_else(|| "-".into(), |n| n.to_string()),
        j.state.as_str().to_string(),
        clock(j.cpu_ns / 1_000_000_000),
        bytes(j.rss_bytes),
        clock(now_ms().saturating_sub(j.started_ms) / 1000),
        j.command.clone(),
    ]
}
