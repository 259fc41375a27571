//! `blk-compare`: our vhost-blk beside qemu-storage-daemon and libblkio's io_uring driver,
//! driven by the same libblkio client, on the same page-cached file.
//!
//! The machine has two cores shared by client and daemon, so absolute numbers drift between
//! runs. Every round therefore runs every target back to back, alternating which goes first,
//! and the headline figures are per-round ratios (ours/qsd, ours/io_uring) and their medians.
//! Each run is a new client connection, after a short warm-up on that connection.
//!
//! Output: progress on stderr, then a table and one JSON line on stdout.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::wake::WakeLatency;
use benches::{median, run_workload, Histogram, Pattern, Workload};
use clap::Parser;
use serde_json::json;
use testkit::blkio_client::{Client, ClientOptions, Target as ClientTarget};
use testkit::daemon::{self, Daemon, DaemonCommand};

const GIB: u64 = 1 << 30;
const BLOCK: usize = 4096;

#[derive(Parser, Debug)]
#[command(
    name = "blk-compare",
    about = "Compare vhost-blk with qemu-storage-daemon and io_uring on a page-cached file"
)]
struct Args {
    /// File to benchmark on (created and filled if missing or smaller than --size-gib; the
    /// randwrite workload overwrites its contents). Default: a new file in a temp dir on
    /// /var/tmp, removed afterwards.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Size of the file and of the null devices, in GiB.
    #[arg(long, default_value_t = 2)]
    size_gib: u64,
    /// Rounds; every round runs every workload on every target.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measured run (after a warm-up of a fifth of that, at most 1 s).
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Our daemon's binary (default: vhost-blk next to this binary, i.e. target/release).
    #[arg(long)]
    vhost_blk: Option<PathBuf>,
    /// Which targets to run, of ours, ours-many, qsd, io_uring (ratios need the pairs).
    #[arg(long, value_delimiter = ',', default_value = "ours,qsd,io_uring")]
    targets: Vec<String>,
    /// Which workloads to run (default: all): randread-4k-qd32, randwrite-4k-qd32,
    /// randread-4k-qd1, null-randread-4k-qd32, throttled-20k-randread-qd32.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Leave CPU placement to the scheduler (default: the client on the last CPU, every
    /// daemon thread on the first, the same for every target).
    #[arg(long)]
    no_pin: bool,
    /// Shared cores, as beside a guest's vCPUs: nobody pinned, and this many threads spinning
    /// at normal priority for the whole run (2 on this machine: one per core).
    #[arg(long, value_name = "THREADS")]
    busy: Option<usize>,
    /// Disks the ours-many target serves (one driven, the others idle), from a config file.
    #[arg(long, default_value_t = 16)]
    many_disks: usize,
    /// An argument for our daemon (repeatable), e.g. --ours-arg=--poll-us=0.
    #[arg(long, allow_hyphen_values = true)]
    ours_arg: Vec<String>,
    /// Print each run's latency deciles. Depth-1 latency is bimodal on a VM: a completion
    /// that lands before the client thread has gone to sleep costs about 3 µs less than one
    /// that has to wake it, so the p50 moves with the share of each.
    #[arg(long)]
    deciles: bool,
    /// Let the client poll: libblkio poll queues spin on the used ring instead of sleeping on
    /// the completion eventfd (vhost-user targets; io_uring stays as it is). The client then
    /// never has to be woken, which takes the guest-side wake-up out of the latency: what is
    /// left is each daemon's own path. Not the setting; a diagnosis.
    #[arg(long)]
    client_poll: bool,
    /// Run the daemons side by side (with --busy): in each round the vhost-user targets
    /// (ours, qsd) run at the same time, each with its own client, over the same seconds
    /// (io_uring still runs alone). Both then share the cores under the same draw of the
    /// scheduler, where one after the other each gets its own: a round where one got a CPU
    /// nearly to itself and the other did not says little about the daemons. Random writes
    /// to the plain and LUKS files are left out (refused if named): both daemons serve the
    /// same file, whose inode lock would serialise their buffered writes.
    #[arg(long)]
    together: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Ours,
    /// Ours serving `--many-disks` disks, one of them driven: what the control plane and
    /// idle disks cost the data path.
    OursMany,
    Qsd,
    IoUring,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ours => "ours",
            Target::OursMany => "ours-many",
            Target::Qsd => "qsd",
            Target::IoUring => "io_uring",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    File,
    Null,
    /// A null device behind an IOPS limit of [`THROTTLE_IOPS`] (a throttle node; for
    /// qemu-storage-daemon a throttle filter and group with the same limit).
    NullThrottled,
    /// The file's contents as a fully allocated qcow2 image (64 KiB clusters), page-cached.
    Qcow2,
    /// That image under nine empty overlays: every read goes down a chain of ten.
    Qcow2Chain,
    /// An empty qcow2 image of [`FRESH_SPAN`] bytes (64 KiB clusters), one per daemon: random
    /// writes over it allocate clusters.
    Qcow2Fresh,
    /// The file's contents encrypted in a LUKS1 image (aes-xts-plain64, made by qemu-img),
    /// page-cached, opened with a key file.
    Luks,
}

/// The virtual size of the fresh images: large enough that 4 KiB random writes for a run
/// mostly land in clusters not yet allocated (4 M clusters).
const FRESH_SPAN: u64 = 256 * GIB;

/// The limit of the throttled workload: far below what either daemon serves, so the
/// figure is the limit's accuracy.
const THROTTLE_IOPS: u64 = 20_000;

/// One row of the comparison: a workload on a device, run on several targets.
struct Case {
    name: &'static str,
    device: Device,
    pattern: Pattern,
    depth: usize,
    targets: &'static [Target],
    /// Bytes the requests range over (default: the file's size).
    span: Option<u64>,
}

/// The goals each ratio is measured against (issue 2).
const TARGETS: &[(&str, &str)] = &[
    ("randread-4k-qd32:ours/qsd", ">= 2.0"),
    ("randread-4k-qd32:ours/io_uring", ">= 0.6"),
    ("randwrite-4k-qd32:ours/qsd", ">= 1.5"),
    ("randread-4k-qd1:ours/qsd p50", "<= 0.5"),
    ("null-randread-4k-qd32:ours/qsd", ">= 1.1"),
    ("qcow2-randread-4k-qd32:ours/qsd", ">= 1.5"),
    ("qcow2-alloc-randwrite-4k-qd32:ours/qsd", ">= 1.2"),
    ("luks-randread-4k-qd32:ours/qsd", ">= 1.5"),
    ("luks-randwrite-4k-qd32:ours/qsd", ">= 1.5"),
];

/// The goals with the cores shared (`--busy`, issue 12); the others are for a quiet machine.
const SHARED_TARGETS: &[(&str, &str)] = &[("randread-4k-qd32:ours/qsd", ">= 1.5 in every round")];

/// The depth-1 case, whose latency includes waking the client (see `benches::wake`).
const QD1_CASE: &str = "randread-4k-qd1";

const CASES: &[Case] = &[
    Case {
        name: "randread-4k-qd32",
        device: Device::File,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::OursMany, Target::Qsd, Target::IoUring],
        span: None,
    },
    Case {
        name: "randwrite-4k-qd32",
        device: Device::File,
        pattern: Pattern::RandWrite,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: QD1_CASE,
        device: Device::File,
        pattern: Pattern::RandRead,
        depth: 1,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: "null-randread-4k-qd32",
        device: Device::Null,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::OursMany, Target::Qsd],
        span: None,
    },
    Case {
        name: "qcow2-randread-4k-qd32",
        device: Device::Qcow2,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: "qcow2-chain10-randread-4k-qd32",
        device: Device::Qcow2Chain,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: "qcow2-alloc-randwrite-4k-qd32",
        device: Device::Qcow2Fresh,
        pattern: Pattern::RandWrite,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: Some(FRESH_SPAN),
    },
    Case {
        name: "luks-randread-4k-qd32",
        device: Device::Luks,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: "luks-randwrite-4k-qd32",
        device: Device::Luks,
        pattern: Pattern::RandWrite,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
    Case {
        name: "throttled-20k-randread-qd32",
        device: Device::NullThrottled,
        pattern: Pattern::RandRead,
        depth: 32,
        targets: &[Target::Ours, Target::Qsd],
        span: None,
    },
];

/// A running daemon serving one device.
struct Served {
    daemon: Daemon,
    socket: PathBuf,
}

struct Record {
    case: &'static str,
    target: Target,
    round: usize,
    iops: f64,
    latency: Histogram,
    errors: u64,
    /// Daemon CPU (user + system) during the measured run; `None` for io_uring (in-process).
    daemon_cpu: Option<Duration>,
    /// CPU time stolen by the host during the run (`benches::steal_time`).
    steal: Option<Duration>,
    ops: u64,
}

fn main() {
    let args = Args::parse();
    let (wanted, cases) = plan(&args).unwrap_or_else(|e| {
        eprintln!("blk-compare: {e:#}");
        std::process::exit(2);
    });
    if let Err(e) = run(args, wanted, cases) {
        eprintln!("blk-compare: {e:#}");
        std::process::exit(1);
    }
}

/// Threads that spin until dropped: CPU load that competes with the daemons and the client.
struct Busy {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Busy {
    fn start(n: usize) -> Busy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Busy { stop, threads }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The targets and workloads the flags ask for, or what is wrong with the flags.
fn plan(args: &Args) -> Result<(Vec<Target>, Vec<&'static Case>)> {
    let wanted: Vec<Target> = args
        .targets
        .iter()
        .map(|t| match t.as_str() {
            "ours" => Ok(Target::Ours),
            "ours-many" => Ok(Target::OursMany),
            "qsd" => Ok(Target::Qsd),
            "io_uring" => Ok(Target::IoUring),
            other => bail!("unknown target {other:?} (use ours, ours-many, qsd, io_uring)"),
        })
        .collect::<Result<_>>()?;
    if args.together && args.busy.is_none() {
        bail!("--together measures shared cores: give --busy too");
    }
    if args.rounds == 0 || args.seconds == 0 || args.size_gib == 0 {
        bail!("--rounds, --seconds and --size-gib must be positive");
    }
    if let Some(w) = args
        .workloads
        .iter()
        .find(|w| !CASES.iter().any(|c| c.name == w.as_str()))
    {
        bail!("unknown workload {w:?}");
    }
    // Side by side, both daemons would write one file (the qcow2 allocation case gives
    // each its own image).
    let shared_writes = |c: &Case| {
        c.pattern == Pattern::RandWrite && matches!(c.device, Device::File | Device::Luks)
    };
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| {
            if args.workloads.is_empty() {
                !(args.together && shared_writes(c))
            } else {
                args.workloads.iter().any(|w| w == c.name)
            }
        })
        .collect();
    let refused: Vec<&str> = cases
        .iter()
        .filter(|c| args.together && shared_writes(c))
        .map(|c| c.name)
        .collect();
    if !refused.is_empty() {
        bail!(
            "--together cannot run {}: both daemons would write one file",
            refused.join(", ")
        );
    }
    Ok((wanted, cases))
}

fn run(mut args: Args, wanted: Vec<Target>, cases: Vec<&'static Case>) -> Result<()> {
    if args.busy.is_some() {
        args.no_pin = true;
    }
    let size = args.size_gib * GIB;
    let run_time = Duration::from_secs(args.seconds);

    let tmp = tempfile::Builder::new()
        .prefix("blk-compare.")
        .tempdir_in("/var/tmp")
        .context("creating a temp dir in /var/tmp")?;
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| tmp.path().join("disk.img"));
    let qcow2 = tmp.path().join("disk.qcow2");
    if cases.iter().any(|c| {
        matches!(
            c.device,
            Device::File | Device::Qcow2 | Device::Qcow2Chain | Device::Luks
        )
    }) {
        prepare_file(&file, size)?;
    }
    if cases.iter().any(|c| c.device == Device::Luks) {
        prepare_luks(&file, size, tmp.path())?;
    }
    if cases
        .iter()
        .any(|c| matches!(c.device, Device::Qcow2 | Device::Qcow2Chain))
    {
        benches::prepare_qcow2(&file, &qcow2)?;
    }
    if cases.iter().any(|c| c.device == Device::Qcow2Chain) {
        prepare_chain(&qcow2)?;
    }

    let ours_bin = if wanted.contains(&Target::Ours) || wanted.contains(&Target::OursMany) {
        let bin = match &args.vhost_blk {
            Some(p) => p.clone(),
            None => daemon::try_binary_path("vhost-blk").map_err(|e| {
                anyhow::anyhow!("{e}\n(for benchmarks: cargo build --release --workspace --bins)")
            })?,
        };
        if bin.components().any(|c| c.as_os_str() == "debug") {
            eprintln!(
                "WARNING: {} looks like a debug build; numbers will not mean much",
                bin.display()
            );
        }
        Some(bin)
    } else {
        None
    };

    // Declared before the daemons, so it is removed after they have exited.
    let cpuset = if args.no_pin || benches::pin::cpus() < 2 {
        None
    } else {
        benches::pin::cpuset(benches::pin::daemon_cpu())
            .context("making a cpuset for the daemons")?
    };
    // Start every daemon once; they stay up for all rounds (each run is a new client).
    let mut served: Vec<((Target, Device), Served)> = Vec::new();
    for case in &cases {
        for &t in case.targets {
            if !wanted.contains(&t) || t == Target::IoUring {
                continue;
            }
            if served.iter().any(|(k, _)| *k == (t, case.device)) {
                continue;
            }
            let s = start(
                t,
                case.device,
                &file,
                size,
                tmp.path(),
                ours_bin.as_deref(),
                &args,
            )?;
            if let Some(set) = &cpuset {
                set.add(s.daemon.pid())
                    .with_context(|| format!("moving {} into the cpuset", t.name()))?;
            }
            served.push(((t, case.device), s));
        }
    }

    let _busy = args.busy.map(|n| {
        eprintln!("shared cores: {n} busy threads, nobody pinned");
        Busy::start(n)
    });
    let mut records = Vec::new();
    for round in 0..args.rounds {
        for (ci, case) in cases.iter().enumerate() {
            let mut order: Vec<Target> = case
                .targets
                .iter()
                .copied()
                .filter(|t| wanted.contains(t))
                .collect();
            if order.is_empty() {
                continue;
            }
            // Alternate who goes first, so that drift and warm caches favour no one.
            let by = (round + ci) % order.len();
            order.rotate_left(by);
            // Side by side (--together): the vhost-user targets in one group, run at once.
            let groups: Vec<Vec<Target>> = if args.together {
                let (alone, side_by_side): (Vec<Target>, Vec<Target>) =
                    order.iter().partition(|&&t| t == Target::IoUring);
                // Whoever the rotation put first still goes first.
                let groups = if order.first() == Some(&Target::IoUring) {
                    [alone, side_by_side]
                } else {
                    [side_by_side, alone]
                };
                groups.into_iter().filter(|g| !g.is_empty()).collect()
            } else {
                order.iter().map(|&t| vec![t]).collect()
            };
            for group in groups {
                let runs: Vec<Run> = group
                    .iter()
                    .map(|&target| Run {
                        case,
                        target,
                        round,
                        workload: Workload {
                            pattern: case.pattern,
                            block: BLOCK,
                            depth: case.depth,
                            span: case.span.unwrap_or(size),
                            zipf: None,
                            duration: run_time,
                            seed: 1000 * round as u64 + ci as u64,
                        },
                        server: served
                            .iter()
                            .find(|(k, _)| *k == (target, case.device))
                            .map(|(_, s)| (s.socket.as_path(), s.daemon.pid())),
                        file: &file,
                        client_poll: args.client_poll,
                    })
                    .collect();
                let pin = |run: &Run| -> Result<()> {
                    if !args.no_pin {
                        benches::pin::client_and_daemon(run.server.map(|(_, pid)| pid))
                            .with_context(|| {
                                format!("pinning the client and {}", run.target.name())
                            })?;
                    }
                    Ok(())
                };
                // A client thread per run (one, unless side by side), meeting after the warm-up.
                let barrier = std::sync::Barrier::new(runs.len());
                let recs: Vec<Record> = std::thread::scope(|scope| {
                    let handles: Vec<_> = runs
                        .iter()
                        .map(|run| {
                            let barrier = &barrier;
                            scope.spawn(move || {
                                // Pins this client thread (and its daemon) if pinning.
                                match pin(run) {
                                    Ok(()) => measure(*run, barrier),
                                    Err(e) => {
                                        // Unmeasured; the others must not wait for it.
                                        barrier.wait();
                                        Err(e)
                                    }
                                }
                            })
                        })
                        .collect();
                    handles
                        .into_iter()
                        .zip(&runs)
                        .map(|(h, run)| {
                            h.join().unwrap_or_else(|_| {
                                bail!("{} {}: the client panicked", case.name, run.target.name())
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })?;
                for rec in recs {
                    eprintln!(
                        "round {} {:<30} {:<8} {:>9.0} IOPS  p50 {:>7.1} µs  p99 {:>7.1} µs{}",
                        round + 1,
                        case.name,
                        rec.target.name(),
                        rec.iops,
                        us(rec.latency.percentile(50.0)),
                        us(rec.latency.percentile(99.0)),
                        rec.daemon_cpu
                            .map(|c| format!("  daemon CPU {:.2} s", c.as_secs_f64()))
                            .unwrap_or_default()
                    );
                    benches::warn_if_stolen(rec.steal, run_time);
                    if args.deciles {
                        let d: Vec<String> = (1..10)
                            .map(|i| format!("{:.1}", us(rec.latency.percentile(i as f64 * 10.0))))
                            .collect();
                        eprintln!("  deciles µs: {}", d.join(" "));
                    }
                    records.push(rec);
                }
            }
        }
    }

    for ((t, d), s) in &mut served {
        match s.daemon.terminate() {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!(
                "note: {} ({d:?}) ended with {}",
                t.name(),
                daemon::describe_status(&status)
            ),
            Err(e) => eprintln!("note: stopping {} ({d:?}): {e}", t.name()),
        }
    }

    // What one wake-up of a sleeping client costs here, in the depth-1 runs' placement: the
    // daemons signal from the first CPU, the client sleeps on the last.
    let measure_wake = records.iter().any(|r| r.case == QD1_CASE)
        && !args.no_pin
        && !args.client_poll
        && benches::pin::cpus() > 1;
    let wake = measure_wake
        .then(|| {
            let (daemons, client) = (benches::pin::daemon_cpu(), benches::pin::client_cpu());
            benches::wake::measure(daemons, client, Duration::from_micros(5), 2000)
                .map_err(|e| eprintln!("WARNING: could not measure the wake-up latency: {e}"))
                .ok()
        })
        .flatten();
    report(&args, &file, &records, wake);
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// Creates (or reuses) a fully allocated file of `size` bytes and leaves all of it in the page
/// cache as 4 KiB folios, so the runs measure software rather than the throttled disk.
///
/// Why 4 KiB writes: since Linux 6.16 ext4 caches large folios, and a file written or read in
/// big chunks ends up in folios of up to 2 MiB. A buffered 4 KiB write into such a folio walks
/// every buffer head of it (`ext4_block_write_begin`, 85% of the time under perf): about 23 µs
/// per write, 43K writes/s for any single writer, which would cap both daemons' randwrite at the
/// kernel rather than measure them. Written in 4 KiB pieces the same file takes 500K+ writes/s.
/// An existing file is first synced and dropped from the cache, then rewritten the same way.
fn prepare_file(path: &Path, size: u64) -> Result<()> {
    let avail = mem_available().unwrap_or(0);
    if avail < 2 * size {
        eprintln!(
            "WARNING: only {} MiB of memory available for a {} MiB file: it may not stay cached",
            avail >> 20,
            size >> 20
        );
    }
    let t = Instant::now();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.sync_all()?;
    drop_cached_pages(&f)?;
    // Non-zero data in every block, so the file is allocated and reads are real copies.
    let block: Vec<u8> = (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(131) | 1)
        .collect();
    let mut written = 0;
    while written < size {
        let n = (size - written).min(BLOCK as u64) as usize;
        f.write_all(&block[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        written += n as u64;
    }
    f.set_len(size)?;
    f.sync_all()?;
    let mut buf = vec![0u8; BLOCK];
    f.seek(SeekFrom::Start(0))?;
    let mut read = 0u64;
    while read < size {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    eprintln!(
        "file {}: {} MiB, page-cached in 4 KiB folios (written and synced in {:.1} s); every \
         target uses buffered I/O, so this measures software cost, not the disk",
        path.display(),
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A new, empty qcow2 image of [`FRESH_SPAN`] bytes for `target` alone.
fn fresh_image(dir: &Path, target: Target) -> Result<PathBuf> {
    let path = dir.join(format!("fresh-{}.qcow2", target.name()));
    let _ = std::fs::remove_file(&path);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "cluster_size=65536"])
        .arg(&path)
        .arg(FRESH_SPAN.to_string())
        .output()
        .context("qemu-img makes the fresh image")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(path)
}

/// The key file both daemons open the LUKS image with.
fn luks_key(dir: &Path) -> PathBuf {
    dir.join("luks.key")
}

/// `disk.luks`: a LUKS1 image (header and keyslot by qemu-img) of the file's size whose
/// payload holds the file's contents encrypted, written 4 KiB at a time as `prepare_file`
/// writes the plain file, so both sit in the page cache alike (large folios, as one
/// `qemu-img convert` leaves, make every 4 KiB write walk hundreds of buffer heads: the
/// encrypted write row measured 0.34x of the plain one for that alone).
fn prepare_luks(file: &Path, size: u64, dir: &Path) -> Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let t = Instant::now();
    let key = luks_key(dir);
    let pass = b"blk-compare passphrase";
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)?
        .write_all(pass)?;
    let img = dir.join("disk.luks");
    let out = std::process::Command::new("qemu-img")
        .arg("create")
        .arg("--object")
        .arg(format!("secret,id=sec0,file={}", key.display()))
        .args(["-f", "luks", "-o", "key-secret=sec0,iter-time=10"])
        .arg(&img)
        .arg(size.to_string())
        .output()
        .context("qemu-img (Debian's qemu-utils) makes the LUKS image")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)?;
    let unlocked = storage_core::crypto::luks1::open_image(&f, pass)
        .map_err(|e| anyhow::anyhow!("{}: {e}", img.display()))?;
    let cipher = unlocked
        .cipher()
        .map_err(|e| anyhow::anyhow!("{}: {e}", img.display()))?;
    let payload = unlocked.payload_offset();
    f.sync_all()?;
    drop_cached_pages(&f)?;
    let mut plain = File::open(file)?;
    let mut block = vec![0u8; BLOCK];
    for at in (0..size).step_by(BLOCK) {
        plain.read_exact(&mut block)?;
        cipher.encrypt(&mut block, at / 512, 512);
        f.write_all_at(&block, payload + at)?;
    }
    f.sync_all()?;
    eprintln!(
        "LUKS image {}: the raw file encrypted, written 4 KiB at a time, page-cached ({:.1} s)",
        img.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Nine empty overlays over the qcow2 image (`chain1.qcow2` over it, ... `chain9.qcow2` on
/// top), as a long-lived VM's snapshots leave them.
fn prepare_chain(base: &Path) -> Result<()> {
    let dir = base.parent().context("the image's directory")?;
    let mut below = base
        .file_name()
        .context("a file name")?
        .to_string_lossy()
        .into_owned();
    for i in 1..=9 {
        let name = format!("chain{i}.qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-F", "qcow2", "-b", &below])
            .arg(dir.join(&name))
            .output()
            .context("qemu-img makes the chain")?;
        if !out.status.success() {
            bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
        }
        below = name;
    }
    Ok(())
}

/// Drops the file's (clean) pages from the page cache, so rewriting it builds new folios.
fn drop_cached_pages(f: &File) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; `f` keeps the fd open for the call.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED): {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn start(
    target: Target,
    device: Device,
    file: &Path,
    size: u64,
    dir: &Path,
    ours_bin: Option<&Path>,
    args: &Args,
) -> Result<Served> {
    let (ours_args, many_disks) = (&args.ours_arg, args.many_disks);
    let socket = dir.join(format!("{}-{device:?}.sock", target.name()).to_lowercase());
    let cmd = match target {
        Target::Ours | Target::OursMany => {
            let disk = match device {
                Device::File => format!("path={}", file.display()),
                Device::Null => format!("path=null,size={size},read-zeroes=off"),
                Device::NullThrottled => {
                    format!("path=null,size={size},read-zeroes=off,iops-total={THROTTLE_IOPS}")
                }
                Device::Qcow2 => format!("path={},format=qcow2", dir.join("disk.qcow2").display()),
                Device::Qcow2Chain => {
                    format!("path={},format=qcow2", dir.join("chain9.qcow2").display())
                }
                Device::Qcow2Fresh => {
                    format!("path={},format=qcow2", fresh_image(dir, target)?.display())
                }
                Device::Luks => format!(
                    "path={},format=luks,key-file={}",
                    dir.join("disk.luks").display(),
                    luks_key(dir).display()
                ),
            };
            // locking=off, as qemu-storage-daemon's file nodes below: the targets share
            // these images on purpose (at once with --together, and every daemon of a run
            // is started before the first is measured), and a qcow2 chain's base is
            // another target's image.
            let disk = if matches!(device, Device::Null | Device::NullThrottled) {
                disk
            } else {
                format!("{disk},locking=off")
            };
            let cmd = DaemonCommand::new(ours_bin.context("our binary")?)
                .name(format!("{}-{device:?}", target.name()).to_lowercase())
                .readiness(daemon::Readiness::StderrContains(
                    daemon::LISTENING_MARKER.into(),
                ));
            let cmd = if target == Target::OursMany {
                // The driven disk first, then idle null disks, each on its own socket.
                // With the API (and its audit log) up, as a platform team runs it.
                let mut config = format!(
                    "api-socket = \"{}\"\naudit-log = \"{}\"\n\n[[disk]]\nid = \"driven\"\nsocket = \"{}\"\ndisk = \"{disk}\"\n",
                    dir.join(format!("ours-many-{device:?}-api.sock").to_lowercase()).display(),
                    dir.join(format!("ours-many-{device:?}-audit.log").to_lowercase()).display(),
                    socket.display()
                );
                for i in 1..many_disks.max(1) {
                    let idle = dir.join(format!("idle-{device:?}-{i}.sock").to_lowercase());
                    config += &format!(
                        "[[disk]]\nid = \"idle{i}\"\nsocket = \"{}\"\ndisk = \"path=null,size=1G\"\n",
                        idle.display()
                    );
                }
                let path = dir.join(format!("ours-many-{device:?}.toml").to_lowercase());
                std::fs::write(&path, config)?;
                cmd.arg("--config").arg(path)
            } else {
                cmd.arg("--socket").arg(&socket).arg("--disk").arg(disk)
            };
            cmd.args(["--queues", "1", "--queue-size", "256"])
                .args(ours_args)
        }
        Target::Qsd => {
            let graph: Vec<String> = match device {
                // locking=off: our daemon has the same file open at the same time.
                Device::File => vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=d0,filename={},aio=io_uring,cache.direct=off,locking=off",
                        file.display()
                    ),
                ],
                Device::Null => vec![
                    "--blockdev".into(),
                    format!("driver=null-co,node-name=d0,size={size},read-zeroes=off"),
                ],
                Device::Qcow2 => vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off,locking=off",
                        dir.join("disk.qcow2").display()
                    ),
                    "--blockdev".into(),
                    "driver=qcow2,node-name=d0,file=f0".into(),
                ],
                Device::Qcow2Fresh => vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off",
                        fresh_image(dir, target)?.display()
                    ),
                    "--blockdev".into(),
                    "driver=qcow2,node-name=d0,file=f0".into(),
                ],
                Device::Qcow2Chain => vec![
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off,locking=off",
                        dir.join("chain9.qcow2").display()
                    ),
                    "--blockdev".into(),
                    "driver=qcow2,node-name=d0,file=f0".into(),
                ],
                Device::Luks => vec![
                    "--object".into(),
                    format!("secret,id=sec0,file={}", luks_key(dir).display()),
                    "--blockdev".into(),
                    format!(
                        "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off,locking=off",
                        dir.join("disk.luks").display()
                    ),
                    "--blockdev".into(),
                    "driver=luks,node-name=d0,file=f0,key-secret=sec0".into(),
                ],
                Device::NullThrottled => vec![
                    "--object".into(),
                    format!("throttle-group,id=tg0,x-iops-total={THROTTLE_IOPS}"),
                    "--blockdev".into(),
                    format!("driver=null-co,node-name=n0,size={size},read-zeroes=off"),
                    "--blockdev".into(),
                    "driver=throttle,node-name=d0,file=n0,throttle-group=tg0".into(),
                ],
            };
            DaemonCommand::qemu_storage_daemon(&socket)
                .name(format!("qsd-{device:?}").to_lowercase())
                .args(graph)
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                    socket.display()
                ))
        }
        Target::IoUring => unreachable!("io_uring runs in-process"),
    };
    let daemon = cmd
        .spawn()
        .with_context(|| format!("starting {} for the {device:?} device", target.name()))?;
    Ok(Served { daemon, socket })
}

/// One measured run: a workload on a target in a round.
#[derive(Clone, Copy)]
struct Run<'a> {
    case: &'a Case,
    target: Target,
    round: usize,
    workload: Workload,
    /// The daemon's socket and process (`None` for io_uring, in-process).
    server: Option<(&'a Path, u32)>,
    file: &'a Path,
    client_poll: bool,
}

/// Connects, warms up (a fifth of the run, at most 1 s) and measures `run`. Waits at
/// `start_together` after the warm-up, so that runs side by side measure the same seconds.
fn measure(run: Run<'_>, start_together: &std::sync::Barrier) -> Result<Record> {
    // A client that panics must still reach the barrier, or the others wait forever.
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| prepare(run)))
        .unwrap_or_else(|_| {
            bail!(
                "{} {}: the client panicked",
                run.case.name,
                run.target.name()
            )
        });
    // Also on failure: the other runs would otherwise wait forever.
    start_together.wait();
    let mut client = prepared?;
    let Run {
        case,
        target,
        round,
        ref workload,
        server,
        file,
        ..
    } = run;
    let queue = client.queue(0);
    let pid = server.map(|(_, pid)| pid);
    let cpu0 = pid.map(daemon::cpu_time).transpose()?;
    let (result, steal) = benches::with_steal(|| run_workload(queue, workload));
    let result = result.with_context(|| format!("{} {}: run", case.name, target.name()))?;
    let cpu1 = pid.map(daemon::cpu_time).transpose()?;
    if let Some(e) = &result.first_error {
        eprintln!(
            "WARNING: {} {}: {} requests failed, first: {e}",
            case.name,
            target.name(),
            result.errors
        );
    }
    if case.device == Device::File && case.pattern == Pattern::RandWrite {
        // Write the run's dirty pages back now, so the flusher threads do not compete with
        // the next runs for this machine's two CPUs (that swung randwrite ratios 0.8-2x).
        File::open(file)
            .and_then(|f| f.sync_data())
            .with_context(|| format!("syncing {}", file.display()))?;
    }
    Ok(Record {
        case: case.name,
        target,
        round,
        iops: result.iops(),
        errors: result.errors,
        daemon_cpu: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
        steal,
        ops: result.ops,
        latency: result.latency,
    })
}

/// A client of `run`'s target, connected and warmed up.
fn prepare(run: Run<'_>) -> Result<Client> {
    let Run {
        case,
        target,
        ref workload,
        server,
        file,
        client_poll,
        ..
    } = run;
    let opts = ClientOptions::default().buffer_per_queue(workload.depth * workload.block);
    let mut client = match (target, server) {
        (Target::IoUring, _) => Client::open_with(
            ClientTarget::IoUring {
                path: file,
                direct: false,
            },
            &opts.queue_size(256),
        ),
        (_, Some((socket, _))) => {
            Client::open_with(ClientTarget::VhostUser(socket), &opts.poll(client_poll))
        }
        (_, None) => bail!("{} is not running", target.name()),
    }
    .with_context(|| format!("{} {}: connecting", case.name, target.name()))?;

    let queue = client.queue(0);
    run_workload(
        queue,
        &Workload {
            duration: (workload.duration / 5).min(Duration::from_secs(1)),
            seed: workload.seed ^ 0xFFFF,
            ..*workload
        },
    )
    .with_context(|| format!("{} {}: warm-up", case.name, target.name()))?;

    Ok(client)
}

/// Per-round ratio of `a`'s `metric` to `b`'s in one case, then its median over rounds.
fn ratio(
    records: &[Record],
    case: &str,
    a: Target,
    b: Target,
    metric: impl Fn(&Record) -> f64,
) -> Option<(f64, Vec<f64>)> {
    let rounds = records.iter().map(|r| r.round).max()? + 1;
    let per_round: Vec<f64> = (0..rounds)
        .filter_map(|round| {
            let find = |t| {
                records
                    .iter()
                    .find(|r| r.case == case && r.target == t && r.round == round)
            };
            Some(metric(find(a)?) / metric(find(b)?))
        })
        .collect();
    if per_round.is_empty() {
        None
    } else {
        Some((median(&per_round), per_round))
    }
}

fn report(args: &Args, file: &Path, records: &[Record], wake: Option<WakeLatency>) {
    println!();
    println!(
        "blk-compare: 4 KiB requests, 1 queue, {} s per run, {} rounds; file {} ({} GiB, page-cached)",
        args.seconds,
        args.rounds,
        file.display(),
        args.size_gib
    );
    if let Some(n) = args.busy {
        println!(
            "shared cores (--busy {n}): {n} threads spin beside the daemons and the client, \
             nobody pinned"
        );
    }
    if !args.ours_arg.is_empty() {
        println!("ours runs with {}", args.ours_arg.join(" "));
    }
    if args.together {
        println!(
            "side by side (--together): ours and qsd ran at the same time, each with its \
             own client; io_uring alone"
        );
    }
    if args.client_poll {
        println!(
            "client polling (--client-poll): vhost-user clients spin instead of sleeping; \
             not the issue's setting"
        );
    }
    println!(
        "{:<30} {:<8} {:>10} {:>17} {:>9} {:>9} {:>11} {:>9}",
        "workload",
        "target",
        "IOPS(med)",
        "IOPS(min-max)",
        "p50 µs",
        "p99 µs",
        "CPU s/run",
        "CPU µs/IO"
    );
    let mut rows = Vec::new();
    for case in CASES {
        for &t in case.targets {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.case == case.name && r.target == t)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let iops: Vec<f64> = rs.iter().map(|r| r.iops).collect();
            let mut lat = Histogram::default();
            for r in &rs {
                lat.merge(&r.latency);
            }
            let cpu: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.daemon_cpu.map(|c| c.as_secs_f64()))
                .collect();
            let ops: u64 = rs.iter().map(|r| r.ops).sum();
            let cpu_per_run = (!cpu.is_empty()).then(|| cpu.iter().sum::<f64>() / cpu.len() as f64);
            let cpu_per_io =
                (!cpu.is_empty() && ops > 0).then(|| cpu.iter().sum::<f64>() / ops as f64 * 1e6);
            let min = iops.iter().copied().fold(f64::INFINITY, f64::min);
            let max = iops.iter().copied().fold(0.0, f64::max);
            let med = median(&iops);
            println!(
                "{:<30} {:<8} {:>10.0} {:>17} {:>9.1} {:>9.1} {:>11} {:>9}",
                case.name,
                t.name(),
                med,
                format!("{min:.0}-{max:.0}"),
                us(lat.percentile(50.0)),
                us(lat.percentile(99.0)),
                cpu_per_run.map_or("-".into(), |c| format!("{c:.2}")),
                cpu_per_io.map_or("-".into(), |c| format!("{c:.1}")),
            );
            rows.push(json!({
                "workload": case.name,
                "target": t.name(),
                "iops_median": med.round(),
                "iops_per_round": iops.iter().map(|v| v.round()).collect::<Vec<_>>(),
                "p50_us": us(lat.percentile(50.0)),
                "p99_us": us(lat.percentile(99.0)),
                "errors": rs.iter().map(|r| r.errors).sum::<u64>(),
                "daemon_cpu_s_per_run": cpu_per_run,
                "daemon_cpu_us_per_io": cpu_per_io,
                "host_steal_s_per_round": rs
                    .iter()
                    .map(|r| r.steal.map(|d| d.as_secs_f64()))
                    .collect::<Vec<_>>(),
            }));
        }
    }

    println!();
    let goals = if args.busy.is_some() {
        SHARED_TARGETS
    } else {
        TARGETS
    };
    let show = |key: &str, med: f64, per_round: &[f64]| {
        println!(
            "ratio {key:<40} {med:>6.2}  ({}per round: {})",
            goals
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(String::new(), |(_, t)| format!("target {t}; ")),
            per_round
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    };
    let mut ratios = serde_json::Map::new();
    let mut latency_ratios = serde_json::Map::new();
    for case in CASES {
        for (a, b) in [
            (Target::Ours, Target::Qsd),
            (Target::Ours, Target::IoUring),
            (Target::OursMany, Target::Ours),
        ] {
            if !(case.targets.contains(&a) && case.targets.contains(&b)) {
                continue;
            }
            if let Some((med, per_round)) = ratio(records, case.name, a, b, |r| r.iops) {
                let key = format!("{}:{}/{}", case.name, a.name(), b.name());
                show(&key, med, &per_round);
                ratios.insert(key, json!(med));
            }
            // At depth 1 the figure of merit is latency (lower is better).
            if case.depth > 1 {
                continue;
            }
            let p50 = |r: &Record| r.latency.percentile(50.0).as_secs_f64();
            if let Some((med, per_round)) = ratio(records, case.name, a, b, p50) {
                let key = format!("{}:{}/{} p50", case.name, a.name(), b.name());
                show(&key, med, &per_round);
                latency_ratios.insert(key, json!(med));
            }
        }
    }
    // The format's own cost: qcow2 against raw, both ours (goal: at least 0.9).
    let ours_median = |case: &str| {
        let v: Vec<f64> = records
            .iter()
            .filter(|r| r.case == case && r.target == Target::Ours)
            .map(|r| r.iops)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    if let (Some(q), Some(r)) = (
        ours_median("qcow2-randread-4k-qd32"),
        ours_median("randread-4k-qd32"),
    ) {
        println!(
            "ratio {:<40} {:>6.2}  (target >= 0.9; medians)",
            "qcow2-randread/randread-4k-qd32:ours",
            q / r
        );
        ratios.insert("qcow2-randread/randread-4k-qd32:ours".into(), json!(q / r));
    }
    if let (Some(c), Some(q)) = (
        ours_median("qcow2-chain10-randread-4k-qd32"),
        ours_median("qcow2-randread-4k-qd32"),
    ) {
        println!(
            "ratio {:<40} {:>6.2}  (target >= 0.8; medians)",
            "qcow2-chain10/qcow2-randread:ours",
            c / q
        );
        ratios.insert("qcow2-chain10/qcow2-randread:ours".into(), json!(c / q));
    }
    // Encryption's own cost: the same workloads unencrypted, ours (goal: at least 0.75),
    // and the CPU each daemon spends per GiB moved.
    for (enc, plain) in [
        ("luks-randread-4k-qd32", "randread-4k-qd32"),
        ("luks-randwrite-4k-qd32", "randwrite-4k-qd32"),
    ] {
        if let (Some(e), Some(p)) = (ours_median(enc), ours_median(plain)) {
            let key = format!("{enc}/{plain}:ours");
            println!("ratio {key:<40} {:>6.2}  (target >= 0.75; medians)", e / p);
            ratios.insert(key, json!(e / p));
        }
    }
    for case in [
        "luks-randread-4k-qd32",
        "luks-randwrite-4k-qd32",
        "randread-4k-qd32",
        "randwrite-4k-qd32",
    ] {
        for t in [Target::Ours, Target::Qsd] {
            let (cpu, bytes) = records
                .iter()
                .filter(|r| r.case == case && r.target == t)
                .filter_map(|r| Some((r.daemon_cpu?.as_secs_f64(), r.ops as f64 * BLOCK as f64)))
                .fold((0.0, 0.0), |(c, b), (c1, b1)| (c + c1, b + b1));
            if bytes > 0.0 {
                println!(
                    "cpu   {:<40} {:>6.2} CPU s per GiB",
                    format!("{case}:{}", t.name()),
                    cpu / (bytes / GIB as f64)
                );
            }
        }
    }
    println!(
        "note: both null devices run with read-zeroes=off (reads leave the buffer untouched), \
         so they measure the daemons alone"
    );
    for &t in &[Target::Ours, Target::Qsd] {
        let iops: Vec<f64> = records
            .iter()
            .filter(|r| r.case == "throttled-20k-randread-qd32" && r.target == t)
            .map(|r| r.iops / THROTTLE_IOPS as f64)
            .collect();
        if !iops.is_empty() {
            println!(
                "throttle accuracy {:<8} IOPS/limit {:.3}  (per round: {}; limit {THROTTLE_IOPS})",
                t.name(),
                median(&iops),
                iops.iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    if let Some(w) = wake {
        println!(
            "note: on this machine a thread asleep on the client's CPU runs {:.1} µs after an \
             eventfd write from the daemons' CPU, which costs the writer {:.1} µs; at depth 1 \
             every request whose client sleeps until signalled pays that wake-up",
            us(w.wake),
            us(w.write)
        );
    }
    let line = json!({
        "bench": "blk-compare",
        "file": file.display().to_string(),
        "page_cached": true,
        "size_bytes": args.size_gib * GIB,
        "block_bytes": BLOCK,
        "rounds": args.rounds,
        "client_poll": args.client_poll,
        "busy_threads": args.busy,
        "together": args.together,
        "ours_args": args.ours_arg,
        "seconds_per_run": args.seconds,
        "results": rows,
        "ratios_iops": ratios,
        "ratios_p50_latency": latency_ratios,
        "wake_up_us": wake.map(|w| json!({"wake": us(w.wake), "write": us(w.write)})),
    });
    println!("{line}");
}
