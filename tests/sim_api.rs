//! The simulated cluster against real clients: kube-rs for every verb and semantic kreboot
//! relies on, and Debian's kubectl as a second, independent client.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{db_pod, guard_db_pods};
use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node, Pod},
};
use kreboot_testkit::sim::{self, Faults, SimCluster, SimConfig, SimEvent};
use kube::{
    Api,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

async fn sim() -> SimCluster {
    SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(200),
        bookmark_interval: Duration::from_millis(200),
        history_size: 50,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn cm(name: &str, v: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": v}}, "data": {"k": v}}))
        .unwrap()
}

#[tokio::test]
async fn crud_conflicts_and_patches() {
    let sim = sim().await;
    let api: Api<ConfigMap> = Api::namespaced(sim.client().await, "kube-system");
    let created = api.create(&PostParams::default(), &cm("a", "1")).await.unwrap();
    let err = api
        .create(&PostParams::default(), &cm("a", "1"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err}");
    // Replace with the current version works; with a stale one it is a 409 Conflict.
    let mut fresh = created.clone();
    fresh.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    let replaced = api.replace("a", &PostParams::default(), &fresh).await.unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        created.metadata.resource_version
    );
    let err = api
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err}"
    );
    // A merge patch carrying a stale resourceVersion is refused too; without one it applies.
    let stale =
        json!({"metadata": {"resourceVersion": created.metadata.resource_version}, "data": {"k": "3"}});
    let err = api
        .patch("a", &PatchParams::default(), &Patch::Merge(&stale))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "a stale merge patch: {err}"
    );
    let p = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "y", "k": null}})),
        )
        .await
        .unwrap();
    assert_eq!(p.data.unwrap(), BTreeMap::from([("x".into(), "y".into())]));
    // JSON patch with a failing test op is refused.
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "test", "path": "/data/x", "value": "nope"}])).unwrap();
    // kube-apiserver answers a JSON patch it cannot apply with 422 Invalid.
    let err = api
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422),
        "a failing JSON patch test op: {err}"
    );
    api.delete("a", &DeleteParams::default()).await.unwrap();
    let err = api.get("a").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 404), "{err}");
}

#[tokio::test]
async fn selectors_pagination_and_status_subresource() {
    let sim = sim().await;
    let client = sim.client().await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    for i in 0..7 {
        api.create(
            &PostParams::default(),
            &cm(&format!("c{i}"), if i % 2 == 0 { "even" } else { "odd" }),
        )
        .await
        .unwrap();
    }
    let even = api.list(&ListParams::default().labels("app=even")).await.unwrap();
    assert_eq!(even.items.len(), 4);
    let not_even = api
        .list(&ListParams::default().labels("app!=even"))
        .await
        .unwrap();
    assert_eq!(not_even.items.len(), 3);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=c3"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let page = api.list(&ListParams::default().limit(3)).await.unwrap();
    assert_eq!(page.items.len(), 3);
    let rest = api
        .list(
            &ListParams::default()
                .limit(10)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 4);

    sim.add_node("n1", BTreeMap::new());
    let nodes: Api<Node> = Api::all(client);
    // A write to the main resource keeps the status the kubelet owns.
    let patched = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"nodeInfo": {"bootID": "forged"}}, "spec": {"unschedulable": true}}),
            ),
        )
        .await
        .unwrap();
    assert_ne!(patched.status.unwrap().node_info.unwrap().boot_id, "forged");
    assert_eq!(patched.spec.unwrap().unschedulable, Some(true));
    let status = nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"nodeInfo": {"bootID": "new"}}, "spec": {"unschedulable": false}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status.status.unwrap().node_info.unwrap().boot_id, "new");
    assert_eq!(
        status.spec.unwrap().unschedulable,
        Some(true),
        "/status keeps the spec"
    );
}

#[tokio::test]
async fn watches_recover_from_drops_and_gone_versions_and_get_bookmarks() {
    // A history shorter than the unrelated churn between two events of the watch (five
    // creates): a resume from the last version the watch saw is older than what is kept.
    let sim = SimCluster::start(SimConfig {
        bookmark_interval: Duration::from_millis(200),
        history_size: 4,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let api: Api<ConfigMap> = Api::namespaced(sim.client().await, "kube-system");
    sim.set_faults(Faults {
        watch_drop_after: Some(Duration::from_millis(300)),
        ..Faults::default()
    });
    let stream = watcher(api.clone(), watcher::Config::default().labels("app=w")).default_backoff();
    futures::pin_mut!(stream);
    let mut seen = std::collections::BTreeSet::new();
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..30 {
                api.create(&PostParams::default(), &cm(&format!("w{i}"), "w"))
                    .await
                    .unwrap();
                // Unrelated churn pushes versions out of the short history: resumes hit 410.
                for j in 0..5 {
                    api.create(&PostParams::default(), &cm(&format!("x{i}-{j}"), "x"))
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < 30 {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("watch keeps delivering");
        match ev {
            Some(Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c))) => {
                seen.insert(c.metadata.name.unwrap());
            }
            Some(_) => {}
            None => panic!("watch ended"),
        }
    }
    writer.await.unwrap();
    let counts = sim.request_counts();
    assert!(
        counts.by_verb["watch"] > 2,
        "watches were dropped and resumed: {counts:?}"
    );
    assert!(
        counts.refused("watch configmaps", 410) >= 1 && counts.by_verb["list"] > 1,
        "a resume met 410 Gone and the watcher re-listed: {counts:?}"
    );
    // A watch from a version older than the kept history gets 410 Gone in the stream.
    let gone = reqwest_like_get(
        &sim,
        "/api/v1/namespaces/kube-system/configmaps?watch=true&resourceVersion=2",
    )
    .await;
    assert!(
        gone.contains("\"ERROR\"") && gone.contains("\"code\":410"),
        "{gone}"
    );

    // Bookmarks arrive on a raw watch that asks for them.
    sim.set_faults(Faults::default());
    let raw = reqwest_like_get(&sim, "/api/v1/namespaces/kube-system/configmaps?watch=true&allowWatchBookmarks=true&labelSelector=app%3Dnone&timeoutSeconds=1").await;
    assert!(raw.contains("\"BOOKMARK\""), "{raw}");
}

/// A plain HTTP GET through curl (a third client), returning the body.
async fn reqwest_like_get(sim: &SimCluster, path: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--max-time", "5", &format!("{}{path}", sim.url())])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn eviction_honours_grace_periods_and_disruption_budgets() {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(
        sim::pod("apps", "web", "n1")
            .grace(30)
            .shutdown_seconds(0.3)
            .build(),
    );
    sim.add_pod(db_pod("db", "n1").grace(1).build());
    sim.add_pod(db_pod("db-2", "n1").grace(1).shutdown_seconds(0.1).build());
    guard_db_pods(&sim);
    let client = sim.client().await;
    let pods: Api<Pod> = Api::namespaced(client, "apps");
    let evict = |name: &str| {
        let pods = pods.clone();
        let name = name.to_string();
        async move {
            let body = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": "apps"}, "deleteOptions": {"gracePeriodSeconds": 1}});
            pods.create_subresource::<_, serde_json::Value>("eviction", &name, &PostParams::default(), &body)
                .await
        }
    };
    let t = std::time::Instant::now();
    evict("web").await.unwrap();
    let p = pods.get("web").await.unwrap();
    assert!(p.metadata.deletion_timestamp.is_some(), "terminating");
    assert_eq!(
        p.metadata.deletion_grace_period_seconds,
        Some(1),
        "the Eviction's grace period was honoured"
    );
    while pods.get_opt("web").await.unwrap().is_some() {
        assert!(t.elapsed() < Duration::from_secs(3));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "gone after its shutdown time, {:?}",
        t.elapsed()
    );
    // Two db pods, minAvailable 1: the first eviction is allowed, the second refused while the
    // first terminates.
    evict("db-2").await.unwrap();
    let err = evict("db").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 429), "{err}");
    let err = evict("missing").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 404), "{err}");
    assert_eq!(sim.request_counts().by_verb["evict"], 4);
}

#[tokio::test]
async fn validation_the_real_server_does() {
    let sim = sim().await;
    let client = sim.client().await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    let bad: Lease = serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "n", "renewTime": "2026-11-24T18:00:00.000000Z"}})).unwrap();
    leases.create(&PostParams::default(), &bad).await.unwrap();
    let raw = json!({"spec": {"renewTime": "2026-11-24T18:00:00Z"}});
    let err = leases
        .patch("l", &PatchParams::default(), &Patch::Merge(&raw))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422), "{err}");
    // An Event about a Node outside default/kube-system is rejected (in a namespace that
    // exists: one that does not is a 404 before any validation).
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "apps"}})).unwrap(),
        )
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), "apps");
    let ev: k8s_openapi::api::events::v1::Event = serde_json::from_value(json!({
        "metadata": {"name": "e"}, "eventTime": "2026-11-24T18:00:00.000000Z", "reason": "Test",
        "reportingController": "t", "reportingInstance": "t", "action": "Test", "type": "Normal",
        "regarding": {"kind": "Node", "name": "n1", "apiVersion": "v1"}
    }))
    .unwrap();
    let err = events.create(&PostParams::default(), &ev).await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 422), "{err}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client, "default");
    events.create(&PostParams::default(), &ev).await.unwrap();
}

#[tokio::test]
async fn reboots_and_faults() {
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(sim::pod("apps", "web", "n1").build());
    sim.add_pod(sim::pod("kube-system", "ds", "n1").daemonset().build());
    let before = sim.node("n1").unwrap().status.unwrap().node_info.unwrap().boot_id;
    let mut events = sim.subscribe();
    assert!(sim.reboot_node("n1"));
    assert!(!sim.reboot_node("n1"), "already rebooting");
    let ready = |n: &Node| {
        n.status
            .as_ref()
            .unwrap()
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    };
    assert!(!ready(&sim.node("n1").unwrap()));
    let names: Vec<String> = sim
        .pods_on("n1")
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    assert_eq!(names, vec!["ds"], "only the DaemonSet pod survives the reboot");
    assert_eq!(
        events.recv().await.unwrap(),
        SimEvent::RebootStarted { node: "n1".into() }
    );
    let SimEvent::NodeReady { boot_id, .. } = events.recv().await.unwrap() else {
        panic!()
    };
    let node = sim.node("n1").unwrap();
    assert!(ready(&node));
    assert_eq!(node.status.unwrap().node_info.unwrap().boot_id, boot_id);
    assert_ne!(boot_id, before);

    sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let nodes: Api<Node> = Api::all(sim.client().await);
    let err = nodes.get("n1").await.unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code >= 500), "{err}");
    sim.set_faults(Faults {
        conflict_rate: 1.0,
        ..Faults::default()
    });
    nodes.get("n1").await.expect("conflicts hit writes only");
    let err = nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(ref s) if s.code == 409), "{err}");
    sim.reset_request_counts();
    sim.set_faults(Faults::default());
    nodes.list(&ListParams::default()).await.unwrap();
    let c = sim.request_counts();
    assert_eq!((c.total(), c.by_verb["list"], c.writes()), (1, 1, 0));
}

#[tokio::test]
async fn kubectl_is_a_second_real_client() {
    if std::process::Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .is_err()
    {
        panic!("kubectl is required (scripts/test installs Debian's kubernetes-client)");
    }
    let sim = sim().await;
    sim.add_node("n1", BTreeMap::new());
    sim.add_pod(sim::pod("apps", "web", "n1").build());
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kc).unwrap();
    let kubectl = |args: &[&str]| {
        let kc = kc.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let out = tokio::process::Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kc)
                .args(&args)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "kubectl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let nodes: serde_json::Value =
        serde_json::from_str(&kubectl(&["get", "nodes", "-o", "json"]).await).unwrap();
    assert_eq!(nodes["items"][0]["metadata"]["name"], "n1");
    let pods = kubectl(&["get", "pods", "-A", "-o", "name"]).await;
    assert_eq!(pods.trim(), "pod/web");
    kubectl(&["cordon", "n1"]).await;
    assert_eq!(
        sim.node("n1").unwrap().spec.unwrap().unschedulable,
        Some(true),
        "kubectl's patch applied"
    );
}
