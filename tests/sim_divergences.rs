//! Behaviours of the real kube-apiserver that the simulator once got wrong, each checked on the
//! simulator and, where kreboot depended on the wrong behaviour, on kreboot itself.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::*;
use futures::TryStreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Namespace, Node, Pod},
};
use kreboot::{
    drain::{self, DrainConfig, DrainError},
    lock::LeaseLock,
    node::{ANN_LAST_FAILURE_REASON, LABEL_HOLDER, LABEL_WAITING},
};
use kreboot_testkit::sim::{self, Faults, SimCluster, SimConfig, store::Kind};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(30);

async fn sim() -> SimCluster {
    SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts")
}

fn api_code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("not an API error: {other}"),
    }
}

/// The next event of a raw watch (within 5 s).
async fn next_event<K>(
    stream: &mut (impl futures::Stream<Item = Result<WatchEvent<K>, kube::Error>> + Unpin),
) -> WatchEvent<K> {
    tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("an event within 5 s")
        .expect("no watch error")
        .expect("the stream goes on")
}

#[tokio::test]
async fn leaving_a_label_selector_sends_deleted_with_the_previous_object() {
    let sim = sim().await;
    let holder = BTreeMap::from([(LABEL_HOLDER.to_string(), "true".to_string())]);
    sim.add_node("n1", holder);
    let nodes: Api<Node> = Api::all(sim.client().await);
    let rv = sim.store().rv().to_string();
    let stream = nodes
        .watch(
            &WatchParams::default().labels(&format!("{LABEL_HOLDER}=true")),
            &rv,
        )
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let unlabelled = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {LABEL_HOLDER: null}}})),
        )
        .await
        .unwrap();
    let WatchEvent::Deleted(gone) = next_event(&mut stream).await else {
        panic!("expected DELETED")
    };
    assert_eq!(
        gone.metadata
            .labels
            .unwrap_or_default()
            .get(LABEL_HOLDER)
            .map(String::as_str),
        Some("true"),
        "the DELETED event carries the object as it was while it matched"
    );
    assert_eq!(
        gone.metadata.resource_version, unlabelled.metadata.resource_version,
        "with the resourceVersion of the change"
    );
    // Matching again: ADDED, with the new object.
    let relabelled = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {LABEL_HOLDER: "true"}}})),
        )
        .await
        .unwrap();
    let WatchEvent::Added(back) = next_event(&mut stream).await else {
        panic!("expected ADDED")
    };
    assert_eq!(
        back.metadata.resource_version,
        relabelled.metadata.resource_version
    );
}

#[tokio::test]
async fn leaving_a_field_selector_sends_deleted_with_the_previous_object() {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(sim::pod("apps", "job", "n1").build());
    let pods: Api<Pod> = Api::namespaced(sim.client().await, "apps");
    let rv = sim.store().rv().to_string();
    let stream = pods
        .watch(&WatchParams::default().fields("status.phase=Running"), &rv)
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let done = pods
        .patch_status(
            "job",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
    let WatchEvent::Deleted(gone) = next_event(&mut stream).await else {
        panic!("expected DELETED")
    };
    assert_eq!(
        gone.status.and_then(|s| s.phase).as_deref(),
        Some("Running"),
        "the previous object"
    );
    assert_eq!(gone.metadata.resource_version, done.metadata.resource_version);
}

fn lease_json(name: &str, duration: i64) -> Lease {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"holderIdentity": "n1", "leaseDurationSeconds": duration,
                 "renewTime": "2026-11-24T18:00:00.000000Z"},
    }))
    .unwrap()
}

#[tokio::test]
async fn lease_updates_need_a_resource_version_and_a_positive_duration() {
    let sim = sim().await;
    let leases: Api<Lease> = Api::namespaced(sim.client().await, "kube-system");
    let err = leases
        .create(&PostParams::default(), &lease_json("l", 0))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 422, "{err}");
    assert!(err.to_string().contains("leaseDurationSeconds"), "{err}");
    let created = leases
        .create(&PostParams::default(), &lease_json("l", 10))
        .await
        .unwrap();
    // A replace without metadata.resourceVersion is refused for Leases.
    let err = leases
        .replace("l", &PostParams::default(), &lease_json("l", 20))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 422, "{err}");
    assert!(
        err.to_string()
            .contains("metadata.resourceVersion: Invalid value: 0: must be specified for an update"),
        "{err}"
    );
    // With the version but a non-positive duration: refused.
    let mut negative = lease_json("l", -5);
    negative.metadata.resource_version = created.metadata.resource_version.clone();
    let err = leases
        .replace("l", &PostParams::default(), &negative)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 422, "{err}");
    // A patch gets the stored version: it may omit it, but not zero the duration.
    let err = leases
        .patch(
            "l",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"leaseDurationSeconds": 0}})),
        )
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 422, "{err}");
    let mut good = lease_json("l", 20);
    good.metadata.resource_version = created.metadata.resource_version.clone();
    leases.replace("l", &PostParams::default(), &good).await.unwrap();
    // A missing Lease is 404 before anything else.
    let err = leases
        .replace("missing", &PostParams::default(), &lease_json("missing", 0))
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 404, "{err}");
}

#[tokio::test]
async fn the_lock_never_sends_an_unversioned_or_zero_duration_lease_write() {
    let sim = sim().await;
    let lock = |ttl: chrono::Duration| LeaseLock {
        api: Api::namespaced(sim.client_config().try_into().unwrap(), "kube-system"),
        lock_name: "kreboot-lock".into(),
        identity: "n1".into(),
        ttl,
    };
    let now = chrono::Utc::now();
    // A TTL under a second (never valid on the command line) still writes a positive duration.
    let held = lock(chrono::Duration::milliseconds(300))
        .acquire("kreboot-lock", None, now)
        .await
        .expect("created");
    let duration = held.spec.as_ref().and_then(|s| s.lease_duration_seconds);
    assert!(duration.is_some_and(|d| d > 0), "{duration:?}");
    let lock = lock(chrono::Duration::seconds(60));
    let renewed = lock.renew(&held, now).await.expect("renewed");
    sim.reset_request_counts();
    // A Lease without its resourceVersion (not one the API server sent) is never written.
    let mut unversioned = renewed.clone();
    unversioned.metadata.resource_version = None;
    assert!(lock.renew(&unversioned, now).await.is_err());
    assert!(lock.hand_off(&unversioned, "n2", 0, now).await.is_err());
    assert!(lock.release(&unversioned, now).await.is_err());
    assert!(
        lock.acquire("kreboot-lock", Some(&unversioned), now)
            .await
            .is_err()
    );
    assert_eq!(
        sim.request_counts().writes(),
        0,
        "nothing sent: {:?}",
        sim.request_counts()
    );
    lock.release(&renewed, now)
        .await
        .expect("released")
        .expect("held");
}

#[tokio::test]
async fn creates_in_a_missing_namespace_are_not_found() {
    let sim = sim().await;
    let client = sim.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "nowhere");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    let err = cms.create(&PostParams::default(), &cm).await.unwrap_err();
    assert_eq!(api_code(&err), 404, "{err}");
    assert!(
        err.to_string().contains("namespaces \"nowhere\" not found"),
        "{err}"
    );
    let namespaces: Api<Namespace> = Api::all(client);
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "nowhere"}})).unwrap(),
        )
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // The harness's helpers create the namespace of what they add.
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(sim::pod("fresh", "p", "n1").build());
    assert!(sim.store().get(Kind::Namespace, "", "fresh").is_some());
}

fn drain_cfg(timeout: Duration) -> DrainConfig {
    DrainConfig {
        timeout,
        grace_period: None,
        eviction_retry: Duration::from_millis(100),
    }
}

/// One node with a pod `db-0` covered by two PodDisruptionBudgets.
async fn two_budgets() -> SimCluster {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(
        sim::pod("apps", "db-0", "n1")
            .labels([("app", "db"), ("tier", "data")])
            .grace(1)
            .shutdown_seconds(0.1)
            .build(),
    );
    let by = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    sim.add_pdb("apps", "db", by("app", "db"), None, Some(1));
    sim.add_pdb("apps", "data", by("tier", "data"), None, Some(1));
    sim
}

#[tokio::test]
async fn a_pod_under_two_budgets_fails_the_drain_at_once_with_the_reason() {
    let sim = two_budgets().await;
    let pods: Api<Pod> = Api::namespaced(sim.client().await, "apps");
    let body = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "db-0", "namespace": "apps"}});
    let err = pods
        .create_subresource::<_, serde_json::Value>("eviction", "db-0", &PostParams::default(), &body)
        .await
        .unwrap_err();
    assert_eq!(api_code(&err), 500, "{err}");
    assert!(
        err.to_string().contains("more than one PodDisruptionBudget"),
        "{err}"
    );

    let started = std::time::Instant::now();
    let result = drain::drain(
        &sim.client().await,
        "n1",
        &drain_cfg(Duration::from_secs(10)),
        &|| {},
    )
    .await;
    let took = started.elapsed();
    match result {
        Err(e @ DrainError::Refused { .. }) => {
            assert!(e.to_string().contains("more than one PodDisruptionBudget"), "{e}");
            assert!(e.to_string().contains("apps/db-0"), "{e}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        took < Duration::from_secs(3),
        "failed after {took:?}, not at once"
    );
    assert!(!sim.pods_on("n1").is_empty(), "the pod was left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_a_pod_under_two_budgets_as_a_failed_drain() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.add_pod(
        sim::pod("apps", "db-0", "n0")
            .labels([("app", "db"), ("tier", "data")])
            .grace(1)
            .build(),
    );
    let by = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    sim.add_pdb("apps", "db", by("app", "db"), None, Some(1));
    sim.add_pdb("apps", "data", by("tier", "data"), None, Some(1));
    fleet.start_all();
    fleet.require_reboot("n0");
    // The drain timeout is 60 s: the failure must come from the refusal, not from the timeout.
    wait_for(Duration::from_secs(15), "the failed drain is recorded", || {
        annotation(&sim, "n0", ANN_LAST_FAILURE_REASON).as_deref() == Some("eviction_refused")
    })
    .await;
    wait_for(LIMIT, "lock released", || {
        lease_holder(&sim, "kreboot-lock").is_none()
    })
    .await;
    assert!(!unschedulable(&sim, "n0"), "uncordoned");
    // Events are written beside the cycle's steps, not before them: wait for it.
    wait_for(LIMIT, "a DrainFailed event naming the cause", || {
        sim.events().iter().any(|e| {
            e.to_string().contains("DrainFailed")
                && e.to_string().contains("more than one PodDisruptionBudget")
        })
    })
    .await;
}

#[tokio::test]
async fn an_eviction_conflict_is_retried() {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(sim::pod("apps", "web", "n1").grace(0).build());
    // Every write answers 409 for a while (evictions are the drain's only writes).
    sim.set_faults(Faults {
        conflict_rate: 1.0,
        ..Faults::default()
    });
    let client = sim.client().await;
    let drained = tokio::spawn(async move {
        drain::drain(&client, "n1", &drain_cfg(Duration::from_secs(10)), &|| {}).await
    });
    wait_for(LIMIT, "a conflict was answered", || {
        sim.request_counts().refused("evict pods", 409) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set_faults(Faults::default());
    let report = drained
        .await
        .unwrap()
        .expect("the drain completes after the conflicts");
    assert_eq!(report.evicted, 1);
    assert!(report.retries >= 1, "{report:?}");
    assert!(sim.pods_on("n1").is_empty());
}

#[tokio::test]
async fn the_drain_waits_for_the_evicted_pod_not_a_replacement_with_its_name() {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    // A StatefulSet's pod: gone at once when evicted, then recreated with the same name.
    sim.add_pod(sim::pod("apps", "web-0", "n1").grace(0).build());
    // A pod whose eviction a budget holds back until the replacement exists.
    sim.add_pod(db_pod("db-0", "n1").grace(0).build());
    guard_db_pods(&sim);
    let uid = |sim: &SimCluster| {
        sim.pods_on("n1")
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some("web-0"))
            .and_then(|p| p.metadata.uid)
    };
    let first = uid(&sim).unwrap();
    let client = sim.client().await;
    let drained =
        tokio::spawn(
            async move { drain::drain(&client, "n1", &drain_cfg(Duration::from_secs(5)), &|| {}).await },
        );
    wait_for(LIMIT, "web-0 evicted", || uid(&sim).is_none()).await;
    sim.add_pod(sim::pod("apps", "web-0", "n1").grace(0).build());
    let second = uid(&sim).unwrap();
    assert_ne!(first, second);
    sim.store().delete(Kind::Pdb, "apps", "db").unwrap();
    let report = drained
        .await
        .unwrap()
        .expect("the evicted pod is gone: its replacement is another pod");
    assert_eq!(report.evicted, 2);
    assert_eq!(uid(&sim), Some(second), "the replacement was left alone");
}

/// A holder that ends its cycle drops its lock-holder label, which reaches every waiter's
/// label-selector watch as DELETED carrying the label (as from a deleted Node). The waiters
/// must not take that for a deleted holder and race for its slot: the holder hands the slot to
/// the longest waiter, and nobody else writes the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_ending_its_cycle_draws_no_competing_lease_writes() {
    let (sim, fleet) = cluster(4, |_| {}).await;
    // The holder's hand-over starts with a list of the waiting Nodes: make it slower than the
    // waiters' random delay before taking a free slot (at most 200 ms), so a waiter that took
    // the dropped label for a deleted holder would always write the Lease first.
    sim.set_slow("list nodes", Duration::from_millis(400));
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 holds the lock", || {
        lease_holder(&sim, "kreboot-lock").as_deref() == Some("n0")
    })
    .await;
    let waiting = |n: &str| {
        sim.node(n)
            .and_then(|n| n.metadata.labels)
            .is_some_and(|l| l.get(LABEL_WAITING).map(String::as_str) == Some("true"))
    };
    // Join the queue one after the other: the expected order of the hand-overs.
    for n in ["n1", "n2", "n3"] {
        fleet.require_reboot(n);
        wait_for(LIMIT, &format!("{n} waits"), || waiting(n)).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.reset_request_counts();
    let mut holders = vec!["n0".to_string()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !fleet.nodes().iter().all(|n| completed(&sim, n)) {
        assert!(tokio::time::Instant::now() < deadline, "every node completes");
        if let Some(h) = lease_holder(&sim, "kreboot-lock")
            && holders.last() != Some(&h)
        {
            holders.push(h);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let counts = sim.request_counts();
    assert_eq!(
        (
            counts.refused("update leases", 409),
            counts.refused("create leases", 409)
        ),
        (0, 0),
        "no waiter raced for a slot being handed over: {counts:?}"
    );
    // Three hand-overs (the holder's write and the successor's claim) and the last release;
    // renewals are every 20 s.
    let updates = counts.by_verb_resource.get("update leases").copied().unwrap_or(0);
    assert!(updates <= 7 + 4, "{updates} Lease updates: {counts:?}");
    assert_eq!(holders, ["n0", "n1", "n2", "n3"], "the longest waiter goes next");
}

/// The deleted-holder case next to the one above: a holder whose Node is deleted mid-cycle
/// (labelled) frees its slot within about a second, although its DELETED event looks exactly
/// like a holder that merely dropped its label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_labelled_holder_frees_its_slot_quickly() {
    let (sim, fleet) = cluster(2, |_| {}).await;
    // A slow pod keeps n0 draining (not yet rebooting) when its machine vanishes.
    sim.add_pod(slow_pod("n0", 30, 20.0));
    fleet.start_all();
    fleet.require_reboot("n0");
    let in_cycle = |n: &str| {
        sim.node(n)
            .and_then(|n| n.metadata.labels)
            .is_some_and(|l| l.get(LABEL_HOLDER).map(String::as_str) == Some("true"))
    };
    wait_for(LIMIT, "n0 holds and is labelled", || in_cycle("n0")).await;
    // n0's machine vanishes mid-cycle: its agent dies with it and its Node is deleted.
    fleet.kill("n0");
    fleet.require_reboot("n1");
    wait_for(LIMIT, "n1 waits", || {
        sim.node("n1")
            .and_then(|n| n.metadata.labels)
            .is_some_and(|l| l.get(LABEL_WAITING).map(String::as_str) == Some("true"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deleted = std::time::Instant::now();
    sim.delete_node("n0");
    wait_for(LIMIT, "n1 takes the slot", || {
        lease_holder(&sim, "kreboot-lock").as_deref() == Some("n1")
    })
    .await;
    let took = deleted.elapsed();
    assert!(took < Duration::from_millis(1500), "slot freed after {took:?}");
    wait_for(LIMIT, "n1 completes", || completed(&sim, "n1")).await;
}
