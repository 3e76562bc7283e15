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

mod cpus;
mod exec;
