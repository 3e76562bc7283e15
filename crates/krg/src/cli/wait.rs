//! `krg wait GPID`: wait for a job and exit with its status.

use super::block_on;
use crate::api::client::request;
use crate::wire::client::{ClientRequest, ClientResponse};
use crate::wire::peer::WaitResult;
use anyhow::bail;
use krg_types::Gpid;

#[derive(clap::Args)]
pub struct WaitArgs {
    /// The job, by its gpid as `krg ps` shows it.
    pub gpid: Gpid,
}

pub fn run(args: WaitArgs) -> anyhow::Result<i32> {
    let ClientResponse::Waited(w) = block_on(request(ClientRequest::Wait { gpid: args.gpid }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    Ok(match w {
        WaitResult::Exited(s) => s.shell_code(),
        WaitResult::Lost(node) => {
            eprintln!("krg: node {node} went down while running job {}", args.gpid);
            255
        }
        WaitResult::Running => bail!("job {} is still running", args.gpid),
    })
}
