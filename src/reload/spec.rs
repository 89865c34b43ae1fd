//! What a reload action is and how it is run: [`ReloadSpec`], built by one
//! function, [`build`], from a [`Draft`] that the flags and the TOML file
//! both fill in. Every rule about a reload (one target each, a child only
//! under `run -- CHILD`, a valid URL, a process name that is a name) is
//! checked here, once, before anything runs.
//!
//! This module must never print a URL's credentials: every message names a
//! URL through [`redact`].

use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

pub const DEFAULT_RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One reload action and how it is run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReloadSpec {
    pub action: ReloadAction,
    /// Bounds each exec run or HTTP call.
    pub timeout: Duration,
    /// Retries after the first attempt; `None`: until a newer render supersedes.
    pub retries: Option<u32>,
    pub probe: Option<Probe>,
    pub probe_timeout: Duration,
    /// Two runs of this action are at least this far apart.
    pub min_interval: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReloadAction {
    Signal {
        signal: Signal,
        target: SignalTarget,
    },
    /// argv, run without a shell.
    Exec(Vec<String>),
    Http {
        url: String,
        method: String,
        /// `Authorization: Bearer <content>`, read afresh for each call.
        bearer_token_file: Option<PathBuf>,
    },
    /// Update the file's modification time (never create it).
    Touch(PathBuf),
    /// Restart the supervised child.
    RestartChild,
}

impl ReloadAction {
    /// The metrics `action` label.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Signal { .. } => "signal",
            Self::Exec(_) => "exec",
            Self::Http { .. } => "http",
            Self::Touch(_) => "touch",
            Self::RestartChild => "restart",
        }
    }

    /// Whether it acts on the child of `run -- CHILD`.
    pub fn targets_child(&self) -> bool {
        matches!(
            self,
            Self::RestartChild
                | Self::Signal {
                    target: SignalTarget::Child,
                    ..
                }
        )
    }
}

impl std::fmt::Display for ReloadAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Signal { signal, target } => write!(f, "signal {signal} to {target}"),
            Self::Exec(argv) => write!(f, "exec {argv:?}"),
            Self::Http { url, method, .. } => write!(f, "http {method} {}", redact(url)),
            Self::Touch(path) => write!(f, "touch {}", path.display()),
            Self::RestartChild => f.write_str("restart child"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SignalTarget {
    PidFile(PathBuf),
    Process(String),
    Child,
}

impl std::fmt::Display for SignalTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PidFile(path) => write!(f, "pid file {}", path.display()),
            Self::Process(name) => write!(f, "process {name:?}"),
            Self::Child => f.write_str("the child"),
        }
    }
}

/// How a reload is proven (guarantee 6).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// A TLS address that must serve the new certificate.
    Tls(String),
    /// An HTTP URL that must answer 2xx.
    Http(String),
}

impl std::fmt::Display for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tls(addr) => write!(f, "tls {addr}"),
            Self::Http(url) => write!(f, "http {}", redact(url)),
        }
    }
}

/// A value and where it was written (a byte range of the config file), so
/// that an error can name the line.
#[derive(Debug, Clone, Default)]
pub struct At<T> {
    pub value: T,
    pub span: Option<Range<usize>>,
}

impl<T> At<T> {
    pub fn new(value: T, span: Option<Range<usize>>) -> Self {
        Self { value, span }
    }
}

/// A command as written: an argv, or one line split like a shell splits words.
#[derive(Debug, Clone)]
pub enum Command {
    Argv(Vec<String>),
    Line(String),
}

/// One reload as written, by flags or in a `[[reload]]` table; [`build`]
/// checks it.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub signal: Option<At<String>>,
    pub pid_file: Option<At<PathBuf>>,
    pub process: Option<At<String>>,
    pub child: bool,
    pub restart_child: bool,
    pub exec: Option<At<Command>>,
    pub http: Option<At<String>>,
    pub method: Option<At<String>>,
    pub bearer_token_file: Option<At<PathBuf>>,
    pub touch: Option<At<PathBuf>>,
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub probe: Option<At<String>>,
    pub probe_timeout: Option<Duration>,
    pub min_interval: Option<Duration>,
    /// Where the whole reload was written (for "no target" errors).
    pub span: Option<Range<usize>>,
}

/// Why a draft is not a reload: the field at fault (`signal`, `http`, ...,
/// or `target`), where it was written, and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: &'static str,
    pub span: Option<Range<usize>>,
    pub message: String,
}

fn invalid<T>(
    field: &'static str,
    span: Option<Range<usize>>,
    message: String,
) -> Result<T, Invalid> {
    Err(Invalid {
        field,
        span,
        message,
    })
}

/// Checks a draft: `has_child` says whether `run -- CHILD` was given.
pub fn build(draft: Draft, has_child: bool) -> Result<ReloadSpec, Invalid> {
    let signal = match &draft.signal {
        Some(s) => Some(parse_signal(&s.value).or_else(|m| invalid("signal", s.span.clone(), m))?),
        None => None,
    };
    let sig = signal.unwrap_or(Signal::SIGHUP);
    let mut actions = Vec::new();
    if let Some(pid_file) = draft.pid_file {
        if pid_file.value.as_os_str().is_empty() {
            return invalid("pid_file", pid_file.span, "an empty path".into());
        }
        actions.push(ReloadAction::Signal {
            signal: sig,
            target: SignalTarget::PidFile(pid_file.value),
        });
    }
    if let Some(process) = draft.process {
        check_process(&process.value).or_else(|m| invalid("process", process.span, m))?;
        actions.push(ReloadAction::Signal {
            signal: sig,
            target: SignalTarget::Process(process.value),
        });
    }
    if draft.child {
        actions.push(ReloadAction::Signal {
            signal: sig,
            target: SignalTarget::Child,
        });
    }
    if draft.restart_child {
        actions.push(ReloadAction::RestartChild);
    }
    if let Some(exec) = draft.exec {
        let argv = match exec.value {
            Command::Argv(argv) if argv.first().is_some_and(|a| !a.is_empty()) => argv,
            Command::Argv(_) => return invalid("exec", exec.span, "an empty command".into()),
            Command::Line(line) => {
                split_command(&line).or_else(|m| invalid("exec", exec.span, m))?
            }
        };
        actions.push(ReloadAction::Exec(argv));
    }
    if let Some(url) = &draft.http {
        check_url(&url.value).or_else(|m| invalid("http", url.span.clone(), m))?;
        let method = match &draft.method {
            Some(m) => {
                check_method(&m.value).or_else(|e| invalid("method", m.span.clone(), e))?;
                m.value.to_ascii_uppercase()
            }
            None => "POST".into(),
        };
        actions.push(ReloadAction::Http {
            url: url.value.clone(),
            method,
            bearer_token_file: draft.bearer_token_file.clone().map(|f| f.value),
        });
    } else if let Some(m) = &draft.method {
        return invalid(
            "method",
            m.span.clone(),
            "a method applies to an http reload".into(),
        );
    }
    if let (None, Some(f)) = (&draft.http, &draft.bearer_token_file) {
        return invalid(
            "bearer_token_file",
            f.span.clone(),
            "a bearer token applies to an http reload".into(),
        );
    }
    if let Some(touch) = draft.touch {
        if touch.value.as_os_str().is_empty() {
            return invalid("touch", touch.span, "an empty path".into());
        }
        actions.push(ReloadAction::Touch(touch.value));
    }
    if let (Some(s), false) = (
        &draft.signal,
        actions
            .iter()
            .any(|a| matches!(a, ReloadAction::Signal { .. })),
    ) {
        return invalid(
            "signal",
            s.span.clone(),
            "a signal needs pid_file, process or child to send it to".into(),
        );
    }
    let action = match actions.len() {
        1 => actions.remove(0),
        0 => {
            return invalid(
                "target",
                draft.span,
                "a reload needs a target: pid_file, process, child, restart_child, exec, http or touch"
                    .into(),
            );
        }
        _ => {
            return invalid(
                "target",
                draft.span,
                "a reload has one target; write one [[reload]] table per action".into(),
            );
        }
    };
    if action.targets_child() && !has_child {
        return invalid(
            if draft.restart_child {
                "restart_child"
            } else {
                "child"
            },
            draft.span,
            "there is no child: start one with `run ... -- CHILD`".into(),
        );
    }
    let probe = match draft.probe {
        None => None,
        Some(p) if p.value.starts_with("http://") => {
            check_url(&p.value).or_else(|m| invalid("probe", p.span.clone(), m))?;
            Some(Probe::Http(p.value))
        }
        Some(p) if is_host_port(&p.value) => Some(Probe::Tls(p.value)),
        Some(p) => {
            return invalid(
                "probe",
                p.span,
                format!(
                    "{:?} is neither a HOST:PORT to probe with TLS nor an http:// URL",
                    redact(&p.value)
                ),
            );
        }
    };
    // A run, or a probe, given no time at all would fail every time.
    for (field, value) in [
        ("timeout", draft.timeout),
        ("probe_timeout", draft.probe_timeout),
    ] {
        if value.is_some_and(|d| d.is_zero()) {
            return invalid(field, draft.span, "must be longer than 0s".into());
        }
    }
    Ok(ReloadSpec {
        action,
        timeout: draft.timeout.unwrap_or(DEFAULT_RELOAD_TIMEOUT),
        retries: draft.retries,
        probe,
        probe_timeout: draft.probe_timeout.unwrap_or(DEFAULT_PROBE_TIMEOUT),
        min_interval: draft.min_interval.filter(|d| !d.is_zero()),
    })
}

/// Parses `HUP`, `SIGHUP`, `hup` or a number.
pub fn parse_signal(name: &str) -> Result<Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    if let Ok(n) = upper.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("{name:?} is not a signal number"));
    }
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse()
        .map_err(|_| format!("{name:?} is not a signal name (HUP, USR1, TERM, ...)"))
}

/// Splits a command line like a shell splits words (no shell runs it).
pub fn split_command(line: &str) -> Result<Vec<String>, String> {
    match shlex::split(line) {
        Some(argv) if argv.first().is_some_and(|a| !a.is_empty()) => Ok(argv),
        Some(_) => Err("an empty command".into()),
        None => Err(format!("{line:?} has an unterminated quote or escape")),
    }
}

/// A process is found by its name (comm, or argv[0]'s basename): a path or
/// an empty name would never match, and would be retried forever.
fn check_process(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        Err("an empty process name".into())
    } else if name.contains('/') {
        Err(format!(
            "{name:?} is a path; give the process name (its basename), or use pid_file"
        ))
    } else {
        Ok(())
    }
}

fn check_method(method: &str) -> Result<(), String> {
    if !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic()) {
        Ok(())
    } else {
        Err(format!("{method:?} is not an HTTP method"))
    }
}

/// `HOST:PORT` with a port in range (a bracketed IPv6 host allowed).
fn is_host_port(text: &str) -> bool {
    let Some((host, port)) = text.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/')
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// An `http://` URL with a host and, if given, a port from 1 to 65535;
/// nothing in it a request line could not carry (spaces, controls).
pub fn check_url(url: &str) -> Result<(), String> {
    let shown = redact(url);
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("{shown:?} is not an http:// URL"));
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{shown:?} holds a space or a control character"));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let (host, port) = match host_port.rsplit_once(':') {
        // `[::1]` has colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (host_port, None),
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("{shown:?} has no host"));
    }
    if let Some(port) = port
        && !port.parse::<u16>().is_ok_and(|p| p > 0)
    {
        return Err(format!(
            "{shown:?}: the port must be a number from 1 to 65535"
        ));
    }
    url.parse::<hyper::Uri>()
        .map(|_| ())
        .map_err(|e| format!("{shown:?} is not a valid URL: {e}"))
}

/// `url` as logs and errors may show it: the user and password, and the
/// query (which may carry a token), are left out (guarantee 14).
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest
        .split_once(['?', '#'])
        .map_or(rest, |(before, _)| before);
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let query = if url.contains('?') { "?…" } else { "" };
    let slash = if rest.contains('/') { "/" } else { "" };
    let scheme = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    format!("{scheme}{host}{slash}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(url: &str) -> Draft {
        Draft {
            http: Some(At::new(url.into(), None)),
            ..Draft::default()
        }
    }

    #[test]
    fn redacts_credentials_and_query() {
        assert_eq!(
            redact("http://u:p@127.0.0.1:8080/-/reload?token=x"),
            "http://127.0.0.1:8080/-/reload?…"
        );
        assert_eq!(
            redact("http://127.0.0.1:8080/-/reload"),
            "http://127.0.0.1:8080/-/reload"
        );
        assert_eq!(redact("http://host"), "http://host");
        assert_eq!(redact("ftp://a:SECRET@h"), "ftp://h");
        assert!(!redact("https://alice:SECRETPW@127.0.0.1/x").contains("SECRETPW"));
    }

    #[test]
    fn urls_are_checked_before_anything_runs() {
        for bad in [
            "http://127.0.0.1:99999/x",
            "http://127.0.0.1:0/x",
            "http://127.0.0.1/a b",
            "http:///x",
            "https://127.0.0.1/x",
            "http://alice:SECRETPW@127.0.0.1:99999/x",
        ] {
            let err = build(http(bad), false).expect_err(bad);
            assert_eq!(err.field, "http", "{bad}");
            assert!(!err.message.contains("SECRETPW"), "{}", err.message);
        }
        for good in [
            "http://127.0.0.1:8080/-/reload",
            "http://localhost/x?y=1",
            "http://[::1]:9/x",
            "http://u:p@127.0.0.1:9/reload",
        ] {
            build(http(good), false).expect(good);
        }
    }

    #[test]
    fn process_names_are_names() {
        for bad in ["", "  ", "/usr/sbin/nginx"] {
            let draft = Draft {
                process: Some(At::new(bad.into(), None)),
                ..Draft::default()
            };
            assert_eq!(build(draft, false).expect_err(bad).field, "process");
        }
    }

    #[test]
    fn one_target_per_reload() {
        assert_eq!(
            build(Draft::default(), false).expect_err("none").field,
            "target"
        );
        let two = Draft {
            touch: Some(At::new("/a".into(), None)),
            ..http("http://127.0.0.1/x")
        };
        assert_eq!(build(two, false).expect_err("two").field, "target");
        let child = Draft {
            child: true,
            ..Draft::default()
        };
        assert_eq!(
            build(child.clone(), false).expect_err("no child").field,
            "child"
        );
        assert!(build(child, true).is_ok());
    }

    #[test]
    fn signal_needs_a_signal_target() {
        let draft = Draft {
            signal: Some(At::new("HUP".into(), None)),
            ..http("http://127.0.0.1/x")
        };
        assert_eq!(build(draft, false).expect_err("signal").field, "signal");
        assert!(parse_signal("usr1").is_ok());
        assert!(parse_signal("SIGNOPE").is_err());
    }
}
