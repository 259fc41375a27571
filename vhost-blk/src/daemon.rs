//! The daemon: the set of disks it serves ([`DiskSet`]: from the config at start, added and
//! removed through the API later), the API, and the lifecycle. On SIGTERM or SIGINT every
//! disk stops taking requests, finishes those in flight and flushes, all at once; then the
//! daemon exits.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{parse_limits, Config, DiskConfig, LimitsText};
use crate::config_file::ConfigWriter;
use crate::disk_server::DiskServer;
use daemon_support::signals::{
    block_termination_signals, ignore_file_size_signal, spawn_signal_thread,
};
use daemon_support::socket::SocketFile;
use storage_core::throttle::ThrottleGroup;

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
    #[error("{0}")]
    BadLimits(String),
    #[error("disk {0:?}: snapshot-policy: {1}")]
    BadPolicy(String, String),
    #[error("{0}")]
    Forbidden(String),
    #[error("disk {0:?} has a job running ({1}): wait for it or cancel it")]
    JobRunning(String, String),
    #[error("{0}")]
    Job(String),
    #[error("disk {0:?}: {1}")]
    AddThrottle(String, std::io::Error),
    #[error("disk {0:?}'s limits are throttle group {1:?}'s: set the group's limits")]
    GroupLimits(String, String),
    #[error("no disk uses a throttle group {0:?}")]
    NoGroup(String),
}

/// The disks a daemon serves.
pub struct DiskSet {
    state: Mutex<SetState>,
    /// Signalled when an add or a removal finishes.
    settled: Condvar,
    socket_group: Option<u32>,
    writer: Option<ConfigWriter>,
    operator_paths: crate::admission::OperatorPaths,
    stopping: AtomicBool,
    pub started: Instant,
    /// Long operations on the disks (a preallocating resize).
    pub jobs: daemon_support::jobs::Jobs,
    /// Limit changes take turns (applied and written in one order).
    limits_order: Mutex<()>,
}

#[derive(Default)]
struct SetState {
    disks: BTreeMap<String, Arc<DiskServer>>,
    /// Ids and sockets of disks being added or removed: taken, though not served. The lock
    /// is not held while a disk opens or drains, which may take long (or forever: a stuck
    /// NFS mount), so the API keeps answering.
    busy: Vec<(String, PathBuf)>,
}

impl SetState {
    fn release(&mut self, id: &str) {
        self.busy.retain(|(i, _)| i != id);
    }
}

impl DiskSet {
    fn new(config: &Config) -> Self {
        DiskSet {
            state: Mutex::new(SetState::default()),
            settled: Condvar::new(),
            socket_group: config.socket_group,
            writer: config.config_file.clone().map(ConfigWriter::new),
            operator_paths: config.operator_paths.clone(),
            stopping: AtomicBool::new(false),
            started: Instant::now(),
            jobs: Default::default(),
            limits_order: Mutex::new(()),
        }
    }

    /// Where an operator's disks may have their files and sockets.
    pub fn operator_paths(&self) -> &crate::admission::OperatorPaths {
        &self.operator_paths
    }

    /// The config file's writer for `disk`'s changes: none without a file, or for a disk
    /// the file does not keep (one given its passphrase through the API).
    fn writer_for(&self, disk: &DiskConfig) -> Option<&ConfigWriter> {
        self.writer.as_ref().filter(|_| disk.in_file)
    }

    /// Whether disks added or removed at run time outlive the process.
    pub fn persistent(&self) -> bool {
        self.writer.is_some()
    }

    pub fn list(&self) -> Vec<Arc<DiskServer>> {
        lock(&self.state).disks.values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Arc<DiskServer>> {
        lock(&self.state).disks.get(id).cloned()
    }

    /// Starts serving a disk; `persist` writes it to the config file.
    pub fn add(
        &self,
        config: DiskConfig,
        open_as: Option<&storage_core::disk::DiskSpec>,
        persist: bool,
    ) -> Result<Arc<DiskServer>, SetError> {
        let id = config.id().to_owned();
        let socket = config.text.socket.clone();
        {
            let mut st = lock(&self.state);
            if self.stopping.load(Ordering::SeqCst) {
                return Err(SetError::ShuttingDown);
            }
            if st.disks.contains_key(&id) || st.busy.iter().any(|(i, _)| *i == id) {
                return Err(SetError::Exists(id));
            }
            let taken_by = st
                .disks
                .values()
                .find(|d| d.config.text.socket == socket)
                .map(|d| d.id().to_owned())
                .or_else(|| {
                    st.busy
                        .iter()
                        .find(|(_, s)| *s == socket)
                        .map(|(i, _)| i.clone())
                });
            if let Some(other) = taken_by {
                return Err(SetError::SocketTaken(socket.display().to_string(), other));
            }
            st.busy.push((id.clone(), socket));
        }
        let result = self.start_and_keep(config, open_as, persist);
        let mut st = lock(&self.state);
        if let Ok(server) = &result {
            if self.stopping.load(Ordering::SeqCst) {
                // Shutdown began after the check: not served after all (drained and flushed
                // before its id and socket are let go, so shutdown waits for it).
                drop(st);
                server.stop();
                let _ = server.join();
                st = lock(&self.state);
                st.release(&id);
                self.settled.notify_all();
                return Err(SetError::ShuttingDown);
            }
            st.disks.insert(id.clone(), server.clone());
        }
        st.release(&id);
        self.settled.notify_all();
        result
    }

    fn start_and_keep(
        &self,
        config: DiskConfig,
        open_as: Option<&storage_core::disk::DiskSpec>,
        persist: bool,
    ) -> Result<Arc<DiskServer>, SetError> {
        let id = config.id().to_owned();
        let text = config.text.clone();
        let server = Arc::new(
            DiskServer::start(config, open_as, self.socket_group).map_err(SetError::Open)?,
        );
        if self.stopping.load(Ordering::SeqCst) {
            // Not kept either: it would come back at the next start.
            server.stop();
            let _ = server.join();
            return Err(SetError::ShuttingDown);
        }
        if let (true, Some(w)) = (persist, self.writer_for(&server.config)) {
            if let Err(source) = w.add_disk(&text) {
                server.stop();
                let _ = server.join();
                return Err(SetError::Persist {
                    what: format!("disk {id:?} could not be kept"),
                    source,
                });
            }
        }
        Ok(server)
    }

    /// Whether a job is running on disk `id`.
    pub fn has_running_job(&self, id: &str) -> bool {
        self.jobs
            .list()
            .iter()
            .any(|j| j.object == id && j.state() == daemon_support::jobs::JobState::Running)
    }

    /// Starts a job on a disk, under the set's lock: not on a disk being removed, nor once
    /// shutdown began (a removal checks for jobs under the same lock).
    pub fn start_disk_job(
        &self,
        id: &str,
        kind: &'static str,
        total: u64,
        work: impl FnOnce(&daemon_support::jobs::Progress<'_>) -> daemon_support::jobs::Outcome
            + Send
            + 'static,
    ) -> Result<Arc<daemon_support::jobs::Job>, SetError> {
        let st = lock(&self.state);
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SetError::ShuttingDown);
        }
        if !st.disks.contains_key(id) {
            return Err(SetError::NotFound(id.to_owned()));
        }
        self.jobs
            .start(kind, id, total, work)
            .map_err(|e| SetError::Job(e.to_string()))
    }

    /// Stops serving a disk (drain, flush, close) and forgets it. A disk with a frontend
    /// connected is removed only with `force`, and only by a caller who `may_disconnect`
    /// (decided here, under the lock, so that a frontend connecting meanwhile counts).
    pub fn remove(&self, id: &str, force: bool, may_disconnect: bool) -> Result<(), SetError> {
        let server =
            {
                let mut st = lock(&self.state);
                let Some(server) = st.disks.get(id).cloned() else {
                    return Err(SetError::NotFound(id.to_owned()));
                };
                if let Some(j) = self.jobs.list().into_iter().find(|j| {
                    j.object == id && j.state() == daemon_support::jobs::JobState::Running
                }) {
                    return Err(SetError::JobRunning(id.to_owned(), j.id.clone()));
                }
                if server.connected() {
                    if !force {
                        return Err(SetError::InUse(id.to_owned()));
                    }
                    if !may_disconnect {
                        return Err(SetError::Forbidden(format!(
                            "removing disk {id:?} while a frontend uses it needs the admin role"
                        )));
                    }
                }
                st.disks.remove(id);
                // Taken until the file says it is gone: an add of the same id meanwhile would
                // be removed from the file with it.
                st.busy
                    .push((id.to_owned(), server.config.text.socket.clone()));
                server
            };
        server.stop();
        let stopped = server.join();
        let kept = match self.writer_for(&server.config) {
            Some(w) => w.remove_disk(id).map_err(|source| SetError::Persist {
                what: format!("disk {id:?} was removed"),
                source,
            }),
            None => Ok(()),
        };
        // The socket file goes with the last reference, before the socket is free again.
        drop(server);
        {
            let mut st = lock(&self.state);
            st.release(id);
            self.settled.notify_all();
        }
        kept?;
        stopped.map_err(|source| SetError::Stop {
            id: id.to_owned(),
            source,
        })
    }

    /// Changes a disk's own limits (its private throttle node's) and keeps them.
    pub fn set_disk_limits(&self, id: &str, text: LimitsText) -> Result<(), SetError> {
        let limits = parse_limits(&text).map_err(|e| SetError::BadLimits(e.to_string()))?;
        // Held so that two changes are written in the order they were made (not the set's
        // lock: the file write may be slow, and the API reads the set meanwhile).
        let _order = lock(&self.limits_order);
        let d = self
            .get(id)
            .ok_or_else(|| SetError::NotFound(id.to_owned()))?;
        match d.device.root_throttle() {
            Some(group) if !group.name().is_empty() => {
                return Err(SetError::GroupLimits(
                    id.to_owned(),
                    group.name().to_owned(),
                ));
            }
            Some(group) => group.set_limits(limits),
            // Opened without one: a throttle node goes on top while it serves, as QEMU's
            // block_set_io_throttle enables throttling on a running device.
            None => d
                .add_throttle(ThrottleGroup::private(limits))
                .map_err(|e| SetError::AddThrottle(id.to_owned(), e))?,
        }
        d.set_limits_text(Some(text.clone()));
        if let Some(w) = self.writer_for(&d.config) {
            w.set_disk_limits(id, Some(&text))
                .map_err(|source| SetError::Persist {
                    what: format!("disk {id:?}'s limits changed"),
                    source,
                })?;
        }
        log::info!("disk {id}: limits set to {text:?}");
        Ok(())
    }

    /// Sets (or, with `None`, removes) a disk's snapshot policy and keeps it; the policy
    /// thread follows at its next pass.
    pub fn set_snapshot_policy(
        &self,
        id: &str,
        text: Option<crate::lifecycle::PolicyText>,
    ) -> Result<(), SetError> {
        let _order = lock(&self.limits_order);
        let d = self
            .get(id)
            .ok_or_else(|| SetError::NotFound(id.to_owned()))?;
        let policy = match &text {
            Some(t) => Some(
                crate::config::check_policy(&d.config.spec, d.config.text.added_by_operator, t)
                    .map_err(|e| SetError::BadPolicy(id.to_owned(), e))?,
            ),
            None => None,
        };
        d.set_snapshot_policy(text.clone(), policy);
        if let Some(w) = self.writer_for(&d.config) {
            w.set_disk_policy(id, text.as_ref())
                .map_err(|source| SetError::Persist {
                    what: format!("disk {id:?}'s snapshot policy changed"),
                    source,
                })?;
        }
        log::info!("disk {id}: snapshot policy set to {text:?}");
        Ok(())
    }

    /// The named throttle groups the disks use, with their members.
    pub fn groups(&self) -> Vec<(Arc<ThrottleGroup>, Vec<String>)> {
        let mut out: Vec<(Arc<ThrottleGroup>, Vec<String>)> = Vec::new();
        for d in self.list() {
            let Some(g) = d.device.throttle_group() else {
                continue;
            };
            if g.name().is_empty() {
                continue;
            }
            match out.iter_mut().find(|(o, _)| Arc::ptr_eq(o, g)) {
                Some((_, members)) => members.push(d.id().to_owned()),
                None => out.push((g.clone(), vec![d.id().to_owned()])),
            }
        }
        out
    }

    /// Changes a named group's limits (every member disk at once) and keeps them.
    pub fn set_group_limits(&self, name: &str, text: LimitsText) -> Result<(), SetError> {
        let limits = parse_limits(&text).map_err(|e| SetError::BadLimits(e.to_string()))?;
        let _order = lock(&self.limits_order);
        ThrottleGroup::find(name)
            .filter(|g| !g.name().is_empty())
            .ok_or_else(|| SetError::NoGroup(name.to_owned()))?;
        // Declared: from now on its limits are these, whatever a new member carries (as
        // after a restart, when the config's [throttle-groups] declares it).
        ThrottleGroup::declare(name, limits);
        if let Some(w) = &self.writer {
            w.set_group_limits(name, &text)
                .map_err(|source| SetError::Persist {
                    what: format!("throttle group {name:?}'s limits changed"),
                    source,
                })?;
        }
        log::info!("throttle group {name}: limits set to {text:?}");
        Ok(())
    }

    /// Stops every disk at once and waits for all (and for adds and removals under way);
    /// the first failure is returned.
    fn stop_all(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        // A cancelled job undoes its work (a preallocation cuts the file back).
        self.jobs
            .cancel_all_and_wait(std::time::Duration::from_secs(20));
        // The disks served come first: an add stuck opening (a hung mount) must not keep
        // them from being drained and flushed.
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
        // Then removals under way finish their drain (an add gives up on its own), for a
        // while.
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut st = lock(&self.state);
        while !st.busy.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "shutdown: not waiting longer for {:?}",
                    st.busy.iter().map(|(i, _)| i).collect::<Vec<_>>()
                );
                break;
            }
            st = self
                .settled
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        result
    }
}

/// A daemon that has opened its disks and bound its sockets, ready to serve.
pub struct Daemon {
    /// The config's `[throttle-groups]`, alive while the daemon is.
    _declared: Vec<Arc<ThrottleGroup>>,
    disks: Arc<DiskSet>,
    stop: Arc<EventFd>,
    api: Option<(std::path::PathBuf, SocketFile)>,
    history: Arc<crate::history::History>,
    lifecycle: crate::lifecycle::Lifecycle,
}

impl Daemon {
    /// Start-up: everything that can fail because of the user's input fails here.
    pub fn new(config: Config) -> Result<Self> {
        block_termination_signals().context("cannot block termination signals")?;
        ignore_file_size_signal().context("cannot ignore SIGXFSZ")?;
        let disks = Arc::new(DiskSet::new(&config));
        // Groups whose limits the API set are made first, with those limits: members that
        // name them (with their own limits or none) join them as they are.
        let declared: Vec<Arc<ThrottleGroup>> = config
            .group_limits
            .iter()
            .map(|(name, limits)| ThrottleGroup::declare(name, *limits))
            .collect();
        for d in config.disks.clone() {
            if !d.text.added_by_operator {
                disks.add(d, None, false).map_err(anyhow::Error::from)?;
                continue;
            }
            // An operator's disk is opened as when it was added: its files may have been
            // swapped for links since. One that no longer passes is not served; the others
            // are.
            match crate::admission::check(&d.spec, &d.text.socket, &config.operator_paths, false) {
                Ok(admitted) => {
                    disks
                        .add(d, Some(&admitted.spec), false)
                        .map_err(|e| anyhow::anyhow!(admitted.with_caller_names(&e.to_string())))?;
                }
                Err(e) => log::error!("disk {}: not served: {e}", d.id()),
            }
        }
        crate::space::watch(disks.clone(), config.space).context("cannot start the space watch")?;
        let history = Arc::new(crate::history::History::open(config.history.clone()));
        history
            .start(disks.clone())
            .context("cannot start the history thread")?;
        let lifecycle = crate::lifecycle::Lifecycle::start(disks.clone())
            .context("cannot start the snapshot policy thread")?;
        let api = match &config.api_socket {
            Some(path) => Some((
                path.clone(),
                crate::api::start(path, &config, disks.clone(), history.clone())?,
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
        Ok(Daemon {
            _declared: declared,
            disks,
            stop,
            api,
            history,
            lifecycle,
        })
    }

    /// Serves until a termination signal; then every disk drains and flushes.
    pub fn run(mut self) -> Result<()> {
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
        // No policy snapshot starts once shutdown began (one under way ends first).
        self.lifecycle.stop();
        // The period under way goes into the trend before the disks go.
        self.history.close(&self.disks.list());
        self.disks.stop_all()?;
        log::info!("shut down cleanly: requests drained, disks flushed");
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
