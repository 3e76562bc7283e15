//! Freezing a job at a moment CRIU can dump it.
//!
//! A frozen job is thawed and frozen again a moment later while one of its
//! processes is caught where CRIU cannot dump it:
//!
//! - holding a file of `krgd`'s cluster view: the job's processes read
//!   them (krg-preload reads `jobs/<gpid>/caps` at every exec of a forked
//!   child), but the view is the node's, not the job's: a dump skips its
//!   mount, and CRIU refuses a descriptor open on it (`Can't lookup
//!   mount=84 for fd=3 path=…/view/jobs/1:4/caps`, seen in CI on a shell
//!   loop). Such a descriptor lives for one read.
//! - in `vfork`, its child not yet exec'd: the freezer stops the parent's
//!   wait, but CRIU, once it has seized both and thawed the cgroup, waits
//!   for the parent to stop, which it cannot do before its child execs,
//!   and the child is held by CRIU: the dump fails after CRIU's timeout
//!   (`Unseizable non-zombie … state D`, 10 s, seen in CI on `while :; do
//!   /bin/true; done`, whose shell vforks each command). The window lasts
//!   until the child's exec.

use std::path::Path;
use std::time::Duration;

use super::cgroup::JobCgroup;

/// Freeze attempts before giving up on a job caught at a bad moment each
/// time.
const ATTEMPTS: u32 = 20;

/// How long a job runs between two attempts (a read of the view is a
/// FUSE round trip to `krgd`, a vfork child's exec a fraction of a
/// millisecond).
const RUN_BETWEEN: Duration = Duration::from_millis(2);

/// `kcmp` type comparing two processes' address spaces.
const KCMP_VM: libc::c_long = 1;

/// Freezes `cgroup` at a moment none of its processes holds a file under
/// `view` (when the job sees one) or waits in `vfork`. On failure the job
/// is left thawed.
pub async fn freeze(cgroup: &JobCgroup, view: Option<&Path>) -> Result<(), String> {
    let mut attempts = 0;
    loop {
        tokio::task::block_in_place(|| cgroup.set_frozen(true)).map_err(|e| e.to_string())?;
        let Some(why) = not_dumpable_now(&cgroup.pids(), view) else {
            return Ok(());
        };
        tracing::debug!(
            attempts,
            why,
            "frozen at a bad moment, thawed for another try"
        );
        let _ = cgroup.set_frozen(false);
        attempts += 1;
        if attempts == ATTEMPTS {
            return Err(format!("{why}, which CRIU cannot dump; try again"));
        }
        tokio::time::sleep(RUN_BETWEEN).await;
    }
}

/// Why the frozen processes `pids` cannot be dumped at this moment.
fn not_dumpable_now(pids: &[i32], view: Option<&Path>) -> Option<String> {
    if let Some((parent, child)) = in_vfork(pids) {
        return Some(format!(
            "its process {parent} waits in vfork for its child {child} to exec"
        ));
    }
    let view = view?;
    let pid = pids.iter().find(|p| holds_file_under(**p, view))?;
    Some(format!(
        "its process {pid} keeps a file of the cluster view ({}) open",
        view.display()
    ))
}

/// A process of `pids` whose child, also in `pids`, still shares its
/// address space: a vfork not yet followed by the child's exec or exit.
fn in_vfork(pids: &[i32]) -> Option<(i32, i32)> {
    pids.iter().find_map(|&child| {
        let parent = parent_of(child)?;
        (pids.contains(&parent) && same_address_space(parent, child)).then_some((parent, child))
    })
}

fn parent_of(pid: i32) -> Option<i32> {
    // The state, then the ppid.
    crate::procfs::stat_after_name(pid)?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn same_address_space(a: i32, b: i32) -> bool {
    // SAFETY: kcmp takes two pids, a type and two unused integers; it
    // reads nothing from this process's memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            libc::c_long::from(a),
            libc::c_long::from(b),
            KCMP_VM,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    r == 0
}

/// Has process `pid` a descriptor open on a file under `dir`?
fn holds_file_under(pid: i32, dir: &Path) -> bool {
    crate::procfs::open_fds(pid).any(|(_, target)| target.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_descriptor_under_the_directory_is_seen() {
        let me = std::process::id() as i32;
        let dir = std::env::temp_dir().join(format!("krg-quiesce-{me}"));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(!holds_file_under(me, &dir));
        let path = dir.join("caps");
        std::fs::write(&path, "effective: DISTANT_FORK\n").unwrap();
        let open = std::fs::File::open(&path).unwrap();
        assert!(holds_file_under(me, &dir));
        drop(open);
        assert!(!holds_file_under(me, &dir));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Stack of the test's vfork child.
    #[repr(align(16))]
    struct ChildStack([u8; 64 * 1024]);

    extern "C" fn read_one_byte(fd: *mut libc::c_void) -> libc::c_int {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local of this function's own stack.
        unsafe { libc::read(fd as usize as libc::c_int, (&mut byte as *mut u8).cast(), 1) };
        0
    }

    /// A process in `vfork` (`clone` with CLONE_VM | CLONE_VFORK, as
    /// posix_spawn and shells do) whose child blocks before exec on a
    /// pipe, made in a forked process of its own.
    #[test]
    fn a_parent_waiting_in_vfork_is_seen_and_not_once_its_child_exits() {
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (r, w) = (read_end.as_raw_fd(), write_end.as_raw_fd());
        // SAFETY: fork has no memory-safety preconditions; its child does
        // only what the block below says.
        let parent = unsafe { libc::fork() };
        assert!(parent >= 0, "fork");
        if parent == 0 {
            // SAFETY: in the forked child, only async-signal-safe calls:
            // close, clone (its child runs `read_one_byte` on a stack array
            // that outlives it, as CLONE_VFORK waits for its exit) and _exit.
            unsafe {
                libc::close(w);
                let mut stack = ChildStack([0; 64 * 1024]);
                let top = stack.0.as_mut_ptr().add(stack.0.len());
                libc::clone(
                    read_one_byte,
                    top.cast(),
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    r as usize as *mut libc::c_void,
                );
                libc::_exit(0);
            }
        }
        drop(read_end);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let child = loop {
            let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .unwrap_or_default();
            if let Some(c) = kids.split_whitespace().next().and_then(|c| c.parse().ok()) {
                break c;
            }
            assert!(std::time::Instant::now() < deadline, "no vfork child");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(in_vfork(&[parent, child]), Some((parent, child)));
        assert_eq!(in_vfork(&[child]), None, "its parent is not of the job");
        let why = not_dumpable_now(&[parent, child], None).expect("a reason");
        assert!(why.contains("vfork"), "{why}");

        drop(write_end);
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(parent), None).unwrap();
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0)),
            "{status:?}"
        );
        let me = std::process::id() as i32;
        assert_eq!(in_vfork(&[me]), None, "a process alone");
    }
}
