//! `tier-compare`: a tiered disk against its own tiers, side by side in one run.
//!
//! Capacity tier: a file opened O_DIRECT on this machine's disk (the slow tier). Cache tier:
//! a file on /dev/shm. Every target is our daemon, driven by the same libblkio client:
//! - `capacity`: the capacity file alone (`direct=on`);
//! - `tiered`: the capacity file behind the cache (write-through, default policy);
//! - `shm-raw`: a raw disk on /dev/shm, the ceiling for a cache hit.
//!
//! Workloads: 4 KiB random reads at depth 32, Zipf(0.99) over the whole disk (the tiered
//! disk's target: at least 5x the capacity tier), and uniform over a region that fits in the
//! cache, once warm (target: at least 0.9x the raw /dev/shm disk). Prints a table and a JSON
//! line with the ratios and the cache hit ratio of each tiered run.
//!
//! The disk here was specified as about 20K IOPS; it is often much faster (90-130K IOPS at
//! depth 32), and then 5x its IOPS is more than a raw /dev/shm disk serves (about 620K), so
//! no cache could reach the target. The capacity tier is therefore throttled to 20K IOPS by
//! default (a blkio cgroup limit on both daemons that use the capacity file), emulating the
//! specified slow tier; `--capacity-iops 0` measures the disk as it is.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use benches::{median, run_workload, Pattern, RunResult, Workload, Zipf};
use clap::Parser;
use testkit::blkio_client::{Client, ClientOptions, Target};
use testkit::daemon::{self, Daemon, DaemonCommand};
use testkit::http;

#[derive(Parser)]
#[command(
    about = "Compare a tiered disk with its capacity tier alone and with a raw /dev/shm disk"
)]
struct Args {
    /// Directory for the capacity file (on the slow disk).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[arg(long, default_value_t = 2)]
    size_gib: u64,
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds of Zipf reads that warm the cache before the first measurement.
    #[arg(long, default_value_t = 30)]
    warm_seconds: u64,
    /// Our daemon (default: vhost-blk next to this binary).
    #[arg(long)]
    vhost_blk: Option<PathBuf>,
    /// Throttle the capacity file's disk to this many IOPS for the `capacity` and `tiered`
    /// daemons (a cgroup-v1 blkio limit on reads and writes), to emulate the ~20K IOPS slow
    /// tier the benchmark was specified with on a disk that is faster. 0: the disk as it is.
    #[arg(long, default_value_t = 20_000)]
    capacity_iops: u64,
    /// Which loads to measure, of zipf and hot.
    #[arg(long, value_delimiter = ',', default_value = "zipf,hot")]
    loads: Vec<String>,
    /// Leave CPU placement to the scheduler (default: the client on the last CPU, every
    /// daemon thread on the first, the same for every target; see `benches::pin`).
    #[arg(long)]
    no_pin: bool,
}

/// A blkio cgroup (v1) that limits its members' IOPS on the disk holding `file`.
fn throttle(file: &Path, iops: u64) -> Result<benches::cgroup::Group> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(file)?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    // Throttling applies to whole disks: a partition is limited through its disk.
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let disk = if sys.join("partition").exists() {
        std::fs::read_to_string(sys.join("../dev"))?
            .trim()
            .to_string()
    } else {
        format!("{major}:{minor}")
    };
    let root = Path::new("/sys/fs/cgroup/blkio");
    if !root.join("blkio.throttle.read_iops_device").exists() {
        anyhow::bail!(
            "--capacity-iops needs the cgroup-v1 blkio controller at {} \
             (--capacity-iops 0 measures the disk unthrottled)",
            root.display()
        );
    }
    let limit = format!("{disk} {iops}");
    Ok(benches::cgroup::Group::new(
        "blkio",
        &[
            ("blkio.throttle.read_iops_device", limit.clone()),
            ("blkio.throttle.write_iops_device", limit),
        ],
    )?)
}

const BLOCK: usize = 4096;
const DEPTH: usize = 32;

struct Served {
    name: &'static str,
    daemon: Daemon,
    socket: PathBuf,
    api: PathBuf,
}

fn serve(bin: &Path, dir: &Path, name: &'static str, spec: String) -> Result<Served> {
    let socket = dir.join(format!("{name}.sock"));
    let api = dir.join(format!("{name}.api"));
    let daemon = DaemonCommand::new(bin)
        .name(name)
        .readiness(testkit::daemon::Readiness::StderrContains(
            "listening on".into(),
        ))
        .arg("--socket")
        .arg(&socket)
        .arg("--api-socket")
        .arg(&api)
        .arg("--queue-size")
        .arg("256")
        .arg("--disk")
        .arg(spec)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Served {
        name,
        daemon,
        socket,
        api,
    })
}

fn metric(api: &Path, name: &str) -> f64 {
    http::get(api, "/metrics")
        .ok()
        .and_then(|r| http::parse_prometheus(&r.text()).ok())
        .map(|s| s.iter().filter(|x| x.name == name).map(|x| x.value).sum())
        .unwrap_or(0.0)
}

struct Record {
    workload: &'static str,
    target: &'static str,
    result: RunResult,
    cpu: f64,
    hit_ratio: Option<f64>,
}

fn run(s: &Served, workload: &'static str, w: &Workload, pin: bool) -> Result<Record> {
    if pin {
        benches::pin::client_and_daemon(Some(s.daemon.pid()))
            .with_context(|| format!("pinning the client and {}", s.name))?;
    }
    let opts = ClientOptions::default().buffer_per_queue(DEPTH * BLOCK);
    let mut client = Client::open_with(Target::VhostUser(&s.socket), &opts)
        .with_context(|| format!("{}: connecting", s.name))?;
    let (h0, m0) = (
        metric(&s.api, "strata_blk_cache_read_hits_total"),
        metric(&s.api, "strata_blk_cache_read_misses_total"),
    );
    let cpu0 = daemon::cpu_time(s.daemon.pid())?;
    let (result, stolen) = benches::with_steal(|| run_workload(client.queue(0), w));
    let result = result?;
    let cpu1 = daemon::cpu_time(s.daemon.pid())?;
    benches::warn_if_stolen(stolen, w.duration);
    let (h1, m1) = (
        metric(&s.api, "strata_blk_cache_read_hits_total"),
        metric(&s.api, "strata_blk_cache_read_misses_total"),
    );
    let refs = (h1 - h0) + (m1 - m0);
    let rec = Record {
        workload,
        target: s.name,
        cpu: (cpu1 - cpu0).as_secs_f64(),
        hit_ratio: (refs > 0.0).then(|| (h1 - h0) / refs),
        result,
    };
    eprintln!(
        "{:<10} {:<9} {:>9.0} IOPS  p50 {:>8.1} us  p99 {:>8.1} us{}",
        workload,
        s.name,
        rec.result.iops(),
        rec.result.latency.percentile(50.0).as_secs_f64() * 1e6,
        rec.result.latency.percentile(99.0).as_secs_f64() * 1e6,
        rec.hit_ratio
            .map(|h| format!("  hit ratio {:.1}%", h * 100.0))
            .unwrap_or_default()
    );
    Ok(rec)
}

/// Creates a file of `size` bytes with non-zero data, then drops it from the page cache.
fn prepare(path: &Path, size: u64) -> Result<()> {
    if std::fs::metadata(path)
        .map(|m| m.len() >= size)
        .unwrap_or(false)
    {
        return Ok(());
    }
    eprintln!("creating {} ({} MiB)...", path.display(), size >> 20);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)?;
    let chunk: Vec<u8> = (0..(4usize << 20))
        .map(|i| (i as u8).wrapping_mul(29) | 1)
        .collect();
    let mut done = 0;
    while done < size {
        let n = (size - done).min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        done += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

fn drop_cache(path: &Path) -> Result<()> {
    let f = File::open(path)?;
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only advises the kernel about our own open file.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match args.vhost_blk.clone() {
        Some(b) => b,
        None => daemon::try_binary_path("vhost-blk")?,
    };
    let size = args.size_gib << 30;
    let cap = args.dir.join("strata-tier-compare-capacity.img");
    prepare(&cap, size)?;
    drop_cache(&cap)?;
    let shm = tempfile::Builder::new()
        .prefix("strata-tier-compare-")
        .tempdir_in("/dev/shm")?;
    let raw = shm.path().join("raw.img");
    prepare(&raw, size)?;
    let cache = shm.path().join("cache.img");

    // locking=off: the capacity and tiered daemons serve one capacity file at once, on
    // purpose (each is measured alone).
    let capacity = serve(
        &bin,
        shm.path(),
        "capacity",
        format!("path={},direct=on,locking=off", cap.display()),
    )?;
    let tiered = serve(
        &bin,
        shm.path(),
        "tiered",
        format!(
            "path={},direct=on,locking=off,cache={},cache-size={}M,cache-format=force",
            cap.display(),
            cache.display(),
            args.cache_mib
        ),
    )?;
    let shm_raw = serve(
        &bin,
        shm.path(),
        "shm-raw",
        format!("path={}", raw.display()),
    )?;
    let throttled = match args.capacity_iops {
        0 => None,
        iops => {
            let t = throttle(&cap, iops)?;
            t.add(capacity.daemon.pid())?;
            t.add(tiered.daemon.pid())?;
            eprintln!("capacity disk throttled to {iops} IOPS for the capacity and tiered daemons");
            Some(t)
        }
    };

    for load in &args.loads {
        if load != "zipf" && load != "hot" {
            anyhow::bail!("--loads: unknown load {load:?} (known: zipf, hot)");
        }
    }
    let measures = |load: &str| args.loads.iter().any(|l| l == load);
    let pin = !args.no_pin;
    let blocks = size / BLOCK as u64;
    let dur = Duration::from_secs(args.seconds);
    let zipf = Workload {
        pattern: Pattern::RandRead,
        block: BLOCK,
        depth: DEPTH,
        span: size,
        zipf: Some(Zipf::new(blocks, 0.99)),
        duration: dur,
        seed: 1,
    };
    // A region three quarters the size of the cache: it all fits once warm.
    let hot_span = (args.cache_mib << 20) * 3 / 4;
    let hot = Workload {
        span: hot_span,
        zipf: None,
        ..zipf
    };

    let mut records = Vec::new();
    if measures("zipf") {
        eprintln!(
            "warming the cache with {} s of Zipf reads...",
            args.warm_seconds
        );
        run(
            &tiered,
            "warm-up",
            &Workload {
                duration: Duration::from_secs(args.warm_seconds),
                seed: 99,
                ..zipf
            },
            pin,
        )?;
    }
    // Each workload is measured in its own steady state: first every Zipf round (after the
    // Zipf warm-up), then every hot-region round (after warming that region). Interleaving
    // them let each warm-up evict the other's working set (Zipf hit ratio 81% -> 74%).
    // Every round runs the load on both targets, back to back.
    let mut rounds = |load: &'static str, targets: [&Served; 2], w: &Workload, seed: u64| {
        for round in 0..args.rounds {
            eprintln!("{load} round {}", round + 1);
            for target in targets {
                let w = Workload {
                    seed: round as u64 + seed,
                    ..*w
                };
                records.push(run(target, load, &w, pin)?);
            }
        }
        anyhow::Ok(())
    };
    if measures("zipf") {
        rounds("zipf", [&capacity, &tiered], &zipf, 10)?;
    }
    // Warm the hot region (random order, so it is not a sequential stream the cache would
    // bypass) until a pass hits on every block.
    let mut warmed = 0;
    while measures("hot") {
        let pass = run(
            &tiered,
            "hot-warm",
            &Workload {
                duration: Duration::from_secs(3),
                seed: 7 + warmed,
                ..hot
            },
            pin,
        )?;
        warmed += 3;
        if pass.hit_ratio.unwrap_or(0.0) >= 0.9999 || warmed >= args.warm_seconds.max(3) {
            break;
        }
    }
    if measures("hot") {
        rounds("hot", [&tiered, &shm_raw], &hot, 20)?;
    }

    let med = |workload: &str, target: &str| -> Option<f64> {
        let v: Vec<f64> = records
            .iter()
            .filter(|r| r.workload == workload && r.target == target)
            .map(|r| r.result.iops())
            .collect();
        (!v.is_empty()).then(|| median(&v))
    };
    println!(
        "\ntier-compare: 4 KiB random reads, depth {DEPTH}, 1 queue, {} s per run, {} rounds; \
         capacity {} ({} GiB, O_DIRECT on the host disk{}), cache {} MiB on /dev/shm",
        args.seconds,
        args.rounds,
        cap.display(),
        args.size_gib,
        match args.capacity_iops {
            0 => String::new(),
            n => format!(", throttled to {n} IOPS"),
        },
        args.cache_mib
    );
    println!(
        "{:<6} {:<9} {:>10} {:>9} {:>9} {:>8} {:>10}",
        "load", "target", "IOPS", "p50 us", "p99 us", "CPU s", "hit ratio"
    );
    for r in &records {
        println!(
            "{:<6} {:<9} {:>10.0} {:>9.1} {:>9.1} {:>8.2} {:>10}",
            r.workload,
            r.target,
            r.result.iops(),
            r.result.latency.percentile(50.0).as_secs_f64() * 1e6,
            r.result.latency.percentile(99.0).as_secs_f64() * 1e6,
            r.cpu,
            r.hit_ratio
                .map(|h| format!("{:.1}%", h * 100.0))
                .unwrap_or("-".into())
        );
    }
    // Ratios pair the runs of one round (back to back, so they share the machine's state),
    // then take the median over rounds.
    let per_round = |workload: &str, a: &str, b: &str| -> Vec<f64> {
        let iops = |target: &str| -> Vec<f64> {
            records
                .iter()
                .filter(|r| r.workload == workload && r.target == target)
                .map(|r| r.result.iops())
                .collect()
        };
        iops(a).iter().zip(iops(b)).map(|(x, y)| x / y).collect()
    };
    let zipf_rounds = per_round("zipf", "tiered", "capacity");
    let hot_rounds = per_round("hot", "tiered", "shm-raw");
    let ratio = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    let (zipf_ratio, hot_ratio) = (ratio(&zipf_rounds), ratio(&hot_rounds));
    let show = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if let Some(r) = zipf_ratio {
        println!(
            "ratio zipf tiered/capacity  {r:.2}  (target >= 5; per round: {})",
            show(&zipf_rounds)
        );
    }
    if let Some(r) = hot_ratio {
        println!(
            "ratio hot  tiered/shm-raw   {r:.2}  (target >= 0.9; per round: {})",
            show(&hot_rounds)
        );
    }
    let json = serde_json::json!({
        "bench": "tier-compare",
        "capacity_gib": args.size_gib,
        "cache_mib": args.cache_mib,
        "seconds_per_run": args.seconds,
        "capacity_iops_limit": args.capacity_iops,
        "rounds": args.rounds,
        "iops_median": {
            "zipf_capacity": med("zipf", "capacity"),
            "zipf_tiered": med("zipf", "tiered"),
            "hot_tiered": med("hot", "tiered"),
            "hot_shm_raw": med("hot", "shm-raw"),
        },
        "hit_ratio": records.iter().filter(|r| r.target == "tiered").map(|r| serde_json::json!({"load": r.workload, "hit_ratio": r.hit_ratio})).collect::<Vec<_>>(),
        "ratios": {"zipf_tiered_over_capacity": zipf_ratio, "hot_tiered_over_shm_raw": hot_ratio},
    });
    println!("{json}");
    drop((capacity, tiered, shm_raw));
    drop(throttled);
    Ok(())
}
