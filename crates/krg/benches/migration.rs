//! Benchmark of issue 4: what moving and saving a running job costs, on a
//! 3-node lab cluster. Prints one JSON object per line. Needs root, CRIU
//! and /usr/bin/python3 (it builds a lab); run with `cargo bench --bench
//! migration` (release binaries).
//!
//! The job is tests/workloads/migration_memory.py: a Python process holding
//! 64 MiB, 256 MiB or 1 GiB of touched memory, idle or rewriting 10 MiB/s of
//! it, printing its wall-clock time every 10 ms. For each size, load and
//! mode (`stop`, `lazy`) it is started on node 1 under `krg run` and moved
//! to node 2 once:
//!
//! - `freeze_ms_krg`, `total_ms_krg`, `bytes`: what `krg migrate --json`
//!   reports;
//! - `freeze_ms_job`: the largest gap between two of the job's own
//!   timestamps around the move (10 ms when nothing stops it);
//! - `wall_ms`: `krg migrate` as the caller waits for it;
//! - `all_pages_ms`: until the source has sent its last page (lazy: when
//!   its migration image directory is removed; stop: `wall_ms`).
//!
//! `KRG_BENCH_MIB=64,1024`, `KRG_BENCH_REWRITE=0`, `KRG_BENCH_MODES=lazy`
//! pick the cases, `KRG_BENCH_RUNS=9` how many of each (3);
//! `KRG_BENCH_ONLY=migrate` leaves out the checkpoints,
//! `KRG_BENCH_ONLY=checkpoint` the moves; `KRG_BENCH_BASELINE=DIR` also
//! measures the `krgd` and `krg` of DIR (an older build) on a second lab,
//! one move (or checkpoint) on each lab in turn.
//!
//! Then, per size, `krg checkpoint --leave-running --json` (wall clock;
//! `criu_ms`: the part `krgd` spent in CRIU's dump, the record's
//! `dump_ms`) against `cp -r` of the image it wrote into the same image
//! store, after one checkpoint and copy not counted.

use krg::lab::{Lab, LabOptions};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KRG: &str = env!("CARGO_BIN_EXE_krg");

/// A lab and the `krg` its commands run: this build, or an older one
/// (`KRG_BENCH_BASELINE`) measured in the same turns.
struct Cluster {
    lab: Lab,
    krg: PathBuf,
    build: &'static str,
}

impl Cluster {
    fn up(name: String, bin_dir: Option<&Path>, build: &'static str) -> Cluster {
        let mut opts = LabOptions::new(name, 3);
        let (krgd, krg) = match bin_dir {
            Some(dir) => (dir.join("krgd"), dir.join("krg")),
            None => (env!("CARGO_BIN_EXE_krgd").into(), PathBuf::from(KRG)),
        };
        opts.krgd = Some(krgd);
        opts.krg = Some(krg.clone());
        opts.krgd_args = vec!["--load-scope".into(), "cgroup".into()];
        Cluster {
            lab: Lab::up(opts).expect("lab up"),
            krg,
            build,
        }
    }
}
const PYTHON: &str = "/usr/bin/python3";
const SIZES_MIB: [u64; 3] = [64, 256, 1024];
const REWRITE_MIB_S: [u64; 2] = [0, 10];
const MODES: [&str; 2] = ["stop", "lazy"];
/// Longest a job may take to fill its memory and print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest one `krg` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest the pages of a lazy move may take to arrive.
const PAGES_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the job runs before and after the move (its gaps are read in
/// that window).
const SETTLE: Duration = Duration::from_millis(1000);
const MIB: f64 = 1024.0 * 1024.0;
/// Moves (and checkpoints) per case, unless `KRG_BENCH_RUNS` says; the
/// medians are printed.
const RUNS: usize = 3;

fn runs() -> usize {
    std::env::var("KRG_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(RUNS)
}

fn now_epoch_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

/// Run `command` to its end, at most `timeout`; panics on a timeout.
fn bounded(mut command: Command, timeout: Duration) -> Output {
    let what = format!("{:?}", command.get_args().collect::<Vec<_>>());
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("waits"),
        Err(_) => {
            // SAFETY: kill(2) has no memory-safety preconditions; the child
            // is not reaped until wait_with_output returns.
            unsafe { libc::kill(id as i32, libc::SIGKILL) };
            panic!("{what} did not end within {timeout:?}");
        }
    }
}

fn krg(c: &Cluster, args: &[&str]) -> Output {
    let mut command = c.lab.command(1, &c.krg).expect("node 1");
    command.args(args).current_dir("/tmp");
    bounded(command, COMMAND_TIMEOUT)
}

fn krg_ok(c: &Cluster, args: &[&str]) -> String {
    let out = krg(c, args);
    assert!(
        out.status.success(),
        "krg {args:?}: {}; {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The memory job under `krg run` on node 1, its lines collected.
struct Job {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    gpid: String,
}

impl Job {
    fn start(c: &Cluster, script: &str, mib: u64, rate: u64) -> Job {
        let mut command = c.lab.command(1, &c.krg).expect("node 1");
        command
            .args(["run", "-T", "--node", "1", "sh", "-c"])
            .arg(format!(
                "echo gpid $KRG_GPID; exec {PYTHON} {script} {mib} {rate}"
            ))
            .current_dir("/tmp")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("starts krg run");
        let out = child.stdout.take().expect("piped");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("not poisoned").push(line);
            }
        });
        let mut job = Job {
            child,
            lines,
            gpid: String::new(),
        };
        job.gpid = job
            .wait_for(|l| l.starts_with("gpid "), READY_TIMEOUT)
            .trim_start_matches("gpid ")
            .to_string();
        job.wait_for(|l| l.starts_with("ready"), READY_TIMEOUT);
        job
    }

    fn wait_for(&self, want: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .expect("not poisoned")
                .iter()
                .find(|l| want(l))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the job printed no such line within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The largest gap (ms) between two of the job's timestamps from `since`
    /// (seconds since the epoch) on.
    fn largest_gap_ms(&self, since: f64) -> f64 {
        let lines = self.lines.lock().expect("not poisoned");
        let times: Vec<f64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("t ")?.parse().ok())
            .filter(|t| *t >= since)
            .collect();
        times
            .windows(2)
            .map(|w| (w[1] - w[0]) * 1000.0)
            .fold(0.0, f64::max)
    }

    fn end(mut self, c: &Cluster) {
        krg_ok(c, &["kill", &self.gpid]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "krg run did not end after krg kill"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Whether a lazy move of `gpid` still has pages to send (the source keeps
/// `<store>/<home>-<seq>/migrate-<ms>` until then).
fn pages_pending(c: &Cluster, gpid: &str) -> bool {
    std::fs::read_dir(c.lab.images_dir().join(gpid.replace(':', "-")))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("migrate-"))
}

/// One move of a fresh job; its figures, or the error `krg migrate` gave.
fn migration(c: &Cluster, script: &str, mib: u64, rate: u64, mode: &str) -> Result<Value, String> {
    let job = Job::start(c, script, mib, rate);
    thread::sleep(SETTLE);
    let since = now_epoch_s() - 0.5;
    let started = Instant::now();
    let out = krg(c, &["migrate", &job.gpid, "2", "--mode", mode, "--json"]);
    let wall_ms = started.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        job.end(c);
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    let report: Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    let deadline = Instant::now() + PAGES_TIMEOUT;
    while pages_pending(c, &job.gpid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let all_pages_ms = started.elapsed().as_secs_f64() * 1000.0;
    thread::sleep(SETTLE);
    let freeze_ms_job = job.largest_gap_ms(since);
    job.end(c);
    Ok(json!({
        "freeze_ms_krg": report["freeze_ms"].as_f64().unwrap_or(f64::NAN),
        "freeze_ms_job": freeze_ms_job,
        "total_ms_krg": report["total_ms"].as_f64().unwrap_or(f64::NAN),
        "wall_ms": wall_ms,
        "all_pages_ms": all_pages_ms,
        "bytes": report["bytes"].as_f64().unwrap_or(f64::NAN),
    }))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// [`runs`] moves of a fresh job; prints the medians (and each run's freeze
/// as the job saw it).
fn migrations(clusters: &[Cluster], script: &str, mib: u64, rate: u64, mode: &str) {
    let mut samples: Vec<Vec<Value>> = vec![Vec::new(); clusters.len()];
    // In turns: one move on each cluster, then again.
    for _ in 0..runs() {
        for (c, samples) in clusters.iter().zip(samples.iter_mut()) {
            match migration(c, script, mib, rate, mode) {
                Ok(sample) => samples.push(sample),
                Err(error) => {
                    println!(
                        "{}",
                        json!({"bench": "migrate", "build": c.build, "mib": mib, "rewrite_mib_s": rate, "mode": mode, "error": error})
                    );
                    return;
                }
            }
        }
    }
    for (c, samples) in clusters.iter().zip(samples) {
        let med = |key: &str| {
            median(
                samples
                    .iter()
                    .map(|s| s[key].as_f64().unwrap_or(f64::NAN))
                    .collect(),
            )
        };
        let all_pages_ms = med("all_pages_ms");
        let bytes = med("bytes");
        println!(
            "{}",
            json!({"bench": "migrate", "build": c.build, "mib": mib, "rewrite_mib_s": rate, "mode": mode, "runs": runs(),
                "freeze_ms_krg": med("freeze_ms_krg"), "freeze_ms_job": round1(med("freeze_ms_job")),
                "freeze_ms_job_each": samples.iter().map(|s| round1(s["freeze_ms_job"].as_f64().unwrap_or(f64::NAN))).collect::<Vec<_>>(),
                "total_ms_krg": med("total_ms_krg"), "wall_ms": med("wall_ms").round(),
                "all_pages_ms": all_pages_ms.round(), "bytes": bytes,
                "mb_per_s_all_pages": round1(bytes / 1e6 / (all_pages_ms / 1000.0))})
        );
    }
}

/// Write back every dirty page, so that each timed write starts from the
/// same state (a checkpoint's pages would otherwise slow the `cp` after it).
fn sync() {
    let out = bounded(Command::new("sync"), COMMAND_TIMEOUT);
    assert!(out.status.success(), "sync failed");
}

/// [`runs`] checkpoints of one job per cluster (`--leave-running`) after
/// one not counted, the clusters in turns, each checkpoint followed by a `cp -r` of the image it
/// wrote to a sibling directory of the store; the medians.
fn checkpoints(clusters: &[Cluster], script: &str, mib: u64) {
    let jobs: Vec<Job> = clusters
        .iter()
        .map(|c| Job::start(c, script, mib, 0))
        .collect();
    thread::sleep(SETTLE);
    // One unmeasured turn: the first checkpoint writes into memory the VM
    // has not touched for a while (2.6-4.5 times slower, seen at 256 MiB),
    // which the `cp` after it then finds warm.
    for (c, job) in clusters.iter().zip(&jobs) {
        checkpoint_and_cp(c, &job.gpid);
    }
    let mut samples: Vec<Vec<CheckpointSample>> = vec![Vec::new(); clusters.len()];
    for _ in 0..runs() {
        for ((c, job), samples) in clusters.iter().zip(&jobs).zip(samples.iter_mut()) {
            samples.push(checkpoint_and_cp(c, &job.gpid));
        }
    }
    for ((c, job), samples) in clusters.iter().zip(jobs).zip(samples) {
        let gpid = job.gpid.clone();
        job.end(c);
        krg_ok(c, &["images", "rm", &gpid]);
        let bytes = samples.last().map_or(0, |s| s.bytes);
        let copied = samples.last().map_or(0, |s| s.copied);
        let checkpoint_s = median(samples.iter().map(|s| s.checkpoint_s).collect());
        let cp_s = median(samples.iter().map(|s| s.cp_s).collect());
        let criu_ms = median(samples.iter().map(|s| s.criu_ms as f64).collect());
        let checkpoint_mib_s = bytes as f64 / MIB / checkpoint_s;
        let cp_mib_s = copied as f64 / MIB / cp_s;
        println!(
            "{}",
            json!({"bench": "checkpoint", "build": c.build, "mib": mib, "runs": runs(), "bytes": bytes,
                "checkpoint_ms": (checkpoint_s * 1000.0).round(), "checkpoint_mib_s": round1(checkpoint_mib_s),
                "checkpoint_ms_each": samples.iter().map(|s| (s.checkpoint_s * 1000.0).round()).collect::<Vec<_>>(),
                "criu_ms": criu_ms,
                "cp_bytes": copied, "cp_ms": (cp_s * 1000.0).round(), "cp_mib_s": round1(cp_mib_s),
                "cp_ms_each": samples.iter().map(|s| (s.cp_s * 1000.0).round()).collect::<Vec<_>>(),
                "checkpoint_speed_vs_cp": (checkpoint_mib_s / cp_mib_s * 100.0).round() / 100.0})
        );
    }
}

#[derive(Clone)]
struct CheckpointSample {
    checkpoint_s: f64,
    /// What `krgd` spent in CRIU's dump (the image record's `dump_ms`).
    criu_ms: u64,
    cp_s: f64,
    bytes: u64,
    copied: u64,
}

/// One checkpoint of job `gpid` and one `cp -r` of its image, both timed
/// from written-back page cache; the image and its copy are removed.
fn checkpoint_and_cp(c: &Cluster, gpid: &str) -> CheckpointSample {
    sync();
    let started = Instant::now();
    let text = krg_ok(c, &["checkpoint", gpid, "--leave-running", "--json"]);
    let checkpoint_s = started.elapsed().as_secs_f64();
    let record: Value = serde_json::from_str(&text).expect("checkpoint --json");
    let bytes = record["bytes"].as_u64().expect("bytes");
    let criu_ms = record["dump_ms"].as_u64().expect("dump_ms");
    let image = PathBuf::from(record["path"].as_str().expect("path"));
    let copy = image.with_file_name("cp-bench");
    let _ = std::fs::remove_dir_all(&copy);
    sync();
    let started = Instant::now();
    let mut cp = Command::new("cp");
    cp.arg("-r").arg(&image).arg(&copy);
    let out = bounded(cp, COMMAND_TIMEOUT);
    let cp_s = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = dir_bytes(&copy);
    let _ = std::fs::remove_dir_all(&copy);
    let _ = std::fs::remove_dir_all(&image);
    CheckpointSample {
        checkpoint_s,
        criu_ms,
        cp_s,
        bytes,
        copied,
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A comma-separated list of numbers from the environment, else `default`.
fn env_list(name: &str, default: &[u64]) -> Vec<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: {n:?} is not a number"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("migration: needs root (it builds a lab cluster); skipped");
        return;
    }
    if !Path::new(PYTHON).is_file() {
        eprintln!("migration: needs {PYTHON}; skipped");
        return;
    }
    let scratch = std::env::temp_dir().join(format!("krg-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch directory");
    let script = scratch.join("migration_memory.py");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workloads/migration_memory.py"),
        &script,
    )
    .expect("copies the workload");
    let script = script.to_str().expect("utf-8 path").to_string();

    let id = std::process::id() % 100_000;
    let mut clusters = vec![Cluster::up(format!("mb{id}"), None, "this")];
    if let Some(dir) = std::env::var_os("KRG_BENCH_BASELINE") {
        clusters.push(Cluster::up(
            format!("mc{id}"),
            Some(Path::new(&dir)),
            "baseline",
        ));
    }
    for c in &clusters {
        // The first job on a node starts slowly (its cluster view): not measured.
        for node in ["1", "2", "3"] {
            krg_ok(c, &["run", "--node", node, "true"]);
        }
        // Nor are the first moves (CRIU's first runs, cold page cache).
        for mode in MODES {
            let _ = migration(c, &script, 16, 0, mode);
        }
    }
    let sizes = env_list("KRG_BENCH_MIB", &SIZES_MIB);
    let rates = env_list("KRG_BENCH_REWRITE", &REWRITE_MIB_S);
    let modes: Vec<String> = std::env::var("KRG_BENCH_MODES").map_or_else(
        |_| MODES.iter().map(|m| m.to_string()).collect(),
        |v| v.split(',').map(str::to_owned).collect(),
    );
    let only = std::env::var("KRG_BENCH_ONLY").ok();
    if only.as_deref() != Some("checkpoint") {
        for &mib in &sizes {
            for &rate in &rates {
                for mode in &modes {
                    migrations(&clusters, &script, mib, rate, mode);
                }
            }
        }
    }
    if only.as_deref() != Some("migrate") {
        for &mib in &sizes {
            checkpoints(&clusters, &script, mib);
        }
    }
    drop(clusters);
    let _ = std::fs::remove_dir_all(&scratch);
}
