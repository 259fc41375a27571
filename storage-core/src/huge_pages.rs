//! Fixed-size arrays backed by transparent huge pages, for tables that the data path reads at
//! random on every request (the tier's block map and slot table).
//!
//! A table of a few MiB in 4 KiB pages misses the TLB on nearly every random lookup, and
//! under virtualization each miss is a two-dimensional page walk that costs more than the
//! lookup itself. Mapped 2 MiB-aligned with `MADV_HUGEPAGE`, such a table takes a handful of
//! TLB entries. Where the kernel gives no huge pages the array works the same, only slower.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// The x86-64 and arm64 (4 KiB granule) transparent huge page size.
const HUGE_PAGE: usize = 2 << 20;
const SMALL_PAGE: usize = 4096;

/// `len` values of `T` in their own anonymous mapping, 2 MiB-aligned (below 1 MiB, in
/// ordinary pages).
pub struct HugeArray<T: Copy> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes mapped at `ptr` (a multiple of the huge page size; 0 for an empty array).
    mapped: usize,
}

// SAFETY: the array owns its mapping exclusively, like a `Box<[T]>`.
unsafe impl<T: Copy + Send> Send for HugeArray<T> {}
// SAFETY: shared access only hands out `&[T]`.
unsafe impl<T: Copy + Sync> Sync for HugeArray<T> {}

impl<T: Copy> HugeArray<T> {
    /// An array of `len` copies of `init`.
    pub fn new(len: usize, init: T) -> io::Result<Self> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "array too large"))?;
        if bytes == 0 {
            return Ok(HugeArray {
                ptr: NonNull::dangling(),
                len,
                mapped: 0,
            });
        }
        // Small arrays fit the TLB anyway; a huge page each would only waste memory.
        let huge = bytes >= HUGE_PAGE / 2;
        let (unit, slack) = if huge {
            (HUGE_PAGE, HUGE_PAGE)
        } else {
            (SMALL_PAGE, 0)
        };
        let mapped = bytes.div_ceil(unit) * unit;
        // Map one huge page more than needed, then trim to an aligned window.
        let reserve = mapped + slack;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(unit);
        let head = aligned - start;
        let tail = reserve - head - mapped;
        // SAFETY: both ranges lie inside the mapping made above and outside the window kept;
        // nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + mapped) as *mut libc::c_void, tail);
            }
        }
        // Before the first touch, so the faults below allocate huge pages. A kernel without
        // THP refuses: the array still works in small pages.
        if huge {
            // SAFETY: advice on our own mapping; it does not change its contents.
            unsafe { libc::madvise(aligned as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE) };
        }
        let ptr = aligned as *mut T;
        for i in 0..len {
            // SAFETY: `i < len`, so the write lies within the `mapped >= len * size_of::<T>()`
            // bytes at `ptr`, which is aligned for T (page-aligned, and T's alignment is a
            // power of two below that).
            unsafe { ptr.add(i).write(init) };
        }
        Ok(HugeArray {
            // SAFETY: mmap never returns null on success.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
            mapped,
        })
    }
}

impl<T: Copy> HugeArray<T> {
    /// The first element's address (stable for the array's life: it never moves).
    pub fn as_ptr(&self) -> *const T {
        self.ptr.as_ptr()
    }
}

/// Asks the CPU to start loading the cache line at `p`, so that a lookup a little later finds
/// it there: a batch of random lookups into these tables then overlaps its cache misses
/// instead of waiting for each in turn. Only a hint: any address may be passed, and none is
/// dereferenced.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults and has no architectural effect, whatever
    // the address; SSE, which provides it, is part of the x86-64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl<T: Copy> Deref for HugeArray<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` holds `len` initialised values (or is dangling with len 0), owned by
        // self for its whole life.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> DerefMut for HugeArray<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: Copy> Drop for HugeArray<T> {
    fn drop(&mut self) {
        if self.mapped > 0 {
            // SAFETY: exactly the window `new` kept; no reference outlives `self`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_its_values_and_is_aligned() {
        let mut a = HugeArray::new(1_000_003, 7u32).unwrap();
        assert_eq!(a.len(), 1_000_003);
        assert_eq!(a.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(a.iter().all(|&v| v == 7));
        a[1_000_002] = 9;
        a[0] = 1;
        assert_eq!((a[0], a[1], a[1_000_002]), (1, 7, 9));
        let empty = HugeArray::new(0, 0u64).unwrap();
        assert!(empty.is_empty());
    }
}
