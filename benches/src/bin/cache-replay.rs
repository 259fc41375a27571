//! `cache-replay`: runs storage-core's cache policies (the code the daemon runs) over a block
//! I/O trace and reports their miss ratios, one JSON line per policy on stdout.
//!
//! Trace format: CSV with the header `version,time,op,size,lbn` (the CloudPhysics trace in
//! libCacheSim's test data): `size` in bytes, `lbn` in 512-byte sectors; `op` the SCSI opcode
//! in hex (`28`/`88`/`a8` reads, `2a`/`8a`/`aa` writes; other opcodes must have size 0).
//!
//! Block model: a request covers the cache blocks `lbn*512/B .. ceil((lbn*512+size)/B)` for a
//! block size `B` (`--block-kib`, 4 KiB by default); every block is one reference, reads and
//! writes alike. A reference to a resident block is a hit (`touch`); otherwise it is a miss,
//! and the block is inserted if `should_admit` agrees, with every block evictable. Each
//! reference carries the [`AccessHint`] the tier gives the policy for that request (read or
//! write, blocks covered), so hint-aware policies run exactly as in the daemon.
//!
//! `--opt` adds Belady's offline optimum under the same model (with bypass: a missed block is
//! not cached when it is next used later than every resident block), for reference.
//!
//! Timing (ns per reference, policy work only) goes to stderr, so stdout stays JSON.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde_json::json;
use storage_core::cache::{self, AccessHint, BlockId, CachePolicy};

#[derive(Parser, Debug)]
#[command(
    name = "cache-replay",
    about = "Replay a block I/O trace through Strata's cache policies; one JSON line per policy"
)]
struct Args {
    /// Trace file (CSV: version,time,op,size,lbn).
    #[arg(long)]
    trace: PathBuf,
    /// Policy name, or `all` for every policy (default: the daemon's default policy).
    #[arg(long)]
    policy: Option<String>,
    /// Cache size in MiB; a comma-separated list runs each size.
    #[arg(long, value_delimiter = ',', required = true)]
    cache_mib: Vec<u64>,
    /// Cache block size in KiB.
    #[arg(long, default_value_t = 4)]
    block_kib: u64,
    /// Also print Belady's offline optimum (policy "opt").
    #[arg(long)]
    opt: bool,
}

#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("{0}")]
    Usage(String),
    #[error("unknown policy {0:?} (known: all, {known})", known = cache::POLICY_NAMES.join(", "))]
    UnknownPolicy(String),
    #[error("--block-kib {0}: must be a power of two between 1 and 1048576")]
    BlockKib(u64),
    #[error("--cache-mib {0}: must be at least one block")]
    CacheMib(u64),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {what}")]
    Parse {
        path: String,
        line: usize,
        what: String,
    },
}

/// One reference per cache block touched, in trace order, with its request's hint.
fn load_references(
    path: &Path,
    block_bytes: u64,
) -> Result<Vec<(BlockId, AccessHint)>, ReplayError> {
    let shown = path.display().to_string();
    let io = |source| ReplayError::Io {
        path: shown.clone(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io)?);
    let mut refs = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        let line = line.trim();
        let parse_err = |what: String| ReplayError::Parse {
            path: shown.clone(),
            line: n + 1,
            what,
        };
        if line.is_empty() || (n == 0 && line.starts_with("version")) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != 5 {
            return Err(parse_err(format!(
                "expected 5 fields, got {}",
                fields.len()
            )));
        }
        let num = |i: usize, name: &str| -> Result<u64, ReplayError> {
            fields[i]
                .trim()
                .parse::<u64>()
                .map_err(|e| parse_err(format!("{name} {:?}: {e}", fields[i])))
        };
        let size = num(3, "size")?;
        let write = match fields[2].trim().to_ascii_lowercase().as_str() {
            "28" | "88" | "a8" => false,
            "2a" | "8a" | "aa" => true,
            _ if size == 0 => continue,
            op => return Err(parse_err(format!("op {op:?}: not a read or write"))),
        };
        let lbn = num(4, "lbn")?;
        let start = lbn
            .checked_mul(512)
            .and_then(|s| s.checked_add(size).map(|end| (s, end)))
            .ok_or_else(|| parse_err("lbn/size overflow".into()))?;
        let (first, end) = (start.0 / block_bytes, start.1.div_ceil(block_bytes));
        let hint = AccessHint::new(write, end - first);
        refs.extend((first..end).map(|b| (b, hint)));
    }
    Ok(refs)
}

/// Misses of `policy` over `refs`, and the time spent in it.
fn replay(
    policy: &mut dyn CachePolicy,
    refs: &[(BlockId, AccessHint)],
) -> (u64, std::time::Duration) {
    let mut misses = 0u64;
    let started = Instant::now();
    for &(block, hint) in refs {
        if policy.contains(block) {
            policy.touch(block, hint);
        } else {
            misses += 1;
            if policy.should_admit(block, hint) {
                // Every block is evictable in the replay, so insert cannot fail.
                let _ = policy.insert(block, &mut |_| true);
            }
        }
    }
    (misses, started.elapsed())
}

/// Belady's MIN with bypass over unit-size blocks: misses of the offline optimum.
fn belady(refs: &[BlockId], capacity: usize) -> u64 {
    // next[i]: index of the next reference to refs[i], or usize::MAX.
    let mut next = vec![usize::MAX; refs.len()];
    let mut seen: HashMap<BlockId, usize> = HashMap::with_capacity(refs.len() / 2);
    for (i, &b) in refs.iter().enumerate().rev() {
        if let Some(j) = seen.insert(b, i) {
            next[i] = j;
        }
    }
    drop(seen);
    let mut by_next: BTreeSet<(usize, BlockId)> = BTreeSet::new();
    let mut resident: HashMap<BlockId, usize> = HashMap::with_capacity(capacity);
    let mut misses = 0u64;
    for (i, &b) in refs.iter().enumerate() {
        if let Some(n) = resident.get_mut(&b) {
            by_next.remove(&(*n, b));
            *n = next[i];
            by_next.insert((next[i], b));
            continue;
        }
        misses += 1;
        if capacity == 0 {
            continue;
        }
        if resident.len() >= capacity {
            let &(far, victim) = by_next.last().expect("full cache");
            if far <= next[i] {
                continue; // Bypass: every resident block is needed sooner.
            }
            by_next.pop_last();
            resident.remove(&victim);
        }
        resident.insert(b, next[i]);
        by_next.insert((next[i], b));
    }
    misses
}

fn print_line(policy: &str, cache_mib: u64, references: usize, misses: u64) {
    let ratio = if references == 0 {
        0.0
    } else {
        misses as f64 / references as f64
    };
    println!(
        "{}",
        json!({
            "policy": policy,
            "cache_mib": cache_mib,
            "references": references,
            "misses": misses,
            "miss_ratio": ratio,
        })
    );
}

fn parse_args() -> Result<Option<Args>, ReplayError> {
    match Args::try_parse() {
        Ok(args) => Ok(Some(args)),
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(e.kind(), DisplayHelp | DisplayVersion) {
                print!("{e}");
                return Ok(None);
            }
            // One line: clap's message up to its usage hint, without "error: ".
            let text = e.to_string();
            let line = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            Err(ReplayError::Usage(
                line.trim_start_matches("error: ").to_string(),
            ))
        }
    }
}

fn run() -> Result<(), ReplayError> {
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    if !(1..=1 << 20).contains(&args.block_kib) || !args.block_kib.is_power_of_two() {
        return Err(ReplayError::BlockKib(args.block_kib));
    }
    let policies: Vec<&str> = match args.policy.as_deref() {
        None => vec![cache::DEFAULT_POLICY],
        Some("all") => cache::POLICY_NAMES.to_vec(),
        Some(p) if cache::POLICY_NAMES.contains(&p) => vec![p],
        Some(p) if p.contains(',') => p.split(',').collect(),
        Some(p) => return Err(ReplayError::UnknownPolicy(p.to_string())),
    };
    let capacities = args
        .cache_mib
        .iter()
        .map(|&mib| {
            let blocks = mib.saturating_mul(1024) / args.block_kib;
            if blocks == 0 {
                Err(ReplayError::CacheMib(mib))
            } else {
                Ok((mib, blocks as usize))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs = load_references(&args.trace, args.block_kib * 1024)?;
    for &(mib, blocks) in &capacities {
        for &name in &policies {
            let Some(mut policy) = cache::by_name(name, blocks) else {
                return Err(ReplayError::UnknownPolicy(name.into()));
            };
            let (misses, took) = replay(policy.as_mut(), &refs);
            eprintln!(
                "cache-replay: {name} {mib} MiB: {:.1} ns/reference over {} references",
                took.as_nanos() as f64 / refs.len().max(1) as f64,
                refs.len()
            );
            print_line(name, mib, refs.len(), misses);
        }
        if args.opt {
            let blocks_only: Vec<BlockId> = refs.iter().map(|&(b, _)| b).collect();
            print_line("opt", mib, refs.len(), belady(&blocks_only, blocks));
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-replay: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(csv: &str) -> Result<Vec<(BlockId, AccessHint)>, ReplayError> {
        let path =
            std::env::temp_dir().join(format!("cache-replay-test-{}.csv", std::process::id()));
        std::fs::write(&path, csv).unwrap();
        let refs = load_references(&path, 4096);
        std::fs::remove_file(&path).unwrap();
        refs
    }

    #[test]
    fn references_carry_the_tier_hint() {
        // A 64 KiB read at sector 1 covers blocks 0..=16 (17 blocks); a 4 KiB write block 2.
        let refs =
            load("version,time,op,size,lbn\n1,0,28,65536,1\n1,1,2a,4096,16\n1,2,35,0,0\n").unwrap();
        assert_eq!(refs.len(), 18);
        assert!(refs[..17]
            .iter()
            .enumerate()
            .all(|(i, &(b, h))| b == i as u64 && h == AccessHint::read(17)));
        assert_eq!(refs[17], (2, AccessHint::write(1)));
        let err = load("version,time,op,size,lbn\n1,0,12,512,0\n").unwrap_err();
        assert!(err.to_string().contains("not a read or write"), "{err}");
    }
}
