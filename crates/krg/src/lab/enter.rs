//! Entering a node: its network and UTS namespaces and its cgroup, and the
//! mount namespace of its daemon, where the node's local directory is (for
//! the daemon itself, a mount namespace of its own: see `local_dir.rs`).
//!
//! The namespace files and cgroup.procs files are opened before fork, so the
//! hook that runs between fork and exec (`pre_exec`) makes only
//! async-signal-safe system calls (write, setns, setsid) and allocates
//! nothing: the parent may be a multi-threaded test harness.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};

use super::local_dir::OwnMounts;
use super::names::{netns_path, Names};

/// What a process needs to become part of node K, opened ahead of time.
#[derive(Debug)]
pub struct Entry {
    net: OwnedFd,
    uts: OwnedFd,
    /// cgroup.procs of each of the node's cgroups.
    procs: Vec<OwnedFd>,
    setsid: bool,
    own_mounts: Option<OwnMounts>,
    daemon_mounts: Option<DaemonMounts>,
}

/// The mount namespace of a node's daemon, and room for the directory to
/// go back to once in it (entering a mount namespace moves a process to its
/// root). The directory is read in the child, after `Command::current_dir`
/// has taken it there, into this buffer made before fork.
#[derive(Debug)]
struct DaemonMounts {
    ns: OwnedFd,
    cwd: Vec<u8>,
}

impl Entry {
    /// Open node K's namespaces, and the cgroup.procs files among `procs`
    /// that exist (a node whose cgroups are gone still runs commands).
    pub fn open(names: &Names, k: u32, procs: &[PathBuf]) -> Result<Entry> {
        let net = open_ns(&netns_path(&names.node_netns(k)))?;
        let uts = open_ns(&names.uts_file(k))?;
        let mut opened = Vec::new();
        for path in procs.iter().filter(|p| p.exists()) {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("krg lab: cannot open {}", path.display()))?;
            opened.push(OwnedFd::from(file));
        }
        Ok(Entry {
            net,
            uts,
            procs: opened,
            setsid: false,
            own_mounts: None,
            daemon_mounts: None,
        })
    }

    /// Also enter the mount namespace of the node's daemon, process
    /// `daemon`, so that the command sees the node's local directory as the
    /// node's jobs do, in the caller's working directory.
    pub fn enter_daemon_mounts(&mut self, daemon: u32) -> Result<()> {
        let ns = open_ns(Path::new(&format!("/proc/{daemon}/ns/mnt")))?;
        let cwd = vec![0u8; libc::PATH_MAX as usize + 1];
        self.daemon_mounts = Some(DaemonMounts { ns, cwd });
        Ok(())
    }

    /// Also start a new session (for daemons, detached from the caller).
    pub fn with_setsid(mut self) -> Entry {
        self.setsid = true;
        self
    }

    /// Also give the process the node's own local directory (for its
    /// daemon, whose jobs inherit it).
    pub fn with_own_mounts(mut self, mounts: OwnMounts) -> Entry {
        self.own_mounts = Some(mounts);
        self
    }

    /// Join the cgroups, the namespaces and maybe a new session.
    ///
    /// Async-signal-safe: system calls on fds opened earlier, no allocation
    /// (io::Error::last_os_error and from_raw_os_error do not allocate).
    fn enter(&mut self) -> io::Result<()> {
        for fd in &self.procs {
            // SAFETY: `fd` is an open descriptor owned by `self`, and the
            // buffer is a 1-byte static string.
            // JUSTIFICATION: std::fs::write would allocate a path after fork.
            let written = unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if written != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        setns(&self.net, CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        setns(&self.uts, CloneFlags::CLONE_NEWUTS)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        if let Some(mounts) = &self.own_mounts {
            mounts.enter()?;
        }
        if let Some(mounts) = &mut self.daemon_mounts {
            let buf = mounts.cwd.as_mut_ptr().cast::<libc::c_char>();
            // SAFETY: getcwd writes at most `len` bytes, NUL included, into
            // the buffer made before fork; chdir reads that string back.
            if unsafe { libc::getcwd(buf, mounts.cwd.len()) }.is_null() {
                return Err(io::Error::last_os_error());
            }
            setns(&mounts.ns, CloneFlags::CLONE_NEWNS)
                .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
            // SAFETY: as above.
            if unsafe { libc::chdir(buf) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if self.setsid {
            nix::unistd::setsid().map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        }
        Ok(())
    }

    /// Make `command` enter the node between fork and exec (or, with
    /// `CommandExt::exec`, in this very process just before exec).
    pub fn install(self, command: &mut Command) {
        // SAFETY: the hook only calls `Entry::enter`, which is
        // async-signal-safe (see there); the fds it uses are owned by the
        // closure, which the Command keeps alive until it is dropped.
        unsafe {
            let mut entry = self;
            command.pre_exec(move || entry.enter());
        }
    }
}

fn open_ns(path: &Path) -> Result<OwnedFd> {
    let file = File::open(path)
        .with_context(|| format!("krg lab: cannot open namespace {}", path.display()))?;
    Ok(OwnedFd::from(file))
}

/// Run `f` on a new thread that has entered node K's network and UTS
/// namespaces (not its cgroup: a cgroup holds whole processes). Sockets made
/// by `f` stay in the node's network namespace after it returns. A panic in
/// `f` goes on in the caller.
pub fn in_thread<T: Send>(names: &Names, k: u32, f: impl FnOnce() -> T + Send) -> Result<T> {
    let entry = Entry::open(names, k, &[])?;
    thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&entry.net, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    anyhow!("krg lab: cannot enter node {k}'s network namespace: {e}")
                })?;
                setns(&entry.uts, CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| anyhow!("krg lab: cannot enter node {k}'s UTS namespace: {e}"))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
