//! Lock groups: two pools of three nodes under a rule `concurrency: 1, lockGroup: {byLabel:
//! pool}` reboot one node at a time per pool, and both pools progress at once, although the
//! agents' cluster-wide `--concurrency` is 1. A real kube-rs watch of every Node records the
//! largest number of nodes out of service per pool and overall. With `maxConcurrent`, a cap over
//! the groups: three pools, at most two of them out at once.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kreboot_testkit::sim::{self, SimCluster, SimConfig, fleet::Fleet};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

const LIMIT: Duration = Duration::from_secs(90);
const POLICY: &str = "rules:\n  - name: pools\n    nodeSelector:\n      matchExpressions: [{key: pool, operator: Exists}]\n    concurrency: 1\n    lockGroup: {byLabel: pool}\n";

/// Rolls `nodes` (name, pool) under `policy` and returns the largest number of nodes out at once
/// per pool and overall, and the names of the lock's Leases.
async fn roll(policy: &str, nodes: &[(String, &str)]) -> (BTreeMap<String, usize>, usize, Vec<String>) {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(600),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let mut configs = Vec::new();
    for (name, pool) in nodes {
        sim.add_node(name, BTreeMap::from([("pool".to_string(), pool.to_string())]));
        sim.add_pod(
            sim::pod("apps", &format!("{name}-app"), name)
                .grace(1)
                .shutdown_seconds(0.2)
                .build(),
        );
        let mut cfg = kreboot_testkit::sim::fleet::agent_config(name);
        cfg.concurrency = 1;
        configs.push(cfg);
    }
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([("config.yaml".to_string(), policy.to_string())]),
    );
    let fleet = Fleet::new(&sim, configs);

    // (max out per pool, max out overall)
    let maxima = Arc::new(Mutex::new((BTreeMap::<String, usize>::new(), 0usize)));
    let m = maxima.clone();
    let api: Api<Node> = Api::all(sim.client().await);
    let monitor = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        let mut state: BTreeMap<String, (String, bool)> = BTreeMap::new();
        // A watch error is not the end: the watcher re-lists with back-off.
        while let Some(item) = stream.next().await {
            let Ok(n) = item else {
                eprintln!("monitor: watch error, the watcher retries: {item:?}");
                continue;
            };
            let pool = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("pool"))
                .cloned()
                .unwrap_or_default();
            state.insert(n.metadata.name.clone().unwrap_or_default(), (pool, is_out(&n)));
            let mut per: BTreeMap<String, usize> = BTreeMap::new();
            for (p, o) in state.values() {
                *per.entry(p.clone()).or_default() += usize::from(*o);
            }
            let total = per.values().sum();
            let mut g = m.lock().expect("monitor lock");
            for (p, c) in per {
                let e = g.0.entry(p).or_default();
                *e = (*e).max(c);
            }
            g.1 = g.1.max(total);
        }
    });

    fleet.start_all();
    for (name, _) in nodes {
        fleet.require_reboot(name);
    }
    wait_for(LIMIT, "every node completes", || {
        nodes.iter().all(|(name, _)| completed(&sim, name))
    })
    .await;
    assert!(!monitor.is_finished(), "the monitor stopped watching");
    monitor.abort();
    let (per_pool, overall) = maxima.lock().expect("monitor lock").clone();
    eprintln!("max out per pool: {per_pool:?}, overall: {overall}");
    let names: Vec<String> = sim
        .leases("kube-system")
        .iter()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    (per_pool, overall, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_at_a_time_per_pool_and_pools_side_by_side() {
    let nodes: Vec<(String, &str)> = (0..6)
        .map(|i| (format!("n{i}"), if i < 3 { "a" } else { "b" }))
        .collect();
    let (per_pool, overall, names) = roll(POLICY, &nodes).await;
    assert_eq!(per_pool.get("a"), Some(&1), "pool a: one at a time");
    assert_eq!(per_pool.get("b"), Some(&1), "pool b: one at a time");
    assert_eq!(overall, 2, "the two pools progressed at once");
    assert!(
        names.contains(&"kreboot-lock-g-a".to_string()) && names.contains(&"kreboot-lock-g-b".to_string()),
        "each pool used its own slot: {names:?}"
    );
}

/// `maxConcurrent: 2` over three pools of one slot each: two pools progress at once, never
/// three, and every node gets its turn (no pool starves, no deadlock between the two locks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_caps_the_groups_together() {
    let policy = POLICY.replace(
        "lockGroup: {byLabel: pool}",
        "lockGroup: {byLabel: pool, maxConcurrent: 2}",
    );
    let nodes: Vec<(String, &str)> = (0..9)
        .map(|i| (format!("n{i}"), ["a", "b", "c"][i % 3]))
        .collect();
    let (per_pool, overall, names) = roll(&policy, &nodes).await;
    for pool in ["a", "b", "c"] {
        assert_eq!(per_pool.get(pool), Some(&1), "pool {pool}: one at a time");
    }
    assert_eq!(
        overall, 2,
        "at most two out across the three pools, and two at once"
    );
    assert!(
        names.contains(&"kreboot-lock-c-pools".to_string())
            && names.contains(&"kreboot-lock-c-pools-1".to_string()),
        "the cap's two slots were used: {names:?}"
    );
}

/// `maxConcurrent: "25%"` over three pools of four nodes (12 nodes: 25% is 3) with two slots
/// each: three nodes out at once across the pools, never four, although the pools' own slots
/// would allow six.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_as_a_share_of_the_rules_nodes() {
    let policy = POLICY.replace("concurrency: 1", "concurrency: 2").replace(
        "lockGroup: {byLabel: pool}",
        "lockGroup: {byLabel: pool, maxConcurrent: \"25%\"}",
    );
    let nodes: Vec<(String, &str)> = (0..12)
        .map(|i| (format!("n{i}"), ["a", "b", "c"][i % 3]))
        .collect();
    let (per_pool, overall, names) = roll(&policy, &nodes).await;
    for pool in ["a", "b", "c"] {
        assert!(
            per_pool.get(pool).is_some_and(|m| *m <= 2),
            "pool {pool}: {per_pool:?}"
        );
    }
    assert_eq!(
        overall, 3,
        "25% of the rule's 12 nodes: three out at once, never four"
    );
    assert!(
        names.contains(&"kreboot-lock-c-pools-2".to_string())
            && !names.contains(&"kreboot-lock-c-pools-3".to_string()),
        "the cap had three slots: {names:?}"
    );
}
