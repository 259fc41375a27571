//! daemon-support: the process plumbing both of Strata's vhost-user daemons need and that
//! has nothing to do with their protocols: binding unix sockets ([`socket`]), receiving
//! termination signals on one thread ([`signals`]), serving the HTTP API's requests
//! ([`api`]; each daemon supplies its routes), and one-line command-line errors ([`cli`]).

pub mod api;
pub mod cli;
pub mod signals;
pub mod socket;
