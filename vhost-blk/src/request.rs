//! Turning a guest's descriptor chain into a virtio-blk request.
//!
//! The chain is untrusted input. It is read as two byte streams, as VIRTIO_F_ANY_LAYOUT
//! allows: the readable part (header, then data for writes and discard segments) and the
//! writable part (data for reads, then the status byte, always the last writable byte).
//! Every guest address is translated through the guest memory map with its length before any
//! host pointer is formed, so a request can never reach outside guest memory; data buffers
//! become iovecs into guest memory, used in place.

use std::sync::Arc;

use daemon_support::chain::{collect_all, read_stream, stream_to_iov};
use vm_memory::{Address, GuestMemoryBackend};

use storage_core::metrics::{ErrorClass, OpClass};
use storage_core::units::{Sector, SECTOR_SIZE};

use crate::virtio_blk::*;

pub use daemon_support::chain::{Segment, MAX_IOVECS, MAX_SEGMENTS};
pub use storage_core::iov::IoVecs;

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at `offset` into the iovecs.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write `len` bytes at `offset` from the iovecs.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Copy the serial number into the iovecs (at most `len` bytes).
    GetId {
        len: u64,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

impl RequestKind {
    pub fn class(&self) -> OpClass {
        match self {
            RequestKind::Read { .. } => OpClass::Read,
            RequestKind::Write { .. } => OpClass::Write,
            RequestKind::Flush => OpClass::Flush,
            RequestKind::GetId { .. } => OpClass::Other,
            RequestKind::Discard { .. } => OpClass::Discard,
            RequestKind::WriteZeroes { .. } => OpClass::WriteZeroes,
        }
    }
}

/// Where the status byte lives in guest memory, as a host pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusByte(*mut u8);

impl StatusByte {
    /// A placeholder for an idle request slot; never written.
    pub fn dangling() -> Self {
        StatusByte(std::ptr::NonNull::dangling().as_ptr())
    }

    /// Writes the status.
    ///
    /// # Safety
    ///
    /// The guest memory mapping this pointer was translated from must still be mapped (the
    /// caller holds a reference to it).
    pub unsafe fn write(self, status: u8) {
        // SAFETY: the pointer was produced by translating a 1-byte range of guest memory
        // (see `parse`), and the caller guarantees that mapping is still alive. Volatile,
        // because the guest may access the same memory concurrently.
        unsafe { std::ptr::write_volatile(self.0, status) }
    }
}

/// A request that cannot be served, with what to tell the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: u8,
    pub class: OpClass,
    pub error: ErrorClass,
}

/// The outcome of parsing one chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A request to serve: its data iovecs are in the caller's buffer.
    Request {
        kind: RequestKind,
        status: StatusByte,
    },
    /// A request answered with an error status at once.
    Refused {
        status: StatusByte,
        refusal: Refusal,
    },
    /// A chain with nowhere to put a status byte: it is returned unused (used length 0).
    Dropped,
}

fn refuse(status: StatusByte, st: u8, class: OpClass, error: ErrorClass) -> Parsed {
    Parsed::Refused {
        status,
        refusal: Refusal {
            status: st,
            class,
            error,
        },
    }
}

/// Parses the descriptors of one chain.
///
/// `segments` and `iov` are the caller's preallocated scratch space (cleared here, never
/// grown beyond [`MAX_SEGMENTS`] / [`MAX_IOVECS`]); on `Parsed::Request` with data, `iov`
/// describes the data buffers in guest memory, and keeps `mem` alive while it holds them.
/// `capacity` is the disk size in bytes.
pub fn parse<M: GuestMemoryBackend + Send + Sync + 'static>(
    descriptors: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
    mem: &Arc<M>,
    capacity: u64,
    segments: &mut Vec<Segment>,
    iov: &mut IoVecs,
) -> Parsed {
    // Entries only: the keep-alive stays when it is `mem` already (`IoVecs::reset_to`).
    iov.clear_buffers();
    let chain = collect_all(descriptors, segments);
    let (readable, writable) = (chain.readable, chain.writable);

    // The status byte is the last writable byte; without one the guest cannot be answered.
    let Some(status) = status_byte(segments, &**mem) else {
        return Parsed::Dropped;
    };
    let malformed = |class| refuse(status, VIRTIO_BLK_S_IOERR, class, ErrorClass::Malformed);
    if chain.too_long || chain.misordered || readable < REQUEST_HEADER_LEN as u64 {
        return malformed(OpClass::Other);
    }
    let mut header = [0u8; REQUEST_HEADER_LEN];
    if read_stream(segments, 0, &mut header, &**mem).is_err() {
        return malformed(OpClass::Other);
    }
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = Sector(u64::from_le_bytes(
        header[8..16].try_into().unwrap_or_default(),
    ));
    let data_in = writable - 1;
    let data_out = readable - REQUEST_HEADER_LEN as u64;

    let in_range = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|e| e <= capacity);
    match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (class, len, from_writable, skip) = if req_type == VIRTIO_BLK_T_IN {
                (OpClass::Read, data_in, true, 0)
            } else {
                (OpClass::Write, data_out, false, REQUEST_HEADER_LEN as u64)
            };
            if len % SECTOR_SIZE != 0 {
                return malformed(class);
            }
            let Some(offset) = sector.byte_offset().filter(|o| in_range(*o, len)) else {
                return refuse(status, VIRTIO_BLK_S_IOERR, class, ErrorClass::OutOfRange);
            };
            if stream_to_iov(segments, from_writable, skip, len, mem, iov).is_err() {
                return malformed(class);
            }
            let kind = if req_type == VIRTIO_BLK_T_IN {
                RequestKind::Read { offset, len }
            } else {
                RequestKind::Write { offset, len }
            };
            Parsed::Request { kind, status }
        }
        VIRTIO_BLK_T_FLUSH => Parsed::Request {
            kind: RequestKind::Flush,
            status,
        },
        VIRTIO_BLK_T_GET_ID => {
            let len = data_in.min(ID_LEN as u64);
            if stream_to_iov(segments, true, 0, len, mem, iov).is_err() {
                return malformed(OpClass::Other);
            }
            Parsed::Request {
                kind: RequestKind::GetId { len },
                status,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let class = if discard {
                OpClass::Discard
            } else {
                OpClass::WriteZeroes
            };
            // We advertise one segment per request (max_discard_seg = 1).
            if data_out != DISCARD_SEGMENT_LEN as u64 {
                return malformed(class);
            }
            let mut seg = [0u8; DISCARD_SEGMENT_LEN];
            if read_stream(segments, REQUEST_HEADER_LEN as u64, &mut seg, &**mem).is_err() {
                return malformed(class);
            }
            let sector = Sector(u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default()));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
            // Unknown flags, or unmap on a discard, are unsupported (virtio 1.2, 5.2.6.2).
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return refuse(status, VIRTIO_BLK_S_UNSUPP, class, ErrorClass::Unsupported);
            }
            if sectors > MAX_DISCARD_SECTORS {
                return malformed(class);
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let Some(offset) = sector.byte_offset().filter(|o| in_range(*o, len)) else {
                return refuse(status, VIRTIO_BLK_S_IOERR, class, ErrorClass::OutOfRange);
            };
            let kind = if discard {
                RequestKind::Discard { offset, len }
            } else {
                RequestKind::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            };
            Parsed::Request { kind, status }
        }
        _ => refuse(
            status,
            VIRTIO_BLK_S_UNSUPP,
            OpClass::Other,
            ErrorClass::Unsupported,
        ),
    }
}

/// The host address of the last writable byte of the chain, if it is valid guest memory.
fn status_byte<M: GuestMemoryBackend>(segments: &[Segment], mem: &M) -> Option<StatusByte> {
    let last = segments.iter().rev().find(|s| s.writable && s.len > 0)?;
    let addr = last.addr.checked_add(u64::from(last.len) - 1)?;
    let slice = mem.get_slice(addr, 1).ok()?;
    Some(StatusByte(slice.ptr_guard_mut().as_ptr()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    const MEM: u64 = 0x10_0000;
    const CAPACITY: u64 = 1 << 20; // 2048 sectors
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const R: u16 = 0;
    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap<()>, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn host(m: &GuestMemoryMmap<()>, addr: u64) -> *mut u8 {
        m.get_host_address(GuestAddress(addr)).unwrap()
    }

    /// Parses a chain built from `descs`; returns the outcome and the iovecs.
    fn run(m: &GuestMemoryMmap<()>, descs: &[RawDescriptor]) -> (Parsed, Vec<libc::iovec>) {
        let q = MockSplitQueue::new(m, 256);
        let chain = q.build_desc_chain(descs).unwrap();
        let (mut segs, mut iov) = (Vec::new(), IoVecs::with_capacity(MAX_IOVECS));
        let parsed = parse(chain, &Arc::new(m.clone()), CAPACITY, &mut segs, &mut iov);
        (parsed, iov.as_slice().to_vec())
    }

    fn refusal(p: Parsed) -> Refusal {
        match p {
            Parsed::Refused { refusal, .. } => refusal,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn read_becomes_iovecs_into_guest_memory() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let (p, iov) = run(
            &m,
            &[desc(HDR, 16, R), desc(DATA, 4096, W), desc(STATUS, 1, W)],
        );
        assert_eq!(
            p,
            Parsed::Request {
                kind: RequestKind::Read {
                    offset: 4096,
                    len: 4096
                },
                status: StatusByte(host(&m, STATUS)),
            }
        );
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_base as *mut u8, host(&m, DATA));
        assert_eq!(iov[0].iov_len, 4096);
    }

    #[test]
    fn write_with_scattered_data_and_merged_header() {
        let m = mem();
        // The header and the first data bytes share one descriptor (any layout).
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let (p, iov) = run(
            &m,
            &[
                desc(HDR, 16 + 512, R),
                desc(DATA, 1024, R),
                desc(STATUS, 1, W),
            ],
        );
        assert!(matches!(
            p,
            Parsed::Request {
                kind: RequestKind::Write {
                    offset: 0,
                    len: 1536
                },
                ..
            }
        ));
        assert_eq!(iov.len(), 2);
        assert_eq!(iov[0].iov_base as *mut u8, host(&m, HDR + 16));
        assert_eq!(iov[0].iov_len, 512);
        assert_eq!(iov[1].iov_len, 1024);
    }

    #[test]
    fn status_byte_is_the_last_writable_byte() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // Data and status share the last descriptor.
        let (p, iov) = run(&m, &[desc(HDR, 16, R), desc(DATA, 513, W)]);
        match p {
            Parsed::Request { kind, status } => {
                assert_eq!(
                    kind,
                    RequestKind::Read {
                        offset: 0,
                        len: 512
                    }
                );
                assert_eq!(status, StatusByte(host(&m, DATA + 512)));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(iov[0].iov_len, 512);
    }

    #[test]
    fn out_of_range_sectors_get_ioerr() {
        let m = mem();
        for sector in [2048 - 7, 2048, u64::MAX / 512 + 1, u64::MAX] {
            header(&m, VIRTIO_BLK_T_IN, sector);
            let (p, _) = run(
                &m,
                &[desc(HDR, 16, R), desc(DATA, 4096, W), desc(STATUS, 1, W)],
            );
            let r = refusal(p);
            assert_eq!(r.status, VIRTIO_BLK_S_IOERR, "sector {sector}");
            assert_eq!(r.error, ErrorClass::OutOfRange, "sector {sector}");
        }
        // The last full sector is fine.
        header(&m, VIRTIO_BLK_T_IN, 2047);
        let (p, _) = run(
            &m,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
        );
        assert!(matches!(p, Parsed::Request { .. }));
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let m = mem();
        for t in [2, 3, 10, 14, 99, u32::MAX] {
            header(&m, t, 0);
            let (p, _) = run(&m, &[desc(HDR, 16, R), desc(STATUS, 1, W)]);
            assert_eq!(refusal(p).status, VIRTIO_BLK_S_UNSUPP, "type {t}");
        }
    }

    #[test]
    fn malformed_chains_get_ioerr_or_are_dropped() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // No writable byte at all: nowhere to answer.
        assert_eq!(
            run(&m, &[desc(HDR, 16, R), desc(DATA, 512, R)]).0,
            Parsed::Dropped
        );
        // Status outside guest memory.
        assert_eq!(
            run(&m, &[desc(HDR, 16, R), desc(MEM + 4096, 1, W)]).0,
            Parsed::Dropped
        );
        // Header too short.
        let r = refusal(run(&m, &[desc(HDR, 8, R), desc(STATUS, 1, W)]).0);
        assert_eq!(
            (r.status, r.error),
            (VIRTIO_BLK_S_IOERR, ErrorClass::Malformed)
        );
        // Data not a whole number of sectors.
        let r = refusal(
            run(
                &m,
                &[desc(HDR, 16, R), desc(DATA, 100, W), desc(STATUS, 1, W)],
            )
            .0,
        );
        assert_eq!(r.error, ErrorClass::Malformed);
        // Data buffer outside guest memory.
        let r = refusal(
            run(
                &m,
                &[
                    desc(HDR, 16, R),
                    desc(MEM - 512, 1024, W),
                    desc(STATUS, 1, W),
                ],
            )
            .0,
        );
        assert_eq!(r.error, ErrorClass::Malformed);
        // A readable descriptor after a writable one.
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let r = refusal(
            run(
                &m,
                &[desc(HDR, 16, R), desc(STATUS, 1, W), desc(DATA, 512, R)],
            )
            .0,
        );
        assert_eq!(r.error, ErrorClass::Malformed);
    }

    fn discard_segment(m: &GuestMemoryMmap<()>, at: u64, sector: u64, n: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&n.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        discard_segment(&m, DATA, 16, 8, 0);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        assert!(matches!(
            run(&m, &chain).0,
            Parsed::Request {
                kind: RequestKind::Discard {
                    offset: 8192,
                    len: 4096
                },
                ..
            }
        ));
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        discard_segment(&m, DATA, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert!(matches!(
            run(&m, &chain).0,
            Parsed::Request {
                kind: RequestKind::WriteZeroes { unmap: true, .. },
                ..
            }
        ));
        // Unmap on a discard, or an unknown flag, is unsupported.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(refusal(run(&m, &chain).0).status, VIRTIO_BLK_S_UNSUPP);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        discard_segment(&m, DATA, 16, 8, 4);
        assert_eq!(refusal(run(&m, &chain).0).status, VIRTIO_BLK_S_UNSUPP);
        // Past the end of the disk.
        discard_segment(&m, DATA, 2047, 2, 0);
        assert_eq!(refusal(run(&m, &chain).0).error, ErrorClass::OutOfRange);
        // Two segments where one is advertised.
        discard_segment(&m, DATA, 0, 1, 0);
        discard_segment(&m, DATA + 16, 1, 1, 0);
        let r = refusal(
            run(
                &m,
                &[desc(HDR, 16, R), desc(DATA, 32, R), desc(STATUS, 1, W)],
            )
            .0,
        );
        assert_eq!(r.error, ErrorClass::Malformed);
    }

    #[test]
    fn flush_and_get_id() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert!(matches!(
            run(&m, &[desc(HDR, 16, R), desc(STATUS, 1, W)]).0,
            Parsed::Request {
                kind: RequestKind::Flush,
                ..
            }
        ));
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let (p, iov) = run(
            &m,
            &[desc(HDR, 16, R), desc(DATA, 64, W), desc(STATUS, 1, W)],
        );
        assert!(matches!(
            p,
            Parsed::Request {
                kind: RequestKind::GetId { len: 20 },
                ..
            }
        ));
        assert_eq!(iov.len(), 1);
        assert_eq!(iov[0].iov_base as *mut u8, host(&m, DATA));
    }

    proptest! {
        /// The fast descriptor walker yields what virtio-queue's own chain iterator yields,
        /// for random tables: loops, links out of range, indirect tables (aligned or not,
        /// nested, outside memory), chains over 4 GiB.
        #[test]
        fn fast_descriptor_walk_matches_virtio_queue(
            table in proptest::collection::vec(
                (prop_oneof![0u64..MEM, Just(MEM - 8), any::<u64>()],
                 prop_oneof![0u32..0x100, Just(u32::MAX), any::<u32>()],
                 0u16..8, 0u16..20), 16),
            indirect in proptest::collection::vec(
                (0u64..MEM, 0u32..0x100, 0u16..8, 0u16..12), 0..12),
            indirect_at in prop_oneof![Just(0x8_0000u64), Just(MEM - 0x40), Just(0x8_0008u64)],
            head in 0u16..16,
        ) {
            let m = mem();
            let q = MockSplitQueue::new(&m, 16);
            let raw = |(a, l, f, n): (u64, u32, u16, u16), base: Option<(u64, usize)>| {
                // Flags: NEXT=1, WRITE=2, INDIRECT=4; an indirect entry points at the table.
                let (a, l) = match base {
                    Some((at, len)) if f & 4 != 0 => (at, (len * 16) as u32 | (l & 8)),
                    _ => (a, l),
                };
                RawDescriptor::from(SplitDescriptor::new(a, l, f, n))
            };
            for (i, &d) in table.iter().enumerate() {
                q.desc_table()
                    .store(i as u16, raw(d, Some((indirect_at, indirect.len()))))
                    .unwrap();
            }
            for (i, &d) in indirect.iter().enumerate() {
                let bytes = raw(d, Some((indirect_at, indirect.len())));
                // The indirect table may run off the end of memory: write what fits.
                let _ = m.write_obj(bytes, GuestAddress(indirect_at + 16 * i as u64));
            }
            q.avail().ring().ref_at(0).unwrap().store(u16::to_le(head));
            q.avail().idx().store(u16::to_le(1));
            let mut queue: virtio_queue::Queue = q.create_queue().unwrap();
            use virtio_queue::QueueT;
            let chain = queue.pop_descriptor_chain(&m).unwrap();
            let theirs: Vec<(u64, u32, u16, u16)> = chain
                .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                .collect();
            let ours: Vec<(u64, u32, u16, u16)> =
                daemon_support::chain::Descriptors::new(&m, q.desc_table_addr(), 16, head)
                    .map(|d| (d.addr().0, d.len(), d.flags(), d.next()))
                    .collect();
            prop_assert_eq!(ours, theirs);
        }

        /// Random chains never panic, and whatever iovecs come out lie inside guest memory.
        #[test]
        fn random_chains_stay_inside_guest_memory(
            req_type in prop_oneof![Just(0u32), Just(1), Just(4), Just(8), Just(11), Just(13), any::<u32>()],
            sector in prop_oneof![0u64..4096, any::<u64>()],
            descs in proptest::collection::vec(
                (0u64..MEM + 0x1000, 0u32..0x9000, any::<bool>()), 1..8),
        ) {
            let m = mem();
            header(&m, req_type, sector);
            let mut chain = vec![desc(HDR, 16, R)];
            chain.extend(descs.iter().map(|&(a, l, w)| desc(a, l, if w { W } else { R })));
            let (p, iov) = run(&m, &chain);
            let (lo, hi) = (host(&m, 0) as usize, host(&m, 0) as usize + MEM as usize);
            if let Parsed::Request { kind, status } = p {
                prop_assert!((lo..hi).contains(&(status.0 as usize)));
                let total: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
                for v in &iov {
                    let start = v.iov_base as usize;
                    prop_assert!(start >= lo && start + v.iov_len <= hi);
                }
                match kind {
                    RequestKind::Read { offset, len } | RequestKind::Write { offset, len } => {
                        prop_assert_eq!(total, len);
                        prop_assert!(offset + len <= CAPACITY);
                    }
                    RequestKind::Discard { offset, len }
                    | RequestKind::WriteZeroes { offset, len, .. } => {
                        prop_assert!(offset + len <= CAPACITY)
                    }
                    _ => {}
                }
            }
        }
    }
}
