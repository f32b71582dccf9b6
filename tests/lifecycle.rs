//! The node lifecycle end to end: real agents against the simulated cluster over HTTP.

mod common;

use std::{collections::BTreeMap, time::Duration};

use chrono::{Timelike, Utc};
use common::*;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kreboot::{
    lock::LOCK_LABEL,
    node::{ANN_CORDONED_BY_KREBOOT, ANN_LAST_FAILURE, ANN_LAST_FAILURE_REASON, ANN_PHASE},
};
use kreboot_testkit::sim::SimEvent;
use kube::{Api, api::PostParams};

const LIMIT: Duration = Duration::from_secs(30);

fn hhmm(offset_hours: i64) -> String {
    let t = Utc::now() + chrono::Duration::hours(offset_hours);
    format!("{:02}:{:02}", t.hour(), t.minute())
}

/// A policy whose only window is open now (`open`) or opens in two hours (`!open`).
fn window_policy(open: bool) -> BTreeMap<String, String> {
    let (start, end) = if open {
        (hhmm(-1), hhmm(1))
    } else {
        (hhmm(2), hhmm(3))
    };
    let doc = format!(
        "timezone: UTC\nwindows:\n  - days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"{start}\"\n    end: \"{end}\"\n"
    );
    BTreeMap::from([("config.yaml".to_string(), doc)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_full_cycle() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    let before = boot_id(&sim, "n0");
    let mut sim_events = sim.subscribe();
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 completes its reboot", || completed(&sim, "n0")).await;
    assert_ne!(boot_id(&sim, "n0"), before, "the node really rebooted");
    assert!(!unschedulable(&sim, "n0"), "uncordoned after the reboot");
    assert_eq!(lease_holder(&sim, "kreboot-lock"), None, "lock released");
    assert!(
        sim.request_counts().by_verb.get("evict").copied().unwrap_or(0) >= 2,
        "pods were evicted"
    );
    let mut reboots = 0;
    while let Ok(ev) = sim_events.try_recv() {
        if matches!(ev, SimEvent::RebootStarted { .. }) {
            reboots += 1;
        }
    }
    assert_eq!(reboots, 1, "exactly one reboot");
    wait_for(LIMIT, "events published", || {
        let reasons = event_reasons(&sim, "n0");
        [
            "RebootRequired",
            "LockAcquired",
            "Cordoned",
            "Draining",
            "Rebooting",
            "Uncordoned",
            "RebootCompleted",
        ]
        .iter()
        .all(|r| reasons.iter().any(|x| x == r))
    })
    .await;
    // After the cycle the agent is idle again: it holds one watch (its own Node, for reboot
    // requests; opened before the count starts) and makes no requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.reset_request_counts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.request_counts().total(),
        0,
        "an idle agent makes no API requests"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn administrator_cordon_is_kept() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.set_unschedulable("n0", true);
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 records that kreboot did not cordon", || {
        annotation(&sim, "n0", ANN_CORDONED_BY_KREBOOT).as_deref() == Some("false")
    })
    .await;
    wait_for(LIMIT, "n0 completes its reboot", || completed(&sim, "n0")).await;
    assert!(unschedulable(&sim, "n0"), "the administrator's cordon stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_window_then_live_configmap_change() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.configmap_put("kube-system", "kreboot-config", window_policy(false));
    fleet.start_all();
    fleet.require_reboot("n0");
    let metrics = fleet.metrics("n0").unwrap();
    wait_for(LIMIT, "agent sees the closed window", || {
        metrics
            .render()
            .contains("kreboot_reboot_blocked{node=\"n0\",reason=\"window_closed\"} 1")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lease_holder(&sim, "kreboot-lock"),
        None,
        "no lock taken outside the window"
    );
    assert!(!unschedulable(&sim, "n0"));
    let opened = std::time::Instant::now();
    sim.configmap_put("kube-system", "kreboot-config", window_policy(true));
    wait_for(LIMIT, "n0 starts once the window opens", || {
        annotation(&sim, "n0", ANN_PHASE).is_some() || completed(&sim, "n0")
    })
    .await;
    let reaction = opened.elapsed();
    assert!(
        reaction < Duration::from_secs(3),
        "reacted to the ConfigMap in {reaction:?}"
    );
    wait_for(LIMIT, "n0 completes", || completed(&sim, "n0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configmap_keeps_last_good_policy() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.configmap_put("kube-system", "kreboot-config", window_policy(false));
    fleet.start_all();
    fleet.require_reboot("n0");
    let metrics = fleet.metrics("n0").unwrap();
    wait_for(LIMIT, "closed window seen", || {
        metrics.render().contains("kreboot_window_open{node=\"n0\"} 0")
    })
    .await;
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([(
            "config.yaml".to_string(),
            "windows: [{days: [someday], start: 25:00}]".to_string(),
        )]),
    );
    wait_for(LIMIT, "config reported invalid", || {
        metrics.render().contains("kreboot_config_valid{node=\"n0\"} 0")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lease_holder(&sim, "kreboot-lock"),
        None,
        "the closed window still applies"
    );
    assert!(annotation(&sim, "n0", ANN_PHASE).is_none());
    wait_for(LIMIT, "ConfigInvalid event", || {
        sim.events()
            .iter()
            .any(|e| e.get("reason").and_then(|r| r.as_str()) == Some("ConfigInvalid"))
    })
    .await;
    sim.configmap_put("kube-system", "kreboot-config", window_policy(true));
    wait_for(LIMIT, "n0 completes once a valid open window arrives", || {
        completed(&sim, "n0")
    })
    .await;
    assert!(metrics.render().contains("kreboot_config_valid{node=\"n0\"} 1"));
}

async fn rolling(nodes: usize, concurrency: u32) {
    let (sim, fleet) = cluster(nodes, |c| c.concurrency = concurrency).await;
    let monitor = OutMonitor::start(&sim).await;
    fleet.start_all();
    for n in fleet.nodes() {
        fleet.require_reboot(&n);
    }
    wait_for(Duration::from_secs(60), "every node completes", || {
        fleet.nodes().iter().all(|n| completed(&sim, n))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let max = monitor.max();
    assert!(
        max <= concurrency as usize,
        "{max} nodes out at once with --concurrency {concurrency}"
    );
    // With more nodes than slots, the slots fill: exactly `concurrency` out at some moment
    // (`max >= 1` could not tell a fleet that never used its second slot).
    if nodes as u32 > concurrency {
        assert_eq!(
            max, concurrency as usize,
            "{nodes} nodes with --concurrency {concurrency}: never that many out at once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_concurrency_one() {
    rolling(2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_concurrency_one() {
    rolling(5, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_concurrency_two() {
    rolling(5, 2).await;
}

async fn pdb_cluster(
    force: bool,
) -> (
    kreboot_testkit::sim::SimCluster,
    kreboot_testkit::sim::fleet::Fleet,
) {
    let (sim, fleet) = cluster(1, |c| {
        c.drain_timeout = Duration::from_secs(2);
        c.force_reboot = force;
    })
    .await;
    sim.add_pod(db_pod("db-0", "n0").grace(1).shutdown_seconds(0.1).build());
    guard_db_pods(&sim);
    (sim, fleet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdb_blocks_and_drain_timeout_uncordons_and_releases() {
    let (sim, fleet) = pdb_cluster(false).await;
    let before = boot_id(&sim, "n0");
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "the drain fails and is recorded", || {
        annotation(&sim, "n0", ANN_LAST_FAILURE).is_some()
    })
    .await;
    wait_for(LIMIT, "lock released", || {
        lease_holder(&sim, "kreboot-lock").is_none()
    })
    .await;
    assert_eq!(
        annotation(&sim, "n0", ANN_LAST_FAILURE_REASON).as_deref(),
        Some("drain_timeout")
    );
    assert!(!unschedulable(&sim, "n0"), "uncordoned after the failed drain");
    assert_eq!(
        annotation(&sim, "n0", kreboot::node::ANN_REBOOT_REASON).as_deref(),
        Some("linux-image-generic"),
        "why the node needs a reboot is recorded on it"
    );
    assert!(annotation(&sim, "n0", ANN_PHASE).is_none());
    assert_eq!(boot_id(&sim, "n0"), before, "no reboot");
    assert!(
        sim.pods_on("n0")
            .iter()
            .any(|p| p.metadata.name.as_deref() == Some("db-0")),
        "PDB respected"
    );
    let metrics = fleet.metrics("n0").unwrap().render();
    assert!(
        metrics.contains("reason=\"drain_timeout\",step=\"drain\"} 1"),
        "{metrics}"
    );
    assert!(event_reasons(&sim, "n0").iter().any(|r| r == "DrainFailed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pdb_with_force_reboot_reboots() {
    let (sim, fleet) = pdb_cluster(true).await;
    let before = boot_id(&sim, "n0");
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 completes despite the PDB", || completed(&sim, "n0")).await;
    assert_ne!(boot_id(&sim, "n0"), before);
}

fn foreign_lease(holder: &str, renewed_ago: chrono::Duration, duration: i32) -> Lease {
    let renewed = Utc::now() - renewed_ago;
    let ts = k8s_openapi::jiff::Timestamp::from_microsecond(renewed.timestamp_micros()).unwrap();
    Lease {
        metadata: ObjectMeta {
            name: Some("kreboot-lock".into()),
            labels: Some(BTreeMap::from([(
                LOCK_LABEL.to_string(),
                "kreboot-lock".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            acquire_time: Some(MicroTime(ts)),
            renew_time: Some(MicroTime(ts)),
            lease_duration_seconds: Some(duration),
            ..LeaseSpec::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_holder_node_frees_the_lock_at_once() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    // The ghost was a kreboot holder mid-cycle: it carries the holder label.
    sim.add_node(
        "ghost",
        BTreeMap::from([(kreboot::node::LABEL_HOLDER.to_string(), "true".to_string())]),
    );
    let leases: Api<Lease> = Api::namespaced(sim.client().await, "kube-system");
    leases
        .create(
            &PostParams::default(),
            &foreign_lease("ghost", chrono::Duration::zero(), 3600),
        )
        .await
        .unwrap();
    fleet.start_all();
    fleet.require_reboot("n0");
    let metrics = fleet.metrics("n0").unwrap();
    wait_for(LIMIT, "n0 waits for the lock", || {
        metrics.render().contains("state=\"waiting_for_lock\"} 1")
    })
    .await;
    let deleted = std::time::Instant::now();
    sim.delete_node("ghost");
    wait_for(LIMIT, "n0 takes the ghost's lock", || {
        lease_holder(&sim, "kreboot-lock").as_deref() == Some("n0")
    })
    .await;
    let took = deleted.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "took the ghost lock after {took:?}"
    );
    wait_for(LIMIT, "n0 completes", || completed(&sim, "n0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_lease_is_taken_over() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.add_node("other", BTreeMap::new());
    let leases: Api<Lease> = Api::namespaced(sim.client().await, "kube-system");
    leases
        .create(
            &PostParams::default(),
            // Expired by its timestamps long ago; the agent still watches it unchanged for its
            // 3 s duration (on its own clock) before taking it.
            &foreign_lease("other", chrono::Duration::seconds(300), 3),
        )
        .await
        .unwrap();
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 completes with the expired lease", || {
        completed(&sim, "n0")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_held_by_a_live_node_is_respected_until_it_expires() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.add_node("other", BTreeMap::new());
    let leases: Api<Lease> = Api::namespaced(sim.client().await, "kube-system");
    // Renewed an hour ago by its timestamp (or by a holder whose clock is an hour behind) with
    // a 3 s duration: this agent sees this version only now, and expiry is judged on its own
    // monotonic clock from that sight, never by the timestamp: it waits the 3 s.
    leases
        .create(
            &PostParams::default(),
            &foreign_lease("other", chrono::Duration::seconds(3600), 3),
        )
        .await
        .unwrap();
    let started = std::time::Instant::now();
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 takes the lock after expiry", || {
        lease_holder(&sim, "kreboot-lock").as_deref() == Some("n0")
    })
    .await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "took a live lease after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(6),
        "woke up at expiry without polling: {waited:?}"
    );
}

/// Kills the agent the moment the node reaches `step`, restarts it, and checks that the cycle
/// completes with exactly one reboot.
async fn killed_at(step: &str) {
    let (sim, fleet) = cluster(1, |_| {}).await;
    let mut sim_events = sim.subscribe();
    fleet.start_all();
    fleet.require_reboot("n0");
    let reached = |sim: &kreboot_testkit::sim::SimCluster| match step {
        "locked" => lease_holder(sim, "kreboot-lock").is_some(),
        "cordoned" => unschedulable(sim, "n0"),
        "evicting" => sim
            .pods_on("n0")
            .iter()
            .any(|p| p.metadata.deletion_timestamp.is_some()),
        "rebooting" => annotation(sim, "n0", ANN_PHASE).as_deref() == Some("rebooting"),
        _ => unreachable!(),
    };
    wait_for(LIMIT, step, || reached(&sim)).await;
    // The kill must land inside the cycle, not after it: a test that accepted an already
    // completed cycle could pass without killing anything that mattered.
    assert!(
        !completed(&sim, "n0"),
        "killed at {step}: the cycle had already completed"
    );
    fleet.kill("n0");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A node that went down is restarted by the fleet when it is Ready again, as the
    // DaemonSet would; otherwise restart the agent now.
    if !fleet.running("n0") && node_ready(&sim, "n0") {
        fleet.start("n0");
    }
    wait_for(LIMIT, "n0 completes after the crash", || completed(&sim, "n0")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut reboots = 0;
    while let Ok(ev) = sim_events.try_recv() {
        if matches!(ev, SimEvent::RebootStarted { .. }) {
            reboots += 1;
        }
    }
    assert_eq!(reboots, 1, "killed at {step}: exactly one reboot");
    assert!(!unschedulable(&sim, "n0"));
    assert_eq!(lease_holder(&sim, "kreboot-lock"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_locking() {
    killed_at("locked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_cordoning() {
    killed_at("cordoned").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_while_evicting() {
    killed_at("evicting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_recording_the_reboot() {
    killed_at("rebooting").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_mid_drain_resumes() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.add_pod(slow_pod("n0", 2, 1.5));
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "draining", || {
        annotation(&sim, "n0", ANN_PHASE).as_deref() == Some("draining")
    })
    .await;
    fleet.stop("n0").await;
    assert_eq!(
        lease_holder(&sim, "kreboot-lock").as_deref(),
        Some("n0"),
        "SIGTERM keeps the lock (it may be the reboot's own SIGTERM)"
    );
    assert!(unschedulable(&sim, "n0"), "and the cordon");
    fleet.start("n0");
    wait_for(LIMIT, "n0 completes after the restart", || completed(&sim, "n0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_loop_protection_holds_back_a_second_reboot() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "first reboot completes", || completed(&sim, "n0")).await;
    let after_first = boot_id(&sim, "n0");
    fleet.require_reboot("n0");
    let metrics = fleet.metrics("n0").unwrap();
    wait_for(LIMIT, "back-off reported", || {
        metrics
            .render()
            .contains("kreboot_reboot_loop_backoff{node=\"n0\"} 1")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(boot_id(&sim, "n0"), after_first, "no second reboot at once");
    assert_eq!(lease_holder(&sim, "kreboot-lock"), None);
}
