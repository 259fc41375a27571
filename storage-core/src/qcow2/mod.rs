//! qcow2, QEMU's image format, as a format node over a file node (its `file` child), with
//! its backing chain below it (`backing`: another qcow2 or a raw file, read-only).
//!
//! What it reads and writes: versions 2 and 3, any cluster size QEMU allows (512 bytes to
//! 2 MiB), refcounts of any width, zero clusters, compressed clusters (zlib, or zstd where
//! the header says so: read, and rewritten uncompressed when written to), backing chains
//! up to [`MAX_CHAIN`] deep, discard and write-zeroes. [`create`] makes version 3 images.
//! Refused with a reason ([`header::Header::refusal`]): encryption, external data files,
//! subclusters, images marked corrupt, and for writing, internal snapshots and images left
//! dirty by QEMU's lazy refcounts.
//!
//! Where it lives: [`header`] (the header and its extensions), [`meta`] (L1/L2 tables,
//! refcounts, allocation and the order changes reach the disk), [`queue`] (requests,
//! mapped to the file and the backing chain), [`compressed`] (inflating clusters).

mod compressed;
pub mod header;
mod meta;
mod queue;

pub use header::Header;
pub use queue::Qcow2Queue;

use std::io;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::disk::{AnyDisk, Disk, DiskInfo, Size};
use crate::error::{StorageError, StorageErrorKind};
use meta::Meta;

/// How deep a backing chain may be (QEMU has no limit; a loop must end somewhere).
pub const MAX_CHAIN: usize = 16;

/// L2 cache size unless given (QEMU's default maximum is 32 MiB).
pub const DEFAULT_L2_CACHE: u64 = 32 << 20;

fn spec_error(path: &Path, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(
        StorageErrorKind::InvalidSpec,
        format!("{}: {msg}", path.display()),
    )
}

fn io_error(path: &Path, what: &str, e: io::Error) -> StorageError {
    let kind = if e.kind() == io::ErrorKind::InvalidData {
        StorageErrorKind::InvalidSpec
    } else {
        StorageErrorKind::Io
    };
    StorageError::new(kind, format!("{}: {what}: {e}", path.display()))
}

/// What the queues share: the metadata under its lock, the image file and the backing
/// node, for control-plane I/O (metadata, copy-on-write).
pub(crate) struct Shared {
    pub meta: Mutex<Meta>,
    pub file: AnyDisk,
    pub backing: Option<AnyDisk>,
    pub path: PathBuf,
    /// Bytes of L2 tables kept (for a new image on top, after a snapshot).
    pub l2_cache: u64,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The image a qcow2 node serves now, and how many times that changed (a snapshot puts a
/// new image on top): queues follow at their next request.
pub(crate) struct Active {
    shared: RwLock<Arc<Shared>>,
    pub generation: AtomicU64,
}

impl Active {
    pub(crate) fn get(&self) -> Arc<Shared> {
        self.shared
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An open qcow2 image.
pub struct Qcow2Disk {
    active: Arc<Active>,
    info: DiskInfo,
}

/// Which backing file a qcow2 node reads through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The one the image names (opened read-only; its format from the image's
    /// backing-format extension, else probed: a read-only open may look).
    FromImage,
    /// None: what the image leaves unallocated reads as zeroes (QEMU's `backing=null`).
    Without,
}

/// One image below a qcow2 node's top, as [`Qcow2Disk::chain`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainImage {
    pub path: String,
    pub format: &'static str,
}

/// Reads and checks the header of the image in `file` (at `path`); its file's length.
fn read_header(
    file: &AnyDisk,
    path: &Path,
    read_only: bool,
) -> Result<(Header, u64), StorageError> {
    // The file's own length (the node's size is rounded down to whole sectors).
    let meta_data = std::fs::metadata(path).map_err(|e| io_error(path, "stat", e))?;
    if !read_only && !meta_data.is_file() {
        return Err(spec_error(
            path,
            "a writable qcow2 image must be a regular file (new clusters go past its end, \
             which a block device does not have)",
        ));
    }
    let file_len = if meta_data.is_file() {
        meta_data.len()
    } else {
        file.info().capacity.get()
    };
    let mut first = vec![0u8; 65536.min(file_len as usize).max(72)];
    file.read_at(&mut first[..(file_len as usize).min(65536)], 0)
        .map_err(|e| io_error(path, "reading the header", e))?;
    let header = Header::parse(&first, file_len).map_err(|e| spec_error(path, e))?;
    if let Some(why) = header.refusal(!read_only) {
        return Err(spec_error(path, why));
    }
    if file.info().direct {
        return Err(spec_error(
            path,
            "qcow2 over an O_DIRECT file (direct=on) is not supported yet: its metadata I/O \
             is not aligned for it",
        ));
    }
    Ok((header, file_len))
}

/// The shared state of an image whose header is read, over `backing`.
fn open_shared(
    file: AnyDisk,
    path: &Path,
    (header, file_len): (Header, u64),
    read_only: bool,
    l2_cache: u64,
    backing: Option<AnyDisk>,
) -> Result<Shared, StorageError> {
    let meta = Meta::open(&file, header.clone(), file_len, !read_only, l2_cache)
        .map_err(|e| io_error(path, "reading the metadata", e))?;
    // Autoclear bits name extensions whose consistency we would not keep (persistent dirty
    // bitmaps): a program that writes an image without knowing them clears them, so that
    // QEMU does not trust bitmaps that missed our writes.
    if !read_only && header.version >= 3 && header.autoclear != 0 {
        file.write_at(&[0u8; 8], header::OFF_AUTOCLEAR)
            .and_then(|_| file.flush())
            .map_err(|e| io_error(path, "clearing the autoclear bits", e))?;
        log::info!(
            "{}: cleared autoclear feature bits {:#x} (extensions such as dirty bitmaps that \
             this node does not keep up to date)",
            path.display(),
            header.autoclear
        );
    }
    Ok(Shared {
        meta: Mutex::new(meta),
        file,
        backing,
        path: path.to_owned(),
        l2_cache,
    })
}

/// `stem@name.qcow2`, the name of a snapshot of the image `stem.*`.
fn snapshot_file(image: &Path, name: &str) -> Result<PathBuf, StorageError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(StorageError::new(
            StorageErrorKind::InvalidArgument,
            format!("snapshot name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"),
        ));
    }
    let stem = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(image.with_file_name(format!("{stem}@{name}.qcow2")))
}

/// The snapshot name of `file` if it is one of `image`'s (`stem@name.qcow2`).
pub fn snapshot_name(image: &Path, file: &Path) -> Option<String> {
    let stem = image.file_stem()?.to_string_lossy().into_owned();
    let name = file.file_name()?.to_string_lossy().into_owned();
    name.strip_prefix(&format!("{stem}@"))?
        .strip_suffix(".qcow2")
        .map(str::to_owned)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

impl Qcow2Disk {
    /// Opens the image in `file` (a file node, already open), at `path` for messages and
    /// relative backing names. `depth`: how many images are above this one.
    pub fn open(
        file: AnyDisk,
        path: &Path,
        read_only: bool,
        backing: &Backing,
        l2_cache: u64,
        depth: usize,
    ) -> Result<Qcow2Disk, StorageError> {
        let (header, file_len) = read_header(&file, path, read_only)?;
        let backing = match (backing, header.backing_path(path)) {
            (Backing::FromImage, Some(b)) => {
                if depth + 1 >= MAX_CHAIN {
                    return Err(spec_error(
                        path,
                        format!("the backing chain is deeper than {MAX_CHAIN} images"),
                    ));
                }
                Some(
                    open_backing(&b, header.backing_format.as_deref(), depth + 1).map_err(|e| {
                        StorageError::new(
                            e.kind(),
                            format!("{}: backing file: {e}", path.display()),
                        )
                    })?,
                )
            }
            _ => None,
        };
        if let Some(b) = &backing {
            log::info!(
                "{}: backing file {} ({} bytes)",
                path.display(),
                b.info().path,
                b.info().capacity.get()
            );
        }
        let shared = open_shared(file, path, (header, file_len), read_only, l2_cache, backing)?;
        Ok(Qcow2Disk::serving(Arc::new(shared), read_only, path))
    }

    /// A node serving `shared` (named `path`).
    fn serving(shared: Arc<Shared>, read_only: bool, path: &Path) -> Qcow2Disk {
        let base = shared.file.info();
        let size = shared.lock().header.size;
        let info = DiskInfo {
            capacity: Size::new(size),
            read_only,
            direct: base.direct,
            format: "qcow2",
            path: path.display().to_string(),
            engine: base.engine,
            discard: true,
            identity: base.identity,
        };
        Qcow2Disk {
            active: Arc::new(Active {
                shared: RwLock::new(shared),
                generation: AtomicU64::new(0),
            }),
            info,
        }
    }

    pub fn header(&self) -> Header {
        self.active.get().lock().header.clone()
    }

    /// The graph below, as text.
    pub fn describe(&self) -> String {
        match &self.active.get().backing {
            Some(b) => format!("qcow2(file, backing: {})", b.describe()),
            None => "qcow2(file)".into(),
        }
    }

    /// The images below the top, from the nearest down.
    pub fn chain(&self) -> Vec<ChainImage> {
        let mut out = Vec::new();
        let mut cur = self.active.get();
        while let Some(b) = &cur.backing {
            out.push(ChainImage {
                path: b.info().path.clone(),
                format: b.info().format,
            });
            let next = match b {
                AnyDisk::Qcow2(q) => q.active.get(),
                _ => break,
            };
            cur = next;
        }
        out
    }

    /// Takes an external snapshot named `name`, as QEMU's `blockdev-snapshot-sync` does,
    /// keeping the image's own name for what the guest writes next: the image as it is now
    /// becomes `stem@name.qcow2` (read-only from now on), and a new, empty image in its
    /// place names it as its backing file. Durable when it returns; a crash in between
    /// leaves either the image as it was (and perhaps the snapshot's name linked to it) or
    /// the new image over the snapshot. The caller has stopped the disk's queues (nothing
    /// may be in flight); they follow the switch at their next request. Returns the
    /// snapshot's file.
    pub fn snapshot(&self, name: &str) -> Result<PathBuf, StorageError> {
        if self.info.read_only {
            return Err(StorageError::new(
                StorageErrorKind::InvalidArgument,
                "a read-only disk takes no snapshots",
            ));
        }
        let old = self.active.get();
        let path = old.path.clone();
        let frozen = snapshot_file(&path, name)?;
        if frozen.exists() {
            return Err(StorageError::new(
                StorageErrorKind::InvalidArgument,
                format!(
                    "a snapshot named {name:?} exists already ({})",
                    frozen.display()
                ),
            ));
        }
        let io = |what: &str, e: io::Error| io_error(&path, what, e);
        old.lock()
            .flush(&old.file)
            .map_err(|e| io("flushing before the snapshot", e))?;
        let (size, cluster_size) = {
            let m = old.lock();
            (m.header.size, m.cluster_size())
        };
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{file_name}.new"));
        let _ = std::fs::remove_file(&tmp);
        let frozen_name = frozen
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        create(
            &tmp,
            &CreateOptions {
                size,
                cluster_size,
                backing: Some((frozen_name, "qcow2".into())),
            },
        )?;
        let undo = |e: StorageError| {
            let _ = std::fs::remove_file(&tmp);
            e
        };
        let engine = crate::disk::engine_for_path(&tmp);
        let file =
            AnyDisk::Raw(crate::disk::RawDisk::open(&tmp, false, false, engine).map_err(undo)?);
        std::fs::hard_link(&path, &frozen)
            .and_then(|_| sync_dir(&frozen))
            .map_err(|e| undo(io("naming the snapshot", e)))?;
        if let Err(e) = std::fs::rename(&tmp, &path).and_then(|_| sync_dir(&path)) {
            let _ = std::fs::remove_file(&frozen);
            return Err(undo(io("putting the new image in place", e)));
        }
        // From here the files are the new chain: a restart opens it. Serve it.
        let below = AnyDisk::Qcow2(Box::new(Qcow2Disk::serving(old.clone(), true, &frozen)));
        let header = read_header(&file, &path, false)?;
        let shared = open_shared(file, &path, header, false, old.l2_cache, Some(below))?;
        *self
            .active
            .shared
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(shared);
        self.active.generation.fetch_add(1, Ordering::Release);
        log::info!(
            "{}: snapshot {name:?} taken: {} holds the image as it was",
            path.display(),
            frozen.display()
        );
        Ok(frozen)
    }
}

/// Opens a backing file read-only: qcow2 or raw, as the image says, else as its first
/// bytes say (probing a read-only image is safe: nothing it holds can change how a
/// writable one is opened).
fn open_backing(path: &Path, format: Option<&str>, depth: usize) -> Result<AnyDisk, StorageError> {
    let engine = crate::disk::engine_for_path(path);
    let file = AnyDisk::Raw(crate::disk::RawDisk::open(path, true, false, engine)?);
    let (format, probed) = match format {
        Some(f) => (f.to_string(), false),
        None => {
            let mut magic = [0u8; 4];
            let qcow2 =
                file.read_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == header::MAGIC;
            (if qcow2 { "qcow2" } else { "raw" }.to_string(), true)
        }
    };
    match format.as_str() {
        "raw" => Ok(file),
        "qcow2" => {
            let disk = Qcow2Disk::open(
                file,
                path,
                true,
                &Backing::FromImage,
                DEFAULT_L2_CACHE,
                depth,
            )?;
            // A raw base whose guest wrote a qcow2 header probes as qcow2; the backing
            // file such a header names could be any file on the host. Only images whose
            // format was given may lead further down.
            if probed && !disk.chain().is_empty() {
                return Err(spec_error(
                    path,
                    "its format is not recorded in the image above, and as a qcow2 image it \
                     names a backing file of its own: record the formats (qemu-img rebase -u \
                     -F FORMAT -b BACKING IMAGE) to use this chain",
                ));
            }
            Ok(AnyDisk::Qcow2(Box::new(disk)))
        }
        other => Err(spec_error(
            path,
            format!("backing format {other:?}: only qcow2 and raw are supported"),
        )),
    }
}

impl Disk for Qcow2Disk {
    type Queue = Qcow2Queue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<Qcow2Queue, StorageError> {
        Qcow2Queue::new(self.active.clone(), depth, self.info.capacity.clone())
    }

    fn flush(&self) -> io::Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        let shared = self.active.get();
        let mut meta = shared.lock();
        meta.flush(&shared.file)
    }

    fn close(&self) {
        if let Err(e) = self.flush() {
            log::error!("{}: flush at close: {e}", self.info.path);
        }
        self.active.get().file.close();
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        queue::read_sync(&self.active.get(), buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        queue::write_sync(&self.active.get(), buf, offset)
    }
}

/// Reads `buf` at `offset` of `node`, zeroes past `size` (and past the node's end).
pub(crate) fn read_clamped(
    node: &AnyDisk,
    buf: &mut [u8],
    offset: u64,
    size: u64,
) -> io::Result<()> {
    let size = size.min(match node {
        // A file's length as it is now (an image grows).
        AnyDisk::Raw(_) => u64::MAX,
        other => other.info().capacity.get(),
    });
    let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    if n == 0 {
        return Ok(());
    }
    match node.read_at(&mut buf[..n], offset) {
        // Compressed data may run past the end of the file: the rest reads as zeroes.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            let mut got = 0;
            while got < n {
                let step = (n - got).min(512);
                if node
                    .read_at(&mut buf[got..got + step], offset + got as u64)
                    .is_err()
                {
                    break;
                }
                got += step;
            }
            buf[got..n].fill(0);
            Ok(())
        }
        other => other,
    }
}

/// A completion fd source for queues that finish requests themselves (see
/// [`queue`]).
pub(crate) fn eventfd() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd has no memory preconditions; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nobody else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Wakes whoever waits on `fd` (an eventfd).
pub(crate) fn signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a valid buffer to our own eventfd.
    unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

/// Options of [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// The backing file's name as the image will record it, and its format.
    pub backing: Option<(String, String)>,
}

/// Makes a version 3 qcow2 image at `path` (which must not exist), as `qemu-img create -f
/// qcow2` does: 16-bit refcounts, no preallocation. Durable when it returns.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), StorageError> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let bits = opts.cluster_size.trailing_zeros();
    if !opts.cluster_size.is_power_of_two() || !(9..=21).contains(&bits) {
        return Err(spec_error(
            path,
            format!(
                "cluster size {}: a power of two from 512 bytes to 2 MiB",
                opts.cluster_size
            ),
        ));
    }
    if opts.size == 0 || !opts.size.is_multiple_of(512) {
        return Err(spec_error(
            path,
            format!("size {}: a whole number of 512-byte sectors", opts.size),
        ));
    }
    let cluster = opts.cluster_size;
    let l1_size = opts.size.div_ceil(cluster).div_ceil(cluster / 8);
    let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
    if l1_size > u64::from(u32::MAX) {
        return Err(spec_error(path, "too large for this cluster size"));
    }
    if let Some((name, format)) = &opts.backing {
        // The header, the backing-format extension and the end marker, then the name: all
        // in the first cluster.
        if format.len() > 64 {
            return Err(spec_error(path, "the backing format name is too long"));
        }
        let room = cluster as usize - 112 - 16 - format.len().div_ceil(8) * 8;
        if name.len() > 1023 || name.len() > room {
            return Err(spec_error(
                path,
                "the backing file name does not fit in the header (at most 1023 bytes, and \
                 within the first cluster)",
            ));
        }
    }
    // Clusters: header, refcount table, refcount block, L1 table.
    let used = 3 + l1_clusters;
    let per_block = cluster * 8 / 16;
    if used > per_block {
        return Err(spec_error(
            path,
            "too large for one refcount block at this cluster size",
        ));
    }
    let head = header::new_image(
        opts.size,
        bits,
        opts.backing.as_ref().map(|(n, f)| (n.as_str(), f.as_str())),
        l1_size as u32,
    );
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_error(path, "creating", e))?;
    let write = |e| io_error(path, "writing", e);
    file.write_all(&head).map_err(write)?;
    let mut table = vec![0u8; cluster as usize];
    table[..8].copy_from_slice(&(2 * cluster).to_be_bytes());
    file.write_all_at(&table, cluster).map_err(write)?;
    let mut block = vec![0u8; cluster as usize];
    for i in 0..used as usize {
        block[2 * i..2 * i + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.write_all_at(&block, 2 * cluster).map_err(write)?;
    file.set_len(used * cluster).map_err(write)?;
    file.sync_all().map_err(write)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
    }
    file.flush().map_err(write)?;
    Ok(())
}
