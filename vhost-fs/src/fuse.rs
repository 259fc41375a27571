//! The FUSE wire protocol as Linux's `include/uapi/linux/fuse.h` (7.36) defines it: opcodes,
//! flags, and the fixed-size structures a server writes back. Everything is little-endian
//! and encoded field by field: no struct is ever transmuted from or to guest bytes.

/// The protocol version we speak. Older minors are accepted down to 7.27 (Linux 5.4).
pub const KERNEL_VERSION: u32 = 7;
pub const KERNEL_MINOR_VERSION: u32 = 36;
pub const MIN_KERNEL_MINOR_VERSION: u32 = 27;

/// The inode number of the share's root.
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const WRITE_IN_LEN: usize = 40;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const DIRENT_HEADER_LEN: usize = 24;

/// Largest WRITE (and READ) we accept: 1 MiB, announced as `max_write` and `max_pages`.
pub const MAX_WRITE: u32 = 1 << 20;
pub const MAX_PAGES: u16 = (MAX_WRITE / 4096) as u16;
/// Largest message other than WRITE: a SETXATTR with a 64 KiB value plus its name.
pub const MAX_NON_WRITE_MESSAGE: usize = 68 * 1024;

/// FUSE opcodes.
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;
}

/// INIT flags (`fuse_init_in.flags` / `fuse_init_out.flags`).
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const POSIX_LOCKS: u64 = 1 << 1;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const FLOCK_LOCKS: u64 = 1 << 10;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const ASYNC_DIO: u64 = 1 << 15;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const SUBMOUNTS: u64 = 1 << 27;
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    pub const INIT_EXT: u64 = 1 << 30;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const LOCKOWNER: u32 = 1 << 9;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// `fuse_open_out.open_flags`.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
}

/// `fuse_open_in.open_flags` / `fuse_create_in.open_flags`.
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;
/// `fuse_write_in.write_flags`.
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// `fuse_getattr_in.getattr_flags`: `fh` is valid.
pub const GETATTR_FH: u32 = 1 << 0;
/// `fuse_release_in.release_flags`.
pub const RELEASE_FLOCK_UNLOCK: u32 = 1 << 1;
/// `fuse_lk_in.lk_flags`: a BSD flock rather than a POSIX lock.
pub const LK_FLOCK: u32 = 1 << 0;
/// `fuse_fsync_in.fsync_flags`.
pub const FSYNC_FDATASYNC: u32 = 1 << 0;
/// `fuse_attr.flags`: the inode is the root of a submount.
pub const ATTR_SUBMOUNT: u32 = 1 << 0;

/// A little-endian encoder for reply bodies.
#[derive(Debug, Default)]
pub struct Encoder(pub Vec<u8>);

impl Encoder {
    pub fn with_capacity(n: usize) -> Self {
        Encoder(Vec::with_capacity(n))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Attributes as FUSE carries them (`fuse_attr`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: u64,
    pub mtime: u64,
    pub ctime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

impl Attr {
    pub fn from_stat(st: &libc::stat) -> Self {
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime as u64,
            mtime: st.st_mtime as u64,
            ctime: st.st_ctime as u64,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            // FUSE carries the old 32-bit encoding (major << 8 | minor for small numbers).
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    pub fn encode(&self, e: &mut Encoder) {
        e.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.atime)
            .u64(self.mtime)
            .u64(self.ctime)
            .u32(self.atimensec)
            .u32(self.mtimensec)
            .u32(self.ctimensec)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.blksize)
            .u32(self.flags);
    }
}

/// A cache lifetime as FUSE carries it: seconds plus nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeout {
    pub secs: u64,
    pub nsecs: u32,
}

impl From<std::time::Duration> for Timeout {
    fn from(d: std::time::Duration) -> Self {
        Timeout {
            secs: d.as_secs(),
            nsecs: d.subsec_nanos(),
        }
    }
}

/// `fuse_entry_out`: the answer to LOOKUP and to every operation that creates a name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: Timeout,
    pub attr_valid: Timeout,
    pub attr: Attr,
}

impl EntryOut {
    pub fn encode(&self, e: &mut Encoder) {
        e.u64(self.nodeid)
            .u64(self.generation)
            .u64(self.entry_valid.secs)
            .u64(self.attr_valid.secs)
            .u32(self.entry_valid.nsecs)
            .u32(self.attr_valid.nsecs);
        self.attr.encode(e);
    }
}

/// `fuse_kstatfs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl StatFs {
    pub fn encode(&self, e: &mut Encoder) {
        e.u64(self.blocks)
            .u64(self.bfree)
            .u64(self.bavail)
            .u64(self.files)
            .u64(self.ffree)
            .u32(self.bsize)
            .u32(self.namelen)
            .u32(self.frsize)
            .u32(0)
            .zeros(24);
    }
}

/// `fuse_file_lock`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileLock {
    pub start: u64,
    pub end: u64,
    pub typ: u32,
    pub pid: u32,
}

impl FileLock {
    pub fn encode(&self, e: &mut Encoder) {
        e.u64(self.start).u64(self.end).u32(self.typ).u32(self.pid);
    }
}

/// Encodes the reply header.
pub fn out_header(len: u32, error: i32, unique: u64) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// Appends one `fuse_dirent` (padded to 8 bytes) to `e`.
pub fn encode_dirent(e: &mut Encoder, ino: u64, off: u64, typ: u32, name: &[u8]) {
    e.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(typ)
        .bytes(name);
    let pad = dirent_size(name.len()) - DIRENT_HEADER_LEN - name.len();
    e.zeros(pad);
}

/// The size of a `fuse_dirent` with a name of `namelen` bytes, padding included.
pub fn dirent_size(namelen: usize) -> usize {
    (DIRENT_HEADER_LEN + namelen + 7) & !7
}
