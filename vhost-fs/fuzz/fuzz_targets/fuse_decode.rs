//! Fuzzes the FUSE decoder with arbitrary guest bytes: it must never panic, and what it
//! accepts must be self-consistent (the header's length matches what arrived).
//!
//! Run: `cd vhost-fs/fuzz && cargo +nightly fuzz run fuse_decode` (see ../README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("fuse_decode_check.rs");

fuzz_target!(|data: &[u8]| check(data));
