//! Identifiers, states and limits shared by every krg component.
//!
//! This crate does no I/O: it names the cluster's vocabulary (node, gpid,
//! node state) and the bounds every input is checked against.

pub mod gpid;
pub mod limits;
pub mod node;

pub use gpid::{Gpid, GpidError};
pub use node::{NodeId, NodeIdError, NodeState};

/// The krg release, shown by `krg nodes` and exchanged at join.
pub const KRG_VERSION: &str = env!("CARGO_PKG_VERSION");
