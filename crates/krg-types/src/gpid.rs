//! Global process ids: cluster-unique, stable across migration.
//!
//! As in Kerrighed, the home node is encoded in the id:
//! `gpid = (home_node << 22) | seq`, so any node can tell where a job's
//! deputy lives without asking anyone. Shown as `HOME:SEQ` (e.g. `2:17`).

use crate::node::{NodeId, NodeIdError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Bits of the per-home-node sequence number.
pub const GPID_SEQ_BITS: u32 = 22;
/// Largest sequence number a home node hands out.
pub const GPID_SEQ_MAX: u64 = (1 << GPID_SEQ_BITS) - 1;

/// Decoded through [`Gpid::from_raw`]: a gpid from the network or a file
/// with no valid home node is refused there, not met later in `home_node`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct Gpid(u64);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpidError {
    #[error("'{0}' is not a gpid (expected HOME:SEQ such as 2:17, or a number)")]
    Malformed(String),
    #[error("gpid sequence {0} is out of range (0..={GPID_SEQ_MAX})")]
    SeqOutOfRange(u64),
    #[error(transparent)]
    Node(#[from] NodeIdError),
}

impl Gpid {
    pub fn new(home: NodeId, seq: u64) -> Result<Self, GpidError> {
        if seq > GPID_SEQ_MAX {
            return Err(GpidError::SeqOutOfRange(seq));
        }
        Ok(Gpid((home.as_u64() << GPID_SEQ_BITS) | seq))
    }

    pub fn from_raw(raw: u64) -> Result<Self, GpidError> {
        let home = NodeId::new(raw >> GPID_SEQ_BITS)?;
        Gpid::new(home, raw & GPID_SEQ_MAX)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    pub fn home_node(self) -> NodeId {
        NodeId::new(self.0 >> GPID_SEQ_BITS).expect("a gpid is only built with a valid home node")
    }

    pub fn seq(self) -> u64 {
        self.0 & GPID_SEQ_MAX
    }
}

impl TryFrom<u64> for Gpid {
    type Error = GpidError;
    fn try_from(raw: u64) -> Result<Self, Self::Error> {
        Gpid::from_raw(raw)
    }
}

impl From<Gpid> for u64 {
    fn from(g: Gpid) -> u64 {
        g.0
    }
}

impl fmt::Display for Gpid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.home_node(), self.seq())
    }
}

impl FromStr for Gpid {
    type Err = GpidError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some((home, seq)) = s.split_once(':') {
            let home: NodeId = home.parse()?;
            let seq: u64 = seq
                .parse()
                .map_err(|_| GpidError::Malformed(s.to_string()))?;
            return Gpid::new(home, seq);
        }
        let raw: u64 = s.parse().map_err(|_| GpidError::Malformed(s.to_string()))?;
        Gpid::from_raw(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpid_round_trips_through_text_and_raw() {
        let g = Gpid::new(NodeId::new(2).unwrap(), 17).unwrap();
        assert_eq!(g.to_string(), "2:17");
        assert_eq!("2:17".parse::<Gpid>().unwrap(), g);
        assert_eq!(g.raw().to_string().parse::<Gpid>().unwrap(), g);
        assert_eq!(g.home_node().get(), 2);
        assert_eq!(g.seq(), 17);
    }

    #[test]
    fn gpid_rejects_bad_text() {
        assert!("0:1".parse::<Gpid>().is_err());
        assert!("1:x".parse::<Gpid>().is_err());
        assert!("1:4194304".parse::<Gpid>().is_err());
        assert!("junk".parse::<Gpid>().is_err());
    }

    #[test]
    fn a_decoded_gpid_without_a_valid_home_is_refused() {
        let good = Gpid::new(NodeId::new(3).unwrap(), 9).unwrap();
        let bytes = postcard::to_stdvec(&good).unwrap();
        assert_eq!(postcard::from_bytes::<Gpid>(&bytes).unwrap(), good);
        for raw in [0, 5, GPID_SEQ_MAX, 4096 << GPID_SEQ_BITS, u64::MAX] {
            let bytes = postcard::to_stdvec(&raw).unwrap();
            assert!(
                postcard::from_bytes::<Gpid>(&bytes).is_err(),
                "{raw} decoded as a gpid"
            );
        }
    }
}
