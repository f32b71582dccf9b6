//! Blockers hold a reboot back until they clear: a running pod matching
//! `--blocking-pod-selector`, and a firing alert in a real Prometheus (Debian's package, started
//! here on 127.0.0.1 with a rule that fires while a gate metric says so); an alert the filter
//! excludes never blocks; with a real Alertmanager beside it, an alert silenced there does not
//! block and one that is not silenced does (on the simulated cluster with in-process agents, and
//! again on the real control plane with the kreboot binary). Also the pre/post-reboot labels and the PreferNoSchedule taint while
//! a node waits for the lock. And a rule's `healthGate.query`, asked of the real Prometheus:
//! the rebooted node keeps its lock slot while the query returns a series.

mod common;

use std::{
    collections::BTreeMap,
    io::Write,
    net::TcpListener,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::*;
use k8s_openapi::api::core::v1::Pod;
use kreboot::{
    blockers::AlertBlocker,
    node::{ANN_BLOCKED_BY, ANN_LAST_REBOOT, ANN_PHASE},
};
use kreboot_testkit::sim;
use kube::{Api, api::DeleteParams};

const LIMIT: Duration = Duration::from_secs(60);

fn lock_free(sim: &kreboot_testkit::sim::SimCluster) -> bool {
    lease_holder(sim, "kreboot-lock").is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_pod_holds_the_reboot_until_it_is_gone() {
    let (sim, fleet) = cluster(1, |c| {
        c.blockers.pod_selectors = vec!["app=backup".into()];
    })
    .await;
    sim.add_pod(
        sim::pod("ops", "backup-7", "n0")
            .labels([("app", "backup")])
            .build(),
    );
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "the reboot is recorded as blocked by the pod", || {
        annotation(&sim, "n0", ANN_BLOCKED_BY).as_deref() == Some("pods: ops/backup-7")
    })
    .await;
    let metrics = fleet.metrics("n0").expect("agent metrics");
    wait_for(LIMIT, "blocked metric", || {
        metrics
            .render()
            .contains("kreboot_reboot_blocked{node=\"n0\",reason=\"blocking_pods\"} 1")
    })
    .await;
    wait_for(LIMIT, "RebootBlocked event", || {
        event_reasons(&sim, "n0").iter().any(|r| r == "RebootBlocked")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!unschedulable(&sim, "n0"), "not cordoned while blocked");
    assert!(lock_free(&sim), "no lock taken while blocked");

    let pods: Api<Pod> = Api::namespaced(sim.client().await, "ops");
    pods.delete("backup-7", &DeleteParams::default())
        .await
        .expect("delete the pod");
    wait_for(LIMIT, "n0 reboots once the pod is gone", || completed(&sim, "n0")).await;
    assert_eq!(annotation(&sim, "n0", ANN_BLOCKED_BY), None, "blocked-by cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_and_taint_follow_the_cycle() {
    let (sim, fleet) = cluster(2, |c| {
        c.pre_reboot_labels = BTreeMap::from([("example.com/reboot".into(), "in-progress".into())]);
        c.post_reboot_labels = BTreeMap::from([("example.com/patched".into(), "true".into())]);
        c.prefer_no_schedule_taint = Some("example.com/reboot-pending".into());
    })
    .await;
    // A slow pod on each node keeps the first drain going while the other node waits.
    for n in names(2) {
        sim.add_pod(
            sim::pod("apps", &format!("{n}-slow"), &n)
                .grace(5)
                .shutdown_seconds(1.5)
                .build(),
        );
    }
    let label = |n: &str, k: &str| {
        sim.node(n)
            .and_then(|o| o.metadata.labels)
            .and_then(|l| l.get(k).cloned())
    };
    let tainted = |n: &str| {
        sim.node(n)
            .and_then(|o| o.spec)
            .and_then(|s| s.taints)
            .is_some_and(|t| {
                t.iter()
                    .any(|t| t.key == "example.com/reboot-pending" && t.effect == "PreferNoSchedule")
            })
    };
    fleet.start_all();
    fleet.require_reboot("n0");
    fleet.require_reboot("n1");
    wait_for(
        LIMIT,
        "one node drains with the pre-reboot label while the other waits tainted",
        || {
            let (a, b) = ("n0", "n1");
            (label(a, "example.com/reboot").is_some() && tainted(b))
                || (label(b, "example.com/reboot").is_some() && tainted(a))
        },
    )
    .await;
    wait_for(LIMIT, "both nodes complete", || {
        names(2).iter().all(|n| completed(&sim, n))
    })
    .await;
    for n in names(2) {
        assert_eq!(
            label(&n, "example.com/patched").as_deref(),
            Some("true"),
            "{n}: post-reboot label"
        );
        assert_eq!(
            label(&n, "example.com/reboot"),
            None,
            "{n}: pre-reboot label removed"
        );
        assert!(!tainted(&n), "{n}: taint removed");
    }
}

/// Serves `gate_closed 1` or `0` for Prometheus to scrape.
fn gate_server(closed: Arc<AtomicBool>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 2048];
            let _ = std::io::Read::read(&mut s, &mut buf);
            let body = format!("gate_closed {}\n", u8::from(closed.load(Ordering::SeqCst)));
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firing_alert_in_real_prometheus_blocks_until_it_stops_and_a_filtered_one_never_does() {
    let closed = Arc::new(AtomicBool::new(true));
    let gate_port = gate_server(closed.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("rules.yaml"),
        "groups:\n  - name: test\n    rules:\n      - alert: MaintenanceFreeze\n        expr: gate_closed == 1\n      - alert: Watchdog\n        expr: vector(1)\n",
    )
    .expect("rules");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: gate\n    static_configs:\n      - targets: ['127.0.0.1:{gate_port}']\n",
            dir.path().join("rules.yaml").display()
        ),
    )
    .expect("config");
    let (_prom, prom_port) = common::start_prometheus(&dir.path().join("prometheus.yml"), dir.path());
    let url = format!("http://127.0.0.1:{prom_port}");
    // Wait until Prometheus fires the gate alert, so the agent meets it.
    let http = reqwest::Client::new();
    wait_async(LIMIT, "MaintenanceFreeze fires in Prometheus", || {
        let http = http.clone();
        let url = url.clone();
        async move {
            kreboot::blockers::query_alerts(&http, &url).await.is_ok_and(|a| {
                a.iter().any(|a| {
                    a.labels.get("alertname").map(String::as_str) == Some("MaintenanceFreeze")
                        && a.state == "firing"
                })
            })
        }
    })
    .await;

    let (sim, fleet) = cluster(1, |c| {
        c.blockers.prometheus = Some(AlertBlocker {
            url: url.clone(),
            filter: Some(regex::Regex::new("^Watchdog$").expect("regex")),
            match_only: false,
            firing_only: true,
            alertmanager: None,
        });
    })
    .await;
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "blocked by the firing alert (and only by it)", || {
        annotation(&sim, "n0", ANN_BLOCKED_BY).as_deref() == Some("alerts: MaintenanceFreeze")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !unschedulable(&sim, "n0") && lock_free(&sim),
        "nothing happens while the alert fires"
    );

    closed.store(false, Ordering::SeqCst);
    wait_for(
        LIMIT,
        "n0 reboots once the alert stops (Watchdog still firing, filtered)",
        || completed(&sim, "n0"),
    )
    .await;
}

/// Prometheus (scraping the gate, two alerts: `Loud` while the gate is closed, `Quiet` always)
/// sending its alerts to a real Alertmanager, in which `Quiet` is silenced through the API.
/// The silenced alert must not hold the reboot back; the unsilenced one must, until it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_silenced_in_real_alertmanager_does_not_block_an_unsilenced_one_does() {
    let test = "an_alert_silenced_in_real_alertmanager_does_not_block_an_unsilenced_one_does";
    for tool in ["prometheus", "prometheus-alertmanager"] {
        if !found(tool) {
            cannot_run(
                test,
                &format!("{tool} is not installed (Debian's {tool} package)"),
            );
            return;
        }
    }
    let closed = Arc::new(AtomicBool::new(true));
    let gate_port = gate_server(closed.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let (_am, am_port) = common::start_alertmanager(dir.path());
    let am_url = format!("http://127.0.0.1:{am_port}");
    std::fs::write(
        dir.path().join("rules.yaml"),
        "groups:\n  - name: test\n    rules:\n      - alert: Loud\n        expr: gate_closed == 1\n      - alert: Quiet\n        expr: vector(1)\n",
    )
    .expect("rules");
    // An external label, as production Prometheus servers have: Alertmanager's copy of each
    // alert carries it, Prometheus's own list does not, and they must still be matched.
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n  external_labels:\n    cluster: test\nalerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: gate\n    static_configs:\n      - targets: ['127.0.0.1:{gate_port}']\n",
            dir.path().join("rules.yaml").display()
        ),
    )
    .expect("config");
    let (_prom, prom_port) = common::start_prometheus_with(
        &dir.path().join("prometheus.yml"),
        dir.path(),
        &["--rules.alert.resend-delay=1s"],
    );
    let url = format!("http://127.0.0.1:{prom_port}");
    let http = reqwest::Client::new();

    // The silence, through Alertmanager's own API, for `Quiet` only.
    let now = chrono::Utc::now();
    let silence = serde_json::json!({
        "matchers": [{ "name": "alertname", "value": "Quiet", "isRegex": false, "isEqual": true }],
        "startsAt": now.to_rfc3339(),
        "endsAt": (now + chrono::Duration::hours(1)).to_rfc3339(),
        "createdBy": "kreboot test",
        "comment": "known and harmless",
    });
    wait_async(LIMIT, "Alertmanager accepts the silence", || {
        let (http, am_url, silence) = (http.clone(), am_url.clone(), silence.clone());
        async move {
            http.post(format!("{am_url}/api/v2/silences"))
                .json(&silence)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;
    // Both alerts reach Alertmanager: Quiet suppressed by the silence, Loud active.
    wait_async(LIMIT, "Alertmanager holds Quiet silenced and Loud active", || {
        let (http, am_url) = (http.clone(), am_url.clone());
        async move {
            let Ok(alerts) = kreboot::blockers::query_alertmanager(&http, &am_url).await else {
                return false;
            };
            let state = |name: &str| {
                alerts
                    .iter()
                    .find(|a| a.labels.get("alertname").map(String::as_str) == Some(name))
                    .map(|a| (a.status.state.clone(), a.status.silenced_by.len()))
            };
            state("Quiet") == Some(("suppressed".into(), 1)) && state("Loud") == Some(("active".into(), 0))
        }
    })
    .await;

    let blocker = |alertmanager: Option<String>| AlertBlocker {
        url: url.clone(),
        filter: None,
        match_only: false,
        firing_only: true,
        alertmanager,
    };
    // Without --alertmanager-url: today's behaviour, both block.
    assert_eq!(
        kreboot::blockers::alert_reason(&blocker(None)).await.as_deref(),
        Some("alerts: Loud, Quiet")
    );
    // With it: the silenced one does not.
    assert_eq!(
        kreboot::blockers::alert_reason(&blocker(Some(am_url.clone())))
            .await
            .as_deref(),
        Some("alerts: Loud")
    );
    // An Alertmanager that cannot be asked blocks, and says so.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let reason = kreboot::blockers::alert_reason(&blocker(Some(dead))).await;
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.starts_with("cannot query Alertmanager for silences: ")),
        "{reason:?}"
    );

    // The agent: held back by Loud only, and reboots once Loud stops while Quiet still fires.
    let (sim, fleet) = cluster(1, |c| {
        c.blockers.prometheus = Some(blocker(Some(am_url.clone())));
        c.blockers.interval = Duration::from_secs(1);
    })
    .await;
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "blocked by the unsilenced alert only", || {
        annotation(&sim, "n0", ANN_BLOCKED_BY).as_deref() == Some("alerts: Loud")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !unschedulable(&sim, "n0") && lock_free(&sim),
        "nothing happens while the unsilenced alert fires"
    );
    closed.store(false, Ordering::SeqCst);
    wait_for(LIMIT, "n0 reboots with only the silenced alert firing", || {
        completed(&sim, "n0")
    })
    .await;
    assert_eq!(
        kreboot::blockers::alert_reason(&blocker(None)).await.as_deref(),
        Some("alerts: Quiet"),
        "Quiet was still firing in Prometheus when n0 rebooted"
    );

    // The same on the real control plane (kube-apiserver, etcd, KWOK), with the kreboot binary
    // and its flags: Loud fires again, is held back, stops; Quiet, silenced, fires throughout.
    closed.store(true, Ordering::SeqCst);
    wait_async(LIMIT, "Loud fires again and reaches Alertmanager", || {
        let (http, am_url) = (http.clone(), am_url.clone());
        async move {
            kreboot::blockers::query_alertmanager(&http, &am_url)
                .await
                .is_ok_and(|alerts| {
                    alerts.iter().any(|a| {
                        a.labels.get("alertname").map(String::as_str) == Some("Loud")
                            && a.status.state == "active"
                    })
                })
        }
    })
    .await;
    let b = backend::Backend::start(backend::Kind::Real).await;
    b.add_node("n0", &[]).await;
    b.add_pod("apps", "n0-app-0", "n0", &[("app", "web")]).await;
    b.wait_pods_ready("apps").await;
    let mut m = backend::Machine::new(
        "n0",
        &b.kubeconfig(),
        &[
            "--prometheus-url",
            &url,
            "--alertmanager-url",
            &am_url,
            "--alert-firing-only",
            "--blocker-check-interval",
            "1s",
        ],
    );
    m.require_reboot();
    m.start();
    wait_async(LIMIT, "real: blocked by the unsilenced alert only", || async {
        b.annotation("n0", ANN_BLOCKED_BY).await.as_deref() == Some("alerts: Loud")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !b.unschedulable("n0").await && b.holders().await.is_empty() && m.reboots == 0,
        "real: nothing happens while the unsilenced alert fires"
    );
    closed.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + LIMIT;
    while !(b.annotation("n0", ANN_LAST_REBOOT).await.is_some()
        && b.annotation("n0", ANN_PHASE).await.is_none())
    {
        m.supervise(&b).await;
        assert!(
            std::time::Instant::now() < deadline,
            "real: n0 reboots with only the silenced alert firing\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(m.reboots, 1, "real: rebooted once");
    assert_eq!(
        kreboot::blockers::alert_reason(&blocker(None)).await.as_deref(),
        Some("alerts: Quiet"),
        "real: Quiet was still firing in Prometheus when n0 rebooted"
    );
}

/// `healthGate.query: gate_closed == 1` against a real Prometheus scraping the gate: the
/// rebooted node stays in phase `verifying`, holding its slot, with the query's series as the
/// reason on the Node (what `kreboot status` shows under BLOCKED BY), until the series is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_query_in_real_prometheus_holds_the_slot_until_it_returns_no_series() {
    let test = "a_gate_query_in_real_prometheus_holds_the_slot_until_it_returns_no_series";
    if !found("prometheus") {
        cannot_run(test, "prometheus is not installed (Debian's prometheus package)");
        return;
    }
    let closed = Arc::new(AtomicBool::new(true));
    let gate_port = gate_server(closed.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gate\n    static_configs:\n      - targets: ['127.0.0.1:{gate_port}']\n"
        ),
    )
    .expect("config");
    let (_prom, prom_port) = common::start_prometheus(&dir.path().join("prometheus.yml"), dir.path());
    let url = format!("http://127.0.0.1:{prom_port}");
    let http = reqwest::Client::new();
    let query = "gate_closed == 1";
    wait_async(LIMIT, "Prometheus has the gate's series", || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            kreboot::blockers::query_series(&http, &url, query)
                .await
                .is_ok_and(|s| s.len() == 1)
        }
    })
    .await;
    // A query Prometheus refuses is an error (the gate would stay closed), not "no series".
    let bad = kreboot::blockers::query_series(&http, &url, "gate_closed ==").await;
    assert!(bad.is_err(), "{bad:?}");

    let (sim, fleet) = cluster(1, |c| {
        c.blockers.prometheus = Some(AlertBlocker {
            url: url.clone(),
            filter: None,
            match_only: false,
            firing_only: true,
            alertmanager: None,
        });
        c.blockers.interval = Duration::from_secs(1);
    })
    .await;
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([(
            "config.yaml".to_string(),
            format!(
                "rules:\n  - name: all\n    nodeSelector: {{}}\n    healthGate: {{timeout: 5m, query: '{query}'}}\n"
            ),
        )]),
    );
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "n0 rebooted and held in its gate by the query", || {
        annotation(&sim, "n0", ANN_PHASE).as_deref() == Some("verifying")
            && annotation(&sim, "n0", ANN_BLOCKED_BY)
                .is_some_and(|r| r.starts_with("health_gate: query returned 1 series: gate_closed{"))
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            annotation(&sim, "n0", ANN_PHASE).as_deref(),
            Some("verifying"),
            "the gate holds while the series is there"
        );
        assert_eq!(
            lease_holder(&sim, "kreboot-lock").as_deref(),
            Some("n0"),
            "slot kept"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        annotation(&sim, "n0", ANN_LAST_REBOOT).is_some(),
        "the reboot happened"
    );
    closed.store(false, Ordering::SeqCst);
    wait_for(
        LIMIT,
        "n0 leaves its gate once the query returns no series",
        || completed(&sim, "n0"),
    )
    .await;
    assert_eq!(annotation(&sim, "n0", ANN_BLOCKED_BY), None, "reason cleared");
    assert!(
        !event_reasons(&sim, "n0").iter().any(|r| r == "HealthGateFailed"),
        "passed within the timeout"
    );
}

/// An agent without `--prometheus-url` refuses a policy with a gate query (it could never be
/// answered): `ConfigInvalid` Event naming the key, `kreboot_config_valid 0`, and no reboot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_query_without_prometheus_is_refused_at_policy_load() {
    let (sim, fleet) = cluster(1, |_| {}).await;
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([(
            "config.yaml".to_string(),
            "rules:\n  - name: all\n    nodeSelector: {}\n    healthGate: {query: 'up == 0'}\n".to_string(),
        )]),
    );
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(LIMIT, "a ConfigInvalid event naming the gate query", || {
        sim.events().iter().any(|e| {
            e.get("reason").and_then(|r| r.as_str()) == Some("ConfigInvalid")
                && e.get("note")
                    .or_else(|| e.get("message"))
                    .and_then(|m| m.as_str())
                    .is_some_and(|m| {
                        m.contains(
                            "rules[0].healthGate.query: a gate query needs the agent's --prometheus-url",
                        )
                    })
        })
    })
    .await;
    let metrics = fleet.metrics("n0").expect("agent metrics");
    assert!(
        metrics.render().contains("kreboot_config_valid{node=\"n0\"} 0"),
        "{}",
        metrics.render()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !unschedulable(&sim, "n0") && lock_free(&sim),
        "no reboot under a refused policy"
    );
}

async fn wait_async<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
