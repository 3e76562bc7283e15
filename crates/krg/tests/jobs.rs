//! Cluster-wide processes (issue 3), for real on a 3-node lab cluster:
//! `krg run` anywhere with its stdio, signals and exit status as if local;
//! `krg ps`, `krg kill`, `krg wait`, `krg logs` from any node; `krg-rsh`
//! under MPICH's `mpiexec`; bad input; nothing leaked after many jobs; a
//! job whose node dies.
//!
//! Each test makes its own lab (unique name `j<pid>x<n>`) with the `krgd`,
//! `krg` and `krg-init` built with this test, and is named `lab_jobs_*` so
//! that nextest's `lab` group runs them one at a time. Without root they are
//! skipped with a reason, unless `KRG_REQUIRE_LAB=1` makes that a failure.
//! Small programs the tests compile live in `tests/workloads/`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    compile, job_cgroups, krg_as_nobody, krg_cmd, ok_within, output_of, processes, reader_thread,
    show, stderr, stdout, step, subdirs, workload, Input, Running, Scratch, KRG, NOBODY_UID, WAIT,
};
use krg::lab::{self, Lab};
use krg_types::Gpid;
use serde_json::Value;

/// Longest a single `krg` command may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- the lab

/// A 3-node lab running this build's daemons, or `None` (skipped) without
/// root.
fn lab_up() -> Option<Lab> {
    let lab = common::lab_up("j")?;
    // `Lab::up` returns once node 1 lists every node `up`; a node node 1
    // has not heard gossip from yet counts as alive only until 1 s after
    // node 1's own start, and then shows `suspect` (and `krg run --node N`
    // refuses it) until its first heartbeat arrives. Start once node 1 has
    // heard from every node (its load is known).
    lab::wait_until(WAIT, "node 1 to have heard every node", || {
        let nodes = lab.nodes_json(1)?;
        let heard = nodes.as_array().is_some_and(|list| {
            list.len() == 3
                && list
                    .iter()
                    .all(|n| n["state"] == "up" && n["cpus"].as_u64().is_some_and(|c| c > 0))
        });
        if heard {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{nodes}"))
        }
    })
    .expect("node 1 hears every node");
    Some(lab)
}

/// A directory of its own under /tmp that every user can enter, removed at
/// the end.
fn new_scratch(tag: &str) -> Scratch {
    Scratch::new(&format!("jobs-{tag}"), 0o755)
}

fn on_path(program: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|dir| dir.join(program).is_file())
}

// --------------------------------------------------------- running things

/// Run `command` with an idle stdin (see [`Input::Idle`]).
fn run(command: Command) -> Output {
    output_of(command, Input::Idle, RUN_TIMEOUT)
}

/// The exit code, failing the test if it died from a signal.
fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {}", show(out)))
}

/// Stdout of a command that must succeed.
fn ok(command: Command) -> String {
    ok_within(command, RUN_TIMEOUT)
}

/// `krg ps --json` on node K.
fn ps(lab: &Lab, k: u32) -> Vec<Value> {
    let text = ok(krg_cmd(lab, k, &["ps", "--json"]));
    match serde_json::from_str(&text) {
        Ok(Value::Array(jobs)) => jobs,
        _ => panic!("`krg ps --json` on node {k} printed {text:?}"),
    }
}

/// The job `gpid` as `krg ps --json` on node K shows it.
fn ps_job(lab: &Lab, k: u32, gpid: &str) -> Option<Value> {
    ps(lab, k).into_iter().find(|j| j["gpid"] == gpid)
}

/// Wait until `krg ps --json` on node K shows job `gpid` in `state`.
fn wait_state(lab: &Lab, k: u32, gpid: &str, state: &str) -> Value {
    lab::wait_until(
        WAIT,
        &format!("job {gpid} {state} on node {k}"),
        || match ps_job(lab, k, gpid) {
            Some(job) if job["state"] == state => Ok(job),
            other => Err(format!("{other:?}")),
        },
    )
    .unwrap()
}

/// Wait until `krg ps` on node K no longer lists job `gpid`.
fn wait_gone_from_ps(lab: &Lab, k: u32, gpid: &str) {
    lab::wait_until(WAIT, &format!("job {gpid} gone from ps"), || {
        match ps_job(lab, k, gpid) {
            None => Ok(()),
            Some(job) => Err(job.to_string()),
        }
    })
    .unwrap();
}

/// Is process `pid` stopped (state T)?
fn is_stopped(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                .map(|state| state == "T")
        })
        .unwrap_or(false)
}

/// The last counter value printed (lines that are numbers).
fn last_count(lines: &[String]) -> Option<u64> {
    lines.iter().rev().find_map(|l| l.trim().parse().ok())
}

/// The length and sha256 (hex) of everything `from` gives, hashed by
/// `sha256sum` (much faster than an unoptimised build of ours).
fn sha256_of(mut from: impl Read) -> (u64, String) {
    let mut hasher = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs sha256sum");
    let mut into = hasher.stdin.take().expect("piped");
    let total = std::io::copy(&mut from, &mut into).expect("copies to sha256sum");
    drop(into);
    let out = hasher.wait_with_output().expect("sha256sum ends");
    assert!(out.status.success(), "sha256sum: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let hash = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    (total, hash)
}

// ------------------------------------------------- what a node holds

fn daemon_pid(lab: &Lab, k: u32) -> u32 {
    lab.daemon_pid(k)
        .unwrap_or_else(|| panic!("node {k}'s krgd is not running"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("process alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS is shown")
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process alive")
        .count()
}

/// What the fds of `pid` are, for messages: "socket x3, pipe x2, ...".
fn fd_kinds(pid: u32) -> String {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = target.split(':').next().unwrap_or("").to_string();
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
        .iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every process in node K's cgroups (all hierarchies, all levels).
fn node_processes(lab: &Lab, k: u32) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for dir in lab.cgroup_dirs(k) {
        for d in std::iter::once(dir.clone()).chain(subdirs(&dir)) {
            let text = fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids
}

/// The children of `pid` (any state, zombies included).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for (child, dir) in processes() {
        let Ok(stat) = fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// Is `pid` a krg-init started ahead of its job, still waiting for it? It
/// was started with the pool's marker and is in no job's cgroup yet (an
/// init that has its job keeps the marker in its first environment).
fn is_waiting_init(pid: u32) -> bool {
    let marker = format!("{}=1", krg_types::handoff::POOLED_ENV);
    let started_waiting = fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|b| *b == 0).any(|e| e == marker.as_bytes()));
    let in_a_job =
        fs::read_to_string(format!("/proc/{pid}/cgroup")).map_or(true, |c| c.contains("krg-jobs"));
    started_waiting && !in_a_job
}

/// Wait until nothing of any job is left on nodes `ks`: no job listed as
/// running or stopped by `krg ps`, no job cgroup, no process in the node's
/// cgroups but its krgd, no child of its krgd (but the one krg-init that
/// waits for the next job).
fn assert_nothing_left(lab: &Lab, ks: &[u32]) {
    lab::wait_until(WAIT, "no job left running", || {
        let live: Vec<Value> = ps(lab, 1)
            .into_iter()
            .filter(|j| j["state"] == "running" || j["state"] == "stopped")
            .collect();
        if live.is_empty() {
            Ok(())
        } else {
            Err(format!("{live:?}"))
        }
    })
    .unwrap();
    for &k in ks {
        let daemon = daemon_pid(lab, k);
        lab::wait_until(WAIT, &format!("node {k} clean"), || {
            let cgroups = job_cgroups(lab, k);
            let mut strays = node_processes(lab, k);
            strays.remove(&daemon);
            let mut children = children_of(daemon);
            // The one krg-init krgd keeps waiting for the next job belongs.
            let waiting: Vec<u32> = children.iter().copied().filter(|p| is_waiting_init(*p)).collect();
            if waiting.len() == 1 {
                strays.remove(&waiting[0]);
                children.retain(|p| *p != waiting[0]);
            }
            if cgroups.is_empty() && strays.is_empty() && children.is_empty() {
                Ok(())
            } else {
                let describe = |pids: &[u32]| {
                    pids.iter()
                        .map(|p| {
                            let cmd = fs::read(format!("/proc/{p}/cmdline"))
                                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                                .unwrap_or_default();
                            format!("{p} {cmd:?}")
                        })
                        .collect::<Vec<_>>()
                };
                let strays: Vec<u32> = strays.into_iter().collect();
                Err(format!(
                    "job cgroups: {cgroups:?}; other processes in the node: {:?}; krgd's children: {:?}",
                    describe(&strays),
                    describe(&children)
                ))
            }
        })
        .unwrap();
    }
}

// ================================================================= tests

/// Goal: a job runs on the node asked for, as the calling user, with
/// `KRG_NODE` and `KRG_GPID` set, and its exit status comes back exactly
/// (codes and deaths by signal, as a shell reports them). Method: `krg run
/// --node N sh -c ...` from node 1, as root and as user 65534 (the client
/// run through `setpriv`), printing what the job sees, and jobs ending with
/// `exit C` or killing themselves, on a remote node and on node 1 itself.
#[test]
fn lab_jobs_identity_and_exit_status() {
    let Some(lab) = lab_up() else { return };

    step("node, host name and uid as root");
    let seen = ok(krg_cmd(
        &lab,
        1,
        &[
            "run",
            "--node",
            "2",
            "sh",
            "-c",
            "echo $KRG_NODE $(hostname) $(id -u)",
        ],
    ));
    assert_eq!(seen, "2 krg-lab-2 0\n");

    step("the same as user 65534");
    let seen = ok(krg_as_nobody(
        &lab,
        1,
        &[
            "run",
            "--node",
            "2",
            "sh",
            "-c",
            "echo $KRG_NODE $(hostname) $(id -u) $(id -g)",
        ],
    ));
    assert_eq!(seen, format!("2 krg-lab-2 {NOBODY_UID} {NOBODY_UID}\n"));

    step("KRG_GPID names a job whose home is node 1");
    let seen = ok(krg_cmd(
        &lab,
        1,
        &["run", "--node", "3", "sh", "-c", "echo $KRG_GPID"],
    ));
    let gpid: Gpid = seen
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("KRG_GPID={seen:?} is not a gpid: {e}"));
    assert_eq!(gpid.home_node().get(), 1, "gpid {gpid}");

    step("exit statuses");
    for node in ["3", "1"] {
        for (script, want) in [
            ("exit 0", 0),
            ("exit 1", 1),
            ("exit 42", 42),
            ("kill -9 $$", 137),
            ("kill -TERM $$", 143),
        ] {
            let out = run(krg_cmd(
                &lab,
                1,
                &["run", "--node", node, "sh", "-c", script],
            ));
            assert_eq!(
                code(&out),
                want,
                "`{script}` on node {node}: {}",
                show(&out)
            );
        }
    }
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: the streams are carried byte for byte, kept apart, with
/// back-pressure and end of file. Method: 100 MiB of random bytes through
/// `krg run --node 3 cat` (written from one thread, read in full from
/// another, sha256 compared); `echo out; echo err >&2` read on separate
/// pipes; 50 MB from a remote `head` read slowly at first (64 KiB per 10 ms
/// for 3 s) while the RSS of node 1's and node 3's krgd is sampled; 5
/// bytes into `wc -c`, whose answer needs the end of file.
#[test]
fn lab_jobs_streams() {
    let Some(lab) = lab_up() else { return };

    step("100 MiB of random bytes through cat on node 3");
    let scratch = new_scratch("streams");
    let input = scratch.join("random");
    let mut file = fs::File::create(&input).expect("creates the input");
    let random = fs::File::open("/dev/urandom").expect("opens /dev/urandom");
    std::io::copy(&mut random.take(100 << 20), &mut file).expect("writes the input");
    drop(file);
    let (_, want) = sha256_of(fs::File::open(&input).expect("opens the input"));
    let mut command = krg_cmd(&lab, 1, &["run", "-T", "--node", "3", "cat"]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("starts krg run");
    let mut stdin = child.stdin.take().expect("piped");
    let writer = thread::spawn(move || {
        let mut file = fs::File::open(&input).expect("opens the input");
        std::io::copy(&mut file, &mut stdin).expect("writes stdin");
    });
    let out = child.stdout.take().expect("piped");
    let hasher = thread::spawn(move || sha256_of(out));
    let err = reader_thread(child.stderr.take().expect("piped"));
    writer.join().expect("writer");
    let (total, got) = hasher.join().expect("reader");
    let status = child.wait().expect("waits");
    let err = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    eprintln!(
        "100 MiB round trip in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(status.success(), "krg run cat: {status}; stderr: {err:?}");
    assert_eq!(total, 100 << 20, "bytes out");
    assert_eq!(got, want, "sha256 of what came out");
    assert_eq!(err, "", "stderr of cat");

    step("stdout and stderr stay apart");
    let out = run(krg_cmd(
        &lab,
        1,
        &["run", "--node", "2", "sh", "-c", "echo out; echo err >&2"],
    ));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out), "out\n");
    assert_eq!(stderr(&out), "err\n");

    step("a slow reader slows the writer; krgd's memory stays bounded");
    let krgd1 = daemon_pid(&lab, 1);
    let krgd3 = daemon_pid(&lab, 3);
    let before = (rss_kib(krgd1), rss_kib(krgd3));
    let mut command = krg_cmd(
        &lab,
        1,
        &[
            "run",
            "-T",
            "--node",
            "3",
            "sh",
            "-c",
            "head -c 50000000 /dev/zero",
        ],
    );
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().expect("starts krg run");
    let _idle_stdin = child.stdin.take();
    let mut out = child.stdout.take().expect("piped");
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    let mut peak = before;
    let slow_until = Instant::now() + Duration::from_secs(3);
    let mut slow_bytes = 0usize;
    loop {
        let n = out.read(&mut buf).expect("reads stdout");
        if n == 0 {
            break;
        }
        total += n;
        if Instant::now() < slow_until {
            slow_bytes = total;
            peak = (peak.0.max(rss_kib(krgd1)), peak.1.max(rss_kib(krgd3)));
            thread::sleep(Duration::from_millis(10));
        }
    }
    let status = child.wait().expect("waits");
    eprintln!(
        "slow reader: {slow_bytes} bytes in the slow phase; krgd RSS (KiB) node 1 {} -> peak {}, node 3 {} -> peak {}",
        before.0, peak.0, before.1, peak.1
    );
    assert!(status.success(), "krg run head: {status}");
    assert_eq!(total, 50_000_000, "bytes read");
    assert!(
        slow_bytes < 30_000_000,
        "the slow phase read {slow_bytes} bytes: the reader was not slow?"
    );
    for (k, before, peak) in [(1, before.0, peak.0), (3, before.1, peak.1)] {
        assert!(
            peak < 200 << 10,
            "node {k}'s krgd reached {peak} KiB of RSS with a slow reader"
        );
        assert!(
            peak < before + (32 << 10),
            "node {k}'s krgd grew from {before} to {peak} KiB with a slow reader (no back-pressure?)"
        );
    }

    step("end of file on stdin is passed on");
    let mut command = krg_cmd(&lab, 1, &["run", "-T", "--node", "2", "wc", "-c"]);
    command.stdin(Stdio::piped());
    let out = output_of(command, Input::Bytes(b"hello".to_vec()), RUN_TIMEOUT);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "5");
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: signals reach the job as if it ran here; `krg kill -STOP/-CONT`
/// pause and resume it; killing `krg run` hangs the job up. Method: a
/// remote job trapping INT and TERM, signalled through its `krg run` after
/// it printed `ready`; a counting job stopped and continued with `krg kill
/// -STOP/-CONT`, watching its output and its `krg ps` state; a job trapping
/// HUP that writes a file, its `krg run` killed with SIGKILL.
#[test]
fn lab_jobs_signals() {
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("sig");

    step("SIGINT and SIGTERM reach a trapping job");
    let mut job = Running::spawn(krg_cmd(
        &lab,
        1,
        &[
            "run",
            "-T",
            "--node",
            "2",
            "sh",
            "-c",
            "trap 'echo got INT' INT; trap 'echo got TERM; exit 3' TERM; echo ready; \
             while :; do sleep 0.1; done",
        ],
    ));
    job.expect_line(|l| l == "ready", "ready");
    job.signal(libc::SIGINT);
    job.expect_line(|l| l == "got INT", "got INT");
    assert!(job.alive(), "the job ended on SIGINT: {:?}", job.drain());
    job.signal(libc::SIGTERM);
    job.expect_line(|l| l == "got TERM", "got TERM");
    let status = job.wait(WAIT);
    assert_eq!(status.code(), Some(3), "krg run after TERM: {status}");

    step("krg kill -STOP / -CONT pause and resume a job");
    let counter = "echo gpid $KRG_GPID; i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done";
    let mut job = Running::spawn(krg_cmd(
        &lab,
        1,
        &["run", "-T", "--node", "3", "sh", "-c", counter],
    ));
    let gpid = job.gpid();
    job.expect_line(|l| l == "3", "3 (counting)");
    ok(krg_cmd(&lab, 1, &["kill", "-STOP", &gpid]));
    wait_state(&lab, 1, &gpid, "stopped");
    assert_paused(&mut job);
    let paused_at = last_count(job.drain()).expect("counted");
    ok(krg_cmd(&lab, 1, &["kill", "-CONT", &gpid]));
    job.expect_line(
        |l| l.parse::<u64>().is_ok_and(|n| n > paused_at),
        "counting on after CONT",
    );
    wait_state(&lab, 1, &gpid, "running");

    ok(krg_cmd(&lab, 1, &["kill", &gpid]));
    let status = job.wait(WAIT);
    assert_eq!(status.code(), Some(143), "krg run after krg kill: {status}");

    step("killing krg run hangs the job up");
    let hupped = scratch.join("hupped");
    let script = format!(
        "trap 'echo hup > {}; exit 0' HUP; echo gpid $KRG_GPID; echo ready; while :; do sleep 0.1; done",
        hupped.display()
    );
    let mut job = Running::spawn(krg_cmd(
        &lab,
        1,
        &["run", "-T", "--node", "2", "sh", "-c", &script],
    ));
    let gpid = job.gpid();
    job.expect_line(|l| l == "ready", "ready");
    job.signal(libc::SIGKILL);
    job.wait(WAIT);
    lab::wait_until(WAIT, "the job's HUP trap wrote its file", || {
        fs::read_to_string(&hupped)
            .map(|t| t == "hup\n")
            .and_then(|done| {
                if done {
                    Ok(())
                } else {
                    Err(std::io::Error::other("not yet complete"))
                }
            })
    })
    .unwrap();
    wait_gone_from_ps(&lab, 1, &gpid);
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: SIGTSTP and SIGCONT sent to `krg run` suspend and resume the job,
/// as a shell's job control expects (Ctrl-Z, `fg`). Method: a counting job
/// on node 3 without a pty; SIGTSTP to its `krg run`: `krg run` stops
/// itself and `krg ps` shows the job `stopped`; SIGCONT to `krg run`: the
/// job counts on and shows `running`.
#[test]
fn lab_jobs_tstp_to_krg_run_suspends_the_job() {
    let Some(lab) = lab_up() else { return };
    let counter = "echo gpid $KRG_GPID; i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done";
    let mut job = Running::spawn(krg_cmd(
        &lab,
        1,
        &["run", "-T", "--node", "3", "sh", "-c", counter],
    ));
    let gpid = job.gpid();
    job.expect_line(|l| l == "3", "3 (counting)");

    step("SIGTSTP to krg run stops the job, SIGCONT resumes it");
    job.signal(libc::SIGTSTP);
    wait_state(&lab, 1, &gpid, "stopped");
    lab::wait_until(WAIT, "krg run stopped itself", || {
        if is_stopped(job.pid()) {
            Ok(())
        } else {
            Err("running")
        }
    })
    .unwrap();
    assert_paused(&mut job);
    let paused_at = last_count(job.drain()).expect("counted");
    job.signal(libc::SIGCONT);
    job.expect_line(
        |l| l.parse::<u64>().is_ok_and(|n| n > paused_at),
        "counting on after SIGCONT",
    );
    wait_state(&lab, 1, &gpid, "running");
    ok(krg_cmd(&lab, 1, &["kill", &gpid]));
    let status = job.wait(WAIT);
    assert_eq!(status.code(), Some(143), "krg run after krg kill: {status}");
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// The counting job prints nothing new for a second (a line already on
/// its way when it stopped is let through first: 300 ms).
fn assert_paused(job: &mut Running) {
    thread::sleep(Duration::from_millis(300));
    let before = job.drain().len();
    thread::sleep(Duration::from_secs(1));
    let after = job.drain();
    assert_eq!(
        after.len(),
        before,
        "a stopped job went on printing: {:?}",
        &after[before.saturating_sub(3)..]
    );
}

/// Goal: every job is visible and controllable from every node, and only
/// by its owner (or root). Method: detached jobs on node 3 from node 1;
/// `krg ps --json` on nodes 1 and 2; `krg kill`, `krg wait`, `krg logs` by
/// root and by user 65534; `krg logs -f` following a detached job to its
/// end and `krg wait` giving its status.
#[test]
fn lab_jobs_ps_kill_wait_logs() {
    let Some(lab) = lab_up() else { return };

    step("a detached job on node 3 shows in ps on nodes 1 and 2");
    let gpid = ok(krg_cmd(
        &lab,
        1,
        &["run", "-d", "--node", "3", "sleep", "300"],
    ))
    .trim()
    .to_string();
    gpid.parse::<Gpid>()
        .unwrap_or_else(|e| panic!("krg run -d printed {gpid:?}: {e}"));
    for k in [1, 2] {
        let job = wait_state(&lab, k, &gpid, "running");
        for key in ["gpid", "user", "home", "node", "state", "cmd"] {
            assert!(job.get(key).is_some(), "no {key} in {job}");
        }
        assert_eq!(job["node"], 3, "{job}");
        assert_eq!(job["home"], 1, "{job}");
        assert_eq!(job["user"], "root", "{job}");
        assert_eq!(job["cmd"], "sleep 300", "{job}");
    }

    step("krg kill from node 1 ends it; krg wait says 143");
    ok(krg_cmd(&lab, 1, &["kill", &gpid]));
    let out = run(krg_cmd(&lab, 2, &["wait", &gpid]));
    assert_eq!(code(&out), 143, "krg wait {gpid}: {}", show(&out));
    wait_gone_from_ps(&lab, 2, &gpid);

    step("another user may not kill, wait on or read a job");
    let other = ok(krg_cmd(
        &lab,
        1,
        &["run", "-d", "--node", "3", "sleep", "300"],
    ))
    .trim()
    .to_string();
    wait_state(&lab, 1, &other, "running");
    for (k, args) in [
        (1, vec!["kill", other.as_str()]),
        (2, vec!["kill", "-KILL", other.as_str()]),
        (1, vec!["logs", other.as_str()]),
        (2, vec!["wait", other.as_str()]),
    ] {
        let out = output_of(
            krg_as_nobody(&lab, k, &args),
            Input::Idle,
            Duration::from_secs(30),
        );
        assert_ne!(code(&out), 0, "krg {args:?} as nobody: {}", show(&out));
        assert!(
            stderr(&out).contains("permission denied"),
            "krg {args:?} as nobody: {}",
            show(&out)
        );
    }
    let job = wait_state(&lab, 2, &other, "running");
    assert_eq!(job["node"], 3, "{job}");
    ok(krg_cmd(&lab, 1, &["kill", "-KILL", &other]));
    let out = run(krg_cmd(&lab, 1, &["wait", &other]));
    assert_eq!(code(&out), 137, "krg wait {other}: {}", show(&out));

    step("krg logs -f follows a detached job to its end; krg wait gives its status");
    let gpid = ok(krg_cmd(
        &lab,
        1,
        &[
            "run",
            "-d",
            "--node",
            "3",
            "sh",
            "-c",
            "for i in 1 2 3 4 5; do echo line $i; sleep 0.2; done; echo oops >&2; exit 7",
        ],
    ))
    .trim()
    .to_string();
    let mut follow = Running::spawn(krg_cmd(&lab, 2, &["logs", "-f", &gpid]));
    follow.expect_line(|l| l == "line 1", "line 1");
    let status = follow.wait(WAIT);
    assert!(
        status.success(),
        "krg logs -f: {status}; {}",
        follow.stderr()
    );
    let lines = follow.all_lines();
    assert_eq!(
        lines,
        ["line 1", "line 2", "line 3", "line 4", "line 5", "oops"],
        "krg logs -f {gpid}"
    );
    let out = run(krg_cmd(&lab, 1, &["wait", &gpid]));
    assert_eq!(code(&out), 7, "krg wait {gpid}: {}", show(&out));
    let out = run(krg_cmd(&lab, 3, &["logs", &gpid]));
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        stdout(&out),
        "line 1\nline 2\nline 3\nline 4\nline 5\noops\n",
        "krg logs {gpid} after its end"
    );
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: programs that fork and pipelines of jobs behave as locally.
/// Method: a C program (tests/workloads/fork_tree.c) forking 16 children
/// that print their index and exit with it, the parent printing the sum of
/// their statuses: run locally and through `krg run --node 2`, same lines
/// (children in any order) and same exit status; `krg run --node 2 seq 1
/// 100000 | krg run --node 3 wc -l` in a shell on node 1.
#[test]
fn lab_jobs_fork_tree_and_pipeline() {
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("fork");
    let program = scratch.join("fork_tree");
    compile("cc", &[], &workload("fork_tree.c"), &program);
    let program = program.to_str().expect("utf-8 path");

    step("16 children, locally and on node 2");
    let local = Command::new(program).output().expect("runs locally");
    assert!(local.status.success(), "locally: {}", show(&local));
    let sorted = |out: &Output| {
        let mut lines: Vec<String> = stdout(out).lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    assert_eq!(stdout(&local).lines().last(), Some("sum 120"));
    let remote = run(krg_cmd(&lab, 1, &["run", "--node", "2", program]));
    assert!(remote.status.success(), "on node 2: {}", show(&remote));
    assert_eq!(sorted(&remote), sorted(&local));
    assert_eq!(stdout(&remote).lines().last(), Some("sum 120"));
    assert_eq!(stderr(&remote), "");

    step("a pipeline of two jobs on two nodes");
    let mut shell = lab.command(1, "sh").expect("node 1");
    shell
        .args([
            "-c",
            &format!("{KRG} run --node 2 seq 1 100000 | {KRG} run --node 3 wc -l"),
        ])
        .current_dir("/tmp");
    let out = run(shell);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "100000");

    step("the same with two krg run processes piped together here");
    let mut first = krg_cmd(&lab, 1, &["run", "-T", "--node", "2", "seq", "1", "100000"]);
    first.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut first = first.spawn().expect("starts krg run seq");
    let mut second = krg_cmd(&lab, 2, &["run", "-T", "--node", "3", "wc", "-l"]);
    second.stdin(Stdio::from(first.stdout.take().expect("piped")));
    let out = output_of(second, Input::AsSet, RUN_TIMEOUT);
    let status = first.wait().expect("waits");
    assert!(status.success(), "krg run seq: {status}");
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(stdout(&out).trim(), "100000");
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: an unmodified MPI launcher starts its ranks through `krg-rsh`.
/// Method: tests/workloads/mpi_hello.c compiled with `mpicc` into a
/// directory every node sees (the lab shares this machine's file system);
/// a `krg-rsh` symlink to `krg` first on PATH; MPICH's `mpiexec -launcher
/// ssh -launcher-exec krg-rsh` on node 1 over the three host names, with
/// `-iface eth0` (the lab's host names are not in any resolver, so the
/// proxies must call back to an address). Each rank prints its rank and
/// host name: three ranks on three hosts.
#[test]
fn lab_jobs_mpich_over_krg_rsh() {
    if !(on_path("mpicc") && on_path("mpiexec")) {
        if std::env::var_os("KRG_REQUIRE_LAB").is_some_and(|v| v == "1") {
            panic!("MPICH's mpicc and mpiexec are needed (Debian: apt-get install mpich)");
        }
        eprintln!("skipped: MPICH's mpicc and mpiexec are not installed");
        return;
    }
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("mpi");
    let program = scratch.join("mpi_hello");
    compile("mpicc", &[], &workload("mpi_hello.c"), &program);
    let bin = scratch.join("bin");
    fs::create_dir(&bin).expect("mkdir");
    std::os::unix::fs::symlink(KRG, bin.join("krg-rsh")).expect("symlink");
    let path = std::env::join_paths(
        [
            bin.clone(),
            Path::new(KRG).parent().expect("dir").to_path_buf(),
        ]
        .into_iter()
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )),
    )
    .expect("a PATH");

    step("mpiexec -n 3 over krg-lab-1,2,3 through krg-rsh");
    let mut mpiexec = lab.command(1, "mpiexec").expect("node 1");
    mpiexec
        .env("PATH", path)
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .args([
            "-launcher",
            "ssh",
            "-launcher-exec",
            "krg-rsh",
            "-iface",
            "eth0",
        ])
        .args(["-hosts", "krg-lab-1,krg-lab-2,krg-lab-3", "-n", "3"])
        .arg(&program);
    let out = output_of(mpiexec, Input::AsSet, RUN_TIMEOUT);
    assert!(out.status.success(), "mpiexec: {}", show(&out));
    let mut ranks: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    ranks.sort();
    assert_eq!(
        ranks,
        [
            "rank 0 of 3 on krg-lab-1",
            "rank 1 of 3 on krg-lab-2",
            "rank 2 of 3 on krg-lab-3"
        ],
        "{}",
        show(&out)
    );
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: bad input gets one clear error and leaves nothing behind.
/// Method: an unknown node, a missing command, a file that is not
/// executable, a working directory that exists only on the calling side
/// (a tmpfs mounted in a private mount namespace of the client) and one
/// removed under the client, an environment over 1 MiB, unknown gpids for
/// `krg kill` and `krg wait`; then no job, job cgroup or stray process on
/// any node.
#[test]
fn lab_jobs_bad_input() {
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("bad");

    step("unknown node");
    let out = run(krg_cmd(&lab, 1, &["run", "--node", "9", "true"]));
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(stderr(&out).contains("no node 9"), "{}", show(&out));

    step("a command that does not exist");
    let out = run(krg_cmd(&lab, 1, &["run", "nosuchcommand"]));
    assert_eq!(code(&out), 127, "{}", show(&out));
    assert_eq!(
        stderr(&out),
        "krg: nosuchcommand: No such file or directory\n"
    );

    step("a file that is not executable");
    let script = scratch.join("not-executable");
    fs::write(&script, "echo should not run\n").expect("writes");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod");
    let script = script.to_str().expect("utf-8");
    let out = run(krg_cmd(&lab, 1, &["run", "--node", "2", script]));
    assert_eq!(code(&out), 126, "{}", show(&out));
    assert_eq!(stderr(&out), format!("krg: {script}: Permission denied\n"));
    assert_eq!(stdout(&out), "");

    step("a working directory that does not exist on the target");
    let mount_point = scratch.join("private");
    fs::create_dir(&mount_point).expect("mkdir");
    let only_here = mount_point.join("only-here");
    let mut client = lab.command(1, "unshare").expect("node 1");
    client
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs tmpfs {0} && mkdir {1} && cd {1} && exec {KRG} run --node 2 pwd",
            mount_point.display(),
            only_here.display()
        ));
    let out = run(client);
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert_eq!(stdout(&out), "", "{}", show(&out));
    assert!(
        stderr(&out).contains(&only_here.display().to_string()),
        "the error names the directory: {}",
        show(&out)
    );

    step("a working directory removed under the client");
    let gone = scratch.join("gone");
    let mut client = lab.command(1, "sh").expect("node 1");
    client.arg("-c").arg(format!(
        "mkdir {0} && cd {0} && rmdir {0} && exec {KRG} run --node 2 pwd",
        gone.display()
    ));
    let out = run(client);
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert_eq!(stdout(&out), "", "{}", show(&out));
    assert!(stderr(&out).contains("directory"), "{}", show(&out));

    step("an environment over 1 MiB");
    let mut big = krg_cmd(&lab, 1, &["run", "--node", "2", "true"]);
    let chunk = "x".repeat(110_000);
    for i in 0..10 {
        big.env(format!("KRG_TEST_BIG_{i}"), &chunk);
    }
    let out = run(big);
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(
        stderr(&out).starts_with("krg: the environment is ") && stderr(&out).contains("allowed"),
        "{}",
        show(&out)
    );

    step("unknown gpids");
    let out = run(krg_cmd(&lab, 1, &["kill", "1:999999"]));
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(stderr(&out).contains("no job 1:999999"), "{}", show(&out));
    let out = run(krg_cmd(&lab, 1, &["wait", "7:1"]));
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(stderr(&out).contains("7:1"), "{}", show(&out));
    let out = run(krg_cmd(&lab, 2, &["logs", "1:999999"]));
    assert_ne!(code(&out), 0, "{}", show(&out));
    assert!(stderr(&out).contains("no job 1:999999"), "{}", show(&out));

    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// Goal: an error is said once, in one sentence. Method: `krg wait`,
/// `krg logs` and `krg run` with a bad gpid or node, their stderr compared
/// with the expected line.
#[test]
fn lab_jobs_errors_are_said_once() {
    let Some(lab) = lab_up() else { return };
    let out = run(krg_cmd(&lab, 1, &["wait", "1:999999"]));
    assert_eq!(stderr(&out), "krg: no job 1:999999 in this cluster\n");
    let out = run(krg_cmd(&lab, 1, &["logs", "1:999999"]));
    assert_eq!(stderr(&out), "krg: no job 1:999999 in this cluster\n");
    let out = run(krg_cmd(&lab, 1, &["wait", "7:1"]));
    assert_eq!(
        stderr(&out).matches("7:1").count(),
        1,
        "said once: {}",
        show(&out)
    );
}

/// Goal: launches on another node, back to back (a spare connection made
/// ahead serves the next one) or far apart (the spare has expired unused),
/// all succeed and leave nothing a node logs as a warning. Method: three
/// `krg run --node 2 true` from node 1, the last after the spare's use-by
/// time; then past the time node 2 waits for a connection's first frame,
/// the `WARN` lines of both nodes' logs about node-port connections.
#[test]
fn lab_jobs_remote_launches_leave_no_warnings() {
    let Some(lab) = lab_up() else { return };
    let launch = |what: &str| {
        let out = run(krg_cmd(&lab, 1, &["run", "--node", "2", "true"]));
        assert!(out.status.success(), "{what}: {}", show(&out));
    };
    launch("first launch");
    launch("launch right after");
    // Longer than a spare is kept (half of the peer's 5 s wait).
    thread::sleep(Duration::from_secs(3));
    launch("launch after the spare expired");
    // Longer than the peer waits for the first frame of the new spare.
    thread::sleep(Duration::from_secs(6));
    for k in [1, 2] {
        let log = fs::read_to_string(lab.log(k)).unwrap_or_default();
        let warned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("node-port connection"))
            .collect();
        assert!(warned.is_empty(), "node {k} warned: {warned:#?}");
    }
}

/// Goal: a command that cannot be executed is reported as a shell would,
/// every time, also when krgd is busy. Method: a shell on node 1 starts 40
/// `krg run` at once in the background (stdin from /dev/null), half of a
/// missing command and half of a file that is not executable, on nodes 2
/// and 3, each writing its stderr and exit code to a file; two rounds.
/// Each must exit 127 or 126 with its `krg: CMD: ...` line.
#[test]
fn lab_jobs_exec_errors_reported_under_load() {
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("exec");
    let script = scratch.join("not-executable");
    fs::write(&script, "echo should not run\n").expect("writes");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).expect("chmod");
    let script = script.to_str().expect("utf-8").to_string();
    let out_dir = scratch.join("out");
    let mut wrong = Vec::new();
    for round in 0..2 {
        let _ = fs::remove_dir_all(&out_dir);
        fs::create_dir(&out_dir).expect("mkdir");
        let mut shell = lab.command(1, "sh").expect("node 1");
        shell
            .arg("-c")
            .arg(format!(
                "for i in $(seq 1 40); do \
                   if [ $i -le 20 ]; then cmd=nosuchcommand; else cmd={script}; fi; \
                   ({KRG} run --node $((2 + i % 2)) $cmd </dev/null 2>&1; echo \"exit $?\") \
                     > {dir}/$i & \
                 done; wait",
                dir = out_dir.display()
            ))
            .current_dir("/tmp");
        ok(shell);
        for i in 1..=40 {
            let want = if i <= 20 {
                "krg: nosuchcommand: No such file or directory\nexit 127\n".to_string()
            } else {
                format!("krg: {script}: Permission denied\nexit 126\n")
            };
            let got = fs::read_to_string(out_dir.join(i.to_string())).unwrap_or_default();
            if got != want {
                wrong.push(format!("round {round}, client {i}: {got:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{} of 80 wrong: {wrong:#?}", wrong.len());
    assert_nothing_left(&lab, &[1, 2, 3]);
}

/// How many jobs `lab_jobs_many_jobs_leave_nothing` runs.
const MANY_JOBS: u32 = 1000;

/// Goal: many jobs leave krgd as they found it. Method: after 20 warm-up
/// jobs, note the RSS and fd count of node 1's and node 2's krgd; run 1,000
/// `krg run --node 2 true` one after another from a shell on node 1 (timed);
/// then RSS at most 20 MiB and fds at most 2 above where they were, no job
/// cgroup, no stray process, and every job exited 0.
#[test]
fn lab_jobs_many_jobs_leave_nothing() {
    let Some(lab) = lab_up() else { return };
    let loop_of = |n: u32| {
        let mut shell = lab.command(1, "sh").expect("node 1");
        shell
            .arg("-c")
            .arg(format!(
                "i=0; while [ $i -lt {n} ]; do {KRG} run -T --node 2 true; rc=$?; \
                 [ $rc -eq 0 ] || echo \"job $i: exit $rc\"; i=$((i+1)); done"
            ))
            .current_dir("/tmp");
        shell
    };
    let warm_up = ok(loop_of(20));
    let pids = [daemon_pid(&lab, 1), daemon_pid(&lab, 2)];
    let before: Vec<(u64, usize)> = pids.iter().map(|&p| (rss_kib(p), fd_count(p))).collect();

    step(&format!("{MANY_JOBS} jobs one after another"));
    let started = Instant::now();
    let out = output_of(loop_of(MANY_JOBS), Input::Idle, Duration::from_secs(300));
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{}", show(&out));
    let failed: Vec<String> = warm_up
        .lines()
        .chain(stdout(&out).lines())
        .map(str::to_string)
        .collect();
    eprintln!(
        "{MANY_JOBS} jobs in {:.1} s ({:.1} ms per job)",
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / f64::from(MANY_JOBS)
    );
    assert_nothing_left(&lab, &[1, 2]);
    for (i, k) in [1u32, 2].into_iter().enumerate() {
        let pid = pids[i];
        let (rss_before, fds_before) = before[i];
        let settled = lab::wait_until(WAIT, &format!("node {k}'s krgd back to its fds"), || {
            let fds = fd_count(pid);
            if fds <= fds_before + 2 {
                Ok(fds)
            } else {
                Err(format!(
                    "{fds} fds ({}), {fds_before} before",
                    fd_kinds(pid)
                ))
            }
        });
        let rss = rss_kib(pid);
        eprintln!(
            "node {k}'s krgd: RSS {rss_before} -> {rss} KiB, fds {fds_before} -> {}",
            fd_count(pid)
        );
        settled.unwrap();
        assert!(
            rss <= rss_before + (20 << 10),
            "node {k}'s krgd grew from {rss_before} to {rss} KiB over {MANY_JOBS} jobs"
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {} `krg run -T --node 2 true` failed: {failed:?}",
        failed.len(),
        MANY_JOBS + 20
    );
}

/// Goal: a job that ends at once, or without reading all its input, still
/// ends cleanly for its `krg run` (as `cat big | head -c 10` does for
/// head). Method: from the test itself, 100 `krg run --node 2 true` with
/// stdin from /dev/null, then 150 `krg run --node 2 head -c 10` with stdin
/// from /dev/zero: each must exit 0 (not die from a signal, such as
/// SIGPIPE when krgd closed the connection while `krg run` still wrote
/// stdin or its end), the latter printing 10 bytes.
#[test]
fn lab_jobs_quick_jobs_end_cleanly() {
    let Some(lab) = lab_up() else { return };
    let mut failed = Vec::new();
    for i in 0..100 {
        let mut command = krg_cmd(&lab, 1, &["run", "--node", "2", "true"]);
        command.stdin(Stdio::null());
        let out = output_of(command, Input::AsSet, RUN_TIMEOUT);
        if !out.status.success() {
            failed.push(format!("true {i}: {}", show(&out)));
        }
    }
    for i in 0..150 {
        let mut command = krg_cmd(&lab, 1, &["run", "--node", "2", "head", "-c", "10"]);
        command.stdin(fs::File::open("/dev/zero").expect("opens /dev/zero"));
        let out = output_of(command, Input::AsSet, RUN_TIMEOUT);
        if !out.status.success() || out.stdout != [0u8; 10] {
            failed.push(format!("head {i}: {}", show(&out)));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 250 failed: {failed:#?}",
        failed.len()
    );
    assert_nothing_left(&lab, &[1, 2]);
}

/// Goal: clients that come and go at once, some killed mid-stream, leave
/// nothing behind. Method: 50 `krg run sh -c 'echo ready; exec cat'` at
/// once from node 1, half to node 2 and half to node 3; once every one has
/// printed `ready`, 25 of the clients (on both nodes) are killed with
/// SIGKILL; the other 25 are fed 40 lines, one every 20 ms, then end of
/// file, and must end normally with every line echoed; then no job, cgroup
/// or stray process is left, and the krgd of nodes 1 to 3 have at most 2
/// fds and 20 MiB of RSS more than before.
#[test]
fn lab_jobs_concurrent_clients_killed_leave_nothing() {
    let Some(lab) = lab_up() else { return };
    let pids: Vec<u32> = (1..=3).map(|k| daemon_pid(&lab, k)).collect();
    let before: Vec<(u64, usize)> = pids.iter().map(|&p| (rss_kib(p), fd_count(p))).collect();
    let killed = |i: usize| i % 4 < 2;

    step("50 clients at once");
    let mut jobs: Vec<Running> = (0..50)
        .map(|i| {
            let node = if i % 2 == 0 { "2" } else { "3" };
            Running::spawn(krg_cmd(
                &lab,
                1,
                &[
                    "run",
                    "-T",
                    "--node",
                    node,
                    "sh",
                    "-c",
                    "echo ready; exec cat",
                ],
            ))
        })
        .collect();
    for job in &mut jobs {
        job.expect_line(|l| l == "ready", "ready");
    }
    step("25 of them killed, the others fed 40 lines");
    for (i, job) in jobs.iter().enumerate() {
        if killed(i) {
            job.signal(libc::SIGKILL);
        }
    }
    for n in 0..40 {
        for (i, job) in jobs.iter_mut().enumerate() {
            if !killed(i) {
                writeln!(job.stdin(), "line {n}").expect("writes to krg run");
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    for (i, job) in jobs.iter_mut().enumerate() {
        if !killed(i) {
            job.close_stdin();
        }
    }
    for (i, job) in jobs.iter_mut().enumerate() {
        let status = job.wait(Duration::from_secs(30));
        if killed(i) {
            assert_eq!(status.signal(), Some(libc::SIGKILL), "client {i}");
        } else {
            assert!(status.success(), "client {i}: {status}; {}", job.stderr());
            let lines = job.all_lines();
            assert_eq!(lines.len(), 41, "client {i}: {lines:?}");
            assert_eq!(lines.last().map(String::as_str), Some("line 39"));
        }
    }
    drop(jobs);
    assert_nothing_left(&lab, &[1, 2, 3]);
    let mut failures = Vec::new();
    for (i, &pid) in pids.iter().enumerate() {
        let k = i + 1;
        let (rss_before, fds_before) = before[i];
        let settled = lab::wait_until(WAIT, &format!("node {k}'s krgd back to its fds"), || {
            let fds = fd_count(pid);
            if fds <= fds_before + 2 {
                Ok(fds)
            } else {
                Err(format!(
                    "{fds} fds ({}), {fds_before} before",
                    fd_kinds(pid)
                ))
            }
        });
        let rss = rss_kib(pid);
        eprintln!(
            "node {k}'s krgd: RSS {rss_before} -> {rss} KiB, fds {fds_before} -> {}",
            fd_count(pid)
        );
        if let Err(e) = settled {
            failures.push(format!("{e:#}"));
        }
        if rss > rss_before + (20 << 10) {
            failures.push(format!(
                "node {k}'s krgd grew from {rss_before} to {rss} KiB"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Goal: a job whose node dies is reported, by `krg run` as ssh would
/// (255 and one line) and by `krg ps` (state `lost`). Method: `krg run
/// --node 3 sleep 300` from node 1; once `krg ps` shows it running, node 3
/// is killed (daemon and everything in it); `krg run` must end within 15 s.
#[test]
fn lab_jobs_node_death_is_reported() {
    let Some(lab) = lab_up() else { return };
    let mut job = Running::spawn(krg_cmd(
        &lab,
        1,
        &[
            "run",
            "-T",
            "--node",
            "3",
            "sh",
            "-c",
            "echo gpid $KRG_GPID; exec sleep 300",
        ],
    ));
    let gpid = job.gpid();
    wait_state(&lab, 1, &gpid, "running");

    step("node 3 dies");
    let killed = Instant::now();
    lab.kill(3).expect("kills node 3");
    let status = job.wait(Duration::from_secs(15));
    eprintln!(
        "krg run ended {:.1} s after node 3 died",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(
        status.code(),
        Some(255),
        "krg run: {status}; {}",
        job.stderr()
    );
    assert_eq!(
        job.stderr(),
        format!("krg: node 3 went down while running job {gpid}\n")
    );
    let job = wait_state(&lab, 1, &gpid, "lost");
    assert_eq!(job["node"], 3, "{job}");
    assert_nothing_left(&lab, &[1, 2]);
}

/// A mount made in a node's mount namespace (its `krgd`'s: lab nodes have
/// their own, see `Lab::local_dir`), undone even when the test fails.
struct Mounted {
    daemon: u32,
    dir: PathBuf,
}

impl Mounted {
    fn tmpfs(daemon: u32, dir: &Path) -> Mounted {
        let mounted = Mounted {
            daemon,
            dir: dir.to_path_buf(),
        };
        fs::create_dir_all(mounted.reach(dir)).expect("mount point");
        mounted.mount(&["-t", "tmpfs", "krg-test"]);
        mounted
    }

    /// `mount ARGS DIR` in the node's mount namespace.
    fn mount(&self, args: &[&str]) {
        let st = self.in_node("mount").args(args).arg(&self.dir).status();
        assert!(
            st.expect("nsenter runs").success(),
            "mount {args:?} {} on the node",
            self.dir.display()
        );
    }

    fn in_node(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--mount=/proc/{}/ns/mnt", self.daemon))
            .arg("--")
            .arg(program);
        command
    }

    /// `path`, below this mount, as this process reaches it: through the
    /// node's root (`/proc/PID/root` is in that process's namespace).
    fn reach(&self, path: &Path) -> PathBuf {
        let relative = path.strip_prefix("/").expect("an absolute path");
        PathBuf::from(format!("/proc/{}/root", self.daemon)).join(relative)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.in_node("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Goal: a file system mounted on the node while krgd runs is there for
/// the next job, as for any process started after the mount. krgd keeps a
/// krg-init waiting for the next job (its namespaces made ahead); its mount
/// namespace must go on following the node's. Method: in node 1's mount
/// namespace (its krgd's), a tmpfs made a shared mount point (this
/// machine's root is private, so only what is under a shared mount
/// propagates); one job, so that an init made since waits; then a second
/// tmpfs mounted inside the first, with a file, and `krg run --node 1 cat`
/// of that file (it fails if the waiting init's mounts stop following the
/// node's). Then the same under a private tmpfs, whose mounts no waiting
/// init receives: the job must see it all the same (a waiting init made
/// before the node's mounts changed is not used).
#[test]
fn lab_jobs_see_mounts_made_while_krgd_runs() {
    let Some(lab) = lab_up() else { return };
    let scratch = new_scratch("mounts");
    let daemon = daemon_pid(&lab, 1);
    for (propagation, what) in [
        ("shared", "mounted after krgd started"),
        ("private", "mounted on a private mount"),
    ] {
        step(&format!(
            "a tmpfs mounted on a {propagation} one, with a file"
        ));
        let outer = Mounted::tmpfs(daemon, &scratch.join(propagation));
        outer.mount(&[&format!("--make-{propagation}")]);
        // This job takes the init waiting now; the next one, made as it
        // ends, has the outer tmpfs.
        let first = run(krg_cmd(&lab, 1, &["run", "--node", "1", "true"]));
        assert!(first.status.success(), "{}", show(&first));
        lab::wait_until(WAIT, "an init waiting for the next job on node 1", || {
            let waiting = children_of(daemon).into_iter().any(is_waiting_init);
            waiting.then_some(()).ok_or("none yet")
        })
        .unwrap();
        let late = Mounted::tmpfs(daemon, &outer.dir.join("late"));
        let file = late.dir.join("hello");
        fs::write(late.reach(&file), format!("{what}\n")).expect("write");
        let out = run(krg_cmd(
            &lab,
            1,
            &["run", "--node", "1", "cat", file.to_str().expect("utf-8")],
        ));
        assert!(out.status.success(), "{what}: {}", show(&out));
        assert_eq!(stdout(&out), format!("{what}\n"));
        drop(late);
        drop(outer);
    }
}
