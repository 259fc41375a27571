//! Recovery of a cache device from arbitrary contents, for the `cache_recovery` fuzz target
//! (`storage-core/fuzz`) and its regression test: whatever the device holds, recovery
//! refuses it or recovers a table that maps each capacity block at most once and none
//! beyond the device; it never panics. Not for use by the daemons.

use std::cell::RefCell;
use std::io;

use super::disk::check_blocks;
use super::journal::{Journal, Media};
use super::layout::{Layout, Owner, Record, SlotState};
use super::state::{TierState, Use};
use super::TierError;

/// A cache device in memory.
struct Memory(RefCell<Vec<u8>>);

impl Media for Memory {
    fn put(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut m = self.0.borrow_mut();
        let end = offset as usize + buf.len();
        if end > m.len() {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        m[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn get(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let m = self.0.borrow();
        let end = (offset as usize).checked_add(buf.len());
        match end {
            Some(end) if end <= m.len() => {
                buf.copy_from_slice(&m[offset as usize..end]);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The capacity device the template belongs to: 64 MiB.
pub const TEMPLATE_CAPACITY: u64 = 64 << 20;

/// A valid 1 MiB cache image (4 KiB blocks) with a checkpoint and journal blocks after
/// it: the starting point the fuzz target mutates.
pub fn template() -> Vec<u8> {
    let size = 1 << 20;
    let layout = Layout::for_size(size, 4096).expect("1 MiB holds a cache");
    let owner = Owner {
        size: TEMPLATE_CAPACITY,
        dev: 1,
        ino: 2,
        path: "/capacity.img".into(),
    };
    let m = Memory(RefCell::new(vec![0; size as usize]));
    let mut j = Journal::format(&m, layout, owner).expect("format in memory");
    let mut states = vec![SlotState::Free; layout.slots as usize];
    for (i, s) in states.iter_mut().enumerate().take(20) {
        *s = if i % 3 == 0 {
            SlotState::Dirty(i as u64 * 7)
        } else {
            SlotState::Clean(i as u64 * 7 + 1)
        };
    }
    j.checkpoint(&m, &states).expect("checkpoint in memory");
    for k in 0..4u32 {
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                slot: 30 + k * 5 + i,
                state: if i % 2 == 0 {
                    SlotState::Clean(u64::from(1000 + k * 5 + i))
                } else {
                    SlotState::Dirty(u64::from(2000 + k * 5 + i))
                },
            })
            .collect();
        j.append(&m, &records).expect("append in memory");
    }
    m.0.into_inner()
}

/// Recomputes the checksums of every superblock and journal block in `image` (and the
/// map checksum each superblock names, where its layout is valid), so that mutated
/// metadata gets past them and reaches the code behind.
pub fn seal(image: &mut [u8]) {
    super::layout::seal(image);
}

/// Recovers `image` as the cache of [`TEMPLATE_CAPACITY`] bytes of capacity; returns the
/// (slot, block) pairs the recovered table maps.
pub fn recover(image: &[u8]) -> Result<Vec<(u32, u64)>, TierError> {
    let m = Memory(RefCell::new(image.to_vec()));
    let (j, states, _) = Journal::recover(&m, image.len() as u64)?;
    check_blocks(&states, TEMPLATE_CAPACITY, j.layout.block_size)?;
    let slots = states.len();
    let reserve = (slots / 32).clamp(8, 4096).min(slots / 2);
    let policy = crate::cache::by_name(crate::cache::DEFAULT_POLICY, slots - reserve)
        .expect("the default policy exists");
    let st = TierState::new(&states, policy).map_err(TierError::CacheIo)?;
    Ok(st
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.use_ {
            Use::Clean(b) | Use::Dirty(b) => Some((i as u32, b)),
            _ => None,
        })
        .collect())
}
