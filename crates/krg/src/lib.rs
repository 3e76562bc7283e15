//! krg: a single-system-image layer for Linux clusters, in user space.
//!
//! One module per word of the vocabulary (see docs/architecture.md).

pub mod acl;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod criu;
pub mod daemon;
pub mod events;
pub mod features;
pub mod gossip;
pub mod identity;
pub mod image;
pub mod job;
pub mod join;
pub mod lab;
pub mod metrics;
pub mod mountinfo;
pub mod node;
pub mod peer;
pub mod pidfd;
pub mod policy;
pub mod probe;
pub mod procfs;
#[cfg(test)]
mod test_support;
pub mod view;
pub mod wire;
