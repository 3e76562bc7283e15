//! Persistent UTS namespaces: one per node, holding its host name, kept alive
//! by bind-mounting the namespace onto a file (as `ip netns add` does for
//! network namespaces).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::sethostname;

/// Make a new UTS namespace with host name `hostname` and bind it on `file`
/// (created empty first).
///
/// The namespace is made by a short-lived thread: unshare(CLONE_NEWUTS)
/// changes only the calling thread, so the rest of this process (a test
/// harness with many threads, say) keeps its own host name.
pub fn create(file: &Path, hostname: &str) -> Result<()> {
    File::create(file).with_context(|| format!("krg lab: cannot create {}", file.display()))?;
    let made = thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), String> {
                unshare(CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| format!("unshare(CLONE_NEWUTS): {e}"))?;
                sethostname(hostname).map_err(|e| format!("sethostname({hostname}): {e}"))?;
                mount(
                    Some("/proc/thread-self/ns/uts"),
                    file,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("bind mount on {}: {e}", file.display()))
            })
            .join()
            .map_err(|_| "the thread making it panicked".to_string())?
    });
    made.map_err(|e| anyhow!("krg lab: cannot make a UTS namespace for {hostname}: {e}"))
}

/// Detach whatever is mounted on `target`, if anything.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: not there at all.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(anyhow!("krg lab: cannot unmount {}: {e}", target.display())),
    }
}

/// Mount points at or below `dir` in this process's mount namespace, the
/// deepest first (so they can be unmounted in that order).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = crate::mountinfo::own()
        .unwrap_or_default()
        .into_iter()
        .map(|m| PathBuf::from(m.mount_point))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort();
    found.dedup();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}
