//! The io_uring engine: one ring per queue worker.
//!
//! The ring is created disabled, its files and an opcode allow-list are registered, and only
//! then is it enabled (as Firecracker does), so a bug elsewhere cannot turn it into a general
//! syscall gateway. Completions are signalled on an eventfd registered with the ring, which
//! the worker's event loop waits on next to its queue's kick fd.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;

use io_uring::{opcode, register::Restriction, types, IoUring};

use super::{Completion, EngineFull, EngineKind, EngineOp, FileId, FileRepr, IoEngine};

/// Files one ring can have registered. A raw disk uses one; tiered disks use two.
const MAX_FILES: u32 = 8;

pub struct UringEngine {
    ring: IoUring,
    /// The batch's first read or write on a buffered file, held back from the ring: if it
    /// stays alone in its batch, `submit` tries it synchronously first (see `try_inline`).
    /// With the operation: its tag and the file's descriptor.
    held: Option<(EngineOp, u64, RawFd)>,
    /// Completions of operations done synchronously, returned before the ring's.
    inline_done: std::collections::VecDeque<Completion>,
    /// The eventfd completions are signalled on, and ours to close if we created it.
    notify: RawFd,
    _eventfd: Option<OwnedFd>,
    files: Vec<RawFd>,
    /// Per registered file: opened without O_DIRECT (a page-cache hit can complete inline).
    buffered: Vec<bool>,
    /// Per registered file: whether its filesystem takes buffered writes without blocking
    /// (see `write_sync`).
    nowait_writes: Vec<NowaitWrites>,
    in_flight: usize,
    capacity: usize,
    /// Operations queued in the SQ but not yet handed to the kernel.
    unsubmitted: usize,
}

impl UringEngine {
    /// A ring with `depth` submission entries (completion queue twice that, so completions
    /// can never overflow while at most `depth` operations are in flight).
    pub fn new(depth: u32) -> io::Result<Self> {
        Self::build(depth, None)
    }

    /// A ring that signals completions on `eventfd`, which the caller owns and keeps open
    /// for the ring's lifetime (several rings may share one, so one wait covers them all).
    pub fn with_eventfd(depth: u32, eventfd: RawFd) -> io::Result<Self> {
        Self::build(depth, Some(eventfd))
    }

    fn build(depth: u32, shared_eventfd: Option<RawFd>) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_cqsize(depth * 2)
            .build(depth)?;
        let (notify, owned) = match shared_eventfd {
            Some(fd) => (fd, None),
            None => {
                // SAFETY: eventfd() has no memory-safety preconditions; we check its result.
                let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
                if efd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `efd` is a freshly created descriptor that nothing else owns.
                (efd, Some(unsafe { OwnedFd::from_raw_fd(efd) }))
            }
        };
        ring.submitter().register_files_sparse(MAX_FILES)?;
        // Buffered writes that cannot complete inline go to io-wq worker threads. Filesystems
        // serialise buffered writes on the inode lock, so one worker per in-flight write only
        // adds contention (blk-compare randwrite QD32 on ext4: 27.5K IOPS with 32 workers,
        // 35.6K with 2). O_DIRECT and page-cache reads never use io-wq.
        let mut max_workers = [IOWQ_BOUNDED_WORKERS, 0];
        ring.submitter()
            .register_iowq_max_workers(&mut max_workers)?;
        let mut allowed = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Read::CODE),
            Restriction::sqe_op(opcode::Write::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_op(opcode::Fallocate::CODE),
            // Without this, restricted rings refuse every SQE flag, FIXED_FILE included.
            Restriction::sqe_flags_allowed(io_uring::squeue::Flags::FIXED_FILE.bits()),
            Restriction::register_op(IORING_REGISTER_FILES_UPDATE),
            Restriction::register_op(IORING_REGISTER_EVENTFD),
        ];
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        ring.submitter().register_eventfd(notify)?;
        Ok(UringEngine {
            ring,
            held: None,
            inline_done: std::collections::VecDeque::with_capacity(4),
            notify,
            _eventfd: owned,
            files: Vec::new(),
            buffered: Vec::new(),
            nowait_writes: Vec::new(),
            in_flight: 0,
            capacity: depth as usize,
            unsubmitted: 0,
        })
    }
}

// SAFETY: the only non-Send part is the held operation's iovec pointer, which `push`'s
// contract keeps valid until submit; whichever thread owns the engine uses it, exactly like
// the SQEs already in the ring, which the kernel reads on submit.
unsafe impl Send for UringEngine {}

// The register opcodes still needed after the ring is enabled (kernel ABI values from
// <linux/io_uring.h>; the io-uring crate does not export them).
const IORING_REGISTER_EVENTFD: u8 = 4;
const IORING_REGISTER_FILES_UPDATE: u8 = 6;

/// Whether a buffered file's filesystem supports non-blocking buffered writes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NowaitWrites {
    /// Not known until its first write.
    Unknown,
    /// Writes go to the ring, which tries them without blocking first.
    Supported,
    /// RWF_NOWAIT writes are refused (EOPNOTSUPP: ext4 among others): the ring would hand
    /// every write to an io-wq worker thread, so the engine writes synchronously instead.
    Unsupported,
}

/// The parts of a read or write that the engine may do itself, outside the ring.
#[derive(Clone, Copy)]
struct ReadWrite {
    write: bool,
    file: FileId,
    offset: u64,
    iov: *const libc::iovec,
    iovcnt: u32,
}

impl ReadWrite {
    fn of(op: &EngineOp) -> Option<ReadWrite> {
        let (write, file, offset, iov, iovcnt) = match *op {
            EngineOp::Readv {
                file,
                offset,
                iov,
                iovcnt,
            } => (false, file, offset, iov, iovcnt),
            EngineOp::Writev {
                file,
                offset,
                iov,
                iovcnt,
            } => (true, file, offset, iov, iovcnt),
            _ => return None,
        };
        Some(ReadWrite {
            write,
            file,
            offset,
            iov,
            iovcnt,
        })
    }

    /// Does it on `fd` with RWF_NOWAIT: its completion if it finished whole, else the errno
    /// (0 for a transfer that stopped part-way).
    ///
    /// # Safety
    ///
    /// The iovec array and its buffers must be valid (as `IoEngine::push` requires), and
    /// `fd` open.
    unsafe fn nowait(&self, fd: RawFd, tag: u64) -> Result<Completion, i32> {
        // SAFETY: the caller's contract.
        let (n, len) = unsafe {
            let len =
                crate::iov::iov_len(std::slice::from_raw_parts(self.iov, self.iovcnt as usize));
            let (cnt, off) = (self.iovcnt as i32, self.offset as i64);
            let n = if self.write {
                libc::pwritev2(fd, self.iov, cnt, off, libc::RWF_NOWAIT)
            } else {
                libc::preadv2(fd, self.iov, cnt, off, libc::RWF_NOWAIT)
            };
            (n, len)
        };
        if n < 0 {
            return Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        if n as u64 != len {
            return Err(0);
        }
        Ok(Completion {
            user_data: tag,
            result: super::result_of(n),
        })
    }
}

/// io-wq workers per ring for work that cannot complete inline (see `UringEngine::new`).
const IOWQ_BOUNDED_WORKERS: u32 = 2;

impl IoEngine for UringEngine {
    fn register_file(&mut self, fd: RawFd) -> io::Result<FileId> {
        let index = self.files.len() as u32;
        if index >= MAX_FILES {
            return Err(io::Error::other("too many files registered with one ring"));
        }
        self.ring.submitter().register_files_update(index, &[fd])?;
        self.files.push(fd);
        // SAFETY: F_GETFL only reads the descriptor's flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        self.buffered
            .push(flags >= 0 && flags & libc::O_DIRECT == 0);
        self.nowait_writes.push(NowaitWrites::Unknown);
        Ok(FileId(FileRepr::Fixed(index)))
    }

    #[inline]
    unsafe fn push(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull> {
        if self.in_flight >= self.capacity {
            return Err(EngineFull);
        }
        if let Some(done) = self.write_sync(&op, user_data) {
            self.inline_done.push_back(done);
            self.in_flight += 1;
            return Ok(());
        }
        // A second operation in the batch: the held one goes to the ring first, in order.
        if let Some((held, tag, fd)) = self.held.take() {
            // SAFETY: the held operation was pushed under the same contract.
            if let Err(e) = unsafe { self.push_ring(held, tag) } {
                self.held = Some((held, tag, fd));
                return Err(e);
            }
            self.in_flight -= 1;
        } else if let Some(fd) = self.inline_candidate(&op).filter(|_| self.unsubmitted == 0) {
            self.held = Some((op, user_data, fd));
            self.in_flight += 1;
            return Ok(());
        }
        // SAFETY: the caller upholds `push`'s contract.
        unsafe { self.push_ring(op, user_data) }
    }

    #[inline]
    fn submit(&mut self) -> io::Result<()> {
        if let Some((op, tag, fd)) = self.held.take() {
            // Held operations count as in flight already, and stay so until popped.
            if let Some(done) = self.try_inline(fd, &op, tag) {
                self.inline_done.push_back(done);
                return Ok(());
            }
            // `push_ring` counts it again.
            self.in_flight -= 1;
            // SAFETY: pushed under `push`'s contract, which holds until its completion.
            if unsafe { self.push_ring(op, tag) }.is_err() {
                return Err(io::Error::other("io_uring submission queue full"));
            }
        }
        self.submit_ring()
    }

    #[inline]
    fn pop_completion(&mut self) -> Option<Completion> {
        if let Some(c) = self.inline_done.pop_front() {
            self.in_flight -= 1;
            return Some(c);
        }
        let cqe = self.ring.completion().next()?;
        self.in_flight -= 1;
        Some(Completion {
            user_data: cqe.user_data(),
            result: cqe.result(),
        })
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.held.is_some() {
            self.submit()?;
        }
        if self.in_flight == 0 || !self.inline_done.is_empty() || !self.ring.completion().is_empty()
        {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.notify)
    }

    fn ack_completion_fd(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a valid 8-byte buffer from the nonblocking eventfd,
        // which stays open while the ring exists (ours, or the caller's by contract).
        unsafe { libc::read(self.notify, buf.as_mut_ptr().cast(), 8) };
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }
}

impl UringEngine {
    /// The index and descriptor of `file` if it is registered and buffered (a page-cache
    /// hit can finish an operation on it without blocking).
    fn buffered_file(&self, file: FileId) -> Option<(usize, RawFd)> {
        match file.0 {
            FileRepr::Fixed(i) if self.buffered.get(i as usize) == Some(&true) => {
                Some((i as usize, self.files[i as usize]))
            }
            _ => None,
        }
    }

    /// The descriptor of a read or write on a registered buffered file: the operations a
    /// page-cache hit can finish without blocking.
    fn inline_candidate(&self, op: &EngineOp) -> Option<RawFd> {
        let rw = ReadWrite::of(op)?;
        self.buffered_file(rw.file).map(|(_, fd)| fd)
    }

    /// Does a buffered write here and now where the ring would only pass it to an io-wq
    /// worker: on a filesystem that refuses non-blocking buffered writes, every such write
    /// costs a hand-off to another thread and back on top of the copy into the page cache
    /// (blk-compare randwrite QD32 on ext4: 65% of the daemon's CPU in the io-wq worker,
    /// a fifth of that in the hand-offs). The first write to each file finds out, with
    /// RWF_NOWAIT. Returns the completion if the write was done here.
    ///
    /// The price: a write that blocks (dirty-page throttling) holds up this queue's other
    /// requests, as it would with a synchronous engine.
    fn write_sync(&mut self, op: &EngineOp, tag: u64) -> Option<Completion> {
        let rw = ReadWrite::of(op).filter(|rw| rw.write)?;
        let (i, fd) = self.buffered_file(rw.file)?;
        match self.nowait_writes[i] {
            NowaitWrites::Supported => return None,
            NowaitWrites::Unsupported => {}
            // SAFETY: `push`'s contract keeps the iovecs and their buffers valid until the
            // operation's completion is popped; `fd` is a registered file, open while the
            // engine exists.
            NowaitWrites::Unknown => match unsafe { rw.nowait(fd, tag) } {
                Err(libc::EOPNOTSUPP) => self.nowait_writes[i] = NowaitWrites::Unsupported,
                done => {
                    // Done whole, or refused for now (EAGAIN) or stopped part-way: then
                    // the ring does the whole write (rewriting the same bytes is harmless).
                    self.nowait_writes[i] = NowaitWrites::Supported;
                    return done.ok();
                }
            },
        }
        // SAFETY: as above.
        let n = unsafe { libc::pwritev(fd, rw.iov, rw.iovcnt as i32, rw.offset as i64) };
        Some(Completion {
            user_data: tag,
            result: super::result_of(n),
        })
    }

    /// Runs a lone read or write synchronously with RWF_NOWAIT, returning its completion
    /// if it finished whole. A request alone in its batch gains nothing from the ring, and
    /// the round trip through it cost a page-cached 4 KiB read about 3 µs more than
    /// `preadv2` at queue depth 1 (blk-compare p50 9.2 vs 6.0 µs). Data not in the page
    /// cache (EAGAIN), a short transfer or an error go to the ring as usual, which then
    /// gives the authoritative result; repeating a partial read or write is harmless.
    fn try_inline(&self, fd: RawFd, op: &EngineOp, tag: u64) -> Option<Completion> {
        // SAFETY: `push`'s contract keeps the iovec array valid until this submit returns
        // and its buffers until the completion is popped; `fd` is a registered file, open
        // while the engine exists.
        unsafe { ReadWrite::of(op)?.nowait(fd, tag) }.ok()
    }

    /// Queues `op` in the submission ring.
    ///
    /// # Safety
    ///
    /// As [`IoEngine::push`].
    #[inline]
    unsafe fn push_ring(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull> {
        // The same operation on a fixed file or a plain descriptor.
        macro_rules! on_file {
            ($file:expr, |$t:ident| $build:expr) => {
                match $file.0 {
                    FileRepr::Fixed(i) => {
                        let $t = types::Fixed(i);
                        $build
                    }
                    FileRepr::Fd(fd) => {
                        let $t = types::Fd(fd);
                        $build
                    }
                }
            };
        }
        // A one-buffer read or write goes as READ or WRITE: the kernel then skips copying
        // and checking an iovec array (io_prep_readv and the iovec import were 4% of the
        // worker's time in blk-compare randread QD32).
        let one = |iov: *const libc::iovec, iovcnt: u32| {
            if iovcnt != 1 {
                return None;
            }
            // SAFETY: `push`'s contract keeps the iovec array (here of one entry) valid
            // until submit.
            let v = unsafe { *iov };
            Some((v.iov_base.cast::<u8>(), u32::try_from(v.iov_len).ok()?))
        };
        let entry = match op {
            EngineOp::Readv {
                file,
                offset,
                iov,
                iovcnt,
            } => on_file!(file, |t| match one(iov, iovcnt) {
                Some((buf, len)) => opcode::Read::new(t, buf, len).offset(offset).build(),
                None => opcode::Readv::new(t, iov, iovcnt).offset(offset).build(),
            }),
            EngineOp::Writev {
                file,
                offset,
                iov,
                iovcnt,
            } => on_file!(file, |t| match one(iov, iovcnt) {
                Some((buf, len)) => opcode::Write::new(t, buf, len).offset(offset).build(),
                None => opcode::Writev::new(t, iov, iovcnt).offset(offset).build(),
            }),
            EngineOp::Fdatasync { file } => on_file!(file, |t| opcode::Fsync::new(t)
                .flags(types::FsyncFlags::DATASYNC)
                .build()),
            EngineOp::Fallocate {
                file,
                mode,
                offset,
                len,
            } => on_file!(file, |t| opcode::Fallocate::new(t, len)
                .offset(offset)
                .mode(mode)
                .build()),
        }
        .user_data(user_data);
        // SAFETY: the caller guarantees the iovecs and buffers outlive the operation
        // (`IoEngine::push`'s contract); the entry refers to nothing else but a registered
        // fixed file.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Cannot happen while in_flight < capacity == SQ size, but never block or drop.
            return Err(EngineFull);
        }
        self.in_flight += 1;
        self.unsubmitted += 1;
        Ok(())
    }

    fn submit_ring(&mut self) -> io::Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    self.unsubmitted = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY/EAGAIN: the kernel wants completions reaped first; the caller reaps
                // and calls submit again on its next pass.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    return Ok(())
                }
                Err(e) => return Err(e),
            }
        }
    }
}
