//! `kreboot-kubelet-sim`: plays the kubelet's part on a machine that has no kubelet, for
//! the end-to-end VM test (`tests/vm.rs`).
//!
//! A kubelet reports the machine's boot id in `status.nodeInfo.bootID` and keeps the Node's
//! `Ready` condition up to date; kreboot recognises a finished reboot by a changed bootID on a
//! Ready node. This command does the same with the machine's real boot id: it patches the
//! Node's status subresource once (retrying until the API server answers or `--timeout`
//! passes), prints what it reported on stdout, and exits. Not used by the agent.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use clap::Parser;
use kreboot::{cli::parse_duration, host};

/// Flags of `kreboot-kubelet-sim`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kreboot-kubelet-sim",
    version,
    about = "Report this machine's boot id and Ready=True in its Node's status, as a kubelet would, then exit"
)]
pub struct KubeletSimArgs {
    /// The Node whose status is reported.
    #[arg(long, env = "KREBOOT_NODE_NAME")]
    pub node_name: String,
    /// Give up when the API server has not accepted the status within this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Pause between attempts.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub retry_interval: Duration,
}

/// The status patch a kubelet would send: the boot id, the kernel, and Ready=True.
pub fn status_patch(boot_id: &str, kernel: &str, now: &str) -> serde_json::Value {
    json!({
        "status": {
            "nodeInfo": { "bootID": boot_id, "kernelVersion": kernel },
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "kubelet is posting ready status (kreboot kubelet-sim)",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }
    })
}

/// Runs the command: reports this machine's boot id and readiness for `--node-name`.
///
/// # Errors
/// When there is no boot id, no Kubernetes configuration, or the API server did not accept the
/// patch within `--timeout`.
pub async fn run(args: &KubeletSimArgs) -> anyhow::Result<String> {
    let boot_id =
        host::kernel_boot_id().ok_or_else(|| anyhow::anyhow!("no /proc/sys/kernel/random/boot_id"))?;
    let kernel = host::running_kernel();
    let mut cfg = kube::Config::infer().await?;
    cfg.default_retry = false;
    cfg.connect_timeout = Some(Duration::from_secs(5));
    cfg.read_timeout = Some(Duration::from_secs(10));
    let client = kreboot::connect::client(cfg)?;
    let nodes: Api<Node> = Api::all(client);
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let patch = status_patch(&boot_id, &kernel, &now);
        match nodes
            .patch_status(&args.node_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                return Ok(format!(
                    "kubelet-sim: node {} Ready, bootID {boot_id}, kernel {kernel} (attempt {attempt})",
                    args.node_name
                ));
            }
            Err(e) if tokio::time::Instant::now() + args.retry_interval < deadline => {
                eprintln!("kubelet-sim: attempt {attempt}: {e}; retrying");
                tokio::time::sleep(args.retry_interval).await;
            }
            Err(e) => {
                anyhow::bail!(
                    "node {} status not reported after {attempt} attempts: {e}",
                    args.node_name
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_sets_boot_id_and_ready() {
        let p = status_patch("b-1", "6.1.0-1-amd64", "2026-01-01T00:00:00Z");
        assert_eq!(p["status"]["nodeInfo"]["bootID"], "b-1");
        assert_eq!(p["status"]["conditions"][0]["type"], "Ready");
        assert_eq!(p["status"]["conditions"][0]["status"], "True");
    }
}
