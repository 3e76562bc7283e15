//! Benchmark of issue 5 (the global scheduler). Prints one JSON object per
//! line; run with `cargo bench --bench sched` (release binaries). The lab
//! parts need root (they build lab clusters); without it only the gossip
//! simulation runs.
//!
//! 1. `gossip_sim`: the gossip's cost and speed as the cluster grows, with
//!    the pure `krg::gossip::View` (no network): n views exchange the
//!    messages `tick` makes, each sent every interval (200 ms) to all peers
//!    in a small cluster or `FANOUT` (4) random ones in a larger one, as
//!    `gossip/task.rs` does. Message sizes are those of the real wire frame
//!    (`PeerFrame::Request { id: 0, body: PeerRequest::Gossip(msg) }`, 4-byte
//!    length + postcard); "on the wire" adds TLS 1.3 records (22 bytes per
//!    16 KiB) and TCP/IPv4/Ethernet headers (66 bytes per 1448-byte
//!    segment), without the receiver's ACKs.
//! 2. `gossip_lab`: the same measured on a 3-node lab, from each node's
//!    `eth0` counters (`/proc/net/dev` inside its namespace) over a quiet
//!    window, at the default gossip interval (200 ms) and at 1 s; the
//!    difference separates gossip (which scales with its rate) from raft's
//!    heartbeats (every 150 ms from the leader, which do not).
//! 3. `makespan`: 3 lab nodes limited to 0.25, 0.5 and 1.0 CPU; 12
//!    CPU-bound jobs of mixed lengths the scheduler is not told, W
//!    CPU-seconds in all, launched one after another as fast as `krg run
//!    -d` returns, from node 1. Each job burns its CPU-seconds measured by
//!    its own CPU clock (a Python loop on `time.process_time()`, counting
//!    only forward steps, so that a restore on another node, which restarts
//!    the clock, neither loses nor repeats work) and then writes the wall
//!    time it finished to a file; the makespan runs from the first launch
//!    to the last finish. Variants: `least-loaded` + `balance`,
//!    `least-loaded` alone, `round-robin` with the balancer off, everything
//!    on node 1, each against the ideal W / 1.75 s. The lab nodes share
//!    this machine's CPUs with whatever else runs on it: each line gives
//!    the CPU-seconds the nodes actually got and the host's load average.
//!
//! Environment: `KRG_BENCH_ONLY=sim,lab,balance,ll,rr,node1,balance-defaults`
//! picks parts (default: all but `balance-defaults`); `KRG_BENCH_SCALE=0.5`
//! scales the job lengths.

use krg::gossip::{GossipMsg, NodeLoad, View};
use krg::lab::{Lab, LabOptions};
use krg::wire::peer::{PeerFrame, PeerRequest};
use krg_types::NodeId;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KRG: &str = env!("CARGO_BIN_EXE_krg");
const KRGD: &str = env!("CARGO_BIN_EXE_krgd");

/// `gossip/task.rs`: peers per round in a large cluster, and the interval.
const FANOUT: usize = 4;
const GOSSIP_INTERVAL_MS: u64 = 200;
/// krgd's default `--suspect-after`: a view shows a node suspect when its
/// entry has not advanced for this long.
const SUSPECT_AFTER_MS: u64 = 1000;
/// Cluster sizes simulated round by round, and sizes only encoded.
const SIM_NODES: [usize; 4] = [3, 10, 100, 1000];
const SIZE_ONLY_NODES: [usize; 1] = [krg_types::limits::NODES_MAX];
/// Rounds measured after every view knows every node.
const SIM_ROUNDS: u64 = 20;
const SIM_SEED: u64 = 0x6b72_6735;
/// TLS 1.3 record: 5-byte header, 1-byte inner type, 16-byte AEAD tag.
const TLS_RECORD_BYTES: usize = 22;
const TLS_RECORD_PLAINTEXT_MAX: usize = 16 * 1024;
/// Ethernet (14) + IPv4 (20) + TCP with timestamps (32) per segment.
const TCP_SEGMENT_OVERHEAD_BYTES: usize = 66;
const TCP_MSS_BYTES: usize = 1448;

/// Quiet window over which the lab's interface counters are read.
const LAB_WINDOW: Duration = Duration::from_secs(20);

/// The nodes' CPU limits and the ideal's divisor.
const CPU_LIMITS: [f64; 3] = [0.25, 0.5, 1.0];
/// Job lengths in CPU-seconds, in launch order. Mixed, and arranged so that
/// round robin (node 1, 2, 3, 1, ...) gives each node the same work (20
/// CPU-s): the fair case for round robin, not a contrived bad one.
const WORK_CPU_S: [f64; 12] = [11.0, 8.0, 7.0, 2.0, 2.0, 7.0, 3.0, 4.0, 3.0, 4.0, 6.0, 3.0];
/// A node's load (5 s average) below which it counts as idle between runs.
const IDLE_LOAD: f64 = 0.15;
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The job: burns argv[1] CPU-seconds, then writes its finish time to argv[2].
const BURN: &str = r#"
import os, sys, time
work, done_path = float(sys.argv[1]), sys.argv[2]
done, last = 0.0, time.process_time()
while done < work:
    for _ in range(20000):
        pass
    now = time.process_time()
    if 0.0 < now - last < 1.0:
        done += now - last
    last = now
with open(done_path + ".tmp", "w") as f:
    f.write(repr(time.time()))
os.rename(done_path + ".tmp", done_path)
"#;

// ------------------------------------------------------------ gossip sim

/// A plausible load entry for node `i` (real sizes: f64 loads, memory in
/// bytes, a version and a host name of 13 characters).
fn load_of(i: usize, rng: &mut impl Rng) -> NodeLoad {
    NodeLoad {
        cpus: 64,
        capacity: 64.0,
        load1: rng.gen_range(0.0..64.0),
        load5: rng.gen_range(0.0..64.0),
        load15: rng.gen_range(0.0..64.0),
        runnable: rng.gen_range(0..128),
        load_short: rng.gen_range(0.0..64.0),
        mem_total: 256 << 30,
        mem_free: rng.gen_range(1u64 << 30..200 << 30),
        jobs: rng.gen_range(0..200),
        version: krg_types::KRG_VERSION.to_string(),
        hostname: format!("krg-node-{i:04}"),
    }
}

/// Bytes of the frame that carries `msg` on the node port.
fn frame_bytes(msg: &GossipMsg) -> usize {
    let frame = PeerFrame::Request {
        id: 0,
        body: PeerRequest::Gossip(msg.clone()),
    };
    4 + postcard::to_stdvec(&frame).expect("encodes").len()
}

/// `frame` bytes as sent: TLS records, then TCP segments with headers.
fn wire_bytes(frame: usize) -> usize {
    let tls = frame + frame.div_ceil(TLS_RECORD_PLAINTEXT_MAX) * TLS_RECORD_BYTES;
    tls + tls.div_ceil(TCP_MSS_BYTES) * TCP_SEGMENT_OVERHEAD_BYTES
}

fn node(i: usize) -> NodeId {
    NodeId::new(i as u64 + 1).expect("a node id")
}

/// Simulates `n` nodes gossiping; prints sizes, rates and staleness.
fn simulate(n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SIM_SEED ^ n as u64);
    let now = Instant::now();
    let mut views: Vec<View> = (0..n).map(|i| View::new(node(i), 1, now)).collect();
    let loads: Vec<NodeLoad> = (0..n).map(|i| load_of(i, &mut rng)).collect();
    let peers = FANOUT.min(n - 1);
    let started = Instant::now();
    let mut round: u64 = 0;
    let mut converged_at = None;
    let mut sizes = Vec::new();
    let mut staleness_max = 0u64;
    let mut staleness_sum = 0u64;
    let mut staleness_pairs = 0u64;
    let rounds_max = 200;
    // (heartbeat seen, round it advanced) per (observer, node).
    let mut advanced: Vec<(u64, u64)> = vec![(0, 0); n * n];
    let mut gap_max = 0u64;
    let mut suspect_samples = 0u64;
    while round < rounds_max {
        round += 1;
        // Every view ticks (heartbeat = round), then messages are delivered.
        let msgs: Vec<GossipMsg> = views
            .iter_mut()
            .enumerate()
            .map(|(i, v)| v.tick(Some(loads[i].clone())))
            .collect();
        let complete = msgs.iter().all(|m| m.entries.len() == n);
        if complete && converged_at.is_none() {
            converged_at = Some(round);
        }
        if let Some(c) = converged_at {
            if round > c {
                for (i, m) in msgs.iter().enumerate() {
                    for e in &m.entries {
                        let stale = round - e.heartbeat;
                        staleness_max = staleness_max.max(stale);
                        staleness_sum += stale;
                        staleness_pairs += 1;
                        // How long observer i's entry for this node has not
                        // advanced: what failure detection looks at.
                        let j = usize::from(e.node.get()) - 1;
                        let (seen, at) = &mut advanced[i * n + j];
                        if e.heartbeat > *seen {
                            *seen = e.heartbeat;
                            *at = round;
                        }
                        gap_max = gap_max.max(round - *at);
                        if (round - *at) * GOSSIP_INTERVAL_MS >= SUSPECT_AFTER_MS {
                            suspect_samples += 1;
                        }
                    }
                }
                sizes.push(frame_bytes(&msgs[rng.gen_range(0..n)]));
            }
            if round >= c + SIM_ROUNDS {
                break;
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        for (from, msg) in msgs.iter().enumerate() {
            order.shuffle(&mut rng);
            let targets = order.iter().filter(|t| **t != from).take(peers);
            for t in targets {
                views[*t].merge(msg, now);
            }
        }
    }
    let converged_at = converged_at.expect("the views converge");
    let frame = sizes.iter().sum::<usize>() / sizes.len().max(1);
    let per_s = 1000 / GOSSIP_INTERVAL_MS as usize;
    let sent = per_s * peers * frame;
    let wire = per_s * peers * wire_bytes(frame);
    println!(
        "{}",
        json!({
            "bench": "gossip_sim", "nodes": n, "interval_ms": GOSSIP_INTERVAL_MS,
            "peers_per_round": peers, "frame_bytes": frame,
            "entry_bytes": (frame as f64 - frame_bytes(&GossipMsg { from: node(0), entries: vec![] }) as f64) / n as f64,
            "sent_bytes_per_node_per_s": sent,
            "sent_on_wire_bytes_per_node_per_s": wire,
            "cluster_bytes_per_s": sent * n,
            "rounds_to_know_everyone": converged_at,
            "staleness_rounds_mean": staleness_sum as f64 / staleness_pairs.max(1) as f64,
            "staleness_rounds_max": staleness_max,
            "staleness_ms_max": staleness_max * GOSSIP_INTERVAL_MS,
            "silence_ms_max": gap_max * GOSSIP_INTERVAL_MS,
            "suspect_after_ms": SUSPECT_AFTER_MS,
            "falsely_suspect_share": suspect_samples as f64 / staleness_pairs.max(1) as f64,
            "sim_seconds": started.elapsed().as_secs_f64(),
        })
    );
}

/// The size of a full view's message for `n` nodes, without simulating.
fn size_only(n: usize) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SIM_SEED);
    let now = Instant::now();
    let mut me = View::new(node(0), 1, now);
    for i in 1..n {
        let mut other = View::new(node(i), 1, now);
        me.merge(&other.tick(Some(load_of(i, &mut rng))), now);
    }
    let frame = frame_bytes(&me.tick(Some(load_of(0, &mut rng))));
    let per_s = 1000 / GOSSIP_INTERVAL_MS as usize;
    println!(
        "{}",
        json!({
            "bench": "gossip_size", "nodes": n, "frame_bytes": frame,
            "frame_bytes_max": krg_types::limits::FRAME_BYTES_MAX,
            "sent_bytes_per_node_per_s": per_s * FANOUT * frame,
            "sent_on_wire_bytes_per_node_per_s": per_s * FANOUT * wire_bytes(frame),
        })
    );
}

// ------------------------------------------------------------ lab helpers

fn lab_options(name: String, cpu_limits: &[f64], extra: &[&str]) -> LabOptions {
    let mut args = vec!["--load-scope".to_string(), "cgroup".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    LabOptions {
        krgd: Some(KRGD.into()),
        krg: Some(KRG.into()),
        krgd_args: args,
        cpu_limits: cpu_limits.to_vec(),
        timeout: Duration::from_secs(60),
        ..LabOptions::new(name, 3)
    }
}

fn krg_out(lab: &Lab, k: u32, args: &[&str]) -> String {
    let mut argv = vec![KRG];
    argv.extend_from_slice(args);
    let out = lab
        .run_timeout(k, &argv, Duration::from_secs(60))
        .expect("runs krg");
    assert!(
        out.status.success(),
        "`krg {}` on node {k}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `krg ARGS` against node K's socket from this process, outside the
/// node's cgroup: observing must not add to the load the scheduler reads.
fn ask(lab: &Lab, k: u32, args: &[&str]) -> String {
    let out = Command::new(KRG)
        .args(args)
        .env("KRG_SOCKET", lab.socket(k))
        .output()
        .expect("runs krg");
    assert!(
        out.status.success(),
        "`krg {}` against node {k}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (tx bytes, tx packets, rx bytes) of node K's eth0.
fn eth0(lab: &Lab, k: u32) -> (u64, u64, u64) {
    let text = lab
        .in_node(k, || std::fs::read_to_string("/proc/thread-self/net/dev"))
        .expect("enters the node")
        .expect("reads /proc/net/dev");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("eth0:"))
        .expect("an eth0 line");
    let f: Vec<u64> = line
        .split_once(':')
        .expect("a colon")
        .1
        .split_whitespace()
        .map(|v| v.parse().expect("a counter"))
        .collect();
    (f[8], f[9], f[0])
}

/// Measures each node's eth0 over a quiet window; returns tx bytes/s.
fn measure_lab(lab: &Lab, interval_ms: u64) -> Vec<f64> {
    // Let the cluster settle (joins, first elections, connections).
    std::thread::sleep(Duration::from_secs(3));
    let before: Vec<_> = (1..=3).map(|k| eth0(lab, k)).collect();
    let t = Instant::now();
    std::thread::sleep(LAB_WINDOW);
    let after: Vec<_> = (1..=3).map(|k| eth0(lab, k)).collect();
    let secs = t.elapsed().as_secs_f64();
    let per_node: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            json!({
                "node": i + 1,
                "tx_bytes_per_s": (after[i].0 - before[i].0) as f64 / secs,
                "tx_packets_per_s": (after[i].1 - before[i].1) as f64 / secs,
                "rx_bytes_per_s": (after[i].2 - before[i].2) as f64 / secs,
            })
        })
        .collect();
    println!(
        "{}",
        json!({"bench": "gossip_lab", "nodes": 3, "gossip_interval_ms": interval_ms,
               "window_s": secs, "raft_leader": 1, "per_node": per_node})
    );
    (0..3)
        .map(|i| (after[i].0 - before[i].0) as f64 / secs)
        .collect()
}

fn gossip_on_lab(tag: &str) {
    let fast = Lab::up(lab_options(format!("bg{tag}"), &[], &[])).expect("lab up");
    let tx_fast = measure_lab(&fast, GOSSIP_INTERVAL_MS);
    // The frame each node sends, with the lab's own host names.
    let msgs: Vec<usize> = (1..=3u32)
        .map(|k| {
            let now = Instant::now();
            let mut v = View::new(node(k as usize - 1), 1_795_000_000_000, now);
            for j in (1..=3u32).filter(|j| *j != k) {
                let mut o = View::new(node(j as usize - 1), 1_795_000_000_000, now);
                for _ in 0..100_000 {
                    o.tick(None);
                }
                let load = NodeLoad {
                    cpus: 2,
                    capacity: 2.0,
                    load1: 0.01,
                    load5: 0.01,
                    load15: 0.01,
                    runnable: 0,
                    load_short: 0.01,
                    mem_total: 24 << 30,
                    mem_free: 22 << 30,
                    jobs: 0,
                    version: krg_types::KRG_VERSION.to_string(),
                    hostname: format!("krg-lab-{j}"),
                };
                v.merge(&o.tick(Some(load)), now);
            }
            frame_bytes(&v.tick(None))
        })
        .collect();
    drop(fast);
    let slow = Lab::up(lab_options(
        format!("bs{tag}"),
        &[],
        &[
            "--gossip-interval",
            "1s",
            "--suspect-after",
            "5s",
            "--down-after",
            "20s",
        ],
    ))
    .expect("lab up");
    let tx_slow = measure_lab(&slow, 1000);
    drop(slow);
    // tx(I) = base + (1000 / I) * peers * b: two intervals give b and base.
    let peers = 2.0;
    let rate_fast = 1000.0 / GOSSIP_INTERVAL_MS as f64;
    let per_node: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            let b = (tx_fast[i] - tx_slow[i]) / ((rate_fast - 1.0) * peers);
            let gossip = rate_fast * peers * b;
            json!({
                "node": i + 1,
                "bytes_per_gossip_message_on_wire": b,
                "predicted_frame_bytes": msgs[i],
                "predicted_on_wire_bytes": wire_bytes(msgs[i]),
                "gossip_tx_bytes_per_s": gossip,
                "other_tx_bytes_per_s": tx_fast[i] - gossip,
            })
        })
        .collect();
    println!(
        "{}",
        json!({"bench": "gossip_lab_split", "gossip_interval_ms": GOSSIP_INTERVAL_MS,
               "note": "other = raft (node 1 leads: heartbeats every 150 ms; followers answer) and the TCP ACKs of what the node receives",
               "per_node": per_node})
    );
}

// ----------------------------------------------------- makespan, simulated

/// The makespan krg's policies would give on nodes that get all their CPU
/// at once (no other load on the machine, gossip without delay): the same
/// jobs and launch order as the lab's, CPU shared equally on each node (a
/// job uses at most one CPU), the real `Placement` and `Balancer` code
/// deciding, a move freezing its job for `SIM_FREEZE_S`.
const SIM_STEP_S: f64 = 0.01;
const SIM_FREEZE_S: f64 = 1.0;
const SIM_RSS_BYTES: u64 = 9 << 20;

struct SimJob {
    gpid: krg_types::Gpid,
    left: f64,
    node: usize,
    arrived_s: f64,
    frozen_until_s: f64,
    done_s: Option<f64>,
}

fn sample_of(i: usize, load: f64, pending: f64) -> krg::policy::NodeSample {
    krg::policy::NodeSample {
        id: node(i),
        usable: true,
        capacity: CPU_LIMITS[i],
        load,
        jobs: load as u32,
        mem_free: 1 << 40,
        pending,
    }
}

/// The balancer a simulated variant runs, if any.
type SimBalancer = Option<Box<dyn krg::policy::Balancer>>;

/// (makespan, jobs per node at start, moves).
fn simulate_makespan(
    v: &Variant,
    balancer: SimBalancer,
    interval_s: f64,
    scale: f64,
) -> (f64, Vec<usize>, usize) {
    let cfg = krg::policy::config::SchedConfig {
        placement: v.placement.parse().expect("a placement"),
        ..Default::default()
    };
    let mut placement = krg::policy::placement(&cfg);
    let mut jobs: Vec<SimJob> = Vec::new();
    let mut counts = vec![0usize; CPU_LIMITS.len()];
    for (seq, w) in WORK_CPU_S.iter().enumerate() {
        let target = if v.node1 {
            0
        } else {
            let samples: Vec<_> = (0..CPU_LIMITS.len())
                .map(|i| sample_of(i, 0.0, counts[i] as f64))
                .collect();
            usize::from(placement.place(&samples).expect("a node").get()) - 1
        };
        counts[target] += 1;
        jobs.push(SimJob {
            gpid: krg_types::Gpid::new(node(0), seq as u64 + 1).expect("a gpid"),
            left: w * scale,
            node: target,
            arrived_s: 0.0,
            frozen_until_s: 0.0,
            done_s: None,
        });
    }
    let mut balancer = balancer;
    let (mut t, mut next_round, mut moves) = (0.0, interval_s, 0);
    while jobs.iter().any(|j| j.done_s.is_none()) {
        t += SIM_STEP_S;
        for (i, cap) in CPU_LIMITS.iter().enumerate() {
            let running: Vec<usize> = (0..jobs.len())
                .filter(|&j| {
                    jobs[j].node == i && jobs[j].done_s.is_none() && jobs[j].frozen_until_s <= t
                })
                .collect();
            let share = (cap / running.len().max(1) as f64).min(1.0);
            for j in running {
                jobs[j].left -= share * SIM_STEP_S;
                if jobs[j].left <= 0.0 {
                    jobs[j].done_s = Some(t);
                }
            }
        }
        let Some(b) = balancer.as_mut() else { continue };
        if t < next_round {
            continue;
        }
        next_round += interval_s;
        for (me, cap) in CPU_LIMITS.iter().enumerate() {
            let load = |i: usize| {
                jobs.iter()
                    .filter(|j| j.node == i && j.done_s.is_none())
                    .count()
            };
            let nodes: Vec<_> = (0..CPU_LIMITS.len())
                .map(|i| sample_of(i, load(i) as f64, 0.0))
                .collect();
            let share = (cap / load(me).max(1) as f64).min(1.0);
            let mine: Vec<_> = jobs
                .iter()
                .filter(|j| j.node == me && j.done_s.is_none())
                .map(|j| krg::policy::JobSample {
                    gpid: j.gpid,
                    cpu: if j.frozen_until_s > t { 0.0 } else { share },
                    rss_bytes: SIM_RSS_BYTES,
                    movable: true,
                    resident_ms: ((t - j.arrived_s) * 1000.0) as u64,
                    allowed: vec![],
                })
                .collect();
            for m in b.decide(node(me), &nodes, &mine) {
                let j = jobs.iter_mut().find(|j| j.gpid == m.gpid).expect("a job");
                j.node = usize::from(m.target.get()) - 1;
                j.arrived_s = t;
                j.frozen_until_s = t + SIM_FREEZE_S;
                moves += 1;
            }
        }
    }
    let makespan = jobs.iter().filter_map(|j| j.done_s).fold(0.0, f64::max);
    (makespan, counts, moves)
}

fn makespan_sim(only: &dyn Fn(&str) -> bool) {
    let scale: f64 = std::env::var("KRG_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let ideal = WORK_CPU_S.iter().sum::<f64>() * scale / CPU_LIMITS.iter().sum::<f64>();
    let mut rows: Vec<(&str, SimBalancer, &Variant)> = Vec::new();
    for v in VARIANTS.iter().filter(|v| only(v.key)) {
        let cfg = krg::policy::config::SchedConfig {
            balancer: if v.balancer[0] == "balance" {
                krg::policy::config::BalancerKind::Balance
            } else {
                krg::policy::config::BalancerKind::Off
            },
            interval_ms: 1000,
            min_residence_ms: if v.key == "balance-defaults" {
                30_000
            } else {
                5_000
            },
            ..Default::default()
        };
        rows.push((v.name, krg::policy::balancer(&cfg), v));
    }
    for (name, balancer, v) in rows {
        let interval_s = if v.key == "balance-defaults" {
            2.0
        } else {
            1.0
        };
        let (makespan, counts, moves) = simulate_makespan(v, balancer, interval_s, scale);
        println!(
            "{}",
            json!({
                "bench": "makespan_sim", "variant": name, "ideal_s": ideal,
                "makespan_s": makespan, "vs_ideal": makespan / ideal,
                "jobs_per_node_at_start": counts, "migrations": moves,
                "freeze_s_per_move": SIM_FREEZE_S,
            })
        );
    }
}

// --------------------------------------------------------------- makespan

struct Variant {
    key: &'static str,
    name: &'static str,
    placement: &'static str,
    balancer: &'static [&'static str],
    node1: bool,
}

const VARIANTS: [Variant; 5] = [
    Variant {
        key: "balance",
        name: "least-loaded + balance (interval 1 s, threshold 1.25, min residence 5 s)",
        placement: "least-loaded",
        balancer: &[
            "balance",
            "--interval",
            "1s",
            "--threshold",
            "1.25",
            "--min-residence",
            "5s",
        ],
        node1: false,
    },
    Variant {
        key: "balance-defaults",
        name: "least-loaded + balance (defaults: interval 2 s, threshold 1.25, min residence 30 s)",
        placement: "least-loaded",
        balancer: &[
            "balance",
            "--interval",
            "2s",
            "--threshold",
            "1.25",
            "--min-residence",
            "30s",
        ],
        node1: false,
    },
    Variant {
        key: "ll",
        name: "least-loaded, balancer off",
        placement: "least-loaded",
        balancer: &["off"],
        node1: false,
    },
    Variant {
        key: "rr",
        name: "round-robin, balancer off",
        placement: "round-robin",
        balancer: &["off"],
        node1: false,
    },
    Variant {
        key: "node1",
        name: "everything on node 1 (--node 1), balancer off",
        placement: "round-robin",
        balancer: &["off"],
        node1: true,
    },
];

fn unix_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

fn host_loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU-seconds node K's cgroup has used (jobs and krgd).
fn cpu_used_s(lab: &Lab, k: u32) -> f64 {
    for dir in lab.cgroup_dirs(k) {
        if let Ok(t) = std::fs::read_to_string(dir.join("cpuacct.usage")) {
            return t.trim().parse::<f64>().unwrap_or(0.0) / 1e9;
        }
        if let Ok(t) = std::fs::read_to_string(dir.join("cpu.stat")) {
            if let Some(us) = t
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
            {
                return us / 1e6;
            }
        }
    }
    0.0
}

/// Node K's `krg_node_load` (the 5 s average of runnable tasks).
fn node_load(lab: &Lab, k: u32) -> f64 {
    let body = lab
        .in_node(k, || -> std::io::Result<String> {
            let mut c = TcpStream::connect("127.0.0.1:9470")?;
            c.set_read_timeout(Some(Duration::from_secs(10)))?;
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
            let mut s = String::new();
            c.take(1 << 20).read_to_string(&mut s)?;
            Ok(s)
        })
        .expect("enters the node")
        .unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix("krg_node_load "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::MAX)
}

fn wait_idle(lab: &Lab) {
    let deadline = Instant::now() + IDLE_TIMEOUT;
    loop {
        let loads: Vec<f64> = (1..=3).map(|k| node_load(lab, k)).collect();
        if loads.iter().all(|l| *l < IDLE_LOAD) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the lab is not idle after {IDLE_TIMEOUT:?}: loads {loads:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn running_jobs(lab: &Lab) -> Vec<serde_json::Value> {
    let ps: serde_json::Value =
        serde_json::from_str(&ask(lab, 3, &["ps", "--json"])).expect("ps json");
    ps.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|j| j["state"] == "running")
        .collect()
}

fn run_variant(lab: &Lab, v: &Variant, scale: f64, scratch: &Path) {
    ask(lab, 1, &["sched", "set", "balancer", "off"]);
    // Round robin restarts at node 1 when the placement changes.
    ask(lab, 1, &["sched", "set", "placement", "pack"]);
    ask(lab, 1, &["sched", "set", "placement", v.placement]);
    let mut set = vec!["sched", "set", "balancer"];
    set.extend_from_slice(v.balancer);
    ask(lab, 1, &set);
    wait_idle(lab);
    let dir = scratch.join(v.key);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let work: Vec<f64> = WORK_CPU_S.iter().map(|w| w * scale).collect();
    let total: f64 = work.iter().sum();
    let ideal = total / CPU_LIMITS.iter().sum::<f64>();
    let cpu_before: Vec<f64> = (1..=3).map(|k| cpu_used_s(lab, k)).collect();
    let load_before = host_loadavg();
    let events_since_ms = (unix_s() * 1000.0) as u64;
    let t0 = unix_s();
    let started = Instant::now();
    let mut gpids = Vec::new();
    for (i, w) in work.iter().enumerate() {
        let done = dir.join(format!("{i}.done"));
        let (ws, ds) = (format!("{w}"), done.to_string_lossy().into_owned());
        let mut args = vec!["run", "-d"];
        if v.node1 {
            args.extend(["--node", "1"]);
        }
        args.extend(["python3", "-c", BURN, &ws, &ds]);
        gpids.push(krg_out(lab, 1, &args).trim().to_string());
    }
    let launched_s = started.elapsed().as_secs_f64();
    let placed: BTreeMap<String, u64> = running_jobs(lab)
        .iter()
        .filter_map(|j| Some((j["gpid"].as_str()?.to_string(), j["node"].as_u64()?)))
        .collect();
    let timeout = Duration::from_secs_f64(total / CPU_LIMITS[0] * 2.0 + 120.0);
    let finish: Vec<f64> = loop {
        let done: Vec<Option<f64>> = (0..work.len())
            .map(|i| {
                std::fs::read_to_string(dir.join(format!("{i}.done")))
                    .ok()
                    .and_then(|t| t.trim().parse::<f64>().ok())
            })
            .collect();
        if done.iter().all(Option::is_some) {
            break done
                .into_iter()
                .map(|d| d.expect("all done") - t0)
                .collect();
        }
        assert!(
            started.elapsed() < timeout,
            "{}: jobs not done after {timeout:?}: {done:?}",
            v.name
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let makespan = finish.iter().cloned().fold(0.0, f64::max);
    let cpu_used: Vec<f64> = (1..=3)
        .map(|k| cpu_used_s(lab, k) - cpu_before[k as usize - 1])
        .collect();
    let events: Vec<serde_json::Value> = ask(lab, 3, &["events", "--json"])
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| {
            e["kind"] == "migration" && e["time_ms"].as_u64().unwrap_or(0) >= events_since_ms
        })
        .collect();
    let moved = events
        .iter()
        .filter(|e| e["message"].as_str().unwrap_or("").starts_with("moved "))
        .count();
    let per_node_start: Vec<usize> = (1..=3u64)
        .map(|k| placed.values().filter(|n| **n == k).count())
        .collect();
    let per_node_work: Vec<f64> = (1..=3u64)
        .map(|k| {
            gpids
                .iter()
                .zip(&work)
                .filter(|(g, _)| placed.get(*g) == Some(&k))
                .map(|(_, w)| w)
                .sum::<f64>()
                + 0.0 // an empty sum is -0.0
        })
        .collect();
    println!(
        "{}",
        json!({
            "bench": "makespan", "variant": v.name, "jobs": work.len(),
            "work_cpu_s": total, "cpu_limits": CPU_LIMITS, "ideal_s": ideal,
            "makespan_s": makespan, "vs_ideal": makespan / ideal,
            "launch_s": launched_s,
            "jobs_per_node_at_start": per_node_start,
            "work_per_node_at_start": per_node_work,
            "migrations": moved, "migrations_failed": events.len() - moved,
            "migration_events": events.iter().filter_map(|e| e["message"].as_str()).collect::<Vec<_>>(),
            "placed": gpids.iter().zip(&work).map(|(g, w)| json!({"gpid": g, "work_cpu_s": w, "node": placed.get(g)})).collect::<Vec<_>>(),
            "finish_s": finish,
            "cpu_used_s_per_node": cpu_used,
            "cpu_used_share_of_limit": (0..3).map(|i| cpu_used[i] / (CPU_LIMITS[i] * makespan)).collect::<Vec<_>>(),
            "host_loadavg_before": load_before, "host_loadavg_after": host_loadavg(),
        })
    );
    for leftover in running_jobs(lab) {
        if let Some(g) = leftover["gpid"].as_str() {
            let _ = ask(lab, 1, &["kill", "-s", "KILL", g]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    RESULTS.with(|r| r.borrow_mut().push((v.key, makespan, ideal)));
}

thread_local! {
    static RESULTS: std::cell::RefCell<Vec<(&'static str, f64, f64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn makespan(tag: &str, only: &dyn Fn(&str) -> bool) {
    let scale: f64 = std::env::var("KRG_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    if !VARIANTS.iter().any(|v| only(v.key)) {
        return;
    }
    let lab = Lab::up(lab_options(format!("bm{tag}"), &CPU_LIMITS, &[])).expect("lab up");
    let scratch = PathBuf::from(format!("/tmp/krg-bench-sched-{tag}"));
    for v in VARIANTS.iter().filter(|v| only(v.key)) {
        run_variant(&lab, v, scale, &scratch);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    drop(lab);
    let results = RESULTS.with(|r| r.borrow().clone());
    let get = |key: &str| results.iter().find(|(k, _, _)| *k == key).map(|r| r.1);
    if let Some(balance) = get("balance") {
        let ideal = results[0].2;
        let rr = get("rr");
        println!(
            "{}",
            json!({
                "bench": "makespan_goals",
                "balance_vs_ideal": balance / ideal,
                "goal_within_1_2_of_ideal": balance / ideal <= 1.2,
                "round_robin_over_balance": rr.map(|r| r / balance),
                "goal_1_5x_better_than_round_robin": rr.map(|r| r / balance >= 1.5),
                "node1_over_balance": get("node1").map(|r| r / balance),
            })
        );
    }
}

fn main() {
    let only_list = std::env::var("KRG_BENCH_ONLY").ok();
    let only = |key: &str| match &only_list {
        Some(l) => l.split(',').any(|k| k.trim() == key),
        None => key != "balance-defaults",
    };
    if only("sim") {
        for n in SIM_NODES {
            simulate(n);
        }
        for n in SIZE_ONLY_NODES {
            size_only(n);
        }
    }
    makespan_sim(&only);
    if !nix::unistd::geteuid().is_root() {
        eprintln!("sched bench: the lab parts need root (they build lab clusters); skipped");
        return;
    }
    if Command::new("python3").arg("-V").output().is_err() {
        eprintln!("sched bench: the makespan part needs python3; skipped");
        return;
    }
    let tag = format!("{}", std::process::id() % 100_000);
    if only("lab") {
        gossip_on_lab(&tag);
    }
    makespan(&tag, &only);
}
