//! The throttle node driven as a worker drives it: requests kept in flight at depth 32, the
//! worker sleeping on the queue's completion fd between passes (so the timer, not a sleep,
//! paces held requests), completions counted against the limits.

use std::os::unix::io::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::disk::{Disk, DiskOp, DiskQueue, IoVecs, NullDisk};

const DEPTH: u32 = 32;

fn limits(pairs: &[(&str, u64)]) -> ThrottleLimits {
    let mut l = ThrottleLimits::default();
    for (k, v) in pairs {
        l.set(k, &v.to_string()).unwrap();
    }
    l.check().unwrap()
}

fn null_throttle(group: Arc<ThrottleGroup>) -> ThrottleDisk {
    ThrottleDisk::new(AnyDisk::Null(NullDisk::new(1 << 30, false, true)), group)
}

fn wait_readable(fd: RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32 + 1) };
}

/// Keeps `DEPTH` 4 KiB requests (reads, or writes when `write`) in flight on each queue for
/// `run`; returns how many completed on each after `warm`.
fn drive(queues: &mut [ThrottleQueue], write: bool, warm: Duration, run: Duration) -> Vec<u64> {
    let mut counted = vec![0u64; queues.len()];
    let start = Instant::now();
    let begin = |q: &mut ThrottleQueue, tag: u64, buffers: IoVecs| {
        let offset = tag * 4096;
        let op = if write {
            DiskOp::Write { offset, buffers }
        } else {
            DiskOp::Read { offset, buffers }
        };
        q.start(op, tag).unwrap();
    };
    for q in queues.iter_mut() {
        for tag in 0..u64::from(DEPTH) {
            begin(q, tag, IoVecs::owned(&[4096]));
        }
        q.submit().unwrap();
    }
    while start.elapsed() < warm + run {
        for (i, q) in queues.iter_mut().enumerate() {
            wait_readable(q.completion_fd().unwrap(), Duration::from_millis(1));
            q.ack_completion_fd();
            q.submit().unwrap();
            // Collected first: a null child completes inside `start`.
            let mut done = Vec::with_capacity(DEPTH as usize);
            while let Some(c) = q.pop_completion() {
                assert!(c.result >= 0);
                done.push((
                    c.tag,
                    c.buffers.expect("a read or write gives its buffers back"),
                ));
            }
            if start.elapsed() >= warm {
                counted[i] += done.len() as u64;
            }
            for (tag, buffers) in done {
                begin(q, tag, buffers);
            }
            q.submit().unwrap();
        }
    }
    // Drain: held requests go at once, limits aside.
    for q in queues.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.in_flight() > 0 {
            q.wait().unwrap();
            while q.pop_completion().is_some() {}
            assert!(Instant::now() < deadline, "the drain did not end");
        }
    }
    counted
}

fn rate(count: u64, run: Duration) -> f64 {
    count as f64 / run.as_secs_f64()
}

/// A limit of N IOPS holds at depth 32: never above it by more than 5% (the limit), and
/// not far below it (the timer wakes the worker in time; a loaded machine may lag a bit).
#[test]
fn an_iops_limit_holds_at_depth_32() {
    let group = ThrottleGroup::private(limits(&[("iops-total", 2000)]));
    let disk = null_throttle(group);
    let mut q = [disk.new_queue(DEPTH).unwrap()];
    let run = Duration::from_millis(1500);
    let n = drive(&mut q, false, Duration::from_millis(300), run);
    let r = rate(n[0], run);
    assert!(r <= 2000.0 * 1.05, "{r:.0} IOPS against a limit of 2000");
    assert!(
        r >= 2000.0 * 0.8,
        "{r:.0} IOPS: the timer lags the limit of 2000"
    );
}

/// A bandwidth limit counts bytes: 4 KiB requests under 4 MiB/s make 1024 IOPS.
#[test]
fn a_bandwidth_limit_counts_bytes() {
    let group = ThrottleGroup::private(limits(&[("bps-write", 4 << 20)]));
    let disk = null_throttle(group);
    let mut q = [disk.new_queue(DEPTH).unwrap()];
    let run = Duration::from_millis(1000);
    let n = drive(&mut q, true, Duration::from_millis(300), run);
    let r = rate(n[0], run);
    assert!(r <= 1024.0 * 1.05, "{r:.0} IOPS");
    assert!(r >= 1024.0 * 0.8, "{r:.0} IOPS");
}

/// A read limit leaves writes alone.
#[test]
fn a_read_limit_does_not_hold_writes() {
    let group = ThrottleGroup::private(limits(&[("iops-read", 100)]));
    let disk = null_throttle(group);
    let mut q = [disk.new_queue(DEPTH).unwrap()];
    let run = Duration::from_millis(300);
    let n = drive(&mut q, true, Duration::ZERO, run);
    assert!(rate(n[0], run) > 5000.0, "writes were held: {}", n[0]);
}

/// Two disks in one group share its limit.
#[test]
fn a_group_limits_its_members_together() {
    let group = ThrottleGroup::join("tests-shared", Some(limits(&[("iops-total", 1000)]))).unwrap();
    assert!(Arc::ptr_eq(
        &group,
        &ThrottleGroup::join("tests-shared", None).unwrap()
    ));
    let other = limits(&[("iops-total", 5)]);
    assert!(ThrottleGroup::join("tests-shared", Some(other)).is_err());
    let (a, b) = (null_throttle(group.clone()), null_throttle(group));
    let mut qs = [a.new_queue(DEPTH).unwrap(), b.new_queue(DEPTH).unwrap()];
    let run = Duration::from_millis(1500);
    let n = drive(&mut qs, false, Duration::from_millis(300), run);
    let total = rate(n[0] + n[1], run);
    assert!(
        total <= 1000.0 * 1.05,
        "{total:.0} IOPS together, limit 1000"
    );
    assert!(
        total >= 1000.0 * 0.8,
        "{total:.0} IOPS together, limit 1000"
    );
    assert!(n[0] > 0 && n[1] > 0, "one member starved: {n:?}");
}

/// New limits take effect at run time, on queues already serving.
#[test]
fn limits_change_at_run_time() {
    let group = ThrottleGroup::private(limits(&[("iops-total", 500)]));
    let disk = null_throttle(group.clone());
    let mut q = [disk.new_queue(DEPTH).unwrap()];
    let run = Duration::from_millis(800);
    let slow = rate(
        drive(&mut q, false, Duration::from_millis(200), run)[0],
        run,
    );
    group.set_limits(limits(&[("iops-total", 4000)]));
    let fast = rate(
        drive(&mut q, false, Duration::from_millis(200), run)[0],
        run,
    );
    assert!(slow <= 500.0 * 1.05, "{slow:.0}");
    assert!((4000.0 * 0.8..=4000.0 * 1.05).contains(&fast), "{fast:.0}");
}

/// Raising the limits releases waiting requests at once: the group wakes every member's
/// timer, rather than leaving them to the wait the old limits set.
#[test]
fn raised_limits_release_waiting_requests_at_once() {
    let group = ThrottleGroup::private(limits(&[("iops-read", 1)]));
    let disk = null_throttle(group.clone());
    let mut q = disk.new_queue(DEPTH).unwrap();
    let done = start_reads(&mut q, 4);
    assert!(done < 4, "1 IOPS let {done} reads go at once");
    group.set_limits(limits(&[("iops-read", 100_000)]));
    let waited = finish_reads(&mut q, 4 - done);
    assert!(
        waited < Duration::from_millis(500),
        "held reads waited {waited:?}: for the old limit's timer"
    );
}

/// Starts `n` 4 KiB reads and submits them; returns how many completed at once.
fn start_reads(q: &mut impl DiskQueue, n: u64) -> usize {
    for tag in 0..n {
        let buffers = IoVecs::owned(&[4096]);
        q.start(DiskOp::Read { offset: 0, buffers }, tag).unwrap();
    }
    q.submit().unwrap();
    std::iter::from_fn(|| q.pop_completion()).count()
}

/// Waits for `left` completions, blocking on the queue's completion fd alone (as a worker
/// does); returns how long that took.
fn finish_reads(q: &mut impl DiskQueue, mut left: usize) -> Duration {
    let began = Instant::now();
    while left > 0 {
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "held reads never woke the worker"
        );
        wait_readable(q.completion_fd().unwrap(), Duration::from_secs(1));
        q.ack_completion_fd();
        q.submit().unwrap();
        left -= std::iter::from_fn(|| q.pop_completion()).count();
    }
    began.elapsed()
}

/// Throttles stacked deeper than the kernel nests epoll sets (four) still make one
/// wake-up fd: each joins its child's fds, not its child's set; a held request on the
/// innermost one wakes the worker through the outermost's fd.
#[test]
fn deep_stacks_of_throttles_wake_through_one_fd() {
    let mut disk = AnyDisk::Null(NullDisk::new(1 << 30, false, true));
    for level in 0..8 {
        let iops = if level == 0 { 20 } else { 1_000_000 };
        let group = ThrottleGroup::private(limits(&[("iops-read", iops)]));
        disk = AnyDisk::Throttle(Box::new(ThrottleDisk::new(disk, group)));
    }
    let mut q = disk
        .new_queue(DEPTH)
        .expect("a queue on eight stacked throttles");
    // Only the innermost throttle's timer can make the root's fd readable.
    let done = start_reads(&mut q, 4);
    finish_reads(&mut q, 4 - done);
}

/// Held requests count as in flight (a drain waits for them), keep their order, and reach
/// the child with their buffers: a throttled read returns the child's data.
#[test]
fn held_requests_complete_in_order_with_their_data() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i / 4096) as u8).collect();
    std::fs::write(f.path(), &data).unwrap();
    let raw = crate::disk::RawDisk::open(f.path(), false, false, crate::engine::EngineKind::Sync)
        .unwrap();
    let disk = ThrottleDisk::new(
        AnyDisk::Raw(raw),
        ThrottleGroup::private(limits(&[("iops-read", 100)])),
    );
    let mut q = disk.new_queue(DEPTH).unwrap();
    for i in 0..30u64 {
        let op = DiskOp::Read {
            offset: i * 4096,
            buffers: IoVecs::from_bytes(&[0xff; 4096]),
        };
        q.start(op, i).unwrap();
    }
    q.submit().unwrap();
    let mut order = Vec::new();
    let mut bufs = Vec::new();
    while let Some(c) = q.pop_completion() {
        order.push(c.tag);
        bufs.push(c.buffers.unwrap().to_vec());
    }
    // 100 IOPS: a bucket of 10, plus the one that may overfill it.
    assert!(order.len() <= 11, "{} reads went at once", order.len());
    assert_eq!(q.in_flight(), 30 - order.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.in_flight() > 0 {
        q.wait().unwrap();
        while let Some(c) = q.pop_completion() {
            order.push(c.tag);
            bufs.push(c.buffers.unwrap().to_vec());
        }
        assert!(Instant::now() < deadline);
    }
    assert_eq!(order, (0..30).collect::<Vec<u64>>());
    for (i, b) in bufs.iter().enumerate() {
        assert!(
            b.iter().all(|&x| x == i as u8),
            "read {i} has the wrong data"
        );
    }
}
