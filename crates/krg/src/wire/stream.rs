//! A job's streams: frames between the deputy side (home krgd, and the
//! `krg run` client behind it) and the body (the execution node's krgd).
//!
//! The same frames travel client ⇄ home krgd (Unix socket) and home krgd ⇄
//! execution krgd (a TLS `Stream` connection), so the home node relays them
//! without re-encoding their meaning. Back-pressure is the transport's: a
//! side that cannot deliver a frame stops reading, the sender's socket
//! buffer fills, and the job's pipe writes block.

use crate::job::spec::LaunchSpec;
use crate::wire::RemoteError;
use krg_types::{Gpid, NodeId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Towards the body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToBody {
    /// First frame on a stream connection: start this job.
    Launch(Box<LaunchSpec>),
    Stdin(ByteBuf),
    /// The deputy's stdin reached end of file.
    StdinEof,
    Signal(i32),
    Resize {
        rows: u16,
        cols: u16,
    },
    /// The deputy went away: hang the job up, as sshd does.
    Hangup,
    /// The deputy side holds back further frames: the body may move.
    Hold,
    /// First frame of a stream connection to a body that moved or was
    /// restarted here: attach to it.
    Reattach(Gpid),
    /// Home side, after the job's `Exited`: nothing more comes for this
    /// job, and the connection waits for its next first frame (`Launch` or
    /// `Reattach`), as a spare (`job::spare_link`). Node to node only.
    Release,
}

/// From the body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromBody {
    Started {
        gpid: Gpid,
        node: NodeId,
    },
    /// The job could not start; `exit_code` is what a shell would return
    /// (127 for a command not found, 126 for not executable).
    Failed {
        error: RemoteError,
        exit_code: i32,
    },
    Stdout(ByteBuf),
    Stderr(ByteBuf),
    /// This many stdin bytes were delivered to the job: the deputy may send
    /// that much more (stdin credit, so signals never wait behind data the
    /// job does not read).
    StdinAck(u64),
    Exited(ExitStatus),
    /// The execution node is gone (sent by the home node to its deputy).
    Lost {
        node: NodeId,
    },
    /// Distant exec: the scheduler keeps the program on this node; the
    /// client runs it in place.
    RunHere {
        distant_fork: bool,
    },
    /// The body is about to be frozen: hold back frames (answer `Hold`).
    Moving,
    /// The body runs on this node now: reattach there.
    Moved {
        node: NodeId,
    },
    /// The move did not happen: the body goes on here; send again.
    Resumed,
    /// The body was saved as this image version and stopped running; it
    /// may be restarted (`krg restart`), and the deputy may wait for it.
    Checkpointed {
        version: u32,
    },
}

/// How a job ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal { signal: i32, core: bool },
}

impl ExitStatus {
    /// The status a shell reports: the code, or 128 + the signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal { signal, .. } => 128 + signal,
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit {c}"),
            ExitStatus::Signal { signal, core } => {
                let name = nix::sys::signal::Signal::try_from(*signal)
                    .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_string());
                write!(
                    f,
                    "killed by {name}{}",
                    if *core { " (core dumped)" } else { "" }
                )
            }
        }
    }
}
