//! The lab: a krg cluster on one machine, for tests and demos.
//!
//! Each node is a network namespace (`krg-<lab>-n<K>`, address
//! `10.213.<index>.K/24` on `eth0`) with its own UTS namespace (host name
//! `krg-lab-K`), cgroup (`krg-lab/<lab>/n<K>`), state directory, socket and
//! `krgd`. The nodes' veth pairs meet at a bridge in a "switch" namespace
//! (`krg-<lab>-sw`); the host's own interfaces get nothing, so all traffic
//! stays inside the lab.
//!
//! ```text
//!   krg-x-n1 [eth0 10.213.i.1]──veth──┐
//!   krg-x-n2 [eth0 10.213.i.2]──veth──┤ br0 in krg-x-sw
//!   krg-x-n3 [eth0 10.213.i.3]──veth──┘   (cut K = its port down)
//! ```
//!
//! The nodes share this machine's file system, except `<lab>/local`: each
//! node's `krgd` and its jobs see a tmpfs of that node's own there, as a
//! real node has its /tmp or local disk (see [`local_dir`]).
//!
//! Everything made is listed in `/run/krg-lab/<lab>/lab.json`; removal works
//! from that record, and without it from the names alone, so a lab left
//! half-made by a crash is still removed by `krg lab down`.
//!
//! `up` starts node 1 (which creates the cluster), then the others one at a
//! time, each joining node 1 with a token of its own: node K gets node id K.
//!
//! [`Lab`] is the handle tests use: it removes the lab when dropped unless
//! [`Lab::keep`] was called (as the `krg lab` CLI does, see [`cli`]);
//! [`demo`] is `krg lab demo`.

mod cgroup;
pub mod cli;
pub mod demo;
mod enter;
mod local_dir;
pub mod names;
mod net;
mod procs;
mod record;
mod uts;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Display;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;

use self::names::{Names, RUN_DIR};
use self::record::{LabRecord, NodeRecord, RECORD_VERSION};

/// How long `up` waits for the cluster (and `start` for a daemon) unless
/// told otherwise.
pub const DEFAULT_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Lab::run`] lets a command run.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long killing a node's processes may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kernel may take to release an emptied cgroup.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a child of ours may take to exit once killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest CPU limit accepted for a node, in CPUs.
pub const CPU_LIMIT_MAX: f64 = 64.0;
/// The lifetime of the join tokens `up` asks for.
const TOKEN_TTL: &str = "10m";
/// How much of a dead daemon's log an error shows.
const LOG_TAIL_BYTES: u64 = 2_000;
/// A readiness probe (`krg cluster status`) may take this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_FIRST: Duration = Duration::from_millis(50);
const POLL_MAX: Duration = Duration::from_millis(100);
/// What `krgd` prints on stderr once it serves its socket.
const READY_LINE: &str = "krgd: ready";

/// What `up` makes.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// The lab's name: 1 to 12 characters from a-z and 0-9.
    pub name: String,
    /// How many nodes, 1 to 64.
    pub nodes: u32,
    /// Empty, one CPU limit for every node, or one per node (in CPUs, e.g.
    /// 0.25).
    pub cpu_limits: Vec<f64>,
    /// How long `up` waits for the cluster to form, and `start` for a daemon.
    pub timeout: Duration,
    /// Whether to start the daemons (false: only namespaces, links,
    /// addresses and cgroups).
    pub start_daemons: bool,
    /// The `krgd` and `krg` binaries; by default the ones next to this
    /// executable, else the ones on PATH.
    pub krgd: Option<PathBuf>,
    pub krg: Option<PathBuf>,
    /// More arguments for every `krgd`.
    pub krgd_args: Vec<String>,
}

impl LabOptions {
    pub fn new(name: impl Into<String>, nodes: u32) -> LabOptions {
        LabOptions {
            name: name.into(),
            nodes,
            ..LabOptions::default()
        }
    }

    fn validate(&self) -> Result<()> {
        names::validate_name(&self.name)?;
        names::validate_node_count(self.nodes)?;
        let count = self.cpu_limits.len();
        if count > 1 && count != self.nodes as usize {
            bail!(
                "krg lab: {count} CPU limits given for {} nodes (give one for all, or one per node)",
                self.nodes
            );
        }
        for limit in &self.cpu_limits {
            if !(limit.is_finite() && *limit > 0.0 && *limit <= CPU_LIMIT_MAX) {
                bail!("krg lab: CPU limit {limit} is out of range (more than 0, at most {CPU_LIMIT_MAX})");
            }
        }
        if self.timeout.is_zero() {
            bail!("krg lab: the timeout must be more than zero");
        }
        Ok(())
    }

    /// One CPU limit per node, or none.
    fn cpu_limits_per_node(&self) -> Vec<f64> {
        match self.cpu_limits.as_slice() {
            [one] => vec![*one; self.nodes as usize],
            limits => limits.to_vec(),
        }
    }
}

impl Default for LabOptions {
    fn default() -> LabOptions {
        LabOptions {
            name: names::DEFAULT_NAME.to_string(),
            nodes: 3,
            cpu_limits: Vec::new(),
            timeout: DEFAULT_UP_TIMEOUT,
            start_daemons: true,
            krgd: None,
            krg: None,
            krgd_args: Vec::new(),
        }
    }
}

/// A lab on this machine. Dropping it removes the lab, unless
/// [`Lab::keep`] was called or it came from [`Lab::open`].
#[derive(Debug)]
pub struct Lab {
    names: Names,
    record: Mutex<LabRecord>,
    /// The daemons this process started, reaped when they die.
    children: Mutex<BTreeMap<u32, Child>>,
    keep: AtomicBool,
    removed: AtomicBool,
}

/// What `status` shows.
#[derive(Clone, Debug, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub index: u8,
    pub subnet: String,
    pub dir: PathBuf,
    /// Where each node has a directory of its own.
    pub local_dir: PathBuf,
    pub nodes: Vec<NodeStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub k: u32,
    pub addr: Ipv4Addr,
    pub netns: String,
    pub hostname: String,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub pid: Option<u32>,
    pub alive: bool,
    pub cut: bool,
}

impl Lab {
    /// Make a lab and start its cluster: node 1 first, then the others
    /// joining it with one token each; return once `krg nodes` on node 1
    /// lists every node `up` (or fail after `options.timeout`, removing
    /// everything made).
    pub fn up(options: LabOptions) -> Result<Lab> {
        let lab = Lab::create_network(&options)?;
        if options.start_daemons {
            lab.start_cluster(options.timeout)?;
        }
        Ok(lab)
    }

    /// Make the lab's namespaces, links, addresses, UTS namespaces and
    /// cgroups, without starting any daemon. On error, whatever was made is
    /// removed.
    pub fn create_network(options: &LabOptions) -> Result<Lab> {
        options.validate()?;
        let names = Names::new(&options.name)?;
        let krgd = options
            .krgd
            .clone()
            .unwrap_or_else(|| default_binary("krgd"));
        let krg = options.krg.clone().unwrap_or_else(|| default_binary("krg"));
        if options.start_daemons {
            check_binary(&krgd, "krgd")?;
            check_binary(&krg, "krg")?;
        }
        record::create_dir_all_racy(Path::new(RUN_DIR))?;
        match fs::create_dir(names.dir()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => bail!(
                "krg lab: a lab named {0} already exists (remove it with `krg lab down --name {0}`)",
                options.name
            ),
            Err(e) => return Err(e).with_context(|| format!("krg lab: cannot create {}", names.dir().display())),
        }
        // From here on, dropping `lab` removes whatever has been made.
        let lab = Lab {
            names: names.clone(),
            record: Mutex::new(LabRecord {
                version: RECORD_VERSION,
                name: options.name.clone(),
                index: 0,
                nodes: options.nodes,
                krgd: absolute(&krgd),
                krg: absolute(&krg),
                krgd_args: options.krgd_args.clone(),
                cpu_limits: options.cpu_limits_per_node(),
                cgroup_dirs: Vec::new(),
                wait_timeout_ms: u64::try_from(options.timeout.as_millis()).unwrap_or(u64::MAX),
                node: (1..=options.nodes)
                    .map(|k| NodeRecord {
                        k,
                        ..NodeRecord::default()
                    })
                    .collect(),
                created_unix_s: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            }),
            children: Mutex::new(BTreeMap::new()),
            keep: AtomicBool::new(false),
            removed: AtomicBool::new(false),
        };
        lab.build(options)?;
        Ok(lab)
    }

    fn build(&self, options: &LabOptions) -> Result<()> {
        let index = record::allocate_index(&options.name)?;
        let cgroup_dirs = cgroup::lab_dirs(&options.name)?;
        let record = {
            let mut record = self.cached_mut();
            record.index = index;
            record.cgroup_dirs = cgroup_dirs.clone();
            record.clone()
        };
        // Written before anything else is made, so removal knows where to look.
        record::write(&self.names, &record)?;
        self.step(&format!(
            "index {index}, subnet {}, {} nodes",
            names::subnet(index),
            options.nodes
        ));
        local_dir::prepare(&self.names.dir(), &self.names.local_dir())?;
        // Like /run/krg on a real node: every user reaches the socket (each
        // request is authorised by krgd); state and images stay private.
        make_dir(&self.names.images_dir(), 0o711)?;
        for k in 1..=options.nodes {
            make_dir(&self.names.node_dir(k), 0o755)?;
            make_private_dir(&self.names.state_dir(k))?;
        }
        cgroup::create_lab(&cgroup_dirs)?;
        net::create_switch(&self.names)?;
        for k in 1..=options.nodes {
            net::create_node(&self.names, index, k)?;
            uts::create(&self.names.uts_file(k), &names::hostname(k))?;
            cgroup::create_node(&cgroup_dirs, k, record.cpu_limit(k))?;
        }
        self.step("network ready");
        Ok(())
    }

    /// Start node 1, wait until it answers, then start the others with a
    /// token each and wait until node 1 sees them all up.
    fn start_cluster(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let record = self.cached();
        self.step("starting krgd on node 1");
        self.spawn_daemon(1, None)?;
        self.wait_answering(1, deadline)?;
        let mut tokens = Vec::new();
        for k in 2..=record.nodes {
            tokens.push((
                k,
                self.token(1)
                    .with_context(|| format!("krg lab: cannot get a join token for node {k}"))?,
            ));
        }
        let join = names::node_listen_addr(record.index, 1);
        // One join at a time, so that node K gets node id K: a joining krgd
        // says it is ready only once it has joined (a few ms each).
        for (k, token) in tokens {
            self.step(&format!("starting krgd on node {k}, joining {join}"));
            let offset = self.spawn_daemon(k, Some((join, token)))?;
            self.wait_ready(k, offset, deadline)?;
        }
        // Each node answers on its own socket (it knows a leader), and node
        // 1 sees them all up.
        for k in 2..=record.nodes {
            self.wait_answering(k, deadline)?;
        }
        self.wait_cluster_up(1, record.nodes, deadline)
    }

    /// Wait until `krg cluster status` succeeds through node K's socket;
    /// fail early if its daemon dies.
    fn wait_answering(&self, k: u32, deadline: Instant) -> Result<()> {
        let krg = self.cached().krg;
        let args = [krg.as_os_str(), "cluster".as_ref(), "status".as_ref()];
        poll(
            deadline,
            &format!("node {k} to answer `krg cluster status`"),
            || {
                if let Some(dead) = self.dead_daemon(&[k]) {
                    return Check::Fatal(dead);
                }
                match self.run_timeout(k, &args, PROBE_TIMEOUT) {
                    Ok(out) if out.status.success() => Check::Done(()),
                    Ok(out) => Check::NotYet(describe_failure(&out)),
                    Err(e) => Check::NotYet(e.to_string()),
                }
            },
        )
    }

    /// A single-use join token from node `k`.
    fn token(&self, k: u32) -> Result<String> {
        let krg = self.cached().krg;
        let args = [
            krg.as_os_str(),
            "cluster".as_ref(),
            "token".as_ref(),
            "--ttl".as_ref(),
            TOKEN_TTL.as_ref(),
        ];
        let out = self.run_timeout(k, &args, PROBE_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "krg lab: `krg cluster token` on node {k} failed: {}",
                describe_failure(&out)
            );
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if token.is_empty() || token.contains(char::is_whitespace) {
            bail!("krg lab: `krg cluster token` on node {k} printed {token:?}, not one token");
        }
        Ok(token)
    }

    /// Wait until `krg nodes --json` on node `k` lists `count` nodes, all
    /// `up`; fail early if one of the lab's daemons dies.
    fn wait_cluster_up(&self, k: u32, count: u32, deadline: Instant) -> Result<()> {
        let started: Vec<u32> = self
            .cached()
            .node
            .iter()
            .filter(|n| n.pid.is_some())
            .map(|n| n.k)
            .collect();
        poll(
            deadline,
            &format!("{count} nodes up (as seen by node {k})"),
            || {
                if let Some(dead) = self.dead_daemon(&started) {
                    return Check::Fatal(dead);
                }
                match self.nodes_json(k) {
                    Ok(nodes) => {
                        let list = nodes.as_array().map(Vec::as_slice).unwrap_or_default();
                        let up = list
                            .iter()
                            .filter(|n| n.get("state").and_then(|s| s.as_str()) == Some("up"))
                            .count();
                        if list.len() == count as usize && up == count as usize {
                            Check::Done(())
                        } else {
                            Check::NotYet(nodes.to_string())
                        }
                    }
                    Err(e) => Check::NotYet(e.to_string()),
                }
            },
        )?;
        self.step(&format!("{count} nodes up"));
        Ok(())
    }

    /// Open an existing lab. The handle does not remove the lab when
    /// dropped; call [`Lab::down`] for that.
    pub fn open(name: &str) -> Result<Lab> {
        let names = Names::new(name)?;
        let record = record::read(&names)?.ok_or_else(|| {
            anyhow!("krg lab: there is no lab named {name} (make one with `krg lab up`)")
        })?;
        Ok(Lab {
            names,
            record: Mutex::new(record),
            children: Mutex::new(BTreeMap::new()),
            keep: AtomicBool::new(true),
            removed: AtomicBool::new(false),
        })
    }

    /// Leave the lab in place when this handle is dropped.
    pub fn keep(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }

    pub fn name(&self) -> &str {
        self.names.name()
    }

    pub fn index(&self) -> u8 {
        self.cached().index
    }

    /// How many nodes the lab has.
    pub fn nodes(&self) -> u32 {
        self.cached().nodes
    }

    /// Node K's address.
    pub fn addr(&self, k: u32) -> Result<Ipv4Addr> {
        self.check_node(k)?;
        Ok(names::node_addr(self.index(), k))
    }

    /// Node K's `krgd` address (`10.213.<index>.K:7470`).
    pub fn listen_addr(&self, k: u32) -> Result<SocketAddrV4> {
        self.check_node(k)?;
        Ok(names::node_listen_addr(self.index(), k))
    }

    pub fn socket(&self, k: u32) -> PathBuf {
        self.names.socket(k)
    }

    pub fn state_dir(&self, k: u32) -> PathBuf {
        self.names.state_dir(k)
    }

    pub fn log(&self, k: u32) -> PathBuf {
        self.names.log(k)
    }

    /// The directory at which each node has files of its own, which no
    /// other node (nor this process) sees.
    pub fn local_dir(&self) -> PathBuf {
        self.names.local_dir()
    }

    /// The image store shared by the lab's nodes.
    pub fn images_dir(&self) -> PathBuf {
        self.names.images_dir()
    }

    /// Node K's network namespace (`ip netns` name).
    pub fn netns(&self, k: u32) -> String {
        self.names.node_netns(k)
    }

    /// Node K's cgroup directories (one per hierarchy).
    pub fn cgroup_dirs(&self, k: u32) -> Vec<PathBuf> {
        cgroup::node_dirs(&self.cached().cgroup_dirs, k)
    }

    /// The `krgd` and `krg` binaries this lab uses.
    pub fn binaries(&self) -> (PathBuf, PathBuf) {
        let record = self.cached();
        (record.krgd, record.krg)
    }

    /// Fail with one sentence unless node K exists.
    pub fn check_node(&self, k: u32) -> Result<()> {
        let nodes = self.nodes();
        if (1..=nodes).contains(&k) {
            Ok(())
        } else {
            Err(record::no_such_node(k, nodes))
        }
    }

    /// A command that runs `program` as if logged in on node K: in its
    /// network and UTS namespaces, its cgroup and, while its daemon runs,
    /// the daemon's mount namespace (the node's local directory), with
    /// `KRG_SOCKET` set to its socket, `KRG_NODE_INDEX=K`, `KRG_LAB` set to
    /// the lab's name, and the directory of the lab's `krg` first on PATH.
    /// Stdio is inherited unless changed.
    pub fn command(&self, k: u32, program: impl AsRef<OsStr>) -> Result<Command> {
        self.check_node(k)?;
        let record = self.cached();
        let mut command = Command::new(program);
        self.node_env(&mut command, k, &record);
        let procs = cgroup::procs_files(&cgroup::node_dirs(&record.cgroup_dirs, k));
        let mut entry = enter::Entry::open(&self.names, k, &procs)?;
        if let Some(daemon) = self.daemon_pid(k) {
            // A daemon that has just died leaves no namespace to enter: the
            // command then sees the host's mounts, as on a node that is down.
            let _ = entry.enter_daemon_mounts(daemon);
        }
        entry.install(&mut command);
        Ok(command)
    }

    fn node_env(&self, command: &mut Command, k: u32, record: &LabRecord) {
        command.env("KRG_SOCKET", self.names.socket(k));
        command.env("KRG_NODE_INDEX", k.to_string());
        command.env("KRG_LAB", self.names.name());
        if let Some(dir) = record.krg.parent() {
            let path = std::env::var_os("PATH").unwrap_or_default();
            let joined = std::env::join_paths(
                std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path)),
            );
            if let Ok(joined) = joined {
                command.env("PATH", joined);
            }
        }
    }

    /// Run `args[0]` with `args[1..]` on node K and capture its output
    /// (stdin is /dev/null; the command is killed after
    /// [`DEFAULT_RUN_TIMEOUT`]).
    pub fn run<S: AsRef<OsStr>>(&self, k: u32, args: &[S]) -> Result<Output> {
        self.run_timeout(k, args, DEFAULT_RUN_TIMEOUT)
    }

    /// [`Lab::run`] with a time limit of your choosing.
    pub fn run_timeout<S: AsRef<OsStr>>(
        &self,
        k: u32,
        args: &[S],
        timeout: Duration,
    ) -> Result<Output> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("krg lab: no command given"))?;
        let mut command = self.command(k, program)?;
        command.args(rest);
        procs::output_with_timeout(command, timeout)
    }

    /// Replace this process with `args` run on node K (see
    /// [`Lab::command`]); stdio, signals and the exit status are the
    /// command's own. Returns only on failure; when the command could not be
    /// executed the error's cause is the `std::io::Error`.
    pub fn exec<S: AsRef<OsStr>>(&self, k: u32, args: &[S]) -> Result<std::convert::Infallible> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("krg lab: no command given"))?;
        let mut command = self.command(k, program)?;
        command.args(rest);
        let error = command.exec();
        Err(anyhow::Error::new(error).context(format!(
            "krg lab: cannot run {} on node {k}",
            program.as_ref().to_string_lossy()
        )))
    }

    /// Run `f` on a thread inside node K's network and UTS namespaces (to
    /// open sockets there, say). A panic in `f` goes on in the caller.
    pub fn in_node<T: Send>(&self, k: u32, f: impl FnOnce() -> T + Send) -> Result<T> {
        self.check_node(k)?;
        enter::in_thread(&self.names, k, f)
    }

    /// `krg nodes --json` on node K, parsed.
    pub fn nodes_json(&self, k: u32) -> Result<serde_json::Value> {
        let krg = self.cached().krg;
        let out = self.run_timeout(
            k,
            &[krg.as_os_str(), "nodes".as_ref(), "--json".as_ref()],
            PROBE_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "krg lab: `krg nodes --json` on node {k} failed: {}",
                describe_failure(&out)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "krg lab: `krg nodes --json` on node {k} printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Node K's daemon pid, if it is alive.
    pub fn daemon_pid(&self, k: u32) -> Option<u32> {
        self.reap_dead_children();
        let record = record::read(&self.names)
            .ok()
            .flatten()
            .unwrap_or_else(|| self.cached());
        let node = record.node(k).ok()?;
        node.pid.filter(|pid| procs::alive(*pid, node.start_time))
    }

    /// Crash node K: kill its daemon and everything running in its cgroup or
    /// namespaces (freeze, SIGKILL, thaw, wait), then remove the cgroups its
    /// daemon made below its own.
    pub fn kill(&self, k: u32) -> Result<()> {
        self.check_node(k)?;
        self.step(&format!("killing node {k}"));
        let record = self.cached();
        let node_dirs = cgroup::node_dirs(&record.cgroup_dirs, k);
        let by_cgroup = cgroup::kill_trees(&node_dirs, KILL_TIMEOUT);
        let namespaces: Vec<_> = [
            names::netns_path(&self.names.node_netns(k)),
            self.names.uts_file(k),
        ]
        .iter()
        .filter_map(|p| procs::ns_id(p))
        .collect();
        let by_namespace = procs::kill_namespaces(&namespaces, KILL_TIMEOUT);
        if let Ok(node) = record::read(&self.names)
            .ok()
            .flatten()
            .unwrap_or(record)
            .node(k)
        {
            if let Some(pid) = node.pid.filter(|pid| procs::alive(*pid, node.start_time)) {
                procs::sigkill(pid);
            }
        }
        if let Some(mut child) = self.children().remove(&k) {
            procs::sigkill(child.id());
            procs::reap(&mut child, REAP_TIMEOUT);
        }
        by_cgroup?;
        by_namespace?;
        for dir in &node_dirs {
            cgroup::remove_tree(dir, false, REMOVE_TIMEOUT)?;
        }
        self.set_pid(k, None)
    }

    /// Bring node K back after [`Lab::kill`]: start its `krgd` on the same
    /// state directory, without `--join`, and wait until it prints that it
    /// is ready.
    pub fn start(&self, k: u32) -> Result<u32> {
        self.check_node(k)?;
        if let Some(pid) = self.daemon_pid(k) {
            bail!("krg lab: node {k} is already running (krgd pid {pid})");
        }
        let record = self.cached();
        let deadline = Instant::now() + Duration::from_millis(record.wait_timeout_ms);
        self.step(&format!("starting krgd on node {k}"));
        let offset = self.spawn_daemon(k, None)?;
        self.wait_ready(k, offset, deadline)?;
        self.daemon_pid(k)
            .ok_or_else(|| anyhow!("krg lab: node {k}'s krgd exited just after starting"))
    }

    /// Wait until node K's krgd prints [`READY_LINE`] in its log after byte
    /// `offset`; fail early if it dies.
    fn wait_ready(&self, k: u32, offset: u64, deadline: Instant) -> Result<()> {
        let log = self.names.log(k);
        poll(
            deadline,
            &format!("node {k}'s krgd to print {READY_LINE:?}"),
            || {
                if let Some(dead) = self.dead_daemon(&[k]) {
                    return Check::Fatal(dead);
                }
                match read_from(&log, offset) {
                    Ok(text) if text.lines().any(|l| l.contains(READY_LINE)) => Check::Done(()),
                    Ok(text) => Check::NotYet(format!("log so far: {:?}", tail(&text))),
                    Err(e) => Check::NotYet(e.to_string()),
                }
            },
        )
    }

    /// Start node K's `krgd` (joining `join` with its token if given) in its
    /// namespaces, cgroup and a session of its own, with stdio on its log.
    /// Returns the log's length before the daemon wrote to it.
    fn spawn_daemon(&self, k: u32, join: Option<(SocketAddrV4, String)>) -> Result<u64> {
        let record = self.cached();
        let node_dirs = cgroup::create_node(&record.cgroup_dirs, k, record.cpu_limit(k))?;
        make_private_dir(&self.names.state_dir(k))?;
        record::remove_file_if_present(&self.names.socket(k))?;
        let log_path = self.names.log(k);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("krg lab: cannot open {}", log_path.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        writeln!(
            log,
            "--- krg lab: starting krgd on node {k} at unix time {now}"
        )
        .with_context(|| format!("krg lab: cannot write {}", log_path.display()))?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut command = Command::new(&record.krgd);
        command
            .arg("--state-dir")
            .arg(self.names.state_dir(k))
            .arg("--socket")
            .arg(self.names.socket(k))
            .arg("--listen")
            .arg(names::node_listen_addr(record.index, k).to_string());
        if let Some((addr, token)) = &join {
            command
                .arg("--join")
                .arg(addr.to_string())
                .arg("--token")
                .arg(token);
        }
        // Lab nodes share this machine: each reports the load of its own
        // cgroup, and serves its cluster view in its own directory.
        let has = |flag: &str| record.krgd_args.iter().any(|a| a == flag);
        if !has("--load-scope") {
            command.args(["--load-scope", "cgroup"]);
        }
        if !has("--view-dir") {
            command
                .arg("--view-dir")
                .arg(self.names.node_dir(k).join("view"));
        }
        // The lab's nodes share this machine's file system: one image
        // store for all, as NFS would be on real machines.
        if !has("--image-store") {
            command.arg("--image-store").arg(self.names.images_dir());
        }
        command.args(&record.krgd_args);
        let log_err = log
            .try_clone()
            .with_context(|| format!("krg lab: cannot open {}", log_path.display()))?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        self.node_env(&mut command, k, &record);
        // The log is a file: no colour codes in it.
        command.env("NO_COLOR", "1");
        let procs = cgroup::procs_files(&node_dirs);
        enter::Entry::open(&self.names, k, &procs)?
            .with_setsid()
            .with_own_mounts(local_dir::OwnMounts::new(&self.names.local_dir())?)
            .install(&mut command);
        let child = command.spawn().with_context(|| {
            format!(
                "krg lab: cannot start {} on node {k}",
                record.krgd.display()
            )
        })?;
        let pid = child.id();
        self.children().insert(k, child);
        self.set_pid(k, Some(pid))?;
        Ok(offset)
    }

    fn set_pid(&self, k: u32, pid: Option<u32>) -> Result<()> {
        let start_time = pid.and_then(procs::start_time);
        let (record, ()) = record::update(&self.names, |record| {
            let node = record.node_mut(k)?;
            node.pid = pid;
            node.start_time = start_time;
            Ok(())
        })?;
        *self.cached_mut() = record;
        Ok(())
    }

    /// An error naming the first of nodes `ks` whose daemon has died, with
    /// the end of its log.
    fn dead_daemon(&self, ks: &[u32]) -> Option<anyhow::Error> {
        let mut children = self.children();
        for &k in ks {
            let status = match children.get_mut(&k) {
                Some(child) => match child.try_wait() {
                    Ok(Some(status)) => format!("{status}"),
                    _ => continue,
                },
                None => {
                    let recorded = self.cached().node(k).is_ok_and(|n| n.pid.is_some());
                    if !recorded || self.daemon_pid_cached(k).is_some() {
                        continue;
                    }
                    "it is gone".to_string()
                }
            };
            let log = read_tail(&self.names.log(k)).unwrap_or_default();
            return Some(anyhow!(
                "krg lab: krgd on node {k} exited ({status}); {} ends with:\n{log}",
                self.names.log(k).display()
            ));
        }
        None
    }

    fn daemon_pid_cached(&self, k: u32) -> Option<u32> {
        let record = self.cached();
        let node = record.node(k).ok()?;
        node.pid.filter(|pid| procs::alive(*pid, node.start_time))
    }

    fn reap_dead_children(&self) {
        self.children()
            .retain(|_, child| !matches!(child.try_wait(), Ok(Some(_))));
    }

    /// Cut node K off the network (its switch port down).
    pub fn cut(&self, k: u32) -> Result<()> {
        self.check_node(k)?;
        self.step(&format!("cutting node {k}"));
        net::set_link(&self.names, self.index(), k, false)
    }

    /// Reconnect node K (its switch port up).
    pub fn heal(&self, k: u32) -> Result<()> {
        self.check_node(k)?;
        self.step(&format!("healing node {k}"));
        net::set_link(&self.names, self.index(), k, true)
    }

    /// Whether node K is cut off.
    pub fn is_cut(&self, k: u32) -> Result<bool> {
        self.check_node(k)?;
        net::is_cut(&self.names, self.index(), k)
    }

    /// The lab's nodes, addresses, daemons and links.
    pub fn status(&self) -> Result<LabStatus> {
        self.reap_dead_children();
        let record = record::read(&self.names)?.unwrap_or_else(|| self.cached());
        let nodes = record
            .node
            .iter()
            .map(|node| {
                let k = node.k;
                Ok(NodeStatus {
                    k,
                    addr: names::node_addr(record.index, k),
                    netns: self.names.node_netns(k),
                    hostname: names::hostname(k),
                    socket: self.names.socket(k),
                    state_dir: self.names.state_dir(k),
                    log: self.names.log(k),
                    pid: node.pid,
                    alive: node
                        .pid
                        .is_some_and(|pid| procs::alive(pid, node.start_time)),
                    cut: net::is_cut(&self.names, record.index, k)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LabStatus {
            name: record.name.clone(),
            index: record.index,
            subnet: names::subnet(record.index),
            dir: self.names.dir(),
            local_dir: self.names.local_dir(),
            nodes,
        })
    }

    /// Remove the lab: every process, namespace, link, mount, cgroup and
    /// file it made, and its index.
    pub fn down(self) -> Result<()> {
        self.removed.store(true, Ordering::SeqCst);
        self.remove()
    }

    fn remove(&self) -> Result<()> {
        self.step("removing the lab");
        let mut children = std::mem::take(&mut *self.children());
        remove_lab(&self.names, &mut children)
    }

    fn step(&self, what: &str) {
        eprintln!("--- lab {}: {what}", self.names.name());
    }

    fn cached(&self) -> LabRecord {
        self.cached_mut().clone()
    }

    fn cached_mut(&self) -> MutexGuard<'_, LabRecord> {
        self.record
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn children(&self) -> MutexGuard<'_, BTreeMap<u32, Child>> {
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.keep.load(Ordering::SeqCst) || self.removed.swap(true, Ordering::SeqCst) {
            return;
        }
        if std::env::var_os("KRG_LAB_KEEP").is_some_and(|v| v == "1") {
            eprintln!(
                "--- lab {0}: kept because KRG_LAB_KEEP=1 (remove it with `krg lab down --name {0}`)",
                self.names.name()
            );
            return;
        }
        if let Err(e) = self.remove() {
            eprintln!("--- lab {}: removal incomplete: {e:#}", self.names.name());
        }
    }
}

/// Remove the lab `name` from whatever state it is in (made by `up`, half
/// made, half removed, without a record): a no-op when nothing is left.
pub fn down_by_name(name: &str) -> Result<()> {
    let names = Names::new(name)?;
    remove_lab(&names, &mut BTreeMap::new())
}

/// Remove every lab on this machine; returns their names.
pub fn down_all() -> Result<Vec<String>> {
    let found = list();
    let mut errors = Vec::new();
    for name in &found {
        if let Err(e) = down_by_name(name) {
            errors.push(format!("{e:#}"));
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("\n"));
    }
    Ok(found)
}

/// The names of the labs that have anything left on this machine (a
/// directory, an index, a namespace or a cgroup).
pub fn list() -> Vec<String> {
    let mut found: BTreeSet<String> = record::lab_dirs().into_iter().collect();
    found.extend(record::reservations().into_iter().map(|(_, name)| name));
    found.extend(
        net::list_netns()
            .iter()
            .filter_map(|ns| names::lab_of_netns(ns)),
    );
    found.extend(cgroup::lab_names());
    found.retain(|name| names::validate_name(name).is_ok());
    found.into_iter().collect()
}

/// Every removal step runs even when an earlier one fails; the errors are
/// reported together at the end.
fn remove_lab(names: &Names, children: &mut BTreeMap<u32, Child>) -> Result<()> {
    let mut errors: Vec<String> = Vec::new();
    let mut note = |result: Result<()>| {
        if let Err(e) = result {
            errors.push(format!("{e:#}"));
        }
    };
    let record = record::read(names).ok().flatten();
    let mut cgroup_dirs: BTreeSet<PathBuf> = cgroup::candidate_lab_dirs(names.name())
        .into_iter()
        .collect();
    cgroup_dirs.extend(record.iter().flat_map(|r| r.cgroup_dirs.iter().cloned()));
    let cgroup_dirs: Vec<PathBuf> = cgroup_dirs.into_iter().collect();

    // 1. Processes: by cgroup, by namespace, then the recorded daemons.
    note(cgroup::kill_trees(&cgroup_dirs, KILL_TIMEOUT));
    let netns = net::lab_netns(names);
    let mut namespaces: Vec<_> = netns
        .iter()
        .filter_map(|ns| procs::ns_id(&names::netns_path(ns)))
        .collect();
    namespaces.extend(
        node_dirs_present(names)
            .iter()
            .filter_map(|dir| procs::ns_id(&dir.join("uts"))),
    );
    note(procs::kill_namespaces(&namespaces, KILL_TIMEOUT));
    for node in record.iter().flat_map(|r| r.node.iter()) {
        if let Some(pid) = node.pid.filter(|pid| procs::alive(*pid, node.start_time)) {
            procs::sigkill(pid);
        }
    }
    for child in children.values_mut() {
        procs::sigkill(child.id());
        procs::reap(child, REAP_TIMEOUT);
    }
    // 2. Namespaces and mounts.
    for ns in &netns {
        note(net::delete_netns(ns));
    }
    for mount in uts::mounts_below(&names.dir()) {
        note(uts::unmount(&mount));
    }
    // 3. Cgroups, deepest first.
    for dir in &cgroup_dirs {
        note(cgroup::remove_tree(dir, true, REMOVE_TIMEOUT));
        cgroup::remove_labs_dir_if_empty(dir);
    }
    // 4. Files, unless something is still mounted below (removing would
    // then reach into the mounted file system).
    let left = uts::mounts_below(&names.dir());
    if left.is_empty() {
        note(remove_dir_all_if_present(&names.dir()));
    } else {
        note(Err(anyhow!(
            "krg lab: not removing {}: {left:?} are still mounted",
            names.dir().display()
        )));
    }
    note(record::free_indexes(names.name()));
    record::remove_run_dir_if_empty();
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(
            "krg lab: could not remove everything of lab {}:\n{}",
            names.name(),
            errors.join("\n")
        )
    }
}

/// The `n<K>` directories of a lab that exist now.
fn node_dirs_present(names: &Names) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(names.dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.strip_prefix('n')
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path())
        .collect()
}

fn remove_dir_all_if_present(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("krg lab: cannot remove {}", dir.display())),
    }
}

fn make_private_dir(dir: &Path) -> Result<()> {
    make_dir(dir, 0o700)
}

fn make_dir(dir: &Path, mode: u32) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("krg lab: cannot create {}", dir.display()))
}

/// What a poll step saw.
enum Check<T> {
    Done(T),
    /// Not yet; what was seen (shown if the wait times out).
    NotYet(String),
    /// Waiting longer cannot help.
    Fatal(anyhow::Error),
}

/// Call `check` every 50 to 100 ms until it is done, fails for good, or
/// `deadline` passes.
fn poll<T>(deadline: Instant, what: &str, mut check: impl FnMut() -> Check<T>) -> Result<T> {
    let started = Instant::now();
    let mut interval = POLL_FIRST;
    loop {
        match check() {
            Check::Done(value) => return Ok(value),
            Check::Fatal(error) => return Err(error),
            Check::NotYet(seen) => {
                let now = Instant::now();
                if now >= deadline {
                    bail!(
                        "krg lab: timed out after {:.1} s waiting for {what}; last seen: {seen}",
                        started.elapsed().as_secs_f64()
                    );
                }
                thread::sleep(interval.min(deadline - now));
                interval = (interval * 2).min(POLL_MAX);
            }
        }
    }
}

/// Poll `check` (every 50 to 100 ms) until it returns `Ok`, for at most
/// `timeout`. An `Err` means "not yet" and says what was seen; on timeout
/// the error names `what` and the last thing seen.
///
/// ```no_run
/// # use std::time::Duration;
/// # fn f(lab: &krg::lab::Lab) -> anyhow::Result<()> {
/// krg::lab::wait_until(Duration::from_secs(10), "node 2 down", || {
///     let nodes = lab.nodes_json(1)?;
///     let down = nodes[1]["state"] == "down";
///     if down { Ok(()) } else { Err(anyhow::anyhow!("nodes: {nodes}")) }
/// })
/// # }
/// ```
pub fn wait_until<T, E: Display>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T> {
    poll(Instant::now() + timeout, what, || match check() {
        Ok(value) => Check::Done(value),
        Err(seen) => Check::NotYet(seen.to_string()),
    })
}

/// For lab tests: true when this process can make labs (root, with
/// iproute2). Otherwise prints why the test is skipped and returns false, or
/// panics when `KRG_REQUIRE_LAB=1` (CI turns every skip into a failure).
pub fn require_root_or_skip() -> bool {
    let missing = if !nix::unistd::geteuid().is_root() {
        Some("it needs root")
    } else if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        Some("it needs iproute2's `ip`")
    } else {
        None
    };
    let Some(reason) = missing else {
        return true;
    };
    if std::env::var_os("KRG_REQUIRE_LAB").is_some_and(|v| v == "1") {
        panic!("lab test cannot run: {reason} (KRG_REQUIRE_LAB=1 makes this a failure)");
    }
    eprintln!("skipped: lab test: {reason}");
    false
}

/// Where to find `name` (`krgd`, `krg`): next to this executable (or, for a
/// test binary in target/*/deps, one directory up), else on PATH.
pub fn default_binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        let mut candidates = vec![dir.join(name)];
        if dir.file_name() == Some(OsStr::new("deps")) {
            if let Some(up) = dir.parent() {
                candidates.push(up.join(name));
            }
        }
        if let Some(found) = candidates.into_iter().find(|p| p.is_file()) {
            return found;
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn check_binary(path: &Path, name: &str) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        bail!(
            "krg lab: cannot find {name} at {} (build it with `cargo build`, or pass its path)",
            path.display()
        )
    }
}

fn absolute(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// The text of `path` from byte `offset` on.
fn read_from(path: &Path, offset: u64) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(1 << 20)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `LOG_TAIL_BYTES` of a file.
fn read_tail(path: &Path) -> Result<String> {
    let len = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    read_from(path, len.saturating_sub(LOG_TAIL_BYTES))
}

fn tail(text: &str) -> &str {
    let keep = usize::try_from(LOG_TAIL_BYTES).unwrap_or(usize::MAX);
    let mut start = text.len().saturating_sub(keep);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// "exit status: 1: <stderr>" for a failed command.
fn describe_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    format!("{}: {}", out.status, tail(stderr.trim()))
}
