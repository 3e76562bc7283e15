//! Probes of this node's load, sampled by the gossip task about once a second.
//!
//! Two scopes: `system` reads the machine's /proc (a real node), `cgroup`
//! counts only the tasks in krgd's own cgroup subtree (lab nodes, which share
//! one machine: each node must see its own load, not its neighbours').

pub mod cgroup;
pub mod helpers;

use crate::gossip::NodeLoad;
use std::fs;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadScope {
    System,
    Cgroup,
}

/// Samples load over time (the cgroup scope keeps its own averages).
pub struct Prober {
    scope: LoadScope,
    averages: LoadAverages,
    hostname: String,
}

impl Prober {
    pub fn new(scope: LoadScope) -> Self {
        Prober {
            scope,
            averages: LoadAverages::default(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// One sample; call about once a second.
    pub fn sample(&mut self, jobs: u32) -> NodeLoad {
        let cpus = online_cpus();
        let capacity = cgroup::cpu_capacity().map_or(f64::from(cpus), |c| c.min(f64::from(cpus)));
        let (mem_total, mem_free) = meminfo();
        let (mem_total, mem_free) = match cgroup::memory_limit() {
            Some(limit) if limit < mem_total => {
                let used = cgroup::memory_usage().unwrap_or(0);
                (limit, limit.saturating_sub(used).min(mem_free))
            }
            _ => (mem_total, mem_free),
        };
        let (load1, load5, load15, runnable) = match self.scope {
            LoadScope::System => {
                let (l1, l5, l15, r) = system_loadavg();
                self.averages.update(f64::from(r));
                (l1, l5, l15, r)
            }
            LoadScope::Cgroup => {
                let r = cgroup::runnable_tasks();
                self.averages.update(f64::from(r));
                (self.averages.l1, self.averages.l5, self.averages.l15, r)
            }
        };
        let load_short = self.averages.short;
        NodeLoad {
            cpus,
            capacity,
            load1,
            load5,
            load15,
            runnable,
            load_short,
            mem_total,
            mem_free,
            jobs,
            version: krg_types::KRG_VERSION.to_string(),
            hostname: self.hostname.clone(),
        }
    }
}

/// Exponentially decayed averages of runnable tasks, sampled every second,
/// with the kernel's 1, 5 and 15 minute time constants.
#[derive(Default)]
struct LoadAverages {
    short: f64,
    l1: f64,
    l5: f64,
    l15: f64,
}

impl LoadAverages {
    fn update(&mut self, n: f64) {
        let step = |avg: f64, secs: f64| {
            let e = (-1.0 / secs).exp();
            avg * e + n * (1.0 - e)
        };
        self.short = step(self.short, 5.0);
        self.l1 = step(self.l1, 60.0);
        self.l5 = step(self.l5, 300.0);
        self.l15 = step(self.l15, 900.0);
    }
}

pub fn online_cpus() -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// (MemTotal, MemAvailable) in bytes.
pub fn meminfo() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Runnable tasks on this node now, as the load probe counts them.
pub fn runnable_now(scope: LoadScope) -> u32 {
    match scope {
        LoadScope::System => system_loadavg().3,
        LoadScope::Cgroup => cgroup::runnable_tasks(),
    }
}

/// The machine's load averages, and its runnable tasks now less the one
/// reading them and krgd's CRIU helpers (`helpers`).
fn system_loadavg() -> (f64, f64, f64, u32) {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace();
    let mut f = || it.next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let (l1, l5, l15) = (f(), f(), f());
    let runnable = text
        .split_whitespace()
        .nth(3)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(0)
        .saturating_sub(1);
    let helpers = helpers::criu_threads()
        .iter()
        .filter(|tid| cgroup::task_is_running(tid))
        .count();
    let runnable = runnable.saturating_sub(u32::try_from(helpers).unwrap_or(u32::MAX));
    (l1, l5, l15, runnable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_average_converges_to_a_steady_load() {
        let mut a = LoadAverages::default();
        for _ in 0..600 {
            a.update(3.0);
        }
        assert!((a.l1 - 3.0).abs() < 0.01, "{}", a.l1);
        assert!(a.l5 > 1.0 && a.l5 < 3.0);
    }

    #[test]
    fn this_machine_has_cpus_and_memory() {
        assert!(online_cpus() >= 1);
        let (total, free) = meminfo();
        assert!(total > 0 && free <= total);
    }
}
