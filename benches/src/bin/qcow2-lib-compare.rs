//! `qcow2-lib-compare`: our qcow2 node against the `imago` crate (a qcow2 library by a QEMU
//! block maintainer, which ARCHITECTURE.md weighs against writing our own), in one process
//! on the same fully allocated, page-cached image made by `qemu-img convert`: random 4 KiB
//! reads for a few seconds each way, in rounds.
//!
//! Rows:
//! - one request at a time on one thread: imago's synchronous interface beside our node on
//!   the synchronous engine (both `preadv` under the format's lookup): the cost of the format
//!   code itself;
//! - the same with a thread per core (our node: a queue per thread, as the daemon's queue
//!   workers have);
//! - depth 32 per queue on io_uring, as our workers drive it, beside imago with a thread per
//!   core: imago's file I/O is a blocking `preadv` even in its async interface, so its
//!   concurrency is threads, each a request at a time.
//!
//! Prints IOPS per row, the ratio, and a JSON line.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::{median, Rng};
use clap::Parser;
use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};
use storage_core::disk::{open_disk, AnyDisk, Disk, DiskOp, DiskQueue, DiskSpec, IoVecs};

#[derive(Parser)]
#[command(about = "Random 4 KiB reads of one qcow2 image: our node against the imago crate")]
struct Args {
    /// Directory for the images (page-cached).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
}

const BLOCK: u64 = 4096;
const DEPTH: u64 = 32;

/// What the image holds at `range` (8-byte aligned): each word names its offset.
fn contents(range: std::ops::Range<u64>) -> Vec<u8> {
    (range.start / 8..range.end / 8)
        .flat_map(|i| (i ^ 0x5bd1_e995).to_le_bytes())
        .collect()
}

/// Our node on `img`, its file on `engine` (`sync` or `io_uring`).
fn open_ours(img: &Path, engine: &str) -> Result<AnyDisk> {
    let spec: DiskSpec = format!("path={},format=qcow2,engine={engine}", img.display())
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(open_disk(&spec)?)
}

/// A fully allocated qcow2 image of `size` bytes (64 KiB clusters), every block distinct.
fn make_image(dir: &Path, size: u64) -> Result<PathBuf> {
    let raw = dir.join("qcow2-lib-compare.raw");
    let img = dir.join("qcow2-lib-compare.qcow2");
    std::fs::write(&raw, contents(0..size))?;
    let _ = std::fs::remove_file(&img);
    benches::prepare_qcow2(&raw, &img)?;
    std::fs::remove_file(&raw)?;
    Ok(img)
}

fn imago_open(img: &Path) -> Result<FormatAccess<ImagoFile>> {
    let q = Qcow2::<ImagoFile>::builder_path(img)
        .open(PermissiveImplicitOpenGate::default())
        .context("imago: opening the image")?;
    Ok(FormatAccess::new(q))
}

/// Reads a request at a time for `secs` on each of `threads` threads; total IOPS.
fn imago_reads(img: &FormatAccess<ImagoFile>, size: u64, secs: f64, threads: usize) -> f64 {
    let done: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng::new(7 + t as u64);
                    let mut buf = vec![0u8; BLOCK as usize];
                    let end = Instant::now() + Duration::from_secs_f64(secs);
                    let mut n = 0u64;
                    while Instant::now() < end {
                        for _ in 0..64 {
                            let off = rng.below(size / BLOCK) * BLOCK;
                            img.read(&mut buf, off).expect("imago read");
                            n += 1;
                        }
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    done as f64 / secs
}

/// Keeps `depth` random reads in flight on each of `threads` queues of one disk (a thread
/// per queue, as the daemon's queue workers) for `secs`; total IOPS.
fn our_reads(
    img: &Path,
    engine: &str,
    size: u64,
    secs: f64,
    (threads, depth): (usize, u64),
) -> Result<f64> {
    let disk = open_ours(img, engine)?;
    let done: Result<Vec<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let disk = &disk;
                s.spawn(move || one_queue(disk, size, secs, depth, 7 + t as u64))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    Ok(done?.iter().sum::<u64>() as f64 / secs)
}

/// One queue's reads (see [`our_reads`]): how many completed.
fn one_queue(disk: &AnyDisk, size: u64, secs: f64, depth: u64, seed: u64) -> Result<u64> {
    let mut q = disk.new_queue(depth as u32)?;
    let mut rng = Rng::new(seed);
    let next = |rng: &mut Rng| rng.below(size / BLOCK) * BLOCK;
    for tag in 0..depth {
        let offset = next(&mut rng);
        let buffers = IoVecs::owned(&[BLOCK as usize]);
        q.start(DiskOp::Read { offset, buffers }, tag)
            .map_err(|r| anyhow::anyhow!("refused: {}", r.error))?;
    }
    q.submit()?;
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    loop {
        let mut got = false;
        while let Some(c) = q.pop_completion() {
            got = true;
            if c.result != BLOCK as i32 {
                bail!("our read failed: {}", c.result);
            }
            n += 1;
            if Instant::now() < end {
                let buffers = c.buffers.expect("a read gives its buffers back");
                let offset = next(&mut rng);
                q.start(DiskOp::Read { offset, buffers }, c.tag)
                    .map_err(|r| anyhow::anyhow!("refused: {}", r.error))?;
            }
        }
        if q.in_flight() == 0 {
            break;
        }
        q.submit()?;
        if !got {
            q.wait()?;
        }
    }
    Ok(n)
}

/// Both read the same bytes at a few offsets (the comparison is of equals).
fn same_contents(img: &Path, imago: &FormatAccess<ImagoFile>, size: u64) -> Result<()> {
    let disk = open_ours(img, "sync")?;
    let mut rng = Rng::new(99);
    for _ in 0..64 {
        let off = rng.below(size / BLOCK) * BLOCK;
        let mut a = vec![0u8; BLOCK as usize];
        let mut b = vec![0u8; BLOCK as usize];
        imago.read(&mut a, off)?;
        disk.read_at(&mut b, off)?;
        let want = contents(off..off + BLOCK);
        if a != want || b != want {
            bail!("at {off}: imago and our node do not both read what was written");
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let size = args.size_mib << 20;
    let img = make_image(&args.dir, size)?;
    let imago = imago_open(&img)?;
    same_contents(&img, &imago, size)?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let rows = [
        ("imago, 1 thread", "ours, sync engine, depth 1, 1 queue"),
        (
            "imago, 1 thread per core",
            "ours, sync engine, depth 1, 1 queue per core",
        ),
        (
            "imago, 1 thread per core",
            "ours, io_uring, depth 32, 1 queue per core",
        ),
    ];
    let mut figures = vec![[Vec::new(), Vec::new()]; rows.len()];
    for round in 0..args.rounds {
        let (secs, mut line) = (args.seconds, format!("round {}:", round + 1));
        let per_core = imago_reads(&imago, size, secs, cores);
        let runs = [
            (
                imago_reads(&imago, size, secs, 1),
                our_reads(&img, "sync", size, secs, (1, 1))?,
            ),
            (per_core, our_reads(&img, "sync", size, secs, (cores, 1))?),
            (
                per_core,
                our_reads(&img, "io_uring", size, secs, (cores, DEPTH))?,
            ),
        ];
        for (f, (t, o)) in figures.iter_mut().zip(runs) {
            f[0].push(t);
            f[1].push(o);
            line += &format!(" {t:.0} / {o:.0}");
        }
        eprintln!("{line} IOPS");
    }
    println!(
        "qcow2 random 4 KiB reads, {} MiB image, {} rounds of {} s (medians)",
        args.size_mib, args.rounds, args.seconds
    );
    println!(
        "{:<26} {:>10}   {:<46} {:>10}   ours/imago",
        "imago", "IOPS", "ours", "IOPS"
    );
    let mut json = Vec::new();
    for (i, (theirs, ours)) in rows.iter().enumerate() {
        let (t, o) = (median(&figures[i][0]), median(&figures[i][1]));
        println!(
            "{theirs:<26} {t:>10.0}   {ours:<46} {o:>10.0}   {:.2}",
            o / t
        );
        json.push(serde_json::json!({"imago": theirs, "imago_iops": t, "ours": ours, "ours_iops": o, "ratio": o / t}));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "qcow2-lib-compare", "rows": json})
    );
    std::fs::remove_file(&img)?;
    Ok(())
}
