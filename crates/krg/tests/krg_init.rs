//! `krg-init` (pid 1 of every job) run for real: namespaces, mounts, user
//! change, signals and reaping, checked from outside as `krgd` would see
//! them — the status pipe on fd 3, the inner init's exit status, the job's
//! stdio and the host's /proc.
//!
//! Needs root. Without root each test prints why it skips, unless
//! `KRG_REQUIRE_LAB=1` turns the skip into a failure.
//!
//! The outer `krg-init` exits at once and its child, the inner init, is
//! reparented: the test process is a child subreaper so that it can wait
//! for the inner init. Tests run on several threads of one process, so each
//! waits only for the pids it owns, never `waitpid(-1)`.

use std::ffi::CStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const KRG_INIT: &str = env!("CARGO_BIN_EXE_krg-init");

/// Longest wait for anything a test expects; generous for a loaded host.
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// The fd an extra, inheritable descriptor is given on, to check that the
/// job does not get it.
const STRAY_FD: RawFd = 7;

/// From linux/capability.h.
const CAP_SYS_RESOURCE: u32 = 24;

/// `true` when the test can run; prints the skip reason otherwise.
fn lab(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let reason = "krg-init needs root (PID/mount/IPC namespaces, mounting /proc, changing uid)";
    assert!(
        std::env::var("KRG_REQUIRE_LAB").as_deref() != Ok("1"),
        "{test}: {reason}, and KRG_REQUIRE_LAB=1"
    );
    eprintln!("{test}: skipped: {reason}");
    false
}

fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(
            rc,
            0,
            "prctl(PR_SET_CHILD_SUBREAPER): {}",
            std::io::Error::last_os_error()
        );
    });
}

/// A name unique in this run, for temp paths and markers.
fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "krg-init-test-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(what));
        fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What `krg-init`'s fd 3 is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StatusFd {
    /// A pipe the test reads.
    Pipe,
    /// A pipe whose read end is closed before the start: every write fails
    /// with EPIPE.
    Broken,
    /// Not open at all.
    Closed,
}

struct Spec {
    options: Vec<String>,
    command: Vec<String>,
    status: StatusFd,
    pty: bool,
    env: Vec<(String, String)>,
    /// A marker in the command line, to find the inner init in /proc when
    /// there is no status pipe to tell its pid.
    marker: Option<String>,
}

impl Spec {
    /// `krg-init --uid 0 --gid 0 --cwd / <options> -- <command>`, where
    /// `options` may override the three defaults.
    fn new(options: &[&str], command: &[&str]) -> Spec {
        let mut merged = Vec::new();
        for (key, value) in [("--uid", "0"), ("--gid", "0"), ("--cwd", "/")] {
            if !options.contains(&key) {
                merged.push(key.to_owned());
                merged.push(value.to_owned());
            }
        }
        merged.extend(options.iter().map(|s| s.to_string()));
        Spec {
            options: merged,
            command: command.iter().map(|s| s.to_string()).collect(),
            status: StatusFd::Pipe,
            env: Vec::new(),
            marker: None,
            pty: false,
        }
    }

    /// Without a readable status pipe the inner init is found by a marker
    /// word appended to the command (`sh -c SCRIPT MARKER` takes it as $0).
    fn status(mut self, status: StatusFd) -> Spec {
        self.status = status;
        let marker = unique("marker");
        self.command.push(marker.clone());
        self.marker = Some(marker);
        self
    }

    fn pty(mut self) -> Spec {
        self.pty = true;
        self.options.push("--pty".to_owned());
        self
    }

    fn env(mut self, key: &str, value: &str) -> Spec {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// How a process ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ended {
    Exit(i32),
    Signal(i32),
}

/// A running job: the inner init (our child once the outer has exited),
/// its status lines and its output.
struct Job {
    /// Host pid of the inner init; `None` once reaped.
    inner: Option<libc::pid_t>,
    lines: Vec<String>,
    status_rx: Option<Receiver<String>>,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    stdin: Option<File>,
}

/// What a finished job left.
#[derive(Debug)]
struct Finished {
    lines: Vec<String>,
    output: Vec<u8>,
    ended: Ended,
}

impl Finished {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }
}

impl Job {
    fn start(spec: Spec) -> Job {
        become_subreaper();
        let (status_read, status_write) = pipe();
        let status_raw = status_write.as_raw_fd();
        let stray = File::open("/dev/null").expect("open /dev/null");
        let stray_raw = stray.as_raw_fd();
        let mode = spec.status;
        let mut command = Command::new(KRG_INIT);
        command
            .args(&spec.options)
            .arg("--")
            .args(&spec.command)
            .envs(spec.env.iter().cloned());
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let stdin = if spec.pty {
            let (master, slave) = open_pty();
            command.stdin(Stdio::from(slave.try_clone().expect("dup slave")));
            command.stdout(Stdio::from(slave.try_clone().expect("dup slave")));
            command.stderr(Stdio::from(slave));
            readers.push(collect(master.try_clone().expect("dup master"), &output));
            Some(master)
        } else {
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        };
        // SAFETY: the closure only calls dup2, fcntl and close, which are
        // async-signal-safe, on fds that stay open in the parent until
        // spawn returns.
        unsafe {
            command.pre_exec(move || {
                match mode {
                    StatusFd::Pipe | StatusFd::Broken => give_fd(status_raw, 3)?,
                    StatusFd::Closed => {
                        libc::close(3);
                    }
                }
                give_fd(stray_raw, STRAY_FD)
            });
        }
        let status_read = match mode {
            StatusFd::Pipe => Some(status_read),
            StatusFd::Broken | StatusFd::Closed => {
                drop(status_read);
                None
            }
        };
        let job = Job::spawned(command, spec, status_read, output, readers, stdin);
        drop(status_write);
        job
    }

    fn spawned(
        mut command: Command,
        spec: Spec,
        status_read: Option<OwnedFd>,
        output: Arc<Mutex<Vec<u8>>>,
        mut readers: Vec<JoinHandle<()>>,
        mut stdin: Option<File>,
    ) -> Job {
        let mut outer = command.spawn().expect("spawn krg-init");
        // Our copies of the job's stdio and status pipe must go, or EOF
        // never comes.
        drop(command);
        if let Some(out) = outer.stdout.take() {
            readers.push(collect(File::from(OwnedFd::from(out)), &output));
        }
        if let Some(err) = outer.stderr.take() {
            readers.push(collect(File::from(OwnedFd::from(err)), &output));
        }
        if let Some(input) = outer.stdin.take() {
            stdin = Some(File::from(OwnedFd::from(input)));
        }
        let deadline = Instant::now() + WAIT;
        let outer_status = loop {
            if let Some(status) = outer.try_wait().expect("wait outer krg-init") {
                break status;
            }
            assert!(Instant::now() < deadline, "outer krg-init did not exit");
            thread::sleep(POLL);
        };
        assert_eq!(outer_status.code(), Some(0), "outer krg-init exit status");
        let mut job = Job {
            inner: None,
            lines: Vec::new(),
            status_rx: None,
            output,
            readers,
            stdin,
        };
        match status_read {
            Some(read_end) => {
                job.status_rx = Some(read_lines(File::from(read_end)));
                let first = job.next_line().expect("a `pid` line on fd 3");
                let pid = first.strip_prefix("pid ").and_then(|p| p.parse().ok());
                job.inner = Some(
                    pid.unwrap_or_else(|| panic!("first status line {first:?} is not `pid N`")),
                );
            }
            None => {
                job.inner = Some(find_inner(
                    spec.marker
                        .as_deref()
                        .expect("a marker without a status pipe"),
                ))
            }
        }
        job
    }

    fn inner(&self) -> libc::pid_t {
        self.inner.expect("inner init not yet reaped")
    }

    /// The next status line, waiting at most `WAIT`.
    fn next_line(&mut self) -> Option<String> {
        let line = self.status_rx.as_ref()?.recv_timeout(WAIT).ok()?;
        self.lines.push(line.clone());
        Some(line)
    }

    fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output lock")).into_owned()
    }

    /// Waits until the job's output holds `needle`.
    fn wait_output(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.output_text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the job's output: {:?}",
                self.output_text()
            );
            thread::sleep(POLL);
        }
    }

    fn signal_inner(&self, sig: i32) {
        // SAFETY: the inner init is our unreaped child: its pid is not reused.
        let rc = unsafe { libc::kill(self.inner(), sig) };
        assert_eq!(rc, 0, "kill inner init");
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the inner init to exit, then for its status pipe and the
    /// job's output to reach EOF.
    fn finish(mut self) -> Finished {
        let pid = self.inner();
        let ended = wait_pid(pid, WAIT).unwrap_or_else(|| {
            panic!(
                "inner init {pid} still runs; output {:?}",
                self.output_text()
            )
        });
        self.inner = None;
        if let Some(rx) = self.status_rx.take() {
            let deadline = Instant::now() + WAIT;
            loop {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(line) => self.lines.push(line),
                    Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {
                        panic!("status pipe not closed; lines {:?}", self.lines)
                    }
                }
            }
        }
        self.stdin = None;
        let deadline = Instant::now() + WAIT;
        for reader in std::mem::take(&mut self.readers) {
            while !reader.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "job output not closed: {:?}",
                    self.output_text()
                );
                thread::sleep(POLL);
            }
            reader.join().expect("reader thread");
        }
        let output = self.output.lock().expect("output lock").clone();
        Finished {
            lines: std::mem::take(&mut self.lines),
            output,
            ended,
        }
    }
}

impl Drop for Job {
    /// Kills a job a failed test left behind; the kernel then kills the
    /// rest of its PID namespace.
    fn drop(&mut self) {
        if let Some(pid) = self.inner.take() {
            // SAFETY: `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_pid(pid, WAIT);
        }
    }
}

/// Runs a job to its end with nothing on stdin.
fn run(spec: Spec) -> Finished {
    let mut job = Job::start(spec);
    job.close_stdin();
    job.finish()
}

/// Checks the `pid`/`started`/end lines of a job that ran its command.
fn assert_lines(finished: &Finished, end_line: &str) {
    let lines = &finished.lines;
    assert_eq!(lines.len(), 3, "status lines {lines:?}");
    assert!(lines[0].starts_with("pid "), "{lines:?}");
    assert_eq!(
        lines[1], "started 2",
        "the command is the init's first child: {lines:?}"
    );
    assert_eq!(lines[2], end_line, "{lines:?}");
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// In the child before exec: `from` becomes `to`, inheritable.
fn give_fd(from: RawFd, to: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2 and fcntl on fds open in this (child) process.
    let rc = unsafe {
        if from == to {
            libc::fcntl(to, libc::F_SETFD, 0)
        } else {
            libc::dup2(from, to)
        }
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A pty pair: the master for the test, the slave for the job.
fn open_pty() -> (File, OwnedFd) {
    // SAFETY: posix_openpt, grantpt, unlockpt and ptsname_r on the fd and
    // buffer we own; each result is checked.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = File::from_raw_fd(master);
        assert_eq!(libc::grantpt(master.as_raw_fd()), 0, "grantpt");
        assert_eq!(libc::unlockpt(master.as_raw_fd()), 0, "unlockpt");
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(
            libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()),
            0,
            "ptsname_r"
        );
        let slave = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(
            slave >= 0,
            "open {:?}: {}",
            CStr::from_ptr(name.as_ptr()),
            std::io::Error::last_os_error()
        );
        (master, OwnedFd::from_raw_fd(slave))
    }
}

/// Appends everything read from `source` to `output` until EOF or an error
/// (EIO on a pty master once every slave is closed).
fn collect(mut source: File, output: &Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    let output = Arc::clone(output);
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => output
                    .lock()
                    .expect("output lock")
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

fn read_lines(source: File) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(source).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for our child `pid` to end, polling, at most `limit`.
fn wait_pid(pid: libc::pid_t, limit: Duration) -> Option<Ended> {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; `pid` is our own child.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(
            rc >= 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        if rc == pid {
            if libc::WIFSIGNALED(status) {
                return Some(Ended::Signal(libc::WTERMSIG(status)));
            }
            return Some(Ended::Exit(libc::WEXITSTATUS(status)));
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// One process as the host's /proc shows it.
#[derive(Debug)]
struct Proc {
    pid: libc::pid_t,
    ppid: libc::pid_t,
    state: char,
    cmdline: Vec<u8>,
}

fn processes() -> Vec<Proc> {
    let mut list = Vec::new();
    for entry in fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        list.push(Proc {
            pid,
            ppid,
            state,
            cmdline,
        });
    }
    list
}

/// `cmdline` (NUL-separated) is exactly `words`.
fn cmdline_is(cmdline: &[u8], words: &[&str]) -> bool {
    let mut expected = Vec::new();
    for word in words {
        expected.extend_from_slice(word.as_bytes());
        expected.push(0);
    }
    cmdline == expected
}

/// The inner init with `marker` in its command line, once reparented to us.
fn find_inner(marker: &str) -> libc::pid_t {
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let deadline = Instant::now() + WAIT;
    loop {
        let found = processes().into_iter().find(|p| {
            p.ppid == me
                && p.cmdline
                    .split(|&b| b == 0)
                    .any(|word| word == marker.as_bytes())
        });
        if let Some(found) = found {
            return found.pid;
        }
        assert!(
            Instant::now() < deadline,
            "no inner init with marker {marker} among our children"
        );
        thread::sleep(POLL);
    }
}

/// Whether this process has capability `cap` in its effective set.
fn has_capability(cap: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff line")
        .trim();
    let set = u64::from_str_radix(hex, 16).expect("hex capability set");
    set & (1 << cap) != 0
}

/// Polls `what` until true, at most `WAIT`.
fn wait_until(description: &str, mut what: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !what() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {description}"
        );
        thread::sleep(POLL);
    }
}

// --- exit status -----------------------------------------------------------

/// Goal: the command's exit code reaches `krgd` twice, as `exit N` on fd 3
/// and as the inner init's own exit code, after `pid` and `started` lines.
#[test]
fn t10_exit_codes_are_reported() {
    if !lab("t10_exit_codes_are_reported") {
        return;
    }
    for code in [0, 1, 42] {
        let finished = run(Spec::new(&[], &["sh", "-c", &format!("exit {code}")]));
        assert_lines(&finished, &format!("exit {code}"));
        assert_eq!(finished.ended, Ended::Exit(code));
    }
}

/// Goal: a command killed by a signal is reported as `signal N`, and the
/// inner init exits with 128 + N, as a shell reports it.
#[test]
fn t11_death_by_signal_is_reported() {
    if !lab("t11_death_by_signal_is_reported") {
        return;
    }
    let finished = run(Spec::new(&[], &["sh", "-c", "kill -9 $$"]));
    assert_lines(&finished, "signal 9");
    assert_eq!(finished.ended, Ended::Exit(128 + 9));
}

// --- namespaces -------------------------------------------------------------

/// Goal: the job has its own PID namespace with its own /proc and session.
/// Method: the shell's `$$` is 2 (the init is 1); `cat /proc/self/status`
/// shows one level of NSpid only, a small one (a host /proc would show two
/// levels); the shell leads its own session and process group.
#[test]
fn t20_job_sees_its_own_pid_namespace() {
    if !lab("t20_job_sees_its_own_pid_namespace") {
        return;
    }
    let script =
        "echo pid=$$; cat /proc/self/status; echo pgrp-sid=$(cut -d' ' -f5,6 /proc/$$/stat)";
    let finished = run(Spec::new(&[], &["sh", "-c", script]));
    assert_lines(&finished, "exit 0");
    let text = finished.text();
    assert!(text.lines().any(|l| l == "pid=2"), "{text}");
    let field = |name: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"));
        line[name.len()..]
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let pid = field("Pid:");
    let nspid = field("NSpid:");
    assert_eq!(nspid, pid, "NSpid must show the job's view only: {text}");
    let pid: u32 = pid[0].parse().expect("numeric pid");
    assert!(
        (2..10).contains(&pid),
        "pid {pid} inside the job is not small: {text}"
    );
    assert!(
        text.lines().any(|l| l == "pgrp-sid=2 2"),
        "the command leads its own session: {text}"
    );
}

// --- identity and environment -------------------------------------------------

/// Goal: the command runs as the given uid, gid and groups, not as root.
#[test]
fn t30_runs_as_the_user() {
    if !lab("t30_runs_as_the_user") {
        return;
    }
    let options = ["--uid", "65534", "--gid", "4242", "--groups", "4243,4244"];
    let finished = run(Spec::new(
        &options,
        &[
            "sh",
            "-c",
            "id -u; id -g; id -G; grep -E '^(Uid|Gid|Groups|CapEff):' /proc/self/status",
        ],
    ));
    assert_lines(&finished, "exit 0");
    let text = finished.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "65534", "{text}");
    assert_eq!(lines[1], "4242", "{text}");
    let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
    groups.sort_unstable();
    assert_eq!(groups, ["4242", "4243", "4244"], "{text}");
    assert!(text.contains("Uid:\t65534\t65534\t65534\t65534"), "{text}");
    assert!(text.contains("Gid:\t4242\t4242\t4242\t4242"), "{text}");
    assert!(
        text.contains("CapEff:\t0000000000000000"),
        "no capability left: {text}"
    );
}

/// Goal: cwd and umask are applied; a missing or forbidden cwd is reported
/// as `cwd-failed <errno>` with exit 1, the cwd being entered as the user.
#[test]
fn t31_cwd_and_umask() {
    if !lab("t31_cwd_and_umask") {
        return;
    }
    let dir = TempDir::new("cwd");
    let cwd = dir.0.to_str().expect("utf-8 temp path");
    let finished = run(Spec::new(
        &["--cwd", cwd, "--umask", "027"],
        &["sh", "-c", "pwd; umask; touch f"],
    ));
    assert_lines(&finished, "exit 0");
    assert_eq!(finished.text(), format!("{cwd}\n0027\n"));
    let mode = fs::metadata(dir.0.join("f"))
        .expect("file made by the job")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);

    let missing = dir.0.join("missing");
    let finished = run(Spec::new(
        &["--cwd", missing.to_str().expect("utf-8")],
        &["true"],
    ));
    assert_eq!(finished.lines[1..], ["started 2", "cwd-failed 2", "exit 1"]);
    assert_eq!(finished.ended, Ended::Exit(1));

    let private = dir.0.join("private");
    fs::create_dir(&private).expect("mkdir");
    fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).expect("chmod");
    let options = [
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--cwd",
        private.to_str().expect("utf-8"),
    ];
    let finished = run(Spec::new(&options, &["true"]));
    assert_eq!(
        finished.lines[1..],
        ["started 2", "cwd-failed 13", "exit 1"]
    );
    assert_eq!(finished.ended, Ended::Exit(1));
}

/// Goal: rlimits are applied, including a hard limit only root could raise.
#[test]
fn t32_rlimits() {
    if !lab("t32_rlimits") {
        return;
    }
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `ours` is a valid out-pointer.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) };
    assert_eq!(rc, 0, "getrlimit");
    // Above our own hard limit (but not above the kernel's fs.nr_open) when
    // root may raise hard limits; some sandboxes drop CAP_SYS_RESOURCE.
    let hard = if has_capability(CAP_SYS_RESOURCE) {
        let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
            .expect("nr_open")
            .trim()
            .parse()
            .expect("number");
        ours.rlim_max.saturating_add(1).min(nr_open)
    } else {
        eprintln!("t32_rlimits: no CAP_SYS_RESOURCE here: not checking a raised hard limit");
        ours.rlim_max
    };
    let nofile = format!("nofile=256:{hard}");
    let options = [
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--rlimit",
        &nofile,
        "--rlimit",
        "core=0:unlimited",
    ];
    let finished = run(Spec::new(
        &options,
        &["sh", "-c", "ulimit -Sn; ulimit -Hn; ulimit -Sc; ulimit -Hc"],
    ));
    assert_lines(&finished, "exit 0");
    assert_eq!(finished.text(), format!("256\n{hard}\n0\nunlimited\n"));
}

/// Goal: the environment passes unchanged, PATH is searched as a shell
/// would: a non-executable match is skipped (EACCES), a file without `#!`
/// runs with /bin/sh (ENOEXEC).
#[test]
fn t33_environment_and_path_search() {
    if !lab("t33_environment_and_path_search") {
        return;
    }
    let dir = TempDir::new("path");
    let (first, second) = (dir.0.join("a"), dir.0.join("b"));
    for d in [&first, &second] {
        fs::create_dir(d).expect("mkdir");
    }
    let tool = "krg-init-test-tool";
    let write = |path: &Path, text: &str, mode: u32| {
        fs::write(path, text).expect("write script");
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write(&first.join(tool), "echo wrong one\n", 0o644);
    write(
        &second.join(tool),
        "echo \"right one, KRG_TEST=$KRG_TEST\"\n",
        0o755,
    );
    let path = format!("{}:{}:/usr/bin:/bin", first.display(), second.display());
    let spec = Spec::new(&[], &[tool])
        .env("PATH", &path)
        .env("KRG_TEST", "a b=c");
    let finished = run(spec);
    assert_lines(&finished, "exit 0");
    assert_eq!(finished.text(), "right one, KRG_TEST=a b=c\n");
}

// --- exec failures ----------------------------------------------------------

/// Goal: a command that cannot run is reported as `exec-failed <errno>`
/// with the shell's codes: 127 when not found, 126 when not executable.
#[test]
fn t40_exec_failures() {
    if !lab("t40_exec_failures") {
        return;
    }
    let finished = run(Spec::new(&[], &["krg-init-test-no-such-command"]));
    assert_eq!(
        finished.lines[1..],
        ["started 2", "exec-failed 2", "exit 127"]
    );
    assert_eq!(finished.ended, Ended::Exit(127));

    let dir = TempDir::new("noexec");
    let file = dir.0.join("data");
    fs::write(&file, "echo should not run\n").expect("write");
    let finished = run(Spec::new(&[], &[file.to_str().expect("utf-8")]));
    assert_eq!(
        finished.lines[1..],
        ["started 2", "exec-failed 13", "exit 126"]
    );
    assert_eq!(finished.ended, Ended::Exit(126));
    assert_eq!(finished.text(), "");
}

// --- signals ----------------------------------------------------------------

/// Goal: a SIGTERM sent to the inner init (by host pid, as krgd does)
/// reaches the command, which traps it.
#[test]
fn t50_sigterm_reaches_the_command() {
    if !lab("t50_sigterm_reaches_the_command") {
        return;
    }
    let script = "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.1; done";
    let job = Job::start(Spec::new(&[], &["sh", "-c", script]));
    job.wait_output("ready\n");
    job.signal_inner(libc::SIGTERM);
    let finished = job.finish();
    assert_lines(&finished, "exit 3");
    assert_eq!(finished.ended, Ended::Exit(3));
    // dash also reports on stderr that its `sleep` was "Terminated".
    let text = finished.text();
    assert!(
        text.starts_with("ready\n") && text.contains("got TERM\n"),
        "{text:?}"
    );
}

/// Goal: other catchable signals are forwarded too, one by one; SIGPIPE
/// among them, although the init ignores its own.
#[test]
fn t51_every_signal_is_forwarded() {
    if !lab("t51_every_signal_is_forwarded") {
        return;
    }
    let signals = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("ALRM", libc::SIGALRM),
        ("PIPE", libc::SIGPIPE),
        ("WINCH", libc::SIGWINCH),
        ("TSTP", libc::SIGTSTP),
        ("CONT", libc::SIGCONT),
    ];
    let mut script = String::new();
    for (name, _) in signals {
        script.push_str(&format!("trap 'echo got {name}' {name}; "));
    }
    script.push_str("trap 'exit 4' TERM; echo ready; while :; do sleep 0.1; done");
    // No core file from a SIGQUIT'd `sleep`.
    let job = Job::start(Spec::new(&["--rlimit", "core=0:0"], &["sh", "-c", &script]));
    job.wait_output("ready\n");
    for (name, sig) in signals {
        job.signal_inner(sig);
        job.wait_output(&format!("got {name}\n"));
    }
    job.signal_inner(libc::SIGTERM);
    let finished = job.finish();
    assert_lines(&finished, "exit 4");
}

// --- reaping ----------------------------------------------------------------

/// Goal: an orphan that ends while the command runs is reaped by the init
/// (no zombie stays). Method: a grandchild `sleep` is orphaned, seen as a
/// child of the inner init in the host's /proc, and must then vanish.
#[test]
fn t60_orphans_are_reaped() {
    if !lab("t60_orphans_are_reaped") {
        return;
    }
    let script = "sh -c 'sleep 1.5 &'; echo spawned; read x; exit 0";
    let mut job = Job::start(Spec::new(&[], &["sh", "-c", script]));
    job.wait_output("spawned\n");
    let inner = job.inner();
    let children = || {
        processes()
            .into_iter()
            .filter(|p| p.ppid == inner)
            .collect::<Vec<_>>()
    };
    wait_until("the orphaned sleep is a child of the init", || {
        children()
            .iter()
            .any(|p| cmdline_is(&p.cmdline, &["sleep", "1.5"]))
    });
    wait_until("the orphan has ended and been reaped", || {
        children().len() == 1
    });
    let left = children();
    assert_eq!(left[0].state, 'S', "the command waits on stdin: {left:?}");
    job.close_stdin();
    let finished = job.finish();
    assert_lines(&finished, "exit 0");
}

/// Goal: what the command leaves running dies with the job. Method: a
/// background `sleep` outlives the command; once the inner init has been
/// reaped, no such process exists on the host.
#[test]
fn t61_leftovers_die_with_the_job() {
    if !lab("t61_leftovers_die_with_the_job") {
        return;
    }
    let seconds = format!("{}", 900_000 + std::process::id() % 90_000);
    let script = format!("sleep {seconds} & echo bg; read x; exit 0");
    let mut job = Job::start(Spec::new(&[], &["sh", "-c", &script]));
    job.wait_output("bg\n");
    let sleeping = || {
        processes()
            .into_iter()
            .filter(|p| cmdline_is(&p.cmdline, &["sleep", &seconds]))
            .count()
    };
    wait_until("the background sleep runs", || sleeping() == 1);
    job.close_stdin();
    let finished = job.finish();
    assert_lines(&finished, "exit 0");
    assert_eq!(sleeping(), 0, "the background sleep survived the job");
}

// --- stdio and descriptors --------------------------------------------------

/// Goal: stdin and stdout bytes pass intact (every byte value, 1 MiB).
#[test]
fn t70_stdio_bytes_are_intact() {
    if !lab("t70_stdio_bytes_are_intact") {
        return;
    }
    let data: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(7) ^ (i >> 8)) as u8)
        .collect();
    let mut job = Job::start(Spec::new(&[], &["cat"]));
    let mut stdin = job.stdin.take().expect("stdin pipe");
    let input = data.clone();
    let writer = thread::spawn(move || stdin.write_all(&input));
    let finished = job.finish();
    writer.join().expect("writer thread").expect("write stdin");
    assert_lines(&finished, "exit 0");
    assert!(
        finished.output == data,
        "stdout differs from stdin ({} bytes vs {})",
        finished.output.len(),
        data.len()
    );
}

/// Goal: the status pipe (fd 3) and any other fd krgd leaks stay out of
/// the command.
#[test]
fn t71_no_fd_leaks_into_the_command() {
    if !lab("t71_no_fd_leaks_into_the_command") {
        return;
    }
    let script = format!("for f in 3 {STRAY_FD}; do if [ -e /proc/self/fd/$f ]; then echo leak $f; fi; done; echo checked");
    let finished = run(Spec::new(&[], &["sh", "-c", &script]));
    assert_lines(&finished, "exit 0");
    assert_eq!(finished.text(), "checked\n");
}

/// Goal: with `--pty` the slave on fd 0 becomes the command's controlling
/// terminal and its group the foreground one. Method: /proc/self/stat of
/// the command shows pgrp = session = 2, a tty, and tpgid = 2.
#[test]
fn t72_pty_becomes_the_controlling_terminal() {
    if !lab("t72_pty_becomes_the_controlling_terminal") {
        return;
    }
    let finished = run(Spec::new(&[], &["cat", "/proc/self/stat"]).pty());
    assert_lines(&finished, "exit 0");
    let text = finished.text();
    let (_, rest) = text
        .rsplit_once(')')
        .unwrap_or_else(|| panic!("no stat line in {text:?}"));
    let fields: Vec<i64> = rest
        .split_whitespace()
        .skip(1)
        .take(5)
        .map(|f| f.parse().expect("number"))
        .collect();
    let [_ppid, pgrp, session, tty_nr, tpgid] = fields[..] else {
        panic!("short stat line {text:?}")
    };
    assert_eq!((pgrp, session), (2, 2), "{text}");
    assert_ne!(tty_nr, 0, "no controlling tty: {text}");
    assert_eq!(tpgid, 2, "the command is the foreground group: {text}");
}

// --- status pipe problems -----------------------------------------------------

/// Goal: krg-init never dies because nobody reads its status pipe: with a
/// broken pipe (EPIPE and a SIGPIPE of its own, which must not reach the
/// job) or no fd 3 at all, the job runs and the exit code still comes back.
#[test]
fn t80_status_pipe_closed_or_broken() {
    if !lab("t80_status_pipe_closed_or_broken") {
        return;
    }
    for mode in [StatusFd::Broken, StatusFd::Closed] {
        let script = "echo hi; read x; echo bye; exit 7";
        let mut job = Job::start(Spec::new(&[], &["sh", "-c", script]).status(mode));
        job.wait_output("hi\n");
        job.close_stdin();
        let finished = job.finish();
        assert_eq!(finished.ended, Ended::Exit(7), "{mode:?}: {finished:?}");
        assert_eq!(finished.text(), "hi\nbye\n", "{mode:?}");
        assert!(finished.lines.is_empty());
    }
}

// --- command line -----------------------------------------------------------

/// Goal: a bad command line exits 2 with one sentence on stderr, before
/// any namespace or fork (no status line). Needs no root.
#[test]
fn t90_bad_arguments_exit_2() {
    let cases: [&[&str]; 6] = [
        &["--gid", "0", "--cwd", "/", "--", "true"],
        &["--uid", "0", "--gid", "0", "--cwd", "/"],
        &[
            "--uid", "0", "--gid", "0", "--cwd", "/", "--umask", "999", "--", "true",
        ],
        &[
            "--uid",
            "0",
            "--gid",
            "0",
            "--cwd",
            "/",
            "--rlimit",
            "bogus=1:2",
            "--",
            "true",
        ],
        &["--uid", "x", "--gid", "0", "--cwd", "/", "--", "true"],
        &[
            "--uid",
            "0",
            "--gid",
            "0",
            "--cwd",
            "/",
            "--frobnicate",
            "--",
            "true",
        ],
    ];
    for args in cases {
        let (status_read, status_write) = pipe();
        let status_raw = status_write.as_raw_fd();
        let mut command = Command::new(KRG_INIT);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe dup2/fcntl in the child.
        unsafe { command.pre_exec(move || give_fd(status_raw, 3)) };
        let output = command.output().expect("run krg-init");
        drop(command);
        drop(status_write);
        let mut status = String::new();
        File::from(status_read)
            .read_to_string(&mut status)
            .expect("read status pipe");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("krg-init: ") && stderr.ends_with('\n'),
            "{args:?}: {stderr:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
        assert_eq!(status, "", "{args:?}");
    }
}
