//! The CPU count calls a job's programs make, answered for the cluster.

use core::ffi::CStr;
use libc::{c_int, c_void, cpu_set_t, pid_t, pthread_t, size_t};

const ONLINE: &CStr = c"/sys/devices/system/cpu/online";

/// CPUs listed in a `0-3,8-11` style list.
pub fn count_list(text: &str) -> usize {
    text.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => usize::from(part.trim().parse::<usize>().is_ok()),
        })
        .sum()
}

/// The online CPUs as the job's /sys says (the cluster's, under krg).
/// Reads with raw syscalls: this may run inside any program at any time.
fn online_cpus() -> Option<usize> {
    let mut buf = [0u8; 4096];
    // SAFETY: a NUL-terminated path and a buffer we own.
    let n = unsafe {
        let fd = libc::open(ONLINE.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    if n <= 0 {
        return None;
    }
    let text = core::str::from_utf8(&buf[..n as usize]).ok()?;
    Some(count_list(text)).filter(|c| *c > 0)
}

/// Fills `mask` (`size` bytes) with the first `count` CPUs.
///
/// # Safety
/// `mask` must be valid for `size` bytes of writes.
unsafe fn fill(mask: *mut u8, size: usize, count: usize) {
    // SAFETY: the caller guarantees `size` writable bytes.
    let bytes = unsafe { core::slice::from_raw_parts_mut(mask, size) };
    bytes.fill(0);
    for cpu in 0..count.min(size * 8) {
        bytes[cpu / 8] |= 1 << (cpu % 8);
    }
}

type SchedGetaffinity = unsafe extern "C" fn(pid_t, size_t, *mut cpu_set_t) -> c_int;
type PthreadGetaffinity = unsafe extern "C" fn(pthread_t, size_t, *mut cpu_set_t) -> c_int;
type GetNprocs = unsafe extern "C" fn() -> c_int;

pub(crate) fn next<T>(name: &CStr) -> Option<T> {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name; the symbol, if
    // found, is the libc function of the type T names.
    unsafe {
        let p: *mut c_void = libc::dlsym(libc::RTLD_NEXT, name.as_ptr());
        (!p.is_null()).then(|| core::mem::transmute_copy::<*mut c_void, T>(&p))
    }
}

/// Our own process asks: the cluster's CPUs. Another process: the truth.
///
/// # Safety
/// As `sched_getaffinity(2)`.
#[no_mangle]
pub unsafe extern "C" fn sched_getaffinity(
    pid: pid_t,
    size: size_t,
    mask: *mut cpu_set_t,
) -> c_int {
    let Some(real) = next::<SchedGetaffinity>(c"sched_getaffinity") else {
        return -1;
    };
    // SAFETY: forwarded as given.
    let r = unsafe { real(pid, size, mask) };
    // SAFETY: getpid cannot fail.
    let own = pid == 0 || pid == unsafe { libc::getpid() };
    if r == 0 && own && !mask.is_null() {
        if let Some(n) = online_cpus() {
            // SAFETY: the call above succeeded, so mask holds `size` bytes.
            unsafe { fill(mask.cast(), size, n) };
        }
    }
    r
}

/// # Safety
/// As `pthread_getaffinity_np(3)`.
#[no_mangle]
pub unsafe extern "C" fn pthread_getaffinity_np(
    thread: pthread_t,
    size: size_t,
    mask: *mut cpu_set_t,
) -> c_int {
    let Some(real) = next::<PthreadGetaffinity>(c"pthread_getaffinity_np") else {
        return libc::ENOSYS;
    };
    // SAFETY: forwarded as given.
    let r = unsafe { real(thread, size, mask) };
    if r == 0 && !mask.is_null() {
        if let Some(n) = online_cpus() {
            // SAFETY: the call above succeeded, so mask holds `size` bytes.
            unsafe { fill(mask.cast(), size, n) };
        }
    }
    r
}

/// # Safety
/// As `get_nprocs(3)`.
#[no_mangle]
pub unsafe extern "C" fn get_nprocs() -> c_int {
    match online_cpus() {
        Some(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
        // SAFETY: the libc function, called as declared.
        None => next::<GetNprocs>(c"get_nprocs").map_or(1, |f| unsafe { f() }),
    }
}

/// # Safety
/// As `get_nprocs_conf(3)`.
#[no_mangle]
pub unsafe extern "C" fn get_nprocs_conf() -> c_int {
    match online_cpus() {
        Some(n) => c_int::try_from(n).unwrap_or(c_int::MAX),
        // SAFETY: the libc function, called as declared.
        None => next::<GetNprocs>(c"get_nprocs_conf").map_or(1, |f| unsafe { f() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_count_like_the_kernel_writes_them() {
        assert_eq!(count_list("0-5\n"), 6);
        assert_eq!(count_list("0\n"), 1);
        assert_eq!(count_list("0,2-3,8-11"), 7);
        assert_eq!(count_list(""), 0);
        assert_eq!(count_list("garbage"), 0);
    }

    #[test]
    fn masks_are_filled_from_cpu_zero() {
        let mut m = [0xffu8; 4];
        // SAFETY: m is 4 writable bytes.
        unsafe { fill(m.as_mut_ptr(), 4, 10) };
        assert_eq!(m, [0xff, 0x03, 0, 0]);
    }
}
