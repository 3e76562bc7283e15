//! The node port's listener.
//!
//! Every connection is TLS. It must open with a [`Hello`] within the
//! handshake timeout. `Rpc` connections need a client certificate signed by
//! the cluster CA; `Join` is the only kind a certificate-less machine may
//! open. Anything else — garbage, truncated or oversized frames, a wrong
//! version — closes that connection with a logged reason, and the listener
//! goes on serving everybody else.

use crate::identity::ca::{node_id_of_der, spki_sha256_of_der};
use crate::node::Node;
use crate::wire::peer::{JoinRequest, JoinResponse, PeerFrame};
use crate::wire::{ConnKind, ErrorCode, FrameConn, Hello, RemoteError};
use futures::{SinkExt, StreamExt};
use krg_types::limits::{HANDSHAKE_TIMEOUT_MS, PEER_CONNECTIONS_MAX};
use krg_types::NodeId;
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Requests of one peer handled at once; more wait (back-pressure).
const REQUESTS_IN_FLIGHT_MAX: usize = 256;

pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, node: Arc<Node>) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = Arc::new(Semaphore::new(PEER_CONNECTIONS_MAX));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed on the node port");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many peer connections ({PEER_CONNECTIONS_MAX}); refusing one");
            continue;
        };
        let acceptor = acceptor.clone();
        let node = node.clone();
        tokio::spawn(async move {
            if let Err(reason) = handle(tcp, remote, acceptor, node).await {
                tracing::warn!(%remote, %reason, "closed a node-port connection");
            }
            drop(permit);
        });
    }
}

async fn handle(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    node: Arc<Node>,
) -> Result<(), String> {
    tcp.set_nodelay(true).ok();
    let timeout = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
    let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| "no TLS handshake in time".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let mut conn = FrameConn::new(tls);
    let hello: Hello = conn
        .recv_timeout(HANDSHAKE_TIMEOUT_MS)
        .await
        .map_err(|e| format!("bad hello: {e}"))?;
    if let Err(e) = hello.check() {
        let _ = conn
            .send(&Err::<(), _>(RemoteError::new(
                ErrorCode::BadRequest,
                e.to_string(),
            )))
            .await;
        return Err(e.to_string());
    }
    match hello.kind {
        ConnKind::Join => join(conn, remote, node).await,
        ConnKind::Rpc => {
            let from = match authenticate(peer.as_deref(), &node) {
                Ok(id) => id,
                Err(reason) => {
                    let _ = conn
                        .send(&Err::<(), _>(RemoteError::new(
                            ErrorCode::PermissionDenied,
                            reason.clone(),
                        )))
                        .await;
                    return Err(reason);
                }
            };
            conn.send(&Ok::<(), RemoteError>(()))
                .await
                .map_err(|e| e.to_string())?;
            rpc_loop(conn, from, node).await
        }
        ConnKind::Stream => {
            let from = match authenticate(peer.as_deref(), &node) {
                Ok(id) => id,
                Err(reason) => {
                    let _ = conn
                        .send(&Err::<(), _>(RemoteError::new(
                            ErrorCode::PermissionDenied,
                            reason.clone(),
                        )))
                        .await;
                    return Err(reason);
                }
            };
            conn.send(&Ok::<(), RemoteError>(()))
                .await
                .map_err(|e| e.to_string())?;
            crate::job::link::serve(node, from, conn).await
        }
        ConnKind::Client => {
            let reason = format!(
                "connection kind {:?} is not served on the node port",
                hello.kind
            );
            let _ = conn
                .send(&Err::<(), _>(RemoteError::new(
                    ErrorCode::BadRequest,
                    reason.clone(),
                )))
                .await;
            Err(reason)
        }
    }
}

fn authenticate(cert: Option<&[u8]>, node: &Node) -> Result<NodeId, String> {
    let cert = cert.ok_or_else(|| {
        "a client certificate signed by this cluster's CA is required".to_string()
    })?;
    let id = node_id_of_der(cert)
        .ok_or_else(|| "the client certificate names no krg node".to_string())?;
    let spki = spki_sha256_of_der(cert).map_err(|e| e.to_string())?;
    node.authorize_peer(id, &spki)?;
    Ok(id)
}

async fn join(
    mut conn: FrameConn<TlsStream<TcpStream>>,
    remote: SocketAddr,
    node: Arc<Node>,
) -> Result<(), String> {
    conn.send(&Ok::<(), RemoteError>(()))
        .await
        .map_err(|e| e.to_string())?;
    let req: JoinRequest = conn
        .recv_timeout(HANDSHAKE_TIMEOUT_MS)
        .await
        .map_err(|e| format!("bad join request: {e}"))?;
    let resp: JoinResponse = node.handle_join(req, remote.to_string()).await;
    if let Err(e) = &resp {
        tracing::warn!(%remote, reason = %e.message, "join refused");
    }
    conn.send(&resp).await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn rpc_loop(
    conn: FrameConn<TlsStream<TcpStream>>,
    from: NodeId,
    node: Arc<Node>,
) -> Result<(), String> {
    let (mut sink, mut stream) = conn.into_inner().split();
    let (tx, mut rx) = mpsc::channel::<PeerFrame>(REQUESTS_IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            let Ok(bytes) = crate::wire::encode(&frame) else {
                continue;
            };
            if sink.send(bytes).await.is_err() {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let result = loop {
        let frame = match stream.next().await {
            None => break Ok(()),
            // A peer that dies or restarts drops its connection: not news.
            Some(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                break Ok(())
            }
            Some(Err(e)) => break Err(format!("node {from}: {e}")),
            Some(Ok(f)) => f,
        };
        let (id, body) = match crate::wire::decode::<PeerFrame>(&frame) {
            Ok(PeerFrame::Request { id, body }) => (id, body),
            Ok(PeerFrame::Response { .. }) => {
                break Err(format!(
                    "node {from} sent a response on a server connection"
                ))
            }
            Err(e) => break Err(format!("node {from} sent an undecodable frame: {e}")),
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Ok(());
        };
        let node = node.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let body = node.handle_peer(from, body).await;
            if id != 0 {
                let _ = tx.send(PeerFrame::Response { id, body }).await;
            }
            drop(permit);
        });
    };
    drop(tx);
    let _ = writer.await;
    result
}
