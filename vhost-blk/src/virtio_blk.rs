//! The virtio-blk device as the virtio 1.2 specification defines it (section 5.2): feature
//! bits, request types, status codes, and the configuration space layout. Nothing here
//! touches a queue or a socket.

use storage_core::units::SECTOR_SIZE;

// Device feature bits.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

// Transport feature bits.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

// Request status.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The unmap flag of a write-zeroes segment.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// Size of a request header (type, reserved, sector).
pub const REQUEST_HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment.
pub const DISCARD_SEGMENT_LEN: usize = 16;
/// Size of the GET_ID answer.
pub const ID_LEN: usize = 20;

/// Largest single data segment we accept (SIZE_MAX): 1 MiB, ample for any guest's scatter
/// list and small enough that one segment never exceeds what a single iovec carries.
pub const SIZE_MAX: u32 = 1 << 20;
/// Largest discard or write-zeroes range in sectors: 1 GiB.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const CONFIG_WRITEBACK_OFFSET: usize = 32;
/// Bytes of configuration space we expose (through `write_zeroes_may_unmap` and padding).
pub const CONFIG_LEN: usize = 60;

/// The values that make up the configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub num_queues: u16,
    pub writeback: bool,
}

impl BlkConfig {
    /// The little-endian configuration space bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &self.capacity_sectors.to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max.to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &self.blk_size.to_le_bytes());
        // Topology: physical block exponent (logical blocks per physical one, as a power of
        // two: one), alignment offset, min and optimal I/O size (in logical blocks).
        put(24, &[0, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(CONFIG_WRITEBACK_OFFSET, &[u8::from(self.writeback), 0]);
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &(self.blk_size / SECTOR_SIZE as u32).to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1, 0, 0, 0]); // write_zeroes_may_unmap
        b
    }

    /// The `size` bytes at `offset`, or `None` if that window is not inside the space
    /// (the frontend's numbers are checked, never used for pointer arithmetic).
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        let bytes = self.to_bytes();
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        bytes.get(start..end).map(<[u8]>::to_vec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BlkConfig {
        BlkConfig {
            capacity_sectors: 2048,
            seg_max: 126,
            blk_size: 512,
            num_queues: 2,
            writeback: true,
        }
    }

    /// A disk of 4 KiB sectors (a LUKS2 payload) says so, and that its physical blocks are
    /// those same blocks (the exponent counts logical blocks per physical one).
    #[test]
    fn a_4k_disk_reports_4k_blocks_and_no_larger_physical_ones() {
        let b = BlkConfig {
            blk_size: 4096,
            ..cfg()
        }
        .to_bytes();
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[24], 0, "physical_block_exp");
        assert_eq!(
            u16::from_le_bytes(b[26..28].try_into().unwrap()),
            1,
            "min_io_size"
        );
    }

    #[test]
    fn layout_matches_the_spec() {
        let b = cfg().to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 1);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_are_bounds_checked() {
        let c = cfg();
        assert_eq!(c.read(0, 8).unwrap(), 2048u64.to_le_bytes());
        assert_eq!(c.read(34, 2).unwrap(), 2u16.to_le_bytes());
        assert!(c.read(59, 2).is_none());
        assert!(c.read(u32::MAX, 1).is_none());
        assert!(c.read(0, u32::MAX).is_none());
        assert_eq!(c.read(60, 0).unwrap(), Vec::<u8>::new());
    }
}
