//! The device's side of the vhost-user transport (`daemon_support::transport`, the only
//! code that talks to `vhost-user-backend`): what the frontend is told (features, config
//! space, the write-cache byte it may set) and the worker's events.

use std::io;
use std::sync::atomic::Ordering;

use daemon_support::transport::{self, DeviceModel, GuestMemory, Transport, Vring};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::GuestMemoryAtomic;

use crate::device::BlkDevice;
use crate::virtio_blk::{CONFIG_WRITEBACK_OFFSET, VIRTIO_F_VERSION_1};
use crate::worker::QueueWorker;

/// The backend handed to `vhost-user-backend`.
pub type BlkBackend = Transport<BlkDevice, QueueWorker>;

/// A worker's own events, in the order of `Transport::device_event_id`.
pub const COMPLETIONS: u64 = 0;
/// The worker's own eventfd, raised when a pause ends ([`QueueWorker::kick_self`]).
pub const RESUMED: u64 = 1;

impl DeviceModel for BlkDevice {
    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        BlkDevice::features(self)
    }

    fn acked_features(&self, features: u64) {
        // Firmware (OVMF, SeaBIOS on a legacy-only device) drives QEMU's transitional device
        // through the legacy interface. Nothing changes for us on a little-endian host: the
        // frontend gives each ring part's address, the request parser takes any layout, and
        // virtio-queue reads little-endian rings either way.
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::info!("legacy virtio driver (no VERSION_1): features {features:#x}");
        }
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            // A channel to the frontend, to say the disk grew (CONFIG_CHANGE_MSG).
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size).unwrap_or_else(|| {
            log::warn!("frontend read config space out of bounds: offset {offset}, size {size}");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (CONFIG_WCE).
        if offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            self.writeback.store(writeback, Ordering::Relaxed);
            log::info!(
                "guest set the write cache to {}",
                if writeback {
                    "write-back"
                } else {
                    "write-through"
                }
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config space offset {offset} (+{}) is read-only", buf.len()),
        ))
    }
}

impl transport::QueueWorker for QueueWorker {
    fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        QueueWorker::attach(self, mem);
    }

    fn kick(&mut self, vring: &Vring) {
        QueueWorker::kick(self, vring);
    }

    fn device_event(&mut self, n: u64) {
        match n {
            COMPLETIONS => self.completions_ready(),
            RESUMED => self.resumed(),
            _ => log::warn!("unknown worker event {n}"),
        }
    }

    fn drain(&mut self) {
        QueueWorker::drain(self);
    }

    fn quiesce(&mut self) -> bool {
        QueueWorker::finish_in_flight(self)
    }

    fn share_pause(&mut self, pausing: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        daemon_support::serve::QueueService::core_mut(self).pause = pausing;
    }

    fn resume(&mut self) {
        QueueWorker::kick_self(self);
    }
}
