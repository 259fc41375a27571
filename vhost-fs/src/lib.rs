//! vhost-fs: a vhost-user-fs daemon that shares a host directory with a guest.
//!
//! Layers, top down, as virtiofsd's:
//! - transport: [`daemon`] (lifecycle, sandbox, signals) and [`backend`] (the only user of
//!   `vhost-user-backend`), with one [`worker`] per virtqueue that owns its own I/O engine
//!   (storage-core's io_uring) and turns descriptor chains ([`chain`]) into messages;
//! - protocol: [`server`] decodes ([`decode`], over the wire format in [`fuse`]), dispatches
//!   and encodes replies; READ and WRITE go back to the worker to run in place in guest
//!   memory;
//! - [`filesystem`]: the trait between the server and an implementation;
//! - [`passthrough`]: the host directory, with secure name resolution and credentials;
//!   [`read_only`] wraps any filesystem and refuses every write.
//!
//! [`device`] holds what they share, [`api`] serves metrics, [`config`] parses the command
//! line (virtiofsd's flag names), [`sandbox`] confines the process to the share, and
//! [`pool`] is the optional thread pool for blocking requests (`--thread-pool-size`).

pub mod api;
pub mod backend;
pub mod capabilities;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod device;
pub mod filesystem;
pub mod fuse;
pub mod passthrough;
pub mod pool;
pub mod read_only;
pub mod sandbox;
pub mod seccomp;
pub mod server;
pub mod worker;
