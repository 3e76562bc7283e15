//! The stream connection between a job's home node and its execution node:
//! a TLS connection of kind `Stream` that opens with the launch
//! specification and then carries `ToBody` frames one way and `FromBody`
//! frames the other. If it breaks before the job's exit status crossed it,
//! the home side reports the job lost.

use super::body::{self, BodyLink, LINK_FRAMES_MAX};
use super::spare_link::StreamConn;
use super::spec::LaunchSpec;
use crate::identity::ca::node_id_of_der;
use crate::identity::tls::server_name;
use crate::node::Node;
use crate::peer::pool::CONNECT_TIMEOUT;
use crate::wire::stream::{FromBody, ToBody};
use crate::wire::{ConnKind, ErrorCode, FrameConn, Hello, RemoteError, WireError};
use futures::{SinkExt, StreamExt};
use krg_types::limits::HANDSHAKE_TIMEOUT_MS;
use krg_types::{Gpid, NodeId, NodeState};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

fn unavailable(msg: String) -> RemoteError {
    RemoteError::new(ErrorCode::Unavailable, msg)
}

/// Home side: starts `spec` on `target` and returns the link to its body.
pub async fn open(
    node: &Arc<Node>,
    target: NodeId,
    spec: LaunchSpec,
) -> Result<BodyLink, RemoteError> {
    connect(node, target, ToBody::Launch(Box::new(spec))).await
}

/// Home side: the link to a body that moved (or was restarted) on `target`.
pub async fn reattach(
    node: &Arc<Node>,
    target: NodeId,
    gpid: Gpid,
) -> Result<BodyLink, RemoteError> {
    if target == node.id {
        return node.jobs.attach_slot_take(gpid).ok_or_else(|| {
            RemoteError::new(
                ErrorCode::NotFound,
                format!("job {gpid} is not waiting on node {target}"),
            )
        });
    }
    connect(node, target, ToBody::Reattach(gpid)).await
}

async fn connect(node: &Arc<Node>, target: NodeId, first: ToBody) -> Result<BodyLink, RemoteError> {
    let addr = node
        .state
        .read(|d| d.state.nodes.get(&target).map(|n| n.addr.clone()))
        .ok_or_else(|| {
            RemoteError::new(
                ErrorCode::NotFound,
                format!("node {target} is not a member of this cluster"),
            )
        })?;
    let mut conn = match node.spare_links.take(target) {
        Some(conn) => conn,
        None => open_stream(node, target, &addr).await?,
    };
    conn.send(&first)
        .await
        .map_err(|e| unavailable(format!("node {target}: {e}")))?;
    make_spare(node.clone(), target, addr);
    let (to_tx, to_rx) = mpsc::channel(LINK_FRAMES_MAX);
    let (from_tx, from_rx) = mpsc::channel(LINK_FRAMES_MAX);
    tokio::spawn(home_pump(node.clone(), target, conn, to_rx, from_tx));
    Ok(BodyLink {
        tx: to_tx,
        rx: from_rx,
    })
}

/// TCP, TLS (the peer must show `target`'s certificate) and the stream
/// hello: a connection ready for its first frame.
async fn open_stream(node: &Node, target: NodeId, addr: &str) -> Result<StreamConn, RemoteError> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unavailable(format!("node {target} is unreachable: {e}")))?;
        tcp.set_nodelay(true).ok();
        let tls = TlsConnector::from(node.peers.tls())
            .connect(server_name(), tcp)
            .await
            .map_err(|e| unavailable(format!("node {target} is unreachable: TLS: {e}")))?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| node_id_of_der(c.as_ref()));
        if peer != Some(target) {
            return Err(unavailable(format!(
                "the address of node {target} answers with another node's certificate"
            )));
        }
        let mut conn = FrameConn::new(tls);
        conn.send(&Hello::new(ConnKind::Stream))
            .await
            .map_err(|e| unavailable(format!("node {target}: {e}")))?;
        let ok: Result<(), RemoteError> = conn
            .recv_timeout(HANDSHAKE_TIMEOUT_MS)
            .await
            .map_err(|e| unavailable(format!("node {target}: {e}")))?;
        ok?;
        Ok(conn)
    };
    tokio::time::timeout(CONNECT_TIMEOUT * 2, connect)
        .await
        .map_err(|_| unavailable(format!("node {target} did not answer in time")))?
}

/// Makes the next connection to `target` in the background, for the next
/// launch there (`spare_link`).
fn make_spare(node: Arc<Node>, target: NodeId, addr: String) {
    if node.spare_links.has(target) {
        return;
    }
    tokio::spawn(async move {
        match open_stream(&node, target, &addr).await {
            Ok(conn) => node.spare_links.put_for_a_while(target, conn),
            Err(e) => tracing::debug!(%target, error = %e.message, "no spare stream connection"),
        }
    });
}

async fn home_pump(
    node: Arc<Node>,
    target: NodeId,
    conn: StreamConn,
    mut to_rx: mpsc::Receiver<ToBody>,
    from_tx: mpsc::Sender<FromBody>,
) {
    let (mut sink, mut stream) = conn.into_inner().split();
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    // Gives its half of the connection back when asked to stop between two
    // frames (never in the middle of one), or when the deputy is gone.
    let writer = tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                biased;
                _ = &mut stop_rx => return Some(sink),
                frame = to_rx.recv() => frame,
            };
            let Some(frame) = frame else {
                return Some(sink);
            };
            let Ok(bytes) = crate::wire::encode(&frame) else {
                continue;
            };
            if sink.send(bytes).await.is_err() {
                return None;
            }
        }
    });
    let mut changed = node.state.changed.subscribe();
    let target_down = |node: &Node| {
        node.state.read(|d| {
            d.state
                .nodes
                .get(&target)
                .is_none_or(|n| n.state == NodeState::Down || n.state == NodeState::Left)
        })
    };
    let mut exited = false;
    let mut job_ended = false;
    loop {
        tokio::select! {
            frame = stream.next() => {
                let Some(Ok(frame)) = frame else { break };
                let Ok(msg) = crate::wire::decode::<FromBody>(&frame) else {
                    tracing::warn!(node = %target, "undecodable stream frame; closing the job's link");
                    break;
                };
                // The link ends in order with the job's end, its move or its
                // checkpoint; any other end means the node is lost.
                exited = matches!(
                    msg,
                    FromBody::Exited(_) | FromBody::Moved { .. } | FromBody::Checkpointed { .. }
                );
                job_ended = matches!(msg, FromBody::Exited(_));
                if from_tx.send(msg).await.is_err() {
                    break;
                }
                if exited {
                    break;
                }
            }
            _ = changed.changed() => {
                // Only the replicated state declares a node dead: then the
                // job is lost, whatever the TCP connection still believes.
                if target_down(&node) {
                    break;
                }
            }
        }
    }
    if !exited {
        writer.abort();
        let _ = from_tx.send(FromBody::Lost { node: target }).await;
        return;
    }
    drop(from_tx);
    if !job_ended {
        writer.abort();
        return;
    }
    // The job has ended: its connection serves the next launch there.
    let _ = stop_tx.send(());
    let Ok(Some(sink)) = writer.await else {
        return;
    };
    let Ok(framed) = sink.reunite(stream) else {
        return;
    };
    let mut conn = FrameConn::from_framed(framed);
    if conn.send(&ToBody::Release).await.is_ok() {
        node.spare_links.put_for_a_while(target, conn);
    }
}

/// Execution side: serves one `Stream` connection from a home node, job
/// after job while the home node releases it after each (`Release`).
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    node: Arc<Node>,
    from: NodeId,
    mut conn: FrameConn<S>,
) -> Result<(), String> {
    loop {
        match serve_one(&node, from, conn).await? {
            Some(released) => conn = released,
            None => return Ok(()),
        }
    }
}

/// One job on a stream connection; the connection again if the home node
/// released it once the job had ended.
async fn serve_one<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    node: &Arc<Node>,
    from: NodeId,
    mut conn: FrameConn<S>,
) -> Result<Option<FrameConn<S>>, String> {
    let first: ToBody = match conn.recv_timeout(HANDSHAKE_TIMEOUT_MS).await {
        Ok(first) => first,
        // A spare connection (`spare_link`) that was never used: the
        // peer closed it, or kept it past our wait.
        Err(WireError::Closed | WireError::Timeout(_)) => {
            tracing::debug!(%from, "a spare stream connection ended unused");
            return Ok(None);
        }
        Err(e) => return Err(format!("node {from}: bad launch: {e}")),
    };
    let (gpid, BodyLink { tx, mut rx }) = match first {
        ToBody::Launch(spec) => {
            let gpid = spec.gpid;
            if gpid.home_node() != from {
                return Err(format!(
                    "node {from} launched job {gpid}, whose home is another node"
                ));
            }
            (gpid, body::start(node, *spec))
        }
        ToBody::Reattach(gpid) => match node.jobs.attach_slot_take(gpid) {
            Some(link) => (gpid, link),
            None => {
                let _ = conn
                    .send(&FromBody::Failed {
                        error: RemoteError::new(
                            ErrorCode::NotFound,
                            format!("job {gpid} is not waiting on node {}", node.id),
                        ),
                        exit_code: 255,
                    })
                    .await;
                return Err(format!(
                    "node {from} reattached to job {gpid}, which is not here"
                ));
            }
        },
        _ => return Err(format!("node {from} opened a stream without a launch")),
    };
    let (mut sink, mut stream) = conn.into_inner().split();
    // Gives its half back on `Release`; frames for a body that has ended
    // meanwhile are dropped.
    let mut reader = tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Some(Ok(frame)) = stream.next().await {
            match crate::wire::decode::<ToBody>(&frame) {
                Ok(ToBody::Release) => return Some(stream),
                Ok(ToBody::Launch(_)) | Err(_) => {
                    tracing::warn!(node = %from, gpid = %gpid, "bad frame on a job stream; hanging the job up");
                    break;
                }
                Ok(msg) => {
                    if let Some(body) = &tx {
                        if body.send(msg).await.is_err() {
                            tx = None;
                        }
                    }
                }
            }
        }
        // Dropping `tx` tells the body its deputy is gone.
        None
    });
    let mut ended = false;
    while let Some(msg) = rx.recv().await {
        ended = matches!(msg, FromBody::Exited(_));
        let Ok(bytes) = crate::wire::encode(&msg) else {
            continue;
        };
        if sink.send(bytes).await.is_err() {
            ended = false;
            break;
        }
        if ended {
            // The last frame of a job; the home node answers `Release`.
            break;
        }
    }
    if ended {
        let wait = std::time::Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
        match tokio::time::timeout(wait, &mut reader).await {
            Ok(Ok(Some(stream))) => {
                if let Ok(framed) = sink.reunite(stream) {
                    return Ok(Some(FrameConn::from_framed(framed)));
                }
            }
            Ok(_) => {}
            Err(_) => reader.abort(),
        }
        return Ok(None);
    }
    let _ = sink.close().await;
    reader.abort();
    Ok(None)
}
