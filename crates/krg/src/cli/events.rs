//! `krg events` (and `krg sched log`): the cluster's automatic decisions
//! with their reasons.

use super::block_on;
use crate::api::client::request;
use crate::events::Event;
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;
use std::time::Duration;

#[derive(clap::Args)]
pub struct EventsArgs {
    /// Print JSON objects, one per line.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new events.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

fn fetch(since_ms: u64) -> anyhow::Result<Vec<Event>> {
    let ClientResponse::Events(ev) = block_on(request(ClientRequest::Events { since_ms }))? else {
        bail!("krgd answered with something unexpected")
    };
    Ok(ev)
}

fn show(e: &Event, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
    } else {
        let t = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(e.time_ms),
        );
        println!("{t}  node {:<3} {:<10} {}", e.node, e.kind, e.message);
    }
    Ok(())
}

pub fn run(args: EventsArgs) -> anyhow::Result<i32> {
    let mut since = 0;
    loop {
        for e in fetch(since)? {
            since = since.max(e.time_ms);
            show(&e, args.json)?;
        }
        if !args.follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
