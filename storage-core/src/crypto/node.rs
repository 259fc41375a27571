//! The `luks` node: a LUKS1 or LUKS2 image in its child node, served decrypted (QEMU's
//! `luks` block driver, and cryptsetup's LUKS2). The header and keyslots are read once, at open; the payload's cipher lives in
//! locked memory ([`super::secret`]) shared by the queues.
//!
//! The data path, by request:
//! - a read goes to the child with the guest's own buffers and is decrypted in place once
//!   it completes. The guest may change its buffer meanwhile: it then reads noise, and
//!   nothing here trusts what was decrypted.
//! - a write is copied out of guest memory once, into the request's own buffer (one per
//!   tag, grown to the largest piece seen and then reused: no allocation per request once
//!   warm), encrypted there and written from there, in pieces of at most [`PIECE`] (so a
//!   guest's huge request never grows the buffer past it; QEMU's luks driver bounces 1 MiB
//!   at a time too). Never encrypted in the guest's buffer: the guest could read its own
//!   ciphertext, and change the plaintext between the encryption and the write.
//! - write-zeroes writes encrypted zeroes (zeroes underneath would decrypt to noise), in
//!   pieces through the same buffer; discard and flush go to the child as they are (a
//!   discarded range reads as noise, which discard allows).
//!
//! Requests are in whole sectors of the payload's sector size (512 bytes, or up to 4 KiB in
//! LUKS2, which the disk then reports as its block size); IVs as [`SectorLayout`] says.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use super::buffers::{decrypt_in_place, WriteBuffer, PIECE};
use super::keyslots::{self, KeyslotChanges, SlotInfo};
use super::secret::Locked;
use super::xts::Xts;
use super::{CryptoError, ImageIo, KeyslotCost, SectorLayout};
use crate::disk::{
    checked, AnyDisk, AnyQueue, Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, IoVecs,
    Rejected, Size, StartError,
};
use crate::error::{StorageError, StorageErrorKind};

/// An open LUKS image.
pub struct LuksDisk {
    child: AnyDisk,
    cipher: Arc<Locked<Xts>>,
    /// Where the payload starts in the child, in bytes.
    payload: u64,
    layout: SectorLayout,
    info: DiskInfo,
    /// One keyslot change at a time.
    keyslot_changes: std::sync::Mutex<()>,
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
            keyslot_changes: std::sync::Mutex::new(()),
        })
    }

    fn changing_keyslots<T>(
        &self,
        f: impl FnOnce(&mut dyn ImageIo) -> Result<T, CryptoError>,
    ) -> Result<T, StorageError> {
        if self.info.read_only {
            return Err(error(
                StorageErrorKind::Unsupported,
                &self.info.path,
                "a read-only disk's keyslots are not changed through it",
            ));
        }
        let _one = self
            .keyslot_changes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        f(&mut self.header_io()).map_err(|e| self.keyslot_error(e))
    }

    fn header_io(&self) -> HeaderIo<'_> {
        HeaderIo {
            node: &self.child,
            limit: self.payload,
        }
    }

    fn keyslot_error(&self, e: CryptoError) -> StorageError {
        keyslots::error(&self.info.path, e)
    }

    /// Control-plane I/O is in whole sectors inside the payload.
    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.info.capacity.get());
        if !inside || !aligned(&self.layout, offset, len as u64) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
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

/// The header and keyslot areas of a served image, through queues on its child of their
/// own, in whole aligned 4 KiB blocks (read, changed, written back); never the payload.
struct HeaderIo<'a> {
    node: &'a AnyDisk,
    /// Where the payload starts: no write reaches it.
    limit: u64,
}

impl ImageIo for HeaderIo<'_> {
    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        read_via_queue(self.node, buf, at)
    }

    fn write(&mut self, at: u64, buf: &[u8]) -> io::Result<()> {
        const ALIGN: u64 = 4096;
        let end = at + buf.len() as u64;
        if end > self.limit {
            return Err(io::Error::other("a header write would reach the payload"));
        }
        let start = at - at % ALIGN;
        let block_end = end.next_multiple_of(ALIGN).min(self.limit.max(end));
        let mut all = vec![0u8; (block_end - start) as usize];
        read_via_queue(self.node, &mut all, start)?;
        let skip = (at - start) as usize;
        all[skip..skip + buf.len()].copy_from_slice(buf);
        let (r, _) = run_via_queue(
            self.node,
            DiskOp::Write {
                offset: start,
                buffers: IoVecs::from_bytes(&all),
            },
        )?;
        if r < all.len() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        run_via_queue(self.node, DiskOp::Flush).map(|_| ())
    }
}

/// Runs `op` on `node` through a queue of its own: its result, and its buffers back.
fn run_via_queue(node: &AnyDisk, op: DiskOp) -> io::Result<(usize, Option<IoVecs>)> {
    let mut q = node.new_queue(1).map_err(io::Error::other)?;
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
    Ok((c.result as usize, c.buffers))
}

/// Reads `buf` at `offset` of `node` through a queue of its own: every node serves its
/// queues, while some serve no control-plane I/O (a tier). In whole, aligned 4 KiB blocks,
/// which an O_DIRECT file (`direct=on`) needs.
fn read_via_queue(node: &AnyDisk, buf: &mut [u8], offset: u64) -> io::Result<()> {
    const ALIGN: u64 = 4096;
    let start = offset - offset % ALIGN;
    let end = (offset + buf.len() as u64).next_multiple_of(ALIGN);
    let size = node.info().capacity.get();
    if end > size.next_multiple_of(ALIGN) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    // The last block may run past a size that is not a multiple of 4 KiB: read to the end.
    let len = (end.min(size) - start) as usize;
    if len < (offset - start) as usize + buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let op = DiskOp::Read {
        offset: start,
        buffers: IoVecs::owned(&[len]),
    };
    let (n, buffers) = run_via_queue(node, op)?;
    if n < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut all = vec![0u8; len];
    buffers.expect("a read's buffers").copy_to(0, &mut all);
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&all[skip..skip + buf.len()]);
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
    /// A write (the guest's buffers wait in `data`) or write-zeroes (no `data`) of
    /// `[start, end)`, in pieces: the one in flight is `[piece, next)`.
    Write {
        data: Option<IoVecs>,
        start: u64,
        piece: u64,
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
    buffer: WriteBuffer,
}

/// One worker's queue on a LUKS image: the child's queue, and per-tag state.
pub struct LuksQueue {
    child: Box<AnyQueue>,
    cipher: Arc<Locked<Xts>>,
    payload: u64,
    layout: SectorLayout,
    capacity: Size,
    slots: Vec<Slot>,
    /// Requests answered here (bad alignment, a failed piece).
    local: VecDeque<DiskCompletion>,
}

fn aligned(layout: &SectorLayout, offset: u64, len: u64) -> bool {
    let s = u64::from(layout.sector_size);
    offset.is_multiple_of(s) && len.is_multiple_of(s)
}

impl LuksQueue {
    /// Encrypts the next piece of a write from `at` (its data from `data`, whose first
    /// byte is at `start`, or zeroes) into `tag`'s buffer and starts writing it; the
    /// piece's end.
    fn start_piece(
        &mut self,
        tag: u64,
        data: Option<&IoVecs>,
        start: u64,
        at: u64,
        end: u64,
    ) -> Result<u64, StartError> {
        let len = (end - at).min(PIECE);
        let slot = &mut self.slots[tag as usize];
        let (bytes, list) = slot.buffer.take(len as usize);
        match data {
            // One read of guest memory; what is encrypted and written is ours.
            Some(d) => {
                d.copy_to(at - start, bytes);
            }
            None => bytes.fill(0),
        }
        self.layout.crypt(&self.cipher, bytes, at, true);
        let op = DiskOp::Write {
            offset: at + self.payload,
            buffers: list,
        };
        match self.child.start(op, tag) {
            Ok(()) => Ok(at + len),
            Err(r) => {
                slot.buffer.give_back(r.op.into_buffers());
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
            Pending::Write {
                data,
                start,
                piece,
                next,
                end,
            } => {
                slot.buffer.give_back(c.buffers.take());
                let done = |result: i32, buffers: Option<IoVecs>| DiskCompletion {
                    tag,
                    result,
                    buffers,
                };
                if c.result < 0 {
                    return Some(done(c.result, data));
                }
                if (c.result as u64) < next - piece {
                    // A file's write falls short only when it cannot go on (no space).
                    return Some(done(-libc::EIO, data));
                }
                if next >= end {
                    // Bytes written for a write; write-zeroes answers 0, as every node.
                    let result = if data.is_some() {
                        (end - start) as i32
                    } else {
                        0
                    };
                    return Some(done(result, data));
                }
                match self.start_piece(tag, data.as_ref(), start, next, end) {
                    Ok(after) => {
                        self.slots[tag as usize].pending = Pending::Write {
                            data,
                            start,
                            piece: next,
                            next: after,
                            end,
                        };
                        // Submitted at once: this runs while completions are reaped, and
                        // the worker may sleep next. Should it fail, `wait` and the next
                        // pass submit it again.
                        if let Err(e) = self.child.submit() {
                            log::error!("luks: submitting a write's next piece: {e}");
                        }
                        None
                    }
                    Err(e) => {
                        log::error!("luks: writing a request's next piece: {e}");
                        Some(done(-libc::EIO, data))
                    }
                }
            }
            Pending::Plain => Some(c),
        }
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
            // Whole sectors; and a result the completion can carry.
            if !aligned(&self.layout, offset, len) || len > i32::MAX as u64 {
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
                let end = offset + buffers.len();
                match self.start_piece(tag, Some(&buffers), offset, offset, end) {
                    Ok(next) => {
                        self.slots[tag as usize].pending = Pending::Write {
                            data: Some(buffers),
                            start: offset,
                            piece: offset,
                            next,
                            end,
                        };
                        Ok(())
                    }
                    Err(e) => Err(Rejected::new(e, DiskOp::Write { offset, buffers })),
                }
            }
            DiskOp::WriteZeroes { offset, len, unmap } => {
                if len == 0 {
                    self.local.push_back(DiskCompletion::bare(tag, 0));
                    return Ok(());
                }
                match self.start_piece(tag, None, offset, offset, offset + len) {
                    Ok(next) => {
                        self.slots[tag as usize].pending = Pending::Write {
                            data: None,
                            start: offset,
                            piece: offset,
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
        // A piece started while completions were reaped goes out first.
        self.child.submit()?;
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

/// The image's keyslots change in place while the disk serves (only the header and
/// keyslot areas are written, never the payload).
impl KeyslotChanges for LuksDisk {
    fn keyslots(&self) -> Result<(u8, Vec<SlotInfo>), StorageError> {
        keyslots::list(&mut self.header_io()).map_err(|e| self.keyslot_error(e))
    }

    fn add_keyslot(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|io| keyslots::add(io, passphrase, new, cost))
    }

    fn remove_keyslot(&self, passphrase: &[u8], slot: u32) -> Result<(), StorageError> {
        self.changing_keyslots(|io| keyslots::remove(io, passphrase, slot))
    }

    fn change_passphrase(
        &self,
        passphrase: &[u8],
        new: &[u8],
        cost: &KeyslotCost,
    ) -> Result<u32, StorageError> {
        self.changing_keyslots(|io| keyslots::change(io, passphrase, new, cost))
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
        self.check(offset, buf.len())?;
        self.child.read_at(buf, offset + self.payload)?;
        self.layout.crypt(&self.cipher, buf, offset, false);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.info.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check(offset, buf.len())?;
        let mut data = buf.to_vec();
        self.layout.crypt(&self.cipher, &mut data, offset, true);
        self.child.write_at(&data, offset + self.payload)
    }
}
