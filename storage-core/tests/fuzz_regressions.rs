//! Replays the `cache_recovery` fuzz target's seeds and every input it ever failed on
//! (`fuzz/regressions/cache_recovery/`, one file each, named after what it covers) through
//! the same check, on stable Rust, as part of `cargo test -p storage-core`.

use std::path::Path;

include!("../fuzz/fuzz_targets/cache_recovery_check.rs");

#[test]
fn cache_recovery_regressions_pass_the_fuzz_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/cache_recovery");
    testkit::fuzz::replay(&dir, check);
}

/// The template the target mutates recovers to what was written into it, so the fuzzer
/// starts from a cache that gets past every check, and sealing leaves it intact.
#[test]
fn the_fuzz_template_recovers_whole() {
    use storage_core::tier::fuzzing;
    let mut image = fuzzing::template();
    let mapped = fuzzing::recover(&image).unwrap();
    assert_eq!(
        mapped.len(),
        40,
        "20 checkpointed slots and 20 journaled ones"
    );
    fuzzing::seal(&mut image);
    assert_eq!(fuzzing::recover(&image).unwrap(), mapped);
}

/// A sealed table that maps a block beyond the capacity device is refused, not trusted.
#[test]
fn a_slot_beyond_the_capacity_device_is_refused() {
    use storage_core::tier::fuzzing;
    let data = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/cache_recovery/seed-block-beyond-capacity"),
    )
    .unwrap();
    let mut image = fuzzing::template();
    let (offset, len) = (
        usize::from(data[1]) | usize::from(data[2]) << 8 | usize::from(data[3]) << 16,
        usize::from(data[4]),
    );
    image[offset..offset + len].copy_from_slice(&data[5..5 + len]);
    fuzzing::seal(&mut image);
    let err = fuzzing::recover(&image).unwrap_err();
    assert!(err.to_string().contains("beyond the end"), "{err}");
}
