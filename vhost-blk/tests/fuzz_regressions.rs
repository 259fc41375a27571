//! Replays the `blk_request` fuzz target's seeds and every input it ever failed on
//! (`fuzz/regressions/blk_request/`, one file each, named after what it covers) through
//! the same check, on stable Rust, as part of `cargo test -p vhost-blk`.

use std::path::Path;

include!("../fuzz/fuzz_targets/blk_request_check.rs");

#[test]
fn blk_request_regressions_pass_the_fuzz_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/blk_request");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if std::panic::catch_unwind(|| check(&data)).is_err() {
            panic!("{name} fails the fuzz check again");
        }
        names.push(name);
    }
    assert!(
        !names.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
}
