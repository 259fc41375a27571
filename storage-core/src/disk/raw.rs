//! The raw format: guest offsets map one-to-one onto a host file or block device.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use crate::engine::{
    new_engine, new_engine_notifying, AnyEngine, EngineKind, EngineOp, FileId, IoEngine,
};
use crate::error::{StorageError, StorageErrorKind};

use super::lock::{LockedFile, Locking};
use super::{
    checked, Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, IoVecs, Rejected, StartError,
};

/// A raw image or block device.
pub struct RawDisk {
    file: Arc<LockedFile>,
    info: DiskInfo,
    /// The first failed flush's error, shared by every queue: once a sync has failed, what
    /// it covered may be lost and the kernel will not say so again (it reports a writeback
    /// error once), so every later flush fails with it, as QEMU's file-posix does.
    flush_error: Arc<AtomicI32>,
    /// Tests only: the queues' engines inject these faults.
    #[cfg(test)]
    faults: Option<Arc<crate::engine::faulty::Faults>>,
}

impl RawDisk {
    /// Opens `path` (O_DIRECT when `direct`), read-only when `read_only`, refused if
    /// another program uses the image in a way that conflicts ([`super::lock`]).
    pub fn open(
        path: &Path,
        read_only: bool,
        direct: bool,
        engine: EngineKind,
    ) -> Result<Self, StorageError> {
        Self::open_locking(path, read_only, direct, engine, Locking::On)
    }

    /// As [`open`](Self::open), with the image's lock bytes treated as `locking` says.
    pub fn open_locking(
        path: &Path,
        read_only: bool,
        direct: bool,
        engine: EngineKind,
        locking: Locking,
    ) -> Result<Self, StorageError> {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        let file =
            super::open_noatime(OpenOptions::new().read(true).write(!read_only), flags, path)
                .map_err(|e| {
                    StorageError::new(StorageErrorKind::Open, "cannot open disk image")
                        .with_path(path)
                        .with_source(e)
                })?;
        let meta = file.metadata().map_err(|e| {
            StorageError::new(StorageErrorKind::Open, "cannot stat disk image")
                .with_path(path)
                .with_source(e)
        })?;
        let lock = super::lock::ImageLock::take(&file, path, read_only, locking)?;
        let capacity = super::device_size(&file, &meta).map_err(|e| {
            StorageError::new(StorageErrorKind::InvalidImage, "cannot use as a disk")
                .with_path(path)
                .with_source(e)
        })?;
        // Whole sectors only: a trailing partial sector is not addressable by virtio-blk.
        let capacity = capacity & !511;
        if capacity == 0 {
            return Err(StorageError::new(
                StorageErrorKind::InvalidImage,
                "image is empty (smaller than one 512-byte sector)",
            )
            .with_path(path));
        }
        Ok(RawDisk {
            flush_error: Arc::default(),
            #[cfg(test)]
            faults: None,
            file: Arc::new(LockedFile::new(file, lock)),
            info: DiskInfo {
                capacity: super::Size::new(capacity),
                read_only,
                direct,
                format: "raw",
                path: path.display().to_string(),
                engine,
                discard: !read_only,
                identity: {
                    use std::os::unix::fs::MetadataExt;
                    (meta.dev(), meta.ino())
                },
            },
        })
    }

    /// Whether the image's lock bytes are held (not `locking=off`).
    pub(crate) fn locks_image(&self) -> bool {
        self.file.lock().is_some()
    }

    /// The image is read-only from now on (it became a snapshot): keep only a reader's
    /// lock bytes, so that others may read it too.
    pub(crate) fn hold_read_only(&self) {
        if let Err(e) = self.file.downgrade_to_read_only() {
            log::warn!("{}: downgrading the image's lock: {e}", self.info.path);
        }
    }

    /// The image, at `path` now (a snapshot renamed it since it opened), is to be written
    /// for a while though it is read-only (a snapshot being deleted, its LUKS keyslots
    /// changing): refused while another open reads it ([`ImageLock::upgrade_to_writer`]);
    /// [`hold_read_only`](Self::hold_read_only) ends it.
    ///
    /// [`ImageLock::upgrade_to_writer`]: super::lock::ImageLock::upgrade_to_writer
    pub(crate) fn hold_for_writing(&self, path: &Path) -> Result<(), StorageError> {
        match self.file.lock() {
            Some(lock) => lock.upgrade_to_writer(path),
            None => Ok(()),
        }
    }

    /// Lets go of the image's lock bytes now, whoever still holds the file.
    pub(crate) fn release_lock(&self) {
        if let Err(e) = self.file.release() {
            log::warn!("{}: releasing the image's lock: {e}", self.info.path);
        }
    }

    /// Tests only: every queue and control-plane call goes through `faults` (as the
    /// capacity device).
    #[cfg(test)]
    pub(crate) fn set_faults(&mut self, faults: Arc<crate::engine::faulty::Faults>) {
        self.faults = Some(faults);
    }

    /// Tests only: `other`'s faults, if it has any, apply to this file too (a node that
    /// opens its file again keeps being recorded).
    #[cfg(test)]
    pub(crate) fn inherit_faults(&mut self, other: &crate::disk::AnyDisk) {
        if let crate::disk::AnyDisk::Raw(r) = other {
            self.faults = r.faults.clone();
        }
    }

    #[cfg(test)]
    fn injected(&self, op: crate::engine::faulty::OpKind) -> io::Result<()> {
        use crate::engine::faulty::Device;
        match self
            .faults
            .as_ref()
            .and_then(|f| f.injected(Device::Capacity, op))
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How much a preallocating resize writes (or reserves) between progress reports.
const PREALLOCATE_CHUNK: u64 = 4 << 20;

impl RawDisk {
    /// The checks every resize passes; the file's length now.
    fn check_resize(&self, bytes: u64) -> Result<u64, StorageError> {
        let path = &self.info.path;
        if self.info.read_only {
            return Err(StorageError::new(
                StorageErrorKind::InvalidArgument,
                "a read-only disk cannot be resized",
            )
            .with_path(path));
        }
        let meta = self.file.metadata().map_err(|e| {
            StorageError::new(StorageErrorKind::Io, "cannot stat disk image")
                .with_path(path)
                .with_source(e)
        })?;
        if !meta.is_file() {
            return Err(StorageError::new(
                StorageErrorKind::Unsupported,
                "a block device's size is the device's own: grow the device instead",
            )
            .with_path(path));
        }
        // Against the file's own length too: a trailing partial sector (not part of the
        // disk) must not be cut off by a "grow" to the disk's size.
        super::check_growth(self.info.capacity.get().max(meta.len()), bytes)?;
        Ok(meta.len())
    }

    fn grow_error(&self, e: io::Error) -> StorageError {
        StorageError::new(StorageErrorKind::Io, "cannot grow disk image")
            .with_path(&self.info.path)
            .with_source(e)
    }

    fn queue(&self, engine: AnyEngine, fid: FileId, depth: u32) -> RawQueue {
        RawQueue {
            engine,
            fid,
            file: self.file.clone(),
            capacity: self.info.capacity.clone(),
            slots: (0..depth.max(1)).map(|_| InFlight::default()).collect(),
            free: (0..depth.max(1)).rev().collect(),
            flush_error: self.flush_error.clone(),
        }
    }
}

impl Disk for RawDisk {
    type Queue = RawQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<RawQueue, StorageError> {
        self.make_queue(depth, None)
    }

    fn new_queue_sharing(&self, depth: u32, eventfd: RawFd) -> Result<RawQueue, StorageError> {
        self.make_queue(depth, Some(eventfd))
    }

    fn flush(&self) -> io::Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        let sticky = self.flush_error.load(Ordering::Relaxed);
        if sticky != 0 {
            return Err(io::Error::from_raw_os_error(-sticky));
        }
        #[cfg(test)]
        let started = {
            self.injected(crate::engine::faulty::OpKind::Sync)
                .inspect_err(|e| self.remember_flush_error(e))?;
            self.faults.as_ref().map(|f| f.sync_started())
        };
        self.file
            .sync_data()
            .inspect_err(|e| self.remember_flush_error(e))?;
        #[cfg(test)]
        if let (Some(f), Some(started)) = (&self.faults, started) {
            f.record_sync(crate::engine::faulty::Device::Capacity, started);
        }
        Ok(())
    }

    /// Lets go of the image's lock bytes: the next program may open it as soon as the
    /// daemon has drained and flushed, not only once every descriptor has closed.
    fn close(&self) {
        self.release_lock();
    }

    fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        self.check_resize(bytes)?;
        // The file grows and its new size is durable before any request may use the
        // space: a power cut after the guest is told leaves a file of the size it saw.
        let grow = self.file.set_len(bytes).and_then(|()| self.file.sync_all());
        grow.map_err(|e| self.grow_error(e))?;
        self.info.capacity.set(bytes);
        Ok(())
    }

    fn resize_preallocated(
        &self,
        bytes: u64,
        mode: super::Preallocation,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<(), StorageError> {
        let old = self.check_resize(bytes)?;
        let total = bytes - old;
        // Queues still see the old size: nobody reads or writes the space being allocated.
        let result = (|| {
            // Zeroes go through a buffered descriptor of the same file: the disk's own may
            // be O_DIRECT, which wants aligned buffers and offsets.
            let buffered = std::fs::OpenOptions::new()
                .write(true)
                .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                .map_err(|e| self.grow_error(e))?;
            let zeroes = vec![0u8; PREALLOCATE_CHUNK as usize];
            let mut done = 0;
            while done < total {
                let n = PREALLOCATE_CHUNK.min(total - done);
                let at = old + done;
                match mode {
                    super::Preallocation::Full => {
                        use std::os::unix::fs::FileExt;
                        buffered.write_all_at(&zeroes[..n as usize], at)
                    }
                    // KEEP_SIZE: the file's length (the disk's size after a restart) changes
                    // only at the end, once everything is allocated.
                    // SAFETY: fallocate on our open descriptor with plain integers.
                    super::Preallocation::Falloc => match unsafe {
                        libc::fallocate(
                            self.file.as_raw_fd(),
                            libc::FALLOC_FL_KEEP_SIZE,
                            at as i64,
                            n as i64,
                        )
                    } {
                        0 => Ok(()),
                        _ => Err(io::Error::last_os_error()),
                    },
                }
                .map_err(|e| self.grow_error(e))?;
                done += n;
                if !progress(done, total) {
                    return Err(StorageError::new(
                        StorageErrorKind::Cancelled,
                        "preallocation cancelled: the disk keeps its size",
                    )
                    .with_path(&self.info.path));
                }
            }
            self.file.set_len(bytes).map_err(|e| self.grow_error(e))?;
            self.file.sync_all().map_err(|e| self.grow_error(e))
        })();
        if let Err(e) = result {
            // Undo: the disk keeps its old size (the guest never saw the new one).
            if let Err(undo) = self.file.set_len(old).and_then(|()| self.file.sync_all()) {
                log::error!(
                    "{}: cannot cut the file back to {old} bytes: {undo}",
                    self.info.path
                );
            }
            return Err(e);
        }
        self.info.capacity.set(bytes);
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        #[cfg(test)]
        self.injected(crate::engine::faulty::OpKind::Read)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.info.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        #[cfg(test)]
        {
            self.injected(crate::engine::faulty::OpKind::Write)?;
            if let Some(f) = &self.faults {
                f.record_write(crate::engine::faulty::Device::Capacity, offset, buf);
            }
        }
        self.file.write_all_at(buf, offset)
    }
}

impl RawDisk {
    fn remember_flush_error(&self, e: &io::Error) {
        let errno = e.raw_os_error().unwrap_or(libc::EIO);
        let _ = self
            .flush_error
            .compare_exchange(0, -errno, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn make_queue(&self, depth: u32, eventfd: Option<RawFd>) -> Result<RawQueue, StorageError> {
        #[cfg(test)]
        if let Some(faults) = &self.faults {
            use crate::engine::faulty::{Device, FaultyEngine};
            let mut engine =
                AnyEngine::Faulty(FaultyEngine::new(depth, Device::Capacity, faults.clone()));
            let fid = engine
                .register_file(self.file.as_raw_fd())
                .expect("register");
            return Ok(self.queue(engine, fid, depth));
        }
        let engine = match eventfd {
            Some(fd) => new_engine_notifying(self.info.engine, depth, fd),
            None => new_engine(self.info.engine, depth),
        };
        let mut engine = engine.map_err(|e| {
            StorageError::new(StorageErrorKind::Engine, "cannot create I/O engine")
                .with_path(&self.info.path)
                .with_source(e)
        })?;
        let fid = engine.register_file(self.file.as_raw_fd()).map_err(|e| {
            StorageError::new(StorageErrorKind::Engine, "cannot register file with engine")
                .with_path(&self.info.path)
                .with_source(e)
        })?;
        Ok(self.queue(engine, fid, depth))
    }
}

#[derive(Debug, Clone, Copy)]
enum SpecialKind {
    Discard,
    ZeroRange,
    Flush,
}

/// What an in-flight operation needs when it completes: the caller's tag, the buffers to
/// give back, and for operations whose failure needs interpreting, what they were: discards
/// are hints, a filesystem without FALLOC_FL_ZERO_RANGE (tmpfs) gets zeroes written
/// instead, and a flush's failure is remembered for every later flush.
#[derive(Default)]
struct InFlight {
    tag: u64,
    buffers: Option<IoVecs>,
    special: Option<(SpecialKind, u64, u64)>,
}

/// One worker's queue on a raw disk.
pub struct RawQueue {
    engine: AnyEngine,
    fid: FileId,
    /// Keeps the descriptor open while the engine uses it.
    file: Arc<LockedFile>,
    capacity: super::Size,
    /// Operations in flight, by the engine's user data; `free` lists the unused entries.
    /// The buffers held here keep the memory the engine reads or writes alive until the
    /// completion is popped (and until the kernel is done with them when the queue is
    /// dropped: see `Drop`).
    slots: Box<[InFlight]>,
    free: Vec<u32>,
    flush_error: Arc<AtomicI32>,
}

// 64 KiB of zeroes, aligned for O_DIRECT, for the rare write-zeroes fallback.
#[repr(C, align(4096))]
struct ZeroBuf([u8; 65536]);
static ZEROES: ZeroBuf = ZeroBuf([0; 65536]);

impl RawQueue {
    /// Writes zeroes with plain pwrite: the fallback when the filesystem lacks ZERO_RANGE.
    /// Synchronous on purpose: it is rare, and correctness beats speed here.
    fn write_zeroes_sync(&self, mut offset: u64, len: u64) -> i32 {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES.0.len() as u64) as usize;
            // SAFETY: ZEROES is a static buffer of at least `n` bytes; pwrite only reads it.
            let ret = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    ZEROES.0.as_ptr().cast(),
                    n,
                    offset as libc::off_t,
                )
            };
            if ret < 0 {
                return -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO);
            }
            if ret == 0 {
                return -libc::EIO;
            }
            offset += ret as u64;
        }
        0
    }
}

impl Drop for RawQueue {
    fn drop(&mut self) {
        // The buffers in `slots` must outlive the kernel's use of them.
        if let Err(e) = crate::engine::wait_for_kernel(&mut self.engine) {
            log::error!("raw disk: cannot wait for I/O in flight ({e}); its buffers are leaked");
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

impl DiskQueue for RawQueue {
    #[inline]
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        let op = checked(op, self.capacity.get())?;
        let Some(&index) = self.free.last() else {
            return Err(Rejected::new(StartError::Busy, op));
        };
        let fid = self.fid;
        let (engine_op, special) = match &op {
            DiskOp::Read { offset, buffers } => (
                EngineOp::Readv {
                    file: fid,
                    offset: *offset,
                    iov: buffers.as_slice().as_ptr(),
                    iovcnt: buffers.count() as u32,
                },
                None,
            ),
            DiskOp::Write { offset, buffers } => (
                EngineOp::Writev {
                    file: fid,
                    offset: *offset,
                    iov: buffers.as_slice().as_ptr(),
                    iovcnt: buffers.count() as u32,
                },
                None,
            ),
            DiskOp::Flush => (
                EngineOp::Fdatasync { file: fid },
                Some((SpecialKind::Flush, 0, 0)),
            ),
            &DiskOp::Discard { offset, len } | &DiskOp::WriteZeroes { offset, len, .. } => {
                let (kind, mode) = match op {
                    DiskOp::WriteZeroes { unmap: false, .. } => (
                        SpecialKind::ZeroRange,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    ),
                    // Discard, and write-zeroes that may unmap: a punched hole reads as zeroes.
                    DiskOp::WriteZeroes { .. } => (
                        SpecialKind::ZeroRange,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    ),
                    _ => (
                        SpecialKind::Discard,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    ),
                };
                (
                    EngineOp::Fallocate {
                        file: fid,
                        mode,
                        offset,
                        len,
                    },
                    Some((kind, offset, len)),
                )
            }
        };
        // SAFETY: the iovecs and the memory they describe belong to the operation's
        // buffers, which are stored in `slots[index]` below before any completion can be
        // popped (only this queue pops them; the heap array of iovecs does not move when the
        // list does) and stay there, unchanged, until the completion is popped, or until
        // the kernel is done with them when the queue is dropped; their keep-alive keeps the
        // memory mapped meanwhile.
        if unsafe { self.engine.push(engine_op, u64::from(index)) }.is_err() {
            return Err(Rejected::new(StartError::Busy, op));
        }
        self.free.pop();
        self.slots[index as usize] = InFlight {
            tag,
            buffers: op.into_buffers(),
            special,
        };
        Ok(())
    }

    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        self.engine.submit()
    }

    #[inline]
    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        let c = self.engine.pop_completion()?;
        let index = c.user_data as u32;
        let slot = std::mem::take(&mut self.slots[index as usize]);
        self.free.push(index);
        let mut result = c.result;
        if let Some((kind, offset, len)) = slot.special {
            let unsupported = result == -libc::EOPNOTSUPP || result == -libc::ENOTSUP;
            match kind {
                // Discard is advisory (as in QEMU): unsupported means nothing to free.
                SpecialKind::Discard if unsupported => result = 0,
                SpecialKind::ZeroRange if unsupported => {
                    result = self.write_zeroes_sync(offset, len)
                }
                SpecialKind::Flush => {
                    if result < 0 {
                        let _ = self.flush_error.compare_exchange(
                            0,
                            result,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    let sticky = self.flush_error.load(Ordering::Relaxed);
                    if sticky != 0 {
                        result = sticky;
                    }
                }
                _ => {}
            }
        }
        Some(DiskCompletion {
            tag: slot.tag,
            result,
            buffers: slot.buffers,
        })
    }

    fn wait(&mut self) -> io::Result<()> {
        self.engine.wait()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    fn ack_completion_fd(&self) {
        self.engine.ack_completion_fd()
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::faulty::{Device, Fault, Faults, OpKind};

    fn run(q: &mut RawQueue, op: DiskOp) -> i32 {
        q.start(op, 7).unwrap();
        q.submit().unwrap();
        let c = q.pop_completion().expect("the engine completes inline");
        assert_eq!(c.tag, 7);
        c.result
    }

    /// A failed flush fails every later one, on every queue and on the control plane: the
    /// kernel reports a writeback error once, so a later sync that succeeds says nothing
    /// of the data the failed one lost.
    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let mut disk = RawDisk::open(f.path(), false, false, EngineKind::Sync).unwrap();
        let faults = Arc::new(Faults::default());
        disk.faults = Some(faults.clone());
        let mut q1 = disk.new_queue(4).unwrap();
        let mut q2 = disk.new_queue(4).unwrap();
        assert_eq!(run(&mut q1, DiskOp::Flush), 0);
        faults.add(
            Device::Capacity,
            OpKind::Sync,
            Fault::Error(libc::EIO),
            Some(1),
        );
        assert_eq!(run(&mut q1, DiskOp::Flush), -libc::EIO);
        assert_eq!(run(&mut q1, DiskOp::Flush), -libc::EIO, "a later flush");
        assert_eq!(run(&mut q2, DiskOp::Flush), -libc::EIO, "another queue");
        assert!(disk.flush().is_err(), "the control plane's flush");
    }
}
