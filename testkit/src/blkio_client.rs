//! A synchronous libblkio client for tests and benches.
//!
//! This module owns the one way our tests and benches talk to a block device without a VM: the
//! `blkio` crate, either as a vhost-user-blk frontend (`virtio-blk-vhost-user`) to a daemon's
//! socket, or with its `io_uring` driver directly on a file (the no-virtualization baseline).
//!
//! libblkio only transfers data to and from memory regions it has mapped (for vhost-user, the
//! daemon maps them too), so [`Client::open`] allocates one region and gives each [`Queue`] its
//! own slice of it. Requests copy through that slice: [`Queue::read`], [`Queue::write`] and
//! friends submit one request and wait for it. [`Queue::pipeline`] divides the slice into
//! slots so a bench can keep several requests in flight.
//!
//! Every wait has a deadline ([`ClientOptions::io_timeout`]), so a daemon that never completes
//! a request fails the test instead of hanging it.

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// The kinds of request a test can send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

impl std::fmt::Display for OpKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::WriteZeroes => "write-zeroes",
        })
    }
}

/// Errors from setting up a client or from one request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A libblkio call during set-up failed (connect, property, start, memory mapping).
    #[error("libblkio {step} ({target}): {source} (errno {})", source.errno())]
    Setup {
        step: String,
        target: String,
        #[source]
        source: blkio::Error,
    },
    /// The device (or libblkio, for requests it refuses locally, e.g. writes to a read-only
    /// device) completed the request with an error.
    #[error("{op} of {len} bytes at offset {offset} failed: errno {errno} ({})", message.as_deref().unwrap_or("from the device"))]
    Request {
        op: OpKind,
        offset: u64,
        len: u64,
        /// Positive errno, e.g. `libc::EIO`.
        errno: i32,
        /// libblkio's message when it failed the request itself.
        message: Option<String>,
    },
    /// Waiting for completions failed, or timed out (errno ETIME).
    #[error("waiting for {op} completions: {source} (errno {})", source.errno())]
    Wait {
        op: OpKind,
        #[source]
        source: blkio::Error,
    },
    /// The request does not fit in the queue's buffer.
    #[error("{op} needs {need} bytes of buffer, the queue has {have}")]
    BufferTooSmall {
        op: OpKind,
        need: usize,
        have: usize,
    },
}

impl ClientError {
    /// The errno of a failed request or wait, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Request { errno, .. } => Some(*errno),
            ClientError::Setup { source, .. } | ClientError::Wait { source, .. } => {
                Some(source.errno().raw_os_error())
            }
            ClientError::BufferTooSmall { .. } => None,
        }
    }
}

/// How to open a client.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub num_queues: usize,
    /// Virtqueue size (a power of two); libblkio's default (256) when `None`.
    pub queue_size: Option<u32>,
    /// Must be set to open a device that offers VIRTIO_BLK_F_RO; libblkio then refuses writes
    /// itself with EBADF.
    pub read_only: bool,
    /// Buffer bytes per queue: the largest single request, or `depth * block` for a pipeline.
    pub buffer_per_queue: usize,
    /// Deadline for any single wait for completions.
    pub io_timeout: Duration,
    /// Use libblkio poll queues: the client spins on the used ring instead of sleeping on
    /// the completion eventfd, and asks the device not to signal it. vhost-user only:
    /// ignored for the io_uring driver, whose poll queues need O_DIRECT.
    pub poll: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: None,
            read_only: false,
            buffer_per_queue: 4 << 20,
            io_timeout: Duration::from_secs(30),
            poll: false,
        }
    }
}

impl ClientOptions {
    pub fn queues(mut self, n: usize) -> Self {
        self.num_queues = n;
        self
    }
    pub fn read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }
    pub fn buffer_per_queue(mut self, bytes: usize) -> Self {
        self.buffer_per_queue = bytes;
        self
    }
    pub fn queue_size(mut self, size: u32) -> Self {
        self.queue_size = Some(size);
        self
    }
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }
    pub fn poll(mut self, poll: bool) -> Self {
        self.poll = poll;
        self
    }
}

/// What the client connects to.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a> {
    /// A vhost-user-blk socket.
    VhostUser(&'a Path),
    /// A file opened by libblkio's `io_uring` driver; `direct` sets O_DIRECT.
    IoUring { path: &'a Path, direct: bool },
}

impl Target<'_> {
    fn driver(&self) -> &'static str {
        match self {
            Target::VhostUser(_) => "virtio-blk-vhost-user",
            Target::IoUring { .. } => "io_uring",
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} {}",
            self.driver(),
            match self {
                Target::VhostUser(p) | Target::IoUring { path: p, .. } => p.display(),
            }
        )
    }
}

/// A started libblkio instance and its queues.
pub struct Client {
    queues: Vec<Queue>,
    capacity: u64,
    blkio: Arc<Blkio>,
}

impl Client {
    /// Connects to a vhost-user-blk socket with `num_queues` queues and default options.
    pub fn open(socket: impl AsRef<Path>, num_queues: usize) -> Result<Client, ClientError> {
        Self::open_with(
            Target::VhostUser(socket.as_ref()),
            &ClientOptions::default().queues(num_queues),
        )
    }

    /// Opens any target with explicit options.
    pub fn open_with(target: Target<'_>, opts: &ClientOptions) -> Result<Client, ClientError> {
        let desc = target.describe();
        let setup = |step: &str| {
            let desc = desc.clone();
            let step = step.to_owned();
            move |source| ClientError::Setup {
                step,
                target: desc,
                source,
            }
        };

        let mut blkio = Blkio::new(target.driver()).map_err(setup("new"))?;
        match target {
            Target::VhostUser(path) => {
                blkio
                    .set_str("path", &path.to_string_lossy())
                    .map_err(setup("set path"))?;
            }
            Target::IoUring { path, direct } => {
                blkio
                    .set_str("path", &path.to_string_lossy())
                    .map_err(setup("set path"))?;
                blkio
                    .set_bool("direct", direct)
                    .map_err(setup("set direct"))?;
            }
        }
        blkio
            .set_bool("read-only", opts.read_only)
            .map_err(setup("set read-only"))?;
        blkio.connect().map_err(setup("connect"))?;

        let num_queues = i32::try_from(opts.num_queues).expect("queue count fits i32");
        let poll = opts.poll && matches!(target, Target::VhostUser(_));
        let (interrupt_queues, poll_queues) = if poll {
            (0, num_queues)
        } else {
            (num_queues, 0)
        };
        blkio
            .set_i32("num-queues", interrupt_queues)
            .map_err(setup("set num-queues"))?;
        if poll {
            blkio
                .set_i32("num-poll-queues", poll_queues)
                .map_err(setup("set num-poll-queues"))?;
        }
        if let Some(size) = opts.queue_size {
            let size = i32::try_from(size).expect("queue size fits i32");
            let name = match target {
                Target::VhostUser(_) => "queue-size",
                Target::IoUring { .. } => "num-entries",
            };
            blkio.set_i32(name, size).map_err(setup("set queue size"))?;
        }
        let capacity = blkio.get_u64("capacity").map_err(setup("get capacity"))?;

        let outcome = blkio.start().map_err(setup("start"))?;

        // One region for all queues: each vhost-user memory region costs the daemon a slot and
        // an mmap, and a daemon may limit how many it takes.
        let align = blkio
            .get_u64("mem-region-alignment")
            .map_err(setup("get mem-region-alignment"))?
            .max(4096) as usize;
        let per_queue = opts.buffer_per_queue.max(4096).next_multiple_of(align);
        let region_len = per_queue * opts.num_queues.max(1);
        let region = blkio
            .alloc_mem_region(region_len)
            .map_err(setup("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(setup("map_mem_region"))?;

        let blkio = Arc::new(blkio);
        let queues = if poll {
            outcome.poll_queues
        } else {
            outcome.queues
        };
        let queues = queues
            .into_iter()
            .enumerate()
            .map(|(index, q)| Queue {
                q,
                index,
                buf_addr: region.addr + index * per_queue,
                buf_len: per_queue,
                io_timeout: opts.io_timeout,
                completions: Vec::new(),
                region,
                _blkio: Arc::clone(&blkio),
            })
            .collect();
        Ok(Client {
            queues,
            capacity,
            blkio,
        })
    }

    /// Device size in bytes, as the device's config space reports it.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The libblkio instance, for reading properties such as `max-segments` or
    /// `max-discard-len`.
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// Queue `i`. Panics if it was taken by [`Self::into_queues`] or does not exist.
    pub fn queue(&mut self, i: usize) -> &mut Queue {
        let n = self.queues.len();
        self.queues
            .get_mut(i)
            .unwrap_or_else(|| panic!("queue {i} of {n}"))
    }

    /// Splits the client into its queues, one per thread. The connection closes when the last
    /// queue is dropped.
    pub fn into_queues(self) -> Vec<Queue> {
        self.queues
    }
}

/// One virtqueue (or io_uring) and its buffer. Send it to a thread to drive queues in parallel.
pub struct Queue {
    // Field order matters: the queue must be dropped before the last reference to the Blkio
    // that owns its driver and memory region.
    q: Blkioq,
    index: usize,
    buf_addr: usize,
    buf_len: usize,
    io_timeout: Duration,
    completions: Vec<MaybeUninit<Completion>>,
    region: MemoryRegion,
    _blkio: Arc<Blkio>,
}

/// One request for [`Queue::submit_and_wait`], with its place in the queue's buffer.
#[derive(Clone, Copy, Debug)]
enum Req<'a> {
    Read {
        offset: u64,
        buf_off: usize,
        len: usize,
    },
    Write {
        offset: u64,
        buf_off: usize,
        len: usize,
    },
    Readv {
        offset: u64,
        iov: &'a [libc::iovec],
    },
    Writev {
        offset: u64,
        iov: &'a [libc::iovec],
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

impl Req<'_> {
    fn kind(&self) -> OpKind {
        match self {
            Req::Read { .. } | Req::Readv { .. } => OpKind::Read,
            Req::Write { .. } | Req::Writev { .. } => OpKind::Write,
            Req::Flush => OpKind::Flush,
            Req::Discard { .. } => OpKind::Discard,
            Req::WriteZeroes { .. } => OpKind::WriteZeroes,
        }
    }

    fn span(&self) -> (u64, u64) {
        match *self {
            Req::Read { offset, len, .. } | Req::Write { offset, len, .. } => (offset, len as u64),
            Req::Readv { offset, iov } | Req::Writev { offset, iov } => {
                (offset, iov.iter().map(|v| v.iov_len as u64).sum())
            }
            Req::Flush => (0, 0),
            Req::Discard { offset, len } | Req::WriteZeroes { offset, len, .. } => (offset, len),
        }
    }
}

/// Gap between segments of a vectored request inside the buffer, so that no two segments are
/// adjacent in memory and a device cannot pass by treating them as one.
const SEGMENT_GAP: usize = 512;

impl Queue {
    pub fn index(&self) -> usize {
        self.index
    }

    /// Bytes of buffer this queue owns: the largest request it can carry.
    pub fn buffer_len(&self) -> usize {
        self.buf_len
    }

    fn buf(&self) -> &[u8] {
        // SAFETY: [buf_addr, buf_addr + buf_len) lies inside `region`, which stays mapped while
        // `_blkio` (and so the memory-region registry) is alive. This queue is its only user,
        // and no request is in flight outside `&mut self` methods, which wait for completion
        // (or, for a pipeline, track in-flight slots) before handing out references.
        unsafe { std::slice::from_raw_parts(self.buf_addr as *const u8, self.buf_len) }
    }

    fn buf_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `buf`; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.buf_addr as *mut u8, self.buf_len) }
    }

    fn check_fits(&self, op: OpKind, need: usize) -> Result<(), ClientError> {
        if need > self.buf_len {
            Err(ClientError::BufferTooSmall {
                op,
                need,
                have: self.buf_len,
            })
        } else {
            Ok(())
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        self.check_fits(OpKind::Read, len)?;
        self.submit_and_wait(Req::Read {
            offset,
            buf_off: 0,
            len,
        })?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.check_fits(OpKind::Write, data.len())?;
        self.buf_mut()[..data.len()].copy_from_slice(data);
        self.submit_and_wait(Req::Write {
            offset,
            buf_off: 0,
            len: data.len(),
        })
    }

    /// Lays out segments of the given lengths in the buffer, separated by gaps.
    fn segments(&self, op: OpKind, lens: &[usize]) -> Result<Vec<libc::iovec>, ClientError> {
        let need: usize = lens.iter().map(|l| l + SEGMENT_GAP).sum();
        self.check_fits(op, need)?;
        let mut at = 0;
        Ok(lens
            .iter()
            .map(|&len| {
                let v = libc::iovec {
                    iov_base: (self.buf_addr + at) as *mut libc::c_void,
                    iov_len: len,
                };
                at += len + SEGMENT_GAP;
                v
            })
            .collect())
    }

    /// Reads consecutive bytes at `offset` into separate buffers of the given lengths, as one
    /// multi-segment request.
    pub fn readv(&mut self, offset: u64, lens: &[usize]) -> Result<Vec<Vec<u8>>, ClientError> {
        let iov = self.segments(OpKind::Read, lens)?;
        self.submit_and_wait(Req::Readv { offset, iov: &iov })?;
        let base = self.buf_addr;
        Ok(iov
            .iter()
            .map(|v| {
                let start = v.iov_base as usize - base;
                self.buf()[start..start + v.iov_len].to_vec()
            })
            .collect())
    }

    /// Writes the concatenation of `segments` at `offset` as one multi-segment request.
    pub fn writev(&mut self, offset: u64, segments: &[&[u8]]) -> Result<(), ClientError> {
        let lens: Vec<usize> = segments.iter().map(|s| s.len()).collect();
        let iov = self.segments(OpKind::Write, &lens)?;
        let base = self.buf_addr;
        for (v, data) in iov.iter().zip(segments) {
            let start = v.iov_base as usize - base;
            self.buf_mut()[start..start + data.len()].copy_from_slice(data);
        }
        self.submit_and_wait(Req::Writev { offset, iov: &iov })
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.submit_and_wait(Req::Flush)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.submit_and_wait(Req::Discard { offset, len })
    }

    /// Zeroes `len` bytes at `offset`; `unmap` lets the device deallocate them (libblkio sends
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP unless told `NO_UNMAP`).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ClientError> {
        self.submit_and_wait(Req::WriteZeroes { offset, len, unmap })
    }

    fn enqueue(&mut self, req: Req<'_>, user_data: usize) {
        match req {
            Req::Read {
                offset,
                buf_off,
                len,
            } => self.q.read(
                offset,
                (self.buf_addr + buf_off) as *mut u8,
                len,
                user_data,
                ReqFlags::empty(),
            ),
            Req::Write {
                offset,
                buf_off,
                len,
            } => self.q.write(
                offset,
                (self.buf_addr + buf_off) as *const u8,
                len,
                user_data,
                ReqFlags::empty(),
            ),
            Req::Readv { offset, iov } => self.q.readv(
                offset,
                iov.as_ptr(),
                u32::try_from(iov.len()).expect("iovec count fits u32"),
                user_data,
                ReqFlags::empty(),
            ),
            Req::Writev { offset, iov } => self.q.writev(
                offset,
                iov.as_ptr(),
                u32::try_from(iov.len()).expect("iovec count fits u32"),
                user_data,
                ReqFlags::empty(),
            ),
            Req::Flush => self.q.flush(user_data, ReqFlags::empty()),
            Req::Discard { offset, len } => {
                self.q.discard(offset, len, user_data, ReqFlags::empty())
            }
            Req::WriteZeroes { offset, len, unmap } => {
                let flags = if unmap {
                    ReqFlags::empty()
                } else {
                    ReqFlags::NO_UNMAP
                };
                self.q.write_zeroes(offset, len, user_data, flags)
            }
        }
    }

    /// Waits for at least `min` completions (up to `max`) and returns how many arrived; they
    /// are in `self.completions[..n]`.
    fn reap(&mut self, op: OpKind, min: usize, max: usize) -> Result<usize, ClientError> {
        if self.completions.len() < max {
            self.completions.resize_with(max, MaybeUninit::uninit);
        }
        let mut timeout = self.io_timeout;
        self.q
            .do_io(&mut self.completions[..max], min, Some(&mut timeout), None)
            .map_err(|source| ClientError::Wait { op, source })
    }

    fn completion(&self, i: usize) -> &Completion {
        // SAFETY: `reap` returned a count > i; libblkio initialised completions[..count].
        unsafe { self.completions[i].assume_init_ref() }
    }

    fn submit_and_wait(&mut self, req: Req<'_>) -> Result<(), ClientError> {
        let kind = req.kind();
        self.enqueue(req, 0);
        let n = self.reap(kind, 1, 1)?;
        debug_assert_eq!(n, 1);
        let (offset, len) = req.span();
        completion_result(self.completion(0), kind, offset, len)
    }

    /// Divides the buffer into `depth` slots of `slot_len` bytes for keeping up to `depth`
    /// requests in flight.
    pub fn pipeline(&mut self, depth: usize, slot_len: usize) -> Result<Pipeline<'_>, ClientError> {
        assert!(depth > 0, "pipeline depth must be positive");
        // Keep slots 512-byte aligned, as O_DIRECT on the io_uring driver requires.
        let stride = slot_len.next_multiple_of(512).max(512);
        self.check_fits(OpKind::Read, stride * depth)?;
        Ok(Pipeline {
            queue: self,
            stride,
            slot_len,
            pending: vec![None; depth],
            in_flight: 0,
        })
    }
}

/// Turns a completion into a result.
fn completion_result(c: &Completion, op: OpKind, offset: u64, len: u64) -> Result<(), ClientError> {
    if c.ret == 0 {
        return Ok(());
    }
    let message = if c.error_msg.is_null() {
        None
    } else {
        // SAFETY: libblkio sets error_msg either to null or to a static NUL-terminated string
        // (`Completion::for_failed_req` takes a `&'static CStr`).
        Some(
            unsafe { CStr::from_ptr(c.error_msg) }
                .to_string_lossy()
                .into_owned(),
        )
    };
    Err(ClientError::Request {
        op,
        offset,
        len,
        errno: -c.ret,
        message,
    })
}

/// A request a pipeline slot can carry; data requests use the slot's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotOp {
    /// Read `slot_len` bytes at the offset into the slot.
    Read(u64),
    /// Write the slot's `slot_len` bytes at the offset.
    Write(u64),
    Flush,
}

impl SlotOp {
    fn kind(&self) -> OpKind {
        match self {
            SlotOp::Read(_) => OpKind::Read,
            SlotOp::Write(_) => OpKind::Write,
            SlotOp::Flush => OpKind::Flush,
        }
    }
}

/// Up to `depth` requests in flight on one queue, each owning a slot of the queue's buffer.
/// The bench loop: submit into every free slot, [`Pipeline::wait`] for at least one, resubmit.
pub struct Pipeline<'q> {
    queue: &'q mut Queue,
    stride: usize,
    slot_len: usize,
    pending: Vec<Option<SlotOp>>,
    in_flight: usize,
}

impl Pipeline<'_> {
    pub fn depth(&self) -> usize {
        self.pending.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn is_free(&self, slot: usize) -> bool {
        self.pending[slot].is_none()
    }

    /// The slot's data, e.g. to fill before a write or check after a read. Panics while the
    /// slot's request is in flight: the device may be writing it.
    pub fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!(self.is_free(slot), "slot {slot} is in flight");
        let start = slot * self.stride;
        let len = self.slot_len;
        &mut self.queue.buf_mut()[start..start + len]
    }

    /// Queues a request in a free slot. libblkio sends it on the next [`Self::wait`].
    pub fn submit(&mut self, slot: usize, op: SlotOp) {
        assert!(self.is_free(slot), "slot {slot} is already in flight");
        let buf_off = slot * self.stride;
        let len = self.slot_len;
        let req = match op {
            SlotOp::Read(offset) => Req::Read {
                offset,
                buf_off,
                len,
            },
            SlotOp::Write(offset) => Req::Write {
                offset,
                buf_off,
                len,
            },
            SlotOp::Flush => Req::Flush,
        };
        self.queue.enqueue(req, slot);
        self.pending[slot] = Some(op);
        self.in_flight += 1;
    }

    /// Sends queued requests and waits until at least `min` complete (at most all in flight);
    /// calls `done(slot, result)` for each completion and returns their number.
    pub fn wait(
        &mut self,
        min: usize,
        mut done: impl FnMut(usize, Result<(), ClientError>),
    ) -> Result<usize, ClientError> {
        let min = min.min(self.in_flight);
        let kind = self
            .pending
            .iter()
            .flatten()
            .next()
            .map_or(OpKind::Read, SlotOp::kind);
        let n = self.queue.reap(kind, min, self.in_flight.max(1))?;
        for i in 0..n {
            let c = self.queue.completion(i);
            let slot = c.user_data;
            let op = self.pending[slot]
                .take()
                .expect("completion for a slot that is not in flight");
            self.in_flight -= 1;
            let (offset, len) = match op {
                SlotOp::Read(o) | SlotOp::Write(o) => (o, self.slot_len as u64),
                SlotOp::Flush => (0, 0),
            };
            let c = self.queue.completion(i);
            done(slot, completion_result(c, op.kind(), offset, len));
        }
        Ok(n)
    }

    /// Waits for every request in flight, ignoring their results.
    pub fn drain(&mut self) -> Result<(), ClientError> {
        while self.in_flight > 0 {
            self.wait(self.in_flight, |_, _| {})?;
        }
        Ok(())
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        // Requests still in flight would write into slots the next user of the queue's buffer
        // owns; wait for them (bounded by the io timeout).
        let _ = self.drain();
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("index", &self.index)
            .field("buf_len", &self.buf_len)
            .field("region_len", &self.region.len)
            .finish()
    }
}
