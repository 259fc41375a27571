//! The I/O engine seam: the only place where storage logic meets the kernel's I/O interfaces.
//!
//! An engine takes positioned operations on files it has registered, each tagged with a `u64`
//! of user data, and later hands back one completion per operation: the user data and the
//! kernel-style result (bytes transferred, or a negated errno). Submission is batched: callers
//! [`push`](IoEngine::push) any number of operations and then [`submit`](IoEngine::submit)
//! once, so an io_uring engine makes one `io_uring_enter` per batch.
//!
//! Back-pressure is explicit: an engine that has no room gives the operation back
//! ([`EngineFull`]) instead of blocking or allocating, and counts it.
//!
//! Two implementations: [`UringEngine`] (the data path) and [`SyncEngine`] (fallback where
//! io_uring is unavailable, and the reference the property tests compare against).

#[cfg(test)]
pub(crate) mod faulty;
mod sync;
mod uring;

pub use sync::SyncEngine;
pub use uring::UringEngine;

use std::io;
use std::os::unix::io::RawFd;

/// The file an operation targets: one registered with the engine (an index into its
/// fixed-file table: cheapest, for the few long-lived files of a disk), or a plain
/// descriptor (for the many short-lived files of a shared directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId(pub(crate) FileRepr);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileRepr {
    Fixed(u32),
    Fd(RawFd),
}

impl FileId {
    /// A plain descriptor, not registered. The caller keeps it open until every operation
    /// on it has completed.
    pub fn from_fd(fd: RawFd) -> Self {
        FileId(FileRepr::Fd(fd))
    }
}

/// One positioned operation. Buffers are described by raw iovecs because they usually live
/// in guest memory that the engine must use in place.
#[derive(Debug, Clone, Copy)]
pub enum EngineOp {
    /// `preadv` into `iovcnt` iovecs at `iov`.
    Readv {
        file: FileId,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// `pwritev` from `iovcnt` iovecs at `iov`.
    Writev {
        file: FileId,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// `fdatasync`: the data written before it, and the metadata needed to read it, are durable.
    Fdatasync { file: FileId },
    /// `fallocate` with `mode` (`FALLOC_FL_*`).
    Fallocate {
        file: FileId,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

/// A finished operation: the caller's user data and the result (`>= 0` bytes or `-errno`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
}

/// The engine had no room for the operation; it was not queued. Retry after completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("I/O engine queue is full")]
pub struct EngineFull;

/// Which engine implementation a disk runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Sync,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
        }
    }
}

/// The seam between formats and the kernel. One engine serves one queue worker; it is moved
/// to that worker's thread and never shared.
pub trait IoEngine: Send {
    /// Registers a file for use in operations; returns its id.
    fn register_file(&mut self, fd: RawFd) -> io::Result<FileId>;

    /// Queues `op` without submitting it.
    ///
    /// # Safety
    ///
    /// For `Readv`/`Writev`, the iovec array must stay valid until the next
    /// [`submit`](IoEngine::submit) returns, and every buffer it describes must stay valid
    /// (and, for reads, not be accessed by anyone else) until this operation's completion has
    /// been returned by [`pop_completion`](IoEngine::pop_completion).
    unsafe fn push(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull>;

    /// Submits everything queued since the last call, in one system call where possible.
    fn submit(&mut self) -> io::Result<()>;

    /// Returns the next finished operation, if any, without blocking.
    fn pop_completion(&mut self) -> Option<Completion>;

    /// Blocks until at least one completion is ready (or nothing is in flight).
    fn wait(&mut self) -> io::Result<()>;

    /// An eventfd that becomes readable when completions arrive asynchronously, for the
    /// worker's event loop to wait on. Engines that complete inline have none.
    fn completion_fd(&self) -> Option<RawFd>;

    /// Clears the completion fd's readiness (reads the eventfd).
    fn ack_completion_fd(&self);

    /// Operations pushed whose completions have not yet been popped.
    fn in_flight(&self) -> usize;

    /// Which implementation this is.
    fn kind(&self) -> EngineKind;
}

/// Waits until the kernel is done with every operation pushed on `engine`, discarding
/// their completions: for a queue being dropped, before it frees the buffers those
/// operations use (closing a ring does not wait for them). The synchronous engines finish
/// their operations inside `push`, so there is nothing to wait for. An error means the
/// caller must leak the buffers rather than free them.
pub fn wait_for_kernel(engine: &mut impl IoEngine) -> io::Result<()> {
    while engine.kind() == EngineKind::IoUring && engine.in_flight() > 0 {
        while engine.pop_completion().is_some() {}
        if engine.in_flight() > 0 {
            engine.submit()?;
            engine.wait()?;
        }
    }
    Ok(())
}

/// Either engine, chosen once when a disk is opened; dispatch is a `match`, not a vtable.
// One per worker and never moved on the hot path; boxing would add a pointer chase.
#[allow(clippy::large_enum_variant)]
pub enum AnyEngine {
    Uring(UringEngine),
    Sync(SyncEngine),
    /// Tests only: the synchronous engine with injected faults.
    #[cfg(test)]
    Faulty(faulty::FaultyEngine),
}

macro_rules! dispatch {
    ($self:expr, $e:ident => $body:expr) => {
        match $self {
            AnyEngine::Uring($e) => $body,
            AnyEngine::Sync($e) => $body,
            #[cfg(test)]
            AnyEngine::Faulty($e) => $body,
        }
    };
}

impl IoEngine for AnyEngine {
    fn register_file(&mut self, fd: RawFd) -> io::Result<FileId> {
        dispatch!(self, e => e.register_file(fd))
    }
    #[inline]
    unsafe fn push(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull> {
        // SAFETY: the caller upholds `push`'s contract, which both engines share.
        dispatch!(self, e => unsafe { e.push(op, user_data) })
    }
    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        dispatch!(self, e => e.submit())
    }
    #[inline]
    fn pop_completion(&mut self) -> Option<Completion> {
        dispatch!(self, e => e.pop_completion())
    }
    fn wait(&mut self) -> io::Result<()> {
        dispatch!(self, e => e.wait())
    }
    fn completion_fd(&self) -> Option<RawFd> {
        dispatch!(self, e => e.completion_fd())
    }
    fn ack_completion_fd(&self) {
        dispatch!(self, e => e.ack_completion_fd())
    }
    #[inline]
    fn in_flight(&self) -> usize {
        dispatch!(self, e => e.in_flight())
    }
    fn kind(&self) -> EngineKind {
        dispatch!(self, e => e.kind())
    }
}

/// Creates the best engine available with room for `depth` operations in flight: io_uring
/// when the kernel allows it, otherwise the synchronous engine. `probe` is the factory's
/// one-time answer to "does io_uring work here?".
pub fn new_engine(kind: EngineKind, depth: u32) -> io::Result<AnyEngine> {
    match kind {
        EngineKind::IoUring => UringEngine::new(depth).map(AnyEngine::Uring),
        EngineKind::Sync => Ok(AnyEngine::Sync(SyncEngine::new(depth))),
    }
}

/// Like [`new_engine`], but an io_uring engine signals completions on `eventfd` (owned by
/// the caller, who keeps it open while the engine exists); the synchronous engine completes
/// inline and needs none.
pub fn new_engine_notifying(kind: EngineKind, depth: u32, eventfd: RawFd) -> io::Result<AnyEngine> {
    match kind {
        EngineKind::IoUring => UringEngine::with_eventfd(depth, eventfd).map(AnyEngine::Uring),
        EngineKind::Sync => Ok(AnyEngine::Sync(SyncEngine::new(depth))),
    }
}

/// Whether io_uring can be used in this process (kernel support, seccomp, sysctl
/// `kernel.io_uring_disabled`). The disk factory asks once.
pub fn probe_io_uring() -> Result<(), io::Error> {
    UringEngine::new(2).map(|_| ())
}

/// A syscall's return value as a completion result: the count, or -errno.
pub(crate) fn result_of(ret: isize) -> i32 {
    if ret < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(ret).unwrap_or(i32::MAX)
    }
}
