//! A FUSE client that talks to a virtio-fs daemon over its vhost-user socket, with no VM:
//! what the Linux guest driver does, for tests and benchmarks.
//!
//! Two layers: [`transport`] (the vhost-user handshake, shared memory, split virtqueues) and
//! this module, which encodes FUSE requests (`include/uapi/linux/fuse.h`, 7.36) into
//! request slots in shared memory, sends each as a chain (one readable descriptor for the
//! request, one writable for the reply) and decodes replies. Requests can be started and
//! waited for separately ([`FuseClient::start`], [`FuseClient::wait`],
//! [`FuseClient::wait_any`]), so tests can interrupt a blocked request and benchmarks can
//! keep many in flight; the convenience methods (`lookup`, `create`, `read`, ...) do one
//! request and return `io::Result`, with the daemon's errno as the error.
//!
//! Queue 0 is the high-priority queue (FORGET, INTERRUPT); requests go to queue 1 unless
//! told otherwise.
//!
//! The protocol constants and layouts here are written from the kernel header, not taken
//! from `vhost_fs::fuse`, on purpose: a client that shared the daemon's definitions would
//! agree with any mistake in them, and the protocol tests would still pass.

pub mod transport;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use transport::{Buffer, Segment, Transport, TransportError, TransportOptions};

pub use transport::Used;

/// The FUSE protocol version the client speaks.
pub const FUSE_MAJOR: u32 = 7;
pub const FUSE_MINOR: u32 = 36;
pub const ROOT_ID: u64 = 1;
pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
/// The high-priority queue.
pub const HIPRIO: usize = 0;
/// The first request queue.
pub const REQUEST_QUEUE: usize = 1;

/// FUSE opcodes the client sends.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
}

/// INIT flags the client asks for (what a Linux guest typically asks of virtiofs).
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const POSIX_LOCKS: u64 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const FLOCK_LOCKS: u64 = 1 << 10;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const DEFAULT: u64 = ASYNC_READ
        | POSIX_LOCKS
        | ATOMIC_O_TRUNC
        | BIG_WRITES
        | FLOCK_LOCKS
        | DO_READDIRPLUS
        | READDIRPLUS_AUTO
        | PARALLEL_DIROPS
        | MAX_PAGES
        | INIT_EXT;
}

/// `fuse_lk_in.lk_flags`: a BSD flock.
pub const LK_FLOCK: u32 = 1;
/// `fuse_setattr_in.valid`: set the size.
pub const FATTR_SIZE: u32 = 1 << 3;
/// `fuse_setattr_in.valid`: set the mode.
pub const FATTR_MODE: u32 = 1 << 0;
/// `fuse_setattr_in.valid`: set the owner.
pub const FATTR_UID: u32 = 1 << 1;
/// `fuse_setattr_in.valid`: set the group.
pub const FATTR_GID: u32 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum FuseClientError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("no free request slot")]
    NoSlot,
    #[error("request of {0} bytes does not fit a slot")]
    TooLarge(usize),
    #[error("reply to request {unique}: {why}")]
    BadReply { unique: u64, why: String },
    #[error("no reply to request {0} within {1:?}")]
    Timeout(u64, Duration),
    #[error("request {0} is not in flight")]
    Unknown(u64),
}

impl From<FuseClientError> for io::Error {
    fn from(e: FuseClientError) -> Self {
        io::Error::other(e)
    }
}

/// Options for [`FuseClient::connect`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    /// Request queues (the high-priority queue comes on top).
    pub request_queues: usize,
    pub queue_size: u16,
    /// Requests that can be in flight at once.
    pub slots: usize,
    /// Room in each slot for a request (header, arguments, WRITE data).
    pub request_room: usize,
    /// Room in each slot for a reply (header and body, READ data).
    pub reply_room: usize,
    /// How long a synchronous call waits for its reply.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_queues: 1,
            queue_size: 256,
            slots: 16,
            request_room: 132 * 1024,
            reply_room: 132 * 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A finished request: the daemon's error (0 or a negated errno), the reply body (when it
/// was asked for) and the bytes the device said it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub unique: u64,
    pub error: i32,
    pub body: Vec<u8>,
    /// Bytes the device reported in the used ring (0 means it gave no reply).
    pub used_len: u32,
}

impl Reply {
    /// The body, or the errno as an `io::Error`.
    pub fn result(self) -> io::Result<Vec<u8>> {
        if self.error < 0 {
            Err(io::Error::from_raw_os_error(-self.error))
        } else if self.used_len == 0 {
            Err(io::Error::other("the daemon answered with no reply"))
        } else {
            Ok(self.body)
        }
    }
}

/// `fuse_attr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Attr {
    fn parse(b: &[u8]) -> Attr {
        Attr {
            ino: le64(b, 0),
            size: le64(b, 8),
            blocks: le64(b, 16),
            mode: le32(b, 60),
            nlink: le32(b, 64),
            uid: le32(b, 68),
            gid: le32(b, 72),
        }
    }
}

/// `fuse_entry_out`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    pub nodeid: u64,
    pub generation: u64,
    pub attr: Attr,
}

const ENTRY_LEN: usize = 40 + 88;

impl Entry {
    fn parse(b: &[u8]) -> Entry {
        Entry {
            nodeid: le64(b, 0),
            generation: le64(b, 8),
            attr: Attr::parse(&b[40..]),
        }
    }
}

/// One entry of READDIR / READDIRPLUS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub off: u64,
    pub typ: u32,
    pub name: Vec<u8>,
    /// READDIRPLUS only (zeroed for `.` and `..`).
    pub entry: Option<Entry>,
}

/// `fuse_kstatfs` (the fields tests compare).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// `fuse_file_lock`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLock {
    pub start: u64,
    pub end: u64,
    pub typ: u32,
    pub pid: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
        .unwrap_or(0)
}

/// A little-endian argument builder.
#[derive(Debug, Default, Clone)]
pub struct Args(pub Vec<u8>);

impl Args {
    pub fn new() -> Self {
        Args(Vec::with_capacity(64))
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A name and its NUL.
    pub fn name(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self.0.push(0);
        self
    }
    pub fn zeros(mut self, n: usize) -> Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
}

struct Slot {
    req: Buffer,
    reply: Buffer,
    /// (queue, head, unique, started, copy body) while in flight.
    busy: Option<(usize, u16, u64, Instant, bool)>,
}

/// The caller's ids in request headers.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A FUSE session over vhost-user.
pub struct FuseClient {
    transport: Transport,
    opts: ClientOptions,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slot by (queue, head).
    by_head: HashMap<(usize, u16), usize>,
    /// Finished requests nobody has waited for yet.
    done: HashMap<u64, (Reply, Duration)>,
    next_unique: u64,
    pub caller: Caller,
    /// The `max_write` the daemon announced in INIT.
    pub max_write: u32,
}

impl FuseClient {
    /// Connects to a virtio-fs daemon's socket (no INIT yet: see [`FuseClient::init`]).
    pub fn connect(socket: &Path, opts: ClientOptions) -> Result<Self, FuseClientError> {
        let per_slot = (opts.request_room + opts.reply_room) as u64 + 128;
        let mut transport = Transport::connect(
            socket,
            TransportOptions {
                queues: 1 + opts.request_queues,
                queue_size: opts.queue_size,
                buffer_bytes: per_slot * opts.slots as u64 + (1 << 20),
            },
        )?;
        let mut slots = Vec::with_capacity(opts.slots);
        for _ in 0..opts.slots {
            slots.push(Slot {
                req: transport.alloc(opts.request_room as u64)?,
                reply: transport.alloc(opts.reply_room as u64)?,
                busy: None,
            });
        }
        // SAFETY: getuid, getgid and getpid have no preconditions.
        let caller = unsafe {
            Caller {
                uid: libc::getuid(),
                gid: libc::getgid(),
                pid: libc::getpid() as u32,
            }
        };
        Ok(FuseClient {
            transport,
            opts,
            free: (0..opts.slots).rev().collect(),
            slots,
            by_head: HashMap::new(),
            done: HashMap::new(),
            next_unique: 1,
            caller,
            max_write: 0,
        })
    }

    /// The transport, to build chains by hand (malformed-chain tests).
    pub fn transport(&mut self) -> &mut Transport {
        &mut self.transport
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.opts.slots - self.free.len()
    }

    /// Requests that finished but nobody has waited for yet.
    pub fn unclaimed(&self) -> usize {
        self.done.len()
    }

    /// The unique id the next request will get.
    pub fn next_unique(&self) -> u64 {
        self.next_unique
    }

    /// Encodes the 40-byte `fuse_in_header`.
    pub fn header(&self, len: u32, opcode: u32, unique: u64, nodeid: u64) -> [u8; IN_HEADER_LEN] {
        let mut h = [0u8; IN_HEADER_LEN];
        h[0..4].copy_from_slice(&len.to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        h[24..28].copy_from_slice(&self.caller.uid.to_le_bytes());
        h[28..32].copy_from_slice(&self.caller.gid.to_le_bytes());
        h[32..36].copy_from_slice(&self.caller.pid.to_le_bytes());
        h
    }

    /// Starts a request on `queue`: header, `args` and `data` (WRITE's payload) in one
    /// readable descriptor, `reply_room` bytes for the reply. With `copy_body` false the reply
    /// body is not copied out (benchmarks). Returns the request's unique id.
    #[allow(clippy::too_many_arguments)]
    pub fn start_on(
        &mut self,
        queue: usize,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        data: &[u8],
        reply_room: usize,
        copy_body: bool,
    ) -> Result<u64, FuseClientError> {
        let len = IN_HEADER_LEN + args.len() + data.len();
        let unique = self.next_unique;
        let header = self.header(len as u32, opcode, unique, nodeid);
        self.start_raw(queue, &[&header, args, data], reply_room, copy_body)
    }

    /// Starts a request whose bytes are `parts` concatenated, exactly as given (the header
    /// included, so it may lie). The unique id it returns is the client's counter; a hand-made
    /// header should carry it ([`FuseClient::next_unique`]) for the reply to be matched.
    pub fn start_raw(
        &mut self,
        queue: usize,
        parts: &[&[u8]],
        reply_room: usize,
        copy_body: bool,
    ) -> Result<u64, FuseClientError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.opts.request_room || reply_room > self.opts.reply_room {
            return Err(FuseClientError::TooLarge(len.max(reply_room)));
        }
        let index = self.free.pop().ok_or(FuseClientError::NoSlot)?;
        let unique = self.next_unique;
        self.next_unique += 1;
        let slot = &mut self.slots[index];
        let mut at = 0;
        for p in parts {
            slot.req.write(at, p);
            at += p.len();
        }
        let mut segments = Vec::with_capacity(2);
        if len > 0 {
            segments.push(Segment {
                gpa: slot.req.gpa,
                len: len as u32,
                writable: false,
            });
        }
        if reply_room > 0 {
            segments.push(Segment {
                gpa: slot.reply.gpa,
                len: reply_room as u32,
                writable: true,
            });
        }
        let head = match self.transport.add_chain(queue, &segments) {
            Ok(h) => h,
            Err(e) => {
                self.free.push(index);
                return Err(e.into());
            }
        };
        slot.busy = Some((queue, head, unique, Instant::now(), copy_body));
        self.by_head.insert((queue, head), index);
        self.transport.kick(queue)?;
        Ok(unique)
    }

    /// [`FuseClient::start_on`] on the first request queue, copying the reply body.
    pub fn start(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        data: &[u8],
        reply_room: usize,
    ) -> Result<u64, FuseClientError> {
        self.start_on(REQUEST_QUEUE, opcode, nodeid, args, data, reply_room, true)
    }

    /// Sends a request that expects no reply (FORGET, INTERRUPT) on the high-priority queue.
    /// The chain has no writable part; it is reclaimed when the device uses it.
    pub fn send_no_reply(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
    ) -> Result<u64, FuseClientError> {
        let len = IN_HEADER_LEN + args.len();
        let unique = self.next_unique;
        let header = self.header(len as u32, opcode, unique, nodeid);
        self.start_raw(HIPRIO, &[&header, args], 0, false)
    }

    /// Collects every used chain of `queue` into `done`; returns how many.
    fn reap(&mut self, queue: usize) -> usize {
        let mut n = 0;
        while let Some(used) = self.transport.pop_used(queue) {
            n += 1;
            let Some(index) = self.by_head.remove(&(queue, used.head)) else {
                continue;
            };
            let slot = &mut self.slots[index];
            let Some((_, _, unique, started, copy)) = slot.busy.take() else {
                continue;
            };
            let mut hdr = [0u8; OUT_HEADER_LEN];
            let mut reply = Reply {
                unique,
                used_len: used.len,
                ..Reply::default()
            };
            if used.len as usize >= OUT_HEADER_LEN && slot.reply.len as usize >= OUT_HEADER_LEN {
                slot.reply.read(0, &mut hdr);
                reply.error = le32(&hdr, 4) as i32;
                let body_len = (used.len as usize)
                    .min(le32(&hdr, 0) as usize)
                    .min(slot.reply.len as usize)
                    .saturating_sub(OUT_HEADER_LEN);
                if copy {
                    reply.body = vec![0u8; body_len];
                    slot.reply.read(OUT_HEADER_LEN, &mut reply.body);
                } else {
                    reply.body = Vec::new();
                    reply.used_len = (body_len + OUT_HEADER_LEN) as u32;
                }
            }
            self.free.push(index);
            self.done.insert(unique, (reply, started.elapsed()));
        }
        n
    }

    fn queues_of_flight(&self) -> Vec<usize> {
        let mut qs: Vec<usize> = self
            .slots
            .iter()
            .filter_map(|s| s.busy.map(|b| b.0))
            .collect();
        qs.sort_unstable();
        qs.dedup();
        qs
    }

    /// Waits on the call eventfds of every queue with requests in flight.
    fn wait_signal(&mut self, timeout: Duration) -> Result<(), FuseClientError> {
        let qs = self.queues_of_flight();
        if qs.is_empty() {
            return Ok(());
        }
        if qs.len() == 1 {
            self.transport.wait(qs[0], timeout)?;
            return Ok(());
        }
        let mut fds: Vec<libc::pollfd> = qs
            .iter()
            .map(|&q| libc::pollfd {
                fd: self.transport.call_fd(q),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of pollfds for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        for f in fds.iter().filter(|f| f.revents & libc::POLLIN != 0) {
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into `v` from a (non-blocking) eventfd.
            unsafe { libc::read(f.fd, (&mut v as *mut u64).cast(), 8) };
        }
        Ok(())
    }

    fn reap_all(&mut self) -> usize {
        (0..self.transport.queue_count())
            .map(|q| self.reap(q))
            .sum()
    }

    /// Waits for request `unique` (started with [`FuseClient::start`]).
    pub fn wait(&mut self, unique: u64, timeout: Duration) -> Result<Reply, FuseClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap_all();
            if let Some((r, _)) = self.done.remove(&unique) {
                return Ok(r);
            }
            if !self
                .slots
                .iter()
                .any(|s| s.busy.is_some_and(|b| b.2 == unique))
            {
                return Err(FuseClientError::Unknown(unique));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FuseClientError::Timeout(unique, timeout));
            }
            self.wait_signal(left.min(Duration::from_millis(100)))?;
        }
    }

    /// Whether request `unique` has finished (without waiting).
    pub fn is_done(&mut self, unique: u64) -> bool {
        self.reap_all();
        self.done.contains_key(&unique)
    }

    /// Waits for any request to finish; returns it and its latency.
    pub fn wait_any(&mut self, timeout: Duration) -> Result<(Reply, Duration), FuseClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.done.is_empty() {
                self.reap_all();
            }
            if let Some(&k) = self.done.keys().next() {
                if let Some(v) = self.done.remove(&k) {
                    return Ok(v);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FuseClientError::Timeout(0, timeout));
            }
            self.wait_signal(left)?;
        }
    }

    /// One request, start to finish.
    pub fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        args: &[u8],
        data: &[u8],
        reply_room: usize,
    ) -> Result<Reply, FuseClientError> {
        let u = self.start(opcode, nodeid, args, data, reply_room)?;
        self.wait(u, self.opts.timeout)
    }

    fn io(&mut self, opcode: u32, nodeid: u64, args: Args, room: usize) -> io::Result<Vec<u8>> {
        self.call(opcode, nodeid, &args.0, &[], OUT_HEADER_LEN + room)?
            .result()
    }

    /// INIT with `flags`; returns the daemon's `fuse_init_out` flags.
    pub fn init_with(&mut self, flags: u64) -> io::Result<u64> {
        let args = Args::new()
            .u32(FUSE_MAJOR)
            .u32(FUSE_MINOR)
            .u32(128 * 1024)
            .u32(flags as u32)
            .u32((flags >> 32) as u32)
            .zeros(44);
        let b = self.io(opcode::INIT, 0, args, 64)?;
        if b.len() < 24 {
            return Err(io::Error::other(format!("INIT reply of {} bytes", b.len())));
        }
        self.max_write = le32(&b, 20);
        Ok(u64::from(le32(&b, 12)) | (u64::from(le32(&b, 36)) << 32))
    }

    /// INIT as a Linux guest would.
    pub fn init(&mut self) -> io::Result<u64> {
        self.init_with(init_flags::DEFAULT)
    }

    pub fn destroy(&mut self) -> io::Result<()> {
        self.io(opcode::DESTROY, 0, Args::new(), 0).map(drop)
    }

    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> io::Result<Entry> {
        let b = self.io(opcode::LOOKUP, parent, Args::new().name(name), ENTRY_LEN)?;
        Ok(Entry::parse(&b))
    }

    pub fn forget(&mut self, nodeid: u64, nlookup: u64) -> io::Result<()> {
        self.send_no_reply(opcode::FORGET, nodeid, &Args::new().u64(nlookup).0)?;
        Ok(())
    }

    pub fn getattr(&mut self, nodeid: u64) -> io::Result<Attr> {
        let b = self.io(
            opcode::GETATTR,
            nodeid,
            Args::new().u32(0).u32(0).u64(0),
            16 + 88,
        )?;
        Ok(Attr::parse(&b[16..]))
    }

    /// SETATTR of the fields in `valid` (`FATTR_SIZE`, `FATTR_MODE`).
    pub fn setattr(&mut self, nodeid: u64, valid: u32, size: u64, mode: u32) -> io::Result<Attr> {
        self.setattr_ids(nodeid, valid, size, mode, 0, 0)
    }

    /// SETATTR of the owner and group (chown, which SETATTR also is for symlinks: lchown).
    pub fn chown(&mut self, nodeid: u64, uid: u32, gid: u32) -> io::Result<Attr> {
        self.setattr_ids(nodeid, FATTR_UID | FATTR_GID, 0, 0, uid, gid)
    }

    fn setattr_ids(
        &mut self,
        nodeid: u64,
        valid: u32,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> io::Result<Attr> {
        let args = Args::new()
            .u32(valid)
            .u32(0)
            .u64(0) // fh
            .u64(size)
            .u64(0) // lock_owner
            .zeros(24) // atime, mtime, ctime
            .zeros(12) // nsecs
            .u32(mode)
            .u32(0)
            .u32(uid)
            .u32(gid)
            .u32(0);
        let b = self.io(opcode::SETATTR, nodeid, args, 16 + 88)?;
        Ok(Attr::parse(&b[16..]))
    }

    pub fn mkdir(&mut self, parent: u64, name: &[u8], mode: u32) -> io::Result<Entry> {
        let args = Args::new().u32(mode).u32(0).name(name);
        Ok(Entry::parse(&self.io(
            opcode::MKDIR,
            parent,
            args,
            ENTRY_LEN,
        )?))
    }

    pub fn mknod(&mut self, parent: u64, name: &[u8], mode: u32, rdev: u32) -> io::Result<Entry> {
        let args = Args::new().u32(mode).u32(rdev).u32(0).u32(0).name(name);
        Ok(Entry::parse(&self.io(
            opcode::MKNOD,
            parent,
            args,
            ENTRY_LEN,
        )?))
    }

    pub fn symlink(&mut self, parent: u64, name: &[u8], target: &[u8]) -> io::Result<Entry> {
        let args = Args::new().name(name).name(target);
        Ok(Entry::parse(&self.io(
            opcode::SYMLINK,
            parent,
            args,
            ENTRY_LEN,
        )?))
    }

    pub fn readlink(&mut self, nodeid: u64) -> io::Result<Vec<u8>> {
        self.io(opcode::READLINK, nodeid, Args::new(), 4096)
    }

    pub fn link(&mut self, nodeid: u64, newparent: u64, name: &[u8]) -> io::Result<Entry> {
        let args = Args::new().u64(nodeid).name(name);
        Ok(Entry::parse(&self.io(
            opcode::LINK,
            newparent,
            args,
            ENTRY_LEN,
        )?))
    }

    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> io::Result<()> {
        self.io(opcode::UNLINK, parent, Args::new().name(name), 0)
            .map(drop)
    }

    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> io::Result<()> {
        self.io(opcode::RMDIR, parent, Args::new().name(name), 0)
            .map(drop)
    }

    /// RENAME2 (`flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`, or 0).
    pub fn rename2(
        &mut self,
        olddir: u64,
        old: &[u8],
        newdir: u64,
        new: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        let args = Args::new()
            .u64(newdir)
            .u32(flags)
            .u32(0)
            .name(old)
            .name(new);
        self.io(opcode::RENAME2, olddir, args, 0).map(drop)
    }

    /// CREATE; returns the entry and the file handle.
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: u32,
    ) -> io::Result<(Entry, u64)> {
        let args = Args::new().u32(flags).u32(mode).u32(0).u32(0).name(name);
        let b = self.io(opcode::CREATE, parent, args, ENTRY_LEN + 16)?;
        Ok((Entry::parse(&b), le64(&b, ENTRY_LEN)))
    }

    /// OPEN; returns the file handle.
    pub fn open(&mut self, nodeid: u64, flags: u32) -> io::Result<u64> {
        let b = self.io(opcode::OPEN, nodeid, Args::new().u32(flags).u32(0), 16)?;
        Ok(le64(&b, 0))
    }

    pub fn release(&mut self, nodeid: u64, fh: u64) -> io::Result<()> {
        let args = Args::new().u64(fh).u32(0).u32(0).u64(0);
        self.io(opcode::RELEASE, nodeid, args, 0).map(drop)
    }

    /// `fuse_read_in` for READ, READDIR and READDIRPLUS.
    pub fn read_args(fh: u64, offset: u64, size: u32) -> Args {
        Args::new()
            .u64(fh)
            .u64(offset)
            .u32(size)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
    }

    /// `fuse_write_in` (the data follows it).
    pub fn write_args(fh: u64, offset: u64, size: u32) -> Args {
        Args::new()
            .u64(fh)
            .u64(offset)
            .u32(size)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
    }

    pub fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        self.io(
            opcode::READ,
            nodeid,
            Self::read_args(fh, offset, size),
            size as usize,
        )
    }

    /// WRITE; returns the bytes written.
    pub fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        let args = Self::write_args(fh, offset, data.len() as u32);
        let b = self
            .call(opcode::WRITE, nodeid, &args.0, data, OUT_HEADER_LEN + 8)?
            .result()?;
        Ok(le32(&b, 0))
    }

    pub fn fsync(&mut self, nodeid: u64, fh: u64) -> io::Result<()> {
        let args = Args::new().u64(fh).u32(0).u32(0);
        self.io(opcode::FSYNC, nodeid, args, 0).map(drop)
    }

    pub fn opendir(&mut self, nodeid: u64) -> io::Result<u64> {
        let b = self.io(opcode::OPENDIR, nodeid, Args::new().u32(0).u32(0), 16)?;
        Ok(le64(&b, 0))
    }

    pub fn releasedir(&mut self, nodeid: u64, fh: u64) -> io::Result<()> {
        let args = Args::new().u64(fh).u32(0).u32(0).u64(0);
        self.io(opcode::RELEASEDIR, nodeid, args, 0).map(drop)
    }

    /// One READDIR (`plus` false) or READDIRPLUS call of at most `size` bytes.
    pub fn readdir(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> io::Result<Vec<DirEntry>> {
        let op = if plus {
            opcode::READDIRPLUS
        } else {
            opcode::READDIR
        };
        let b = self.io(op, nodeid, Self::read_args(fh, offset, size), size as usize)?;
        Ok(parse_dirents(&b, plus))
    }

    /// Reads a whole directory with READDIRPLUS calls of `chunk` bytes.
    pub fn readdir_all(
        &mut self,
        nodeid: u64,
        plus: bool,
        chunk: u32,
    ) -> io::Result<Vec<DirEntry>> {
        let fh = self.opendir(nodeid)?;
        let mut all = Vec::new();
        let mut off = 0;
        loop {
            let batch = self.readdir(nodeid, fh, off, chunk, plus)?;
            let Some(last) = batch.last() else { break };
            off = last.off;
            all.extend(batch);
        }
        self.releasedir(nodeid, fh)?;
        Ok(all)
    }

    pub fn statfs(&mut self, nodeid: u64) -> io::Result<StatFs> {
        let b = self.io(opcode::STATFS, nodeid, Args::new(), 80)?;
        Ok(StatFs {
            blocks: le64(&b, 0),
            bfree: le64(&b, 8),
            files: le64(&b, 24),
            bsize: le32(&b, 40),
            namelen: le32(&b, 44),
        })
    }

    pub fn syncfs(&mut self) -> io::Result<()> {
        self.io(opcode::SYNCFS, ROOT_ID, Args::new().u64(0), 0)
            .map(drop)
    }

    /// `fuse_lk_in`.
    pub fn lk_args(fh: u64, owner: u64, lock: FileLock, flags: u32) -> Args {
        Args::new()
            .u64(fh)
            .u64(owner)
            .u64(lock.start)
            .u64(lock.end)
            .u32(lock.typ)
            .u32(lock.pid)
            .u32(flags)
            .u32(0)
    }

    pub fn getlk(
        &mut self,
        nodeid: u64,
        fh: u64,
        owner: u64,
        lock: FileLock,
    ) -> io::Result<FileLock> {
        let b = self.io(opcode::GETLK, nodeid, Self::lk_args(fh, owner, lock, 0), 24)?;
        Ok(FileLock {
            start: le64(&b, 0),
            end: le64(&b, 8),
            typ: le32(&b, 16),
            pid: le32(&b, 20),
        })
    }

    /// SETLK (never waits); `flags` is 0 or [`LK_FLOCK`].
    pub fn setlk(
        &mut self,
        nodeid: u64,
        fh: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.io(
            opcode::SETLK,
            nodeid,
            Self::lk_args(fh, owner, lock, flags),
            0,
        )
        .map(drop)
    }

    /// Sends INTERRUPT of request `unique` on the high-priority queue.
    pub fn interrupt(&mut self, unique: u64) -> io::Result<()> {
        self.send_no_reply(opcode::INTERRUPT, 0, &Args::new().u64(unique).0)?;
        Ok(())
    }

    pub fn setxattr(&mut self, nodeid: u64, name: &[u8], value: &[u8]) -> io::Result<()> {
        let args = Args::new()
            .u32(value.len() as u32)
            .u32(0)
            .name(name)
            .bytes(value);
        self.io(opcode::SETXATTR, nodeid, args, 0).map(drop)
    }

    /// GETXATTR; with `size` 0, the value's size (as 4 little-endian bytes).
    pub fn getxattr(&mut self, nodeid: u64, name: &[u8], size: u32) -> io::Result<Vec<u8>> {
        let args = Args::new().u32(size).u32(0).name(name);
        self.io(opcode::GETXATTR, nodeid, args, (size as usize).max(8))
    }

    pub fn listxattr(&mut self, nodeid: u64, size: u32) -> io::Result<Vec<u8>> {
        let args = Args::new().u32(size).u32(0);
        self.io(opcode::LISTXATTR, nodeid, args, (size as usize).max(8))
    }

    pub fn removexattr(&mut self, nodeid: u64, name: &[u8]) -> io::Result<()> {
        self.io(opcode::REMOVEXATTR, nodeid, Args::new().name(name), 0)
            .map(drop)
    }

    pub fn lseek(&mut self, nodeid: u64, fh: u64, offset: u64, whence: u32) -> io::Result<u64> {
        let args = Args::new().u64(fh).u64(offset).u32(whence).u32(0);
        Ok(le64(&self.io(opcode::LSEEK, nodeid, args, 8)?, 0))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &mut self,
        nodeid_in: u64,
        fh_in: u64,
        off_in: u64,
        nodeid_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> io::Result<u32> {
        let args = Args::new()
            .u64(fh_in)
            .u64(off_in)
            .u64(nodeid_out)
            .u64(fh_out)
            .u64(off_out)
            .u64(len)
            .u64(0);
        Ok(le32(
            &self.io(opcode::COPY_FILE_RANGE, nodeid_in, args, 8)?,
            0,
        ))
    }

    pub fn fallocate(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    ) -> io::Result<()> {
        let args = Args::new().u64(fh).u64(offset).u64(length).u32(mode).u32(0);
        self.io(opcode::FALLOCATE, nodeid, args, 0).map(drop)
    }
}

/// Decodes `fuse_dirent`s (or `fuse_direntplus`es).
pub fn parse_dirents(b: &[u8], plus: bool) -> Vec<DirEntry> {
    let mut out = Vec::new();
    let mut at = 0;
    loop {
        let entry = if plus {
            if at + ENTRY_LEN > b.len() {
                break;
            }
            let e = Entry::parse(&b[at..at + ENTRY_LEN]);
            at += ENTRY_LEN;
            Some(e)
        } else {
            None
        };
        if at + 24 > b.len() {
            break;
        }
        let namelen = le32(b, at + 16) as usize;
        let Some(name) = b.get(at + 24..at + 24 + namelen) else {
            break;
        };
        out.push(DirEntry {
            ino: le64(b, at),
            off: le64(b, at + 8),
            typ: le32(b, at + 20),
            name: name.to_vec(),
            entry,
        });
        at += (24 + namelen + 7) & !7;
    }
    out
}

/// Our `vhost-fs` serving `shared_dir` on `socket` (no sandbox: tests check the per-request
/// confinement), ready when it prints "listening on".
pub fn vhost_fs_command(
    socket: &Path,
    shared_dir: &Path,
) -> Result<crate::daemon::DaemonCommand, crate::daemon::DaemonError> {
    Ok(
        crate::daemon::DaemonCommand::new(crate::daemon::try_binary_path("vhost-fs")?)
            .readiness(crate::daemon::Readiness::StderrContains(
                crate::daemon::LISTENING_MARKER.to_owned(),
            ))
            .arg("--socket-path")
            .arg(socket)
            .arg("--shared-dir")
            .arg(shared_dir)
            .args(["--sandbox", "none"]),
    )
}

/// The line virtiofsd logs once its socket is listening.
pub const VIRTIOFSD_READY: &str = "Waiting for vhost-user socket connection";

/// `virtiofsd` from `PATH` serving `shared_dir` on `socket` as virtiofsd is usually run
/// (`--cache=auto --sandbox=none`). It serves one frontend and exits when it disconnects.
/// Fails with a setup hint if virtiofsd is not installed.
pub fn virtiofsd_command(
    socket: &Path,
    shared_dir: &Path,
) -> anyhow::Result<crate::daemon::DaemonCommand> {
    let program = crate::tools::require_tool("virtiofsd")?;
    Ok(crate::daemon::DaemonCommand::new(program)
        .readiness(crate::daemon::Readiness::StderrContains(
            VIRTIOFSD_READY.to_owned(),
        ))
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared_dir.display()))
        .args(["--cache=auto", "--sandbox=none"]))
}
