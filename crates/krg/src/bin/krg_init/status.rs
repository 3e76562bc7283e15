//! The status pipe: fd 3, one line per event, read by `krgd`.
//!
//! Lines: `pid <host pid>`, `started <pid in ns>`, `exit <code>`,
//! `signal <signo>[ core]`, and `<step>-failed <errno>` (see `Step`).
//! Everything here is async-signal-safe (no allocation, no lock, no panic),
//! so the command's child may use it between `fork` and `exec`.

use std::cell::Cell;
use std::os::fd::RawFd;

/// The fd `krgd` hands us the write end of the status pipe on.
pub const STATUS_FD: RawFd = 3;

/// Longest line: the longest word, two numbers and a suffix fit easily.
const LINE_BYTES_MAX: usize = 64;

/// One status line, built on the stack.
pub struct Line {
    buf: [u8; LINE_BYTES_MAX],
    len: usize,
}

impl Line {
    pub fn new(word: &str) -> Line {
        let mut line = Line {
            buf: [0; LINE_BYTES_MAX],
            len: 0,
        };
        line.push(word.as_bytes());
        line
    }

    /// Appends ` <n>` in decimal.
    pub fn num(mut self, n: i64) -> Line {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut rest = n.unsigned_abs();
        loop {
            at -= 1;
            // The remainder is below 10: the cast cannot truncate.
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.push(b" ");
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[at..]);
        self
    }

    /// Appends ` <word>`.
    pub fn word(mut self, word: &str) -> Line {
        self.push(b" ");
        self.push(word.as_bytes());
        self
    }

    /// Appends what fits: a line is never longer than `LINE_BYTES_MAX - 1`
    /// bytes before its newline, and pushing never panics.
    fn push(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            if self.len + 1 >= LINE_BYTES_MAX {
                return;
            }
            self.buf[self.len] = byte;
            self.len += 1;
        }
    }

    fn finished(&self) -> ([u8; LINE_BYTES_MAX], usize) {
        let mut buf = self.buf;
        buf[self.len] = b'\n';
        (buf, self.len + 1)
    }

    #[cfg(test)]
    fn text(&self) -> String {
        let (buf, len) = self.finished();
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }
}

/// The steps that can fail before the command runs; each reports
/// `<step>-failed <errno>` on the status pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Cgroup,
    Unshare,
    Fork,
    Mount,
    Setsid,
    Tty,
    Rlimit,
    Groups,
    Gid,
    Uid,
    Cwd,
    Exec,
}

impl Step {
    pub fn word(self) -> &'static str {
        match self {
            Step::Cgroup => "cgroup-failed",
            Step::Unshare => "unshare-failed",
            Step::Fork => "fork-failed",
            Step::Mount => "mount-failed",
            Step::Setsid => "setsid-failed",
            Step::Tty => "tty-failed",
            Step::Rlimit => "rlimit-failed",
            Step::Groups => "groups-failed",
            Step::Gid => "gid-failed",
            Step::Uid => "uid-failed",
            Step::Cwd => "cwd-failed",
            Step::Exec => "exec-failed",
        }
    }
}

/// The write end of the status pipe. A write error (EPIPE when `krgd` has
/// gone, EBADF) closes it for good and is otherwise ignored: `krg-init`
/// never dies because nobody listens.
#[derive(Debug)]
pub struct Status {
    fd: RawFd,
    open: Cell<bool>,
}

impl Status {
    pub fn new(fd: RawFd) -> Status {
        Status {
            fd,
            open: Cell::new(true),
        }
    }

    /// Writes `line` and a newline. Async-signal-safe.
    pub fn send(&self, line: Line) {
        if !self.open.get() {
            return;
        }
        let (buf, len) = line.finished();
        let mut done = 0;
        // Bounded: each turn writes at least one byte or closes the pipe;
        // only EINTR repeats a turn, and all signals are blocked.
        while done < len {
            let rest = &buf[done..len];
            // SAFETY: `rest` is a live, initialised buffer of `rest.len()`
            // bytes; write(2) only reads it.
            let n = unsafe { libc::write(self.fd, rest.as_ptr().cast(), rest.len()) };
            match usize::try_from(n) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(_) if errno() == libc::EINTR => continue,
                Err(_) => {
                    self.open.set(false);
                    return;
                }
            }
        }
    }
}

/// The calling thread's errno. Async-signal-safe.
pub fn errno() -> i32 {
    // SAFETY: __errno_location always returns a valid pointer to the calling
    // thread's errno.
    unsafe { *libc::__errno_location() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(Line::new("pid").num(12345).text(), "pid 12345\n");
        assert_eq!(Line::new("exit").num(0).text(), "exit 0\n");
        assert_eq!(
            Line::new("signal").num(11).word("core").text(),
            "signal 11 core\n"
        );
        assert_eq!(
            Line::new(Step::Exec.word()).num(2).text(),
            "exec-failed 2\n"
        );
        assert_eq!(
            Line::new("x").num(i64::MIN).text(),
            "x -9223372036854775808\n"
        );
        assert_eq!(
            Line::new("x").num(i64::MAX).text(),
            "x 9223372036854775807\n"
        );
    }

    #[test]
    fn long_lines_are_cut_not_panicking() {
        let long = "y".repeat(200);
        let text = Line::new(&long).num(7).text();
        assert_eq!(text.len(), LINE_BYTES_MAX);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn a_closed_pipe_is_ignored() {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe(2) writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fds[0] is the read end we just created and own.
        unsafe { libc::close(fds[0]) };
        let status = Status::new(fds[1]);
        // SIGPIPE is ignored by the Rust runtime: the write fails with EPIPE.
        status.send(Line::new("exit").num(1));
        assert!(!status.open.get());
        status.send(Line::new("exit").num(1));
        // SAFETY: fds[1] is the write end we created and own.
        unsafe { libc::close(fds[1]) };
    }
}
