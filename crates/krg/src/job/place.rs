//! Where a new job runs: the node the user named, or the least loaded up
//! node (jobs per unit of CPU capacity, counting the jobs this node placed
//! in the last moments, which gossip has not reported yet).
//! The scheduler issue replaces this with pluggable policies.

use crate::node::Node;
use crate::wire::{ErrorCode, RemoteError};
use krg_types::{NodeId, NodeState};
use std::time::{Duration, Instant};

/// How long a placement counts before gossip is trusted to include it.
const RECENT: Duration = Duration::from_secs(2);
/// Placements remembered at most.
const RECENT_MAX: usize = 4096;

fn member_ids(node: &Node) -> Vec<NodeId> {
    node.state
        .read(|d| d.state.members().map(|n| n.id).collect())
}

fn is_up(node: &Node, id: NodeId) -> Result<(), RemoteError> {
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

pub fn choose(node: &Node, req: &crate::job::spec::RunRequest) -> Result<NodeId, RemoteError> {
    if let Some(n) = req.node {
        is_up(node, n)?;
        return Ok(n);
    }
    let allowed: Vec<NodeId> = if req.nodes.is_empty() {
        member_ids(node)
    } else {
        for n in &req.nodes {
            if node.state.read(|d| !d.state.nodes.contains_key(n)) {
                is_up(node, *n)?;
            }
        }
        req.nodes.clone()
    };
    let now = Instant::now();
    let recent: Vec<NodeId> = {
        let r = node.placements.lock().unwrap_or_else(|p| p.into_inner());
        r.iter()
            .filter(|(_, t)| now.duration_since(*t) < RECENT)
            .map(|(n, _)| *n)
            .collect()
    };
    let mut best: Option<(f64, f64, NodeId)> = None;
    for id in allowed {
        if is_up(node, id).is_err() {
            continue;
        }
        let load = node.view().load(id).cloned().unwrap_or_default();
        let capacity = if load.capacity > 0.0 {
            load.capacity
        } else {
            1.0
        };
        let jobs = f64::from(load.jobs) + recent.iter().filter(|n| **n == id).count() as f64;
        let score = (jobs / capacity, load.load1 / capacity, id);
        if best.is_none_or(|b| (score.0, score.1) < (b.0, b.1)) {
            best = Some(score);
        }
    }
    best.map(|b| b.2)
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
