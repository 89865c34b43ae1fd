//! A volume written exactly as kubelet's AtomicWriter writes a Secret or
//! ConfigMap (kubernetes pkg/volume/util/atomic_writer.go): a new timestamped
//! directory, `..data_tmp` renamed over `..data`, visible symlinks created
//! only where missing, links of removed keys deleted, the old directory
//! removed last.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Volume {
    pub dir: PathBuf,
    generation: u64,
}

impl Volume {
    pub fn new(dir: &Path) -> Self {
        fs::create_dir_all(dir).expect("mkdir volume");
        Self {
            dir: dir.to_path_buf(),
            generation: 0,
        }
    }

    /// Publishes exactly these keys.
    pub fn write(&mut self, files: &[(&str, &[u8])]) {
        self.write_pausing(files, Duration::ZERO);
    }

    /// Publishes a cert-manager Secret's pair: `tls.crt` and `tls.key`;
    /// returns their visible paths.
    pub fn write_pair(&mut self, leaf: &super::pki::Leaf) -> (PathBuf, PathBuf) {
        let (cert, key) = (leaf.cert.pem(), leaf.key.serialize_pem());
        self.write(&[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())]);
        (self.dir.join("tls.crt"), self.dir.join("tls.key"))
    }

    /// [`Volume::write`], pausing `pause` after each step, so that a
    /// watcher sees each step's events on their own.
    pub fn write_pausing(&mut self, files: &[(&str, &[u8])], pause: Duration) {
        let step = || {
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        };
        self.generation += 1;
        let old = fs::read_link(self.dir.join("..data")).ok();
        let name = format!("..2026_11_23_10_00_00.{:09}", self.generation);
        let generation = self.dir.join(&name);
        fs::create_dir(&generation).expect("mkdir generation");
        fs::set_permissions(&generation, fs::Permissions::from_mode(0o755)).expect("chmod");
        step();
        for (key, bytes) in files {
            let path = generation.join(key);
            fs::write(&path, bytes).expect("write key");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let tmp = self.dir.join("..data_tmp");
        let _ = fs::remove_file(&tmp);
        symlink(&name, &tmp).expect("symlink ..data_tmp");
        step();
        fs::rename(&tmp, self.dir.join("..data")).expect("rename ..data");
        step();
        for (key, _) in files {
            let visible = self.dir.join(key);
            if fs::symlink_metadata(&visible).is_err() {
                symlink(Path::new("..data").join(key), &visible).expect("visible link");
            }
        }
        step();
        if let Some(old) = old {
            let old_dir = self.dir.join(&old);
            for entry in fs::read_dir(&old_dir).expect("list old") {
                let key = entry.expect("entry").file_name();
                if !files.iter().any(|(k, _)| *k == key.to_string_lossy()) {
                    let _ = fs::remove_file(self.dir.join(&key));
                }
            }
            fs::remove_dir_all(old_dir).expect("remove old generation");
        }
    }
}

/// A `clusterTrustBundle` projection's file as kubelet writes it: every
/// selected bundle's certificates merged, comments and block headers
/// stripped, duplicates dropped, in an order that may change from one
/// write to the next (`order` picks a rotation of the set).
pub fn cluster_trust_bundle(cas: &[&super::pki::Ca], order: usize) -> Vec<u8> {
    let mut pems: Vec<String> = Vec::new();
    for ca in cas {
        let pem = ca.pem();
        if !pems.contains(&pem) {
            pems.push(pem);
        }
    }
    if !pems.is_empty() {
        let n = order % pems.len();
        pems.rotate_left(n);
    }
    pems.concat().into_bytes()
}

/// A `podCertificate` projection's `credentialBundlePath` file: the PKCS#8
/// private key as the first block, then the chain, leaf first.
pub fn credential_bundle(leaf: &super::pki::Leaf, intermediates: &[&super::pki::Ca]) -> Vec<u8> {
    let mut out = leaf.key.serialize_pem();
    out.push_str(&leaf.cert.pem());
    for ca in intermediates {
        out.push_str(&ca.pem());
    }
    out.into_bytes()
}
