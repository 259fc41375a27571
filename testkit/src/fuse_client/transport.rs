//! The device side of a virtio-fs connection, without a VM: shared memory, the vhost-user
//! handshake, and split virtqueues that this process drives as a guest driver would.
//!
//! "Guest memory" is one memfd mapped here and handed to the backend with
//! `SET_MEM_TABLE`; guest physical addresses are offsets into it. The first pages hold the
//! rings (one set per queue); the rest is for request and reply buffers, which the caller
//! carves out with [`Transport::alloc`]. Rings are the split layout of VIRTIO 1.x without
//! `EVENT_IDX`: the backend tells us when it does not want kicks (`VRING_USED_F_NO_NOTIFY`)
//! and always signals the call eventfd after using buffers.
//!
//! Descriptors are written as given: [`Transport::add_chain`] takes any addresses and
//! flags, so tests can also hand the backend chains that a correct driver never would.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 4096;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// Why the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("vhost-user {step}: {source}")]
    VhostUser {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("shared memory: {0}")]
    Memory(#[source] io::Error),
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("the backend offers {offered} queues; {wanted} needed")]
    TooFewQueues { offered: u64, wanted: usize },
    #[error("queue {0}: no free descriptors")]
    QueueFull(usize),
    #[error("out of shared memory: {wanted} bytes wanted, {left} left")]
    OutOfMemory { wanted: u64, left: u64 },
    #[error("queue {queue}: no used buffer within {timeout:?}")]
    Timeout { queue: usize, timeout: Duration },
}

fn vu(step: &'static str) -> impl FnOnce(vhost::Error) -> TransportError {
    move |source| TransportError::VhostUser { step, source }
}

/// One descriptor as the driver writes it: a guest address, a length, and whether the
/// device writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub gpa: u64,
    pub len: u32,
    pub writable: bool,
}

/// A chain the device has used: its head and the bytes it wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// A region of the shared memory: its guest address and where it is mapped here.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    pub gpa: u64,
    pub len: u64,
    ptr: NonNull<u8>,
}

// SAFETY: a Buffer is an address into the transport's mapping, valid while the transport
// lives; the transport's owner serialises access to it.
unsafe impl Send for Buffer {}

impl Buffer {
    /// Copies `data` into the buffer at `offset`.
    ///
    /// # Panics
    /// If `offset + data.len()` exceeds the buffer.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset + data.len() <= self.len as usize,
            "write past buffer"
        );
        // SAFETY: the range is inside the mapping (checked above); the device only reads
        // buffers the driver has not yet made available, so there is no concurrent writer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
    }

    /// Copies `out.len()` bytes from the buffer at `offset`.
    ///
    /// # Panics
    /// If the range exceeds the buffer.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(offset + out.len() <= self.len as usize, "read past buffer");
        // SAFETY: as in `write`; the device has used the chain, so it no longer writes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
    }

    /// A sub-range of this buffer.
    pub fn slice(&self, offset: u64, len: u64) -> Buffer {
        assert!(offset + len <= self.len, "slice past buffer");
        Buffer {
            gpa: self.gpa + offset,
            len,
            // SAFETY: offset <= len of the buffer, so the pointer stays inside the mapping.
            ptr: unsafe { NonNull::new_unchecked(self.ptr.as_ptr().add(offset as usize)) },
        }
    }
}

struct Queue {
    size: u16,
    desc: NonNull<u8>,
    avail: NonNull<u8>,
    used: NonNull<u8>,
    free: Vec<u16>,
    /// Descriptor indices of each chain in flight, by head.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl Queue {
    fn avail_idx_ref(&self) -> &AtomicU16 {
        // SAFETY: avail.idx is a 2-byte-aligned u16 at offset 2 of the avail ring, inside the
        // mapping for the transport's lifetime; the device only reads it.
        unsafe { &*self.avail.as_ptr().add(2).cast::<AtomicU16>() }
    }
    fn used_flags_ref(&self) -> &AtomicU16 {
        // SAFETY: used.flags is the aligned u16 at offset 0 of the used ring, in the mapping.
        unsafe { &*self.used.as_ptr().cast::<AtomicU16>() }
    }
    fn used_idx_ref(&self) -> &AtomicU16 {
        // SAFETY: used.idx is the aligned u16 at offset 2 of the used ring, in the mapping.
        unsafe { &*self.used.as_ptr().add(2).cast::<AtomicU16>() }
    }
}

/// Options for [`Transport::connect`].
#[derive(Debug, Clone, Copy)]
pub struct TransportOptions {
    /// Virtqueues to set up (virtio-fs: the high-priority queue plus request queues).
    pub queues: usize,
    pub queue_size: u16,
    /// Bytes of shared memory for buffers (rings come on top).
    pub buffer_bytes: u64,
}

/// A vhost-user connection with its shared memory and virtqueues.
pub struct Transport {
    frontend: Frontend,
    _memfd: File,
    base: NonNull<u8>,
    size: u64,
    next_free: u64,
    queues: Vec<Queue>,
    protocol_features: VhostUserProtocolFeatures,
}

// SAFETY: the raw pointers point into the transport's own mapping; it is used from one
// thread at a time (`&mut self` for everything that touches the rings).
unsafe impl Send for Transport {}

impl Drop for Transport {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are exactly the mapping made in `connect`; nothing refers to
        // it after the transport is gone (Buffers must not outlive it, as documented).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.size as usize) };
    }
}

fn ring_pages(size: u16) -> u64 {
    let n = u64::from(size);
    let desc = (16 * n).div_ceil(PAGE) * PAGE;
    let avail = (6 + 2 * n).div_ceil(PAGE) * PAGE;
    let used = (6 + 8 * n).div_ceil(PAGE) * PAGE;
    desc + avail + used
}

impl Transport {
    /// Connects to the backend at `socket`, negotiates, shares memory and starts the queues.
    pub fn connect(socket: &Path, opts: TransportOptions) -> Result<Self, TransportError> {
        let mut frontend = Frontend::connect(socket, opts.queues as u64).map_err(vu("connect"))?;
        frontend.set_owner().map_err(vu("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vu("GET_FEATURES"))?;
        let features = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
        frontend
            .set_features(features)
            .map_err(vu("SET_FEATURES"))?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let pf = frontend
                .get_protocol_features()
                .map_err(vu("GET_PROTOCOL_FEATURES"))?;
            protocol_features = pf
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(vu("SET_PROTOCOL_FEATURES"))?;
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let n = frontend.get_queue_num().map_err(vu("GET_QUEUE_NUM"))?;
                if n < opts.queues as u64 {
                    return Err(TransportError::TooFewQueues {
                        offered: n,
                        wanted: opts.queues,
                    });
                }
            }
        }

        let rings = ring_pages(opts.queue_size) * opts.queues as u64;
        let size = (rings + opts.buffer_bytes).div_ceil(PAGE) * PAGE;
        // SAFETY: a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fuse-client".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(TransportError::Memory(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).map_err(TransportError::Memory)?;
        // SAFETY: maps `size` bytes of our memfd shared; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TransportError::Memory(io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| {
            TransportError::Memory(io::Error::other("mmap returned a null pointer"))
        })?;
        let mut t = Transport {
            frontend,
            _memfd: memfd,
            base,
            size,
            next_free: rings,
            queues: Vec::new(),
            protocol_features,
        };
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: base.as_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: t._memfd.as_raw_fd(),
        };
        t.frontend
            .set_mem_table(&[region])
            .map_err(vu("SET_MEM_TABLE"))?;

        let mut offset = 0u64;
        for index in 0..opts.queues {
            let n = u64::from(opts.queue_size);
            let desc_off = offset;
            let avail_off = desc_off + (16 * n).div_ceil(PAGE) * PAGE;
            let used_off = avail_off + (6 + 2 * n).div_ceil(PAGE) * PAGE;
            offset += ring_pages(opts.queue_size);
            let at = |off: u64| {
                // SAFETY: every ring offset is below `rings` <= `size`.
                unsafe { NonNull::new_unchecked(base.as_ptr().add(off as usize)) }
            };
            let queue = Queue {
                size: opts.queue_size,
                desc: at(desc_off),
                avail: at(avail_off),
                used: at(used_off),
                free: (0..opts.queue_size).rev().collect(),
                chains: vec![Vec::new(); usize::from(opts.queue_size)],
                avail_idx: 0,
                last_used: 0,
                kick: EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?,
                call: EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?,
            };
            let va = |off: u64| base.as_ptr() as u64 + off;
            let f = &mut t.frontend;
            f.set_vring_num(index, opts.queue_size)
                .map_err(vu("SET_VRING_NUM"))?;
            f.set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: opts.queue_size,
                    queue_size: opts.queue_size,
                    flags: 0,
                    desc_table_addr: va(desc_off),
                    used_ring_addr: va(used_off),
                    avail_ring_addr: va(avail_off),
                    log_addr: None,
                },
            )
            .map_err(vu("SET_VRING_ADDR"))?;
            f.set_vring_base(index, 0).map_err(vu("SET_VRING_BASE"))?;
            f.set_vring_call(index, &queue.call)
                .map_err(vu("SET_VRING_CALL"))?;
            f.set_vring_kick(index, &queue.kick)
                .map_err(vu("SET_VRING_KICK"))?;
            if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
                f.set_vring_enable(index, true)
                    .map_err(vu("SET_VRING_ENABLE"))?;
            }
            t.queues.push(queue);
        }
        Ok(t)
    }

    /// The protocol features both sides agreed on.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Carves `len` bytes (rounded up to 64) out of the shared memory. Buffers are never
    /// returned; they live as long as the transport and must not be used after it.
    pub fn alloc(&mut self, len: u64) -> Result<Buffer, TransportError> {
        let len = len.div_ceil(64) * 64;
        let left = self.size - self.next_free;
        if len > left {
            return Err(TransportError::OutOfMemory { wanted: len, left });
        }
        let gpa = self.next_free;
        self.next_free += len;
        Ok(Buffer {
            gpa,
            len,
            // SAFETY: gpa + len <= size: the pointer is inside the mapping.
            ptr: unsafe { NonNull::new_unchecked(self.base.as_ptr().add(gpa as usize)) },
        })
    }

    /// Bytes of shared memory (rings and buffers); guest addresses are below this.
    pub fn memory_size(&self) -> u64 {
        self.size
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Free descriptors on `queue`.
    pub fn free_descriptors(&self, queue: usize) -> usize {
        self.queues[queue].free.len()
    }

    /// Makes a chain of `segments` available on `queue` (without kicking); returns its head.
    pub fn add_chain(&mut self, queue: usize, segments: &[Segment]) -> Result<u16, TransportError> {
        let q = &mut self.queues[queue];
        if segments.is_empty() || q.free.len() < segments.len() {
            return Err(TransportError::QueueFull(queue));
        }
        let ids: Vec<u16> = (0..segments.len())
            .map(|_| q.free.pop().unwrap_or_default())
            .collect();
        for (i, s) in segments.iter().enumerate() {
            let mut flags = if s.writable { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < ids.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&s.gpa.to_le_bytes());
            d[8..12].copy_from_slice(&s.len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            // SAFETY: ids are < queue size, so the 16-byte entry is inside the table; the
            // descriptor is free, so the device does not read it now.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    d.as_ptr(),
                    q.desc.as_ptr().add(16 * usize::from(ids[i])),
                    16,
                )
            };
        }
        let head = ids[0];
        let slot = usize::from(q.avail_idx % q.size);
        // SAFETY: ring[slot] is the u16 at 4 + 2 * slot in the avail ring, inside the mapping;
        // the device reads it only after the index below is published.
        unsafe {
            q.avail
                .as_ptr()
                .add(4 + 2 * slot)
                .cast::<u16>()
                .write_volatile(head.to_le())
        };
        q.chains[usize::from(head)] = ids;
        q.avail_idx = q.avail_idx.wrapping_add(1);
        q.avail_idx_ref()
            .store(q.avail_idx.to_le(), Ordering::Release);
        Ok(head)
    }

    /// Misbehaves as a broken driver would: publishes an avail index `ahead` chains past the
    /// device's position (more than the ring holds, for `ahead` > the queue size) with no
    /// chains behind it. For tests that the device survives it.
    pub fn corrupt_avail_index(&mut self, queue: usize, ahead: u16) {
        let q = &mut self.queues[queue];
        q.avail_idx = q.avail_idx.wrapping_add(ahead);
        q.avail_idx_ref()
            .store(q.avail_idx.to_le(), Ordering::Release);
    }

    /// Tells the backend about new chains on `queue`, unless it said it does not need it.
    pub fn kick(&self, queue: usize) -> Result<(), TransportError> {
        let q = &self.queues[queue];
        fence(Ordering::SeqCst);
        if u16::from_le(q.used_flags_ref().load(Ordering::Acquire)) & VRING_USED_F_NO_NOTIFY != 0 {
            return Ok(());
        }
        q.kick.write(1).map_err(TransportError::EventFd)
    }

    /// Kicks `queue` whether or not the backend asked for it.
    pub fn force_kick(&self, queue: usize) -> Result<(), TransportError> {
        self.queues[queue]
            .kick
            .write(1)
            .map_err(TransportError::EventFd)
    }

    /// The next used chain of `queue`, if any; its descriptors become free again.
    pub fn pop_used(&mut self, queue: usize) -> Option<Used> {
        let q = &mut self.queues[queue];
        let idx = u16::from_le(q.used_idx_ref().load(Ordering::Acquire));
        if idx == q.last_used {
            return None;
        }
        let slot = usize::from(q.last_used % q.size);
        let mut e = [0u8; 8];
        // SAFETY: ring[slot] is the 8-byte element at 4 + 8 * slot of the used ring, inside
        // the mapping; the acquire load above orders it after the device's write.
        unsafe {
            std::ptr::copy_nonoverlapping(q.used.as_ptr().add(4 + 8 * slot), e.as_mut_ptr(), 8)
        };
        q.last_used = q.last_used.wrapping_add(1);
        let id = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let len = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let head = u16::try_from(id).unwrap_or(u16::MAX);
        if let Some(ids) = q.chains.get_mut(usize::from(head)) {
            q.free.append(ids);
        }
        Some(Used { head, len })
    }

    /// Waits until the backend signals `queue` (or `timeout` passes); returns whether it did.
    /// Check [`Transport::pop_used`] first: a signal may have come before.
    pub fn wait(&self, queue: usize, timeout: Duration) -> Result<bool, TransportError> {
        let q = &self.queues[queue];
        let mut pfd = libc::pollfd {
            fd: q.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(TransportError::EventFd(e));
        }
        if n == 0 {
            return Ok(false);
        }
        let _ = q.call.read();
        Ok(true)
    }

    /// Pops the next used chain of `queue`, waiting up to `timeout` for it.
    pub fn wait_used(&mut self, queue: usize, timeout: Duration) -> Result<Used, TransportError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used(queue) {
                return Ok(u);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(TransportError::Timeout { queue, timeout });
            }
            self.wait(queue, left)?;
        }
    }

    /// Raw file descriptor of `queue`'s call eventfd (to poll several queues at once).
    pub fn call_fd(&self, queue: usize) -> i32 {
        self.queues[queue].call.as_raw_fd()
    }
}
