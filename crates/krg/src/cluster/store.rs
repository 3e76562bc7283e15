//! Raft's durable storage over redb: the log, the vote and the state machine.
//!
//! One redb file per node (`<state-dir>/raft.redb`). The state machine is
//! persisted after every applied batch, so a restart resumes from it and a
//! snapshot is just the current state serialized.

// openraft's traits return its StorageError (over 200 bytes) and redb's
// errors are 160 bytes: boxing them at every call would only add noise on
// paths that are not hot.
#![allow(clippy::result_large_err)]

use crate::cluster::types::{StateMachineData, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_STATE: &str = "state_machine";
const KEY_SNAPSHOT: &str = "snapshot";

type StResult<T> = Result<T, StorageError<u64>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the raft store {path}: {source}")]
    Open {
        path: String,
        source: redb::DatabaseError,
    },
    #[error("the raft store {path} is unreadable ({reason}); it was left untouched: restore it from a backup or remove the state directory to leave the cluster")]
    Corrupt { path: String, reason: String },
}

/// Opens (or creates) the redb file and the tables, and loads the state machine.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let shown = path.display().to_string();
    let db = Database::create(path).map_err(|source| StoreError::Open {
        path: shown.clone(),
        source,
    })?;
    let corrupt = |reason: String| StoreError::Corrupt {
        path: shown.clone(),
        reason,
    };
    let tx = db.begin_write().map_err(|e| corrupt(e.to_string()))?;
    {
        tx.open_table(LOG).map_err(|e| corrupt(e.to_string()))?;
        tx.open_table(META).map_err(|e| corrupt(e.to_string()))?;
    }
    tx.commit().map_err(|e| corrupt(e.to_string()))?;
    let db = Arc::new(db);
    let data: StateMachineData =
        match read_meta(&db, KEY_STATE).map_err(|e| corrupt(e.to_string()))? {
            Some(bytes) => {
                postcard::from_bytes(&bytes).map_err(|e| corrupt(format!("state machine: {e}")))?
            }
            None => StateMachineData::default(),
        };
    let snapshot = match read_meta(&db, KEY_SNAPSHOT).map_err(|e| corrupt(e.to_string()))? {
        Some(bytes) => Some(
            postcard::from_bytes::<StoredSnapshot>(&bytes)
                .map_err(|e| corrupt(format!("snapshot: {e}")))?,
        ),
        None => None,
    };
    let (tx_version, _) = watch::channel(0u64);
    let shared = SharedState {
        data: Arc::new(RwLock::new(data)),
        changed: Arc::new(tx_version),
    };
    Ok((
        LogStore { db: db.clone() },
        StateMachineStore {
            db,
            shared,
            snapshot,
        },
    ))
}

fn read_meta(db: &Database, key: &str) -> Result<Option<Vec<u8>>, redb::Error> {
    let rtx = db.begin_read()?;
    let t = rtx.open_table(META)?;
    Ok(t.get(key)?.map(|v| v.value().to_vec()))
}

fn write_meta(db: &Database, key: &str, value: &[u8]) -> Result<(), redb::Error> {
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(META)?;
        t.insert(key, value)?;
    }
    tx.commit()?;
    Ok(())
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, std::io::Error> {
    postcard::from_bytes(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, std::io::Error> {
    postcard::to_stdvec(v).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// The raft log and vote.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> StResult<Option<T>> {
        let bytes = read_meta(&self.db, key).map_err(|e| StorageIOError::read(&e))?;
        match bytes {
            None => Ok(None),
            Some(b) => Ok(Some(decode(&b).map_err(|e| StorageIOError::read(&e))?)),
        }
    }

    fn set_meta<T: serde::Serialize>(&self, key: &str, v: &T) -> StResult<()> {
        let bytes = encode(v).map_err(|e| StorageIOError::write(&e))?;
        tokio::task::block_in_place(|| write_meta(&self.db, key, &bytes))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    fn last_entry(&self) -> StResult<Option<Entry<TypeConfig>>> {
        let rtx = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let t = rtx
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last = t.last().map_err(|e| StorageIOError::read_logs(&e))?;
        match last {
            None => Ok(None),
            Some((_, v)) => Ok(Some(
                decode(v.value()).map_err(|e| StorageIOError::read_logs(&e))?,
            )),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StResult<Vec<Entry<TypeConfig>>> {
        let rtx = self
            .db
            .begin_read()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let t = rtx
            .open_table(LOG)
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(|e| StorageIOError::read_logs(&e))? {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode(v.value()).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StResult<LogState<TypeConfig>> {
        let last_purged: Option<LogId<u64>> = self.meta(KEY_PURGED)?;
        let last = self.last_entry()?.map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StResult<()> {
        self.set_meta(KEY_VOTE, vote)
    }

    async fn read_vote(&mut self) -> StResult<Option<Vote<u64>>> {
        self.meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StResult<()> {
        self.set_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StResult<Option<LogId<u64>>> {
        Ok(self.meta::<Option<LogId<u64>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let result = tokio::task::block_in_place(|| -> Result<(), redb::Error> {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(LOG)?;
                for entry in entries {
                    let bytes = postcard::to_stdvec(&entry)
                        .map_err(|e| redb::Error::Corrupted(format!("encode log entry: {e}")))?;
                    t.insert(entry.get_log_id().index, bytes.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        });
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let io = std::io::Error::other(e.to_string());
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&io).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StResult<()> {
        self.remove_range(log_id.index..)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StResult<()> {
        self.set_meta(KEY_PURGED, &log_id)?;
        self.remove_range(..=log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

impl LogStore {
    fn remove_range(&self, range: impl RangeBounds<u64>) -> Result<(), redb::Error> {
        tokio::task::block_in_place(|| {
            let tx = self.db.begin_write()?;
            {
                let mut t = tx.open_table(LOG)?;
                t.retain_in(range, |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
    }
}

/// The applied cluster state, readable by the rest of krgd without raft.
#[derive(Clone)]
pub struct SharedState {
    pub data: Arc<RwLock<StateMachineData>>,
    /// Bumped after every applied batch, so tasks can wait for changes.
    pub changed: Arc<watch::Sender<u64>>,
}

impl SharedState {
    pub fn read<R>(&self, f: impl FnOnce(&StateMachineData) -> R) -> R {
        let guard = self.data.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, openraft::BasicNode>,
    data: Vec<u8>,
}

pub struct StateMachineStore {
    db: Arc<Database>,
    pub shared: SharedState,
    snapshot: Option<StoredSnapshot>,
}

impl StateMachineStore {
    fn persist(&self) -> StResult<()> {
        let bytes = self
            .shared
            .read(encode)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        tokio::task::block_in_place(|| write_meta(&self.db, KEY_STATE, &bytes))
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }

    fn store_snapshot(&mut self, snap: StoredSnapshot) -> StResult<()> {
        let bytes = encode(&snap).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tokio::task::block_in_place(|| write_meta(&self.db, KEY_SNAPSHOT, &bytes))
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.snapshot = Some(snap);
        Ok(())
    }
}

pub struct SnapshotBuilder {
    db: Arc<Database>,
    shared: SharedState,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StResult<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = self
            .shared
            .read(|d| (encode(d), d.last_applied, d.last_membership.clone()));
        let data = data.map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, rand::random::<u32>()),
            None => format!("none-{}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let bytes = encode(&stored).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        tokio::task::block_in_place(|| write_meta(&self.db, KEY_SNAPSHOT, &bytes))
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StResult<(
        Option<LogId<u64>>,
        StoredMembership<u64, openraft::BasicNode>,
    )> {
        Ok(self
            .shared
            .read(|d| (d.last_applied, d.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> StResult<Vec<crate::cluster::types::CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => results.push(Default::default()),
                    EntryPayload::Normal(cmd) => results.push(d.state.apply(&cmd)),
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        results.push(Default::default());
                    }
                }
            }
        }
        self.persist()?;
        self.shared.bump();
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StResult<()> {
        let bytes = snapshot.into_inner();
        let mut data: StateMachineData = decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        data.last_applied = meta.last_log_id;
        data.last_membership = meta.last_membership.clone();
        {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            *d = data;
        }
        self.persist()?;
        self.store_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })?;
        self.shared.bump();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StResult<Option<Snapshot<TypeConfig>>> {
        Ok(self.snapshot.clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
