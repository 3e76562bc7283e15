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
/// Time allowed to the kernel to freeze or thaw a job (a fraction of a
/// millisecond unless one of its processes sleeps where it cannot be
/// frozen, such as a wait on a FUSE server).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a freeze may take before the kernel is asked again.
const REFREEZE_AFTER: Duration = Duration::from_millis(10);

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

    /// Freezes or thaws every process of the job, and waits (up to
    /// [`FREEZE_TIMEOUT`]) until the kernel says it is done: a dump, or a
    /// look at the job's descriptors, needs it still. A job that does not
    /// freeze in time is thawed again and the error says so; one that does
    /// not thaw in time is an error too. Blocks the calling thread.
    pub fn set_frozen(&self, frozen: bool) -> std::io::Result<()> {
        let (control, [freeze, thaw], state, done) = if self.v2 {
            let control = self.dir_with("cgroup.freeze");
            let events = self.dir_with("cgroup.events");
            let Some((control, events)) = control.zip(events) else {
                return Err(std::io::Error::other("no cgroup.freeze"));
            };
            let done = if frozen { "frozen 1" } else { "frozen 0" };
            (control, ["1", "0"], events, done)
        } else {
            let Some(p) = self.dir_with("freezer.state") else {
                return Err(std::io::Error::other(
                    "the freezer controller is not available",
                ));
            };
            let done = if frozen { "FROZEN" } else { "THAWED" };
            (p.clone(), ["FROZEN", "THAWED"], p, done)
        };
        fs::write(&control, if frozen { freeze } else { thaw })?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        let mut asked = Instant::now();
        let reached = || {
            fs::read_to_string(&state)
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim() == done)
        };
        while !reached() {
            if frozen && asked.elapsed() >= REFREEZE_AFTER {
                // The v1 freezer stops each task once, when asked: one
                // that was then on its way into a wait it can be frozen
                // in (a shell's vfork, its child just frozen) is missed,
                // and the cgroup stays FREEZING until asked again.
                tracing::debug!(cgroup = %control.display(), "freeze asked again");
                let _ = fs::write(&control, freeze);
                asked = Instant::now();
            }
            if Instant::now() >= deadline {
                if frozen {
                    // Half frozen, the job would stay stopped: let it go.
                    let _ = fs::write(&control, thaw);
                }
                let secs = FREEZE_TIMEOUT.as_secs();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    if frozen {
                        format!("its processes did not all stop within {secs} s: one may be waiting on a device or a file system that does not answer")
                    } else {
                        format!("its processes did not all resume within {secs} s")
                    },
                ));
            }
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
    let Some(rest) = crate::procfs::stat_after_name(pid) else {
        return 0;
    };
    // From the state, field 3: utime 14, stime 15, cutime 16, cstime 17
    // (1-based, as in proc(5)).
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Child, Command, Stdio};

    /// A cgroup of its own (v1 freezer or v2), removed when dropped.
    struct TestCgroup(JobCgroup);

    impl TestCgroup {
        fn make() -> Option<TestCgroup> {
            let name = format!("krg-test-freeze-{}", std::process::id());
            let dir = if is_v2() {
                Path::new("/sys/fs/cgroup").join(name)
            } else {
                Path::new("/sys/fs/cgroup/freezer").join(name)
            };
            fs::create_dir(&dir).ok()?;
            Some(TestCgroup(JobCgroup::existing(vec![dir])))
        }
    }

    impl Drop for TestCgroup {
        fn drop(&mut self) {
            let _ = self.0.set_frozen(false);
            self.0.signal_all(libc::SIGKILL);
            let deadline = Instant::now() + DRAIN_TIMEOUT;
            while !self.0.pids().is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = fs::remove_dir(&self.0.dirs[0]);
        }
    }

    /// A FUSE mount whose server never answers, in a mount namespace of
    /// its own, and two processes of `cgroup` stuck on it: one in a
    /// lookup (a freezable wait, holding the directory's lock), one in a
    /// mkdir waiting for that lock (an uninterruptible sleep the freezer
    /// cannot stop). The mount's holder ends when its stdin closes, which
    /// aborts the connection and lets both go.
    fn stuck_on_fuse(cgroup: &JobCgroup) -> Child {
        let procs = cgroup.dir_with("cgroup.procs").expect("cgroup.procs");
        let script = format!(
            r#"exec 3<>/dev/fuse
mount -i -t fuse -o fd=3,rootmode=40000,user_id=0,group_id=0 krg-test /mnt || exit 1
sh -c 'exec 3>&-; echo $$ > {procs}; exec stat /mnt/a' >/dev/null 2>&1 &
n=0; until grep -q fuse /proc/$!/wchan 2>/dev/null || [ $n -ge 500 ]; do sleep 0.01; n=$((n+1)); done
sh -c 'exec 3>&-; echo $$ > {procs}; exec mkdir /mnt/b' >/dev/null 2>&1 &
echo mounted
read _"#,
            procs = procs.display()
        );
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "mounted", "the FUSE mount was not made");
        // Both in the cgroup, both asleep in the kernel.
        let deadline = Instant::now() + Duration::from_secs(10);
        // Asleep where meant, not merely in D: a process just exec'd is
        // in D while its pages are read, and one frozen there before it
        // reaches the lock lets the cgroup freeze.
        let asleep = || {
            let pids = cgroup.pids();
            let waits: Vec<String> = pids
                .iter()
                .filter(|p| {
                    fs::read_to_string(format!("/proc/{p}/stat"))
                        .is_ok_and(|s| s.rfind(") D").is_some())
                })
                .map(|p| fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default())
                .collect();
            let on_the_lock = |w: &String| w.contains("filename_create") || w.contains("rwsem");
            pids.len() == 2
                && waits.len() == 2
                && waits.iter().any(|w| w.contains("fuse"))
                && waits.iter().any(on_the_lock)
        };
        while !asleep() {
            assert!(Instant::now() < deadline, "the processes did not get stuck");
            std::thread::sleep(Duration::from_millis(10));
        }
        holder
    }

    #[test]
    fn a_job_that_cannot_freeze_is_reported_and_left_running() {
        if !nix::unistd::geteuid().is_root() || !Path::new("/dev/fuse").exists() {
            eprintln!("needs root and /dev/fuse; skipped");
            return;
        }
        let Some(cg) = TestCgroup::make() else {
            eprintln!("no freezer cgroup can be made here; skipped");
            return;
        };
        let mut holder = stuck_on_fuse(&cg.0);

        let err = cg.0.set_frozen(true).expect_err("a stuck job froze");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
        assert!(err.to_string().contains("did not all stop"), "{err}");
        let (file, thawed) = if cg.0.v2 {
            ("cgroup.freeze", "0")
        } else {
            ("freezer.state", "THAWED")
        };
        let state = fs::read_to_string(cg.0.dir_with(file).unwrap()).unwrap();
        assert_eq!(state.trim(), thawed, "the job was left half frozen");

        // Once the server is gone, both finish: nothing was left stopped.
        holder.stdin.take().unwrap().write_all(b"\n").unwrap();
        holder.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cg.0.pids().is_empty() {
            assert!(Instant::now() < deadline, "the processes did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
