//! What operators see: logs, metrics, health endpoints and systemd notify.

pub mod health_check;
pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use std::sync::OnceLock;

use crate::cli::LogFormat;

/// The format chosen at start, for [`say`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// A command's last word on stderr: `anchorage: MESSAGE` for people, or an
/// ERROR line like every other in JSON mode (every stderr line is then
/// one JSON object).
pub fn say(message: &str) {
    match FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => eprintln!("anchorage: {message}"),
        LogFormat::Json => tracing::error!("{message}"),
    }
}

/// Starts logging to stderr: text for people, JSON for machines, the level
/// from `RUST_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
