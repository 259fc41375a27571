//! `lirs`: Low Inter-reference Recency Set (Jiang & Zhang, SIGMETRICS '02).
//!
//! LIRS ranks blocks by *inter-reference recency* (how many other blocks were touched between
//! a block's last two references) rather than by recency alone. Blocks with short IRR
//! (LIR, ~99% of the slots) stay; new and long-IRR blocks (HIR) get the remaining 1% and are
//! evicted first, but are remembered in the recency stack S (as non-resident ghosts) so that a
//! block that returns soon enough becomes LIR. That is what makes LIRS resist scans and
//! loops longer than the cache, the patterns of VM block I/O that defeat LRU.
//!
//! Layout: stack S is the entries' primary queue; an entry can at the same time be in Q (the
//! FIFO of resident HIR blocks) or in NR (the non-resident HIR blocks in S, oldest first, so
//! their number can be bounded), which use a second, parallel set of links.
//!
//! `lirs-hint` ([`LirsConfig::HINTED`]) adds one rule, fed by the tier's [`AccessHint`]: a hit
//! by a *large read* on a resident HIR block is a correlated reference, not evidence of a
//! short IRR. It refreshes the block (top of S, head of Q) but does not make it LIR. On VM
//! traces, blocks of large reads come back soon only as part of the same stream (the next
//! request re-reading a block the previous one ended in, read-ahead overlap) and otherwise
//! not for a long time; the paper's rule promotes those blocks and demotes genuinely hot LIR
//! blocks for them. A miss is unaffected: a block returning while still a ghost in S is
//! promoted whatever the request, so a hot set touched only by large reads is still learned
//! (one miss later). Writes and small reads keep the paper's rules.

use super::entries::{Entries, Queue, NIL};
use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};

/// Entry states, in `Entry::queue`.
const LIR: u8 = 0;
const HIR: u8 = 1;
const NONRESIDENT: u8 = 2;

/// `Entry::freq` bit: the entry is in stack S.
const IN_S: u8 = 1;

/// The knobs of LIRS.
#[derive(Clone, Copy, Debug)]
pub struct LirsConfig {
    /// Share of the slots for resident HIR blocks (the paper uses 1%).
    pub hir_ratio: f64,
    /// Non-resident HIR entries remembered, as a share of the slots.
    pub ghost_ratio: f64,
    /// A read covering at least this many blocks is *large*: its hits on resident HIR blocks
    /// do not promote them to LIR (see the module docs). 0 turns the rule off.
    pub large_read_blocks: u32,
}

impl LirsConfig {
    /// The paper's LIRS: 1% HIR, as many ghosts as slots, hints ignored.
    pub const PAPER: Self = Self {
        hir_ratio: 0.01,
        ghost_ratio: 1.0,
        large_read_blocks: 0,
    };

    /// `lirs-hint`: the paper's LIRS plus the large-read rule. Large means 16 cache blocks or
    /// more (64 KiB at the default 4 KiB block): the size where guest read-ahead and
    /// streaming requests start, well above the 1-8 block requests of random I/O.
    pub const HINTED: Self = Self {
        large_read_blocks: 16,
        ..Self::PAPER
    };
}

/// A second doubly linked list threaded through the same slab indexes (for Q and NR).
struct AuxQueue {
    head: u32,
    tail: u32,
    len: usize,
}

impl AuxQueue {
    const fn new() -> Self {
        Self {
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    /// `links[i] = [towards head, towards tail]`.
    fn push_head(&mut self, links: &mut [[u32; 2]], idx: u32) {
        links[idx as usize] = [NIL, self.head];
        if self.head != NIL {
            links[self.head as usize][0] = idx;
        } else {
            self.tail = idx;
        }
        self.head = idx;
        self.len += 1;
    }

    fn unlink(&mut self, links: &mut [[u32; 2]], idx: u32) {
        let [prev, next] = links[idx as usize];
        if prev != NIL {
            links[prev as usize][1] = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            links[next as usize][0] = prev;
        } else {
            self.tail = prev;
        }
        links[idx as usize] = [NIL, NIL];
        self.len -= 1;
    }
}

pub struct Lirs {
    name: &'static str,
    /// `LirsConfig::large_read_blocks`, 0 for "never".
    large_read_blocks: u32,
    capacity: usize,
    lir_capacity: usize,
    ghost_capacity: usize,
    lir_count: usize,
    entries: Entries,
    /// The LIRS stack S, top = head.
    stack: Queue,
    aux: Box<[[u32; 2]]>,
    /// Resident HIR blocks; evict from the tail.
    hir: AuxQueue,
    /// Non-resident HIR blocks in S, newest at the head.
    ghosts: AuxQueue,
    /// Scratch for `touch_many`: the entries of a batch's blocks.
    found: Vec<u32>,
}

impl Lirs {
    pub fn new(capacity_blocks: usize) -> Self {
        Self::with_config("lirs", capacity_blocks, LirsConfig::PAPER)
    }

    pub fn with_config(name: &'static str, capacity_blocks: usize, config: LirsConfig) -> Self {
        let hir = ((capacity_blocks as f64 * config.hir_ratio) as usize).max(1);
        let ghost_capacity = (capacity_blocks as f64 * config.ghost_ratio) as usize;
        let max = capacity_blocks + ghost_capacity + 1;
        Self {
            name,
            large_read_blocks: config.large_read_blocks,
            capacity: capacity_blocks,
            lir_capacity: capacity_blocks.saturating_sub(hir),
            ghost_capacity,
            lir_count: 0,
            entries: Entries::with_capacity(max),
            stack: Queue::new(),
            aux: vec![[NIL, NIL]; max].into_boxed_slice(),
            hir: AuxQueue::new(),
            ghosts: AuxQueue::new(),
            // A batch is at most a queue's depth of requests (32 by default).
            found: Vec::with_capacity(256),
        }
    }

    /// Whether a reference by `hint` is a large read, whose hits do not promote.
    fn large_read(&self, hint: AccessHint) -> bool {
        self.large_read_blocks != 0 && !hint.write && hint.request_blocks >= self.large_read_blocks
    }

    fn in_stack(&self, idx: u32) -> bool {
        self.entries.get(idx).freq & IN_S != 0
    }

    fn stack_remove(&mut self, idx: u32) {
        self.entries.unlink(&mut self.stack, idx);
        self.entries.get_mut(idx).freq &= !IN_S;
    }

    /// Moves `idx` to the top of S (pushing it if it is not in S).
    fn stack_top(&mut self, idx: u32) {
        if self.in_stack(idx) {
            self.entries.refresh(&mut self.stack, idx);
        } else {
            self.entries.push_head(&mut self.stack, idx);
            self.entries.get_mut(idx).freq |= IN_S;
        }
    }

    /// Keeps the bottom of S a LIR block: HIR entries below the oldest LIR block can never
    /// become LIR (their IRR would exceed every LIR block's recency), so they leave S;
    /// non-resident ones are forgotten.
    fn prune(&mut self) {
        loop {
            let bottom = self.stack.tail();
            if bottom == NIL || self.entries.get(bottom).queue == LIR {
                return;
            }
            self.stack_remove(bottom);
            if self.entries.get(bottom).queue == NONRESIDENT {
                self.ghosts.unlink(&mut self.aux, bottom);
                self.entries.release(bottom);
            }
        }
    }

    /// Turns the bottom LIR block of S into a resident HIR block (when LIR is over its size).
    fn demote_bottom(&mut self) {
        while self.lir_count > self.lir_capacity {
            // HIR entries can sit below every LIR block when there were none (tiny caches,
            // removals); prune first so that the bottom is the oldest LIR block.
            self.prune();
            let bottom = self.stack.tail();
            debug_assert_eq!(self.entries.get(bottom).queue, LIR);
            self.stack_remove(bottom);
            self.entries.get_mut(bottom).queue = HIR;
            self.hir.push_head(&mut self.aux, bottom);
            self.lir_count -= 1;
            self.prune();
        }
    }

    /// A resident HIR block (or returning ghost) `idx` at the top of S becomes LIR.
    fn promote(&mut self, idx: u32) {
        self.entries.get_mut(idx).queue = LIR;
        self.lir_count += 1;
        self.stack_top(idx);
        self.demote_bottom();
        self.prune();
    }

    /// Frees one slot: the oldest evictable resident HIR block, else the oldest evictable
    /// LIR block (only when pins or a tiny cache leave no HIR candidate).
    fn evict(&mut self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Result<BlockId, NoVictim> {
        let mut cur = self.hir.tail;
        while cur != NIL {
            let block = self.entries.get(cur).block;
            if evictable(block) {
                self.hir.unlink(&mut self.aux, cur);
                if self.in_stack(cur) {
                    // Stays in S as history: its return within S's span makes it LIR.
                    self.entries.get_mut(cur).queue = NONRESIDENT;
                    self.ghosts.push_head(&mut self.aux, cur);
                    if self.ghosts.len > self.ghost_capacity {
                        let old = self.ghosts.tail;
                        self.ghosts.unlink(&mut self.aux, old);
                        self.stack_remove(old);
                        self.entries.release(old);
                        self.prune();
                    }
                } else {
                    self.entries.release(cur);
                }
                return Ok(block);
            }
            cur = self.aux[cur as usize][0];
        }
        let mut cur = self.stack.tail();
        while cur != NIL {
            let e = *self.entries.get(cur);
            if e.queue == LIR && evictable(e.block) {
                self.stack_remove(cur);
                self.entries.release(cur);
                self.lir_count -= 1;
                self.prune();
                return Ok(e.block);
            }
            cur = self.entries.newer(cur);
        }
        Err(NoVictim)
    }

    /// A hit on entry `idx` (a no-op for a non-resident one): the paper's rules.
    fn touch_entry(&mut self, idx: u32, hint: AccessHint) {
        match self.entries.get(idx).queue {
            LIR => {
                let was_bottom = self.stack.tail() == idx;
                self.entries.refresh(&mut self.stack, idx);
                if was_bottom {
                    self.prune();
                }
            }
            HIR if self.in_stack(idx) && !self.large_read(hint) => {
                // Reused while still in S: its IRR beats the bottom LIR block's recency.
                self.hir.unlink(&mut self.aux, idx);
                self.promote(idx);
            }
            HIR => {
                // Not in S (its IRR is unknown), or a large read's correlated reference: a
                // fresh start as the newest HIR block.
                self.stack_top(idx);
                self.hir.unlink(&mut self.aux, idx);
                self.hir.push_head(&mut self.aux, idx);
            }
            _ => {}
        }
    }
}

impl CachePolicy for Lirs {
    fn name(&self) -> &'static str {
        self.name
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn len(&self) -> usize {
        self.lir_count + self.hir.len
    }

    fn contains(&self, block: BlockId) -> bool {
        self.entries
            .find(block)
            .is_some_and(|idx| self.entries.get(idx).queue != NONRESIDENT)
    }

    fn touch(&mut self, block: BlockId, hint: AccessHint) {
        if let Some(idx) = self.entries.find(block) {
            self.touch_entry(idx, hint);
        }
    }

    fn touch_many(&mut self, hits: &[(BlockId, AccessHint)]) {
        // A touch reads the index, then the entry it names, then writes the entry's stack
        // neighbours: three dependent cache misses, the largest cost of a warm cache's hit.
        // Prefetching each level for the whole batch first overlaps them.
        for &(block, _) in hits {
            self.entries.prefetch_lookup(block);
        }
        for &(block, _) in hits {
            self.entries.prefetch_home_entry(block);
        }
        self.found.clear();
        for &(block, _) in hits {
            self.found.push(self.entries.find(block).unwrap_or(NIL));
        }
        for &idx in &self.found {
            if idx != NIL {
                self.entries.prefetch_neighbours(idx);
            }
        }
        for (i, &(_, hint)) in hits.iter().enumerate() {
            // An earlier touch's pruning may have released a ghost found above; a released
            // entry keeps its NONRESIDENT tag (touches allocate none), so it stays a no-op.
            let idx = self.found[i];
            if idx != NIL {
                self.touch_entry(idx, hint);
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
        let victim = if self.len() >= self.capacity {
            Some(self.evict(evictable)?)
        } else {
            None
        };
        // The eviction may have pruned this block's own ghost entry; look again.
        if let Some(idx) = self.entries.find(block) {
            self.ghosts.unlink(&mut self.aux, idx);
            self.promote(idx);
        } else if self.lir_count < self.lir_capacity {
            // Warm-up: until LIR is full every block is LIR.
            let idx = self.entries.alloc(block, LIR);
            self.lir_count += 1;
            self.stack_top(idx);
        } else {
            let idx = self.entries.alloc(block, HIR);
            self.stack_top(idx);
            self.hir.push_head(&mut self.aux, idx);
        }
        Ok(victim)
    }

    fn remove(&mut self, block: BlockId) {
        let Some(idx) = self.entries.find(block) else {
            return;
        };
        match self.entries.get(idx).queue {
            LIR => {
                self.stack_remove(idx);
                self.lir_count -= 1;
            }
            HIR => {
                self.hir.unlink(&mut self.aux, idx);
                if self.in_stack(idx) {
                    self.stack_remove(idx);
                }
            }
            // History is not residency: invalidation leaves ghosts alone.
            _ => return,
        }
        self.entries.release(idx);
        self.prune();
    }
}
