//! The client socket: how users' `krg` talks to the local krgd.

pub mod client;
pub mod server;

/// Who is asking, as the kernel says (SO_PEERCRED), never as the client says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}
