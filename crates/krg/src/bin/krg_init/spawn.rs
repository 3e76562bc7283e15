//! Forking the command: everything is prepared in a `Plan` before `fork`,
//! and the child then runs only async-signal-safe calls until `execve`.
//!
//! The child's order: wait for the parent's `started` line (the gate),
//! default signal dispositions, `setsid`, controlling tty (`--pty`), rlimits,
//! groups, gid, uid, cwd, umask, unblock signals, exec. Rlimits are set
//! while still root so that a hard limit above `krgd`'s own can be granted;
//! the cwd is entered after the uid change so that the user's own
//! permissions decide. Signals stay blocked until just before `execve`: a
//! signal forwarded meanwhile stays pending and then acts on the fresh
//! defaults, and a failure report on fd 3 can never die of SIGPIPE.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::ptr;

use crate::args::{Args, Rlimit};
use crate::status::{errno, Line, Status, Step};

/// The search path of glibc's `execvp` when `PATH` is unset.
const PATH_DEFAULT: &[u8] = b"/bin:/usr/bin";

/// The interpreter for an executable file the kernel cannot run (ENOEXEC),
/// as a shell would use.
const SHELL: &[u8] = b"/bin/sh";

/// Signal numbers to reset, 1..=_NSIG-1 (Linux: 64).
const SIGNAL_MAX: i32 = 64;

/// Everything the child needs, built before `fork` so that the child
/// allocates nothing.
pub struct Plan {
    /// Owns the strings `argv` points into.
    _words: Vec<CString>,
    /// `CMD ARGS... NULL`.
    argv: Vec<*const libc::c_char>,
    /// `/bin/sh <candidate> ARGS... NULL`; slot 1 is filled in the child.
    sh_argv: Vec<*const libc::c_char>,
    sh: CString,
    /// Owns the strings `envp` points into.
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    /// The paths to try in order, as `execvp` would.
    candidates: Vec<CString>,
    cwd: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    umask: Option<libc::mode_t>,
    rlimits: Vec<Rlimit>,
    pty: bool,
    /// The mask and action installed in the child.
    empty_mask: libc::sigset_t,
    full_mask: libc::sigset_t,
    default_action: libc::sigaction,
}

impl Plan {
    /// Builds the plan; the job's environment is our own.
    pub fn new(args: &Args) -> Plan {
        let words: Vec<CString> = args.command.iter().map(|w| c_string(w)).collect();
        let argv = null_terminated(&words);
        let sh = c_string(OsStr::from_bytes(SHELL));
        let mut sh_argv = vec![sh.as_ptr(), ptr::null()];
        sh_argv.extend(words.iter().skip(1).map(|w| w.as_ptr()));
        sh_argv.push(ptr::null());
        let env: Vec<CString> = job_env(std::env::vars_os().collect())
            .iter()
            .map(|(k, v)| env_entry(k, v))
            .collect();
        let envp = null_terminated(&env);
        let path = std::env::var_os("PATH");
        let path = path.as_deref().map_or(PATH_DEFAULT, OsStrExt::as_bytes);
        let candidates = candidates(args.command[0].as_bytes(), path);
        Plan {
            _words: words,
            argv,
            sh_argv,
            sh,
            _env: env,
            envp,
            candidates,
            cwd: c_string(&args.cwd),
            uid: args.uid,
            gid: args.gid,
            groups: args.groups.clone(),
            umask: args.umask,
            rlimits: args.rlimits.clone(),
            pty: args.pty,
            empty_mask: sigset(false),
            full_mask: sigset(true),
            default_action: default_action(),
        }
    }
}

/// `fork`s the command. Returns its pid in the parent; the child never
/// returns. `gate` is a pipe (both ends CLOEXEC): the child waits for EOF
/// on `gate.0`, which comes when the parent closes `gate.1` after writing
/// `started`, so that `started` always precedes the child's own lines.
pub fn fork_command(
    plan: &mut Plan,
    status: &Status,
    gate: (RawFd, RawFd),
) -> Result<libc::pid_t, i32> {
    // SAFETY: krg-init has a single thread, so the child is a faithful copy;
    // it then runs only `exec_child`, which is async-signal-safe.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(errno()),
        0 => exec_child(plan, status, gate),
        pid => Ok(pid),
    }
}

/// The child, between `fork` and `execve`: async-signal-safe calls only, no
/// allocation, no panic. Any failure is reported on fd 3 and ends in
/// `_exit`.
fn exec_child(plan: &mut Plan, status: &Status, gate: (RawFd, RawFd)) -> ! {
    wait_gate(gate);
    for sig in 1..=SIGNAL_MAX {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `default_action` is a valid sigaction; errors (glibc's
        // reserved signals) are harmless and ignored.
        unsafe { libc::sigaction(sig, &plan.default_action, ptr::null_mut()) };
    }
    // SAFETY: plain syscall. The command leads a new session, so its pid
    // is its process group, the one the init forwards signals to.
    if unsafe { libc::setsid() } == -1 {
        fail(status, Step::Setsid);
    }
    // SAFETY: TIOCSCTTY takes an int argument; 0 means "do not steal".
    if plan.pty && unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } == -1 {
        fail(status, Step::Tty);
    }
    for rlimit in &plan.rlimits {
        if nix::sys::resource::setrlimit(rlimit.resource, rlimit.soft, rlimit.hard).is_err() {
            fail(status, Step::Rlimit);
        }
    }
    become_user(plan, status);
    // SAFETY: `cwd` is a NUL-terminated string owned by the plan.
    if unsafe { libc::chdir(plan.cwd.as_ptr()) } == -1 {
        fail(status, Step::Cwd);
    }
    if let Some(mask) = plan.umask {
        // SAFETY: plain syscall.
        unsafe { libc::umask(mask) };
    }
    let err = exec(plan);
    // Blocked again so that the report below cannot die of SIGPIPE.
    // SAFETY: `full_mask` is an initialised sigset.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &plan.full_mask, ptr::null_mut()) };
    status.send(Line::new(Step::Exec.word()).num(i64::from(err)));
    let code = if err == libc::ENOENT { 127 } else { 126 };
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Blocks until the parent closes the gate's write end, then closes the
/// gate. Async-signal-safe.
pub fn wait_gate((read_end, write_end): (RawFd, RawFd)) {
    // SAFETY: our copy of the write end must go, or EOF never comes.
    unsafe { libc::close(write_end) };
    let mut byte = 0u8;
    // Bounded: the parent closes its end right after `started`.
    loop {
        // SAFETY: `byte` is a one-byte buffer.
        let n = unsafe { libc::read(read_end, ptr::addr_of_mut!(byte).cast(), 1) };
        if n == 0 || (n < 0 && errno() != libc::EINTR) {
            break;
        }
    }
    // SAFETY: the read end is ours and used no more.
    unsafe { libc::close(read_end) };
}

/// Groups, then gid, then uid; then checks that the change really happened.
fn become_user(plan: &Plan, status: &Status) {
    // SAFETY: `groups` holds `groups.len()` gids; its length was bounded by
    // the argument parser (NGROUPS_MAX).
    if unsafe { libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) } == -1 {
        fail(status, Step::Groups);
    }
    // SAFETY: plain syscalls.
    if unsafe { libc::setresgid(plan.gid, plan.gid, plan.gid) } == -1 {
        fail(status, Step::Gid);
    }
    // SAFETY: plain syscall.
    if unsafe { libc::setresuid(plan.uid, plan.uid, plan.uid) } == -1 {
        fail(status, Step::Uid);
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (plan.gid, plan.gid, plan.gid) {
        fail_with(status, Step::Gid, libc::EPERM);
    }
    // SAFETY: three valid out-pointers.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    if (r, e, s) != (plan.uid, plan.uid, plan.uid) {
        fail_with(status, Step::Uid, libc::EPERM);
    }
    // SAFETY: plain syscall; as a non-root user, getting root back must fail.
    if plan.uid != 0 && unsafe { libc::setuid(0) } != -1 {
        fail_with(status, Step::Uid, libc::EPERM);
    }
}

/// Tries the candidates as `execvp` does: EACCES is remembered and the
/// search goes on, a "not here" error goes on, any other error stops it;
/// ENOEXEC runs the file with `/bin/sh`. Returns the errno to report.
fn exec(plan: &mut Plan) -> i32 {
    // SAFETY: `empty_mask` is an initialised sigset.
    unsafe { libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, ptr::null_mut()) };
    let mut err = libc::ENOENT;
    let mut denied = false;
    for candidate in &plan.candidates {
        // SAFETY: the path, argv and envp are NUL-terminated strings and
        // NULL-terminated arrays owned by the plan.
        unsafe { libc::execve(candidate.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr()) };
        err = errno();
        if err == libc::ENOEXEC {
            plan.sh_argv[1] = candidate.as_ptr();
            // SAFETY: as above; `sh_argv` is NULL-terminated.
            unsafe { libc::execve(plan.sh.as_ptr(), plan.sh_argv.as_ptr(), plan.envp.as_ptr()) };
            return libc::ENOEXEC;
        }
        match err {
            libc::EACCES => denied = true,
            libc::ENOENT
            | libc::ENOTDIR
            | libc::ESTALE
            | libc::ENODEV
            | libc::ETIMEDOUT
            | libc::ENAMETOOLONG => {}
            _ => return err,
        }
    }
    if denied {
        libc::EACCES
    } else {
        err
    }
}

/// Reports `<step>-failed <errno>` and exits 1. Async-signal-safe.
fn fail(status: &Status, step: Step) -> ! {
    fail_with(status, step, errno())
}

fn fail_with(status: &Status, step: Step, err: i32) -> ! {
    status.send(Line::new(step.word()).num(i64::from(err)));
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(1) }
}

/// The paths `execvp` would try for `cmd` with this `PATH`: `cmd` itself
/// when it holds a `/`, else `dir/cmd` for each entry (an empty entry is
/// the cwd). An empty `cmd` has none (ENOENT).
fn candidates(cmd: &[u8], path: &[u8]) -> Vec<CString> {
    if cmd.is_empty() {
        return Vec::new();
    }
    if cmd.contains(&b'/') {
        return vec![c_string(OsStr::from_bytes(cmd))];
    }
    path.split(|&b| b == b':')
        .map(|dir| {
            let mut full = dir.to_vec();
            if !full.is_empty() && !full.ends_with(b"/") {
                full.push(b'/');
            }
            full.extend_from_slice(cmd);
            c_string(OsStr::from_bytes(&full))
        })
        .collect()
}

/// The command's environment: ours, except that `KRG_PRELOAD` (the preload
/// library krgd wants in the job, kept out of krg-init itself) becomes the
/// first entry of `LD_PRELOAD`.
pub fn job_env(mut vars: Vec<(OsString, OsString)>) -> Vec<(OsString, OsString)> {
    let Some(i) = vars.iter().position(|(k, _)| k == "KRG_PRELOAD") else {
        return vars;
    };
    let (_, preload) = vars.remove(i);
    match vars.iter_mut().find(|(k, _)| k == "LD_PRELOAD") {
        Some((_, theirs)) if !theirs.is_empty() => {
            let mut v = preload;
            v.push(":");
            v.push(&*theirs);
            *theirs = v;
        }
        Some((_, theirs)) => *theirs = preload,
        None => vars.push((OsString::from("LD_PRELOAD"), preload)),
    }
    vars
}

/// Words from argv and the environment hold no NUL.
fn c_string(word: &OsStr) -> CString {
    CString::new(word.as_bytes())
        .expect("words from argv and paths built from them hold no NUL byte")
}

fn env_entry(key: &OsStr, value: &OsStr) -> CString {
    let mut entry = OsString::from(key);
    entry.push("=");
    entry.push(value);
    c_string(&entry)
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(ptr::null()))
        .collect()
}

fn sigset(full: bool) -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset/sigfillset initialise the whole set.
    unsafe {
        if full {
            libc::sigfillset(set.as_mut_ptr());
        } else {
            libc::sigemptyset(set.as_mut_ptr());
        }
        set.assume_init()
    }
}

fn default_action() -> libc::sigaction {
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL, no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = libc::SIG_DFL;
    action.sa_mask = sigset(false);
    action
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(list: Vec<CString>) -> Vec<String> {
        list.into_iter()
            .map(|c| c.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn search_like_execvp() {
        assert_eq!(
            texts(candidates(b"ls", b"/usr/bin:/bin/")),
            ["/usr/bin/ls", "/bin/ls"]
        );
        assert_eq!(
            texts(candidates(b"ls", b"/a::/b")),
            ["/a/ls", "ls", "/b/ls"]
        );
        assert_eq!(texts(candidates(b"ls", b"")), ["ls"]);
        assert_eq!(texts(candidates(b"./x", b"/bin")), ["./x"]);
        assert_eq!(texts(candidates(b"/bin/ls", b"/usr/bin")), ["/bin/ls"]);
        assert!(candidates(b"", b"/bin").is_empty());
    }
}
