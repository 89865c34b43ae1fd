//! Detecting subPath mounts: kubelet bind-mounts a subPath once and never
//! updates it (kubernetes #50345), so a source read through one never sees
//! a rotation. Found in `/proc/self/mountinfo` at start, and warned about.
//! Also whether a directory is a mount point, which an output directory
//! that cannot be renamed must know. Reads the mount table; never mounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The mounts that could be a subPath: mount point -> the root of the
/// filesystem it shows (only mounts of a part of a filesystem).
struct Mounts(HashMap<String, String>);

impl Mounts {
    /// Parses `/proc/self/mountinfo` once: a thousand sources are then
    /// one lookup each.
    fn parse(mountinfo: &str) -> Self {
        let mut points = HashMap::new();
        for line in mountinfo.lines() {
            // id parent major:minor root mount-point options ... - fstype source super
            let mut fields = line.split(' ').skip(3);
            let (Some(root), Some(point)) = (fields.next(), fields.next()) else {
                continue;
            };
            if root != "/" {
                points.insert(unescape(point), unescape(root));
            }
        }
        Self(points)
    }

    /// The root of a subPath-style mount whose mount point is exactly
    /// `path`: one that comes from a single file or from kubelet's
    /// `volume-subpaths`.
    fn subpath(&self, path: &Path) -> Option<String> {
        let root = self.0.get(path.to_str()?)?;
        let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        (is_file || root.contains("/volume-subpaths/")).then(|| root.clone())
    }
}

/// A mount whose mount point is exactly `path` and that comes from a
/// single file or from kubelet's `volume-subpaths`: the mount's root.
pub fn subpath_mount(mountinfo: &str, path: &Path) -> Option<String> {
    Mounts::parse(mountinfo).subpath(path)
}

/// Whether the directory `path` is a mount point: on another device than its
/// parent, or (a bind mount from the same filesystem) listed in
/// `/proc/self/mountinfo`.
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(parent)) = (
        std::fs::symlink_metadata(path),
        std::fs::metadata(path.join("..")),
    ) else {
        return false;
    };
    if meta.dev() != parent.dev() || meta.ino() == parent.ino() {
        return true;
    }
    let (Ok(real), Ok(mountinfo)) = (
        std::fs::canonicalize(path),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return false;
    };
    let Some(real) = real.to_str() else {
        return false;
    };
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|point| unescape(point) == real)
}

/// Filesystem types whose calls can hang for good: a network server or a
/// FUSE daemon that stops answering.
fn may_hang(fstype: &str) -> bool {
    matches!(
        fstype,
        "nfs"
            | "nfs4"
            | "cifs"
            | "smb3"
            | "smbfs"
            | "9p"
            | "ceph"
            | "glusterfs"
            | "afs"
            | "lustre"
            | "gpfs"
            | "beegfs"
            | "fuse"
            | "fuseblk"
            | "virtiofs"
    ) || fstype.starts_with("fuse.")
}

/// The mount points (from a `/proc/self/mountinfo` text) of filesystems
/// whose calls can hang (NFS, SMB, FUSE...): a path under one may block
/// whoever looks it up.
pub fn hanging_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (head, tail) = line.split_once(" - ")?;
            let point = head.split(' ').nth(4)?;
            let fstype = tail.split(' ').next()?;
            may_hang(fstype).then(|| PathBuf::from(unescape(point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The paths among `paths` that are subPath-style bind mounts, with a
/// warning for each; reads this process's mount table once.
pub fn warn_subpaths(paths: &[PathBuf]) -> Vec<PathBuf> {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mounts = Mounts::parse(&mountinfo);
    if mounts.0.is_empty() {
        return Vec::new();
    }
    let mut canonical = Canonical::default();
    let mut found = Vec::new();
    for path in paths {
        let real = canonical.of(path);
        if let Some(root) = mounts.subpath(&real) {
            tracing::warn!(
                path = %path.display(), mount_root = %root,
                "this source is a subPath-style bind mount: kubelet never updates it, so rotations \
                 will not be seen; mount the whole volume and point the source at its directory"
            );
            found.push(path.clone());
        }
    }
    found
}

/// `realpath`, memoised by directory: sources that share a parent cost one
/// `lstat` each, not a `readlink` per component each.
#[derive(Default)]
struct Canonical(HashMap<PathBuf, PathBuf>);

impl Canonical {
    fn of(&mut self, path: &Path) -> PathBuf {
        if let Some(known) = self.0.get(path) {
            return known.clone();
        }
        let plain = std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_symlink());
        let real = match (path.parent(), path.file_name()) {
            // Not a symlink, under an absolute parent: the parent's real
            // path and this name (a mount point is never `..`).
            (Some(parent), Some(name)) if plain && parent.is_absolute() => {
                self.of(parent).join(name)
            }
            _ => std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        };
        self.0.insert(path.to_path_buf(), real.clone());
        real
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_kubelet_subpath_mount() {
        let info = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    2 1 8:1 /var/lib/kubelet/pods/u/volume-subpaths/ca/app/0 /certs/ca.crt rw - ext4 /dev/sda1 rw\n";
        assert_eq!(
            subpath_mount(info, Path::new("/certs/ca.crt")).as_deref(),
            Some("/var/lib/kubelet/pods/u/volume-subpaths/ca/app/0")
        );
        assert_eq!(subpath_mount(info, Path::new("/certs")), None);
    }

    #[test]
    fn memoised_real_paths_follow_symlinked_parents_as_realpath_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::fs::write(real.join("ca.crt"), "x").expect("write");
        std::os::unix::fs::symlink(&real, dir.path().join("link")).expect("symlink");
        std::os::unix::fs::symlink("ca.crt", real.join("alias")).expect("symlink");
        let mut canonical = Canonical::default();
        for path in ["link/ca.crt", "link/alias", "real/ca.crt", "link/missing"] {
            let path = dir.path().join(path);
            // What the unmemoised lookup gave: `realpath`, or the path as
            // it is when there is none (a missing path is no mount point).
            let want = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            assert_eq!(canonical.of(&path), want, "{}", path.display());
        }
    }

    #[test]
    fn root_is_a_mount_point_and_a_plain_directory_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).expect("mkdir");
        assert!(!is_mount_point(&plain));
    }

    #[test]
    fn network_and_fuse_mounts_may_hang_local_ones_do_not() {
        let mountinfo = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
30 1 0:26 / /run/secrets rw - tmpfs tmpfs rw
41 1 0:40 / /mnt/nfs\\040share rw - nfs4 server:/export rw
42 1 0:41 / /mnt/s3 rw - fuse.s3fs s3fs rw
43 1 8:1 / / rw - ext4 /dev/sda1 rw
";
        assert_eq!(
            hanging_mounts(mountinfo),
            [PathBuf::from("/mnt/nfs share"), PathBuf::from("/mnt/s3")]
        );
    }

    #[test]
    fn unescapes_spaces() {
        assert_eq!(unescape("/a\\040b"), "/a b");
    }
}
