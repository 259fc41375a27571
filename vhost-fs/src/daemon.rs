//! The daemon's lifecycle: open the share, bind the sockets, enter the sandbox, serve one
//! frontend, and exit when it disconnects (as virtiofsd does); on SIGTERM or SIGINT stop
//! taking requests, finish those in flight and exit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use daemon_support::signals::{
    block_termination_signals, ignore_file_size_signal, spawn_signal_thread,
};
use daemon_support::socket::{self, SocketFile};
use storage_core::engine::{new_engine, EngineKind};

use crate::backend::FsBackend;
use crate::config::{Config, Listen, Sandbox};
use crate::device::FsDevice;
use crate::filesystem::FileSystem;
use crate::passthrough::InodeFileHandles;
use crate::passthrough::{creds, PassthroughConfig, PassthroughFs};
use crate::pool::ThreadPool;
use crate::read_only::ReadOnly;
use crate::server::{self, Server};
use crate::worker::QueueWorker;
use crate::{api, capabilities, sandbox, seccomp};

/// Request slots of the high-priority queue.
const HIPRIO_DEPTH: u32 = 8;

struct Control {
    wake: EventFd,
    connection: Mutex<Option<ShutdownHandle>>,
}

pub struct Daemon {
    config: Config,
    device: Arc<FsDevice>,
    backend: Arc<FsBackend>,
    listener: UnixListener,
    _socket_file: Option<SocketFile>,
    _api_file: Option<SocketFile>,
    control: Arc<Control>,
}

fn open_dir(path: &std::path::Path, flags: i32) -> Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is NUL-terminated; the result is checked.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot open {}", path.display()));
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Daemon {
    /// Start-up: everything that can fail because of the user's input fails here.
    pub fn new(config: Config) -> Result<Self> {
        // SAFETY: umask has no preconditions. Modes the guest asks for are applied as given
        // (the sockets set their own modes, whatever the umask).
        unsafe { libc::umask(0) };
        if config.sandbox == Sandbox::Namespace {
            // First, while this is the only thread: everything after runs in the child.
            sandbox::fork_into_pid_namespace()?;
        }
        let nofile =
            sandbox::set_nofile(config.rlimit_nofile).context("cannot set the open-file limit")?;
        let root_fd = open_dir(&config.shared_dir, libc::O_PATH)?;
        // The synchronous engine where io_uring is missing, and for shares on tmpfs, where
        // io_uring would hand every read to a worker thread (see storage-core's factory).
        let engine_kind = storage_core::disk::engine_for_path(&config.shared_dir);
        if engine_kind == EngineKind::Sync {
            log::info!("file data goes through the synchronous engine");
        }
        // Opened before the sandbox hides /proc (a namespace sandbox opens its own instead):
        // files are reopened through it.
        let proc_fd = open_dir(std::path::Path::new("/proc/self/fd"), libc::O_PATH)?;
        let (listener, socket_file) = match &config.listen {
            Listen::Path(p) => {
                let (l, f) = socket::bind(p, config.socket_group)?;
                (l, Some(f))
            }
            Listen::Fd(fd) => {
                let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
                // SAFETY: `st` is a valid out-buffer.
                if unsafe { libc::fstat(*fd, st.as_mut_ptr()) } != 0
                    // SAFETY: fstat succeeded, so `st` is initialised.
                    || unsafe { st.assume_init() }.st_mode & libc::S_IFMT != libc::S_IFSOCK
                {
                    bail!("--fd {fd}: not an open socket");
                }
                // SAFETY: the user handed us this listening socket to own.
                (unsafe { UnixListener::from_raw_fd(*fd) }, None)
            }
        };
        let api = match &config.api_socket {
            Some(p) => Some(socket::bind(p, config.socket_group)?),
            None => None,
        };
        // Inside a namespace sandbox, /proc/self/fd is opened anew from there.
        let proc_fd = sandbox::enter(config.sandbox, &config.shared_dir)?.unwrap_or(proc_fd);
        let root_fd = match config.sandbox {
            Sandbox::None => root_fd,
            // The share is the process's root now: opened anew from there, so the kernel
            // clamps `..` at it too (the one opened before is on the host's mount, above
            // which `..` would lead), not only our own checks.
            Sandbox::Namespace | Sandbox::Chroot => {
                drop(root_fd);
                open_dir(std::path::Path::new("/"), libc::O_PATH)?
            }
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            creds::drop_supplementary_groups().context("cannot drop supplementary groups")?;
        }
        // Before any thread starts: they inherit what is left.
        let handles = config.inode_file_handles != InodeFileHandles::Never;
        capabilities::keep_only(&capabilities::kept(handles, &config.modcaps))?;
        block_termination_signals().context("cannot block termination signals")?;
        // A guest write past RLIMIT_FSIZE must fail with EFBIG, not kill the daemon.
        ignore_file_size_signal().context("cannot ignore SIGXFSZ")?;
        server::install_interrupt_handler().context("cannot install the interrupt handler")?;

        let passthrough = Arc::new(PassthroughFs::new(
            root_fd,
            proc_fd,
            PassthroughConfig {
                cache: config.cache,
                xattr: config.xattr,
                announce_submounts: config.announce_submounts,
                uid_map: config.uid_map.clone(),
                gid_map: config.gid_map.clone(),
                switch_creds: root,
                inode_file_handles: config.inode_file_handles,
                readonly: config.readonly,
            },
        )?);
        let fs: Arc<dyn FileSystem> = if config.readonly {
            Arc::new(ReadOnly(passthrough.clone()))
        } else {
            passthrough.clone()
        };
        let mut device = FsDevice::new(
            Server::new(fs),
            passthrough,
            config.shared_dir.display().to_string(),
            config.tag.clone(),
            config.readonly,
            config.queues,
            config.queue_size,
            config.queue_depth,
            engine_kind.name(),
        );
        device.poll = config.poll;
        let device = Arc::new(device);
        // Started after the sandbox and with the termination signals blocked: its threads
        // inherit both.
        let pool = match config.thread_pool_size {
            0 => None,
            n => Some(Arc::new(
                ThreadPool::new(n).context("cannot start the thread pool")?,
            )),
        };
        let workers = (0..device.num_queues())
            .map(|i| {
                // The high-priority queue carries FORGET and INTERRUPT only: no data, but a
                // few slots so an INTERRUPT waiting for its target does not hold up FORGETs.
                let depth = if i == 0 {
                    HIPRIO_DEPTH
                } else {
                    config.queue_depth
                };
                let engine =
                    new_engine(engine_kind, depth).context("cannot create an I/O engine")?;
                QueueWorker::new(i, device.clone(), engine, depth, pool.clone())
                    .context("cannot create a queue worker")
            })
            .collect::<Result<Vec<_>>>()?;
        let backend = Arc::new(FsBackend::new(device.clone(), workers));
        let api_file = match api {
            Some((l, f)) => {
                api::spawn(l, config.socket_group, device.clone())
                    .context("cannot start the API thread")?;
                Some(f)
            }
            None => None,
        };
        let control = Arc::new(Control {
            wake: EventFd::new(EFD_NONBLOCK).context("cannot create eventfd")?,
            connection: Mutex::new(None),
        });
        let (c, dev) = (control.clone(), device.clone());
        let first = std::sync::OnceLock::<std::time::Instant>::new();
        spawn_signal_thread(move |sig| {
            if dev.stopping.swap(true, Ordering::SeqCst) {
                // One stop can arrive twice: from whoever stops the whole group (systemd
                // signals every process of the unit) and again from the sandbox's monitor,
                // which passes signals on. Only a later one means "now".
                if first
                    .get()
                    .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(2))
                {
                    return;
                }
                log::warn!("second termination signal: exiting at once");
                std::process::exit(1);
            }
            let _ = first.set(std::time::Instant::now());
            log::info!("signal {sig}: finishing in-flight requests and shutting down");
            let _ = c.wake.write(1);
            if let Some(h) = lock(&c.connection).take() {
                h.shutdown();
            }
        })
        .context("cannot start the signal thread")?;
        log::info!(
            "sharing {}{} with {} request queue(s) of depth {}, {}, cache {:?}, sandbox {:?}, {} engine, up to {nofile} open files",
            config.shared_dir.display(),
            if config.readonly { " read-only" } else { "" },
            config.queues,
            config.queue_depth,
            match config.thread_pool_size {
                0 => "blocking requests on the queue threads".to_string(),
                n => format!("blocking requests on a pool of {n} threads"),
            },
            config.cache,
            config.sandbox,
            engine_kind.name(),
        );
        // Last, with every thread started: the filter covers them all.
        seccomp::install(config.seccomp)?;
        Ok(Daemon {
            config,
            device,
            backend,
            listener,
            _socket_file: socket_file,
            _api_file: api_file,
            control,
        })
    }

    /// Serves one frontend; returns when it disconnects or a signal stops the daemon.
    pub fn run(self) -> Result<()> {
        match &self.config.listen {
            Listen::Path(p) => eprintln!("vhost-fs: listening on {}", p.display()),
            Listen::Fd(fd) => eprintln!("vhost-fs: listening on fd {fd}"),
        }
        if !self.wait_for_client()? {
            return Ok(());
        }
        let mut listener = Listener::from(self.listener.try_clone()?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        self.backend.attach(&mem);
        let mut daemon = VhostUserDaemon::new("vhost-fs".into(), self.backend.clone(), mem)
            .map_err(|e| anyhow::anyhow!("cannot set up the vhost-user handler: {e}"))?;
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            let worker = self.backend.worker(i);
            if let Some(fd) = worker.completion_fd() {
                handler
                    .register_listener(
                        fd,
                        EventSet::IN,
                        self.backend.device_event_id(crate::backend::COMPLETIONS),
                    )
                    .context("cannot watch the completion eventfd")?;
            }
            handler
                .register_listener(
                    worker.deferred_fd(),
                    EventSet::IN,
                    self.backend.device_event_id(crate::backend::DEFERRED),
                )
                .context("cannot watch the deferred-reply eventfd")?;
        }
        daemon
            .start(&mut listener)
            .map_err(|e| anyhow::anyhow!("cannot accept a frontend: {e}"))?;
        self.device.connected.store(true, Ordering::SeqCst);
        self.device.connections.fetch_add(1, Ordering::Relaxed);
        log::info!("frontend connected");
        *lock(&self.control.connection) = daemon.shutdown_handle();
        if self.device.stopping.load(Ordering::SeqCst) {
            if let Some(h) = lock(&self.control.connection).take() {
                h.shutdown();
            }
        }
        let result = daemon.wait();
        lock(&self.control.connection).take();
        self.device.connected.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => log::info!("frontend disconnected; exiting"),
            Err(e) => log::info!("frontend connection ended ({e}); exiting"),
        }
        self.backend.drain_all();
        Ok(())
    }

    fn wait_for_client(&self) -> Result<bool> {
        socket::wait_for_client(
            self.listener.as_raw_fd(),
            self.control.wake.as_raw_fd(),
            || self.device.stopping.load(Ordering::SeqCst),
        )
        .context("poll on the listening socket failed")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
