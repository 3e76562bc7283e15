//! The virtual SMP (issue 6), for real on a 3-node lab cluster: inside a
//! job the cluster looks like one machine (`nproc`, `getconf`, Python's
//! `os.cpu_count()`, `free`), and follows nodes going down and up; with
//! DISTANT_FORK an unmodified `make -j6` compiles on every node, fails and
//! stops (Ctrl-C) as it would locally; without it everything stays on the
//! job's node; `krg capset` shows and changes capabilities, and only root
//! raises a permitted set.
//!
//! Each test makes its own lab (unique name `v<pid>x<n>`) with the `krgd`,
//! `krg` and `krg-init` built with this test, and `libkrg_preload.so` from
//! the same target directory (built by `cargo build --workspace`; krgd
//! finds it next to itself). Tests are named `lab_vsmp_*` so that
//! nextest's `lab` group runs them one at a time. Without root they are
//! skipped with a reason, unless `KRG_REQUIRE_LAB=1` makes that a failure.
//! The makefile the builds use is `tests/workloads/vsmp.mk`.
//!
//! Lab nodes are namespaces on one machine: every node has this machine's
//! CPUs and memory, so a 3-node lab shows 3 times both, and the nodes
//! share one file system (a build directory is seen by every node).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::{Duration, Instant};

use common::{
    krg_as_nobody, krg_cmd, ok_within, output_of, processes, show, stderr, stdout, step, workload,
    Input, Running, Scratch, KRGD, WAIT,
};
use krg::lab::{self, Lab};
use serde_json::Value;

/// How long the cluster may take to notice a node going down (it is
/// declared down after `--down-after`, 4 s) or coming back, and the view to
/// follow.
const VIEW_CHANGE_MAX: Duration = Duration::from_secs(12);
/// Longest a single command (a whole build included) may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How many C files the generated project has (besides main.c).
const PROJECT_FILES: u32 = 60;
/// The slow project of the Ctrl-C test: files, and functions per file (a
/// file then takes several seconds to compile at -O2 on this machine).
const SLOW_FILES: u32 = 12;
const SLOW_FUNCTIONS: u32 = 1500;
/// How GNU make ends on Ctrl-C: it dies of SIGINT (130) once its children
/// are reaped, unless it reaped a child killed by SIGINT before its own
/// handler ran, and then exits 2 (seen here locally, about 1 time in 3).
const INTERRUPTED_MAKE: [i32; 2] = [130, 2];
/// How long an interrupted build may take to end (a local one takes a
/// fraction of a second).
const INTERRUPT_END_MAX: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- the lab

/// A 3-node lab running this build's daemons, or `None` (skipped) without
/// root.
fn lab_up() -> Option<Lab> {
    if !lab::require_root_or_skip() {
        return None;
    }
    let preload = Path::new(KRGD).with_file_name("libkrg_preload.so");
    assert!(
        preload.is_file(),
        "{} is missing: jobs would not see the cluster (build it with `cargo build --workspace`)",
        preload.display()
    );
    Some(common::start_lab("v"))
}

/// A directory of its own under /tmp that every user can enter and write,
/// removed at the end.
fn new_scratch(tag: &str) -> Scratch {
    Scratch::new(&format!("vsmp-{tag}"), 0o777)
}

/// The makefile every build uses.
fn makefile() -> PathBuf {
    workload("vsmp.mk")
}

/// Node K's cluster view (`krgd --view-dir`, as the lab starts it).
fn view_dir(lab: &Lab, k: u32) -> PathBuf {
    lab.socket(k)
        .parent()
        .expect("a node's socket is in its directory")
        .join("view")
}

// --------------------------------------------------------- running things

/// Run `command` to its end (at most `RUN_TIMEOUT`, then it is killed and
/// the test fails). Its stdin is idle (see [`Input::Idle`]): `krg run` then
/// never sends an end of stdin that could race its job's end (the jobs' own
/// children get what their parents give them).
fn run(command: Command) -> Output {
    output_of(command, Input::Idle, RUN_TIMEOUT)
}

/// Stdout of a command that must succeed.
fn ok(command: Command) -> String {
    ok_within(command, RUN_TIMEOUT)
}

/// What a shell's `$?` would say: the code, or 128 + the signal.
fn shell_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => panic!("{status} is neither an exit nor a signal"),
    }
}

/// `sh -c SCRIPT` as a job started from node 1 with `krg run ARGS`.
fn job_sh(lab: &Lab, run_args: &[&str], script: &str) -> Command {
    let mut args = vec!["run"];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    krg_cmd(lab, 1, &args)
}

/// `krg ps --json` on node K.
fn ps(lab: &Lab, k: u32) -> Vec<Value> {
    let text = ok(krg_cmd(lab, k, &["ps", "--json"]));
    match serde_json::from_str(&text) {
        Ok(Value::Array(jobs)) => jobs,
        _ => panic!("`krg ps --json` on node {k} printed {text:?}"),
    }
}

/// Wait until no node lists a job (a job's record may outlive its deputy
/// by a moment).
fn wait_no_jobs(lab: &Lab) {
    lab::wait_until(WAIT, "no job left on any node", || {
        let jobs: Vec<Value> = (1..=3).flat_map(|k| ps(lab, k)).collect();
        if jobs.is_empty() {
            Ok(())
        } else {
            Err(format!("{jobs:?}"))
        }
    })
    .unwrap();
}

// -------------------------------------------------------- the cluster view

/// Each node's CPUs and memory as `krg nodes --json` says, by node id,
/// once every up node has reported them (a node's figures come with its
/// gossip: for a moment after it joins it shows 0 CPUs).
fn nodes_cpus_mem(lab: &Lab) -> BTreeMap<u64, (u64, u64)> {
    lab::wait_until(WAIT, "every node's CPUs and memory known", || {
        let nodes = lab.nodes_json(1)?;
        let mut figures = BTreeMap::new();
        for n in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
            let field = |name: &str| n[name].as_u64().unwrap_or(0);
            if n["state"] != "up" {
                continue;
            }
            if field("cpus") == 0 || field("mem_total") == 0 {
                anyhow::bail!("not yet: {n}");
            }
            figures.insert(field("id"), (field("cpus"), field("mem_total")));
        }
        Ok(figures)
    })
    .unwrap()
}

/// How many CPUs a list such as `0-5` or `0-3,6` names.
fn cpu_list_count(list: &str) -> u64 {
    list.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((low, high)) => {
                let low: u64 = low.parse().expect("a CPU number");
                let high: u64 = high.parse().expect("a CPU number");
                high - low + 1
            }
            None => 1,
        })
        .sum()
}

/// The `processor` lines of a cpuinfo text.
fn processors(cpuinfo: &str) -> u64 {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count() as u64
}

/// The `Mem:` total of `free -b`.
fn free_total(free: &str) -> u64 {
    free.lines()
        .find_map(|l| l.strip_prefix("Mem:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|total| total.parse().ok())
        .unwrap_or_else(|| panic!("no Mem: total in {free:?}"))
}

/// This machine's MemTotal in bytes.
fn host_mem_total() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").expect("reads /proc/meminfo");
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kib * 1024
}

fn host_nproc() -> u64 {
    let out = Command::new("nproc").output().expect("runs nproc");
    stdout(&out).trim().parse().expect("nproc prints a number")
}

/// How the view `view` disagrees with `nodes` (CPUs by node id) and their
/// sum `cpus`: `nodes/<id>/cpuinfo`, `cpu/online`, `cpuinfo`.
fn view_disagreement(view: &Path, nodes: &BTreeMap<u64, (u64, u64)>, cpus: u64) -> Option<String> {
    let read = |name: &str| fs::read_to_string(view.join(name)).unwrap_or_default();
    let mut wrong = Vec::new();
    for (id, (node_cpus, _)) in nodes {
        let seen = processors(&read(&format!("nodes/{id}/cpuinfo")));
        if seen != *node_cpus {
            wrong.push(format!(
                "nodes/{id}/cpuinfo has {seen} CPUs, not {node_cpus}"
            ));
        }
    }
    let online = read("cpu/online");
    if cpu_list_count(&online) != cpus {
        wrong.push(format!("cpu/online is {online:?}, not {cpus} CPUs"));
    }
    let seen = processors(&read("cpuinfo"));
    if seen != cpus {
        wrong.push(format!("cpuinfo has {seen} CPUs, not {cpus}"));
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// Debian's Python when there is one: a version manager's shim on PATH
/// would itself fork and exec (and so be spread by distant exec).
fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// What a job sees: `nproc`, `getconf _NPROCESSORS_ONLN`, Python's
/// `os.cpu_count()` (each on a line), then `free -b`.
fn see_script() -> String {
    format!(
        "nproc; getconf _NPROCESSORS_ONLN; {} -c 'import os;print(os.cpu_count())'; free -b",
        python3()
    )
}

/// The three CPU counts and the memory total a [`see_script`] job printed.
fn seen(out: &Output) -> ([u64; 3], u64) {
    assert!(out.status.success(), "the job failed: {}", show(out));
    let text = stdout(out);
    let counts: Vec<u64> = text
        .lines()
        .take(3)
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("not a count: {l:?} in {text:?}"))
        })
        .collect();
    assert_eq!(counts.len(), 3, "three counts in {text:?}");
    ([counts[0], counts[1], counts[2]], free_total(&text))
}

/// Goal: inside `krg run` the cluster is the machine: `nproc`, `getconf
/// _NPROCESSORS_ONLN` and Python's `os.cpu_count()` print the sum of the
/// nodes' CPUs, `free -b` their summed memory; with SEE_LOCAL_PROC_STAT or
/// `--local-view` the node's own. Method: the expected figures come from
/// `krg nodes --json` (cpus, mem_total), and each node's view must agree
/// (`nodes/<id>/cpuinfo` has that node's CPUs, `cpu/online` their sum);
/// a job on each node prints the counts and `free -b`; then jobs with
/// `--cap +SEE_LOCAL_PROC_STAT` and `--local-view` must print this
/// machine's `nproc` and MemTotal (every lab node is this machine).
#[test]
fn lab_vsmp_job_sees_the_cluster_cpus_and_memory() {
    let Some(lab) = lab_up() else { return };
    let nodes = nodes_cpus_mem(&lab);
    assert_eq!(nodes.len(), 3, "three nodes: {nodes:?}");
    let cpus: u64 = nodes.values().map(|(c, _)| c).sum();
    let mem: u64 = nodes.values().map(|(_, m)| m).sum();
    step(&format!(
        "the cluster: {cpus} CPUs, {mem} bytes ({nodes:?})"
    ));

    for k in 1..=3 {
        // The view refreshes its cache only while it is read: the first
        // reads may come before every node has answered.
        let started = Instant::now();
        lab::wait_until(WAIT, &format!("node {k}'s view to agree"), || {
            view_disagreement(&view_dir(&lab, k), &nodes, cpus).map_or(Ok(()), Err)
        })
        .unwrap();
        step(&format!(
            "node {k}'s view agrees with `krg nodes` ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }

    for k in ["1", "2", "3"] {
        step(&format!("a job on node {k}"));
        let out = run(job_sh(&lab, &["--node", k], &see_script()));
        let (counts, total) = seen(&out);
        assert_eq!(
            counts, [cpus; 3],
            "nproc, getconf, os.cpu_count() on node {k}"
        );
        let off = total.abs_diff(mem);
        assert!(
            off <= mem / 100,
            "free -b on node {k}: {total}, the nodes' sum {mem} (off by {off})"
        );
    }

    let local_cpus = host_nproc();
    let local_mem = host_mem_total();
    for opt_out in [
        &["--node", "2", "--cap", "+SEE_LOCAL_PROC_STAT"][..],
        &["--node", "2", "--local-view"][..],
    ] {
        step(&format!("a job with {opt_out:?}"));
        let out = run(job_sh(&lab, opt_out, &see_script()));
        let (counts, total) = seen(&out);
        assert_eq!(
            counts, [local_cpus; 3],
            "the node's own CPUs with {opt_out:?}"
        );
        assert_eq!(total, local_mem, "the node's own MemTotal with {opt_out:?}");
    }
}

/// Goal: the first job started once the cluster has formed already sees
/// every node (a `make -j"$(nproc)"` started then must not get one node's
/// count). Method: as soon as `Lab::up` returns (node 1 sees 3 nodes up),
/// a job on node 1 prints `nproc` and /sys/devices/system/cpu/online: the
/// sum of the nodes' CPUs (`krg nodes --json`, asked afterwards).
#[test]
fn lab_vsmp_first_job_after_the_cluster_forms_sees_every_node() {
    let Some(lab) = lab_up() else { return };
    let text = ok(job_sh(
        &lab,
        &["--node", "1"],
        "nproc; cat /sys/devices/system/cpu/online",
    ));
    let cpus: u64 = nodes_cpus_mem(&lab).values().map(|(c, _)| c).sum();
    let mut lines = text.lines();
    let nproc: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in {text:?}"));
    let online = lines.next().unwrap_or_default();
    assert_eq!(
        (nproc, cpu_list_count(online)),
        (cpus, cpus),
        "nproc and cpu/online ({online:?}) in the first job"
    );
}

/// Goal: the view follows the cluster: a node going down leaves it, and
/// comes back in it when it is up again. Method: `lab.kill(3)`; within
/// [`VIEW_CHANGE_MAX`] the `cpu/online` of nodes 1 and 2 must count nodes 1
/// and 2's CPUs only, and `nproc` in a new job on node 1 too; `lab.start(3)`;
/// within the same bound both are back to all three nodes' CPUs.
#[test]
fn lab_vsmp_view_follows_nodes_going_down_and_up() {
    let Some(lab) = lab_up() else { return };
    let nodes = nodes_cpus_mem(&lab);
    let all: u64 = nodes.values().map(|(c, _)| c).sum();
    let without_3 = all - nodes[&3].0;
    let nproc = |lab: &Lab| -> u64 {
        let text = ok(job_sh(lab, &["--node", "1"], "nproc"));
        text.trim().parse().expect("nproc prints a number")
    };
    let wait_online = |want: u64, what: &str| -> Duration {
        let started = Instant::now();
        lab::wait_until(VIEW_CHANGE_MAX, what, || {
            let counts: Vec<u64> = [1, 2]
                .iter()
                .map(|&k| {
                    fs::read_to_string(view_dir(&lab, k).join("cpu/online"))
                        .map(|t| cpu_list_count(&t))
                        .unwrap_or(0)
                })
                .collect();
            if counts.iter().all(|&c| c == want) {
                Ok(())
            } else {
                Err(format!("nodes 1 and 2 count {counts:?} CPUs online"))
            }
        })
        .unwrap();
        started.elapsed()
    };
    // The first reads of a view just after the cluster formed may show
    // one node (lab_vsmp_first_job_after_the_cluster_forms_sees_every_node).
    wait_online(all, &format!("{all} CPUs online with every node up"));
    assert_eq!(nproc(&lab), all, "nproc with every node up");

    lab.kill(3).expect("kills node 3");
    let took = wait_online(
        without_3,
        &format!("{without_3} CPUs online without node 3"),
    );
    step(&format!(
        "the view shrank {:.1} s after node 3 died",
        took.as_secs_f64()
    ));
    assert_eq!(nproc(&lab), without_3, "nproc in a new job without node 3");

    lab.start(3).expect("restarts node 3");
    let took = wait_online(all, &format!("{all} CPUs online with node 3 back"));
    step(&format!(
        "the view grew {:.1} s after node 3 restarted",
        took.as_secs_f64()
    ));
    assert_eq!(nproc(&lab), all, "nproc in a new job with node 3 back");
}

// ------------------------------------------------------------ distant exec

/// Write the project: f1.c ... fN.c (`int fI(int x) { return x + I; }`)
/// and main.c, which prints `sum S` with S = sum over I of fI(1).
fn write_project(dir: &Path, files: u32) -> u32 {
    let mut main = String::from("#include <stdio.h>\n");
    let mut body = String::new();
    for i in 1..=files {
        fs::write(
            dir.join(format!("f{i}.c")),
            format!("int f{i}(int x) {{ return x + {i}; }}\n"),
        )
        .expect("writes a source file");
        writeln!(main, "int f{i}(int);").expect("to a String");
        writeln!(body, "    s += f{i}(1);").expect("to a String");
    }
    write!(
        main,
        "int main(void) {{\n    int s = 0;\n{body}    printf(\"sum %d\\n\", s);\n    return 0;\n}}\n"
    )
    .expect("to a String");
    fs::write(dir.join("main.c"), main).expect("writes main.c");
    (1..=files).map(|i| 1 + i).sum()
}

/// Write the slow project of the Ctrl-C test: s0.c ... with
/// [`SLOW_FUNCTIONS`] looping functions each.
fn write_slow_project(dir: &Path) {
    for k in 0..SLOW_FILES {
        let mut text = String::new();
        for i in 0..SLOW_FUNCTIONS {
            writeln!(
                text,
                "int f{k}_{i}(int x) {{ int s = 0; for (int i = 0; i < x; i++) {{ \
                 s += i * {i} ^ (s >> 3); if (s % 7 == {}) s -= x; }} return s; }}",
                i % 7
            )
            .expect("to a String");
        }
        fs::write(dir.join(format!("s{k}.c")), text).expect("writes a source file");
    }
}

/// `make -f vsmp.mk ARGS` run by `krg run --node 1 RUN_ARGS` in `dir`.
fn krg_make(lab: &Lab, dir: &Path, run_args: &[&str], make_args: &[&str]) -> Command {
    let mk = makefile();
    let mut args = vec!["run", "--node", "1"];
    args.extend_from_slice(run_args);
    args.extend_from_slice(&["--", "make", "-f", mk.to_str().expect("UTF-8 path")]);
    args.extend_from_slice(make_args);
    let mut command = krg_cmd(lab, 1, &args);
    command.current_dir(dir);
    command
}

/// `make -f vsmp.mk ARGS` run here, outside krg, in `dir`.
fn local_make(dir: &Path, make_args: &[&str]) -> Command {
    let mut command = Command::new("make");
    command
        .arg("-f")
        .arg(makefile())
        .args(make_args)
        .current_dir(dir);
    command
}

/// The node each `compiled X.c on node N` line names, by file.
fn compiled_on(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("compiled ")?;
            let (file, node) = rest.split_once(" on node ")?;
            Some((file.to_string(), node.trim().parse().ok()?))
        })
        .collect()
}

fn nodes_of(compiled: &BTreeMap<String, u32>) -> BTreeSet<u32> {
    compiled.values().copied().collect()
}

/// Goal: an unmodified `make -j6` inside `krg run --cap +DISTANT_FORK`
/// compiles on every node of the cluster, succeeds, and its program runs.
/// Method: a generated project of 60 C files and main.c whose compilations
/// each print the node they ran on ($KRG_NODE); `krg run --node 1 --cap
/// +DISTANT_FORK -- make -f vsmp.mk -j6` from node 1 (`--node 1` so that
/// make's krg calls reach the krgd of its own node; a job placed elsewhere
/// is lab_vsmp_job_on_another_node_reaches_its_own_krgd's business) must
/// exit 0 having compiled all 61 files, on nodes 1, 2 and 3; the program
/// prints the expected sum; no job is left.
#[test]
fn lab_vsmp_make_spreads_over_the_cluster() {
    let Some(lab) = lab_up() else { return };
    let project = new_scratch("make");
    let sum = write_project(project.path(), PROJECT_FILES);

    step("make -j6 with DISTANT_FORK");
    let started = Instant::now();
    let out = run(krg_make(
        &lab,
        project.path(),
        &["--cap", "+DISTANT_FORK"],
        &["-j6"],
    ));
    let took = started.elapsed();
    assert!(out.status.success(), "the build failed: {}", show(&out));
    let compiled = compiled_on(&stdout(&out));
    assert_eq!(
        compiled.len(),
        PROJECT_FILES as usize + 1,
        "every file compiled once: {compiled:?}"
    );
    let per_node: BTreeMap<u32, usize> = compiled.values().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(*n).or_default() += 1;
        m
    });
    step(&format!(
        "built in {:.1} s; compilations per node: {per_node:?}",
        took.as_secs_f64()
    ));
    assert_eq!(
        nodes_of(&compiled),
        BTreeSet::from([1, 2, 3]),
        "compilations ran on every node: {per_node:?}"
    );
    let program = Command::new(project.path().join("prog"))
        .output()
        .expect("the program runs");
    assert_eq!(
        stdout(&program),
        format!("sum {sum}\n"),
        "the program's output"
    );
    wait_no_jobs(&lab);
}

/// Goal: a failing compilation makes the distributed build fail as it
/// would locally. Method: the project plus broken.c (a syntax error); plain
/// `make -j6` here, outside krg, gives the expected status (2); `krg run
/// --node 1 --cap +DISTANT_FORK -- make -j6` must give the same, with the
/// compiler's error on stderr, and leave no job.
#[test]
fn lab_vsmp_make_failure_is_reported_as_locally() {
    let Some(lab) = lab_up() else { return };
    let local = new_scratch("failloc");
    let project = new_scratch("fail");
    for dir in [local.path(), project.path()] {
        write_project(dir, PROJECT_FILES);
        fs::write(dir.join("broken.c"), "int broken(void) { return }\n").expect("writes");
    }
    let out = run(local_make(local.path(), &["-j6"]));
    let expected = shell_code(out.status);
    assert_eq!(expected, 2, "a local make fails with 2: {}", show(&out));

    let out = run(krg_make(
        &lab,
        project.path(),
        &["--cap", "+DISTANT_FORK"],
        &["-j6"],
    ));
    assert_eq!(
        shell_code(out.status),
        expected,
        "the status of the distributed build: {}",
        show(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("broken.c") && err.contains("error"),
        "the compiler's error on stderr: {err:?}"
    );
    assert!(
        err.contains("make: ***"),
        "make's own report on stderr: {err:?}"
    );
    wait_no_jobs(&lab);
}

/// Processes of the lab's nodes named `comm`, as (pid, node).
fn lab_processes(lab: &Lab, comm: &str) -> Vec<(u32, u32)> {
    let marker = format!("/krg-lab/{}/n", lab.name());
    let mut found = Vec::new();
    for (pid, dir) in processes() {
        if !fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == comm) {
            continue;
        }
        let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let node = cgroup.lines().find_map(|l| {
            let rest = &l[l.find(&marker)? + marker.len()..];
            rest.split('/').next()?.parse().ok()
        });
        if let Some(node) = node {
            found.push((pid, node));
        }
    }
    found
}

/// Every process of the lab's nodes but the krgd daemons, one per line:
/// pid, parent, process group, node, state, blocked, ignored and caught
/// signals, command line (to tell what did not stop).
fn lab_process_table(lab: &Lab) -> String {
    let marker = format!("/krg-lab/{}/n", lab.name());
    let mut table = String::new();
    for (pid, dir) in processes() {
        let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) else {
            continue;
        };
        let Some(node) = cgroup.lines().find_map(|l| {
            let rest = &l[l.find(&marker)? + marker.len()..];
            rest.split('/').next().map(str::to_string)
        }) else {
            continue;
        };
        let status = fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        if field("Name:") == "krgd" {
            continue;
        }
        let stat = fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let pgrp = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_string))
            .unwrap_or_default();
        let cmdline = fs::read(dir.join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let _ = writeln!(
            table,
            "{pid} ppid {} pgrp {pgrp} node {node} {} pnd {} shd {} blk {} ign {} cgt {} {}",
            field("PPid:"),
            field("State:"),
            field("SigPnd:"),
            field("ShdPnd:"),
            field("SigBlk:"),
            field("SigIgn:"),
            field("SigCgt:"),
            cmdline.chars().take(120).collect::<String>()
        );
    }
    table
}

/// Processes whose working directory is `dir`, as "pid comm".
fn processes_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for (pid, proc_dir) in processes() {
        if fs::read_link(proc_dir.join("cwd")).is_ok_and(|cwd| cwd == dir) {
            let comm = fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
            found.push(format!("{pid} {}", comm.trim()));
        }
    }
    found
}

/// Processes named cc1 whose working directory is `dir`.
fn cc1_in(dir: &Path) -> usize {
    processes_in(dir)
        .iter()
        .filter(|p| p.ends_with(" cc1"))
        .count()
}

/// Goal: Ctrl-C stops the whole distributed build, on every node, and
/// `krg run` ends as make does when interrupted locally. Method: a slow
/// project (12 files of several seconds each at -O2, no link), built with
/// `-j12` so that every compilation starts at once. First here, outside
/// krg: `make -j12` in a process group of its own, interrupted (as a
/// terminal's Ctrl-C does) by SIGINT to the group once every cc1 runs,
/// ends with 130 or 2 (see [`INTERRUPTED_MAKE`]). Then `krg run --node 1
/// --cap +DISTANT_FORK -- make -j12 objs`; once all 12 compilations have
/// started, on nodes 1, 2 and 3, and every cc1 runs, SIGINT
/// to the `krg run` process: it must end within 5 s with 130 or 2, and
/// within 10 s more no cc1 is left on any node, no process is left in the
/// build's directory, and `krg ps --json` lists no job on any node.
#[test]
fn lab_vsmp_ctrl_c_stops_the_build_everywhere() {
    let Some(lab) = lab_up() else { return };
    let local = new_scratch("intloc");
    let project = new_scratch("int");
    write_slow_project(local.path());
    write_slow_project(project.path());
    let make_args = ["-j12", "objs", "CFLAGS=-O2"];

    step("a local make interrupted by Ctrl-C");
    let mut command = local_make(local.path(), &make_args);
    command.process_group(0);
    let mut make = Running::spawn(command);
    // Every compilation past its fork (a child between make's fork and
    // its exec may miss the signal, locally too).
    lab::wait_until(
        WAIT,
        "every cc1 running in the local build",
        || match cc1_in(local.path()) {
            n if n < SLOW_FILES as usize => Err(format!("{n} cc1 running")),
            _ => Ok(()),
        },
    )
    .unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions; the group is the
    // one our unreaped child leads.
    assert_eq!(unsafe { libc::kill(-make.pid(), libc::SIGINT) }, 0);
    let local_code = shell_code(make.wait(2 * WAIT));
    step(&format!("the local make ended with {local_code}"));
    assert!(
        INTERRUPTED_MAKE.contains(&local_code),
        "a local make ends with 130 or 2: {local_code}; {}",
        make.stderr()
    );

    step("the distributed build");
    let mut build = Running::spawn(krg_make(
        &lab,
        project.path(),
        &["--cap", "+DISTANT_FORK"],
        &make_args,
    ));
    // All 12 compilations start at once and the scheduler spreads them.
    // Ctrl-C only once every cc1 runs, as for the local make: a SIGINT
    // that reaches `sh -c "echo ...; cc ..."` while it is between vfork
    // and exec of cc is lost for cc (dash's handler, shared with the
    // vforked child, drops it there) and make waits for that compilation.
    // Without krg, a Ctrl-C just after the last "compiled" line leaves
    // make waiting in 29 runs of 40 (0 of 30 once every cc1 runs); the
    // nodes' logs showed the signal reaching every job's init.
    build.read_until(
        Duration::from_secs(30),
        "every compilation started",
        |lines| compiled_on(&lines.join("\n")).len() == SLOW_FILES as usize,
    );
    let compiling = nodes_of(&compiled_on(&build.seen().join("\n")));
    step(&format!("compilations started on nodes {compiling:?}"));
    assert_eq!(
        compiling,
        BTreeSet::from([1, 2, 3]),
        "compilations on every node: {:?}",
        build.seen()
    );
    let cc1_nodes = lab::wait_until(WAIT, "every cc1 running in the lab", || {
        let cc1 = lab_processes(&lab, "cc1");
        if cc1.len() >= SLOW_FILES as usize {
            Ok(cc1.iter().map(|p| p.1).collect::<BTreeSet<u32>>())
        } else {
            Err(format!("cc1 (pid, node): {cc1:?}"))
        }
    })
    .unwrap();
    step(&format!("cc1 running on nodes {cc1_nodes:?}"));
    step("Ctrl-C (SIGINT to krg run)");
    // SAFETY: as above; `build` is our unreaped child.
    assert_eq!(unsafe { libc::kill(build.pid(), libc::SIGINT) }, 0);
    let interrupted = Instant::now();
    let code = shell_code(build.wait_or(INTERRUPT_END_MAX, || {
        format!("\nthe lab's processes then:\n{}", lab_process_table(&lab))
    }));
    step(&format!(
        "krg run ended with {code} {:.1} s after SIGINT; stderr: {:?}",
        interrupted.elapsed().as_secs_f64(),
        build.stderr()
    ));
    assert!(
        INTERRUPTED_MAKE.contains(&code),
        "krg run ends as a local make does (130 or 2), not {code}"
    );

    lab::wait_until(WAIT, "nothing of the build left anywhere", || {
        let cc1 = lab_processes(&lab, "cc1");
        let left = processes_in(project.path());
        let jobs: Vec<Value> = (1..=3).flat_map(|k| ps(&lab, k)).collect();
        if cc1.is_empty() && left.is_empty() && jobs.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "cc1 (pid, node): {cc1:?}; processes in the build directory: {left:?}; jobs: {jobs:?}"
            ))
        }
    })
    .unwrap();
}

/// Goal: without DISTANT_FORK a job's children stay on its node. Method:
/// `krg run --node 1 -- make -j6` on the generated project: it succeeds,
/// and every compilation says node 1.
#[test]
fn lab_vsmp_without_distant_fork_everything_stays_home() {
    let Some(lab) = lab_up() else { return };
    let project = new_scratch("home");
    write_project(project.path(), PROJECT_FILES);
    let out = run(krg_make(&lab, project.path(), &[], &["-j6"]));
    assert!(out.status.success(), "the build failed: {}", show(&out));
    let compiled = compiled_on(&stdout(&out));
    assert_eq!(compiled.len(), PROJECT_FILES as usize + 1, "{compiled:?}");
    assert_eq!(
        nodes_of(&compiled),
        BTreeSet::from([1]),
        "every compilation on node 1: {compiled:?}"
    );
}

/// The lines `child GPID NODE [HOST]` a job printed, split in words.
fn child_lines(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .filter_map(|l| l.strip_prefix("child "))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// A script that runs `/bin/sh -c 'echo child $KRG_GPID $KRG_NODE ...'`
/// `count` times, each a fork and exec (what distant exec redirects).
fn children_script(count: u32, extra: &str) -> String {
    format!(
        "i=0; while [ $i -lt {count} ]; do \
         /bin/sh -c 'echo child $KRG_GPID $KRG_NODE {extra}'; i=$((i+1)); done"
    )
}

/// Goal: only root raises a permitted capability. Method: as user 65534,
/// `krg run --node 1 -- sh -c 'krg capset -p -DISTANT_FORK && echo
/// lowered; krg capset -p +DISTANT_FORK'`: lowering works, raising fails
/// with `permission denied` (status 1), and raising the effective set
/// after that is refused too; as root the same raise works and `krg capset
/// -s` shows DISTANT_FORK permitted again.
#[test]
fn lab_vsmp_capset_raising_permitted_needs_root() {
    let Some(lab) = lab_up() else { return };
    let script = "krg capset -p -DISTANT_FORK && echo lowered; krg capset -p +DISTANT_FORK";
    let out = run(krg_as_nobody(
        &lab,
        1,
        &["run", "--node", "1", "--", "sh", "-c", script],
    ));
    assert_eq!(stdout(&out), "lowered\n", "{}", show(&out));
    assert_eq!(
        out.status.code(),
        Some(1),
        "the raise fails: {}",
        show(&out)
    );
    assert!(
        stderr(&out).contains("permission denied"),
        "a user may not raise a permitted set: {}",
        show(&out)
    );
    let out = run(krg_as_nobody(
        &lab,
        1,
        &[
            "run",
            "--node",
            "1",
            "--",
            "sh",
            "-c",
            "krg capset -p -DISTANT_FORK && krg capset -e +DISTANT_FORK",
        ],
    ));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        stderr(&out).contains("not permitted"),
        "effective stays within permitted: {}",
        show(&out)
    );

    let out = run(job_sh(
        &lab,
        &["--node", "1"],
        &format!("{script} && krg capset -s"),
    ));
    assert!(out.status.success(), "root raises it: {}", show(&out));
    let permitted = stdout(&out)
        .lines()
        .find(|l| l.starts_with("permitted:"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        permitted.contains("DISTANT_FORK"),
        "DISTANT_FORK permitted again: {}",
        show(&out)
    );
}

/// Goal: `krg capset -s` inside a job shows its own sets, and `krg capset
/// -k GPID +DISTANT_FORK` on a running job applies to its next execs.
/// Method: a job with `--cap +DISTANT_FORK --cap -CAN_MIGRATE` shows
/// (`capset -s`) its gpid and effective set accordingly, DISTANT_FORK not
/// inheritable. Then a job without DISTANT_FORK on node 1 runs 6 children
/// (fork and exec of `sh -c 'echo child $KRG_GPID $KRG_NODE'`): all in the
/// job itself on node 1; it waits for a file; `krg capset -k GPID
/// +DISTANT_FORK` from node 1, then the file; its next 9 children must not
/// all run in the job itself, and must run on at least 2 nodes.
#[test]
fn lab_vsmp_capset_shows_and_changes_a_running_job() {
    let Some(lab) = lab_up() else { return };
    let out = run(job_sh(
        &lab,
        &[
            "--node",
            "1",
            "--cap",
            "+DISTANT_FORK",
            "--cap",
            "-CAN_MIGRATE",
        ],
        "echo gpid $KRG_GPID; krg capset -s",
    ));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let line = |prefix: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in {text:?}"))
            .to_string()
    };
    let gpid = line("gpid ")["gpid ".len()..].to_string();
    assert_eq!(line("job "), format!("job {gpid}"), "{text}");
    let effective = line("effective:");
    assert!(
        effective.contains("DISTANT_FORK")
            && effective.contains("CHECKPOINTABLE")
            && !effective.contains("CAN_MIGRATE"),
        "{text}"
    );
    assert!(
        !line("inheritable effective:").contains("DISTANT_FORK"),
        "{text}"
    );

    let dir = new_scratch("capk");
    let script = format!(
        "echo gpid $KRG_GPID; {}; while [ ! -e go ]; do sleep 0.1; done; {}; echo done",
        children_script(6, "before"),
        children_script(9, "after")
    );
    let mut command = job_sh(&lab, &["--node", "1"], &script);
    command.current_dir(dir.path());
    let mut job = Running::spawn(command);
    job.read_until(WAIT, "6 children before", |lines| {
        lines.iter().filter(|l| l.ends_with(" before")).count() == 6
    });
    let gpid = job.seen()[0]
        .strip_prefix("gpid ")
        .expect("the job's first line")
        .to_string();
    let before = child_lines(&job.seen().join("\n"));
    assert!(
        before.iter().all(|c| c[0] == gpid && c[1] == "1"),
        "without DISTANT_FORK every child is in job {gpid} on node 1: {before:?}"
    );
    step(&format!("krg capset -k {gpid} +DISTANT_FORK"));
    ok(krg_cmd(&lab, 1, &["capset", "-k", &gpid, "+DISTANT_FORK"]));
    fs::write(dir.path().join("go"), "").expect("writes go");
    let status = job.wait(RUN_TIMEOUT);
    assert!(status.success(), "{status}: {:?}", job.stderr());
    let after: Vec<Vec<String>> = child_lines(&job.seen().join("\n"))
        .into_iter()
        .filter(|c| c.last().is_some_and(|w| w == "after"))
        .collect();
    assert_eq!(after.len(), 9, "{:?}", job.seen());
    let own_jobs = after.iter().filter(|c| c[0] != gpid).count();
    let nodes: BTreeSet<&str> = after.iter().map(|c| c[1].as_str()).collect();
    step(&format!(
        "after capset: {own_jobs} of 9 children in jobs of their own, on nodes {nodes:?}"
    ));
    assert!(own_jobs > 0, "children run as jobs of their own: {after:?}");
    assert!(nodes.len() >= 2, "children spread: {after:?}");
}

/// Goal: a job placed on another node than the one `krg run` was given on
/// reaches its own node's krgd: `krg capset -s` works inside it, and with
/// DISTANT_FORK its children spread. (In the lab every node has its own
/// socket; the job's `krg` must talk to the krgd of the node the job runs
/// on, which alone knows the job, as /run/krg/krgd.sock does on real
/// machines.) Method: from node 1, `krg run --node N --cap +DISTANT_FORK`
/// for N = 2 and 3 runs `krg capset -s` (must succeed and name the job),
/// then 9 children that print their gpid and node: they must run on at
/// least 2 nodes.
#[test]
fn lab_vsmp_job_on_another_node_reaches_its_own_krgd() {
    let Some(lab) = lab_up() else { return };
    for node in ["2", "3"] {
        let script = format!(
            "echo gpid $KRG_GPID; krg capset -s || echo capset failed; {}",
            children_script(9, "")
        );
        let out = run(job_sh(
            &lab,
            &["--node", node, "--cap", "+DISTANT_FORK"],
            &script,
        ));
        assert!(out.status.success(), "{}", show(&out));
        let text = stdout(&out);
        let gpid = text
            .lines()
            .find_map(|l| l.strip_prefix("gpid "))
            .expect("the gpid line")
            .to_string();
        let children = child_lines(&text);
        let nodes: BTreeSet<&str> = children.iter().map(|c| c[1].as_str()).collect();
        assert!(
            text.contains(&format!("job {gpid}\n")) && !text.contains("capset failed"),
            "krg capset -s in a job on node {node}: {}",
            show(&out)
        );
        assert!(
            nodes.len() >= 2,
            "children of a job on node {node} spread: {children:?}"
        );
    }
}

/// Goal: a child kept on its parent's node gets the capabilities a child
/// sent elsewhere gets (the parent's inheritable sets), so that whether
/// the child's own children spread does not depend on where the scheduler
/// put it: with `--cap +DISTANT_FORK` only the job's own children spread,
/// as in Kerrighed (`cc` spreads, its `cc1` and `as` stay with it: on real
/// machines they share files in the node's own /tmp). Method: a job with
/// DISTANT_FORK on node 1 runs 18 children `sh -c 'echo child $KRG_GPID
/// $KRG_NODE $(uname -n)'`; in each, `uname` (the child's own child) must
/// run on the child's node: the host name is `krg-lab-<node>`.
#[test]
fn lab_vsmp_child_kept_in_place_gets_inheritable_caps() {
    let Some(lab) = lab_up() else { return };
    let out = run(job_sh(
        &lab,
        &["--node", "1", "--cap", "+DISTANT_FORK"],
        &format!(
            "echo gpid $KRG_GPID; {}",
            children_script(18, "$(uname -n)")
        ),
    ));
    assert!(out.status.success(), "{}", show(&out));
    let text = stdout(&out);
    let gpid = text
        .lines()
        .find_map(|l| l.strip_prefix("gpid "))
        .expect("the gpid line")
        .to_string();
    let children = child_lines(&text);
    assert_eq!(children.len(), 18, "{text}");
    let kept = children.iter().filter(|c| c[0] == gpid).count();
    step(&format!("{kept} of 18 children kept in job {gpid}"));
    let wrong: Vec<&Vec<String>> = children
        .iter()
        .filter(|c| c.get(2).map(String::as_str) != Some(&format!("krg-lab-{}", c[1])))
        .collect();
    assert!(
        wrong.is_empty(),
        "a child's own children run where it runs (child GPID NODE HOST): {wrong:?}"
    );
}

/// Goal: a parent sees a distant child killed by a signal as killed by
/// that signal, as without krg (`wait` gives WIFSIGNALED; shells and make
/// act on it). Method: Python as the job (its own children are the ones
/// distant exec redirects) with DISTANT_FORK on node 1 runs 9 children
/// `sh -c 'kill -TERM $$'` with subprocess: every return code must be -15
/// (killed by SIGTERM), wherever the child ran.
#[test]
fn lab_vsmp_distant_child_killed_by_a_signal_is_seen_killed() {
    let Some(lab) = lab_up() else { return };
    let program = "import subprocess\n\
         print(*[subprocess.run(['sh', '-c', 'kill -TERM $$']).returncode for _ in range(9)])";
    let out = run(krg_cmd(
        &lab,
        1,
        &[
            "run",
            "--node",
            "1",
            "--cap",
            "+DISTANT_FORK",
            "--",
            python3(),
            "-c",
            program,
        ],
    ));
    assert!(out.status.success(), "{}", show(&out));
    let codes: Vec<i32> = stdout(&out)
        .split_whitespace()
        .map(|w| w.parse().expect("a return code"))
        .collect();
    assert_eq!(
        codes,
        vec![-15; 9],
        "return codes of children killed by SIGTERM"
    );
}

/// Goal: children that end at once never fail for krg's sake. Method: a
/// job with DISTANT_FORK on node 1 runs 4 loops at once, each running
/// `/bin/true </dev/null` 50 times (each a distant exec whose deputy reads
/// the end of its stdin at once, as make's children with `-j` do, racing
/// the job's end), and prints every non-zero status: none.
#[test]
fn lab_vsmp_quick_distant_children_exit_cleanly() {
    let Some(lab) = lab_up() else { return };
    let script = "trues() { i=0; while [ $i -lt 50 ]; do /bin/true </dev/null; r=$?; \
         [ $r -eq 0 ] || echo status $r; i=$((i+1)); done; }; \
         trues & trues & trues & trues & wait; echo end";
    let out = run(job_sh(
        &lab,
        &["--node", "1", "--cap", "+DISTANT_FORK"],
        script,
    ));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        "end\n",
        "statuses other than 0: {}",
        show(&out)
    );
}
