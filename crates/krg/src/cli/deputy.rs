//! The deputy of `krg run` and `krg rsh`: talks to krgd for the job's whole
//! life, as `ssh host cmd` talks to its server.
//!
//! Plain threads and blocking calls, no async runtime: `krg run true` is
//! started more than anything else krg has, and a runtime's threads, its
//! signal handlers and their wake-ups were a measurable part of it. Two
//! threads:
//!
//! - the main thread reads krgd's frames and writes the job's output, so
//!   that a slow reader of our stdout slows the job (back-pressure);
//! - the control thread polls a signalfd, our stdin (within the credit the
//!   body grants) and a wake-up pipe, and writes frames to krgd. Signals
//!   are caught from the first instruction of the deputy (blocked, then
//!   read from the signalfd), so one sent before the job runs is delivered
//!   once it does, and a blocked output write never holds one back.

use crate::api::client::socket_path;
use crate::job::spec::RunRequest;
use crate::wire::client::ClientRequest;
use crate::wire::stream::{ExitStatus, FromBody, ToBody};
use crate::wire::{ConnKind, Hello, RemoteError};
use anyhow::Context;
use krg_types::limits::{FRAME_BYTES_MAX, STREAM_WINDOW_BYTES};
use serde::{de::DeserializeOwned, Serialize};
use serde_bytes::ByteBuf;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes of stdin sent in one frame.
const STDIN_CHUNK_BYTES: usize = 64 << 10;

/// Signals sent to the deputy that go to the job.
pub const FORWARDED: [i32; 10] = [
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

/// Talks to krgd for the job's whole life.
pub fn deputy(req: RunRequest, no_stdin: bool) -> anyhow::Result<Outcome> {
    // Writes to krgd after it closed, or to a closed stdout, must fail
    // (and be handled) rather than kill us silently.
    // SAFETY: signal with constant arguments.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let signals = Signals::catch()?;
    let tty = req.tty.is_some();
    let detach = req.detach;
    let distant = req.distant;
    let mut conn = connect(&req)?;
    let first: FromBody = conn.recv()?.context("krgd closed the connection")?;
    let gpid = match first {
        FromBody::Started { gpid, .. } => gpid,
        FromBody::Failed { error, exit_code } => {
            eprintln!("krg: {}", error.message);
            return Ok(Outcome::Exit(exit_code));
        }
        FromBody::RunHere { distant_fork } => {
            let pending = signals.release();
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
    let raw = (tty && isatty(0)).then(RawTerminal::enter);
    let writer = Arc::new(Mutex::new(conn.stream.try_clone()?));
    let control = Control::new(writer.clone(), signals, tty, no_stdin)?;
    let credit = control.credit.clone();
    let wake = control.wake_write.try_clone()?;
    std::thread::Builder::new()
        .name("krg-run-control".into())
        .spawn(move || control.run())?;
    let ending = relay(&mut conn, &writer, &credit, &wake);
    drop(raw);
    Ok(match ending {
        Ending::Exited(s) => match (distant, s) {
            (true, ExitStatus::Signal { signal, .. }) => Outcome::Killed(signal),
            _ => Outcome::Exit(s.shell_code()),
        },
        Ending::Lost { node } => {
            eprintln!("krg: node {node} went down while running job {gpid}");
            Outcome::Exit(255)
        }
        Ending::Disconnected => {
            eprintln!("krg: lost the connection to krgd while running job {gpid}");
            Outcome::Exit(255)
        }
        Ending::OutputGone(e) => return Err(e.into()),
    })
}

enum Ending {
    Exited(ExitStatus),
    Lost { node: krg_types::NodeId },
    Disconnected,
    OutputGone(std::io::Error),
}

/// Reads krgd's frames until the job ends, writing its output.
fn relay(
    conn: &mut Conn,
    writer: &Mutex<UnixStream>,
    credit: &AtomicU64,
    wake: &OwnedFd,
) -> Ending {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    loop {
        let msg = match conn.recv::<FromBody>() {
            Ok(Some(msg)) => msg,
            Ok(None) | Err(_) => return Ending::Disconnected,
        };
        let written = match msg {
            FromBody::Stdout(b) => out.write_all(&b).and_then(|()| out.flush()),
            FromBody::Stderr(b) => err.write_all(&b).and_then(|()| err.flush()),
            FromBody::StdinAck(n) => {
                credit.fetch_add(n, Ordering::SeqCst);
                poke(wake);
                Ok(())
            }
            FromBody::Failed { error, .. } => {
                eprintln!("krg: {}", error.message);
                Ok(())
            }
            FromBody::Exited(s) => return Ending::Exited(s),
            FromBody::Lost { node } => return Ending::Lost { node },
            // Moves are the deputy side's business (krgd); never seen here.
            FromBody::Started { .. }
            | FromBody::RunHere { .. }
            | FromBody::Moving
            | FromBody::Moved { .. }
            | FromBody::Resumed
            | FromBody::Checkpointed { .. } => Ok(()),
        };
        if let Err(e) = written {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                // Our reader went away (`krg run yes | head -1`): the job
                // gets the SIGPIPE a local writer would, and so do we.
                let _ = send(writer, &ToBody::Signal(libc::SIGPIPE));
                // SAFETY: signal and raise with constant arguments.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                    libc::raise(libc::SIGPIPE);
                }
            }
            return Ending::OutputGone(e);
        }
    }
}

/// The connection to krgd: a Unix socket of length-prefixed frames.
struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    /// The next message; `None` at a clean end.
    fn recv<T: DeserializeOwned>(&mut self) -> anyhow::Result<Option<T>> {
        let mut len = [0u8; 4];
        match self.stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        anyhow::ensure!(
            len <= FRAME_BYTES_MAX,
            "krgd sent a frame of {len} bytes, more than the {FRAME_BYTES_MAX} allowed"
        );
        self.buf.resize(len, 0);
        self.stream.read_exact(&mut self.buf)?;
        Ok(Some(crate::wire::decode(&self.buf)?))
    }
}

fn frame<T: Serialize>(msg: &T) -> anyhow::Result<Vec<u8>> {
    let body = postcard::to_stdvec(msg)?;
    let len = u32::try_from(body.len()).context("a frame too large")?;
    let mut f = Vec::with_capacity(4 + body.len());
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&body);
    Ok(f)
}

fn send(writer: &Mutex<UnixStream>, msg: &ToBody) -> anyhow::Result<()> {
    let f = frame(msg)?;
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(&f)?;
    Ok(())
}

/// Connects and sends the request right behind the greeting, without
/// waiting for krgd's answer to it (a round trip less).
fn connect(req: &RunRequest) -> anyhow::Result<Conn> {
    let path = socket_path();
    let mut stream =
        UnixStream::connect(&path).map_err(|source| crate::api::client::ClientError::Connect {
            path: path.clone(),
            source,
        })?;
    let mut first = frame(&Hello::new(ConnKind::Client))?;
    first.extend(frame(&ClientRequest::Run(Box::new(req.clone())))?);
    stream.write_all(&first)?;
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    let hello: Result<(), RemoteError> = conn.recv()?.context("krgd closed the connection")?;
    hello?;
    Ok(conn)
}

/// The forwarded signals, blocked in every thread and read from a signalfd.
struct Signals {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl Signals {
    fn catch() -> anyhow::Result<Signals> {
        // SAFETY: sigset operations on a local set; sigprocmask with valid
        // pointers; signalfd on that set returns a new descriptor or -1.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in FORWARDED {
                libc::sigaddset(&mut set, s);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask);
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
                return Err(anyhow::anyhow!("cannot catch signals: {e}"));
            }
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
                old_mask,
            })
        }
    }

    /// The next caught signal, if one is pending.
    fn next(&self) -> Option<i32> {
        // SAFETY: signalfd_siginfo is plain data; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading into a buffer of `size` bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }

    /// Puts the signal mask back, returning the signals that came meanwhile
    /// (the program we become must see them).
    fn release(self) -> Vec<i32> {
        let mut pending = Vec::new();
        while let Some(s) = self.next() {
            pending.push(s);
        }
        // SAFETY: the mask saved by `catch`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
        pending
    }
}

/// The control thread's state.
struct Control {
    writer: Arc<Mutex<UnixStream>>,
    signals: Signals,
    tty: bool,
    stdin_open: bool,
    credit: Arc<AtomicU64>,
    wake_read: OwnedFd,
    wake_write: OwnedFd,
}

impl Control {
    fn new(
        writer: Arc<Mutex<UnixStream>>,
        signals: Signals,
        tty: bool,
        no_stdin: bool,
    ) -> anyhow::Result<Control> {
        let (wake_read, wake_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
        let c = Control {
            writer,
            signals,
            tty,
            stdin_open: !no_stdin,
            credit: Arc::new(AtomicU64::new(STREAM_WINDOW_BYTES)),
            wake_read,
            wake_write,
        };
        if no_stdin {
            send(&c.writer, &ToBody::StdinEof)?;
        }
        Ok(c)
    }

    /// Forwards signals and stdin until krgd goes away.
    fn run(mut self) {
        let mut buf = vec![0u8; STDIN_CHUNK_BYTES];
        loop {
            let want_stdin = self.stdin_open && self.credit.load(Ordering::SeqCst) > 0;
            let stdin = std::io::stdin();
            let mut fds = vec![
                nix::poll::PollFd::new(self.signals.fd.as_fd(), nix::poll::PollFlags::POLLIN),
                nix::poll::PollFd::new(self.wake_read.as_fd(), nix::poll::PollFlags::POLLIN),
            ];
            if want_stdin {
                fds.push(nix::poll::PollFd::new(
                    stdin.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                ));
            }
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return,
            }
            let ready = |i: usize| {
                fds.get(i)
                    .and_then(|f| f.revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let (sig_ready, wake_ready, stdin_ready) = (ready(0), ready(1), ready(2));
            drop(fds);
            if wake_ready {
                drain(&self.wake_read);
            }
            if sig_ready {
                while let Some(sig) = self.signals.next() {
                    if self.forward(sig).is_err() {
                        return;
                    }
                }
            }
            if stdin_ready && self.read_stdin(&mut buf).is_err() {
                return;
            }
        }
    }

    fn forward(&self, sig: i32) -> anyhow::Result<()> {
        let frame = match sig {
            libc::SIGWINCH if self.tty => match window_size() {
                Some((rows, cols)) => ToBody::Resize { rows, cols },
                None => return Ok(()),
            },
            libc::SIGWINCH => return Ok(()),
            s => ToBody::Signal(s),
        };
        send(&self.writer, &frame)?;
        if sig == libc::SIGTSTP {
            // The job heard it (written above); stop ourselves too so the
            // shell's job control sees it (SIGCONT later resumes both).
            // SAFETY: raise has no memory-safety preconditions.
            unsafe { libc::raise(libc::SIGSTOP) };
        }
        Ok(())
    }

    /// One read of stdin, sent within the credit; end of file is passed on.
    fn read_stdin(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        let credit = self.credit.load(Ordering::SeqCst);
        let max = buf.len().min(usize::try_from(credit).unwrap_or(usize::MAX));
        // SAFETY: buf is valid for `max` bytes.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), max) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) {
                return Ok(());
            }
        }
        if n <= 0 {
            self.stdin_open = false;
            return send(&self.writer, &ToBody::StdinEof);
        }
        let n = n as usize;
        self.credit.fetch_sub(n as u64, Ordering::SeqCst);
        send(
            &self.writer,
            &ToBody::Stdin(ByteBuf::from(buf[..n].to_vec())),
        )
    }
}

fn poke(wake: &OwnedFd) {
    // SAFETY: a one-byte write from a valid buffer; a full pipe already wakes.
    unsafe { libc::write(wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
}

fn drain(fd: &OwnedFd) {
    let mut sink = [0u8; 64];
    // SAFETY: reads into a local buffer of its length; the pipe is non-blocking.
    while unsafe { libc::read(fd.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) } > 0 {}
}

pub fn isatty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The terminal's rows and columns, from the first of stdout, stdin and
/// stderr that is a terminal.
pub fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    for fd in [1, 0, 2] {
        // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_col > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
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
