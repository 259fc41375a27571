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

pub use policy::{AccessHint, BlockId, CachePolicy, NoVictim};

/// The policy the daemon uses unless told otherwise: LIRS with the large-read rule
/// (`lirs-hint`, see [`lirs`]). On the CloudPhysics trace (`cache-replay`, 4 KiB blocks,
/// reads and writes with the tier's hints) it misses 84.3% / 77.0% / 68.9% of references at
/// 64 / 128 / 256 MiB, against LRU's 88.4% / 86.9% / 75.1%, the paper's LIRS's
/// 84.4% / 78.7% / 69.5% and S3-FIFO's 85.1% / 79.8% / 69.1%; like LIRS it resists scans and
/// loops, which VM block I/O is full of.
pub const DEFAULT_POLICY: &str = "lirs-hint";

/// Every name [`by_name`] accepts.
pub const POLICY_NAMES: &[&str] = &["lru", "s3fifo", "arc", "lirs", "lirs-hint", "wtinylfu"];

/// The policy called `name` (one of [`POLICY_NAMES`]) over `capacity_blocks` cache slots.
pub fn by_name(name: &str, capacity_blocks: usize) -> Option<Box<dyn CachePolicy>> {
    Some(match name {
        "lru" => Box::new(lru::Lru::new(capacity_blocks)),
        "s3fifo" => Box::new(s3fifo::S3Fifo::new(capacity_blocks)),
        "arc" => Box::new(arc::Arc::new(capacity_blocks)),
        "lirs" => Box::new(lirs::Lirs::new(capacity_blocks)),
        "lirs-hint" => Box::new(lirs::Lirs::with_config(
            "lirs-hint",
            capacity_blocks,
            lirs::LirsConfig::HINTED,
        )),
        "wtinylfu" => Box::new(wtinylfu::WTinyLfu::new(capacity_blocks)),
        _ => return None,
    })
}

#[cfg(test)]
mod tests;
