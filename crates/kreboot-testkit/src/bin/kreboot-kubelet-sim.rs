//! `kreboot-kubelet-sim`: the kubelet's part on the VM test's machine, which has no kubelet.
//! See [`kreboot_testkit::kubelet_sim`].

use std::process::ExitCode;

use clap::Parser;
use kreboot_testkit::kubelet_sim::{self, KubeletSimArgs};

fn main() -> ExitCode {
    let args = KubeletSimArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kubelet_sim::run(&args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubelet-sim failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
