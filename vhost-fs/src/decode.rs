//! Decoding FUSE requests: untrusted bytes from the guest into a checked [`Request`].
//!
//! A message is its `fuse_in_header` followed by the operation's arguments. Every length is
//! checked before it is used: the header's `len` must match the bytes that arrived, each
//! fixed-size argument must be complete, names must be NUL-terminated and sizes must be
//! within the limits we announced. Anything else is a [`DecodeError`]; nothing here panics
//! on any input (see the unit tests and `fuzz/`).
//!
//! WRITE is special: its data stays in guest memory. The decoder sees only the header and
//! `fuse_write_in`, and the caller tells it how many data bytes followed.

use std::ffi::CStr;

use crate::fuse::{self, opcode, FileLock, IN_HEADER_LEN};

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {0} bytes is shorter than the FUSE header")]
    NoHeader(usize),
    #[error("header says {header} bytes but {actual} arrived")]
    LengthMismatch { header: u32, actual: u64 },
    #[error("opcode {opcode}: arguments truncated")]
    Truncated { opcode: u32 },
    #[error("opcode {opcode}: a name is not NUL-terminated")]
    Unterminated { opcode: u32 },
    #[error("opcode {opcode}: size {size} exceeds the limit {limit}")]
    TooLarge { opcode: u32, size: u64, limit: u64 },
    #[error("opcode {opcode}: {count} forgets do not fit in the message")]
    BadForgetCount { opcode: u32, count: u32 },
}

impl DecodeError {
    /// The errno the guest gets (when a reply is possible).
    pub fn errno(&self) -> i32 {
        match self {
            DecodeError::TooLarge { .. } => libc::E2BIG,
            _ => libc::EINVAL,
        }
    }
}

/// `fuse_in_header`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    /// Decodes the header alone (the first [`IN_HEADER_LEN`] bytes, all of which must be
    /// there: the fields end at 36, and the last 4 are padding, or `total_extlen` and
    /// padding in 7.38, but still part of the header).
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, 0);
        let h = (|| {
            let h = InHeader {
                len: r.u32()?,
                opcode: r.u32()?,
                unique: r.u64()?,
                nodeid: r.u64()?,
                uid: r.u32()?,
                gid: r.u32()?,
                pid: r.u32()?,
            };
            r.skip(IN_HEADER_LEN - 36)?;
            Some(h)
        })();
        h.ok_or(DecodeError::NoHeader(buf.len()))
    }
}

/// Arguments of SETATTR.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SetattrIn {
    pub valid: u32,
    pub fh: u64,
    pub size: u64,
    pub atime: u64,
    pub mtime: u64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Arguments of GETLK/SETLK/SETLKW.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LkIn {
    pub fh: u64,
    pub owner: u64,
    pub lock: FileLock,
    pub lk_flags: u32,
}

/// One decoded request. Names borrow from the message buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Lookup {
        name: &'a CStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        forgets: Vec<(u64, u64)>,
    },
    Getattr {
        fh: Option<u64>,
    },
    Setattr(SetattrIn),
    Readlink,
    Symlink {
        name: &'a CStr,
        target: &'a CStr,
    },
    Mknod {
        name: &'a CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    },
    Mkdir {
        name: &'a CStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a CStr,
    },
    Rmdir {
        name: &'a CStr,
    },
    Rename {
        newdir: u64,
        flags: u32,
        old: &'a CStr,
        new: &'a CStr,
    },
    Link {
        oldnodeid: u64,
        name: &'a CStr,
    },
    Open {
        flags: u32,
        open_flags: u32,
    },
    Create {
        name: &'a CStr,
        flags: u32,
        mode: u32,
        umask: u32,
        open_flags: u32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        size: u32,
        write_flags: u32,
    },
    Statfs,
    Release {
        fh: u64,
        flags: u32,
        release_flags: u32,
        lock_owner: u64,
    },
    Flush {
        fh: u64,
        lock_owner: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Opendir {
        flags: u32,
    },
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
        plus: bool,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        name: &'a CStr,
        value: &'a [u8],
        flags: u32,
    },
    Getxattr {
        name: &'a CStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a CStr,
    },
    Getlk(LkIn),
    Setlk {
        lk: LkIn,
        wait: bool,
    },
    Access {
        mask: u32,
    },
    Interrupt {
        unique: u64,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        fh: u64,
        offset: u64,
        whence: u32,
    },
    CopyFileRange {
        fh_in: u64,
        off_in: u64,
        nodeid_out: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u64,
    },
    Syncfs,
    /// An opcode we do not implement: answered ENOSYS.
    Unsupported(u32),
}

impl Request<'_> {
    /// Whether the guest expects no reply (FORGET, BATCH_FORGET; INTERRUPT gets one only
    /// to say EAGAIN).
    pub fn no_reply(&self) -> bool {
        matches!(
            self,
            Request::Forget { .. } | Request::BatchForget { .. } | Request::Interrupt { .. }
        )
    }
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = self.buf.get(self.pos..).unwrap_or(&[]);
        self.pos = self.buf.len();
        s
    }
    /// A NUL-terminated string; `None` if there is no NUL.
    fn cstr(&mut self) -> Option<&'a CStr> {
        let rest = self.buf.get(self.pos..)?;
        let nul = rest.iter().position(|&b| b == 0)?;
        let s = CStr::from_bytes_with_nul(&rest[..=nul]).ok()?;
        self.pos += nul + 1;
        Some(s)
    }
}

/// Decodes a complete message (`buf` is every readable byte of the chain), except WRITE, for
/// which `buf` holds the header and `fuse_write_in` and `write_data_len` says how many data
/// bytes followed in guest memory.
pub fn decode(buf: &[u8], write_data_len: u64) -> Result<(InHeader, Request<'_>), DecodeError> {
    let h = InHeader::decode(buf)?;
    let actual = if h.opcode == opcode::WRITE {
        (buf.len() as u64).saturating_add(write_data_len)
    } else {
        buf.len() as u64
    };
    if u64::from(h.len) != actual {
        return Err(DecodeError::LengthMismatch {
            header: h.len,
            actual,
        });
    }
    let op = h.opcode;
    let mut r = Reader::new(buf, IN_HEADER_LEN);
    let truncated = DecodeError::Truncated { opcode: op };
    let unterminated = DecodeError::Unterminated { opcode: op };
    macro_rules! need {
        ($e:expr) => {
            $e.ok_or(truncated.clone())?
        };
    }
    macro_rules! name {
        () => {
            r.cstr().ok_or(unterminated.clone())?
        };
    }
    let too_large = |size: u64, limit: u64| DecodeError::TooLarge {
        opcode: op,
        size,
        limit,
    };
    let req = match op {
        opcode::INIT => {
            let major = need!(r.u32());
            let minor = need!(r.u32());
            let max_readahead = need!(r.u32());
            let flags = need!(r.u32());
            // 7.36 adds flags2 for the high 32 bits; older guests send 16 bytes.
            let flags2 = r.u32().unwrap_or(0);
            let flags = if flags & fuse::init::INIT_EXT as u32 != 0 {
                u64::from(flags) | (u64::from(flags2) << 32)
            } else {
                u64::from(flags)
            };
            Request::Init {
                major,
                minor,
                max_readahead,
                flags,
            }
        }
        opcode::DESTROY => Request::Destroy,
        opcode::LOOKUP => Request::Lookup { name: name!() },
        opcode::FORGET => Request::Forget {
            nlookup: need!(r.u64()),
        },
        opcode::BATCH_FORGET => {
            let count = need!(r.u32());
            need!(r.skip(4));
            let rest = r.rest();
            if (count as usize).checked_mul(16) != Some(rest.len()) {
                return Err(DecodeError::BadForgetCount { opcode: op, count });
            }
            let forgets = rest
                .chunks_exact(16)
                .map(|c| {
                    let mut rr = Reader::new(c, 0);
                    (rr.u64().unwrap_or(0), rr.u64().unwrap_or(0))
                })
                .collect();
            Request::BatchForget { forgets }
        }
        opcode::GETATTR => {
            let flags = need!(r.u32());
            need!(r.skip(4));
            let fh = need!(r.u64());
            Request::Getattr {
                fh: (flags & fuse::GETATTR_FH != 0).then_some(fh),
            }
        }
        opcode::SETATTR => {
            let valid = need!(r.u32());
            need!(r.skip(4));
            let fh = need!(r.u64());
            let size = need!(r.u64());
            let _lock_owner = need!(r.u64());
            let atime = need!(r.u64());
            let mtime = need!(r.u64());
            let _ctime = need!(r.u64());
            let atimensec = need!(r.u32());
            let mtimensec = need!(r.u32());
            let _ctimensec = need!(r.u32());
            let mode = need!(r.u32());
            need!(r.skip(4));
            let uid = need!(r.u32());
            let gid = need!(r.u32());
            need!(r.skip(4));
            Request::Setattr(SetattrIn {
                valid,
                fh,
                size,
                atime,
                mtime,
                atimensec,
                mtimensec,
                mode,
                uid,
                gid,
            })
        }
        opcode::READLINK => Request::Readlink,
        opcode::SYMLINK => {
            let name = name!();
            let target = name!();
            Request::Symlink { name, target }
        }
        opcode::MKNOD => {
            let mode = need!(r.u32());
            let rdev = need!(r.u32());
            let umask = need!(r.u32());
            need!(r.skip(4));
            Request::Mknod {
                mode,
                rdev,
                umask,
                name: name!(),
            }
        }
        opcode::MKDIR => {
            let mode = need!(r.u32());
            let umask = need!(r.u32());
            Request::Mkdir {
                mode,
                umask,
                name: name!(),
            }
        }
        opcode::UNLINK => Request::Unlink { name: name!() },
        opcode::RMDIR => Request::Rmdir { name: name!() },
        opcode::RENAME | opcode::RENAME2 => {
            let newdir = need!(r.u64());
            let flags = if op == opcode::RENAME2 {
                let f = need!(r.u32());
                need!(r.skip(4));
                f
            } else {
                0
            };
            let old = name!();
            let new = name!();
            Request::Rename {
                newdir,
                flags,
                old,
                new,
            }
        }
        opcode::LINK => {
            let oldnodeid = need!(r.u64());
            Request::Link {
                oldnodeid,
                name: name!(),
            }
        }
        opcode::OPEN | opcode::OPENDIR => {
            let flags = need!(r.u32());
            let open_flags = need!(r.u32());
            if op == opcode::OPEN {
                Request::Open { flags, open_flags }
            } else {
                Request::Opendir { flags }
            }
        }
        opcode::CREATE => {
            let flags = need!(r.u32());
            let mode = need!(r.u32());
            let umask = need!(r.u32());
            let open_flags = need!(r.u32());
            Request::Create {
                flags,
                mode,
                umask,
                open_flags,
                name: name!(),
            }
        }
        opcode::READ | opcode::READDIR | opcode::READDIRPLUS => {
            let fh = need!(r.u64());
            let offset = need!(r.u64());
            let size = need!(r.u32());
            if size > fuse::MAX_WRITE {
                return Err(too_large(size.into(), fuse::MAX_WRITE.into()));
            }
            if op == opcode::READ {
                Request::Read { fh, offset, size }
            } else {
                Request::Readdir {
                    fh,
                    offset,
                    size,
                    plus: op == opcode::READDIRPLUS,
                }
            }
        }
        opcode::WRITE => {
            let fh = need!(r.u64());
            let offset = need!(r.u64());
            let size = need!(r.u32());
            let write_flags = need!(r.u32());
            need!(r.skip(16));
            if !r.rest().is_empty() || u64::from(size) != write_data_len {
                return Err(truncated);
            }
            if size > fuse::MAX_WRITE {
                return Err(too_large(size.into(), fuse::MAX_WRITE.into()));
            }
            Request::Write {
                fh,
                offset,
                size,
                write_flags,
            }
        }
        opcode::STATFS => Request::Statfs,
        opcode::RELEASE | opcode::RELEASEDIR => {
            let fh = need!(r.u64());
            let flags = need!(r.u32());
            let release_flags = need!(r.u32());
            let lock_owner = need!(r.u64());
            if op == opcode::RELEASE {
                Request::Release {
                    fh,
                    flags,
                    release_flags,
                    lock_owner,
                }
            } else {
                Request::Releasedir { fh }
            }
        }
        opcode::FLUSH => {
            let fh = need!(r.u64());
            need!(r.skip(8));
            let lock_owner = need!(r.u64());
            Request::Flush { fh, lock_owner }
        }
        opcode::FSYNC | opcode::FSYNCDIR => {
            let fh = need!(r.u64());
            let flags = need!(r.u32());
            let datasync = flags & fuse::FSYNC_FDATASYNC != 0;
            if op == opcode::FSYNC {
                Request::Fsync { fh, datasync }
            } else {
                Request::Fsyncdir { fh, datasync }
            }
        }
        opcode::SETXATTR => {
            let size = need!(r.u32());
            let flags = need!(r.u32());
            let name = name!();
            let value = r.rest();
            if value.len() as u64 != u64::from(size) {
                return Err(truncated);
            }
            Request::Setxattr { name, value, flags }
        }
        opcode::GETXATTR | opcode::LISTXATTR => {
            let size = need!(r.u32());
            need!(r.skip(4));
            if size > fuse::MAX_WRITE {
                return Err(too_large(size.into(), fuse::MAX_WRITE.into()));
            }
            if op == opcode::GETXATTR {
                Request::Getxattr {
                    name: name!(),
                    size,
                }
            } else {
                Request::Listxattr { size }
            }
        }
        opcode::REMOVEXATTR => Request::Removexattr { name: name!() },
        opcode::GETLK | opcode::SETLK | opcode::SETLKW => {
            let lk = LkIn {
                fh: need!(r.u64()),
                owner: need!(r.u64()),
                lock: FileLock {
                    start: need!(r.u64()),
                    end: need!(r.u64()),
                    typ: need!(r.u32()),
                    pid: need!(r.u32()),
                },
                lk_flags: need!(r.u32()),
            };
            match op {
                opcode::GETLK => Request::Getlk(lk),
                _ => Request::Setlk {
                    lk,
                    wait: op == opcode::SETLKW,
                },
            }
        }
        opcode::ACCESS => Request::Access {
            mask: need!(r.u32()),
        },
        opcode::INTERRUPT => Request::Interrupt {
            unique: need!(r.u64()),
        },
        opcode::FALLOCATE => Request::Fallocate {
            fh: need!(r.u64()),
            offset: need!(r.u64()),
            length: need!(r.u64()),
            mode: need!(r.u32()),
        },
        opcode::LSEEK => Request::Lseek {
            fh: need!(r.u64()),
            offset: need!(r.u64()),
            whence: need!(r.u32()),
        },
        opcode::COPY_FILE_RANGE => Request::CopyFileRange {
            fh_in: need!(r.u64()),
            off_in: need!(r.u64()),
            nodeid_out: need!(r.u64()),
            fh_out: need!(r.u64()),
            off_out: need!(r.u64()),
            len: need!(r.u64()),
            flags: need!(r.u64()),
        },
        opcode::SYNCFS => Request::Syncfs,
        other => Request::Unsupported(other),
    };
    Ok((h, req))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(opcode: u32, args: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((IN_HEADER_LEN + args.len()) as u32).to_le_bytes());
        m.extend_from_slice(&opcode.to_le_bytes());
        m.extend_from_slice(&7u64.to_le_bytes()); // unique
        m.extend_from_slice(&1u64.to_le_bytes()); // nodeid
        m.extend_from_slice(&1000u32.to_le_bytes());
        m.extend_from_slice(&100u32.to_le_bytes());
        m.extend_from_slice(&42u32.to_le_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(args);
        m
    }

    #[test]
    fn decodes_a_lookup() {
        let m = msg(opcode::LOOKUP, b"file\0");
        let (h, r) = decode(&m, 0).unwrap();
        assert_eq!(
            (h.unique, h.nodeid, h.uid, h.gid, h.pid),
            (7, 1, 1000, 100, 42)
        );
        assert_eq!(r, Request::Lookup { name: c"file" });
    }

    #[test]
    fn short_or_lying_headers_are_refused() {
        assert_eq!(decode(&[0; 10], 0), Err(DecodeError::NoHeader(10)));
        // Found by the fuzzer: every field but the padding, and a length that agrees. It
        // was accepted as a 39-byte message (a STATFS of 36 bytes decoded).
        for n in 36..IN_HEADER_LEN {
            let mut m = msg(opcode::STATFS, &[]);
            m.truncate(n);
            m[0..4].copy_from_slice(&(n as u32).to_le_bytes());
            assert_eq!(decode(&m, 0), Err(DecodeError::NoHeader(n)), "{n} bytes");
        }
        let mut m = msg(opcode::LOOKUP, b"file\0");
        m[0] = 200;
        assert!(matches!(
            decode(&m, 0),
            Err(DecodeError::LengthMismatch { header: 200, .. })
        ));
    }

    #[test]
    fn truncated_arguments_are_refused() {
        for op in [
            opcode::GETATTR,
            opcode::SETATTR,
            opcode::MKNOD,
            opcode::MKDIR,
            opcode::RENAME,
            opcode::RENAME2,
            opcode::LINK,
            opcode::OPEN,
            opcode::CREATE,
            opcode::READ,
            opcode::WRITE,
            opcode::RELEASE,
            opcode::FLUSH,
            opcode::FSYNC,
            opcode::SETXATTR,
            opcode::GETXATTR,
            opcode::GETLK,
            opcode::SETLKW,
            opcode::ACCESS,
            opcode::INTERRUPT,
            opcode::FALLOCATE,
            opcode::LSEEK,
            opcode::COPY_FILE_RANGE,
            opcode::INIT,
            opcode::FORGET,
        ] {
            let m = msg(op, &[1, 2, 3]);
            let e = decode(&m, 0).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::Truncated { .. } | DecodeError::Unterminated { .. }
                ),
                "opcode {op}: {e:?}"
            );
        }
    }

    #[test]
    fn names_must_be_terminated() {
        let m = msg(opcode::LOOKUP, b"file");
        assert_eq!(
            decode(&m, 0),
            Err(DecodeError::Unterminated {
                opcode: opcode::LOOKUP
            })
        );
        // SYMLINK needs two strings.
        let m = msg(opcode::SYMLINK, b"name\0target");
        assert!(matches!(
            decode(&m, 0),
            Err(DecodeError::Unterminated { .. })
        ));
    }

    #[test]
    fn sizes_beyond_the_announced_limits_are_refused() {
        let mut args = Vec::new();
        args.extend_from_slice(&1u64.to_le_bytes());
        args.extend_from_slice(&0u64.to_le_bytes());
        args.extend_from_slice(&(fuse::MAX_WRITE + 1).to_le_bytes());
        args.extend_from_slice(&[0; 20]);
        let m = msg(opcode::READ, &args);
        assert!(matches!(decode(&m, 0), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn write_data_length_must_match() {
        let mut args = Vec::new();
        args.extend_from_slice(&1u64.to_le_bytes());
        args.extend_from_slice(&0u64.to_le_bytes());
        args.extend_from_slice(&4096u32.to_le_bytes());
        args.extend_from_slice(&[0; 20]);
        let mut m = msg(opcode::WRITE, &args);
        let total = (m.len() + 4096) as u32;
        m[0..4].copy_from_slice(&total.to_le_bytes());
        assert!(matches!(
            decode(&m, 4096).unwrap().1,
            Request::Write { size: 4096, .. }
        ));
        // The header counts 4096 data bytes; only 100 arrived.
        assert!(decode(&m, 100).is_err());
    }

    #[test]
    fn batch_forget_count_must_fit() {
        let mut args = Vec::new();
        args.extend_from_slice(&1000u32.to_le_bytes());
        args.extend_from_slice(&[0; 4]);
        args.extend_from_slice(&[0; 16]);
        let m = msg(opcode::BATCH_FORGET, &args);
        assert!(matches!(
            decode(&m, 0),
            Err(DecodeError::BadForgetCount { count: 1000, .. })
        ));
        let mut args = Vec::new();
        args.extend_from_slice(&1u32.to_le_bytes());
        args.extend_from_slice(&[0; 4]);
        args.extend_from_slice(&5u64.to_le_bytes());
        args.extend_from_slice(&2u64.to_le_bytes());
        let m = msg(opcode::BATCH_FORGET, &args);
        assert_eq!(
            decode(&m, 0).unwrap().1,
            Request::BatchForget {
                forgets: vec![(5, 2)]
            }
        );
    }

    #[test]
    fn unknown_opcodes_are_unsupported_not_errors() {
        let m = msg(4000, &[]);
        assert_eq!(decode(&m, 0).unwrap().1, Request::Unsupported(4000));
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), data in 0u64..8192) {
            let _ = decode(&bytes, data);
        }

        #[test]
        fn never_panics_on_valid_headers_with_random_arguments(
            op in 0u32..60, args in proptest::collection::vec(any::<u8>(), 0..200), data in 0u64..4096
        ) {
            let m = msg(op, &args);
            let _ = decode(&m, data);
        }
    }
}
