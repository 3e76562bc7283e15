//! `krg logs GPID [-f]`: the output of a detached job.

use super::block_on;
use crate::api::client::request;
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;
use krg_types::Gpid;
use std::io::Write;
use std::time::Duration;

/// Pause between polls of a growing log with -f.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The job, by its gpid as `krg ps` shows it.
    pub gpid: Gpid,
    /// Keep printing as the job writes, until it ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
}

pub fn run(args: LogsArgs) -> anyhow::Result<i32> {
    let mut offset = 0u64;
    let mut out = std::io::stdout();
    loop {
        let resp = block_on(request(ClientRequest::Logs {
            gpid: args.gpid,
            offset,
        }))?;
        let ClientResponse::Log { data, done } = resp else {
            bail!("krgd answered with something unexpected")
        };
        out.write_all(&data)?;
        out.flush()?;
        offset += data.len() as u64;
        if done || (data.is_empty() && !args.follow) {
            return Ok(0);
        }
        if data.is_empty() {
            std::thread::sleep(FOLLOW_POLL);
        }
    }
}
