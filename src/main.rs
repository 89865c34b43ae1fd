//! The `anchorage` binary: parse the command line, start logging, run the
//! command, map the outcome to the exit code (0 success, 1 invalid input,
//! 2 usage or configuration error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{debug, error, info, warn};

use anchorage::cli::{Cli, Command, Flags, LogFormat, RenderArgs, RunArgs};
use anchorage::clock::Clock;
use anchorage::config::{self, Child, Config};
use anchorage::daemon::{self, Daemon};
use anchorage::reload::child::{ChildHandle, Supervisor};
use anchorage::reload::{Reloader, Request};
use anchorage::render::{self, BundleState, Mode};
use anchorage::telemetry::status::Status;
use anchorage::telemetry::{health_check, http, init_logs, metrics::Metrics, say, systemd};
use anchorage::{check, keypair};

/// How long a supervised child waits for the first renders: a source that
/// hangs must not keep the app from starting for good.
const CHILD_WAITS_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);

const INVALID_INPUT: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A usage error is one JSON line too when JSON logs were asked for.
        Err(e) if e.use_stderr() && json_requested() => {
            init_logs(LogFormat::Json);
            let message = e.render().to_string();
            error!("{}", naming_the_variable(&e, &message).trim());
            return ExitCode::from(USAGE);
        }
        Err(e) if e.use_stderr() => {
            let message = e.render().to_string();
            let named = naming_the_variable(&e, &message);
            if named == message {
                e.exit()
            }
            eprint!("{named}");
            return ExitCode::from(USAGE);
        }
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Check(args) => {
            let format = args.log_format.unwrap_or_default();
            init_logs(format);
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let at = args.at.map(|t| t.unix_timestamp());
            let mut stdout = std::io::stdout().lock();
            match check::run(&args.paths, args.json, args.strict, at, now, &mut stdout) {
                Ok(code) => ExitCode::from(code as u8),
                Err(e) => {
                    say(&format!("check: {e}"));
                    ExitCode::from(INVALID_INPUT)
                }
            }
        }
        Command::Health(args) => ExitCode::from({
            init_logs(args.log_format.unwrap_or_default());
            health_check::run(
                args.listen.as_deref(),
                args.config.as_deref(),
                args.live,
                started,
            )
        }),
        Command::Render(args) => render_command(args),
        Command::Run(args) => run_command(args),
    }
}

/// Whether `--log-format json` (or its variable) is on a command line that
/// did not parse.
fn json_requested() -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json")
        || std::env::var("ANCHORAGE_LOG_FORMAT").is_ok_and(|v| v == "json")
}

/// `message` (clap's `e`, rendered) with the variable named after the flag
/// when the bad value came from it (`ANCHORAGE_DEBOUNCE=abc` is reported
/// as `'--debounce <DURATION>' (from ANCHORAGE_DEBOUNCE)`): the flag was
/// never typed.
fn naming_the_variable(e: &clap::Error, message: &str) -> String {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(invalid)) = e.get(ContextKind::InvalidArg) else {
        return message.to_owned();
    };
    let flag = invalid.split(' ').next().unwrap_or_default();
    let command = Cli::command();
    let variable = command
        .get_subcommands()
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long().is_some_and(|long| flag == format!("--{long}")))
        .and_then(|a| a.get_env())
        .and_then(|v| v.to_str());
    let typed = std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    match variable {
        Some(variable) if !typed && std::env::var_os(variable).is_some() => message.replacen(
            &format!("'{invalid}'"),
            &format!("'{invalid}' (from {variable})"),
            1,
        ),
        _ => message.to_owned(),
    }
}

/// Loads the configuration, or says why not (exit 2).
fn load(flags: &Flags, child: Child) -> Result<Config, ExitCode> {
    Config::load(flags, child).map_err(|e| {
        let format = flags
            .log_format
            .or_else(|| flags.config.as_deref().and_then(config::file_log_format))
            .unwrap_or_default();
        init_logs(format);
        say(&e.to_string());
        ExitCode::from(USAGE)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    // One thread for the event loop, signals, reload workers and the child:
    // the work is small, and an idle sidecar should cost nothing. Reading
    // and writing files goes to the blocking pool.
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anchorage: cannot start the runtime: {e}");
            std::process::exit(i32::from(INVALID_INPUT));
        }
    }
}

/// Runs `future` to completion, then leaves behind whatever still blocks
/// (a read stuck on a hung filesystem must not hold the exit).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    let rt = runtime();
    let output = rt.block_on(future);
    rt.shutdown_background();
    output
}

fn render_command(args: RenderArgs) -> ExitCode {
    // The configuration of a daemon that supervises a child (reloads that
    // signal or restart it) is one `render` reads too: an init container
    // renders with it, CI checks it with --dry-run. There is no child here:
    // with --reload, such a reload is a target that does not exist yet.
    let config = match load(&args.flags, Child::NotYet) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let format = config.daemon.log_format;
    init_logs(format);
    warn_subpaths(&config);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mode = if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Write
    };
    let mut failed = false;
    let mut due = Vec::new();
    let mut rendered = std::collections::HashMap::new();
    // What was read, parsed and published is left to the exit (below).
    let mut states = Vec::with_capacity(config.bundles.len());
    for bundle in &config.bundles {
        let mut state = BundleState::new(bundle.clone(), config.daemon.state_dir.as_deref());
        match state.render(None, now, mode) {
            Ok(report) => {
                render::log_report(&bundle.name, &report, mode);
                if mode == Mode::DryRun {
                    for spec in &bundle.outputs {
                        let verdict = if report.failed.iter().any(|(p, _)| *p == spec.path) {
                            "would be refused"
                        } else if report.changed.contains(&spec.path) {
                            "would change"
                        } else {
                            "unchanged"
                        };
                        println!(
                            "{}: {} ({}, bundle {})",
                            verdict,
                            spec.path.display(),
                            spec.format.name(),
                            bundle.name
                        );
                    }
                }
                for (path, e) in &report.failed {
                    say(&format!(
                        "bundle {}: cannot write {}: {e}",
                        bundle.name,
                        path.display()
                    ));
                    failed = true;
                }
                if let Some(outputs) = &report.reload
                    && args.reload
                {
                    due.push((bundle, outputs.clone()));
                }
                rendered.insert(bundle.name.clone(), report.bundle.clone());
            }
            Err(refusal) => {
                error!(bundle = %bundle.name, reason = refusal.reason(), error = %refusal,
                    "bundle refused; outputs keep their previous content");
                if mode == Mode::DryRun {
                    for spec in &bundle.outputs {
                        println!(
                            "unchanged: {} ({}, bundle {}: refused)",
                            spec.path.display(),
                            spec.format.name(),
                            bundle.name
                        );
                    }
                }
                if format == LogFormat::Text {
                    eprintln!("anchorage: bundle {}: refused: {refusal}", bundle.name);
                }
                failed = true;
            }
        }
        states.push(state);
    }
    // Key pairs: each is checked (what `run` would accept; one it would hold
    // fails the render, dry or not); a render writes the split_dir of those
    // that have one (an init container then hands the app its tls.crt and
    // tls.key).
    for pair in &config.keypairs {
        let chain_to = pair.chain_to.as_ref().and_then(|b| rendered.get(b));
        if mode == Mode::DryRun || pair.split.is_none() {
            match keypair::inspect(pair, chain_to.map(|b| &**b), now) {
                Ok(checked) if mode == Mode::DryRun => {
                    println!(
                        "valid: key pair {} ({})",
                        pair.name,
                        keypair::describe(&checked.accepted)
                    );
                    // Its split_dir is an output as a bundle's are.
                    if let (Some(split), Some(files)) = (&pair.split, &checked.split) {
                        let verdict = match keypair::check_split(split, files) {
                            Ok(true) => "would change",
                            Ok(false) => "unchanged",
                            Err(e) => {
                                say(&format!(
                                    "key pair {}: cannot write {}: {e}",
                                    pair.name,
                                    split.dir.display()
                                ));
                                failed = true;
                                "would be refused"
                            }
                        };
                        println!(
                            "{verdict}: {} (split_dir, key pair {})",
                            split.dir.display(),
                            pair.name
                        );
                    }
                }
                Ok(checked) => info!(keypair = %pair.name,
                    certificate = %keypair::describe(&checked.accepted), "key pair checked"),
                Err(held) => {
                    say(&format!("key pair {}: held: {held}", pair.name));
                    failed = true;
                }
            }
            continue;
        }
        let mut state = keypair::KeyPairState::new(pair.clone());
        match state.check(chain_to.map(|b| &**b), now) {
            keypair::Outcome::Held(reason) => {
                say(&format!("key pair {}: held: {reason}", pair.name));
                failed = true;
            }
            _ => match &state.accepted {
                // The split_dir already held the pair: no news.
                Some(accepted) if !state.split_written => debug!(keypair = %pair.name,
                    certificate = %keypair::describe(accepted), "key pair split unchanged"),
                Some(accepted) => info!(keypair = %pair.name,
                    certificate = %keypair::describe(accepted), "key pair split"),
                None => failed = true,
            },
        }
    }
    if !due.is_empty() {
        // The reloader's own workers: each distinct action runs once, for
        // every bundle that changed, with the retries it allows.
        let failures = block_on(async {
            let mut reloader = Reloader::new(Arc::new(Metrics::new()), ChildHandle::default());
            for (bundle, outputs) in &due {
                for spec in &bundle.reloads {
                    reloader.request(
                        spec,
                        Request {
                            names: [bundle.name.clone()].into(),
                            outputs: outputs.clone(),
                            // As at a daemon's start: a target that does not
                            // exist yet (an init container's app) is skipped,
                            // and reads the fresh output when it starts.
                            startup: true,
                            ..Request::default()
                        },
                    );
                }
            }
            reloader.close(None).await
        });
        failed |= failures > 0;
    }
    // The process ends here: freeing ten thousand certificates, their
    // sources and their outputs one allocation at a time would only delay
    // the exit (about 10 ms of a 10,000-CA render).
    std::mem::forget((states, rendered));
    ExitCode::from(if failed { INVALID_INPUT } else { 0 })
}

fn run_command(args: RunArgs) -> ExitCode {
    anchorage::memory::limit_arenas();
    let has_child = !args.child.is_empty();
    let child = if has_child {
        Child::Supervised
    } else {
        Child::Absent
    };
    let config = match load(&args.flags, child) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logs(config.daemon.log_format);
    warn_subpaths(&config);
    let flags = args.flags;
    let reconfigure: daemon::Reconfigure = Arc::new(move || Config::load(&flags, child));
    block_on(async move {
        let metrics = Arc::new(Metrics::new());
        let status = Status::new();
        let mut reports = status.0.subscribe();
        // Bound before anything is rendered: a taken port is a configuration error.
        let listener =
            match http::Listener::start(config.daemon.listen, metrics.clone(), status.0.clone()) {
                Ok(listener) => Arc::new(std::sync::Mutex::new(listener)),
                Err(e) => {
                    say(&e.to_string());
                    return ExitCode::from(USAGE);
                }
            };
        let notifier = systemd::start(status.0.clone());
        let serving = listener.clone();
        let stopped = move || {
            if let Some(notifier) = notifier {
                notifier.stopping();
            }
            // The last hold on it: health answers until the very end.
            drop(serving);
        };
        let supervisor = has_child.then(|| Supervisor::new(args.child));
        let child = supervisor
            .as_ref()
            .map(Supervisor::handle)
            .unwrap_or_default();
        let daemon = match Daemon::new(config, reconfigure, metrics, status, child, Clock::System) {
            Ok(daemon) => daemon.serving(listener),
            Err(e) => {
                error!(error = %e, "cannot start");
                return ExitCode::from(INVALID_INPUT);
            }
        };
        let Some(supervisor) = supervisor else {
            daemon.run(shutdown_signal()).await;
            stopped();
            return ExitCode::SUCCESS;
        };
        // The child starts after the first render and owns SIGTERM/SIGINT:
        // they are forwarded to it, and anchorage ends when it does. A
        // first render that hangs (a stuck source) holds it back only so
        // long (guarantee 10); a SIGTERM before it starts ends anchorage.
        let (done, exited) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let first_render = async {
                let rendered = reports.wait_for(|r| r.started);
                if tokio::time::timeout(CHILD_WAITS_AT_MOST, rendered)
                    .await
                    .is_err()
                {
                    warn!(
                        waited = %humantime::format_duration(CHILD_WAITS_AT_MOST),
                        "starting the child before every first render came back: a source may hang (see /readyz)"
                    );
                }
            };
            tokio::select! {
                () = first_render => {
                    let _ = done.send(supervisor.run().await);
                }
                () = shutdown_signal() => {
                    let _ = done.send(0);
                }
            }
        });
        let code = Arc::new(std::sync::atomic::AtomicI32::new(1));
        let seen = code.clone();
        daemon
            .run(async move {
                if let Ok(c) = exited.await {
                    seen.store(c, std::sync::atomic::Ordering::Relaxed);
                }
            })
            .await;
        stopped();
        ExitCode::from(
            code.load(std::sync::atomic::Ordering::Relaxed)
                .clamp(0, 255) as u8,
        )
    })
}

/// Warns about sources that kubelet will never update.
fn warn_subpaths(config: &Config) {
    let mut paths: Vec<PathBuf> = config
        .bundles
        .iter()
        .flat_map(|b| &b.sources)
        .filter_map(|s| match s {
            anchorage::source::Source::Path(p) => Some(p.clone()),
            anchorage::source::Source::Glob(_) => None,
        })
        .collect();
    paths.extend(
        config
            .keypairs
            .iter()
            .flat_map(|k| k.paths().into_iter().map(std::path::Path::to_path_buf)),
    );
    anchorage::source::mounts::warn_subpaths(&paths);
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install the SIGTERM/SIGINT handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
