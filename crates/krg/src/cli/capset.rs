//! `krg capset`: a job's capabilities (as Kerrighed's krgcapset).

use super::block_on;
use crate::api::client::request;
use crate::job::caps::{CapChange, Which};
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;
use krg_types::Gpid;

#[derive(clap::Args)]
pub struct CapsetArgs {
    /// The job (default: the job this command runs in).
    #[arg(short = 'k', long = "gpid", value_name = "GPID")]
    pub gpid: Option<Gpid>,
    /// Change the effective set (the default).
    #[arg(short = 'e', group = "set")]
    pub effective: bool,
    /// Change the permitted set (raising needs root).
    #[arg(short = 'p', group = "set")]
    pub permitted: bool,
    /// Change the inheritable effective set (what jobs started from it get).
    #[arg(short = 'd', group = "set")]
    pub inheritable_effective: bool,
    /// Change the inheritable permitted set.
    #[arg(short = 'i', group = "set")]
    pub inheritable_permitted: bool,
    /// Show the capabilities.
    #[arg(short = 's', long)]
    pub show: bool,
    /// +CAP or -CAP: CAN_MIGRATE, DISTANT_FORK, CHECKPOINTABLE, SEE_LOCAL_PROC_STAT.
    #[arg(allow_hyphen_values = true, value_name = "+CAP|-CAP")]
    pub changes: Vec<String>,
}

pub fn run(args: CapsetArgs) -> anyhow::Result<i32> {
    let which = if args.permitted {
        Which::Permitted
    } else if args.inheritable_effective {
        Which::InheritableEffective
    } else if args.inheritable_permitted {
        Which::InheritablePermitted
    } else {
        Which::Effective
    };
    if args.changes.is_empty() && !args.show {
        bail!("nothing to do: give +CAP or -CAP, or -s to show");
    }
    let changes = args
        .changes
        .iter()
        .map(|c| CapChange::parse(which, c))
        .collect::<Result<Vec<_>, _>>()?;
    let ClientResponse::Caps { gpid, caps } = block_on(request(ClientRequest::Caps {
        gpid: args.gpid,
        changes,
    }))?
    else {
        bail!("krgd answered with something unexpected")
    };
    if args.show || args.changes.is_empty() {
        println!("job {gpid}");
        println!("{caps}");
    }
    Ok(0)
}
