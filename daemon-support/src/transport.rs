//! The vhost-user transport both daemons run: the only module that talks to
//! `vhost-user-backend`. It maps protocol events onto a device ([`DeviceModel`]: features,
//! config space) and its queue workers ([`QueueWorker`]: one per queue and thread, each
//! behind its own mutex, which only its event loop and the control thread take): kicks,
//! the workers' own event fds (completions, deferred replies), memory updates, ring stops.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringMutex};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub type GuestMemory = GuestMemoryMmap<()>;
pub type Vring = VringMutex<GuestMemoryAtomic<GuestMemory>>;

/// What a device tells the frontend.
pub trait DeviceModel: Send + Sync {
    /// Request queues (each with its own worker and thread).
    fn num_queues(&self) -> usize;
    fn max_queue_size(&self) -> usize;
    /// Virtio features offered (the transport adds PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    fn acked_features(&self, features: u64);
    fn protocol_features(&self) -> VhostUserProtocolFeatures;
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8>;
    /// A frontend write to the config space; read-only unless a device says otherwise.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config space offset {offset} (+{}) is read-only", buf.len()),
        ))
    }
}

/// One queue's worker, driven by its thread's event loop.
pub trait QueueWorker: Send {
    /// Binds the worker to a new connection's guest memory.
    fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>);
    /// The guest kicked `vring`.
    fn kick(&mut self, vring: &Vring);
    /// The worker's own event `n` (0, 1, ...: the order of [`Transport::device_event_id`])
    /// is readable.
    fn device_event(&mut self, n: u64);
    /// Completes everything in flight (a ring stop, a reset, shutdown).
    fn drain(&mut self);
}

/// The backend handed to `vhost-user-backend`: the device plus one worker per queue.
pub struct Transport<D, W> {
    device: Arc<D>,
    workers: Vec<Mutex<W>>,
}

impl<D: DeviceModel, W: QueueWorker> Transport<D, W> {
    pub fn new(device: Arc<D>, workers: Vec<W>) -> Self {
        Transport {
            device,
            workers: workers.into_iter().map(Mutex::new).collect(),
        }
    }

    /// The id under which a worker's own event `n` is registered in its thread's event
    /// loop: the ids up to `num_queues` are the library's (kicks, then exit).
    pub fn device_event_id(&self, n: u64) -> u64 {
        self.device.num_queues() as u64 + 1 + n
    }

    pub fn worker(&self, index: usize) -> MutexGuard<'_, W> {
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

impl<D: DeviceModel, W: QueueWorker> VhostUserBackend for Transport<D, W> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.device.max_queue_size()
    }

    fn features(&self) -> u64 {
        self.device.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.device.acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.device.protocol_features()
    }

    fn reset_device(&self) {
        self.drain_all();
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The vrings themselves track EVENT_IDX; the workers' notify logic asks them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.get_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.set_config(offset, buf)
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
        let event = u64::from(device_event);
        let first_own = self.device_event_id(0);
        if event >= first_own {
            worker.device_event(event - first_own);
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
