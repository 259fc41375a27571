//! One queue worker: takes requests from one virtqueue, runs them on that worker's own disk
//! queue (its own io_uring), and puts completions on the used ring. The loop around it
//! (passes, polling, sleeping) is `daemon_support::serve`; this module is the virtio-blk
//! request handling it drives.
//!
//! The path of a request: a kick (or a completion, or a freed slot) starts a pass; `pull`
//! pops every available chain while a slot is free, parses it into buffers in guest memory
//! ([`IoVecs`], which the disk queue owns until the request completes), starts it on the
//! disk queue, and the pass submits the whole batch at once. Completions (often ready right
//! after submit for page-cached data) are reaped in the same pass, their status bytes
//! written and the guest notified once per batch.
//!
//! Slots, buffer lists and scratch space are allocated when the worker is created; the hot
//! path allocates nothing. No lock is shared with other queues: the worker's own mutex is
//! taken only by its event-loop thread, and by the control thread when it drains the queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::VringT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic};

use storage_core::disk::{AnyQueue, DiskOp, DiskQueue, IoVecs, StartError};
use storage_core::metrics::{ErrorClass, OpClass, QueueMetrics};

use daemon_support::serve::{self, add_used, QueueCore, QueueService, State};

use crate::device::BlkDevice;
use crate::request::{self, Parsed, RequestKind, Segment, StatusByte};
use crate::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};

pub use daemon_support::transport::{GuestMemory, Vring};

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
    /// Data buffers in guest memory (capacity `MAX_IOVECS`, allocated once): here while the
    /// request is not with the disk queue, which owns them meanwhile and gives them back
    /// with the completion. Advanced past what a short transfer moved.
    buffers: Option<IoVecs>,
    /// Data bytes transferred so far.
    done: u64,
    phase: Phase,
    started: Instant,
    /// Keeps the guest memory the status byte points into mapped until the request
    /// completes, even if the frontend replaces the memory table meanwhile (the buffers
    /// hold their own reference). Kept after the request, until the map changes.
    mem: Option<Arc<GuestMemory>>,
}

// SAFETY: the status byte points into guest memory that the slot keeps mapped through
// `mem`; it is only written by the thread that currently owns the worker (behind its
// mutex), so moving a slot between threads is sound.
unsafe impl Send for Slot {}

/// Warnings a guest can cause at will (refused requests; failed ones, which a guest can
/// repeat): the first few, then one line per interval counting those left out, so that a
/// guest cannot flood the host's log or fill its disk. The counters in `/metrics` count
/// them all. Refusals and I/O failures are limited apart, so refusals cannot hide failures.
#[derive(Debug, Default)]
struct WarningLimit {
    written: u32,
    last: Option<Instant>,
    left_out: u64,
}

impl WarningLimit {
    const FREE: u32 = 10;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    /// `Some(n)`: write this one, saying `n` were left out before it.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.written < Self::FREE {
            self.written += 1;
            self.last = Some(now);
            return Some(std::mem::take(&mut self.left_out));
        }
        match self.last {
            Some(t) if now.duration_since(t) < Self::EVERY => {
                self.left_out += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.left_out))
            }
        }
    }
}

/// " (N more since the last line)" when lines were left out.
struct LeftOut(u64);

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(
                f,
                " ({n} more of this queue's warnings left out since the last line)"
            ),
        }
    }
}

/// The state of one queue's worker.
pub struct QueueWorker {
    /// The ring, its memory and health, the polling window.
    core: QueueCore,
    device: Arc<BlkDevice>,
    metrics: Arc<QueueMetrics>,
    queue: AnyQueue,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    segments: Vec<Segment>,
    /// Where the next chain's data buffers are described; swapped into the slot that
    /// takes the request.
    scratch_iov: IoVecs,
    /// The guest memory map the slots' references are to (see `release_idle_slots`).
    map: Option<Arc<GuestMemory>>,
    /// Requests answered since the guest was last notified, for the metrics: kind, bytes
    /// and start. Recorded after the notification, which they would otherwise delay.
    answered: Vec<(OpClass, u64, Instant)>,
    /// Requests refused (the guest's doing).
    refusals: WarningLimit,
    /// Requests the storage failed.
    failures: WarningLimit,
    /// Raised when a pause ends ([`Self::kick_self`]).
    wake: vmm_sys_util::eventfd::EventFd,
}

impl QueueWorker {
    pub fn new(
        index: usize,
        device: Arc<BlkDevice>,
        queue: AnyQueue,
        depth: u32,
    ) -> std::io::Result<Self> {
        let wake = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                kind: RequestKind::Flush,
                status: StatusByte::dangling(),
                buffers: Some(IoVecs::with_capacity(request::MAX_IOVECS)),
                done: 0,
                phase: Phase::Io,
                started: Instant::now(),
                mem: None,
            })
            .collect();
        Ok(QueueWorker {
            core: {
                let mut core = QueueCore::new(index, device.poll);
                // vhost-blk's workers see the host's /proc.
                core.poll = core.poll.with_run_delay();
                core
            },
            metrics: device.queue_metrics(index),
            device,
            queue,
            slots,
            free: (0..depth as u16).rev().collect(),
            segments: Vec::with_capacity(request::MAX_SEGMENTS),
            scratch_iov: IoVecs::with_capacity(request::MAX_IOVECS),
            map: None,
            // Two passes' worth: a slot can be answered, refilled and answered again
            // before the notification.
            answered: Vec::with_capacity(2 * depth as usize),
            refusals: WarningLimit::default(),
            failures: WarningLimit::default(),
            wake,
        })
    }

    /// What the worker's queue would wake on under a throttle node (see
    /// [`put_under_throttle`](Self::put_under_throttle)).
    pub fn throttle_wakeup(&self) -> std::io::Result<storage_core::throttle::Wakeup> {
        self.queue.throttle_wakeup()
    }

    /// Puts the worker's queue under a throttle node of `group` (the worker is idle),
    /// waking on `wakeup`, made for it.
    pub fn put_under_throttle(
        &mut self,
        wakeup: storage_core::throttle::Wakeup,
        group: Arc<storage_core::throttle::ThrottleGroup>,
    ) {
        let capacity = self.device.info().capacity.clone();
        let depth = self.slots.len() as u32;
        self.queue
            .put_under_throttle(wakeup, group, capacity, depth)
    }

    /// The fd that signals asynchronous completions, for the event loop.
    pub fn completion_fd(&self) -> Option<std::os::unix::io::RawFd> {
        self.queue.completion_fd()
    }

    /// Binds the worker to a new connection's guest memory; forgets the old vring and
    /// every reference to the old memory.
    pub fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        debug_assert_eq!(self.queue.in_flight(), 0);
        self.core.attach(mem);
        self.release_idle_slots();
        self.map = None;
    }

    /// Drops the references idle slots (and the scratch list) keep to guest memory. A slot
    /// keeps its reference from one request to the next, so that the data path takes no
    /// reference count per request while the memory map stays the same; when it changes,
    /// the old map must not stay mapped for them. A new frontend releases them at once
    /// (`attach`); a new memory table at the queue's next pass (an idle queue keeps the
    /// old map until then).
    fn release_idle_slots(&mut self) {
        for &i in &self.free {
            let slot = &mut self.slots[usize::from(i)];
            slot.mem = None;
            if let Some(b) = slot.buffers.as_mut() {
                b.clear();
            }
        }
        self.scratch_iov.clear();
    }

    /// Handles a kick of `vring`.
    pub fn kick(&mut self, vring: &Vring) {
        self.core.kicked(vring);
        serve::serve(self, vring);
    }

    /// Wakes the worker's thread to serve its ring (a pause may have left requests in the
    /// ring with notifications off): its own eventfd, not one the frontend gave.
    pub fn kick_self(&self) {
        let _ = self.wake.write(1);
    }

    /// The eventfd [`kick_self`](Self::kick_self) raises, for the event loop.
    pub fn wake_fd(&self) -> std::os::unix::io::RawFd {
        use std::os::fd::AsRawFd;
        self.wake.as_raw_fd()
    }

    /// Its eventfd was raised: serve the ring.
    pub fn resumed(&mut self) {
        let _ = self.wake.read();
        if let Some(vring) = self.core.vring.clone() {
            serve::serve(self, &vring);
        }
    }

    /// Handles the completion eventfd.
    pub fn completions_ready(&mut self) {
        self.queue.ack_completion_fd();
        if let Some(vring) = self.core.vring.clone() {
            serve::serve(self, &vring);
        }
    }

    /// Pops and starts up to a batch of requests while slots are free. Returns how many were
    /// popped.
    fn pull(&mut self, state: &mut State, used: &mut usize) -> usize {
        let mut pulled = 0;
        self.core.throttled = false;
        // The memory map is loaded for each batch, after reading how many chains the driver
        // has published: a driver maps a new region (libblkio maps buffers as it goes) and
        // waits for our acknowledgement before it publishes a chain that uses it, so a map
        // loaded after seeing the chain knows the region; one loaded before may not, and a
        // busy, polling worker would keep translating with a stale one. So the batch takes
        // only the chains published before the load. Each slot that takes a request holds
        // a reference. A polling worker mostly finds nothing: it finds out before paying for
        // the reference and a clock reading.
        let (mem, now, published) = {
            let Some(atomic) = self.core.mem.as_ref() else {
                return 0;
            };
            let queue = state.get_queue();
            let metrics = &self.metrics;
            let Some(published) =
                self.core
                    .health
                    .published(self.core.index, queue, &*atomic.memory(), || {
                        metrics.failed(OpClass::Other, ErrorClass::Malformed)
                    })
            else {
                return 0;
            };
            // With every slot busy the loop below still runs, to note the throttling.
            if published == 0 && !self.free.is_empty() {
                return 0;
            }
            // A second load, on purpose: the one above may predate the published chains'
            // regions.
            (atomic.memory().into_inner(), Instant::now(), published)
        };
        if !self.map.as_ref().is_some_and(|m| Arc::ptr_eq(m, &mem)) {
            self.release_idle_slots();
            self.map = Some(mem.clone());
        }
        let batch = if self.core.poll.shared(now) {
            crate::device::SUBMIT_BATCH_SHARED
        } else {
            crate::device::SUBMIT_BATCH
        };
        loop {
            if pulled == batch || (pulled > 0 && pulled >= published) {
                return pulled;
            }
            if self.free.is_empty() {
                self.core.throttled = true;
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
                &mem,
                capacity,
                &mut self.segments,
                &mut self.scratch_iov,
            );
            if self.begin(state, head, parsed, &mem, now) {
                *used += 1;
            }
            if self.core.throttled {
                return pulled;
            }
        }
    }

    /// Starts one parsed request, or answers it at once. Returns true if it was answered
    /// (added to the used ring) here.
    fn begin(
        &mut self,
        state: &mut State,
        head: u16,
        parsed: Parsed,
        mem: &Arc<GuestMemory>,
        now: Instant,
    ) -> bool {
        let (kind, status) = match parsed {
            Parsed::Dropped => {
                if let Some(n) = self.refusals.allow() {
                    log::warn!(
                        "queue {}: chain {head} has no status byte; returned unused{}",
                        self.core.index,
                        LeftOut(n)
                    );
                }
                self.metrics.failed(OpClass::Other, ErrorClass::Malformed);
                add_used(state, head, 0);
                return true;
            }
            Parsed::Refused { status, refusal } => {
                if refusal.error != ErrorClass::Unsupported {
                    if let Some(n) = self.refusals.allow() {
                        log::warn!(
                            "queue {}: {:?} request refused ({:?}){}",
                            self.core.index,
                            refusal.class,
                            refusal.error,
                            LeftOut(n)
                        );
                    }
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
            let n = self.scratch_iov.copy_from(0, serial);
            self.scratch_iov.clear_buffers();
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
            self.core.throttled = true;
            return false;
        };
        let slot = &mut self.slots[index as usize];
        // An idle slot has its buffers; should a node ever keep them, a new list replaces
        // them.
        let spare = slot
            .buffers
            .take()
            .unwrap_or_else(|| IoVecs::with_capacity(request::MAX_IOVECS));
        slot.buffers = Some(std::mem::replace(&mut self.scratch_iov, spare));
        slot.head = head;
        slot.kind = kind;
        slot.status = status;
        slot.done = 0;
        slot.phase = Phase::Io;
        slot.started = now;
        if !slot.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, mem)) {
            slot.mem = Some(mem.clone());
        }
        match start(&mut self.queue, slot, index) {
            Ok(()) => false,
            Err(StartError::Busy) => {
                // Give the chain back to the ring and retry after completions.
                if let Some(b) = slot.buffers.as_mut() {
                    b.clear_buffers();
                }
                self.free.push(index);
                state.get_queue_mut().go_to_previous_position();
                self.core.throttled = true;
                self.metrics.throttled();
                false
            }
            Err(e) => {
                if let Some(n) = self.refusals.allow() {
                    log::warn!(
                        "queue {}: {:?} refused by the disk: {e}{}",
                        self.core.index,
                        kind,
                        LeftOut(n)
                    );
                }
                let error = match e {
                    StartError::OutOfRange => ErrorClass::OutOfRange,
                    StartError::ReadOnly => ErrorClass::ReadOnly,
                    StartError::Busy | StartError::BadTag => ErrorClass::Io,
                };
                self.metrics.failed(kind.class(), error);
                self.finish(state, index, VIRTIO_BLK_S_IOERR, 1);
                true
            }
        }
    }

    /// Reaps completions; returns how many requests were answered.
    fn reap(&mut self, state: &mut State) -> usize {
        let mut answered = 0;
        while let Some(c) = self.queue.pop_completion() {
            let index = c.tag as u16;
            if c.buffers.is_some() {
                self.slots[index as usize].buffers = c.buffers;
            }
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
    fn complete(&mut self, state: &mut State, index: u16, result: i32) -> bool {
        let slot = &mut self.slots[index as usize];
        let class = slot.kind.class();
        if result < 0 {
            if let Some(n) = self.failures.allow() {
                log::warn!(
                    "queue {}: {:?} failed: {}{}",
                    self.core.index,
                    slot.kind,
                    std::io::Error::from_raw_os_error(-result),
                    LeftOut(n)
                );
            }
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
                    if let Some(b) = slot.buffers.as_mut() {
                        b.advance(n);
                    }
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
                    if self.queue.start(DiskOp::Flush, u64::from(index)).is_err() {
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
    fn finish(&mut self, state: &mut State, index: u16, status: u8, used_len: u32) {
        let slot = &mut self.slots[index as usize];
        // SAFETY: the status pointer was translated from `slot.mem`, still held here.
        unsafe { slot.status.write(status) };
        add_used(state, slot.head, used_len);
        // The slot keeps its references to guest memory for its next request (see
        // `release_idle_slots`), unless the map has changed since it took them.
        let current = match (&slot.mem, &self.map) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        if let Some(b) = slot.buffers.as_mut() {
            if current {
                b.clear_buffers();
            } else {
                b.clear();
            }
        }
        if !current {
            slot.mem = None;
        }
        self.free.push(index);
    }

    /// Waits for every request in flight to complete and answers them. Used when the
    /// frontend stops the ring, disconnects, or the daemon shuts down.
    pub fn drain(&mut self) {
        self.finish_in_flight();
        // Whatever follows (a new ring base, a new frontend, shutdown) starts the ring anew.
        self.core.health.reset();
    }

    /// Answers every request in flight and leaves the ring as it is (a pause: a snapshot);
    /// whether nothing is left in flight.
    pub fn finish_in_flight(&mut self) -> bool {
        while self.queue.in_flight() > 0 {
            if let Some(vring) = self.core.vring.clone() {
                let mut state = vring.get_mut();
                let answered = self.reap(&mut state);
                if answered > 0 {
                    serve::notify(&mut state, self.core.index);
                }
                self.record_answered();
            } else {
                while let Some(c) = self.queue.pop_completion() {
                    let slot = &mut self.slots[c.tag as usize];
                    slot.mem = None;
                    slot.buffers = c.buffers.or(slot.buffers.take());
                    if let Some(b) = slot.buffers.as_mut() {
                        b.clear();
                    }
                    self.free.push(c.tag as u16);
                }
            }
            if self.queue.in_flight() > 0 {
                if let Err(e) = self.queue.submit().and_then(|_| self.queue.wait()) {
                    log::error!(
                        "queue {}: cannot wait for in-flight I/O: {e}",
                        self.core.index
                    );
                    break;
                }
            }
        }
        self.metrics.set_in_flight(self.queue.in_flight());
        self.queue.in_flight() == 0
    }
}

impl QueueService for QueueWorker {
    fn core(&self) -> &QueueCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut QueueCore {
        &mut self.core
    }
    fn reap(&mut self, state: &mut State) -> usize {
        QueueWorker::reap(self, state)
    }
    fn pull(&mut self, state: &mut State, used: &mut usize) -> usize {
        QueueWorker::pull(self, state, used)
    }
    fn submit(&mut self) {
        if let Err(e) = self.queue.submit() {
            log::error!("queue {}: submit failed: {e}", self.core.index);
        }
    }
    fn after_pass(&mut self) {
        self.record_answered();
    }
    fn in_flight(&self) -> usize {
        self.queue.in_flight()
    }
    fn held(&self) -> usize {
        self.queue.held()
    }
    fn stopping(&self) -> bool {
        self.device.stopping.load(Ordering::Relaxed)
    }
    fn sleeping(&mut self) {
        self.metrics.set_in_flight(self.queue.in_flight());
    }
}

/// Starts (or continues) the slot's operation on the disk queue; a read or write takes the
/// slot's buffers with it. A request not started leaves them in the slot.
fn start(queue: &mut AnyQueue, slot: &mut Slot, index: u16) -> Result<(), StartError> {
    let op = match slot.kind {
        RequestKind::Read { offset, .. } | RequestKind::Write { offset, .. } => {
            let Some(buffers) = slot.buffers.take() else {
                return Err(StartError::OutOfRange);
            };
            let offset = offset + slot.done;
            if matches!(slot.kind, RequestKind::Read { .. }) {
                DiskOp::Read { offset, buffers }
            } else {
                DiskOp::Write { offset, buffers }
            }
        }
        RequestKind::Flush => DiskOp::Flush,
        RequestKind::Discard { offset, len } => DiskOp::Discard { offset, len },
        RequestKind::WriteZeroes { offset, len, unmap } => {
            DiskOp::WriteZeroes { offset, len, unmap }
        }
        RequestKind::GetId { .. } => return Err(StartError::OutOfRange),
    };
    queue.start(op, u64::from(index)).map_err(|r| {
        if let Some(b) = r.op.into_buffers() {
            slot.buffers = Some(b);
        }
        r.error
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    use storage_core::disk::{open_disk, Disk, DiskSpec};
    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use crate::virtio_blk::VIRTIO_BLK_T_IN;

    const RING: u16 = 16;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    /// A worker on a 1 MiB null disk, attached to 1 MiB of guest memory, and its ring (laid
    /// out by virtio-queue's mock at address 0, started).
    fn setup(poll: Duration) -> (Guest, Vring, QueueWorker) {
        let gm = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        let spec: DiskSpec = "path=null,size=1M".parse().unwrap();
        let disk = open_disk(&spec).unwrap();
        let device = Arc::new(BlkDevice::new("t".into(), spec, disk, 1, RING, 4, poll));
        let queue = device.disk.new_queue(4).unwrap();
        let mut worker = QueueWorker::new(0, device, queue, 4).unwrap();
        worker.attach(mem.clone());
        let vring = Vring::new(mem.clone(), RING).unwrap();
        let guard = mem.memory();
        // Creating the mock zeroes the rings' headers; it is not kept, as it borrows.
        let mock = MockSplitQueue::new(&*guard, RING);
        vring.set_queue_size(RING);
        vring
            .set_queue_info(
                mock.desc_table_addr().0,
                mock.avail_addr().0,
                mock.used_addr().0,
            )
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let (avail, used) = (mock.avail_addr().0, mock.used_addr().0);
        drop(guard);
        (Guest { mem, avail, used }, vring, worker)
    }

    /// A test's guest memory and where its rings are (the descriptor table is at 0).
    struct Guest {
        mem: GuestMemoryAtomic<GuestMemory>,
        avail: u64,
        used: u64,
    }

    /// Publishes a 512-byte read of sector 1 in descriptors `at`..`at + 3`.
    fn publish_read(g: &Guest, at: u16) {
        let guard = g.mem.memory();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&1u64.to_le_bytes());
        guard.write_slice(&h, GuestAddress(HDR)).unwrap();
        guard.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let descs = [
            SplitDescriptor::new(HDR, 16, next, at + 1),
            SplitDescriptor::new(DATA, 512, write | next, at + 2),
            SplitDescriptor::new(STATUS, 1, write, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            let addr = GuestAddress(16 * (u64::from(at) + i as u64));
            guard.write_obj(RawDescriptor::from(d), addr).unwrap();
        }
        let idx: u16 = guard.read_obj(GuestAddress(g.avail + 2)).unwrap();
        let slot = GuestAddress(g.avail + 4 + 2 * u64::from(idx % RING));
        guard.write_obj(at, slot).unwrap();
        set_avail_idx(g, idx.wrapping_add(1));
    }

    fn set_avail_idx(g: &Guest, idx: u16) {
        g.mem
            .memory()
            .write_obj(idx, GuestAddress(g.avail + 2))
            .unwrap();
    }

    fn used_idx(g: &Guest) -> u16 {
        g.mem.memory().read_obj(GuestAddress(g.used + 2)).unwrap()
    }

    /// Runs one kick on another thread and fails the test if it does not return.
    fn kick_returns(worker: QueueWorker, vring: &Vring) -> QueueWorker {
        let (tx, rx) = mpsc::channel();
        let vring = vring.clone();
        std::thread::spawn(move || {
            let mut worker = worker;
            worker.kick(&vring);
            let _ = tx.send(worker);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the worker kept running after its kick: it never went back to sleep")
    }

    #[test]
    fn a_kick_answers_a_read_and_the_worker_returns() {
        for poll in [Duration::ZERO, Duration::from_micros(200)] {
            let (g, vring, worker) = setup(poll);
            publish_read(&g, 0);
            let worker = kick_returns(worker, &vring);
            assert_eq!(used_idx(&g), 1, "poll {poll:?}: the read was not answered");
            let status: u8 = g.mem.memory().read_obj(GuestAddress(STATUS)).unwrap();
            assert_eq!(status, VIRTIO_BLK_S_OK, "poll {poll:?}");
            assert_eq!(worker.metrics.requests(OpClass::Read), 1, "poll {poll:?}");
        }
    }

    /// A driver that moves its avail index further ahead than the ring holds gets no more
    /// requests taken, and the worker does not spin on the bad index (holding its lock, it
    /// would block the frontend's next connection); once the ring is reset, it serves again.
    #[test]
    fn an_avail_index_past_the_ring_stops_the_queue_until_it_is_reset() {
        let (g, vring, worker) = setup(Duration::from_micros(200));
        set_avail_idx(&g, RING + 1);
        let worker = kick_returns(worker, &vring);
        assert_eq!(used_idx(&g), 0);
        assert_eq!(worker.metrics.errors(ErrorClass::Malformed), 1);
        // A second kick changes nothing and is not reported again.
        let mut worker = kick_returns(worker, &vring);
        assert_eq!(worker.metrics.errors(ErrorClass::Malformed), 1);

        // The frontend stops the ring (GET_VRING_BASE marks it not ready and drains it). A
        // kick that still arrives meets the bad index on a stopped ring: nothing happens.
        vring.set_queue_ready(false);
        worker.drain();
        let worker = kick_returns(worker, &vring);
        assert_eq!(worker.metrics.errors(ErrorClass::Malformed), 1);
        // Restarted from next_avail, with a sane index, the queue serves again.
        set_avail_idx(&g, 0);
        publish_read(&g, 0);
        vring.set_queue_ready(true);
        let worker = kick_returns(worker, &vring);
        assert_eq!(used_idx(&g), 1, "the reset ring was not served");
        assert_eq!(worker.metrics.requests(OpClass::Read), 1);
    }

    #[test]
    fn a_guest_cannot_flood_the_log_with_refusals() {
        let mut w = WarningLimit::default();
        for _ in 0..WarningLimit::FREE {
            assert_eq!(w.allow(), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(w.allow(), None);
        }
        // The next line, an interval later, counts what was left out.
        w.last = Some(Instant::now() - WarningLimit::EVERY);
        assert_eq!(w.allow(), Some(1000));
        assert_eq!(w.allow(), None);
    }
}
