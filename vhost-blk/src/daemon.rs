//! The daemon: the set of disks it serves ([`DiskSet`]: from the config at start, added and
//! removed through the API later), the API, and the lifecycle. On SIGTERM or SIGINT every
//! disk stops taking requests, finishes those in flight and flushes, all at once; then the
//! daemon exits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Config, DiskConfig};
use crate::config_file::ConfigWriter;
use crate::disk_server::DiskServer;
use daemon_support::signals::{
    block_termination_signals, ignore_file_size_signal, spawn_signal_thread,
};
use daemon_support::socket::SocketFile;

/// Why a disk could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("disk {0:?} exists")]
    Exists(String),
    #[error("socket {0} is disk {1:?}'s")]
    SocketTaken(String, String),
    #[error("no disk {0:?}")]
    NotFound(String),
    #[error("disk {0:?} has a frontend connected; remove it with force to disconnect it")]
    InUse(String),
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error("{0:#}")]
    Open(anyhow::Error),
    #[error("{what}, but the config file was not updated: {source}")]
    Persist {
        what: String,
        #[source]
        source: crate::config_file::FileError,
    },
    #[error("disk {id:?} was removed, but stopping it failed: {source:#}")]
    Stop { id: String, source: anyhow::Error },
}

/// The disks a daemon serves.
pub struct DiskSet {
    disks: Mutex<BTreeMap<String, Arc<DiskServer>>>,
    socket_group: Option<u32>,
    writer: Option<ConfigWriter>,
    stopping: AtomicBool,
    pub started: Instant,
}

impl DiskSet {
    fn new(socket_group: Option<u32>, writer: Option<ConfigWriter>) -> Self {
        DiskSet {
            disks: Mutex::new(BTreeMap::new()),
            socket_group,
            writer,
            stopping: AtomicBool::new(false),
            started: Instant::now(),
        }
    }

    /// Whether disks added or removed at run time outlive the process.
    pub fn persistent(&self) -> bool {
        self.writer.is_some()
    }

    pub fn list(&self) -> Vec<Arc<DiskServer>> {
        lock(&self.disks).values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Arc<DiskServer>> {
        lock(&self.disks).get(id).cloned()
    }

    /// Starts serving a disk; `persist` writes it to the config file.
    pub fn add(&self, config: DiskConfig, persist: bool) -> Result<Arc<DiskServer>, SetError> {
        // Held while the disk opens: two adds of one id or socket cannot both pass.
        let mut disks = lock(&self.disks);
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SetError::ShuttingDown);
        }
        let id = config.id().to_owned();
        if disks.contains_key(&id) {
            return Err(SetError::Exists(id));
        }
        if let Some(other) = disks
            .values()
            .find(|d| d.config.text.socket == config.text.socket)
        {
            return Err(SetError::SocketTaken(
                config.text.socket.display().to_string(),
                other.id().to_owned(),
            ));
        }
        let text = config.text.clone();
        let server =
            Arc::new(DiskServer::start(config, self.socket_group).map_err(SetError::Open)?);
        if persist {
            if let Some(w) = &self.writer {
                if let Err(source) = w.add_disk(&text) {
                    server.stop();
                    let _ = server.join();
                    return Err(SetError::Persist {
                        what: format!("disk {id:?} could not be kept"),
                        source,
                    });
                }
            }
        }
        disks.insert(id, server.clone());
        Ok(server)
    }

    /// Stops serving a disk (drain, flush, close) and forgets it. A disk with a frontend
    /// connected is removed only with `force`.
    pub fn remove(&self, id: &str, force: bool) -> Result<(), SetError> {
        let server = {
            let mut disks = lock(&self.disks);
            let Some(server) = disks.get(id) else {
                return Err(SetError::NotFound(id.to_owned()));
            };
            if server.connected() && !force {
                return Err(SetError::InUse(id.to_owned()));
            }
            let server = server.clone();
            disks.remove(id);
            server
        };
        server.stop();
        let stopped = server.join();
        if let Some(w) = &self.writer {
            w.remove_disk(id).map_err(|source| SetError::Persist {
                what: format!("disk {id:?} was removed"),
                source,
            })?;
        }
        stopped.map_err(|source| SetError::Stop {
            id: id.to_owned(),
            source,
        })
    }

    /// Stops every disk at once and waits for all; the first failure is returned.
    fn stop_all(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        let disks = self.list();
        for d in &disks {
            d.stop();
        }
        let mut result = Ok(());
        for d in &disks {
            if let Err(e) = d.join() {
                log::error!("{e:#}");
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

/// A daemon that has opened its disks and bound its sockets, ready to serve.
pub struct Daemon {
    disks: Arc<DiskSet>,
    stop: Arc<EventFd>,
    api: Option<(std::path::PathBuf, SocketFile)>,
}

impl Daemon {
    /// Start-up: everything that can fail because of the user's input fails here.
    pub fn new(config: Config) -> Result<Self> {
        block_termination_signals().context("cannot block termination signals")?;
        ignore_file_size_signal().context("cannot ignore SIGXFSZ")?;
        let writer = config.config_file.clone().map(ConfigWriter::new);
        let disks = Arc::new(DiskSet::new(config.socket_group, writer));
        for d in config.disks.clone() {
            disks.add(d, false).map_err(anyhow::Error::from)?;
        }
        let api = match &config.api_socket {
            Some(path) => Some((
                path.clone(),
                crate::api::start(path, &config, disks.clone())?,
            )),
            None => None,
        };
        let stop = Arc::new(EventFd::new(0).context("cannot create eventfd")?);
        let (s, set) = (stop.clone(), disks.clone());
        spawn_signal_thread(move |sig| {
            if set.stopping.swap(true, Ordering::SeqCst) {
                log::warn!("second termination signal: exiting without draining");
                std::process::exit(1);
            }
            log::info!("signal {sig}: draining in-flight requests and shutting down");
            let _ = s.write(1);
        })
        .context("cannot start the signal thread")?;
        Ok(Daemon { disks, stop, api })
    }

    /// Serves until a termination signal; then every disk drains and flushes.
    pub fn run(self) -> Result<()> {
        for d in self.disks.list() {
            eprintln!(
                "vhost-blk: disk {} listening on {}",
                d.id(),
                d.config.text.socket.display()
            );
        }
        if let Some((path, _)) = &self.api {
            eprintln!("vhost-blk: API listening on {}", path.display());
        }
        self.stop
            .read()
            .context("waiting for a termination signal")?;
        self.disks.stop_all()?;
        log::info!("shut down cleanly: requests drained, disks flushed");
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
