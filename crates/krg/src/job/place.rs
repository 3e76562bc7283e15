//! Where a new job runs: the node the user named, or the one the cluster's
//! placement policy picks (`policy::`), among usable nodes that pass the
//! filters, counting the jobs this node placed in the last moments, which
//! gossip has not reported yet.

use crate::node::Node;
use crate::policy::{filter, NodeSample};
use crate::wire::{ErrorCode, RemoteError};
use krg_types::{NodeId, NodeState};
use std::time::{Duration, Instant};

/// How long a placement counts before gossip is trusted to include it.
const RECENT: Duration = Duration::from_secs(3);
/// Placements remembered at most.
const RECENT_MAX: usize = 4096;

fn member_ids(node: &Node) -> Vec<NodeId> {
    node.state
        .read(|d| d.state.members().map(|n| n.id).collect())
}

/// Node `id` exists and is up, or why it cannot take a job.
pub fn is_up(node: &Node, id: NodeId) -> Result<(), RemoteError> {
    let rec = node.state.read(|d| d.state.nodes.get(&id).cloned());
    let Some(rec) = rec else {
        let ids: Vec<String> = member_ids(node).iter().map(|i| i.to_string()).collect();
        return Err(RemoteError::new(
            ErrorCode::NotFound,
            format!(
                "there is no node {id} in this cluster (nodes: {})",
                ids.join(",")
            ),
        ));
    };
    match node.shown_state(&rec) {
        NodeState::Up => Ok(()),
        s => Err(RemoteError::new(
            ErrorCode::Unavailable,
            format!("node {id} is {s}"),
        )),
    }
}

/// The scheduler's view of every member, from gossip and recent placements.
pub fn samples(node: &Node) -> Vec<NodeSample> {
    let now = Instant::now();
    let recent: Vec<NodeId> = {
        let r = node.placements.lock().unwrap_or_else(|p| p.into_inner());
        r.iter()
            .filter(|(_, t)| now.duration_since(*t) < RECENT)
            .map(|(n, _)| *n)
            .collect()
    };
    member_ids(node)
        .into_iter()
        .map(|id| {
            let load = node.view().load(id).cloned().unwrap_or_default();
            NodeSample {
                id,
                usable: is_up(node, id).is_ok(),
                capacity: if load.capacity > 0.0 {
                    load.capacity
                } else {
                    1.0
                },
                load: load.load_short,
                jobs: load.jobs,
                mem_free: load.mem_free,
                pending: recent.iter().filter(|n| **n == id).count() as f64,
            }
        })
        .collect()
}

pub fn choose(node: &Node, req: &crate::job::spec::RunRequest) -> Result<NodeId, RemoteError> {
    choose_among(node, req.node, &req.nodes)
}

/// The node asked for if it is up, else the policy's pick among `allowed`
/// (all nodes if empty).
pub fn choose_among(
    node: &Node,
    pinned: Option<NodeId>,
    allowed: &[NodeId],
) -> Result<NodeId, RemoteError> {
    if let Some(n) = pinned {
        is_up(node, n)?;
        return Ok(n);
    }
    for n in allowed {
        if node.state.read(|d| !d.state.nodes.contains_key(n)) {
            is_up(node, *n)?;
        }
    }
    let mem_min = node.state.read(|d| d.state.sched.mem_free_min_bytes);
    let all = samples(node);
    let mut candidates = filter::candidates(&all, mem_min, allowed);
    if candidates.is_empty() {
        // Memory is short everywhere: any usable node is better than none.
        candidates = filter::candidates(&all, 0, allowed);
    }
    node.placement()
        .place(&candidates)
        .ok_or_else(|| RemoteError::new(ErrorCode::Unavailable, "no node is up to run the job"))
}

pub fn record(node: &Node, target: NodeId) {
    let mut r = node.placements.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    while r
        .front()
        .is_some_and(|(_, t)| now.duration_since(*t) >= RECENT)
        || r.len() >= RECENT_MAX
    {
        r.pop_front();
    }
    r.push_back((target, now));
}
