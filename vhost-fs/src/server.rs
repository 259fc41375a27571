//! The FUSE message server: decodes a message, validates it, dispatches it to the
//! [`FileSystem`] and encodes the reply body. It knows nothing about virtqueues: READ and
//! WRITE come back as [`Outcome::Read`]/[`Outcome::Write`] for the queue worker to run on its
//! I/O engine straight between the file and guest memory, and SETLKW and INTERRUPT as
//! [`Outcome::Blocking`] for the worker to run on a thread of their own.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::decode::{self, DecodeError, InHeader, Request};
use crate::filesystem::{Context, FileSystem, XattrReply};
use crate::fuse::{self, init, Encoder};

/// A reply to send: a negated errno (0 for success) and the body after the out header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub error: i32,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn ok(body: Vec<u8>) -> Self {
        Reply { error: 0, body }
    }
    pub fn err(errno: i32) -> Self {
        Reply {
            error: -errno.abs(),
            body: Vec::new(),
        }
    }
    fn from_io(e: io::Error) -> Self {
        Reply::err(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// What the worker does with a message.
pub enum Outcome {
    Reply(Reply),
    /// FORGET, BATCH_FORGET, a malformed INTERRUPT: the guest expects nothing back.
    NoReply,
    /// Read up to `size` bytes at `offset` of `file` into the reply's data buffers.
    Read {
        file: Arc<File>,
        offset: u64,
        size: u32,
    },
    /// Write the message's data buffers to `file` at `offset`.
    Write {
        file: Arc<File>,
        offset: u64,
        size: u32,
    },
    /// A request that may block for as long as someone else decides (SETLKW, an INTERRUPT
    /// waiting for its target): run it on a thread of its own, not on a queue's thread
    /// (nor the pool's). `None` returns the chain without a reply.
    Blocking(Box<dyn FnOnce() -> Option<Reply> + Send>),
}

/// Whether requests with this opcode are served on the queue's own thread even when a
/// thread pool is configured: READ and WRITE only hand their transfer to the queue's I/O
/// engine, SETLKW and INTERRUPT only hand a closure to a thread of their own, FORGETs
/// touch nothing but the inode table, and INIT and DESTROY change the session every other
/// request depends on. Everything else makes blocking system calls.
pub fn runs_inline(opcode: u32) -> bool {
    use fuse::opcode::*;
    matches!(
        opcode,
        READ | WRITE | SETLKW | INTERRUPT | FORGET | BATCH_FORGET | INIT | DESTROY
    )
}

/// How long an INTERRUPT waits for the request it names to show up before it is answered
/// EAGAIN. It travels on the high-priority queue and can overtake its target; the kernel
/// sends it again after EAGAIN while the target is still pending, and ignores the EAGAIN
/// when the target has already been answered.
pub const INTERRUPT_GRACE: Duration = Duration::from_millis(20);

/// How long an interrupted request may take to leave its blocking call before we stop
/// signalling it (see [`Waiters::interrupt`]).
const INTERRUPT_PERSIST: Duration = Duration::from_secs(5);

struct Waiter {
    thread: libc::pthread_t,
    /// Tells apart two requests a misbehaving guest sent with the same id.
    token: u64,
}

/// Threads blocked in SETLKW, by request id, so INTERRUPT can reach them.
#[derive(Default)]
pub struct Waiters {
    map: Mutex<HashMap<u64, Waiter>>,
    /// Signalled whenever a waiter comes or goes.
    changed: Condvar,
    next_token: AtomicU64,
}

/// The signal that interrupts a blocked request; its handler does nothing, and it is
/// installed without `SA_RESTART` so the blocked call fails with `EINTR`.
pub const INTERRUPT_SIGNAL: i32 = libc::SIGUSR1;

impl Waiters {
    /// Runs `f` as request `unique`, interruptible by [`Waiters::interrupt`].
    pub fn run<T>(&self, unique: u64, f: impl FnOnce() -> T) -> T {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(unique, Waiter { thread, token });
        self.changed.notify_all();
        let r = f();
        let mut map = self.lock();
        if map.get(&unique).is_some_and(|w| w.token == token) {
            map.remove(&unique);
        }
        drop(map);
        self.changed.notify_all();
        r
    }

    /// Interrupts request `unique`: waits up to `grace` for it to start waiting, then
    /// signals its thread until it stops. A signal that arrives just before the thread
    /// enters its blocking call is lost, so it is repeated (as libfuse does) with a growing
    /// pause, for at most [`INTERRUPT_PERSIST`]. Returns false if no such request showed up.
    pub fn interrupt(&self, unique: u64, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        let mut map = self.lock();
        let token = loop {
            if let Some(w) = map.get(&unique) {
                break w.token;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            map = self.wait(map, left);
        };
        let give_up = Instant::now() + INTERRUPT_PERSIST;
        let mut pause = Duration::from_millis(1);
        loop {
            match map.get(&unique) {
                Some(w) if w.token == token => {
                    // SAFETY: the thread is alive: it removes its entry (under this lock,
                    // which we hold) before it returns from `run`.
                    unsafe { libc::pthread_kill(w.thread, INTERRUPT_SIGNAL) };
                }
                _ => return true,
            }
            if Instant::now() >= give_up {
                log::warn!("request {unique} ignores its interrupt; giving up");
                return true;
            }
            map = self.wait(map, pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    fn wait<'a>(
        &self,
        map: MutexGuard<'a, HashMap<u64, Waiter>>,
        timeout: Duration,
    ) -> MutexGuard<'a, HashMap<u64, Waiter>> {
        match self.changed.wait_timeout(map, timeout) {
            Ok((m, _)) => m,
            Err(p) => p.into_inner().0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Waiter>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Installs the no-op handler for [`INTERRUPT_SIGNAL`] (once, at start-up).
pub fn install_interrupt_handler() -> io::Result<()> {
    extern "C" fn nothing(_: i32) {}
    // SAFETY: a zeroed sigaction with a valid handler and empty mask; no SA_RESTART.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = nothing as extern "C" fn(i32) as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(INTERRUPT_SIGNAL, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub struct Server {
    fs: Arc<dyn FileSystem>,
    initialized: AtomicBool,
    waiters: Arc<Waiters>,
}

fn body(f: impl FnOnce(&mut Encoder)) -> Reply {
    let mut e = Encoder::default();
    f(&mut e);
    Reply::ok(e.0)
}

impl Server {
    pub fn new(fs: Arc<dyn FileSystem>) -> Self {
        Server {
            fs,
            initialized: AtomicBool::new(false),
            waiters: Arc::new(Waiters::default()),
        }
    }

    pub fn filesystem(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    /// Handles one message: `msg` is every readable byte, except for WRITE (header and
    /// `fuse_write_in` only, with `write_data_len` data bytes left in guest memory).
    /// Returns the request id to answer (`None` when the header itself was unreadable) and
    /// what to do.
    pub fn handle(&self, msg: &[u8], write_data_len: u64) -> (Option<InHeader>, Outcome) {
        let (h, req) = match decode::decode(msg, write_data_len) {
            Ok(v) => v,
            Err(DecodeError::NoHeader(n)) => {
                log::warn!("dropping a {n}-byte message without a FUSE header");
                return (None, Outcome::NoReply);
            }
            Err(e) => {
                log::warn!("malformed FUSE message: {e}");
                let h = InHeader::decode(msg).ok();
                // FORGET-like messages expect no reply, malformed or not.
                let no_reply = h.is_some_and(|h| {
                    matches!(
                        h.opcode,
                        fuse::opcode::FORGET | fuse::opcode::BATCH_FORGET | fuse::opcode::INTERRUPT
                    )
                });
                let out = if no_reply {
                    Outcome::NoReply
                } else {
                    Outcome::Reply(Reply::err(e.errno()))
                };
                return (h, out);
            }
        };
        let out = self.dispatch(&h, req);
        (Some(h), out)
    }

    fn dispatch(&self, h: &InHeader, req: Request<'_>) -> Outcome {
        let ctx = Context {
            uid: h.uid,
            gid: h.gid,
            pid: h.pid,
        };
        let ino = h.nodeid;
        let fs = &*self.fs;
        if !matches!(req, Request::Init { .. }) && !self.initialized.load(Ordering::Acquire) {
            return if req.no_reply() {
                Outcome::NoReply
            } else {
                Outcome::Reply(Reply::err(libc::EIO))
            };
        }
        let r = |res: io::Result<Reply>| Outcome::Reply(res.unwrap_or_else(Reply::from_io));
        let empty = |res: io::Result<()>| r(res.map(|()| Reply::ok(Vec::new())));
        let entry = |res: io::Result<fuse::EntryOut>| r(res.map(|e| body(|b| e.encode(b))));
        let attr = |res: io::Result<(fuse::Attr, fuse::Timeout)>| {
            r(res.map(|(a, t)| {
                body(|b| {
                    b.u64(t.secs).u32(t.nsecs).u32(0);
                    a.encode(b);
                })
            }))
        };
        let opened = |o: crate::filesystem::Opened, b: &mut Encoder| {
            b.u64(o.fh).u32(o.open_flags).u32(0);
        };
        let xattr = |res: io::Result<XattrReply>| {
            r(res.map(|x| match x {
                XattrReply::Size(n) => body(|b| {
                    b.u32(n).u32(0);
                }),
                XattrReply::Data(d) => Reply::ok(d),
            }))
        };
        match req {
            Request::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => Outcome::Reply(self.init(major, minor, max_readahead, flags)),
            Request::Destroy => {
                fs.destroy();
                self.initialized.store(false, Ordering::Release);
                Outcome::Reply(Reply::ok(Vec::new()))
            }
            Request::Lookup { name } => entry(fs.lookup(ctx, ino, name)),
            Request::Forget { nlookup } => {
                fs.forget(ino, nlookup);
                Outcome::NoReply
            }
            Request::BatchForget { forgets } => {
                for (inode, n) in forgets {
                    fs.forget(inode, n);
                }
                Outcome::NoReply
            }
            Request::Getattr { fh } => attr(fs.getattr(ctx, ino, fh)),
            Request::Setattr(a) => attr(fs.setattr(ctx, ino, &a)),
            Request::Readlink => r(fs.readlink(ctx, ino).map(Reply::ok)),
            Request::Symlink { name, target } => entry(fs.symlink(ctx, ino, name, target)),
            Request::Mknod {
                name,
                mode,
                rdev,
                umask,
            } => entry(fs.mknod(ctx, ino, name, mode, rdev, umask)),
            Request::Mkdir { name, mode, umask } => entry(fs.mkdir(ctx, ino, name, mode, umask)),
            Request::Unlink { name } => empty(fs.unlink(ctx, ino, name)),
            Request::Rmdir { name } => empty(fs.rmdir(ctx, ino, name)),
            Request::Rename {
                newdir,
                flags,
                old,
                new,
            } => empty(fs.rename(ctx, ino, old, newdir, new, flags)),
            Request::Link { oldnodeid, name } => entry(fs.link(ctx, oldnodeid, ino, name)),
            Request::Open { flags, open_flags } => r(fs
                .open(ctx, ino, flags, open_flags)
                .map(|o| body(|b| opened(o, b)))),
            Request::Create {
                name,
                flags,
                mode,
                umask,
                open_flags,
            } => r(fs
                .create(ctx, ino, name, mode, flags, umask, open_flags)
                .map(|(e, o)| {
                    body(|b| {
                        e.encode(b);
                        opened(o, b);
                    })
                })),
            Request::Read { fh, offset, size } => match fs.read_file(ctx, ino, fh) {
                Ok(file) => Outcome::Read { file, offset, size },
                Err(e) => Outcome::Reply(Reply::from_io(e)),
            },
            Request::Write {
                fh,
                offset,
                size,
                write_flags,
            } => match fs.write_file(ctx, ino, fh, write_flags & fuse::WRITE_KILL_SUIDGID != 0) {
                Ok(file) => Outcome::Write { file, offset, size },
                Err(e) => Outcome::Reply(Reply::from_io(e)),
            },
            Request::Statfs => r(fs.statfs(ctx, ino).map(|s| body(|b| s.encode(b)))),
            Request::Release {
                fh,
                flags: _,
                release_flags,
                lock_owner,
            } => empty(fs.release(
                ctx,
                ino,
                fh,
                release_flags & fuse::RELEASE_FLOCK_UNLOCK != 0,
                lock_owner,
            )),
            Request::Flush { fh, lock_owner } => empty(fs.flush(ctx, ino, fh, lock_owner)),
            Request::Fsync { fh, datasync } => empty(fs.fsync(ctx, ino, fh, datasync)),
            Request::Opendir { flags } => {
                r(fs.opendir(ctx, ino, flags).map(|o| body(|b| opened(o, b))))
            }
            Request::Readdir {
                fh,
                offset,
                size,
                plus,
            } => r(fs.readdir(ctx, ino, fh, offset, size, plus).map(Reply::ok)),
            Request::Releasedir { fh } => empty(fs.releasedir(ctx, ino, fh)),
            Request::Fsyncdir { fh, datasync } => empty(fs.fsyncdir(ctx, ino, fh, datasync)),
            Request::Setxattr { name, value, flags } => {
                empty(fs.setxattr(ctx, ino, name, value, flags))
            }
            Request::Getxattr { name, size } => xattr(fs.getxattr(ctx, ino, name, size)),
            Request::Listxattr { size } => xattr(fs.listxattr(ctx, ino, size)),
            Request::Removexattr { name } => empty(fs.removexattr(ctx, ino, name)),
            Request::Getlk(lk) => r(fs.getlk(ctx, ino, &lk).map(|l| body(|b| l.encode(b)))),
            Request::Setlk { lk, wait: false } => empty(fs.setlk(ctx, ino, &lk, false)),
            Request::Setlk { lk, wait: true } => {
                let fs = self.fs.clone();
                let waiters = self.waiters.clone();
                let unique = h.unique;
                Outcome::Blocking(Box::new(move || {
                    let res = waiters.run(unique, || fs.setlk(ctx, ino, &lk, true));
                    Some(
                        res.map(|()| Reply::ok(Vec::new()))
                            .unwrap_or_else(Reply::from_io),
                    )
                }))
            }
            Request::Access { mask } => empty(fs.access(ctx, ino, mask)),
            Request::Interrupt { unique } => {
                // Linux's fuse.rst, "Interrupting filesystem operations": a request we can
                // interrupt (a blocked SETLKW) is answered EINTR and the INTERRUPT gets no
                // reply; every other request finishes soon anyway, which the protocol
                // allows. When the target cannot be found, the INTERRUPT is answered EAGAIN
                // after a grace period, so the kernel sends it again if the target is still
                // pending (it may not have reached us yet) and drops it if it was answered.
                let waiters = self.waiters.clone();
                Outcome::Blocking(Box::new(move || {
                    if waiters.interrupt(unique, INTERRUPT_GRACE) {
                        None
                    } else {
                        Some(Reply::err(libc::EAGAIN))
                    }
                }))
            }
            Request::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => empty(fs.fallocate(ctx, ino, fh, mode, offset, length)),
            Request::Lseek { fh, offset, whence } => {
                r(fs.lseek(ctx, ino, fh, offset, whence).map(|o| {
                    body(|b| {
                        b.u64(o);
                    })
                }))
            }
            Request::CopyFileRange {
                fh_in,
                off_in,
                nodeid_out,
                fh_out,
                off_out,
                len,
                flags,
            } => r(fs
                .copy_file_range(
                    ctx, ino, fh_in, off_in, nodeid_out, fh_out, off_out, len, flags,
                )
                .map(|n| {
                    body(|b| {
                        b.u32(u32::try_from(n).unwrap_or(u32::MAX)).u32(0);
                    })
                })),
            Request::Syncfs => empty(fs.syncfs(ctx, ino)),
            Request::Unsupported(op) => {
                log::debug!("unsupported FUSE opcode {op}: ENOSYS");
                Outcome::Reply(Reply::err(libc::ENOSYS))
            }
        }
    }

    fn init(&self, major: u32, minor: u32, max_readahead: u32, flags: u64) -> Reply {
        if major < fuse::KERNEL_VERSION
            || (major == fuse::KERNEL_VERSION && minor < fuse::MIN_KERNEL_MINOR_VERSION)
        {
            log::error!(
                "guest speaks FUSE {major}.{minor}; we need {}.{}",
                fuse::KERNEL_VERSION,
                fuse::MIN_KERNEL_MINOR_VERSION
            );
            return Reply::err(libc::EPROTO);
        }
        if major > fuse::KERNEL_VERSION {
            // The guest will send INIT again with our major version.
            return body(|b| {
                b.u32(fuse::KERNEL_VERSION)
                    .u32(fuse::KERNEL_MINOR_VERSION)
                    .zeros(56);
            });
        }
        if self.initialized.swap(false, Ordering::AcqRel) {
            log::info!("INIT without DESTROY: resetting the session");
            self.fs.destroy();
        }
        let want = match self.fs.init(flags) {
            Ok(w) => w,
            Err(e) => return Reply::from_io(e),
        };
        let mut out = want
            | if flags & init::INIT_EXT != 0 {
                init::INIT_EXT
            } else {
                0
            };
        if minor < 36 {
            out &= 0xffff_ffff;
        }
        self.initialized.store(true, Ordering::Release);
        body(|b| {
            b.u32(fuse::KERNEL_VERSION)
                .u32(minor.min(fuse::KERNEL_MINOR_VERSION))
                .u32(max_readahead)
                .u32(out as u32)
                .u16(64) // max_background
                .u16(48) // congestion_threshold
                .u32(fuse::MAX_WRITE)
                .u32(1) // time_gran: nanoseconds
                .u16(fuse::MAX_PAGES)
                .u16(0) // map_alignment
                .u32((out >> 32) as u32)
                .zeros(28);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::opcode;

    struct Nothing;
    impl FileSystem for Nothing {}

    fn msg(op: u32, unique: u64, args: &[u8]) -> Vec<u8> {
        let mut m = Encoder::default();
        m.u32((40 + args.len()) as u32)
            .u32(op)
            .u64(unique)
            .u64(1)
            .u32(0)
            .u32(0)
            .u32(1)
            .u32(0)
            .bytes(args);
        m.0
    }

    fn init_msg() -> Vec<u8> {
        let mut a = Encoder::default();
        a.u32(7).u32(36).u32(65536).u32(u32::MAX).u32(0).zeros(44);
        msg(opcode::INIT, 1, &a.0)
    }

    fn reply(o: Outcome) -> Reply {
        match o {
            Outcome::Reply(r) => r,
            _ => panic!("expected a reply"),
        }
    }

    #[test]
    fn requests_before_init_fail_and_unknown_ops_are_enosys() {
        let s = Server::new(Arc::new(Nothing));
        let (_, o) = s.handle(&msg(opcode::GETATTR, 2, &[0; 16]), 0);
        assert_eq!(reply(o).error, -libc::EIO);
        let (_, o) = s.handle(&init_msg(), 0);
        let r = reply(o);
        assert_eq!(r.error, 0);
        assert_eq!(r.body.len(), 64);
        let (_, o) = s.handle(&msg(opcode::GETATTR, 3, &[0; 16]), 0);
        assert_eq!(reply(o).error, -libc::ENOSYS);
        let (_, o) = s.handle(&msg(999, 4, &[]), 0);
        assert_eq!(reply(o).error, -libc::ENOSYS);
    }

    #[test]
    fn malformed_messages_get_an_error_or_are_dropped() {
        let s = Server::new(Arc::new(Nothing));
        s.handle(&init_msg(), 0);
        let (h, o) = s.handle(&msg(opcode::LOOKUP, 5, b"no-nul"), 0);
        assert_eq!(h.unwrap().unique, 5);
        assert_eq!(reply(o).error, -libc::EINVAL);
        let (h, o) = s.handle(&[1, 2, 3], 0);
        assert!(h.is_none());
        assert!(matches!(o, Outcome::NoReply));
        let (_, o) = s.handle(&msg(opcode::FORGET, 6, &[1]), 0);
        assert!(matches!(o, Outcome::NoReply));
    }

    fn run_blocking(o: Outcome) -> Option<Reply> {
        match o {
            Outcome::Blocking(f) => f(),
            _ => panic!("expected a blocking request"),
        }
    }

    #[test]
    fn an_interrupt_of_an_unknown_request_is_answered_eagain_after_a_grace() {
        let s = Server::new(Arc::new(Nothing));
        s.handle(&init_msg(), 0);
        let t = Instant::now();
        let (h, o) = s.handle(&msg(opcode::INTERRUPT, 9, &77u64.to_le_bytes()), 0);
        assert_eq!(h.unwrap().unique, 9);
        assert_eq!(run_blocking(o), Some(Reply::err(libc::EAGAIN)));
        assert!(t.elapsed() >= INTERRUPT_GRACE);
        // A malformed INTERRUPT is dropped.
        let (_, o) = s.handle(&msg(opcode::INTERRUPT, 10, &[1, 2]), 0);
        assert!(matches!(o, Outcome::NoReply));
    }

    /// A thread blocked in a system call as request 42, interruptible like SETLKW.
    fn blocked_waiter(w: &Arc<Waiters>, delay: Duration) -> std::thread::JoinHandle<i32> {
        install_interrupt_handler().unwrap();
        let w = w.clone();
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            w.run(42, || {
                // SAFETY: poll with no descriptors only sleeps.
                let r = unsafe { libc::poll(std::ptr::null_mut(), 0, 20_000) };
                if r < 0 {
                    io::Error::last_os_error().raw_os_error().unwrap_or(0)
                } else {
                    0
                }
            })
        })
    }

    #[test]
    fn interrupt_ends_a_blocked_waiter_even_one_that_registers_late() {
        let w = Arc::new(Waiters::default());
        // Blocked before the INTERRUPT comes.
        let t = blocked_waiter(&w, Duration::ZERO);
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        assert!(w.interrupt(42, INTERRUPT_GRACE));
        assert_eq!(t.join().unwrap(), libc::EINTR);
        assert!(started.elapsed() < Duration::from_secs(5));
        // The INTERRUPT overtook its request: it waits for it within the grace period.
        let t = blocked_waiter(&w, Duration::from_millis(5));
        assert!(w.interrupt(42, Duration::from_secs(5)));
        assert_eq!(t.join().unwrap(), libc::EINTR);
        // Nothing by that id: not found once the grace period is over.
        assert!(!w.interrupt(42, Duration::from_millis(1)));
    }

    #[test]
    fn old_protocols_are_refused() {
        let s = Server::new(Arc::new(Nothing));
        let mut a = Encoder::default();
        a.u32(7).u32(10).u32(0).u32(0);
        let (_, o) = s.handle(&msg(opcode::INIT, 1, &a.0), 0);
        assert_eq!(reply(o).error, -libc::EPROTO);
    }
}
