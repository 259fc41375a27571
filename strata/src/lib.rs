//! strata, the command-line client: its command-line definition ([`cli`]), shared with the
//! man page generator.

pub mod cli;
