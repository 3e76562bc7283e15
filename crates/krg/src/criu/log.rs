//! The tail of CRIU's log file, quoted in errors.
//!
//! CRIU's answer carries only its last error message; the lines before it
//! often say what really went wrong (a mount it cannot find, a file it
//! cannot open). Reads at most [`LOG_TAIL_BYTES_MAX`] from the end.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::LOG_TAIL_LINES_MAX;

/// How much of the end of a log is read.
pub const LOG_TAIL_BYTES_MAX: u64 = 64 << 10;

/// Errors every CRIU run logs on this kind of host and that explain
/// nothing: root without `CAP_SYS_RESOURCE` cannot raise `RLIMIT_NOFILE`.
const HARMLESS: &[&str] = &["Can't setup RLIMIT_NOFILE"];

/// The last error lines of the log (`Error (file.c:N): ...`), without
/// their time stamps, at most [`LOG_TAIL_LINES_MAX`]; when the log has no
/// error line, its last lines. Empty if the log cannot be read.
pub fn tail(path: &Path) -> Vec<String> {
    let Ok(text) = read_end(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("Error (") && !is_harmless(l))
        .collect();
    let chosen = if errors.is_empty() { lines } else { errors };
    let skip = chosen.len().saturating_sub(LOG_TAIL_LINES_MAX);
    chosen[skip..].iter().map(|l| strip_stamp(l)).collect()
}

/// Whether a CRIU error message is one every run logs here and that
/// explains nothing.
pub fn is_harmless(message: &str) -> bool {
    HARMLESS.iter().any(|h| message.contains(h))
}

/// One sentence: `log PATH: line | line`, or `log PATH is empty`.
pub fn describe(path: &Path) -> String {
    let lines = tail(path);
    if lines.is_empty() {
        format!("log {} has nothing to say", path.display())
    } else {
        format!("log {}: {}", path.display(), lines.join(" | "))
    }
}

fn read_end(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(LOG_TAIL_BYTES_MAX);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(LOG_TAIL_BYTES_MAX).read_to_end(&mut bytes)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        // The first line is cut; drop it.
        if let Some(newline) = text.find('\n') {
            text.drain(..=newline);
        }
    }
    Ok(text)
}

/// `(00.012114)      1: Error (criu/util.c:1533): x` -> `1: Error (criu/util.c:1533): x`.
fn strip_stamp(line: &str) -> String {
    let line = line.trim();
    let rest = match (line.starts_with('('), line.find(')')) {
        (true, Some(end)) => line[end + 1..].trim_start(),
        _ => line,
    };
    rest.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn log_with(text: &str) -> (tempdir::Dir, std::path::PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("dump.log");
        File::create(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("write log");
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static NEXT: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "krg-criu-log-{}-{}",
                    std::process::id(),
                    NEXT.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).expect("temp dir");
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn quotes_the_last_errors_but_not_the_harmless_one() {
        let (_dir, path) = log_with(
            "(00.000001) Version: 4.1.1\n\
             (00.012114) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n\
             (00.013714) Error (criu/mount.c:753): mnt: 78:./run/x doesn't have a proper root mount\n\
             (00.013776) Error (criu/cr-dump.c:2111): Dumping FAILED.\n",
        );
        assert_eq!(
            tail(&path),
            vec![
                "Error (criu/mount.c:753): mnt: 78:./run/x doesn't have a proper root mount",
                "Error (criu/cr-dump.c:2111): Dumping FAILED."
            ]
        );
        assert!(describe(&path).contains("proper root mount"));
    }

    #[test]
    fn without_errors_quotes_the_last_lines() {
        let text: String = (0..10)
            .map(|i| format!("({i:02}.000000) line {i}\n"))
            .collect();
        let (_dir, path) = log_with(&text);
        assert_eq!(tail(&path), vec!["line 6", "line 7", "line 8", "line 9"]);
    }

    #[test]
    fn a_missing_log_says_nothing() {
        assert!(tail(Path::new("/nonexistent/krg/criu.log")).is_empty());
        assert!(describe(Path::new("/nonexistent/x.log")).contains("nothing to say"));
    }
}
