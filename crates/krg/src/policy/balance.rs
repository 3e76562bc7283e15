//! MOSIX-like preemptive balancing, run by each node for its own jobs.
//!
//! A node considers moving a job when its load per unit of capacity exceeds
//! the cluster's average by the configured threshold. A busy job is moved
//! where it gets a larger share of a CPU than it gets here (counting
//! itself on the target), by a margin, and only if that gain is larger
//! than the move's cost (the job's memory, as seconds of transfer spread
//! over the horizon). The move is never undone by a later round: a job
//! only moves to a node where `(load + 1) / capacity` is lower than its
//! node's `load / capacity`, which makes every move lower Rosenthal's
//! potential `Σ_n Σ_{k≤load(n)} k / capacity(n)`, so balancing always
//! settles. A job that arrived recently stays (minimum residence). One move
//! per round: the next round sees its effect.

use super::config::SchedConfig;
use super::{Balancer, JobSample, Move, NodeSample};
use krg_types::NodeId;

/// CPU use (in CPUs) above which a job counts as busy.
pub const BUSY_CPU: f64 = 0.05;

pub struct Balance {
    cfg: SchedConfig,
}

impl Balance {
    pub fn new(cfg: SchedConfig) -> Self {
        Balance { cfg }
    }

    /// Has `job` been here long enough to move? The minimum residence
    /// guards against moves decided on noisy samples; a move that at least
    /// doubles the job's CPU is not noise (a job left alone on a slow node
    /// while a fast one empties), once the samples have had time to count
    /// its arrival here.
    fn settled(&self, job: &JobSample, share_here: f64, share_target: f64) -> bool {
        job.resident_ms >= self.cfg.min_residence_ms
            || (share_target >= EARLY_MOVE_GAIN * share_here
                && job.resident_ms >= EARLY_MOVE_MIN_MS.min(self.cfg.min_residence_ms))
    }

    /// What moving `job` costs, in the unit of load (CPUs over the horizon).
    pub fn cost(&self, job: &JobSample) -> f64 {
        job.rss_bytes as f64 / self.cfg.migration_bytes_per_s / self.cfg.horizon_s
    }
}

/// How much larger a job's CPU share must be on the target: moves that
/// barely help are not worth a freeze.
const SHARE_MARGIN: f64 = 0.1;

/// How many times more CPU lets a job move before its minimum residence.
const EARLY_MOVE_GAIN: f64 = 2.0;

/// The least time on a node before such an early move: the samples count
/// a job just placed or moved twice for 3 s (`job/place.rs` RECENT,
/// `policy/task.rs` RECENT_MOVE), which would make its node look busier.
const EARLY_MOVE_MIN_MS: u64 = 3_000;

/// The share of a CPU one of `load` busy tasks gets on `capacity` CPUs.
fn cpu_share(capacity: f64, load: f64) -> f64 {
    (capacity.max(0.01) / load.max(1.0)).min(1.0)
}

/// A job's share of a CPU on `node` once it has arrived there.
fn share_there(node: &&NodeSample) -> f64 {
    cpu_share(node.capacity, node.load + node.pending + 1.0)
}

impl Balancer for Balance {
    fn name(&self) -> &'static str {
        "balance"
    }

    fn decide(&mut self, me: NodeId, nodes: &[NodeSample], jobs: &[JobSample]) -> Vec<Move> {
        let Some(mine) = nodes.iter().find(|n| n.id == me) else {
            return vec![];
        };
        let usable: Vec<&NodeSample> = nodes.iter().filter(|n| n.usable).collect();
        if usable.len() < 2 {
            return vec![];
        }
        let total_load: f64 = usable.iter().map(|n| n.load + n.pending).sum();
        let total_cap: f64 = usable.iter().map(|n| n.capacity.max(0.01)).sum();
        let average = total_load / total_cap;
        let my_rel = mine.relative_load();
        if my_rel <= average * self.cfg.threshold || my_rel < 1.0 / mine.capacity.max(0.01) {
            return vec![];
        }
        // Busy, movable, settled jobs; cheapest first. On a crowded node a
        // CPU-bound job gets only a share of a CPU: any steady use counts.
        let mut candidates: Vec<&JobSample> = jobs
            .iter()
            .filter(|j| j.movable && j.cpu >= BUSY_CPU)
            .collect();
        candidates.sort_by(|a, b| a.rss_bytes.cmp(&b.rss_bytes).then(a.gpid.cmp(&b.gpid)));
        // A busy job's share of a CPU here, where it is one of the load.
        let my_load = (mine.load + mine.pending).max(1.0);
        let share_here = cpu_share(mine.capacity, my_load);
        for job in candidates {
            let target = usable
                .iter()
                .filter(|n| {
                    n.id != me
                        && n.mem_free >= self.cfg.mem_free_min_bytes.saturating_add(job.rss_bytes)
                })
                .filter(|n| job.allowed.is_empty() || job.allowed.contains(&n.id))
                .max_by(|a, b| {
                    share_there(a)
                        .partial_cmp(&share_there(b))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(
                            b.relative_load()
                                .partial_cmp(&a.relative_load())
                                .unwrap_or(std::cmp::Ordering::Equal),
                        )
                        .then(b.id.cmp(&a.id))
                });
            let Some(target) = target else { continue };
            let share_target = share_there(target);
            if share_target <= share_here * (1.0 + SHARE_MARGIN) {
                continue;
            }
            if !self.settled(job, share_here, share_target) {
                continue;
            }
            let gain = share_target - share_here;
            let cost = self.cost(job);
            if gain <= cost {
                continue;
            }
            return vec![Move {
                gpid: job.gpid,
                source: me,
                target: target.id,
                reason: format!(
                    "moved {} from node {} (load {:.1}/{:.2}) to node {} (load {:.1}/{:.2}): gain {:.2} > cost {:.2}",
                    job.gpid,
                    me,
                    mine.load + mine.pending,
                    mine.capacity,
                    target.id,
                    target.load + target.pending,
                    target.capacity,
                    gain,
                    cost
                ),
            }];
        }
        vec![]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sample;
    use krg_types::Gpid;

    fn job(seq: u64, rss: u64, resident_ms: u64) -> JobSample {
        JobSample {
            gpid: Gpid::new(NodeId::new(1).unwrap(), seq).unwrap(),
            cpu: 1.0,
            rss_bytes: rss,
            movable: true,
            resident_ms,
            allowed: vec![],
        }
    }

    fn n(i: u64) -> NodeId {
        NodeId::new(i).unwrap()
    }

    /// Simulates rounds on every node until nothing moves; returns the
    /// final job counts and the number of moves.
    fn simulate(caps: &[f64], mut counts: Vec<u32>, rounds: usize) -> (Vec<u32>, usize) {
        let cfg = SchedConfig {
            min_residence_ms: 0,
            ..SchedConfig::default()
        };
        let mut moves = 0;
        for _ in 0..rounds {
            let mut moved = false;
            for me in 0..caps.len() {
                let nodes: Vec<NodeSample> = caps
                    .iter()
                    .enumerate()
                    .map(|(i, c)| sample(i as u64 + 1, *c, f64::from(counts[i])))
                    .collect();
                let jobs: Vec<JobSample> = (0..counts[me])
                    .map(|s| job(u64::from(s), 1 << 20, 60_000))
                    .collect();
                let mut b = Balance::new(cfg.clone());
                for m in b.decide(n(me as u64 + 1), &nodes, &jobs) {
                    counts[me] -= 1;
                    counts[usize::from(m.target.get()) - 1] += 1;
                    moves += 1;
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        (counts, moves)
    }

    #[test]
    fn six_jobs_on_one_node_spread_evenly_and_then_stay() {
        let (counts, moves) = simulate(&[1.0, 1.0, 1.0], vec![6, 0, 0], 50);
        assert_eq!(counts, vec![2, 2, 2]);
        assert_eq!(moves, 4);
        let (again, more) = simulate(&[1.0, 1.0, 1.0], counts, 50);
        assert_eq!((again, more), (vec![2, 2, 2], 0));
    }

    #[test]
    fn unequal_capacities_settle_near_proportion_without_oscillation() {
        let (counts, _) = simulate(&[0.25, 0.5, 1.0], vec![12, 0, 0], 100);
        let (_, more) = simulate(&[0.25, 0.5, 1.0], counts.clone(), 100);
        assert_eq!(more, 0, "settled state {counts:?} must be stable");
        assert!(
            counts[2] >= counts[1] && counts[1] >= counts[0],
            "{counts:?}"
        );
    }

    #[test]
    fn a_lone_job_leaves_a_slow_node_for_an_idle_fast_one() {
        let (counts, moves) = simulate(&[0.25, 0.5, 1.0], vec![1, 0, 0], 50);
        assert_eq!((counts, moves), (vec![0, 0, 1], 1));
    }

    #[test]
    fn a_job_with_a_whole_cpu_does_not_move_to_a_bigger_idle_node() {
        let (counts, moves) = simulate(&[1.0, 4.0], vec![1, 0], 50);
        assert_eq!((counts, moves), (vec![1, 0], 0));
    }

    #[test]
    fn a_young_job_moves_early_only_to_twice_the_cpu() {
        let cfg = SchedConfig {
            min_residence_ms: 30_000,
            ..SchedConfig::default()
        };
        let mut b = Balance::new(cfg);
        // Alone at 0.5 CPU, a whole idle CPU elsewhere: twice the CPU.
        let doubled = vec![sample(1, 0.5, 1.0), sample(2, 1.0, 0.0)];
        assert_eq!(b.decide(n(1), &doubled, &[job(1, 1 << 20, 1_000)]), vec![]);
        assert_eq!(b.decide(n(1), &doubled, &[job(1, 1 << 20, 5_000)]).len(), 1);
        // Three at 1.0 CPU, an idle 0.5-CPU node: 1/3 -> 1/2 is not enough.
        let better = vec![sample(1, 1.0, 3.0), sample(2, 0.5, 0.0)];
        assert_eq!(b.decide(n(1), &better, &[job(2, 1 << 20, 5_000)]), vec![]);
        assert_eq!(b.decide(n(1), &better, &[job(2, 1 << 20, 30_000)]).len(), 1);
    }

    #[test]
    fn recent_unmovable_and_expensive_jobs_stay() {
        let nodes = vec![sample(1, 1.0, 4.0), sample(2, 1.0, 0.0)];
        let mut b = Balance::new(SchedConfig::default());
        let young = vec![job(1, 1 << 20, 1_000)];
        assert!(b.decide(n(1), &nodes, &young).is_empty());
        let mut pinned = job(2, 1 << 20, 60_000);
        pinned.movable = false;
        assert!(b.decide(n(1), &nodes, &[pinned]).is_empty());
        let huge = job(3, 1 << 50, 60_000);
        assert!(b.decide(n(1), &nodes, &[huge]).is_empty());
        let fine = job(4, 1 << 20, 60_000);
        let m = b.decide(n(1), &nodes, &[fine]);
        assert_eq!(m.len(), 1);
        assert!(m[0].reason.contains("gain"), "{}", m[0].reason);
    }

    /// Random loads and capacities: balancing ends (every move lowers the
    /// potential), and a settled cluster stays settled.
    #[test]
    fn balancing_always_settles() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let k = 2 + (next() % 4) as usize;
            let caps: Vec<f64> = (0..k)
                .map(|_| [0.25, 0.5, 1.0, 2.0][(next() % 4) as usize])
                .collect();
            let counts: Vec<u32> = (0..k).map(|_| (next() % 10) as u32).collect();
            let (settled, _) = simulate(&caps, counts, 500);
            let (_, more) = simulate(&caps, settled.clone(), 500);
            assert_eq!(more, 0, "caps {caps:?} settled {settled:?} still moves");
        }
    }
}
