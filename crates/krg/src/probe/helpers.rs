//! The threads of the CRIU processes krgd runs for a move (dump, restore,
//! page server, lazy-pages daemon). They are the work of the move and end
//! with it: counted as load they made a node that had just received a job
//! look busier by two or three tasks, and its balancer sent a job away
//! again.

use std::collections::HashSet;
use std::fs;

/// Processes visited at most (a bound on the walk, not a limit krg needs).
const VISIT_MAX: usize = 4096;

/// Thread ids (as /proc names them) of CRIU processes below krgd: krgd's
/// children named `criu` and, below them, their children named `criu`.
/// A job's processes (krg-init and what it runs, restored tasks once they
/// have their own names) are not descended into.
pub fn criu_threads() -> HashSet<String> {
    let mut found = HashSet::new();
    let mut stack = children_of("self");
    let mut visited = 0;
    while let Some(pid) = stack.pop() {
        visited += 1;
        if visited > VISIT_MAX {
            break;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim_end() != "criu" {
            continue;
        }
        found.extend(threads_of(&pid));
        stack.extend(children_of(&pid));
    }
    found
}

/// Thread ids of process `pid` (or `self`), as /proc names them.
pub fn threads_of(pid: &str) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Children of every thread of `pid` (`/proc/PID/task/TID/children`).
fn children_of(pid: &str) -> Vec<String> {
    threads_of(pid)
        .iter()
        .filter_map(|tid| fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn spawn_named(dir: &std::path::Path, name: &str) -> Child {
        let path = dir.join(name);
        fs::copy("/bin/sleep", &path).expect("copy sleep");
        Command::new(path).arg("30").spawn().expect("spawn")
    }

    #[test]
    fn finds_criu_children_and_no_other() {
        let dir = std::env::temp_dir().join(format!("krg-helpers-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("scratch dir");
        let mut criu = spawn_named(&dir, "criu");
        let mut other = spawn_named(&dir, "sleep");
        // Command::spawn returns once the child has exec'd: comm is set.
        let found = criu_threads();
        for c in [&mut criu, &mut other] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&dir);
        assert!(found.contains(&criu.id().to_string()), "{found:?}");
        assert!(!found.contains(&other.id().to_string()), "{found:?}");
    }
}
