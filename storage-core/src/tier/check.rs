//! Checking a tier's cache device (`strata image check CACHE-FILE`), and repairing what can
//! be repaired without losing data. The cache opens as the tier opens it (the newest valid
//! superblock, its checkpointed slot table, the journal replayed), then:
//!
//! - a damaged spare superblock copy (a checkpoint cut short: the other copy is used) is a
//!   harmless finding, a "leak" in qemu-img's terms; a repair rewrites it;
//! - a slot table that fails its checksum is a corruption nothing repairs (the tier refuses
//!   such a cache; `cache-format=force` formats it again, and a write-back cache's
//!   unwritten blocks are lost);
//! - a slot that maps a block past the end of the capacity device (the tier refuses to
//!   open), or two slots that map one block, are corruptions; a repair frees the slot past
//!   the end (its block does not exist) and, of two slots, those the tier does not serve the
//!   block from (which holds the newer data is not recorded: the repair changes nothing a
//!   guest reads);
//! - a capacity device that is no longer the one the cache was made for (another file by
//!   its name, or another size) is a corruption nothing here repairs: the tier refuses it.
//!
//! A repair is written as the tier writes a checkpoint (table, sync, superblock, sync), so a
//! crash during it leaves the cache as before or as repaired.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;

use super::journal::Journal;
use super::layout::{Layout, SlotState, Superblock, MAGIC, PAGE};
use super::TierError;
use crate::check::{CheckReport, Repair};
use crate::error::{StorageError, StorageErrorKind};

/// Whether `path` starts as a cache device does (either superblock copy's magic).
pub fn looks_like_cache(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = File::open(path) else {
        return false;
    };
    (0..2).any(|copy| {
        let mut m = [0u8; 8];
        f.read_exact_at(&mut m, Layout::superblock_offset(copy))
            .is_ok()
            && &m == MAGIC
    })
}

/// What one pass found, and the slot table as it would be repaired.
struct Pass {
    report: CheckReport,
    journal: Option<Journal>,
    /// Superblock copies that are damaged (neither blank nor valid).
    damaged_copies: u64,
    /// The slot table as the tier loads it, and with every repairable corruption undone.
    states: Vec<SlotState>,
    repaired: Vec<SlotState>,
    repairable: u64,
}

/// Whether the capacity device the cache names is still the one it was made for (the tier
/// refuses it otherwise): checked where the name is an absolute file path.
fn owner_findings(owner: &super::layout::Owner, report: &mut CheckReport) {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(&owner.path);
    if !path.is_absolute() {
        report.messages.push(format!(
            "Note: the capacity device {:?} is not an absolute file path: not compared",
            owner.path
        ));
        return;
    }
    let Ok(m) = std::fs::metadata(path) else {
        report.messages.push(format!(
            "Note: the capacity device this cache was made for, {}, is gone",
            owner.path
        ));
        return;
    };
    // The size the tier sees: a qcow2 capacity's is its virtual size.
    let size = File::open(path)
        .and_then(|f| {
            use crate::qcow2::header::{MAGIC, OFF_SIZE};
            use std::os::unix::fs::FileExt;
            let mut head = [0u8; 8];
            match f.read_exact_at(&mut head[..4], 0) {
                Ok(()) if head[..4] == MAGIC.to_be_bytes() => f
                    .read_exact_at(&mut head, OFF_SIZE)
                    .map(|()| u64::from_be_bytes(head)),
                _ => crate::disk::device_size(&f, &m),
            }
        })
        .map(|s| s & !511);
    if (m.dev(), m.ino()) != (owner.dev, owner.ino) {
        report.corruptions += 1;
        report.messages.push(format!(
            "ERROR {} is no longer the capacity device this cache was made for (another file \
             by that name): the tier refuses the cache",
            owner.path
        ));
    } else if size.as_ref().is_ok_and(|s| *s != owner.size) {
        report.corruptions += 1;
        report.messages.push(format!(
            "ERROR {} has {} bytes, the cache was made for {}: the tier refuses the cache",
            owner.path,
            size.unwrap_or(0),
            owner.size
        ));
    }
}

fn pass(file: &File, path: &Path) -> Result<Pass, StorageError> {
    use std::os::unix::fs::FileExt;
    let io = |what: &str, e: io::Error| {
        StorageError::new(
            StorageErrorKind::Io,
            format!("{}: {what}: {e}", path.display()),
        )
    };
    let size = file
        .metadata()
        .and_then(|m| crate::disk::device_size(file, &m))
        .map_err(|e| io("reading its size", e))?;
    let mut report = CheckReport {
        format: "strata-cache",
        image_end_offset: size,
        ..CheckReport::default()
    };
    let mut damaged_copies = 0;
    for copy in 0..2u32 {
        let mut b = [0u8; PAGE as usize];
        file.read_exact_at(&mut b, Layout::superblock_offset(copy))
            .map_err(|e| io("reading a superblock", e))?;
        if b.iter().any(|&x| x != 0)
            && Superblock::decode(&b).is_none()
            && Superblock::other_version(&b).is_none()
        {
            damaged_copies += 1;
            report.messages.push(format!(
                "Leaked superblock copy {copy}: damaged (a checkpoint cut short); the other \
                 copy is used"
            ));
        }
    }
    let (journal, states) = match Journal::recover(file, size) {
        Ok((j, states, _)) => (j, states),
        Err(e @ (TierError::Damaged(_) | TierError::NotACache | TierError::OtherVersion(_))) => {
            // The tier refuses to open it; nothing here can make it whole.
            report.corruptions = 1;
            report.leaks = damaged_copies;
            let what = match e {
                TierError::NotACache => {
                    format!("no superblock copy is valid for this {size}-byte device")
                }
                e => e.to_string(),
            };
            report.messages.push(format!(
                "ERROR {what}: not repairable (cache-format=force formats the cache again; \
                 blocks not yet written back are lost)"
            ));
            return Ok(Pass {
                report,
                journal: None,
                damaged_copies,
                states: Vec::new(),
                repaired: Vec::new(),
                repairable: 0,
            });
        }
        Err(TierError::CacheIo(e)) => return Err(io("reading the metadata", e)),
        Err(e) => {
            return Err(StorageError::new(
                StorageErrorKind::InvalidImage,
                format!("{}: {e}", path.display()),
            ))
        }
    };
    report.leaks = damaged_copies;
    let layout = journal.layout;
    let blocks = journal.owner.size.div_ceil(layout.block_size);
    let mut repaired = states.clone();
    let mut repairable = 0;
    let mut by_block: HashMap<u64, Vec<usize>> = HashMap::new();
    for (slot, st) in states.iter().enumerate() {
        let (SlotState::Clean(b) | SlotState::Dirty(b)) = *st else {
            continue;
        };
        if b >= blocks {
            report.corruptions += 1;
            repairable += 1;
            repaired[slot] = SlotState::Free;
            report.messages.push(format!(
                "ERROR slot {slot} maps block {b}, past the end of the capacity device \
                 ({blocks} blocks of {} bytes)",
                layout.block_size
            ));
        } else {
            by_block.entry(b).or_default().push(slot);
        }
    }
    let mut shared: Vec<_> = by_block.into_iter().filter(|(_, s)| s.len() > 1).collect();
    shared.sort_unstable();
    for (b, slots) in shared {
        let dirty: Vec<usize> = slots
            .iter()
            .copied()
            .filter(|&s| matches!(states[s], SlotState::Dirty(_)))
            .collect();
        // Which holds the newer data is not recorded: the repair keeps the slot the tier
        // serves the block from (the highest, see `TierState::new`), so that it changes
        // nothing a guest reads.
        let keep = *slots.iter().max().expect("two or more");
        report.corruptions += 1;
        report.messages.push(format!(
            "ERROR block {b} is mapped by slots {slots:?} ({} of them dirty); the tier \
             serves it from slot {keep}",
            dirty.len()
        ));
        for s in slots.into_iter().filter(|&s| s != keep) {
            repaired[s] = SlotState::Free;
        }
        repairable += 1;
    }
    report.total_clusters = layout.slots;
    report.allocated_clusters = states.iter().filter(|s| **s != SlotState::Free).count() as u64;
    report.dirty_blocks = Some(
        states
            .iter()
            .filter(|s| matches!(s, SlotState::Dirty(_)))
            .count() as u64,
    );
    owner_findings(&journal.owner, &mut report);
    Ok(Pass {
        report,
        journal: Some(journal),
        damaged_copies,
        states,
        repaired,
        repairable,
    })
}

/// Checks the cache device at `path`, repairing as `repair` says (no daemon may have it
/// open when a repair writes).
pub fn check(path: &Path, repair: Repair) -> Result<CheckReport, StorageError> {
    let file = File::options()
        .read(true)
        .write(repair != Repair::None)
        .open(path)
        .map_err(|e| {
            StorageError::new(
                StorageErrorKind::Open,
                format!("{}: cannot open: {e}", path.display()),
            )
        })?;
    let _lock = if repair == Repair::None {
        None
    } else {
        // Held as the tier holds it until the repair is done: refused while a daemon
        // serves the cache, and none opens it meanwhile.
        crate::disk::lock::ImageLock::take(&file, path, false, crate::disk::lock::Locking::On)?
    };
    let before = pass(&file, path)?;
    let fix_corruptions = repair == Repair::All && before.repairable > 0;
    let fix_leaks = repair != Repair::None && before.damaged_copies > 0;
    let Some(mut journal) = before.journal.filter(|_| fix_corruptions || fix_leaks) else {
        return Ok(before.report);
    };
    // A checkpoint writes the table into the spare map region and the superblock into the
    // spare copy: the damaged one, if one is.
    let states = if fix_corruptions {
        before.repaired
    } else {
        before.states
    };
    journal.checkpoint(&file, &states).map_err(|e| {
        StorageError::new(
            StorageErrorKind::Io,
            format!("{}: writing the repaired slot table: {e}", path.display()),
        )
    })?;
    let after = pass(&file, path)?.report;
    Ok(CheckReport {
        corruptions_fixed: before.report.corruptions.saturating_sub(after.corruptions),
        leaks_fixed: before.report.leaks.saturating_sub(after.leaks),
        messages: before.report.messages,
        ..after
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::disk::{Disk, DiskOp, IoVecs};
    use crate::test_support::queue::{read, run};
    use crate::tier::CacheMode;

    const BS: u64 = 4096;
    /// The blocks written (and read back: reading more would evict them).
    const WRITTEN: u64 = 64 * BS;

    /// A write-back tier over a 4 MiB capacity file whose first 64 blocks were written
    /// (some may still be dirty), closed; returns its directory and what those
    /// blocks read.
    fn cache() -> (tempfile::TempDir, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cap.img"), vec![0u8; 4 << 20]).unwrap();
        let disk = open(dir.path()).unwrap();
        let mut q = disk.new_queue(8).unwrap();
        let data: Vec<u8> = (0..WRITTEN).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        let buffers = IoVecs::from_bytes(&data);
        assert_eq!(
            run(&mut q, DiskOp::Write { offset: 0, buffers }),
            data.len() as i32
        );
        assert_eq!(run(&mut q, DiskOp::Flush), 0);
        let contents = read(&mut q, 0, WRITTEN as usize);
        (dir, contents)
    }

    fn open(dir: &Path) -> Result<super::super::TieredDisk, StorageError> {
        super::super::tests::open_tier(dir, CacheMode::WriteBack, 1 << 20, false)
    }

    fn reads(dir: &Path) -> Vec<u8> {
        let disk = open(dir).unwrap();
        read(&mut disk.new_queue(8).unwrap(), 0, WRITTEN as usize)
    }

    /// Rewrites the slot table through a checkpoint, as damage that keeps its checksums.
    fn damage(path: &Path, change: impl FnOnce(&mut Vec<SlotState>)) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let (mut j, mut states, _) = Journal::recover(&f, f.metadata().unwrap().len()).unwrap();
        change(&mut states);
        j.checkpoint(&f, &states).unwrap();
    }

    fn resident(path: &Path) -> Vec<(usize, SlotState)> {
        let f = File::open(path).unwrap();
        let (_, states, _) = Journal::recover(&f, f.metadata().unwrap().len()).unwrap();
        states
            .into_iter()
            .enumerate()
            .filter(|(_, s)| *s != SlotState::Free)
            .collect()
    }

    #[test]
    fn a_cache_the_tier_wrote_is_clean_and_its_dirty_blocks_counted() {
        let (dir, _) = cache();
        let path = dir.path().join("cache.img");
        let r = crate::check::check_file(&path, Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks, r.check_errors), (0, 0, 0), "{r:?}");
        assert_eq!(r.format, "strata-cache");
        assert!(r.messages.is_empty(), "{r:?}");
        let slots = resident(&path);
        assert_eq!(r.allocated_clusters, slots.len() as u64);
        let dirty = slots
            .iter()
            .filter(|(_, s)| matches!(s, SlotState::Dirty(_)));
        assert_eq!(r.dirty_blocks, Some(dirty.count() as u64), "{r:?}");
        assert!(r.allocated_clusters >= 64, "{r:?}");
        assert_eq!(r.exit_code(), 0);
    }

    #[test]
    fn a_torn_spare_superblock_is_a_leak_that_a_repair_rewrites() {
        let (dir, contents) = cache();
        let path = dir.path().join("cache.img");
        let f = File::options().read(true).write(true).open(&path).unwrap();
        // The spare copy: the one with the lower generation (or blank).
        let generation = |copy| {
            let mut b = [0u8; PAGE as usize];
            f.read_exact_at(&mut b, Layout::superblock_offset(copy))
                .unwrap();
            Superblock::decode(&b).map_or(0, |s| s.generation)
        };
        let spare = if generation(0) < generation(1) { 0 } else { 1 };
        f.write_all_at(b"STRTIER1 torn", Layout::superblock_offset(spare))
            .unwrap();
        let r = check(&path, Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 1), "{r:?}");
        assert_eq!(r.exit_code(), 3);
        let r = check(&path, Repair::Leaks).unwrap();
        assert_eq!((r.leaks_fixed, r.leaks, r.corruptions), (1, 0, 0), "{r:?}");
        assert_eq!(reads(dir.path()), contents);
    }

    #[test]
    fn a_slot_past_the_capacity_device_is_freed_by_a_repair() {
        let (dir, contents) = cache();
        let path = dir.path().join("cache.img");
        damage(&path, |s| {
            let free = s
                .iter()
                .position(|s| *s == SlotState::Free)
                .expect("a free slot");
            s[free] = SlotState::Clean(1 << 40);
        });
        assert!(open(dir.path()).is_err(), "the tier opens a damaged cache");
        let r = check(&path, Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (1, 0), "{r:?}");
        assert!(r.messages[0].contains("past the end"), "{r:?}");
        // Leaks only: corruptions stay.
        assert_eq!(check(&path, Repair::Leaks).unwrap().corruptions, 1);
        let r = check(&path, Repair::All).unwrap();
        assert_eq!((r.corruptions_fixed, r.corruptions), (1, 0), "{r:?}");
        assert_eq!(reads(dir.path()), contents);
    }

    /// The tier serves a block that two slots claim from the higher one; a repair frees the
    /// other (clean or dirty), so what the disk reads does not change.
    #[test]
    fn two_slots_of_one_block_keep_the_one_the_tier_serves() {
        for stale in [SlotState::Clean, SlotState::Dirty] {
            let (dir, contents) = cache();
            let path = dir.path().join("cache.img");
            let slots = resident(&path);
            let slot_of = |block| {
                slots
                    .iter()
                    .find(|(_, s)| {
                        matches!(s, SlotState::Clean(b) | SlotState::Dirty(b) if *b == block)
                    })
                    .expect("written blocks are cached")
                    .0
            };
            // The lower of the slots of blocks 1 and 2 also claims the higher one's block
            // (it holds the other block's data).
            let (lo, hi) = (slot_of(1).min(slot_of(2)), slot_of(1).max(slot_of(2)));
            let block = if hi == slot_of(1) { 1 } else { 2 };
            damage(&path, |s| s[lo] = stale(block));
            let r = check(&path, Repair::None).unwrap();
            assert_eq!(r.corruptions, 1, "{r:?}");
            let r = check(&path, Repair::All).unwrap();
            assert_eq!((r.corruptions_fixed, r.corruptions), (1, 0), "{r:?}");
            let after = resident(&path);
            assert!(after.iter().any(|(i, _)| *i == hi), "{after:?}");
            assert!(!after.iter().any(|(i, _)| *i == lo), "{after:?}");
            let at = (block * BS) as usize..((block + 1) * BS) as usize;
            assert_eq!(reads(dir.path())[at.clone()], contents[at]);
        }
    }

    #[test]
    fn a_slot_table_failing_its_checksum_is_reported_and_left() {
        let (dir, _) = cache();
        let path = dir.path().join("cache.img");
        let f = File::options().read(true).write(true).open(&path).unwrap();
        let (j, _, _) = Journal::recover(&f, f.metadata().unwrap().len()).unwrap();
        let live = (0..2)
            .filter_map(|copy| {
                let mut b = [0u8; PAGE as usize];
                f.read_exact_at(&mut b, Layout::superblock_offset(copy))
                    .unwrap();
                Superblock::decode(&b)
            })
            .max_by_key(|s| s.generation)
            .unwrap();
        let at = j.layout.map_offset(live.map_region) + 9;
        f.write_all_at(&[0xff], at).unwrap();
        let before = std::fs::read(&path).unwrap();
        let r = check(&path, Repair::All).unwrap();
        assert_eq!((r.corruptions, r.corruptions_fixed), (1, 0), "{r:?}");
        assert_eq!(r.exit_code(), 2);
        assert!(r.messages[0].contains("not repairable"), "{r:?}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "an unrepairable cache was written"
        );
    }

    /// A cache in front of a qcow2 image: the capacity the tier saw is the image's virtual
    /// size, not its file's length.
    #[test]
    fn a_cache_over_a_qcow2_capacity_is_clean() {
        use crate::disk::AnyDisk;
        use crate::engine::EngineKind;
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("cap.qcow2");
        let opts = crate::qcow2::CreateOptions {
            size: 8 << 20,
            cluster_size: 65536,
            backing: None,
            encryption: None,
        };
        crate::qcow2::create(&image, &opts).unwrap();
        {
            let file = crate::disk::RawDisk::open(&image, false, false, EngineKind::Sync).unwrap();
            let backing = crate::qcow2::Backing::Without;
            let cap = crate::qcow2::Qcow2Disk::open(
                AnyDisk::Raw(file),
                &image,
                false,
                &backing,
                1 << 20,
                0,
                None,
            )
            .unwrap();
            let spec = super::super::TierSpec {
                cache: dir.path().join("cache.img"),
                cache_size: 1 << 20,
                mode: CacheMode::WriteBack,
                policy: None,
                block_size: BS,
                seq_cutoff: u64::MAX,
                force_format: false,
                locking: true,
            };
            let tier = super::super::TieredDisk::open(
                AnyDisk::Qcow2(Box::new(cap)),
                false,
                EngineKind::Sync,
                &spec,
            )
            .unwrap();
            let mut q = tier.new_queue(8).unwrap();
            let buffers = IoVecs::from_bytes(&[0x3c; 8192]);
            assert_eq!(run(&mut q, DiskOp::Write { offset: 0, buffers }), 8192);
            assert_eq!(run(&mut q, DiskOp::Flush), 0);
        }
        let r = check(&dir.path().join("cache.img"), Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), (0, 0), "{r:?}");
    }

    #[test]
    fn a_file_that_is_neither_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![7u8; 8192]).unwrap();
        let e = crate::check::check_file(&raw, Repair::None).unwrap_err();
        assert!(e.to_string().contains("disk.raw"), "{e}");
        assert!(e.to_string().contains("neither"), "{e}");
    }
}
