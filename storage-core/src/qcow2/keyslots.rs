//! Passphrase changes on a qcow2 disk with encrypted images, while it serves. The top
//! image's LUKS header is the disk's: a change is authorised by and made on it (with the
//! order a power cut needs, see [`crate::crypto::keyslots`]), then copied to every image
//! of the chain holding the same master key (the snapshots taken of it, which copied its
//! header), so that one passphrase keeps opening the whole chain.
//!
//! A copy writes the keyslot areas that differ, synced, before the header: an added
//! keyslot's material is there before a header names it, and a removed keyslot's material
//! goes while the header still names the keyslot that authorised the removal. Before a
//! change, every image is brought level with the top (a copy that failed or a crash left
//! it one change behind) or the change is refused; a rotation copies its addition to
//! every image before it removes anything. So at every moment one passphrase opens every
//! image.
//!
//! The top's header is written through its node; a snapshot's through a descriptor of its
//! own (read-only to the data path, not to its keyslots), inside the header's clusters.
//! A change holds every snapshot it writes for writing (QEMU's lock bytes, see
//! [`crate::disk::lock`]) from before its first write to its end, so it is refused while
//! another program, or another disk of this daemon, reads one of them; and it is refused
//! while a snapshot is being deleted, whose commit replaces images of the chain and lets
//! go of their locks ([`super::snapshot::DeleteUnderWay`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::snapshot::{DeleteUnderWay, WriteClaim};
use super::{AnyDisk, Qcow2Disk, Shared};
use crate::crypto::keyslots::{self, KeyslotChanges, SlotInfo};
use crate::crypto::{luks1, CryptoError, ImageIo, KeyslotCost};
use crate::disk::Disk;
use crate::error::{StorageError, StorageErrorKind};

/// Where an image's LUKS header is written.
enum Target {
    /// The top image, through its node.
    Node(Arc<Shared>),
    /// An image below, through a descriptor of our own.
    File(File),
}

/// The LUKS header of one image: reads and writes inside its clusters only.
struct HeaderRegion {
    target: Target,
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
        match &self.target {
            Target::Node(s) => s.file.read_at(buf, at),
            Target::File(f) => f.read_exact_at(buf, at),
        }
    }
    fn write(&mut self, at: u64, buf: &[u8]) -> std::io::Result<()> {
        let at = self.inside(at, buf.len())?;
        match &self.target {
            Target::Node(s) => s.file.write_at(buf, at),
            Target::File(f) => f.write_all_at(buf, at),
        }
    }
    fn sync(&mut self) -> std::io::Result<()> {
        match &self.target {
            Target::Node(s) => s.file.flush(),
            Target::File(f) => f.sync_data(),
        }
    }
}

/// An image whose keyslots change with the disk's.
struct KeyImage {
    path: String,
    io: HeaderRegion,
    /// A snapshot's claim on its file while its header is written: the header is part of
    /// what a program reading the snapshot (a clone's backing file) sees.
    _held: Option<WriteClaim>,
}

/// Where the keyslot material starts in a LUKS1 header area: what follows the header's
/// own 4 KiB block (as QEMU and cryptsetup lay it out; a header whose keyslots start
/// lower is refused, its header and material could not be written apart).
const MATERIAL: u64 = 4096;

/// How much of a header area is compared and copied at once.
const CHUNK: usize = 64 << 10;

fn unsupported(path: &str, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(StorageErrorKind::Unsupported, format!("{path}: {msg}"))
}

fn io_error(path: &str, what: &str, e: std::io::Error) -> StorageError {
    StorageError::new(StorageErrorKind::Io, format!("{path}: {what}: {e}"))
}

/// The master-key digest of a LUKS1 header; refused if its keyslots' material starts
/// inside the header's own block, or the area is not larger than that block.
fn digest(io: &mut HeaderRegion, path: &str) -> Result<([u8; 20], [u8; 32], u32), StorageError> {
    let mut b = [0u8; luks1::HEADER_BYTES];
    io.read(0, &mut b)
        .map_err(|e| io_error(path, "reading the LUKS header", e))?;
    let h = luks1::Header::parse(&b).map_err(|e| keyslots::error(path, e))?;
    let lowest = (0..luks1::SLOTS)
        .map(|i| h.slot_area(i).0)
        .min()
        .unwrap_or(0);
    if lowest < MATERIAL || io.len <= MATERIAL {
        return Err(unsupported(
            path,
            "its keyslots start inside the LUKS header's first 4 KiB: not changed here",
        ));
    }
    Ok(h.master_key_id())
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

    /// The first encrypted image of the chain (whose header is the disk's), and (`all`)
    /// the others holding its master key, opened for their headers. An encrypted image
    /// with a master key of its own is refused: its passphrases are not the disk's.
    fn key_images(&self, all: bool) -> Result<Vec<KeyImage>, StorageError> {
        let mut out: Vec<KeyImage> = Vec::new();
        let mut first_digest = None;
        for (i, (name, shared)) in self.images().into_iter().enumerate() {
            let Some((at, len)) = shared.lock().header.crypto else {
                continue;
            };
            let path = name.display().to_string();
            let target = if i == 0 {
                Target::Node(shared.clone())
            } else {
                let io = |e| io_error(&path, "opening for its keyslots", e);
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&name)
                    .map_err(io)?;
                let now = file.metadata().map_err(io)?;
                if (now.dev(), now.ino()) != shared.file.info().identity {
                    return Err(io(std::io::Error::other(
                        "the name no longer leads to the image in the chain",
                    )));
                }
                Target::File(file)
            };
            let mut img = KeyImage {
                path,
                io: HeaderRegion { target, at, len },
                _held: None,
            };
            let d = digest(&mut img.io, &img.path)?;
            match first_digest {
                None => first_digest = Some(d),
                Some(f) if f == d => {}
                Some(_) => {
                    return Err(unsupported(
                        &img.path,
                        "this image of the chain has a master key of its own (made \
                         elsewhere): change its passphrases with qemu-img amend",
                    ))
                }
            }
            if all && i > 0 {
                // Claimed before anything is written: every snapshot's or none.
                img._held = Some(WriteClaim::claim(
                    shared,
                    &name,
                    "an image of the chain whose LUKS header the change writes",
                )?);
            }
            out.push(img);
            if !all {
                break;
            }
        }
        if out.is_empty() {
            return Err(unsupported(
                &self.info.path,
                "no image of the chain is encrypted",
            ));
        }
        Ok(out)
    }

    /// Runs a keyslot change: one at a time (a snapshot's copy of the header waits).
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
        let one = self.no_keyslot_change();
        self.refuse_if_closed(*one)?;
        if DeleteUnderWay::any(self) {
            return Err(StorageError::new(
                StorageErrorKind::InUse,
                format!(
                    "{}: a snapshot is being deleted: change the keyslots once it ends",
                    self.info.path
                ),
            ));
        }
        let mut images = self.key_images(true)?;
        // Whatever happens next, a snapshot prepared before copies the header again.
        self.keys_changed.fetch_add(1, Ordering::AcqRel);
        // Every image level with the top first (see the module docs).
        copy_header(&mut images, false)?;
        f(&mut images)
    }
}

/// Brings every other image's header level with the first's: the keyslot areas that
/// differ, synced, then the header block, synced.
/// `changed`: whether a change was just made in the first (for the error's words).
fn copy_header(images: &mut [KeyImage], changed: bool) -> Result<(), StorageError> {
    let (top, rest) = images.split_first_mut().expect("one image at least");
    let mut want = vec![0u8; top.io.len as usize];
    top.io
        .read(0, &mut want)
        .map_err(|e| io_error(&top.path, "reading the LUKS header", e))?;
    for img in rest {
        let failed = |e: std::io::Error| {
            let what = if changed {
                format!(
                    "the change is made in {}, but copying it to this image failed (the next \
                     keyslot change copies it first)",
                    top.path
                )
            } else {
                format!(
                    "bringing this image's keyslots level with {}'s failed, so no keyslot was \
                     changed",
                    top.path
                )
            };
            io_error(&img.path, &what, e)
        };
        if img.io.len != top.io.len {
            return Err(failed(std::io::Error::other(
                "its LUKS header is not the size of the top image's",
            )));
        }
        let mut have = vec![0u8; want.len()];
        img.io.read(0, &mut have).map_err(failed)?;
        let mut wrote = false;
        let material = MATERIAL as usize;
        for at in (material..want.len()).step_by(CHUNK) {
            let end = (at + CHUNK).min(want.len());
            if want[at..end] != have[at..end] {
                img.io.write(at as u64, &want[at..end]).map_err(failed)?;
                wrote = true;
            }
        }
        if wrote {
            img.io.sync().map_err(failed)?;
        }
        if want[..material] != have[..material] {
            img.io.write(0, &want[..material]).map_err(failed)?;
            img.io.sync().map_err(failed)?;
        }
    }
    Ok(())
}

/// Runs `f` on the first image's header, mapping its error.
fn on_top<T>(
    images: &mut [KeyImage],
    f: impl FnOnce(&mut dyn ImageIo) -> Result<T, CryptoError>,
) -> Result<T, StorageError> {
    let top = &mut images[0];
    f(&mut top.io).map_err(|e| keyslots::error(&top.path, e))
}

impl KeyslotChanges for Qcow2Disk {
    fn keyslots(&self) -> Result<(u8, Vec<SlotInfo>), StorageError> {
        // Not under the change lock: a listing must not make a snapshot fail.
        let mut images = self.key_images(false)?;
        on_top(&mut images, keyslots::list)
    }

    fn add_keyslot(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|images| {
            let id = on_top(images, |io| keyslots::add(io, passphrase, new, cost))?;
            copy_header(images, true)?;
            Ok(id)
        })
    }

    fn remove_keyslot(&self, passphrase: &[u8], slot: u32) -> Result<(), StorageError> {
        self.changing_keyslots(|images| {
            on_top(images, |io| keyslots::remove(io, passphrase, slot))?;
            copy_header(images, true)
        })
    }

    fn change_passphrase(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|images| {
            let old = on_top(images, |io| keyslots::opened_by(io, passphrase))?;
            let id = on_top(images, |io| keyslots::add(io, passphrase, new, cost))?;
            // Every image takes the new passphrase before any loses the old one.
            copy_header(images, true)?;
            on_top(images, |io| keyslots::remove(io, new, old))?;
            copy_header(images, true)?;
            Ok(id)
        })
    }
}
