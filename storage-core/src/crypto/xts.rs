//! AES-256-XTS (IEEE 1619) with the `plain64` IV of dm-crypt and QEMU: each encryption
//! sector's tweak is its number as a 128-bit little-endian value, encrypted with the second
//! half of the key. The block cipher is the `aes` crate's (AES-NI, and VAES where the CPU has
//! it, detected at run time); the mode is ours, because the data path needs it fast: a call
//! into the cipher costs a fixed setup, so 4 KiB of blocks go in at a time, and the
//! whitening around it (each block XORed with its tweak, before and after) runs four blocks
//! per instruction with AVX-512 where the CPU has it, from tweaks made as they are used.
//! `benches/benches/xts.rs` measures it beside `openssl speed`.

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::Aes256;

const BLOCK: usize = 16;

/// A 512-bit XTS key (two AES-256 keys), as LUKS stores it.
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
    /// Whitening four blocks per instruction (AVX-512, checked at run time).
    wide: bool,
}

/// XTS was given a key of the wrong length.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XtsError {
    #[error("an aes-xts key is 64 bytes (AES-256), not {0}")]
    KeyLength(usize),
}

impl Xts {
    pub fn new(key: &[u8]) -> Result<Xts, XtsError> {
        if key.len() != 64 {
            return Err(XtsError::KeyLength(key.len()));
        }
        Ok(Xts {
            data: Aes256::new_from_slice(&key[..32]).expect("32 bytes"),
            tweak: Aes256::new_from_slice(&key[32..]).expect("32 bytes"),
            wide: wide_available(),
        })
    }

    /// Encrypts `buf` in place: consecutive sectors of `sector_size` bytes (a power of two
    /// from 512 to 4096, as LUKS allows), the first numbered `sector` for its IV.
    ///
    /// Panics unless `buf` is whole sectors of an allowed size: its callers (keyslots, the
    /// disk's sector-aligned requests) hold those by construction.
    pub fn encrypt(&self, buf: &mut [u8], sector: u64, sector_size: usize) {
        self.run(buf, sector, sector_size, true);
    }

    /// Decrypts `buf` in place (see [`encrypt`](Self::encrypt)).
    pub fn decrypt(&self, buf: &mut [u8], sector: u64, sector_size: usize) {
        self.run(buf, sector, sector_size, false);
    }

    fn run(&self, buf: &mut [u8], sector: u64, sector_size: usize, encrypt: bool) {
        // LUKS's sector sizes; a batch (4 KiB) is whole sectors, at most eight of them.
        assert!(
            sector_size.is_power_of_two() && (512..=BATCH_BLOCKS * BLOCK).contains(&sector_size),
            "XTS sectors are 512 bytes to 4 KiB"
        );
        assert!(
            buf.len().is_multiple_of(sector_size),
            "XTS takes whole sectors"
        );
        let per_sector = sector_size / BLOCK;
        let (blocks, _) = buf.as_chunks_mut::<BLOCK>();
        let mut firsts = [Array::default(); BATCH_BLOCKS * BLOCK / 512];
        for (n, batch) in blocks.chunks_mut(BATCH_BLOCKS).enumerate() {
            // The batch's sectors' first tweaks (their numbers under the tweak key), in one
            // call; the rest are whitening's (see `whiten`).
            let sectors = batch.len().div_ceil(per_sector);
            let first_sector = sector.wrapping_add((n * BATCH_BLOCKS / per_sector) as u64);
            let firsts = &mut firsts[..sectors];
            for (i, t) in firsts.iter_mut().enumerate() {
                *t = Array::from(u128::from(first_sector.wrapping_add(i as u64)).to_le_bytes());
            }
            self.tweak.encrypt_blocks(firsts);
            #[cfg(target_arch = "x86_64")]
            if self.wide {
                // The tweaks made for the first whitening, XORed in again after the cipher.
                let mut kept = [[0u8; 4 * BLOCK]; BATCH_BLOCKS / 4];
                // SAFETY: `wide` is set only where the CPU has AVX-512F and AVX-512BW.
                unsafe { whiten_avx512(batch, per_sector, firsts, &mut kept) };
                self.cipher(batch, encrypt);
                // SAFETY: as above.
                unsafe { rewhiten_avx512(batch, &kept) };
                continue;
            }
            whiten(batch, per_sector, firsts);
            self.cipher(batch, encrypt);
            whiten(batch, per_sector, firsts);
        }
    }

    #[inline(always)]
    fn cipher(&self, blocks: &mut [[u8; BLOCK]], encrypt: bool) {
        let arrays = Array::cast_slice_from_core_mut(blocks);
        if encrypt {
            self.data.encrypt_blocks(arrays);
        } else {
            self.data.decrypt_blocks(arrays);
        }
    }
}

fn wide_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`whiten`] four blocks per instruction: a 512-bit register holds the tweaks of four
/// consecutive blocks, XORed into them at once. Two registers take turns (quads 0, 2, 4...
/// and 1, 3, 5...), each multiplied by α⁸ for its next quad, so no step waits on the one
/// before it; each quad's tweaks are kept in `kept` for [`rewhiten_avx512`].
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn whiten_avx512(
    blocks: &mut [[u8; BLOCK]],
    per_sector: usize,
    firsts: &[Array<u8, U16>],
    kept: &mut [[u8; 4 * BLOCK]; BATCH_BLOCKS / 4],
) {
    use std::arch::x86_64::*;
    // t·α⁸ in each 128-bit lane: both halves shifted by 8, the low half's top 8 bits
    // carried into the high half, the high half's folded back into the low as
    // k·(x⁷ + x² + x + 1).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn step8(t: __m512i) -> __m512i {
        // The intrinsics are safe here: this function has their target features.
        let shifted = _mm512_slli_epi64::<8>(t);
        let out = _mm512_srli_epi64::<56>(t);
        let carry = _mm512_bslli_epi128::<8>(out);
        let k = _mm512_bsrli_epi128::<8>(out);
        let fold = _mm512_xor_si512(
            _mm512_xor_si512(k, _mm512_slli_epi64::<1>(k)),
            _mm512_xor_si512(_mm512_slli_epi64::<2>(k), _mm512_slli_epi64::<7>(k)),
        );
        _mm512_xor_si512(_mm512_xor_si512(shifted, carry), fold)
    }
    // t·α^i in lane i (0 to 3) of four copies of t: each lane's halves shifted left by i,
    // the low half's top i bits carried into the high half, the high half's folded back.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn first_four(first: &Array<u8, U16>) -> __m512i {
        let t = u128::from_le_bytes((*first).into());
        let lane = _mm_set_epi64x((t >> 64) as i64, t as i64);
        let t = _mm512_broadcast_i32x4(lane);
        let left = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
        let right = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
        let shifted = _mm512_sllv_epi64(t, left);
        let out = _mm512_srlv_epi64(t, right);
        let carry = _mm512_bslli_epi128::<8>(out);
        let k = _mm512_bsrli_epi128::<8>(out);
        let fold = _mm512_xor_si512(
            _mm512_xor_si512(k, _mm512_slli_epi64::<1>(k)),
            _mm512_xor_si512(_mm512_slli_epi64::<2>(k), _mm512_slli_epi64::<7>(k)),
        );
        _mm512_xor_si512(_mm512_xor_si512(shifted, carry), fold)
    }
    // t·α⁴ in each lane (as `step8`, by 4).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn step4(t: __m512i) -> __m512i {
        let shifted = _mm512_slli_epi64::<4>(t);
        let out = _mm512_srli_epi64::<60>(t);
        let carry = _mm512_bslli_epi128::<8>(out);
        let k = _mm512_bsrli_epi128::<8>(out);
        let fold = _mm512_xor_si512(
            _mm512_xor_si512(k, _mm512_slli_epi64::<1>(k)),
            _mm512_xor_si512(_mm512_slli_epi64::<2>(k), _mm512_slli_epi64::<7>(k)),
        );
        _mm512_xor_si512(_mm512_xor_si512(shifted, carry), fold)
    }
    let quads_per_sector = per_sector / 4;
    for (s, (run, first)) in blocks.chunks_mut(per_sector).zip(firsts).enumerate() {
        // Made in registers: a store of the tweaks and a wider load of them would wait.
        let mut even = first_four(first);
        let mut odd = step4(even);
        let keep = &mut kept[s * quads_per_sector..(s + 1) * quads_per_sector];
        for (pair, saved) in run.chunks_exact_mut(8).zip(keep.chunks_exact_mut(2)) {
            let p = pair.as_mut_ptr().cast::<__m512i>();
            let k = saved.as_mut_ptr().cast::<__m512i>();
            // SAFETY: `pair` is eight consecutive 16-byte blocks (128 bytes we may read and
            // write) and `saved` two 64-byte entries; unaligned loads and stores.
            unsafe {
                _mm512_storeu_si512(p, _mm512_xor_si512(_mm512_loadu_si512(p), even));
                _mm512_storeu_si512(
                    p.add(1),
                    _mm512_xor_si512(_mm512_loadu_si512(p.add(1)), odd),
                );
                _mm512_storeu_si512(k, even);
                _mm512_storeu_si512(k.add(1), odd);
            }
            even = step8(even);
            odd = step8(odd);
        }
    }
}

/// The second whitening of a batch: each quad XORed with the tweaks the first kept.
///
/// # Safety
/// The CPU must have AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn rewhiten_avx512(blocks: &mut [[u8; BLOCK]], kept: &[[u8; 4 * BLOCK]; BATCH_BLOCKS / 4]) {
    use std::arch::x86_64::*;
    for (quad, saved) in blocks.chunks_exact_mut(4).zip(kept) {
        let p = quad.as_mut_ptr().cast::<__m512i>();
        // SAFETY: `quad` is 64 bytes we may read and write, `saved` 64 we may read;
        // unaligned loads and store.
        unsafe {
            let t = _mm512_loadu_si512(saved.as_ptr().cast());
            _mm512_storeu_si512(p, _mm512_xor_si512(_mm512_loadu_si512(p), t));
        }
    }
}

/// XORs each sector's blocks with its tweaks t, t·α, t·α², ... (`firsts`: each sector's t),
/// made as they are used, in four independent chains (each block's tweak from the one four
/// before, `step4`) kept in registers: no tweak is stored, and no step waits on the one
/// before it.
#[inline(always)]
fn whiten(
    blocks: &mut [[u8; BLOCK]],
    per_sector: usize,
    firsts: &[Array<u8, aes::cipher::consts::U16>],
) {
    for (run, first) in blocks.chunks_mut(per_sector).zip(firsts) {
        let mut t0 = u128::from_le_bytes((*first).into());
        let mut t1 = next_tweak(t0);
        let mut t2 = next_tweak(t1);
        let mut t3 = next_tweak(t2);
        for quad in run.chunks_exact_mut(4) {
            xor(&mut quad[0], t0);
            xor(&mut quad[1], t1);
            xor(&mut quad[2], t2);
            xor(&mut quad[3], t3);
            t0 = step4(t0);
            t1 = step4(t1);
            t2 = step4(t2);
            t3 = step4(t3);
        }
    }
}

/// Blocks given to the cipher in one call: 4 KiB (a call has a fixed cost, so it gets many).
const BATCH_BLOCKS: usize = 256;

/// Multiplies a tweak by the primitive element α of GF(2^128) (little-endian, as XTS does).
#[inline(always)]
fn next_tweak(t: u128) -> u128 {
    (t << 1) ^ ((((t as i128) >> 127) as u128) & 0x87)
}

/// Multiplies a tweak by α⁴: a 4-bit shift, the 4 bits shifted out folded back in as
/// `k·(x⁷ + x² + x + 1)`.
#[inline(always)]
fn step4(t: u128) -> u128 {
    let k = t >> 124;
    (t << 4) ^ k ^ (k << 1) ^ (k << 2) ^ (k << 7)
}

#[inline(always)]
fn xor(b: &mut [u8; BLOCK], t: u128) {
    *b = (u128::from_le_bytes(*b) ^ t).to_le_bytes();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable whitening (CPUs without AVX-512) gives what the wide one gives, and
    /// both round-trip, on every sector size LUKS uses.
    #[test]
    fn the_portable_path_agrees_with_the_wide_one() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        let wide = Xts::new(&key).unwrap();
        let mut narrow = Xts::new(&key).unwrap();
        narrow.wide = false;
        if !wide.wide {
            eprintln!("no AVX-512 on this CPU: only the portable path is tested here");
        }
        for sector_size in [512, 1024, 2048, 4096] {
            let plain: Vec<u8> = (0..3 * 8192u32).map(|i| (i * 7 + i / 251) as u8).collect();
            let (mut a, mut b) = (plain.clone(), plain.clone());
            wide.encrypt(&mut a, 0x1234_5678_9abc, sector_size);
            narrow.encrypt(&mut b, 0x1234_5678_9abc, sector_size);
            assert_eq!(a, b, "{sector_size}");
            assert_ne!(a, plain);
            narrow.decrypt(&mut a, 0x1234_5678_9abc, sector_size);
            assert_eq!(a, plain, "{sector_size}");
        }
    }
}
