//! `lru`: least-recently-used eviction, admitting every miss. The baseline the other policies
//! are measured against.

use super::entries::{Entries, Queue};
use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};

/// Queue tag of resident entries (LRU has only one queue).
const RESIDENT: u8 = 0;

pub struct Lru {
    capacity: usize,
    entries: Entries,
    /// Head = most recently used.
    queue: Queue,
}

impl Lru {
    pub fn new(capacity_blocks: usize) -> Self {
        Self {
            capacity: capacity_blocks,
            entries: Entries::with_capacity(capacity_blocks),
            queue: Queue::new(),
        }
    }
}

impl CachePolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn contains(&self, block: BlockId) -> bool {
        self.entries.find(block).is_some()
    }

    fn touch(&mut self, block: BlockId, _hint: AccessHint) {
        if let Some(idx) = self.entries.find(block) {
            self.entries.refresh(&mut self.queue, idx);
        }
    }

    fn should_admit(&mut self, _block: BlockId, _hint: AccessHint) -> bool {
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
        let mut victim = None;
        if self.queue.len() >= self.capacity {
            // Pinned blocks are skipped, not refreshed: they stay the next candidates once
            // they are clean again.
            let idx = self
                .entries
                .oldest_evictable(&self.queue, evictable)
                .ok_or(NoVictim)?;
            victim = Some(self.entries.get(idx).block);
            self.entries.unlink(&mut self.queue, idx);
            self.entries.release(idx);
        }
        let idx = self.entries.alloc(block, RESIDENT);
        self.entries.push_head(&mut self.queue, idx);
        Ok(victim)
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(idx) = self.entries.find(block) {
            self.entries.unlink(&mut self.queue, idx);
            self.entries.release(idx);
        }
    }
}
