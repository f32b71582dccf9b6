//! Every Event reason kreboot records on a Node is seen, with a stable reason string, in the
//! step that produces it (`kubectl describe node` tells the story). The happy path's reasons
//! (RebootRequired, LockAcquired, Cordoned, Draining, Rebooting, Uncordoned, RebootCompleted)
//! are checked in `tests/lifecycle.rs::one_full_cycle`, DrainFailed in its PDB test,
//! ConfigInvalid in its invalid-ConfigMap test, RebootBlocked in `tests/blockers.rs`; this file
//! covers the others and checks that the full list is what the README documents.

mod common;

use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use kreboot_testkit::sim::{self, SimCluster, SimConfig};

const LIMIT: Duration = Duration::from_secs(60);

fn all_day(open: bool) -> BTreeMap<String, String> {
    let doc = if open {
        "timezone: UTC\n".to_string()
    } else {
        "blackouts:\n  - from: \"2000-01-01\"\n    to: \"2099-12-31\"\n".to_string()
    };
    BTreeMap::from([("config.yaml".to_string(), doc)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_aborted_when_the_window_closes_mid_drain() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    // A pod slow to terminate keeps the drain going.
    sim.add_pod(
        sim::pod("apps", "slow", "n0")
            .grace(10)
            .shutdown_seconds(5.0)
            .build(),
    );
    sim.configmap_put("kube-system", "kreboot-config", all_day(true));
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "draining", || {
        event_reasons(&sim, "n0").iter().any(|r| r == "Draining")
    })
    .await;
    sim.configmap_put("kube-system", "kreboot-config", all_day(false));
    wait_for(LIMIT, "CycleAborted event", || {
        event_reasons(&sim, "n0").iter().any(|r| r == "CycleAborted")
    })
    .await;
    wait_for(LIMIT, "uncordoned and lock released", || {
        !unschedulable(&sim, "n0") && lease_holder(&sim, "kreboot-lock").is_none()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_failed_when_the_reboot_command_fails() {
    let sim = SimCluster::start(SimConfig::default())
        .await
        .expect("simulator starts");
    sim.add_node("n1", BTreeMap::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let sentinel = dir.path().join("reboot-required");
    std::fs::write(&sentinel, "").expect("sentinel");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args([
            "agent",
            "--node-name",
            "n1",
            "--namespace",
            "kube-system",
            "--host-namespaces=false",
        ])
        .arg("--sentinel-file")
        .arg(&sentinel)
        .args(["--reboot-command", "false", "--metrics-addr", "off"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("NODE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kreboot starts");
    let seen = {
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            if event_reasons(&sim, "n1").iter().any(|r| r == "RebootFailed") {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(seen, "RebootFailed event; got {:?}", event_reasons(&sim, "n1"));
}

#[test]
fn every_reason_is_documented() {
    use kreboot::events::Reason::*;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for r in [
        RebootRequired,
        RebootBlocked,
        LockAcquired,
        Cordoned,
        Draining,
        DrainFailed,
        Rebooting,
        RebootFailed,
        Uncordoned,
        RebootCompleted,
        CycleAborted,
        ConfigInvalid,
        SentinelPolling,
        HostAccessDenied,
        RebootsPaused,
        BadAnnotation,
        ClockSkew,
    ] {
        assert!(
            readme.contains(&format!("`{}`", r.as_str())),
            "README does not document {}",
            r.as_str()
        );
    }
}
