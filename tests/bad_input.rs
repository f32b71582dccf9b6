//! Issue 17, parts 3 and 4: bad input the way operators get it wrong, against the real control
//! plane (kube-apiserver, etcd, kube-controller-manager, KWOK) with the real `kreboot agent`
//! binary. Each test checks the safe reading (no reboot), that the operator is told (Event,
//! metric, `/readyz`), that the process stays up, and then repairs the input and sees the
//! agent go on, which proves that the check for "no reboot" could have seen one.

mod common;

use std::{
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    backend::{Backend, Kind, Machine, NS},
    wait_until,
};
use kreboot::node::{ANN_CORDONED_BY_KREBOOT, ANN_DRAINED, ANN_LAST_REBOOT, ANN_PHASE};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(90);

/// Events with `reason` in `ns`, their notes.
async fn notes(b: &Backend, ns: &str, reason: &str) -> Vec<String> {
    b.events(ns)
        .await
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// HTTP status of `path` on the agent's metrics port (None: no answer).
async fn http_status(port: u16, path: &str) -> Option<u16> {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .await
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|c| *c != 0)
}

fn alive(m: &mut Machine) -> bool {
    m.child
        .as_mut()
        .is_some_and(|c| c.try_wait().ok().flatten().is_none())
}

/// For `hold`, the agent must stay up and run no reboot command.
async fn holds_without_reboot(m: &mut Machine, hold: Duration, why: &str) {
    let end = Instant::now() + hold;
    while Instant::now() < end {
        assert!(alive(m), "the agent exited ({why}); log:\n{}", m.log());
        assert_eq!(m.reboot_commands(), 0, "rebooted although {why}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn require_curl() -> bool {
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        common::cannot_run("bad_input", "curl is not installed");
        return false;
    }
    true
}

/// Hand-edited garbage in the Node's kreboot annotations: a `cordoned-by-kreboot` that is
/// neither true nor false, a drain record that is not JSON, and a `last-reboot` far in the
/// future. The agent does not crash, does not reboot (the future reboot holds the reboot-loop
/// back-off, as written), and says so in a `BadAnnotation` Event naming each annotation. With
/// the future time removed, it reboots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_the_node_annotations_is_reported_and_holds_the_reboot() {
    if !require_curl() {
        return;
    }
    let b = Backend::start(Kind::Real).await;
    b.add_node("n0", &[]).await;
    b.patch_node(
        "n0",
        json!({"metadata": {"annotations": {
            ANN_CORDONED_BY_KREBOOT: "yes please",
            ANN_DRAINED: "{not json",
            ANN_LAST_REBOOT: "9999-12-31T23:59:59Z",
        }}}),
    )
    .await;
    let mut m = Machine::new("n0", &b.kubeconfig(), &[]);
    m.require_reboot();
    m.start();
    wait_until(LIMIT, "a BadAnnotation Event", || async {
        !notes(&b, "default", "BadAnnotation").await.is_empty()
    })
    .await;
    let note = notes(&b, "default", "BadAnnotation").await.join("\n");
    for key in [ANN_CORDONED_BY_KREBOOT, ANN_DRAINED, ANN_LAST_REBOOT] {
        assert!(note.contains(key), "{key} not named in: {note}");
    }
    assert!(note.contains("is in the future"), "{note}");
    holds_without_reboot(&mut m, Duration::from_secs(5), "last-reboot is in the future").await;
    assert_eq!(b.annotation("n0", ANN_PHASE).await, None, "a cycle started");
    assert_eq!(
        notes(&b, "default", "BadAnnotation").await.len(),
        1,
        "one Event for one set of problems, not one per loop"
    );

    // The operator removes the future time: the node goes through its cycle.
    b.patch_node(
        "n0",
        json!({"metadata": {"annotations": {ANN_LAST_REBOOT: null}}}),
    )
    .await;
    wait_until(
        LIMIT,
        "the reboot command once the annotation is fixed",
        || async { m.reboot_commands() > 0 },
    )
    .await;
}

/// The policy under the wrong key of the ConfigMap (`config.yml`, `policy.yaml`): the agent
/// rejects it like an invalid policy (no policy in force yet: no reboots), with a
/// `ConfigInvalid` Event naming the expected key and the keys found and
/// `kreboot_config_valid 0`. Renamed to `config.yaml`, the reboot goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_under_the_wrong_key_is_named_and_nothing_reboots() {
    if !require_curl() {
        return;
    }
    let b = Backend::start(Kind::Real).await;
    b.add_node("n0", &[]).await;
    b.put_configmap(
        NS,
        "kreboot-config",
        &[("config.yml", "timezone: UTC\n"), ("policy.yaml", "x")],
    )
    .await;
    let mut m = Machine::new("n0", &b.kubeconfig(), &[]);
    m.require_reboot();
    m.start();
    let all_notes = || async {
        let mut n = notes(&b, NS, "ConfigInvalid").await;
        n.extend(notes(&b, "default", "ConfigInvalid").await);
        n
    };
    wait_until(LIMIT, "a ConfigInvalid Event", || async {
        !all_notes().await.is_empty()
    })
    .await;
    let note = all_notes().await.join("\n");
    assert!(
        note.contains(
            "ConfigMap kube-system/kreboot-config has no key \"config.yaml\" (keys found: \"config.yml\", \"policy.yaml\")"
        ),
        "{note}"
    );
    let port = m.metrics_port;
    wait_until(LIMIT, "kreboot_config_valid 0", || async {
        common::scrape_metrics(port)
            .await
            .is_some_and(|t| common::sample(&t, "kreboot_config_valid{node=\"n0\"}") == Some(0.0))
    })
    .await;
    holds_without_reboot(&mut m, Duration::from_secs(5), "the policy is unusable").await;

    b.put_configmap(NS, "kreboot-config", &[("config.yaml", "timezone: UTC\n")])
        .await;
    wait_until(LIMIT, "the reboot command once the key is right", || async {
        m.reboot_commands() > 0
    })
    .await;
}

/// Forwards every connection accepted on `listener` to `target` (a TCP proxy, so the TLS
/// session is the API server's own).
async fn forward(listener: tokio::net::TcpListener, target: String) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// The API server unreachable when the agent starts (its address in the kubeconfig is a port
/// nobody listens on yet): the process stays up and retries with back-off, `/healthz` answers
/// 200 (a liveness probe does not restart it in a loop) and `/readyz` 503 for as long; once the
/// port leads to the API server, `/readyz` turns 200 and the agent works (a reboot goes ahead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_at_start_is_not_ready_but_alive() {
    if !require_curl() {
        return;
    }
    let b = Backend::start(Kind::Real).await;
    b.add_node("n0", &[]).await;
    let Backend::Real(cp) = &b else { unreachable!() };
    let upstream = cp.url.trim_start_matches("https://").to_owned();
    let proxy_port = common::free_port();
    let admin = std::fs::read_to_string(b.kubeconfig()).expect("kubeconfig");
    assert!(admin.contains(&cp.url), "the kubeconfig names {}", cp.url);
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        admin.replace(&cp.url, &format!("https://127.0.0.1:{proxy_port}")),
    )
    .unwrap();

    let mut m = Machine::new("n0", &kubeconfig, &[]);
    m.require_reboot();
    m.start();
    let port = m.metrics_port;
    wait_until(LIMIT, "the metrics endpoint", || async {
        http_status(port, "/healthz").await.is_some()
    })
    .await;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end {
        assert!(
            alive(&mut m),
            "the agent exited without an API server; log:\n{}",
            m.log()
        );
        assert_eq!(http_status(port, "/healthz").await, Some(200), "/healthz");
        assert_eq!(
            http_status(port, "/readyz").await,
            Some(503),
            "/readyz without an API server"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        m.log().contains("API server not reachable"),
        "the log says why it is not ready:\n{}",
        m.log()
    );

    // The API server comes into reach.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", proxy_port))
        .await
        .expect("bind the proxy port");
    let _proxy = AbortOnDrop(tokio::spawn(forward(listener, upstream)));
    // Back-off is at most 30 s between tries.
    wait_until(
        Duration::from_secs(60),
        "/readyz 200 once the API server answers",
        || async { http_status(port, "/readyz").await == Some(200) },
    )
    .await;
    assert!(alive(&mut m));
    wait_until(LIMIT, "the reboot command", || async { m.reboot_commands() > 0 }).await;
    let metrics = common::scrape_metrics(port).await.unwrap_or_default();
    let skew = common::sample(&metrics, "kreboot_clock_skew_seconds{node=\"n0\"}");
    assert!(
        skew.is_some_and(|s| s.abs() < 5.0),
        "the skew against the API server on the same machine: {skew:?}"
    );
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A machine that counts the reboots asked of it (the node does not go down: enough to see
/// whether the agent got that far).
struct CountingRebooter(Arc<AtomicUsize>);

impl kreboot::reboot::Rebooter for CountingRebooter {
    fn reboot(&self) -> futures::future::BoxFuture<'_, Result<(), kreboot::reboot::RebootError>> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
}

fn micro_now() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    let now = chrono::Utc::now();
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(now.timestamp_micros()).unwrap(),
    )
}

/// A clock 10 minutes ahead on one node, against the real kube-apiserver. The agent of n0 runs
/// in-process (the production `agent::run`) with its wall clock skewed by +10 min; n1 holds the
/// lock and renews it every 2 s (10 s duration) with the true time. Judged by `renewTime`
/// against n0's clock, n1's lease looks 10 minutes stale; n0 must still not take it, for
/// three lease durations. The API server's `Date` header shows the skew (+600 s). Once n1
/// stops renewing, n0 takes the slot after one duration of its own watching, and reboots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_ten_minutes_ahead_does_not_take_a_renewed_lease() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::{Api, PostParams};
    let b = Backend::start(Kind::Real).await;
    b.add_node("n0", &[]).await;
    b.add_node("n1", &[]).await;
    let client = b.client();
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "kreboot-lock", "labels": {kreboot::lock::LOCK_LABEL: "kreboot-lock"}},
                "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 10},
            }))
            .unwrap(),
        )
        .await
        .expect("n1's lease");
    // n1 renews with the true time, as a live holder does.
    let renewing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let renewer = {
        let (leases, renewing) = (leases.clone(), renewing.clone());
        AbortOnDrop(tokio::spawn(async move {
            while renewing.load(Ordering::SeqCst) {
                if let Ok(mut l) = leases.get("kreboot-lock").await {
                    let spec = l.spec.get_or_insert_with(Default::default);
                    spec.renew_time = Some(micro_now());
                    spec.acquire_time.get_or_insert_with(micro_now);
                    let _ = leases.replace("kreboot-lock", &PostParams::default(), &l).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }))
    };

    let skewed = kreboot::agent::Clock {
        skew: chrono::Duration::minutes(10),
    };
    let skew = kreboot::connect::probe(&client, skewed)
        .await
        .expect("the API server answers")
        .expect("a Date header");
    assert!(
        (skew - chrono::Duration::minutes(10)).abs() < chrono::Duration::seconds(3),
        "skew from the Date header: {skew}"
    );
    assert!(kreboot::connect::skew_is_large(skew));

    let reboots = Arc::new(AtomicUsize::new(0));
    let agent = kreboot::agent::Agent {
        cfg: kreboot_testkit::sim::fleet::agent_config("n0"),
        client: client.clone(),
        metrics: kreboot::metrics::Metrics::new("n0"),
        events: kreboot::events::Events::start(client.clone(), "n0", None),
        notifier: kreboot::notify::Notifier::disabled(),
        rebooter: Arc::new(CountingRebooter(reboots.clone())),
        clock: skewed,
        kernel_boot_id: Arc::new(|| None),
    };
    let (_sentinel_tx, sentinel_rx) = tokio::sync::watch::channel(kreboot::sentinel::SentinelState {
        required: true,
        packages: vec![],
    });
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _agent = AbortOnDrop({
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = kreboot::agent::run(agent, sentinel_rx, shutdown).await;
        })
    });
    let holder = || async {
        leases
            .get("kreboot-lock")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity)
    };
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        assert_eq!(
            holder().await.as_deref(),
            Some("n1"),
            "n0, 10 min ahead, took a renewed lease"
        );
        assert_eq!(b.annotation("n0", ANN_PHASE).await, None, "n0 started a cycle");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(reboots.load(Ordering::SeqCst), 0);

    // n1 stops renewing (it died): n0 takes the slot after its own 10 s of watching.
    renewing.store(false, Ordering::SeqCst);
    drop(renewer);
    let stopped = Instant::now();
    wait_until(LIMIT, "n0 takes the abandoned slot", || async {
        holder().await.as_deref() == Some("n0")
    })
    .await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_secs(7),
        "taken {took:?} after the last renewal: before it expired"
    );
    wait_until(LIMIT, "n0's reboot", || async {
        reboots.load(Ordering::SeqCst) > 0
    })
    .await;
    shutdown.cancel();
}
