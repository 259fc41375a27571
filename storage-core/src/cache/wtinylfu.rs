//! `wtinylfu`: W-TinyLFU (Einziger, Friedman & Manes; Caffeine's policy).
//!
//! New blocks enter a small LRU *window*. When the window overflows, its oldest block becomes a
//! candidate for the *main* cache, a segmented LRU (probation, then protected after a hit);
//! when the cache is full the candidate duels main's eviction victim, and the one with the
//! higher estimated frequency ([`FrequencySketch`]) stays. The window gives recency-friendly
//! bursts a chance; the duel keeps one-time blocks (scans) from displacing the frequent ones.

use super::entries::{Entries, Queue};
use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};
use super::sketch::FrequencySketch;

const WINDOW: u8 = 0;
const PROBATION: u8 = 1;
const PROTECTED: u8 = 2;

/// The knobs of W-TinyLFU.
#[derive(Clone, Copy, Debug)]
pub struct WTinyLfuConfig {
    /// Share of the slots for the admission window.
    pub window_ratio: f64,
    /// Share of the main cache for the protected segment.
    pub protected_ratio: f64,
}

impl WTinyLfuConfig {
    /// Caffeine's starting point: a 1% window, 80% of main protected.
    pub const CAFFEINE: Self = Self {
        window_ratio: 0.01,
        protected_ratio: 0.8,
    };
}

pub struct WTinyLfu {
    name: &'static str,
    capacity: usize,
    window_capacity: usize,
    protected_capacity: usize,
    entries: Entries,
    /// Indexed by `WINDOW`, `PROBATION`, `PROTECTED`.
    queues: [Queue; 3],
    sketch: FrequencySketch,
}

impl WTinyLfu {
    pub fn new(capacity_blocks: usize) -> Self {
        Self::with_config("wtinylfu", capacity_blocks, WTinyLfuConfig::CAFFEINE)
    }

    pub fn with_config(name: &'static str, capacity_blocks: usize, config: WTinyLfuConfig) -> Self {
        let window_capacity = ((capacity_blocks as f64 * config.window_ratio) as usize)
            .clamp(1, capacity_blocks.max(1));
        let main = capacity_blocks.saturating_sub(window_capacity);
        Self {
            name,
            capacity: capacity_blocks,
            window_capacity,
            protected_capacity: (main as f64 * config.protected_ratio) as usize,
            entries: Entries::with_capacity(capacity_blocks),
            queues: [Queue::new(); 3],
            sketch: FrequencySketch::new(capacity_blocks),
        }
    }

    fn resident(&self) -> usize {
        self.queues.iter().map(Queue::len).sum()
    }

    /// Main's eviction victim: the oldest evictable block of probation, else of protected.
    fn main_victim(&self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Option<u32> {
        self.entries
            .oldest_evictable(&self.queues[PROBATION as usize], evictable)
            .or_else(|| {
                self.entries
                    .oldest_evictable(&self.queues[PROTECTED as usize], evictable)
            })
    }

    fn drop_entry(&mut self, idx: u32) -> BlockId {
        let e = *self.entries.get(idx);
        self.entries.unlink(&mut self.queues[e.queue as usize], idx);
        self.entries.release(idx);
        e.block
    }

    /// Moves the window's oldest block to the head of probation.
    fn window_to_main(&mut self, idx: u32) {
        let [window, probation, _] = &mut self.queues;
        self.entries.move_to_head(window, probation, idx);
        self.entries.get_mut(idx).queue = PROBATION;
    }

    /// Frees one slot in a full cache, for a block about to enter the window.
    fn evict(&mut self, evictable: &mut dyn FnMut(BlockId) -> bool) -> Result<BlockId, NoVictim> {
        let window = &self.queues[WINDOW as usize];
        if window.len() >= self.window_capacity && window.len() > 0 {
            // The window overflows: its oldest block duels main's victim.
            let candidate = window.tail();
            let cand_block = self.entries.get(candidate).block;
            let cand_free = evictable(cand_block);
            match self.main_victim(evictable) {
                Some(victim) => {
                    let victim_block = self.entries.get(victim).block;
                    // Ties go to the incumbent: a candidate must prove itself more frequent.
                    let admit = !cand_free
                        || self.sketch.estimate(cand_block) > self.sketch.estimate(victim_block);
                    if admit {
                        self.drop_entry(victim);
                        self.window_to_main(candidate);
                        Ok(victim_block)
                    } else {
                        Ok(self.drop_entry(candidate))
                    }
                }
                None if cand_free => Ok(self.drop_entry(candidate)),
                None => {
                    let idx = self
                        .entries
                        .oldest_evictable(window, evictable)
                        .ok_or(NoVictim)?;
                    Ok(self.drop_entry(idx))
                }
            }
        } else {
            let idx = self
                .main_victim(evictable)
                .or_else(|| {
                    self.entries
                        .oldest_evictable(&self.queues[WINDOW as usize], evictable)
                })
                .ok_or(NoVictim)?;
            Ok(self.drop_entry(idx))
        }
    }
}

impl CachePolicy for WTinyLfu {
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
        self.entries.find(block).is_some()
    }

    fn touch(&mut self, block: BlockId, _hint: AccessHint) {
        self.sketch.increment(block);
        let Some(idx) = self.entries.find(block) else {
            return;
        };
        let [window, probation, protected] = &mut self.queues;
        match self.entries.get(idx).queue {
            WINDOW => self.entries.refresh(window, idx),
            PROBATION => {
                self.entries.move_to_head(probation, protected, idx);
                self.entries.get_mut(idx).queue = PROTECTED;
                if protected.len() > self.protected_capacity {
                    let demoted = protected.tail();
                    self.entries.move_to_head(protected, probation, demoted);
                    self.entries.get_mut(demoted).queue = PROBATION;
                }
            }
            _ => self.entries.refresh(protected, idx),
        }
    }

    fn should_admit(&mut self, block: BlockId, _hint: AccessHint) -> bool {
        // Every miss enters the window; the frequency filter acts when it leaves. Count the
        // miss so that a block's history includes the times it was not cached.
        self.sketch.increment(block);
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
        let victim = if self.resident() >= self.capacity {
            Some(self.evict(evictable)?)
        } else {
            // Room in the cache: an overflowing window hands its oldest block to main freely.
            let window = &self.queues[WINDOW as usize];
            if window.len() >= self.window_capacity && window.len() > 0 {
                self.window_to_main(window.tail());
            }
            None
        };
        let idx = self.entries.alloc(block, WINDOW);
        self.entries
            .push_head(&mut self.queues[WINDOW as usize], idx);
        Ok(victim)
    }

    fn remove(&mut self, block: BlockId) {
        if let Some(idx) = self.entries.find(block) {
            self.drop_entry(idx);
        }
    }
}
