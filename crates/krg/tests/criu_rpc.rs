//! CRIU driven through its RPC on real krg jobs: a job is dumped, then
//! restored with new streams, as `krgd` will do to migrate it.
//!
//! Method: each test builds what `krgd` builds — `krg-init` with pipes (or
//! a pty slave) on fds 0-2 and a status pipe on fd 3, the test process a
//! child subreaper — around a Python workload that prints a counter every
//! 10 ms and answers commands on stdin (echo, a checksum of its memory, its
//! threads' counters, a SysV shared memory token). It dumps the job with
//! `CriuRpc`, restores it with new pipes passed through `inherit_fd`, and
//! checks from outside that the counter goes on where it stopped, that the
//! new stdin and stdout are the job's, that its memory, threads and shared
//! memory are intact, and that the restored `krg-init` reports the end of
//! the job on the new status pipe. Timings are printed (`--nocapture`).
//!
//! Needs root, `criu` (>= 4.0) and /usr/bin/python3. Without them each test
//! prints why it skips, unless `KRG_REQUIRE_LAB=1` turns the skip into a
//! failure. Tests take a lock and run one at a time, so that the timings
//! are not those of a shared CPU. `KRG_CRIU_TEST_INIT` may name another
//! `krg-init` binary than the one cargo built.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use krg::criu::{
    AfterDump, Criu, CriuRpc, DumpOutcome, DumpRequest, ExternalKey, InheritFd, LazyPagesRequest,
    MemoryTransfer, Notice, PageTls, RestoreOutcome, RestoreRequest,
};

const KRG_INIT: &str = env!("CARGO_BIN_EXE_krg-init");
const PYTHON: &str = "/usr/bin/python3";

/// Longest wait for anything a test expects; generous for a loaded host.
const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(10);

/// Memory of the memory tests, and of the timing test.
const MEMORY_MIB: u32 = 200;
const TIMING_MIB: u32 = 256;

/// The workload. Arguments: MiB of memory to fill with random bytes,
/// number of extra threads, 1 to hold a SysV shared memory segment.
/// Prints `ready` once set up, then `count N` every 10 ms; answers the
/// lines `sum`, `threads`, `shm`, and echoes any other line as `echo LINE`.
const WORKLOAD: &str = r#"
import ctypes, hashlib, os, select, sys, threading, time
mib, nthreads, use_shm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
buf = bytearray(mib << 20)
view = memoryview(buf)
for i in range(mib):
    view[i << 20:(i + 1) << 20] = os.urandom(1 << 20)
counters = [0] * nthreads
def spin(i):
    while True:
        counters[i] += 1
        time.sleep(0.001)
for i in range(nthreads):
    threading.Thread(target=spin, args=(i,), daemon=True).start()
shm = None
if use_shm:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    shmid = libc.shmget(0, 4096, 0o1600)
    addr = libc.shmat(shmid, None, 0)
    token = os.urandom(8).hex().encode()
    ctypes.memmove(addr, token, len(token))
    shm = lambda: "%d %s" % (shmid, ctypes.string_at(addr, 16).decode())
out = sys.stdout
def answer(cmd):
    if cmd == "sum":
        out.write("sum %s\n" % hashlib.sha256(buf).hexdigest())
    elif cmd == "threads":
        out.write("threads %d %s\n" % (threading.active_count(), " ".join(map(str, counters))))
    elif cmd == "shm":
        out.write("shm %s\n" % (shm() if shm else "none"))
    else:
        out.write("echo %s\n" % cmd)
out.write("ready\n")
out.flush()
pending = b""
n = 0
while True:
    ready, _, _ = select.select([0], [], [], 0.01)
    if ready:
        data = os.read(0, 65536)
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            answer(line.decode().strip())
    out.write("count %d\n" % n)
    out.flush()
    n += 1
"#;

// --- lab conditions --------------------------------------------------------

/// Held while a test runs: tests run one at a time, also across the
/// processes of nextest (an flock on a file in the temp directory).
struct LabLock(#[allow(dead_code)] File);

/// Holds the lab for one test; `None` (after a printed reason) to skip.
fn lab(test: &str) -> Option<LabLock> {
    let missing = if
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() } != 0 {
        Some("CRIU needs root".to_owned())
    } else if !CriuRpc::new().binary().exists() {
        Some(format!(
            "no criu binary ({})",
            CriuRpc::new().binary().display()
        ))
    } else if !Path::new(PYTHON).exists() {
        Some(format!("no {PYTHON} for the workload"))
    } else {
        None
    };
    if let Some(reason) = missing {
        assert!(
            std::env::var("KRG_REQUIRE_LAB").as_deref() != Ok("1"),
            "{test}: {reason}, and KRG_REQUIRE_LAB=1"
        );
        eprintln!("{test}: skipped: {reason}");
        return None;
    }
    become_subreaper();
    let path = std::env::temp_dir().join("krg-criu-tests.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("open the lock file");
    // SAFETY: flock on an fd we own; it blocks until the lock is ours and is
    // released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}", path.display());
    Some(LabLock(file))
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

fn krg_init() -> String {
    std::env::var("KRG_CRIU_TEST_INIT").unwrap_or_else(|_| KRG_INIT.to_owned())
}

fn unique(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path = std::env::temp_dir().join(unique(&format!("krg-criu-test-{what}")));
        fs::create_dir(&path).expect("create temp dir");
        TempDir(path)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A network namespace made with `ip netns add`, with its loopback up
/// (CRIU probes TCP repair on it), deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> NetNs {
        let name = format!("krgcriu{}", unique("ns").replace('-', ""));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?}: {status}");
}

/// Cgroup v1 directories made for a test, one per controller, removed on
/// drop (once empty).
struct Cgroups(Vec<PathBuf>);

impl Cgroups {
    fn new(what: &str, controllers: &[&str]) -> Cgroups {
        let name = unique(&format!("krgcriu-{what}"));
        let dirs = controllers
            .iter()
            .map(|c| Path::new("/sys/fs/cgroup").join(c).join(&name))
            .collect::<Vec<_>>();
        for dir in &dirs {
            fs::create_dir(dir).unwrap_or_else(|err| panic!("mkdir {}: {err}", dir.display()));
        }
        Cgroups(dirs)
    }

    /// The pids in the cgroup of `controller`.
    fn procs(&self, controller: &str) -> Vec<i32> {
        let dir = self.dir(controller);
        fs::read_to_string(dir.join("cgroup.procs"))
            .expect("cgroup.procs")
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    fn dir(&self, controller: &str) -> &Path {
        self.0
            .iter()
            .find(|d| d.parent().and_then(Path::file_name) == Some(controller.as_ref()))
            .expect("controller")
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = fs::remove_dir(dir);
        }
    }
}

// --- file descriptors ------------------------------------------------------

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2");
    // SAFETY: pipe2 just returned these two fds, owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// A pty pair: the master for the test, the slave for the job.
fn open_pty() -> (OwnedFd, OwnedFd) {
    // SAFETY: posix_openpt, grantpt, unlockpt, ptsname_r and open on the fd
    // and buffer we own; each result is checked.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(
            master >= 0,
            "posix_openpt: {}",
            std::io::Error::last_os_error()
        );
        let master = OwnedFd::from_raw_fd(master);
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
            "open pty slave: {}",
            std::io::Error::last_os_error()
        );
        (master, OwnedFd::from_raw_fd(slave))
    }
}

/// Reads `source` to EOF (or EIO: a pty without slaves) into a buffer.
fn collect(source: OwnedFd) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let output = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&output);
    let mut source = File::from(source);
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 65536];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => sink
                    .lock()
                    .expect("output lock")
                    .extend_from_slice(&buf[..n]),
            }
        }
    });
    (output, reader)
}

fn read_lines(source: OwnedFd) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(File::from(source)).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// How a process ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ended {
    Exit(i32),
    Signal(i32),
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

// --- jobs ------------------------------------------------------------------

/// What a job's stdio is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stdio3 {
    Pipes,
    Pty,
}

/// Which of a job's streams an fd is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Role {
    Stdin,
    Stdout,
    Stderr,
    Tty,
    Status,
}

/// The job's ends of a fresh set of streams, and the test's ends.
struct Ends {
    job: Vec<(Role, OwnedFd)>,
    test: TestSide,
}

/// The test's side of a job's streams: `krgd`'s.
struct TestSide {
    input: Option<File>,
    output: Arc<Mutex<Vec<u8>>>,
    errors: Option<Arc<Mutex<Vec<u8>>>>,
    readers: Vec<JoinHandle<()>>,
    status: Receiver<String>,
}

impl Ends {
    fn new(kind: Stdio3) -> Ends {
        let (status_read, status_write) = pipe();
        let status = read_lines(status_read);
        match kind {
            Stdio3::Pipes => {
                let (in_read, in_write) = pipe();
                let (out_read, out_write) = pipe();
                let (err_read, err_write) = pipe();
                let (output, out_reader) = collect(out_read);
                let (errors, err_reader) = collect(err_read);
                Ends {
                    job: vec![
                        (Role::Stdin, in_read),
                        (Role::Stdout, out_write),
                        (Role::Stderr, err_write),
                        (Role::Status, status_write),
                    ],
                    test: TestSide {
                        input: Some(File::from(in_write)),
                        output,
                        errors: Some(errors),
                        readers: vec![out_reader, err_reader],
                        status,
                    },
                }
            }
            Stdio3::Pty => {
                let (master, slave) = open_pty();
                let input = File::from(master.try_clone().expect("dup master"));
                let (output, reader) = collect(master);
                Ends {
                    job: vec![(Role::Tty, slave), (Role::Status, status_write)],
                    test: TestSide {
                        input: Some(input),
                        output,
                        errors: None,
                        readers: vec![reader],
                        status,
                    },
                }
            }
        }
    }

    /// The CRIU keys of the job's streams, as `krgd` records them.
    fn keys(&self) -> HashMap<Role, ExternalKey> {
        self.job
            .iter()
            .map(|(role, fd)| (*role, ExternalKey::of_fd(fd.as_fd()).expect("stream key")))
            .collect()
    }

    fn fd(&self, role: Role) -> &OwnedFd {
        &self.job.iter().find(|(r, _)| *r == role).expect("role").1
    }
}

/// A running job as `krgd` sees it.
struct Job {
    /// Host pid of the job's `krg-init` (pid 1 of its namespace); `None`
    /// once reaped.
    pid: Option<i32>,
    kind: Stdio3,
    keys: HashMap<Role, ExternalKey>,
    side: TestSide,
}

impl Job {
    /// `krg-init --uid 0 --gid 0 --cwd /tmp [--pty] -- python3 -c WORKLOAD ...`.
    fn start(kind: Stdio3, mib: u32, threads: u32, shm: bool) -> Job {
        Job::start_in(kind, mib, threads, shm, &[])
    }

    /// The same, with `--cgroup DIR` for each of `cgroups`.
    fn start_in(kind: Stdio3, mib: u32, threads: u32, shm: bool, cgroups: &[PathBuf]) -> Job {
        let ends = Ends::new(kind);
        let keys = ends.keys();
        let mut command = Command::new(krg_init());
        command.args(["--uid", "0", "--gid", "0", "--cwd", "/tmp"]);
        for dir in cgroups {
            command.arg("--cgroup").arg(dir);
        }
        if kind == Stdio3::Pty {
            command.arg("--pty");
        }
        command
            .args(["--", PYTHON, "-c", WORKLOAD])
            .arg(mib.to_string())
            .arg(threads.to_string())
            .arg(if shm { "1" } else { "0" });
        let dup = |fd: &OwnedFd| Stdio::from(fd.try_clone().expect("dup"));
        match kind {
            Stdio3::Pipes => {
                command
                    .stdin(dup(ends.fd(Role::Stdin)))
                    .stdout(dup(ends.fd(Role::Stdout)))
                    .stderr(dup(ends.fd(Role::Stderr)));
            }
            Stdio3::Pty => {
                command
                    .stdin(dup(ends.fd(Role::Tty)))
                    .stdout(dup(ends.fd(Role::Tty)))
                    .stderr(dup(ends.fd(Role::Tty)));
            }
        }
        let status_raw = ends.fd(Role::Status).as_raw_fd();
        // SAFETY: dup2 is async-signal-safe, on an fd open in the parent
        // until spawn returns; the copy on 3 is inheritable.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(status_raw, 3) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut outer = command.spawn().expect("spawn krg-init");
        drop(command);
        let status = outer.wait().expect("wait outer krg-init");
        assert!(status.success(), "outer krg-init: {status}");
        let Ends { job, test } = ends;
        drop(job);
        let mut job = Job {
            pid: None,
            kind,
            keys,
            side: test,
        };
        let first = job.status_line();
        let pid = first.strip_prefix("pid ").and_then(|p| p.parse().ok());
        job.pid = Some(pid.unwrap_or_else(|| panic!("first status line {first:?} is not `pid N`")));
        assert_eq!(job.status_line(), "started 2");
        job.wait_output("ready\n", 0);
        job
    }

    fn pid(&self) -> i32 {
        self.pid.expect("job not reaped")
    }

    fn status_line(&self) -> String {
        self.side
            .status
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no status line; output {:?}", self.tail()))
    }

    fn text(&self) -> String {
        let bytes = self.side.output.lock().expect("output lock").clone();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    fn tail(&self) -> String {
        let text = self.text();
        let errors = self
            .side
            .errors
            .as_ref()
            .map(|e| String::from_utf8_lossy(&e.lock().expect("lock")).into_owned())
            .unwrap_or_default();
        let cut = text.len().saturating_sub(300);
        format!("stdout ...{:?}, stderr {errors:?}", &text[cut..])
    }

    /// Waits until the output after byte `from` holds `needle`; returns the
    /// line that holds it.
    fn wait_output(&self, needle: &str, from: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                let start = text[..from + at].rfind('\n').map_or(0, |n| n + 1);
                let end = text[from + at..]
                    .find('\n')
                    .map_or(text.len(), |n| from + at + n);
                return text[start..end].to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in {}",
                self.tail()
            );
            thread::sleep(POLL);
        }
    }

    fn send(&mut self, line: &str) {
        let input = self.side.input.as_mut().expect("stdin open");
        input
            .write_all(format!("{line}\n").as_bytes())
            .expect("write the job's stdin");
    }

    /// Sends a command and returns the answer line starting with `word `.
    fn ask(&mut self, word: &str) -> String {
        let from = self.text().len();
        self.send(word);
        self.wait_output(&format!("{word} "), from)
    }

    /// The numbers of the `count N` lines so far.
    fn counts(&self) -> Vec<u64> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("count ")?.parse().ok())
            .collect()
    }

    /// Waits for the (killed) job's streams to reach EOF and reaps its init.
    fn reap_killed(&mut self) -> Ended {
        let pid = self.pid.take().expect("a job to reap");
        let ended = wait_pid(pid, WAIT).expect("the dumped job's init was not killed");
        self.join_readers();
        ended
    }

    fn join_readers(&mut self) {
        let deadline = Instant::now() + WAIT;
        for reader in std::mem::take(&mut self.side.readers) {
            while !reader.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "job output not closed: {}",
                    self.tail()
                );
                thread::sleep(POLL);
            }
            reader.join().expect("reader thread");
        }
    }

    /// SIGTERM to the job's init, which forwards it to the command; checks
    /// that the init reports it on the status pipe and exits with 143.
    fn terminate(mut self) {
        let pid = self.pid();
        // SAFETY: `pid` is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "kill");
        let line = self.status_line();
        assert_eq!(
            line,
            "signal 15",
            "end of the restored job; {}",
            self.tail()
        );
        let ended = wait_pid(pid, WAIT).expect("restored init exits");
        self.pid = None;
        assert_eq!(ended, Ended::Exit(128 + libc::SIGTERM));
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = wait_pid(pid, WAIT);
        }
    }
}

// --- migration ---------------------------------------------------------------

/// How a job moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Dump (the job is killed), then restore from the images.
    Stop,
    /// Post-copy: lazy dump with a page server, lazy-pages daemon, restore.
    Lazy,
}

/// How and where a job moves.
#[derive(Clone, Debug, Default)]
struct Plan {
    lazy: bool,
    /// Restore in this network namespace.
    netns: Option<PathBuf>,
    /// Freeze the job through this freezer cgroup.
    freeze_cgroup: Option<PathBuf>,
    /// The restored job's cgroups.
    join_cgroups: Vec<PathBuf>,
    /// Pages over TLS (lazy moves).
    tls: Option<PageTls>,
}

impl Plan {
    fn mode(&self) -> Mode {
        if self.lazy {
            Mode::Lazy
        } else {
            Mode::Stop
        }
    }
}

/// What a move measured.
struct Moved {
    job: Job,
    dump: DumpOutcome,
    restore: RestoreOutcome,
    /// From CRIU's `pre-dump` notice (just before it freezes the job) to
    /// the restore's answer (the job runs again).
    freeze: Duration,
    /// Lazy mode: from the restore's answer until every page was pulled.
    pull: Option<Duration>,
    images_bytes: u64,
}

/// Moves `job` with `mode`, restoring in `netns` if given; returns the
/// restored job and the figures. Checks nothing about the job's state.
fn migrate(job: Job, mode: Mode, netns: Option<&Path>) -> Moved {
    let plan = Plan {
        lazy: mode == Mode::Lazy,
        netns: netns.map(Path::to_owned),
        ..Plan::default()
    };
    migrate_with(job, &plan)
}

fn migrate_with(job: Job, plan: &Plan) -> Moved {
    let mode = plan.mode();
    let netns = plan.netns.as_deref();
    let dir = TempDir::new("images");
    let images = dir.join("images");
    let target_work = dir.join("target");
    fs::create_dir(&target_work).expect("target work dir");
    let criu = CriuRpc::new();
    let (tx, notices) = mpsc::channel::<Notice>();
    let mut dump_req = DumpRequest::new(job.pid(), &images);
    dump_req.after = AfterDump::Kill;
    dump_req.streams = job.keys.values().copied().collect();
    dump_req.notices = Some(tx);
    dump_req.freeze_cgroup = plan.freeze_cgroup.clone();
    let port = free_port();
    if mode == Mode::Lazy {
        dump_req.memory = MemoryTransfer::Lazy { port };
        dump_req.page_tls = plan.tls.clone();
    }
    println!("--- dump pid {} ({mode:?})", job.pid());
    let dumper = {
        let criu = criu.clone();
        thread::spawn(move || criu.dump(&dump_req))
    };
    let mut lazy_dumper = None;
    let pre_dump = wait_notice(&notices, "pre-dump");
    let lazy = match mode {
        Mode::Stop => None,
        Mode::Lazy => {
            wait_notice(&notices, "status-ready");
            let mut req = LazyPagesRequest::new(&images, "127.0.0.1", port);
            req.work_dir = Some(target_work.clone());
            req.netns = netns.map(Path::to_owned);
            req.tls = plan.tls.clone();
            Some(criu.lazy_pages(&req).unwrap_or_else(|err| panic!("{err}")))
        }
    };
    let dump_done = match mode {
        Mode::Stop => Some(join_dump(dumper, &job)),
        Mode::Lazy => {
            // The lazy dump answers only when every page has been pulled.
            lazy_dumper = Some(dumper);
            None
        }
    };
    let ends = Ends::new(job.kind);
    let mut restore_req = RestoreRequest::new(&images);
    restore_req.work_dir = Some(target_work.clone());
    restore_req.netns = netns.map(Path::to_owned);
    restore_req.lazy_pages = mode == Mode::Lazy;
    restore_req.join_cgroups = plan.join_cgroups.clone();
    restore_req.inherit = ends
        .job
        .iter()
        .map(|(role, fd)| InheritFd {
            key: job.keys[role],
            fd: fd.as_raw_fd(),
        })
        .collect();
    println!("--- restore ({mode:?})");
    let restore = criu
        .restore(&restore_req)
        .unwrap_or_else(|err| panic!("{err}"));
    let restored_at = Instant::now();
    let freeze = restored_at.duration_since(pre_dump);
    let keys = ends.keys();
    let Ends {
        job: job_ends,
        test,
    } = ends;
    drop(job_ends);
    let new_job = Job {
        pid: Some(restore.pid),
        kind: job.kind,
        keys,
        side: test,
    };
    let pull = lazy.map(|daemon| {
        daemon.wait(WAIT).unwrap_or_else(|err| panic!("{err}"));
        restored_at.elapsed()
    });
    let dump = match (dump_done, lazy_dumper) {
        (Some(dump), _) => dump,
        (None, Some(dumper)) => join_dump(dumper, &job),
        (None, None) => unreachable!("a dump is done or under way"),
    };
    finish(job, new_job, dump, restore, freeze, pull, &images)
}

fn finish(
    mut old: Job,
    job: Job,
    dump: DumpOutcome,
    restore: RestoreOutcome,
    freeze: Duration,
    pull: Option<Duration>,
    images: &Path,
) -> Moved {
    assert_eq!(
        old.reap_killed(),
        Ended::Signal(libc::SIGKILL),
        "CRIU kills the dumped job"
    );
    let images_bytes = fs::read_dir(images)
        .expect("images dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    // The old streams are closed now: the counter of the old job is final.
    let moved = Moved {
        job,
        dump,
        restore,
        freeze,
        pull,
        images_bytes,
    };
    check_counter_goes_on(&old, &moved.job);
    moved
}

fn join_dump(
    dumper: JoinHandle<Result<DumpOutcome, krg::criu::CriuError>>,
    job: &Job,
) -> DumpOutcome {
    dumper
        .join()
        .expect("dump thread")
        .unwrap_or_else(|err| dump_failed(&err, job))
}

/// Panics with a failed dump's error, and a hint for the known cause.
fn dump_failed(err: &krg::criu::CriuError, job: &Job) -> ! {
    let text = err.to_string();
    let hint = if text.contains("Can't lookup mount") && text.contains("krg-init") {
        "\nhint: krg-init maps its binary from the node's mount namespace; its inner init \
         must re-exec itself after unshare(CLONE_NEWNS) (see docs/criu.md)"
    } else {
        ""
    };
    panic!("{text}{hint}\njob: {}", job.tail())
}

fn wait_notice(notices: &Receiver<Notice>, script: &str) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match notices.recv_timeout(left) {
            Ok(n) if n.script == script => return n.at,
            Ok(_) => continue,
            Err(_) => panic!("no {script:?} notice from criu"),
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// The restored job's first count follows the old job's last one (the
/// same number if CRIU caught the write in flight and restarted it).
fn check_counter_goes_on(old: &Job, new: &Job) {
    let last_old = *old.counts().last().expect("the old job counted");
    new.wait_output("count ", 0);
    let first_new = new.counts()[0];
    assert!(
        first_new == last_old + 1 || first_new == last_old,
        "the counter went from {last_old} to {first_new}"
    );
}

fn report(test: &str, mib: u32, moved: &Moved) {
    let dump_stats = moved.dump.stats.map_or_else(
        || "criu figures n/a".to_owned(),
        |d| {
            format!(
                "criu frozen {} ms, memdump {} ms, memwrite {} ms, pages written {}",
                d.frozen_time.as_millis(),
                d.memdump_time.as_millis(),
                d.memwrite_time.as_millis(),
                d.pages_written
            )
        },
    );
    let restore_stats = moved.restore.stats.map_or_else(
        || "criu figures n/a".to_owned(),
        |r| format!("criu restore {} ms", r.restore_time.as_millis()),
    );
    println!(
        "{test}: {mib} MiB: freeze {} ms (pre-dump notice to restored); dump call {} ms \
         ({dump_stats}); restore call {} ms ({restore_stats}); images {} MiB{}",
        moved.freeze.as_millis(),
        moved.dump.duration.as_millis(),
        moved.restore.duration.as_millis(),
        moved.images_bytes >> 20,
        moved
            .pull
            .map(|p| format!("; all pages pulled {} ms after the restore", p.as_millis()))
            .unwrap_or_default(),
    );
}

/// Net namespace inode of a process or a namespace file.
fn netns_inode(path: &Path) -> u64 {
    fs::metadata(path).expect("stat netns").ino()
}

fn children(pid: i32) -> Vec<i32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

// --- tests -------------------------------------------------------------------

/// Goal: a job with piped stdio survives a dump (kill) and a restore with
/// new pipes. Method: dump, restore with inherit_fd, check the counter, an
/// echo through the new stdin, and the end reported on the new status pipe.
#[test]
fn pipes_are_swapped_at_restore() {
    let Some(_lab) = lab("pipes_are_swapped_at_restore") else {
        return;
    };
    let job = Job::start(Stdio3::Pipes, 0, 0, false);
    job.wait_output("count 20\n", 0);
    let moved = migrate(job, Mode::Stop, None);
    report("pipes_are_swapped_at_restore", 0, &moved);
    let mut job = moved.job;
    let word = unique("hello");
    job.send(&word);
    job.wait_output(&format!("echo {word}"), 0);
    assert_eq!(
        netns_inode(Path::new(&format!("/proc/{}/ns/net", job.pid()))),
        netns_inode(Path::new("/proc/self/ns/net")),
        "restored in our network namespace"
    );
    job.terminate();
}

/// Goal: a checkpoint (`leave_running`) leaves the job running and can be
/// restarted beside it. Method: dump with `AfterDump::Run`, check the job
/// still counts on its old pipes, restore the images with new pipes: the
/// copy counts on from the checkpoint, both answer, both end cleanly.
#[test]
fn checkpoint_leaves_the_job_running() {
    let Some(_lab) = lab("checkpoint_leaves_the_job_running") else {
        return;
    };
    let dir = TempDir::new("checkpoint");
    let images = dir.join("images");
    let mut job = Job::start(Stdio3::Pipes, 0, 0, false);
    job.wait_output("count 20\n", 0);
    let criu = CriuRpc::new();
    let mut req = DumpRequest::new(job.pid(), &images);
    req.after = AfterDump::Run;
    let before = *job.counts().last().expect("counted");
    let dump = criu
        .dump(&req)
        .unwrap_or_else(|err| dump_failed(&err, &job));
    assert!(dump.notice("post-dump").is_some(), "{:?}", dump.notices);
    let at_dump = *job.counts().last().expect("counted");
    job.wait_output(&format!("count {}\n", at_dump + 50), 0);
    let ends = Ends::new(Stdio3::Pipes);
    let mut restore = RestoreRequest::new(&images);
    restore.inherit = ends
        .job
        .iter()
        .map(|(role, fd)| InheritFd {
            key: job.keys[role],
            fd: fd.as_raw_fd(),
        })
        .collect();
    let outcome = criu.restore(&restore).unwrap_or_else(|err| panic!("{err}"));
    let post_restore = outcome.notices.iter().find(|n| n.script == "post-restore");
    assert_eq!(
        post_restore.map(|n| n.pid),
        Some(outcome.pid),
        "{:?}",
        outcome.notices
    );
    let keys = ends.keys();
    let Ends {
        job: job_ends,
        test,
    } = ends;
    drop(job_ends);
    let mut copy = Job {
        pid: Some(outcome.pid),
        kind: Stdio3::Pipes,
        keys,
        side: test,
    };
    copy.wait_output("count ", 0);
    let first = copy.counts()[0];
    assert!(
        (before..=at_dump + 1).contains(&first),
        "the copy counts on from the checkpoint (between {before} and {at_dump}), not from {first}"
    );
    for j in [&mut job, &mut copy] {
        let word = unique("hello");
        j.send(&word);
        j.wait_output(&format!("echo {word}"), 0);
    }
    copy.terminate();
    job.terminate();
}

/// Goal: a job restored by a `criu` running in another network namespace
/// lands in it (as on another node). Method: as above, with the restore's
/// netns set to a fresh `ip netns`; check /proc/PID/ns/net of the job's
/// init and command.
#[test]
fn restore_lands_in_another_network_namespace() {
    let Some(_lab) = lab("restore_lands_in_another_network_namespace") else {
        return;
    };
    let netns = NetNs::new();
    let job = Job::start(Stdio3::Pipes, 0, 0, false);
    job.wait_output("count 20\n", 0);
    let moved = migrate(job, Mode::Stop, Some(&netns.path()));
    report("restore_lands_in_another_network_namespace", 0, &moved);
    let mut job = moved.job;
    let target = netns_inode(&netns.path());
    assert_ne!(target, netns_inode(Path::new("/proc/self/ns/net")));
    let pids = std::iter::once(job.pid()).chain(children(job.pid()));
    for pid in pids {
        assert_eq!(
            netns_inode(Path::new(&format!("/proc/{pid}/ns/net"))),
            target,
            "pid {pid} is in the target network namespace"
        );
    }
    let word = unique("hello");
    job.send(&word);
    job.wait_output(&format!("echo {word}"), 0);
    job.terminate();
}

/// Goal: a job whose stdio is a pty slave (master in krgd) moves to a new
/// pty. Method: dump with the slave declared `external tty[..]`, restore
/// with a new slave as inherit_fd; check the counter, an echo, and that the
/// command's controlling terminal is the new pty.
#[test]
fn pty_is_swapped_at_restore() {
    let Some(_lab) = lab("pty_is_swapped_at_restore") else {
        return;
    };
    let job = Job::start(Stdio3::Pty, 0, 0, false);
    job.wait_output("count 20\n", 0);
    let moved = migrate(job, Mode::Stop, None);
    report("pty_is_swapped_at_restore", 0, &moved);
    let mut job = moved.job;
    let word = unique("hello");
    job.send(&word);
    job.wait_output(&format!("echo {word}"), 0);
    let command = children(job.pid())[0];
    let stat = fs::read_to_string(format!("/proc/{command}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let tty_nr: u64 = after_name
        .split(' ')
        .nth(4)
        .expect("tty_nr")
        .parse()
        .expect("number");
    match job.keys[&Role::Tty] {
        ExternalKey::Tty { rdev, .. } => assert_eq!(tty_nr, rdev, "controlling tty is the new pty"),
        other => panic!("pty key {other:?}"),
    }
    job.terminate();
}

/// Goal: a job in its own cgroups (as krgd makes them) is frozen through
/// its freezer cgroup and restored into the target's cgroups. Method:
/// `krg-init --cgroup` into source freezer and pids cgroups, dump with
/// `freeze_cgroup`, restore with `join_cgroups` of target cgroups (CRIU
/// leaves cgroups alone); the whole restored tree is in the target ones.
#[test]
fn cgroups_are_the_targets() {
    let Some(_lab) = lab("cgroups_are_the_targets") else {
        return;
    };
    let controllers = ["freezer", "pids"];
    if !Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists() {
        eprintln!("cgroups_are_the_targets: skipped: no cgroup v1 freezer");
        return;
    }
    let source = Cgroups::new("src", &controllers);
    let target = Cgroups::new("dst", &controllers);
    let job = Job::start_in(Stdio3::Pipes, 0, 2, false, &source.0);
    job.wait_output("count 20\n", 0);
    assert_eq!(source.procs("freezer").len(), 2, "krg-init and python");
    let plan = Plan {
        freeze_cgroup: Some(source.dir("freezer").to_owned()),
        join_cgroups: target.0.clone(),
        ..Plan::default()
    };
    let moved = migrate_with(job, &plan);
    report("cgroups_are_the_targets", 0, &moved);
    let job = moved.job;
    let mut tree: Vec<i32> = std::iter::once(job.pid())
        .chain(children(job.pid()))
        .collect();
    tree.sort_unstable();
    for controller in controllers {
        let mut procs = target.procs(controller);
        procs.sort_unstable();
        assert_eq!(
            procs, tree,
            "the restored tree is in the target {controller} cgroup"
        );
        assert!(
            source.procs(controller).is_empty(),
            "nothing left in the source"
        );
    }
    job.terminate();
}

/// Goal: memory, threads and SysV shared memory survive a stop-mode move.
/// Method: a job with 200 MiB of random bytes, 4 threads and a SysV
/// segment; compare the checksum, the thread count and the segment's
/// token before and after, and check the threads still run.
#[test]
fn memory_threads_and_shm_survive() {
    let Some(_lab) = lab("memory_threads_and_shm_survive") else {
        return;
    };
    let mut job = Job::start(Stdio3::Pipes, MEMORY_MIB, 4, true);
    let sum = job.ask("sum");
    let threads = job.ask("threads");
    let shm = job.ask("shm");
    assert!(threads.starts_with("threads 5 "), "{threads}");
    let moved = migrate(job, Mode::Stop, None);
    report("memory_threads_and_shm_survive", MEMORY_MIB, &moved);
    let mut job = moved.job;
    assert_eq!(job.ask("sum"), sum, "memory checksum");
    assert_eq!(job.ask("shm"), shm, "SysV shared memory");
    let after = job.ask("threads");
    thread::sleep(Duration::from_millis(100));
    let later = job.ask("threads");
    let numbers = |line: &str| -> Vec<u64> {
        line.split(' ')
            .skip(1)
            .map(|n| n.parse().expect("number"))
            .collect()
    };
    let (before, after, later) = (numbers(&threads), numbers(&after), numbers(&later));
    assert_eq!(after[0], before[0], "thread count");
    for i in 1..before.len() {
        assert!(after[i] >= before[i], "thread {i} kept its counter");
        assert!(later[i] > after[i], "thread {i} runs after the restore");
    }
    job.terminate();
}

/// Goal: post-copy migration works and loses no page. Method: a lazy dump
/// serving 200 MiB on a page server, a lazy-pages daemon, a lazy restore;
/// the checksum faults every page in and must match.
#[test]
fn lazy_migration_keeps_memory() {
    let Some(_lab) = lab("lazy_migration_keeps_memory") else {
        return;
    };
    let mut job = Job::start(Stdio3::Pipes, MEMORY_MIB, 2, false);
    let sum = job.ask("sum");
    let moved = migrate(job, Mode::Lazy, None);
    report("lazy_migration_keeps_memory", MEMORY_MIB, &moved);
    let mut job = moved.job;
    assert_eq!(job.ask("sum"), sum, "memory checksum after post-copy");
    let word = unique("hello");
    job.send(&word);
    job.wait_output(&format!("echo {word}"), 0);
    job.terminate();
}

/// A cluster identity (CA, node certificate and key) in `dir`, as a node
/// keeps it in its state directory.
fn identity_in(dir: &TempDir) -> (krg::identity::Identity, PageTls) {
    let (identity, _) = krg::identity::ca::init_cluster("127.0.0.1:7470").expect("a CA");
    let state = dir.join("state");
    krg::identity::StateDir::new(&state)
        .save_new(&identity)
        .expect("identity files");
    (identity, PageTls::in_state_dir(&state))
}

/// Goal: post-copy over mutual TLS loses no page. Method: as
/// `lazy_migration_keeps_memory`, with the page server and the lazy-pages
/// daemon given a cluster's CA, certificate and key.
#[test]
fn lazy_migration_over_tls_keeps_memory() {
    let Some(_lab) = lab("lazy_migration_over_tls_keeps_memory") else {
        return;
    };
    let dir = TempDir::new("tls");
    let (_, tls) = identity_in(&dir);
    let mut job = Job::start(Stdio3::Pipes, MEMORY_MIB, 2, false);
    let sum = job.ask("sum");
    let plan = Plan {
        lazy: true,
        tls: Some(tls),
        ..Plan::default()
    };
    let moved = migrate_with(job, &plan);
    report("lazy_migration_over_tls_keeps_memory", MEMORY_MIB, &moved);
    let mut job = moved.job;
    assert_eq!(
        job.ask("sum"),
        sum,
        "memory checksum after post-copy over TLS"
    );
    job.terminate();
}

/// Goal: the page server of a lazy dump serves only holders of a node
/// certificate of the cluster. Method: two lazy dumps with TLS; once ready,
/// a TLS client with the cluster's CA but no certificate of its own must
/// be refused during the handshake, and one with a node certificate must
/// complete it (a page server in clear would fail both the same way).
#[test]
fn lazy_page_server_wants_a_node_certificate() {
    let Some(_lab) = lab("lazy_page_server_wants_a_node_certificate") else {
        return;
    };
    let dir = TempDir::new("tls-refusal");
    let (identity, tls) = identity_in(&dir);
    let anonymous = krg::identity::tls::anonymous_client_config(&identity.ca_cert_pem)
        .expect("anonymous client config");
    let member = krg::identity::tls::client_config(&identity).expect("client config");
    for (who, config, accepted) in [
        ("no certificate", anonymous, false),
        ("a node certificate", member, true),
    ] {
        let job = Job::start(Stdio3::Pipes, 16, 0, false);
        let images = dir.join(&unique("images"));
        let port = free_port();
        let (tx, notices) = mpsc::channel::<Notice>();
        let mut req = DumpRequest::new(job.pid(), &images);
        req.after = AfterDump::Stop;
        req.streams = job.keys.values().copied().collect();
        req.notices = Some(tx);
        req.memory = MemoryTransfer::Lazy { port };
        req.page_tls = Some(tls.clone());
        let criu = CriuRpc::new();
        let dumper = thread::spawn(move || criu.dump(&req));
        wait_notice(&notices, "status-ready");
        let handshake = tls_handshake(port, config);
        println!("lazy_page_server_wants_a_node_certificate: {who}: {handshake:?}");
        assert_eq!(
            handshake.is_ok(),
            accepted,
            "a client with {who}: {handshake:?}"
        );
        // The page server ends with its client; the job is left stopped.
        let _ = dumper.join().expect("dump thread");
        job.terminate();
    }
}

/// A TLS handshake with the page server on 127.0.0.1:`port`, as a client
/// configured by `config`: `Ok` when the server, after the handshake, keeps
/// the connection open waiting for a request; the error when it ends it.
fn tls_handshake(port: u16, config: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut conn = rustls::ClientConnection::new(config, krg::identity::tls::server_name())
        .map_err(|e| e.to_string())?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    // In TLS 1.3 the server judges the client's certificate after the
    // client has finished: its verdict is what comes next (an alert, or
    // nothing while it waits for a request).
    // Session tickets may come first: read until the server is silent.
    tcp.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    loop {
        match conn.complete_io(&mut tcp) {
            Ok((0, _)) => return Err("the server closed the connection".to_owned()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Goal: the freeze time of a 256 MiB job, stop mode against post-copy.
/// Method: move the same kind of job each way and print the figures; only
/// the job's survival is asserted.
#[test]
fn freeze_time_stop_and_lazy() {
    let Some(_lab) = lab("freeze_time_stop_and_lazy") else {
        return;
    };
    for mode in [Mode::Stop, Mode::Lazy] {
        let mut job = Job::start(Stdio3::Pipes, TIMING_MIB, 0, false);
        let sum = job.ask("sum");
        let moved = migrate(job, mode, None);
        report(
            &format!("freeze_time_stop_and_lazy {mode:?}"),
            TIMING_MIB,
            &moved,
        );
        let mut job = moved.job;
        assert_eq!(job.ask("sum"), sum, "memory checksum ({mode:?})");
        job.terminate();
    }
}

/// Goal: `check` reports this host: CRIU's version, a passing `criu check`,
/// lazy pages, and whether soft-dirty tracking (pre-copy) exists.
#[test]
fn check_reports_features() {
    let Some(_lab) = lab("check_reports_features") else {
        return;
    };
    let report = CriuRpc::new().check().unwrap_or_else(|err| panic!("{err}"));
    println!("check_reports_features: {report:?}");
    assert!(report.version.major >= 4, "{report:?}");
    assert_eq!(report.check, Ok(()), "criu check");
    assert!(report.lazy_pages, "userfaultfd works here");
    if !report.mem_dirty_track {
        println!(
            "check_reports_features: pre-copy refused: {}",
            report.pre_copy_refusal().expect("a reason")
        );
    }
}

/// Goal: a failed dump says why, in CRIU's own words. Method: dump a
/// process with an established TCP connection (which krg refuses to move);
/// the error names the pid and quotes CRIU's log, and the process lives on.
#[test]
fn a_failed_dump_quotes_criu() {
    let Some(_lab) = lab("a_failed_dump_quotes_criu") else {
        return;
    };
    let dir = TempDir::new("fail");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let script = "import socket, sys, time\n\
                  s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n\
                  print('connected', flush=True)\n\
                  time.sleep(60)\n";
    let mut command = Command::new(PYTHON);
    command
        .args(["-c", script, &port.to_string()])
        .stdout(Stdio::piped());
    // CRIU refuses a process whose session leader is outside the dumped
    // tree before it ever looks at sockets, and under CI the test runner's
    // session leader is; a session of its own leaves TCP as the one reason.
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("spawn python");
    let mut child = KillOnDrop(child);
    let (_peer, _) = listener.accept().expect("accept");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line, "connected\n");
    let pid = i32::try_from(child.id()).expect("pid");
    let err = CriuRpc::new()
        .dump(&DumpRequest::new(pid, dir.join("images")))
        .expect_err("criu refuses an established connection");
    let text = err.to_string();
    println!("a_failed_dump_quotes_criu: {text}");
    assert!(
        text.contains(&format!("criu dump of pid {pid} failed")),
        "{text}"
    );
    assert!(text.contains("TCP"), "CRIU's own reason: {text}");
    assert_eq!(
        child.try_wait().expect("try_wait"),
        None,
        "the process lives on"
    );
}

/// Kills and reaps a child however the test ends, so that a failed
/// assertion leaves no process behind.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Goal: CRIU skips its kernel probes (15 ms of every dump, restore and
/// lazy-pages start here) once krgd has primed its cache, also where /run
/// is not a tmpfs and CRIU would never write that cache itself (this
/// machine). Method: remove the cache, prime it as krgd does at start (a
/// second time finds it fresh), dump a job, and read in the dump's log that
/// CRIU loaded it.
#[test]
fn a_dump_uses_the_primed_kernel_cache() {
    let Some(_lab) = lab("a_dump_uses_the_primed_kernel_cache") else {
        return;
    };
    let criu = CriuRpc::new();
    let run_is_tmpfs = nix::sys::statfs::statfs("/run")
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
    if !run_is_tmpfs {
        // Only krgd's priming can bring it back.
        let _ = fs::remove_file("/run/criu.kdat");
    }
    // `Fresh` if a lab's krgd, starting meanwhile, primed it first.
    let primed = krg::criu::kdat::prime(criu.binary()).expect("primes the cache");
    assert!(
        run_is_tmpfs || primed != krg::criu::kdat::Primed::NotNeeded,
        "{primed:?} with /run not a tmpfs"
    );
    let again = krg::criu::kdat::prime(criu.binary()).expect("primes the cache");
    assert!(
        again != krg::criu::kdat::Primed::Written,
        "{primed:?} then {again:?}: a fresh cache is written again"
    );
    let dir = TempDir::new("kdat");
    let job = Job::start(Stdio3::Pipes, 0, 0, false);
    job.wait_output("count 5\n", 0);
    let mut req = DumpRequest::new(job.pid(), dir.join("images"));
    req.after = AfterDump::Run;
    let dump = criu
        .dump(&req)
        .unwrap_or_else(|err| dump_failed(&err, &job));
    let log = fs::read_to_string(&dump.log).expect("the dump's log");
    assert!(
        log.contains("Loaded kdat cache"),
        "CRIU probed the kernel again: {}",
        log.lines().take(8).collect::<Vec<_>>().join(" | ")
    );
}

/// The `criu` processes that are this process's children, by pid.
fn criu_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // `PID (COMM) STATE PPID ...`; a zombie (Z) is already gone.
            let Some(rest) = stat.strip_prefix(&format!("{pid} (criu) ")) else {
                return false;
            };
            let mut fields = rest.split(' ');
            fields.next() != Some("Z") && fields.next() == Some(me.as_str())
        })
        .collect()
}

/// Goal: the dump after a dump runs on the `criu` made ahead once the
/// first ended (its start-up, about 4.5 ms, out of the job's freeze), and
/// a spare whose binary has been replaced since is not used. Method: a
/// copy of the criu binary; a checkpoint through `dump_when_asked`, as
/// krgd's are; then a spare `criu` child appears. At the next
/// checkpoint's `pre-dump` notice that spare is alive: it is the one
/// dumping. After the copy is replaced by another, the spare waiting then
/// is gone by the next `pre-dump`: it was not used, a new one was.
#[test]
fn a_dump_runs_on_the_criu_made_after_the_last() {
    let Some(_lab) = lab("a_dump_runs_on_the_criu_made_after_the_last") else {
        return;
    };
    let dir = TempDir::new("spare");
    let binary = dir.join("criu");
    fs::copy(CriuRpc::new().binary(), &binary).expect("copies criu");
    let criu = CriuRpc::with_binary(&binary);
    let job = Job::start(Stdio3::Pipes, 0, 0, false);
    job.wait_output("count 5\n", 0);
    // One checkpoint; `spare` is the criu waiting at its pre-dump notice,
    // which must be alive then iff `used`.
    let checkpoint = |n: u32, spare: Option<i32>, used: bool| {
        let (req_tx, req_rx) = mpsc::channel();
        let (notice_tx, notices) = mpsc::channel();
        let mut req = DumpRequest::new(job.pid(), dir.join(&format!("images-{n}")));
        req.after = AfterDump::Run;
        req.notices = Some(notice_tx);
        let dumper = {
            let criu = criu.clone();
            thread::spawn(move || criu.dump_when_asked(req_rx))
        };
        req_tx.send(req).expect("the dump waits for its request");
        wait_notice(&notices, "pre-dump");
        if let Some(spare) = spare {
            assert_eq!(
                criu_children().contains(&spare),
                used,
                "checkpoint {n}: the spare criu {spare} at pre-dump (children {:?})",
                criu_children()
            );
        }
        dumper
            .join()
            .expect("the dump thread")
            .unwrap_or_else(|err| dump_failed(&err, &job));
    };
    let spare_made = || {
        let deadline = Instant::now() + WAIT;
        loop {
            if let [one] = criu_children()[..] {
                return one;
            }
            assert!(
                Instant::now() < deadline,
                "no spare criu: {:?}",
                criu_children()
            );
            thread::sleep(Duration::from_millis(10));
        }
    };
    checkpoint(1, None, false);
    let first = spare_made();
    checkpoint(2, Some(first), true);
    let second = spare_made();
    assert_ne!(first, second, "a new spare after the second dump");
    // An upgrade, as `install` or a package does it: a new file renamed
    // over the old one.
    let upgraded = dir.join("criu.new");
    fs::copy(&binary, &upgraded).expect("copies criu again");
    fs::rename(&upgraded, &binary).expect("replaces the copy");
    checkpoint(3, Some(second), false);
    job.terminate();
}
