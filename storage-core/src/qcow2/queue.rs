//! One worker's queue on a qcow2 image. A request that maps to one place (a run of
//! clusters contiguous in one image file of the chain, or a range a raw base file serves,
//! or zeroes) goes to that file's queue as it is, with the guest's buffers: the data path
//! of a page-cached or allocated image. Anything else (a request across differently
//! mapped clusters, compressed clusters, discard, flush) is done here, synchronously, and
//! completes at once: the slow path, correct first.
//!
//! The queue holds the whole backing chain flattened: a read looks each image up from
//! the top down and goes straight to the file holding its data, instead of passing
//! through a queue per image (which cost a start, a submit and a poll per layer, a
//! quarter of a 10-deep chain's read). Any change to the chain (a snapshot taken,
//! deleted or reverted) moves the top image's generation, and the queue rebuilds it.
//!
//! Writes find or make each cluster first, under the metadata lock ([`Meta`]): a new
//! cluster gets its old contents (the backing file's, a compressed cluster's) written
//! before its L2 entry names it, so a write in flight only ever lands in a cluster that
//! already holds what it held before.
//!
//! An encrypted image's data ([`super::encryption`]) takes the same paths: a read sent to
//! an image's file is decrypted in the guest's buffers once it completes, with that
//! image's key at the host offset it was read from; a write to allocated clusters is
//! copied once into the tag's own buffer and encrypted there (never in the guest's), up to
//! [`PIECE`] bytes; larger or unaligned ones, and everything else, the slow path
//! encrypts.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::compressed;
use super::meta::{Mapping, Meta};
use super::{read_clamped, Active, Shared};
use crate::crypto::{WriteBuffer, PIECE};
use crate::disk::wakeup::FdSet;
use crate::disk::{
    checked, AnyDisk, AnyQueue, Disk, DiskCompletion, DiskOp, DiskQueue, IoVecs, Rejected, Size,
    StartError,
};
use crate::error::{StorageError, StorageErrorKind};

/// Where a request went: a child, or done here (its completion waits in `local`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Child,
    Local,
}

/// Where a request's data is, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// In child `.0`'s file from offset `.1` on, contiguous (an image's file, or the raw
    /// base, read at the guest's offset).
    Child(usize, u64),
    /// Zeroes.
    Zero,
    /// Anything else: done here, piece by piece.
    Slow,
}

/// One qcow2 image of the chain, as a read walks it.
struct Layer {
    shared: Arc<Shared>,
    /// The size of what lies below (reads past it are the slow path's), if anything does.
    below: Option<u64>,
}

/// What an encrypted chain keeps per tag.
#[derive(Default)]
struct Sealed {
    /// A read in flight from layer `.0`'s file at host offset `.1`, to decrypt.
    decrypt: Option<(usize, u64)>,
    /// A write's guest buffers, while its ciphertext (in `buffer`) is written.
    guest: Option<IoVecs>,
    buffer: WriteBuffer,
}

/// A queue the requests go to, and how many of ours are in flight on it.
struct Child {
    queue: Box<AnyQueue>,
    in_flight: usize,
}

pub struct Qcow2Queue {
    active: Arc<Active>,
    /// `active`'s generation the chain below was built for.
    generation: u64,
    depth: u32,
    capacity: Size,
    /// The chain from the top (the image written) down; `layers[i]`'s file is
    /// `children[i]`.
    layers: Vec<Layer>,
    /// The layers' file queues, then the raw base's (the last image's backing file, when
    /// it is not qcow2).
    children: Vec<Child>,
    /// Where completions are signalled: those done here, and the children's.
    notify: Notify,
    /// By tag: where each request in flight went (`Some((route, read length))`).
    routes: Vec<Option<(Route, Option<u64>)>>,
    local: VecDeque<DiskCompletion>,
    in_flight: usize,
    /// Per tag, for encrypted images (empty otherwise).
    sealed: Vec<Sealed>,
}

/// Per-tag state for a chain with an encrypted image in it, else none.
fn sealed_for(layers: &[Layer], depth: u32) -> Vec<Sealed> {
    if layers.iter().any(|l| l.shared.crypt.is_some()) {
        (0..depth).map(|_| Sealed::default()).collect()
    } else {
        Vec::new()
    }
}

impl Qcow2Queue {
    /// `parent`: the parent's eventfd to signal (it keeps it open), or none for a queue of
    /// its own.
    pub(crate) fn new(
        active: Arc<Active>,
        depth: u32,
        capacity: Size,
        parent: Option<RawFd>,
    ) -> Result<Self, StorageError> {
        let engine = |e| StorageError::new(StorageErrorKind::Engine, "qcow2 queue").with_source(e);
        let notify = match parent {
            Some(fd) => Notify::Parent(fd),
            None => {
                let fd = super::eventfd().map_err(engine)?;
                let wakeup = FdSet::new().map_err(engine)?;
                wakeup.add(fd.as_raw_fd()).map_err(engine)?;
                Notify::Own { fd, wakeup }
            }
        };
        let generation = active.generation.load(Ordering::Acquire);
        let (layers, children) = chain(&active, depth, &notify)?;
        let sealed = sealed_for(&layers, depth);
        Ok(Qcow2Queue {
            active,
            generation,
            depth,
            capacity,
            layers,
            children,
            notify,
            routes: vec![None; depth as usize],
            local: VecDeque::new(),
            in_flight: 0,
            sealed,
        })
    }

    /// The image written (the top of the chain).
    fn top(&self) -> &Arc<Shared> {
        &self.layers[0].shared
    }

    /// Moves to the chain as it is now (after a snapshot), with nothing in flight.
    fn follow(&mut self, generation: u64) -> Result<(), StorageError> {
        let (layers, children) = chain(&self.active, self.depth, &self.notify)?;
        // Nothing in flight: no tag's state is lost.
        self.sealed = sealed_for(&layers, self.depth);
        self.layers = layers;
        self.children = children;
        self.generation = generation;
        Ok(())
    }

    fn done_here(&mut self, tag: u64, result: i32, buffers: Option<IoVecs>) {
        self.routes[tag as usize] = Some((Route::Local, None));
        self.local.push_back(DiskCompletion {
            tag,
            result,
            buffers,
        });
        self.in_flight += 1;
        super::signal(self.notify.fd());
    }

    /// Where the data at `at` is, looked up from the top of the chain down, and how far
    /// (at most `len`) that answer holds: to the end of the cluster of every image looked
    /// at. A piece that runs past the end of an image below is the slow path's.
    fn locate(&self, at: u64, len: u64) -> io::Result<(Plan, u64)> {
        let mut piece = len;
        for (i, layer) in self.layers.iter().enumerate() {
            let shared = &layer.shared;
            let cluster = shared.cluster_size;
            piece = piece.min(cluster - at % cluster);
            let mut meta = shared.lock();
            match meta.lookup(&shared.file, at)? {
                Mapping::Data(h) => return Ok((Plan::Child(i, h + at % cluster), piece)),
                Mapping::Zero => return Ok((Plan::Zero, piece)),
                Mapping::Compressed { .. } => return Ok((Plan::Slow, piece)),
                Mapping::Unallocated => match layer.below {
                    None => return Ok((Plan::Zero, piece)),
                    Some(size) if at + piece <= size => {}
                    Some(_) => return Ok((Plan::Slow, piece)),
                },
            }
        }
        // Below the last image: the raw base, at the guest's offset.
        Ok((Plan::Child(self.layers.len(), at), piece))
    }

    fn plan_read(&self, offset: u64, len: u64) -> io::Result<Plan> {
        let mut plan: Option<Plan> = None;
        let mut at = offset;
        while at < offset + len {
            let (this, piece) = self.locate(at, offset + len - at)?;
            plan = match (plan, this) {
                (None, p) => Some(p),
                (Some(Plan::Child(c, start)), Plan::Child(d, h))
                    if c == d && start + (at - offset) == h =>
                {
                    Some(Plan::Child(c, start))
                }
                (Some(Plan::Zero), Plan::Zero) => Some(Plan::Zero),
                _ => return Ok(Plan::Slow),
            };
            if plan == Some(Plan::Slow) {
                break;
            }
            at += piece;
        }
        Ok(plan.unwrap_or(Plan::Zero))
    }

    /// Makes every cluster of the range writable; `Some(host)` when they are contiguous
    /// in the file.
    fn plan_write(&self, offset: u64, len: u64) -> io::Result<Option<u64>> {
        let shared = self.top();
        let mut meta = shared.lock();
        let cluster = meta.cluster_size();
        let mut start = None;
        let mut contiguous = true;
        let mut at = offset;
        while at < offset + len {
            let piece = (cluster - at % cluster).min(offset + len - at);
            let h = writable(shared, &mut meta, at)? + at % cluster;
            match start {
                None => start = Some(h),
                Some(s) if s + (at - offset) == h => {}
                Some(_) => contiguous = false,
            }
            at += piece;
        }
        Ok(start.filter(|_| contiguous))
    }

    /// Writes `buffers` at guest `offset` here, synchronously (the slow path).
    fn write_here(&mut self, offset: u64, buffers: IoVecs, tag: u64) -> Result<(), Rejected> {
        // One copy out of guest memory, which is then written as it is (never read from
        // the guest's buffer twice).
        let len = buffers.len();
        let mut data = vec![0u8; len as usize];
        buffers.copy_to(0, &mut data);
        let result = match write_sync(self.top(), &data, offset) {
            Ok(()) => len as i32,
            Err(e) => errno(&e),
        };
        self.done_here(tag, result, Some(buffers));
        Ok(())
    }

    /// Sends a write to the top image's file at `host` (its clusters writable and
    /// contiguous there), encrypted: copied out of guest memory once into the tag's own
    /// buffer and encrypted there (never in the guest's buffer, see [`crate::crypto`]).
    fn send_encrypted(
        &mut self,
        host: u64,
        offset: u64,
        buffers: IoVecs,
        tag: u64,
    ) -> Result<(), Rejected> {
        let crypt = self.layers[0]
            .shared
            .crypt
            .as_deref()
            .expect("an encrypted top");
        let sealed = &mut self.sealed[tag as usize];
        let (bytes, list) = sealed.buffer.take(buffers.len() as usize);
        buffers.copy_to(0, bytes);
        crypt.encrypt(bytes, host);
        let c = &mut self.children[0];
        let op = DiskOp::Write {
            offset: host,
            buffers: list,
        };
        match c.queue.start(op, tag) {
            Ok(()) => {
                c.in_flight += 1;
                sealed.guest = Some(buffers);
                self.routes[tag as usize] = Some((Route::Child, None));
                self.in_flight += 1;
                Ok(())
            }
            Err(r) => {
                sealed.buffer.give_back(r.op.into_buffers());
                Err(Rejected::new(r.error, DiskOp::Write { offset, buffers }))
            }
        }
    }

    /// Sends `op` (already mapped) to child `child`; a refusal gives back the request as
    /// the caller made it.
    fn send(
        &mut self,
        child: usize,
        op: DiskOp,
        tag: u64,
        original: u64,
        read: Option<u64>,
    ) -> Result<(), Rejected> {
        let c = &mut self.children[child];
        match c.queue.start(op, tag) {
            Ok(()) => {
                c.in_flight += 1;
                self.routes[tag as usize] = Some((Route::Child, read));
                self.in_flight += 1;
                Ok(())
            }
            Err(r) => {
                let buffers =
                    r.op.into_buffers()
                        .unwrap_or_else(|| IoVecs::with_capacity(0));
                let op = if read.is_some() {
                    DiskOp::Read {
                        offset: original,
                        buffers,
                    }
                } else {
                    DiskOp::Write {
                        offset: original,
                        buffers,
                    }
                };
                Err(Rejected::new(r.error, op))
            }
        }
    }
}

/// Where a queue's completions are signalled.
enum Notify {
    /// Its own eventfd, gathered with any child's that signals elsewhere.
    Own { fd: OwnedFd, wakeup: FdSet },
    /// Its parent's (which keeps it open): the whole chain signals that one, so the
    /// parent's set of descriptors never changes, snapshots or not.
    Parent(RawFd),
}

impl Notify {
    fn fd(&self) -> RawFd {
        match self {
            Notify::Own { fd, .. } => fd.as_raw_fd(),
            Notify::Parent(fd) => *fd,
        }
    }
}

/// The chain of `active`'s image as it is now, flattened: its qcow2 images from the top
/// down, and queues on their files and on the raw base below them, signalling `notify`.
/// File nodes signal the eventfd they are given; a child that cannot (none in a qcow2
/// chain today) is added to the queue's own set, or refused under a parent whose set is
/// fixed.
fn chain(
    active: &Active,
    depth: u32,
    notify: &Notify,
) -> Result<(Vec<Layer>, Vec<Child>), StorageError> {
    let error = |m: &str| StorageError::new(StorageErrorKind::Engine, format!("qcow2 queue: {m}"));
    let mut layers = Vec::new();
    let mut queues = Vec::new();
    let mut shared = active.get();
    loop {
        queues.push(shared.file.new_queue_sharing(depth, notify.fd())?);
        let below = shared.backing.as_ref().map(|b| b.info().capacity.get());
        let next = match &shared.backing {
            Some(AnyDisk::Qcow2(q)) => Some(q.active.get()),
            Some(base) => {
                queues.push(base.new_queue_sharing(depth, notify.fd())?);
                None
            }
            None => None,
        };
        layers.push(Layer { shared, below });
        match next {
            Some(n) => shared = n,
            None => break,
        }
    }
    let mut fds = Vec::new();
    for q in &queues {
        q.wake_fds(&mut fds);
    }
    fds.sort_unstable();
    fds.dedup();
    for fd in fds.into_iter().filter(|fd| *fd != notify.fd()) {
        match notify {
            Notify::Own { wakeup, .. } => match wakeup.add(fd) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(error("cannot watch a child").with_source(e))
                }
                _ => {}
            },
            Notify::Parent(_) => return Err(error("a child signals elsewhere than its parent")),
        }
    }
    let children = queues
        .into_iter()
        .map(|q| Child {
            queue: Box::new(q),
            in_flight: 0,
        })
        .collect();
    Ok((layers, children))
}

fn sector_aligned(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(512) && len.is_multiple_of(512)
}

fn errno(e: &io::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

/// The host offset of the guest cluster holding `at`, made writable (see [`Meta`]).
fn writable(shared: &Shared, meta: &mut Meta, at: u64) -> io::Result<u64> {
    let cluster = meta.cluster_size();
    let start = at - at % cluster;
    let compression = meta.header.compression;
    let file = &shared.file;
    let backing = shared.backing.as_ref();
    let crypt = shared.crypt.as_deref();
    let mut fill = |old: Mapping, buf: &mut [u8]| -> io::Result<bool> {
        match old {
            Mapping::Unallocated => match backing {
                Some(b) => {
                    read_clamped(b, buf, start, b.info().capacity.get())?;
                    Ok(true)
                }
                None => Ok(false),
            },
            Mapping::Zero => Ok(false),
            Mapping::Compressed { offset, len } => {
                if crypt.is_some() {
                    return Err(compressed_and_encrypted());
                }
                let mut data = vec![0u8; len as usize];
                read_clamped(file, &mut data, offset, u64::MAX)?;
                compressed::inflate(compression, &data, buf)?;
                Ok(true)
            }
            Mapping::Data(h) => {
                match crypt {
                    // Plaintext: encrypted again for the new place.
                    Some(c) => c.read(file, buf, h)?,
                    None => file.read_at(buf, h)?,
                }
                Ok(true)
            }
        }
    };
    meta.writable_cluster(file, at, crypt, &mut fill)
}

/// QEMU writes no compressed cluster into an encrypted image: one there is damage.
fn compressed_and_encrypted() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "a compressed cluster in an encrypted image",
    )
}

/// Reads guest bytes `[offset, offset + buf.len())` piece by piece (the slow path, and
/// control-plane reads).
pub(crate) fn read_sync(shared: &Shared, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut meta = shared.lock();
    let cluster = meta.cluster_size();
    let compression = meta.header.compression;
    let mut done = 0usize;
    let mut scratch = Vec::new();
    while done < buf.len() {
        let at = offset + done as u64;
        let piece = ((cluster - at % cluster) as usize).min(buf.len() - done);
        let out = &mut buf[done..done + piece];
        match meta.lookup(&shared.file, at)? {
            Mapping::Data(h) => match &shared.crypt {
                Some(c) => c.read(&shared.file, out, h + at % cluster)?,
                None => shared.file.read_at(out, h + at % cluster)?,
            },
            Mapping::Zero => out.fill(0),
            Mapping::Unallocated => match &shared.backing {
                Some(b) => read_clamped(b, out, at, b.info().capacity.get())?,
                None => out.fill(0),
            },
            Mapping::Compressed { .. } if shared.crypt.is_some() => {
                return Err(compressed_and_encrypted())
            }
            Mapping::Compressed { offset: c, len } => {
                let mut data = vec![0u8; len as usize];
                read_clamped(&shared.file, &mut data, c, u64::MAX)?;
                scratch.resize(cluster as usize, 0);
                compressed::inflate(compression, &data, &mut scratch)?;
                let from = (at % cluster) as usize;
                out.copy_from_slice(&scratch[from..from + piece]);
            }
        }
        done += piece;
    }
    Ok(())
}

/// Writes guest bytes at `offset` piece by piece (the slow path, and control-plane writes).
pub(crate) fn write_sync(shared: &Shared, buf: &[u8], offset: u64) -> io::Result<()> {
    let mut meta = shared.lock();
    let cluster = meta.cluster_size();
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let piece = ((cluster - at % cluster) as usize).min(buf.len() - done);
        let host = writable(shared, &mut meta, at)? + at % cluster;
        let data = &buf[done..done + piece];
        match &shared.crypt {
            Some(c) => c.write(&shared.file, data, host)?,
            None => shared.file.write_at(data, host)?,
        }
        done += piece;
    }
    Ok(())
}

/// Discard (`zero_only`: false) or write-zeroes over `[offset, offset + len)`: whole
/// clusters in metadata where the format can say "zeroes", the rest written.
fn zero_range(shared: &Shared, offset: u64, len: u64, discard: bool) -> io::Result<()> {
    let cluster = shared.lock().cluster_size();
    let mut at = offset;
    while at < offset + len {
        let piece = (cluster - at % cluster).min(offset + len - at);
        let whole = piece == cluster;
        let mut meta = shared.lock();
        let done = whole && meta.zero_cluster(&shared.file, at)?;
        if !done && !discard {
            // Zeroes already where nothing lies below.
            // As the image's own chain reads it (with backing=null too).
            let reads_zero = match meta.lookup(&shared.file, at)? {
                Mapping::Zero => true,
                Mapping::Unallocated => !meta.has_backing(),
                _ => false,
            };
            drop(meta);
            if !reads_zero {
                write_sync(shared, &vec![0u8; piece as usize], at)?;
            }
        }
        at += piece;
    }
    Ok(())
}

impl DiskQueue for Qcow2Queue {
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        if tag as usize >= self.routes.len() || self.routes[tag as usize].is_some() {
            return Err(Rejected::new(StartError::BadTag, op));
        }
        let op = checked(op, self.capacity.get())?;
        // The chain changed (a snapshot taken, deleted or reverted): follow it once nothing
        // is in flight here (the daemon stops the queues first, so that is at once). Until
        // then, nothing new starts: it could land in the snapshot.
        let now = self.active.generation.load(Ordering::Acquire);
        if now != self.generation {
            if self.in_flight > 0 {
                return Err(Rejected::new(StartError::Busy, op));
            }
            if let Err(e) = self.follow(now) {
                log::error!("{}: {e}", self.top().path.display());
                self.done_here(tag, -libc::EIO, op.into_buffers());
                return Ok(());
            }
        }
        match op {
            DiskOp::Read {
                offset,
                mut buffers,
            } => {
                let len = buffers.len();
                // Encrypted data is decrypted in whole sectors of the file: a request cut
                // elsewhere (none from a guest) takes the slow path.
                let plan = if !self.sealed.is_empty() && !sector_aligned(offset, len) {
                    Ok(Plan::Slow)
                } else {
                    self.plan_read(offset, len)
                };
                match plan {
                    Ok(Plan::Child(child, at)) => {
                        self.send(
                            child,
                            DiskOp::Read {
                                offset: at,
                                buffers,
                            },
                            tag,
                            offset,
                            Some(len),
                        )?;
                        if self
                            .layers
                            .get(child)
                            .is_some_and(|l| l.shared.crypt.is_some())
                        {
                            self.sealed[tag as usize].decrypt = Some((child, at));
                        }
                        Ok(())
                    }
                    Ok(Plan::Zero) => {
                        buffers.fill_zero();
                        self.done_here(tag, len as i32, Some(buffers));
                        Ok(())
                    }
                    Ok(Plan::Slow) => {
                        let mut data = vec![0u8; len as usize];
                        let result = match read_sync(self.top(), &mut data, offset) {
                            Ok(()) => {
                                buffers.copy_from(0, &data);
                                len as i32
                            }
                            Err(e) => errno(&e),
                        };
                        self.done_here(tag, result, Some(buffers));
                        Ok(())
                    }
                    Err(e) => {
                        log::error!("{}: {e}", self.top().path.display());
                        self.done_here(tag, errno(&e), Some(buffers));
                        Ok(())
                    }
                }
            }
            DiskOp::Write { offset, buffers } => {
                let len = buffers.len();
                match self.plan_write(offset, len) {
                    Ok(Some(host)) if self.top().crypt.is_some() => {
                        if len <= PIECE && sector_aligned(offset, len) {
                            self.send_encrypted(host, offset, buffers, tag)
                        } else {
                            self.write_here(offset, buffers, tag)
                        }
                    }
                    Ok(Some(host)) => self.send(
                        0,
                        DiskOp::Write {
                            offset: host,
                            buffers,
                        },
                        tag,
                        offset,
                        None,
                    ),
                    Ok(None) => self.write_here(offset, buffers, tag),
                    Err(e) => {
                        log::error!("{}: {e}", self.top().path.display());
                        self.done_here(tag, errno(&e), Some(buffers));
                        Ok(())
                    }
                }
            }
            DiskOp::Flush => {
                let result = match self.top().flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        log::error!("{}: flush: {e}", self.top().path.display());
                        errno(&e)
                    }
                };
                self.done_here(tag, result, None);
                Ok(())
            }
            DiskOp::Discard { offset, len } | DiskOp::WriteZeroes { offset, len, .. } => {
                let discard = matches!(op, DiskOp::Discard { .. });
                let result = match zero_range(self.top(), offset, len, discard) {
                    Ok(()) => 0,
                    Err(e) => errno(&e),
                };
                self.done_here(tag, result, None);
                Ok(())
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        // A queue the guest leaves idle follows a changed chain here too (the daemon kicks
        // its workers after stopping them), so a deleted snapshot's file is let go.
        if self.in_flight == 0 && self.active.generation.load(Ordering::Acquire) != self.generation
        {
            let now = self.active.generation.load(Ordering::Acquire);
            if let Err(e) = self.follow(now) {
                log::error!("{}: {e}", self.top().path.display());
            }
        }
        // Every child, even past one that fails.
        let mut result = Ok(());
        for c in self.children.iter_mut().filter(|c| c.in_flight > 0) {
            if let Err(e) = c.queue.submit() {
                result = Err(e);
            }
        }
        result
    }

    fn pop_completion(&mut self) -> Option<DiskCompletion> {
        if let Some(c) = self.local.pop_front() {
            self.in_flight -= 1;
            self.routes[c.tag as usize] = None;
            return Some(c);
        }
        let mut c = self
            .children
            .iter_mut()
            .filter(|c| c.in_flight > 0)
            .find_map(|child| {
                let c = child.queue.pop_completion()?;
                child.in_flight -= 1;
                Some(c)
            })?;
        self.in_flight -= 1;
        if let Some((_, Some(len))) = self.routes.get_mut(c.tag as usize).and_then(Option::take) {
            // Every cluster a read maps to lies inside its file: short means damaged.
            if c.result >= 0 && (c.result as u64) < len {
                c.result = -libc::EIO;
            }
        }
        if let Some(sealed) = self.sealed.get_mut(c.tag as usize) {
            if let Some(guest) = sealed.guest.take() {
                sealed.buffer.give_back(c.buffers.take());
                c.buffers = Some(guest);
            }
            if let Some((layer, host)) = sealed.decrypt.take() {
                let crypt = self.layers[layer].shared.crypt.as_ref();
                if let (true, Some(b), Some(crypt)) = (c.result >= 0, &mut c.buffers, crypt) {
                    crypt.decrypt_iovecs(b, host);
                }
            }
        }
        Some(c)
    }

    fn wait(&mut self) -> io::Result<()> {
        if !self.local.is_empty() {
            return Ok(());
        }
        // On the first child with requests in flight (as `Disk::wait` callers need: a
        // completion arrives); others' completions wait in their rings meanwhile.
        match self.children.iter_mut().find(|c| c.in_flight > 0) {
            Some(c) => {
                c.queue.submit()?;
                c.queue.wait()
            }
            None => Ok(()),
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(match &self.notify {
            Notify::Own { wakeup, .. } => wakeup.fd(),
            Notify::Parent(fd) => *fd,
        })
    }

    fn ack_completion_fd(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a valid buffer from a nonblocking eventfd (ours, or
        // the parent's, which it keeps open while we exist).
        unsafe { libc::read(self.notify.fd(), buf.as_mut_ptr().cast(), 8) };
        for c in &self.children {
            c.queue.ack_completion_fd();
        }
    }

    fn wake_fds(&self, out: &mut Vec<RawFd>) {
        out.push(self.notify.fd());
        for c in &self.children {
            c.queue.wake_fds(out);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
