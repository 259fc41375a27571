//! Tests every policy against the [`CachePolicy`] contract, plus each policy's own ordering
//! rules and synthetic workloads where the default policy must beat LRU. Workloads come from
//! a seeded generator in this file: no trace files, no randomness between runs.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::policy::{AccessHint, BlockId, CachePolicy, NoVictim};
use super::{by_name, DEFAULT_POLICY, POLICY_NAMES};

fn policy(name: &str, capacity: usize) -> Box<dyn CachePolicy> {
    by_name(name, capacity).expect("known policy")
}

/// One reference the way the tier (and `cache-replay`) makes it, as a one-block read; returns
/// whether it hit.
fn access(p: &mut dyn CachePolicy, block: BlockId) -> bool {
    access_with(p, block, AccessHint::default())
}

/// One reference by a request described by `hint`; returns whether it hit.
fn access_with(p: &mut dyn CachePolicy, block: BlockId, hint: AccessHint) -> bool {
    if p.contains(block) {
        p.touch(block, hint);
        true
    } else {
        if p.should_admit(block, hint) {
            p.insert(block, &mut |_| true)
                .expect("everything evictable");
        }
        false
    }
}

/// splitmix64: small and seeded, so workloads are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(`s`) over `n` items by inverse CDF; item ids are scattered so that rank is not
/// block order.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for k in 1..=n {
            sum += 1.0 / (k as f64).powf(s);
            cdf.push(sum);
        }
        cdf.iter_mut().for_each(|c| *c /= sum);
        Self { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> BlockId {
        let u = rng.unit();
        let rank = self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1) as u64;
        rank.wrapping_mul(0x9E37_79B9) % 1_000_003
    }
}

fn hit_ratio(name: &str, capacity: usize, refs: &[BlockId]) -> f64 {
    let mut p = policy(name, capacity);
    let hits = refs.iter().filter(|&&b| access(p.as_mut(), b)).count();
    assert!(p.len() <= capacity);
    hits as f64 / refs.len() as f64
}

#[test]
fn names_round_trip() {
    assert!(POLICY_NAMES.contains(&DEFAULT_POLICY));
    for &name in POLICY_NAMES {
        let p = policy(name, 10);
        assert_eq!(p.name(), name);
        assert_eq!(p.capacity(), 10);
        assert!(p.is_empty());
    }
    assert!(by_name("nope", 10).is_none());
}

#[test]
fn lru_evicts_least_recently_used() {
    let mut p = policy("lru", 3);
    for b in 1..=3 {
        access(p.as_mut(), b);
    }
    access(p.as_mut(), 1); // 2 is now the oldest.
    assert_eq!(p.insert(4, &mut |_| true), Ok(Some(2)));
    assert_eq!(p.insert(5, &mut |_| true), Ok(Some(3)));
    assert_eq!(p.insert(6, &mut |_| true), Ok(Some(1)));
    assert!(p.contains(4) && p.contains(5) && p.contains(6));
}

#[test]
fn s3fifo_promotes_hit_blocks_and_remembers_ghosts() {
    // 10 slots: small holds 1, main 9.
    let mut p = policy("s3fifo", 10);
    for b in 0..10 {
        access(p.as_mut(), b);
    }
    // Cold fill: block 0 went to small, the rest overflowed into main (as in libCacheSim).
    // A one-time block passes through small and is evicted first, to ghost.
    assert_eq!(p.insert(100, &mut |_| true), Ok(Some(0)));
    assert_eq!(p.insert(101, &mut |_| true), Ok(Some(100)));
    // 101 is hit while in small: on eviction it moves to main instead of leaving.
    p.touch(101, AccessHint::default());
    let evicted = p.insert(102, &mut |_| true).unwrap().unwrap();
    assert_ne!(evicted, 101);
    assert!(p.contains(101));
    // 100 returns while in ghost: it goes straight to main, so a burst of new one-time
    // blocks through small does not evict it.
    access(p.as_mut(), 100);
    for b in 200..205 {
        access(p.as_mut(), b);
        assert!(
            p.contains(100),
            "ghost-returned block evicted by new block {b}"
        );
    }
    assert!(p.len() <= 10);
}

#[test]
fn lirs_keeps_low_irr_blocks_through_a_scan() {
    let mut p = policy("lirs", 100);
    // Hot blocks referenced twice get LIR status.
    for _ in 0..2 {
        for b in 0..50 {
            access(p.as_mut(), b);
        }
    }
    for b in 1000..11_000 {
        access(p.as_mut(), b);
    }
    let kept = (0..50).filter(|&b| p.contains(b)).count();
    assert_eq!(kept, 50, "a one-time scan displaced hot LIR blocks");
}

#[test]
fn access_hint_constructors() {
    assert_eq!(AccessHint::default(), AccessHint::read(1));
    assert_eq!(
        AccessHint::write(17),
        AccessHint {
            write: true,
            request_blocks: 17
        }
    );
    assert_eq!(
        AccessHint::read(0).request_blocks,
        1,
        "a request covers a block"
    );
    assert_eq!(AccessHint::read(u64::MAX).request_blocks, u32::MAX);
}

/// A 100-slot LIRS (99 LIR, 1 HIR) whose LIR set is blocks 0..99 (0 at the bottom of S) and
/// whose one HIR slot holds block 500, fresh at the top of S.
fn lirs_with_hir_500(name: &str) -> Box<dyn CachePolicy> {
    let mut p = policy(name, 100);
    for b in 0..100 {
        access(p.as_mut(), b);
    }
    assert!(!access(p.as_mut(), 500));
    assert!(p.contains(500) && p.contains(0));
    p
}

#[test]
fn lirs_hint_large_read_hits_do_not_promote() {
    let large_read = AccessHint::read(16);
    // The paper's LIRS: any hit on an HIR block in S makes it LIR; the bottom LIR block (0)
    // is demoted and is the next victim.
    let mut p = lirs_with_hir_500("lirs");
    p.touch(500, large_read);
    assert_eq!(p.insert(600, &mut |_| true), Ok(Some(0)));
    // lirs-hint: a large read's hit is a correlated reference; 500 stays HIR and goes first.
    let mut p = lirs_with_hir_500("lirs-hint");
    p.touch(500, large_read);
    assert_eq!(p.insert(600, &mut |_| true), Ok(Some(500)));
    // Writes and small reads (and reads just under the threshold) keep the paper's rule.
    for hint in [
        AccessHint::write(16),
        AccessHint::read(1),
        AccessHint::read(15),
    ] {
        let mut p = lirs_with_hir_500("lirs-hint");
        p.touch(500, hint);
        assert_eq!(p.insert(600, &mut |_| true), Ok(Some(0)), "{hint:?}");
    }
    // A block that a large read misses on while it is a ghost in S is still promoted.
    let mut p = lirs_with_hir_500("lirs-hint");
    assert_eq!(p.insert(600, &mut |_| true), Ok(Some(500)));
    assert!(!access_with(p.as_mut(), 500, large_read));
    // 500 became LIR, demoting the bottom LIR block (0), which goes next.
    assert_eq!(p.insert(700, &mut |_| true), Ok(Some(0)));
    assert!(p.contains(500));
}

#[test]
fn eviction_honours_pins() {
    for &name in POLICY_NAMES {
        let mut p = policy(name, 8);
        for b in 0..8 {
            access(p.as_mut(), b);
        }
        // All pinned: nothing changes.
        assert_eq!(p.insert(100, &mut |_| false), Err(NoVictim), "{name}");
        assert_eq!(p.len(), 8, "{name}");
        assert!((0..8).all(|b| p.contains(b)), "{name}");
        assert!(!p.contains(100), "{name}");
        // Only block 5 evictable: it is the victim, whatever the policy prefers.
        assert_eq!(p.insert(100, &mut |b| b == 5), Ok(Some(5)), "{name}");
        assert!(p.contains(100) && !p.contains(5), "{name}");
        assert_eq!(p.len(), 8, "{name}");
    }
}

#[test]
fn remove_drops_resident_blocks() {
    for &name in POLICY_NAMES {
        let mut p = policy(name, 4);
        for b in 0..4 {
            access(p.as_mut(), b);
        }
        p.remove(2);
        p.remove(99); // Not resident: no effect.
        assert!(!p.contains(2), "{name}");
        assert_eq!(p.len(), 3, "{name}");
        // The freed slot is used without evicting.
        assert_eq!(p.insert(7, &mut |_| true), Ok(None), "{name}");
        assert_eq!(p.len(), 4, "{name}");
    }
}

#[test]
fn zero_capacity_caches_nothing() {
    for &name in POLICY_NAMES {
        let mut p = policy(name, 0);
        assert_eq!(p.insert(1, &mut |_| true), Err(NoVictim), "{name}");
        assert!(!p.contains(1) && p.is_empty(), "{name}");
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Reference a block by a request described by the hint (hit: touch; miss: should_admit
    /// then insert with `pinned` mask).
    Access(BlockId, u8, AccessHint),
    Remove(BlockId),
}

fn op() -> impl Strategy<Value = Op> {
    let hint = (any::<bool>(), 1..40u64).prop_map(|(w, n)| AccessHint::new(w, n));
    prop_oneof![
        8 => (0..64u64, any::<u8>(), hint).prop_map(|(b, pins, h)| Op::Access(b, pins, h)),
        1 => (0..64u64).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn residency_matches_model(cap in 1usize..20, ops in prop::collection::vec(op(), 1..400)) {
        for &name in POLICY_NAMES {
            let mut p = policy(name, cap);
            let mut model = BTreeSet::new();
            for op in &ops {
                match *op {
                    Op::Access(b, pins, hint) => {
                        if p.contains(b) {
                            p.touch(b, hint);
                        } else if p.should_admit(b, hint) {
                            // Blocks whose low bits are set in `pins` are pinned.
                            let mut evictable = |v: BlockId| pins & (1 << (v % 8)) == 0;
                            let any_free = model.iter().any(|&v| evictable(v));
                            match p.insert(b, &mut evictable) {
                                Ok(victim) => {
                                    if let Some(v) = victim {
                                        prop_assert!(model.remove(&v), "{name}: evicted {v} not resident");
                                        prop_assert!(evictable(v), "{name}: evicted pinned {v}");
                                    } else {
                                        prop_assert!(model.len() < cap, "{name}: full but no victim");
                                    }
                                    model.insert(b);
                                }
                                Err(NoVictim) => {
                                    prop_assert!(model.len() >= cap && !any_free, "{name}: spurious NoVictim");
                                }
                            }
                        }
                    }
                    Op::Remove(b) => {
                        p.remove(b);
                        model.remove(&b);
                    }
                }
                prop_assert!(p.len() <= cap, "{name}: len {} > cap {cap}", p.len());
                prop_assert_eq!(p.len(), model.len(), "{}", name);
                for b in 0..64 {
                    prop_assert_eq!(p.contains(b), model.contains(&b), "{}: block {}", name, b);
                }
            }
        }
    }
    /// The tier hands a batch's hits to `touch_many` after the batch (the blocks stay pinned
    /// until then): that must leave every policy exactly as touching them one by one would.
    #[test]
    fn touch_many_is_touch_one_by_one(
        cap in 1usize..20,
        ops in prop::collection::vec(op(), 1..400),
        batch in 1usize..10,
    ) {
        for &name in POLICY_NAMES {
            let (mut one, mut many) = (policy(name, cap), policy(name, cap));
            for chunk in ops.chunks(batch) {
                let mut hits = Vec::new();
                for op in chunk {
                    match *op {
                        Op::Access(b, _, hint) if one.contains(b) => hits.push((b, hint)),
                        Op::Access(b, _, hint) => {
                            let admit = one.should_admit(b, hint);
                            prop_assert_eq!(admit, many.should_admit(b, hint), "{}", name);
                            if admit {
                                let mut pinned = |v: BlockId| !hits.iter().any(|h| h.0 == v);
                                let a = one.insert(b, &mut pinned);
                                prop_assert_eq!(a, many.insert(b, &mut pinned), "{}", name);
                            }
                        }
                        Op::Remove(b) => {
                            one.remove(b);
                            many.remove(b);
                        }
                    }
                }
                for &(b, hint) in &hits {
                    if one.contains(b) {
                        one.touch(b, hint);
                    }
                }
                many.touch_many(&hits);
                prop_assert_eq!(one.len(), many.len(), "{}", name);
                for b in 0..64 {
                    prop_assert_eq!(one.contains(b), many.contains(b), "{}: block {}", name, b);
                }
            }
        }
    }
}

#[test]
fn default_beats_lru_on_zipf() {
    let zipf = Zipf::new(20_000, 0.99);
    let mut rng = Rng(42);
    let refs: Vec<BlockId> = (0..300_000).map(|_| zipf.sample(&mut rng)).collect();
    let lru = hit_ratio("lru", 1_000, &refs);
    let default = hit_ratio(DEFAULT_POLICY, 1_000, &refs);
    assert!(
        default > lru + 0.02,
        "zipf: {DEFAULT_POLICY} hit ratio {default:.3} vs lru {lru:.3}"
    );
}

#[test]
fn default_resists_scans_better_than_lru() {
    // A hot Zipf set that fits comfortably, interrupted by one-time sequential scans longer
    // than the cache (a backup or a VM booting from a cold image).
    let zipf = Zipf::new(2_000, 0.99);
    let mut rng = Rng(7);
    let mut refs = Vec::new();
    let mut next_scan: BlockId = 10_000_000;
    for _ in 0..30 {
        refs.extend((0..5_000).map(|_| zipf.sample(&mut rng)));
        refs.extend(next_scan..next_scan + 3_000);
        next_scan += 3_000;
    }
    let lru = hit_ratio("lru", 1_000, &refs);
    let default = hit_ratio(DEFAULT_POLICY, 1_000, &refs);
    assert!(
        default > lru + 0.05,
        "scan mix: {DEFAULT_POLICY} hit ratio {default:.3} vs lru {lru:.3}"
    );
}

fn hit_ratio_hinted(name: &str, capacity: usize, refs: &[(BlockId, AccessHint)]) -> f64 {
    let mut p = policy(name, capacity);
    let hits = refs
        .iter()
        .filter(|&&(b, h)| access_with(p.as_mut(), b, h))
        .count();
    assert!(p.len() <= capacity);
    hits as f64 / refs.len() as f64
}

#[test]
fn default_resists_unaligned_streams() {
    // A hot Zipf set of small reads and writes, interleaved with one-time streams of 64 KiB
    // reads that are not block-aligned: each request covers 17 blocks and shares its first
    // with the previous request's last (what a block cache sees of a guest reading a file).
    // The paper's LIRS takes every shared block's second reference as a short IRR and makes
    // it LIR, at the expense of the hot set; the default must not.
    let zipf = Zipf::new(2_000, 0.99);
    let mut rng = Rng(11);
    let mut refs = Vec::new();
    let mut next_stream: BlockId = 10_000_000;
    for _ in 0..30 {
        for _ in 0..5_000 {
            let hint = AccessHint::new(rng.next().is_multiple_of(3), 1 + rng.next() % 2);
            refs.push((zipf.sample(&mut rng), hint));
        }
        for _ in 0..200 {
            refs.extend((next_stream..next_stream + 17).map(|b| (b, AccessHint::read(17))));
            next_stream += 16;
        }
        next_stream += 1_000;
    }
    let lru = hit_ratio_hinted("lru", 1_000, &refs);
    let lirs = hit_ratio_hinted("lirs", 1_000, &refs);
    let default = hit_ratio_hinted(DEFAULT_POLICY, 1_000, &refs);
    assert!(
        default > lru + 0.05 && default > lirs + 0.01,
        "unaligned streams: {DEFAULT_POLICY} hit ratio {default:.3} vs lru {lru:.3}, lirs {lirs:.3}"
    );
}

#[test]
fn default_learns_a_hot_set_read_only_by_large_reads() {
    // The large-read rule must not blind the default to reuse: the same Zipf workload as
    // `default_beats_lru_on_zipf`, every reference from a large read.
    let zipf = Zipf::new(20_000, 0.99);
    let mut rng = Rng(42);
    let refs: Vec<(BlockId, AccessHint)> = (0..300_000)
        .map(|_| (zipf.sample(&mut rng), AccessHint::read(32)))
        .collect();
    let lru = hit_ratio_hinted("lru", 1_000, &refs);
    let default = hit_ratio_hinted(DEFAULT_POLICY, 1_000, &refs);
    assert!(
        default > lru + 0.02,
        "zipf by large reads: {DEFAULT_POLICY} hit ratio {default:.3} vs lru {lru:.3}"
    );
}
