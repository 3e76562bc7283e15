//! Messages between members on the node port.

use crate::cluster::types::{Command, CommandResult, TypeConfig};
use crate::gossip::GossipMsg;
use crate::wire::RemoteError;
use krg_types::NodeId;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

/// A frame on an `Rpc` connection. Requests with `id == 0` expect no reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerFrame {
    Request {
        id: u64,
        body: PeerRequest,
    },
    Response {
        id: u64,
        body: Result<PeerResponse, RemoteError>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command for the leader, forwarded by a follower.
    Propose(Command),
    /// Heartbeats and load, one-way.
    Gossip(GossipMsg),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Proposed(CommandResult),
}

/// The only request a machine without a certificate may send.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The secret part of the token; the cluster keeps only its hash.
    pub token_secret: String,
    /// PEM certificate signing request for the joining node's key.
    pub csr_pem: String,
    /// `ip:port` the new node will listen on.
    pub addr: String,
    pub hostname: String,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinAccepted {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub cert_pem: String,
    pub ca_cert_pem: String,
}

pub type JoinResponse = Result<JoinAccepted, RemoteError>;
