//! Hands out this node's gpids. Sequence numbers are reserved on disk in
//! blocks before use, so a restart never gives out a gpid twice.

use krg_types::gpid::GPID_SEQ_MAX;
use krg_types::{Gpid, NodeId};
use std::path::PathBuf;
use std::sync::Mutex;

const BLOCK: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum GpidAllocError {
    #[error("cannot record gpid reservations in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this node has used all {GPID_SEQ_MAX} gpid sequence numbers")]
    Exhausted,
}

pub struct GpidAllocator {
    home: NodeId,
    file: PathBuf,
    inner: Mutex<(u64, u64)>, // (next, reserved_until)
}

impl GpidAllocator {
    pub fn open(home: NodeId, file: PathBuf) -> Result<Self, GpidAllocError> {
        let next = match std::fs::read_to_string(&file) {
            Ok(t) => t.trim().parse::<u64>().unwrap_or(1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(source) => return Err(GpidAllocError::Io { path: file, source }),
        };
        Ok(GpidAllocator {
            home,
            file,
            inner: Mutex::new((next.max(1), next.max(1))),
        })
    }

    pub fn next(&self) -> Result<Gpid, GpidAllocError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 >= g.1 {
            let until = (g.1 + BLOCK).min(GPID_SEQ_MAX + 1);
            if g.0 > GPID_SEQ_MAX {
                return Err(GpidAllocError::Exhausted);
            }
            let tmp = self.file.with_extension("tmp");
            std::fs::write(&tmp, until.to_string())
                .and_then(|()| std::fs::rename(&tmp, &self.file))
                .map_err(|source| GpidAllocError::Io {
                    path: self.file.clone(),
                    source,
                })?;
            g.1 = until;
        }
        let seq = g.0;
        g.0 += 1;
        Gpid::new(self.home, seq).map_err(|_| GpidAllocError::Exhausted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_never_repeats_a_gpid() {
        let file = std::env::temp_dir().join(format!("krg-gpid-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&file);
        let home = NodeId::new(3).unwrap();
        let a = GpidAllocator::open(home, file.clone()).unwrap();
        let first: Vec<Gpid> = (0..5).map(|_| a.next().unwrap()).collect();
        drop(a);
        let b = GpidAllocator::open(home, file.clone()).unwrap();
        let second = b.next().unwrap();
        assert!(first.iter().all(|g| *g != second && g.home_node() == home));
        assert!(second.seq() > first.last().unwrap().seq());
        std::fs::remove_file(file).unwrap();
    }
}
