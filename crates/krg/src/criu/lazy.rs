//! The target's side of post-copy migration: the `criu lazy-pages` daemon.
//!
//! CRIU's RPC has no request for it, so it runs as a process of its own
//! (`criu lazy-pages --page-server --address A --port P`), with its own log
//! in the work directory; nothing of its output is read. It tells that it
//! is ready by writing one byte on a status pipe (`--status-fd`). Then:
//!
//! 1. the restore (with `lazy_pages`, same work directory) connects to it
//!    through `lazy-pages.socket` and hands it a userfaultfd per process;
//! 2. it connects to the source's page server (the lazy dump) and serves
//!    each page fault of the restored job from there, while it pulls the
//!    remaining pages in the background;
//! 3. it exits once every page has arrived; then the source's dump answers
//!    and the source's job is killed.
//!
//! It needs `fs.pipe-max-size` >= 4 MiB when CRIU lacks `CAP_SYS_RESOURCE`
//! (see `crate::features`).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use krg_types::Gpid;

use super::rpc::describe_status;
use super::{log, Action, CriuError, Target, LOG_LEVEL_DEFAULT, QUICK_TIMEOUT};

/// How often [`LazyPages::wait`] looks whether the daemon is done.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// Request for [`super::Criu::lazy_pages`].
#[derive(Clone, Debug)]
pub struct LazyPagesRequest {
    pub gpid: Option<Gpid>,
    /// The images of the lazy dump (all but the memory).
    pub images_dir: PathBuf,
    /// Where its log and socket go; the restore must use the same.
    pub work_dir: Option<PathBuf>,
    /// The source's page server (the lazy dump).
    pub address: String,
    pub port: u16,
    /// TLS to the page server (the dump's [`super::DumpRequest::page_tls`]
    /// must match); plain TCP when `None`.
    pub tls: Option<super::PageTls>,
    /// Run it in this network namespace; `None`: the calling thread's.
    pub netns: Option<PathBuf>,
    pub log_level: u32,
    /// Longest wait for it to be ready.
    pub ready_timeout: Duration,
}

impl LazyPagesRequest {
    pub fn new(images_dir: impl Into<PathBuf>, address: impl Into<String>, port: u16) -> Self {
        LazyPagesRequest {
            gpid: None,
            images_dir: images_dir.into(),
            work_dir: None,
            address: address.into(),
            port,
            tls: None,
            netns: None,
            log_level: LOG_LEVEL_DEFAULT,
            ready_timeout: QUICK_TIMEOUT,
        }
    }

    pub fn work_dir(&self) -> &Path {
        self.work_dir.as_deref().unwrap_or(&self.images_dir)
    }

    pub(crate) fn target(&self) -> Target {
        Target::Images {
            path: self.images_dir.clone(),
            gpid: self.gpid,
        }
    }
}

/// A running lazy-pages daemon; killed on drop unless it has finished.
#[derive(Debug)]
pub struct LazyPages {
    child: Option<Child>,
    log: PathBuf,
    target: Target,
}

impl LazyPages {
    /// A daemon that does nothing, for fakes.
    pub fn detached(log: PathBuf) -> LazyPages {
        LazyPages {
            child: None,
            log,
            target: Target::Node,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Waits until every page has been delivered and the daemon has exited.
    pub fn wait(mut self, timeout: Duration) -> Result<(), CriuError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(CriuError::Failed {
                        action: Action::LazyPages,
                        target: self.target.clone(),
                        reason: format!(
                            "{}; {}",
                            describe_status(status),
                            log::describe(&self.log)
                        ),
                    })
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(WAIT_POLL),
                Ok(None) | Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CriuError::Timeout {
                        action: Action::LazyPages,
                        target: self.target.clone(),
                        timeout,
                        reason: log::describe(&self.log),
                    });
                }
            }
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the daemon and waits until it is ready.
pub fn start(binary: &Path, req: &LazyPagesRequest) -> Result<LazyPages, CriuError> {
    if req.port == 0 {
        return Err(CriuError::Invalid(
            "the lazy-pages daemon needs the page server's port".to_owned(),
        ));
    }
    let log = req.work_dir().join("lazy-pages.log");
    let netns = req
        .netns
        .as_deref()
        .map(|path| {
            File::open(path).map_err(|source| CriuError::Io {
                what: "cannot open the network namespace",
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let (ready_read, ready_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| CriuError::Io {
            what: "cannot create a status pipe for",
            path: log.clone(),
            source: errno.into(),
        })?;
    let write_raw = ready_write.as_raw_fd();
    let netns_raw = netns.as_ref().map(AsRawFd::as_raw_fd);
    let mut command = Command::new(binary);
    command
        .arg("lazy-pages")
        .arg("--page-server")
        .arg("--address")
        .arg(&req.address)
        .arg("--port")
        .arg(req.port.to_string())
        .arg("--images-dir")
        .arg(&req.images_dir)
        .arg("--work-dir")
        .arg(req.work_dir())
        .arg("--log-file")
        .arg("lazy-pages.log")
        .arg(format!("-v{}", req.log_level))
        .arg("--status-fd")
        .arg(write_raw.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(tls) = &req.tls {
        command
            .arg("--tls")
            .arg("--tls-cacert")
            .arg(&tls.ca_cert)
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key)
            .arg("--tls-no-cn-verify");
    }
    // No PR_SET_PDEATHSIG here, unlike `criu swrk`: the thread that starts
    // the daemon returns at once (in krgd a blocking-pool thread that may
    // exit while the daemon works); `LazyPages` kills it on drop.
    // SAFETY: runs between fork and exec; setns and fcntl are
    // async-signal-safe and act on fds the parent keeps open until spawn
    // returns; nothing is allocated.
    // JUSTIFICATION: the daemon alone must inherit the status pipe.
    unsafe {
        command.pre_exec(move || {
            if let Some(ns) = netns_raw {
                if libc::setns(ns, libc::CLONE_NEWNET) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::fcntl(write_raw, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|source| CriuError::Spawn {
        path: binary.to_owned(),
        source,
    })?;
    drop(ready_write);
    let mut daemon = LazyPages {
        child: Some(child),
        log,
        target: req.target(),
    };
    match wait_ready(&ready_read, req.ready_timeout) {
        Ready::Yes => Ok(daemon),
        Ready::Exited => {
            let status = daemon
                .child
                .take()
                .and_then(|mut c| c.wait().ok())
                .map_or_else(|| "unknown status".to_owned(), describe_status);
            Err(CriuError::Died {
                action: Action::LazyPages,
                target: req.target(),
                status,
                reason: log::describe(&daemon.log),
            })
        }
        Ready::TimedOut => Err(CriuError::Timeout {
            action: Action::LazyPages,
            target: req.target(),
            timeout: req.ready_timeout,
            reason: log::describe(&daemon.log),
        }),
    }
}

enum Ready {
    Yes,
    Exited,
    TimedOut,
}

/// Waits for the one byte CRIU writes on its status fd when ready.
fn wait_ready(read_end: &OwnedFd, timeout: Duration) -> Ready {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ready::TimedOut;
        }
        let wait_ms = u16::try_from(left.as_millis().min(1000)).expect("at most 1000");
        let mut fds = [PollFd::new(read_end.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(wait_ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {
                let mut byte = [0u8; 1];
                return match nix::unistd::read(read_end.as_raw_fd(), &mut byte) {
                    Ok(1) => Ready::Yes,
                    _ => Ready::Exited,
                };
            }
            Err(_) => return Ready::Exited,
        }
    }
}
