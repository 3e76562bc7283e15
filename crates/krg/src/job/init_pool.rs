//! krg-inits started ahead of their jobs.
//!
//! Starting a job's init is the dearest step of a launch on this node:
//! new pid, mount and IPC namespaces and the exec of krg-init (about 1 ms of
//! the 2.9 ms `krgd` spends on `krg run true`). So one init waits, made
//! after each launch: pid 1 of its namespaces, in `krgd`'s cgroup, blocked
//! on a socket on its fd 0. A launch moves it into the job's cgroups and
//! sends it krg-init's arguments, the job's environment and its four
//! descriptors (`krg_types::handoff`); from there it is the job's init as
//! if it had just been started.
//!
//! Its mount namespace is a copy of the node's whose mounts it makes
//! slaves of the node's (krg-init makes the job's mounts private only once
//! it has its job), so a mount made on a shared mount of the node's while
//! it waits is there for the job. A mount on a private one (a container's
//! mounts often are) would not be: a waiting init is not used once the
//! node's mounts changed since it was made (`/proc/self/mountinfo` polls
//! as changed). Meanwhile it mounts the job's /proc and binds the cluster
//! view's files over it (`POOLED_VIEW_ENV`), 0.45 ms a launch no longer
//! waits for. A waiting
//! init runs the krg-init binary of its time: one older than
//! [`MAX_AGE`] is replaced rather than used.

use std::ffi::{CString, OsStr};
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use krg_types::handoff::{Handoff, FDS, POOLED_ENV, POOLED_VIEW_ENV};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

use super::spawn::Spawn;

/// A waiting init older than this is replaced: its krg-init binary may
/// have been upgraded since.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// One init waiting for its job, and how to make the next.
pub struct InitPool {
    program: PathBuf,
    /// `krgd`'s `/proc/self/mountinfo`, which polls as changed after a
    /// mount or unmount in the node's mount namespace.
    node_mounts: Option<std::fs::File>,
    /// The node's cluster view, once mounted: a waiting init binds it ahead.
    view: OnceLock<PathBuf>,
    waiting: Mutex<Option<Waiting>>,
    filling: AtomicBool,
}

/// An init that waits for its job.
pub struct Waiting {
    pid: libc::pid_t,
    ctl: Option<UnixStream>,
    born: Instant,
}

impl InitPool {
    pub fn new(program: PathBuf) -> InitPool {
        InitPool {
            program,
            node_mounts: std::fs::File::open("/proc/self/mountinfo").ok(),
            view: OnceLock::new(),
            waiting: Mutex::new(None),
            filling: AtomicBool::new(false),
        }
    }

    /// The cluster view the next waiting inits bind ahead of their jobs.
    pub fn set_view(&self, dir: PathBuf) {
        let _ = self.view.set(dir);
    }

    /// The waiting init, if there is one young enough, made since the
    /// node's mounts last changed.
    pub fn take(&self) -> Option<Waiting> {
        let mounts_changed = self.node_mounts_changed();
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        (!mounts_changed && waiting.born.elapsed() < MAX_AGE).then_some(waiting)
    }

    /// Whether the node's mounts changed since the last call: the poll
    /// reports each change once.
    fn node_mounts_changed(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let Some(file) = &self.node_mounts else {
            return false;
        };
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLPRI)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLPRI | PollFlags::POLLERR)),
            _ => false,
        }
    }

    /// Starts the next waiting init, in the background, unless one waits
    /// or is being started.
    pub fn refill(self: &Arc<Self>) {
        if self.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let has_one = pool
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
            if !has_one {
                match pool.start_one() {
                    Ok(w) => *pool.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some(w),
                    Err(e) => tracing::warn!("cannot start a krg-init ahead of its job: {e}"),
                }
            }
            pool.filling.store(false, Ordering::SeqCst);
        });
    }

    fn start_one(&self) -> io::Result<Waiting> {
        let (ours, theirs) = UnixStream::pair()?;
        let mut env = vec![format!("{POOLED_ENV}=1").into_bytes()];
        if let Some(view) = self.view.get() {
            let mut entry = format!("{POOLED_VIEW_ENV}=").into_bytes();
            entry.extend_from_slice(view.as_os_str().as_bytes());
            env.push(entry);
        }
        let spawn = Spawn {
            program: self.program.as_os_str(),
            args: Vec::new(),
            env,
            fds: vec![(theirs.as_raw_fd(), 0)],
        };
        let pid = spawn.start_isolated(&[])?;
        Ok(Waiting {
            pid,
            ctl: Some(ours),
            born: Instant::now(),
        })
    }
}

impl Waiting {
    /// Makes it the job's init: into the cgroups whose `cgroup.procs` files
    /// are `join`, then its arguments, environment and descriptors (the
    /// job's stdin, stdout, stderr and status pipe). Returns its pid.
    pub fn hand_over(
        mut self,
        join: &[CString],
        handoff: &Handoff,
        fds: [RawFd; FDS],
    ) -> io::Result<libc::pid_t> {
        let message = handoff
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        for procs in join {
            let path = OsStr::from_bytes(procs.as_bytes());
            std::fs::write(path, self.pid.to_string()).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot join the job's cgroup: {e}"))
            })?;
        }
        let ctl = self
            .ctl
            .take()
            .ok_or_else(|| io::Error::other("handed over already"))?;
        let rights = [ControlMessage::ScmRights(&fds)];
        // The descriptors go with the first bytes; the rest follows on the
        // same stream.
        let sent = sendmsg::<()>(
            ctl.as_raw_fd(),
            &[IoSlice::new(&message)],
            &rights,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        (&ctl).write_all(&message[sent..])?;
        let pid = self.pid;
        // Handed over: the job's supervision reaps it from now on.
        self.pid = 0;
        Ok(pid)
    }
}

impl Drop for Waiting {
    /// An init never handed over is killed and reaped (it is our child).
    fn drop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        // SAFETY: our own child, which nothing else reaps.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}
