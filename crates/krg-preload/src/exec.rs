//! Distant exec: in a job whose capabilities include DISTANT_FORK, a
//! program that a child process runs (fork then exec, or posix_spawn)
//! is started through `krg run --distant-exec`, which asks the scheduler
//! for a node: the program then runs there as a job of its own, or here in
//! place. The parent still has its local child pid, its exit status and its
//! signals (`krg run` is that child: the deputy).
//!
//! Only execs in a freshly forked child count: a process that replaces
//! itself (a shell's last command) stays where it is. Statically linked
//! programs, and the variadic `execl*` calls, are not seen and run locally.
//!
//! This code runs between fork and exec: it uses libc calls only, and
//! glibc's malloc (which is safe after fork with glibc).

use alloc::borrow::ToOwned;
use alloc::ffi::CString;
use alloc::vec::Vec;
use core::ffi::CStr;
use core::sync::atomic::{AtomicBool, Ordering};
use libc::{c_char, c_int, pid_t};

static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn in_child() {
    FORKED.store(true, Ordering::SeqCst);
}

extern "C" fn setup() {
    // SAFETY: registers a handler that only stores to an atomic.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
}

#[used]
#[link_section = ".init_array"]
static SETUP: extern "C" fn() = setup;

fn getenv(name: &CStr) -> Option<&'static CStr> {
    // SAFETY: getenv with a NUL-terminated name; the result lives as long
    // as the environment is not changed, and we copy what we keep.
    let p = unsafe { libc::getenv(name.as_ptr()) };
    // SAFETY: non-null results of getenv are NUL-terminated strings.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

/// Does this job have DISTANT_FORK in force? Read at every exec from the
/// view (`$KRG_VIEW/jobs/$KRG_GPID/caps`), so `krg capset` applies at once.
fn distant_fork_enabled() -> bool {
    // A program distant exec kept in its parent's job carries its own
    // answer (a child's capabilities), for itself and what it starts.
    if let Some(own) = getenv(c"KRG_DISTANT_FORK") {
        return own.to_bytes() == b"1";
    }
    let (Some(view), Some(gpid)) = (getenv(c"KRG_VIEW"), getenv(c"KRG_GPID")) else {
        return false;
    };
    let mut path = view.to_bytes().to_vec();
    path.extend_from_slice(b"/jobs/");
    path.extend_from_slice(gpid.to_bytes());
    path.extend_from_slice(b"/caps");
    let Ok(path) = CString::new(path) else {
        return false;
    };
    let mut buf = [0u8; 1024];
    // SAFETY: a NUL-terminated path and a buffer we own.
    let n = unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return false;
    }
    let text = &buf[..n as usize];
    text.split(|b| *b == b'\n')
        .find(|l| l.starts_with(b"effective:"))
        .is_some_and(|l| l.windows(12).any(|w| w == b"DISTANT_FORK"))
}

/// The krg binary, unless `path` is krg itself (no loops).
fn krg_for(path: &CStr) -> Option<&'static CStr> {
    let krg = getenv(c"KRG_BIN")?;
    let base = |p: &[u8]| p.rsplit(|b| *b == b'/').next().map(<[u8]>::to_vec);
    if path.to_bytes() == krg.to_bytes() || base(path.to_bytes()) == base(krg.to_bytes()) {
        return None;
    }
    Some(krg)
}

/// `krg run --distant-exec -T --argv0 ARGV0 -- PATH ARGS...`
struct Redirect {
    _strings: Vec<CString>,
    argv: Vec<*const c_char>,
}

/// # Safety
/// `argv` must be a NULL-terminated array of C strings.
unsafe fn redirect(path: &CStr, argv: *const *const c_char) -> Redirect {
    let strings: Vec<CString> = ["krg", "run", "--distant-exec", "-T", "--argv0"]
        .iter()
        .map(|s| CString::new(*s).expect("no NUL in constants"))
        .collect();
    let mut out: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
    let argv0 = if argv.is_null() {
        core::ptr::null()
    } else {
        // SAFETY: argv is a NULL-terminated array (caller's guarantee), so
        // its first slot is readable.
        unsafe { *argv }
    };
    let dashdash = CString::new("--").expect("no NUL");
    let empty = CString::new("").expect("no NUL");
    out.push(if argv0.is_null() {
        empty.as_ptr()
    } else {
        argv0
    });
    out.push(dashdash.as_ptr());
    out.push(path.as_ptr());
    if !argv.is_null() && !argv0.is_null() {
        let mut i = 1;
        loop {
            // SAFETY: walking a NULL-terminated array.
            let a = unsafe { *argv.add(i) };
            if a.is_null() {
                break;
            }
            out.push(a);
            i += 1;
        }
    }
    out.push(core::ptr::null());
    let mut all = strings;
    all.push(dashdash);
    all.push(empty);
    Redirect {
        _strings: all,
        argv: out,
    }
}

/// PATH search as execvp does, for the file a spawn or execvp names.
fn search_path(file: &CStr) -> Option<CString> {
    if file.to_bytes().contains(&b'/') {
        return Some(file.to_owned());
    }
    let path = getenv(c"PATH").map_or(b"/usr/local/bin:/usr/bin:/bin".to_vec(), |p| {
        p.to_bytes().to_vec()
    });
    for dir in path.split(|b| *b == b':') {
        let mut full = if dir.is_empty() {
            b".".to_vec()
        } else {
            dir.to_vec()
        };
        full.push(b'/');
        full.extend_from_slice(file.to_bytes());
        let Ok(c) = CString::new(full) else { continue };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            return Some(c);
        }
    }
    None
}

type Execve =
    unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
type PosixSpawn = unsafe extern "C" fn(
    *mut pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    *const *const c_char,
    *const *const c_char,
) -> c_int;

fn real<T>(name: &CStr) -> Option<T> {
    crate::cpus::next(name)
}

extern "C" {
    static environ: *const *const c_char;
}

/// # Safety
/// As `execve(2)`.
#[no_mangle]
pub unsafe extern "C" fn execve(
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    let Some(real_execve) = real::<Execve>(c"execve") else {
        return -1;
    };
    if !path.is_null() && FORKED.load(Ordering::SeqCst) && distant_fork_enabled() {
        // SAFETY: path is a C string (caller's guarantee).
        let p = unsafe { CStr::from_ptr(path) };
        // A caller searching PATH tries paths that do not exist: let those
        // fail here as they would, and redirect only the real program.
        // SAFETY: a NUL-terminated path.
        let runnable = unsafe { libc::access(path, libc::X_OK) } == 0;
        if let Some(krg) = krg_for(p).filter(|_| runnable) {
            // SAFETY: argv as execve requires.
            let r = unsafe { redirect(p, argv) };
            // SAFETY: all arrays are NULL-terminated C strings.
            unsafe { real_execve(krg.as_ptr(), r.argv.as_ptr(), envp) };
            // krg could not be run: run the program here, as asked.
        }
    }
    // SAFETY: forwarded as given.
    unsafe { real_execve(path, argv, envp) }
}

/// # Safety
/// As `execv(3)`.
#[no_mangle]
pub unsafe extern "C" fn execv(path: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: environ is the process environment.
    unsafe { execve(path, argv, environ) }
}

/// # Safety
/// As `execvpe(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvpe(
    file: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    if !file.is_null() && FORKED.load(Ordering::SeqCst) {
        // SAFETY: file is a C string (caller's guarantee).
        if let Some(full) = search_path(unsafe { CStr::from_ptr(file) }) {
            // SAFETY: as execve requires.
            return unsafe { execve(full.as_ptr(), argv, envp) };
        }
    }
    type Execvpe =
        unsafe extern "C" fn(*const c_char, *const *const c_char, *const *const c_char) -> c_int;
    match real::<Execvpe>(c"execvpe") {
        // SAFETY: forwarded as given.
        Some(f) => unsafe { f(file, argv, envp) },
        None => -1,
    }
}

/// # Safety
/// As `execvp(3)`.
#[no_mangle]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int {
    // SAFETY: environ is the process environment.
    unsafe { execvpe(file, argv, environ) }
}

/// `vfork` becomes `fork` in jobs: a vforked child must not run our code
/// in its parent's memory, and `fork` is a valid `vfork`.
///
/// # Safety
/// As `fork(2)`.
#[no_mangle]
pub unsafe extern "C" fn vfork() -> pid_t {
    // SAFETY: fork has no memory-safety preconditions.
    unsafe { libc::fork() }
}

unsafe fn spawn(
    pid: *mut pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
    search: bool,
) -> c_int {
    let name = if search {
        c"posix_spawnp"
    } else {
        c"posix_spawn"
    };
    let Some(real_spawn) = real::<PosixSpawn>(name) else {
        return libc::ENOSYS;
    };
    if !path.is_null() && distant_fork_enabled() {
        // SAFETY: path is a C string (caller's guarantee).
        let p = unsafe { CStr::from_ptr(path) };
        let full = if search {
            search_path(p)
        } else {
            Some(p.to_owned())
        };
        if let Some(full) = full {
            if let Some(krg) = krg_for(&full) {
                // SAFETY: argv as posix_spawn requires.
                let r = unsafe { redirect(&full, argv) };
                let Some(plain) = real::<PosixSpawn>(c"posix_spawn") else {
                    return libc::ENOSYS;
                };
                // SAFETY: all arrays are NULL-terminated C strings.
                let rc = unsafe { plain(pid, krg.as_ptr(), actions, attr, r.argv.as_ptr(), envp) };
                if rc == 0 {
                    return 0;
                }
            }
        }
    }
    // SAFETY: forwarded as given.
    unsafe { real_spawn(pid, path, actions, attr, argv, envp) }
}

/// # Safety
/// As `posix_spawn(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: as posix_spawn.
    unsafe { spawn(pid, path, actions, attr, argv, envp, false) }
}

/// # Safety
/// As `posix_spawnp(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *const c_char,
    envp: *const *const c_char,
) -> c_int {
    // SAFETY: as posix_spawnp.
    unsafe { spawn(pid, file, actions, attr, argv, envp, true) }
}
