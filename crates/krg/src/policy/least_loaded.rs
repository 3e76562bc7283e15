//! Least loaded: the node with the lowest load per unit of capacity once
//! the new job is there (counting jobs already on their way), then the
//! fewest jobs per unit of capacity, then the lowest id. Counting the new
//! job matters with unequal nodes: on idle nodes the first job goes to the
//! fastest, not to whichever comes first.

use super::{NodeSample, Placement};
use krg_types::NodeId;

pub struct LeastLoaded;

fn key(n: &NodeSample) -> (f64, f64) {
    let cap = n.capacity.max(0.01);
    (
        (n.load + n.pending + 1.0) / cap,
        (f64::from(n.jobs) + n.pending + 1.0) / cap,
    )
}

impl Placement for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn place(&mut self, candidates: &[NodeSample]) -> Option<NodeId> {
        candidates
            .iter()
            .min_by(|a, b| {
                key(a)
                    .partial_cmp(&key(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.id.cmp(&b.id))
            })
            .map(|n| n.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sample;

    /// Places `n` jobs one after another, each counted as pending where it went.
    fn spread(nodes: &mut [NodeSample], n: usize) -> Vec<u32> {
        let mut p = LeastLoaded;
        let mut counts = vec![0u32; nodes.len()];
        for _ in 0..n {
            let id = p.place(nodes).unwrap();
            let i = nodes.iter().position(|x| x.id == id).unwrap();
            nodes[i].pending += 1.0;
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn equal_nodes_get_equal_shares() {
        let mut nodes = vec![
            sample(1, 1.0, 0.0),
            sample(2, 1.0, 0.0),
            sample(3, 1.0, 0.0),
        ];
        assert_eq!(spread(&mut nodes, 9), vec![3, 3, 3]);
    }

    #[test]
    fn unequal_capacities_get_proportional_shares() {
        let mut nodes = vec![
            sample(1, 0.25, 0.0),
            sample(2, 0.5, 0.0),
            sample(3, 1.0, 0.0),
        ];
        let c = spread(&mut nodes, 14);
        assert_eq!(c, vec![2, 4, 8]);
    }

    #[test]
    fn the_first_job_goes_to_the_fastest_idle_node() {
        let mut nodes = vec![
            sample(1, 0.25, 0.0),
            sample(2, 0.5, 0.0),
            sample(3, 1.0, 0.0),
        ];
        assert_eq!(spread(&mut nodes, 1), vec![0, 0, 1]);
    }
}
