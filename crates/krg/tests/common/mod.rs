#![allow(dead_code)]
//! The harness the lab integration tests share (`mod common;` in each test
//! file): this build's binaries, lab names and labs, scratch directories,
//! commands run on a lab node to their end or in the background. Each test
//! file is a crate of its own and uses a part of it, hence `dead_code`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use krg::lab::{self, Lab, LabOptions};

pub const KRG: &str = env!("CARGO_BIN_EXE_krg");
pub const KRGD: &str = env!("CARGO_BIN_EXE_krgd");
/// Longest wait for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);
/// `setpriv` arguments that make a command run as user 65534 (nobody).
pub const AS_NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];
pub const NOBODY_UID: u32 = 65534;
/// How many of a command's last lines a failure shows (a job may print
/// thousands).
const LINES_SHOWN: usize = 20;

// ---------------------------------------------------------------- the lab

/// A lab name no other test (or test process) uses: `prefix` (one letter
/// per test file), this process's id, `x`, a counter.
pub fn lab_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// A 3-node lab named `name` of this build's `krgd` and `krg`, each node
/// reporting its own cgroup's load (the load of the jobs a test starts
/// there, not the whole machine's).
pub fn lab_options(name: impl Into<String>) -> LabOptions {
    LabOptions {
        krgd: Some(KRGD.into()),
        krg: Some(KRG.into()),
        krgd_args: vec!["--load-scope".into(), "cgroup".into()],
        ..LabOptions::new(name, 3)
    }
}

/// The lab of [`lab_options`] named [`lab_name`]`(prefix)`, up (once node
/// 1 lists every node `up`).
pub fn start_lab(prefix: &str) -> Lab {
    Lab::up(lab_options(lab_name(prefix))).expect("the lab comes up")
}

/// [`start_lab`], or `None` (skipped) without root.
pub fn lab_up(prefix: &str) -> Option<Lab> {
    if !lab::require_root_or_skip() {
        return None;
    }
    Some(start_lab(prefix))
}

/// One lab test at a time in this process, also under `cargo test` (nextest
/// runs them one at a time anyway): several labs sharing two cores would
/// blur timing bounds and load, and time each other out.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn step(what: &str) {
    eprintln!("--- {what}");
}

/// A directory of its own under /tmp, `krg-NAME-<pid>-<n>` with mode `mode`
/// (the lab's nodes share this machine's file system, and their jobs may
/// run as another user), removed at the end.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str, mode: u32) -> Scratch {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "krg-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creates a scratch directory");
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).expect("chmod");
        Scratch(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A file of tests/workloads/.
pub fn workload(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workloads")
        .join(name)
}

/// Compile `source` with `compiler -O1 FLAGS` into `out`.
pub fn compile(compiler: &str, flags: &[&str], source: &Path, out: &Path) {
    let output = Command::new(compiler)
        .arg("-O1")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(source)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(
        output.status.success(),
        "{compiler} {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every process there is now: its pid and its directory in /proc.
pub fn processes() -> Vec<(u32, PathBuf)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            Some((pid, entry.path()))
        })
        .collect()
}

// --------------------------------------------------------- running things

/// `krg ARGS` on node K (as root), from /tmp.
pub fn krg_cmd(lab: &Lab, k: u32, args: &[&str]) -> Command {
    let mut command = lab.command(k, KRG).expect("the node exists");
    command.args(args).current_dir("/tmp");
    command
}

/// `PROGRAM ARGS` on node K as user 65534, from /tmp.
pub fn as_nobody(lab: &Lab, k: u32, program: &str, args: &[&str]) -> Command {
    let mut command = lab.command(k, "setpriv").expect("the node exists");
    command
        .args(AS_NOBODY)
        .arg(program)
        .args(args)
        .current_dir("/tmp");
    command
}

/// `krg ARGS` on node K as user 65534, from /tmp.
pub fn krg_as_nobody(lab: &Lab, k: u32, args: &[&str]) -> Command {
    as_nobody(lab, k, KRG, args)
}

/// What a command run by [`output_of`] gets on stdin.
pub enum Input {
    /// A pipe that stays open, unwritten, until the command has ended: a
    /// terminal nobody types into. Jobs that do not read stdin see no end
    /// of file; `krg run` then writes nothing to krgd as its job ends (the
    /// end of stdin racing the job's end is lab_jobs_quick_jobs_end_cleanly's
    /// business).
    Idle,
    /// /dev/null.
    Null,
    /// These bytes, then end of file.
    Bytes(Vec<u8>),
    /// Whatever the command was given (`Command::stdin`).
    AsSet,
}

/// Run `command` to its end with `input` on stdin, or say why not: it could
/// not start, or it did not end within `timeout` (it is killed then).
pub fn try_output_of(
    mut command: Command,
    input: Input,
    timeout: Duration,
) -> Result<Output, String> {
    let what = format!("{command:?}");
    match input {
        Input::Null => {
            command.stdin(Stdio::null());
        }
        Input::AsSet => {}
        Input::Idle | Input::Bytes(_) => {
            command.stdin(Stdio::piped());
        }
    }
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {what}: {e}"))?;
    let mut idle = None;
    match input {
        Input::Idle => idle = child.stdin.take(),
        Input::Bytes(bytes) => {
            let mut stdin = child.stdin.take().expect("stdin is piped");
            thread::spawn(move || {
                let _ = stdin.write_all(&bytes);
            });
        }
        Input::Null | Input::AsSet => {}
    }
    let stdout = reader_thread(child.stdout.take().expect("stdout is piped"));
    let stderr = reader_thread(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("{what}: {e}"))? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = stdout.join().unwrap_or_default();
            let err = stderr.join().unwrap_or_default();
            return Err(format!(
                "{what} did not end within {timeout:?}; stdout: {:?}; stderr: {:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            ));
        }
        thread::sleep(Duration::from_millis(10));
    };
    drop(idle);
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Run `command` to its end (at most `timeout`, then it is killed and the
/// test fails) with `input` on stdin.
pub fn output_of(command: Command, input: Input, timeout: Duration) -> Output {
    try_output_of(command, input, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// Everything `from` gives until its end, read on a thread of its own (so
/// that a command filling one pipe never blocks on it while the test reads
/// the other).
pub fn reader_thread(mut from: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = from.read_to_end(&mut bytes);
        bytes
    })
}

/// Stdout of a command that must succeed, run with an idle stdin (see
/// [`Input::Idle`]) for at most `timeout`.
pub fn ok_within(command: Command, timeout: Duration) -> String {
    let out = output_of(command, Input::Idle, timeout);
    assert!(out.status.success(), "failed: {}", show(&out));
    stdout(&out)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn stdout(out: &Output) -> String {
    text(&out.stdout)
}

pub fn stderr(out: &Output) -> String {
    text(&out.stderr)
}

pub fn show(out: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        out.status,
        stdout(out),
        stderr(out)
    )
}

/// `krg ARGS` on node K, at most `timeout`: its stdout, or why it failed.
pub fn try_krg_within(
    lab: &Lab,
    k: u32,
    args: &[&str],
    timeout: Duration,
) -> Result<String, String> {
    let mut argv = vec![KRG];
    argv.extend_from_slice(args);
    let out = lab
        .run_timeout(k, &argv, timeout)
        .map_err(|e| format!("{e:#}"))?;
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!(
            "`krg {}` on node {k}: {}: {}{}",
            args.join(" "),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        ))
    }
}

/// A command running in the background whose stdout is read line by line,
/// each line with the time it came.
pub struct Running {
    what: String,
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
    last_line_at: Instant,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
}

impl Running {
    /// Start `command` with an idle stdin (see [`Input::Idle`]): the pipe's
    /// write end stays in `child`, unwritten unless the test writes to it,
    /// until [`Running::close_stdin`] or the end.
    pub fn spawn(mut command: Command) -> Running {
        command.stdin(Stdio::piped());
        Running::spawn_as_set(command)
    }

    /// Start `command` with the stdin it was given (`Command::stdin`).
    pub fn spawn_as_set(mut command: Command) -> Running {
        let what = format!("{command:?}");
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("not poisoned")
                    .extend_from_slice(&buf[..n]);
            }
        });
        Running {
            what,
            child,
            lines,
            seen: Vec::new(),
            last_line_at: Instant::now(),
            stderr,
            status: None,
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; the child is
        // ours and not yet reaped, so the pid is still its own.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal}) failed", self.pid());
    }

    pub fn stderr(&self) -> String {
        text(&self.stderr.lock().expect("not poisoned"))
    }

    /// The write end of its stdin (until [`Running::close_stdin`]).
    pub fn stdin(&mut self) -> &mut ChildStdin {
        self.child.stdin.as_mut().expect("stdin still open")
    }

    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Write `line` and a newline to its stdin, at once (flushed).
    pub fn write_line(&mut self, line: &str) {
        let what = self.what.clone();
        let stdin = self.stdin();
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("{what}: cannot write its stdin: {e}"));
    }

    /// The lines read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// When the last line read so far came.
    pub fn last_line_at(&self) -> Instant {
        self.last_line_at
    }

    fn take(&mut self, (at, line): (Instant, String)) {
        self.last_line_at = at;
        self.seen.push(line);
    }

    /// The last lines read so far, for failure messages.
    fn last_lines(&self) -> &[String] {
        &self.seen[self.seen.len().saturating_sub(LINES_SHOWN)..]
    }

    /// Lines that have arrived so far (not waiting).
    pub fn drain(&mut self) -> &[String] {
        while let Ok(item) = self.lines.try_recv() {
            self.take(item);
        }
        &self.seen
    }

    /// Wait (at most [`WAIT`]) for the next line matching `want`; returns
    /// it.
    pub fn expect_line(&mut self, want: impl Fn(&str) -> bool, what: &str) -> String {
        self.expect_line_within(want, what, WAIT)
    }

    /// Wait (at most `timeout`) for the next line matching `want`; returns
    /// it.
    pub fn expect_line_within(
        &mut self,
        want: impl Fn(&str) -> bool,
        what: &str,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(item) => {
                    let line = item.1.clone();
                    self.take(item);
                    if want(&line) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "{}: no line {what} ({}); last lines: {:?}; stderr: {:?}",
                    self.what,
                    match e {
                        mpsc::RecvTimeoutError::Timeout => format!("none within {timeout:?}"),
                        mpsc::RecvTimeoutError::Disconnected => "its stdout closed".to_string(),
                    },
                    self.last_lines(),
                    self.stderr()
                ),
            }
        }
    }

    /// The gpid the job prints first (`gpid G`).
    pub fn gpid(&mut self) -> String {
        self.expect_line(|l| l.starts_with("gpid "), "gpid G")
            .trim_start_matches("gpid ")
            .to_string()
    }

    /// Read lines until `done(lines so far)` holds, at most `timeout`.
    pub fn read_until(&mut self, timeout: Duration, what: &str, done: impl Fn(&[String]) -> bool) {
        if !self.read_for(timeout, done) {
            panic!(
                "{}: not {what} after {timeout:?}; last lines: {:#?}; stderr: {:?}",
                self.what,
                self.last_lines(),
                self.stderr()
            );
        }
    }

    /// Read lines until `done(lines so far)` holds (true), or `timeout`
    /// passes or stdout closes (false).
    pub fn read_for(&mut self, timeout: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(item) => self.take(item),
                Err(_) => return false,
            }
        }
        true
    }

    /// Wait until no line has come for `quiet` (at most `timeout`).
    pub fn wait_quiet(&mut self, quiet: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(quiet) {
                Ok(item) => self.take(item),
                Err(_) => return,
            }
            assert!(
                Instant::now() < deadline,
                "{}: still printing after {timeout:?}",
                self.what
            );
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_none()
    }

    /// Wait for the process to end (at most `timeout`, then it is killed
    /// and the test fails); the lines it printed are read to their end.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_or(timeout, String::new)
    }

    /// [`Running::wait`], adding `more()` (taken before the process is
    /// killed) to the failure's message.
    pub fn wait_or(&mut self, timeout: Duration, more: impl FnOnce() -> String) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        while self.alive() {
            if Instant::now() >= deadline {
                let more = more();
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.drain();
                panic!(
                    "{} did not end within {timeout:?}; last lines: {:#?}; stderr: {:?}{more}",
                    self.what,
                    self.last_lines(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        while let Ok(item) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.take(item);
        }
        self.status.expect("ended")
    }

    /// Every line, once the process has ended and its stdout closed.
    pub fn all_lines(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(item) => self.take(item),
                Err(mpsc::RecvTimeoutError::Disconnected) => return self.seen.clone(),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("{}: stdout still open after {WAIT:?}", self.what)
                }
            }
        }
    }

    /// Close its stdin, then wait for the process to end (at most
    /// `timeout`): its status and every line it printed. An end of stdin
    /// racing the end of a job must not change its exit status.
    pub fn finish(&mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        self.close_stdin();
        let status = self.wait(timeout);
        (status, self.all_lines())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.alive() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every directory below `dir` (not `dir` itself).
pub fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.push(entry.path());
                todo.push(entry.path());
            }
        }
    }
    found
}

/// The job cgroups (`krg-jobs/job-*`) below node K's cgroups.
pub fn job_cgroups(lab: &Lab, k: u32) -> Vec<PathBuf> {
    lab.cgroup_dirs(k)
        .iter()
        .flat_map(|d| subdirs(d))
        .filter(|d| {
            d.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("job-"))
                && d.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|p| p == "krg-jobs")
        })
        .collect()
}
