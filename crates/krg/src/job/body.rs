//! The execution side of a job: starts `krg-init` in the job's cgroup with
//! pipes or a pty, pumps the streams, delivers signals, and reports how the
//! job ended.

use super::caps::{Cap, CapChange, CapError, Caps};
use super::cgroup::JobCgroup;
use super::reap::{self, WaitStatus};
use super::spec::LaunchSpec;
use super::status::StatusLine;
use super::stdio::{make_streams, BodyIo, JobEnds, Pumps, StatusReader};
use super::{JobInfo, JobState};
use crate::node::{now_ms, Node};
use crate::wire::stream::{ExitStatus, FromBody, ToBody};
use crate::wire::{ErrorCode, RemoteError};
use krg_types::{Gpid, NodeId};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Frames buffered on each side of a body link.
pub const LINK_FRAMES_MAX: usize = 16;
/// Time allowed for the streams to drain after the job's init has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The two ends a deputy side uses to talk to a body.
pub struct BodyLink {
    pub tx: mpsc::Sender<ToBody>,
    pub rx: mpsc::Receiver<FromBody>,
}

/// What krgd keeps of a running body: enough to signal it and list it.
pub struct BodyCtl {
    pub gpid: Gpid,
    pub uid: u32,
    pub user: String,
    pub command: String,
    pub started_ms: u64,
    pub init_pid: AtomicI32,
    pub cgroup: JobCgroup,
    pub stopped: AtomicBool,
    /// Set when the body is being checkpointed or moved.
    pub frozen: AtomicBool,
    caps: Mutex<Caps>,
    pub no_migrate: bool,
    /// Where the job's capabilities are published (the view's jobs/<gpid>/caps).
    view: Arc<crate::view::ViewCache>,
    /// What it was started with (kept for its images and restarts).
    pub spec: LaunchSpec,
    /// When it arrived on this node (started, moved or restored here).
    pub arrived_ms: u64,
    /// Checkpoint and migration requests, served by its supervisor.
    pub cmd: mpsc::Sender<super::migrate::BodyCmd>,
    /// How CRIU knows the job's ends of its streams.
    pub keys: Mutex<super::stdio::StreamKeys>,
    /// krg-init has started the command (before that, CRIU cannot dump it).
    pub started: AtomicBool,
    /// CPU time the job used before it came here (on the nodes it left, or
    /// before the checkpoint it was restarted from): restored processes
    /// start their counters at zero, and `krg ps` must not.
    pub cpu_ns_before: AtomicU64,
}

impl BodyCtl {
    pub fn new(
        node: &Node,
        spec: LaunchSpec,
        cgroup: JobCgroup,
        cmd: mpsc::Sender<super::migrate::BodyCmd>,
        keys: super::stdio::StreamKeys,
    ) -> BodyCtl {
        node.view_cache.set_caps(spec.gpid, Some(spec.caps));
        BodyCtl {
            gpid: spec.gpid,
            uid: spec.uid,
            user: spec.user.clone(),
            command: spec.command_line(),
            started_ms: spec.submitted_ms,
            init_pid: AtomicI32::new(0),
            cgroup,
            stopped: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            caps: Mutex::new(spec.caps),
            no_migrate: spec.no_migrate,
            view: node.view_cache.clone(),
            arrived_ms: now_ms(),
            spec,
            cmd,
            keys: Mutex::new(keys),
            started: AtomicBool::new(false),
            cpu_ns_before: AtomicU64::new(0),
        }
    }

    /// CPU time the job has used in its whole life, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        // What it used before a restore comes from a peer or an image.
        self.cpu_ns_before
            .load(Ordering::SeqCst)
            .saturating_add(self.cgroup.cpu_ns(self.init_pid.load(Ordering::SeqCst)))
    }

    pub fn caps(&self) -> Caps {
        *self.caps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies capability changes (by the job's owner or root).
    pub fn change_caps(&self, changes: &[CapChange], root: bool) -> Result<Caps, CapError> {
        let mut caps = self.caps.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = *caps;
        for ch in changes {
            next.apply(*ch, root)?;
        }
        *caps = next;
        self.view.set_caps(self.gpid, Some(next));
        Ok(next)
    }

    /// Delivers a signal as the job's owner would expect: stop and continue
    /// act on every process of the job (krg-init forwards other signals to
    /// the command's process group; a stop sent that way would be ignored
    /// by a process group without a parent in its session).
    pub fn signal(&self, sig: i32) {
        // From a `krg run` stream, as sent: only a signal number is passed
        // on (kill(2) would refuse the rest, or take 0 as a probe).
        if !(1..=64).contains(&sig) {
            tracing::debug!(gpid = %self.gpid, sig, "not a signal: ignored");
            return;
        }
        let init = self.init_pid.load(Ordering::SeqCst);
        tracing::debug!(gpid = %self.gpid, sig, init, "signal for the job");
        match sig {
            libc::SIGKILL => self.cgroup.kill_all(),
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => {
                self.stopped.store(true, Ordering::SeqCst);
                for pid in self.cgroup.pids() {
                    if pid != init {
                        // SAFETY: kill(2) has no memory-safety preconditions.
                        unsafe { libc::kill(pid, libc::SIGSTOP) };
                    }
                }
            }
            libc::SIGCONT => {
                self.stopped.store(false, Ordering::SeqCst);
                self.cgroup.signal_all(libc::SIGCONT);
            }
            _ if init > 0 => {
                // SAFETY: as above.
                unsafe { libc::kill(init, sig) };
            }
            _ => {}
        }
    }

    pub fn info(&self, node: NodeId) -> JobInfo {
        JobInfo {
            gpid: self.gpid,
            uid: self.uid,
            user: self.user.clone(),
            home: self.gpid.home_node(),
            node: Some(node),
            state: if self.stopped.load(Ordering::SeqCst) {
                JobState::Stopped
            } else {
                JobState::Running
            },
            cpu_ns: self.cpu_ns(),
            rss_bytes: self.cgroup.rss_bytes(),
            started_ms: self.started_ms,
            command: self.command.clone(),
            exit: None,
            from_body: true,
        }
    }
}

/// Starts a body for `spec` and returns the link to it.
pub fn start(node: &Arc<Node>, spec: LaunchSpec) -> BodyLink {
    let (to_tx, to_rx) = mpsc::channel(LINK_FRAMES_MAX);
    let (from_tx, from_rx) = mpsc::channel(LINK_FRAMES_MAX);
    tokio::spawn(run(node.clone(), spec, to_rx, from_tx));
    BodyLink {
        tx: to_tx,
        rx: from_rx,
    }
}

fn failure(node: NodeId, spec: &LaunchSpec, step: &str, errno: i32) -> (RemoteError, i32) {
    let why = std::io::Error::from_raw_os_error(errno).to_string();
    let why = why.split(" (os error").next().unwrap_or(&why).to_string();
    let cmd = spec
        .argv
        .first()
        .map_or_else(String::new, |a| String::from_utf8_lossy(a).into_owned());
    match step {
        "exec" => {
            let code = if errno == libc::ENOENT { 127 } else { 126 };
            (
                RemoteError::new(ErrorCode::NotFound, format!("{cmd}: {why}")),
                code,
            )
        }
        "cwd" => (
            RemoteError::new(
                ErrorCode::NotFound,
                format!(
                    "cannot change to directory {} on node {node}: {why}",
                    String::from_utf8_lossy(&spec.cwd)
                ),
            ),
            1,
        ),
        other => (
            RemoteError::new(
                ErrorCode::Internal,
                format!("cannot start the job on node {node} ({other}): {why}"),
            ),
            1,
        ),
    }
}

fn internal(node: NodeId, what: &str, e: impl std::fmt::Display) -> (RemoteError, i32) {
    (
        RemoteError::new(
            ErrorCode::Internal,
            format!("cannot start the job on node {node}: {what}: {e}"),
        ),
        1,
    )
}

/// The cluster view for this job, unless it asked for its node's own.
pub(crate) fn view_for(node: &Node, spec: &LaunchSpec) -> Option<std::path::PathBuf> {
    let local = spec.local_view || spec.caps.has(Cap::SeeLocalProcStat);
    (!local).then(|| node.view_dir.get().cloned()).flatten()
}

/// krg-init's arguments; its cgroups are joined by the `clone` that
/// starts it (`Spawn::start_isolated`), not named here.
fn init_args(spec: &LaunchSpec, view: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = vec![
        "--uid".into(),
        spec.uid.to_string().into(),
        "--gid".into(),
        spec.gid.to_string().into(),
        "--cwd".into(),
        OsStr::from_bytes(&spec.cwd).to_owned(),
        "--umask".into(),
        format!("{:o}", spec.umask & 0o777).into(),
    ];
    if !spec.groups.is_empty() {
        a.push("--groups".into());
        a.push(
            spec.groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
                .into(),
        );
    }
    for r in &spec.rlimits {
        let v = |x: u64| {
            if x == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                x.to_string()
            }
        };
        a.push("--rlimit".into());
        a.push(format!("{}={}:{}", r.resource, v(r.soft), v(r.hard)).into());
    }
    if let Some(v) = view {
        a.push("--view".into());
        a.push(v.as_os_str().to_owned());
    }
    if spec.tty.is_some() {
        a.push("--pty".into());
    }
    a.push("--".into());
    a.extend(spec.argv.iter().map(|w| OsStr::from_bytes(w).to_owned()));
    a
}

/// Spawns krg-init in a new cgroup; returns its pid too.
async fn launch(
    node: &Arc<Node>,
    spec: &LaunchSpec,
) -> Result<(JobCgroup, BodyIo, StatusReader, i32), (RemoteError, i32)> {
    let me = node.id;
    spec.check()
        .map_err(|e| (RemoteError::new(ErrorCode::BadRequest, e.to_string()), 1))?;
    let t0 = std::time::Instant::now();
    let cgroup = tokio::task::block_in_place(|| JobCgroup::create(&cgroup_name(spec.gpid)))
        .map_err(|e| internal(me, "cannot create its cgroup", e))?;
    tracing::debug!(gpid = %spec.gpid, us = t0.elapsed().as_micros(), "timing: cgroup made");
    match spawn_init(node, spec, &cgroup).await {
        Ok((io, status, pid)) => Ok((cgroup, io, status, pid)),
        Err(e) => {
            tokio::task::block_in_place(|| cgroup.remove());
            Err(e)
        }
    }
}

/// A job's cgroup name on any node (what `home::job_of_pid` parses back).
pub fn cgroup_name(gpid: Gpid) -> String {
    format!("job-{}-{}", gpid.home_node(), gpid.seq())
}

async fn spawn_init(
    node: &Arc<Node>,
    spec: &LaunchSpec,
    cgroup: &JobCgroup,
) -> Result<(BodyIo, StatusReader, i32), (RemoteError, i32)> {
    let me = node.id;
    let (ends, io, status) =
        make_streams(spec.tty).map_err(|e| internal(me, "cannot make its streams", e))?;
    let JobEnds {
        stdin: child_in,
        stdout: child_out,
        stderr: child_err,
        status: status_w,
    } = ends;
    let view = view_for(node, spec);
    let mut env = Env::from_entries(&spec.env);
    env.set("KRG_GPID", spec.gpid.to_string());
    env.set("KRG_NODE", node.id.to_string());
    // The job's krg talks to the krgd of the node it runs on.
    env.set("KRG_SOCKET", node.config.socket.as_os_str().as_bytes());
    // A marker of distant exec, about the process that carried it, never
    // about a new job.
    env.remove("KRG_DISTANT_FORK");
    if let Some(v) = &view {
        env.set("KRG_VIEW", v.as_os_str().as_bytes());
        if let Some(preload) = &node.preload_path {
            // krg-init puts it first in the command's LD_PRELOAD; krg-init
            // itself must not load it.
            env.set("KRG_PRELOAD", preload.as_os_str().as_bytes());
        }
    }
    if let Some(krg) = &node.krg_path {
        env.set("KRG_BIN", krg.as_os_str().as_bytes());
    }
    // Started in its namespaces already: krg-init's inner half (see
    // `Spawn::start_isolated`).
    env.set(krg_types::INIT_INNER_ENV, "1");
    let join: Vec<std::ffi::CString> = cgroup
        .dirs
        .iter()
        .filter_map(|d| std::ffi::CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).ok())
        .collect();
    // The init's fds 0 to 3, in order.
    let job_fds = [
        child_in.as_raw_fd(),
        child_out.as_raw_fd(),
        child_err.as_raw_fd(),
        status_w.as_raw_fd(),
    ];
    let spawn = super::spawn::Spawn {
        program: node.init_path.as_os_str(),
        args: init_args(spec, view.as_deref())
            .iter()
            .map(|a| AsRef::<OsStr>::as_ref(a).as_bytes().to_vec())
            .collect(),
        env: env.into_entries(),
        fds: (0..)
            .zip(job_fds)
            .map(|(theirs, ours)| (ours, theirs))
            .collect(),
    };
    let pid = start_init(node, &spawn, job_fds, &join)
        .map_err(|e| internal(me, "cannot run krg-init", e))?;
    drop((child_in, child_out, child_err, status_w));
    Ok((io, status, pid))
}

/// Hands the job to the krg-init waiting for one, or starts one now
/// (`init_pool`; the next one is made when a job ends, not here, where it
/// would compete for the CPU with the job starting). `job_fds` are the
/// init's fds 0 to 3, as `spawn.fds` places them.
fn start_init(
    node: &Node,
    spawn: &super::spawn::Spawn,
    job_fds: [i32; krg_types::handoff::FDS],
    join: &[std::ffi::CString],
) -> std::io::Result<i32> {
    if let Some(waiting) = node.init_pool.take() {
        let handoff = krg_types::handoff::Handoff {
            args: spawn.args.clone(),
            env: spawn.env.clone(),
        };
        match waiting.hand_over(join, &handoff, job_fds) {
            Ok(pid) => {
                tracing::debug!(pid, "timing: init from the pool");
                return Ok(pid);
            }
            Err(e) => tracing::warn!(
                "a krg-init started ahead did not take its job, starting one now: {e}"
            ),
        }
    }
    tracing::debug!("timing: no init waiting, one started now");
    spawn.start_isolated(join)
}

/// A process environment as `KEY=value` entries, in order, each key once.
struct Env(Vec<Vec<u8>>);

impl Env {
    fn from_entries<E: AsRef<[u8]>>(entries: &[E]) -> Env {
        let mut env = Env(Vec::with_capacity(entries.len() + 8));
        for e in entries.iter().map(AsRef::as_ref) {
            if let Some(pos) = e.iter().position(|b| *b == b'=') {
                env.set(&e[..pos], &e[pos + 1..]);
            }
        }
        env
    }

    fn key(entry: &[u8]) -> &[u8] {
        entry.split(|b| *b == b'=').next().unwrap_or(entry)
    }

    fn set(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let key = key.as_ref();
        let mut entry = key.to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_ref());
        match self.0.iter_mut().find(|e| Env::key(e) == key) {
            Some(old) => *old = entry,
            None => self.0.push(entry),
        }
    }

    fn remove(&mut self, key: &str) {
        self.0.retain(|e| Env::key(e) != key.as_bytes());
    }

    fn into_entries(self) -> Vec<Vec<u8>> {
        self.0
    }
}

async fn run(
    node: Arc<Node>,
    spec: LaunchSpec,
    rx: mpsc::Receiver<ToBody>,
    tx: mpsc::Sender<FromBody>,
) {
    let gpid = spec.gpid;
    let t0 = std::time::Instant::now();
    let (cgroup, io, status, init_pid) = match launch(&node, &spec).await {
        Ok(l) => l,
        Err((error, exit_code)) => {
            node.metrics
                .failures
                .get_or_create(&crate::metrics::Metrics::label(&[("kind", "launch")]))
                .inc();
            let _ = tx.send(FromBody::Failed { error, exit_code }).await;
            return;
        }
    };
    tracing::debug!(gpid = %gpid, us = t0.elapsed().as_micros(), "timing: init pid known");
    let (cmd_tx, cmd_rx) = mpsc::channel(4);
    let ctl = Arc::new(BodyCtl::new(&node, spec, cgroup, cmd_tx, io.keys));
    ctl.init_pid.store(init_pid, Ordering::SeqCst);
    node.metrics.launches.inc();
    node.jobs.bodies_insert(ctl.clone());
    tracing::debug!(gpid = %gpid, pid = init_pid, "job started");
    tracing::debug!(gpid = %gpid, us = t0.elapsed().as_micros(), "timing: started");
    let _ = tx
        .send(FromBody::Started {
            gpid,
            node: node.id,
        })
        .await;
    let pumps = Pumps::start(io, ctl.clone(), rx, tx.clone());
    supervise(node, ctl, pumps, status, tx, cmd_rx).await;
}

/// A body's life on this node: status lines, checkpoint and migration
/// requests, and its end — reported, or handed to the node it moved to.
pub async fn supervise(
    node: Arc<Node>,
    ctl: Arc<BodyCtl>,
    mut pumps: Pumps,
    mut status: StatusReader,
    tx: mpsc::Sender<FromBody>,
    mut cmd_rx: mpsc::Receiver<super::migrate::BodyCmd>,
) {
    let gpid = ctl.gpid;
    let mut reported: Option<ExitStatus> = None;
    loop {
        tokio::select! {
            lines = status.next() => match lines {
                Ok(Some(lines)) => {
                    for line in lines {
                        match line {
                            StatusLine::Failed { step, errno } => {
                                let (error, exit_code) = failure(node.id, &ctl.spec, &step, errno);
                                let _ = tx.send(FromBody::Failed { error, exit_code }).await;
                            }
                            StatusLine::Exit(c) => reported = Some(ExitStatus::Code(c)),
                            StatusLine::Signal { signal, core } => {
                                reported = Some(ExitStatus::Signal { signal, core })
                            }
                            StatusLine::Started(_) => ctl.started.store(true, Ordering::SeqCst),
                            StatusLine::Pid(_) => {}
                        }
                    }
                }
                Ok(None) | Err(_) => break,
            },
            Some(cmd) = cmd_rx.recv() => {
                match super::migrate::serve(&node, &ctl, &mut pumps, &mut status, &tx, cmd).await {
                    super::migrate::After::Stay => {}
                    super::migrate::After::Gone => {
                        // Moved away or checkpointed and killed, and
                        // forgotten already: no exit to report.
                        return;
                    }
                    super::migrate::After::Replaced => {
                        // Restored here as a new body (same gpid, same cgroup).
                        pumps.abort();
                        return;
                    }
                }
            }
        }
    }
    let init_pid = ctl.init_pid.load(Ordering::SeqCst);
    let waited = reap::wait(init_pid).await.ok().flatten();
    let exit = reported.unwrap_or(match waited {
        Some(WaitStatus::Exited(c)) => ExitStatus::Code(c),
        Some(WaitStatus::Signaled { signal, core }) => ExitStatus::Signal { signal, core },
        None => ExitStatus::Signal {
            signal: libc::SIGKILL,
            core: false,
        },
    });
    tracing::debug!(gpid = %gpid, "timing: reaped");
    // Whatever the job wrote before it ended goes out before its status.
    if !pumps.drain(DRAIN_TIMEOUT).await {
        tracing::warn!(gpid = %gpid, "job streams did not drain after it ended");
    }
    pumps.abort();
    node.jobs.bodies_remove(gpid);
    let _ = tx.send(FromBody::Exited(exit)).await;
    tracing::debug!(gpid = %gpid, %exit, "job ended");
    forget(&node, &ctl).await;
}

/// This node is done with the body: its cgroup and its record go, in that
/// order, so that a restore of the same job here, refused while the record
/// is, cannot make the cgroup anew only to see it emptied.
pub(super) async fn forget(node: &Arc<Node>, ctl: &Arc<BodyCtl>) {
    node.init_pool.refill();
    let owned = ctl.clone();
    let _ = tokio::task::spawn_blocking(move || owned.cgroup.remove()).await;
    node.jobs.bodies_remove(ctl.gpid);
    node.view_cache.set_caps(ctl.gpid, None);
}

/// Time since the job started, for listings.
pub fn elapsed_since(started_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(started_ms))
}
