//! Per-job capabilities, as Kerrighed's `krgcapset`: what krg may do with a
//! job (move it, checkpoint it), and how the job may use the cluster (fork
//! onto other nodes, see the node instead of the cluster).
//!
//! Four sets, as in Kerrighed: `effective` (in force now), `permitted` (the
//! most `effective` may hold), and for the jobs this job starts
//! `inheritable_effective` and `inheritable_permitted`. Anyone may lower a
//! set; raising `effective` needs the capability in `permitted`; raising a
//! permitted set needs root.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cap {
    /// The balancer and `krg migrate` may move the job.
    CanMigrate,
    /// Children the job starts run on the node the scheduler picks.
    DistantFork,
    /// `krg checkpoint` may save the job.
    Checkpointable,
    /// The job sees its node's /proc, not the cluster's.
    SeeLocalProcStat,
}

pub const ALL_CAPS: [Cap; 4] = [
    Cap::CanMigrate,
    Cap::DistantFork,
    Cap::Checkpointable,
    Cap::SeeLocalProcStat,
];

impl Cap {
    fn bit(self) -> u8 {
        match self {
            Cap::CanMigrate => 1,
            Cap::DistantFork => 2,
            Cap::Checkpointable => 4,
            Cap::SeeLocalProcStat => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Cap::CanMigrate => "CAN_MIGRATE",
            Cap::DistantFork => "DISTANT_FORK",
            Cap::Checkpointable => "CHECKPOINTABLE",
            Cap::SeeLocalProcStat => "SEE_LOCAL_PROC_STAT",
        }
    }

    pub fn parse(s: &str) -> Result<Cap, CapError> {
        let up = s.trim().to_ascii_uppercase();
        ALL_CAPS
            .into_iter()
            .find(|c| c.name() == up)
            .ok_or_else(|| CapError::Unknown(s.to_string()))
    }
}

/// A set of capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSet(u8);

impl CapSet {
    pub const fn empty() -> CapSet {
        CapSet(0)
    }

    pub fn all() -> CapSet {
        CapSet(ALL_CAPS.iter().fold(0, |a, c| a | c.bit()))
    }

    pub fn of(caps: &[Cap]) -> CapSet {
        CapSet(caps.iter().fold(0, |a, c| a | c.bit()))
    }

    pub fn has(self, c: Cap) -> bool {
        self.0 & c.bit() != 0
    }

    fn with(self, c: Cap, on: bool) -> CapSet {
        if on {
            CapSet(self.0 | c.bit())
        } else {
            CapSet(self.0 & !c.bit())
        }
    }

    fn within(self, other: CapSet) -> CapSet {
        CapSet(self.0 & other.0)
    }
}

impl fmt::Display for CapSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = ALL_CAPS
            .iter()
            .filter(|c| self.has(**c))
            .map(|c| c.name())
            .collect();
        if names.is_empty() {
            f.write_str("(none)")
        } else {
            f.write_str(&names.join(","))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Which {
    Effective,
    Permitted,
    InheritableEffective,
    InheritablePermitted,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Effective => "effective",
            Which::Permitted => "permitted",
            Which::InheritableEffective => "inheritable effective",
            Which::InheritablePermitted => "inheritable permitted",
        }
    }
}

/// `+CAP` or `-CAP` on one set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapChange {
    pub which: Which,
    pub cap: Cap,
    pub raise: bool,
}

impl CapChange {
    /// `+DISTANT_FORK`, `-CAN_MIGRATE`, or a bare name (raise).
    pub fn parse(which: Which, s: &str) -> Result<CapChange, CapError> {
        let (raise, name) = match s.as_bytes().first() {
            Some(b'+') => (true, &s[1..]),
            Some(b'-') => (false, &s[1..]),
            _ => (true, s),
        };
        Ok(CapChange {
            which,
            cap: Cap::parse(name)?,
            raise,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapError {
    #[error(
        "unknown capability '{0}' (CAN_MIGRATE, DISTANT_FORK, CHECKPOINTABLE, SEE_LOCAL_PROC_STAT)"
    )]
    Unknown(String),
    #[error("permission denied: only root may raise {cap} in the {which} set")]
    NotRoot {
        cap: &'static str,
        which: &'static str,
    },
    #[error("cannot raise {cap} in the {which} set: it is not permitted (krg capset -p +{cap}, as root)")]
    NotPermitted {
        cap: &'static str,
        which: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    pub effective: CapSet,
    pub permitted: CapSet,
    pub inheritable_effective: CapSet,
    pub inheritable_permitted: CapSet,
}

impl Default for Caps {
    /// A job started from outside krg: everything permitted; in force, being
    /// moved and checkpointed, which children inherit.
    fn default() -> Self {
        let usual = CapSet::of(&[Cap::CanMigrate, Cap::Checkpointable]);
        Caps {
            effective: usual,
            permitted: CapSet::all(),
            inheritable_effective: usual,
            inheritable_permitted: CapSet::all(),
        }
    }
}

impl Caps {
    /// What a job started by this one gets.
    pub fn for_child(&self) -> Caps {
        Caps {
            effective: self
                .inheritable_effective
                .within(self.inheritable_permitted),
            permitted: self.inheritable_permitted,
            inheritable_effective: self.inheritable_effective,
            inheritable_permitted: self.inheritable_permitted,
        }
    }

    pub fn has(&self, c: Cap) -> bool {
        self.effective.has(c)
    }

    /// Applies one change, as a user (`root` false) or root.
    pub fn apply(&mut self, ch: CapChange, root: bool) -> Result<(), CapError> {
        let deny_root = || CapError::NotRoot {
            cap: ch.cap.name(),
            which: ch.which.name(),
        };
        let deny_permitted = || CapError::NotPermitted {
            cap: ch.cap.name(),
            which: ch.which.name(),
        };
        match (ch.which, ch.raise) {
            (Which::Permitted, true) if !root && !self.permitted.has(ch.cap) => {
                return Err(deny_root())
            }
            (Which::InheritablePermitted, true) if !root && !self.permitted.has(ch.cap) => {
                return Err(deny_root())
            }
            (Which::Effective, true) if !self.permitted.has(ch.cap) => return Err(deny_permitted()),
            (Which::InheritableEffective, true) if !self.inheritable_permitted.has(ch.cap) => {
                return Err(deny_permitted())
            }
            _ => {}
        }
        let set = match ch.which {
            Which::Effective => &mut self.effective,
            Which::Permitted => &mut self.permitted,
            Which::InheritableEffective => &mut self.inheritable_effective,
            Which::InheritablePermitted => &mut self.inheritable_permitted,
        };
        *set = set.with(ch.cap, ch.raise);
        // Nothing may be in force that is not permitted.
        self.effective = self.effective.within(self.permitted);
        self.inheritable_effective = self
            .inheritable_effective
            .within(self.inheritable_permitted);
        Ok(())
    }
}

impl fmt::Display for Caps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "effective:              {}", self.effective)?;
        writeln!(f, "permitted:              {}", self.permitted)?;
        writeln!(f, "inheritable effective:  {}", self.inheritable_effective)?;
        write!(f, "inheritable permitted:  {}", self.inheritable_permitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(which: Which, s: &str) -> CapChange {
        CapChange::parse(which, s).unwrap()
    }

    #[test]
    fn a_user_lowers_freely_and_raises_only_what_is_permitted() {
        let mut c = Caps::default();
        c.apply(ch(Which::Effective, "+DISTANT_FORK"), false)
            .unwrap();
        assert!(c.has(Cap::DistantFork));
        c.apply(ch(Which::Permitted, "-DISTANT_FORK"), false)
            .unwrap();
        assert!(!c.has(Cap::DistantFork), "effective follows permitted down");
        assert_eq!(
            c.apply(ch(Which::Permitted, "+DISTANT_FORK"), false),
            Err(CapError::NotRoot {
                cap: "DISTANT_FORK",
                which: "permitted"
            })
        );
        assert!(matches!(
            c.apply(ch(Which::Effective, "+DISTANT_FORK"), false),
            Err(CapError::NotPermitted { .. })
        ));
        c.apply(ch(Which::Permitted, "+DISTANT_FORK"), true)
            .unwrap();
        c.apply(ch(Which::Effective, "+DISTANT_FORK"), false)
            .unwrap();
        assert!(c.has(Cap::DistantFork));
    }

    #[test]
    fn children_get_the_inheritable_sets() {
        let mut c = Caps::default();
        c.apply(ch(Which::Effective, "+DISTANT_FORK"), false)
            .unwrap();
        assert!(!c.for_child().has(Cap::DistantFork));
        c.apply(ch(Which::InheritableEffective, "+DISTANT_FORK"), false)
            .unwrap();
        assert!(c.for_child().has(Cap::DistantFork));
        c.apply(ch(Which::InheritablePermitted, "-CAN_MIGRATE"), false)
            .unwrap();
        assert!(!c.for_child().has(Cap::CanMigrate));
        assert!(c.has(Cap::CanMigrate));
    }

    #[test]
    fn names_parse() {
        assert_eq!(Cap::parse("distant_fork"), Ok(Cap::DistantFork));
        assert!(Cap::parse("FLY").is_err());
        assert!(!ch(Which::Effective, "-CHECKPOINTABLE").raise);
    }
}
