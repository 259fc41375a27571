//! Deleting and reverting a qcow2 node's snapshots while it serves (taking one is in the
//! module root: [`Qcow2Disk::prepare_snapshot`]).
//!
//! A snapshot is a file of the chain, `stem@name.qcow2`: the disk as it was when it was
//! taken, with the files below it. Deleting one pulls its data up into the image above it
//! (QEMU's block-stream, with that image as the top): every cluster the snapshot holds and
//! the image above does not is copied up, under that image's metadata lock, so a guest
//! writing the top meanwhile is never overtaken (a cluster it has written is never
//! copied over). Then the image above names the snapshot's backing file instead, and the
//! chain in memory is rebuilt with the queues stopped. What every other snapshot and the
//! disk read is the same before, during and after; a crash at any point leaves a chain
//! that reads the same (the header is rewritten only once the copies are durable).
//!
//! Reverting puts a new, empty image over a snapshot in the disk's name and drops the
//! images above the snapshot (newer snapshots and what the guest wrote since): done with
//! no frontend connected, as a rollback of a failed deployment is.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::meta::Mapping;
use super::{
    create_file, file_like, io_error, open_backing, open_shared, read_header, snapshot_file,
    still_named, sync_dir, Active, Backing, CreateOptions, Qcow2Disk, Shared,
};
use crate::disk::{AnyDisk, Disk};
use crate::error::{StorageError, StorageErrorKind};

/// One qcow2 image of the chain: its node's state and its file's name.
struct Layer {
    active: Arc<Active>,
    path: PathBuf,
}

/// A snapshot's data copied up ([`Qcow2Disk::stream_snapshot`]), ready to leave the chain.
pub struct PreparedDelete {
    /// Index of the image above the snapshot in the chain (0: the top).
    above: usize,
    snapshot: PathBuf,
    /// The chain below the snapshot, opened afresh (none: the snapshot had no backing).
    below: Option<AnyDisk>,
    /// The image above, reopened over `below` (when it is itself a snapshot: nothing
    /// writes it, so it can be opened before the queues stop).
    reopened: Option<Shared>,
    /// The snapshot held for writing since the copy began: no other program takes it up
    /// as a backing file before its file goes.
    held: Option<WriteClaim>,
    /// Set once the delete has streamed, beside `held`, and dropped after it.
    _under_way: Option<DeleteUnderWay>,
}

/// A snapshot delete under way, from its start to its end: a keyslot change is refused
/// meanwhile, and a delete waits for one to end before it starts. A change writes the
/// headers of the images it found in the chain, holding each for writing; a delete's
/// commit replaces images of the chain and lets go of their locks, which would take the
/// writer's bytes from under the change (or leave it claiming an image already let go).
pub(super) struct DeleteUnderWay(Arc<std::sync::atomic::AtomicUsize>);

impl DeleteUnderWay {
    fn begin(disk: &Qcow2Disk) -> Result<DeleteUnderWay, StorageError> {
        let no_key_change = disk.no_keyslot_change();
        disk.refuse_if_closed(*no_key_change)?;
        disk.deletes.fetch_add(1, Ordering::AcqRel);
        Ok(DeleteUnderWay(disk.deletes.clone()))
    }

    /// Whether one is under way; asked under the keyslot change lock, which
    /// [`begin`](Self::begin) takes too.
    pub(super) fn any(disk: &Qcow2Disk) -> bool {
        disk.deletes.load(Ordering::Acquire) > 0
    }
}

impl Drop for DeleteUnderWay {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PreparedDelete {
    pub fn snapshot_file(&self) -> &Path {
        &self.snapshot
    }

    /// Removes the snapshot's file (synced), once [`Qcow2Disk::commit_delete`] took it out
    /// of the chain (`committed`), or after the delete failed past the point where the
    /// image above stopped naming it on disk. The snapshot is held for writing until
    /// then, so no other program takes it up as a backing file meanwhile.
    pub fn remove_file(mut self, committed: bool) -> io::Result<()> {
        let removal = remove_snapshot_file(&self.snapshot);
        if let Some(held) = self.held.take() {
            held.end(match (removal.is_ok(), committed) {
                (true, _) => Fate::Removed,
                (false, true) => Fate::OutOfChain,
                (false, false) => Fate::Reader,
            });
        }
        removal
    }
}

fn err(kind: StorageErrorKind, msg: impl Into<String>) -> StorageError {
    StorageError::new(kind, msg.into())
}

/// A claim on a read-only image of the chain, held for writing while a snapshot is
/// deleted (its data copied into it, or its file removed), a revert removes it, or its
/// LUKS keyslots change: refused while another program, or another disk of this daemon,
/// reads it (a clone's backing file would change, or go, under it). Claims on one image
/// nest (a revert claims the newer snapshots, then waits for a keyslot change that may
/// hold them): the lock's writer bytes, which another claim in this process would not
/// see, stay until the last ends. [`end`](Self::end) tells the file's fate; dropped
/// without one, the image is a reader's again.
pub(super) struct WriteClaim(Option<Arc<Shared>>);

/// An image's claims: how many, and what becomes of its lock when the last ends.
#[derive(Debug, Default)]
pub(crate) struct WriteClaims {
    count: usize,
    fate: Fate,
}

/// What becomes of a claimed image's lock, least final first: a claim that knows more
/// (the file was removed) outranks one that does not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fate {
    /// Still in the chain: back to a reader's bytes.
    #[default]
    Reader,
    /// Out of the chain, its file kept: no lock of ours stays on it.
    OutOfChain,
    /// Its file removed: the writer's bytes stay (nobody can open it by name now).
    Removed,
}

impl WriteClaim {
    /// Claims `image`, whose file is at `path` now, for `what` (named in a refusal).
    pub(super) fn claim(
        image: Arc<Shared>,
        path: &Path,
        what: &str,
    ) -> Result<WriteClaim, StorageError> {
        let mut claims = claims_of(&image);
        if claims.count == 0 {
            image.file.hold_for_writing(path).map_err(|e| {
                StorageError::new(
                    e.kind(),
                    format!("{what}: {e} (another program, or another disk, reads it)"),
                )
            })?;
            claims.fate = Fate::Reader;
        }
        claims.count += 1;
        drop(claims);
        Ok(WriteClaim(Some(image)))
    }

    /// Ends the claim, knowing the fate of the image's file.
    fn end(mut self, fate: Fate) {
        if let Some(image) = self.0.take() {
            let_go(&image, fate);
        }
    }
}

impl Drop for WriteClaim {
    fn drop(&mut self) {
        if let Some(image) = self.0.take() {
            let_go(&image, Fate::Reader);
        }
    }
}

fn claims_of(image: &Shared) -> std::sync::MutexGuard<'_, WriteClaims> {
    image.write_claims.lock().unwrap_or_else(|p| p.into_inner())
}

/// One claim on `image` ends, knowing `fate`; the last applies the most final one known.
fn let_go(image: &Shared, fate: Fate) {
    let mut claims = claims_of(image);
    claims.fate = claims.fate.max(fate);
    claims.count -= 1;
    if claims.count == 0 {
        match claims.fate {
            Fate::Reader => image.file.hold_read_only(),
            Fate::OutOfChain => image.file.release_lock(),
            Fate::Removed => {}
        }
    }
}

/// The chain from `image` down no longer serves (a fresh one replaced it): its lock bytes
/// go now, though queues may hold it until their next request (a later delete would see
/// them as another reader).
fn release_chain(image: &Shared) {
    image.file.release_lock();
    release_below(image);
}

/// As [`release_chain`], for the chain below `image` only.
fn release_below(image: &Shared) {
    match &image.backing {
        Some(AnyDisk::Qcow2(q)) => release_chain(&q.active.get()),
        Some(other) => other.release_lock(),
        None => {}
    }
}

impl Qcow2Disk {
    /// The qcow2 images of the chain from the top down.
    fn layers(&self) -> Vec<Layer> {
        let mut out = vec![Layer {
            active: self.active.clone(),
            path: PathBuf::from(&self.info.path),
        }];
        loop {
            let cur = out.last().expect("the top").active.get();
            match &cur.backing {
                Some(AnyDisk::Qcow2(q)) => out.push(Layer {
                    active: q.active.clone(),
                    path: PathBuf::from(&q.info.path),
                }),
                _ => break,
            }
        }
        out
    }

    /// Where snapshot `name` is in the chain (at least 1), with the chain.
    fn find_snapshot(&self, name: &str) -> Result<(Vec<Layer>, usize), StorageError> {
        if self.info.read_only {
            return Err(err(
                StorageErrorKind::InvalidArgument,
                "a read-only disk's snapshots are not changed through it",
            ));
        }
        if self.backing_mode == Backing::Without {
            return Err(err(
                StorageErrorKind::Unsupported,
                "the disk is opened with backing=null: it does not read its snapshots",
            ));
        }
        let layers = self.layers();
        let file = snapshot_file(&layers[0].path, name)?;
        match layers.iter().position(|l| l.path == file) {
            Some(k) if k > 0 => Ok((layers, k)),
            _ => Err(err(
                StorageErrorKind::NotFound,
                format!("no snapshot named {name:?} in the disk's chain"),
            )),
        }
    }

    /// Copies snapshot `name`'s data up into the image above it, while the guest runs, and
    /// makes that image name the snapshot's backing file instead; [`commit_delete`]
    /// (queues stopped) then takes the snapshot out of the chain in memory.
    /// `progress(done, total)` (in clusters) returning false stops the copy: what was
    /// copied stays (it reads the same) and the snapshot stays in the chain.
    ///
    /// [`commit_delete`]: Self::commit_delete
    pub fn stream_snapshot(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<PreparedDelete, StorageError> {
        let (layers, k) = self.find_snapshot(name)?;
        // (A keyslot change, waited for here, leaves the chain as it is.)
        let under_way = DeleteUnderWay::begin(self)?;
        let above = &layers[k - 1];
        let snap = layers[k].active.get();
        let io = |what: &str, e: io::Error| io_error(&above.path, what, e);
        // The snapshot's file goes (held until then); a snapshot above takes its data.
        let snapshot_held =
            WriteClaim::claim(snap.clone(), &layers[k].path, &format!("snapshot {name:?}"))?;
        let _above_held = if k > 1 {
            Some(WriteClaim::claim(
                above.active.get(),
                &above.path,
                "the snapshot above it",
            )?)
        } else {
            None
        };
        // The image the copies go to: the one being served at the top, or the snapshot
        // above opened for writing (nothing else writes it; its node keeps reading it,
        // which stays right: a cluster not copied yet is read from the snapshot as before).
        let target: Arc<Shared> = if k == 1 {
            self.active.get()
        } else {
            let file = file_like(&snap.file, &above.path, false)?;
            if file.info().identity != above.active.get().file.info().identity {
                return Err(io(
                    "opening for the copy",
                    io::Error::other("the name no longer leads to the image in the chain"),
                ));
            }
            let header = read_header(&file, &above.path, false)?;
            Arc::new(open_shared(
                file,
                &above.path,
                header,
                false,
                snap.l2_cache,
                None,
                self.keys.as_ref(),
            )?)
        };
        let (new_backing, snap_size, snap_cluster) = {
            let m = snap.lock();
            let format = m.header.backing_format.clone().or_else(|| {
                snap.backing.as_ref().map(|b| {
                    if b.info().format == "qcow2" {
                        "qcow2"
                    } else {
                        "raw"
                    }
                    .to_string()
                })
            });
            // A relative name is the snapshot's directory's: the same for the image above
            // unless a chain made by hand put it elsewhere.
            let name = m.header.backing_file.clone().map(|n| {
                if Path::new(&n).is_absolute() || layers[k].path.parent() == above.path.parent() {
                    n
                } else {
                    layers[k]
                        .path
                        .with_file_name(&n)
                        .to_string_lossy()
                        .into_owned()
                }
            });
            (name.zip(format), m.header.size, m.cluster_size())
        };
        let new_name = new_backing.as_ref().map(|(n, f)| (n.as_str(), f.as_str()));
        // A snapshot's file time says when it was taken (the lifecycle and `snapshot list`
        // read it): copies into one keep it.
        let taken_at = (k > 1)
            .then(|| {
                std::fs::metadata(&above.path)
                    .and_then(|m| m.modified())
                    .ok()
            })
            .flatten();
        let cluster = target.lock().cluster_size();
        if cluster != snap_cluster {
            return Err(err(
                StorageErrorKind::Unsupported,
                format!(
                    "the snapshot's clusters are {snap_cluster} bytes and the image above's \
                     {cluster}: deleting it is supported only where they match"
                ),
            ));
        }
        // Whether the header can name the new backing file is found out before copying.
        let header_naming = |m: &super::meta::Meta| -> Result<Vec<u8>, StorageError> {
            let mut first = vec![0u8; cluster as usize];
            super::read_clamped(&target.file, &mut first, 0, cluster)
                .map_err(|e| io("reading the header", e))?;
            super::header::with_backing(&first, &m.header, new_name).map_err(|e| {
                io(
                    "naming the new backing file",
                    io::Error::other(e.to_string()),
                )
            })
        };
        header_naming(&target.lock())?;
        // The daemon's own node of a snapshot above reads its file as the copies grow it:
        // its queues must take requests that far.
        let reader_size = (k > 1).then(|| above.active.get().file.info().capacity.clone());
        let follow_growth = || {
            if let Some(r) = &reader_size {
                let grown = target.file.info().capacity.get();
                if r.get() < grown {
                    r.set(grown);
                }
            }
        };
        let size = snap_size.min(target.lock().header.size);
        let total = size.div_ceil(cluster);
        let copied = copy_up(&snap, &target, cluster, total, &mut |i| {
            follow_growth();
            progress(i, total)
        });
        follow_growth();
        if let Err(e) = copied {
            if k > 1 {
                // What was copied is kept consistent (not leaked) for the next try.
                let _ = target.lock().flush(&target.file);
            }
            return Err(match e {
                CopyError::Stopped => err(
                    StorageErrorKind::Cancelled,
                    format!("deleting snapshot {name:?}: stopped"),
                ),
                CopyError::Snapshot(e) => io_error(&layers[k].path, "reading the snapshot", e),
                CopyError::Above(e) => io("copying up", e),
            });
        }
        progress(total, total);
        // The copies reach the disk, then the header names the snapshot's backing file:
        // a crash before reads through the snapshot, after without it, the same data.
        {
            let mut m = target.lock();
            m.flush(&target.file)
                .map_err(|e| io("flushing the copies", e))?;
            let rewritten = header_naming(&m)?;
            target
                .file
                .write_at(&rewritten, 0)
                .and_then(|_| target.file.flush())
                .map_err(|e| io("naming the new backing file", e))?;
            m.header.backing_file = new_backing.as_ref().map(|(n, _)| n.clone());
            m.header.backing_format = new_backing.as_ref().map(|(_, f)| f.clone());
        }
        if let Some(t) = taken_at {
            if let Err(e) = std::fs::File::options()
                .write(true)
                .open(&above.path)
                .and_then(|f| f.set_modified(t))
            {
                log::warn!("{}: cannot keep its time: {e}", above.path.display());
            }
        }
        // From here the image above no longer names the snapshot on disk: the next start
        // would not see it. If what follows fails, its file goes (what is open here stays
        // readable, and a retry finds nothing more to copy).
        let reopen = || -> Result<PreparedDelete, StorageError> {
            let below = match &new_backing {
                Some((name, format)) => {
                    let path = if Path::new(name).is_absolute() {
                        PathBuf::from(name)
                    } else {
                        above.path.with_file_name(name)
                    };
                    Some(open_backing(
                        &path,
                        Some(format),
                        k,
                        self.keys.as_ref(),
                        snap.file.locking(),
                    )?)
                }
                None => None,
            };
            let mut prepared = PreparedDelete {
                above: k - 1,
                snapshot: layers[k].path.clone(),
                below,
                reopened: None,
                held: None,
                _under_way: None,
            };
            if k > 1 {
                let file = file_like(&snap.file, &above.path, true)?;
                let header = read_header(&file, &above.path, true)?;
                prepared.reopened = Some(open_shared(
                    file,
                    &above.path,
                    header,
                    true,
                    snap.l2_cache,
                    prepared.below.take(),
                    self.keys.as_ref(),
                )?);
            }
            Ok(prepared)
        };
        // (A refusal here is no longer "nothing done": the header above changed.)
        let mut prepared = reopen()
            .inspect_err(|_| {
                let _ = remove_snapshot_file(&layers[k].path);
            })
            .map_err(|e| match e.kind() {
                StorageErrorKind::InUse => StorageError::new(StorageErrorKind::Io, e.to_string()),
                _ => e,
            })?;
        prepared.held = Some(snapshot_held);
        prepared._under_way = Some(under_way);
        Ok(prepared)
    }

    /// Takes a streamed snapshot out of the chain in memory; the caller has stopped the
    /// queues (nothing in flight), which follow at their next request. The snapshot's
    /// file is left for [`PreparedDelete::remove_file`] once the queues go on.
    pub fn commit_delete(&self, p: &mut PreparedDelete) -> Result<PathBuf, StorageError> {
        let layers = self.layers();
        let above = match (layers.get(p.above), layers.get(p.above + 1)) {
            (Some(above), Some(snap)) if snap.path == p.snapshot => above,
            _ => {
                return Err(err(
                    StorageErrorKind::Io,
                    "the chain changed while the snapshot was deleted",
                ))
            }
        };
        let new = match p.reopened.take() {
            Some(shared) => shared,
            None => {
                // The top: what the guest wrote meanwhile reaches the disk, then the image
                // is read again as it is there, over the chain below the snapshot.
                let old = self.active.get();
                let io = |what: &str, e: io::Error| io_error(&above.path, what, e);
                old.flush().map_err(|e| io("flushing", e))?;
                let file = file_like(&old.file, &above.path, false)?;
                if file.info().identity != old.file.info().identity {
                    return Err(io(
                        "reopening",
                        io::Error::other("the image's name no longer leads to the image served"),
                    ));
                }
                let header = read_header(&file, &above.path, false)?;
                let shared = open_shared(
                    file,
                    &above.path,
                    header,
                    false,
                    old.l2_cache,
                    p.below.take(),
                    self.keys.as_ref(),
                )?;
                old.lock().freeze();
                shared
            }
        };
        // The image above and everything below the snapshot were opened afresh: the old
        // ones may live on in queues until their next request, and must not keep their
        // lock bytes (the writer's on the top would stay on a snapshot taken later;
        // readers' would look like another reader to a later delete). The snapshot keeps
        // the writer's bytes it took until its file goes.
        let old_above = above.active.get();
        old_above.file.release_lock();
        if let Some(AnyDisk::Qcow2(snap)) = &old_above.backing {
            release_below(&snap.active.get());
        }
        *above
            .active
            .shared
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        // (Nothing watches a lower image's own generation today; it stays true all the same.)
        above.active.generation.fetch_add(1, Ordering::Release);
        // The top's queues hold the whole chain (see `queue`): a change anywhere in it
        // moves the top's generation, so they rebuild it.
        if p.above > 0 {
            self.active.generation.fetch_add(1, Ordering::Release);
        }
        Ok(p.snapshot.clone())
    }

    /// Puts the disk back as it was at snapshot `name`: a new, empty image over the
    /// snapshot takes the disk's name, and the images that were above the snapshot (newer
    /// snapshots, and the image the guest wrote since) are removed. The caller has made
    /// sure no frontend is connected and stopped the queues. Returns the files removed.
    /// When the directory cannot be synced after the new image took the disk's name, the
    /// disk is reverted but the newer snapshots stay (out of the chain): an I/O error says
    /// so, naming them.
    pub fn revert_to_snapshot(&self, name: &str) -> Result<Vec<PathBuf>, StorageError> {
        let (layers, k) = self.find_snapshot(name)?;
        let top = self.active.get();
        let path = layers[0].path.clone();
        let io = |what: &str, e: io::Error| io_error(&path, what, e);
        still_named(&path, &top.file)?;
        // The newer snapshots go: held until then, refused while another program reads
        // one (a clone's backing file).
        let newer = layers[1..k]
            .iter()
            .map(|l| {
                WriteClaim::claim(
                    l.active.get(),
                    &l.path,
                    "a newer snapshot the revert removes",
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The new image copies the LUKS header whole: no keyslot change meanwhile.
        let _no_key_change = self.no_keyslot_change();
        let (size, cluster_size) = {
            let m = top.lock();
            (m.header.size, m.cluster_size())
        };
        let snapshot = &layers[k].path;
        let snapshot_name = snapshot
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.revert"));
        let _ = std::fs::remove_file(&tmp);
        // Encrypted as the disk was, with the same key.
        let encryption =
            super::LuksHeader::of(&top).map_err(|e| io("reading the encryption header", e))?;
        let made = create_file(
            &tmp,
            &CreateOptions {
                size,
                cluster_size,
                backing: Some((snapshot_name, "qcow2".into())),
                encryption,
            },
        )?;
        let cleanup = |e: StorageError| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        {
            use std::os::unix::fs::MetadataExt;
            let was = std::fs::metadata(&path).map_err(|e| cleanup(io("stat", e)))?;
            made.set_permissions(was.permissions())
                .map_err(|e| cleanup(io("setting the new image's mode", e)))?;
            let _ = std::os::unix::fs::fchown(&made, Some(was.uid()), Some(was.gid()));
        }
        use std::os::fd::AsRawFd;
        let by_fd = PathBuf::from(format!("/proc/self/fd/{}", made.as_raw_fd()));
        let opened = (|| {
            let file = file_like(&top.file, &by_fd, false)?;
            let header = read_header(&file, &by_fd, false)?;
            let below = open_backing(
                snapshot,
                Some("qcow2"),
                1,
                self.keys.as_ref(),
                top.file.locking(),
            )?;
            open_shared(
                file,
                &path,
                header,
                false,
                top.l2_cache,
                Some(below),
                self.keys.as_ref(),
            )
        })()
        .map_err(cleanup)?;
        drop(made);
        top.lock()
            .flush(&top.file)
            .map_err(|e| cleanup(io("flushing", e)))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| cleanup(io("putting the new image in place", e)))?;
        *self
            .active
            .shared
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(opened);
        self.active.generation.fetch_add(1, Ordering::Release);
        top.lock().freeze();
        // Replaced, with the snapshot and the chain below it opened afresh: their locks go
        // now, not when the queues next move on. The newer snapshots keep the writer's
        // bytes until their files go, just below.
        top.file.release_lock();
        release_chain(&layers[k].active.get());
        if let Err(e) = sync_dir(&path) {
            // The image as it was reads through the newer snapshots: they stay until the
            // rename is known to be durable, whatever a power cut brings back.
            for held in newer {
                held.end(Fate::OutOfChain);
            }
            let kept: Vec<_> = layers[1..k]
                .iter()
                .map(|l| l.path.display().to_string())
                .collect();
            let e = io_error(
                &path,
                &format!(
                    "reverted, but syncing its directory failed, so a power cut could bring \
                     back the image as it was: the newer snapshots it reads through are kept, \
                     out of the chain ({}); remove them once the directory syncs",
                    kept.join(", ")
                ),
                e,
            );
            // The daemon's log says the disk changed, whoever reads the answer.
            log::error!("{e}");
            return Err(e);
        }
        // The newer snapshots go (their data is no longer the disk's past).
        let mut removed = vec![];
        for (l, held) in layers[1..k].iter().zip(newer) {
            let removal = std::fs::remove_file(&l.path);
            match &removal {
                Ok(()) => removed.push(l.path.clone()),
                Err(e) => log::warn!("{}: not removed after the revert: {e}", l.path.display()),
            }
            held.end(if removal.is_ok() {
                Fate::Removed
            } else {
                Fate::OutOfChain
            });
        }
        let _ = sync_dir(&path);
        Ok(removed)
    }
}

/// Why copying up stopped.
enum CopyError {
    Stopped,
    Snapshot(io::Error),
    Above(io::Error),
}

/// Copies up, cluster by cluster (`total` of `cluster` bytes, the same size in both), what
/// `snap` holds itself and `above` does not; `next(i)` before cluster `i`, false to stop.
/// Each cluster is looked at and copied under `above`'s metadata lock, so a cluster the
/// guest wrote there meanwhile is never overtaken.
fn copy_up(
    snap: &Shared,
    above: &Shared,
    cluster: u64,
    total: u64,
    next: &mut dyn FnMut(u64) -> bool,
) -> Result<(), CopyError> {
    for i in 0..total {
        if !next(i) {
            return Err(CopyError::Stopped);
        }
        let at = i * cluster;
        let theirs = snap
            .lock()
            .lookup(&snap.file, at)
            .map_err(CopyError::Snapshot)?;
        if theirs == Mapping::Unallocated {
            continue;
        }
        let mut m = above.lock();
        if m.lookup(&above.file, at).map_err(CopyError::Above)? != Mapping::Unallocated {
            // Written above since the snapshot: what the image above reads already.
            continue;
        }
        let done =
            theirs == Mapping::Zero && m.zero_cluster(&above.file, at).map_err(CopyError::Above)?;
        if !done {
            m.writable_cluster(&above.file, at, above.crypt.as_deref(), &mut |_, buf| {
                super::queue::read_sync(snap, buf, at)?;
                Ok(true)
            })
            .map_err(CopyError::Above)?;
        }
    }
    Ok(())
}

/// Removes a deleted snapshot's file (no longer in the chain) and makes that durable.
pub fn remove_snapshot_file(file: &Path) -> io::Result<()> {
    std::fs::remove_file(file)?;
    sync_dir(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::lock::conflicting_use;
    use crate::disk::RawDisk;
    use crate::engine::EngineKind;
    use crate::qcow2::{create, Backing, CreateOptions};

    /// Whether another program could open `path` to read it now.
    fn readable_by_others(path: &Path) -> bool {
        conflicting_use(path, true).unwrap().is_none()
    }

    /// Two claims on one snapshot (a revert's on a newer snapshot a keyslot change holds):
    /// the first to end leaves the image held for writing; the last gives it back to
    /// readers, or keeps it from them when the other claim saw its file removed.
    #[test]
    fn claims_on_one_image_nest() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let opts = CreateOptions {
            size: 1 << 20,
            cluster_size: 65536,
            backing: None,
            encryption: None,
        };
        create(&image, &opts).unwrap();
        let file = RawDisk::open(&image, false, false, EngineKind::Sync).unwrap();
        let disk = Qcow2Disk::open(
            AnyDisk::Raw(file),
            &image,
            false,
            &Backing::FromImage,
            1 << 20,
            0,
            None,
        )
        .unwrap();
        let snap = disk
            .commit_snapshot(disk.prepare_snapshot("s1").unwrap())
            .unwrap();
        let shared = disk.layers()[1].active.get();
        assert!(readable_by_others(&snap), "a snapshot is open to readers");
        let claim = |what| WriteClaim::claim(shared.clone(), &snap, what).unwrap();
        let (first, second) = (claim("a revert"), claim("a keyslot change"));
        drop(first);
        assert!(
            !readable_by_others(&snap),
            "the second claim still holds it"
        );
        drop(second);
        assert!(readable_by_others(&snap), "the last claim gave it back");
        let (revert, change) = (claim("a revert"), claim("a keyslot change"));
        revert.end(Fate::Removed);
        drop(change);
        assert!(
            !readable_by_others(&snap),
            "a removed file keeps the writer's bytes whichever claim ends last"
        );
    }
}
