//! A running node: its identity, raft, replicated state, peers and local
//! view, and the handlers for what peers and joining machines ask.

pub mod config;

use crate::cluster::state::NodeRecord;
use crate::cluster::store::SharedState;
use crate::cluster::types::{Command, CommandResult, Raft};
use crate::gossip::{Liveness, View};
use crate::identity::{ca, token, Identity};
use crate::job::gpid::GpidAllocator;
use crate::job::JobTable;
use crate::peer::PeerPool;
use crate::policy::config::SchedConfig;
use crate::policy::Placement;
use crate::wire::client::NodeView;
use crate::wire::peer::{JoinAccepted, JoinRequest, JoinResponse, PeerRequest, PeerResponse};
use crate::wire::{ErrorCode, RemoteError};
use config::NodeConfig;
use krg_types::limits::SHORT_STRING_BYTES_MAX;
use krg_types::Gpid;
use krg_types::{NodeId, NodeState};
use openraft::error::{ClientWriteError, RaftError};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a proposal may wait for a leader and a commit.
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to reach a leader while one is being elected.
const PROPOSE_ATTEMPTS_MAX: u32 = 40;
/// Time allowed for one forwarded request to the leader.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a join with a token this node does not know waits before it
/// looks again (the token may be committed but not yet applied here).
const TOKEN_RECHECK: Duration = Duration::from_millis(500);

pub struct Node {
    pub config: NodeConfig,
    pub id: NodeId,
    pub identity: Identity,
    /// Our `ip:port` on the node port, as peers see it.
    pub addr: String,
    pub raft: Raft,
    pub state: SharedState,
    pub peers: Arc<PeerPool>,
    pub view: Mutex<View>,
    pub jobs: JobTable,
    pub gpids: GpidAllocator,
    /// The `krg-init` binary jobs start with.
    pub init_path: PathBuf,
    /// `libkrg_preload.so`, loaded into jobs that see the cluster.
    pub preload_path: Option<PathBuf>,
    /// The `krg` binary (distant exec runs it in jobs).
    pub krg_path: Option<PathBuf>,
    /// Where the cluster view is mounted, once it is.
    pub view_dir: std::sync::OnceLock<PathBuf>,
    /// Where detached jobs' logs go.
    pub logs_dir: PathBuf,
    /// Recent placements, counted until gossip reports them.
    pub placements: Mutex<VecDeque<(NodeId, Instant)>>,
    /// The cluster view's cache, shared with its FUSE threads.
    pub view_cache: Arc<crate::view::ViewCache>,
    /// A weak handle on ourselves, set once at start.
    pub me: std::sync::OnceLock<std::sync::Weak<Node>>,
    /// CRIU, for checkpoints and migrations.
    pub criu: crate::criu::CriuRpc,
    /// Prometheus counters and histograms.
    pub metrics: crate::metrics::Metrics,
    /// Recent automatic decisions, with their reasons.
    pub events: crate::events::EventLog,
    /// The placement policy in force, and the configuration it was made from.
    pub placement_policy: Mutex<Option<(SchedConfig, Box<dyn Placement>)>>,
    /// Stream connections to peers made ahead of the next remote launch.
    pub spare_links: Arc<crate::job::spare_link::SpareLinks>,
    /// A krg-init started ahead of the next job started here.
    pub init_pool: Arc<crate::job::init_pool::InitPool>,
}

pub struct PlacementGuard<'a> {
    guard: std::sync::MutexGuard<'a, Option<(SchedConfig, Box<dyn Placement>)>>,
}

impl PlacementGuard<'_> {
    pub fn place(&mut self, candidates: &[crate::policy::NodeSample]) -> Option<NodeId> {
        self.guard.as_mut().and_then(|(_, p)| p.place(candidates))
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn err(code: ErrorCode, msg: impl Into<String>) -> RemoteError {
    RemoteError::new(code, msg)
}

impl Node {
    /// An owning handle on this node (for work that outlives a request).
    pub fn myself(&self) -> Option<Arc<Node>> {
        self.me.get().and_then(std::sync::Weak::upgrade)
    }

    pub fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The placement policy of the replicated configuration (rebuilt when
    /// the configuration changes; kept otherwise, since round robin has a
    /// memory).
    pub fn placement(&self) -> PlacementGuard<'_> {
        let cfg = self.state.read(|d| d.state.sched.clone());
        let mut guard = self
            .placement_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if guard
            .as_ref()
            .is_none_or(|(c, _)| c.placement != cfg.placement)
        {
            *guard = Some((cfg.clone(), crate::policy::placement(&cfg)));
        }
        PlacementGuard { guard }
    }

    pub fn log_path(&self, gpid: Gpid) -> PathBuf {
        self.logs_dir
            .join(format!("{}-{}.log", gpid.home_node(), gpid.seq()))
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.raft
            .metrics()
            .borrow()
            .current_leader
            .and_then(crate::cluster::types::node_id)
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id)
    }

    pub fn voters(&self) -> Vec<NodeId> {
        let m = self.raft.metrics().borrow().membership_config.clone();
        m.membership()
            .voter_ids()
            .filter_map(crate::cluster::types::node_id)
            .collect()
    }

    /// Replicates a command, through the leader wherever it is.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, RemoteError> {
        let deadline = Instant::now() + PROPOSE_TIMEOUT;
        let mut last = String::from("no leader is elected");
        for _ in 0..PROPOSE_ATTEMPTS_MAX {
            if Instant::now() >= deadline {
                break;
            }
            match self.raft.client_write(cmd.clone()).await {
                Ok(resp) => return Ok(resp.data),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let (Some(id), Some(node)) = (
                        f.leader_id.and_then(crate::cluster::types::node_id),
                        f.leader_node,
                    ) {
                        match self
                            .peers
                            .call(
                                id,
                                &node.addr,
                                PeerRequest::Propose(cmd.clone()),
                                FORWARD_TIMEOUT,
                            )
                            .await
                        {
                            Ok(PeerResponse::Proposed(r)) => return Ok(r),
                            Ok(_) => last = "the leader sent an unexpected answer".into(),
                            Err(e) => last = e.to_string(),
                        }
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(err(
            ErrorCode::Unavailable,
            format!(
                "the cluster could not commit the change: {last} (is a majority of voters up?)"
            ),
        ))
    }

    /// A proposal forwarded by a follower: commit here or refuse (no
    /// second hop, so a stale leader view cannot make a loop).
    async fn propose_as_leader(&self, cmd: Command) -> Result<CommandResult, RemoteError> {
        match self.raft.client_write(cmd).await {
            Ok(resp) => Ok(resp.data),
            Err(e) => Err(err(
                ErrorCode::Unavailable,
                format!("node {} cannot commit: {e}", self.id),
            )),
        }
    }

    pub async fn handle_peer(
        &self,
        from: NodeId,
        req: PeerRequest,
    ) -> Result<PeerResponse, RemoteError> {
        match req {
            PeerRequest::AppendEntries(r) => Ok(PeerResponse::AppendEntries(
                self.raft.append_entries(r).await,
            )),
            PeerRequest::Vote(r) => Ok(PeerResponse::Vote(self.raft.vote(r).await)),
            PeerRequest::InstallSnapshot(r) => {
                // openraft writes each chunk at its offset into one buffer:
                // an offset from the peer must not make it grow without end.
                let end = r.offset.saturating_add(r.data.len() as u64);
                if end > krg_types::limits::SNAPSHOT_BYTES_MAX {
                    tracing::warn!(node = %from, end, "snapshot chunk refused");
                    return Err(err(
                        ErrorCode::BadRequest,
                        format!(
                            "a snapshot chunk ends at byte {end}, past the {} bytes a snapshot may hold",
                            krg_types::limits::SNAPSHOT_BYTES_MAX
                        ),
                    ));
                }
                Ok(PeerResponse::InstallSnapshot(
                    self.raft.install_snapshot(r).await,
                ))
            }
            PeerRequest::Propose(cmd) => {
                Ok(PeerResponse::Proposed(self.propose_as_leader(cmd).await?))
            }
            PeerRequest::Gossip(msg) => {
                if let Err(reason) = msg.check() {
                    tracing::warn!(node = %from, %reason, "gossip refused");
                    return Err(err(ErrorCode::BadRequest, reason));
                }
                self.view().merge(&msg, Instant::now());
                Ok(PeerResponse::Done)
            }
            PeerRequest::ListJobs => Ok(PeerResponse::Jobs(crate::job::ops::local_jobs(self))),
            PeerRequest::LocateJob { gpid } => Ok(PeerResponse::Located(
                self.jobs
                    .deputy(gpid)
                    .filter(|d| d.is_running())
                    .map(|d| d.exec_node()),
            )),
            PeerRequest::SignalJob { gpid, signal, uid } => {
                crate::job::ops::signal_local(self, gpid, signal, uid).map(|()| PeerResponse::Done)
            }
            PeerRequest::WaitJob {
                gpid,
                uid,
                timeout_ms,
            } => {
                let t = Duration::from_millis(timeout_ms).min(crate::job::ops::WAIT_POLL);
                crate::job::ops::wait_local(self, gpid, uid, t)
                    .await
                    .map(PeerResponse::Waited)
            }
            PeerRequest::Caps { gpid, uid, changes } => {
                crate::job::ops::caps_local(self, gpid, uid, &changes).map(PeerResponse::Caps)
            }
            PeerRequest::Migrate {
                gpid,
                target,
                mode,
                uid,
            } => crate::job::ops::migrate_local(self, gpid, target, mode, uid)
                .await
                .map(PeerResponse::Migrated),
            PeerRequest::Checkpoint { gpid, after, uid } => {
                crate::job::ops::checkpoint_local(self, gpid, after, uid)
                    .await
                    .map(PeerResponse::ImageSaved)
            }
            PeerRequest::NeededFiles(files) => crate::job::needed_files::answer(files)
                .await
                .map(PeerResponse::FileMismatches),
            PeerRequest::Restore(job) => match self.myself() {
                Some(me) => crate::job::migrate::restore_here(&me, *job)
                    .await
                    .map(PeerResponse::Restored),
                None => Err(err(ErrorCode::Unavailable, "this node is shutting down")),
            },
            PeerRequest::Relocated {
                gpid,
                node,
                uid,
                user,
                command,
            } => match self.myself() {
                Some(me) => crate::job::home::relocated(&me, gpid, node, uid, user, command)
                    .await
                    .map(|()| PeerResponse::Done),
                None => Err(err(ErrorCode::Unavailable, "this node is shutting down")),
            },
            PeerRequest::ProcTexts => Ok(PeerResponse::ProcTexts(Box::new(
                tokio::task::spawn_blocking(crate::view::render::ProcTexts::read_local)
                    .await
                    .unwrap_or_default(),
            ))),
            PeerRequest::Events { since_ms } => {
                Ok(PeerResponse::Events(self.events.since(since_ms)))
            }
            PeerRequest::ReadLog { gpid, uid, offset } => {
                crate::job::ops::read_log_local(self, gpid, uid, offset).map(|(data, done)| {
                    PeerResponse::Log {
                        data: serde_bytes::ByteBuf::from(data),
                        done,
                    }
                })
            }
        }
    }

    /// May the holder of this certificate talk to us as node `node`? The CA
    /// signature already proved it was admitted; the replicated record (when
    /// we have it) must name the same key and not say it left.
    pub fn authorize_peer(&self, node: NodeId, spki: &str) -> Result<(), String> {
        self.state.read(|d| match d.state.nodes.get(&node) {
            None => Ok(()),
            Some(rec) if rec.state == NodeState::Left => {
                Err(format!("node {node} has left the cluster"))
            }
            Some(rec) if rec.spki_sha256 != spki => Err(format!(
                "the key presented for node {node} is not the one it joined with"
            )),
            Some(_) => Ok(()),
        })
    }

    pub async fn handle_join(&self, req: JoinRequest, _from: String) -> JoinResponse {
        for (what, s) in [
            ("address", &req.addr),
            ("host name", &req.hostname),
            ("version", &req.version),
        ] {
            if s.len() > SHORT_STRING_BYTES_MAX {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("the {what} is longer than {SHORT_STRING_BYTES_MAX} bytes"),
                ));
            }
        }
        if req.csr_pem.len() > 16 << 10 {
            return Err(err(
                ErrorCode::BadRequest,
                "the certificate request is too large",
            ));
        }
        if req.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(err(
                ErrorCode::BadRequest,
                format!("'{}' is not an ip:port address", req.addr),
            ));
        }
        let Some(ca_key) = self.identity.ca_key_pem.clone() else {
            let holder = self.state.read(|d| {
                d.state
                    .ca_holder
                    .and_then(|h| d.state.nodes.get(&h).cloned())
            });
            let hint = holder.map_or_else(String::new, |h| {
                format!(": join through node {} ({})", h.id, h.addr)
            });
            return Err(err(
                ErrorCode::Unavailable,
                format!("node {} cannot sign certificates{hint}", self.id),
            ));
        };
        let spki = match ca::spki_sha256_of_csr(&req.csr_pem) {
            Ok(s) => s,
            Err(e) => {
                return Err(err(
                    ErrorCode::BadRequest,
                    format!("bad certificate request: {e}"),
                ))
            }
        };
        let token_hash = token::secret_hash(&req.token_secret);
        // Checked against this node's copy of the state before anything is
        // proposed, so that attempts with bad tokens (anyone may try) do not
        // grow the raft log; the state machine checks again. A token made
        // a moment ago may not have reached this node yet: looked at again
        // once, after a commit's time.
        let refusal = |now| {
            self.state
                .read(|d| d.state.token_refusal(&token_hash, now).map(str::to_owned))
        };
        let mut refused = refusal(now_ms());
        if refused.is_some() {
            tokio::time::sleep(TOKEN_RECHECK).await;
            refused = refusal(now_ms());
        }
        if let Some(reason) = refused {
            return Err(err(ErrorCode::BadToken, reason));
        }
        let cmd = Command::Admit {
            token_hash,
            now_ms: now_ms(),
            addr: req.addr.clone(),
            hostname: req.hostname.clone(),
            spki_sha256: spki,
            version: req.version.clone(),
        };
        let id = match self.propose(cmd).await? {
            CommandResult::Admitted(id) => id,
            // The node port logs the refusal, with the peer's address.
            CommandResult::Refused(reason) => return Err(err(ErrorCode::BadToken, reason)),
            CommandResult::Ok => return Err(err(ErrorCode::Internal, "admission gave no node id")),
        };
        let cluster_id = self.identity.meta.cluster_id.clone();
        let cert_pem = ca::issue_node_cert(
            &self.identity.ca_cert_pem,
            &ca_key,
            &req.csr_pem,
            id,
            &cluster_id,
        )
        .map_err(|e| err(ErrorCode::Internal, e.to_string()))?;
        tracing::info!(node = %id, addr = %req.addr, host = %req.hostname, "admitted a new node");
        Ok(JoinAccepted {
            node_id: id,
            cluster_id,
            cert_pem,
            ca_cert_pem: self.identity.ca_cert_pem.clone(),
        })
    }

    /// The state shown for a member: the replicated one, except that an `up`
    /// node we have not heard from lately is `suspect`.
    pub fn shown_state(&self, rec: &NodeRecord) -> NodeState {
        if rec.state == NodeState::Up {
            let live = self
                .view()
                .liveness(rec.id, Instant::now(), self.config.suspect_after);
            if matches!(live, Liveness::Silent(_)) {
                return NodeState::Suspect;
            }
        }
        rec.state
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        let voters = self.voters();
        let records: Vec<NodeRecord> = self
            .state
            .read(|d| d.state.nodes.values().cloned().collect());
        records
            .into_iter()
            .map(|rec| {
                // A down node's last load is history, not its state.
                let load = self
                    .view()
                    .load(rec.id)
                    .cloned()
                    .filter(|l| l.cpus > 0 && rec.state == NodeState::Up);
                NodeView {
                    id: rec.id,
                    state: self.shown_state(&rec),
                    voter: voters.contains(&rec.id),
                    addr: rec.addr,
                    hostname: rec.hostname,
                    version: rec.version,
                    load,
                }
            })
            .collect()
    }
}
