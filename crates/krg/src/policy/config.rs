//! The scheduler's configuration, kept in the replicated state so every
//! node applies the same policy, changed at run time by `krg sched set`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementKind {
    RoundRobin,
    LeastLoaded,
    Pack,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerKind {
    Off,
    Balance,
    Pack,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SchedConfig {
    pub placement: PlacementKind,
    pub balancer: BalancerKind,
    /// How often each node considers moving its jobs.
    pub interval_ms: u64,
    /// A node balances only when its load per unit of capacity exceeds the
    /// cluster's average by this factor.
    pub threshold: f64,
    /// A job stays at least this long on a node before it may move again.
    pub min_residence_ms: u64,
    /// Bytes per second a migration is expected to move (the cost model).
    pub migration_bytes_per_s: f64,
    /// Seconds over which a move must pay for itself.
    pub horizon_s: f64,
    /// Nodes with less free memory are not given new work.
    pub mem_free_min_bytes: u64,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            placement: PlacementKind::LeastLoaded,
            balancer: BalancerKind::Off,
            interval_ms: 2000,
            threshold: 1.25,
            min_residence_ms: 30_000,
            migration_bytes_per_s: 100e6,
            horizon_s: 60.0,
            mem_free_min_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown policy '{0}' (placement: round-robin, least-loaded, pack; balancer: balance, pack, off)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PlacementKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(PlacementKind::RoundRobin),
            "least-loaded" => Ok(PlacementKind::LeastLoaded),
            "pack" => Ok(PlacementKind::Pack),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

impl FromStr for BalancerKind {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(BalancerKind::Off),
            "balance" => Ok(BalancerKind::Balance),
            "pack" => Ok(BalancerKind::Pack),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for PlacementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlacementKind::RoundRobin => "round-robin",
            PlacementKind::LeastLoaded => "least-loaded",
            PlacementKind::Pack => "pack",
        })
    }
}

impl fmt::Display for BalancerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BalancerKind::Off => "off",
            BalancerKind::Balance => "balance",
            BalancerKind::Pack => "pack",
        })
    }
}

/// The scheduler's config file (TOML), e.g.:
///
/// ```toml
/// placement = "least-loaded"
/// balancer = "balance"
/// interval = "2s"
/// threshold = 1.25
/// min-residence = "30s"
/// ```
///
/// Keys left out keep their current value.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SchedFile {
    pub placement: Option<PlacementKind>,
    pub balancer: Option<BalancerKind>,
    pub interval: Option<String>,
    pub threshold: Option<f64>,
    pub min_residence: Option<String>,
    pub migration_bytes_per_s: Option<f64>,
    pub horizon_s: Option<f64>,
    pub mem_free_min_bytes: Option<u64>,
}

impl SchedFile {
    pub fn read(path: &std::path::Path) -> Result<SchedFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The configuration with this file's settings applied.
    pub fn apply(&self, base: &SchedConfig) -> Result<SchedConfig, String> {
        let ms = |s: &str| {
            humantime::parse_duration(s)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| format!("'{s}': {e}"))
        };
        let mut c = base.clone();
        if let Some(p) = self.placement {
            c.placement = p;
        }
        if let Some(b) = self.balancer {
            c.balancer = b;
        }
        if let Some(i) = &self.interval {
            c.interval_ms = ms(i)?;
        }
        if let Some(t) = self.threshold {
            c.threshold = t;
        }
        if let Some(m) = &self.min_residence {
            c.min_residence_ms = ms(m)?;
        }
        if let Some(v) = self.migration_bytes_per_s {
            c.migration_bytes_per_s = v;
        }
        if let Some(v) = self.horizon_s {
            c.horizon_s = v;
        }
        if let Some(v) = self.mem_free_min_bytes {
            c.mem_free_min_bytes = v;
        }
        c.check()?;
        Ok(c)
    }
}

impl SchedConfig {
    /// Rejects values that would make the scheduler misbehave.
    pub fn check(&self) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err("the balancing interval must be between 100 ms and 1 h".into());
        }
        if !(1.0..=100.0).contains(&self.threshold) {
            return Err("the threshold must be between 1.0 and 100".into());
        }
        if self.min_residence_ms > 24 * 3_600_000 {
            return Err("the minimum residence must be at most 24 h".into());
        }
        if self.mem_free_min_bytes > 1 << 50 {
            return Err("the free memory a node must keep must be at most 1 PiB".into());
        }
        if !(self.migration_bytes_per_s > 0.0 && self.horizon_s > 0.0) {
            return Err("the migration rate and horizon must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_changes_only_what_it_names() {
        let f: SchedFile =
            toml::from_str("placement = \"round-robin\"\ninterval = \"1s\"\n").unwrap();
        let c = f.apply(&SchedConfig::default()).unwrap();
        assert_eq!(c.placement, PlacementKind::RoundRobin);
        assert_eq!(c.interval_ms, 1000);
        assert_eq!(c.balancer, SchedConfig::default().balancer);
        assert!(toml::from_str::<SchedFile>("bogus = 1").is_err());
        let bad: SchedFile = toml::from_str("threshold = 0.5").unwrap();
        assert!(bad.apply(&SchedConfig::default()).is_err());
    }

    #[test]
    fn a_free_memory_floor_past_any_machine_is_refused() {
        let huge = SchedConfig {
            mem_free_min_bytes: u64::MAX,
            ..SchedConfig::default()
        };
        assert!(huge.check().unwrap_err().contains("at most 1 PiB"));
        let fine = SchedConfig {
            mem_free_min_bytes: 1 << 40,
            ..SchedConfig::default()
        };
        assert_eq!(fine.check(), Ok(()));
    }
}
