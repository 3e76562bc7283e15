//! Processes: whether a recorded daemon is still the same live process,
//! finding every process inside a lab's namespaces, and running a command
//! with a time limit.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const POLL: Duration = Duration::from_millis(10);
/// After a command exits, its output pipes are read for at most this long
/// (a grandchild it left behind may hold them open).
const PIPE_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// A process's state letter and start time (field 22 of /proc/PID/stat, in
/// clock ticks after boot), or `None` if there is no such process.
fn stat(pid: u32) -> Option<(char, u64)> {
    let after_name = crate::procfs::stat_after_name(pid)?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start_time = fields.get(19)?.parse().ok()?;
    Some((state, start_time))
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: u32) -> Option<u64> {
    match stat(pid)? {
        ('Z' | 'X', _) => None,
        (_, start) => Some(start),
    }
}

/// Whether `pid` is still the live process that started at `start`.
pub fn alive(pid: u32, start: Option<u64>) -> bool {
    match (start_time(pid), start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

pub fn sigkill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The (device, inode) naming a namespace, from a namespace file such as
/// /run/netns/NAME or /proc/PID/ns/net.
pub fn ns_id(path: &Path) -> Option<(u64, u64)> {
    let meta = fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Every process (other than this one) whose network or UTS namespace is
/// one of `namespaces`.
pub fn pids_in_namespaces(namespaces: &[(u64, u64)]) -> Vec<u32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let inside = ["net", "uts"].iter().any(|kind| {
            ns_id(&entry.path().join("ns").join(kind)).is_some_and(|id| namespaces.contains(&id))
        });
        if inside && start_time(pid).is_some() {
            found.push(pid);
        }
    }
    found
}

/// SIGKILL every process in `namespaces` until none is left (bounded).
pub fn kill_namespaces(namespaces: &[(u64, u64)], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids_in_namespaces(namespaces);
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "krg lab: processes {pids:?} are still in the lab's namespaces after {timeout:?}"
            );
        }
        pids.iter().copied().for_each(sigkill);
        thread::sleep(POLL);
    }
}

/// Wait (bounded) for a child of ours to exit, so it leaves no zombie.
pub fn reap(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            Ok(None) | Err(_) => return false,
        }
    }
}

/// Run `command` (stdin from /dev/null), capturing its output; kill it and
/// fail if it runs longer than `timeout`.
pub fn output_with_timeout(mut command: Command, timeout: Duration) -> Result<Output> {
    let shown = format!("{:?}", command.get_program());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("krg lab: cannot run {shown}"))?;
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .context("krg lab: cannot wait for a command")?
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("krg lab: {shown} did not finish within {timeout:?}");
        }
        thread::sleep(POLL);
    };
    let stdout = stdout.recv_timeout(PIPE_DRAIN_WAIT).unwrap_or_default();
    let stderr = stderr.recv_timeout(PIPE_DRAIN_WAIT).unwrap_or_default();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Read a pipe to its end on a thread; the bytes arrive on the channel.
fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        let _ = sender.send(bytes);
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        let me = std::process::id();
        let start = start_time(me).expect("this process has a start time");
        assert!(alive(me, Some(start)));
        assert!(!alive(me, Some(start + 1)));
    }

    #[test]
    fn slow_commands_time_out() {
        let mut sleep = Command::new("sleep");
        sleep.arg("5");
        let started = Instant::now();
        assert!(output_with_timeout(sleep, Duration::from_millis(100)).is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        let mut echo = Command::new("echo");
        echo.arg("hi");
        let out = output_with_timeout(echo, Duration::from_secs(5)).expect("echo runs");
        assert_eq!(out.stdout, b"hi\n");
    }
}
