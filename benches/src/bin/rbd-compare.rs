//! `rbd-compare`: a Ceph RBD image served by our vhost-blk beside qemu-storage-daemon's rbd
//! driver (both driven by the same libblkio client), and `rbd bench` on the same image (librbd
//! in-process, no vhost-user: the limit), all on a one-node cluster this tool starts
//! (`testkit::ceph`). Needs the `rbd` feature in our binary
//! (`cargo build --release --workspace --bins --features vhost-blk/rbd`) and, for
//! qemu-storage-daemon, Debian's qemu-block-extra.
//!
//! Output: a table with per-round ratios, and one JSON line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use benches::{median, run_workload, Pattern, Workload};
use clap::Parser;
use serde_json::json;
use testkit::blkio_client::{Client, ClientOptions, Target as ClientTarget};
use testkit::ceph::Cluster;
use testkit::daemon::{self, Daemon, DaemonCommand};

#[derive(Parser, Debug)]
#[command(
    name = "rbd-compare",
    about = "Compare vhost-blk on Ceph RBD with qemu-storage-daemon and rbd bench"
)]
struct Args {
    /// Image size in MiB (written in full before measuring, so reads find data).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measured run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Our daemon (default: vhost-blk next to this binary).
    #[arg(long)]
    vhost_blk: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Ours,
    Qsd,
    RbdBench,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ours => "ours",
            Target::Qsd => "qsd",
            Target::RbdBench => "rbd-bench",
        }
    }
}

const WORKLOADS: [(&str, Pattern); 2] = [
    ("randread-4k-qd32", Pattern::RandRead),
    ("randwrite-4k-qd32", Pattern::RandWrite),
];

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("rbd-compare: {e:#}");
        std::process::exit(1);
    }
}

fn start(target: Target, ceph: &Cluster, dir: &Path, ours: &Path) -> Result<(Daemon, PathBuf)> {
    let socket = dir.join(format!("{}.sock", target.name()));
    let conf = ceph.conf();
    let cmd = match target {
        Target::Ours => DaemonCommand::new(ours)
            .name("vhost-blk-rbd")
            .readiness(daemon::Readiness::StderrContains(
                daemon::LISTENING_MARKER.into(),
            ))
            .arg("--socket")
            .arg(&socket)
            .arg("--blockdev")
            .arg(format!(
                "driver=rbd,node-name=d0,pool=rbd,image=bench,conf={}",
                conf.display()
            ))
            .args(["--disk", "node=d0", "--queues", "1", "--queue-size", "256"]),
        Target::Qsd => DaemonCommand::qemu_storage_daemon(&socket)
            .name("qsd-rbd")
            .arg("--blockdev")
            .arg(format!(
                "driver=rbd,node-name=d0,pool=rbd,image=bench,conf={}",
                conf.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1",
                socket.display()
            )),
        Target::RbdBench => bail!("rbd bench runs as a tool"),
    };
    let d = cmd
        .spawn()
        .with_context(|| format!("starting {} on RBD", target.name()))?;
    Ok((d, socket))
}

/// `rbd bench` at depth 32 for about `seconds`: IOPS.
fn rbd_bench(ceph: &Cluster, pattern: Pattern, seconds: u64, guess_iops: f64) -> Result<f64> {
    let io_type = if pattern == Pattern::RandWrite {
        "write"
    } else {
        "read"
    };
    let total = (guess_iops * seconds as f64) as u64 * 4096;
    let out = ceph
        .run(
            "rbd",
            &[
                "bench",
                "--io-type",
                io_type,
                "--io-size",
                "4096",
                "--io-threads",
                "32",
                "--io-pattern",
                "rand",
                "--io-total",
                &total.max(4096 * 1000).to_string(),
                "rbd/bench",
            ],
        )
        .context("rbd bench")?;
    // The summary line: "elapsed: 10   ops: 40960   ops/sec: 4043.21   bytes/sec: ..."
    let line = out
        .lines()
        .find(|l| l.contains("ops/sec:"))
        .context("rbd bench printed no ops/sec")?;
    let value = line
        .split_whitespace()
        .skip_while(|w| *w != "ops/sec:")
        .nth(1)
        .context("rbd bench's ops/sec")?;
    value.parse().context("rbd bench's ops/sec is not a number")
}

fn run(args: Args) -> Result<()> {
    let ours = match &args.vhost_blk {
        Some(p) => p.clone(),
        None => daemon::try_binary_path("vhost-blk").map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    eprintln!("starting a one-node Ceph cluster");
    let ceph = Cluster::start().context("starting Ceph")?;
    ceph.create_image("bench", args.size_mib)?;
    eprintln!("writing the image in full");
    ceph.run(
        "rbd",
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4M",
            "--io-pattern",
            "seq",
            "--io-total",
            &format!("{}M", args.size_mib),
            "rbd/bench",
        ],
    )?;
    let dir = tempfile::tempdir()?;
    let run_time = Duration::from_secs(args.seconds);
    let span = args.size_mib << 20;
    let mut rows: Vec<(&str, Target, usize, f64)> = Vec::new();
    for round in 0..args.rounds {
        for (wi, (name, pattern)) in WORKLOADS.iter().enumerate() {
            for target in [Target::Qsd, Target::Ours, Target::RbdBench] {
                let iops = if target == Target::RbdBench {
                    let guess = rows
                        .iter()
                        .filter(|r| r.0 == *name && r.1 == Target::Ours)
                        .map(|r| r.3)
                        .fold(5000.0, f64::max);
                    rbd_bench(&ceph, *pattern, args.seconds, guess)?
                } else {
                    // Each daemon runs alone: the image's exclusive lock has one owner.
                    let (mut d, socket) = start(target, &ceph, dir.path(), &ours)?;
                    let opts = ClientOptions::default().buffer_per_queue(32 * 4096);
                    let mut c = Client::open_with(ClientTarget::VhostUser(&socket), &opts)
                        .with_context(|| format!("{}: {}", target.name(), d.output()))?;
                    let w = Workload {
                        pattern: *pattern,
                        block: 4096,
                        depth: 32,
                        span,
                        zipf: None,
                        duration: run_time,
                        seed: 100 * round as u64 + wi as u64,
                    };
                    let r = run_workload(c.queue(0), &w)
                        .with_context(|| format!("{} {name}", target.name()))?;
                    if r.errors > 0 {
                        bail!(
                            "{} {name}: {} errors ({:?})",
                            target.name(),
                            r.errors,
                            r.first_error
                        );
                    }
                    drop(c);
                    d.terminate()?;
                    r.iops()
                };
                eprintln!(
                    "round {round} {name:<18} {:<9} {iops:>9.0} IOPS",
                    target.name()
                );
                rows.push((name, target, round, iops));
            }
        }
    }
    println!(
        "rbd-compare: 4 KiB, depth 32, 1 queue, {} s per run, {} rounds; a {} MiB image on a \
         one-node cluster (one bluestore OSD on this machine's disk)",
        args.seconds, args.rounds, args.size_mib
    );
    println!("{:<18} {:<9} {:>10}", "workload", "target", "IOPS(med)");
    let mut ratios = serde_json::Map::new();
    let mut results = Vec::new();
    for (name, _) in WORKLOADS {
        let per = |t: Target| -> Vec<f64> {
            rows.iter()
                .filter(|r| r.0 == name && r.1 == t)
                .map(|r| r.3)
                .collect()
        };
        for t in [Target::Ours, Target::Qsd, Target::RbdBench] {
            let v = per(t);
            println!("{name:<18} {:<9} {:>10.0}", t.name(), median(&v));
            results.push(json!({"workload": name, "target": t.name(), "iops_per_round": v}));
        }
        let ours = per(Target::Ours);
        for other in [Target::Qsd, Target::RbdBench] {
            let theirs = per(other);
            let r: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
            let key = format!("{name}:ours/{}", other.name());
            println!(
                "ratio {key:<36} {:>5.2}  (per round: {})",
                median(&r),
                r.iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            ratios.insert(key, json!(median(&r)));
        }
    }
    println!(
        "{}",
        json!({"bench": "rbd-compare", "rounds": args.rounds, "seconds_per_run": args.seconds,
               "size_mib": args.size_mib, "results": results, "ratios": ratios})
    );
    Ok(())
}
