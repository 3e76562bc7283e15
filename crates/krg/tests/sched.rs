//! The global scheduler (issue 5's acceptance list), for real on 3-node lab
//! clusters: `least-loaded` placement spreads CPU-bound jobs evenly on
//! equal nodes and by capacity on unequal ones; with `round-robin` and the
//! balancer off, jobs started with `--node 1` stay there, and turning the
//! `balance` balancer on (from another node) spreads them within seconds,
//! then nothing moves again (no job moves twice); a `--no-migrate` job is
//! never moved; `krg top --once` shows every node and job; every node's
//! `/metrics` parses as Prometheus text and its counters follow launches
//! and migrations.
//!
//! Jobs are real: `sh -c 'while :; do :; done'`, detached (`krg run -d`).
//! Every test makes its own lab (`s<topic><pid>`) with the `krgd` and `krg`
//! built with this test, each node reporting its own cgroup's load; names
//! start with `lab_` so that nextest's `lab` group runs them one at a time,
//! and a lock serialises them under `cargo test` too (the scheduler reacts to
//! load, which several labs sharing two cores would blur). Without root they
//! are skipped with a reason (a failure under `KRG_REQUIRE_LAB=1`).
//! `KRG_LAB_KEEP=1` keeps a failed test's lab for inspection. The whole file
//! takes about 85 s, most of it the 60 s during which the balanced cluster
//! must stay still. Two more tests guard against bugs found here: a lone
//! job must leave a slow node for an idle fast one, and a move whose dump
//! fails must leave the job running and the balancer balancing.
//!
//! Observing commands (`krg ps`, `krg events`, `krg sched show`) run from
//! this process against a node's socket, not inside the node: a `krg`
//! process in a node's cgroup is a runnable task there, which the scheduler
//! counts as load. Commands the acceptance list gives "on node K" (`krg
//! run`, `krg sched set`, `krg top`, `krg migrate`) run inside node K.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::{lab_options, serial, text, try_krg_within, try_output_of, Input, KRG, WAIT};
use krg::lab::{require_root_or_skip, wait_until, Lab, LabOptions};
use serde_json::Value;

/// A CPU-bound job: always runnable, tiny memory.
const SPIN: [&str; 3] = ["sh", "-c", "while :; do :; done"];
/// Longest a single `krg` command may take (a node limited to a quarter of
/// a CPU answers slowly while its jobs burn that quarter).
const KRG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long jobs started with `--node 1` must stay there, balancer off.
const STAY: Duration = Duration::from_secs(12);
/// The minimum residence given to the balancer: below `STAY`, so that the
/// jobs may move as soon as balancing is on, and well below `STILL`, so
/// that the quiet minute tests the hysteresis, not the residence.
const MIN_RESIDENCE: &str = "10s";
const MIN_RESIDENCE_MS: u64 = 10_000;
/// The balancer's period during the balancing test.
const INTERVAL: &str = "1s";
const INTERVAL_MS: u64 = 1_000;
/// The bound: some jobs reach nodes 2 and 3 this soon after
/// `krg sched set balancer balance`.
const SPREAD_WITHIN: Duration = Duration::from_secs(10);
/// The bound: no job moves twice in this long.
const STILL: Duration = Duration::from_secs(60);
/// How often the placement is sampled while waiting.
const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Where every krgd serves its metrics, inside its node's namespace.
const METRICS_ADDR: &str = "127.0.0.1:9470";
/// Bytes of a `/metrics` answer read at most.
const METRICS_BYTES_MAX: u64 = 1 << 20;
/// Lines of a node's log shown when a test fails.
const LOG_LINES: usize = 40;

// ---------------------------------------------------------------- the lab

/// Logs a step with the seconds since the test process started.
fn step(what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("--- {:6.1} s: {what}", start.elapsed().as_secs_f64());
}

/// A 3-node lab of this build's daemons, each reporting its own cgroup's
/// load, with these CPU limits (empty: none, every node has the machine's
/// CPUs).
fn up(topic: &str, cpu_limits: &[f64]) -> Lab {
    let options = LabOptions {
        cpu_limits: cpu_limits.to_vec(),
        ..lab_options(format!("s{topic}{}", std::process::id()))
    };
    let lab = Lab::up(options).expect("the lab cluster forms");
    step(&format!(
        "lab {} up (CPU limits {cpu_limits:?})",
        lab.name()
    ));
    lab
}

/// Kills the lab's jobs when the test ends (also on a panic), before the
/// lab is removed: removing a lab whose jobs still run takes about 10 s
/// more. Declare it after the lab, so that it is dropped first.
struct KillJobs<'a>(&'a Lab);

impl Drop for KillJobs<'_> {
    fn drop(&mut self) {
        let lab = self.0;
        let running = |lab: &Lab| -> Vec<String> {
            placement(lab, 1)
                .map(|p| p.into_keys().collect())
                .unwrap_or_default()
        };
        let gpids = running(lab);
        if gpids.is_empty() {
            return;
        }
        let mut args = vec!["kill", "-s", "KILL"];
        args.extend(gpids.iter().map(String::as_str));
        let _ = ask(lab, 1, &args);
        let _ = wait_until(WAIT, "the jobs gone", || {
            let left = running(lab);
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        });
    }
}

/// The last lines of node K's daemon log, for failure messages.
fn log_tail(lab: &Lab, k: u32) -> String {
    let text = fs::read_to_string(lab.log(k)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "--- node {k} log ({}):\n{}",
        lab.log(k).display(),
        lines[lines.len().saturating_sub(LOG_LINES)..].join("\n")
    )
}

fn logs(lab: &Lab) -> String {
    (1..=lab.nodes())
        .map(|k| log_tail(lab, k))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `krg ARGS` on node K: its stdout, or why it failed.
fn try_krg(lab: &Lab, k: u32, args: &[&str]) -> Result<String, String> {
    try_krg_within(lab, k, args, KRG_TIMEOUT)
}

/// `krg ARGS` against node K's socket, run from this test process rather
/// than inside the node: observing the cluster (ps, events, sched show)
/// must not add runnable tasks to a node's cgroup, which is the load the
/// scheduler reads.
fn ask(lab: &Lab, k: u32, args: &[&str]) -> Result<String, String> {
    let what = format!("`krg {}` against node {k}'s socket", args.join(" "));
    let mut command = Command::new(KRG);
    command.args(args).env("KRG_SOCKET", lab.socket(k));
    let out =
        try_output_of(command, Input::Null, KRG_TIMEOUT).map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!(
            "{what}: {}: {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ))
    }
}

fn krg(lab: &Lab, k: u32, args: &[&str]) -> String {
    try_krg(lab, k, args).unwrap_or_else(|e| panic!("{e}\n{}", logs(lab)))
}

fn json_of(out: &str, what: &str) -> Result<Value, String> {
    serde_json::from_str(out).map_err(|e| format!("{what} printed {out:?}: {e}"))
}

// ------------------------------------------------------ jobs and policies

/// Start a spinning job from node K with `options` (`--node 1`,
/// `--no-migrate`, ...); returns its gpid.
fn spin(lab: &Lab, k: u32, options: &[&str]) -> String {
    let mut args = vec!["run", "-d"];
    args.extend_from_slice(options);
    args.extend_from_slice(&SPIN);
    let gpid = krg(lab, k, &args).trim().to_string();
    assert!(
        gpid.split_once(':')
            .is_some_and(|(h, s)| h.parse::<u16>().is_ok() && s.parse::<u64>().is_ok()),
        "`krg run -d` printed {gpid:?}, not a gpid"
    );
    gpid
}

fn ps(lab: &Lab, k: u32) -> Result<Vec<Value>, String> {
    let out = ask(lab, k, &["ps", "--json"])?;
    json_of(&out, "`krg ps --json`")?
        .as_array()
        .cloned()
        .ok_or_else(|| format!("`krg ps --json` printed no array: {out}"))
}

/// Where each running job is (gpid → node), as node K's `krg ps` says.
fn placement(lab: &Lab, k: u32) -> Result<BTreeMap<String, u64>, String> {
    Ok(ps(lab, k)?
        .iter()
        .filter(|j| j["state"] == "running")
        .filter_map(|j| Some((j["gpid"].as_str()?.to_string(), j["node"].as_u64()?)))
        .collect())
}

/// Consecutive failed `krg ps` samples a long observation tolerates.
const PS_ERRORS_MAX: usize = 3;

/// One sample of the placement for a long observation: a failed `krg ps`
/// is noted in `errors` (and shown at the end) rather than ending the test
/// at once; `PS_ERRORS_MAX` failures in a row do end it.
fn sample(lab: &Lab, errors: &mut Vec<String>, run: &mut usize) -> Option<BTreeMap<String, u64>> {
    match placement(lab, 1) {
        Ok(p) => {
            *run = 0;
            Some(p)
        }
        Err(e) => {
            eprintln!("krg ps failed: {e}");
            errors.push(e);
            *run += 1;
            assert!(
                *run <= PS_ERRORS_MAX,
                "krg ps failed {run} times in a row: {errors:#?}\n{}",
                logs(lab)
            );
            None
        }
    }
}

/// Wait until node K's `krg ps` shows every job of `gpids` running; returns
/// the placement of those jobs.
fn wait_running(lab: &Lab, k: u32, gpids: &[String]) -> BTreeMap<String, u64> {
    wait_until(WAIT, &format!("jobs {gpids:?} running"), || {
        let now = placement(lab, k)?;
        let mine: BTreeMap<String, u64> =
            now.into_iter().filter(|(g, _)| gpids.contains(g)).collect();
        if mine.len() == gpids.len() {
            Ok(mine)
        } else {
            Err(format!("running: {mine:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)))
}

/// Jobs per node (index 0 is node 1).
fn per_node(placement: &BTreeMap<String, u64>) -> [usize; 3] {
    let mut counts = [0; 3];
    for node in placement.values() {
        let i = usize::try_from(*node).expect("a small node id") - 1;
        counts[i] += 1;
    }
    counts
}

/// The CPU time job `gpid` has used, as node 1's `krg ps` says.
fn cpu_seconds(lab: &Lab, gpid: &str) -> Result<f64, String> {
    ps(lab, 1)?
        .iter()
        .find(|j| j["gpid"] == gpid)
        .and_then(|j| j["cpu_seconds"].as_f64())
        .ok_or_else(|| format!("no job {gpid} in krg ps"))
}

/// Wait until job `gpid` has used `seconds` of CPU (its command runs).
fn wait_cpu(lab: &Lab, gpid: &str, seconds: f64) {
    wait_until(WAIT, &format!("{gpid} to use {seconds} s of CPU"), || {
        let used = cpu_seconds(lab, gpid)?;
        if used >= seconds {
            Ok(())
        } else {
            Err(format!("{used} s"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)));
}

fn sched_show(lab: &Lab, k: u32) -> Result<Value, String> {
    json_of(
        &ask(lab, k, &["sched", "show", "--json"])?,
        "`krg sched show --json`",
    )
}

/// Wait until node K's `krg sched show --json` has every `(field, value)`.
fn wait_sched(lab: &Lab, k: u32, want: &[(&str, Value)]) {
    wait_until(WAIT, &format!("node {k} to apply {want:?}"), || {
        let c = sched_show(lab, k)?;
        if want.iter().all(|(f, v)| c[*f] == *v) {
            Ok(())
        } else {
            Err(c.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)));
}

/// Wait until node K knows every node's capacity from gossip, each
/// `capacities[i]` (for node i + 1) within a hundredth of a CPU.
fn wait_capacities(lab: &Lab, k: u32, capacities: &[f64]) {
    wait_until(
        WAIT,
        &format!("capacities {capacities:?} on node {k}"),
        || {
            let nodes = json_of(&ask(lab, k, &["nodes", "--json"])?, "`krg nodes --json`")?;
            let seen: Vec<f64> = (1..=capacities.len() as u64)
                .map(|id| {
                    nodes
                        .as_array()
                        .and_then(|a| a.iter().find(|n| n["id"] == id))
                        .and_then(|n| n["capacity"].as_f64())
                        .unwrap_or(0.0)
                })
                .collect();
            if seen
                .iter()
                .zip(capacities)
                .all(|(s, c)| (s - c).abs() < 0.01)
            {
                Ok(())
            } else {
                Err(format!("capacities {seen:?}"))
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(lab)));
}

/// The CPUs of this machine, which a lab node without a limit may use.
fn machine_cpus() -> f64 {
    f64::from(krg::probe::online_cpus())
}

/// The cluster's events (`krg events --json` on node K).
fn events(lab: &Lab, k: u32) -> Result<Vec<Value>, String> {
    ask(lab, k, &["events", "--json"])?
        .lines()
        .map(|l| json_of(l, "`krg events --json`"))
        .collect()
}

/// The balancer's moves per gpid (`moved G from node ...` events), and the
/// moves it tried and could not make (`could not move G: ...`).
fn moves(events: &[Value]) -> (BTreeMap<String, Vec<String>>, Vec<String>) {
    let mut moved: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut failed = Vec::new();
    for e in events.iter().filter(|e| e["kind"] == "migration") {
        let message = e["message"].as_str().unwrap_or_default().to_string();
        let mut words = message.split_whitespace();
        match (words.next(), words.next()) {
            (Some("moved"), Some(gpid)) => moved.entry(gpid.to_string()).or_default().push(message),
            (Some("could"), _) => failed.push(message),
            _ => {}
        }
    }
    (moved, failed)
}

// --------------------------------------------------------------- metrics

/// One sample of the Prometheus text format: `name{labels} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

/// `{k="v",...}` at the start of `s`: the labels and the rest of `s`.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else {
        return Ok((labels, s));
    };
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("a label without =\" in {s:?}"))?;
        if !is_name(key) || key.contains(':') {
            return Err(format!("bad label name {key:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?} in {s:?}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err(format!("an unterminated label value in {s:?}")),
            }
        };
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice in {s:?}"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// Checks `body` line by line as the Prometheus / OpenMetrics text format
/// (`# HELP`, `# TYPE`, `# UNIT` comments, `# EOF` last, and every other
/// line `name{labels} value [timestamp]` with a number, in a family that
/// has a `# TYPE`); returns the samples.
fn parse_metrics(body: &str) -> Result<Vec<Sample>, String> {
    let mut families: BTreeSet<String> = BTreeSet::new();
    let mut samples = Vec::new();
    let mut eof = false;
    for (i, line) in body.lines().enumerate() {
        let at = |why: String| format!("line {}: {why}: {line:?}", i + 1);
        if eof {
            return Err(at("a line after # EOF".into()));
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let words: Vec<&str> = comment.splitn(3, ' ').collect();
            match words.as_slice() {
                ["EOF"] => eof = true,
                ["TYPE", name, kind] => {
                    let kinds = [
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "stateset",
                        "gaugehistogram",
                        "unknown",
                    ];
                    if !is_name(name) || !kinds.contains(kind) {
                        return Err(at("a bad # TYPE".into()));
                    }
                    families.insert((*name).to_string());
                }
                ["HELP", name, ..] | ["UNIT", name, ..] if is_name(name) => {}
                _ => return Err(at("an unknown comment".into())),
            }
            continue;
        }
        let split = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let (name, rest) = line.split_at(split);
        if !is_name(name) {
            return Err(at(format!("bad metric name {name:?}")));
        }
        let (labels, rest) = parse_labels(rest).map_err(at)?;
        let fields: Vec<&str> = rest.split(' ').collect();
        let value = match fields.as_slice() {
            ["", v] | ["", v, _] => {
                parse_value(v).ok_or_else(|| at(format!("{v:?} is not a number")))?
            }
            _ => return Err(at("not `name{labels} value`".into())),
        };
        let family = ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(*f)))
            .unwrap_or(name);
        if !families.contains(family) {
            return Err(at(format!("sample of {family}, which has no # TYPE")));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    if !eof {
        return Err("no # EOF at the end (the server says it speaks OpenMetrics)".into());
    }
    Ok(samples)
}

/// GET /metrics from inside node K's namespace; the parsed samples.
fn metrics(lab: &Lab, k: u32) -> Vec<Sample> {
    let answer = lab
        .in_node(k, || -> std::io::Result<String> {
            let mut conn = TcpStream::connect(METRICS_ADDR)?;
            conn.set_read_timeout(Some(WAIT))?;
            conn.set_write_timeout(Some(WAIT))?;
            conn.write_all(
                b"GET /metrics HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )?;
            let mut bytes = Vec::new();
            conn.take(METRICS_BYTES_MAX).read_to_end(&mut bytes)?;
            Ok(text(&bytes))
        })
        .expect("enters the node")
        .unwrap_or_else(|e| panic!("GET {METRICS_ADDR}/metrics on node {k}: {e}"));
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("node {k}: no HTTP header in {answer:?}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "node {k}: /metrics answered {head:?}"
    );
    parse_metrics(body).unwrap_or_else(|e| panic!("node {k}: /metrics: {e}\n{body}"))
}

/// The sum of the samples named `name` that have every label of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Checks `krg top --once` output: a NODES table with every lab node up,
/// its host name and its number of jobs, a JOBS table with every job of
/// `placement` on its node, and a RECENT MIGRATIONS title.
fn check_top(top: &str, placement: &BTreeMap<String, u64>) -> Result<(), String> {
    let section = |name: &str| -> Result<Vec<Vec<String>>, String> {
        Ok(top
            .split("\n\n")
            .find(|s| s.trim_start().starts_with(name))
            .ok_or_else(|| format!("no {name} section in:\n{top}"))?
            .lines()
            .skip(2) // the title and the table's header
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect())
    };
    section("RECENT MIGRATIONS")?;
    let nodes = section("NODES")?;
    for k in 1..=3u64 {
        let row = nodes
            .iter()
            .find(|r| r.first() == Some(&k.to_string()))
            .ok_or_else(|| format!("node {k} missing from:\n{top}"))?;
        let jobs = placement.values().filter(|n| **n == k).count();
        // ID HOST STATE CAP LOAD LOAD1 JOBS MEM FREE [idle]
        if row.len() < 9
            || row[1] != format!("krg-lab-{k}")
            || !row[2].starts_with("up")
            || row[6] != jobs.to_string()
        {
            return Err(format!(
                "node {k} with {jobs} jobs, up, is {row:?} in:\n{top}"
            ));
        }
    }
    let jobs = section("JOBS")?;
    for (gpid, node) in placement {
        let row = jobs
            .iter()
            .find(|r| r.first() == Some(gpid))
            .ok_or_else(|| format!("job {gpid} missing from:\n{top}"))?;
        // GPID USER NODE STATE CPU% RSS COMMAND...
        if row.len() < 7 || row[2] != node.to_string() || !row.join(" ").ends_with(&SPIN.join(" "))
        {
            return Err(format!("job {gpid} on node {node} is {row:?} in:\n{top}"));
        }
    }
    Ok(())
}

// ------------------------------------------------------------- the tests

/// Goal: with placement `least-loaded`, 9 CPU-bound jobs launched from node
/// 1 one after another, without `--node`, end up 3 per node on nodes of
/// equal capacity.
/// Method: a lab without CPU limits; set the placement, wait until node 1
/// knows every node's capacity, start 9 spinning jobs from node 1, and read
/// where they run from `krg ps --json`; node 1's placement events must
/// agree.
#[test]
fn lab_sched_least_loaded_spreads_evenly_on_equal_nodes() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let lab = up("lle", &[]);
    let _kill_jobs = KillJobs(&lab);
    krg(&lab, 1, &["sched", "set", "placement", "least-loaded"]);
    wait_sched(&lab, 1, &[("placement", "least-loaded".into())]);
    wait_capacities(&lab, 1, &[machine_cpus(); 3]);

    step("9 spinning jobs from node 1, one after another");
    let gpids: Vec<String> = (0..9).map(|_| spin(&lab, 1, &[])).collect();
    let placed = wait_running(&lab, 1, &gpids);
    let counts = per_node(&placed);
    eprintln!("jobs per node: {counts:?} ({placed:?})");
    assert_eq!(counts, [3, 3, 3], "placement {placed:?}\n{}", logs(&lab));

    step("node 1's events say where each job was placed");
    let placed_events: BTreeMap<String, u64> = events(&lab, 1)
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "placement")
        .filter_map(|e| {
            let m = e["message"].as_str()?;
            let gpid = m.strip_prefix("placed ")?.split_whitespace().next()?;
            let node = m.rsplit_once("on node ")?.1.trim().parse().ok()?;
            Some((gpid.to_string(), node))
        })
        .collect();
    assert_eq!(placed_events, placed, "placement events against krg ps");
}

/// Goal: with placement `least-loaded` on nodes limited to 0.25, 0.5 and
/// 1.0 CPU, 9 CPU-bound jobs split roughly in proportion to capacity: node
/// 3 gets the most, node 1 the fewest (ties allowed), and no node more
/// than twice its proportional share (1.3, 2.6 and 5.1 jobs).
/// Method: a lab with those cgroup CPU limits; wait until node 1 knows the
/// three capacities (so the placement is not working from defaults); start
/// 9 spinning jobs from node 1 and count them per node in `krg ps --json`.
#[test]
fn lab_sched_least_loaded_follows_unequal_capacities() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let capacities = [0.25, 0.5, 1.0];
    let lab = up("llu", &capacities);
    let _kill_jobs = KillJobs(&lab);
    krg(&lab, 1, &["sched", "set", "placement", "least-loaded"]);
    wait_sched(&lab, 1, &[("placement", "least-loaded".into())]);
    wait_capacities(&lab, 1, &capacities);

    step("9 spinning jobs from node 1, one after another");
    let gpids: Vec<String> = (0..9).map(|_| spin(&lab, 1, &[])).collect();
    let placed = wait_running(&lab, 1, &gpids);
    let counts = per_node(&placed);
    let per_cpu: Vec<f64> = counts
        .iter()
        .zip(capacities)
        .map(|(n, c)| *n as f64 / c)
        .collect();
    eprintln!(
        "jobs per node: {counts:?}, per CPU: {per_cpu:?} (in proportion: {:?})",
        capacities.map(|c| 9.0 * c / 1.75)
    );
    // In proportion would be 1.3, 2.6 and 5.1 jobs: node 3 gets the most,
    // node 1 the fewest, and no node more than twice its share.
    let share_max: Vec<f64> = capacities.iter().map(|c| 2.0 * 9.0 * c / 1.75).collect();
    assert!(
        counts[2] > counts[1] && counts[2] > counts[0] && counts[0] <= counts[1],
        "node 3 must get the most jobs and node 1 the fewest: {counts:?} ({placed:?})\n{}",
        logs(&lab)
    );
    assert!(
        counts.iter().zip(&share_max).all(|(n, m)| *n as f64 <= *m),
        "a node got more than twice its share: {counts:?}, at most {share_max:?}"
    );
}

/// Goal: with placement `round-robin` and the balancer off, jobs started
/// with `--node 1` stay on node 1; `krg sched set balancer balance`, given
/// on node 2, takes effect on node 1 and moves some of them to nodes 2 and
/// 3 within 10 s; then nothing moves while the load stays even: no job
/// moves twice in 60 s; a `--no-migrate` job on the crowded node is never
/// moved; the migrations show in node 1's and its targets' metrics.
/// Method: every `krg sched set` is given on node 2 and checked on node 1
/// (`krg sched show --json`). Six spinning jobs and one `--no-migrate` one
/// start on node 1; `krg ps --json` is sampled for 12 s (all still on node
/// 1, no migration event). Then the balancer is turned on (interval 1 s,
/// minimum residence 10 s, which the jobs have already spent, so that only
/// the hysteresis keeps them still afterwards); placement samples every 2 s
/// and the cluster's migration events (`krg events --json`) over the next
/// 60 s must show jobs on nodes 2 and 3 within 10 s, at most one move per
/// job, none of the pinned job, and an even end (3, 2, 2 jobs).
#[test]
fn lab_sched_balance_spreads_then_settles() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let lab = up("bal", &[]);
    let _kill_jobs = KillJobs(&lab);
    wait_capacities(&lab, 1, &[machine_cpus(); 3]);

    step("on node 2: placement round-robin, balancer off; node 1 applies both");
    krg(&lab, 2, &["sched", "set", "placement", "round-robin"]);
    krg(&lab, 2, &["sched", "set", "balancer", "off"]);
    wait_sched(
        &lab,
        1,
        &[
            ("placement", "round-robin".into()),
            ("balancer", "off".into()),
        ],
    );

    step("6 spinning jobs with --node 1, and one with --node 1 --no-migrate");
    let movable: Vec<String> = (0..6).map(|_| spin(&lab, 1, &["--node", "1"])).collect();
    let pinned = spin(&lab, 1, &["--node", "1", "--no-migrate"]);
    let mut all = movable.clone();
    all.push(pinned.clone());
    let placed = wait_running(&lab, 1, &all);
    assert_eq!(per_node(&placed), [7, 0, 0], "{placed:?}");

    step(&format!("balancer off: they stay on node 1 for {STAY:?}"));
    let stay_until = Instant::now() + STAY;
    let (mut ps_errors, mut ps_run) = (Vec::new(), 0);
    while Instant::now() < stay_until {
        let Some(now) = sample(&lab, &mut ps_errors, &mut ps_run) else {
            continue;
        };
        assert!(
            all.iter().all(|g| now.get(g) == Some(&1)),
            "with the balancer off a job left node 1: {now:?}\n{}",
            logs(&lab)
        );
        thread::sleep(SAMPLE_EVERY.min(stay_until.saturating_duration_since(Instant::now())));
    }
    let (early, _) = moves(&events(&lab, 1).expect("events"));
    assert!(early.is_empty(), "moves with the balancer off: {early:?}");
    let before: Vec<Vec<Sample>> = (1..=3).map(|k| metrics(&lab, k)).collect();

    step("on node 2: balancer balance; node 1 applies it and spreads its jobs");
    let set_at = Instant::now();
    krg(
        &lab,
        2,
        &[
            "sched",
            "set",
            "balancer",
            "balance",
            "--interval",
            INTERVAL,
            "--min-residence",
            MIN_RESIDENCE,
        ],
    );
    wait_sched(
        &lab,
        1,
        &[
            ("balancer", "balance".into()),
            ("interval_ms", INTERVAL_MS.into()),
            ("min_residence_ms", MIN_RESIDENCE_MS.into()),
        ],
    );
    // Every placement seen, in order, for each job.
    let mut history: BTreeMap<String, Vec<u64>> =
        all.iter().map(|g| (g.clone(), vec![1])).collect();
    let mut spread_after: Option<Duration> = None;
    while set_at.elapsed() < STILL {
        let Some(now) = sample(&lab, &mut ps_errors, &mut ps_run) else {
            continue;
        };
        // A job being moved may show in no node for a moment.
        for (gpid, seen) in &mut history {
            if let Some(node) = now.get(gpid) {
                if seen.last() != Some(node) {
                    seen.push(*node);
                }
            }
        }
        let counts = per_node(&now);
        if spread_after.is_none() && counts[1] > 0 && counts[2] > 0 {
            spread_after = Some(set_at.elapsed());
            eprintln!(
                "jobs on nodes 2 and 3 {:.1} s after the set: {counts:?}",
                set_at.elapsed().as_secs_f64()
            );
        }
        if spread_after.is_none() && set_at.elapsed() > SPREAD_WITHIN {
            panic!(
                "no job reached both nodes 2 and 3 within {SPREAD_WITHIN:?}: {now:?}\n{}",
                logs(&lab)
            );
        }
        // Fast while waiting for the spread, then every SAMPLE_EVERY.
        let pause = if spread_after.is_none() {
            Duration::from_millis(500)
        } else {
            SAMPLE_EVERY
        };
        thread::sleep(pause.min(STILL.saturating_sub(set_at.elapsed())));
    }
    let spread_after = spread_after.expect("checked in the loop");
    let last = wait_running(&lab, 1, &all);
    for (gpid, seen) in &mut history {
        if seen.last() != Some(&last[gpid]) {
            seen.push(last[gpid]);
        }
    }
    let events = events(&lab, 1).expect("events");
    let (moved, failed) = moves(&events);
    if !ps_errors.is_empty() {
        eprintln!("krg ps failed {} times: {ps_errors:#?}", ps_errors.len());
    }
    eprintln!(
        "after {:.0} s: placement {last:?}; history {history:?}; moves {moved:#?}",
        set_at.elapsed().as_secs_f64()
    );

    step("no job moved twice, the pinned one never, the cluster is even");
    assert!(
        spread_after <= SPREAD_WITHIN,
        "spread after {spread_after:?}"
    );
    assert!(failed.is_empty(), "moves that failed: {failed:#?}");
    for (gpid, ms) in &moved {
        assert!(
            ms.len() <= 1,
            "{gpid} moved {} times in {STILL:?}: {ms:#?}",
            ms.len()
        );
    }
    for (gpid, seen) in &history {
        assert!(
            seen.len() <= 2,
            "{gpid} was seen on nodes {seen:?} in {STILL:?} (moved more than once)"
        );
    }
    assert!(
        !moved.contains_key(&pinned),
        "the --no-migrate job {pinned} was moved: {:?}",
        moved[&pinned]
    );
    assert_eq!(
        history[&pinned],
        vec![1],
        "the --no-migrate job {pinned} left node 1"
    );
    let mut counts = per_node(&last);
    assert_eq!(counts[0], 3, "node 1 keeps 3 jobs (one pinned): {last:?}");
    counts.sort_unstable();
    assert_eq!(counts, [2, 2, 3], "an even cluster: {last:?}");
    for gpid in &movable {
        let seen = &history[gpid];
        let logged = moved.get(gpid).map_or(0, Vec::len);
        assert_eq!(
            seen.len() - 1,
            logged,
            "{gpid}: seen on {seen:?} but {logged} move(s) in the events"
        );
    }

    step("the moves show in the metrics: out on node 1, in on its targets");
    let after: Vec<Vec<Sample>> = (1..=3).map(|k| metrics(&lab, k)).collect();
    let grew = |k: usize, name: &str, labels: &[(&str, &str)]| {
        value(&after[k - 1], name, labels) - value(&before[k - 1], name, labels)
    };
    let total = moved.len() as f64;
    let out = [("direction", "out"), ("outcome", "ok")];
    let into = [("direction", "in"), ("outcome", "ok")];
    assert_eq!(grew(1, "krg_migrations_total", &out), total, "node 1 out");
    assert_eq!(
        grew(1, "krg_scheduler_decisions_total", &[("kind", "migration")]),
        total,
        "node 1 decisions"
    );
    assert_eq!(grew(1, "krg_migration_freeze_seconds_count", &[]), total);
    for k in [2, 3] {
        let arrived = last.values().filter(|n| **n == k as u64).count() as f64;
        assert_eq!(
            grew(k, "krg_migrations_total", &into),
            arrived,
            "node {k} in"
        );
    }
}

/// Goal: `krg top --once` shows every node and every job; `/metrics` on
/// every node parses as Prometheus text and its counters grow with
/// launches (and placements) and with migrations.
/// Method: scrape the three nodes (an HTTP GET from inside each node's
/// network namespace), start one spinning job on each node with `--node`
/// and one placed by the policy, read `krg top --once` on node 2 against
/// `krg ps --json`, scrape again; then `krg migrate` node 1's job to node 3
/// and scrape again.
#[test]
fn lab_sched_top_and_metrics() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let lab = up("top", &[]);
    let _kill_jobs = KillJobs(&lab);
    wait_capacities(&lab, 1, &[machine_cpus(); 3]);
    krg(&lab, 1, &["sched", "set", "placement", "least-loaded"]);
    wait_sched(&lab, 1, &[("placement", "least-loaded".into())]);

    step("every node's /metrics parses; nothing launched yet");
    let before: Vec<Vec<Sample>> = (1..=3).map(|k| metrics(&lab, k)).collect();
    for (i, m) in before.iter().enumerate() {
        for name in [
            "krg_launches_total",
            "krg_node_load",
            "krg_node_capacity_cpus",
            "krg_cluster_nodes",
            "krg_jobs",
        ] {
            assert!(
                m.iter().any(|s| s.name == name),
                "node {}: no {name} in /metrics: {m:?}",
                i + 1
            );
        }
        assert_eq!(value(m, "krg_launches_total", &[]), 0.0, "node {}", i + 1);
        assert_eq!(value(m, "krg_cluster_nodes", &[("state", "up")]), 3.0);
        assert!((value(m, "krg_node_capacity_cpus", &[]) - machine_cpus()).abs() < 0.01);
    }

    step("one job on each node with --node, one placed by least-loaded");
    let pinned: Vec<String> = ["1", "2", "3"]
        .iter()
        .map(|k| spin(&lab, 1, &["--node", k]))
        .collect();
    let placed = spin(&lab, 1, &[]);
    let mut all = pinned.clone();
    all.push(placed.clone());
    let where_ = wait_running(&lab, 1, &all);
    for (i, gpid) in pinned.iter().enumerate() {
        assert_eq!(where_[gpid], i as u64 + 1, "{gpid} runs where --node said");
    }

    step("krg top --once on node 2 shows every node and every job");
    // Node rows come from gossip (probed about once a second): wait until
    // they count the new jobs too.
    let top = wait_until(WAIT, "krg top --once to show every node and job", || {
        let top = try_krg(&lab, 2, &["top", "--once"])?;
        check_top(&top, &where_).map(|()| top)
    })
    .unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("{top}");

    step("launches, placements and jobs show in every node's /metrics");
    let during: Vec<Vec<Sample>> = (1..=3).map(|k| metrics(&lab, k)).collect();
    let grew =
        |then: &[Vec<Sample>], now: &[Vec<Sample>], k: usize, name: &str, l: &[(&str, &str)]| {
            value(&now[k - 1], name, l) - value(&then[k - 1], name, l)
        };
    for k in 1..=3usize {
        let here = where_.values().filter(|n| **n == k as u64).count() as f64;
        assert_eq!(
            grew(&before, &during, k, "krg_launches_total", &[]),
            here,
            "node {k}: launches"
        );
        assert_eq!(
            value(&during[k - 1], "krg_jobs", &[("state", "running")]),
            here,
            "node {k}: running jobs"
        );
    }
    let policy = [("policy", "least-loaded")];
    assert_eq!(
        grew(&before, &during, 1, "krg_placements_total", &policy),
        1.0
    );
    assert_eq!(
        grew(
            &before,
            &during,
            1,
            "krg_scheduler_decisions_total",
            &[("kind", "placement")]
        ),
        1.0
    );

    step("krg migrate node 1's job to node 3: out on node 1, in on node 3");
    let mover = &pinned[0];
    // Once its command has run: a dump while krg-init is still setting the
    // job up fails, and a failed lazy dump hangs the move (see
    // lab_sched_a_move_that_fails_leaves_the_job_running).
    wait_cpu(&lab, mover, 0.1);
    krg(&lab, 1, &["migrate", mover, "3"]);
    let moved = wait_until(WAIT, &format!("{mover} on node 3"), || {
        let now = placement(&lab, 1)?;
        if now.get(mover) == Some(&3) {
            Ok(now)
        } else {
            Err(format!("{now:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&lab)));
    let after: Vec<Vec<Sample>> = (1..=3).map(|k| metrics(&lab, k)).collect();
    let out = [("direction", "out"), ("outcome", "ok")];
    let into = [("direction", "in"), ("outcome", "ok")];
    assert_eq!(grew(&during, &after, 1, "krg_migrations_total", &out), 1.0);
    assert_eq!(grew(&during, &after, 3, "krg_migrations_total", &into), 1.0);
    assert_eq!(
        grew(
            &during,
            &after,
            1,
            "krg_migration_freeze_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        grew(&during, &after, 1, "krg_migration_bytes_count", &[]),
        1.0
    );
    assert!(grew(&during, &after, 1, "krg_migration_bytes_sum", &[]) > 0.0);
    for k in 1..=3usize {
        let here = moved.values().filter(|n| **n == k as u64).count() as f64;
        assert_eq!(
            value(&after[k - 1], "krg_jobs", &[("state", "running")]),
            here,
            "node {k}: running jobs after the move"
        );
    }
}

/// Goal: the balancer counts capacity when it weighs a move: a lone
/// CPU-bound job on a node limited to 0.25 CPU moves to an idle node of
/// 1.0 CPU, where it runs four times as fast (MOSIX moves a process to
/// where it gets more CPU), and then stays there.
/// Method: a lab limited to 0.25, 0.5 and 1.0 CPU, `balance` with a 1 s
/// interval and a 5 s minimum residence (past the 3 s during which a new
/// placement counts as pending load); one spinning job started with
/// `--node 1`; within 15 s it must run on node 3, and then not move again
/// for 10 s.
#[test]
fn lab_sched_balance_moves_a_lone_job_to_a_faster_idle_node() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let capacities = [0.25, 0.5, 1.0];
    let lab = up("lone", &capacities);
    let _kill_jobs = KillJobs(&lab);
    wait_capacities(&lab, 1, &capacities);
    krg(
        &lab,
        1,
        &[
            "sched",
            "set",
            "balancer",
            "balance",
            "--interval",
            INTERVAL,
            "--min-residence",
            "5s",
        ],
    );
    wait_sched(&lab, 1, &[("balancer", "balance".into())]);
    step("one spinning job on node 1 (0.25 CPU); nodes 2 and 3 idle");
    let job = spin(&lab, 1, &["--node", "1"]);
    wait_running(&lab, 1, std::slice::from_ref(&job));
    // Minimum residence, two rounds to measure its CPU use, the move.
    let left = wait_until(
        WAIT + Duration::from_secs(5),
        &format!("{job} off the 0.25-CPU node"),
        || {
            let now = placement(&lab, 1)?;
            match now.get(&job) {
                Some(n) if *n != 1 => Ok(*n),
                _ => Err(format!("{now:?}")),
            }
        },
    );
    let events = events(&lab, 1).unwrap_or_default();
    let decisions: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "migration")
        .filter_map(|e| e["message"].as_str())
        .collect();
    let target = left.unwrap_or_else(|e| {
        panic!(
            "{e:#}: a job alone on 0.25 CPU was left there while a 1.0-CPU node idled; \
             decisions {decisions:?}"
        )
    });
    eprintln!("moved to node {target}: {decisions:?}");
    assert_eq!(
        target, 3,
        "the job went to node {target}, not the fastest idle node: {decisions:?}"
    );
    step("then it stays");
    let still_until = Instant::now() + WAIT;
    while Instant::now() < still_until {
        let now = placement(&lab, 1).expect("ps");
        assert_eq!(now.get(&job), Some(&3), "the job moved again: {now:?}");
        thread::sleep(SAMPLE_EVERY);
    }
}

/// Goal: a job the balancer cannot move (CRIU refuses to dump it) keeps
/// running where it was, the failure is said in the events, and the
/// balancer goes on balancing with the node's other jobs.
/// Method: node 1 runs four CPU-bound jobs: two pinned with `--no-migrate`
/// (load), a small Python loop connected to a Unix socket of this test
/// process (an external socket, which CRIU refuses: `--ext-unix-sk`), and a
/// larger Python loop (64 MiB). The balancer tries the cheapest movable job
/// first: the undumpable one. Within 20 s the larger job must be on node 2
/// or 3, the undumpable one running on node 1 (its CPU time growing), and a
/// `could not move` event must name it, once: it is not tried again
/// within the next seconds (each try freezes it for nothing).
#[test]
fn lab_sched_a_move_that_fails_leaves_the_job_running() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let lab = up("fail", &[]);
    let _kill_jobs = KillJobs(&lab);
    wait_capacities(&lab, 1, &[machine_cpus(); 3]);
    let socket = std::env::temp_dir().join(format!("krg-sched-{}.sock", std::process::id()));
    let _ = fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("binds a socket");
    // Holds the job's connection open until the test ends (the sender drops).
    let (_held, until_dropped) = std::sync::mpsc::channel::<()>();
    thread::spawn(move || {
        let connection = listener.accept();
        let _ = until_dropped.recv();
        drop(connection);
    });
    let connect = format!(
        "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\nwhile True: pass\n",
        socket.to_str().expect("a UTF-8 path")
    );
    let big = "b = bytearray(64 << 20)\nwhile True: pass\n";

    step("node 1: two --no-migrate loops, an undumpable job, a 64 MiB one");
    let mut all: Vec<String> = (0..2)
        .map(|_| spin(&lab, 1, &["--node", "1", "--no-migrate"]))
        .collect();
    let run = |code: &str| {
        let out = krg(
            &lab,
            1,
            &["run", "-d", "--node", "1", "python3", "-c", code],
        );
        out.trim().to_string()
    };
    let stuck = run(&connect);
    let large = run(big);
    all.extend([stuck.clone(), large.clone()]);
    wait_running(&lab, 1, &all);
    wait_cpu(&lab, &stuck, 0.1);
    wait_cpu(&lab, &large, 0.1);

    step("balancer on: the large job moves, the undumpable one stays and runs");
    krg(
        &lab,
        1,
        &[
            "sched",
            "set",
            "balancer",
            "balance",
            "--interval",
            INTERVAL,
            "--min-residence",
            "1s",
        ],
    );
    let moved = wait_until(
        Duration::from_secs(20),
        &format!("{large} off node 1"),
        || {
            let now = placement(&lab, 1)?;
            match now.get(&large) {
                Some(n) if *n != 1 => Ok(*n),
                _ => Err(format!("{now:?}")),
            }
        },
    );
    let seen = events(&lab, 1).unwrap_or_default();
    let (_, failed) = moves(&seen);
    let cpu_then = cpu_seconds(&lab, &stuck);
    thread::sleep(Duration::from_secs(3));
    let cpu_now = cpu_seconds(&lab, &stuck);
    let _ = fs::remove_file(&socket);
    let node_of_stuck = placement(&lab, 1).ok().and_then(|p| p.get(&stuck).copied());
    eprintln!(
        "large job on {moved:?}; undumpable job on node {node_of_stuck:?}, CPU {cpu_then:?} then {cpu_now:?}; failures {failed:#?}"
    );
    assert!(
        moved.is_ok(),
        "the balancer stopped after a failed move: {moved:?}\n{}",
        log_tail(&lab, 1)
    );
    assert_eq!(node_of_stuck, Some(1), "the undumpable job runs on node 1");
    let (then, now) = (cpu_then.expect("ps"), cpu_now.expect("ps"));
    assert!(
        now > then + 0.1,
        "the undumpable job is stuck: CPU {then} s then {now} s"
    );
    assert!(
        failed.iter().any(|m| m.contains(&stuck)),
        "no event says {stuck} could not move: {failed:#?}"
    );
    // Seconds later (rounds every second), it has not been tried again:
    // a job that could not move waits 30 s before the next try.
    let (_, failed) = moves(&events(&lab, 1).unwrap_or_default());
    let tries = failed.iter().filter(|m| m.contains(&stuck)).count();
    assert_eq!(tries, 1, "{stuck} was tried again and again: {failed:#?}");
}

/// The parser itself, on well-formed and malformed text (no lab needed).
#[test]
fn prometheus_text_parser_accepts_good_and_refuses_bad_lines() {
    let good = "# HELP krg_x Help text.\n# TYPE krg_x counter\nkrg_x_total{a=\"1\",b=\"q\\\"\"} 3\n\
                # TYPE krg_h histogram\nkrg_h_bucket{le=\"+Inf\"} 1\nkrg_h_sum 0.5\nkrg_h_count 1\n# EOF\n";
    let s = parse_metrics(good).expect("well-formed");
    assert_eq!(s.len(), 4);
    assert_eq!(value(&s, "krg_x_total", &[("b", "q\"")]), 3.0);
    assert_eq!(value(&s, "krg_h_bucket", &[("le", "+Inf")]), 1.0);
    for bad in [
        "# TYPE krg_x counter\nkrg_x_total 3\n", // no # EOF
        "# TYPE krg_x counter\nkrg_x_total three\n# EOF\n", // not a number
        "krg_y 1\n# EOF\n",                      // no # TYPE
        "# TYPE krg_x counter\nkrg_x_total{a=\"1} 3\n# EOF\n", // unterminated
        "# TYPE krg_x counter\n9x 3\n# EOF\n",   // bad name
        "# TYPE krg_x counter\nkrg_x_total 1\n# EOF\nkrg_x_total 2\n",
    ] {
        assert!(parse_metrics(bad).is_err(), "accepted {bad:?}");
    }
}
