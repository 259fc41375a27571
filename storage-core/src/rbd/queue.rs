//! One worker's queue on an RBD image: each request is one librbd asynchronous call whose
//! buffers are the request's iovecs (guest memory, used in place). librbd runs the
//! completion callback on its own thread; the callback puts the result on this queue's
//! lock-free list (crossbeam's `ArrayQueue`, sized for the queue's depth) and writes the
//! queue's eventfd, which the worker's event loop waits on.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use super::{ffi, Handles};
use crate::disk::{checked, DiskCompletion, DiskOp, DiskQueue, IoVecs, Rejected, StartError};
use crate::engine::Completion;

/// What the callback needs: where to put the result, and how to wake the worker.
struct Inbox {
    /// Completions, and the slot each frees.
    done: ArrayQueue<(Completion, u32)>,
    eventfd: OwnedFd,
}

/// One request in flight: its tag, the bytes it moves (reported for a write, for which
/// librbd gives 0; a read reports what librbd read), and a reference to the inbox that the
/// callback owns (so the inbox outlives a callback that runs while the queue is dropped).
/// librbd holds a pointer to the slot until the callback.
struct Slot {
    index: u32,
    tag: u64,
    len: u64,
    read: bool,
    /// From `Arc::into_raw` at start; the callback takes it back.
    inbox: *const Inbox,
}

/// One worker's queue on an RBD image.
pub struct RbdQueue {
    handles: Arc<Handles>,
    capacity: crate::disk::Size,
    inbox: Arc<Inbox>,
    /// Slots by index; `free` lists the unused ones. Boxed so their addresses, handed to
    /// librbd, never move.
    /// In cells: librbd's threads read a slot through the pointer it was given while this
    /// queue goes on using the others.
    slots: Box<[UnsafeCell<Slot>]>,
    /// The buffers of the request in each slot, whose memory librbd reads or writes until
    /// the callback: given back with the completion (only this queue's thread uses them).
    buffers: Box<[Option<IoVecs>]>,
    free: Vec<u32>,
    in_flight: usize,
    /// Requests librbd refused to start, reported as completions with the error.
    refused: std::collections::VecDeque<DiskCompletion>,
}

// SAFETY: a slot's inbox pointer is a strong reference the callback owns; librbd reads a
// slot on its thread only inside the callback, before the completion is pushed, and the
// queue waits for every request in flight before it frees the slots; the callback touches
// nothing else but the inbox (thread-safe).
unsafe impl Send for RbdQueue {}

/// librbd's completion callback: runs on a librbd thread.
extern "C" fn on_complete(c: ffi::rbd_completion_t, arg: *mut std::ffi::c_void) {
    // SAFETY: `arg` is the slot this request was started with (see `start`); it is not
    // reused before its completion has been pushed and popped, so it is read whole here,
    // before the push.
    let (index, tag, len, read, inbox) = unsafe {
        let slot = &*(arg as *const Slot);
        (slot.index, slot.tag, slot.len, slot.read, slot.inbox)
    };
    // SAFETY: `start` gave this request one strong reference, from `Arc::into_raw`; it is
    // taken back once, here, and keeps the inbox (and its eventfd) alive to the end.
    let inbox = unsafe { Arc::from_raw(inbox) };
    // SAFETY: `c` is the completion librbd calls us for; it is released once, here.
    let ret = unsafe {
        let r = ffi::rbd_aio_get_return_value(c);
        ffi::rbd_aio_release(c);
        r
    };
    let result = if ret < 0 {
        i32::try_from(ret).unwrap_or(-libc::EIO)
    } else if read {
        // What librbd read (all of it, short only at the image's end, which `start` keeps
        // requests inside).
        i32::try_from(ret).unwrap_or(i32::MAX)
    } else {
        i32::try_from(len).unwrap_or(i32::MAX)
    };
    // Room is certain: the list holds as many entries as the queue has slots.
    let _ = inbox.done.push((
        Completion {
            user_data: tag,
            result,
        },
        index,
    ));
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to the inbox's eventfd, open while `inbox`
    // (our reference) lives.
    unsafe { libc::write(inbox.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

impl RbdQueue {
    pub(super) fn new(
        handles: Arc<Handles>,
        capacity: crate::disk::Size,
        depth: u32,
    ) -> io::Result<RbdQueue> {
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let depth = depth.max(1);
        let inbox = Arc::new(Inbox {
            done: ArrayQueue::new(depth as usize),
            // SAFETY: a fresh descriptor nobody else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
        });
        let slots = (0..depth)
            .map(|index| {
                UnsafeCell::new(Slot {
                    index,
                    tag: 0,
                    len: 0,
                    read: false,
                    inbox: std::ptr::null(),
                })
            })
            .collect();
        Ok(RbdQueue {
            handles,
            capacity,
            inbox,
            slots,
            buffers: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            in_flight: 0,
            refused: std::collections::VecDeque::with_capacity(depth as usize),
        })
    }

    /// Waits for the eventfd (blocking), then clears it.
    fn wait_eventfd(&self) -> io::Result<()> {
        let mut p = libc::pollfd {
            fd: self.inbox.eventfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.ack_completion_fd();
        Ok(())
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        // librbd still holds pointers to the slots of requests in flight.
        while self.in_flight > 0 {
            while self.pop_completion().is_some() {}
            if self.in_flight > 0 && self.wait_eventfd().is_err() {
                // Cannot wait: leak the slots and the inbox rather than free them under
                // librbd's feet.
                std::mem::forget(std::mem::take(&mut self.slots));
                std::mem::forget(std::mem::take(&mut self.buffers));
                std::mem::forget(self.inbox.clone());
                return;
            }
        }
    }
}

impl DiskQueue for RbdQueue {
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        let op = checked(op, self.capacity.get())?;
        let Some(i) = self.free.pop() else {
            return Err(Rejected::new(StartError::Busy, op));
        };
        let Some(guard) = self.handles.image() else {
            // Closed at shutdown: nothing more reaches the image.
            self.free.push(i);
            self.refused.push_back(DiskCompletion {
                tag,
                result: -libc::EIO,
                buffers: op.into_buffers(),
            });
            return Ok(());
        };
        let image = guard.get();
        // The callback's own reference to the inbox (taken back there, or below if the
        // request does not start).
        let inbox_ref = Arc::into_raw(self.inbox.clone());
        let slot = self.slots[i as usize].get();
        // SAFETY: slot `i` was free: no request in flight, so no librbd thread reads it.
        unsafe {
            *slot = Slot {
                index: i,
                tag,
                len: match op {
                    DiskOp::Read { .. } | DiskOp::Write { .. } => op.range().map_or(0, |(_, l)| l),
                    _ => 0,
                },
                read: matches!(op, DiskOp::Read { .. }),
                inbox: inbox_ref,
            }
        };
        let arg = slot.cast();
        let mut c: ffi::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` points to a slot that stays put and unused until this request's
        // callback has run and its completion has been popped; the callback matches
        // librbd's signature.
        let ret = unsafe { ffi::rbd_aio_create_completion(arg, Some(on_complete), &mut c) };
        let ret = if ret < 0 {
            ret
        } else {
            // SAFETY: the iovecs and the memory they describe belong to the operation's
            // buffers, which stay in `self.buffers[i]`, unchanged, until the completion is
            // popped, after librbd's callback (their keep-alive keeps the memory mapped);
            // the image is open while the queue (holding `handles`) lives.
            unsafe {
                match &op {
                    &DiskOp::Read {
                        offset,
                        ref buffers,
                    } => {
                        let iov = buffers.as_slice();
                        ffi::rbd_aio_readv(image, iov.as_ptr().cast(), iov.len() as i32, offset, c)
                    }
                    &DiskOp::Write {
                        offset,
                        ref buffers,
                    } => {
                        let iov = buffers.as_slice();
                        ffi::rbd_aio_writev(image, iov.as_ptr().cast(), iov.len() as i32, offset, c)
                    }
                    DiskOp::Flush => ffi::rbd_aio_flush(image, c),
                    &DiskOp::Discard { offset, len } => ffi::rbd_aio_discard(image, offset, len, c),
                    &DiskOp::WriteZeroes { offset, len, .. } => {
                        ffi::rbd_aio_write_zeroes(image, offset, len as usize, c, 0, 0)
                    }
                }
            }
        };
        if ret < 0 {
            if !c.is_null() {
                // SAFETY: created above and never handed to librbd's I/O path.
                unsafe { ffi::rbd_aio_release(c) };
            }
            // SAFETY: the reference made above; no callback will run to take it.
            drop(unsafe { Arc::from_raw(inbox_ref) });
            self.free.push(i);
            // Not started: report it as a completion with the error, as an engine does.
            self.refused.push_back(DiskCompletion {
                tag,
                result: ret,
                buffers: op.into_buffers(),
            });
            return Ok(());
        }
        self.buffers[i as usize] = op.into_buffers();
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        // librbd sends each request when it is started.
        Ok(())
    }

    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        if let Some(c) = self.refused.pop_front() {
            return Some(c);
        }
        let (c, slot) = self.inbox.done.pop()?;
        self.in_flight -= 1;
        self.free.push(slot);
        Some(DiskCompletion {
            tag: c.user_data,
            result: c.result,
            buffers: self.buffers[slot as usize].take(),
        })
    }

    fn wait(&mut self) -> io::Result<()> {
        if self.in_flight == 0 || !self.refused.is_empty() || !self.inbox.done.is_empty() {
            return Ok(());
        }
        self.wait_eventfd()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.inbox.eventfd.as_raw_fd())
    }

    fn ack_completion_fd(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a valid buffer from our own nonblocking
        // eventfd.
        unsafe { libc::read(self.inbox.eventfd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.refused.len()
    }
}
