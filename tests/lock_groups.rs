//! Lock groups: two pools of three nodes under a rule `concurrency: 1, lockGroup: {byLabel:
//! pool}` reboot one node at a time per pool, and both pools progress at once, although the
//! agents' cluster-wide `--concurrency` is 1. A real kube-rs watch of every Node records the
//! largest number of nodes out of service per pool and overall.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kreboot::{
    node::{ANN_CORDONED_BY_KREBOOT, ANN_PHASE},
    sim::{self, SimCluster, SimConfig, fleet::Fleet},
};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

const LIMIT: Duration = Duration::from_secs(90);
const POLICY: &str = "rules:\n  - name: pools\n    nodeSelector:\n      matchExpressions: [{key: pool, operator: Exists}]\n    concurrency: 1\n    lockGroup: {byLabel: pool}\n";

fn out(n: &Node) -> bool {
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let cordoned = n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
        && ann.get(ANN_CORDONED_BY_KREBOOT).map(String::as_str) == Some("true");
    ann.contains_key(ANN_PHASE) || !ready || cordoned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_at_a_time_per_pool_and_pools_side_by_side() {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(600),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let pool = |i: usize| if i < 3 { "a" } else { "b" };
    let mut configs = Vec::new();
    for i in 0..6 {
        let name = format!("n{i}");
        sim.add_node(&name, BTreeMap::from([("pool".to_string(), pool(i).to_string())]));
        sim.add_pod(
            sim::pod("apps", &format!("{name}-app"), &name)
                .grace(1)
                .shutdown_seconds(0.2)
                .build(),
        );
        let mut cfg = kreboot::sim::fleet::agent_config(&name);
        cfg.concurrency = 1;
        configs.push(cfg);
    }
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([("config.yaml".to_string(), POLICY.to_string())]),
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
            state.insert(n.metadata.name.clone().unwrap_or_default(), (pool, out(&n)));
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
    for i in 0..6 {
        fleet.require_reboot(&format!("n{i}"));
    }
    wait_for(LIMIT, "all six nodes complete", || {
        (0..6).all(|i| completed(&sim, &format!("n{i}")))
    })
    .await;
    assert!(!monitor.is_finished(), "the monitor stopped watching");
    monitor.abort();
    let (per_pool, overall) = maxima.lock().expect("monitor lock").clone();
    eprintln!("max out per pool: {per_pool:?}, overall: {overall}");
    assert_eq!(per_pool.get("a"), Some(&1), "pool a: one at a time");
    assert_eq!(per_pool.get("b"), Some(&1), "pool b: one at a time");
    assert_eq!(overall, 2, "the two pools progressed at once");
    let names: Vec<String> = sim
        .leases("kube-system")
        .iter()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    assert!(
        names.contains(&"kreboot-lock-g-a".to_string()) && names.contains(&"kreboot-lock-g-b".to_string()),
        "each pool used its own slot: {names:?}"
    );
}
