//! Node identity and the states a member goes through.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Largest node id: a gpid keeps the home node in 12 bits.
pub const NODE_ID_MAX: u16 = 4095;
const _: () = assert!((NODE_ID_MAX as u32) < (1 << 12));

/// A member's id, 1..=4095, never reused while the node is a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct NodeId(u16);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeIdError {
    #[error("node id {0} is out of range (1..={NODE_ID_MAX})")]
    OutOfRange(u64),
    #[error("'{0}' is not a node id (a number from 1 to {NODE_ID_MAX})")]
    NotANumber(String),
}

impl NodeId {
    pub fn new(id: u64) -> Result<Self, NodeIdError> {
        if id == 0 || id > u64::from(NODE_ID_MAX) {
            return Err(NodeIdError::OutOfRange(id));
        }
        Ok(NodeId(id as u16))
    }

    pub fn get(self) -> u16 {
        self.0
    }

    pub fn as_u64(self) -> u64 {
        u64::from(self.0)
    }
}

impl TryFrom<u16> for NodeId {
    type Error = NodeIdError;
    fn try_from(v: u16) -> Result<Self, Self::Error> {
        NodeId::new(u64::from(v))
    }
}

impl From<NodeId> for u16 {
    fn from(n: NodeId) -> u16 {
        n.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u64 = s
            .trim()
            .parse()
            .map_err(|_| NodeIdError::NotANumber(s.to_string()))?;
        NodeId::new(n)
    }
}

/// The state of a member as the cluster sees it.
///
/// `Up`, `Down`, `Draining` and `Left` are decided through the replicated
/// state; `Suspect` is each node's own, faster, view of a silent peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Suspect,
    Down,
    Draining,
    Left,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Draining => "draining",
            NodeState::Left => "left",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_bounds() {
        assert!(NodeId::new(0).is_err());
        assert_eq!(NodeId::new(1).unwrap().get(), 1);
        assert_eq!(NodeId::new(4095).unwrap().get(), 4095);
        assert_eq!(NodeId::new(4096), Err(NodeIdError::OutOfRange(4096)));
        assert!("x".parse::<NodeId>().is_err());
        assert_eq!("7".parse::<NodeId>().unwrap().get(), 7);
    }
}
