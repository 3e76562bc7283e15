//! Consolidation: fill the fewest nodes first, and move jobs off lightly
//! used nodes onto busier ones that still have room, so that idle nodes can
//! be powered down.

use super::config::SchedConfig;
use super::{Balancer, JobSample, Move, NodeSample, Placement};
use krg_types::NodeId;

/// Room a node has left, in CPUs.
fn room(n: &NodeSample) -> f64 {
    n.capacity - (n.load + n.pending)
}

pub struct PackPlacement;

impl Placement for PackPlacement {
    fn name(&self) -> &'static str {
        "pack"
    }

    /// The busiest node that still has a whole CPU... or any room at all;
    /// if none has room, the least loaded.
    fn place(&mut self, candidates: &[NodeSample]) -> Option<NodeId> {
        let with_room = candidates
            .iter()
            .filter(|n| room(n) >= 1.0_f64.min(n.capacity) - 1e-9)
            .max_by(|a, b| {
                (a.load + a.pending)
                    .partial_cmp(&(b.load + b.pending))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(b.id.cmp(&a.id))
            });
        with_room
            .map(|n| n.id)
            .or_else(|| super::least_loaded::LeastLoaded.place(candidates))
    }
}

pub struct PackBalancer {
    cfg: SchedConfig,
}

impl PackBalancer {
    pub fn new(cfg: SchedConfig) -> Self {
        PackBalancer { cfg }
    }
}

impl Balancer for PackBalancer {
    fn name(&self) -> &'static str {
        "pack"
    }

    /// A lightly used node (less than half its capacity busy) gives a job
    /// to the busiest other node that has room for it.
    fn decide(&mut self, me: NodeId, nodes: &[NodeSample], jobs: &[JobSample]) -> Vec<Move> {
        let Some(mine) = nodes.iter().find(|n| n.id == me) else {
            return vec![];
        };
        if mine.load + mine.pending > mine.capacity / 2.0 + 1e-9 {
            return vec![];
        }
        let mut candidates: Vec<&JobSample> = jobs
            .iter()
            .filter(|j| j.movable && j.resident_ms >= self.cfg.min_residence_ms)
            .collect();
        candidates.sort_by_key(|j| (j.rss_bytes, j.gpid));
        for job in candidates {
            let need = job.cpu.clamp(0.1, 1.0);
            let target = nodes
                .iter()
                .filter(|n| n.usable && n.id != me && room(n) >= need)
                .filter(|n| (n.load + n.pending) > (mine.load + mine.pending))
                .filter(|n| job.allowed.is_empty() || job.allowed.contains(&n.id))
                .filter(|n| n.mem_free >= self.cfg.mem_free_min_bytes.saturating_add(job.rss_bytes))
                .max_by(|a, b| {
                    (a.load + a.pending)
                        .partial_cmp(&(b.load + b.pending))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(b.id.cmp(&a.id))
                });
            if let Some(t) = target {
                return vec![Move {
                    gpid: job.gpid,
                    source: me,
                    target: t.id,
                    reason: format!(
                        "packed {} from node {} (load {:.1}/{:.2}) onto node {} (load {:.1}/{:.2}) so node {} can idle",
                        job.gpid,
                        me,
                        mine.load + mine.pending,
                        mine.capacity,
                        t.id,
                        t.load + t.pending,
                        t.capacity,
                        me
                    ),
                }];
            }
        }
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sample;

    #[test]
    fn pack_fills_one_node_before_the_next() {
        let mut nodes = vec![
            sample(1, 2.0, 0.0),
            sample(2, 2.0, 0.0),
            sample(3, 2.0, 0.0),
        ];
        let mut p = PackPlacement;
        let mut got = vec![];
        for _ in 0..5 {
            let id = p.place(&nodes).unwrap();
            nodes[usize::from(id.get()) - 1].pending += 1.0;
            got.push(id.get());
        }
        assert_eq!(got, vec![1, 1, 2, 2, 3]);
    }
}
