//! `kreboot status`, the real binary against the simulated cluster: nodes in every state
//! (written straight into the simulator's store, as agents would have left them), the lock
//! Lease, a policy ConfigMap, read with a kubeconfig as an operator would.
//!
//! The table is compared with `tests/golden/status.txt`; `KREBOOT_UPDATE_GOLDEN=1` rewrites it
//! (review the diff by eye: it is what operators read).

use std::{collections::BTreeMap, path::Path};

use kreboot::{
    lock::LOCK_LABEL,
    node::{
        ANN_CORDONED_BY_KREBOOT, ANN_LAST_FAILURE, ANN_LAST_FAILURE_REASON, ANN_LAST_REBOOT, ANN_LOCK,
        ANN_PHASE, ANN_REBOOT_REASON, ANN_REBOOT_REQUIRED_SINCE, ANN_WAITING_SINCE, LABEL_HOLDER,
        LABEL_WAITING,
    },
};
use kreboot_testkit::sim::{SimCluster, SimConfig, store::Kind};
use serde_json::{Value, json};

const NS: &str = "kreboot";
const NOW: &str = "2026-11-25T10:00:00Z";
const ANN_BLOCKED_BY: &str = "kreboot.io/blocked-by";

/// Weekend nights in Berlin for most nodes; the database pool on Wednesday late mornings.
/// 2026-11-25 is a Wednesday: 10:00Z is 11:00 in Berlin.
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

/// Merges `annotations`, `labels` and `spec` into a node of the simulator's store.
fn record(sim: &SimCluster, node: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)], spec: Value) {
    sim.store()
        .update(Kind::Node, "", node, |old| {
            let mut n = old.clone();
            for (k, v) in annotations {
                n["metadata"]["annotations"][*k] = json!(v);
            }
            for (k, v) in labels {
                n["metadata"]["labels"][*k] = json!(v);
            }
            if let Some(spec) = spec.as_object() {
                for (k, v) in spec {
                    n["spec"][k] = v.clone();
                }
            }
            Ok(n)
        })
        .expect("node exists");
}

fn not_ready(sim: &SimCluster, node: &str) {
    sim.store()
        .update(Kind::Node, "", node, |old| {
            let mut n = old.clone();
            n["status"]["conditions"] =
                json!([{ "type": "Ready", "status": "False", "reason": "KubeletNotReady" }]);
            Ok(n)
        })
        .expect("node exists");
}

fn lease(sim: &SimCluster, name: &str, labels: Value, holder: Option<&str>, renewed: &str, seconds: i32) {
    sim.store()
        .create(
            Kind::Lease,
            NS,
            json!({
                "metadata": { "name": name, "labels": labels },
                "spec": {
                    "holderIdentity": holder,
                    "acquireTime": renewed,
                    "renewTime": renewed,
                    "leaseDurationSeconds": seconds,
                },
            }),
        )
        .expect("lease created");
}

/// A cluster with a node in each state kreboot can leave one in.
async fn cluster(policy: Option<&str>) -> SimCluster {
    let sim = SimCluster::start(SimConfig::default())
        .await
        .expect("simulator starts");
    sim.store()
        .create(Kind::Namespace, "", json!({ "metadata": { "name": NS } }))
        .expect("namespace");
    let hostname = |n: &str| BTreeMap::from([("kubernetes.io/hostname".to_owned(), n.to_owned())]);
    for name in [
        "worker-1", "worker-2", "worker-3", "worker-4", "worker-5", "worker-6", "db-1",
    ] {
        sim.add_node(name, hostname(name));
    }
    // worker-1: idle, nothing recorded.
    // worker-2: needs a reboot, held back by the window.
    record(
        &sim,
        "worker-2",
        &[
            (ANN_REBOOT_REQUIRED_SINCE, "2026-11-25T07:47:00Z"),
            (ANN_REBOOT_REASON, "linux-image-6.8.0-49-generic libc6"),
            (ANN_BLOCKED_BY, "window_closed"),
        ],
        &[],
        json!({}),
    );
    // worker-3: queued for the lock.
    record(
        &sim,
        "worker-3",
        &[
            (ANN_REBOOT_REQUIRED_SINCE, "2026-11-25T09:10:00Z"),
            (ANN_REBOOT_REASON, "openssl"),
            (ANN_WAITING_SINCE, "2026-11-25T09:12:30.000001Z"),
            (ANN_BLOCKED_BY, "lock_held_elsewhere"),
        ],
        &[(LABEL_WAITING, "true")],
        json!({}),
    );
    // worker-4: draining, cordoned by kreboot, holding the lock.
    record(
        &sim,
        "worker-4",
        &[
            (ANN_REBOOT_REQUIRED_SINCE, "2026-11-24T23:05:00Z"),
            (ANN_REBOOT_REASON, "linux-image-6.8.0-49-generic"),
            (ANN_PHASE, "draining"),
            (ANN_CORDONED_BY_KREBOOT, "true"),
            (ANN_LOCK, "kreboot-lock"),
        ],
        &[(LABEL_HOLDER, "true")],
        json!({ "unschedulable": true }),
    );
    // worker-5: cordoned by an administrator (and NotReady): kreboot leaves it alone.
    sim.set_unschedulable("worker-5", true);
    not_ready(&sim, "worker-5");
    // worker-6: rebooted by kreboot this morning.
    record(
        &sim,
        "worker-6",
        &[(ANN_LAST_REBOOT, "2026-11-25T08:31:00Z")],
        &[],
        json!({}),
    );
    // db-1: its last cycle failed; it needs the reboot still and pods block it.
    record(
        &sim,
        "db-1",
        &[
            (ANN_REBOOT_REQUIRED_SINCE, "2026-11-23T04:00:00Z"),
            (ANN_REBOOT_REASON, "linux-image-6.8.0-49-generic"),
            (ANN_LAST_FAILURE, "2026-11-25T09:40:00Z"),
            (
                ANN_LAST_FAILURE_REASON,
                "drain timed out after 30m: pod apps/db-0 refused by its PodDisruptionBudget",
            ),
            (ANN_LAST_REBOOT, "2026-10-28T10:15:00Z"),
            (ANN_BLOCKED_BY, "blocking_pods: apps/db-0"),
        ],
        &[("pool", "db")],
        json!({}),
    );
    lease(
        &sim,
        "kreboot-lock",
        json!({ LOCK_LABEL: "kreboot-lock" }),
        Some("worker-4"),
        "2026-11-25T09:55:00.000000Z",
        1800,
    );
    // Not a slot of the lock: never shown.
    lease(
        &sim,
        "something-else",
        json!({}),
        Some("worker-1"),
        "2026-11-25T09:59:00.000000Z",
        15,
    );
    if let Some(doc) = policy {
        sim.configmap_put(
            NS,
            "kreboot-config",
            BTreeMap::from([("config.yaml".to_owned(), doc.to_owned())]),
        );
    }
    sim
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `kreboot status` with `args` and KUBECONFIG = `kubeconfig`.
async fn status(kubeconfig: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kreboot"));
    cmd.arg("status")
        .args(["--now", NOW])
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("POD_NAMESPACE")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("kreboot status finishes")
        .expect("kreboot status runs");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn kubeconfig(sim: &SimCluster) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&path).expect("kubeconfig written");
    (dir, path)
}

/// Compares `actual` with the golden file `name`, or rewrites it with KREBOOT_UPDATE_GOLDEN=1.
fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("KREBOOT_UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        // Rewriting cannot fail, so it must never be what CI does.
        assert!(
            std::env::var_os("CI").is_none(),
            "KREBOOT_UPDATE_GOLDEN=1 under CI: the golden comparison would prove nothing"
        );
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("golden dir");
        std::fs::write(&path, actual).expect("golden written");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (KREBOOT_UPDATE_GOLDEN=1 creates it)", path.display()));
    assert!(
        expected == actual,
        "{} differs (KREBOOT_UPDATE_GOLDEN=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_table_matches_golden_file() {
    let sim = cluster(Some(POLICY)).await;
    let (_dir, kc) = kubeconfig(&sim).await;
    let run = status(&kc, &["--namespace", NS], &[]).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    golden("status.txt", &run.stdout);
    // The namespace defaults to $POD_NAMESPACE (as inside the agent's pod).
    let from_env = status(&kc, &[], &[("POD_NAMESPACE", NS)]).await;
    assert_eq!(from_env.stdout, run.stdout, "stderr: {}", from_env.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_yaml() {
    let sim = cluster(Some(POLICY)).await;
    let (_dir, kc) = kubeconfig(&sim).await;
    let run = status(&kc, &["--namespace", NS, "-o", "json"], &[]).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).expect("valid JSON");
    assert_eq!(v["now"], NOW);
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 7);
    let node = |name: &str| {
        nodes
            .iter()
            .find(|n| n["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed"))
    };
    let w2 = node("worker-2");
    assert_eq!(w2["state"], "pending");
    assert_eq!(w2["needsReboot"], true);
    assert_eq!(w2["since"], "2026-11-25T07:47:00Z");
    assert_eq!(w2["reason"], "linux-image-6.8.0-49-generic libc6");
    assert_eq!(w2["blockedBy"], "window_closed");
    assert_eq!(w2["windowOpen"], false);
    assert_eq!(
        w2["nextWindow"], "2026-11-28T01:00:00Z",
        "Saturday 02:00 in Berlin"
    );
    assert_eq!(node("worker-1")["state"], "idle");
    assert_eq!(node("worker-1")["needsReboot"], false);
    assert_eq!(node("worker-3")["state"], "waiting");
    let w4 = node("worker-4");
    assert_eq!(w4["state"], "draining");
    assert_eq!(w4["cordoned"], true);
    assert_eq!(w4["cordonedByKreboot"], true);
    assert_eq!(w4["lock"], "kreboot-lock");
    let w5 = node("worker-5");
    assert_eq!(
        (&w5["cordoned"], &w5["cordonedByKreboot"], &w5["ready"]),
        (&json!(true), &json!(false), &json!(false))
    );
    assert_eq!(node("worker-6")["lastReboot"], "2026-11-25T08:31:00Z");
    let db = node("db-1");
    assert_eq!(db["rule"], "db");
    assert_eq!(db["windowOpen"], true);
    assert_eq!(db["lastFailure"], "2026-11-25T09:40:00Z");
    assert!(
        db["lastFailureReason"]
            .as_str()
            .is_some_and(|r| r.contains("PodDisruptionBudget"))
    );
    assert_eq!(
        v["locks"],
        json!([{
            "name": "kreboot-lock", "holder": "worker-4", "state": "held",
            "renewed": "2026-11-25T09:55:00Z", "expires": "2026-11-25T10:26:00Z",
            "expired": false, "holderGone": false,
        }])
    );
    assert_eq!(
        v["queue"],
        json!([{ "position": 1, "node": "worker-3", "since": "2026-11-25T09:12:30Z" }])
    );
    assert_eq!(v["policy"]["source"], "kreboot/kreboot-config");
    assert_eq!(v["policy"]["valid"], true);
    assert_eq!(v["policy"]["timeZone"], "Europe/Berlin");
    assert_eq!(v["policy"]["openNow"], false);
    assert_eq!(v["summary"]["needsReboot"], 4);
    assert_eq!(v["summary"]["cordoned"], 2);

    let run = status(&kc, &["--namespace", NS, "--output", "yaml"], &[]).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    let y: Value = serde_saphyr::from_str(&run.stdout).expect("valid YAML");
    assert_eq!(y, v, "YAML carries the same document as JSON");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_with_an_invalid_policy() {
    let sim = cluster(Some(
        "windows:\n  - days: [Sat]\n    start: \"25:00\"\n    end: \"05:00\"\n",
    ))
    .await;
    let (_dir, kc) = kubeconfig(&sim).await;
    let run = status(&kc, &["--namespace", NS], &[]).await;
    assert_eq!(
        run.code,
        Some(0),
        "an invalid policy is reported, not an error: {}",
        run.stderr
    );
    assert!(
        run.stdout.contains(
            "POLICY: ConfigMap kreboot/kreboot-config is INVALID: invalid policy at windows[0].start"
        ),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("agents keep the last good policy"),
        "{}",
        run.stdout
    );
    let json = status(&kc, &["--namespace", NS, "-o", "json"], &[]).await;
    let v: Value = serde_json::from_str(&json.stdout).expect("valid JSON");
    assert_eq!(v["policy"]["valid"], false);
    assert!(
        v["policy"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("windows[0].start"))
    );
    assert!(
        v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["windowOpen"].is_null())
    );

    // A ConfigMap without the config.yaml key is unusable too.
    sim.configmap_put(
        NS,
        "kreboot-config",
        BTreeMap::from([("other".to_owned(), "x".to_owned())]),
    );
    let run = status(&kc, &["--namespace", NS], &[]).await;
    assert!(
        run.stdout.contains(
            "is INVALID: ConfigMap kreboot/kreboot-config has no key \"config.yaml\" (keys found: \"other\")"
        ),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_a_config_map() {
    let sim = cluster(None).await;
    let (_dir, kc) = kubeconfig(&sim).await;
    let run = status(&kc, &["--namespace", NS], &[]).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(
        run.stdout.contains(
            "POLICY: none (ConfigMap kreboot/kreboot-config not found): reboots allowed at any time"
        ),
        "{}",
        run.stdout
    );
    let line = run
        .stdout
        .lines()
        .find(|l| l.starts_with("worker-2 "))
        .expect("worker-2 row");
    assert!(line.ends_with("   open"), "{line}");
    // Another namespace: no lock, no policy, the same nodes.
    let run = status(&kc, &["--namespace", "elsewhere"], &[]).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert!(run.stdout.contains("\nLOCK: no lock Lease yet"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_api_errors_exit_1_with_a_message() {
    // Nothing listens on the port of a server that was started and shut down.
    let sim = SimCluster::start(SimConfig::default())
        .await
        .expect("simulator starts");
    let (_dir, kc) = kubeconfig(&sim).await;
    sim.shutdown().await;
    let run = status(&kc, &[], &[]).await;
    assert_eq!(
        run.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stderr.starts_with("error: cannot list Nodes"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(run.stdout.is_empty(), "{}", run.stdout);

    let missing = Path::new("/nonexistent/kubeconfig");
    let run = status(missing, &[], &[]).await;
    assert_eq!(run.code, Some(1), "stderr: {}", run.stderr);
    assert!(
        run.stderr.starts_with("error: no Kubernetes configuration"),
        "{}",
        run.stderr
    );
}

/// A plain `http://` server needs no trust store: in a root without one (the image has only
/// its CA bundle; a distroless root may have none), kreboot must still connect. The empty
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` are such a root: before the fix, every command failed with
/// "No CA certificates were loaded from the system".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_no_ca_store() {
    let sim = cluster(Some(POLICY)).await;
    let (dir, kc) = kubeconfig(&sim).await;
    let text = std::fs::read_to_string(&kc).expect("kubeconfig");
    assert!(
        text.contains("http://"),
        "the simulator serves plain http: {text}"
    );
    let empty = dir.path().join("no-certs");
    std::fs::create_dir_all(&empty).expect("empty dir");
    let no_store = [
        (
            "SSL_CERT_FILE",
            empty.join("none.pem").to_str().unwrap().to_owned(),
        ),
        ("SSL_CERT_DIR", empty.to_str().unwrap().to_owned()),
    ];
    let env: Vec<(&str, &str)> = no_store.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = status(&kc, &[], &env).await;
    assert_eq!(
        run.code,
        Some(0),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("NODE"), "{}", run.stdout);
}

#[test]
fn status_readme_example_is_the_golden_table() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let golden = std::fs::read_to_string(root.join("tests/golden/status.txt")).expect("golden file");
    assert!(
        readme.contains(&format!("$ kreboot status\n{golden}```")),
        "the README's `kreboot status` example differs from tests/golden/status.txt: copy it over"
    );
}
