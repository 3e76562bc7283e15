//! Dumping a job's tree (and pre-dumps).
//!
//! The options, in the order [`opts`] sets them (see `docs/criu.md`):
//!
//! - `pid`: the job's init; CRIU dumps its PID, mount and IPC namespaces;
//! - `external mnt[]`: every mount of the job's mount namespace that is a
//!   copy of one of the node's is an auto-detected external mount (a
//!   restore binds it again from the same path), so CRIU does not try to
//!   dump the contents of /sys, /dev, the root file system...;
//! - `skip_mnt` for every `nsfs` mount (`ip netns` and the lab pin other
//!   namespaces by bind-mounting them) and every mount of `krgd`'s FUSE
//!   view: they belong to the node, cannot be dumped or may be gone (a
//!   restarted `krgd`'s view answers ENOTCONN) where the job is restored;
//! - `external tty[RDEV:DEV]` for a pty slave whose master `krgd` holds;
//!   pipes need nothing (CRIU records `pipe:[INODE]` for every pipe);
//! - `leave_running` / `leave_stopped` / nothing (kill);
//! - `freeze_cgroup` when given (the job's v1 freezer cgroup), and
//!   `manage_cgroups_mode IGNORE` by default (`krgd` makes the job's
//!   cgroups on the target itself);
//! - lazy pages: `lazy_pages` and `ps.port`: CRIU serves the memory on that
//!   port after writing the other images, announces `status-ready`, and
//!   answers only when the target has pulled every page;
//! - a page server: `ps.address` and `ps.port`.

use std::fs::File;
use std::path::Path;

use protobuf::MessageField;
use rust_criu::rust_criu_protobuf::rpc::{
    Criu_opts, Criu_page_server_info, Criu_req, Criu_req_type,
};

use super::rpc::{self, Call};
use super::{
    stats, Action, AfterDump, CriuError, DumpKind, DumpOutcome, DumpRequest, MemoryTransfer,
};
use crate::mountinfo::Mount;

/// Mode of the images directory: images hold the job's memory.
pub const IMAGES_DIR_MODE: u32 = 0o700;

/// File system type of namespace files bind-mounted somewhere.
const NSFS: &str = "nsfs";

/// Source name of `krgd`'s FUSE cluster view (`crate::view`).
const VIEW_SOURCE: &str = "krg-view";

/// Runs the dump.
/// Largest deleted-but-open file a dump carries (CRIU's default is 1 MiB).
const GHOST_LIMIT_BYTES: u32 = 64 << 20;

pub fn run(binary: &Path, req: &DumpRequest) -> Result<DumpOutcome, CriuError> {
    run_on(binary, req, None)
}

/// Starts the `criu swrk` of a dump whose request is not known yet (see
/// [`rpc::Started`]); a dump needs nothing of its process but the socket.
pub fn start(binary: &Path) -> Result<rpc::Started, CriuError> {
    rpc::start(binary, &Call::quick(Action::Dump))
}

/// Runs the dump on `ahead`, a `criu swrk` from [`start`], or on a new one.
pub fn run_on(
    binary: &Path,
    req: &DumpRequest,
    ahead: Option<rpc::Started>,
) -> Result<DumpOutcome, CriuError> {
    if req.pid <= 1 {
        return Err(CriuError::Invalid(format!(
            "pid {} is not a job's init on this node",
            req.pid
        )));
    }
    make_images_dir(&req.images_dir)?;
    if req.work_dir.is_some() {
        make_images_dir(req.work_dir())?;
    }
    let images = rpc::open_dir(&req.images_dir, "cannot open the images directory")?;
    let work = rpc::open_dir(req.work_dir(), "cannot open the work directory")?;
    let node_local = node_local_mounts(req.pid).map_err(|source| CriuError::Io {
        what: "cannot read the job's mounts",
        path: format!("/proc/{}/mountinfo", req.pid).into(),
        source,
    })?;
    let (action, log_name) = match req.kind {
        DumpKind::Full => (Action::Dump, "dump.log"),
        DumpKind::PreDump => (Action::PreDump, "pre-dump.log"),
    };
    let log = req.work_dir().join(log_name);
    let mut msg = Criu_req::new();
    msg.set_type(match req.kind {
        DumpKind::Full => Criu_req_type::DUMP,
        DumpKind::PreDump => Criu_req_type::PRE_DUMP,
    });
    msg.opts = MessageField::some(opts(req, &images, &work, log_name, &node_local));
    let call = Call {
        action,
        target: req.target(),
        log: Some(log.clone()),
        inherit: Vec::new(),
        netns: None,
        join_cgroups: Vec::new(),
        timeout: req.timeout,
        notices: req.notices.as_ref(),
        page_server_port: match req.memory {
            MemoryTransfer::Lazy { port } => Some(port),
            _ => None,
        },
    };
    tracing::info!(pid = req.pid, images = %req.images_dir.display(), kind = ?req.kind, after = ?req.after, "criu dump");
    let started = match ahead {
        Some(started) => started,
        None => rpc::start(binary, &call)?,
    };
    let reply = rpc::call_on(started, &msg, &call)?;
    if !reply.resp.success() {
        let err = rpc::failure(&call, &reply.resp);
        return Err(match (req.kind, err) {
            (
                DumpKind::PreDump,
                CriuError::Failed {
                    action,
                    target,
                    reason,
                },
            ) => CriuError::Failed {
                action,
                target,
                reason: format!(
                    "{reason}; hint: pre-dumps need soft-dirty memory tracking (see `Criu::check`)"
                ),
            },
            (_, err) => err,
        });
    }
    // A lazy dump's page server resets CRIU's counters before they are
    // written (CRIU 4.1.1): its frozen time then reads as the host's
    // uptime. Figures longer than the call itself are dropped.
    let stats = stats::read_dump(req.work_dir()).filter(|s| s.frozen_time <= reply.duration);
    Ok(DumpOutcome {
        duration: reply.duration,
        notices: reply.notices,
        stats,
        log,
    })
}

/// The dump's options; `node_local` are the mount points not to dump
/// ([`node_local_mounts`]).
pub fn opts(
    req: &DumpRequest,
    images: &File,
    work: &File,
    log_name: &str,
    node_local: &[String],
) -> Criu_opts {
    let mut opts = rpc::base_opts(images, work, log_name, req.log_level);
    opts.set_pid(req.pid);
    match req.after {
        AfterDump::Kill => {}
        AfterDump::Run => opts.set_leave_running(true),
        AfterDump::Stop => opts.set_leave_stopped(true),
    }
    // A job's binary replaced on disk (krg-init after an upgrade) is a
    // "ghost" file CRIU must carry: allow one of that size.
    opts.set_ghost_limit(GHOST_LIMIT_BYTES);
    opts.external.push("mnt[]".to_owned());
    opts.skip_mnt.extend(node_local.iter().cloned());
    opts.skip_mnt.extend(req.skip_mounts.iter().cloned());
    for key in req.streams.iter().filter(|k| k.needs_declaring()) {
        opts.external.push(key.to_string());
    }
    opts.external.extend(req.externals.iter().cloned());
    match &req.memory {
        MemoryTransfer::Images => {}
        MemoryTransfer::PageServer { address, port } => {
            let mut ps = Criu_page_server_info::new();
            ps.set_address(address.clone());
            ps.set_port(i32::from(*port));
            opts.ps = MessageField::some(ps);
        }
        MemoryTransfer::Lazy { port } => {
            opts.set_lazy_pages(true);
            let mut ps = Criu_page_server_info::new();
            ps.set_port(i32::from(*port));
            opts.ps = MessageField::some(ps);
        }
    }
    if let (Some(tls), false) = (&req.page_tls, req.memory == MemoryTransfer::Images) {
        opts.set_tls(true);
        opts.set_tls_cacert(tls.ca_cert.to_string_lossy().into_owned());
        opts.set_tls_cert(tls.cert.to_string_lossy().into_owned());
        opts.set_tls_key(tls.key.to_string_lossy().into_owned());
        opts.set_tls_no_cn_verify(true);
    }
    if let Some(parent) = &req.parent_images {
        opts.set_parent_img(parent.to_string_lossy().into_owned());
    }
    if req.track_mem {
        opts.set_track_mem(true);
    }
    opts.set_manage_cgroups_mode(rpc::cg_mode(req.manage_cgroups));
    if let Some(cgroup) = &req.freeze_cgroup {
        opts.set_freeze_cgroup(cgroup.to_string_lossy().into_owned());
    }
    if req.orphan_pts_master {
        opts.set_orphan_pts_master(true);
    }
    if req.tcp_established {
        opts.set_tcp_established(true);
    }
    if req.ext_unix_sk {
        opts.set_ext_unix_sk(true);
    }
    if req.file_locks {
        opts.set_file_locks(true);
    }
    if req.mntns_compat_mode {
        opts.set_mntns_compat_mode(true);
    }
    opts
}

/// Creates `dir` (and its parents) with mode 0700, or checks that an
/// existing one is a directory, and makes it 0700.
pub fn make_images_dir(dir: &Path) -> Result<(), CriuError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |what, source| CriuError::Io {
        what,
        path: dir.to_owned(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(IMAGES_DIR_MODE)
        .create(dir)
        .map_err(|err| io("cannot create the images directory", err))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(IMAGES_DIR_MODE))
        .map_err(|err| io("cannot make the images directory private", err))
}

/// The mount points, in the mount namespace of `pid`, of mounts that
/// belong to the node and not to the job, which the job got by copying the
/// node's mounts and which would make a restore fail where they are gone:
/// `nsfs` mounts (namespaces pinned by `ip netns` or the lab) and the
/// mounts of `krgd`'s FUSE view themselves (a job keeps its binds of view
/// files: they are bound again from the target's view).
pub fn node_local_mounts(pid: i32) -> std::io::Result<Vec<String>> {
    let mounts = crate::mountinfo::read(format!("/proc/{pid}/mountinfo"))?;
    Ok(mount_points_where(&mounts, is_node_local))
}

/// Whether `m` is one of the node's own mounts, never dumped.
pub(crate) fn is_node_local(m: &Mount) -> bool {
    m.fstype == NSFS || (m.fstype.starts_with("fuse") && m.source == VIEW_SOURCE && m.root == "/")
}

/// The mount points of the mounts that `keep` selects.
fn mount_points_where(mounts: &[Mount], keep: impl Fn(&Mount) -> bool) -> Vec<String> {
    mounts
        .iter()
        .filter(|m| keep(m))
        .map(|m| m.mount_point.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::ExternalKey;

    const MOUNTINFO: &str = "\
51 50 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
71 51 254:0 /run/netns /run/netns rw,relatime - ext4 /dev/vda rw\n\
72 71 0:4 net:[4026532177] /run/netns/krg-sw rw - nsfs nsfs rw\n\
76 51 0:4 uts:[4026532316] /run/krg\\040lab/n1/uts rw - nsfs nsfs rw\n\
80 53 0:40 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n\
94 51 0:43 / /run/krg/view ro,nosuid - fuse krg-view ro,user_id=0\n\
95 80 0:43 /cpuinfo /proc/cpuinfo ro,nosuid - fuse krg-view ro,user_id=0\n\
96 51 0:50 / /mnt/data rw - fuse.sshfs host:/data rw\n";

    #[test]
    fn finds_node_local_mounts() {
        let parsed = crate::mountinfo::parse;
        let local = |text: &str| mount_points_where(&parsed(text), is_node_local);
        assert_eq!(
            local(MOUNTINFO),
            vec!["/run/netns/krg-sw", "/run/krg lab/n1/uts", "/run/krg/view"]
        );
        assert_eq!(
            mount_points_where(&parsed(MOUNTINFO), |m| m.fstype == "proc"),
            vec!["/proc"]
        );
        assert!(local("garbage line\n").is_empty());
    }

    #[test]
    fn opts_for_a_migration() {
        let images = File::open("/").expect("open /");
        let mut req = DumpRequest::new(4242, "/tmp/x");
        req.streams = vec![
            ExternalKey::Pipe { inode: 7 },
            ExternalKey::Tty {
                rdev: 0x8800,
                dev: 0x1a,
            },
        ];
        req.memory = MemoryTransfer::Lazy { port: 27000 };
        let o = opts(
            &req,
            &images,
            &images,
            "dump.log",
            &["/run/netns/x".to_owned()],
        );
        assert_eq!(o.pid(), 4242);
        assert!(!o.leave_running());
        assert_eq!(o.external, vec!["mnt[]", "tty[8800:1a]"]);
        assert_eq!(o.skip_mnt, vec!["/run/netns/x"]);
        assert!(o.lazy_pages());
        assert_eq!(o.ps.port(), 27000);
        assert!(o.notify_scripts());
        assert_eq!(o.log_file(), "dump.log");
    }

    #[test]
    fn opts_for_a_checkpoint() {
        let images = File::open("/").expect("open /");
        let mut req = DumpRequest::new(4242, "/tmp/x");
        req.after = AfterDump::Run;
        req.memory = MemoryTransfer::PageServer {
            address: "10.0.0.2".to_owned(),
            port: 27001,
        };
        let o = opts(&req, &images, &images, "dump.log", &[]);
        assert!(o.leave_running());
        assert!(!o.lazy_pages());
        assert_eq!(o.ps.address(), "10.0.0.2");
        assert!(o.skip_mnt.is_empty());
    }

    #[test]
    fn pages_go_over_tls_only_from_a_page_server() {
        let images = File::open("/").expect("open /");
        let tls = crate::criu::PageTls::in_state_dir(Path::new("/var/lib/krg"));
        let mut req = DumpRequest::new(4242, "/tmp/x");
        req.page_tls = Some(tls);
        let o = opts(&req, &images, &images, "dump.log", &[]);
        assert!(!o.tls(), "images written here need no TLS");
        req.memory = MemoryTransfer::Lazy { port: 27000 };
        let o = opts(&req, &images, &images, "dump.log", &[]);
        assert!(o.tls());
        assert_eq!(o.tls_cacert(), "/var/lib/krg/ca.crt");
        assert_eq!(o.tls_cert(), "/var/lib/krg/node.crt");
        assert_eq!(o.tls_key(), "/var/lib/krg/node.key");
        assert!(o.tls_no_cn_verify());
    }

    #[test]
    fn refuses_a_pid_that_is_no_job() {
        let err = run(
            Path::new("/nonexistent/criu"),
            &DumpRequest::new(1, "/tmp/x"),
        )
        .expect_err("refused");
        assert!(
            err.to_string().contains("pid 1 is not a job's init"),
            "{err}"
        );
    }
}
