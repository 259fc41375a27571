//! The tiered disk survives SIGKILL at random moments: 50 rounds of tagged writes with FLUSH
//! barriers, the daemon killed mid-stream, restarted, and every block checked (intact, no
//! older than the last flush, never invented). Rounds cycle through write-back (most),
//! write-through and write-around, so recovery across mode changes is covered too. The
//! longer run is `target/release/tier-crash` in benches.

use testkit::crash::run_rounds;
use testkit::daemon::DaemonCommand;

#[test]
fn no_acknowledged_flushed_write_is_lost_or_torn_across_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("capacity.img");
    let cache = dir.path().join("cache.img");
    let sock = dir.path().join("blk.sock");
    let blocks = 2048u64; // 8 MiB capacity, 1 MiB cache: constant eviction and write-back
    std::fs::File::create(&cap)
        .unwrap()
        .set_len(blocks * 4096)
        .unwrap();
    let modes = [
        "writeback",
        "writeback",
        "writeback",
        "writethrough",
        "writeback",
        "writearound",
    ];
    let report = run_rounds(blocks, 50, 0x5eed_cafe, &sock, |round| {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&sock)
            .arg("--queue-size")
            .arg("256")
            .arg("--disk")
            .arg(format!(
                "path={},cache={},cache-size=1M,cache-mode={}",
                cap.display(),
                cache.display(),
                modes[round % modes.len()]
            ))
    });
    eprintln!(
        "{} rounds, {} writes acknowledged, {} flushes, {} blocks checked",
        report.rounds, report.writes_acknowledged, report.flushes, report.blocks_checked
    );
    assert!(
        report.problems.is_empty(),
        "problems:\n{}",
        report.problems.join("\n")
    );
    assert_eq!(report.rounds, 50);
    assert!(
        report.flushes > 50,
        "too few flushes to mean anything: {}",
        report.flushes
    );
}
