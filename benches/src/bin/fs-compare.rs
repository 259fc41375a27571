//! `fs-compare`: our vhost-fs beside virtiofsd, driven by the same FUSE-over-vhost-user
//! client (testkit's, no VM), on the same directory.
//!
//! Both daemons serve one frontend and exit when it disconnects, so every run starts its
//! daemon afresh (same flags: `--cache=auto --sandbox=none`), connects, sends INIT, warms up
//! and measures. Client and daemon share two cores, so absolute numbers drift: each round
//! runs every workload on both daemons back to back, alternating which goes first, and the
//! headline figures are per-round ratios (ours/virtiofsd) and their medians.
//!
//! Workloads: 4 KiB random READ and WRITE at 32 in flight on a page-cached 1 GiB file,
//! sequential 1 MiB READs at 4 in flight, and metadata rates, one request at a time as one
//! guest process would issue them: CREATE (+RELEASE), LOOKUP (a cold stat), READDIRPLUS of
//! the 10,000 entries in 4 KiB replies (as Linux asks), UNLINK.
//!
//! Output: progress on stderr, then a table and one JSON line on stdout.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::{median, Histogram, Rng};
use clap::Parser;
use serde_json::json;
use testkit::daemon::{self, Daemon};
use testkit::fuse_client::{
    opcode, vhost_fs_command, virtiofsd_command, ClientOptions, FuseClient, REQUEST_QUEUE, ROOT_ID,
};

const MIB: u64 = 1 << 20;
const DEPTH: usize = 32;

#[derive(Parser, Debug)]
#[command(
    name = "fs-compare",
    about = "Compare vhost-fs with virtiofsd over the same no-VM FUSE client"
)]
struct Args {
    /// Directory to share (default: a temp dir on /dev/shm, i.e. tmpfs, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Size of the data file, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds; every round runs every workload on both daemons.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measured data run (after a one-second warm-up).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Files in the metadata workloads.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// Our daemon's binary (default: vhost-fs next to this binary, i.e. target/release).
    #[arg(long)]
    vhost_fs: Option<PathBuf>,
    /// Workloads to run (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Ours,
    Virtiofsd,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ours => "ours",
            Target::Virtiofsd => "virtiofsd",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    RandRead,
    /// 4 KiB random reads one at a time: latency, where polling shows.
    RandReadQd1,
    RandWrite,
    SeqRead,
    /// create, stat, readdir and unlink of `--files` entries.
    Metadata,
}

const WORKS: &[(Work, &str)] = &[
    (Work::RandRead, "randread-4k-qd32"),
    (Work::RandReadQd1, "randread-4k-qd1"),
    (Work::RandWrite, "randwrite-4k-qd32"),
    (Work::SeqRead, "seqread-1m-qd4"),
    (Work::Metadata, "metadata"),
];

/// One measured phase of one run.
struct Record {
    case: String,
    target: Target,
    round: usize,
    /// Operations per second (files per second for metadata).
    rate: f64,
    latency: Histogram,
    daemon_cpu: Duration,
    ops: u64,
    errors: u64,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("fs-compare: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.rounds == 0 || args.seconds == 0 || args.size_mib < 16 || args.files == 0 {
        bail!("--rounds, --seconds, --files must be positive and --size-mib at least 16");
    }
    let ours = match &args.vhost_fs {
        Some(p) => p.clone(),
        None => daemon::try_binary_path("vhost-fs").map_err(|e| {
            anyhow::anyhow!("{e}\n(for benchmarks: cargo build --release -p vhost-fs)")
        })?,
    };
    if ours.components().any(|c| c.as_os_str() == "debug") {
        eprintln!(
            "WARNING: {} looks like a debug build; numbers will not mean much",
            ours.display()
        );
    }
    // Fail now, not after the first round, if virtiofsd is missing.
    testkit::tools::require_tool("virtiofsd")?;

    // tmpfs by default: on a disk file system, CREATE's cost is dominated by the kernel's
    // inode allocator (ext4 scans past inodes the previous run just deleted), which measures
    // the order of the runs, not the daemons.
    let base = if Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/var/tmp"
    };
    let tmp = tempfile::Builder::new()
        .prefix("fs-compare.")
        .tempdir_in(base)
        .with_context(|| format!("creating a temp dir in {base}"))?;
    let share = match &args.dir {
        Some(d) => d.clone(),
        None => {
            let d = tmp.path().join("share");
            std::fs::create_dir(&d)?;
            d
        }
    };
    let size = args.size_mib * MIB;
    prepare_file(&share.join("data.bin"), size)?;
    let works: Vec<(Work, &str)> = WORKS
        .iter()
        .copied()
        .filter(|(_, n)| args.only.is_empty() || args.only.iter().any(|o| o == n))
        .collect();
    if works.is_empty() {
        bail!(
            "--only matches no workload (have: {})",
            WORKS.iter().map(|w| w.1).collect::<Vec<_>>().join(", ")
        );
    }

    let mut records = Vec::new();
    for round in 0..args.rounds {
        for (wi, &(work, name)) in works.iter().enumerate() {
            let mut order = [Target::Ours, Target::Virtiofsd];
            if (round + wi) % 2 == 1 {
                order.reverse();
            }
            for target in order {
                let socket = tmp.path().join(format!("{}.sock", target.name()));
                let mut d = start(target, &ours, &socket, &share)?;
                let out = measure(&args, work, name, target, round, &d, &socket, size);
                stop(&mut d, target);
                for r in out.with_context(|| format!("{name} on {}", target.name()))? {
                    eprintln!(
                        "round {} {:<22} {:<9} {:>10.0} ops/s  p50 {:>7.1} µs  p99 {:>7.1} µs  daemon CPU {:.2} s{}",
                        round + 1,
                        r.case,
                        target.name(),
                        r.rate,
                        us(r.latency.percentile(50.0)),
                        us(r.latency.percentile(99.0)),
                        r.daemon_cpu.as_secs_f64(),
                        if r.errors > 0 { format!("  ({} errors)", r.errors) } else { String::new() }
                    );
                    records.push(r);
                }
            }
        }
    }
    report(&args, &share, &records);
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

fn start(target: Target, ours: &Path, socket: &Path, share: &Path) -> Result<Daemon> {
    let cmd = match target {
        Target::Ours => vhost_fs_command(socket, share)?
            .program_path(ours)
            .args(["--cache", "auto"]),
        Target::Virtiofsd => virtiofsd_command(socket, share)?,
    };
    cmd.spawn()
        .with_context(|| format!("starting {}", target.name()))
}

trait ProgramPath {
    fn program_path(self, p: &Path) -> Self;
}

impl ProgramPath for daemon::DaemonCommand {
    fn program_path(mut self, p: &Path) -> Self {
        self.program = p.to_path_buf();
        self
    }
}

/// The daemons exit when the client disconnects; give them a moment, then make sure.
fn stop(d: &mut Daemon, target: Target) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = d.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "note: {} did not exit after the client left; stopping it",
        target.name()
    );
    let _ = d.terminate();
}

#[allow(clippy::too_many_arguments)]
fn measure(
    args: &Args,
    work: Work,
    name: &str,
    target: Target,
    round: usize,
    d: &Daemon,
    socket: &Path,
    size: u64,
) -> Result<Vec<Record>> {
    let opts = ClientOptions {
        slots: DEPTH,
        request_room: 8 * 1024,
        reply_room: (MIB as usize) + 4096,
        queue_size: 256,
        ..ClientOptions::default()
    };
    let mut c = FuseClient::connect(socket, opts).context("connecting")?;
    c.init().context("INIT")?;
    let pid = d.pid();
    let cpu = || daemon::cpu_time(pid).context("daemon CPU time");
    let run_time = Duration::from_secs(args.seconds);
    let seed = 1000 * round as u64 + work as u64;
    let rec = |case: &str, rate: f64, latency, cpu: Duration, ops, errors| Record {
        case: case.to_string(),
        target,
        round,
        rate,
        latency,
        daemon_cpu: cpu,
        ops,
        errors,
    };
    match work {
        Work::RandRead | Work::RandReadQd1 | Work::RandWrite | Work::SeqRead => {
            let file = c.lookup(ROOT_ID, b"data.bin")?;
            let fh = c.open(file.nodeid, libc::O_RDWR as u32)?;
            let (block, depth) = match work {
                Work::SeqRead => (MIB as u32, 4),
                Work::RandReadQd1 => (4096, 1),
                _ => (4096, DEPTH),
            };
            let mut io = DataRun {
                c: &mut c,
                node: file.nodeid,
                fh,
                work,
                block,
                depth,
                span: size,
                rng: Rng::new(seed),
                next_seq: 0,
                data: vec![0x5a; block as usize],
            };
            io.run(Duration::from_secs(1))?;
            let c0 = cpu()?;
            let (ops, errors, lat, elapsed) = io.run(run_time)?;
            let c1 = cpu()?;
            let rate = ops as f64 / elapsed.as_secs_f64();
            Ok(vec![rec(
                name,
                rate,
                lat,
                c1.saturating_sub(c0),
                ops,
                errors,
            )])
        }
        Work::Metadata => {
            let dir_name = format!("meta-{}-{round}", target.name());
            let dir = c.mkdir(ROOT_ID, dir_name.as_bytes(), 0o755)?;
            let n = args.files;
            let names: Vec<Vec<u8>> = (0..n).map(|i| format!("f{i:06}").into_bytes()).collect();
            let mut out = Vec::new();
            // Runs `f` until it returns `None`; `f` returns how many units (files, entries)
            // one request handled.
            let mut phase = |c: &mut FuseClient,
                             case: &str,
                             f: &mut dyn FnMut(&mut FuseClient) -> Result<Option<usize>>|
             -> Result<()> {
                let mut lat = Histogram::default();
                let c0 = cpu()?;
                let t = Instant::now();
                let mut units = 0;
                loop {
                    let s = Instant::now();
                    let Some(n) = f(c)? else { break };
                    lat.record(s.elapsed());
                    units += n;
                }
                let elapsed = t.elapsed();
                let c1 = cpu()?;
                out.push(rec(
                    case,
                    units as f64 / elapsed.as_secs_f64(),
                    lat,
                    c1.saturating_sub(c0),
                    units as u64,
                    0,
                ));
                Ok(())
            };
            let mut i = 0;
            phase(&mut c, "create", &mut |c| {
                let Some(name) = names.get(i) else {
                    return Ok(None);
                };
                i += 1;
                let (e, fh) = c.create(dir.nodeid, name, 0o644, libc::O_WRONLY as u32)?;
                c.release(e.nodeid, fh)?;
                Ok(Some(1))
            })?;
            let mut i = 0;
            phase(&mut c, "stat", &mut |c| {
                let Some(name) = names.get(i) else {
                    return Ok(None);
                };
                i += 1;
                c.lookup(dir.nodeid, name)?;
                Ok(Some(1))
            })?;
            // Entries per second; latency per READDIRPLUS call.
            let fh = c.opendir(dir.nodeid)?;
            let mut off = 0u64;
            let mut seen = 0usize;
            phase(&mut c, "readdirplus", &mut |c| {
                let b = c.readdir(dir.nodeid, fh, off, 4096, true)?;
                let Some(l) = b.last() else {
                    return Ok(None);
                };
                off = l.off;
                seen += b.len();
                Ok(Some(b.len()))
            })?;
            c.releasedir(dir.nodeid, fh)?;
            if seen != n + 2 {
                bail!("readdirplus listed {seen} entries, not {}", n + 2);
            }
            let mut i = 0;
            phase(&mut c, "unlink", &mut |c| {
                let Some(name) = names.get(i) else {
                    return Ok(None);
                };
                i += 1;
                c.unlink(dir.nodeid, name)?;
                Ok(Some(1))
            })?;
            c.rmdir(ROOT_ID, dir_name.as_bytes())?;
            Ok(out)
        }
    }
}

/// A data workload: `depth` READs or WRITEs in flight on one file.
struct DataRun<'a> {
    c: &'a mut FuseClient,
    node: u64,
    fh: u64,
    work: Work,
    block: u32,
    depth: usize,
    span: u64,
    rng: Rng,
    next_seq: u64,
    data: Vec<u8>,
}

impl DataRun<'_> {
    fn submit(&mut self) -> Result<()> {
        let offset = match self.work {
            Work::SeqRead => {
                let o = self.next_seq;
                self.next_seq = (o + u64::from(self.block)) % self.span;
                o
            }
            _ => benches::random_block(&mut self.rng, self.span, u64::from(self.block)),
        };
        if self.work == Work::RandWrite {
            let args = FuseClient::write_args(self.fh, offset, self.block);
            self.c.start_on(
                REQUEST_QUEUE,
                opcode::WRITE,
                self.node,
                &args.0,
                &self.data,
                64,
                false,
            )?;
        } else {
            let args = FuseClient::read_args(self.fh, offset, self.block);
            self.c.start_on(
                REQUEST_QUEUE,
                opcode::READ,
                self.node,
                &args.0,
                &[],
                16 + self.block as usize,
                false,
            )?;
        }
        Ok(())
    }

    /// Runs for `time`; returns (ops, errors, latencies, elapsed).
    fn run(&mut self, time: Duration) -> Result<(u64, u64, Histogram, Duration)> {
        let mut lat = Histogram::default();
        let (mut ops, mut errors) = (0u64, 0u64);
        let start = Instant::now();
        while self.c.in_flight() < self.depth {
            self.submit()?;
        }
        loop {
            let (reply, l) = self.c.wait_any(Duration::from_secs(10))?;
            let want = match self.work {
                Work::RandWrite => 16 + 8,
                _ => 16 + self.block,
            };
            if reply.error != 0 || reply.used_len != want {
                errors += 1;
            }
            ops += 1;
            lat.record(l);
            if start.elapsed() < time {
                self.submit()?;
            } else if self.c.in_flight() == 0 && self.c.unclaimed() == 0 {
                break;
            }
        }
        Ok((ops, errors, lat, start.elapsed()))
    }
}

/// Creates (or reuses) a file of `size` bytes and reads it all, so runs measure software
/// on the page cache rather than the disk.
fn prepare_file(path: &Path, size: u64) -> Result<()> {
    let existing = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if existing < size {
        eprintln!("creating {} ({} MiB)...", path.display(), size >> 20);
        let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let chunk: Vec<u8> = (0..(4usize << 20))
            .map(|i| (i as u8).wrapping_mul(131) | 1)
            .collect();
        let mut written = 0;
        while written < size {
            let n = (size - written).min(chunk.len() as u64) as usize;
            f.write_all(&chunk[..n])?;
            written += n as u64;
        }
        f.sync_all()?;
    }
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf)? > 0 {}
    eprintln!(
        "file {}: {} MiB, page-cached; both daemons use buffered I/O",
        path.display(),
        size >> 20
    );
    Ok(())
}

/// The file system type of `path`, by name where we know it.
fn fs_type(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs fills the zeroed struct we own; `c` is NUL-terminated.
    let st = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return "unknown".into();
        }
        st
    };
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x794C_7630 => "overlayfs".into(),
        other => format!("{other:#x}"),
    }
}

fn cases(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for r in records {
        if !v.contains(&r.case) {
            v.push(r.case.clone());
        }
    }
    v
}

fn report(args: &Args, share: &Path, records: &[Record]) {
    println!();
    println!(
        "fs-compare: {} rounds, {} s per data run, {} MiB file, {} files for metadata; share {} ({})",
        args.rounds,
        args.seconds,
        args.size_mib,
        args.files,
        share.display(),
        fs_type(share)
    );
    println!(
        "{:<20} {:<10} {:>11} {:>19} {:>9} {:>9} {:>10} {:>10}",
        "workload",
        "target",
        "ops/s(med)",
        "ops/s(min-max)",
        "p50 µs",
        "p99 µs",
        "CPU s/run",
        "CPU µs/op"
    );
    let mut rows = Vec::new();
    let mut ratios = serde_json::Map::new();
    let mut ratio_lines = Vec::new();
    for case in cases(records) {
        for t in [Target::Ours, Target::Virtiofsd] {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.case == case && r.target == t)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let rates: Vec<f64> = rs.iter().map(|r| r.rate).collect();
            let mut lat = Histogram::default();
            for r in &rs {
                lat.merge(&r.latency);
            }
            let cpu: f64 = rs.iter().map(|r| r.daemon_cpu.as_secs_f64()).sum();
            let ops: u64 = rs.iter().map(|r| r.ops).sum();
            let med = median(&rates);
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            let cpu_per_run = cpu / rs.len() as f64;
            let cpu_per_op = if ops > 0 { cpu / ops as f64 * 1e6 } else { 0.0 };
            println!(
                "{:<20} {:<10} {:>11.0} {:>19} {:>9.1} {:>9.1} {:>10.2} {:>10.2}",
                case,
                t.name(),
                med,
                format!("{min:.0}-{max:.0}"),
                us(lat.percentile(50.0)),
                us(lat.percentile(99.0)),
                cpu_per_run,
                cpu_per_op
            );
            rows.push(json!({
                "workload": case,
                "target": t.name(),
                "ops_per_s_median": med.round(),
                "ops_per_s_per_round": rates.iter().map(|v| v.round()).collect::<Vec<_>>(),
                "p50_us": us(lat.percentile(50.0)),
                "p99_us": us(lat.percentile(99.0)),
                "errors": rs.iter().map(|r| r.errors).sum::<u64>(),
                "daemon_cpu_s_per_run": cpu_per_run,
                "daemon_cpu_us_per_op": cpu_per_op,
            }));
        }
        let per_round: Vec<f64> = (0..args.rounds)
            .filter_map(|round| {
                let find = |t| {
                    records
                        .iter()
                        .find(|r| r.case == case && r.target == t && r.round == round)
                };
                Some(find(Target::Ours)?.rate / find(Target::Virtiofsd)?.rate)
            })
            .collect();
        if !per_round.is_empty() {
            let med = median(&per_round);
            ratio_lines.push(format!(
                "ratio {case:<20} ours/virtiofsd {med:>6.2}  (per round: {})",
                per_round
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
            ratios.insert(case.clone(), json!((med * 1000.0).round() / 1000.0));
        }
    }
    println!();
    for l in ratio_lines {
        println!("{l}");
    }
    println!(
        "note: metadata rates are one request at a time; readdirplus is entries/s with \
         latency per 4 KiB READDIRPLUS call; daemon CPU is user+system of the daemon process"
    );
    let targets = json!({"randread-4k-qd32": 1.5, "create": 1.0, "stat": 1.0, "readdirplus": 1.0, "unlink": 1.0});
    println!(
        "{}",
        json!({
            "bench": "fs-compare",
            "share": share.display().to_string(),
            "share_fs": fs_type(share),
            "file_bytes": args.size_mib * MIB,
            "page_cached": true,
            "rounds": args.rounds,
            "seconds_per_run": args.seconds,
            "files": args.files,
            "results": rows,
            "ratios_ours_over_virtiofsd": ratios,
            "targets": targets,
        })
    );
}
