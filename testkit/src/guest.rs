//! Linux guests under QEMU for end-to-end tests: the real kernel drivers (virtio-blk,
//! virtio-fs) talking to our vhost-user daemons.
//!
//! This module owns three things:
//! - finding the guest assets: a Debian cloud kernel and its modules that `scripts/setup.sh`
//!   unpacks into `<workspace>/.cache/guest` (or `$STRATA_GUEST_DIR`);
//! - the initramfs: a base archive (static busybox, the virtio modules, an `/init`) built once
//!   per process, followed by a small per-test archive holding `/test.sh` and data files
//!   (Linux unpacks concatenated newc archives in order), and static guest programs built
//!   from workspace crates ([`static_guest_program`]) for what busybox has no tool for;
//! - running QEMU (TCG, vhost-user-capable shared memory) with a hard timeout, capturing the
//!   serial console into a [`GuestRun`] and into `target/guest-logs/<test name>.log`;
//! - firmware boots ([`Firmware::SeaBios`], [`Firmware::Ovmf`]) from a [`BlkDisk`] with a
//!   `bootindex`, for guests that are not our initramfs (a BIOS boot program that halts is
//!   stopped with [`Guest::stop_when_console_contains`]) or that carry it on their boot disk
//!   ([`Guest::initramfs`], [`Guest::kernel_command_line`]; `crate::image` builds the disk).
//!
//! The guest's `/init` runs `/test.sh`, prints `STRATA-GUEST-EXIT <status>` and powers off.
//! The script reports what it saw with lines `RESULT key=value [key=value ...]`, read back
//! with [`GuestRun::value`].
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let run = testkit::guest::Guest::new("example")
//!     .script("echo RESULT cpus=$(nproc)")
//!     .run()?;
//! run.ensure_success()?;
//! assert_eq!(run.require("cpus")?, "2");
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::tools::{require_file, require_tool, SETUP_HINT};

/// Environment variable that overrides where the guest kernel and modules are.
pub const GUEST_DIR_ENV: &str = "STRATA_GUEST_DIR";

/// Kernel modules the guest loads, in dependency order (the cloud kernel builds virtio as
/// modules, and `insmod` does not resolve dependencies).
pub const GUEST_MODULES: [&str; 8] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "fuse",
    "virtiofs",
];

/// Default limit on one QEMU run; a guest that hangs must fail the test, not stall CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Marker `/init` prints with `/test.sh`'s exit status.
const EXIT_MARKER: &str = "STRATA-GUEST-EXIT ";
/// Marker `/init` prints when it could not set the guest up (a module failed to load).
const INIT_ERROR_MARKER: &str = "STRATA-GUEST-ERROR ";
const RESULT_PREFIX: &str = "RESULT ";

/// The workspace root, fixed when testkit is compiled.
pub fn workspace_root() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    dir.canonicalize().unwrap_or(dir)
}

/// Where build output goes: `$CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target"),
    }
}

/// The guest kernel and module tree unpacked by `scripts/setup.sh`.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    /// The directory everything was unpacked into.
    pub dir: PathBuf,
    /// The kernel image QEMU boots with `-kernel`.
    pub kernel: PathBuf,
    /// `lib/modules/<version>` for that kernel.
    pub modules: PathBuf,
}

impl GuestAssets {
    /// Finds the assets in `$STRATA_GUEST_DIR`, or `<workspace>/.cache/guest`.
    pub fn locate() -> Result<Self> {
        let dir = match std::env::var_os(GUEST_DIR_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => workspace_root().join(".cache/guest"),
        };
        Self::in_dir(&dir)
    }

    /// Finds the assets in `dir`.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        let link = require_file(&dir.join("vmlinuz"), "guest kernel")?;
        let kernel = link.canonicalize().with_context(|| {
            format!(
                "guest kernel {} is a dangling link: {SETUP_HINT}",
                link.display()
            )
        })?;
        let modules_root = require_file(&dir.join("lib/modules"), "guest kernel modules")?;
        // Prefer the module tree whose version matches the kernel's file name
        // (`vmlinuz-<version>`); otherwise accept the only one there is.
        let version = kernel
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("vmlinuz-"))
            .map(str::to_owned);
        let modules = match version.map(|v| modules_root.join(v)).filter(|p| p.is_dir()) {
            Some(path) => path,
            None => {
                let trees: Vec<PathBuf> = fs::read_dir(&modules_root)?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.join("kernel").is_dir())
                    .collect();
                match trees.as_slice() {
                    [only] => only.clone(),
                    _ => bail!(
                        "cannot tell which of {} module trees in {} belongs to {}: {SETUP_HINT}",
                        trees.len(),
                        modules_root.display(),
                        kernel.display()
                    ),
                }
            }
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            kernel,
            modules,
        })
    }
}

/// A writer for the newc ("070701") cpio format, the one the Linux initramfs unpacker reads.
///
/// Parent directories are added automatically; the archive needs no root privileges to hold
/// device nodes, which is why it is written here rather than by `cpio -o`.
#[derive(Debug, Default)]
pub struct CpioArchive {
    buf: Vec<u8>,
    dirs: BTreeSet<String>,
}

/// Inode numbers unique across every archive this process writes, so concatenated archives
/// never look like hard links of each other to the unpacker.
static NEXT_INO: AtomicU32 = AtomicU32::new(1);

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl CpioArchive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory (and its parents) with mode 0755.
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        if self.dirs.insert(path.clone()) {
            self.entry(&path, S_IFDIR | 0o755, 2, (0, 0), &[])?;
        }
        Ok(())
    }

    /// Adds a regular file with permission bits `perm` (e.g. 0o644, 0o755).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the archive bytes, padded to 512 bytes like `cpio -o`.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        let padded = self.buf.len().next_multiple_of(512);
        self.buf.resize(padded, 0);
        Ok(self.buf)
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        let mut prefix = String::new();
        let mut components: Vec<&str> = path.split('/').collect();
        components.pop();
        for component in components {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(component);
            if self.dirs.insert(prefix.clone()) {
                self.entry(&prefix.clone(), S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let size =
            u32::try_from(data.len()).map_err(|_| anyhow!("{name}: too large for cpio newc"))?;
        let namesize = u32::try_from(name.len() + 1).map_err(|_| anyhow!("cpio name too long"))?;
        let ino = NEXT_INO.fetch_add(1, Ordering::Relaxed);
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for field in fields {
            self.buf
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
        Ok(())
    }

    fn pad4(&mut self) {
        let padded = self.buf.len().next_multiple_of(4);
        self.buf.resize(padded, 0);
    }
}

fn normalize(path: &str) -> Result<String> {
    let trimmed = path.trim_start_matches('/').trim_end_matches('/');
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        bail!("bad path for the guest archive: {path:?}");
    }
    Ok(trimmed.to_owned())
}

/// The guest's `/init`. Shell, because busybox is all there is in the guest.
const INIT_SCRIPT: &str = r#"#!/bin/sh
# Generated by testkit::guest: set the guest up, run the test's /test.sh, power off.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /mnt
for m in @MODULES@; do
    insmod /lib/modules/$m.ko || echo "STRATA-GUEST-ERROR insmod $m failed"
done
echo "STRATA-GUEST-READY"
status=127
if [ -f /test.sh ]; then
    sh /test.sh
    status=$?
else
    echo "STRATA-GUEST-ERROR no /test.sh in the initramfs"
fi
echo "STRATA-GUEST-EXIT $status"
sync
poweroff -f
"#;

/// Builds the base initramfs from `assets` (busybox, modules, `/init`).
pub fn build_base_initramfs(assets: &GuestAssets) -> Result<Vec<u8>> {
    let busybox_path = require_tool("busybox")?;
    let busybox =
        fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;
    if elf_has_interpreter(&busybox)? {
        bail!(
            "{} is dynamically linked; the guest needs the one from busybox-static: {SETUP_HINT}",
            busybox_path.display()
        );
    }

    let mut archive = CpioArchive::new();
    for dir in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "lib/modules",
    ] {
        archive.dir(dir)?;
    }
    // The kernel opens /dev/console for init's stdio before /init can mount devtmpfs.
    archive.char_dev("dev/console", 0o600, 5, 1)?;
    archive.file("bin/busybox", 0o755, &busybox)?;
    archive.symlink("bin/sh", "busybox")?;

    let found = find_modules(&assets.modules.join("kernel"))?;
    for name in GUEST_MODULES {
        let path = found.get(name).ok_or_else(|| {
            anyhow!(
                "kernel module {name} not found under {}: {SETUP_HINT}",
                assets.modules.display()
            )
        })?;
        archive.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &read_module(path)?,
        )?;
    }
    let init = INIT_SCRIPT.replace("@MODULES@", &GUEST_MODULES.join(" "));
    archive.file("init", 0o755, init.as_bytes())?;
    archive.finish()
}

/// The base initramfs for `assets`, built once per process and guest directory.
pub fn base_initramfs(assets: &GuestAssets) -> Result<Arc<Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Vec<u8>>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(bytes) = cache.get(&assets.dir) {
        return Ok(bytes.clone());
    }
    let bytes = Arc::new(build_base_initramfs(assets)?);
    cache.insert(assets.dir.clone(), bytes.clone());
    Ok(bytes)
}

/// The target guest programs are built for: the host's own, linked statically (no other
/// target can be installed here; see shared/REAL-CLIENTS.md).
const GUEST_PROGRAM_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the workspace binary `package` (a crate whose binary has the same name, such as
/// `guest-fs-ops`) as a static program a busybox guest can run, and returns its bytes.
///
/// It is built once per process with `cargo build --release --offline` and
/// `-C target-feature=+crt-static` into `<target>/guest-programs`: a target directory of its
/// own, so the different flags never invalidate the workspace's build and the nested cargo
/// never waits for the lock of the cargo running the tests. Only crates already in the
/// workspace's lock file and cache are used; nothing is fetched at test time.
pub fn static_guest_program(package: &str) -> Result<Arc<Vec<u8>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(bytes) = cache.get(package) {
        return Ok(bytes.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let target_dir = target_dir().join("guest-programs");
    let output = Command::new(&cargo)
        .args(["build", "--release", "--offline", "--quiet", "-p", package])
        .args(["--bin", package, "--target", GUEST_PROGRAM_TARGET])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        // CARGO_ENCODED_RUSTFLAGS wins over RUSTFLAGS; set it, whatever the caller had.
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS")
        // Small enough to add little to the initramfs the guest unpacks.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "true")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} to build {package}", cargo.to_string_lossy()))?;
    if !output.status.success() {
        bail!(
            "building the guest program {package} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let path = target_dir
        .join(GUEST_PROGRAM_TARGET)
        .join("release")
        .join(package);
    let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if elf_has_interpreter(&bytes)? {
        bail!(
            "{} is dynamically linked although built with +crt-static",
            path.display()
        );
    }
    let bytes = Arc::new(bytes);
    cache.insert(package.to_owned(), bytes.clone());
    Ok(bytes)
}

/// Kernel modules beyond the base set (`names`, as the kernel spells them), decompressed,
/// in the order given, for a test whose script loads them itself (`insmod`).
pub fn extra_modules(names: &[&'static str]) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let assets = GuestAssets::locate()?;
    let found = find_named_modules(&assets.modules.join("kernel"), names)?;
    names
        .iter()
        .map(|n| {
            let path = found.get(n).with_context(|| {
                format!(
                    "kernel module {n} not found under {}: {SETUP_HINT}",
                    assets.modules.display()
                )
            })?;
            Ok((*n, read_module(path)?))
        })
        .collect()
}

/// A host program and every shared library it loads (the dynamic loader included), as
/// (path, bytes) to put at the same paths in the guest: for a tool busybox lacks.
pub fn host_program(name: &str) -> Result<Vec<(String, Vec<u8>)>> {
    let program = require_tool(name)?;
    let ldd = require_tool("ldd")?;
    let out = Command::new(ldd)
        .arg(&program)
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LD_PRELOAD")
        .output()
        .with_context(|| format!("running ldd on {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut files = vec![program.display().to_string()];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains("not found") {
            bail!(
                "{}: a library it needs is missing: {}",
                program.display(),
                line.trim()
            );
        }
        let path = match line.split_once("=>") {
            Some((_, right)) => right.trim().split(' ').next().unwrap_or(""),
            None => line.trim().split(' ').next().unwrap_or(""),
        };
        if path.starts_with('/') {
            files.push(path.to_string());
        }
    }
    files
        .into_iter()
        .map(|f| {
            let bytes = fs::read(&f).with_context(|| format!("reading {f}"))?;
            Ok((f, bytes))
        })
        .collect()
}

/// Maps each wanted module name to its file, `.ko` or `.ko.xz`.
fn find_modules(kernel_dir: &Path) -> Result<HashMap<&'static str, PathBuf>> {
    find_named_modules(kernel_dir, &GUEST_MODULES)
}

/// Maps each of `names` found under `kernel_dir` to its file, `.ko` or `.ko.xz`.
fn find_named_modules(
    kernel_dir: &Path,
    names: &[&'static str],
) -> Result<HashMap<&'static str, PathBuf>> {
    let mut found = HashMap::new();
    let mut stack = vec![kernel_dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = fs::read_dir(&dir)
            .with_context(|| format!("listing {}: {SETUP_HINT}", dir.display()))?;
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
                continue;
            }
            let Some(file) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = file
                .strip_suffix(".ko")
                .or_else(|| file.strip_suffix(".ko.xz"))
            else {
                continue;
            };
            // The kernel treats '-' and '_' in module names as the same character.
            let stem = stem.replace('-', "_");
            if let Some(name) = names.iter().find(|m| m.replace('-', "_") == stem) {
                found.insert(*name, path);
            }
        }
    }
    Ok(found)
}

/// Reads a module, decompressing `.ko.xz` on the host: busybox's insmod cannot.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let xz = require_tool("xz")?;
        let out = Command::new(xz)
            .arg("-dc")
            .arg(path)
            .output()
            .with_context(|| format!("running xz on {}", path.display()))?;
        if !out.status.success() {
            bail!(
                "xz -dc {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    } else {
        fs::read(path).with_context(|| format!("reading {}", path.display()))
    }
}

/// Whether an ELF64 file has a PT_INTERP program header, i.e. needs a dynamic loader.
fn elf_has_interpreter(elf: &[u8]) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let u16_at = |off: usize| {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        elf.get(off..off + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("slice of 8 bytes")))
    };
    if elf.get(..5) != Some(b"\x7fELF\x02".as_slice()) {
        bail!("not a 64-bit ELF program");
    }
    let malformed = || anyhow!("malformed ELF header");
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(malformed)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(malformed)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(malformed)?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).ok_or_else(malformed)?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[derive(Debug, Clone)]
enum Device {
    Blk(BlkDisk),
    Fs { socket: PathBuf, tag: String },
}

/// A vhost-user-blk disk as the guest sees it: QEMU's `vhost-user-blk-pci` device.
#[derive(Debug, Clone)]
pub struct BlkDisk {
    socket: PathBuf,
    queues: u16,
    bootindex: Option<u32>,
    properties: Vec<String>,
}

impl BlkDisk {
    /// The disk served on `socket`, with one queue.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_path_buf(),
            queues: 1,
            bootindex: None,
            properties: Vec::new(),
        }
    }

    /// Number of virtqueues (QEMU refuses more than the backend offers).
    pub fn queues(mut self, queues: u16) -> Self {
        self.queues = queues;
        self
    }

    /// The firmware's boot order for this disk (`bootindex=N`; 0 boots first).
    pub fn bootindex(mut self, index: u32) -> Self {
        self.bootindex = Some(index);
        self
    }

    /// An extra device property, e.g. `disable-legacy=on` (a modern-only device) or
    /// `disable-modern=on` (a legacy-only one). QEMU's default is a transitional device.
    pub fn property(mut self, property: &str) -> Self {
        self.properties.push(property.to_owned());
        self
    }

    fn device_arg(&self, chardev: &str) -> String {
        let mut arg = format!(
            "vhost-user-blk-pci,chardev={chardev},num-queues={}",
            self.queues
        );
        if let Some(index) = self.bootindex {
            arg.push_str(&format!(",bootindex={index}"));
        }
        for property in &self.properties {
            arg.push(',');
            arg.push_str(property);
        }
        arg
    }
}

/// What the guest boots: the kernel directly, or a firmware that boots from a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// QEMU loads the guest kernel and initramfs itself (`-kernel`, `-initrd`): the fastest
    /// boot, and the default.
    DirectKernel,
    /// SeaBIOS (Debian's `seabios`, QEMU's default BIOS), booting the disk with the lowest
    /// `bootindex`. Nothing from the guest assets is loaded.
    SeaBios,
    /// OVMF (Debian's `ovmf`), a UEFI firmware, with a fresh copy of its variable store.
    /// It boots `EFI/BOOT/BOOTX64.EFI` from the boot disk's EFI system partition, or falls
    /// back to its UEFI shell, which runs `startup.nsh` from the first file system.
    Ovmf,
}

/// SeaBIOS as Debian installs it.
pub const SEABIOS_BIN: &str = "/usr/share/seabios/bios.bin";
/// OVMF's code and the variable store template that goes with it (2 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// A Linux guest to run once: what it runs, which devices it has, how long it may take.
#[derive(Debug, Clone)]
pub struct Guest {
    name: String,
    script: String,
    files: Vec<(String, u32, Vec<u8>)>,
    devices: Vec<Device>,
    memory_mib: u32,
    cpus: u32,
    timeout: Duration,
    qemu_args: Vec<OsString>,
    kernel_args: Vec<String>,
    firmware: Firmware,
    stop_marker: Option<String>,
}

impl Guest {
    /// A guest for the test `name` (used for the log file name), with 512 MiB, 2 vCPUs, no
    /// devices and an empty script.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            script: String::new(),
            files: Vec::new(),
            devices: Vec::new(),
            memory_mib: 512,
            cpus: 2,
            timeout: DEFAULT_TIMEOUT,
            qemu_args: Vec::new(),
            kernel_args: Vec::new(),
            firmware: Firmware::DirectKernel,
            stop_marker: None,
        }
    }

    /// The shell script the guest runs as `/test.sh` (busybox `sh`).
    pub fn script(mut self, script: impl Into<String>) -> Self {
        self.script = script.into();
        self
    }

    /// Puts a data file at `guest_path` in the guest's root file system.
    pub fn file(mut self, guest_path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((guest_path.to_owned(), 0o644, data.into()));
        self
    }

    /// Puts an executable (a static program or a script) at `guest_path`.
    pub fn executable(mut self, guest_path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((guest_path.to_owned(), 0o755, data.into()));
        self
    }

    /// Adds a vhost-user-blk disk served on `socket` with `queues` virtqueues. Disks appear in
    /// the guest as /dev/vda, /dev/vdb, ... in the order they are added.
    pub fn blk_disk(self, socket: impl AsRef<Path>, queues: u16) -> Self {
        self.blk_device(BlkDisk::new(socket).queues(queues))
    }

    /// Adds a vhost-user-blk disk with the options `disk` sets (boot order, properties).
    pub fn blk_device(mut self, disk: BlkDisk) -> Self {
        self.devices.push(Device::Blk(disk));
        self
    }

    /// What boots the guest; [`Firmware::DirectKernel`] unless set.
    pub fn firmware(mut self, firmware: Firmware) -> Self {
        self.firmware = firmware;
        self
    }

    /// Ends the run as soon as the console shows a whole line containing `marker` (QEMU is
    /// killed then), for guests that cannot power off by themselves, such as a BIOS boot
    /// program. Such a run succeeds when the marker appeared; see
    /// [`GuestRun::ensure_success`].
    pub fn stop_when_console_contains(mut self, marker: &str) -> Self {
        self.stop_marker = Some(marker.to_owned());
        self
    }

    /// The initramfs this guest boots with: the base archive (busybox, modules, `/init`)
    /// followed by the test's own (`/test.sh` and the files added). A test that boots a
    /// kernel through firmware puts it on the boot disk.
    pub fn initramfs(&self) -> Result<Vec<u8>> {
        let assets = GuestAssets::locate()?;
        let base = base_initramfs(&assets)?;
        let mut extra = CpioArchive::new();
        extra.file("test.sh", 0o755, self.script.as_bytes())?;
        for (path, perm, data) in &self.files {
            extra.file(path, *perm, data)?;
        }
        let mut bytes = Vec::with_capacity(base.len());
        bytes.extend_from_slice(&base);
        bytes.extend_from_slice(&extra.finish()?);
        Ok(bytes)
    }

    /// The kernel command line a directly booted guest gets; a test that boots the kernel
    /// through firmware passes it on (e.g. in `startup.nsh`).
    pub fn kernel_command_line(&self) -> String {
        let mut append = String::from("console=ttyS0 panic=-1 quiet");
        for arg in &self.kernel_args {
            append.push(' ');
            append.push_str(arg);
        }
        append
    }

    /// Adds a vhost-user-fs share served on `socket`; the guest mounts it with
    /// `mount -t virtiofs TAG /mnt`.
    pub fn fs_share(mut self, socket: impl AsRef<Path>, tag: &str) -> Self {
        self.devices.push(Device::Fs {
            socket: socket.as_ref().to_path_buf(),
            tag: tag.to_owned(),
        });
        self
    }

    /// Guest RAM in MiB (shared memory, so a vhost-user backend can map it).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Hard limit on the whole QEMU run; QEMU is killed when it passes.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// An extra QEMU argument, passed after the ones this harness builds.
    pub fn qemu_arg(mut self, arg: impl Into<OsString>) -> Self {
        self.qemu_args.push(arg.into());
        self
    }

    /// An extra kernel command-line argument.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.to_owned());
        self
    }

    /// The QEMU command line: the kernel from `assets` and the initramfs at `initrd` for a
    /// direct boot, otherwise the firmware (with OVMF's variable store copied into `workdir`).
    fn command(
        &self,
        qemu: &Path,
        assets: Option<&GuestAssets>,
        initrd: &Path,
        workdir: &Path,
    ) -> Result<Command> {
        let mut cmd = Command::new(qemu);
        let mem = format!("{}M", self.memory_mib);
        cmd.args(["-accel", "tcg", "-m", &mem, "-smp", &self.cpus.to_string()])
            .args(["-nographic", "-no-reboot"])
            // No default NIC: its option ROM only slows the boot, and no test uses a network.
            .args(["-nic", "none"]);
        match self.firmware {
            Firmware::DirectKernel => {
                let assets = assets.ok_or_else(|| anyhow!("a direct boot needs the kernel"))?;
                cmd.arg("-kernel")
                    .arg(&assets.kernel)
                    .arg("-initrd")
                    .arg(initrd)
                    .args(["-append", &self.kernel_command_line()]);
            }
            Firmware::SeaBios => {
                let bios = require_file(Path::new(SEABIOS_BIN), "SeaBIOS")?;
                cmd.arg("-bios").arg(bios);
            }
            Firmware::Ovmf => {
                let code = require_file(Path::new(OVMF_CODE), "OVMF")?;
                let template = require_file(Path::new(OVMF_VARS), "OVMF's variable store")?;
                let vars = workdir.join("OVMF_VARS.fd");
                fs::copy(&template, &vars)
                    .with_context(|| format!("copying {}", template.display()))?;
                let mut code_arg = OsString::from("if=pflash,format=raw,unit=0,readonly=on,file=");
                code_arg.push(qemu_escape(&code));
                let mut vars_arg = OsString::from("if=pflash,format=raw,unit=1,file=");
                vars_arg.push(qemu_escape(&vars));
                cmd.arg("-drive").arg(code_arg).arg("-drive").arg(vars_arg);
            }
        }
        cmd.arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"]);
        for (i, device) in self.devices.iter().enumerate() {
            let mut chardev = OsString::from(format!("socket,id=c{i},path="));
            match device {
                Device::Blk(disk) => {
                    chardev.push(qemu_escape(&disk.socket));
                    cmd.arg("-chardev").arg(chardev);
                    cmd.arg("-device").arg(disk.device_arg(&format!("c{i}")));
                }
                Device::Fs { socket, tag } => {
                    chardev.push(qemu_escape(socket));
                    cmd.arg("-chardev").arg(chardev);
                    let tag = tag.replace(',', ",,");
                    cmd.arg("-device")
                        .arg(format!("vhost-user-fs-pci,chardev=c{i},tag={tag}"));
                }
            }
        }
        cmd.args(&self.qemu_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }

    /// Boots the guest, waits for it to power off (or kills it at the timeout) and returns
    /// what it printed. An `Err` means the run could not be set up or QEMU could not be
    /// started; a guest that failed is an `Ok` whose [`GuestRun::ensure_success`] says why.
    pub fn run(self) -> Result<GuestRun> {
        let qemu = require_tool("qemu-system-x86_64")?;
        let workdir = tempfile::Builder::new()
            .prefix("strata-guest-")
            .tempdir()
            .context("creating the guest's temp dir")?;
        let initrd = workdir.path().join("initrd.cpio");
        // A firmware boot loads nothing from the host; the kernel, if any, is on its disk.
        let assets = if self.firmware == Firmware::DirectKernel {
            let mut file = fs::File::create(&initrd)?;
            file.write_all(&self.initramfs()?)?;
            file.sync_all()?;
            Some(GuestAssets::locate()?)
        } else {
            None
        };

        let log_dir = target_dir().join("guest-logs");
        fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let log_path = log_dir.join(format!("{}.log", sanitize(&self.name)));
        let mut log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;

        let mut cmd = self.command(&qemu, assets.as_ref(), &initrd, workdir.path())?;
        writeln!(log, "# {cmd:?}")?;
        writeln!(log, "# timeout {:?}", self.timeout)?;
        log.flush()?;

        let start = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", qemu.display()))?;
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().expect("stdout is piped");
        let stderr = child.0.stderr.take().expect("stderr is piped");
        // The console is copied to the log as it arrives, so a run that hangs or crashes the
        // test process still leaves what the guest printed.
        let console_log = log.try_clone()?;
        let seen = Arc::new(AtomicBool::new(false));
        let marker = self.stop_marker.clone().map(|m| (m, seen.clone()));
        let console_reader = thread::spawn(move || drain(stdout, Some(console_log), marker));
        let stderr_reader = thread::spawn(move || drain(stderr, None, None));

        let deadline = start + self.timeout;
        let mut timed_out = false;
        let mut stopped_at_marker = false;
        let status = loop {
            if let Some(status) = child.0.try_wait()? {
                break status;
            }
            if seen.load(Ordering::Acquire) {
                stopped_at_marker = true;
                let _ = child.0.kill();
                break child.0.wait()?;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                // Killing an already-exited child fails harmlessly; wait reaps it either way.
                let _ = child.0.kill();
                break child.0.wait()?;
            }
            thread::sleep(Duration::from_millis(20));
        };
        let elapsed = start.elapsed();
        let console = console_reader
            .join()
            .map_err(|_| anyhow!("console reader panicked"))?;
        let stderr = stderr_reader
            .join()
            .map_err(|_| anyhow!("stderr reader panicked"))?;

        writeln!(log, "\n# qemu stderr:\n{stderr}")?;
        writeln!(
            log,
            "# qemu {status}, timed out: {timed_out}, stopped at the marker: \
             {stopped_at_marker}, elapsed {elapsed:.1?}"
        )?;
        Ok(GuestRun {
            console,
            stderr,
            status,
            timed_out,
            stopped_at_marker,
            elapsed,
            timeout: self.timeout,
            log_path,
        })
    }
}

/// Kills QEMU if the harness bails out (or panics) before QEMU exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Reads `pipe` to its end, mirroring it into `log`, and returns it as (lossy) text. With a
/// `marker`, sets its flag once the text so far holds a whole line containing it: a marker
/// such as `RESULT done=` is followed by the value the test reads, which may arrive in a
/// later read (a run stopped at the bare marker lost it under load).
fn drain(
    mut pipe: impl Read,
    mut log: Option<fs::File>,
    marker: Option<(String, Arc<AtomicBool>)>,
) -> String {
    let mut all = Vec::new();
    let mut chunk = [0u8; 8192];
    // Where the marker was found, while its line is not complete yet.
    let mut found: Option<usize> = None;
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                all.extend_from_slice(&chunk[..n]);
                if let Some((text, seen)) = &marker {
                    if found.is_none() {
                        // Only the new bytes and a marker's length before them can hold a
                        // new match.
                        let from = all.len().saturating_sub(n + text.len());
                        found = all[from..]
                            .windows(text.len().max(1))
                            .position(|w| w == text.as_bytes())
                            .map(|p| from + p);
                    }
                    if let Some(at) = found {
                        if all[at + text.len()..].contains(&b'\n') {
                            seen.store(true, Ordering::Release);
                        }
                    }
                }
                if let Some(file) = log.as_mut() {
                    // A log write failure must not stop us from draining QEMU's pipe.
                    let _ = file.write_all(&chunk[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    // The serial console turns "\n" into "\r\n".
    String::from_utf8_lossy(&all).replace("\r\n", "\n")
}

/// QEMU option values escape ',' by doubling it.
fn qemu_escape(path: &Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in path.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// What one guest run printed and how it ended.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// Everything the guest wrote to its serial console ("\r\n" folded to "\n").
    pub console: String,
    /// QEMU's own error output.
    pub stderr: String,
    /// QEMU's exit status.
    pub status: ExitStatus,
    /// Whether QEMU was killed at the timeout.
    pub timed_out: bool,
    /// Whether the harness stopped QEMU because the console showed the marker given to
    /// [`Guest::stop_when_console_contains`].
    pub stopped_at_marker: bool,
    /// Wall time from starting QEMU to its exit.
    pub elapsed: Duration,
    timeout: Duration,
    /// The log file holding the command line, console and QEMU's stderr.
    pub log_path: PathBuf,
}

impl GuestRun {
    /// `/test.sh`'s exit status, or `None` if the guest never finished it.
    pub fn script_status(&self) -> Option<i32> {
        self.console
            .lines()
            .filter_map(|line| line.trim().strip_prefix(EXIT_MARKER))
            .next_back()
            .and_then(|code| code.trim().parse().ok())
    }

    /// Problems `/init` reported before running the script (a module that failed to load).
    pub fn init_errors(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|line| line.trim().strip_prefix(INIT_ERROR_MARKER))
            .collect()
    }

    /// Every `key=value` pair from `RESULT` lines, in the order printed.
    pub fn results(&self) -> Vec<(&str, &str)> {
        self.console
            .lines()
            .filter_map(|line| line.trim().strip_prefix(RESULT_PREFIX))
            .flat_map(str::split_whitespace)
            .filter_map(|pair| pair.split_once('='))
            .collect()
    }

    /// The last value reported for `key`.
    pub fn value(&self, key: &str) -> Option<&str> {
        self.results()
            .into_iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// Like [`value`](Self::value), but a missing key is an error that shows the console.
    pub fn require(&self, key: &str) -> Result<&str> {
        self.value(key)
            .ok_or_else(|| anyhow!("the guest reported no RESULT {key}=...\n{}", self.context()))
    }

    /// Checks the run ended the way a passing test does: QEMU exited by itself and cleanly,
    /// `/init` set the guest up, and `/test.sh` exited 0; or, for a run with a stop marker,
    /// the console showed the marker (QEMU is then stopped by the harness).
    pub fn ensure_success(&self) -> Result<()> {
        if self.stopped_at_marker {
            return Ok(());
        }
        let problem = if self.timed_out {
            format!("QEMU was killed after the {:?} timeout", self.timeout)
        } else if !self.status.success() {
            format!("QEMU failed: {}", self.status)
        } else if let Some(error) = self.init_errors().first() {
            format!("guest init failed: {error}")
        } else {
            match self.script_status() {
                Some(0) => return Ok(()),
                Some(code) => format!("/test.sh exited with status {code}"),
                None => "the guest stopped before /test.sh finished (kernel panic?)".to_owned(),
            }
        };
        bail!("{problem}\n{}", self.context())
    }

    /// The end of the console and QEMU's stderr, for error messages.
    pub fn context(&self) -> String {
        const TAIL: usize = 60;
        let lines: Vec<&str> = self.console.lines().collect();
        let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n");
        format!(
            "--- last {} console lines (full log: {}) ---\n{tail}\n--- qemu stderr ---\n{}",
            TAIL.min(lines.len()),
            self.log_path.display(),
            self.stderr.trim_end()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with_console(console: &str) -> GuestRun {
        use std::os::unix::process::ExitStatusExt;
        GuestRun {
            console: console.to_owned(),
            stderr: String::new(),
            status: ExitStatus::from_raw(0),
            timed_out: false,
            stopped_at_marker: false,
            elapsed: Duration::ZERO,
            timeout: DEFAULT_TIMEOUT,
            log_path: PathBuf::from("/dev/null"),
        }
    }

    #[test]
    fn parses_results_and_exit_status() {
        let run = run_with_console(
            "[    1.0] noise\nRESULT a=1 b=two\nRESULT a=3\nnot RESULT c=4\nSTRATA-GUEST-EXIT 0\n",
        );
        assert_eq!(run.value("a"), Some("3"));
        assert_eq!(run.value("b"), Some("two"));
        assert_eq!(run.value("c"), None);
        assert_eq!(run.script_status(), Some(0));
        run.ensure_success().unwrap();
        assert!(run
            .require("zzz")
            .unwrap_err()
            .to_string()
            .contains("RESULT zzz"));
    }

    #[test]
    fn a_failing_or_unfinished_script_is_an_error() {
        let failed = run_with_console("STRATA-GUEST-EXIT 3\n");
        let err = failed.ensure_success().unwrap_err().to_string();
        assert!(err.contains("status 3"), "{err}");

        let panicked = run_with_console("Kernel panic - not syncing\n");
        let err = panicked.ensure_success().unwrap_err().to_string();
        assert!(err.contains("before /test.sh finished"), "{err}");
        assert!(err.contains("Kernel panic"), "{err}");

        let no_module =
            run_with_console("STRATA-GUEST-ERROR insmod virtio failed\nSTRATA-GUEST-EXIT 0\n");
        let err = no_module.ensure_success().unwrap_err().to_string();
        assert!(err.contains("insmod virtio failed"), "{err}");
    }

    /// GNU cpio, an independent reader of the format, lists what we wrote.
    #[test]
    fn cpio_archive_reads_back_with_gnu_cpio() {
        let mut archive = CpioArchive::new();
        archive.file("/a/b/hello.txt", 0o644, b"hello").unwrap();
        archive.symlink("a/link", "b/hello.txt").unwrap();
        archive.char_dev("dev/console", 0o600, 5, 1).unwrap();
        archive.file("odd", 0o755, &[7u8; 13]).unwrap();
        let bytes = archive.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);

        let cpio = require_tool("cpio").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.cpio");
        fs::write(&path, &bytes).unwrap();
        let out = Command::new(cpio)
            .args(["-t", "-v", "--quiet", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listing = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = listing
            .lines()
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "a",
                "a/b",
                "a/b/hello.txt",
                "b/hello.txt",
                "dev",
                "dev/console",
                "odd"
            ],
            "{listing}"
        );
        assert!(listing.contains("a/link -> b/hello.txt"), "{listing}");
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("crw-------") && l.contains("5,")),
            "{listing}"
        );
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.contains(" 13 ")),
            "{listing}"
        );
    }

    /// A reader that hands out its bytes a few at a time, as a pipe may.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.1.min(self.0.len()).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn stop_marker_is_seen_across_reads() {
        let console = b"SeaBIOS\r\nRESULT a=1\r\nRESULT done=yes\r\n";
        for step in [1, 3, 7, console.len()] {
            let seen = Arc::new(AtomicBool::new(false));
            let marker = Some(("RESULT done=".to_owned(), seen.clone()));
            let text = drain(Trickle(console, step), None, marker);
            assert!(seen.load(Ordering::Acquire), "chunks of {step}");
            assert!(text.ends_with("done=yes\n"), "{text:?}");
        }
        for partial in [&b"RESULT done"[..], b"RESULT done=", b"RESULT done=yes"] {
            let seen = Arc::new(AtomicBool::new(false));
            drain(
                Trickle(partial, 2),
                None,
                Some(("RESULT done=".to_owned(), seen.clone())),
            );
            assert!(
                !seen.load(Ordering::Acquire),
                "{partial:?}: the line is not complete"
            );
        }
    }

    #[test]
    fn firmware_runs_get_their_firmware_and_boot_order() {
        let dir = tempfile::tempdir().unwrap();
        let guest = Guest::new("cmdline")
            .firmware(Firmware::SeaBios)
            .blk_device(
                BlkDisk::new("/tmp/a,b.sock")
                    .queues(2)
                    .bootindex(0)
                    .property("disable-legacy=on"),
            );
        let cmd = guest
            .command(Path::new("qemu"), None, Path::new("/none"), dir.path())
            .unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.windows(2).any(|w| w == ["-bios", SEABIOS_BIN]),
            "{args:?}"
        );
        assert!(!args.iter().any(|a| a == "-kernel"), "{args:?}");
        assert!(
            args.contains(&"socket,id=c0,path=/tmp/a,,b.sock".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(
                &"vhost-user-blk-pci,chardev=c0,num-queues=2,bootindex=0,disable-legacy=on"
                    .to_owned()
            ),
            "{args:?}"
        );
    }

    #[test]
    fn rejects_paths_that_escape_the_root() {
        let mut archive = CpioArchive::new();
        assert!(archive.file("../etc/passwd", 0o644, b"").is_err());
        assert!(archive.file("/", 0o644, b"").is_err());
    }

    #[test]
    fn detects_dynamic_and_static_programs() {
        let sh = fs::read(require_tool("qemu-system-x86_64").unwrap()).unwrap();
        assert!(elf_has_interpreter(&sh).unwrap());
        let busybox = fs::read(require_tool("busybox").unwrap()).unwrap();
        assert!(!elf_has_interpreter(&busybox).unwrap());
    }
}
