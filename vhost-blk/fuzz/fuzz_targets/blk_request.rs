//! Fuzzes virtio-blk request parsing with an arbitrary descriptor chain over guest memory
//! holding arbitrary bytes: it must never panic, and what it accepts must stay inside
//! guest memory and the disk.
//!
//! Run: `cd vhost-blk/fuzz && cargo +nightly fuzz run blk_request` (see ../README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("blk_request_check.rs");

fuzz_target!(|data: &[u8]| check(data));
