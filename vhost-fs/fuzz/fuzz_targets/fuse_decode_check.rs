// The property the `fuse_decode` fuzz target checks, shared (by `include!`) with the stable
// replayer `vhost-fs/examples/fuse_decode_replay.rs`, so the check compiles and is linted
// with the workspace even where cargo-fuzz (nightly) is not available.

/// Decodes arbitrary guest bytes: must never panic, and what it accepts must be
/// self-consistent (the header's length covers at least the header).
fn check(data: &[u8]) {
    // The first two bytes choose how many WRITE data bytes "followed" in guest memory.
    let (extra, msg) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    if let Ok((h, _req)) = vhost_fs::decode::decode(msg, extra) {
        assert!(h.len as usize >= vhost_fs::fuse::IN_HEADER_LEN);
    }
}
