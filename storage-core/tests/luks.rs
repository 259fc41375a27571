//! Encryption against its oracles: our AES-256-XTS against IEEE 1619's vector and the
//! `xts-mode` crate on random data; LUKS1 images that `qemu-img` and `cryptsetup` make open
//! with their passphrase and decrypt to what was written into them, and images we make open
//! in `qemu-img` (which reads back what we encrypted) and pass `cryptsetup luksDump` and
//! `--test-passphrase`.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use storage_core::crypto::luks1::{self, create_image, open_image};
use storage_core::crypto::xts::Xts;
use storage_core::crypto::CryptoError;
use testkit::tools::{qemu_img_ok, require_tool};

const PASS: &str = "correct horse battery staple";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// IEEE 1619-2007, vector 10: XTS-AES-256, data unit 0xff, 512 bytes.
#[test]
fn xts_gives_ieee_1619_vector_10() {
    let key = hex(concat!(
        "2718281828459045235360287471352662497757247093699959574966967627",
        "3141592653589793238462643383279502884197169399375105820974944592"
    ));
    let want = hex(concat!(
        "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b",
        "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd",
        "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
        "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca",
        "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0",
        "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
        "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec",
        "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a",
        "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
        "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae",
        "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29",
        "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
        "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f",
        "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385",
        "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
        "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
    ));
    let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let xts = Xts::new(&key).unwrap();
    let mut buf = plain.clone();
    xts.encrypt(&mut buf, 0xff, 512);
    assert_eq!(buf, want);
    xts.decrypt(&mut buf, 0xff, 512);
    assert_eq!(buf, plain);
}

/// Random keys, data, sector numbers and every sector size LUKS allows, against `xts-mode`.
#[test]
fn xts_agrees_with_the_xts_mode_crate_on_random_data() {
    use aes::cipher::KeyInit;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let key: Vec<u8> = (0..64).map(|_| next() as u8).collect();
        let sector_size = [512, 1024, 2048, 4096][round % 4];
        // Up to 20 sectors: across the cipher's 4 KiB batches.
        let sectors = 1 + (next() % 20) as usize;
        let first = next() >> (next() % 64);
        let plain: Vec<u8> = (0..sector_size * sectors).map(|_| next() as u8).collect();
        let ours = Xts::new(&key).unwrap();
        let mut mine = plain.clone();
        ours.encrypt(&mut mine, first, sector_size);
        let theirs = xts_mode::Xts128::new(
            aes::Aes256::new_from_slice(&key[..32]).unwrap(),
            aes::Aes256::new_from_slice(&key[32..]).unwrap(),
        );
        let mut reference = plain.clone();
        theirs.encrypt_area(
            &mut reference,
            sector_size,
            u128::from(first),
            xts_mode::get_tweak_default,
        );
        assert_eq!(mine, reference, "round {round}");
        ours.decrypt(&mut mine, first, sector_size);
        assert_eq!(mine, plain, "round {round}");
    }
    assert!(matches!(
        Xts::new(&[0u8; 32]),
        Err(storage_core::crypto::xts::XtsError::KeyLength(32))
    ));
}

/// Data every sector of which names its place.
fn pattern(len: usize) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| ((i as u64) ^ 0x1d87_2b41_a3c5_9e6f).to_le_bytes())
        .collect()
}

/// The payload of a LUKS1 image, decrypted with our code.
fn decrypt_payload(img: &Path, passphrase: &str, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let u =
        open_image(&f, passphrase.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, u.payload_offset()).unwrap();
    u.cipher().unwrap().decrypt(&mut buf, 0, 512);
    buf
}

fn secret_arg() -> String {
    format!("secret,id=sec0,data={PASS}")
}

#[test]
fn images_qemu_img_makes_open_and_decrypt_to_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let plain = pattern(1 << 20);
    let raw = dir.path().join("plain.raw");
    std::fs::write(&raw, &plain).unwrap();
    let img = dir.path().join("qemu.luks");
    let args = [
        "convert",
        "--object",
        &secret_arg(),
        "-f",
        "raw",
        "-O",
        "luks",
        "-o",
        "key-secret=sec0,iter-time=10",
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ];
    testkit::tools::qemu_img_luks(&args, &img);
    assert_eq!(decrypt_payload(&img, PASS, plain.len()), plain);
    let f = std::fs::File::open(&img).unwrap();
    assert!(matches!(
        open_image(&f, b"not the passphrase"),
        Err(CryptoError::WrongPassphrase)
    ));
}

#[test]
fn images_we_make_open_in_qemu_img_and_read_what_we_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ours.luks");
    let plain = pattern(1 << 20);
    create_image(&img, plain.len() as u64, PASS.as_bytes(), 1000).unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let u = open_image(&f, PASS.as_bytes()).unwrap();
        let mut buf = plain.clone();
        u.cipher().unwrap().encrypt(&mut buf, 0, 512);
        f.write_all_at(&buf, u.payload_offset()).unwrap();
    }
    let out = dir.path().join("out.raw");
    qemu_img_ok(&[
        "convert",
        "--object",
        &secret_arg(),
        "--image-opts",
        &format!(
            "driver=luks,key-secret=sec0,file.filename={}",
            img.display()
        ),
        "-O",
        "raw",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), plain);
}

fn cryptsetup(args: &[&str]) -> std::process::Output {
    let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
    Command::new(bin).args(args).output().unwrap()
}

/// Runs cryptsetup, which must succeed; its standard output.
fn cryptsetup_ok(args: &[&str]) -> String {
    let out = cryptsetup(args);
    assert!(
        out.status.success(),
        "cryptsetup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `cryptsetup open --test-passphrase` accepts the key file for the image.
fn takes_key(keyfile: &str, img: &Path) -> bool {
    let args = ["open", "--test-passphrase", "--key-file", keyfile];
    cryptsetup(&[&args[..], &[img.to_str().unwrap()]].concat())
        .status
        .success()
}

#[test]
fn cryptsetup_reads_our_images_and_we_open_its_luks1_images() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("key");
    std::fs::write(&keyfile, PASS).unwrap();
    let key = keyfile.to_str().unwrap();

    // Theirs, opened by us.
    let theirs = dir.path().join("theirs.luks");
    std::fs::write(&theirs, vec![0u8; 4 << 20]).unwrap();
    cryptsetup_ok(&[
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks1",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        key,
        theirs.to_str().unwrap(),
    ]);
    let f = std::fs::File::open(&theirs).unwrap();
    let u = open_image(&f, PASS.as_bytes()).unwrap();
    assert_eq!(u.slot, 0);
    assert!(matches!(
        open_image(&f, b"wrong"),
        Err(CryptoError::WrongPassphrase)
    ));

    // Ours, read by cryptsetup.
    let ours = dir.path().join("ours.luks");
    create_image(&ours, 1 << 20, PASS.as_bytes(), 1000).unwrap();
    let text = cryptsetup_ok(&["luksDump", ours.to_str().unwrap()]);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(field("Version:"), "1");
    assert_eq!(field("Cipher name:"), "aes");
    assert_eq!(field("Cipher mode:"), "xts-plain64");
    assert_eq!(field("Hash spec:"), "sha256");
    assert!(text.contains("Key Slot 0: ENABLED"), "{text}");
    assert!(text.contains("Key Slot 1: DISABLED"), "{text}");
    assert!(takes_key(key, &ours), "cryptsetup refused our keyslot");
    std::fs::write(&keyfile, "wrong").unwrap();
    assert!(
        !takes_key(key, &ours),
        "cryptsetup took the wrong passphrase"
    );
}

/// A valid header of ours, to damage.
fn our_header(dir: &Path) -> Vec<u8> {
    let img = dir.join("h.luks");
    create_image(&img, 1 << 20, PASS.as_bytes(), 1000).unwrap();
    std::fs::read(&img).unwrap()[..luks1::HEADER_BYTES].to_vec()
}

fn refused(h: &[u8]) -> String {
    match luks1::Header::parse(h) {
        Ok(_) => panic!("a damaged header was accepted"),
        Err(e) => e.to_string(),
    }
}

/// Headers are input: what we do not implement is named, and what would crash, overlap the
/// keys with the guest's sectors, or keep a core busy for hours is refused.
#[test]
fn what_we_refuse_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let good = our_header(dir.path());
    luks1::Header::parse(&good).unwrap();
    assert!(matches!(
        luks1::Header::parse(&[0u8; luks1::HEADER_BYTES]),
        Err(CryptoError::NotLuks)
    ));
    let with = |at: usize, bytes: &[u8]| {
        let mut h = good.clone();
        h[at..at + bytes.len()].copy_from_slice(bytes);
        h
    };
    assert!(refused(&with(40, b"cbc-essiv:sha256\0")).contains("cbc-essiv"));
    assert!(refused(&with(72, b"sha1\0\0")).contains("sha1"));
    // A key size whose bits overflow 32 bits.
    assert!(refused(&with(108, &(1u32 << 30).to_be_bytes())).contains("8589934592-bit"));
    // Keyslot 0: stripes, iterations, where its material lies.
    let slot0 = 208;
    assert!(refused(&with(slot0 + 44, &1u32.to_be_bytes())).contains("stripes"));
    assert!(refused(&with(slot0 + 4, &u32::MAX.to_be_bytes())).contains("iterations"));
    assert!(refused(&with(slot0 + 40, &0u32.to_be_bytes())).contains("overlaps"));
    assert!(refused(&with(slot0 + 40, &520u32.to_be_bytes())).contains("overlaps"));
    // The payload over the keys, or at 0.
    assert!(refused(&with(104, &100u32.to_be_bytes())).contains("overlaps"));
    assert!(refused(&with(104, &0u32.to_be_bytes())).contains("detached"));
    // The master key digest's iterations.
    assert!(refused(&with(164, &u32::MAX.to_be_bytes())).contains("iterations"));
}
