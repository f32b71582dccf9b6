//! One set of scenarios, run on both backends (tests/common/backend.rs): the simulated cluster
//! and the real control plane (kube-apiserver, etcd, kube-controller-manager, KWOK). Each
//! scenario is an `async fn(Kind)`; `on_both!` makes a `sim` and a `real` test of it. The
//! agents are the real `kreboot` binary, one process per node.

mod common;

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    OutMonitor,
    backend::{Backend, Kind, Machine, NS},
    wait_until,
};
use kreboot::node::{
    ANN_BLOCKED_BY, ANN_CORDONED_BY_KREBOOT, ANN_LAST_FAILURE, ANN_LAST_FAILURE_REASON, ANN_LAST_REBOOT,
    ANN_LOCK, ANN_PHASE, ANN_PRE_REBOOT_BOOT_ID, ANN_REBOOT_REASON, ANN_REBOOT_REQUESTED,
    ANN_REBOOT_REQUIRED_SINCE, ANN_WAITING_SINCE, LABEL_HOLDER, LABEL_WAITING,
};
use serde_json::{Value, json};

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
    percent_budget_two_of_eight,
    max_concurrent_across_groups,
    max_concurrent_percent_across_groups,
    soak_between_nodes,
    health_gate_holds_the_lock,
    health_gate_waits_for_disruption_budgets,
    drain_waits_for_pdb,
    ghost_lock_is_freed,
    crash_after_lock_resumes,
    crash_while_draining_resumes,
    crash_before_reboot_command_resumes,
    crash_after_reboot_resumes,
    reboot_recognised_by_boot_id,
    drain_and_uncordon_commands,
    status_golden_table,
    event_reasons_accepted,
    pause_holds_a_waiting_node_and_resume_lets_it_go,
    reboot_on_request_goes_through_window_and_lock,
    operators_drain_is_respected,
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

/// A rule `concurrency: "25%"` over eight nodes: two out at once (25% of 8), never three; the
/// agents' own `--concurrency` (5) does not apply to the rule's nodes.
async fn percent_budget_two_of_eight(kind: Kind) {
    let (b, mut machines) = cluster(kind, 8, &["--concurrency", "5"]).await;
    b.set_policy("rules:\n  - name: all\n    nodeSelector: {}\n    concurrency: \"25%\"\n")
        .await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let nodes: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    run_until(&b, &mut machines, LIMIT, "every node rebooted", || {
        all_completed(&b, &nodes)
    })
    .await;
    assert_eq!(monitor.max(), 2, "25% of 8 nodes: two out at once, never three");
    let names: Vec<String> = b
        .leases()
        .await
        .iter()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("kreboot-lock-r-all")) && names.len() == 2,
        "the rule's two slots, none of the agents' own: {names:?}"
    );
}

/// Three pools of two nodes, one slot per pool (`lockGroup`), `maxConcurrent: 2` over them: two
/// nodes out at once, never three, and every node rebooted.
async fn max_concurrent_across_groups(kind: Kind) {
    capped_pools(kind, 3, "2", 2).await;
}

/// Four pools of two nodes, one slot per pool, `maxConcurrent: "25%"` of the rule's eight
/// nodes: two out at once (not the four the pools alone would allow), never three.
async fn max_concurrent_percent_across_groups(kind: Kind) {
    capped_pools(kind, 4, "\"25%\"", 2).await;
}

/// `pools` pools of two nodes, `concurrency: 1` per pool and `maxConcurrent: <cap>` over them:
/// exactly `expected` nodes out at once at the most, and every node rebooted.
async fn capped_pools(kind: Kind, pools: usize, cap: &str, expected: usize) {
    let b = Backend::start(kind).await;
    let mut machines = Vec::new();
    let names = ["a", "b", "c", "d"];
    let count = pools * 2;
    for i in 0..count {
        let name = format!("n{i}");
        b.add_node(&name, &[("pool", names[i % pools])]).await;
        b.add_pod("apps", &format!("{name}-app-0"), &name, &[("app", "web")])
            .await;
        machines.push(Machine::new(&name, &b.kubeconfig(), &[]));
    }
    b.wait_pods_ready("apps").await;
    b.set_policy(&format!(
        "rules:\n  - name: pools\n    nodeSelector: {{}}\n    concurrency: 1\n    lockGroup: {{byLabel: pool, maxConcurrent: {cap}}}\n"
    ))
    .await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let nodes: Vec<String> = (0..count).map(|i| format!("n{i}")).collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    run_until(&b, &mut machines, LIMIT, "every node rebooted", || {
        all_completed(&b, &nodes)
    })
    .await;
    assert_eq!(
        monitor.max(),
        expected,
        "{pools} pools, maxConcurrent {cap}: {expected} out at once, never more"
    );
}

/// A rule `soak: 8s`: the second node gets the slot when the first hands it over, keeps it,
/// and starts (cordons) no sooner than 8 s after the hand-over, and soon after; meanwhile its
/// Node and `kreboot status` say it is soaking.
async fn soak_between_nodes(kind: Kind) {
    const SOAK: Duration = Duration::from_secs(8);
    const SLOT: &str = "kreboot-lock-r-all";
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    b.set_policy("rules:\n  - name: all\n    nodeSelector: {}\n    concurrency: 1\n    soak: 8s\n")
        .await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let deadline = Instant::now() + LIMIT;
    let mut first: Option<&str> = None;
    let mut released: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut second_start: Option<chrono::DateTime<chrono::Utc>> = None;
    let mut status_shown = false;
    let mut metric_seen = false;
    loop {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        if first.is_none() {
            for n in ["n0", "n1"] {
                if completed(&b, n).await {
                    first = Some(n);
                }
            }
        }
        if let Some(f) = first {
            let second = if f == "n0" { "n1" } else { "n0" };
            if released.is_none() {
                // The hand-over time, as the first node recorded it on the slot.
                released = b
                    .leases()
                    .await
                    .iter()
                    .find(|l| l.metadata.name.as_deref() == Some(SLOT))
                    .and_then(kreboot::lock::released_at);
            }
            if second_start.is_none() && b.annotation(second, ANN_PHASE).await.is_some() {
                second_start = Some(chrono::Utc::now());
            }
            let blocked = b.annotation(second, "kreboot.io/blocked-by").await;
            if second_start.is_none() && !metric_seen {
                let port = machines.iter().find(|m| m.node == second).map(|m| m.metrics_port);
                if let Some(port) = port {
                    metric_seen = scrape(port).await.contains(&format!(
                        "kreboot_reboot_blocked{{node=\"{second}\",reason=\"soaking\"}} 1"
                    ));
                }
            }
            if second_start.is_none()
                && !status_shown
                && blocked
                    .as_deref()
                    .is_some_and(|r| r.starts_with("soaking until "))
            {
                assert_eq!(b.holders().await, [second], "the soaking node keeps the slot");
                let out = kreboot_cmd(&b, &["status", "--namespace", NS]).await;
                let table = text(&out.stdout);
                assert!(
                    table
                        .lines()
                        .any(|l| l.starts_with(second) && l.contains("soaking until")),
                    "status shows why {second} waits:\n{table}"
                );
                status_shown = true;
            }
        }
        if all_completed(&b, &["n0", "n1"]).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: both nodes rebooted with a soak between"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = released.expect("the first node recorded its hand-over on the Lease");
    let started = second_start.expect("the second node was seen starting");
    let gap = (started - released).to_std().unwrap_or(Duration::ZERO);
    assert!(
        gap >= SOAK,
        "the second node started {gap:?} after the hand-over, inside the soak"
    );
    assert!(
        gap < SOAK + Duration::from_secs(5),
        "and soon after the soak: {gap:?}"
    );
    assert!(status_shown, "the soak was seen in kreboot status");
    assert!(
        metric_seen,
        "kreboot_reboot_blocked{{reason=\"soaking\"}} was 1 during the soak"
    );
    assert_eq!(monitor.max(), 1, "one at a time");
}

/// Sets a pod's Ready condition, as its kubelet would.
async fn set_pod_ready(b: &Backend, ns: &str, name: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(b.client(), ns)
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                json!({"status": {"conditions": [{"type": "Ready", "status": status}]}}),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("set {ns}/{name} Ready={ready}: {e}"));
}

/// A rule `healthGate: {timeout: 4s}`: after its reboot the first node is uncordoned but keeps
/// its slot while its DaemonSet pod is not Ready; past the timeout the cycle fails (Event
/// `HealthGateFailed`, `kreboot_health_gate_failed 1`) and the slot is still kept, so the second
/// node does not start; once the pod is Ready the slot goes on, the second node cordons within
/// a second, and the rollout finishes.
async fn health_gate_holds_the_lock(kind: Kind) {
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    for n in ["n0", "n1"] {
        b.add_daemonset_pod("apps", &format!("{n}-ds"), n).await;
    }
    b.wait_pods_ready("apps").await;
    for n in ["n0", "n1"] {
        set_pod_ready(&b, "apps", &format!("{n}-ds"), false).await;
    }
    b.set_policy(
        "rules:\n  - name: all\n    nodeSelector: {}\n    concurrency: 1\n    healthGate: {timeout: 4s}\n",
    )
    .await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    // The first node to reboot goes into the gate.
    async fn verifying(b: &Backend) -> Option<&'static str> {
        for n in ["n0", "n1"] {
            if b.annotation(n, ANN_PHASE).await.as_deref() == Some("verifying") {
                return Some(n);
            }
        }
        None
    }
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "a node rebooted and in its health gate",
        || async { verifying(&b).await.is_some() },
    )
    .await;
    let first = verifying(&b).await.expect("a node in its health gate");
    let second = if first == "n0" { "n1" } else { "n0" };
    assert!(!b.unschedulable(first).await, "{first} is uncordoned in its gate");
    assert!(b.annotation(first, ANN_LAST_REBOOT).await.is_some());
    assert_eq!(b.holders().await, [first], "{first} keeps its slot");
    let port = machines
        .iter()
        .find(|m| m.node == first)
        .expect("machine")
        .metrics_port;
    // Past the timeout: the failure is reported and the slot still kept.
    run_until(&b, &mut machines, LIMIT, "the health gate fails", || async {
        event_count(&b.node_events().await, first, "HealthGateFailed") == 1
    })
    .await;
    wait_until(LIMIT, "kreboot_health_gate_failed 1", || async move {
        scrape(port)
            .await
            .contains(&format!("kreboot_health_gate_failed{{node=\"{first}\"}} 1"))
    })
    .await;
    let out = kreboot_cmd(&b, &["status", "--namespace", NS]).await;
    let table = text(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(first) && l.contains("verifying") && l.contains("health_gate")),
        "status shows the gate:\n{table}"
    );
    for _ in 0..20 {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        assert_eq!(b.holders().await, [first], "the failed gate keeps the slot");
        assert!(
            b.annotation(second, ANN_PHASE).await.is_none(),
            "{second} does not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Healthy: the slot goes on at once (the second node cordons within a second); the second
    // node passes its gate as soon as its pod is Ready.
    set_pod_ready(&b, "apps", &format!("{first}-ds"), true).await;
    let ready_at = Instant::now();
    while !b.unschedulable(second).await {
        assert!(
            ready_at.elapsed() < LIMIT,
            "timed out: {second} cordons after {first}'s pod is Ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = ready_at.elapsed();
    eprintln!("{second} cordoned {gap:?} after {first}'s DaemonSet pod turned Ready");
    assert!(
        gap < Duration::from_millis(1500),
        "{second} cordoned {gap:?} after {first} was healthy"
    );
    set_pod_ready(&b, "apps", &format!("{second}-ds"), true).await;
    run_until(&b, &mut machines, LIMIT, "both nodes through their gates", || {
        all_completed(&b, &["n0", "n1"])
    })
    .await;
    assert_eq!(monitor.max(), 1, "one node out at once");
    assert_eq!(
        event_count(&b.node_events().await, second, "HealthGateFailed"),
        0,
        "{second} was healthy at once"
    );
    wait_until(LIMIT, "kreboot_health_gate_failed back to 0", || async move {
        scrape(port)
            .await
            .contains(&format!("kreboot_health_gate_failed{{node=\"{first}\"}} 0"))
    })
    .await;
}

/// The application of the budget scenario: pods `app=web` in namespace `apps`.
const WEB: (&str, &str) = ("app", "web");

/// What the disruption controller does on the real control plane, for the simulator (which has
/// none): the budget `apps/web`'s status from its pods (`minAvailable` integer), written only
/// on change. Nothing on the real backend.
async fn sync_sim_budget(b: &Backend) {
    let Backend::Sim(s, _) = b else {
        return;
    };
    let pods = b.pods("apps").await;
    let matching: Vec<_> = pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(WEB.0))
                    .map(String::as_str)
                    == Some(WEB.1)
        })
        .collect();
    let healthy = matching.iter().filter(|p| common::backend::pod_ready(p)).count() as i64;
    let expected = matching.len() as i64;
    let _ = s
        .store()
        .update(kreboot_testkit::sim::store::Kind::Pdb, "apps", "web", |old| {
            let min = old
                .pointer("/spec/minAvailable")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let status = json!({
                "currentHealthy": healthy, "desiredHealthy": min, "expectedPods": expected,
                "disruptionsAllowed": (healthy - min).max(0), "observedGeneration": 1,
            });
            if old.get("status") == Some(&status) {
                // No change: no write, no watch event.
                return Err(kreboot_testkit::sim::store::StoreError {
                    code: 409,
                    reason: "Conflict",
                    message: "unchanged".into(),
                });
            }
            let mut new = old.clone();
            new["status"] = status;
            Ok(new)
        });
}

/// Plays the application's controller: for every `app=web` pod gone (evicted), a replacement
/// on node `spare` (no Node object: no kubelet plays it, so it stays unready until the test
/// says otherwise), Ready at once when `ready`. Returns the replacements created.
async fn replace_evicted(b: &Backend, want: usize, ready: bool, next: &mut usize) -> Vec<String> {
    let live = b
        .pods("apps")
        .await
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(WEB.0))
                    .map(String::as_str)
                    == Some(WEB.1)
        })
        .count();
    let mut created = Vec::new();
    for _ in live..want {
        let name = format!("web-r{next}");
        *next += 1;
        match b {
            Backend::Sim(s, _) => s.add_pod(
                kreboot_testkit::sim::pod("apps", &name, "spare")
                    .labels([WEB])
                    .phase("Pending")
                    .build(),
            ),
            Backend::Real(_) => {
                let pod = json!({
                    "metadata": { "name": name, "labels": { WEB.0: WEB.1 } },
                    "spec": {
                        "nodeName": "spare",
                        "automountServiceAccountToken": false,
                        "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
                    },
                });
                kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(b.client(), "apps")
                    .create(&Default::default(), &serde_json::from_value(pod).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("create replacement {name}: {e}"));
            }
        }
        if ready {
            set_replacement_ready(b, &name).await;
        }
        created.push(name);
    }
    created
}

/// A replacement pod starts: Running and Ready, as its kubelet would report.
async fn set_replacement_ready(b: &Backend, name: &str) {
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(b.client(), "apps")
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": "True" }],
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("set {name} Ready: {e}"));
}

/// The health gate's budget check (`healthGate` with `disruptionBudgets` on by default): two
/// nodes, one `app=web` pod each, a PDB `minAvailable: 1`. The first node's drain evicts its
/// pod (the budget allows it) and records the budget; the replacement (played by the test) is
/// not Ready, so after the reboot the first node keeps the slot (`health_gate: pdb apps/web
/// 1/2 healthy` on the Node and in `kreboot status`), the gate times out with
/// `HealthGateFailed` naming the budget, and the second node does not cordon; once the
/// replacement is Ready (and on the real control plane the disruption controller says so) the
/// second node cordons within a second or so, and the rollout finishes.
async fn health_gate_waits_for_disruption_budgets(kind: Kind) {
    let b = Backend::start(kind).await;
    let mut machines = Vec::new();
    for (i, n) in ["n0", "n1"].into_iter().enumerate() {
        b.add_node(n, &[]).await;
        b.add_pod("apps", &format!("web-{i}"), n, &[WEB]).await;
        machines.push(Machine::new(n, &b.kubeconfig(), &[]));
    }
    b.wait_pods_ready("apps").await;
    b.add_pdb("apps", "web", &[WEB], 1).await;
    let pdbs: kube::Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
        kube::Api::namespaced(b.client(), "apps");
    let b_ref = &b;
    wait_until(LIMIT, "the budget counts both pods healthy", || {
        let pdbs = pdbs.clone();
        async move {
            let b = b_ref;
            sync_sim_budget(b).await;
            pdbs.get("web")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| s.current_healthy == 2 && s.disruptions_allowed == 1)
        }
    })
    .await;
    b.set_policy(
        "rules:\n  - name: all\n    nodeSelector: {}\n    concurrency: 1\n    healthGate: {timeout: 5s}\n",
    )
    .await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let mut next = 0;
    let mut replacements = Vec::new();
    // Phase 1: the first node reboots; its evicted pod's replacement stays unready.
    let deadline = Instant::now() + LIMIT;
    let first = loop {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        replacements.extend(replace_evicted(&b, 2, false, &mut next).await);
        sync_sim_budget(&b).await;
        let mut found = None;
        for n in ["n0", "n1"] {
            if b.annotation(n, ANN_PHASE).await.as_deref() == Some("verifying") {
                found = Some(n);
            }
        }
        if let Some(n) = found {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: a node rebooted and in its health gate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let second = if first == "n0" { "n1" } else { "n0" };
    assert_eq!(
        replacements.len(),
        1,
        "one pod evicted, one replacement: {replacements:?}"
    );
    assert_eq!(
        b.annotation(first, "kreboot.io/drained-budgets").await.as_deref(),
        Some("apps/web=2"),
        "the drain recorded the budget and its health before"
    );
    wait_until(LIMIT, "the gate names the budget", || async {
        sync_sim_budget(&b).await;
        b.annotation(first, ANN_BLOCKED_BY).await.as_deref() == Some("health_gate: pdb apps/web 1/2 healthy")
    })
    .await;
    let out = kreboot_cmd(&b, &["status", "--namespace", NS]).await;
    let table = text(&out.stdout);
    assert!(
        table.lines().any(|l| l.starts_with(first)
            && l.contains("verifying")
            && l.contains("pdb apps/web 1/2 healthy")),
        "status shows the budget holding {first}:\n{table}"
    );
    // Past the 5 s timeout: reported, naming the budget, and the slot still kept.
    run_until(&b, &mut machines, LIMIT, "the health gate fails", || async {
        event_count(&b.node_events().await, first, "HealthGateFailed") == 1
    })
    .await;
    let events = b.node_events().await;
    let note = events
        .iter()
        .find(|e| e["regarding"]["name"] == first && e["reason"] == "HealthGateFailed")
        .and_then(|e| e["note"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(
        note.contains("pdb apps/web 1/2 healthy"),
        "the Event names the budget: {note}"
    );
    for _ in 0..20 {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        sync_sim_budget(&b).await;
        assert_eq!(b.holders().await, [first], "the gate keeps the slot");
        assert!(!b.unschedulable(second).await, "{second} does not cordon");
        assert!(
            b.annotation(second, ANN_PHASE).await.is_none(),
            "{second} does not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Phase 2: the replacement is Ready; the budget is back; the second node starts.
    set_replacement_ready(&b, &replacements[0]).await;
    let ready_at = Instant::now();
    let deadline = ready_at + LIMIT;
    loop {
        sync_sim_budget(&b).await;
        if b.unschedulable(second).await {
            break;
        }
        assert!(Instant::now() < deadline, "timed out: {second} cordons");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = ready_at.elapsed();
    eprintln!("{second} cordoned {gap:?} after the replacement pod turned Ready");
    assert!(
        gap < Duration::from_millis(1500),
        "{second} cordoned {gap:?} after the budget was healthy again"
    );
    // The rest of the rollout: the second node's pod is replaced at once.
    let deadline = Instant::now() + LIMIT;
    loop {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        replace_evicted(&b, 2, true, &mut next).await;
        sync_sim_budget(&b).await;
        if all_completed(&b, &["n0", "n1"]).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out: both nodes through their gates"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(monitor.max(), 1, "one node out at once");
    assert_eq!(
        event_count(&b.node_events().await, second, "HealthGateFailed"),
        0,
        "{second}'s budget was back at once"
    );
    for n in ["n0", "n1"] {
        assert_eq!(
            b.annotation(n, "kreboot.io/drained-budgets").await,
            None,
            "{n}: the record ends with the cycle"
        );
    }
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

// ---------------------------------------------------------------------------------------------
// Shared by the scenarios below.

/// How many times `reason` was recorded about the object named `name` (an Event the same agent
/// repeats is one object with a `series.count`).
fn event_count(events: &[Value], name: &str, reason: &str) -> u64 {
    events
        .iter()
        .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum()
}

/// Waits until at least `n` Events `reason` about `node` are published (the agent publishes
/// them in the background).
async fn wait_event(b: &Backend, node: &str, reason: &str, n: u64) {
    wait_until(LIMIT, &format!("{n} Event(s) {reason} about {node}"), || async {
        event_count(&b.node_events().await, node, reason) >= n
    })
    .await;
}

/// The `kreboot.io/` annotations and labels on a Node.
async fn kreboot_marks(b: &Backend, node: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let n = b.node(node).await.expect("node exists");
    let ours = |m: Option<std::collections::BTreeMap<String, String>>| -> BTreeSet<String> {
        m.unwrap_or_default()
            .into_keys()
            .filter(|k| k.starts_with(kreboot::node::PREFIX))
            .collect()
    };
    (ours(n.metadata.annotations), ours(n.metadata.labels))
}

/// Plays the machine's reboot once the agent asked for it: waits for the reboot command's mark
/// and for its `Rebooting` Event (published in the background: a machine that went down the
/// same millisecond could lose it), then kills the agent, reboots the Node and starts the agent
/// again, as [`Machine::supervise`].
async fn reboot_when_asked(b: &Backend, m: &mut Machine) {
    let mr: &Machine = m;
    wait_until(LIMIT, "the agent ran its reboot command", move || async move {
        mr.reboot_requested()
    })
    .await;
    wait_event(b, &m.node, "Rebooting", m.reboot_commands() as u64).await;
    assert!(m.supervise(b).await, "the machine rebooted");
}

/// The end of a cycle whose agent was killed somewhere on the way: the machine rebooted once,
/// the reboot command ran `commands` times, the node has a new boot id, is uncordoned, holds no
/// slot, carries only `kreboot.io/last-reboot`, and each step's Event was recorded once
/// (`drains` Draining: a resumed drain announces itself again).
async fn assert_resumed_cleanly(b: &Backend, m: &Machine, boot_before: &str, commands: usize, drains: u64) {
    let node = m.node.as_str();
    wait_until(LIMIT, "the cycle completed", || completed(b, node)).await;
    assert_eq!(m.reboots, 1, "{node}: the machine rebooted exactly once");
    assert_eq!(
        m.reboot_commands(),
        commands,
        "{node}: runs of the reboot command"
    );
    assert_ne!(b.boot_id(node).await, boot_before, "{node}: a new boot id");
    assert!(!b.unschedulable(node).await, "{node}: uncordoned");
    assert!(
        b.holders().await.is_empty(),
        "{node}: lock released: {:?}",
        b.leases().await
    );
    let (annotations, labels) = kreboot_marks(b, node).await;
    assert_eq!(
        annotations,
        BTreeSet::from([ANN_LAST_REBOOT.to_string()]),
        "{node}: only the completed reboot is recorded"
    );
    assert!(labels.is_empty(), "{node}: no kreboot label left: {labels:?}");
    wait_event(b, node, "RebootCompleted", 1).await;
    wait_event(b, node, "Uncordoned", 1).await;
    // Anything still queued would have been published by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let events = b.node_events().await;
    for (reason, want) in [
        ("LockAcquired", 1),
        ("Cordoned", 1),
        ("Draining", drains),
        ("Rebooting", commands as u64),
        ("Uncordoned", 1),
        ("RebootCompleted", 1),
        ("DrainFailed", 0),
        ("RebootFailed", 0),
        ("CycleAborted", 0),
    ] {
        assert_eq!(
            event_count(&events, node, reason),
            want,
            "{node}: Events {reason}"
        );
    }
    let log = m.log();
    assert!(
        !log.contains("failed to publish event"),
        "{node}: an Event was refused:\n{log}"
    );
}

/// A cycle in progress at `phase`, as the Node and the Lease record it (what a crash leaves).
async fn assert_in_cycle(b: &Backend, node: &str, phase: &str) {
    assert_eq!(
        b.annotation(node, ANN_PHASE).await.as_deref(),
        Some(phase),
        "{node}: phase"
    );
    assert!(b.unschedulable(node).await, "{node}: cordoned");
    assert_eq!(
        b.annotation(node, ANN_CORDONED_BY_KREBOOT).await.as_deref(),
        Some("true"),
        "{node}: cordoned by kreboot"
    );
    assert_eq!(b.holders().await, [node], "{node}: holds the lock");
    assert!(b.annotation(node, ANN_LAST_REBOOT).await.is_none());
}

/// A stand-in for Prometheus: `/api/v1/alerts` answers "no alerts" after a delay that the test
/// sets. kreboot checks its blockers afresh right before the cordon, the drain and the reboot,
/// so a slow answer holds the agent between two steps for as long as the test needs.
struct SlowPrometheus {
    url: String,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowPrometheus {
    async fn start(delay: Duration) -> SlowPrometheus {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let d = delay_ms.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let d = d.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(d.load(Ordering::SeqCst))).await;
                    let body = r#"{"status":"success","data":{"alerts":[]}}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        SlowPrometheus { url, delay_ms, task }
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for SlowPrometheus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A SIGKILL of the agent at each step of the cycle; the restarted agent resumes from what the
// Node and the Lease record.

/// Killed right after taking the lock, before the cordon: the restarted agent finds its slot
/// (no second acquisition), cordons once and completes.
async fn crash_after_lock_resumes(kind: Kind) {
    // The blocker check right before the cordon takes 3 s: the window for the crash.
    let prometheus = SlowPrometheus::start(Duration::from_secs(3)).await;
    let (b, mut machines) = cluster(kind, 1, &["--prometheus-url", &prometheus.url]).await;
    let boot = b.boot_id("n0").await;
    let m = &mut machines[0];
    m.require_reboot();
    m.start();
    wait_until(LIMIT, "n0 holds the lock", || async {
        b.holders().await == ["n0"]
    })
    .await;
    wait_event(&b, "n0", "LockAcquired", 1).await;
    m.kill();
    assert!(
        b.annotation("n0", ANN_PHASE).await.is_none() && !b.unschedulable("n0").await,
        "the agent was killed between the lock and the cordon"
    );
    assert_eq!(b.holders().await, ["n0"], "the slot outlives the agent");
    prometheus.set_delay(Duration::ZERO);
    m.start();
    reboot_when_asked(&b, m).await;
    assert_resumed_cleanly(&b, m, &boot, 1, 1).await;
}

/// Killed in the middle of a drain held by a PodDisruptionBudget: the restarted agent resumes
/// the drain (no second cordon) once the budget allows it, and completes.
async fn crash_while_draining_resumes(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &["--drain-timeout", "5m", "--eviction-retry", "1s"]).await;
    b.add_pod("apps", "db-0", "n0", &[("app", "db")]).await;
    b.wait_pods_ready("apps").await;
    b.add_pdb("apps", "db", &[("app", "db")], 1).await;
    let boot = b.boot_id("n0").await;
    let m = &mut machines[0];
    m.require_reboot();
    m.start();
    wait_until(
        LIMIT,
        "n0 evicted its other pods and waits for the PDB",
        || async {
            let left: Vec<String> = b
                .pods("apps")
                .await
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter_map(|p| p.metadata.name)
                .collect();
            left == ["db-0"]
        },
    )
    .await;
    wait_event(&b, "n0", "Draining", 1).await;
    m.kill();
    assert_in_cycle(&b, "n0", "draining").await;
    b.set_pdb_min_available("apps", "db", 0).await;
    m.start();
    let mr: &Machine = m;
    wait_until(LIMIT, "the reboot command ran", move || async move {
        mr.reboot_requested()
    })
    .await;
    assert!(
        b.pods("apps").await.is_empty(),
        "db-0 was evicted before the reboot"
    );
    reboot_when_asked(&b, m).await;
    assert_resumed_cleanly(&b, m, &boot, 1, 2).await;
}

/// Killed after the reboot was recorded (phase `rebooting`, the boot id noted) but before the
/// reboot command ran (`--reboot-delay`): the restarted agent issues the reboot, once.
async fn crash_before_reboot_command_resumes(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &["--reboot-delay", "3s"]).await;
    let boot = b.boot_id("n0").await;
    let m = &mut machines[0];
    m.require_reboot();
    m.start();
    wait_until(LIMIT, "n0 recorded the reboot", || async {
        b.annotation("n0", ANN_PHASE).await.as_deref() == Some("rebooting")
    })
    .await;
    wait_event(&b, "n0", "Draining", 1).await;
    m.kill();
    assert_in_cycle(&b, "n0", "rebooting").await;
    assert_eq!(
        b.annotation("n0", ANN_PRE_REBOOT_BOOT_ID).await.as_deref(),
        Some(boot.as_str()),
        "the boot id before the reboot is recorded"
    );
    assert_eq!(m.reboot_commands(), 0, "killed before the reboot command");
    m.start();
    reboot_when_asked(&b, m).await;
    assert_resumed_cleanly(&b, m, &boot, 1, 1).await;
}

/// The machine rebooted (new boot id, Ready) while its agent was down, before the uncordon:
/// the restarted agent recognises the reboot, uncordons and releases, and reboots nothing.
async fn crash_after_reboot_resumes(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &[]).await;
    let boot = b.boot_id("n0").await;
    let m = &mut machines[0];
    m.require_reboot();
    m.start();
    let mr: &Machine = m;
    wait_until(LIMIT, "the reboot command ran", move || async move {
        mr.reboot_requested()
    })
    .await;
    wait_event(&b, "n0", "Rebooting", 1).await;
    m.kill();
    assert!(m.take_reboot_request());
    std::fs::remove_file(m.sentinel()).expect("a fresh /var/run");
    b.reboot("n0").await;
    m.reboots += 1;
    // Back with a new boot id, Ready; nobody has looked yet.
    wait_until(LIMIT, "n0 Ready", || b.ready("n0")).await;
    assert_in_cycle(&b, "n0", "rebooting").await;
    assert_ne!(b.boot_id("n0").await, boot);
    m.start();
    assert_resumed_cleanly(&b, m, &boot, 1, 1).await;
    assert!(!m.reboot_requested(), "no second reboot");
}

/// The reboot is recognised by a changed `status.nodeInfo.bootID`, never by the agent's memory.
/// Here the reboot command ran but the Node comes back Ready with the same bootID (the machine
/// did not reboot, or its kubelet still reports the old boot) and the agent restarts: kreboot's
/// documented behaviour (`node::decide`, `Phase::Rebooting`: recorded, not rebooted, lock held,
/// Ready, window open) is to request the reboot again ("a second request is harmless") and to
/// keep the cycle open: phase `rebooting`, cordoned, lock held, nothing completed. Only the
/// changed bootID completes it.
async fn reboot_recognised_by_boot_id(kind: Kind) {
    let (b, mut machines) = cluster(kind, 1, &[]).await;
    let boot = b.boot_id("n0").await;
    let m = &mut machines[0];
    m.require_reboot();
    m.start();
    let mr: &Machine = m;
    wait_until(LIMIT, "the reboot command ran", move || async move {
        mr.reboot_requested()
    })
    .await;
    wait_event(&b, "n0", "Rebooting", 1).await;
    // The agent goes down, the machine does not reboot: same bootID, Ready.
    m.kill();
    assert!(m.take_reboot_request());
    b.set_ready("n0", true).await;
    assert_eq!(b.boot_id("n0").await, boot);
    m.start();
    let mr: &Machine = m;
    wait_until(LIMIT, "the reboot requested again", move || async move {
        mr.reboot_requested()
    })
    .await;
    assert_eq!(m.reboot_commands(), 2);
    // However long it waits, the cycle stays open while the bootID is the old one.
    for _ in 0..10 {
        assert_in_cycle(&b, "n0", "rebooting").await;
        assert_eq!(
            b.annotation("n0", ANN_PRE_REBOOT_BOOT_ID).await.as_deref(),
            Some(boot.as_str())
        );
        assert!(b.ready("n0").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !b.node_events()
            .await
            .iter()
            .any(|e| e["reason"] == "RebootCompleted"),
        "nothing completed without a new bootID"
    );
    // The machine reboots: a new bootID, and the cycle completes.
    reboot_when_asked(&b, m).await;
    assert_resumed_cleanly(&b, m, &boot, 2, 1).await;
}

// ---------------------------------------------------------------------------------------------
// The operator's commands.

/// Runs the `kreboot` binary with `args` against the backend, as an operator would.
async fn kreboot_cmd(b: &Backend, args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kreboot"));
    cmd.args(args)
        .env("KUBECONFIG", b.kubeconfig())
        .env_remove("POD_NAMESPACE")
        .env_remove("RUST_LOG");
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("kreboot {args:?} finishes"))
        .unwrap_or_else(|e| panic!("kreboot {args:?} runs: {e}"))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `kreboot drain --selector` cordons and drains the selected nodes (evicting their pods,
/// leaving DaemonSet pods) and leaves the others alone; `kreboot uncordon` refuses a node in
/// the middle of an agent's cycle and makes the drained nodes schedulable again.
async fn drain_and_uncordon_commands(kind: Kind) {
    let b = Backend::start(kind).await;
    for (name, pool) in [("n0", "old"), ("n1", "old"), ("n2", "new")] {
        b.add_node(name, &[("pool", pool)]).await;
        for p in 0..2 {
            b.add_pod("apps", &format!("{name}-app-{p}"), name, &[("app", "web")])
                .await;
        }
    }
    b.add_daemonset_pod("kube-system", "n0-ds", "n0").await;
    b.wait_pods_ready("apps").await;
    b.wait_pods_ready("kube-system").await;
    let n2_before = b.node("n2").await.expect("n2");

    let out = kreboot_cmd(
        &b,
        &[
            "drain",
            "--selector",
            "pool=old",
            "--timeout",
            "60s",
            "-o",
            "json",
        ],
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "drain: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["drained"], true, "{report}");
    let results: Vec<(String, String, u64, u64)> = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap_or("").to_owned(),
                n["status"].as_str().unwrap_or("").to_owned(),
                n["evicted"].as_u64().unwrap_or(99),
                n["skipped"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("n0".to_owned(), "drained".to_owned(), 2, 1),
            ("n1".to_owned(), "drained".to_owned(), 2, 0)
        ],
        "{stderr}"
    );
    for node in ["n0", "n1"] {
        assert!(b.unschedulable(node).await, "{node} cordoned");
        assert_eq!(
            b.annotation(node, "kreboot.io/drained-by").await.as_deref(),
            Some("kreboot-cli"),
            "{node}: the operator's drain is recorded"
        );
        assert!(
            b.annotation(node, ANN_CORDONED_BY_KREBOOT).await.is_none(),
            "{node}: never recorded as the agent's cordon"
        );
    }
    let names = |pods: Vec<k8s_openapi::api::core::v1::Pod>| -> BTreeSet<String> {
        pods.into_iter().filter_map(|p| p.metadata.name).collect()
    };
    assert_eq!(
        names(b.pods("apps").await),
        BTreeSet::from(["n2-app-0".to_owned(), "n2-app-1".to_owned()]),
        "the drained nodes' pods are gone (the command waits for them), n2's stay"
    );
    assert!(
        names(b.pods("kube-system").await).contains("n0-ds"),
        "the DaemonSet pod is left alone"
    );
    let n2 = b.node("n2").await.expect("n2");
    assert_eq!(n2.spec, n2_before.spec, "n2 untouched");
    assert_eq!(
        n2.metadata.annotations, n2_before.metadata.annotations,
        "n2 untouched"
    );

    // An agent in the middle of a cycle on n1: uncordon refuses it (exit 1) and changes nothing.
    b.patch_node(
        "n1",
        json!({"metadata": {"annotations": {ANN_PHASE: "draining"}}}),
    )
    .await;
    let out = kreboot_cmd(&b, &["uncordon", "n1"]).await;
    assert_eq!(out.status.code(), Some(1), "refused: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("middle of a reboot cycle"),
        "{}",
        text(&out.stderr)
    );
    assert!(b.unschedulable("n1").await, "n1 stays cordoned");
    b.patch_node("n1", json!({"metadata": {"annotations": {ANN_PHASE: null}}}))
        .await;

    let out = kreboot_cmd(&b, &["uncordon", "--selector", "pool=old"]).await;
    assert_eq!(out.status.code(), Some(0), "uncordon: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "uncordoned n0\nuncordoned n1\n");
    for node in ["n0", "n1", "n2"] {
        assert!(!b.unschedulable(node).await, "{node} schedulable");
        let (annotations, _) = kreboot_marks(&b, node).await;
        assert!(annotations.is_empty(), "{node}: {annotations:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// `kreboot status` on both backends: the golden file of tests/status.rs.

/// The state of tests/status.rs (a node in each state kreboot can leave one in), written
/// through the Kubernetes API; `kreboot status` must print tests/golden/status.txt on both
/// backends. No kubelets on the real backend: they would make the NotReady worker-5 Ready.
async fn status_golden_table(kind: Kind) {
    const NOW: &str = "2026-11-25T10:00:00Z";
    const POLICY: &str = r#"version: 1
timezone: Europe/Berlin
windows:
  - days: [Sat, Sun]
    start: "02:00"
    end: "05:00"
rules:
  - name: db
    nodeSelector:
      matchLabels:
        pool: db
    windows:
      - days: [Wed]
        start: "10:00"
        end: "12:00"
"#;
    const ANN_BLOCKED_BY: &str = "kreboot.io/blocked-by";
    let b = Backend::start_with(kind, false).await;
    b.create_namespace("kreboot").await;
    for name in [
        "worker-1", "worker-2", "worker-3", "worker-4", "worker-5", "worker-6", "db-1",
    ] {
        b.add_node(name, &[]).await;
    }
    let record = |node: &'static str, annotations: Value, labels: Value, spec: Value| {
        let b = &b;
        async move {
            b.patch_node(
                node,
                json!({"metadata": {"annotations": annotations, "labels": labels}, "spec": spec}),
            )
            .await;
        }
    };
    record(
        "worker-2",
        json!({
            ANN_REBOOT_REQUIRED_SINCE: "2026-11-25T07:47:00Z",
            ANN_REBOOT_REASON: "linux-image-6.8.0-49-generic libc6",
            ANN_BLOCKED_BY: "window_closed",
        }),
        json!({}),
        json!({}),
    )
    .await;
    record(
        "worker-3",
        json!({
            ANN_REBOOT_REQUIRED_SINCE: "2026-11-25T09:10:00Z",
            ANN_REBOOT_REASON: "openssl",
            ANN_WAITING_SINCE: "2026-11-25T09:12:30.000001Z",
            ANN_BLOCKED_BY: "lock_held_elsewhere",
        }),
        json!({ LABEL_WAITING: "true" }),
        json!({}),
    )
    .await;
    record(
        "worker-4",
        json!({
            ANN_REBOOT_REQUIRED_SINCE: "2026-11-24T23:05:00Z",
            ANN_REBOOT_REASON: "linux-image-6.8.0-49-generic",
            ANN_PHASE: "draining",
            ANN_CORDONED_BY_KREBOOT: "true",
            ANN_LOCK: "kreboot-lock",
        }),
        json!({ LABEL_HOLDER: "true" }),
        json!({ "unschedulable": true }),
    )
    .await;
    b.cordon("worker-5").await;
    b.set_ready("worker-5", false).await;
    record(
        "worker-6",
        json!({ ANN_LAST_REBOOT: "2026-11-25T08:31:00Z" }),
        json!({}),
        json!({}),
    )
    .await;
    record(
        "db-1",
        json!({
            ANN_REBOOT_REQUIRED_SINCE: "2026-11-23T04:00:00Z",
            ANN_REBOOT_REASON: "linux-image-6.8.0-49-generic",
            ANN_LAST_FAILURE: "2026-11-25T09:40:00Z",
            ANN_LAST_FAILURE_REASON: "drain timed out after 30m: pod apps/db-0 refused by its PodDisruptionBudget",
            ANN_LAST_REBOOT: "2026-10-28T10:15:00Z",
            ANN_BLOCKED_BY: "blocking_pods: apps/db-0",
        }),
        json!({ "pool": "db" }),
        json!({}),
    )
    .await;
    let lease = |name: &str, labels: Value, holder: &str, renewed: &str, seconds: i32| {
        json!({
            "metadata": { "name": name, "labels": labels },
            "spec": {
                "holderIdentity": holder, "acquireTime": renewed, "renewTime": renewed,
                "leaseDurationSeconds": seconds,
            },
        })
    };
    b.create_lease(
        "kreboot",
        lease(
            "kreboot-lock",
            json!({ kreboot::lock::LOCK_LABEL: "kreboot-lock" }),
            "worker-4",
            "2026-11-25T09:55:00.000000Z",
            1800,
        ),
    )
    .await;
    // Not a slot of the lock: never shown.
    b.create_lease(
        "kreboot",
        lease(
            "something-else",
            json!({}),
            "worker-1",
            "2026-11-25T09:59:00.000000Z",
            15,
        ),
    )
    .await;
    b.put_configmap("kreboot", "kreboot-config", &[("config.yaml", POLICY)])
        .await;
    assert!(!b.ready("worker-5").await, "worker-5 stays NotReady");

    let out = kreboot_cmd(&b, &["status", "--now", NOW, "--namespace", "kreboot"]).await;
    assert_eq!(out.status.code(), Some(0), "status: {}", text(&out.stderr));
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/status.txt");
    let expected = std::fs::read_to_string(&golden).expect("tests/golden/status.txt");
    let actual = text(&out.stdout);
    assert!(
        actual == expected,
        "{kind:?}: `kreboot status` differs from {}\n--- expected\n{expected}\n--- actual\n{actual}",
        golden.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Events.

/// The Event reasons and types of README's "Events" table (src/events.rs).
const REASONS: [(&str, &str); 13] = [
    ("RebootRequired", "Normal"),
    ("RebootBlocked", "Normal"),
    ("LockAcquired", "Normal"),
    ("Cordoned", "Normal"),
    ("Draining", "Normal"),
    ("DrainFailed", "Warning"),
    ("Rebooting", "Normal"),
    ("RebootFailed", "Warning"),
    ("Uncordoned", "Normal"),
    ("RebootCompleted", "Normal"),
    ("CycleAborted", "Warning"),
    ("ConfigInvalid", "Warning"),
    ("SentinelPolling", "Warning"),
];

/// Every Event reason kreboot emits, produced by real cycles, is accepted by the API server's
/// Event validation (events.k8s.io/v1 on the real backend), repeats (an Event series, a PATCH)
/// included; no agent logs a refused Event. One node per outcome, each with its own lock:
/// - n0: a completed cycle (RebootRequired, LockAcquired, Cordoned, Draining, Rebooting,
///   Uncordoned, RebootCompleted);
/// - n1: a drain that exceeds `--drain-timeout` under a PodDisruptionBudget that never allows
///   (DrainFailed), again after a short `--failure-backoff` (every Event of the cycle repeated:
///   Event series);
/// - n2: its own pods block the reboot (`--blocking-pod-selector`: RebootBlocked);
/// - n3: the reboot command fails (RebootFailed);
/// - n4: its window closes while a PodDisruptionBudget holds its drain; the drain ends
///   outside the window (CycleAborted);
/// - n5: an invalid policy ConfigMap (ConfigInvalid, about the ConfigMap; the node waits as
///   outside every window), and no inotify instance for its agent (a user namespace whose
///   `max_inotify_instances` is 0: EMFILE): the sentinel is polled (SentinelPolling).
async fn event_reasons_accepted(kind: Kind) {
    let b = Backend::start(kind).await;
    let nodes = ["n0", "n1", "n2", "n3", "n4", "n5"];
    for name in nodes {
        b.add_node(name, &[]).await;
        for p in 0..2 {
            b.add_pod("apps", &format!("{name}-app-{p}"), name, &[("app", "web")])
                .await;
        }
    }
    for n in ["n1", "n4"] {
        let app = format!("db-{n}");
        b.add_pod("apps", &app, n, &[("app", &app)]).await;
    }
    b.wait_pods_ready("apps").await;
    for n in ["n1", "n4"] {
        let app = format!("db-{n}");
        b.add_pdb("apps", &app, &[("app", &app)], 1).await;
    }
    b.put_configmap(NS, "kreboot-bad", &[("config.yaml", "windows: [oops\n")])
        .await;
    const OPEN: &str = "timezone: UTC\n";
    const CLOSED: &str = "blackouts:\n  - from: \"2000-01-01\"\n    to: \"2099-12-31\"\n";
    b.put_configmap(NS, "kreboot-n4", &[("config.yaml", OPEN)]).await;
    let kc = b.kubeconfig();
    let mut machines: Vec<Machine> = vec![
        Machine::new("n0", &kc, &[]),
        Machine::new(
            "n1",
            &kc,
            &[
                "--lock-name",
                "lock-n1",
                "--drain-timeout",
                "2s",
                "--failure-backoff",
                "1s",
            ],
        ),
        Machine::new(
            "n2",
            &kc,
            &["--lock-name", "lock-n2", "--blocking-pod-selector", "app=web"],
        ),
        Machine::new(
            "n3",
            &kc,
            &["--lock-name", "lock-n3", "--reboot-command", "false"],
        ),
        Machine::new(
            "n4",
            &kc,
            &[
                "--lock-name",
                "lock-n4",
                "--config-map",
                "kreboot-n4",
                "--eviction-retry",
                "1s",
            ],
        ),
        Machine::new(
            "n5",
            &kc,
            &["--lock-name", "lock-n5", "--config-map", "kreboot-bad"],
        ),
    ];
    // n5's agent runs in a user namespace of its own whose inotify instance limit is 0: EMFILE,
    // as on a node whose inotify instances are used up.
    machines[5].launcher = [
        "unshare",
        "--user",
        "--map-root-user",
        "sh",
        "-c",
        r#"echo 0 > /proc/sys/user/max_inotify_instances && exec "$0" "$@""#,
    ]
    .map(String::from)
    .to_vec();
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }

    // n5: no valid policy: it waits as outside every window.
    wait_until(LIMIT, "n5 waits as outside every window", || async {
        b.annotation("n5", "kreboot.io/blocked-by").await.as_deref() == Some("window_closed")
    })
    .await;
    // n4: drained up to its PDB-held pod; its window closes, then the budget allows the last
    // eviction: the drain ends outside the window.
    wait_until(LIMIT, "n4 draining", || async {
        b.annotation("n4", ANN_PHASE).await.as_deref() == Some("draining")
    })
    .await;
    wait_event(&b, "n4", "Draining", 1).await;
    b.put_configmap(NS, "kreboot-n4", &[("config.yaml", CLOSED)])
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    b.set_pdb_min_available("apps", "db-n4", 0).await;
    // n0: the whole cycle.
    reboot_when_asked(&b, &mut machines[0]).await;
    wait_until(LIMIT, "n0 completed", || completed(&b, "n0")).await;

    let expected: [(&str, &[&str]); 6] = [
        (
            "n0",
            &[
                "RebootRequired",
                "LockAcquired",
                "Cordoned",
                "Draining",
                "Rebooting",
                "Uncordoned",
                "RebootCompleted",
            ],
        ),
        (
            "n1",
            &[
                "RebootRequired",
                "LockAcquired",
                "Cordoned",
                "Draining",
                "DrainFailed",
            ],
        ),
        ("n2", &["RebootRequired", "RebootBlocked"]),
        (
            "n3",
            &[
                "RebootRequired",
                "LockAcquired",
                "Cordoned",
                "Draining",
                "Rebooting",
                "RebootFailed",
            ],
        ),
        (
            "n4",
            &[
                "RebootRequired",
                "LockAcquired",
                "Cordoned",
                "Draining",
                "CycleAborted",
            ],
        ),
        ("n5", &["RebootRequired", "SentinelPolling"]),
    ];
    for (node, reasons) in expected {
        for reason in reasons {
            wait_event(&b, node, reason, 1).await;
        }
    }
    // n1 tries again after its 1 s failure back-off: each repeated Event is a series, updated
    // with a PATCH, which must be accepted too.
    for reason in ["LockAcquired", "Cordoned", "Draining", "DrainFailed"] {
        wait_event(&b, "n1", reason, 2).await;
    }
    wait_until(LIMIT, "the ConfigInvalid Event about kreboot-bad", || async {
        event_count(&b.events(NS).await, "kreboot-bad", "ConfigInvalid") >= 1
    })
    .await;

    let polling: Vec<String> = b
        .node_events()
        .await
        .iter()
        .filter(|e| e["reason"] == "SentinelPolling")
        .filter_map(|e| e["note"].as_str().map(str::to_owned))
        .collect();
    assert!(
        polling
            .iter()
            .all(|n| n.contains("EMFILE") && n.contains("fs.inotify.max_user_instances")),
        "the SentinelPolling Event names the errno and the sysctl: {polling:?}"
    );

    let mut seen = BTreeSet::new();
    let mut all = b.node_events().await;
    all.extend(b.events(NS).await);
    for e in &all {
        let Some(reason) = e["reason"].as_str() else {
            continue;
        };
        if e["reportingController"] != "kreboot" {
            continue;
        }
        let (_, want) = REASONS
            .iter()
            .find(|(r, _)| *r == reason)
            .unwrap_or_else(|| panic!("undocumented reason {reason}: {e}"));
        assert_eq!(e["type"], *want, "type of {reason}: {e}");
        assert!(
            e["note"].as_str().is_some_and(|n| !n.is_empty()),
            "{reason} says why: {e}"
        );
        seen.insert(reason.to_owned());
    }
    let documented: BTreeSet<String> = REASONS.iter().map(|(r, _)| r.to_string()).collect();
    assert_eq!(
        seen, documented,
        "every documented reason was produced and accepted"
    );
    for (node, reasons) in expected {
        let events = b.node_events().await;
        for reason in reasons {
            assert!(event_count(&events, node, reason) >= 1, "{node}: {reason}");
        }
    }
    assert!(
        !b.unschedulable("n1").await,
        "n1 uncordoned after its failed drain"
    );
    assert!(
        !b.unschedulable("n4").await,
        "n4 uncordoned after its aborted cycle"
    );
    for m in &machines {
        let log = m.log();
        for refused in ["failed to publish event", "event queue full"] {
            assert!(
                !log.contains(refused),
                "{}: {refused}:\n{}",
                m.node,
                log.lines()
                    .filter(|l| l.contains(refused))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Operators in control: pause and resume.

/// A Lease of the lock held by `holder` (fresh, for an hour): the node's agent is not running,
/// so the slot stays taken until the test frees it.
async fn hold_lock_for(b: &Backend, holder: &str) {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = kube::Api::namespaced(b.client(), NS);
    let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    leases
        .create(
            &Default::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": "kreboot-lock", "labels": { "kreboot.io/lock": "kreboot-lock" } },
                "spec": {
                    "holderIdentity": holder, "leaseDurationSeconds": 3600,
                    "acquireTime": now, "renewTime": now,
                },
            }))
            .unwrap(),
        )
        .await
        .unwrap();
}

async fn free_lock(b: &Backend) {
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> = kube::Api::namespaced(b.client(), NS);
    leases.delete("kreboot-lock", &Default::default()).await.unwrap();
}

async fn label(b: &Backend, node: &str, key: &str) -> Option<String> {
    b.node(node).await?.metadata.labels?.get(key).cloned()
}

/// `kreboot pause` reaches an engaged agent through the ConfigMap it already watches: n0, queued
/// behind n1's slot, records `paused` and leaves the queue within a second, reports it
/// (`kreboot_paused`, the `RebootsPaused` Event, `kreboot status`), and does not take the slot
/// when it frees. `kreboot resume` lets it go through its cycle.
async fn pause_holds_a_waiting_node_and_resume_lets_it_go(kind: Kind) {
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    hold_lock_for(&b, "n1").await;
    machines[0].require_reboot();
    machines[0].start();
    wait_until(LIMIT, "n0 queued for the lock", || async {
        label(&b, "n0", LABEL_WAITING).await.as_deref() == Some("true")
    })
    .await;

    let out = kreboot_cmd(&b, &["pause", "--namespace", NS, "--reason", "incident 42"]).await;
    assert!(
        out.status.success(),
        "pause: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("reboots paused by "),
        "{}",
        text(&out.stdout)
    );
    let paused = Instant::now();
    wait_until(LIMIT, "n0 records the pause", || async {
        b.annotation("n0", kreboot::node::ANN_BLOCKED_BY).await.as_deref() == Some("paused")
            && label(&b, "n0", LABEL_WAITING).await.is_none()
    })
    .await;
    let reacted = paused.elapsed();
    eprintln!("n0 recorded the pause and left the queue {reacted:?} after `kreboot pause` returned");
    assert!(
        reacted < Duration::from_secs(1),
        "the pause took effect within a second: {reacted:?}"
    );
    let port = machines[0].metrics_port;
    wait_until(LIMIT, "n0 reports the pause", || async move {
        let m = scrape(port).await;
        m.contains("kreboot_paused{node=\"n0\"} 1")
            && m.contains("kreboot_reboot_blocked{node=\"n0\",reason=\"paused\"} 1")
    })
    .await;
    wait_event(&b, "n0", "RebootsPaused", 1).await;
    let status = kreboot_cmd(&b, &["status", "--namespace", NS]).await;
    let table = text(&status.stdout);
    assert!(status.status.success(), "status: {table}{}", text(&status.stderr));
    assert!(
        table.starts_with("PAUSED: reboots are paused by ") && table.contains(": incident 42"),
        "{table}"
    );
    let row = table.lines().find(|l| l.starts_with("n0 ")).expect("n0's row");
    assert!(row.contains(" pending ") && row.contains(" paused "), "{row}");

    // The slot frees: a paused node does not take it.
    free_lock(&b).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        b.holders().await.is_empty(),
        "no slot taken while paused: {:?}",
        b.leases().await
    );
    assert!(b.annotation("n0", ANN_PHASE).await.is_none());
    assert!(!b.unschedulable("n0").await);

    let out = kreboot_cmd(&b, &["resume", "--namespace", NS]).await;
    assert!(
        out.status.success(),
        "resume: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("incident 42"), "{}", text(&out.stdout));
    run_until(
        &b,
        &mut machines[..1],
        LIMIT,
        "n0 rebooted after the resume",
        || completed(&b, "n0"),
    )
    .await;
    assert_eq!(machines[0].reboots, 1);
    let m = scrape(machines[0].metrics_port).await;
    assert!(m.contains("kreboot_paused{node=\"n0\"} 0"), "{m}");
    // A second resume has nothing to do and says so.
    let out = kreboot_cmd(&b, &["resume", "--namespace", NS]).await;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("were not paused"),
        "{}",
        text(&out.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
// Operators in control: reboot on request, and the operator's drain.

/// `kreboot reboot` asks two idle agents (no sentinel) for a reboot: each sees the request on
/// its own Node within a second, and it is treated like the sentinel: nothing happens while the
/// window is closed (no lock, no cordon), then the nodes go one lock slot at a time, and the
/// request is removed when each reboot completed.
async fn reboot_on_request_goes_through_window_and_lock(kind: Kind) {
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    b.set_policy(&window_policy(false)).await;
    let monitor = OutMonitor::watch(b.client());
    for m in machines.iter_mut() {
        m.start();
    }
    let port = machines[0].metrics_port;
    wait_until(LIMIT, "n0's agent is up and idle", || async move {
        scrape(port)
            .await
            .contains("kreboot_state{node=\"n0\",state=\"idle\"} 1")
    })
    .await;
    let out = kreboot_cmd(&b, &["reboot", "n0", "n1", "--by", "tester"]).await;
    assert!(
        out.status.success(),
        "reboot: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(
        text(&out.stdout),
        "n0: reboot requested\nn1: reboot requested\n",
        "{}",
        text(&out.stderr)
    );
    let asked = Instant::now();
    wait_until(LIMIT, "both idle agents took the request up", || async {
        b.annotation("n0", ANN_BLOCKED_BY).await.as_deref() == Some("window_closed")
            && b.annotation("n1", ANN_BLOCKED_BY).await.as_deref() == Some("window_closed")
    })
    .await;
    let took = asked.elapsed();
    eprintln!("idle agents took the request up {took:?} after `kreboot reboot` returned");
    assert!(took < Duration::from_secs(1), "within a second: {took:?}");
    let m = scrape(port).await;
    assert!(m.contains("kreboot_reboot_required{node=\"n0\"} 1"), "{m}");
    assert!(
        m.contains("kreboot_reboot_required_info{node=\"n0\",reason=\"requested\"} 1"),
        "{m}"
    );
    let status = kreboot_cmd(&b, &["status", "--namespace", NS]).await;
    let table = text(&status.stdout);
    let row = table.lines().find(|l| l.starts_with("n0 ")).expect("n0's row");
    assert!(
        row.contains(" pending ") && row.contains("requested by tester") && row.contains("window_closed"),
        "{table}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.holders().await.is_empty(), "no lock outside the window");
    assert!(
        !b.unschedulable("n0").await && !b.unschedulable("n1").await,
        "no cordon outside the window"
    );

    b.set_policy(&window_policy(true)).await;
    run_until(&b, &mut machines, LIMIT, "both requested reboots done", || {
        all_completed(&b, &["n0", "n1"])
    })
    .await;
    assert_eq!(monitor.max(), 1, "one node out at a time: the lock applies");
    for m in &machines {
        assert_eq!(m.reboots, 1, "{} rebooted once", m.node);
        assert!(
            b.annotation(&m.node, ANN_REBOOT_REQUESTED).await.is_none(),
            "{}: request cleared",
            m.node
        );
        assert!(!b.unschedulable(&m.node).await, "{} uncordoned", m.node);
    }
    // Nothing asks any more: the agents stay idle and do not reboot again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for m in machines.iter_mut() {
        assert!(!m.supervise(&b).await, "{}: no second reboot", m.node);
    }
}

/// Nodes an operator drained with `kreboot drain` are left alone by their agents although their
/// hosts need a reboot: no lock, no reboot, no uncordon. `kreboot reboot n0` lets n0's agent
/// reboot it (it stays cordoned: the cordon is the operator's); `kreboot uncordon n1` gives n1
/// back to its agent, which then reboots it like any node.
async fn operators_drain_is_respected(kind: Kind) {
    let (b, mut machines) = cluster(kind, 2, &[]).await;
    let out = kreboot_cmd(&b, &["drain", "n0", "n1", "--timeout", "60s"]).await;
    assert!(
        out.status.success(),
        "drain: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    wait_until(
        LIMIT,
        "both agents hold back for the operator's drain",
        || async {
            b.annotation("n0", ANN_BLOCKED_BY).await.as_deref() == Some("operator_drained")
                && b.annotation("n1", ANN_BLOCKED_BY).await.as_deref() == Some("operator_drained")
        },
    )
    .await;
    let port = machines[0].metrics_port;
    wait_until(LIMIT, "n0 reports why it waits", || async move {
        scrape(port)
            .await
            .contains("kreboot_reboot_blocked{node=\"n0\",reason=\"operator_drained\"} 1")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for m in machines.iter_mut() {
        assert!(
            !m.supervise(&b).await,
            "{}: not rebooted while the operator holds it",
            m.node
        );
        assert!(b.unschedulable(&m.node).await, "{}: still cordoned", m.node);
        assert!(
            b.annotation(&m.node, ANN_PHASE).await.is_none(),
            "{}: no cycle",
            m.node
        );
    }
    assert!(b.holders().await.is_empty(), "no lock taken");

    // The operator asks for n0's reboot: it goes, and stays cordoned afterwards.
    let out = kreboot_cmd(&b, &["reboot", "n0"]).await;
    assert!(
        out.status.success(),
        "reboot: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    run_until(&b, &mut machines, LIMIT, "n0 rebooted on request", || {
        completed(&b, "n0")
    })
    .await;
    assert_eq!(machines[0].reboots, 1);
    assert!(
        b.unschedulable("n0").await,
        "the operator's cordon is kept after the reboot"
    );
    assert_eq!(
        b.annotation("n0", kreboot::drain_cli::ANN_DRAINED_BY)
            .await
            .as_deref(),
        Some("kreboot-cli")
    );
    assert!(b.annotation("n0", ANN_REBOOT_REQUESTED).await.is_none());
    assert_eq!(machines[1].reboots, 0, "n1 still held by the operator");
    assert_eq!(
        b.annotation("n1", ANN_BLOCKED_BY).await.as_deref(),
        Some("operator_drained")
    );

    // The operator uncordons n1: it is an ordinary node again, rebooted and uncordoned by kreboot.
    let out = kreboot_cmd(&b, &["uncordon", "n1"]).await;
    assert!(
        out.status.success(),
        "uncordon: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    run_until(&b, &mut machines, LIMIT, "n1 rebooted after the uncordon", || {
        completed(&b, "n1")
    })
    .await;
    assert_eq!(machines[1].reboots, 1);
    assert!(!b.unschedulable("n1").await, "n1 uncordoned after its reboot");
}

/// The chart's Grafana dashboard, proven on real data: a real Prometheus scrapes the real agents
/// of three nodes during a rollout on the real control plane, and every panel's query (as
/// Grafana would send it, `$__range` an hour) must return data: no panel may say "No data" in a
/// cluster doing its job. Real backend only: the dashboard is about what a real cluster shows.
mod dashboard_panels_have_data {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn real() {
        super::dashboard_panels_have_data(super::Kind::Real).await
    }
}

async fn dashboard_panels_have_data(kind: Kind) {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/charts/kreboot/dashboards/kreboot.json"
        ))
        .expect("the chart's dashboard"),
    )
    .expect("the dashboard is JSON");
    let queries: Vec<(String, String)> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or_default().to_owned()))
        })
        .collect();
    assert!(queries.len() >= 10, "the dashboard has its panels: {queries:?}");

    let (b, mut machines) = cluster(kind, 3, &["--concurrency", "1"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let targets: Vec<String> = machines
        .iter()
        .map(|m| format!("'127.0.0.1:{}'", m.metrics_port))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kreboot-metrics\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .expect("prometheus.yml");
    let (_prometheus, prom_port) = common::start_prometheus(&config, dir.path());
    let http = reqwest::Client::new();
    let query = |expr: String| {
        let http = http.clone();
        async move {
            let body: Value = http
                .get(format!("http://127.0.0.1:{prom_port}/api/v1/query"))
                .query(&[("query", expr.as_str())])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(body)
        }
    };
    // Every agent scraped (Prometheus is up and has seen them all) before anything happens, as
    // in a cluster where Prometheus runs before the night's reboots.
    let all_up = || async {
        query("count(up{job=\"kreboot-metrics\"} == 1) == 3".to_owned())
            .await
            .is_some_and(|b| b["data"]["result"].as_array().is_some_and(|r| !r.is_empty()))
    };
    for m in machines.iter_mut() {
        m.start();
    }
    wait_until(
        Duration::from_secs(60),
        "Prometheus scrapes the three agents",
        all_up,
    )
    .await;
    for m in machines.iter_mut() {
        m.require_reboot();
    }
    let nodes = ["n0", "n1", "n2"];
    run_until(&b, &mut machines, LIMIT, "every node rebooted", || {
        all_completed(&b, &nodes)
    })
    .await;
    // The restarted agents scraped again, a few times, with the agents still running.
    run_until(
        &b,
        &mut machines,
        LIMIT,
        "Prometheus scrapes the agents again",
        all_up,
    )
    .await;
    for _ in 0..30 {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let expr = expr.replace("$__range", "1h");
        let body = query(expr.clone()).await.expect("Prometheus answers with JSON");
        assert_eq!(body["status"], "success", "{title}: {expr}: {body}");
        let result = body["data"]["result"].as_array().cloned().unwrap_or_default();
        let numbers: Vec<f64> = result
            .iter()
            .filter_map(|r| r["value"][1].as_str()?.parse().ok())
            .collect();
        eprintln!("panel {title:?}: {expr} -> {numbers:?}");
        if numbers.is_empty() || numbers.iter().any(|v| v.is_nan()) {
            empty.push(format!("{title}: {expr} -> {result:?}"));
        }
    }
    assert!(empty.is_empty(), "panels without data:\n{}", empty.join("\n"));
}
