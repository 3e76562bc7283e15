//! Round robin: each new job on the next node, in id order.

use super::{NodeSample, Placement};
use krg_types::NodeId;

#[derive(Default)]
pub struct RoundRobin {
    last: Option<NodeId>,
}

impl Placement for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn place(&mut self, candidates: &[NodeSample]) -> Option<NodeId> {
        let next = candidates
            .iter()
            .find(|n| self.last.is_none_or(|l| n.id > l))
            .or_else(|| candidates.first())?
            .id;
        self.last = Some(next);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sample;

    #[test]
    fn cycles_through_the_candidates() {
        let nodes = vec![
            sample(1, 1.0, 5.0),
            sample(2, 1.0, 0.0),
            sample(3, 1.0, 0.0),
        ];
        let mut rr = RoundRobin::default();
        let got: Vec<u16> = (0..5).map(|_| rr.place(&nodes).unwrap().get()).collect();
        assert_eq!(got, vec![1, 2, 3, 1, 2]);
        assert_eq!(rr.place(&[]), None);
    }
}
