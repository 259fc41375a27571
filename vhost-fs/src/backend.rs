//! The vhost-user transport: the only module that talks to `vhost-user-backend`. It maps
//! protocol events onto the device and its queue workers: features, config space, memory,
//! kicks, completion and deferred-reply eventfds, ring stops.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::FsDevice;
use crate::worker::{GuestMemory, QueueWorker, Vring};

pub struct FsBackend {
    device: Arc<FsDevice>,
    workers: Vec<Mutex<QueueWorker>>,
}

impl FsBackend {
    pub fn new(device: Arc<FsDevice>, workers: Vec<QueueWorker>) -> Self {
        FsBackend {
            device,
            workers: workers.into_iter().map(Mutex::new).collect(),
        }
    }

    /// Event ids after the library's own (one per queue, then its exit event).
    pub fn completion_event_id(&self) -> u64 {
        self.device.num_queues() as u64 + 1
    }

    pub fn deferred_event_id(&self) -> u64 {
        self.device.num_queues() as u64 + 2
    }

    pub fn worker(&self, index: usize) -> MutexGuard<'_, QueueWorker> {
        self.workers[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach(&self, mem: &GuestMemoryAtomic<GuestMemory>) {
        for i in 0..self.workers.len() {
            self.worker(i).attach(mem.clone());
        }
    }

    pub fn drain_all(&self) {
        for i in 0..self.workers.len() {
            self.worker(i).drain();
        }
    }
}

impl VhostUserBackend for FsBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device
            .acked_features
            .store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        let f = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS;
        // Like virtiofsd: the config space (the tag) is ours only when --tag is given;
        // otherwise the frontend provides it.
        if self.device.tag.is_some() {
            f | VhostUserProtocolFeatures::CONFIG
        } else {
            f
        }
    }

    fn reset_device(&self) {
        self.drain_all();
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.device.config_space();
        config
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect()
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // Workers hold the same GuestMemoryAtomic, which the library updates in place.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(worker) = self.workers.get(queue_index as usize) {
            worker.lock().unwrap_or_else(|p| p.into_inner()).drain();
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let mut worker = self.worker(thread_id);
        let event = u64::from(device_event);
        if event == self.completion_event_id() {
            worker.completions_ready();
            return Ok(());
        }
        if event == self.deferred_event_id() {
            worker.deferred_ready();
            return Ok(());
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => {
                worker.kick(vring);
                Ok(())
            }
            None => Err(io::Error::other(format!("unknown event {device_event}"))),
        }
    }
}
