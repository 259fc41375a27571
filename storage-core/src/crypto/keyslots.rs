//! Keyslot changes on a LUKS image, LUKS1 or LUKS2 alike: list, add a passphrase, remove a
//! keyslot, change a passphrase (key rotation). Each one is authorised by a passphrase the
//! image already takes, as cryptsetup's `luksAddKey`, `luksKillSlot` and `luksChangeKey`
//! are, and touches only the header and keyslot areas, never the payload: a disk keeps
//! serving while its keys change.
//!
//! The order is what a power cut needs: new material is written and synced before a header
//! names it; a removed keyslot leaves the header (synced) before its material is
//! overwritten with noise. A change adds the new keyslot first, so at every moment one of
//! the two passphrases opens the image.

use super::luks1::{self, SLOTS};
use super::luks2;
use super::{CryptoError, ImageIo, KeyslotCost, KEY_BYTES};
use crate::error::{StorageError, StorageErrorKind};

/// A disk whose passphrases change while it serves: the `luks` node, and a qcow2 disk with
/// encrypted images. Each change is authorised by a passphrase the disk takes now.
pub trait KeyslotChanges {
    /// The LUKS version and the keyslots in use.
    fn keyslots(&self) -> Result<(u8, Vec<SlotInfo>), StorageError>;
    /// Adds a keyslot for `new` (its key derivation as `cost` says for the image's LUKS
    /// version); its id.
    fn add_keyslot(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError>;
    /// Removes keyslot `slot`, authorised by a passphrase that opens another one.
    fn remove_keyslot(&self, passphrase: &[u8], slot: u32) -> Result<(), StorageError>;
    /// Replaces the passphrase `passphrase` with `new` (key rotation); the new keyslot.
    fn change_passphrase(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError>;
}

/// A keyslot change's error on the image `path`, by kind: a wrong passphrase is the
/// caller's, a missing keyslot not found, anything we do not do unsupported.
pub fn error(path: &str, e: CryptoError) -> StorageError {
    let kind = match &e {
        CryptoError::WrongPassphrase => StorageErrorKind::InvalidArgument,
        CryptoError::Unsupported(m) if m.starts_with("no keyslot") => StorageErrorKind::NotFound,
        CryptoError::Unsupported(_) => StorageErrorKind::Unsupported,
        CryptoError::Io(_) => StorageErrorKind::Io,
        _ => StorageErrorKind::InvalidImage,
    };
    StorageError::new(kind, format!("{path}: {e}"))
}

/// One keyslot in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub id: u32,
    /// How its key is derived: `pbkdf2`, `argon2id` or `argon2i`.
    pub kdf: &'static str,
}

enum Image {
    V1(Box<luks1::Header>),
    V2(Box<luks2::Header>),
}

fn read_header(io: &mut dyn ImageIo) -> Result<Image, CryptoError> {
    let mut b = [0u8; luks1::HEADER_BYTES];
    io.read(0, &mut b).map_err(CryptoError::Io)?;
    if b[..6] != luks1::MAGIC {
        return Err(CryptoError::NotLuks);
    }
    match u16::from_be_bytes([b[6], b[7]]) {
        1 => Ok(Image::V1(Box::new(luks1::Header::parse(&b)?))),
        2 => Ok(Image::V2(Box::new(luks2::Header::read(&mut |at, buf| {
            io.read(at, buf)
        })?))),
        v => Err(CryptoError::Unsupported(format!("LUKS version {v}"))),
    }
}

/// The image's LUKS version and its keyslots in use.
pub fn list(io: &mut dyn ImageIo) -> Result<(u8, Vec<SlotInfo>), CryptoError> {
    Ok(match read_header(io)? {
        Image::V1(h) => (
            1,
            (0..SLOTS)
                .filter(|i| h.slots[*i].active)
                .map(|i| SlotInfo {
                    id: i as u32,
                    kdf: "pbkdf2",
                })
                .collect(),
        ),
        Image::V2(h) => (
            2,
            h.keyslots
                .iter()
                .map(|s| SlotInfo {
                    id: s.id,
                    kdf: match s.kdf {
                        luks2::Kdf::Pbkdf2 { .. } => "pbkdf2",
                        luks2::Kdf::Argon2 { id: true, .. } => "argon2id",
                        luks2::Kdf::Argon2 { id: false, .. } => "argon2i",
                    },
                })
                .collect(),
        ),
    })
}

/// Adds a keyslot for `new`, authorised by `passphrase`; its id. Its key derivation is
/// as `cost` says: PBKDF2-SHA256 in LUKS1, Argon2id in LUKS2 (cryptsetup's defaults).
pub fn add(
    io: &mut dyn ImageIo,
    passphrase: &[u8],
    new: &[u8],
    cost: &KeyslotCost,
) -> Result<u32, CryptoError> {
    match read_header(io)? {
        Image::V1(mut h) => {
            let (key, _) = h.unlock(passphrase, &mut |at, buf| io.read(at, buf))?;
            let i = (0..SLOTS)
                .find(|i| !h.slots[*i].active)
                .ok_or_else(|| CryptoError::Unsupported("all 8 keyslots are in use".into()))?;
            let material =
                h.fill_slot(i, &key[..], new, cost.pbkdf2_iterations, &mut luks1::random)?;
            let (at, _) = h.slot_area(i);
            io.write(at, &material).map_err(CryptoError::Io)?;
            io.sync().map_err(CryptoError::Io)?;
            io.write(0, &h.encode()).map_err(CryptoError::Io)?;
            io.sync().map_err(CryptoError::Io)?;
            Ok(i as u32)
        }
        Image::V2(mut h) => {
            let (key, _) = h.unlock(passphrase, &mut |at, buf| io.read(at, buf))?;
            h.add_keyslot(&key[..], new, luks2::NewKdf::Argon2id(cost.argon2), io)
        }
    }
}

/// Removes keyslot `slot`, authorised by `passphrase`, which must open another keyslot
/// (so that the image keeps one its caller can open).
pub fn remove(io: &mut dyn ImageIo, passphrase: &[u8], slot: u32) -> Result<(), CryptoError> {
    match read_header(io)? {
        Image::V1(mut h) => {
            let i = slot as usize;
            if i >= SLOTS || !h.slots[i].active {
                return Err(CryptoError::Unsupported(format!("no keyslot {slot}")));
            }
            // Try the passphrase on the other keyslots only.
            let mut others = (*h).clone();
            others.slots[i].active = false;
            others.unlock(passphrase, &mut |at, buf| io.read(at, buf))?;
            h.slots[i].active = false;
            io.write(0, &h.encode()).map_err(CryptoError::Io)?;
            io.sync().map_err(CryptoError::Io)?;
            let (at, len) = h.slot_area(i);
            let mut noise = vec![0u8; len];
            luks1::random(&mut noise);
            io.write(at, &noise).map_err(CryptoError::Io)?;
            io.sync().map_err(CryptoError::Io)
        }
        Image::V2(mut h) => {
            if !h.keyslots.iter().any(|s| s.id == slot) {
                return Err(CryptoError::Unsupported(format!("no keyslot {slot}")));
            }
            let mut others = (*h).clone();
            others.keyslots.retain(|s| s.id != slot);
            others.unlock(passphrase, &mut |at, buf| io.read(at, buf))?;
            h.remove_keyslot(slot, io)
        }
    }
}

/// Replaces the passphrase of the keyslot `passphrase` opens with `new`: a new keyslot
/// first, then the old one removed. The new keyslot's id.
pub fn change(
    io: &mut dyn ImageIo,
    passphrase: &[u8],
    new: &[u8],
    cost: &KeyslotCost,
) -> Result<u32, CryptoError> {
    let old = opened_by(io, passphrase)?;
    let id = add(io, passphrase, new, cost)?;
    remove(io, new, old)?;
    Ok(id)
}

/// The keyslot `passphrase` opens.
pub fn opened_by(io: &mut dyn ImageIo, passphrase: &[u8]) -> Result<u32, CryptoError> {
    Ok(match read_header(io)? {
        Image::V1(h) => h.unlock(passphrase, &mut |at, buf| io.read(at, buf))?.1 as u32,
        Image::V2(h) => h.unlock(passphrase, &mut |at, buf| io.read(at, buf))?.1,
    })
}

// The master key a keyslot holds is this size whatever the version.
const _: () = assert!(KEY_BYTES == 64);
