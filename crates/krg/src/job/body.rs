//! The execution side of a job: starts `krg-init` in the job's cgroup with
//! pipes or a pty, pumps the streams, delivers signals, and reports how the
//! job ended.

use super::caps::{Cap, CapChange, CapError, Caps};
use super::cgroup::JobCgroup;
use super::fdio::{pipe, Fd};
use super::reap::{self, WaitStatus};
use super::spec::LaunchSpec;
use super::status::{LineSplitter, StatusLine};
use super::{JobInfo, JobState};
use crate::node::{now_ms, Node};
use crate::wire::stream::{ExitStatus, FromBody, ToBody};
use crate::wire::{ErrorCode, RemoteError};
use krg_types::limits::{STREAM_CHUNK_BYTES_MAX, STREAM_WINDOW_BYTES};
use krg_types::{Gpid, NodeId};
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

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
}

impl BodyCtl {
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
        let init = self.init_pid.load(Ordering::SeqCst);
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
            cpu_ns: self.cgroup.cpu_ns(),
            rss_bytes: self.cgroup.rss_bytes(),
            started_ms: self.started_ms,
            command: self.command.clone(),
            exit: None,
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

struct Launched {
    ctl: Arc<BodyCtl>,
    stdin: Option<Fd>,
    stdout: Fd,
    stderr: Option<Fd>,
    /// The pty master, for window sizes.
    pty: bool,
    status: StatusReader,
}

/// The status pipe and what is left of a partial line.
struct StatusReader {
    fd: Fd,
    splitter: LineSplitter,
}

impl StatusReader {
    /// The next lines; `None` at end of file (the init is gone).
    async fn next(&mut self) -> std::io::Result<Option<Vec<StatusLine>>> {
        let mut buf = [0u8; 256];
        let n = self.fd.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        self.splitter.push(&buf[..n]).map(Some)
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
fn view_for(node: &Node, spec: &LaunchSpec) -> Option<std::path::PathBuf> {
    let local = spec.local_view || spec.caps.has(Cap::SeeLocalProcStat);
    (!local).then(|| node.view_dir.get().cloned()).flatten()
}

fn init_args(
    spec: &LaunchSpec,
    cgroup: &JobCgroup,
    view: Option<&std::path::Path>,
) -> Vec<std::ffi::OsString> {
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
    for d in &cgroup.dirs {
        a.push("--cgroup".into());
        a.push(d.as_os_str().to_owned());
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

/// Spawns krg-init and waits for its `pid` line.
async fn launch(node: &Arc<Node>, spec: &LaunchSpec) -> Result<Launched, (RemoteError, i32)> {
    let me = node.id;
    spec.check()
        .map_err(|e| (RemoteError::new(ErrorCode::BadRequest, e.to_string()), 1))?;
    let name = format!("job-{}-{}", spec.gpid.home_node(), spec.gpid.seq());
    let cgroup = tokio::task::block_in_place(|| JobCgroup::create(&name))
        .map_err(|e| internal(me, "cannot create its cgroup", e))?;
    let result = spawn_init(node, spec, &cgroup).await;
    match result {
        Ok((stdin, stdout, stderr, status, pty)) => {
            let ctl = Arc::new(BodyCtl {
                gpid: spec.gpid,
                uid: spec.uid,
                user: spec.user.clone(),
                command: spec.command_line(),
                started_ms: now_ms(),
                init_pid: AtomicI32::new(0),
                cgroup,
                stopped: AtomicBool::new(false),
                frozen: AtomicBool::new(false),
                caps: Mutex::new(spec.caps),
                no_migrate: spec.no_migrate,
                view: node.view_cache.clone(),
            });
            node.view_cache.set_caps(spec.gpid, Some(spec.caps));
            Ok(Launched {
                ctl,
                stdin: Some(stdin),
                stdout,
                stderr,
                pty,
                status: StatusReader {
                    fd: status,
                    splitter: LineSplitter::default(),
                },
            })
        }
        Err(e) => {
            tokio::task::block_in_place(|| cgroup.remove());
            Err(e)
        }
    }
}

type Spawned = (Fd, Fd, Option<Fd>, Fd, bool);

async fn spawn_init(
    node: &Arc<Node>,
    spec: &LaunchSpec,
    cgroup: &JobCgroup,
) -> Result<Spawned, (RemoteError, i32)> {
    let me = node.id;
    let io = |what: &'static str| move |e: std::io::Error| internal(me, what, e);
    let (status_r, status_w) = pipe().map_err(io("status pipe"))?;
    let (child_in, child_out, child_err, ours_in, ours_out, ours_err): (
        OwnedFd,
        OwnedFd,
        OwnedFd,
        OwnedFd,
        OwnedFd,
        Option<OwnedFd>,
    ) = if let Some(size) = spec.tty {
        let ws = nix::pty::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(|e| internal(me, "openpty", e))?;
        let master2 = pty.master.try_clone().map_err(io("dup pty"))?;
        let slave_out = pty.slave.try_clone().map_err(io("dup pty"))?;
        let slave_err = pty.slave.try_clone().map_err(io("dup pty"))?;
        (pty.slave, slave_out, slave_err, pty.master, master2, None)
    } else {
        let (in_r, in_w) = pipe().map_err(io("stdin pipe"))?;
        let (out_r, out_w) = pipe().map_err(io("stdout pipe"))?;
        let (err_r, err_w) = pipe().map_err(io("stderr pipe"))?;
        (in_r, out_w, err_w, in_w, out_r, Some(err_r))
    };
    let view = view_for(node, spec);
    let mut cmd = std::process::Command::new(&node.init_path);
    cmd.args(init_args(spec, cgroup, view.as_deref()))
        .env_clear()
        .envs(spec.env.iter().filter_map(|e| {
            let pos = e.iter().position(|b| *b == b'=')?;
            Some((
                OsStr::from_bytes(&e[..pos]),
                OsStr::from_bytes(&e[pos + 1..]),
            ))
        }))
        .env("KRG_GPID", spec.gpid.to_string())
        .env("KRG_NODE", node.id.to_string());
    if let Some(v) = &view {
        cmd.env("KRG_VIEW", v);
        if let Some(preload) = &node.preload_path {
            // krg-init puts it first in the command's LD_PRELOAD; krg-init
            // itself must not load it.
            cmd.env("KRG_PRELOAD", preload);
        }
    }
    if let Some(krg) = &node.krg_path {
        cmd.env("KRG_BIN", krg);
    }
    cmd.stdin(child_in).stdout(child_out).stderr(child_err);
    let status_fd = status_w.as_raw_fd();
    // SAFETY: the closure only calls dup2, which is async-signal-safe, on
    // descriptors that stay open in the child until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(status_fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| internal(me, "cannot run krg-init", e))?;
    drop(cmd);
    drop(status_w);
    // The outer krg-init exits at once; reap it off the runtime's threads.
    tokio::task::spawn_blocking(move || child.wait());
    let pty = spec.tty.is_some();
    Ok((
        Fd::new(ours_in).map_err(io("stdin"))?,
        Fd::new(ours_out).map_err(io("stdout"))?,
        ours_err.map(Fd::new).transpose().map_err(io("stderr"))?,
        Fd::new(status_r).map_err(io("status"))?,
        pty,
    ))
}

async fn run(
    node: Arc<Node>,
    spec: LaunchSpec,
    rx: mpsc::Receiver<ToBody>,
    tx: mpsc::Sender<FromBody>,
) {
    let gpid = spec.gpid;
    let mut l = match launch(&node, &spec).await {
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
    // The first line is the init's host pid (krg-init guarantees the order).
    let init_pid = loop {
        match l.status.next().await {
            Ok(Some(lines)) => {
                if let Some(StatusLine::Pid(p)) = lines.first() {
                    break Some(*p);
                }
            }
            _ => break None,
        }
    };
    let Some(init_pid) = init_pid else {
        let (error, exit_code) =
            internal(node.id, "krg-init", "it exited without reporting its pid");
        let _ = tx.send(FromBody::Failed { error, exit_code }).await;
        tokio::task::block_in_place(|| l.ctl.cgroup.remove());
        return;
    };
    l.ctl.init_pid.store(init_pid, Ordering::SeqCst);
    node.metrics.launches.inc();
    node.jobs.bodies_insert(l.ctl.clone());
    tracing::debug!(gpid = %gpid, pid = init_pid, "job started");
    let _ = tx
        .send(FromBody::Started {
            gpid,
            node: node.id,
        })
        .await;

    let ctl = l.ctl.clone();
    let out_task = tokio::spawn(pump_out(l.stdout, tx.clone(), false));
    let err_task = l
        .stderr
        .take()
        .map(|fd| tokio::spawn(pump_out(fd, tx.clone(), true)));
    let stdin_fd = l.stdin.take();
    let control = tokio::spawn(control(rx, ctl.clone(), stdin_fd, l.pty, tx.clone()));

    // Status lines until EOF (init gone), then the init's own wait status.
    let mut reported: Option<ExitStatus> = None;
    while let Ok(Some(lines)) = l.status.next().await {
        for line in lines {
            match line {
                StatusLine::Failed { step, errno } => {
                    let (error, exit_code) = failure(node.id, &spec, &step, errno);
                    let _ = tx.send(FromBody::Failed { error, exit_code }).await;
                }
                StatusLine::Exit(c) => reported = Some(ExitStatus::Code(c)),
                StatusLine::Signal { signal, core } => {
                    reported = Some(ExitStatus::Signal { signal, core })
                }
                StatusLine::Pid(_) | StatusLine::Started(_) => {}
            }
        }
    }
    let waited = reap::wait(init_pid).await.ok().flatten();
    let status = reported.unwrap_or(match waited {
        Some(WaitStatus::Exited(c)) => ExitStatus::Code(c),
        Some(WaitStatus::Signaled { signal, core }) => ExitStatus::Signal { signal, core },
        None => ExitStatus::Signal {
            signal: libc::SIGKILL,
            core: false,
        },
    });
    // Whatever the job wrote before it ended goes out before its status.
    let drain = async {
        let _ = out_task.await;
        if let Some(t) = err_task {
            let _ = t.await;
        }
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!(gpid = %gpid, "job streams did not drain after it ended");
    }
    control.abort();
    node.jobs.bodies_remove(gpid);
    node.view_cache.set_caps(gpid, None);
    let _ = tx.send(FromBody::Exited(status)).await;
    tracing::debug!(gpid = %gpid, %status, "job ended");
    let ctl2 = ctl.clone();
    let _ = tokio::task::spawn_blocking(move || ctl2.cgroup.remove()).await;
}

async fn pump_out(fd: Fd, tx: mpsc::Sender<FromBody>, stderr: bool) {
    let mut buf = vec![0u8; STREAM_CHUNK_BYTES_MAX];
    loop {
        match fd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let chunk = ByteBuf::from(buf[..n].to_vec());
                let frame = if stderr {
                    FromBody::Stderr(chunk)
                } else {
                    FromBody::Stdout(chunk)
                };
                if tx.send(frame).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Stdin, signals and window sizes from the deputy. Stdin is written by its
/// own task from a queue bounded by the deputy's credit, so this loop never
/// waits on the job and a signal is delivered even when the job does not
/// read its stdin.
async fn control(
    mut rx: mpsc::Receiver<ToBody>,
    ctl: Arc<BodyCtl>,
    stdin: Option<Fd>,
    pty: bool,
    tx: mpsc::Sender<FromBody>,
) {
    let queue = Arc::new(StdinQueue::default());
    let pty_fd = stdin.as_ref().map(Fd::raw);
    let writer = stdin.map(|fd| tokio::spawn(write_stdin(fd, queue.clone(), tx.clone(), pty)));
    while let Some(frame) = rx.recv().await {
        match frame {
            ToBody::Stdin(data) => queue.push(Some(data.into_vec())),
            ToBody::StdinEof => queue.push(None),
            ToBody::Signal(sig) => ctl.signal(sig),
            ToBody::Resize { rows, cols } => {
                if let (true, Some(fd)) = (pty, pty_fd) {
                    let ws = libc::winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads a winsize we own from a valid pointer.
                    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                }
            }
            ToBody::Hangup => ctl.signal(libc::SIGHUP),
            ToBody::Launch(_) => {}
        }
    }
    // The deputy is gone: hang the job up, as sshd does when ssh dies.
    ctl.signal(libc::SIGHUP);
    if let Some(w) = writer {
        w.abort();
    }
}

#[derive(Default)]
struct StdinQueue {
    items: Mutex<VecDeque<Option<Vec<u8>>>>,
    bytes: Mutex<u64>,
    ready: Notify,
}

impl StdinQueue {
    fn push(&self, item: Option<Vec<u8>>) {
        let len = item.as_ref().map_or(0, |d| d.len() as u64);
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        // The deputy respects the window; a peer that does not loses data
        // rather than our memory.
        if *bytes + len > 2 * STREAM_WINDOW_BYTES {
            tracing::warn!("stdin beyond the credit window dropped");
            return;
        }
        *bytes += len;
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(item);
        self.ready.notify_one();
    }

    async fn pop(&self) -> Option<Vec<u8>> {
        loop {
            if let Some(item) = self
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return item;
            }
            self.ready.notified().await;
        }
    }
}

async fn write_stdin(fd: Fd, queue: Arc<StdinQueue>, tx: mpsc::Sender<FromBody>, pty: bool) {
    let mut fd = Some(fd);
    loop {
        let item = queue.pop().await;
        let Some(data) = item else {
            // End of stdin: close the pipe. A pty has no end of file of its
            // own; like ssh -t, leave it open.
            if !pty {
                fd = None;
            }
            continue;
        };
        let len = data.len() as u64;
        if let Some(f) = &fd {
            if f.write_all(&data).await.is_err() {
                // The job closed its stdin: later bytes are dropped, as a
                // pipe would, but still acknowledged so the deputy goes on.
                fd = None;
            }
        }
        {
            let mut bytes = queue.bytes.lock().unwrap_or_else(|p| p.into_inner());
            *bytes = bytes.saturating_sub(len);
        }
        if tx.send(FromBody::StdinAck(len)).await.is_err() {
            break;
        }
    }
}

/// Time since the job started, for listings.
pub fn elapsed_since(started_ms: u64) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(started_ms))
}
