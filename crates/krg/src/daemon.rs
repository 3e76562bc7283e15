//! krgd's start-up: identity (create, join or load), raft, the node port,
//! the client socket and the background tasks.

use crate::cluster::network::Network;
use crate::cluster::state::NodeRecord;
use crate::cluster::types::{Command, Raft};
use crate::gossip::View;
use crate::identity::{ca, tls, Identity, StateDir};
use crate::job::gpid::GpidAllocator;
use crate::job::JobTable;
use crate::node::config::NodeConfig;
use crate::node::{now_ms, Node};
use crate::peer::PeerPool;
use crate::policy::config::SchedFile;
use anyhow::{bail, Context};
use krg_types::NodeState;
use openraft::BasicNode;
use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, UnixListener};

/// Raft timing: a leader is replaced about a second after it dies.
fn raft_config() -> anyhow::Result<openraft::Config> {
    let cfg = openraft::Config {
        cluster_name: "krg".into(),
        heartbeat_interval: 150,
        election_timeout_min: 600,
        election_timeout_max: 1200,
        ..Default::default()
    };
    Ok(cfg.validate()?)
}

/// The address peers should use: explicit, else the listen address, else
/// the first non-loopback IPv4 address of this host.
pub fn advertise_addr(config: &NodeConfig) -> anyhow::Result<SocketAddr> {
    if let Some(a) = config.advertise {
        return Ok(a);
    }
    if !config.listen.ip().is_unspecified() {
        return Ok(config.listen);
    }
    let addrs = nix::ifaddrs::getifaddrs().context("cannot list network interfaces")?;
    for ifa in addrs {
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let ip: Ipv4Addr = sin.ip();
            if !ip.is_loopback() {
                return Ok(SocketAddr::new(IpAddr::V4(ip), config.listen.port()));
            }
        }
    }
    bail!("this host has no non-loopback IPv4 address: pass --advertise IP:PORT")
}

async fn load_or_create_identity(
    config: &NodeConfig,
    dir: &StateDir,
    addr: &str,
) -> anyhow::Result<Identity> {
    if let Some(id) = dir.load()? {
        if config.join.is_some() {
            tracing::warn!(
                cluster = %id.meta.cluster_id,
                node = %id.meta.node_id,
                "this node is already a member; --join ignored"
            );
        }
        return Ok(id);
    }
    let id = match (&config.join, &config.token) {
        (Some(member), Some(token)) => {
            let id = match crate::join::join(member, token, addr).await {
                Ok(id) => id,
                Err(e) => {
                    // Leave nothing behind: an empty directory we made goes.
                    let _ = std::fs::remove_dir(&dir.root);
                    return Err(e)
                        .with_context(|| format!("cannot join the cluster through {member}"));
                }
            };
            eprintln!(
                "krgd: joined cluster {} as node {}",
                id.meta.cluster_id, id.meta.node_id
            );
            id
        }
        _ => {
            let (id, _) = ca::init_cluster(addr)?;
            eprintln!(
                "krgd: created cluster {} (this is node 1)",
                id.meta.cluster_id
            );
            id
        }
    };
    dir.save_new(&id)?;
    Ok(id)
}

/// Binds the client socket, refusing to steal one a live krgd serves.
async fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("another krgd is already serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // Anyone may connect; each request is authorised from SO_PEERCRED.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// First start of a cluster's first node: initialise raft with itself as
/// the only voter and record the cluster's identity.
async fn bootstrap_if_needed(node: &Arc<Node>) -> anyhow::Result<()> {
    let needs_state = node.state.read(|d| d.state.cluster_id.is_empty());
    if node.identity.ca_key_pem.is_none() || node.id.get() != 1 {
        return Ok(());
    }
    if !node.raft.is_initialized().await? {
        let mut members = BTreeMap::new();
        members.insert(
            node.id.as_u64(),
            BasicNode {
                addr: node.addr.clone(),
            },
        );
        node.raft.initialize(members).await?;
    }
    if needs_state {
        let first = NodeRecord {
            id: node.id,
            addr: node.addr.clone(),
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            spki_sha256: ca::spki_sha256_of_pem(&node.identity.node_cert_pem)?,
            state: NodeState::Up,
            version: krg_types::KRG_VERSION.to_string(),
        };
        node.propose(Command::Bootstrap {
            cluster_id: node.identity.meta.cluster_id.clone(),
            ca_cert_pem: node.identity.ca_cert_pem.clone(),
            first,
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot bootstrap the cluster: {e}"))?;
    }
    Ok(())
}

/// `krg-init`: as configured, else next to krgd, else on PATH.
fn init_path(config: &NodeConfig) -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = &config.init {
        return Ok(p.clone());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let p = dir.join("krg-init");
        if p.exists() {
            return Ok(p);
        }
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("krg-init");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("cannot find krg-init next to krgd or on PATH: install it or pass --init PATH")
}

/// A file installed next to krgd (or, for a library, in ../lib).
fn tool_path(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::current_exe().ok()?.parent()?.to_path_buf();
    [dir.join(name), dir.join("../lib").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .and_then(|p| p.canonicalize().ok())
}

/// Applies `--sched-config` through the replicated state (so every node
/// follows it), if it changes anything.
async fn apply_sched_file(node: &Arc<Node>, file: SchedFile) {
    let current = node.state.read(|d| d.state.sched.clone());
    match file.apply(&current) {
        Ok(next) if next == current => {}
        Ok(next) => match node.propose(Command::SetSched(next)).await {
            Ok(_) => tracing::info!("scheduler configuration applied from the config file"),
            Err(e) => {
                tracing::warn!(error = %e.message, "cannot apply the scheduler configuration")
            }
        },
        Err(e) => tracing::warn!(error = %e, "scheduler configuration refused"),
    }
}

pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    // Jobs' init processes are orphaned on purpose by the outer krg-init:
    // they must become our children so we can reap them.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!(
            "cannot become a child subreaper: {}",
            std::io::Error::last_os_error()
        );
    }
    // A bad config file stops us before anything changes.
    let sched_file = match &config.sched_config {
        Some(p) => Some(SchedFile::read(p).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let addr = advertise_addr(&config)?.to_string();
    let dir = StateDir::new(&config.state_dir);
    dir.ensure()?;
    let identity = load_or_create_identity(&config, &dir, &addr).await?;
    if identity.meta.addr != addr {
        bail!(
            "this node joined with address {} but would now advertise {addr}; start it with --advertise {}",
            identity.meta.addr,
            identity.meta.addr
        );
    }
    let id = identity.meta.node_id;
    let (log_store, sm_store) = crate::cluster::store::open(&dir.raft_db())?;
    let state = sm_store.shared.clone();
    let peers = Arc::new(PeerPool::new(tls::client_config(&identity)?));
    let raft = Raft::new(
        id.as_u64(),
        Arc::new(raft_config()?),
        Network {
            peers: peers.clone(),
        },
        log_store,
        sm_store,
    )
    .await
    .context("cannot start raft")?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let server_tls = tls::server_config(&identity)?;
    let logs_dir = dir.path("logs");
    std::fs::create_dir_all(&logs_dir)
        .with_context(|| format!("cannot create {}", logs_dir.display()))?;
    let gpids = GpidAllocator::open(id, dir.path("gpid.next"))?;
    let init_path = init_path(&config)?;
    let node = Arc::new(Node {
        view: Mutex::new(View::new(id, now_ms(), Instant::now())),
        jobs: JobTable::default(),
        gpids,
        init_path: init_path.clone(),
        preload_path: tool_path("libkrg_preload.so"),
        krg_path: tool_path("krg"),
        view_dir: std::sync::OnceLock::new(),
        logs_dir,
        placements: Mutex::new(VecDeque::new()),
        placement_policy: Mutex::new(None),
        spare_links: Default::default(),
        init_pool: Arc::new(crate::job::init_pool::InitPool::new(init_path.clone())),
        events: crate::events::EventLog::new(id),
        metrics: crate::metrics::Metrics::new(),
        criu: crate::criu::CriuRpc::new(),
        me: std::sync::OnceLock::new(),
        view_cache: Arc::new(crate::view::ViewCache::default()),
        config: config.clone(),
        id,
        identity,
        addr,
        raft,
        state,
        peers,
    });
    let _ = node.me.set(Arc::downgrade(&node));
    tokio::spawn(crate::peer::server::serve(
        listener,
        server_tls,
        node.clone(),
    ));
    bootstrap_if_needed(&node).await?;
    let socket = bind_socket(&config.socket).await?;
    tokio::spawn(crate::api::server::serve(socket, node.clone()));
    tokio::spawn(crate::gossip::task::run(node.clone()));
    tokio::spawn(crate::cluster::duties::run(node.clone()));
    tokio::spawn(crate::policy::task::run(node.clone()));
    if let Some(f) = sched_file {
        let n = node.clone();
        tokio::spawn(async move { apply_sched_file(&n, f).await });
    }
    let _view = mount_view(&node);
    if let Some(dir) = node.view_dir.get() {
        node.init_pool.set_view(dir.clone());
    }
    // Jobs' mount namespaces copy the node's, view included: the first
    // waiting init is made once it is mounted.
    node.init_pool.refill();
    let criu = node.criu.binary().to_path_buf();
    let tune_cgroups = !config.no_cgroup_tuning;
    tokio::task::spawn_blocking(move || {
        // Launches and restores move processes into cgroups.
        if tune_cgroups {
            match crate::job::cgroup_moves::ensure() {
                Ok(what) => tracing::info!(%what, "cgroup moves"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot set favordynmods on the cgroup v2 root: a launch after an idle moment waits for the kernel")
                }
            }
        }
        // CRIU's lazy page server needs bigger pipes than the default.
        match crate::features::ensure_pipe_max_size() {
            Ok(what) => tracing::info!(?what, "fs.pipe-max-size"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise fs.pipe-max-size: lazy migration may fail")
            }
        }
        let f = crate::features::get();
        for line in f.render_text().lines() {
            tracing::info!("feature: {line}");
        }
        if f.criu.ok {
            match crate::criu::kdat::prime(&criu) {
                Ok(primed) => tracing::info!(?primed, "CRIU's cache of kernel probes"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prime CRIU's cache of kernel probes: each CRIU start probes the kernel again (about 15 ms)")
                }
            }
        }
    });
    if config.metrics != "none" {
        let addr: SocketAddr = config
            .metrics
            .parse()
            .with_context(|| format!("--metrics {}: not an ip:port address", config.metrics))?;
        crate::metrics::serve(addr, Arc::downgrade(&node))
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
    }
    tracing::info!(node = %node.id, addr = %node.addr, socket = %config.socket.display(), "krgd serving");
    eprintln!("krgd: ready");
    wait_for_shutdown().await;
    tracing::info!("shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(3), node.raft.shutdown()).await;
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Serves the cluster view, unless disabled; a node without FUSE works on,
/// its jobs simply see the node's own /proc.
fn mount_view(node: &Arc<Node>) -> Option<fuser::BackgroundSession> {
    let dir = &node.config.view_dir;
    if dir.as_os_str() == "none" {
        return None;
    }
    tokio::spawn(crate::view::refresh_loop(
        node.clone(),
        node.view_cache.clone(),
    ));
    match crate::view::fs::mount(dir, node.view_cache.clone()) {
        Ok(s) => {
            tracing::info!(dir = %dir.display(), "cluster view mounted");
            let _ = node.view_dir.set(dir.clone());
            Some(s)
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot mount the cluster view; jobs will see this node only");
            None
        }
    }
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
