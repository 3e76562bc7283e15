//! Stream connections made ahead of need: one per peer at most, so that a
//! job launched there does not wait for TCP, TLS and the stream hello
//! (about 1 ms of a remote `krg run`, measured in `benches/run_latency`).
//!
//! A spare is made after each use, in the background, and kept for less
//! time than the peer waits for a stream's first frame
//! (`HANDSHAKE_TIMEOUT_MS`), then closed cleanly; one the peer has closed
//! meanwhile (it restarted, or the network broke) is seen before use and
//! not taken.

use crate::wire::FrameConn;
use krg_types::limits::HANDSHAKE_TIMEOUT_MS;
use krg_types::NodeId;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A stream connection, authenticated, hello answered, no frame sent yet.
pub type StreamConn = FrameConn<TlsStream<TcpStream>>;

/// How long a spare is kept: well within the peer's wait for its first
/// frame, so that it cannot close it while we send.
pub const SPARE_MAX_AGE: Duration = Duration::from_millis(HANDSHAKE_TIMEOUT_MS / 2);

#[derive(Default)]
pub struct SpareLinks {
    spares: Mutex<HashMap<NodeId, (StreamConn, Instant)>>,
}

impl SpareLinks {
    /// The spare connection to `target`, if there is a fresh, open one.
    pub fn take(&self, target: NodeId) -> Option<StreamConn> {
        let (conn, made) = self.lock().remove(&target)?;
        if made.elapsed() < SPARE_MAX_AGE && still_open(&conn) {
            return Some(conn);
        }
        retire(conn);
        None
    }

    /// Keeps `conn` as the spare to `target`, unless there is one already.
    pub fn put(&self, target: NodeId, conn: StreamConn) {
        self.drop_stale();
        self.lock().entry(target).or_insert((conn, Instant::now()));
    }

    /// Closes the spares that are too old to be used.
    pub fn drop_stale(&self) {
        let stale: Vec<StreamConn> = {
            let mut spares = self.lock();
            let old: Vec<NodeId> = spares
                .iter()
                .filter(|(_, (_, made))| made.elapsed() >= SPARE_MAX_AGE)
                .map(|(id, _)| *id)
                .collect();
            old.iter()
                .filter_map(|id| spares.remove(id).map(|(conn, _)| conn))
                .collect()
        };
        stale.into_iter().for_each(retire);
    }

    pub fn has(&self, target: NodeId) -> bool {
        self.lock().contains_key(&target)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, (StreamConn, Instant)>> {
        self.spares.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Closes an unused spare as TLS asks (close_notify), so that the peer
/// sees a stream that ended before its first frame, not a broken one.
fn retire(conn: StreamConn) {
    tokio::spawn(async move {
        let mut tls = conn.into_inner().into_inner();
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
    });
}

/// The peer sends nothing on a spare before its first frame: anything to
/// read, an end of file or an error means that it is closed.
fn still_open(conn: &StreamConn) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.get_ref().get_ref().0.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 0
}
