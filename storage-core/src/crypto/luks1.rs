//! The LUKS1 on-disk header (cryptsetup's "LUKS On-Disk Format Specification", version 1.2.3),
//! as QEMU (`qemu-img create -f luks`) and `cryptsetup luksFormat --type luks1` write it:
//! a 592-byte big-endian header at offset 0, eight keyslots each holding the master key
//! split by the anti-forensic splitter and encrypted with a key derived from a passphrase
//! by PBKDF2, a PBKDF2 digest of the master key to recognise it, and the payload (the
//! disk's sectors, encrypted with the master key) from `payload_offset`.
//!
//! Only what this node implements is accepted: `aes` in `xts-plain64` mode with a 512-bit
//! key (AES-256) and `sha256`; anything else is refused with the header's own words.

use pbkdf2::pbkdf2_hmac;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{af, secret::Locked, xts::Xts, CryptoError, MasterKey, KEY_BYTES};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
pub const HEADER_BYTES: usize = 592;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
pub const SLOTS: usize = 8;
/// LUKS1's sector: the unit of offsets in its header and of the payload's IVs.
pub const SECTOR: u64 = 512;
/// cryptsetup's keyslot and payload alignment (4 KiB), and its stripes.
const ALIGN: u64 = 4096;
pub const STRIPES: u32 = 4000;
/// The most PBKDF2 iterations a keyslot may ask for (minutes of CPU): a header is input, and
/// each open tries every slot.
pub const MAX_ITERATIONS: u32 = 50_000_000;
/// The same for the master key's digest (cryptsetup picks about an eighth of a second).
pub const MAX_DIGEST_ITERATIONS: u32 = 10_000_000;

/// One keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub active: bool,
    pub iterations: u32,
    pub salt: [u8; 32],
    /// In 512-byte sectors from the start of the device.
    pub key_offset: u32,
    pub stripes: u32,
}

/// A LUKS1 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// In 512-byte sectors from the start of the device.
    pub payload_offset: u32,
    pub mk_digest: [u8; 20],
    pub mk_digest_salt: [u8; 32],
    pub mk_digest_iterations: u32,
    pub uuid: String,
    pub slots: [Slot; SLOTS],
}

fn field(b: &[u8], at: usize, len: usize) -> String {
    let f = &b[at..at + len];
    let end = f.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&f[..end]).into_owned()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn put(b: &mut [u8], at: usize, s: &[u8]) {
    b[at..at + s.len()].copy_from_slice(s);
}

impl Header {
    /// Parses the first [`HEADER_BYTES`] of a device.
    pub fn parse(b: &[u8]) -> Result<Header, CryptoError> {
        if b.len() < HEADER_BYTES || b[..6] != MAGIC {
            return Err(CryptoError::NotLuks);
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(CryptoError::Unsupported(format!("LUKS version {version}")));
        }
        let (cipher, mode, hash) = (field(b, 8, 32), field(b, 40, 32), field(b, 72, 32));
        let key_bytes = be32(b, 108);
        if cipher != "aes" || mode != "xts-plain64" || key_bytes as usize != KEY_BYTES {
            return Err(CryptoError::Unsupported(format!(
                "cipher {cipher:?}, mode {mode:?} with a {}-bit key (only aes xts-plain64 with \
                 a 512-bit key)",
                u64::from(key_bytes) * 8
            )));
        }
        if hash != "sha256" {
            return Err(CryptoError::Unsupported(format!(
                "hash {hash:?} (only sha256)"
            )));
        }
        let mut slots: [Slot; SLOTS] = std::array::from_fn(|_| Slot {
            active: false,
            iterations: 0,
            salt: [0; 32],
            key_offset: 0,
            stripes: 0,
        });
        for (i, s) in slots.iter_mut().enumerate() {
            let at = 208 + i * 48;
            let state = be32(b, at);
            if state != SLOT_ENABLED && state != SLOT_DISABLED {
                return Err(CryptoError::Damaged(format!(
                    "keyslot {i} state {state:#x}"
                )));
            }
            *s = Slot {
                active: state == SLOT_ENABLED,
                iterations: be32(b, at + 4),
                salt: b[at + 8..at + 40].try_into().expect("32 bytes"),
                key_offset: be32(b, at + 40),
                stripes: be32(b, at + 44),
            };
            // As cryptsetup: 4000 stripes, always (the material's size follows from it).
            if s.stripes != STRIPES {
                return Err(CryptoError::Damaged(format!(
                    "keyslot {i}: {} stripes (LUKS1 has {STRIPES})",
                    s.stripes
                )));
            }
            if s.active && !(1..=MAX_ITERATIONS).contains(&s.iterations) {
                return Err(CryptoError::Unsupported(format!(
                    "keyslot {i}: {} PBKDF2 iterations (1 to {MAX_ITERATIONS})",
                    s.iterations
                )));
            }
        }
        let h = Header {
            payload_offset: be32(b, 104),
            mk_digest: b[112..132].try_into().expect("20 bytes"),
            mk_digest_salt: b[132..164].try_into().expect("32 bytes"),
            mk_digest_iterations: be32(b, 164),
            uuid: field(b, 168, 40),
            slots,
        };
        if !(1..=MAX_DIGEST_ITERATIONS).contains(&h.mk_digest_iterations) {
            return Err(CryptoError::Unsupported(format!(
                "a master key digest of {} PBKDF2 iterations (1 to {MAX_DIGEST_ITERATIONS})",
                h.mk_digest_iterations
            )));
        }
        h.check_layout()?;
        Ok(h)
    }

    /// The keyslot areas lie after the header, before the payload, and apart (as
    /// cryptsetup's `LUKS_check_keyslots`): the payload can then never cover the keys, and
    /// no slot reads the header or another slot as its material.
    fn check_layout(&self) -> Result<(), CryptoError> {
        let payload = u64::from(self.payload_offset) * SECTOR;
        if payload == 0 {
            return Err(CryptoError::Unsupported(
                "a payload at offset 0 (a detached header)".into(),
            ));
        }
        let mut areas: Vec<(u64, u64, usize)> = (0..SLOTS)
            .map(|i| {
                let (at, len) = self.slot_area(i);
                (at, at + (len as u64).div_ceil(SECTOR) * SECTOR, i)
            })
            .collect();
        areas.sort_unstable();
        let mut end_of_previous = HEADER_BYTES as u64;
        for (start, end, i) in areas {
            if start < end_of_previous || end > payload {
                return Err(CryptoError::Damaged(format!(
                    "keyslot {i}'s material ({start}..{end}) overlaps the header, another \
                     keyslot or the payload (from {payload})"
                )));
            }
            end_of_previous = end;
        }
        Ok(())
    }

    /// The header's 592 bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put(&mut b, 0, &MAGIC);
        put(&mut b, 6, &1u16.to_be_bytes());
        put(&mut b, 8, b"aes");
        put(&mut b, 40, b"xts-plain64");
        put(&mut b, 72, b"sha256");
        put(&mut b, 104, &self.payload_offset.to_be_bytes());
        put(&mut b, 108, &(KEY_BYTES as u32).to_be_bytes());
        put(&mut b, 112, &self.mk_digest);
        put(&mut b, 132, &self.mk_digest_salt);
        put(&mut b, 164, &self.mk_digest_iterations.to_be_bytes());
        put(
            &mut b,
            168,
            &self.uuid.as_bytes()[..self.uuid.len().min(39)],
        );
        for (i, s) in self.slots.iter().enumerate() {
            let at = 208 + i * 48;
            let state = if s.active {
                SLOT_ENABLED
            } else {
                SLOT_DISABLED
            };
            put(&mut b, at, &state.to_be_bytes());
            put(&mut b, at + 4, &s.iterations.to_be_bytes());
            put(&mut b, at + 8, &s.salt);
            put(&mut b, at + 40, &s.key_offset.to_be_bytes());
            put(&mut b, at + 44, &s.stripes.to_be_bytes());
        }
        b
    }

    /// Where keyslot `i`'s material is, and how long it is, in bytes.
    pub fn slot_area(&self, i: usize) -> (u64, usize) {
        let s = &self.slots[i];
        (
            u64::from(s.key_offset) * SECTOR,
            KEY_BYTES * s.stripes as usize,
        )
    }

    /// What identifies this image's master key without holding it (two headers with the
    /// same have the same key).
    pub fn master_key_id(&self) -> ([u8; 20], [u8; 32], u32) {
        (
            self.mk_digest,
            self.mk_digest_salt,
            self.mk_digest_iterations,
        )
    }

    /// Whether `key` is the master key (its PBKDF2 digest matches).
    pub fn is_master_key(&self, key: &[u8]) -> bool {
        let mut d = [0u8; 20];
        pbkdf2_hmac::<Sha256>(key, &self.mk_digest_salt, self.mk_digest_iterations, &mut d);
        constant_time_eq(&d, &self.mk_digest)
    }

    /// Tries `passphrase` on every active keyslot, reading each one's material with
    /// `read(offset, buf)`; the master key and the slot that gave it.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(MasterKey, usize), CryptoError> {
        let mut failed = None;
        for (i, s) in self.slots.iter().enumerate().filter(|(_, s)| s.active) {
            let (at, len) = self.slot_area(i);
            let mut material = Zeroizing::new(vec![0u8; len]);
            if let Err(e) = read(at, &mut material) {
                // Another slot may still open.
                failed = Some(e);
                continue;
            }
            let mut derived = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
            pbkdf2_hmac::<Sha256>(passphrase, &s.salt, s.iterations, &mut derived[..]);
            Xts::new(&derived[..])?.decrypt(&mut material, 0, SECTOR as usize);
            let mut key = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
            af::merge(&material, s.stripes as usize, &mut key[..]);
            if self.is_master_key(&key[..]) {
                return Ok((key, i));
            }
        }
        Err(failed.map_or(CryptoError::WrongPassphrase, CryptoError::Io))
    }

    /// A new header for `key` with keyslot 0 for `passphrase` (PBKDF2 of `iterations`), and
    /// that slot's encrypted material, to be written at [`slot_area`](Self::slot_area)(0).
    /// The layout is cryptsetup's: slots 4 KiB-aligned after the header, the payload after
    /// them at a 1 MiB boundary.
    pub fn create(
        key: &[u8],
        passphrase: &[u8],
        iterations: u32,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(Header, Zeroizing<Vec<u8>>), CryptoError> {
        let area = (KEY_BYTES as u64 * u64::from(STRIPES)).div_ceil(ALIGN) * ALIGN;
        let first = (HEADER_BYTES as u64).div_ceil(ALIGN) * ALIGN;
        let slots_end = first + SLOTS as u64 * area;
        let payload = slots_end.div_ceil(1 << 20) << 20;
        let mut mk_digest_salt = [0u8; 32];
        random(&mut mk_digest_salt);
        let mut uuid_bytes = [0u8; 16];
        random(&mut uuid_bytes);
        let mut h = Header {
            payload_offset: (payload / SECTOR) as u32,
            mk_digest: [0; 20],
            mk_digest_salt,
            // cryptsetup's floor; the master key is random, so this guards nothing a
            // passphrase's iterations do not.
            mk_digest_iterations: 1000,
            uuid: uuid(&uuid_bytes),
            slots: std::array::from_fn(|i| Slot {
                active: false,
                iterations: 0,
                salt: [0; 32],
                key_offset: ((first + i as u64 * area) / SECTOR) as u32,
                stripes: STRIPES,
            }),
        };
        pbkdf2_hmac::<Sha256>(
            key,
            &h.mk_digest_salt,
            h.mk_digest_iterations,
            &mut h.mk_digest,
        );
        let material = h.fill_slot(0, key, passphrase, iterations, random)?;
        Ok((h, material))
    }

    /// Makes keyslot `i` hold `key` under `passphrase`; returns its encrypted material.
    pub fn fill_slot(
        &mut self,
        i: usize,
        key: &[u8],
        passphrase: &[u8],
        iterations: u32,
        random: &mut dyn FnMut(&mut [u8]),
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if i >= SLOTS || key.len() != KEY_BYTES || !self.is_master_key(key) {
            return Err(CryptoError::Unsupported(format!(
                "keyslot {i}: a slot 0 to 7, for this image's 512-bit master key"
            )));
        }
        let mut salt = [0u8; 32];
        random(&mut salt);
        let iterations = iterations.clamp(1000, MAX_ITERATIONS);
        let mut derived = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
        pbkdf2_hmac::<Sha256>(passphrase, &salt, iterations, &mut derived[..]);
        // 64 bytes x 4000 stripes: a whole number of sectors, as the cipher needs.
        let mut material = af::split(key, STRIPES as usize, random);
        Xts::new(&derived[..])?.encrypt(&mut material, 0, SECTOR as usize);
        let s = &mut self.slots[i];
        s.salt = salt;
        s.iterations = iterations;
        s.stripes = STRIPES;
        s.active = true;
        Ok(material)
    }
}

/// `a == b` in time that does not depend on where they differ.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A version 4 UUID's text from 16 random bytes.
pub(super) fn uuid(b: &[u8; 16]) -> String {
    let mut b = *b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Fills `buf` from the kernel's random source.
pub(crate) fn random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the kernel's random source");
}

/// PBKDF2-SHA256 iterations that take about `millis` on this machine (as cryptsetup's and
/// QEMU's `iter-time`), at least 1000.
pub fn iterations_for(millis: u64) -> u32 {
    let trial = 20_000u32;
    let start = std::time::Instant::now();
    let mut out = [0u8; KEY_BYTES];
    pbkdf2_hmac::<Sha256>(b"benchmark", &[0u8; 32], trial, &mut out);
    let per_ms = f64::from(trial) / start.elapsed().as_secs_f64().max(1e-6) / 1000.0;
    ((per_ms * millis as f64) as u64).clamp(1000, u64::from(u32::MAX)) as u32
}

/// An image whose keyslot opened: its header and master key.
pub struct Unlocked {
    pub header: Header,
    pub key: MasterKey,
    /// The keyslot that opened.
    pub slot: usize,
}

impl Unlocked {
    /// Where the encrypted sectors start, in bytes.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.header.payload_offset) * SECTOR
    }

    /// The payload's cipher, in locked memory (its key schedule is key material too).
    pub fn cipher(&self) -> Result<Locked<Xts>, CryptoError> {
        Locked::new(Xts::new(&self.key[..])?).map_err(CryptoError::Io)
    }
}

/// Reads the LUKS1 header of `file` and opens a keyslot with `passphrase`.
pub fn open_image(file: &std::fs::File, passphrase: &[u8]) -> Result<Unlocked, CryptoError> {
    use std::os::unix::fs::FileExt;
    open_with(&mut |at, buf| file.read_exact_at(buf, at), passphrase)
}

/// Reads a LUKS1 header with `read(offset, buf)` (all of `buf`, or an error) and opens a
/// keyslot with `passphrase`.
pub fn open_with(
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    passphrase: &[u8],
) -> Result<Unlocked, CryptoError> {
    let mut b = [0u8; HEADER_BYTES];
    read(0, &mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => CryptoError::NotLuks,
        _ => CryptoError::Io(e),
    })?;
    let header = Header::parse(&b)?;
    let (key, slot) = header.unlock(passphrase, read)?;
    Ok(Unlocked { header, key, slot })
}

/// Makes a LUKS1 image at `path` (which must not exist) for a payload of `size` bytes,
/// with a new random master key in keyslot 0 under `passphrase`. The payload is left as
/// holes (it reads as noise once decrypted, as after `cryptsetup luksFormat`). Durable when
/// it returns.
pub fn create_image(
    path: &std::path::Path,
    size: u64,
    passphrase: &[u8],
    iterations: u32,
) -> Result<(), CryptoError> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if size == 0 || !size.is_multiple_of(SECTOR) || size > i64::MAX as u64 / 2 {
        return Err(CryptoError::Unsupported(format!(
            "size {size}: a whole number of 512-byte sectors, at most 4 EiB"
        )));
    }
    let mut key = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
    random(&mut key[..]);
    let (header, material) = Header::create(&key[..], passphrase, iterations, &mut random)?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(CryptoError::Io)?;
    let (at, _) = header.slot_area(0);
    let payload = u64::from(header.payload_offset) * SECTOR;
    let made = file
        .write_all_at(&header.encode(), 0)
        .and_then(|()| file.write_all_at(&material, at))
        .and_then(|()| file.set_len(payload + size))
        .and_then(|()| file.sync_all())
        .and_then(|()| crate::disk::sync_parent_dir(path));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made.map_err(CryptoError::Io)
}
