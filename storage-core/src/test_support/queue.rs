//! Driving a node's queue as a daemon's worker does, one request at a time or many.

use std::time::{Duration, Instant};

use crate::disk::{DiskCompletion, DiskOp, DiskQueue, IoVecs, Rejected, StartError};

/// Starts `op` (retrying while the queue is busy) without waiting for it.
pub(crate) fn start(q: &mut impl DiskQueue, mut op: DiskOp, tag: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match q.start(op, tag) {
            Ok(()) => return,
            Err(Rejected {
                error: StartError::Busy,
                op: back,
            }) => {
                op = back;
                q.submit().unwrap();
                q.wait().unwrap();
                assert!(Instant::now() < deadline, "queue stayed busy");
            }
            Err(e) => panic!("start failed: {e}"),
        }
    }
}

/// Drives the queue until every request (and a tier's promotions) has finished; returns
/// the completions, buffers and all.
pub(crate) fn settle_all(q: &mut impl DiskQueue) -> Vec<DiskCompletion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    loop {
        q.submit().unwrap();
        while let Some(c) = q.pop_completion() {
            done.push(c);
        }
        if q.in_flight() == 0 {
            return done;
        }
        q.wait().unwrap();
        assert!(Instant::now() < deadline, "requests did not finish");
    }
}

/// As [`settle_all`], the completions as (tag, result).
pub(crate) fn settle(q: &mut impl DiskQueue) -> Vec<(u64, i32)> {
    settle_all(q).iter().map(|c| (c.tag, c.result)).collect()
}

/// Runs one request to completion; returns its result.
pub(crate) fn run(q: &mut impl DiskQueue, op: DiskOp) -> i32 {
    start(q, op, 0);
    let done = settle(q);
    assert_eq!(done.len(), 1);
    done[0].1
}

/// Reads `len` bytes at `offset`, which must succeed whole.
pub(crate) fn read(q: &mut impl DiskQueue, offset: u64, len: usize) -> Vec<u8> {
    let buffers = IoVecs::owned(&[len]);
    start(q, DiskOp::Read { offset, buffers }, 0);
    let done = settle_all(q);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, len as i32);
    done[0]
        .buffers
        .as_ref()
        .expect("a read gives its buffers back")
        .to_vec()
}
