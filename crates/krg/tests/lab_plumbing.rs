//! The lab's plumbing, without the real daemon: namespaces, bridge, links,
//! addresses, host names, cgroups, exec, cut/heal, kill and removal; and the
//! daemon life cycle (up, kill, start) driven through a fake `krgd`/`krg`
//! pair of shell scripts that speak the same command-line contract.
//!
//! Every test makes its own lab (unique name `t<pid>x<n>`) so they run in
//! parallel. Without root they are skipped with a reason, unless
//! `KRG_REQUIRE_LAB=1` makes that a failure.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use common::{Scratch, WAIT};
use krg::lab::{self, Lab, LabOptions};

/// A lab name no other test (or test process) uses.
fn lab_name() -> String {
    common::lab_name("t")
}

fn network_only(name: &str, nodes: u32) -> LabOptions {
    LabOptions {
        start_daemons: false,
        ..LabOptions::new(name, nodes)
    }
}

fn stdout_of(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "command failed: {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn host(args: &[&str]) -> String {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("runs on the host");
    stdout_of(&output)
}

/// Whether a TCP connection from node `from` to `addr` succeeds (and the
/// listener answers), within a short time.
fn can_connect(lab: &Lab, from: u32, addr: SocketAddr) -> Result<(), String> {
    lab.in_node(from, || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        let mut reply = String::new();
        stream
            .read_to_string(&mut reply)
            .map_err(|e| e.to_string())?;
        if reply == "hello" {
            Ok(())
        } else {
            Err(format!("got {reply:?}"))
        }
    })
    .map_err(|e| e.to_string())?
}

/// A listener inside node `k` answering "hello" to every connection.
fn serve_hello(lab: &Lab, k: u32) -> SocketAddr {
    let ip = lab.addr(k).expect("node exists");
    let listener = lab
        .in_node(k, || TcpListener::bind((ip, 0)))
        .expect("enters node")
        .expect("binds");
    let addr = listener.local_addr().expect("has an address");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"hello");
        }
    });
    addr
}

fn pid_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !matches!(
                s.rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next()),
                Some("Z" | "X")
            )
        })
        .unwrap_or(false)
}

/// Check that nothing of lab `name` is left.
fn assert_no_trace(name: &str, cgroup_dirs: &[PathBuf], pids: &[u32]) {
    let netns = host(&["ip", "netns", "list"]);
    let prefix = format!("krg-{name}-");
    assert!(
        !netns.lines().any(|l| l.starts_with(&prefix)),
        "namespaces left: {netns}"
    );
    for dir in cgroup_dirs {
        assert!(!dir.exists(), "cgroup left: {}", dir.display());
    }
    let dir = Path::new("/run/krg-lab").join(name);
    assert!(!dir.exists(), "files left in {}", dir.display());
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("readable");
    assert!(
        !mounts.contains(&format!("/run/krg-lab/{name}/")),
        "mounts left: {mounts}"
    );
    if let Ok(entries) = fs::read_dir("/run/krg-lab/.index") {
        for entry in entries.flatten() {
            let owner = fs::read_to_string(entry.path()).unwrap_or_default();
            assert_ne!(owner, name, "index {:?} still reserved", entry.file_name());
        }
    }
    for &pid in pids {
        assert!(!pid_alive(pid), "process {pid} is still running");
    }
    assert!(
        !lab::list().contains(&name.to_string()),
        "lab::list still shows {name}"
    );
}

/// Goal: two nodes reach each other over the bridge, a cut node is
/// unreachable and a healed one reachable again. Method: a TCP listener
/// inside node 2, connections from node 1 (in a thread that entered node 1,
/// and through bash's /dev/tcp in a command run on node 1).
#[test]
fn nodes_talk_and_cut_heal() {
    if !lab::require_root_or_skip() {
        return;
    }
    let lab = Lab::create_network(&network_only(&lab_name(), 3)).expect("lab is made");
    let target = serve_hello(&lab, 2);

    eprintln!("--- node 1 connects to node 2");
    lab::wait_until(WAIT, "node 1 reaches node 2", || {
        can_connect(&lab, 1, target)
    })
    .expect("reachable");
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && cat <&3",
        target.ip(),
        target.port()
    );
    let reply = lab.run(1, &["bash", "-c", &script]).expect("bash runs");
    assert_eq!(stdout_of(&reply), "hello");

    eprintln!("--- cut node 2");
    lab.cut(2).expect("cut");
    assert!(lab.is_cut(2).expect("link state"));
    assert!(!lab.is_cut(1).expect("link state"));
    assert!(
        can_connect(&lab, 1, target).is_err(),
        "node 2 is still reachable after the cut"
    );
    let node3 = serve_hello(&lab, 3);
    can_connect(&lab, 1, node3).expect("node 3 is not affected by cutting node 2");

    eprintln!("--- heal node 2");
    lab.heal(2).expect("heal");
    assert!(!lab.is_cut(2).expect("link state"));
    lab::wait_until(WAIT, "node 1 reaches node 2 after heal", || {
        can_connect(&lab, 1, target)
    })
    .expect("reachable");
    let status = lab.status().expect("status");
    assert_eq!(status.nodes.len(), 3);
    assert!(status
        .nodes
        .iter()
        .all(|n| !n.cut && !n.alive && n.pid.is_none()));
}

/// Goal: a command run on a node sees the node's host name, address,
/// environment and cgroup.
#[test]
fn commands_run_as_on_the_node() {
    if !lab::require_root_or_skip() {
        return;
    }
    let lab = Lab::create_network(&network_only(&lab_name(), 2)).expect("lab is made");
    assert_eq!(
        stdout_of(&lab.run(2, &["hostname"]).expect("runs")),
        "krg-lab-2"
    );
    assert_eq!(
        stdout_of(&lab.run(1, &["hostname"]).expect("runs")),
        "krg-lab-1"
    );
    let host_name = host(&["hostname"]);
    assert_ne!(host_name, "krg-lab-2", "the host's name changed");

    let env = lab
        .run(
            2,
            &["sh", "-c", "echo $KRG_SOCKET $KRG_NODE_INDEX $KRG_LAB"],
        )
        .expect("runs");
    assert_eq!(
        stdout_of(&env),
        format!("{} 2 {}", lab.socket(2).display(), lab.name())
    );

    let addrs = stdout_of(
        &lab.run(2, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
            .expect("runs"),
    );
    assert!(
        addrs.contains(&format!("{}/24", lab.addr(2).expect("node 2"))),
        "eth0 of node 2: {addrs}"
    );
    let links = stdout_of(&lab.run(2, &["ip", "-o", "link"]).expect("runs"));
    assert_eq!(
        links.lines().count(),
        2,
        "node 2 should have lo and eth0 only: {links}"
    );

    let cgroups = stdout_of(&lab.run(2, &["cat", "/proc/self/cgroup"]).expect("runs"));
    let wanted = format!("krg-lab/{}/n2", lab.name());
    assert!(
        cgroups.lines().any(|l| l.ends_with(&wanted)),
        "not in node 2's cgroup: {cgroups}"
    );

    let status = lab.run(2, &["sh", "-c", "exit 7"]).expect("runs").status;
    assert_eq!(status.code(), Some(7));
    assert!(lab.run(3, &["true"]).is_err());
    let error = lab
        .command(4, "true")
        .expect_err("node 4 does not exist")
        .to_string();
    assert_eq!(
        error,
        "krg lab: node 4 does not exist (the lab has 2 nodes)"
    );
}

/// Goal: `exec` replaces the calling process with the command, inside the
/// node. Method: this test binary runs itself with an environment variable
/// that makes the test call `Lab::exec`, and checks the child's output and
/// exit status.
#[test]
fn exec_replaces_the_process() {
    if let Ok(name) = std::env::var("KRG_LAB_TEST_EXEC") {
        let lab = Lab::open(&name).expect("the parent made the lab");
        let error = lab.exec(
            2,
            &[
                "sh",
                "-c",
                "hostname; echo $KRG_NODE_INDEX; read line; echo got $line; exit 7",
            ],
        );
        panic!("exec returned: {error:?}");
    }
    if !lab::require_root_or_skip() {
        return;
    }
    let lab = Lab::create_network(&network_only(&lab_name(), 2)).expect("lab is made");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "exec_replaces_the_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KRG_LAB_TEST_EXEC", lab.name())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("test binary runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"stdin works\n")
        .expect("writes");
    let output = child.wait_with_output().expect("child finishes");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("krg-lab-2\n2\ngot stdin works\n"),
        "child printed: {stdout}"
    );
    assert_eq!(output.status.code(), Some(7));
}

/// Goal: killing a node ends every process on it (also ones that left their
/// parent), and nothing on other nodes.
#[test]
fn kill_ends_everything_on_the_node() {
    if !lab::require_root_or_skip() {
        return;
    }
    let lab = Lab::create_network(&network_only(&lab_name(), 2)).expect("lab is made");
    let mut direct = lab
        .command(2, "sleep")
        .expect("command")
        .arg("1000")
        .spawn()
        .expect("spawns");
    let orphan = lab
        .run(2, &["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
        .expect("runs");
    let orphan: u32 = stdout_of(&orphan).parse().expect("a pid");
    let mut other = lab
        .command(1, "sleep")
        .expect("command")
        .arg("1000")
        .spawn()
        .expect("spawns");
    assert!(pid_alive(orphan));

    lab.kill(2).expect("kill");
    let status = direct.wait().expect("waits");
    assert_eq!(status.signal(), Some(9), "direct child: {status}");
    assert!(!pid_alive(orphan), "the orphan survived");
    assert!(
        other.try_wait().expect("try_wait").is_none(),
        "node 1's process died"
    );
    for dir in lab.cgroup_dirs(2) {
        assert!(
            dir.exists(),
            "node 2's cgroup {} was removed",
            dir.display()
        );
    }
    let _ = other.kill();
    let _ = other.wait();
}

/// Goal: the host's own interfaces, addresses and routes do not change.
#[test]
fn host_network_is_untouched() {
    if !lab::require_root_or_skip() {
        return;
    }
    let snapshot = || {
        let addrs = host(&["ip", "-4", "-o", "addr"]);
        let routes = host(&["ip", "-4", "route"]);
        let links: BTreeSet<String> = host(&["ip", "-o", "link"])
            .lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
            .collect();
        (addrs, routes, links)
    };
    let before = snapshot();
    let lab = Lab::create_network(&network_only(&lab_name(), 3)).expect("lab is made");
    let during = snapshot();
    lab.down().expect("down");
    let after = snapshot();
    assert_eq!(before.0, during.0, "host addresses changed");
    assert_eq!(before.1, during.1, "host routes changed");
    let new_links: Vec<_> = during
        .2
        .difference(&before.2)
        .filter(|l| l.starts_with("kl"))
        .collect();
    assert!(
        new_links.is_empty(),
        "links appeared on the host: {new_links:?}"
    );
    assert_eq!(before.0, after.0);
}

/// Goal: CPU limits land in each node's cgroup.
#[test]
fn cpu_limits_are_applied() {
    if !lab::require_root_or_skip() {
        return;
    }
    let options = LabOptions {
        cpu_limits: vec![0.25, 1.5],
        ..network_only(&lab_name(), 2)
    };
    let lab = Lab::create_network(&options).expect("lab is made");
    let quota = |k: u32| -> String {
        for dir in lab.cgroup_dirs(k) {
            if let Ok(q) = fs::read_to_string(dir.join("cpu.cfs_quota_us")) {
                let period = fs::read_to_string(dir.join("cpu.cfs_period_us")).expect("period");
                return format!("{} {}", q.trim(), period.trim());
            }
            if let Ok(max) = fs::read_to_string(dir.join("cpu.max")) {
                return max.trim().to_string();
            }
        }
        panic!("no cpu controller for node {k}");
    };
    assert_eq!(quota(1), "25000 100000");
    assert_eq!(quota(2), "150000 100000");
}

/// Goal: `down` removes namespaces, cgroups, mounts, files, the index and
/// every process, and a second `down` finds nothing to do.
#[test]
fn down_leaves_no_trace() {
    if !lab::require_root_or_skip() {
        return;
    }
    let name = lab_name();
    let lab = Lab::create_network(&network_only(&name, 3)).expect("lab is made");
    let mut sleeper = lab
        .command(3, "sleep")
        .expect("command")
        .arg("1000")
        .spawn()
        .expect("spawns");
    let orphan = lab
        .run(1, &["sh", "-c", "sleep 1000 >/dev/null 2>&1 & echo $!"])
        .expect("runs");
    let orphan: u32 = stdout_of(&orphan).parse().expect("a pid");
    let cgroups: Vec<PathBuf> = (1..=3).flat_map(|k| lab.cgroup_dirs(k)).collect();
    assert!(cgroups.iter().all(|d| d.exists()));
    assert!(lab::list().contains(&name));

    lab.down().expect("down");
    assert_eq!(sleeper.wait().expect("waits").signal(), Some(9));
    assert_no_trace(&name, &cgroups, &[sleeper.id(), orphan]);
    lab::down_by_name(&name).expect("a second down is a no-op");
}

/// Goal: a test that panics half-way through leaves nothing behind. Method:
/// make a lab and a process in it, panic, and let unwinding drop the lab.
#[test]
fn panic_half_way_still_cleans() {
    if !lab::require_root_or_skip() {
        return;
    }
    let name = lab_name();
    let caught = std::panic::catch_unwind(|| {
        let lab = Lab::create_network(&network_only(&name, 2)).expect("lab is made");
        let child = lab
            .command(2, "sleep")
            .expect("command")
            .arg("1000")
            .spawn()
            .expect("spawns");
        let cgroups = lab.cgroup_dirs(1);
        std::panic::panic_any((child, cgroups));
    });
    let payload = caught.expect_err("the closure panics");
    let (mut child, cgroups) = *payload
        .downcast::<(std::process::Child, Vec<PathBuf>)>()
        .expect("our payload");
    // The sleeper is our child: reap it so it is not a zombie.
    assert_eq!(child.wait().expect("waits").signal(), Some(9));
    assert_no_trace(&name, &cgroups, &[child.id()]);
}

/// Goal: `down` removes a lab left half-made with no record (as after a
/// crash of `krg lab up`). Method: make its pieces by hand: a node
/// namespace with a process in it, a persistent UTS namespace file, a cgroup
/// with a process, an index reservation.
#[test]
fn half_made_lab_without_record_is_removed() {
    if !lab::require_root_or_skip() {
        return;
    }
    let name = lab_name();
    let ns = format!("krg-{name}-n1");
    host(&["ip", "netns", "add", &ns]);
    let node_dir = Path::new("/run/krg-lab").join(&name).join("n1");
    fs::create_dir_all(&node_dir).expect("mkdir");
    let uts = node_dir.join("uts");
    fs::write(&uts, "").expect("touch");
    host(&[
        "unshare",
        &format!("--uts={}", uts.display()),
        "hostname",
        "krg-lab-1",
    ]);
    fs::create_dir_all("/run/krg-lab/.index").expect("mkdir");
    fs::write("/run/krg-lab/.index/255", &name).ok();
    let cgroup = PathBuf::from(format!("/sys/fs/cgroup/pids/krg-lab/{name}/n1"));
    let cgroup = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        PathBuf::from(format!("/sys/fs/cgroup/krg-lab/{name}/n1"))
    } else {
        cgroup
    };
    fs::create_dir_all(cgroup.join("job1")).expect("mkdir cgroup");
    let in_ns = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "sh",
            "-c",
            "sleep 1000 >/dev/null 2>&1 & echo $!",
        ])
        .output()
        .expect("ip netns exec");
    let in_ns: u32 = stdout_of(&in_ns).parse().expect("a pid");
    let in_cgroup = Command::new("sh")
        .args([
            "-c",
            &format!(
                "echo 0 > {}/cgroup.procs; exec sleep 1000",
                cgroup.join("job1").display()
            ),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawns");
    let in_cgroup_pid = in_cgroup.id();
    lab::wait_until(WAIT, "the sleeper in the cgroup", || {
        let procs = fs::read_to_string(cgroup.join("job1/cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l.trim() == in_cgroup_pid.to_string()) {
            Ok(())
        } else {
            Err(format!("cgroup.procs: {procs:?}"))
        }
    })
    .expect("sleeper moved");
    assert!(lab::list().contains(&name));
    assert!(
        Lab::open(&name).is_err(),
        "a lab without a record cannot be opened"
    );

    lab::down_by_name(&name).expect("down");
    let mut in_cgroup = in_cgroup;
    assert_eq!(in_cgroup.wait().expect("waits").signal(), Some(9));
    let top = cgroup.parent().expect("lab cgroup").to_path_buf();
    assert_no_trace(&name, &[cgroup, top], &[in_ns, in_cgroup_pid]);
}

/// Goal: bad input gets one clear sentence (no root needed).
#[test]
fn bad_options_are_refused() {
    let too_many = Lab::up(LabOptions::new("x", 65)).expect_err("65 nodes");
    assert_eq!(
        too_many.to_string(),
        "krg lab: cannot make a lab of 65 nodes (the limit is 1 to 64)"
    );
    assert!(Lab::up(LabOptions::new("x", 0)).is_err());
    let bad_name = Lab::up(LabOptions::new("Bad-Name", 2)).expect_err("bad name");
    assert!(
        bad_name.to_string().contains("invalid lab name"),
        "{bad_name}"
    );
    let limits = LabOptions {
        cpu_limits: vec![0.5, 0.5],
        ..LabOptions::new("x", 3)
    };
    assert!(Lab::up(limits)
        .expect_err("2 limits for 3 nodes")
        .to_string()
        .contains("2 CPU limits given for 3 nodes"));
    let zero = LabOptions {
        cpu_limits: vec![0.0],
        ..LabOptions::new("x", 3)
    };
    assert!(Lab::up(zero).is_err());
    let missing = LabOptions {
        krgd: Some("/nonexistent/krgd".into()),
        ..LabOptions::new("x", 1)
    };
    assert!(Lab::up(missing)
        .expect_err("no krgd")
        .to_string()
        .contains("cannot find krgd"));
    assert!(Lab::open("nosuchlab0")
        .expect_err("no lab")
        .to_string()
        .contains("there is no lab named nosuchlab0"));
}

/// A fake `krgd`: records its arguments, host name and pid in its state
/// directory, says it is ready, then sleeps.
const FAKE_KRGD: &str = r#"#!/bin/bash
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) state=$2; shift 2;;
    --socket) socket=$2; shift 2;;
    --listen) listen=$2; shift 2;;
    --join) join=$2; shift 2;;
    --token) token=$2; shift 2;;
    --load-scope|--view-dir|--image-store) shift 2;;
    *) echo "fake krgd: unknown argument $1" >&2; exit 2;;
  esac
done
mkdir -p "$state"
echo "$listen $join $token" >> "$state/args"
hostname > "$state/hostname"
echo $$ > "$state/pid"
echo "krgd: ready" >&2
exec sleep 100000
"#;

/// A fake `krg`: answers `cluster status`, `cluster token` and
/// `nodes --json` from the fake daemons' pid files in the lab's directory.
const FAKE_KRG: &str = r#"#!/bin/bash
node_dir=$(dirname "$KRG_SOCKET")
lab_dir=$(dirname "$node_dir")
alive() { [ -f "$1/state/pid" ] && kill -0 "$(cat "$1/state/pid")" 2>/dev/null; }
case "$1 $2" in
  "cluster status")
    alive "$node_dir" || { echo "krg: cannot connect to $KRG_SOCKET" >&2; exit 1; }
    echo "up on 1 nodes (1 up)";;
  "cluster token")
    alive "$node_dir" || exit 1
    echo "tok$RANDOM$RANDOM";;
  "nodes --json")
    alive "$node_dir" || exit 1
    sep=""; printf '['
    for d in "$lab_dir"/n*; do
      k=${d##*/n}
      [ -f "$d/state/args" ] || continue
      if alive "$d"; then state=up; else state=down; fi
      printf '%s{"id":%s,"addr":"%s","state":"%s","cpus":1}' "$sep" "$k" "$(head -n1 "$d/state/args" | cut -d' ' -f1)" "$state"
      sep=","
    done
    echo ']';;
  *) echo "fake krg: $*" >&2; exit 2;;
esac
"#;

/// The fake binaries' directory, removed when dropped (also on panic).
fn fake_binaries() -> Scratch {
    let dir = Scratch::new("lab-fake", 0o755);
    for (name, text) in [("krgd", FAKE_KRGD), ("krg", FAKE_KRG)] {
        let path = dir.join(name);
        fs::write(&path, text).expect("writes");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    dir
}

fn ns_inode(path: &Path) -> u64 {
    fs::metadata(path).expect("namespace file").ino()
}

/// Goal: `up` starts node 1, gets a token per other node, starts them with
/// `--join`, waits for all up; `kill` and `start` crash and revive a node;
/// each daemon runs inside its node (namespaces, cgroup, own session).
/// Method: the fake `krgd`/`krg` above.
#[test]
fn daemons_start_join_die_and_restart() {
    if !lab::require_root_or_skip() {
        return;
    }
    let fakes = fake_binaries();
    let name = lab_name();
    let options = LabOptions {
        krgd: Some(fakes.join("krgd")),
        krg: Some(fakes.join("krg")),
        timeout: WAIT,
        ..LabOptions::new(&name, 3)
    };
    let lab = Lab::up(options).expect("lab is up");
    let nodes = lab.nodes_json(1).expect("nodes");
    assert_eq!(nodes.as_array().map(Vec::len), Some(3), "{nodes}");

    let join = format!("{}:7470", lab.addr(1).expect("node 1"));
    let args1 = fs::read_to_string(lab.state_dir(1).join("args")).expect("node 1 args");
    assert_eq!(args1.trim(), join, "node 1 starts without --join");
    let args2 = fs::read_to_string(lab.state_dir(2).join("args")).expect("node 2 args");
    let args3 = fs::read_to_string(lab.state_dir(3).join("args")).expect("node 3 args");
    let token2 = args2
        .split_whitespace()
        .nth(2)
        .expect("a token")
        .to_string();
    let token3 = args3
        .split_whitespace()
        .nth(2)
        .expect("a token")
        .to_string();
    assert_eq!(
        args2.split_whitespace().nth(1),
        Some(join.as_str()),
        "node 2 joins node 1: {args2}"
    );
    assert_ne!(token2, token3, "each joining node needs its own token");
    assert_eq!(
        fs::read_to_string(lab.state_dir(3).join("hostname"))
            .expect("hostname")
            .trim(),
        "krg-lab-3"
    );

    let pid2 = lab.daemon_pid(2).expect("node 2's daemon is alive");
    let proc2 = PathBuf::from(format!("/proc/{pid2}"));
    assert_eq!(
        ns_inode(&proc2.join("ns/net")),
        ns_inode(&Path::new("/run/netns").join(lab.netns(2)))
    );
    let cgroups = fs::read_to_string(proc2.join("cgroup")).expect("cgroup");
    assert!(cgroups.contains(&format!("krg-lab/{name}/n2")), "{cgroups}");
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid2 as i32))).expect("getsid");
    assert_eq!(
        sid.as_raw() as u32,
        pid2,
        "the daemon leads its own session"
    );

    eprintln!("--- a command on node 2 sees node 2's own directory, from the caller's");
    let local = lab.local_dir().join("only-on-2");
    let local = local.to_str().expect("utf-8 path");
    let write = format!("echo two > {local}");
    stdout_of(&lab.run(2, &["sh", "-c", &write]).expect("runs on node 2"));
    assert_eq!(
        stdout_of(&lab.run(2, &["cat", local]).expect("runs on node 2")),
        "two"
    );
    assert!(!Path::new(local).exists(), "the host does not see {local}");
    let on_1 = lab.run(1, &["cat", local]).expect("runs on node 1");
    assert!(!on_1.status.success(), "node 1 does not see {local}");
    let cwd = std::env::current_dir().expect("cwd");
    assert_eq!(
        stdout_of(&lab.run(2, &["pwd"]).expect("runs on node 2")),
        cwd.to_str().expect("utf-8 cwd")
    );
    let mut pwd = lab.command(2, "pwd").expect("a command on node 2");
    pwd.current_dir("/tmp");
    assert_eq!(
        stdout_of(&pwd.output().expect("runs on node 2")),
        "/tmp",
        "the directory the command was given, not the caller's"
    );

    eprintln!("--- kill node 2");
    lab.kill(2).expect("kill");
    assert!(lab.daemon_pid(2).is_none());
    assert!(!pid_alive(pid2));
    lab::wait_until(WAIT, "node 2 down", || {
        let nodes = lab.nodes_json(1).map_err(|e| e.to_string())?;
        if nodes[1]["state"] == "down" {
            Ok(())
        } else {
            Err(format!("nodes: {nodes}"))
        }
    })
    .expect("node 2 down");
    let status = lab.status().expect("status");
    assert!(!status.nodes[1].alive && status.nodes[0].alive && status.nodes[2].alive);
    let down = lab.run(2, &["cat", local]).expect("still runs on node 2");
    assert!(!down.status.success(), "{local} went with node 2's daemon");

    eprintln!("--- start node 2");
    let restarted = lab.start(2).expect("start");
    assert_ne!(restarted, pid2);
    let args2 = fs::read_to_string(lab.state_dir(2).join("args")).expect("node 2 args");
    assert_eq!(
        args2.lines().last().map(str::trim),
        Some(format!("{}:7470", lab.addr(2).expect("n2")).as_str())
    );
    assert!(lab
        .start(2)
        .expect_err("already running")
        .to_string()
        .contains("already running"));
    let log = fs::read_to_string(lab.log(2)).expect("log");
    assert_eq!(log.matches("krgd: ready").count(), 2, "{log}");

    let opened = Lab::open(&name).expect("open");
    assert_eq!(opened.daemon_pid(2), Some(restarted));
    drop(opened);
    assert!(
        lab.daemon_pid(1).is_some(),
        "dropping an opened lab must not remove it"
    );

    let pids: Vec<u32> = (1..=3).filter_map(|k| lab.daemon_pid(k)).collect();
    let cgroups: Vec<PathBuf> = (1..=3).flat_map(|k| lab.cgroup_dirs(k)).collect();
    drop(lab);
    assert_no_trace(&name, &cgroups, &pids);
    drop(fakes);
}

/// Goal: an `up` whose daemon dies fails quickly, says why, and leaves
/// nothing behind.
#[test]
fn failed_up_cleans_up() {
    if !lab::require_root_or_skip() {
        return;
    }
    let fakes = fake_binaries();
    let name = lab_name();
    let options = LabOptions {
        krgd: Some("/bin/false".into()),
        krg: Some(fakes.join("krg")),
        timeout: WAIT,
        ..LabOptions::new(&name, 2)
    };
    let started = std::time::Instant::now();
    let error = Lab::up(options).expect_err("krgd exits at once");
    assert!(
        started.elapsed() < WAIT,
        "the failure should be noticed before the timeout"
    );
    assert!(
        format!("{error:#}").contains("krgd on node 1 exited"),
        "{error:#}"
    );
    assert_no_trace(&name, &[], &[]);
    drop(fakes);
}

/// The state node `from` reports for the node listening on node `k`'s
/// address.
fn state_of(lab: &Lab, from: u32, k: u32) -> Result<String, String> {
    let nodes = lab.nodes_json(from).map_err(|e| format!("{e:#}"))?;
    let addr = lab.listen_addr(k).map_err(|e| e.to_string())?.to_string();
    nodes
        .as_array()
        .and_then(|list| list.iter().find(|n| n["addr"] == addr.as_str()))
        .and_then(|n| n["state"].as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("no node with address {addr} in {nodes}"))
}

fn wait_state(lab: &Lab, from: u32, k: u32, wanted: &str, timeout: Duration) {
    lab::wait_until(
        timeout,
        &format!("node {k} {wanted} as seen by node {from}"),
        || {
            let state = state_of(lab, from, k)?;
            if state == wanted {
                Ok(())
            } else {
                Err(format!("state {state}"))
            }
        },
    )
    .expect("state reached");
}

/// Goal: the harness drives the real `krgd`: `up` forms a 3-node cluster,
/// a killed node is seen down and comes back with `start`, a cut node is
/// seen down and comes back with `heal`. (Named `lab_` so that nextest runs
/// it alone, see .config/nextest.toml.)
#[test]
fn lab_real_daemons_kill_start_cut_heal() {
    if !lab::require_root_or_skip() {
        return;
    }
    let options = LabOptions {
        krgd: Some(env!("CARGO_BIN_EXE_krgd").into()),
        krg: Some(env!("CARGO_BIN_EXE_krg").into()),
        timeout: Duration::from_secs(30),
        ..LabOptions::new(lab_name(), 3)
    };
    let lab = Lab::up(options).expect("lab is up");
    let status = stdout_of(&lab.run(2, &["krg", "cluster", "status"]).expect("runs"));
    assert!(
        status.starts_with("up on 3 nodes (3 up)"),
        "cluster status on node 2: {status}"
    );

    eprintln!("--- kill node 3");
    lab.kill(3).expect("kill");
    wait_state(&lab, 1, 3, "down", Duration::from_secs(20));
    eprintln!("--- start node 3");
    lab.start(3).expect("start");
    wait_state(&lab, 1, 3, "up", Duration::from_secs(30));

    eprintln!("--- cut node 2");
    lab.cut(2).expect("cut");
    wait_state(&lab, 1, 2, "down", Duration::from_secs(20));
    eprintln!("--- heal node 2");
    lab.heal(2).expect("heal");
    wait_state(&lab, 1, 2, "up", Duration::from_secs(30));
}
