//! `arc`: Adaptive Replacement Cache (Megiddo & Modha, FAST '03).
//!
//! Two LRU lists of resident blocks, T1 (seen once recently) and T2 (seen at least twice),
//! each shadowed by a ghost list of ids it recently evicted (B1, B2). A miss that hits a ghost
//! shows which list was cut too short, and moves the target size `p` of T1 towards it: ARC
//! tunes its recency/frequency balance to the workload with no parameters.

use super::entries::{Entries, Queue};
use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};

const T1: u8 = 0;
const T2: u8 = 1;
const B1: u8 = 2;
const B2: u8 = 3;

pub struct Arc {
    capacity: usize,
    /// Target size of T1.
    p: usize,
    entries: Entries,
    /// Indexed by `T1`, `T2`, `B1`, `B2`.
    queues: [Queue; 4],
}

impl Arc {
    pub fn new(capacity_blocks: usize) -> Self {
        Self {
            capacity: capacity_blocks,
            p: 0,
            // Residents plus ghosts never exceed twice the capacity.
            entries: Entries::with_capacity(capacity_blocks * 2),
            queues: [Queue::new(); 4],
        }
    }

    fn len_of(&self, q: u8) -> usize {
        self.queues[q as usize].len()
    }

    fn drop_oldest(&mut self, q: u8) {
        let idx = self.queues[q as usize].tail();
        self.entries.unlink(&mut self.queues[q as usize], idx);
        self.entries.release(idx);
    }

    /// ARC's REPLACE: evicts from T1 when it is over its target `p` (or at it, when the
    /// missed block came from B2), else from T2; the victim's id moves to that list's ghost.
    /// Pinned blocks are skipped, falling back to the other list.
    fn replace(
        &mut self,
        p: usize,
        from_b2: bool,
        evictable: &mut dyn FnMut(BlockId) -> bool,
    ) -> Result<BlockId, NoVictim> {
        let t1 = self.len_of(T1);
        let prefer_t1 = t1 > 0 && (t1 > p || (from_b2 && t1 == p));
        let order = if prefer_t1 { [T1, T2] } else { [T2, T1] };
        for list in order {
            if let Some(idx) = self
                .entries
                .oldest_evictable(&self.queues[list as usize], evictable)
            {
                let ghost = if list == T1 { B1 } else { B2 };
                let [t1, t2, b1, b2] = &mut self.queues;
                let (from, to) = if list == T1 { (t1, b1) } else { (t2, b2) };
                self.entries.move_to_head(from, to, idx);
                let e = self.entries.get_mut(idx);
                e.queue = ghost;
                return Ok(e.block);
            }
        }
        Err(NoVictim)
    }
}

impl CachePolicy for Arc {
    fn name(&self) -> &'static str {
        "arc"
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.len_of(T1) + self.len_of(T2)
    }

    fn contains(&self, block: BlockId) -> bool {
        self.entries
            .find(block)
            .is_some_and(|idx| self.entries.get(idx).queue <= T2)
    }

    fn touch(&mut self, block: BlockId, _hint: AccessHint) {
        if let Some(idx) = self.entries.find(block) {
            let [t1, t2, _, _] = &mut self.queues;
            match self.entries.get(idx).queue {
                T1 => {
                    self.entries.move_to_head(t1, t2, idx);
                    self.entries.get_mut(idx).queue = T2;
                }
                T2 => self.entries.refresh(t2, idx),
                _ => {}
            }
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
        let c = self.capacity;
        let ghost = self
            .entries
            .find(block)
            .map(|idx| self.entries.get(idx).queue);
        let (b1, b2) = (self.len_of(B1), self.len_of(B2));
        // A ghost hit grows the list that evicted it; computed first, committed only once
        // the eviction succeeded.
        let p = match ghost {
            Some(B1) => (self.p + (b2 / b1.max(1)).max(1)).min(c),
            Some(B2) => self.p.saturating_sub((b1 / b2.max(1)).max(1)),
            _ => self.p,
        };
        let victim = if self.len() >= c {
            Some(self.replace(p, ghost == Some(B2), evictable)?)
        } else {
            None
        };
        self.p = p;
        let target = if let Some(idx) = self.entries.find(block) {
            // Still a ghost (REPLACE only adds ghosts): the block was reused, so frequent.
            let q = self.entries.get(idx).queue;
            self.entries.unlink(&mut self.queues[q as usize], idx);
            self.entries.release(idx);
            T2
        } else {
            // Bound the history: T1 + B1 <= c and everything <= 2c, counting the new block.
            while self.len_of(T1) + self.len_of(B1) >= c && self.len_of(B1) > 0 {
                self.drop_oldest(B1);
            }
            T1
        };
        while self.entries_total() >= 2 * c {
            if self.len_of(B2) > 0 {
                self.drop_oldest(B2);
            } else {
                self.drop_oldest(B1);
            }
        }
        let idx = self.entries.alloc(block, target);
        self.entries
            .push_head(&mut self.queues[target as usize], idx);
        Ok(victim)
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(idx) = self.entries.find(block) {
            let q = self.entries.get(idx).queue;
            if q <= T2 {
                self.entries.unlink(&mut self.queues[q as usize], idx);
                self.entries.release(idx);
            }
        }
    }
}

impl Arc {
    fn entries_total(&self) -> usize {
        self.queues.iter().map(Queue::len).sum()
    }
}
