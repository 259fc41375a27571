//! The cache policy seam: which blocks are resident on the cache device, which block to admit
//! on a miss, which to evict. A policy only tracks block ids; it never does I/O, so the same
//! code runs in the daemon and in the trace replay tool (`benches`' `cache-replay`).
//!
//! Block ids are cache-block indexes on the capacity device (`offset / cache_block`).

/// A cache-block index on the capacity device.
pub type BlockId = u64;

/// Every resident block is pinned (dirty, or I/O in flight): nothing can be evicted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no block can be evicted")]
pub struct NoVictim;

/// An eviction/admission policy over a fixed number of cache slots.
///
/// Contract: `contains` reflects exactly the blocks inserted and not yet evicted or removed;
/// `len() <= capacity()` always; `insert` of a resident block is a caller bug (it may panic
/// in debug builds).
pub trait CachePolicy: Send {
    /// Short name, as accepted by [`super::by_name`] (`lru`, ...).
    fn name(&self) -> &'static str;

    /// Slots in the cache.
    fn capacity(&self) -> usize;

    /// Resident blocks.
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `block` is resident.
    fn contains(&self, block: BlockId) -> bool;

    /// A hit: `block` (resident) was read or written.
    fn touch(&mut self, block: BlockId);

    /// A miss on `block`: should it be admitted? May update the policy's history (ghost
    /// entries, frequency sketches) but never changes residency.
    fn should_admit(&mut self, block: BlockId) -> bool;

    /// Makes `block` resident. When the cache is full, first evicts one resident block for
    /// which `evictable` returns true and returns it; if none is evictable, nothing changes
    /// and `NoVictim` is returned.
    fn insert(
        &mut self,
        block: BlockId,
        evictable: &mut dyn FnMut(BlockId) -> bool,
    ) -> Result<Option<BlockId>, NoVictim>;

    /// Drops `block` from the cache (invalidation), if resident.
    fn remove(&mut self, block: BlockId);
}
