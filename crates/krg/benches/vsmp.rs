//! Figures of issue 6 (the virtual SMP), on a 3-node lab cluster: a real C
//! code base built with `make -j"$(nproc)"` inside `krg run --cap
//! +DISTANT_FORK` side by side with plain `make -j2` on one node, and the
//! cost of one distant exec (`/bin/true` run 1,000 times by a shell loop
//! in a job, with and without DISTANT_FORK). Prints one JSON object per
//! line. Needs root (it builds a lab); run with
//!
//! ```text
//! cargo build --release --workspace      # libkrg_preload.so next to krgd
//! cargo bench --bench vsmp
//! ```
//!
//! The code base is Lua 5.4 (PUC-Rio's, from Debian's source package
//! `lua5.4`): `KRG_VSMP_LUA=DIR` names an unpacked tree (the directory
//! with `src/`); without it the bench runs `apt-get source --download-only
//! lua5.4` in a temporary directory (this needs a `deb-src` line in the
//! APT sources) and unpacks the upstream tarball there. Without either the
//! build figures are skipped with a reason. Nothing is written outside
//! temporary directories.
//!
//! Every variant runs inside node 1's namespaces; they alternate, each
//! `KRG_VSMP_ROUNDS` times (default 5), on a fresh copy of the tree. A lab
//! shares this machine's cores among its nodes: see docs/vsmp.md for what
//! these figures can and cannot show.

use krg::lab::{Lab, LabOptions};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const KRG: &str = env!("CARGO_BIN_EXE_krg");
const KRGD: &str = env!("CARGO_BIN_EXE_krgd");
/// How many `/bin/true` the exec loop runs.
const EXECS: u32 = 1000;
/// Lua's own build, without its recursive `make linux` (a sub-make is a
/// program of its own: distant exec would send it, and all its compilations,
/// to one node).
const LUA_MAKE_ARGS: &str = "-C src all SYSCFLAGS=-DLUA_USE_LINUX 'SYSLIBS=-Wl,-E -ldl'";
/// A build or loop that takes longer has gone wrong.
const RUN_TIMEOUT: Duration = Duration::from_secs(900);

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("vsmp: needs root (it builds a lab cluster); skipped");
        return;
    }
    let preload = Path::new(KRGD).with_file_name("libkrg_preload.so");
    if !preload.is_file() {
        eprintln!(
            "vsmp: {} is missing: build it with `cargo build --release --workspace`",
            preload.display()
        );
        std::process::exit(1);
    }
    let rounds: usize = std::env::var("KRG_VSMP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=20).contains(n))
        .unwrap_or(5);
    let mut options = LabOptions::new(format!("vb{}", std::process::id() % 100_000), 3);
    options.krgd = Some(KRGD.into());
    options.krg = Some(KRG.into());
    options.krgd_args = vec!["--load-scope".into(), "cgroup".into()];
    let lab = Lab::up(options).expect("lab up");
    // The first job right after the cluster forms may see its node only
    // (docs/vsmp.md, known bugs): shown, then the view is read until it
    // shows the whole cluster.
    let first = nproc_in_job(&lab);
    let started = Instant::now();
    // Every lab node is this machine: the cluster has 3 times its CPUs.
    let cluster_cpus = host_cpus()
        .parse::<u64>()
        .map(|n| (3 * n).to_string())
        .unwrap_or_default();
    let mut now = first.clone();
    while now != cluster_cpus && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        now = nproc_in_job(&lab);
    }
    println!(
        "{}",
        json!({"bench": "machine", "cpus": host_cpus(), "lab_nodes": 3,
               "nproc_in_first_job": first, "nproc_in_a_job": now})
    );
    exec_overhead(&lab, rounds);
    let temp = TempDir::new("src");
    match lua_source(temp.path()) {
        Ok(tree) => build(&lab, &tree, rounds),
        Err(why) => eprintln!("vsmp: build figures skipped: {why}"),
    }
    drop(lab);
}

/// `/bin/true` 1,000 times by a shell loop: not in a job, in a job, and in
/// a job with DISTANT_FORK.
fn exec_overhead(lab: &Lab, rounds: usize) {
    let script = format!(
        "i=0; f=0; while [ $i -lt {EXECS} ]; do /bin/true || f=$((f+1)); i=$((i+1)); done; echo $f"
    );
    let variants: [(&str, Vec<&str>); 3] = [
        ("sh on node 1, not a job", vec![]),
        ("job on node 1", vec![KRG, "run", "--node", "1", "--"]),
        (
            "job on node 1, DISTANT_FORK",
            vec![KRG, "run", "--node", "1", "--cap", "+DISTANT_FORK", "--"],
        ),
    ];
    for _ in 0..rounds {
        for (name, prefix) in &variants {
            let since_ms = now_ms();
            let mut args: Vec<&str> = prefix.clone();
            args.extend_from_slice(&["sh", "-c", &script]);
            let (out, seconds) = timed(lab, &args, "/tmp");
            let failures: Option<u64> = String::from_utf8_lossy(&out.stdout).trim().parse().ok();
            println!(
                "{}",
                json!({"bench": "exec_loop", "variant": name, "execs": EXECS,
                       "seconds": seconds, "ms_per_exec": seconds * 1000.0 / f64::from(EXECS),
                       "exit": out.status.code(), "failed_execs": failures,
                       "sent_to_other_nodes": distant_placements(lab, since_ms).len()})
            );
        }
    }
}

/// Build the tree three ways, alternating, on fresh copies.
fn build(lab: &Lab, tree: &Path, rounds: usize) {
    // `exec`: make must be the job's own process. Forked by the job's
    // shell, it would be a child that distant exec sends to another node as
    // a job of its own, without DISTANT_FORK (children get the inheritable
    // sets), and every compilation would run there.
    let plain = format!("echo nproc=$(nproc) >&2; exec make -j2 {LUA_MAKE_ARGS}");
    let cluster = format!("n=$(nproc); echo nproc=$n >&2; exec make -j\"$n\" {LUA_MAKE_ARGS}");
    let variants: [(&str, Vec<&str>, &str); 3] = [
        ("make -j2, node 1, not a job", vec![], &plain),
        (
            "krg run: make -j$(nproc), no DISTANT_FORK",
            vec![KRG, "run", "--node", "1", "--"],
            &cluster,
        ),
        (
            "krg run --cap +DISTANT_FORK: make -j$(nproc)",
            vec![KRG, "run", "--node", "1", "--cap", "+DISTANT_FORK", "--"],
            &cluster,
        ),
    ];
    for round in 0..rounds {
        for (name, prefix, make) in &variants {
            let copy = TempDir::new("build");
            let status = Command::new("cp")
                .arg("-a")
                .arg(tree)
                .arg(copy.path().join("tree"))
                .status()
                .expect("runs cp");
            assert!(status.success(), "cp -a {}", tree.display());
            let dir = copy.path().join("tree");
            let since_ms = now_ms();
            let mut args: Vec<&str> = prefix.clone();
            args.extend_from_slice(&["sh", "-c", make]);
            let (out, seconds) = timed(lab, &args, dir.to_str().expect("UTF-8 path"));
            let runs = Command::new(dir.join("src/lua"))
                .args(["-e", "print(1+1)"])
                .output()
                .is_ok_and(|o| o.stdout == b"2\n");
            let placed = distant_placements(lab, since_ms);
            let mut per_node = serde_json::Map::new();
            for node in placed.iter().filter_map(|m| m.rsplit(" on node ").next()) {
                let count = per_node.entry(node.to_string()).or_insert(json!(0));
                *count = json!(count.as_u64().unwrap_or(0) + 1);
            }
            let stderr = String::from_utf8_lossy(&out.stderr);
            let nproc: Option<u64> = stderr
                .lines()
                .find_map(|l| l.strip_prefix("nproc="))
                .and_then(|n| n.trim().parse().ok());
            let error: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains("***") || l.starts_with("krg:"))
                .take(3)
                .collect();
            println!(
                "{}",
                json!({"bench": "build", "code_base": "lua 5.4", "variant": name, "round": round,
                       "seconds": seconds, "nproc": nproc, "exit": out.status.code(), "program_runs": runs,
                       "programs_sent_to_other_nodes": placed.len(), "by_node": per_node,
                       "errors": error})
            );
        }
    }
}

/// Run `args` on node 1 from `dir` with an idle stdin (a pipe left open),
/// and time it.
fn timed(lab: &Lab, args: &[&str], dir: &str) -> (Output, f64) {
    let mut command = lab.command(1, args[0]).expect("node 1");
    command
        .args(&args[1..])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().expect("spawn");
    let idle = child.stdin.take();
    let deadline = started + RUN_TIMEOUT;
    while child.try_wait().expect("try_wait").is_none() {
        assert!(
            Instant::now() < deadline,
            "{args:?} ran past {RUN_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(idle);
    (child.wait_with_output().expect("output"), seconds)
}

/// Node 1's "distant exec: placed ..." decisions since `since_ms` (the
/// programs distant exec sent to another node; those kept in place are not
/// recorded).
fn distant_placements(lab: &Lab, since_ms: u64) -> Vec<String> {
    let out = lab.run(1, &[KRG, "events", "--json"]).expect("krg events");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["time_ms"].as_u64().is_some_and(|t| t >= since_ms))
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .filter(|m| m.starts_with("distant exec: placed"))
        .collect()
}

fn nproc_in_job(lab: &Lab) -> String {
    let (out, _) = timed(lab, &[KRG, "run", "--node", "1", "--", "nproc"], "/tmp");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn host_cpus() -> String {
    let out = Command::new("nproc").output().expect("nproc");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The Lua tree: `KRG_VSMP_LUA`, or Debian's source package unpacked in
/// `temp`.
fn lua_source(temp: &Path) -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("KRG_VSMP_LUA") {
        let dir = PathBuf::from(dir);
        return if dir.join("src/Makefile").is_file() {
            Ok(dir)
        } else {
            Err(format!(
                "KRG_VSMP_LUA={} has no src/Makefile",
                dir.display()
            ))
        };
    }
    let out = Command::new("apt-get")
        .args(["source", "--download-only", "lua5.4"])
        .current_dir(temp)
        .output()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`apt-get source --download-only lua5.4` failed (add a deb-src line, or set KRG_VSMP_LUA): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let tarball = std::fs::read_dir(temp)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".orig.tar.gz"))
        .ok_or("no .orig.tar.gz in the source package")?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .current_dir(temp)
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("cannot unpack {}", tarball.display()));
    }
    std::fs::read_dir(temp)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("src/Makefile").is_file())
        .ok_or_else(|| "the tarball holds no src/Makefile".to_string())
}

/// A directory under /tmp every user can enter, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "krg-vsmp-bench-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creates a temporary directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
