//! The Prometheus metrics (README.md, "Observability"). One [`Metrics`] per
//! process, shared by the event loop and the reload workers; `/metrics`
//! encodes it as OpenMetrics for a scraper that asks for it (Prometheus
//! does, see [`CONTENT_TYPE`]) and in Prometheus's text format for any
//! other ([`TEXT_CONTENT_TYPE`]: curl, a script, an older scraper).
//!
//! Values that depend on "now" (seconds until the earliest CA expires) are
//! computed when encoded, never frozen at the last render: a daemon idle for
//! a month must not report a month-old countdown.
//!
//! The series labelled by bundle are kept in one entry per bundle
//! ([`BundleSeries`]), not in prometheus-client's `Family`: a family holds
//! a hash-table slot, a copy of its labels and an allocated counter for
//! each series, and a thousand bundles have seven thousand series (and one
//! `certificate_not_after_seconds` series per CA). The rest are families.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
    LabelValueEncoder, MetricEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::bundle::{Anchor, Bundle};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub name: String,
    /// `success` or `failure`.
    pub result: &'static str,
}

/// A render's outcome, the `result` label of `renders_total`; its place
/// in [`Rendered::ALL`] is its count's in a bundle's series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendered {
    Changed = 0,
    Unchanged = 1,
    Refused = 2,
}

impl Rendered {
    const ALL: [Self; 3] = [Self::Changed, Self::Unchanged, Self::Refused];

    fn label(self) -> &'static str {
        match self {
            Self::Changed => "changed",
            Self::Unchanged => "unchanged",
            Self::Refused => "refused",
        }
    }
}

/// The content type of [`Metrics::encode`]'s output: prometheus-client's
/// text encoder writes OpenMetrics 1.0 (counters as `# TYPE x counter` with
/// `x_total` samples, and a closing `# EOF`), which Prometheus parses only
/// when told it is OpenMetrics.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`Metrics::encode_text`]'s output: Prometheus's text
/// format, for a scraper that does not ask for OpenMetrics.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header asks for OpenMetrics (Prometheus
/// asks for it first); anything else gets Prometheus's text format.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        // `q=0`: "not this one".
        let refused =
            |p: &str| p.strip_prefix("q=").and_then(|q| q.parse::<f32>().ok()) == Some(0.0);
        parts
            .next()
            .is_some_and(|kind| kind.eq_ignore_ascii_case("application/openmetrics-text"))
            && !parts.any(refused)
    })
}

/// Prometheus's text format (0.0.4) of an OpenMetrics exposition: the same
/// samples, a counter's family named as its samples are (`x_total`), and no
/// `# EOF`. Histograms and gauges read the same in both.
fn prometheus_text(open: &str) -> String {
    let counters: HashSet<&str> = open
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open.len() + counters.len() * 2 * "_total".len());
    for line in open.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Every series labelled by bundle, one entry per bundle name. A counter
/// appears once it has counted, as a family's would; a bundle's series go
/// when it leaves the configuration ([`Metrics::keep_only`]).
#[derive(Debug, Default)]
pub struct BundleSeries {
    bundles: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    series: BTreeMap<Name, Series>,
    /// The names configured, once the daemon said which
    /// ([`Metrics::keep_only`]): a count for any other name starts no
    /// series. A reload finishes on its own thread, and one that ends after
    /// its bundle left the configuration would otherwise bring the
    /// bundle's series back for the daemon's life. `None`: every name.
    configured: Option<HashSet<Name>>,
}

/// A bundle's name: shared, so that encoding can take it out of the lock.
type Name = Arc<str>;

/// One bundle's series.
#[derive(Debug, Default)]
struct Series {
    /// `renders_total`, in the order of [`Rendered::ALL`].
    renders: [u64; 3],
    /// `refusals_total` by reason.
    refusals: Vec<(&'static str, u64)>,
    /// `reloads_total` by action and success.
    reloads: Vec<((&'static str, bool), u64)>,
    /// `output_write_failures_total`.
    write_failures: u64,
    /// What it last published: the gauges that describe it.
    published: Option<Published>,
}

/// The last bundle a bundle published, and when: its certificates'
/// series are worked out from it when encoded, not copied.
#[derive(Debug)]
struct Published {
    /// Shared with the daemon, which holds it as the bundle's last.
    bundle: Arc<Bundle>,
    /// `last_success_timestamp_seconds`.
    at: i64,
    /// `bundle_strict_refusals`.
    strict_refusals: usize,
}

/// A count kept under a key in a short list (a bundle's reasons, its
/// reload actions): most lists hold one.
fn count<K: PartialEq>(list: &mut Vec<(K, u64)>, key: K) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => {
            list.push((key, 1));
            list.shrink_to_fit();
        }
    }
}

impl BundleSeries {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.bundles.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes `bundle`'s series; nothing if `bundle` is not configured.
    fn update(&self, bundle: &str, change: impl FnOnce(&mut Series)) {
        let mut table = self.lock();
        let Table { series, configured } = &mut *table;
        match series.get_mut(bundle) {
            Some(series) => change(series),
            None => {
                let name = match configured {
                    None => bundle.into(),
                    // The configuration's copy of the name.
                    Some(names) => match names.get(bundle) {
                        Some(name) => name.clone(),
                        None => return,
                    },
                };
                change(series.entry(name).or_default());
            }
        }
    }

    /// Keeps the series of `names` alone, from now on.
    fn keep_only(&self, names: HashSet<Name>) {
        let mut table = self.lock();
        table.series.retain(|name, _| names.contains(name));
        table.configured = Some(names);
    }

    /// The earliest notAfter (unix seconds) of what `bundle` last
    /// published.
    #[cfg(test)]
    fn not_after(&self, bundle: &str) -> Option<i64> {
        self.lock()
            .series
            .get(bundle)
            .and_then(|s| s.published.as_ref())
            .and_then(|p| p.bundle.earliest_expiry())
    }

    /// Encodes one family: its descriptor, then `each` bundle's series,
    /// under the lock (held for this family only). A family with no series
    /// is left out, as the registry leaves out an empty one; its help ends
    /// with a full stop, as the registry's do.
    fn family(
        &self,
        encoder: &mut DescriptorEncoder,
        (name, help, kind): (&str, &str, MetricType),
        has: impl Fn(&Series) -> bool,
        each: impl Fn(&str, &Series, &mut MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
    ) -> Result<(), std::fmt::Error> {
        let table = self.lock();
        let bundles = &table.series;
        if !bundles.values().any(has) {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for (bundle, series) in bundles.iter() {
            each(bundle, series, &mut family)?;
        }
        Ok(())
    }

    /// A family of one series per bundle, labelled by the bundle alone:
    /// `value` is its value, or `None` where the bundle has none (a
    /// counter that never counted, a gauge of a bundle never published).
    fn one_per_bundle(
        &self,
        encoder: &mut DescriptorEncoder,
        descriptor: (&str, &str, MetricType),
        value: impl Fn(&Series) -> Option<i64>,
    ) -> Result<(), std::fmt::Error> {
        let kind = descriptor.2;
        self.family(
            encoder,
            descriptor,
            |s| value(s).is_some(),
            |bundle, s, family| match value(s) {
                Some(v) if matches!(kind, MetricType::Counter) => {
                    counter(v as u64, family, &[("bundle", bundle)])
                }
                Some(v) => gauge(v, family, &[("bundle", bundle)]),
                None => Ok(()),
            },
        )
    }
}

/// A certificate's series labels: its bundle, subject and SHA-256 (as
/// lowercase hex), read from the certificate when encoded.
struct CertLabels<'a> {
    bundle: &'a str,
    anchor: &'a Anchor,
}

/// A certificate's SHA-256, in a label as lowercase hex.
struct Fingerprint<'a>(&'a [u8; 32]);

impl EncodeLabelValue for Fingerprint<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&crate::bundle::hex(self.0))
    }
}

impl EncodeLabelSet for CertLabels<'_> {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [
            ("bundle", self.bundle),
            ("subject", self.anchor.subject.as_str()),
        ]
        .encode(encoder)?;
        [("sha256", Fingerprint(&self.anchor.sha256))].encode(encoder)
    }
}

fn counter(
    value: u64,
    family: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(family.encode_family(labels)?)
}

fn gauge(
    value: i64,
    family: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(family.encode_family(labels)?)
}

impl Collector for BundleSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let encoder = &mut encoder;
        self.family(
            encoder,
            ("renders", "Render passes by outcome.", MetricType::Counter),
            |s| s.renders.iter().any(|n| *n > 0),
            |bundle, s, family| {
                for (result, n) in Rendered::ALL.iter().zip(s.renders) {
                    if n > 0 {
                        counter(n, family, &[("bundle", bundle), ("result", result.label())])?;
                    }
                }
                Ok(())
            },
        )?;
        self.family(
            encoder,
            (
                "refusals",
                "Bundles refused, by reason.",
                MetricType::Counter,
            ),
            |s| !s.refusals.is_empty(),
            |bundle, s, family| {
                for (reason, n) in &s.refusals {
                    counter(*n, family, &[("bundle", bundle), ("reason", *reason)])?;
                }
                Ok(())
            },
        )?;
        self.family(
            encoder,
            (
                "reloads",
                "Reload attempts by action and outcome.",
                MetricType::Counter,
            ),
            |s| !s.reloads.is_empty(),
            |bundle, s, family| {
                for ((action, success), n) in &s.reloads {
                    let result = if *success { "success" } else { "failure" };
                    counter(
                        *n,
                        family,
                        &[("bundle", bundle), ("action", *action), ("result", result)],
                    )?;
                }
                Ok(())
            },
        )?;
        self.one_per_bundle(
            encoder,
            (
                "bundle_certificates",
                "Certificates in the last rendered bundle.",
                MetricType::Gauge,
            ),
            |s| s.published.as_ref().map(|p| p.bundle.len() as i64),
        )?;
        self.one_per_bundle(
            encoder,
            (
                "bundle_strict_refusals",
                "CAs of the last rendered bundle that a strict verifier (openssl verify -x509_strict, Python 3.13) refuses.",
                MetricType::Gauge,
            ),
            |s| s.published.as_ref().map(|p| p.strict_refusals as i64),
        )?;
        // One series per CA of every bundle, the most by far (10,000 for a
        // bundle of 10,000 CAs): encoded from the bundles taken out under
        // the lock, so a render that ends meanwhile does not wait for them.
        let published: Vec<(Name, Arc<Bundle>)> = self
            .lock()
            .series
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.published.as_ref()?.bundle.clone())))
            .collect();
        if published.iter().any(|(_, b)| !b.is_empty()) {
            let mut family = encoder.encode_descriptor(
                "certificate_not_after_seconds",
                "notAfter of each certificate in the bundle (unix seconds).",
                None,
                MetricType::Gauge,
            )?;
            for (bundle, published) in &published {
                for anchor in published.anchors() {
                    let labels = CertLabels { bundle, anchor };
                    gauge(anchor.not_after, &mut family, &labels)?;
                }
            }
        }
        let now = unix_now();
        self.one_per_bundle(
            encoder,
            (
                "bundle_earliest_expiry_seconds",
                "Seconds from now until the first CA of the last published bundle expires (negative once expired).",
                MetricType::Gauge,
            ),
            |s| {
                let published = s.published.as_ref()?;
                Some(published.bundle.earliest_expiry()?.saturating_sub(now))
            },
        )?;
        self.one_per_bundle(
            encoder,
            (
                "last_success_timestamp_seconds",
                "When the bundle last rendered successfully (unix seconds).",
                MetricType::Gauge,
            ),
            |s| s.published.as_ref().map(|p| p.at),
        )?;
        self.one_per_bundle(
            encoder,
            (
                "output_write_failures",
                "Output writes that failed (retried with backoff).",
                MetricType::Counter,
            ),
            |s| (s.write_failures > 0).then_some(s.write_failures as i64),
        )
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
    /// Every series labelled by bundle.
    pub bundles: Arc<BundleSeries>,
    pub reload_duration: Family<ActionLabel, Histogram>,
    pub watch_events: Counter,
    pub probes: Family<ProbeLabels, Counter>,
    pub reloads_deferred: Family<ActionLabel, Counter>,
    pub reload_panics: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("anchorage");
        let bundles = Arc::new(BundleSeries::default());
        registry.register_collector(Box::new(bundles.clone()));
        let reload_duration = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 9))
        });
        registry.register(
            "reload_duration_seconds",
            "Time one reload attempt took",
            reload_duration.clone(),
        );
        let watch_events = Counter::default();
        registry.register(
            "watch_events",
            "Filesystem events received from the watcher",
            watch_events.clone(),
        );
        let probes = Family::default();
        registry.register("probes", "Reload probes by outcome", probes.clone());
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
            bundles,
            reload_duration,
            watch_events,
            probes,
            reloads_deferred,
            reload_panics,
        }
    }

    /// Records a render's outcome.
    pub fn rendered(&self, bundle: &str, result: Rendered) {
        self.bundles.update(bundle, |s| {
            s.renders[result as usize] += 1;
        });
    }

    pub fn refused(&self, bundle: &str, reason: &'static str) {
        self.bundles.update(bundle, |s| {
            s.renders[Rendered::Refused as usize] += 1;
            count(&mut s.refusals, reason);
        });
    }

    pub fn reload(&self, bundle: &str, action: &'static str, success: bool) {
        self.bundles
            .update(bundle, |s| count(&mut s.reloads, (action, success)));
    }

    /// How many reloads of `action` for `bundle` ended in `success` (or
    /// not): `reloads_total`'s value.
    pub fn reloads(&self, bundle: &str, action: &str, success: bool) -> u64 {
        self.bundles.lock().series.get(bundle).map_or(0, |s| {
            s.reloads
                .iter()
                .filter(|((a, ok), _)| *a == action && *ok == success)
                .map(|(_, n)| *n)
                .sum()
        })
    }

    /// The bundles (and key pairs) configured now: every other name's
    /// series are dropped, with the bundles they held, and a count that
    /// comes later for one of them (a reload that ends after its bundle
    /// left) starts none.
    pub fn keep_only<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        self.bundles
            .keep_only(names.into_iter().map(Name::from).collect());
    }

    pub fn write_failed(&self, bundle: &str) {
        self.bundles.update(bundle, |s| s.write_failures += 1);
    }

    pub fn probed(&self, name: &str, success: bool) {
        self.probes
            .get_or_create(&ProbeLabels {
                name: name.to_owned(),
                result: if success { "success" } else { "failure" },
            })
            .inc();
    }

    /// Publishes the state of a bundle that rendered successfully at `now`:
    /// its certificates' series are those of `bundle` from here on.
    pub fn bundle_state(&self, name: &str, bundle: &Arc<Bundle>, now: i64) {
        let strict_refusals = bundle
            .anchors()
            .iter()
            .filter(|a| !a.strict.is_empty())
            .count();
        let published = Published {
            bundle: bundle.clone(),
            at: now,
            strict_refusals,
        };
        self.bundles.update(name, |s| s.published = Some(published));
    }

    /// The exposition in Prometheus's text format (see [`TEXT_CONTENT_TYPE`]).
    pub fn encode_text(&self) -> String {
        prometheus_text(&self.encode())
    }

    /// The OpenMetrics exposition (see [`CONTENT_TYPE`]).
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
        metrics.rendered("peers", Rendered::Changed);
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

    /// Each bundle's series, under the names, labels and types of the
    /// contract; a series appears once it has something to say.
    #[test]
    fn every_bundle_series_is_encoded_with_its_labels() {
        let metrics = Metrics::new();
        assert!(
            !metrics.encode().contains("bundle="),
            "no series before any render"
        );
        metrics.rendered("peers", Rendered::Changed);
        metrics.rendered("peers", Rendered::Unchanged);
        metrics.rendered("peers", Rendered::Unchanged);
        metrics.refused("peers", "min_certs");
        metrics.refused("peers", "min_certs");
        metrics.refused("web", "damaged");
        metrics.reload("peers", "signal", true);
        metrics.reload("peers", "signal", false);
        metrics.reload("peers", "signal", true);
        metrics.reload("peers", "exec", true);
        metrics.write_failed("web");
        let ca = anchor("Series A");
        let sha = crate::bundle::hex(&ca.sha256);
        metrics.bundle_state(
            "peers",
            &Arc::new(Bundle::new(vec![ca.clone()])),
            1_700_000_000,
        );
        let text = metrics.encode();
        for line in [
            "# HELP anchorage_renders Render passes by outcome.",
            "# TYPE anchorage_renders counter",
            "anchorage_renders_total{bundle=\"peers\",result=\"changed\"} 1",
            "anchorage_renders_total{bundle=\"peers\",result=\"unchanged\"} 2",
            "anchorage_renders_total{bundle=\"peers\",result=\"refused\"} 2",
            "anchorage_renders_total{bundle=\"web\",result=\"refused\"} 1",
            "# TYPE anchorage_refusals counter",
            "anchorage_refusals_total{bundle=\"peers\",reason=\"min_certs\"} 2",
            "anchorage_refusals_total{bundle=\"web\",reason=\"damaged\"} 1",
            "# TYPE anchorage_reloads counter",
            "anchorage_reloads_total{bundle=\"peers\",action=\"signal\",result=\"success\"} 2",
            "anchorage_reloads_total{bundle=\"peers\",action=\"signal\",result=\"failure\"} 1",
            "anchorage_reloads_total{bundle=\"peers\",action=\"exec\",result=\"success\"} 1",
            "# TYPE anchorage_bundle_certificates gauge",
            "anchorage_bundle_certificates{bundle=\"peers\"} 1",
            "# TYPE anchorage_bundle_strict_refusals gauge",
            &format!(
                "anchorage_bundle_strict_refusals{{bundle=\"peers\"}} {}",
                usize::from(!ca.strict.is_empty())
            ),
            "# TYPE anchorage_last_success_timestamp_seconds gauge",
            "anchorage_last_success_timestamp_seconds{bundle=\"peers\"} 1700000000",
            "# TYPE anchorage_output_write_failures counter",
            "anchorage_output_write_failures_total{bundle=\"web\"} 1",
            "# TYPE anchorage_certificate_not_after_seconds gauge",
            &format!(
                "anchorage_certificate_not_after_seconds{{bundle=\"peers\",subject=\"CN=Series A\",sha256=\"{sha}\"}} {}",
                ca.not_after
            ),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
        assert_eq!(metrics.reloads("peers", "signal", true), 2);
        assert_eq!(metrics.reloads("peers", "signal", false), 1);
        assert_eq!(metrics.reloads("web", "signal", true), 0);
        // A bundle that never published has no gauges.
        assert!(
            !text.contains("anchorage_bundle_certificates{bundle=\"web\""),
            "{text}"
        );
    }

    fn anchor(name: &str) -> crate::bundle::Anchor {
        anchor_until(name, None)
    }

    fn anchor_until(name: &str, not_after: Option<i64>) -> crate::bundle::Anchor {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        if let Some(t) = not_after {
            params.not_before =
                time::OffsetDateTime::from_unix_timestamp(t - 86_400).expect("time");
            params.not_after = time::OffsetDateTime::from_unix_timestamp(t).expect("time");
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        let block = crate::source::CertBlock::new(der, false);
        crate::bundle::Anchor::parse(&block, std::path::Path::new("/x.pem").into(), 0)
            .expect("parse")
    }

    #[test]
    fn openmetrics_goes_to_those_who_ask_and_prometheus_text_to_the_others() {
        for accept in [
            "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text",
            "text/plain, Application/OpenMetrics-Text;q=0.3",
        ] {
            assert!(wants_openmetrics(accept), "{accept}");
        }
        for accept in [
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4",
            "application/openmetrics-text;q=0, text/plain",
            "",
        ] {
            assert!(!wants_openmetrics(accept), "{accept}");
        }
        let metrics = Metrics::new();
        metrics.rendered("a", Rendered::Changed);
        metrics.reload("a", "signal", true);
        let text = metrics.encode_text();
        assert!(!text.contains("# EOF"), "{text}");
        for family in ["renders", "reloads", "watch_events", "reload_worker_panics"] {
            let name = format!("anchorage_{family}_total");
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{text}");
            assert!(text.contains(&format!("# HELP {name} ")), "{text}");
        }
        assert!(text.contains("anchorage_renders_total{bundle=\"a\",result=\"changed\"} 1\n"));
        // The samples are the same; only the counters' families are renamed.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&text), samples(&metrics.encode()));
    }

    #[test]
    fn only_the_names_configured_keep_or_start_series() {
        let metrics = Metrics::new();
        // Before the daemon says which names are configured, any counts.
        metrics.rendered("a", Rendered::Changed);
        metrics.rendered("b", Rendered::Changed);
        metrics.keep_only(["a", "c"]);
        let counted = |name: &str| {
            metrics
                .encode()
                .lines()
                .any(|l| l.contains(&format!("bundle=\"{name}\"")))
        };
        assert!(counted("a") && !counted("b"), "{}", metrics.encode());
        metrics.reload("b", "signal", true);
        metrics.refused("b", "parse");
        metrics.write_failed("b");
        assert!(!counted("b"), "{}", metrics.encode());
        metrics.reload("c", "signal", false);
        assert_eq!(metrics.reloads("c", "signal", false), 1);
        // Configured again: it counts afresh.
        metrics.keep_only(["a", "b", "c"]);
        metrics.reload("b", "signal", true);
        assert_eq!(metrics.reloads("b", "signal", true), 1);
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
        let publish = |anchors: Vec<crate::bundle::Anchor>| {
            metrics.bundle_state("peers", &Arc::new(Bundle::new(anchors)), 0);
        };
        publish(vec![a.clone(), b.clone()]);
        assert_eq!(series(&metrics), ["Series A", "Series B"]);
        publish(vec![b.clone(), c.clone()]);
        assert_eq!(series(&metrics), ["Series B", "Series C"]);
        publish(vec![a, b, c]);
        assert_eq!(series(&metrics), ["Series A", "Series B", "Series C"]);
        publish(Vec::new());
        assert!(series(&metrics).is_empty());
    }

    #[test]
    fn earliest_expiry_counts_down_from_the_scrape_not_the_render() {
        let metrics = Metrics::new();
        let now = unix_now();
        // Rendered long ago (at 0): the value must still be "from now".
        let soon = anchor_until("Soon", Some(now + 1_000));
        let later = anchor_until("Later", Some(now + 5_000));
        let publish = |name: &str, anchors: Vec<crate::bundle::Anchor>| {
            metrics.bundle_state(name, &Arc::new(Bundle::new(anchors)), 0);
        };
        publish("peers", vec![later, soon]);
        publish("old", vec![anchor_until("Old", Some(now - 50))]);
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
        assert_eq!(metrics.bundles.not_after("peers"), Some(now + 1_000));

        publish("old", Vec::new());
        assert!(
            !metrics
                .encode()
                .contains("anchorage_bundle_earliest_expiry_seconds{bundle=\"old\""),
        );
    }
}
