//! The replicated cluster state: raft (openraft) over redb, the commands that
//! change the state, and the leader's duties (membership, node states).

pub mod duties;
pub mod network;
pub mod state;
pub mod store;
pub mod types;
