//! The vhost-user transport both daemons run: the only module that talks to
//! `vhost-user-backend`. It maps protocol events onto a device ([`DeviceModel`]: features,
//! config space) and its queue workers ([`QueueWorker`]: one per queue and thread, each
//! behind its own mutex, which only its event loop and the control thread take): kicks,
//! the workers' own event fds (completions, deferred replies), memory updates, ring stops.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
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
    /// Completes everything in flight and leaves the ring as it is (a pause, after which
    /// it goes on); whether nothing is left in flight.
    fn quiesce(&mut self) -> bool {
        self.drain();
        true
    }
    /// The count [`Transport::paused`] raises to have a busy worker let go of its lock
    /// (workers that never look at it are simply waited for).
    fn share_pause(&mut self, _pausing: Arc<AtomicUsize>) {}
    /// Goes on after a pause: a worker that let go mid-work is woken to finish it.
    fn resume(&mut self) {}
}

/// The backend handed to `vhost-user-backend`: the device plus one worker per queue.
pub struct Transport<D, W> {
    device: Arc<D>,
    workers: Vec<Mutex<W>>,
    /// The channel on which we may ask the frontend for things (`BACKEND_REQ`), if the
    /// current frontend gave one.
    frontend_channel: Mutex<Option<Backend>>,
    /// How many [`Transport::paused`] callers are taking the workers' locks.
    pausing: Arc<AtomicUsize>,
}

/// What became of a config-change notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigNotice {
    /// The frontend acknowledged it (or took it, without REPLY_ACK).
    Delivered,
    /// No frontend, or one that gave no backend channel: nobody to tell.
    NoChannel,
    /// Sent, and not acknowledged within the wait; it may still be.
    Unanswered,
}

impl<D: DeviceModel, W: QueueWorker> Transport<D, W> {
    pub fn new(device: Arc<D>, mut workers: Vec<W>) -> Self {
        let pausing = Arc::new(AtomicUsize::new(0));
        for w in &mut workers {
            w.share_pause(pausing.clone());
        }
        Transport {
            device,
            workers: workers.into_iter().map(Mutex::new).collect(),
            frontend_channel: Mutex::new(None),
            pausing,
        }
    }

    /// Tells the frontend that the config space changed (`CONFIG_CHANGE_MSG`), so that it
    /// reads it again and interrupts the guest. Waits at most `wait` for its answer: the
    /// frontend is not trusted to give one, so the message goes out from a thread of its
    /// own, which a silent frontend holds until it disconnects.
    pub fn notify_config_change(&self, wait: Duration) -> io::Result<ConfigNotice> {
        let Some(channel) = self
            .frontend_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return Ok(ConfigNotice::NoChannel);
        };
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("config-change".into())
            .spawn(move || {
                let _ = tx.send(channel.handle_config_change());
            })?;
        match rx.recv_timeout(wait) {
            Ok(Ok(_)) => Ok(ConfigNotice::Delivered),
            Ok(Err(e)) => Err(e),
            Err(_) => Ok(ConfigNotice::Unanswered),
        }
    }

    /// Forgets the last frontend's channel (it disconnected).
    pub fn detach(&self) {
        *self
            .frontend_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
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

    /// Runs `f` with every queue stopped: each worker held (its thread waits for it) and
    /// what it had in flight answered. The guest's new requests wait in the rings
    /// meanwhile and are served after, so the guest sees a pause, not an error.
    /// Fails, without running `f`, when a queue cannot finish what it has in flight.
    /// `f` gets the workers, held and idle (to change what they run on).
    pub fn paused<T>(&self, f: impl FnOnce(&mut [MutexGuard<'_, W>]) -> T) -> io::Result<T> {
        // Busy workers let go of their locks at their next pass rather than when the guest
        // next stops (a worker serving a steady load would otherwise keep it for seconds).
        self.pausing.fetch_add(1, Ordering::Relaxed);
        let held: Vec<_> = (0..self.workers.len()).map(|i| self.worker(i)).collect();
        self.pausing.fetch_sub(1, Ordering::Relaxed);
        // Every worker goes on afterwards, however this ends (a panic in `f` included).
        let mut held = Resuming(held);
        for (i, w) in held.0.iter_mut().enumerate() {
            if !w.quiesce() {
                return Err(io::Error::other(format!(
                    "queue {i} could not finish its requests in flight"
                )));
            }
        }
        Ok(f(&mut held.0))
    }

    /// Completes everything in flight on every queue.
    pub fn drain_all(&self) {
        for i in 0..self.workers.len() {
            self.worker(i).drain();
        }
    }
}

/// Held workers that are told to go on ([`QueueWorker::resume`]) when let go.
struct Resuming<'a, W: QueueWorker>(Vec<MutexGuard<'a, W>>);

impl<W: QueueWorker> Drop for Resuming<'_, W> {
    fn drop(&mut self) {
        for w in self.0.iter_mut() {
            w.resume();
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

    fn set_backend_req_fd(&self, backend: Backend) {
        *self
            .frontend_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(backend);
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
