//! vhost-blk: a vhost-user-blk daemon on storage-core's data path.
//!
//! Layers, top down: [`daemon`] (lifecycle, reconnects, signals) -> [`backend`] (the
//! vhost-user transport; the only user of `vhost-user-backend`) -> [`worker`] (one per queue:
//! virtqueue to disk queue and back) -> [`request`] (descriptor chains into requests) over
//! [`virtio_blk`] (the spec's numbers and config layout). [`device`] holds the state they
//! share; [`api`] serves metrics and status over HTTP; [`config`] parses the command line.

pub mod api;
pub mod backend;
pub mod config;
pub mod daemon;
pub mod device;
pub mod request;
pub mod virtio_blk;
pub mod worker;
