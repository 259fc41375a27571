//! AES-256-XTS (IEEE 1619) with the `plain64` IV of dm-crypt and QEMU: each encryption
//! sector's tweak is its number as a 128-bit little-endian value, encrypted with the second
//! half of the key. The mode is ours, because the data path needs it fast. Where the CPU
//! has VAES and AVX-512 (detected at run time), one pass over the data does it all: sixteen
//! blocks at a time are loaded, whitened (XORed with their tweaks), run through AES-256's
//! rounds four blocks per instruction, whitened again and stored, the tweaks made in
//! registers as they are used (round keys expanded with AES-NI, kept in the `Xts` and
//! wiped with it; a disk's `Xts` lives in locked memory). Elsewhere the `aes` crate's
//! cipher takes 4 KiB of blocks per call (a call costs a fixed setup), with the whitening
//! around it four blocks per instruction on AVX-512, else in registers.
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
    /// The data key's round keys, for the fused path (VAES with AVX-512: whitening and
    /// cipher in one pass over the data, four registers of four blocks at a time).
    #[cfg(target_arch = "x86_64")]
    fused: Option<RoundKeys>,
}

/// AES-256's fifteen round keys, for encryption and (the equivalent inverse cipher's)
/// decryption.
#[cfg(target_arch = "x86_64")]
struct RoundKeys {
    enc: [[u8; 16]; 15],
    dec: [[u8; 16]; 15],
}

/// Round keys are key material (the first two are the key itself): wiped when dropped, as
/// the `aes` crate's are, whether or not the `Xts` lived in locked memory (a keyslot's
/// short-lived one does not).
#[cfg(target_arch = "x86_64")]
impl Drop for RoundKeys {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.enc.zeroize();
        self.dec.zeroize();
    }
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
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `fused_available` checked the CPU has AES-NI (all `expand` needs).
            fused: fused_available().then(|| unsafe { expand(&key[..32]) }),
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
            if let Some(keys) = &self.fused {
                // SAFETY: `fused` is set only where the CPU has VAES, AES-NI, AVX-512F and
                // AVX-512BW.
                unsafe {
                    if encrypt {
                        xts_fused::<true>(keys, batch, per_sector, firsts)
                    } else {
                        xts_fused::<false>(keys, batch, per_sector, firsts)
                    }
                };
                continue;
            }
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

#[cfg(target_arch = "x86_64")]
fn fused_available() -> bool {
    wide_available()
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("aes")
}

/// AES-256's key expansion (FIPS 197) with AES-NI, and the decryption round keys of the
/// equivalent inverse cipher (the middle ones through InvMixColumns).
///
/// # Safety
/// The CPU must have AES-NI.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "aes,sse2")]
unsafe fn expand(key: &[u8]) -> RoundKeys {
    use std::arch::x86_64::*;
    #[target_feature(enable = "aes,sse2")]
    #[inline]
    fn mix(a: __m128i, t: __m128i) -> __m128i {
        let a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
        let a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
        let a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
        _mm_xor_si128(a, t)
    }
    assert_eq!(key.len(), 32, "an AES-256 key");
    let mut rk = [_mm_setzero_si128(); 15];
    // SAFETY: `key` is 32 readable bytes; unaligned loads of its halves.
    let (mut a, mut b) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast()),
            _mm_loadu_si128(key[16..].as_ptr().cast()),
        )
    };
    rk[0] = a;
    rk[1] = b;
    // Round keys 2i and (but for the last, i = 7) 2i + 1 from the two before, with
    // round constant `rcon`.
    macro_rules! round {
        ($i:expr, $rcon:expr) => {
            a = mix(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[2 * $i] = a;
        };
        ($i:expr, $rcon:expr, both) => {
            round!($i, $rcon);
            b = mix(
                b,
                _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
            );
            rk[2 * $i + 1] = b;
        };
    }
    round!(1, 0x01, both);
    round!(2, 0x02, both);
    round!(3, 0x04, both);
    round!(4, 0x08, both);
    round!(5, 0x10, both);
    round!(6, 0x20, both);
    round!(7, 0x40);
    let mut keys = RoundKeys {
        enc: [[0; 16]; 15],
        dec: [[0; 16]; 15],
    };
    for i in 0..15 {
        let d = match i {
            0 => rk[14],
            14 => rk[0],
            _ => _mm_aesimc_si128(rk[14 - i]),
        };
        // SAFETY: 16 writable bytes each; unaligned stores.
        unsafe {
            _mm_storeu_si128(keys.enc[i].as_mut_ptr().cast(), rk[i]);
            _mm_storeu_si128(keys.dec[i].as_mut_ptr().cast(), d);
        }
    }
    for r in rk.iter_mut() {
        // SAFETY: `r` is a valid, aligned `__m128i` of ours; a volatile write so the wipe
        // is not optimised away.
        unsafe { std::ptr::write_volatile(r, _mm_setzero_si128()) };
    }
    keys
}

/// XTS in one pass over the data: sixteen blocks (four registers) at a time are loaded,
/// whitened, run through AES-256's rounds (VAES: four blocks per instruction), whitened
/// again and stored; the tweaks never leave registers.
///
/// # Safety
/// The CPU must have VAES, AES-NI, AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,vaes,aes")]
unsafe fn xts_fused<const ENCRYPT: bool>(
    keys: &RoundKeys,
    blocks: &mut [[u8; BLOCK]],
    per_sector: usize,
    firsts: &[Array<u8, U16>],
) {
    use std::arch::x86_64::*;
    let rk = if ENCRYPT { &keys.enc } else { &keys.dec };
    let mut k = [_mm512_setzero_si512(); 15];
    for (k, r) in k.iter_mut().zip(rk) {
        // SAFETY: 16 readable bytes; an unaligned load.
        *k = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(r.as_ptr().cast()) });
    }
    for (run, first) in blocks.chunks_mut(per_sector).zip(firsts) {
        let mut t = first_four(first);
        for group in run.chunks_exact_mut(16) {
            let p = group.as_mut_ptr().cast::<__m512i>();
            let t0 = t;
            let t1 = step4_wide(t0);
            let t2 = step4_wide(t1);
            let t3 = step4_wide(t2);
            t = step4_wide(t3);
            let tw = [t0, t1, t2, t3];
            let mut x = [_mm512_setzero_si512(); 4];
            for (i, x) in x.iter_mut().enumerate() {
                // SAFETY: `group` is sixteen 16-byte blocks, 256 bytes we may read and
                // write: register `i` is bytes 64i to 64i + 63; an unaligned load.
                let v = unsafe { _mm512_loadu_si512(p.add(i)) };
                *x = _mm512_xor_si512(_mm512_xor_si512(v, tw[i]), k[0]);
            }
            for key in &k[1..14] {
                for x in x.iter_mut() {
                    *x = if ENCRYPT {
                        _mm512_aesenc_epi128(*x, *key)
                    } else {
                        _mm512_aesdec_epi128(*x, *key)
                    };
                }
            }
            for (i, x) in x.iter().enumerate() {
                let last = if ENCRYPT {
                    _mm512_aesenclast_epi128(*x, k[14])
                } else {
                    _mm512_aesdeclast_epi128(*x, k[14])
                };
                // SAFETY: as the load above; an unaligned store.
                unsafe { _mm512_storeu_si512(p.add(i), _mm512_xor_si512(last, tw[i])) };
            }
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
    let quads_per_sector = per_sector / 4;
    for (s, (run, first)) in blocks.chunks_mut(per_sector).zip(firsts).enumerate() {
        // Made in registers: a store of the tweaks and a wider load of them would wait.
        let mut even = first_four(first);
        let mut odd = step4_wide(even);
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

/// The last step of multiplying each 128-bit lane of a register by α^n (n ≤ 57, as
/// XTS's GF(2^128) does): `shifted` holds both 64-bit halves shifted left by n, `out` the
/// n bits each half shifted out (at its bottom). The low half's go into the high half;
/// the high half's, k, fold back into the low as k·(x⁷ + x² + x + 1).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn carry_and_fold(
    shifted: std::arch::x86_64::__m512i,
    out: std::arch::x86_64::__m512i,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // The intrinsics are safe here: this function has their target features.
    let carry = _mm512_bslli_epi128::<8>(out);
    let k = _mm512_bsrli_epi128::<8>(out);
    let fold = _mm512_xor_si512(
        _mm512_xor_si512(k, _mm512_slli_epi64::<1>(k)),
        _mm512_xor_si512(_mm512_slli_epi64::<2>(k), _mm512_slli_epi64::<7>(k)),
    );
    _mm512_xor_si512(_mm512_xor_si512(shifted, carry), fold)
}

/// t·α^i in lane i (0 to 3) of four copies of a sector's first tweak t.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn first_four(first: &Array<u8, U16>) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let t = u128::from_le_bytes((*first).into());
    let t = _mm512_broadcast_i32x4(_mm_set_epi64x((t >> 64) as i64, t as i64));
    let left = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    // A shift by 64 gives 0: lane 0 carries nothing.
    let right = _mm512_set_epi64(61, 61, 62, 62, 63, 63, 64, 64);
    carry_and_fold(_mm512_sllv_epi64(t, left), _mm512_srlv_epi64(t, right))
}

/// Each lane times α⁴.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn step4_wide(t: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    carry_and_fold(_mm512_slli_epi64::<4>(t), _mm512_srli_epi64::<60>(t))
}

/// Each lane times α⁸.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn step8(t: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    carry_and_fold(_mm512_slli_epi64::<8>(t), _mm512_srli_epi64::<56>(t))
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

    /// The three paths (fused with VAES, the wide whitening around the `aes` crate's
    /// cipher, the portable one) encrypt alike and each decrypts what they make, on every
    /// sector size LUKS uses, over whole 4 KiB batches and a part of one.
    #[test]
    fn the_fused_wide_and_portable_paths_agree() {
        let key: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        let wide = Xts::new(&key).unwrap();
        let mut narrow = Xts::new(&key).unwrap();
        narrow.wide = false;
        // The wide whitening around the `aes` crate's cipher, as on CPUs without VAES.
        #[allow(unused_mut)]
        let mut unfused = Xts::new(&key).unwrap();
        #[cfg(target_arch = "x86_64")]
        {
            narrow.fused = None;
            unfused.fused = None;
            if wide.fused.is_none() {
                eprintln!("no VAES on this CPU: the fused path is not tested here");
            }
        }
        if !wide.wide {
            eprintln!("no AVX-512 on this CPU: only the portable path is tested here");
        }
        for sector_size in [512usize, 1024, 2048, 4096] {
            // Six whole 4 KiB batches and a part of one (below 4 KiB sectors).
            let len = 3 * 8192 + 11 * sector_size as u32;
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
            let paths = [("fused", &wide), ("wide", &unfused), ("portable", &narrow)];
            let mut sealed = Vec::new();
            for (name, x) in paths {
                let mut a = plain.clone();
                x.encrypt(&mut a, 0x1234_5678_9abc, sector_size);
                assert_ne!(a, plain, "{name} {sector_size}");
                sealed.push(a);
            }
            assert!(sealed.iter().all(|a| *a == sealed[0]), "{sector_size}");
            for (name, x) in paths {
                let mut a = sealed[0].clone();
                x.decrypt(&mut a, 0x1234_5678_9abc, sector_size);
                assert!(a == plain, "{name} decrypts, {sector_size}-byte sectors");
            }
        }
    }
}
