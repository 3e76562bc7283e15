//! The balancer loop each node runs for its own jobs: sample the cluster
//! and the local jobs, let the configured policy decide, migrate.

use super::{JobSample, NodeSample};
use crate::job::caps::Cap;
use crate::job::migrate::MigrateMode;
use crate::metrics::Metrics;
use crate::node::{now_ms, Node};
use krg_types::Gpid;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the loop looks whether the balancer is on.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// A move counts this long before gossip is trusted to show it.
const RECENT_MOVE: Duration = Duration::from_secs(3);
/// A job the balancer could not move is left alone this long, twice as
/// long after each further failure, up to [`RETRY_MAX`]: what kept it (a
/// TCP connection, a file only this node has) may go, but each attempt
/// that reaches CRIU freezes the job for nothing.
const RETRY_FIRST: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(600);

/// The jobs whose last move failed, and until when they are not tried.
#[derive(Default)]
struct FailedMoves(HashMap<Gpid, (Instant, u32)>);

impl FailedMoves {
    fn note(&mut self, gpid: Gpid, now: Instant) {
        let failures = self.0.get(&gpid).map_or(0, |(_, n)| *n).saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1 << (failures - 1).min(16))
            .min(RETRY_MAX);
        self.0.insert(gpid, (now + wait, failures));
    }

    fn moved(&mut self, gpid: Gpid) {
        self.0.remove(&gpid);
    }

    fn waiting(&self, gpid: Gpid, now: Instant) -> bool {
        self.0.get(&gpid).is_some_and(|(until, _)| now < *until)
    }

    /// Forget the jobs no longer here.
    fn keep_only(&mut self, here: impl Fn(&Gpid) -> bool) {
        self.0.retain(|g, _| here(g));
    }
}

/// The cluster for balancing: load is the number of runnable tasks now (the
/// averages lag behind moves). Ours is counted afresh (a move has ended
/// when `migrate_local` returns); the others' as gossip last told it,
/// with our moves to them it may not show yet.
fn balancing_samples(node: &Node, moved: &[(krg_types::NodeId, Instant)]) -> Vec<NodeSample> {
    let mut nodes = crate::job::place::samples(node);
    let scope = node.config.load_scope;
    let own = tokio::task::block_in_place(|| crate::probe::runnable_now(scope));
    for n in &mut nodes {
        if n.id == node.id {
            // Jobs placed here lately are in the fresh count already.
            n.load = f64::from(own);
            n.pending = 0.0;
            continue;
        }
        if let Some(l) = node.view().load(n.id) {
            n.load = f64::from(l.runnable);
        }
        n.pending += moved.iter().filter(|(t, _)| *t == n.id).count() as f64;
    }
    nodes
}

pub async fn run(node: Arc<Node>) {
    // CPU time of each local job at the previous round, to know its use.
    let mut last: HashMap<Gpid, (u64, Instant)> = HashMap::new();
    // Our recent moves, counted until gossip shows them.
    let mut moved: Vec<(krg_types::NodeId, Instant)> = Vec::new();
    let mut failed = FailedMoves::default();
    loop {
        let cfg = node.state.read(|d| d.state.sched.clone());
        let Some(mut balancer) = super::balancer(&cfg) else {
            last.clear();
            tokio::time::sleep(IDLE_POLL).await;
            continue;
        };
        tokio::time::sleep(Duration::from_millis(cfg.interval_ms)).await;
        moved.retain(|(_, t)| t.elapsed() < RECENT_MOVE);
        let nodes = balancing_samples(&node, &moved);
        let jobs = local_jobs(&node, &mut last, &mut failed);
        if jobs.is_empty() {
            continue;
        }
        let moves = balancer.decide(node.id, &nodes, &jobs);
        tracing::debug!(?nodes, ?jobs, ?moves, "balancer round");
        for m in moves {
            node.metrics
                .decisions
                .get_or_create(&Metrics::label(&[("kind", "migration")]))
                .inc();
            match crate::job::ops::migrate_local(&node, m.gpid, m.target, MigrateMode::Auto, 0)
                .await
            {
                Ok(r) => {
                    moved.push((m.target, Instant::now()));
                    failed.moved(m.gpid);
                    node.events.record(
                        "migration",
                        format!(
                            "{} (frozen {} ms, {} bytes)",
                            m.reason, r.freeze_ms, r.bytes
                        ),
                    )
                }
                Err(e) => {
                    failed.note(m.gpid, Instant::now());
                    node.events.record(
                        "migration",
                        format!("could not move {}: {}", m.gpid, e.message),
                    )
                }
            }
            last.remove(&m.gpid);
        }
    }
}

fn local_jobs(
    node: &Node,
    last: &mut HashMap<Gpid, (u64, Instant)>,
    failed: &mut FailedMoves,
) -> Vec<JobSample> {
    let now = Instant::now();
    let bodies = node.jobs.bodies();
    last.retain(|g, _| bodies.iter().any(|b| b.gpid == *g));
    failed.keep_only(|g| bodies.iter().any(|b| b.gpid == *g));
    bodies
        .iter()
        .map(|b| {
            let cpu_ns = b.cgroup.cpu_ns(b.init_pid.load(Ordering::SeqCst));
            let cpu = match last.insert(b.gpid, (cpu_ns, now)) {
                Some((prev, at)) => {
                    cpu_ns.saturating_sub(prev) as f64
                        / 1e9
                        / now.duration_since(at).as_secs_f64().max(0.05)
                }
                None => 0.0,
            };
            JobSample {
                gpid: b.gpid,
                cpu,
                rss_bytes: b.cgroup.rss_bytes(),
                movable: b.caps().has(Cap::CanMigrate)
                    && !b.no_migrate
                    && !b.frozen.load(Ordering::SeqCst)
                    && !failed.waiting(b.gpid, now),
                resident_ms: now_ms().saturating_sub(b.arrived_ms),
                allowed: b.spec.nodes.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_could_not_move_waits_longer_after_each_failure_until_it_moves() {
        let g = Gpid::new(krg_types::NodeId::new(1).unwrap(), 5).unwrap();
        let other = Gpid::new(krg_types::NodeId::new(1).unwrap(), 6).unwrap();
        let t0 = Instant::now();
        let mut failed = FailedMoves::default();
        assert!(!failed.waiting(g, t0));
        failed.note(g, t0);
        assert!(failed.waiting(g, t0 + RETRY_FIRST - Duration::from_secs(1)));
        assert!(!failed.waiting(g, t0 + RETRY_FIRST));
        assert!(!failed.waiting(other, t0));
        let t1 = t0 + RETRY_FIRST;
        failed.note(g, t1);
        assert!(failed.waiting(g, t1 + 2 * RETRY_FIRST - Duration::from_secs(1)));
        assert!(!failed.waiting(g, t1 + 2 * RETRY_FIRST));
        for _ in 0..40 {
            failed.note(g, t1);
        }
        assert!(!failed.waiting(g, t1 + RETRY_MAX), "the wait is bounded");
        failed.moved(g);
        assert!(!failed.waiting(g, t1));
        failed.note(other, t1);
        failed.keep_only(|j| *j != other);
        assert!(!failed.waiting(other, t1), "a job gone is forgotten");
    }
}
