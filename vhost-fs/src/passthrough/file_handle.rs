//! Inodes held as file handles instead of open descriptors (virtiofsd's
//! `--inode-file-handles=never|prefer|mandatory`).
//!
//! An O_PATH descriptor per inode the guest knows costs one open file each, without bound
//! but `--rlimit-nofile`. A file handle (`name_to_handle_at`) names the same inode in a few
//! bytes with no file open; `open_by_handle_at` (which needs CAP_DAC_READ_SEARCH) turns it
//! back into a descriptor when a request needs one, given any descriptor on the handle's
//! mount: a [`MountFd`], one per mount, shared by the inodes on it and closed with the last.
//!
//! A handle is only ever made here from a descriptor the passthrough filesystem got by
//! resolving a name beneath the share, and only ever opened for that inode: the guest names
//! inodes by node id, never by handle, so it cannot make us open anything else.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};

use super::sys::{cvt, errno};

/// When inodes are held as file handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InodeFileHandles {
    /// Always O_PATH descriptors.
    #[default]
    Never,
    /// File handles where the filesystem supports them, O_PATH descriptors elsewhere.
    Prefer,
    /// File handles only: the share must support them, and an inode on a filesystem that
    /// does not cannot be looked up.
    Mandatory,
}

impl FromStr for InodeFileHandles {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Self::Never),
            // virtiofsd's deprecated alias.
            "prefer" | "fallback" => Ok(Self::Prefer),
            "mandatory" => Ok(Self::Mandatory),
            other => Err(format!(
                "--inode-file-handles {other}: expected never, prefer or mandatory"
            )),
        }
    }
}

/// `MAX_HANDLE_SZ` of `<linux/exportfs.h>`.
const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for the largest handle.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// A descriptor on one mount, the `mount_fd` argument of `open_by_handle_at`.
#[derive(Debug)]
pub struct MountFd {
    id: i32,
    file: OwnedFd,
}

/// The mount descriptors in use, by mount id. Entries are weak: a mount's descriptor is
/// closed when no inode on it is left (so the daemon never keeps a host mount busy).
#[derive(Debug, Default)]
pub struct MountFds {
    map: Mutex<HashMap<i32, Weak<MountFd>>>,
}

impl MountFds {
    /// The descriptor for mount `id`, if one is open.
    pub fn get(&self, id: i32) -> Option<Arc<MountFd>> {
        self.lock().get(&id).and_then(Weak::upgrade)
    }

    /// Registers `file` (a non-O_PATH descriptor on mount `id`: the kernel refuses O_PATH
    /// ones) unless another thread did first, and returns the one in use.
    pub fn insert(&self, id: i32, file: OwnedFd) -> Arc<MountFd> {
        let mut map = self.lock();
        if let Some(existing) = map.get(&id).and_then(Weak::upgrade) {
            return existing;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let mount = Arc::new(MountFd { id, file });
        map.insert(id, Arc::downgrade(&mount));
        mount
    }

    /// Mounts with a descriptor open.
    pub fn open_count(&self) -> usize {
        self.lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Weak<MountFd>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A file handle and the mount it opens on.
#[derive(Debug)]
pub struct FileHandle {
    mount: Arc<MountFd>,
    handle_type: i32,
    bytes: Box<[u8]>,
}

/// What `name_to_handle_at` gave for a descriptor: the handle and its mount id, not yet
/// tied to a mount descriptor.
#[derive(Debug)]
pub struct UnboundHandle {
    pub mount_id: i32,
    handle_type: i32,
    bytes: Box<[u8]>,
}

impl UnboundHandle {
    /// What names this inode among all inodes the daemon knows (see `InodeKey`).
    pub fn key(&self) -> (i32, i32, Box<[u8]>) {
        (self.mount_id, self.handle_type, self.bytes.clone())
    }

    pub fn bind(self, mount: Arc<MountFd>) -> io::Result<FileHandle> {
        if mount.id != self.mount_id {
            return Err(errno(libc::EXDEV));
        }
        Ok(FileHandle {
            mount,
            handle_type: self.handle_type,
            bytes: self.bytes,
        })
    }
}

/// The file handle of the inode `fd` refers to (itself, not what a symlink points to).
/// `Ok(None)` when its filesystem has no file handles (EOPNOTSUPP) or the handle would not
/// fit (EOVERFLOW): both are lasting properties of the filesystem, not passing failures.
pub fn handle_of(fd: BorrowedFd<'_>) -> io::Result<Option<UnboundHandle>> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    let empty: &CStr = c"";
    // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` says how much room follows
    // the header, and that room exists; `empty` is NUL-terminated; `mount_id` is a valid
    // out-pointer. The kernel writes no more than `handle_bytes` bytes of handle.
    let ret = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            empty.as_ptr(),
            (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if let Err(e) = cvt(ret) {
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EOVERFLOW) => Ok(None),
            _ => Err(e),
        };
    }
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(Some(UnboundHandle {
        mount_id,
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..len].into(),
    }))
}

/// The mount id of the mount `fd` is on (the id `name_to_handle_at` reports).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let empty: &CStr = c"";
    // SAFETY: `empty` is NUL-terminated and `stx` is a valid out-buffer for one statx.
    cvt(unsafe {
        libc::statx(
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the buffer (zeroed before, so fully initialised).
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(errno(libc::EOPNOTSUPP));
    }
    i32::try_from(stx.stx_mnt_id).map_err(|_| errno(libc::EOVERFLOW))
}

impl FileHandle {
    /// Opens the inode with `flags` (`O_PATH` for a descriptor to resolve names under or
    /// stat; `O_RDONLY` etc. for I/O on a regular file or directory, which the caller has
    /// checked it is). ESTALE when the inode no longer exists on the host.
    pub fn open(&self, flags: i32) -> io::Result<OwnedFd> {
        let mut raw = RawHandle {
            handle_bytes: self.bytes.len() as u32,
            handle_type: self.handle_type,
            f_handle: [0; MAX_HANDLE_SZ],
        };
        raw.f_handle[..self.bytes.len()].copy_from_slice(&self.bytes);
        let mut tries = 0;
        let fd = loop {
            // SAFETY: `raw` is a `struct file_handle` whose `handle_bytes` bytes of handle
            // follow its header; the mount descriptor is open for the life of `self.mount`.
            // The result is checked.
            let r = cvt(unsafe {
                libc::open_by_handle_at(
                    self.mount.file.as_raw_fd(),
                    (&mut raw as *mut RawHandle).cast::<libc::file_handle>(),
                    flags | libc::O_CLOEXEC,
                )
            });
            // ENOMEM is tried again: the suite once saw it, where ESTALE was due, for a
            // handle whose file had just been unlinked on the host (the kernel's decode
            // racing the inode's eviction); a real shortage fails every time.
            match r {
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && tries < 3 => tries += 1,
                other => break other?,
            }
        };
        // SAFETY: a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Checks that inodes on the filesystem of `dir` (the share's root, an O_PATH descriptor)
/// can be held as handles: a handle can be made and opened again. `mount_file` is `dir`
/// opened for reading (the mount descriptor). Returns the mount descriptor on success.
pub fn probe(dir: BorrowedFd<'_>, mount_file: File) -> io::Result<Arc<MountFd>> {
    let handle = handle_of(dir)?.ok_or_else(|| errno(libc::EOPNOTSUPP))?;
    let mount = Arc::new(MountFd {
        id: handle.mount_id,
        file: OwnedFd::from(mount_file),
    });
    let handle = handle.bind(mount.clone())?;
    handle.open(libc::O_PATH)?;
    Ok(mount)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn parses_virtiofsd_names() {
        assert_eq!("never".parse(), Ok(InodeFileHandles::Never));
        assert_eq!("prefer".parse(), Ok(InodeFileHandles::Prefer));
        assert_eq!("fallback".parse(), Ok(InodeFileHandles::Prefer));
        assert_eq!("mandatory".parse(), Ok(InodeFileHandles::Mandatory));
        assert!("always".parse::<InodeFileHandles>().is_err());
    }

    /// A handle made from a descriptor opens the same inode again; /proc has no handles.
    #[test]
    fn handles_round_trip_and_procfs_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let file = File::open(&path).unwrap();
        let handle = handle_of(file.as_fd())
            .unwrap()
            .expect("the temp dir's filesystem has handles");
        assert_eq!(handle.mount_id, mount_id(file.as_fd()).unwrap());
        let mount = MountFds::default().insert(
            handle.mount_id,
            OwnedFd::from(File::open(dir.path()).unwrap()),
        );
        let handle = handle.bind(mount).unwrap();
        match handle.open(libc::O_RDONLY) {
            Ok(fd) => {
                let a = super::super::sys::fstat(fd.as_fd()).unwrap();
                let b = super::super::sys::fstat(file.as_fd()).unwrap();
                assert_eq!((a.st_dev, a.st_ino), (b.st_dev, b.st_ino));
            }
            // Not root: open_by_handle_at needs CAP_DAC_READ_SEARCH.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM)),
        }
        let proc = File::open("/proc/self/status").unwrap();
        assert!(handle_of(proc.as_fd()).unwrap().is_none());
    }
}
