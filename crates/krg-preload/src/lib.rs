//! `libkrg_preload.so`, loaded into krg jobs with `LD_PRELOAD`.
//!
//! The cluster view's files are bind-mounted over the job's /proc and /sys
//! files, which covers `getconf`, Python's `os.cpu_count()`, `free` and
//! `uptime`. Programs that count CPUs from their affinity mask (`nproc`,
//! OpenMP runtimes) ask the kernel directly; this library answers them with
//! the cluster's CPUs, read from `/sys/devices/system/cpu/online` — the
//! view's file inside a job, so both answers always agree.
//!
//! It also carries distant exec (`exec`): see there.
//!
//! Without the standard library: it is loaded into every program a job
//! runs, and std brought libgcc_s (its unwinder) and its own start-up with
//! it, 0.2 ms of every exec here (`perf stat /bin/true`: 0.92 against 0.73
//! ms with a library of `core` and `alloc` only). Panics abort, as they
//! must in code that runs inside other programs.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod cpus;
mod exec;
mod heap;

/// `core` and `alloc` come built for unwinding: their landing pads name the
/// personality routine of Rust frames and the unwinder's resume. Nothing
/// here unwinds (panics abort), so neither is ever called; defined here,
/// they keep libgcc_s out of every program a job runs.
#[cfg(not(test))]
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[cfg(not(test))]
#[no_mangle]
extern "C" fn _Unwind_Resume() -> ! {
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: abort has no preconditions.
    unsafe { libc::abort() }
}
