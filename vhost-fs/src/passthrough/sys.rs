//! Thin, checked wrappers over the system calls the passthrough filesystem uses. Each one
//! takes Rust types, returns `io::Result`, and owns the `unsafe` needed to call libc.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Turns a `-1` return into the thread's `errno`.
pub fn cvt<T: Copy + PartialEq + From<i8>>(ret: T) -> io::Result<T> {
    if ret == T::from(-1) {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// `struct open_how` of `<linux/openat2.h>`.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dirfd, name, flags | O_NOFOLLOW | O_CLOEXEC, RESOLVE_BENEATH |
/// RESOLVE_NO_MAGICLINKS)`: `name` resolves strictly below `dirfd`, never through a
/// symlink in its last component, never through a `/proc` magic link.
pub fn openat_beneath(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode & 0o7777)
        } else {
            0
        },
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: `name` is NUL-terminated, `how` is a valid open_how of the size passed;
        // the kernel only reads them. The result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            // openat2 returns EAGAIN when a concurrent rename raced the RESOLVE_BENEATH
            // check; retrying is what the man page asks for.
            if e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
}

/// Plain `openat` (for `..` and for reopening through `/proc/self/fd`).
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the result is checked.
    let fd = cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The status of `fd` itself (a symlink's own status for an O_PATH symlink fd).
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid out-buffer; the empty path is NUL-terminated.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so the kernel filled `st`.
    Ok(unsafe { st.assume_init() })
}

/// The `/proc/self/fd` entry name of `fd`.
pub fn fd_name(fd: RawFd) -> std::ffi::CString {
    std::ffi::CString::new(fd.to_string()).unwrap_or_default()
}

/// Reopens the inode behind the O_PATH descriptor `fd` with `flags`, through the
/// `/proc/self/fd` directory `proc_self_fd`. The caller has checked the inode's type.
pub fn reopen(proc_self_fd: BorrowedFd<'_>, fd: RawFd, flags: i32) -> io::Result<File> {
    openat(proc_self_fd, &fd_name(fd), reopen_flags(flags)).map(File::from)
}

/// `flags` without what would create a file or refuse the (already resolved) inode.
pub fn reopen_flags(flags: i32) -> i32 {
    flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW)
}

/// The `O_ACCMODE` bits `fd` was opened with.
pub fn access_mode(fd: RawFd) -> io::Result<i32> {
    // SAFETY: F_GETFL takes no argument and passes no memory.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) }).map(|flags| flags & libc::O_ACCMODE)
}

pub fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

/// `fchmodat` through `/proc/self/fd` (chmod of the inode behind an O_PATH fd).
pub fn chmod_inode(proc_self_fd: BorrowedFd<'_>, fd: RawFd, mode: u32) -> io::Result<()> {
    let name = fd_name(fd);
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::fchmodat(proc_self_fd.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

pub fn fchown_inode(fd: RawFd, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: the empty path is NUL-terminated.
    cvt(unsafe {
        libc::fchownat(
            fd,
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn ftruncate(fd: RawFd, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| errno(libc::EFBIG))?;
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::ftruncate(fd, size) }).map(drop)
}

/// `utimensat` on the inode behind an O_PATH fd (through `/proc/self/fd`).
pub fn utimens_inode(
    proc_self_fd: BorrowedFd<'_>,
    fd: RawFd,
    times: &[libc::timespec; 2],
) -> io::Result<()> {
    let name = fd_name(fd);
    // SAFETY: `name` is NUL-terminated and `times` points to two timespecs.
    cvt(unsafe { libc::utimensat(proc_self_fd.as_raw_fd(), name.as_ptr(), times.as_ptr(), 0) })
        .map(drop)
}

pub fn futimens(fd: RawFd, times: &[libc::timespec; 2]) -> io::Result<()> {
    // SAFETY: `times` points to two timespecs.
    cvt(unsafe { libc::futimens(fd, times.as_ptr()) }).map(drop)
}

pub fn readlink(fd: RawFd) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its length; the empty path reads the O_PATH link itself.
    let n = cvt(unsafe { libc::readlinkat(fd, c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: RawFd, name: &CStr, mode: u32, rdev: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::mknodat(dir, name.as_ptr(), mode, u64::from(rdev)) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// Links the inode `fd` refers to as `name` in `newdir`, through `proc_self_fd` (an open
/// `/proc/self/fd`): `AT_EMPTY_PATH` would need CAP_DAC_READ_SEARCH, which the daemon drops
/// unless it holds inodes as file handles (virtiofsd links the same way).
pub fn linkat_inode(
    proc_self_fd: BorrowedFd<'_>,
    fd: RawFd,
    newdir: RawFd,
    name: &CStr,
) -> io::Result<()> {
    let link = fd_name(fd);
    // SAFETY: both strings are NUL-terminated.
    cvt(unsafe {
        libc::linkat(
            proc_self_fd.as_raw_fd(),
            link.as_ptr(),
            newdir,
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: RawFd, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: RawFd,
    old: &CStr,
    newdir: RawFd,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    cvt(unsafe { libc::renameat2(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) }).map(drop)
}

pub fn fstatvfs(fd: RawFd) -> io::Result<libc::statvfs> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `st` is a valid out-buffer.
    cvt(unsafe { libc::fstatvfs(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so `st` is initialised.
    Ok(unsafe { st.assume_init() })
}

/// One entry of a `getdents64` buffer.
pub struct RawDirent<'a> {
    pub ino: u64,
    pub off: u64,
    pub typ: u8,
    pub name: &'a [u8],
    /// Bytes of the record in the buffer.
    pub reclen: usize,
}

/// Reads directory entries at `fd`'s current position into `buf`; returns the bytes filled.
pub fn getdents64(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = unsafe { libc::syscall(libc::SYS_getdents64, fd, buf.as_mut_ptr(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Positions directory `fd` after the entry whose `d_off` is `cookie` (what a guest sends
/// back as a READDIR offset). `lseek` takes it where it fits an `off_t`; a cookie of 2^63 or
/// more (NFS and other network filesystems make them) is negative there and refused, so
/// the directory is read from its start up to that entry instead (as virtiofsd 1.14 does).
/// Returns how many bytes of `buf` hold entries already read past the cookie, starting at
/// the returned offset: `(start, end)`, empty when `lseek` did the work.
pub fn seek_dir(fd: RawFd, cookie: u64, buf: &mut [u8]) -> io::Result<(usize, usize)> {
    // The wrap to a negative off_t is what the kernel would see anyway.
    // SAFETY: no memory is passed.
    let r = unsafe { libc::lseek(fd, cookie as i64, libc::SEEK_SET) };
    if r >= 0 {
        return Ok((0, 0));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EINVAL) || cookie <= i64::MAX as u64 {
        return Err(e);
    }
    walk_dir_to(fd, cookie, buf)
}

/// [`seek_dir`] by reading: rewinds `fd` and reads entries until the one whose `d_off` is
/// `cookie`. A cookie no entry has leaves the directory at its end (nothing more to list).
pub fn walk_dir_to(fd: RawFd, cookie: u64, buf: &mut [u8]) -> io::Result<(usize, usize)> {
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::lseek(fd, 0, libc::SEEK_SET) } as i32)?;
    loop {
        let n = getdents64(fd, buf)?;
        if n == 0 {
            return Ok((0, 0));
        }
        let mut pos = 0;
        for d in parse_dirents(&buf[..n]) {
            pos += d.reclen;
            if d.off == cookie {
                return Ok((pos, n));
            }
        }
    }
}

/// Parses a `getdents64` buffer (`linux_dirent64` records), stopping at anything malformed.
pub fn parse_dirents(buf: &[u8]) -> impl Iterator<Item = RawDirent<'_>> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let rec = buf.get(pos..)?;
        if rec.len() < 19 {
            return None;
        }
        let ino = u64::from_ne_bytes(rec[0..8].try_into().ok()?);
        let off = u64::from_ne_bytes(rec[8..16].try_into().ok()?);
        let reclen = usize::from(u16::from_ne_bytes(rec[16..18].try_into().ok()?));
        let typ = rec[18];
        if reclen < 20 || reclen > rec.len() {
            return None;
        }
        let name_field = &rec[19..reclen];
        let name_len = name_field
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_field.len());
        pos += reclen;
        Some(RawDirent {
            ino,
            off,
            typ,
            name: &name_field[..name_len],
            reclen,
        })
    })
}

pub fn lseek(fd: RawFd, offset: u64, whence: i32) -> io::Result<u64> {
    let off = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::lseek(fd, off, whence) }).map(|o| o as u64)
}

/// An `F_OFD_*` lock call on `fd`.
pub fn ofd_lock(fd: RawFd, cmd: i32, lock: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `lock` is a valid, writable flock for the duration of the call.
    cvt(unsafe { libc::fcntl(fd, cmd, lock as *mut libc::flock) }).map(drop)
}

pub fn flock(fd: RawFd, op: i32) -> io::Result<()> {
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::flock(fd, op) }).map(drop)
}

pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    // SAFETY: no memory is passed.
    cvt(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
    let len = i64::try_from(len).map_err(|_| errno(libc::EINVAL))?;
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::fallocate(fd, mode, off, len) }).map(drop)
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
    flags: u32,
) -> io::Result<usize> {
    let mut off_in = i64::try_from(off_in).map_err(|_| errno(libc::EINVAL))?;
    let mut off_out = i64::try_from(off_out).map_err(|_| errno(libc::EINVAL))?;
    // SAFETY: the offsets are valid, writable i64s for the call.
    let n = cvt(unsafe {
        libc::copy_file_range(
            fd_in,
            &mut off_in,
            fd_out,
            &mut off_out,
            len as usize,
            flags,
        )
    })?;
    Ok(n as usize)
}

pub fn syncfs(fd: RawFd) -> io::Result<()> {
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::syncfs(fd) }).map(drop)
}

pub fn faccessat_inode(proc_self_fd: BorrowedFd<'_>, fd: RawFd, mask: i32) -> io::Result<()> {
    let name = fd_name(fd);
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe {
        libc::faccessat(
            proc_self_fd.as_raw_fd(),
            name.as_ptr(),
            mask,
            libc::AT_EACCESS,
        )
    })
    .map(drop)
}

pub fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and `value` is readable for its length.
    cvt(unsafe { libc::fsetxattr(fd, name.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
        .map(drop)
}

/// `fgetxattr`; with an empty `buf` returns the size needed.
pub fn fgetxattr(fd: RawFd, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length (a null pointer with length 0 asks the size).
    let n = cvt(unsafe { libc::fgetxattr(fd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(n as usize)
}

pub fn flistxattr(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for its length.
    let n = cvt(unsafe { libc::flistxattr(fd, buf.as_mut_ptr().cast(), buf.len()) })?;
    Ok(n as usize)
}

pub fn fremovexattr(fd: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated.
    cvt(unsafe { libc::fremovexattr(fd, name.as_ptr()) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// (name, d_off) of every entry from `fd`'s position on, `pending` bytes of `buf` first.
    fn rest(fd: RawFd, buf: &mut [u8], pending: (usize, usize)) -> Vec<(Vec<u8>, u64)> {
        let mut out: Vec<(Vec<u8>, u64)> = parse_dirents(&buf[pending.0..pending.1])
            .map(|d| (d.name.to_vec(), d.off))
            .collect();
        loop {
            let n = getdents64(fd, buf).unwrap();
            if n == 0 {
                return out;
            }
            out.extend(parse_dirents(&buf[..n]).map(|d| (d.name.to_vec(), d.off)));
        }
    }

    /// Finding a cookie by reading gives what seeking to it gives, from any entry, with
    /// buffers that hold one entry or many; a cookie nobody has ends the listing.
    #[test]
    fn walking_to_a_cookie_lands_where_seeking_does() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(dir.path().join(format!("entry-{i:02}")), b"").unwrap();
        }
        let d = std::fs::File::open(dir.path()).unwrap();
        let fd = d.as_raw_fd();
        for size in [512usize, 4096] {
            let mut buf = vec![0u8; size];
            lseek(fd, 0, libc::SEEK_SET).unwrap();
            let all = rest(fd, &mut buf, (0, 0));
            assert!(all.len() >= 42);
            for (_, cookie) in all.iter().step_by(7) {
                lseek(fd, *cookie, libc::SEEK_SET).unwrap();
                let seeked = rest(fd, &mut buf, (0, 0));
                let pending = walk_dir_to(fd, *cookie, &mut buf).unwrap();
                let walked = rest(fd, &mut buf, pending);
                assert_eq!(walked, seeked, "cookie {cookie:#x}, buffer {size}");
            }
            let pending = seek_dir(fd, (1 << 63) | 12345, &mut buf).unwrap();
            assert!(rest(fd, &mut buf, pending).is_empty());
        }
    }
}
