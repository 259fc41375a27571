//! Replaying a fuzz target's seeds and regressions on stable Rust, in `cargo test`.

use std::path::Path;

/// Runs `check` on every file in `dir` (one input each, named after what it covers).
///
/// # Panics
/// Naming the first input whose check panics, or if `dir` holds no input.
pub fn replay(dir: &Path, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{name} fails the fuzz check again");
        }
        names.push(name);
    }
    assert!(!names.is_empty(), "no inputs in {}", dir.display());
}
