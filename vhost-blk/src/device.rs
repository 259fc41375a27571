//! The block device's shared state: what the disk is, what the frontend negotiated, and the
//! per-queue metrics. Owned by the daemon, read by the API, used by every queue worker
//! (read-mostly atomics; nothing here is locked on the data path).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use storage_core::disk::{AnyDisk, Disk, DiskInfo, DiskSpec};
use storage_core::metrics::QueueMetrics;
use storage_core::throttle::ThrottleGroup;
use storage_core::units::SECTOR_SIZE;

use crate::virtio_blk::{self, BlkConfig};

/// Requests a worker starts before it submits them, reaps what completed and signals the
/// guest. Smaller batches let the driver's wake-up overlap our work; larger ones save system
/// calls and wake-ups. Where waking a sleeping CPU costs 16-18 µs (this kind of host since
/// late 2026), a batch must leave enough requests for the worker to go on with while the
/// driver wakes, refills and publishes: at depth 32 about a third of them. blk-compare
/// randread QD32 (page-cached, 5 rounds, ours/qemu-storage-daemon): 10 -> 1.83x, 12 -> 2.00x,
/// 14 -> 1.76x, 16 -> 1.70x; 24 -> 1.28x and 32 -> 1.02x, where the worker idles while the
/// driver wakes. (On the earlier host, with cheap wake-ups: 8 -> 2.06x, 16 -> 2.43x,
/// 24 -> 2.61x.)
pub const SUBMIT_BATCH: usize = 12;

/// The batch while others want the worker's CPU ([`daemon_support::polling::PollWindow::shared`]):
/// then every wake-up of ours or the driver's waits for a busy thread's time slice, so fewer,
/// larger batches win. blk-compare `--busy 2` randread QD32, ours in IOPS (median of 5 rounds,
/// two runs each): batch 12 -> 179K and 194K, 16 -> 174K and 219K, 32 -> 225K and 226K.
pub const SUBMIT_BATCH_SHARED: usize = 32;

pub struct BlkDevice {
    /// The disk's name in the API and metrics.
    pub id: String,
    pub spec: DiskSpec,
    pub disk: AnyDisk,
    serial: Vec<u8>,
    pub num_queues: u16,
    pub queue_size: u16,
    pub queue_depth: u32,
    /// The guest's write cache setting (CONFIG_WCE); write-through adds a flush per write.
    pub writeback: AtomicBool,
    /// Virtio features the current frontend acknowledged.
    pub acked_features: AtomicU64,
    pub connected: AtomicBool,
    pub connections: AtomicU64,
    /// Set on shutdown: workers stop taking new requests.
    pub stopping: AtomicBool,
    /// How long a worker keeps polling an idle queue before sleeping (zero: never polls).
    pub poll: Duration,
    queues: Vec<Arc<QueueMetrics>>,
    /// The throttle node put at the root while serving, for a disk opened without one
    /// (limits set through the API); the workers' queues run under it.
    added_throttle: OnceLock<Arc<ThrottleGroup>>,
}

impl BlkDevice {
    pub fn new(
        id: String,
        spec: DiskSpec,
        disk: AnyDisk,
        num_queues: u16,
        queue_size: u16,
        queue_depth: u32,
        poll: Duration,
    ) -> Self {
        let serial = spec.serial_or_default().into_bytes();
        BlkDevice {
            id,
            spec,
            disk,
            serial,
            num_queues,
            queue_size,
            queue_depth,
            writeback: AtomicBool::new(true),
            acked_features: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            poll,
            queues: (0..num_queues)
                .map(|_| Arc::new(QueueMetrics::default()))
                .collect(),
            added_throttle: OnceLock::new(),
        }
    }

    /// The first throttle node's group from the root down, the one added while serving
    /// included.
    pub fn throttle_group(&self) -> Option<&Arc<ThrottleGroup>> {
        self.added_throttle
            .get()
            .or_else(|| self.disk.throttle_group())
    }

    /// The graph from the root down, as text (the throttle node added while serving
    /// included).
    pub fn describe(&self) -> String {
        match self.added_throttle.get() {
            Some(_) => format!("throttle({})", self.disk.describe()),
            None => self.disk.describe(),
        }
    }

    /// The throttle node at the root (the one the disk's `limits` make, or added while
    /// serving); a throttle deeper in the graph (under a tier) is not the disk's own.
    pub fn root_throttle(&self) -> Option<&Arc<ThrottleGroup>> {
        self.added_throttle.get().or(match &self.disk {
            AnyDisk::Throttle(t) => Some(t.group()),
            _ => None,
        })
    }

    /// Records the throttle node added at the root; false if there already is one.
    pub fn set_added_throttle(&self, group: Arc<ThrottleGroup>) -> bool {
        self.added_throttle.set(group).is_ok()
    }

    pub fn info(&self) -> &DiskInfo {
        self.disk.info()
    }

    /// Disk size in bytes.
    #[inline]
    pub fn capacity(&self) -> u64 {
        self.disk.info().capacity.get()
    }

    pub fn serial(&self) -> &[u8] {
        &self.serial
    }

    pub fn queue_metrics(&self, index: usize) -> Arc<QueueMetrics> {
        self.queues[index].clone()
    }

    pub fn all_queue_metrics(&self) -> &[Arc<QueueMetrics>] {
        &self.queues
    }

    /// Most data segments per request we accept from a driver.
    pub fn seg_max(&self) -> u32 {
        // Header and status take two descriptors of the chain.
        (u32::from(self.queue_size).min(crate::request::MAX_SEGMENTS as u32)).saturating_sub(2)
    }

    /// The configuration space as it stands.
    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity_sectors: self.capacity() / SECTOR_SIZE,
            seg_max: self.seg_max(),
            blk_size: self.disk.block_size(),
            num_queues: self.num_queues,
            writeback: self.writeback.load(Ordering::Relaxed),
        }
    }

    /// The virtio-blk and ring features this device offers.
    pub fn features(&self) -> u64 {
        use virtio_blk::*;
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.info().read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }
}
