//! What the encrypted data paths (the `luks` node's and encrypted qcow2's) share:
//! decrypting a completed read in the guest's own buffers, and the per-tag buffer a write
//! is copied into and encrypted in (never in the guest's buffer: the guest could read its
//! own ciphertext, or change the plaintext between the encryption and the write).

use std::sync::Arc;

use super::xts::Xts;
use super::SectorLayout;
use crate::disk::IoVecs;
use crate::iov::AlignedBuf;

/// The most bytes encrypted and written at once for one request: larger writes and
/// write-zeroes go in pieces of this size, one after the other.
pub const PIECE: u64 = 1 << 20;

/// One tag's buffer for encrypted writes: grown to the largest piece seen and then reused
/// (no allocation per request once warm).
#[derive(Default)]
pub(crate) struct WriteBuffer {
    /// The buffer writes are encrypted into (none until the tag first writes).
    buf: Option<Arc<AlignedBuf>>,
    /// The list describing it, while the child does not hold it.
    list: Option<IoVecs>,
}

impl WriteBuffer {
    /// This tag's buffer, at least `len` bytes (at most [`PIECE`]), with nothing else
    /// holding it: the bytes to fill and the list that will describe them. The list comes
    /// back through [`give_back`](Self::give_back) once the child is done with it.
    pub(crate) fn take(&mut self, len: usize) -> (&mut [u8], IoVecs) {
        debug_assert!(len as u64 <= PIECE);
        // Rare: the first write of a tag, or a larger piece than before (or, were a child
        // ever to keep our list, a new one).
        if self.buf.as_ref().is_none_or(|b| b.len() < len) || self.list.is_none() {
            let size = len.next_power_of_two().clamp(4096, PIECE as usize);
            let buf = Arc::new(AlignedBuf::new(size.max(len)));
            let mut list = IoVecs::with_capacity(1);
            list.reset(buf.clone());
            self.buf = Some(buf);
            self.list = Some(list);
        }
        let buf = self.buf.as_ref().expect("made above");
        let mut list = self.list.take().expect("made above if missing");
        list.clear_buffers();
        // SAFETY: the first `len` bytes of `buf`, the list's keep-alive (set by `reset`
        // when the list was made with it).
        unsafe { list.push(buf.as_ptr(), len) }.expect("room for one buffer");
        // SAFETY: `buf` is this tag's alone: the child gave its list back (`list` was
        // `Some`), and nothing else writes or reads it until the list is started.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.as_ptr(), len) };
        (bytes, list)
    }

    /// The list [`take`](Self::take) gave, back from the child (none: a new one is made
    /// next time).
    pub(crate) fn give_back(&mut self, list: Option<IoVecs>) {
        self.list = list;
    }
}

/// Decrypts a completed read of payload bytes from `offset` in the guest's buffers,
/// whatever their layout: sectors that lie inside one buffer in place, in runs; sectors
/// split across buffers gathered into a sector of our own, decrypted and scattered back.
pub(crate) fn decrypt_in_place(
    cipher: &Xts,
    layout: &SectorLayout,
    bufs: &mut IoVecs,
    offset: u64,
) {
    let s = layout.sector_size as usize;
    let total = bufs.len() as usize;
    let mut sector = [0u8; 4096];
    let sector = &mut sector[..s];
    let mut at = 0usize;
    let mut pending: Option<usize> = None;
    for i in 0..bufs.count() {
        // A copy of the entry: the list is written through below (a split sector).
        let v = bufs.as_slice()[i];
        let (a, b) = (at, at + v.iov_len);
        at = b;
        let (from, to) = (a.div_ceil(s) * s, b / s * s);
        if from < to {
            // SAFETY: `[from - a, to - a)` lies inside this buffer, which the list's
            // keep-alive keeps mapped and writable while we hold the list, and which no
            // Rust object in this process lives in or refers to (the list never makes
            // references; the slice lives for this call only). The one other writer is
            // the guest, in another process, through shared memory: its bytes are input
            // that is decrypted and handed back to it, never read again here, so what it
            // writes meanwhile changes only what it reads.
            let run = unsafe {
                std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>().add(from - a), to - from)
            };
            layout.crypt(cipher, run, offset + from as u64, false);
        }
        // A sector an earlier buffer ended inside of, whole now that this one reaches its
        // end (at most one is pending: until then every buffer ends inside it too).
        if let Some(k) = pending {
            if b >= (k + 1) * s {
                let sat = (k * s) as u64;
                bufs.copy_to(sat, sector);
                layout.crypt(cipher, sector, offset + sat, false);
                bufs.copy_from(sat, sector);
                pending = None;
            }
        }
        if !b.is_multiple_of(s) && b < total {
            pending = Some(b / s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any layout of buffers decrypts as one contiguous buffer would: buffers of every
    /// length down to zero, sectors spread over many of them.
    #[test]
    fn decrypts_the_same_whatever_the_buffers() {
        let xts = Xts::new(&[7u8; 64]).unwrap();
        let mut seed = 99u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for sector_size in [512u32, 4096] {
            let layout = SectorLayout {
                sector_size,
                iv_tweak: 3,
            };
            for round in 0..200 {
                let sectors = 1 + (next() % 4) as usize;
                let total = sectors * sector_size as usize;
                let cipher: Vec<u8> = (0..total).map(|_| next() as u8).collect();
                let mut want = cipher.clone();
                let offset = (next() % 100) * u64::from(sector_size);
                layout.crypt(&xts, &mut want, offset, false);
                // Cut into pieces: tiny, empty, or large.
                let mut lens = Vec::new();
                let mut left = total;
                while left > 0 {
                    let n = match next() % 4 {
                        0 => 0,
                        1 => 1 + (next() % 7) as usize,
                        2 => 1 + (next() % 700) as usize,
                        _ => 1 + (next() % 5000) as usize,
                    }
                    .min(left);
                    lens.push(n);
                    left -= n;
                }
                let mut bufs = IoVecs::owned(&lens);
                bufs.copy_from(0, &cipher);
                decrypt_in_place(&xts, &layout, &mut bufs, offset);
                assert!(
                    bufs.to_vec() == want,
                    "sector {sector_size}, round {round}, buffers {lens:?}"
                );
            }
        }
    }
}
