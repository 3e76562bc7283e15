//! Freezing a job at a moment CRIU can dump it.
//!
//! The job's processes read files of `krgd`'s cluster view (krg-preload
//! reads `jobs/<gpid>/caps` at every exec of a forked child). The view is
//! the node's, not the job's: a dump skips its mount, and CRIU refuses a
//! descriptor open on it (`Can't lookup mount=84 for fd=3
//! path=…/view/jobs/1:4/caps`, seen in CI on a shell loop). Such a
//! descriptor lives for one read, so a job frozen holding one is thawed and
//! frozen again a moment later.

use std::path::Path;
use std::time::Duration;

use super::cgroup::JobCgroup;

/// Freeze attempts before giving up on a job that keeps a view file open.
const ATTEMPTS: u32 = 20;

/// How long a job runs between two attempts (a read of the view is a
/// FUSE round trip to `krgd`: tens of microseconds).
const RUN_BETWEEN: Duration = Duration::from_millis(2);

/// Freezes `cgroup` with none of its processes holding a file under
/// `view` (when the job sees one). On failure the job is left thawed.
pub async fn freeze(cgroup: &JobCgroup, view: Option<&Path>) -> Result<(), String> {
    let mut attempts = 0;
    loop {
        cgroup.set_frozen(true).map_err(|e| e.to_string())?;
        let Some(view) = view else { return Ok(()) };
        let holder = cgroup
            .pids()
            .into_iter()
            .find(|p| holds_file_under(*p, view));
        let Some(pid) = holder else { return Ok(()) };
        let _ = cgroup.set_frozen(false);
        attempts += 1;
        if attempts == ATTEMPTS {
            return Err(format!(
                "its process {pid} keeps a file of the cluster view ({}) open, which CRIU cannot dump; close it and try again",
                view.display()
            ));
        }
        tokio::time::sleep(RUN_BETWEEN).await;
    }
}

/// Has process `pid` a descriptor open on a file under `dir`?
fn holds_file_under(pid: i32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
