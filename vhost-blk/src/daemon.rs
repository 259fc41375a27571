//! The daemon's lifecycle: open the disk, listen, serve one frontend at a time and accept the
//! next after a disconnect; on SIGTERM or SIGINT stop taking requests, finish those in
//! flight, flush, and exit.

use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use storage_core::disk::{open_disk, Disk};

use crate::api::ApiServer;
use crate::backend::BlkBackend;
use crate::config::Config;
use crate::device::BlkDevice;
use crate::worker::QueueWorker;
use daemon_support::signals::{
    block_termination_signals, ignore_file_size_signal, spawn_signal_thread,
};
use daemon_support::socket::{self, SocketFile};

/// Shutdown state shared with the signal thread.
struct Control {
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

/// A daemon that has opened its disk and bound its sockets, ready to serve.
pub struct Daemon {
    config: Config,
    device: Arc<BlkDevice>,
    backend: Arc<BlkBackend>,
    listener: UnixListener,
    _socket_file: SocketFile,
    _api: Option<ApiServer>,
    control: Arc<Control>,
}

impl Daemon {
    /// Start-up: everything that can fail because of the user's input fails here.
    pub fn new(config: Config) -> Result<Self> {
        block_termination_signals().context("cannot block termination signals")?;
        ignore_file_size_signal().context("cannot ignore SIGXFSZ")?;
        let disk = open_disk(&config.disk)?;
        let device = Arc::new(BlkDevice::new(
            config.disk.clone(),
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
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Arc::new(BlkBackend::new(device.clone(), workers));
        let api = match &config.api_socket {
            Some(path) => Some(ApiServer::start(path, config.socket_group, device.clone())?),
            None => None,
        };
        let (listener, socket_file) = socket::bind(&config.socket, config.socket_group)?;
        let control = Arc::new(Control {
            wake: EventFd::new(EFD_NONBLOCK).context("cannot create eventfd")?,
            connection: Mutex::new(None),
        });
        let (c, dev) = (control.clone(), device.clone());
        spawn_signal_thread(move |sig| {
            if dev.stopping.swap(true, Ordering::SeqCst) {
                log::warn!("second termination signal: exiting without draining");
                std::process::exit(1);
            }
            log::info!("signal {sig}: draining in-flight requests and shutting down");
            let _ = c.wake.write(1);
            if let Some(h) = lock(&c.connection).take() {
                h.shutdown();
            }
        })
        .context("cannot start the signal thread")?;
        let info = device.info();
        log::info!(
            "serving {} ({} format, {} bytes{}, {} engine) with {} queue(s) of depth {}, polling {} us",
            info.path,
            info.format,
            info.capacity,
            if info.read_only { ", read-only" } else { "" },
            info.engine.name(),
            config.queues,
            config.queue_depth,
            config.poll.as_micros()
        );
        Ok(Daemon {
            _socket_file: socket_file,
            config,
            device,
            backend,
            listener,
            _api: api,
            control,
        })
    }

    /// Serves frontends until a termination signal; then drains and flushes.
    pub fn run(self) -> Result<()> {
        eprintln!("vhost-blk: listening on {}", self.config.socket.display());
        let mut listener = Listener::from(self.listener.try_clone()?);
        while self.wait_for_client()? {
            self.serve_one(&mut listener)?;
        }
        self.backend.drain_all();
        self.device
            .disk
            .flush()
            .context("final flush of the disk failed")?;
        // Let go of what other clients of the storage may wait for (an RBD image and its
        // exclusive lock), as QEMU closes its images on exit.
        self.device.disk.close();
        log::info!("shut down cleanly: requests drained, disk flushed");
        Ok(())
    }

    fn stopping(&self) -> bool {
        self.device.stopping.load(Ordering::SeqCst)
    }

    /// Waits until a frontend connects (true) or the daemon is told to stop (false).
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
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.backend.attach(&mem);
        let mut daemon = VhostUserDaemon::new("vhost-blk".into(), self.backend.clone(), mem)
            .map_err(|e| anyhow::anyhow!("cannot set up the vhost-user handler: {e}"))?;
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some(fd) = self.backend.worker(i).completion_fd() {
                handler
                    .register_listener(
                        fd,
                        EventSet::IN,
                        self.backend.device_event_id(crate::backend::COMPLETIONS),
                    )
                    .context("cannot watch the completion eventfd")?;
            }
        }
        daemon
            .start(listener)
            .map_err(|e| anyhow::anyhow!("cannot accept a frontend: {e}"))?;
        self.device.connected.store(true, Ordering::SeqCst);
        self.device.connections.fetch_add(1, Ordering::Relaxed);
        log::info!("frontend connected");
        *lock(&self.control.connection) = daemon.shutdown_handle();
        if self.stopping() {
            if let Some(h) = lock(&self.control.connection).take() {
                h.shutdown();
            }
        }
        let result = daemon.wait();
        lock(&self.control.connection).take();
        self.device.connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => log::info!("frontend disconnected"),
            Err(e) => log::info!("frontend connection ended: {e}"),
        }
        // Answer what is still in flight before the worker threads go away, then make the
        // data durable: a frontend that is gone can no longer ask for a flush.
        self.backend.drain_all();
        drop(daemon);
        if let Err(e) = self.device.disk.flush() {
            log::error!("flush after disconnect failed: {e}");
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
