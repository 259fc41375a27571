//! Fuzzes the FUSE decoder with arbitrary guest bytes: it must never panic, and what it
//! accepts must be self-consistent (the header's length matches what arrived).
//!
//! Run: `cd vhost-fs/fuzz && cargo +nightly fuzz run fuse_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_fs::decode::decode;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose how many WRITE data bytes "followed" in guest memory.
    let (extra, msg) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (0, data),
    };
    if let Ok((h, _req)) = decode(msg, extra) {
        assert!(h.len as usize >= vhost_fs::fuse::IN_HEADER_LEN);
    }
});
