//! One worker's queue on a throttle node: requests within the group's limits go straight to
//! the child's queue; the others wait here, reads and writes in their own order (as QEMU
//! keeps them), until the timer says the first of them may go. Flushes are never held.
//!
//! While the worker drains (shutdown, a frontend stopping the ring: [`DiskQueue::wait`]),
//! waiting requests go at once, limits aside, as QEMU's drain does: a drain must end.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ThrottleGroup;
use crate::disk::wakeup::{FdSet, Timer};
use crate::disk::{checked, AnyQueue, DiskCompletion, DiskOp, DiskQueue, Rejected, StartError};

/// The earliest a held request is looked at again.
const TIMER_SLACK: Duration = Duration::from_micros(250);

/// A request held back, with its buffers.
struct Held {
    op: DiskOp,
    tag: u64,
    /// Already charged to the group (admitted, then refused by a full child).
    charged: bool,
    /// Its place in the group's line, once it has had to wait.
    ticket: Option<u64>,
}

/// Whether an operation counts as a write for the limits, and its bytes.
fn cost(op: &DiskOp) -> (bool, u64) {
    (op.writes(), op.range().map_or(0, |(_, len)| len))
}

/// What wakes a throttle queue's worker: its timer, joined with its child's fds.
pub struct Wakeup {
    timer: Arc<Timer>,
    set: FdSet,
}

impl Wakeup {
    pub(crate) fn for_child(child: &AnyQueue) -> io::Result<Wakeup> {
        let timer = Arc::new(Timer::new()?);
        let set = FdSet::joining(timer.fd(), child)?;
        Ok(Wakeup { timer, set })
    }

    /// The fd the queue wakes on besides its child's: its timer.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.fd()
    }
}

/// One worker's queue on a throttle node.
pub struct ThrottleQueue {
    child: AnyQueue,
    group: Arc<ThrottleGroup>,
    capacity: crate::disk::Size,
    /// Held reads ([0]) and writes ([1]), each in arrival order.
    held: [VecDeque<Held>; 2],
    /// Completions of held requests the child refused (reported as I/O errors).
    failed: VecDeque<DiskCompletion>,
    /// Also armed by the group when its limits change.
    timer: Arc<Timer>,
    /// The timer and the child's wake-up fds, as one fd for the worker.
    wakeup: FdSet,
    /// Requests that went past the limits because the worker was draining.
    draining: bool,
}

impl ThrottleQueue {
    pub(super) fn new(
        child: AnyQueue,
        group: Arc<ThrottleGroup>,
        capacity: crate::disk::Size,
        depth: u32,
    ) -> io::Result<ThrottleQueue> {
        let wakeup = Wakeup::for_child(&child)?;
        Ok(ThrottleQueue::assemble(
            child, group, capacity, depth, wakeup,
        ))
    }

    /// A queue over `child`, whose wake-up fds `wakeup` was made for: the part that cannot
    /// fail, so a child can be put under a throttle without being lost to an error.
    pub(crate) fn assemble(
        child: AnyQueue,
        group: Arc<ThrottleGroup>,
        capacity: crate::disk::Size,
        depth: u32,
        wakeup: Wakeup,
    ) -> ThrottleQueue {
        let Wakeup { timer, set: wakeup } = wakeup;
        group.register(&timer);
        let depth = depth as usize;
        ThrottleQueue {
            child,
            group,
            capacity,
            held: [
                VecDeque::with_capacity(depth),
                VecDeque::with_capacity(depth),
            ],
            failed: VecDeque::with_capacity(depth),
            timer,
            wakeup,
            draining: false,
        }
    }

    fn held_count(&self) -> usize {
        self.held[0].len() + self.held[1].len()
    }

    /// Starts the held requests whose turn has come; arms the timer for the first that must
    /// still wait.
    fn release(&mut self) {
        if self.held_count() == 0 {
            return;
        }
        let now = Instant::now();
        let mut next: Option<Duration> = None;
        for dir in 0..2 {
            while let Some(h) = self.held[dir].front_mut() {
                if self.draining {
                    self.group.leave(dir == 1, &mut h.ticket);
                } else if !h.charged {
                    let (write, bytes) = cost(&h.op);
                    let wait = self.group.admit(write, bytes, now, &mut h.ticket);
                    if !wait.is_zero() {
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                        break;
                    }
                    h.charged = true;
                }
                let Some(h) = self.held[dir].pop_front() else {
                    break;
                };
                match self.child.start(h.op, h.tag) {
                    Ok(()) => {}
                    // The child is full; its completions bring us back. The charge taken
                    // stands: the request is next in line.
                    Err(Rejected {
                        error: StartError::Busy,
                        op,
                    }) => {
                        self.held[dir].push_front(Held { op, ..h });
                        break;
                    }
                    Err(r) => {
                        log::warn!(
                            "throttle: a held request was refused by its child: {}",
                            r.error
                        );
                        self.failed.push_back(DiskCompletion {
                            tag: h.tag,
                            result: -libc::EIO,
                            buffers: r.op.into_buffers(),
                        });
                    }
                }
            }
        }
        if let Some(wait) = next {
            // Never sooner than TIMER_SLACK: at high limits each wake-up then releases a
            // few requests, not one (the bucket lets the rate catch up), which keeps the
            // worker's wake-ups, and its CPU, well below one per request.
            self.timer.arm(wait.max(TIMER_SLACK));
        }
    }
}

impl Drop for ThrottleQueue {
    fn drop(&mut self) {
        // Only a queue's first held request in each direction holds a place in line.
        for dir in 0..2 {
            for h in self.held[dir].iter_mut() {
                self.group.leave(dir == 1, &mut h.ticket);
            }
        }
    }
}

impl DiskQueue for ThrottleQueue {
    #[inline]
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        if matches!(op, DiskOp::Flush) {
            return self.child.start(op, tag);
        }
        let op = checked(op, self.capacity.get())?;
        let (write, bytes) = cost(&op);
        let dir = usize::from(write);
        if self.held[dir].len() == self.held[dir].capacity() {
            return Err(Rejected::new(StartError::Busy, op));
        }
        let mut ticket = None;
        let mut charged = false;
        let op = if self.held[dir].is_empty()
            && self
                .group
                .admit(write, bytes, Instant::now(), &mut ticket)
                .is_zero()
        {
            match self.child.start(op, tag) {
                // Charged but not taken: it waits here for room, not for the limits (the
                // next submit starts it), rather than being charged again when retried.
                Err(Rejected {
                    error: StartError::Busy,
                    op,
                }) => {
                    charged = true;
                    op
                }
                other => return other,
            }
        } else {
            op
        };
        // Waits for the next submit, which starts it or arms the timer.
        self.held[dir].push_back(Held {
            op,
            tag,
            charged,
            ticket,
        });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.release();
        self.child.submit()
    }

    #[inline]
    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        self.failed
            .pop_front()
            .or_else(|| self.child.pop_completion())
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.held_count() > 0 {
            self.draining = true;
            self.release();
            self.draining = false;
            self.child.submit()?;
        }
        if !self.failed.is_empty() {
            return Ok(());
        }
        self.child.wait()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.wakeup.fd())
    }

    fn ack_completion_fd(&self) {
        self.timer.ack();
        self.child.ack_completion_fd();
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.timer.fd());
        self.child.wake_fds(out);
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.held_count() + self.failed.len() + self.child.in_flight()
    }

    fn held(&self) -> usize {
        self.held_count() + self.child.held()
    }
}
