//! Client connections to other members, one multiplexed connection per peer.
//!
//! Requests carry an id; a reader task routes each response to its waiter.
//! A broken connection fails every waiter at once and is replaced on the
//! next call, so a dead peer costs a connect timeout, never a hang.

use crate::identity::ca::node_id_of_der;
use crate::identity::tls::server_name;
use crate::wire::peer::{PeerFrame, PeerRequest, PeerResponse};
use crate::wire::{ConnKind, FrameConn, Hello, RemoteError};
use futures::{SinkExt, StreamExt};
use krg_types::NodeId;
use rustls::ClientConfig;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;

/// Time to open a TCP connection and finish the TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Frames queued towards one peer before senders wait.
const OUTBOX_FRAMES_MAX: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("node {node} ({addr}) is unreachable: {reason}")]
    Unreachable {
        node: NodeId,
        addr: String,
        reason: String,
    },
    #[error("node {node} did not answer within {ms} ms")]
    Timeout { node: NodeId, ms: u128 },
    #[error("connection to node {node} was lost")]
    Lost { node: NodeId },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

type Waiter = oneshot::Sender<Result<PeerResponse, RemoteError>>;

struct Conn {
    addr: String,
    outbox: mpsc::Sender<PeerFrame>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    next_id: AtomicU64,
    closed: AtomicBool,
}

impl Conn {
    fn fail_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let waiters = std::mem::take(&mut *self.waiters.lock().unwrap_or_else(|p| p.into_inner()));
        drop(waiters);
    }
}

pub struct PeerPool {
    tls: Arc<ClientConfig>,
    conns: tokio::sync::Mutex<HashMap<NodeId, Arc<Conn>>>,
}

impl PeerPool {
    pub fn new(tls: Arc<ClientConfig>) -> Self {
        PeerPool {
            tls,
            conns: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The client TLS configuration (for connections outside the pool).
    pub fn tls(&self) -> Arc<ClientConfig> {
        self.tls.clone()
    }

    /// Sends a request and waits for its response.
    pub async fn call(
        &self,
        node: NodeId,
        addr: &str,
        req: PeerRequest,
        timeout: Duration,
    ) -> Result<PeerResponse, PeerError> {
        let conn = self.conn(node, addr).await?;
        let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let frame = PeerFrame::Request { id, body: req };
        let sent = tokio::time::timeout(timeout, conn.outbox.send(frame)).await;
        if !matches!(sent, Ok(Ok(()))) {
            conn.waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(PeerError::Lost { node });
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => {
                conn.waiters
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(PeerError::Timeout {
                    node,
                    ms: timeout.as_millis(),
                })
            }
            Ok(Err(_)) => Err(PeerError::Lost { node }),
            Ok(Ok(Err(remote))) => Err(PeerError::Remote(remote)),
            Ok(Ok(Ok(resp))) => Ok(resp),
        }
    }

    /// Sends a one-way message; drops it if the peer's queue is full (gossip
    /// is periodic: the next round carries fresher news anyway).
    pub async fn notify(
        &self,
        node: NodeId,
        addr: &str,
        req: PeerRequest,
    ) -> Result<(), PeerError> {
        let conn = self.conn(node, addr).await?;
        let _ = conn
            .outbox
            .try_send(PeerFrame::Request { id: 0, body: req });
        Ok(())
    }

    /// Forgets the connection to a node (e.g. after it changed address).
    pub async fn forget(&self, node: NodeId) {
        if let Some(c) = self.conns.lock().await.remove(&node) {
            c.fail_all();
        }
    }

    async fn conn(&self, node: NodeId, addr: &str) -> Result<Arc<Conn>, PeerError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&node) {
            if !c.closed.load(Ordering::SeqCst) && c.addr == addr {
                return Ok(c.clone());
            }
            c.fail_all();
            conns.remove(&node);
        }
        // Connecting under the lock serialises connects to all peers; keep
        // it short with the timeout, and remember failures only briefly.
        drop(conns);
        let conn = self.connect(node, addr).await?;
        let mut conns = self.conns.lock().await;
        if let Some(existing) = conns.get(&node) {
            if !existing.closed.load(Ordering::SeqCst) && existing.addr == addr {
                conn.fail_all();
                return Ok(existing.clone());
            }
        }
        conns.insert(node, conn.clone());
        Ok(conn)
    }

    async fn connect(&self, node: NodeId, addr: &str) -> Result<Arc<Conn>, PeerError> {
        let unreachable = |reason: String| PeerError::Unreachable {
            node,
            addr: addr.to_string(),
            reason,
        };
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tcp.set_nodelay(true).ok();
            let tls = TlsConnector::from(self.tls.clone())
                .connect(server_name(), tcp)
                .await
                .map_err(|e| unreachable(format!("TLS handshake failed: {e}")))?;
            let peer_id = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| node_id_of_der(c.as_ref()));
            if peer_id != Some(node) {
                return Err(unreachable(format!(
                    "the certificate there belongs to {}",
                    peer_id.map_or_else(|| "no node".to_string(), |p| format!("node {p}"))
                )));
            }
            let mut fc = FrameConn::new(tls);
            fc.send(&Hello::new(ConnKind::Rpc))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let reply: Result<(), RemoteError> = fc
                .recv_timeout(CONNECT_TIMEOUT.as_millis() as u64)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            reply.map_err(|e| unreachable(e.message))?;
            Ok(fc)
        };
        let fc = tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| unreachable("connection timed out".into()))??;
        let (outbox, mut rx) = mpsc::channel::<PeerFrame>(OUTBOX_FRAMES_MAX);
        let conn = Arc::new(Conn {
            addr: addr.to_string(),
            outbox,
            waiters: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let (mut sink, mut stream) = fc.into_inner().split();
        let writer_conn = conn.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                let Ok(bytes) = crate::wire::encode(&frame) else {
                    continue;
                };
                if sink.send(bytes).await.is_err() {
                    break;
                }
            }
            writer_conn.fail_all();
        });
        let reader_conn = conn.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = stream.next().await {
                match crate::wire::decode::<PeerFrame>(&frame) {
                    Ok(PeerFrame::Response { id, body }) => {
                        let w = reader_conn
                            .waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if let Some(w) = w {
                            let _ = w.send(body);
                        }
                    }
                    Ok(PeerFrame::Request { .. }) => {
                        tracing::warn!(node = %node, "peer sent a request on a client connection; closing");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "undecodable frame from peer; closing");
                        break;
                    }
                }
            }
            reader_conn.fail_all();
        });
        Ok(conn)
    }
}
