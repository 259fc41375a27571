//! Driving a disk node's queue in tests: one request at a time or a batch, reads in
//! buffers split anywhere, a random workload mirrored into a byte-array model, and key files.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use storage_core::disk::{open_disk, AnyDisk, DiskCompletion, DiskOp, DiskQueue, DiskSpec, IoVecs};

/// A xorshift generator: the same workload from the same seed.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // An endless generator, not an iterator.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A key file `dir/key` holding `pass`, mode 0600 (as key files must be).
pub fn key_file(dir: &Path, pass: &str) -> PathBuf {
    let path = dir.join("key");
    std::fs::write(&path, pass).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The disk `spec` describes, opened; the error as text.
pub fn open(spec: &str) -> Result<AnyDisk, String> {
    let spec: DiskSpec = spec.parse().map_err(|e| format!("{e}"))?;
    open_disk(&spec).map_err(|e| e.to_string())
}

/// Runs `op` alone (tag 3) to its completion: its result and buffers.
pub fn run(q: &mut impl DiskQueue, op: DiskOp) -> (i32, Option<IoVecs>) {
    q.start(op, 3)
        .unwrap_or_else(|r| panic!("refused: {}", r.error));
    let c = complete(q, 1).remove(0);
    assert_eq!(c.tag, 3);
    (c.result, c.buffers)
}

/// Submits the requests started on `q` and waits for `n` completions, in the order they
/// came.
pub fn complete(q: &mut impl DiskQueue, n: usize) -> Vec<DiskCompletion> {
    q.submit().unwrap();
    let mut done = Vec::with_capacity(n);
    while done.len() < n {
        match q.pop_completion() {
            Some(c) => done.push(c),
            None => q.wait().unwrap(),
        }
    }
    done
}

/// Buffers of `len` bytes split at a random place, mid-sector as often as not.
pub fn split(rng: &mut Rng, len: usize) -> IoVecs {
    if len < 2 || rng.below(2) == 0 {
        return IoVecs::owned(&[len]);
    }
    let cut = 1 + rng.below(len as u64 - 1) as usize;
    IoVecs::owned(&[cut, len - cut])
}

pub fn read(q: &mut impl DiskQueue, rng: &mut Rng, offset: u64, len: usize) -> Vec<u8> {
    let (r, b) = run(
        q,
        DiskOp::Read {
            offset,
            buffers: split(rng, len),
        },
    );
    assert_eq!(r, len as i32, "read of {len} at {offset}");
    b.unwrap().to_vec()
}

pub fn read_all(q: &mut impl DiskQueue, size: u64) -> Vec<u8> {
    let mut rng = Rng(5);
    let mut out = Vec::new();
    for at in (0..size).step_by(256 << 10) {
        out.extend(read(q, &mut rng, at, (256 << 10).min(size - at) as usize));
    }
    out
}

/// Random writes, reads, write-zeroes (some of many pieces), discards and flushes,
/// mirrored into `model`.
pub fn random_workload(q: &mut impl DiskQueue, model: &mut [u8], seed: u64, ops: usize) {
    random_workload_in(q, model, seed, ops, 512);
}

/// The same, in sectors of `sector` bytes.
pub fn random_workload_in(
    q: &mut impl DiskQueue,
    model: &mut [u8],
    seed: u64,
    ops: usize,
    sector: u64,
) {
    let mut rng = Rng(seed);
    let size = model.len() as u64;
    for _ in 0..ops {
        let sectors = match rng.below(8) {
            0 => rng.below(2048 * 512 / sector) + 1,
            _ => rng.below(16) + 1,
        };
        let len = (sectors * sector).min(size);
        let offset = rng.below((size - len) / sector + 1) * sector;
        let (o, l) = (offset as usize, len as usize);
        match rng.below(10) {
            0..=4 => {
                let data: Vec<u8> = (0..l).map(|_| rng.next() as u8).collect();
                let mut buffers = split(&mut rng, l);
                buffers.copy_from(0, &data);
                let (r, back) = run(q, DiskOp::Write { offset, buffers });
                assert_eq!(r, len as i32, "write of {len} at {offset}");
                // Encrypted in a buffer of the node's own, never in the guest's.
                assert!(back.unwrap().to_vec() == data, "the guest's buffer changed");
                model[o..o + l].copy_from_slice(&data);
            }
            5 => {
                let (r, _) = run(
                    q,
                    DiskOp::WriteZeroes {
                        offset,
                        len,
                        unmap: rng.below(2) == 0,
                    },
                );
                assert_eq!(r, 0, "write-zeroes of {len} at {offset}");
                model[o..o + l].fill(0);
            }
            6 => {
                // What a discarded range reads is undefined: whatever it is, it stays.
                let (r, _) = run(q, DiskOp::Discard { offset, len });
                assert_eq!(r, 0);
                let now = read(q, &mut rng, offset, l);
                model[o..o + l].copy_from_slice(&now);
            }
            7 => assert_eq!(run(q, DiskOp::Flush).0, 0),
            _ => {
                let got = read(q, &mut rng, offset, l);
                assert!(got == model[o..o + l], "read of {len} at {offset} differs");
            }
        }
    }
    assert_eq!(run(q, DiskOp::Flush).0, 0);
}
