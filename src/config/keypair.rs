//! The validated key pair: where its certificate and key are read from (two
//! files, or one credential bundle), where its `split_dir` copy goes, and
//! its reload actions; built from a `[[keypair]]` table or from the flags.
//!
//! It never reads a key: it only says where keys are.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::file::RawKeyPair;
use super::{ConfigError, FLAG_BUNDLE, Origin, ReloadSpec, parse_mode, reload};
use crate::cli::Flags;

/// The names a split directory holds, as kubelet's `kubernetes.io/tls`
/// Secret volume names them.
pub const SPLIT_CERT: &str = "tls.crt";
pub const SPLIT_KEY: &str = "tls.key";
/// `split_dir/tls.key` unless `key_mode` says otherwise.
pub const DEFAULT_KEY_MODE: u32 = 0o600;
/// `split_dir/tls.crt`: the chain is public.
pub const SPLIT_CERT_MODE: u32 = 0o644;

#[derive(Debug, Clone, PartialEq)]
pub struct KeyPairConfig {
    pub name: String,
    pub material: KeyMaterial,
    /// Where the accepted pair is copied as `tls.crt` and `tls.key`.
    pub split: Option<SplitDir>,
    /// The name of a bundle the certificate must chain to.
    pub chain_to: Option<String>,
    pub reloads: Vec<ReloadSpec>,
}

/// Where a key pair is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMaterial {
    /// A certificate (leaf first, then intermediates) and a key in two files,
    /// which a rotation can leave half-written for a moment.
    Files { cert: PathBuf, key: PathBuf },
    /// One PEM file holding the private key and the chain, leaf first, as
    /// a `podCertificate` projected volume writes `credentialBundlePath`:
    /// never half-written.
    CredentialBundle(PathBuf),
}

/// A directory the accepted pair is written to, for apps that need two
/// files (guarantee 8's one exception).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitDir {
    pub dir: PathBuf,
    pub key_mode: u32,
}

impl SplitDir {
    pub fn cert(&self) -> PathBuf {
        self.dir.join(SPLIT_CERT)
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join(SPLIT_KEY)
    }
}

impl KeyPairConfig {
    /// The files the pair is read from: what is watched.
    pub fn paths(&self) -> Vec<&Path> {
        match &self.material {
            KeyMaterial::Files { cert, key } => vec![cert, key],
            KeyMaterial::CredentialBundle(bundle) => vec![bundle],
        }
    }

    /// The file its certificate is read from, for errors and logs.
    pub fn cert_path(&self) -> &Path {
        match &self.material {
            KeyMaterial::Files { cert, .. } => cert,
            KeyMaterial::CredentialBundle(bundle) => bundle,
        }
    }

    /// What the app reads after a reload (an exec reload's
    /// `ANCHORAGE_OUTPUTS`): the split pair, or the certificate's file.
    pub fn outputs(&self) -> Vec<PathBuf> {
        match &self.split {
            Some(split) => vec![split.cert(), split.key()],
            None => vec![self.cert_path().to_path_buf()],
        }
    }
}

/// A `[[keypair]]` table: exactly one of `cert` + `key` or
/// `credential_bundle`; `key_mode` only with `split_dir`.
pub(super) fn from_raw(
    index: usize,
    raw: RawKeyPair,
    span: std::ops::Range<usize>,
    origin: &Origin<'_>,
    has_child: bool,
) -> Result<KeyPairConfig, ConfigError> {
    if let Some(name) = raw.name.as_ref().filter(|n| n.get_ref().trim().is_empty()) {
        return origin.error(Some(name.span()), "keypair.name", "must not be empty");
    }
    let name = raw
        .name
        .map_or_else(|| format!("keypair{index}"), Spanned::into_inner);
    let material = match (raw.cert, raw.key, raw.credential_bundle) {
        (Some(cert), Some(key), None) => KeyMaterial::Files {
            cert: cert.into_inner(),
            key: key.into_inner(),
        },
        (None, None, Some(bundle)) => KeyMaterial::CredentialBundle(bundle.into_inner()),
        (cert, key, Some(bundle)) if cert.is_some() || key.is_some() => {
            return origin.error(
                Some(bundle.span()),
                "keypair.credential_bundle",
                format!(
                    "key pair {name:?}: a credential bundle holds both the key and the chain; give credential_bundle or cert and key, not both"
                ),
            );
        }
        (Some(cert), None, None) => {
            return origin.error(
                Some(cert.span()),
                "keypair.key",
                format!("key pair {name:?} has a cert but no key"),
            );
        }
        (None, Some(key), None) => {
            return origin.error(
                Some(key.span()),
                "keypair.cert",
                format!("key pair {name:?} has a key but no cert"),
            );
        }
        _ => {
            return origin.error(
                Some(span),
                "keypair.cert",
                format!("key pair {name:?} needs cert and key, or credential_bundle"),
            );
        }
    };
    let key_mode = match &raw.key_mode {
        None => DEFAULT_KEY_MODE,
        Some(_) if raw.split_dir.is_none() => {
            return origin.error(
                raw.key_mode.as_ref().map(Spanned::span),
                "keypair.key_mode",
                format!(
                    "key pair {name:?}: key_mode is the mode of split_dir/tls.key, and there is no split_dir"
                ),
            );
        }
        Some(mode) => parse_mode(mode.get_ref())
            .or_else(|e| origin.error(Some(mode.span()), "keypair.key_mode", e))?,
    };
    let split = match raw.split_dir {
        Some(dir) => {
            let at = dir.span();
            let split = SplitDir {
                dir: dir.into_inner(),
                key_mode,
            };
            check_split(&name, &material, &split)
                .or_else(|e| origin.error(Some(at), "keypair.split_dir", e))?;
            Some(split)
        }
        None => None,
    };
    let mut reloads = Vec::new();
    for r in raw.reload {
        let span = r.span();
        reloads.push(reload(
            r.into_inner(),
            span,
            origin,
            "keypair.reload",
            has_child,
        )?);
    }
    Ok(KeyPairConfig {
        name,
        material,
        split,
        chain_to: raw.chain_to.map(Spanned::into_inner),
        reloads,
    })
}

/// The key pair of `--cert`/`--key` or `--credential-bundle`, if given.
pub(super) fn from_flags(
    flags: &Flags,
    reloads: &[ReloadSpec],
) -> Result<Option<KeyPairConfig>, ConfigError> {
    let no_file = Origin {
        file: None,
        text: "",
    };
    let material = match (&flags.cert, &flags.key, &flags.credential_bundle) {
        (Some(cert), Some(key), _) => KeyMaterial::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        (_, _, Some(bundle)) => KeyMaterial::CredentialBundle(bundle.clone()),
        _ if flags.split_dir.is_some() => {
            return no_file.error(
                None,
                "--split-dir",
                "--split-dir needs a key pair: --credential-bundle, or --cert and --key",
            );
        }
        _ => return Ok(None),
    };
    let name = FLAG_BUNDLE.to_owned();
    let split = match &flags.split_dir {
        Some(dir) => {
            let key_mode = match &flags.key_mode {
                Some(mode) => parse_mode(mode).or_else(|e| no_file.error(None, "--key-mode", e))?,
                None => DEFAULT_KEY_MODE,
            };
            let split = SplitDir {
                dir: dir.clone(),
                key_mode,
            };
            check_split(&name, &material, &split)
                .or_else(|e| no_file.error(None, "--split-dir", e))?;
            Some(split)
        }
        None => None,
    };
    Ok(Some(KeyPairConfig {
        name,
        material,
        split,
        chain_to: None,
        reloads: reloads.to_vec(),
    }))
}

/// A split directory must not be where the pair is read from: anchorage
/// would watch its own writes, and a kubelet volume is not its to write.
fn check_split(name: &str, material: &KeyMaterial, split: &SplitDir) -> Result<(), String> {
    if split.dir.as_os_str().is_empty() {
        return Err(format!(
            "key pair {name:?}: split_dir is empty; name a directory"
        ));
    }
    let sources = match material {
        KeyMaterial::Files { cert, key } => vec![cert, key],
        KeyMaterial::CredentialBundle(bundle) => vec![bundle],
    };
    let cwd = std::env::current_dir().ok();
    let cwd = cwd.as_deref();
    for source in sources {
        let parent = source.parent().unwrap_or(Path::new(""));
        let (dir, parent) = (super::normal(&split.dir, cwd), super::normal(parent, cwd));
        if dir == parent || source.starts_with(&split.dir) {
            return Err(format!(
                "key pair {name:?}: split_dir {} is where {} is read from; write the split pair elsewhere (an emptyDir the app mounts)",
                split.dir.display(),
                source.display()
            ));
        }
    }
    Ok(())
}
