//! The raft type configuration and the commands of the replicated state.

use crate::cluster::state::{ClusterState, NodeRecord};
use krg_types::{NodeId, NodeState};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

openraft::declare_raft_types!(
    /// krg's raft: commands change [`ClusterState`]; node ids are krg node ids.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A change to the replicated state. Each carries what it needs to be applied
/// deterministically on every member (the proposer's clock, for instance).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// First entry of a new cluster: its identity and its first member.
    Bootstrap {
        cluster_id: String,
        ca_cert_pem: String,
        first: NodeRecord,
    },
    /// A join token was issued (only its hash is stored).
    AddToken {
        token_hash: String,
        expires_at_ms: u64,
        now_ms: u64,
    },
    /// A machine presents a token: consume it and make the machine a member.
    Admit {
        token_hash: String,
        now_ms: u64,
        addr: String,
        hostname: String,
        spki_sha256: String,
        version: String,
    },
    /// A member changed state (failure detection, drain, leave).
    SetNodeState { node: NodeId, state: NodeState },
    /// A member restarted with a new address.
    SetNodeAddr { node: NodeId, addr: String },
    /// `krg sched set`: the scheduler's policies.
    SetSched(crate::policy::config::SchedConfig),
    /// A checkpoint was written.
    AddImage(crate::image::ImageRecord),
    /// `krg images rm`.
    RemoveImage { gpid: krg_types::Gpid, version: u32 },
}

/// The outcome of applying a [`Command`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    #[default]
    Ok,
    Admitted(NodeId),
    Refused(String),
}

/// What a state-machine snapshot holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<openraft::LogId<u64>>,
    pub last_membership: openraft::StoredMembership<u64, openraft::BasicNode>,
    pub state: ClusterState,
}

/// Converts a raft node id back into a krg node id.
pub fn node_id(raft_id: u64) -> Option<NodeId> {
    NodeId::new(raft_id).ok()
}
