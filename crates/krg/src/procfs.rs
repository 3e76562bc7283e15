//! What /proc says about a process: the descriptors it holds
//! (`/proc/PID/fd`) and its status line (`/proc/PID/stat`).

use std::fmt::Display;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// `/proc/PID/stat` after the command name, which is in parentheses and
/// may itself hold spaces or parentheses: its first field is the state
/// (field 3 in proc(5)), then the ppid (4), and so on. `None` for a
/// process that is gone.
pub fn stat_after_name(pid: impl Display) -> Option<String> {
    let mut stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let name_ends = stat.rfind(')')?;
    Some(stat.split_off(name_ends + 1))
}

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
        assert_eq!(stat_after_name(i32::MAX), None);
    }

    #[test]
    fn the_stat_line_after_the_name_starts_with_the_state_then_the_ppid() {
        let fields = stat_after_name(std::process::id()).expect("this process");
        let fields: Vec<&str> = fields.split_whitespace().collect();
        assert!(
            fields[0].len() == 1 && "RSDTtZXIP".contains(fields[0]),
            "a state letter first: {fields:?}"
        );
        let ppid: u32 = fields[1].parse().expect("a ppid");
        assert_eq!(ppid, std::os::unix::process::parent_id());
    }
}
