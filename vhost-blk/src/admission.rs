//! What a disk added through the API may touch. Whoever adds a disk has the daemon write
//! the files it names (a cache file is created, grown and formatted) and hands the disk to
//! whoever connects to its socket, with the daemon's rights: so an operator's disk may
//! name only regular files under the config's `operator-image-dirs` and put its socket
//! under `operator-socket-dirs`; block devices, RBD images and `cache-format=force` are an
//! admin's. Paths in disks added through the API are absolute for everyone: the daemon's
//! working directory is not the caller's.

use std::path::{Path, PathBuf};

use storage_core::disk::{DiskSpec, NodeSpec};

/// The directories an operator's disks may use (canonical paths).
#[derive(Debug, Clone, Default)]
pub struct OperatorPaths {
    pub image_dirs: Vec<PathBuf>,
    pub socket_dirs: Vec<PathBuf>,
}

/// Refuses what the caller may not add: `Err` names the path and the rule.
pub fn check(
    spec: &DiskSpec,
    socket: &Path,
    allowed: &OperatorPaths,
    admin: bool,
) -> Result<(), String> {
    let mut files = Vec::new();
    let mut admin_only = Vec::new();
    walk(&spec.root, &mut files, &mut admin_only);
    for p in files.iter().chain([&socket.to_path_buf()]) {
        if !p.is_absolute() {
            return Err(format!(
                "{}: paths of disks added through the API must be absolute",
                p.display()
            ));
        }
    }
    if admin {
        return Ok(());
    }
    if let Some(what) = admin_only.first() {
        return Err(format!("{what} needs the admin role"));
    }
    for p in &files {
        let (canonical, exists) = canonical(p)?;
        if exists && !std::fs::metadata(&canonical).is_ok_and(|m| m.is_file()) {
            return Err(format!(
                "{}: an operator's disk may use regular files only",
                p.display()
            ));
        }
        if !allowed.image_dirs.iter().any(|d| canonical.starts_with(d)) {
            return Err(format!(
                "{}: an operator's disk files must be under operator-image-dirs ({})",
                p.display(),
                list(&allowed.image_dirs)
            ));
        }
    }
    let (canonical, _) = canonical(socket)?;
    if !allowed.socket_dirs.iter().any(|d| canonical.starts_with(d)) {
        return Err(format!(
            "{}: an operator's disk socket must be under operator-socket-dirs ({})",
            socket.display(),
            list(&allowed.socket_dirs)
        ));
    }
    Ok(())
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

/// The path with every symlink resolved; for a file still to be created, its directory's.
fn canonical(p: &Path) -> Result<(PathBuf, bool), String> {
    match std::fs::canonicalize(p) {
        Ok(c) => Ok((c, true)),
        Err(_) => {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return Err(format!("{}: not a file path", p.display()));
            };
            let dir = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok((dir.join(name), false))
        }
    }
}

fn walk(node: &NodeSpec, files: &mut Vec<PathBuf>, admin_only: &mut Vec<String>) {
    match node {
        NodeSpec::File { path, .. } => files.push(path.clone()),
        NodeSpec::Null { .. } => {}
        NodeSpec::Tier { capacity, tier, .. } => {
            files.push(tier.cache.clone());
            if tier.force_format {
                admin_only.push("cache-format=force".into());
            }
            walk(capacity, files, admin_only);
        }
        NodeSpec::Rbd(r) => admin_only.push(format!("the RBD image {}/{}", r.pool, r.image)),
        NodeSpec::Throttle { child, .. } => walk(child, files, admin_only),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> DiskSpec {
        text.parse().unwrap()
    }

    #[test]
    fn operators_stay_inside_their_directories_and_admins_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("images");
        let sockets = dir.path().join("sockets");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::create_dir_all(&sockets).unwrap();
        std::fs::write(images.join("a.img"), [0u8; 4096]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", images.join("escape.img")).unwrap();
        let allowed = OperatorPaths {
            image_dirs: vec![images.canonicalize().unwrap()],
            socket_dirs: vec![sockets.canonicalize().unwrap()],
        };
        let sock = sockets.join("a.sock");
        let ok = |s: &str, sock: &Path, admin| check(&spec(s), sock, &allowed, admin);
        let img = images.join("a.img");
        assert_eq!(ok(&format!("path={}", img.display()), &sock, false), Ok(()));
        let tiered = format!(
            "path={},cache={},cache-size=1M",
            img.display(),
            images.join("new-cache.img").display()
        );
        assert_eq!(ok(&tiered, &sock, false), Ok(()));
        for (s, sock, needle) in [
            (
                "path=/etc/passwd".to_string(),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!("path={}", images.join("escape.img").display()),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!("path={}", images.join("../images/../x.img").display()),
                sock.clone(),
                "operator-image-dirs",
            ),
            (
                format!("path={},cache=/etc/shadow,cache-size=1M", img.display()),
                sock.clone(),
                "/etc/shadow",
            ),
            (
                format!("{tiered},cache-format=force"),
                sock.clone(),
                "admin",
            ),
            (
                format!("path={}", img.display()),
                dir.path().join("x.sock"),
                "operator-socket-dirs",
            ),
            (
                "path=null,size=1M".to_string(),
                PathBuf::from("rel.sock"),
                "absolute",
            ),
            ("path=rel.img".to_string(), sock.clone(), "absolute"),
        ] {
            let e = ok(&s, &sock, false).unwrap_err();
            assert!(e.contains(needle), "{s}: {e}");
        }
        assert_eq!(
            ok("path=/etc/passwd", &dir.path().join("x.sock"), true),
            Ok(())
        );
        assert!(ok("path=rel.img", &sock, true)
            .unwrap_err()
            .contains("absolute"));
    }
}
