//! Block caching: the eviction/admission policies ([`policy`]) that decide which capacity-tier
//! blocks live on the cache device. The tier that moves the data is in `crate::tier`.
//!
//! This module owns the policy implementations and the one place that names them
//! ([`by_name`], [`POLICY_NAMES`], [`DEFAULT_POLICY`]). All of them share the preallocated
//! entry slab and index in `entries`, so none allocates per access in steady state.

mod entries;
pub mod lru;
pub mod policy;
pub mod s3fifo;

pub use policy::{BlockId, CachePolicy, NoVictim};

/// The policy the daemon uses unless told otherwise.
pub const DEFAULT_POLICY: &str = "s3fifo";

/// Every name [`by_name`] accepts.
pub const POLICY_NAMES: &[&str] = &["lru", "s3fifo"];

/// The policy called `name` (one of [`POLICY_NAMES`]) over `capacity_blocks` cache slots.
pub fn by_name(name: &str, capacity_blocks: usize) -> Option<Box<dyn CachePolicy>> {
    Some(match name {
        "lru" => Box::new(lru::Lru::new(capacity_blocks)),
        "s3fifo" => Box::new(s3fifo::S3Fifo::new(capacity_blocks)),
        _ => return None,
    })
}
