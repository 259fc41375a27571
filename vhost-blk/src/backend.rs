//! The vhost-user transport: the only module that talks to `vhost-user-backend`. It maps
//! protocol events onto the device and its queue workers: feature negotiation, config space,
//! memory updates, kicks, completion eventfds, ring stops.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::VhostUserBackend;
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::device::BlkDevice;
use crate::virtio_blk::{CONFIG_WRITEBACK_OFFSET, VIRTIO_F_VERSION_1};
use crate::worker::{GuestMemory, QueueWorker, Vring};

/// The backend handed to `vhost-user-backend`: the device plus one worker per queue.
pub struct BlkBackend {
    device: Arc<BlkDevice>,
    workers: Vec<Mutex<QueueWorker>>,
}

impl BlkBackend {
    pub fn new(device: Arc<BlkDevice>, workers: Vec<QueueWorker>) -> Self {
        BlkBackend {
            device,
            workers: workers.into_iter().map(Mutex::new).collect(),
        }
    }

    /// The event id of worker completions in each worker's event loop: ids up to
    /// `num_queues` are the library's own (kicks, exit).
    pub fn completion_event_id(&self) -> u64 {
        u64::from(self.device.num_queues) + 1
    }

    pub fn worker(&self, index: usize) -> MutexGuard<'_, QueueWorker> {
        // A worker that panicked is a bug; keep serving the other queues with its state.
        self.workers[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn num_workers(&self) -> usize {
        self.workers.len()
    }

    /// Binds every worker to a new connection's guest memory.
    pub fn attach(&self, mem: &GuestMemoryAtomic<GuestMemory>) {
        for i in 0..self.workers.len() {
            self.worker(i).attach(mem.clone());
        }
    }

    /// Completes everything in flight on every queue.
    pub fn drain_all(&self) {
        for i in 0..self.workers.len() {
            self.worker(i).drain();
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        // Firmware (OVMF, SeaBIOS on a legacy-only device) drives QEMU's transitional device
        // through the legacy interface. Nothing changes for us on a little-endian host: the
        // frontend gives each ring part's address, the request parser takes any layout, and
        // virtio-queue reads little-endian rings either way.
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::info!("legacy virtio driver (no VERSION_1): features {features:#x}");
        }
        self.device
            .acked_features
            .store(features, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn reset_device(&self) {
        self.drain_all();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings themselves track EVENT_IDX; the workers' notify logic asks them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.config().read(offset, size).unwrap_or_else(|| {
            log::warn!("frontend read config space out of bounds: offset {offset}, size {size}");
            Vec::new()
        })
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the writeback byte is writable (CONFIG_WCE).
        if offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1 {
            let writeback = buf[0] != 0;
            self.device.writeback.store(writeback, Ordering::Relaxed);
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

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        // Workers hold the same GuestMemoryAtomic (given at attach), which the library
        // updates in place; they load the new map on their next pass.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend reads next_avail after this; answer everything
        // accepted so far first.
        if let Some(worker) = self.workers.get(queue_index as usize) {
            worker
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .drain();
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
        if u64::from(device_event) == self.completion_event_id() {
            worker.completions_ready();
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
