//! `krg lab demo`: krg at work on a lab cluster, step by step.
//!
//! Each step says in one line what it shows, prints the command a person
//! would type, runs exactly that command (this very `krg` binary, as a child
//! process) and prints its real output. Watching steps poll a node and print
//! its `krg nodes` table each time the watched node's state changes. The lab
//! stays up afterwards, for the reader to try more (`krg lab down` removes
//! it).
//!
//! Features add their steps to [`steps`], in the order a person would meet
//! them (`krg migrate` is next).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use super::names::DEFAULT_NAME;
use super::procs::output_with_timeout;
use super::{wait_until, Lab};

/// A `krg` command of the demo may run this long (`krg lab up` waits up to
/// its own 30 s timeout for the cluster).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a watching step waits for the state it expects.
const WATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait, after `up`, for every node's load to reach node 1.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
const WATCH_POLL: Duration = Duration::from_millis(100);

/// What a step does.
enum Action {
    /// Run `krg` with these arguments and print its output.
    Krg(Vec<String>),
    /// Poll node `from` and print its `krg nodes` table whenever node `k`'s
    /// state changes, until it is `until`.
    Watch {
        from: u32,
        k: u32,
        until: &'static str,
    },
}

struct Step {
    /// What the step shows, as a title.
    title: String,
    /// One line of explanation.
    why: String,
    action: Action,
}

/// The demo for a lab of `nodes` nodes named `name`, in order.
fn steps(nodes: u32, name: &str) -> Vec<Step> {
    let last = nodes;
    // `krg lab VERB K`, with `--name X` only when the lab is not the default one.
    let lab = |verb: &str, k: u32| {
        let mut args = vec!["lab".to_string(), verb.to_string(), k.to_string()];
        if name != DEFAULT_NAME {
            args.extend(["--name".to_string(), name.to_string()]);
        }
        args
    };
    let on = |k: u32, cmd: &[&str]| {
        let mut args = lab("exec", k);
        args.push("--".into());
        args.push("krg".into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        args
    };
    let mut up = vec![
        "lab".into(),
        "up".into(),
        "--nodes".into(),
        nodes.to_string(),
    ];
    if name != DEFAULT_NAME {
        up.extend(["--name".to_string(), name.to_string()]);
    }
    vec![
        Step {
            title: format!("Make a cluster of {nodes} nodes on this machine"),
            why: "Each node is a network namespace with its own address, host name, state \
                  directory and krgd; node 1 creates the cluster, the others join it with \
                  a one-time token."
                .into(),
            action: Action::Krg(up),
        },
        Step {
            title: "Ask any node how the cluster is".into(),
            why: "`krg lab exec K -- CMD` runs CMD as if logged in on node K; krg talks to \
                  that node's krgd, which knows the whole cluster."
                .into(),
            action: Action::Krg(on(1, &["cluster", "status"])),
        },
        Step {
            title: "List the nodes".into(),
            why: "Every node sees every member: its address, state, CPUs, load and memory \
                  (gossiped about once a second); * marks the raft voters."
                .into(),
            action: Action::Krg(on(2, &["nodes"])),
        },
        Step {
            title: "Run a program on another node".into(),
            why: "`krg run` starts it on the node chosen (`--node`, else the scheduler \
                  picks one); its output, signals and exit status come back as if it ran \
                  here."
                .into(),
            action: Action::Krg(on(1, &["run", "--node", "2", "--", "hostname"])),
        },
        Step {
            title: "Start a job in the background".into(),
            why: "`krg run --detach` prints the job's cluster-wide id (gpid, \
                  home node:sequence) and returns; the job keeps running on node 2."
                .into(),
            action: Action::Krg(on(
                1,
                &["run", "--detach", "--node", "2", "--", "sleep", "3600"],
            )),
        },
        Step {
            title: format!("List the cluster's jobs from node {last}"),
            why: "`krg ps` shows every job of the cluster, wherever it runs.".into(),
            action: Action::Krg(on(last, &["ps"])),
        },
        Step {
            title: "Move the running job to node 1".into(),
            why: "CRIU freezes it on node 2 and restores it on node 1; its memory follows on \
                  demand (post-copy), its gpid, output and exit status stay. In a fresh lab \
                  node 1 numbered the two jobs above 1:1 and 1:2."
                .into(),
            action: Action::Krg(on(1, &["migrate", "1:2", "1"])),
        },
        Step {
            title: format!("See where it runs now, from node {last}"),
            why: "Same gpid, new node.".into(),
            action: Action::Krg(on(last, &["ps"])),
        },
        Step {
            title: "Look at the cluster from inside a job".into(),
            why: "Inside a job, nproc, /proc/cpuinfo and /proc/meminfo count every node's \
                  CPUs and memory: the cluster looks like one machine (here 3 nodes of this \
                  machine's CPUs)."
                .into(),
            action: Action::Krg(on(1, &["run", "--", "nproc"])),
        },
        Step {
            title: format!("Crash node {last}"),
            why: format!(
                "`krg lab kill {last}` kills node {last}'s krgd and everything it runs, \
                 as if the machine had died."
            ),
            action: Action::Krg(lab("kill", last)),
        },
        Step {
            title: format!("Watch node 1 notice that node {last} is gone"),
            why: format!(
                "After a second of silence node {last} is shown suspect; a few seconds \
                 later the raft leader declares it down in the replicated state."
            ),
            action: Action::Watch {
                from: 1,
                k: last,
                until: "down",
            },
        },
        Step {
            title: format!("Bring node {last} back"),
            why: "`krg lab start K` restarts its krgd on the same state directory: same \
                  node id, same certificate, no new join."
                .into(),
            action: Action::Krg(lab("start", last)),
        },
        Step {
            title: format!("Watch node {last} come back up"),
            why: "It is up again as soon as the others hear from it.".into(),
            action: Action::Watch {
                from: 1,
                k: last,
                until: "up",
            },
        },
        Step {
            title: format!("Ask node {last} itself"),
            why: "It kept its identity and membership across the crash.".into(),
            action: Action::Krg(on(last, &["cluster", "status"])),
        },
    ]
}

/// Run the demo on a new lab of `nodes` nodes named `name`; the lab stays up.
pub fn run(nodes: u32, name: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("krg lab demo: run it as root (a lab is made of network namespaces and cgroups)");
    }
    if nodes < 2 {
        bail!("krg lab demo: it needs at least 2 nodes (it crashes one and watches another)");
    }
    let krg = std::env::current_exe().context("krg lab demo: cannot find this krg executable")?;
    let steps = steps(nodes, name);
    println!(
        "krg lab demo: a {nodes}-node krg cluster on this machine, in {} steps.",
        steps.len()
    );
    let mut demo = Demo {
        krg,
        name: name.to_string(),
        last: None,
    };
    for (i, step) in steps.iter().enumerate() {
        println!("\n[{}/{}] {}", i + 1, steps.len(), step.title);
        println!("      {}", step.why);
        demo.run_step(step).map_err(|e| {
            anyhow!(
                "{e:#}\nkrg lab demo: step {} failed; the lab is left as it is (`krg lab \
                 status{}` shows it, `krg lab down{}` removes it)",
                i + 1,
                demo.name_arg(),
                demo.name_arg()
            )
        })?;
        if i == 0 {
            demo.wait_for_loads(nodes)?;
        }
    }
    println!(
        "\nThe lab is still running. Try `krg lab exec 2{0} -- krg nodes`, `krg lab status{0}`,\n\
         `krg lab exec 1{0} -- bash` (a shell on node 1). Remove it with `krg lab down{0}`.",
        demo.name_arg()
    );
    Ok(())
}

struct Demo {
    krg: PathBuf,
    name: String,
    /// The last command run and when it ended (watching steps count from it).
    last: Option<(String, Instant)>,
}

impl Demo {
    fn name_arg(&self) -> String {
        if self.name == DEFAULT_NAME {
            String::new()
        } else {
            format!(" --name {}", self.name)
        }
    }

    fn run_step(&mut self, step: &Step) -> Result<()> {
        match &step.action {
            Action::Krg(args) => {
                let shown = format!("krg {}", args.join(" "));
                println!("  $ {shown}");
                let output = self.krg(args)?;
                if !output.status.success() {
                    bail!("krg lab demo: `{shown}` failed ({})", output.status);
                }
                self.last = Some((shown, Instant::now()));
                Ok(())
            }
            Action::Watch { from, k, until } => self.watch(*from, *k, until),
        }
    }

    /// Run this `krg` with `args`, printing its output indented (stderr,
    /// the lab's progress lines, then stdout).
    fn krg(&self, args: &[String]) -> Result<std::process::Output> {
        let mut command = std::process::Command::new(&self.krg);
        command.args(args);
        let output = output_with_timeout(command, COMMAND_TIMEOUT)?;
        for text in [&output.stderr, &output.stdout] {
            for line in String::from_utf8_lossy(text).lines() {
                println!("    {line}");
            }
        }
        Ok(output)
    }

    /// After `up`, wait (quietly) until node 1 knows every node's load, so
    /// that the listing shows them.
    fn wait_for_loads(&self, nodes: u32) -> Result<()> {
        let lab = Lab::open(&self.name)?;
        wait_until(LOAD_TIMEOUT, "every node's load to reach node 1", || {
            let list = lab.nodes_json(1)?;
            let known = list
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|n| n["cpus"].as_u64().unwrap_or(0) > 0)
                        .count()
                })
                .unwrap_or(0);
            if known == nodes as usize {
                Ok(())
            } else {
                Err(anyhow!("{known} of {nodes} loads known"))
            }
        })
        .map(|_| ())
    }

    /// Print node `from`'s `krg nodes` each time node `k`'s state changes,
    /// until it is `until`.
    fn watch(&mut self, from: u32, k: u32, until: &str) -> Result<()> {
        let lab = Lab::open(&self.name)?;
        let addr = lab.listen_addr(k)?.to_string();
        let (since_what, since) = self
            .last
            .clone()
            .unwrap_or_else(|| ("the watch began".to_string(), Instant::now()));
        let table = vec![
            "lab".to_string(),
            "exec".to_string(),
            from.to_string(),
            "--name".to_string(),
            self.name.clone(),
            "--".to_string(),
            "krg".to_string(),
            "nodes".to_string(),
        ];
        println!(
            "  $ krg lab exec {from}{} -- krg nodes   (every {} ms; shown when node {k} changes)",
            self.name_arg(),
            WATCH_POLL.as_millis()
        );
        let deadline = Instant::now() + WATCH_TIMEOUT;
        let mut shown: Option<String> = None;
        loop {
            let state = lab.nodes_json(from).ok().and_then(|nodes| {
                nodes.as_array().and_then(|list| {
                    list.iter()
                        .find(|n| n["addr"] == addr.as_str())
                        .and_then(|n| n["state"].as_str().map(str::to_string))
                })
            });
            if let Some(state) = state {
                if shown.as_deref() != Some(state.as_str()) {
                    println!(
                        "    {:.1} s after `{since_what}`: node {k} is {state}",
                        since.elapsed().as_secs_f64()
                    );
                    let output = self.krg(&table)?;
                    if !output.status.success() {
                        bail!(
                            "krg lab demo: `krg nodes` on node {from} failed ({})",
                            output.status
                        );
                    }
                    if state == until {
                        return Ok(());
                    }
                    shown = Some(state);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "krg lab demo: node {k} is still {} after {} s, not {until}",
                    shown.as_deref().unwrap_or("unknown"),
                    WATCH_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(WATCH_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Krg(args) => Some(args.join(" ")),
                Action::Watch { .. } => None,
            })
            .collect()
    }

    #[test]
    fn default_lab_commands_are_the_ones_a_person_types() {
        let steps = steps(3, DEFAULT_NAME);
        assert_eq!(
            commands(&steps),
            [
                "lab up --nodes 3",
                "lab exec 1 -- krg cluster status",
                "lab exec 2 -- krg nodes",
                "lab exec 1 -- krg run --node 2 -- hostname",
                "lab exec 1 -- krg run --detach --node 2 -- sleep 3600",
                "lab exec 3 -- krg ps",
                "lab exec 1 -- krg migrate 1:2 1",
                "lab exec 3 -- krg ps",
                "lab exec 1 -- krg run -- nproc",
                "lab kill 3",
                "lab start 3",
                "lab exec 3 -- krg cluster status",
            ]
        );
        assert!(steps
            .iter()
            .all(|s| !s.title.is_empty() && !s.why.is_empty()));
    }

    #[test]
    fn a_named_lab_is_named_in_every_command() {
        let steps = steps(4, "demo2");
        for command in commands(&steps) {
            assert!(command.contains("--name demo2"), "{command}");
        }
        assert!(commands(&steps).contains(&"lab kill 4 --name demo2".to_string()));
    }
}
