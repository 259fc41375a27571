//! Passphrases of an encrypted disk changed while it serves, through `strata key` and the
//! API: a passphrase added, rotated and removed on a LUKS1 image (qemu-img's) and a LUKS2
//! one (cryptsetup's), each change checked by cryptsetup's own `--test-passphrase`, while a
//! libblkio client's data stays readable through the daemon. No passphrase appears in the
//! daemon's log, the audit log, `/metrics`, the disk's API answers or an error.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::blkio_client::Client;
use testkit::daemon::{strata, strata_run, DaemonCommand};
use testkit::tools::{qemu_img_luks, require_tool};

fn key_file(dir: &Path, name: &str, pass: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pass).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Whether cryptsetup's own check takes the passphrase in `key` for `img`.
fn cryptsetup_takes(img: &Path, key: &Path) -> bool {
    let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
    Command::new(bin)
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(key)
        .arg(img)
        .output()
        .unwrap()
        .status
        .success()
}

fn luks1_image(img: &Path, key: &Path) {
    qemu_img_luks(
        &[
            "create",
            "-q",
            "--object",
            &format!("secret,id=sec0,file={}", key.display()),
            "-f",
            "luks",
            "-o",
            "key-secret=sec0,iter-time=10",
            img.to_str().unwrap(),
            "16M",
        ],
        img,
    );
}

fn luks2_image(img: &Path, key: &Path) {
    std::fs::write(img, vec![0u8; 48 << 20]).unwrap();
    let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bin)
        .args(["luksFormat", "--batch-mode", "--type", "luks2"])
        .args(["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"])
        .arg("--key-file")
        .arg(key)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cryptsetup luksFormat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn passphrases_are_added_rotated_and_removed_while_the_disk_serves() {
    const PASSES: [&str; 4] = [
        "first passphrase 71c1",
        "second passphrase 9f2e",
        "third passphrase 0b5d",
        "wrong passphrase 44aa",
    ];
    type Make = fn(&Path, &Path);
    for (version, make) in [(1, luks1_image as Make), (2, luks2_image)] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let keys: Vec<PathBuf> = PASSES
            .iter()
            .enumerate()
            .map(|(i, p)| key_file(d, &format!("key{i}"), p))
            .collect();
        let img = d.join("vm.luks");
        make(&img, &keys[0]);
        let (sock, api, audit) = (d.join("vm.sock"), d.join("api.sock"), d.join("audit.log"));
        let mut daemon = DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&sock)
            .arg("--id")
            .arg("vm")
            .arg("--api-socket")
            .arg(&api)
            .arg("--audit-log")
            .arg(&audit)
            .arg("--disk")
            .arg(format!(
                "path={},format=luks,key-file={}",
                img.display(),
                keys[0].display()
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = Client::open(&sock, 1).expect("libblkio connects");
        let data: Vec<u8> = (0..65536).map(|i| (i * 13 % 251) as u8).collect();
        client.queue(0).write(4096, &data).unwrap();
        let k = |i: usize| keys[i].to_str().unwrap().to_string();

        let list = strata(&api, &["key", "list", "vm"]);
        assert!(list.contains(&format!("LUKS{version}")), "{list}");
        // Add the second passphrase with the first.
        let out = strata(
            &api,
            &[
                "--json",
                "key",
                "add",
                "vm",
                "--key-file",
                &k(0),
                "--new-key-file",
                &k(1),
                "--iter-time",
                "10",
            ],
        );
        let added: serde_json::Value = serde_json::from_str(&out).unwrap();
        let new_slot = added["keyslot"].clone();
        assert!(new_slot.is_u64(), "{out}");
        assert!(cryptsetup_takes(&img, &keys[0]) && cryptsetup_takes(&img, &keys[1]));
        // The new keyslot's key derivation is cryptsetup's default for the version; the
        // image's first keyslot is PBKDF2 in both (made so), so this one is ours.
        let v: serde_json::Value =
            serde_json::from_str(&strata(&api, &["--json", "key", "list", "vm"])).unwrap();
        let slots = v["keyslots"].as_array().unwrap();
        let new = if version == 1 { "pbkdf2" } else { "argon2id" };
        let kdf_of_new = slots
            .iter()
            .find(|s| s["id"] == new_slot)
            .map(|s| &s["kdf"]);
        assert_eq!(kdf_of_new, Some(&new.into()), "LUKS{version}: {v}");
        assert!(
            slots
                .iter()
                .any(|s| s["id"] != new_slot && s["kdf"] == "pbkdf2"),
            "LUKS{version}: {v}"
        );
        // Rotate the second to the third: the second stops working.
        strata(
            &api,
            &[
                "key",
                "change",
                "vm",
                "--key-file",
                &k(1),
                "--new-key-file",
                &k(2),
                "--iter-time",
                "10",
            ],
        );
        assert!(
            cryptsetup_takes(&img, &keys[2]),
            "LUKS{version}: the new passphrase"
        );
        assert!(
            !cryptsetup_takes(&img, &keys[1]),
            "LUKS{version}: the rotated passphrase"
        );
        // Remove the first passphrase's keyslot, with the third.
        let v: serde_json::Value =
            serde_json::from_str(&strata(&api, &["--json", "key", "list", "vm"])).unwrap();
        let slots = v["keyslots"].as_array().unwrap().clone();
        assert_eq!(slots.len(), 2, "{v}");
        let first = slots[0]["id"].as_u64().unwrap().to_string();
        // Not with the passphrase of the keyslot itself, nor a wrong one.
        let (ok, _, err) = strata_run(&api, &["key", "remove", "vm", &first, "--key-file", &k(0)]);
        assert!(!ok && err.contains("no keyslot opens"), "{err}");
        let (ok, _, err) = strata_run(
            &api,
            &[
                "key",
                "add",
                "vm",
                "--key-file",
                &k(3),
                "--new-key-file",
                &k(1),
            ],
        );
        assert!(!ok && err.contains("no keyslot opens"), "{err}");
        if version == 2 {
            // A token (as systemd-cryptenroll's) on the keyslot about to go: cryptsetup
            // refuses a header whose token names a keyslot that is gone.
            let token = d.join("token.json");
            std::fs::write(&token, r#"{"type":"strata-test","keyslots":[]}"#).unwrap();
            let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
            let out = Command::new(bin)
                .args(["token", "import", "--json-file"])
                .arg(&token)
                .args(["--key-slot", &first])
                .arg(&img)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // A passphrase of the wrong type is refused without being quoted.
        let (ok, _, err) = strata_run(
            &api,
            &[
                "raw",
                "POST",
                "/v1/disks/vm/keyslots",
                "--data",
                r#"{"passphrase": 918273645}"#,
            ],
        );
        assert!(!ok && err.contains("passphrase: a string"), "{err}");
        assert!(!err.contains("918273645"), "{err}");
        // A misspelt key is refused, and its value is not in the audit log either.
        let (ok, _, err) = strata_run(
            &api,
            &[
                "raw",
                "POST",
                "/v1/disks/vm/keyslots",
                "--data",
                r#"{"passphrase": "x", "new_pasphrase": "typo secret 5150"}"#,
            ],
        );
        assert!(!ok, "{err}");
        strata(&api, &["key", "remove", "vm", &first, "--key-file", &k(2)]);
        assert!(
            !cryptsetup_takes(&img, &keys[0]),
            "LUKS{version}: the removed passphrase"
        );
        assert!(cryptsetup_takes(&img, &keys[2]));
        // The guest's data is as it was, through the same connection.
        assert_eq!(client.queue(0).read(4096, data.len()).unwrap(), data);

        // Nothing secret anywhere a user or a log reader sees.
        let metrics = testkit::http::get(&api, "/metrics").unwrap().text();
        let disk = testkit::http::get(&api, "/v1/disks/vm").unwrap().text();
        let slots_answer = testkit::http::get(&api, "/v1/disks/vm/keyslots")
            .unwrap()
            .text();
        drop(client);
        daemon.terminate().unwrap();
        let log = daemon.output();
        let audit_text = std::fs::read_to_string(&audit).unwrap();
        assert!(audit_text.contains("keyslot.change"), "{audit_text}");
        assert!(
            !audit_text.contains("918273645"),
            "the audit log quotes a passphrase"
        );
        assert!(
            !audit_text.contains("typo secret 5150"),
            "the audit log quotes a secret"
        );
        for (what, text) in [
            ("the daemon's log", &log),
            ("the audit log", &audit_text),
            ("/metrics", &metrics),
            ("the disk's answer", &disk),
            ("the keyslots' answer", &slots_answer),
        ] {
            for p in PASSES {
                assert!(
                    !text.contains(p),
                    "LUKS{version}: {what} holds a passphrase"
                );
            }
        }
        // A restart opens the image with the passphrase it has now.
        let mut daemon = DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&sock)
            .arg("--disk")
            .arg(format!(
                "path={},format=luks,key-file={}",
                img.display(),
                keys[2].display()
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut client = Client::open(&sock, 1).expect("libblkio connects");
        assert_eq!(client.queue(0).read(4096, data.len()).unwrap(), data);
        drop(client);
        daemon.terminate().unwrap();
    }
}

/// On an encrypted qcow2 disk, a passphrase change reaches every image of its chain: the
/// snapshots taken before it open with the new passphrase (and no longer the old), and a
/// snapshot taken after it too, in qemu-img and at the next start.
#[test]
fn an_encrypted_qcow2_disk_changes_the_passphrase_of_its_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = key_file(d, "old.key", "the old passphrase 3a9c");
    let new = key_file(d, "new.key", "the new passphrase 77e0");
    let img = d.join("vm.qcow2");
    testkit::daemon::strata_create_encrypted(&img, "4M", "qcow2", &old);
    let (sock, api) = (d.join("vm.sock"), d.join("api.sock"));
    let serve = |key: &Path| {
        DaemonCommand::vhost_blk()
            .unwrap_or_else(|e| panic!("{e}"))
            .arg("--socket")
            .arg(&sock)
            .arg("--id")
            .arg("vm")
            .arg("--api-socket")
            .arg(&api)
            .arg("--disk")
            .arg(format!(
                "path={},format=qcow2,key-file={}",
                img.display(),
                key.display()
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let mut daemon = serve(&old);
    let mut client = Client::open(&sock, 1).expect("libblkio connects");
    let first: Vec<u8> = (0..65536).map(|i| (i * 7 % 251) as u8).collect();
    let second: Vec<u8> = (0..65536).map(|i| (i * 11 % 241) as u8).collect();
    client.queue(0).write(4096, &first).unwrap();
    strata(&api, &["snapshot", "create", "vm", "s1"]);
    client.queue(0).write(1 << 20, &second).unwrap();
    let o = |p: &Path| p.to_str().unwrap().to_string();
    let change = [
        "key",
        "change",
        "vm",
        "--key-file",
        &o(&old),
        "--new-key-file",
        &o(&new),
        "--iter-time",
        "10",
    ];
    // The change writes the snapshot's LUKS header: refused while another program (here a
    // clone's backing file, opened read-only) reads the snapshot, and nothing changes.
    let s1 = d.join("vm@s1.qcow2");
    let reader = testkit::workload::open(&format!(
        "path={},format=qcow2,key-file={},readonly=on",
        s1.display(),
        old.display()
    ))
    .unwrap_or_else(|e| panic!("a reader opens the snapshot: {e}"));
    let (ok, _, err) = strata_run(&api, &change);
    assert!(
        !ok && err.contains("409") && err.contains("vm@s1.qcow2"),
        "{err}"
    );
    drop(reader);
    assert!(
        testkit::tools::qemu_img_decrypted(&s1, 0, &old).is_some()
            && testkit::tools::qemu_img_decrypted(&s1, 0, &new).is_none()
            && testkit::tools::qemu_img_decrypted(&img, 1, &new).is_none(),
        "the refused change added the new passphrase nowhere and left the old one"
    );
    strata(&api, &change);
    strata(&api, &["snapshot", "create", "vm", "s2"]);
    let v: serde_json::Value =
        serde_json::from_str(&strata(&api, &["--json", "key", "list", "vm"])).unwrap();
    assert_eq!(v["keyslots"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(client.queue(0).read(4096, first.len()).unwrap(), first);
    drop(client);
    daemon.terminate().unwrap();

    let mut want = vec![0u8; 4 << 20];
    want[4096..4096 + first.len()].copy_from_slice(&first);
    want[1 << 20..(1 << 20) + second.len()].copy_from_slice(&second);
    assert!(
        testkit::tools::qemu_img_decrypted(&img, 2, &new) == Some(want.clone()),
        "qemu-img opens the whole chain with the new passphrase"
    );
    assert!(
        testkit::tools::qemu_img_decrypted(&s1, 0, &new).is_some(),
        "the first snapshot takes the new passphrase"
    );
    assert!(
        testkit::tools::qemu_img_decrypted(&s1, 0, &old).is_none(),
        "the first snapshot no longer takes the old passphrase"
    );
    let mut daemon = serve(&new);
    let mut client = Client::open(&sock, 1).expect("libblkio connects");
    assert_eq!(client.queue(0).read(1 << 20, second.len()).unwrap(), second);
    drop(client);
    daemon.terminate().unwrap();
}
