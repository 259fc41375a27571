//! A descriptor chain as two byte streams, as VIRTIO_F_ANY_LAYOUT allows: the readable part
//! (a request: a virtio-blk header and data, a FUSE message) and the writable part (room for
//! data and the reply). Every guest address is
//! translated through the guest memory map with its length before any host pointer is
//! formed, so nothing here can reach outside guest memory.

use std::sync::Arc;

use storage_core::iov::IoVecs;
use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::MS;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

/// Most descriptors one chain may have.
pub const MAX_SEGMENTS: usize = 1024;
/// Most iovecs one request's data may become (the kernel's IOV_MAX).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

/// The chain is not usable: too long, readable after writable, or outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed descriptor chain")]
pub struct BadChain;

/// A collected chain: its byte counts and what, if anything, is wrong with its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub readable: u64,
    pub writable: u64,
    /// More than [`MAX_SEGMENTS`] descriptors (only the first ones were collected).
    pub too_long: bool,
    /// A readable descriptor after a writable one.
    pub misordered: bool,
}

const DESC_SIZE: usize = std::mem::size_of::<Descriptor>();
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_INDIRECT: u16 = 4;

/// The descriptors of one chain, read straight from its descriptor table.
///
/// Yields exactly what virtio-queue's `DescriptorChain` iterator yields, with the same limits
/// (at most as many descriptors as the table has entries, one level of indirection through
/// a table whose length is a multiple of 16 and at most 65535 entries, 4 GiB per chain,
/// nothing more after a descriptor cannot be read), but translates each table through the
/// memory map once instead of for every descriptor: with a read through the map per
/// descriptor, walking chains was a quarter of the worker's time on the null device. A table
/// that does not lie within one memory region is read descriptor by descriptor, as before.
pub struct Descriptors<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    /// The current table: its guest address, entry count, and its mapping if it lies within
    /// one region.
    table: GuestAddress,
    entries: u16,
    mapped: Option<VolatileSlice<'a, MS<'a, M>>>,
    next_index: u16,
    ttl: u16,
    indirect: bool,
    yielded: u32,
}

impl<'a, M: GuestMemoryBackend> Descriptors<'a, M> {
    /// The chain starting at `head` in the queue's descriptor table at `table`, of
    /// `queue_size` entries.
    pub fn new(mem: &'a M, table: GuestAddress, queue_size: u16, head: u16) -> Self {
        let mut d = Descriptors {
            mem,
            table,
            entries: 0,
            mapped: None,
            next_index: head,
            ttl: queue_size,
            indirect: false,
            yielded: 0,
        };
        d.set_table(table, queue_size);
        d
    }

    fn set_table(&mut self, table: GuestAddress, entries: u16) {
        let len = usize::from(entries) * DESC_SIZE;
        self.table = table;
        self.entries = entries;
        self.mapped = self
            .mem
            .get_slice(table, len)
            .ok()
            .filter(|s| s.len() == len);
    }

    fn read(&self, index: u16) -> Option<Descriptor> {
        let offset = usize::from(index) * DESC_SIZE;
        let raw: [u8; DESC_SIZE] = match &self.mapped {
            Some(slice) => {
                // `index < entries` (checked by the caller), so the 16 bytes lie inside the
                // slice.
                let guard = slice.ptr_guard();
                // SAFETY: the slice maps `entries * 16` bytes of guest memory, valid for
                // reads while `mem` is borrowed ('a); `offset + 16` is within it. A byte
                // array has alignment 1, and a volatile read tolerates the guest writing
                // concurrently (we only ever see some value of each byte).
                unsafe { std::ptr::read_volatile(guard.as_ptr().add(offset).cast()) }
            }
            None => self
                .mem
                .read_obj::<[u8; DESC_SIZE]>(self.table.checked_add(offset as u64)?)
                .ok()?,
        };
        let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
        Some(Descriptor::new(
            u64::from_le_bytes(raw[0..8].try_into().ok()?),
            u32::from_le_bytes(raw[8..12].try_into().ok()?),
            u16_at(12),
            u16_at(14),
        ))
    }
}

impl<M: GuestMemoryBackend> Iterator for Descriptors<'_, M> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        loop {
            if self.ttl == 0 || self.next_index >= self.entries {
                return None;
            }
            let desc = self.read(self.next_index)?;
            if desc.flags() & VRING_DESC_F_INDIRECT != 0 {
                // One level only, a whole number of entries, at most 65535 of them
                // (VIRTIO 1.2, 2.7.5.3.1).
                let len = desc.len() as usize;
                if self.indirect
                    || !len.is_multiple_of(DESC_SIZE)
                    || len / DESC_SIZE > usize::from(u16::MAX)
                {
                    return None;
                }
                let entries = (len / DESC_SIZE) as u16;
                self.set_table(desc.addr(), entries);
                self.next_index = 0;
                self.ttl = entries;
                self.indirect = true;
                continue;
            }
            // A chain longer than 2^32 bytes is illegal (VIRTIO 1.2, 2.7.5.2).
            self.yielded = self.yielded.checked_add(desc.len())?;
            if desc.flags() & VRING_DESC_F_NEXT != 0 {
                self.next_index = desc.next();
                self.ttl -= 1;
            } else {
                self.ttl = 0;
            }
            return Some(desc);
        }
    }
}

/// Collects the chain's descriptors into `segments` (at most [`MAX_SEGMENTS`]), even when
/// its shape is wrong, so that a device can still find where to put an error status.
pub fn collect_all(
    descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    segments: &mut Vec<Segment>,
) -> Collected {
    segments.clear();
    let mut c = Collected {
        readable: 0,
        writable: 0,
        too_long: false,
        misordered: false,
    };
    for d in descriptors {
        if segments.len() == MAX_SEGMENTS {
            c.too_long = true;
            break;
        }
        let seg = Segment {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        };
        if seg.writable {
            c.writable += u64::from(seg.len);
        } else {
            if c.writable > 0 {
                c.misordered = true;
            }
            c.readable += u64::from(seg.len);
        }
        segments.push(seg);
    }
    c
}

/// Collects the chain's descriptors into `segments`; returns the readable and writable
/// byte counts, or `BadChain` for a chain that is too long or misordered.
pub fn collect(
    descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    segments: &mut Vec<Segment>,
) -> Result<(u64, u64), BadChain> {
    let c = collect_all(descriptors, segments);
    if c.too_long || c.misordered {
        return Err(BadChain);
    }
    Ok((c.readable, c.writable))
}

/// Visits the byte window `[skip, skip + len)` of one stream as guest ranges, in order.
fn for_each_range(
    segments: &[Segment],
    writable: bool,
    skip: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, u64) -> Result<(), BadChain>,
) -> Result<(), BadChain> {
    let (mut pos, end) = (0u64, skip.checked_add(len).ok_or(BadChain)?);
    for s in segments.iter().filter(|s| s.writable == writable) {
        let (s_start, s_end) = (pos, pos + u64::from(s.len));
        pos = s_end;
        let (a, b) = (s_start.max(skip), s_end.min(end));
        if a < b {
            let addr = s.addr.checked_add(a - s_start).ok_or(BadChain)?;
            f(addr, b - a)?;
        }
        if pos >= end {
            break;
        }
    }
    Ok(())
}

/// Copies `buf.len()` bytes of a stream starting at `skip`.
pub fn read_stream<M: GuestMemoryBackend>(
    segments: &[Segment],
    skip: u64,
    buf: &mut [u8],
    mem: &M,
) -> Result<(), BadChain> {
    let mut done = 0usize;
    for_each_range(segments, false, skip, buf.len() as u64, |addr, n| {
        let n = n as usize;
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|_| BadChain)?;
        done += n;
        Ok(())
    })?;
    if done == buf.len() {
        Ok(())
    } else {
        Err(BadChain)
    }
}

/// Copies `data` into the writable stream starting at `skip`.
pub fn write_stream<M: GuestMemoryBackend>(
    segments: &[Segment],
    skip: u64,
    data: &[u8],
    mem: &M,
) -> Result<(), BadChain> {
    let mut done = 0usize;
    for_each_range(segments, true, skip, data.len() as u64, |addr, n| {
        let n = n as usize;
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| BadChain)?;
        done += n;
        Ok(())
    })?;
    if done == data.len() {
        Ok(())
    } else {
        Err(BadChain)
    }
}

/// Describes the stream window `[skip, skip + len)` as buffers in guest memory, kept
/// mapped by `iov` (it holds a reference to `mem`, taken only if it does not hold one
/// already: `IoVecs::reset_to`) for as long as it holds them. At most
/// `iov`'s capacity of buffers, and never more than [`MAX_IOVECS`].
pub fn stream_to_iov<M: GuestMemoryBackend + Send + Sync + 'static>(
    segments: &[Segment],
    writable: bool,
    skip: u64,
    len: u64,
    mem: &Arc<M>,
    iov: &mut IoVecs,
) -> Result<(), BadChain> {
    iov.reset_to(mem);
    let described = for_each_range(segments, writable, skip, len, |addr, n| {
        for slice in mem.get_slices(addr, n as usize) {
            let slice = slice.map_err(|_| BadChain)?;
            if iov.count() == MAX_IOVECS {
                return Err(BadChain);
            }
            // SAFETY: the slice was translated from `mem` (checked against its regions,
            // with its length), which `iov` keeps alive as its keep-alive (set above).
            unsafe { iov.push(slice.ptr_guard_mut().as_ptr(), slice.len()) }
                .map_err(|_| BadChain)?;
        }
        Ok(())
    });
    if described.is_ok() && iov.len() == len {
        Ok(())
    } else {
        // No half-described request is left behind (the keep-alive stays, see `reset_to`).
        iov.clear_buffers();
        Err(BadChain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn streams_span_segments_and_stay_inside_memory() {
        let m = mem();
        m.write_slice(b"abcdef", GuestAddress(0x100)).unwrap();
        m.write_slice(b"ghij", GuestAddress(0x200)).unwrap();
        let segs = [
            Segment {
                addr: GuestAddress(0x100),
                len: 6,
                writable: false,
            },
            Segment {
                addr: GuestAddress(0x200),
                len: 4,
                writable: false,
            },
            Segment {
                addr: GuestAddress(0x300),
                len: 8,
                writable: true,
            },
        ];
        let mut buf = [0u8; 6];
        read_stream(&segs, 3, &mut buf, &m).unwrap();
        assert_eq!(&buf, b"defghi");
        let mut big = [0u8; 11];
        assert_eq!(read_stream(&segs, 0, &mut big, &m), Err(BadChain));
        write_stream(&segs, 2, b"xyz", &m).unwrap();
        let mut out = [0u8; 3];
        m.read_slice(&mut out, GuestAddress(0x302)).unwrap();
        assert_eq!(&out, b"xyz");
        assert_eq!(write_stream(&segs, 6, b"xyz", &m), Err(BadChain));
        // A segment pointing past guest memory never becomes an iovec.
        let outside = [Segment {
            addr: GuestAddress(0xff00),
            len: 0x1000,
            writable: true,
        }];
        let mut iov = IoVecs::with_capacity(MAX_IOVECS);
        assert_eq!(
            stream_to_iov(&outside, true, 0, 0x1000, &Arc::new(m), &mut iov),
            Err(BadChain)
        );
    }
}
