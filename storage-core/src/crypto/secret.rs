//! Where key material lives: [`Locked<T>`] holds a value in pages of its own that are locked
//! against swap (`mlock`), left out of core dumps (`MADV_DONTDUMP`) and zeroed before they
//! are given back. Master keys, keys derived from passphrases and the payload cipher's
//! expanded key schedule are kept in one. A value is built on the stack and moved in, so a
//! copy lives briefly in a stack frame that later calls overwrite; nothing here scrubs it.

use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// A `T` in locked, undumpable pages, zeroed when dropped.
pub struct Locked<T> {
    ptr: NonNull<T>,
    map_len: usize,
}

// SAFETY: `Locked<T>` owns its `T` exclusively (as a `Box<T>` would); sending or sharing it
// is sending or sharing the `T`.
unsafe impl<T: Send> Send for Locked<T> {}
// SAFETY: as above; `&Locked<T>` gives only `&T`.
unsafe impl<T: Sync> Sync for Locked<T> {}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

impl<T> Locked<T> {
    /// Moves `value` into locked pages. Fails (with `value` dropped) if the pages cannot
    /// be locked: key material must never reach swap (RLIMIT_MEMLOCK may need raising).
    pub fn new(value: T) -> io::Result<Locked<T>> {
        assert!(
            std::mem::align_of::<T>() <= page_size(),
            "a page-aligned value"
        );
        let map_len = std::mem::size_of::<T>().max(1).div_ceil(page_size()) * page_size();
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // touches no memory of ours; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let unmap = |e: io::Error| {
            // SAFETY: `p` is the mapping of `map_len` bytes just made; nothing refers to it.
            unsafe { libc::munmap(p, map_len) };
            e
        };
        // SAFETY: advice and locking on our own fresh mapping.
        if unsafe { libc::madvise(p, map_len, libc::MADV_DONTDUMP) } != 0 {
            return Err(unmap(io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::mlock(p, map_len) } != 0 {
            let e = io::Error::last_os_error();
            return Err(unmap(io::Error::new(
                e.kind(),
                format!("locking key memory against swap: {e} (raise RLIMIT_MEMLOCK)"),
            )));
        }
        let ptr = NonNull::new(p.cast::<T>()).expect("mmap gave a non-null address");
        // SAFETY: the mapping is page-aligned (aligned for `T`, checked above), at least
        // `size_of::<T>()` bytes, writable, and holds no value yet.
        unsafe { ptr.as_ptr().write(value) };
        Ok(Locked { ptr, map_len })
    }
}

impl<T> Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: `ptr` holds a valid `T` from `new` until `drop`, owned by `self`.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for Locked<T> {
    fn drop(&mut self) {
        /// Zeroes, unlocks and unmaps the pages when dropped: after the value's own drop,
        /// even one that panics.
        struct Pages(*mut u8, usize);
        impl Drop for Pages {
            fn drop(&mut self) {
                // SAFETY: the mapping of `self.1` bytes at `self.0` is ours alone and no
                // value lives in it any more; byte-wise volatile writes (which the compiler
                // may not drop) over what may be padding need no initialised `u8`s, then the
                // pages are unlocked and unmapped.
                unsafe {
                    for i in 0..self.1 {
                        std::ptr::write_volatile(self.0.add(i), 0);
                    }
                    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
                    libc::munlock(self.0.cast(), self.1);
                    libc::munmap(self.0.cast(), self.1);
                }
            }
        }
        let p = self.ptr.as_ptr();
        let _pages = Pages(p.cast(), self.map_len);
        // SAFETY: `p` holds the `T` moved in by `new`, dropped exactly once, here.
        unsafe { std::ptr::drop_in_place(p) };
    }
}

/// A fixed-size secret (a key or a passphrase's bytes) in locked pages.
pub type SecretBytes<const N: usize> = Locked<[u8; N]>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_value_reads_back_and_its_pages_are_locked() {
        let mut k = Locked::new([7u8; 64]).unwrap();
        k[0] = 1;
        assert_eq!(k[0], 1);
        assert_eq!(k[63], 7);
        // The mapping is locked: /proc/self/status counts it in VmLck.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let locked_kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmLck:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert!(locked_kb >= 4, "VmLck {locked_kb} kB");
    }
}
