//! daemon-support: what both of Strata's vhost-user daemons need below their device
//! protocols: the vhost-user transport, generic over the device and its queue workers
//! ([`transport`]), descriptor chains read as byte streams and turned into iovecs into guest
//! memory ([`chain`]), the driver's avail index and whether it can be trusted ([`ring`]),
//! binding unix sockets and waiting for a frontend ([`socket`]), termination signals on one
//! thread ([`signals`]), the queue workers' run loop ([`serve`]; each daemon supplies its
//! request handling), how long a worker polls ([`polling`]), the management API's server
//! ([`http`]; each daemon supplies its routes) and client ([`api_client`]), callers' roles
//! ([`access`]), the hash-chained audit log ([`audit`]), long operations as jobs ([`jobs`]),
//! and one-line command-line errors ([`cli`]).

pub mod access;
pub mod api_client;
pub mod audit;
pub mod chain;
pub mod cli;
pub mod http;
pub mod jobs;
pub mod polling;
pub mod ring;
pub mod serve;
pub mod signals;
pub mod socket;
pub mod transport;
