//! Serves the Unix socket. Each connection: a hello, then one request; the
//! caller's uid comes from SO_PEERCRED. Garbage closes that connection only.

use super::Caller;
use crate::cluster::types::{Command, CommandResult};
use crate::identity::{ca, token::JoinToken};
use crate::job::ops;
use crate::node::{now_ms, Node};
use crate::wire::client::{ClientRequest, ClientResponse, ClientResult, ClusterStatus};
use crate::wire::peer::WaitResult;
use crate::wire::{ConnKind, ErrorCode, FrameConn, Hello, RemoteError};
use krg_types::limits::{CLIENT_CONNECTIONS_MAX, HANDSHAKE_TIMEOUT_MS, JOIN_TOKEN_TTL_SECS_MAX};
use std::sync::Arc;

/// Jobs one `krg kill` may name.
const GPIDS_PER_REQUEST_MAX: usize = 4096;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

pub async fn serve(listener: UnixListener, node: Arc<Node>) {
    let slots = Arc::new(Semaphore::new(CLIENT_CONNECTIONS_MAX));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the client socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many client connections ({CLIENT_CONNECTIONS_MAX}); refusing one");
            continue;
        };
        let node = node.clone();
        let accepted = std::time::Instant::now();
        tokio::spawn(async move {
            if let Err(reason) = handle(stream, node, accepted).await {
                tracing::warn!(%reason, "closed a client connection");
            }
            drop(permit);
        });
    }
}

async fn handle(
    stream: UnixStream,
    node: Arc<Node>,
    accepted: std::time::Instant,
) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("no peer credentials: {e}"))?;
    let caller = Caller {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let mut conn = FrameConn::new(stream);
    let hello: Hello = conn
        .recv_timeout(HANDSHAKE_TIMEOUT_MS)
        .await
        .map_err(|e| format!("uid {}: bad hello: {e}", caller.uid))?;
    if let Err(e) = hello.check().and_then(|()| {
        if hello.kind == ConnKind::Client {
            Ok(())
        } else {
            Err(crate::wire::WireError::Closed)
        }
    }) {
        let msg = format!("not a krg client hello: {e}");
        let _ = conn
            .send(&Err::<(), _>(RemoteError::new(
                ErrorCode::BadRequest,
                msg.clone(),
            )))
            .await;
        return Err(msg);
    }
    conn.send(&Ok::<(), RemoteError>(()))
        .await
        .map_err(|e| e.to_string())?;
    let req: ClientRequest = conn
        .recv_timeout(HANDSHAKE_TIMEOUT_MS)
        .await
        .map_err(|e| format!("uid {}: bad request: {e}", caller.uid))?;
    tracing::debug!(us = accepted.elapsed().as_micros(), "timing: request read");
    if let ClientRequest::Run(run) = req {
        crate::job::home::run(node, caller, *run, conn).await;
        return Ok(());
    }
    let resp = dispatch(&node, caller, req).await;
    conn.send(&resp).await.map_err(|e| e.to_string())
}

fn denied(what: &str) -> RemoteError {
    RemoteError::new(
        ErrorCode::PermissionDenied,
        format!("permission denied: only root may {what}"),
    )
}

async fn dispatch(node: &Arc<Node>, caller: Caller, req: ClientRequest) -> ClientResult {
    match req {
        ClientRequest::Status => Ok(ClientResponse::Status(status(node))),
        ClientRequest::Nodes => Ok(ClientResponse::Nodes(node.node_views())),
        ClientRequest::CreateToken { ttl_secs } => {
            if !caller.is_root() {
                return Err(denied("create join tokens"));
            }
            if ttl_secs == 0 || ttl_secs > JOIN_TOKEN_TTL_SECS_MAX {
                return Err(RemoteError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "a token's lifetime must be between 1 s and {JOIN_TOKEN_TTL_SECS_MAX} s"
                    ),
                ));
            }
            let ca_hash = ca::ca_sha256(&node.identity.ca_cert_pem)
                .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?;
            let token = JoinToken::generate(ca_hash);
            let now = now_ms();
            let cmd = Command::AddToken {
                token_hash: token.secret_hash(),
                expires_at_ms: now + ttl_secs * 1000,
                now_ms: now,
            };
            match node.propose(cmd).await? {
                CommandResult::Refused(r) => Err(RemoteError::new(ErrorCode::Refused, r)),
                _ => Ok(ClientResponse::Token(token.to_string())),
            }
        }
        ClientRequest::Run(_) => Err(RemoteError::new(
            ErrorCode::BadRequest,
            "run is served on its own",
        )),
        ClientRequest::Ps => Ok(ClientResponse::Jobs(ops::list_all(node).await)),
        ClientRequest::Signal { gpids, signal } => {
            if gpids.len() > GPIDS_PER_REQUEST_MAX {
                return Err(RemoteError::new(
                    ErrorCode::BadRequest,
                    format!("at most {GPIDS_PER_REQUEST_MAX} jobs at once"),
                ));
            }
            let mut results = Vec::with_capacity(gpids.len());
            for g in gpids {
                results.push((g, ops::signal(node, g, signal, caller.uid).await));
            }
            Ok(ClientResponse::Signaled(results))
        }
        ClientRequest::Wait { gpid } => loop {
            match ops::wait_once(node, gpid, caller.uid).await? {
                WaitResult::Running => continue,
                done => return Ok(ClientResponse::Waited(done)),
            }
        },
        ClientRequest::Logs { gpid, offset } => {
            let (data, done) = ops::read_log(node, gpid, caller.uid, offset).await?;
            Ok(ClientResponse::Log {
                data: serde_bytes::ByteBuf::from(data),
                done,
            })
        }
        ClientRequest::Events { since_ms } => {
            Ok(ClientResponse::Events(ops::events(node, since_ms).await))
        }
        ClientRequest::Caps { gpid, changes } => {
            let gpid = match gpid {
                Some(g) => g,
                None => caller
                    .pid
                    .and_then(|pid| crate::job::home::job_of_pid(node, pid))
                    .map(|b| b.gpid)
                    .ok_or_else(|| {
                        RemoteError::new(
                            ErrorCode::BadRequest,
                            "not inside a krg job: name one with -k GPID",
                        )
                    })?,
            };
            let caps = ops::caps(node, gpid, caller.uid, changes).await?;
            Ok(ClientResponse::Caps { gpid, caps })
        }
        ClientRequest::Migrate {
            gpid,
            node: target,
            mode,
        } => Ok(ClientResponse::Migrated(
            ops::migrate(node, gpid, target, mode, caller.uid).await?,
        )),
        ClientRequest::Checkpoint { gpid, after } => Ok(ClientResponse::ImageSaved(
            ops::checkpoint(node, gpid, after, caller.uid).await?,
        )),
        ClientRequest::Restart {
            gpid,
            version,
            node: target,
        } => {
            let (version, at) = ops::restart(node, gpid, version, target, caller.uid).await?;
            Ok(ClientResponse::Restarted {
                gpid,
                version,
                node: at,
            })
        }
        ClientRequest::Images { gpid } => {
            Ok(ClientResponse::Images(ops::images(node, gpid, caller.uid)))
        }
        ClientRequest::ImagesRm { gpid, version } => {
            ops::images_rm(node, gpid, version, caller.uid).await?;
            Ok(ClientResponse::Done)
        }
        ClientRequest::SchedShow => Ok(ClientResponse::Sched(
            node.state.read(|d| d.state.sched.clone()),
        )),
        ClientRequest::SchedSet(cfg) => {
            if !caller.is_root() {
                return Err(denied("change the scheduler's policies"));
            }
            cfg.check()
                .map_err(|e| RemoteError::new(ErrorCode::BadRequest, e))?;
            match node.propose(Command::SetSched(cfg.clone())).await? {
                CommandResult::Refused(r) => Err(RemoteError::new(ErrorCode::Refused, r)),
                _ => Ok(ClientResponse::Sched(cfg)),
            }
        }
        ClientRequest::Features => Ok(ClientResponse::Features(Box::new(
            tokio::task::spawn_blocking(crate::features::probe)
                .await
                .map_err(|e| RemoteError::new(ErrorCode::Internal, e.to_string()))?,
        ))),
    }
}

fn status(node: &Node) -> ClusterStatus {
    let views = node.node_views();
    ClusterStatus {
        cluster_id: node.identity.meta.cluster_id.clone(),
        this_node: node.id,
        leader: node.leader(),
        voters: node.voters(),
        nodes: views.iter().map(|v| (v.id, v.state)).collect(),
        applied_index: node.state.read(|d| d.last_applied.map_or(0, |l| l.index)),
    }
}
