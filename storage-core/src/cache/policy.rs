//! The cache policy seam: which blocks are resident on the cache device, which block to admit
//! on a miss, which to evict. A policy only tracks block ids; it never does I/O, so the same
//! code runs in the daemon and in the trace replay tool (`benches`' `cache-replay`).
//!
//! Block ids are cache-block indexes on the capacity device (`offset / cache_block`).

/// A cache-block index on the capacity device.
pub type BlockId = u64;

/// What the caller knows about the request a reference belongs to. The tier passes the same
/// hint for every block of one guest request, and `cache-replay` derives it from the trace the
/// same way, so a policy that uses it behaves identically in both.
///
/// Why a policy may care: on VM block traces, blocks of large reads (streaming a file, a
/// backup, a scan) are rarely read again soon, while blocks of equally large writes often are
/// (the guest rewrites or rereads what it just wrote). Nothing else a policy sees tells them
/// apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessHint {
    /// The request writes (otherwise it reads).
    pub write: bool,
    /// Cache blocks the request covers (at least 1; saturates at `u32::MAX`).
    pub request_blocks: u32,
}

/// A one-block read: what a caller that knows nothing about the request should pass.
impl Default for AccessHint {
    fn default() -> Self {
        Self::read(1)
    }
}

impl AccessHint {
    /// A read covering `request_blocks` cache blocks.
    pub fn read(request_blocks: u64) -> Self {
        Self::new(false, request_blocks)
    }

    /// A write covering `request_blocks` cache blocks.
    pub fn write(request_blocks: u64) -> Self {
        Self::new(true, request_blocks)
    }

    pub fn new(write: bool, request_blocks: u64) -> Self {
        Self {
            write,
            request_blocks: u32::try_from(request_blocks.max(1)).unwrap_or(u32::MAX),
        }
    }
}

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

    /// A hit: `block` (resident) was read or written by a request described by `hint`.
    fn touch(&mut self, block: BlockId, hint: AccessHint);

    /// Hits on several blocks, in order: [`touch`](Self::touch) for each that is still
    /// resident. The tier hands over a batch's read hits at once, so that a policy can
    /// overlap the CPU-cache misses of their lookups instead of waiting for each in turn.
    fn touch_many(&mut self, hits: &[(BlockId, AccessHint)]) {
        for &(block, hint) in hits {
            if self.contains(block) {
                self.touch(block, hint);
            }
        }
    }

    /// A miss on `block` by a request described by `hint`: should it be admitted? May update
    /// the policy's history (ghost entries, frequency sketches) but never changes residency.
    fn should_admit(&mut self, block: BlockId, hint: AccessHint) -> bool;

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
