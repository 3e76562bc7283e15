//! Moving processes into cgroups without waiting for RCU.
//!
//! krg moves a process into a cgroup at every launch (the waiting
//! krg-init into the job's cgroups) and every restore (`criu` into the
//! restored job's). Such a move takes the kernel's global
//! `cgroup_threadgroup_rwsem` for writing, which, unless the cgroup root is
//! mounted with `favordynmods`, first waits for an RCU grace period once
//! the machine has been quiet for a moment: measured here, the first write
//! to a `cgroup.procs` after 1 s of idle took 7.6 to 15 ms, the next ones
//! 0.02 ms. That wait was most of a `krg run` started after an idle spell
//! (10 to 30 ms against 5 ms back to back). With `favordynmods` the same
//! write takes 0.3 ms after idle; the price, a slower path for fork and
//! exit, is the one the kernel documents for machines that move processes
//! between cgroups often, which is what a krg node does.
//!
//! The flag belongs to the cgroup v2 root (the kernel's rwsem is shared by
//! every hierarchy, v1 included) and, on this kernel, stays set until
//! reboot. [`ensure`] remounts the v2 hierarchy with the flag added to the
//! options it has (keeping, for example, systemd's `nsdelegate`), or, where
//! no v2 hierarchy is mounted, mounts one in a private mount namespace
//! only to set it.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::mountinfo::Mount;

use nix::mount::MsFlags;

const FLAG: &str = "favordynmods";

/// A cgroup v2 mount, from /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
struct V2Mount {
    path: PathBuf,
    /// Per-mount options (`rw,nosuid,nodev,noexec,relatime`).
    mount_options: String,
    /// The file system's options (`rw,nsdelegate,favordynmods`).
    super_options: String,
}

impl V2Mount {
    fn has_flag(&self) -> bool {
        self.super_options.split(',').any(|o| o == FLAG)
    }
}

/// What [`ensure`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// The v2 root at this path has the flag already.
    AlreadySet(PathBuf),
    /// The v2 hierarchy at this path was remounted with it.
    Remounted(PathBuf),
    /// No v2 hierarchy is mounted: one was mounted in a private namespace.
    SetThroughPrivateMount,
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tuning::AlreadySet(p) => write!(f, "{} has {FLAG} already", p.display()),
            Tuning::Remounted(p) => write!(f, "{} remounted with {FLAG}", p.display()),
            Tuning::SetThroughPrivateMount => {
                write!(
                    f,
                    "{FLAG} set on the cgroup v2 root through a private mount"
                )
            }
        }
    }
}

/// Whether moves into cgroups are fast here: `Ok(where)` or `Err(why not)`.
pub fn status() -> Result<String, String> {
    let mounts = v2_mounts(&read_mountinfo()?);
    match mounts.iter().find(|m| m.has_flag()) {
        Some(m) => Ok(format!("{FLAG} ({})", m.path.display())),
        None => Err(format!(
            "the cgroup v2 root lacks {FLAG}: a process's first move into a cgroup after an idle moment waits for an RCU grace period (7-15 ms here); krgd sets it at start unless --no-cgroup-tuning"
        )),
    }
}

/// Sets `favordynmods` on the cgroup v2 root unless it is set (root only).
pub fn ensure() -> Result<Tuning, String> {
    let mounts = v2_mounts(&read_mountinfo()?);
    if let Some(m) = mounts.iter().find(|m| m.has_flag()) {
        return Ok(Tuning::AlreadySet(m.path.clone()));
    }
    match mounts.first() {
        Some(m) => remount(m).map(|()| Tuning::Remounted(m.path.clone())),
        None => private_mount().map(|()| Tuning::SetThroughPrivateMount),
    }
}

fn read_mountinfo() -> Result<Vec<Mount>, String> {
    crate::mountinfo::own().map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))
}

/// The cgroup2 mounts among `mounts`, in their order.
fn v2_mounts(mounts: &[Mount]) -> Vec<V2Mount> {
    mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2")
        .map(|m| V2Mount {
            path: PathBuf::from(&m.mount_point),
            mount_options: m.mount_options.clone(),
            super_options: m.super_options.clone(),
        })
        .collect()
}

/// The per-mount flags a remount must give again, or it would clear them.
fn mount_flags(options: &str) -> MsFlags {
    options.split(',').fold(MsFlags::empty(), |flags, o| {
        flags
            | match o {
                "ro" => MsFlags::MS_RDONLY,
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                "strictatime" => MsFlags::MS_STRICTATIME,
                _ => MsFlags::empty(),
            }
    })
}

/// The file system options with the flag added (`rw`/`ro` are per mount).
fn options_with_flag(super_options: &str) -> String {
    super_options
        .split(',')
        .filter(|o| !o.is_empty() && *o != "rw" && *o != "ro")
        .chain(std::iter::once(FLAG))
        .collect::<Vec<_>>()
        .join(",")
}

fn remount(m: &V2Mount) -> Result<(), String> {
    let data = options_with_flag(&m.super_options);
    nix::mount::mount(
        None::<&str>,
        &m.path,
        None::<&str>,
        MsFlags::MS_REMOUNT | mount_flags(&m.mount_options),
        Some(data.as_str()),
    )
    .map_err(|e| {
        format!(
            "cannot remount {} with {data}: {}",
            m.path.display(),
            e.desc()
        )
    })
}

/// Mounts a cgroup v2 file system with the flag in a mount namespace of a
/// child's own, which ends with it: the root keeps the flag.
fn private_mount() -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("krgd-cgroup2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let status = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "mount",
            "-t",
            "cgroup2",
        ])
        .args(["-o", FLAG, "cgroup2"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir(&dir);
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("mounting cgroup2 with {FLAG} failed ({s})")),
        Err(e) => Err(format!("cannot run unshare: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const MOUNTINFO: &str = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
33 24 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
34 24 0:27 / /sys/fs/cgroup/freezer rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup rw,freezer
35 24 0:26 / /mnt/with\\040space rw,relatime - cgroup2 none rw,nsdelegate,favordynmods
";

    #[test]
    fn finds_v2_mounts_and_their_options() {
        let mounts = v2_mounts(&crate::mountinfo::parse(MOUNTINFO));
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        assert_eq!(mounts[0].path, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[0].mount_options, "rw,nosuid,nodev,noexec,relatime");
        assert!(!mounts[0].has_flag());
        assert_eq!(mounts[1].path, Path::new("/mnt/with space"));
        assert!(mounts[1].has_flag());
    }

    #[test]
    fn a_remount_keeps_the_options_it_had() {
        assert_eq!(
            options_with_flag("rw,nsdelegate"),
            "nsdelegate,favordynmods"
        );
        assert_eq!(options_with_flag("rw"), "favordynmods");
        let flags = mount_flags("rw,nosuid,nodev,noexec,relatime");
        assert_eq!(
            flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME
        );
        assert!(mount_flags("ro,noatime").contains(MsFlags::MS_RDONLY | MsFlags::MS_NOATIME));
    }
}
