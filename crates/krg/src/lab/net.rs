//! The lab's network, made with iproute2: a switch namespace holding a
//! bridge, and one namespace per node joined to it by a veth pair.
//!
//! Nothing is added to the host's own namespace: the veth pairs are created
//! inside the switch namespace with their peer directly in the node's.

use std::ffi::OsStr;
use std::fs;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::names::{self, Names, BRIDGE, NETNS_DIR, NODE_LINK};

/// Run `ip ARGS...`; on failure, an error naming the command and what `ip`
/// said.
fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<Vec<u8>> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("krg lab: cannot run `ip` (is iproute2 installed?)")?;
    if !output.status.success() {
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        bail!(
            "krg lab: `ip {}` failed: {}",
            shown.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output.stdout)
}

/// Create the switch namespace and its bridge, up.
pub fn create_switch(names: &Names) -> Result<()> {
    let sw = names.switch_netns();
    ip(&["netns", "add", &sw])?;
    ip(&["-n", &sw, "link", "set", "lo", "up"])?;
    ip(&["-n", &sw, "link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["-n", &sw, "link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Create node K's namespace (lo up, `eth0` up with its address) and its
/// veth pair to the bridge.
pub fn create_node(names: &Names, index: u8, k: u32) -> Result<()> {
    let sw = names.switch_netns();
    let node = names.node_netns(k);
    let port = names::switch_link(index, k);
    let addr = format!("{}/24", names::node_addr(index, k));
    ip(&["netns", "add", &node])?;
    ip(&["-n", &node, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", NODE_LINK, "netns", &node,
    ])?;
    ip(&["-n", &sw, "link", "set", &port, "master", BRIDGE])?;
    ip(&["-n", &sw, "link", "set", &port, "up"])?;
    ip(&["-n", &node, "addr", "add", &addr, "dev", NODE_LINK])?;
    ip(&["-n", &node, "link", "set", NODE_LINK, "up"])?;
    Ok(())
}

/// Cut (`down`) or heal (`up`) node K's link, on the switch side.
pub fn set_link(names: &Names, index: u8, k: u32, up: bool) -> Result<()> {
    let port = names::switch_link(index, k);
    let state = if up { "up" } else { "down" };
    ip(&["-n", &names.switch_netns(), "link", "set", &port, state])?;
    Ok(())
}

/// Whether node K's switch port is administratively down (cut).
pub fn is_cut(names: &Names, index: u8, k: u32) -> Result<bool> {
    let port = names::switch_link(index, k);
    let out = ip(&[
        "-n",
        &names.switch_netns(),
        "-j",
        "link",
        "show",
        "dev",
        &port,
    ])?;
    let links: serde_json::Value =
        serde_json::from_slice(&out).context("krg lab: cannot parse `ip -j link show`")?;
    let flags = links
        .get(0)
        .and_then(|l| l.get("flags"))
        .and_then(|f| f.as_array())
        .with_context(|| format!("krg lab: `ip -j link show dev {port}` gave no flags"))?;
    Ok(!flags.iter().any(|f| f.as_str() == Some("UP")))
}

/// Every named network namespace (the entries of /run/netns).
pub fn list_netns() -> Vec<String> {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    found.sort();
    found
}

/// This lab's namespaces that exist now.
pub fn lab_netns(names: &Names) -> Vec<String> {
    list_netns()
        .into_iter()
        .filter(|ns| names.owns_netns(ns))
        .collect()
}

pub fn delete_netns(netns: &str) -> Result<()> {
    ip(&["netns", "del", netns])?;
    Ok(())
}
