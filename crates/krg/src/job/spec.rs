//! What a job is started with: the user's request (from `krg run`) and the
//! launch specification the home node sends to the execution node.

use crate::job::caps::{CapChange, Caps};
use krg_types::limits::{ARGV_BYTES_MAX, ENV_BYTES_MAX, ENV_ENTRIES_MAX};
use krg_types::{Gpid, NodeId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Largest number of argv words.
pub const ARGV_WORDS_MAX: usize = 65_536;
/// Longest cwd.
pub const CWD_BYTES_MAX: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// What `krg run` asks for. Who the user is comes from the socket, never
/// from here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    pub argv: Vec<ByteBuf>,
    /// `NAME=VALUE` entries.
    pub env: Vec<ByteBuf>,
    pub cwd: ByteBuf,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    /// A pty of this size, or plain pipes.
    pub tty: Option<TtySize>,
    /// Run exactly there.
    pub node: Option<NodeId>,
    /// Or only on one of these.
    pub nodes: Vec<NodeId>,
    /// Print the gpid and return; output goes to the job log.
    pub detach: bool,
    /// Changes to the capabilities the job would get (`--cap +X`).
    pub caps: Vec<CapChange>,
    /// The balancer never moves this job.
    pub no_migrate: bool,
    /// The job sees its node's /proc, not the cluster's.
    pub local_view: bool,
    /// Distant exec from a job with DISTANT_FORK: if the scheduler keeps
    /// the program here, the client runs it in place (no new job).
    pub distant: bool,
}

/// What the execution node needs to start the body.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub gpid: Gpid,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub user: String,
    pub argv: Vec<ByteBuf>,
    pub env: Vec<ByteBuf>,
    pub cwd: ByteBuf,
    pub umask: u32,
    pub rlimits: Vec<Rlimit>,
    pub tty: Option<TtySize>,
    /// Milliseconds since the epoch when the user asked.
    pub submitted_ms: u64,
    pub caps: Caps,
    pub no_migrate: bool,
    pub local_view: bool,
    /// Nodes the job may run on (`--nodes`); empty: any.
    pub nodes: Vec<NodeId>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command given")]
    NoCommand,
    #[error("the command line is {0} bytes, more than the {ARGV_BYTES_MAX} allowed")]
    ArgvTooLarge(usize),
    #[error("the command line has {0} words, more than the {ARGV_WORDS_MAX} allowed")]
    ArgvTooManyWords(usize),
    #[error("the environment is {0} bytes, more than the {ENV_BYTES_MAX} allowed")]
    EnvTooLarge(usize),
    #[error("the environment has {0} entries, more than the {ENV_ENTRIES_MAX} allowed")]
    EnvTooManyEntries(usize),
    #[error("the working directory must be an absolute path of at most {CWD_BYTES_MAX} bytes")]
    BadCwd,
    #[error("a command word or environment entry contains a NUL byte")]
    Nul,
}

impl RunRequest {
    /// Bounds every field before anything is started.
    pub fn check(&self) -> Result<(), SpecError> {
        check_fields(&self.argv, &self.env, &self.cwd)
    }
}

impl LaunchSpec {
    pub fn check(&self) -> Result<(), SpecError> {
        check_fields(&self.argv, &self.env, &self.cwd)
    }

    /// The command line as text, for listings.
    pub fn command_line(&self) -> String {
        command_line(&self.argv)
    }
}

pub fn command_line(argv: &[ByteBuf]) -> String {
    argv.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_fields(argv: &[ByteBuf], env: &[ByteBuf], cwd: &[u8]) -> Result<(), SpecError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(SpecError::NoCommand);
    }
    if argv.len() > ARGV_WORDS_MAX {
        return Err(SpecError::ArgvTooManyWords(argv.len()));
    }
    let argv_bytes: usize = argv.iter().map(|a| a.len() + 1).sum();
    if argv_bytes > ARGV_BYTES_MAX {
        return Err(SpecError::ArgvTooLarge(argv_bytes));
    }
    if env.len() > ENV_ENTRIES_MAX {
        return Err(SpecError::EnvTooManyEntries(env.len()));
    }
    let env_bytes: usize = env.iter().map(|e| e.len() + 1).sum();
    if env_bytes > ENV_BYTES_MAX {
        return Err(SpecError::EnvTooLarge(env_bytes));
    }
    if !cwd.starts_with(b"/") || cwd.len() > CWD_BYTES_MAX {
        return Err(SpecError::BadCwd);
    }
    if argv.iter().chain(env.iter()).any(|w| w.contains(&0)) || cwd.contains(&0) {
        return Err(SpecError::Nul);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str], env_bytes: usize) -> RunRequest {
        RunRequest {
            argv: argv
                .iter()
                .map(|a| ByteBuf::from(a.as_bytes().to_vec()))
                .collect(),
            env: vec![ByteBuf::from(vec![b'x'; env_bytes])],
            cwd: ByteBuf::from(b"/tmp".to_vec()),
            umask: 0o022,
            rlimits: vec![],
            tty: None,
            node: None,
            nodes: vec![],
            detach: false,
            caps: vec![],
            no_migrate: false,
            local_view: false,
            distant: false,
        }
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(req(&["true"], 10).check(), Ok(()));
        assert_eq!(req(&[], 10).check(), Err(SpecError::NoCommand));
        assert!(matches!(
            req(&["true"], ENV_BYTES_MAX + 1).check(),
            Err(SpecError::EnvTooLarge(_))
        ));
        let mut r = req(&["true"], 1);
        r.cwd = ByteBuf::from(b"relative".to_vec());
        assert_eq!(r.check(), Err(SpecError::BadCwd));
        let r = req(&["a\0b"], 1);
        assert_eq!(r.check(), Err(SpecError::Nul));
    }
}
