//! Identifiers, states and limits shared by every krg component.
//!
//! This crate does no I/O: it names the cluster's vocabulary (node, gpid,
//! node state) and the bounds every input is checked against.

pub mod gpid;
pub mod handoff;
pub mod limits;
pub mod node;

pub use gpid::{Gpid, GpidError};
pub use node::{NodeId, NodeIdError, NodeState};

/// The krg release, shown by `krg nodes` and exchanged at join.
pub const KRG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Set in krg-init's environment when it starts as its job's init already,
/// in the job's namespaces and cgroups: by krgd's `clone`, or by its own
/// re-execution when started by hand.
pub const INIT_INNER_ENV: &str = "KRG_INIT_INNER";
