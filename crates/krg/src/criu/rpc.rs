//! The `criu swrk` driver: one CRIU process per call, spoken to over a
//! `SOCK_SEQPACKET` socket pair with the messages of CRIU's `rpc.proto`.
//!
//! ```text
//!   krg                                   criu swrk <fd>
//!    |-- criu_req {type, opts} ------------->|
//!    |<------------ criu_resp {NOTIFY, script}|  (notify_scripts: each
//!    |-- criu_req {NOTIFY, notify_success} ->|   action script becomes a
//!    |          ... as many as CRIU sends ...|   notice we acknowledge)
//!    |<------------- criu_resp {type, success}|
//!    |                                  exits
//! ```
//!
//! Every wait is bounded ([`Call::timeout`]); a CRIU that overstays is
//! killed. Messages are bounded ([`RPC_MESSAGE_BYTES_MAX`]) and so are the
//! file descriptors that may come with one ([`RPC_FDS_PER_MESSAGE_MAX`]).
//! The file descriptors CRIU must inherit (its end of the socket pair, the
//! new pipes of a restore) are made inheritable only in the child, between
//! `fork` and `exec`, so that no other process the caller starts meanwhile
//! gets them.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use protobuf::{Message, MessageField};
use rust_criu::rust_criu_protobuf::rpc::{
    Criu_cg_mode, Criu_features, Criu_opts, Criu_req, Criu_req_type, Criu_resp,
};

use super::{
    log, page_server_socket, Action, CgroupMode, CheckReport, CriuError, CriuVersion, Notice,
    Target, EXIT_TIMEOUT, QUICK_TIMEOUT, RPC_FDS_PER_MESSAGE_MAX, RPC_MESSAGE_BYTES_MAX,
    RPC_NOTICES_MAX,
};

/// The last bytes of CRIU's stderr kept for an error (CRIU writes there
/// only before its log is open).
const STDERR_BYTES_MAX: usize = 4096;

/// How often the driver looks whether CRIU has exited.
const EXIT_POLL: Duration = Duration::from_millis(5);

/// The notify script that comes with a file descriptor.
pub const ORPHAN_PTS_MASTER: &str = "orphan-pts-master";

/// The notify script of a page server (or lazy-pages daemon) that is ready
/// for its client.
pub const STATUS_READY: &str = "status-ready";

/// One CRIU call: what it is about, and what its process needs.
pub struct Call<'a> {
    pub action: Action,
    pub target: Target,
    /// CRIU's log, quoted when the call fails.
    pub log: Option<PathBuf>,
    /// Our fds that CRIU must inherit at the same numbers (`inherit_fd`).
    pub inherit: Vec<RawFd>,
    /// A network namespace file CRIU enters before it starts.
    pub netns: Option<&'a File>,
    /// `cgroup.procs` files CRIU writes itself into before it starts.
    pub join_cgroups: Vec<CString>,
    pub timeout: Duration,
    pub notices: Option<&'a Sender<Notice>>,
    /// The TCP port of the lazy dump's page server, whose socket is made
    /// to send at once when it is ready ([`page_server_socket`]).
    pub page_server_port: Option<u16>,
}

impl Call<'_> {
    /// A call about the node itself (version, features).
    pub fn quick(action: Action) -> Call<'static> {
        Call {
            action,
            target: Target::Node,
            log: None,
            inherit: Vec::new(),
            netns: None,
            join_cgroups: Vec::new(),
            timeout: QUICK_TIMEOUT,
            notices: None,
            page_server_port: None,
        }
    }
}

/// CRIU's answer and what came before it.
#[derive(Debug)]
pub struct Reply {
    pub resp: Criu_resp,
    pub notices: Vec<Notice>,
    /// Received with an `orphan-pts-master` notice.
    pub pts_master: Option<OwnedFd>,
    /// From sending the request to the answer.
    pub duration: Duration,
    /// When the request was sent.
    pub sent: Instant,
}

/// Sends `req` to a new `criu swrk` and returns its answer, whether it
/// succeeded or not (see [`failure`]).
pub fn call(binary: &Path, req: &Criu_req, call: &Call<'_>) -> Result<Reply, CriuError> {
    call_on(start(binary, call)?, req, call)
}

/// A `criu swrk` started ahead of its request: CRIU's own start-up (the
/// exec and dynamic linking of a 6 MB binary and its 19 libraries, about
/// 4.5 ms here) is then done before the job is frozen, or while something
/// else the request waits for gets ready. It dies with the thread that
/// started it (a parent-death signal), which must outlive its use: the
/// thread that uses it, or one that lives as long (`spare.rs`).
pub struct Started(Swrk);

/// Starts `criu swrk` for `call` (its inherited fds, network namespace and
/// cgroups are those of the process from its first instruction).
pub fn start(binary: &Path, call: &Call<'_>) -> Result<Started, CriuError> {
    for &fd in &call.inherit {
        if fd <= 2 {
            return Err(CriuError::Invalid(format!(
                "fd {fd} cannot be inherited by criu: 0-2 are its stdio"
            )));
        }
    }
    Swrk::spawn(binary, call).map(Started)
}

/// Sends `req` to a `criu swrk` started ahead and returns its answer.
pub fn call_on(started: Started, req: &Criu_req, call: &Call<'_>) -> Result<Reply, CriuError> {
    let bytes = req
        .write_to_bytes()
        .map_err(|err| CriuError::Invalid(format!("cannot encode the {}: {err}", call.action)))?;
    let Started(mut swrk) = started;
    let sent = Instant::now();
    let deadline = sent + call.timeout;
    swrk.send(&bytes, call)?;
    let mut notices = Vec::new();
    let mut pts_master = None;
    let expected = req.type_();
    loop {
        let (resp, fds) = swrk.receive(deadline, call)?;
        if resp.type_() != Criu_req_type::NOTIFY {
            if resp.type_() != expected && resp.type_() != Criu_req_type::EMPTY {
                return Err(protocol(
                    call,
                    format!(
                        "answer of type {:?} to a {:?} request",
                        resp.type_(),
                        expected
                    ),
                ));
            }
            let duration = sent.elapsed();
            swrk.finish();
            return Ok(Reply {
                resp,
                notices,
                pts_master,
                duration,
                sent,
            });
        }
        if notices.len() >= RPC_NOTICES_MAX {
            return Err(protocol(
                call,
                format!("more than {RPC_NOTICES_MAX} notifications"),
            ));
        }
        let notice = Notice {
            script: resp.notify.script().to_owned(),
            pid: resp.notify.pid(),
            at: Instant::now(),
        };
        if notice.script == ORPHAN_PTS_MASTER {
            pts_master = fds.into_iter().next();
        }
        if let (STATUS_READY, Some(port)) = (notice.script.as_str(), call.page_server_port) {
            // CRIU waits for our answer: no client has connected yet.
            swrk.page_server_sends_at_once(port, call);
        }
        tracing::debug!(action = %call.action, target = %call.target, script = %notice.script, "criu notice");
        if let Some(tx) = call.notices {
            // The caller may have stopped listening; the call goes on.
            let _ = tx.send(notice.clone());
        }
        notices.push(notice);
        let mut ack = Criu_req::new();
        ack.set_type(Criu_req_type::NOTIFY);
        ack.set_notify_success(true);
        let ack = ack
            .write_to_bytes()
            .map_err(|err| protocol(call, format!("cannot encode a notify answer: {err}")))?;
        swrk.send(&ack, call)?;
    }
}

/// The error for an answer with `success == false`: CRIU's message and
/// errno, then its log's last error lines.
pub fn failure(call: &Call<'_>, resp: &Criu_resp) -> CriuError {
    CriuError::Failed {
        action: call.action,
        target: call.target.clone(),
        reason: reason(call, Some(resp), ""),
    }
}

fn reason(call: &Call<'_>, resp: Option<&Criu_resp>, stderr: &str) -> String {
    let mut parts = Vec::new();
    if let Some(resp) = resp {
        // CRIU keeps its first error, often the harmless RLIMIT_NOFILE one;
        // the log's tail then says more.
        let msg = Some(resp.cr_errmsg().trim())
            .filter(|m| !log::is_harmless(m))
            .unwrap_or_default();
        let errno = resp.cr_errno();
        match (msg.is_empty(), errno) {
            (true, 0) => {}
            (false, 0) => parts.push(msg.to_owned()),
            (true, n) => parts.push(format!("errno {n} ({})", errno_text(n))),
            (false, n) => parts.push(format!("{msg} (errno {n}: {})", errno_text(n))),
        }
    }
    let stderr = stderr.trim();
    if !stderr.is_empty() {
        let last = stderr.lines().last().unwrap_or_default();
        parts.push(format!("its stderr ends with {last:?}"));
    }
    if let Some(log) = &call.log {
        parts.push(log::describe(log));
    }
    if parts.is_empty() {
        "criu gave no reason".to_owned()
    } else {
        parts.join("; ")
    }
}

fn errno_text(n: i32) -> String {
    nix::errno::Errno::from_raw(n).desc().to_lowercase()
}

fn protocol(call: &Call<'_>, detail: String) -> CriuError {
    CriuError::Protocol {
        action: call.action,
        target: call.target.clone(),
        detail,
    }
}

fn socket_error(call: &Call<'_>, source: std::io::Error) -> CriuError {
    CriuError::Socket {
        action: call.action,
        target: call.target.clone(),
        source,
    }
}

/// A running `criu swrk`; killed and reaped on drop unless finished.
struct Swrk {
    child: Option<Child>,
    socket: OwnedFd,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Swrk {
    fn page_server_sends_at_once(&self, port: u16, call: &Call<'_>) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return;
        };
        // A handshake that waits on delayed ACKs is slower, not wrong:
        // the move goes on either way.
        match page_server_socket::send_at_once(pid, port) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(target = %call.target, port, "criu's page server listens on no socket of its own");
            }
            Err(err) => {
                tracing::warn!(target = %call.target, port, %err, "cannot turn Nagle's algorithm off on criu's page server");
            }
        }
    }

    fn spawn(binary: &Path, call: &Call<'_>) -> Result<Swrk, CriuError> {
        let (ours, theirs) = socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|errno| socket_error(call, errno.into()))?;
        let theirs = above_stdio(theirs).map_err(|err| socket_error(call, err))?;
        let theirs_raw = theirs.as_raw_fd();
        let inherit = call.inherit.clone();
        let netns = call.netns.map(AsRawFd::as_raw_fd);
        let cgroups = call.join_cgroups.clone();
        let mut command = Command::new(binary);
        command
            .arg("swrk")
            .arg(theirs_raw.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only prctl, setns, open, write, close and fcntl, which are
        // async-signal-safe, on fds that the parent keeps open until spawn
        // returns and on NUL-terminated paths built before the fork; it
        // allocates nothing (`inherit` and `cgroups` were moved in).
        // JUSTIFICATION: CRIU must inherit exactly these fds at exactly
        // these numbers, and the caller's other threads must not.
        unsafe {
            command.pre_exec(move || {
                // CRIU must not outlive the thread that waits for it (a
                // lazy dump would otherwise serve pages forever).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(ns) = netns {
                    if libc::setns(ns, libc::CLONE_NEWNET) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for procs in &cgroups {
                    join_cgroup(procs)?;
                }
                for fd in std::iter::once(theirs_raw).chain(inherit.iter().copied()) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| CriuError::Spawn {
            path: binary.to_owned(),
            source,
        })?;
        drop(theirs);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stderr_reader = child.stderr.take().map(|pipe| {
            let sink = Arc::clone(&stderr);
            thread::spawn(move || keep_tail(pipe, &sink))
        });
        Ok(Swrk {
            child: Some(child),
            socket: ours,
            stderr,
            stderr_reader,
        })
    }

    fn send(&mut self, bytes: &[u8], call: &Call<'_>) -> Result<(), CriuError> {
        if bytes.len() > RPC_MESSAGE_BYTES_MAX {
            return Err(CriuError::Invalid(format!(
                "the {} request is {} bytes, more than the {RPC_MESSAGE_BYTES_MAX} allowed",
                call.action,
                bytes.len()
            )));
        }
        match socket::send(self.socket.as_raw_fd(), bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(protocol(
                call,
                format!("sent {n} of {} bytes of a message", bytes.len()),
            )),
            Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                Err(self.died(call, None))
            }
            Err(errno) => Err(socket_error(call, errno.into())),
        }
    }

    /// The next message, waiting until `deadline`.
    fn receive(
        &mut self,
        deadline: Instant,
        call: &Call<'_>,
    ) -> Result<(Criu_resp, Vec<OwnedFd>), CriuError> {
        self.wait_readable(deadline, call)?;
        let fd = self.socket.as_raw_fd();
        // SAFETY: a zero-length peek writes nothing; MSG_TRUNC makes a
        // SOCK_SEQPACKET socket return the whole message's length.
        let len = unsafe {
            libc::recv(
                fd,
                std::ptr::null_mut(),
                0,
                libc::MSG_PEEK | libc::MSG_TRUNC,
            )
        };
        if len < 0 {
            return Err(socket_error(call, std::io::Error::last_os_error()));
        }
        if len == 0 {
            return Err(self.died(call, None));
        }
        let len = usize::try_from(len).expect("a positive length");
        if len > RPC_MESSAGE_BYTES_MAX {
            return Err(protocol(
                call,
                format!("a message of {len} bytes, more than the {RPC_MESSAGE_BYTES_MAX} allowed"),
            ));
        }
        let mut buf = vec![0u8; len];
        let mut space = nix::cmsg_space!([RawFd; RPC_FDS_PER_MESSAGE_MAX]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|errno| socket_error(call, errno.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg
            .cmsgs()
            .map_err(|errno| socket_error(call, errno.into()))?
        {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: SCM_RIGHTS gave us these fds; nobody else owns
                    // them. Owning them closes any we do not keep.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        let (bytes, flags) = (msg.bytes, msg.flags);
        if flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(protocol(
                call,
                format!("a message with more than {RPC_FDS_PER_MESSAGE_MAX} file descriptors"),
            ));
        }
        if bytes != len {
            return Err(protocol(
                call,
                format!("a message of {bytes} bytes announced as {len}"),
            ));
        }
        let resp = Criu_resp::parse_from_bytes(&buf)
            .map_err(|err| protocol(call, format!("an undecodable message: {err}")))?;
        Ok((resp, fds))
    }

    fn wait_readable(&mut self, deadline: Instant, call: &Call<'_>) -> Result<(), CriuError> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.kill();
                return Err(CriuError::Timeout {
                    action: call.action,
                    target: call.target.clone(),
                    timeout: call.timeout,
                    reason: reason(call, None, &self.stderr_text()),
                });
            }
            // Wake at least once a second to notice a deadline.
            let wait_ms = u16::try_from(left.as_millis().min(1000)).expect("at most 1000");
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(wait_ms)) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                Ok(_) => return Ok(()),
                Err(errno) => return Err(socket_error(call, errno.into())),
            }
        }
    }

    /// The error for a CRIU that went away; reaps it first.
    fn died(&mut self, call: &Call<'_>, resp: Option<&Criu_resp>) -> CriuError {
        let status = self.reap(EXIT_TIMEOUT);
        CriuError::Died {
            action: call.action,
            target: call.target.clone(),
            status: status.map_or_else(|| "still running, killed".to_owned(), describe_status),
            reason: reason(call, resp, &self.stderr_text()),
        }
    }

    /// Waits for CRIU to exit after its answer.
    fn finish(&mut self) {
        if let Some(status) = self.reap(EXIT_TIMEOUT) {
            if !status.success() {
                tracing::debug!(status = %describe_status(status), "criu swrk exit status");
            }
        }
    }

    /// Waits at most `timeout` for CRIU to exit, then kills it. `None`
    /// when it had to be killed (or was already reaped).
    fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        // Readable once CRIU has exited: its answer is then acted on at
        // once rather than up to a poll interval later.
        let exited = i32::try_from(child.id())
            .ok()
            .and_then(|pid| crate::pidfd::open(pid).ok());
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.join_stderr();
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => match &exited {
                    Some(fd) => {
                        wait_readable(fd, deadline.saturating_duration_since(Instant::now()))
                    }
                    None => thread::sleep(EXIT_POLL),
                },
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    self.join_stderr();
                    return None;
                }
            }
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_stderr();
    }

    fn join_stderr(&mut self) {
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
    }

    fn stderr_text(&self) -> String {
        let bytes = self.stderr.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits at most `timeout` (and at most a second) for `fd` to be readable.
fn wait_readable(fd: &OwnedFd, timeout: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = u16::try_from(timeout.as_millis().clamp(1, 1000)).unwrap_or(1000);
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, PollTimeout::from(ms));
}

/// In a child before exec: writes "0" (this process) into a
/// `cgroup.procs` file. Only async-signal-safe calls.
fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    // SAFETY: `procs` is NUL-terminated; the fd is closed before returning.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd == -1 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(err);
        }
    }
    Ok(())
}

/// The `cgroup.procs` files of cgroup directories, as C strings.
pub fn cgroup_procs(dirs: &[PathBuf]) -> Result<Vec<CString>, CriuError> {
    use std::os::unix::ffi::OsStrExt;
    dirs.iter()
        .map(|dir| {
            CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).map_err(|_| {
                CriuError::Invalid(format!("cgroup path {} holds a NUL byte", dir.display()))
            })
        })
        .collect()
}

/// Reads `pipe` to EOF, keeping its last [`STDERR_BYTES_MAX`] bytes.
fn keep_tail(mut pipe: impl Read, sink: &Mutex<Vec<u8>>) {
    let mut chunk = [0u8; 1024];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Ok(mut kept) = sink.lock() else { return };
                kept.extend_from_slice(&chunk[..n]);
                let excess = kept.len().saturating_sub(STDERR_BYTES_MAX);
                kept.drain(..excess);
            }
        }
    }
}

/// An fd numbered above 2, so that the child's stdio set-up (dup2 onto
/// 0-2) cannot overwrite it.
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we own onto the lowest free
    // number >= 3; the new fd is ours alone.
    let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if dup == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

/// CRIU's name for a cgroup mode.
pub fn cg_mode(mode: CgroupMode) -> Criu_cg_mode {
    match mode {
        CgroupMode::Ignore => Criu_cg_mode::IGNORE,
        CgroupMode::None => Criu_cg_mode::CG_NONE,
        CgroupMode::Props => Criu_cg_mode::PROPS,
        CgroupMode::Soft => Criu_cg_mode::SOFT,
        CgroupMode::Full => Criu_cg_mode::FULL,
        CgroupMode::Strict => Criu_cg_mode::STRICT,
    }
}

/// Options every call with opts shares: the images and work directories
/// (passed as fds: CRIU opens them through /proc/<our pid>/fd), the log.
pub fn base_opts(images_dir: &File, work_dir: &File, log_file: &str, log_level: u32) -> Criu_opts {
    let mut opts = Criu_opts::new();
    opts.set_images_dir_fd(images_dir.as_raw_fd());
    opts.set_work_dir_fd(work_dir.as_raw_fd());
    opts.set_log_file(log_file.to_owned());
    opts.set_log_level(i32::try_from(log_level).unwrap_or(i32::MAX));
    opts.set_notify_scripts(true);
    opts
}

/// Opens a directory for CRIU (which reopens it by path).
pub fn open_dir(path: &Path, what: &'static str) -> Result<File, CriuError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| CriuError::Io {
            what,
            path: path.to_owned(),
            source,
        })
}

/// Version, `criu check` and the optional features, one `criu swrk` each.
pub fn check(binary: &Path) -> Result<CheckReport, CriuError> {
    let version = version(binary)?;
    let check = run_check(binary)?;
    let call = Call::quick(Action::FeatureCheck);
    let mut req = Criu_req::new();
    req.set_type(Criu_req_type::FEATURE_CHECK);
    let mut wanted = Criu_features::new();
    wanted.set_mem_track(true);
    wanted.set_lazy_pages(true);
    wanted.set_pidfd_store(true);
    req.features = MessageField::some(wanted);
    let reply = self::call(binary, &req, &call)?;
    if !reply.resp.success() {
        return Err(failure(&call, &reply.resp));
    }
    let features = reply.resp.features.clone().unwrap_or_default();
    Ok(CheckReport {
        version,
        check,
        mem_dirty_track: features.mem_track(),
        lazy_pages: features.lazy_pages(),
        pidfd_store: features.pidfd_store(),
    })
}

fn version(binary: &Path) -> Result<CriuVersion, CriuError> {
    let call = Call::quick(Action::Version);
    let mut req = Criu_req::new();
    req.set_type(Criu_req_type::VERSION);
    let reply = self::call(binary, &req, &call)?;
    if !reply.resp.success() {
        return Err(failure(&call, &reply.resp));
    }
    let v = reply
        .resp
        .version
        .as_ref()
        .ok_or_else(|| protocol(&call, "a version answer without a version".to_owned()))?;
    let number = |n: i32| u32::try_from(n).unwrap_or(0);
    Ok(CriuVersion {
        major: number(v.major_number()),
        minor: number(v.minor_number()),
        sublevel: number(v.sublevel()),
        gitid: v.gitid.clone(),
    })
}

/// `criu check` over RPC; needs an images directory (for its log).
fn run_check(binary: &Path) -> Result<Result<(), String>, CriuError> {
    let dir = std::env::temp_dir().join(format!("krg-criu-check-{}", std::process::id()));
    super::dump::make_images_dir(&dir)?;
    let result = (|| {
        let handle = open_dir(&dir, "cannot open the check directory")?;
        let log_path = dir.join("check.log");
        let call = Call {
            log: Some(log_path.clone()),
            ..Call::quick(Action::Check)
        };
        let mut req = Criu_req::new();
        req.set_type(Criu_req_type::CHECK);
        let mut opts = base_opts(&handle, &handle, "check.log", 2);
        opts.set_notify_scripts(false);
        req.opts = MessageField::some(opts);
        let reply = self::call(binary, &req, &call)?;
        Ok(if reply.resp.success() {
            Ok(())
        } else {
            Err(log::describe(&log_path))
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
