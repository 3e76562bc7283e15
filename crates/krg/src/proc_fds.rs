//! The descriptors a process holds, as `/proc/PID/fd` shows them.

use std::os::fd::RawFd;
use std::path::PathBuf;

/// Each open descriptor of process `pid` with what it refers to (a path,
/// `socket:[INODE]`, `pipe:[INODE]`, ...). Nothing for a process that is
/// gone or not ours to look at; a descriptor closed while the directory is
/// read is left out.
pub fn open_fds(pid: i32) -> impl Iterator<Item = (RawFd, PathBuf)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_file_this_process_opens_is_listed_with_its_path_until_closed() {
        let me = std::process::id() as i32;
        let path = std::env::temp_dir().join(format!("krg-proc-fds-{me}"));
        let file = std::fs::File::create(&path).unwrap();
        let fd = file.as_raw_fd();
        assert!(open_fds(me).any(|(n, target)| n == fd && target == path));
        drop(file);
        assert!(!open_fds(me).any(|(_, target)| target == path));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_process_that_is_gone_holds_nothing() {
        assert_eq!(open_fds(i32::MAX).count(), 0);
    }
}
