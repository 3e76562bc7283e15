//! A job's cgroup: created below krgd's own (so a lab node's jobs stay in
//! that node's cgroup), used for accounting, signalling every process of
//! the job, and freezing; removed when the job ends. Cgroup v1 (one
//! directory per controller) and v2 (one directory).

use crate::probe::cgroup::own_dir;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// v1 hierarchies a job gets a directory in. Only the freezer: moving a
/// process into a v1 cgroup costs milliseconds each (the kernel waits for
/// an RCU grace period), and a job needs only one cgroup to be listed,
/// signalled and frozen as a whole. CPU time and memory are read from the
/// job's processes; CPU and memory limits stay those of krgd's own cgroups.
const V1_CONTROLLERS: [&str; 1] = ["freezer"];
/// Time allowed for a job's processes to vanish before its cgroup is removed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

fn is_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

#[derive(Debug)]
pub struct JobCgroup {
    /// One directory per hierarchy (several on v1, one on v2).
    pub dirs: Vec<PathBuf>,
    v2: bool,
}

impl JobCgroup {
    /// Creates `<krgd's cgroup>/krg-jobs/<name>` in every hierarchy.
    pub fn create(name: &str) -> std::io::Result<JobCgroup> {
        let v2 = is_v2();
        let mut dirs: Vec<PathBuf> = Vec::new();
        let controllers: &[&str] = if v2 { &[""] } else { &V1_CONTROLLERS };
        for ctrl in controllers {
            let Some(base) = own_dir(ctrl) else { continue };
            let Ok(base) = base.canonicalize() else {
                continue;
            };
            let dir = base.join("krg-jobs").join(name);
            if dirs.contains(&dir) {
                continue;
            }
            fs::create_dir_all(&dir)?;
            dirs.push(dir);
        }
        if dirs.is_empty() {
            return Err(std::io::Error::other(
                "krgd has no cgroup to create jobs in",
            ));
        }
        Ok(JobCgroup { dirs, v2 })
    }

    /// Re-opens an existing job cgroup (after a restore).
    pub fn existing(dirs: Vec<PathBuf>) -> JobCgroup {
        JobCgroup { dirs, v2: is_v2() }
    }

    fn dir_with(&self, file: &str) -> Option<PathBuf> {
        self.dirs.iter().map(|d| d.join(file)).find(|p| p.exists())
    }

    /// Every pid in the job.
    pub fn pids(&self) -> Vec<i32> {
        let Some(procs) = self.dir_with("cgroup.procs") else {
            return vec![];
        };
        fs::read_to_string(procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// CPU time used by the job, in nanoseconds: of its live processes,
    /// plus what its init collected from the ones it reaped (krg-init, pid
    /// 1 of the job, reaps every process of the job in the end).
    pub fn cpu_ns(&self, init: i32) -> u64 {
        if self.v2 {
            let text = self
                .dir_with("cpu.stat")
                .and_then(|p| fs::read_to_string(p).ok())
                .unwrap_or_default();
            if let Some(us) = text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                return us * 1000;
            }
        }
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
            .unwrap_or(100)
            .max(1);
        let ticks: u64 = self
            .pids()
            .iter()
            .map(|&pid| proc_ticks(pid, pid == init))
            .sum();
        ticks * 1_000_000_000 / hz
    }

    /// Resident memory of the job's processes, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        if self.v2 {
            if let Some(v) = self
                .dir_with("memory.current")
                .and_then(|p| fs::read_to_string(p).ok())
                .and_then(|t| t.trim().parse().ok())
            {
                return v;
            }
        }
        self.pids()
            .iter()
            .filter_map(|pid| fs::read_to_string(format!("/proc/{pid}/statm")).ok())
            .filter_map(|t| {
                t.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
            .sum::<u64>()
            * page_size()
    }

    /// Freezes or thaws every process of the job, and waits (up to 2 s)
    /// until the kernel says it is done: a dump, or a look at the job's
    /// descriptors, needs it still.
    pub fn set_frozen(&self, frozen: bool) -> std::io::Result<()> {
        let (control, value, state, done) = if self.v2 {
            let control = self.dir_with("cgroup.freeze");
            let events = self.dir_with("cgroup.events");
            let Some((control, events)) = control.zip(events) else {
                return Err(std::io::Error::other("no cgroup.freeze"));
            };
            let done = if frozen { "frozen 1" } else { "frozen 0" };
            (control, if frozen { "1" } else { "0" }, events, done)
        } else {
            let Some(p) = self.dir_with("freezer.state") else {
                return Err(std::io::Error::other(
                    "the freezer controller is not available",
                ));
            };
            let want = if frozen { "FROZEN" } else { "THAWED" };
            (p.clone(), want, p, want)
        };
        fs::write(&control, value)?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let reached = || {
            fs::read_to_string(&state)
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == done)
        };
        while !reached() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Sends a signal to every process of the job.
    pub fn signal_all(&self, sig: i32) {
        signal_pids(&self.pids(), sig);
    }

    /// Kills everything in the job, freezing first so nothing forks away.
    pub fn kill_all(&self) {
        let frozen = self.set_frozen(true).is_ok();
        self.signal_all(libc::SIGKILL);
        if frozen {
            let _ = self.set_frozen(false);
        }
    }

    /// Removes the directories once the job's processes are gone (kills
    /// stragglers first); bounded in time.
    pub fn remove(&self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while !self.pids().is_empty() && Instant::now() < deadline {
            self.kill_all();
            std::thread::sleep(Duration::from_millis(10));
        }
        for d in &self.dirs {
            while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if d.exists() {
                tracing::warn!(dir = %d.display(), "could not remove a job cgroup");
            }
        }
    }
}

/// Sends `sig` to each of `pids`; a pid that has gone meanwhile is skipped.
pub fn signal_pids(pids: &[i32], sig: i32) {
    for &pid in pids {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// utime + stime of a process (and, for the job's init, what it reaped).
fn proc_ticks(pid: i32, with_children: bool) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0;
    };
    // After the command name: state is field 3; utime 14, stime 15,
    // cutime 16, cstime 17 (1-based, as in proc(5)).
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let get = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let own = get(14) + get(15);
    if with_children {
        own + get(16) + get(17)
    } else {
        own
    }
}
