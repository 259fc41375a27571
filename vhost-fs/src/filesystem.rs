//! The filesystem trait the FUSE server dispatches to.
//!
//! Every method has a default that answers `ENOSYS`, so an implementation states exactly
//! what it supports and nothing is ever faked. Rules an implementation follows (as in the
//! FUSE protocol):
//! - Each successful [`lookup`](FileSystem::lookup), and every operation that returns an
//!   [`EntryOut`] (create, mkdir, mknod, symlink, link, each entry of READDIRPLUS except `.`
//!   and `..`), adds one to the inode's lookup count; [`forget`](FileSystem::forget)
//!   subtracts. An inode may be dropped only when its count reaches zero. The root's count
//!   is never dropped.
//! - Inode numbers handed out are never reused while a lookup count is held; `generation`
//!   is always 0 because numbers are never reused within one INIT session.
//! - Handles returned by open/opendir/create stay valid until release/releasedir.
//! - Names passed in are raw guest bytes: the implementation validates them.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::decode::{LkIn, SetattrIn};
use crate::fuse::{Attr, EntryOut, FileLock, StatFs, Timeout};

/// Who is asking: the guest caller's ids, as the guest sent them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

pub type Inode = u64;
pub type Handle = u64;

/// An opened handle and the `FOPEN_*` flags to tell the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub fh: Handle,
    pub open_flags: u32,
}

/// The answer to GETXATTR/LISTXATTR: the size needed (when asked with size 0) or the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn enosys<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// A filesystem served over FUSE. Implementations are shared by every queue worker.
#[allow(unused_variables)]
pub trait FileSystem: Send + Sync {
    /// INIT: `capable` are the guest's flags; returns the flags we want on.
    fn init(&self, capable: u64) -> io::Result<u64> {
        Ok(0)
    }
    /// DESTROY, or a second INIT: drop every inode but the root and every handle.
    fn destroy(&self) {}

    fn lookup(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<EntryOut> {
        enosys()
    }
    fn forget(&self, inode: Inode, count: u64) {}
    fn getattr(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Option<Handle>,
    ) -> io::Result<(Attr, Timeout)> {
        enosys()
    }
    fn setattr(&self, ctx: Context, inode: Inode, attr: &SetattrIn) -> io::Result<(Attr, Timeout)> {
        enosys()
    }
    fn readlink(&self, ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        enosys()
    }
    fn symlink(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        target: &CStr,
    ) -> io::Result<EntryOut> {
        enosys()
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
        enosys()
    }
    fn mkdir(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        enosys()
    }
    fn unlink(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        enosys()
    }
    fn rmdir(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        enosys()
    }
    /// RENAME and RENAME2 (`flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`).
    fn rename(
        &self,
        ctx: Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        enosys()
    }
    fn link(
        &self,
        ctx: Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<EntryOut> {
        enosys()
    }
    fn open(&self, ctx: Context, inode: Inode, flags: u32, open_flags: u32) -> io::Result<Opened> {
        enosys()
    }
    #[allow(clippy::too_many_arguments)]
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
        enosys()
    }
    /// The open file behind `fh`, for a READ the caller runs on its I/O engine.
    fn read_file(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<Arc<File>> {
        enosys()
    }
    /// The open file behind `fh`, for a WRITE the caller runs on its I/O engine. With
    /// `kill_priv`, the file's set-user-ID bit (and set-group-ID if group-executable) is
    /// cleared first, as the kernel does for an unprivileged writer.
    fn write_file(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        kill_priv: bool,
    ) -> io::Result<Arc<File>> {
        enosys()
    }
    fn statfs(&self, ctx: Context, inode: Inode) -> io::Result<StatFs> {
        enosys()
    }
    fn release(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        flock_unlock: bool,
        lock_owner: u64,
    ) -> io::Result<()> {
        enosys()
    }
    fn flush(&self, ctx: Context, inode: Inode, fh: Handle, lock_owner: u64) -> io::Result<()> {
        enosys()
    }
    fn fsync(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        enosys()
    }
    fn opendir(&self, ctx: Context, inode: Inode, flags: u32) -> io::Result<Opened> {
        enosys()
    }
    /// READDIR / READDIRPLUS: encoded `fuse_dirent`s (or `fuse_direntplus`) of at most
    /// `size` bytes, starting after the entry whose offset is `offset`.
    fn readdir(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> io::Result<Vec<u8>> {
        enosys()
    }
    fn releasedir(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<()> {
        enosys()
    }
    fn fsyncdir(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        enosys()
    }
    fn setxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        enosys()
    }
    fn getxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        enosys()
    }
    fn listxattr(&self, ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        enosys()
    }
    fn removexattr(&self, ctx: Context, inode: Inode, name: &CStr) -> io::Result<()> {
        enosys()
    }
    fn getlk(&self, ctx: Context, inode: Inode, lk: &LkIn) -> io::Result<FileLock> {
        enosys()
    }
    /// SETLK (`wait` false) or SETLKW (`wait` true: blocks until the lock is granted or the
    /// calling thread is interrupted by a signal, then fails with `EINTR`).
    fn setlk(&self, ctx: Context, inode: Inode, lk: &LkIn, wait: bool) -> io::Result<()> {
        enosys()
    }
    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        enosys()
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
        enosys()
    }
    fn lseek(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        enosys()
    }
    #[allow(clippy::too_many_arguments)]
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
        enosys()
    }
    fn syncfs(&self, ctx: Context, inode: Inode) -> io::Result<()> {
        enosys()
    }
}

impl<T: FileSystem + ?Sized> FileSystem for Arc<T> {
    fn init(&self, capable: u64) -> io::Result<u64> {
        (**self).init(capable)
    }
    fn destroy(&self) {
        (**self).destroy()
    }
    fn lookup(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<EntryOut> {
        (**self).lookup(ctx, parent, name)
    }
    fn forget(&self, inode: Inode, count: u64) {
        (**self).forget(inode, count)
    }
    fn getattr(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Option<Handle>,
    ) -> io::Result<(Attr, Timeout)> {
        (**self).getattr(ctx, inode, fh)
    }
    fn setattr(&self, ctx: Context, inode: Inode, attr: &SetattrIn) -> io::Result<(Attr, Timeout)> {
        (**self).setattr(ctx, inode, attr)
    }
    fn readlink(&self, ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        (**self).readlink(ctx, inode)
    }
    fn symlink(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        target: &CStr,
    ) -> io::Result<EntryOut> {
        (**self).symlink(ctx, parent, name, target)
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
        (**self).mknod(ctx, parent, name, mode, rdev, umask)
    }
    fn mkdir(
        &self,
        ctx: Context,
        parent: Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<EntryOut> {
        (**self).mkdir(ctx, parent, name, mode, umask)
    }
    fn unlink(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        (**self).unlink(ctx, parent, name)
    }
    fn rmdir(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<()> {
        (**self).rmdir(ctx, parent, name)
    }
    fn rename(
        &self,
        ctx: Context,
        olddir: Inode,
        oldname: &CStr,
        newdir: Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        (**self).rename(ctx, olddir, oldname, newdir, newname, flags)
    }
    fn link(
        &self,
        ctx: Context,
        inode: Inode,
        newparent: Inode,
        newname: &CStr,
    ) -> io::Result<EntryOut> {
        (**self).link(ctx, inode, newparent, newname)
    }
    fn open(&self, ctx: Context, inode: Inode, flags: u32, open_flags: u32) -> io::Result<Opened> {
        (**self).open(ctx, inode, flags, open_flags)
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
        (**self).create(ctx, parent, name, mode, flags, umask, open_flags)
    }
    fn read_file(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<Arc<File>> {
        (**self).read_file(ctx, inode, fh)
    }
    fn write_file(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        kill_priv: bool,
    ) -> io::Result<Arc<File>> {
        (**self).write_file(ctx, inode, fh, kill_priv)
    }
    fn statfs(&self, ctx: Context, inode: Inode) -> io::Result<StatFs> {
        (**self).statfs(ctx, inode)
    }
    fn release(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        flock_unlock: bool,
        lock_owner: u64,
    ) -> io::Result<()> {
        (**self).release(ctx, inode, fh, flock_unlock, lock_owner)
    }
    fn flush(&self, ctx: Context, inode: Inode, fh: Handle, lock_owner: u64) -> io::Result<()> {
        (**self).flush(ctx, inode, fh, lock_owner)
    }
    fn fsync(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        (**self).fsync(ctx, inode, fh, datasync)
    }
    fn opendir(&self, ctx: Context, inode: Inode, flags: u32) -> io::Result<Opened> {
        (**self).opendir(ctx, inode, flags)
    }
    fn readdir(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        size: u32,
        plus: bool,
    ) -> io::Result<Vec<u8>> {
        (**self).readdir(ctx, inode, fh, offset, size, plus)
    }
    fn releasedir(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<()> {
        (**self).releasedir(ctx, inode, fh)
    }
    fn fsyncdir(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        (**self).fsyncdir(ctx, inode, fh, datasync)
    }
    fn setxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        (**self).setxattr(ctx, inode, name, value, flags)
    }
    fn getxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        (**self).getxattr(ctx, inode, name, size)
    }
    fn listxattr(&self, ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        (**self).listxattr(ctx, inode, size)
    }
    fn removexattr(&self, ctx: Context, inode: Inode, name: &CStr) -> io::Result<()> {
        (**self).removexattr(ctx, inode, name)
    }
    fn getlk(&self, ctx: Context, inode: Inode, lk: &LkIn) -> io::Result<FileLock> {
        (**self).getlk(ctx, inode, lk)
    }
    fn setlk(&self, ctx: Context, inode: Inode, lk: &LkIn, wait: bool) -> io::Result<()> {
        (**self).setlk(ctx, inode, lk, wait)
    }
    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        (**self).access(ctx, inode, mask)
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
        (**self).fallocate(ctx, inode, fh, mode, offset, length)
    }
    fn lseek(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        (**self).lseek(ctx, inode, fh, offset, whence)
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
        (**self).copy_file_range(
            ctx, inode_in, fh_in, off_in, inode_out, fh_out, off_out, len, flags,
        )
    }
    fn syncfs(&self, ctx: Context, inode: Inode) -> io::Result<()> {
        (**self).syncfs(ctx, inode)
    }
}
