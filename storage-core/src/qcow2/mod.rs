//! qcow2, QEMU's image format, as a format node over a file node (its `file` child), with
//! its backing chain below it (`backing`: another qcow2 or a raw file, read-only).
//!
//! What it reads and writes: versions 2 and 3, any cluster size QEMU allows (512 bytes to
//! 2 MiB), refcounts of any width, zero clusters, compressed clusters (zlib, or zstd where
//! the header says so: read, and rewritten uncompressed when written to), backing chains
//! up to [`MAX_CHAIN`] deep, discard and write-zeroes, LUKS encryption inside the image
//! ([`encryption`]: QEMU's `encrypt.format=luks`). [`create`] makes version 3 images,
//! encrypted or not. Refused with a reason ([`header::Header::refusal`]): legacy AES-CBC
//! encryption, external data files, subclusters, images marked corrupt, and for writing,
//! internal snapshots and images left dirty by QEMU's lazy refcounts.
//!
//! Where it lives: [`header`] (the header and its extensions), [`meta`] (L1/L2 tables,
//! refcounts, allocation and the order changes reach the disk), [`queue`] (requests,
//! mapped to the file and the backing chain), [`compressed`] (inflating clusters),
//! [`snapshot`] (deleting and reverting snapshots; taking one is here), [`check`] (what
//! `qemu-img check` does: verify the metadata, repair leaks and refcounts), [`encryption`]
//! (the LUKS header inside the image, and the data cipher).

pub mod check;
mod compressed;
mod encryption;
pub mod header;
mod keyslots;
mod meta;
#[cfg(test)]
mod power_cut_tests;
mod queue;
mod snapshot;

pub use encryption::Keyring;
pub use header::Header;
pub use queue::Qcow2Queue;
pub use snapshot::{remove_snapshot_file, PreparedDelete};

use std::io;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::disk::lock::Locking;
use crate::disk::{AnyDisk, Disk, DiskInfo, Size};
use crate::error::{StorageError, StorageErrorKind};
use encryption::Encryption;
use meta::Meta;

/// How deep a backing chain may be (QEMU has no limit; a loop must end somewhere).
pub const MAX_CHAIN: usize = 16;

/// L2 cache size unless given (QEMU's default maximum is 32 MiB).
pub const DEFAULT_L2_CACHE: u64 = 32 << 20;

fn spec_error(path: &Path, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(
        StorageErrorKind::InvalidSpec,
        format!("{}: {msg}", path.display()),
    )
}

fn io_error(path: &Path, what: &str, e: io::Error) -> StorageError {
    let kind = if e.kind() == io::ErrorKind::InvalidData {
        StorageErrorKind::InvalidSpec
    } else {
        StorageErrorKind::Io
    };
    StorageError::new(kind, format!("{}: {what}: {e}", path.display()))
}

/// What the queues share: the metadata under its lock, the image file and the backing
/// node, for control-plane I/O (metadata, copy-on-write).
pub(crate) struct Shared {
    pub meta: Mutex<Meta>,
    pub file: AnyDisk,
    pub backing: Option<AnyDisk>,
    pub path: PathBuf,
    /// Bytes of L2 tables kept (for a new image on top, after a snapshot).
    pub l2_cache: u64,
    /// The image's cluster size (fixed), readable without the lock.
    pub cluster_size: u64,
    /// The data cipher of an encrypted image.
    pub crypt: Option<Arc<Encryption>>,
    /// Claims to write the image though it is read-only (a snapshot being deleted, its
    /// keyslots changing): see [`snapshot::WriteClaim`].
    pub write_claims: Mutex<snapshot::WriteClaims>,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything written durable, in the order the metadata needs (see [`meta`]).
    /// The data is synced first without the metadata lock: that is most of a flush, and
    /// requests that need the lock (every one plans under it) need not wait for it. Under
    /// the lock, the data written meanwhile and then the metadata follow.
    pub(crate) fn flush(&self) -> io::Result<()> {
        self.file.flush()?;
        self.lock().flush(&self.file)
    }
}

/// The image a qcow2 node serves now, and how many times that or the chain below it
/// changed (a snapshot taken, deleted or reverted): queues follow at their next request.
pub(crate) struct Active {
    shared: RwLock<Arc<Shared>>,
    pub generation: AtomicU64,
}

impl Active {
    pub(crate) fn get(&self) -> Arc<Shared> {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    active: Arc<Active>,
    info: DiskInfo,
    /// How the node was asked to treat the image's backing file.
    backing_mode: Backing,
    /// The passphrase of the chain's encrypted images (also for those opened later: a
    /// snapshot's, or the chain below one deleted).
    keys: Option<Arc<Keyring>>,
    /// Held by a keyslot change and a revert for their whole run ([`keyslots`]): a
    /// snapshot's new image copies the LUKS header under it, a delete starts and the disk
    /// closes under it.
    /// It holds whether the disk has closed: no keyslot change or delete starts after.
    keyslot_changes: Mutex<bool>,
    /// How many keyslot changes began: a snapshot prepared before one copies the header
    /// again when it is put in place.
    keys_changed: AtomicU64,
    /// Snapshot deletes under way, from the copy to the file's removal: the chain changes
    /// under them, so no keyslot change runs meanwhile (see [`snapshot::DeleteUnderWay`]).
    deletes: Arc<std::sync::atomic::AtomicUsize>,
}

/// Which backing file a qcow2 node reads through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The one the image names (opened read-only; its format from the image's
    /// backing-format extension, else probed: a read-only open may look).
    FromImage,
    /// None: what the image leaves unallocated reads as zeroes (QEMU's `backing=null`).
    Without,
}

/// One image below a qcow2 node's top, as [`Qcow2Disk::chain`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainImage {
    pub path: String,
    pub format: &'static str,
}

/// Reads and checks the header of the image in `file` (at `path`); its file's length.
fn read_header(
    file: &AnyDisk,
    path: &Path,
    read_only: bool,
) -> Result<(Header, u64), StorageError> {
    // The file's own length (the node's size is rounded down to whole sectors).
    let meta_data = std::fs::metadata(path).map_err(|e| io_error(path, "stat", e))?;
    if !read_only && !meta_data.is_file() {
        return Err(spec_error(
            path,
            "a writable qcow2 image must be a regular file (new clusters go past its end, \
             which a block device does not have)",
        ));
    }
    let file_len = if meta_data.is_file() {
        meta_data.len()
    } else {
        file.info().capacity.get()
    };
    let mut first = vec![0u8; 65536.min(file_len as usize).max(72)];
    file.read_at(&mut first[..(file_len as usize).min(65536)], 0)
        .map_err(|e| io_error(path, "reading the header", e))?;
    let header = Header::parse(&first, file_len).map_err(|e| spec_error(path, e))?;
    if let Some(why) = header.refusal(!read_only) {
        return Err(spec_error(path, why));
    }
    if file.info().direct {
        return Err(spec_error(
            path,
            "qcow2 over an O_DIRECT file (direct=on) is not supported yet: its metadata I/O \
             is not aligned for it",
        ));
    }
    Ok((header, file_len))
}

/// The shared state of an image whose header is read, over `backing`.
fn open_shared(
    file: AnyDisk,
    path: &Path,
    (header, file_len): (Header, u64),
    read_only: bool,
    l2_cache: u64,
    backing: Option<AnyDisk>,
    keys: Option<&Arc<Keyring>>,
) -> Result<Shared, StorageError> {
    // The key first: nothing is written to an image that will not open.
    let crypt = match (header.crypto, keys) {
        (Some(at), Some(keys)) => Some(keys.open(&file, path, at)?),
        (Some(_), None) => {
            return Err(StorageError::new(
                StorageErrorKind::InvalidArgument,
                format!(
                    "{}: the image is encrypted (LUKS): give its passphrase (key-file=, or \
                     encrypt.key-secret= on a --blockdev)",
                    path.display()
                ),
            ))
        }
        (None, _) => None,
    };
    let meta = Meta::open(&file, header.clone(), file_len, !read_only, l2_cache)
        .map_err(|e| io_error(path, "reading the metadata", e))?;
    // Autoclear bits name extensions whose consistency we would not keep (persistent dirty
    // bitmaps): a program that writes an image without knowing them clears them, so that
    // QEMU does not trust bitmaps that missed our writes.
    if !read_only && header.version >= 3 && header.autoclear != 0 {
        file.write_at(&[0u8; 8], header::OFF_AUTOCLEAR)
            .and_then(|_| file.flush())
            .map_err(|e| io_error(path, "clearing the autoclear bits", e))?;
        log::info!(
            "{}: cleared autoclear feature bits {:#x} (extensions such as dirty bitmaps that \
             this node does not keep up to date)",
            path.display(),
            header.autoclear
        );
    }
    Ok(Shared {
        cluster_size: meta.cluster_size(),
        meta: Mutex::new(meta),
        file,
        backing,
        path: path.to_owned(),
        l2_cache,
        crypt,
        write_claims: Mutex::default(),
    })
}

/// `stem@name.qcow2`, the name of a snapshot of the image `stem.*`.
fn snapshot_file(image: &Path, name: &str) -> Result<PathBuf, StorageError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(StorageError::new(
            StorageErrorKind::InvalidArgument,
            format!("snapshot name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"),
        ));
    }
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(image.with_file_name(format!("{stem}@{name}.qcow2")))
}

/// The snapshot name of `file` if it is one of `image`'s (`stem@name.qcow2`).
pub fn snapshot_name(image: &Path, file: &Path) -> Option<String> {
    let stem = image.file_stem()?.to_string_lossy().into_owned();
    let name = file.file_name()?.to_string_lossy().into_owned();
    name.strip_prefix(&format!("{stem}@"))?
        .strip_suffix(".qcow2")
        .map(str::to_owned)
}

/// Fails unless `path` still leads to the image in `file` (the one served).
fn still_named(path: &Path, file: &AnyDisk) -> Result<(), StorageError> {
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::metadata(path).map_err(|e| io_error(path, "stat", e))?;
    if (now.dev(), now.ino()) != file.info().identity {
        return Err(io_error(
            path,
            "changing the chain",
            io::Error::other("the image's name no longer leads to the image served"),
        ));
    }
    Ok(())
}

use crate::disk::sync_parent_dir as sync_dir;

impl Qcow2Disk {
    /// Opens the image in `file` (a file node, already open), at `path` for messages and
    /// relative backing names. `depth`: how many images are above this one. `keys`: the
    /// passphrase of its encrypted images (the image itself must be encrypted then).
    pub fn open(
        file: AnyDisk,
        path: &Path,
        read_only: bool,
        backing_mode: &Backing,
        l2_cache: u64,
        depth: usize,
        keys: Option<&Arc<Keyring>>,
    ) -> Result<Qcow2Disk, StorageError> {
        let (header, file_len) = read_header(&file, path, read_only)?;
        let backing = match (backing_mode, header.backing_path(path)) {
            (Backing::FromImage, Some(b)) => {
                if depth + 1 >= MAX_CHAIN {
                    return Err(spec_error(
                        path,
                        format!("the backing chain is deeper than {MAX_CHAIN} images"),
                    ));
                }
                Some(
                    open_backing(
                        &b,
                        header.backing_format.as_deref(),
                        depth + 1,
                        keys,
                        file.locking(),
                    )
                    .map_err(|e| {
                        StorageError::new(
                            e.kind(),
                            format!("{}: backing file: {e}", path.display()),
                        )
                    })?,
                )
            }
            _ => None,
        };
        if let Some(b) = &backing {
            log::info!(
                "{}: backing file {} ({} bytes)",
                path.display(),
                b.info().path,
                b.info().capacity.get()
            );
        }
        let shared = open_shared(
            file,
            path,
            (header, file_len),
            read_only,
            l2_cache,
            backing,
            keys,
        )?;
        let disk = Qcow2Disk::serving(
            Arc::new(shared),
            read_only,
            path,
            backing_mode.clone(),
            keys.cloned(),
        );
        // A key no image of the chain takes is a mistake (the disk believed encrypted),
        // not something to ignore. An unencrypted image over an encrypted one uses it.
        if depth == 0 && keys.is_some() && !disk.encrypted() {
            return Err(spec_error(
                path,
                "a key is given, but no image of the chain is encrypted",
            ));
        }
        Ok(disk)
    }

    /// A node serving `shared` (named `path`).
    fn serving(
        shared: Arc<Shared>,
        read_only: bool,
        path: &Path,
        backing_mode: Backing,
        keys: Option<Arc<Keyring>>,
    ) -> Qcow2Disk {
        let base = shared.file.info();
        let size = shared.lock().header.size;
        let info = DiskInfo {
            capacity: Size::new(size),
            read_only,
            direct: base.direct,
            format: "qcow2",
            path: path.display().to_string(),
            engine: base.engine,
            discard: true,
            identity: base.identity,
        };
        Qcow2Disk {
            active: Arc::new(Active {
                shared: RwLock::new(shared),
                generation: AtomicU64::new(0),
            }),
            info,
            backing_mode,
            keys,
            keyslot_changes: Mutex::new(false),
            keys_changed: AtomicU64::new(0),
            deletes: Arc::default(),
        }
    }

    /// Waits for a keyslot change under way and keeps others out while held; it holds
    /// whether the disk has closed.
    fn no_keyslot_change(&self) -> std::sync::MutexGuard<'_, bool> {
        self.keyslot_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Refused once the disk has `closed` (as [`no_keyslot_change`] holds it).
    ///
    /// [`no_keyslot_change`]: Self::no_keyslot_change
    fn refuse_if_closed(&self, closed: bool) -> Result<(), StorageError> {
        if closed {
            return Err(StorageError::new(
                StorageErrorKind::Unsupported,
                format!("{}: the disk has stopped", self.info.path),
            ));
        }
        Ok(())
    }

    /// Whether an image of the chain is encrypted (its data is plaintext above this node).
    pub fn encrypted(&self) -> bool {
        let mut shared = self.active.get();
        loop {
            if shared.crypt.is_some() {
                return true;
            }
            match &shared.backing {
                Some(AnyDisk::Qcow2(q)) => shared = q.active.get(),
                _ => return false,
            }
        }
    }

    pub fn header(&self) -> Header {
        self.active.get().lock().header.clone()
    }

    /// The graph below, as text.
    pub fn describe(&self) -> String {
        match &self.active.get().backing {
            Some(b) => format!("qcow2(file, backing: {})", b.describe()),
            None => "qcow2(file)".into(),
        }
    }

    /// The images below the top, from the nearest down.
    pub fn chain(&self) -> Vec<ChainImage> {
        let mut out = Vec::new();
        let mut cur = self.active.get();
        while let Some(b) = &cur.backing {
            out.push(ChainImage {
                path: b.info().path.clone(),
                format: b.info().format,
            });
            let next = match b {
                AnyDisk::Qcow2(q) => q.active.get(),
                _ => break,
            };
            cur = next;
        }
        out
    }

    /// Makes a snapshot named `name` ready while the guest runs (as QEMU's
    /// `blockdev-snapshot-sync` would take it): checks it can be taken, and makes the new,
    /// empty image that will take the guest's writes on top of the image as it is now. The
    /// image's name stays the disk's: [`commit_snapshot`](Self::commit_snapshot) (with the
    /// queues stopped) renames the image as it is to `stem@name.qcow2` and puts the new one
    /// in its place. Dropped without a commit, the new image goes.
    pub fn prepare_snapshot(&self, name: &str) -> Result<PreparedSnapshot, StorageError> {
        let invalid = |m: String| StorageError::new(StorageErrorKind::InvalidArgument, m);
        let unsupported = |m: String| StorageError::new(StorageErrorKind::Unsupported, m);
        if self.info.read_only {
            return Err(invalid("a read-only disk takes no snapshots".into()));
        }
        if self.backing_mode == Backing::Without {
            return Err(unsupported(
                "the disk is opened with backing=null: its image would name its snapshot as a \
                 backing file that the next start does not read"
                    .into(),
            ));
        }
        let old = self.active.get();
        let path = old.path.clone();
        if path.starts_with("/proc") {
            return Err(unsupported(
                "an operator's disk (opened through /proc/self/fd) takes no snapshots yet".into(),
            ));
        }
        let chain = self.chain().len();
        if chain + 1 > MAX_CHAIN - 1 {
            return Err(unsupported(format!(
                "the chain holds {chain} images below the top: another would make it deeper \
                 than {MAX_CHAIN}, which no start could open"
            )));
        }
        let frozen = snapshot_file(&path, name)?;
        let in_chain = self.chain().iter().any(|c| Path::new(&c.path) == frozen);
        if in_chain || std::fs::symlink_metadata(&frozen).is_ok() {
            return Err(invalid(format!(
                "a snapshot named {name:?} exists already ({})",
                frozen.display()
            )));
        }
        let io = |what: &str, e: io::Error| io_error(&path, what, e);
        let (size, cluster_size) = {
            let m = old.lock();
            (m.header.size, m.cluster_size())
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.new"));
        let _ = std::fs::remove_file(&tmp);
        let frozen_name = frozen
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // An encrypted image's snapshot is encrypted with the same key (and takes the same
        // passphrases: copied whole, no keyslot change under way).
        let (encryption, keys) = {
            let _no_key_change = self.no_keyslot_change();
            let header =
                LuksHeader::of(&old).map_err(|e| io("reading the encryption header", e))?;
            (header, self.keys_changed.load(Ordering::Acquire))
        };
        let made = create_file(
            &tmp,
            &CreateOptions {
                size,
                cluster_size,
                backing: Some((frozen_name, "qcow2".into())),
                encryption,
            },
        )?;
        let mut prepared = PreparedSnapshot {
            tmp: Some(tmp.clone()),
            frozen,
            shared: None,
            keys,
        };
        // The new image is the old one's: its owner and mode (the guest's data it will
        // hold is as private as what the old one holds).
        use std::os::unix::fs::MetadataExt;
        let was = std::fs::metadata(&path).map_err(|e| io("stat", e))?;
        made.set_permissions(was.permissions())
            .map_err(|e| io("setting the new image's mode", e))?;
        if let Err(e) = std::os::unix::fs::fchown(&made, Some(was.uid()), Some(was.gid())) {
            log::warn!(
                "{}: cannot give the new image the old one's owner: {e}",
                tmp.display()
            );
        }
        // Opened through the descriptor create_file made: the file made, whatever the name
        // leads to by now.
        use std::os::fd::AsRawFd;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", made.as_raw_fd()));
        let file = file_like(&old.file, &by_fd, false)?;
        let header = read_header(&file, &by_fd, false)?;
        drop(made);
        let below = AnyDisk::Qcow2(Box::new(Qcow2Disk::serving(
            old.clone(),
            true,
            &prepared.frozen,
            Backing::FromImage,
            self.keys.clone(),
        )));
        prepared.shared = Some(open_shared(
            file,
            &path,
            header,
            false,
            old.l2_cache,
            Some(below),
            self.keys.as_ref(),
        )?);
        Ok(prepared)
    }

    /// Puts a prepared snapshot in place; the caller has stopped the disk's queues (nothing
    /// in flight), which follow the switch at their next request. The image is flushed,
    /// linked to the snapshot's name, and the new image renamed over its name, each step
    /// synced: a crash leaves the image as it was (perhaps also under the snapshot's name,
    /// which a retry then refuses) or the new image over the snapshot. Returns the
    /// snapshot's file.
    pub fn commit_snapshot(&self, mut p: PreparedSnapshot) -> Result<PathBuf, StorageError> {
        let old = self.active.get();
        let path = old.path.clone();
        let io = |what: &str, e: io::Error| io_error(&path, what, e);
        // The queues are stopped: never wait here for a passphrase change (its key
        // derivations take seconds).
        let _no_key_change = match self.keyslot_changes.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Err(StorageError::new(
                    StorageErrorKind::Unsupported,
                    format!(
                        "{}: a passphrase change is under way: take the snapshot again once \
                         it ends",
                        path.display()
                    ),
                ))
            }
        };
        if self.keys_changed.load(Ordering::Acquire) != p.keys {
            // Keyslots changed since the new image copied the header: copy it again, so
            // the new image takes the passphrases the image takes now.
            let new = p.shared.as_ref().expect("prepared");
            let at = new.lock().header.crypto;
            if let (Some(h), Some((offset, _))) = (
                LuksHeader::of(&old).map_err(|e| io("reading the encryption header", e))?,
                at,
            ) {
                new.file
                    .write_at(&h.0, offset)
                    .and_then(|()| new.file.flush())
                    .map_err(|e| io("copying the encryption header", e))?;
            }
        }
        old.flush()
            .map_err(|e| io("flushing before the snapshot", e))?;
        still_named(&path, &old.file)?;
        let tmp = p.tmp.clone().expect("prepared");
        std::fs::hard_link(&path, &p.frozen).map_err(|e| io("naming the snapshot", e))?;
        if let Err(e) = sync_dir(&p.frozen) {
            let _ = std::fs::remove_file(&p.frozen);
            return Err(io("naming the snapshot", e));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&p.frozen);
            return Err(io("putting the new image in place", e));
        }
        // The new image is at the disk's name now: from here it is served, whatever else
        // fails (the old one is the snapshot).
        p.tmp = None;
        let shared = p.shared.take().expect("prepared");
        *self
            .active
            .shared
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(shared);
        self.active.generation.fetch_add(1, Ordering::Release);
        old.lock().freeze();
        // The old image is a snapshot now, read by the chain alone: others may read it
        // too (a clone's backing file, `qemu-img info`).
        old.file.hold_read_only();
        if let Err(e) = sync_dir(&path) {
            log::error!(
                "{}: the snapshot is taken, but syncing its directory failed ({e}): a power \
                 cut now could bring back the image as it was",
                path.display()
            );
        }
        log::info!(
            "{}: snapshot taken: {} holds the image as it was",
            path.display(),
            p.frozen.display()
        );
        Ok(p.frozen.clone())
    }
}

/// A snapshot made ready ([`Qcow2Disk::prepare_snapshot`]), not yet in place.
pub struct PreparedSnapshot {
    /// The new image's temporary name, until it is put in place.
    tmp: Option<PathBuf>,
    frozen: PathBuf,
    shared: Option<Shared>,
    /// `keys_changed` when the new image copied the LUKS header.
    keys: u64,
}

impl Drop for PreparedSnapshot {
    fn drop(&mut self) {
        if let Some(tmp) = &self.tmp {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// A file node on `path` on the engine `like` runs on (and, under test, recorded with its
/// faults): an image opened again beside the one served.
fn file_like(like: &AnyDisk, path: &Path, read_only: bool) -> Result<AnyDisk, StorageError> {
    // The image is this process's already (or new): its lock bytes are taken again,
    // not checked against the open it sits beside.
    let locking = match like.locking() {
        Locking::Off => Locking::Off,
        _ => Locking::Again,
    };
    #[allow(unused_mut)] // Tests give it `like`'s recorded faults.
    let mut raw =
        crate::disk::RawDisk::open_locking(path, read_only, false, like.info().engine, locking)?;
    #[cfg(test)]
    raw.inherit_faults(like);
    Ok(AnyDisk::Raw(raw))
}

/// Opens a backing file read-only: qcow2 or raw, as the image says, else as its first
/// bytes say (probing a read-only image is safe: nothing it holds can change how a
/// writable one is opened). Locked as the image above it is (`locking=off` reaches the
/// whole chain).
fn open_backing(
    path: &Path,
    format: Option<&str>,
    depth: usize,
    keys: Option<&Arc<Keyring>>,
    locking: Locking,
) -> Result<AnyDisk, StorageError> {
    let engine = crate::disk::engine_for_path(path);
    let file = AnyDisk::Raw(crate::disk::RawDisk::open_locking(
        path, true, false, engine, locking,
    )?);
    let (format, probed) = match format {
        Some(f) => (f.to_string(), false),
        None => {
            let mut magic = [0u8; 4];
            let qcow2 =
                file.read_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == header::MAGIC;
            (if qcow2 { "qcow2" } else { "raw" }.to_string(), true)
        }
    };
    match format.as_str() {
        "raw" => Ok(file),
        "qcow2" => {
            let disk = Qcow2Disk::open(
                file,
                path,
                true,
                &Backing::FromImage,
                DEFAULT_L2_CACHE,
                depth,
                keys,
            )?;
            // A raw base whose guest wrote a qcow2 header probes as qcow2; the backing
            // file such a header names could be any file on the host. Only images whose
            // format was given may lead further down.
            if probed && !disk.chain().is_empty() {
                return Err(spec_error(
                    path,
                    "its format is not recorded in the image above, and as a qcow2 image it \
                     names a backing file of its own: record the formats (qemu-img rebase -u \
                     -F FORMAT -b BACKING IMAGE) to use this chain",
                ));
            }
            Ok(AnyDisk::Qcow2(Box::new(disk)))
        }
        other => Err(spec_error(
            path,
            format!("backing format {other:?}: only qcow2 and raw are supported"),
        )),
    }
}

impl Disk for Qcow2Disk {
    type Queue = Qcow2Queue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<Qcow2Queue, StorageError> {
        Qcow2Queue::new(self.active.clone(), depth, self.info.capacity.clone(), None)
    }

    /// Every queue of the chain signals the parent's `eventfd`: the set of descriptors the
    /// worker waits on never changes, even as a snapshot puts new images on top.
    fn new_queue_sharing(&self, depth: u32, eventfd: RawFd) -> Result<Qcow2Queue, StorageError> {
        Qcow2Queue::new(
            self.active.clone(),
            depth,
            self.info.capacity.clone(),
            Some(eventfd),
        )
    }

    fn flush(&self) -> io::Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        self.active.get().flush()
    }

    fn close(&self) {
        if let Err(e) = self.flush() {
            log::error!("{}: flush at close: {e}", self.info.path);
        }
        // A keyslot change under way writes the snapshots' headers, holding them for
        // writing: it ends before their locks go, and none starts after.
        let mut closed = self.no_keyslot_change();
        *closed = true;
        let active = self.active.get();
        active.file.close();
        if let Some(b) = &active.backing {
            b.close();
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        queue::read_sync(&self.active.get(), buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.info.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        queue::write_sync(&self.active.get(), buf, offset)
    }
}

/// Reads `buf` at `offset` of `node`, zeroes past `size` (and past the node's end).
pub(crate) fn read_clamped(
    node: &AnyDisk,
    buf: &mut [u8],
    offset: u64,
    size: u64,
) -> io::Result<()> {
    let size = size.min(match node {
        // A file's length as it is now (an image grows).
        AnyDisk::Raw(_) => u64::MAX,
        other => other.info().capacity.get(),
    });
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    if n == 0 {
        return Ok(());
    }
    match node.read_at(&mut buf[..n], offset) {
        // Compressed data may run past the end of the file: the rest reads as zeroes.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let mut got = 0;
            while got < n {
                let step = (n - got).min(512);
                if node
                    .read_at(&mut buf[got..got + step], offset + got as u64)
                    .is_err()
                {
                    break;
                }
                got += step;
            }
            buf[got..n].fill(0);
            Ok(())
        }
        other => other,
    }
}

/// A completion fd source for queues that finish requests themselves (see
/// [`queue`]).
pub(crate) fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Wakes whoever waits on `fd` (an eventfd).
pub(crate) fn signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer to our own eventfd.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// The backing file's name as the image will record it, and its format.
    pub backing: Option<(String, String)>,
    /// Encrypted (LUKS in qcow2, as `qemu-img create -o encrypt.format=luks`), with this
    /// LUKS header.
    pub encryption: Option<LuksHeader>,
}

/// A LUKS1 header for an encrypted image, with its keyslots' areas.
#[derive(Clone)]
pub struct LuksHeader(Vec<u8>);

impl std::fmt::Debug for LuksHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LuksHeader({} bytes)", self.0.len())
    }
}

impl LuksHeader {
    /// A new random master key in keyslot 0 under `passphrase` (PBKDF2-SHA256 of
    /// `iterations`; see [`crate::crypto::luks1::iterations_for`]).
    pub fn new(passphrase: &[u8], iterations: u32) -> Result<LuksHeader, StorageError> {
        encryption::new_luks_header(passphrase, iterations)
            .map(LuksHeader)
            .map_err(|e| StorageError::new(StorageErrorKind::InvalidArgument, e.to_string()))
    }

    /// The header of the image `shared` serves, read back (a snapshot's new image gets
    /// its image's: the same master key, the same passphrases).
    fn of(shared: &Shared) -> io::Result<Option<LuksHeader>> {
        let at = shared.lock().header.crypto;
        at.map(|(offset, len)| {
            let mut b = vec![0u8; len as usize];
            shared.file.read_at(&mut b, offset).map(|()| LuksHeader(b))
        })
        .transpose()
    }
}

/// Makes a version 3 qcow2 image at `path` (which must not exist), as `qemu-img create -f
/// qcow2` does: 16-bit refcounts, no preallocation. Durable when it returns.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), StorageError> {
    create_file(path, opts).map(drop)
}

/// [`create`], keeping the new file open (mode 0600 until its owner sets another), so that
/// what is opened next is the file made, whatever its name leads to by then.
fn create_file(path: &Path, opts: &CreateOptions) -> Result<std::fs::File, StorageError> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    let bits = opts.cluster_size.trailing_zeros();
    if !opts.cluster_size.is_power_of_two() || !(9..=21).contains(&bits) {
        return Err(spec_error(
            path,
            format!(
                "cluster size {}: a power of two from 512 bytes to 2 MiB",
                opts.cluster_size
            ),
        ));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(512) {
        return Err(spec_error(
            path,
            format!("size {}: a whole number of 512-byte sectors", opts.size),
        ));
    }
    let cluster = opts.cluster_size;
    let l1_size = opts.size.div_ceil(cluster).div_ceil(cluster / 8);
    let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
    if l1_size > u64::from(u32::MAX) {
        return Err(spec_error(path, "too large for this cluster size"));
    }
    if let Some((name, format)) = &opts.backing {
        // The header, the backing-format extension and the end marker, then the name: all
        // in the first cluster.
        if format.len() > 64 {
            return Err(spec_error(path, "the backing format name is too long"));
        }
        let room = cluster as usize - 112 - 16 - format.len().div_ceil(8) * 8;
        if name.len() > 1023 || name.len() > room {
            return Err(spec_error(
                path,
                "the backing file name does not fit in the header (at most 1023 bytes, and \
                 within the first cluster)",
            ));
        }
    }
    // Clusters: header, refcount table, refcount block, L1 table, the LUKS header.
    let luks_at = (3 + l1_clusters) * cluster;
    let luks_len = opts.encryption.as_ref().map_or(0, |h| h.0.len() as u64);
    let used = 3 + l1_clusters + luks_len.div_ceil(cluster);
    let per_block = cluster * 8 / 16;
    if used > per_block {
        return Err(spec_error(
            path,
            if opts.encryption.is_some() {
                "too large for one refcount block at this cluster size (with its 2 MiB LUKS \
                 header, an encrypted image needs clusters of 4 KiB or more)"
            } else {
                "too large for one refcount block at this cluster size"
            },
        ));
    }
    let head = header::new_image(
        opts.size,
        bits,
        opts.backing.as_ref().map(|(n, f)| (n.as_str(), f.as_str())),
        l1_size as u32,
        opts.encryption.as_ref().map(|_| (luks_at, luks_len)),
    );
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_error(path, "creating", e))?;
    let write = |e| io_error(path, "writing", e);
    file.write_all(&head).map_err(write)?;
    let mut table = vec![0u8; cluster as usize];
    table[..8].copy_from_slice(&(2 * cluster).to_be_bytes());
    file.write_all_at(&table, cluster).map_err(write)?;
    let mut block = vec![0u8; cluster as usize];
    for i in 0..used as usize {
        block[2 * i..2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.write_all_at(&block, 2 * cluster).map_err(write)?;
    if let Some(h) = &opts.encryption {
        file.write_all_at(&h.0, luks_at).map_err(write)?;
    }
    file.set_len(used * cluster).map_err(write)?;
    file.sync_all().map_err(write)?;
    sync_dir(path).map_err(write)?;
    file.flush().map_err(write)?;
    Ok(file)
}
