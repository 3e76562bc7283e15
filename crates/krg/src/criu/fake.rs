//! A recording [`Criu`] for tests without root: it remembers each request,
//! answers from a script, and touches nothing.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    Action, AfterDump, CheckReport, Criu, CriuError, CriuVersion, DumpKind, DumpOutcome,
    DumpRequest, ExternalKey, LazyPages, LazyPagesRequest, MemoryTransfer, Notice, RestoreOutcome,
    RestoreRequest, Target,
};

/// One request the fake got, with what matters of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    Check,
    Dump {
        pid: i32,
        images_dir: PathBuf,
        kind: DumpKind,
        after: AfterDump,
        memory: MemoryTransfer,
        streams: Vec<ExternalKey>,
    },
    Restore {
        images_dir: PathBuf,
        inherit: Vec<ExternalKey>,
        netns: Option<PathBuf>,
        lazy_pages: bool,
    },
    LazyPages {
        images_dir: PathBuf,
        address: String,
        port: u16,
    },
}

/// The fake. Calls succeed unless a failure was queued with
/// [`FakeCriu::fail_next`]; restores answer pids from `restored_pid` up.
#[derive(Debug)]
pub struct FakeCriu {
    pub report: CheckReport,
    calls: Mutex<Vec<Recorded>>,
    failures: Mutex<VecDeque<String>>,
    next_pid: Mutex<i32>,
}

impl FakeCriu {
    pub fn new() -> FakeCriu {
        FakeCriu {
            report: CheckReport {
                version: CriuVersion {
                    major: 4,
                    minor: 1,
                    sublevel: 1,
                    gitid: None,
                },
                check: Ok(()),
                mem_dirty_track: false,
                lazy_pages: true,
                pidfd_store: true,
            },
            calls: Mutex::new(Vec::new()),
            failures: Mutex::new(VecDeque::new()),
            next_pid: Mutex::new(10_000),
        }
    }

    /// The next dump, restore or lazy-pages call fails with `reason`.
    pub fn fail_next(&self, reason: &str) {
        self.failures
            .lock()
            .expect("fake lock")
            .push_back(reason.to_owned());
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Recorded> {
        self.calls.lock().expect("fake lock").clone()
    }

    fn record(&self, call: Recorded) {
        self.calls.lock().expect("fake lock").push(call);
    }

    fn failure(&self, action: Action, target: Target) -> Result<(), CriuError> {
        match self.failures.lock().expect("fake lock").pop_front() {
            Some(reason) => Err(CriuError::Failed {
                action,
                target,
                reason,
            }),
            None => Ok(()),
        }
    }

    fn notice(script: &str, pid: i32) -> Notice {
        Notice {
            script: script.to_owned(),
            pid,
            at: Instant::now(),
        }
    }
}

impl Default for FakeCriu {
    fn default() -> Self {
        FakeCriu::new()
    }
}

impl Criu for FakeCriu {
    fn check(&self) -> Result<CheckReport, CriuError> {
        self.record(Recorded::Check);
        Ok(self.report.clone())
    }

    fn dump(&self, req: &DumpRequest) -> Result<DumpOutcome, CriuError> {
        self.record(Recorded::Dump {
            pid: req.pid,
            images_dir: req.images_dir.clone(),
            kind: req.kind,
            after: req.after,
            memory: req.memory.clone(),
            streams: req.streams.clone(),
        });
        self.failure(Action::Dump, req.target())?;
        let notices = ["pre-dump", "post-dump"]
            .iter()
            .map(|s| FakeCriu::notice(s, 0))
            .collect::<Vec<_>>();
        if let Some(tx) = &req.notices {
            for n in &notices {
                let _ = tx.send(n.clone());
            }
        }
        Ok(DumpOutcome {
            duration: Duration::ZERO,
            notices,
            stats: None,
            log: req.work_dir().join("dump.log"),
        })
    }

    fn restore(&self, req: &RestoreRequest) -> Result<RestoreOutcome, CriuError> {
        self.record(Recorded::Restore {
            images_dir: req.images_dir.clone(),
            inherit: req.inherit.iter().map(|i| i.key).collect(),
            netns: req.netns.clone(),
            lazy_pages: req.lazy_pages,
        });
        self.failure(Action::Restore, req.target())?;
        let pid = {
            let mut next = self.next_pid.lock().expect("fake lock");
            *next += 1;
            *next
        };
        Ok(RestoreOutcome {
            pid,
            duration: Duration::ZERO,
            notices: vec![FakeCriu::notice("post-restore", pid)],
            stats: None,
            pts_master: None,
            log: req.work_dir().join("restore.log"),
        })
    }

    fn lazy_pages(&self, req: &LazyPagesRequest) -> Result<LazyPages, CriuError> {
        self.record(Recorded::LazyPages {
            images_dir: req.images_dir.clone(),
            address: req.address.clone(),
            port: req.port,
        });
        self.failure(Action::LazyPages, req.target())?;
        Ok(LazyPages::detached(req.work_dir().join("lazy-pages.log")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::InheritFd;

    #[test]
    fn records_a_migration_and_replays_a_failure() {
        let fake = FakeCriu::new();
        let mut dump = DumpRequest::new(77, "/images/1");
        dump.streams = vec![ExternalKey::Pipe { inode: 5 }];
        fake.dump(&dump).expect("dump");
        let mut restore = RestoreRequest::new("/images/1");
        restore.inherit = vec![InheritFd {
            key: ExternalKey::Pipe { inode: 5 },
            fd: 9,
        }];
        let first = fake.restore(&restore).expect("restore");
        fake.fail_next("criu said no");
        let err = fake.restore(&restore).expect_err("scripted failure");
        assert_eq!(
            err.to_string(),
            "criu restore of images /images/1 failed: criu said no"
        );
        let second = fake.restore(&restore).expect("restore again");
        assert_ne!(first.pid, second.pid);
        let calls = fake.calls();
        assert_eq!(calls.len(), 4);
        assert!(matches!(&calls[0], Recorded::Dump { pid: 77, .. }));
        assert_eq!(
            calls[1],
            Recorded::Restore {
                images_dir: PathBuf::from("/images/1"),
                inherit: vec![ExternalKey::Pipe { inode: 5 }],
                netns: None,
                lazy_pages: false,
            }
        );
    }
}
