//! The Prometheus metrics (PRODUCT.md, Observability). One [`Metrics`] per
//! process, shared by the event loop and the reload workers; `/metrics`
//! encodes it.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bundle::Bundle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabel {
    pub bundle: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenderLabels {
    pub bundle: String,
    /// `changed`, `unchanged` or `refused`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub bundle: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub bundle: String,
    /// `signal`, `exec`, `http` or `restart`.
    pub action: &'static str,
    /// `success` or `failure`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub bundle: String,
    pub subject: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub name: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric anchorage exports.
pub struct Metrics {
    pub registry: Registry,
    pub renders: Family<RenderLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub reload_duration: Family<ActionLabel, Histogram>,
    pub certificates: Family<BundleLabel, Gauge>,
    pub not_after: Family<CertLabels, Gauge>,
    pub earliest_expiry: Family<BundleLabel, FloatGauge>,
    pub last_success: Family<BundleLabel, Gauge>,
    pub watch_events: Counter,
    pub probes: Family<ProbeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("anchorage");
        let renders = Family::default();
        registry.register("renders", "Render passes by outcome", renders.clone());
        let refusals = Family::default();
        registry.register("refusals", "Bundles refused, by reason", refusals.clone());
        let reloads = Family::default();
        registry.register(
            "reloads",
            "Reload attempts by action and outcome",
            reloads.clone(),
        );
        let reload_duration = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 9))
        });
        registry.register(
            "reload_duration_seconds",
            "Time one reload attempt took",
            reload_duration.clone(),
        );
        let certificates = Family::default();
        registry.register(
            "bundle_certificates",
            "Certificates in the last rendered bundle",
            certificates.clone(),
        );
        let not_after = Family::default();
        registry.register(
            "certificate_not_after_seconds",
            "notAfter of each certificate in the bundle (unix seconds)",
            not_after.clone(),
        );
        let earliest_expiry = Family::default();
        registry.register(
            "bundle_earliest_expiry_seconds",
            "Seconds until the first CA of the bundle expires, at the last render",
            earliest_expiry.clone(),
        );
        let last_success = Family::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When the bundle last rendered successfully (unix seconds)",
            last_success.clone(),
        );
        let watch_events = Counter::default();
        registry.register(
            "watch_events",
            "Filesystem events received from the watcher",
            watch_events.clone(),
        );
        let probes = Family::default();
        registry.register("probes", "Reload probes by outcome", probes.clone());
        Self {
            registry,
            renders,
            refusals,
            reloads,
            reload_duration,
            certificates,
            not_after,
            earliest_expiry,
            last_success,
            watch_events,
            probes,
        }
    }

    /// Records a render's outcome.
    pub fn rendered(&self, bundle: &str, result: &'static str) {
        self.renders
            .get_or_create(&RenderLabels {
                bundle: bundle.to_owned(),
                result,
            })
            .inc();
    }

    pub fn refused(&self, bundle: &str, reason: &'static str) {
        self.rendered(bundle, "refused");
        self.refusals
            .get_or_create(&RefusalLabels {
                bundle: bundle.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn reload(&self, bundle: &str, action: &'static str, success: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                bundle: bundle.to_owned(),
                action,
                result: if success { "success" } else { "failure" },
            })
            .inc();
    }

    /// Publishes the state of a bundle that rendered successfully; `previous`
    /// is what it replaced, whose series go away.
    pub fn bundle_state(&self, name: &str, bundle: &Bundle, previous: Option<&Bundle>, now: i64) {
        let label = BundleLabel {
            bundle: name.to_owned(),
        };
        self.certificates
            .get_or_create(&label)
            .set(bundle.len() as i64);
        self.last_success.get_or_create(&label).set(now);
        if let Some(expiry) = bundle.earliest_expiry() {
            self.earliest_expiry
                .get_or_create(&label)
                .set((expiry - now) as f64);
        }
        let cert_labels = |b: &Bundle| -> Vec<(CertLabels, i64)> {
            b.anchors()
                .iter()
                .map(|a| {
                    (
                        CertLabels {
                            bundle: name.to_owned(),
                            subject: a.subject.clone(),
                            sha256: a.fingerprint(),
                        },
                        a.not_after,
                    )
                })
                .collect()
        };
        if let Some(previous) = previous {
            for (labels, _) in cert_labels(previous) {
                self.not_after.remove(&labels);
            }
        }
        for (labels, not_after) in cert_labels(bundle) {
            self.not_after.get_or_create(&labels).set(not_after);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
