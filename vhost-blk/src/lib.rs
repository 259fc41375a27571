//! vhost-blk: a vhost-user-blk daemon on storage-core's data path.
//!
//! Layers, top down: [`daemon`] (the set of disks, lifecycle, signals) -> [`disk_server`]
//! (one disk: its socket, reconnects, drain and flush) -> [`backend`] (the
//! vhost-user transport; the only user of `vhost-user-backend`) -> [`worker`] (one per queue:
//! virtqueue to disk queue and back) -> [`request`] (descriptor chains into requests) over
//! [`virtio_blk`] (the spec's numbers and config layout). [`device`] holds the state they
//! share; [`api`] is the management API ([`admission`]: what a disk added through it may touch); [`config`] checks the command line and each disk,
//! [`config_file`] reads the config file and writes disk changes back; [`space`] watches
//! the free space under each disk's files; [`history`] keeps what the dashboard
//! ([`dashboard`]) shows; [`lifecycle`] runs the disks' snapshot policies.

pub mod admission;
pub mod api;
pub mod backend;
pub mod config;
pub mod config_file;
pub mod daemon;
pub mod dashboard;
pub mod device;
pub mod disk_server;
pub mod history;
pub mod lifecycle;
pub mod request;
pub mod space;
pub mod virtio_blk;
pub mod worker;
