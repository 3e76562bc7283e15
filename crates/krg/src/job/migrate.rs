//! Moving and saving a running job with CRIU, without its streams noticing.
//!
//! On the source node the body's supervisor serves [`BodyCmd`]s:
//!
//! 1. refuse before anything is frozen if the job cannot move (a TCP
//!    connection, a device, its capabilities, a file the target lacks);
//! 2. tell the deputy side `Moving`; it answers `Hold` and holds back every
//!    later frame (stdin, signals), so nothing is in flight;
//! 3. freeze the job's cgroup, send up everything it wrote, take back the
//!    stdin it has not read (from the queue and from the pipe);
//! 4. dump it with CRIU (plain, or post-copy with a page server);
//! 5. ask the target to restore it ([`restore_here`]): new pipes under the
//!    old keys, the carried stdin first, the target's cluster view;
//! 6. tell the deputy side `Moved`; it reattaches to the target and sends
//!    what it held. If the target fails, the job is restored here from the
//!    same images and the deputy side is told `Resumed`: never lost, never
//!    running twice.

use super::body::BodyCtl;
use super::cgroup::signal_pids;
pub use super::restore::restore_here;
use super::spec::LaunchSpec;
use super::stdio::{Pumps, StatusReader, StdinCarry, StreamKeys};
use crate::criu::{AfterDump, Criu, DumpRequest, MemoryTransfer};
use crate::image::{self, ImageMeta, ImageRecord};
use crate::node::{now_ms, Node};
use crate::wire::peer::{PeerRequest, PeerResponse};
use crate::wire::stream::FromBody;
use crate::wire::{ErrorCode, RemoteError};
use krg_types::{Gpid, NodeId, NodeState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long the deputy side has to answer `Moving` with `Hold`.
const HOLD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a target may take to restore.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the page server waits for the target to start pulling.
const LAZY_READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MigrateMode {
    /// Freeze, dump everything, copy, restore.
    Stop,
    /// Post-copy: restore at once, pages follow on demand and in the background.
    Lazy,
    /// Iterative pre-copy (needs soft-dirty memory tracking).
    Precopy,
    /// The fastest this node can do: lazy where userfaultfd works, else stop.
    Auto,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointAfter {
    LeaveRunning,
    Stop,
    Kill,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationReport {
    pub gpid: Gpid,
    pub source: NodeId,
    pub target: NodeId,
    pub mode: MigrateMode,
    pub freeze_ms: u64,
    pub bytes: u64,
    pub total_ms: u64,
    /// Mount points of the node's the target lacks, which the job left
    /// behind (`super::held_mounts`); the first [`LEFT_BEHIND_SHOWN`].
    #[serde(default)]
    pub left_behind: Vec<String>,
}

/// Most left-behind mount points a report names (krgd's log has all).
pub const LEFT_BEHIND_SHOWN: usize = 32;

pub enum BodyCmd {
    Migrate {
        target: NodeId,
        mode: MigrateMode,
        reply: oneshot::Sender<Result<MigrationReport, RemoteError>>,
    },
    Checkpoint {
        after: CheckpointAfter,
        reply: oneshot::Sender<Result<ImageRecord, RemoteError>>,
    },
}

/// What becomes of the body on this node after a command.
pub enum After {
    Stay,
    /// Moved away, or saved and killed.
    Gone,
    /// Restored here again as a new body, which owns the gpid's cgroup now.
    Replaced,
}

/// What a target needs to bring a job back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreJob {
    pub spec: LaunchSpec,
    pub images_dir: String,
    pub keys: StreamKeys,
    pub carry: StdinCarry,
    /// Post-copy: the source's page server.
    pub lazy: Option<(String, u16)>,
    /// CPU time the job had used when it was frozen.
    #[serde(default)]
    pub cpu_ns: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreReply {
    pub pid: i32,
    pub restore_ms: u64,
}

fn refused(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorCode::Refused, msg)
}

fn internal(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorCode::Internal, msg)
}

pub async fn serve(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    pumps: &mut Pumps,
    status: &mut StatusReader,
    tx: &mpsc::Sender<FromBody>,
    cmd: BodyCmd,
) -> After {
    match cmd {
        BodyCmd::Migrate {
            target,
            mode,
            reply,
        } => {
            let (result, after) = migrate(node, ctl, pumps, status, tx, target, mode).await;
            leave_if_gone(node, ctl, pumps, &after).await;
            let _ = reply.send(result);
            after
        }
        BodyCmd::Checkpoint { after, reply } => {
            let (result, then) = checkpoint(node, ctl, pumps, status, tx, after).await;
            leave_if_gone(node, ctl, pumps, &then).await;
            let _ = reply.send(result);
            then
        }
    }
}

/// A body gone from this node is forgotten before its caller hears of it:
/// a job moved back here at once (or restarted here after `--kill`) makes
/// a cgroup of the same name, which the old body's removal would empty.
async fn leave_if_gone(node: &Arc<Node>, ctl: &Arc<BodyCtl>, pumps: &mut Pumps, after: &After) {
    if matches!(after, After::Gone) {
        pumps.abort();
        super::body::forget(node, ctl).await;
    }
}

/// How long a job just launched may take to start its command.
const START_WAIT: Duration = Duration::from_secs(5);

/// A job is saved or moved only once its command runs, by a user whose
/// processes CRIU may inspect here.
async fn ready(ctl: &BodyCtl, what: &str) -> Result<(), RemoteError> {
    let deadline = Instant::now() + START_WAIT;
    while !ctl.started.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            return Err(refused(format!(
                "cannot {what} job {}: it has not started its command yet",
                ctl.gpid
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let f = crate::features::get();
    if ctl.spec.uid != 0 && !f.cap_sys_resource.ok {
        return Err(refused(format!(
            "cannot {what} job {}: it runs as uid {} and krgd here lacks CAP_SYS_RESOURCE, which CRIU needs to read another user's resource limits (grant it to krgd)",
            ctl.gpid, ctl.spec.uid
        )));
    }
    Ok(())
}

/// Why this job cannot move or be saved, found before anything is frozen.
pub fn obstacle(ctl: &BodyCtl) -> Option<String> {
    let gpid = ctl.gpid;
    // Read only for a job that holds a socket: each table walks every
    // bucket of the kernel's TCP hash (4 ms here, 262144 buckets), however
    // few sockets there are.
    let mut tcp: Option<Vec<(String, String)>> = None;
    for pid in ctl.cgroup.pids() {
        for (_, target) in crate::procfs::open_fds(pid) {
            let t = target.to_string_lossy();
            if let Some(ino) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                let tcp = tcp.get_or_insert_with(tcp_sockets);
                if let Some(peer) = tcp.iter().find(|(i, _)| i == ino).map(|(_, p)| p) {
                    return Some(format!(
                        "cannot migrate job {gpid}: it holds a TCP connection to {peer}"
                    ));
                }
            } else if t.starts_with("/dev/") && !allowed_device(&t) {
                return Some(format!(
                    "cannot migrate job {gpid}: it holds the device {t}"
                ));
            }
        }
    }
    None
}

/// Refuses a move to `target` if it lacks a file the job uses (see
/// [`super::needed_files`]); returns the mount points of the node's
/// mounts it lacks, which the job leaves behind ([`super::held_mounts`]).
async fn target_has_files(
    node: &Arc<Node>,
    ctl: &BodyCtl,
    target: NodeId,
    addr: &str,
) -> Result<Vec<String>, RemoteError> {
    let files = tokio::task::spawn_blocking(job_files(ctl))
        .await
        .map_err(|e| internal(format!("cannot list the files of job {}: {e}", ctl.gpid)))?;
    let doing = format!("migrate job {}", ctl.gpid);
    let leave = super::needed_files::LackedMount::LeaveBehind;
    let left_behind =
        super::needed_files::check_target(node, &doing, target, addr, files, leave).await?;
    if !left_behind.is_empty() {
        tracing::info!(gpid = %ctl.gpid, %target, mounts = ?left_behind, "the job leaves behind mounts the target lacks");
    }
    Ok(left_behind)
}

/// What lists the files and mount points of the job a target must have.
fn job_files(ctl: &BodyCtl) -> impl FnOnce() -> Vec<super::needed_files::NeededFile> {
    let pids = ctl.cgroup.pids();
    let init = ctl.init_pid.load(Ordering::SeqCst);
    move || {
        let mut files = super::needed_files::of_processes(&pids);
        files.extend(super::held_mounts::of_job(init));
        files
    }
}

fn allowed_device(path: &str) -> bool {
    matches!(
        path,
        "/dev/null"
            | "/dev/zero"
            | "/dev/full"
            | "/dev/random"
            | "/dev/urandom"
            | "/dev/tty"
            | "/dev/ptmx"
    ) || path.starts_with("/dev/pts/")
        || path.starts_with("/dev/shm/")
}

/// TCP sockets of this network namespace (`(inode, remote address)`),
/// listening ones included.
fn tcp_sockets() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 9 {
                let state = f[3];
                let remote = if state == "0A" {
                    format!("{} (listening)", decode_addr(f[1]))
                } else {
                    decode_addr(f[2])
                };
                out.push((f[9].to_string(), remote));
            }
        }
    }
    out
}

/// `0100007F:1F90` -> `127.0.0.1:8080` (IPv4; IPv6 shown as found).
fn decode_addr(hex: &str) -> String {
    let Some((ip, port)) = hex.split_once(':') else {
        return hex.to_string();
    };
    let port = u16::from_str_radix(port, 16).unwrap_or(0);
    if ip.len() == 8 {
        if let Ok(v) = u32::from_str_radix(ip, 16) {
            let b = v.to_le_bytes();
            return format!("{}.{}.{}.{}:{port}", b[0], b[1], b[2], b[3]);
        }
    }
    format!("[{ip}]:{port}")
}

/// Freezes the job and takes its streams back: what it wrote is sent up,
/// what it has not read is returned.
async fn freeze_and_take(
    node: &Node,
    ctl: &BodyCtl,
    pumps: &mut Pumps,
) -> Result<Taken, RemoteError> {
    ctl.frozen.store(true, Ordering::SeqCst);
    let view = node.view_dir.get().map(PathBuf::as_path);
    if let Err(e) = super::quiesce::freeze(&ctl.cgroup, view).await {
        ctl.frozen.store(false, Ordering::SeqCst);
        return Err(internal(format!("cannot freeze job {}: {e}", ctl.gpid)));
    }
    let (stdout, stderr) = pumps.stop_output().await;
    let (stdin, carry) = pumps.take_stdin().await;
    Ok(Taken {
        stdout,
        stderr,
        stdin,
        carry,
        cpu_ns: tokio::task::block_in_place(|| ctl.cpu_ns()),
    })
}

struct Taken {
    stdout: Option<super::fdio::Fd>,
    stderr: Option<super::fdio::Fd>,
    stdin: Option<super::fdio::Fd>,
    carry: StdinCarry,
    /// The job's CPU time once frozen, for wherever it is restored.
    cpu_ns: u64,
}

impl Taken {
    /// The job goes on here with its own streams (a failed move, or a
    /// checkpoint that leaves it running).
    fn give_back(self, ctl: &BodyCtl, pumps: &mut Pumps, tx: &mpsc::Sender<FromBody>) {
        let _ = ctl.cgroup.set_frozen(false);
        ctl.frozen.store(false, Ordering::SeqCst);
        if let Some(out) = self.stdout {
            pumps.resume(out, self.stderr, self.stdin, tx);
        }
        pumps.push_carry(self.carry);
    }
}

fn dump_request(node: &Node, ctl: &BodyCtl, keys: &StreamKeys, dir: PathBuf) -> DumpRequest {
    let mut req = DumpRequest::new(ctl.init_pid.load(Ordering::SeqCst), dir);
    req.gpid = Some(ctl.gpid);
    req.streams = keys.all();
    req.freeze_cgroup = ctl
        .cgroup
        .dirs
        .iter()
        .find(|d| d.join("freezer.state").exists())
        .cloned();
    req.log_level = node.config.criu_log_level;
    req.page_tls = Some(crate::criu::PageTls::in_state_dir(&node.config.state_dir));
    req
}

async fn hold_deputy(pumps: &Pumps, tx: &mpsc::Sender<FromBody>) -> Result<(), RemoteError> {
    let hold = pumps.hold.clone();
    let _ = tx.send(FromBody::Moving).await;
    tokio::time::timeout(HOLD_TIMEOUT, hold.notified())
        .await
        .map_err(|_| internal("the job's deputy did not answer in time"))
}

fn resolve_mode(mode: MigrateMode) -> Result<MigrateMode, RemoteError> {
    let f = crate::features::get();
    match mode {
        MigrateMode::Auto if f.lazy_pages.ok => Ok(MigrateMode::Lazy),
        MigrateMode::Auto => Ok(MigrateMode::Stop),
        MigrateMode::Precopy if !f.soft_dirty.ok => Err(refused(format!(
            "pre-copy migration is not possible on this node: {}",
            f.soft_dirty.reason.clone().unwrap_or_default()
        ))),
        MigrateMode::Lazy if !f.lazy_pages.ok => Err(refused(format!(
            "lazy migration is not possible on this node: {}",
            f.lazy_pages.reason.clone().unwrap_or_default()
        ))),
        // With soft-dirty tracking, pre-copy would iterate pre-dumps first;
        // the final step is a plain dump.
        MigrateMode::Precopy => Ok(MigrateMode::Stop),
        m => Ok(m),
    }
}

fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("0.0.0.0:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    pumps: &mut Pumps,
    status: &mut StatusReader,
    tx: &mpsc::Sender<FromBody>,
    target: NodeId,
    mode: MigrateMode,
) -> (Result<MigrationReport, RemoteError>, After) {
    let started = Instant::now();
    let gpid = ctl.gpid;
    let checks = async {
        if target == node.id {
            return Err(refused(format!("job {gpid} already runs on node {target}")));
        }
        let rec = node.state.read(|d| d.state.nodes.get(&target).cloned());
        let rec = rec.ok_or_else(|| {
            RemoteError::new(ErrorCode::NotFound, format!("there is no node {target}"))
        })?;
        if node.shown_state(&rec) != NodeState::Up {
            return Err(RemoteError::new(
                ErrorCode::Unavailable,
                format!("node {target} is {}", node.shown_state(&rec)),
            ));
        }
        if !ctl.caps().has(super::caps::Cap::CanMigrate) {
            return Err(refused(format!(
                "cannot migrate job {gpid}: its CAN_MIGRATE capability is off"
            )));
        }
        if let Some(why) = obstacle(ctl) {
            return Err(refused(why));
        }
        ready(ctl, "migrate").await?;
        let left_behind = target_has_files(node, ctl, target, &rec.addr).await?;
        Ok((rec.addr, resolve_mode(mode)?, left_behind))
    };
    let (target_addr, mode, left_behind) = match checks.await {
        Ok(v) => v,
        Err(e) => return (Err(e), After::Stay),
    };
    // CRIU starts while the job still runs; it gets its request once the
    // job is frozen (or never, which calls it off).
    let (dump_tx, dump_rx) = std::sync::mpsc::channel();
    let criu = node.criu.clone();
    let pending_dump = tokio::task::spawn_blocking(move || criu.dump_when_asked(dump_rx));
    // The move's images go below the job's directory, which nobody but
    // root may change (the target restores what they say).
    let store = node.config.image_store.clone();
    let job_dir = match image::claim_job_dir(&store, gpid, ctl.spec.uid) {
        Ok(d) => d,
        Err(e) => {
            return (
                Err(internal(format!("cannot migrate job {gpid}: {e}"))),
                After::Stay,
            )
        }
    };
    if let Err(e) = hold_deputy(pumps, tx).await {
        let _ = tx.send(FromBody::Resumed).await;
        return (Err(e), After::Stay);
    }
    let taken = match freeze_and_take(node, ctl, pumps).await {
        Ok(t) => t,
        Err(e) => {
            let _ = tx.send(FromBody::Resumed).await;
            return (Err(e), After::Stay);
        }
    };
    let frozen_at = Instant::now();
    let dir = job_dir.join(format!("migrate-{}", now_ms()));
    let keys = pumps_keys(ctl);
    let mut req = dump_request(node, ctl, &keys, dir.clone());
    req.skip_mounts = left_behind.clone();
    let port = if mode == MigrateMode::Lazy {
        free_port()
    } else {
        None
    };
    let (notice_tx, notice_rx) = std::sync::mpsc::channel();
    if let Some(p) = port {
        req.memory = MemoryTransfer::Lazy { port: p };
        req.notices = Some(notice_tx);
    }
    // A lazy dump ends when CRIU's page server has no client left, which
    // it also takes for success when the target died mid-transfer: the
    // job's tasks are then left stopped, and killed only once the target
    // confirms it runs the job (`confirm_moved`).
    req.after = if port.is_some() {
        AfterDump::Stop
    } else {
        AfterDump::Kill
    };
    let originals = ctl.cgroup.pids();
    let rss = ctl.cgroup.rss_bytes();
    // Its receiver lives until the request comes: a send cannot fail
    // unless that task died, which its join handle then tells.
    let _ = dump_tx.send(req);
    let mut dump = Some(pending_dump);
    if port.is_some() {
        // The target may start once the page server is up.
        let ready = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + LAZY_READY_TIMEOUT;
            while let Ok(n) =
                notice_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if n.script == crate::criu::rpc::STATUS_READY {
                    return true;
                }
            }
            false
        });
        if !ready.await.unwrap_or(false) {
            let outcome = match dump.take() {
                Some(d) => Some(d.await),
                None => None,
            };
            return match outcome {
                // A dump that failed before its page server started has not
                // killed the job: it is still here, frozen.
                Some(Ok(Err(e))) => {
                    stay_here(node, ctl, pumps, tx, taken, &dir, e.to_string()).await
                }
                Some(Ok(Ok(_))) => {
                    // Left stopped (a lazy dump never kills): continue them.
                    signal_pids(&originals, libc::SIGCONT);
                    let why = "the page server did not start".to_string();
                    stay_here(node, ctl, pumps, tx, taken, &dir, why).await
                }
                _ => {
                    let why = "the page server did not start".to_string();
                    fail_here(node, ctl, pumps, status, tx, taken, &dir, &keys, why).await
                }
            };
        }
    } else if let Some(d) = dump.take() {
        match d.await {
            Ok(Ok(_)) => {}
            // CRIU failed before killing the job: it goes on here.
            Ok(Err(e)) => {
                return stay_here(node, ctl, pumps, tx, taken, &dir, e.to_string()).await;
            }
            Err(e) => {
                return stay_here(node, ctl, pumps, tx, taken, &dir, e.to_string()).await;
            }
        }
    }
    let job = RestoreJob {
        spec: spec_now(ctl),
        images_dir: dir.to_string_lossy().into_owned(),
        keys,
        carry: taken.carry.clone(),
        lazy: port.map(|p| (ip_of(&node.addr), p)),
        cpu_ns: taken.cpu_ns,
    };
    let dumped_ms = frozen_at.elapsed().as_millis();
    let asked = node
        .peers
        .call(
            target,
            &target_addr,
            PeerRequest::Restore(Box::new(job)),
            RESTORE_TIMEOUT,
        )
        .await;
    tracing::info!(
        gpid = %gpid,
        dumped_ms,
        restored_ms = frozen_at.elapsed().as_millis(),
        "migration: frozen job dumped, then restored on the target"
    );
    let (why, lazy_dump) = match asked {
        Ok(PeerResponse::Restored(_)) => {
            let freeze_ms = frozen_at.elapsed().as_millis() as u64;
            // Post-copy: the job runs on the target but part of its memory
            // is still here. Its streams move only once every page has;
            // if the transfer breaks, CRIU resumes the job here, the
            // target's copy is killed before its output reached anyone,
            // and the job goes on here: never lost, never twice.
            let failed = match dump.take() {
                None => false,
                Some(d) => {
                    !(matches!(d.await, Ok(Ok(_)))
                        && confirm_moved(node, target, &target_addr, gpid).await)
                }
            };
            if !failed {
                if port.is_some() {
                    // SIGKILL waits for the thaw to be delivered.
                    signal_pids(&originals, libc::SIGKILL);
                    let _ = ctl.cgroup.set_frozen(false);
                }
                let bytes = image::dir_bytes(&dir) + if port.is_some() { rss } else { 0 };
                let _ = tx.send(FromBody::Moved { node: target }).await;
                let report = MigrationReport {
                    gpid,
                    source: node.id,
                    target,
                    mode,
                    freeze_ms,
                    bytes,
                    total_ms: started.elapsed().as_millis() as u64,
                    left_behind: left_behind
                        .iter()
                        .take(LEFT_BEHIND_SHOWN)
                        .cloned()
                        .collect(),
                };
                record(node, &report);
                // The images are no longer needed (a lazy dump has ended:
                // the target has every page).
                tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir));
                return (Ok(report), After::Gone);
            }
            (format!("node {target} failed while its memory moved"), None)
        }
        Ok(_) => ("unexpected answer".to_string(), dump.take()),
        Err(e) => (e.to_string(), dump.take()),
    };
    let Some(port) = port else {
        return fail_here(
            node,
            ctl,
            pumps,
            status,
            tx,
            taken,
            &dir,
            &pumps_keys(ctl),
            why,
        )
        .await;
    };
    // A lazy dump never kills the job: its tasks are here, whole, whatever
    // became of the target.
    let lazy = LazyLeft {
        port,
        dump: lazy_dump,
        originals,
    };
    resume_originals(
        node,
        ctl,
        pumps,
        tx,
        taken,
        &dir,
        (target, &target_addr),
        lazy,
        why,
    )
    .await
}

/// One more failed migration in this node's metrics.
fn count_failure(node: &Node) {
    node.metrics
        .failures
        .get_or_create(&crate::metrics::Metrics::label(&[("kind", "migration")]))
        .inc();
}

/// Does `target` run job `gpid` now? Asked after a lazy dump ended, which
/// CRIU also reports as a success when the target died with its
/// connection closed cleanly: only the target's word says the move is done.
async fn confirm_moved(node: &Arc<Node>, target: NodeId, addr: &str, gpid: Gpid) -> bool {
    let asked = node
        .peers
        .call(target, addr, PeerRequest::ListJobs, Duration::from_secs(5))
        .await;
    match asked {
        Ok(PeerResponse::Jobs(jobs)) => jobs
            .iter()
            .any(|j| j.gpid == gpid && j.node == Some(target) && j.exit.is_none()),
        _ => false,
    }
}

/// The job is alive here after all (the dump failed, or a lazy move did):
/// thaw it, give it its streams back and say why it did not move.
async fn stay_here(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    pumps: &mut Pumps,
    tx: &mpsc::Sender<FromBody>,
    taken: Taken,
    dir: &std::path::Path,
    why: String,
) -> (Result<MigrationReport, RemoteError>, After) {
    count_failure(node);
    taken.give_back(ctl, pumps, tx);
    let _ = tx.send(FromBody::Resumed).await;
    let _ = std::fs::remove_dir_all(dir);
    (
        Err(internal(format!("cannot migrate job {}: {why}", ctl.gpid))),
        After::Stay,
    )
}

/// A dump running on a blocking thread (a lazy one lasts until every page
/// has been pulled).
type DumpTask = tokio::task::JoinHandle<Result<crate::criu::DumpOutcome, crate::criu::CriuError>>;

/// What a lazy move leaves on the source: the port of our page server
/// while the dump serves, the dump, and the job's tasks it keeps stopped.
struct LazyLeft {
    port: u16,
    dump: Option<DumpTask>,
    originals: Vec<i32>,
}

/// How long the end of a lazy dump is waited for once its target failed.
const LAZY_END_TIMEOUT: Duration = Duration::from_secs(30);

/// A lazy move failed: the job's own tasks, stopped but whole, go on here.
/// The target's copy, if it started, is killed first; a page server still
/// waiting for its client is given one that leaves at once, so that the
/// dump ends and lets the tasks go (CRIU leaves them stopped).
#[allow(clippy::too_many_arguments)]
async fn resume_originals(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    pumps: &mut Pumps,
    tx: &mpsc::Sender<FromBody>,
    taken: Taken,
    dir: &std::path::Path,
    (target, target_addr): (NodeId, &str),
    lazy: LazyLeft,
    why: String,
) -> (Result<MigrationReport, RemoteError>, After) {
    let gpid = ctl.gpid;
    tracing::warn!(gpid = %gpid, reason = %why, "lazy migration failed; the job goes on here");
    let kill = PeerRequest::SignalJob {
        gpid,
        signal: libc::SIGKILL,
        uid: 0,
    };
    let _ = node
        .peers
        .call(target, target_addr, kill, Duration::from_secs(5))
        .await;
    if let Some(d) = lazy.dump {
        let _ = tokio::net::TcpStream::connect(("127.0.0.1", lazy.port)).await;
        if tokio::time::timeout(LAZY_END_TIMEOUT, d).await.is_err() {
            tracing::error!(gpid = %gpid, "the lazy dump did not end; the job's tasks stay stopped");
        }
    }
    signal_pids(&lazy.originals, libc::SIGCONT);
    let why = format!("{why}; the job goes on on node {}", node.id);
    stay_here(node, ctl, pumps, tx, taken, dir, why).await
}

/// The target failed after a dump that killed the job: bring it back here
/// from the same images.
#[allow(clippy::too_many_arguments)]
async fn fail_here(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    _pumps: &mut Pumps,
    status: &mut StatusReader,
    tx: &mpsc::Sender<FromBody>,
    taken: Taken,
    dir: &std::path::Path,
    keys: &StreamKeys,
    why: String,
) -> (Result<MigrationReport, RemoteError>, After) {
    let gpid = ctl.gpid;
    count_failure(node);
    tracing::warn!(gpid = %gpid, reason = %why, "migration failed after the dump; restoring here");
    let job = RestoreJob {
        spec: spec_now(ctl),
        images_dir: dir.to_string_lossy().into_owned(),
        keys: *keys,
        carry: taken.carry.clone(),
        lazy: None,
        cpu_ns: taken.cpu_ns,
    };
    node.jobs.bodies_remove(gpid);
    // A task of its own: the restored body's supervisor is this very kind
    // of future, and a future cannot contain itself.
    match restore_here(node, job).await {
        Ok(_) => {
            // The restored body is a new body here, waiting for its deputy.
            let _ = tx.send(FromBody::Moved { node: node.id }).await;
            (
                Err(internal(format!(
                    "cannot migrate job {gpid}: {why}; the job goes on on node {}",
                    node.id
                ))),
                After::Replaced,
            )
        }
        Err(e) => {
            let _ = status;
            tracing::error!(gpid = %gpid, error = %e.message, "the job could not be restored anywhere");
            let _ = tx
                .send(FromBody::Failed {
                    error: internal(format!(
                        "job {gpid} was lost while migrating: {}",
                        e.message
                    )),
                    exit_code: 255,
                })
                .await;
            (
                Err(internal(format!(
                    "job {gpid} was lost: {why}; {}",
                    e.message
                ))),
                After::Stay,
            )
        }
    }
}

fn ip_of(addr: &str) -> String {
    addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string()
}

/// The spec with the capabilities in force now.
fn spec_now(ctl: &BodyCtl) -> LaunchSpec {
    let mut s = ctl.spec.clone();
    s.caps = ctl.caps();
    s
}

fn pumps_keys(ctl: &BodyCtl) -> StreamKeys {
    *ctl.keys.lock().unwrap_or_else(|p| p.into_inner())
}

fn record(node: &Node, r: &MigrationReport) {
    let m = &node.metrics;
    m.migrations
        .get_or_create(&crate::metrics::Metrics::label(&[
            ("direction", "out"),
            ("outcome", "ok"),
        ]))
        .inc();
    m.migration_freeze_seconds
        .observe(r.freeze_ms as f64 / 1000.0);
    m.migration_bytes.observe(r.bytes as f64);
}

/// Saves the job as the next image version.
async fn checkpoint(
    node: &Arc<Node>,
    ctl: &Arc<BodyCtl>,
    pumps: &mut Pumps,
    status: &mut StatusReader,
    tx: &mpsc::Sender<FromBody>,
    after: CheckpointAfter,
) -> (Result<ImageRecord, RemoteError>, After) {
    let _ = status;
    let gpid = ctl.gpid;
    if !ctl.caps().has(super::caps::Cap::Checkpointable) {
        return (
            Err(refused(format!(
                "cannot checkpoint job {gpid}: its CHECKPOINTABLE capability is off"
            ))),
            After::Stay,
        );
    }
    if let Some(why) = obstacle(ctl) {
        return (
            Err(refused(why.replace("migrate", "checkpoint"))),
            After::Stay,
        );
    }
    if let Err(e) = ready(ctl, "checkpoint").await {
        return (Err(e), After::Stay);
    }
    let kill = after == CheckpointAfter::Kill;
    let began = Instant::now();
    // As for a move: CRIU starts before the freeze.
    let (dump_tx, dump_rx) = std::sync::mpsc::channel();
    let criu = node.criu.clone();
    let pending_dump = tokio::task::spawn_blocking(move || criu.dump_when_asked(dump_rx));
    // What a restart elsewhere will need, listed while CRIU starts.
    let listing = tokio::task::spawn_blocking(job_files(ctl));
    if kill {
        if let Err(e) = hold_deputy(pumps, tx).await {
            let _ = tx.send(FromBody::Resumed).await;
            return (Err(e), After::Stay);
        }
    }
    let taken = match freeze_and_take(node, ctl, pumps).await {
        Ok(t) => t,
        Err(e) => return (Err(e), After::Stay),
    };
    tracing::debug!(gpid = %gpid, us = began.elapsed().as_micros() as u64, "timing: checkpoint frozen, streams taken");
    let store = node.config.image_store.clone();
    let (version, dir) = match image::create_version_dir(&store, gpid, ctl.spec.uid) {
        Ok(v) => v,
        Err(e) => {
            taken.give_back(ctl, pumps, tx);
            if kill {
                let _ = tx.send(FromBody::Resumed).await;
            }
            return (Err(internal(e.to_string())), After::Stay);
        }
    };
    let keys = pumps_keys(ctl);
    let mut req = dump_request(node, ctl, &keys, dir.clone());
    req.after = match after {
        CheckpointAfter::Kill => AfterDump::Kill,
        CheckpointAfter::Stop => AfterDump::Stop,
        CheckpointAfter::LeaveRunning => AfterDump::Run,
    };
    let dump_started = Instant::now();
    let _ = dump_tx.send(req);
    let result = pending_dump.await;
    let dump_ms = dump_started.elapsed().as_millis() as u64;
    let dumped = match result {
        Ok(Ok(outcome)) => {
            if let Some(s) = outcome.stats {
                tracing::debug!(gpid = %gpid, frozen_us = s.frozen_time.as_micros() as u64,
                    memdump_us = s.memdump_time.as_micros() as u64,
                    memwrite_us = s.memwrite_time.as_micros() as u64,
                    pages = s.pages_written, "timing: checkpoint criu stats");
            }
            Ok(())
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = dumped {
        let _ = std::fs::remove_dir_all(&dir);
        taken.give_back(ctl, pumps, tx);
        if kill {
            let _ = tx.send(FromBody::Resumed).await;
        }
        return (
            Err(internal(format!("cannot checkpoint job {gpid}: {e}"))),
            After::Stay,
        );
    }
    tracing::debug!(gpid = %gpid, us = began.elapsed().as_micros() as u64, dump_ms, "timing: checkpoint dumped");
    let bytes = image::dir_bytes(&dir);
    let meta = ImageMeta {
        gpid,
        version,
        node: node.id,
        created_ms: now_ms(),
        spec: spec_now(ctl),
        keys,
        carry: taken.carry.clone(),
        bytes,
        cpu_ns: taken.cpu_ns,
        files: listing.await.unwrap_or_default(),
    };
    let rec = ImageRecord {
        gpid,
        version,
        node: node.id,
        uid: ctl.spec.uid,
        user: ctl.spec.user.clone(),
        command: ctl.command.clone(),
        created_ms: meta.created_ms,
        bytes,
        path: dir.to_string_lossy().into_owned(),
        dump_ms,
    };
    if let Err(e) = image::write_meta(&dir, &meta) {
        tracing::warn!(gpid = %gpid, error = %e, "cannot write the image's metadata");
    }
    image::grant_owner_read(&dir, ctl.spec.uid);
    tracing::debug!(gpid = %gpid, us = began.elapsed().as_micros() as u64, "timing: checkpoint metadata written");
    let _ = node
        .propose(crate::cluster::types::Command::AddImage(rec.clone()))
        .await;
    tracing::debug!(gpid = %gpid, us = began.elapsed().as_micros() as u64, "timing: checkpoint image recorded");
    node.events.record(
        "checkpoint",
        format!("checkpointed {gpid} as version {version} ({bytes} bytes)"),
    );
    if kill {
        let _ = tx.send(FromBody::Checkpointed { version }).await;
        return (Ok(rec), After::Gone);
    }
    // Left running or stopped: same streams, same pipes.
    let stopped = after == CheckpointAfter::Stop;
    taken.give_back(ctl, pumps, tx);
    if stopped {
        ctl.signal(libc::SIGSTOP);
    }
    (Ok(rec), After::Stay)
}
