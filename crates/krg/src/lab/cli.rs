//! `krg lab ...`: the command-line face of the lab (see the module above).

use std::io::ErrorKind;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::names::DEFAULT_NAME;
use super::{down_all, down_by_name, Lab, LabOptions, LabStatus};

/// Exit status when the command to run cannot be found (as in a shell).
const EXIT_NOT_FOUND: i32 = 127;
/// Exit status when the command was found but could not be executed.
const EXIT_CANNOT_EXECUTE: i32 = 126;

#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Make a cluster of N nodes on this machine (namespaces, bridge, daemons).
    Up {
        /// How many nodes (1 to 64).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// The lab's name (a-z, 0-9, at most 12 characters).
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
        /// CPU limit of each node in CPUs, e.g. 0.25,0.5,1.0 (one value: every node).
        #[arg(long, value_delimiter = ',')]
        cpu_limits: Vec<f64>,
        /// How long to wait for every node to be up.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The krgd binary (default: next to this krg, else on PATH).
        #[arg(long)]
        krgd: Option<PathBuf>,
        /// The krg binary run inside the nodes (default: next to this krg, else on PATH).
        #[arg(long)]
        krg: Option<PathBuf>,
        /// Make only the network and cgroups, start no daemon.
        #[arg(long)]
        no_daemons: bool,
    },
    /// Remove a lab: its processes, namespaces, links, cgroups, mounts and files.
    Down {
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
        /// Remove every lab on this machine.
        #[arg(long)]
        all: bool,
    },
    /// Run a command on node K (its namespaces, cgroup and KRG_SOCKET).
    Exec {
        /// The node (1 to N).
        k: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        cmd: Vec<String>,
    },
    /// Crash node K: kill its krgd and everything running on it.
    Kill {
        k: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Restart node K's krgd on its state directory.
    Start {
        k: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Cut node K off the network.
    Cut {
        k: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Reconnect node K to the network.
    Heal {
        k: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Show krg at work, step by step, on a new lab (left running afterwards).
    Demo {
        /// How many nodes (at least 2).
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Show the lab's nodes, addresses, daemons and links.
    Status {
        #[arg(long, env = "KRG_LAB", default_value = DEFAULT_NAME)]
        name: String,
        #[arg(long)]
        json: bool,
    },
}

/// Run a `krg lab` command; returns the exit status.
pub fn run(command: LabCommand) -> Result<i32> {
    match command {
        LabCommand::Up {
            nodes,
            name,
            cpu_limits,
            timeout,
            krgd,
            krg,
            no_daemons,
        } => {
            let started = Instant::now();
            let options = LabOptions {
                name,
                nodes,
                cpu_limits,
                timeout,
                start_daemons: !no_daemons,
                krgd,
                krg,
                ..LabOptions::default()
            };
            let lab = Lab::up(options)?;
            lab.keep();
            let what = if no_daemons {
                "made (no daemons)"
            } else {
                "up"
            };
            println!(
                "krg lab: lab {} with {} nodes {what} in {:.1} s ({})",
                lab.name(),
                lab.nodes(),
                started.elapsed().as_secs_f64(),
                super::names::subnet(lab.index())
            );
            Ok(0)
        }
        LabCommand::Down { name, all } => {
            if all {
                let removed = down_all()?;
                println!(
                    "krg lab: removed {} lab(s){}",
                    removed.len(),
                    list_suffix(&removed)
                );
            } else {
                let existed = super::list().contains(&name);
                down_by_name(&name)?;
                if existed {
                    println!("krg lab: removed lab {name}");
                } else {
                    println!("krg lab: there is no lab named {name} (nothing to remove)");
                }
            }
            Ok(0)
        }
        LabCommand::Exec { k, name, cmd } => {
            let lab = Lab::open(&name)?;
            let error = match lab.exec(k, &cmd) {
                Ok(never) => match never {},
                Err(error) => error,
            };
            let Some(io) = error.downcast_ref::<std::io::Error>() else {
                return Err(error);
            };
            let code = if io.kind() == ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_EXECUTE
            };
            eprintln!("{error:#}");
            Ok(code)
        }
        LabCommand::Kill { k, name } => {
            Lab::open(&name)?.kill(k)?;
            println!("krg lab: node {k} killed");
            Ok(0)
        }
        LabCommand::Start { k, name } => {
            let pid = Lab::open(&name)?.start(k)?;
            println!("krg lab: node {k} started (krgd pid {pid})");
            Ok(0)
        }
        LabCommand::Cut { k, name } => {
            Lab::open(&name)?.cut(k)?;
            println!("krg lab: node {k} cut off");
            Ok(0)
        }
        LabCommand::Heal { k, name } => {
            Lab::open(&name)?.heal(k)?;
            println!("krg lab: node {k} reconnected");
            Ok(0)
        }
        LabCommand::Demo { nodes, name } => {
            super::demo::run(nodes, &name)?;
            Ok(0)
        }
        LabCommand::Status { name, json } => {
            let status = Lab::open(&name)?.status()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).expect("a status always serializes")
                );
            } else {
                print!("{}", render(&status));
            }
            Ok(0)
        }
    }
}

fn list_suffix(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(": {}", names.join(", "))
    }
}

/// The status as a table.
fn render(status: &LabStatus) -> String {
    let mut out = format!(
        "lab {} (index {}, {}, {} nodes, files in {})\n",
        status.name,
        status.index,
        status.subnet,
        status.nodes.len(),
        status.dir.display()
    );
    out.push_str(&format!(
        "each node's own directory: {}\n",
        status.local_dir.display()
    ));
    out.push_str("node  address          host         krgd pid  daemon  link\n");
    for node in &status.nodes {
        let pid = node
            .pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".to_string());
        let daemon = if node.alive { "alive" } else { "dead" };
        let link = if node.cut { "cut" } else { "up" };
        out.push_str(&format!(
            "{:<5} {:<16} {:<12} {:<9} {:<7} {}\n",
            node.k, node.addr, node.hostname, pid, daemon, link
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Top {
        #[command(subcommand)]
        lab: LabCommand,
    }

    #[test]
    fn exec_takes_the_command_after_the_node() {
        let top = Top::try_parse_from(["krg", "exec", "2", "--name", "x1", "--", "ls", "-l", "/"])
            .expect("parses");
        match top.lab {
            LabCommand::Exec { k, name, cmd } => {
                assert_eq!(k, 2);
                assert_eq!(name, "x1");
                assert_eq!(cmd, ["ls", "-l", "/"]);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn up_takes_cpu_limits() {
        let top = Top::try_parse_from([
            "krg",
            "up",
            "--nodes",
            "3",
            "--cpu-limits",
            "0.25,0.5,1.0",
            "--timeout",
            "10s",
        ])
        .expect("parses");
        match top.lab {
            LabCommand::Up {
                nodes,
                cpu_limits,
                timeout,
                ..
            } => {
                assert_eq!(nodes, 3);
                assert_eq!(cpu_limits, [0.25, 0.5, 1.0]);
                assert_eq!(timeout, Duration::from_secs(10));
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}
