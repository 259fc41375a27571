//! What every queue of a tiered disk, its journal thread and its cleaner share: the two
//! devices, the slot state under its mutex, the counters, and the hand-off of completed
//! flushes back to the queues.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::device::{Capacity, Dev};
use super::queue::RING_ENTRIES;
use super::state::TierState;
use super::{CacheMode, Layout, TierMetrics};
use crate::engine::{AnyEngine, Completion, EngineKind};

/// Dirty share above which the cleaner runs, and above which new writes bypass the cache.
pub(super) const LOW_WATERMARK_PCT: usize = 10;
pub(super) const HIGH_WATERMARK_PCT: usize = 70;
/// Completion hand-off from the background thread to one queue.
pub(super) struct Link {
    pub(super) done: Mutex<Vec<Completion>>,
    pub(super) ready: AtomicUsize,
    pub(super) notify: RawFd,
}

impl Link {
    pub(super) fn complete(&self, c: Completion) {
        lock(&self.done).push(c);
        self.ready.fetch_add(1, Relaxed);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd the queue keeps open for as
        // long as this link exists.
        unsafe { libc::write(self.notify, (&one as *const u64).cast(), 8) };
    }
}

pub(super) struct BgQueue {
    pub(super) flushes: Vec<(Arc<Link>, u64)>,
    pub(super) shutdown: bool,
}

/// What every queue, the background thread and the cleaner share.
pub(super) struct Shared {
    pub(super) layout: Layout,
    pub(super) mode: CacheMode,
    pub(super) block: u64,
    pub(super) seq_cutoff: u64,
    pub(super) capacity: u64,
    pub(super) cache: Dev,
    pub(super) cap: Capacity,
    pub(super) state: Mutex<TierState>,
    pub(super) metrics: TierMetrics,
    pub(super) bg: Mutex<BgQueue>,
    pub(super) bg_cv: Condvar,
    pub(super) high_watermark: usize,
    pub(super) low_watermark: usize,
    /// The engine the factory chose for the cache file.
    pub(super) cache_engine: EngineKind,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, TierState> {
        lock(&self.state)
    }

    pub(super) fn update_gauges(&self, st: &TierState) {
        self.metrics.dirty_blocks.store(st.dirty as u64, Relaxed);
        self.metrics
            .resident_blocks
            .store(st.resident_count() as u64, Relaxed);
    }

    /// The cache device failed: stop admitting, say so once.
    pub(super) fn cache_failed(&self, st: &mut TierState, what: &str, errno: i32) {
        self.metrics.cache_errors.fetch_add(1, Relaxed);
        if !st.failed {
            st.failed = true;
            self.metrics.failed.store(true, Relaxed);
            log::error!(
                "cache device {} failed ({what}: {}); taking the cache out of service: dirty \
                 blocks are still served and written back where readable",
                self.cache_path_for_log(),
                io::Error::from_raw_os_error(errno)
            );
        }
    }

    pub(super) fn cache_path_for_log(&self) -> String {
        std::fs::read_link(format!("/proc/self/fd/{}", self.cache.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "cache".into())
    }

    pub(super) fn slot_offset(&self, slot: u32) -> u64 {
        self.layout.slot_offset(slot)
    }

    /// The cache file's engine for one queue, signalling `eventfd`.
    pub(super) fn cache_engine(&self, eventfd: RawFd) -> io::Result<AnyEngine> {
        #[cfg(test)]
        {
            use crate::engine::faulty::{Device, FaultyEngine};
            // Tests run on the synchronous engine with faults, whatever the factory chose.
            let _ = (eventfd, self.cache_engine);
            Ok(AnyEngine::Faulty(FaultyEngine::new(
                RING_ENTRIES,
                Device::Cache,
                self.cache.faults.clone(),
            )))
        }
        #[cfg(not(test))]
        crate::engine::new_engine_notifying(self.cache_engine, RING_ENTRIES, eventfd)
    }
}
