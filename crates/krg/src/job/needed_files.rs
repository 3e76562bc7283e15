//! The files a job works in, has open or maps, which a node it moves to
//! must have at the same paths.
//!
//! CRIU reopens every such file by its path at restore, in the restoring
//! node's file systems, and fails when it is not there or when a regular
//! file not opened for writing has another size (`files-reg.c`,
//! `validate_file`). The source lists them before anything is frozen and
//! the target says which it lacks, so a file only the source node has (on
//! a local disk, in a node-local /tmp) is a refusal that names it, the job
//! untouched, instead of a restore that fails after the freeze.
//!
//! Left out: what CRIU carries in the images or finds anyway — files
//! already deleted (CRIU keeps them as ghost files), /proc and /sys (the
//! job's own, remade by the restore), devices (refused or allowed by
//! [`super::migrate::obstacle`]), and files on mounts the job made itself
//! (dumped with its mount namespace).

use crate::node::Node;
use crate::wire::peer::{PeerRequest, PeerResponse};
use crate::wire::{ErrorCode, RemoteError};
use krg_types::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Most files one check names: a tree of a few hundred processes mapping
/// the same libraries names far fewer.
pub const FILES_MAX: usize = 16_384;
/// Longest path checked (the kernel's PATH_MAX).
pub const PATH_BYTES_MAX: usize = 4096;
/// Most bytes of paths one check sends, well within a peer frame
/// (`FRAME_BYTES_MAX`, 4 MiB): files beyond are not checked.
pub const PATHS_BYTES_MAX: usize = 2 << 20;

/// How the job uses a file, for the sentence that names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Use {
    WorksIn,
    HasOpen,
    Maps,
    /// A mount of the node's in the job's mount namespace (`super::held_mounts`):
    /// only its mount point's existence matters, and a move may leave it behind.
    HoldsMount,
    /// The mount point of a file system not among the node's mounts (the
    /// job's own, or one the node has unmounted since the job started).
    MadeMount,
}

impl Use {
    fn is_mount(self) -> bool {
        matches!(self, Use::HoldsMount | Use::MadeMount)
    }
}

/// What a check does with a mount of the node's the target lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LackedMount {
    /// A move: the job leaves it behind.
    LeaveBehind,
    /// A restart: its images hold the mount, the target is refused.
    Refuse,
}

/// A file the target must have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeededFile {
    pub path: String,
    pub dir: bool,
    /// The size the target's file must have, as CRIU checks it; `None` for
    /// one the job may be writing (its size may change until the freeze).
    pub size: Option<u64>,
    pub how: Use,
}

/// What the target found wrong with a [`NeededFile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mismatch {
    Missing,
    /// A directory where the job has a file, or the other way round.
    OtherKind {
        dir_there: bool,
    },
    OtherSize {
        there: u64,
        here: u64,
    },
    Unreadable(String),
}

/// The files of the processes `pids` that a target must have, one entry
/// per path. Processes that end meanwhile are left out.
pub fn of_processes(pids: &[i32]) -> Vec<NeededFile> {
    let node_devices = node_devices();
    let mut found: BTreeMap<String, NeededFile> = BTreeMap::new();
    let mut mappings_seen = HashSet::new();
    let mut add = |link: PathBuf, meta: Metadata, how: Use, writable: bool| {
        let Some(path) = checked_path(&link) else {
            return;
        };
        if !node_devices.contains(&meta.dev()) {
            return;
        }
        let size = (meta.is_file() && !writable).then_some(meta.len());
        let entry = found.entry(path.clone()).or_insert(NeededFile {
            path,
            dir: meta.is_dir(),
            size,
            how,
        });
        if writable {
            entry.size = None;
        }
        entry.how = entry.how.min(how);
    };
    for &pid in pids {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        if let (Ok(link), Ok(meta)) = (
            std::fs::read_link(proc_dir.join("cwd")),
            std::fs::metadata(proc_dir.join("cwd")),
        ) {
            add(link, meta, Use::WorksIn, false);
        }
        for (fd, link) in crate::procfs::open_fds(pid) {
            if let Ok(meta) = std::fs::metadata(proc_dir.join(format!("fd/{fd}"))) {
                add(link, meta, Use::HasOpen, open_for_writing(pid, fd));
            }
        }
        for mapping in file_mappings(pid) {
            // A file mapped many times (a library's segments, in every
            // process of the tree) is looked at once.
            if !mappings_seen.insert((mapping.file, mapping.shared_writable)) {
                continue;
            }
            let entry = proc_dir.join("map_files").join(mapping.range);
            if let (Ok(link), Ok(meta)) = (std::fs::read_link(&entry), std::fs::metadata(&entry)) {
                add(link, meta, Use::Maps, mapping.shared_writable);
            }
        }
    }
    let mut bytes = 0;
    found
        .into_values()
        .take(FILES_MAX)
        .take_while(|f| {
            bytes += f.path.len();
            bytes <= PATHS_BYTES_MAX
        })
        .collect()
}

/// The path as the target is asked about it, or `None` for one CRIU does
/// not look for by name.
fn checked_path(link: &Path) -> Option<String> {
    let path = link.to_str()?;
    if !path.starts_with('/') || path.ends_with(" (deleted)") || path.len() > PATH_BYTES_MAX {
        return None;
    }
    let elsewhere = ["/proc/", "/sys/", "/dev/"]
        .iter()
        .any(|p| path.starts_with(p) || path == p.trim_end_matches('/'));
    // /dev/shm is a file system of the node's like any other.
    (!elsewhere || path.starts_with("/dev/shm/")).then(|| path.to_string())
}

/// Whether descriptor `fd` of `pid` was opened for writing (`flags:` of
/// its fdinfo, in octal).
fn open_for_writing(pid: i32, fd: i32) -> bool {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok());
    // Unknown: take it as written, which only skips the size check.
    flags.is_none_or(|f| f & libc::O_ACCMODE != libc::O_RDONLY)
}

/// A mapping of a file, from `/proc/PID/maps`.
struct Mapping {
    /// `start-end`, as `/proc/PID/map_files` names it.
    range: String,
    /// The file's device and inode, as maps shows them.
    file: (String, u64),
    /// Through a shared writable mapping the job may change the file's size.
    shared_writable: bool,
}

fn file_mappings(pid: i32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let range = fields.next()?;
            let perms = fields.next()?;
            let device = fields.nth(1)?;
            let inode: u64 = fields.next()?.parse().ok()?;
            (inode != 0).then(|| Mapping {
                range: range.to_string(),
                file: (device.to_string(), inode),
                shared_writable: perms.contains('w') && perms.ends_with('s'),
            })
        })
        .collect()
}

/// The devices of this node's mounts (its mount namespace): a job's file
/// on any other is on a mount the job made itself.
pub(super) fn node_devices() -> HashSet<u64> {
    let mounts = crate::mountinfo::own().unwrap_or_default();
    mounts.iter().map(|m| m.device).collect()
}

/// How long a target may take to say which of a job's files it lacks.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Most mismatches one answer names: the refusal names one and counts
/// the others.
pub const MISMATCHES_MAX: usize = 1_000;

/// A source's question, answered: which of `files` (by index) this node
/// lacks or has otherwise. Stats may block (a network file system): done
/// off the async workers.
pub async fn answer(files: Vec<NeededFile>) -> Result<Vec<(u32, Mismatch)>, RemoteError> {
    if files.len() > FILES_MAX {
        return Err(RemoteError::new(
            ErrorCode::BadRequest,
            format!("{} files to check, more than {FILES_MAX}", files.len()),
        ));
    }
    if files.iter().any(|f| f.path.len() > PATH_BYTES_MAX) {
        return Err(RemoteError::new(
            ErrorCode::BadRequest,
            format!("a path to check is longer than {PATH_BYTES_MAX} bytes"),
        ));
    }
    tokio::task::spawn_blocking(move || mismatches_here(&files, MISMATCHES_MAX))
        .await
        .map_err(|e| RemoteError::new(ErrorCode::Internal, format!("the file check failed: {e}")))
}

/// Which of `files` (their indexes) this node lacks or has otherwise, at
/// most `limit`.
pub fn mismatches_here(files: &[NeededFile], limit: usize) -> Vec<(u32, Mismatch)> {
    (0u32..)
        .zip(files)
        .filter_map(|(i, f)| mismatch(f).map(|m| (i, m)))
        .take(limit)
        .collect()
}

fn mismatch(file: &NeededFile) -> Option<Mismatch> {
    let meta = match std::fs::metadata(&file.path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(Mismatch::Missing),
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Some(Mismatch::Missing),
        Err(e) => return Some(Mismatch::Unreadable(e.to_string())),
    };
    // CRIU binds a mount of the node's from the same path as its mount
    // point: whatever is there will do.
    if file.how == Use::HoldsMount {
        return None;
    }
    if meta.is_dir() != file.dir {
        return Some(Mismatch::OtherKind {
            dir_there: meta.is_dir(),
        });
    }
    match file.size {
        Some(here) if meta.is_file() && meta.len() != here => Some(Mismatch::OtherSize {
            there: meta.len(),
            here,
        }),
        _ => None,
    }
}

/// Refuses `doing` (`migrate job 1:7`) on `target` (at `addr`, or this
/// node) if the target lacks one of `files`. Returns the mount points of
/// the node's mounts the target lacks when `lacked` lets the job leave
/// them behind.
pub async fn check_target(
    node: &Arc<Node>,
    doing: &str,
    target: NodeId,
    addr: &str,
    files: Vec<NeededFile>,
    lacked: LackedMount,
) -> Result<Vec<String>, RemoteError> {
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let found = if target == node.id {
        answer(files.clone()).await?
    } else {
        let asked = node
            .peers
            .call(
                target,
                addr,
                PeerRequest::NeededFiles(files.clone()),
                CHECK_TIMEOUT,
            )
            .await;
        match asked {
            Ok(PeerResponse::FileMismatches(found)) => found,
            Ok(_) => {
                return Err(RemoteError::new(
                    ErrorCode::Internal,
                    format!("cannot {doing}: node {target} answered the check of its files with something else"),
                ))
            }
            Err(e) => {
                return Err(RemoteError::new(
                    ErrorCode::Unavailable,
                    format!("cannot {doing}: node {target} did not say whether it has the job's files: {e}"),
                ))
            }
        }
    };
    // An index the question did not have is the peer's fault: skipped.
    let (left_behind, found): (Vec<_>, Vec<_>) = found
        .into_iter()
        .filter_map(|(i, m)| Some((files.get(i as usize)?.clone(), m)))
        .partition(|(f, _)| f.how == Use::HoldsMount && lacked == LackedMount::LeaveBehind);
    match refusal(doing, target, &found) {
        Some(why) => Err(RemoteError::new(ErrorCode::Refused, why)),
        None => Ok(left_behind.into_iter().map(|(f, _)| f.path).collect()),
    }
}

/// Why `doing` cannot be done on `target`, from what the target found: the
/// first mismatch in one sentence, and how many more there are.
pub fn refusal(
    doing: &str,
    target: impl fmt::Display,
    found: &[(NeededFile, Mismatch)],
) -> Option<String> {
    let (file, why) = found.first()?;
    let how = match file.how {
        Use::WorksIn => format!("it works in {}", file.path),
        Use::HasOpen => format!("it has {} open", file.path),
        Use::Maps => format!("it maps {}", file.path),
        Use::HoldsMount => format!("its mount namespace has {} mounted", file.path),
        Use::MadeMount => format!(
            "its mount namespace has a file system of its own on {}",
            file.path
        ),
    };
    let what = match why {
        Mismatch::Missing => format!("which node {target} does not have"),
        Mismatch::OtherKind { dir_there: true } => {
            format!("which is a directory on node {target}")
        }
        Mismatch::OtherKind { dir_there: false } => {
            format!("which is not a directory on node {target}")
        }
        Mismatch::OtherSize { there, here } => {
            format!("which is another file on node {target} ({there} bytes there, {here} here)")
        }
        Mismatch::Unreadable(e) => format!("which node {target} cannot read ({e})"),
    };
    let noun = if file.how.is_mount() { "mount" } else { "file" };
    let more = match found.len() - 1 {
        0 => String::new(),
        n => format!(
            " (and {n} more such {noun}{})",
            if n == 1 { "" } else { "s" }
        ),
    };
    Some(format!("cannot {doing}: {how}, {what}{more}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn scratch(name: &str) -> PathBuf {
        crate::test_support::scratch_dir("needed", name)
    }

    #[test]
    fn a_process_needs_its_directory_its_open_files_and_its_program() {
        let dir = scratch("proc");
        let read = dir.join("read");
        std::fs::write(&read, b"12345").unwrap();
        let written = dir.join("written");
        let script = format!(
            "exec 3<{} 4>{}; echo ready; read line",
            read.display(),
            written.display()
        );
        let mut child = Command::new("/bin/sh")
            .args(["-c", &script])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let files = of_processes(&[child.id() as i32]);
        child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
        child.wait().unwrap();

        let find = |p: &Path| files.iter().find(|f| Path::new(&f.path) == p).cloned();
        let cwd = find(&dir).expect("its working directory");
        assert!(cwd.dir && cwd.how == Use::WorksIn, "{cwd:?}");
        let r = find(&read).expect("the file it reads");
        assert_eq!((r.size, r.how, r.dir), (Some(5), Use::HasOpen, false));
        let w = find(&written).expect("the file it writes");
        assert_eq!(w.size, None, "a file being written has no size to match");
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        assert!(
            files
                .iter()
                .any(|f| Path::new(&f.path) == sh && f.how == Use::Maps),
            "its program, mapped: {files:?}"
        );
        assert!(
            !files
                .iter()
                .any(|f| f.path.starts_with("/proc/") || f.path.starts_with("/dev/")),
            "{files:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_node_reports_what_it_lacks_and_what_differs() {
        let dir = scratch("here");
        let same = dir.join("same");
        std::fs::write(&same, b"abc").unwrap();
        let file = |path: &Path, dir: bool, size: Option<u64>| NeededFile {
            path: path.to_string_lossy().into_owned(),
            dir,
            size,
            how: Use::HasOpen,
        };
        let asked = vec![
            file(&same, false, Some(3)),
            file(&dir, true, None),
            file(&dir.join("gone"), false, Some(1)),
            file(&same.join("below-a-file"), false, None),
            file(&same, false, Some(4)),
            file(&dir, false, None),
            file(&same, false, None),
        ];
        let found: Vec<Mismatch> = mismatches_here(&asked, 10)
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        assert_eq!(
            found,
            vec![
                Mismatch::Missing,
                Mismatch::Missing,
                Mismatch::OtherSize { there: 3, here: 4 },
                Mismatch::OtherKind { dir_there: true },
            ]
        );
        assert_eq!(mismatches_here(&asked, 1).len(), 1);

        let mount = |path: &Path, dir: bool, how| NeededFile {
            path: path.to_string_lossy().into_owned(),
            dir,
            size: None,
            how,
        };
        let mounts = vec![
            mount(&same, true, Use::HoldsMount),
            mount(&dir.join("gone"), true, Use::HoldsMount),
            mount(&same, true, Use::MadeMount),
        ];
        let found: Vec<(u32, Mismatch)> = mismatches_here(&mounts, 10);
        assert_eq!(
            found,
            vec![
                (1, Mismatch::Missing),
                (2, Mismatch::OtherKind { dir_there: false }),
            ],
            "a node's mount is bound from whatever its path holds; the job's own needs a mount point of its kind"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_refusal_names_the_first_file_and_counts_the_others() {
        let f = |path: &str, how| NeededFile {
            path: path.into(),
            dir: false,
            size: None,
            how,
        };
        assert_eq!(refusal("migrate job 1:7", 2, &[]), None);
        assert_eq!(
            refusal(
                "migrate job 1:7",
                2,
                &[(f("/scratch/a", Use::HasOpen), Mismatch::Missing)]
            )
            .unwrap(),
            "cannot migrate job 1:7: it has /scratch/a open, which node 2 does not have"
        );
        let two = [
            (
                f("/usr/lib/libx.so", Use::Maps),
                Mismatch::OtherSize {
                    there: 10,
                    here: 12,
                },
            ),
            (f("/scratch", Use::WorksIn), Mismatch::Missing),
        ];
        assert_eq!(
            refusal("restart job 1:7", 3, &two).unwrap(),
            "cannot restart job 1:7: it maps /usr/lib/libx.so, which is another file on node 3 (10 bytes there, 12 here) (and 1 more such file)"
        );
    }

    #[test]
    fn the_refusal_names_a_mount() {
        let f = |how| NeededFile {
            path: "/run/user/1000".into(),
            dir: true,
            size: None,
            how,
        };
        assert_eq!(
            refusal("restart job 1:7 on node 2", 2, &[(f(Use::HoldsMount), Mismatch::Missing)]).unwrap(),
            "cannot restart job 1:7 on node 2: its mount namespace has /run/user/1000 mounted, which node 2 does not have"
        );
        let two = [
            (f(Use::MadeMount), Mismatch::OtherKind { dir_there: false }),
            (f(Use::HoldsMount), Mismatch::Missing),
        ];
        assert_eq!(
            refusal("migrate job 1:7", 2, &two).unwrap(),
            "cannot migrate job 1:7: its mount namespace has a file system of its own on /run/user/1000, which is not a directory on node 2 (and 1 more such mount)"
        );
    }

    #[test]
    fn paths_criu_does_not_look_up_are_left_out() {
        for skipped in [
            "/proc/1/status",
            "/sys/kernel",
            "/dev/null",
            "/x (deleted)",
            "pipe:[3]",
        ] {
            assert_eq!(checked_path(Path::new(skipped)), None, "{skipped}");
        }
        for kept in ["/dev/shm/seg", "/home/u/data", "/"] {
            assert_eq!(checked_path(Path::new(kept)).as_deref(), Some(kept));
        }
    }
}
