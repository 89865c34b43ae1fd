//! The validated configuration: flags, their `ANCHORAGE_*` variables and the
//! TOML file merged into one [`Config`] (a flag, then its variable, then the
//! file, then the default), checked before anything is read or written.
//!
//! Every error is a [`ConfigError`] naming the file, line and key (or the
//! flag): the process exits 2 on it, at start, and never later.

mod file;
mod keypair;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::Spanned;

use crate::bundle::Policy;
use crate::cli::{Flags, LogFormat};
use crate::output::{Format, OutputSpec};
use crate::reload::spec::{self, At, Draft};
pub use crate::reload::spec::{
    DEFAULT_PROBE_TIMEOUT, DEFAULT_RELOAD_TIMEOUT, Probe, ReloadAction, ReloadSpec, SignalTarget,
    parse_signal,
};
use crate::source::Source;
use file::{Command, RawBundle, RawDaemon, RawFile, RawReload};
pub use keypair::{
    DEFAULT_KEY_MODE, KeyMaterial, KeyPairConfig, SPLIT_CERT, SPLIT_CERT_MODE, SPLIT_KEY, SplitDir,
};

pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);
pub const DEFAULT_MODE: u32 = 0o644;
/// The bundle (and key pair) made from flags alone.
pub const FLAG_BUNDLE: &str = "default";

#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, re-read on SIGHUP.
    pub path: Option<PathBuf>,
    pub daemon: Daemon,
    /// Shared with each bundle's render state: the daemon keeps one copy
    /// of a bundle's configuration, not one here and one per state.
    pub bundles: Vec<Arc<BundleConfig>>,
    pub keypairs: Vec<KeyPairConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Daemon {
    pub debounce: Duration,
    pub debounce_max: Duration,
    /// `None`: never.
    pub resync: Option<Duration>,
    /// `Some(interval)`: poll instead of inotify.
    pub poll: Option<Duration>,
    pub listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BundleConfig {
    pub name: String,
    pub sources: Vec<Source>,
    pub retain_removed: Option<Duration>,
    pub verify: Vec<PathBuf>,
    pub policy: Policy,
    pub outputs: Vec<OutputSpec>,
    pub reloads: Vec<ReloadSpec>,
}

/// A configuration that cannot be used. Exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    /// The key (`bundle.sources`) or flag (`--source`) at fault.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where in the file a value sits, to build errors.
struct Origin<'a> {
    file: Option<&'a Path>,
    text: &'a str,
}

impl Origin<'_> {
    fn line(&self, offset: usize) -> Option<usize> {
        self.file?;
        let end = offset.min(self.text.len());
        Some(
            self.text.as_bytes()[..end]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1,
        )
    }

    fn error<T>(
        &self,
        span: Option<std::ops::Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            file: self.file.map(Path::to_path_buf),
            line: span.and_then(|s| self.line(s.start)),
            key: key.to_owned(),
            message: message.into(),
        })
    }
}

/// Whether the command that reads the configuration supervises a child,
/// which reloads may signal or restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Child {
    /// `run` without `-- CHILD`: a reload of the child is an error.
    Absent,
    /// `render`: the configuration of `run -- CHILD` is read as it is
    /// (a reload of the child finds none), and no reload of it is implied.
    NotYet,
    /// `run -- CHILD`: with no reload flag, the flags' bundle signals it.
    Supervised,
}

impl Child {
    /// Whether a reload may name the child.
    fn allowed(self) -> bool {
        self != Self::Absent
    }
}

impl Config {
    /// Builds the configuration from flags (with their variables) and the
    /// file they name, for a command with `child`.
    pub fn load(flags: &Flags, child: Child) -> Result<Self, ConfigError> {
        let (raw, text) = match &flags.config {
            Some(path) => {
                let text = read_config(path).map_err(|message| ConfigError {
                    file: Some(path.clone()),
                    line: None,
                    key: "--config".into(),
                    message,
                })?;
                (parse_file(path, &text)?, text)
            }
            None => (
                RawFile {
                    daemon: None,
                    bundle: Vec::new(),
                    keypair: Vec::new(),
                },
                String::new(),
            ),
        };
        let origin = Origin {
            file: flags.config.as_deref(),
            text: &text,
        };
        build(flags, raw, &origin, child)
    }
}

/// A config file is small: anything over this is a mistake (`/dev/zero`).
pub const MAX_CONFIG_SIZE: u64 = 1024 * 1024;

/// Reads the config file: a regular file of at most [`MAX_CONFIG_SIZE`]
/// bytes, never opened in a way that blocks (a FIFO), re-read on SIGHUP.
pub fn read_config(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let file = crate::source::open_nonblocking(path).map_err(|e| format!("cannot read: {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("cannot read: not a regular file".into());
    }
    if meta.len() > MAX_CONFIG_SIZE {
        return Err(format!(
            "{} bytes is over the {MAX_CONFIG_SIZE}-byte limit for a config file",
            meta.len()
        ));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > MAX_CONFIG_SIZE {
        return Err(format!(
            "over the {MAX_CONFIG_SIZE}-byte limit for a config file"
        ));
    }
    Ok(text)
}

/// The `[daemon] log_format` of the file at `path`, for a configuration
/// error found in it: the error is logged as the file asks, whatever else
/// in it is wrong (`None` where the file cannot be read or is no TOML).
pub fn file_log_format(path: &Path) -> Option<LogFormat> {
    #[derive(serde::Deserialize)]
    struct Peek {
        daemon: Option<PeekDaemon>,
    }
    #[derive(serde::Deserialize)]
    struct PeekDaemon {
        log_format: Option<LogFormat>,
    }
    let text = read_config(path).ok()?;
    toml::from_str::<Peek>(&text).ok()?.daemon?.log_format
}

fn parse_file(path: &Path, text: &str) -> Result<RawFile, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let origin = Origin {
            file: Some(path),
            text,
        };
        let line = e.span().and_then(|s| origin.line(s.start));
        // The key is the start of the offending line, up to `=`.
        let key = line
            .and_then(|l| text.lines().nth(l - 1))
            .map(|l| l.split('=').next().unwrap_or("").trim().to_owned())
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "config".into());
        ConfigError {
            file: Some(path.to_path_buf()),
            line,
            key,
            message: e.message().to_owned(),
        }
    })
}

fn build(
    flags: &Flags,
    raw: RawFile,
    origin: &Origin<'_>,
    child: Child,
) -> Result<Config, ConfigError> {
    let has_child = child.allowed();
    let daemon = daemon(flags, raw.daemon.unwrap_or_default(), origin)?;
    let (flag_reloads, implied) = flag_reloads(flags, child)?;

    let mut bundles = Vec::new();
    // The first bundle flag given, named in the error below.
    let bundle_flag = [
        (!flags.sources.is_empty(), "--source"),
        (!flags.outputs.is_empty(), "--output"),
        (!flags.hashed_dirs.is_empty(), "--hashed-dir"),
        (flags.retain_removed.is_some(), "--retain-removed"),
        (!flags.verify.is_empty(), "--verify"),
        (flags.allow_expired.is_some(), "--allow-expired"),
        (flags.allow_non_ca.is_some(), "--allow-non-ca"),
        (flags.min_certs.is_some(), "--min-certs"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag));
    if let (true, Some(flag)) = (raw.bundle.len() > 1, bundle_flag) {
        let variable = format!(
            "ANCHORAGE_{}",
            flag.trim_start_matches('-')
                .replace('-', "_")
                .to_uppercase()
        );
        return origin.error(
            None,
            flag,
            format!(
                "bundle flags apply to a single bundle, but the config has several [[bundle]] \
                 tables (given on the command line or as {variable})"
            ),
        );
    }
    // Where each name and output was written, for the duplicate checks.
    let mut name_spans: Vec<Option<std::ops::Range<usize>>> = Vec::new();
    let mut output_spans: Vec<Vec<std::ops::Range<usize>>> = Vec::new();
    for b in &raw.bundle {
        name_spans.push(b.get_ref().name.as_ref().map(Spanned::span));
        output_spans.push(b.get_ref().output.iter().map(Spanned::span).collect());
    }
    let pair_spans: Vec<Option<std::ops::Range<usize>>> = raw
        .keypair
        .iter()
        .map(|k| k.get_ref().name.as_ref().map(Spanned::span))
        .collect();
    let keypair_split_spans: Vec<Option<std::ops::Range<usize>>> = raw
        .keypair
        .iter()
        .map(|k| k.get_ref().split_dir.as_ref().map(Spanned::span))
        .collect();
    let chain_spans: Vec<Option<std::ops::Range<usize>>> = raw
        .keypair
        .iter()
        .map(|k| k.get_ref().chain_to.as_ref().map(Spanned::span))
        .collect();
    for (i, spanned) in raw.bundle.into_iter().enumerate() {
        let span = spanned.span();
        let overrides = bundle_flag.map(|_| flags);
        bundles.push(bundle(
            i,
            spanned.into_inner(),
            span,
            overrides,
            origin,
            has_child,
        )?);
    }
    if bundles.is_empty() && bundle_flag.is_some() {
        if flags.sources.is_empty() {
            return origin.error(
                None,
                "--source",
                "bundle flags were given without any --source",
            );
        }
        let raw = RawBundle {
            name: Some(Spanned::new(0..0, FLAG_BUNDLE.into())),
            sources: Vec::new(),
            retain_removed: None,
            verify: Vec::new(),
            min_certs: None,
            allow_expired: None,
            allow_non_ca: None,
            output: Vec::new(),
            reload: Vec::new(),
        };
        bundles.push(bundle(0, raw, 0..0, Some(flags), origin, has_child)?);
    }
    // Reload flags serve the flags' (or the single) bundle; the child a
    // reload is only implied for serves one that names none of its own.
    if let [only] = bundles.as_mut_slice()
        && !flag_reloads.is_empty()
        && (!implied || only.reloads.is_empty())
    {
        only.reloads = flag_reloads.clone();
    }

    let mut keypairs = Vec::new();
    for (i, spanned) in raw.keypair.into_iter().enumerate() {
        let span = spanned.span();
        keypairs.push(keypair::from_raw(
            i,
            spanned.into_inner(),
            span,
            origin,
            has_child,
        )?);
    }
    keypairs.extend(keypair::from_flags(flags, &flag_reloads)?);

    if bundles.is_empty() && keypairs.is_empty() {
        return origin.error(
            None,
            "--source",
            "nothing to do: give --source, --cert/--key, --credential-bundle, or a --config with [[bundle]] or [[keypair]]",
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, name) in bundles.iter().map(|b| &b.name).enumerate() {
        if !names.insert(name.clone()) {
            return origin.error(
                name_spans.get(i).cloned().flatten(),
                "bundle.name",
                format!("the name {name:?} is used twice"),
            );
        }
    }
    let mut pair_names = std::collections::HashSet::new();
    for (i, pair) in keypairs.iter().enumerate() {
        if !pair_names.insert(pair.name.clone()) {
            return origin.error(
                pair_spans.get(i).cloned().flatten(),
                "keypair.name",
                format!("the name {:?} is used twice", pair.name),
            );
        }
        if let Some(chain) = &pair.chain_to
            && !names.contains(chain)
        {
            return origin.error(
                chain_spans.get(i).cloned().flatten(),
                "keypair.chain_to",
                format!("no bundle is named {chain:?}"),
            );
        }
    }
    // Two outputs at one path: the last render would win and the other
    // bundle's CAs would vanish without a word.
    // However spelled (`./x.pem`, `x.pem`, its absolute path).
    let cwd = std::env::current_dir().ok();
    let mut paths: std::collections::HashMap<PathBuf, String> = std::collections::HashMap::new();
    for (b, bundle) in bundles.iter().enumerate() {
        for (o, out) in bundle.outputs.iter().enumerate() {
            let span = output_spans.get(b).and_then(|s| s.get(o)).cloned();
            let owner = format!("bundle {:?}", bundle.name);
            if let Some(first) = paths.insert(normal(&out.path, cwd.as_deref()), owner.clone()) {
                let key = if span.is_some() {
                    "bundle.output.path"
                } else {
                    "--output"
                };
                return origin.error(
                    span,
                    key,
                    format!(
                        "{} is already an output of {first}; two outputs cannot share a path",
                        out.path.display()
                    ),
                );
            }
        }
    }
    // A split directory is an output too, and so are the two files in it.
    for (k, pair) in keypairs.iter().enumerate() {
        let Some(split) = &pair.split else { continue };
        let span = keypair_split_spans.get(k).cloned().flatten();
        let owner = format!("key pair {:?}", pair.name);
        for path in [split.dir.clone(), split.cert(), split.key()] {
            if let Some(first) = paths.insert(normal(&path, cwd.as_deref()), owner.clone()) {
                let key = if span.is_some() {
                    "keypair.split_dir"
                } else {
                    "--split-dir"
                };
                return origin.error(
                    span,
                    key,
                    format!(
                        "{} is already an output of {first}; two outputs cannot share a path",
                        path.display()
                    ),
                );
            }
        }
    }
    // Not `collect()`: it would map in place and keep the list's buffer,
    // sized for the bundles themselves (150 KB at a thousand), for the
    // daemon's life.
    let mut shared = Vec::with_capacity(bundles.len());
    shared.extend(bundles.into_iter().map(Arc::new));
    Ok(Config {
        path: origin.file.map(Path::to_path_buf),
        daemon,
        bundles: shared,
        keypairs,
    })
}

/// `path` as the outputs' duplicate check compares it: absolute (from the
/// working directory `cwd`, where a relative output is written), without
/// `.` components or a trailing slash, `..` taken back a component (spelled
/// `dir/../x`, `x` is meant, whatever `dir` links to).
fn normal(path: &Path, cwd: Option<&Path>) -> PathBuf {
    use std::path::Component;
    let absolute = match cwd {
        Some(cwd) if path.is_relative() => cwd.join(path),
        _ => path.to_path_buf(),
    };
    let mut out = PathBuf::new();
    for component in absolute.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

fn daemon(flags: &Flags, raw: RawDaemon, origin: &Origin<'_>) -> Result<Daemon, ConfigError> {
    let debounce = flags
        .debounce
        .or(raw.debounce.map(|d| d.0))
        .unwrap_or(DEFAULT_DEBOUNCE);
    let debounce_max = flags
        .debounce_max
        .or(raw.debounce_max.map(|d| d.0))
        .unwrap_or_else(|| (debounce * 10).max(Duration::from_secs(2)));
    let resync = flags
        .resync
        .or(raw.resync.map(|d| d.0))
        .unwrap_or(DEFAULT_RESYNC);
    let poll_span = raw
        .poll
        .as_ref()
        .map(Spanned::span)
        .filter(|_| flags.poll.is_none());
    let poll = flags.poll.or(raw.poll.map(|d| d.into_inner().0));
    if poll == Some(Duration::ZERO) {
        return origin.error(
            poll_span,
            "daemon.poll",
            "the poll interval must be above zero",
        );
    }
    let listen = match (flags.listen, raw.listen) {
        (Some(addr), _) => Some(addr),
        (None, Some(text)) => match text.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(e) => {
                return origin.error(
                    Some(text.span()),
                    "daemon.listen",
                    format!("{:?}: {e}", text.get_ref()),
                );
            }
        },
        (None, None) => None,
    };
    Ok(Daemon {
        debounce,
        debounce_max,
        resync: (!resync.is_zero()).then_some(resync),
        poll,
        listen,
        log_format: flags.log_format.or(raw.log_format).unwrap_or_default(),
        state_dir: flags.state_dir.clone().or(raw.state_dir),
    })
}

fn bundle(
    index: usize,
    raw: RawBundle,
    span: std::ops::Range<usize>,
    flags: Option<&Flags>,
    origin: &Origin<'_>,
    has_child: bool,
) -> Result<BundleConfig, ConfigError> {
    if let Some(name) = raw.name.as_ref().filter(|n| n.get_ref().trim().is_empty()) {
        // It labels metrics and logs, and names the bundle's state file.
        return origin.error(Some(name.span()), "bundle.name", "must not be empty");
    }
    let name = raw
        .name
        .as_ref()
        .map_or_else(|| format!("bundle{index}"), |n| n.get_ref().clone());
    // Sized exactly: a thousand bundles keep a thousand of each list.
    let mut sources = Vec::with_capacity(raw.sources.len());
    for spec in &raw.sources {
        sources.push(parse_source(
            spec.get_ref(),
            origin,
            Some(spec.span()),
            "bundle.sources",
        )?);
    }
    let mut outputs = Vec::with_capacity(raw.output.len());
    for out in raw.output {
        if out.get_ref().path.as_os_str().is_empty() {
            return origin.error(
                Some(out.span()),
                "bundle.output.path",
                "an output path is empty; name a file or a directory",
            );
        }
        let out = out.into_inner();
        let format = match &out.format {
            None => Format::Pem,
            Some(f) => match Format::parse(
                f.get_ref(),
                out.password.as_ref().map(|p| p.get_ref().clone()),
            ) {
                Some(format) => format,
                None => {
                    return origin.error(
                        Some(f.span()),
                        "bundle.output.format",
                        format!(
                            "unknown format {:?}; expected {}",
                            f.get_ref(),
                            Format::NAMES
                        ),
                    );
                }
            },
        };
        let mode = match &out.mode {
            None => DEFAULT_MODE,
            Some(m) => parse_mode(m.get_ref())
                .or_else(|e| origin.error(Some(m.span()), "bundle.output.mode", e))?,
        };
        if let Some(password) = out.password.as_ref().filter(|_| !format.has_password()) {
            return origin.error(
                Some(password.span()),
                "bundle.output.password",
                format!(
                    "a password applies to pkcs12 and jks outputs, not {}",
                    format.name()
                ),
            );
        }
        outputs.push(OutputSpec {
            path: out.path,
            format,
            mode,
        });
    }
    let mut reloads = Vec::with_capacity(raw.reload.len());
    for r in raw.reload {
        let r_span = r.span();
        reloads.push(reload(
            r.into_inner(),
            r_span,
            origin,
            "bundle.reload",
            has_child,
        )?);
    }
    let mut config = BundleConfig {
        name,
        sources,
        retain_removed: raw.retain_removed.map(|d| d.0),
        verify: raw.verify,
        policy: Policy {
            allow_expired: raw.allow_expired.unwrap_or(false),
            allow_non_ca: raw.allow_non_ca.unwrap_or(false),
            min_certs: raw.min_certs.unwrap_or(1),
        },
        outputs,
        reloads,
    };
    if let Some(flags) = flags {
        apply_bundle_flags(&mut config, flags, origin)?;
    }
    if config.sources.is_empty() {
        let key = if flags.is_some() && origin.file.is_none() {
            "--source"
        } else {
            "bundle.sources"
        };
        return origin.error(
            Some(span),
            key,
            format!("bundle {:?} has no source", config.name),
        );
    }
    Ok(config)
}

fn apply_bundle_flags(
    config: &mut BundleConfig,
    flags: &Flags,
    origin: &Origin<'_>,
) -> Result<(), ConfigError> {
    if !flags.sources.is_empty() {
        config.sources = flags
            .sources
            .iter()
            .map(|s| parse_source(s, origin, None, "--source"))
            .collect::<Result<_, _>>()?;
    }
    if !flags.outputs.is_empty() || !flags.hashed_dirs.is_empty() {
        config.outputs = flags
            .outputs
            .iter()
            .map(|p| (p, Format::Pem))
            .chain(flags.hashed_dirs.iter().map(|p| (p, Format::OpensslDir)))
            .map(|(path, format)| OutputSpec {
                path: path.clone(),
                format,
                mode: DEFAULT_MODE,
            })
            .collect();
    }
    if flags.retain_removed.is_some() {
        config.retain_removed = flags.retain_removed;
    }
    if !flags.verify.is_empty() {
        config.verify = flags.verify.clone();
    }
    // Either way: a flag (or its variable) set to false overrides the
    // file's true, as a flag overrides any key.
    if let Some(allow) = flags.allow_expired {
        config.policy.allow_expired = allow;
    }
    if let Some(allow) = flags.allow_non_ca {
        config.policy.allow_non_ca = allow;
    }
    if let Some(n) = flags.min_certs {
        config.policy.min_certs = n;
    }
    Ok(())
}

fn parse_source(
    spec: &str,
    origin: &Origin<'_>,
    span: Option<std::ops::Range<usize>>,
    key: &str,
) -> Result<Source, ConfigError> {
    if spec.trim().is_empty() {
        return origin.error(span, key, "an empty source path");
    }
    Source::parse(spec).or_else(|e| origin.error(span, key, format!("bad glob {spec:?}: {e}")))
}

fn parse_mode(text: &str) -> Result<u32, String> {
    // Octal digits only, as chmod takes them: "0644", "644", "0600".
    let digits =
        !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mode) if digits && mode <= 0o7777 => Ok(mode),
        _ => Err(format!(
            "{text:?} is not an octal file mode such as \"0644\""
        )),
    }
}

fn reload(
    raw: RawReload,
    span: std::ops::Range<usize>,
    origin: &Origin<'_>,
    key: &str,
    has_child: bool,
) -> Result<ReloadSpec, ConfigError> {
    let at = |s: Spanned<String>| At::new(s.get_ref().clone(), Some(s.span()));
    let draft = Draft {
        signal: raw.signal.map(at),
        pid_file: raw
            .pid_file
            .map(|p| At::new(p.get_ref().into(), Some(p.span()))),
        process: raw.process.map(at),
        child: raw.child == Some(true),
        restart_child: raw.restart_child == Some(true),
        exec: raw.exec.map(|e| {
            let span = e.span();
            let command = match e.into_inner() {
                Command::Argv(argv) => spec::Command::Argv(argv),
                Command::Line(line) => spec::Command::Line(line),
            };
            At::new(command, Some(span))
        }),
        http: raw.http.map(at),
        method: raw.method.map(at),
        bearer_token_file: raw
            .bearer_token_file
            .map(|p| At::new(p.get_ref().into(), Some(p.span()))),
        touch: raw
            .touch
            .map(|p| At::new(p.get_ref().into(), Some(p.span()))),
        timeout: raw.timeout.map(|d| d.0),
        retries: raw.retries,
        probe: raw.probe.map(at),
        probe_timeout: raw.probe_timeout.map(|d| d.0),
        min_interval: raw.min_interval.map(|d| d.0),
        span: Some(span),
    };
    spec::build(draft, has_child)
        .or_else(|e| origin.error(e.span, &format!("{key}.{}", e.field), e.message))
}

/// The reload actions the flags describe, one draft per target, built by
/// the same [`spec::build`] as the file's.
/// The reload actions the flags give, and whether they are only the one
/// implied (`run -- CHILD` with no reload flag: signal the child).
fn flag_reloads(flags: &Flags, child: Child) -> Result<(Vec<ReloadSpec>, bool), ConfigError> {
    let has_child = child.allowed();
    let no_file = Origin {
        file: None,
        text: "",
    };
    let signal = flags.signal.clone().map(|s| At::new(s, None));
    let with_signal = |draft: Draft| Draft {
        signal: signal.clone(),
        ..draft
    };
    let mut drafts: Vec<(&str, Draft)> = Vec::new();
    if let Some(pid_file) = &flags.pid_file {
        let pid_file = Some(At::new(pid_file.clone(), None));
        drafts.push((
            "--pid-file",
            with_signal(Draft {
                pid_file,
                ..Draft::default()
            }),
        ));
    }
    if let Some(process) = &flags.process {
        let process = Some(At::new(process.clone(), None));
        drafts.push((
            "--process",
            with_signal(Draft {
                process,
                ..Draft::default()
            }),
        ));
    }
    // The variable is a comma-separated list; a flag keeps its commas.
    let from_env: Vec<String> = match std::env::var("ANCHORAGE_EXEC") {
        Ok(list) if flags.execs.is_empty() => list
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    for line in flags.execs.iter().chain(&from_env) {
        let exec = Some(At::new(spec::Command::Line(line.clone()), None));
        drafts.push((
            "--exec",
            Draft {
                exec,
                ..Draft::default()
            },
        ));
    }
    for url in &flags.https {
        let http = Some(At::new(url.clone(), None));
        drafts.push((
            "--http",
            Draft {
                http,
                ..Draft::default()
            },
        ));
    }
    for file in &flags.touches {
        let touch = Some(At::new(file.clone(), None));
        drafts.push((
            "--touch",
            Draft {
                touch,
                ..Draft::default()
            },
        ));
    }
    let mut implied = false;
    if flags.restart_child {
        let draft = Draft {
            restart_child: true,
            ..Draft::default()
        };
        drafts.push(("--restart-child", draft));
    } else if child == Child::Supervised && flags.pid_file.is_none() && flags.process.is_none() {
        // A supervised child is the natural target of --signal.
        implied = drafts.is_empty() && signal.is_none();
        drafts.push((
            "--signal",
            with_signal(Draft {
                child: true,
                ..Draft::default()
            }),
        ));
    }
    if signal.is_some() && !drafts.iter().any(|(_, d)| d.signal.is_some()) {
        return no_file.error(
            None,
            "--signal",
            "--signal needs --pid-file, --process or a child to send it to",
        );
    }
    let specs = drafts
        .into_iter()
        .map(|(flag, draft)| {
            spec::build(draft, has_child).or_else(|e| {
                let flag = match e.field {
                    "signal" => "--signal",
                    _ => flag,
                };
                no_file.error(None, flag, e.message)
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((specs, implied))
}
