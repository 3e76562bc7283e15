//! The work directory of one restore (`<state>/criu/<home>-<seq>-<ms>/`):
//! CRIU's restore log, the lazy-pages daemon's log and socket, the restore
//! statistics. It goes once the restore, and the lazy transfer of its
//! pages, have succeeded; after a failure it stays, for its logs, but a node
//! keeps at most [`KEPT`] of them, so that a node restoring jobs for months
//! does not fill its state directory.

use std::io;
use std::path::{Path, PathBuf};

use krg_types::Gpid;

/// Most work directories a node keeps (the newest): those of failed
/// restores and those of restores under way.
pub const KEPT: usize = 32;

/// A restore's work directory; dropped without [`WorkDir::done`], it stays.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Makes a new work directory for `gpid` below `root`, after removing
    /// the oldest ones beyond [`KEPT`].
    pub fn make(root: &Path, gpid: Gpid, now_ms: u64) -> io::Result<WorkDir> {
        prune(root, KEPT.saturating_sub(1));
        let path = root.join(format!("{}-{}-{now_ms}", gpid.home_node(), gpid.seq()));
        std::fs::create_dir_all(&path)?;
        Ok(WorkDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The restore succeeded: its logs are not needed.
    pub fn done(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            tracing::debug!(dir = %self.path.display(), error = %e, "cannot remove a restore's work directory");
        }
    }
}

/// Removes the directories below `root` but the `keep` most recently
/// modified.
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let mut dirs: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if dirs.len() <= keep {
        return;
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.0));
    for (_, dir) in dirs.drain(keep..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use krg_types::NodeId;
    use std::time::{Duration, SystemTime};

    fn scratch(name: &str) -> PathBuf {
        crate::test_support::scratch_dir("work-dir", name)
    }

    #[test]
    fn a_successful_restore_leaves_nothing_and_a_failed_one_its_logs() {
        let root = scratch("done");
        let gpid = Gpid::new(NodeId::new(2).unwrap(), 7).unwrap();
        let ok = WorkDir::make(&root, gpid, 1).unwrap();
        std::fs::write(ok.path().join("restore.log"), "fine").unwrap();
        ok.done();
        let failed = WorkDir::make(&root, gpid, 2).unwrap();
        std::fs::write(
            failed.path().join("restore.log"),
            "Error (criu/cr-restore.c)",
        )
        .unwrap();
        let kept = failed.path().to_path_buf();
        drop(failed);
        let left: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, vec![kept.clone()]);
        assert_eq!(kept.file_name().unwrap(), "2-7-2");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn only_the_newest_are_kept() {
        let root = scratch("prune");
        let start = SystemTime::now() - Duration::from_secs(3600);
        for i in 0..KEPT as u64 + 8 {
            let dir = root.join(format!("old-{i}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("restore.log"), "x").unwrap();
            // Older first: old-0 is the oldest.
            let when = start + Duration::from_secs(i);
            std::fs::File::open(&dir)
                .unwrap()
                .set_modified(when)
                .unwrap();
        }
        let new = WorkDir::make(&root, Gpid::new(NodeId::new(1).unwrap(), 1).unwrap(), 99).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left.len(), KEPT, "{left:?}");
        assert!(left.contains(&"1-1-99".to_string()));
        for i in 0..9 {
            assert!(
                !left.contains(&format!("old-{i}")),
                "old-{i} stays: {left:?}"
            );
        }
        assert!(left.contains(&"old-9".to_string()));
        drop(new);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
