//! Workload code shared by Strata's benchmarks and the tests that reuse them.
//!
//! This crate's library owns the parts of a block benchmark that do not depend on what is being
//! measured: random offsets ([`Rng`], [`random_block`]), a latency histogram with percentiles
//! ([`Histogram`]), and the queue-depth loop that keeps N requests in flight on one libblkio
//! queue and times each of them ([`run_workload`]). The `blk-compare` binary and the criterion
//! suites build on it. [`wake`] measures what waking a sleeping client costs on this machine.

use std::time::{Duration, Instant};

use testkit::blkio_client::{ClientError, Queue, SlotOp};

pub mod wake;

/// xorshift64*: small, fast, and reproducible from a seed, so two daemons see the same offset
/// sequence. Not for anything but choosing offsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point; mix the seed so that small seeds differ.
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (no modulo bias worth measuring).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// A random `block`-aligned offset such that `[offset, offset + block)` lies in `capacity`.
pub fn random_block(rng: &mut Rng, capacity: u64, block: u64) -> u64 {
    let blocks = capacity / block;
    assert!(blocks > 0, "capacity {capacity} smaller than block {block}");
    rng.below(blocks) * block
}

/// A Zipf distribution over `n` items (Gray et al.'s generator, as in YCSB), with ranks
/// scrambled over the item space so the hot items do not sit side by side on the disk.
#[derive(Clone, Copy, Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    /// `n` items (blocks) with skew `theta` (0.99 for the classic hot-spot workload).
    pub fn new(n: u64, theta: f64) -> Zipf {
        assert!(n >= 2 && theta > 0.0 && theta < 1.0);
        let zeta = |k: u64| (1..=k).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2);
        Zipf {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    /// A rank in `[0, n)`; rank 0 is the most popular.
    pub fn rank(&self, rng: &mut Rng) -> u64 {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }

    /// A block index in `[0, n)`: the rank, scrambled (a bijection when `n` is a power of two).
    pub fn block(&self, rng: &mut Rng) -> u64 {
        let r = self.rank(rng);
        if self.n.is_power_of_two() {
            r.wrapping_mul(0x9E37_79B9_7F4A_7C15) & (self.n - 1)
        } else {
            r.wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.n
        }
    }
}

/// Latency histogram: log-linear buckets (64 per power of two of nanoseconds), so every
/// percentile is within 1/64 (1.6%) of the true value, in fixed memory however long the run.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; (64 * SUB) as usize],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < SUB {
            return ns as usize;
        }
        let msb = 63 - ns.leading_zeros(); // >= SUB_BITS
        let shift = msb - SUB_BITS;
        let sub = (ns >> shift) - SUB; // 0..SUB
        ((u64::from(shift) + 1) * SUB + sub) as usize
    }

    /// The largest value that falls in bucket `i` (what percentiles report: conservative).
    fn upper(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let shift = i / SUB - 1;
        let sub = i % SUB;
        ((SUB + sub + 1) << shift) - 1
    }

    pub fn record(&mut self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn mean(&self) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.sum_ns / u128::from(self.total)) as u64)
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    /// The latency below which `p` percent of samples fall (0 < p <= 100); zero if empty.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(Self::upper(i).min(self.max_ns));
            }
        }
        self.max()
    }
}

/// What one run does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    RandRead,
    RandWrite,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub pattern: Pattern,
    pub block: usize,
    pub depth: usize,
    /// Offsets are drawn from `[0, span)` (whole blocks).
    pub span: u64,
    /// Draw blocks from this Zipf distribution instead of uniformly.
    pub zipf: Option<Zipf>,
    pub duration: Duration,
    pub seed: u64,
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub ops: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram,
    /// The first error, for the report.
    pub first_error: Option<String>,
}

impl RunResult {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Keeps `depth` requests in flight on `queue` for `duration`, resubmitting each slot as soon as
/// its request completes, and times every request from submission to completion. Stops
/// submitting at the deadline and drains what is in flight (those count too).
pub fn run_workload(queue: &mut Queue, w: &Workload) -> Result<RunResult, ClientError> {
    let mut pipe = queue.pipeline(w.depth, w.block)?;
    let mut rng = Rng::new(w.seed);
    let mut started = vec![Instant::now(); w.depth];
    let mut latency = Histogram::default();
    let mut ops = 0u64;
    let mut errors = 0u64;
    let mut first_error = None;

    if w.pattern == Pattern::RandWrite {
        // Non-zero data, so that no layer can shortcut zero pages.
        for slot in 0..w.depth {
            let fill = (slot as u8).wrapping_mul(37) | 1;
            pipe.slot_mut(slot).fill(fill);
        }
    }
    let submit = |pipe: &mut testkit::blkio_client::Pipeline<'_>,
                  rng: &mut Rng,
                  started: &mut [Instant],
                  slot: usize| {
        let offset = match &w.zipf {
            Some(z) => z.block(rng) * w.block as u64,
            None => random_block(rng, w.span, w.block as u64),
        };
        let op = match w.pattern {
            Pattern::RandRead => SlotOp::Read(offset),
            Pattern::RandWrite => SlotOp::Write(offset),
        };
        started[slot] = Instant::now();
        pipe.submit(slot, op);
    };

    let begin = Instant::now();
    let deadline = begin + w.duration;
    for slot in 0..w.depth {
        submit(&mut pipe, &mut rng, &mut started, slot);
    }
    let mut free = Vec::with_capacity(w.depth);
    while pipe.in_flight() > 0 {
        free.clear();
        pipe.wait(1, |slot, result| {
            latency.record(started[slot].elapsed());
            match result {
                Ok(()) => ops += 1,
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
            }
            free.push(slot);
        })?;
        if Instant::now() < deadline {
            for &slot in &free {
                submit(&mut pipe, &mut rng, &mut started, slot);
            }
        }
    }
    Ok(RunResult {
        ops,
        errors,
        elapsed: begin.elapsed(),
        latency,
        first_error,
    })
}

/// CPU time the hypervisor gave to other guests while this machine's CPUs wanted to run
/// (the `steal` column of /proc/stat, all CPUs), or `None` where it cannot be read. A run
/// during which it grows was disturbed from outside: its figures say more about the host
/// than about the software under test.
pub fn steal_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: u64 = cpu.split_whitespace().nth(7)?.parse().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Runs `f` and returns, with its result, the CPU time the host stole meanwhile
/// (`steal_time`); `None` where that cannot be read.
pub fn with_steal<T>(f: impl FnOnce() -> T) -> (T, Option<Duration>) {
    let before = steal_time();
    let out = f();
    let stolen = before.zip(steal_time()).map(|(a, b)| b.saturating_sub(a));
    (out, stolen)
}

/// Warns when the host stole at least 2% of a run of `run`: its figures are disturbed.
pub fn warn_if_stolen(stolen: Option<Duration>, run: Duration) {
    if let Some(st) = stolen.filter(|st| *st >= run / 50) {
        eprintln!(
            "  WARNING: the host stole {:.2} s of CPU during this run; its figures are disturbed",
            st.as_secs_f64()
        );
    }
}

/// Median of a non-empty list (mean of the middle two for even lengths).
pub fn median(values: &[f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pinned client must still see every CPU, or it stops pinning the daemons.
    #[test]
    fn the_cpu_count_ignores_the_callers_pinning() {
        let before = pin::allowed().to_vec();
        let pinned = std::thread::spawn(|| {
            pin::current_thread(pin::client_cpu()).unwrap();
            pin::allowed().to_vec()
        })
        .join()
        .unwrap();
        assert_eq!(pinned, before);
        assert!(pin::daemon_cpu() <= pin::client_cpu());
    }

    #[test]
    fn rng_is_reproducible_and_spreads() {
        let a: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..5).map(|_| r.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut r = Rng::new(1);
            (0..5).map(|_| r.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, {
            let mut r = Rng::new(2);
            (0..5).map(|_| r.next_u64()).collect::<Vec<_>>()
        });
        let mut r = Rng::new(7);
        let mut hits = [0u32; 16];
        for _ in 0..16_000 {
            hits[r.below(16) as usize] += 1;
        }
        assert!(hits.iter().all(|&h| (800..1200).contains(&h)), "{hits:?}");
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(1 << 16, 0.99);
        let mut r = Rng::new(5);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..100_000 {
            let b = z.block(&mut r);
            assert!(b < 1 << 16);
            *counts.entry(b).or_insert(0u32) += 1;
        }
        let mut c: Vec<u32> = counts.values().copied().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        // The 1% most popular blocks take well over a third of the accesses.
        let top: u32 = c.iter().take(655).sum();
        assert!(top > 35_000, "top 1% got {top} of 100000");
    }

    #[test]
    fn random_blocks_are_aligned_and_in_range() {
        let mut r = Rng::new(3);
        for _ in 0..10_000 {
            let o = random_block(&mut r, 1 << 20, 4096);
            assert_eq!(o % 4096, 0);
            assert!(o + 4096 <= 1 << 20);
        }
        // A capacity that is not a multiple of the block still keeps blocks inside it.
        for _ in 0..1000 {
            assert!(random_block(&mut r, 10_000, 4096) + 4096 <= 10_000);
        }
    }

    #[test]
    fn histogram_percentiles_are_within_resolution() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let close = |got: Duration, want_us: f64| {
            let got = got.as_nanos() as f64 / 1000.0;
            assert!(
                (got - want_us).abs() <= want_us / 60.0,
                "got {got} µs, want {want_us} µs"
            );
        };
        close(h.percentile(50.0), 500.0);
        close(h.percentile(99.0), 990.0);
        close(h.percentile(100.0), 1000.0);
        close(h.mean(), 500.5);
        assert_eq!(h.max(), Duration::from_micros(1000));

        let mut other = Histogram::default();
        for _ in 0..1000 {
            other.record(Duration::from_millis(10));
        }
        h.merge(&other);
        close(h.percentile(25.0), 500.0);
        close(h.percentile(75.0), 10_000.0);
    }

    #[test]
    fn histogram_buckets_cover_small_and_huge_values() {
        for ns in [
            0u64,
            1,
            63,
            64,
            65,
            127,
            128,
            1000,
            123_456_789,
            u64::MAX / 2,
        ] {
            let i = Histogram::index(ns);
            assert!(Histogram::upper(i) >= ns, "ns {ns} bucket {i}");
            if i > 0 {
                assert!(Histogram::upper(i - 1) < ns, "ns {ns} bucket {i}");
            }
        }
        assert!(Histogram::index(u64::MAX) < 64 * SUB as usize);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}

/// CPU pinning for side-by-side runs. On a 2-core machine the client and the daemon under
/// test each need a core; left to the scheduler they sometimes share one for a while, and
/// the same run then measures half as fast (bimodal results). Pinning the client to the last
/// CPU and every thread of the daemon to the first gives each target the same layout.
pub mod pin {
    use std::io;

    fn set(tid: libc::pid_t, cpu: usize) -> io::Result<()> {
        // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write only into `set`.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; libc's CPU_SET indexes the set's word array with a bounds check,
        // so a `cpu` past its capacity panics rather than writing outside it.
        unsafe {
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
        }
        // SAFETY: `set` is initialised and its size is passed with it.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The CPUs this process may run on (taskset, a container's cpuset), in order, as they
    /// were at the first call. Read once: after `client_and_daemon` pins the client, the
    /// caller's own set is one CPU, and counting that left every later daemon unpinned.
    pub fn allowed() -> &'static [usize] {
        static ALLOWED: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
        ALLOWED.get_or_init(|| {
            // SAFETY: cpu_set_t is plain data, filled by the kernel below.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: `set` is valid for writes of its own size, which is passed with it.
            let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                // SAFETY: `cpu` is below CPU_SETSIZE, the set's capacity.
                .filter(|&cpu| rc == 0 && unsafe { libc::CPU_ISSET(cpu, &set) })
                .collect();
            if cpus.is_empty() {
                vec![0]
            } else {
                cpus
            }
        })
    }

    /// How many CPUs this process may run on (see `allowed`).
    pub fn cpus() -> usize {
        allowed().len()
    }

    /// The CPU the daemons under test get: the first allowed one.
    pub fn daemon_cpu() -> usize {
        allowed()[0]
    }

    /// The CPU the client gets: the last allowed one.
    pub fn client_cpu() -> usize {
        allowed()[allowed().len() - 1]
    }

    /// Pins the calling thread to `cpu`.
    pub fn current_thread(cpu: usize) -> io::Result<()> {
        set(0, cpu)
    }

    /// A cpuset cgroup of `cpu` alone, or `None` where the cgroup-v1 cpuset controller is
    /// not mounted (then `process` pinning is all there is).
    ///
    /// Unlike `process`, it also binds threads the kernel starts for its members later:
    /// io_uring's io-wq workers take their CPUs from the cpuset, not from the affinity of
    /// the thread that made the ring, so without it a daemon whose ring predates the pinning
    /// (qemu-storage-daemon's) had workers on the client's CPU in some runs and not in
    /// others (randwrite 148K-222K IOPS from run to run).
    pub fn cpuset(cpu: usize) -> io::Result<Option<crate::cgroup::Group>> {
        let root = std::path::Path::new("/sys/fs/cgroup/cpuset");
        let Ok(mems) = std::fs::read_to_string(root.join("cpuset.mems")) else {
            return Ok(None);
        };
        // A cpuset takes tasks only once it has both memory nodes and CPUs.
        crate::cgroup::Group::new(
            "cpuset",
            &[
                ("cpuset.mems", mems.trim().to_string()),
                ("cpuset.cpus", cpu.to_string()),
            ],
        )
        .map(Some)
    }

    /// The layout every side-by-side run uses: the calling (client) thread on the last
    /// CPU, every thread of the daemon under test, if any, on the first. Nothing on a
    /// single CPU.
    pub fn client_and_daemon(daemon: Option<u32>) -> io::Result<()> {
        if cpus() < 2 {
            return Ok(());
        }
        current_thread(client_cpu())?;
        daemon.map_or(Ok(()), |pid| process(pid, daemon_cpu()))
    }

    /// Pins every thread of process `pid` to `cpu` (threads it starts later inherit it).
    pub fn process(pid: u32, cpu: usize) -> io::Result<()> {
        for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let tid: libc::pid_t = match entry?.file_name().to_string_lossy().parse() {
                Ok(t) => t,
                Err(_) => continue,
            };
            // A thread that exited meanwhile is no error.
            match set(tid, cpu) {
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                other => other?,
            }
        }
        Ok(())
    }
}

/// Cgroup-v1 groups the benches put daemons in (a CPU set, a disk throttle).
pub mod cgroup {
    use std::io;
    use std::path::{Path, PathBuf};

    /// A group under one controller, made with its settings, removed on drop (once its
    /// member processes have exited).
    pub struct Group {
        dir: PathBuf,
    }

    impl Group {
        /// A new group of `controller` (which must be mounted at /sys/fs/cgroup/CONTROLLER)
        /// with each `(file, value)` of `settings` written, in order.
        pub fn new(controller: &str, settings: &[(&str, String)]) -> io::Result<Group> {
            let root = Path::new("/sys/fs/cgroup").join(controller);
            let dir = root.join(format!("strata-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let group = Group { dir };
            for (file, value) in settings {
                std::fs::write(group.dir.join(file), value).map_err(|e| {
                    io::Error::new(e.kind(), format!("setting {controller} {file}: {e}"))
                })?;
            }
            Ok(group)
        }

        /// Moves process `pid` (all its threads) into the group.
        pub fn add(&self, pid: u32) -> io::Result<()> {
            std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
        }
    }

    impl Drop for Group {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Converts the raw file into a fully allocated qcow2 image (64 KiB clusters; `-S 0`: no
/// cluster is left out for being zero) and reads it once, so that it is page-cached as the
/// raw file is.
pub fn prepare_qcow2(raw: &std::path::Path, qcow2: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Read;
    let t = Instant::now();
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", "-S", "0"])
        .args(["-o", "cluster_size=65536"])
        .arg(raw)
        .arg(qcow2)
        .output()
        .context("qemu-img (Debian's qemu-utils) makes the qcow2 image")?;
    if !out.status.success() {
        anyhow::bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut f = std::fs::File::open(qcow2)?;
    let mut buf = vec![0u8; 1 << 20];
    while f.read(&mut buf)? > 0 {}
    eprintln!(
        "qcow2 image {}: converted from the raw file, fully allocated, page-cached ({:.1} s)",
        qcow2.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
