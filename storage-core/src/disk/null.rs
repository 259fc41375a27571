//! The null format: a disk of a given size with no storage behind it. Writes are accepted and
//! dropped, reads return zeroes (or, with `read-zeroes=off` as in QEMU's null-co, leave the
//! buffer as it is). It measures a daemon's own cost, without the storage.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;

use crate::engine::{Completion, EngineKind};
use crate::error::StorageError;

use super::{check_op, Disk, DiskInfo, DiskOp, DiskQueue, StartError};

pub struct NullDisk {
    info: DiskInfo,
    read_zeroes: bool,
}

impl NullDisk {
    pub fn new(size: u64, read_only: bool, read_zeroes: bool) -> Self {
        NullDisk {
            info: DiskInfo {
                capacity: size,
                read_only,
                direct: false,
                format: "null",
                path: "null".to_string(),
                // No engine runs; completions are immediate.
                engine: EngineKind::Sync,
                discard: true,
                identity: (0, 0),
            },
            read_zeroes,
        }
    }
}

impl Disk for NullDisk {
    type Queue = NullQueue;

    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn new_queue(&self, depth: u32) -> Result<NullQueue, StorageError> {
        Ok(NullQueue {
            done: VecDeque::with_capacity(depth.max(1) as usize),
            capacity: self.info.capacity,
            read_zeroes: self.read_zeroes,
        })
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        if self.read_zeroes {
            buf.fill(0);
        }
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }
}

pub struct NullQueue {
    done: VecDeque<Completion>,
    capacity: u64,
    read_zeroes: bool,
}

impl DiskQueue for NullQueue {
    #[inline]
    unsafe fn start(&mut self, op: DiskOp<'_>, tag: u64) -> Result<(), StartError> {
        check_op(&op, self.capacity)?;
        if self.done.len() == self.done.capacity() {
            return Err(StartError::Busy);
        }
        let mut bytes = 0usize;
        match op {
            DiskOp::Read { iov, .. } if !self.read_zeroes => {
                bytes = iov.iter().map(|v| v.iov_len).sum()
            }
            DiskOp::Read { iov, .. } => {
                for v in iov {
                    // SAFETY: the caller guarantees each iovec describes a valid writable
                    // buffer that nobody else accesses until this request completes.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                    bytes += v.iov_len;
                }
            }
            DiskOp::Write { iov, .. } => bytes = iov.iter().map(|v| v.iov_len).sum(),
            _ => {}
        }
        self.done.push_back(Completion {
            user_data: tag,
            result: i32::try_from(bytes).unwrap_or(i32::MAX),
        });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    #[inline]
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
}
