//! Benchmark of issue 3: how fast `krg run` starts a remote job and moves
//! bytes, side by side with ssh (a persistent master connection) and a
//! local fork+exec, on a 3-node lab cluster. Prints one JSON object per
//! line. Needs root (it builds a lab); run with `cargo bench --bench
//! run_latency` (release binaries); `KRG_BENCH_ONLY=latency` stops after
//! the start latencies; `KRG_BENCH_BASELINE=DIR` also measures the `krgd`
//! and `krg` of DIR (an older build) on a second lab, in the same turns.
//! Start latencies are taken in turns, one run of each variant after the
//! other, so that a noisy moment of the machine falls on all of them.
//!
//! Every variant is a process started inside node 1's namespaces, so they
//! all pay the same spawn cost on this side: the benchmark enters them for
//! each run (`setns` between fork and exec, from a process of many
//! threads). Then the same variants are timed again from a driver already
//! inside node 1 (this binary, started there once with
//! `KRG_BENCH_DRIVER`), as a user's shell on node 1 starts them:
//! `start_latency_in_node`. A `krg` client reaches its krgd by the Unix
//! socket only, so the baseline's clients run from there as well.

use krg::lab::{Lab, LabOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LATENCY_RUNS: usize = 300;
const BURST_JOBS: usize = 1000;
const BURST_PARALLEL: usize = 16;
const STREAM_BYTES: u64 = 1 << 30;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Runs `c` with this process's stdout, so that its JSON lines join ours.
fn run_inherit(mut c: Command) {
    let st = c.status().expect("spawn");
    assert!(st.success(), "command failed: {c:?}");
}

fn run_ok(mut c: Command) {
    let st = c
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("spawn");
    assert!(st.success(), "command failed: {c:?}");
}

/// Start latencies of several ways to run `true`, measured in turns (one
/// run of each, then again) so that the machine's moods fall on all alike.
fn latencies(variants: &[(&str, &dyn Fn() -> Command)]) {
    latencies_as("start_latency", variants)
}

fn latencies_as(bench: &str, variants: &[(&str, &dyn Fn() -> Command)]) {
    for (_, make) in variants {
        for _ in 0..10 {
            run_ok(make());
        }
    }
    let mut ms = vec![Vec::with_capacity(LATENCY_RUNS); variants.len()];
    for _ in 0..LATENCY_RUNS {
        for (i, (_, make)) in variants.iter().enumerate() {
            let t = Instant::now();
            run_ok(make());
            ms[i].push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    for ((name, _), mut ms) in variants.iter().zip(ms) {
        ms.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        println!(
            "{}",
            serde_json::json!({"bench": bench, "variant": name, "runs": LATENCY_RUNS,
                "p50_ms": percentile(&ms, 0.5), "p99_ms": percentile(&ms, 0.99), "min_ms": ms[0]})
        );
    }
}

/// One variant as the in-node driver gets it: a name, then the program
/// and its arguments, and the environment it adds, all as one JSON value.
fn variant_json(name: &str, c: &Command) -> serde_json::Value {
    let argv: Vec<String> = std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let env: Vec<(String, String)> = c
        .get_envs()
        .filter_map(|(k, v)| {
            Some((
                k.to_string_lossy().into_owned(),
                v?.to_string_lossy().into_owned(),
            ))
        })
        .collect();
    serde_json::json!({"name": name, "argv": argv, "env": env})
}

/// Times the variants of `KRG_BENCH_DRIVER` (a JSON array of
/// [`variant_json`]) from where this process runs, in turns, as
/// [`latencies`] does.
fn drive(spec: &str) {
    let spec: Vec<serde_json::Value> = serde_json::from_str(spec).expect("driver spec");
    let makers: Vec<(String, Box<dyn Fn() -> Command>)> = spec
        .into_iter()
        .map(|v| {
            let name = v["name"].as_str().expect("name").to_owned();
            let argv: Vec<String> = serde_json::from_value(v["argv"].clone()).expect("argv");
            let env: Vec<(String, String)> = serde_json::from_value(v["env"].clone()).expect("env");
            let make = move || {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]).envs(env.iter().map(|(k, v)| (k, v)));
                c
            };
            (name, Box::new(make) as Box<dyn Fn() -> Command>)
        })
        .collect();
    let variants: Vec<(&str, &dyn Fn() -> Command)> = makers
        .iter()
        .map(|(n, m)| (n.as_str(), m.as_ref()))
        .collect();
    latencies_as("start_latency_in_node", &variants);
}

fn burst(name: &str, make: &dyn Fn() -> Command) {
    let t = Instant::now();
    let mut running = Vec::new();
    for _ in 0..BURST_JOBS {
        if running.len() >= BURST_PARALLEL {
            let mut c: std::process::Child = running.remove(0);
            assert!(c.wait().expect("wait").success());
        }
        running.push(make().stdout(Stdio::null()).spawn().expect("spawn"));
    }
    for mut c in running {
        assert!(c.wait().expect("wait").success());
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"bench": "burst", "variant": name, "jobs": BURST_JOBS, "parallel": BURST_PARALLEL,
            "seconds": secs, "jobs_per_second": BURST_JOBS as f64 / secs})
    );
}

fn stream(name: &str, mut c: Command) {
    let t = Instant::now();
    let mut child = c.stdout(Stdio::piped()).spawn().expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(child.wait().expect("wait").success());
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, STREAM_BYTES);
    println!(
        "{}",
        serde_json::json!({"bench": "stdout_throughput", "variant": name, "bytes": total,
            "seconds": secs, "mb_per_second": total as f64 / secs / 1e6})
    );
}

/// sshd in node 2, a login for `SSH_USER` with a key made for this run
/// only.
struct Sshd {
    dir: PathBuf,
    child: std::process::Child,
}

/// The account ssh logs in as: root's shell start-up files on a
/// development machine (pyenv, prompts) can cost ssh 100 ms a command,
/// which says nothing about ssh. A user of this run only, with `/bin/sh`
/// and no start-up files, is what a fair comparison needs.
const SSH_USER: &str = "krg-bench-ssh";

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Its sessions outlive sshd's listener while the master lives.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", SSH_USER])
            .status();
        let _ = Command::new("userdel")
            .arg(SSH_USER)
            .stderr(Stdio::null())
            .status();
    }
}

fn start_sshd(lab: &Lab) -> Option<Sshd> {
    if !Path::new("/usr/sbin/sshd").exists() {
        eprintln!("skipping ssh: /usr/sbin/sshd is not installed (Debian openssh-server)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("krg-bench-ssh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    for (key, typ) in [("host", "ed25519"), ("user", "ed25519")] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", typ, "-N", "", "-f"])
            .arg(dir.join(key))
            .status()
            .ok()?;
        assert!(st.success());
    }
    std::fs::copy(dir.join("user.pub"), dir.join("authorized_keys")).ok()?;
    let _ = Command::new("userdel")
        .arg(SSH_USER)
        .stderr(Stdio::null())
        .status();
    // `-p '*'`: no password, yet not a locked account, which sshd refuses.
    let made = Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", "-p", "*", "-d"])
        .arg(&dir)
        .arg(SSH_USER)
        .status()
        .ok()?;
    if !made.success() {
        eprintln!("skipping ssh: useradd {SSH_USER} failed");
        return None;
    }
    std::fs::create_dir_all("/run/sshd").ok()?;
    let mut c = lab.command(2, "/usr/sbin/sshd").ok()?;
    c.args(["-D", "-e", "-f", "/dev/null", "-p", "22"])
        .arg("-h")
        .arg(dir.join("host"))
        .args([
            "-o",
            "PermitRootLogin=yes",
            "-o",
            "UsePAM=no",
            "-o",
            "StrictModes=no",
        ])
        .arg("-o")
        .arg(format!(
            "AuthorizedKeysFile={}",
            dir.join("authorized_keys").display()
        ))
        .arg("-o")
        .arg(format!("PidFile={}", dir.join("sshd.pid").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = c.spawn().ok()?;
    let sshd = Sshd { dir, child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if ssh_cmd(lab, &sshd, "true")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            return Some(sshd);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("skipping ssh: sshd in node 2 did not accept a login");
    None
}

fn ssh_cmd(lab: &Lab, sshd: &Sshd, cmd: &str) -> Command {
    let mut c = lab.command(1, "ssh").expect("node 1");
    c.arg("-i")
        .arg(sshd.dir.join("user"))
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=120"])
        .arg("-o")
        .arg(format!("ControlPath={}", sshd.dir.join("cm").display()))
        .arg(format!("{SSH_USER}@{}", lab.addr(2).expect("addr")))
        .arg(cmd);
    c
}

fn main() {
    if let Ok(spec) = std::env::var("KRG_BENCH_DRIVER") {
        drive(&spec);
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("run_latency: needs root (it builds a lab cluster); skipped");
        return;
    }
    let mut opts = LabOptions::new(format!("b{}", std::process::id() % 100_000), 3);
    opts.krgd = Some(env!("CARGO_BIN_EXE_krgd").into());
    opts.krg = Some(env!("CARGO_BIN_EXE_krg").into());
    opts.krgd_args = vec!["--load-scope".into(), "cgroup".into()];
    let lab = Lab::up(opts).expect("lab up");
    let krg = env!("CARGO_BIN_EXE_krg");
    let krg_on = |node: &'static str, args: &'static [&'static str]| {
        let lab = &lab;
        move || {
            let mut c = lab.command(1, krg).expect("node 1");
            c.args(["run", "-T", "--node", node]).args(args);
            c
        }
    };
    // KRG_BENCH_BASELINE=DIR: the krgd and krg binaries in DIR (an older
    // build) on a second lab, measured in the same turns.
    let baseline = std::env::var_os("KRG_BENCH_BASELINE").map(|dir| {
        let dir = PathBuf::from(dir);
        let mut opts = LabOptions::new(format!("c{}", std::process::id() % 100_000), 3);
        opts.krgd = Some(dir.join("krgd"));
        opts.krg = Some(dir.join("krg"));
        opts.krgd_args = vec!["--load-scope".into(), "cgroup".into()];
        (Lab::up(opts).expect("baseline lab up"), dir.join("krg"))
    });
    let sshd = start_sshd(&lab);
    let local = || lab.command(1, "/bin/true").expect("node 1");
    // The client alone: what starting the `krg` binary costs.
    let version = || {
        let mut c = lab.command(1, krg).expect("node 1");
        c.arg("--version");
        c
    };
    let on_2 = krg_on("2", &["true"]);
    let on_1 = krg_on("1", &["true"]);
    let base_on = |node: &'static str| {
        let baseline = &baseline;
        move || {
            let (lab, krg) = baseline.as_ref().expect("a baseline");
            let mut c = lab.command(1, krg).expect("node 1");
            c.args(["run", "-T", "--node", node, "true"]);
            c
        }
    };
    let (base_2, base_1) = (base_on("2"), base_on("1"));
    let ssh = || ssh_cmd(&lab, sshd.as_ref().expect("sshd"), "true");
    let mut variants: Vec<(&str, &dyn Fn() -> Command)> = vec![
        ("local fork+exec", &local),
        ("krg --version (client start only)", &version),
        ("krg run --node 2", &on_2),
        ("krg run --node 1 (same node)", &on_1),
    ];
    if baseline.is_some() {
        variants.push(("baseline: krg run --node 2", &base_2));
        variants.push(("baseline: krg run --node 1 (same node)", &base_1));
    }
    if sshd.is_some() {
        variants.push(("ssh ControlMaster", &ssh));
    }
    latencies(&variants);
    let spec: Vec<serde_json::Value> = variants
        .iter()
        .map(|(name, make)| variant_json(name, &make()))
        .collect();
    let mut driver = lab
        .command(1, std::env::current_exe().expect("this binary"))
        .expect("node 1");
    driver.env(
        "KRG_BENCH_DRIVER",
        serde_json::Value::from(spec).to_string(),
    );
    run_inherit(driver);
    if std::env::var("KRG_BENCH_ONLY").as_deref() == Ok("latency") {
        return;
    }
    burst("krg run --node 2", &krg_on("2", &["true"]));
    if baseline.is_some() {
        burst("baseline: krg run --node 2", &base_2);
    }
    drop(baseline);
    if let Some(s) = &sshd {
        burst("ssh ControlMaster", &|| ssh_cmd(&lab, s, "true"));
    }
    let head = format!("head -c {STREAM_BYTES} /dev/zero");
    let mut c = lab.command(1, krg).expect("node 1");
    c.args(["run", "-T", "--node", "2", "sh", "-c", &head]);
    stream("krg run --node 2", c);
    if let Some(s) = &sshd {
        stream("ssh ControlMaster", ssh_cmd(&lab, s, &head));
    }
    drop(sshd);
    drop(lab);
}
