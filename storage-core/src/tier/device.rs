//! The tier's two children as its background threads use them: positioned reads, writes
//! and syncs of the cache file ([`Dev`]: the journal, checkpoints) and of the capacity node
//! ([`Capacity`]: write-back). Queue workers reach the same storage through their engines
//! and child queues. In tests every call goes through the injected faults and is recorded
//! for the power-cut tests (see `engine::faulty`).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;

use super::journal::Media;
use crate::disk::lock::{ImageLock, LockedFile};

pub(crate) struct Dev {
    /// Locked by the tier at its open; its lock goes with the last handle.
    file: LockedFile,
    #[cfg(test)]
    pub(crate) device: crate::engine::faulty::Device,
    #[cfg(test)]
    pub(crate) faults: std::sync::Arc<crate::engine::faulty::Faults>,
}

impl Dev {
    /// The file's (device, inode): which file this is, whatever its name now.
    pub(crate) fn identity(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Lets go of the file's lock bytes (the tier is closing).
    pub(crate) fn unlock(&self) -> io::Result<()> {
        self.file.release()
    }

    #[cfg(not(test))]
    pub(crate) fn new(file: File, lock: Option<ImageLock>) -> Dev {
        Dev {
            file: LockedFile::new(file, lock),
        }
    }

    #[cfg(test)]
    pub(crate) fn new(
        file: File,
        lock: Option<ImageLock>,
        device: crate::engine::faulty::Device,
        faults: std::sync::Arc<crate::engine::faulty::Faults>,
    ) -> Dev {
        Dev {
            file: LockedFile::new(file, lock),
            device,
            faults,
        }
    }

    #[cfg(test)]
    fn injected(&self, op: crate::engine::faulty::OpKind) -> io::Result<()> {
        match self.faults.injected(self.device, op) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl AsRawFd for Dev {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Media for Dev {
    fn put(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        {
            self.injected(crate::engine::faulty::OpKind::Write)?;
            self.faults.record_write(self.device, offset, buf);
        }
        self.file.write_all_at(buf, offset)
    }

    fn get(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        self.injected(crate::engine::faulty::OpKind::Read)?;
        self.file.read_exact_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        #[cfg(test)]
        let started = {
            self.injected(crate::engine::faulty::OpKind::Sync)?;
            self.faults.sync_started()
        };
        self.file.sync_data()?;
        #[cfg(test)]
        self.faults.record_sync(self.device, started);
        Ok(())
    }
}

/// The capacity child as the tier's background threads use it: blocking control-plane I/O
/// on the node (write-back, syncs before journal records). Queue workers reach it through
/// their own child queues.
pub(crate) struct Capacity {
    node: crate::disk::AnyDisk,
}

impl Capacity {
    pub(crate) fn new(node: crate::disk::AnyDisk) -> Capacity {
        Capacity { node }
    }

    pub(crate) fn node(&self) -> &crate::disk::AnyDisk {
        &self.node
    }
}

impl Media for Capacity {
    fn put(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        crate::disk::Disk::write_at(&self.node, buf, offset)
    }

    fn get(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        crate::disk::Disk::read_at(&self.node, buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        crate::disk::Disk::flush(&self.node)
    }
}
