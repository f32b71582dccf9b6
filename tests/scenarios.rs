//! One set of scenarios, run on both backends (tests/common/backend.rs): the simulated cluster
//! and the real control plane (kube-apiserver, etcd, kube-controller-manager, KWOK). Each
//! scenario is an `async fn(Kind)`; `on_both!` makes a `sim` and a `real` test of it. The
//! agents are the real `kreboot` binary, one process per node.

mod common;

use std::time::{Duration, Instant};

use common::{
    OutMonitor,
    backend::{Backend, Kind, Machine, NS},
};
use kreboot::node::{ANN_LAST_REBOOT, ANN_PHASE, ANN_PRE_REBOOT_BOOT_ID};

/// Makes `mod NAME { sim, real }` tests of `async fn NAME(Kind)`.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sim() {
                super::$name(super::Kind::Sim).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() {
                super::$name(super::Kind::Real).await
            }
        }
    )*};
}

on_both!(
    full_cycle_one_at_a_time,
    admin_cordon_is_kept,
    window_opened_by_live_configmap_edit,
    concurrency_two_never_three,
    drain_waits_for_pdb,
    ghost_lock_is_freed,
);

const LIMIT: Duration = Duration::from_secs(90);

/// `count` nodes n0.. each with two app pods, and one machine (agent) per node.
async fn cluster(kind: Kind, count: usize, args: &[&str]) -> (Backend, Vec<Machine>) {
    let b = Backend::start(kind).await;
    let mut machines = Vec::new();
    for i in 0..count {
        let name = format!("n{i}");
        b.add_node(&name, &[]).await;
        for p in 0..2 {
            b.add_pod("apps", &format!("{name}-app-{p}"), &name, &[("app", "web")])
                .await;
        }
        machines.push(Machine::new(&name, &b.kubeconfig(), args));
    }
    b.wait_pods_ready("apps").await;
    (b, machines)
}

/// Plays every machine (reboots asked for) until `done` holds, or panics after `limit`.
async fn run_until<F, Fut>(b: &Backend, machines: &mut [Machine], limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        for m in machines.iter_mut() {
            m.supervise(b).await;
        }
        if done().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node finished a cycle: a reboot recorded, no phase, not holding a slot.
async fn completed(b: &Backend, node: &str) -> bool {
    b.annotation(node, ANN_LAST_REBOOT).await.is_some()
        && b.annotation(node, ANN_PHASE).await.is_none()
        && !b.holders().await.iter().any(|h| h == node)
}

async fn all_completed(b: &Backend, nodes: &[&str]) -> bool {
    for n in nodes {
        if !completed(b, n).await {
            return false;
        }
    }
    true
}

/// Three nodes need a reboot at once; with `--concurrency 1` they go one at a time, each
/// through drain, reboot (recognised by the changed bootID) and uncordon.
async fn full_cycle_one_at_a_time(kind: Kind) {
    let (b, mut machines) = cluster(kind, 3, &[]).await;
    let boot_before: Vec<String> =
        futures::future::join_all(machines.iter().map(|m| b.boot_id(&m.node))).await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let nodes = ["n0", "n1", "n2"];
    run_until(&b, &mut machines, LIMIT, "every node rebooted once", || {
        all_completed(&b, &nodes)
    })
    .await;
    for (m, before) in machines.iter().zip(&boot_before) {
        assert_eq!(m.reboots, 1, "{} rebooted exactly once", m.node);
        assert_ne!(&b.boot_id(&m.node).await, before, "{} has a new boot id", m.node);
        assert!(!b.unschedulable(&m.node).await, "{} uncordoned", m.node);
        assert!(b.annotation(&m.node, ANN_PRE_REBOOT_BOOT_ID).await.is_none());
    }
    assert_eq!(
        monitor.max(),
        1,
        "never more than one node out with --concurrency 1"
    );
    // The evicted pods are gone (no controller recreates them here).
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(b.client(), "apps");
    let left = pods.list(&Default::default()).await.unwrap().items.len();
    assert_eq!(left, 0, "every app pod was evicted");
}

/// A node an administrator cordoned is rebooted but stays cordoned.
async fn admin_cordon_is_kept(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &[]).await;
    b.cordon("n0").await;
    machines[0].require_reboot();
    machines[0].start();
    run_until(&b, &mut machines, LIMIT, "n0 rebooted", || completed(&b, "n0")).await;
    assert_eq!(machines[0].reboots, 1);
    assert!(b.unschedulable("n0").await, "the administrator's cordon is kept");
}

/// A policy whose only window is open now (`open`) or opens in two hours.
fn window_policy(open: bool) -> String {
    let now = chrono::Utc::now();
    let (start, end) = if open {
        (now - chrono::Duration::hours(1), now + chrono::Duration::hours(2))
    } else {
        (now + chrono::Duration::hours(2), now + chrono::Duration::hours(3))
    };
    format!(
        "timezone: UTC\nwindows:\n  - days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"{}\"\n    end: \"{}\"\n",
        start.format("%H:%M"),
        end.format("%H:%M")
    )
}

/// Outside the window nothing happens; a live edit of the ConfigMap opens it and the node
/// goes at once, without an agent restart.
async fn window_opened_by_live_configmap_edit(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &[]).await;
    b.set_policy(&window_policy(false)).await;
    machines[0].require_reboot();
    machines[0].start();
    let port = machines[0].metrics_port;
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "the agent reports the closed window",
        || async move {
            scrape(port)
                .await
                .contains("kreboot_reboot_blocked{node=\"n0\",reason=\"window_closed\"} 1")
        },
    )
    .await;
    let holders = b.holders().await;
    assert!(
        holders.is_empty(),
        "no lock outside the window: {holders:?} {:?}",
        b.leases().await
    );
    assert!(!b.unschedulable("n0").await, "no cordon outside the window");
    b.set_policy(&window_policy(true)).await;
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "n0 rebooted once the window opened",
        || completed(&b, "n0"),
    )
    .await;
    assert_eq!(machines[0].reboots, 1);
}

/// With `--concurrency 2`, two of four nodes are out at once, never three.
async fn concurrency_two_never_three(kind: Kind) {
    let (b, mut machines) = cluster(kind, 4, &["--concurrency", "2"]).await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let nodes = ["n0", "n1", "n2", "n3"];
    run_until(&b, &mut machines, LIMIT, "every node rebooted", || {
        all_completed(&b, &nodes)
    })
    .await;
    assert_eq!(monitor.max(), 2, "two nodes out at once, never three");
}

/// A PDB with `minAvailable` equal to the Ready pods refuses the eviction (429 from the real
/// disruption rules); kreboot keeps waiting with the node cordoned and goes on once the budget
/// allows it.
async fn drain_waits_for_pdb(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &["--drain-timeout", "5m"]).await;
    b.add_pod("apps", "db-0", "n0", &[("app", "db")]).await;
    b.wait_pods_ready("apps").await;
    b.add_pdb("apps", "db", &[("app", "db")], 1).await;
    machines[0].require_reboot();
    machines[0].start();
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "n0 drained its other pods and waits for the PDB",
        || async {
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(b.client(), "apps");
            let names: Vec<String> = pods
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.metadata.name)
                .collect();
            names == ["db-0"]
        },
    )
    .await;
    // Held: still draining a while later, cordoned, not rebooted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.annotation("n0", ANN_PHASE).await.as_deref(), Some("draining"));
    assert!(b.unschedulable("n0").await);
    assert_eq!(machines[0].reboots, 0);
    // The budget allows it: kreboot goes on.
    let pdbs: kube::Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        kube::Api::namespaced(b.client(), "apps");
    pdbs.patch(
        "db",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"spec": {"minAvailable": 0}})),
    )
    .await
    .unwrap();
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "n0 rebooted after the PDB allowed it",
        || completed(&b, "n0"),
    )
    .await;
}

/// A slot held by a node whose Node object is deleted (a scaled-down VM) is freed at once.
async fn ghost_lock_is_freed(kind: Kind) {
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = kube::Api::namespaced(b.client(), NS);
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    leases
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": { "name": "kreboot-lock", "labels": { "kreboot.io/lock": "kreboot-lock" } },
                "spec": {
                    "holderIdentity": "n1", "leaseDurationSeconds": 3600,
                    "acquireTime": now, "renewTime": now,
                },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    machines[0].require_reboot();
    machines[0].start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        b.annotation("n0", ANN_PHASE).await.is_none(),
        "n1 holds the lock: n0 waits"
    );
    b.delete_node("n1").await;
    let deleted = Instant::now();
    run_until(
        &b,
        &mut machines[..1],
        LIMIT,
        "n0 rebooted in the ghost's slot",
        || completed(&b, "n0"),
    )
    .await;
    eprintln!(
        "ghost's slot taken and n0's cycle done {:?} after its Node was deleted",
        deleted.elapsed()
    );
    assert!(
        deleted.elapsed() < Duration::from_secs(15),
        "the ghost lock was freed promptly"
    );
    assert_eq!(machines[0].reboots, 1);
}

async fn scrape(port: u16) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .await;
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}
