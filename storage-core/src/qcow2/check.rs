//! Checking a qcow2 image's metadata, and repairing what can be repaired safely, as
//! `qemu-img check [-r leaks|all]` does: every cluster the image uses (header, tables,
//! L2 tables, data, compressed data, internal snapshots' tables) is counted, and the counts
//! compared with the stored refcounts. A stored refcount below the count is a corruption
//! (the cluster could be freed and reused while in use); above it, a leak (space lost, no
//! harm). Entries that point past the end of the file, or off a cluster boundary, are
//! corruptions; so is a COPIED flag that disagrees with its cluster's refcount.
//!
//! It reads the file with plain positioned reads and trusts none of it: a hostile image
//! costs at most a read of its tables. Repairs (`leaks`: refcounts lowered to the count;
//! `all`: refcounts also raised, entries past the end of the file made zero clusters, and
//! COPIED flags set right) are written and synced in an order that never leaves a cluster
//! in use with a refcount lower than before. Refcount blocks are never allocated: a cluster
//! whose block is missing stays an error (QEMU rebuilds the refcount structure there).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::{be64, Header};
use super::meta::Meta;
use crate::error::{StorageError, StorageErrorKind};

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Tables larger than this are not read (QEMU's limit on an L1 table is 32 MiB).
const MAX_TABLE: u64 = 64 << 20;

pub use crate::check::{CheckReport, Repair};

fn invalid(path: &Path, msg: impl std::fmt::Display) -> StorageError {
    StorageError::new(
        StorageErrorKind::InvalidImage,
        format!("{}: {msg}", path.display()),
    )
}

/// The image as the check reads it.
struct Image {
    file: File,
    header: Header,
    file_len: u64,
    bits: u32,
    cluster: u64,
    l1: Vec<u64>,
    refcount_table: Vec<u64>,
    /// Internal snapshots' L1 tables: where each is, and its entries (read as counted).
    snapshot_l1s: Vec<(u64, u32)>,
    /// The snapshot table's extent.
    snapshot_table: Option<(u64, u64)>,
}

impl Image {
    fn read(&self, off: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        // Past the end of the file reads as zeroes (qemu-img leaves tables there).
        let n = self.file_len.saturating_sub(off).min(len) as usize;
        if n > 0 {
            self.file.read_exact_at(&mut b[..n], off)?;
        }
        Ok(b)
    }

    fn table(&self, off: u64, entries: u64) -> io::Result<Vec<u64>> {
        if entries * 8 > MAX_TABLE {
            return Err(io::Error::other(format!("a table of {entries} entries")));
        }
        let b = self.read(off, entries * 8)?;
        Ok(b.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }

    fn refcount_bits(&self) -> u32 {
        self.header.refcount_bits()
    }

    fn per_block(&self) -> u64 {
        self.cluster * 8 / u64::from(self.refcount_bits())
    }

    /// The stored refcount of cluster `c`, and where it lives (block offset, index), if
    /// it has a block.
    fn stored(
        &self,
        c: u64,
        blocks: &mut HashMap<u64, Vec<u8>>,
    ) -> io::Result<(u64, Option<(u64, u64)>)> {
        let (ti, bi) = (c / self.per_block(), c % self.per_block());
        let Some(&e) = self.refcount_table.get(ti as usize) else {
            return Ok((0, None));
        };
        let block = e & !(self.cluster - 1);
        if block == 0 || block >= self.file_len {
            return Ok((0, None));
        }
        if let std::collections::hash_map::Entry::Vacant(v) = blocks.entry(block) {
            v.insert(self.read(block, self.cluster)?);
        }
        let v = Meta::get_bits(&blocks[&block], bi, self.refcount_bits());
        Ok((v, Some((block, bi))))
    }
}

fn open(path: &Path, writable: bool) -> Result<Image, StorageError> {
    let file = File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| {
            StorageError::new(StorageErrorKind::Open, format!("{}: {e}", path.display()))
        })?;
    let file_len = file.metadata().map_err(|e| invalid(path, e))?.len();
    let mut first = vec![0u8; 65536.min(file_len as usize).max(104)];
    let n = (file_len as usize).min(first.len());
    file.read_exact_at(&mut first[..n], 0)
        .map_err(|e| invalid(path, format!("reading the header: {e}")))?;
    let header = Header::parse(&first, file_len).map_err(|e| invalid(path, e))?;
    // What the check would misread (and a repair damage): refused, as for opening.
    let known = super::header::INCOMPAT_DIRTY
        | super::header::INCOMPAT_CORRUPT
        | super::header::INCOMPAT_COMPRESSION;
    if header.data_file || header.incompatible & super::header::INCOMPAT_DATA_FILE != 0 {
        return Err(invalid(path, "an external data file: not checked here"));
    }
    if header.incompatible & super::header::INCOMPAT_EXTL2 != 0 {
        return Err(invalid(
            path,
            "subclusters (extended L2 entries): not checked here",
        ));
    }
    if header.incompatible & !known != 0 {
        return Err(invalid(
            path,
            format!(
                "incompatible features {:#x}: not checked here",
                header.incompatible & !known
            ),
        ));
    }
    if header.crypt_method == 1 {
        return Err(invalid(
            path,
            "legacy AES-CBC encryption (crypt_method 1): not checked here",
        ));
    }
    if writable && header.bitmaps {
        return Err(invalid(
            path,
            "persistent dirty bitmaps (their clusters are not counted here): not repaired",
        ));
    }
    let bits = header.cluster_bits;
    let mut img = Image {
        file,
        file_len,
        bits,
        cluster: 1 << bits,
        l1: Vec::new(),
        refcount_table: Vec::new(),
        snapshot_l1s: Vec::new(),
        snapshot_table: None,
        header: header.clone(),
    };
    let io = |what: &str, e: io::Error| invalid(path, format!("reading the {what}: {e}"));
    img.l1 = img
        .table(header.l1_table_offset, u64::from(header.l1_size))
        .map_err(|e| io("L1 table", e))?;
    img.refcount_table = img
        .table(
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * img.cluster / 8,
        )
        .map_err(|e| io("refcount table", e))?;
    // Internal snapshots: each has an L1 table of its own (their table entries: L1
    // offset, L1 size, id and name lengths, then fixed fields and extra data, padded to 8).
    // (QEMU's limits: 65536 snapshots, a table of 64 MiB, 1 KiB of extra data each.)
    if header.nb_snapshots > 65536 {
        return Err(invalid(
            path,
            format!("{} internal snapshots", header.nb_snapshots),
        ));
    }
    if header.nb_snapshots > 0 {
        let start = be64(&first, 64);
        let mut at = start;
        for _ in 0..header.nb_snapshots {
            let fixed = img.read(at, 40).map_err(|e| io("snapshot table", e))?;
            let l1_off = be64(&fixed, 0);
            let l1_size = u32::from_be_bytes(fixed[8..12].try_into().expect("4"));
            let id_len = u16::from_be_bytes(fixed[12..14].try_into().expect("2"));
            let name_len = u16::from_be_bytes(fixed[14..16].try_into().expect("2"));
            let extra = u32::from_be_bytes(fixed[36..40].try_into().expect("4"));
            if extra > 1024 || u64::from(l1_size) * 8 > MAX_TABLE {
                return Err(invalid(path, "a snapshot table entry out of bounds"));
            }
            img.snapshot_l1s.push((l1_off, l1_size));
            let entry =
                (40 + u64::from(extra) + u64::from(id_len) + u64::from(name_len)).div_ceil(8) * 8;
            at = at
                .checked_add(entry)
                .filter(|&e| e - start <= MAX_TABLE)
                .ok_or_else(|| invalid(path, "the snapshot table is larger than 64 MiB"))?;
        }
        img.snapshot_table = Some((start, at - start));
    }
    Ok(img)
}

/// A problem with one L2 entry, found while counting.
struct BadEntry {
    /// The L2 table and the entry's index in it.
    table: u64,
    index: usize,
}

/// The counts of one pass over the image.
#[derive(Default)]
struct Counts {
    refs: BTreeMap<u64, u64>,
    corruptions: u64,
    check_errors: u64,
    messages: Vec<String>,
    /// Active L2 entries that point past the end of the file.
    outside: Vec<BadEntry>,
    /// Active L2 tables (offset) and data entries (table, index, host) for COPIED checks.
    active_l2: Vec<(usize, u64)>,
    active_data: Vec<(u64, usize, u64)>,
    seen_l2: std::collections::HashSet<u64>,
    /// Data and compressed clusters the active tables map.
    allocated: u64,
}

impl Counts {
    /// Counts a use of `[off, off + len)`; one that ends a cluster or more past the end of
    /// the file is a corruption and is not counted (as QEMU does).
    fn inc(&mut self, img: &Image, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = match off.checked_add(len) {
            Some(end) if end <= img.file_len.saturating_add(img.cluster) => end,
            _ => {
                self.error(format!(
                    "offset={off:#x} size={len:#x}: cluster is outside the image"
                ));
                return;
            }
        };
        for c in (off >> img.bits)..=((end - 1) >> img.bits) {
            *self.refs.entry(c).or_default() += 1;
        }
    }

    fn error(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(format!("ERROR {msg}"));
    }
}

/// Counts every use of every cluster.
fn count(img: &Image) -> Counts {
    let mut n = Counts::default();
    let h = &img.header;
    n.inc(img, 0, img.cluster);
    n.inc(img, h.l1_table_offset, u64::from(h.l1_size) * 8);
    n.inc(
        img,
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * img.cluster,
    );
    for (i, &e) in img.refcount_table.iter().enumerate() {
        let block = e & !(img.cluster - 1);
        if block == 0 {
            continue;
        }
        if e & (img.cluster - 1) != 0 || block >= img.file_len {
            n.error(format!(
                "refcount block {i} is not cluster aligned or past the end of the file; \
                 refcount table entry corrupted"
            ));
            continue;
        }
        n.inc(img, block, img.cluster);
    }
    if let Some((off, len)) = img.snapshot_table {
        n.inc(img, off, len);
    }
    // An encrypted image's LUKS header and key material (QEMU counts them too).
    if let Some((off, len)) = h.crypto {
        n.inc(img, off, len);
    }
    for &(off, size) in &img.snapshot_l1s {
        if off & (img.cluster - 1) != 0 {
            n.error(format!(
                "snapshot L1 table at {off:#x} is not cluster aligned"
            ));
            continue;
        }
        n.inc(img, off, u64::from(size) * 8);
        match img.table(off, u64::from(size)) {
            Ok(l1) => count_l1(img, &l1, false, &mut n),
            Err(e) => {
                n.check_errors += 1;
                n.messages.push(format!(
                    "ERROR reading a snapshot's L1 table at {off:#x}: {e}"
                ));
            }
        }
    }
    count_l1(img, &img.l1, true, &mut n);
    n
}

/// Counts an L1 table's L2 tables and their data (`active`: the image's own, whose
/// entries are also kept for the COPIED checks and repairs).
fn count_l1(img: &Image, l1: &[u64], active: bool, n: &mut Counts) {
    let entries = img.cluster / 8;
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if l2 & (img.cluster - 1) != 0 {
            n.error(format!(
                "l2_offset={l2:#x}: the L2 table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        if l2 >= img.file_len {
            n.error(format!(
                "l2_offset={l2:#x}: the L2 table is past the end of the file"
            ));
            continue;
        }
        n.inc(img, l2, img.cluster);
        let table = match img.table(l2, entries) {
            Ok(t) => t,
            Err(e) => {
                n.check_errors += 1;
                n.messages
                    .push(format!("ERROR reading the L2 table at {l2:#x}: {e}"));
                continue;
            }
        };
        // An L2 table named twice is counted twice, but its entries checked once.
        let first_visit = active && n.seen_l2.insert(l2);
        if active {
            n.active_l2.push((i, l2));
        }
        for (j, &e) in table.iter().enumerate() {
            if e & COMPRESSED != 0 {
                if e & COPIED != 0 {
                    n.error(format!("compressed cluster entry {e:#x} has COPIED set"));
                }
                if active {
                    n.allocated += 1;
                }
                // Counted once in every host cluster its sectors touch (as QEMU does).
                let x = 62 - (img.bits - 8);
                let offset = e & ((1u64 << x) - 1);
                let sectors = ((e & !COPIED & !COMPRESSED) >> x) + 1;
                let start = offset & !511;
                n.inc(img, start, sectors * 512);
                continue;
            }
            let host = e & OFFSET_MASK;
            if host == 0 {
                continue;
            }
            if host & (img.cluster - 1) != 0 {
                // Counted where it lands (two clusters), as QEMU counts it.
                n.error(format!(
                    "offset={host:#x}: the data cluster is not cluster aligned; L2 entry corrupted"
                ));
                n.inc(img, host, img.cluster);
                continue;
            }
            if host >= img.file_len {
                n.error(format!(
                    "offset={host:#x}: the data cluster is past the end of the file"
                ));
                if active {
                    n.outside.push(BadEntry {
                        table: l2,
                        index: j,
                    });
                }
                continue;
            }
            n.inc(img, host, img.cluster);
            if active {
                n.allocated += 1;
                if first_visit {
                    n.active_data.push((l2, j, host));
                }
            }
        }
    }
}

/// Compares counts with stored refcounts: (corruptions, leaks, messages, mismatches as
/// (cluster, stored, counted, where)).
#[allow(clippy::type_complexity)]
fn compare(
    img: &Image,
    n: &Counts,
    blocks: &mut HashMap<u64, Vec<u8>>,
) -> io::Result<(
    u64,
    u64,
    Vec<String>,
    Vec<(u64, u64, u64, Option<(u64, u64)>)>,
)> {
    let mut corruptions = 0;
    let mut leaks = 0;
    let mut msgs = Vec::new();
    let mut bad = Vec::new();
    // Every cluster in the file or counted, and every cluster a refcount block covers.
    // The clusters of the file (a use past its end is a corruption already).
    let end = img.file_len.div_ceil(img.cluster);
    for c in 0..end {
        let counted = n.refs.get(&c).copied().unwrap_or(0);
        let (stored, at) = img.stored(c, blocks)?;
        if stored == counted {
            continue;
        }
        if stored < counted {
            corruptions += 1;
            msgs.push(format!(
                "ERROR cluster {c} refcount={stored} reference={counted}"
            ));
        } else {
            leaks += 1;
            msgs.push(format!(
                "Leaked cluster {c} refcount={stored} reference={counted}"
            ));
        }
        bad.push((c, stored, counted, at));
    }
    Ok((corruptions, leaks, msgs, bad))
}

/// COPIED flags that disagree with their cluster's stored refcount (active tables only):
/// L1 entries by index, and L2 entries by table and index, each with whether COPIED should
/// be set.
struct CopiedFixes {
    l1: Vec<(usize, bool)>,
    l2: Vec<(u64, usize, bool)>,
}

fn copied_mismatches(
    img: &Image,
    n: &Counts,
    blocks: &mut HashMap<u64, Vec<u8>>,
) -> io::Result<CopiedFixes> {
    let mut l1_fix = Vec::new();
    for &(i, l2) in &n.active_l2 {
        let one = img.stored(l2 >> img.bits, blocks)?.0 == 1;
        if (img.l1[i] & COPIED != 0) != one {
            l1_fix.push((i, one));
        }
    }
    let mut l2_fix = Vec::new();
    let mut tables: HashMap<u64, Vec<u64>> = HashMap::new();
    for &(table, j, host) in &n.active_data {
        let one = img.stored(host >> img.bits, blocks)?.0 == 1;
        if let std::collections::hash_map::Entry::Vacant(v) = tables.entry(table) {
            v.insert(img.table(table, img.cluster / 8)?);
        }
        if (tables[&table][j] & COPIED != 0) != one {
            l2_fix.push((table, j, one));
        }
    }
    Ok(CopiedFixes {
        l1: l1_fix,
        l2: l2_fix,
    })
}

fn pass(img: &Image) -> io::Result<(CheckReport, Counts, HashMap<u64, Vec<u8>>)> {
    let n = count(img);
    let mut blocks = HashMap::new();
    let (corruptions, leaks, msgs, _) = compare(img, &n, &mut blocks)?;
    let mut last_stored = 0;
    for c in (0..img.file_len.div_ceil(img.cluster)).rev() {
        if img.stored(c, &mut blocks)?.0 != 0 {
            last_stored = c + 1;
            break;
        }
    }
    let CopiedFixes {
        l1: l1_fix,
        l2: l2_fix,
    } = copied_mismatches(img, &n, &mut blocks)?;
    let mut messages = n.messages.clone();
    messages.extend(msgs);
    for (i, one) in &l1_fix {
        messages.push(format!(
            "ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={:#x} refcount is{} 1",
            img.l1[*i],
            if *one { "" } else { " not" }
        ));
    }
    for (t, j, one) in &l2_fix {
        messages.push(format!(
            "ERROR OFLAG_COPIED data cluster: L2 table {t:#x} entry {j}: refcount is{} 1",
            if *one { "" } else { " not" }
        ));
    }
    let allocated = n.allocated;
    // As qemu-img reports it: past the last cluster that is used or has a refcount.
    let used_end = n
        .refs
        .keys()
        .next_back()
        .map_or(0, |c| c + 1)
        .max(last_stored);
    let report = CheckReport {
        corruptions: n.corruptions + corruptions + (l1_fix.len() + l2_fix.len()) as u64,
        leaks,
        check_errors: n.check_errors,
        messages,
        image_end_offset: used_end * img.cluster,
        total_clusters: img.header.size.div_ceil(img.cluster),
        allocated_clusters: allocated,
        format: "qcow2",
        ..CheckReport::default()
    };
    Ok((report, n, blocks))
}

/// Checks the qcow2 image at `path`, repairing as `repair` says (the image must not be in
/// use: repairs write it).
pub fn check(path: &Path, repair: Repair) -> Result<CheckReport, StorageError> {
    let img = open(path, repair != Repair::None)?;
    let _lock = if repair == Repair::None {
        None
    } else {
        // Held as a writer holds it until the repair is done: refused while QEMU or a
        // daemon has the image open, and none opens it meanwhile.
        crate::disk::lock::ImageLock::take(&img.file, path, false, crate::disk::lock::Locking::On)?
    };
    let io = |what: &str, e: io::Error| {
        StorageError::new(
            StorageErrorKind::Io,
            format!("{}: {what}: {e}", path.display()),
        )
    };
    let (before, n, mut blocks) = pass(&img).map_err(|e| io("checking", e))?;
    if repair == Repair::None || (before.corruptions == 0 && before.leaks == 0) {
        return Ok(before);
    }
    if before.check_errors > 0 {
        // Uses not counted would look leaked: a repair would free clusters in use.
        return Err(invalid(
            path,
            "not repaired: part of the metadata could not be read (see the check)",
        ));
    }
    let sync = |f: &File| f.sync_data().map_err(|e| io("syncing", e));
    if repair == Repair::All && !n.outside.is_empty() {
        // Entries past the end of the file read as zeroes from now on (their data never
        // existed), as QEMU repairs them; not in an L2 table a snapshot shares.
        let zero = if img.header.version >= 3 { ZERO } else { 0 };
        for bad in &n.outside {
            if img
                .stored(bad.table >> img.bits, &mut blocks)
                .map_err(|e| io("reading a refcount", e))?
                .0
                != 1
            {
                continue;
            }
            let at = bad.table + bad.index as u64 * 8;
            img.file
                .write_all_at(&zero.to_be_bytes(), at)
                .map_err(|e| io("repairing an L2 entry", e))?;
        }
        sync(&img.file)?;
    }
    // Refcounts from what is in use now: raised first (all), then lowered (leaks).
    let n = count(&img);
    let (_, _, _, bad) = compare(&img, &n, &mut blocks).map_err(|e| io("checking", e))?;
    let max = if img.refcount_bits() >= 64 {
        u64::MAX
    } else {
        (1u64 << img.refcount_bits()) - 1
    };
    let mut changed: BTreeMap<u64, ()> = BTreeMap::new();
    for raise in [true, false] {
        for &(_, stored, counted, at) in &bad {
            let Some((block, i)) = at else { continue };
            let wanted = if raise {
                counted > stored
            } else {
                counted < stored
            };
            if !wanted || (raise && repair != Repair::All) || counted > max {
                continue;
            }
            let b = blocks.get_mut(&block).expect("read while comparing");
            Meta::put_bits(b, i, img.refcount_bits(), counted);
            changed.insert(block, ());
        }
        for block in changed.keys() {
            img.file
                .write_all_at(&blocks[block], *block)
                .map_err(|e| io("writing a refcount block", e))?;
        }
        sync(&img.file)?;
    }
    {
        // COPIED flags follow the refcounts now; lowering refcounts (leaks) only ever sets
        // them, so that a leak repair never leaves a corruption behind.
        let CopiedFixes {
            l1: mut l1_fix,
            l2: mut l2_fix,
        } = copied_mismatches(&img, &n, &mut blocks).map_err(|e| io("checking", e))?;
        if repair == Repair::Leaks {
            l1_fix.retain(|&(_, one)| one);
            l2_fix.retain(|&(_, _, one)| one);
        }
        for (t, j, one) in l2_fix {
            let at = t + j as u64 * 8;
            let mut e = [0u8; 8];
            img.file
                .read_exact_at(&mut e, at)
                .map_err(|e| io("reading", e))?;
            let v = u64::from_be_bytes(e);
            let v = if one { v | COPIED } else { v & !COPIED };
            img.file
                .write_all_at(&v.to_be_bytes(), at)
                .map_err(|e| io("repairing a COPIED flag", e))?;
        }
        for (i, one) in l1_fix {
            let at = img.header.l1_table_offset + i as u64 * 8;
            let v = img.l1[i];
            let v = if one { v | COPIED } else { v & !COPIED };
            img.file
                .write_all_at(&v.to_be_bytes(), at)
                .map_err(|e| io("repairing a COPIED flag", e))?;
        }
        sync(&img.file)?;
    }
    let img = open(path, false)?;
    let (after, _, _) = pass(&img).map_err(|e| io("checking again", e))?;
    Ok(CheckReport {
        corruptions_fixed: before.corruptions.saturating_sub(after.corruptions),
        leaks_fixed: before.leaks.saturating_sub(after.leaks),
        messages: before.messages,
        ..after
    })
}
