//! The deputy side of a job, on its home node: starts it (here or on the
//! chosen node), relays the user's streams, and keeps its record, log and
//! exit status for `krg ps`, `krg wait` and `krg logs`.

use super::body::{self, BodyLink};
use super::caps::{Cap, Caps};
use super::deputy_link::DeputyLink;
use super::spec::{LaunchSpec, RunRequest};
use super::{link, place, JobInfo, JobState};
use crate::api::Caller;
use crate::node::{now_ms, Node};
use crate::wire::stream::{ExitStatus, FromBody, ToBody};
use crate::wire::{ErrorCode, FrameConn, RemoteError};
use futures::{SinkExt, StreamExt};
use krg_types::{Gpid, NodeId};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// Finished jobs remembered for `krg wait` and `krg logs`.
const FINISHED_KEPT_MAX: usize = 10_000;
/// And for how long.
const FINISHED_KEPT_MS: u64 = 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeputyState {
    Starting,
    Running,
    /// Saved and stopped, waiting for `krg restart`.
    Checkpointed,
    Lost,
    Exited(ExitStatus),
}

pub struct Deputy {
    pub gpid: Gpid,
    pub uid: u32,
    pub user: String,
    pub command: String,
    pub started_ms: u64,
    pub detached: bool,
    pub log: Option<PathBuf>,
    pub node: Mutex<NodeId>,
    state: watch::Sender<DeputyState>,
    finished_ms: Mutex<Option<u64>>,
    /// Where a restart brought the body back.
    relocated: watch::Sender<Option<NodeId>>,
    /// A `krg run` relays for it now (a restart reattaches there).
    pub attached: std::sync::atomic::AtomicBool,
}

impl Deputy {
    pub fn state(&self) -> DeputyState {
        *self.state.borrow()
    }

    pub fn set_state(&self, s: DeputyState) {
        if matches!(s, DeputyState::Exited(_) | DeputyState::Lost) {
            *self.finished_ms.lock().unwrap_or_else(|p| p.into_inner()) = Some(now_ms());
        }
        self.state.send_replace(s);
    }

    /// A restart brought the body back on `node`.
    pub fn relocate(&self, node: NodeId) {
        self.relocated.send_replace(Some(node));
    }

    /// Waits for a restart; `None` if the record goes away.
    pub async fn wait_relocation(&self) -> Option<NodeId> {
        let mut rx = self.relocated.subscribe();
        let node = *rx.wait_for(Option::is_some).await.ok()?;
        self.relocated.send_replace(None);
        node
    }

    /// Its body runs (or is starting) as far as this record knows.
    pub fn is_running(&self) -> bool {
        matches!(self.state(), DeputyState::Running | DeputyState::Starting)
    }

    pub fn exec_node(&self) -> NodeId {
        *self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the job has ended (or is lost), at most `timeout`.
    pub async fn wait_end(&self, timeout: Duration) -> DeputyState {
        let mut rx = self.state.subscribe();
        let _ = tokio::time::timeout(
            timeout,
            rx.wait_for(|s| matches!(s, DeputyState::Exited(_) | DeputyState::Lost)),
        )
        .await;
        self.state()
    }

    pub fn info(&self) -> JobInfo {
        let (state, exit) = match self.state() {
            DeputyState::Starting | DeputyState::Running => (JobState::Running, None),
            DeputyState::Checkpointed => (JobState::Checkpointed, None),
            DeputyState::Lost => (JobState::Lost, None),
            DeputyState::Exited(s) => (JobState::Exited, Some(s)),
        };
        JobInfo {
            gpid: self.gpid,
            uid: self.uid,
            user: self.user.clone(),
            home: self.gpid.home_node(),
            node: Some(self.exec_node()),
            state,
            cpu_ns: 0,
            rss_bytes: 0,
            started_ms: self.started_ms,
            command: self.command.clone(),
            exit,
            from_body: false,
        }
    }

    /// May this caller signal, wait on or read this job?
    pub fn allows(&self, uid: u32) -> bool {
        uid == 0 || uid == self.uid
    }
}

/// Keeps the table of deputies bounded: old finished jobs are forgotten.
/// Returns the logs of the detached ones among them, for the caller to
/// remove: `krg logs` no longer reaches them, and they would stay for good.
pub fn prune_finished(deps: &mut HashMap<Gpid, Arc<Deputy>>, now: u64) -> Vec<PathBuf> {
    let finished = |d: &Deputy| *d.finished_ms.lock().unwrap_or_else(|p| p.into_inner());
    let mut logs = Vec::new();
    deps.retain(|_, d| {
        let keep = finished(d).is_none_or(|t| now.saturating_sub(t) < FINISHED_KEPT_MS);
        if !keep {
            logs.extend(d.log.clone());
        }
        keep
    });
    let mut done: Vec<(u64, Gpid)> = deps
        .values()
        .filter_map(|d| finished(d).map(|t| (t, d.gpid)))
        .collect();
    if done.len() > FINISHED_KEPT_MAX {
        done.sort();
        for (_, g) in done.iter().take(done.len() - FINISHED_KEPT_MAX) {
            if let Some(d) = deps.remove(g) {
                logs.extend(d.log.clone());
            }
        }
    }
    logs
}

/// The job a local process belongs to, from its cgroup (never from what
/// the process says).
pub fn job_of_pid(node: &Node, pid: i32) -> Option<Arc<super::body::BodyCtl>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let name = line.rsplit('/').find(|part| part.starts_with("job-"))?;
        let (home, seq) = name.strip_prefix("job-")?.split_once('-')?;
        let gpid = Gpid::new(home.parse().ok()?, seq.parse().ok()?).ok()?;
        node.jobs.body(gpid)
    })
}

/// Who the caller is, from the system's user database (never from the client).
fn resolve_user(uid: u32, gid: u32) -> (String, Vec<u32>) {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    match user {
        Some(u) => {
            let groups = std::ffi::CString::new(u.name.clone())
                .ok()
                .and_then(|name| {
                    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
                })
                .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|| vec![gid]);
            (u.name, groups)
        }
        None => (uid.to_string(), vec![gid]),
    }
}

fn failed(error: RemoteError, exit_code: i32) -> FromBody {
    FromBody::Failed { error, exit_code }
}

/// Serves `krg run` on its client connection until the job ends.
pub async fn run(
    node: Arc<Node>,
    caller: Caller,
    req: RunRequest,
    mut conn: FrameConn<UnixStream>,
) {
    let t0 = std::time::Instant::now();
    match start(&node, caller, &req).await {
        Err(frame) => {
            let _ = conn.send(&frame).await;
        }
        Ok((deputy, link, started)) => {
            if conn.send(&started).await.is_err() {
                // The caller is already gone: hang the job up.
                let _ = link.tx.send(ToBody::Hangup).await;
            }
            if req.detach {
                drop(conn);
                tokio::spawn(keep_detached(node.clone(), deputy, link));
            } else {
                let gpid = deputy.gpid;
                tracing::debug!(gpid = %gpid, us = t0.elapsed().as_micros(), "timing: deputy has started");
                relay(node.clone(), conn, deputy, link).await;
                tracing::debug!(gpid = %gpid, us = t0.elapsed().as_micros(), "timing: deputy done");
            }
        }
    }
}

/// Places, launches and waits for the job's first word.
async fn start(
    node: &Arc<Node>,
    caller: Caller,
    req: &RunRequest,
) -> Result<(Arc<Deputy>, BodyLink, FromBody), FromBody> {
    req.check()
        .map_err(|e| failed(RemoteError::new(ErrorCode::BadRequest, e.to_string()), 1))?;
    let parent = caller.pid.and_then(|pid| job_of_pid(node, pid));
    let mut caps = parent
        .as_ref()
        .map_or_else(Caps::default, |p| p.caps().for_child());
    for ch in &req.caps {
        caps.apply(*ch, caller.is_root()).map_err(|e| {
            failed(
                RemoteError::new(ErrorCode::PermissionDenied, e.to_string()),
                1,
            )
        })?;
    }
    if req.distant
        && !parent
            .as_ref()
            .is_some_and(|p| p.caps().has(Cap::DistantFork))
    {
        return Err(FromBody::RunHere {
            distant_fork: caps.has(Cap::DistantFork),
        });
    }
    let target = place::choose(node, req).map_err(|e| failed(e, 1))?;
    if req.distant && target == node.id {
        place::record(node, target);
        // It stays in its parent's job but with a child's capabilities:
        // whether its own children spread is what it would inherit.
        return Err(FromBody::RunHere {
            distant_fork: caps.has(Cap::DistantFork),
        });
    }
    let gpid = node
        .gpids
        .next()
        .map_err(|e| failed(RemoteError::new(ErrorCode::Refused, e.to_string()), 1))?;
    let (user, groups) = tokio::task::block_in_place(|| resolve_user(caller.uid, caller.gid));
    let spec = LaunchSpec {
        gpid,
        uid: caller.uid,
        gid: caller.gid,
        groups,
        user: user.clone(),
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        umask: req.umask,
        rlimits: req.rlimits.clone(),
        tty: req.tty,
        submitted_ms: now_ms(),
        caps,
        no_migrate: req.no_migrate,
        local_view: req.local_view,
        // `--node` says where to start; `--nodes` bounds where it may ever run.
        nodes: req.nodes.clone(),
    };
    let log = if req.detach {
        Some(node.log_path(gpid))
    } else {
        None
    };
    let (state, _) = watch::channel(DeputyState::Starting);
    let deputy = Arc::new(Deputy {
        gpid,
        uid: caller.uid,
        user,
        command: spec.command_line(),
        started_ms: spec.submitted_ms,
        detached: req.detach,
        log,
        node: Mutex::new(target),
        state,
        finished_ms: Mutex::new(None),
        relocated: watch::channel(None).0,
        attached: std::sync::atomic::AtomicBool::new(!req.detach),
    });
    place::record(node, target);
    if req.node.is_none() {
        let policy = node.state.read(|d| d.state.sched.placement.to_string());
        node.metrics
            .placements
            .get_or_create(&crate::metrics::Metrics::label(&[("policy", &policy)]))
            .inc();
        node.metrics
            .decisions
            .get_or_create(&crate::metrics::Metrics::label(&[("kind", "placement")]))
            .inc();
        let how = if req.distant { "distant exec: " } else { "" };
        node.events.record(
            "placement",
            format!(
                "{how}placed {gpid} ({}) on node {target}",
                spec.command_line()
            ),
        );
    }
    let mut link = if target == node.id {
        body::start(node, spec)
    } else {
        link::open(node, target, spec)
            .await
            .map_err(|e| failed(e, 255))?
    };
    match link.rx.recv().await {
        Some(started @ FromBody::Started { .. }) => {
            deputy.set_state(DeputyState::Running);
            node.jobs.deputy_insert(deputy.clone());
            Ok((deputy, link, started))
        }
        Some(f @ FromBody::Failed { .. }) => Err(f),
        _ => Err(failed(
            RemoteError::new(
                ErrorCode::Unavailable,
                format!("node {target} went away while starting the job"),
            ),
            255,
        )),
    }
}

/// Relays between the user's `krg run` and the body until the job ends.
/// Frames from the user are read by their own task, so a slow terminal
/// never holds back a signal; moves are handled by the [`DeputyLink`].
async fn relay(node: Arc<Node>, conn: FrameConn<UnixStream>, deputy: Arc<Deputy>, link: BodyLink) {
    let (mut sink, mut stream) = conn.into_inner().split();
    let (up_tx, mut up_rx) = mpsc::channel::<ToBody>(64);
    let up = tokio::spawn(async move {
        while let Some(Ok(frame)) = stream.next().await {
            match crate::wire::decode::<ToBody>(&frame) {
                Ok(ToBody::Launch(_) | ToBody::Reattach(_) | ToBody::Hold | ToBody::Release)
                | Err(_) => break,
                Ok(msg) => {
                    if up_tx.send(msg).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut dl = DeputyLink::new(node, deputy.clone(), link);
    let mut client_alive = true;
    loop {
        tokio::select! {
            m = up_rx.recv(), if client_alive => match m {
                Some(frame) => {
                    if let ToBody::Signal(sig) = frame {
                        tracing::debug!(gpid = %deputy.gpid, sig, "signal from the user");
                    }
                    dl.send(frame).await
                }
                None => {
                    client_alive = false;
                    if deputy.state() == DeputyState::Checkpointed {
                        // Saved and stopped: a restart will run it detached.
                        break;
                    }
                    // The user's `krg run` is gone: hang the job up, as sshd does.
                    dl.send(ToBody::Hangup).await;
                }
            },
            msg = dl.next() => {
                let Some(msg) = msg else { break };
                let end = end_state(&deputy, &msg);
                if client_alive {
                    match crate::wire::encode(&msg) {
                        Ok(bytes) => client_alive = sink.send(bytes).await.is_ok(),
                        Err(_) => client_alive = false,
                    }
                    if !client_alive {
                        dl.send(ToBody::Hangup).await;
                    }
                }
                if let Some(state) = end {
                    deputy.set_state(state);
                    break;
                }
            }
        }
    }
    deputy
        .attached
        .store(false, std::sync::atomic::Ordering::SeqCst);
    if matches!(deputy.state(), DeputyState::Running | DeputyState::Starting) {
        deputy.set_state(DeputyState::Lost);
    }
    up.abort();
}

/// A restart brought a job back on `target`: reattach its waiting `krg
/// run`, or keep it detached with its output in its log.
pub async fn relocated(
    node: &Arc<Node>,
    gpid: Gpid,
    target: NodeId,
    uid: u32,
    user: String,
    command: String,
) -> Result<(), RemoteError> {
    if let Some(d) = node.jobs.deputy(gpid) {
        if d.attached.load(std::sync::atomic::Ordering::SeqCst)
            && d.state() == DeputyState::Checkpointed
        {
            d.relocate(target);
            return Ok(());
        }
    }
    let link = link::reattach(node, target, gpid).await?;
    let (state, _) = watch::channel(DeputyState::Running);
    let deputy = Arc::new(Deputy {
        gpid,
        uid,
        user,
        command,
        started_ms: now_ms(),
        detached: true,
        log: Some(node.log_path(gpid)),
        node: Mutex::new(target),
        state,
        finished_ms: Mutex::new(None),
        relocated: watch::channel(None).0,
        attached: std::sync::atomic::AtomicBool::new(false),
    });
    node.jobs.deputy_insert(deputy.clone());
    tokio::spawn(keep_detached(node.clone(), deputy, link));
    Ok(())
}

fn end_state(deputy: &Deputy, msg: &FromBody) -> Option<DeputyState> {
    match msg {
        FromBody::Exited(s) => Some(DeputyState::Exited(*s)),
        FromBody::Lost { node } => {
            tracing::warn!(gpid = %deputy.gpid, node = %node, "job lost with its node");
            Some(DeputyState::Lost)
        }
        _ => None,
    }
}

/// A detached job: no stdin, its output appended to its log.
pub async fn keep_detached(node: Arc<Node>, deputy: Arc<Deputy>, link: BodyLink) {
    let mut dl = DeputyLink::new(node, deputy.clone(), link);
    dl.send(ToBody::StdinEof).await;
    let mut file = deputy.log.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(p)
            .map_err(|e| tracing::warn!(path = %p.display(), error = %e, "cannot open a job log"))
            .ok()
    });
    while let Some(msg) = dl.next().await {
        if let Some(state) = end_state(&deputy, &msg) {
            deputy.set_state(state);
            break;
        }
        match msg {
            FromBody::Stdout(b) | FromBody::Stderr(b) => {
                if let Some(f) = file.as_mut() {
                    let _ = tokio::task::block_in_place(|| f.write_all(&b));
                }
            }
            FromBody::Failed { error, .. } => {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "krg: {}", error.message);
                }
            }
            _ => {}
        }
    }
    if matches!(deputy.state(), DeputyState::Running | DeputyState::Starting) {
        deputy.set_state(DeputyState::Lost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deputy(seq: u64, log: Option<&str>, finished_ms: Option<u64>) -> Arc<Deputy> {
        let home = NodeId::new(1).expect("node 1");
        Arc::new(Deputy {
            gpid: Gpid::new(home, seq).expect("a gpid"),
            uid: 1000,
            user: "u".into(),
            command: "sleep 1".into(),
            started_ms: 0,
            detached: log.is_some(),
            log: log.map(PathBuf::from),
            node: Mutex::new(home),
            state: watch::channel(DeputyState::Running).0,
            finished_ms: Mutex::new(finished_ms),
            relocated: watch::channel(None).0,
            attached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[test]
    fn forgotten_detached_jobs_give_back_their_logs() {
        let now = 10 * FINISHED_KEPT_MS;
        let mut deps: HashMap<Gpid, Arc<Deputy>> = [
            deputy(1, Some("/logs/1-1.log"), Some(now - FINISHED_KEPT_MS - 1)),
            deputy(2, None, Some(now - FINISHED_KEPT_MS - 1)),
            deputy(3, Some("/logs/1-3.log"), Some(now - 1)),
            deputy(4, Some("/logs/1-4.log"), None),
        ]
        .into_iter()
        .map(|d| (d.gpid, d))
        .collect();
        let logs = prune_finished(&mut deps, now);
        assert_eq!(logs, vec![PathBuf::from("/logs/1-1.log")]);
        let mut left: Vec<u64> = deps.keys().map(|g| g.seq()).collect();
        left.sort();
        assert_eq!(left, vec![3, 4], "a recent end and a running job stay");
    }

    #[test]
    fn beyond_the_most_kept_the_oldest_ends_go_with_their_logs() {
        let now = 10 * FINISHED_KEPT_MS;
        let mut deps: HashMap<Gpid, Arc<Deputy>> = (1..=FINISHED_KEPT_MAX as u64 + 2)
            .map(|seq| {
                let log = format!("/logs/1-{seq}.log");
                let d = deputy(seq, Some(&log), Some(now - 1_000_000 + seq));
                (d.gpid, d)
            })
            .collect();
        let mut logs = prune_finished(&mut deps, now);
        logs.sort();
        assert_eq!(
            logs,
            vec![
                PathBuf::from("/logs/1-1.log"),
                PathBuf::from("/logs/1-2.log")
            ]
        );
        assert_eq!(deps.len(), FINISHED_KEPT_MAX);
    }
}
