//! The command line: commands and flags, each flag with its `ANCHORAGE_*`
//! variable. These are raw values; [`crate::config`] validates and merges
//! them with the config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "anchorage",
    version,
    about = "Keeps a CA trust bundle fresh for the application beside it, and makes it reload"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Render, then watch the sources and render and reload on every real change.
    Run(RunArgs),
    /// Render once: read, validate, write the outputs, and exit.
    Render(RenderArgs),
    /// Inspect certificate files, bundles or directories.
    Check(CheckArgs),
    /// Ask a running daemon's listener whether it is ready (exit 0) or not (1).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub flags: Flags,
    /// A child process to start after the first render and supervise.
    #[arg(last = true, value_name = "CHILD")]
    pub child: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub flags: Flags,
    /// Run the reload actions of every output that changed.
    #[arg(long, env = "ANCHORAGE_RELOAD", value_parser = BoolishValueParser::new())]
    pub reload: bool,
    /// Read and validate everything, print per output whether it would
    /// change, write nothing and reload nothing.
    #[arg(
        long,
        env = "ANCHORAGE_DRY_RUN",
        value_parser = BoolishValueParser::new(),
        conflicts_with = "reload"
    )]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print one JSON array with an object per certificate.
    #[arg(long, env = "ANCHORAGE_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// Exit 1 if a strict verifier (openssl verify -x509_strict, Python 3.13)
    /// would refuse a CA.
    #[arg(long, env = "ANCHORAGE_STRICT", value_parser = BoolishValueParser::new())]
    pub strict: bool,
    /// Judge expiry at this time (RFC 3339) and exit 1 if a certificate is expired then.
    #[arg(long, env = "ANCHORAGE_AT", value_name = "RFC3339", value_parser = parse_rfc3339)]
    pub at: Option<time::OffsetDateTime>,
    /// Files, bundles or directories.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Log format for errors on stderr: text or json.
    #[arg(long, env = "ANCHORAGE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The daemon's listen address (an unspecified host such as 0.0.0.0
    /// means loopback).
    #[arg(long, env = "ANCHORAGE_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Take the address from this config file's [daemon] listen.
    #[arg(long, env = "ANCHORAGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Ask /healthz (the event loop answers) instead of /readyz (every
    /// bundle rendered once).
    #[arg(long, env = "ANCHORAGE_LIVE", value_parser = BoolishValueParser::new())]
    pub live: bool,
    /// Log format for errors on stderr: text or json.
    #[arg(long, env = "ANCHORAGE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// The flags shared by `run` and `render`: one bundle, no config file needed.
#[derive(Debug, Default, Args)]
pub struct Flags {
    /// A TOML file describing bundles, key pairs and the daemon.
    #[arg(long, env = "ANCHORAGE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A file, a directory or a glob of certificates (repeatable).
    #[arg(
        long = "source",
        env = "ANCHORAGE_SOURCE",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub sources: Vec<String>,
    /// A certificate whose key pair is watched and checked.
    #[arg(long, env = "ANCHORAGE_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, env = "ANCHORAGE_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A key pair from one PEM file: the private key and the chain, leaf
    /// first (a podCertificate volume's credentialBundlePath).
    #[arg(
        long,
        env = "ANCHORAGE_CREDENTIAL_BUNDLE",
        value_name = "FILE",
        conflicts_with_all = ["cert", "key"]
    )]
    pub credential_bundle: Option<PathBuf>,
    /// Write the key pair's accepted chain and key there as tls.crt and
    /// tls.key, in kubelet's layout, before its reload.
    #[arg(long, env = "ANCHORAGE_SPLIT_DIR", value_name = "DIR")]
    pub split_dir: Option<PathBuf>,
    /// The mode of tls.key in --split-dir [default: 0600].
    #[arg(
        long,
        env = "ANCHORAGE_KEY_MODE",
        value_name = "MODE",
        requires = "split_dir"
    )]
    pub key_mode: Option<String>,
    /// Write a PEM bundle there (repeatable).
    #[arg(
        long = "output",
        env = "ANCHORAGE_OUTPUT",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub outputs: Vec<PathBuf>,
    /// Write an OpenSSL hashed directory there (repeatable).
    #[arg(
        long = "hashed-dir",
        env = "ANCHORAGE_HASHED_DIR",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub hashed_dirs: Vec<PathBuf>,
    /// Signal to send on reload [default: HUP].
    #[arg(long, env = "ANCHORAGE_SIGNAL", value_name = "NAME")]
    pub signal: Option<String>,
    /// Reload target: the pid in FILE, read afresh each time.
    #[arg(long, env = "ANCHORAGE_PID_FILE", value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Reload target: every process with this name (comm or argv[0] basename).
    #[arg(long, env = "ANCHORAGE_PROCESS", value_name = "NAME")]
    pub process: Option<String>,
    /// Reload by running CMD, split like a shell splits words (repeatable)
    /// [env: ANCHORAGE_EXEC=, a comma-separated list]. On the command line
    /// a comma is part of the command.
    #[arg(long = "exec", value_name = "CMD")]
    pub execs: Vec<String>,
    /// Reload by an HTTP POST to URL (repeatable).
    #[arg(
        long = "http",
        env = "ANCHORAGE_HTTP",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub https: Vec<String>,
    /// Reload by updating FILE's modification time, never creating it
    /// (repeatable): the poke for apps that watch their own config file.
    #[arg(
        long = "touch",
        env = "ANCHORAGE_TOUCH",
        value_name = "FILE",
        value_delimiter = ','
    )]
    pub touches: Vec<PathBuf>,
    /// Reload a supervised child by restarting it instead of signalling it.
    #[arg(long, env = "ANCHORAGE_RESTART_CHILD", value_parser = BoolishValueParser::new())]
    pub restart_child: bool,
    /// Wait this long after the last event before acting [default: 200ms].
    #[arg(long, env = "ANCHORAGE_DEBOUNCE", value_name = "DURATION", value_parser = parse_duration)]
    pub debounce: Option<Duration>,
    /// Act at least this often under endless churn [default: 10 x debounce, at least 2s].
    #[arg(long, env = "ANCHORAGE_DEBOUNCE_MAX", value_name = "DURATION", value_parser = parse_duration)]
    pub debounce_max: Option<Duration>,
    /// Re-read all sources this often even with no event; 0 = never [default: 5m].
    #[arg(long, env = "ANCHORAGE_RESYNC", value_name = "DURATION", value_parser = parse_duration)]
    pub resync: Option<Duration>,
    /// Poll at this interval instead of using inotify (NFS, FUSE).
    #[arg(long, env = "ANCHORAGE_POLL", value_name = "DURATION", value_parser = parse_duration)]
    pub poll: Option<Duration>,
    /// Keep a CA that vanished from the sources this long.
    #[arg(long, env = "ANCHORAGE_RETAIN_REMOVED", value_name = "DURATION", value_parser = parse_duration)]
    pub retain_removed: Option<Duration>,
    /// Refuse a bundle under which this certificate no longer chains (repeatable).
    #[arg(
        long = "verify",
        env = "ANCHORAGE_VERIFY",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub verify: Vec<PathBuf>,
    /// Keep expired certificates (`=false`, or the variable set to false,
    /// overrides a config file's `true`).
    #[arg(
        long,
        env = "ANCHORAGE_ALLOW_EXPIRED",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub allow_expired: Option<bool>,
    /// Keep certificates that are not CAs (`=false` as above).
    #[arg(
        long,
        env = "ANCHORAGE_ALLOW_NON_CA",
        value_parser = BoolishValueParser::new(),
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub allow_non_ca: Option<bool>,
    /// Refuse a bundle with fewer certificates [default: 1].
    #[arg(long, env = "ANCHORAGE_MIN_CERTS", value_name = "N")]
    pub min_certs: Option<usize>,
    /// Where retained CAs and the last-good record live.
    #[arg(long, env = "ANCHORAGE_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "ANCHORAGE_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Log format; the level comes from RUST_LOG [default: text].
    #[arg(long, env = "ANCHORAGE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A humantime duration (`250ms`, `30s`, `5m`, `72h`); `0` is allowed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}): expected e.g. 250ms, 30s, 5m, 72h"))
}

fn parse_rfc3339(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("invalid RFC 3339 time {s:?}: {e}"))
}
