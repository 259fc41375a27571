//! Encryption at rest: the `luks` node ([`LuksDisk`], serving a LUKS image decrypted), the
//! AES-256-XTS cipher its data path runs ([`xts`]), LUKS headers and keyslots ([`luks1`],
//! with the anti-forensic splitter in [`af`]), passphrases from key files ([`key_file`]),
//! and memory for key material that is locked against swap and zeroed after use
//! ([`secret`]).

pub mod af;
mod buffers;
pub mod cost;
pub mod key_file;
pub mod keyslots;
pub mod luks1;
pub mod luks2;
mod node;
pub mod secret;
pub mod xts;

use std::io;

pub use buffers::PIECE;
pub(crate) use buffers::{decrypt_in_place, WriteBuffer};
pub use cost::KeyslotCost;
pub use node::{LuksDisk, LuksQueue};

/// The one key size we implement: AES-256 in XTS mode takes two 256-bit keys.
pub const KEY_BYTES: usize = 64;

/// A disk's master key, in locked memory.
pub type MasterKey = secret::Locked<[u8; KEY_BYTES]>;

/// How a payload's sectors are encrypted: their size, and what is added to each one's IV.
/// IVs count 512-byte sectors whatever the sector size (`plain64` as dm-crypt runs it for
/// LUKS, without `iv_large_sectors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorLayout {
    pub sector_size: u32,
    /// In 512-byte sectors.
    pub iv_tweak: u64,
}

impl SectorLayout {
    /// Encrypts (or decrypts) `buf`, whole sectors from byte `offset` of the payload (a
    /// multiple of the sector size).
    pub fn crypt(&self, xts: &xts::Xts, buf: &mut [u8], offset: u64, encrypt: bool) {
        let s = self.sector_size as usize;
        let iv = |at: u64| self.iv_tweak.wrapping_add(at / 512);
        let run = |buf: &mut [u8], iv: u64| {
            if encrypt {
                xts.encrypt(buf, iv, s)
            } else {
                xts.decrypt(buf, iv, s)
            }
        };
        if s == 512 {
            // Consecutive IVs: one call for the whole run.
            run(buf, iv(offset));
        } else {
            // IVs step by the sectors' 512-byte count: one call per sector.
            for (i, sector) in buf.chunks_mut(s).enumerate() {
                run(sector, iv(offset + (i * s) as u64));
            }
        }
    }
}

/// An image whose keyslot opened, whatever its LUKS version.
pub struct Opened {
    pub version: u8,
    pub key: MasterKey,
    pub slot: u32,
    /// Where the payload starts, in bytes.
    pub payload_offset: u64,
    /// The payload's size where the header fixes it (LUKS2 may); else to the device's end.
    pub payload_size: Option<u64>,
    pub layout: SectorLayout,
}

/// Reads a LUKS1 or LUKS2 header with `read(offset, buf)` (all of `buf`, or an error) and
/// opens a keyslot with `passphrase`.
pub fn open_with(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    passphrase: &[u8],
) -> Result<Opened, CryptoError> {
    let mut magic = [0u8; 8];
    read(0, &mut magic).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => CryptoError::NotLuks,
        _ => CryptoError::Io(e),
    })?;
    if magic[..6] != luks1::MAGIC {
        return Err(CryptoError::NotLuks);
    }
    match u16::from_be_bytes([magic[6], magic[7]]) {
        1 => {
            let u = luks1::open_with(read, passphrase)?;
            Ok(Opened {
                version: 1,
                payload_offset: u.payload_offset(),
                payload_size: None,
                layout: SectorLayout {
                    sector_size: 512,
                    iv_tweak: 0,
                },
                slot: u.slot as u32,
                key: u.key,
            })
        }
        2 => {
            let h = luks2::Header::read(read)?;
            let (key, slot) = h.unlock(passphrase, read)?;
            Ok(Opened {
                version: 2,
                key,
                slot,
                payload_offset: h.segment.offset,
                payload_size: h.segment.size,
                layout: SectorLayout {
                    sector_size: h.segment.sector_size,
                    iv_tweak: h.segment.iv_tweak,
                },
            })
        }
        v => Err(CryptoError::Unsupported(format!("LUKS version {v}"))),
    }
}

/// An image's bytes, for changing its keyslots: whole reads and writes at any offset
/// outside the payload, and a sync that makes the writes durable.
pub trait ImageIo {
    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write(&mut self, at: u64, buf: &[u8]) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
}

/// An image file, as a whole (for making one).
impl ImageIo for std::fs::File {
    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, at)
    }
    fn write(&mut self, at: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, buf, at)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.sync_all()
    }
}

/// Why an encrypted image could not be read or made. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("not a LUKS image")]
    NotLuks,
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("damaged LUKS header: {0}")]
    Damaged(String),
    #[error("no keyslot opens with this passphrase")]
    WrongPassphrase,
    #[error(transparent)]
    Xts(#[from] xts::XtsError),
    #[error("{0}")]
    Io(io::Error),
}
