//! The tier's in-memory state: which capacity block each cache slot holds, the free-slot
//! lists, the journal records not yet written, and the cache policy. One mutex guards it
//! (`TierShared::state`); it is held only to decide and to record, never across I/O.
//!
//! Slot reuse is ordered for crash safety: an evicted slot's `Free` record must be durable
//! before new data may be written into it, so evictions go to `pending_free` and only the
//! journal thread moves them to `free` after it has synced that record.

use std::io;

use crate::cache::policy::{AccessHint, BlockId, CachePolicy};
use crate::huge_pages::HugeArray;

use super::block_map::{BlockMap, Entry, CLEAN, DIRTY, FILLING};
use super::layout::{Record, SlotState};

/// What a slot is doing now (the persisted view collapses `Filling` to `Free`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Free,
    /// A write (promotion or write-back allocation) is filling the slot for this block; it
    /// is not readable from the cache until the write completes.
    Filling(BlockId),
    Clean(BlockId),
    Dirty(BlockId),
}

#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub use_: Use,
    /// Reads in flight from this slot whose block is no longer mapped to it (while it is
    /// mapped, its map entry counts them; unmapping moves the count here).
    pub readers: u32,
    /// Cache writes in flight into this slot.
    pub writers: u32,
    /// Bumped by every write into the slot; the cleaner marks a block clean only if the
    /// generation it copied is still current.
    pub generation: u32,
    /// A write that raced a fill cancelled it; the fill's completion frees the slot.
    pub cancelled: bool,
    pub cleaning: bool,
    /// The cleaner could not read this dirty block back from the cache device; it stops
    /// trying (the loss is counted and logged once). Cleared when the slot is freed.
    pub unreadable: bool,
    /// A dirty block that a capacity write replaced (write-zeroes, discard) was dropped from
    /// this slot, but the cache device must keep saying the slot holds it until that write
    /// is durable (see [`TierState::drop_dirty`]).
    pub dropped: Option<BlockId>,
}

impl Slot {
    fn free() -> Self {
        Slot {
            use_: Use::Free,
            readers: 0,
            writers: 0,
            generation: 0,
            cancelled: false,
            cleaning: false,
            unreadable: false,
            dropped: None,
        }
    }

    pub fn pinned(&self) -> bool {
        self.readers > 0 || self.writers > 0 || self.cleaning
    }

    pub fn persisted(&self) -> SlotState {
        if let Some(b) = self.dropped {
            return SlotState::Dirty(b);
        }
        match self.use_ {
            Use::Free | Use::Filling(_) => SlotState::Free,
            Use::Clean(b) => SlotState::Clean(b),
            Use::Dirty(b) => SlotState::Dirty(b),
        }
    }
}

pub struct TierState {
    /// In huge pages: looked up at random on every hit (see `huge_pages`).
    pub slots: HugeArray<Slot>,
    /// Block -> slot, for slots in `Filling`, `Clean` or `Dirty`.
    pub map: BlockMap,
    /// Slots whose `Free` state is durable: ready for new data.
    pub free: Vec<u32>,
    /// Slots evicted or invalidated whose `Free` record is not yet durable.
    pub pending_free: Vec<u32>,
    /// Records not yet handed to the journal writer.
    pub records: Vec<Record>,
    pub policy: Box<dyn CachePolicy>,
    pub dirty: usize,
    /// The cache device failed: no new blocks are admitted; dirty ones are still served.
    pub failed: bool,
    /// Data was written to the capacity device since its last sync.
    pub capacity_unsynced: bool,
    /// Slots whose dirty block a capacity write replaced, waiting for a capacity sync before
    /// their `Free` records may be written.
    pub dropped_dirty: Vec<u32>,
    /// Block ranges (first, last) of capacity writes in flight, one per request chunk. A
    /// read that misses on such a block is not promoted: its capacity read may return the
    /// data being replaced, and the cache would keep that after the write is acknowledged.
    capacity_writes: Vec<(BlockId, BlockId)>,
    /// Set by a failed sync whose data may now be lost: every later FLUSH fails with it.
    /// The kernel reports a writeback error once; a later sync that succeeds says nothing
    /// of the pages it dropped (QEMU's file-posix does the same).
    pub flush_error: i32,
}

impl TierState {
    /// State rebuilt from persisted slot states (a fresh cache is all `Free`).
    pub fn new(persisted: &[SlotState], policy: Box<dyn CachePolicy>) -> io::Result<Self> {
        let mut s = TierState {
            slots: HugeArray::new(persisted.len(), Slot::free())?,
            map: BlockMap::new(persisted.len())?,
            free: Vec::with_capacity(persisted.len()),
            pending_free: Vec::with_capacity(persisted.len()),
            records: Vec::with_capacity(4096),
            policy,
            dirty: 0,
            failed: false,
            capacity_unsynced: false,
            capacity_writes: Vec::with_capacity(1024),
            dropped_dirty: Vec::new(),
            flush_error: 0,
        };
        // Free slots are handed out from the end of the vector: push in reverse so a fresh
        // cache fills from slot 0 upwards.
        for (i, st) in persisted.iter().enumerate().rev() {
            let slot = i as u32;
            let block = match *st {
                SlotState::Free => {
                    s.free.push(slot);
                    continue;
                }
                SlotState::Clean(b) => {
                    s.slots[i].use_ = Use::Clean(b);
                    b
                }
                SlotState::Dirty(b) => {
                    s.slots[i].use_ = Use::Dirty(b);
                    s.dirty += 1;
                    b
                }
            };
            if s.map.contains(block) {
                // Two slots claim one block: keep the first, free the duplicate. Only a
                // damaged cache can get here; the journal order makes it impossible otherwise.
                // (Checked before inserting: an insert would remap the block to the slot
                // being freed.)
                log::warn!("cache slot {slot} duplicates block {block}; dropping it");
                if matches!(s.slots[i].use_, Use::Dirty(_)) {
                    s.dirty -= 1;
                }
                s.slots[i] = Slot::free();
                s.free.push(slot);
                continue;
            }
            s.map.insert(block, slot);
            s.sync_entry(slot);
        }
        // Tell the policy about resident blocks, dirty ones first so they are the last to go.
        let mut resident: Vec<(BlockId, bool)> = s
            .slots
            .iter()
            .filter_map(|sl| match sl.use_ {
                Use::Clean(b) => Some((b, false)),
                Use::Dirty(b) => Some((b, true)),
                _ => None,
            })
            .collect();
        resident.sort_by_key(|&(b, dirty)| (!dirty, b));
        for (b, _) in resident {
            let map = &s.map;
            // Only clean blocks may go: dropping a dirty one would lose acknowledged data.
            let mut evictable = |v: BlockId| map.entry(v).is_some_and(|e| e.state == CLEAN);
            match s.policy.insert(b, &mut evictable) {
                Ok(Some(victim)) => {
                    log::warn!("cache policy evicted block {victim} while recovering");
                    Self::evict_into(&mut s, victim);
                }
                Ok(None) => {}
                Err(_) => log::warn!(
                    "cache policy has no room for dirty block {b} while recovering; it stays \
                     cached until written back"
                ),
            }
        }
        Ok(s)
    }

    /// Removes `victim` from the map and queues its slot for reuse (after its `Free` record
    /// is durable). Dirty victims are never chosen (`evictable` refuses them).
    fn evict_into(s: &mut TierState, victim: BlockId) {
        if let Some(e) = s.unmap(victim) {
            let slot = e.slot;
            let sl = &mut s.slots[slot as usize];
            if matches!(sl.use_, Use::Dirty(_)) {
                s.dirty -= 1;
            }
            sl.use_ = Use::Free;
            sl.unreadable = false;
            s.records.push(Record {
                slot,
                state: SlotState::Free,
            });
            s.pending_free.push(slot);
        }
    }

    /// The slot holding `block` readable from the cache (clean or dirty), if any.
    pub fn resident(&self, block: BlockId) -> Option<u32> {
        let e = self.map.entry(block)?;
        (e.state != FILLING).then_some(e.slot)
    }

    /// A cache hit: pins `block`'s slot for a read and returns it and whether it is dirty.
    /// Once the cache has failed, only dirty blocks (whose only copy is there) are read from
    /// it. Touches only the map entry.
    #[inline]
    pub fn pin_read(&mut self, block: BlockId) -> Option<(u32, bool)> {
        let failed = self.failed;
        let e = self.map.entry_mut(block)?;
        if e.state == FILLING || (failed && e.state != DIRTY) {
            return None;
        }
        e.readers += 1;
        Some((e.slot, e.state == DIRTY))
    }

    /// Drops a read pin taken by [`pin_read`](Self::pin_read) on `slot` for `block`.
    #[inline]
    pub fn unpin_read(&mut self, slot: u32, block: BlockId) {
        match self.map.entry_mut(block) {
            // Still mapped there: the pin is in the entry. (A pinned slot is never reused,
            // so the block cannot have been mapped to this slot anew meanwhile.)
            Some(e) if e.slot == slot => e.readers -= 1,
            _ => self.slots[slot as usize].readers -= 1,
        }
    }

    /// [`unpin_read`](Self::unpin_read) for each `(slot, block)`.
    pub fn unpin_reads(&mut self, pins: impl IntoIterator<Item = (u32, BlockId)>) {
        for (slot, block) in pins {
            self.unpin_read(slot, block);
        }
    }

    /// Unmaps `block`, moving the read pins its entry held to its slot.
    fn unmap(&mut self, block: BlockId) -> Option<Entry> {
        let e = self.map.remove(block)?;
        self.slots[e.slot as usize].readers += u32::from(e.readers);
        Some(e)
    }

    /// Copies `slot`'s state into its block's map entry (after every change of `use_` of
    /// a mapped slot).
    pub fn sync_entry(&mut self, slot: u32) {
        let (block, state) = match self.slots[slot as usize].use_ {
            Use::Free => return,
            Use::Filling(b) => (b, FILLING),
            Use::Clean(b) => (b, CLEAN),
            Use::Dirty(b) => (b, DIRTY),
        };
        if let Some(e) = self.map.entry_mut(block) {
            if e.slot == slot {
                e.state = state;
            }
        }
    }

    /// A clean block nobody reads or writes.
    fn evictable(e: &Entry, slot: &Slot) -> bool {
        e.state == CLEAN && e.readers == 0 && !slot.pinned()
    }

    /// Cancels a fill in flight for `block`, if any: the block is treated as not cached.
    pub fn cancel_fill(&mut self, block: BlockId) {
        if let Some(slot) = self.map.get(block) {
            let sl = &mut self.slots[slot as usize];
            if let Use::Filling(_) = sl.use_ {
                sl.cancelled = true;
                self.unmap(block);
                self.policy.remove(block);
            }
        }
    }

    /// Admits `block` into a free slot (policy permitting), evicting a clean unpinned block
    /// if the policy is full. The slot is `Filling` and pinned by one writer. `None` if the
    /// policy declines, nothing can be evicted or no durable-free slot is left. `hint`
    /// describes the request that missed (see [`AccessHint`]).
    pub fn admit(&mut self, block: BlockId, hint: AccessHint) -> Option<(u32, Option<BlockId>)> {
        // Already cached or being filled (another request missed on it first): inserting it
        // again would break the policy's invariants and the map.
        if self.failed || self.free.is_empty() || self.map.contains(block) {
            return None;
        }
        if self
            .capacity_writes
            .iter()
            .any(|&(a, b)| a <= block && block <= b)
        {
            return None;
        }
        if !self.policy.should_admit(block, hint) {
            return None;
        }
        let slots = &self.slots;
        let map = &self.map;
        let mut evictable = |v: BlockId| {
            map.entry(v)
                .is_some_and(|e| Self::evictable(e, &slots[e.slot as usize]))
        };
        let victim = self.policy.insert(block, &mut evictable).ok()?;
        if let Some(v) = victim {
            // The policy must only pick what `evictable` allowed; a dirty or busy victim
            // would lose data or be reused under I/O, so never trust it blindly.
            let ok = self
                .map
                .entry(v)
                .is_some_and(|e| Self::evictable(e, &self.slots[e.slot as usize]));
            if !ok {
                log::error!("cache policy chose block {v}, which cannot be evicted; not admitting");
                self.policy.remove(block);
                return None;
            }
            Self::evict_into(self, v);
        }
        let slot = self.free.pop()?;
        let sl = &mut self.slots[slot as usize];
        *sl = Slot {
            use_: Use::Filling(block),
            writers: 1,
            generation: sl.generation.wrapping_add(1),
            ..Slot::free()
        };
        self.map.insert(block, slot);
        Some((slot, victim))
    }

    /// A fill of `slot` finished (successfully or not). Returns whether the block became
    /// resident (`state` is `Clean` or `Dirty`).
    pub fn finish_fill(&mut self, slot: u32, ok: bool, dirty: bool) -> bool {
        let sl = &mut self.slots[slot as usize];
        sl.writers -= 1;
        let Use::Filling(block) = sl.use_ else {
            return false;
        };
        if sl.cancelled || !ok {
            let cancelled = sl.cancelled;
            sl.use_ = Use::Free;
            sl.cancelled = false;
            let writers = sl.writers;
            // A cancelled fill was already unmapped (and the block may have been admitted
            // again elsewhere since); a failed one is unmapped here. A filling block is
            // never read, so no pins move.
            if !cancelled && self.map.get(block) == Some(slot) {
                self.unmap(block);
                self.policy.remove(block);
            }
            // Nothing durable ever named this block in this slot: it is free at once.
            if writers == 0 {
                self.free.push(slot);
            } else {
                self.pending_free.push(slot);
            }
            return false;
        }
        let state = if dirty {
            self.dirty += 1;
            sl.use_ = Use::Dirty(block);
            SlotState::Dirty(block)
        } else {
            sl.use_ = Use::Clean(block);
            SlotState::Clean(block)
        };
        self.sync_entry(slot);
        self.records.push(Record { slot, state });
        true
    }

    /// Drops `block` from the cache (write-around, discard). Dirty data is dropped too:
    /// the caller is replacing it.
    pub fn invalidate(&mut self, block: BlockId) {
        self.cancel_fill(block);
        if self.resident(block).is_some() {
            self.policy.remove(block);
            Self::evict_into(self, block);
        }
    }

    /// Drops dirty `block` from the cache because a capacity write replaces it (a
    /// write-zeroes or discard of the whole block), if it is dirty and the cleaner is not
    /// copying it out. Reads go to the capacity device from now on, but the slot keeps its
    /// persisted `Dirty` state and stays out of use until that write is durable: were its
    /// `Free` record durable first, a power cut could bring back the capacity device's
    /// older copy. The caller hands the slot to `dropped_dirty` when the write completes.
    pub fn drop_dirty(&mut self, block: BlockId) -> Option<u32> {
        let slot = self.resident(block)?;
        let sl = &self.slots[slot as usize];
        if !matches!(sl.use_, Use::Dirty(_)) || sl.cleaning {
            return None;
        }
        self.unmap(block);
        self.policy.remove(block);
        self.dirty -= 1;
        let sl = &mut self.slots[slot as usize];
        sl.use_ = Use::Free;
        sl.unreadable = false;
        sl.dropped = Some(block);
        Some(slot)
    }

    /// The capacity device was synced: the slots dropped before it are free once their
    /// `Free` records are durable (they join the records and `pending_free`).
    pub fn capacity_synced(&mut self, dropped: Vec<u32>) {
        for slot in dropped {
            self.slots[slot as usize].dropped = None;
            self.records.push(Record {
                slot,
                state: SlotState::Free,
            });
            self.pending_free.push(slot);
        }
    }

    /// A write into resident `slot` finished: a clean block becomes dirty (write-back) or a
    /// dirty one clean (write-through wrote both copies).
    pub fn finish_cache_write(&mut self, slot: u32, now_dirty: bool) {
        let sl = &mut self.slots[slot as usize];
        sl.writers -= 1;
        let (block, was_dirty) = match sl.use_ {
            Use::Clean(b) => (b, false),
            Use::Dirty(b) => (b, true),
            _ => return,
        };
        if was_dirty != now_dirty {
            if now_dirty {
                self.dirty += 1;
                sl.use_ = Use::Dirty(block);
                self.records.push(Record {
                    slot,
                    state: SlotState::Dirty(block),
                });
            } else {
                self.dirty -= 1;
                sl.use_ = Use::Clean(block);
                self.records.push(Record {
                    slot,
                    state: SlotState::Clean(block),
                });
            }
            self.sync_entry(slot);
        }
    }

    /// Moves pending-free slots whose records are durable (`upto` of them, oldest first) and
    /// that nothing pins any more to the free list.
    pub fn release_pending(&mut self, upto: usize) {
        let n = upto.min(self.pending_free.len());
        let released: Vec<u32> = self.pending_free.drain(..n).collect();
        for slot in released {
            let sl = &self.slots[slot as usize];
            if sl.use_ == Use::Free && !sl.pinned() {
                self.free.push(slot);
            } else if sl.use_ == Use::Free {
                self.pending_free.push(slot);
            }
        }
    }

    /// A capacity write of blocks `first..=last` starts: they are not admitted until it ends.
    pub fn begin_capacity_write(&mut self, first: BlockId, last: BlockId) {
        self.capacity_writes.push((first, last));
    }

    /// The capacity write that [`begin_capacity_write`](Self::begin_capacity_write)
    /// registered for `first..=last` ended.
    pub fn end_capacity_write(&mut self, first: BlockId, last: BlockId) {
        if let Some(i) = self
            .capacity_writes
            .iter()
            .position(|&r| r == (first, last))
        {
            self.capacity_writes.swap_remove(i);
        }
    }

    /// Every slot's persisted state, for a checkpoint.
    pub fn snapshot(&self) -> Vec<SlotState> {
        self.slots.iter().map(Slot::persisted).collect()
    }

    pub fn resident_count(&self) -> usize {
        self.map.len()
    }
}
