//! The gossip loop: probe, tick, send to peers.

use crate::node::Node;
use crate::probe::Prober;
use crate::wire::peer::PeerRequest;
use krg_types::NodeState;
use rand::seq::SliceRandom;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Peers each round when the cluster is large; a small cluster gossips to all.
const FANOUT: usize = 4;
/// Load is probed at most this often (probing walks cgroups and /proc).
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub async fn run(node: Arc<Node>) {
    let mut prober = Prober::new(node.config.load_scope);
    let mut last_probe: Option<Instant> = None;
    let mut ticker = tokio::time::interval(node.config.gossip_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let load = if last_probe.is_none_or(|t| t.elapsed() >= PROBE_INTERVAL) {
            last_probe = Some(Instant::now());
            let n = u32::try_from(node.jobs.body_count()).unwrap_or(u32::MAX);
            Some(tokio::task::block_in_place(|| prober.sample(n)))
        } else {
            None
        };
        let members: Vec<krg_types::NodeId> = node
            .state
            .read(|d| d.state.members().map(|n| n.id).collect());
        let msg = {
            let mut view = node.view();
            let now = Instant::now();
            for id in members {
                view.know(id, now);
            }
            view.tick(load)
        };
        let mut peers: Vec<(krg_types::NodeId, String)> = node.state.read(|d| {
            d.state
                .nodes
                .values()
                .filter(|n| n.id != node.id && n.state != NodeState::Left)
                .map(|n| (n.id, n.addr.clone()))
                .collect()
        });
        if peers.len() > FANOUT {
            peers.shuffle(&mut rand::thread_rng());
            peers.truncate(FANOUT);
        }
        for (id, addr) in peers {
            let node = node.clone();
            let msg = msg.clone();
            // One task per peer: a dead peer's connect timeout must not
            // delay the others' heartbeats.
            tokio::spawn(async move {
                let _ = node.peers.notify(id, &addr, PeerRequest::Gossip(msg)).await;
            });
        }
    }
}
