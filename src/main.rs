//! The `kreboot` binary: parses the command line and hands over to the library.

use std::{io::IsTerminal, process::ExitCode, sync::Arc};

use clap::{CommandFactory, FromArgMatches};
use kreboot::{
    agent::{self, Agent, Clock},
    cli::{self, AgentArgs, AgentConfig, Cli, Command, CompletionShell, HostExecArgs, LogFormat},
    events::Events,
    host::{self, HostExec},
    metrics::{self, Metrics},
    notify::Notifier,
    reboot,
    sentinel::{self, SentinelWatch},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit code for bad usage (clap uses the same).
const EXIT_USAGE: u8 = 2;

/// How long queued notifications may hold up the exit.
const NOTIFY_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

/// How long queued Events may hold up the exit.
const EVENTS_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colours only for a terminal: log collectors get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT; a second one exits at once.
fn shutdown_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
        }
        token.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn run_agent(args: AgentArgs) -> ExitCode {
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("error: invalid settings:\n{problems}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(args.log_format, "info");
    let Some(client) = kube_client().await else {
        return ExitCode::FAILURE;
    };
    let exec = HostExec {
        host_namespaces: cfg.host_namespaces,
        host_pid: cfg.host_pid,
    };
    let os = host::read_os_release(&exec.host_root());
    let kernel = host::running_kernel();
    info!(os = %os.id, version = %os.version_id, family = ?os.family, %kernel, "host");
    let Some(sentinel) = start_sentinel(&args, &cfg) else {
        return ExitCode::FAILURE;
    };
    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    let (metrics, ready_tx) = start_metrics(&cfg, &os, &kernel, &shutdown).await;
    let sentinel_rx = sentinel::combine(
        sentinel.receiver(),
        sentinel::ExtraChecks {
            exec: exec.clone(),
            command: cfg.sentinel_command.clone(),
            invert: cfg.sentinel_command_invert,
            kernel_check: cfg.kernel_check,
            interval: cfg.check_interval,
        },
    );
    let notifier = start_notifier(&cfg, &metrics);
    let events = Events::start(client.clone(), &cfg.node_name, std::env::var("POD_NAME").ok());
    let exit_events = events.clone();
    let _sentinel_mode = sentinel::spawn_mode_reporter(sentinel.mode(), metrics.clone(), events.clone());
    let agent = Agent {
        notifier: notifier.clone(),
        events,
        rebooter: reboot::rebooter(cfg.reboot_method, cfg.reboot_command.clone(), exec),
        cfg,
        client,
        metrics,
        clock: Clock::default(),
        kernel_boot_id: Arc::new(host::kernel_boot_id),
    };
    // Ready only once the API server has answered (the agent retries on its own meanwhile);
    // the same task watches this host's clock against the server's.
    let _api_check = tokio::spawn(kreboot::connect::ready_when_reachable(
        agent.client.clone(),
        agent.clock,
        agent.metrics.clone(),
        agent.events.clone(),
        ready_tx,
        shutdown.clone(),
    ));
    info!(node = %agent.cfg.node_name, namespace = %agent.cfg.namespace, "kreboot agent started");
    let result = agent::run(agent, sentinel_rx, shutdown).await;
    flush_on_exit(&notifier, &exit_events).await;
    agent_exit_code(result)
}

/// The Kubernetes client (in-cluster or KUBECONFIG); `None` once the failure is logged.
async fn kube_client() -> Option<kube::Client> {
    let mut kube_cfg = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "no Kubernetes configuration (in-cluster or KUBECONFIG)");
            return None;
        }
    };
    // kreboot owns its retries: the client's own retry of 429 would make --drain-timeout
    // meaningless (a PDB-blocked eviction could hang inside the client for minutes).
    kube_cfg.default_retry = false;
    match kreboot::connect::client(kube_cfg) {
        Ok(c) => Some(c),
        Err(e) => {
            error!(error = %e, "cannot build the Kubernetes client");
            None
        }
    }
}

/// The sentinel file's watch thread; `None` once the failure is logged.
fn start_sentinel(args: &AgentArgs, cfg: &AgentConfig) -> Option<SentinelWatch> {
    // Never stops the agent for want of inotify: it polls instead (see `sentinel`).
    let watch_options = sentinel::WatchOptions {
        poll_interval: args.sentinel_poll_interval,
        inotify_retry: args.sentinel_inotify_retry,
    };
    match SentinelWatch::start_with(cfg.sentinel_file.clone(), watch_options) {
        Ok(s) => Some(s),
        Err(e) => {
            error!(error = %e, "cannot start the sentinel watch thread");
            None
        }
    }
}

/// The metrics, served on `--metrics-addr` (if any) and carrying this host's facts; the
/// sender flips the readiness the endpoint reports.
async fn start_metrics(
    cfg: &AgentConfig,
    os: &host::OsInfo,
    kernel: &str,
    shutdown: &CancellationToken,
) -> (Metrics, tokio::sync::watch::Sender<bool>) {
    let metrics = Metrics::new(&cfg.node_name);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = cfg.metrics_addr {
        metrics::serve_or_retry(
            addr,
            metrics.clone(),
            ready_rx,
            shutdown.clone(),
            metrics::SERVE_RETRY,
        )
        .await;
    }
    metrics
        .node_info
        .with_label_values(&[cfg.node_name.as_str(), &os.id, &os.version_id, kernel])
        .set(1);
    (metrics, ready_tx)
}

/// The notifier, or a disabled one if it cannot be set up.
fn start_notifier(cfg: &AgentConfig, metrics: &Metrics) -> Notifier {
    let notifier = Notifier::start(&cfg.notify, &cfg.node_name, metrics.clone()).unwrap_or_else(|e| {
        error!(error = %e, "cannot set up notifications; working on without them");
        Notifier::disabled()
    });
    if notifier.enabled() {
        let targets: Vec<String> = cfg.notify.targets.iter().map(|t| t.redacted()).collect();
        info!(?targets, "sending notifications");
    }
    notifier
}

/// Sends what is still queued when the agent stops.
async fn flush_on_exit(notifier: &Notifier, events: &Events) {
    // Give queued notifications (e.g. "rebooting", sent just before the host went down) a
    // moment to leave.
    if !notifier.flush(NOTIFY_FLUSH).await {
        warn!("notifications still queued at exit were not sent");
    }
    // And the last Events (e.g. `Rebooting`), so the Node's story is complete.
    if !events.flush(EVENTS_FLUSH).await {
        warn!("Events still queued at exit were not sent");
    }
}

/// Logs how the agent ended and maps it to the exit code.
fn agent_exit_code(result: anyhow::Result<agent::Outcome>) -> ExitCode {
    match result {
        Ok(outcome) => {
            info!(?outcome, "kreboot agent stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(error = %e, "kreboot agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn run_host_exec(args: HostExecArgs) -> ExitCode {
    let exec = HostExec {
        host_namespaces: args.host_namespaces,
        host_pid: args.host_pid,
    };
    match exec.run(&args.command, std::time::Duration::from_secs(60)).await {
        Ok(f) => {
            if !f.stdout.is_empty() {
                println!("{}", f.stdout);
            }
            if !f.stderr.is_empty() {
                eprintln!("{}", f.stderr);
            }
            ExitCode::from(f.code.and_then(|c| u8::try_from(c).ok()).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the completion script for `shell` to stdout.
fn print_completions(shell: CompletionShell, bin: &str) -> ExitCode {
    use clap_complete::Shell;
    let mut cmd = Cli::command();
    let shell = match shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    // As the kubectl plugin, kubectl completes `kubectl kreboot` through the plugin's own
    // `kubectl_complete-kreboot`, not through a script for this name; the script is for the
    // plain binary.
    let name = if bin == "kreboot" { bin } else { "kreboot" };
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// Writes the man page (roff) to stdout.
fn print_man() -> ExitCode {
    match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // `kubectl kreboot ...` runs this binary as `kubectl-kreboot`: the same commands, with help
    // and usage naming what the user typed.
    let bin = cli::bin_name(std::env::args_os().next().as_deref());
    let matches = Cli::command().bin_name(bin).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Completions(args) => return print_completions(args.shell, bin),
        Command::Man => return print_man(),
        _ => {}
    }
    // The agent is one node's worth of work: a single-threaded runtime keeps its memory small.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Agent(args) => run_agent(*args).await,
            Command::HostExec(args) => run_host_exec(args).await,
            Command::Policy(args) => kreboot::policy_check::run(&args),
            Command::Drain(args) => {
                // Progress goes to stderr as plain lines; logs only when something is wrong.
                // (The client's own error log would repeat the message printed.)
                init_logging(LogFormat::Text, "warn,kube_client=off");
                kreboot::drain_cli::run_drain(&args).await
            }
            Command::Uncordon(args) => {
                init_logging(LogFormat::Text, "warn,kube_client=off");
                kreboot::drain_cli::run_uncordon(&args).await
            }
            // Printed above, before any runtime was needed.
            Command::Completions(_) | Command::Man => ExitCode::SUCCESS,
            Command::Status(args) => kreboot::status::run(&args).await,
            Command::Pause(args) => {
                init_logging(LogFormat::Text, "warn,kube_client=off");
                kreboot::pause::run_pause(&args).await
            }
            Command::Reboot(args) => {
                init_logging(LogFormat::Text, "warn,kube_client=off");
                kreboot::request::run(&args).await
            }
            Command::Resume(args) => {
                init_logging(LogFormat::Text, "warn,kube_client=off");
                kreboot::pause::run_resume(&args).await
            }
        }
    })
}
