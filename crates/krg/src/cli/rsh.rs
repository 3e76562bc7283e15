//! `krg rsh NODE CMD...` (also `krg-rsh`): rsh/ssh for programs that launch
//! remote commands, such as MPI launchers. The words are joined and run by
//! the user's shell on that node, as `ssh host cmd` does.

use super::block_on;
use super::deputy::{deputy, Outcome};
use super::run::{request, shell_command, RunArgs};
use crate::api::client::request as ask;
use crate::wire::client::{ClientRequest, ClientResponse};
use anyhow::bail;
use krg_types::NodeId;
use std::ffi::OsString;

#[derive(clap::Args)]
pub struct RshArgs {
    /// Accepted for compatibility with ssh/rsh, and ignored: -x -X -T -q -4 -6 -A -a -C.
    #[arg(short = 'x', action = clap::ArgAction::Count, hide = true)]
    pub no_x11: u8,
    #[arg(short = 'X', action = clap::ArgAction::Count, hide = true)]
    pub x11: u8,
    #[arg(short = 'q', action = clap::ArgAction::Count, hide = true)]
    pub quiet: u8,
    #[arg(short = 'T', action = clap::ArgAction::Count, hide = true)]
    pub no_tty: u8,
    #[arg(short = 'o', hide = true, value_name = "OPTION")]
    pub options: Vec<String>,
    #[arg(short = 'p', hide = true, value_name = "PORT")]
    pub port: Option<String>,
    /// The remote user: only yourself is allowed.
    #[arg(short = 'l', value_name = "USER")]
    pub login: Option<String>,
    /// Give the command a pseudo-terminal.
    #[arg(short = 't')]
    pub tty: bool,
    /// Read stdin from /dev/null.
    #[arg(short = 'n')]
    pub no_stdin: bool,
    /// A node id, or a node's host name or address as `krg nodes` shows it.
    pub node: String,
    /// The command (joined with spaces and run by your shell there).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<OsString>,
}

/// A node id from an id, a host name or an address (with or without port).
pub fn resolve_node(name: &str) -> anyhow::Result<NodeId> {
    if let Ok(id) = name.parse::<NodeId>() {
        return Ok(id);
    }
    let ClientResponse::Nodes(nodes) = block_on(ask(ClientRequest::Nodes))? else {
        bail!("krgd answered with something unexpected")
    };
    for n in &nodes {
        let host = n.load.as_ref().map(|l| l.hostname.as_str()).unwrap_or("");
        let ip = n
            .addr
            .rsplit_once(':')
            .map_or(n.addr.as_str(), |(ip, _)| ip);
        if name == host || name == n.hostname || name == n.addr || name == ip {
            return Ok(n.id);
        }
    }
    bail!("{name}: no such node (give a node id, host name or address from `krg nodes`)")
}

pub fn run(args: RshArgs) -> anyhow::Result<i32> {
    if let Some(user) = &args.login {
        let me = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten();
        if me.as_ref().is_none_or(|u| &u.name != user) {
            bail!("krg rsh runs commands as yourself only; -l {user} is not supported");
        }
    }
    let node = resolve_node(&args.node)?;
    let run_args = RunArgs {
        node: Some(node),
        nodes: vec![],
        tty: args.tty,
        no_tty: !args.tty,
        no_stdin: args.no_stdin,
        detach: false,
        caps: vec![],
        no_migrate: false,
        local_view: false,
        distant_exec: false,
        argv0: None,
        command: shell_command(&args.command),
    };
    let req = request(&run_args)?;
    match deputy(req, args.no_stdin)? {
        Outcome::Exit(code) => std::process::exit(code),
        Outcome::Killed(sig) => std::process::exit(128 + sig),
        Outcome::RunHere { .. } => {
            bail!("krgd asked to run a remote shell command here")
        }
    }
}
