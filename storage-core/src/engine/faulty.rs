//! A test engine that injects faults: the synchronous engine underneath, and a shared set of
//! rules that make chosen operations on one device fail, transfer short, or wait until the
//! test releases them (a slow device, without sleeping). Tests of formats and tiers use it
//! to prove what the guest sees when a device misbehaves; it is compiled only for tests.
//!
//! [`Faults`] also records, when asked, every write and sync that reaches each device, in
//! one order across threads: the power-cut tests build crash states from that log.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Completion, EngineFull, EngineKind, EngineOp, FileId, IoEngine, SyncEngine};

/// Which device an engine (or a synchronous call) serves, for matching rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cache,
    Capacity,
}

/// The kind of operation a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Sync,
    Fallocate,
}

impl OpKind {
    fn of(op: &EngineOp) -> OpKind {
        match op {
            EngineOp::Readv { .. } => OpKind::Read,
            EngineOp::Writev { .. } => OpKind::Write,
            EngineOp::Fdatasync { .. } => OpKind::Sync,
            EngineOp::Fallocate { .. } => OpKind::Fallocate,
        }
    }
}

/// What happens to a matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Completes with `-errno` without touching the device.
    Error(i32),
    /// Runs, but reports at most this many bytes (a device that stopped part-way).
    Short(u32),
    /// Waits, not started, until [`Faults::release`].
    Hold,
}

#[derive(Debug)]
struct Rule {
    device: Device,
    op: OpKind,
    fault: Fault,
    /// How many more operations it applies to; `None`: every one.
    left: Option<u32>,
}

/// One write or sync that reached a device, in the recorded log.
#[derive(Debug, Clone)]
pub enum Event {
    Write {
        device: Device,
        offset: u64,
        data: Vec<u8>,
    },
    /// A sync of `device` completed: every write to it logged before index `covers` is
    /// durable.
    Sync { device: Device, covers: usize },
}

/// The rules, shared by every engine of a disk and by the test that drives it.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    /// The log of writes and syncs, while recording.
    log: Mutex<Option<Vec<Event>>>,
    /// Bumped by `release`; each engine runs its held operations when it sees a new value.
    releases: AtomicU64,
    /// Operations that matched a rule.
    hits: AtomicU64,
}

impl Faults {
    /// Adds a rule for the next `times` matching operations (`None`: all of them).
    pub fn add(&self, device: Device, op: OpKind, fault: Fault, times: Option<u32>) {
        self.rules.lock().unwrap().push(Rule {
            device,
            op,
            fault,
            left: times,
        });
    }

    /// Removes every rule (held operations stay held until `release`).
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Lets every held operation run at its engine's next call.
    pub fn release(&self) {
        self.releases.fetch_add(1, Ordering::SeqCst);
    }

    /// Operations that matched a rule so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// The fault for an operation of `op` on `device`, consuming one use of its rule.
    pub fn take(&self, device: Device, op: OpKind) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let i = rules
            .iter()
            .position(|r| r.device == device && r.op == op && r.left != Some(0))?;
        if let Some(n) = rules[i].left.as_mut() {
            *n -= 1;
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        Some(rules[i].fault)
    }

    /// Starts recording writes and syncs (from an empty log).
    pub fn start_recording(&self) {
        *self.log.lock().unwrap() = Some(Vec::new());
    }

    /// Stops recording; returns the log.
    pub fn take_log(&self) -> Vec<Event> {
        self.log.lock().unwrap().take().unwrap_or_default()
    }

    /// The log's length now: a point in it, for the test's own marks.
    pub fn mark(&self) -> usize {
        self.log.lock().unwrap().as_ref().map_or(0, Vec::len)
    }

    pub fn record_write(&self, device: Device, offset: u64, data: &[u8]) {
        if let Some(log) = self.log.lock().unwrap().as_mut() {
            log.push(Event::Write {
                device,
                offset,
                data: data.to_vec(),
            });
        }
    }

    /// A sync is about to start; pass the result to [`record_sync`](Self::record_sync).
    pub fn sync_started(&self) -> usize {
        self.mark()
    }

    pub fn record_sync(&self, device: Device, started: usize) {
        if let Some(log) = self.log.lock().unwrap().as_mut() {
            log.push(Event::Sync {
                device,
                covers: started,
            });
        }
    }

    /// Records what a data operation is about to write (before the engine runs it).
    fn record_op(&self, device: Device, op: &EngineOp) {
        let mut guard = self.log.lock().unwrap();
        let Some(log) = guard.as_mut() else {
            return;
        };
        match *op {
            EngineOp::Writev {
                offset,
                iov,
                iovcnt,
                ..
            } => {
                let mut data = Vec::new();
                for i in 0..iovcnt as usize {
                    // SAFETY: `push`'s caller keeps `iovcnt` iovecs at `iov` valid, each
                    // describing readable memory, until the operation completes.
                    let v = unsafe { *iov.add(i) };
                    // SAFETY: as above, `iov_base` holds `iov_len` readable bytes.
                    data.extend_from_slice(unsafe {
                        std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len)
                    });
                }
                log.push(Event::Write {
                    device,
                    offset,
                    data,
                });
            }
            // Zeroing and hole punching read back as zeroes (KEEP_SIZE: the size stays).
            EngineOp::Fallocate { offset, len, .. } => log.push(Event::Write {
                device,
                offset,
                data: vec![0; len as usize],
            }),
            EngineOp::Fdatasync { .. } => {
                let covers = log.len();
                log.push(Event::Sync { device, covers });
            }
            EngineOp::Readv { .. } => {}
        }
    }

    /// The error a synchronous call (a sync on a background thread) of `op` on `device`
    /// fails with, if a rule says it fails.
    pub fn injected(&self, device: Device, op: OpKind) -> Option<io::Error> {
        match self.take(device, op)? {
            Fault::Error(errno) => Some(io::Error::from_raw_os_error(errno)),
            Fault::Short(_) => Some(io::Error::from(io::ErrorKind::WriteZero)),
            Fault::Hold => None,
        }
    }
}

/// The synchronous engine with [`Faults`] applied to one device's operations.
pub struct FaultyEngine {
    inner: SyncEngine,
    device: Device,
    faults: Arc<Faults>,
    held: Vec<(EngineOp, u64)>,
    done: VecDeque<Completion>,
    releases_seen: u64,
    capacity: usize,
}

// SAFETY: the held operations' iovec pointers are used only by whichever thread owns the
// engine, and `push`'s contract keeps what they point to valid until their completions are
// popped, whichever thread that is (the same holds for every engine).
unsafe impl Send for FaultyEngine {}

impl FaultyEngine {
    pub fn new(depth: u32, device: Device, faults: Arc<Faults>) -> FaultyEngine {
        let releases_seen = faults.releases.load(Ordering::SeqCst);
        FaultyEngine {
            inner: SyncEngine::new(depth),
            device,
            faults,
            held: Vec::new(),
            done: VecDeque::new(),
            releases_seen,
            capacity: depth.max(1) as usize,
        }
    }

    /// Runs the held operations once the test has released them.
    fn run_released(&mut self) {
        let now = self.faults.releases.load(Ordering::SeqCst);
        if now == self.releases_seen {
            return;
        }
        self.releases_seen = now;
        for (op, user_data) in std::mem::take(&mut self.held) {
            self.faults.record_op(self.device, &op);
            // SAFETY: `push`'s caller keeps the buffers valid until this operation's
            // completion is popped, which has not happened yet.
            if unsafe { self.inner.push(op, user_data) }.is_err() {
                self.done.push_back(Completion {
                    user_data,
                    result: -libc::EIO,
                });
            }
        }
    }
}

impl IoEngine for FaultyEngine {
    fn register_file(&mut self, fd: RawFd) -> io::Result<FileId> {
        self.inner.register_file(fd)
    }

    unsafe fn push(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull> {
        if self.in_flight() >= self.capacity {
            return Err(EngineFull);
        }
        match self.faults.take(self.device, OpKind::of(&op)) {
            None => {
                self.faults.record_op(self.device, &op);
                // SAFETY: the caller upholds `push`'s contract for this operation.
                unsafe { self.inner.push(op, user_data) }
            }
            Some(Fault::Error(errno)) => {
                self.done.push_back(Completion {
                    user_data,
                    result: -errno,
                });
                Ok(())
            }
            Some(Fault::Short(bytes)) => {
                // SAFETY: as above.
                unsafe { self.inner.push(op, user_data) }?;
                let mut c = self
                    .inner
                    .pop_completion()
                    .expect("sync engine completes inline");
                if c.result > bytes as i32 {
                    c.result = bytes as i32;
                }
                self.done.push_back(c);
                Ok(())
            }
            Some(Fault::Hold) => {
                self.held.push((op, user_data));
                Ok(())
            }
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.run_released();
        Ok(())
    }

    fn pop_completion(&mut self) -> Option<Completion> {
        self.run_released();
        self.done
            .pop_front()
            .or_else(|| self.inner.pop_completion())
    }

    fn wait(&mut self) -> io::Result<()> {
        self.run_released();
        if self.done.is_empty() && self.inner.in_flight() == 0 && !self.held.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn ack_completion_fd(&self) {}

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len() + self.done.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }
}
