//! The cluster view: a FUSE file system served by each krgd (mounted at
//! /run/krg/view by default) with the cluster as one machine's /proc files
//! (`render`), per-node and per-job directories (`fs`). Jobs get its files
//! bind-mounted over their /proc and /sys files by krg-init, as LXCFS does
//! for containers.
//!
//! The FUSE threads never wait on the network: they read a cache that a
//! task refreshes about once a second while somebody reads the view.

pub mod fs;
pub mod render;

use crate::job::JobInfo;
use crate::node::Node;
use crate::wire::peer::{PeerRequest, PeerResponse};
use krg_types::{NodeId, NodeState};
use render::ProcTexts;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the cache is refreshed while the view is in use.
const REFRESH: Duration = Duration::from_secs(1);
/// The view stays fresh this long after its last read.
const IN_USE: Duration = Duration::from_secs(10);
/// A read older than this waits for a refresh (up to `STALE_WAIT`).
const STALE: Duration = Duration::from_secs(3);
const STALE_WAIT: Duration = Duration::from_secs(1);
/// While nobody reads the view it is still refreshed this often, so a
/// first read after a quiet while is not served from old news.
const IDLE_REFRESH: Duration = Duration::from_secs(10);
/// A node's texts are asked for with this timeout.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Default)]
pub struct Snapshot {
    /// Up nodes, in id order, with their /proc texts.
    pub nodes: Vec<(NodeId, Arc<ProcTexts>)>,
    /// Every member and its state (for nodes/<id>/state).
    pub states: Vec<(NodeId, NodeState)>,
    pub jobs: Vec<JobInfo>,
    pub taken: Option<Instant>,
    /// Every node shown up answered.
    pub complete: bool,
}

impl Snapshot {
    fn fresh(&self) -> bool {
        self.complete && self.taken.is_some_and(|t| t.elapsed() <= STALE)
    }
}

/// Shared between the refresher task and the FUSE threads.
#[derive(Default)]
pub struct ViewCache {
    snap: Mutex<Snapshot>,
    last_read: Mutex<Option<Instant>>,
    refreshed: Condvar,
    /// Capabilities of the jobs running here, always current (the preload
    /// library reads them at every exec).
    local_caps: Mutex<std::collections::HashMap<krg_types::Gpid, crate::job::caps::Caps>>,
}

impl ViewCache {
    pub fn set_caps(&self, gpid: krg_types::Gpid, caps: Option<crate::job::caps::Caps>) {
        let mut m = self.local_caps.lock().unwrap_or_else(|p| p.into_inner());
        match caps {
            Some(c) => m.insert(gpid, c),
            None => m.remove(&gpid),
        };
    }

    pub fn local_gpids(&self) -> Vec<krg_types::Gpid> {
        self.local_caps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    pub fn caps(&self, gpid: krg_types::Gpid) -> Option<crate::job::caps::Caps> {
        self.local_caps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gpid)
            .copied()
    }

    /// The latest snapshot; waits a little for a fresh one if it is stale.
    pub fn get(&self) -> Snapshot {
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        let guard = self.snap.lock().unwrap_or_else(|p| p.into_inner());
        if !guard.fresh() {
            let (guard, _) = self
                .refreshed
                .wait_timeout_while(guard, STALE_WAIT, |s| !s.fresh())
                .unwrap_or_else(|p| p.into_inner());
            return guard.clone();
        }
        guard.clone()
    }

    /// The latest snapshot as it is, without waiting: enough to list
    /// directories and look names up.
    pub fn peek(&self) -> Snapshot {
        *self.last_read.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.snap.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn in_use(&self) -> bool {
        self.last_read
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < IN_USE)
    }

    fn put(&self, s: Snapshot) {
        *self.snap.lock().unwrap_or_else(|p| p.into_inner()) = s;
        self.refreshed.notify_all();
    }
}

/// Keeps the cache fresh while the view is read.
pub async fn refresh_loop(node: Arc<Node>, cache: Arc<ViewCache>) {
    let mut last: Vec<(NodeId, Arc<ProcTexts>, Instant)> = Vec::new();
    let mut taken: Option<Instant> = None;
    let mut complete = false;
    let mut changed = node.state.changed.subscribe();
    loop {
        let every = if !complete {
            REFRESH / 4
        } else if cache.in_use() {
            REFRESH
        } else {
            IDLE_REFRESH
        };
        let due = taken.is_none_or(|t| t.elapsed() >= every);
        if due {
            let snap = take(&node, &mut last).await;
            // A node that did not answer (just joined, busy) is asked
            // again soon, whether or not anyone reads the view.
            complete = snap.complete;
            cache.put(snap);
            taken = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH / 4) => {}
            // A node joined, went down or came back: the view changes now.
            _ = changed.changed() => taken = None,
        }
    }
}

/// Asks every up node for its texts; a node that does not answer keeps its
/// last texts for a moment (it may only be slow), then drops out.
async fn take(node: &Arc<Node>, last: &mut Vec<(NodeId, Arc<ProcTexts>, Instant)>) -> Snapshot {
    let recs: Vec<_> = node.state.read(|d| d.state.members().cloned().collect());
    let states: Vec<(NodeId, NodeState)> =
        recs.iter().map(|r| (r.id, node.shown_state(r))).collect();
    let mut asks = Vec::new();
    for r in recs.iter().filter(|r| r.state == NodeState::Up) {
        let node = node.clone();
        let (id, addr) = (r.id, r.addr.clone());
        asks.push(tokio::spawn(async move {
            if id == node.id {
                let t = tokio::task::spawn_blocking(ProcTexts::read_local)
                    .await
                    .ok();
                return (id, t);
            }
            match node
                .peers
                .call(id, &addr, PeerRequest::ProcTexts, ASK_TIMEOUT)
                .await
            {
                Ok(PeerResponse::ProcTexts(t)) if t.fits() => (id, Some(*t)),
                _ => (id, None),
            }
        }));
    }
    let now = Instant::now();
    let mut nodes = Vec::new();
    for a in asks {
        let Ok((id, texts)) = a.await else { continue };
        match texts {
            Some(t) => {
                let t = Arc::new(t);
                last.retain(|(n, _, _)| *n != id);
                last.push((id, t.clone(), now));
                nodes.push((id, t));
            }
            None => {
                if let Some((_, t, at)) = last.iter().find(|(n, _, _)| *n == id) {
                    if now.duration_since(*at) < STALE {
                        nodes.push((id, t.clone()));
                    }
                }
            }
        }
    }
    nodes.sort_by_key(|(id, _)| *id);
    let jobs = crate::job::ops::list_all(node).await;
    let complete = states
        .iter()
        .filter(|(_, s)| *s == NodeState::Up)
        .all(|(id, _)| nodes.iter().any(|(n, _)| n == id));
    Snapshot {
        nodes,
        states,
        jobs,
        taken: Some(Instant::now()),
        complete,
    }
}
