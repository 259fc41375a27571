//! Tiered disks: a fast cache device (an SSD file or partition) in front of a slower
//! capacity device, inside the daemon, layered over the engine seam like any other format.
//!
//! - this module: the spec ([`TierSpec`], [`CacheMode`]) and [`TierError`].
//! - `disk`: opening a tier (format or recover its cache, check its owner) and the
//!   control-plane handle [`TieredDisk`].
//! - `queue`: the per-worker [`TieredQueue`], which splits each request by cache block
//!   and sends every piece to the cache or the capacity device; `queue::plan` decides where.
//! - `shared`: what the queues and the background threads share.
//! - `state`: the in-memory slot table and free lists, under one mutex.
//! - `layout`: the cache device's on-disk format (superblocks, map regions, journal).
//! - `journal`: formatting, journal appends, checkpoints, recovery.
//! - `background`: the journal/flush thread (group commit) and the write-back cleaner.
//! - `device`: the devices as the background threads use them (recorded in tests).
//! - `metrics`: the tier's counters.
//!
//! Modes: write-through (both devices before completion), write-around (capacity only; the
//! cache copy is dropped), write-back (cache only; a cleaner copies dirty blocks back).

mod background;
mod block_map;
pub mod check;
mod device;
mod disk;
#[doc(hidden)]
pub mod fuzzing;
mod journal;
mod layout;
mod metrics;
#[cfg(test)]
mod power_cut_tests;
mod queue;
mod shared;
mod state;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

pub use disk::TieredDisk;
pub use layout::Layout;
pub use metrics::TierMetrics;
pub use queue::TieredQueue;

/// How writes treat the two devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    WriteThrough,
    WriteBack,
    WriteAround,
}

impl CacheMode {
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::WriteThrough => "writethrough",
            CacheMode::WriteBack => "writeback",
            CacheMode::WriteAround => "writearound",
        }
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "writethrough" => Ok(CacheMode::WriteThrough),
            "writeback" => Ok(CacheMode::WriteBack),
            "writearound" => Ok(CacheMode::WriteAround),
            _ => Err("expected writethrough, writeback or writearound".into()),
        }
    }
}

/// The cache part of a disk spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSpec {
    pub cache: PathBuf,
    pub cache_size: u64,
    pub mode: CacheMode,
    /// Policy name; the default policy when `None`.
    pub policy: Option<String>,
    pub block_size: u64,
    /// Sequential streams longer than this bypass the cache.
    pub seq_cutoff: u64,
    /// Reformat the cache file even if it holds another disk's cache.
    pub force_format: bool,
    /// Lock the cache file as an image (QEMU's lock bytes: one tier's alone); off with
    /// `locking=off`, for file systems without byte locks.
    pub locking: bool,
}

/// Why a tier could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error("cache of {0} bytes is too small for its metadata and 16 blocks")]
    CacheTooSmall(u64),
    #[error("not a Strata cache file (cache-format=force reformats it, destroying its contents)")]
    NotACache,
    #[error("cache metadata is damaged: {0}")]
    Damaged(&'static str),
    #[error(
        "cache was formatted by an older Strata (layout version {0}); cache-format=force \
         reformats it: a write-back cache must first be written back by the version that \
         made it (run it in write-through mode once)"
    )]
    OtherVersion(u32),
    #[error("cache device I/O failed: {0}")]
    CacheIo(#[source] io::Error),
    #[error(
        "cache belongs to another capacity device ({field}: cache has {cached}, this disk has \
         {actual}); cache-format=force reformats it"
    )]
    WrongOwner {
        field: &'static str,
        cached: String,
        actual: String,
    },
    #[error(
        "cache was formatted with {cached} (this spec asks for {asked}); cache-format=force \
         reformats it"
    )]
    WrongFormat { cached: String, asked: String },
    #[error("unknown cache policy {0:?}")]
    UnknownPolicy(String),
}
