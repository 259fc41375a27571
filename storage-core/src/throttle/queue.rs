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
use crate::disk::{check_op, AnyQueue, DiskOp, DiskQueue, StartError};
use crate::engine::Completion;

/// The earliest a held request is looked at again.
const TIMER_SLACK: Duration = Duration::from_micros(250);

/// A request held back, with its iovecs as the caller gave them (they stay valid and
/// unchanged until its completion: [`DiskQueue::start`]'s contract).
#[derive(Clone, Copy)]
struct Held {
    op: HeldOp,
    tag: u64,
    /// Already charged to the group (admitted, then refused by a full child).
    charged: bool,
    /// Its place in the group's line, once it has had to wait.
    ticket: Option<u64>,
}

#[derive(Clone, Copy)]
enum HeldOp {
    Read(u64, *const libc::iovec, usize),
    Write(u64, *const libc::iovec, usize),
    Discard(u64, u64),
    Zeroes(u64, u64, bool),
}

impl Held {
    fn of(op: DiskOp<'_>, tag: u64) -> Held {
        let op = match op {
            DiskOp::Read { offset, iov } => HeldOp::Read(offset, iov.as_ptr(), iov.len()),
            DiskOp::Write { offset, iov } => HeldOp::Write(offset, iov.as_ptr(), iov.len()),
            DiskOp::Discard { offset, len } => HeldOp::Discard(offset, len),
            DiskOp::WriteZeroes { offset, len, unmap } => HeldOp::Zeroes(offset, len, unmap),
            DiskOp::Flush => unreachable!("flushes are never held"),
        };
        Held {
            op,
            tag,
            charged: false,
            ticket: None,
        }
    }

    /// The operation again.
    ///
    /// # Safety
    ///
    /// The iovec array given to `start` must still be valid (it is, until the request's
    /// completion, by `start`'s contract).
    unsafe fn op<'a>(&self) -> DiskOp<'a> {
        match self.op {
            HeldOp::Read(offset, p, n) => {
                // SAFETY: the caller's promise above; pointer and length came from a slice.
                let iov = unsafe { std::slice::from_raw_parts(p, n) };
                DiskOp::Read { offset, iov }
            }
            HeldOp::Write(offset, p, n) => {
                // SAFETY: as above.
                let iov = unsafe { std::slice::from_raw_parts(p, n) };
                DiskOp::Write { offset, iov }
            }
            HeldOp::Discard(offset, len) => DiskOp::Discard { offset, len },
            HeldOp::Zeroes(offset, len, unmap) => DiskOp::WriteZeroes { offset, len, unmap },
        }
    }
}

/// Whether an operation counts as a write for the limits, and its bytes.
fn cost(op: &DiskOp<'_>) -> (bool, u64) {
    (op.writes(), op.range().map_or(0, |(_, len)| len))
}

/// One worker's queue on a throttle node.
pub struct ThrottleQueue {
    child: AnyQueue,
    group: Arc<ThrottleGroup>,
    capacity: u64,
    /// Held reads ([0]) and writes ([1]), each in arrival order.
    held: [VecDeque<Held>; 2],
    /// Completions of held requests the child refused (reported as I/O errors).
    failed: VecDeque<Completion>,
    timer: Timer,
    /// The timer and the child's completion fd, as one fd for the worker.
    wakeup: FdSet,
    /// Requests that went past the limits because the worker was draining.
    draining: bool,
}

// SAFETY: the raw iovec pointers of held requests are only dereferenced by the thread that
// owns the queue; `start`'s caller keeps them valid until completion, whichever thread
// drives the queue.
unsafe impl Send for ThrottleQueue {}

impl ThrottleQueue {
    pub(super) fn new(
        child: AnyQueue,
        group: Arc<ThrottleGroup>,
        capacity: u64,
        depth: u32,
    ) -> io::Result<ThrottleQueue> {
        let timer = Timer::new()?;
        let wakeup = FdSet::new()?;
        wakeup.add(timer.fd())?;
        if let Some(fd) = child.completion_fd() {
            wakeup.add(fd)?;
        }
        let depth = depth as usize;
        Ok(ThrottleQueue {
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
        })
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
                // SAFETY: a held request has not completed, so its iovecs are still valid.
                let op = unsafe { h.op() };
                if self.draining {
                    self.group.leave(dir == 1, &mut h.ticket);
                } else if !h.charged {
                    let (write, bytes) = cost(&op);
                    let wait = self.group.admit(write, bytes, now, &mut h.ticket);
                    if !wait.is_zero() {
                        next = Some(next.map_or(wait, |n| n.min(wait)));
                        break;
                    }
                    h.charged = true;
                }
                let tag = h.tag;
                // SAFETY: the iovecs and buffers stay valid until completion (above).
                match unsafe { self.child.start(op, tag) } {
                    Ok(()) => {
                        self.held[dir].pop_front();
                    }
                    // The child is full; its completions bring us back. The charge taken
                    // stands: the request is next in line.
                    Err(StartError::Busy) => break,
                    Err(e) => {
                        log::warn!("throttle: a held request was refused by its child: {e}");
                        self.held[dir].pop_front();
                        self.failed.push_back(Completion {
                            user_data: tag,
                            result: -libc::EIO,
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
    unsafe fn start(&mut self, op: DiskOp<'_>, tag: u64) -> Result<(), StartError> {
        if matches!(op, DiskOp::Flush) {
            // SAFETY: a flush carries no buffers.
            return unsafe { self.child.start(op, tag) };
        }
        check_op(&op, self.capacity)?;
        let (write, bytes) = cost(&op);
        let dir = usize::from(write);
        if self.held[dir].len() == self.held[dir].capacity() {
            return Err(StartError::Busy);
        }
        let mut held = Held::of(op, tag);
        if self.held[dir].is_empty()
            && self
                .group
                .admit(write, bytes, Instant::now(), &mut held.ticket)
                .is_zero()
        {
            // SAFETY: the caller upholds `start`'s contract, which the child shares.
            match unsafe { self.child.start(op, tag) } {
                // Charged but not taken: it waits here for room, not for the limits (the
                // next submit starts it), rather than being charged again when retried.
                Err(StartError::Busy) => held.charged = true,
                other => return other,
            }
        }
        // Waits for the next submit, which starts it or arms the timer.
        self.held[dir].push_back(held);
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.release();
        self.child.submit()
    }

    #[inline]
    fn pop_completion(&mut self) -> Option<Completion> {
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

    #[inline]
    fn in_flight(&self) -> usize {
        self.held_count() + self.failed.len() + self.child.in_flight()
    }

    fn held(&self) -> usize {
        self.held_count() + self.child.held()
    }
}
