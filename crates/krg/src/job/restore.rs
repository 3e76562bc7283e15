//! The restoring side of a move or a restart: a job comes back on this node
//! from its images, with new pipes (or a new pty) under the keys CRIU
//! recorded, the stdin it had not read, and this node's cluster view.
//!
//! Apart from `migrate` because the restored body's supervisor may itself
//! migrate and restore: the future returned here is boxed and declared
//! `Send`, which ends that cycle for the compiler.

use super::body::{supervise, BodyCtl, BodyLink, LINK_FRAMES_MAX};
use super::cgroup::JobCgroup;
use super::migrate::{RestoreJob, RestoreReply};
use super::stdio::{make_streams, JobEnds, Pumps, StatusReader};
use super::work_dir::WorkDir;
use crate::criu::{Criu, ExternalKey, InheritFd, LazyPagesRequest, RestoreRequest};
use crate::node::{now_ms, Node};
use crate::wire::{ErrorCode, RemoteError};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

fn refused(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorCode::Refused, msg)
}

fn internal(msg: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorCode::Internal, msg)
}

pub type Restoring<'a> =
    Pin<Box<dyn Future<Output = Result<RestoreReply, RemoteError>> + Send + 'a>>;

/// Brings a job back on this node from images; its body then waits for its
/// deputy to reattach.
pub fn restore_here(node: &Arc<Node>, job: RestoreJob) -> Restoring<'_> {
    Box::pin(restore_here_inner(node, job))
}

async fn restore_here_inner(
    node: &Arc<Node>,
    job: RestoreJob,
) -> Result<RestoreReply, RemoteError> {
    let started = Instant::now();
    let gpid = job.spec.gpid;
    let me = node.id;
    tracing::debug!(gpid = %gpid, "timing: restore asked");
    if let Some(body) = node.jobs.body(gpid) {
        // A job moved away with post-copy keeps its body here until its
        // last page has left.
        return Err(refused(if body.frozen.load(Ordering::SeqCst) {
            format!("job {gpid} is still leaving node {me} (a move or checkpoint of it is under way); try again once it is done")
        } else {
            format!("job {gpid} already runs on node {me}")
        }));
    }
    let cgroup = tokio::task::block_in_place(|| JobCgroup::create(&super::body::cgroup_name(gpid)))
        .map_err(|e| {
            internal(format!(
                "cannot restore job {gpid} on node {me}: its cgroup: {e}"
            ))
        })?;
    tracing::debug!(gpid = %gpid, us = started.elapsed().as_micros(), "timing: restore cgroup made");
    let result = restore_into(node, &job, &cgroup).await;
    let (io, status, pid, lazy, work) = match result {
        Ok(v) => v,
        Err(e) => {
            tokio::task::block_in_place(|| cgroup.remove());
            return Err(e);
        }
    };
    if let Some(view) = super::body::view_for(node, &job.spec) {
        let init = node.init_path.clone();
        let _ = tokio::task::spawn_blocking(move || {
            std::process::Command::new(init)
                .arg("--attach-view")
                .arg(view)
                .arg(pid.to_string())
                .status()
        })
        .await;
    }
    let (cmd_tx, cmd_rx) = mpsc::channel(4);
    let ctl = Arc::new(BodyCtl::new(
        node,
        job.spec.clone(),
        cgroup,
        cmd_tx,
        io.keys,
    ));
    ctl.init_pid.store(pid, Ordering::SeqCst);
    ctl.cpu_ns_before.store(job.cpu_ns, Ordering::SeqCst);
    // A restored job was running when it was saved.
    ctl.started.store(true, Ordering::SeqCst);
    let (to_tx, to_rx) = mpsc::channel(LINK_FRAMES_MAX);
    let (from_tx, from_rx) = mpsc::channel(LINK_FRAMES_MAX);
    let pumps = Pumps::start(io, ctl.clone(), to_rx, from_tx.clone());
    pumps.push_carry(job.carry);
    node.jobs.bodies_insert(ctl.clone());
    node.jobs.attach_slot_put(
        gpid,
        BodyLink {
            tx: to_tx,
            rx: from_rx,
        },
    );
    node.metrics
        .migrations
        .get_or_create(&crate::metrics::Metrics::label(&[
            ("direction", "in"),
            ("outcome", "ok"),
        ]))
        .inc();
    tokio::spawn(supervise(node.clone(), ctl, pumps, status, from_tx, cmd_rx));
    // The work directory (CRIU's logs) goes once every page is here; after
    // a failure it stays, for its logs.
    tokio::task::spawn_blocking(move || match lazy.map(|d| d.wait(LAZY_PAGES_TIMEOUT)) {
        None | Some(Ok(())) => work.done(),
        Some(Err(e)) => {
            tracing::warn!(gpid = %gpid, error = %e, dir = %work.path().display(), "the pages of a job moved here did not all arrive")
        }
    });
    tracing::info!(gpid = %gpid, pid, "job restored here");
    Ok(RestoreReply {
        pid,
        restore_ms: started.elapsed().as_millis() as u64,
    })
}

/// Longest a lazy-pages daemon may take to bring all of a job's pages.
const LAZY_PAGES_TIMEOUT: Duration = Duration::from_secs(3600);

type Restored = (
    super::stdio::BodyIo,
    StatusReader,
    i32,
    Option<crate::criu::LazyPages>,
    WorkDir,
);

async fn restore_into(
    node: &Arc<Node>,
    job: &RestoreJob,
    cgroup: &JobCgroup,
) -> Result<Restored, RemoteError> {
    let gpid = job.spec.gpid;
    let me = node.id;
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        internal(format!(
            "cannot restore job {gpid} on node {me}: {what}: {e}"
        ))
    };
    let started_at = Instant::now();
    let (ends, io, status) = make_streams(job.spec.tty).map_err(|e| fail("its streams", &e))?;
    let JobEnds {
        stdin,
        stdout,
        stderr,
        status: status_w,
    } = ends;
    let mut inherit: Vec<InheritFd> = Vec::new();
    let mut add = |key: ExternalKey, fd: i32| {
        if !inherit.iter().any(|i| i.key == key) {
            inherit.push(InheritFd { key, fd });
        }
    };
    add(job.keys.stdin, stdin.as_raw_fd());
    add(job.keys.stdout, stdout.as_raw_fd());
    add(job.keys.stderr, stderr.as_raw_fd());
    add(job.keys.status, status_w.as_raw_fd());
    let images = PathBuf::from(&job.images_dir);
    let work = WorkDir::make(&node.config.state_dir.join("criu"), gpid, now_ms())
        .map_err(|e| fail("a work directory", &e))?;
    let criu = node.criu.clone();
    let mut req = RestoreRequest::new(images.clone());
    req.gpid = Some(gpid);
    req.work_dir = Some(work.path().to_path_buf());
    req.inherit = inherit;
    req.join_cgroups = cgroup.dirs.clone();
    req.log_level = node.config.criu_log_level;
    req.lazy_pages = job.lazy.is_some();
    // CRIU starts at once and gets its request once the lazy-pages daemon
    // it connects to is ready: the two start-ups overlap.
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let c = criu.clone();
    let restore = tokio::task::spawn_blocking(move || c.restore_when(&req, go_rx));
    let mut daemon = None;
    if let Some((addr, port)) = &job.lazy {
        let mut lreq = LazyPagesRequest::new(images.clone(), addr.clone(), *port);
        lreq.gpid = Some(gpid);
        lreq.work_dir = Some(work.path().to_path_buf());
        lreq.log_level = node.config.criu_log_level;
        lreq.tls = Some(crate::criu::PageTls::in_state_dir(&node.config.state_dir));
        let started = tokio::task::spawn_blocking(move || criu.lazy_pages(&lreq))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match started {
            Ok(d) => daemon = Some(d),
            Err(e) => {
                // Called off: that CRIU is gone before the caller cleans up.
                drop(go_tx);
                let _ = restore.await;
                return Err(fail("the lazy-pages daemon", &e));
            }
        }
    }
    let daemon_ms = started_at.elapsed().as_millis();
    tracing::debug!(gpid = %gpid, us = started_at.elapsed().as_micros(), "timing: lazy-pages daemon ready");
    let _ = go_tx.send(true);
    let outcome = restore
        .await
        .map_err(|e| fail("criu", &e))?
        .map_err(|e| fail("criu", &e))?;
    drop((stdin, stdout, stderr, status_w));
    tracing::info!(gpid = %gpid, daemon_ms, restore_ms = started_at.elapsed().as_millis(), "restored by criu");
    Ok((io, status, outcome.pid, daemon, work))
}
