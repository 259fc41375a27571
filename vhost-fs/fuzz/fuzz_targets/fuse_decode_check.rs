// The property the `fuse_decode` fuzz target checks, shared (by `include!`) with the stable
// replayer `vhost-fs/examples/fuse_decode_replay.rs` and the regression test
// `vhost-fs/tests/fuzz_regressions.rs`, so the check compiles and is linted with the
// workspace even where cargo-fuzz (nightly) is not available.

/// A filesystem that implements nothing: every operation answers ENOSYS, so the server
/// above the decoder runs its dispatch and reply encoding without touching the host.
struct NoFs;

impl vhost_fs::filesystem::FileSystem for NoFs {}

/// An INIT as a Linux 6.1 guest sends it, so the message under test reaches dispatch.
fn init_message() -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_le_bytes());
    m.extend_from_slice(&vhost_fs::fuse::opcode::INIT.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&[0; 24]); // nodeid, uid, gid, pid, padding
    for v in [7u32, 36, 65536, u32::MAX, u32::MAX] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    m.resize(104, 0);
    m
}

/// Decodes arbitrary guest bytes and serves them: must never panic, what the decoder
/// accepts must be self-consistent (the header's length covers at least the header), and
/// the server's answer is a reply with a negated errno (or 0), or nothing.
fn check(data: &[u8]) {
    // The first two bytes choose how many WRITE data bytes "followed" in guest memory.
    let (extra, msg) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    if let Ok((h, _req)) = vhost_fs::decode::decode(msg, extra) {
        assert!(h.len as usize >= vhost_fs::fuse::IN_HEADER_LEN);
    }
    let server = vhost_fs::server::Server::new(std::sync::Arc::new(NoFs));
    let _ = server.handle(&init_message(), 0);
    if let (_, vhost_fs::server::Outcome::Reply(r)) = server.handle(msg, extra) {
        assert!((-4095..=0).contains(&r.error), "errno {}", r.error);
    }
}
