//! What this node can do, probed once, in the style of CRIU's `kerndat`.
//!
//! [`probe`] asks the kernel and the installed CRIU; [`get`] probes on first
//! use and keeps the answer for the life of the process. Each item says
//! whether it works and, when it does not, why, in one sentence that names
//! what krg gives up (for example pre-copy migration without soft-dirty
//! tracking).
//!
//! Probing runs `criu` a few times and waits for it: call it before starting
//! a reaper that calls `waitpid(-1)`, or such a reaper may take the exit
//! status of those `criu` runs.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The oldest CRIU krg works with (3.17 fails its vDSO check on current
/// kernels; the RPC krg speaks has what it needs since 4.0).
pub const CRIU_MIN_VERSION: (u32, u32) = (4, 0);

/// The `fs.pipe-max-size` CRIU's lazy page server needs (4 MiB) when it
/// lacks `CAP_SYS_RESOURCE`.
pub const PIPE_MAX_SIZE_WANTED: u64 = 4 * 1024 * 1024;

const PIPE_MAX_SIZE_PATH: &str = "/proc/sys/fs/pipe-max-size";

/// How long one `criu` command may take before the probe gives up on it.
const CRIU_TIMEOUT: Duration = Duration::from_secs(30);

/// Linux capability number of `CAP_SYS_RESOURCE`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Bit 55 of a /proc/PID/pagemap entry: the page is soft-dirty.
const PAGEMAP_SOFT_DIRTY: u64 = 1 << 55;

/// One probed capability of the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// Whether it works.
    pub ok: bool,
    /// What was found (a version, a path, a value); may be empty.
    pub detail: String,
    /// Why it does not work, as one sentence; `None` when `ok`.
    pub reason: Option<String>,
}

impl Feature {
    fn yes(detail: impl Into<String>) -> Self {
        Feature {
            ok: true,
            detail: detail.into(),
            reason: None,
        }
    }

    /// For an item an older krgd does not report.
    fn unknown() -> Self {
        Feature::no("not reported by this node's krgd (an older version)")
    }

    fn no(reason: impl Into<String>) -> Self {
        Feature {
            ok: false,
            detail: String::new(),
            reason: Some(reason.into()),
        }
    }
}

/// The cgroup hierarchy krg uses on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (possibly next to a v2 hierarchy
    /// without controllers, the "hybrid" layout).
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Everything krg wants to know about this node before it relies on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Features {
    /// The `criu` binary used, when one was found.
    pub criu_path: Option<PathBuf>,
    /// Its version (`criu --version`), e.g. `4.1.1`.
    pub criu_version: Option<String>,
    /// CRIU is installed and recent enough (>= [`CRIU_MIN_VERSION`]).
    pub criu: Feature,
    /// `criu check` passes.
    pub criu_check: Feature,
    /// CRIU's lazy pages (`uffd` and `uffd-noncoop`): post-copy migration.
    pub lazy_pages: Feature,
    /// Soft-dirty memory tracking: iterative pre-copy migration.
    pub soft_dirty: Feature,
    /// The userfaultfd system call works for this process.
    pub userfaultfd: Feature,
    /// /dev/fuse can be opened.
    pub fuse: Feature,
    /// The cgroup version in use, when any cgroup file system is mounted.
    pub cgroup_version: Option<CgroupVersion>,
    /// A cgroup hierarchy is mounted.
    pub cgroup: Feature,
    /// The cgroup freezer is available.
    pub freezer: Feature,
    /// Current `fs.pipe-max-size`, when readable.
    pub pipe_max_size_bytes: Option<u64>,
    /// CRIU can grow pipes to 4 MiB (lazy page server).
    pub pipe_max_size: Feature,
    /// This process has `CAP_SYS_RESOURCE` in its effective set.
    pub cap_sys_resource: Feature,
    /// Moving a process into a cgroup does not wait for RCU (`favordynmods`).
    #[serde(default = "Feature::unknown")]
    pub cgroup_moves: Feature,
}

impl Features {
    /// Every item with its display name, in display order.
    pub fn items(&self) -> [(&'static str, &Feature); 11] {
        [
            ("criu", &self.criu),
            ("criu-check", &self.criu_check),
            ("lazy-pages", &self.lazy_pages),
            ("soft-dirty", &self.soft_dirty),
            ("userfaultfd", &self.userfaultfd),
            ("fuse", &self.fuse),
            ("cgroup", &self.cgroup),
            ("freezer", &self.freezer),
            ("cgroup-moves", &self.cgroup_moves),
            ("pipe-max-size", &self.pipe_max_size),
            ("capabilities", &self.cap_sys_resource),
        ]
    }

    /// One line per item: name, `ok` or `no`, then what was found or why not.
    ///
    /// ```text
    /// criu            ok    4.1.1 (/usr/local/sbin/criu)
    /// soft-dirty      no    kernel lacks CONFIG_MEM_SOFT_DIRTY: pre-copy migration disabled
    /// ```
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for (name, f) in self.items() {
            let (status, text) = if f.ok {
                ("ok", f.detail.as_str())
            } else {
                ("no", f.reason.as_deref().unwrap_or("unknown reason"))
            };
            let line = format!("{name:<16}{status:<6}{text}");
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The node's features, probed on first call and then remembered.
pub fn get() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(probe)
}

/// Probes every feature now. Never panics; takes a few hundred milliseconds
/// (it runs `criu` four times). Reads only, except that it clears the
/// soft-dirty bits of this process's pages (see [`probe_soft_dirty`]).
pub fn probe() -> Features {
    let criu_path = find_criu();
    let criu_version = criu_path.as_deref().and_then(criu_version);
    let criu = criu_feature(criu_path.as_deref(), criu_version.as_deref());
    // The other CRIU checks are only meaningful with a usable CRIU.
    let usable = if criu.ok { criu_path.as_deref() } else { None };

    let criu_check = match usable {
        Some(bin) => criu_check(bin),
        None => Feature::no(format!(
            "not run: {}",
            lower_first(criu.reason.as_deref().unwrap_or("CRIU is not usable"))
        )),
    };
    let lazy_pages = match usable {
        Some(bin) => lazy_pages(bin),
        None => Feature::no("CRIU is not usable: post-copy (lazy) migration disabled"),
    };
    let soft_dirty = soft_dirty_feature(probe_soft_dirty(), usable.map(criu_mem_dirty_track));

    let (cgroup_version, cgroup, freezer) = cgroups();
    let cap_sys_resource = cap_sys_resource_feature();
    let pipe_max_size_bytes = read_pipe_max_size().ok();
    let pipe_max_size = pipe_max_size_feature(pipe_max_size_bytes, cap_sys_resource.ok);

    Features {
        criu_path,
        criu_version,
        criu,
        criu_check,
        lazy_pages,
        soft_dirty,
        userfaultfd: userfaultfd_feature(),
        fuse: fuse_feature(),
        cgroup_version,
        cgroup,
        freezer,
        pipe_max_size_bytes,
        pipe_max_size,
        cap_sys_resource,
        cgroup_moves: match crate::job::cgroup_moves::status() {
            Ok(detail) => Feature::yes(detail),
            Err(why) => Feature::no(why),
        },
    }
}

// --- CRIU ---------------------------------------------------------------------

/// `$KRG_CRIU`, else `criu` on `PATH`, else the usual sbin directories (a
/// daemon's `PATH` may lack them).
fn find_criu() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KRG_CRIU") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join("criu"))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Output of a finished command.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `bin args`, giving up (and killing it) after `timeout`.
fn run(bin: &Path, args: &[&str], timeout: Duration) -> io::Result<Run> {
    let child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => {
            let out = out?;
            Ok(Run {
                success: out.status.success(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
        Err(_) => {
            // The waiting thread still owns the child, so it is not reaped
            // yet and `pid` still names it.
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {} s", timeout.as_secs()),
            ))
        }
    }
}

/// `criu --version` prints `Version: 4.1.1` (then maybe `GitID: ...`).
fn criu_version(bin: &Path) -> Option<String> {
    let out = run(bin, &["--version"], CRIU_TIMEOUT).ok()?;
    parse_criu_version(&out.stdout)
}

fn parse_criu_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// `"4.1.1"` → `(4, 1)`.
fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    Some((major, minor))
}

fn criu_feature(path: Option<&Path>, version: Option<&str>) -> Feature {
    let (min_major, min_minor) = CRIU_MIN_VERSION;
    let Some(path) = path else {
        return Feature::no(format!(
            "criu is not installed (krg needs CRIU >= {min_major}.{min_minor}; run ./setup): migration and checkpoints disabled"
        ));
    };
    let Some(version) = version else {
        return Feature::no(format!(
            "{} --version does not answer: migration and checkpoints disabled",
            path.display()
        ));
    };
    match major_minor(version) {
        Some(v) if v >= CRIU_MIN_VERSION => Feature::yes(format!("{version} ({})", path.display())),
        _ => Feature::no(format!(
            "criu {version} at {} is older than {min_major}.{min_minor}, which krg needs: migration and checkpoints disabled",
            path.display()
        )),
    }
}

/// The line of CRIU's output that best says why it failed: the first
/// `Error` line, else the first line that is not a warning.
fn criu_error_line(run: &Run) -> String {
    let all = || {
        run.stdout
            .lines()
            .chain(run.stderr.lines())
            .map(|l| l.trim().trim_end_matches(':').trim_end())
    };
    all()
        .find(|l| l.starts_with("Error"))
        .or_else(|| all().find(|l| !l.is_empty() && !l.starts_with("Warn")))
        .unwrap_or("no output")
        .to_owned()
}

fn criu_check(bin: &Path) -> Feature {
    match run(bin, &["check"], CRIU_TIMEOUT) {
        Ok(r) if r.success && r.stdout.contains("Looks good") => Feature::yes("looks good"),
        Ok(r) => Feature::no(format!(
            "criu check fails ({}): migration and checkpoints will fail",
            criu_error_line(&r)
        )),
        Err(e) => Feature::no(format!("criu check could not run: {e}")),
    }
}

/// Whether `criu check --feature NAME` passes; when it does not, what CRIU
/// said.
fn criu_has_feature(bin: &Path, name: &str) -> io::Result<Result<(), String>> {
    let r = run(bin, &["check", "--feature", name], CRIU_TIMEOUT)?;
    Ok(if r.success {
        Ok(())
    } else {
        Err(criu_error_line(&r))
    })
}

fn lazy_pages(bin: &Path) -> Feature {
    let mut missing = Vec::new();
    let mut said = None;
    for name in ["uffd", "uffd-noncoop"] {
        match criu_has_feature(bin, name) {
            Ok(Ok(())) => {}
            Ok(Err(line)) => {
                missing.push(name);
                said.get_or_insert(line);
            }
            Err(e) => {
                return Feature::no(format!(
                    "criu check --feature {name} could not run ({e}): post-copy (lazy) migration disabled"
                ))
            }
        }
    }
    if missing.is_empty() {
        match run(bin, &["--help"], CRIU_TIMEOUT) {
            Ok(r) if lists_tls_option(&r.stdout) => Feature::yes("uffd, uffd-noncoop, tls"),
            Ok(_) => Feature::no(
                "CRIU was built without GnuTLS (its --help lists no --tls), and lazy moves send the job's pages over TLS: post-copy (lazy) migration disabled; rebuild CRIU with libgnutls28-dev (./setup)",
            ),
            Err(e) => Feature::no(format!(
                "criu --help could not run ({e}): post-copy (lazy) migration disabled"
            )),
        }
    } else {
        Feature::no(format!(
            "CRIU reports no {} support ({}): post-copy (lazy) migration disabled",
            missing.join(" or "),
            said.unwrap_or_default()
        ))
    }
}

/// Whether CRIU's usage text offers `--tls`, which it lists only when
/// built with GnuTLS (and otherwise refuses with "built without TLS").
fn lists_tls_option(help: &str) -> bool {
    help.lines()
        .any(|l| l.split_whitespace().next() == Some("--tls"))
}

fn criu_mem_dirty_track(bin: &Path) -> Option<bool> {
    criu_has_feature(bin, "mem_dirty_track")
        .ok()
        .map(|r| r.is_ok())
}

// --- soft-dirty ---------------------------------------------------------------

/// Asks the kernel directly whether it tracks soft-dirty pages: clears the
/// soft-dirty bits of this process (`4 > /proc/self/clear_refs`), writes to
/// a fresh page and reads that page's bit 55 in /proc/self/pagemap.
///
/// `Ok(false)` means the kernel has no `CONFIG_MEM_SOFT_DIRTY` (the bit then
/// never gets set). Clearing the bits of this process is harmless: krg does
/// not track its own memory.
pub fn probe_soft_dirty() -> io::Result<bool> {
    let page = AnonPage::new()?;
    page.touch(1);
    fs::write("/proc/self/clear_refs", b"4")?;
    page.touch(2);
    let entry = pagemap_entry(page.addr())?;
    Ok(entry & PAGEMAP_SOFT_DIRTY != 0)
}

/// One private anonymous page, unmapped on drop.
struct AnonPage {
    ptr: *mut u8,
    len: usize,
}

impl AnonPage {
    fn new() -> io::Result<Self> {
        let len = page_size();
        // SAFETY: an anonymous private mapping at an address of the kernel's
        // choosing has no preconditions; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(AnonPage {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Writes to the page (a volatile write, so that it really happens).
    fn touch(&self, value: u8) {
        // SAFETY: `ptr` points to `len` >= 1 writable bytes that this struct
        // owns exclusively until it is dropped.
        unsafe { std::ptr::write_volatile(self.ptr, value) };
    }

    fn addr(&self) -> usize {
        self.ptr as usize
    }
}

impl Drop for AnonPage {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`, and no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// The 64-bit /proc/self/pagemap entry of the page holding `addr`.
fn pagemap_entry(addr: usize) -> io::Result<u64> {
    let file = fs::File::open("/proc/self/pagemap")?;
    let offset = (addr / page_size()) as u64 * 8;
    let mut buf = [0u8; 8];
    file.read_exact_at(&mut buf, offset)?;
    Ok(u64::from_ne_bytes(buf))
}

fn soft_dirty_feature(kernel: io::Result<bool>, criu: Option<Option<bool>>) -> Feature {
    const GIVE_UP: &str = "pre-copy migration disabled";
    match (kernel, criu) {
        (Ok(false), _) => Feature::no(format!("kernel lacks CONFIG_MEM_SOFT_DIRTY: {GIVE_UP}")),
        (Ok(true), Some(Some(false))) => Feature::no(format!(
            "the kernel tracks soft-dirty pages but criu check --feature mem_dirty_track fails: {GIVE_UP}"
        )),
        (Ok(true), _) => Feature::yes("pagemap bit 55 set after clear_refs"),
        (Err(_), Some(Some(true))) => Feature::yes("criu check --feature mem_dirty_track"),
        (Err(e), _) => Feature::no(format!(
            "could not probe soft-dirty tracking through /proc/self/pagemap ({e}): {GIVE_UP}"
        )),
    }
}

// --- userfaultfd --------------------------------------------------------------

/// `struct uffdio_api` of <linux/userfaultfd.h>.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_NONCOOP: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP;

mod ioctl {
    use super::UffdioApi;
    // UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)
    nix::ioctl_readwrite!(uffdio_api, 0xAA, 0x3F, UffdioApi);
}

/// Opens a userfaultfd and does the API handshake; returns the features the
/// kernel offers.
fn userfaultfd_api() -> io::Result<u64> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: userfaultfd(2) takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("userfaultfd returned a bad fd"))?;
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is an open userfaultfd and `api` a valid, exclusively
    // borrowed `struct uffdio_api` for the duration of the call.
    unsafe { ioctl::uffdio_api(fd.as_raw_fd(), &mut api) }.map_err(io::Error::from)?;
    Ok(api.features)
}

fn userfaultfd_feature() -> Feature {
    const GIVE_UP: &str = "post-copy migration and cluster-wide shared memory disabled";
    match userfaultfd_api() {
        Ok(features) => {
            let mut has = Vec::new();
            if features & UFFD_FEATURE_PAGEFAULT_FLAG_WP != 0 {
                has.push("write-protect");
            }
            if features & UFFD_NONCOOP == UFFD_NONCOOP {
                has.push("non-cooperative events");
            }
            if features & UFFD_FEATURE_MISSING_SHMEM != 0 {
                has.push("shmem");
            }
            if has.is_empty() {
                Feature::yes("missing-page faults only")
            } else {
                Feature::yes(has.join(", "))
            }
        }
        Err(e) => Feature::no(match e.raw_os_error() {
            Some(libc::ENOSYS) => format!("kernel lacks CONFIG_USERFAULTFD: {GIVE_UP}"),
            Some(libc::EPERM) => format!(
                "userfaultfd is refused to this process (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE; run krgd as root): {GIVE_UP}"
            ),
            _ => format!("userfaultfd fails ({e}): {GIVE_UP}"),
        }),
    }
}

// --- FUSE ---------------------------------------------------------------------

fn fuse_feature() -> Feature {
    const GIVE_UP: &str = "the cluster-wide /proc view is disabled";
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => Feature::yes("/dev/fuse"),
        Err(e) => Feature::no(match e.kind() {
            io::ErrorKind::NotFound => {
                format!("/dev/fuse does not exist (fuse module not loaded?): {GIVE_UP}")
            }
            io::ErrorKind::PermissionDenied => {
                format!("/dev/fuse cannot be opened: permission denied: {GIVE_UP}")
            }
            _ => format!("/dev/fuse cannot be opened ({e}): {GIVE_UP}"),
        }),
    }
}

// --- cgroups ------------------------------------------------------------------

/// One cgroup mount of /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    mount_point: PathBuf,
    v2: bool,
    /// Super options (controllers for v1).
    options: Vec<String>,
}

/// The cgroup and cgroup2 mounts among `mounts`.
fn cgroup_mounts(mounts: &[crate::mountinfo::Mount]) -> Vec<CgroupMount> {
    mounts
        .iter()
        .filter_map(|m| {
            let v2 = match m.fstype.as_str() {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(&m.mount_point),
                v2,
                options: m.super_options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// The version in use: v2 when /sys/fs/cgroup itself is the unified
/// hierarchy (or when there is nothing but v2), v1 when any v1 hierarchy is
/// mounted.
fn cgroup_version_of(mounts: &[CgroupMount]) -> Option<CgroupVersion> {
    let root = Path::new("/sys/fs/cgroup");
    if mounts.iter().any(|m| m.v2 && m.mount_point == root) {
        Some(CgroupVersion::V2)
    } else if mounts.iter().any(|m| !m.v2) {
        Some(CgroupVersion::V1)
    } else if mounts.iter().any(|m| m.v2) {
        Some(CgroupVersion::V2)
    } else {
        None
    }
}

fn cgroups() -> (Option<CgroupVersion>, Feature, Feature) {
    let mountinfo = match crate::mountinfo::own() {
        Ok(mounts) => mounts,
        Err(e) => {
            let why = format!("/proc/self/mountinfo cannot be read ({e})");
            return (
                None,
                Feature::no(format!("{why}: jobs get no cgroup")),
                Feature::no(format!("{why}: jobs cannot be frozen")),
            );
        }
    };
    let mounts = cgroup_mounts(&mountinfo);
    let version = cgroup_version_of(&mounts);
    let cgroup = match version {
        None => Feature::no("no cgroup file system is mounted: jobs get no cgroup"),
        Some(CgroupVersion::V2) => {
            let at = mounts
                .iter()
                .find(|m| m.v2)
                .map(|m| m.mount_point.display().to_string());
            Feature::yes(format!("v2 ({})", at.unwrap_or_default()))
        }
        Some(CgroupVersion::V1) => {
            let mut detail = String::from("v1");
            if let Some(m) = mounts.iter().find(|m| m.v2) {
                detail.push_str(&format!(
                    " (with a v2 hierarchy at {})",
                    m.mount_point.display()
                ));
            }
            Feature::yes(detail)
        }
    };
    let freezer = match version {
        None => Feature::no("no cgroup file system is mounted: jobs cannot be frozen"),
        Some(CgroupVersion::V1) => v1_freezer(&mounts),
        Some(CgroupVersion::V2) => v2_freezer(&mounts),
    };
    (version, cgroup, freezer)
}

fn v1_freezer(mounts: &[CgroupMount]) -> Feature {
    match mounts
        .iter()
        .find(|m| !m.v2 && m.options.iter().any(|o| o == "freezer"))
    {
        Some(m) => Feature::yes(format!("v1 freezer at {}", m.mount_point.display())),
        None => Feature::no(
            "the cgroup v1 freezer controller is not mounted: jobs cannot be frozen while they are checkpointed",
        ),
    }
}

/// cgroup v2 freezes through `cgroup.freeze` (Linux >= 5.2), a file every
/// non-root cgroup has.
fn v2_freezer(mounts: &[CgroupMount]) -> Feature {
    let Some(root) = mounts
        .iter()
        .find(|m| m.v2 && m.mount_point == Path::new("/sys/fs/cgroup"))
        .or_else(|| mounts.iter().find(|m| m.v2))
        .map(|m| m.mount_point.clone())
    else {
        return Feature::no("no cgroup v2 hierarchy is mounted: jobs cannot be frozen");
    };
    let has_freeze = |dir: &Path| dir.join("cgroup.freeze").exists();
    let children = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir());
    let found = own_v2_cgroup()
        .map(|rel| root.join(rel.trim_start_matches('/')))
        .into_iter()
        .chain(children)
        .any(|dir| dir != root && has_freeze(&dir));
    if found {
        Feature::yes(format!("cgroup.freeze under {}", root.display()))
    } else if kernel_at_least(5, 2) {
        Feature::yes(format!(
            "cgroup.freeze (kernel >= 5.2; no child cgroup of {} to show it yet)",
            root.display()
        ))
    } else {
        Feature::no(
            "this kernel's cgroup v2 has no cgroup.freeze (needs Linux 5.2): jobs cannot be frozen",
        )
    }
}

/// This process's cgroup v2 path (`0::/path` in /proc/self/cgroup).
fn own_v2_cgroup() -> Option<String> {
    fs::read_to_string("/proc/self/cgroup")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|r| major_minor(r.trim()))
        .is_some_and(|v| v >= (major, minor))
}

// --- pipes and capabilities ---------------------------------------------------

fn read_pipe_max_size() -> io::Result<u64> {
    let s = fs::read_to_string(PIPE_MAX_SIZE_PATH)?;
    s.trim().parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{PIPE_MAX_SIZE_PATH}: {e}"),
        )
    })
}

fn pipe_max_size_feature(value: Option<u64>, cap_sys_resource: bool) -> Feature {
    match value {
        Some(v) if v >= PIPE_MAX_SIZE_WANTED => Feature::yes(v.to_string()),
        Some(v) if cap_sys_resource => Feature::yes(format!(
            "{v} (below 4 MiB, but CAP_SYS_RESOURCE lets CRIU grow pipes past it)"
        )),
        Some(v) => Feature::no(format!(
            "fs.pipe-max-size is {v}, below 4 MiB, and CAP_SYS_RESOURCE is missing: CRIU's lazy page server fails until `sysctl fs.pipe-max-size={PIPE_MAX_SIZE_WANTED}`"
        )),
        None => Feature::no(format!(
            "{PIPE_MAX_SIZE_PATH} cannot be read: post-copy (lazy) migration may fail"
        )),
    }
}

/// What [`ensure_pipe_max_size`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeMaxSize {
    /// It was already at least 4 MiB; nothing was written.
    AlreadyEnough { current: u64 },
    /// It was raised.
    Raised { from: u64, to: u64 },
}

impl std::fmt::Display for PipeMaxSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PipeMaxSize::AlreadyEnough { current } => {
                write!(f, "fs.pipe-max-size is {current}: left alone")
            }
            PipeMaxSize::Raised { from, to } => {
                write!(f, "fs.pipe-max-size raised from {from} to {to}")
            }
        }
    }
}

/// Raises `fs.pipe-max-size` to 4 MiB if it is lower (needs root), so that
/// CRIU's lazy page server works without `CAP_SYS_RESOURCE`.
pub fn ensure_pipe_max_size() -> io::Result<PipeMaxSize> {
    let current = read_pipe_max_size()?;
    if current >= PIPE_MAX_SIZE_WANTED {
        return Ok(PipeMaxSize::AlreadyEnough { current });
    }
    fs::write(PIPE_MAX_SIZE_PATH, PIPE_MAX_SIZE_WANTED.to_string()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot raise fs.pipe-max-size from {current} to {PIPE_MAX_SIZE_WANTED}: {e}"),
        )
    })?;
    Ok(PipeMaxSize::Raised {
        from: current,
        to: read_pipe_max_size()?,
    })
}

/// The effective capability set of this process (`CapEff` in
/// /proc/self/status).
fn effective_caps() -> io::Result<u64> {
    let mut s = String::new();
    fs::File::open("/proc/self/status")?.read_to_string(&mut s)?;
    parse_cap_eff(&s).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn cap_sys_resource_feature() -> Feature {
    match effective_caps() {
        Ok(caps) if caps & (1 << CAP_SYS_RESOURCE) != 0 => Feature::yes("CAP_SYS_RESOURCE"),
        Ok(_) => Feature::no(
            "this process lacks CAP_SYS_RESOURCE: CRIU cannot read the resource limits of jobs of other users (only root's jobs can be checkpointed or moved) nor grow pipes past fs.pipe-max-size",
        ),
        Err(e) => Feature::no(format!("cannot read this process's capabilities ({e})")),
    }
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_does_not_panic_and_finds_cgroups() {
        let f = probe();
        // Every Linux machine that runs tests has /proc and some cgroup.
        assert!(f.cgroup_version.is_some(), "{f:#?}");
        assert!(f.cgroup.ok);
        assert!(f.pipe_max_size_bytes.is_some());
        for (name, item) in f.items() {
            assert_eq!(item.ok, item.reason.is_none(), "{name}: {item:?}");
            if let Some(r) = &item.reason {
                assert!(!r.is_empty() && !r.contains('\n'), "{name}: {r:?}");
            }
        }
    }

    #[test]
    fn tls_support_is_read_from_criu_usage() {
        let with = "  --status-fd FD        write \\0 to the FD\n  --tls-cacert FILE     trust certificates\n  --tls                 use TLS to secure remote connection\n";
        let without = "  --status-fd FD        write \\0 to the FD\n  --port PORT           port of page server\n";
        assert!(lists_tls_option(with));
        assert!(!lists_tls_option(without));
        // Only the option itself counts, not its relatives or prose.
        assert!(!lists_tls_option(
            "  --tls-cacert FILE  trust\n  use --tls to secure\n"
        ));
    }

    #[test]
    fn get_probes_once() {
        assert!(std::ptr::eq(get(), get()));
    }

    #[test]
    fn render_text_has_one_aligned_line_per_item() {
        let f = probe();
        let text = f.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), f.items().len());
        for (line, (name, item)) in lines.iter().zip(f.items()) {
            assert!(line.starts_with(name), "{line}");
            let status = if item.ok { "ok" } else { "no" };
            assert_eq!(&line[16..18], status, "{line}");
        }
    }

    #[test]
    fn render_text_format() {
        let mut f = probe();
        f.criu = Feature::yes("4.1.1 (/usr/local/sbin/criu)");
        f.soft_dirty =
            Feature::no("kernel lacks CONFIG_MEM_SOFT_DIRTY: pre-copy migration disabled");
        let text = f.render_text();
        assert!(text.contains("criu            ok    4.1.1 (/usr/local/sbin/criu)\n"));
        assert!(text.contains(
            "soft-dirty      no    kernel lacks CONFIG_MEM_SOFT_DIRTY: pre-copy migration disabled\n"
        ));
    }

    #[test]
    fn features_round_trip_through_json() {
        let f = probe();
        let json = serde_json::to_string(&f).unwrap();
        let back: Features = serde_json::from_str(&json).unwrap();
        assert_eq!(f, back);
    }

    #[test]
    fn soft_dirty_probe_answers() {
        // Any Linux with /proc answers yes or no; which one depends on the
        // kernel configuration.
        probe_soft_dirty().unwrap();
    }

    #[test]
    fn parses_criu_versions() {
        assert_eq!(
            parse_criu_version("Version: 4.1.1\n").as_deref(),
            Some("4.1.1")
        );
        assert_eq!(
            parse_criu_version("Version: 3.17\nGitID: v3.17\n").as_deref(),
            Some("3.17")
        );
        assert_eq!(parse_criu_version("garbage"), None);
        assert_eq!(major_minor("4.1.1"), Some((4, 1)));
        assert_eq!(major_minor("3.17"), Some((3, 17)));
        assert_eq!(major_minor("4"), Some((4, 0)));
        assert_eq!(major_minor("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(major_minor("x"), None);
    }

    #[test]
    fn picks_criu_error_lines() {
        let r = Run {
            success: false,
            stdout: "CRIU needs to have the CAP_SYS_ADMIN capability: \nsetcap x\n".into(),
            stderr: "Warn  (criu/kerndat.c:1637): no nftables\n".into(),
        };
        assert_eq!(
            criu_error_line(&r),
            "CRIU needs to have the CAP_SYS_ADMIN capability"
        );
        let r = Run {
            success: false,
            stdout: String::new(),
            stderr: "Warn  (a.c:1): w\nError (cr-check.c:2): bad\n".into(),
        };
        assert_eq!(criu_error_line(&r), "Error (cr-check.c:2): bad");
    }

    #[test]
    fn criu_version_gate() {
        let p = Path::new("/usr/sbin/criu");
        assert!(criu_feature(Some(p), Some("4.1.1")).ok);
        assert!(criu_feature(Some(p), Some("4.0")).ok);
        let old = criu_feature(Some(p), Some("3.17"));
        assert!(!old.ok);
        assert!(old.reason.unwrap().contains("older than 4.0"));
        assert!(!criu_feature(None, None).ok);
        assert!(!criu_feature(Some(p), None).ok);
    }

    #[test]
    fn soft_dirty_reasons() {
        let no = soft_dirty_feature(Ok(false), Some(Some(false)));
        assert_eq!(
            no.reason.as_deref(),
            Some("kernel lacks CONFIG_MEM_SOFT_DIRTY: pre-copy migration disabled")
        );
        assert!(soft_dirty_feature(Ok(true), None).ok);
        assert!(soft_dirty_feature(Ok(true), Some(Some(true))).ok);
        assert!(!soft_dirty_feature(Ok(true), Some(Some(false))).ok);
        assert!(soft_dirty_feature(Err(io::Error::other("x")), Some(Some(true))).ok);
        assert!(!soft_dirty_feature(Err(io::Error::other("x")), None).ok);
    }

    #[test]
    fn parses_cgroup_mounts() {
        let v1 = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let parsed = |text| cgroup_mounts(&crate::mountinfo::parse(text));
        let m = parsed(v1);
        assert_eq!(m.len(), 3);
        assert_eq!(cgroup_version_of(&m), Some(CgroupVersion::V1));
        let fr = v1_freezer(&m);
        assert!(fr.ok);
        assert_eq!(fr.detail, "v1 freezer at /sys/fs/cgroup/freezer");

        let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = parsed(v2);
        assert_eq!(cgroup_version_of(&m), Some(CgroupVersion::V2));

        let none = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert_eq!(cgroup_version_of(&parsed(none)), None);

        let no_freezer = "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(!v1_freezer(&parsed(no_freezer)).ok);
    }

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n";
        let caps = parse_cap_eff(status).unwrap();
        assert_eq!(caps & (1 << CAP_SYS_RESOURCE), 0);
        assert_eq!(parse_cap_eff("CapEff:\t0000000001000000\n"), Some(1 << 24));
        assert_eq!(parse_cap_eff("nothing"), None);
    }

    #[test]
    fn pipe_max_size_reasons() {
        assert!(pipe_max_size_feature(Some(PIPE_MAX_SIZE_WANTED), false).ok);
        assert!(pipe_max_size_feature(Some(1 << 20), true).ok);
        let no = pipe_max_size_feature(Some(1 << 20), false);
        assert!(no
            .reason
            .unwrap()
            .contains("sysctl fs.pipe-max-size=4194304"));
    }

    #[test]
    fn ensure_pipe_max_size_leaves_a_large_value_alone() {
        // Only the path that changes nothing: a unit test must not change the
        // machine's sysctls.
        let current = read_pipe_max_size().unwrap();
        if current >= PIPE_MAX_SIZE_WANTED {
            assert_eq!(
                ensure_pipe_max_size().unwrap(),
                PipeMaxSize::AlreadyEnough { current }
            );
        }
    }
}
