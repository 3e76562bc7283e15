//! `krg shell`: an interactive shell that is itself a krg job, so that all
//! it runs is in the single system image.

use super::run::RunArgs;
use std::ffi::OsString;

#[derive(clap::Args)]
pub struct ShellArgs {
    /// Run the shell on this node.
    #[arg(long, short = 'n', value_name = "NODE")]
    pub node: Option<krg_types::NodeId>,
    /// Capabilities for the shell's job: +DISTANT_FORK spreads what it runs.
    #[arg(long = "cap", value_name = "+CAP|-CAP", allow_hyphen_values = true)]
    pub caps: Vec<String>,
}

pub fn run(args: ShellArgs) -> anyhow::Result<i32> {
    let shell = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.shell.into_os_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var_os("SHELL"))
        .unwrap_or_else(|| OsString::from("/bin/sh"));
    super::run::run(RunArgs {
        node: args.node,
        nodes: vec![],
        tty: false,
        no_tty: false,
        no_stdin: false,
        detach: false,
        caps: args.caps,
        no_migrate: false,
        local_view: false,
        distant_exec: false,
        argv0: None,
        command: vec![shell, OsString::from("-i")],
    })
}
