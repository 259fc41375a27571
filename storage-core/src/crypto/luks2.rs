//! The LUKS2 on-disk format (cryptsetup's "LUKS2 On-Disk Format Specification", version
//! 1.1.x), as `cryptsetup luksFormat` (type luks2, its default) writes it: two copies of a
//! header, each a 4 KiB binary part and a JSON area checksummed together, from offset 0
//! and from the header size on; keyslots as in LUKS1 (the master key split by the
//! anti-forensic splitter, encrypted with a key derived from a passphrase, by Argon2id,
//! Argon2i or PBKDF2) in the keyslots area after both copies; a PBKDF2 digest of the master
//! key; and one data segment, encrypted with the master key in sectors of 512 to 4096
//! bytes.
//!
//! Keyslots are added and removed here ([`Header::add_keyslot`], [`Header::remove_keyslot`]:
//! PBKDF2-SHA256 keyslots, which cryptsetup and every LUKS2 reader take), writing both
//! copies of the header with the next sequence number; images are made by cryptsetup. Only
//! what the node implements is accepted (aes-xts-plain64 with a 512-bit key, sha256 for the
//! splitter and the digest, no integrity, no reencryption in progress, no mandatory
//! requirement); anything else is refused with the header's own words.
//!
//! The IVs: dm-crypt's `plain64` counts 512-byte sectors whatever the segment's sector size
//! (cryptsetup activates LUKS2 without `iv_large_sectors`, which it keeps for plain and
//! BitLocker devices), plus the segment's `iv_tweak`.

use base64::Engine as _;
use pbkdf2::pbkdf2_hmac;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use super::luks1::{MAX_DIGEST_ITERATIONS, MAX_ITERATIONS};
use super::{af, secret::Locked, xts::Xts, CryptoError, ImageIo, MasterKey, KEY_BYTES};

pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The second copy's magic.
pub const MAGIC_2ND: [u8; 6] = *b"SKUL\xba\xbe";
/// The binary part of a header.
const BINARY: usize = 4096;
/// The header sizes (binary and JSON) the format allows: 16 KiB to 4 MiB.
const SIZES: [u64; 9] = [
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];
const CSUM_AT: usize = 448;
/// The most memory an Argon2 keyslot may ask for (cryptsetup's own limit): a header is
/// input, and each open tries every slot.
pub const MAX_ARGON2_KIB: u32 = 4 << 20;
/// The most Argon2 passes (cryptsetup benchmarks to a few).
pub const MAX_ARGON2_TIME: u32 = 1000;
/// The most Argon2 lanes (cryptsetup's limit).
pub const MAX_ARGON2_CPUS: u32 = 32;
/// The most Argon2 work a keyslot may ask for, memory times passes (in KiB-passes): fifty
/// passes over cryptsetup's largest memory (its `--iter-time 10000` on a fast machine stays
/// well below). A keyslot asking more is skipped, not tried: each open may try them all.
pub const MAX_ARGON2_WORK: u64 = 50 * (4 << 20);
/// LUKS2's keyslots: ids 0 to 31, as cryptsetup allows.
pub const MAX_KEYSLOTS: u32 = 32;

/// How a new keyslot's key is derived (its salt is made with it): Argon2id, as cryptsetup
/// makes LUKS2 keyslots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewKdf {
    Argon2id(super::cost::Argon2Cost),
}

/// One new keyslot's Argon2 derivation at a time in this process (each may take up to a
/// GiB): several disks' keyslot changes at once queue here.
static ARGON2_ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How a keyslot's key is derived from a passphrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kdf {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
    },
    Argon2 {
        /// Argon2id; else Argon2i.
        id: bool,
        time: u32,
        memory_kib: u32,
        cpus: u32,
        salt: Vec<u8>,
    },
}

/// One keyslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyslot {
    pub id: u32,
    pub kdf: Kdf,
    pub stripes: u32,
    /// Where its material is, in bytes from the start of the device.
    pub area_offset: u64,
    pub area_size: u64,
    /// cryptsetup's priority: 0 (ignored unless named), 1 (normal), 2 (preferred).
    pub priority: u32,
    /// Why it is never tried (its key derivation asks for more than we allow), if so: the
    /// image's other keyslots still open it.
    pub unusable: Option<String>,
}

/// The master key's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkDigest {
    pub keyslots: Vec<u32>,
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub digest: Vec<u8>,
}

impl MkDigest {
    /// Whether `key` is the master key this digest names.
    pub fn matches(&self, key: &[u8]) -> bool {
        let mut check = Zeroizing::new(vec![0u8; self.digest.len()]);
        pbkdf2_hmac::<Sha256>(key, &self.salt, self.iterations, &mut check);
        super::luks1::constant_time_eq(&check, &self.digest)
    }
}

/// The data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// In bytes from the start of the device.
    pub offset: u64,
    /// A fixed size, or to the end of the device.
    pub size: Option<u64>,
    pub sector_size: u32,
    /// Added to each sector's IV (in 512-byte sectors).
    pub iv_tweak: u64,
}

/// A LUKS2 header, as read from its newest valid copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub seqid: u64,
    /// Bytes of each copy (binary and JSON).
    pub hdr_size: u64,
    pub uuid: String,
    pub keyslots: Vec<Keyslot>,
    pub digests: Vec<MkDigest>,
    pub segment: Segment,
    /// The JSON area as read, rewritten with the keyslots' changes.
    json: Value,
    /// The binary part of the copy read (label, subsystem, UUID), for writing both again.
    binary: Vec<u8>,
}

fn damaged(msg: impl Into<String>) -> CryptoError {
    CryptoError::Damaged(msg.into())
}

fn unsupported(msg: impl Into<String>) -> CryptoError {
    CryptoError::Unsupported(msg.into())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One copy of the header at `at`: its binary part and JSON, checked; `None` when it is not
/// there or does not check out (the other copy may).
#[allow(clippy::type_complexity)]
fn read_copy(
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    at: u64,
    magic: &[u8; 6],
) -> Result<Option<(u64, u64, String, Value, Vec<u8>)>, CryptoError> {
    let mut bin = vec![0u8; BINARY];
    match read(at, &mut bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(CryptoError::Io(e)),
    }
    if bin[..6] != *magic || u16::from_be_bytes([bin[6], bin[7]]) != 2 {
        return Ok(None);
    }
    let hdr_size = be64(&bin, 8);
    if !SIZES.contains(&hdr_size) || be64(&bin, 256) != at {
        return Ok(None);
    }
    if text(&bin[72..104]) != "sha256" {
        // The other copy may be one we read; if neither is, the open says so.
        log::warn!(
            "LUKS2 header copy at {at}: checksum {:?} (only sha256 is read)",
            text(&bin[72..104])
        );
        return Ok(None);
    }
    let mut all = vec![0u8; hdr_size as usize];
    all[..BINARY].copy_from_slice(&bin);
    match read(at + BINARY as u64, &mut all[BINARY..]) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(CryptoError::Io(e)),
    }
    let stored: [u8; 32] = all[CSUM_AT..CSUM_AT + 32].try_into().expect("32 bytes");
    all[CSUM_AT..CSUM_AT + 64].fill(0);
    if Sha256::digest(&all)[..] != stored {
        return Ok(None);
    }
    let json = &all[BINARY..];
    let end = json.iter().position(|&c| c == 0).unwrap_or(json.len());
    let Ok(value) = serde_json::from_slice::<Value>(&json[..end]) else {
        return Ok(None);
    };
    Ok(Some((
        be64(&bin, 16),
        hdr_size,
        text(&bin[168..208]),
        value,
        bin,
    )))
}

/// A JSON number given as a string (LUKS2 writes 64-bit values so) or as a number.
fn num(v: &Value, what: &str) -> Result<u64, CryptoError> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| damaged(format!("{what}: {v} is not a number")))
}

fn num32(v: &Value, what: &str) -> Result<u32, CryptoError> {
    u32::try_from(num(v, what)?).map_err(|_| damaged(format!("{what}: {v} is too large")))
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str, CryptoError> {
    v.as_str()
        .ok_or_else(|| damaged(format!("{what}: {v} is not a string")))
}

fn b64(v: &Value, what: &str) -> Result<Vec<u8>, CryptoError> {
    base64::engine::general_purpose::STANDARD
        .decode(str_of(v, what)?)
        .map_err(|_| damaged(format!("{what} is not base64")))
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a serde_json::Map<String, Value>, CryptoError> {
    v.as_object()
        .ok_or_else(|| damaged(format!("{what} is not an object")))
}

/// An id as LUKS2 writes them: a decimal number in its one spelling ("7", not "07").
fn id(k: &str, what: &str) -> Result<u32, CryptoError> {
    k.parse::<u32>()
        .ok()
        .filter(|n| n.to_string() == k)
        .ok_or_else(|| damaged(format!("{what} id {k:?} is not a number")))
}

fn check_xts(v: &Value, what: &str) -> Result<(), CryptoError> {
    let enc = str_of(&v["encryption"], what)?;
    let size = num(&v["key_size"], what).unwrap_or(KEY_BYTES as u64);
    if enc != "aes-xts-plain64" || size != KEY_BYTES as u64 {
        return Err(unsupported(format!(
            "{what}: {enc} with a {}-bit key (only aes-xts-plain64 with a 512-bit key)",
            size * 8
        )));
    }
    Ok(())
}

fn keyslot(k: &str, v: &Value) -> Result<Keyslot, CryptoError> {
    let what = format!("keyslot {k}");
    let w = what.as_str();
    if str_of(&v["type"], w)? != "luks2" {
        return Err(unsupported(format!("{w}: type {}", v["type"])));
    }
    if num(&v["key_size"], w)? != KEY_BYTES as u64 {
        return Err(unsupported(format!("{w}: a {}-bit key", v["key_size"])));
    }
    let af = &v["af"];
    if str_of(&af["type"], w)? != "luks1" || str_of(&af["hash"], w)? != "sha256" {
        return Err(unsupported(format!(
            "{w}: anti-forensic splitter {} with {} (only luks1 with sha256)",
            af["type"], af["hash"]
        )));
    }
    let stripes = num32(&af["stripes"], w)?;
    if stripes != super::luks1::STRIPES {
        return Err(damaged(format!("{w}: {stripes} stripes")));
    }
    let area = &v["area"];
    if str_of(&area["type"], w)? != "raw" {
        return Err(unsupported(format!("{w}: area type {}", area["type"])));
    }
    check_xts(area, w)?;
    let kdf = &v["kdf"];
    let salt = b64(&kdf["salt"], w)?;
    let mut unusable = None;
    let kdf = match str_of(&kdf["type"], w)? {
        "pbkdf2" => {
            if str_of(&kdf["hash"], w)? != "sha256" {
                return Err(unsupported(format!("{w}: PBKDF2 with {}", kdf["hash"])));
            }
            let iterations = num32(&kdf["iterations"], w)?;
            if !(1..=MAX_ITERATIONS).contains(&iterations) {
                unusable = Some(format!(
                    "{w}: {iterations} PBKDF2 iterations (1 to {MAX_ITERATIONS})"
                ));
            }
            Kdf::Pbkdf2 { iterations, salt }
        }
        t @ ("argon2id" | "argon2i") => {
            let (time, memory_kib, cpus) = (
                num32(&kdf["time"], w)?,
                num32(&kdf["memory"], w)?,
                num32(&kdf["cpus"], w)?,
            );
            if !(1..=MAX_ARGON2_TIME).contains(&time)
                || !(8..=MAX_ARGON2_KIB).contains(&memory_kib)
                || !(1..=MAX_ARGON2_CPUS).contains(&cpus)
                || u64::from(memory_kib) * u64::from(time) > MAX_ARGON2_WORK
            {
                unusable = Some(format!(
                    "{w}: {t} with {time} passes, {memory_kib} KiB and {cpus} lanes (at most \
                     {MAX_ARGON2_TIME}, {MAX_ARGON2_KIB} and {MAX_ARGON2_CPUS}, and \
                     {MAX_ARGON2_WORK} KiB-passes)"
                ));
            }
            Kdf::Argon2 {
                id: t == "argon2id",
                time,
                memory_kib,
                cpus,
                salt,
            }
        }
        other => return Err(unsupported(format!("{w}: key derivation {other:?}"))),
    };
    Ok(Keyslot {
        id: id(k, "keyslot")?,
        kdf,
        stripes,
        area_offset: num(&area["offset"], w)?,
        area_size: num(&area["size"], w)?,
        priority: match &v["priority"] {
            Value::Null => 1,
            p => num32(p, w)?,
        },
        unusable,
    })
}

impl Header {
    /// Reads the newest valid copy of the header with `read(offset, buf)`.
    pub fn read(
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<Header, CryptoError> {
        let first = read_copy(read, 0, &MAGIC)?;
        // The second copy sits at the header size, which the first gives; without a valid
        // first, every size the format allows is tried (as cryptsetup does).
        let mut second = None;
        let sizes: Vec<u64> = match &first {
            Some((_, size, ..)) => vec![*size],
            None => SIZES.to_vec(),
        };
        for at in sizes {
            if let Some(c) = read_copy(read, at, &MAGIC_2ND)? {
                second = Some(c);
                break;
            }
        }
        let (seqid, hdr_size, uuid, json, binary) = match (first, second) {
            (Some(a), Some(b)) => {
                if b.0 > a.0 {
                    b
                } else {
                    a
                }
            }
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => {
                let mut magic = [0u8; 6];
                read(0, &mut magic).map_err(CryptoError::Io)?;
                return Err(if magic == MAGIC {
                    damaged("neither copy of the LUKS2 header checks out")
                } else {
                    CryptoError::NotLuks
                });
            }
        };
        let mut h = Header::from_json(seqid, hdr_size, uuid, &json)?;
        h.json = json;
        h.binary = binary;
        Ok(h)
    }

    fn from_json(
        seqid: u64,
        hdr_size: u64,
        uuid: String,
        j: &Value,
    ) -> Result<Header, CryptoError> {
        let config = &j["config"];
        if let Some(req) = config["requirements"]["mandatory"].as_array() {
            if !req.is_empty() {
                return Err(unsupported(format!(
                    "mandatory requirements {} (a reencryption in progress?)",
                    config["requirements"]["mandatory"]
                )));
            }
        }
        let json_size = num(&config["json_size"], "config")?;
        if json_size != hdr_size - BINARY as u64 {
            return Err(damaged(format!(
                "a JSON area of {json_size} bytes in a header of {hdr_size}"
            )));
        }
        let keyslots_size = num(&config["keyslots_size"], "config")?;
        let keyslots_end = (2 * hdr_size)
            .checked_add(keyslots_size)
            .ok_or_else(|| damaged("keyslots area size"))?;
        let segments = object(&j["segments"], "segments")?;
        if segments.len() != 1 {
            return Err(unsupported(format!(
                "{} data segments (only one; a reencryption in progress?)",
                segments.len()
            )));
        }
        let (_, s) = segments.iter().next().expect("one segment");
        if str_of(&s["type"], "segment")? != "crypt" {
            return Err(unsupported(format!("a {} segment", s["type"])));
        }
        if !s["integrity"].is_null() {
            return Err(unsupported("a segment with integrity protection"));
        }
        check_xts(s, "segment")?;
        let sector_size = num32(&s["sector_size"], "segment")?;
        if !sector_size.is_power_of_two() || !(512..=4096).contains(&sector_size) {
            return Err(damaged(format!("segment sector size {sector_size}")));
        }
        let segment = Segment {
            offset: num(&s["offset"], "segment")?,
            size: match &s["size"] {
                Value::String(d) if d == "dynamic" => None,
                v => Some(num(v, "segment size")?),
            },
            sector_size,
            iv_tweak: num(&s["iv_tweak"], "segment")?,
        };
        if segment.offset == 0 {
            return Err(unsupported(
                "a data segment at offset 0 (a detached header)",
            ));
        }
        if !segment.offset.is_multiple_of(u64::from(sector_size))
            || segment
                .size
                .is_some_and(|n| !n.is_multiple_of(u64::from(sector_size)))
        {
            return Err(damaged("a data segment not in whole sectors"));
        }
        let mut keyslots = Vec::new();
        for (k, v) in object(&j["keyslots"], "keyslots")? {
            let slot = keyslot(k, v)?;
            let need = KEY_BYTES as u64 * u64::from(slot.stripes);
            let end = slot.area_offset.checked_add(slot.area_size);
            if slot.area_offset < 2 * hdr_size
                || end.is_none_or(|e| e > keyslots_end || e > segment.offset)
                || slot.area_size < need
            {
                return Err(damaged(format!(
                    "keyslot {k}'s area ({} bytes at {}) lies outside the keyslots area or \
                     over the data, or is too small",
                    slot.area_size, slot.area_offset
                )));
            }
            keyslots.push(slot);
        }
        if keyslots.iter().any(|s| s.id >= MAX_KEYSLOTS) {
            return Err(damaged(format!(
                "a keyslot id past {} (LUKS2 has {MAX_KEYSLOTS})",
                MAX_KEYSLOTS - 1
            )));
        }
        // By place: any two overlapping areas are then neighbours.
        keyslots.sort_by_key(|s| s.area_offset);
        for (a, b) in keyslots.iter().zip(keyslots.iter().skip(1)) {
            if b.area_offset < a.area_offset + a.area_size {
                return Err(damaged(format!("keyslots {} and {} overlap", a.id, b.id)));
            }
        }
        keyslots.sort_by_key(|s| s.id);
        let mut digests = Vec::new();
        for (k, d) in object(&j["digests"], "digests")? {
            let w = format!("digest {k}");
            if str_of(&d["type"], &w)? != "pbkdf2" || str_of(&d["hash"], &w)? != "sha256" {
                return Err(unsupported(format!(
                    "{w}: {} with {} (only pbkdf2 with sha256)",
                    d["type"], d["hash"]
                )));
            }
            let iterations = num32(&d["iterations"], &w)?;
            if !(1..=MAX_DIGEST_ITERATIONS).contains(&iterations) {
                return Err(unsupported(format!(
                    "{w}: {iterations} PBKDF2 iterations (1 to {MAX_DIGEST_ITERATIONS})"
                )));
            }
            let digest = b64(&d["digest"], &w)?;
            // SHA-256's length: a shorter one would let wrong keys through by chance.
            if digest.len() != 32 {
                return Err(damaged(format!("{w}: a digest of {} bytes", digest.len())));
            }
            let keyslots = d["keyslots"]
                .as_array()
                .ok_or_else(|| damaged(format!("{w}: no keyslots")))?
                .iter()
                .map(|v| id(str_of(v, &w)?, &w))
                .collect::<Result<_, _>>()?;
            digests.push(MkDigest {
                keyslots,
                iterations,
                salt: b64(&d["salt"], &w)?,
                digest,
            });
        }
        Ok(Header {
            seqid,
            hdr_size,
            uuid,
            keyslots,
            digests,
            segment,
            json: Value::Null,
            binary: Vec::new(),
        })
    }

    /// Tries `passphrase` on every keyslot not set to be ignored, preferred ones first,
    /// reading each one's material with `read(offset, buf)`: the master key and the
    /// keyslot that gave it.
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<(MasterKey, u32), CryptoError> {
        for s in &self.keyslots {
            if let Some(why) = &s.unusable {
                log::warn!("LUKS2 keyslot skipped: {why}");
            }
        }
        let mut order: Vec<&Keyslot> = self
            .keyslots
            .iter()
            .filter(|s| s.priority > 0 && s.unusable.is_none())
            .collect();
        order.sort_by_key(|s| (std::cmp::Reverse(s.priority), s.id));
        let mut failed = None;
        for s in order {
            let Some(d) = self.digests.iter().find(|d| d.keyslots.contains(&s.id)) else {
                continue;
            };
            let mut material = Zeroizing::new(vec![0u8; KEY_BYTES * s.stripes as usize]);
            if let Err(e) = read(s.area_offset, &mut material) {
                failed = Some(e);
                continue;
            }
            let mut derived = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
            if let Err(e) = derive(&s.kdf, passphrase, &mut derived[..]) {
                // Another keyslot may still open.
                log::warn!("LUKS2 keyslot {}: {e}", s.id);
                continue;
            }
            Xts::new(&derived[..])?.decrypt(&mut material, 0, 512);
            let mut key = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
            af::merge(&material, s.stripes as usize, &mut key[..]);
            if d.matches(&key[..]) {
                return Ok((key, s.id));
            }
        }
        Err(failed.map_or(CryptoError::WrongPassphrase, CryptoError::Io))
    }
}

/// Derives a keyslot's key from `passphrase` into `out`.
fn derive(kdf: &Kdf, passphrase: &[u8], out: &mut [u8]) -> Result<(), CryptoError> {
    match kdf {
        Kdf::Pbkdf2 { iterations, salt } => {
            pbkdf2_hmac::<Sha256>(passphrase, salt, *iterations, out);
            Ok(())
        }
        Kdf::Argon2 {
            id,
            time,
            memory_kib,
            cpus,
            salt,
        } => {
            let params = argon2::Params::new(*memory_kib, *time, *cpus, Some(out.len()))
                .map_err(|e| unsupported(format!("Argon2 parameters: {e}")))?;
            let algorithm = if *id {
                argon2::Algorithm::Argon2id
            } else {
                argon2::Algorithm::Argon2i
            };
            argon2::Argon2::new(algorithm, argon2::Version::V0x13, params)
                .hash_password_into(passphrase, salt, out)
                .map_err(|e| damaged(format!("Argon2: {e}")))
        }
    }
}

/// Where a LUKS2 image we make puts its payload: after two 16 KiB header copies and the
/// keyslots area, at 16 MiB (cryptsetup's default layout).
pub const PAYLOAD_OFFSET: u64 = 16 << 20;

/// Makes a LUKS2 image at `path` (which must not exist) for a payload of `size` bytes in
/// sectors of `sector_size` (512 to 4096), with a new random master key in keyslot 0
/// under `passphrase` (Argon2id as `cost` says), laid out as `cryptsetup
/// luksFormat --type luks2` lays it out. The payload is left as holes (noise once
/// decrypted). Durable when it returns.
pub fn create_image(
    path: &std::path::Path,
    size: u64,
    sector_size: u32,
    passphrase: &[u8],
    cost: &super::KeyslotCost,
) -> Result<(), CryptoError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
        return Err(unsupported(format!(
            "sector size {sector_size}: a power of two from 512 to 4096"
        )));
    }
    if size == 0 || !size.is_multiple_of(u64::from(sector_size)) || size > i64::MAX as u64 / 2 {
        return Err(unsupported(format!(
            "size {size}: a whole number of {sector_size}-byte sectors, at most 4 EiB"
        )));
    }
    let mut key = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
    super::luks1::random(&mut key[..]);
    let mut salt = [0u8; 32];
    super::luks1::random(&mut salt);
    // The digest only recognises a random key: cryptsetup's floor of iterations is enough.
    let digest_iterations = 1000;
    let mut digest = [0u8; 32];
    pbkdf2_hmac::<Sha256>(&key[..], &salt, digest_iterations, &mut digest);
    let mut uuid = [0u8; 16];
    super::luks1::random(&mut uuid);
    let uuid = super::luks1::uuid(&uuid);
    let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
    let hdr_size = 16384u64;
    let json = serde_json::json!({
        "keyslots": {},
        "tokens": {},
        "segments": { "0": {
            "type": "crypt",
            "offset": PAYLOAD_OFFSET.to_string(),
            "size": "dynamic",
            "iv_tweak": "0",
            "encryption": "aes-xts-plain64",
            "sector_size": sector_size,
        } },
        "digests": { "0": {
            "type": "pbkdf2",
            "keyslots": [],
            "segments": ["0"],
            "hash": "sha256",
            "iterations": digest_iterations,
            "salt": b64(&salt),
            "digest": b64(&digest),
        } },
        "config": {
            "json_size": (hdr_size - BINARY as u64).to_string(),
            "keyslots_size": (PAYLOAD_OFFSET - 2 * hdr_size).to_string(),
        },
    });
    let mut binary = vec![0u8; BINARY];
    binary[6..8].copy_from_slice(&2u16.to_be_bytes());
    binary[72..78].copy_from_slice(b"sha256");
    binary[168..168 + uuid.len()].copy_from_slice(uuid.as_bytes());
    let mut header = Header {
        seqid: 0,
        hdr_size,
        uuid,
        keyslots: Vec::new(),
        digests: vec![MkDigest {
            keyslots: Vec::new(),
            iterations: digest_iterations,
            salt: salt.to_vec(),
            digest: digest.to_vec(),
        }],
        segment: Segment {
            offset: PAYLOAD_OFFSET,
            size: None,
            sector_size,
            iv_tweak: 0,
        },
        json,
        binary,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(CryptoError::Io)?;
    let made = file
        .set_len(PAYLOAD_OFFSET + size)
        .map_err(CryptoError::Io)
        .and_then(|()| {
            header.add_keyslot(
                &key[..],
                passphrase,
                NewKdf::Argon2id(cost.argon2),
                &mut file,
            )
        })
        .and_then(|_| crate::disk::sync_parent_dir(path).map_err(CryptoError::Io));
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made.map(drop)
}

/// The keyslots area's bounds, in bytes from the start of the device.
fn keyslots_area(h: &Header) -> Result<(u64, u64), CryptoError> {
    let size = num(&h.json["config"]["keyslots_size"], "config")?;
    Ok((2 * h.hdr_size, 2 * h.hdr_size + size))
}

impl Header {
    /// Both copies of the header as they are now, with the next sequence number: the
    /// bytes to write at 0 and at `hdr_size`.
    fn encode(&mut self) -> Result<[Vec<u8>; 2], CryptoError> {
        self.seqid += 1;
        let text = serde_json::to_vec(&self.json).map_err(|e| damaged(e.to_string()))?;
        let json_size = (self.hdr_size as usize) - BINARY;
        if text.len() >= json_size {
            return Err(unsupported("the keyslots do not fit in the JSON area"));
        }
        let mut copies = [Vec::new(), Vec::new()];
        for (i, (magic, at)) in [(MAGIC, 0u64), (MAGIC_2ND, self.hdr_size)]
            .into_iter()
            .enumerate()
        {
            let mut b = vec![0u8; self.hdr_size as usize];
            b[..BINARY].copy_from_slice(&self.binary);
            b[..6].copy_from_slice(&magic);
            b[8..16].copy_from_slice(&self.hdr_size.to_be_bytes());
            b[16..24].copy_from_slice(&self.seqid.to_be_bytes());
            // A fresh salt per copy, as cryptsetup writes them.
            super::luks1::random(&mut b[104..168]);
            b[256..264].copy_from_slice(&at.to_be_bytes());
            b[CSUM_AT..CSUM_AT + 64].fill(0);
            b[BINARY..BINARY + text.len()].copy_from_slice(&text);
            let sum = Sha256::digest(&b);
            b[CSUM_AT..CSUM_AT + 32].copy_from_slice(&sum);
            copies[i] = b;
        }
        Ok(copies)
    }

    /// Writes both copies (the first, then the second; either one alone is a valid,
    /// newer header, so a crash between them loses nothing) and syncs.
    fn write_copies(&mut self, io: &mut dyn ImageIo) -> Result<(), CryptoError> {
        let [first, second] = self.encode()?;
        io.write(0, &first).map_err(CryptoError::Io)?;
        io.sync().map_err(CryptoError::Io)?;
        io.write(self.hdr_size, &second).map_err(CryptoError::Io)?;
        io.sync().map_err(CryptoError::Io)
    }

    /// Adds a keyslot derived as `kdf` says for `key` (this image's master key)
    /// under `passphrase`, in the first free id and the first free stretch of the
    /// keyslots area: its material is written and synced before the headers name it.
    /// Returns its id.
    pub fn add_keyslot(
        &mut self,
        key: &[u8],
        passphrase: &[u8],
        kdf: NewKdf,
        io: &mut dyn ImageIo,
    ) -> Result<u32, CryptoError> {
        let digest = self
            .digests
            .iter()
            .position(|d| d.matches(key))
            .ok_or_else(|| unsupported("a key that is not this image's master key"))?;
        let id = (0..32u32)
            .find(|i| !self.keyslots.iter().any(|s| s.id == *i))
            .ok_or_else(|| unsupported("all 32 keyslots are in use"))?;
        let stripes = super::luks1::STRIPES;
        let need = (KEY_BYTES as u64 * u64::from(stripes)).next_multiple_of(4096);
        let (area_start, area_end) = keyslots_area(self)?;
        let mut used: Vec<(u64, u64)> = self
            .keyslots
            .iter()
            .map(|s| (s.area_offset, s.area_offset + s.area_size))
            .collect();
        used.sort_unstable();
        let mut at = area_start;
        for (a, b) in used {
            if a >= at + need {
                break;
            }
            at = at.max(b.next_multiple_of(4096));
        }
        if at + need > area_end.min(self.segment.offset) {
            return Err(unsupported("no room left in the keyslots area"));
        }
        let mut salt = [0u8; 32];
        super::luks1::random(&mut salt);
        let NewKdf::Argon2id(c) = kdf;
        // Within what our reader opens (see `keyslot`).
        let cpus = c.cpus.clamp(1, MAX_ARGON2_CPUS);
        let memory_kib = c.memory_kib.clamp(8 * cpus, MAX_ARGON2_KIB);
        let most = (MAX_ARGON2_WORK / u64::from(memory_kib)).min(u64::from(MAX_ARGON2_TIME)) as u32;
        let time = c.time.clamp(4.min(most), most);
        let kdf = Kdf::Argon2 {
            id: true,
            time,
            memory_kib,
            cpus,
            salt: salt.to_vec(),
        };
        let mut derived = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
        {
            let _one = ARGON2_ONE_AT_A_TIME
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            derive(&kdf, passphrase, &mut derived[..])?;
        }
        let mut material = af::split(key, stripes as usize, &mut super::luks1::random);
        Xts::new(&derived[..])?.encrypt(&mut material, 0, 512);
        let mut area = Zeroizing::new(vec![0u8; need as usize]);
        area[..material.len()].copy_from_slice(&material);
        io.write(at, &area).map_err(CryptoError::Io)?;
        io.sync().map_err(CryptoError::Io)?;
        let b64 = |v: &[u8]| base64::engine::general_purpose::STANDARD.encode(v);
        let kdf_json = serde_json::json!({
            "type": "argon2id",
            "time": time,
            "memory": memory_kib,
            "cpus": cpus,
            "salt": b64(&salt),
        });
        self.json["keyslots"][id.to_string()] = serde_json::json!({
            "type": "luks2",
            "key_size": KEY_BYTES,
            "af": { "type": "luks1", "stripes": stripes, "hash": "sha256" },
            "area": {
                "type": "raw",
                "offset": at.to_string(),
                "size": need.to_string(),
                "encryption": "aes-xts-plain64",
                "key_size": KEY_BYTES,
            },
            "kdf": kdf_json,
        });
        let digest_id = self.digest_id(digest)?;
        if let Some(list) = self.json["digests"][&digest_id]["keyslots"].as_array_mut() {
            list.push(Value::String(id.to_string()));
        }
        self.write_copies(io)?;
        self.keyslots.push(Keyslot {
            id,
            kdf,
            stripes,
            area_offset: at,
            area_size: need,
            priority: 1,
            unusable: None,
        });
        self.keyslots.sort_by_key(|s| s.id);
        self.digests[digest].keyslots.push(id);
        Ok(id)
    }

    /// The JSON name of the `i`th digest (as `digests` lists them, in the JSON's order).
    fn digest_id(&self, i: usize) -> Result<String, CryptoError> {
        object(&self.json["digests"], "digests")?
            .keys()
            .nth(i)
            .cloned()
            .ok_or_else(|| damaged("digests changed"))
    }

    /// Removes keyslot `id`: the headers stop naming it, then its material is overwritten
    /// with noise and synced.
    pub fn remove_keyslot(&mut self, id: u32, io: &mut dyn ImageIo) -> Result<(), CryptoError> {
        let i = self
            .keyslots
            .iter()
            .position(|s| s.id == id)
            .ok_or_else(|| unsupported(format!("no keyslot {id}")))?;
        let name = id.to_string();
        if let Some(slots) = self.json["keyslots"].as_object_mut() {
            slots.remove(&name);
        }
        // Digests and tokens (systemd-cryptenroll's, clevis's) that name it stop naming it:
        // cryptsetup refuses a header whose lists name a keyslot that is gone.
        for section in ["digests", "tokens"] {
            if let Some(items) = self.json[section].as_object_mut() {
                for item in items.values_mut() {
                    if let Some(list) = item["keyslots"].as_array_mut() {
                        list.retain(|v| v.as_str() != Some(name.as_str()));
                    }
                }
            }
        }
        self.write_copies(io)?;
        let slot = self.keyslots.remove(i);
        for d in &mut self.digests {
            d.keyslots.retain(|k| *k != id);
        }
        // In pieces: an area may be large.
        let mut noise = vec![0u8; (slot.area_size as usize).min(1 << 20)];
        let mut at = slot.area_offset;
        while at < slot.area_offset + slot.area_size {
            let n = (slot.area_offset + slot.area_size - at).min(noise.len() as u64) as usize;
            super::luks1::random(&mut noise[..n]);
            io.write(at, &noise[..n]).map_err(CryptoError::Io)?;
            at += n as u64;
        }
        io.sync().map_err(CryptoError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HDR: u64 = 16384;

    /// A valid header's JSON: one PBKDF2 keyslot, its digest, one segment.
    fn json() -> Value {
        serde_json::json!({
            "keyslots": {
                "0": {
                    "type": "luks2", "key_size": 64,
                    "af": { "type": "luks1", "stripes": 4000, "hash": "sha256" },
                    "area": { "type": "raw", "offset": "32768", "size": "258048",
                              "encryption": "aes-xts-plain64", "key_size": 64 },
                    "kdf": { "type": "pbkdf2", "hash": "sha256", "iterations": 1000,
                             "salt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" }
                }
            },
            "tokens": {},
            "segments": { "0": { "type": "crypt", "offset": "16777216", "size": "dynamic",
                                  "iv_tweak": "0", "encryption": "aes-xts-plain64",
                                  "sector_size": 512 } },
            "digests": { "0": { "type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                                "hash": "sha256", "iterations": 1000,
                                "salt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                                "digest": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" } },
            "config": { "json_size": "12288", "keyslots_size": "16744448" }
        })
    }

    /// Both copies of a header holding `j`, as the first 32 KiB of a device.
    fn image(j: &Value) -> Vec<u8> {
        let mut h = Header {
            seqid: 0,
            hdr_size: HDR,
            uuid: String::new(),
            keyslots: Vec::new(),
            digests: Vec::new(),
            segment: Segment {
                offset: 0,
                size: None,
                sector_size: 512,
                iv_tweak: 0,
            },
            json: j.clone(),
            binary: {
                let mut b = vec![0u8; BINARY];
                b[6..8].copy_from_slice(&2u16.to_be_bytes());
                b[72..78].copy_from_slice(b"sha256");
                b
            },
        };
        let [a, b] = h.encode().unwrap();
        [a, b].concat()
    }

    fn read(img: &[u8]) -> Result<Header, CryptoError> {
        Header::read(&mut |at, buf: &mut [u8]| {
            let at = at as usize;
            match img.get(at..at + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    Ok(())
                }
                None => Err(std::io::ErrorKind::UnexpectedEof.into()),
            }
        })
    }

    #[test]
    fn a_header_we_encode_reads_back_from_either_copy() {
        let img = image(&json());
        let h = read(&img).unwrap();
        assert_eq!(h.keyslots.len(), 1);
        assert_eq!(h.segment.offset, 16 << 20);
        assert_eq!(h.seqid, 1);
        let mut first_gone = img.clone();
        first_gone[5000] ^= 1;
        assert_eq!(read(&first_gone).unwrap().keyslots, h.keyslots);
        let mut both_gone = first_gone;
        both_gone[HDR as usize + 5000] ^= 1;
        assert!(matches!(read(&both_gone), Err(CryptoError::Damaged(_))));
    }

    /// Hostile headers are refused by name, not trusted.
    /// A keyslot asking for more Argon2 work than we allow is read, and skipped.
    #[test]
    fn a_keyslot_too_costly_to_try_is_skipped() {
        let mut j = json();
        j["keyslots"]["0"]["kdf"] = serde_json::json!({
            "type": "argon2id", "time": 1000, "memory": 4194304, "cpus": 4,
            "salt": "AAAAAAAAAAAAAAAAAAAAAA=="
        });
        let h = read(&image(&j)).unwrap();
        assert!(h.keyslots[0]
            .unusable
            .as_deref()
            .unwrap()
            .contains("KiB-passes"));
        let started = std::time::Instant::now();
        let e = h.unlock(b"any", &mut |_, _| Ok(())).err().unwrap();
        assert!(matches!(e, CryptoError::WrongPassphrase));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "it was tried"
        );
    }

    #[test]
    fn hostile_headers_are_refused() {
        type Change = fn(&mut Value);
        let cases: [(Change, &str); 8] = [
            // Two keyslots whose ids are not neighbours share their area.
            (
                |j| {
                    let mut s = j["keyslots"]["0"].clone();
                    s["area"]["offset"] = "40960".into();
                    j["keyslots"]["2"] = s;
                    let mut s = j["keyslots"]["0"].clone();
                    s["area"]["offset"] = "600000".into();
                    j["keyslots"]["1"] = s;
                },
                "overlap",
            ),
            (
                |j| j["keyslots"]["32"] = j["keyslots"]["0"].clone(),
                "keyslot id past 31",
            ),
            (
                |j| j["keyslots"]["07"] = j["keyslots"]["0"].clone(),
                "not a number",
            ),
            (
                |j| j["digests"]["0"]["digest"] = "AA==".into(),
                "a digest of 1 bytes",
            ),
            (
                |j| j["keyslots"]["0"]["kdf"]["salt"] = "not base64!".into(),
                "not base64",
            ),
            (
                |j| j["keyslots"]["0"]["area"]["size"] = "18446744073709551615".into(),
                "outside the keyslots area",
            ),
            (
                |j| j["segments"]["0"]["integrity"] = serde_json::json!({"type": "hmac"}),
                "integrity",
            ),
            (
                |j| {
                    j["config"]["requirements"] =
                        serde_json::json!({"mandatory": ["online-reencrypt"]})
                },
                "mandatory requirements",
            ),
        ];
        for (change, needle) in cases {
            let mut j = json();
            change(&mut j);
            let e = read(&image(&j)).expect_err(needle).to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
