//! Starts a program with chosen descriptors through `posix_spawn`.
//!
//! krgd is a large multi-threaded process: `std::process::Command` with a
//! `pre_exec` hook (the only way it offers to place a descriptor on fd 3)
//! must `fork` it, copying its page tables, while glibc's `posix_spawn`
//! shares the parent's memory until the exec (`CLONE_VM | CLONE_VFORK`). The
//! file actions move descriptors in the child only, so nothing leaks into
//! other children spawned at the same moment.

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

fn check(what: &str, rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::Error::from_raw_os_error(rc).kind(),
            format!("{what}: {}", io::Error::from_raw_os_error(rc)),
        ))
    }
}

/// Owns the attribute and file-action objects so that they are destroyed
/// whatever happens.
struct Attrs {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `Spawn::start` before an `Attrs`
        // exists.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

impl Spawn<'_> {
    /// Starts the program; returns its pid. The caller reaps it.
    pub fn start(&self) -> io::Result<libc::pid_t> {
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
        let mut argv: Vec<*mut libc::c_char> =
            argv_owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
        argv.push(ptr::null_mut());
        let mut envp: Vec<*mut libc::c_char> =
            env_owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
        envp.push(ptr::null_mut());

        // SAFETY: zeroed objects are immediately initialised by their init
        // functions; `Attrs` destroys them.
        let mut attrs = unsafe {
            let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
            check(
                "posix_spawnattr_init",
                libc::posix_spawnattr_init(&mut attr),
            )?;
            let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            let rc = libc::posix_spawn_file_actions_init(&mut actions);
            if rc != 0 {
                libc::posix_spawnattr_destroy(&mut attr);
                check("posix_spawn_file_actions_init", rc)?;
            }
            Attrs { attr, actions }
        };
        // SAFETY: plain calls on initialised objects and valid pointers.
        unsafe {
            // As std does: the child starts with no signal blocked and
            // SIGPIPE at its default (krgd ignores it, as Rust programs do).
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            check(
                "posix_spawnattr_setsigmask",
                libc::posix_spawnattr_setsigmask(&mut attrs.attr, &empty),
            )?;
            check(
                "posix_spawnattr_setsigdefault",
                libc::posix_spawnattr_setsigdefault(&mut attrs.attr, &pipe),
            )?;
            let flags = libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF;
            check(
                "posix_spawnattr_setflags",
                libc::posix_spawnattr_setflags(&mut attrs.attr, flags as libc::c_short),
            )?;
            for &(ours, theirs) in &self.fds {
                check(
                    "posix_spawn_file_actions_adddup2",
                    libc::posix_spawn_file_actions_adddup2(&mut attrs.actions, ours, theirs),
                )?;
            }
            let mut pid: libc::pid_t = 0;
            check(
                "posix_spawn",
                libc::posix_spawn(
                    &mut pid,
                    program.as_ptr(),
                    &attrs.actions,
                    &attrs.attr,
                    argv.as_ptr(),
                    envp.as_ptr(),
                ),
            )?;
            Ok(pid)
        }
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

    #[test]
    fn the_child_gets_its_fds_arguments_and_environment_and_nothing_else() {
        let (mut read3, write3) = pipe();
        let (_keep_r, leaked) = pipe();
        let script = format!(
            "echo \"$1 $GREETING\" >&3; [ -e /proc/self/fd/{} ] && exit 9; exit 4",
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
        let pid = spawn.start().expect("spawns");
        drop(write3);
        let mut out = String::new();
        read3.read_to_string(&mut out).expect("reads");
        assert_eq!(out, "hello world\n");
        assert_eq!(
            wait(pid),
            4,
            "a close-on-exec fd of ours leaked into the child"
        );
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let spawn = Spawn {
            program: OsStr::new("/nonexistent/krg-init"),
            args: vec![],
            env: vec![],
            fds: vec![],
        };
        let err = spawn.start().expect_err("fails");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }
}
