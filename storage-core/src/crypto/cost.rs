//! How costly a new keyslot's key derivation is, as cryptsetup chooses it from
//! `--iter-time`: PBKDF2-SHA256 iterations for LUKS1 keyslots, Argon2id for LUKS2 ones
//! (cryptsetup's default there): up to 1 GiB of memory (at most half of this machine's),
//! up to 4 lanes (at most its CPUs), at least 4 passes, measured on this machine; never
//! more memory than half of what is available to this process.

use super::KEY_BYTES;

/// Argon2id's costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Cost {
    /// Passes over the memory.
    pub time: u32,
    pub memory_kib: u32,
    pub cpus: u32,
}

/// A new keyslot's key derivation, by LUKS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyslotCost {
    /// LUKS1 (and qcow2's LUKS1).
    pub pbkdf2_iterations: u32,
    /// LUKS2.
    pub argon2: Argon2Cost,
}

/// cryptsetup's ceilings and floors.
const MAX_MEMORY_KIB: u64 = 1 << 20;
const MIN_MEMORY_KIB: u64 = 1 << 10;
const MIN_TIME: u32 = 4;
const MAX_CPUS: u32 = 4;

impl KeyslotCost {
    /// What takes about `millis` here, for either version (measured now: about 50 ms).
    pub fn for_time(millis: u64) -> KeyslotCost {
        KeyslotCost {
            pbkdf2_iterations: super::luks1::iterations_for(millis),
            argon2: argon2_for(millis),
        }
    }

    /// The least cryptsetup accepts (tests, where time matters more than strength).
    pub const fn minimal() -> KeyslotCost {
        KeyslotCost {
            pbkdf2_iterations: 1000,
            argon2: Argon2Cost {
                time: MIN_TIME,
                memory_kib: MIN_MEMORY_KIB as u32,
                cpus: 1,
            },
        }
    }
}

/// The memory a key derivation may take here, in KiB: half of what is available now, and
/// of the cgroup's limit if there is one (a daemon's unit may be given less than the
/// machine has).
fn available_kib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(MAX_MEMORY_KIB * 2);
    // cgroup v2: this process's group's memory.max ("max": none).
    let limit = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        })
        .and_then(|group| {
            std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", group.trim())).ok()
        })
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(u64::MAX, |bytes| bytes / 1024);
    available.min(limit) / 2
}

/// Argon2id costs that take about `millis` here.
fn argon2_for(millis: u64) -> Argon2Cost {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .clamp(1, MAX_CPUS);
    // One pass over 32 MiB: how many KiB a pass fills per millisecond.
    let trial_kib = 32 << 10;
    let start = std::time::Instant::now();
    let params = argon2::Params::new(trial_kib, 1, cpus, Some(KEY_BYTES)).expect("valid");
    let mut out = [0u8; KEY_BYTES];
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password_into(b"benchmark", &[0u8; 32], &mut out)
        .expect("valid");
    let per_ms = f64::from(trial_kib) / (start.elapsed().as_secs_f64() * 1000.0).max(1e-3);
    fit(per_ms, millis, available_kib(), cpus)
}

/// The costs of `millis` of Argon2id at `per_ms` KiB-passes per millisecond, within
/// `available` KiB: the least passes over as much memory as the time allows (up to 1 GiB),
/// then more passes; never past what our reader opens (see `luks2`).
fn fit(per_ms: f64, millis: u64, available: u64, cpus: u32) -> Argon2Cost {
    let budget = per_ms * millis as f64;
    let max = MAX_MEMORY_KIB.min(available).max(MIN_MEMORY_KIB);
    let memory = ((budget / f64::from(MIN_TIME)) as u64).clamp(MIN_MEMORY_KIB, max);
    let most = (super::luks2::MAX_ARGON2_WORK / memory)
        .min(u64::from(super::luks2::MAX_ARGON2_TIME))
        .max(u64::from(MIN_TIME));
    let time = ((budget / memory as f64) as u64).clamp(u64::from(MIN_TIME), most) as u32;
    Argon2Cost {
        time,
        memory_kib: memory as u32,
        cpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_time_buys_more_memory_then_more_passes() {
        let gib = 1 << 20;
        // 1 GiB-pass a second.
        let rate = gib as f64 / 1000.0;
        let quick = fit(rate, 1, 16 * gib, 4);
        assert_eq!(
            (quick.time, u64::from(quick.memory_kib)),
            (MIN_TIME, MIN_MEMORY_KIB)
        );
        let mid = fit(rate, 1000, 16 * gib, 4);
        assert_eq!((mid.time, mid.memory_kib), (MIN_TIME, gib as u32 / 4));
        let slow = fit(rate, 8000, 16 * gib, 4);
        assert_eq!((slow.time, slow.memory_kib), (8, gib as u32));
        // Little memory available: more passes instead.
        let tight = fit(rate, 8000, 64 << 10, 4);
        assert_eq!(tight.memory_kib, 64 << 10);
        assert!(tight.time > 8, "{tight:?}");
        // Never more work than our reader takes.
        let huge = fit(rate * 1000.0, 1_000_000, 16 * gib, 4);
        assert!(
            u64::from(huge.time) * u64::from(huge.memory_kib)
                <= super::super::luks2::MAX_ARGON2_WORK,
            "{huge:?}"
        );
        // What this machine measures stays inside the bounds.
        let here = argon2_for(10);
        assert!(here.time >= MIN_TIME && u64::from(here.memory_kib) <= MAX_MEMORY_KIB);
    }
}
