//! `krg run`: the deputy. Runs a program on the cluster with its stdin,
//! stdout, stderr, signals and exit status as if it ran here.

use crate::api::client::{socket_path, Client};
use crate::job::caps::{CapChange, Which};
use crate::job::spec::{Rlimit, RunRequest, TtySize};
use crate::wire::client::ClientRequest;
use crate::wire::stream::{FromBody, ToBody};
use anyhow::Context;
use futures::{SinkExt, StreamExt};
use krg_types::limits::STREAM_WINDOW_BYTES;
use krg_types::NodeId;
use serde_bytes::ByteBuf;
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};

/// Bytes of stdin sent in one frame.
const STDIN_CHUNK_BYTES: usize = 64 << 10;

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

fn isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn window_size() -> Option<TtySize> {
    let mut ws: libc::winsize = unsafe_zeroed_winsize();
    for fd in [1, 0, 2] {
        // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some(TtySize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

fn unsafe_zeroed_winsize() -> libc::winsize {
    libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
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
    let tty = want_tty.then(|| window_size().unwrap_or(TtySize { rows: 24, cols: 80 }));
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
    // One worker besides the thread in `block_on` (which relays the job's
    // output): a second one cost 0.3 ms of a `krg run true` (threads made
    // and woken on a 2-CPU node, measured side by side) and bought nothing.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    match runtime.block_on(deputy(req, args.no_stdin))? {
        // The stdin thread may still block in read(2): leave without waiting.
        Outcome::Exit(code) => std::process::exit(code),
        Outcome::Killed(sig) => die_of(sig),
        Outcome::RunHere {
            pending,
            distant_fork,
        } => {
            drop(runtime);
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

/// How a `krg run` ended.
pub enum Outcome {
    Exit(i32),
    /// Distant exec and the scheduler keeps the program here; the signals
    /// that came meanwhile are for the program.
    RunHere {
        pending: Vec<i32>,
        distant_fork: bool,
    },
    /// Distant exec of a program killed by this signal: its parent must
    /// see it killed by it, as a local child would be.
    Killed(i32),
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

/// The terminal in raw mode while a pty job runs, restored on drop.
struct RawTerminal {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSADRAIN, &raw);
        RawTerminal { saved: Some(saved) }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSADRAIN,
                saved,
            );
        }
    }
}

/// Talks to krgd for the job's whole life; returns the exit code.
pub async fn deputy(req: RunRequest, no_stdin: bool) -> anyhow::Result<Outcome> {
    // Writes to krgd after it closed, or to a closed stdout, must fail
    // (and be handled) rather than kill us silently.
    // SAFETY: signal with constant arguments.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let tty = req.tty.is_some();
    let detach = req.detach;
    let distant = req.distant;
    let signals = catch_signals();
    let mut client =
        Client::connect_with(&socket_path(), &ClientRequest::Run(Box::new(req))).await?;
    let first: FromBody = client
        .conn
        .recv()
        .await
        .context("krgd closed the connection")?;
    let (gpid, _node) = match first {
        FromBody::Started { gpid, node } => (gpid, node),
        FromBody::Failed { error, exit_code } => {
            eprintln!("krg: {}", error.message);
            return Ok(Outcome::Exit(exit_code));
        }
        FromBody::RunHere { distant_fork } => {
            let mut signals = signals;
            let mut pending = Vec::new();
            while let Ok(sig) = signals.try_recv() {
                pending.push(sig);
            }
            return Ok(Outcome::RunHere {
                pending,
                distant_fork,
            });
        }
        other => anyhow::bail!("krgd answered with something unexpected ({other:?})"),
    };
    if detach {
        println!("{gpid}");
        return Ok(Outcome::Exit(0));
    }
    let _raw = (tty && isatty(0)).then(RawTerminal::enter);
    let (mut sink, mut stream) = client.conn.into_inner().split();
    // Frames to krgd, each with an optional note of when it is written.
    let (tx, mut rx) = mpsc::channel::<Outgoing>(16);
    tokio::spawn(async move {
        while let Some((frame, written)) = rx.recv().await {
            let Ok(bytes) = crate::wire::encode(&frame) else {
                continue;
            };
            if sink.send(bytes).await.is_err() {
                break;
            }
            if let Some(w) = written {
                let _ = w.send(());
            }
        }
    });
    let credit = Arc::new(Semaphore::new(STREAM_WINDOW_BYTES as usize));
    if no_stdin {
        let _ = tx.send((ToBody::StdinEof, None)).await;
    } else {
        spawn_stdin_reader(tx.clone(), credit.clone());
    }
    tokio::spawn(forward_signals(tx.clone(), tty, signals));
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut code = None;
    while let Some(frame) = stream.next().await {
        let Ok(frame) = frame else { break };
        let msg: FromBody = crate::wire::decode(&frame)?;
        match msg {
            FromBody::Stdout(b) => {
                let r = tokio::task::block_in_place(|| {
                    out.write_all(&b)?;
                    out.flush()
                });
                output_result(r, &tx).await?;
            }
            FromBody::Stderr(b) => {
                let r = tokio::task::block_in_place(|| {
                    err.write_all(&b)?;
                    err.flush()
                });
                output_result(r, &tx).await?;
            }
            FromBody::StdinAck(n) => credit.add_permits(n as usize),
            FromBody::Failed { error, .. } => eprintln!("krg: {}", error.message),
            FromBody::Exited(s) => {
                if let (true, crate::wire::stream::ExitStatus::Signal { signal, .. }) = (distant, s)
                {
                    drop(_raw);
                    return Ok(Outcome::Killed(signal));
                }
                code = Some(s.shell_code());
                break;
            }
            FromBody::Lost { node } => {
                drop(_raw);
                eprintln!("krg: node {node} went down while running job {gpid}");
                return Ok(Outcome::Exit(255));
            }
            // Moves are the deputy side's business (krgd); never seen here.
            FromBody::Started { .. }
            | FromBody::RunHere { .. }
            | FromBody::Moving
            | FromBody::Moved { .. }
            | FromBody::Resumed
            | FromBody::Checkpointed { .. } => {}
        }
    }
    drop(_raw);
    match code {
        Some(c) => Ok(Outcome::Exit(c)),
        None => {
            eprintln!("krg: lost the connection to krgd while running job {gpid}");
            Ok(Outcome::Exit(255))
        }
    }
}

/// A frame for krgd, and who wants to know once it is written.
type Outgoing = (ToBody, Option<tokio::sync::oneshot::Sender<()>>);

/// Sends a frame and waits (a little) until it is written to krgd.
async fn send_written(tx: &mpsc::Sender<Outgoing>, frame: ToBody) {
    let (w, written) = tokio::sync::oneshot::channel();
    if tx.send((frame, Some(w))).await.is_ok() {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), written).await;
    }
}

/// Where our output has gone away (`krg run yes | head -1`), the job gets
/// the SIGPIPE a local writer would, and so do we.
async fn output_result(r: std::io::Result<()>, tx: &mpsc::Sender<Outgoing>) -> anyhow::Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            send_written(tx, ToBody::Signal(libc::SIGPIPE)).await;
            // SAFETY: signal and raise with constant arguments.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads our stdin on its own thread (a read(2) on a terminal or pipe
/// cannot be cancelled) and sends it within the credit the body grants.
fn spawn_stdin_reader(tx: mpsc::Sender<Outgoing>, credit: Arc<Semaphore>) {
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; STDIN_CHUNK_BYTES];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            let Ok(permit) = handle.block_on(credit.acquire_many(n as u32)) else {
                return;
            };
            permit.forget();
            if tx
                .blocking_send((ToBody::Stdin(ByteBuf::from(buf[..n].to_vec())), None))
                .is_err()
            {
                return;
            }
        }
        let _ = tx.blocking_send((ToBody::StdinEof, None));
    });
}

/// Signals to forward to the job, caught from the moment `krg run`
/// starts: one that comes before the job is running is held and delivered
/// once it is (a build interrupted at any moment stops everywhere).
fn catch_signals() -> mpsc::Receiver<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let kinds = [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
        libc::SIGTSTP,
        libc::SIGCONT,
        libc::SIGALRM,
    ];
    let (sig_tx, sig_rx) = mpsc::channel::<i32>(64);
    for k in kinds {
        let Ok(mut s) = signal(SignalKind::from_raw(k)) else {
            continue;
        };
        let sig_tx = sig_tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if sig_tx.send(k).await.is_err() {
                    break;
                }
            }
        });
    }
    sig_rx
}

/// Signals sent to `krg run` go to the job.
async fn forward_signals(tx: mpsc::Sender<Outgoing>, tty: bool, mut sig_rx: mpsc::Receiver<i32>) {
    while let Some(sig) = sig_rx.recv().await {
        let frame = match sig {
            libc::SIGWINCH if tty => match window_size() {
                Some(sz) => ToBody::Resize {
                    rows: sz.rows,
                    cols: sz.cols,
                },
                None => continue,
            },
            libc::SIGWINCH => continue,
            s => ToBody::Signal(s),
        };
        if sig == libc::SIGTSTP {
            // The job must hear it before we stop ourselves.
            send_written(&tx, frame).await;
        } else if tx.send((frame, None)).await.is_err() {
            break;
        }
        if sig == libc::SIGTSTP {
            // The job is stopped; stop ourselves too so the shell's job
            // control sees it (SIGCONT later resumes both).
            // SAFETY: raise has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
    }
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
