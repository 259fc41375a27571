//! Keyslot changes cut short by a power cut. Each change runs against an image in memory
//! that records its writes and syncs; from that log every crash state is built: what was
//! synced is on the disk, and each write since the last sync either did not reach it,
//! reached it whole, or was torn after some of its 4 KiB pages (the first, the last, three
//! between), independently of the others: writeback keeps no order between them. From every state the image must open, with
//! the master key it always had: adding a passphrase never loses the old one, removing a
//! keyslot never loses the one that authorised it, and a rotation always leaves the old
//! passphrase or the new one working. LUKS1 (ours) and LUKS2 (cryptsetup's).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use storage_core::crypto::{keyslots, open_with, ImageIo};
use testkit::tools::cryptsetup_ok;

const PAGE: usize = 4096;

enum Op {
    Write(u64, Vec<u8>),
    Sync,
}

/// An image in memory that records what reaches it.
struct Recorder {
    image: Vec<u8>,
    log: Vec<Op>,
}

impl ImageIo for Recorder {
    fn read(&mut self, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let at = at as usize;
        let src = self
            .image
            .get(at..at + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, at: u64, buf: &[u8]) -> io::Result<()> {
        let at = at as usize;
        self.image[at..at + buf.len()].copy_from_slice(buf);
        self.log.push(Op::Write(at as u64, buf.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.log.push(Op::Sync);
        Ok(())
    }
}

fn apply(image: &mut [u8], at: u64, data: &[u8]) {
    image[at as usize..at as usize + data.len()].copy_from_slice(data);
}

/// Every crash state of `log` run over `before` (see the module docs).
fn crash_states(before: &[u8], log: &[Op]) -> Vec<Vec<u8>> {
    let mut states = Vec::new();
    let mut synced = before.to_vec();
    let mut pending: Vec<(u64, &[u8])> = Vec::new();
    let mut emit = |synced: &[u8], pending: &[(u64, &[u8])]| {
        // Each write independently: not reached, reached whole, or torn after some pages.
        let choices: Vec<Vec<usize>> = pending
            .iter()
            .map(|(_, data)| {
                let n = data.len().div_ceil(PAGE);
                let mut c: Vec<usize> = vec![0, n];
                c.extend(
                    [1, n / 4, n / 2, 3 * n / 4, n - 1]
                        .into_iter()
                        .filter(|&p| p >= 1 && p < n),
                );
                c.sort_unstable();
                c.dedup();
                c
            })
            .collect();
        let mut pick = vec![0usize; pending.len()];
        loop {
            let mut s = synced.to_vec();
            for (i, (at, data)) in pending.iter().enumerate() {
                let pages = choices[i][pick[i]];
                apply(&mut s, *at, &data[..(pages * PAGE).min(data.len())]);
            }
            states.push(s);
            // The next combination, as an odometer.
            let mut i = 0;
            while i < pick.len() {
                pick[i] += 1;
                if pick[i] < choices[i].len() {
                    break;
                }
                pick[i] = 0;
                i += 1;
            }
            if i == pick.len() {
                break;
            }
        }
    };
    for op in log {
        match op {
            Op::Write(at, data) => pending.push((*at, data)),
            Op::Sync => {
                emit(&synced, &pending);
                for (at, data) in pending.drain(..) {
                    apply(&mut synced, at, data);
                }
            }
        }
    }
    emit(&synced, &pending);
    states
}

/// The master key `pass` opens `image` with, if any.
fn opens(image: &[u8], pass: &str) -> Option<Vec<u8>> {
    let mut read = |at: u64, buf: &mut [u8]| -> io::Result<()> {
        let at = at as usize;
        buf.copy_from_slice(
            image
                .get(at..at + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?,
        );
        Ok(())
    };
    open_with(&mut read, pass.as_bytes())
        .ok()
        .map(|o| o.key[..].to_vec())
}

fn luks1(dir: &Path) -> Vec<u8> {
    let img = dir.join("luks1");
    storage_core::crypto::luks1::create_image(&img, 1 << 20, b"first", 1000).unwrap();
    std::fs::read(img).unwrap()
}

fn luks2(dir: &Path) -> Vec<u8> {
    let img = dir.join("luks2");
    let key = dir.join("key");
    std::fs::write(&key, "first").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&img, vec![0u8; 17 << 20]).unwrap();
    cryptsetup_ok(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    // The header and keyslots: what a keyslot change touches (the payload starts at 16 MiB).
    let mut image = std::fs::read(img).unwrap();
    image.truncate(16 << 20);
    image
}

/// Runs `change` on `image`, and checks `holds(state, master key)` of every crash state.
fn cut_short(
    what: &str,
    image: Vec<u8>,
    change: impl FnOnce(&mut Recorder),
    holds: impl Fn(&[u8], &[u8]) -> bool,
) -> Vec<u8> {
    let key = opens(&image, "first").expect("the image opens");
    let mut rec = Recorder {
        image: image.clone(),
        log: Vec::new(),
    };
    change(&mut rec);
    let states = crash_states(&image, &rec.log);
    for (i, s) in states.iter().enumerate() {
        assert!(
            holds(s, &key),
            "{what}: crash state {i} of {}",
            states.len()
        );
    }
    rec.image
}

/// How many keyslots the header in `image` names.
fn keyslot_count(image: &[u8]) -> usize {
    let mut rec = Recorder {
        image: image.to_vec(),
        log: Vec::new(),
    };
    keyslots::list(&mut rec).expect("a header").1.len()
}

fn same(a: Option<Vec<u8>>, key: &[u8]) -> bool {
    a.is_some_and(|k| k == key)
}

#[test]
fn keyslot_changes_cut_short_lose_no_passphrase_they_must_keep() {
    let dir = tempfile::tempdir().unwrap();
    for (version, image) in [("LUKS1", luks1(dir.path())), ("LUKS2", luks2(dir.path()))] {
        // Add "second": "first" opens every state, and "second" every state whose header
        // names its keyslot (the material reaches the disk before the header).
        let image = cut_short(
            &format!("{version} add"),
            image,
            |io| {
                keyslots::add(
                    io,
                    b"first",
                    b"second",
                    &storage_core::crypto::KeyslotCost::minimal(),
                )
                .unwrap();
            },
            |s, key| {
                same(opens(s, "first"), key)
                    && (keyslot_count(s) == 1 || same(opens(s, "second"), key))
            },
        );
        assert!(opens(&image, "second").is_some(), "{version}: added");
        // Rotate "second" to "third": one of them opens every state.
        let image = cut_short(
            &format!("{version} change"),
            image,
            |io| {
                keyslots::change(
                    io,
                    b"second",
                    b"third",
                    &storage_core::crypto::KeyslotCost::minimal(),
                )
                .unwrap();
            },
            |s, key| same(opens(s, "second"), key) || same(opens(s, "third"), key),
        );
        assert!(opens(&image, "second").is_none(), "{version}: rotated away");
        // Remove the first keyslot with "third": "third" opens every state.
        let first = {
            let mut rec = Recorder {
                image: image.clone(),
                log: Vec::new(),
            };
            keyslots::list(&mut rec).unwrap().1[0].id
        };
        let image = cut_short(
            &format!("{version} remove"),
            image,
            |io| keyslots::remove(io, b"third", first).unwrap(),
            |s, key| same(opens(s, "third"), key),
        );
        assert!(opens(&image, "first").is_none(), "{version}: removed");
    }
}
