//! Test and bench fixtures.
pub mod blkio_client;
pub mod crash;
pub mod daemon;
pub mod guest;
pub mod http;
pub mod tools;
