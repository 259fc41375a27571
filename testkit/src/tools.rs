//! Finding the host programs that tests drive as real clients and peers (QEMU, busybox,
//! qemu-storage-daemon, ...).
//!
//! A missing tool is a broken machine, not a reason to skip: every lookup here fails with an
//! error that names the tool and says how to install it (`scripts/setup.sh`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The script that installs every tool the test suite needs.
pub const SETUP_HINT: &str = "run scripts/setup.sh";

/// Returns the absolute path of the program `name` as found on `PATH`.
///
/// Fails with "`name` not found: run scripts/setup.sh" when it is not there, so a test that
/// needs it fails loudly instead of silently passing without its client.
pub fn require_tool(name: &str) -> Result<PathBuf> {
    match find_in_path(name) {
        Some(path) => Ok(path),
        None => bail!("{name} not found on PATH: {SETUP_HINT}"),
    }
}

/// Runs `qemu-img` (the image oracle) with `args`; a missing qemu-img fails the test with
/// how to install it.
pub fn qemu_img(args: &[&str]) -> std::process::Output {
    std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("qemu-img: {e} (Debian's qemu-utils: {SETUP_HINT})"))
}

/// Runs `qemu-img` with `args` and fails the test, with its output, unless it succeeds.
pub fn qemu_img_ok(args: &[&str]) {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `cryptsetup` (the LUKS oracle) with `args`, which must succeed; its standard
/// output. A missing cryptsetup fails the test with how to install it.
pub fn cryptsetup_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let bin = require_tool("cryptsetup").unwrap_or_else(|e| panic!("{e}"));
    let out = std::process::Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cryptsetup: {e}"));
    assert!(
        out.status.success(),
        "cryptsetup {:?}: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-img` making a LUKS image at `img` with `args`, which must succeed. QEMU times
/// PBKDF2 to pick its iterations, and on a busy machine its timing sometimes fails
/// ("Unable to get accurate CPU usage"): that, and only that, is tried again.
pub fn qemu_img_luks(args: &[&str], img: &std::path::Path) {
    for attempt in 1.. {
        let out = qemu_img(args);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // Under load (the suite's tests run side by side) it can miss many times running.
        assert!(
            attempt < 30 && err.contains("Unable to get accurate CPU usage"),
            "qemu-img {args:?}: {err}"
        );
        let _ = std::fs::remove_file(img);
        std::thread::sleep(std::time::Duration::from_millis(20 * attempt));
    }
}

/// qemu-img's `--image-opts` for the encrypted qcow2 image `img` and `below` encrypted
/// images under it, each opened with the secret `sec0`.
pub fn qcow2_key_opts(img: &Path, below: usize) -> String {
    let mut o = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        img.display()
    );
    for depth in 1..=below {
        o.push_str(&format!(
            ",{}encrypt.key-secret=sec0",
            "backing.".repeat(depth)
        ));
    }
    o
}

/// `qemu-img convert` to raw of the encrypted qcow2 chain `img` (`below` encrypted images
/// under it), opened with the passphrase in the file `key`; none if qemu-img fails.
pub fn qemu_img_decrypted(img: &Path, below: usize, key: &Path) -> Option<Vec<u8>> {
    let out = img.with_extension("plain");
    let _ = std::fs::remove_file(&out);
    let opts = qcow2_key_opts(img, below);
    let done = qemu_img(&[
        "convert",
        "-U",
        "--object",
        &format!("secret,id=sec0,file={}", key.display()),
        "--image-opts",
        &opts,
        "-O",
        "raw",
        &out.to_string_lossy(),
    ]);
    let data = done.status.success().then(|| std::fs::read(&out).ok())?;
    let _ = std::fs::remove_file(&out);
    data
}

/// `qemu-img check` finds the qcow2 image at `img` consistent: no corruption, no check
/// error, and no leaked cluster unless `leaks_allowed` (as after a crash, when QEMU allows
/// them too).
///
/// The oracles here read with `-U` (QEMU's force-share): the image may still be held by
/// the node or daemon under test, whose lock would refuse them; what it has flushed is
/// what they read.
pub fn qemu_img_check(img: &Path, leaks_allowed: bool) {
    let out = qemu_img(&["check", "-U", "--output=json", &img.to_string_lossy()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code();
    // 0: clean; 3: leaked clusters only.
    let ok = code == Some(0) || (leaks_allowed && code == Some(3));
    assert!(
        ok,
        "qemu-img check {} (exit {code:?}): {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{text}");
    assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "{text}");
    if !leaks_allowed {
        assert_eq!(v["leaks"].as_u64().unwrap_or(0), 0, "{text}");
    }
    // Our own checker (`strata image check`) says the same.
    let ours = storage_core::qcow2::check::check(img, storage_core::qcow2::check::Repair::None)
        .unwrap_or_else(|e| panic!("our check of {}: {e}", img.display()));
    assert_eq!(
        (i32::from(ours.exit_code()), ours.leaks),
        (code.unwrap_or(-1), v["leaks"].as_u64().unwrap_or(0)),
        "our check of {} disagrees with qemu-img's {text}: {ours:?}",
        img.display()
    );
}

/// `qemu-img create`: a qcow2 image at `img` over `backing` (a name relative to `img`'s
/// directory, as users give it) of format `format`, of the backing file's size.
pub fn qemu_img_overlay(img: &Path, backing: &str, format: &str) {
    qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        backing,
        "-F",
        format,
        &img.to_string_lossy(),
    ]);
}

/// `qemu-img create`: a qcow2 image at `img` over the raw file `base.raw` beside it (named
/// relatively, as users do), of the base's size.
pub fn qemu_img_overlay_on_raw_base(img: &Path) {
    qemu_img_overlay(img, "base.raw", "raw");
}

/// What the image at `img` (of any format qemu-img reads, with its backing chain) holds,
/// as qemu-img reads it: converted to a raw file in `scratch`, read and removed.
pub fn qemu_img_read(img: &Path, scratch: &Path) -> Vec<u8> {
    let raw = scratch.join(".qemu-img-read.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img_ok(&[
        "convert",
        "-U",
        "-O",
        "raw",
        &img.to_string_lossy(),
        &raw.to_string_lossy(),
    ]);
    let data = std::fs::read(&raw).unwrap_or_else(|e| panic!("{}: {e}", raw.display()));
    let _ = std::fs::remove_file(&raw);
    data
}

/// Returns `path` if it exists, otherwise an error naming `what` it is and the setup script.
pub fn require_file(path: &Path, what: &str) -> Result<PathBuf> {
    if path.exists() {
        Ok(path.to_path_buf())
    } else {
        bail!("{what} not found at {}: {SETUP_HINT}", path.display())
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    // Tests may run with a minimal PATH (CI, `env -i`): also look where Debian installs
    // system programs, so a tool that is installed is never reported missing.
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tool_every_machine_has() {
        let sh = require_tool("sh").unwrap();
        assert!(sh.is_absolute(), "{}", sh.display());
    }

    #[test]
    fn missing_tool_names_itself_and_the_setup_script() {
        let err = require_tool("strata-no-such-tool").unwrap_err().to_string();
        assert!(err.contains("strata-no-such-tool not found"), "{err}");
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }

    #[test]
    fn missing_file_names_what_it_is() {
        let err = require_file(Path::new("/nonexistent/strata"), "guest kernel")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest kernel not found at /nonexistent/strata"),
            "{err}"
        );
    }
}
