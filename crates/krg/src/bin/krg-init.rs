//! `krg-init`: pid 1 of every krg job. Small and synchronous (no tokio).
//!
//! The contract with `krgd` is in `docs/architecture.md` ("`krg-init`"):
//! stdio on fds 0-2, the status pipe on fd 3, the job's identity and limits
//! on the command line, the job's environment as our own. krgd starts us as
//! the job's init already (its namespaces and cgroups made by its `clone`,
//! `KRG_INIT_INNER` set); started by hand, we make them: join the cgroups,
//! unshare PID, mount and IPC namespaces and fork; the outer process
//! reports the inner init's host pid and exits. Started ahead of its job
//! (`KRG_INIT_POOLED`, see `pooled.rs`), it first waits on fd 0 for its
//! arguments, environment and descriptors. The init (pid 1 in the job)
//! mounts a fresh /proc, forks the command as the user, forwards signals,
//! reaps, and reports how the command ended.

#[path = "krg_init/args.rs"]
mod args;
#[path = "krg_init/pooled.rs"]
mod pooled;
#[path = "krg_init/reaper.rs"]
mod reaper;
#[path = "krg_init/spawn.rs"]
mod spawn;
#[path = "krg_init/status.rs"]
mod status;

use std::os::fd::{IntoRawFd, RawFd};
use std::process::exit;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::status::{errno, Line, Status, Step, STATUS_FD};

/// Marks, in the environment, that we are the job's init already.
const INNER_MARK: &str = krg_types::INIT_INNER_ENV;

/// Exit code on a bad command line.
const EXIT_USAGE: i32 = 2;
/// Exit code when a step before the command fails (also reported on fd 3).
const EXIT_SETUP: i32 = 1;

fn main() {
    let mut words: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut ahead = pooled::Ahead::default();
    if std::env::var_os(krg_types::handoff::POOLED_ENV).is_some() {
        // Started ahead of our job: mount what it will need, then it comes
        // now, or krgd has gone.
        ahead = pooled::mount_ahead(std::env::var_os(krg_types::handoff::POOLED_VIEW_ENV));
        words = match pooled::await_job() {
            Ok(Some(words)) => words,
            Ok(None) => exit(0),
            Err(err) => {
                eprintln!("krg-init: {err}");
                exit(EXIT_SETUP);
            }
        };
    }
    if words.first().is_some_and(|w| w == "--attach-view") {
        exit(attach_view(&words[1..]));
    }
    let args = match args::parse(words) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("krg-init: {err}");
            exit(EXIT_USAGE);
        }
    };
    // Set in the environment of the inner init's re-execution (see
    // `reexec_inner`); removed before the plan copies our environment for
    // the command.
    let inner = std::env::var_os(INNER_MARK).is_some();
    std::env::remove_var(INNER_MARK);
    let mut plan = spawn::Plan::new(&args);
    // First of all, so that no signal is lost between a fork and the
    // init's sigwaitinfo: the mask is inherited by both children.
    reaper::block_all_signals();
    sanitize_fds();
    let status = Status::new(STATUS_FD);
    if inner {
        exit(inner_init(&mut plan, &status, args.view.as_deref(), &ahead));
    }
    // Join the job's cgroups before forking, so that nothing of the job
    // ever runs outside them.
    for dir in &args.cgroups {
        let procs = std::path::Path::new(dir).join("cgroup.procs");
        if let Err(err) = std::fs::write(&procs, b"0") {
            die(
                &status,
                Step::Cgroup,
                err.raw_os_error().unwrap_or(libc::EIO),
                "cannot join the job's cgroup",
            );
        }
    }
    let namespaces = CloneFlags::CLONE_NEWPID | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC;
    if let Err(err) = unshare(namespaces) {
        die(
            &status,
            Step::Unshare,
            err as i32,
            "cannot create the job's namespaces",
        );
    }
    // The inner init waits for EOF on this gate, which comes when the outer
    // process exits after its `pid` line: `pid` is always the first line.
    let gate = gate(&status);
    // SAFETY: krg-init is single-threaded, so the child is a faithful copy
    // and may carry on with ordinary Rust code.
    match unsafe { libc::fork() } {
        -1 => die(&status, Step::Fork, errno(), "cannot fork the job's init"),
        0 => {
            spawn::wait_gate(gate);
            reexec_inner(&status);
        }
        inner => {
            status.send(Line::new("pid").num(i64::from(inner)));
            exit(0);
        }
    }
}

/// pid 1 of the job. Returns the exit code. `ahead`: what a waiting init
/// mounted before its job came.
fn inner_init(
    plan: &mut spawn::Plan,
    status: &Status,
    view: Option<&std::ffi::OsStr>,
    ahead: &pooled::Ahead,
) -> i32 {
    // The session first: until it leads its own, the job's session leader
    // is outside its pid namespace, and CRIU refuses to dump it.
    if let Err(err) = nix::unistd::setsid() {
        die(
            status,
            Step::Setsid,
            err as i32,
            "cannot start the job's session",
        );
    }
    let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
    if let Err(err) = mount(None::<&str>, "/", None::<&str>, private, None::<&str>) {
        die(
            status,
            Step::Mount,
            err as i32,
            "cannot make the job's mounts private",
        );
    }
    if !ahead.proc {
        if let Err(err) = mount_proc() {
            die(
                status,
                Step::Mount,
                err as i32,
                "cannot mount the job's /proc",
            );
        }
    }
    if ahead.view.as_deref() != view {
        if ahead.view.is_some() {
            unbind_view();
        }
        if let Some(view) = view {
            bind_view(std::path::Path::new(view));
        }
    }
    let gate = gate(status);
    let pid = match spawn::fork_command(plan, status, gate) {
        Ok(pid) => pid,
        Err(err) => die(status, Step::Fork, err, "cannot fork the command"),
    };
    status.send(Line::new("started").num(i64::from(pid)));
    // SAFETY: both gate ends are ours; closing the write end lets the
    // command's child go on.
    unsafe {
        libc::close(gate.1);
        libc::close(gate.0);
    }
    release_stdio();
    let end = reaper::supervise(pid);
    status.send(end.line());
    end.code()
}

/// Reports a failed step on fd 3 and on the job's stderr, and exits.
fn die(status: &Status, step: Step, err: i32, what: &str) -> ! {
    eprintln!(
        "krg-init: {what}: {}",
        nix::errno::Errno::from_raw(err).desc()
    );
    status.send(Line::new(step.word()).num(i64::from(err)));
    exit(EXIT_SETUP);
}

/// Makes fds 0-3 open (a closed one becomes /dev/null, so that no fd we
/// open later takes its number), keeps fd 3 out of the command, and marks
/// every fd above 3 close-on-exec: the job gets its stdio and nothing else
/// of `krgd`'s.
fn sanitize_fds() {
    for fd in 0..=STATUS_FD {
        // SAFETY: F_GETFD only queries the fd.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: the path is NUL-terminated; open returns the lowest
            // free fd, which is `fd` since those below it are open.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
    // SAFETY: fcntl on an fd we hold; close_range only sets flags.
    unsafe {
        libc::fcntl(STATUS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::close_range(4, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as i32);
    }
}

/// Points the init's own fds 0-2 at /dev/null once the command has its
/// copies: the init must not keep the job's streams (or its tty) open after
/// the command and its children have closed them.
fn release_stdio() {
    // SAFETY: open/dup2/close on fds we own.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if null == -1 {
            return;
        }
        for fd in 0..=2 {
            libc::dup2(null, fd);
        }
        if null > 2 {
            libc::close(null);
        }
    }
}

/// A pipe (read end, write end), both close-on-exec, that orders a child
/// after its parent: the child waits for EOF (`spawn::wait_gate`), which
/// comes when the parent closes the write end.
fn gate(status: &Status) -> (RawFd, RawFd) {
    match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) {
        Ok((read_end, write_end)) => (read_end.into_raw_fd(), write_end.into_raw_fd()),
        Err(err) => die(status, Step::Fork, err as i32, "cannot create a pipe"),
    }
}

/// A fresh /proc for the job's pid namespace.
fn mount_proc() -> nix::Result<()> {
    let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        proc_flags,
        None::<&str>,
    )
}

/// The files of the cluster view, and what each is bound over.
const VIEW_FILES: [(&str, &str); 6] = [
    ("cpuinfo", "/proc/cpuinfo"),
    ("meminfo", "/proc/meminfo"),
    ("loadavg", "/proc/loadavg"),
    ("stat", "/proc/stat"),
    ("uptime", "/proc/uptime"),
    ("cpu/online", "/sys/devices/system/cpu/online"),
];

/// The cluster view's files over the job's own (as LXCFS does for a
/// container). A file the view does not serve is left as it is: the job
/// then sees that part of the node, which is better than not running.
fn bind_view(view: &std::path::Path) {
    for (name, target) in VIEW_FILES {
        let source = view.join(name);
        let _ = mount(
            Some(&source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        );
    }
}

/// Takes the view's files off again (a job that sees its node's own
/// files, handed to an init that bound the view ahead).
fn unbind_view() {
    for (_, target) in VIEW_FILES {
        let _ = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Runs krg-init again as the inner init, now that the job's mount
/// namespace exists. Our binary and libraries were mapped before
/// `unshare(CLONE_NEWNS)`, from the node's mounts, which CRIU does not find
/// in the job's namespace: it refuses to dump the job ("Can't lookup
/// mount"). Executing the same path again maps them through the job's own
/// mounts. Not `/proc/self/exe`: that link leads back to the node's mount.
/// `execv` keeps the blocked signal mask and any pending signal.
fn reexec_inner(status: &Status) -> ! {
    use std::os::unix::ffi::OsStrExt;
    let exe = match std::fs::read_link("/proc/self/exe") {
        Ok(exe) => exe,
        Err(err) => die(
            status,
            Step::Fork,
            err.raw_os_error().unwrap_or(libc::EIO),
            "cannot find krg-init's own binary",
        ),
    };
    let c_string = |bytes: &[u8]| std::ffi::CString::new(bytes).unwrap_or_default();
    let path = c_string(exe.as_os_str().as_bytes());
    let words: Vec<std::ffi::CString> = std::env::args_os()
        .map(|a| c_string(a.as_bytes()))
        .collect();
    let mut argv: Vec<*const libc::c_char> = words.iter().map(|w| w.as_ptr()).collect();
    argv.push(std::ptr::null());
    std::env::set_var(INNER_MARK, "1");
    // SAFETY: fcntl on our fd 3, which must survive the exec (the new image
    // marks it close-on-exec again); `path` and `argv` are NUL-terminated and
    // outlive the call, which returns only on failure.
    unsafe {
        libc::fcntl(STATUS_FD, libc::F_SETFD, 0);
        libc::execv(path.as_ptr(), argv.as_ptr());
    }
    die(
        status,
        Step::Fork,
        errno(),
        "cannot run krg-init again in the job's namespaces",
    )
}

/// `krg-init --attach-view DIR PID`: binds the cluster view into the mount
/// namespace of a job whose init is PID (a job restored by CRIU, whose view
/// mounts belonged to the node it left). Runs as root, single-threaded, so
/// it may enter another mount namespace.
fn attach_view(words: &[std::ffi::OsString]) -> i32 {
    let (Some(dir), Some(pid), None) = (words.first(), words.get(1), words.get(2)) else {
        eprintln!("krg-init: usage: krg-init --attach-view DIR PID");
        return EXIT_USAGE;
    };
    let Some(pid) = pid.to_str().and_then(|p| p.parse::<u32>().ok()) else {
        eprintln!("krg-init: --attach-view: {pid:?} is not a pid");
        return EXIT_USAGE;
    };
    let ns = match std::fs::File::open(format!("/proc/{pid}/ns/mnt")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("krg-init: cannot open the mount namespace of pid {pid}: {e}");
            return EXIT_SETUP;
        }
    };
    if let Err(e) = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNS) {
        eprintln!("krg-init: cannot enter the mount namespace of pid {pid}: {e}");
        return EXIT_SETUP;
    }
    bind_view(std::path::Path::new(dir));
    0
}
