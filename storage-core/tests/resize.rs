//! Growing a disk online: which nodes may, what they refuse, and that queues opened before
//! the resize address the new space at once.

use storage_core::disk::{open_disk, Disk, DiskOp, DiskQueue, DiskSpec, StartError};
use storage_core::error::StorageErrorKind;
use storage_core::iov::IoVecs;

/// Writes 4 KiB at `offset` through `q` and waits for it: Ok(bytes) or the refusal.
fn write_at(q: &mut impl DiskQueue, offset: u64) -> Result<i32, StartError> {
    let op = DiskOp::Write {
        offset,
        buffers: IoVecs::from_bytes(&[0xab; 4096]),
    };
    q.start(op, 0).map_err(|r| r.error)?;
    q.submit().unwrap();
    loop {
        if let Some(c) = q.pop_completion() {
            return Ok(c.result);
        }
        q.wait().unwrap();
    }
}

#[test]
fn a_file_grows_durably_and_open_queues_use_the_new_space() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    for spec in [
        format!("path={}", image.display()),
        format!("path={},iops-total=100000", image.display()),
    ] {
        let disk = open_disk(&spec.parse::<DiskSpec>().unwrap()).unwrap();
        let before = disk.info().capacity.get();
        let mut q = disk.new_queue(4).unwrap();
        assert_eq!(
            write_at(&mut q, before),
            Err(StartError::OutOfRange),
            "{spec}"
        );
        disk.resize(before + (1 << 20)).unwrap();
        assert_eq!(disk.info().capacity.get(), before + (1 << 20));
        assert_eq!(std::fs::metadata(&image).unwrap().len(), before + (1 << 20));
        assert_eq!(write_at(&mut q, before), Ok(4096), "{spec}");
        assert_eq!(
            write_at(&mut q, before + (1 << 20)),
            Err(StartError::OutOfRange)
        );
    }
}

#[test]
fn shrinking_odd_sizes_and_nodes_that_cannot_grow_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let raw = open_disk(
        &format!("path={}", image.display())
            .parse::<DiskSpec>()
            .unwrap(),
    )
    .unwrap();
    for (bytes, needle) in [(2 << 20, "shrinking"), ((8 << 20) + 1, "512-byte")] {
        let e = raw.resize(bytes).unwrap_err();
        assert_eq!(e.kind(), StorageErrorKind::InvalidArgument);
        assert!(e.to_string().contains(needle), "{e}");
    }
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 4 << 20);
    // One open of the image at a time: each holds its lock.
    drop(raw);

    let ro = open_disk(
        &format!("path={},readonly=on", image.display())
            .parse::<DiskSpec>()
            .unwrap(),
    )
    .unwrap();
    assert!(ro
        .resize(8 << 20)
        .unwrap_err()
        .to_string()
        .contains("read-only"));
    drop(ro);

    let tier = open_disk(
        &format!(
            "path={},cache={},cache-size=1M",
            image.display(),
            dir.path().join("cache.img").display()
        )
        .parse::<DiskSpec>()
        .unwrap(),
    )
    .unwrap();
    let e = tier.resize(8 << 20).unwrap_err();
    assert_eq!(e.kind(), StorageErrorKind::Unsupported, "{e}");
    drop(tier);

    // A trailing partial sector is not part of the disk, and a "grow" to the disk's size
    // must not cut it off.
    let odd = dir.path().join("odd.img");
    std::fs::File::create(&odd)
        .unwrap()
        .set_len((1 << 20) + 100)
        .unwrap();
    let d = open_disk(
        &format!("path={}", odd.display())
            .parse::<DiskSpec>()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(d.info().capacity.get(), 1 << 20);
    assert!(d.resize(1 << 20).is_err());
    assert_eq!(std::fs::metadata(&odd).unwrap().len(), (1 << 20) + 100);
    d.resize(2 << 20).unwrap();
    assert_eq!(d.info().capacity.get(), 2 << 20);

    let null = open_disk(&"path=null,size=1M".parse::<DiskSpec>().unwrap()).unwrap();
    null.resize(2 << 20).unwrap();
    assert_eq!(null.info().capacity.get(), 2 << 20);
}
