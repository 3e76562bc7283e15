//! Messages between a user's `krg` and the local krgd on the Unix socket.

use crate::gossip::NodeLoad;
use crate::job::spec::RunRequest;
use crate::job::JobInfo;
use crate::policy::config::SchedConfig;
use crate::wire::peer::WaitResult;
use crate::wire::RemoteError;
use krg_types::{Gpid, NodeId, NodeState};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// `krg cluster status`
    Status,
    /// `krg nodes`
    Nodes,
    /// `krg cluster token --ttl` (root only)
    CreateToken { ttl_secs: u64 },
    /// `krg doctor` / `krg node features`
    Features,
    /// `krg run`: after this request the connection carries the job's
    /// streams (`ToBody` from the client, `FromBody` to it).
    Run(Box<RunRequest>),
    /// `krg ps`
    Ps,
    /// `krg kill`
    Signal { gpids: Vec<Gpid>, signal: i32 },
    /// `krg wait`: answers when the job has ended.
    Wait { gpid: Gpid },
    /// `krg logs`: a chunk of a detached job's log from `offset`.
    Logs { gpid: Gpid, offset: u64 },
    /// `krg events`: decisions of every node after this time.
    Events { since_ms: u64 },
    /// `krg sched show`
    SchedShow,
    /// `krg sched set` (root only): the whole new configuration.
    SchedSet(SchedConfig),
    /// `krg capset`: show (no changes) or change a job's capabilities; the
    /// caller's own job when `gpid` is none.
    Caps {
        gpid: Option<Gpid>,
        changes: Vec<crate::job::caps::CapChange>,
    },
    /// `krg migrate`
    Migrate {
        gpid: Gpid,
        node: NodeId,
        mode: crate::job::migrate::MigrateMode,
    },
    /// `krg checkpoint`
    Checkpoint {
        gpid: Gpid,
        after: crate::job::migrate::CheckpointAfter,
    },
    /// `krg restart GPID[@vN] [--node N]`
    Restart {
        gpid: Gpid,
        version: Option<u32>,
        node: Option<NodeId>,
    },
    /// `krg images [GPID]`
    Images { gpid: Option<Gpid> },
    /// `krg images rm GPID[@vN]`
    ImagesRm { gpid: Gpid, version: Option<u32> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientResponse {
    Status(ClusterStatus),
    Nodes(Vec<NodeView>),
    Token(String),
    Features(Box<crate::features::Features>),
    Jobs(Vec<JobInfo>),
    Signaled(Vec<(Gpid, Result<(), RemoteError>)>),
    Waited(WaitResult),
    Log {
        data: ByteBuf,
        done: bool,
    },
    Sched(SchedConfig),
    Events(Vec<crate::events::Event>),
    Caps {
        gpid: Gpid,
        caps: crate::job::caps::Caps,
    },
    Migrated(crate::job::migrate::MigrationReport),
    ImageSaved(crate::image::ImageRecord),
    Restarted {
        gpid: Gpid,
        version: u32,
        node: NodeId,
    },
    Images(Vec<crate::image::ImageRecord>),
    Done,
}

pub type ClientResult = Result<ClientResponse, RemoteError>;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub this_node: NodeId,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    pub nodes: Vec<(NodeId, NodeState)>,
    /// Index of the last raft entry this node applied (0: none yet).
    pub applied_index: u64,
}

/// One line of `krg nodes`: the replicated record with this node's view of
/// its liveness and its last gossiped load.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub addr: String,
    pub hostname: String,
    pub state: NodeState,
    pub version: String,
    pub voter: bool,
    pub load: Option<NodeLoad>,
}
