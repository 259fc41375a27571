//! The passthrough filesystem: the guest sees a host directory.
//!
//! Every inode the guest knows is held as an `O_PATH` descriptor, or, with
//! `--inode-file-handles`, as a file handle that gives one back on demand (see
//! [`file_handle`]). Every name is resolved relative to its parent's descriptor with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)` and `O_NOFOLLOW`: a name is one
//! component, never a path, and a symlink is an inode of its own that we create and read but
//! never follow. Files are opened for I/O only by reopening such a descriptor through
//! `/proc/self/fd` (or by opening its handle), and only when it is a regular file or a
//! directory, so FIFOs, sockets and device nodes are never opened. Objects are created with
//! the caller's credentials (see [`creds`]) and `O_EXCL`.

pub mod creds;
pub mod file_handle;
pub mod sys;

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::decode::{LkIn, SetattrIn};
use crate::filesystem::{Context, FileSystem, Handle, Inode, Opened, XattrReply};
use crate::fuse::{self, fattr, fopen, init, Attr, EntryOut, FileLock, StatFs, Timeout};

use creds::IdMap;
pub use file_handle::InodeFileHandles;
use file_handle::{FileHandle, MountFds};
use sys::errno;

/// How long the guest may cache names, attributes and data (virtiofsd's `--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachePolicy {
    Never,
    Metadata,
    Auto,
    Always,
}

impl CachePolicy {
    /// The entry and attribute timeout, as virtiofsd sets it.
    pub fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Metadata | CachePolicy::Always => Duration::from_secs(86400),
            CachePolicy::Auto => Duration::from_secs(1),
        }
    }

    /// `FOPEN_*` flags for an open of a file (`dir` false) or directory, as virtiofsd.
    pub fn open_flags(self, dir: bool) -> u32 {
        match (self, dir) {
            (CachePolicy::Never, false) => fopen::DIRECT_IO,
            (CachePolicy::Never, true) => 0,
            (CachePolicy::Metadata, false) => fopen::DIRECT_IO,
            (CachePolicy::Metadata, true) => fopen::CACHE_DIR | fopen::KEEP_CACHE,
            (CachePolicy::Always, false) => fopen::KEEP_CACHE,
            (CachePolicy::Always, true) => fopen::KEEP_CACHE | fopen::CACHE_DIR,
            (CachePolicy::Auto, _) => 0,
        }
    }

    /// `FOPEN_*` flags for a file made by CREATE (virtiofsd differs from OPEN here).
    pub fn create_flags(self) -> u32 {
        match self {
            CachePolicy::Never | CachePolicy::Metadata => fopen::DIRECT_IO,
            CachePolicy::Always => fopen::KEEP_CACHE,
            CachePolicy::Auto => 0,
        }
    }
}

/// What the passthrough filesystem is configured to do.
#[derive(Debug, Clone)]
pub struct PassthroughConfig {
    pub cache: CachePolicy,
    pub xattr: bool,
    pub announce_submounts: bool,
    pub uid_map: IdMap,
    pub gid_map: IdMap,
    /// Create files with the caller's ids (the daemon runs as root).
    pub switch_creds: bool,
    /// Hold inodes as file handles instead of O_PATH descriptors.
    pub inode_file_handles: InodeFileHandles,
    /// The share is read-only (`--readonly`): nothing is ever opened for writing.
    pub readonly: bool,
}

/// Host files held for guests' POSIX lock owners, across all inodes: one per (inode,
/// owner), so a guest making up owners could otherwise make the daemon hold any number of
/// descriptors. Past it, a lock that needs a new file is refused with ENOLCK.
const MAX_LOCK_FILES: usize = 4096;

/// How an inode is held.
enum InodeFile {
    /// An `O_PATH | O_NOFOLLOW` descriptor.
    Fd(OwnedFd),
    /// A file handle: no descriptor stays open.
    Handle(FileHandle),
}

/// A descriptor of an inode for one call: its own, or one opened from its handle.
enum InodeFd<'a> {
    Held(BorrowedFd<'a>),
    Opened(OwnedFd),
}

impl AsFd for InodeFd<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            InodeFd::Held(fd) => *fd,
            InodeFd::Opened(fd) => fd.as_fd(),
        }
    }
}

impl AsRawFd for InodeFd<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// What identifies a host inode among those the guest knows: its file handle where it is
/// held as one, else (dev, ino). A number alone is not enough for an inode held as a handle:
/// nothing keeps it open, so once its file is unlinked the host may give its number to a new
/// file (ext4 does at once), which must not take over the old guest inode and its stale
/// handle; the new file's handle differs (another generation). An inode held by its O_PATH
/// descriptor cannot be freed while held, so its number is safe (virtiofsd keys both ways).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum InodeKey {
    Handle(i32, i32, Box<[u8]>),
    Number(u64, u64),
}

struct InodeData {
    file: InodeFile,
    key: InodeKey,
    dev: u64,
    ino: u64,
    /// `S_IFMT` bits: fixed for the inode's lifetime.
    kind: u32,
    lookups: AtomicU64,
}

impl InodeData {
    /// An `O_PATH` descriptor of the inode, to resolve names under, stat, or reach through
    /// `/proc/self/fd`.
    fn path_fd(&self) -> io::Result<InodeFd<'_>> {
        match &self.file {
            InodeFile::Fd(fd) => Ok(InodeFd::Held(fd.as_fd())),
            InodeFile::Handle(h) => h.open(libc::O_PATH | libc::O_NOFOLLOW).map(InodeFd::Opened),
        }
    }
}

#[derive(Default)]
struct InodeMap {
    by_id: HashMap<Inode, Arc<InodeData>>,
    by_key: HashMap<InodeKey, Inode>,
    next: Inode,
}

struct HandleData {
    inode: Inode,
    file: Arc<File>,
    /// Serialises seek + getdents64 on directory handles.
    dir: Mutex<()>,
}

/// The POSIX locks of one lock owner on one inode, held as OFD locks on a host open file
/// description of the owner's own. A guest's POSIX locks belong to its process (the FUSE
/// lock owner), not to the file it locked through: one owner's locks through two handles
/// never conflict, and closing any of its descriptors (FLUSH) drops them all. One host file
/// per (inode, owner) gives exactly that, as QEMU's C virtiofsd did.
struct PosixLockFile {
    file: Arc<File>,
    /// Handles the owner locked through. An OFD lock's owner is the guest's open file, which
    /// has one handle and sends no FLUSH for it: when the last of these handles is released,
    /// the owner's locks go with it.
    handles: HashSet<Handle>,
}

pub struct PassthroughFs {
    cfg: PassthroughConfig,
    proc_self_fd: OwnedFd,
    root: Arc<InodeData>,
    inodes: RwLock<InodeMap>,
    handles: RwLock<HashMap<Handle, Arc<HandleData>>>,
    next_handle: AtomicU64,
    announce_submounts: AtomicBool,
    /// How inodes are held; `Prefer` becomes `Never` when handles cannot be opened.
    handles_mode: InodeFileHandles,
    mounts: MountFds,
    /// A lookup was refused because `Mandatory` met a filesystem without handles (logged once).
    warned_no_handles: AtomicBool,
    /// POSIX lock files by inode, then lock owner.
    posix_locks: Mutex<HashMap<Inode, HashMap<u64, PosixLockFile>>>,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// Refuses names that are not a single component: empty, containing `/`, or (where a name
/// is created, removed or renamed) `.` and `..`.
pub fn check_name(name: &CStr, creating: bool) -> io::Result<()> {
    let b = name.to_bytes();
    if b.is_empty() || b.contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    if creating && (b == b"." || b == b"..") {
        return Err(errno(libc::EINVAL));
    }
    if b.len() > 255 {
        return Err(errno(libc::ENAMETOOLONG));
    }
    Ok(())
}

fn s_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

impl PassthroughFs {
    /// Serves the directory `root` (an open descriptor of it). `proc_self_fd` is an open
    /// `/proc/self/fd` directory, kept because the sandbox hides `/proc`.
    pub fn new(root: OwnedFd, proc_self_fd: OwnedFd, cfg: PassthroughConfig) -> io::Result<Self> {
        let st = sys::fstat(root.as_fd())?;
        if s_type(st.st_mode) != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let handles_mode = Self::check_handles(cfg.inode_file_handles, &root, &proc_self_fd)?;
        let root = Arc::new(InodeData {
            // The root is in use all the time: it keeps its descriptor.
            file: InodeFile::Fd(root),
            key: InodeKey::Number(st.st_dev, st.st_ino),
            dev: st.st_dev,
            ino: st.st_ino,
            kind: libc::S_IFDIR,
            lookups: AtomicU64::new(2),
        });
        let fs = PassthroughFs {
            cfg,
            proc_self_fd,
            root,
            inodes: RwLock::new(InodeMap::default()),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            announce_submounts: AtomicBool::new(false),
            handles_mode,
            mounts: MountFds::default(),
            warned_no_handles: AtomicBool::new(false),
            posix_locks: Mutex::new(HashMap::new()),
        };
        fs.reset();
        Ok(fs)
    }

    /// What `--inode-file-handles` can be on this share: `Mandatory` needs handles on the
    /// share's filesystem that we can open (CAP_DAC_READ_SEARCH); `Prefer` without the
    /// capability is `Never`, since no handle could ever be opened.
    fn check_handles(
        mode: InodeFileHandles,
        root: &OwnedFd,
        proc_self_fd: &OwnedFd,
    ) -> io::Result<InodeFileHandles> {
        if mode == InodeFileHandles::Never {
            return Ok(mode);
        }
        let probe = sys::reopen(
            proc_self_fd.as_fd(),
            root.as_raw_fd(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )
        .and_then(|dir| file_handle::probe(root.as_fd(), dir));
        match (probe, mode) {
            (Ok(_), _) => {
                log::info!("inodes are held as file handles ({mode:?})");
                Ok(mode)
            }
            (Err(e), InodeFileHandles::Mandatory) => Err(io::Error::new(
                e.kind(),
                format!(
                    "--inode-file-handles=mandatory: {}: {e}",
                    match e.raw_os_error() {
                        Some(libc::EOPNOTSUPP) =>
                            "the shared directory's filesystem does not support file handles",
                        Some(libc::EPERM) => "cannot open file handles (needs CAP_DAC_READ_SEARCH)",
                        _ => "cannot use file handles on the shared directory",
                    }
                ),
            )),
            (Err(e), _) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // Other filesystems below the share may still have them.
                log::info!("the shared directory's filesystem has no file handles: its inodes are held as O_PATH descriptors");
                Ok(mode)
            }
            (Err(e), _) => {
                log::warn!(
                    "file handles cannot be used ({e}): inodes are held as O_PATH descriptors"
                );
                Ok(InodeFileHandles::Never)
            }
        }
    }

    /// The file handle of the inode behind `fd`, when the mode asks for handles.
    fn handle_for(&self, fd: &OwnedFd) -> io::Result<Option<file_handle::UnboundHandle>> {
        if self.handles_mode == InodeFileHandles::Never {
            return Ok(None);
        }
        file_handle::handle_of(fd.as_fd())
    }

    /// How a newly looked-up inode is held: `fd` itself, or `handle` (its handle, from
    /// [`handle_for`](Self::handle_for)) when the mode asks for handles and its filesystem
    /// has them. `parent` is the directory it was found in, a candidate mount descriptor.
    fn hold(
        &self,
        fd: OwnedFd,
        kind: u32,
        parent: Option<&InodeData>,
        handle: io::Result<Option<file_handle::UnboundHandle>>,
    ) -> io::Result<InodeFile> {
        if self.handles_mode == InodeFileHandles::Never {
            return Ok(InodeFile::Fd(fd));
        }
        let handle = match handle {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(errno(libc::EOPNOTSUPP)),
            Err(e) => Err(e),
        }
        .and_then(|h| {
            let mount = match self.mounts.get(h.mount_id) {
                Some(m) => m,
                None => self
                    .mounts
                    .insert(h.mount_id, self.mount_file(&fd, kind, h.mount_id, parent)?),
            };
            h.bind(mount)
        });
        match (handle, self.handles_mode) {
            (Ok(h), _) => Ok(InodeFile::Handle(h)),
            (Err(e), InodeFileHandles::Mandatory) => {
                if !self.warned_no_handles.swap(true, Ordering::Relaxed) {
                    log::warn!("--inode-file-handles=mandatory: refusing an inode without a usable file handle ({e})");
                }
                Err(e)
            }
            (Err(_), _) => Ok(InodeFile::Fd(fd)),
        }
    }

    /// A descriptor on mount `mount_id` that `open_by_handle_at` accepts (not O_PATH): the
    /// inode itself when it is a directory, else the directory it was found in if that is on
    /// the same mount, else the inode itself when it is a regular file. Special files are
    /// never opened.
    fn mount_file(
        &self,
        fd: &OwnedFd,
        kind: u32,
        mount_id: i32,
        parent: Option<&InodeData>,
    ) -> io::Result<OwnedFd> {
        let reopen = |raw: i32, flags: i32| {
            sys::reopen(self.proc_fd(), raw, flags | libc::O_NONBLOCK).map(OwnedFd::from)
        };
        if kind == libc::S_IFDIR {
            return reopen(fd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY);
        }
        if let Some(p) = parent {
            let pfd = p.path_fd()?;
            if file_handle::mount_id(pfd.as_fd())? == mount_id {
                return reopen(pfd.as_raw_fd(), libc::O_RDONLY | libc::O_DIRECTORY);
            }
        }
        if kind == libc::S_IFREG {
            return reopen(fd.as_raw_fd(), libc::O_RDONLY);
        }
        Err(errno(libc::EOPNOTSUPP))
    }

    /// Mounts with a descriptor open for file handles (for tests and metrics).
    pub fn mount_fd_count(&self) -> usize {
        self.mounts.open_count()
    }

    fn reset(&self) {
        let mut map = write(&self.inodes);
        map.by_id.clear();
        map.by_key.clear();
        map.by_id.insert(fuse::ROOT_ID, self.root.clone());
        map.by_key.insert(self.root.key.clone(), fuse::ROOT_ID);
        map.next = fuse::ROOT_ID + 1;
        drop(map);
        write(&self.handles).clear();
        self.posix_locks().clear();
    }

    fn posix_locks(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Inode, HashMap<u64, PosixLockFile>>> {
        self.posix_locks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host file that holds `owner`'s POSIX locks on `inode`, opened on first use, with
    /// `fh` (a handle of the inode the guest locks through) recorded.
    fn posix_lock_file(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        owner: u64,
    ) -> io::Result<Arc<File>> {
        let h = self.handle(inode, fh)?;
        let mut locks = self.posix_locks();
        if let Some(entry) = locks.get_mut(&inode).and_then(|o| o.get_mut(&owner)) {
            entry.handles.insert(fh);
            return Ok(entry.file.clone());
        }
        if locks.values().map(HashMap::len).sum::<usize>() >= MAX_LOCK_FILES {
            return Err(errno(libc::ENOLCK));
        }
        // Read and write, so the owner can take either kind of lock through any of its
        // handles, but only as the caller, whom the kernel checks, and never on a read-only
        // share; else the access of the handle it locks through, which the guest opened
        // with and could lock with anyway. Never more than the guest could open itself.
        let data = self.inode(inode)?;
        let both = if self.cfg.readonly {
            Err(errno(libc::EROFS))
        } else {
            // The path as the daemon (a file handle opens only with its capabilities), the
            // reopen for reading and writing as the caller, whom the kernel checks.
            data.path_fd().and_then(|pfd| {
                let _caller = self.as_caller(ctx)?;
                sys::reopen(
                    self.proc_fd(),
                    pfd.as_raw_fd(),
                    libc::O_RDWR | libc::O_NONBLOCK,
                )
            })
        };
        let file = match both {
            Ok(f) => f,
            Err(_) => {
                let mode = sys::access_mode(h.file.as_raw_fd())?;
                self.open_inode(&data, mode | libc::O_NONBLOCK)?
            }
        };
        let owners = locks.entry(inode).or_default();
        let file = Arc::new(file);
        owners.insert(
            owner,
            PosixLockFile {
                file: file.clone(),
                handles: HashSet::from([fh]),
            },
        );
        Ok(file)
    }

    /// Drops every POSIX lock `owner` holds on `inode` (close(2) semantics).
    fn drop_posix_locks(&self, inode: Inode, owner: u64) -> io::Result<()> {
        let mut locks = self.posix_locks();
        let Some(owners) = locks.get_mut(&inode) else {
            return Ok(());
        };
        let Some(entry) = owners.remove(&owner) else {
            return Ok(());
        };
        if owners.is_empty() {
            locks.remove(&inode);
        }
        drop(locks);
        // Unlock explicitly: a blocked SETLKW may still hold a reference to the file.
        let mut fl = to_flock(&FileLock {
            start: 0,
            end: u64::MAX,
            typ: libc::F_UNLCK as u32,
            pid: 0,
        })?;
        sys::ofd_lock(entry.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl)
    }

    /// `fh` is released: owners that locked only through it lose their locks.
    fn release_posix_locks(&self, inode: Inode, fh: Handle) {
        let mut locks = self.posix_locks();
        let Some(owners) = locks.get_mut(&inode) else {
            return;
        };
        owners.retain(|_, entry| {
            entry.handles.remove(&fh);
            !entry.handles.is_empty()
        });
        if owners.is_empty() {
            locks.remove(&inode);
        }
    }

    /// Inodes the guest holds (for metrics).
    pub fn inode_count(&self) -> usize {
        read(&self.inodes).by_id.len()
    }

    /// Open handles (for metrics).
    pub fn handle_count(&self) -> usize {
        read(&self.handles).len()
    }

    fn inode(&self, id: Inode) -> io::Result<Arc<InodeData>> {
        read(&self.inodes)
            .by_id
            .get(&id)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    fn handle(&self, inode: Inode, fh: Handle) -> io::Result<Arc<HandleData>> {
        let h = read(&self.handles)
            .get(&fh)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))?;
        if h.inode != inode {
            return Err(errno(libc::EBADF));
        }
        Ok(h)
    }

    fn proc_fd(&self) -> BorrowedFd<'_> {
        self.proc_self_fd.as_fd()
    }

    fn timeout(&self) -> Timeout {
        self.cfg.cache.timeout().into()
    }

    fn guest_attr(&self, st: &libc::stat, parent_dev: Option<u64>) -> Attr {
        let mut a = Attr::from_stat(st);
        a.uid = self.cfg.uid_map.to_guest(a.uid);
        a.gid = self.cfg.gid_map.to_guest(a.gid);
        if self.announce_submounts.load(Ordering::Relaxed)
            && s_type(st.st_mode) == libc::S_IFDIR
            && parent_dev.is_some_and(|d| d != st.st_dev)
        {
            a.flags |= fuse::ATTR_SUBMOUNT;
        }
        a
    }

    /// Host ids for a guest caller.
    fn host_ids(&self, ctx: Context) -> io::Result<(u32, u32)> {
        Ok((
            self.cfg.uid_map.to_host(ctx.uid)?,
            self.cfg.gid_map.to_host(ctx.gid)?,
        ))
    }

    fn as_caller(&self, ctx: Context) -> io::Result<creds::CredsGuard> {
        let (uid, gid) = self.host_ids(ctx)?;
        creds::switch(self.cfg.switch_creds, uid, gid)
    }

    /// Adds one lookup of the inode behind `fd` (a new O_PATH descriptor, found in `parent`
    /// unless it is the root) and returns its entry.
    fn register(&self, fd: OwnedFd, parent: Option<&InodeData>) -> io::Result<EntryOut> {
        let st = sys::fstat(fd.as_fd())?;
        let number = InodeKey::Number(st.st_dev, st.st_ino);
        let handle = self.handle_for(&fd);
        let key = match &handle {
            Ok(Some(h)) => {
                let (mount, kind, bytes) = h.key();
                InodeKey::Handle(mount, kind, bytes)
            }
            _ => number.clone(),
        };
        let parent_dev = parent.map(|p| p.dev);
        // By handle, or by number: an inode keyed by its number is held open (the root
        // always is), so that number is still its own.
        let known = |map: &InodeMap, key: &InodeKey| {
            let id = map
                .by_key
                .get(key)
                .or_else(|| map.by_key.get(&number))
                .copied()?;
            map.by_id.get(&id)?.lookups.fetch_add(1, Ordering::Relaxed);
            Some(id)
        };
        // The same host inode under two names is one guest inode.
        let mut id = known(&write(&self.inodes), &key);
        if id.is_none() {
            // Made without the map locked: it may take system calls.
            let file = self.hold(fd, s_type(st.st_mode), parent, handle)?;
            // Held by its descriptor after all (no usable handle): known by its number.
            let key = match file {
                InodeFile::Handle(_) => key,
                InodeFile::Fd(_) => number.clone(),
            };
            let mut map = write(&self.inodes);
            // Another lookup may have registered it meanwhile.
            id = known(&map, &key);
            if id.is_none() {
                let new = map.next;
                map.next += 1;
                map.by_key.insert(key.clone(), new);
                map.by_id.insert(
                    new,
                    Arc::new(InodeData {
                        file,
                        key,
                        dev: st.st_dev,
                        ino: st.st_ino,
                        kind: s_type(st.st_mode),
                        lookups: AtomicU64::new(1),
                    }),
                );
                id = Some(new);
            }
        }
        let id = id.ok_or_else(|| errno(libc::EIO))?;
        Ok(EntryOut {
            nodeid: id,
            generation: 0,
            entry_valid: self.timeout(),
            attr_valid: self.timeout(),
            attr: self.guest_attr(&st, parent_dev),
        })
    }

    fn do_lookup(&self, parent: &InodeData, name: &CStr) -> io::Result<EntryOut> {
        let pfd = parent.path_fd()?;
        self.lookup_at(parent, pfd.as_fd(), name)
    }

    /// [`do_lookup`](Self::do_lookup) through `pfd`, a descriptor of `parent` the caller
    /// already has (READDIRPLUS uses its open directory rather than open a handle per entry).
    fn lookup_at(
        &self,
        parent: &InodeData,
        pfd: BorrowedFd<'_>,
        name: &CStr,
    ) -> io::Result<EntryOut> {
        let fd = match name.to_bytes() {
            b"." => sys::openat(pfd, c".", libc::O_PATH | libc::O_NOFOLLOW)?,
            b".." => {
                // Never above the share: the root's parent is the root.
                if parent.dev == self.root.dev && parent.ino == self.root.ino {
                    sys::openat(self.root.path_fd()?.as_fd(), c".", libc::O_PATH)?
                } else {
                    sys::openat(pfd, c"..", libc::O_PATH | libc::O_NOFOLLOW)?
                }
            }
            _ => sys::openat_beneath(pfd, name, libc::O_PATH, 0)?,
        };
        self.register(fd, Some(parent))
    }

    /// Reopens an inode for I/O; only regular files and directories.
    fn open_inode(&self, data: &InodeData, flags: i32) -> io::Result<File> {
        match data.kind {
            libc::S_IFREG => {
                if flags & libc::O_DIRECTORY != 0 {
                    return Err(errno(libc::ENOTDIR));
                }
            }
            libc::S_IFDIR => {}
            libc::S_IFLNK => return Err(errno(libc::ELOOP)),
            // FIFOs, sockets and device nodes are never opened.
            _ => return Err(errno(libc::EACCES)),
        }
        match &data.file {
            InodeFile::Fd(fd) => sys::reopen(self.proc_fd(), fd.as_raw_fd(), flags),
            InodeFile::Handle(h) => h.open(sys::reopen_flags(flags)).map(File::from),
        }
    }

    fn new_handle(&self, inode: Inode, file: File) -> Handle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        write(&self.handles).insert(
            fh,
            Arc::new(HandleData {
                inode,
                file: Arc::new(file),
                dir: Mutex::new(()),
            }),
        );
        fh
    }

    /// Clears set-user-ID, and set-group-ID when group-executable, as the kernel does when
    /// an unprivileged user writes or truncates.
    fn kill_suidgid(&self, fd: i32) -> io::Result<()> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: `st` is a valid out-buffer.
        sys::cvt(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded.
        let mode = unsafe { st.assume_init() }.st_mode;
        let mut new = mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            new &= !libc::S_ISGID;
        }
        if new != mode {
            sys::fchmod(fd, new & 0o7777)?;
        }
        Ok(())
    }

    /// What the kernel does to a file a process without CAP_FSETID modifies (fallocate,
    /// copy_file_range), done for the guest's caller: these run on the daemon's descriptor,
    /// as root, and FUSE gives no kill-privileges flag for them as it does for WRITE.
    /// Before the operation, as the kernel does (a set-ID file must never hold new data
    /// with its bits still set), but only on a descriptor the operation can write through:
    /// one it would refuse changes nothing.
    fn kill_suidgid_for(&self, ctx: Context, fd: i32) -> io::Result<()> {
        // The caller's id on the host (after `--translate-uid`) is what the kernel would see.
        if self.host_ids(ctx)?.0 == 0 {
            return Ok(());
        }
        if sys::access_mode(fd)? == libc::O_RDONLY {
            return Err(errno(libc::EBADF));
        }
        self.kill_suidgid(fd)
    }

    fn open_flags(&self, flags: u32) -> i32 {
        // The guest's flags, minus what would change how the name is resolved or created.
        (flags as i32)
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW | libc::O_PATH)
    }
}

fn to_flock(lk: &FileLock) -> io::Result<libc::flock> {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = match lk.typ as i32 {
        libc::F_RDLCK => libc::F_RDLCK as i16,
        libc::F_WRLCK => libc::F_WRLCK as i16,
        libc::F_UNLCK => libc::F_UNLCK as i16,
        _ => return Err(errno(libc::EINVAL)),
    };
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = i64::try_from(lk.start).map_err(|_| errno(libc::EINVAL))?;
    // FUSE says "to the end" with OFFSET_MAX; the kernel says it with length 0.
    fl.l_len = if lk.end >= i64::MAX as u64 {
        0
    } else {
        let len = lk
            .end
            .checked_sub(lk.start)
            .ok_or_else(|| errno(libc::EINVAL))?
            + 1;
        i64::try_from(len).map_err(|_| errno(libc::EINVAL))?
    };
    Ok(fl)
}

impl FileSystem for PassthroughFs {
    fn init(&self, capable: u64) -> io::Result<u64> {
        self.reset();
        let mut want = init::ASYNC_READ
            | init::PARALLEL_DIROPS
            | init::BIG_WRITES
            | init::MAX_PAGES
            | init::POSIX_LOCKS
            | init::FLOCK_LOCKS
            | init::ATOMIC_O_TRUNC
            | init::HANDLE_KILLPRIV_V2;
        if self.cfg.cache != CachePolicy::Never {
            want |= init::DO_READDIRPLUS | init::READDIRPLUS_AUTO;
        }
        if self.cfg.cache == CachePolicy::Auto {
            want |= init::AUTO_INVAL_DATA;
        }
        // Negotiated anew by every INIT: a guest that no longer offers it is told nothing.
        self.announce_submounts.store(false, Ordering::Relaxed);
        if self.cfg.announce_submounts {
            if capable & init::SUBMOUNTS != 0 {
                want |= init::SUBMOUNTS;
                self.announce_submounts.store(true, Ordering::Relaxed);
            } else {
                log::warn!("the guest cannot take announced submounts");
            }
        }
        Ok(want & capable)
    }

    fn destroy(&self) {
        self.reset();
    }

    fn lookup(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<EntryOut> {
        check_name(name, false)?;
        let p = self.inode(parent)?;
        self.do_lookup(&p, name)
    }

    fn forget(&self, inode: Inode, count: u64) {
        if inode == fuse::ROOT_ID {
            return;
        }
        let mut map = write(&self.inodes);
        let Some(data) = map.by_id.get(&inode).cloned() else {
            return;
        };
        let left = data
            .lookups
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            })
            .map(|old| old.saturating_sub(count))
            .unwrap_or(0);
        if left == 0 {
            map.by_id.remove(&inode);
            if map.by_key.get(&data.key) == Some(&inode) {
                map.by_key.remove(&data.key);
            }
        }
    }

    fn getattr(
        &self,
        _ctx: Context,
        inode: Inode,
        fh: Option<Handle>,
    ) -> io::Result<(Attr, Timeout)> {
        let st = match fh.and_then(|fh| self.handle(inode, fh).ok()) {
            Some(h) => sys::fstat(h.file.as_fd())?,
            None => sys::fstat(self.inode(inode)?.path_fd()?.as_fd())?,
        };
        Ok((self.guest_attr(&st, None), self.timeout()))
    }

    fn setattr(&self, ctx: Context, inode: Inode, a: &SetattrIn) -> io::Result<(Attr, Timeout)> {
        let data = self.inode(inode)?;
        let handle = if a.valid & fattr::FH != 0 {
            Some(self.handle(inode, a.fh)?)
        } else {
            None
        };
        let path_fd = data.path_fd()?;
        let ifd = path_fd.as_raw_fd();
        if a.valid & fattr::MODE != 0 {
            match &handle {
                Some(h) => sys::fchmod(h.file.as_raw_fd(), a.mode & 0o7777)?,
                None => sys::chmod_inode(self.proc_fd(), ifd, a.mode & 0o7777)?,
            }
        }
        if a.valid & (fattr::UID | fattr::GID) != 0 {
            let uid = if a.valid & fattr::UID != 0 {
                self.cfg.uid_map.to_host(a.uid)?
            } else {
                u32::MAX
            };
            let gid = if a.valid & fattr::GID != 0 {
                self.cfg.gid_map.to_host(a.gid)?
            } else {
                u32::MAX
            };
            // The host kernel clears set-id bits on chown, as it would for a local chown.
            sys::fchown_inode(ifd, uid, gid)?;
        }
        if a.valid & fattr::SIZE != 0 {
            let owned;
            let fd = match &handle {
                Some(h) => h.file.as_raw_fd(),
                None => {
                    if data.kind != libc::S_IFREG {
                        return Err(errno(if data.kind == libc::S_IFDIR {
                            libc::EISDIR
                        } else {
                            libc::EINVAL
                        }));
                    }
                    let _caller = self.as_caller(ctx)?;
                    // Through /proc, so the caller's permission to write is checked (a
                    // handle would be opened with our capabilities).
                    owned = sys::reopen(self.proc_fd(), ifd, libc::O_WRONLY)?;
                    owned.as_raw_fd()
                }
            };
            sys::ftruncate(fd, a.size)?;
            if a.valid & fattr::KILL_SUIDGID != 0 {
                self.kill_suidgid(fd)?;
            }
        }
        if a.valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let ts = |set: u32, now: u32, secs: u64, nsecs: u32| {
                if a.valid & set == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if a.valid & now != 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                } else {
                    libc::timespec {
                        tv_sec: secs as i64,
                        tv_nsec: i64::from(nsecs),
                    }
                }
            };
            let times = [
                ts(fattr::ATIME, fattr::ATIME_NOW, a.atime, a.atimensec),
                ts(fattr::MTIME, fattr::MTIME_NOW, a.mtime, a.mtimensec),
            ];
            match &handle {
                Some(h) => sys::futimens(h.file.as_raw_fd(), &times)?,
                None => sys::utimens_inode(self.proc_fd(), ifd, &times)?,
            }
        }
        self.getattr(ctx, inode, None)
    }

    fn readlink(&self, _ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        let data = self.inode(inode)?;
        if data.kind != libc::S_IFLNK {
            return Err(errno(libc::EINVAL));
        }
        sys::readlink(data.path_fd()?.as_raw_fd())
    }

    fn symlink(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        target: &CStr,
    ) -> io::Result<EntryOut> {
        check_name(name, true)?;
        let p = self.inode(parent)?;
        {
            // Descriptors first: opening a handle needs our capabilities, not the caller's.
            let pfd = p.path_fd()?;
            let _caller = self.as_caller(ctx)?;
            sys::symlinkat(target, pfd.as_raw_fd(), name)?;
        }
        self.do_lookup(&p, name)
    }

    fn mknod(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        check_name(name, true)?;
        let p = self.inode(parent)?;
        {
            let pfd = p.path_fd()?;
            let _caller = self.as_caller(ctx)?;
            sys::mknodat(pfd.as_raw_fd(), name, mode & !umask, rdev)?;
        }
        self.do_lookup(&p, name)
    }

    fn mkdir(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        check_name(name, true)?;
        let p = self.inode(parent)?;
        {
            let pfd = p.path_fd()?;
            let _caller = self.as_caller(ctx)?;
            sys::mkdirat(pfd.as_raw_fd(), name, mode & !umask & 0o7777)?;
        }
        self.do_lookup(&p, name)
    }

    fn unlink(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name, true)?;
        sys::unlinkat(self.inode(parent)?.path_fd()?.as_raw_fd(), name, 0)
    }

    fn rmdir(&self, _ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        check_name(name, true)?;
        sys::unlinkat(
            self.inode(parent)?.path_fd()?.as_raw_fd(),
            name,
            libc::AT_REMOVEDIR,
        )
    }

    fn rename(
        &self,
        _ctx: Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        check_name(oldname, true)?;
        check_name(newname, true)?;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
            return Err(errno(libc::EINVAL));
        }
        let o = self.inode(olddir)?;
        let n = self.inode(newdir)?;
        let (ofd, nfd) = (o.path_fd()?, n.path_fd()?);
        sys::renameat2(ofd.as_raw_fd(), oldname, nfd.as_raw_fd(), newname, flags)
    }

    fn link(
        &self,
        _ctx: Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<EntryOut> {
        check_name(newname, true)?;
        let data = self.inode(inode)?;
        let p = self.inode(newparent)?;
        sys::linkat_inode(
            self.proc_fd(),
            data.path_fd()?.as_raw_fd(),
            p.path_fd()?.as_raw_fd(),
            newname,
        )?;
        self.do_lookup(&p, newname)
    }

    fn open(&self, ctx: Context, inode: Inode, flags: u32, open_flags: u32) -> io::Result<Opened> {
        let data = self.inode(inode)?;
        if data.kind == libc::S_IFDIR && (flags as i32) & libc::O_ACCMODE != libc::O_RDONLY {
            return Err(errno(libc::EISDIR));
        }
        let file = self.open_inode(&data, self.open_flags(flags))?;
        if open_flags & fuse::OPEN_KILL_SUIDGID != 0 && (flags as i32) & libc::O_TRUNC != 0 {
            self.kill_suidgid(file.as_raw_fd())?;
        }
        let _ = ctx;
        let fh = self.new_handle(inode, file);
        Ok(Opened {
            fh,
            open_flags: self.cfg.cache.open_flags(false),
        })
    }

    fn create(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        flags: u32,
        umask: u32,
        open_flags: u32,
    ) -> io::Result<(EntryOut, Opened)> {
        check_name(name, true)?;
        let p = self.inode(parent)?;
        let oflags = self.open_flags(flags);
        let created = {
            let pfd = p.path_fd()?;
            let _caller = self.as_caller(ctx)?;
            sys::openat_beneath(
                pfd.as_fd(),
                name,
                oflags | libc::O_CREAT | libc::O_EXCL,
                mode & !umask,
            )
        };
        let file = match created {
            Ok(fd) => File::from(fd),
            // The name appeared since the guest looked: open what is there, as open(2)
            // without O_EXCL would, but only if it is a regular file.
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && (flags as i32) & libc::O_EXCL == 0 =>
            {
                let entry = self.do_lookup(&p, name)?;
                let data = self.inode(entry.nodeid)?;
                let opened = match data.kind {
                    libc::S_IFREG => self.open_inode(&data, oflags),
                    libc::S_IFDIR => Err(errno(libc::EISDIR)),
                    _ => Err(errno(libc::EEXIST)),
                };
                let file = match opened {
                    Ok(f) => f,
                    Err(e) => {
                        self.forget(entry.nodeid, 1);
                        return Err(e);
                    }
                };
                if open_flags & fuse::OPEN_KILL_SUIDGID != 0 && oflags & libc::O_TRUNC != 0 {
                    self.kill_suidgid(file.as_raw_fd())?;
                }
                let fh = self.new_handle(entry.nodeid, file);
                return Ok((
                    entry,
                    Opened {
                        fh,
                        open_flags: self.cfg.cache.create_flags(),
                    },
                ));
            }
            Err(e) => return Err(e),
        };
        // The O_PATH descriptor of exactly the inode we created (not whatever the name
        // points at by now).
        let path_fd = sys::openat(
            self.proc_fd(),
            &sys::fd_name(file.as_raw_fd()),
            libc::O_PATH,
        )?;
        let entry = self.register(path_fd, Some(&p))?;
        let fh = self.new_handle(entry.nodeid, file);
        Ok((
            entry,
            Opened {
                fh,
                open_flags: self.cfg.cache.create_flags(),
            },
        ))
    }

    fn read_file(&self, _ctx: Context, inode: Inode, fh: Handle) -> io::Result<Arc<File>> {
        Ok(self.handle(inode, fh)?.file.clone())
    }

    fn write_file(
        &self,
        _ctx: Context,
        inode: Inode,
        fh: Handle,
        kill_priv: bool,
    ) -> io::Result<Arc<File>> {
        let h = self.handle(inode, fh)?;
        if kill_priv {
            self.kill_suidgid(h.file.as_raw_fd())?;
        }
        Ok(h.file.clone())
    }

    fn statfs(&self, _ctx: Context, inode: Inode) -> io::Result<StatFs> {
        let st = sys::fstatvfs(self.inode(inode)?.path_fd()?.as_raw_fd())?;
        Ok(StatFs {
            blocks: st.f_blocks,
            bfree: st.f_bfree,
            bavail: st.f_bavail,
            files: st.f_files,
            ffree: st.f_ffree,
            bsize: st.f_bsize as u32,
            namelen: st.f_namemax as u32,
            frsize: st.f_frsize as u32,
        })
    }

    fn release(
        &self,
        _ctx: Context,
        inode: Inode,
        fh: Handle,
        flock_unlock: bool,
        _lock_owner: u64,
    ) -> io::Result<()> {
        let h = self.handle(inode, fh)?;
        write(&self.handles).remove(&fh);
        self.release_posix_locks(inode, fh);
        if flock_unlock {
            sys::flock(h.file.as_raw_fd(), libc::LOCK_UN)?;
        }
        Ok(())
    }

    fn flush(&self, _ctx: Context, inode: Inode, fh: Handle, lock_owner: u64) -> io::Result<()> {
        // close(2) of any descriptor drops the caller's POSIX locks on the file.
        self.handle(inode, fh)?;
        self.drop_posix_locks(inode, lock_owner)
    }

    fn fsync(&self, _ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        sys::fsync(self.handle(inode, fh)?.file.as_raw_fd(), datasync)
    }

    fn opendir(&self, _ctx: Context, inode: Inode, _flags: u32) -> io::Result<Opened> {
        let data = self.inode(inode)?;
        if data.kind != libc::S_IFDIR {
            return Err(errno(libc::ENOTDIR));
        }
        let file = self.open_inode(&data, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(Opened {
            fh: self.new_handle(inode, file),
            open_flags: self.cfg.cache.open_flags(true),
        })
    }

    fn readdir(
        &self,
        _ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> io::Result<Vec<u8>> {
        let h = self.handle(inode, fh)?;
        let parent = self.inode(inode)?;
        let size = size as usize;
        let mut out = fuse::Encoder::with_capacity(size.min(64 * 1024));
        let _guard = h.dir.lock().unwrap_or_else(|p| p.into_inner());
        let fd = h.file.as_raw_fd();
        // Read about as many host entries as the reply can hold, not more: every entry read
        // past what fits is read again by the next call (after the seek above). A
        // `linux_dirent64` is about the size of a `fuse_dirent`; a `fuse_direntplus` is
        // some 128 bytes more. 512 bytes always hold one entry (a 255-byte name needs 280).
        let want = if plus { size / 4 } else { size };
        let mut buf = vec![0u8; want.clamp(512, 32 * 1024)];
        // Entries already read past the offset, when it had to be found by reading.
        let (mut from, mut to) = sys::seek_dir(fd, offset, &mut buf)?;
        'outer: loop {
            if from == to {
                from = 0;
                to = sys::getdents64(fd, &mut buf)?;
                if to == 0 {
                    break;
                }
            }
            let batch = (from, to);
            from = to;
            for d in sys::parse_dirents(&buf[batch.0..batch.1]) {
                let typ = u32::from(d.typ);
                let need =
                    fuse::dirent_size(d.name.len()) + if plus { fuse::ENTRY_OUT_LEN } else { 0 };
                if out.len() + need > size {
                    break 'outer;
                }
                if plus {
                    let entry = if d.name == b"." || d.name == b".." {
                        EntryOut::default()
                    } else {
                        let name = std::ffi::CString::new(d.name).map_err(|_| errno(libc::EIO))?;
                        match self.lookup_at(&parent, h.file.as_fd(), &name) {
                            Ok(e) => e,
                            // Removed since getdents: skip it.
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                            Err(e) => return Err(e),
                        }
                    };
                    entry.encode(&mut out);
                }
                fuse::encode_dirent(&mut out, d.ino, d.off, typ, d.name);
            }
        }
        Ok(out.0)
    }

    fn releasedir(&self, _ctx: Context, inode: Inode, fh: Handle) -> io::Result<()> {
        self.handle(inode, fh)?;
        write(&self.handles).remove(&fh);
        Ok(())
    }

    fn fsyncdir(&self, _ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        sys::fsync(self.handle(inode, fh)?.file.as_raw_fd(), datasync)
    }

    fn setxattr(
        &self,
        _ctx: Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let f = self.xattr_file(inode)?;
        sys::fsetxattr(f.as_raw_fd(), name, value, flags as i32)
    }

    fn getxattr(
        &self,
        _ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let f = self.xattr_file(inode)?;
        if size == 0 {
            let n = sys::fgetxattr(f.as_raw_fd(), name, &mut [])?;
            return Ok(XattrReply::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::fgetxattr(f.as_raw_fd(), name, &mut buf)?;
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    fn listxattr(&self, _ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let f = self.xattr_file(inode)?;
        if size == 0 {
            let n = sys::flistxattr(f.as_raw_fd(), &mut [])?;
            return Ok(XattrReply::Size(n as u32));
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::flistxattr(f.as_raw_fd(), &mut buf)?;
        buf.truncate(n);
        Ok(XattrReply::Data(buf))
    }

    fn removexattr(&self, _ctx: Context, inode: Inode, name: &CStr) -> io::Result<()> {
        if !self.cfg.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let f = self.xattr_file(inode)?;
        sys::fremovexattr(f.as_raw_fd(), name)
    }

    fn getlk(&self, ctx: Context, inode: Inode, lk: &LkIn) -> io::Result<FileLock> {
        let mut fl = to_flock(&lk.lock)?;
        // Conflicts with other owners only, as F_GETLK reports them.
        let file = self.posix_lock_file(ctx, inode, lk.fh, lk.owner)?;
        sys::ofd_lock(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl)?;
        let start = fl.l_start as u64;
        let end = if fl.l_len == 0 {
            i64::MAX as u64
        } else {
            start + fl.l_len as u64 - 1
        };
        Ok(FileLock {
            start,
            end,
            typ: fl.l_type as u32,
            pid: 0,
        })
    }

    fn setlk(&self, ctx: Context, inode: Inode, lk: &LkIn, wait: bool) -> io::Result<()> {
        if lk.lk_flags & fuse::LK_FLOCK != 0 {
            // flock locks belong to the open file, which is the handle's own.
            let h = self.handle(inode, lk.fh)?;
            let fd = h.file.as_raw_fd();
            let op = match lk.lock.typ as i32 {
                libc::F_RDLCK => libc::LOCK_SH,
                libc::F_WRLCK => libc::LOCK_EX,
                libc::F_UNLCK => libc::LOCK_UN,
                _ => return Err(errno(libc::EINVAL)),
            };
            return sys::flock(fd, if wait { op } else { op | libc::LOCK_NB });
        }
        let mut fl = to_flock(&lk.lock)?;
        if lk.lock.typ == libc::F_UNLCK as u32
            && !self
                .posix_locks()
                .get(&inode)
                .is_some_and(|o| o.contains_key(&lk.owner))
        {
            // Nothing of this owner's to unlock; no need for a lock file.
            self.handle(inode, lk.fh)?;
            return Ok(());
        }
        let file = self.posix_lock_file(ctx, inode, lk.fh, lk.owner)?;
        sys::ofd_lock(
            file.as_raw_fd(),
            if wait {
                libc::F_OFD_SETLKW
            } else {
                libc::F_OFD_SETLK
            },
            &mut fl,
        )
    }

    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        let data = self.inode(inode)?;
        let pfd = data.path_fd()?;
        let _caller = self.as_caller(ctx)?;
        sys::faccessat_inode(self.proc_fd(), pfd.as_raw_fd(), mask as i32)
    }

    fn fallocate(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        let fd = self.handle(inode, fh)?.file.as_raw_fd();
        self.kill_suidgid_for(ctx, fd)?;
        sys::fallocate(fd, mode as i32, offset, length)
    }

    fn lseek(
        &self,
        _ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        let whence = whence as i32;
        if !matches!(
            whence,
            libc::SEEK_SET | libc::SEEK_CUR | libc::SEEK_END | libc::SEEK_DATA | libc::SEEK_HOLE
        ) {
            return Err(errno(libc::EINVAL));
        }
        sys::lseek(self.handle(inode, fh)?.file.as_raw_fd(), offset, whence)
    }

    fn copy_file_range(
        &self,
        ctx: Context,
        inode_in: Inode,
        fh_in: Handle,
        off_in: u64,
        inode_out: Inode,
        fh_out: Handle,
        off_out: u64,
        len: u64,
        flags: u64,
    ) -> io::Result<usize> {
        let flags = u32::try_from(flags).map_err(|_| errno(libc::EINVAL))?;
        let i = self.handle(inode_in, fh_in)?;
        let o = self.handle(inode_out, fh_out)?;
        self.kill_suidgid_for(ctx, o.file.as_raw_fd())?;
        sys::copy_file_range(
            i.file.as_raw_fd(),
            off_in,
            o.file.as_raw_fd(),
            off_out,
            len,
            flags,
        )
    }

    fn syncfs(&self, _ctx: Context, inode: Inode) -> io::Result<()> {
        let data = self.inode(inode)?;
        let f = self.open_inode(&data, libc::O_RDONLY | libc::O_NONBLOCK)?;
        sys::syncfs(f.as_raw_fd())
    }
}

impl PassthroughFs {
    /// A descriptor for the xattr calls: regular files and directories only (the `f*xattr`
    /// calls need a descriptor open for I/O, and nothing else is ever opened).
    fn xattr_file(&self, inode: Inode) -> io::Result<File> {
        let data = self.inode(inode)?;
        match data.kind {
            libc::S_IFREG | libc::S_IFDIR => {
                self.open_inode(&data, libc::O_RDONLY | libc::O_NONBLOCK)
            }
            _ => Err(errno(libc::EOPNOTSUPP)),
        }
    }
}

#[cfg(test)]
mod tests;
