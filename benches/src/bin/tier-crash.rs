//! `tier-crash`: the long run of the tiered disk's crash test. Rounds of tagged writes with
//! FLUSH barriers while the daemon is SIGKILLed at random moments; after every restart every
//! block must be intact, no older than its last flush, never invented. CI runs 50 rounds
//! (vhost-blk/tests/tiered_crash.rs); this runs as many as asked.

use anyhow::{bail, Result};
use clap::Parser;
use testkit::crash::run_rounds;
use testkit::daemon::DaemonCommand;

#[derive(Parser)]
#[command(about = "Kill the tiered disk's daemon at random moments and check every block")]
struct Args {
    #[arg(long, default_value_t = 500)]
    rounds: usize,
    /// Cache modes to cycle through, comma-separated.
    #[arg(
        long,
        default_value = "writeback,writeback,writeback,writethrough,writeback,writearound"
    )]
    modes: String,
    #[arg(long, default_value_t = 2048)]
    blocks: u64,
    #[arg(long, default_value = "1M")]
    cache_size: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let modes: Vec<&str> = args.modes.split(',').collect();
    let dir = tempfile::tempdir()?;
    let cap = dir.path().join("capacity.img");
    let cache = dir.path().join("cache.img");
    let sock = dir.path().join("blk.sock");
    std::fs::File::create(&cap)?.set_len(args.blocks * 4096)?;
    let bin = testkit::daemon::try_binary_path("vhost-blk")?;
    let started = std::time::Instant::now();
    let report = run_rounds(args.blocks, args.rounds, args.seed, &sock, |round| {
        DaemonCommand::new(&bin)
            .readiness(testkit::daemon::Readiness::StderrContains(
                "listening on".into(),
            ))
            .arg("--socket")
            .arg(&sock)
            .arg("--queue-size")
            .arg("256")
            .arg("--disk")
            .arg(format!(
                "path={},cache={},cache-size={},cache-mode={}",
                cap.display(),
                cache.display(),
                args.cache_size,
                modes[round % modes.len()]
            ))
    });
    println!(
        "{{\"bench\":\"tier-crash\",\"rounds\":{},\"writes_acknowledged\":{},\"flushes\":{},\"blocks_checked\":{},\"problems\":{},\"seconds\":{:.1}}}",
        report.rounds,
        report.writes_acknowledged,
        report.flushes,
        report.blocks_checked,
        report.problems.len(),
        started.elapsed().as_secs_f64()
    );
    if !report.problems.is_empty() {
        bail!("problems:\n{}", report.problems.join("\n"));
    }
    Ok(())
}
