//! What the raft leader does for the cluster, every half second or when the
//! state changes: keep raft's membership in line with the member list
//! (learners for everyone, 1, 3 or 5 voters chosen automatically), and
//! decide through the replicated state that a silent node is down, or up
//! again when it is heard.

use crate::cluster::types::Command;
use crate::gossip::Liveness;
use crate::node::Node;
use krg_types::{NodeId, NodeState};
use openraft::{BasicNode, ChangeMembers};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUND: Duration = Duration::from_millis(500);

pub async fn run(node: Arc<Node>) {
    let mut changed = node.state.changed.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(ROUND) => {}
            _ = changed.changed() => {}
        }
        if !node.is_leader() {
            continue;
        }
        if let Err(e) = round(&node).await {
            tracing::debug!(error = %e, "leader duties round did not finish");
        }
    }
}

/// Voters wanted for this many members.
pub fn voter_target(members: usize) -> usize {
    match members {
        0..=2 => 1,
        3..=4 => 3,
        _ => 5,
    }
}

/// Chooses voters: keep current voters that are up, then fill with up
/// members by id; a down voter is kept only when nobody can replace it.
pub fn choose_voters(
    members: &BTreeMap<NodeId, NodeState>,
    current: &BTreeSet<NodeId>,
    alive: &dyn Fn(NodeId) -> bool,
) -> BTreeSet<NodeId> {
    let target = voter_target(members.len());
    let usable = |id: &NodeId| members.get(id).is_some_and(|s| *s == NodeState::Up) && alive(*id);
    let mut chosen: BTreeSet<NodeId> = current.iter().copied().filter(usable).collect();
    for id in members.keys() {
        if chosen.len() >= target {
            break;
        }
        if usable(id) {
            chosen.insert(*id);
        }
    }
    // Not enough healthy members: keep unhealthy current voters rather than
    // shrink the quorum under their feet.
    for id in current {
        if chosen.len() >= target {
            break;
        }
        if members.contains_key(id) {
            chosen.insert(*id);
        }
    }
    chosen
}

async fn round(node: &Arc<Node>) -> Result<(), String> {
    let members: BTreeMap<NodeId, (NodeState, String)> = node.state.read(|d| {
        d.state
            .members()
            .map(|n| (n.id, (n.state, n.addr.clone())))
            .collect()
    });
    decide_liveness(node, &members).await;

    let membership = node.raft.metrics().borrow().membership_config.clone();
    let in_raft: BTreeSet<u64> = membership.membership().nodes().map(|(id, _)| *id).collect();
    for (id, (_, addr)) in &members {
        if !in_raft.contains(&id.as_u64()) {
            tracing::info!(node = %id, "adding node to raft as a learner");
            node.raft
                .add_learner(id.as_u64(), BasicNode { addr: addr.clone() }, false)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let left: BTreeSet<u64> = in_raft
        .iter()
        .copied()
        .filter(|id| NodeId::new(*id).map_or(true, |n| !members.contains_key(&n)))
        .collect();
    let current: BTreeSet<NodeId> = membership
        .membership()
        .voter_ids()
        .filter_map(|id| NodeId::new(id).ok())
        .collect();
    let states: BTreeMap<NodeId, NodeState> =
        members.iter().map(|(id, (s, _))| (*id, *s)).collect();
    let now = Instant::now();
    let suspect_after = node.config.suspect_after;
    let alive = |id: NodeId| {
        matches!(
            node.view().liveness(id, now, suspect_after),
            Liveness::Alive
        )
    };
    let wanted = choose_voters(&states, &current, &alive);
    if wanted != current && !wanted.is_empty() {
        tracing::info!(?wanted, ?current, "changing raft voters");
        let ids: BTreeSet<u64> = wanted.iter().map(|n| n.as_u64()).collect();
        node.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(ids), true)
            .await
            .map_err(|e| e.to_string())?;
    }
    if !left.is_empty() {
        node.raft
            .change_membership(ChangeMembers::RemoveNodes(left), false)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn decide_liveness(node: &Arc<Node>, members: &BTreeMap<NodeId, (NodeState, String)>) {
    let now = Instant::now();
    for (id, (state, _)) in members {
        let live = node.view().liveness(*id, now, node.config.suspect_after);
        let next = match (state, live) {
            (NodeState::Up | NodeState::Draining, Liveness::Silent(s))
                if s >= node.config.down_after =>
            {
                Some(NodeState::Down)
            }
            (NodeState::Down, Liveness::Alive) => Some(NodeState::Up),
            _ => None,
        };
        if let Some(next) = next {
            tracing::warn!(node = %id, from = %state, to = %next, "node state decided by the leader");
            if let Err(e) = node
                .propose(Command::SetNodeState {
                    node: *id,
                    state: next,
                })
                .await
            {
                tracing::warn!(node = %id, error = %e, "could not record the node's state");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> BTreeSet<NodeId> {
        v.iter().map(|i| NodeId::new(*i).unwrap()).collect()
    }

    fn members(up: &[u64], down: &[u64]) -> BTreeMap<NodeId, NodeState> {
        let mut m = BTreeMap::new();
        for i in up {
            m.insert(NodeId::new(*i).unwrap(), NodeState::Up);
        }
        for i in down {
            m.insert(NodeId::new(*i).unwrap(), NodeState::Down);
        }
        m
    }

    #[test]
    fn voters_grow_one_three_five() {
        let all = |_| true;
        assert_eq!(
            choose_voters(&members(&[1, 2], &[]), &ids(&[1]), &all),
            ids(&[1])
        );
        assert_eq!(
            choose_voters(&members(&[1, 2, 3], &[]), &ids(&[1]), &all),
            ids(&[1, 2, 3])
        );
        assert_eq!(
            choose_voters(&members(&[1, 2, 3, 4, 5, 6], &[]), &ids(&[1, 2, 3]), &all),
            ids(&[1, 2, 3, 4, 5])
        );
    }

    #[test]
    fn a_down_voter_is_replaced_when_a_spare_exists_and_kept_otherwise() {
        let all = |_| true;
        assert_eq!(
            choose_voters(&members(&[1, 2, 4], &[3]), &ids(&[1, 2, 3]), &all),
            ids(&[1, 2, 4])
        );
        assert_eq!(
            choose_voters(&members(&[1, 2], &[3]), &ids(&[1, 2, 3]), &all),
            ids(&[1, 2, 3])
        );
    }
}
