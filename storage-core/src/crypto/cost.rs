//! How costly a new keyslot's key derivation is, as cryptsetup chooses it from
//! `--iter-time`: PBKDF2-SHA256 iterations for LUKS1 keyslots, Argon2id for LUKS2 ones
//! (cryptsetup's default there): up to 1 GiB of memory (at most half of this machine's),
//! up to 4 lanes (at most its CPUs), at least 4 passes, measured on this machine.

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
    /// LUKS1 (and a LUKS2 keyslot asked for PBKDF2).
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

/// This machine's memory, in KiB.
fn physical_kib() -> u64 {
    // SAFETY: sysconf has no memory preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64 / 1024
    } else {
        MAX_MEMORY_KIB * 2
    }
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
    let budget = per_ms * millis as f64;
    let max = MAX_MEMORY_KIB.min(physical_kib() / 2).max(MIN_MEMORY_KIB);
    // The least passes over as much memory as the time allows, then more passes.
    let memory = ((budget / f64::from(MIN_TIME)) as u64).clamp(MIN_MEMORY_KIB, max);
    // Within what we open (see `luks2`): a keyslot we make is one we can use.
    let most =
        (super::luks2::MAX_ARGON2_WORK / memory).min(u64::from(super::luks2::MAX_ARGON2_TIME));
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
        let quick = argon2_for(1);
        assert_eq!(quick.time, MIN_TIME);
        assert!(u64::from(quick.memory_kib) >= MIN_MEMORY_KIB);
        let slow = argon2_for(400);
        assert!(slow.memory_kib >= quick.memory_kib, "{quick:?} {slow:?}");
        assert!(u64::from(slow.memory_kib) <= MAX_MEMORY_KIB);
    }
}
