//! Planning a tiered queue's requests: where each block of a read comes from (a hit, a
//! miss, a miss to promote), where each block of a write goes (a slot, the capacity
//! device, both), and the pieces that carry them out; discards and write-zeroes too.

use super::super::state::TierState;
use super::*;
use crate::disk::StartError;
use crate::engine::EngineOp;

impl TieredQueue {
    /// Queues the next chunk of each large request whose last chunk finished, while the
    /// rings have room for it (the rest wait for completions to make room).
    pub(super) fn resume_chunks(&mut self) {
        while let Some(&tag) = self.continuing.front() {
            let entries = self.blocks(tag) as u64;
            if !self.room(entries) {
                break;
            }
            self.continuing.pop_front();
            self.deferred.push(tag);
            self.deferred_need += entries as usize + 1;
        }
    }

    /// Starts the reads and writes that `start` queued, in the order they came.
    ///
    /// Why they wait: a batch's cache-map lookups are random and miss the CPU cache; issued
    /// as each request arrives, the prefetches overlap those misses, where looking up at
    /// once would wait for each in turn (half the tier's own cost on a warm cache).
    pub(super) fn run_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let mut deferred = std::mem::take(&mut self.deferred);
        let is_read = |q: &Self, tag: u64| matches!(q.reqs[tag as usize].kind, Kind::Read);
        let sh = self.sh.clone();
        let mut i = 0;
        while i < deferred.len() {
            if !is_read(self, deferred[i]) {
                let tag = deferred[i];
                let result = self.start_write(tag);
                self.start_failed(tag, result);
                i += 1;
                continue;
            }
            // A run of reads is planned under one lock, then issued (the pieces may do I/O,
            // which the lock is never held across).
            let mut end = i;
            self.sources.clear();
            {
                let mut st = sh.state();
                st.unpin_reads(self.unpin.drain(..));
                while end < deferred.len() && is_read(self, deferred[end]) {
                    self.plan_read(&mut st, deferred[end]);
                    end += 1;
                }
                // The run's hits reach the policy at once (it prefetches their entries),
                // still before any later write or other queue can change those blocks.
                st.policy.touch_many(&self.touches);
                self.touches.clear();
            }
            // Each read's sources follow the previous read's, one per block.
            let mut at = 0;
            for &tag in &deferred[i..end] {
                let result = self.issue_read(tag, at);
                at += self.blocks(tag);
                self.start_failed(tag, result);
            }
            i = end;
        }
        deferred.clear();
        self.deferred = deferred;
        self.deferred_need = 0;
    }

    /// Decides where each block of a read's current chunk comes from, under the state lock
    /// the caller holds (pins the hits, admits misses per the policy), appending one source
    /// per block to `self.sources`.
    pub(super) fn plan_read(&mut self, st: &mut TierState, tag: u64) {
        let (offset, len) = self.chunk(tag);
        let bypass = self.sequential(offset, len);
        let sh = &self.sh;
        let bs = sh.block;
        let req = &mut self.reqs[tag as usize];
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let hint = AccessHint::read(last - first + 1);
        for b in first..=last {
            // Once the cache device has failed, only dirty blocks (whose only copy is
            // there) are read from it; clean ones come from the capacity device.
            if let Some((slot, dirty)) = st.pin_read(b) {
                req.dirty_hit |= dirty;
                self.touches.push((b, hint));
                req.hits.push((slot, b));
                self.sources.push(Source::Cache(slot));
                self.read_hits += 1;
                continue;
            }
            self.read_misses += 1;
            let full = b * bs >= offset && (b + 1) * bs <= offset + len;
            let mut source = Source::Capacity;
            if full && !bypass {
                if let Some(&buf) = self.free_bufs.last() {
                    if let Some((slot, victim)) = st.admit(b, hint) {
                        if victim.is_some() {
                            sh.metrics.evictions.fetch_add(1, Relaxed);
                        }
                        self.free_bufs.pop();
                        req.promotions.push((slot, b, buf));
                        source = Source::Promote(buf);
                    }
                }
            }
            self.sources.push(source);
        }
        if bypass {
            sh.metrics.bypassed.fetch_add(1, Relaxed);
        }
    }

    /// Pushes a planned read chunk's pieces: each hit block from its slot, each promoted
    /// block into its buffer, runs of other missed blocks from the capacity device. Its
    /// sources are `self.sources[at..]`, one per block.
    pub(super) fn issue_read(&mut self, tag: u64, at: usize) -> Result<(), StartError> {
        let bs = self.sh.block;
        let (offset, len) = self.chunk(tag);
        let base = self.reqs[tag as usize].offset;
        let first = offset / bs;
        let mut run_start: Option<u64> = None;
        for i in 0..self.blocks(tag) {
            let source = self.sources[at + i];
            let b = first + i as u64;
            let lo = (b * bs).max(offset);
            let hi = ((b + 1) * bs).min(offset + len);
            match source {
                Source::Capacity => {
                    run_start.get_or_insert(lo);
                }
                Source::Cache(slot) => {
                    if let Some(rs) = run_start.take() {
                        self.piece(tag, false, false, rs, rs - base, lo - rs)?;
                    }
                    let dev = self.sh.slot_offset(slot) + (lo - b * bs);
                    self.piece(tag, true, false, dev, lo - base, hi - lo)?;
                }
                Source::Promote(buf) => {
                    if let Some(rs) = run_start.take() {
                        self.piece(tag, false, false, rs, rs - base, lo - rs)?;
                    }
                    self.promotion_read(tag, b, buf)?;
                }
            }
        }
        if let Some(rs) = run_start {
            self.piece(tag, false, false, rs, rs - base, offset + len - rs)?;
        }
        Ok(())
    }

    /// Plans and pushes the current chunk of write `tag`.
    pub(super) fn start_write(&mut self, tag: u64) -> Result<(), StartError> {
        let (offset, len) = self.chunk(tag);
        let base = self.reqs[tag as usize].offset;
        let bs = self.sh.block;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let hint = AccessHint::write(last - first + 1);
        let bypass = self.sequential(offset, len);
        let mode = self.sh.mode;
        // Per block: Some(slot) to write into the cache, None for the capacity device.
        let mut targets = std::mem::take(&mut self.targets);
        targets.clear();
        let mut to_capacity_everything = false;
        {
            let sh = &self.sh;
            let mut st = sh.state();
            st.unpin_reads(self.unpin.drain(..));
            let req = &mut self.reqs[tag as usize];
            let too_dirty = st.dirty >= sh.high_watermark;
            if bypass || too_dirty || st.failed {
                sh.metrics.bypassed.fetch_add(1, Relaxed);
            }
            for b in first..=last {
                st.cancel_fill(b);
                let resident = st.resident(b);
                let full = b * bs >= offset && (b + 1) * bs <= offset + len;
                let target = match (mode, resident) {
                    // Out of service: a clean copy is dropped and the write goes to the
                    // capacity device; so is a dirty block the write replaces whole (unless
                    // the cleaner is copying it out, whose late write-back would land on top
                    // of ours). A dirty block written in part keeps going to its slot: the
                    // rest of its data exists only there.
                    (_, Some(slot))
                        if st.failed && {
                            let sl = &st.slots[slot as usize];
                            !matches!(sl.use_, Use::Dirty(_)) || (full && !sl.cleaning)
                        } =>
                    {
                        st.invalidate(b);
                        None
                    }
                    (CacheMode::WriteAround, Some(slot))
                        if !matches!(st.slots[slot as usize].use_, Use::Dirty(_)) =>
                    {
                        st.invalidate(b);
                        None
                    }
                    (_, Some(slot)) => {
                        st.slots[slot as usize].writers += 1;
                        let g = &mut st.slots[slot as usize].generation;
                        *g = g.wrapping_add(1);
                        st.policy.touch(b, hint);
                        req.cache_writes.push(slot);
                        sh.metrics.write_hits.fetch_add(1, Relaxed);
                        Some(slot)
                    }
                    (CacheMode::WriteBack, None) => {
                        sh.metrics.write_misses.fetch_add(1, Relaxed);
                        if full && !bypass && !too_dirty {
                            match st.admit(b, hint) {
                                Some((slot, victim)) => {
                                    if victim.is_some() {
                                        sh.metrics.evictions.fetch_add(1, Relaxed);
                                    }
                                    req.fills.push(slot);
                                    Some(slot)
                                }
                                None => None,
                            }
                        } else {
                            None
                        }
                    }
                    (_, None) => {
                        sh.metrics.write_misses.fetch_add(1, Relaxed);
                        None
                    }
                };
                targets.push(target);
            }
            // Write-through and write-around always write the whole range to capacity.
            if mode != CacheMode::WriteBack {
                to_capacity_everything = true;
            }
            if to_capacity_everything || targets.iter().any(Option::is_none) {
                req.wrote_capacity = true;
                st.begin_capacity_write(first, last);
                req.capacity_range = Some((first, last));
            }
            sh.update_gauges(&st);
        }
        let result = self.push_write(tag, &targets, to_capacity_everything, base);
        self.targets = targets;
        result
    }

    /// Pushes the pieces of a planned write chunk: the whole chunk to the capacity device
    /// when `to_capacity_everything`, each block with a target slot to the cache, and runs
    /// of the other blocks to the capacity device.
    pub(super) fn push_write(
        &mut self,
        tag: u64,
        targets: &[Option<u32>],
        to_capacity_everything: bool,
        base: u64,
    ) -> Result<(), StartError> {
        let (offset, len) = self.chunk(tag);
        let bs = self.sh.block;
        let first = offset / bs;
        if to_capacity_everything {
            self.piece(tag, false, true, offset, offset - base, len)?;
        }
        let mut run_start: Option<u64> = None;
        for (i, target) in targets.iter().enumerate() {
            let b = first + i as u64;
            let lo = (b * bs).max(offset);
            let hi = ((b + 1) * bs).min(offset + len);
            match target {
                Some(slot) => {
                    if let Some(rs) = run_start.take() {
                        if !to_capacity_everything {
                            self.piece(tag, false, true, rs, rs - base, lo - rs)?;
                        }
                    }
                    let dev = self.sh.slot_offset(*slot) + (lo - b * bs);
                    self.piece(tag, true, true, dev, lo - base, hi - lo)?;
                }
                None => {
                    run_start.get_or_insert(lo);
                }
            }
        }
        if let Some(rs) = run_start {
            if !to_capacity_everything {
                self.piece(tag, false, true, rs, rs - base, offset + len - rs)?;
            }
        }
        Ok(())
    }

    /// Discard and write-zeroes: cached copies of whole blocks are dropped, partial blocks
    /// that are cached get zeroes written into their slot, and the capacity device does the
    /// rest.
    pub(super) fn start_zero(
        &mut self,
        tag: u64,
        offset: u64,
        len: u64,
        kind: Kind,
    ) -> Result<(), StartError> {
        let bs = self.sh.block;
        let (first, last) = (offset / bs, (offset + len - 1) / bs);
        let mut partial: Vec<(u32, u64, u64)> = Vec::new();
        {
            let sh = &self.sh;
            let mut st = sh.state();
            let req = &mut self.reqs[tag as usize];
            for b in first..=last {
                let full = b * bs >= offset && (b + 1) * bs <= offset + len;
                if full {
                    if let Some(slot) = st.drop_dirty(b) {
                        req.dropped.push(slot);
                        continue;
                    }
                    let cleaning = st
                        .resident(b)
                        .is_some_and(|slot| st.slots[slot as usize].cleaning);
                    if !cleaning {
                        st.invalidate(b);
                        continue;
                    }
                    // A dirty block the cleaner is copying out: its late copy could land
                    // on the capacity device after ours, so the block stays dirty in its
                    // slot and is zeroed there (a discard, a hint, leaves it).
                    if kind == Kind::Discard {
                        continue;
                    }
                } else if kind == Kind::Discard {
                    continue;
                }
                st.cancel_fill(b);
                if let Some(slot) = st.resident(b) {
                    st.slots[slot as usize].writers += 1;
                    let g = &mut st.slots[slot as usize].generation;
                    *g = g.wrapping_add(1);
                    req.cache_writes.push(slot);
                    let lo = (b * bs).max(offset);
                    let hi = ((b + 1) * bs).min(offset + len);
                    partial.push((slot, lo - b * bs, hi - lo));
                }
            }
            req.wrote_capacity = true;
            st.begin_capacity_write(first, last);
            req.capacity_range = Some((first, last));
            sh.update_gauges(&st);
        }
        for (slot, at, n) in partial {
            let dev = self.sh.slot_offset(slot) + at;
            let op = Piece::Cache(EngineOp::Fallocate {
                file: self.cache_fid,
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                offset: dev,
                len: n,
            });
            self.push_counted(tag, op, tag | CACHE_TARGET, 0)?;
        }
        let op = match kind {
            Kind::Zeroes { unmap } => DiskOp::WriteZeroes { offset, len, unmap },
            _ => DiskOp::Discard { offset, len },
        };
        self.push_counted(tag, Piece::Capacity(op), tag, 0)
    }
}
