//! The `anchorage` binary: parse the command line, start logging, run the
//! command, map the outcome to the exit code (0 success, 1 invalid input,
//! 2 usage or configuration error).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing::{error, info};

use anchorage::cli::{Cli, Command, Flags, RenderArgs, RunArgs};
use anchorage::config::{Config, ReloadSpec};
use anchorage::daemon::{self, Daemon};
use anchorage::reload::child::Supervisor;
use anchorage::telemetry::status::Status;
use anchorage::telemetry::{health_check, http, init_logs, metrics::Metrics, systemd};
use anchorage::{check, reload, render};

const INVALID_INPUT: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => {
            init_logs(Default::default());
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let at = args.at.map(|t| t.unix_timestamp());
            let mut stdout = std::io::stdout().lock();
            match check::run(&args.paths, args.json, args.strict, at, now, &mut stdout) {
                Ok(code) => ExitCode::from(code as u8),
                Err(e) => {
                    eprintln!("anchorage: check: {e}");
                    ExitCode::from(INVALID_INPUT)
                }
            }
        }
        Command::Health(args) => ExitCode::from(health_check::run(
            args.listen.as_deref(),
            args.config.as_deref(),
            args.live,
        )),
        Command::Render(args) => render_command(args),
        Command::Run(args) => run_command(args),
    }
}

/// Loads the configuration, or says why not (exit 2).
fn load(flags: &Flags, has_child: bool) -> Result<Config, ExitCode> {
    Config::load(flags, has_child).map_err(|e| {
        init_logs(flags.log_format.unwrap_or_default());
        eprintln!("anchorage: {e}");
        ExitCode::from(USAGE)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    // One thread: the work is I/O-bound and small, and an idle sidecar
    // should cost nothing.
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

fn render_command(args: RenderArgs) -> ExitCode {
    let config = match load(&args.flags, false) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logs(config.daemon.log_format);
    warn_subpaths(&config);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut failed = false;
    // Each distinct action once, naming the bundles that changed.
    let mut reloads: Vec<(ReloadSpec, Vec<String>, Vec<PathBuf>)> = Vec::new();
    for bundle in &config.bundles {
        match render::render_once(bundle, config.daemon.state_dir.as_deref(), now) {
            Ok(changed) => {
                if changed && args.reload {
                    let outputs: Vec<PathBuf> =
                        bundle.outputs.iter().map(|o| o.path.clone()).collect();
                    for spec in &bundle.reloads {
                        match reloads.iter_mut().find(|(s, _, _)| s == spec) {
                            Some((_, names, paths)) => {
                                names.push(bundle.name.clone());
                                paths.extend(outputs.iter().cloned());
                            }
                            None => reloads.push((
                                spec.clone(),
                                vec![bundle.name.clone()],
                                outputs.clone(),
                            )),
                        }
                    }
                }
            }
            Err(e) => {
                render::log_failure(&bundle.name, &e);
                eprintln!("anchorage: bundle {}: {e}", bundle.name);
                failed = true;
            }
        }
    }
    if !reloads.is_empty() {
        let rt = runtime();
        for (spec, bundles, outputs) in &reloads {
            match rt.block_on(reload::run_once(spec, bundles, outputs)) {
                Ok(detail) => {
                    info!(bundles = ?bundles, action = spec.action.kind(), detail = %detail, "reloaded")
                }
                Err(e) => {
                    error!(bundles = ?bundles, action = spec.action.kind(), error = %e, "reload failed");
                    failed = true;
                }
            }
        }
    }
    ExitCode::from(if failed { INVALID_INPUT } else { 0 })
}

fn run_command(args: RunArgs) -> ExitCode {
    let has_child = !args.child.is_empty();
    let config = match load(&args.flags, has_child) {
        Ok(config) => config,
        Err(code) => return code,
    };
    init_logs(config.daemon.log_format);
    warn_subpaths(&config);
    let flags = args.flags;
    let reconfigure: daemon::Reconfigure = Box::new(move || Config::load(&flags, has_child));
    runtime().block_on(async move {
        let metrics = Arc::new(Metrics::new());
        let status = Status::new();
        let mut reports = status.0.subscribe();
        // Bound before anything is rendered: a taken port is a configuration error.
        let server = match config.daemon.listen {
            Some(addr) => match http::start(addr, metrics.clone(), status.0.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    eprintln!("anchorage: {e}");
                    return ExitCode::from(USAGE);
                }
            },
            None => None,
        };
        let notifier = systemd::start(status.0.clone());
        let stopped = move || {
            if let Some(notifier) = notifier {
                notifier.stopping();
            }
            drop(server);
        };
        let supervisor = has_child.then(|| Supervisor::new(args.child));
        let child = supervisor
            .as_ref()
            .map(Supervisor::handle)
            .unwrap_or_default();
        let daemon = match Daemon::new(config, reconfigure, metrics, status, child) {
            Ok(daemon) => daemon,
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
        // they are forwarded to it, and anchorage ends when it does.
        let (done, exited) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = reports.wait_for(|r| r.cycles >= 1).await;
            let _ = done.send(supervisor.run().await);
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
            .flat_map(|k| [k.cert.clone(), k.key.clone()]),
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
