//! A body's streams on the execution node: the pipes (or pty) between krgd
//! and the job, the tasks that pump them, and how they are stopped and
//! handed over when the job is checkpointed or moved.
//!
//! Output pumps read the job's stdout and stderr and send frames up.
//! Stdin is written by its own task from a queue bounded by the deputy's
//! credit, so the control task (stdin, signals, window sizes from the
//! deputy) never waits on the job. Every pump can be stopped between two
//! frames and gives its descriptor back: nothing read is ever dropped.

use super::body::BodyCtl;
use super::fdio::{pipe, Fd};
use super::spec::TtySize;
use super::status::{LineSplitter, StatusLine};
use crate::criu::ExternalKey;
use crate::wire::stream::{FromBody, ToBody};
use krg_types::limits::{STREAM_CHUNK_BYTES_MAX, STREAM_WINDOW_BYTES};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

/// How CRIU knows the job's ends of its streams (pipes by inode, a pty by
/// device), recorded at dump and replaced at restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamKeys {
    pub stdin: ExternalKey,
    pub stdout: ExternalKey,
    pub stderr: ExternalKey,
    pub status: ExternalKey,
    pub tty: bool,
}

impl StreamKeys {
    /// The distinct keys (a pty is one key for three streams).
    pub fn all(&self) -> Vec<ExternalKey> {
        let mut v = vec![self.stdin, self.stdout, self.stderr, self.status];
        v.dedup();
        v.sort_by_key(|k| format!("{k}"));
        v.dedup();
        v
    }
}

/// The status pipe and what is left of a partial line.
pub struct StatusReader {
    pub fd: Fd,
    splitter: LineSplitter,
}

impl StatusReader {
    pub fn new(fd: Fd) -> Self {
        StatusReader {
            fd,
            splitter: LineSplitter::default(),
        }
    }

    /// The next lines; `None` at end of file (the init is gone).
    pub async fn next(&mut self) -> std::io::Result<Option<Vec<StatusLine>>> {
        let mut buf = [0u8; 256];
        let n = self.fd.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        self.splitter.push(&buf[..n]).map(Some)
    }
}

/// krgd's ends of a body's streams.
pub struct BodyIo {
    /// Where stdin goes: the pipe's write end, or the pty master.
    pub stdin: Option<Fd>,
    /// The stdin pipe's read end, kept to take back what the job has not
    /// read when it moves (none with a pty).
    pub stdin_peek: Option<Fd>,
    pub stdout: Fd,
    pub stderr: Option<Fd>,
    pub pty: bool,
    pub keys: StreamKeys,
}

/// The job's ends of its streams, given to krg-init or to CRIU.
pub struct JobEnds {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The status pipe's write end (krg-init's fd 3).
    pub status: OwnedFd,
}

/// New pipes (or a pty of this size) and a status pipe: the job's ends,
/// krgd's ends, and the reader of the status pipe.
pub fn make_streams(tty: Option<TtySize>) -> std::io::Result<(JobEnds, BodyIo, StatusReader)> {
    let (status_r, status_w) = pipe()?;
    let status_key = ExternalKey::of_fd(status_w.as_fd()).map_err(std::io::Error::other)?;
    let (ends, io) = if let Some(size) = tty {
        let ws = nix::pty::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&ws), None).map_err(std::io::Error::from)?;
        let key = ExternalKey::of_fd(pty.slave.as_fd()).map_err(std::io::Error::other)?;
        let ends = JobEnds {
            stdout: pty.slave.try_clone()?,
            stderr: pty.slave.try_clone()?,
            stdin: pty.slave,
            status: status_w,
        };
        let io = BodyIo {
            stdout: Fd::new(pty.master.try_clone()?)?,
            stdin: Some(Fd::new(pty.master)?),
            stdin_peek: None,
            stderr: None,
            pty: true,
            keys: StreamKeys {
                stdin: key,
                stdout: key,
                stderr: key,
                status: status_key,
                tty: true,
            },
        };
        (ends, io)
    } else {
        let (in_r, in_w) = pipe()?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let keys = StreamKeys {
            stdin: ExternalKey::of_fd(in_r.as_fd()).map_err(std::io::Error::other)?,
            stdout: ExternalKey::of_fd(out_w.as_fd()).map_err(std::io::Error::other)?,
            stderr: ExternalKey::of_fd(err_w.as_fd()).map_err(std::io::Error::other)?,
            status: status_key,
            tty: false,
        };
        let io = BodyIo {
            stdin_peek: Some(Fd::new(reopen_read(&in_r)?)?),
            stdin: Some(Fd::new(in_w)?),
            stdout: Fd::new(out_r)?,
            stderr: Some(Fd::new(err_r)?),
            pty: false,
            keys,
        };
        let ends = JobEnds {
            stdin: in_r,
            stdout: out_w,
            stderr: err_w,
            status: status_w,
        };
        (ends, io)
    };
    Ok((ends, io, StatusReader::new(Fd::new(status_r)?)))
}

/// A second, independent open of a pipe's read end: its flags (non-blocking)
/// are ours alone, while a `dup` would share them with the job's stdin.
fn reopen_read(fd: &OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    Ok(OwnedFd::from(f))
}

/// Bytes of stdin that did not reach the job yet, carried to where it goes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StdinCarry {
    /// Already acknowledged to the deputy (they were in the old pipe).
    pub acked: ByteBuf,
    /// Not yet acknowledged: the new body acknowledges them when written.
    pub unacked: ByteBuf,
    /// The deputy's stdin had ended.
    pub eof: bool,
}

type Stop = watch::Sender<bool>;

/// The pumps of a running body.
pub struct Pumps {
    out: Option<(Stop, JoinHandle<Option<Fd>>)>,
    err: Option<(Stop, JoinHandle<Option<Fd>>)>,
    writer: Option<(Stop, JoinHandle<Option<Fd>>)>,
    control: JoinHandle<()>,
    queue: Arc<StdinQueue>,
    /// Notified when the deputy side says it holds further frames back.
    pub hold: Arc<Notify>,
    pub stdin_peek: Option<Fd>,
    pty: bool,
}

impl Pumps {
    pub fn start(
        io: BodyIo,
        ctl: Arc<BodyCtl>,
        rx: mpsc::Receiver<ToBody>,
        tx: mpsc::Sender<FromBody>,
    ) -> Pumps {
        let queue = Arc::new(StdinQueue::default());
        let hold = Arc::new(Notify::new());
        let out = Some(spawn_out(io.stdout, tx.clone(), false));
        let err = io.stderr.map(|fd| spawn_out(fd, tx.clone(), true));
        let pty_fd = io.stdin.as_ref().map(Fd::raw);
        let writer = io.stdin.map(|fd| {
            let (stop, stopped) = watch::channel(false);
            (
                stop,
                tokio::spawn(write_stdin(fd, queue.clone(), tx.clone(), io.pty, stopped)),
            )
        });
        let control = tokio::spawn(control(
            rx,
            ctl,
            queue.clone(),
            hold.clone(),
            io.pty,
            pty_fd,
        ));
        Pumps {
            out,
            err,
            writer,
            control,
            queue,
            hold,
            stdin_peek: io.stdin_peek,
            pty: io.pty,
        }
    }

    /// Writes carried stdin first (a job that moved), acknowledging only
    /// what the deputy has not been acknowledged for.
    pub fn push_carry(&self, carry: StdinCarry) {
        if !carry.acked.is_empty() {
            self.queue.push_front(carry.acked.into_vec(), false);
        }
        if !carry.unacked.is_empty() {
            self.queue.push(Some(carry.unacked.into_vec()));
        }
        if carry.eof {
            self.queue.push(None);
        }
    }

    /// Stops the output pumps once they have sent everything in the pipes
    /// (call with the job frozen: then that is everything it wrote).
    /// Returns the descriptors.
    pub async fn stop_output(&mut self) -> (Option<Fd>, Option<Fd>) {
        let out = stop(self.out.take()).await;
        let err = stop(self.err.take()).await;
        (out, err)
    }

    /// Stops writing stdin and takes back what the job has not read: the
    /// queued bytes (not acknowledged yet) and what is still in the pipe
    /// (acknowledged). The writer's descriptor is returned.
    pub async fn take_stdin(&mut self) -> (Option<Fd>, StdinCarry) {
        let fd = stop(self.writer.take()).await;
        let (queued, eof) = self.queue.take();
        let mut in_pipe = Vec::new();
        if let Some(peek) = &self.stdin_peek {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(Some(n)) = peek.try_read(&mut buf) {
                if n == 0 {
                    break;
                }
                in_pipe.extend_from_slice(&buf[..n]);
            }
        }
        let carry = StdinCarry {
            acked: ByteBuf::from(in_pipe),
            unacked: ByteBuf::from(queued),
            eof,
        };
        (fd, carry)
    }

    /// Starts the output pumps and the stdin writer again on descriptors
    /// (the same ones after a checkpoint that left the job running, or new
    /// ones after a local restore).
    pub fn resume(
        &mut self,
        stdout: Fd,
        stderr: Option<Fd>,
        stdin: Option<Fd>,
        tx: &mpsc::Sender<FromBody>,
    ) {
        self.out = Some(spawn_out(stdout, tx.clone(), false));
        self.err = stderr.map(|fd| spawn_out(fd, tx.clone(), true));
        self.writer = stdin.map(|fd| {
            let (stop, stopped) = watch::channel(false);
            (
                stop,
                tokio::spawn(write_stdin(
                    fd,
                    self.queue.clone(),
                    tx.clone(),
                    self.pty,
                    stopped,
                )),
            )
        });
    }

    /// After the job ended: lets the output pumps drain to end of file.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        let wait = async {
            if let Some((_, t)) = self.out.take() {
                let _ = t.await;
            }
            if let Some((_, t)) = self.err.take() {
                let _ = t.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Ends everything without a hang-up (the job is gone or moved).
    pub fn abort(&mut self) {
        self.control.abort();
        for p in [self.out.take(), self.err.take(), self.writer.take()]
            .into_iter()
            .flatten()
        {
            p.1.abort();
        }
    }
}

async fn stop(p: Option<(Stop, JoinHandle<Option<Fd>>)>) -> Option<Fd> {
    let (stop, task) = p?;
    let _ = stop.send(true);
    task.await.ok().flatten()
}

fn spawn_out(fd: Fd, tx: mpsc::Sender<FromBody>, stderr: bool) -> (Stop, JoinHandle<Option<Fd>>) {
    let (stop, stopped) = watch::channel(false);
    (stop, tokio::spawn(pump_out(fd, tx, stderr, stopped)))
}

/// Sends what the job writes, until end of file (returns no descriptor) or
/// until asked to stop (returns it once the pipe is empty).
async fn pump_out(
    fd: Fd,
    tx: mpsc::Sender<FromBody>,
    stderr: bool,
    mut stopped: watch::Receiver<bool>,
) -> Option<Fd> {
    let mut buf = vec![0u8; STREAM_CHUNK_BYTES_MAX];
    let mut stopping = false;
    loop {
        let n = match fd.try_read(&mut buf) {
            Ok(Some(n)) => n,
            Ok(None) if stopping => return Some(fd),
            Ok(None) => tokio::select! {
                biased;
                _ = stopped.changed() => {
                    // Send what arrived meanwhile, then stop.
                    stopping = true;
                    continue;
                }
                r = fd.read(&mut buf) => r.unwrap_or(0),
            },
            Err(_) => 0,
        };
        if n == 0 {
            return None;
        }
        let chunk = ByteBuf::from(buf[..n].to_vec());
        let frame = if stderr {
            FromBody::Stderr(chunk)
        } else {
            FromBody::Stdout(chunk)
        };
        if tx.send(frame).await.is_err() {
            return None;
        }
    }
}

/// Stdin, signals and window sizes from the deputy.
async fn control(
    mut rx: mpsc::Receiver<ToBody>,
    ctl: Arc<BodyCtl>,
    queue: Arc<StdinQueue>,
    hold: Arc<Notify>,
    pty: bool,
    pty_fd: Option<i32>,
) {
    while let Some(frame) = rx.recv().await {
        match frame {
            ToBody::Stdin(data) => queue.push(Some(data.into_vec())),
            ToBody::StdinEof => queue.push(None),
            ToBody::Signal(sig) => ctl.signal(sig),
            ToBody::Resize { rows, cols } => {
                if let (true, Some(fd)) = (pty, pty_fd) {
                    let ws = libc::winsize {
                        ws_row: rows,
                        ws_col: cols,
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads a winsize we own from a valid pointer.
                    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
                }
            }
            ToBody::Hangup => ctl.signal(libc::SIGHUP),
            ToBody::Hold => hold.notify_one(),
            ToBody::Launch(_) | ToBody::Reattach(_) | ToBody::Release => {}
        }
    }
    // The deputy is gone: hang the job up, as sshd does when ssh dies.
    ctl.signal(libc::SIGHUP);
}

#[derive(Default)]
struct StdinQueue {
    /// `None` is the end of stdin; the flag says whether to acknowledge.
    items: Mutex<VecDeque<(Option<Vec<u8>>, bool)>>,
    bytes: Mutex<u64>,
    ready: Notify,
}

impl StdinQueue {
    fn push(&self, item: Option<Vec<u8>>) {
        let len = item.as_ref().map_or(0, |d| d.len() as u64);
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        // The deputy respects the window; a peer that does not loses data
        // rather than our memory.
        if *bytes + len > 2 * STREAM_WINDOW_BYTES {
            tracing::warn!("stdin beyond the credit window dropped");
            return;
        }
        *bytes += len;
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((item, true));
        self.ready.notify_one();
    }

    fn push_front(&self, data: Vec<u8>, ack: bool) {
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) += data.len() as u64;
        self.items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_front((Some(data), ack));
        self.ready.notify_one();
    }

    async fn pop(&self) -> (Option<Vec<u8>>, bool) {
        loop {
            if let Some(item) = self
                .items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                return item;
            }
            self.ready.notified().await;
        }
    }

    fn sub(&self, n: u64) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *bytes = bytes.saturating_sub(n);
    }

    /// Everything queued, and whether the end of stdin is among it.
    fn take(&self) -> (Vec<u8>, bool) {
        let items: Vec<_> = self
            .items
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        *self.bytes.lock().unwrap_or_else(|p| p.into_inner()) = 0;
        let mut data = Vec::new();
        let mut eof = false;
        for (item, _) in items {
            match item {
                Some(d) => data.extend(d),
                None => eof = true,
            }
        }
        (data, eof)
    }
}

/// Writes queued stdin; returns its descriptor when asked to stop (what
/// it had not written yet goes back to the queue, what it had is
/// acknowledged), none once stdin has ended.
async fn write_stdin(
    fd: Fd,
    queue: Arc<StdinQueue>,
    tx: mpsc::Sender<FromBody>,
    pty: bool,
    mut stopped: watch::Receiver<bool>,
) -> Option<Fd> {
    let mut fd = Some(fd);
    loop {
        let (item, ack) = tokio::select! {
            biased;
            _ = stopped.changed() => return fd,
            item = queue.pop() => item,
        };
        let Some(data) = item else {
            // End of stdin: close the pipe. A pty has no end of file of its
            // own; like ssh -t, leave it open.
            if !pty {
                fd = None;
            }
            continue;
        };
        let mut written = 0;
        while written < data.len() {
            let Some(f) = &fd else {
                // The job closed its stdin: later bytes are dropped, as a
                // pipe would, but still acknowledged so the deputy goes on.
                break;
            };
            tokio::select! {
                biased;
                _ = stopped.changed() => {
                    // The rest goes back, counted anew by push_front.
                    queue.sub(data.len() as u64);
                    queue.push_front(data[written..].to_vec(), ack);
                    if ack && written > 0 {
                        let _ = tx.send(FromBody::StdinAck(written as u64)).await;
                    }
                    return fd;
                }
                r = f.write_some(&data[written..]) => match r {
                    Ok(n) => written += n,
                    Err(_) => fd = None,
                },
            }
        }
        queue.sub(data.len() as u64);
        if ack
            && tx
                .send(FromBody::StdinAck(data.len() as u64))
                .await
                .is_err()
        {
            return fd;
        }
    }
}
