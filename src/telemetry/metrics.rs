//! The Prometheus metrics (README.md, "Observability"). One [`Metrics`] per
//! process, shared by the event loop and the reload workers; `/metrics`
//! encodes it (OpenMetrics text, see [`CONTENT_TYPE`]).
//!
//! Values that depend on "now" (seconds until the earliest CA expires) are
//! computed when encoded, never frozen at the last render: a daemon idle for
//! a month must not report a month-old countdown.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bundle::Bundle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabel {
    pub bundle: Name,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RenderLabels {
    pub bundle: Name,
    /// `changed`, `unchanged` or `refused`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub bundle: Name,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub bundle: Name,
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
    pub bundle: Name,
    pub subject: String,
    pub sha256: Fingerprint,
}

/// A bundle's name in a label: one copy per name, shared by its series
/// (a thousand bundles have seven thousand series).
pub type Name = Arc<str>;

/// A certificate's SHA-256, in a label as lowercase hex: 32 bytes held
/// instead of a 64-character string.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl EncodeLabelValue for Fingerprint {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&crate::bundle::hex(&self.0))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub name: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// The content type of [`Metrics::encode`]'s output: prometheus-client's
/// text encoder writes OpenMetrics 1.0 (counters as `# TYPE x counter` with
/// `x_total` samples, and a closing `# EOF`), which Prometheus parses only
/// when told it is OpenMetrics.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `bundle_earliest_expiry_seconds`: the earliest CA notAfter of each bundle
/// as last published, turned into "seconds from now" at each scrape.
#[derive(Debug, Default)]
pub struct EarliestExpiry {
    not_after: Mutex<BTreeMap<Name, i64>>,
}

impl EarliestExpiry {
    fn set(&self, bundle: &Name, not_after: Option<i64>) {
        let mut map = self
            .not_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match not_after {
            Some(t) => {
                map.insert(bundle.clone(), t);
            }
            None => {
                map.remove(&**bundle);
            }
        }
    }

    /// The earliest notAfter (unix seconds) recorded for `bundle`.
    pub fn not_after(&self, bundle: &str) -> Option<i64> {
        self.not_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(bundle)
            .copied()
    }
}

impl Collector for EarliestExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = unix_now();
        // Copied out so encoding never holds the lock the event loop takes.
        let snapshot: Vec<(Name, i64)> = self
            .not_after
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut family = encoder.encode_descriptor(
            "bundle_earliest_expiry_seconds",
            "Seconds from now until the first CA of the last published bundle expires (negative once expired)",
            None,
            MetricType::Gauge,
        )?;
        for (bundle, not_after) in snapshot {
            let labels = BundleLabel { bundle };
            ConstGauge::new(not_after.saturating_sub(now))
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every metric anchorage exports.
pub struct Metrics {
    pub registry: Registry,
    pub renders: Family<RenderLabels, Counter>,
    pub refusals: Family<RefusalLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub reload_duration: Family<ActionLabel, Histogram>,
    pub certificates: Family<BundleLabel, Gauge>,
    pub strict_refusals: Family<BundleLabel, Gauge>,
    pub not_after: Family<CertLabels, Gauge>,
    pub earliest_expiry: Arc<EarliestExpiry>,
    pub last_success: Family<BundleLabel, Gauge>,
    pub watch_events: Counter,
    pub probes: Family<ProbeLabels, Counter>,
    pub write_failures: Family<BundleLabel, Counter>,
    pub reloads_deferred: Family<ActionLabel, Counter>,
    pub reload_panics: Counter,
    /// Every bundle name a label has held, each once.
    names: Mutex<HashSet<Name>>,
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
        let strict_refusals = Family::default();
        registry.register(
            "bundle_strict_refusals",
            "CAs of the last rendered bundle that a strict verifier (openssl verify -x509_strict, Python 3.13) refuses",
            strict_refusals.clone(),
        );
        let not_after = Family::default();
        registry.register(
            "certificate_not_after_seconds",
            "notAfter of each certificate in the bundle (unix seconds)",
            not_after.clone(),
        );
        let earliest_expiry = Arc::new(EarliestExpiry::default());
        registry.register_collector(Box::new(earliest_expiry.clone()));
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
        let write_failures = Family::default();
        registry.register(
            "output_write_failures",
            "Output writes that failed (retried with backoff)",
            write_failures.clone(),
        );
        let reloads_deferred = Family::default();
        registry.register(
            "reloads_deferred",
            "Reload runs held back to honour min_interval",
            reloads_deferred.clone(),
        );
        let reload_panics = Counter::default();
        registry.register(
            "reload_worker_panics",
            "Reload workers that panicked (restarted, their reload re-queued)",
            reload_panics.clone(),
        );
        Self {
            registry,
            renders,
            refusals,
            reloads,
            reload_duration,
            certificates,
            strict_refusals,
            not_after,
            earliest_expiry,
            last_success,
            watch_events,
            probes,
            write_failures,
            reloads_deferred,
            reload_panics,
            names: Mutex::default(),
        }
    }

    /// `name` as the labels hold it: the copy its other series share.
    pub fn name(&self, name: &str) -> Name {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(known) = names.get(name) {
            return known.clone();
        }
        let new: Name = name.into();
        names.insert(new.clone());
        new
    }

    /// Records a render's outcome.
    pub fn rendered(&self, bundle: &str, result: &'static str) {
        self.renders
            .get_or_create(&RenderLabels {
                bundle: self.name(bundle),
                result,
            })
            .inc();
    }

    pub fn refused(&self, bundle: &str, reason: &'static str) {
        self.rendered(bundle, "refused");
        self.refusals
            .get_or_create(&RefusalLabels {
                bundle: self.name(bundle),
                reason,
            })
            .inc();
    }

    pub fn reload(&self, bundle: &str, action: &'static str, success: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                bundle: self.name(bundle),
                action,
                result: if success { "success" } else { "failure" },
            })
            .inc();
    }

    pub fn write_failed(&self, bundle: &str) {
        self.write_failures
            .get_or_create(&BundleLabel {
                bundle: self.name(bundle),
            })
            .inc();
    }

    pub fn probed(&self, name: &str, success: bool) {
        self.probes
            .get_or_create(&ProbeLabels {
                name: name.to_owned(),
                result: if success { "success" } else { "failure" },
            })
            .inc();
    }

    /// Publishes the state of a bundle that rendered successfully; `previous`
    /// is what it replaced, whose series go away.
    pub fn bundle_state(&self, name: &str, bundle: &Bundle, previous: Option<&Bundle>, now: i64) {
        let name = self.name(name);
        let label = BundleLabel {
            bundle: name.clone(),
        };
        self.certificates
            .get_or_create(&label)
            .set(bundle.len() as i64);
        self.last_success.get_or_create(&label).set(now);
        self.earliest_expiry.set(&name, bundle.earliest_expiry());
        self.strict_refusals(&name, bundle);
        let labels = |a: &crate::bundle::Anchor| CertLabels {
            bundle: name.clone(),
            subject: a.subject.clone(),
            sha256: Fingerprint(a.sha256),
        };
        // Only the series of CAs that came or went change: a swap of one
        // CA among a thousand is two series, not two thousand. Both sets
        // are sorted by SHA-256.
        let empty = Bundle::default();
        let before = previous.unwrap_or(&empty).anchors();
        let after = bundle.anchors();
        let (mut i, mut j) = (0, 0);
        while i < before.len() || j < after.len() {
            let order = match (before.get(i), after.get(j)) {
                (Some(b), Some(a)) => b.sha256.cmp(&a.sha256),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                std::cmp::Ordering::Less => {
                    self.not_after.remove(&labels(&before[i]));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    self.not_after
                        .get_or_create(&labels(&after[j]))
                        .set(after[j].not_after);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
            }
        }
    }

    /// Publishes how many CAs of `bundle` a strict verifier would refuse: an
    /// alert on it fires before an app upgrade (Python 3.13) breaks on them.
    fn strict_refusals(&self, name: &Name, bundle: &Bundle) {
        let refused = bundle
            .anchors()
            .iter()
            .filter(|a| !a.strict.is_empty())
            .count();
        self.strict_refusals
            .get_or_create(&BundleLabel {
                bundle: name.clone(),
            })
            .set(refused as i64);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str) -> Option<i64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn the_encoding_is_openmetrics_as_the_content_type_says() {
        let metrics = Metrics::new();
        metrics.rendered("peers", "changed");
        let text = metrics.encode();
        assert!(CONTENT_TYPE.starts_with("application/openmetrics-text"));
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("# TYPE anchorage_renders counter\n"),
            "{text}"
        );
        assert!(
            text.contains("anchorage_renders_total{bundle=\"peers\",result=\"changed\"} 1\n"),
            "{text}"
        );
    }

    fn anchor(name: &str) -> crate::bundle::Anchor {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        let block = crate::source::CertBlock::new(der, false);
        crate::bundle::Anchor::parse(&block, std::path::Path::new("/x.pem").into(), 0)
            .expect("parse")
    }

    #[test]
    fn certificate_series_follow_the_set_from_render_to_render() {
        let metrics = Metrics::new();
        let (a, b, c) = (anchor("Series A"), anchor("Series B"), anchor("Series C"));
        let series = |m: &Metrics| -> Vec<String> {
            let mut names: Vec<String> = m
                .encode()
                .lines()
                .filter(|l| l.starts_with("anchorage_certificate_not_after"))
                .filter_map(|l| l.split("CN=").nth(1))
                .map(|l| l.split('"').next().unwrap_or_default().to_owned())
                .collect();
            names.sort();
            names
        };
        let first = Bundle::new(vec![a.clone(), b.clone()]);
        metrics.bundle_state("peers", &first, None, 0);
        assert_eq!(series(&metrics), ["Series A", "Series B"]);
        let second = Bundle::new(vec![b.clone(), c.clone()]);
        metrics.bundle_state("peers", &second, Some(&first), 0);
        assert_eq!(series(&metrics), ["Series B", "Series C"]);
        let third = Bundle::new(vec![a, b, c]);
        metrics.bundle_state("peers", &third, Some(&second), 0);
        assert_eq!(series(&metrics), ["Series A", "Series B", "Series C"]);
        metrics.bundle_state("peers", &Bundle::default(), Some(&third), 0);
        assert!(series(&metrics).is_empty());
    }

    #[test]
    fn earliest_expiry_counts_down_from_the_scrape_not_the_render() {
        let metrics = Metrics::new();
        let now = unix_now();
        // As if rendered long ago: the value must still be "from now".
        metrics
            .earliest_expiry
            .set(&"peers".into(), Some(now + 1_000));
        metrics.earliest_expiry.set(&"old".into(), Some(now - 50));
        let text = metrics.encode();
        let peers = sample(
            &text,
            "anchorage_bundle_earliest_expiry_seconds{bundle=\"peers\"}",
        )
        .expect("peers");
        assert!((995..=1_000).contains(&peers), "{text}");
        let old = sample(
            &text,
            "anchorage_bundle_earliest_expiry_seconds{bundle=\"old\"}",
        )
        .expect("old");
        assert!((-55..=-50).contains(&old), "{text}");
        assert_eq!(
            metrics.earliest_expiry.not_after("peers"),
            Some(now + 1_000)
        );

        metrics.earliest_expiry.set(&"old".into(), None);
        assert!(!metrics.encode().contains("bundle=\"old\""));
    }
}
