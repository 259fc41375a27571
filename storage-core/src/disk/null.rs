//! The null format: a disk of a given size with no storage behind it. Writes are accepted and
//! dropped, reads return zeroes (or, with `read-zeroes=off` as in QEMU's null-co, leave the
//! buffer as it is). It measures a daemon's own cost, without the storage.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;

use crate::engine::EngineKind;
use crate::error::StorageError;

use super::{checked, Disk, DiskCompletion, DiskInfo, DiskOp, DiskQueue, Rejected, StartError};

pub struct NullDisk {
    info: DiskInfo,
    read_zeroes: bool,
}

impl NullDisk {
    pub fn new(size: u64, read_only: bool, read_zeroes: bool) -> Self {
        NullDisk {
            info: DiskInfo {
                capacity: super::Size::new(size),
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
            capacity: self.info.capacity.clone(),
            read_zeroes: self.read_zeroes,
        })
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn resize(&self, bytes: u64) -> Result<(), StorageError> {
        super::check_growth(self.info.capacity.get(), bytes)?;
        self.info.capacity.set(bytes);
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

impl NullQueue {
    /// A queue that is never used, only held in a place for a moment.
    pub(crate) fn idle(capacity: super::Size) -> NullQueue {
        NullQueue {
            done: VecDeque::new(),
            capacity,
            read_zeroes: false,
        }
    }
}

pub struct NullQueue {
    done: VecDeque<DiskCompletion>,
    capacity: super::Size,
    read_zeroes: bool,
}

impl DiskQueue for NullQueue {
    #[inline]
    fn start(&mut self, op: DiskOp, tag: u64) -> Result<(), Rejected> {
        let op = checked(op, self.capacity.get())?;
        if self.done.len() == self.done.capacity() {
            return Err(Rejected::new(StartError::Busy, op));
        }
        let (bytes, buffers) = match op {
            DiskOp::Read { mut buffers, .. } => {
                if self.read_zeroes {
                    buffers.fill_zero();
                }
                (buffers.len(), Some(buffers))
            }
            DiskOp::Write { buffers, .. } => (buffers.len(), Some(buffers)),
            _ => (0, None),
        };
        self.done.push_back(DiskCompletion {
            tag,
            result: i32::try_from(bytes).unwrap_or(i32::MAX),
            buffers,
        });
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    #[inline]
    fn pop_completion(&mut self) -> Option<DiskCompletion> {
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
