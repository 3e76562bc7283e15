//! Messages between members on the node port.

use crate::cluster::types::{Command, CommandResult, TypeConfig};
use crate::gossip::GossipMsg;
use crate::job::JobInfo;
use crate::wire::stream::ExitStatus;
use crate::wire::RemoteError;
use krg_types::{Gpid, NodeId};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

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
    /// Jobs this node runs or keeps (for `krg ps`).
    ListJobs,
    /// Where the body of a job runs, asked of its home node.
    LocateJob {
        gpid: Gpid,
    },
    /// Signal a body running there; `uid` is the caller's, from its socket.
    SignalJob {
        gpid: Gpid,
        signal: i32,
        uid: u32,
    },
    /// Long poll for a job's end, asked of its home node.
    WaitJob {
        gpid: Gpid,
        uid: u32,
        timeout_ms: u64,
    },
    /// A chunk of a detached job's log, from its home node.
    ReadLog {
        gpid: Gpid,
        uid: u32,
        offset: u64,
    },
    /// This node's decisions after a time.
    Events {
        since_ms: u64,
    },
    /// This node's /proc files, for the cluster view.
    ProcTexts,
    /// Show or change the capabilities of a body running there.
    Caps {
        gpid: Gpid,
        uid: u32,
        changes: Vec<crate::job::caps::CapChange>,
    },
    /// Move a body running there (asked of its execution node).
    Migrate {
        gpid: Gpid,
        target: NodeId,
        mode: crate::job::migrate::MigrateMode,
        uid: u32,
    },
    /// Save a body running there.
    Checkpoint {
        gpid: Gpid,
        after: crate::job::migrate::CheckpointAfter,
        uid: u32,
    },
    /// Which of the files a job about to move here uses this node lacks
    /// (or has otherwise), asked before the job is frozen.
    NeededFiles(Vec<crate::job::needed_files::NeededFile>),
    /// Bring a job back here from images (a move's target, or a restart).
    Restore(Box<crate::job::migrate::RestoreJob>),
    /// Asked of a job's home node: its body was restarted on `node`.
    Relocated {
        gpid: Gpid,
        node: NodeId,
        uid: u32,
        user: String,
        command: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Proposed(CommandResult),
    Jobs(Vec<JobInfo>),
    Located(Option<NodeId>),
    Done,
    Waited(WaitResult),
    Log {
        data: ByteBuf,
        done: bool,
    },
    Events(Vec<crate::events::Event>),
    ProcTexts(Box<crate::view::render::ProcTexts>),
    Caps(crate::job::caps::Caps),
    Migrated(crate::job::migrate::MigrationReport),
    ImageSaved(crate::image::ImageRecord),
    Restored(crate::job::migrate::RestoreReply),
    /// Indexes into the `NeededFiles` asked, with what is wrong there.
    FileMismatches(Vec<(u32, crate::job::needed_files::Mismatch)>),
}

/// What a long poll on a job's end found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitResult {
    Running,
    Exited(ExitStatus),
    /// Its execution node went down.
    Lost(NodeId),
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
