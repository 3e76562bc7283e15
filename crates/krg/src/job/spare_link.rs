//! Stream connections ready for a job's first frame, so that a job launched
//! on a peer does not wait for TCP, TLS and the stream hello (about 1 ms of
//! a remote `krg run`, measured in `benches/run_latency`).
//!
//! Two sources: a connection made in the background when a launch took the
//! last spare to its peer, and the connection of a job that has ended
//! (`ToBody::Release`), which spares both nodes a TLS handshake per job. At
//! most [`SPARES_PER_PEER`] are kept per peer, the freshest used first,
//! each for less time than the peer waits for a stream's first frame
//! (`HANDSHAKE_TIMEOUT_MS`), then closed cleanly; one the peer has closed
//! meanwhile (it restarted, or the network broke) is seen before use and
//! not taken.

use crate::wire::FrameConn;
use krg_types::limits::HANDSHAKE_TIMEOUT_MS;
use krg_types::NodeId;
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A stream connection, authenticated, hello answered, no frame sent yet.
pub type StreamConn = FrameConn<TlsStream<TcpStream>>;

/// How long a spare is kept: well within the peer's wait for its first
/// frame, so that it cannot close it while we send.
pub const SPARE_MAX_AGE: Duration = Duration::from_millis(HANDSHAKE_TIMEOUT_MS / 2);

/// Enough for the jobs a node launches at once on one peer to come back
/// to a connection each (16 at a time in `benches/run_latency`'s burst
/// reuse them from the second round on), few enough to hold little.
pub const SPARES_PER_PEER: usize = 16;

/// Spare connections per peer, oldest first.
#[derive(Default)]
pub struct SpareLinks {
    spares: Mutex<HashMap<NodeId, Vec<(StreamConn, Instant)>>>,
}

impl SpareLinks {
    /// The freshest open spare connection to `target`, if there is one.
    pub fn take(&self, target: NodeId) -> Option<StreamConn> {
        loop {
            let (conn, made) = self.lock().get_mut(&target)?.pop()?;
            if made.elapsed() < SPARE_MAX_AGE && still_open(&conn) {
                return Some(conn);
            }
            retire(conn);
        }
    }

    /// Keeps `conn` as a spare to `target`; closes it if there are enough.
    /// Not left open past its use-by time: the caller has `self` look again
    /// then ([`SpareLinks::put_for_a_while`]).
    fn put(&self, target: NodeId, conn: StreamConn) {
        self.drop_stale();
        let mut spares = self.lock();
        let list = spares.entry(target).or_default();
        if list.len() < SPARES_PER_PEER {
            list.push((conn, Instant::now()));
        } else {
            drop(spares);
            retire(conn);
        }
    }

    /// [`SpareLinks::put`], and the stale spares closed once this one is.
    pub fn put_for_a_while(self: &Arc<Self>, target: NodeId, conn: StreamConn) {
        self.put(target, conn);
        let spares = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SPARE_MAX_AGE).await;
            spares.drop_stale();
        });
    }

    /// Closes the spares that are too old to be used.
    pub fn drop_stale(&self) {
        let mut stale = Vec::new();
        {
            let mut spares = self.lock();
            for list in spares.values_mut() {
                let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|(_, made)| made.elapsed() >= SPARE_MAX_AGE);
                *list = fresh;
                stale.extend(old.into_iter().map(|(conn, _)| conn));
            }
            spares.retain(|_, list| !list.is_empty());
        }
        stale.into_iter().for_each(retire);
    }

    pub fn has(&self, target: NodeId) -> bool {
        self.lock().get(&target).is_some_and(|l| !l.is_empty())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Vec<(StreamConn, Instant)>>> {
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
