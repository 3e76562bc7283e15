//! Waiting for a process that krgd adopted (the job's init, reparented to
//! krgd as a child subreaper) without `waitpid(-1)`, which would steal the
//! statuses of children that other code waits for.

use std::io;
use tokio::io::unix::AsyncFd;

/// How a process ended, as waitpid says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitStatus {
    Exited(i32),
    Signaled { signal: i32, core: bool },
}

fn try_reap(pid: i32) -> io::Result<Option<WaitStatus>> {
    let mut status = 0;
    // SAFETY: status is a valid out-pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if r == 0 {
        return Ok(None);
    }
    if libc::WIFEXITED(status) {
        Ok(Some(WaitStatus::Exited(libc::WEXITSTATUS(status))))
    } else if libc::WIFSIGNALED(status) {
        Ok(Some(WaitStatus::Signaled {
            signal: libc::WTERMSIG(status),
            core: libc::WCOREDUMP(status),
        }))
    } else {
        Ok(None)
    }
}

/// Waits until `pid` exits and reaps it. The process must be (or become)
/// our child; if someone else reaped it, `Ok(None)`.
pub async fn wait(pid: i32) -> io::Result<Option<WaitStatus>> {
    let fd = match crate::pidfd::open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    // SAFETY: an OwnedFd is valid and open, and stays the same descriptor
    // for as long as the AsyncFd owns it.
    let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    // Readable once the process has exited.
    let _ready = afd.readable().await?;
    // It is a zombie now; it may take a moment to be reparented to us.
    for _ in 0..REAP_ATTEMPTS_MAX {
        match try_reap(pid) {
            Ok(Some(st)) => return Ok(Some(st)),
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Err(io::Error::other(format!(
        "process {pid} exited but could not be reaped"
    )))
}

/// About two seconds of 1 ms polls.
const REAP_ATTEMPTS_MAX: u32 = 2000;
