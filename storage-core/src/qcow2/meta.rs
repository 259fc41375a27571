//! A qcow2 image's metadata, shared by every queue of the disk under one lock: the L1
//! table, a cache of L2 tables, the refcounts, and where the next cluster goes.
//!
//! Ordering is the point (QEMU's docs/interop/qcow2.txt, and what a power cut leaves):
//! changes live in memory until a flush, which writes them in dependency order, each
//! stage made durable before the next:
//!
//! 1. guest data (the file synced), so nothing below can point at data not yet written;
//! 2. refcount blocks (and a grown refcount table, then the header naming it), so no
//!    cluster is referenced while its refcount still says it is free;
//! 3. L2 tables, then the L1 table;
//! 4. refcount decrements of clusters no longer referenced (after 3, so a crash leaves
//!    a leak, never a reference to a free cluster).
//!
//! A crash at any point leaves at worst leaked clusters (`qemu-img check` reports them as
//! leaks, which are harmless), never a corrupt image. Refcounts are kept exact, so there
//! is no "dirty" state to repair at the next open (QEMU's lazy refcounts trade that repair
//! for fewer writes; we do not implement them).
//!
//! New clusters are taken from the end of the file, never from freed space, so a new
//! cluster reads as zeroes wherever nothing was written into it (the file grows with
//! holes). Freed clusters (refcount 0) are not reused yet: their space stays in the file.

use std::collections::HashMap;
use std::io;

use super::encryption::Encryption;
use super::header::{self, Header};
use crate::disk::{AnyDisk, Disk};

/// L1/L2 entry bits.
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// In the image file, at this cluster-aligned offset.
    Data(u64),
    /// Reads as zeroes.
    Zero,
    /// Not in this image: the backing file's (or zeroes without one).
    Unallocated,
    /// Compressed: `len` bytes (at most) at `offset` in the image file.
    Compressed { offset: u64, len: u64 },
}

#[derive(Debug)]
struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    used: u64,
}

fn corrupt(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn read_be64s(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn be64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// The metadata of one open image (see the module docs).
#[derive(Debug)]
pub struct Meta {
    pub header: Header,
    cluster_bits: u32,
    cluster: u64,
    writable: bool,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: HashMap<u64, L2Table>,
    /// Most L2 tables kept (the rest are read again when needed).
    l2_limit: usize,
    tick: u64,
    refcount_table: Vec<u64>,
    /// The refcount table changed (a new block, or it grew and moved): written at the
    /// next flush, then the header if it moved.
    table_moved: Option<(u64, u32)>,
    /// Where the header on the disk says the refcount table is.
    header_table_on_disk: u64,
    refcount_blocks: HashMap<u64, (Vec<u8>, bool)>,
    /// Where the next new cluster goes: the end of the file, cluster-aligned.
    next_free: u64,
    /// Clusters whose last reference went away, decremented after the L2 tables are out.
    pending_frees: Vec<u64>,
    /// Something changed since the last flush.
    dirty: bool,
}

impl Meta {
    /// Reads the metadata of `file`, whose header is `header`. `l2_cache_bytes` bounds the
    /// L2 tables kept in memory.
    pub fn open(
        file: &AnyDisk,
        header: Header,
        file_len: u64,
        writable: bool,
        l2_cache_bytes: u64,
    ) -> io::Result<Meta> {
        let cluster_bits = header.cluster_bits;
        let cluster = 1u64 << cluster_bits;
        // Tables may run past the end of the file (qemu-img leaves a new image's L1 table
        // there): that part reads as zeroes.
        let mut l1 = vec![0u8; header.l1_size as usize * 8];
        super::read_clamped(file, &mut l1, header.l1_table_offset, file_len)
            .map_err(|e| corrupt(format!("reading the L1 table: {e}")))?;
        let mut table = vec![0u8; (header.refcount_table_clusters as u64 * cluster) as usize];
        super::read_clamped(file, &mut table, header.refcount_table_offset, file_len)
            .map_err(|e| corrupt(format!("reading the refcount table: {e}")))?;
        let refcount_table = read_be64s(&table);
        let l1 = read_be64s(&l1);
        let l2_limit = (l2_cache_bytes / cluster).max(4) as usize;
        let l1_end =
            header.l1_table_offset + (header.l1_size as u64 * 8).div_ceil(cluster) * cluster;
        let table_end =
            header.refcount_table_offset + u64::from(header.refcount_table_clusters) * cluster;
        let mut meta = Meta {
            cluster_bits,
            cluster,
            writable,
            l1,
            l1_dirty: false,
            l2: HashMap::new(),
            l2_limit,
            tick: 0,
            refcount_table,
            table_moved: None,
            header_table_on_disk: header.refcount_table_offset,
            refcount_blocks: HashMap::new(),
            next_free: file_len.div_ceil(cluster) * cluster,
            pending_frees: Vec::new(),
            dirty: false,
            header,
        };
        // New clusters go past everything in use, which may lie past the end of the file
        // (qemu-img leaves a new image's L1 table there): past the tables, and past the
        // last cluster with a refcount.
        let last = meta.last_referenced(file, file_len)?;
        meta.next_free = meta.next_free.max(l1_end).max(table_end).max(last);
        Ok(meta)
    }

    /// The end of the last host cluster whose refcount is not zero.
    /// Blocks are read once each, not kept, and only those inside the file (one past its
    /// end reads as zeroes anyway): a hostile table costs at most a read of the file.
    fn last_referenced(&mut self, file: &AnyDisk, file_len: u64) -> io::Result<u64> {
        let per_block = self.per_block();
        let bits = self.header.refcount_bits();
        let mut b = vec![0u8; self.cluster as usize];
        for ti in (0..self.refcount_table.len()).rev() {
            let block = self.refcount_table[ti] & !(self.cluster - 1);
            if block == 0 || block >= file_len {
                continue;
            }
            super::read_clamped(file, &mut b, block, file_len)?;
            if let Some(i) = (0..per_block)
                .rev()
                .find(|&i| Self::get_bits(&b, i, bits) != 0)
            {
                return Ok((ti as u64 * per_block + i + 1) * self.cluster);
            }
        }
        Ok(0)
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster
    }

    fn l2_entries(&self) -> u64 {
        self.cluster / 8
    }

    /// The L2 table at `offset`, read if not cached.
    fn l2_table(&mut self, file: &AnyDisk, offset: u64) -> io::Result<&mut L2Table> {
        self.tick += 1;
        let tick = self.tick;
        if !self.l2.contains_key(&offset) {
            if self.l2.len() >= self.l2_limit {
                self.evict_l2(file)?;
            }
            let mut b = vec![0u8; self.cluster as usize];
            super::read_clamped(file, &mut b, offset, u64::MAX)
                .map_err(|e| corrupt(format!("reading the L2 table at {offset:#x}: {e}")))?;
            self.l2.insert(
                offset,
                L2Table {
                    entries: read_be64s(&b),
                    dirty: false,
                    used: tick,
                },
            );
        }
        let t = self.l2.get_mut(&offset).expect("just inserted");
        t.used = tick;
        Ok(t)
    }

    /// Drops the least recently used L2 table; all dirty: a flush first.
    fn evict_l2(&mut self, file: &AnyDisk) -> io::Result<()> {
        if self.l2.values().all(|t| t.dirty) {
            self.flush(file)?;
        }
        if let Some((&off, _)) = self
            .l2
            .iter()
            .filter(|(_, t)| !t.dirty)
            .min_by_key(|(_, t)| t.used)
        {
            self.l2.remove(&off);
        }
        Ok(())
    }

    /// The (L1 index, L2 index) of guest byte `offset`.
    fn indices(&self, offset: u64) -> (usize, usize) {
        let c = offset >> self.cluster_bits;
        (
            (c / self.l2_entries()) as usize,
            (c % self.l2_entries()) as usize,
        )
    }

    /// Checks an offset the image gives us: a cluster boundary, inside what the file may
    /// hold.
    fn host(&self, off: u64, what: &str) -> io::Result<u64> {
        if !off.is_multiple_of(self.cluster) {
            return Err(corrupt(format!(
                "{what} at {off:#x} is not on a cluster boundary"
            )));
        }
        Ok(off)
    }

    fn decode(&self, e: u64) -> io::Result<Mapping> {
        if e & COMPRESSED != 0 {
            let x = 62 - (self.cluster_bits - 8);
            let offset = e & ((1u64 << x) - 1);
            let sectors = ((e & !COPIED & !COMPRESSED) >> x) + 1;
            return Ok(Mapping::Compressed {
                offset,
                len: sectors * 512 - (offset & 511),
            });
        }
        if self.header.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero);
        }
        match e & OFFSET_MASK {
            0 => Ok(Mapping::Unallocated),
            off => Ok(Mapping::Data(self.host(off, "a data cluster")?)),
        }
    }

    /// Where the guest cluster holding byte `offset` is.
    pub fn lookup(&mut self, file: &AnyDisk, offset: u64) -> io::Result<Mapping> {
        let (i1, i2) = self.indices(offset);
        let l2 = match self.l1.get(i1) {
            Some(&e) => e & OFFSET_MASK,
            None => return Err(corrupt(format!("offset {offset:#x} is past the L1 table"))),
        };
        if l2 == 0 {
            return Ok(Mapping::Unallocated);
        }
        let l2 = self.host(l2, "an L2 table")?;
        let e = self.l2_table(file, l2)?.entries[i2];
        self.decode(e)
    }

    /// The L2 table for guest byte `offset`, made if there is none.
    fn l2_for_write(&mut self, file: &AnyDisk, offset: u64) -> io::Result<(u64, usize)> {
        let (i1, i2) = self.indices(offset);
        let e = *self
            .l1
            .get(i1)
            .ok_or_else(|| corrupt(format!("offset {offset:#x} is past the L1 table")))?;
        let l2 = e & OFFSET_MASK;
        if l2 != 0 {
            return Ok((self.host(l2, "an L2 table")?, i2));
        }
        if self.l2.len() >= self.l2_limit {
            self.evict_l2(file)?;
        }
        let off = self.allocate(file)?;
        self.tick += 1;
        self.l2.insert(
            off,
            L2Table {
                entries: vec![0; self.l2_entries() as usize],
                dirty: true,
                used: self.tick,
            },
        );
        self.l1[i1] = off | COPIED;
        self.l1_dirty = true;
        Ok((off, i2))
    }

    /// Sets the L2 entry of guest byte `offset`; the old one's cluster, if it had one, is
    /// freed at the next flush.
    fn set_entry(&mut self, file: &AnyDisk, offset: u64, entry: u64) -> io::Result<()> {
        let (l2, i2) = self.l2_for_write(file, offset)?;
        let t = self.l2_table(file, l2)?;
        let old = std::mem::replace(&mut t.entries[i2], entry);
        t.dirty = true;
        self.dirty = true;
        if old & COMPRESSED != 0 {
            // Compressed data counts once in every host cluster its sectors touch (as
            // QEMU counts it).
            if let Mapping::Compressed { offset, len } = self.decode(old)? {
                let first = offset & !(self.cluster - 1);
                let end = (offset & !511) + (len + (offset & 511)).div_ceil(512) * 512;
                let mut c = first;
                while c < end {
                    self.pending_frees.push(c);
                    c += self.cluster;
                }
            }
            return Ok(());
        }
        let old_host = old & OFFSET_MASK;
        if old_host != 0 && old_host != entry & OFFSET_MASK {
            self.pending_frees.push(old_host);
        }
        Ok(())
    }

    /// Makes the guest cluster holding byte `offset` writable in place and returns its
    /// host offset, allocating a cluster if it has none. A new cluster gets its old
    /// contents first (`fill` writes them: from the backing file, a compressed cluster or
    /// zeroes), all before the L2 entry names it; in an encrypted image (`crypt`), `fill`
    /// gives plaintext, encrypted here for its new place (zeroes too: they must decrypt to
    /// zeroes).
    pub fn writable_cluster(
        &mut self,
        file: &AnyDisk,
        offset: u64,
        crypt: Option<&Encryption>,
        fill: &mut dyn FnMut(Mapping, &mut [u8]) -> io::Result<bool>,
    ) -> io::Result<u64> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mapping = self.lookup(file, offset)?;
        if let Mapping::Data(host) = mapping {
            let (l2, i2) = self.l2_for_write(file, offset)?;
            let e = self.l2_table(file, l2)?.entries[i2];
            if e & COPIED != 0 {
                return Ok(host);
            }
            if self.refcount(file, host)? == 1 {
                let t = self.l2_table(file, l2)?;
                t.entries[i2] |= COPIED;
                t.dirty = true;
                self.dirty = true;
                return Ok(host);
            }
        }
        let new = self.allocate(file)?;
        let mut buf = vec![0u8; self.cluster as usize];
        let filled = fill(mapping, &mut buf)?;
        if let Some(c) = crypt {
            c.encrypt(&mut buf, new);
            file.write_at(&buf, new)?;
        } else if filled {
            file.write_at(&buf, new)?;
        } else {
            // Zeroes already (past the old end of the file); its last byte written makes
            // the file cover it, so that reads inside it are never short.
            file.write_at(&[0], new + self.cluster - 1)?;
        }
        self.set_entry(file, offset, new | COPIED)?;
        Ok(new)
    }

    /// Makes whole guest clusters from `offset` read as zeroes (`unmap`: and gives their
    /// space back): true if done in metadata (version 3 images, or without a backing file
    /// on version 2), false when the caller must write zeroes.
    pub fn zero_cluster(&mut self, file: &AnyDisk, offset: u64) -> io::Result<bool> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let has_backing = self.has_backing();
        let now = self.lookup(file, offset)?;
        // Zeroes already: nothing to write (and no L2 table made for it).
        if now == Mapping::Zero || (now == Mapping::Unallocated && !has_backing) {
            return Ok(true);
        }
        let entry = if self.header.version >= 3 {
            ZERO
        } else if !has_backing {
            0
        } else {
            return Ok(false);
        };
        self.set_entry(file, offset, entry)?;
        Ok(true)
    }

    /// Whether the image names a backing file (whether or not this node reads it: with
    /// `backing=null` the image must still be right for its own chain).
    pub fn has_backing(&self) -> bool {
        self.header.backing_file.is_some()
    }

    /// Refcount entries per refcount block.
    fn per_block(&self) -> u64 {
        self.cluster * 8 / u64::from(self.header.refcount_bits())
    }

    fn block(&mut self, file: &AnyDisk, off: u64) -> io::Result<&mut (Vec<u8>, bool)> {
        if !self.refcount_blocks.contains_key(&off) {
            let mut b = vec![0u8; self.cluster as usize];
            super::read_clamped(file, &mut b, off, u64::MAX)
                .map_err(|e| corrupt(format!("reading a refcount block at {off:#x}: {e}")))?;
            self.refcount_blocks.insert(off, (b, false));
        }
        Ok(self.refcount_blocks.get_mut(&off).expect("just inserted"))
    }

    pub(super) fn get_bits(b: &[u8], i: u64, bits: u32) -> u64 {
        match bits {
            1 | 2 | 4 => {
                let per = 8 / bits as u64;
                let byte = b[(i / per) as usize];
                (u64::from(byte) >> ((i % per) * bits as u64)) & ((1 << bits) - 1)
            }
            _ => {
                let n = bits as usize / 8;
                let at = i as usize * n;
                b[at..at + n]
                    .iter()
                    .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
            }
        }
    }

    pub(super) fn put_bits(b: &mut [u8], i: u64, bits: u32, v: u64) {
        match bits {
            1 | 2 | 4 => {
                let per = 8 / bits as u64;
                let shift = (i % per) * bits as u64;
                let mask = ((1u64 << bits) - 1) << shift;
                let byte = &mut b[(i / per) as usize];
                *byte = ((u64::from(*byte) & !mask) | ((v << shift) & mask)) as u8;
            }
            _ => {
                let n = bits as usize / 8;
                let at = i as usize * n;
                let be = v.to_be_bytes();
                b[at..at + n].copy_from_slice(&be[8 - n..]);
            }
        }
    }

    /// The refcount of the host cluster at `off`.
    pub fn refcount(&mut self, file: &AnyDisk, off: u64) -> io::Result<u64> {
        let c = off >> self.cluster_bits;
        let (ti, bi) = (c / self.per_block(), c % self.per_block());
        let Some(&block) = self.refcount_table.get(ti as usize) else {
            return Ok(0);
        };
        let block = block & !(self.cluster - 1);
        if block == 0 {
            return Ok(0);
        }
        let bits = self.header.refcount_bits();
        let b = self.block(file, block)?;
        Ok(Self::get_bits(&b.0, bi, bits))
    }

    /// Adds `delta` to the refcount of the host cluster at `off`, making its refcount
    /// block (and growing the table) if needed.
    fn add_refcount(&mut self, file: &AnyDisk, off: u64, delta: i64) -> io::Result<()> {
        let c = off >> self.cluster_bits;
        let (ti, bi) = (c / self.per_block(), c % self.per_block());
        if ti as usize >= self.refcount_table.len() {
            self.grow_refcount_table(file, ti as usize + 1)?;
        }
        let mut block = self.refcount_table[ti as usize] & !(self.cluster - 1);
        if block == 0 {
            // A new block, at the end of the file: it may count itself.
            block = self.take_clusters(file, 1);
            self.refcount_table[ti as usize] = block;
            self.refcount_blocks
                .insert(block, (vec![0u8; self.cluster as usize], true));
            self.table_dirty();
            self.add_refcount(file, block, 1)?;
        }
        let bits = self.header.refcount_bits();
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let b = self.block(file, block)?;
        let now = Self::get_bits(&b.0, bi, bits);
        let new = now
            .checked_add_signed(delta)
            .filter(|n| *n <= max)
            .ok_or_else(|| {
                corrupt(format!(
                    "refcount of cluster {off:#x} would be out of range"
                ))
            })?;
        Self::put_bits(&mut b.0, bi, bits, new);
        b.1 = true;
        self.dirty = true;
        Ok(())
    }

    /// Marks the refcount table to be written whole at the next flush (it is small).
    fn table_dirty(&mut self) {
        if self.table_moved.is_none() {
            self.table_moved = Some((
                self.header.refcount_table_offset,
                self.header.refcount_table_clusters,
            ));
        }
        self.dirty = true;
    }

    /// A table with room for `entries` blocks, at the end of the file.
    fn grow_refcount_table(&mut self, file: &AnyDisk, entries: usize) -> io::Result<()> {
        let per_cluster = (self.cluster / 8) as usize;
        // Room for the blocks the new table's own clusters may need, and to spare.
        let clusters = (entries * 2).div_ceil(per_cluster).max(1) as u32;
        let at = self.take_clusters(file, u64::from(clusters));
        let old = (
            self.header.refcount_table_offset,
            self.header.refcount_table_clusters,
        );
        self.refcount_table
            .resize(clusters as usize * per_cluster, 0);
        self.header.refcount_table_offset = at;
        self.header.refcount_table_clusters = clusters;
        self.table_moved = Some((at, clusters));
        for i in 0..u64::from(clusters) {
            self.add_refcount(file, at + i * self.cluster, 1)?;
        }
        for i in 0..u64::from(old.1) {
            self.pending_frees.push(old.0 + i * self.cluster);
        }
        self.dirty = true;
        Ok(())
    }

    /// `n` clusters from the end of the file (their refcounts are the caller's to set).
    /// The file node's size follows, so that its queue takes requests there.
    fn take_clusters(&mut self, file: &AnyDisk, n: u64) -> u64 {
        let at = self.next_free;
        self.next_free += n * self.cluster;
        let size = &file.info().capacity;
        if size.get() < self.next_free {
            size.set(self.next_free);
        }
        at
    }

    /// A new cluster (refcount 1) at the end of the file.
    pub fn allocate(&mut self, file: &AnyDisk) -> io::Result<u64> {
        let off = self.take_clusters(file, 1);
        self.add_refcount(file, off, 1)?;
        Ok(off)
    }

    /// Writes the changed refcount blocks (not synced); whether there were any.
    fn write_refcount_blocks(&mut self, file: &AnyDisk) -> io::Result<bool> {
        let mut blocks: Vec<u64> = self
            .refcount_blocks
            .iter()
            .filter(|(_, b)| b.1)
            .map(|(o, _)| *o)
            .collect();
        blocks.sort_unstable();
        for &off in &blocks {
            let b = self.refcount_blocks.get_mut(&off).expect("listed");
            file.write_at(&b.0, off)?;
            b.1 = false;
        }
        Ok(!blocks.is_empty())
    }

    /// The image became a snapshot (flushed, below a new top): nothing may change it, and
    /// what was cached for writing goes.
    pub fn freeze(&mut self) {
        self.writable = false;
        if !self.dirty {
            self.refcount_blocks.clear();
            self.l2.retain(|_, t| t.dirty);
        }
    }

    /// Writes every change, in the order the module docs give, each stage made durable.
    pub fn flush(&mut self, file: &AnyDisk) -> io::Result<()> {
        file.flush()?;
        if !self.dirty {
            return Ok(());
        }
        // Refcount blocks; then the table naming new ones (a table entry must never reach
        // the disk before its block); then the header, if the table moved.
        if self.write_refcount_blocks(file)? {
            file.flush()?;
        }
        if let Some((at, clusters)) = self.table_moved {
            debug_assert_eq!(
                self.refcount_table.len() as u64 * 8,
                u64::from(clusters) * self.cluster
            );
            file.write_at(&be64s(&self.refcount_table), at)?;
            file.flush()?;
            if at != self.header_table_on_disk {
                let mut f = [0u8; 12];
                f[..8].copy_from_slice(&at.to_be_bytes());
                f[8..].copy_from_slice(&clusters.to_be_bytes());
                file.write_at(&f, header::OFF_REFCOUNT_TABLE)?;
                file.flush()?;
                self.header_table_on_disk = at;
            }
            // Only once all of it is on the disk: a failure above retries it all.
            self.table_moved = None;
        }
        // L2 tables, then L1.
        let mut tables: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        tables.sort_unstable();
        let wrote = !tables.is_empty();
        for off in tables {
            let t = self.l2.get_mut(&off).expect("listed");
            file.write_at(&be64s(&t.entries), off)?;
            t.dirty = false;
        }
        if wrote {
            file.flush()?;
        }
        // The L1 table names L2 tables, which are on the disk now.
        if self.l1_dirty {
            file.write_at(&be64s(&self.l1), self.header.l1_table_offset)?;
            file.flush()?;
            self.l1_dirty = false;
        }
        // What is no longer referenced.
        if !self.pending_frees.is_empty() {
            let frees = std::mem::take(&mut self.pending_frees);
            for off in &frees {
                self.add_refcount(file, *off, -1)?;
            }
            self.write_refcount_blocks(file)?;
            file.flush()?;
        }
        self.dirty = !self.pending_frees.is_empty();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut b = vec![0u8; 512];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            for i in 0..(512 * 8 / bits as u64) {
                Meta::put_bits(&mut b, i, bits, i % (max.min(1000) + 1));
            }
            for i in 0..(512 * 8 / bits as u64) {
                assert_eq!(
                    Meta::get_bits(&b, i, bits),
                    i % (max.min(1000) + 1),
                    "{bits}"
                );
            }
        }
        // 16-bit refcounts are big-endian, as QEMU writes them.
        let mut b = vec![0u8; 4];
        Meta::put_bits(&mut b, 1, 16, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
    }
}
