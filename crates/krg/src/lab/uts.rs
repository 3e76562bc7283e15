//! Persistent UTS namespaces: one per node, holding its host name, kept alive
//! by bind-mounting the namespace onto a file (as `ip netns add` does for
//! network namespaces).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::thread;

use anyhow::{anyhow, Context, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::sethostname;

/// Make a new UTS namespace with host name `hostname` and bind it on `file`
/// (created empty first).
///
/// The namespace is made by a short-lived thread: unshare(CLONE_NEWUTS)
/// changes only the calling thread, so the rest of this process (a test
/// harness with many threads, say) keeps its own host name.
pub fn create(file: &Path, hostname: &str) -> Result<()> {
    File::create(file).with_context(|| format!("krg lab: cannot create {}", file.display()))?;
    let made = thread::scope(|scope| {
        scope
            .spawn(|| -> Result<(), String> {
                unshare(CloneFlags::CLONE_NEWUTS)
                    .map_err(|e| format!("unshare(CLONE_NEWUTS): {e}"))?;
                sethostname(hostname).map_err(|e| format!("sethostname({hostname}): {e}"))?;
                mount(
                    Some("/proc/thread-self/ns/uts"),
                    file,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("bind mount on {}: {e}", file.display()))
            })
            .join()
            .map_err(|_| "the thread making it panicked".to_string())?
    });
    made.map_err(|e| anyhow!("krg lab: cannot make a UTS namespace for {hostname}: {e}"))
}

/// Detach whatever is mounted on `target`, if anything.
pub fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point; ENOENT: not there at all.
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(anyhow!("krg lab: cannot unmount {}: {e}", target.display())),
    }
}

/// Mount points at or below `dir` in this process's mount namespace, the
/// deepest first (so they can be unmounted in that order).
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort();
    found.dedup();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/x\\"), r"/x\\");
    }
}
