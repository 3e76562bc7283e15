//! The `krg` command line: one file per subcommand.

pub mod capset;
pub mod cluster;
pub mod deputy;
pub mod doctor;
pub mod events;
pub mod kill;
pub mod logs;
pub mod migrate;
pub mod nodes;
pub mod output;
pub mod ps;
pub mod rsh;
pub mod run;
pub mod sched;
pub mod shell;
pub mod top;
pub mod wait;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "krg",
    version,
    about = "krg: run programs on a cluster of Linux machines as if it were one machine",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// The cluster as a whole: status, identity, join tokens.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// List the cluster's nodes with their state and load.
    Nodes(nodes::NodesArgs),
    /// Run a program on the cluster, with its stdio, signals and exit status as if local.
    Run(run::RunArgs),
    /// List every job of the cluster.
    Ps(ps::PsArgs),
    /// Send a signal to jobs, wherever they run.
    Kill(kill::KillArgs),
    /// Wait for a job to end and exit with its status.
    Wait(wait::WaitArgs),
    /// Print the output of a detached job.
    Logs(logs::LogsArgs),
    /// Run a command on a node through your shell, as rsh/ssh do (also installed as krg-rsh).
    Rsh(rsh::RshArgs),
    /// The global scheduler's policies: show, set, log.
    #[command(subcommand)]
    Sched(sched::SchedCommand),
    /// The whole cluster live: nodes, jobs, migrations (q to quit; --once for a snapshot).
    Top(top::TopArgs),
    /// The cluster's automatic decisions and their reasons.
    Events(events::EventsArgs),
    /// Show or change a job's capabilities (CAN_MIGRATE, DISTANT_FORK, ...).
    Capset(capset::CapsetArgs),
    /// An interactive shell that is itself a krg job (--cap +DISTANT_FORK spreads what it runs).
    Shell(shell::ShellArgs),
    /// Move a running job to another node; its streams and gpid stay.
    Migrate(migrate::MigrateArgs),
    /// Save a running job as a new image version.
    Checkpoint(migrate::CheckpointArgs),
    /// Bring a job back from an image, on any node.
    Restart(migrate::RestartArgs),
    /// List (or remove) jobs' images.
    Images(migrate::ImagesArgs),
    /// This machine as a node: join a cluster.
    #[command(subcommand)]
    Node(cluster::NodeCommand),
    /// What this node can do (CRIU, lazy pages, userfaultfd, FUSE, cgroups).
    Doctor(doctor::DoctorArgs),
    /// A cluster of network namespaces on this machine, for trying krg and for tests.
    #[command(subcommand)]
    Lab(crate::lab::cli::LabCommand),
}

/// `krg run` on its own. clap builds the whole command tree for any
/// parse; `krg run` is the command started most often, by scripts and by
/// distant exec at every exec of a job's children, so it parses its own
/// arguments only.
#[derive(Parser)]
#[command(
    name = "krg-run",
    bin_name = "krg run",
    version,
    about = "Run a program on the cluster, with its stdio, signals and exit status as if local."
)]
struct RunOnly {
    #[command(flatten)]
    args: run::RunArgs,
}

impl Cli {
    /// The command line `argv` (with the program's name first).
    pub fn parse_argv(argv: Vec<std::ffi::OsString>) -> Cli {
        if argv.get(1).is_some_and(|a| a == "run") {
            let only = RunOnly::parse_from(argv.into_iter().skip(1));
            return Cli {
                command: Command::Run(only.args),
            };
        }
        Cli::parse_from(argv)
    }
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Cluster(c) => cluster::run(c),
        Command::Nodes(a) => nodes::run(a),
        Command::Run(a) => run::run(a),
        Command::Ps(a) => ps::run(a),
        Command::Kill(a) => kill::run(a),
        Command::Wait(a) => wait::run(a),
        Command::Logs(a) => logs::run(a),
        Command::Rsh(a) => rsh::run(a),
        Command::Sched(c) => sched::run(c),
        Command::Events(a) => events::run(a),
        Command::Top(a) => top::run(a),
        Command::Capset(a) => capset::run(a),
        Command::Migrate(a) => migrate::migrate(a),
        Command::Checkpoint(a) => migrate::checkpoint(a),
        Command::Restart(a) => migrate::restart(a),
        Command::Images(a) => migrate::images(a),
        Command::Shell(a) => shell::run(a),
        Command::Node(c) => cluster::run_node(c),
        Command::Doctor(a) => doctor::run(a),
        Command::Lab(c) => crate::lab::cli::run(c),
    }
}

/// A small runtime for one client request.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can always be built")
        .block_on(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &[&str]) -> Vec<std::ffi::OsString> {
        line.iter().map(Into::into).collect()
    }

    /// `krg run`'s own parser reads every command line as the whole
    /// command tree does.
    #[test]
    fn run_alone_parses_as_the_whole_tree() {
        let lines: [&[&str]; 4] = [
            &["krg", "run", "true"],
            &[
                "krg", "run", "--node", "2", "-T", "--", "sh", "-c", "echo $0", "-x",
            ],
            &[
                "krg",
                "run",
                "-d",
                "--cap",
                "+DISTANT_FORK",
                "--cap",
                "-CAN_MIGRATE",
                "make",
                "-j4",
            ],
            &[
                "krg",
                "run",
                "--no-stdin",
                "--local-view",
                "--no-migrate",
                "-t",
                "ls",
                "-l",
            ],
        ];
        for line in lines {
            let whole = match Cli::parse_from(words(line)).command {
                Command::Run(a) => format!("{a:?}"),
                _ => panic!("not run: {line:?}"),
            };
            let alone = match Cli::parse_argv(words(line)).command {
                Command::Run(a) => format!("{a:?}"),
                _ => panic!("not run: {line:?}"),
            };
            assert_eq!(alone, whole, "{line:?}");
        }
        let bad = ["krg", "run", "--node", "not-a-node", "true"];
        let alone = RunOnly::try_parse_from(words(&bad[1..]))
            .err()
            .expect("a bad node is refused")
            .to_string();
        let whole = Cli::try_parse_from(words(&bad))
            .err()
            .expect("a bad node is refused")
            .to_string();
        assert_eq!(alone, whole);
    }
}
