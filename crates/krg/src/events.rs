//! Why krg did what it did: each node keeps its recent automatic decisions
//! (placements, migrations, node states) for `krg events` / `krg sched log`.

use crate::node::now_ms;
use krg_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

/// Events kept per node.
pub const EVENTS_KEPT_MAX: usize = 2000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub time_ms: u64,
    pub node: NodeId,
    /// `placement`, `migration`, `node`, `checkpoint`, ...
    pub kind: String,
    pub message: String,
}

pub struct EventLog {
    node: NodeId,
    events: Mutex<VecDeque<Event>>,
}

impl EventLog {
    pub fn new(node: NodeId) -> Self {
        EventLog {
            node,
            events: Mutex::new(VecDeque::new()),
        }
    }

    pub fn record(&self, kind: &str, message: String) {
        tracing::info!(kind, "{message}");
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if ev.len() >= EVENTS_KEPT_MAX {
            ev.pop_front();
        }
        ev.push_back(Event {
            time_ms: now_ms(),
            node: self.node,
            kind: kind.to_string(),
            message,
        });
    }

    pub fn since(&self, since_ms: u64) -> Vec<Event> {
        let ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        ev.iter()
            .filter(|e| e.time_ms > since_ms)
            .cloned()
            .collect()
    }
}
