//! Passphrase changes on a qcow2 disk with encrypted images, while it serves. The images
//! of its chain that hold its master key (the image, and the snapshots taken of it, which
//! copied its LUKS header) change alike, so that one passphrase keeps opening the whole
//! chain: a new passphrase is added to every image before an old one leaves any, so a
//! crash between two images leaves a passphrase that opens them all. Each image's LUKS
//! header is written through a descriptor of its own, inside the header's clusters only
//! (a snapshot's image is read-only to the data path, not to its keyslots).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{AnyDisk, Qcow2Disk, Shared};
use crate::crypto::keyslots::{self, KeyslotChanges, SlotInfo};
use crate::crypto::{luks1, CryptoError, ImageIo};
use crate::disk::Disk;
use crate::error::{StorageError, StorageErrorKind};

/// The LUKS header of one image: reads and writes inside its clusters only.
struct HeaderRegion {
    file: File,
    at: u64,
    len: u64,
}

impl HeaderRegion {
    fn inside(&self, at: u64, len: usize) -> std::io::Result<u64> {
        match at.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(self.at + at),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "outside the image's LUKS header",
            )),
        }
    }
}

impl ImageIo for HeaderRegion {
    fn read(&mut self, at: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let at = self.inside(at, buf.len())?;
        self.file.read_exact_at(buf, at)
    }
    fn write(&mut self, at: u64, buf: &[u8]) -> std::io::Result<()> {
        let at = self.inside(at, buf.len())?;
        self.file.write_all_at(buf, at)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// An image whose keyslots change with the disk's.
struct KeyImage {
    path: String,
    io: HeaderRegion,
}

fn unsupported(path: &str, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(StorageErrorKind::Unsupported, format!("{path}: {msg}"))
}

impl Qcow2Disk {
    /// The chain's images, top first, each with its file's name now (an image keeps its
    /// name in memory when a snapshot renames it: its node has the new one).
    fn images(&self) -> Vec<(PathBuf, Arc<Shared>)> {
        let top = self.active.get();
        let mut out = vec![(top.path.clone(), top)];
        while let Some(AnyDisk::Qcow2(q)) = &out.last().expect("one at least").1.backing {
            let next = (PathBuf::from(&q.info().path), q.active.get());
            out.push(next);
        }
        out
    }

    /// The encrypted images of the chain, top first, opened for their keyslots; all hold
    /// one master key and the same keyslots (they change in lockstep).
    fn key_images(&self) -> Result<Vec<KeyImage>, StorageError> {
        let mut out: Vec<KeyImage> = Vec::new();
        let mut digest = None;
        for (name, shared) in self.images() {
            let Some((at, len)) = shared.lock().header.crypto else {
                continue;
            };
            let path = name.display().to_string();
            let io_error = |what: &str, e: std::io::Error| {
                StorageError::new(StorageErrorKind::Io, format!("{path}: {what}: {e}"))
            };
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&name)
                .map_err(|e| io_error("opening for its keyslots", e))?;
            let now = file.metadata().map_err(|e| io_error("stat", e))?;
            if (now.dev(), now.ino()) != shared.file.info().identity {
                return Err(io_error(
                    "opening for its keyslots",
                    std::io::Error::other("the name no longer leads to the image in the chain"),
                ));
            }
            let mut io = HeaderRegion { file, at, len };
            let mut b = [0u8; luks1::HEADER_BYTES];
            io.read(0, &mut b)
                .map_err(|e| io_error("reading the LUKS header", e))?;
            let h = luks1::Header::parse(&b).map_err(|e| keyslots::error(&path, e))?;
            let this = (h.mk_digest, h.mk_digest_salt, h.mk_digest_iterations);
            match digest {
                None => digest = Some(this),
                Some(d) if d == this => {}
                Some(_) => {
                    return Err(unsupported(
                        &path,
                        "this image of the chain has a master key of its own (made elsewhere): \
                         change its passphrases with qemu-img amend",
                    ))
                }
            }
            out.push(KeyImage { path, io });
        }
        if out.is_empty() {
            return Err(unsupported(
                &self.info.path,
                "no image of the chain is encrypted",
            ));
        }
        Ok(out)
    }

    /// Runs a keyslot change over the images (one change at a time; a snapshot waits),
    /// once they are seen to have the same keyslots.
    fn changing_keyslots<T>(
        &self,
        f: impl FnOnce(&mut [KeyImage]) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        if self.info.read_only {
            return Err(unsupported(
                &self.info.path,
                "a read-only disk's keyslots are not changed through it",
            ));
        }
        let _one = self
            .keyslot_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut images = self.key_images()?;
        let mut first: Option<Vec<SlotInfo>> = None;
        for img in &mut images {
            let (_, slots) =
                keyslots::list(&mut img.io).map_err(|e| keyslots::error(&img.path, e))?;
            match &first {
                None => first = Some(slots),
                Some(f) if *f == slots => {}
                Some(_) => {
                    return Err(unsupported(
                        &img.path,
                        "its keyslots differ from the top image's (changed elsewhere): change \
                         them with qemu-img amend",
                    ))
                }
            }
        }
        // Whatever happens next, a snapshot being taken copies the headers again.
        self.keys_changed.fetch_add(1, Ordering::AcqRel);
        f(&mut images)
    }
}

fn each<T>(
    images: &mut [KeyImage],
    mut f: impl FnMut(&mut dyn ImageIo) -> Result<T, CryptoError>,
) -> Result<Vec<T>, StorageError> {
    images
        .iter_mut()
        .map(|img| f(&mut img.io).map_err(|e| keyslots::error(&img.path, e)))
        .collect()
}

impl KeyslotChanges for Qcow2Disk {
    fn keyslots(&self) -> Result<(u8, Vec<SlotInfo>), StorageError> {
        let mut images = self.key_images()?;
        let top = &mut images[0];
        keyslots::list(&mut top.io).map_err(|e| keyslots::error(&top.path, e))
    }

    fn add_keyslot(
        &self,
        passphrase: &[u8],
        new: &[u8],
        iterations: u32,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|images| {
            let ids = each(images, |io| keyslots::add(io, passphrase, new, iterations))?;
            Ok(ids[0])
        })
    }

    fn remove_keyslot(&self, passphrase: &[u8], slot: u32) -> Result<(), StorageError> {
        self.changing_keyslots(|images| {
            each(images, |io| keyslots::remove(io, passphrase, slot)).map(drop)
        })
    }

    fn change_passphrase(
        &self,
        passphrase: &[u8],
        new: &[u8],
        iterations: u32,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|images| {
            let old = {
                let top = &mut images[0];
                keyslots::opened_by(&mut top.io, passphrase)
                    .map_err(|e| keyslots::error(&top.path, e))?
            };
            // Every image takes the new passphrase before any loses the old one.
            let ids = each(images, |io| keyslots::add(io, passphrase, new, iterations))?;
            each(images, |io| keyslots::remove(io, new, old))?;
            Ok(ids[0])
        })
    }
}
