//! Test and bench fixtures.
pub mod blkio_client;
pub mod ceph;
pub mod crash;
pub mod daemon;
pub mod fuse_client;
pub mod fuzz;
pub mod guest;
pub mod http;
pub mod image;
pub mod tools;
pub mod workload;
