//! `/proc/PID/mountinfo`, read one way for every part of krg that asks
//! which mounts a process sees: the node's own mounts a job must not take
//! along (`criu::dump`), the devices of the node's mounts (`job::
//! needed_files`), the cgroup hierarchies (`features`, `job::cgroup_moves`)
//! and what a lab mounted below its directory (`lab`).

use std::path::Path;

/// One line of mountinfo:
/// `ID PARENT MAJ:MIN ROOT POINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPER`.
/// Paths are unescaped (the kernel writes space, tab, newline and
/// backslash as `\ooo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mount's id, unique in the namespace.
    pub id: u32,
    /// The id of the mount it is mounted on (its own for a namespace's root).
    pub parent: u32,
    /// The file system's device, as `st_dev` of its files.
    pub device: libc::dev_t,
    /// The directory of the file system mounted here (`/` unless a bind).
    pub root: String,
    pub mount_point: String,
    /// Per-mount options (`rw,nosuid,nodev,relatime`).
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    /// The file system's own options (`rw,nsdelegate`, a v1 cgroup's
    /// controllers).
    pub super_options: String,
}

/// The mounts of a mountinfo text, in its order; a line that is not one
/// is skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// The mounts `/proc/PID/mountinfo` (or another such file) lists.
pub fn read(path: impl AsRef<Path>) -> std::io::Result<Vec<Mount>> {
    std::fs::read_to_string(path).map(|text| parse(&text))
}

/// The mounts of this process's mount namespace.
pub fn own() -> std::io::Result<Vec<Mount>> {
    read("/proc/self/mountinfo")
}

fn parse_line(line: &str) -> Option<Mount> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let id = left.next()?.parse().ok()?;
    let parent = left.next()?.parse().ok()?;
    let (major, minor) = left.next()?.split_once(':')?;
    let root = left.next()?;
    let mount_point = left.next()?;
    let mount_options = left.next()?;
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let source = right.next()?;
    let super_options = right.next().unwrap_or_default();
    Some(Mount {
        id,
        parent,
        device: libc::makedev(major.parse().ok()?, minor.parse().ok()?),
        root: unescape(root),
        mount_point: unescape(mount_point),
        mount_options: mount_options.to_owned(),
        fstype: fstype.to_owned(),
        source: unescape(source),
        super_options: super_options.to_owned(),
    })
}

/// Undoes the kernel's `\ooo` escapes; a backslash not followed by three
/// octal digits stays as it is.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
51 50 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
72 71 0:4 net:[4026532177] /run/netns/krg-sw rw shared:5 - nsfs nsfs rw\n\
76 51 0:4 uts:[4026532316] /run/krg\\040lab/n1/uts rw - nsfs nsfs rw\n\
33 24 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 master:2 - cgroup2 cgroup2 rw,nsdelegate\n\
garbage line\n\
95 80 0:43 /cpuinfo /proc/cpuinfo ro,nosuid - fuse krg-view ro,user_id=0\n";

    #[test]
    fn parses_each_field() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(mounts.len(), 5, "the garbage line is skipped");
        assert_eq!(
            mounts[0],
            Mount {
                id: 51,
                parent: 50,
                device: libc::makedev(254, 0),
                root: "/".into(),
                mount_point: "/".into(),
                mount_options: "rw,relatime".into(),
                fstype: "ext4".into(),
                source: "/dev/vda".into(),
                super_options: "rw".into(),
            }
        );
        assert_eq!(mounts[1].root, "net:[4026532177]");
        assert_eq!(mounts[1].fstype, "nsfs", "after the optional tags");
        assert_eq!(mounts[2].mount_point, "/run/krg lab/n1/uts");
        assert_eq!(mounts[3].mount_options, "rw,nosuid,nodev,noexec,relatime");
        assert_eq!(mounts[3].super_options, "rw,nsdelegate");
        assert_eq!(mounts[4].device, libc::makedev(0, 43));
        assert_eq!(mounts[4].root, "/cpuinfo");
    }

    #[test]
    fn unescapes_octal_only() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/plain\\"), "/plain\\");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
        assert_eq!(unescape(r"/x\\"), r"/x\\");
        assert_eq!(unescape(r"/not\999"), r"/not\999");
    }

    #[test]
    fn reads_its_own_mounts() {
        let mounts = own().expect("/proc/self/mountinfo");
        assert!(mounts.iter().any(|m| m.mount_point == "/"), "{mounts:?}");
    }
}
