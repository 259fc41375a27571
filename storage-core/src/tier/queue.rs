//! One worker's queue on a tiered disk: each request split by cache block into pieces for
//! the cache file's engine and the capacity child's queue, their completions gathered into
//! the request's, and misses promoted. How pieces are planned is in [`plan`].

mod plan;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::block_map;
use super::shared::{lock, Link, Shared};
use super::state::Use;
use super::CacheMode;
use crate::cache::policy::{AccessHint, BlockId};
use crate::disk::wakeup::FdSet;
use crate::disk::{
    checked, AnyQueue, Disk, DiskCompletion, DiskOp, DiskQueue, IoVecs, Rejected, StartError,
};
use crate::engine::{AnyEngine, Completion, EngineOp, FileId, IoEngine};
use crate::iov::{AlignedBuf, KeepAlive};

/// Ring entries of the cache engine, and depth of the capacity child's queue: requests
/// split into one operation per block.
pub(super) const RING_ENTRIES: u32 = 1024;
/// Promotion buffers per queue (each one cache block).
pub(super) const PROMOTION_BUFFERS: usize = 64;
/// The most cache blocks of one request started at once: a larger request is served in
/// chunks of this many, one after another, so any request the device's limits allow fits
/// the rings (each block may take an operation of its own).
pub(super) const CHUNK_BLOCKS: u64 = RING_ENTRIES as u64 / 4;
/// Ring entries a discard or write-zeroes takes: a partial cached block at either end, the
/// dirty blocks the cleaner is copying out (zeroed in their slots), and the capacity
/// device's range.
pub(super) const ZERO_OP_ENTRIES: u64 = 3 + super::background::CLEAN_BATCH as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Zeroes { unmap: bool },
    Discard,
}

/// One guest request in flight on a tiered queue.
struct Req {
    kind: Kind,
    offset: u64,
    len: u64,
    /// The part of the request being served now (all of it unless it is larger than
    /// [`CHUNK_BLOCKS`]); absolute byte offsets on the disk.
    chunk_off: u64,
    chunk_len: u64,
    /// Blocks of this chunk with a capacity write in flight, registered in the state so
    /// that no read admits them meanwhile (it could cache the data being replaced).
    capacity_range: Option<(BlockId, BlockId)>,
    /// Engine operations still in flight.
    pending: u32,
    error: i32,
    cache_error: i32,
    /// The cache pieces' iovecs, slices of the guest's (room reserved before any pointer
    /// into them is handed to the cache engine).
    iov: IoVecs,
    /// The guest's buffers, given back with the request's completion.
    guest: Option<IoVecs>,
    /// Slots pinned for reading, and their blocks.
    hits: Vec<(u32, BlockId)>,
    /// Resident slots being written.
    cache_writes: Vec<u32>,
    /// Slots being filled by this write (write-back allocation).
    fills: Vec<u32>,
    /// Slots whose dirty block this write-zeroes or discard dropped (see
    /// `TierState::drop_dirty`).
    dropped: Vec<u32>,
    /// Blocks to promote after a read miss: (slot, block, buffer). The capacity device's
    /// data is read into our buffer, copied to the guest and written to the slot from there:
    /// the guest's own buffers are never what the cache stores (the guest can change them
    /// at any moment).
    promotions: Vec<(u32, BlockId, u16)>,
    wrote_capacity: bool,
    /// Bytes the pieces on each device should move, and did: a short transfer (a device
    /// that shrank, a failing device) is an I/O error, not a success.
    expected_cache: u64,
    expected_cap: u64,
    moved_cache: u64,
    moved_cap: u64,
    /// A read hit a dirty block (its only copy is in the cache).
    dirty_hit: bool,
    /// A read is being retried on the capacity device after a cache error.
    retried: bool,
    /// The tag is in flight (a read, write, discard or write-zeroes using this storage):
    /// a second request under it is refused, as it would replace buffers in use.
    busy: bool,
}

impl Req {
    fn new() -> Req {
        Req {
            kind: Kind::Read,
            offset: 0,
            len: 0,
            chunk_off: 0,
            chunk_len: 0,
            capacity_range: None,
            pending: 0,
            error: 0,
            cache_error: 0,
            iov: IoVecs::with_capacity(256),
            guest: None,
            hits: Vec::with_capacity(64),
            cache_writes: Vec::with_capacity(64),
            fills: Vec::with_capacity(64),
            dropped: Vec::new(),
            promotions: Vec::with_capacity(64),
            wrote_capacity: false,
            expected_cache: 0,
            expected_cap: 0,
            moved_cache: 0,
            moved_cap: 0,
            dirty_hit: false,
            retried: false,
            busy: false,
        }
    }
}

struct Promotion {
    slot: u32,
    iov: [libc::iovec; 1],
}

/// Where one block of a planned read comes from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The capacity device, straight into the guest's buffers.
    Capacity,
    /// A cache slot, pinned for the read.
    Cache(u32),
    /// The capacity device, into promotion buffer `n`, for the guest and the cache both.
    Promote(u16),
}

/// user_data bits: promotion writes carry PROMOTION and their buffer index; pieces of guest
/// requests carry the tag, and CACHE_TARGET when they go to the cache device.
const PROMOTION: u64 = 1 << 63;
const CACHE_TARGET: u64 = 1 << 62;
const TAG_MASK: u64 = (1 << 32) - 1;

/// Where one piece of a request goes: the cache file's engine, or the capacity child.
enum Piece {
    Cache(EngineOp),
    Capacity(DiskOp),
}

/// The promotion buffers of one queue, each one cache block: the keep-alive of the
/// capacity reads into them.
struct PromotionBufs(Vec<AlignedBuf>);

/// One worker's queue on a tiered disk: an engine for the cache file, the capacity child's
/// queue, preallocated request state.
pub struct TieredQueue {
    sh: Arc<Shared>,
    link: Arc<Link>,
    cache_eng: AnyEngine,
    cap: Box<AnyQueue>,
    cache_fid: FileId,
    /// The eventfd and a capacity child's own completion fd as one, when the child cannot
    /// signal the eventfd itself.
    wakeup: Option<FdSet>,
    _own_efd: Option<OwnedFd>,
    reqs: Vec<Req>,
    bufs: Arc<PromotionBufs>,
    free_bufs: Vec<u16>,
    /// Buffer lists for the capacity child's pieces, back from it with their completions
    /// (allocated as the first requests need them, then reused).
    cap_iovs: Vec<IoVecs>,
    promotions: Vec<Promotion>,
    local: VecDeque<DiskCompletion>,
    /// Per-block plan of the reads being started (scratch, reused).
    sources: Vec<Source>,
    /// Per-block target of the write being started: a slot, or `None` for the capacity
    /// device (scratch, reused).
    targets: Vec<Option<u32>>,
    in_flight: usize,
    last_end: u64,
    run: u64,
    needs_submit: bool,
    /// Read pins of finished requests, dropped at the next lock this queue takes anyway:
    /// a read served wholly from the cache then locks the state once, not twice.
    unpin: Vec<(u32, BlockId)>,
    /// Read hits and misses not yet added to the shared counters (once per submit, not
    /// one locked add per block).
    read_hits: u64,
    read_misses: u64,
    /// Reads and writes accepted by `start` and started at the next `submit`, in order.
    deferred: Vec<u64>,
    /// Requests larger than a chunk whose next chunk waits for room in the rings.
    continuing: VecDeque<u64>,
    /// Ring entries the deferred requests may take (blocks + 1 each), for `room`.
    deferred_need: usize,
    map_prefetch: block_map::Prefetcher,
    /// Read hits of a run of deferred reads, handed to the policy after planning the run.
    touches: Vec<(BlockId, AccessHint)>,
}

// SAFETY: the raw pointers in `Promotion` lead into our own buffers (`bufs`), valid from any
// thread; only the thread that owns the queue uses them.
unsafe impl Send for TieredQueue {}

impl Drop for TieredQueue {
    fn drop(&mut self) {
        self.settle();
        // The requests' buffers and our promotion buffers must outlive the kernel's use of
        // them by the cache engine. (The capacity child waits for its own in its drop.)
        if let Err(e) = crate::engine::wait_for_kernel(&mut self.cache_eng) {
            log::error!("tier: cannot wait for the cache's I/O ({e}); its buffers are leaked");
            std::mem::forget(std::mem::take(&mut self.reqs));
            std::mem::forget(self.bufs.clone());
        }
    }
}

impl TieredQueue {
    /// Hands deferred pins and counts over to the shared state.
    fn settle(&mut self) {
        if !self.unpin.is_empty() {
            let mut st = self.sh.state();
            st.unpin_reads(self.unpin.drain(..));
        }
        if self.read_hits > 0 {
            self.sh.metrics.read_hits.fetch_add(self.read_hits, Relaxed);
            self.read_hits = 0;
        }
        if self.read_misses > 0 {
            self.sh
                .metrics
                .read_misses
                .fetch_add(self.read_misses, Relaxed);
            self.read_misses = 0;
        }
    }

    pub(super) fn new(sh: Arc<Shared>, depth: u32) -> io::Result<TieredQueue> {
        // One eventfd for both rings and for flushes completed by the journal thread, so the
        // worker waits on a single fd.
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns; it outlives both engines (field order).
        let own = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut cache_eng = sh.cache_engine(fd)?;
        let cache_fid = cache_eng.register_file(sh.cache.as_raw_fd())?;
        let cap = sh
            .cap
            .node()
            .new_queue_sharing(RING_ENTRIES, fd)
            .map_err(io::Error::other)?;
        let wakeup = match cap.completion_fd() {
            Some(child) if child != fd => Some(FdSet::joining(fd, &cap)?),
            _ => None,
        };
        let notify = fd;
        let own = Some(own);
        let block = sh.block as usize;
        let map_prefetch = sh.state().map.prefetcher();
        Ok(TieredQueue {
            link: Arc::new(Link {
                done: Mutex::new(Vec::with_capacity(depth as usize)),
                ready: AtomicUsize::new(0),
                notify,
            }),
            cache_eng,
            cap: Box::new(cap),
            cache_fid,
            wakeup,
            _own_efd: own,
            reqs: (0..depth).map(|_| Req::new()).collect(),
            bufs: Arc::new(PromotionBufs(
                (0..PROMOTION_BUFFERS)
                    .map(|_| AlignedBuf::new(block))
                    .collect(),
            )),
            cap_iovs: Vec::with_capacity(RING_ENTRIES as usize),
            free_bufs: (0..PROMOTION_BUFFERS as u16).rev().collect(),
            promotions: (0..PROMOTION_BUFFERS)
                .map(|_| Promotion {
                    slot: 0,
                    iov: [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }],
                })
                .collect(),
            local: VecDeque::with_capacity(depth as usize),
            sources: Vec::with_capacity(256),
            targets: Vec::with_capacity(CHUNK_BLOCKS as usize),
            in_flight: 0,
            last_end: u64::MAX,
            run: 0,
            needs_submit: false,
            unpin: Vec::with_capacity(4096),
            read_hits: 0,
            read_misses: 0,
            deferred: Vec::with_capacity(depth as usize),
            continuing: VecDeque::with_capacity(depth as usize),
            deferred_need: 0,
            map_prefetch,
            touches: Vec::with_capacity(4096),
            sh,
        })
    }

    /// Whether this request continues a sequential stream past the cutoff.
    fn sequential(&mut self, offset: u64, len: u64) -> bool {
        if offset == self.last_end {
            self.run = self.run.saturating_add(len);
        } else {
            self.run = len;
        }
        self.last_end = offset + len;
        self.run > self.sh.seq_cutoff
    }

    fn push(&mut self, op: Piece, user_data: u64) -> Result<(), StartError> {
        match op {
            Piece::Cache(op) => {
                // SAFETY: every operation we push points into request storage (`Req::iov`,
                // whose room was reserved before the request's first piece and which is
                // cleared only when no piece is in flight) or our promotion buffers, and at
                // memory the request's buffers (`Req::guest`, held until its completion) or
                // `bufs` keep alive.
                unsafe { self.cache_eng.push(op, user_data) }.map_err(|_| StartError::Busy)
            }
            Piece::Capacity(op) => self.cap.start(op, user_data).map_err(|r| {
                if let Some(v) = r.op.into_buffers() {
                    self.pool_cap_iov(v);
                }
                r.error
            }),
        }
    }

    /// A buffer list for a capacity piece of up to `count` buffers: a pooled one that is
    /// large enough, or a new one (which joins the pool when its piece completes).
    fn cap_iov(&mut self, count: usize) -> IoVecs {
        match self.cap_iovs.iter().rposition(|v| v.capacity() >= count) {
            Some(i) => self.cap_iovs.swap_remove(i),
            None => IoVecs::with_capacity(count.max(16)),
        }
    }

    /// Returns a capacity piece's list to the pool, without the reference to the memory it
    /// described (an idle list must not keep a guest's memory mapped).
    fn pool_cap_iov(&mut self, mut v: IoVecs) {
        v.clear();
        self.cap_iovs.push(v);
    }

    /// Pushes a readv/writev of `[skip, skip+len)` of the request to a device offset.
    fn piece(
        &mut self,
        tag: u64,
        cache: bool,
        write: bool,
        dev_offset: u64,
        skip: u64,
        len: u64,
    ) -> Result<(), StartError> {
        let req = &mut self.reqs[tag as usize];
        let Some(guest) = req.guest.as_ref() else {
            return Err(StartError::OutOfRange);
        };
        let op = if !cache {
            let mut buffers = {
                let count = guest.count();
                self.cap_iov(count)
            };
            let req = &mut self.reqs[tag as usize];
            let guest = req.guest.as_ref().expect("checked above");
            buffers.clear();
            if guest.slice_into(skip, len, &mut buffers).is_err() {
                self.pool_cap_iov(buffers);
                return Err(StartError::Busy);
            }
            let op = if write {
                DiskOp::Write {
                    offset: dev_offset,
                    buffers,
                }
            } else {
                DiskOp::Read {
                    offset: dev_offset,
                    buffers,
                }
            };
            Piece::Capacity(op)
        } else {
            let Ok(range) = guest.slice_into(skip, len, &mut req.iov) else {
                // Growing would move the iovecs that pushed pieces point to.
                log::error!("tier: iovec storage of a request exhausted");
                return Err(StartError::Busy);
            };
            let iov = req.iov.as_slice()[range.clone()].as_ptr();
            let iovcnt = range.len() as u32;
            Piece::Cache(if write {
                EngineOp::Writev {
                    file: self.cache_fid,
                    offset: dev_offset,
                    iov,
                    iovcnt,
                }
            } else {
                EngineOp::Readv {
                    file: self.cache_fid,
                    offset: dev_offset,
                    iov,
                    iovcnt,
                }
            })
        };
        let ud = tag | if cache { CACHE_TARGET } else { 0 };
        self.push_counted(tag, op, ud, len)
    }

    /// Pushes a capacity read of block `block` into promotion buffer `buf`.
    fn promotion_read(&mut self, tag: u64, block: u64, buf: u16) -> Result<(), StartError> {
        let bs = self.sh.block;
        let mut buffers = self.cap_iov(1);
        buffers.reset(self.bufs.clone() as KeepAlive);
        // SAFETY: promotion buffer `buf` holds a block, belongs to `bufs`, the keep-alive
        // just set, and is ours alone until this read and the cache write that follows it
        // finish (it is off the free list).
        unsafe { buffers.push(self.bufs.0[buf as usize].as_ptr(), bs as usize) }
            .expect("a buffer list holds at least one buffer");
        let op = Piece::Capacity(DiskOp::Read {
            offset: block * bs,
            buffers,
        });
        self.push_counted(tag, op, tag, bs)
    }

    /// Pushes one piece of request `tag` and counts it in the request's `pending` (and
    /// `len` in its expected bytes), only once the push succeeded: a piece that never went
    /// out must not be waited for. (Completions are reaped on this thread, so counting
    /// after the push is in time even for an engine that completes inside `push`.)
    fn push_counted(
        &mut self,
        tag: u64,
        op: Piece,
        user_data: u64,
        len: u64,
    ) -> Result<(), StartError> {
        let cache = matches!(op, Piece::Cache(_));
        self.push(op, user_data)?;
        let req = &mut self.reqs[tag as usize];
        req.pending += 1;
        if cache {
            req.expected_cache += len;
        } else {
            req.expected_cap += len;
        }
        Ok(())
    }

    /// Whether both rings have room for `entries` more operations (and one spare) besides
    /// those the deferred requests will take.
    fn room(&self, entries: u64) -> bool {
        let need = entries as usize + 1 + self.deferred_need;
        self.cache_eng.in_flight() + need <= RING_ENTRIES as usize
            && self.cap.in_flight() + need <= RING_ENTRIES as usize
    }

    /// The byte range of request `tag`'s current chunk.
    fn chunk(&self, tag: u64) -> (u64, u64) {
        let r = &self.reqs[tag as usize];
        (r.chunk_off, r.chunk_len)
    }

    /// Makes the part of request `tag` after its current chunk the current chunk (at most
    /// [`CHUNK_BLOCKS`] blocks); `false` when nothing is left.
    fn next_chunk(&mut self, tag: u64) -> bool {
        let bs = self.sh.block;
        let r = &mut self.reqs[tag as usize];
        let end = r.offset + r.len;
        let start = if r.chunk_len == 0 {
            r.offset
        } else {
            r.chunk_off + r.chunk_len
        };
        if start >= end {
            return false;
        }
        let limit = (start / bs + CHUNK_BLOCKS) * bs;
        r.chunk_off = start;
        r.chunk_len = end.min(limit) - start;
        true
    }

    /// Cache blocks the current chunk of request `tag` covers.
    fn blocks(&self, tag: u64) -> usize {
        let (offset, len) = self.chunk(tag);
        let bs = self.sh.block;
        ((offset + len - 1) / bs - offset / bs + 1) as usize
    }

    /// Fails a deferred request that could not be started (`room` counted the queued
    /// requests, so pushes cannot fail; should one, fail the request rather than leave
    /// pieces behind unaccounted).
    fn start_failed(&mut self, tag: u64, result: Result<(), StartError>) {
        let Err(e) = result else {
            return;
        };
        log::warn!("tier: could not start request {tag}: {e}");
        self.fail_start(tag);
        if self.reqs[tag as usize].pending > 0 {
            self.reqs[tag as usize].error = -libc::EIO;
        } else {
            let buffers = self.done_with(tag);
            self.local.push_back(DiskCompletion {
                tag,
                result: -libc::EIO,
                buffers,
            });
        }
    }

    /// Request `tag` is answered: frees its storage and gives its buffers back. Nothing of
    /// it is in flight, so its pieces' list may let go of the guest's memory.
    fn done_with(&mut self, tag: u64) -> Option<IoVecs> {
        let req = &mut self.reqs[tag as usize];
        req.busy = false;
        req.iov.clear();
        req.guest.take()
    }

    /// Everything a request pinned or reserved is released when it finishes (or fails to
    /// start).
    fn release(&mut self, tag: u64, ok: bool) {
        let req = &mut self.reqs[tag as usize];
        if ok
            && req.cache_error == 0
            && req.cache_writes.is_empty()
            && req.fills.is_empty()
            && req.dropped.is_empty()
            && !req.wrote_capacity
        {
            // Only read pins to drop (reads; the promotions of misses start after this).
            self.unpin.extend_from_slice(&req.hits);
            req.hits.clear();
            return;
        }
        let mode = self.sh.mode;
        let sh = &self.sh;
        let mut st = sh.state();
        st.unpin_reads(self.unpin.drain(..));
        let req = &mut self.reqs[tag as usize];
        st.unpin_reads(req.hits.iter().copied());
        let cache_failed = req.cache_error != 0;
        for &slot in &req.cache_writes {
            if cache_failed {
                st.slots[slot as usize].writers -= 1;
                if let Use::Clean(b) | Use::Dirty(b) = st.slots[slot as usize].use_ {
                    if mode != CacheMode::WriteBack {
                        // The capacity device has the data; the slot may not.
                        st.invalidate(b);
                    }
                }
            } else {
                st.finish_cache_write(
                    slot,
                    mode == CacheMode::WriteBack && req.kind != Kind::Discard,
                );
            }
        }
        for &slot in &req.fills {
            if st.finish_fill(slot, ok && !cache_failed, true) {
                sh.metrics.promotions.fetch_add(1, Relaxed);
            }
        }
        if req.wrote_capacity && ok {
            st.capacity_unsynced = true;
        }
        if let Some((first, last)) = req.capacity_range.take() {
            st.end_capacity_write(first, last);
        }
        if !req.dropped.is_empty() {
            // Their `Free` records wait for the next capacity sync (which they ask for).
            st.dropped_dirty.append(&mut req.dropped);
            st.capacity_unsynced = true;
        }
        if !ok || cache_failed {
            for &(slot, _, buf) in &req.promotions {
                st.finish_fill(slot, false, false);
                self.free_bufs.push(buf);
            }
            req.promotions.clear();
        }
        if cache_failed {
            sh.cache_failed(&mut st, "write", -req.cache_error);
        }
        req.hits.clear();
        req.cache_writes.clear();
        req.fills.clear();
        sh.update_gauges(&st);
    }

    /// Starts the promotions of a finished read chunk: each promoted block was read into our
    /// own buffer; copy it to the guest's buffers and write it into its slot from ours.
    fn start_promotions(&mut self, tag: u64) {
        let req = &mut self.reqs[tag as usize];
        let promos = std::mem::take(&mut req.promotions);
        let bs = self.sh.block;
        for (slot, block, buf_i) in promos.iter().copied() {
            let req = &mut self.reqs[tag as usize];
            let skip = block * bs - req.offset;
            // SAFETY: the promotion buffer holds `bs` bytes; the capacity read into it has
            // completed and its cache write has not started, so nothing else uses it.
            let buf = unsafe {
                std::slice::from_raw_parts(self.bufs.0[buf_i as usize].as_ptr(), bs as usize)
            };
            if let Some(guest) = req.guest.as_mut() {
                guest.copy_from(skip, buf);
            }
            let p = &mut self.promotions[buf_i as usize];
            p.slot = slot;
            p.iov[0] = libc::iovec {
                iov_base: self.bufs.0[buf_i as usize].as_ptr().cast(),
                iov_len: bs as usize,
            };
            let op = EngineOp::Writev {
                file: self.cache_fid,
                offset: self.sh.slot_offset(slot),
                iov: p.iov.as_ptr(),
                iovcnt: 1,
            };
            if self
                .push(Piece::Cache(op), PROMOTION | u64::from(buf_i))
                .is_err()
            {
                self.free_bufs.push(buf_i);
                self.sh.state().finish_fill(slot, false, false);
            } else {
                self.needs_submit = true;
            }
        }
        let req = &mut self.reqs[tag as usize];
        req.promotions = promos;
        req.promotions.clear();
    }

    fn finish_promotion(&mut self, buf_i: u16, result: i32) {
        let slot = self.promotions[buf_i as usize].slot;
        self.free_bufs.push(buf_i);
        let sh = &self.sh;
        let mut st = sh.state();
        let ok = result >= 0 && result as u64 == sh.block;
        if result < 0 {
            sh.cache_failed(&mut st, "promotion write", -result);
        }
        if st.finish_fill(slot, ok, false) {
            sh.metrics.promotions.fetch_add(1, Relaxed);
        }
        sh.update_gauges(&st);
    }

    /// A guest request's last piece completed: settle the state and produce its completion.
    fn finish(&mut self, tag: u64) -> Option<DiskCompletion> {
        {
            let r = &mut self.reqs[tag as usize];
            if r.error == 0 && r.moved_cap < r.expected_cap {
                r.error = -libc::EIO;
                log::warn!(
                    "tier: short transfer on the capacity device at offset {}",
                    r.offset
                );
            }
            if r.cache_error == 0 && r.moved_cache < r.expected_cache {
                r.cache_error = -libc::EIO;
            }
        }
        let (error, kind, len) = {
            let r = &self.reqs[tag as usize];
            (r.error, r.kind, r.len)
        };
        if error != 0 {
            self.sh.metrics.capacity_errors.fetch_add(1, Relaxed);
        }
        let cache_error = self.reqs[tag as usize].cache_error;
        // A read that failed on the cache device but had no dirty block there: every byte is
        // on the capacity device too. Take the cache out of service and read from there.
        let r = &self.reqs[tag as usize];
        if kind == Kind::Read && cache_error != 0 && error == 0 && !r.dirty_hit && !r.retried {
            self.release(tag, false);
            let r = &mut self.reqs[tag as usize];
            r.retried = true;
            r.cache_error = 0;
            r.iov.clear();
            r.expected_cache = 0;
            r.expected_cap = 0;
            r.moved_cache = 0;
            r.moved_cap = 0;
            let (offset, len, base) = (r.chunk_off, r.chunk_len, r.offset);
            if self
                .piece(tag, false, false, offset, offset - base, len)
                .is_ok()
            {
                self.needs_submit = true;
                return None;
            }
            self.reqs[tag as usize].error = -libc::EIO;
        }
        let error = self.reqs[tag as usize].error;
        // A failed cache write in write-through/around mode is not the guest's error: the
        // capacity device has the data.
        let guest_error = if error != 0 {
            error
        } else if cache_error != 0 && (self.sh.mode == CacheMode::WriteBack || kind == Kind::Read) {
            cache_error
        } else {
            0
        };
        self.release(tag, guest_error == 0);
        if guest_error == 0 && kind == Kind::Read {
            self.start_promotions(tag);
        }
        if guest_error == 0 && matches!(kind, Kind::Read | Kind::Write) && self.next_chunk(tag) {
            // The next chunk starts at the next submit that finds room for it.
            let r = &mut self.reqs[tag as usize];
            r.cache_error = 0;
            r.dirty_hit = false;
            r.retried = false;
            r.wrote_capacity = false;
            r.expected_cache = 0;
            r.expected_cap = 0;
            r.moved_cache = 0;
            r.moved_cap = 0;
            r.iov.clear();
            self.continuing.push_back(tag);
            self.needs_submit = true;
            return None;
        }
        let result = if guest_error != 0 {
            guest_error
        } else if matches!(kind, Kind::Read | Kind::Write) {
            i32::try_from(len).unwrap_or(i32::MAX)
        } else {
            0
        };
        Some(DiskCompletion {
            tag,
            result,
            buffers: self.done_with(tag),
        })
    }

    fn fail_start(&mut self, tag: u64) {
        // Nothing was pushed, or what was pushed will complete and be accounted normally;
        // only release reservations if nothing is in flight.
        if self.reqs[tag as usize].pending == 0 {
            self.release(tag, false);
        }
    }
}

impl DiskQueue for TieredQueue {
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        let op = checked(op, self.sh.capacity)?;
        if !matches!(op, DiskOp::Read { .. } | DiskOp::Write { .. }) {
            // Reads and writes wait for `submit`; anything else starts after those that
            // came before it, so requests still start in the order they arrive.
            self.run_deferred();
        }
        let bs = self.sh.block;
        // The range, once; nothing to do for an empty one.
        let (offset, len) = op.range().unwrap_or((0, 0));
        if len == 0 && !matches!(op, DiskOp::Flush) {
            self.local.push_back(DiskCompletion {
                tag,
                result: 0,
                buffers: op.into_buffers(),
            });
            self.in_flight += 1;
            return Ok(());
        }
        // Ring entries this request needs at once: a read or write one chunk's blocks (a
        // larger one goes chunk by chunk), a discard or write-zeroes a few.
        let entries = match op {
            DiskOp::Read { .. } | DiskOp::Write { .. } => {
                ((offset + len - 1) / bs - offset / bs + 1).min(CHUNK_BLOCKS)
            }
            DiskOp::Discard { .. } | DiskOp::WriteZeroes { .. } => ZERO_OP_ENTRIES,
            DiskOp::Flush => 0,
        };
        if !self.room(entries) {
            return Err(Rejected::new(StartError::Busy, op));
        }
        if !matches!(op, DiskOp::Flush) && self.reqs.get(tag as usize).is_none_or(|r| r.busy) {
            return Err(Rejected::new(StartError::BadTag, op));
        }
        let req = &mut self.reqs[tag as usize];
        req.pending = 0;
        req.error = 0;
        req.cache_error = 0;
        req.wrote_capacity = false;
        req.expected_cache = 0;
        req.expected_cap = 0;
        req.moved_cache = 0;
        req.moved_cap = 0;
        req.dirty_hit = false;
        req.retried = false;
        req.chunk_off = 0;
        req.chunk_len = 0;
        req.iov.clear();
        let is_read = matches!(op, DiskOp::Read { .. });
        let kind = match op {
            DiskOp::Read { buffers, .. } | DiskOp::Write { buffers, .. } => {
                // A chunk's pieces slice the guest's iovecs at most twice over
                // (write-through: the whole chunk to the capacity device, and each resident
                // block to the cache), each piece adding at most one iovec at its start:
                // reserved now, so the entries never move while the cache engine holds
                // pointers into them (`slice_into` refuses to grow the list).
                req.iov
                    .reserve_while_empty(2 * (buffers.count() + entries as usize) + 2);
                req.kind = if is_read { Kind::Read } else { Kind::Write };
                req.guest = Some(buffers);
                req.busy = true;
                req.offset = offset;
                req.len = len;
                self.next_chunk(tag);
                // The lookups wait for `submit` (see `run_deferred`); meanwhile the CPU
                // fetches the map entries they will need.
                let first = offset / bs;
                for b in first..first + entries.min(4) {
                    self.map_prefetch.prefetch(b);
                }
                self.deferred.push(tag);
                self.deferred_need += entries as usize + 1;
                self.needs_submit = true;
                self.in_flight += 1;
                return Ok(());
            }
            DiskOp::Flush => {
                self.in_flight += 1;
                lock(&self.sh.bg).flushes.push((self.link.clone(), tag));
                self.sh.bg_cv.notify_one();
                return Ok(());
            }
            DiskOp::WriteZeroes { unmap, .. } => Kind::Zeroes { unmap },
            DiskOp::Discard { .. } => Kind::Discard,
        };
        req.kind = kind;
        req.offset = offset;
        req.len = len;
        // One piece per device, whatever the length: never more than one chunk.
        req.chunk_off = offset;
        req.chunk_len = len;
        req.guest = None;
        req.busy = true;
        match self.start_zero(tag, offset, len, kind) {
            Ok(()) => {
                self.in_flight += 1;
                Ok(())
            }
            Err(e) => {
                // `room` was checked, so pushes cannot fail; should one, fail the request
                // rather than leave pieces behind unaccounted.
                log::warn!("tier: could not start request {tag}: {e}");
                self.fail_start(tag);
                if self.reqs[tag as usize].pending > 0 {
                    self.reqs[tag as usize].error = -libc::EIO;
                    self.in_flight += 1;
                    Ok(())
                } else {
                    self.done_with(tag);
                    Err(Rejected::new(e, op))
                }
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.needs_submit = false;
        // Starting the deferred requests frees the room they had reserved, which a waiting
        // chunk may need: go on until neither moves.
        loop {
            self.resume_chunks();
            if self.deferred.is_empty() {
                break;
            }
            self.run_deferred();
        }
        self.settle();
        self.cache_eng.submit()?;
        self.cap.submit()
    }

    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        loop {
            if let Some(c) = self.local.pop_front() {
                self.in_flight -= 1;
                return Some(c);
            }
            let c = self.cache_eng.pop_completion().or_else(|| {
                let c = self.cap.pop_completion()?;
                if let Some(v) = c.buffers {
                    self.pool_cap_iov(v);
                }
                Some(Completion {
                    user_data: c.tag,
                    result: c.result,
                })
            });
            let Some(c) = c else {
                if self.link.ready.load(Relaxed) > 0 {
                    let mut done = lock(&self.link.done);
                    self.link.ready.store(0, Relaxed);
                    self.local.extend(
                        done.drain(..)
                            .map(|c| DiskCompletion::bare(c.user_data, c.result)),
                    );
                    drop(done);
                    if !self.local.is_empty() {
                        continue;
                    }
                }
                if self.needs_submit {
                    if let Err(e) = self.submit() {
                        log::error!("tier: submit failed: {e}");
                    }
                    continue;
                }
                return None;
            };
            if !self.continuing.is_empty() {
                // This completion made room that a waiting chunk may need.
                self.needs_submit = true;
            }
            if c.user_data & PROMOTION != 0 {
                self.finish_promotion((c.user_data & 0xffff) as u16, c.result);
                continue;
            }
            let tag = c.user_data & TAG_MASK;
            let req = &mut self.reqs[tag as usize];
            req.pending -= 1;
            if c.result > 0 {
                if c.user_data & CACHE_TARGET != 0 {
                    req.moved_cache += c.result as u64;
                } else {
                    req.moved_cap += c.result as u64;
                }
            }
            if c.result < 0 {
                log::warn!(
                    "tier: {} piece of request {tag} ({:?} at {}) failed: {}",
                    if c.user_data & CACHE_TARGET != 0 {
                        "cache"
                    } else {
                        "capacity"
                    },
                    req.kind,
                    req.offset,
                    io::Error::from_raw_os_error(-c.result)
                );
                if c.user_data & CACHE_TARGET != 0 {
                    if req.cache_error == 0 {
                        req.cache_error = c.result;
                    }
                } else if req.error == 0 {
                    req.error = c.result;
                }
            }
            if req.pending == 0 {
                if let Some(done) = self.finish(tag) {
                    self.in_flight -= 1;
                    return Some(done);
                }
            }
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        let idle = self.cache_eng.in_flight() == 0 && self.cap.in_flight() == 0;
        if !self.deferred.is_empty() || (!self.continuing.is_empty() && (self.needs_submit || idle))
        {
            return self.submit();
        }
        if !self.local.is_empty() || self.link.ready.load(Relaxed) > 0 {
            return Ok(());
        }
        if self.cache_eng.in_flight() > 0 {
            self.cache_eng.submit()?;
            return self.cache_eng.wait();
        }
        if self.cap.in_flight() > 0 {
            self.cap.submit()?;
            return self.cap.wait();
        }
        if self.in_flight > 0 {
            // Only flushes remain: they complete on the background thread.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.wakeup.as_ref().map_or(self.link.notify, FdSet::fd))
    }

    fn ack_completion_fd(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a valid buffer from our own nonblocking eventfd.
        unsafe { libc::read(self.link.notify, buf.as_mut_ptr().cast(), 8) };
        if self.wakeup.is_some() {
            self.cap.ack_completion_fd();
        }
    }

    fn in_flight(&self) -> usize {
        // Promotions count too, so that a drain waits for them.
        self.in_flight + (PROMOTION_BUFFERS - self.free_bufs.len())
    }

    fn held(&self) -> usize {
        self.cap.held()
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.link.notify);
        if self.wakeup.is_some() {
            self.cap.wake_fds(out);
        }
    }
}
