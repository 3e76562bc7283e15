//! CRIU's cache of what it learnt about the kernel (its "kerndat").
//!
//! CRIU probes the kernel at every start (15 ms of each dump, restore and
//! lazy-pages daemon here: a third of a lazy migration's freeze) unless it
//! finds `/run/criu.kdat`. It writes that file only when /run is a tmpfs,
//! so that a reboot clears it; where /run is not (this development
//! machine, a container on ext4), it never does. `krgd` then has CRIU
//! write it in a mount namespace of its own, with a tmpfs on /run, and
//! puts it in place: at start, unless a cache younger than both the boot
//! and the `criu` binary is there. CRIU still checks the file's magic
//! numbers (one is its build's) and ignores a cache not its own.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

/// Where CRIU looks for its cache (its build's `RUNDIR`).
const CACHE: &str = "/run/criu.kdat";

/// A cache is a C struct of about a kilobyte: anything much larger is not one.
const CACHE_BYTES_MAX: usize = 64 << 10;

/// What [`prime`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Primed {
    /// /run is a tmpfs: CRIU keeps its cache itself.
    NotNeeded,
    /// A cache younger than the boot and the binary is there.
    Fresh,
    /// A cache was written.
    Written,
}

/// Makes sure CRIU finds a cache of its kernel probes.
pub fn prime(criu: &Path) -> Result<Primed, String> {
    let run = nix::sys::statfs::statfs("/run").map_err(|e| format!("cannot stat /run: {e}"))?;
    if run.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC {
        return Ok(Primed::NotNeeded);
    }
    if is_fresh(criu) {
        return Ok(Primed::Fresh);
    }
    // `$0` is the binary; whatever `criu check` concludes, its probes are
    // cached by then.
    let script = "mount -t tmpfs krg-kdat /run && \"$0\" check >/dev/null 2>&1; cat /run/criu.kdat";
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(criu)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.stdout.is_empty() || out.stdout.len() > CACHE_BYTES_MAX {
        return Err(format!(
            "criu check left no cache in a private /run (exit {})",
            out.status
        ));
    }
    let tmp = format!("{CACHE}.krgd-{}", std::process::id());
    std::fs::write(&tmp, &out.stdout)
        .and_then(|()| std::fs::rename(&tmp, CACHE))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("cannot write {CACHE}: {e}")
        })?;
    Ok(Primed::Written)
}

/// Is the cache there, written since the boot and since the binary?
fn is_fresh(criu: &Path) -> bool {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let (Some(cache), Some(binary), Some(boot)) =
        (modified(Path::new(CACHE)), modified(criu), boot_time())
    else {
        return false;
    };
    cache > boot && cache > binary
}

fn boot_time() -> Option<SystemTime> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    SystemTime::now().checked_sub(Duration::from_secs_f64(secs))
}
