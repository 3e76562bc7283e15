//! The init's life once the command runs: wait for signals (all blocked),
//! forward each to the command's process group, reap every child on
//! SIGCHLD, and when the command itself has gone, report how and exit the
//! same way.

use std::mem::MaybeUninit;
use std::ptr;

use crate::status::{errno, Line};

/// How the command ended, from its wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Exit(i32),
    Signal { signo: i32, core: bool },
}

impl End {
    fn from_wait_status(status: i32) -> End {
        if libc::WIFSIGNALED(status) {
            End::Signal {
                signo: libc::WTERMSIG(status),
                core: libc::WCOREDUMP(status),
            }
        } else {
            End::Exit(libc::WEXITSTATUS(status))
        }
    }

    /// The init's own exit code: the command's, or 128 + signo as a shell
    /// reports it.
    pub fn code(self) -> i32 {
        match self {
            End::Exit(code) => code,
            End::Signal { signo, .. } => 128 + signo,
        }
    }

    pub fn line(self) -> Line {
        match self {
            End::Exit(code) => Line::new("exit").num(i64::from(code)),
            End::Signal { signo, core: false } => Line::new("signal").num(i64::from(signo)),
            End::Signal { signo, core: true } => {
                Line::new("signal").num(i64::from(signo)).word("core")
            }
        }
    }
}

/// Runs until the command `pid` ends; returns how it ended. Expects every
/// signal to be blocked (they are, since `main`'s first step).
pub fn supervise(pid: libc::pid_t) -> End {
    let all = full_sigset();
    // SAFETY: plain syscall.
    let me = unsafe { libc::getpid() };
    // Endless by design: pid 1 lives exactly as long as its command.
    loop {
        let mut info = MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `all` is an initialised set; `info` has room for one
        // siginfo_t.
        let sig = unsafe { libc::sigwaitinfo(&all, info.as_mut_ptr()) };
        if sig == -1 {
            // EINTR only (a stop/continue); nothing else can fail here.
            continue;
        }
        // SAFETY: sigwaitinfo filled `info` for the returned signal (and it
        // was zeroed before).
        let info = unsafe { info.assume_init() };
        if sig == libc::SIGCHLD {
            if let Some(end) = reap(pid) {
                return end;
            }
            continue;
        }
        if sig == libc::SIGPIPE && info.si_code == libc::SI_USER && sender_pid(&info) == me {
            // Our own write to a status pipe nobody reads: not for the job.
            continue;
        }
        forward(pid, sig);
    }
}

/// Reaps every child that has ended (orphans included: we are pid 1).
/// Returns how the command ended if it was among them.
fn reap(pid: libc::pid_t) -> Option<End> {
    let mut end = None;
    // Bounded by the number of children that have ended.
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let reaped = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if reaped == -1 && errno() == libc::EINTR {
            continue;
        }
        if reaped <= 0 {
            // 0: children remain but none has ended; -1: ECHILD.
            return end;
        }
        if reaped == pid {
            end = Some(End::from_wait_status(status));
        }
    }
}

/// Sends `sig` to the command's process group. Until the child has called
/// `setsid` the group does not exist yet: then to the child itself, which
/// keeps it pending (blocked) until just before `execve`.
fn forward(pid: libc::pid_t, sig: i32) {
    // SAFETY: plain syscalls; `pid` is our child, not yet reaped.
    unsafe {
        if libc::kill(-pid, sig) == -1 && errno() == libc::ESRCH {
            libc::kill(pid, sig);
        }
    }
}

fn sender_pid(info: &libc::siginfo_t) -> libc::pid_t {
    // SAFETY: for SI_USER the kernel fills si_pid (the caller checks the
    // code first; a zeroed field reads as 0 otherwise).
    unsafe { info.si_pid() }
}

fn full_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the whole set.
    unsafe {
        libc::sigfillset(set.as_mut_ptr());
        set.assume_init()
    }
}

/// Blocks every signal in the calling process, and ignores SIGPIPE so that
/// an unread status pipe can never kill us even if it were unblocked.
pub fn block_all_signals() {
    let all = full_sigset();
    // SAFETY: `all` is an initialised set; SIG_IGN is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        libc::sigprocmask(libc::SIG_SETMASK, &all, ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_statuses() {
        assert_eq!(End::from_wait_status(42 << 8), End::Exit(42));
        assert_eq!(
            End::from_wait_status(9),
            End::Signal {
                signo: 9,
                core: false
            }
        );
        assert_eq!(
            End::from_wait_status(11 | 0x80),
            End::Signal {
                signo: 11,
                core: true
            }
        );
        assert_eq!(End::Exit(42).code(), 42);
        assert_eq!(
            End::Signal {
                signo: 9,
                core: false
            }
            .code(),
            137
        );
    }
}
