//! One disk served: its device, queue workers and vhost-user socket, and the thread that
//! serves one frontend at a time and accepts the next after a disconnect. Stopping it
//! (daemon shutdown or removal through the API) stops taking requests, finishes those in
//! flight, flushes and closes the disk. Nothing here is shared with another disk.

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon, VringEpollHandler};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use storage_core::disk::{open_disk, Disk, Preallocation};
use storage_core::throttle::ThrottleGroup;

use crate::backend::BlkBackend;
use crate::config::DiskConfig;
use crate::device::BlkDevice;
use crate::worker::QueueWorker;
use daemon_support::socket::{self, SocketFile};
use daemon_support::transport::ConfigNotice;

/// The event loops of a connection's worker threads, one per queue.
type Handlers = Vec<Arc<VringEpollHandler<Arc<BlkBackend>>>>;

/// What a stop needs to reach the serving thread, and what adding a node needs to reach
/// the connection's event loops.
struct Control {
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
    /// Set while a frontend is connected (and while it is being set up, under this lock).
    handlers: Mutex<Handlers>,
}

/// A disk being served.
pub struct DiskServer {
    pub config: DiskConfig,
    pub device: Arc<BlkDevice>,
    backend: Arc<BlkBackend>,
    control: Arc<Control>,
    thread: Mutex<Option<JoinHandle<Result<()>>>>,
    resizing: Mutex<()>,
    /// The file system under one of its files is short of space (see `space`).
    pub low_space: std::sync::atomic::AtomicBool,
    pub snapshots: SnapshotStats,
    /// Tells this disk from an earlier one with the same id (its counters start again).
    pub incarnation: u64,
    /// The limits set through the API since start (`config.text.limits` until then).
    limits_text: Mutex<Option<crate::config::LimitsText>>,
    /// The snapshot policy as given and as checked (the config's until the API sets one).
    policy: Mutex<(
        Option<crate::lifecycle::PolicyText>,
        Option<crate::lifecycle::SnapshotPolicy>,
    )>,
    _socket_file: SocketFile,
}

/// Reports a preallocation's progress (done, total); false stops it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> bool;

/// How long a resize waits for the frontend to acknowledge the change.
const NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error("{0}")]
    Disk(storage_core::error::StorageError),
    #[error("the disk grew, but telling the frontend failed: {0}")]
    Notice(std::io::Error),
    #[error("a resize or snapshot of this disk is under way")]
    Busy,
    #[error("a frontend is connected: disconnect it (stop the VM) first")]
    Connected,
}

/// A snapshot taken.
#[derive(Debug)]
pub struct SnapshotTaken {
    /// The file that holds the disk as it was.
    pub file: std::path::PathBuf,
    /// How long the guest's requests waited: queues stopped, in flight answered, the new
    /// image put on top.
    pub pause: std::time::Duration,
}

/// Snapshot counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct SnapshotStats {
    pub taken: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Unix seconds of the last snapshot taken (0: none since start).
    pub last_unix: std::sync::atomic::AtomicU64,
    pub last_pause_us: std::sync::atomic::AtomicU64,
    pub deleted: std::sync::atomic::AtomicU64,
    pub delete_failed: std::sync::atomic::AtomicU64,
    pub reverted: std::sync::atomic::AtomicU64,
    /// By [`SnapshotOp`]: microseconds spent in all of them, and in the last one.
    pub total_us: [std::sync::atomic::AtomicU64; 3],
    pub last_us: [std::sync::atomic::AtomicU64; 3],
}

/// The snapshot operations timed for the metrics.
#[derive(Debug, Clone, Copy)]
pub enum SnapshotOp {
    Create = 0,
    Delete = 1,
    Revert = 2,
}

impl SnapshotOp {
    pub const ALL: [(SnapshotOp, &'static str); 3] = [
        (SnapshotOp::Create, "create"),
        (SnapshotOp::Delete, "delete"),
        (SnapshotOp::Revert, "revert"),
    ];
}

impl SnapshotStats {
    fn timed(&self, op: SnapshotOp, took: std::time::Duration) {
        let us = took.as_micros() as u64;
        self.total_us[op as usize].fetch_add(us, Ordering::Relaxed);
        self.last_us[op as usize].store(us, Ordering::Relaxed);
    }
}

impl DiskServer {
    /// Opens the disk, binds its socket and starts serving. Everything that can fail
    /// because of the user's input fails here.
    /// `open_as`: the spec to open instead of the config's (an admission check's, whose
    /// paths name files it opened itself).
    pub fn start(
        config: DiskConfig,
        open_as: Option<&storage_core::disk::DiskSpec>,
        socket_group: Option<u32>,
    ) -> Result<DiskServer> {
        let id = config.id().to_owned();
        let disk =
            open_disk(open_as.unwrap_or(&config.spec)).with_context(|| format!("disk {id:?}"))?;
        let device = Arc::new(BlkDevice::new(
            id.clone(),
            config.spec.clone(),
            disk,
            config.queues,
            config.queue_size,
            config.queue_depth,
            config.poll,
        ));
        let workers = (0..usize::from(config.queues))
            .map(|i| {
                let queue = device.disk.new_queue(config.queue_depth)?;
                Ok(QueueWorker::new(
                    i,
                    device.clone(),
                    queue,
                    config.queue_depth,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Arc::new(BlkBackend::new(device.clone(), workers));
        let (listener, socket_file) = socket::bind(&config.text.socket, socket_group)
            .with_context(|| format!("disk {id:?}"))?;
        let control = Arc::new(Control {
            wake: EventFd::new(EFD_NONBLOCK).context("cannot create eventfd")?,
            connection: Mutex::new(None),
            handlers: Mutex::new(Vec::new()),
        });
        let info = device.info();
        log::info!(
            "disk {id}: serving {} ({} format, {} bytes{}, {} engine) on {} with {} queue(s) of depth {}, polling {} us",
            info.path,
            info.format,
            info.capacity.get(),
            if info.read_only { ", read-only" } else { "" },
            info.engine.name(),
            config.text.socket.display(),
            config.queues,
            config.queue_depth,
            config.poll.as_micros()
        );
        let serving = Serving {
            device: device.clone(),
            backend: backend.clone(),
            listener,
            control: control.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("disk-{id}"))
            .spawn(move || serving.run())
            .context("cannot start the disk's thread")?;
        let limits_text = config.text.limits.clone();
        let policy = Mutex::new((config.text.snapshot_policy.clone(), config.policy.clone()));
        Ok(DiskServer {
            config,
            device,
            backend,
            control,
            thread: Mutex::new(Some(thread)),
            resizing: Mutex::new(()),
            low_space: std::sync::atomic::AtomicBool::new(false),
            snapshots: SnapshotStats::default(),
            incarnation: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            limits_text: Mutex::new(limits_text),
            policy,
            _socket_file: socket_file,
        })
    }

    pub fn id(&self) -> &str {
        self.config.id()
    }

    /// The disk as its config says now (limits changed through the API included).
    pub fn text(&self) -> crate::config::DiskText {
        let mut text = self.config.text.clone();
        text.limits = lock(&self.limits_text).clone();
        text.snapshot_policy = lock(&self.policy).0.clone();
        text
    }

    pub(crate) fn set_limits_text(&self, limits: Option<crate::config::LimitsText>) {
        *lock(&self.limits_text) = limits;
    }

    pub fn connected(&self) -> bool {
        self.device.connected.load(Ordering::SeqCst)
    }

    /// Grows the disk to `bytes`, then tells the frontend (which tells the guest). The
    /// size is durable before anyone is told.
    /// `None`: the disk already had that size; nothing was done or told. With
    /// `preallocate`, the new space is allocated first (`progress` as for
    /// `Disk::resize_preallocated`), which may take long: a job's work.
    pub fn resize(
        &self,
        bytes: u64,
        preallocate: Option<(Preallocation, Progress<'_>)>,
    ) -> Result<Option<ConfigNotice>, ResizeError> {
        let _one_at_a_time = self.one_change_at_a_time()?;
        if bytes == self.device.capacity() {
            return Ok(None);
        }
        match preallocate {
            None => self.device.disk.resize(bytes),
            Some((mode, progress)) => self.device.disk.resize_preallocated(bytes, mode, progress),
        }
        .map_err(ResizeError::Disk)?;
        log::info!("disk {}: resized to {bytes} bytes", self.id());
        self.backend
            .notify_config_change(NOTICE_WAIT)
            .map(Some)
            .map_err(ResizeError::Notice)
    }

    /// Puts a throttle node of `group` at the root of a disk opened without one, while it
    /// serves: the queues stop (the guest sees a pause, as for a snapshot), each goes under
    /// the node, and the connection's event loops also watch the node's timers. Everything
    /// that can fail (a timerfd, an epoll set, watching them) is done first; a failure
    /// leaves the disk as it was.
    pub fn add_throttle(&self, group: Arc<ThrottleGroup>) -> std::io::Result<()> {
        let handlers = lock(&self.control.handlers);
        if self.device.root_throttle().is_some() {
            return Err(std::io::Error::other(
                "the disk already has a throttle node",
            ));
        }
        let event = self.backend.device_event_id(crate::backend::COMPLETIONS);
        self.backend.paused(|workers| {
            let mut ready = Vec::with_capacity(workers.len());
            let mut watched: Vec<(usize, RawFd)> = Vec::new();
            let made = workers.iter().enumerate().try_for_each(|(i, w)| {
                let wakeup = w.throttle_wakeup()?;
                if let Some(h) = handlers.get(i) {
                    watch(&self.backend, h, wakeup.timer_fd())?;
                    watched.push((i, wakeup.timer_fd()));
                }
                ready.push(wakeup);
                Ok::<_, std::io::Error>(())
            });
            if let Err(e) = made {
                for (i, fd) in watched {
                    let _ = handlers[i].unregister_listener(fd, EventSet::IN, event);
                }
                return Err(e);
            }
            for (w, wakeup) in workers.iter_mut().zip(ready) {
                w.put_under_throttle(wakeup, group.clone());
            }
            let recorded = self.device.set_added_throttle(group);
            debug_assert!(recorded, "checked under the same locks");
            Ok(())
        })?
    }

    /// The lock that keeps resizes and snapshot operations one at a time, or Busy.
    fn one_change_at_a_time(&self) -> Result<std::sync::MutexGuard<'_, ()>, ResizeError> {
        match self.resizing.try_lock() {
            Ok(g) => Ok(g),
            // One that panicked leaves the lock poisoned, not held: go on.
            Err(std::sync::TryLockError::Poisoned(p)) => Ok(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => Err(ResizeError::Busy),
        }
    }

    /// The qcow2 node at the root, which snapshot operations work on.
    fn qcow2(&self) -> Result<&storage_core::qcow2::Qcow2Disk, ResizeError> {
        self.device.disk.qcow2().ok_or_else(|| {
            ResizeError::Disk(storage_core::error::StorageError::new(
                storage_core::error::StorageErrorKind::Unsupported,
                format!(
                    "disk {} is {}: snapshots are of qcow2 disks (format=qcow2)",
                    self.id(),
                    self.device.describe()
                ),
            ))
        })
    }

    /// Deletes snapshot `name` while the guest runs: its data is copied up into the image
    /// above it (`progress(done, total)` in clusters; false stops it), then, with the
    /// queues stopped for a moment, the chain in memory leaves it out; its file goes last.
    pub fn delete_snapshot(
        &self,
        name: &str,
        progress: &mut dyn FnMut(u64, u64) -> bool,
    ) -> Result<std::path::PathBuf, ResizeError> {
        let _one_at_a_time = self.one_change_at_a_time()?;
        let qcow2 = self.qcow2()?;
        let stats = &self.snapshots;
        let started = std::time::Instant::now();
        let result = qcow2
            .stream_snapshot(name, progress)
            .and_then(|mut prepared| {
                let committed = self
                    .backend
                    .paused(|_| qcow2.commit_delete(&mut prepared))
                    .map_err(|e| {
                        storage_core::error::StorageError::new(
                            storage_core::error::StorageErrorKind::Io,
                            format!("stopping the queues to delete the snapshot: {e}"),
                        )
                    })
                    .and_then(|r| r);
                let file = prepared.snapshot_file().to_owned();
                // Out of the chain, or not (the image above no longer names the snapshot on
                // disk: the next start would not see it; what is open stays readable until a
                // retry, which finds nothing more to copy, takes it out): its file goes now.
                if let Err(e) = prepared.remove_file(committed.is_ok()) {
                    log::warn!(
                        "disk {}: snapshot {name:?}: its file {} stays: {e}",
                        self.id(),
                        file.display()
                    );
                }
                committed
            });
        stats.timed(SnapshotOp::Delete, started.elapsed());
        match result {
            Ok(file) => {
                stats.deleted.fetch_add(1, Ordering::Relaxed);
                log::info!("disk {}: snapshot {name:?} deleted", self.id());
                Ok(file)
            }
            Err(e) => {
                if e.kind() != storage_core::error::StorageErrorKind::Cancelled {
                    stats.delete_failed.fetch_add(1, Ordering::Relaxed);
                }
                Err(ResizeError::Disk(e))
            }
        }
    }

    /// Puts the disk back as it was at snapshot `name` (the newer snapshots and what the
    /// guest wrote since are removed): only while no frontend is connected, as a guest
    /// must not see its disk change under it. An error after the disk was reverted (its
    /// directory not synced, the newer snapshots kept) says so.
    pub fn revert_snapshot(&self, name: &str) -> Result<Vec<std::path::PathBuf>, ResizeError> {
        let _one_at_a_time = self.one_change_at_a_time()?;
        let qcow2 = self.qcow2()?;
        if self.connected() {
            return Err(ResizeError::Connected);
        }
        let started = std::time::Instant::now();
        let removed = self
            .backend
            .paused(|_| qcow2.revert_to_snapshot(name))
            .map_err(|e| {
                ResizeError::Disk(storage_core::error::StorageError::new(
                    storage_core::error::StorageErrorKind::Io,
                    format!("stopping the queues to revert: {e}"),
                ))
            })?
            .map_err(ResizeError::Disk)?;
        self.snapshots.reverted.fetch_add(1, Ordering::Relaxed);
        self.snapshots.timed(SnapshotOp::Revert, started.elapsed());
        log::info!(
            "disk {}: reverted to snapshot {name:?}; removed {} newer snapshot(s)",
            self.id(),
            removed.len()
        );
        Ok(removed)
    }

    /// Takes a snapshot named `name` of a qcow2 disk while its guest runs: the queues stop
    /// (requests in flight answered, new ones wait), the image is flushed and frozen under
    /// the snapshot's name with a new image on top (`storage_core::qcow2::Qcow2Disk::
    /// snapshot`), and the queues go on.
    pub fn snapshot(&self, name: &str) -> Result<SnapshotTaken, ResizeError> {
        let started = std::time::Instant::now();
        // Every refusal counts as a failed snapshot (a busy disk, a chain too deep...).
        let taken = self.take_snapshot(name).inspect_err(|_| {
            self.snapshots.failed.fetch_add(1, Ordering::Relaxed);
        });
        self.snapshots.timed(SnapshotOp::Create, started.elapsed());
        taken
    }

    fn take_snapshot(&self, name: &str) -> Result<SnapshotTaken, ResizeError> {
        let _one_at_a_time = self.one_change_at_a_time()?;
        let qcow2 = self.qcow2()?;
        // Checks, the new image, and most of the flushing happen while the guest still
        // runs; the pause then holds only the last flush and two renames.
        let prepared = qcow2.prepare_snapshot(name).map_err(ResizeError::Disk)?;
        let stats = &self.snapshots;
        if let Err(e) = self.device.disk.flush() {
            return Err(ResizeError::Disk(storage_core::error::StorageError::new(
                storage_core::error::StorageErrorKind::Io,
                format!("flushing before the snapshot: {e}"),
            )));
        }
        let started = std::time::Instant::now();
        let result = self
            .backend
            .paused(|_| qcow2.commit_snapshot(prepared))
            .map_err(|e| {
                storage_core::error::StorageError::new(
                    storage_core::error::StorageErrorKind::Io,
                    format!("stopping the queues for the snapshot: {e}"),
                )
            })
            .and_then(|r| r);
        let pause = started.elapsed();
        match result {
            Ok(file) => {
                stats.taken.fetch_add(1, Ordering::Relaxed);
                stats
                    .last_unix
                    .store(crate::history::unix_now() as u64, Ordering::Relaxed);
                stats
                    .last_pause_us
                    .store(pause.as_micros() as u64, Ordering::Relaxed);
                log::info!(
                    "disk {}: snapshot {name:?} in {} (the guest paused {:.2} ms)",
                    self.id(),
                    file.display(),
                    pause.as_secs_f64() * 1000.0
                );
                Ok(SnapshotTaken { file, pause })
            }
            Err(e) => Err(ResizeError::Disk(e)),
        }
    }

    /// What the disk list shows of its snapshots (no file system call: the API's thread
    /// may ask): how many, the last one's time and pause; `None` for a disk not qcow2.
    pub fn snapshot_summary(&self) -> Option<serde_json::Value> {
        let count = self.snapshot_count()?;
        let s = &self.snapshots;
        let last = s.last_unix.load(Ordering::Relaxed);
        Some(serde_json::json!({
            "count": count,
            "last_unix": (last > 0).then_some(last),
            "last_pause_ms": (last > 0).then(|| s.last_pause_us.load(Ordering::Relaxed) as f64 / 1000.0),
            "taken_since_start": s.taken.load(Ordering::Relaxed),
            "failed_since_start": s.failed.load(Ordering::Relaxed),
        }))
    }

    /// How many images of the qcow2 chain are snapshots (named `stem@NAME.qcow2`), from the
    /// chain in memory; `None` for a disk not qcow2.
    pub fn snapshot_count(&self) -> Option<usize> {
        self.device.disk.qcow2()?;
        Some(self.snapshot_names().len())
    }

    /// The names of the disk's snapshots, nearest first, from the chain in memory (no file
    /// system call); none for a disk that is not qcow2.
    pub fn snapshot_names(&self) -> Vec<String> {
        let Some(qcow2) = self.device.disk.qcow2() else {
            return Vec::new();
        };
        let top = std::path::PathBuf::from(self.device.info().path.clone());
        qcow2
            .chain()
            .iter()
            .filter_map(|c| storage_core::qcow2::snapshot_name(&top, std::path::Path::new(&c.path)))
            .collect()
    }

    /// The snapshot policy the disk runs now.
    pub fn snapshot_policy(&self) -> Option<crate::lifecycle::SnapshotPolicy> {
        lock(&self.policy).1.clone()
    }

    pub(crate) fn set_snapshot_policy(
        &self,
        text: Option<crate::lifecycle::PolicyText>,
        policy: Option<crate::lifecycle::SnapshotPolicy>,
    ) {
        *lock(&self.policy) = (text, policy);
    }

    /// The disk's snapshots (the qcow2 chain's images named `stem@NAME.qcow2`), nearest
    /// first; `None` for a disk that is not qcow2.
    pub fn snapshots(&self) -> Option<Vec<serde_json::Value>> {
        let qcow2 = self.device.disk.qcow2()?;
        let top = std::path::PathBuf::from(self.device.info().path.clone());
        Some(
            qcow2
                .chain()
                .into_iter()
                .map(|c| {
                    let path = std::path::PathBuf::from(&c.path);
                    let created = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs());
                    serde_json::json!({
                        "name": storage_core::qcow2::snapshot_name(&top, &path),
                        "file": c.path,
                        "format": c.format,
                        "modified": created,
                    })
                })
                .collect(),
        )
    }

    /// Tells the disk to stop: no new requests; the frontend is disconnected.
    pub fn stop(&self) {
        self.device.stopping.store(true, Ordering::SeqCst);
        let _ = self.control.wake.write(1);
        if let Some(h) = lock(&self.control.connection).take() {
            h.shutdown();
        }
    }

    /// Waits until the disk has drained, flushed and closed (after [`Self::stop`]).
    pub fn join(&self) -> Result<()> {
        let Some(thread) = lock(&self.thread).take() else {
            return Ok(());
        };
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("disk {:?}: its thread panicked", self.id()))?
    }
}

/// What the disk's thread owns.
struct Serving {
    device: Arc<BlkDevice>,
    backend: Arc<BlkBackend>,
    listener: UnixListener,
    control: Arc<Control>,
}

impl Serving {
    /// Serves frontends until stopped; then drains, flushes and closes.
    fn run(self) -> Result<()> {
        let id = self.device.id.clone();
        let mut listener = Listener::from(self.listener.try_clone()?);
        while self.wait_for_client()? {
            self.serve_one(&mut listener)?;
        }
        self.backend.drain_all();
        self.device
            .disk
            .flush()
            .with_context(|| format!("disk {id:?}: final flush failed"))?;
        // Let go of what other clients of the storage may wait for (an RBD image and its
        // exclusive lock), as QEMU closes its images on exit.
        self.device.disk.close();
        log::info!("disk {id}: stopped cleanly: requests drained, disk flushed");
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.device.stopping.load(Ordering::SeqCst)
    }

    /// Waits until a frontend connects (true) or the disk is told to stop (false).
    fn wait_for_client(&self) -> Result<bool> {
        socket::wait_for_client(
            self.listener.as_raw_fd(),
            self.control.wake.as_raw_fd(),
            || self.stopping(),
        )
        .context("poll on the listening socket failed")
    }

    /// Serves one frontend connection until it goes away.
    fn serve_one(&self, listener: &mut Listener) -> Result<()> {
        let id = &self.device.id;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.backend.attach(&mem);
        let mut daemon = VhostUserDaemon::new("vhost-blk".into(), self.backend.clone(), mem)
            .map_err(|e| anyhow::anyhow!("cannot set up the vhost-user handler: {e}"))?;
        {
            // Held until the handlers are kept, so that a throttle node added meanwhile
            // either comes first (and its fd is the queue's) or finds them.
            let mut kept = lock(&self.control.handlers);
            let handlers = daemon.get_epoll_handlers();
            for (i, handler) in handlers.iter().enumerate() {
                let worker = self.backend.worker(i);
                if let Some(fd) = worker.completion_fd() {
                    watch(&self.backend, handler, fd)
                        .context("cannot watch the completion eventfd")?;
                }
                handler
                    .register_listener(
                        worker.wake_fd(),
                        EventSet::IN,
                        self.backend.device_event_id(crate::backend::RESUMED),
                    )
                    .context("cannot watch the worker's wake-up eventfd")?;
            }
            *kept = handlers;
        }
        daemon
            .start(listener)
            .map_err(|e| anyhow::anyhow!("cannot accept a frontend: {e}"))?;
        self.device.connected.store(true, Ordering::SeqCst);
        self.device.connections.fetch_add(1, Ordering::Relaxed);
        log::info!("disk {id}: frontend connected");
        *lock(&self.control.connection) = daemon.shutdown_handle();
        if self.stopping() {
            if let Some(h) = lock(&self.control.connection).take() {
                h.shutdown();
            }
        }
        let result = daemon.wait();
        lock(&self.control.connection).take();
        lock(&self.control.handlers).clear();
        self.device.connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => log::info!("disk {id}: frontend disconnected"),
            Err(e) => log::info!("disk {id}: frontend connection ended: {e}"),
        }
        // Answer what is still in flight before the worker threads go away, then make the
        // data durable: a frontend that is gone can no longer ask for a flush.
        self.backend.drain_all();
        self.backend.detach();
        drop(daemon);
        if let Err(e) = self.device.disk.flush() {
            log::error!("disk {id}: flush after disconnect failed: {e}");
        }
        Ok(())
    }
}

/// Wakes a worker's thread when `fd` is readable, as for its completions.
fn watch(
    backend: &BlkBackend,
    handler: &VringEpollHandler<Arc<BlkBackend>>,
    fd: RawFd,
) -> std::io::Result<()> {
    handler.register_listener(
        fd,
        EventSet::IN,
        backend.device_event_id(crate::backend::COMPLETIONS),
    )
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
