//! Disks as graphs of block nodes, and the per-worker queues that daemons drive.
//!
//! Every node of a disk's graph implements [`Disk`]: its shared, control-plane handle
//! (capacity, flags, control-plane I/O and flush). Leaves own their I/O (`raw`: a file or
//! block device through the engine seam; `null`); filters and formats (the tier, the
//! throttle) own their children. Each queue worker asks the root for its own [`DiskQueue`],
//! which holds its children's queues in turn, so no lock is shared between workers on the
//! data path and one submit reaches every leaf. Nodes never reach below the engine: they
//! turn a [`DiskOp`] into engine operations or into operations on their children.
//!
//! The graph is described by a [`DiskSpec`] (the `--disk` shorthand, or named nodes as
//! qemu-storage-daemon's `--blockdev`: [`graph`]) and built by the one factory,
//! [`open_disk`].

mod factory;
pub mod graph;
pub mod lock;
mod null;
mod raw;
mod spec;
pub(crate) mod wakeup;

pub use factory::{engine_for_path, open_disk, AnyDisk, AnyQueue};
pub use null::{NullDisk, NullQueue};
pub use raw::{RawDisk, RawQueue};
pub use spec::{DiskSpec, KeySource, NodeSpec, RbdSpec, SpecError, ThrottleSpec};

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::engine::EngineKind;
use crate::error::{StorageError, StorageErrorKind};

/// A request against a disk, in bytes. Reads and writes carry their buffers, which the
/// queue owns until it hands them back with the request's completion.
#[derive(Debug)]
pub enum DiskOp {
    Read { offset: u64, buffers: IoVecs },
    Write { offset: u64, buffers: IoVecs },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

impl DiskOp {
    /// The byte range the operation touches, if any.
    #[inline]
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            DiskOp::Read { offset, buffers } | DiskOp::Write { offset, buffers } => {
                Some((*offset, buffers.len()))
            }
            DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                Some((*offset, *len))
            }
            DiskOp::Flush => None,
        }
    }

    /// Whether the operation changes the disk's contents.
    pub fn writes(&self) -> bool {
        !matches!(self, DiskOp::Read { .. } | DiskOp::Flush)
    }

    /// The operation's buffers, if it has any.
    #[inline]
    pub fn into_buffers(self) -> Option<IoVecs> {
        match self {
            DiskOp::Read { buffers, .. } | DiskOp::Write { buffers, .. } => Some(buffers),
            _ => None,
        }
    }
}

pub use crate::iov::{iov_len, IoVecs};

/// Why a request was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// No room in the engine now; try again after completions (back-pressure).
    #[error("queue full")]
    Busy,
    /// The byte range is not inside the disk.
    #[error("request outside the disk")]
    OutOfRange,
    /// A write to a read-only disk.
    #[error("disk is read-only")]
    ReadOnly,
    /// The tag is already in flight, or beyond the depth the queue was made with.
    #[error("request tag in use or beyond the queue's depth")]
    BadTag,
}

/// A request a queue did not start, given back whole (its buffers are the caller's again).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Rejected {
    pub error: StartError,
    pub op: DiskOp,
}

impl Rejected {
    pub fn new(error: StartError, op: DiskOp) -> Rejected {
        Rejected { error, op }
    }
}

/// A finished request: its tag, its result (bytes transferred, or a negated errno) and,
/// for a read or write, its buffers back.
#[derive(Debug)]
pub struct DiskCompletion {
    pub tag: u64,
    pub result: i32,
    pub buffers: Option<IoVecs>,
}

impl DiskCompletion {
    /// A completion without buffers (or whose buffers are dropped).
    pub fn bare(tag: u64, result: i32) -> DiskCompletion {
        DiskCompletion {
            tag,
            result,
            buffers: None,
        }
    }
}

/// A disk's size in bytes, shared by the disk, its queues and the nodes above that keep its
/// size (a throttle): a resize is seen by all of them at once.
#[derive(Debug, Clone, Default)]
pub struct Size(Arc<AtomicU64>);

impl Size {
    pub fn new(bytes: u64) -> Self {
        Size(Arc::new(AtomicU64::new(bytes)))
    }

    #[inline]
    pub fn get(&self) -> u64 {
        // Acquire: a request that sees the new size also sees the file grown to it.
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn set(&self, bytes: u64) {
        self.0.store(bytes, Ordering::Release);
    }
}

/// What a disk is, as reported to users and protocols.
#[derive(Debug, Clone)]
pub struct DiskInfo {
    /// Size in bytes, as it is now.
    pub capacity: Size,
    pub read_only: bool,
    /// Opened with O_DIRECT.
    pub direct: bool,
    /// Format name (`raw`, `null`).
    pub format: &'static str,
    /// Where the data lives, as given by the user.
    pub path: String,
    pub engine: EngineKind,
    /// Discard frees space (otherwise it is accepted and ignored).
    pub discard: bool,
    /// What names the storage underneath, for a cache that must not be used with other
    /// storage: (st_dev, st_ino) of a file; (0, 0) for a leaf without storage.
    pub identity: (u64, u64),
}

/// The control-plane handle of an open disk, shared by all workers.
pub trait Disk: Send + Sync {
    type Queue: DiskQueue;

    fn info(&self) -> &DiskInfo;

    /// A queue for one worker with room for `depth` requests in flight.
    fn new_queue(&self, depth: u32) -> Result<Self::Queue, StorageError>;

    /// Like [`new_queue`](Disk::new_queue), but a queue whose completions arrive
    /// asynchronously may signal them on `eventfd` (the parent's, which it keeps open) so
    /// that a parent and its child wake the worker through one fd. The queue's
    /// [`completion_fd`](DiskQueue::completion_fd) says which fd it signals.
    fn new_queue_sharing(&self, depth: u32, eventfd: RawFd) -> Result<Self::Queue, StorageError> {
        let _ = eventfd;
        self.new_queue(depth)
    }

    /// Makes everything written so far durable, outside the data path (shutdown, tests,
    /// a parent's background work).
    fn flush(&self) -> io::Result<()>;

    /// The daemon is exiting: release what other clients of the storage wait for (an RBD
    /// image's exclusive lock), after a last flush. Queues still open fail their requests
    /// afterwards; nothing else changes for nodes that hold nothing of the kind.
    fn close(&self) {}

    /// Grows the disk to `bytes` (a multiple of 512), durably, then lets its queues address
    /// the new space. Nodes whose size is not theirs to change say so.
    fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        let _ = bytes;
        Err(StorageError::new(
            StorageErrorKind::Unsupported,
            format!("a {} disk cannot be resized", self.info().format),
        ))
    }

    /// Like [`resize`](Disk::resize), allocating the new space first, as QEMU's
    /// `preallocation=` does (`Falloc`: the file system reserves it; `Full`: zeroes are
    /// written), so that the guest never meets a full host file system in it. Queues see
    /// the new size only once it is allocated and durable. `progress(done, total)` is
    /// called between chunks; when it returns false the file is cut back to its old size
    /// and the call fails with [`StorageErrorKind::Cancelled`].
    fn resize_preallocated(
        &self,
        bytes: u64,
        mode: Preallocation,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<(), StorageError> {
        let _ = (bytes, mode, progress);
        Err(StorageError::new(
            StorageErrorKind::Unsupported,
            format!("a {} disk cannot be preallocated", self.info().format),
        ))
    }

    /// Reads `buf.len()` bytes at `offset`, blocking, outside the data path: a parent's
    /// background work (the tier's write-back). Nodes that cannot serve it say so.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _ = (buf, offset);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("a {} node serves no control-plane I/O", self.info().format),
        ))
    }

    /// Writes all of `buf` at `offset`, blocking, outside the data path (see
    /// [`read_at`](Disk::read_at)).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let _ = (buf, offset);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("a {} node serves no control-plane I/O", self.info().format),
        ))
    }
}

/// One worker's view of a disk: start requests, submit them in a batch, reap completions.
pub trait DiskQueue: Send {
    /// Starts `op`; its completion will carry `tag` and, on success, the number of bytes
    /// transferred (0 for operations without data), and give the buffers back. A short read
    /// or write is reported as such; the caller continues it. A request not started comes
    /// back whole in the error. Tags are the caller's: below the depth the queue was made
    /// with, and not in flight (a queue that keeps per-request state by tag refuses others
    /// with [`StartError::BadTag`]).
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected>;

    /// Submits everything started since the last call.
    fn submit(&mut self) -> io::Result<()>;

    /// The next finished request, if any.
    fn pop_completion(&mut self) -> Option<DiskCompletion>;

    /// Blocks until a completion is ready or nothing is in flight.
    fn wait(&mut self) -> io::Result<()>;

    /// An fd that becomes readable when completions arrive asynchronously.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Clears the completion fd's readiness.
    fn ack_completion_fd(&self);

    /// The fds under [`completion_fd`](DiskQueue::completion_fd): a parent that watches
    /// them with its own fds joins these to its set rather than the child's set, so sets
    /// never nest (the kernel allows epoll sets only a few deep) however deep the graph.
    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.extend(self.completion_fd());
    }

    /// Requests started and not yet popped.
    fn in_flight(&self) -> usize;

    /// Of those, requests a node holds back on purpose (over a throttle's limit): the
    /// worker need not poll for them, a timer brings it back.
    fn held(&self) -> usize {
        0
    }
}

/// Syncs the directory holding `path`, so that a file made, renamed or removed there
/// outlives a power cut.
pub(crate) fn sync_parent_dir(path: &std::path::Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

// BLKGETSIZE64 = _IOR(0x12, 114, size_t)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Opens `path` with `opts` plus `flags` and O_NOATIME, or without O_NOATIME where that is
/// not permitted (it needs the file's owner or CAP_FOWNER).
///
/// Why: a daemon reads its images at random all day; their access times tell nobody
/// anything, and keeping them costs every buffered read a trip through touch_atime, about
/// 0.3 µs here, a fifth of a page-cached 4 KiB read.
pub(crate) fn open_noatime(
    opts: &std::fs::OpenOptions,
    flags: i32,
    path: &std::path::Path,
) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match opts
        .clone()
        .custom_flags(flags | libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            opts.clone().custom_flags(flags).open(path)
        }
        other => other,
    }
}

/// The size of a regular file or block device.
pub(crate) fn device_size(file: &std::fs::File, meta: &std::fs::Metadata) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::io::AsRawFd;
    let ft = meta.file_type();
    if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to `size`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else if ft.is_file() {
        Ok(meta.len())
    } else {
        Err(io::Error::other("not a regular file or block device"))
    }
}

/// How new space is allocated when a disk grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preallocation {
    /// fallocate: the file system reserves the blocks (fast, no data written).
    Falloc,
    /// Zeroes written into every new block.
    Full,
}

/// Checks that `bytes` is a size a disk of `current` bytes may grow to.
pub(crate) fn check_growth(current: u64, bytes: u64) -> Result<(), StorageError> {
    if !bytes.is_multiple_of(512) || bytes == 0 {
        return Err(StorageError::new(
            StorageErrorKind::InvalidArgument,
            format!("{bytes} bytes is not a whole number of 512-byte sectors"),
        ));
    }
    if bytes < current {
        return Err(StorageError::new(
            StorageErrorKind::InvalidArgument,
            format!(
                "{bytes} bytes is smaller than the disk ({current} bytes): shrinking would cut \
                 off data the guest may use, and is not supported"
            ),
        ));
    }
    Ok(())
}

/// Checks a request's range against the disk's size, and gives it back if it fits.
/// (Writes to a read-only disk are refused above the formats, by [`AnyQueue`].)
#[inline]
pub(crate) fn checked(op: DiskOp, capacity: u64) -> Result<DiskOp, Rejected> {
    if let Some((offset, len)) = op.range() {
        match offset.checked_add(len) {
            Some(end) if end <= capacity => {}
            _ => return Err(Rejected::new(StartError::OutOfRange, op)),
        }
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{FileExt, MetadataExt};

    /// Raw disks, capacity and cache devices all open their files through `open_noatime`.
    #[test]
    fn reads_leave_the_image_access_time_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&[7u8; 8192])
            .unwrap();
        // An access time older than the modification time: relatime would update it on the
        // next read.
        let old = libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: 0,
        };
        let times = [
            old,
            libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
        ];
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path and a two-element times array.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) };
        assert_eq!(rc, 0, "utimensat: {}", std::io::Error::last_os_error());
        let file = open_noatime(
            std::fs::OpenOptions::new().read(true).write(true),
            libc::O_CLOEXEC,
            &path,
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(file.read_at(&mut buf, 0).unwrap(), 4096);
        assert_eq!(buf, vec![7u8; 4096]);
        assert_eq!(std::fs::metadata(&path).unwrap().atime(), 1_000_000);
    }
}
