//! anchorage keeps a CA trust bundle fresh for the application beside it and
//! makes that application reload it, without ever handing it a broken bundle.
//!
//! # Layout
//!
//! The modules follow the data, in the order it flows:
//!
//! 1. [`config`]: flags, `ANCHORAGE_*` variables and the TOML file become one
//!    validated [`config::Config`]; nothing is read or written before it exists.
//! 2. [`source`]: each source (file, directory, kubelet volume, glob) is read
//!    into raw certificate blocks; PEM framing, DER, SPIFFE bundles (JSON),
//!    size limits, private keys skipped.
//! 3. [`bundle`]: blocks are parsed into [`bundle::Anchor`]s, the policy keeps
//!    CAs that are still valid, dedupes by SHA-256 and orders them, giving a
//!    [`bundle::Bundle`] or a [`bundle::Refusal`].
//! 4. [`output`]: a bundle is rendered in each requested format and published
//!    atomically (temporary file + rename, or a whole-directory swap).
//! 5. [`reload`]: signal, exec, HTTP and child restarts, one worker per
//!    action, after every output is in place; retries with backoff.
//! 6. [`watch`] and [`daemon`]: inotify on the source directories, debounced
//!    into render cycles; expiry timers; SIGHUP re-reads the config.
//!
//! [`render`] is one pass of 2 to 4, as the `render` command runs it;
//! [`check`] inspects certificates for people and scripts; [`telemetry`]
//! holds logs and metrics.

pub mod bundle;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod keypair;
pub mod output;
pub mod parallel;
pub mod reload;
pub mod render;
pub mod source;
pub mod telemetry;
pub mod watch;
