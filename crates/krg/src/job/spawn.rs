//! Starts a job's init: one `clone` into new pid, mount and IPC
//! namespaces and the job's cgroups, then exec ([`Spawn::start_isolated`]).
//!
//! krgd is a large multi-threaded process: `std::process::Command` with a
//! `pre_exec` hook (the only way it offers to place a descriptor on fd 3)
//! must `fork` it, copying its page tables. The child here shares krgd's
//! memory until its exec (`CLONE_VM | CLONE_VFORK`, as glibc's
//! `posix_spawn` does) and moves descriptors in its own table only, so
//! nothing leaks into other children started at the same moment.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::ptr;

/// What to start: the program, its arguments (without argv[0]), its whole
/// environment, and which of our descriptors become which of its own.
pub struct Spawn<'a> {
    pub program: &'a OsStr,
    pub args: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    /// `(ours, theirs)`: ours is duplicated onto theirs in the child.
    pub fds: Vec<(RawFd, RawFd)>,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

/// Bytes of the stack the isolated child runs on until its exec: it calls
/// a few syscalls only.
const ISOLATED_STACK_BYTES: usize = 64 * 1024;

impl Spawn<'_> {
    /// Starts the program as pid 1 of new pid, mount and IPC namespaces,
    /// inside the cgroups whose `cgroup.procs` files are `join`; returns its
    /// pid as seen from here. The program starts with every signal blocked:
    /// a signal sent to it at once (pid 1 of a namespace drops signals it
    /// has no handler for) stays pending until it is ready.
    ///
    /// One `clone` instead of `posix_spawn` of an outer program that joins
    /// the cgroups, unshares, forks and execs itself again: that was two
    /// program starts per job (about 1 ms). Like `posix_spawn`, the child
    /// shares our memory until its exec (`CLONE_VM | CLONE_VFORK`), so it
    /// runs only async-signal-safe syscalls on data built beforehand.
    pub fn start_isolated(&self, join: &[CString]) -> io::Result<libc::pid_t> {
        use nix::sched::CloneFlags;
        let program = cstring(self.program.as_bytes())?;
        let mut argv_owned = vec![program.clone()];
        for a in &self.args {
            argv_owned.push(cstring(a)?);
        }
        let env_owned: Vec<CString> = self
            .env
            .iter()
            .map(|e| cstring(e))
            .collect::<io::Result<_>>()?;
        let mut argv: Vec<*const libc::c_char> = argv_owned.iter().map(|s| s.as_ptr()).collect();
        argv.push(ptr::null());
        let mut envp: Vec<*const libc::c_char> = env_owned.iter().map(|s| s.as_ptr()).collect();
        envp.push(ptr::null());
        let fds = &self.fds;
        // Written by the child (shared memory) when a step fails before the
        // exec; read once `clone` has returned, when the child has exec'd
        // or exited.
        let failed = std::sync::atomic::AtomicI32::new(0);
        let child = || -> isize {
            // SAFETY: raw syscalls on NUL-terminated strings and arrays
            // built above, which outlive the child's use of them (the
            // parent is suspended until the exec or the exit).
            unsafe {
                let fail = |errno: i32| -> isize {
                    failed.store(errno.max(1), std::sync::atomic::Ordering::SeqCst);
                    libc::_exit(127)
                };
                for procs in join {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return fail(*libc::__errno_location());
                    }
                    libc::close(fd);
                }
                for &(ours, theirs) in fds {
                    let rc = if ours == theirs {
                        libc::fcntl(theirs, libc::F_SETFD, 0)
                    } else {
                        libc::dup2(ours, theirs)
                    };
                    if rc < 0 {
                        return fail(*libc::__errno_location());
                    }
                }
                // Nothing else of krgd's: a descriptor krgd opened without
                // close-on-exec (any library may) would stay open in the
                // init, which never execs again, and CRIU refuses a file
                // from the node's mounts ("Can't lookup mount").
                let first_free = fds.iter().map(|&(_, theirs)| theirs + 1).max().unwrap_or(0);
                libc::syscall(libc::SYS_close_range, first_free, libc::c_uint::MAX, 0);
                // As std does: SIGPIPE at its default (krgd ignores it).
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
                fail(*libc::__errno_location())
            }
        };
        let mut stack = vec![0u8; ISOLATED_STACK_BYTES];
        let flags = CloneFlags::CLONE_VM
            | CloneFlags::CLONE_VFORK
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWIPC;
        // SAFETY: sigset operations on a local set; pthread_sigmask on the
        // calling thread; `clone` with a stack we own and a callback that
        // only makes syscalls (see above). The mask is restored whatever
        // happens.
        let pid = unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let r = nix::sched::clone(Box::new(child), &mut stack, flags, Some(libc::SIGCHLD));
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut());
            r.map_err(io::Error::from)?
        };
        let errno = failed.load(std::sync::atomic::Ordering::SeqCst);
        if errno != 0 {
            let mut status = 0;
            // SAFETY: our own child, which has exited.
            unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
            let err = io::Error::from_raw_os_error(errno);
            return Err(io::Error::new(
                err.kind(),
                format!("cannot start it in the job's cgroup and namespaces: {err}"),
            ));
        }
        Ok(pid.as_raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two fds we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors, owned once each.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    fn wait(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        libc::WEXITSTATUS(status)
    }

    /// New namespaces need CAP_SYS_ADMIN: these tests run as root (CI
    /// does), and say so when they cannot.
    fn root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipped: new namespaces need root");
        }
        root
    }

    #[test]
    fn the_child_is_pid_1_with_its_fds_arguments_and_environment_and_nothing_else() {
        if !root() {
            return;
        }
        let (mut read3, write3) = pipe();
        // Not close-on-exec: krgd's own descriptors must not reach the
        // init even so.
        let (_keep_r, leaked) = pipe();
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(leaked.as_raw_fd(), libc::F_SETFD, 0) };
        let script = format!(
            "echo \"$$ $1 $GREETING\" >&3; [ -e /proc/self/fd/{} ] && exit 9; exit 4",
            leaked.as_raw_fd()
        );
        let spawn = Spawn {
            program: OsStr::new("/bin/sh"),
            args: vec![
                b"-c".to_vec(),
                script.into_bytes(),
                b"sh".to_vec(),
                b"hello".to_vec(),
            ],
            env: vec![b"GREETING=world".to_vec()],
            fds: vec![(write3.as_raw_fd(), 3)],
        };
        let pid = spawn.start_isolated(&[]).expect("starts");
        drop(write3);
        let mut out = String::new();
        read3.read_to_string(&mut out).expect("reads");
        assert_eq!(out, "1 hello world\n");
        assert_eq!(wait(pid), 4, "a descriptor of ours leaked into the child");
    }

    #[test]
    fn a_missing_program_or_cgroup_is_an_error() {
        if !root() {
            return;
        }
        let spawn = Spawn {
            program: OsStr::new("/nonexistent/krg-init"),
            args: vec![],
            env: vec![],
            fds: vec![],
        };
        let err = spawn.start_isolated(&[]).expect_err("fails");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let spawn = Spawn {
            program: OsStr::new("/bin/true"),
            ..spawn
        };
        let missing = CString::new("/nonexistent/cgroup.procs").expect("no NUL");
        let err = spawn.start_isolated(&[missing]).expect_err("fails");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
