//! The global scheduler's decisions, without I/O: a load sample of the
//! cluster goes in, a placement or a list of moves comes out. Policies are
//! traits, chosen by the replicated [`config::SchedConfig`], so every node
//! applies the same ones (Kerrighed's probes / filters / policies model).
//!
//! - placement at launch: [`round_robin`], [`least_loaded`], [`pack`];
//! - balancing by migration: [`balance`] (MOSIX-like), [`pack`]
//!   (consolidation);
//! - [`filter`]: which nodes a decision may use at all.

pub mod balance;
pub mod config;
pub mod filter;
pub mod least_loaded;
pub mod pack;
pub mod round_robin;
pub mod task;

use krg_types::{Gpid, NodeId};
use serde::{Deserialize, Serialize};

/// One node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeSample {
    pub id: NodeId,
    /// Up and not suspect: may receive work.
    pub usable: bool,
    /// CPUs krg may use there.
    pub capacity: f64,
    /// Runnable tasks, averaged over a few seconds.
    pub load: f64,
    /// krg jobs running there.
    pub jobs: u32,
    pub mem_free: u64,
    /// Jobs recently sent there, not yet visible in `load`.
    pub pending: f64,
}

impl NodeSample {
    /// Load per unit of capacity, counting what is on its way.
    pub fn relative_load(&self) -> f64 {
        (self.load + self.pending) / self.capacity.max(0.01)
    }
}

/// A job running on the deciding node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSample {
    pub gpid: Gpid,
    /// CPUs it used lately (1.0 = one CPU busy).
    pub cpu: f64,
    pub rss_bytes: u64,
    /// May the balancer move it (CAN_MIGRATE, not --no-migrate)?
    pub movable: bool,
    /// Since it arrived on this node.
    pub resident_ms: u64,
    /// Nodes it may run on (empty: any).
    pub allowed: Vec<NodeId>,
}

/// A decision to move a job, with its reasons for the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub gpid: Gpid,
    pub source: NodeId,
    pub target: NodeId,
    pub reason: String,
}

/// Chooses the node of a new job.
pub trait Placement: Send {
    fn name(&self) -> &'static str;
    /// `candidates` are usable nodes the job may run on, in id order.
    fn place(&mut self, candidates: &[NodeSample]) -> Option<NodeId>;
}

/// Chooses which of this node's jobs move where.
pub trait Balancer: Send {
    fn name(&self) -> &'static str;
    fn decide(&mut self, me: NodeId, nodes: &[NodeSample], jobs: &[JobSample]) -> Vec<Move>;
}

/// The placement policy named in the configuration.
pub fn placement(cfg: &config::SchedConfig) -> Box<dyn Placement> {
    match cfg.placement {
        config::PlacementKind::RoundRobin => Box::new(round_robin::RoundRobin::default()),
        config::PlacementKind::LeastLoaded => Box::new(least_loaded::LeastLoaded),
        config::PlacementKind::Pack => Box::new(pack::PackPlacement),
    }
}

/// The balancer named in the configuration, if any.
pub fn balancer(cfg: &config::SchedConfig) -> Option<Box<dyn Balancer>> {
    match &cfg.balancer {
        config::BalancerKind::Off => None,
        config::BalancerKind::Balance => Some(Box::new(balance::Balance::new(cfg.clone()))),
        config::BalancerKind::Pack => Some(Box::new(pack::PackBalancer::new(cfg.clone()))),
    }
}

#[cfg(test)]
pub(crate) fn sample(id: u64, capacity: f64, load: f64) -> NodeSample {
    NodeSample {
        id: NodeId::new(id).expect("test node id"),
        usable: true,
        capacity,
        load,
        jobs: load as u32,
        mem_free: 1 << 30,
        pending: 0.0,
    }
}
