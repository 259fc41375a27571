//! The driver's avail index: how many chains it has published that the device has not taken,
//! and whether that count can be trusted.
//!
//! A driver publishes at most a ring's worth of chains ahead of the device. An index further
//! ahead is corrupt; virtio-queue then refuses to pop anything, while re-enabling kicks keeps
//! reporting work, so a worker that does not recognise the case spins on it for ever.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryBackend;

/// What the avail index says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avail {
    /// This many chains wait to be popped (at most the ring's size).
    Published(usize),
    /// The index is this many chains ahead, more than the ring holds: the driver is broken.
    Corrupt { ahead: usize, size: u16 },
    /// The index cannot be read (the ring's address is outside guest memory).
    Unreadable,
}

/// Reads the avail index of `queue` in `mem` (with acquire ordering, so the chains it
/// publishes are visible).
pub fn avail<M: GuestMemoryBackend>(queue: &Queue, mem: &M) -> Avail {
    let Ok(idx) = queue.avail_idx(mem, Ordering::Acquire) else {
        return Avail::Unreadable;
    };
    let ahead = usize::from(idx.0.wrapping_sub(queue.next_avail()));
    if ahead > usize::from(queue.size()) {
        Avail::Corrupt {
            ahead,
            size: queue.size(),
        }
    } else {
        Avail::Published(ahead)
    }
}

/// Whether a queue still takes requests from its driver. A corrupt avail index breaks it:
/// no more requests are taken until the ring is reset (drained for a stop, or a new
/// frontend), as libvhost-user marks such a device broken. Requests in flight are still
/// answered; that is the worker's part.
#[derive(Debug, Default)]
pub struct Health {
    broken: bool,
}

impl Health {
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The ring starts anew.
    pub fn reset(&mut self) {
        self.broken = false;
    }

    /// How many chains queue `index` may take now, or `None` once it is broken. The index
    /// that breaks it is logged, and `on_break` runs (the caller counts it), once. An
    /// unreadable index gives `usize::MAX`: popping then fails and says so.
    pub fn published<M: GuestMemoryBackend>(
        &mut self,
        index: usize,
        queue: &Queue,
        mem: &M,
        on_break: impl FnOnce(),
    ) -> Option<usize> {
        if self.broken {
            return None;
        }
        match avail(queue, mem) {
            Avail::Published(n) => Some(n),
            Avail::Unreadable => Some(usize::MAX),
            Avail::Corrupt { ahead, size } => {
                log::error!(
                    "queue {index}: the driver's avail index is {ahead} chains ahead on a \
                     ring of {size}; taking no more requests from it until it is reset"
                );
                self.broken = true;
                on_break();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn counts_published_chains_and_flags_an_index_past_the_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let mut q: Queue = mock.create_queue().unwrap();
        let idx_at = mock.avail_addr().unchecked_add(2);
        for (idx, next, want) in [
            (0u16, 0u16, Avail::Published(0)),
            (16, 0, Avail::Published(16)),
            (
                17,
                0,
                Avail::Corrupt {
                    ahead: 17,
                    size: 16,
                },
            ),
            // The index wraps at 2^16.
            (3, 65530, Avail::Published(9)),
            (
                65535,
                0,
                Avail::Corrupt {
                    ahead: 65535,
                    size: 16,
                },
            ),
        ] {
            mem.write_obj(idx, idx_at).unwrap();
            q.set_next_avail(next);
            assert_eq!(avail(&q, &mem), want, "index {idx}, next {next}");
        }
        q.try_set_avail_ring_address(GuestAddress(0x100_0000))
            .unwrap();
        assert_eq!(avail(&q, &mem), Avail::Unreadable);
    }
}
