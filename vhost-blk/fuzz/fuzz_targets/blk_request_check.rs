// The property the `blk_request` fuzz target checks, shared (by `include!`) with the
// regression test `vhost-blk/tests/fuzz_regressions.rs`, so the check compiles and is linted
// with the workspace even where cargo-fuzz (nightly) is not available.
//
// Input: a count byte n, then n descriptors of 14 bytes (guest address as u64 LE, length
// as u32 LE, flags as u16 LE), then the bytes of guest memory (its first 64 KiB; the rest
// of the 1 MiB of guest memory is zero). Addresses are taken modulo 2 MiB, so half the
// descriptors point at or past the end of guest memory.

/// Guest memory: 1 MiB from address 0. The disk: 1 MiB.
const GUEST_MEM: u64 = 1 << 20;
const CAPACITY: u64 = 1 << 20;

fn check(data: &[u8]) {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 64);
    if rest.len() < n * 14 {
        return;
    }
    let (raw, contents) = rest.split_at(n * 14);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_MEM as usize)])
        .expect("guest memory");
    let take = contents.len().min(64 << 10);
    mem.write_slice(&contents[..take], GuestAddress(0))
        .expect("contents fit");
    let descriptors: Vec<_> = raw
        .chunks_exact(14)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (2 * GUEST_MEM);
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            virtio_queue::desc::split::Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem = std::sync::Arc::new(mem);
    let mut segments = Vec::new();
    let mut buffers = vhost_blk::request::IoVecs::with_capacity(vhost_blk::request::MAX_IOVECS);
    let parsed = vhost_blk::request::parse(
        descriptors.into_iter(),
        &mem,
        CAPACITY,
        &mut segments,
        &mut buffers,
    );
    let iov = buffers.as_slice();
    // Every iovec must lie inside guest memory.
    let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
    let end = base + GUEST_MEM as usize;
    for v in iov {
        let (lo, hi) = (v.iov_base as usize, v.iov_base as usize + v.iov_len);
        assert!(
            base <= lo && hi <= end,
            "an iovec outside guest memory: {lo:#x}..{hi:#x} (memory {base:#x}..{end:#x})"
        );
    }
    let data_len: u64 = iov.iter().map(|v| v.iov_len as u64).sum();
    use vhost_blk::request::{Parsed, RequestKind};
    if let Parsed::Request { kind, .. } = parsed {
        match kind {
            RequestKind::Read { offset, len } | RequestKind::Write { offset, len } => {
                assert_eq!(len, data_len, "{kind:?}: the iovecs hold another length");
                assert!(
                    offset.checked_add(len).is_some_and(|e| e <= CAPACITY),
                    "{kind:?} lies outside the disk"
                );
            }
            RequestKind::Discard { offset, len }
            | RequestKind::WriteZeroes { offset, len, .. } => assert!(
                offset.checked_add(len).is_some_and(|e| e <= CAPACITY),
                "{kind:?} lies outside the disk"
            ),
            RequestKind::GetId { len } => assert!(len <= data_len),
            RequestKind::Flush => {}
        }
    }
}
