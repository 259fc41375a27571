//! Replays every input the `fuse_decode` fuzz target ever failed on
//! (`fuzz/regressions/fuse_decode/`, one file each, named after what went wrong) through the
//! same check, on stable Rust, as part of `cargo test -p vhost-fs`.

use std::path::Path;

include!("../fuzz/fuzz_targets/fuse_decode_check.rs");

#[test]
fn fuse_decode_regressions_pass_the_fuzz_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/fuse_decode");
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
