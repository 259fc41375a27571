//! The Ceph RBD leaf (cargo feature `rbd`): a disk on an RBD image through librbd.
//!
//! - this module: connecting (librados), opening the image, and the control-plane handle,
//!   [`RbdDisk`], whose blocking `read_at`/`write_at`/`flush` serve a parent's background
//!   work (a tier's write-back over Ceph).
//! - [`queue`]: one worker's queue: asynchronous, vectored reads and writes straight
//!   between the image and guest memory, flush, discard and write-zeroes.
//! - [`ffi`]: the librbd/librados calls, generated from Debian's librbd-dev headers.
//!
//! One image handle serves every queue (librbd handles are thread-safe, and one handle
//! keeps the image's exclusive lock in one place: a handle per queue would pass the lock
//! back and forth on every write). So completions are not taken with
//! `rbd_set_image_notification` (one eventfd per image) but by a callback per request,
//! which hands it to its own queue's lock-free list and eventfd.

pub(crate) mod ffi;
mod queue;

pub use queue::RbdQueue;

use std::ffi::CString;
use std::io;
use std::os::raw::c_char;

use crate::disk::{Disk, DiskInfo};
use crate::engine::EngineKind;
use crate::error::{StorageError, StorageErrorKind};

pub use crate::disk::RbdSpec;

/// The librados cluster handle, its I/O context and the open image, closed in that
/// order's reverse.
pub(crate) struct Handles {
    cluster: ffi::rados_t,
    ioctx: ffi::rados_ioctx_t,
    /// The open image; null once closed ([`Disk::close`]). Every call on it holds the read
    /// lock, so closing (the write lock) never pulls the handle from under a call.
    pub(crate) image: std::sync::RwLock<ffi::rbd_image_t>,
}

impl Handles {
    /// The open image, for the duration of a call; `None` once closed.
    pub(crate) fn image(&self) -> Option<ImageGuard<'_>> {
        let g = self.image.read().unwrap_or_else(|p| p.into_inner());
        (!g.is_null()).then_some(ImageGuard(g))
    }

    fn close_image(&self) {
        let mut g = self.image.write().unwrap_or_else(|p| p.into_inner());
        if !g.is_null() {
            // SAFETY: an open image, closed once: the write lock excludes every call on it,
            // and the pointer is nulled before the lock is released.
            unsafe { ffi::rbd_close(*g) };
            *g = std::ptr::null_mut();
        }
    }
}

/// An open image, held open while this lives.
pub(crate) struct ImageGuard<'a>(std::sync::RwLockReadGuard<'a, ffi::rbd_image_t>);

impl ImageGuard<'_> {
    pub(crate) fn get(&self) -> ffi::rbd_image_t {
        *self.0
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the rbd image is closed")
}

// SAFETY: librados and librbd handles may be used from any thread (librbd serialises
// internally); we close them only in `Drop`, when no queue holds them any more (each queue
// holds the `Arc<Handles>`).
unsafe impl Send for Handles {}
// SAFETY: as above: every call we make on a shared handle is thread-safe in librbd.
unsafe impl Sync for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        self.close_image();
        // SAFETY: the handles were opened by `connect` and are closed once, here, after the
        // image.
        unsafe {
            if !self.ioctx.is_null() {
                ffi::rados_ioctx_destroy(self.ioctx);
            }
            if !self.cluster.is_null() {
                ffi::rados_shutdown(self.cluster);
            }
        }
    }
}

fn cstring(what: &str, s: &str) -> Result<CString, StorageError> {
    CString::new(s).map_err(|_| {
        StorageError::new(
            StorageErrorKind::InvalidSpec,
            format!("rbd {what} {s:?} contains a NUL byte"),
        )
    })
}

fn errno(what: &str, spec: &RbdSpec, ret: i32) -> StorageError {
    StorageError::new(
        StorageErrorKind::Open,
        format!("rbd {}/{}: {what}", spec.pool, spec.image),
    )
    .with_source(io::Error::from_raw_os_error(-ret))
}

fn connect(spec: &RbdSpec, read_only: bool) -> Result<Handles, StorageError> {
    let id = spec.id.as_deref().map(|i| cstring("id", i)).transpose()?;
    let conf = match &spec.conf {
        Some(p) => Some(cstring("conf", &p.display().to_string())?),
        None => None,
    };
    let pool = cstring("pool", &spec.pool)?;
    let image = cstring("image", &spec.image)?;
    let mut h = Handles {
        cluster: std::ptr::null_mut(),
        ioctx: std::ptr::null_mut(),
        image: std::sync::RwLock::new(std::ptr::null_mut()),
    };
    // SAFETY: every pointer passed is a valid NUL-terminated string or an out-pointer to
    // a field of `h`; on failure `h`'s Drop releases what was opened.
    unsafe {
        let ret = ffi::rados_create(
            &mut h.cluster,
            id.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        );
        if ret < 0 {
            return Err(errno("cannot create the cluster handle", spec, ret));
        }
        let ret = ffi::rados_conf_read_file(
            h.cluster,
            conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        );
        if ret < 0 {
            return Err(errno("cannot read the Ceph configuration", spec, ret));
        }
        // A cluster that does not answer fails the open in 10 s instead of hanging.
        let (k, v) = (c"client_mount_timeout", c"10");
        ffi::rados_conf_set(h.cluster, k.as_ptr(), v.as_ptr());
        let ret = ffi::rados_connect(h.cluster);
        if ret < 0 {
            return Err(errno("cannot connect to the cluster", spec, ret));
        }
        let ret = ffi::rados_ioctx_create(h.cluster, pool.as_ptr(), &mut h.ioctx);
        if ret < 0 {
            return Err(errno("cannot open the pool", spec, ret));
        }
        let snap: *const c_char = std::ptr::null();
        let mut img: ffi::rbd_image_t = std::ptr::null_mut();
        let ret = if read_only {
            ffi::rbd_open_read_only(h.ioctx, image.as_ptr(), &mut img, snap)
        } else {
            ffi::rbd_open(h.ioctx, image.as_ptr(), &mut img, snap)
        };
        if ret < 0 {
            return Err(errno("cannot open the image", spec, ret));
        }
        *h.image.get_mut().unwrap_or_else(|p| p.into_inner()) = img;
    }
    Ok(h)
}

/// An RBD image.
pub struct RbdDisk {
    handles: std::sync::Arc<Handles>,
    info: DiskInfo,
}

impl RbdDisk {
    pub fn open(spec: &RbdSpec, read_only: bool) -> Result<RbdDisk, StorageError> {
        let handles = connect(spec, read_only)?;
        let mut size = 0u64;
        let image = handles
            .image()
            .ok_or_else(|| errno("the image closed", spec, -libc::EIO))?;
        // SAFETY: an open image (held by the guard) and an out-pointer to a local.
        let ret = unsafe { ffi::rbd_get_size(image.get(), &mut size) };
        drop(image);
        if ret < 0 {
            return Err(errno("cannot read the image size", spec, ret));
        }
        let capacity = size & !511;
        if capacity == 0 {
            return Err(StorageError::new(
                StorageErrorKind::InvalidImage,
                format!("rbd {}/{}: the image is empty", spec.pool, spec.image),
            ));
        }
        let name = format!("rbd:{}/{}", spec.pool, spec.image);
        Ok(RbdDisk {
            handles: std::sync::Arc::new(handles),
            info: DiskInfo {
                capacity: crate::disk::Size::new(capacity),
                read_only,
                direct: false,
                format: "rbd",
                identity: (fnv(&name), 0),
                path: name,
                // librbd does its own I/O; no engine of ours runs.
                engine: EngineKind::Sync,
                discard: !read_only,
            },
        })
    }
}

/// A stable number for a name (the tier's check that its cache belongs to this image).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn result(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as usize)
    }
}

impl Disk for RbdDisk {
    type Queue = RbdQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<RbdQueue, StorageError> {
        RbdQueue::new(self.handles.clone(), self.info.capacity.clone(), depth).map_err(|e| {
            StorageError::new(StorageErrorKind::Engine, "cannot create an rbd queue")
                .with_path(&self.info.path)
                .with_source(e)
        })
    }

    fn flush(&self) -> io::Result<()> {
        let image = self.handles.image().ok_or_else(closed)?;
        // SAFETY: an open image, held open by the guard.
        result(unsafe { ffi::rbd_flush(image.get()) } as isize).map(|_| ())
    }

    fn close(&self) {
        // Releases the image's exclusive lock at once: another client (the next daemon)
        // would otherwise wait for the cluster to give up on us (about 30 s).
        self.handles.close_image();
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let image = self.handles.image().ok_or_else(closed)?;
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes for the whole call; the
        // image is held open by the guard.
        let n = result(unsafe {
            ffi::rbd_read(image.get(), offset, buf.len(), buf.as_mut_ptr().cast())
        })?;
        if n != buf.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.info.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let image = self.handles.image().ok_or_else(closed)?;
        // SAFETY: `buf` is valid for `buf.len()` bytes of reads for the whole call; the
        // image is held open by the guard.
        let n =
            result(unsafe { ffi::rbd_write(image.get(), offset, buf.len(), buf.as_ptr().cast()) })?;
        if n != buf.len() {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        Ok(())
    }
}
