//! One `criu swrk` started ahead of the next dump, once a dump has been done
//! on this node.
//!
//! A dump's CRIU is started when its move or checkpoint begins, before the
//! job is frozen; but CRIU's own start-up (the exec and dynamic linking of
//! its binary and 19 libraries, about 4.5 ms here) outlasts what comes
//! before the freeze, and krgd's log showed the dump's first notice 4.7-5.4
//! ms after its request: the rest of that start-up, in the job's freeze. A
//! CRIU that waits for a request needs nothing of the job (a dump's RPC
//! carries everything), so one is made after each dump, by a thread of its
//! own that lives as long as this node's CRIU: `criu swrk` is started with
//! a parent-death signal, and dies with the thread that started it.
//!
//! A spare whose binary has changed since (an upgrade of CRIU) is not used.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use super::rpc::Started;

/// What identifies the binary a spare runs: device, inode, size and
/// modification time of `criu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BinaryId(u64, u64, u64, i64, i64);

impl BinaryId {
    fn of(binary: &Path) -> Option<BinaryId> {
        let m = std::fs::metadata(binary).ok()?;
        Some(BinaryId(
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
        ))
    }
}

/// The spare of one CRIU binary.
pub struct SpareDump {
    binary: PathBuf,
    waiting: Mutex<Option<(Started, BinaryId)>>,
    /// Asks the maker thread for the next spare; the thread is started by
    /// the first [`SpareDump::refill`].
    maker: OnceLock<Mutex<Sender<()>>>,
}

impl std::fmt::Debug for SpareDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpareDump")
            .field("binary", &self.binary)
            .finish_non_exhaustive()
    }
}

impl SpareDump {
    pub fn new(binary: PathBuf) -> SpareDump {
        SpareDump {
            binary,
            waiting: Mutex::new(None),
            maker: OnceLock::new(),
        }
    }

    /// The spare, if one waits and its binary is still the one installed.
    pub fn take(&self) -> Option<Started> {
        let (started, id) = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        (BinaryId::of(&self.binary) == Some(id)).then_some(started)
    }

    /// Has the next spare made, in the background, unless one waits.
    /// Called once a dump has ended, so that the new CRIU's start-up does
    /// not compete with a job's freeze.
    pub fn refill(self: &Arc<Self>) {
        let maker = self.maker.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<()>();
            // Weak: the thread ends with the last owner of this spare
            // (its sender goes then), and kills the spare it made.
            let spare: Weak<SpareDump> = Arc::downgrade(self);
            let spawned = std::thread::Builder::new()
                .name("krg-criu-spare".into())
                .spawn(move || {
                    while rx.recv().is_ok() {
                        match spare.upgrade() {
                            Some(spare) => spare.make_one(),
                            None => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!("cannot start the thread that keeps a criu ready: {e}");
            }
            Mutex::new(tx)
        });
        let _ = maker.lock().unwrap_or_else(|p| p.into_inner()).send(());
    }

    fn make_one(&self) {
        if self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return;
        }
        let Some(id) = BinaryId::of(&self.binary) else {
            return;
        };
        match super::dump::start(&self.binary) {
            Ok(started) => {
                *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((started, id));
            }
            Err(e) => tracing::warn!("cannot start a criu ahead of the next dump: {e}"),
        }
    }
}
