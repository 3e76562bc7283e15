//! The view's FUSE file system (fuser).
//!
//! ```text
//! /cpuinfo /meminfo /loadavg /stat /uptime     the cluster as one machine
//! /cpu/online                                  0-N over every CPU
//! /nodes/<id>/{cpuinfo,meminfo,loadavg,stat,uptime,state}
//! /jobs/<gpid>/{status,cmdline,caps}           gpid as HOME:SEQ (caps: jobs here)
//! ```
//!
//! Files are rendered when opened and read from that copy (direct I/O, size
//! 0 as in /proc), so one reader sees one consistent text.

use super::render::{self, ProcTexts};
use super::{Snapshot, ViewCache};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, Request,
};
use krg_types::{Gpid, NodeId};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const TTL: Duration = Duration::from_secs(1);
/// Files held open at once; beyond this, opens fail with EMFILE.
const OPEN_FILES_MAX: usize = 4096;

const ROOT: u64 = 1;
const TOP_FILES: [(&str, u64); 5] = [
    ("cpuinfo", 2),
    ("meminfo", 3),
    ("loadavg", 4),
    ("stat", 5),
    ("uptime", 6),
];
const CPU_DIR: u64 = 7;
const CPU_ONLINE: u64 = 8;
const NODES_DIR: u64 = 9;
const JOBS_DIR: u64 = 10;
const NODE_BASE: u64 = 0x1000_0000;
const NODE_FILES: [&str; 6] = ["cpuinfo", "meminfo", "loadavg", "stat", "uptime", "state"];
const JOB_BASE: u64 = 1 << 40;
const JOB_FILES: [&str; 3] = ["status", "cmdline", "caps"];

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    Top(usize),
    Online,
    NodeDir(NodeId),
    NodeFile(NodeId, usize),
    JobDir(Gpid),
    JobFile(Gpid, usize),
}

fn classify(ino: u64) -> Option<Entry> {
    match ino {
        ROOT | CPU_DIR | NODES_DIR | JOBS_DIR => Some(Entry::Dir),
        2..=6 => Some(Entry::Top((ino - 2) as usize)),
        CPU_ONLINE => Some(Entry::Online),
        i if (NODE_BASE..JOB_BASE).contains(&i) => {
            let rel = i - NODE_BASE;
            let id = NodeId::new(rel / 16).ok()?;
            match rel % 16 {
                0 => Some(Entry::NodeDir(id)),
                f if (f as usize) <= NODE_FILES.len() => Some(Entry::NodeFile(id, f as usize - 1)),
                _ => None,
            }
        }
        i if i >= JOB_BASE => {
            let rel = i - JOB_BASE;
            let gpid = Gpid::from_raw(rel / 4).ok()?;
            match rel % 4 {
                0 => Some(Entry::JobDir(gpid)),
                f if (f as usize) <= JOB_FILES.len() => Some(Entry::JobFile(gpid, f as usize - 1)),
                _ => None,
            }
        }
        _ => None,
    }
}

fn node_dir_ino(id: NodeId) -> u64 {
    NODE_BASE + id.as_u64() * 16
}

fn job_dir_ino(g: Gpid) -> u64 {
    JOB_BASE + g.raw() * 4
}

fn exists(e: Entry, s: &Snapshot, cache: &ViewCache) -> bool {
    match e {
        Entry::NodeDir(id) | Entry::NodeFile(id, _) => s.states.iter().any(|(n, _)| *n == id),
        Entry::JobDir(g) | Entry::JobFile(g, _) => {
            s.jobs.iter().any(|j| j.gpid == g) || cache.caps(g).is_some()
        }
        _ => true,
    }
}

fn all_texts(s: &Snapshot) -> Vec<&ProcTexts> {
    s.nodes.iter().map(|(_, t)| t.as_ref()).collect()
}

fn top_file(i: usize, texts: &[&ProcTexts]) -> String {
    match i {
        0 => render::cpuinfo(texts),
        1 => render::meminfo(texts),
        2 => render::loadavg(texts),
        3 => render::stat(texts),
        _ => render::uptime(texts),
    }
}

fn content(e: Entry, s: &Snapshot, cache: &ViewCache) -> Option<String> {
    Some(match e {
        Entry::Dir | Entry::NodeDir(_) | Entry::JobDir(_) => return None,
        Entry::Top(i) => top_file(i, &all_texts(s)),
        Entry::Online => render::online(s.nodes.iter().map(|(_, t)| t.cpu_count().max(1)).sum()),
        Entry::NodeFile(id, 5) => {
            let st = s.states.iter().find(|(n, _)| *n == id)?.1;
            format!("{st}\n")
        }
        Entry::NodeFile(id, i) => match s.nodes.iter().find(|(n, _)| *n == id) {
            Some((_, t)) => top_file(i, &[t.as_ref()]),
            None => String::new(),
        },
        Entry::JobFile(g, 2) => format!("{}\n", cache.caps(g)?),
        Entry::JobFile(g, 0) => {
            let j = s.jobs.iter().find(|j| j.gpid == g)?;
            format!(
                "Gpid:\t{}\nUser:\t{}\nUid:\t{}\nHome:\t{}\nNode:\t{}\nState:\t{}\nCpuSeconds:\t{:.2}\nRss:\t{}\nStarted:\t{}\n",
                j.gpid,
                j.user,
                j.uid,
                j.home,
                j.node.map_or_else(|| "-".into(), |n| n.to_string()),
                j.state.as_str(),
                j.cpu_ns as f64 / 1e9,
                j.rss_bytes,
                j.started_ms
            )
        }
        Entry::JobFile(g, _) => {
            let j = s.jobs.iter().find(|j| j.gpid == g)?;
            let mut t = j.command.replace(' ', "\0");
            t.push('\0');
            t
        }
    })
}

fn children(ino: u64, s: &Snapshot, cache: &ViewCache) -> Option<Vec<(u64, FileType, String)>> {
    let mut out = Vec::new();
    match classify(ino)? {
        Entry::Dir if ino == ROOT => {
            for (name, i) in TOP_FILES {
                out.push((i, FileType::RegularFile, name.to_string()));
            }
            out.push((CPU_DIR, FileType::Directory, "cpu".into()));
            out.push((NODES_DIR, FileType::Directory, "nodes".into()));
            out.push((JOBS_DIR, FileType::Directory, "jobs".into()));
        }
        Entry::Dir if ino == CPU_DIR => {
            out.push((CPU_ONLINE, FileType::RegularFile, "online".into()))
        }
        Entry::Dir if ino == NODES_DIR => {
            for (id, _) in &s.states {
                out.push((node_dir_ino(*id), FileType::Directory, id.to_string()));
            }
        }
        Entry::Dir => {
            let mut gpids: Vec<Gpid> = s.jobs.iter().map(|j| j.gpid).collect();
            gpids.extend(cache.local_gpids());
            gpids.sort();
            gpids.dedup();
            for g in gpids {
                out.push((job_dir_ino(g), FileType::Directory, g.to_string()));
            }
        }
        Entry::NodeDir(id) => {
            for (i, name) in NODE_FILES.iter().enumerate() {
                out.push((
                    node_dir_ino(id) + 1 + i as u64,
                    FileType::RegularFile,
                    (*name).to_string(),
                ));
            }
        }
        Entry::JobDir(g) => {
            let here = cache.caps(g).is_some();
            for (i, name) in JOB_FILES.iter().enumerate().filter(|(i, _)| *i < 2 || here) {
                out.push((
                    job_dir_ino(g) + 1 + i as u64,
                    FileType::RegularFile,
                    (*name).to_string(),
                ));
            }
        }
        _ => return None,
    }
    Some(out)
}

fn attr(ino: u64, dir: bool) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: if dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if dir { 0o555 } else { 0o444 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

pub struct ViewFs {
    cache: Arc<ViewCache>,
    open: Mutex<HashMap<u64, Arc<Vec<u8>>>>,
    next_fh: AtomicU64,
}

impl ViewFs {
    pub fn new(cache: Arc<ViewCache>) -> Self {
        ViewFs {
            cache,
            open: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }
    }
}

impl Filesystem for ViewFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = self.cache.peek();
        let Some(kids) = children(parent.0, &s, &self.cache) else {
            return reply.error(Errno::ENOENT);
        };
        match kids.into_iter().find(|(_, _, n)| OsStr::new(n) == name) {
            Some((ino, kind, _)) => {
                reply.entry(&TTL, &attr(ino, kind == FileType::Directory), Generation(0))
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let Some(e) = classify(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let dir = matches!(e, Entry::Dir | Entry::NodeDir(_) | Entry::JobDir(_));
        if matches!(e, Entry::Dir | Entry::Top(_) | Entry::Online)
            || exists(e, &self.cache.peek(), &self.cache)
        {
            reply.attr(&TTL, &attr(ino.0, dir));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EACCES);
        }
        let Some(e) = classify(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let s = self.cache.get();
        let Some(text) = content(e, &s, &self.cache) else {
            return reply.error(Errno::ENOENT);
        };
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= OPEN_FILES_MAX {
            return reply.error(Errno::EMFILE);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        open.insert(fh, Arc::new(text.into_bytes()));
        reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let data = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        let Some(data) = data else {
            return reply.error(Errno::EBADF);
        };
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        reply.data(&data[start..end]);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.cache.peek();
        let Some(kids) = children(ino.0, &s, &self.cache) else {
            return reply.error(Errno::ENOENT);
        };
        let mut all = vec![
            (ino.0, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        all.extend(kids);
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Mounts the view at `dir` (read-only, every user may read), after
/// clearing a dead mount a crashed krgd may have left there.
pub fn mount(
    dir: &std::path::Path,
    cache: Arc<ViewCache>,
) -> std::io::Result<fuser::BackgroundSession> {
    if std::fs::metadata(dir).is_err() {
        // ENOTCONN from a dead FUSE mount, or the directory is missing.
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
    }
    std::fs::create_dir_all(dir)?;
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("krg-view".into()),
        fuser::MountOption::Subtype("krg".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(2);
    fuser::spawn_mount(ViewFs::new(cache), dir, &config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        let n = NodeId::new(4095).unwrap();
        assert_eq!(classify(node_dir_ino(n)), Some(Entry::NodeDir(n)));
        assert_eq!(classify(node_dir_ino(n) + 6), Some(Entry::NodeFile(n, 5)));
        let g = Gpid::new(n, (1 << 22) - 1).unwrap();
        assert_eq!(classify(job_dir_ino(g)), Some(Entry::JobDir(g)));
        assert_eq!(classify(job_dir_ino(g) + 2), Some(Entry::JobFile(g, 1)));
        assert_eq!(classify(CPU_ONLINE), Some(Entry::Online));
        assert_eq!(classify(0), None);
    }
}
