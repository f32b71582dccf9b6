//! kreboot's benchmark: measures the figures kreboot is held to (README, BENCHMARKS.md) on the simulated cluster, side by side
//! with a kured-like baseline where there is one, prints them and writes `BENCHMARKS.md`.
//!
//! Run: `cargo build --release --workspace --bins && ./target/release/kreboot-bench` (add `--quick` for a
//! smaller run). Nothing here asserts a time: it measures and reports.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::Utc;
use futures::StreamExt;
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kreboot::{
    drain::{self, DrainConfig},
    lock::LOCK_LABEL,
    metrics::Metrics,
    node::{ANN_LAST_REBOOT, ANN_PHASE},
    sentinel::SentinelWatch,
};
use kreboot_testkit::{
    kured_like,
    procfs::{cpu_seconds, open_fds, status_kib},
    sim::{self, SimCluster, SimConfig, fleet::Fleet},
};
use kube::{
    Api,
    api::{PostParams, ResourceExt},
    runtime::{WatchStreamExt, watcher},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};

type Report = Vec<(String, String)>;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(v: f64) -> String {
    format!("{:.1} ms", v * 1000.0)
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// Sentinel file → `kreboot_reboot_required` changes, over `n` changes (real inotify).
async fn sentinel_latency(n: usize) -> Vec<f64> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("reboot-required");
    let watch = SentinelWatch::start(path.clone()).expect("watch");
    let metrics = Metrics::new("bench");
    let (_requests, requested) = tokio::sync::watch::channel(false);
    let _task = kreboot::agent::spawn_sentinel_metrics(metrics.clone(), watch.receiver(), requested);
    let gauge = metrics.reboot_required.with_label_values(&["bench"]);
    let mut out = Vec::new();
    for i in 0..n {
        let want = i % 2 == 0;
        let t = Instant::now();
        if want {
            std::fs::write(&path, "*** System restart required ***\n").expect("write");
        } else {
            std::fs::remove_file(&path).expect("remove");
        }
        while (gauge.get() == 1) != want {
            if t.elapsed() > Duration::from_secs(5) {
                break;
            }
            tokio::task::yield_now().await;
        }
        out.push(t.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sorted(out)
}

fn fleet_configs(
    sim: &SimCluster,
    count: usize,
    concurrency: u32,
    pods: usize,
    prefix: &str,
) -> Vec<kreboot::cli::AgentConfig> {
    let mut configs = Vec::new();
    for i in 0..count {
        let name = format!("{prefix}{i:04}");
        sim.add_node(&name, BTreeMap::new());
        for p in 0..pods {
            sim.add_pod(
                sim::pod("apps", &format!("{name}-{p}"), &name)
                    .grace(30)
                    .shutdown_seconds(0.2)
                    .build(),
            );
        }
        let mut cfg = sim::fleet::agent_config(&name);
        cfg.concurrency = concurrency;
        cfg.lock_ttl = Duration::from_secs(600);
        configs.push(cfg);
    }
    configs
}

/// Times at which nodes enter (cordon) and leave (record cleared) a cycle, from a watch.
#[derive(Default)]
struct Timeline {
    entered: Vec<(Instant, String)>,
    left: Vec<(Instant, String)>,
}

fn observe(sim: &SimCluster, client: kube::Client) -> (Arc<Mutex<Timeline>>, tokio::task::JoinHandle<()>) {
    let _ = sim;
    let tl = Arc::new(Mutex::new(Timeline::default()));
    let t2 = tl.clone();
    let task = tokio::spawn(async move {
        let api: Api<Node> = Api::all(client);
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .applied_objects();
        futures::pin_mut!(stream);
        let mut phase: BTreeMap<String, bool> = BTreeMap::new();
        while let Some(Ok(n)) = stream.next().await {
            let now = Instant::now();
            let name = n.name_any();
            let in_cycle = n.annotations().contains_key(ANN_PHASE);
            let before = phase.insert(name.clone(), in_cycle).unwrap_or(false);
            let mut tl = t2.lock().unwrap_or_else(|e| e.into_inner());
            if in_cycle && !before {
                tl.entered.push((now, name));
            } else if !in_cycle && before {
                tl.left.push((now, name));
            }
        }
    });
    (tl, task)
}

/// Hand-over latency with `waiters` nodes waiting: the previous holder's cycle ends → the next
/// node is cordoned. Returns latencies and (writes, reads) per hand-over.
async fn handover(waiters: usize, samples: usize) -> (Vec<f64>, f64, f64) {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    // Enough nodes that `waiters` still wait while the measured hand-overs happen.
    let configs = fleet_configs(&sim, waiters + samples + 1, 1, 1, "w");
    let names: Vec<String> = configs.iter().map(|c| c.node_name.clone()).collect();
    let fleet = Fleet::new(&sim, configs);
    let (tl, obs) = observe(&sim, sim.client().await);
    fleet.start_all();
    for n in &names {
        fleet.require_reboot(n);
    }
    // Let everyone queue up: all but the holder labelled as waiting.
    let settle = Instant::now();
    loop {
        let waiting = names
            .iter()
            .filter(|n| {
                sim.node(n)
                    .and_then(|node| node.metadata.labels)
                    .is_some_and(|l| l.contains_key(kreboot::node::LABEL_WAITING))
            })
            .count();
        if waiting >= waiters || settle.elapsed() > Duration::from_secs(120) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (start_left, start_entered) = {
        let t = tl.lock().unwrap_or_else(|e| e.into_inner());
        (t.left.len(), t.entered.len())
    };
    sim.reset_request_counts();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = tl.lock().unwrap_or_else(|e| e.into_inner()).left.len() - start_left;
        if done > samples || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counts = sim.request_counts();
    let (lat, cycles) = {
        let t = tl.lock().unwrap_or_else(|e| e.into_inner());
        handover_latencies(&t, start_left, start_entered, samples)
    };
    obs.abort();
    drop(fleet);
    sim.shutdown().await;
    let lease_writes = ["update leases", "create leases", "patch leases"]
        .iter()
        .map(|k| counts.by_verb_resource.get(*k).copied().unwrap_or(0))
        .sum::<u64>() as f64;
    let _ = counts.writes();
    (
        sorted(lat),
        lease_writes / cycles,
        (counts.by_verb.get("list").copied().unwrap_or(0) + counts.by_verb.get("get").copied().unwrap_or(0))
            as f64
            / cycles,
    )
}

/// Pairs each cycle end with the next cordon after it.
fn handover_latencies(
    t: &Timeline,
    start_left: usize,
    start_entered: usize,
    samples: usize,
) -> (Vec<f64>, f64) {
    let mut lat = Vec::new();
    for (left_at, _) in t.left.iter().skip(start_left) {
        if let Some((entered_at, _)) = t.entered.iter().skip(start_entered).find(|(e, _)| e >= left_at) {
            lat.push((*entered_at - *left_at).as_secs_f64());
        }
        if lat.len() == samples {
            break;
        }
    }
    (lat, (t.left.len() - start_left).max(1) as f64)
}

/// A kured-like waiter: every `period` (random phase) it reads the lock and takes it if free.
/// Returns release → acquire latencies over `samples` hand-overs with `waiters` waiters.
async fn baseline_handover(waiters: usize, samples: usize, period: Duration) -> Vec<f64> {
    let sim = SimCluster::start(SimConfig::default()).await.expect("sim");
    let api: Api<Lease> = Api::namespaced(sim.client().await, "kube-system");
    let mut free: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": kured_like::LOCK, "labels": {LOCK_LABEL: "kured"}},
        "spec": {"holderIdentity": "bench", "leaseDurationSeconds": 3600}
    }))
    .expect("lease");
    free = api.create(&PostParams::default(), &free).await.expect("create");
    let acquired: Arc<tokio::sync::Notify> = Arc::new(tokio::sync::Notify::new());
    let mut rng = StdRng::seed_from_u64(42);
    let mut tasks = Vec::new();
    for i in 0..waiters {
        let api = api.clone();
        let phase = period.mul_f64(rng.random::<f64>());
        let acquired = acquired.clone();
        tasks.push(tokio::spawn(kured_like::poll_lock(
            api,
            format!("waiter-{i}"),
            phase,
            period,
            acquired,
        )));
    }
    let mut out = Vec::new();
    for _ in 0..samples {
        let mut l = api.get(kured_like::LOCK).await.expect("get");
        if let Some(s) = l.spec.as_mut() {
            s.holder_identity = None;
        }
        free = api
            .replace(kured_like::LOCK, &PostParams::default(), &l)
            .await
            .expect("release");
        let t = Instant::now();
        if tokio::time::timeout(period * 2, acquired.notified())
            .await
            .is_err()
        {
            break;
        }
        out.push(t.elapsed().as_secs_f64());
    }
    let _ = free;
    for t in tasks {
        t.abort();
    }
    sim.shutdown().await;
    sorted(out)
}

/// What a rolling reboot measured.
struct Rollout {
    /// Every node rebooted within the limit.
    completed: bool,
    /// Nodes rebooted (cycle recorded and ended) when it finished or the limit passed.
    done: usize,
    /// Seconds until every node rebooted (or until the limit).
    total: f64,
    /// N/k × (drain 0.2 s + reboot), the time the simulated work itself takes.
    configured: f64,
    /// Peak request rate (per 250 ms sample).
    peak: f64,
    /// API requests served.
    requests: u64,
    /// CPU seconds of this process (agents, simulator and harness) during the rollout.
    cpu: f64,
    /// Peak open file descriptors of this process during the rollout.
    fds: usize,
    /// Watch events the simulator sent (all watches of all agents) during the rollout.
    watch_events: u64,
    /// Their bytes.
    watch_bytes: u64,
}

/// Whether a Node's last cycle is recorded and over, read in the store (no typed copy: at
/// thousands of nodes four times a second, the harness's own reading would count).
fn rebooted(sim: &SimCluster, node: &str) -> bool {
    sim.store()
        .get(sim::store::Kind::Node, "", node)
        .is_some_and(|n| {
            let a = n.pointer("/metadata/annotations");
            a.and_then(|a| a.get(ANN_LAST_REBOOT)).is_some() && a.and_then(|a| a.get(ANN_PHASE)).is_none()
        })
}

/// A rolling reboot of `n` nodes with concurrency `k`, stopped after `limit`.
async fn rollout(n: usize, k: u32, reboot: Duration, limit: Duration) -> Option<Rollout> {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: reboot,
        history_size: 1_000_000,
        ..SimConfig::default()
    })
    .await
    .ok()?;
    let configs = fleet_configs(&sim, n, k, 2, "r");
    let names: Vec<String> = configs.iter().map(|c| c.node_name.clone()).collect();
    let fleet = Fleet::new(&sim, configs);
    let me = std::process::id();
    let cpu0 = cpu_seconds(me).unwrap_or(0.0);
    let (ev0, bytes0) = sim.watch_events_sent();
    fleet.start_all();
    let t = Instant::now();
    for name in &names {
        fleet.require_reboot(name);
    }
    let mut peak = 0f64;
    let mut fds = 0usize;
    let mut last = (Instant::now(), 0u64);
    let completed = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let total = sim.request_counts().total();
        let now = Instant::now();
        peak = peak.max((total - last.1) as f64 / (now - last.0).as_secs_f64());
        last = (now, total);
        fds = fds.max(open_fds(me).unwrap_or(0));
        let done = names.iter().filter(|n| rebooted(&sim, n)).count();
        if done == n {
            break true;
        }
        if t.elapsed() > limit {
            break false;
        }
    };
    let total = t.elapsed().as_secs_f64();
    let done = names.iter().filter(|n| rebooted(&sim, n)).count();
    let counts = sim.request_counts();
    let requests = counts.total();
    let cpu = cpu_seconds(me).unwrap_or(0.0) - cpu0;
    if n >= 200 {
        let mut by: Vec<_> = counts.by_verb_resource.iter().collect();
        by.sort_by_key(|(_, c)| std::cmp::Reverse(**c));
        eprintln!("rollout of {n} nodes, requests by kind: {by:?}");
        eprintln!("refusals: {:?}", counts.refusals);
    }
    let (ev1, bytes1) = sim.watch_events_sent();
    if !completed {
        eprintln!("rollout of {n} nodes: only {done} done after {limit:?}");
    }
    drop(fleet);
    sim.shutdown().await;
    // Per wave: drain (the pods' 0.2 s shutdown) + the simulated reboot; Ready comes with it.
    let configured = (n as f64 / k as f64) * (0.2 + reboot.as_secs_f64());
    Some(Rollout {
        completed,
        done,
        total,
        configured,
        peak,
        requests,
        cpu,
        fds,
        watch_events: ev1 - ev0,
        watch_bytes: bytes1 - bytes0,
    })
}

/// Node Ready again after its reboot (the agent starts at that moment, as the DaemonSet would
/// restart it) → the node is uncordoned and its record cleared.
async fn uncordon_after_ready(samples: usize) -> Vec<f64> {
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let mut configs = fleet_configs(&sim, 1, 1, 1, "u");
    configs[0].reboot_loop_backoff = Duration::ZERO;
    let name = configs[0].node_name.clone();
    let fleet = Fleet::new(&sim, configs);
    fleet.start_all();
    let mut events = sim.subscribe();
    let mut out = Vec::new();
    for _ in 0..samples {
        fleet.require_reboot(&name);
        let ready_at = loop {
            match tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
                Ok(Ok(sim::SimEvent::NodeReady { .. })) => break Instant::now(),
                Ok(Ok(_)) => {}
                _ => return sorted(out),
            }
        };
        loop {
            let done = sim.node(&name).is_some_and(|n| {
                !n.annotations().contains_key(ANN_PHASE) && n.spec.and_then(|s| s.unschedulable) != Some(true)
            });
            if done || ready_at.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.push(ready_at.elapsed().as_secs_f64());
        sim.add_pod(
            sim::pod("apps", &format!("again-{}", out.len()), &name)
                .grace(30)
                .shutdown_seconds(0.1)
                .build(),
        );
    }
    drop(fleet);
    sim.shutdown().await;
    sorted(out)
}

/// API requests of idle agents over `secs` seconds (after start-up).
async fn idle_requests(agents: usize, secs: u64) -> (u64, u64) {
    let sim = SimCluster::start(SimConfig::default()).await.expect("sim");
    let configs = fleet_configs(&sim, agents, 1, 0, "i");
    let fleet = Fleet::new(&sim, configs);
    fleet.start_all();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let startup = sim.request_counts().total();
    sim.reset_request_counts();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let idle = sim.request_counts().total();
    drop(fleet);
    sim.shutdown().await;
    (startup, idle)
}

/// Drain of 110 pods whose shutdown takes 1–5 s: drain time and the slowest pod's shutdown.
async fn drain_110() -> (f64, f64) {
    let sim = SimCluster::start(SimConfig::default()).await.expect("sim");
    sim.add_node("big", BTreeMap::new());
    let mut rng = StdRng::seed_from_u64(110);
    let mut slowest = 0f64;
    for i in 0..110 {
        let s = 1.0 + 4.0 * rng.random::<f64>();
        slowest = slowest.max(s);
        sim.add_pod(
            sim::pod("apps", &format!("p{i:03}"), "big")
                .grace(30)
                .shutdown_seconds(s)
                .build(),
        );
    }
    let client = sim.client().await;
    let t = Instant::now();
    let cfg = DrainConfig {
        timeout: Duration::from_secs(120),
        grace_period: None,
        eviction_retry: Duration::from_secs(5),
    };
    drain::drain(&client, "big", &cfg, &|| {}).await.expect("drain");
    let took = t.elapsed().as_secs_f64();
    sim.shutdown().await;
    (took, slowest)
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// What one agent process costs: binary size, RSS idle (in total, private and mapped from
/// files) and at its peak during a drain of 110 pods, CPU time idle.
struct AgentCost {
    binary_bytes: u64,
    idle_rss: u64,
    peak_rss: u64,
    idle_cpu: f64,
    idle_anon: u64,
    idle_file: u64,
    /// From the sentinel to the phase `rebooting`: the drain whose peak is measured.
    drain_seconds: f64,
}

/// The agent binaries measured side by side: the shipped one (static musl, as in the image) and
/// the host's glibc release build, where built.
fn agent_binaries() -> Vec<(&'static str, std::path::PathBuf)> {
    let Ok(me) = std::env::current_exe() else {
        return Vec::new();
    };
    // target/release/kreboot-bench -> target/
    let target = me
        .parent()
        .and_then(|d| d.parent())
        .map(std::path::Path::to_path_buf);
    let mut out = Vec::new();
    if let Some(t) = target {
        out.push((
            "shipped: static musl",
            t.join("x86_64-unknown-linux-musl/release/kreboot"),
        ));
    }
    out.push(("glibc release build", me.with_file_name("kreboot")));
    out.retain(|(what, p)| {
        let ok = p.exists();
        if !ok {
            eprintln!("{what} {} not built: not measured", p.display());
        }
        ok
    });
    out
}

/// RSS of a real agent process idle and during a drain of 110 pods; CPU time idle.
async fn agent_memory(exe: &std::path::Path) -> Option<AgentCost> {
    let sim = SimCluster::start(SimConfig::default()).await.ok()?;
    sim.add_node("m1", BTreeMap::new());
    let dir = tempfile::tempdir().ok()?;
    let kc = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kc).ok()?;
    let sentinel = dir.path().join("reboot-required");
    let mut child = std::process::Command::new(exe)
        .args([
            "agent",
            "--node-name",
            "m1",
            "--namespace",
            "kube-system",
            "--host-namespaces=false",
            "--metrics-addr",
            "127.0.0.1:0",
            "--reboot-command",
            "true",
        ])
        .arg("--sentinel-file")
        .arg(&sentinel)
        .env("KUBECONFIG", &kc)
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let pid = child.id();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = rss_kib(pid)?;
    let idle_anon = status_kib(pid, "RssAnon:")?;
    let idle_file = status_kib(pid, "RssFile:")?;
    let c0 = cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = cpu_seconds(pid)? - c0;
    for i in 0..110 {
        sim.add_pod(
            sim::pod("apps", &format!("d{i:03}"), "m1")
                .grace(30)
                .shutdown_seconds(2.0)
                .build(),
        );
    }
    std::fs::write(&sentinel, "x").ok()?;
    let mut peak = idle_rss;
    let t = Instant::now();
    loop {
        if let Some(r) = rss_kib(pid) {
            peak = peak.max(r);
        }
        let phase = sim
            .node("m1")
            .and_then(|n| n.annotations().get(ANN_PHASE).cloned());
        if phase.as_deref() == Some("rebooting") {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            // No peak during a drain without a drain: not a measurement.
            eprintln!(
                "{}: the drain did not reach the reboot within 60 s",
                exe.display()
            );
            let _ = child.kill();
            let _ = child.wait();
            sim.shutdown().await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_seconds = t.elapsed().as_secs_f64();
    let _ = child.kill();
    let _ = child.wait();
    sim.shutdown().await;
    Some(AgentCost {
        binary_bytes: std::fs::metadata(exe).ok()?.len(),
        idle_rss,
        peak_rss: peak,
        idle_cpu,
        idle_anon,
        idle_file,
        drain_seconds,
    })
}

/// The agent process section: each built agent binary side by side, or why nothing was measured.
async fn agent_process_report() -> String {
    let mut measured = Vec::new();
    for (what, exe) in agent_binaries() {
        match agent_memory(&exe).await {
            Some(cost) => measured.push((what, cost)),
            None => eprintln!("{what} {}: could not be measured", exe.display()),
        }
    }
    let mut out = String::from("## One agent process\n\n");
    if measured.is_empty() {
        out.push_str(
            "Not measured: no agent binary built (`cargo build --release --target x86_64-unknown-linux-musl` builds the shipped one).\n",
        );
        return out;
    }
    out.push_str(
        "A real agent process against the simulated cluster: idle (no sentinel) after 2 s, CPU over the next 10 s idle, then the peak RSS (sampled every 50 ms) while it drains 110 pods. Goals: idle RSS < 8 MiB (DESIGN §7), peak < 12 MiB, binary < 10 MiB.\n\n",
    );
    let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);
    let header: Vec<&str> = measured.iter().map(|(w, _)| *w).collect();
    out.push_str(&format!(
        "| | {} |\n|---|{}\n",
        header.join(" | "),
        "---|".repeat(header.len())
    ));
    let mut row = |name: &str, cell: &dyn Fn(&AgentCost) -> String| {
        let cells: Vec<String> = measured.iter().map(|(_, c)| cell(c)).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    };
    row("binary size", &|c| {
        format!("{:.2} MB", c.binary_bytes as f64 / 1e6)
    });
    row("RSS idle", &|c| mib(c.idle_rss));
    row("of which private (RssAnon)", &|c| mib(c.idle_anon));
    row("of which mapped from the binary (RssFile)", &|c| mib(c.idle_file));
    row("RSS peak draining 110 pods", &|c| mib(c.peak_rss));
    row("sentinel → rebooting (the drain measured)", &|c| {
        format!("{:.1} s", c.drain_seconds)
    });
    row("CPU idle over 10 s", &|c| format!("{:.2} s", c.idle_cpu));
    out
}

/// The cluster sizes of the largest-cluster part, in order; it stops at the first that does not
/// complete.
const LARGEST_SIZES: &[usize] = &[200, 500, 1000, 2000, 5000];

/// The headings of the agent process section (earlier names count as the same section).
const AGENT_HEADINGS: &[&str] = &["## One agent process", "## Agent process"];

/// The heading of the largest-cluster section.
const LARGEST_HEADINGS: &[&str] = &["## Largest simulated cluster rolled on this machine"];

/// Rolls clusters of growing `sizes` (one agent per node in this process, concurrency =
/// nodes/20, reboot 0.5 s, 2 pods per node, 5 minutes each), up to the first that does not
/// complete: the section of BENCHMARKS.md.
async fn largest_cluster(sizes: &[usize]) -> String {
    let limit = Duration::from_secs(300);
    let mut md = String::new();
    let mut line = |l: String| {
        println!("{l}");
        md.push_str(&l);
        md.push('\n');
    };
    line(format!("{}\n", LARGEST_HEADINGS[0]));
    line(format!(
        "One agent per node in this one process (each with its own kube-rs client, calling the simulator's HTTP handler in memory), concurrency = nodes/20, reboot 0.5 s, 2 pods per node; a size counts as completed when every node rebooted within {} minutes; larger sizes are not tried after one that did not complete. CPU is this process's (agents, simulator and harness together) during the rollout; peak RSS is the process's high-water mark so far; watch events are those the simulator sent to all watches, per node rolled (each node takes the lock once).\n",
        limit.as_secs() / 60
    ));
    line(
        "| nodes | completed | total | rebooted in the limit | requests | CPU | peak RSS | open fds | watch events / node | watch MB |\n|---|---|---|---|---|---|---|---|---|---|"
            .into(),
    );
    let me = std::process::id();
    for &nn in sizes {
        let Some(r) = rollout(nn, (nn / 20).max(1) as u32, Duration::from_millis(500), limit).await else {
            line(format!("| {nn} | simulator did not start | | | | | | | | |"));
            break;
        };
        let rss = status_kib(me, "VmHWM:").unwrap_or(0) as f64 / 1024.0;
        line(format!(
            "| {nn} | {} | {:.1} s | {} | {} | {:.0} s | {rss:.0} MiB | {} | {:.0} | {:.0} |",
            if r.completed { "yes" } else { "no" },
            r.total,
            r.done,
            r.requests,
            r.cpu,
            r.fds,
            r.watch_events as f64 / r.done.max(1) as f64,
            r.watch_bytes as f64 / 1e6
        ));
        if !r.completed {
            break;
        }
    }
    line(
        "\nThe CPU, watch events and requests per node are the costs to read when a size does not complete: the agents, the simulator and the harness share this process's two cores. BENCHMARKS.md's real kube-apiserver sections show where those costs come from."
            .into(),
    );
    md
}

/// `doc` with the section that starts with one of `headings` (up to the next `## `) replaced by
/// `section`; appended when there is none.
fn replace_section(doc: &str, headings: &[&str], section: &str) -> String {
    let start = headings.iter().find_map(|h| doc.find(&format!("\n{h}")));
    let Some(start) = start.map(|s| s + 1) else {
        return format!("{}\n{section}", doc.trim_end());
    };
    let end = doc[start + 3..]
        .find("\n## ")
        .map_or(doc.len(), |e| start + 3 + e + 1);
    format!("{}{}\n\n{}", &doc[..start], section.trim_end(), &doc[end..]).replace("\n\n\n", "\n\n")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--help" || a == "-h") {
        println!(
            "kreboot-bench: measures kreboot on the simulated cluster and writes BENCHMARKS.md\n\n\
             kreboot-bench              every part; BENCHMARKS.md rewritten\n\
             kreboot-bench --quick      every part, smaller\n\
             kreboot-bench --agent-only only the agent process section (replaced in BENCHMARKS.md)\n\
             kreboot-bench --largest-only [--sizes 200,500,...]\n\
             \x20                          only the largest simulated cluster section (replaced in\n\
             \x20                          BENCHMARKS.md when the sizes are the default ones)"
        );
        return;
    }
    if std::env::args().any(|a| a == "--largest-only") {
        let args: Vec<String> = std::env::args().collect();
        let custom: Option<Vec<usize>> = args
            .iter()
            .position(|a| a == "--sizes")
            .and_then(|i| args.get(i + 1))
            .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect());
        let sizes = custom.as_deref().unwrap_or(LARGEST_SIZES);
        let section = format!(
            "{}\nMeasured by `cargo build --release -p kreboot-testkit --bin kreboot-bench && ./target/release/kreboot-bench --largest-only`, {}.\n",
            largest_cluster(sizes).await,
            Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        if custom.is_none() {
            let old = std::fs::read_to_string("BENCHMARKS.md").unwrap_or_default();
            if let Err(e) = std::fs::write("BENCHMARKS.md", replace_section(&old, LARGEST_HEADINGS, &section))
            {
                eprintln!("cannot write BENCHMARKS.md: {e}");
            }
        }
        return;
    }
    if std::env::args().any(|a| a == "--agent-only") {
        // Only the agent process section: printed, and put in place of its section of
        // BENCHMARKS.md (the rest of the file is left as it is).
        let section = format!(
            "{}\nMeasured by `cargo build --release --target x86_64-unknown-linux-musl --bin kreboot && cargo build --release --workspace --bins && ./target/release/kreboot-bench --agent-only`, {}.\n",
            agent_process_report().await,
            Utc::now().format("%Y-%m-%d %H:%M UTC")
        );
        println!("{section}");
        let old = std::fs::read_to_string("BENCHMARKS.md").unwrap_or_default();
        if let Err(e) = std::fs::write("BENCHMARKS.md", replace_section(&old, AGENT_HEADINGS, &section)) {
            eprintln!("cannot write BENCHMARKS.md: {e}");
        }
        return;
    }
    let mut r: Report = Vec::new();
    let mut md = String::new();
    let started = Utc::now();
    macro_rules! say {
        ($($t:tt)*) => {{ let line = format!($($t)*); println!("{line}"); md.push_str(&line); md.push('\n'); }};
    }
    say!("# kreboot benchmarks\n");
    say!(
        "Measured by `cargo build --release --workspace --bins && ./target/release/kreboot-bench{}` on {} ({} cores), {}.",
        if quick { " --quick" } else { "" },
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_owned()))
            .unwrap_or_default(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        started.format("%Y-%m-%d %H:%M UTC")
    );
    say!(
        "Everything runs against the simulated cluster over HTTP on 127.0.0.1 (see README); the kured column comes from a kured-like poller measured in the same run where one is named, else from kured's code.\n"
    );

    let n = if quick { 60 } else { 200 };
    let s = sentinel_latency(n).await;
    say!("## Sentinel appears → `kreboot_reboot_required` follows ({n} changes, real inotify)\n");
    say!("| | p50 | p99 | max | kured |\n|---|---|---|---|---|");
    say!(
        "| kreboot | {} | {} | {} | up to 60 s (its `--period` check) |\n",
        ms(pct(&s, 0.5)),
        ms(pct(&s, 0.99)),
        ms(pct(&s, 1.0))
    );
    r.push(("sentinel p99".into(), ms(pct(&s, 0.99))));

    say!("## Lock hand-over: previous node's cycle ends → next node cordoned\n");
    say!(
        "kured-like baseline: every waiter reads the lock once per period (random phase) and takes it if free; period {}s (kured's default is 1 h; its latency scales linearly with the period).\n",
        10
    );
    say!(
        "| waiting nodes | kreboot p50 | kreboot p99 | lease writes / hand-over | reads / hand-over | baseline p50 | baseline p99 |\n|---|---|---|---|---|---|---|"
    );
    let sizes: &[usize] = if quick { &[10, 100] } else { &[10, 100, 1000] };
    for &w in sizes {
        let samples = if w >= 1000 { 10 } else { 20 };
        let (lat, writes, reads) = handover(w, samples).await;
        let base = baseline_handover(w, 8, Duration::from_secs(10)).await;
        say!(
            "| {w} | {} | {} | {writes:.1} | {reads:.1} | {} | {} |",
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(pct(&base, 0.5)),
            ms(pct(&base, 0.99))
        );
        r.push((format!("handover p99 {w}"), ms(pct(&lat, 0.99))));
    }
    say!(
        "\nA hand-over is: the holder clears its Node record and writes the Lease naming the longest waiter (one write), the waiter claims it with its full TTL (one write) and cordons (one Node patch). Reads: one list of the waiting nodes per hand-over.\n"
    );

    let u = uncordon_after_ready(if quick { 5 } else { 20 }).await;
    say!(
        "## Node Ready after its reboot → uncordoned ({} reboots)\n",
        u.len()
    );
    say!(
        "The agent is started when the Node turns Ready (as the DaemonSet restarts it with the machine); it reads its Node, sees the new bootID and uncordons.\n"
    );
    say!("| p50 | p99 | kured |\n|---|---|---|");
    say!(
        "| {} | {} | 30–90 s (its start-up tick) |\n",
        ms(pct(&u, 0.5)),
        ms(pct(&u, 0.99))
    );

    say!("## Rolling reboot overhead\n");
    say!(
        "Total time minus N/k × (drain 0.2 s + reboot 0.5 s configured in the simulator), per node; peak request rate during the rollout.\n"
    );
    say!(
        "| nodes | concurrency | total | configured | overhead per node | peak requests/s | requests |\n|---|---|---|---|---|---|---|"
    );
    for (nn, k) in [(20usize, 1u32), (20, 4)] {
        if let Some(r) = rollout(nn, k, Duration::from_millis(500), Duration::from_secs(300)).await
            && r.completed
        {
            say!(
                "| {nn} | {k} | {:.1} s | {:.1} s | {} | {:.0} | {} |",
                r.total,
                r.configured,
                ms((r.total - r.configured) / nn as f64),
                r.peak,
                r.requests
            );
        }
    }

    let (startup, idle) = idle_requests(100, if quick { 5 } else { 20 }).await;
    let secs = if quick { 5 } else { 20 };
    say!("\n## API requests of idle agents\n");
    say!(
        "100 idle agents (no sentinel): {startup} requests at start-up (one Node get and one Lease list each), then {idle} requests in {secs} s → {:.1} requests per idle node per hour (kured: one lock read per `--period`).\n",
        idle as f64 / 100.0 / secs as f64 * 3600.0
    );

    let (took, slowest) = drain_110().await;
    say!("## Drain of 110 pods (shutdown 1–5 s each)\n");
    say!(
        "Drain took {took:.2} s; the slowest pod needed {slowest:.2} s: overhead {}.\n",
        ms(took - slowest)
    );

    say!("{}", agent_process_report().await);

    say!(
        "{}",
        largest_cluster(if quick { &[200] } else { LARGEST_SIZES }).await
    );
    for (k, v) in &r {
        eprintln!("{k}: {v}");
    }
    if let Err(e) = std::fs::write("BENCHMARKS.md", &md) {
        eprintln!("cannot write BENCHMARKS.md: {e}");
    }
}
