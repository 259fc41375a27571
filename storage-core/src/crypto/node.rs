//! The `luks` node: a LUKS1 or LUKS2 image in its child node, served decrypted (QEMU's
//! `luks` block driver, and cryptsetup's LUKS2). The header and keyslots are read once, at open; the payload's cipher lives in
//! locked memory ([`super::secret`]) shared by the queues.
//!
//! The data path, by request:
//! - a read goes to the child with the guest's own buffers and is decrypted in place once
//!   it completes. The guest may change its buffer meanwhile: it then reads noise, and
//!   nothing here trusts what was decrypted.
//! - a write is copied out of guest memory once, into the request's own buffer (one per
//!   tag, grown to the largest request seen and then reused: no allocation per request
//!   once warm), encrypted there and written from there. Never encrypted in the guest's
//!   buffer: the guest could read its own ciphertext, and change the plaintext between the
//!   encryption and the write.
//! - write-zeroes writes encrypted zeroes (zeroes underneath would decrypt to noise), in
//!   pieces of at most [`ZEROES_PIECE`] through the same buffer; discard and flush go to the
//!   child as they are (a discarded range reads as noise, which discard allows).
//!
//! Requests are in whole sectors of the payload's sector size (512 bytes, or up to 4 KiB in
//! LUKS2, which the disk then reports as its block size); IVs as [`SectorLayout`] says.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::secret::Locked;
use super::xts::Xts;
use super::{CryptoError, SectorLayout};
use crate::disk::{
    checked, AnyDisk, AnyQueue, Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, IoVecs,
    Rejected, Size, StartError,
};
use crate::error::{StorageError, StorageErrorKind};
use crate::iov::AlignedBuf;

/// The largest piece of encrypted zeroes written at once for a write-zeroes request.
pub const ZEROES_PIECE: u64 = 256 << 10;

/// An open LUKS image.
pub struct LuksDisk {
    child: AnyDisk,
    cipher: Arc<Locked<Xts>>,
    /// Where the payload starts in the child, in bytes.
    payload: u64,
    layout: SectorLayout,
    info: DiskInfo,
}

fn error(kind: StorageErrorKind, path: &str, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(kind, format!("{path}: {msg}"))
}

impl LuksDisk {
    /// Opens the LUKS image in `child` with `passphrase` (which any active keyslot may
    /// take). Errors name the image and never hold key material.
    pub fn open(child: AnyDisk, passphrase: &[u8], read_only: bool) -> Result<Self, StorageError> {
        let path = child.info().path.clone();
        let opened = super::open_with(&mut |at, buf| read_via_queue(&child, buf, at), passphrase)
            .map_err(|e| {
            let kind = match e {
                CryptoError::Io(_) => StorageErrorKind::Io,
                CryptoError::WrongPassphrase => StorageErrorKind::InvalidArgument,
                _ => StorageErrorKind::InvalidImage,
            };
            error(kind, &path, e)
        })?;
        let payload = opened.payload_offset;
        let layout = opened.layout;
        let child_size = child.info().capacity.get();
        let sector = u64::from(layout.sector_size);
        let size = match opened.payload_size {
            Some(n) => n,
            // To the end, in whole sectors.
            None => child_size.saturating_sub(payload) / sector * sector,
        };
        if size == 0 || payload.checked_add(size).is_none_or(|end| end > child_size) {
            return Err(error(
                StorageErrorKind::InvalidImage,
                &path,
                format!(
                    "the LUKS payload ({size} bytes from {payload}) does not fit in the image                      ({child_size} bytes)"
                ),
            ));
        }
        let cipher = Xts::new(&opened.key[..])
            .map_err(CryptoError::from)
            .and_then(|x| Locked::new(x).map_err(CryptoError::Io))
            .map_err(|e| error(StorageErrorKind::Open, &path, e))?;
        drop(opened.key);
        log::info!(
            "{path}: LUKS{} image opened with keyslot {} (aes-xts-plain64, 512-bit key, \
             {}-byte sectors)",
            opened.version,
            opened.slot,
            layout.sector_size
        );
        let c = child.info();
        let info = DiskInfo {
            capacity: Size::new(size),
            read_only: read_only || c.read_only,
            direct: c.direct,
            format: "luks",
            path: c.path.clone(),
            engine: c.engine,
            discard: c.discard,
            identity: c.identity,
        };
        Ok(LuksDisk {
            child,
            cipher: Arc::new(cipher),
            payload,
            layout,
            info,
        })
    }

    /// The payload's sector size: the smallest request the disk takes (the guest is told
    /// so, as dm-crypt tells the kernel).
    pub fn block_size(&self) -> u32 {
        self.layout.sector_size
    }

    pub fn child(&self) -> &AnyDisk {
        &self.child
    }

    fn queue(&self, child: AnyQueue, depth: u32) -> LuksQueue {
        LuksQueue {
            child: Box::new(child),
            cipher: self.cipher.clone(),
            payload: self.payload,
            layout: self.layout,
            capacity: self.info.capacity.clone(),
            slots: (0..depth).map(|_| Slot::default()).collect(),
            local: VecDeque::new(),
        }
    }
}

/// Reads `buf` at `offset` of `node` through a queue of its own: every node serves its
/// queues, while some serve no control-plane I/O (a tier).
fn read_via_queue(node: &AnyDisk, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut q = node.new_queue(1).map_err(io::Error::other)?;
    let op = DiskOp::Read {
        offset,
        buffers: IoVecs::owned(&[buf.len()]),
    };
    q.start(op, 0)
        .map_err(|r| io::Error::other(r.error.to_string()))?;
    q.submit()?;
    let c = loop {
        if let Some(c) = q.pop_completion() {
            break c;
        }
        q.wait()?;
    };
    if c.result < 0 {
        return Err(io::Error::from_raw_os_error(-c.result));
    }
    if (c.result as usize) < buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    c.buffers.expect("a read's buffers").copy_to(0, buf);
    Ok(())
}

/// What a request in flight is, by tag.
#[derive(Default)]
enum Pending {
    #[default]
    Idle,
    Read {
        offset: u64,
        len: u64,
    },
    /// The guest's buffers wait here while the child writes ours.
    Write {
        guest: IoVecs,
    },
    /// Encrypted zeroes: the next piece starts at `next` (guest offset).
    Zeroes {
        next: u64,
        end: u64,
    },
    /// Flush or discard, passed through.
    Plain,
}

/// One tag's state and its encryption buffer.
#[derive(Default)]
struct Slot {
    pending: Pending,
    /// The buffer writes are encrypted into (none until the tag first writes).
    buf: Option<Arc<AlignedBuf>>,
    /// The list describing it, while the child does not hold it.
    list: Option<IoVecs>,
}

impl Slot {
    /// This tag's buffer, at least `len` bytes, with nothing else holding it: the bytes to
    /// fill and the list that will describe them.
    fn take_buffer(&mut self, len: usize) -> (&mut [u8], IoVecs) {
        if self.buf.as_ref().is_none_or(|b| b.len() < len) {
            // Rare: the first write of a tag, or a larger one than before.
            let buf = Arc::new(AlignedBuf::new(len.next_power_of_two().max(4096)));
            let mut list = IoVecs::with_capacity(1);
            list.reset(buf.clone());
            self.buf = Some(buf);
            self.list = Some(list);
        }
        let buf = self.buf.as_ref().expect("made above");
        let mut list = self.list.take().expect("the child gave the list back");
        list.clear_buffers();
        // SAFETY: the first `len` bytes of `buf`, the list's keep-alive (set by `reset`
        // when the list was made with it).
        unsafe { list.push(buf.as_ptr(), len) }.expect("room for one buffer");
        // SAFETY: `buf` is this slot's alone: the child gave its list back (`list` was
        // `Some`), and nothing else writes or reads it until the list is started.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), len) };
        (bytes, list)
    }
}

/// One worker's queue on a LUKS image: the child's queue, and per-tag state.
pub struct LuksQueue {
    child: Box<AnyQueue>,
    cipher: Arc<Locked<Xts>>,
    payload: u64,
    layout: SectorLayout,
    capacity: Size,
    slots: Vec<Slot>,
    /// Requests answered here (bad alignment, a failed piece of zeroes).
    local: VecDeque<DiskCompletion>,
}

fn aligned(layout: &SectorLayout, offset: u64, len: u64) -> bool {
    let s = u64::from(layout.sector_size);
    offset.is_multiple_of(s) && len.is_multiple_of(s)
}

impl LuksQueue {
    /// Encrypts the zeroes of `[next, end)`'s first piece into `tag`'s buffer and starts
    /// writing them; the piece's end.
    fn start_zeroes(&mut self, tag: u64, next: u64, end: u64) -> Result<u64, StartError> {
        let len = (end - next).min(ZEROES_PIECE);
        let slot = &mut self.slots[tag as usize];
        let (bytes, list) = slot.take_buffer(len as usize);
        bytes.fill(0);
        self.layout.crypt(&self.cipher, bytes, next, true);
        let op = DiskOp::Write {
            offset: next + self.payload,
            buffers: list,
        };
        match self.child.start(op, tag) {
            Ok(()) => Ok(next + len),
            Err(r) => {
                slot.list = r.op.into_buffers();
                Err(r.error)
            }
        }
    }

    /// Turns the child's completion of `c.tag` into ours; none while a request has pieces
    /// left (the next one is started).
    fn finish(&mut self, mut c: DiskCompletion) -> Option<DiskCompletion> {
        let tag = c.tag;
        let slot = &mut self.slots[tag as usize];
        match std::mem::take(&mut slot.pending) {
            Pending::Idle => {
                log::error!("luks: a completion for tag {tag}, which is not in flight");
                None
            }
            Pending::Read { offset, len } => {
                if c.result >= 0 && (c.result as u64) < len {
                    // Every sector of the payload lies inside the child: short is damage.
                    c.result = -libc::EIO;
                }
                if c.result >= 0 {
                    if let Some(b) = &mut c.buffers {
                        decrypt_in_place(&self.cipher, &self.layout, b, offset);
                    }
                }
                Some(c)
            }
            Pending::Write { guest } => {
                slot.list = c.buffers.replace(guest);
                Some(c)
            }
            Pending::Plain => Some(c),
            Pending::Zeroes { next, end } => {
                slot.list = c.buffers.take();
                if c.result < 0 || next >= end {
                    return Some(DiskCompletion::bare(tag, c.result.min(0)));
                }
                match self.start_zeroes(tag, next, end) {
                    Ok(after) => {
                        self.slots[tag as usize].pending = Pending::Zeroes { next: after, end };
                        if let Err(e) = self.child.submit() {
                            log::error!("luks: submitting zeroes: {e}");
                        }
                        None
                    }
                    Err(e) => {
                        log::error!("luks: writing zeroes: {e}");
                        Some(DiskCompletion::bare(tag, -libc::EIO))
                    }
                }
            }
        }
    }
}

/// Decrypts a completed read of payload bytes from `offset` in the guest's buffers,
/// whatever their layout: sectors that lie inside one buffer in place, in runs; sectors
/// split across buffers gathered, decrypted and scattered back.
fn decrypt_in_place(cipher: &Xts, layout: &SectorLayout, bufs: &mut IoVecs, offset: u64) {
    let s = layout.sector_size as usize;
    let mut at = 0usize;
    // Sectors split across buffers, by index (an allocation only when there are any).
    let mut split = Vec::new();
    for v in bufs.as_slice() {
        let (a, b) = (at, at + v.iov_len);
        at = b;
        let (from, to) = (a.div_ceil(s) * s, b / s * s);
        if from < to {
            // SAFETY: `[from - a, to - a)` lies inside this buffer, which the list's
            // keep-alive holds mapped while we hold the list. The guest may write it
            // concurrently; that changes only what it reads back, never our state.
            let run = unsafe {
                std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>().add(from - a), to - from)
            };
            layout.crypt(cipher, run, offset + from as u64, false);
        }
        if !b.is_multiple_of(s) && b < bufs.len() as usize && split.last() != Some(&(b / s)) {
            split.push(b / s);
        }
    }
    if split.is_empty() {
        return;
    }
    // Rare (a guest's buffers split mid-sector): through a sector of our own.
    let mut buf = [0u8; 4096];
    let sector = &mut buf[..s];
    for k in split {
        let at = (k * s) as u64;
        bufs.copy_to(at, sector);
        layout.crypt(cipher, sector, offset + at, false);
        bufs.copy_from(at, sector);
    }
}

impl DiskQueue for LuksQueue {
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        match self.slots.get(tag as usize) {
            Some(s) if matches!(s.pending, Pending::Idle) => {}
            _ => return Err(Rejected::new(StartError::BadTag, op)),
        }
        let op = checked(op, self.capacity.get())?;
        if let Some((offset, len)) = op.range() {
            if !aligned(&self.layout, offset, len) {
                self.local.push_back(DiskCompletion {
                    tag,
                    result: -libc::EINVAL,
                    buffers: op.into_buffers(),
                });
                return Ok(());
            }
        }
        let payload = self.payload;
        match op {
            DiskOp::Read { offset, buffers } => {
                let len = buffers.len();
                let op = DiskOp::Read {
                    offset: offset + payload,
                    buffers,
                };
                match self.child.start(op, tag) {
                    Ok(()) => {
                        self.slots[tag as usize].pending = Pending::Read { offset, len };
                        Ok(())
                    }
                    Err(r) => Err(Rejected::new(
                        r.error,
                        DiskOp::Read {
                            offset,
                            buffers: r.op.into_buffers().expect("a read's buffers"),
                        },
                    )),
                }
            }
            DiskOp::Write { offset, buffers } => {
                let len = buffers.len() as usize;
                let slot = &mut self.slots[tag as usize];
                let (bytes, list) = slot.take_buffer(len);
                // One read of guest memory; what is encrypted and written is ours.
                buffers.copy_to(0, bytes);
                self.layout.crypt(&self.cipher, bytes, offset, true);
                let op = DiskOp::Write {
                    offset: offset + payload,
                    buffers: list,
                };
                match self.child.start(op, tag) {
                    Ok(()) => {
                        slot.pending = Pending::Write { guest: buffers };
                        Ok(())
                    }
                    Err(r) => {
                        slot.list = r.op.into_buffers();
                        Err(Rejected::new(r.error, DiskOp::Write { offset, buffers }))
                    }
                }
            }
            DiskOp::WriteZeroes { offset, len, unmap } => {
                if len == 0 {
                    self.local.push_back(DiskCompletion::bare(tag, 0));
                    return Ok(());
                }
                match self.start_zeroes(tag, offset, offset + len) {
                    Ok(next) => {
                        self.slots[tag as usize].pending = Pending::Zeroes {
                            next,
                            end: offset + len,
                        };
                        Ok(())
                    }
                    Err(e) => Err(Rejected::new(e, DiskOp::WriteZeroes { offset, len, unmap })),
                }
            }
            DiskOp::Discard { offset, len } => {
                let op = DiskOp::Discard {
                    offset: offset + payload,
                    len,
                };
                match self.child.start(op, tag) {
                    Ok(()) => {
                        self.slots[tag as usize].pending = Pending::Plain;
                        Ok(())
                    }
                    Err(r) => Err(Rejected::new(r.error, DiskOp::Discard { offset, len })),
                }
            }
            DiskOp::Flush => match self.child.start(DiskOp::Flush, tag) {
                Ok(()) => {
                    self.slots[tag as usize].pending = Pending::Plain;
                    Ok(())
                }
                Err(r) => Err(r),
            },
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.child.submit()
    }

    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        if let Some(c) = self.local.pop_front() {
            return Some(c);
        }
        loop {
            let c = self.child.pop_completion()?;
            if let Some(done) = self.finish(c) {
                return Some(done);
            }
        }
    }

    fn wait(&mut self) -> io::Result<()> {
        if !self.local.is_empty() {
            return Ok(());
        }
        self.child.wait()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.child.completion_fd()
    }

    fn ack_completion_fd(&self) {
        self.child.ack_completion_fd()
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        self.child.wake_fds(out)
    }

    fn in_flight(&self) -> usize {
        self.child.in_flight() + self.local.len()
    }

    fn held(&self) -> usize {
        self.child.held()
    }
}

impl Disk for LuksDisk {
    type Queue = LuksQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<LuksQueue, StorageError> {
        Ok(self.queue(self.child.new_queue(depth)?, depth))
    }

    fn new_queue_sharing(&self, depth: u32, eventfd: RawFd) -> Result<LuksQueue, StorageError> {
        Ok(self.queue(self.child.new_queue_sharing(depth, eventfd)?, depth))
    }

    fn flush(&self) -> io::Result<()> {
        self.child.flush()
    }

    fn close(&self) {
        self.child.close()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !aligned(&self.layout, offset, buf.len() as u64) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.child.read_at(buf, offset + self.payload)?;
        self.layout.crypt(&self.cipher, buf, offset, false);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !aligned(&self.layout, offset, buf.len() as u64) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut data = buf.to_vec();
        self.layout.crypt(&self.cipher, &mut data, offset, true);
        self.child.write_at(&data, offset + self.payload)
    }
}
