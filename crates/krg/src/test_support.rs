//! What the unit tests of several modules share.

use std::path::PathBuf;

/// An empty directory under the system's temporary directory, named after
/// the module (`module`), the test (`name`) and this process, made anew
/// (whatever an earlier run left there is removed first).
pub fn scratch_dir(module: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("krg-{module}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}
