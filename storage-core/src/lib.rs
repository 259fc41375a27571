//! storage-core: the storage data path that Strata's daemons stand on.
//!
//! It owns three layers, from the bottom up:
//! - [`engine`]: the one seam between storage logic and the kernel. An [`engine::IoEngine`]
//!   takes owned, positioned operations tagged with user data and hands back completions.
//!   [`engine::UringEngine`] (one ring per queue worker) is the fast path;
//!   [`engine::SyncEngine`] is the fallback and the reference implementation in tests.
//! - [`disk`]: a disk as a graph of block nodes: leaves over an engine (`raw`, `null`), the
//!   per-worker [`disk::DiskQueue`] that a daemon's queue worker drives, the disk spec
//!   (`--disk` and `--blockdev`) and the one factory ([`disk::open_disk`]) that builds the
//!   graph and probes io_uring.
//! - [`tier`] and [`throttle`]: nodes with children (an SSD cache in front of a capacity
//!   child; IOPS and bandwidth limits over any child). [`cache`] holds the tier's policies.
//! - [`metrics`]: counters and latency histograms owned by the device that counts them.
//! - [`huge_pages`]: huge-page-backed arrays for the tables the data path reads at random.
//!
//! Nothing here knows about virtio or vhost-user: the daemons translate their protocol into
//! [`disk::DiskOp`]s.

pub mod cache;
pub mod check;
pub mod crypto;
pub mod disk;
pub mod engine;
pub mod error;
pub mod huge_pages;
pub mod iov;
pub mod metrics;
pub mod qcow2;
#[cfg(feature = "rbd")]
pub mod rbd;
pub mod throttle;
pub mod tier;
pub mod units;

#[cfg(test)]
mod test_support;

pub use error::{StorageError, StorageErrorKind};
