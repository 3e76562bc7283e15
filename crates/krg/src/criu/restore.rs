//! Restoring a job's tree from its images.
//!
//! The options [`opts`] sets (see `docs/criu.md`):
//!
//! - `root /` and `auto_ext_mnt`: the job's mount namespace is rebuilt on
//!   the node's root, its external mounts bound from the same paths (CRIU
//!   refuses to restore a mount namespace without a root);
//! - `inherit_fd {key, fd}` for each recorded external pipe or terminal:
//!   CRIU opens the restored file from our fd (which the `criu` child
//!   inherits at the same number) instead of making a new pipe;
//! - `rst_sibling`: the restored root is created with `CLONE_PARENT`, so it
//!   becomes our child and not `criu`'s (the RPC always detaches);
//! - `lazy_pages`: memory comes from the lazy-pages daemon listening in the
//!   work directory;
//! - `orphan_pts_master` when asked;
//! - `manage_cgroups_mode IGNORE` by default: `criu` first joins the
//!   target's cgroups for the job ([`RestoreRequest::join_cgroups`]) and
//!   the restored tree stays in them, as a new job stays in those
//!   `krg-init --cgroup` joins (`cg_root` remaps are there for the other
//!   modes).
//!
//! The network namespace is not in the images (the job shared its node's):
//! the restored job lands in the one `criu` runs in, which is the calling
//! thread's or [`RestoreRequest::netns`].

use std::fs::File;
use std::path::Path;

use protobuf::MessageField;
use rust_criu::rust_criu_protobuf::rpc::{
    Cgroup_root, Criu_opts, Criu_req, Criu_req_type, Inherit_fd,
};

use super::rpc::{self, Call};
use super::{stats, Action, CriuError, RestoreOutcome, RestoreRequest};

pub fn run(binary: &Path, req: &RestoreRequest) -> Result<RestoreOutcome, CriuError> {
    run_when(binary, req, || true)
}

/// Starts `criu swrk` for the restore at once but sends it the request
/// only once `go` returns true (the lazy-pages daemon the restore connects
/// to is ready): CRIU's start-up overlaps the daemon's. `go` returning
/// false calls the restore off (and kills that `criu`).
pub fn run_when(
    binary: &Path,
    req: &RestoreRequest,
    go: impl FnOnce() -> bool,
) -> Result<RestoreOutcome, CriuError> {
    let mut keys = std::collections::HashSet::new();
    for inherit in &req.inherit {
        if !keys.insert(inherit.key) {
            return Err(CriuError::Invalid(format!(
                "{} is given twice in inherit_fd",
                inherit.key
            )));
        }
    }
    let images = rpc::open_dir(&req.images_dir, "cannot open the images directory")?;
    let work = rpc::open_dir(req.work_dir(), "cannot open the work directory")?;
    let netns = req
        .netns
        .as_deref()
        .map(|path| {
            File::open(path).map_err(|source| CriuError::Io {
                what: "cannot open the network namespace",
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    let log = req.work_dir().join("restore.log");
    let mut msg = Criu_req::new();
    msg.set_type(Criu_req_type::RESTORE);
    msg.opts = MessageField::some(opts(req, &images, &work, "restore.log"));
    let call = Call {
        action: Action::Restore,
        target: req.target(),
        log: Some(log.clone()),
        inherit: req.inherit.iter().map(|i| i.fd).collect(),
        netns: netns.as_ref(),
        join_cgroups: rpc::cgroup_procs(&req.join_cgroups)?,
        timeout: req.timeout,
        notices: req.notices.as_ref(),
        page_server_port: None,
    };
    tracing::info!(images = %req.images_dir.display(), lazy = req.lazy_pages, "criu restore");
    let started = rpc::start(binary, &call)?;
    if !go() {
        return Err(CriuError::Invalid(format!(
            "the restore of {} was called off before it started",
            call.target
        )));
    }
    let reply = rpc::call_on(started, &msg, &call)?;
    if !reply.resp.success() {
        return Err(rpc::failure(&call, &reply.resp));
    }
    let pid = reply.resp.restore.pid();
    if pid <= 0 {
        return Err(CriuError::Protocol {
            action: Action::Restore,
            target: req.target(),
            detail: format!("a successful restore answered with pid {pid}"),
        });
    }
    Ok(RestoreOutcome {
        pid,
        duration: reply.duration,
        notices: reply.notices,
        stats: stats::read_restore(req.work_dir()),
        pts_master: reply.pts_master,
        log,
    })
}

pub fn opts(req: &RestoreRequest, images: &File, work: &File, log_name: &str) -> Criu_opts {
    let mut opts = rpc::base_opts(images, work, log_name, req.log_level);
    opts.set_root(req.root.to_string_lossy().into_owned());
    opts.set_auto_ext_mnt(true);
    if req.sibling {
        opts.set_rst_sibling(true);
    }
    for inherit in &req.inherit {
        let mut entry = Inherit_fd::new();
        entry.set_key(inherit.key.to_string());
        entry.set_fd(inherit.fd);
        opts.inherit_fd.push(entry);
    }
    opts.set_manage_cgroups_mode(rpc::cg_mode(req.manage_cgroups));
    for root in &req.cgroup_roots {
        let mut entry = Cgroup_root::new();
        if let Some(controller) = &root.controller {
            entry.set_ctrl(controller.clone());
        }
        entry.set_path(root.path.to_string_lossy().into_owned());
        opts.cg_root.push(entry);
    }
    if req.lazy_pages {
        opts.set_lazy_pages(true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::{ExternalKey, InheritFd};

    #[test]
    fn opts_map_new_pipes_to_recorded_keys() {
        let dir = File::open("/").expect("open /");
        let mut req = RestoreRequest::new("/tmp/x");
        req.inherit = vec![
            InheritFd {
                key: ExternalKey::Pipe { inode: 11 },
                fd: 40,
            },
            InheritFd {
                key: ExternalKey::Pipe { inode: 12 },
                fd: 41,
            },
        ];
        req.lazy_pages = true;
        let o = opts(&req, &dir, &dir, "restore.log");
        let pairs: Vec<(String, i32)> = o
            .inherit_fd
            .iter()
            .map(|i| (i.key().to_owned(), i.fd()))
            .collect();
        assert_eq!(
            pairs,
            vec![("pipe:[11]".to_owned(), 40), ("pipe:[12]".to_owned(), 41)]
        );
        assert_eq!(o.root(), "/");
        assert!(o.auto_ext_mnt());
        assert!(o.rst_sibling());
        assert!(o.lazy_pages());
    }

    #[test]
    fn refuses_a_key_given_twice() {
        let mut req = RestoreRequest::new("/tmp/x");
        let key = ExternalKey::Pipe { inode: 11 };
        req.inherit = vec![InheritFd { key, fd: 40 }, InheritFd { key, fd: 41 }];
        let err = run(Path::new("/nonexistent/criu"), &req).expect_err("refused");
        assert!(
            err.to_string().contains("pipe:[11] is given twice"),
            "{err}"
        );
    }
}
