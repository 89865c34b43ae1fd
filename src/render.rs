//! One render pass of a bundle: read its sources, assemble, publish its
//! outputs. `render` runs it once per bundle; the daemon runs it on change.

use std::io;

use tracing::{info, warn};

use crate::bundle::retain::Retention;
use crate::bundle::{self, Assembly, Dropped, Refusal, verify};
use crate::check::rfc3339;
use crate::config::BundleConfig;
use crate::output;
use crate::source::SourceFile;

/// Reads every source of `bundle`; the first unusable one refuses it.
pub fn read_sources(bundle: &BundleConfig) -> Result<Vec<SourceFile>, Refusal> {
    // Hundreds of sources (one volume each) are read on all cores; the
    // first unusable one, in the configured order, is the one reported.
    let mut files = Vec::new();
    for read in crate::parallel::map(&bundle.sources, crate::source::Source::read) {
        files.extend(read?);
    }
    Ok(files)
}

/// Reads and validates `bundle` at `now` (unix seconds): the policy, the CAs
/// retained after they vanished (with `retention`), `min_certs`, and the
/// `verify` certificates, read afresh. Logs what the policy dropped or kept
/// early.
pub fn assemble(
    bundle: &BundleConfig,
    retention: Option<&mut Retention>,
    now: i64,
) -> Result<Assembly, Refusal> {
    let files = read_sources(bundle)?;
    assemble_files(bundle, &files, retention, None, now)
}

/// [`assemble`] from files already read (the daemon keeps each source's
/// last read and reads again only the sources an event concerned).
pub fn assemble_files(
    bundle: &BundleConfig,
    files: &[SourceFile],
    retention: Option<&mut Retention>,
    cache: Option<&mut bundle::ParseCache>,
    now: i64,
) -> Result<Assembly, Refusal> {
    let mut assembly = bundle::collect_cached(files, &bundle.policy, now, cache)?;
    log_policy(&bundle.name, &assembly);
    if let (Some(retention), Some(grace)) = (retention, bundle.retain_removed) {
        let changed = retention.apply(
            &bundle.name,
            &mut assembly,
            grace,
            now,
            bundle.policy.allow_expired,
        );
        bundle::check_min(&assembly, &bundle.policy)?;
        verify_all(bundle, &assembly, now)?;
        retention.accepted(&assembly.bundle, now, changed);
        return Ok(assembly);
    }
    bundle::check_min(&assembly, &bundle.policy)?;
    verify_all(bundle, &assembly, now)?;
    Ok(assembly)
}

/// Every `verify` certificate must chain to the new bundle.
fn verify_all(bundle: &BundleConfig, assembly: &Assembly, now: i64) -> Result<(), Refusal> {
    for path in &bundle.verify {
        let chain = verify::read_chain(path).map_err(Refusal::Verify)?;
        match chain {
            Some(chain) => verify::check(&chain, &assembly.bundle, now).map_err(Refusal::Verify)?,
            None => warn!(bundle = %bundle.name, file = %path.display(),
                "verify certificate does not exist yet; nothing to check"),
        }
    }
    Ok(())
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
pub fn render_once(
    bundle: &BundleConfig,
    state_dir: Option<&std::path::Path>,
    now: i64,
) -> Result<bool, RenderError> {
    let mut retention = Retention::load(state_dir, &bundle.name);
    let assembly = assemble(bundle, Some(&mut retention), now).map_err(RenderError::Refused)?;
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
