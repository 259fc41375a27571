//! A read-only view of any filesystem: every operation that could change the share answers
//! `EROFS`; everything else is passed through unchanged.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::sync::Arc;

use crate::decode::{LkIn, SetattrIn};
use crate::filesystem::{Context, FileSystem, Handle, Inode, Opened, XattrReply};
use crate::fuse::{Attr, EntryOut, FileLock, StatFs, Timeout};

pub struct ReadOnly<F>(pub F);

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

/// Open flags that would modify the file.
fn writes(flags: u32) -> bool {
    let f = flags as i32;
    f & libc::O_ACCMODE != libc::O_RDONLY
        || f & (libc::O_TRUNC | libc::O_CREAT | libc::O_APPEND) != 0
}

impl<F: FileSystem> FileSystem for ReadOnly<F> {
    fn init(&self, capable: u64) -> io::Result<u64> {
        self.0.init(capable)
    }
    fn destroy(&self) {
        self.0.destroy()
    }
    fn lookup(&self, ctx: Context, parent: Inode, name: &CStr) -> io::Result<EntryOut> {
        self.0.lookup(ctx, parent, name)
    }
    fn forget(&self, inode: Inode, count: u64) {
        self.0.forget(inode, count)
    }
    fn getattr(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Option<Handle>,
    ) -> io::Result<(Attr, Timeout)> {
        self.0.getattr(ctx, inode, fh)
    }
    fn setattr(&self, _: Context, _: Inode, _: &SetattrIn) -> io::Result<(Attr, Timeout)> {
        erofs()
    }
    fn readlink(&self, ctx: Context, inode: Inode) -> io::Result<Vec<u8>> {
        self.0.readlink(ctx, inode)
    }
    fn symlink(&self, _: Context, _: Inode, _: &CStr, _: &CStr) -> io::Result<EntryOut> {
        erofs()
    }
    fn mknod(
        &self,
        _: Context,
        _: Inode,
        _: &CStr,
        _: u32,
        _: u32,
        _: u32,
    ) -> io::Result<EntryOut> {
        erofs()
    }
    fn mkdir(&self, _: Context, _: Inode, _: &CStr, _: u32, _: u32) -> io::Result<EntryOut> {
        erofs()
    }
    fn unlink(&self, _: Context, _: Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn rmdir(&self, _: Context, _: Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn rename(&self, _: Context, _: Inode, _: &CStr, _: Inode, _: &CStr, _: u32) -> io::Result<()> {
        erofs()
    }
    fn link(&self, _: Context, _: Inode, _: Inode, _: &CStr) -> io::Result<EntryOut> {
        erofs()
    }
    fn open(&self, ctx: Context, inode: Inode, flags: u32, open_flags: u32) -> io::Result<Opened> {
        if writes(flags) {
            return erofs();
        }
        self.0.open(ctx, inode, flags, open_flags)
    }
    fn create(
        &self,
        _: Context,
        _: Inode,
        _: &CStr,
        _: u32,
        _: u32,
        _: u32,
        _: u32,
    ) -> io::Result<(EntryOut, Opened)> {
        erofs()
    }
    fn read_file(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<Arc<File>> {
        self.0.read_file(ctx, inode, fh)
    }
    fn write_file(&self, _: Context, _: Inode, _: Handle, _: bool) -> io::Result<Arc<File>> {
        erofs()
    }
    fn statfs(&self, ctx: Context, inode: Inode) -> io::Result<StatFs> {
        self.0.statfs(ctx, inode)
    }
    fn release(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        flock_unlock: bool,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.0.release(ctx, inode, fh, flock_unlock, lock_owner)
    }
    fn flush(&self, ctx: Context, inode: Inode, fh: Handle, lock_owner: u64) -> io::Result<()> {
        self.0.flush(ctx, inode, fh, lock_owner)
    }
    fn fsync(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        self.0.fsync(ctx, inode, fh, datasync)
    }
    fn opendir(&self, ctx: Context, inode: Inode, flags: u32) -> io::Result<Opened> {
        self.0.opendir(ctx, inode, flags)
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
        self.0.readdir(ctx, inode, fh, offset, size, plus)
    }
    fn releasedir(&self, ctx: Context, inode: Inode, fh: Handle) -> io::Result<()> {
        self.0.releasedir(ctx, inode, fh)
    }
    fn fsyncdir(&self, ctx: Context, inode: Inode, fh: Handle, datasync: bool) -> io::Result<()> {
        self.0.fsyncdir(ctx, inode, fh, datasync)
    }
    fn setxattr(&self, _: Context, _: Inode, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        erofs()
    }
    fn getxattr(
        &self,
        ctx: Context,
        inode: Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<XattrReply> {
        self.0.getxattr(ctx, inode, name, size)
    }
    fn listxattr(&self, ctx: Context, inode: Inode, size: u32) -> io::Result<XattrReply> {
        self.0.listxattr(ctx, inode, size)
    }
    fn removexattr(&self, _: Context, _: Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }
    fn getlk(&self, ctx: Context, inode: Inode, lk: &LkIn) -> io::Result<FileLock> {
        self.0.getlk(ctx, inode, lk)
    }
    fn setlk(&self, ctx: Context, inode: Inode, lk: &LkIn, wait: bool) -> io::Result<()> {
        self.0.setlk(ctx, inode, lk, wait)
    }
    fn access(&self, ctx: Context, inode: Inode, mask: u32) -> io::Result<()> {
        if mask as i32 & libc::W_OK != 0 {
            return erofs();
        }
        self.0.access(ctx, inode, mask)
    }
    fn fallocate(&self, _: Context, _: Inode, _: Handle, _: u32, _: u64, _: u64) -> io::Result<()> {
        erofs()
    }
    fn lseek(
        &self,
        ctx: Context,
        inode: Inode,
        fh: Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.0.lseek(ctx, inode, fh, offset, whence)
    }
    fn copy_file_range(
        &self,
        _: Context,
        _: Inode,
        _: Handle,
        _: u64,
        _: Inode,
        _: Handle,
        _: u64,
        _: u64,
        _: u64,
    ) -> io::Result<usize> {
        erofs()
    }
    fn syncfs(&self, ctx: Context, inode: Inode) -> io::Result<()> {
        self.0.syncfs(ctx, inode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Everything;
    impl FileSystem for Everything {
        fn open(&self, _: Context, _: Inode, _: u32, _: u32) -> io::Result<Opened> {
            Ok(Opened {
                fh: 1,
                open_flags: 0,
            })
        }
        fn mkdir(&self, _: Context, _: Inode, _: &CStr, _: u32, _: u32) -> io::Result<EntryOut> {
            Ok(EntryOut::default())
        }
    }

    #[test]
    fn writes_are_refused_reads_pass() {
        let fs = ReadOnly(Everything);
        let ctx = Context::default();
        let rofs = |e: io::Error| e.raw_os_error() == Some(libc::EROFS);
        assert!(rofs(fs.mkdir(ctx, 1, c"d", 0o755, 0).unwrap_err()));
        assert!(rofs(fs.open(ctx, 2, libc::O_RDWR as u32, 0).unwrap_err()));
        assert!(rofs(
            fs.open(ctx, 2, (libc::O_RDONLY | libc::O_TRUNC) as u32, 0)
                .unwrap_err()
        ));
        assert!(rofs(fs.write_file(ctx, 2, 1, false).unwrap_err()));
        assert_eq!(fs.open(ctx, 2, libc::O_RDONLY as u32, 0).unwrap().fh, 1);
        // Not implemented below stays ENOSYS, not EROFS.
        assert_eq!(
            fs.readlink(ctx, 2).unwrap_err().raw_os_error(),
            Some(libc::ENOSYS)
        );
    }
}
