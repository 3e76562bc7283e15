//! What krgd's own cgroup says about the capacity and load of this node.
//!
//! Supports cgroup v1 (this machine, CI) and v2.

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

fn is_v2() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// Our cgroup path within a v1 controller's hierarchy (or the v2 one).
pub fn own_path(controller: &str) -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if is_v2() {
            if ctrls.is_empty() {
                return Some(path.to_string());
            }
        } else if ctrls.split(',').any(|c| c == controller) {
            return Some(path.to_string());
        }
    }
    None
}

/// Directory of our cgroup for a controller.
pub fn own_dir(controller: &str) -> Option<PathBuf> {
    let rel = own_path(controller)?;
    let base = if is_v2() {
        PathBuf::from(ROOT)
    } else {
        PathBuf::from(ROOT).join(controller)
    };
    Some(base.join(rel.trim_start_matches('/')))
}

fn read_num(p: &Path) -> Option<i64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// CPUs allowed by the tightest quota on our cgroup or its ancestors.
pub fn cpu_capacity() -> Option<f64> {
    let mut dir = own_dir("cpu")?;
    let mut best: Option<f64> = None;
    loop {
        let cap = if is_v2() {
            fs::read_to_string(dir.join("cpu.max")).ok().and_then(|t| {
                let mut it = t.split_whitespace();
                let quota = it.next()?;
                let period: f64 = it.next()?.parse().ok()?;
                if quota == "max" {
                    None
                } else {
                    Some(quota.parse::<f64>().ok()? / period)
                }
            })
        } else {
            match (
                read_num(&dir.join("cpu.cfs_quota_us")),
                read_num(&dir.join("cpu.cfs_period_us")),
            ) {
                (Some(q), Some(p)) if q > 0 && p > 0 => Some(q as f64 / p as f64),
                _ => None,
            }
        };
        if let Some(c) = cap {
            best = Some(best.map_or(c, |b: f64| b.min(c)));
        }
        if dir == Path::new(ROOT) || !dir.pop() || !dir.starts_with(ROOT) {
            break;
        }
    }
    best
}

pub fn memory_limit() -> Option<u64> {
    let dir = own_dir("memory")?;
    let v = if is_v2() {
        fs::read_to_string(dir.join("memory.max"))
            .ok()?
            .trim()
            .parse()
            .ok()
    } else {
        read_num(&dir.join("memory.limit_in_bytes")).and_then(|v| u64::try_from(v).ok())
    };
    // v1 reports "no limit" as a huge number.
    v.filter(|&l| l < (1u64 << 60))
}

pub fn memory_usage() -> Option<u64> {
    let dir = own_dir("memory")?;
    let file = if is_v2() {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    read_num(&dir.join(file)).and_then(|v| u64::try_from(v).ok())
}

/// Runnable tasks (state R) in our cgroup subtree, krgd's own threads
/// (the one probing is always running) and its CRIU helpers excepted.
pub fn runnable_tasks() -> u32 {
    let mut own = super::helpers::criu_threads();
    own.extend(super::helpers::threads_of("self"));
    let Some(dir) = own_dir(if is_v2() { "" } else { "cpu" }) else {
        return 0;
    };
    let mut count = 0;
    let mut stack = vec![dir];
    let mut dirs_seen = 0;
    while let Some(d) = stack.pop() {
        dirs_seen += 1;
        if dirs_seen > 10_000 {
            break;
        }
        let tasks = if is_v2() { "cgroup.threads" } else { "tasks" };
        if let Ok(text) = fs::read_to_string(d.join(tasks)) {
            for tid in text.lines() {
                if !own.contains(tid) && task_is_running(tid) {
                    count += 1;
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    stack.push(e.path());
                }
            }
        }
    }
    count
}

pub fn task_is_running(tid: &str) -> bool {
    crate::procfs::stat_after_name(tid)
        .is_some_and(|rest| rest.split_whitespace().next() == Some("R"))
}
