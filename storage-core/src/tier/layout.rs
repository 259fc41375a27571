//! The cache device's on-disk format.
//!
//! ```text
//! 0        superblock copy 0 (4 KiB)
//! 4 KiB    superblock copy 1 (4 KiB)
//! 8 KiB    map region 0   \  checkpoints of the slot table alternate between the two,
//!          map region 1   /  so a torn checkpoint never overwrites the live one
//!          journal        circular, 4 KiB blocks of slot-state records
//!          data           `slots` cache blocks, aligned to the cache block size
//! ```
//!
//! Every metadata block carries a CRC-32C. The superblock with the highest generation and a
//! valid checksum wins; it names the live map region and the journal sequence number the
//! checkpoint covers.

use super::TierError;

pub const PAGE: u64 = 4096;
pub(super) const MAGIC: &[u8; 8] = b"STRTIER1";
/// 2: journal blocks are chained (each names its predecessor's checksum).
const VERSION: u32 = 2;
/// Bytes per slot in a map region.
pub const MAP_ENTRY: u64 = 16;
/// Longest capacity path remembered in the superblock.
pub const MAX_PATH: usize = 1024;

/// CRC-32C (Castagnoli), bitwise-table implementation: metadata only, never per data byte.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Where everything lives on the cache device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub block_size: u64,
    pub slots: u64,
    pub map_pages: u64,
    pub journal_blocks: u64,
}

impl Layout {
    /// The largest layout that fits in `cache_size` bytes.
    pub fn for_size(cache_size: u64, block_size: u64) -> Result<Layout, TierError> {
        let mut slots = cache_size / block_size;
        loop {
            let map_pages = (slots * MAP_ENTRY).div_ceil(PAGE);
            // Room for many flushes between checkpoints: a block per 64 slots, 64..4096.
            let journal_blocks = (slots / 64).clamp(64, 4096);
            let l = Layout {
                block_size,
                slots,
                map_pages,
                journal_blocks,
            };
            if l.data_offset() + slots * block_size <= cache_size {
                if slots < 16 {
                    return Err(TierError::CacheTooSmall(cache_size));
                }
                return Ok(l);
            }
            if slots == 0 {
                return Err(TierError::CacheTooSmall(cache_size));
            }
            slots -= 1;
        }
    }

    /// Whether this layout (read from a superblock, so possibly damaged) is one that
    /// [`for_size`](Self::for_size) makes and fits on a device of `device_size` bytes: only
    /// then may its numbers be used for offsets and allocations.
    pub fn valid_for(&self, device_size: u64) -> bool {
        let bs = self.block_size;
        if !(4096..=65536).contains(&bs) || !bs.is_power_of_two() {
            return false;
        }
        if self.slots < 16 || self.slots > u64::from(u32::MAX) {
            return false;
        }
        if self.map_pages != (self.slots * MAP_ENTRY).div_ceil(PAGE)
            || self.journal_blocks != (self.slots / 64).clamp(64, 4096)
        {
            return false;
        }
        // Small enough now that none of this overflows.
        self.data_offset()
            .checked_add(self.slots * bs)
            .is_some_and(|end| end <= device_size)
    }

    pub fn superblock_offset(copy: u32) -> u64 {
        u64::from(copy) * PAGE
    }

    pub fn map_offset(&self, region: u32) -> u64 {
        2 * PAGE + u64::from(region) * self.map_pages * PAGE
    }

    pub fn journal_offset(&self, seq: u64) -> u64 {
        self.map_offset(2) + (seq % self.journal_blocks) * PAGE
    }

    pub fn data_offset(&self) -> u64 {
        let end = 2 * PAGE + 2 * self.map_pages * PAGE + self.journal_blocks * PAGE;
        end.div_ceil(self.block_size) * self.block_size
    }

    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.data_offset() + u64::from(slot) * self.block_size
    }
}

/// What identifies the capacity device a cache belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub path: String,
}

/// The superblock: format parameters, owner, and the latest checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub generation: u64,
    /// Chosen at format time and stamped on every journal block, so blocks left over from an
    /// earlier format can never be replayed as this one's.
    pub format_id: u32,
    pub layout: Layout,
    pub owner: Owner,
    /// Which map region holds the checkpoint.
    pub map_region: u32,
    /// Journal records up to and including this sequence number are in the checkpoint.
    pub checkpoint_seq: u64,
    pub map_crc: u32,
    /// The checksum the journal block after the checkpoint must name as its predecessor's
    /// (that of block `checkpoint_seq`, or a random start for a new format).
    pub chain: u32,
}

impl Superblock {
    pub fn encode(&self) -> [u8; PAGE as usize] {
        let mut b = [0u8; PAGE as usize];
        b[0..8].copy_from_slice(MAGIC);
        let mut w = Writer { b: &mut b, at: 8 };
        w.u32(VERSION);
        w.u64(self.generation);
        w.u32(self.format_id);
        w.u64(self.layout.block_size);
        w.u64(self.layout.slots);
        w.u64(self.layout.map_pages);
        w.u64(self.layout.journal_blocks);
        w.u64(self.owner.size);
        w.u64(self.owner.dev);
        w.u64(self.owner.ino);
        w.u32(self.map_region);
        w.u64(self.checkpoint_seq);
        w.u32(self.map_crc);
        w.u32(self.chain);
        let path = self.owner.path.as_bytes();
        let n = path.len().min(MAX_PATH);
        w.u32(n as u32);
        w.bytes(&path[..n]);
        let crc = crc32c(&b[..PAGE as usize - 4]);
        b[PAGE as usize - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The layout version of what looks like a superblock of another version (its magic
    /// and checksum are right), for a clear error: `None` for anything else.
    pub fn other_version(b: &[u8]) -> Option<u32> {
        if b.len() < PAGE as usize || &b[0..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[PAGE as usize - 4..PAGE as usize].try_into().ok()?);
        if crc32c(&b[..PAGE as usize - 4]) != crc {
            return None;
        }
        let version = u32::from_le_bytes(b[8..12].try_into().ok()?);
        (version != VERSION).then_some(version)
    }

    /// Decodes a superblock; `None` if it is not one or its checksum is wrong.
    pub fn decode(b: &[u8]) -> Option<Superblock> {
        if b.len() < PAGE as usize || &b[0..8] != MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(b[PAGE as usize - 4..PAGE as usize].try_into().ok()?);
        if crc32c(&b[..PAGE as usize - 4]) != crc {
            return None;
        }
        let mut r = Reader { b, at: 8 };
        if r.u32()? != VERSION {
            return None;
        }
        let generation = r.u64()?;
        let format_id = r.u32()?;
        let layout = Layout {
            block_size: r.u64()?,
            slots: r.u64()?,
            map_pages: r.u64()?,
            journal_blocks: r.u64()?,
        };
        let (size, dev, ino) = (r.u64()?, r.u64()?, r.u64()?);
        let map_region = r.u32()?;
        let checkpoint_seq = r.u64()?;
        let map_crc = r.u32()?;
        let chain = r.u32()?;
        let n = r.u32()? as usize;
        if n > MAX_PATH || map_region > 1 || layout.journal_blocks == 0 {
            return None;
        }
        let path = String::from_utf8_lossy(r.bytes(n)?).into_owned();
        Some(Superblock {
            generation,
            format_id,
            layout,
            owner: Owner {
                size,
                dev,
                ino,
                path,
            },
            map_region,
            checkpoint_seq,
            map_crc,
            chain,
        })
    }
}

/// The state of one cache slot, as persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    Free,
    Clean(u64),
    Dirty(u64),
}

impl SlotState {
    pub fn encode(self) -> [u8; MAP_ENTRY as usize] {
        let mut e = [0u8; MAP_ENTRY as usize];
        let (kind, block) = match self {
            SlotState::Free => (0u8, 0),
            SlotState::Clean(b) => (1, b),
            SlotState::Dirty(b) => (2, b),
        };
        e[0] = kind;
        e[8..16].copy_from_slice(&block.to_le_bytes());
        e
    }

    pub fn decode(e: &[u8]) -> Option<SlotState> {
        let block = u64::from_le_bytes(e.get(8..16)?.try_into().ok()?);
        match e[0] {
            0 => Some(SlotState::Free),
            1 => Some(SlotState::Clean(block)),
            2 => Some(SlotState::Dirty(block)),
            _ => None,
        }
    }
}

/// A journal record: slot `slot` is now in `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub slot: u32,
    pub state: SlotState,
}

const JOURNAL_MAGIC: u32 = 0x4A52_4E4C; // "JRNL"
/// magic, checksum, sequence number, record count, format id, predecessor's checksum, writer.
const JOURNAL_HEADER: usize = 32;
/// Records in one 4 KiB journal block.
pub const RECORDS_PER_BLOCK: usize = (PAGE as usize - JOURNAL_HEADER) / 16;

/// Where a journal block sits in its log: its sequence number, its format, and the checksum
/// of the block before it. Replay accepts a block only if all three match, so a block left
/// from an earlier run past the point where recovery stopped can never be taken for part
/// of the current log: the new block written at that point has another checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    pub seq: u64,
    pub format_id: u32,
    pub prev: u32,
}

/// Encodes one journal block holding `records` (at most [`RECORDS_PER_BLOCK`]) at `at` in
/// the log. `writer` differs for each run of the daemon, so a block it rewrites never
/// matches the one that was there, byte for byte.
pub fn encode_journal_block(at: Chain, writer: u32, records: &[Record]) -> [u8; PAGE as usize] {
    debug_assert!(records.len() <= RECORDS_PER_BLOCK);
    let mut b = [0u8; PAGE as usize];
    b[0..4].copy_from_slice(&JOURNAL_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&at.seq.to_le_bytes());
    b[16..20].copy_from_slice(&(records.len() as u32).to_le_bytes());
    b[20..24].copy_from_slice(&at.format_id.to_le_bytes());
    b[24..28].copy_from_slice(&at.prev.to_le_bytes());
    b[28..32].copy_from_slice(&writer.to_le_bytes());
    for (i, r) in records.iter().enumerate() {
        let at = JOURNAL_HEADER + i * 16;
        let mut e = r.state.encode();
        e[4..8].copy_from_slice(&r.slot.to_le_bytes());
        b[at..at + 16].copy_from_slice(&e);
    }
    let crc = crc32c(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Recomputes the checksums of every superblock copy and journal block in `image` (and the
/// map checksum a superblock with a valid layout names), for the fuzz target: mutated
/// metadata then reaches the checks behind the checksums.
pub fn seal(image: &mut [u8]) {
    let page = PAGE as usize;
    // Offsets of map_crc and the checksum within an encoded superblock.
    const MAP_CRC_AT: usize = 92;
    let sum = |img: &mut [u8], at: usize| {
        let crc = crc32c(&img[at..at + page - 4]);
        img[at + page - 4..at + page].copy_from_slice(&crc.to_le_bytes());
    };
    for copy in 0..2usize {
        let at = copy * page;
        if image.len() < at + page || &image[at..at + 8] != MAGIC {
            continue;
        }
        sum(image, at);
        let Some(sb) = Superblock::decode(&image[at..at + page]) else {
            continue;
        };
        if sb.layout.valid_for(image.len() as u64) {
            let from = sb.layout.map_offset(sb.map_region) as usize;
            let to = from + (sb.layout.map_pages * PAGE) as usize;
            let crc = crc32c(&image[from..to]);
            image[at + MAP_CRC_AT..at + MAP_CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
            sum(image, at);
        }
    }
    for at in (0..image.len().saturating_sub(page - 1)).step_by(page) {
        if image[at..at + 4] == JOURNAL_MAGIC.to_le_bytes() {
            let crc = crc32c(&image[at + 8..at + page]);
            image[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        }
    }
}

/// The checksum of an encoded journal block (what its successor names).
pub fn journal_block_crc(b: &[u8; PAGE as usize]) -> u32 {
    u32::from_le_bytes([b[4], b[5], b[6], b[7]])
}

/// Decodes a journal block if it is intact and sits at `at` in the log.
pub fn decode_journal_block(b: &[u8], at: Chain) -> Option<Vec<Record>> {
    if b.len() < PAGE as usize || b[0..4] != JOURNAL_MAGIC.to_le_bytes() {
        return None;
    }
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    if crc32c(&b[8..PAGE as usize]) != crc {
        return None;
    }
    if u64::from_le_bytes(b[8..16].try_into().ok()?) != at.seq
        || u32::from_le_bytes(b[20..24].try_into().ok()?) != at.format_id
        || u32::from_le_bytes(b[24..28].try_into().ok()?) != at.prev
    {
        return None;
    }
    let n = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    if n > RECORDS_PER_BLOCK {
        return None;
    }
    (0..n)
        .map(|i| {
            let e = &b[JOURNAL_HEADER + i * 16..JOURNAL_HEADER + (i + 1) * 16];
            Some(Record {
                slot: u32::from_le_bytes(e[4..8].try_into().ok()?),
                state: SlotState::decode(e)?,
            })
        })
        .collect()
}

struct Writer<'a> {
    b: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, v: &[u8]) {
        self.b[self.at..self.at + v.len()].copy_from_slice(v);
        self.at += v.len();
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let v = self.b.get(self.at..self.at + n)?;
        self.at += n;
        Some(v)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn layout_fits_and_aligns() {
        for (size, bs) in [(256u64 << 20, 4096u64), (64 << 20, 65536), (1 << 20, 4096)] {
            let l = Layout::for_size(size, bs).unwrap();
            assert_eq!(l.data_offset() % bs, 0);
            assert!(l.data_offset() + l.slots * bs <= size);
            assert!(l.slot_offset(l.slots as u32 - 1) + bs <= size);
            assert!(l.map_offset(1) + l.map_pages * PAGE <= l.journal_offset(0));
        }
        assert!(Layout::for_size(32 << 10, 4096).is_err());
    }

    #[test]
    fn superblock_round_trips_and_detects_damage() {
        let sb = Superblock {
            generation: 7,
            format_id: 0x1234,
            layout: Layout::for_size(16 << 20, 4096).unwrap(),
            owner: Owner {
                size: 1 << 30,
                dev: 3,
                ino: 99,
                path: "/data/disk.img".into(),
            },
            map_region: 1,
            checkpoint_seq: 42,
            map_crc: 0xdead_beef,
            chain: 0x5eed,
        };
        let mut b = sb.encode();
        assert_eq!(Superblock::decode(&b), Some(sb));
        b[100] ^= 1;
        assert_eq!(Superblock::decode(&b), None);
    }

    #[test]
    fn journal_blocks_round_trip_and_reject_stale_or_torn() {
        let recs: Vec<Record> = (0..RECORDS_PER_BLOCK as u32)
            .map(|i| Record {
                slot: i,
                state: if i % 2 == 0 {
                    SlotState::Dirty(u64::from(i) * 3)
                } else {
                    SlotState::Free
                },
            })
            .collect();
        let at = Chain {
            seq: 5,
            format_id: 77,
            prev: 0xabc,
        };
        let b = encode_journal_block(at, 1, &recs);
        assert_eq!(decode_journal_block(&b, at).unwrap(), recs);
        let stale = Chain { seq: 6, ..at };
        assert!(decode_journal_block(&b, stale).is_none(), "stale sequence");
        let other = Chain {
            format_id: 78,
            ..at
        };
        assert!(
            decode_journal_block(&b, other).is_none(),
            "another format's block"
        );
        let unchained = Chain { prev: 0xabd, ..at };
        assert!(
            decode_journal_block(&b, unchained).is_none(),
            "a block whose predecessor is not the one before it"
        );
        assert_ne!(
            journal_block_crc(&b),
            journal_block_crc(&encode_journal_block(at, 2, &recs)),
            "another writer's block differs"
        );
        let mut torn = b;
        torn[2000..].fill(0);
        assert!(decode_journal_block(&torn, at).is_none());
    }
}
