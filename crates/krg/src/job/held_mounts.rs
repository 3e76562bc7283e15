//! The mounts in a job's mount namespace that a node it moves to or
//! restarts on must have at the same mount points.
//!
//! A job's mount namespace is a copy of its node's, taken when it started.
//! CRIU binds each mount of the node's again from the same path on the
//! restoring node (`auto_ext_mnt`) and fails where that path is missing
//! (`Can't stat mountpoint`, `mount-v2.c`), after the job was frozen. Nodes
//! differ in the mounts that come and go: a logged-in user's
//! `/run/user/UID`, a removable disk, a container's overlay, another
//! namespace's pin. So the target is asked, with the job's files
//! ([`super::needed_files`]):
//!
//! - a mount of the node's the target lacks is left behind by a move
//!   (CRIU's `skip_mnt`): the job keeps what it uses, which is a needed
//!   file the target must have (its absence refuses the move), and loses a
//!   mount it does not use, as a job started on the target never had it.
//!   Mounts below a missing mount point are missing there too, and left
//!   behind with it. A restart cannot leave one behind (the images hold
//!   the whole namespace): a node that lacks one is refused;
//! - a file system not among the node's mounts (one a root job mounted
//!   itself, or one the node has unmounted since the job started: the
//!   job's copy is private) is in the images, but its mount point, when
//!   on a mount of the node's, must be on the target: one that is not
//!   refuses the move (its contents would be lost).
//!
//! Left out: the root (every node has one), the job's own /proc and what
//! is bound over it (remade by the restore), the node's own mounts that
//! `criu::dump` never dumps, and mounts on mounts the job made (in the
//! images with their parent).

use super::needed_files::{NeededFile, Use};
use crate::mountinfo::Mount;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// The mount points the target of a job whose init is `init_pid` must
/// have; none when its mounts cannot be read (the job is ending).
pub fn of_job(init_pid: i32) -> Vec<NeededFile> {
    let Ok(job) = crate::mountinfo::read(format!("/proc/{init_pid}/mountinfo")) else {
        return Vec::new();
    };
    let node_devices = super::needed_files::node_devices();
    let is_dir = |point: &str| {
        std::fs::metadata(format!("/proc/{init_pid}/root{point}")).map_or(true, |m| m.is_dir())
    };
    needed(&job, &node_devices, is_dir)
}

/// The mount points of `job` (a mountinfo) to ask about; `node_devices`
/// are the devices of the node's mounts; `is_dir` tells a directory
/// mount point of the job's own from a file's.
fn needed(
    job: &[Mount],
    node_devices: &HashSet<libc::dev_t>,
    is_dir: impl Fn(&str) -> bool,
) -> Vec<NeededFile> {
    let by_id: HashMap<u32, &Mount> = job.iter().map(|m| (m.id, m)).collect();
    let of_node = |m: &Mount| node_devices.contains(&m.device);
    job.iter()
        .filter(|m| m.mount_point != "/" && !Path::new(&m.mount_point).starts_with("/proc"))
        .filter(|m| !crate::criu::dump::is_node_local(m))
        .filter(|m| m.mount_point.len() <= super::needed_files::PATH_BYTES_MAX)
        .filter_map(|m| {
            let how = if of_node(m) {
                Use::HoldsMount
            } else if by_id.get(&m.parent).is_none_or(|p| of_node(p)) {
                Use::MadeMount
            } else {
                return None;
            };
            // Only the job's own mount points are looked at: a stat may
            // hang on a node's network file system that went away.
            Some(NeededFile {
                path: m.mount_point.clone(),
                dir: how == Use::HoldsMount || is_dir(&m.mount_point),
                size: None,
                how,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "\
200 199 254:0 / / rw - ext4 /dev/vda rw\n\
201 200 0:24 / /run rw - tmpfs tmpfs rw\n\
202 201 0:60 / /run/user/1000 rw - tmpfs tmpfs rw\n\
203 201 0:4 net:[4026532177] /run/netns/x rw - nsfs nsfs rw\n\
204 200 0:90 / /proc rw - proc proc rw\n\
205 204 0:43 /cpuinfo /proc/cpuinfo ro - fuse krg-view ro\n\
206 201 0:91 / /run/scratch rw - tmpfs none rw\n\
207 206 0:92 / /run/scratch/inner rw - tmpfs none rw\n\
208 200 254:0 /etc/hosts.lab /etc/hosts rw - ext4 /dev/vda rw\n\
209 200 254:0 /srv/p /procfs rw - ext4 /dev/vda rw\n";

    #[test]
    fn asks_for_the_node_s_mounts_and_where_the_job_mounted_on_them() {
        let job = crate::mountinfo::parse(JOB);
        let node: HashSet<libc::dev_t> = [(254, 0), (0, 24), (0, 60), (0, 4), (0, 43)]
            .into_iter()
            .map(|(a, b)| libc::makedev(a, b))
            .collect();
        let asked = needed(&job, &node, |p| p != "/run/scratch");
        let got: Vec<(&str, Use, bool)> = asked
            .iter()
            .map(|f| (f.path.as_str(), f.how, f.dir))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/run", Use::HoldsMount, true),
                ("/run/user/1000", Use::HoldsMount, true),
                ("/run/scratch", Use::MadeMount, false),
                ("/etc/hosts", Use::HoldsMount, true),
                ("/procfs", Use::HoldsMount, true),
            ],
            "not the root, the namespace pin, the job's /proc and what is over it (by whole components), nor a mount on the job's own"
        );
        assert!(asked.iter().all(|f| f.size.is_none()));
    }

    #[test]
    fn a_process_of_this_node_holds_its_mounts() {
        let asked = of_job(std::process::id() as i32);
        assert!(
            asked.iter().all(|f| f.how == Use::HoldsMount),
            "the test's own mounts are all the node's: {asked:?}"
        );
        assert!(of_job(i32::MAX).is_empty(), "no such process");
    }
}
