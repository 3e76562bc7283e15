//! `lab.json`: what a lab made (index, nodes, cgroups, daemon pids, binary
//! paths), and the index reservations under `/run/krg-lab/.index/`.
//!
//! The record is rewritten whole (temp file, then rename) under an flock on
//! `lab.lock`, so that several `krg lab` commands may work on one lab at once
//! and a reader never sees half a file.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::names::{Names, RUN_DIR};

/// The version of the `lab.json` layout; bump it when a field changes meaning.
pub const RECORD_VERSION: u32 = 1;
/// A `lab.json` larger than this is not one we wrote.
const RECORD_BYTES_MAX: u64 = 1 << 20;
/// Indexes run from 0 to 255: the third byte of the lab's subnet.
const INDEX_COUNT: u16 = 256;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabRecord {
    pub version: u32,
    pub name: String,
    pub index: u8,
    pub nodes: u32,
    pub krgd: PathBuf,
    pub krg: PathBuf,
    pub krgd_args: Vec<String>,
    /// Empty, or one CPU limit (in CPUs) per node.
    pub cpu_limits: Vec<f64>,
    /// The lab's cgroup (`.../krg-lab/<name>`) in each hierarchy used.
    pub cgroup_dirs: Vec<PathBuf>,
    /// How long `start` waits for a daemon to be ready.
    pub wait_timeout_ms: u64,
    pub node: Vec<NodeRecord>,
    pub created_unix_s: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub k: u32,
    /// The daemon's pid and its start time (in clock ticks after boot, as in
    /// /proc/PID/stat) so that a reused pid is not taken for the daemon.
    pub pid: Option<u32>,
    pub start_time: Option<u64>,
}

impl LabRecord {
    pub fn node(&self, k: u32) -> Result<&NodeRecord> {
        self.node
            .iter()
            .find(|n| n.k == k)
            .ok_or_else(|| no_such_node(k, self.nodes))
    }

    pub fn node_mut(&mut self, k: u32) -> Result<&mut NodeRecord> {
        let nodes = self.nodes;
        self.node
            .iter_mut()
            .find(|n| n.k == k)
            .ok_or_else(|| no_such_node(k, nodes))
    }

    pub fn cpu_limit(&self, k: u32) -> Option<f64> {
        let i = usize::try_from(k).ok()?.checked_sub(1)?;
        self.cpu_limits.get(i).copied()
    }
}

pub fn no_such_node(k: u32, nodes: u32) -> anyhow::Error {
    let plural = if nodes == 1 { "" } else { "s" };
    anyhow!("krg lab: node {k} does not exist (the lab has {nodes} node{plural})")
}

/// Read a lab's record; `Ok(None)` when the lab has none (never made, or
/// removed, or `up` failed before writing it).
pub fn read(names: &Names) -> Result<Option<LabRecord>> {
    let path = names.record_path();
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("krg lab: cannot read {}", path.display()))
        }
    };
    let mut text = String::new();
    file.take(RECORD_BYTES_MAX + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("krg lab: cannot read {}", path.display()))?;
    if text.len() as u64 > RECORD_BYTES_MAX {
        bail!(
            "krg lab: {} is larger than {RECORD_BYTES_MAX} bytes",
            path.display()
        );
    }
    let record: LabRecord = serde_json::from_str(&text)
        .with_context(|| format!("krg lab: {} is not a lab record", path.display()))?;
    if record.version != RECORD_VERSION {
        bail!(
            "krg lab: {} has version {} but this krg reads version {RECORD_VERSION}",
            path.display(),
            record.version
        );
    }
    Ok(Some(record))
}

/// Write a lab's record whole: temp file, fsync, rename.
pub fn write(names: &Names, record: &LabRecord) -> Result<()> {
    let path = names.record_path();
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(record).expect("a lab record always serializes");
    let mut file =
        File::create(&tmp).with_context(|| format!("krg lab: cannot write {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .with_context(|| format!("krg lab: cannot write {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("krg lab: cannot write {}", path.display()))
}

/// Read, change and write a lab's record while holding its lock.
pub fn update<T>(
    names: &Names,
    change: impl FnOnce(&mut LabRecord) -> Result<T>,
) -> Result<(LabRecord, T)> {
    let _lock = lock(names)?;
    let mut record = read(names)?.ok_or_else(|| {
        anyhow!(
            "krg lab: lab {} has no record (was it removed?)",
            names.name()
        )
    })?;
    let value = change(&mut record)?;
    write(names, &record)?;
    Ok((record, value))
}

fn lock(names: &Names) -> Result<Flock<File>> {
    let path = names.lock_path();
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("krg lab: cannot open {}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| anyhow!("krg lab: cannot lock {}: {errno}", path.display()))
}

fn index_dir() -> PathBuf {
    PathBuf::from(RUN_DIR).join(".index")
}

/// Reserve the first free index for the lab `name`: the file
/// `.index/<index>`, created exclusively, holds the lab's name.
pub fn allocate_index(name: &str) -> Result<u8> {
    let dir = index_dir();
    create_dir_all_racy(&dir)?;
    for index in 0..INDEX_COUNT {
        let index = u8::try_from(index).expect("INDEX_COUNT is 256");
        let path = dir.join(index.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(name.as_bytes())
                    .with_context(|| format!("krg lab: cannot write {}", path.display()))?;
                return Ok(index);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("krg lab: cannot create {}", path.display()))
            }
        }
    }
    bail!("krg lab: all {INDEX_COUNT} lab indexes are taken (remove old labs with `krg lab down --all`)")
}

/// Every (index, lab name) reservation.
pub fn reservations() -> Vec<(u8, String)> {
    let Ok(entries) = fs::read_dir(index_dir()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(index) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u8>().ok())
        else {
            continue;
        };
        if let Ok(owner) = fs::read_to_string(entry.path()) {
            found.push((index, owner));
        }
    }
    found.sort();
    found
}

/// Free every index reserved by the lab `name`.
pub fn free_indexes(name: &str) -> Result<()> {
    for (index, owner) in reservations() {
        if owner == name {
            let path = index_dir().join(index.to_string());
            remove_file_if_present(&path)?;
        }
    }
    Ok(())
}

/// Remove `/run/krg-lab/.index` and `/run/krg-lab` when nothing is left in
/// them. Another lab may be starting at the same moment: its creation
/// retries (see `create_dir_all_racy`), and our removal gives up quietly.
pub fn remove_run_dir_if_empty() {
    let _ = fs::remove_dir(index_dir());
    let _ = fs::remove_dir(RUN_DIR);
}

/// `create_dir_all`, retried when a concurrent `down` removes an empty parent
/// between our steps.
pub fn create_dir_all_racy(dir: &Path) -> Result<()> {
    const ATTEMPTS_MAX: u32 = 10;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match fs::create_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound && attempt < ATTEMPTS_MAX => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("krg lab: cannot create {}", dir.display()))
            }
        }
    }
}

pub fn remove_file_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("krg lab: cannot remove {}", path.display())),
    }
}

/// Names of the labs that have a directory under `/run/krg-lab`.
pub fn lab_dirs() -> Vec<String> {
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| super::names::validate_name(n).is_ok())
        .collect();
    names.sort();
    names
}
