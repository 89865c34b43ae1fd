//! Outputs: a [`Bundle`] rendered in the formats applications read, and
//! published atomically.
//!
//! Rendering is pure (bytes depend only on the certificate set, never on the
//! time), so an unchanged set renders identical bytes and nothing is
//! rewritten (guarantee 3). Publishing never leaves a reader a partial, empty
//! or mixed output (guarantee 1): see [`atomic`].

pub mod atomic;
mod format;
mod keystore;

use std::path::PathBuf;

pub use format::{OPENSSL_DIR_BUNDLE, render, render_after};

use crate::bundle::Bundle;

/// The formats an output can take (README.md, "Outputs").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    /// The certificates as PEM blocks, nothing else.
    Pem,
    /// `<subject-hash>.N` per certificate plus `ca-certificates.crt`.
    OpensslDir,
    /// One DER file per certificate.
    DerDir,
    /// A PKCS#12 truststore (default password: empty).
    Pkcs12 { password: String },
    /// A Java keystore of trusted certificates (default password: changeit).
    Jks { password: String },
}

impl Format {
    pub const NAMES: &'static str = "pem | openssl-dir | der-dir | pkcs12 | jks";

    /// The format named `name`, with its password (or the format's default).
    pub fn parse(name: &str, password: Option<String>) -> Option<Self> {
        match name {
            "pem" => Some(Self::Pem),
            "openssl-dir" => Some(Self::OpensslDir),
            "der-dir" => Some(Self::DerDir),
            "pkcs12" => Some(Self::Pkcs12 {
                password: password.unwrap_or_default(),
            }),
            "jks" => Some(Self::Jks {
                password: password.unwrap_or_else(|| keystore::JKS_DEFAULT_PASSWORD.into()),
            }),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Pem => "pem",
            Self::OpensslDir => "openssl-dir",
            Self::DerDir => "der-dir",
            Self::Pkcs12 { .. } => "pkcs12",
            Self::Jks { .. } => "jks",
        }
    }

    /// Whether the format takes a password.
    pub fn has_password(&self) -> bool {
        matches!(self, Self::Pkcs12 { .. } | Self::Jks { .. })
    }
}

/// Where and how one output is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub path: PathBuf,
    pub format: Format,
    /// Applied exactly, whatever the umask; for a directory, to its files.
    pub mode: u32,
}

/// An output's rendered bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendered {
    File(Vec<u8>),
    /// File names (no `/`) and contents, sorted by name.
    Dir(Vec<(String, Vec<u8>)>),
}

/// Renders `bundle` as `spec` asks and publishes it unless the same bytes are
/// already there. Returns whether anything changed on disk.
pub fn publish(spec: &OutputSpec, bundle: &Bundle) -> std::io::Result<bool> {
    let rendered = render(bundle, &spec.format);
    atomic::publish(&spec.path, &rendered, spec.mode).map_err(std::io::Error::from)
}
