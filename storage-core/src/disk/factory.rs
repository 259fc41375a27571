//! The one way to open a disk: validate the spec, pick the engine (probing io_uring once per
//! process), open the format.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::OnceLock;

use crate::engine::{Completion, EngineKind};
use crate::error::{StorageError, StorageErrorKind};

use super::{
    Disk, DiskInfo, DiskOp, DiskQueue, DiskSource, DiskSpec, NullDisk, NullQueue, RawDisk,
    RawQueue, StartError,
};

/// Whether io_uring works here, asked once; the fallback is logged once.
fn io_uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match crate::engine::probe_io_uring() {
        Ok(()) => true,
        Err(e) => {
            log::warn!("io_uring is unavailable ({e}); using the synchronous I/O engine");
            false
        }
    })
}

/// Opens the disk a spec describes.
pub fn open_disk(spec: &DiskSpec) -> Result<AnyDisk, StorageError> {
    let engine = match spec.engine {
        Some(EngineKind::Sync) => EngineKind::Sync,
        Some(EngineKind::IoUring) => {
            if !io_uring_available() {
                return Err(StorageError::new(
                    StorageErrorKind::Engine,
                    "engine=io_uring was requested but io_uring is unavailable",
                ));
            }
            EngineKind::IoUring
        }
        None if io_uring_available() => EngineKind::IoUring,
        None => EngineKind::Sync,
    };
    match &spec.source {
        DiskSource::Null { size } => Ok(AnyDisk::Null(NullDisk::new(*size, spec.read_only))),
        DiskSource::File(path) => {
            RawDisk::open(path, spec.read_only, spec.direct, engine).map(AnyDisk::Raw)
        }
    }
}

/// Any disk format; a `match` picks the implementation (static dispatch on the hot path).
pub enum AnyDisk {
    Raw(RawDisk),
    Null(NullDisk),
}

/// The queue of any disk format.
// One per worker, created once and never moved on the hot path: boxing the large variant
// would only add a pointer chase per request.
#[allow(clippy::large_enum_variant)]
pub enum AnyQueue {
    Raw(RawQueue),
    Null(NullQueue),
}

impl Disk for AnyDisk {
    type Queue = AnyQueue;

    fn info(&self) -> &DiskInfo {
        match self {
            AnyDisk::Raw(d) => d.info(),
            AnyDisk::Null(d) => d.info(),
        }
    }

    fn new_queue(&self, depth: u32) -> Result<AnyQueue, StorageError> {
        Ok(match self {
            AnyDisk::Raw(d) => AnyQueue::Raw(d.new_queue(depth)?),
            AnyDisk::Null(d) => AnyQueue::Null(d.new_queue(depth)?),
        })
    }

    fn flush(&self) -> io::Result<()> {
        match self {
            AnyDisk::Raw(d) => d.flush(),
            AnyDisk::Null(d) => d.flush(),
        }
    }
}

macro_rules! dispatch {
    ($self:expr, $q:ident => $body:expr) => {
        match $self {
            AnyQueue::Raw($q) => $body,
            AnyQueue::Null($q) => $body,
        }
    };
}

impl DiskQueue for AnyQueue {
    #[inline]
    unsafe fn start(&mut self, op: DiskOp<'_>, tag: u64) -> Result<(), StartError> {
        // SAFETY: the caller upholds `start`'s contract, shared by every format.
        dispatch!(self, q => unsafe { q.start(op, tag) })
    }
    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        dispatch!(self, q => q.submit())
    }
    #[inline]
    fn pop_completion(&mut self) -> Option<Completion> {
        dispatch!(self, q => q.pop_completion())
    }
    fn wait(&mut self) -> io::Result<()> {
        dispatch!(self, q => q.wait())
    }
    fn completion_fd(&self) -> Option<RawFd> {
        dispatch!(self, q => q.completion_fd())
    }
    fn ack_completion_fd(&self) {
        dispatch!(self, q => q.ack_completion_fd())
    }
    #[inline]
    fn in_flight(&self) -> usize {
        dispatch!(self, q => q.in_flight())
    }
}
