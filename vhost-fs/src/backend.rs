//! The device's side of the vhost-user transport (`daemon_support::transport`, the only
//! code that talks to `vhost-user-backend`): what the frontend is told (features, the tag in
//! the config space) and the worker's events (completions, deferred replies).

use std::sync::atomic::Ordering;

use daemon_support::transport::{self, DeviceModel, GuestMemory, Transport, Vring};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;

use crate::device::FsDevice;
use crate::worker::QueueWorker;

/// The backend handed to `vhost-user-backend`.
pub type FsBackend = Transport<FsDevice, QueueWorker>;

/// A worker's own events, in the order of `Transport::device_event_id`.
pub const COMPLETIONS: u64 = 0;
pub const DEFERRED: u64 = 1;

impl DeviceModel for FsDevice {
    fn num_queues(&self) -> usize {
        FsDevice::num_queues(self)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        // Like virtiofsd: the config space (the tag) is ours only when --tag is given;
        // otherwise the frontend provides it.
        if self.tag.is_some() {
            f | VhostUserProtocolFeatures::CONFIG
        } else {
            f
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config_space()
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect()
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
            DEFERRED => self.deferred_ready(),
            _ => log::warn!("unknown worker event {n}"),
        }
    }

    fn drain(&mut self) {
        QueueWorker::drain(self);
    }
}
