//! openraft's network over the members' TLS connections (`peer::PeerPool`).

use crate::cluster::types::TypeConfig;
use crate::peer::{PeerError, PeerPool};
use crate::wire::peer::{PeerRequest, PeerResponse};
use krg_types::NodeId;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use std::sync::Arc;

pub struct Network {
    pub peers: Arc<PeerPool>,
}

pub struct PeerClient {
    peers: Arc<PeerPool>,
    raft_id: u64,
    node: Option<NodeId>,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> PeerClient {
        PeerClient {
            peers: self.peers.clone(),
            raft_id: target,
            node: NodeId::new(target).ok(),
            addr: node.addr.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerClient {
    async fn call<E: std::error::Error>(
        &self,
        req: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, RPCError<u64, BasicNode, E>> {
        let Some(node) = self.node else {
            return Err(RPCError::Unreachable(Unreachable::new(&Msg(format!(
                "raft id {} is not a krg node id",
                self.raft_id
            )))));
        };
        match self
            .peers
            .call(node, &self.addr, req, option.hard_ttl())
            .await
        {
            Ok(resp) => Ok(resp),
            Err(e @ PeerError::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
        RPCError::Network(NetworkError::new(&Msg(
            "unexpected response type from peer".into(),
        )))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(PeerRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.raft_id, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        match self
            .call(PeerRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            PeerResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.raft_id, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        match self.call(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.raft_id, e)))
            }
            _ => Err(Self::unexpected()),
        }
    }
}
