//! anchorage keeps a CA trust bundle fresh for the application beside it and
//! makes that application reload it, without ever handing it a broken bundle.
//!
//! # Layout
//!
//! The modules follow the data, in the order it flows (ARCHITECTURE.md says
//! what each owns and must never do, and where each guarantee is kept):
//!
//! 1. [`config`]: flags, `ANCHORAGE_*` variables and the TOML file become one
//!    validated [`config::Config`]; nothing is read or written before it exists.
//! 2. [`source`]: each source (file, directory, kubelet volume, glob) is read
//!    into raw certificate blocks; PEM framing, DER, SPIFFE bundles (JSON),
//!    size limits, private keys skipped; never a FIFO or a device.
//! 3. [`bundle`]: blocks are parsed into [`bundle::Anchor`]s, the policy keeps
//!    CAs that are still valid, dedupes by SHA-256 and orders them, giving a
//!    [`bundle::Bundle`] or a [`bundle::Refusal`].
//! 4. [`output`]: a bundle is rendered in each requested format and published
//!    atomically (temporary file + rename, or a whole-directory swap).
//! 5. [`render`]: the one render path, 2 to 4 for a bundle, with what it
//!    keeps between renders; `anchorage render` and the daemon both run it.
//! 6. [`reload`]: signal, exec, HTTP, touch and child restarts, one worker
//!    per action, after every output is in place; retries with backoff.
//! 7. [`watch`] and [`daemon`]: inotify on the source directories, debounced
//!    into runs on the blocking pool; the event loop never blocks; expiry
//!    timers on [`clock`]; SIGHUP re-reads the config.
//!
//! [`keypair`] checks a server's own certificate and key; [`check`] inspects
//! certificates for people and scripts; [`telemetry`] holds logs, metrics,
//! health and systemd notify.

pub mod bundle;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod keypair;
pub mod memory;
pub mod output;
pub mod parallel;
pub mod reload;
pub mod render;
pub mod source;
pub mod telemetry;
pub mod watch;
