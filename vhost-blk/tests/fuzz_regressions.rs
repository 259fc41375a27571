//! Replays the `blk_request` fuzz target's seeds and every input it ever failed on
//! (`fuzz/regressions/blk_request/`, one file each, named after what it covers) through
//! the same check, on stable Rust, as part of `cargo test -p vhost-blk`.

use std::path::Path;

include!("../fuzz/fuzz_targets/blk_request_check.rs");

#[test]
fn blk_request_regressions_pass_the_fuzz_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/blk_request");
    testkit::fuzz::replay(&dir, check);
}
