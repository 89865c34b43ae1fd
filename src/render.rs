//! One render pass of a bundle: read its sources, assemble, publish its
//! outputs. `render` runs it once per bundle; the daemon runs it on change.

use std::io;

use tracing::{info, warn};

use crate::bundle::{self, Assembly, Dropped, Refusal};
use crate::check::rfc3339;
use crate::config::BundleConfig;
use crate::output;
use crate::source::SourceFile;

/// Reads every source of `bundle`; the first unusable one refuses it.
pub fn read_sources(bundle: &BundleConfig) -> Result<Vec<SourceFile>, Refusal> {
    let mut files = Vec::new();
    for source in &bundle.sources {
        files.extend(source.read()?);
    }
    Ok(files)
}

/// Reads and validates `bundle` at `now` (unix seconds), logging what the
/// policy dropped or kept early.
pub fn assemble(bundle: &BundleConfig, now: i64) -> Result<Assembly, Refusal> {
    let files = read_sources(bundle)?;
    let assembly = bundle::assemble(&files, &bundle.policy, now)?;
    log_policy(&bundle.name, &assembly);
    Ok(assembly)
}

fn log_policy(name: &str, assembly: &Assembly) {
    for dropped in &assembly.dropped {
        match dropped {
            Dropped::Expired(a) => info!(
                bundle = name, file = %a.origin.display(), subject = %a.subject,
                sha256 = %a.fingerprint(), not_after = %rfc3339(a.not_after),
                "dropped an expired certificate"
            ),
            Dropped::NotCa(a) => info!(
                bundle = name, file = %a.origin.display(), subject = %a.subject,
                sha256 = %a.fingerprint(),
                "dropped a certificate that is not a CA"
            ),
        }
    }
    for a in &assembly.pending {
        info!(
            bundle = name, file = %a.origin.display(), subject = %a.subject,
            sha256 = %a.fingerprint(), not_before = %rfc3339(a.not_before),
            "kept a CA that is not valid yet"
        );
    }
}

/// Publishes every output of `bundle`; returns whether any changed. Stops at
/// the first output that cannot be written (the others keep their content).
pub fn publish(bundle: &BundleConfig, assembly: &Assembly) -> io::Result<bool> {
    let mut changed = false;
    for spec in &bundle.outputs {
        changed |= output::publish(spec, &assembly.bundle)?;
    }
    Ok(changed)
}

/// `anchorage render` for one bundle: returns whether its outputs changed.
pub fn render_once(bundle: &BundleConfig, now: i64) -> Result<bool, RenderError> {
    let assembly = assemble(bundle, now).map_err(RenderError::Refused)?;
    let changed = publish(bundle, &assembly).map_err(RenderError::Output)?;
    info!(
        bundle = %bundle.name,
        certificates = assembly.bundle.len(),
        changed,
        "rendered"
    );
    Ok(changed)
}

#[derive(Debug)]
pub enum RenderError {
    Refused(Refusal),
    Output(io::Error),
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(r) => write!(f, "refused: {r}"),
            Self::Output(e) => write!(f, "cannot write output: {e}"),
        }
    }
}

impl std::error::Error for RenderError {}

/// Logs a failed render, naming the bundle.
pub fn log_failure(bundle: &str, error: &RenderError) {
    warn!(bundle, error = %error, "render failed; outputs keep their previous content");
}
