//! Jobs: process trees started through krg, wherever they run.
//!
//! - `home`: the deputy side on the node where the job was launched (relays
//!   the user's streams, keeps the job's record, log and exit status);
//! - `body`: the execution side (krg-init, cgroup, pipes or pty);
//! - `link`: the stream connection between the two when they are on
//!   different nodes.

pub mod body;
pub mod caps;
pub mod cgroup;
pub mod cgroup_moves;
pub mod deputy_link;
pub mod fdio;
pub mod gpid;
pub mod held_mounts;
pub mod home;
pub mod init_pool;
pub mod link;
pub mod migrate;
pub mod needed_files;
pub mod ops;
pub mod place;
pub mod quiesce;
pub mod reap;
pub mod restore;
pub mod spare_link;
pub mod spawn;
pub mod spec;
pub mod status;
pub mod stdio;
pub mod work_dir;

use crate::wire::stream::ExitStatus;
use body::BodyCtl;
use home::Deputy;
use krg_types::{Gpid, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Stopped,
    /// Its execution node went down.
    Lost,
    /// Saved and stopped; `krg restart` brings it back.
    Checkpointed,
    Exited,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Stopped => "stopped",
            JobState::Lost => "lost",
            JobState::Checkpointed => "checkpointed",
            JobState::Exited => "exited",
        }
    }
}

/// One line of `krg ps`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobInfo {
    pub gpid: Gpid,
    pub uid: u32,
    pub user: String,
    pub home: NodeId,
    /// Where the body runs (or last ran).
    pub node: Option<NodeId>,
    pub state: JobState,
    pub cpu_ns: u64,
    pub rss_bytes: u64,
    pub started_ms: u64,
    pub command: String,
    pub exit: Option<ExitStatus>,
    /// Reported by the node that runs the body (not by a deputy's record).
    pub from_body: bool,
}

/// The jobs this node knows: bodies it runs and deputies it keeps.
#[derive(Default)]
pub struct JobTable {
    bodies: Mutex<HashMap<Gpid, Arc<BodyCtl>>>,
    deputies: Mutex<HashMap<Gpid, Arc<Deputy>>>,
    /// Bodies restored here, waiting for their deputy side to reattach.
    attach: Mutex<HashMap<Gpid, body::BodyLink>>,
}

impl JobTable {
    pub fn bodies_insert(&self, ctl: Arc<BodyCtl>) {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ctl.gpid, ctl);
    }

    pub fn bodies_remove(&self, gpid: Gpid) {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gpid);
    }

    pub fn body(&self, gpid: Gpid) -> Option<Arc<BodyCtl>> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gpid)
            .cloned()
    }

    pub fn bodies(&self) -> Vec<Arc<BodyCtl>> {
        self.bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub fn body_count(&self) -> usize {
        self.bodies.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn attach_slot_put(&self, gpid: Gpid, link: body::BodyLink) {
        self.attach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(gpid, link);
    }

    pub fn attach_slot_take(&self, gpid: Gpid) -> Option<body::BodyLink> {
        self.attach
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gpid)
    }

    pub fn deputy_insert(&self, d: Arc<Deputy>) {
        let forgotten = {
            let mut deps = self.deputies.lock().unwrap_or_else(|p| p.into_inner());
            let forgotten = home::prune_finished(&mut deps, crate::node::now_ms());
            deps.insert(d.gpid, d);
            forgotten
        };
        for log in forgotten {
            if let Err(e) = std::fs::remove_file(&log) {
                tracing::debug!(log = %log.display(), error = %e, "cannot remove a forgotten job's log");
            }
        }
    }

    pub fn deputy(&self, gpid: Gpid) -> Option<Arc<Deputy>> {
        self.deputies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&gpid)
            .cloned()
    }

    pub fn deputies(&self) -> Vec<Arc<Deputy>> {
        self.deputies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
