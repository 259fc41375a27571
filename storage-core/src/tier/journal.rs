//! Persistence of the slot table: formatting a cache device, appending journal blocks,
//! checkpointing the whole table into the inactive map region, and recovering after a clean
//! or unclean stop. All of it is synchronous I/O on the cache file, run by the tier's
//! background thread (and at open), never on a queue worker.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// What the journal reads and writes: the cache file itself at open, and the tier's
/// cache device (which tests record and fail on demand) on the journal thread.
pub trait Media {
    fn put(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn get(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes every write made so far durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
}

impl Media for File {
    fn put(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn get(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }
}

use super::layout::{
    crc32c, decode_journal_block, encode_journal_block, journal_block_crc, Chain, Layout, Owner,
    Record, SlotState, Superblock, MAP_ENTRY, PAGE, RECORDS_PER_BLOCK,
};
use super::TierError;

/// The journal writer's position and the live checkpoint.
pub struct Journal {
    pub layout: Layout,
    pub owner: Owner,
    format_id: u32,
    generation: u64,
    map_region: u32,
    checkpoint_seq: u64,
    /// Sequence number of the next journal block to write.
    next_seq: u64,
    /// Checksum of the last journal block of the log (or the checkpoint's chain start):
    /// the next block names it.
    last_crc: u32,
    /// The chain start stored with the live checkpoint.
    checkpoint_chain: u32,
    /// Stamped on the blocks this run writes (see `encode_journal_block`).
    writer: u32,
    /// The cache is being erased for reformatting after a failure; nothing else is written.
    retired: bool,
    /// That erase is durable.
    erased: bool,
}

fn map_bytes(layout: &Layout, states: &[SlotState]) -> Vec<u8> {
    let mut b = vec![0u8; (layout.map_pages * PAGE) as usize];
    for (i, st) in states.iter().enumerate() {
        let at = i * MAP_ENTRY as usize;
        b[at..at + MAP_ENTRY as usize].copy_from_slice(&st.encode());
    }
    b
}

impl Journal {
    /// Writes an empty cache format: every slot free.
    pub fn format(file: &impl Media, layout: Layout, owner: Owner) -> io::Result<Journal> {
        let format_id = nonce();
        let chain = nonce();
        let empty = map_bytes(&layout, &vec![SlotState::Free; layout.slots as usize]);
        file.put(&empty, layout.map_offset(0))?;
        let mut j = Journal {
            layout,
            owner,
            format_id,
            generation: 0,
            map_region: 1,
            checkpoint_seq: 0,
            next_seq: 1,
            last_crc: chain,
            checkpoint_chain: chain,
            writer: nonce(),
            retired: false,
            erased: false,
        };
        // Invalidate both superblock copies first, so a crash mid-format leaves no valid one.
        file.put(&[0u8; 2 * PAGE as usize], 0)?;
        j.commit_superblock(file, 0, crc32c(&empty), 0, chain)?;
        Ok(j)
    }

    /// Reads the live checkpoint and replays the journal of a cache device of
    /// `device_size` bytes. Returns the journal positioned after the last intact block, the
    /// slot states, and how many blocks were replayed. Damaged metadata is refused, never
    /// trusted for an offset or an allocation.
    pub fn recover(
        file: &impl Media,
        device_size: u64,
    ) -> Result<(Journal, Vec<SlotState>, u64), TierError> {
        let mut best: Option<Superblock> = None;
        let mut other_version = None;
        for copy in 0..2 {
            let mut b = [0u8; PAGE as usize];
            if file.get(&mut b, Layout::superblock_offset(copy)).is_err() {
                continue;
            }
            other_version = other_version.or(Superblock::other_version(&b));
            if let Some(sb) = Superblock::decode(&b) {
                if !sb.layout.valid_for(device_size) {
                    continue;
                }
                if best.as_ref().is_none_or(|x| sb.generation > x.generation) {
                    best = Some(sb);
                }
            }
        }
        let sb = match (best, other_version) {
            (Some(sb), _) => sb,
            (None, Some(v)) => return Err(TierError::OtherVersion(v)),
            (None, None) => return Err(TierError::NotACache),
        };
        let l = sb.layout;
        let mut map = vec![0u8; (l.map_pages * PAGE) as usize];
        file.get(&mut map, l.map_offset(sb.map_region))
            .map_err(TierError::CacheIo)?;
        if crc32c(&map) != sb.map_crc {
            return Err(TierError::Damaged(
                "the checkpointed slot table fails its checksum",
            ));
        }
        let mut states: Vec<SlotState> = (0..l.slots as usize)
            .map(|i| {
                SlotState::decode(&map[i * MAP_ENTRY as usize..(i + 1) * MAP_ENTRY as usize])
                    .unwrap_or(SlotState::Free)
            })
            .collect();
        let mut seq = sb.checkpoint_seq + 1;
        let mut prev = sb.chain;
        let mut replayed = 0;
        let mut b = [0u8; PAGE as usize];
        // Replay until the first block that is not the next one of this log (torn, never
        // written, from an earlier lap of the ring, or left past the point where an earlier
        // recovery stopped).
        while seq - sb.checkpoint_seq <= l.journal_blocks {
            if file.get(&mut b, l.journal_offset(seq)).is_err() {
                break;
            }
            let at = Chain {
                seq,
                format_id: sb.format_id,
                prev,
            };
            let Some(records) = decode_journal_block(&b, at) else {
                break;
            };
            prev = journal_block_crc(&b);
            for r in records {
                if let Some(s) = states.get_mut(r.slot as usize) {
                    *s = r.state;
                }
            }
            seq += 1;
            replayed += 1;
        }
        Ok((
            Journal {
                layout: l,
                owner: sb.owner,
                format_id: sb.format_id,
                generation: sb.generation,
                map_region: sb.map_region,
                checkpoint_seq: sb.checkpoint_seq,
                next_seq: seq,
                last_crc: prev,
                checkpoint_chain: sb.chain,
                writer: nonce(),
                retired: false,
                erased: false,
            },
            states,
            replayed,
        ))
    }

    /// Appends `records` as journal blocks (not synced).
    pub fn append(&mut self, file: &impl Media, records: &[Record]) -> io::Result<()> {
        for chunk in records.chunks(RECORDS_PER_BLOCK) {
            let at = Chain {
                seq: self.next_seq,
                format_id: self.format_id,
                prev: self.last_crc,
            };
            let b = encode_journal_block(at, self.writer, chunk);
            file.put(&b, self.layout.journal_offset(self.next_seq))?;
            self.next_seq += 1;
            self.last_crc = journal_block_crc(&b);
        }
        Ok(())
    }

    /// Erases both superblock copies, so that the next open finds no cache and formats the
    /// device afresh, and stops all further writes. For a cache that failed while its data
    /// was not needed (write-through, write-around): whatever it holds may be stale.
    /// Call it again until it succeeds: the erase may fail on a failing device.
    pub fn retire(&mut self, file: &impl Media) -> io::Result<()> {
        self.retired = true;
        file.put(&[0u8; 2 * PAGE as usize], 0)?;
        file.sync()?;
        self.erased = true;
        Ok(())
    }

    /// Nothing more is written but the erase (after [`retire`](Self::retire)).
    pub fn retired(&self) -> bool {
        self.retired
    }

    /// The erase of a retired cache is durable.
    pub fn erased(&self) -> bool {
        self.erased
    }

    /// Journal blocks that `records` would take.
    pub fn blocks_for(records: usize) -> u64 {
        records.div_ceil(RECORDS_PER_BLOCK) as u64
    }

    /// Whether the next append of `records` needs a checkpoint first (the ring would
    /// overwrite blocks the live checkpoint still depends on), or the ring is half used.
    pub fn wants_checkpoint(&self, records: usize) -> bool {
        let used = self.next_seq - 1 - self.checkpoint_seq;
        used + Self::blocks_for(records) > self.layout.journal_blocks / 2
    }

    /// Writes `states` (which must include every record appended so far) as the new
    /// checkpoint into the inactive map region, then switches the superblock to it. Syncs.
    pub fn checkpoint(&mut self, file: &impl Media, states: &[SlotState]) -> io::Result<()> {
        let region = 1 - self.map_region;
        let bytes = map_bytes(&self.layout, states);
        file.put(&bytes, self.layout.map_offset(region))?;
        file.sync()?;
        self.commit_superblock(
            file,
            region,
            crc32c(&bytes),
            self.next_seq - 1,
            self.last_crc,
        )
    }

    /// Writes the next superblock generation, naming the checkpoint in `region` (up to
    /// journal block `checkpoint_seq`, whose checksum is `chain`), into the copy the live
    /// one is not in; syncs. The journal's idea of its live checkpoint moves only once
    /// that is durable: until then the old checkpoint's journal blocks must stay.
    fn commit_superblock(
        &mut self,
        file: &impl Media,
        region: u32,
        map_crc: u32,
        checkpoint_seq: u64,
        chain: u32,
    ) -> io::Result<()> {
        let generation = self.generation + 1;
        let sb = Superblock {
            generation,
            format_id: self.format_id,
            layout: self.layout,
            owner: self.owner.clone(),
            map_region: region,
            checkpoint_seq,
            map_crc,
            chain,
        };
        let copy = (generation % 2) as u32;
        file.put(&sb.encode(), Layout::superblock_offset(copy))?;
        file.sync()?;
        self.generation = generation;
        self.map_region = region;
        self.checkpoint_seq = checkpoint_seq;
        self.checkpoint_chain = chain;
        Ok(())
    }
}

/// A random number (the kernel's), or the clock's and pid's bits where that fails.
fn nonce() -> u32 {
    let mut v = 0u32;
    // SAFETY: getrandom writes at most 4 bytes into `v`, which is 4 bytes long.
    let n = unsafe { libc::getrandom((&mut v as *mut u32).cast(), 4, libc::GRND_NONBLOCK) };
    if n == 4 {
        return v;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (t as u32) ^ (t >> 32) as u32 ^ std::process::id().rotate_left(16)
}

/// Recovery of a whole cache file (tests).
#[cfg(test)]
pub(super) fn recover_file(f: &File) -> Result<(Journal, Vec<SlotState>, u64), TierError> {
    Journal::recover(f, f.metadata().map_err(TierError::CacheIo)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            size: 1 << 30,
            dev: 1,
            ino: 2,
            path: "/cap.img".into(),
        }
    }

    fn cache(size: u64) -> (tempfile::NamedTempFile, Layout) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        (f, Layout::for_size(size, 4096).unwrap())
    }

    fn rec(slot: u32, state: SlotState) -> Record {
        Record { slot, state }
    }

    #[test]
    fn format_then_recover_is_all_free() {
        let (f, l) = cache(4 << 20);
        Journal::format(f.as_file(), l, owner()).unwrap();
        let (j, states, replayed) = recover_file(f.as_file()).unwrap();
        assert_eq!(j.owner, owner());
        assert_eq!(replayed, 0);
        assert!(states.iter().all(|s| *s == SlotState::Free));
    }

    #[test]
    fn journal_replays_in_order_and_checkpoints_survive() {
        let (f, l) = cache(4 << 20);
        let mut j = Journal::format(f.as_file(), l, owner()).unwrap();
        j.append(
            f.as_file(),
            &[rec(0, SlotState::Dirty(10)), rec(1, SlotState::Clean(11))],
        )
        .unwrap();
        j.append(
            f.as_file(),
            &[rec(0, SlotState::Clean(10)), rec(1, SlotState::Free)],
        )
        .unwrap();
        let (_, states, replayed) = recover_file(f.as_file()).unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(states[0], SlotState::Clean(10));
        assert_eq!(states[1], SlotState::Free);

        // A checkpoint folds the journal in; later records still replay on top.
        let mut snap = states.clone();
        snap[5] = SlotState::Dirty(99);
        j.checkpoint(f.as_file(), &snap).unwrap();
        j.append(f.as_file(), &[rec(6, SlotState::Clean(7))])
            .unwrap();
        let (_, states, replayed) = recover_file(f.as_file()).unwrap();
        assert_eq!(replayed, 1);
        assert_eq!(states[0], SlotState::Clean(10));
        assert_eq!(states[5], SlotState::Dirty(99));
        assert_eq!(states[6], SlotState::Clean(7));
    }

    /// Simulates a crash after every step of a sequence of journal appends and checkpoints
    /// (by copying the file at that point, and by tearing the block being written) and
    /// checks that recovery always yields exactly the state of a prefix of the steps.
    #[test]
    fn recovery_after_a_crash_at_every_step_is_a_consistent_prefix() {
        let (f, l) = cache(2 << 20);
        let mut j = Journal::format(f.as_file(), l, owner()).unwrap();
        let slots = l.slots as usize;
        let mut model = vec![SlotState::Free; slots];
        let mut history = vec![model.clone()];
        let mut images = vec![std::fs::read(f.path()).unwrap()];
        for step in 0..(l.journal_blocks * 3) {
            let batch: Vec<Record> = (0..(step % 5 + 1))
                .map(|k| {
                    let slot = ((step * 7 + k * 13) % slots as u64) as u32;
                    let state = match (step + k) % 3 {
                        0 => SlotState::Free,
                        1 => SlotState::Clean(step * 100 + k),
                        _ => SlotState::Dirty(step * 100 + k),
                    };
                    rec(slot, state)
                })
                .collect();
            if j.wants_checkpoint(batch.len()) {
                j.checkpoint(f.as_file(), &model).unwrap();
                images.push(std::fs::read(f.path()).unwrap());
                history.push(model.clone());
            }
            // A torn append: half of the new block written, either half. Recovery must give
            // the state before the append or, where the torn half happens to match the new
            // block, the state after it; never anything else.
            let before = std::fs::read(f.path()).unwrap();
            let off = l.journal_offset(j.next_seq) as usize;
            j.append(f.as_file(), &batch).unwrap();
            let after = std::fs::read(f.path()).unwrap();
            let mut next = model.clone();
            for r in &batch {
                next[r.slot as usize] = r.state;
            }
            for (lo, hi) in [(off, off + 2048), (off + 2048, off + PAGE as usize)] {
                let mut torn = before.clone();
                torn[lo..hi].copy_from_slice(&after[lo..hi]);
                let t = tempfile::NamedTempFile::new().unwrap();
                std::fs::write(t.path(), &torn).unwrap();
                let (_, got, _) = recover_file(t.as_file()).unwrap();
                let whole = torn == after;
                assert!(
                    &got == history.last().unwrap() || (whole && got == next),
                    "torn append at step {step}"
                );
            }

            for r in &batch {
                model[r.slot as usize] = r.state;
            }
            history.push(model.clone());
            images.push(after);
        }
        // Every saved image recovers to the state recorded right after it.
        for (i, img) in images.iter().enumerate() {
            let t = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(t.path(), img).unwrap();
            let (_, got, _) = recover_file(t.as_file()).unwrap();
            assert_eq!(got, history[i], "image {i}");
        }
    }

    /// Blocks left from an earlier run past the point where recovery stopped are never
    /// replayed: recovery stops at a damaged block, the next run writes a block there, and
    /// the old block after it (intact, with the next sequence number) must not apply.
    #[test]
    fn recovery_never_replays_a_stale_block_past_a_rewritten_one() {
        let (f, l) = cache(2 << 20);
        let mut j = Journal::format(f.as_file(), l, owner()).unwrap();
        let first = j.next_seq;
        j.append(f.as_file(), &[rec(0, SlotState::Clean(100))])
            .unwrap();
        j.append(f.as_file(), &[rec(1, SlotState::Dirty(200))])
            .unwrap();
        // The first block is torn; the second one landed.
        f.as_file()
            .write_all_at(&[0xffu8; 512], l.journal_offset(first) + 1024)
            .unwrap();
        let (mut j, states, replayed) = recover_file(f.as_file()).unwrap();
        assert_eq!(replayed, 0);
        assert!(states.iter().all(|s| *s == SlotState::Free));
        // The next run writes one block where the torn one was.
        j.append(f.as_file(), &[rec(2, SlotState::Clean(300))])
            .unwrap();
        let (_, states, replayed) = recover_file(f.as_file()).unwrap();
        assert_eq!(replayed, 1, "only the new block is part of the log");
        assert_eq!(states[2], SlotState::Clean(300));
        assert_eq!(states[1], SlotState::Free, "the stale block must not apply");
        assert_eq!(states[0], SlotState::Free);
    }

    /// A cache of another layout version is named as such, not as "not a cache".
    #[test]
    fn a_cache_of_another_version_is_refused_by_name() {
        let (f, l) = cache(2 << 20);
        Journal::format(f.as_file(), l, owner()).unwrap();
        for copy in 0..2u64 {
            let mut b = [0u8; PAGE as usize];
            f.as_file().read_exact_at(&mut b, copy * PAGE).unwrap();
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
            let crc = crc32c(&b[..PAGE as usize - 4]);
            b[PAGE as usize - 4..].copy_from_slice(&crc.to_le_bytes());
            f.as_file().write_all_at(&b, copy * PAGE).unwrap();
        }
        let err = recover_file(f.as_file()).err().expect("refused");
        assert!(matches!(err, TierError::OtherVersion(1)), "{err}");
        assert!(err.to_string().contains("layout version 1"));
    }

    #[test]
    fn a_damaged_superblock_falls_back_to_the_other_copy() {
        let (f, l) = cache(2 << 20);
        let mut j = Journal::format(f.as_file(), l, owner()).unwrap();
        let states = vec![SlotState::Clean(3); l.slots as usize];
        j.checkpoint(f.as_file(), &states).unwrap();
        // Corrupt the newer copy (generation 2 lives in copy 0).
        f.as_file().write_all_at(&[0xff; 64], 100).unwrap();
        let (_, got, _) = recover_file(f.as_file()).unwrap();
        assert!(
            got.iter().all(|s| *s == SlotState::Free),
            "fell back to generation 1"
        );
        f.as_file().write_all_at(&[0xff; 64], PAGE + 100).unwrap();
        assert!(matches!(
            recover_file(f.as_file()),
            Err(TierError::NotACache)
        ));
    }
}
