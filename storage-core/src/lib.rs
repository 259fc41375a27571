//! storage-core: the storage data path that Strata's daemons stand on.
//!
//! It owns three layers, from the bottom up:
//! - [`engine`]: the one seam between storage logic and the kernel. An [`engine::IoEngine`]
//!   takes owned, positioned operations tagged with user data and hands back completions.
//!   [`engine::UringEngine`] (one ring per queue worker) is the fast path;
//!   [`engine::SyncEngine`] is the fallback and the reference implementation in tests.
//! - [`disk`]: disk formats layered over an engine (`raw`, `null`), the per-worker
//!   [`disk::DiskQueue`] that a daemon's queue worker drives, the disk spec and the one
//!   factory ([`disk::open_disk`]) that validates a spec, opens the disk and probes io_uring.
//! - [`metrics`]: counters and latency histograms owned by the device that counts them.
//! - [`huge_pages`]: huge-page-backed arrays for the tables the data path reads at random.
//!
//! Nothing here knows about virtio or vhost-user: the daemons translate their protocol into
//! [`disk::DiskOp`]s.

pub mod cache;
pub mod disk;
pub mod engine;
pub mod error;
pub mod huge_pages;
pub mod metrics;
pub mod tier;
pub mod units;

pub use error::{StorageError, StorageErrorKind};
