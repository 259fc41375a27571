//! Replays every input the `fuse_decode` fuzz target ever failed on
//! (`fuzz/regressions/fuse_decode/`, one file each, named after what went wrong) through the
//! same check, on stable Rust, as part of `cargo test -p vhost-fs`.

use std::path::Path;

include!("../fuzz/fuzz_targets/fuse_decode_check.rs");

#[test]
fn fuse_decode_regressions_pass_the_fuzz_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/fuse_decode");
    testkit::fuzz::replay(&dir, check);
}
