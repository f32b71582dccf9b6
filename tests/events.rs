//! Every Event reason kreboot records on a Node is seen, with a stable reason string, in the
//! step that produces it (`kubectl describe node` tells the story). The happy path's reasons
//! (RebootRequired, LockAcquired, Cordoned, Draining, Rebooting, Uncordoned, RebootCompleted)
//! are checked in `tests/lifecycle.rs::one_full_cycle`, DrainFailed in its PDB test,
//! ConfigInvalid in its invalid-ConfigMap test, RebootBlocked in `tests/blockers.rs`; this file
//! covers the others and checks that every reason (`Reason::ALL`) is documented in the README.

mod common;

use std::time::Duration;

use common::*;
use kreboot::events::Reason;
use kreboot_testkit::sim::SimConfig;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_aborted_when_the_window_closes_mid_drain() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    // A pod slow to terminate keeps the drain going.
    sim.add_pod(slow_pod("n0", 10, 5.0));
    put_policy(&sim, "timezone: UTC\n");
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "draining", || {
        event_reasons(&sim, "n0").iter().any(|r| r == "Draining")
    })
    .await;
    put_policy(&sim, BLACKOUT_EVERY_DAY);
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
    let host = SimHost::start(SimConfig::default()).await;
    let sim = &host.sim;
    let sentinel = host.path("reboot-required");
    std::fs::write(&sentinel, "").expect("sentinel");
    let agent =
        Killed::spawn(
            host.agent(&sentinel)
                .args(["--reboot-command", "false", "--metrics-addr", "off"]),
        );
    let seen = {
        let deadline = std::time::Instant::now() + LIMIT;
        loop {
            if event_reasons(sim, "n1").iter().any(|r| r == "RebootFailed") {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    drop(agent);
    assert!(seen, "RebootFailed event; got {:?}", event_reasons(sim, "n1"));
}

/// Every reason the enum declares ([`Reason::ALL`] cannot miss one) is in the README.
#[test]
fn every_reason_is_documented() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for r in Reason::ALL {
        assert!(
            readme.contains(&format!("`{}`", r.as_str())),
            "README does not document {}",
            r.as_str()
        );
    }
}
