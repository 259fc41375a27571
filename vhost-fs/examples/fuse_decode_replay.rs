//! Runs the `fuse_decode` fuzz target's check on stable Rust, without libFuzzer: over the
//! files or directories given (a cargo-fuzz corpus, crash inputs), or, with no arguments,
//! over random messages with valid headers and random arguments.
//!
//! `cargo run --release -p vhost-fs --example fuse_decode_replay -- [PATH...]`

use std::path::Path;

include!("../fuzz/fuzz_targets/fuse_decode_check.rs");

fn run_path(path: &Path, count: &mut usize) -> std::io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            run_path(&entry?.path(), count)?;
        }
    } else {
        check(&std::fs::read(path)?);
        *count += 1;
    }
    Ok(())
}

fn main() -> std::io::Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let mut count = 0;
    if paths.is_empty() {
        // xorshift64*: reproducible, no dependencies.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        for _ in 0..1_000_000 {
            let args_len = (next() % 160) as usize;
            let opcode = (next() % 60) as u32;
            let mut data = Vec::with_capacity(2 + 40 + args_len);
            data.extend_from_slice(&((next() % 8192) as u16).to_le_bytes());
            data.extend_from_slice(&((40 + args_len) as u32).to_le_bytes());
            data.extend_from_slice(&opcode.to_le_bytes());
            data.extend((0..32 + args_len).map(|_| next() as u8));
            check(&data);
            count += 1;
        }
    } else {
        for p in &paths {
            run_path(Path::new(p), &mut count)?;
        }
    }
    println!("fuse_decode: {count} inputs, no failures");
    Ok(())
}
