//! `krg run`: the deputy. Runs a program on the cluster with its stdin,
//! stdout, stderr, signals and exit status as if it ran here.

use super::deputy::{deputy, isatty, window_size, Outcome};
use crate::job::caps::{CapChange, Which};
use crate::job::spec::{Rlimit, RunRequest, TtySize};
use anyhow::Context;
use krg_types::NodeId;
use serde_bytes::ByteBuf;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Run on this node.
    #[arg(long, short = 'n', value_name = "NODE")]
    pub node: Option<NodeId>,
    /// Run on one of these nodes (comma-separated ids).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NODES",
        conflicts_with = "node"
    )]
    pub nodes: Vec<NodeId>,
    /// Give the job a pseudo-terminal (as ssh -t).
    #[arg(short = 't', conflicts_with = "no_tty")]
    pub tty: bool,
    /// Give the job no pseudo-terminal, even from a terminal (as ssh -T).
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// Read stdin from /dev/null (as ssh -n).
    #[arg(long = "no-stdin")]
    pub no_stdin: bool,
    /// Print the job's gpid and return; its output goes to its log (`krg logs`).
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Change the job's capabilities: +CAP raises, -CAP lowers (effective set).
    #[arg(long = "cap", value_name = "+CAP|-CAP", allow_hyphen_values = true)]
    pub caps: Vec<String>,
    /// Never move this job to balance the load.
    #[arg(long)]
    pub no_migrate: bool,
    /// Let the job see its node's /proc instead of the cluster's.
    #[arg(long)]
    pub local_view: bool,
    /// Used by the preload library for distant exec: run in place if the
    /// scheduler keeps the program on this node.
    #[arg(long, hide = true)]
    pub distant_exec: bool,
    /// argv[0] for the program (distant exec keeps the caller's).
    #[arg(long, hide = true, value_name = "NAME")]
    pub argv0: Option<OsString>,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<OsString>,
}

const RLIMITS: [(&str, libc::__rlimit_resource_t); 9] = [
    ("as", libc::RLIMIT_AS),
    ("core", libc::RLIMIT_CORE),
    ("cpu", libc::RLIMIT_CPU),
    ("data", libc::RLIMIT_DATA),
    ("fsize", libc::RLIMIT_FSIZE),
    ("memlock", libc::RLIMIT_MEMLOCK),
    ("nofile", libc::RLIMIT_NOFILE),
    ("nproc", libc::RLIMIT_NPROC),
    ("stack", libc::RLIMIT_STACK),
];

fn rlimits() -> Vec<Rlimit> {
    RLIMITS
        .iter()
        .filter_map(|(name, res)| {
            let mut r = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into a valid rlimit.
            (unsafe { libc::getrlimit(*res, &mut r) } == 0).then(|| Rlimit {
                resource: (*name).to_string(),
                soft: r.rlim_cur,
                hard: r.rlim_max,
            })
        })
        .collect()
}

fn umask() -> u32 {
    // SAFETY: umask cannot fail; we put the old value back at once.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    }
}

/// Builds the request from this process's environment.
pub fn request(args: &RunArgs) -> anyhow::Result<RunRequest> {
    let cwd = std::env::current_dir().context("cannot tell the current directory")?;
    let want_tty = if args.tty {
        true
    } else if args.no_tty || args.detach {
        false
    } else {
        isatty(0) && isatty(1)
    };
    let tty = want_tty.then(|| {
        let (rows, cols) = window_size().unwrap_or((24, 80));
        TtySize { rows, cols }
    });
    Ok(RunRequest {
        argv: args
            .command
            .iter()
            .map(|a| ByteBuf::from(a.as_bytes().to_vec()))
            .collect(),
        env: std::env::vars_os()
            .map(|(k, v)| {
                let mut e = k.into_vec();
                e.push(b'=');
                e.extend(v.into_vec());
                ByteBuf::from(e)
            })
            .collect(),
        cwd: ByteBuf::from(cwd.into_os_string().into_vec()),
        umask: umask(),
        rlimits: rlimits(),
        tty,
        node: args.node,
        nodes: args.nodes.clone(),
        detach: args.detach,
        caps: args
            .caps
            .iter()
            .map(|c| CapChange::parse(Which::Effective, c))
            .collect::<Result<_, _>>()?,
        no_migrate: args.no_migrate,
        local_view: args.local_view,
        distant: args.distant_exec,
    })
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    let req = request(&args)?;
    match deputy(req, args.no_stdin)? {
        // The control thread may still block in poll(2): leave without waiting.
        Outcome::Exit(code) => std::process::exit(code),
        Outcome::Killed(sig) => die_of(sig),
        Outcome::RunHere {
            pending,
            distant_fork,
        } => {
            // A signal sent while we asked where to run is the program's.
            for sig in pending {
                if matches!(
                    sig,
                    libc::SIGINT
                        | libc::SIGTERM
                        | libc::SIGHUP
                        | libc::SIGQUIT
                        | libc::SIGUSR1
                        | libc::SIGUSR2
                        | libc::SIGALRM
                ) {
                    die_of(sig);
                }
            }
            run_here(&args, distant_fork)
        }
    }
}

/// Dies of `sig`, as the program would have (no core file of ours).
fn die_of(sig: i32) -> ! {
    // SAFETY: setrlimit, signal, sigprocmask and raise with valid arguments.
    unsafe {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &none);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    std::process::exit(128 + sig);
}

/// Becomes the program, as the exec the preload library redirected would
/// have done.
fn run_here(args: &RunArgs, distant_fork: bool) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    // The program stays in its parent's job, with a child's capabilities:
    // the preload library reads this before the job's own.
    cmd.env("KRG_DISTANT_FORK", if distant_fork { "1" } else { "0" });
    if let Some(a0) = &args.argv0 {
        cmd.arg0(a0);
    }
    let err = cmd.exec();
    eprintln!("krg: {}: {err}", program.to_string_lossy());
    Ok(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

/// A command line for `krg rsh`: the words joined and given to a shell.
pub fn shell_command(words: &[OsString]) -> Vec<OsString> {
    let shell = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.shell.into_os_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| OsString::from("/bin/sh"));
    let mut joined = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if i > 0 {
            joined.push(b' ');
        }
        joined.extend_from_slice(w.as_bytes());
    }
    vec![shell, OsString::from("-c"), OsString::from_vec(joined)]
}
