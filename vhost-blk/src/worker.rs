//! One queue worker: takes requests from one virtqueue, runs them on that worker's own disk
//! queue (its own io_uring), and puts completions on the used ring.
//!
//! The path of a request: a kick (or a completion, or a freed slot) calls [`QueueWorker::run`];
//! it pops every available chain while a slot is free, parses it into iovecs that point into
//! guest memory, starts it on the disk queue, and submits the whole batch at once. Completions
//! (often ready right after submit for page-cached data) are reaped in the same pass, their
//! status bytes written and the guest notified once per batch.
//!
//! Slots, iovec arrays and scratch space are allocated when the worker is created; the hot
//! path allocates nothing. No lock is shared with other queues: the worker's own mutex is
//! taken only by its event-loop thread, and by the control thread when it drains the queue.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::{VringMutex, VringState, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};

use storage_core::disk::{AnyQueue, DiskOp, DiskQueue, StartError};
use storage_core::metrics::{ErrorClass, OpClass, QueueMetrics};

use crate::device::BlkDevice;
use crate::request::{self, Parsed, RequestKind, Segment, StatusByte};
use crate::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub type GuestMemory = GuestMemoryMmap<()>;

/// Looks at the avail index per idle watch (about 1 µs) before the full look, which also
/// checks the shutdown flag and the clock.
const WATCH_LOOKS: u32 = 64;
pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemory>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The request's own operation is in flight.
    Io,
    /// A write finished; the flush that write-through mode (CONFIG_WCE off) adds is in flight.
    FlushAfterWrite,
}

struct Slot {
    head: u16,
    kind: RequestKind,
    status: StatusByte,
    /// Data buffers in guest memory; capacity `MAX_IOVECS`, allocated once.
    iov: Vec<libc::iovec>,
    /// First iovec not yet fully transferred (short reads and writes are continued).
    iov_start: usize,
    /// Data bytes transferred so far.
    done: u64,
    phase: Phase,
    started: Instant,
    /// Keeps the guest memory the iovecs point into mapped until the request completes,
    /// even if the frontend replaces the memory table meanwhile.
    mem: Option<Arc<GuestMemory>>,
}

// SAFETY: the raw pointers in a slot (iovecs, status byte) point into guest memory that the
// slot keeps mapped through `mem`; they are only dereferenced by the thread that currently
// owns the worker (behind its mutex), so moving a slot between threads is sound.
unsafe impl Send for Slot {}

/// The state of one queue's worker.
pub struct QueueWorker {
    index: usize,
    device: Arc<BlkDevice>,
    metrics: Arc<QueueMetrics>,
    queue: AnyQueue,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    segments: Vec<Segment>,
    scratch_iov: Vec<libc::iovec>,
    mem: Option<GuestMemoryAtomic<GuestMemory>>,
    vring: Option<Vring>,
    /// Requests are waiting in the virtqueue because every slot is busy.
    throttled: bool,
    /// Requests answered since the guest was last notified, for the metrics: kind, bytes
    /// and start. Recorded after the notification, which they would otherwise delay.
    answered: Vec<(OpClass, u64, Instant)>,
}

// SAFETY: `scratch_iov` holds pointers only transiently during `run` (they are copied into a
// slot or dropped before `run` returns); everything else is Send.
unsafe impl Send for QueueWorker {}

impl QueueWorker {
    pub fn new(index: usize, device: Arc<BlkDevice>, queue: AnyQueue, depth: u32) -> Self {
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                kind: RequestKind::Flush,
                status: StatusByte::dangling(),
                iov: Vec::with_capacity(request::MAX_IOVECS),
                iov_start: 0,
                done: 0,
                phase: Phase::Io,
                started: Instant::now(),
                mem: None,
            })
            .collect();
        QueueWorker {
            index,
            metrics: device.queue_metrics(index),
            device,
            queue,
            slots,
            free: (0..depth as u16).rev().collect(),
            segments: Vec::with_capacity(request::MAX_SEGMENTS),
            scratch_iov: Vec::with_capacity(request::MAX_IOVECS),
            mem: None,
            vring: None,
            throttled: false,
            // Two passes' worth: a slot can be answered, refilled and answered again
            // before the notification.
            answered: Vec::with_capacity(2 * depth as usize),
        }
    }

    /// The fd that signals asynchronous completions, for the event loop.
    pub fn completion_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.queue.completion_fd()
    }

    /// Binds the worker to a new connection's guest memory; forgets the old vring.
    pub fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        debug_assert_eq!(self.queue.in_flight(), 0);
        self.mem = Some(mem);
        self.vring = None;
        self.throttled = false;
    }

    /// Handles a kick of `vring`.
    pub fn kick(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.run(vring);
    }

    /// Handles the completion eventfd.
    pub fn completions_ready(&mut self) {
        self.queue.ack_completion_fd();
        if let Some(vring) = self.vring.clone() {
            self.run(&vring);
        }
    }

    /// Serves the queue until it is idle: reap completions, pull new requests while slots
    /// are free, submit them in one batch, reap what completed inline, notify the guest.
    ///
    /// With polling on, an idle queue is watched for `poll` more (the avail ring and the
    /// completion queue are plain memory reads) before the worker goes back to sleep on its
    /// eventfds; the guest need not kick meanwhile, because notifications stay suppressed.
    /// Any activity restarts the window, so an idle queue costs no CPU.
    fn run(&mut self, vring: &Vring) {
        if self.mem.is_none() {
            return;
        }
        let poll = self.device.poll;
        let mut state = vring.get_mut();
        let _ = state.disable_notification();
        loop {
            let mut idle_since: Option<Instant> = None;
            let mut spins = 0u32;
            loop {
                let stopping = self.device.stopping.load(Ordering::Relaxed);
                let mut used = self.reap(&mut state);
                let mut progress = used;
                if !stopping {
                    progress += self.pull(&mut state, &mut used);
                }
                if let Err(e) = self.queue.submit() {
                    log::error!("queue {}: submit failed: {e}", self.index);
                }
                let inline = self.reap(&mut state);
                used += inline;
                progress += inline;
                if used > 0 {
                    self.notify(&mut state);
                }
                self.record_answered();
                if progress > 0 {
                    idle_since = None;
                    spins = 0;
                    continue;
                }
                if poll.is_zero() || stopping {
                    break;
                }
                // The clock is read every few idle looks, not on each.
                spins = spins.wrapping_add(1);
                if spins % 4 == 1 {
                    let now = Instant::now();
                    if now.duration_since(*idle_since.get_or_insert(now)) >= poll {
                        break;
                    }
                }
                let avail = {
                    let queue = state.get_queue();
                    (GuestAddress(queue.avail_ring()), queue.next_avail())
                };
                // Let the frontend thread at the vring between looks.
                drop(state);
                if self.queue.in_flight() > 0 {
                    // Requests are out with the kernel: buffered writes on most filesystems
                    // run on io_uring's worker threads, which may share this CPU. Spinning
                    // would take the CPU from the very thread we wait for (randwrite QD32
                    // with both on one CPU: the worker spent half of it polling).
                    std::thread::yield_now();
                } else {
                    self.watch_avail(avail.0, avail.1);
                }
                state = vring.get_mut();
            }
            self.metrics.set_in_flight(self.queue.in_flight());
            // Throttled: completions (their eventfd) bring us back, not kicks.
            if self.throttled || self.device.stopping.load(Ordering::Relaxed) {
                return;
            }
            // Re-enable kicks, then look once more: a request that arrived in between
            // would otherwise wait for the next kick (EVENT_IDX reports it here).
            match state.enable_notification() {
                Ok(true) => {
                    let _ = state.disable_notification();
                    continue;
                }
                _ => return,
            }
        }
    }

    /// Watches the avail index of an idle queue for a short while, returning as soon as the
    /// driver publishes a chain past `next_avail` (or after `WATCH_LOOKS` looks).
    ///
    /// A full look (reap, pull, submit, the vring lock) takes about 130 ns; this one is a
    /// single load, so a request is seen sooner. At depth 1 that matters beyond its size:
    /// a completion that lands before the client's CPU has halted saves the ~3 µs it takes
    /// to wake it, and 0.12 µs more daemon time turned most such completions into late ones
    /// (blk-compare randread-4k-qd1 deciles).
    fn watch_avail(&self, avail_ring: GuestAddress, next_avail: u16) {
        let Some(atomic) = self.mem.as_ref() else {
            return;
        };
        let mem = atomic.memory();
        // The index is the ring's second u16.
        let idx = avail_ring
            .checked_add(2)
            .and_then(|a| mem.get_slice(a, 2).ok())
            .map(|slice| slice.ptr_guard().as_ptr().cast::<u16>().cast_mut())
            .filter(|p| p.is_aligned());
        let Some(idx) = idx else {
            std::hint::spin_loop();
            return;
        };
        // SAFETY: `idx` points at two bytes inside a region of `mem` (mapped read-write),
        // which stays mapped while the guard is held (to the end of this function), and is
        // aligned for a u16. It is only loaded, and atomically: the driver writes it
        // concurrently, and virtio-queue reads it atomically too.
        let idx = unsafe { AtomicU16::from_ptr(idx) };
        for _ in 0..WATCH_LOOKS {
            if u16::from_le(idx.load(Ordering::Acquire)) != next_avail {
                return;
            }
            std::hint::spin_loop();
        }
    }

    /// Pops and starts up to a batch of requests while slots are free. Returns how many were
    /// popped.
    fn pull(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        used: &mut usize,
    ) -> usize {
        let mut pulled = 0;
        self.throttled = false;
        // The memory map is loaded for each batch, after reading how many chains the driver
        // has published: a driver maps a new region (libblkio maps buffers as it goes) and
        // waits for our acknowledgement before it publishes a chain that uses it, so a map
        // loaded after seeing the chain knows the region; one loaded before may not, and a
        // busy, polling worker would keep translating with a stale one. So the batch takes
        // only the chains published before the load. Each slot that takes a request holds
        // a reference. A polling worker mostly finds nothing: it finds out before paying for
        // the reference and a clock reading.
        let (mem, now, published) = {
            let Some(atomic) = self.mem.as_ref() else {
                return 0;
            };
            let queue = state.get_queue();
            let published = queue
                .avail_idx(&*atomic.memory(), Ordering::Acquire)
                .map_or(usize::MAX, |i| {
                    usize::from(i.0.wrapping_sub(queue.next_avail()))
                });
            // With every slot busy the loop below still runs, to note the throttling.
            if published == 0 && !self.free.is_empty() {
                return 0;
            }
            // A second load, on purpose: the one above may predate the published chains'
            // regions.
            (atomic.memory().into_inner(), Instant::now(), published)
        };
        loop {
            if pulled == crate::device::SUBMIT_BATCH || (pulled > 0 && pulled >= published) {
                return pulled;
            }
            if self.free.is_empty() {
                self.throttled = true;
                self.metrics.throttled();
                return pulled;
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                return pulled;
            };
            let head = chain.head_index();
            pulled += 1;
            let capacity = self.device.capacity();
            // virtio-queue pops the head (and checks it); the chain is walked by our reader,
            // which maps the descriptor table once rather than once per descriptor.
            let queue = state.get_queue();
            let descriptors = daemon_support::chain::Descriptors::new(
                &*mem,
                GuestAddress(queue.desc_table()),
                queue.size(),
                head,
            );
            let parsed = request::parse(
                descriptors,
                &*mem,
                capacity,
                &mut self.segments,
                &mut self.scratch_iov,
            );
            if self.begin(state, head, parsed, &mem, now) {
                *used += 1;
            }
            if self.throttled {
                return pulled;
            }
        }
    }

    /// Starts one parsed request, or answers it at once. Returns true if it was answered
    /// (added to the used ring) here.
    fn begin(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        head: u16,
        parsed: Parsed,
        mem: &Arc<GuestMemory>,
        now: Instant,
    ) -> bool {
        let (kind, status) = match parsed {
            Parsed::Dropped => {
                log::warn!(
                    "queue {}: chain {head} has no status byte; returned unused",
                    self.index
                );
                self.metrics.failed(OpClass::Other, ErrorClass::Malformed);
                add_used(state, head, 0);
                return true;
            }
            Parsed::Refused { status, refusal } => {
                if refusal.error != ErrorClass::Unsupported {
                    log::warn!(
                        "queue {}: {:?} request refused ({:?})",
                        self.index,
                        refusal.class,
                        refusal.error
                    );
                }
                // SAFETY: `status` was translated from `mem`, which we hold.
                unsafe { status.write(refusal.status) };
                self.metrics.failed(refusal.class, refusal.error);
                add_used(state, head, 1);
                return true;
            }
            Parsed::Request { kind, status } => (kind, status),
        };
        if let RequestKind::GetId { .. } = kind {
            let serial = self.device.serial();
            // SAFETY: the iovecs were translated from writable guest memory in `mem`.
            let n = unsafe { request::copy_to_iov(&self.scratch_iov, serial) };
            // SAFETY: as above for the status byte.
            unsafe { status.write(VIRTIO_BLK_S_OK) };
            self.metrics
                .completed(OpClass::Other, n as u64, Default::default());
            add_used(state, head, n as u32 + 1);
            return true;
        }
        let Some(index) = self.free.pop() else {
            // `pull` checks for a free slot first; should none be left, give the chain back.
            state.get_queue_mut().go_to_previous_position();
            self.throttled = true;
            return false;
        };
        let slot = &mut self.slots[index as usize];
        std::mem::swap(&mut slot.iov, &mut self.scratch_iov);
        slot.head = head;
        slot.kind = kind;
        slot.status = status;
        slot.iov_start = 0;
        slot.done = 0;
        slot.phase = Phase::Io;
        slot.started = now;
        slot.mem = Some(mem.clone());
        match start(&mut self.queue, slot, index) {
            Ok(()) => false,
            Err(StartError::Busy) => {
                // Give the chain back to the ring and retry after completions.
                slot.mem = None;
                self.free.push(index);
                state.get_queue_mut().go_to_previous_position();
                self.throttled = true;
                self.metrics.throttled();
                false
            }
            Err(e) => {
                log::warn!("queue {}: {:?} refused by the disk: {e}", self.index, kind);
                let error = match e {
                    StartError::OutOfRange => ErrorClass::OutOfRange,
                    StartError::ReadOnly => ErrorClass::ReadOnly,
                    StartError::Busy => ErrorClass::Io,
                };
                self.metrics.failed(kind.class(), error);
                self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
                true
            }
        }
    }

    /// Reaps completions; returns how many requests were answered.
    fn reap(&mut self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) -> usize {
        let mut answered = 0;
        while let Some(c) = self.queue.pop_completion() {
            let index = c.user_data as u16;
            if self.complete(state, index, c.result) {
                answered += 1;
            }
        }
        answered
    }

    /// Records the requests answered since the last call in the metrics, with one clock
    /// reading: their latency runs to the guest's notification.
    fn record_answered(&mut self) {
        if self.answered.is_empty() {
            return;
        }
        let now = Instant::now();
        for (class, bytes, started) in self.answered.drain(..) {
            self.metrics
                .completed(class, bytes, now.saturating_duration_since(started));
        }
    }

    /// Advances one request after an engine completion. Returns true if it was answered.
    fn complete(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        index: u16,
        result: i32,
    ) -> bool {
        let slot = &mut self.slots[index as usize];
        let class = slot.kind.class();
        if result < 0 {
            log::warn!(
                "queue {}: {:?} failed: {}",
                self.index,
                slot.kind,
                std::io::Error::from_raw_os_error(-result)
            );
            self.metrics.failed(class, ErrorClass::Io);
            self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
            return true;
        }
        if slot.phase == Phase::Io {
            if let RequestKind::Read { len, .. } | RequestKind::Write { len, .. } = slot.kind {
                let n = result as u64;
                slot.done += n;
                if slot.done < len {
                    // A short transfer: continue where it stopped, unless it made no progress.
                    if n == 0 {
                        self.metrics.failed(class, ErrorClass::Io);
                        self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
                        return true;
                    }
                    advance(slot, n);
                    if start(&mut self.queue, slot, index).is_err() {
                        self.metrics.failed(class, ErrorClass::Io);
                        self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
                        return true;
                    }
                    return false;
                }
                if matches!(slot.kind, RequestKind::Write { .. })
                    && !self.device.writeback.load(Ordering::Relaxed)
                {
                    slot.phase = Phase::FlushAfterWrite;
                    // SAFETY: a flush carries no buffers.
                    if unsafe { self.queue.start(DiskOp::Flush, u64::from(index)) }.is_err() {
                        self.metrics.failed(class, ErrorClass::Io);
                        self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
                        return true;
                    }
                    return false;
                }
            }
        }
        let (bytes, used_len) = match slot.kind {
            RequestKind::Read { len, .. } => (len, len as u32 + 1),
            RequestKind::Write { len, .. } => (len, 1),
            _ => (0, 1),
        };
        let started = slot.started;
        if self.answered.len() == self.answered.capacity() {
            self.record_answered();
        }
        self.answered.push((class, bytes, started));
        self.finish(state, index, VIRTIO_BLK_S_OK, used_len);
        true
    }

    /// Writes the status, returns the chain to the guest and frees the slot.
    fn finish(
        &mut self,
        state: &mut VringState<GuestMemoryAtomic<GuestMemory>>,
        index: u16,
        status: u8,
        used_len: u32,
    ) {
        let slot = &mut self.slots[index as usize];
        // SAFETY: the status pointer was translated from `slot.mem`, still held here.
        unsafe { slot.status.write(status) };
        add_used(state, slot.head, used_len);
        slot.mem = None;
        self.free.push(index);
    }

    fn notify(&self, state: &mut VringState<GuestMemoryAtomic<GuestMemory>>) {
        match state.needs_notification() {
            Ok(true) | Err(_) => {
                if let Err(e) = state.signal_used_queue() {
                    log::warn!("queue {}: cannot signal the guest: {e}", self.index);
                }
            }
            Ok(false) => {}
        }
    }

    /// Waits for every request in flight to complete and answers them. Used when the
    /// frontend stops the ring, disconnects, or the daemon shuts down.
    pub fn drain(&mut self) {
        while self.queue.in_flight() > 0 {
            if let Some(vring) = self.vring.clone() {
                let mut state = vring.get_mut();
                let answered = self.reap(&mut state);
                if answered > 0 {
                    self.notify(&mut state);
                }
                self.record_answered();
            } else {
                while let Some(c) = self.queue.pop_completion() {
                    let slot = &mut self.slots[c.user_data as usize];
                    slot.mem = None;
                    self.free.push(c.user_data as u16);
                }
            }
            if self.queue.in_flight() > 0 {
                if let Err(e) = self.queue.submit().and_then(|_| self.queue.wait()) {
                    log::error!("queue {}: cannot wait for in-flight I/O: {e}", self.index);
                    break;
                }
            }
        }
        self.metrics.set_in_flight(self.queue.in_flight());
    }
}

/// Starts (or continues) the slot's operation on the disk queue.
fn start(queue: &mut AnyQueue, slot: &Slot, index: u16) -> Result<(), StartError> {
    let iov = &slot.iov[slot.iov_start..];
    let op = match slot.kind {
        RequestKind::Read { offset, .. } => DiskOp::Read {
            offset: offset + slot.done,
            iov,
        },
        RequestKind::Write { offset, .. } => DiskOp::Write {
            offset: offset + slot.done,
            iov,
        },
        RequestKind::Flush => DiskOp::Flush,
        RequestKind::Discard { offset, len } => DiskOp::Discard { offset, len },
        RequestKind::WriteZeroes { offset, len, unmap } => {
            DiskOp::WriteZeroes { offset, len, unmap }
        }
        RequestKind::GetId { .. } => return Err(StartError::OutOfRange),
    };
    // SAFETY: the iovecs live in the slot, which is neither reused nor modified until this
    // operation completes, and describe guest memory kept mapped by `slot.mem`.
    unsafe { queue.start(op, u64::from(index)) }
}

/// Skips `n` transferred bytes of the slot's iovecs.
fn advance(slot: &mut Slot, mut n: u64) {
    while n > 0 && slot.iov_start < slot.iov.len() {
        let v = &mut slot.iov[slot.iov_start];
        if n >= v.iov_len as u64 {
            n -= v.iov_len as u64;
            slot.iov_start += 1;
        } else {
            // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n as usize) }.cast();
            v.iov_len -= n as usize;
            n = 0;
        }
    }
}

fn add_used(state: &mut VringState<GuestMemoryAtomic<GuestMemory>>, head: u16, len: u32) {
    if let Err(e) = state.add_used(head, len) {
        log::warn!("cannot add chain {head} to the used ring: {e}");
    }
}
