//! The replicated cluster state and how commands change it. Pure: no I/O,
//! no clock; every input comes in the command.

use crate::cluster::types::{Command, CommandResult};
use krg_types::limits::{JOIN_TOKENS_MAX, NODES_MAX};
use krg_types::{NodeId, NodeState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// `ip:port` of its node port.
    pub addr: String,
    pub hostname: String,
    /// SHA-256 of the node's public key (SubjectPublicKeyInfo), hex.
    pub spki_sha256: String,
    pub state: NodeState,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub expires_at_ms: u64,
    pub used: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: String,
    pub ca_cert_pem: String,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub tokens: BTreeMap<String, TokenRecord>,
    /// Node ids are never reused while the cluster lives.
    pub next_node_id: u16,
    /// The node holding the CA key, which signs joiners' certificates.
    pub ca_holder: Option<NodeId>,
    /// The global scheduler's policies, the same on every node.
    pub sched: crate::policy::config::SchedConfig,
    /// The image catalogue: every checkpoint of every job.
    pub images: BTreeMap<(krg_types::Gpid, u32), crate::image::ImageRecord>,
}

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::Bootstrap {
                cluster_id,
                ca_cert_pem,
                first,
            } => {
                if !self.cluster_id.is_empty() {
                    return CommandResult::Refused("the cluster is already bootstrapped".into());
                }
                self.cluster_id = cluster_id.clone();
                self.ca_cert_pem = ca_cert_pem.clone();
                self.next_node_id = first.id.get() + 1;
                self.ca_holder = Some(first.id);
                self.nodes.insert(first.id, first.clone());
                CommandResult::Ok
            }
            Command::AddToken {
                token_hash,
                expires_at_ms,
                now_ms,
            } => {
                self.forget_expired_tokens(*now_ms);
                if self.tokens.len() >= JOIN_TOKENS_MAX {
                    return CommandResult::Refused(format!(
                        "too many live join tokens ({JOIN_TOKENS_MAX}): wait for some to expire"
                    ));
                }
                self.tokens.insert(
                    token_hash.clone(),
                    TokenRecord {
                        expires_at_ms: *expires_at_ms,
                        used: false,
                    },
                );
                CommandResult::Ok
            }
            Command::Admit {
                token_hash,
                now_ms,
                addr,
                hostname,
                spki_sha256,
                version,
            } => self.admit(token_hash, *now_ms, addr, hostname, spki_sha256, version),
            Command::SetNodeState { node, state } => match self.nodes.get_mut(node) {
                None => CommandResult::Refused(format!("node {node} is not a member")),
                Some(rec) if rec.state == NodeState::Left => {
                    CommandResult::Refused(format!("node {node} has left the cluster"))
                }
                Some(rec) => {
                    rec.state = *state;
                    CommandResult::Ok
                }
            },
            Command::AddImage(rec) => {
                if self.images.len() >= krg_types::limits::JOB_TABLE_MAX {
                    return CommandResult::Refused(
                        "the image catalogue is full: remove old images".into(),
                    );
                }
                self.images.insert((rec.gpid, rec.version), rec.clone());
                CommandResult::Ok
            }
            Command::RemoveImage { gpid, version } => {
                self.images.remove(&(*gpid, *version));
                CommandResult::Ok
            }
            Command::SetSched(cfg) => match cfg.check() {
                Ok(()) => {
                    self.sched = cfg.clone();
                    CommandResult::Ok
                }
                Err(e) => CommandResult::Refused(e),
            },
            Command::SetNodeAddr { node, addr } => match self.nodes.get_mut(node) {
                None => CommandResult::Refused(format!("node {node} is not a member")),
                Some(rec) => {
                    rec.addr = addr.clone();
                    CommandResult::Ok
                }
            },
        }
    }

    /// Why a join with this token would be refused now, if it would.
    pub fn token_refusal(&self, token_hash: &str, now_ms: u64) -> Option<&'static str> {
        match self.tokens.get(token_hash) {
            None => Some("the join token is not valid for this cluster"),
            Some(t) if t.used => Some("the join token was already used"),
            Some(t) if t.expires_at_ms <= now_ms => Some("the join token has expired"),
            Some(_) => None,
        }
    }

    fn admit(
        &mut self,
        token_hash: &str,
        now_ms: u64,
        addr: &str,
        hostname: &str,
        spki_sha256: &str,
        version: &str,
    ) -> CommandResult {
        if let Some(reason) = self.token_refusal(token_hash, now_ms) {
            return CommandResult::Refused(reason.into());
        }
        if let Some(t) = self.tokens.get_mut(token_hash) {
            t.used = true;
        }
        if self.nodes.len() >= NODES_MAX || usize::from(self.next_node_id) > NODES_MAX {
            return CommandResult::Refused(format!("the cluster is full ({NODES_MAX} nodes)"));
        }
        if let Some(other) = self
            .nodes
            .values()
            .find(|n| n.addr == addr && n.state != NodeState::Left)
        {
            return CommandResult::Refused(format!(
                "address {addr} already belongs to node {}",
                other.id
            ));
        }
        let id = match NodeId::new(u64::from(self.next_node_id.max(1))) {
            Ok(id) => id,
            Err(e) => return CommandResult::Refused(e.to_string()),
        };
        self.next_node_id = id.get() + 1;
        self.nodes.insert(
            id,
            NodeRecord {
                id,
                addr: addr.to_string(),
                hostname: hostname.to_string(),
                spki_sha256: spki_sha256.to_string(),
                state: NodeState::Up,
                version: version.to_string(),
            },
        );
        CommandResult::Admitted(id)
    }

    fn forget_expired_tokens(&mut self, now_ms: u64) {
        self.tokens.retain(|_, t| t.expires_at_ms > now_ms);
    }

    /// Members that have not left.
    pub fn members(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().filter(|n| n.state != NodeState::Left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u16, addr: &str) -> NodeRecord {
        NodeRecord {
            id: NodeId::new(u64::from(id)).unwrap(),
            addr: addr.into(),
            hostname: format!("h{id}"),
            spki_sha256: format!("k{id}"),
            state: NodeState::Up,
            version: "0".into(),
        }
    }

    fn boot() -> ClusterState {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::Bootstrap {
            cluster_id: "c".into(),
            ca_cert_pem: "ca".into(),
            first: record(1, "10.0.0.1:7470"),
        });
        assert_eq!(r, CommandResult::Ok);
        s
    }

    fn admit(s: &mut ClusterState, hash: &str, now: u64, addr: &str) -> CommandResult {
        s.apply(&Command::Admit {
            token_hash: hash.into(),
            now_ms: now,
            addr: addr.into(),
            hostname: "h".into(),
            spki_sha256: "k".into(),
            version: "0".into(),
        })
    }

    #[test]
    fn a_token_admits_once_and_ids_grow() {
        let mut s = boot();
        s.apply(&Command::AddToken {
            token_hash: "t1".into(),
            expires_at_ms: 1000,
            now_ms: 0,
        });
        assert_eq!(
            admit(&mut s, "t1", 10, "10.0.0.2:7470"),
            CommandResult::Admitted(NodeId::new(2).unwrap())
        );
        assert_eq!(
            admit(&mut s, "t1", 11, "10.0.0.3:7470"),
            CommandResult::Refused("the join token was already used".into())
        );
        assert_eq!(s.nodes.len(), 2);
    }

    #[test]
    fn expired_and_unknown_tokens_are_refused() {
        let mut s = boot();
        s.apply(&Command::AddToken {
            token_hash: "t1".into(),
            expires_at_ms: 1000,
            now_ms: 0,
        });
        assert!(
            matches!(admit(&mut s, "t1", 1000, "a:1"), CommandResult::Refused(m) if m.contains("expired"))
        );
        assert!(
            matches!(admit(&mut s, "nope", 1, "a:1"), CommandResult::Refused(m) if m.contains("not valid"))
        );
        assert_eq!(s.nodes.len(), 1);
    }

    #[test]
    fn second_bootstrap_is_refused() {
        let mut s = boot();
        let r = s.apply(&Command::Bootstrap {
            cluster_id: "d".into(),
            ca_cert_pem: "x".into(),
            first: record(1, "x:1"),
        });
        assert!(matches!(r, CommandResult::Refused(_)));
        assert_eq!(s.cluster_id, "c");
    }

    #[test]
    fn left_nodes_stay_left() {
        let mut s = boot();
        let one = NodeId::new(1).unwrap();
        s.apply(&Command::SetNodeState {
            node: one,
            state: NodeState::Left,
        });
        let r = s.apply(&Command::SetNodeState {
            node: one,
            state: NodeState::Up,
        });
        assert!(matches!(r, CommandResult::Refused(_)));
    }
}
