//! qcow2's embedded LUKS encryption (`crypt_method` 2: what `qemu-img create -f qcow2 -o
//! encrypt.format=luks` makes). A LUKS1 header and its keyslots lie in clusters of the
//! image file that the full-disk-encryption header extension points at; every data
//! cluster is encrypted with aes-xts-plain64 in 512-byte sectors whose IVs count sectors
//! of the image *file* (the host offset), as QEMU does for LUKS in qcow2. So data is
//! decrypted where it lies, and a cluster's contents copied elsewhere are encrypted again
//! for their new place. Metadata (header, tables, refcounts) is not encrypted; zero and
//! unallocated clusters read as zeroes without the cipher, and a new cluster's untouched
//! part is written as encrypted zeroes.
//!
//! A disk's images are unlocked with one passphrase ([`Keyring`]); an image whose LUKS
//! header has the master-key digest of one already opened (a snapshot we made shares its
//! image's header) reuses that cipher instead of deriving the key again.

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::spec_error;
use crate::crypto::key_file::Passphrase;
use crate::crypto::luks1;
use crate::crypto::secret::Locked;
use crate::crypto::xts::Xts;
use crate::crypto::{CryptoError, SectorLayout, KEY_BYTES};
use crate::disk::{AnyDisk, Disk, IoVecs};
use crate::error::{StorageError, StorageErrorKind};

/// 512-byte sectors, IVs from the host offset (no tweak).
const LAYOUT: SectorLayout = SectorLayout {
    sector_size: 512,
    iv_tweak: 0,
};
const SECTOR: u64 = 512;

/// An image's data cipher, in locked memory.
pub(crate) struct Encryption {
    cipher: Locked<Xts>,
}

/// The passphrase a disk's encrypted images open with, and the ciphers opened so far (by
/// the master-key digest and salt of their LUKS headers).
pub struct Keyring {
    passphrase: Arc<Passphrase>,
    opened: Mutex<Vec<(Digest, Arc<Encryption>)>>,
}

/// What identifies a LUKS1 master key without holding it ([`luks1::Header::master_key_id`]).
type Digest = ([u8; 20], [u8; 32], u32);

impl Keyring {
    pub fn new(passphrase: Arc<Passphrase>) -> Arc<Keyring> {
        Arc::new(Keyring {
            passphrase,
            opened: Mutex::new(Vec::new()),
        })
    }

    /// The cipher of the image in `file` (at `path`, for messages), whose LUKS header is
    /// `(offset, length)` bytes of it.
    pub(crate) fn open(
        &self,
        file: &AnyDisk,
        path: &Path,
        (offset, len): (u64, u64),
    ) -> Result<Arc<Encryption>, StorageError> {
        let mut read = |at: u64, buf: &mut [u8]| -> io::Result<()> {
            if at.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "past the end of the image's LUKS header",
                ));
            }
            file.read_at(buf, offset + at)
        };
        let failed = |e: CryptoError| {
            let kind = match e {
                CryptoError::Io(_) => StorageErrorKind::Io,
                CryptoError::WrongPassphrase => StorageErrorKind::InvalidArgument,
                _ => StorageErrorKind::InvalidImage,
            };
            StorageError::new(kind, format!("{}: encryption: {e}", path.display()))
        };
        let mut b = [0u8; luks1::HEADER_BYTES];
        read(0, &mut b).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => failed(CryptoError::NotLuks),
            _ => failed(CryptoError::Io(e)),
        })?;
        if b[..6] == luks1::MAGIC && b[6..8] != [0, 1] {
            return Err(spec_error(
                path,
                "encryption: the LUKS header inside the image is not LUKS1, the one version \
                 QEMU writes into qcow2",
            ));
        }
        let header = luks1::Header::parse(&b).map_err(failed)?;
        let digest = header.master_key_id();
        let mut opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, e)) = opened.iter().find(|(d, _)| *d == digest) {
            return Ok(e.clone());
        }
        let (key, slot) = header.unlock(&self.passphrase, &mut read).map_err(failed)?;
        let cipher = Xts::new(&key[..])
            .map_err(CryptoError::from)
            .and_then(|x| Locked::new(x).map_err(CryptoError::Io))
            .map_err(failed)?;
        log::info!(
            "{}: encrypted image (LUKS1 in qcow2) opened with keyslot {slot}",
            path.display()
        );
        let e = Arc::new(Encryption { cipher });
        opened.push((digest, e.clone()));
        Ok(e)
    }
}

impl Encryption {
    /// Encrypts `buf`, the data of the image file's bytes from `host` (a sector boundary).
    pub(crate) fn encrypt(&self, buf: &mut [u8], host: u64) {
        LAYOUT.crypt(&self.cipher, buf, host, true)
    }

    /// Decrypts `buf`, read from the image file's bytes from `host` (a sector boundary).
    pub(crate) fn decrypt(&self, buf: &mut [u8], host: u64) {
        LAYOUT.crypt(&self.cipher, buf, host, false)
    }

    /// Decrypts a completed read of the file's bytes from `host` in the guest's buffers.
    pub(crate) fn decrypt_iovecs(&self, bufs: &mut IoVecs, host: u64) {
        crate::crypto::decrypt_in_place(&self.cipher, &LAYOUT, bufs, host)
    }

    /// Reads and decrypts the file's bytes `[host, host + out.len())`, at any alignment.
    pub(crate) fn read(&self, file: &AnyDisk, out: &mut [u8], host: u64) -> io::Result<()> {
        let start = host / SECTOR * SECTOR;
        let end = (host + out.len() as u64).div_ceil(SECTOR) * SECTOR;
        if start == host && end == host + out.len() as u64 {
            file.read_at(out, host)?;
            self.decrypt(out, host);
            return Ok(());
        }
        let mut span = vec![0u8; (end - start) as usize];
        file.read_at(&mut span, start)?;
        self.decrypt(&mut span, start);
        let skip = (host - start) as usize;
        out.copy_from_slice(&span[skip..skip + out.len()]);
        Ok(())
    }

    /// Encrypts `data` and writes it at the file's byte `host`, at any alignment: sectors
    /// it covers in part are read and decrypted first (the cluster must hold ciphertext
    /// already: it is allocated).
    pub(crate) fn write(&self, file: &AnyDisk, data: &[u8], host: u64) -> io::Result<()> {
        let start = host / SECTOR * SECTOR;
        let end = (host + data.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut span = vec![0u8; (end - start) as usize];
        if start != host || end != host + data.len() as u64 {
            self.read(file, &mut span, start)?;
        }
        let skip = (host - start) as usize;
        span[skip..skip + data.len()].copy_from_slice(data);
        self.encrypt(&mut span, start);
        file.write_at(&span, start)
    }
}

/// A new LUKS1 header for an encrypted image: a new random master key in keyslot 0 under
/// `passphrase` (PBKDF2 of `iterations`). The bytes to write in the image's header
/// clusters: the header and its keyslots' areas, as long as the header's payload offset
/// (which QEMU takes for the header's length).
pub(crate) fn new_luks_header(passphrase: &[u8], iterations: u32) -> Result<Vec<u8>, CryptoError> {
    let mut key = Locked::new([0u8; KEY_BYTES]).map_err(CryptoError::Io)?;
    luks1::random(&mut key[..]);
    let (header, material) =
        luks1::Header::create(&key[..], passphrase, iterations, &mut luks1::random)?;
    let mut b = vec![0u8; header.payload_offset as usize * SECTOR as usize];
    let encoded = header.encode();
    b[..encoded.len()].copy_from_slice(&encoded);
    let (at, _) = header.slot_area(0);
    b[at as usize..at as usize + material.len()].copy_from_slice(&material);
    Ok(b)
}
