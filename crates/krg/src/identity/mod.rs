//! A node's identity on disk: the state directory, the cluster CA, the
//! node's certificate and key, and join tokens.
//!
//! Layout of the state directory (mode 0700):
//!
//! ```text
//! krg-state.json   format marker, version, cluster id, node id, address
//! ca.crt           the cluster CA certificate (every member)
//! ca.key           the CA key (only where the cluster was created)
//! node.crt         this node's certificate, signed by the CA
//! node.key         this node's key (0600)
//! raft.redb        raft log and replicated state
//! ```
//!
//! A directory that is corrupt or from an unknown version is refused, never
//! overwritten.

pub mod ca;
pub mod tls;
pub mod token;

use krg_types::NodeId;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Marker of a krg state directory's metadata file.
pub const STATE_FORMAT: &str = "krg-state";
/// Version of the state directory layout this krgd reads and writes.
pub const STATE_VERSION: u32 = 1;
/// Largest metadata file accepted (it is a few hundred bytes).
const META_BYTES_MAX: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state directory {path} is corrupt ({reason}): refusing to start; fix or remove it")]
    Corrupt { path: PathBuf, reason: String },
    #[error("state directory {path} is from an unknown version ({found}; this krgd knows {STATE_VERSION}): refusing to start")]
    UnknownVersion { path: PathBuf, found: String },
    #[error("state directory {path} already holds a cluster identity (cluster {cluster_id}, node {node_id}): remove it first to start over")]
    AlreadyInitialized {
        path: PathBuf,
        cluster_id: String,
        node_id: NodeId,
    },
    #[error("certificate error: {0}")]
    Cert(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateMeta {
    pub format: String,
    pub version: u32,
    pub cluster_id: String,
    pub node_id: NodeId,
    pub addr: String,
}

/// Everything a node needs to prove who it is.
#[derive(Clone)]
pub struct Identity {
    pub meta: StateMeta,
    pub ca_cert_pem: String,
    /// Present only on the node that created the cluster.
    pub ca_key_pem: Option<String>,
    pub node_cert_pem: String,
    pub node_key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .field("holds_ca_key", &self.ca_key_pem.is_some())
            .finish()
    }
}

#[derive(Clone, Debug)]
pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn raft_db(&self) -> PathBuf {
        self.path("raft.redb")
    }

    fn io(&self, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
        let path = path.to_path_buf();
        move |source| IdentityError::Io { path, source }
    }

    /// Creates the directory (0700) if missing.
    pub fn ensure(&self) -> Result<(), IdentityError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(self.io(&self.root))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(self.io(&self.root))
    }

    /// Loads the identity; `Ok(None)` when the directory holds none yet
    /// (missing or empty). Anything else unexpected is an error.
    pub fn load(&self) -> Result<Option<Identity>, IdentityError> {
        let meta_path = self.path("krg-state.json");
        if !meta_path.exists() {
            if self.root.exists() {
                let has_raft = self.raft_db().exists();
                if has_raft {
                    return Err(IdentityError::Corrupt {
                        path: self.root.clone(),
                        reason: "raft.redb exists but krg-state.json is missing".into(),
                    });
                }
            }
            return Ok(None);
        }
        let meta = self.read_meta(&meta_path)?;
        let read = |name: &str| -> Result<String, IdentityError> {
            let p = self.path(name);
            fs::read_to_string(&p).map_err(|e| IdentityError::Corrupt {
                path: self.root.clone(),
                reason: format!("{name}: {e}"),
            })
        };
        let ca_key_path = self.path("ca.key");
        let ca_key_pem = if ca_key_path.exists() {
            Some(read("ca.key")?)
        } else {
            None
        };
        Ok(Some(Identity {
            ca_cert_pem: read("ca.crt")?,
            ca_key_pem,
            node_cert_pem: read("node.crt")?,
            node_key_pem: read("node.key")?,
            meta,
        }))
    }

    fn read_meta(&self, meta_path: &Path) -> Result<StateMeta, IdentityError> {
        let corrupt = |reason: String| IdentityError::Corrupt {
            path: self.root.clone(),
            reason,
        };
        let len = fs::metadata(meta_path).map_err(self.io(meta_path))?.len();
        if len > META_BYTES_MAX {
            return Err(corrupt(format!(
                "krg-state.json is {len} bytes, more than the {META_BYTES_MAX} allowed"
            )));
        }
        let text = fs::read_to_string(meta_path).map_err(self.io(meta_path))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(format!("krg-state.json: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(STATE_FORMAT) {
            return Err(corrupt("krg-state.json is not a krg state file".into()));
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(STATE_VERSION) => {}
            other => {
                return Err(IdentityError::UnknownVersion {
                    path: self.root.clone(),
                    found: other.map_or_else(|| "none".to_string(), |v| v.to_string()),
                })
            }
        }
        serde_json::from_value(value).map_err(|e| corrupt(format!("krg-state.json: {e}")))
    }

    /// Writes a new identity. Refuses if one is already there.
    pub fn save_new(&self, id: &Identity) -> Result<(), IdentityError> {
        self.ensure()?;
        if let Some(existing) = self.load()? {
            return Err(IdentityError::AlreadyInitialized {
                path: self.root.clone(),
                cluster_id: existing.meta.cluster_id,
                node_id: existing.meta.node_id,
            });
        }
        self.write_file("ca.crt", id.ca_cert_pem.as_bytes(), 0o644)?;
        if let Some(k) = &id.ca_key_pem {
            self.write_file("ca.key", k.as_bytes(), 0o600)?;
        }
        self.write_file("node.crt", id.node_cert_pem.as_bytes(), 0o644)?;
        self.write_file("node.key", id.node_key_pem.as_bytes(), 0o600)?;
        self.save_meta(&id.meta)
    }

    /// Rewrites the metadata (e.g. a new address), atomically.
    pub fn save_meta(&self, meta: &StateMeta) -> Result<(), IdentityError> {
        let text =
            serde_json::to_vec_pretty(meta).map_err(|e| IdentityError::Cert(e.to_string()))?;
        self.write_file("krg-state.json", &text, 0o600)
    }

    /// Write to a temporary file, fsync, rename: never a half-written file.
    fn write_file(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
        let target = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(self.io(&tmp))?;
        f.write_all(bytes).map_err(self.io(&tmp))?;
        f.sync_all().map_err(self.io(&tmp))?;
        fs::rename(&tmp, &target).map_err(self.io(&target))
    }
}

impl StateMeta {
    pub fn new(cluster_id: String, node_id: NodeId, addr: String) -> Self {
        StateMeta {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            cluster_id,
            node_id,
            addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("krg-id-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn empty_dir_has_no_identity_and_new_identity_round_trips() {
        let root = tempdir("rt");
        let dir = StateDir::new(&root);
        assert!(dir.load().unwrap().is_none());
        let (id, _) = ca::init_cluster("10.0.0.1:7470").unwrap();
        dir.save_new(&id).unwrap();
        let back = dir.load().unwrap().unwrap();
        assert_eq!(back.meta, id.meta);
        assert!(back.ca_key_pem.is_some());
        assert!(matches!(
            dir.save_new(&id),
            Err(IdentityError::AlreadyInitialized { .. })
        ));
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn corrupt_or_future_state_is_refused_and_kept() {
        let root = tempdir("bad");
        let dir = StateDir::new(&root);
        dir.ensure().unwrap();
        fs::write(dir.path("krg-state.json"), b"{not json").unwrap();
        assert!(matches!(dir.load(), Err(IdentityError::Corrupt { .. })));
        fs::write(
            dir.path("krg-state.json"),
            br#"{"format":"krg-state","version":99,"cluster_id":"c","node_id":1,"addr":"a"}"#,
        )
        .unwrap();
        assert!(matches!(
            dir.load(),
            Err(IdentityError::UnknownVersion { .. })
        ));
        assert!(fs::read_to_string(dir.path("krg-state.json"))
            .unwrap()
            .contains("99"));
        fs::remove_dir_all(root).unwrap();
    }
}
