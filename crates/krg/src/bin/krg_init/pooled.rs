//! A krg-init started ahead of its job (`krgd`'s `job/init_pool.rs`):
//! it waits on fd 0, a socket, for its arguments, its job's environment and
//! the job's four descriptors (`krg_types::handoff`), puts them in place,
//! and goes on as if it had been started with them.

use std::ffi::OsString;
use std::io::{IoSliceMut, Read};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::net::UnixStream;

use krg_types::handoff::{Handoff, FDS};
use nix::mount::{mount, MsFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// Where the received descriptors wait while fds 0 to 3 are made free.
const ABOVE_STDIO: RawFd = 10;

/// What a waiting init mounted before its job came.
#[derive(Debug, Default)]
pub struct Ahead {
    /// The job's /proc is mounted.
    pub proc: bool,
    /// The cluster view's files are bound from this directory.
    pub view: Option<OsString>,
}

/// Mounts ahead of the job what every job here gets: its /proc and the
/// cluster view over it. The mounts become slaves of the node's first, so
/// that a file system the node mounts while we wait still reaches the job,
/// and nothing of ours reaches the node. Anything that fails is left to the
/// init, which does it once it has its job (and reports a failure then).
pub fn mount_ahead(view: Option<OsString>) -> Ahead {
    let slave = MsFlags::MS_REC | MsFlags::MS_SLAVE;
    if mount(None::<&str>, "/", None::<&str>, slave, None::<&str>).is_err() {
        return Ahead::default();
    }
    if crate::mount_proc().is_err() {
        return Ahead::default();
    }
    let view = view.filter(|v| std::path::Path::new(v).is_absolute());
    if let Some(v) = &view {
        crate::bind_view(std::path::Path::new(v));
    }
    Ahead { proc: true, view }
}

/// Waits for the job. Returns krg-init's arguments, the environment
/// replaced by the job's and fds 0 to 3 by the job's; `Ok(None)` when
/// `krgd` went away first.
pub fn await_job() -> Result<Option<Vec<OsString>>, String> {
    // SAFETY: fd 0 is the socket krgd gave us; we own it from here.
    let mut ctl = unsafe { UnixStream::from_raw_fd(0) };
    let mut first = vec![0u8; 64 << 10];
    let mut space = nix::cmsg_space!([RawFd; FDS]);
    let (got, fds) = {
        let mut iov = [IoSliceMut::new(&mut first)];
        let msg = recvmsg::<()>(0, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| format!("cannot receive the job: {e}"))?;
        let mut fds = Vec::new();
        for cmsg in msg
            .cmsgs()
            .map_err(|e| format!("cannot receive the job: {e}"))?
        {
            if let ControlMessageOwned::ScmRights(r) = cmsg {
                fds.extend(r);
            }
        }
        (msg.bytes, fds)
    };
    if got == 0 {
        return Ok(None);
    }
    if fds.len() != FDS {
        return Err(format!(
            "received {} descriptors instead of {FDS}",
            fds.len()
        ));
    }
    let mut message = first[..got].to_vec();
    fill(&mut ctl, &mut message, 4)?;
    let body = Handoff::body_len(message[..4].try_into().unwrap_or_default())
        .map_err(|e| e.to_string())?;
    fill(&mut ctl, &mut message, 4 + body)?;
    let handoff = Handoff::decode(&message[4..4 + body]).map_err(|e| e.to_string())?;
    drop(ctl);
    place_stdio(&fds);
    replace_environment(&handoff.env);
    Ok(Some(
        handoff.args.into_iter().map(OsString::from_vec).collect(),
    ))
}

/// Reads what is missing of the first `len` bytes of the message.
fn fill(ctl: &mut UnixStream, message: &mut Vec<u8>, len: usize) -> Result<(), String> {
    let have = message.len();
    if have >= len {
        return Ok(());
    }
    message.resize(len, 0);
    ctl.read_exact(&mut message[have..])
        .map_err(|e| format!("cannot receive the job: {e}"))
}

/// The job's descriptors become fds 0 to 3, in order (received, they took
/// the lowest free numbers, which may be any of those).
fn place_stdio(fds: &[RawFd]) {
    // SAFETY: fcntl/dup2/close on descriptors we received and own.
    unsafe {
        let high: Vec<RawFd> = fds
            .iter()
            .map(|&fd| {
                let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, ABOVE_STDIO);
                libc::close(fd);
                h
            })
            .collect();
        for (target, &h) in high.iter().enumerate() {
            libc::dup2(h, target as RawFd);
            libc::close(h);
        }
    }
}

/// The job's environment instead of the one krgd started us with.
fn replace_environment(entries: &[Vec<u8>]) {
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    for entry in entries {
        let Some(eq) = entry.iter().position(|b| *b == b'=') else {
            continue;
        };
        let key = OsString::from_vec(entry[..eq].to_vec());
        let value = OsString::from_vec(entry[eq + 1..].to_vec());
        if !key.is_empty() {
            std::env::set_var(key, value);
        }
    }
}
