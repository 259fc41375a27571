//! A descriptor chain as two byte streams, as VIRTIO_F_ANY_LAYOUT allows: the readable part
//! (a request: a virtio-blk header and data, a FUSE message) and the writable part (room for
//! data and the reply). Every guest address is
//! translated through the guest memory map with its length before any host pointer is
//! formed, so nothing here can reach outside guest memory.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

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

/// Describes the stream window `[skip, skip + len)` as host iovecs into guest memory.
pub fn stream_to_iov<M: GuestMemoryBackend>(
    segments: &[Segment],
    writable: bool,
    skip: u64,
    len: u64,
    mem: &M,
    iov: &mut Vec<libc::iovec>,
) -> Result<(), BadChain> {
    iov.clear();
    let mut total = 0u64;
    for_each_range(segments, writable, skip, len, |addr, n| {
        for slice in mem.get_slices(addr, n as usize) {
            let slice = slice.map_err(|_| BadChain)?;
            if iov.len() == MAX_IOVECS {
                return Err(BadChain);
            }
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
            total += slice.len() as u64;
        }
        Ok(())
    })?;
    if total == len {
        Ok(())
    } else {
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
        let mut iov = Vec::new();
        assert_eq!(
            stream_to_iov(&outside, true, 0, 0x1000, &m, &mut iov),
            Err(BadChain)
        );
    }
}
