//! What a disk added through the API may touch. Whoever adds a disk has the daemon write
//! the files it names (a cache file is created, grown and formatted) and hands the disk to
//! whoever connects to its socket, with the daemon's rights: so an operator's disk may
//! name only regular files under the config's `operator-image-dirs`, reached without a
//! symlink, and put its socket under `operator-socket-dirs`; block devices, RBD images,
//! named throttle groups (another tenant's budget), `cache-format=force` and
//! `locking=off` (another tenant's served image) are an admin's. Paths in disks added
//! through the API are absolute for everyone: the daemon's working directory is not the
//! caller's.
//!
//! Checking a path and then opening it by name leaves a window in which an operator who
//! can write the directory swaps the file for a symlink (to `/dev/sda`, or a dangling one
//! where a cache file will be created). So the check opens the files itself, beneath the
//! allowed directory and refusing symlinks at every step (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), creates a missing cache file there
//! (`O_EXCL`), and gives the daemon `/proc/self/fd/N` for each: the kernel resolves those
//! to the very files checked, whatever happens to the names.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use storage_core::disk::{DiskSpec, NodeSpec, ThrottleSpec};

/// The directories an operator's disks may use (canonical paths).
#[derive(Debug, Clone, Default)]
pub struct OperatorPaths {
    pub image_dirs: Vec<PathBuf>,
    pub socket_dirs: Vec<PathBuf>,
}

/// A disk the caller may add: its spec as the daemon must open it, and the descriptors
/// its `/proc/self/fd` paths name (keep them until the disk has opened).
pub struct Admitted {
    pub spec: DiskSpec,
    pub held: Vec<OwnedFd>,
    /// Each `/proc/self/fd` path given and the name the caller gave for it.
    names: Vec<(String, String)>,
}

impl Admitted {
    /// `text` (an error from opening the disk) with the caller's names for its files in
    /// place of the `/proc/self/fd` paths the daemon opened them by.
    pub fn with_caller_names(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(at) = rest.find("/proc/self/fd/") {
            let digits = rest[at + "/proc/self/fd/".len()..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            let end = at + "/proc/self/fd/".len() + digits;
            out.push_str(&rest[..at]);
            // A whole number only: /proc/self/fd/1 is not /proc/self/fd/12, nor the start
            // of /proc/self/fd/12-base.qcow2 (a backing file named relative to it).
            let after = &rest[end..];
            let whole = match after.chars().next() {
                None => true,
                Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => false,
                // The end of a sentence, or a file name going on.
                Some('.') => after[1..].chars().next().is_none_or(char::is_whitespace),
                Some(_) => true,
            };
            match self.names.iter().find(|(by_fd, _)| *by_fd == rest[at..end]) {
                Some((_, name)) if whole => out.push_str(name),
                _ => out.push_str(&rest[at..end]),
            }
            rest = &rest[end..];
        }
        out.push_str(rest);
        out
    }
}

/// Refuses what the caller may not add (`Err` names the path and the rule); for an
/// operator, opens the disk's files as described in the module doc.
pub fn check(
    spec: &DiskSpec,
    socket: &Path,
    allowed: &OperatorPaths,
    admin: bool,
) -> Result<Admitted, String> {
    let files = spec.root.files();
    let mut admin_only_parts = Vec::new();
    admin_only(&spec.root, &mut admin_only_parts);
    for p in files.iter().map(|(p, _)| p).chain([&socket.to_path_buf()]) {
        if !p.is_absolute() {
            return Err(format!(
                "{}: paths of disks added through the API must be absolute",
                p.display()
            ));
        }
    }
    if admin {
        return Ok(Admitted {
            spec: spec.clone(),
            held: Vec::new(),
            names: Vec::new(),
        });
    }
    if let Some(what) = admin_only_parts.first() {
        return Err(format!("{what} needs the admin role"));
    }
    let (socket_dir, _) = beneath(socket, &allowed.socket_dirs).ok_or_else(|| {
        format!(
            "{}: an operator's disk socket must be under operator-socket-dirs ({})",
            socket.display(),
            list(&allowed.socket_dirs)
        )
    })?;
    // The socket's directory itself must be reached without a symlink.
    open_beneath(
        &socket_dir,
        socket.parent().unwrap_or(Path::new("/")),
        libc::O_PATH | libc::O_DIRECTORY,
        false,
    )
    .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut spec = spec.clone();
    let mut held = Vec::new();
    let mut names = Vec::new();
    let mut err = None;
    spec.root.files_mut(&mut |path, create| {
        if err.is_some() {
            return;
        }
        match open_checked(path, create, allowed) {
            Ok(fd) => {
                let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
                names.push((by_fd.clone(), path.display().to_string()));
                *path = PathBuf::from(by_fd);
                held.push(fd);
            }
            Err(e) => err = Some(e),
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(Admitted { spec, held, names }),
    }
}

/// Opens an operator's file beneath its allowed directory, with no symlink on the way;
/// a cache file that does not exist is created (`create`).
fn open_checked(path: &Path, create: bool, allowed: &OperatorPaths) -> Result<OwnedFd, String> {
    let (dir, _) = beneath(path, &allowed.image_dirs).ok_or_else(|| {
        format!(
            "{}: an operator's disk files must be under operator-image-dirs ({})",
            path.display(),
            list(&allowed.image_dirs)
        )
    })?;
    let fd = match open_beneath(&dir, path, libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK, false) {
        Ok(fd) => fd,
        Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
            open_beneath(&dir, path, libc::O_RDWR | libc::O_CLOEXEC | libc::O_CREAT | libc::O_EXCL, true)
                .map_err(|e| format!("{}: {e}", path.display()))?
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EXDEV) => {
            return Err(format!(
                "{}: an operator's disk files must be reached without symlinks, inside operator-image-dirs",
                path.display()
            ))
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "{}: an operator's disk may use regular files only",
            path.display()
        ));
    }
    Ok(file.into())
}

/// The allowed directory `path` lies in (lexically: no `..`), with the rest of the path.
fn beneath(path: &Path, dirs: &[PathBuf]) -> Option<(PathBuf, PathBuf)> {
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return None;
    }
    dirs.iter().find_map(|d| {
        let rest = path.strip_prefix(d).ok()?;
        Some((d.clone(), rest.to_owned()))
    })
}

/// openat2(dir, path relative to dir, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS).
fn open_beneath(dir: &Path, path: &Path, flags: i32, create: bool) -> std::io::Result<OwnedFd> {
    let dir_c = CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: `dir_c` is NUL-terminated; the result is checked.
    let dfd = unsafe {
        libc::open(
            dir_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let dfd = unsafe { OwnedFd::from_raw_fd(dfd) };
    let rest = path.strip_prefix(dir).unwrap_or(Path::new(""));
    let rest = if rest.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rest
    };
    let rest_c = CString::new(rest.as_os_str().as_bytes())?;
    // SAFETY: a zeroed open_how is valid (three integers).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if create { 0o600 } else { 0 };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: `dfd` is an open directory, `rest_c` NUL-terminated, `how` a valid open_how
    // of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dfd.as_raw_fd(),
            rest_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn list(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "none configured".into();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What in a graph is an admin's to ask for.
fn admin_only(node: &NodeSpec, out: &mut Vec<String>) {
    match node {
        // Another tenant's image, served, would be theirs too.
        NodeSpec::File { locking: false, .. } => out.push("locking=off".into()),
        NodeSpec::File { .. } | NodeSpec::Null { .. } => {}
        NodeSpec::Tier { capacity, tier, .. } => {
            if tier.force_format {
                out.push("cache-format=force".into());
            }
            if !tier.locking {
                out.push("locking=off (on the cache)".into());
            }
            admin_only(capacity, out);
        }
        NodeSpec::Rbd(r) => out.push(format!("the RBD image {}/{}", r.pool, r.image)),
        NodeSpec::Throttle { child, limits } => {
            if let ThrottleSpec::Group { name, .. } = limits {
                out.push(format!("joining the throttle group {name:?}"));
            }
            admin_only(child, out)
        }
        NodeSpec::Qcow2 {
            file, backing, key, ..
        } => {
            // The image names its backing file, anywhere on the host: an operator's image
            // could name a file the operator may not read.
            if *backing == storage_core::qcow2::Backing::FromImage {
                out.push("a qcow2 image's own backing file (give backing=null)".into());
            }
            if let Some(k) = key {
                out.push(key_source(k));
            }
            admin_only(file, out)
        }
        NodeSpec::Luks { file, key } => {
            out.push(key_source(key));
            admin_only(file, out)
        }
    }
}

/// What naming a key takes an admin for: a key file is read as a passphrase wherever it
/// is; a passphrase given through the API is key material.
fn key_source(key: &storage_core::disk::KeySource) -> String {
    match key {
        storage_core::disk::KeySource::File(p) => format!("the key file {}", p.display()),
        storage_core::disk::KeySource::Given(_) => "a passphrase given through the API".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> DiskSpec {
        text.parse().unwrap()
    }

    #[test]
    fn errors_name_the_callers_files_not_the_descriptors() {
        let admitted = Admitted {
            spec: spec("path=null,size=1M"),
            held: Vec::new(),
            names: vec![
                ("/proc/self/fd/1".into(), "/img/a.img".into()),
                ("/proc/self/fd/12".into(), "/img/cache.img".into()),
            ],
        };
        assert_eq!(
            admitted.with_caller_names("/proc/self/fd/12: in use; /proc/self/fd/1: fine"),
            "/img/cache.img: in use; /img/a.img: fine"
        );
        // Only whole descriptor paths: a backing file named relative to one stays.
        assert_eq!(
            admitted.with_caller_names(
                "/proc/self/fd/1-base.qcow2, /proc/self/fd/120 and /proc/self/fd/1.raw: \
                 see /proc/self/fd/1. Then /proc/self/fd/1"
            ),
            "/proc/self/fd/1-base.qcow2, /proc/self/fd/120 and /proc/self/fd/1.raw: see \
             /img/a.img. Then /img/a.img"
        );
    }

    #[test]
    fn operators_stay_inside_their_directories_and_admins_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let images = root.join("images");
        let sockets = root.join("sockets");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&sockets).unwrap();
        std::fs::write(images.join("a.img"), [0u8; 4096]).unwrap();
        std::fs::write(root.join("outside.img"), [0u8; 4096]).unwrap();
        std::os::unix::fs::symlink(root.join("outside.img"), images.join("escape.img")).unwrap();
        // Dangling: where a cache file would be created through it.
        std::os::unix::fs::symlink(root.join("planted"), images.join("dangling.img")).unwrap();
        std::os::unix::fs::symlink(&root, images.join("up")).unwrap();
        let fifo = CString::new(images.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let allowed = OperatorPaths {
            image_dirs: vec![images.clone()],
            socket_dirs: vec![sockets.clone()],
        };
        let sock = sockets.join("a.sock");
        let ok =
            |s: &str, sock: &Path, admin| check(&spec(s), sock, &allowed, admin).map(|a| a.spec);
        let img = images.join("a.img");
        // Admitted, with the files opened: the daemon gets /proc/self/fd paths.
        let admitted = check(
            &spec(&format!("path={}", img.display())),
            &sock,
            &allowed,
            false,
        )
        .unwrap();
        assert_eq!(admitted.held.len(), 1);
        let NodeSpec::File { path, .. } = &admitted.spec.root else {
            panic!()
        };
        assert!(path.starts_with("/proc/self/fd/"), "{}", path.display());
        let tiered = format!(
            "path={},cache={},cache-size=1M",
            img.display(),
            images.join("new-cache.img").display()
        );
        assert!(ok(&tiered, &sock, false).is_ok());
        // The new cache file was created there (empty; the tier formats it).
        assert_eq!(
            std::fs::metadata(images.join("new-cache.img"))
                .unwrap()
                .len(),
            0
        );
        for (s, sock, needle) in [
            (
                "path=/etc/passwd".to_string(),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!("path={}", images.join("escape.img").display()),
                sock.clone(),
                "without symlinks",
            ),
            (
                format!("path={}", images.join("up/outside.img").display()),
                sock.clone(),
                "without symlinks",
            ),
            (
                format!("path={}", images.join("../outside.img").display()),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!(
                    "path={},cache={},cache-size=1M",
                    img.display(),
                    images.join("dangling.img").display()
                ),
                sock.clone(),
                "without symlinks",
            ),
            (
                format!("path={}", images.join("fifo").display()),
                sock.clone(),
                "regular files only",
            ),
            (
                format!("path={},cache=/etc/shadow,cache-size=1M", img.display()),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!("{tiered},cache-format=force"),
                sock.clone(),
                "admin",
            ),
            (
                format!("path={},throttle-group=tenant-b", img.display()),
                sock.clone(),
                "throttle group",
            ),
            (
                format!("path={},locking=off", img.display()),
                sock.clone(),
                "admin",
            ),
            (
                "driver=rbd,pool=p,image=i".to_string(),
                sock.clone(),
                "admin",
            ),
            (
                format!("path={}", img.display()),
                root.join("x.sock"),
                "operator-socket-dirs",
            ),
            (
                "path=null,size=1M".to_string(),
                PathBuf::from("rel.sock"),
                "absolute",
            ),
            ("path=rel.img".to_string(), sock.clone(), "absolute"),
        ] {
            let Ok(parsed) = s.parse::<DiskSpec>() else {
                // `driver=` is the --blockdev syntax: build that one as a graph.
                let mut g = storage_core::disk::graph::GraphSpec::default();
                g.add_blockdev(&format!("{s},node-name=r")).unwrap();
                let d = g.resolve("node=r").unwrap();
                let e = check(&d, &sock, &allowed, false).err().unwrap();
                assert!(e.contains(needle), "{s}: {e}");
                continue;
            };
            let e = check(&parsed, &sock, &allowed, false)
                .err()
                .unwrap_or_else(|| panic!("{s}: admitted"));
            assert!(e.contains(needle), "{s}: {e}");
        }
        assert!(
            !root.join("planted").exists(),
            "a file was created through the dangling link"
        );
        assert!(ok("path=/etc/passwd", &root.join("x.sock"), true).is_ok());
        assert!(ok("path=rel.img", &sock, true)
            .unwrap_err()
            .contains("absolute"));
    }
}
