//! The anti-forensic splitter of LUKS (`AF_split`/`AF_merge` in cryptsetup, LUKS1 and LUKS2
//! keyslots alike): a key is stored as `stripes` blocks, all but the last random, each folded
//! into the next through a hash diffusion, so that losing any part of the stored material
//! (a wiped sector) loses the key. SHA-256 only: the hash LUKS defaults to and the one QEMU
//! and cryptsetup write; others are refused when a header is read.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const DIGEST: usize = 32;

/// Replaces `block` with its diffusion: each 32-byte piece (the last possibly shorter) by
/// SHA-256 of its index (big-endian) and itself.
fn diffuse(block: &mut [u8]) {
    for (i, piece) in block.chunks_mut(DIGEST).enumerate() {
        let mut h = Sha256::new();
        h.update((i as u32).to_be_bytes());
        h.update(&*piece);
        let d = h.finalize();
        let n = piece.len();
        piece.copy_from_slice(&d[..n]);
    }
}

fn xor_into(acc: &mut [u8], other: &[u8]) {
    for (a, b) in acc.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// The key stored in `material` (`key.len() * stripes` bytes), into `key`.
pub fn merge(material: &[u8], stripes: usize, key: &mut [u8]) {
    let n = key.len();
    assert!(
        stripes >= 1 && material.len() == n * stripes,
        "AF material size"
    );
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for stripe in material.chunks_exact(n).take(stripes - 1) {
        xor_into(&mut acc, stripe);
        diffuse(&mut acc);
    }
    key.copy_from_slice(&material[(stripes - 1) * n..]);
    xor_into(key, &acc);
}

/// `key` split into `stripes` blocks, the random ones from `random`.
pub fn split(key: &[u8], stripes: usize, random: &mut dyn FnMut(&mut [u8])) -> Zeroizing<Vec<u8>> {
    let n = key.len();
    assert!(stripes >= 1, "AF stripes");
    let mut out = Zeroizing::new(vec![0u8; n * stripes]);
    let mut acc = Zeroizing::new(vec![0u8; n]);
    for stripe in out.chunks_exact_mut(n).take(stripes - 1) {
        random(stripe);
        xor_into(&mut acc, stripe);
        diffuse(&mut acc);
    }
    let last = &mut out[(stripes - 1) * n..];
    last.copy_from_slice(key);
    xor_into(last, &acc);
    out
}
