//! The shipped RBAC (manifests/, rendered from the chart) grants exactly the calls kreboot makes.
//!
//! A rolling reboot of three nodes on the simulated cluster, with a live policy ConfigMap (valid,
//! then invalid) and pods to evict, records every distinct (verb, group, resource, namespace)
//! the agents call (a health gate on, with its PodDisruptionBudget check); each must be granted by the manifests' ClusterRole/Role, and every grant must
//! have been used (a grant nobody uses is a permission to remove).

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use kreboot_testkit::sim::rbac;

const LIMIT: Duration = Duration::from_secs(60);

fn manifest_objects() -> Vec<serde_json::Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests");
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("manifests/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).expect("readable manifest");
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.extend(docs.into_iter().filter(|d| !d.is_null()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_grant_exactly_the_calls_the_agents_make() {
    let (sim, fleet) = cluster(3, |c| c.concurrency = 1).await;
    // A health gate with its budget check (the default): the drain lists the budgets, the gate
    // watches them. The simulator has no disruption controller: the status is written here.
    sim.add_pdb(
        "apps",
        "web",
        BTreeMap::from([("app".to_string(), "web".to_string())]),
        None,
        Some(6),
    );
    sim.store()
        .update(kreboot_testkit::sim::store::Kind::Pdb, "apps", "web", |old| {
            let mut b = old.clone();
            b["status"] = serde_json::json!({
                "currentHealthy": 6, "desiredHealthy": 0, "disruptionsAllowed": 6,
                "expectedPods": 6, "observedGeneration": 1,
            });
            Ok(b)
        })
        .expect("budget status written");
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([(
            "config.yaml".to_string(),
            "timezone: UTC\nrules:\n  - {name: all, nodeSelector: {}, healthGate: {timeout: 1m}}\n"
                .to_string(),
        )]),
    );
    fleet.start_all();
    for n in names(3) {
        fleet.require_reboot(&n);
    }
    wait_for(LIMIT, "every node completes its reboot", || {
        names(3).iter().all(|n| completed(&sim, n))
    })
    .await;
    // An invalid policy makes every running agent record an Event.
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([("config.yaml".to_string(), "timezone: Mars/Olympus\n".to_string())]),
    );
    fleet.require_reboot("n0");
    wait_for(LIMIT, "the invalid policy is reported", || {
        sim.events()
            .iter()
            .any(|e| e.get("reason").and_then(|r| r.as_str()) == Some("ConfigInvalid"))
    })
    .await;

    let accesses = sim.accesses();
    let rules = rbac::rules(&manifest_objects()).expect("RBAC rules parse");
    assert!(!rules.is_empty(), "manifests/ holds the RBAC rules");
    for a in &accesses {
        eprintln!("called: {a}");
    }
    let denied = rbac::denied(&rules, &accesses, "kube-system");
    assert!(
        denied.is_empty(),
        "the agents make calls the RBAC does not grant: {}",
        denied
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    );
    // `patch events`: the Event recorder patches an Event when the same one repeats (a count
    // bump), which this run may or may not provoke.
    let unused: Vec<String> = rbac::unused(&rules, &accesses, "kube-system")
        .into_iter()
        .filter(|g| g != "patch events.k8s.io/events")
        .collect();
    assert!(unused.is_empty(), "granted but never used: {unused:?}");
}
