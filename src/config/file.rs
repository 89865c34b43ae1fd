//! The TOML config file as written: raw serde structs with spans, so that
//! every error can name the file, the line and the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::{Config, ConfigError, Origin};
use crate::cli::{Flags, LogFormat};

impl Config {
    /// [`Config::load`] from text already read: `text` is taken to be the
    /// content of the file at `path` (which is never opened), and the flags
    /// apply on top of it. The whole parse and validation, for text that is
    /// not on disk (the fuzz targets feed it).
    pub fn from_text(
        flags: &Flags,
        path: &Path,
        text: &str,
        child: super::Child,
    ) -> Result<Self, ConfigError> {
        let raw = super::parse_file(path, text)?;
        let origin = Origin {
            file: Some(path),
            text,
        };
        super::build(flags, raw, &origin, child)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub daemon: Option<RawDaemon>,
    #[serde(default)]
    pub bundle: Vec<Spanned<RawBundle>>,
    #[serde(default)]
    pub keypair: Vec<Spanned<RawKeyPair>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    pub debounce: Option<Dur>,
    pub debounce_max: Option<Dur>,
    pub resync: Option<Dur>,
    pub poll: Option<Spanned<Dur>>,
    pub listen: Option<Spanned<String>>,
    pub log_format: Option<LogFormat>,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBundle {
    pub name: Option<Spanned<String>>,
    #[serde(default)]
    pub sources: Vec<Spanned<String>>,
    pub retain_removed: Option<Dur>,
    #[serde(default)]
    pub verify: Vec<PathBuf>,
    pub min_certs: Option<usize>,
    pub allow_expired: Option<bool>,
    pub allow_non_ca: Option<bool>,
    #[serde(default)]
    pub output: Vec<Spanned<RawOutput>>,
    #[serde(default)]
    pub reload: Vec<Spanned<RawReload>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutput {
    pub path: PathBuf,
    pub format: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReload {
    pub signal: Option<Spanned<String>>,
    pub pid_file: Option<Spanned<String>>,
    pub process: Option<Spanned<String>>,
    /// Signal the child started with `run -- CHILD`.
    pub child: Option<bool>,
    /// Restart the child started with `run -- CHILD`.
    pub restart_child: Option<bool>,
    pub exec: Option<Spanned<Command>>,
    pub http: Option<Spanned<String>>,
    pub method: Option<Spanned<String>>,
    /// `Authorization: Bearer <content>` for an http reload, read each call.
    pub bearer_token_file: Option<Spanned<String>>,
    /// Update this file's modification time.
    pub touch: Option<Spanned<String>>,
    pub timeout: Option<Dur>,
    pub retries: Option<u32>,
    pub probe: Option<Spanned<String>>,
    pub probe_timeout: Option<Dur>,
    /// Two runs of the action are at least this far apart.
    pub min_interval: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeyPair {
    pub name: Option<Spanned<String>>,
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    /// The key and the chain in one PEM file (a podCertificate volume's
    /// `credentialBundlePath`), instead of `cert` and `key`.
    pub credential_bundle: Option<Spanned<PathBuf>>,
    /// Where to write the accepted pair as `tls.crt` and `tls.key`.
    pub split_dir: Option<Spanned<PathBuf>>,
    /// The mode of `split_dir/tls.key` (default 0600).
    pub key_mode: Option<Spanned<String>>,
    pub chain_to: Option<Spanned<String>>,
    #[serde(default)]
    pub reload: Vec<Spanned<RawReload>>,
}

/// A command: an argv array, or one string split like a shell splits words.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Command {
    Argv(Vec<String>),
    Line(String),
}

/// A humantime duration in the file.
#[derive(Debug, Clone, Copy)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::cli::parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(path: &Path) -> Flags {
        Flags {
            config: Some(path.to_path_buf()),
            ..Flags::default()
        }
    }

    #[test]
    fn text_is_read_as_the_named_file() {
        let path = Path::new("/etc/anchorage/anchorage.toml");
        let config = Config::from_text(
            &flags(path),
            path,
            "[[bundle]]\nname = \"peers\"\nsources = [\"/certs\"]\n",
            crate::config::Child::Absent,
        )
        .expect("valid");
        assert_eq!(config.bundles.len(), 1);
        assert_eq!(config.bundles[0].name, "peers");
        let err = Config::from_text(
            &flags(path),
            path,
            "[daemon]\n\nresync = \"soon\"\n",
            crate::config::Child::Absent,
        )
        .expect_err("a bad duration");
        assert!(
            err.to_string()
                .starts_with("/etc/anchorage/anchorage.toml:3: resync"),
            "{err}"
        );
    }
}
