//! `s3fifo`: S3-FIFO (Yang et al., SOSP '23): three static FIFO queues.
//!
//! - *small* (10% of the slots) takes new blocks. Most blocks on a block device are touched
//!   once; S3-FIFO's bet is that they should leave quickly, before they pollute the rest.
//! - *main* (the other 90%) takes blocks that were hit while in small, or that come back while
//!   remembered by ghost. Eviction from main is CLOCK with a 2-bit counter: a block with hits
//!   left is reinserted with one fewer instead of evicted.
//! - *ghost* remembers the ids (not the data) of blocks evicted from small, as many as main
//!   holds: a miss on a ghost id means the block's reuse distance was just too long for small.
//!
//! [`S3FifoConfig`] exposes the knobs so that tuned variants can share this code.

use super::entries::{Entries, Queue, NIL};
use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};

const SMALL: u8 = 0;
const MAIN: u8 = 1;
const GHOST: u8 = 2;

/// The knobs of S3-FIFO.
#[derive(Clone, Copy, Debug)]
pub struct S3FifoConfig {
    /// Share of the slots for the small queue.
    pub small_ratio: f64,
    /// Ghost entries, as a share of the slots.
    pub ghost_ratio: f64,
    /// Hits while in small needed to move to main on eviction (the paper uses 1).
    pub promote_hits: u8,
    /// Cap of the per-block hit counter (3: a 2-bit counter).
    pub max_freq: u8,
}

impl S3FifoConfig {
    /// The paper's configuration: 10% small, ghost as large as main, one hit promotes,
    /// a 2-bit counter.
    pub const PAPER: Self = Self {
        small_ratio: 0.1,
        ghost_ratio: 0.9,
        promote_hits: 1,
        max_freq: 3,
    };
}

pub struct S3Fifo {
    name: &'static str,
    config: S3FifoConfig,
    capacity: usize,
    small_target: usize,
    ghost_capacity: usize,
    entries: Entries,
    /// Indexed by the queue tags `SMALL`, `MAIN`, `GHOST`.
    queues: [Queue; 3],
    /// Until the first eviction, new blocks overflow into main once small is full, so a cold
    /// cache fills completely (as libCacheSim's S3-FIFO does).
    has_evicted: bool,
}

impl S3Fifo {
    pub fn new(capacity_blocks: usize) -> Self {
        Self::with_config("s3fifo", capacity_blocks, S3FifoConfig::PAPER)
    }

    pub fn with_config(name: &'static str, capacity_blocks: usize, config: S3FifoConfig) -> Self {
        let small_target = ((capacity_blocks as f64 * config.small_ratio) as usize).max(1);
        let ghost_capacity = (capacity_blocks as f64 * config.ghost_ratio) as usize;
        Self {
            name,
            config,
            capacity: capacity_blocks,
            small_target,
            ghost_capacity,
            entries: Entries::with_capacity(capacity_blocks + ghost_capacity),
            queues: [Queue::new(); 3],
            has_evicted: false,
        }
    }

    fn resident(&self) -> usize {
        self.queues[SMALL as usize].len() + self.queues[MAIN as usize].len()
    }

    /// Evicts from small: blocks hit often enough move to main (even when pinned: moving is
    /// not evicting), the oldest evictable other one becomes a ghost.
    fn evict_small(&mut self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Option<BlockId> {
        let [small, main, ghost] = &mut self.queues;
        let entries = &mut self.entries;
        let mut cur = small.tail();
        while cur != NIL {
            let newer = entries.newer(cur);
            let e = entries.get(cur);
            if e.freq >= self.config.promote_hits {
                entries.move_to_head(small, main, cur);
                let e = entries.get_mut(cur);
                e.queue = MAIN;
                e.freq = 0;
            } else if evictable(e.block) {
                let block = e.block;
                entries.unlink(small, cur);
                if self.ghost_capacity == 0 {
                    entries.release(cur);
                } else {
                    if ghost.len() >= self.ghost_capacity {
                        let old = ghost.tail();
                        entries.unlink(ghost, old);
                        entries.release(old);
                    }
                    entries.get_mut(cur).queue = GHOST;
                    entries.push_head(ghost, cur);
                }
                return Some(block);
            }
            cur = newer;
        }
        None
    }

    /// Evicts from main, CLOCK-style: a block with hits left is reinserted at the head with
    /// one fewer, so the scan terminates after at most `max_freq + 1` passes.
    fn evict_main(&mut self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Option<BlockId> {
        let main = &mut self.queues[MAIN as usize];
        let entries = &mut self.entries;
        let mut cur = main.tail();
        while cur != NIL {
            let mut newer = entries.newer(cur);
            let e = *entries.get(cur);
            if e.freq > 0 {
                entries.refresh(main, cur);
                entries.get_mut(cur).freq = e.freq - 1;
                if newer == NIL {
                    // It was the head already: look at it again, with one hit fewer.
                    newer = cur;
                }
            } else if evictable(e.block) {
                entries.unlink(main, cur);
                entries.release(cur);
                return Some(e.block);
            }
            cur = newer;
        }
        None
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Option<BlockId> {
        self.has_evicted = true;
        let main_target = self.capacity - self.small_target.min(self.capacity);
        let [small, main, _] = &self.queues;
        if main.len() > main_target || small.len() == 0 {
            self.evict_main(evictable)
                .or_else(|| self.evict_small(evictable))
                // Small may just have promoted an evictable block into main.
                .or_else(|| self.evict_main(evictable))
        } else {
            self.evict_small(evictable)
                .or_else(|| self.evict_main(evictable))
        }
    }
}

impl CachePolicy for S3Fifo {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.resident()
    }

    fn contains(&self, block: BlockId) -> bool {
        self.entries
            .find(block)
            .is_some_and(|idx| self.entries.get(idx).queue != GHOST)
    }

    fn touch(&mut self, block: BlockId, _hint: AccessHint) {
        if let Some(idx) = self.entries.find(block) {
            let e = self.entries.get_mut(idx);
            if e.queue != GHOST && e.freq < self.config.max_freq {
                e.freq += 1;
            }
        }
    }

    fn should_admit(&mut self, _block: BlockId, _hint: AccessHint) -> bool {
        // S3-FIFO admits everything to small; its filter is the quick exit from there.
        true
    }

    fn insert(
        &mut self,
        block: BlockId,
        evictable: &mut dyn FnMut(BlockId) -> bool,
    ) -> Result<Option<BlockId>, NoVictim> {
        debug_assert!(!self.contains(block), "insert of resident block {block}");
        if self.capacity == 0 {
            return Err(NoVictim);
        }
        let was_ghost = self.entries.find(block).is_some();
        let victim = if self.resident() >= self.capacity {
            Some(self.evict(evictable).ok_or(NoVictim)?)
        } else {
            None
        };
        // Eviction may have pushed this block's own ghost entry out of ghost; either way
        // the block's return is what counts.
        if let Some(idx) = self.entries.find(block) {
            self.entries.unlink(&mut self.queues[GHOST as usize], idx);
            self.entries.release(idx);
        }
        let small_full = self.queues[SMALL as usize].len() >= self.small_target;
        let tag = if was_ghost || (!self.has_evicted && small_full) {
            MAIN
        } else {
            SMALL
        };
        let idx = self.entries.alloc(block, tag);
        self.entries.push_head(&mut self.queues[tag as usize], idx);
        Ok(victim)
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(idx) = self.entries.find(block) {
            let tag = self.entries.get(idx).queue;
            // Ghost history is not residency: invalidation leaves it alone.
            if tag != GHOST {
                self.entries.unlink(&mut self.queues[tag as usize], idx);
                self.entries.release(idx);
            }
        }
    }
}
