//! Heartbeats and load, spread by gossip over the members' TLS connections.
//!
//! Each node bumps its own heartbeat counter every round and sends the
//! entries it knows (its own and others') to its peers; an entry replaces an
//! older one when its `(incarnation, heartbeat)` is greater. A node whose
//! entry has not advanced for `suspect_after` is *suspect* in the local view;
//! only the raft leader, after `down_after`, declares it *down* through the
//! replicated state (van Renesse's gossip-style failure detection; the
//! incarnation — the daemon's start time — tells a restart from an echo).
//!
//! The view is a pure structure (times are passed in), so it is unit-tested
//! without a network.

pub mod task;

use krg_types::limits::{NODES_MAX, SHORT_STRING_BYTES_MAX};
use krg_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A node's load as it reports it (probes in `probe`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Online CPUs of the machine.
    pub cpus: u32,
    /// CPUs krg may use there (a cgroup quota or cpuset lowers it).
    pub capacity: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    /// Runnable tasks now.
    pub runnable: u32,
    /// Runnable tasks averaged over about 5 s: the scheduler's load.
    pub load_short: f64,
    pub mem_total: u64,
    pub mem_free: u64,
    /// Jobs running there.
    pub jobs: u32,
    pub version: String,
    pub hostname: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GossipEntry {
    pub node: NodeId,
    /// The daemon's start time in ms: a restart starts a new incarnation.
    pub incarnation: u64,
    pub heartbeat: u64,
    pub load: NodeLoad,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GossipMsg {
    pub from: NodeId,
    pub entries: Vec<GossipEntry>,
}

impl GossipMsg {
    /// Rejects messages beyond the bounds (a bad peer cannot grow our view
    /// past the cluster's size).
    pub fn check(&self) -> Result<(), String> {
        if self.entries.len() > NODES_MAX {
            return Err(format!(
                "gossip message has {} entries, more than {NODES_MAX}",
                self.entries.len()
            ));
        }
        for e in &self.entries {
            if e.load.version.len() > SHORT_STRING_BYTES_MAX
                || e.load.hostname.len() > SHORT_STRING_BYTES_MAX
            {
                return Err("gossip entry has an oversized string".into());
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Seen {
    entry: GossipEntry,
    /// When the entry last advanced, on our clock.
    advanced_at: Instant,
}

/// Liveness of a peer in the local view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Alive,
    /// Silent for this long.
    Silent(Duration),
}

#[derive(Debug)]
pub struct View {
    me: NodeId,
    started: Instant,
    own: GossipEntry,
    seen: HashMap<NodeId, Seen>,
    /// When we first knew each member (a node that just joined is given
    /// time to be heard from, counted from then).
    known: HashMap<NodeId, Instant>,
}

impl View {
    pub fn new(me: NodeId, incarnation: u64, now: Instant) -> Self {
        View {
            me,
            started: now,
            own: GossipEntry {
                node: me,
                incarnation,
                heartbeat: 0,
                load: NodeLoad::default(),
            },
            seen: HashMap::new(),
            known: HashMap::new(),
        }
    }

    /// Notes that `node` is a member (from the replicated state).
    pub fn know(&mut self, node: NodeId, now: Instant) {
        self.known.entry(node).or_insert(now);
    }

    /// Starts a round: bumps our heartbeat and returns the message to send.
    pub fn tick(&mut self, load: Option<NodeLoad>) -> GossipMsg {
        self.own.heartbeat += 1;
        if let Some(l) = load {
            self.own.load = l;
        }
        let mut entries = Vec::with_capacity(self.seen.len() + 1);
        entries.push(self.own.clone());
        entries.extend(self.seen.values().map(|s| s.entry.clone()));
        GossipMsg {
            from: self.me,
            entries,
        }
    }

    /// Merges a received message; entries about us are ignored.
    pub fn merge(&mut self, msg: &GossipMsg, now: Instant) {
        for e in &msg.entries {
            if e.node == self.me {
                continue;
            }
            let newer = match self.seen.get(&e.node) {
                None => true,
                Some(s) => (e.incarnation, e.heartbeat) > (s.entry.incarnation, s.entry.heartbeat),
            };
            if newer {
                self.seen.insert(
                    e.node,
                    Seen {
                        entry: e.clone(),
                        advanced_at: now,
                    },
                );
            }
        }
    }

    /// A node we never heard of since we started counts from our start, so a
    /// fresh daemon does not accuse everybody at once.
    pub fn liveness(&self, node: NodeId, now: Instant, suspect_after: Duration) -> Liveness {
        if node == self.me {
            return Liveness::Alive;
        }
        let known = self
            .known
            .get(&node)
            .copied()
            .unwrap_or(self.started)
            .max(self.started);
        let since = self.seen.get(&node).map_or(known, |s| s.advanced_at);
        let silence = now.saturating_duration_since(since);
        if silence >= suspect_after {
            Liveness::Silent(silence)
        } else {
            Liveness::Alive
        }
    }

    pub fn load(&self, node: NodeId) -> Option<&NodeLoad> {
        if node == self.me {
            return Some(&self.own.load);
        }
        self.seen.get(&node).map(|s| &s.entry.load)
    }

    /// Drops what we know of nodes that left.
    pub fn forget(&mut self, node: NodeId) {
        self.seen.remove(&node);
        self.known.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u64) -> NodeId {
        NodeId::new(i).unwrap()
    }

    #[test]
    fn a_silent_node_becomes_suspect_and_alive_again_when_heard() {
        let t0 = Instant::now();
        let mut a = View::new(n(1), 1, t0);
        let mut b = View::new(n(2), 1, t0);
        let msg = b.tick(None);
        a.merge(&msg, t0);
        let sus = Duration::from_secs(1);
        assert_eq!(
            a.liveness(n(2), t0 + Duration::from_millis(900), sus),
            Liveness::Alive
        );
        assert!(matches!(
            a.liveness(n(2), t0 + Duration::from_millis(1500), sus),
            Liveness::Silent(_)
        ));
        // The same heartbeat again (an echo through a third node) does not revive it.
        a.merge(&msg, t0 + Duration::from_millis(1600));
        assert!(matches!(
            a.liveness(n(2), t0 + Duration::from_millis(1700), sus),
            Liveness::Silent(_)
        ));
        let msg = b.tick(None);
        a.merge(&msg, t0 + Duration::from_millis(1700));
        assert_eq!(
            a.liveness(n(2), t0 + Duration::from_millis(1800), sus),
            Liveness::Alive
        );
    }

    #[test]
    fn a_restart_with_a_new_incarnation_wins_over_higher_old_heartbeats() {
        let t0 = Instant::now();
        let mut a = View::new(n(1), 1, t0);
        let mut old = View::new(n(2), 5, t0);
        for _ in 0..10 {
            a.merge(&old.tick(None), t0);
        }
        let mut fresh = View::new(n(2), 6, t0);
        let later = t0 + Duration::from_secs(3);
        a.merge(&fresh.tick(None), later);
        assert_eq!(
            a.liveness(n(2), later, Duration::from_secs(1)),
            Liveness::Alive
        );
    }

    #[test]
    fn a_node_that_just_joined_is_not_suspect_before_its_first_heartbeat() {
        let t0 = Instant::now();
        let mut a = View::new(n(1), 1, t0);
        let joined = t0 + Duration::from_secs(10);
        a.know(n(4), joined);
        let sus = Duration::from_secs(1);
        assert_eq!(
            a.liveness(n(4), joined + Duration::from_millis(500), sus),
            Liveness::Alive
        );
        assert!(matches!(
            a.liveness(n(4), joined + Duration::from_secs(2), sus),
            Liveness::Silent(_)
        ));
    }

    #[test]
    fn entries_spread_through_a_third_node() {
        let t0 = Instant::now();
        let mut a = View::new(n(1), 1, t0);
        let mut b = View::new(n(2), 1, t0);
        let mut c = View::new(n(3), 1, t0);
        b.merge(&c.tick(None), t0);
        a.merge(&b.tick(None), t0);
        assert!(a.load(n(3)).is_some());
    }
}
