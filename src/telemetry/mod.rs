//! What operators see: logs, metrics, health endpoints and systemd notify.

pub mod health_check;
pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::cli::LogFormat;

/// The format in use: chosen at start, changed by a SIGHUP that changes
/// `[daemon] log_format` ([`set_log_format`]).
static JSON: AtomicBool = AtomicBool::new(false);

/// Every line from now on is in `format`.
pub fn set_log_format(format: LogFormat) {
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
}

fn log_format() -> LogFormat {
    if JSON.load(Ordering::Relaxed) {
        LogFormat::Json
    } else {
        LogFormat::Text
    }
}

/// A command's last word on stderr: `anchorage: MESSAGE` for people, or an
/// ERROR line like every other in JSON mode (every stderr line is then
/// one JSON object).
pub fn say(message: &str) {
    match log_format() {
        LogFormat::Text => eprintln!("anchorage: {message}"),
        LogFormat::Json => tracing::error!("{message}"),
    }
}

/// Each line as text or as JSON, as [`set_log_format`] last said.
struct Switch {
    text: Format<Full>,
    json: Format<Json>,
}

impl<S, N> FormatEvent<S, N> for Switch
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        match log_format() {
            LogFormat::Text => self.text.format_event(context, writer, event),
            LogFormat::Json => self.json.format_event(context, writer, event),
        }
    }
}

/// Starts logging to stderr: text for people, JSON for machines, the level
/// from `RUST_LOG` (default `info`): a level, or `target=level` directives
/// separated by commas (`warn,anchorage::daemon=debug`). An unreadable
/// value means `info`.
///
/// `RUST_LOG` is read by tracing-subscriber's `Targets`, not its
/// `EnvFilter`: the latter compiles a regular expression to read it, and
/// the regex engine's code, touched once at start, stayed resident for
/// the daemon's whole life (span and field filters are not needed here).
pub fn init_logs(format: LogFormat) {
    set_log_format(format);
    let value = std::env::var("RUST_LOG").ok();
    let parsed = value.as_deref().and_then(log_filter);
    let unread = value.filter(|v| parsed.is_none() && !v.trim().is_empty());
    let filter = parsed.unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let _ = tracing_subscriber::fmt()
        .with_max_level(LevelFilter::TRACE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .event_format(Switch {
            text: Format::default(),
            json: Format::default().json(),
        })
        .finish()
        .with(filter)
        .try_init();
    if let Some(value) = unread {
        tracing::warn!(
            value,
            "RUST_LOG not understood (levels and target=level directives only); logging at info"
        );
    }
}

/// `RUST_LOG` as directives: `level`, `target` or `target=level`, separated
/// by commas. `None` (then `info`) for an empty value or one that is not
/// made of such directives (a span or field filter).
fn log_filter(value: &str) -> Option<Targets> {
    let target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    let directives: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let valid = !directives.is_empty()
        && directives.iter().all(|d| match d.split_once('=') {
            Some((t, level)) => target(t) && level.parse::<LevelFilter>().is_ok(),
            None => d.parse::<LevelFilter>().is_ok() || target(d),
        });
    valid.then(|| directives.join(",").parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_levels_and_targets_are_read_and_anything_else_means_info() {
        let info = |t: &Targets, target: &str| t.would_enable(target, &tracing::Level::INFO);
        let debug = |t: &Targets, target: &str| t.would_enable(target, &tracing::Level::DEBUG);
        let t = log_filter("debug").expect("a level");
        assert!(debug(&t, "anchorage::daemon"));
        let t = log_filter("warn, anchorage::daemon=debug").expect("directives");
        assert!(debug(&t, "anchorage::daemon") && !info(&t, "anchorage::render"));
        let t = log_filter("anchorage").expect("a target");
        assert!(debug(&t, "anchorage::watch") && !info(&t, "tokio"));
        for unreadable in ["", " , ", "garbage[[", "anchorage[span]=debug", "x=loud"] {
            assert!(log_filter(unreadable).is_none(), "{unreadable:?}");
        }
    }
}
