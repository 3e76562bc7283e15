//! The lab's cgroups: `krg-lab/<name>/n<K>` for each node, in the v1
//! hierarchies cpu, cpuacct, memory, pids and freezer, or in the one unified
//! hierarchy of a cgroup v2 machine.
//!
//! On v1 the lab's tree sits below this process's own cgroup in each
//! hierarchy (so a lab started from a limited session stays inside that
//! session's limits); on v2 it sits at the root of the hierarchy, since v2
//! enables controllers for children only in cgroups without processes of
//! their own. The directories used are recorded in `lab.json`.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The mount point of a pure cgroup v2 system.
const V2_ROOT: &str = "/sys/fs/cgroup";
/// The v1 controllers a node's cgroup is made in.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// The v2 controllers enabled for the lab's cgroups (when available).
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// The directory below a base cgroup holding every lab.
const LABS_DIR: &str = "krg-lab";
/// CPU limits use this period (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel refuses quotas below 1 ms.
const CPU_QUOTA_US_MIN: u64 = 1_000;
/// A walk of a cgroup tree stops after this many directories: a lab's tree
/// is small, and a bigger one means something else is going on.
const TREE_DIRS_MAX: usize = 100_000;
/// How long a freeze may take before tasks are killed anyway.
const FREEZE_WAIT: Duration = Duration::from_secs(1);
const POLL: Duration = Duration::from_millis(10);

/// Whether this machine runs the unified (v2) hierarchy only.
pub fn is_v2() -> bool {
    Path::new(V2_ROOT).join("cgroup.controllers").exists()
}

/// A cgroup hierarchy: where it is mounted, and this process's own cgroup in
/// it.
#[derive(Debug)]
struct Hierarchy {
    mount: PathBuf,
    own: PathBuf,
}

/// The hierarchies the lab uses, with this process's cgroup in each.
fn hierarchies() -> Result<Vec<Hierarchy>> {
    let own_paths = own_cgroup_paths()?;
    if is_v2() {
        let own = own_paths
            .iter()
            .find(|(controllers, _)| controllers.is_empty())
            .map(|(_, path)| join_rel(Path::new(V2_ROOT), path))
            .unwrap_or_else(|| PathBuf::from(V2_ROOT));
        return Ok(vec![Hierarchy {
            mount: PathBuf::from(V2_ROOT),
            own,
        }]);
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("krg lab: cannot read /proc/self/mountinfo")?;
    let mut found: Vec<Hierarchy> = Vec::new();
    for controller in V1_CONTROLLERS {
        let Some((mount, root)) = v1_mount(&mountinfo, controller) else {
            bail!("krg lab: no cgroup v1 hierarchy has the {controller} controller (see /proc/self/mountinfo)");
        };
        if found.iter().any(|h| h.mount == mount) {
            continue; // cpu and cpuacct are often mounted together
        }
        let own_path = own_paths
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == controller))
            .map(|(_, path)| path.clone())
            .unwrap_or_else(|| "/".to_string());
        // In a container the mount's root may be a cgroup below the real root.
        let relative = Path::new(&own_path)
            .strip_prefix(&root)
            .unwrap_or(Path::new(""));
        let own = join_rel(&mount, &relative.to_string_lossy());
        found.push(Hierarchy { mount, own });
    }
    Ok(found)
}

/// The (controllers, path) lines of /proc/self/cgroup.
fn own_cgroup_paths() -> Result<Vec<(Vec<String>, String)>> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .context("krg lab: cannot read /proc/self/cgroup")?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, ':');
            let _id = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect())
}

/// The mount point and mount root of the v1 hierarchy holding `controller`.
fn v1_mount(mountinfo: &str, controller: &str) -> Option<(PathBuf, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let _source = right.next()?;
        let super_options = right.next()?;
        if fstype != "cgroup" || !super_options.split(',').any(|o| o == controller) {
            return None;
        }
        let left: Vec<&str> = left.split(' ').collect();
        Some((PathBuf::from(left.get(4)?), PathBuf::from(left.get(3)?)))
    })
}

fn join_rel(base: &Path, path: &str) -> PathBuf {
    base.join(path.trim_start_matches('/'))
}

/// Where the lab `name`'s cgroups go, one directory per hierarchy.
pub fn lab_dirs(name: &str) -> Result<Vec<PathBuf>> {
    let v2 = is_v2();
    Ok(hierarchies()?
        .into_iter()
        .map(|h| if v2 { &h.mount } else { &h.own }.join(LABS_DIR).join(name))
        .collect())
}

/// Every place the lab `name`'s cgroups may be (below the root and below
/// this process's cgroup, in each hierarchy), for cleaning up a lab whose
/// record is lost.
pub fn candidate_lab_dirs(name: &str) -> Vec<PathBuf> {
    let mut found = BTreeSet::new();
    for h in hierarchies().unwrap_or_default() {
        found.insert(h.mount.join(LABS_DIR).join(name));
        found.insert(h.own.join(LABS_DIR).join(name));
    }
    found.into_iter().collect()
}

/// The names of the labs that have cgroups (in any candidate place).
pub fn lab_names() -> Vec<String> {
    let mut found = BTreeSet::new();
    for h in hierarchies().unwrap_or_default() {
        for base in [&h.mount, &h.own] {
            let Ok(entries) = fs::read_dir(base.join(LABS_DIR)) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.path().is_dir() {
                    if let Ok(name) = entry.file_name().into_string() {
                        found.insert(name);
                    }
                }
            }
        }
    }
    found.into_iter().collect()
}

/// Create the lab's cgroups (and, on v2, enable the controllers for the
/// levels below).
pub fn create_lab(dirs: &[PathBuf]) -> Result<()> {
    for dir in dirs {
        super::record::create_dir_all_racy(dir)?;
        if is_v2() {
            let labs = dir.parent().expect("a lab cgroup has a parent");
            let root = labs.parent().expect("krg-lab has a parent");
            for level in [root, labs, dir.as_path()] {
                enable_v2_controllers(level);
            }
        }
    }
    Ok(())
}

/// Enable what we can of the v2 controllers for `dir`'s children; a missing
/// one only costs its limits (a CPU limit then fails with a clear error).
fn enable_v2_controllers(dir: &Path) {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    for controller in V2_CONTROLLERS {
        if available.split_whitespace().any(|c| c == controller) {
            let _ = fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
        }
    }
}

/// Node K's cgroup in each hierarchy.
pub fn node_dirs(lab_dirs: &[PathBuf], k: u32) -> Vec<PathBuf> {
    lab_dirs.iter().map(|d| d.join(format!("n{k}"))).collect()
}

/// Create node K's cgroups (again, if `start` finds them gone) and set its
/// CPU limit.
pub fn create_node(lab_dirs: &[PathBuf], k: u32, cpu_limit: Option<f64>) -> Result<Vec<PathBuf>> {
    let dirs = node_dirs(lab_dirs, k);
    for dir in &dirs {
        fs::create_dir_all(dir)
            .with_context(|| format!("krg lab: cannot create cgroup {}", dir.display()))?;
    }
    if let Some(limit) = cpu_limit {
        set_cpu_limit(&dirs, limit)
            .with_context(|| format!("krg lab: cannot limit node {k} to {limit} CPUs"))?;
    }
    Ok(dirs)
}

/// The quota giving `limit` CPUs over `CPU_PERIOD_US`.
pub fn cpu_quota_us(limit: f64) -> u64 {
    assert!(limit.is_finite() && limit > 0.0);
    let quota = (CPU_PERIOD_US as f64 * limit).round();
    // Bounded by validate_cpu_limits: at most 64 CPUs, so it fits easily.
    (quota as u64).max(CPU_QUOTA_US_MIN)
}

fn set_cpu_limit(dirs: &[PathBuf], limit: f64) -> Result<()> {
    let quota = cpu_quota_us(limit);
    for dir in dirs {
        if dir.join("cpu.cfs_quota_us").exists() {
            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
            return Ok(());
        }
        if dir.join("cpu.max").exists() {
            return write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"));
        }
    }
    Err(anyhow!(
        "no cgroup of the node has cpu.cfs_quota_us or cpu.max (is the cpu controller enabled?)"
    ))
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("cannot write {value:?} to {}", path.display()))
}

/// Every directory of the trees rooted at `dirs` (parents before children).
fn walk(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = dirs.iter().filter(|d| d.is_dir()).cloned().collect();
    while let Some(dir) = pending.pop() {
        if found.len() >= TREE_DIRS_MAX {
            break;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    pending.push(entry.path());
                }
            }
        }
        found.push(dir);
    }
    found.sort_by_key(|d| d.components().count());
    found
}

/// The processes in the trees rooted at `dirs`.
pub fn pids_in_trees(dirs: &[PathBuf]) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for dir in walk(dirs) {
        if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids
}

/// Kill every process in the trees rooted at `dirs` and wait until they are
/// gone: freeze (so none can fork while we kill), SIGKILL each, thaw, repeat
/// until empty. On v2 with `cgroup.kill`, the kernel does it.
pub fn kill_trees(dirs: &[PathBuf], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let me = std::process::id();
    loop {
        let pids = pids_in_trees(dirs);
        if pids.is_empty() {
            return Ok(());
        }
        if pids.contains(&me) {
            bail!("krg lab: this process is inside the cgroups it was asked to kill (run it from outside the node)");
        }
        if Instant::now() >= deadline {
            bail!("krg lab: processes {pids:?} are still in the cgroups after {timeout:?}");
        }
        let tree = walk(dirs);
        let killers: Vec<&PathBuf> = tree
            .iter()
            .filter(|d| d.join("cgroup.kill").exists())
            .collect();
        if let Some(top) = killers.first() {
            // cgroup.kill kills the whole subtree, frozen or not.
            let _ = fs::write(top.join("cgroup.kill"), "1");
            for dir in killers.iter().skip(1) {
                let _ = fs::write(dir.join("cgroup.kill"), "1");
            }
        } else {
            freeze(&tree, true);
            for pid in pids_in_trees(dirs) {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            freeze(&tree, false);
        }
        thread::sleep(POLL);
    }
}

/// Freeze (or thaw) every cgroup in `tree` and, when freezing, wait
/// (bounded) until the kernel reports them frozen. Thawing goes to every
/// level because v1 keeps a cgroup frozen that was frozen by itself (krgd
/// freezes jobs), and a frozen task does not die of SIGKILL until thawed.
fn freeze(tree: &[PathBuf], frozen: bool) {
    for dir in tree {
        if dir.join("freezer.state").exists() {
            let _ = fs::write(
                dir.join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            );
        } else if dir.join("cgroup.freeze").exists() {
            let _ = fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" });
        }
        if !frozen {
            continue;
        }
        let deadline = Instant::now() + FREEZE_WAIT;
        while Instant::now() < deadline && !is_frozen(dir) {
            thread::sleep(POLL);
        }
    }
}

fn is_frozen(dir: &Path) -> bool {
    if let Ok(state) = fs::read_to_string(dir.join("freezer.state")) {
        return state.trim() == "FROZEN";
    }
    if let Ok(events) = fs::read_to_string(dir.join("cgroup.events")) {
        return events.lines().any(|l| l.trim() == "frozen 1");
    }
    true // no freezer here: nothing to wait for
}

/// Remove the empty cgroups below `dir` (and `dir` itself when
/// `include_self`), deepest first, retrying while the kernel still counts
/// exiting tasks.
pub fn remove_tree(dir: &Path, include_self: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut tree = walk(&[dir.to_path_buf()]);
    if !include_self {
        tree.retain(|d| d != dir);
    }
    for d in tree.iter().rev() {
        loop {
            match fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    thread::sleep(POLL);
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("krg lab: cannot remove cgroup {}", d.display()))
                }
            }
        }
    }
    Ok(())
}

/// Remove `krg-lab` above a lab's cgroup when no other lab uses it.
pub fn remove_labs_dir_if_empty(lab_dir: &Path) {
    if let Some(labs) = lab_dir.parent() {
        let _ = fs::remove_dir(labs);
    }
}

/// The cgroup.procs files of node K (written "0" to move the writer in).
pub fn procs_files(node_dirs: &[PathBuf]) -> Vec<PathBuf> {
    node_dirs.iter().map(|d| d.join("cgroup.procs")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_follow_limits() {
        assert_eq!(cpu_quota_us(0.25), 25_000);
        assert_eq!(cpu_quota_us(1.0), 100_000);
        assert_eq!(cpu_quota_us(2.5), 250_000);
        assert_eq!(cpu_quota_us(0.001), CPU_QUOTA_US_MIN);
    }

    #[test]
    fn v1_mounts_are_found() {
        let mountinfo = "\
35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:9 - cgroup cgroup rw,cpu,cpuacct
36 25 0:31 /docker/abc /sys/fs/cgroup/memory rw shared:10 - cgroup cgroup rw,memory
";
        assert_eq!(
            v1_mount(mountinfo, "cpuacct"),
            Some((
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"),
                PathBuf::from("/")
            ))
        );
        assert_eq!(
            v1_mount(mountinfo, "memory"),
            Some((
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/docker/abc")
            ))
        );
        assert_eq!(v1_mount(mountinfo, "pids"), None);
    }
}
