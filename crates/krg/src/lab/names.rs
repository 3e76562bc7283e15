//! Names, addresses and paths of a lab: everything derived from the lab's
//! name, its index and a node number K.
//!
//! A lab named `x` with index `i` has the switch namespace `krg-x-sw` (bridge
//! `br0`), node namespaces `krg-x-n<K>`, the subnet `10.213.<i>.0/24` with node
//! K at `10.213.<i>.K`, and its files under `/run/krg-lab/x/`.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;

use anyhow::{bail, Result};

/// Where every lab keeps its files (`<RUN_DIR>/<name>/`) and its index
/// reservations (`<RUN_DIR>/.index/<index>`).
pub const RUN_DIR: &str = "/run/krg-lab";
/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The name of the lab used when none is given.
pub const DEFAULT_NAME: &str = "krg";
/// Lab names are short so that namespace names stay readable and every
/// derived name fits the kernel's limits.
pub const NAME_BYTES_MAX: usize = 12;
/// At most this many nodes per lab: the node number is the last byte of the
/// address, and each node costs a daemon and a few links.
pub const NODES_MAX: u32 = 64;
/// The port every `krgd` listens on.
pub const NODE_PORT: u16 = 7470;
/// The bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// The node's end of its veth pair, created under this name directly inside
/// the node's namespace.
pub const NODE_LINK: &str = "eth0";
/// Interface names are at most 15 bytes (IFNAMSIZ - 1).
const LINK_NAME_BYTES_MAX: usize = 15;

const _: () = assert!(
    NODES_MAX < 255,
    "a node number is the last byte of an address"
);
// "krg-" + name + "-n64" must stay a sane file name; veth "kl255n64" fits IFNAMSIZ.
const _: () = assert!(NAME_BYTES_MAX + 8 < 64);

/// Check a lab name: 1 to 12 characters from `a-z` and `0-9`.
pub fn validate_name(name: &str) -> Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.is_empty() || name.len() > NAME_BYTES_MAX || !valid_chars {
        bail!(
            "krg lab: invalid lab name {name:?} (use 1 to {NAME_BYTES_MAX} characters from a-z and 0-9)"
        );
    }
    Ok(())
}

/// Check a node count given to `up`.
pub fn validate_node_count(nodes: u32) -> Result<()> {
    if !(1..=NODES_MAX).contains(&nodes) {
        bail!("krg lab: cannot make a lab of {nodes} nodes (the limit is 1 to {NODES_MAX})");
    }
    Ok(())
}

/// Every name and path that belongs to one lab.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    name: String,
}

impl Names {
    /// Names for the lab `name`, which must be valid.
    pub fn new(name: &str) -> Result<Names> {
        validate_name(name)?;
        Ok(Names {
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/krg-lab/<name>`: everything the lab writes lives below it.
    pub fn dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(&self.name)
    }

    /// `lab.json`: what was made (see `record.rs`).
    pub fn record_path(&self) -> PathBuf {
        self.dir().join("lab.json")
    }

    /// Taken (flock) while `lab.json` is rewritten.
    pub fn lock_path(&self) -> PathBuf {
        self.dir().join("lab.lock")
    }

    /// The image store shared by every node of the lab.
    pub fn images_dir(&self) -> PathBuf {
        self.dir().join("images")
    }

    /// The directory each node has its own of (see `local_dir.rs`).
    pub fn local_dir(&self) -> PathBuf {
        self.dir().join("local")
    }

    pub fn node_dir(&self, k: u32) -> PathBuf {
        self.dir().join(format!("n{k}"))
    }

    pub fn state_dir(&self, k: u32) -> PathBuf {
        self.node_dir(k).join("state")
    }

    pub fn socket(&self, k: u32) -> PathBuf {
        self.node_dir(k).join("krgd.sock")
    }

    pub fn log(&self, k: u32) -> PathBuf {
        self.node_dir(k).join("krgd.log")
    }

    /// The file a node's persistent UTS namespace is bind-mounted on.
    pub fn uts_file(&self, k: u32) -> PathBuf {
        self.node_dir(k).join("uts")
    }

    /// Every namespace of this lab starts with this prefix.
    pub fn netns_prefix(&self) -> String {
        format!("krg-{}-", self.name)
    }

    pub fn switch_netns(&self) -> String {
        format!("krg-{}-sw", self.name)
    }

    pub fn node_netns(&self, k: u32) -> String {
        format!("krg-{}-n{k}", self.name)
    }

    /// Whether `netns` is one of this lab's namespaces (`krg-<name>-sw` or
    /// `krg-<name>-n<digits>`), and not another lab's whose name merely
    /// starts the same way.
    pub fn owns_netns(&self, netns: &str) -> bool {
        let Some(rest) = netns.strip_prefix(&self.netns_prefix()) else {
            return false;
        };
        rest == "sw"
            || rest.strip_prefix('n').is_some_and(|digits| {
                !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
            })
    }
}

/// The lab name a namespace name belongs to, if it looks like a lab's.
pub fn lab_of_netns(netns: &str) -> Option<String> {
    let rest = netns.strip_prefix("krg-")?;
    let (name, _) = rest.rsplit_once('-')?;
    let names = Names::new(name).ok()?;
    names.owns_netns(netns).then(|| name.to_string())
}

pub fn netns_path(netns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(netns)
}

/// The host name of node K.
pub fn hostname(k: u32) -> String {
    format!("krg-lab-{k}")
}

/// The switch's end of node K's veth pair (inside the switch namespace).
pub fn switch_link(index: u8, k: u32) -> String {
    let link = format!("kl{index}n{k}");
    assert!(link.len() <= LINK_NAME_BYTES_MAX);
    link
}

pub fn node_addr(index: u8, k: u32) -> Ipv4Addr {
    assert!((1..=NODES_MAX).contains(&k));
    let k = u8::try_from(k).expect("node numbers fit in a byte (NODES_MAX < 255)");
    Ipv4Addr::new(10, 213, index, k)
}

pub fn node_listen_addr(index: u8, k: u32) -> SocketAddrV4 {
    SocketAddrV4::new(node_addr(index, k), NODE_PORT)
}

pub fn subnet(index: u8) -> String {
    format!("10.213.{index}.0/24")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("krg").is_ok());
        assert!(validate_name("t1234x56").is_ok());
        assert!(validate_name("abcdefghijkl").is_ok());
        assert!(validate_name("abcdefghijklm").is_err());
        assert!(validate_name("").is_err());
        assert!(validate_name("a-b").is_err());
        assert!(validate_name("A").is_err());
        assert!(validate_name("../x").is_err());
    }

    #[test]
    fn namespaces_belong_to_one_lab() {
        let names = Names::new("t1").expect("valid");
        assert!(names.owns_netns("krg-t1-sw"));
        assert!(names.owns_netns("krg-t1-n12"));
        assert!(!names.owns_netns("krg-t12-n1"));
        assert!(!names.owns_netns("krg-t1-n"));
        assert!(!names.owns_netns("krg-t1-nx"));
        assert_eq!(lab_of_netns("krg-t12-n3").as_deref(), Some("t12"));
        assert_eq!(lab_of_netns("krg-t12-sw").as_deref(), Some("t12"));
        assert_eq!(lab_of_netns("krg-t12-x"), None);
        assert_eq!(lab_of_netns("other"), None);
    }

    #[test]
    fn link_names_fit() {
        assert_eq!(switch_link(255, NODES_MAX), "kl255n64");
        assert_eq!(node_addr(7, 3), Ipv4Addr::new(10, 213, 7, 3));
    }
}
