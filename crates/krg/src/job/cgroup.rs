//! A job's cgroup: created below krgd's own (so a lab node's jobs stay in
//! that node's cgroup), used for accounting, signalling every process of
//! the job, and freezing; removed when the job ends. Cgroup v1 (one
//! directory per controller) and v2 (one directory).

use crate::probe::cgroup::own_dir;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// v1 controllers a job gets a directory in, when krgd has one.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
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

    /// CPU time used by the job, in nanoseconds.
    pub fn cpu_ns(&self) -> u64 {
        if self.v2 {
            let text = self
                .dir_with("cpu.stat")
                .and_then(|p| fs::read_to_string(p).ok())
                .unwrap_or_default();
            return text
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(0, |us| us * 1000);
        }
        self.dir_with("cpuacct.usage")
            .and_then(|p| fs::read_to_string(p).ok())
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Resident memory of the job, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        if self.v2 {
            return self
                .dir_with("memory.current")
                .and_then(|p| fs::read_to_string(p).ok())
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
        }
        let stat = self
            .dir_with("memory.stat")
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default();
        let field = |name: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        field("total_rss ").or_else(|| field("rss ")).unwrap_or(0)
    }

    /// Freezes or thaws every process of the job.
    pub fn set_frozen(&self, frozen: bool) -> std::io::Result<()> {
        if self.v2 {
            let Some(p) = self.dir_with("cgroup.freeze") else {
                return Err(std::io::Error::other("no cgroup.freeze"));
            };
            return fs::write(p, if frozen { "1" } else { "0" });
        }
        let Some(p) = self.dir_with("freezer.state") else {
            return Err(std::io::Error::other(
                "the freezer controller is not available",
            ));
        };
        fs::write(&p, if frozen { "FROZEN" } else { "THAWED" })?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let want = if frozen { "FROZEN" } else { "THAWED" };
        while fs::read_to_string(&p).unwrap_or_default().trim() != want && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Sends a signal to every process of the job.
    pub fn signal_all(&self, sig: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(pid, sig);
            }
        }
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
