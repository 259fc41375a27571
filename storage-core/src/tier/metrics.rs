//! The tier's counters, for `/metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use crate::metrics::{Exposition, Kind};

/// Counters of one tier, for `/metrics`.
#[derive(Debug, Default)]
pub struct TierMetrics {
    pub read_hits: AtomicU64,
    pub read_misses: AtomicU64,
    pub write_hits: AtomicU64,
    pub write_misses: AtomicU64,
    pub promotions: AtomicU64,
    pub evictions: AtomicU64,
    pub bypassed: AtomicU64,
    pub writeback_blocks: AtomicU64,
    pub cache_errors: AtomicU64,
    pub capacity_errors: AtomicU64,
    /// Dirty blocks whose data could not be read back from a failed cache device.
    pub lost_blocks: AtomicU64,
    pub dirty_blocks: AtomicU64,
    pub resident_blocks: AtomicU64,
    pub slots: AtomicU64,
    pub failed: AtomicBool,
}

impl TierMetrics {
    /// Adds the tier's samples, labelled with `labels`.
    pub fn render(&self, out: &mut Exposition, labels: &[(&str, &str)]) {
        let c = |v: &AtomicU64| v.load(Relaxed);
        for (name, kind, help, value) in [
            (
                "cache_read_hits_total",
                Kind::Counter,
                "Cache blocks read from the cache device.",
                c(&self.read_hits),
            ),
            (
                "cache_read_misses_total",
                Kind::Counter,
                "Cache blocks read from the capacity device.",
                c(&self.read_misses),
            ),
            (
                "cache_write_hits_total",
                Kind::Counter,
                "Cache blocks written into resident slots.",
                c(&self.write_hits),
            ),
            (
                "cache_write_misses_total",
                Kind::Counter,
                "Cache blocks written that were not resident.",
                c(&self.write_misses),
            ),
            (
                "cache_promotions_total",
                Kind::Counter,
                "Blocks copied into the cache.",
                c(&self.promotions),
            ),
            (
                "cache_evictions_total",
                Kind::Counter,
                "Blocks evicted from the cache.",
                c(&self.evictions),
            ),
            (
                "cache_bypassed_total",
                Kind::Counter,
                "Requests that bypassed the cache (sequential, too dirty, failed).",
                c(&self.bypassed),
            ),
            (
                "cache_writeback_blocks_total",
                Kind::Counter,
                "Dirty blocks written back to the capacity device.",
                c(&self.writeback_blocks),
            ),
            (
                "cache_device_errors_total",
                Kind::Counter,
                "I/O errors on the cache device.",
                c(&self.cache_errors),
            ),
            (
                "capacity_device_errors_total",
                Kind::Counter,
                "I/O errors on the capacity device.",
                c(&self.capacity_errors),
            ),
            (
                "cache_lost_blocks_total",
                Kind::Counter,
                "Dirty blocks lost to cache device errors.",
                c(&self.lost_blocks),
            ),
            (
                "cache_dirty_blocks",
                Kind::Gauge,
                "Dirty blocks in the cache.",
                c(&self.dirty_blocks),
            ),
            (
                "cache_resident_blocks",
                Kind::Gauge,
                "Blocks in the cache (occupancy).",
                c(&self.resident_blocks),
            ),
            (
                "cache_slots",
                Kind::Gauge,
                "Blocks the cache can hold.",
                c(&self.slots),
            ),
            (
                "cache_failed",
                Kind::Gauge,
                "1 when the cache device is out of service.",
                u64::from(self.failed.load(Relaxed)),
            ),
        ] {
            out.sample(name, kind, help, labels, value);
        }
    }
}
