//! The bookkeeping every policy shares: a preallocated slab of entries, a compact hash index
//! from block id to entry, and intrusive FIFO/LRU queues threaded through the slab.
//!
//! Why not `HashMap<BlockId, Box<Node>>` and `VecDeque`s: the daemon consults the policy on
//! every cache block of every request, so a policy must not allocate per access and must stay
//! small per block (a cache may hold millions of blocks). Here an entry is 24 bytes
//! (id, two `u32` links, queue tag, a small counter) and the index adds 4 bytes per slot at a
//! load of at most 70%; all of it is allocated once, at construction, for the policy's
//! maximum number of entries (resident blocks plus ghost history).
//!
//! The index is linear probing with backward-shift deletion: no tombstones, so a table that
//! sees millions of inserts and removes never degrades or needs a rehash.
//!
//! Both live in huge pages (`crate::huge_pages`): a hit looks up the index, its entry and
//! the entry's queue neighbours, all at random; in small pages each was also a TLB miss (the
//! policy's `touch` was 7% of a warm cache's hit path).

use super::policy::BlockId;
use crate::huge_pages::{prefetch, HugeArray};

/// "No entry": the end of a queue, an empty index slot, a free-list end.
pub(crate) const NIL: u32 = u32::MAX;

/// One block a policy knows about: resident, or a ghost (history only).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) block: BlockId,
    /// Towards the queue's head (newer).
    prev: u32,
    /// Towards the queue's tail (older). Also links the free list.
    next: u32,
    /// Which queue of the owning policy holds the entry (the policy defines the numbers).
    pub(crate) queue: u8,
    /// Per-policy counter (access frequency, reference bits).
    pub(crate) freq: u8,
}

/// A doubly linked queue of entries: new ones are pushed at the head, victims taken from the
/// tail. LRU and FIFO differ only in whether a hit moves the entry back to the head.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Queue {
    head: u32,
    tail: u32,
    len: usize,
}

impl Queue {
    pub(crate) const fn new() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The oldest entry, or `NIL`.
    pub(crate) fn tail(&self) -> u32 {
        self.tail
    }
}

/// Slab of entries plus the block-id index over them.
pub(crate) struct Entries {
    slab: HugeArray<Entry>,
    /// Slab entries handed out so far (the rest have never been used).
    slab_len: usize,
    free: u32,
    max: usize,
    used: usize,
    /// Open-addressing table of slab indexes (`NIL` = empty slot).
    index: HugeArray<u32>,
    /// `64 - log2(index.len())`: the hash's top bits pick the home slot.
    shift: u32,
}

/// Fibonacci hashing after a xor-fold: block ids are often sequential or strided, and the
/// multiply spreads both over the top bits that pick the slot.
#[inline]
fn hash(block: BlockId) -> u64 {
    (block ^ (block >> 31)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Entries {
    /// Room for `max` entries (at least 1). Allocates everything now.
    pub(crate) fn with_capacity(max: usize) -> Self {
        let max = max.max(1);
        assert!(max < NIL as usize, "too many cache entries: {max}");
        // Load factor at most 70%: probes stay short and the table a few bytes per entry.
        let slots = (max * 10 / 7 + 1).next_power_of_two().max(16);
        let unused = Entry {
            block: 0,
            prev: NIL,
            next: NIL,
            queue: 0,
            freq: 0,
        };
        // Like a failed Vec allocation, no memory for the tables the policy needs at start-up
        // is fatal.
        fn oom(e: std::io::Error) -> ! {
            panic!("cannot allocate the cache policy's tables: {e}")
        }
        Self {
            slab: HugeArray::new(max, unused).unwrap_or_else(|e| oom(e)),
            slab_len: 0,
            free: NIL,
            max,
            used: 0,
            index: HugeArray::new(slots, NIL).unwrap_or_else(|e| oom(e)),
            shift: 64 - slots.trailing_zeros(),
        }
    }

    #[inline]
    fn home(&self, block: BlockId) -> usize {
        (hash(block) >> self.shift) as usize
    }

    #[inline]
    fn mask(&self) -> usize {
        self.index.len() - 1
    }

    /// The entry for `block`, if any.
    #[inline]
    pub(crate) fn find(&self, block: BlockId) -> Option<u32> {
        let mask = self.mask();
        let mut slot = self.home(block);
        loop {
            let idx = self.index[slot];
            if idx == NIL {
                return None;
            }
            if self.slab[idx as usize].block == block {
                return Some(idx);
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Starts loading the index slot where `block`'s lookup begins.
    #[inline]
    pub(crate) fn prefetch_lookup(&self, block: BlockId) {
        prefetch(self.index.as_ptr().wrapping_add(self.home(block)));
    }

    /// Starts loading the entry that `block`'s index slot names, without comparing it (that
    /// would wait for it): with linear probing at most 70% full it is nearly always the
    /// block's own. Meant to follow [`prefetch_lookup`](Self::prefetch_lookup).
    #[inline]
    pub(crate) fn prefetch_home_entry(&self, block: BlockId) {
        let idx = self.index[self.home(block)];
        if idx != NIL {
            self.prefetch_entry(idx);
        }
    }

    /// Starts loading entry `idx`.
    #[inline]
    pub(crate) fn prefetch_entry(&self, idx: u32) {
        prefetch(self.slab.as_ptr().wrapping_add(idx as usize));
    }

    /// Starts loading the queue neighbours of entry `idx`, which moving it to a queue's
    /// head writes to.
    #[inline]
    pub(crate) fn prefetch_neighbours(&self, idx: u32) {
        let e = &self.slab[idx as usize];
        for n in [e.prev, e.next] {
            if n != NIL {
                self.prefetch_entry(n);
            }
        }
    }

    #[inline]
    pub(crate) fn get(&self, idx: u32) -> &Entry {
        &self.slab[idx as usize]
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, idx: u32) -> &mut Entry {
        &mut self.slab[idx as usize]
    }

    /// Entries in use (resident and ghost).
    #[cfg(test)]
    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// A new, unlinked entry for `block` (which must have none), tagged with `queue`.
    ///
    /// Panics when all `max` entries are in use: the owning policy sizes the slab for its
    /// resident plus ghost limits, so that is a policy bug.
    pub(crate) fn alloc(&mut self, block: BlockId, queue: u8) -> u32 {
        debug_assert!(
            self.find(block).is_none(),
            "block {block} already has an entry"
        );
        assert!(self.used < self.max, "cache entries exhausted");
        let entry = Entry {
            block,
            prev: NIL,
            next: NIL,
            queue,
            freq: 0,
        };
        let idx = if self.free != NIL {
            let idx = self.free;
            self.free = self.slab[idx as usize].next;
            self.slab[idx as usize] = entry;
            idx
        } else {
            // `used < max` and nothing is free, so the slab has unused entries left.
            self.slab[self.slab_len] = entry;
            self.slab_len += 1;
            (self.slab_len - 1) as u32
        };
        self.used += 1;
        let mask = self.mask();
        let mut slot = self.home(block);
        while self.index[slot] != NIL {
            slot = (slot + 1) & mask;
        }
        self.index[slot] = idx;
        idx
    }

    /// Forgets entry `idx` (which must already be unlinked from its queue).
    pub(crate) fn release(&mut self, idx: u32) {
        let block = self.slab[idx as usize].block;
        let mask = self.mask();
        let mut hole = self.home(block);
        while self.index[hole] != idx {
            debug_assert_ne!(self.index[hole], NIL, "entry {idx} not indexed");
            hole = (hole + 1) & mask;
        }
        // Backward-shift deletion: pull later members of the probe run into the hole unless
        // their home lies cyclically in (hole, slot], where they already are reachable.
        let mut slot = hole;
        loop {
            slot = (slot + 1) & mask;
            let other = self.index[slot];
            if other == NIL {
                break;
            }
            let home = self.home(self.slab[other as usize].block);
            let stays = if hole <= slot {
                hole < home && home <= slot
            } else {
                hole < home || home <= slot
            };
            if !stays {
                self.index[hole] = other;
                hole = slot;
            }
        }
        self.index[hole] = NIL;
        let entry = &mut self.slab[idx as usize];
        entry.prev = NIL;
        entry.next = self.free;
        self.free = idx;
        self.used -= 1;
    }

    /// Links `idx` at the head (newest end) of `queue`.
    #[inline]
    pub(crate) fn push_head(&mut self, queue: &mut Queue, idx: u32) {
        let old_head = queue.head;
        {
            let e = &mut self.slab[idx as usize];
            e.prev = NIL;
            e.next = old_head;
        }
        if old_head != NIL {
            self.slab[old_head as usize].prev = idx;
        } else {
            queue.tail = idx;
        }
        queue.head = idx;
        queue.len += 1;
    }

    /// Unlinks `idx` from `queue` (which must hold it).
    #[inline]
    pub(crate) fn unlink(&mut self, queue: &mut Queue, idx: u32) {
        let Entry { prev, next, .. } = self.slab[idx as usize];
        if prev != NIL {
            self.slab[prev as usize].next = next;
        } else {
            queue.head = next;
        }
        if next != NIL {
            self.slab[next as usize].prev = prev;
        } else {
            queue.tail = prev;
        }
        let e = &mut self.slab[idx as usize];
        e.prev = NIL;
        e.next = NIL;
        queue.len -= 1;
    }

    /// Moves `idx` from the queue `from` to the head of `to` (they may be the same).
    #[inline]
    pub(crate) fn move_to_head(&mut self, from: &mut Queue, to: &mut Queue, idx: u32) {
        self.unlink(from, idx);
        self.push_head(to, idx);
    }

    /// Same as `move_to_head` within one queue.
    #[inline]
    pub(crate) fn refresh(&mut self, queue: &mut Queue, idx: u32) {
        if queue.head != idx {
            self.unlink(queue, idx);
            self.push_head(queue, idx);
        }
    }

    /// The entry after `idx` towards the head (newer), or `NIL`: eviction scans walk a queue
    /// from its tail with this, skipping pinned blocks without reordering them.
    #[inline]
    pub(crate) fn newer(&self, idx: u32) -> u32 {
        self.slab[idx as usize].prev
    }

    /// The first entry of `queue`, from the tail, whose block `evictable` accepts.
    pub(crate) fn oldest_evictable(
        &self,
        queue: &Queue,
        evictable: &mut dyn FnMut(BlockId) -> bool,
    ) -> Option<u32> {
        let mut cur = queue.tail;
        while cur != NIL {
            if evictable(self.slab[cur as usize].block) {
                return Some(cur);
            }
            cur = self.newer(cur);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_survives_churn_and_collisions() {
        let mut e = Entries::with_capacity(100);
        let mut q = Queue::new();
        let mut model = std::collections::BTreeMap::new();
        // Strided ids collide in naive hashes; interleaved removes exercise backward shifts.
        let mut x = 1u64;
        for step in 0..20_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = ((x >> 33) % 300) * 4096;
            match model.get(&b) {
                Some(&idx) => {
                    assert_eq!(e.find(b), Some(idx));
                    e.unlink(&mut q, idx);
                    e.release(idx);
                    model.remove(&b);
                }
                None if model.len() < 100 => {
                    assert_eq!(e.find(b), None);
                    let idx = e.alloc(b, 0);
                    e.push_head(&mut q, idx);
                    model.insert(b, idx);
                }
                None => {}
            }
            if step % 1000 == 0 {
                for (&b, &idx) in &model {
                    assert_eq!(e.find(b), Some(idx));
                }
            }
            assert_eq!(e.used(), model.len());
            assert_eq!(q.len(), model.len());
        }
    }

    #[test]
    fn queue_order_and_unlink() {
        let mut e = Entries::with_capacity(8);
        let mut q = Queue::new();
        let ids: Vec<u32> = (0..4).map(|b| e.alloc(b, 0)).collect();
        for &i in &ids {
            e.push_head(&mut q, i);
        }
        assert_eq!(e.get(q.tail()).block, 0);
        e.unlink(&mut q, ids[0]);
        assert_eq!(e.get(q.tail()).block, 1);
        e.refresh(&mut q, ids[1]);
        assert_eq!(e.get(q.tail()).block, 2);
        let mut seen = vec![];
        let mut cur = q.tail();
        while cur != NIL {
            seen.push(e.get(cur).block);
            cur = e.newer(cur);
        }
        assert_eq!(seen, vec![2, 3, 1]);
        assert_eq!(q.len(), 3);
    }
}
