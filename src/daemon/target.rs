//! What the daemon keeps per bundle and per key pair (a [`Target`]), and the
//! work it hands to the blocking pool: a bundle's render or a key pair's
//! check. That work reads and writes files and may hang on a stuck
//! filesystem, so it never runs on the event loop (guarantee 10); it logs
//! and counts its own outcome, and the loop only does the bookkeeping.

use std::collections::HashSet;
use std::sync::Arc;

use tracing::warn;

use crate::bundle::{Bundle, Refusal};
use crate::keypair::{self, KeyPairState};
use crate::render::{self, BundleState, Mode, Report};
use crate::telemetry::metrics::{Metrics, Rendered};

/// A bundle or a key pair, with everything it carries between runs.
#[derive(Debug)]
pub enum Target {
    Bundle(Box<BundleState>),
    KeyPair(Box<KeyPairState>),
}

/// Which kind a target is (bundles and key pairs have separate names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Bundle,
    KeyPair,
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Bundle(_) => Kind::Bundle,
            Self::KeyPair(_) => Kind::KeyPair,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Self::Bundle(b) => &b.config.name,
            Self::KeyPair(k) => &k.config.name,
        }
    }
}

/// What a run is asked to do.
#[derive(Debug)]
pub enum Work {
    /// Read the sources in `only` (all with `None`) afresh, render, publish.
    Render {
        only: Option<HashSet<usize>>,
        /// Compare with the disk again (resync).
        recheck_disk: bool,
    },
    /// Check the pair, against the bundle it must chain to.
    Check { chain_to: Option<Arc<Bundle>> },
}

/// What a run concluded.
#[derive(Debug)]
pub enum Outcome {
    Rendered(Result<Report, Refusal>),
    Checked(keypair::Outcome),
}

/// Runs `work` on `target` at `now` (unix seconds). Blocking: call it from
/// the blocking pool.
pub fn run(target: &mut Target, work: Work, now: i64, metrics: &Metrics) -> Outcome {
    match (target, work) {
        (Target::Bundle(state), Work::Render { only, recheck_disk }) => {
            if recheck_disk {
                state.recheck_disk();
            }
            let name = state.config.name.clone();
            let result = state.render(only.as_ref(), now, Mode::Write);
            match &result {
                Ok(report) => {
                    render::log_report(&name, report, Mode::Write);
                    if !report.failed.is_empty() {
                        metrics.refused(&name, "output");
                        for _ in &report.failed {
                            metrics.write_failed(&name);
                        }
                    } else {
                        metrics.rendered(
                            &name,
                            if report.changed.is_empty() {
                                Rendered::Unchanged
                            } else {
                                Rendered::Changed
                            },
                        );
                        metrics.bundle_state(&name, &report.bundle, now);
                    }
                }
                Err(refusal) => {
                    warn!(bundle = %name, reason = refusal.reason(), error = %refusal,
                        "bundle refused; outputs keep their previous content, no reload");
                    metrics.refused(&name, refusal.reason());
                }
            }
            Outcome::Rendered(result)
        }
        (Target::KeyPair(pair), Work::Check { chain_to }) => {
            Outcome::Checked(pair.check(chain_to.as_deref(), now))
        }
        // The loop pairs each target with its own kind of work.
        (target, work) => {
            warn!(
                target = target.name(),
                ?work,
                "work of the wrong kind; ignored"
            );
            Outcome::Checked(keypair::Outcome::Unchanged)
        }
    }
}
