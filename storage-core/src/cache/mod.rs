//! Block caching: the eviction/admission policies ([`policy`]) that decide which capacity-tier
//! blocks live on the cache device. The tier that moves the data is in `crate::tier`.
//!
//! This module owns the policy implementations and the one place that names them
//! ([`by_name`], [`POLICY_NAMES`], [`DEFAULT_POLICY`]). All of them share the preallocated
//! entry slab and index in `entries`, so none allocates per access in steady state.

pub mod arc;
mod entries;
pub mod lirs;
pub mod lru;
pub mod policy;
pub mod s3fifo;
mod sketch;
pub mod wtinylfu;

pub use policy::{BlockId, CachePolicy, NoVictim};

/// The policy the daemon uses unless told otherwise: LIRS. On the CloudPhysics trace
/// (`cache-replay`, 4 KiB blocks) it misses least at 64 and 128 MiB (84.4% / 78.7%, against
/// LRU's 88.4% / 86.9% and S3-FIFO's 85.1% / 79.8%) and is within half a point of S3-FIFO at
/// 256 MiB; it also resists scans and loops, which VM block I/O is full of.
pub const DEFAULT_POLICY: &str = "lirs";

/// Every name [`by_name`] accepts.
pub const POLICY_NAMES: &[&str] = &["lru", "s3fifo", "arc", "lirs", "wtinylfu"];

/// The policy called `name` (one of [`POLICY_NAMES`]) over `capacity_blocks` cache slots.
pub fn by_name(name: &str, capacity_blocks: usize) -> Option<Box<dyn CachePolicy>> {
    Some(match name {
        "lru" => Box::new(lru::Lru::new(capacity_blocks)),
        "s3fifo" => Box::new(s3fifo::S3Fifo::new(capacity_blocks)),
        "arc" => Box::new(arc::Arc::new(capacity_blocks)),
        "lirs" => Box::new(lirs::Lirs::new(capacity_blocks)),
        "wtinylfu" => Box::new(wtinylfu::WTinyLfu::new(capacity_blocks)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
