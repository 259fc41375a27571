//! `snapshot-pause`: how long a guest writing at depth 32 stalls while a live snapshot of its
//! qcow2 disk is taken, ours (`POST /v1/disks/{id}/snapshots`) beside qemu-storage-daemon's
//! (`blockdev-snapshot-sync` over QMP), in one run on the same page-cached image.
//!
//! A libblkio client keeps 32 random 4 KiB writes in flight and notes when each completes;
//! the pause a snapshot causes is the longest gap between completions from the moment it is
//! asked for to the moment it is answered (the guest's view: no request finishes while the
//! queues are stopped). Between snapshots the client writes on for a while. Prints each
//! daemon's median and worst pause, ours against the goal (10 ms at depth 32), the
//! ratio, and a JSON line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use benches::{median, Rng};
use clap::Parser;
use daemon_support::api_client;
use testkit::blkio_client::{Client, ClientOptions, SlotOp, Target};
use testkit::daemon::{Daemon, DaemonCommand};

#[derive(Parser)]
#[command(
    about = "The guest-visible pause of a live qcow2 snapshot at depth 32, ours and qemu-storage-daemon's"
)]
struct Args {
    /// Directory for the images (page-cached).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Snapshots per daemon.
    #[arg(long, default_value_t = 8)]
    snapshots: usize,
    /// Writing between two snapshots, in milliseconds.
    #[arg(long, default_value_t = 500)]
    between_ms: u64,
    #[arg(long, default_value_t = 1)]
    size_gib: u64,
}

const DEPTH: usize = 32;
const BLOCK: usize = 4096;

/// Completion times of the client's writes, from its thread.
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Instant>>>,
    thread: std::thread::JoinHandle<Result<()>>,
}

fn start_writer(socket: &Path, capacity_blocks: u64) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
    let (s, d, socket) = (stop.clone(), done.clone(), socket.to_owned());
    let thread = std::thread::spawn(move || -> Result<()> {
        let opts = ClientOptions::default().buffer_per_queue(DEPTH * BLOCK);
        let mut client = Client::open_with(Target::VhostUser(&socket), &opts)?;
        let mut p = client.queue(0).pipeline(DEPTH, BLOCK)?;
        let mut rng = Rng::new(7);
        let mut failed = None;
        while !s.load(Ordering::Relaxed) {
            for slot in 0..DEPTH {
                if p.is_free(slot) {
                    p.slot_mut(slot).fill(slot as u8);
                    p.submit(
                        slot,
                        SlotOp::Write(rng.below(capacity_blocks) * BLOCK as u64),
                    );
                }
            }
            let mut times = Vec::new();
            p.wait(1, |_, r| {
                if let Err(e) = r {
                    failed = Some(e.to_string());
                }
                times.push(Instant::now());
            })?;
            d.lock().unwrap_or_else(|e| e.into_inner()).extend(times);
            if let Some(e) = failed.take() {
                bail!("a write failed: {e}");
            }
        }
        p.drain()?;
        Ok(())
    });
    Writer { stop, done, thread }
}

/// The longest gap between completions within `[from, to]` (the first completion after
/// `from` counts from `from`).
fn longest_gap(done: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut prev = from;
    let mut longest = Duration::ZERO;
    for &t in done.iter().filter(|&&t| t > from) {
        longest = longest.max(t - prev);
        prev = t;
        if t > to {
            break;
        }
    }
    longest
}

/// A daemon with a QMP monitor (qemu-storage-daemon), spoken to line by line.
struct Qmp {
    stream: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).with_context(|| format!("{}", path.display()))?;
        let mut q = Qmp {
            stream: BufReader::new(stream),
        };
        q.read()?; // the greeting
        q.execute(serde_json::json!({"execute": "qmp_capabilities"}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<serde_json::Value> {
        let mut line = String::new();
        self.stream.read_line(&mut line)?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs a command; its answer (events before it are skipped).
    fn execute(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value> {
        writeln!(self.stream.get_mut(), "{cmd}")?;
        loop {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("{cmd}: {e}");
            }
            return Ok(v);
        }
    }
}

struct Pauses {
    pauses_ms: Vec<f64>,
    /// What our daemon reported for each (its queues stopped), if it is ours.
    reported_ms: Vec<f64>,
}

fn run(
    name: &str,
    socket: &Path,
    capacity_blocks: u64,
    args: &Args,
    mut snapshot: impl FnMut(usize) -> Result<Option<f64>>,
) -> Result<Pauses> {
    let w = start_writer(socket, capacity_blocks);
    std::thread::sleep(Duration::from_millis(args.between_ms));
    let mut windows = Vec::new();
    let mut reported = Vec::new();
    for i in 0..args.snapshots {
        let from = Instant::now();
        if let Some(ms) = snapshot(i).with_context(|| format!("{name}: snapshot {i}"))? {
            reported.push(ms);
        }
        windows.push((from, Instant::now()));
        std::thread::sleep(Duration::from_millis(args.between_ms));
    }
    w.stop.store(true, Ordering::Relaxed);
    w.thread
        .join()
        .map_err(|_| anyhow::anyhow!("{name}: the writer panicked"))??;
    let done = w.done.lock().unwrap_or_else(|e| e.into_inner());
    let pauses_ms = windows
        .iter()
        .map(|&(a, b)| longest_gap(&done, a, b).as_secs_f64() * 1000.0)
        .collect();
    Ok(Pauses {
        pauses_ms,
        reported_ms: reported,
    })
}

fn image(dir: &Path, name: &str, size_gib: u64) -> Result<PathBuf> {
    let img = dir.join(name);
    let _ = std::fs::remove_file(&img);
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(format!("{size_gib}G"))
        .output()
        .context("qemu-img (Debian's qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(img)
}

fn summary(r: &Pauses) -> (f64, f64) {
    let max = r.pauses_ms.iter().cloned().fold(0.0, f64::max);
    (median(&r.pauses_ms), max)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir_in(&args.dir)?;
    let dir = work.path();
    let capacity_blocks = (args.size_gib << 30) / BLOCK as u64;

    // Ours.
    let img = image(dir, "ours.qcow2", args.size_gib)?;
    let (sock, api) = (dir.join("ours.sock"), dir.join("ours-api.sock"));
    let mut ours: Daemon = DaemonCommand::vhost_blk()?
        .arg("--socket")
        .arg(&sock)
        .arg("--id")
        .arg("vm")
        .arg("--api-socket")
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={},format=qcow2", img.display()))
        .spawn()?;
    let r_ours = run("ours", &sock, capacity_blocks, &args, |i| {
        let a = api_client::call(
            &api,
            "POST",
            "/v1/disks/vm/snapshots",
            Some(&serde_json::json!({ "name": format!("s{i}") })),
        )?;
        if a.status >= 400 {
            bail!("{}: {}", a.status, a.message());
        }
        let v: serde_json::Value = serde_json::from_slice(&a.body)?;
        Ok(v["pause_ms"].as_f64())
    })?;
    ours.terminate()?;

    // qemu-storage-daemon, with a QMP monitor.
    let img = image(dir, "qsd.qcow2", args.size_gib)?;
    let (sock, qmp_path) = (dir.join("qsd.sock"), dir.join("qsd-qmp.sock"));
    let mut qsd = DaemonCommand::qemu_storage_daemon(&sock)
        .arg("--chardev")
        .arg(format!("socket,id=m0,path={},server=on,wait=off", qmp_path.display()))
        .arg("--monitor")
        .arg("chardev=m0")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},aio=io_uring,cache.direct=off",
            img.display()
        ))
        .arg("--blockdev")
        .arg("driver=qcow2,node-name=d0,file=f0")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .spawn()?;
    let mut qmp = Qmp::connect(&qmp_path)?;
    let r_qsd = run("qemu-storage-daemon", &sock, capacity_blocks, &args, |i| {
        let file = dir.join(format!("qsd-s{i}.qcow2"));
        qmp.execute(serde_json::json!({
            "execute": "blockdev-snapshot-sync",
            "arguments": {
                "node-name": if i == 0 { "d0".to_string() } else { format!("s{}", i - 1) },
                "snapshot-file": file.display().to_string(),
                "snapshot-node-name": format!("s{i}"),
                "format": "qcow2",
            }
        }))?;
        Ok(None)
    })?;
    qsd.terminate()?;

    let (o_med, o_max) = summary(&r_ours);
    let (q_med, q_max) = summary(&r_qsd);
    let rep_med = median(&r_ours.reported_ms);
    let rep_max = r_ours.reported_ms.iter().cloned().fold(0.0, f64::max);
    println!(
        "guest-visible pause of a live snapshot, 4 KiB random writes at depth 32, {} snapshots each",
        args.snapshots
    );
    println!("{:<22} {:>12} {:>12}", "", "median ms", "worst ms");
    println!("{:<22} {:>12.2} {:>12.2}", "ours", o_med, o_max);
    println!(
        "{:<22} {:>12.2} {:>12.2}",
        "qemu-storage-daemon", q_med, q_max
    );
    println!(
        "ours/qsd (lower is better): median {:.2}, worst {:.2}; ours as our daemon reports it: median {:.2} ms, worst {:.2} ms (goal: under 10 ms)",
        o_med / q_med,
        o_max / q_max,
        rep_med,
        rep_max
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "snapshot-pause",
            "ours_median_ms": o_med, "ours_worst_ms": o_max,
            "qsd_median_ms": q_med, "qsd_worst_ms": q_max,
            "ours_reported_median_ms": rep_med, "ours_reported_worst_ms": rep_max,
            "ours_pauses_ms": r_ours.pauses_ms, "qsd_pauses_ms": r_qsd.pauses_ms,
        })
    );
    Ok(())
}
