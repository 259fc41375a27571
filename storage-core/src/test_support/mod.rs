//! Test support shared by the nodes' unit tests: driving a queue as a worker does
//! ([`queue`]) and building power-cut crash states from a recorded device log
//! ([`power_cut`]). Compiled only for tests.

pub(crate) mod power_cut;
pub(crate) mod queue;
