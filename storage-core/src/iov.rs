//! Scatter-gather lists as the kernel takes them (`libc::iovec`): what the engine seam and
//! every node share about a request's buffers.

/// Total bytes described by `iov`.
pub fn iov_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}
