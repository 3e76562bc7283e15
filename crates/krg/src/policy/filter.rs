//! Which nodes a decision may use at all.

use super::NodeSample;
use krg_types::NodeId;

/// A node may receive work if it is usable, has memory to spare, and is in
/// the job's allowed set (if it has one).
pub fn admits(n: &NodeSample, mem_free_min: u64, allowed: &[NodeId]) -> bool {
    n.usable && n.mem_free >= mem_free_min && (allowed.is_empty() || allowed.contains(&n.id))
}

/// The candidates for a job, in id order.
pub fn candidates(nodes: &[NodeSample], mem_free_min: u64, allowed: &[NodeId]) -> Vec<NodeSample> {
    let mut c: Vec<NodeSample> = nodes
        .iter()
        .filter(|n| admits(n, mem_free_min, allowed))
        .cloned()
        .collect();
    c.sort_by_key(|n| n.id);
    c
}
