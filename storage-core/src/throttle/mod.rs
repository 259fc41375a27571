//! The throttle node: a filter that holds back reads and writes over its group's IOPS and
//! bandwidth limits (qemu-storage-daemon's `throttle` driver and `throttle-group` object are
//! the model: the same knobs, the same leaky buckets).
//!
//! - [`limits`]: the knobs and their checks.
//! - [`bucket`]: the leaky bucket of one limit.
//! - this module: the [`ThrottleGroup`] that several nodes (of one disk or of several) share,
//!   and the node's control-plane handle, [`ThrottleDisk`].
//! - [`queue`]: one worker's queue. A request over the limit waits in the queue, and a timer
//!   in the worker's event loop (a timerfd among the queue's completion sources) brings the
//!   worker back when it may go: nothing sleeps on the data path.
//!
//! A disk without limits has no throttle node, and so pays nothing.

mod bucket;
mod limits;
mod queue;

pub use bucket::Limit;
pub use limits::{LimitError, ThrottleLimits};
pub use queue::ThrottleQueue;
pub use queue::Wakeup;

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::disk::wakeup::Timer;
use crate::disk::{AnyDisk, Disk, DiskInfo};
use crate::error::{StorageError, StorageErrorKind};
use bucket::Bucket;
use limits::Which;

/// Limits shared by every throttle node that names the group, across disks: what the
/// group's members do together stays under them.
pub struct ThrottleGroup {
    name: String,
    state: Mutex<GroupState>,
    /// Its limits are the management plane's ([`ThrottleGroup::declare`]): members that
    /// name other limits join it anyway.
    declared: std::sync::atomic::AtomicBool,
}

struct GroupState {
    limits: ThrottleLimits,
    buckets: [Bucket; 6],
    last: Instant,
    /// Tickets of the requests at the head of their queue that had to wait, reads ([0])
    /// and writes ([1]): the oldest goes first, so one member cannot starve another by
    /// asking more often (QEMU takes members in turn for the same reason).
    waiting: [Vec<u64>; 2],
    next_ticket: u64,
    /// The members' timers, armed when the limits change.
    timers: Vec<Weak<Timer>>,
}

/// How soon a request that may not go yet only because an older one waits ahead of it
/// (in another member's queue) looks again.
const TURN_WAIT: Duration = Duration::from_micros(200);

/// The process's live groups, by name, so that nodes opened apart find each other.
static GROUPS: Mutex<Vec<Weak<ThrottleGroup>>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ThrottleGroup {
    /// A group of its own, not registered by name (a node given limits and no group).
    pub fn private(limits: ThrottleLimits) -> Arc<ThrottleGroup> {
        Arc::new(ThrottleGroup::new(String::new(), limits))
    }

    fn new(name: String, limits: ThrottleLimits) -> ThrottleGroup {
        ThrottleGroup {
            declared: std::sync::atomic::AtomicBool::new(false),
            name,
            state: Mutex::new(GroupState {
                buckets: limits.limits.map(Bucket::new),
                limits,
                last: Instant::now(),
                waiting: [Vec::new(), Vec::new()],
                next_ticket: 0,
                timers: Vec::new(),
            }),
        }
    }

    /// The live group called `name`, or a new one with `limits`. Naming an existing group
    /// with other limits is an error: a group has one set of limits, changed with
    /// [`set_limits`](Self::set_limits).
    pub fn join(
        name: &str,
        limits: Option<ThrottleLimits>,
    ) -> Result<Arc<ThrottleGroup>, LimitError> {
        let mut groups = lock(&GROUPS);
        groups.retain(|g| g.strong_count() > 0);
        if let Some(g) = groups
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.name == name)
        {
            match limits {
                Some(l)
                    if l != g.limits()
                        && !g.declared.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    Err(LimitError::Conflict(format!(
                        "throttle group {name:?} already exists with other limits"
                    )))
                }
                _ => Ok(g),
            }
        } else {
            let limits = limits.ok_or_else(|| {
                LimitError::Conflict(format!(
                    "throttle group {name:?} has no limits: give them where the group is first \
                     named"
                ))
            })?;
            let g = Arc::new(ThrottleGroup::new(name.to_string(), limits));
            groups.push(Arc::downgrade(&g));
            Ok(g)
        }
    }

    /// A group whose limits are decided here (the management plane's, kept in a config):
    /// made now, or given these limits if it is live; members that name it afterwards join
    /// it whatever limits they carry.
    pub fn declare(name: &str, limits: ThrottleLimits) -> Arc<ThrottleGroup> {
        let mut groups = lock(&GROUPS);
        groups.retain(|g| g.strong_count() > 0);
        let g = match groups
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.name == name)
        {
            Some(g) => {
                g.set_limits(limits);
                g
            }
            None => {
                let g = Arc::new(ThrottleGroup::new(name.to_string(), limits));
                groups.push(Arc::downgrade(&g));
                g
            }
        };
        g.declared.store(true, std::sync::atomic::Ordering::Relaxed);
        g
    }

    /// The live group called `name`, if any (for the management plane).
    pub fn find(name: &str) -> Option<Arc<ThrottleGroup>> {
        lock(&GROUPS)
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.name == name)
    }

    /// The group's name; empty for a private group.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> ThrottleLimits {
        lock(&self.state).limits
    }

    /// Changes the limits at run time. As QEMU does, the buckets start empty under the new
    /// limits, and every member's queue looks at its waiting requests again at once.
    pub fn set_limits(&self, limits: ThrottleLimits) {
        let mut st = lock(&self.state);
        st.limits = limits;
        st.buckets = limits.limits.map(Bucket::new);
        st.last = Instant::now();
        st.timers.retain(|t| t.strong_count() > 0);
        for t in st.timers.iter().filter_map(Weak::upgrade) {
            t.arm(Duration::ZERO);
        }
    }

    /// Registers a member queue's timer, for [`set_limits`](Self::set_limits) to wake.
    pub(crate) fn register(&self, timer: &Arc<Timer>) {
        let mut st = lock(&self.state);
        st.timers.retain(|t| t.strong_count() > 0);
        st.timers.push(Arc::downgrade(timer));
    }

    /// Lets a read or write of `bytes` go now (and charges it), or says how long it must
    /// wait. `ticket` is the request's place in line: given the first time it must wait,
    /// kept while it waits, and handed back when it goes.
    pub(crate) fn admit(
        &self,
        write: bool,
        bytes: u64,
        now: Instant,
        ticket: &mut Option<u64>,
    ) -> Duration {
        let mut st = lock(&self.state);
        let dir = usize::from(write);
        let elapsed = now.saturating_duration_since(st.last);
        st.last = st.last.max(now);
        for b in &mut st.buckets {
            b.leak(elapsed);
        }
        let (bps, iops) = if write {
            (Which::BpsWrite, Which::IopsWrite)
        } else {
            (Which::BpsRead, Which::IopsRead)
        };
        let used = [Which::BpsTotal, bps, Which::IopsTotal, iops];
        let wait = used
            .iter()
            .map(|w| st.buckets[*w as usize].wait())
            .max()
            .unwrap_or_default();
        let first = st.waiting[dir]
            .iter()
            .min()
            .is_none_or(|m| Some(*m) == *ticket);
        if !wait.is_zero() || !first {
            if ticket.is_none() {
                let t = st.next_ticket;
                st.next_ticket += 1;
                st.waiting[dir].push(t);
                *ticket = Some(t);
            }
            return if wait.is_zero() { TURN_WAIT } else { wait };
        }
        if let Some(t) = ticket.take() {
            st.waiting[dir].retain(|w| *w != t);
        }
        {
            let size = st.limits.iops_size;
            let units = if size > 0 && bytes > size {
                bytes as f64 / size as f64
            } else {
                1.0
            };
            for w in used {
                let cost = if (w as usize) < 3 {
                    bytes as f64
                } else {
                    units
                };
                st.buckets[w as usize].account(cost);
            }
        }
        Duration::ZERO
    }

    /// Gives up a place in line (a request that went without the limits: a drain; or a
    /// queue that closed).
    pub(crate) fn leave(&self, write: bool, ticket: &mut Option<u64>) {
        if let Some(t) = ticket.take() {
            lock(&self.state).waiting[usize::from(write)].retain(|w| *w != t);
        }
    }
}

/// A throttle node over any child.
pub struct ThrottleDisk {
    child: AnyDisk,
    group: Arc<ThrottleGroup>,
    info: DiskInfo,
}

impl ThrottleDisk {
    pub fn new(child: AnyDisk, group: Arc<ThrottleGroup>) -> ThrottleDisk {
        let mut info = child.info().clone();
        info.format = "throttle";
        ThrottleDisk { child, group, info }
    }

    pub fn group(&self) -> &Arc<ThrottleGroup> {
        &self.group
    }

    pub fn child(&self) -> &AnyDisk {
        &self.child
    }
}

impl Disk for ThrottleDisk {
    type Queue = ThrottleQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<ThrottleQueue, StorageError> {
        let child = self.child.new_queue(depth)?;
        ThrottleQueue::new(child, self.group.clone(), self.info.capacity.clone(), depth).map_err(
            |e| {
                StorageError::new(StorageErrorKind::Engine, "cannot create throttle queue")
                    .with_source(e)
            },
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.child.flush()
    }

    /// The child grows; this node shares its size.
    fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        self.child.resize(bytes)
    }

    fn resize_preallocated(
        &self,
        bytes: u64,
        mode: crate::disk::Preallocation,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<(), StorageError> {
        self.child.resize_preallocated(bytes, mode, progress)
    }

    fn close(&self) {
        self.child.close()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.child.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.child.write_at(buf, offset)
    }
}

#[cfg(test)]
mod tests;
