//! Reloading by a poke: the target file's modification time is set to now,
//! as `touch` does, so an app that watches its own configuration (traefik's
//! file provider) reads everything again.
//!
//! It must never create the file: a missing file is a target that does not
//! exist yet, as a missing pid file is.

use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AT_FDCWD;
use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

use super::{Absent, Failure};

/// Sets `path`'s access and modification times to now (through a symlink,
/// as `touch` does).
pub fn run(path: &Path) -> Result<(), Failure> {
    match utimensat(
        AT_FDCWD,
        path,
        &TimeSpec::UTIME_NOW,
        &TimeSpec::UTIME_NOW,
        UtimensatFlags::FollowSymlink,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::ENOENT) => Err(Failure::Absent(Absent::NoFile {
            path: path.to_path_buf(),
        })),
        Err(e) => Err(Failure::Failed(format!(
            "{}: cannot update the modification time: {e}",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn updates_the_time_and_never_creates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("dynamic.yml");
        std::fs::write(&file, "x").expect("write");
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_modified(old))
            .expect("set mtime");
        run(&file).expect("touch");
        let mtime = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .expect("mtime");
        assert!(mtime > old + Duration::from_secs(1800), "{mtime:?}");
        assert_eq!(std::fs::read(&file).expect("read"), b"x");

        let missing = dir.path().join("missing.yml");
        assert!(matches!(run(&missing), Err(Failure::Absent(_))));
        assert!(!missing.exists());
    }
}
