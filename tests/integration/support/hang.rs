//! A FUSE filesystem whose reads never return (support/hang_fs.py): what a
//! hung NFS server does to a reader. Unmounted and stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::daemon::eventually;

pub struct HangingFs {
    child: Child,
    pub mountpoint: PathBuf,
}

impl HangingFs {
    /// Mounts it at `dir/hung`; its one file is `ca.pem`. `None` when this
    /// machine cannot mount FUSE (no /dev/fuse, no privilege): the caller
    /// skips, saying so.
    pub fn mount(dir: &Path) -> Option<Self> {
        if !Path::new("/dev/fuse").exists() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: cannot mount FUSE here (no /dev/fuse or not root)");
            return None;
        }
        let mountpoint = dir.join("hung");
        let ready = dir.join("hung.ready");
        std::fs::create_dir_all(&mountpoint).expect("mkdir");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/integration/support/hang_fs.py"
        );
        // Debian's python3 carries python3-fusepy (scripts/deps.d/hang.sh).
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let child = Command::new(python)
            .arg(script)
            .arg(&mountpoint)
            .arg(&ready)
            .stdin(Stdio::null())
            .spawn()
            .expect("start hang_fs.py");
        let mut fs = Self { child, mountpoint };
        eventually(Duration::from_secs(20), || {
            if ready.exists() {
                return Ok(());
            }
            match fs.child.try_wait() {
                Ok(Some(status)) => panic!(
                    "hang_fs.py exited ({status}): is python3-fusepy installed (scripts/install-test-deps)?"
                ),
                _ => Err("not mounted yet".to_owned()),
            }
        });
        Some(fs)
    }

    /// The file whose read hangs.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("ca.pem")
    }

    /// A path whose very lookup hangs (a stat, a watch, an open): a server
    /// that stopped answering altogether.
    pub fn stuck(&self, name: &str) -> PathBuf {
        self.mountpoint.join("stuck").join(name)
    }

    /// Another file whose read hangs. Each reader of a hung FUSE file
    /// after the first waits for the page in the kernel, where even
    /// SIGKILL cannot reach it: readers that must stay killable read files
    /// of their own.
    pub fn file_named(&self, name: &str) -> PathBuf {
        self.mountpoint.join(format!("{name}.pem"))
    }
}

impl Drop for HangingFs {
    fn drop(&mut self) {
        // Lazy: a reader may still be stuck inside.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
