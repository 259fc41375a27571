//! AES-256-XTS on the data path against OpenSSL on the same core, in one run: criterion
//! measures our encryption and decryption of a 4 KiB block (one 4096-byte sector, and eight
//! 512-byte ones, as LUKS1 lays them out); then `openssl speed -evp aes-256-xts -bytes
//! 4096` runs, and the bench prints its figure beside ours (timed the same way, 3 s of
//! back-to-back 4 KiB encryptions) and the ratio. The goal (issue #15): at least 0.8x.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use storage_core::crypto::xts::Xts;

const KEY: [u8; 64] = [0x5c; 64];

fn bench_xts(c: &mut Criterion) {
    let xts = Xts::new(&KEY).unwrap();
    let mut buf = vec![0xa5u8; 4096];
    let mut g = c.benchmark_group("xts");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("encrypt_4k_sector", |b| {
        b.iter(|| xts.encrypt(black_box(&mut buf), 7, 4096))
    });
    g.bench_function("decrypt_4k_sector", |b| {
        b.iter(|| xts.decrypt(black_box(&mut buf), 7, 4096))
    });
    g.bench_function("encrypt_8x512_sectors", |b| {
        b.iter(|| xts.encrypt(black_box(&mut buf), 7, 512))
    });
    // The block cipher alone on the same 4 KiB (256 blocks, one call): XTS's ceiling here.
    {
        use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
        let aes = aes::Aes256::new_from_slice(&KEY[..32]).unwrap();
        let mut blocks = vec![[0xa5u8; 16]; 256];
        g.bench_function("aes256_ecb_4k_ceiling", |b| {
            b.iter(|| aes.encrypt_blocks(Array::cast_slice_from_core_mut(black_box(&mut blocks))))
        });
    }
    g.finish();
    compare_with_openssl(&xts);
}

/// Bytes per second of back-to-back 4 KiB encryptions for `secs`.
fn ours(xts: &Xts, sector: usize, secs: f64) -> f64 {
    let mut buf = vec![0xa5u8; 4096];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..256 {
            xts.encrypt(black_box(&mut buf), n, sector);
            n += 1;
        }
    }
    n as f64 * 4096.0 / start.elapsed().as_secs_f64()
}

/// OpenSSL's figure for 4096-byte blocks, in bytes per second (its table is in 1000s of
/// bytes per second).
fn openssl() -> Result<f64, String> {
    let out = std::process::Command::new("openssl")
        .args([
            "speed",
            "-evp",
            "aes-256-xts",
            "-bytes",
            "4096",
            "-seconds",
            "3",
        ])
        .output()
        .map_err(|e| format!("openssl (Debian's openssl): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("AES-256-XTS") || l.starts_with("aes-256-xts"))
        .ok_or_else(|| format!("no aes-256-xts line in openssl's output: {text}"))?;
    let k: f64 = line
        .split_whitespace()
        .last()
        .and_then(|v| v.trim_end_matches('k').parse().ok())
        .ok_or_else(|| format!("cannot read openssl's figure in {line:?}"))?;
    Ok(k * 1000.0)
}

fn compare_with_openssl(xts: &Xts) {
    let theirs = match openssl() {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    };
    let mine_4k = ours(xts, 4096, 3.0);
    let mine_512 = ours(xts, 512, 3.0);
    println!("\nAES-256-XTS, 4 KiB buffers, one core:");
    println!(
        "  openssl speed -evp aes-256-xts -bytes 4096: {:.2} GB/s",
        theirs / 1e9
    );
    println!(
        "  ours, one 4096-byte sector:   {:.2} GB/s  ({:.2}x openssl)",
        mine_4k / 1e9,
        mine_4k / theirs
    );
    println!(
        "  ours, eight 512-byte sectors: {:.2} GB/s  ({:.2}x openssl)",
        mine_512 / 1e9,
        mine_512 / theirs
    );
    println!(
        "{}",
        serde_json::json!({"bench": "xts", "openssl_bps": theirs, "ours_4096_bps": mine_4k,
            "ours_512_bps": mine_512, "ratio_4096": mine_4k / theirs, "ratio_512": mine_512 / theirs})
    );
}

criterion_group!(benches, bench_xts);
criterion_main!(benches);
