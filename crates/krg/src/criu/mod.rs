//! CRIU, the tool that checkpoints and restores a job's process tree.
//!
//! krg drives CRIU through its RPC: `criu swrk <fd>` on one end of a
//! `SOCK_SEQPACKET` socket pair, protobuf messages of CRIU's
//! `images/rpc.proto` (the generated types come from the `rust-criu`
//! crate; the small driver in [`rpc`] is ours). Nothing here parses CRIU's
//! text output; the only text read is the tail of its log file, to explain
//! a failure.
//!
//! The outside world sits behind the [`Criu`] trait: [`CriuRpc`] is the
//! real one, [`fake::FakeCriu`] records requests for tests without root.
//! Every call blocks for as long as CRIU works (seconds for a large job):
//! `krgd` calls it from `spawn_blocking`.
//!
//! What a krg job needs from CRIU, and why each option is set, is told in
//! `docs/criu.md`. In short:
//!
//! - a job is `krg-init` as pid 1 of its own PID, mount and IPC namespaces:
//!   [`DumpRequest::pid`] is the host pid of that init, and CRIU dumps the
//!   three namespaces with it (the network namespace is the node's and is
//!   not dumped, so a restore lands in the restoring `criu`'s one);
//! - the job's mounts are copies of the node's: they are dumped as
//!   auto-detected external mounts (`external mnt[]`) and bound again from
//!   the same paths at restore (`auto_ext_mnt`, `root /`); `nsfs` mounts
//!   (other namespaces pinned by the node) are skipped;
//! - the job's stdio pipes and status pipe have their other end in `krgd`:
//!   CRIU records each as `pipe:[INODE]` and a restore swaps in new pipes
//!   through `inherit_fd` under the same key ([`ExternalKey`]); a pty slave
//!   is declared `external tty[RDEV:DEV]` at dump and swapped the same way;
//! - post-copy migration: the source dumps with `lazy_pages` and serves
//!   the memory from a page server, the target runs `criu lazy-pages`
//!   ([`lazy`]) and restores with `lazy_pages`.

pub mod dump;
pub mod fake;
pub mod kdat;
pub mod lazy;
pub mod log;
pub mod page_server_socket;
pub mod restore;
pub mod rpc;
pub mod spare;
pub mod stats;

use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use krg_types::Gpid;

pub use lazy::{LazyPages, LazyPagesRequest};
pub use stats::{DumpStats, RestoreStats};

/// The CRIU binary used when none is configured and none is on `PATH`.
pub const CRIU_PATH_DEFAULT: &str = "/usr/local/sbin/criu";

/// Largest RPC message krg accepts from CRIU. Answers are a few hundred
/// bytes; anything near this is a broken peer, not a bigger answer.
pub const RPC_MESSAGE_BYTES_MAX: usize = 64 << 10;

/// Most file descriptors CRIU may pass with one message (it passes one,
/// the master of an orphan pty); more are closed and refused.
pub const RPC_FDS_PER_MESSAGE_MAX: usize = 4;

/// Most notifications one call may bring (CRIU sends about ten per call);
/// a peer that sends more is treated as broken.
pub const RPC_NOTICES_MAX: usize = 1024;

/// How long a dump or restore may take by default, all notifications
/// included. A lazy dump lasts until the target has pulled every page.
pub const CALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(600);

/// How long a quick call (version, check, features) may take.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `criu` may take to exit once it has answered.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// CRIU's log level for dumps and restores: 4 is debug, the level whose
/// lines explain a failure (the logs are a few hundred KiB per call).
pub const LOG_LEVEL_DEFAULT: u32 = 4;

/// Most log lines quoted in an error.
pub const LOG_TAIL_LINES_MAX: usize = 4;

/// The outside world: CRIU. Every method blocks until CRIU is done.
pub trait Criu: Send + Sync {
    /// What this CRIU and kernel can do: version, `criu check`, and the
    /// optional features (memory tracking for pre-copy, lazy pages).
    fn check(&self) -> Result<CheckReport, CriuError>;

    /// Dumps a job's tree into `req.images_dir` (a pre-dump too, see
    /// [`DumpKind`]).
    fn dump(&self, req: &DumpRequest) -> Result<DumpOutcome, CriuError>;

    /// Restores a tree from `req.images_dir`; its root becomes a child of
    /// the caller (or of its subreaper).
    fn restore(&self, req: &RestoreRequest) -> Result<RestoreOutcome, CriuError>;

    /// Starts the target's `criu lazy-pages` daemon for a post-copy
    /// restore, and returns once it is ready for the restore.
    fn lazy_pages(&self, req: &LazyPagesRequest) -> Result<LazyPages, CriuError>;

    /// [`Criu::dump`] of a request that comes later on `request`: CRIU is
    /// started at once, so that its own start-up is not part of the job's
    /// freeze. A closed channel calls the dump off.
    fn dump_when_asked(&self, request: Receiver<DumpRequest>) -> Result<DumpOutcome, CriuError> {
        let req = request.recv().map_err(|_| called_off(Action::Dump))?;
        self.dump(&req)
    }

    /// [`Criu::restore`] with CRIU started at once and sent the request once
    /// `go` brings `true` (a post-copy restore waits for its lazy-pages
    /// daemon); anything else calls it off.
    fn restore_when(
        &self,
        req: &RestoreRequest,
        go: Receiver<bool>,
    ) -> Result<RestoreOutcome, CriuError> {
        if go.recv() != Ok(true) {
            return Err(called_off(Action::Restore));
        }
        self.restore(req)
    }
}

fn called_off(action: Action) -> CriuError {
    CriuError::Invalid(format!("the {action} was called off before its request"))
}

/// CRIU's version, from its RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriuVersion {
    pub major: u32,
    pub minor: u32,
    pub sublevel: u32,
    /// Set on builds from git.
    pub gitid: Option<String>,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)
    }
}

/// What [`Criu::check`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub version: CriuVersion,
    /// `criu check` (the required features) passes; else why not.
    pub check: Result<(), String>,
    /// Soft-dirty memory tracking: needed for pre-dumps (pre-copy).
    pub mem_dirty_track: bool,
    /// userfaultfd with non-cooperative events: needed for lazy pages
    /// (post-copy).
    pub lazy_pages: bool,
    /// A pidfd store for iterative dumps.
    pub pidfd_store: bool,
}

impl CheckReport {
    /// Why pre-copy (pre-dumps) cannot be used, or `None` when it can.
    pub fn pre_copy_refusal(&self) -> Option<&'static str> {
        (!self.mem_dirty_track)
            .then_some("the kernel has no soft-dirty memory tracking (mem_dirty_track), so pre-dumps are impossible")
    }
}

/// A file whose other end is outside the job (in `krgd`), named as CRIU
/// names it in its images and in `inherit_fd` keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExternalKey {
    /// A pipe, by inode: `pipe:[12345]`. CRIU records it without being told.
    Pipe { inode: u64 },
    /// A terminal (a pty slave), by its device and the device of the file
    /// system it was opened on: `tty[8800:1a]`. Must be declared external
    /// at dump.
    Tty { rdev: u64, dev: u64 },
}

impl ExternalKey {
    /// The key of a pipe or terminal `krgd` holds (either end of a pipe,
    /// the slave of a pty).
    pub fn of_fd(fd: BorrowedFd<'_>) -> Result<ExternalKey, CriuError> {
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let meta = std::fs::metadata(&path).map_err(|source| CriuError::Io {
            what: "cannot stat an external file",
            path: path.clone(),
            source,
        })?;
        ExternalKey::of_metadata(&meta).ok_or(CriuError::Invalid(format!(
            "fd {} is neither a pipe nor a terminal and cannot be an external stream",
            fd.as_raw_fd()
        )))
    }

    /// The key of `/proc/PID/fd/FD`, for a file of a running job.
    pub fn of_proc_fd(pid: i32, fd: RawFd) -> Result<ExternalKey, CriuError> {
        let path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
        let meta = std::fs::metadata(&path).map_err(|source| CriuError::Io {
            what: "cannot stat a job's file",
            path: path.clone(),
            source,
        })?;
        ExternalKey::of_metadata(&meta).ok_or(CriuError::Invalid(format!(
            "{} is neither a pipe nor a terminal",
            path.display()
        )))
    }

    fn of_metadata(meta: &std::fs::Metadata) -> Option<ExternalKey> {
        let kind = meta.file_type();
        if kind.is_fifo() {
            Some(ExternalKey::Pipe { inode: meta.ino() })
        } else if kind.is_char_device() {
            Some(ExternalKey::Tty {
                rdev: meta.rdev(),
                dev: meta.dev(),
            })
        } else {
            None
        }
    }

    /// Whether CRIU must be told at dump that the file is external.
    pub fn needs_declaring(&self) -> bool {
        matches!(self, ExternalKey::Tty { .. })
    }
}

impl fmt::Display for ExternalKey {
    /// CRIU's own spelling: `pipe_d_name` and `tty_d_name` in criu/pipes.c
    /// and criu/tty.c.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExternalKey::Pipe { inode } => write!(f, "pipe:[{inode}]"),
            ExternalKey::Tty { rdev, dev } => write!(f, "tty[{rdev:x}:{dev:x}]"),
        }
    }
}

/// What a dump is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpKind {
    /// A full dump: the images can be restored.
    Full,
    /// A pre-dump (pre-copy): memory only, the job keeps running, and the
    /// next dump with `parent_images` writes only the pages dirtied since.
    /// Needs soft-dirty tracking ([`CheckReport::mem_dirty_track`]).
    PreDump,
}

/// What becomes of the job once its images are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterDump {
    /// Killed (a migration: it goes on elsewhere).
    Kill,
    /// Left running (a checkpoint, `--leave-running`).
    Run,
    /// Left stopped (SIGSTOP), for the caller to decide.
    Stop,
}

/// Where the memory of a dump goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryTransfer {
    /// Into the images directory with the rest.
    Images,
    /// To a `criu page-server` listening at this address (the pages land
    /// in that server's images directory).
    PageServer { address: String, port: u16 },
    /// Post-copy: the dump keeps the job's memory and serves it on `port`
    /// (all addresses) to the target's `criu lazy-pages` daemon; the call
    /// returns once every page has been pulled. The job stays frozen
    /// meanwhile and is then killed.
    Lazy { port: u16 },
}

/// What CRIU does with the job's cgroups (`manage_cgroups_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupMode {
    /// Leave them alone: a restored job stays in the cgroups `criu` runs
    /// in ([`RestoreRequest::join_cgroups`]). krg's default: `krgd` makes
    /// each job's cgroups on each node itself.
    Ignore,
    /// Restore membership only, never properties.
    None,
    /// Restore properties of existing cgroups too.
    Props,
    /// Properties only of the cgroups CRIU creates (CRIU's own default).
    Soft,
    /// Properties of all cgroups.
    Full,
    /// Fail if a cgroup is missing.
    Strict,
}

/// Where a restored job's cgroups go (CRIU's `cg_root`): its root cgroup
/// of `controller` (all when `None`) becomes `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupRoot {
    pub controller: Option<String>,
    pub path: PathBuf,
}

/// Mutual TLS for the pages a dump serves and the lazy-pages daemon
/// fetches (CRIU's `--tls`, GnuTLS): both ends show a certificate of the
/// cluster's CA, so that a job's memory never crosses the network in clear
/// and no one without a node certificate is served. The names in a node
/// certificate are not its address: the chain is verified, the host name
/// is not (`tls_no_cn_verify`), as krg's own connections check the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTls {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl PageTls {
    /// The node's own identity files (`identity`'s `ca.crt`, `node.crt`,
    /// `node.key`) in its state directory.
    pub fn in_state_dir(dir: &Path) -> PageTls {
        PageTls {
            ca_cert: dir.join("ca.crt"),
            cert: dir.join("node.crt"),
            key: dir.join("node.key"),
        }
    }
}

/// A notification CRIU sent during a call (its "action scripts": `pre-dump`,
/// `post-dump`, `status-ready`, `setup-namespaces`, `post-restore`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub script: String,
    /// The pid CRIU names (the restored root for `post-restore`), or 0.
    pub pid: i32,
    pub at: Instant,
}

/// Request for [`Criu::dump`]. Build with [`DumpRequest::new`] and set
/// the fields that differ from the defaults.
#[derive(Clone, Debug)]
pub struct DumpRequest {
    /// The job, for messages.
    pub gpid: Option<Gpid>,
    /// Host pid of the job's init (pid 1 of its PID namespace).
    pub pid: i32,
    /// Created with mode 0700 if missing.
    pub images_dir: PathBuf,
    /// Where CRIU writes its log and stats; the images directory if `None`.
    pub work_dir: Option<PathBuf>,
    pub kind: DumpKind,
    pub after: AfterDump,
    pub memory: MemoryTransfer,
    /// TLS for the page server of [`MemoryTransfer::Lazy`] and
    /// [`MemoryTransfer::PageServer`]; plain TCP when `None`.
    pub page_tls: Option<PageTls>,
    /// A previous pre-dump, relative to `images_dir` (e.g. `../pre1`).
    pub parent_images: Option<PathBuf>,
    /// Keep soft-dirty tracking for a later dump (pre-copy).
    pub track_mem: bool,
    /// The job's streams whose other end is outside; terminals among them
    /// are declared external (pipes need not be).
    pub streams: Vec<ExternalKey>,
    /// Freeze through this cgroup v1 freezer directory instead of
    /// ptrace-stopping each task (safer with a tree that forks).
    pub freeze_cgroup: Option<PathBuf>,
    /// What CRIU records of the job's cgroups.
    pub manage_cgroups: CgroupMode,
    /// Mount points (as the job sees them) not to dump, on top of the
    /// `nsfs` mounts that are always skipped.
    pub skip_mounts: Vec<String>,
    /// More `--external` items, verbatim.
    pub externals: Vec<String>,
    /// Accept a pty slave whose master is outside without declaring it
    /// (for a restore with [`RestoreRequest::orphan_pts_master`]; see there
    /// why krg jobs declare their pty external instead).
    pub orphan_pts_master: bool,
    /// Established TCP connections (only useful where the address moves).
    pub tcp_established: bool,
    /// Unix sockets connected to the outside.
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    /// CRIU's older mount engine.
    pub mntns_compat_mode: bool,
    pub log_level: u32,
    pub timeout: Duration,
    /// Each notification as it comes (e.g. `status-ready` of a lazy dump,
    /// when the target may start its restore).
    pub notices: Option<Sender<Notice>>,
}

impl DumpRequest {
    /// A full dump into `images_dir` that kills the job.
    pub fn new(pid: i32, images_dir: impl Into<PathBuf>) -> DumpRequest {
        DumpRequest {
            gpid: None,
            pid,
            images_dir: images_dir.into(),
            work_dir: None,
            kind: DumpKind::Full,
            after: AfterDump::Kill,
            memory: MemoryTransfer::Images,
            page_tls: None,
            parent_images: None,
            track_mem: false,
            streams: Vec::new(),
            freeze_cgroup: None,
            manage_cgroups: CgroupMode::Ignore,
            skip_mounts: Vec::new(),
            externals: Vec::new(),
            orphan_pts_master: false,
            tcp_established: false,
            ext_unix_sk: false,
            file_locks: false,
            mntns_compat_mode: false,
            log_level: LOG_LEVEL_DEFAULT,
            timeout: CALL_TIMEOUT_DEFAULT,
            notices: None,
        }
    }

    pub(crate) fn target(&self) -> Target {
        Target::Pid {
            pid: self.pid,
            gpid: self.gpid,
        }
    }

    /// The directory of CRIU's log and stats.
    pub fn work_dir(&self) -> &Path {
        self.work_dir.as_deref().unwrap_or(&self.images_dir)
    }
}

/// What a dump did.
#[derive(Debug)]
pub struct DumpOutcome {
    /// From the request to CRIU's answer.
    pub duration: Duration,
    /// Every notification, in order.
    pub notices: Vec<Notice>,
    /// CRIU's own figures (`stats-dump`), when it wrote sane ones (not
    /// after a lazy dump, whose counters CRIU resets).
    pub stats: Option<DumpStats>,
    pub log: PathBuf,
}

impl DumpOutcome {
    /// When CRIU announced a notification first.
    pub fn notice(&self, script: &str) -> Option<Instant> {
        self.notices
            .iter()
            .find(|n| n.script == script)
            .map(|n| n.at)
    }
}

/// A new file for a recorded external one: `fd` is ours, open, and stays
/// so until the restore returns; the restored job gets a copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InheritFd {
    pub key: ExternalKey,
    pub fd: RawFd,
}

/// Request for [`Criu::restore`]. Build with [`RestoreRequest::new`].
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub gpid: Option<Gpid>,
    pub images_dir: PathBuf,
    /// Log, stats and (with lazy pages) the daemon's socket; the images
    /// directory if `None`. Must be the lazy-pages daemon's work dir.
    pub work_dir: Option<PathBuf>,
    /// New files for the recorded external ones.
    pub inherit: Vec<InheritFd>,
    /// Run CRIU (and so the job) in this network namespace (a file such as
    /// `/run/netns/NAME`); `None`: the calling thread's one.
    pub netns: Option<PathBuf>,
    /// Post-copy: memory comes from a `criu lazy-pages` daemon already
    /// started on `work_dir` ([`Criu::lazy_pages`]).
    pub lazy_pages: bool,
    /// Give a pty slave without a recorded master a new master at the same
    /// index, returned in [`RestoreOutcome::pts_master`]. Not for krg jobs:
    /// their slave was opened in the node's mount namespace, which CRIU
    /// cannot find at dump; declare it external and inherit a new slave.
    pub orphan_pts_master: bool,
    /// Cgroup directories (v1: one per controller; v2: one) that `criu`
    /// joins before it starts, so that with [`CgroupMode::Ignore`] the
    /// restored job lands in them, as `krg-init --cgroup` does for a new job.
    pub join_cgroups: Vec<PathBuf>,
    pub manage_cgroups: CgroupMode,
    /// Remaps of the job's cgroups, for the other modes.
    pub cgroup_roots: Vec<CgroupRoot>,
    /// The root of the job's restored mount namespace.
    pub root: PathBuf,
    /// The restored root becomes a child of the caller (CRIU's
    /// `rst_sibling`) rather than of `criu`, which then exits and leaves it
    /// to the caller's subreaper.
    pub sibling: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub mntns_compat_mode: bool,
    pub log_level: u32,
    pub timeout: Duration,
    pub notices: Option<Sender<Notice>>,
}

impl RestoreRequest {
    pub fn new(images_dir: impl Into<PathBuf>) -> RestoreRequest {
        RestoreRequest {
            gpid: None,
            images_dir: images_dir.into(),
            work_dir: None,
            inherit: Vec::new(),
            netns: None,
            lazy_pages: false,
            orphan_pts_master: false,
            join_cgroups: Vec::new(),
            manage_cgroups: CgroupMode::Ignore,
            cgroup_roots: Vec::new(),
            root: PathBuf::from("/"),
            sibling: true,
            tcp_established: false,
            ext_unix_sk: false,
            file_locks: false,
            mntns_compat_mode: false,
            log_level: LOG_LEVEL_DEFAULT,
            timeout: CALL_TIMEOUT_DEFAULT,
            notices: None,
        }
    }

    pub(crate) fn target(&self) -> Target {
        Target::Images {
            path: self.images_dir.clone(),
            gpid: self.gpid,
        }
    }

    pub fn work_dir(&self) -> &Path {
        self.work_dir.as_deref().unwrap_or(&self.images_dir)
    }
}

/// What a restore did.
#[derive(Debug)]
pub struct RestoreOutcome {
    /// Host pid of the restored root (the job's `krg-init`).
    pub pid: i32,
    pub duration: Duration,
    pub notices: Vec<Notice>,
    pub stats: Option<RestoreStats>,
    /// With `orphan_pts_master`: the new master of the job's pty.
    pub pts_master: Option<OwnedFd>,
    pub log: PathBuf,
}

/// The real [`Criu`]: `criu swrk` over a socket pair.
#[derive(Clone, Debug)]
pub struct CriuRpc {
    binary: PathBuf,
    /// A `criu swrk` ready for the next dump.
    spare: Arc<spare::SpareDump>,
}

impl CriuRpc {
    /// `$KRG_CRIU`, else `criu` on `PATH`, else [`CRIU_PATH_DEFAULT`].
    pub fn new() -> CriuRpc {
        CriuRpc::with_binary(find_binary())
    }

    pub fn with_binary(binary: impl Into<PathBuf>) -> CriuRpc {
        let binary = binary.into();
        CriuRpc {
            spare: Arc::new(spare::SpareDump::new(binary.clone())),
            binary,
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

impl Default for CriuRpc {
    fn default() -> Self {
        CriuRpc::new()
    }
}

impl Criu for CriuRpc {
    fn check(&self) -> Result<CheckReport, CriuError> {
        rpc::check(&self.binary)
    }

    fn dump(&self, req: &DumpRequest) -> Result<DumpOutcome, CriuError> {
        dump::run(&self.binary, req)
    }

    fn restore(&self, req: &RestoreRequest) -> Result<RestoreOutcome, CriuError> {
        restore::run(&self.binary, req)
    }

    fn lazy_pages(&self, req: &LazyPagesRequest) -> Result<LazyPages, CriuError> {
        lazy::start(&self.binary, req)
    }

    fn dump_when_asked(&self, request: Receiver<DumpRequest>) -> Result<DumpOutcome, CriuError> {
        // One that fails to start now fails again, with its error, below.
        let ahead = self.spare.take().or_else(|| dump::start(&self.binary).ok());
        let req = request.recv().map_err(|_| called_off(Action::Dump));
        let outcome = req.and_then(|req| dump::run_on(&self.binary, &req, ahead));
        self.spare.refill();
        outcome
    }

    fn restore_when(
        &self,
        req: &RestoreRequest,
        go: Receiver<bool>,
    ) -> Result<RestoreOutcome, CriuError> {
        restore::run_when(&self.binary, req, || go.recv() == Ok(true))
    }
}

fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("KRG_CRIU") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("criu"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from(CRIU_PATH_DEFAULT))
}

/// What a CRIU call was about, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pid { pid: i32, gpid: Option<Gpid> },
    Images { path: PathBuf, gpid: Option<Gpid> },
    Node,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pid { pid, gpid: None } => write!(f, "pid {pid}"),
            Target::Pid {
                pid,
                gpid: Some(gpid),
            } => write!(f, "job {gpid} (pid {pid})"),
            Target::Images { path, gpid: None } => write!(f, "images {}", path.display()),
            Target::Images {
                path,
                gpid: Some(gpid),
            } => write!(f, "job {gpid} (images {})", path.display()),
            Target::Node => f.write_str("this node"),
        }
    }
}

/// The CRIU call, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Version,
    Check,
    FeatureCheck,
    Dump,
    PreDump,
    Restore,
    LazyPages,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Version => "version query",
            Action::Check => "check",
            Action::FeatureCheck => "feature check",
            Action::Dump => "dump",
            Action::PreDump => "pre-dump",
            Action::Restore => "restore",
            Action::LazyPages => "lazy-pages daemon",
        })
    }
}

/// Errors of the CRIU driver: lower-case sentences that name the job or
/// path and, when CRIU failed, quote its own words.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// The request itself is wrong (a programmer's or caller's error).
    #[error("invalid criu request: {0}")]
    Invalid(String),

    #[error("cannot start criu ({path}): {source}; hint: install CRIU >= 4.0 or set KRG_CRIU", path = .path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{what} {path}: {source}", path = .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("criu {action} of {target}: rpc socket error: {source}")]
    Socket {
        action: Action,
        target: Target,
        source: std::io::Error,
    },

    /// CRIU answered that it failed.
    #[error("criu {action} of {target} failed: {reason}")]
    Failed {
        action: Action,
        target: Target,
        /// CRIU's error message and errno, then the last error lines of
        /// its log.
        reason: String,
    },

    /// CRIU went away without answering.
    #[error("criu {action} of {target} exited without an answer ({status}): {reason}")]
    Died {
        action: Action,
        target: Target,
        status: String,
        reason: String,
    },

    #[error("criu {action} of {target} took longer than {secs} s and was killed; {reason}", secs = .timeout.as_secs())]
    Timeout {
        action: Action,
        target: Target,
        timeout: Duration,
        reason: String,
    },

    /// CRIU sent something that is not its protocol.
    #[error("criu {action} of {target}: protocol error: {detail}")]
    Protocol {
        action: Action,
        target: Target,
        detail: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_spelled_as_criu_spells_them() {
        assert_eq!(
            ExternalKey::Pipe { inode: 151734 }.to_string(),
            "pipe:[151734]"
        );
        assert_eq!(
            ExternalKey::Tty {
                rdev: 0x8800,
                dev: 0x1a
            }
            .to_string(),
            "tty[8800:1a]"
        );
        assert!(!ExternalKey::Pipe { inode: 1 }.needs_declaring());
        assert!(ExternalKey::Tty { rdev: 1, dev: 1 }.needs_declaring());
    }

    #[test]
    fn a_pipe_end_gives_the_key_of_the_pipe() {
        let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
        let read_key = ExternalKey::of_fd(std::os::fd::AsFd::as_fd(&read_end)).expect("key");
        let write_key = ExternalKey::of_fd(std::os::fd::AsFd::as_fd(&write_end)).expect("key");
        assert_eq!(read_key, write_key, "both ends share the pipe's inode");
        assert!(matches!(read_key, ExternalKey::Pipe { .. }));
    }

    #[test]
    fn a_regular_file_is_not_an_external_stream() {
        let file = std::fs::File::open("/proc/self/status").expect("open");
        let err = ExternalKey::of_fd(std::os::fd::AsFd::as_fd(&file)).expect_err("refused");
        assert!(
            err.to_string().contains("neither a pipe nor a terminal"),
            "{err}"
        );
    }

    #[test]
    fn targets_name_the_job() {
        let pid = Target::Pid {
            pid: 42,
            gpid: None,
        };
        assert_eq!(pid.to_string(), "pid 42");
        let images = Target::Images {
            path: PathBuf::from("/x"),
            gpid: None,
        };
        assert_eq!(images.to_string(), "images /x");
    }

    #[test]
    fn pre_copy_is_refused_without_soft_dirty() {
        let report = CheckReport {
            version: CriuVersion {
                major: 4,
                minor: 1,
                sublevel: 1,
                gitid: None,
            },
            check: Ok(()),
            mem_dirty_track: false,
            lazy_pages: true,
            pidfd_store: true,
        };
        assert!(report
            .pre_copy_refusal()
            .expect("refused")
            .contains("soft-dirty"));
    }
}
