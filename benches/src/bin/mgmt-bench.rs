//! mgmt-bench: what the management plane costs, beside qemu-storage-daemon in the same run.
//! Both daemons start with one disk; then `--disks - 1` more are added at run time, one at
//! a time (ours: `POST /v1/disks`, with the audit log and the config write-back on; qsd:
//! QMP `blockdev-add` + `block-export-add`), each on a file image, and nobody connects.
//! Printed: the time to add a disk (client side, to the answer), and the daemon's resident
//! memory with one disk, with all, and per idle disk beyond the first.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use daemon_support::api_client;
use serde_json::{json, Value};
use testkit::daemon::{self, DaemonCommand, Readiness};

#[derive(Parser)]
#[command(
    name = "mgmt-bench",
    about = "Disk add latency and memory per idle disk, ours and qsd"
)]
struct Args {
    /// Disks in all at the end (the first is there from the start).
    #[arg(long, default_value_t = 64)]
    disks: usize,
    /// Our daemon's binary (default: vhost-blk next to this binary).
    #[arg(long)]
    vhost_blk: Option<PathBuf>,
    /// Only ours.
    #[arg(long)]
    no_qsd: bool,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("mgmt-bench: {e:#}");
        std::process::exit(1);
    }
}

/// Resident memory of `pid`, bytes.
fn rss(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

struct Figures {
    add: Vec<Duration>,
    rss_one: u64,
    rss_all: u64,
}

fn images(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("disk{i}.img"));
            std::fs::File::create(&p)?.set_len(64 << 20)?;
            Ok(p)
        })
        .collect()
}

fn ours(bin: &Path, dir: &Path, imgs: &[PathBuf]) -> Result<Figures> {
    let d = dir.display();
    let config = dir.join("vhost-blk.toml");
    std::fs::write(
        &config,
        format!(
            "api-socket = \"{d}/api.sock\"\naudit-log = \"{d}/audit.log\"\n\n[[disk]]\nid = \"disk0\"\n\
             socket = \"{d}/ours-0.sock\"\ndisk = \"path={}\"\n",
            imgs[0].display()
        ),
    )?;
    let daemon = DaemonCommand::new(bin)
        .name("vhost-blk")
        .readiness(Readiness::StderrContains(daemon::LISTENING_MARKER.into()))
        .arg("--config")
        .arg(&config)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_one = rss(daemon.pid())?;
    let api = dir.join("api.sock");
    let mut add = Vec::new();
    for (i, img) in imgs.iter().enumerate().skip(1) {
        let body = json!({
            "id": format!("disk{i}"),
            "socket": format!("{d}/ours-{i}.sock"),
            "disk": format!("path={}", img.display()),
        });
        let start = Instant::now();
        let a = api_client::call(&api, "POST", "/v1/disks", Some(&body))?;
        add.push(start.elapsed());
        if a.status != 201 {
            bail!("adding disk{i}: {}: {}", a.status, a.message());
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_all = rss(daemon.pid())?;
    Ok(Figures {
        add,
        rss_one,
        rss_all,
    })
}

/// One QMP command and its answer (events skipped).
fn qmp(conn: &mut (UnixStream, BufReader<UnixStream>), cmd: Value) -> Result<Value> {
    writeln!(conn.0, "{cmd}")?;
    loop {
        let mut line = String::new();
        if conn.1.read_line(&mut line)? == 0 {
            bail!("QMP closed");
        }
        let v: Value = serde_json::from_str(&line)?;
        if v.get("event").is_some() {
            continue;
        }
        if let Some(e) = v.get("error") {
            bail!("QMP {cmd}: {e}");
        }
        return Ok(v);
    }
}

fn qsd(dir: &Path, imgs: &[PathBuf]) -> Result<Figures> {
    let qmp_path = dir.join("qmp.sock");
    let first = dir.join("qsd-0.sock");
    let daemon = DaemonCommand::qemu_storage_daemon(&first)
        .name("qsd")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=n0,filename={},aio=io_uring,locking=off",
            imgs[0].display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on",
            first.display()
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp_path.display()
        ))
        .arg("--monitor")
        .arg("chardev=qmp")
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let rss_one = rss(daemon.pid())?;
    let s = UnixStream::connect(&qmp_path).context("QMP socket")?;
    let mut conn = (s.try_clone()?, BufReader::new(s));
    let mut greeting = String::new();
    conn.1.read_line(&mut greeting)?;
    qmp(&mut conn, json!({"execute": "qmp_capabilities"}))?;
    let mut add = Vec::new();
    for (i, img) in imgs.iter().enumerate().skip(1) {
        let start = Instant::now();
        qmp(
            &mut conn,
            json!({"execute": "blockdev-add", "arguments": {
                "driver": "file", "node-name": format!("n{i}"),
                "filename": img.display().to_string(), "aio": "io_uring", "locking": "off"}}),
        )?;
        qmp(
            &mut conn,
            json!({"execute": "block-export-add", "arguments": {
                "type": "vhost-user-blk", "id": format!("e{i}"), "node-name": format!("n{i}"),
                "writable": true,
                "addr": {"type": "unix", "path": dir.join(format!("qsd-{i}.sock")).display().to_string()}}}),
        )?;
        add.push(start.elapsed());
    }
    std::thread::sleep(Duration::from_millis(300));
    let rss_all = rss(daemon.pid())?;
    Ok(Figures {
        add,
        rss_one,
        rss_all,
    })
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run(args: Args) -> Result<()> {
    if args.disks < 2 {
        bail!("--disks must be at least 2");
    }
    let bin = match args.vhost_blk {
        Some(p) => p,
        None => daemon::try_binary_path("vhost-blk")?,
    };
    let tmp = tempfile::Builder::new()
        .prefix("mgmt-bench.")
        .tempdir_in("/var/tmp")?;
    let imgs = images(tmp.path(), args.disks)?;
    let o = ours(&bin, tmp.path(), &imgs)?;
    let q = if args.no_qsd {
        None
    } else {
        Some(qsd(tmp.path(), &imgs)?)
    };
    let n = args.disks;
    println!("mgmt-bench: {n} disks on 64 MiB files, added one at a time after the first; nobody connected");
    let row = |name: &str, f: &dyn Fn(&Figures) -> f64, unit: &str| {
        let ours = f(&o);
        match &q {
            Some(q) => {
                let theirs = f(q);
                println!(
                    "{name:<32} ours {ours:>9.2} {unit:<3} qsd {theirs:>9.2} {unit:<3} ours/qsd {:.2}",
                    ours / theirs
                )
            }
            None => println!("{name:<32} ours {ours:>9.2} {unit}"),
        }
    };
    row("add a disk, p50", &|f| pct(&f.add, 0.5), "ms");
    row("add a disk, p99", &|f| pct(&f.add, 0.99), "ms");
    row("add a disk, max", &|f| pct(&f.add, 1.0), "ms");
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    row("RSS with 1 disk", &|f| mib(f.rss_one), "MiB");
    row(&format!("RSS with {n} disks"), &|f| mib(f.rss_all), "MiB");
    row(
        "RSS per idle disk beyond the first",
        &|f| mib(f.rss_all.saturating_sub(f.rss_one)) / (n - 1) as f64,
        "MiB",
    );
    println!("ours adds with the audit log and the config write-back on (each fsynced)");
    Ok(())
}
