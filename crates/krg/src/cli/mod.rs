//! The `krg` command line: one file per subcommand.

pub mod cluster;
pub mod doctor;
pub mod nodes;
pub mod output;

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
    /// This machine as a node: join a cluster.
    #[command(subcommand)]
    Node(cluster::NodeCommand),
    /// What this node can do (CRIU, lazy pages, userfaultfd, FUSE, cgroups).
    Doctor(doctor::DoctorArgs),
    /// A cluster of network namespaces on this machine, for trying krg and for tests.
    #[command(subcommand)]
    Lab(crate::lab::cli::LabCommand),
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Cluster(c) => cluster::run(c),
        Command::Nodes(a) => nodes::run(a),
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
