//! The `kreboot` binary: parses the command line and hands over to the library.

use std::{io::IsTerminal, process::ExitCode, sync::Arc};

use clap::Parser;
use kreboot::{
    agent::{self, Agent, Clock},
    cli::{AgentArgs, Cli, Command, LogFormat},
    events::Events,
    host::HostExec,
    metrics::{self, Metrics},
    reboot::CommandRebooter,
    sentinel::SentinelWatch,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit code for bad usage (clap uses the same).
const EXIT_USAGE: u8 = 2;

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
    let mut kube_cfg = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "no Kubernetes configuration (in-cluster or KUBECONFIG)");
            return ExitCode::FAILURE;
        }
    };
    // kreboot owns its retries: the client's own retry of 429 would make --drain-timeout
    // meaningless (a PDB-blocked eviction could hang inside the client for minutes).
    kube_cfg.default_retry = false;
    let client = match kube::Client::try_from(kube_cfg) {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "cannot build the Kubernetes client");
            return ExitCode::FAILURE;
        }
    };
    let sentinel = match SentinelWatch::start(cfg.sentinel_file.clone()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot watch the sentinel");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    shutdown_on_signal(shutdown.clone());
    let metrics = Metrics::new(&cfg.node_name);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = cfg.metrics_addr {
        match metrics::serve(addr, metrics.clone(), ready_rx, shutdown.clone()).await {
            Ok(bound) => info!(addr = %bound, "serving metrics"),
            Err(e) => {
                error!(addr = %addr, error = %e, "cannot serve metrics");
                return ExitCode::FAILURE;
            }
        }
    }
    let exec = HostExec {
        host_namespaces: cfg.host_namespaces,
        host_pid: cfg.host_pid,
    };
    let agent = Agent {
        events: Events::start(client.clone(), &cfg.node_name, std::env::var("POD_NAME").ok()),
        rebooter: Arc::new(CommandRebooter {
            command: cfg.reboot_command.clone(),
            exec,
        }),
        cfg,
        client,
        metrics,
        clock: Clock::default(),
        kernel_boot_id: Arc::new(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_owned())
        }),
    };
    let _ = ready_tx.send(true);
    info!(node = %agent.cfg.node_name, namespace = %agent.cfg.namespace, "kreboot agent started");
    match agent::run(agent, sentinel.receiver(), shutdown).await {
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => run_agent(*args).await,
        Command::Demo(args) => {
            // The demo prints its own progress; agents' logs only when something goes wrong.
            init_logging(LogFormat::Text, "warn");
            match kreboot::sim::demo::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
