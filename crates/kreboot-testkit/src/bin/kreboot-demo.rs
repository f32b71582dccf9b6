//! `kreboot-demo` (`cargo demo` in the repository): a rolling reboot of a simulated cluster,
//! shown as it happens. See [`kreboot_testkit::sim::demo`].

use std::process::ExitCode;

use clap::Parser;
use kreboot_testkit::sim::demo::{self, DemoArgs};

fn main() -> ExitCode {
    let args = DemoArgs::parse();
    // The demo prints its own progress; agents' logs only when something goes wrong.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // A whole simulated cluster and its agents in one process: every core helps.
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(demo::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
