//! A directory of each node's own, at the same path on every node.
//!
//! The lab's nodes share this machine's file system, as NFS is shared by
//! real machines; a real node also has files no other node sees (its /tmp,
//! a local disk), which decide what a job may take along when it moves.
//! So each node's `krgd` runs in a mount namespace of its own whose
//! `<lab>/local` is a tmpfs only that node, the jobs it starts or restores
//! and the commands `krg lab exec` runs there see; on the host the
//! directory is empty.
//! Like a node's /tmp, it is emptied when the node's `krgd` restarts.
//!
//! The rest of the lab's directory stays one file system for all: it is
//! made a shared mount before any node exists, so what a node mounts there
//! (its cluster view) propagates to the host and to the other nodes,
//! whether or not this machine's mounts are shared (systemd makes them
//! shared, a container often private). The local directory is a private
//! mount below it, so the tmpfs each node puts on it stays that node's.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use nix::mount::{mount, MsFlags};

/// Make `lab_dir` a shared mount and `local_dir` (created below it) a
/// private one, on the host, before any node's namespace copies them.
pub fn prepare(lab_dir: &Path, local_dir: &Path) -> Result<()> {
    std::fs::create_dir_all(local_dir)
        .with_context(|| format!("krg lab: cannot create {}", local_dir.display()))?;
    for (dir, propagation) in [
        (lab_dir, MsFlags::MS_SHARED),
        (local_dir, MsFlags::MS_PRIVATE),
    ] {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .and_then(|()| mount(None::<&str>, dir, None::<&str>, propagation, None::<&str>))
            .map_err(|e| anyhow!("krg lab: cannot make {} a mount point: {e}", dir.display()))?;
    }
    Ok(())
}

/// What a node's daemon does between fork and exec to get its own local
/// directory: the path is made ready beforehand, as nothing may be
/// allocated after fork.
#[derive(Debug)]
pub struct OwnMounts {
    local_dir: CString,
}

impl OwnMounts {
    pub fn new(local_dir: &Path) -> Result<OwnMounts> {
        let local_dir = CString::new(local_dir.as_os_str().as_bytes())
            .map_err(|_| anyhow!("krg lab: {} holds a NUL byte", local_dir.display()))?;
        Ok(OwnMounts { local_dir })
    }

    /// A new mount namespace for this process, a fresh shared tmpfs on the
    /// local directory in it. Async-signal-safe: three system calls on
    /// strings made before fork.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: plain system calls; every pointer is to a NUL-terminated
        // string that lives as long as `self`.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mounted = libc::mount(
                c"tmpfs".as_ptr(),
                self.local_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777".as_ptr().cast(),
            );
            if mounted != 0 {
                return Err(io::Error::last_os_error());
            }
            // Shared, as a systemd node's mounts are: what is mounted
            // there later reaches the init waiting for the next job
            // (`job::init_pool`), whose mounts are slaves of the node's.
            let shared = libc::mount(
                std::ptr::null(),
                self.local_dir.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED,
                std::ptr::null(),
            );
            if shared != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}
