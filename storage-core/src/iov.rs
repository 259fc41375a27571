//! A request's buffers: [`IoVecs`], scatter-gather lists as the kernel takes them
//! (`libc::iovec`), owned together with what keeps their memory alive.
//!
//! Why a type: a request's buffers are read or written long after it is started (a node
//! may hold it back, split it, or hand it to the kernel), so a bare `&[iovec]` cannot say
//! how long they stay valid, and every caller had to argue it again in an `unsafe` block.
//! An `IoVecs` carries its keep-alive (the guest memory map the iovecs were translated
//! from, or a node's own buffers), and is moved into the node that runs it and given back
//! with its completion. Only the code that turns an address into an iovec argues that the
//! memory belongs to the keep-alive; everything else, slicing and advancing included, is
//! safe. The models: Firecracker's `IoVecBuffer` and Cloud Hypervisor's guest-memory
//! targets.
//!
//! The entries never move while the list holds any (pushing past the capacity is an error,
//! not a reallocation), so a pointer to them handed to the kernel stays put.

use std::sync::Arc;

/// What keeps a request's buffers mapped: a guest memory map, or a node's own buffers.
pub type KeepAlive = Arc<dyn Send + Sync>;

/// Total bytes described by `iov`.
pub fn iov_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

/// More buffers than an [`IoVecs`] was made to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a request has more buffers than the {0} it may hold")]
pub struct TooManyBuffers(pub usize);

/// The buffers of one request, and what keeps them valid. See the module documentation.
///
/// One pointer wide: a request's buffers move with it through every node of a graph and
/// back (into the queue, into a held list, into a completion), so the state lives behind
/// a box allocated once with the list (measured: moving it inline cost the null disk half
/// its IOPS in blk-compare).
pub struct IoVecs(Box<Inner>);

struct Inner {
    iov: Vec<libc::iovec>,
    /// First entry not yet consumed by [`advance`](IoVecs::advance).
    first: usize,
    /// Bytes described by `iov[first..]`.
    bytes: u64,
    keep: Option<KeepAlive>,
}

// SAFETY: the pointers lead into memory owned by `keep`, which is Send + Sync; nothing in
// an `IoVecs` is tied to the thread that built it.
unsafe impl Send for IoVecs {}

impl std::fmt::Debug for IoVecs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoVecs")
            .field("buffers", &self.count())
            .field("bytes", &self.0.bytes)
            .finish()
    }
}

impl IoVecs {
    /// An empty list with room for `capacity` buffers, allocated now (and again only by
    /// [`reserve_while_empty`](IoVecs::reserve_while_empty)).
    pub fn with_capacity(capacity: usize) -> IoVecs {
        IoVecs(Box::new(Inner {
            iov: Vec::with_capacity(capacity),
            first: 0,
            bytes: 0,
            keep: None,
        }))
    }

    /// Fresh, zeroed buffers of the given lengths, each 4 KiB-aligned (fit for O_DIRECT),
    /// owned by the list: for control-plane I/O and tests, not for the data path.
    pub fn owned(lens: &[usize]) -> IoVecs {
        let memory: Arc<OwnedMemory> = Arc::new(OwnedMemory(
            lens.iter().map(|&n| AlignedBuf::new(n.max(1))).collect(),
        ));
        let mut v = IoVecs::with_capacity(lens.len());
        v.reset(memory.clone());
        for (buf, &n) in memory.0.iter().zip(lens) {
            // SAFETY: the buffer belongs to `memory`, the keep-alive just set, and holds at
            // least `n` bytes.
            unsafe { v.push(buf.ptr, n) }.expect("capacity is the number of buffers");
        }
        v
    }

    /// One fresh buffer holding a copy of `data` (see [`owned`](IoVecs::owned)).
    pub fn from_bytes(data: &[u8]) -> IoVecs {
        let mut v = IoVecs::owned(&[data.len()]);
        v.copy_from(0, data);
        v
    }

    /// A copy of every byte described.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.0.bytes as usize];
        self.copy_to(0, &mut out);
        out
    }

    /// Forgets every buffer and what kept them alive.
    #[inline]
    pub fn clear(&mut self) {
        self.clear_buffers();
        self.0.keep = None;
    }

    /// Empties the list and makes `keep` what keeps the buffers pushed next alive, without
    /// touching its reference count when the list already holds it: the data path's case,
    /// request after request in the same guest memory (two atomic operations per request
    /// saved, which the null disk's IOPS in blk-compare showed).
    #[inline]
    pub fn reset_to<M: Send + Sync + 'static>(&mut self, keep: &Arc<M>) {
        self.clear_buffers();
        let same = self
            .0
            .keep
            .as_ref()
            .is_some_and(|k| std::ptr::addr_eq(Arc::as_ptr(k), Arc::as_ptr(keep)));
        if !same {
            self.0.keep = Some(keep.clone());
        }
    }

    /// Forgets every buffer but keeps what kept them alive (see
    /// [`reset_to`](IoVecs::reset_to)).
    #[inline]
    pub fn clear_buffers(&mut self) {
        self.0.iov.clear();
        self.0.first = 0;
        self.0.bytes = 0;
    }

    /// Empties the list and makes `keep` what keeps the buffers pushed next alive.
    #[inline]
    pub fn reset(&mut self, keep: KeepAlive) {
        self.clear();
        self.0.keep = Some(keep);
    }

    /// Appends a buffer.
    ///
    /// # Safety
    ///
    /// `[base, base + len)` must lie in memory that the keep-alive given to the last
    /// [`reset`](IoVecs::reset) (or [`reset_to`](IoVecs::reset_to)) keeps mapped and valid
    /// for reads and writes (whatever the list is used for: reads write into it, and so
    /// do [`copy_from`](IoVecs::copy_from) and [`fill_zero`](IoVecs::fill_zero)) for as
    /// long as that keep-alive lives. Other parties (a guest) may access it concurrently;
    /// the list never creates Rust references to it.
    #[inline]
    pub unsafe fn push(&mut self, base: *mut u8, len: usize) -> Result<(), TooManyBuffers> {
        if self.0.iov.len() == self.0.iov.capacity() {
            return Err(TooManyBuffers(self.0.iov.capacity()));
        }
        self.0.iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
        self.0.bytes += len as u64;
        Ok(())
    }

    /// Makes room for `total` buffers in all, if the list is empty (while it holds entries
    /// they never move: the kernel may be reading them).
    pub fn reserve_while_empty(&mut self, total: usize) {
        if self.0.iov.is_empty() {
            self.0.iov.reserve(total);
        }
    }

    /// Bytes described (after what [`advance`](IoVecs::advance) skipped).
    #[inline]
    pub fn len(&self) -> u64 {
        self.0.bytes
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.bytes == 0
    }

    /// Buffers described (after what `advance` skipped).
    #[inline]
    pub fn count(&self) -> usize {
        self.0.iov.len() - self.0.first
    }

    /// The most buffers the list can hold.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.0.iov.capacity()
    }

    /// The iovecs, for the kernel. They stay where they are until the list is changed.
    #[inline]
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.0.iov[self.0.first..]
    }

    /// Skips the first `n` bytes (a short transfer is continued from there).
    #[inline]
    pub fn advance(&mut self, mut n: u64) {
        n = n.min(self.0.bytes);
        self.0.bytes -= n;
        while n > 0 && self.0.first < self.0.iov.len() {
            let v = &mut self.0.iov[self.0.first];
            if n >= v.iov_len as u64 {
                n -= v.iov_len as u64;
                self.0.first += 1;
            } else {
                // SAFETY: n < iov_len, so the advanced pointer stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n as usize) }.cast();
                v.iov_len -= n as usize;
                n = 0;
            }
        }
    }

    /// Appends to `out` the buffers covering bytes `[skip, skip + len)` of this list (a
    /// request split into pieces); returns the range of `out`'s entries (counted from its
    /// first) they took. `out` shares this list's keep-alive: it must be empty or already
    /// share it.
    pub fn slice_into(
        &self,
        skip: u64,
        len: u64,
        out: &mut IoVecs,
    ) -> Result<std::ops::Range<usize>, TooManyBuffers> {
        match (&out.0.keep, &self.0.keep) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {}
            _ if out.0.iov.is_empty() => out.0.keep = self.0.keep.clone(),
            // Buffers kept alive by something else: refuse rather than mix keep-alives.
            _ => return Err(TooManyBuffers(out.0.iov.len())),
        }
        let start = out.count();
        let (mut pos, end) = (0u64, skip.saturating_add(len));
        for v in self.as_slice() {
            let (a, b) = (pos, pos + v.iov_len as u64);
            pos = b;
            let (lo, hi) = (a.max(skip), b.min(end));
            if lo < hi {
                // SAFETY: `lo - a < iov_len`, so the pointer stays inside this buffer, which
                // belongs to the keep-alive `out` now shares.
                unsafe {
                    out.push(
                        v.iov_base.cast::<u8>().add((lo - a) as usize),
                        (hi - lo) as usize,
                    )?
                };
            }
            if pos >= end {
                break;
            }
        }
        Ok(start..out.count())
    }

    /// Copies `src` into the buffers from byte `at` on; returns the bytes copied.
    pub fn copy_from(&mut self, at: u64, src: &[u8]) -> usize {
        self.each_range(at, src.len(), |p, done, n| {
            // SAFETY: `p` points to `n` bytes of one of our buffers (valid while `keep`
            // lives); `src[done..done + n]` is in bounds. The buffer may be guest memory,
            // which is never a Rust object: a plain copy into it is what a DMA would do.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), p, n) }
        })
    }

    /// Copies the buffers from byte `at` on into `dst`; returns the bytes copied.
    pub fn copy_to(&self, at: u64, dst: &mut [u8]) -> usize {
        self.each_range(at, dst.len(), |p, done, n| {
            // SAFETY: as in `copy_from`, reading instead.
            unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr().add(done), n) }
        })
    }

    /// Zeroes every byte of the buffers.
    pub fn fill_zero(&mut self) {
        for v in &self.0.iov[self.0.first..] {
            // SAFETY: each entry describes `iov_len` bytes of memory kept by `keep`.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }

    /// Calls `f(pointer, bytes done so far, n)` for each piece of `[at, at + len)`.
    fn each_range(&self, at: u64, len: usize, mut f: impl FnMut(*mut u8, usize, usize)) -> usize {
        let mut done = 0usize;
        let mut pos = 0u64;
        for v in self.as_slice() {
            if done == len {
                break;
            }
            let (a, b) = (pos, pos + v.iov_len as u64);
            pos = b;
            let lo = a.max(at + done as u64);
            if lo >= b {
                continue;
            }
            let n = ((b - lo) as usize).min(len - done);
            // SAFETY: `lo - a < iov_len`: inside this buffer.
            let p = unsafe { v.iov_base.cast::<u8>().add((lo - a) as usize) };
            f(p, done, n);
            done += n;
        }
        done
    }
}

/// Buffers an [`IoVecs::owned`] list keeps alive.
struct OwnedMemory(Vec<AlignedBuf>);

/// A 4 KiB-aligned heap buffer, zeroed, freed on drop.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid buffer layout");
        // SAFETY: `layout` has a non-zero size (callers ask for at least one byte).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `len` bytes we allocated and own exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: the buffer is plain owned heap memory; whoever holds it decides who accesses it
// (through raw pointers only, never through shared references to its bytes).
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: `&AlignedBuf` gives out only the pointer.
unsafe impl Sync for AlignedBuf {}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(v: &IoVecs) -> Vec<u8> {
        let mut out = vec![0u8; v.len() as usize];
        assert_eq!(v.copy_to(0, &mut out), out.len());
        out
    }

    #[test]
    fn slicing_advancing_and_copying_agree_with_a_flat_buffer() {
        let mut v = IoVecs::owned(&[3, 5, 1, 7]);
        let data: Vec<u8> = (1..=16).collect();
        assert_eq!(v.copy_from(0, &data), 16);
        assert_eq!(contents(&v), data);
        for skip in 0..16u64 {
            for len in 0..=16 - skip {
                let mut out = IoVecs::with_capacity(4);
                let r = v.slice_into(skip, len, &mut out).unwrap();
                assert_eq!(r.start, 0);
                assert_eq!(r.end, out.count());
                assert_eq!(out.len(), len);
                assert_eq!(contents(&out), data[skip as usize..(skip + len) as usize]);
            }
        }
        let mut w = IoVecs::with_capacity(4);
        v.slice_into(0, 16, &mut w).unwrap();
        w.advance(4);
        assert_eq!((w.len(), w.count()), (12, 3));
        assert_eq!(contents(&w), data[4..]);
        w.advance(100);
        assert!(w.is_empty());
        // Copies that start inside the list, and that run past its end.
        let mut part = [0u8; 4];
        assert_eq!(v.copy_to(14, &mut part), 2);
        assert_eq!(&part[..2], &data[14..]);
        v.fill_zero();
        assert_eq!(contents(&v), vec![0u8; 16]);
    }

    #[test]
    fn a_list_never_grows_past_its_capacity_nor_mixes_keep_alives() {
        let v = IoVecs::owned(&[4, 4, 4]);
        let mut small = IoVecs::with_capacity(2);
        assert_eq!(v.slice_into(0, 12, &mut small), Err(TooManyBuffers(2)));
        let other = IoVecs::owned(&[4]);
        let mut out = IoVecs::with_capacity(4);
        v.slice_into(0, 4, &mut out).unwrap();
        assert!(other.slice_into(0, 4, &mut out).is_err());
        assert_eq!(v.slice_into(4, 4, &mut out).unwrap(), 1..2);
    }
}
