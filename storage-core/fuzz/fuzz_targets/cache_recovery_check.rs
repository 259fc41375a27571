// The property the `cache_recovery` fuzz target checks, shared (by `include!`) with the
// regression test `storage-core/tests/fuzz_regressions.rs`, so the check compiles and is
// linted with the workspace even where cargo-fuzz (nightly) is not available.
//
// Input: a flags byte (bit 0: recompute the checksums after patching, so the damage gets
// past them; bit 1: cut the image to a length given by the next two bytes, in pages), then
// patches applied to a valid 1 MiB cache image (storage_core::tier::fuzzing::template):
// each a 3-byte little-endian offset, a length byte and that many bytes.

fn check(data: &[u8]) {
    use storage_core::tier::fuzzing;
    use std::sync::OnceLock;

    static TEMPLATE: OnceLock<Vec<u8>> = OnceLock::new();
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut image = TEMPLATE.get_or_init(fuzzing::template).clone();
    if flags & 2 != 0 && rest.len() >= 2 {
        let pages = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        image.truncate(pages * 4096);
        rest = &rest[2..];
    }
    while rest.len() >= 4 {
        let offset = usize::from(rest[0]) | usize::from(rest[1]) << 8 | usize::from(rest[2]) << 16;
        let len = usize::from(rest[3]).min(rest.len() - 4);
        let bytes = &rest[4..4 + len];
        rest = &rest[4 + len..];
        if offset < image.len() {
            let n = len.min(image.len() - offset);
            image[offset..offset + n].copy_from_slice(&bytes[..n]);
        }
    }
    if flags & 1 != 0 {
        fuzzing::seal(&mut image);
    }
    let Ok(mapped) = fuzzing::recover(&image) else {
        return;
    };
    let blocks = fuzzing::TEMPLATE_CAPACITY / 4096;
    let mut seen = std::collections::HashSet::new();
    for &(slot, block) in &mapped {
        assert!(
            block < blocks,
            "slot {slot} maps block {block}, beyond the capacity device's {blocks}"
        );
        assert!(seen.insert(block), "block {block} is mapped twice");
    }
}
