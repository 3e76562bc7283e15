//! The cluster foundation on a real 3-node lab cluster (issue 2's
//! acceptance list): the cluster forms and lists its nodes; a killed node is
//! seen `suspect` then `down` within the bounds and comes back with the same
//! id; losing the raft leader still gets the dead node declared down; a
//! machine without a valid token cannot join; a stranger without a
//! certificate is refused on the node port; garbage on the node port and the
//! Unix socket leaves the daemon serving; a corrupt state directory is
//! refused and left untouched; a restart keeps identity and membership;
//! `lab.down()` leaves nothing behind.
//!
//! Every test makes its own lab (`c<topic><pid>`), names start with `lab_`
//! so that nextest runs them one at a time (`.config/nextest.toml`), and a
//! lock serialises them under `cargo test` too: the failure-detection bounds
//! are timing bounds, which several clusters sharing two cores would blur.
//! Without root they are skipped with a reason (a failure under
//! `KRG_REQUIRE_LAB=1`). `KRG_LAB_KEEP=1` keeps a failed test's lab for
//! inspection (`krg lab status --name <lab>`, node logs under
//! `/run/krg-lab/<lab>/n<K>/krgd.log`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::{lab_options, processes, serial, step, text, try_krg_within};

use krg::identity::{ca, tls};
use krg::lab::{self, require_root_or_skip, wait_until, Lab, LabOptions};
use krg::wire::{ConnKind, ErrorCode, FrameConn, Hello, RemoteError, WireError};
use krg::wire::{MAGIC, PROTOCOL_VERSION};
use krg_types::limits::HANDSHAKE_TIMEOUT_MS;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

/// The issue's functional bounds for failure detection, from the kill.
const SUSPECT_WITHIN: Duration = Duration::from_secs(2);
const DOWN_WITHIN: Duration = Duration::from_secs(6);
/// How long a cluster may take to (re)form or a restarted node to be seen up.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long gossip may take to bring every node's load to every node.
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon may take to write a log line or to exit.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one `krgd` run that must fail (bad token, bad state) may take.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the daemon may take to close a bad connection: at worst it waits
/// for the first frame until its handshake timeout.
const CLOSE_TIMEOUT_MS: u64 = HANDSHAKE_TIMEOUT_MS + 3_000;
const CLOSE_TIMEOUT: Duration = Duration::from_millis(CLOSE_TIMEOUT_MS);
/// The port of the extra `krgd` that tries to join from node 3.
const JOINER_PORT: u16 = 7471;
/// Seeds the "random" garbage so that a failure can be replayed.
const GARBAGE_SEED: u64 = 0x6b72_6721;

/// A lab name unique to this topic and this test process.
fn lab_name(topic: &str) -> String {
    format!("c{topic}{}", std::process::id())
}

/// Make a 3-node lab of the real daemons, each reporting its own cgroup's
/// load; returns it and how long it took until 3 nodes were up.
fn up(topic: &str) -> (Lab, Duration) {
    let options = LabOptions {
        timeout: FORM_TIMEOUT,
        ..lab_options(lab_name(topic))
    };
    let started = Instant::now();
    let lab = Lab::up(options).expect("the lab cluster forms");
    let took = started.elapsed();
    eprintln!(
        "--- lab {} up: 3 nodes up {:.2} s after Lab::up was called",
        lab.name(),
        took.as_secs_f64()
    );
    (lab, took)
}

/// `krg ARGS` on node K: its stdout, or why it failed.
fn try_krg(lab: &Lab, k: u32, args: &[&str]) -> Result<String, String> {
    try_krg_within(lab, k, args, Duration::from_secs(10))
}

fn krg(lab: &Lab, k: u32, args: &[&str]) -> String {
    try_krg(lab, k, args).unwrap_or_else(|e| panic!("{e}"))
}

fn nodes_json(lab: &Lab, k: u32) -> Result<Vec<Value>, String> {
    let out = try_krg(lab, k, &["nodes", "--json"])?;
    serde_json::from_str::<Value>(&out)
        .map_err(|e| format!("`krg nodes --json` on node {k} printed {out:?}: {e}"))?
        .as_array()
        .cloned()
        .ok_or_else(|| format!("`krg nodes --json` on node {k} printed no array: {out}"))
}

fn status_json(lab: &Lab, k: u32) -> Result<Value, String> {
    let out = try_krg(lab, k, &["cluster", "status", "--json"])?;
    serde_json::from_str(&out)
        .map_err(|e| format!("`krg cluster status --json` on node {k} printed {out:?}: {e}"))
}

/// The node id of lab node K (its own answer to `krg cluster status`).
fn node_id(lab: &Lab, k: u32) -> u64 {
    let status = status_json(lab, k).unwrap_or_else(|e| panic!("{e}"));
    status["this_node"]
        .as_u64()
        .unwrap_or_else(|| panic!("no this_node in {status}"))
}

/// The lab node (K) whose daemon has node id `id`, found by its address.
fn lab_node_of(lab: &Lab, nodes: &[Value], id: u64) -> u32 {
    let entry = nodes
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no node {id} in {nodes:?}"));
    (1..=lab.nodes())
        .find(|&k| entry["addr"] == lab.listen_addr(k).expect("node exists").to_string())
        .unwrap_or_else(|| panic!("node {id}'s address is no lab node's: {entry}"))
}

/// Wait until each of `from` lists exactly `ids`, all `up`, with their load
/// known (gossip has reached it).
fn wait_all_up(lab: &Lab, from: &[u32], ids: &BTreeSet<u64>, timeout: Duration) {
    for &k in from {
        wait_until(
            timeout,
            &format!("node {k} to list nodes {ids:?}, all up, with their load"),
            || {
                let nodes = nodes_json(lab, k)?;
                let listed: BTreeSet<u64> = nodes.iter().filter_map(|n| n["id"].as_u64()).collect();
                let ready = listed == *ids
                    && nodes
                        .iter()
                        .all(|n| n["state"] == "up" && n["cpus"].as_u64().unwrap_or(0) > 0);
                if ready {
                    Ok(())
                } else {
                    Err(format!("{nodes:?}"))
                }
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

fn assert_status_line(lab: &Lab, k: u32, wanted: &str) {
    let out = krg(lab, k, &["cluster", "status"]);
    assert!(
        out.lines().next() == Some(wanted),
        "`krg cluster status` on node {k} printed {out:?}, wanted a first line {wanted:?}"
    );
}

/// Remove the colour codes a log may hold.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_len(lab: &Lab, k: u32) -> u64 {
    fs::metadata(lab.log(k)).map(|m| m.len()).unwrap_or(0)
}

/// Node K's log from byte `offset` on, without colour codes.
fn log_since(lab: &Lab, k: u32, offset: u64) -> String {
    let bytes = fs::read(lab.log(k)).unwrap_or_default();
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(bytes.len());
    strip_ansi(&text(&bytes[start..]))
}

/// Wait until node K's log, from `offset` on, has a line with every one of
/// `parts`; returns that line.
fn wait_log_line(lab: &Lab, k: u32, offset: u64, parts: &[&str]) -> String {
    wait_until(
        LOG_TIMEOUT,
        &format!("a line with {parts:?} in node {k}'s log"),
        || {
            let log = log_since(lab, k, offset);
            log.lines()
                .find(|line| parts.iter().all(|p| line.contains(p)))
                .map(str::to_string)
                .ok_or_else(|| format!("log since then: {log:?}"))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The last non-empty line of a command's stderr, without colour codes.
fn last_stderr_line(out: &Output) -> String {
    strip_ansi(&text(&out.stderr))
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can be built")
}

// ---------------------------------------------------------------------------

/// Goal: the cluster forms and describes itself; a `krgd` restart keeps
/// identity and membership; a corrupt or unknown-version state directory is
/// refused with a clear message and left untouched; `lab.down()` leaves no
/// namespace, link, process, cgroup, mount or file behind.
/// Method: one lab. Read `krg nodes --json`, `krg nodes` and `krg cluster
/// status` on every node; SIGTERM node 2's daemon and start it again;
/// with node 3 killed, damage its `krg-state.json` three ways and run its
/// `krgd` by hand, comparing every file of the state directory before and
/// after; restore it and start node 3; then remove the lab and look for
/// what is left, after checking that the same look finds the live lab.
#[test]
fn lab_cluster_forms_restarts_refuses_corrupt_state_and_leaves_no_trace() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let (lab, _) = up("fm");
    let ids: BTreeMap<u32, u64> = (1..=3).map(|k| (k, node_id(&lab, k))).collect();
    let id_set: BTreeSet<u64> = ids.values().copied().collect();
    assert_eq!(
        ids,
        BTreeMap::from([(1, 1), (2, 2), (3, 3)]),
        "lab node K is node id K"
    );

    step("krgd made moves into cgroups fast (favordynmods on the cgroup v2 root)");
    let doctor: Value =
        serde_json::from_str(&krg(&lab, 1, &["doctor", "--json"])).expect("doctor --json");
    assert_eq!(
        doctor["cgroup_moves"]["ok"],
        Value::Bool(true),
        "krg doctor: {}",
        doctor["cgroup_moves"]
    );
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        mountinfo
            .lines()
            .filter(|l| l.contains(" - cgroup2 "))
            .all(|l| l.contains("favordynmods")),
        "every cgroup2 mount shows favordynmods:\n{mountinfo}"
    );

    step("every node lists the 3 nodes up, with addresses and loads");
    wait_all_up(&lab, &[1, 2, 3], &id_set, LOAD_TIMEOUT);
    for k in 1..=3 {
        let nodes = nodes_json(&lab, k).expect("krg nodes --json");
        assert_eq!(nodes.len(), 3, "node {k} lists {nodes:?}");
        for node in &nodes {
            for key in [
                "id",
                "addr",
                "state",
                "cpus",
                "load1",
                "mem_total",
                "mem_free",
            ] {
                assert!(node.get(key).is_some(), "node {k}: no {key:?} in {node}");
            }
            assert_eq!(node["state"], "up", "node {k}: {node}");
            let id = node["id"].as_u64().expect("numeric id");
            let owner = ids
                .iter()
                .find(|(_, v)| **v == id)
                .map(|(k, _)| *k)
                .unwrap_or_else(|| panic!("unknown id {id}"));
            assert_eq!(
                node["addr"],
                lab.listen_addr(owner).expect("node").to_string(),
                "node {k}: {node}"
            );
            assert!(node["cpus"].as_u64().unwrap_or(0) >= 1, "node {k}: {node}");
            assert!(node["load1"].as_f64().is_some_and(|l| l >= 0.0), "{node}");
            let total = node["mem_total"].as_u64().unwrap_or(0);
            let free = node["mem_free"].as_u64().unwrap_or(u64::MAX);
            assert!(total > 0 && free <= total, "node {k}: memory in {node}");
        }
        assert_status_line(&lab, k, "up on 3 nodes (3 up)");
        let table = krg(&lab, k, &["nodes"]);
        let mut lines = table.lines();
        let header = lines.next().unwrap_or_default();
        for column in [
            "ID", "ADDRESS", "STATE", "CPUS", "LOAD", "MEM", "FREE", "VERSION",
        ] {
            assert!(
                header.contains(column),
                "node {k}: `krg nodes` header {header:?}"
            );
        }
        assert_eq!(lines.count(), 3, "node {k}: `krg nodes` printed {table}");
    }

    step("SIGTERM node 2's krgd, start it again: same id, same address, 3 up");
    let pid = lab.daemon_pid(2).expect("node 2's krgd runs");
    let offset = log_len(&lab, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pids fit i32")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM is sent");
    wait_until(LOG_TIMEOUT, "node 2's krgd to exit after SIGTERM", || {
        lab.daemon_pid(2)
            .map_or(Ok(()), |pid| Err(format!("pid {pid} alive")))
    })
    .expect("krgd exits on SIGTERM");
    wait_log_line(&lab, 2, offset, &["shutting down"]);
    lab.start(2).expect("node 2 starts again");
    assert_eq!(node_id(&lab, 2), ids[&2], "node 2 kept its id");
    wait_all_up(&lab, &[1, 2, 3], &id_set, FORM_TIMEOUT);
    let nodes = nodes_json(&lab, 1).expect("nodes");
    assert_eq!(
        lab_node_of(&lab, &nodes, ids[&2]),
        2,
        "node 2 kept its address"
    );
    assert_status_line(&lab, 2, "up on 3 nodes (3 up)");

    step("kill node 3, damage its state directory: krgd refuses, files untouched");
    lab.kill(3).expect("node 3 killed");
    let state = lab.state_dir(3);
    let meta_path = state.join("krg-state.json");
    let original = fs::read(&meta_path).expect("node 3 has a krg-state.json");
    // Not node 3's own socket: the killed daemon left that one behind.
    let socket = state.parent().expect("node dir").join("refused.sock");
    let cases = [
        Damage {
            what: "not JSON",
            content: Some(b"{not json"),
            wanted: &["corrupt", "refusing to start"],
        },
        Damage {
            what: "of an unknown version",
            content: Some(
                br#"{"format":"krg-state","version":99,"cluster_id":"x","node_id":3,"addr":"10.0.0.1:7470"}"#,
            ),
            wanted: &["unknown version", "99", "refusing to start"],
        },
        Damage {
            what: "missing next to raft.redb",
            content: None,
            wanted: &["corrupt", "krg-state.json is missing", "refusing to start"],
        },
    ];
    for Damage {
        what,
        content,
        wanted,
    } in cases
    {
        step(&format!("krg-state.json {what}"));
        match content {
            Some(bytes) => fs::write(&meta_path, bytes).expect("state file written"),
            None => fs::remove_file(&meta_path).expect("state file removed"),
        }
        let before = snapshot(&state);
        let out = run_krgd(
            &lab,
            3,
            &state,
            &socket,
            lab.listen_addr(3).expect("node 3").port(),
            None,
        );
        let line = last_stderr_line(&out);
        eprintln!("krgd said: {line}");
        assert_eq!(out.status.code(), Some(1), "krgd must fail: {line}");
        assert!(line.starts_with("krgd: "), "one clear line: {line:?}");
        for part in wanted {
            assert!(line.contains(part), "{what}: {part:?} not in {line:?}");
        }
        assert_eq!(
            snapshot(&state),
            before,
            "{what}: the state directory changed"
        );
        assert!(!socket.exists(), "{what}: krgd created its socket");
    }
    fs::write(&meta_path, &original).expect("state file restored");
    lab.start(3).expect("node 3 starts on its restored state");
    assert_eq!(node_id(&lab, 3), ids[&3], "node 3 kept its id");
    wait_all_up(&lab, &[1, 2, 3], &id_set, FORM_TIMEOUT);

    step("lab.down() leaves nothing behind");
    let name = lab.name().to_string();
    let index = lab.index();
    let lab_dir = lab
        .state_dir(1)
        .parent()
        .and_then(Path::parent)
        .expect("lab dir")
        .to_path_buf();
    let mut cgroups: BTreeSet<PathBuf> = BTreeSet::new();
    for k in 1..=3 {
        for dir in lab.cgroup_dirs(k) {
            cgroups.extend(dir.parent().map(Path::to_path_buf));
            cgroups.insert(dir);
        }
    }
    // The checks below must see the live lab, or they prove nothing.
    assert_eq!(
        krgd_processes_under(&lab_dir).len(),
        3,
        "the process scan finds the daemons"
    );
    assert!(netns_of(&name).len() == 4, "the netns scan finds the lab");
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|d| d.exists()),
        "cgroups {cgroups:?}"
    );
    lab.down().expect("the lab is removed");
    assert_eq!(netns_of(&name), Vec::<String>::new(), "namespaces left");
    let links = host_output("ip", &["-o", "link", "show"]);
    let link_prefix = format!("kl{index}n");
    assert!(
        !links.lines().any(|l| l.contains(&link_prefix)),
        "links left on the host: {links}"
    );
    assert_eq!(
        krgd_processes_under(&lab_dir),
        Vec::<u32>::new(),
        "krgd processes left"
    );
    for dir in &cgroups {
        assert!(!dir.exists(), "cgroup left: {}", dir.display());
    }
    assert!(!lab_dir.exists(), "files left in {}", lab_dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&format!("{}/", lab_dir.display())),
        "mounts left: {mounts}"
    );
    assert!(!lab::list().contains(&name), "krg lab still lists {name}");
}

/// A way to damage `krg-state.json`: new content (or none: removed), and
/// what `krgd`'s refusal must say.
struct Damage {
    what: &'static str,
    content: Option<&'static [u8]>,
    wanted: &'static [&'static str],
}

/// Every file below `dir` with its bytes (and mode), to compare before and
/// after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut files = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(current) = todo.pop() {
        for entry in fs::read_dir(&current)
            .expect("readable directory")
            .flatten()
        {
            let path = entry.path();
            let meta = entry.metadata().expect("metadata");
            if meta.is_dir() {
                todo.push(path.clone());
            }
            let bytes = if meta.is_file() {
                fs::read(&path).expect("readable file")
            } else {
                Vec::new()
            };
            files.insert(path, (meta.permissions().mode(), bytes));
        }
    }
    files
}

/// Run a `krgd` by hand on node K (not through the lab), with the given
/// state directory, socket, port and `--join` target and token; it must
/// exit by itself.
fn run_krgd(
    lab: &Lab,
    k: u32,
    state: &Path,
    socket: &Path,
    port: u16,
    join: Option<(&str, Option<&str>)>,
) -> Output {
    let (krgd, _) = lab.binaries();
    let listen = format!("{}:{port}", lab.addr(k).expect("node exists"));
    let mut argv: Vec<String> = vec![
        krgd.to_string_lossy().into_owned(),
        "--state-dir".into(),
        state.to_string_lossy().into_owned(),
        "--socket".into(),
        socket.to_string_lossy().into_owned(),
        "--listen".into(),
        listen,
        "--load-scope".into(),
        "cgroup".into(),
        // Should it start after all, it must not take the host's view
        // mount point nor node K's metrics port.
        "--view-dir".into(),
        "none".into(),
        "--metrics".into(),
        "none".into(),
    ];
    if let Some((addr, token)) = join {
        argv.extend(["--join".to_string(), addr.to_string()]);
        if let Some(token) = token {
            argv.extend(["--token".to_string(), token.to_string()]);
        }
    }
    lab.run_timeout(k, &argv, REFUSAL_TIMEOUT)
        .unwrap_or_else(|e| panic!("krgd on node {k} did not exit by itself: {e:#}"))
}

fn host_output(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The lab's network namespaces (`krg-<name>-...`) that exist.
fn netns_of(name: &str) -> Vec<String> {
    let prefix = format!("krg-{name}-");
    host_output("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Pids of the live `krgd` processes whose `--state-dir` is below `dir`.
fn krgd_processes_under(dir: &Path) -> Vec<u32> {
    let mut found = Vec::new();
    for (pid, proc_dir) in processes() {
        let Ok(cmdline) = fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_krgd = args
            .first()
            .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "krgd"));
        let under = args
            .windows(2)
            .any(|w| w[0] == "--state-dir" && Path::new(&w[1]).starts_with(dir));
        if is_krgd && under && !is_dead(pid) {
            found.push(pid);
        }
    }
    found
}

/// Whether process `pid` is gone or a zombie (dead, not yet reaped).
fn is_dead(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next());
    matches!(state, None | Some("Z" | "X"))
}

// ---------------------------------------------------------------------------

/// What two observers saw of a dead node, in time since the kill began.
#[derive(Debug, Default)]
struct Seen {
    suspect: Option<Duration>,
    down: Option<Duration>,
}

/// Poll `observers` until each shows node `dead` down (or `limit` passes),
/// recording when each first showed it `suspect` and `down`, and checking at
/// every poll that the `alive` nodes stay `up`.
fn watch_death(
    lab: &Lab,
    observers: &[u32],
    dead: u64,
    alive: &[u64],
    since: Instant,
    limit: Duration,
) -> BTreeMap<u32, Seen> {
    let mut seen: BTreeMap<u32, Seen> = observers.iter().map(|&k| (k, Seen::default())).collect();
    loop {
        for &k in observers {
            let Ok(nodes) = nodes_json(lab, k) else {
                continue;
            };
            let at = since.elapsed();
            for id in alive {
                let state = nodes
                    .iter()
                    .find(|n| n["id"] == *id)
                    .map(|n| n["state"].clone());
                assert_eq!(
                    state,
                    Some(Value::from("up")),
                    "node {k} shows live node {id} as {state:?} {:.2} s after the kill",
                    at.as_secs_f64()
                );
            }
            let state = nodes
                .iter()
                .find(|n| n["id"] == dead)
                .map(|n| n["state"].clone());
            let record = seen.get_mut(&k).expect("observer");
            match state.as_ref().and_then(Value::as_str) {
                Some("suspect") if record.suspect.is_none() => {
                    eprintln!(
                        "node {k} shows node {dead} suspect after {:.2} s",
                        at.as_secs_f64()
                    );
                    record.suspect = Some(at);
                }
                Some("down") if record.down.is_none() => {
                    eprintln!(
                        "node {k} shows node {dead} down after {:.2} s",
                        at.as_secs_f64()
                    );
                    record.down = Some(at);
                }
                Some("up" | "suspect" | "down") => {}
                other => panic!("node {k} shows node {dead} as {other:?}"),
            }
        }
        if seen.values().all(|s| s.down.is_some()) || since.elapsed() > limit {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Goal: failure detection within the issue's bounds, recovery with the
/// same identity, and detection that still works when the raft leader is
/// the one that dies. Method: kill node 3 and poll `krg nodes --json` on
/// nodes 1 and 2, timing from just before the kill when each first shows
/// node 3 `suspect` (≤ 2 s) and `down` (≤ 6 s) while the others stay `up`;
/// start it and check its id, address and `krg cluster status`. Then kill
/// the leader named by `krg cluster status --json` and check that the two
/// survivors agree on a new leader among them and declare it down.
#[test]
fn lab_failure_detection_and_recovery() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let (lab, _) = up("fd");
    let ids: BTreeMap<u32, u64> = (1..=3).map(|k| (k, node_id(&lab, k))).collect();
    let id_set: BTreeSet<u64> = ids.values().copied().collect();
    wait_all_up(&lab, &[1, 2, 3], &id_set, LOAD_TIMEOUT);

    step("kill node 3: suspect within 2 s, down within 6 s, on nodes 1 and 2");
    let killed_at = Instant::now();
    lab.kill(3).expect("node 3 killed");
    eprintln!(
        "lab.kill(3) took {:.2} s",
        killed_at.elapsed().as_secs_f64()
    );
    let seen = watch_death(
        &lab,
        &[1, 2],
        ids[&3],
        &[ids[&1], ids[&2]],
        killed_at,
        DOWN_WITHIN * 3,
    );
    for (k, s) in &seen {
        let suspect = s
            .suspect
            .unwrap_or_else(|| panic!("node {k} never showed node 3 suspect: {s:?}"));
        let down = s
            .down
            .unwrap_or_else(|| panic!("node {k} never showed node 3 down: {s:?}"));
        assert!(
            suspect <= SUSPECT_WITHIN,
            "node {k}: suspect after {suspect:?} (bound {SUSPECT_WITHIN:?})"
        );
        assert!(
            down <= DOWN_WITHIN,
            "node {k}: down after {down:?} (bound {DOWN_WITHIN:?})"
        );
    }

    step("start node 3: up again, same id, same address");
    let started = Instant::now();
    lab.start(3).expect("node 3 starts");
    wait_all_up(&lab, &[1, 2, 3], &id_set, FORM_TIMEOUT);
    eprintln!(
        "node 3 up everywhere {:.2} s after lab.start(3)",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(node_id(&lab, 3), ids[&3], "node 3 kept its id");
    for k in 1..=3 {
        let nodes = nodes_json(&lab, k).expect("nodes");
        assert_eq!(
            lab_node_of(&lab, &nodes, ids[&3]),
            3,
            "node 3 kept its address"
        );
    }
    assert_status_line(&lab, 3, "up on 3 nodes (3 up)");

    step("kill the raft leader: a new leader is elected and declares it down");
    let leader_id = status_json(&lab, 1).expect("status")["leader"]
        .as_u64()
        .expect("a leader");
    let leader = lab_node_of(&lab, &nodes_json(&lab, 1).expect("nodes"), leader_id);
    let survivors: Vec<u32> = (1..=3).filter(|&k| k != leader).collect();
    let survivor_ids: Vec<u64> = survivors.iter().map(|k| ids[k]).collect();
    eprintln!("the leader is node {leader_id} (lab node {leader})");
    let killed_at = Instant::now();
    lab.kill(leader).expect("leader killed");
    let seen = watch_death(
        &lab,
        &survivors,
        leader_id,
        &survivor_ids,
        killed_at,
        DOWN_WITHIN * 3,
    );
    for (k, s) in &seen {
        let down = s
            .down
            .unwrap_or_else(|| panic!("node {k} never showed the old leader down: {s:?}"));
        assert!(
            down <= DOWN_WITHIN,
            "node {k}: old leader down after {down:?} (bound {DOWN_WITHIN:?})"
        );
    }
    let new_leaders: BTreeSet<Option<u64>> = survivors
        .iter()
        .map(|&k| status_json(&lab, k).expect("status")["leader"].as_u64())
        .collect();
    assert_eq!(
        new_leaders.len(),
        1,
        "the survivors disagree on the leader: {new_leaders:?}"
    );
    let new_leader = new_leaders
        .into_iter()
        .next()
        .flatten()
        .expect("a new leader");
    assert!(
        survivor_ids.contains(&new_leader),
        "leader {new_leader} is not a survivor"
    );
    for &k in &survivors {
        assert_status_line(&lab, k, "up on 3 nodes (2 up, 1 down)");
    }

    step("start the old leader: 3 up again");
    lab.start(leader).expect("old leader starts");
    wait_all_up(&lab, &[1, 2, 3], &id_set, FORM_TIMEOUT);
    assert_eq!(
        node_id(&lab, leader),
        leader_id,
        "the old leader kept its id"
    );
}

// ---------------------------------------------------------------------------

fn random_hex(rng: &mut impl Rng, bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rng.gen::<u8>()))
        .collect()
}

/// Goal: a machine without a valid token cannot join, gets a clear one-line
/// error and a non-zero exit, and the cluster is unchanged. Method: a second
/// `krgd` on node 3 (port 7471, a fresh state directory each time) joins
/// node 1 without a token, with a malformed token, a made-up token, a token
/// with the right CA hash but a made-up secret, an expired token and a token
/// already used (the one node 2 joined with, read from its command line);
/// the member logs each refusal, commits nothing for any of them (its raft
/// applied index, in `krg cluster status --json`, stays where it was:
/// anyone may try a token, and failed tries must not grow the log), and
/// every node still lists 3 nodes up.
#[test]
fn lab_join_is_refused_without_a_valid_token() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let (lab, _) = up("jn");
    let ids: BTreeSet<u64> = (1..=3).map(|k| node_id(&lab, k)).collect();
    let member = lab.listen_addr(1).expect("node 1").to_string();
    let ca_pem = fs::read_to_string(lab.state_dir(1).join("ca.crt")).expect("node 1's CA");
    let ca_hash = hex::encode(ca::ca_sha256(&ca_pem).expect("a CA certificate"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(GARBAGE_SEED);
    let scratch = lab.state_dir(3).parent().expect("node dir").join("joiners");
    fs::create_dir_all(&scratch).expect("scratch dir");

    let used = {
        let pid = lab.daemon_pid(2).expect("node 2's first krgd runs");
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let args: Vec<String> = cmdline.split(|b| *b == 0).map(text).collect();
        args.windows(2)
            .find(|w| w[0] == "--token")
            .map(|w| w[1].clone())
            .expect("node 2 was started with --token")
    };

    step("expired: a token with a 1 s lifetime, used after it");
    let expired = krg(&lab, 1, &["cluster", "token", "--ttl", "1s"])
        .trim()
        .to_string();
    let issued = Instant::now();
    wait_until(
        Duration::from_secs(3),
        "the token's 1 s lifetime to pass",
        || {
            if issued.elapsed() >= Duration::from_millis(1_200) {
                Ok(())
            } else {
                Err("not yet")
            }
        },
    )
    .expect("time passes");

    let cases: Vec<(&str, Option<String>, &str, bool)> = vec![
        ("no token", None, "--token", false),
        (
            "malformed",
            Some("krgjoin1.nothex".into()),
            "malformed join token",
            false,
        ),
        (
            "made up",
            Some(format!(
                "krgjoin1.{}.{}",
                random_hex(&mut rng, 32),
                random_hex(&mut rng, 16)
            )),
            "certificate authority does not match",
            false,
        ),
        (
            "made-up secret",
            Some(format!("krgjoin1.{ca_hash}.{}", random_hex(&mut rng, 16))),
            "not valid",
            true,
        ),
        ("expired", Some(expired), "expired", true),
        ("already used", Some(used), "already used", true),
    ];
    let applied = |k: u32| -> u64 {
        let status: Value =
            serde_json::from_str(&krg(&lab, k, &["cluster", "status", "--json"])).expect("json");
        status["applied_index"].as_u64().expect("applied_index")
    };
    let applied_before = applied(1);
    for (i, (what, token, wanted, member_logs)) in cases.into_iter().enumerate() {
        step(&format!("join with {what}"));
        let state = scratch.join(format!("state{i}"));
        let socket = scratch.join(format!("krgd{i}.sock"));
        let offset = log_len(&lab, 1);
        let out = run_krgd(
            &lab,
            3,
            &state,
            &socket,
            JOINER_PORT,
            Some((&member, token.as_deref())),
        );
        let line = last_stderr_line(&out);
        eprintln!("krgd said: {line}");
        if token.is_none() {
            assert_eq!(
                out.status.code(),
                Some(2),
                "clap refuses --join alone: {line}"
            );
            assert!(text(&out.stderr).contains(wanted), "{}", text(&out.stderr));
        } else {
            assert_eq!(out.status.code(), Some(1), "{what}: {line}");
            assert!(line.starts_with("krgd: cannot join"), "{what}: {line:?}");
            assert!(line.contains(wanted), "{what}: {wanted:?} not in {line:?}");
        }
        assert!(
            !state.join("krg-state.json").exists(),
            "{what}: an identity was saved"
        );
        assert!(!socket.exists(), "{what}: the joiner serves a socket");
        if member_logs {
            wait_log_line(&lab, 1, offset, &["join refused", wanted]);
        }
    }

    assert_eq!(
        applied(1),
        applied_before,
        "refused joins committed entries to the raft log"
    );

    step("the cluster still lists its 3 nodes, all up");
    wait_all_up(&lab, &[1, 2, 3], &ids, FORM_TIMEOUT);
    assert_status_line(&lab, 1, "up on 3 nodes (3 up)");
}

// ---------------------------------------------------------------------------

/// Read what the daemon sends until it closes the connection; an error if
/// it keeps it open longer than [`CLOSE_TIMEOUT`].
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> Result<Vec<u8>, String> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut buf = [0u8; 4096];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                // A TLS peer that just drops the connection.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                    ) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => Ok(got),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "the connection is still open after {CLOSE_TIMEOUT:?}"
        )),
    }
}

/// The error code in the frames the daemon sent before closing, if any.
fn answered(bytes: &[u8]) -> Option<ErrorCode> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let body = bytes.get(4..4 + len)?;
    match krg::wire::decode::<Result<(), RemoteError>>(body) {
        Ok(Err(e)) => Some(e.code),
        _ => None,
    }
}

/// One kind of bad input, as the bytes sent and whether we half-close after
/// sending (a truncated frame waits for the rest otherwise).
struct Garbage {
    name: &'static str,
    bytes: Vec<u8>,
    half_close: bool,
    /// The error the daemon answers before closing, when it can answer.
    answer: Option<ErrorCode>,
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(body);
    out
}

fn garbage(kind: ConnKind) -> Vec<Garbage> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(GARBAGE_SEED);
    let random: Vec<u8> = (0..256).map(|_| rng.gen()).collect();
    let hello = |magic, version| {
        frame(
            &krg::wire::encode(&Hello {
                magic,
                version,
                kind,
            })
            .expect("encodes"),
        )
    };
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[7; 10]);
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 16]);
    vec![
        Garbage {
            name: "random bytes",
            bytes: random,
            half_close: false,
            answer: None,
        },
        Garbage {
            name: "a truncated frame",
            bytes: truncated,
            half_close: true,
            answer: None,
        },
        Garbage {
            name: "a frame of 4 GiB",
            bytes: huge,
            half_close: false,
            answer: None,
        },
        Garbage {
            name: "a hello with a wrong magic",
            bytes: hello(0x1234_5678, PROTOCOL_VERSION),
            half_close: false,
            answer: Some(ErrorCode::BadRequest),
        },
        Garbage {
            name: "a hello with a wrong version",
            bytes: hello(MAGIC, PROTOCOL_VERSION + 1),
            half_close: false,
            answer: Some(ErrorCode::BadRequest),
        },
    ]
}

/// Where garbage is sent.
#[derive(Clone, Copy, Debug)]
enum Channel {
    /// The node port, as raw TCP (before any TLS).
    Raw,
    /// The node port, inside a TLS session (without a client certificate).
    Tls,
    /// The client socket.
    Unix,
}

impl Channel {
    fn describe(self) -> &'static str {
        match self {
            Channel::Raw => "node port (raw TCP)",
            Channel::Tls => "node port (inside TLS)",
            Channel::Unix => "Unix socket",
        }
    }
}

/// Send `garbage` on `io` (half-closing after it if asked) and wait for the
/// daemon to close the connection; returns the error code it answered
/// before closing, if it answered one.
async fn send_garbage<S>(io: &mut S, garbage: &Garbage) -> Result<Option<ErrorCode>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(&garbage.bytes)
        .await
        .map_err(|e| format!("write: {e}"))?;
    io.flush().await.map_err(|e| format!("flush: {e}"))?;
    if garbage.half_close {
        io.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    }
    let got = read_until_closed(io).await?;
    Ok(answered(&got))
}

/// Check that node K still serves: `krg nodes` answers with 3 nodes and the
/// cluster is up on 3 nodes.
fn assert_serving(lab: &Lab, k: u32, after: &str) {
    let nodes = nodes_json(lab, k).unwrap_or_else(|e| panic!("after {after}: {e}"));
    assert_eq!(nodes.len(), 3, "after {after}: {nodes:?}");
    let out = krg(lab, k, &["cluster", "status"]);
    assert!(out.starts_with("up on 3 nodes"), "after {after}: {out}");
}

/// Goal: the node port refuses a stranger without a certificate, and
/// garbage on the node port or the Unix socket closes that connection with
/// a logged reason while the daemon goes on serving. Method: from node 3's
/// namespace, a TLS client without a certificate (trusting the cluster CA)
/// says hello as a member (`Rpc`) to node 1: the answer must be
/// `PermissionDenied`, then the end of the connection, and node 1 logs it.
/// Then five kinds of garbage (seeded random bytes, a truncated frame, a 4
/// GiB length, a hello with a wrong magic, with a wrong version) go to node
/// 1 on raw TCP, inside TLS, and on its Unix socket; after each, the
/// connection must be closed (with a `BadRequest` answer where the daemon
/// can still answer), node 1's log must name it, and node 1 must still
/// answer `krg nodes` and see the cluster up on 3 nodes.
#[test]
fn lab_node_port_refuses_strangers_and_survives_garbage() {
    if !require_root_or_skip() {
        return;
    }
    let _serial = serial();
    let (lab, _) = up("pt");
    let ids: BTreeSet<u64> = (1..=3).map(|k| node_id(&lab, k)).collect();
    wait_all_up(&lab, &[1], &ids, LOAD_TIMEOUT);
    let target = std::net::SocketAddr::V4(lab.listen_addr(1).expect("node 1"));
    let ca_pem = fs::read_to_string(lab.state_dir(1).join("ca.crt")).expect("node 1's CA");
    let anonymous = tls::anonymous_client_config(&ca_pem).expect("a TLS client config");

    step("a TLS client without a certificate asks for an Rpc connection");
    let offset = log_len(&lab, 1);
    let config = anonymous.clone();
    let (local, answer, after) = lab
        .in_node(3, move || {
            runtime().block_on(async move {
                let tcp = TcpStream::connect(target)
                    .await
                    .expect("connects to node 1");
                let local = tcp.local_addr().expect("local address");
                let tls = TlsConnector::from(config)
                    .connect(tls::server_name(), tcp)
                    .await
                    .expect("the TLS handshake succeeds (the server allows joiners)");
                let mut conn = FrameConn::new(tls);
                conn.send(&Hello::new(ConnKind::Rpc))
                    .await
                    .expect("hello sent");
                let answer: Result<Result<(), RemoteError>, WireError> =
                    conn.recv_timeout(CLOSE_TIMEOUT_MS).await;
                let after: Result<Result<(), RemoteError>, WireError> =
                    conn.recv_timeout(CLOSE_TIMEOUT_MS).await;
                (local, answer, after)
            })
        })
        .expect("runs in node 3");
    let refusal = match answer {
        Ok(Err(e)) => e,
        other => panic!("wanted a PermissionDenied answer, got {other:?}"),
    };
    eprintln!("node 1 answered: {:?}: {}", refusal.code, refusal.message);
    assert_eq!(refusal.code, ErrorCode::PermissionDenied, "{refusal:?}");
    assert!(refusal.message.contains("certificate"), "{refusal:?}");
    assert!(
        matches!(after, Err(WireError::Closed | WireError::Io(_))),
        "the connection must be closed after the refusal, got {after:?}"
    );
    let line = wait_log_line(
        &lab,
        1,
        offset,
        &[&format!("remote={local}"), "certificate"],
    );
    eprintln!("node 1 logged: {line}");
    assert_serving(&lab, 1, "the stranger");

    for channel in [Channel::Raw, Channel::Tls, Channel::Unix] {
        let kind = match channel {
            Channel::Unix => ConnKind::Client,
            Channel::Raw | Channel::Tls => ConnKind::Rpc,
        };
        for bad in garbage(kind) {
            let what = format!("{} on the {}", bad.name, channel.describe());
            step(&what);
            let offset = log_len(&lab, 1);
            let (outcome, marker) = match channel {
                Channel::Unix => {
                    let socket = lab.socket(1);
                    let outcome = runtime().block_on(async {
                        let mut io = UnixStream::connect(&socket).await.expect("connects");
                        send_garbage(&mut io, &bad).await
                    });
                    (outcome, "closed a client connection".to_string())
                }
                Channel::Raw | Channel::Tls => {
                    let config = anonymous.clone();
                    let bad = &bad;
                    lab.in_node(3, move || {
                        runtime().block_on(async move {
                            let tcp = TcpStream::connect(target).await.expect("connects");
                            let local = tcp.local_addr().expect("local address");
                            let outcome = if matches!(channel, Channel::Tls) {
                                let mut io = TlsConnector::from(config)
                                    .connect(tls::server_name(), tcp)
                                    .await
                                    .expect("TLS handshake");
                                send_garbage(&mut io, bad).await
                            } else {
                                let mut io = tcp;
                                send_garbage(&mut io, bad).await
                            };
                            (
                                outcome,
                                format!("closed a node-port connection remote={local}"),
                            )
                        })
                    })
                    .expect("runs in node 3")
                }
            };
            let outcome = outcome.unwrap_or_else(|e| panic!("{what}: {e}"));
            eprintln!("{what}: closed, after answering {outcome:?}");
            // Raw TCP: the TLS layer refuses it before any frame is read.
            let wanted = match channel {
                Channel::Raw => None,
                Channel::Tls | Channel::Unix => bad.answer,
            };
            assert_eq!(outcome, wanted, "{what}: the answer before closing");
            let line = wait_log_line(&lab, 1, offset, &[&marker]);
            eprintln!("node 1 logged: {line}");
            assert_serving(&lab, 1, &what);
        }
    }

    step("a connection left half-sent does not stop others being served");
    let socket = lab.socket(1);
    let rt = runtime();
    let mut pending = rt.block_on(async {
        let mut io = UnixStream::connect(&socket).await.expect("connects");
        io.write_all(&[0, 0, 0, 100, 1, 2, 3])
            .await
            .expect("writes");
        io
    });
    assert_serving(&lab, 1, "a pending half frame");
    let outcome = rt.block_on(async {
        pending.shutdown().await.expect("half-close");
        read_until_closed(&mut pending).await
    });
    assert!(
        outcome.is_ok(),
        "the pending connection is closed: {outcome:?}"
    );
    wait_all_up(&lab, &[1, 2, 3], &ids, FORM_TIMEOUT);
}
