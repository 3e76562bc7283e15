//! Prometheus metrics of this node, served at `/metrics` on a local
//! address (`--metrics`, default 127.0.0.1:9470; in the lab each node has
//! its own network namespace, so the same address on every node).

use crate::node::Node;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

type Labels = Vec<(String, String)>;

pub struct Metrics {
    registry: Registry,
    /// Jobs this node started running (as execution node).
    pub launches: Counter,
    /// Jobs this node placed, by policy.
    pub placements: Family<Labels, Counter>,
    /// Migrations, by direction (`out`, `in`) and outcome (`ok`, `failed`).
    pub migrations: Family<Labels, Counter>,
    pub migration_freeze_seconds: Histogram,
    pub migration_bytes: Histogram,
    /// Automatic decisions taken, by kind.
    pub decisions: Family<Labels, Counter>,
    /// Failures, by kind (`launch`, `migration`, `checkpoint`, ...).
    pub failures: Family<Labels, Counter>,
    /// Sampled at each scrape.
    load: Gauge<f64, AtomicU64>,
    capacity: Gauge<f64, AtomicU64>,
    mem_free: Gauge,
    jobs: Family<Labels, Gauge>,
    nodes: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("krg");
        let launches = Counter::default();
        let placements = Family::<Labels, Counter>::default();
        let migrations = Family::<Labels, Counter>::default();
        let freeze = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let bytes = Histogram::new(exponential_buckets(1024.0 * 1024.0, 2.0, 14));
        let decisions = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let load = Gauge::<f64, AtomicU64>::default();
        let capacity = Gauge::<f64, AtomicU64>::default();
        let mem_free = Gauge::default();
        let jobs = Family::<Labels, Gauge>::default();
        let nodes = Family::<Labels, Gauge>::default();
        registry.register("launches", "Jobs started on this node", launches.clone());
        registry.register(
            "placements",
            "Jobs this node placed, by policy",
            placements.clone(),
        );
        registry.register(
            "migrations",
            "Migrations, by direction and outcome",
            migrations.clone(),
        );
        registry.register(
            "migration_freeze_seconds",
            "Time jobs were frozen by a migration",
            freeze.clone(),
        );
        registry.register(
            "migration_bytes",
            "Bytes moved by a migration",
            bytes.clone(),
        );
        registry.register(
            "scheduler_decisions",
            "Automatic scheduler decisions, by kind",
            decisions.clone(),
        );
        registry.register("failures", "Failures, by kind", failures.clone());
        registry.register(
            "node_load",
            "Runnable tasks averaged over about 5 s",
            load.clone(),
        );
        registry.register(
            "node_capacity_cpus",
            "CPUs krg may use on this node",
            capacity.clone(),
        );
        registry.register(
            "node_memory_free_bytes",
            "Memory available on this node",
            mem_free.clone(),
        );
        registry.register("jobs", "Jobs on this node, by state", jobs.clone());
        registry.register(
            "cluster_nodes",
            "Members of the cluster, by state (this node's view)",
            nodes.clone(),
        );
        Metrics {
            registry,
            launches,
            placements,
            migrations,
            migration_freeze_seconds: freeze,
            migration_bytes: bytes,
            decisions,
            failures,
            load,
            capacity,
            mem_free,
            jobs,
            nodes,
        }
    }

    pub fn label(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn sample(&self, node: &Node) {
        if let Some(l) = node.view().load(node.id).cloned() {
            self.load.set(l.load_short);
            self.capacity.set(l.capacity);
            self.mem_free
                .set(i64::try_from(l.mem_free).unwrap_or(i64::MAX));
        }
        let bodies = node.jobs.bodies();
        let stopped = bodies
            .iter()
            .filter(|b| b.stopped.load(std::sync::atomic::Ordering::SeqCst))
            .count();
        self.jobs
            .get_or_create(&Metrics::label(&[("state", "running")]))
            .set((bodies.len() - stopped) as i64);
        self.jobs
            .get_or_create(&Metrics::label(&[("state", "stopped")]))
            .set(stopped as i64);
        let views = node.node_views();
        for st in ["up", "suspect", "down", "draining", "left"] {
            let n = views.iter().filter(|v| v.state.as_str() == st).count();
            self.nodes
                .get_or_create(&Metrics::label(&[("state", st)]))
                .set(n as i64);
        }
    }

    pub fn render(&self, node: &Node) -> String {
        self.sample(node);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on its own thread until the node is gone.
pub fn serve(addr: std::net::SocketAddr, node: Weak<Node>) -> std::io::Result<()> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    std::thread::Builder::new()
        .name("krg-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let Some(node) = node.upgrade() else { break };
                let resp = if req.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(node.metrics.render(&node)).with_header(header)
                } else {
                    tiny_http::Response::from_string("krg: only /metrics is served here\n")
                        .with_status_code(404)
                };
                let _ = req.respond(resp);
            }
        })?;
    Ok(())
}

pub type Shared = Arc<Metrics>;
