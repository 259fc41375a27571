//! The tier's block map: which cache slot holds a capacity block.
//!
//! Looked up for every block of every request, so it is built for that: open addressing
//! with linear probing in one huge-page-backed array, twice as many entries as cache slots
//! (so at most half full: a hit is usually one cache line), Fibonacci hashing, and
//! backward-shift deletion (no tombstones to slow later lookups). A general-purpose hash
//! map costs two cache misses per lookup (control bytes, then the bucket) and, in small
//! pages, a TLB miss.

use std::io;

use crate::cache::policy::BlockId;
use crate::huge_pages::HugeArray;

const EMPTY: u32 = u32::MAX;

/// A mapped block's slot is being filled: not readable from the cache yet.
pub const FILLING: u8 = 0;
/// The slot holds the block, clean.
pub const CLEAN: u8 = 1;
/// The slot holds the block's only up-to-date copy.
pub const DIRTY: u8 = 2;

/// One mapping. Besides the slot, it carries what a cache hit needs (the slot's state and
/// the read pins taken through the map), so a hit touches this one cache line and not the
/// slot table too: with both, a warm 256 MiB cache spent a third of its hit path waiting
/// for the second miss. The 16-byte entry had room for them.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    block: BlockId,
    /// `EMPTY` for a free entry.
    pub slot: u32,
    /// Reads in flight from the slot, pinned while the block is mapped (on unmapping the
    /// count moves to the slot, see `TierState`).
    pub readers: u16,
    /// `FILLING`, `CLEAN` or `DIRTY`: mirrors the slot's `Use`.
    pub state: u8,
}

pub struct BlockMap {
    entries: HugeArray<Entry>,
    mask: usize,
    shift: u32,
    len: usize,
}

/// Fibonacci hashing: the top bits of the product pick the entry where a lookup starts.
#[inline]
fn home(block: BlockId, shift: u32) -> usize {
    (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> shift) as usize
}

/// Starts loading the map entry where a block's lookup begins, without the state lock:
/// the tier issues it when a request arrives and looks the block up when the batch is
/// submitted, so the batch's map misses overlap.
#[derive(Clone, Copy)]
pub struct Prefetcher {
    base: *const Entry,
    shift: u32,
}

// SAFETY: the pointer is only passed to `huge_pages::prefetch`, never dereferenced.
unsafe impl Send for Prefetcher {}

impl Prefetcher {
    #[inline]
    pub fn prefetch(&self, block: BlockId) {
        crate::huge_pages::prefetch(self.base.wrapping_add(home(block, self.shift)));
    }
}

impl BlockMap {
    /// A map for at most `max_len` blocks (the number of cache slots).
    pub fn new(max_len: usize) -> io::Result<BlockMap> {
        let size = (max_len.max(8) * 2).next_power_of_two();
        Ok(BlockMap {
            entries: HugeArray::new(
                size,
                Entry {
                    block: 0,
                    slot: EMPTY,
                    readers: 0,
                    state: FILLING,
                },
            )?,
            mask: size - 1,
            shift: 64 - size.trailing_zeros(),
            len: 0,
        })
    }

    /// A [`Prefetcher`] for this map. Its entries never move, so it stays accurate for the
    /// map's life (and after that, prefetching is still harmless).
    pub fn prefetcher(&self) -> Prefetcher {
        Prefetcher {
            base: self.entries.as_ptr(),
            shift: self.shift,
        }
    }

    #[inline]
    fn home(&self, block: BlockId) -> usize {
        home(block, self.shift)
    }

    /// The index of `block`'s entry, or of the empty entry where it would go.
    #[inline]
    fn find(&self, block: BlockId) -> (usize, bool) {
        let mut i = self.home(block);
        loop {
            let e = self.entries[i];
            if e.slot == EMPTY {
                return (i, false);
            }
            if e.block == block {
                return (i, true);
            }
            i = (i + 1) & self.mask;
        }
    }

    #[inline]
    pub fn get(&self, block: BlockId) -> Option<u32> {
        match self.find(block) {
            (i, true) => Some(self.entries[i].slot),
            _ => None,
        }
    }

    pub fn contains(&self, block: BlockId) -> bool {
        self.find(block).1
    }

    #[inline]
    pub fn entry(&self, block: BlockId) -> Option<&Entry> {
        match self.find(block) {
            (i, true) => Some(&self.entries[i]),
            _ => None,
        }
    }

    #[inline]
    pub fn entry_mut(&mut self, block: BlockId) -> Option<&mut Entry> {
        match self.find(block) {
            (i, true) => Some(&mut self.entries[i]),
            _ => None,
        }
    }

    /// Maps `block` to `slot` (state `FILLING`, no pins); returns the slot it was mapped to
    /// before, if any (then only the slot changes).
    pub fn insert(&mut self, block: BlockId, slot: u32) -> Option<u32> {
        debug_assert_ne!(slot, EMPTY);
        let (i, found) = self.find(block);
        if found {
            return Some(std::mem::replace(&mut self.entries[i].slot, slot));
        }
        // Every slot holds at most one block, so the table never gets past half full; a
        // caller breaking that would make `find` loop forever, so stop here instead.
        assert!(self.len < self.entries.len() / 2, "block map over capacity");
        self.entries[i] = Entry {
            block,
            slot,
            readers: 0,
            state: FILLING,
        };
        self.len += 1;
        None
    }

    /// Unmaps `block`; returns its entry.
    pub fn remove(&mut self, block: BlockId) -> Option<Entry> {
        let (mut hole, found) = self.find(block);
        if !found {
            return None;
        }
        let removed = self.entries[hole];
        // Backward-shift: pull later entries of the probe run into the hole unless their
        // home lies cyclically in (hole, j], where moving them would put them before it.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            let e = self.entries[j];
            if e.slot == EMPTY {
                break;
            }
            let home = self.home(e.block);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole].slot = EMPTY;
        self.len -= 1;
        Some(removed)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// The map agrees with a HashMap on random inserts, removes and lookups, including
        /// dense runs of neighbouring blocks that collide and wrap around the table.
        #[test]
        fn agrees_with_a_hash_map(
            ops in proptest::collection::vec((0u8..3, 0u64..200, 0u32..64), 1..2000),
            stride in prop_oneof![Just(1u64), Just(64u64), Just(1u64 << 40)],
        ) {
            let mut ours = BlockMap::new(64).unwrap();
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (op, b, slot) in ops {
                let block = b * stride;
                match op {
                    0 if model.len() < 64 || model.contains_key(&block) => {
                        prop_assert_eq!(ours.insert(block, slot), model.insert(block, slot));
                    }
                    1 => prop_assert_eq!(ours.remove(block).map(|e| e.slot), model.remove(&block)),
                    _ => prop_assert_eq!(ours.get(block), model.get(&block).copied()),
                }
                prop_assert_eq!(ours.len(), model.len());
            }
            for (&b, &s) in &model {
                prop_assert_eq!(ours.get(b), Some(s));
            }
        }
    }
}
