//! The real `kreboot drain` and `kreboot uncordon` binaries against the simulated cluster, with
//! a kubeconfig as an operator would use them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

mod common;

use common::{SimHost, db_pod, guard_db_pods};
use kreboot::{
    drain_cli::{ANN_DRAINED_AT, ANN_DRAINED_BY},
    node::{ANN_CORDONED_BY_KREBOOT, ANN_PHASE},
};
use kreboot_testkit::sim::{
    self, SimCluster, SimConfig,
    store::{Kind, StoreError},
};
use serde_json::{Value, json};

async fn kreboot(kubeconfig: &Path, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("kreboot runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unschedulable(sim: &SimCluster, node: &str) -> bool {
    sim.node(node)
        .and_then(|n| n.spec)
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn annotations(sim: &SimCluster, node: &str) -> BTreeMap<String, String> {
    sim.node(node)
        .and_then(|n| n.metadata.annotations)
        .unwrap_or_default()
}

fn pod_names(sim: &SimCluster, node: &str) -> BTreeSet<String> {
    sim.pods_on(node)
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect()
}

fn is_app(v: &Value) -> bool {
    v.pointer("/metadata/labels/app").and_then(Value::as_str) == Some("web")
}

/// Three nodes labelled pool=old and one pool=new, two `app=web` pods on each (slow to shut
/// down) and a DaemonSet pod on each; one PDB over all eight web pods allowing one disruption
/// at a time.
async fn pool_cluster() -> SimHost {
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    for (name, pool) in [
        ("old-0", "old"),
        ("old-1", "old"),
        ("old-2", "old"),
        ("new-0", "new"),
    ] {
        sim.add_node(name, BTreeMap::from([("pool".to_string(), pool.to_string())]));
        for i in 0..2 {
            sim.add_pod(
                sim::pod("apps", &format!("{name}-web-{i}"), name)
                    .labels([("app", "web")])
                    .grace(5)
                    .shutdown_seconds(0.6)
                    .build(),
            );
        }
        sim.add_pod(
            sim::pod("kube-system", &format!("{name}-ds"), name)
                .daemonset()
                .build(),
        );
    }
    sim.add_pdb(
        "apps",
        "web",
        BTreeMap::from([("app".to_string(), "web".to_string())]),
        None,
        Some(1),
    );
    SimHost::new(sim)
}

/// Follows every change of the store and records the largest number of web pods disrupted
/// (terminating) at once.
fn watch_disruptions(sim: &SimCluster) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let (_, mut rx) = sim.store().watch_from(sim.store().rv()).unwrap();
    let max = Arc::new(AtomicUsize::new(0));
    let m = max.clone();
    let task = tokio::spawn(async move {
        let mut terminating = BTreeSet::new();
        while let Ok(change) = rx.recv().await {
            if change.kind != Kind::Pod || !is_app(&change.object) {
                continue;
            }
            let name = change.object["metadata"]["name"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            if change.type_ == "DELETED" {
                terminating.remove(&name);
            } else if change.object.pointer("/metadata/deletionTimestamp").is_some() {
                terminating.insert(name);
            }
            m.fetch_max(terminating.len(), Ordering::SeqCst);
        }
    });
    (max, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_a_pool_by_selector_respects_the_pdb_across_nodes() {
    let SimHost {
        sim,
        kubeconfig,
        dir: _dir,
    } = pool_cluster().await;
    let (max_disrupted, monitor) = watch_disruptions(&sim);
    let new_pods = pod_names(&sim, "new-0");
    let started = Instant::now();
    let out = kreboot(
        &kubeconfig,
        &[
            "drain",
            "--selector",
            "pool=old",
            "--eviction-retry",
            "200ms",
            "--timeout",
            "30s",
            "-o",
            "json",
        ],
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("drained three nodes in {:?}", started.elapsed());

    for node in ["old-0", "old-1", "old-2"] {
        assert!(unschedulable(&sim, node), "{node} cordoned");
        let ann = annotations(&sim, node);
        assert_eq!(ann.get(ANN_DRAINED_BY).map(String::as_str), Some("kreboot-cli"));
        assert!(ann.contains_key(ANN_DRAINED_AT));
        assert!(
            !ann.contains_key(ANN_CORDONED_BY_KREBOOT),
            "an operator's drain is not the agent's cordon: {ann:?}"
        );
        assert_eq!(
            pod_names(&sim, node),
            BTreeSet::from([format!("{node}-ds")]),
            "only the DaemonSet pod is left on {node}"
        );
    }
    assert!(!unschedulable(&sim, "new-0"), "the new pool is not cordoned");
    assert!(annotations(&sim, "new-0").is_empty());
    assert_eq!(
        pod_names(&sim, "new-0"),
        new_pods,
        "the new pool's pods are untouched"
    );

    // The PDB refused evictions (429) and kreboot retried them: more eviction requests than
    // pods, and the retries shown as they happened.
    let evictions = sim.request_counts().by_verb.get("evict").copied().unwrap_or(0);
    assert!(
        evictions > 6,
        "{evictions} eviction requests for 6 pods: none was refused"
    );
    assert!(
        stderr.contains("retrying apps/old-") && stderr.contains("disruption budget"),
        "{stderr}"
    );
    // One disruption at a time, ever (a concurrent drain of the nodes would break this too).
    assert_eq!(max_disrupted.load(Ordering::SeqCst), 1, "PDB maxUnavailable=1");
    monitor.abort();

    // Progress: a line per node start, per pod evicted and gone, and the summary.
    for node in ["old-0", "old-1", "old-2"] {
        assert!(
            stderr.contains(&format!("draining {node}: 2 pod(s) to evict, 1 skipped")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("drained {node}: evicted 2, skipped 1, took ")),
            "{stderr}"
        );
        for i in 0..2 {
            assert!(
                stderr.contains(&format!("  evicted  apps/{node}-web-{i}")),
                "{stderr}"
            );
            assert!(
                stderr.contains(&format!("  gone     apps/{node}-web-{i}")),
                "{stderr}"
            );
        }
    }
    // One node after another: old-1 starts only when old-0 is done.
    let pos = |s: &str| stderr.find(s).unwrap_or_else(|| panic!("{s:?} in {stderr}"));
    assert!(pos("drained old-0") < pos("draining old-1"));
    assert!(pos("drained old-1") < pos("draining old-2"));
    assert!(
        stderr.contains("done: drained 3 node(s): evicted 6, skipped 3, took "),
        "{stderr}"
    );

    let report: Value = serde_json::from_str(&stdout).expect("JSON report on stdout");
    assert_eq!(report["drained"], true);
    let nodes = report["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes
            .iter()
            .all(|n| n["status"] == "drained" && n["evicted"] == 2)
    );
    let retries: u64 = nodes.iter().map(|n| n["retries"].as_u64().unwrap()).sum();
    assert!(
        retries >= 3,
        "each node's second pod waited for the first: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_lists_the_plan_and_writes_nothing() {
    let SimHost {
        sim,
        kubeconfig,
        dir: _dir,
    } = pool_cluster().await;
    sim.reset_request_counts();
    let out = kreboot(&kubeconfig, &["drain", "-l", "pool in (old)", "--dry-run"]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let counts = sim.request_counts();
    assert_eq!(counts.writes(), 0, "a dry run writes nothing: {counts:?}");
    assert!(counts.total() > 0, "it did read the cluster");
    for node in ["old-0", "old-1", "old-2"] {
        assert!(!unschedulable(&sim, node));
        assert_eq!(pod_names(&sim, node).len(), 3);
        assert!(
            stdout.contains(&format!("node {node} (would be cordoned):")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("  evict  apps/{node}-web-0\n")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("  evict  apps/{node}-web-1\n")),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("  skip   kube-system/{node}-ds (DaemonSet pod)\n")),
            "{stdout}"
        );
    }
    assert!(!stdout.contains("new-0"), "{stdout}");
    assert!(stdout.contains("evict 6 pod(s), skip 3"), "{stdout}");

    let out = kreboot(&kubeconfig, &["drain", "old-2", "--dry-run", "-o", "json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["dryRun"], true);
    assert_eq!(plan["nodes"][0]["node"], "old-2");
    assert_eq!(
        plan["nodes"][0]["evict"],
        json!(["apps/old-2-web-0", "apps/old-2-web-1"])
    );
    assert_eq!(sim.request_counts().writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_the_pdb_blocks_times_out_and_names_the_pod() {
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    sim.add_node("n0", BTreeMap::new());
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(db_pod("db-0", "n0").grace(1).build());
    sim.add_pod(
        sim::pod("apps", "cache-0", "n0")
            .grace(1)
            .shutdown_seconds(0.1)
            .build(),
    );
    sim.add_pod(
        sim::pod("apps", "cache-1", "n1")
            .grace(1)
            .shutdown_seconds(0.1)
            .build(),
    );
    guard_db_pods(&sim);
    let SimHost {
        sim,
        kubeconfig,
        dir: _dir,
    } = SimHost::new(sim);
    let started = Instant::now();
    let out = kreboot(
        &kubeconfig,
        &[
            "drain",
            "n0",
            "n1",
            "--timeout",
            "2s",
            "--eviction-retry",
            "200ms",
        ],
    )
    .await;
    let took = started.elapsed();
    let stderr = text(&out.stderr);
    eprintln!("{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );
    assert!(stderr.contains("drain timed out after 2s"), "{stderr}");
    assert!(
        stderr.contains("apps/db-0: Cannot evict pod"),
        "names the blocking pod: {stderr}"
    );
    assert!(stderr.contains("n0 stays cordoned"), "{stderr}");
    assert!(stderr.contains("left on n0: apps/db-0"), "{stderr}");
    assert!(
        stderr.contains("not drained (stopped at the failure; cordoned): n1"),
        "{stderr}"
    );
    assert!(stderr.contains("FAILED: drained 0 of 2 node(s)"), "{stderr}");
    assert!(unschedulable(&sim, "n0"), "the operator's cordon stays");
    assert_eq!(pod_names(&sim, "n0"), BTreeSet::from(["db-0".to_string()]));
    // n1 was cordoned with the others but not drained after n0 failed.
    assert!(unschedulable(&sim, "n1"));
    assert_eq!(pod_names(&sim, "n1"), BTreeSet::from(["cache-1".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncordon_undoes_a_drain_and_refuses_a_node_mid_cycle() {
    let sim = SimCluster::start(SimConfig::default()).await.unwrap();
    sim.add_node("n0", BTreeMap::new());
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(
        sim::pod("apps", "web", "n0")
            .grace(1)
            .shutdown_seconds(0.1)
            .build(),
    );
    let SimHost {
        sim,
        kubeconfig,
        dir: _dir,
    } = SimHost::new(sim);

    let out = kreboot(&kubeconfig, &["drain", "n0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(unschedulable(&sim, "n0"));
    assert!(annotations(&sim, "n0").contains_key(ANN_DRAINED_BY));

    let out = kreboot(&kubeconfig, &["uncordon", "n0"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("uncordoned n0"));
    assert!(!unschedulable(&sim, "n0"));
    let ann = annotations(&sim, "n0");
    assert!(
        !ann.contains_key(ANN_DRAINED_BY) && !ann.contains_key(ANN_DRAINED_AT),
        "{ann:?}"
    );

    // kreboot's agent is draining n1 for a reboot.
    sim.store()
        .update(Kind::Node, "", "n1", |old| -> Result<Value, StoreError> {
            let mut n = old.clone();
            n["spec"]["unschedulable"] = json!(true);
            n["metadata"]["annotations"] = json!({ ANN_PHASE: "draining", ANN_CORDONED_BY_KREBOOT: "true" });
            Ok(n)
        })
        .unwrap();
    let out = kreboot(&kubeconfig, &["uncordon", "n1"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not uncordoning n1") && stderr.contains("kreboot.io/phase=draining"),
        "{stderr}"
    );
    assert!(stderr.contains("--force"), "{stderr}");
    assert!(unschedulable(&sim, "n1"), "still cordoned");

    let out = kreboot(&kubeconfig, &["uncordon", "n1", "--force"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!unschedulable(&sim, "n1"));
    // The agent's own record is its business.
    assert_eq!(
        annotations(&sim, "n1").get(ANN_PHASE).map(String::as_str),
        Some("draining")
    );

    // Missing nodes and bad usage.
    let out = kreboot(&kubeconfig, &["uncordon", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no such node: nope"));
    let out = kreboot(&kubeconfig, &["drain", "-l", "pool=none"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no node matches the selector"));
    for args in [
        &["drain"][..],
        &["drain", "n0", "--selector", "a=b"],
        &["drain", "n0", "--grace-period", "-2"],
        &["drain", "n0", "--timeout", "soon"],
        &["drain", "n0", "--force"],
        &["uncordon"],
    ] {
        let out = kreboot(&kubeconfig, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
    }
    assert!(!unschedulable(&sim, "n0"), "bad usage changed nothing");
}

#[tokio::test]
async fn an_unreachable_api_server_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = common::unreachable_kubeconfig(dir.path());
    for args in [&["drain", "n1"][..], &["uncordon", "-l", "pool=old"]] {
        let out = kreboot(&kubeconfig, args).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("reachable"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
