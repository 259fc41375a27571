//! One queue worker: takes FUSE requests from one virtqueue, answers metadata requests
//! through the server at once, and runs READ and WRITE on the worker's own I/O engine (its
//! own io_uring) straight between the host file and guest memory, many in flight.
//!
//! A kick (or a completion) calls [`QueueWorker::run`]: it pops chains while a slot is free,
//! copies each request's header and arguments out of guest memory (WRITE data stays where
//! it is), hands them to the server, and either writes the reply at once or starts the data
//! transfer on the engine. The batch is submitted in one call; completions are reaped, their
//! reply headers written and the guest notified once per pass. SETLKW, which can block for
//! as long as another holder keeps its lock, and INTERRUPT, which may wait for its target,
//! run on a thread of their own. With `--thread-pool-size N` (N > 0), every other request
//! that makes blocking system calls (see [`server::runs_inline`]) runs on the daemon's
//! [`ThreadPool`] instead of the queue's thread, so one slow operation does not hold up the
//! queue; its reply is put on the used ring when it completes, in completion order.
//! Replies from other threads come back through the worker's deferred-reply eventfd.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use storage_core::engine::{AnyEngine, EngineOp, FileId, IoEngine};
use storage_core::iov::IoVecs;
use storage_core::metrics::{ErrorClass, OpClass, QueueMetrics};

use crate::device::FsDevice;
use crate::fuse::{self, opcode, IN_HEADER_LEN, OUT_HEADER_LEN, WRITE_IN_LEN};
use crate::pool::ThreadPool;
use crate::server::{self, Outcome, Reply, Server};
use daemon_support::chain::{self, Segment};
use daemon_support::serve::{self, add_used, QueueCore, QueueService, State};

pub use daemon_support::transport::{GuestMemory, Vring};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// A request running on the thread pool: it finishes soon, so `drain` waits for it.
    Pooled,
    /// A request running on its own thread, for as long as it blocks.
    Blocking,
}

/// A reply coming back from another thread: the slot and what to answer (`None`: return
/// the chain without a reply).
type Deferred = (u16, Option<Reply>);

struct Slot {
    head: u16,
    unique: u64,
    kind: Kind,
    class: OpClass,
    file: Option<Arc<File>>,
    offset: u64,
    len: u64,
    done: u64,
    /// The data buffers in guest memory (capacity `MAX_IOVECS`, allocated once), advanced
    /// past what a short write moved; they keep the guest memory mapped while they hold it.
    iov: IoVecs,
    /// The chain's segments, to write the reply header when the transfer completes.
    segments: Vec<Segment>,
    started: Instant,
    /// Keeps the guest memory the iovecs point into mapped until the request completes.
    mem: Option<Arc<GuestMemory>>,
}

pub struct QueueWorker {
    /// The ring, its memory and health, the polling window.
    core: QueueCore,
    device: Arc<FsDevice>,
    metrics: Arc<QueueMetrics>,
    engine: AnyEngine,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    segments: Vec<Segment>,
    msg: Vec<u8>,
    deferred_tx: Sender<Deferred>,
    deferred_rx: Receiver<Deferred>,
    deferred_fd: Arc<EventFd>,
    /// `--thread-pool-size` > 0: the pool shared by every queue.
    pool: Option<Arc<ThreadPool>>,
    /// Requests of this queue on the pool.
    pooled: usize,
}

impl QueueWorker {
    pub fn new(
        index: usize,
        device: Arc<FsDevice>,
        engine: AnyEngine,
        depth: u32,
        pool: Option<Arc<ThreadPool>>,
    ) -> std::io::Result<Self> {
        let device_poll = device.poll;
        let slots = (0..depth)
            .map(|_| Slot {
                head: 0,
                unique: 0,
                kind: Kind::Read,
                class: OpClass::Other,
                file: None,
                offset: 0,
                len: 0,
                done: 0,
                iov: IoVecs::with_capacity(chain::MAX_IOVECS),
                segments: Vec::new(),
                started: Instant::now(),
                mem: None,
            })
            .collect();
        let (deferred_tx, deferred_rx) = channel();
        Ok(QueueWorker {
            core: QueueCore::new(index, device_poll),
            metrics: device.queue_metrics(index),
            device,
            engine,
            slots,
            free: (0..depth as u16).rev().collect(),
            segments: Vec::with_capacity(chain::MAX_SEGMENTS),
            msg: Vec::with_capacity(fuse::MAX_NON_WRITE_MESSAGE),
            deferred_tx,
            deferred_rx,
            deferred_fd: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            pool,
            pooled: 0,
        })
    }

    pub fn completion_fd(&self) -> Option<i32> {
        self.engine.completion_fd()
    }

    pub fn deferred_fd(&self) -> i32 {
        self.deferred_fd.as_raw_fd()
    }

    pub fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        self.core.attach(mem);
    }

    pub fn kick(&mut self, vring: &Vring) {
        self.core.kicked(vring);
        self.woken(vring);
    }

    pub fn completions_ready(&mut self) {
        self.engine.ack_completion_fd();
        if let Some(vring) = self.core.vring.clone() {
            self.woken(&vring);
        }
    }

    pub fn deferred_ready(&mut self) {
        let _ = self.deferred_fd.read();
        if let Some(vring) = self.core.vring.clone() {
            self.woken(&vring);
        }
    }

    /// Serves the queue after a wake-up (`daemon_support::serve` runs the loop).
    fn woken(&mut self, vring: &Vring) {
        serve::serve(self, vring);
    }

    /// Pops and serves requests while slots are free; returns how many were popped.
    fn pull(&mut self, state: &mut State, mem: &Arc<GuestMemory>, used: &mut usize) -> usize {
        let mut pulled = 0;
        self.core.throttled = false;
        let metrics = &self.metrics;
        let published =
            self.core
                .health
                .published(self.core.index, state.get_queue(), &**mem, || {
                    metrics.failed(OpClass::Other, ErrorClass::Malformed)
                });
        if published.is_none() {
            return 0;
        }
        loop {
            if pulled == self.device.submit_batch {
                return pulled;
            }
            if self.free.is_empty() {
                self.core.throttled = true;
                self.metrics.throttled();
                return pulled;
            }
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&**mem) else {
                return pulled;
            };
            pulled += 1;
            let head = chain.head_index();
            if self.serve(state, head, chain, mem) {
                *used += 1;
            }
        }
    }

    /// Serves one chain; returns true if it was answered here.
    fn serve(
        &mut self,
        state: &mut State,
        head: u16,
        descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        mem: &Arc<GuestMemory>,
    ) -> bool {
        let started = Instant::now();
        let Ok((readable, writable)) = chain::collect(descriptors, &mut self.segments) else {
            self.metrics.failed(OpClass::Other, ErrorClass::Malformed);
            add_used(state, head, 0);
            return true;
        };
        let mut header = [0u8; IN_HEADER_LEN];
        if readable < IN_HEADER_LEN as u64
            || chain::read_stream(&self.segments, 0, &mut header, &**mem).is_err()
        {
            self.metrics.failed(OpClass::Other, ErrorClass::Malformed);
            add_used(state, head, 0);
            return true;
        }
        let op = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let (msg_len, data_len) =
            if op == opcode::WRITE && readable >= (IN_HEADER_LEN + WRITE_IN_LEN) as u64 {
                let n = IN_HEADER_LEN + WRITE_IN_LEN;
                (n, readable - n as u64)
            } else {
                (
                    readable.min(fuse::MAX_NON_WRITE_MESSAGE as u64 + 1) as usize,
                    0,
                )
            };
        let class = match op {
            opcode::READ => OpClass::Read,
            opcode::WRITE => OpClass::Write,
            opcode::FSYNC | opcode::FSYNCDIR | opcode::FLUSH | opcode::SYNCFS => OpClass::Flush,
            _ => OpClass::Other,
        };
        let pooled = self
            .pool
            .as_ref()
            .filter(|_| msg_len <= fuse::MAX_NON_WRITE_MESSAGE && !server::runs_inline(op));
        if let Some(pool) = pooled.cloned() {
            return self.serve_on_pool(state, head, &header, msg_len, class, mem, &pool, started);
        }
        let mut msg = std::mem::take(&mut self.msg);
        msg.clear();
        msg.resize(msg_len, 0);
        let outcome = if msg_len > fuse::MAX_NON_WRITE_MESSAGE {
            // Larger than anything we announced: refuse without reading it.
            let h = crate::decode::InHeader::decode(&header).ok();
            (h, Outcome::Reply(Reply::err(libc::E2BIG)))
        } else if chain::read_stream(&self.segments, 0, &mut msg, &**mem).is_err() {
            (None, Outcome::NoReply)
        } else {
            self.device.server.handle(&msg, data_len)
        };
        self.msg = msg;
        let (Some(h), outcome) = outcome else {
            self.metrics.failed(class, ErrorClass::Malformed);
            add_used(state, head, 0);
            return true;
        };
        let unique = h.unique;
        match outcome {
            Outcome::NoReply => {
                self.metrics.completed(class, 0, started.elapsed());
                add_used(state, head, 0);
                true
            }
            Outcome::Reply(reply) => {
                self.count(class, &reply, started);
                self.answer(state, head, unique, &reply, mem, None);
                true
            }
            Outcome::Read { file, offset, size } => {
                let room = writable.saturating_sub(OUT_HEADER_LEN as u64);
                if writable < OUT_HEADER_LEN as u64 {
                    self.metrics.failed(class, ErrorClass::Malformed);
                    add_used(state, head, 0);
                    return true;
                }
                let len = room.min(u64::from(size));
                self.start_transfer(
                    state,
                    head,
                    unique,
                    Kind::Read,
                    file,
                    offset,
                    len,
                    mem,
                    started,
                )
            }
            Outcome::Write { file, offset, size } => {
                let len = u64::from(size);
                self.start_transfer(
                    state,
                    head,
                    unique,
                    Kind::Write,
                    file,
                    offset,
                    len,
                    mem,
                    started,
                )
            }
            Outcome::Blocking(f) => {
                let Some(index) = self.defer(head, unique, Kind::Blocking, class, mem, started)
                else {
                    self.answer(state, head, unique, &Reply::err(libc::EAGAIN), mem, None);
                    return true;
                };
                let (tx, wake) = (self.deferred_tx.clone(), self.deferred_fd.clone());
                let spawned = std::thread::Builder::new()
                    .name("fs-blocking".into())
                    .spawn(move || {
                        let _ = tx.send((index, f()));
                        let _ = wake.write(1);
                    });
                if spawned.is_err() {
                    self.undefer(index);
                    self.answer(state, head, unique, &Reply::err(libc::EAGAIN), mem, None);
                    return true;
                }
                false
            }
        }
    }

    /// Takes a slot for a request answered later from another thread.
    fn defer(
        &mut self,
        head: u16,
        unique: u64,
        kind: Kind,
        class: OpClass,
        mem: &Arc<GuestMemory>,
        started: Instant,
    ) -> Option<u16> {
        let index = self.free.pop()?;
        let slot = &mut self.slots[index as usize];
        slot.head = head;
        slot.unique = unique;
        slot.kind = kind;
        slot.class = class;
        slot.started = started;
        slot.segments.clone_from(&self.segments);
        slot.mem = Some(mem.clone());
        Some(index)
    }

    fn undefer(&mut self, index: u16) {
        self.slots[index as usize].mem = None;
        self.free.push(index);
    }

    /// Hands a request to the thread pool: its message is copied out of guest memory here,
    /// decoded, dispatched and encoded there (with the caller's credentials switched on
    /// that thread), and the reply comes back through the deferred-reply eventfd. Returns
    /// true if it was answered here.
    #[allow(clippy::too_many_arguments)]
    fn serve_on_pool(
        &mut self,
        state: &mut State,
        head: u16,
        header: &[u8; IN_HEADER_LEN],
        msg_len: usize,
        class: OpClass,
        mem: &Arc<GuestMemory>,
        pool: &ThreadPool,
        started: Instant,
    ) -> bool {
        let unique = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14],
            header[15],
        ]);
        let mut msg = vec![0u8; msg_len];
        if chain::read_stream(&self.segments, 0, &mut msg, &**mem).is_err() {
            self.metrics.failed(class, ErrorClass::Malformed);
            add_used(state, head, 0);
            return true;
        }
        let Some(index) = self.defer(head, unique, Kind::Pooled, class, mem, started) else {
            // `pull` checks for a free slot first; answer rather than lose the chain.
            self.answer(state, head, unique, &Reply::err(libc::EAGAIN), mem, None);
            return true;
        };
        self.pooled += 1;
        let (tx, wake) = (self.deferred_tx.clone(), self.deferred_fd.clone());
        let device = self.device.clone();
        pool.execute(Box::new(move || {
            let _ = tx.send((index, handle_pooled(&device.server, &msg)));
            let _ = wake.write(1);
        }));
        false
    }

    fn count(&self, class: OpClass, reply: &Reply, started: Instant) {
        match reply.error {
            0 => self.metrics.completed(class, 0, started.elapsed()),
            e if e == -libc::ENOSYS => self.metrics.failed(class, ErrorClass::Unsupported),
            e if e == -libc::EINVAL || e == -libc::E2BIG => {
                self.metrics.failed(class, ErrorClass::Malformed)
            }
            _ => self.metrics.failed(class, ErrorClass::Io),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn start_transfer(
        &mut self,
        state: &mut State,
        head: u16,
        unique: u64,
        kind: Kind,
        file: Arc<File>,
        offset: u64,
        len: u64,
        mem: &Arc<GuestMemory>,
        started: Instant,
    ) -> bool {
        let class = if kind == Kind::Read {
            OpClass::Read
        } else {
            OpClass::Write
        };
        let Some(index) = self.free.pop() else {
            // `pull` checks for a free slot first; answer rather than lose the chain.
            self.answer(state, head, unique, &Reply::err(libc::EAGAIN), mem, None);
            return true;
        };
        let slot = &mut self.slots[index as usize];
        let (writable, skip) = match kind {
            Kind::Read => (true, OUT_HEADER_LEN as u64),
            _ => (false, (IN_HEADER_LEN + WRITE_IN_LEN) as u64),
        };
        if chain::stream_to_iov(&self.segments, writable, skip, len, mem, &mut slot.iov).is_err() {
            slot.iov.clear();
            self.free.push(index);
            self.metrics.failed(class, ErrorClass::Malformed);
            self.answer(state, head, unique, &Reply::err(libc::EFAULT), mem, None);
            return true;
        }
        slot.head = head;
        slot.unique = unique;
        slot.kind = kind;
        slot.file = Some(file);
        slot.offset = offset;
        slot.len = len;
        slot.done = 0;
        slot.started = started;
        slot.segments.clone_from(&self.segments);
        slot.mem = Some(mem.clone());
        if len == 0 {
            self.finish_transfer(state, index, 0);
            return true;
        }
        if start(&mut self.engine, slot, index).is_err() {
            self.metrics.throttled();
            self.finish_transfer(state, index, -libc::EAGAIN);
            return true;
        }
        false
    }

    /// Writes a reply (header and body) into the chain's writable stream and returns the
    /// chain. `segments` defaults to the chain being served now.
    fn answer(
        &self,
        state: &mut State,
        head: u16,
        unique: u64,
        reply: &Reply,
        mem: &GuestMemory,
        segments: Option<&[Segment]>,
    ) {
        let segments = segments.unwrap_or(&self.segments);
        let total = OUT_HEADER_LEN + reply.body.len();
        let ok = chain::write_stream(
            segments,
            0,
            &fuse::out_header(total as u32, reply.error, unique),
            mem,
        )
        .is_ok()
            && chain::write_stream(segments, OUT_HEADER_LEN as u64, &reply.body, mem).is_ok();
        if ok {
            add_used(state, head, total as u32);
            return;
        }
        // The guest gave too little room: say so if even the header does not fit.
        let hdr = fuse::out_header(OUT_HEADER_LEN as u32, -libc::ERANGE, unique);
        if chain::write_stream(segments, 0, &hdr, mem).is_ok() {
            add_used(state, head, OUT_HEADER_LEN as u32);
        } else {
            add_used(state, head, 0);
        }
    }

    fn reap(&mut self, state: &mut State) -> usize {
        let mut answered = 0;
        while let Some(c) = self.engine.pop_completion() {
            if self.complete(state, c.user_data as u16, c.result) {
                answered += 1;
            }
        }
        answered
    }

    fn reap_deferred(&mut self, state: &mut State) -> usize {
        let mut answered = 0;
        while let Ok((index, reply)) = self.deferred_rx.try_recv() {
            if self.finish_deferred(Some(state), index, reply) {
                answered += 1;
            }
        }
        answered
    }

    /// Answers a request that came back from another thread and frees its slot; without a
    /// ring (the frontend is gone) the slot is only freed. True if a chain was used.
    fn finish_deferred(
        &mut self,
        state: Option<&mut State>,
        index: u16,
        reply: Option<Reply>,
    ) -> bool {
        let Some(slot) = self.slots.get_mut(usize::from(index)) else {
            return false;
        };
        let Some(mem) = slot.mem.take() else {
            return false;
        };
        if slot.kind == Kind::Pooled {
            self.pooled -= 1;
        }
        let (head, unique, class, started) = (slot.head, slot.unique, slot.class, slot.started);
        let segments = std::mem::take(&mut slot.segments);
        self.free.push(index);
        let Some(state) = state else {
            self.slots[usize::from(index)].segments = segments;
            return false;
        };
        match reply {
            Some(reply) => {
                self.count(class, &reply, started);
                self.answer(state, head, unique, &reply, &mem, Some(&segments));
            }
            None => {
                self.metrics.completed(class, 0, started.elapsed());
                add_used(state, head, 0);
            }
        }
        self.slots[usize::from(index)].segments = segments;
        true
    }

    /// Advances one transfer after an engine completion; true if it was answered.
    fn complete(&mut self, state: &mut State, index: u16, result: i32) -> bool {
        let slot = &mut self.slots[index as usize];
        if result < 0 {
            self.finish_transfer(state, index, result);
            return true;
        }
        let n = result as u64;
        slot.done += n;
        // A short read means end of file; a short write is continued.
        if slot.kind == Kind::Write && slot.done < slot.len {
            if n == 0 {
                self.finish_transfer(state, index, -libc::EIO);
                return true;
            }
            slot.iov.advance(n);
            if start(&mut self.engine, slot, index).is_err() {
                self.finish_transfer(state, index, -libc::EIO);
                return true;
            }
            return false;
        }
        self.finish_transfer(state, index, 0);
        true
    }

    /// Answers a READ or WRITE: `error` is 0 or a negated errno.
    fn finish_transfer(&mut self, state: &mut State, index: u16, error: i32) {
        let slot = &mut self.slots[index as usize];
        let Some(mem) = slot.mem.take() else { return };
        slot.file = None;
        slot.iov.clear();
        let class = if slot.kind == Kind::Read {
            OpClass::Read
        } else {
            OpClass::Write
        };
        let (reply_len, body): (u32, Vec<u8>) = if error < 0 {
            (OUT_HEADER_LEN as u32, Vec::new())
        } else if slot.kind == Kind::Read {
            ((OUT_HEADER_LEN as u64 + slot.done) as u32, Vec::new())
        } else {
            let mut out = fuse::Encoder::default();
            out.u32(slot.done as u32).u32(0);
            ((OUT_HEADER_LEN + 8) as u32, out.0)
        };
        let hdr = fuse::out_header(reply_len, error, slot.unique);
        let ok = chain::write_stream(&slot.segments, 0, &hdr, &*mem).is_ok()
            && chain::write_stream(&slot.segments, OUT_HEADER_LEN as u64, &body, &*mem).is_ok();
        add_used(state, slot.head, if ok { reply_len } else { 0 });
        if error < 0 {
            self.metrics.failed(class, ErrorClass::Io);
        } else {
            self.metrics
                .completed(class, slot.done, slot.started.elapsed());
        }
        self.free.push(index);
    }

    /// Waits for every transfer in flight and every request on the thread pool, and
    /// answers them (ring stop, disconnect, shutdown). Requests blocked on their own thread
    /// (SETLKW) are not waited for: they may never end.
    pub fn drain(&mut self) {
        while self.pooled > 0 {
            let Ok((index, reply)) = self.deferred_rx.recv() else {
                break;
            };
            match self.core.vring.clone() {
                Some(vring) => {
                    let mut state = vring.get_mut();
                    if self.finish_deferred(Some(&mut state), index, reply) {
                        serve::notify(&mut state, self.core.index);
                    }
                }
                None => {
                    self.finish_deferred(None, index, reply);
                }
            }
        }
        while self.engine.in_flight() > 0 {
            if let Some(vring) = self.core.vring.clone() {
                let mut state = vring.get_mut();
                if self.reap(&mut state) > 0 {
                    serve::notify(&mut state, self.core.index);
                }
            } else {
                while let Some(c) = self.engine.pop_completion() {
                    let slot = &mut self.slots[c.user_data as usize];
                    slot.mem = None;
                    slot.file = None;
                    slot.iov.clear();
                    self.free.push(c.user_data as u16);
                }
            }
            if self.engine.in_flight() > 0 {
                if let Err(e) = self.engine.submit().and_then(|_| self.engine.wait()) {
                    log::error!(
                        "queue {}: cannot wait for in-flight I/O: {e}",
                        self.core.index
                    );
                    break;
                }
            }
        }
        self.metrics
            .set_in_flight(self.engine.in_flight() + self.pooled);
        // Whatever follows (a new ring base, a new frontend, shutdown) starts the ring anew.
        self.core.health.reset();
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
        QueueWorker::reap(self, state) + self.reap_deferred(state)
    }
    fn pull(&mut self, state: &mut State, used: &mut usize) -> usize {
        let Some(mem) = self.core.mem.as_ref().map(|m| m.memory().into_inner()) else {
            return 0;
        };
        QueueWorker::pull(self, state, &mem, used)
    }
    fn submit(&mut self) {
        if let Err(e) = self.engine.submit() {
            log::error!("queue {}: submit failed: {e}", self.core.index);
        }
    }
    fn in_flight(&self) -> usize {
        self.engine.in_flight() + self.pooled
    }
    fn stopping(&self) -> bool {
        self.device.stopping.load(Ordering::Relaxed)
    }
    fn sleeping(&mut self) {
        let n = self.in_flight();
        self.metrics.set_in_flight(n);
    }
}

/// Serves one message on a pool thread (its opcode is not [`server::runs_inline`]).
fn handle_pooled(server: &Server, msg: &[u8]) -> Option<Reply> {
    match server.handle(msg, 0) {
        (None, _) | (Some(_), Outcome::NoReply) => None,
        (Some(_), Outcome::Reply(r)) => Some(r),
        // Not reached (SETLKW and INTERRUPT run inline and hand their closure to a thread
        // of their own); if it were, the answer would still be right, only slower to come.
        (Some(_), Outcome::Blocking(f)) => f(),
        (Some(h), Outcome::Read { .. } | Outcome::Write { .. }) => {
            log::error!(
                "opcode {} came back as a data transfer on the thread pool",
                h.opcode
            );
            Some(Reply::err(libc::EIO))
        }
    }
}

/// Starts (or continues) the slot's transfer on the engine.
fn start(
    engine: &mut AnyEngine,
    slot: &Slot,
    index: u16,
) -> Result<(), storage_core::engine::EngineFull> {
    let Some(file) = slot.file.as_ref() else {
        return Err(storage_core::engine::EngineFull);
    };
    let iov = slot.iov.as_slice();
    let fid = FileId::from_fd(file.as_raw_fd());
    let offset = slot.offset + slot.done;
    let op = if slot.kind == Kind::Read {
        EngineOp::Readv {
            file: fid,
            offset,
            iov: iov.as_ptr(),
            iovcnt: iov.len() as u32,
        }
    } else {
        EngineOp::Writev {
            file: fid,
            offset,
            iov: iov.as_ptr(),
            iovcnt: iov.len() as u32,
        }
    };
    // SAFETY: the iovecs live in the slot, which is neither reused nor modified until this
    // operation completes; they describe guest memory kept mapped by their own keep-alive;
    // the file stays open through `slot.file`.
    unsafe { engine.push(op, u64::from(index)) }
}
