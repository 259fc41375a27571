//! Fuzzes the recovery of a tiered disk's cache device from damaged contents: it must
//! refuse or recover, never panic, and never map a block twice or beyond the device.
//!
//! Run: `cd storage-core/fuzz && cargo +nightly fuzz run cache_recovery` (see README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

include!("cache_recovery_check.rs");

fuzz_target!(|data: &[u8]| check(data));
