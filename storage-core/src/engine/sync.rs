//! The synchronous engine: each operation runs to completion inside `push`, with the plain
//! positioned syscalls. It is the fallback where io_uring is unavailable and the reference the
//! property tests hold the io_uring engine to.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;

use super::{result_of, Completion, EngineFull, EngineKind, EngineOp, FileId, FileRepr, IoEngine};

pub struct SyncEngine {
    files: Vec<RawFd>,
    done: VecDeque<Completion>,
    capacity: usize,
}

impl SyncEngine {
    pub fn new(depth: u32) -> Self {
        let capacity = depth.max(1) as usize;
        SyncEngine {
            files: Vec::new(),
            done: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn fd(&self, file: FileId) -> RawFd {
        match file.0 {
            FileRepr::Fixed(i) => self.files[i as usize],
            FileRepr::Fd(fd) => fd,
        }
    }
}

impl IoEngine for SyncEngine {
    fn register_file(&mut self, fd: RawFd) -> io::Result<FileId> {
        self.files.push(fd);
        Ok(FileId(FileRepr::Fixed(self.files.len() as u32 - 1)))
    }

    unsafe fn push(&mut self, op: EngineOp, user_data: u64) -> Result<(), EngineFull> {
        if self.done.len() >= self.capacity {
            return Err(EngineFull);
        }
        let result = match op {
            EngineOp::Readv {
                file,
                offset,
                iov,
                iovcnt,
            } => {
                // SAFETY: the caller guarantees `iov` points to `iovcnt` iovecs describing
                // writable buffers that stay valid for the duration of this call.
                result_of(unsafe {
                    libc::preadv(self.fd(file), iov, iovcnt as i32, offset as libc::off_t)
                })
            }
            EngineOp::Writev {
                file,
                offset,
                iov,
                iovcnt,
            } => {
                // SAFETY: as above, for readable buffers.
                result_of(unsafe {
                    libc::pwritev(self.fd(file), iov, iovcnt as i32, offset as libc::off_t)
                })
            }
            EngineOp::Fdatasync { file } => {
                // SAFETY: fdatasync on a registered descriptor has no memory preconditions.
                result_of(unsafe { libc::fdatasync(self.fd(file)) } as isize)
            }
            EngineOp::Fallocate {
                file,
                mode,
                offset,
                len,
            } => {
                // SAFETY: fallocate has no memory preconditions.
                result_of(unsafe {
                    libc::fallocate(
                        self.fd(file),
                        mode,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                } as isize)
            }
        };
        self.done.push_back(Completion { user_data, result });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn pop_completion(&mut self) -> Option<Completion> {
        self.done.pop_front()
    }

    fn wait(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn ack_completion_fd(&self) {}

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }
}
