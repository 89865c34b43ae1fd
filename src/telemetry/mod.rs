//! What operators see: logs, metrics, health endpoints and systemd notify.

pub mod health_check;
pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use crate::cli::LogFormat;

/// Starts logging to stderr: text for people, JSON for machines, the level
/// from `RUST_LOG` (default `info`).
pub fn init_logs(format: LogFormat) {
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
