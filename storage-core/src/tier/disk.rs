//! Opening a tiered disk (formatting or recovering its cache device, checking that the
//! cache belongs to this capacity device) and its control-plane handle.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::layout::{Owner, SlotState};
use super::queue::TieredQueue;
use super::shared::{lock, BgQueue, Shared, HIGH_WATERMARK_PCT, LOW_WATERMARK_PCT};
use super::state::TierState;
use super::{
    background, device, journal, layout, CacheMode, Layout, TierError, TierMetrics, TierSpec,
};
use crate::disk::{AnyDisk, Disk, DiskInfo};
use crate::engine::EngineKind;
use crate::error::{StorageError, StorageErrorKind};

/// A capacity device with a cache device in front.
pub struct TieredDisk {
    pub(super) shared: Arc<Shared>,
    info: DiskInfo,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub(super) fn storage_err(
    kind: StorageErrorKind,
    path: &Path,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::new(kind, e.to_string()).with_path(path)
}

impl TieredDisk {
    /// Opens a tiered disk: a cache file (`spec.cache`, on `cache_engine`) in front of the
    /// `capacity` node, which the factory opened with the engine chosen for its leaves.
    pub fn open(
        capacity_node: AnyDisk,
        read_only: bool,
        cache_engine: EngineKind,
        spec: &TierSpec,
    ) -> Result<TieredDisk, StorageError> {
        let open_err = |p: &Path, what: &str, e: io::Error| {
            StorageError::new(StorageErrorKind::Open, what)
                .with_path(p)
                .with_source(e)
        };
        let cap_info = capacity_node.info().clone();
        let path = Path::new(&cap_info.path);
        let capacity = cap_info.capacity.get() & !511;
        if capacity == 0 {
            return Err(storage_err(
                StorageErrorKind::InvalidImage,
                path,
                "capacity device is empty",
            ));
        }
        let owner = Owner {
            size: capacity,
            dev: cap_info.identity.0,
            ino: cap_info.identity.1,
            path: cap_info.path.clone(),
        };
        let created = !spec.cache.exists();
        let cache = crate::disk::open_noatime(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            libc::O_CLOEXEC,
            &spec.cache,
        )
        .map_err(|e| open_err(&spec.cache, "cannot open cache device", e))?;
        let cache_meta = cache
            .metadata()
            .map_err(|e| open_err(&spec.cache, "cannot stat cache device", e))?;
        {
            use std::os::unix::fs::MetadataExt;
            if (cache_meta.dev(), cache_meta.ino()) == cap_info.identity {
                return Err(storage_err(
                    StorageErrorKind::InvalidSpec,
                    &spec.cache,
                    "the cache file is the capacity device itself",
                ));
            }
        }
        // A cache device is one tier's: nothing else may write it, before we size or
        // format it either.
        let cache_lock = crate::disk::lock::ImageLock::take(
            &cache,
            &spec.cache,
            false,
            crate::disk::lock::Locking::on_if(spec.locking),
        )?;
        // An empty file holds nothing to lose: it is new (one an admission check created).
        let created = created || (cache_meta.is_file() && cache_meta.len() == 0);
        if created || (cache_meta.is_file() && cache_meta.len() < spec.cache_size) {
            cache
                .set_len(spec.cache_size)
                .map_err(|e| open_err(&spec.cache, "cannot size cache file", e))?;
        }
        let wanted = Layout::for_size(spec.cache_size, spec.block_size)
            .map_err(|e| storage_err(StorageErrorKind::InvalidSpec, &spec.cache, e))?;
        let tier_err = |e: TierError| storage_err(StorageErrorKind::InvalidImage, &spec.cache, e);
        let (journal, states) = if created || spec.force_format {
            log::info!(
                "formatting cache {} ({} blocks of {} bytes)",
                spec.cache.display(),
                wanted.slots,
                wanted.block_size
            );
            let j = journal::Journal::format(&cache, wanted, owner.clone())
                .map_err(|e| tier_err(TierError::CacheIo(e)))?;
            (j, vec![SlotState::Free; wanted.slots as usize])
        } else {
            let cache_size = cache
                .metadata()
                .and_then(|m| crate::disk::device_size(&cache, &m))
                .map_err(|e| open_err(&spec.cache, "cannot stat cache device", e))?;
            match journal::Journal::recover(&cache, cache_size) {
                Ok((j, states, replayed)) => {
                    check_owner(&j.owner, &owner).map_err(tier_err)?;
                    check_blocks(&states, capacity, j.layout.block_size).map_err(tier_err)?;
                    if j.layout != wanted {
                        return Err(tier_err(TierError::WrongFormat {
                            cached: format!(
                                "{}-byte blocks, {} slots",
                                j.layout.block_size, j.layout.slots
                            ),
                            asked: format!(
                                "{}-byte blocks, {} slots",
                                wanted.block_size, wanted.slots
                            ),
                        }));
                    }
                    log::info!(
                        "cache {}: recovered {} slots, {} journal blocks replayed",
                        spec.cache.display(),
                        states.iter().filter(|s| **s != SlotState::Free).count(),
                        replayed
                    );
                    (j, states)
                }
                Err(TierError::NotACache) if is_blank(&cache) => {
                    let j = journal::Journal::format(&cache, wanted, owner.clone())
                        .map_err(|e| tier_err(TierError::CacheIo(e)))?;
                    (j, vec![SlotState::Free; wanted.slots as usize])
                }
                Err(e) => return Err(tier_err(e)),
            }
        };
        let slots = wanted.slots as usize;
        // Keep some slots out of the policy's reach: evicted slots become reusable only after
        // their eviction is durable, and admissions take from this reserve meanwhile.
        let reserve = (slots / 32).clamp(8, 4096).min(slots / 2);
        let policy_name = spec
            .policy
            .as_deref()
            .unwrap_or(crate::cache::DEFAULT_POLICY);
        let policy = crate::cache::by_name(policy_name, slots - reserve).ok_or_else(|| {
            storage_err(
                StorageErrorKind::InvalidSpec,
                &spec.cache,
                TierError::UnknownPolicy(policy_name.to_string()),
            )
        })?;
        let state = TierState::new(&states, policy).map_err(|e| {
            storage_err(
                StorageErrorKind::Io,
                &spec.cache,
                format!("cannot allocate the cache tables: {e}"),
            )
        })?;
        #[cfg(not(test))]
        let cache = device::Dev::new(cache, cache_lock);
        #[cfg(test)]
        let (cache, capacity_node) = {
            // The cache file and a raw capacity child share one set of faults.
            let faults = Arc::<crate::engine::faulty::Faults>::default();
            let mut capacity_node = capacity_node;
            if let AnyDisk::Raw(raw) = &mut capacity_node {
                raw.set_faults(faults.clone());
            }
            let cache = device::Dev::new(
                cache,
                cache_lock,
                crate::engine::faulty::Device::Cache,
                faults,
            );
            (cache, capacity_node)
        };
        let cap = device::Capacity::new(capacity_node);
        let shared = Arc::new(Shared {
            layout: wanted,
            mode: spec.mode,
            block: spec.block_size,
            seq_cutoff: spec.seq_cutoff,
            capacity,
            cache,
            cap,
            metrics: TierMetrics::default(),
            bg: Mutex::new(BgQueue {
                flushes: Vec::new(),
                shutdown: false,
            }),
            bg_cv: Condvar::new(),
            high_watermark: slots * HIGH_WATERMARK_PCT / 100,
            low_watermark: slots * LOW_WATERMARK_PCT / 100,
            cache_engine,
            state: Mutex::new(state),
        });
        shared.metrics.slots.store(slots as u64, Relaxed);
        shared.update_gauges(&shared.state());
        if spec.mode != CacheMode::WriteBack && !read_only {
            // Dirty blocks from an earlier write-back run: write them all back before serving,
            // so that write-through and write-around only ever see clean blocks.
            let dirty = shared.state().dirty;
            if dirty > 0 {
                log::info!("writing back {dirty} dirty blocks left by write-back mode");
                while shared.state().dirty > 0 {
                    if background::clean_batch(&shared, usize::MAX) == 0 {
                        return Err(storage_err(
                            StorageErrorKind::Io,
                            path,
                            "cannot write back dirty cache blocks",
                        ));
                    }
                }
            }
        }
        let threads = background::spawn(shared.clone(), journal)
            .map_err(|e| open_err(&spec.cache, "cannot start the tier's threads", e))?;
        Ok(TieredDisk {
            info: DiskInfo {
                capacity: crate::disk::Size::new(capacity),
                read_only,
                direct: cap_info.direct,
                format: "tiered",
                path: cap_info.path.clone(),
                engine: cap_info.engine,
                discard: !read_only,
                identity: cap_info.identity,
            },
            shared,
            threads: Mutex::new(threads),
        })
    }

    pub fn metrics(&self) -> &TierMetrics {
        &self.shared.metrics
    }

    pub fn mode(&self) -> CacheMode {
        self.shared.mode
    }

    pub fn layout(&self) -> Layout {
        self.shared.layout
    }

    /// The cache file's (device, inode).
    pub fn cache_identity(&self) -> io::Result<(u64, u64)> {
        self.shared.cache.identity()
    }

    /// The capacity child.
    pub fn capacity(&self) -> &AnyDisk {
        self.shared.cap.node()
    }
}

pub(super) fn check_owner(cached: &Owner, actual: &Owner) -> Result<(), TierError> {
    let wrong = |field, c: String, a: String| TierError::WrongOwner {
        field,
        cached: c,
        actual: a,
    };
    if cached.size != actual.size {
        return Err(wrong(
            "size",
            cached.size.to_string(),
            actual.size.to_string(),
        ));
    }
    if (cached.dev, cached.ino) != (actual.dev, actual.ino) {
        return Err(wrong("file", cached.path.clone(), actual.path.clone()));
    }
    Ok(())
}

/// A recovered slot table may map only blocks of the capacity device.
pub(super) fn check_blocks(
    states: &[SlotState],
    capacity: u64,
    block: u64,
) -> Result<(), TierError> {
    let blocks = capacity.div_ceil(block);
    let outside =
        |s: &SlotState| matches!(*s, SlotState::Clean(b) | SlotState::Dirty(b) if b >= blocks);
    if states.iter().any(outside) {
        return Err(TierError::Damaged(
            "a cache slot maps a block beyond the end of the capacity device",
        ));
    }
    Ok(())
}

/// Whether the first metadata pages are all zero (a new, sparse or zeroed cache file).
pub(super) fn is_blank(file: &File) -> bool {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 2 * layout::PAGE as usize];
    file.read_exact_at(&mut b, 0).is_ok() && b.iter().all(|&x| x == 0)
}

impl TieredDisk {
    /// Stops the journal and write-back threads (once; later calls find none).
    fn stop_threads(&self) {
        lock(&self.shared.bg).shutdown = true;
        self.shared.bg_cv.notify_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for TieredDisk {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl Disk for TieredDisk {
    type Queue = TieredQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<TieredQueue, StorageError> {
        TieredQueue::new(self.shared.clone(), depth).map_err(|e| {
            StorageError::new(StorageErrorKind::Engine, "cannot create tier queue").with_source(e)
        })
    }

    fn flush(&self) -> io::Result<()> {
        background::flush_now(&self.shared)
    }

    fn close(&self) {
        // The background threads write to the capacity child: stop them first.
        self.stop_threads();
        self.shared.cap.node().close();
        // The cache's lock goes now, not when the kernel tears down the rings that hold
        // its file (after the process is gone, even).
        if let Err(e) = self.shared.cache.unlock() {
            log::warn!("{}: releasing the cache's lock: {e}", self.info.path);
        }
    }
}
