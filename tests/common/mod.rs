//! Shared set-up for the integration tests: a simulated cluster with nodes and pods, a fleet of
//! real agents, the real `kreboot` binary as one node's agent (`sim_host`), and helpers that wait
//! for conditions with a bound.

#![allow(dead_code)]

pub mod artifact;
pub mod backend;
pub mod real;
pub mod real_fleet;
pub mod sim_host;

#[allow(
    unused_imports,
    reason = "each test crate compiles all of `common` and uses a part of it"
)]
pub use sim_host::{
    BLACKOUT_EVERY_DAY, NODE, SimHost, agent_command, agent_process, kreboot_alone, put_policy,
};

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kreboot::{
    cli::AgentConfig,
    node::{ANN_CORDONED_BY_KREBOOT, ANN_LAST_REBOOT, ANN_PHASE},
};
use kreboot_testkit::sim::{self, PodBuilder, SimCluster, SimConfig, fleet::Fleet};
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

/// Node names n0..n{count-1}.
pub fn names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("n{i}")).collect()
}

/// A simulated cluster with `count` nodes, each with two application pods and one DaemonSet
/// pod, and a fleet of agents configured by `tweak` (not started).
pub async fn cluster(count: usize, tweak: impl Fn(&mut AgentConfig)) -> (SimCluster, Fleet) {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let mut configs = Vec::new();
    for name in names(count) {
        sim.add_node(
            &name,
            BTreeMap::from([("kubernetes.io/hostname".to_string(), name.clone())]),
        );
        for i in 0..2 {
            sim.add_pod(
                sim::pod("apps", &format!("{name}-app-{i}"), &name)
                    .labels([("app", "web")])
                    .grace(1)
                    .shutdown_seconds(0.1)
                    .build(),
            );
        }
        sim.add_pod(
            sim::pod("kube-system", &format!("{name}-ds"), &name)
                .daemonset()
                .build(),
        );
        let mut cfg = kreboot_testkit::sim::fleet::agent_config(&name);
        tweak(&mut cfg);
        configs.push(cfg);
    }
    let fleet = Fleet::new(&sim, configs);
    (sim, fleet)
}

/// The pod `apps/slow` on `node`: evicted with `grace` seconds, it takes `shutdown_seconds` to
/// stop, and keeps the node's drain going for that long.
pub fn slow_pod(node: &str, grace: i64, shutdown_seconds: f64) -> k8s_openapi::api::core::v1::Pod {
    sim::pod("apps", "slow", node)
        .grace(grace)
        .shutdown_seconds(shutdown_seconds)
        .build()
}

/// A pod `apps/{name}` on `node` labelled `app=db`: one of the pods [`guard_db_pods`] keeps
/// available.
pub fn db_pod(name: &str, node: &str) -> PodBuilder {
    sim::pod("apps", name, node).labels([("app", "db")])
}

/// The PodDisruptionBudget `apps/db`: one `app=db` pod stays available (minAvailable 1), so the
/// eviction of a lone db pod is refused (429) for as long as it is alone.
pub fn guard_db_pods(sim: &SimCluster) {
    sim.add_pdb(
        "apps",
        "db",
        BTreeMap::from([("app".to_string(), "db".to_string())]),
        Some(1),
        None,
    );
}

/// Polls `cond` every 20 ms until it holds, or panics after `limit` with `what`.
pub async fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `done` every 20 ms until it holds (it may ask the API server), or panics
/// after `limit` with `what`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An annotation of a node.
pub fn annotation(sim: &SimCluster, node: &str, key: &str) -> Option<String> {
    sim.node(node)?.metadata.annotations?.get(key).cloned()
}

/// `spec.unschedulable` of a node.
pub fn unschedulable(sim: &SimCluster, node: &str) -> bool {
    sim.node(node)
        .and_then(|n| n.spec)
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// The bootID of a node.
pub fn boot_id(sim: &SimCluster, node: &str) -> String {
    sim.node(node)
        .and_then(|n| n.status)
        .and_then(|s| s.node_info)
        .map(|i| i.boot_id)
        .unwrap_or_default()
}

/// The node finished a reboot cycle: kreboot recorded the reboot, and the node holds no lock.
pub fn completed(sim: &SimCluster, node: &str) -> bool {
    annotation(sim, node, ANN_LAST_REBOOT).is_some()
        && annotation(sim, node, ANN_PHASE).is_none()
        && !sim
            .leases("kube-system")
            .iter()
            .any(|l| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(node))
}

/// The Ready condition of a node is True.
pub fn node_ready(sim: &SimCluster, node: &str) -> bool {
    sim.node(node)
        .and_then(|n| n.status)
        .and_then(|s| s.conditions)
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Holder of a lease, if any.
pub fn lease_holder(sim: &SimCluster, name: &str) -> Option<String> {
    sim.lease("kube-system", name)?
        .spec?
        .holder_identity
        .filter(|h| !h.is_empty())
}

/// The node is out of service: in a kreboot phase, cordoned by kreboot, or not Ready.
pub fn is_out(n: &Node) -> bool {
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let cordoned_by_us = ann.get(ANN_CORDONED_BY_KREBOOT).map(String::as_str) == Some("true")
        && n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    ann.contains_key(ANN_PHASE) || !ready || cordoned_by_us
}

/// Watches every Node through the API (a real kube-rs watch, as an observer would) and records
/// the largest number of nodes out of service at once (in a kreboot phase, cordoned by
/// kreboot, or not Ready).
pub struct OutMonitor {
    max: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl OutMonitor {
    /// Starts watching.
    pub async fn start(sim: &SimCluster) -> OutMonitor {
        OutMonitor::watch(sim.client().await)
    }

    /// Starts watching the Nodes of any cluster through `client`.
    pub fn watch(client: kube::Client) -> OutMonitor {
        let api: Api<Node> = Api::all(client);
        let max = Arc::new(AtomicUsize::new(0));
        let m = max.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .applied_objects();
            futures::pin_mut!(stream);
            let mut out = BTreeMap::new();
            // A watch error is not the end: the watcher re-lists with back-off and the monitor
            // goes on (it used to stop at the first error and report the maximum seen so far).
            while let Some(item) = stream.next().await {
                let n = match item {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("out-of-service monitor: watch error, the watcher retries: {e}");
                        continue;
                    }
                };
                let name = n.metadata.name.clone().unwrap_or_default();
                out.insert(name, is_out(&n));
                let now = out.values().filter(|o| **o).count();
                m.fetch_max(now, Ordering::SeqCst);
            }
        });
        OutMonitor { max, task }
    }

    /// The largest number of nodes out at once so far.
    ///
    /// # Panics
    /// When the monitor stopped watching (its stream ended): a maximum it no longer sees
    /// proves nothing.
    pub fn max(&self) -> usize {
        assert!(
            !self.task.is_finished(),
            "the out-of-service monitor stopped watching"
        );
        self.max.load(Ordering::SeqCst)
    }
}

impl Drop for OutMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reasons of every Event about `node`.
pub fn event_reasons(sim: &SimCluster, node: &str) -> Vec<String> {
    sim.events()
        .iter()
        .filter(|e| {
            let r = e.get("regarding").or_else(|| e.get("involvedObject"));
            r.and_then(|r| r.get("name")).and_then(|n| n.as_str()) == Some(node)
        })
        .filter_map(|e| e.get("reason").and_then(|r| r.as_str()).map(str::to_owned))
        .collect()
}

/// The agent's `/metrics` on 127.0.0.1:`port`, or None while it does not answer.
pub async fn scrape_metrics(port: u16) -> Option<String> {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// The value of the series `series` (name and labels exactly as rendered) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A test that cannot run here (not root, a tool missing): under CI (`CI` set) that is a
/// failure, because CI installs everything and runs as root, so a skip there would hide a test
/// that proves nothing; elsewhere a skip nobody can miss. The caller returns after it.
pub fn cannot_run(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: {why}"
    );
    let bar = "!".repeat(78);
    eprintln!("\n{bar}\n!! SKIPPED: {test} did not run: {why}\n{bar}\n");
}

/// Whether `program` is on PATH (or in /usr/sbin, /sbin, which a root PATH may lack).
pub fn found(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(program).is_file())
    })
}

/// A kubeconfig in `dir` whose API server is port 1 on loopback: nothing listens there, so
/// every connection is refused at once.
pub fn unreachable_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:1\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user: {}\n",
    )
    .expect("kubeconfig");
    kubeconfig
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

/// A child process killed when the test ends, pass or fail.
pub struct Killed(pub std::process::Child);

impl Killed {
    /// Starts `cmd` (an agent, see [`agent_process`]); panics if it cannot.
    pub fn spawn(cmd: &mut std::process::Command) -> Killed {
        Killed(cmd.spawn().expect("kreboot starts"))
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A real Prometheus (Debian's package) with `config`, its data under `dir`, on a free port of
/// 127.0.0.1; stopped when the returned guard drops. Returns the guard and the port.
pub fn start_prometheus(config: &std::path::Path, dir: &std::path::Path) -> (Killed, u16) {
    start_prometheus_with(config, dir, &[])
}

/// [`start_prometheus`] with more command-line flags, e.g. `--rules.alert.resend-delay=1s`
/// (Prometheus drops the alerts it has before it has found its Alertmanagers and sends them
/// again only after that delay, a minute by default).
pub fn start_prometheus_with(
    config: &std::path::Path,
    dir: &std::path::Path,
    flags: &[&str],
) -> (Killed, u16) {
    let port = free_port();
    let child = std::process::Command::new(which("prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .args(flags)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("prometheus starts");
    (Killed(child), port)
}

/// A real Alertmanager (Debian's `prometheus-alertmanager`) with a minimal configuration (one
/// receiver that notifies nobody), its data under `dir`, on a free port of 127.0.0.1, clustering
/// off (it would bind port 9094); stopped when the returned guard drops. Returns the guard and
/// the port.
pub fn start_alertmanager(dir: &std::path::Path) -> (Killed, u16) {
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: nobody\n  group_wait: 1s\nreceivers:\n  - name: nobody\n",
    )
    .expect("alertmanager config");
    let port = free_port();
    let child = std::process::Command::new(which_in("prometheus-alertmanager", "prometheus-alertmanager"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.path={}",
            dir.join("alertmanager-data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("alertmanager starts");
    (Killed(child), port)
}

/// The path of `binary` on PATH; panics naming the package that brings it.
pub fn which(binary: &str) -> std::path::PathBuf {
    which_in(binary, "prometheus")
}

/// The path of `binary` on PATH; panics naming `package`, the Debian package that brings it.
pub fn which_in(binary: &str, package: &str) -> std::path::PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{binary} not found: install Debian's {package} package (./scripts/test does)")
        })
}
