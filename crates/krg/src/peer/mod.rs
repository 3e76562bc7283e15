//! The node port: a TLS listener that serves peers (and joining machines),
//! and a pool of client connections to other members.

pub mod pool;
pub mod server;

pub use pool::{PeerError, PeerPool};
