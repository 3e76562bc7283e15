//! Cluster-wide operations on jobs, from any node: list, signal, wait,
//! read logs. Each finds the node that can answer (the execution node for
//! a body, the home node for a deputy's record) and asks it.

use super::home::DeputyState;
use super::{JobInfo, JobState};
use crate::node::Node;
use crate::wire::peer::{PeerRequest, PeerResponse, WaitResult};
use crate::wire::{ErrorCode, RemoteError};
use krg_types::{Gpid, NodeId, NodeState};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

/// Time a node has to answer a listing or a signal.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// One long poll of `krg wait`.
pub const WAIT_POLL: Duration = Duration::from_secs(20);
/// Bytes of log returned at once.
pub const LOG_CHUNK_BYTES_MAX: usize = 256 << 10;

fn not_found(gpid: Gpid) -> RemoteError {
    RemoteError::new(
        ErrorCode::NotFound,
        format!("no job {gpid} in this cluster"),
    )
}

fn denied(gpid: Gpid, owner: &str) -> RemoteError {
    RemoteError::new(
        ErrorCode::PermissionDenied,
        format!("permission denied: job {gpid} belongs to {owner}"),
    )
}

/// Members worth asking (not down, not left), with their addresses.
fn reachable_members(node: &Node) -> Vec<(NodeId, String)> {
    let recs: Vec<_> = node.state.read(|d| d.state.members().cloned().collect());
    recs.into_iter()
        .filter(|r| !matches!(node.shown_state(r), NodeState::Down | NodeState::Left))
        .map(|r| (r.id, r.addr))
        .collect()
}

fn addr_of(node: &Node, id: NodeId) -> Option<String> {
    node.state
        .read(|d| d.state.nodes.get(&id).map(|n| n.addr.clone()))
}

/// Jobs this node knows first-hand: the bodies it runs, and the deputies
/// it keeps whose body is not reported elsewhere (lost ones, mainly).
pub fn local_jobs(node: &Node) -> Vec<JobInfo> {
    let mut jobs: Vec<JobInfo> = node.jobs.bodies().iter().map(|b| b.info(node.id)).collect();
    for d in node.jobs.deputies() {
        if matches!(
            d.state(),
            DeputyState::Running
                | DeputyState::Starting
                | DeputyState::Lost
                | DeputyState::Checkpointed
        ) {
            jobs.push(d.info());
        }
    }
    jobs
}

/// Every job of the cluster; a body's own report wins over its deputy's.
pub async fn list_all(node: &Arc<Node>) -> Vec<JobInfo> {
    let mut asks = Vec::new();
    for (id, addr) in reachable_members(node) {
        if id == node.id {
            continue;
        }
        let node = node.clone();
        asks.push(tokio::spawn(async move {
            match node
                .peers
                .call(id, &addr, PeerRequest::ListJobs, ASK_TIMEOUT)
                .await
            {
                Ok(PeerResponse::Jobs(j)) => j,
                _ => Vec::new(),
            }
        }));
    }
    let mut all: Vec<JobInfo> = local_jobs(node);
    for a in asks {
        all.extend(a.await.unwrap_or_default());
    }
    let mut by_gpid: BTreeMap<Gpid, JobInfo> = BTreeMap::new();
    for j in all {
        let body_report = j.from_body;
        match by_gpid.get(&j.gpid) {
            Some(prev) if !body_report && prev.node.is_some() && prev.state != JobState::Lost => {}
            _ => {
                by_gpid.insert(j.gpid, j);
            }
        }
    }
    by_gpid.into_values().collect()
}

/// Signals a body running here, if the caller may.
pub fn signal_local(node: &Node, gpid: Gpid, sig: i32, uid: u32) -> Result<(), RemoteError> {
    let body = node.jobs.body(gpid).ok_or_else(|| not_found(gpid))?;
    if uid != 0 && uid != body.uid {
        return Err(denied(gpid, &body.user));
    }
    if !(0..=64).contains(&sig) {
        return Err(RemoteError::new(
            ErrorCode::BadRequest,
            format!("{sig} is not a signal number"),
        ));
    }
    body.signal(sig);
    Ok(())
}

/// Where the body of `gpid` runs, as its home node knows it.
async fn locate(node: &Arc<Node>, gpid: Gpid) -> Option<NodeId> {
    let home = gpid.home_node();
    if home == node.id {
        return node
            .jobs
            .deputy(gpid)
            .filter(|d| d.is_running())
            .map(|d| d.exec_node());
    }
    let addr = addr_of(node, home)?;
    match node
        .peers
        .call(home, &addr, PeerRequest::LocateJob { gpid }, ASK_TIMEOUT)
        .await
    {
        Ok(PeerResponse::Located(n)) => n,
        _ => None,
    }
}

/// Signals a job wherever it runs.
pub async fn signal(node: &Arc<Node>, gpid: Gpid, sig: i32, uid: u32) -> Result<(), RemoteError> {
    let mut candidates: Vec<(NodeId, String)> = Vec::new();
    if let Some(at) = locate(node, gpid).await {
        if let Some(addr) = addr_of(node, at) {
            candidates.push((at, addr));
        }
    }
    // The home node may be gone or not know: ask everyone.
    for m in reachable_members(node) {
        if !candidates.iter().any(|(id, _)| *id == m.0) {
            candidates.push(m);
        }
    }
    let mut last = not_found(gpid);
    for (id, addr) in candidates {
        let r = if id == node.id {
            signal_local(node, gpid, sig, uid)
        } else {
            match node
                .peers
                .call(
                    id,
                    &addr,
                    PeerRequest::SignalJob {
                        gpid,
                        signal: sig,
                        uid,
                    },
                    ASK_TIMEOUT,
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(crate::peer::PeerError::Remote(e)) => Err(e),
                Err(e) => Err(RemoteError::new(ErrorCode::Unavailable, e.to_string())),
            }
        };
        match r {
            Ok(()) => return Ok(()),
            Err(e) if e.code == ErrorCode::NotFound => last = e,
            Err(e) if e.code == ErrorCode::Unavailable => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(d) = node.jobs.deputy(gpid) {
        if d.state() == DeputyState::Lost {
            return Err(RemoteError::new(
                ErrorCode::Unavailable,
                format!("job {gpid} is lost: node {} went down", d.exec_node()),
            ));
        }
    }
    Err(last)
}

/// One long poll on the home node's record.
pub async fn wait_local(
    node: &Node,
    gpid: Gpid,
    uid: u32,
    timeout: Duration,
) -> Result<WaitResult, RemoteError> {
    let d = node.jobs.deputy(gpid).ok_or_else(|| not_found(gpid))?;
    if !d.allows(uid) {
        return Err(denied(gpid, &d.user));
    }
    Ok(match d.wait_end(timeout).await {
        DeputyState::Exited(s) => WaitResult::Exited(s),
        DeputyState::Lost => WaitResult::Lost(d.exec_node()),
        _ => WaitResult::Running,
    })
}

pub async fn wait_once(node: &Arc<Node>, gpid: Gpid, uid: u32) -> Result<WaitResult, RemoteError> {
    let home = gpid.home_node();
    if home == node.id {
        return wait_local(node, gpid, uid, WAIT_POLL).await;
    }
    let addr = addr_of(node, home).ok_or_else(|| not_found(gpid))?;
    let req = PeerRequest::WaitJob {
        gpid,
        uid,
        timeout_ms: WAIT_POLL.as_millis() as u64,
    };
    match node
        .peers
        .call(home, &addr, req, WAIT_POLL + ASK_TIMEOUT)
        .await
    {
        Ok(PeerResponse::Waited(w)) => Ok(w),
        Ok(_) => Err(RemoteError::new(ErrorCode::Internal, "unexpected answer")),
        Err(crate::peer::PeerError::Remote(e)) => Err(e),
        Err(e) => Err(RemoteError::new(
            ErrorCode::Unavailable,
            format!("the home node of job {gpid} is unreachable: {e}"),
        )),
    }
}

/// A chunk of a detached job's log, read on its home node.
pub fn read_log_local(
    node: &Node,
    gpid: Gpid,
    uid: u32,
    offset: u64,
) -> Result<(Vec<u8>, bool), RemoteError> {
    let d = node.jobs.deputy(gpid).ok_or_else(|| not_found(gpid))?;
    if !d.allows(uid) {
        return Err(denied(gpid, &d.user));
    }
    let Some(path) = &d.log else {
        return Err(RemoteError::new(
            ErrorCode::NotFound,
            format!("job {gpid} has no log: it was not started with --detach"),
        ));
    };
    let finished = matches!(d.state(), DeputyState::Exited(_) | DeputyState::Lost);
    let mut data = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.take(LOG_CHUNK_BYTES_MAX as u64).read_to_end(&mut data);
    }
    let done = finished && data.len() < LOG_CHUNK_BYTES_MAX;
    Ok((data, done))
}

pub async fn read_log(
    node: &Arc<Node>,
    gpid: Gpid,
    uid: u32,
    offset: u64,
) -> Result<(Vec<u8>, bool), RemoteError> {
    let home = gpid.home_node();
    if home == node.id {
        return read_log_local(node, gpid, uid, offset);
    }
    let addr = addr_of(node, home).ok_or_else(|| not_found(gpid))?;
    match node
        .peers
        .call(
            home,
            &addr,
            PeerRequest::ReadLog { gpid, uid, offset },
            ASK_TIMEOUT,
        )
        .await
    {
        Ok(PeerResponse::Log { data, done }) => Ok((data.into_vec(), done)),
        Ok(_) => Err(RemoteError::new(ErrorCode::Internal, "unexpected answer")),
        Err(crate::peer::PeerError::Remote(e)) => Err(e),
        Err(e) => Err(RemoteError::new(
            ErrorCode::Unavailable,
            format!("the home node of job {gpid} is unreachable: {e}"),
        )),
    }
}

/// Every node's decisions after `since_ms`, oldest first.
pub async fn events(node: &Arc<Node>, since_ms: u64) -> Vec<crate::events::Event> {
    let mut asks = Vec::new();
    for (id, addr) in reachable_members(node) {
        if id == node.id {
            continue;
        }
        let node = node.clone();
        asks.push(tokio::spawn(async move {
            match node
                .peers
                .call(id, &addr, PeerRequest::Events { since_ms }, ASK_TIMEOUT)
                .await
            {
                Ok(PeerResponse::Events(e)) => e,
                _ => Vec::new(),
            }
        }));
    }
    let mut all = node.events.since(since_ms);
    for a in asks {
        all.extend(a.await.unwrap_or_default());
    }
    all.sort_by_key(|e| (e.time_ms, e.node));
    all
}

/// Shows or changes the capabilities of a body running here.
pub fn caps_local(
    node: &Node,
    gpid: Gpid,
    uid: u32,
    changes: &[crate::job::caps::CapChange],
) -> Result<crate::job::caps::Caps, RemoteError> {
    let body = node.jobs.body(gpid).ok_or_else(|| not_found(gpid))?;
    if changes.is_empty() {
        return Ok(body.caps());
    }
    if uid != 0 && uid != body.uid {
        return Err(denied(gpid, &body.user));
    }
    body.change_caps(changes, uid == 0)
        .map_err(|e| RemoteError::new(ErrorCode::PermissionDenied, e.to_string()))
}

/// Shows or changes a job's capabilities wherever it runs.
pub async fn caps(
    node: &Arc<Node>,
    gpid: Gpid,
    uid: u32,
    changes: Vec<crate::job::caps::CapChange>,
) -> Result<crate::job::caps::Caps, RemoteError> {
    if node.jobs.body(gpid).is_some() {
        return caps_local(node, gpid, uid, &changes);
    }
    let at = locate(node, gpid).await.ok_or_else(|| not_found(gpid))?;
    let addr = addr_of(node, at).ok_or_else(|| not_found(gpid))?;
    match node
        .peers
        .call(
            at,
            &addr,
            PeerRequest::Caps { gpid, uid, changes },
            ASK_TIMEOUT,
        )
        .await
    {
        Ok(PeerResponse::Caps(c)) => Ok(c),
        Ok(_) => Err(RemoteError::new(ErrorCode::Internal, "unexpected answer")),
        Err(crate::peer::PeerError::Remote(e)) => Err(e),
        Err(e) => Err(RemoteError::new(ErrorCode::Unavailable, e.to_string())),
    }
}

/// Answers the body's supervisor gives may take this long (a large job's
/// dump, a lazy transfer's start).
const BODY_CMD_TIMEOUT: Duration = Duration::from_secs(600);

fn owner_check(body: &super::body::BodyCtl, gpid: Gpid, uid: u32) -> Result<(), RemoteError> {
    if uid != 0 && uid != body.uid {
        return Err(denied(gpid, &body.user));
    }
    Ok(())
}

pub async fn migrate_local(
    node: &Node,
    gpid: Gpid,
    target: NodeId,
    mode: super::migrate::MigrateMode,
    uid: u32,
) -> Result<super::migrate::MigrationReport, RemoteError> {
    let body = node.jobs.body(gpid).ok_or_else(|| not_found(gpid))?;
    owner_check(&body, gpid, uid)?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    body.cmd
        .send(super::migrate::BodyCmd::Migrate {
            target,
            mode,
            reply,
        })
        .await
        .map_err(|_| not_found(gpid))?;
    tokio::time::timeout(BODY_CMD_TIMEOUT, rx)
        .await
        .map_err(|_| {
            RemoteError::new(
                ErrorCode::Internal,
                format!("the migration of job {gpid} did not finish in time"),
            )
        })?
        .map_err(|_| {
            RemoteError::new(
                ErrorCode::Internal,
                format!("job {gpid} ended while migrating"),
            )
        })?
}

pub async fn checkpoint_local(
    node: &Node,
    gpid: Gpid,
    after: super::migrate::CheckpointAfter,
    uid: u32,
) -> Result<crate::image::ImageRecord, RemoteError> {
    let body = node.jobs.body(gpid).ok_or_else(|| not_found(gpid))?;
    owner_check(&body, gpid, uid)?;
    let (reply, rx) = tokio::sync::oneshot::channel();
    body.cmd
        .send(super::migrate::BodyCmd::Checkpoint { after, reply })
        .await
        .map_err(|_| not_found(gpid))?;
    tokio::time::timeout(BODY_CMD_TIMEOUT, rx)
        .await
        .map_err(|_| {
            RemoteError::new(
                ErrorCode::Internal,
                format!("the checkpoint of job {gpid} did not finish in time"),
            )
        })?
        .map_err(|_| {
            RemoteError::new(
                ErrorCode::Internal,
                format!("job {gpid} ended while checkpointing"),
            )
        })?
}

/// Where the body runs: here, or as its home node says, or by asking all.
async fn body_node(node: &Arc<Node>, gpid: Gpid) -> Option<NodeId> {
    if node.jobs.body(gpid).is_some() {
        return Some(node.id);
    }
    if let Some(at) = locate(node, gpid).await {
        return Some(at);
    }
    list_all(node)
        .await
        .into_iter()
        .find(|j| j.gpid == gpid && j.from_body)
        .and_then(|j| j.node)
}

fn remote(e: crate::peer::PeerError) -> RemoteError {
    match e {
        crate::peer::PeerError::Remote(e) => e,
        e => RemoteError::new(ErrorCode::Unavailable, e.to_string()),
    }
}

pub async fn migrate(
    node: &Arc<Node>,
    gpid: Gpid,
    target: NodeId,
    mode: super::migrate::MigrateMode,
    uid: u32,
) -> Result<super::migrate::MigrationReport, RemoteError> {
    on_body_node(
        node,
        gpid,
        || migrate_local(node, gpid, target, mode, uid),
        || PeerRequest::Migrate {
            gpid,
            target,
            mode,
            uid,
        },
        |r| match r {
            PeerResponse::Migrated(r) => Some(r),
            _ => None,
        },
    )
    .await
}

/// Runs an operation where the job's body runs: `local` if here, else
/// `request` to that node, whose answer `answer` unpacks. The body may
/// have just moved: a node that no longer has it makes us look again,
/// once, by asking every node.
async fn on_body_node<T, Fut>(
    node: &Arc<Node>,
    gpid: Gpid,
    local: impl Fn() -> Fut,
    request: impl Fn() -> PeerRequest,
    answer: fn(PeerResponse) -> Option<T>,
) -> Result<T, RemoteError>
where
    Fut: std::future::Future<Output = Result<T, RemoteError>>,
{
    let mut at = body_node(node, gpid).await.ok_or_else(|| not_found(gpid))?;
    for attempt in 0..2 {
        let r = if at == node.id {
            local().await
        } else {
            let addr = addr_of(node, at).ok_or_else(|| not_found(gpid))?;
            node.peers
                .call(at, &addr, request(), BODY_CMD_TIMEOUT)
                .await
                .map_err(remote)
                .and_then(|r| {
                    answer(r)
                        .ok_or_else(|| RemoteError::new(ErrorCode::Internal, "unexpected answer"))
                })
        };
        match r {
            Err(e) if e.code == ErrorCode::NotFound && attempt == 0 => {
                at = find_body(node, gpid).await.ok_or_else(|| not_found(gpid))?;
            }
            other => return other,
        }
    }
    Err(not_found(gpid))
}

/// The node whose body report names the job, asking every node.
async fn find_body(node: &Arc<Node>, gpid: Gpid) -> Option<NodeId> {
    list_all(node)
        .await
        .into_iter()
        .find(|j| j.gpid == gpid && j.from_body)
        .and_then(|j| j.node)
}

pub async fn checkpoint(
    node: &Arc<Node>,
    gpid: Gpid,
    after: super::migrate::CheckpointAfter,
    uid: u32,
) -> Result<crate::image::ImageRecord, RemoteError> {
    on_body_node(
        node,
        gpid,
        || checkpoint_local(node, gpid, after, uid),
        || PeerRequest::Checkpoint { gpid, after, uid },
        |r| match r {
            PeerResponse::ImageSaved(r) => Some(r),
            _ => None,
        },
    )
    .await
}

/// Images the caller may see: all for root, their own otherwise (images
/// hold memory contents).
pub fn images(node: &Node, gpid: Option<Gpid>, uid: u32) -> Vec<crate::image::ImageRecord> {
    node.state.read(|d| {
        d.state
            .images
            .values()
            .filter(|r| gpid.is_none_or(|g| g == r.gpid))
            .filter(|r| uid == 0 || r.uid == uid)
            .cloned()
            .collect()
    })
}

fn image_record(
    node: &Node,
    gpid: Gpid,
    version: Option<u32>,
    uid: u32,
) -> Result<crate::image::ImageRecord, RemoteError> {
    let all: Vec<crate::image::ImageRecord> = node.state.read(|d| {
        d.state
            .images
            .values()
            .filter(|r| r.gpid == gpid)
            .cloned()
            .collect()
    });
    let rec = match version {
        Some(v) => all.into_iter().find(|r| r.version == v),
        None => all.into_iter().max_by_key(|r| r.version),
    };
    let rec = rec.ok_or_else(|| {
        RemoteError::new(
            ErrorCode::NotFound,
            match version {
                Some(v) => format!("job {gpid} has no image version {v} (see krg images {gpid})"),
                None => format!("job {gpid} has no image (see krg images)"),
            },
        )
    })?;
    if uid != 0 && uid != rec.uid {
        return Err(denied(gpid, &rec.user));
    }
    Ok(rec)
}

pub async fn images_rm(
    node: &Arc<Node>,
    gpid: Gpid,
    version: Option<u32>,
    uid: u32,
) -> Result<(), RemoteError> {
    let versions: Vec<crate::image::ImageRecord> = match version {
        Some(_) => vec![image_record(node, gpid, version, uid)?],
        None => {
            let all = images(node, Some(gpid), 0);
            if all.is_empty() {
                return Err(RemoteError::new(
                    ErrorCode::NotFound,
                    format!("job {gpid} has no image"),
                ));
            }
            for r in &all {
                if uid != 0 && uid != r.uid {
                    return Err(denied(gpid, &r.user));
                }
            }
            all
        }
    };
    for r in versions {
        let path = std::path::PathBuf::from(&r.path);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(path)).await;
        node.propose(crate::cluster::types::Command::RemoveImage {
            gpid,
            version: r.version,
        })
        .await?;
    }
    Ok(())
}

/// Where a restart goes: the node asked for, or the placement's choice;
/// either only if it has the files the job used (`needed_files`). A choice
/// that lacks them gives way to the node the job was saved on.
async fn restart_target(
    node: &Arc<Node>,
    gpid: Gpid,
    pinned: Option<NodeId>,
    meta: &crate::image::ImageMeta,
) -> Result<(NodeId, String), RemoteError> {
    let check = |target: NodeId| async move {
        let addr = addr_of(node, target).ok_or_else(|| not_found(gpid))?;
        let doing = format!("restart job {gpid} on node {target}");
        let files = meta.files.clone();
        let refuse = super::needed_files::LackedMount::Refuse;
        super::needed_files::check_target(node, &doing, target, &addr, files, refuse)
            .await
            .map(|_| (target, addr))
    };
    let target = super::place::choose_among(node, pinned, &[])?;
    let refused = match check(target).await {
        Err(e) if e.code == ErrorCode::Refused && target != meta.node => e,
        other => return other,
    };
    let saved_on = meta.node;
    if pinned.is_none() && super::place::is_up(node, saved_on).is_ok() {
        if let Ok(found) = check(saved_on).await {
            return Ok(found);
        }
    }
    Err(RemoteError::new(
        ErrorCode::Refused,
        format!(
            "{}; it was saved on node {saved_on} (try --node {saved_on})",
            refused.message
        ),
    ))
}

/// Brings a job back from an image, on the node asked or chosen.
pub async fn restart(
    node: &Arc<Node>,
    gpid: Gpid,
    version: Option<u32>,
    target: Option<NodeId>,
    uid: u32,
) -> Result<(u32, NodeId), RemoteError> {
    let rec = image_record(node, gpid, version, uid)?;
    let running = list_all(node)
        .await
        .into_iter()
        .find(|j| j.gpid == gpid && j.from_body);
    if let Some(at) = running.and_then(|j| j.node) {
        return Err(RemoteError::new(
            ErrorCode::Refused,
            format!("job {gpid} is still running on node {at}: a job runs once (krg kill it, or checkpoint it with --kill)"),
        ));
    }
    let dir = std::path::PathBuf::from(&rec.path);
    let meta = tokio::task::spawn_blocking(move || {
        crate::image::check_untampered(&dir).map_err(|e| (ErrorCode::Refused, e))?;
        crate::image::read_meta(&dir).map_err(|e| (ErrorCode::NotFound, e))
    })
    .await
    .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?
    .map_err(|(code, e)| RemoteError::new(code, format!("cannot restart job {gpid}: {e}")))?;
    // The replicated record says whose image it is; the file must agree.
    if meta.gpid != gpid || meta.spec.uid != rec.uid {
        return Err(RemoteError::new(
            ErrorCode::Refused,
            format!(
                "cannot restart job {gpid}: the image in {} is of job {} of uid {}, but the cluster recorded job {gpid} of uid {}",
                rec.path, meta.gpid, meta.spec.uid, rec.uid
            ),
        ));
    }
    let (target, addr) = restart_target(node, gpid, target, &meta).await?;
    let job = super::migrate::RestoreJob {
        spec: meta.spec.clone(),
        images_dir: rec.path.clone(),
        keys: meta.keys,
        carry: meta.carry,
        lazy: None,
        cpu_ns: meta.cpu_ns,
    };
    if target == node.id {
        super::migrate::restore_here(node, job).await?;
    } else {
        node.peers
            .call(
                target,
                &addr,
                PeerRequest::Restore(Box::new(job)),
                BODY_CMD_TIMEOUT,
            )
            .await
            .map_err(remote)?;
    }
    let home = gpid.home_node();
    let (user, command) = (meta.spec.user.clone(), meta.spec.command_line());
    if home == node.id {
        super::home::relocated(node, gpid, target, meta.spec.uid, user, command).await?;
    } else {
        let addr = addr_of(node, home).ok_or_else(|| not_found(gpid))?;
        let req = PeerRequest::Relocated {
            gpid,
            node: target,
            uid: meta.spec.uid,
            user,
            command,
        };
        node.peers
            .call(home, &addr, req, ASK_TIMEOUT * 5)
            .await
            .map_err(remote)?;
    }
    node.events.record(
        "restart",
        format!(
            "restarted {gpid} from version {} on node {target}",
            rec.version
        ),
    );
    Ok((rec.version, target))
}
