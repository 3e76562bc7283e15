//! krgd's settings, from its command line.

use crate::probe::LoadScope;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/krg";
pub const DEFAULT_SOCKET: &str = "/run/krg/krgd.sock";
pub const DEFAULT_PORT: u16 = 7470;
pub const DEFAULT_VIEW_DIR: &str = "/run/krg/view";

#[derive(Clone, Debug, clap::Args)]
pub struct NodeConfig {
    /// Where the node keeps its identity and the replicated state.
    #[arg(long, env = "KRG_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The Unix socket users' `krg` talks to.
    #[arg(long, env = "KRG_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Address of the node port (mutual TLS).
    #[arg(long, default_value = "0.0.0.0:7470")]
    pub listen: std::net::SocketAddr,
    /// Address other nodes use to reach this one (default: the listen
    /// address, or this host's first non-loopback IPv4 address).
    #[arg(long)]
    pub advertise: Option<std::net::SocketAddr>,
    /// Join the cluster of the node at this address (needs --token).
    #[arg(long, requires = "token")]
    pub join: Option<String>,
    /// Join token printed by `krg cluster token` on a member.
    #[arg(long, requires = "join")]
    pub token: Option<String>,
    /// Silence after which a peer is shown as suspect.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub suspect_after: Duration,
    /// Silence after which the leader declares a peer down.
    #[arg(long, default_value = "4s", value_parser = humantime::parse_duration)]
    pub down_after: Duration,
    /// Time between gossip rounds.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub gossip_interval: Duration,
    /// Where the cluster view (FUSE) is mounted; `none` to serve none.
    #[arg(long, env = "KRG_VIEW_DIR", default_value = DEFAULT_VIEW_DIR)]
    pub view_dir: PathBuf,
    /// Where checkpoints and migration images go: a file system every node
    /// shares, at the same path (NFS, CephFS, ...).
    #[arg(long, env = "KRG_IMAGE_STORE", default_value = "/var/lib/krg/images")]
    pub image_store: PathBuf,
    /// CRIU's log level for checkpoints and moves (0-4; 4 logs every page
    /// map and slows large dumps; 2 keeps errors and warnings).
    #[arg(long, env = "KRG_CRIU_LOG_LEVEL", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=4))]
    pub criu_log_level: u32,
    /// The scheduler's configuration (TOML), applied to the whole cluster at start.
    #[arg(long, value_name = "FILE")]
    pub sched_config: Option<PathBuf>,
    /// Where `/metrics` (Prometheus) is served; `none` for nowhere.
    #[arg(long, default_value = "127.0.0.1:9470")]
    pub metrics: String,
    /// Leave the cgroup v2 root's mount options alone: without
    /// `favordynmods`, a launch after an idle moment waits 7-15 ms for the
    /// kernel (see docs/performance.md).
    #[arg(long)]
    pub no_cgroup_tuning: bool,
    /// The krg-init binary (default: next to krgd, else on PATH).
    #[arg(long, env = "KRG_INIT")]
    pub init: Option<PathBuf>,
    /// Whose load this node reports: the machine's, or its cgroup's (lab nodes).
    #[arg(long, value_enum, default_value = "system")]
    pub load_scope: LoadScope,
}
