//! The loop both daemons' queue workers run: serve a virtqueue until it is idle, watch it
//! a while longer (adaptive polling, [`crate::polling`]), then sleep on kicks and completion
//! fds. A daemon supplies its request handling as a [`QueueService`]: what a pass reaps,
//! pulls and submits; the loop owns the order of a pass, notification suppression, when to
//! poll and when to sleep, and the used-ring helpers both need.

use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringState, VringT};
use virtio_queue::QueueT;
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, VolatileMemory,
};

use crate::polling::PollWindow;
use crate::ring;
use crate::transport::{GuestMemory, Vring};

/// A virtqueue's state, as the loop hands it to the service.
pub type State = VringState<GuestMemoryAtomic<GuestMemory>>;

/// Looks at the avail index per idle watch (about 1 µs here; up to 3 µs on CPUs with a slow
/// PAUSE) before the next full look, which also checks the shutdown flag and the clock.
const WATCH_LOOKS: u32 = 64;

/// What every queue worker keeps about its virtqueue, whatever its device.
pub struct QueueCore {
    /// The queue's index, for log lines.
    pub index: usize,
    /// The guest memory of the current connection (nothing is served before there is one).
    pub mem: Option<GuestMemoryAtomic<GuestMemory>>,
    /// The ring, once kicked: completions arrive on the worker's own fds and need it.
    pub vring: Option<Vring>,
    /// Every slot was busy at the last pull: completions bring the worker back, not kicks.
    pub throttled: bool,
    /// Broken once the driver's avail index proves corrupt ([`crate::ring`]).
    pub health: ring::Health,
    /// How long to watch an idle queue before sleeping (adaptive, up to `--poll-us`).
    pub poll: PollWindow,
    /// Set while the control plane waits for this worker (to stop the queues): a busy
    /// worker leaves its loop at once, rather than when the guest pauses, and is kicked
    /// back to work afterwards ([`crate::transport::Transport::paused`]).
    /// How many are waiting (more than one caller may pause at once).
    pub pause: Arc<AtomicUsize>,
}

impl QueueCore {
    pub fn new(index: usize, max_poll: Duration) -> QueueCore {
        QueueCore {
            index,
            mem: None,
            vring: None,
            throttled: false,
            health: ring::Health::default(),
            poll: PollWindow::new(max_poll),
            pause: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Binds the queue to a new connection's guest memory; forgets the old ring.
    pub fn attach(&mut self, mem: GuestMemoryAtomic<GuestMemory>) {
        self.mem = Some(mem);
        self.vring = None;
        self.throttled = false;
        self.health.reset();
    }

    /// Remembers the ring a kick came from.
    pub fn kicked(&mut self, vring: &Vring) {
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
    }
}

/// One queue's request handling, driven by [`serve`].
pub trait QueueService {
    fn core(&self) -> &QueueCore;
    fn core_mut(&mut self) -> &mut QueueCore;
    /// Answers finished requests; returns how many chains went to the used ring.
    fn reap(&mut self, state: &mut State) -> usize;
    /// Takes new chains while there is room, starting their requests; adds the chains
    /// answered at once to `used`. Returns how many chains were taken.
    fn pull(&mut self, state: &mut State, used: &mut usize) -> usize;
    /// Submits what `pull` started, in one batch.
    fn submit(&mut self);
    /// After a pass's notification: bookkeeping that would otherwise delay it (metrics).
    fn after_pass(&mut self) {}
    /// Requests started and not yet answered.
    fn in_flight(&self) -> usize;
    /// Of those, requests held back on purpose (over a throttle's limit): a timer brings
    /// the worker back, so polling for them would only spin.
    fn held(&self) -> usize {
        0
    }
    /// The daemon is shutting down: no new requests are taken.
    fn stopping(&self) -> bool;
    /// The worker goes back to sleep (the in-flight gauge is set here).
    fn sleeping(&mut self) {}
}

/// Serves `vring` after a wake-up (a kick, a completion), and tells the polling window how
/// long the worker slept and worked.
pub fn serve<S: QueueService>(svc: &mut S, vring: &Vring) {
    svc.core_mut().poll.woke(Instant::now());
    if run(svc, vring) == Left::ForPause {
        // Not asleep: stopped. The pause is no idle time for the polling window.
        return;
    }
    svc.core_mut().poll.sleeping(Instant::now());
}

/// Why [`run`] returned.
#[derive(PartialEq, Eq)]
enum Left {
    /// The queue is idle (or cannot be served).
    Idle,
    /// The control plane waits to stop the queues.
    ForPause,
}

/// Serves the queue until it is idle: reap completions, pull new requests while slots are
/// free, submit them in one batch, reap what completed inline, notify the guest.
///
/// With polling on, an idle queue is watched for a while more (the avail ring and the
/// completion queue are plain memory reads) before the worker goes back to sleep on its
/// eventfds; the guest need not kick meanwhile, because notifications stay suppressed.
/// Any activity restarts the window, so an idle queue costs no CPU. The window adapts
/// ([`crate::polling`]): it shrinks when polling would not have caught the next request,
/// and closes while others wait for this CPU.
fn run<S: QueueService>(svc: &mut S, vring: &Vring) -> Left {
    if svc.core().mem.as_ref().is_none() {
        return Left::Idle;
    }
    let mut state = vring.get_mut();
    // A stopped ring (GET_VRING_BASE drained it first) is left alone until it is started
    // again: a completion or kick that arrives in between must neither take requests nor,
    // seeing work it cannot pop, loop on re-enabling kicks.
    if !state.get_queue().ready() {
        return Left::Idle;
    }
    let _ = state.disable_notification();
    loop {
        let mut idle_since: Option<Instant> = None;
        loop {
            let stopping = svc.stopping();
            let mut used = svc.reap(&mut state);
            let mut progress = used;
            if !stopping {
                progress += svc.pull(&mut state, &mut used);
            }
            svc.submit();
            let inline = svc.reap(&mut state);
            used += inline;
            progress += inline;
            if used > 0 {
                notify(&mut state, svc.core().index);
            }
            svc.after_pass();
            if progress > 0 {
                if svc.core().pause.load(Ordering::Relaxed) > 0 {
                    // The control plane waits for this worker's lock; it wakes the worker
                    // when it is done, and the work left goes on from there.
                    return Left::ForPause;
                }
                idle_since = None;
                svc.core_mut().poll.busy();
                continue;
            }
            // A throttle holding requests back brings us back with its timer: polling
            // meanwhile would spin for requests that cannot go yet.
            if svc.core_mut().poll.current().is_zero()
                || stopping
                || svc.core().health.is_broken()
                || svc.held() > 0
            {
                break;
            }
            // An idle look waits for a watch of the avail index or a yield (a microsecond
            // or more), so reading the clock on each costs little.
            let now = Instant::now();
            svc.core_mut().poll.look(now);
            let window = svc.core_mut().poll.current();
            if window.is_zero() || now.duration_since(*idle_since.get_or_insert(now)) >= window {
                break;
            }
            let avail = {
                let queue = state.get_queue();
                (GuestAddress(queue.avail_ring()), queue.next_avail())
            };
            // Let the frontend thread at the vring between looks.
            drop(state);
            if svc.in_flight() > 0 {
                // Requests are out with the kernel (buffered writes on most filesystems
                // run on io_uring's worker threads) or a thread pool, whose threads may
                // share this CPU. Spinning would take the CPU from the very thread we wait
                // for (randwrite QD32 with both on one CPU: the worker spent half of it
                // polling).
                std::thread::yield_now();
            } else if let Some(mem) = svc.core().mem.as_ref() {
                watch_avail(mem, avail.0, avail.1);
            }
            state = vring.get_mut();
        }
        svc.sleeping();
        // Throttled: completions (their eventfd) bring us back, not kicks. Broken: the ring
        // stays stopped until the frontend resets it; re-enabling kicks would only report
        // the bad index again.
        if svc.core().throttled || svc.core().health.is_broken() || svc.stopping() {
            return Left::Idle;
        }
        // Re-enable kicks, then look once more: a request that arrived in between would
        // otherwise wait for the next kick (EVENT_IDX reports it here).
        match state.enable_notification() {
            Ok(true) => {
                let _ = state.disable_notification();
                continue;
            }
            _ => return Left::Idle,
        }
    }
}

/// Watches the avail index of an idle queue for a short while, returning as soon as the
/// driver publishes a chain past `next_avail` (or after `WATCH_LOOKS` looks).
///
/// A full look (reap, pull, submit, the vring lock) takes about 130 ns; this one is a
/// single load, so a request is seen sooner. At depth 1 that matters beyond its size: a
/// completion that lands before the client's CPU has halted saves the ~3 µs it takes to
/// wake it, and 0.12 µs more daemon time turned most such completions into late ones
/// (blk-compare randread-4k-qd1 deciles).
fn watch_avail(atomic: &GuestMemoryAtomic<GuestMemory>, avail_ring: GuestAddress, next: u16) {
    let mem = atomic.memory();
    // The index is the ring's second u16. An address the guest made up (unmapped,
    // misaligned) fails here, and the full looks deal with it.
    let slice = avail_ring
        .checked_add(2)
        .and_then(|a| mem.get_slice(a, 2).ok());
    let Some(idx) = slice
        .as_ref()
        .and_then(|s| s.get_atomic_ref::<AtomicU16>(0).ok())
    else {
        std::hint::spin_loop();
        return;
    };
    for _ in 0..WATCH_LOOKS {
        if u16::from_le(idx.load(Ordering::Acquire)) != next {
            return;
        }
        std::hint::spin_loop();
    }
}

/// Signals the guest that used buffers are ready, unless event suppression says it need
/// not be told.
#[inline]
pub fn notify(state: &mut State, index: usize) {
    match state.needs_notification() {
        Ok(true) | Err(_) => {
            if let Err(e) = state.signal_used_queue() {
                log::warn!("queue {index}: cannot signal the guest: {e}");
            }
        }
        Ok(false) => {}
    }
}

/// Returns chain `head` to the guest with `len` bytes written into it.
#[inline]
pub fn add_used(state: &mut State, head: u16, len: u32) {
    if let Err(e) = state.add_used(head, len) {
        log::warn!("cannot add chain {head} to the used ring: {e}");
    }
}
