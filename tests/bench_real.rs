//! Benchmark: the lock hand-over on the real kube-apiserver (KWOK Nodes, in-process agents).
//!
//! ```sh
//! cargo test --release --test bench_real -- --ignored --nocapture
//! ```
//!
//! Per size N (`KREBOOT_BENCH_NODES`, default `100,1000`): a fresh control plane
//! (`tests/common/real.rs`), N Ready KWOK Nodes, N kreboot agents in this process, each with
//! its own kube client (`tests/common/real_fleet.rs`), concurrency `KREBOOT_BENCH_CONCURRENCY`
//! (default 1; `auto`: N/50). First the idle cost: the
//! agents start with no sentinel, and the requests they make over `KREBOOT_BENCH_IDLE_SECS`
//! (default 60) are counted. Then every sentinel is set at once and the rollout runs until every
//! node rebooted (each machine reboots in `KREBOOT_BENCH_REBOOT_MS`, default 200) or
//! `KREBOOT_BENCH_LIMIT_SECS` (default 600) passed. Before each size it waits (at most
//! `KREBOOT_BENCH_LOAD_WAIT_SECS`, default 300) for the load average to drop to
//! `KREBOOT_BENCH_MAX_LOAD` (default 3); the load it started at is reported. The burst is the
//! first `BURST_SECS` after the sentinels; the rollout's time series (every hand-over, kube-
//! apiserver's requests per second from its audit log) is written to
//! `target/bench/rollout-N-*.csv`, which `scripts/plot_rollout.py` draws.
//!
//! It measures and prints; nothing is asserted about the figures. The results replace the
//! section "Lock hand-over on the real kube-apiserver" of BENCHMARKS.md (unless
//! `KREBOOT_BENCH_WRITE=0`).
//!
//! The second benchmark, `kured_like_poller_on_the_real_kube_apiserver`, is the baseline on the
//! same server: N kured-like pollers (each its own client) reading the lock once per period;
//! it writes the section "kured-like poller on the real kube-apiserver".

mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use common::{
    real::{self, ControlPlane},
    real_fleet::{
        AuditReader, Audited, HandOver, Observer, RealFleet, Scrape, agent_node, create_nodes,
        fleet_control_plane, raise_nofile,
    },
};
use k8s_openapi::api::core::v1::Namespace;
use kreboot_testkit::{
    kured_like,
    procfs::{cpu_seconds, open_fds, status_kib},
};
use kube::{Api, api::PostParams};

const NS: &str = "kube-system";
const SECTION: &str = "## Lock hand-over on the real kube-apiserver";

/// The burst: the seconds right after every sentinel was set at once.
const BURST_SECS: u64 = 30;

/// The lock's concurrency for `n` nodes: `KREBOOT_BENCH_CONCURRENCY` (a number, or `auto` for
/// n/50 as a pool's share), 1 by default.
fn concurrency_for(n: usize) -> usize {
    match std::env::var("KREBOOT_BENCH_CONCURRENCY").as_deref() {
        Ok("auto") => (n / 50).max(1),
        Ok(v) => v.parse().unwrap_or(1),
        Err(_) => 1,
    }
}

/// Requests per second of the rollout from the audit log, by kube-apiserver's clock, from
/// `from`: (second, all clients, the agents).
fn per_second(entries: &[Audited], from: chrono::DateTime<chrono::Utc>) -> Vec<(u64, u64, u64)> {
    let mut by: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    for e in entries.iter().filter(|e| !e.resource.is_empty()) {
        let Some(at) = e.at else { continue };
        let Ok(second) = u64::try_from((at - from).num_seconds()) else {
            continue;
        };
        let slot = by.entry(second).or_default();
        slot.0 += 1;
        if agent_node(&e.user).is_some() {
            slot.1 += 1;
        }
    }
    let last = by.keys().next_back().copied().unwrap_or(0);
    (0..=last)
        .map(|s| {
            let (all, agents) = by.get(&s).copied().unwrap_or_default();
            (s, all, agents)
        })
        .collect()
}

/// Writes the rollout's time series for the plot: every hand-over (seconds since the
/// sentinels, latency, nodes waiting) and the requests per second.
fn write_series(r: &Row, t0: Instant) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    let _ = std::fs::create_dir_all(&dir);
    let mut h = String::from("seconds,handover_ms,waiting\n");
    for x in &r.hand_overs {
        let _ = writeln!(
            h,
            "{:.3},{:.1},{}",
            x.at.saturating_duration_since(t0).as_secs_f64(),
            x.write_to_cordon * 1000.0,
            x.waiting
        );
    }
    let mut q = String::from("second,requests_all,requests_agents\n");
    for (s, all, agents) in &r.requests_per_second {
        let _ = writeln!(q, "{s},{all},{agents}");
    }
    let n = r.nodes;
    for (name, text) in [("handovers", h), ("requests", q)] {
        let path = dir.join(format!("rollout-{n}-{name}.csv"));
        match std::fs::write(&path, text) {
            Ok(()) => eprintln!("  time series: {}", path.display()),
            Err(e) => eprintln!("  cannot write {}: {e}", path.display()),
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_infinite() => "> 60 s".into(),
        Some(v) => format!("{:.0} ms", v * 1000.0),
        None => "–".into(),
    }
}

fn per(count: f64, by: usize) -> String {
    if by == 0 {
        "–".into()
    } else {
        // `+ 0.0`: an empty f64 sum is -0.0.
        format!("{:.1}", count / by as f64 + 0.0)
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn first_line(bin: &str) -> String {
    std::process::Command::new(real::tool(bin))
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

/// CPU time and memory of a process over the rollout.
#[derive(Debug, Default, Clone)]
struct ProcFigures {
    cpu_start: f64,
    cpu_end: f64,
    rss_peak_kib: u64,
    rss_end_kib: u64,
    fds_peak: usize,
}

impl ProcFigures {
    fn start(pid: Option<u32>) -> ProcFigures {
        ProcFigures {
            cpu_start: pid.and_then(cpu_seconds).unwrap_or(0.0),
            ..ProcFigures::default()
        }
    }

    fn sample(&mut self, pid: Option<u32>, fds: bool) {
        let Some(pid) = pid else { return };
        if let Some(rss) = status_kib(pid, "VmRSS:") {
            self.rss_peak_kib = self.rss_peak_kib.max(rss);
            self.rss_end_kib = rss;
        }
        if fds {
            self.fds_peak = self.fds_peak.max(open_fds(pid).unwrap_or(0));
        }
    }

    fn finish(&mut self, pid: Option<u32>) {
        self.sample(pid, false);
        self.cpu_end = pid.and_then(cpu_seconds).unwrap_or(self.cpu_start);
    }

    fn cpu(&self) -> f64 {
        self.cpu_end - self.cpu_start
    }
}

/// Requests counted by (verb, resource, code).
type Counts = BTreeMap<(String, String, String), f64>;

fn metric_counts(after: &Scrape, before: &Scrape) -> Counts {
    after
        .delta_by(
            before,
            "apiserver_request_total",
            &["verb", "resource", "subresource", "code"],
            |l| l.get("resource").is_some_and(|r| !r.is_empty()),
        )
        .into_iter()
        .map(|(k, v)| {
            let resource = if k[2].is_empty() {
                k[1].clone()
            } else {
                format!("{}/{}", k[1], k[2])
            };
            ((k8s_verb(&k[0]).to_owned(), resource, k[3].clone()), v)
        })
        .collect()
}

/// The agents' requests.
fn audit_counts(entries: &[Audited]) -> Counts {
    let mut out = Counts::new();
    for e in entries.iter().filter(|e| agent_node(&e.user).is_some()) {
        *out.entry((e.verb.clone(), e.resource.clone(), e.code.to_string()))
            .or_default() += 1.0;
    }
    out
}

/// apiserver_request_total's verbs as the API's own (audit, RBAC) verbs.
fn k8s_verb(metric_verb: &str) -> &str {
    match metric_verb {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "APPLY" => "apply",
        "DELETE" => "delete",
        "DELETECOLLECTION" => "deletecollection",
        "GET" => "get",
        "LIST" => "list",
        "WATCH" => "watch",
        "WATCHLIST" => "watchlist",
        other => other,
    }
}

/// What an agent's list or watch of Nodes was for, from its selector: its own Node, another
/// Node by name (a waiter following a lock holder that left the watch of labelled holders), the
/// labelled lock holders, or the waiting Nodes (a holder choosing its successor).
fn node_read_kind(e: &Audited) -> Option<String> {
    if e.resource != "nodes" || !matches!(e.verb.as_str(), "list" | "watch") {
        return None;
    }
    let me = agent_node(&e.user)?;
    let uri = e.uri.replace("%3D", "=").replace("%2F", "/").replace("%2C", ",");
    let what = if let Some(i) = uri.find("metadata.name=") {
        let name = uri[i + "metadata.name=".len()..].split('&').next().unwrap_or("");
        if name == me {
            "own Node"
        } else {
            "another Node by name"
        }
    } else if uri.contains(kreboot::node::LABEL_HOLDER) {
        "lock holders"
    } else if uri.contains(kreboot::node::LABEL_WAITING) {
        "waiting Nodes"
    } else {
        "other"
    };
    Some(format!("{} {what}", e.verb))
}

fn node_reads(entries: &[Audited]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for k in entries.iter().filter_map(node_read_kind) {
        *out.entry(k).or_default() += 1.0;
    }
    out
}

/// Failed requests (409 Conflict aside) by client, verb, resource and code, with a message and
/// a URI of the first.
fn failures(entries: &[Audited]) -> Vec<String> {
    // (client, verb, resource, code) → (count, first message, first URI).
    type Group = (String, String, String, u16);
    let mut groups: BTreeMap<Group, (u64, String, String)> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.code >= 400 && e.code != 409) {
        let who = if agent_node(&e.user).is_some() {
            "agents".to_owned()
        } else {
            e.user.clone()
        };
        let g = groups
            .entry((who, e.verb.clone(), e.resource.clone(), e.code))
            .or_insert_with(|| (0, e.message.clone(), e.uri.clone()));
        g.0 += 1;
    }
    groups
        .into_iter()
        .map(|((who, verb, resource, code), (n, message, uri))| {
            let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
            format!(
                "{n} × {who} {verb} {resource} → {code} (e.g. `{}`: {})",
                cut(&uri, 160),
                cut(&message, 200)
            )
        })
        .collect()
}

fn is_write(verb: &str) -> bool {
    matches!(
        verb,
        "create" | "update" | "patch" | "apply" | "delete" | "deletecollection"
    )
}

fn count(c: &Counts, keep: impl Fn(&str, &str, &str) -> bool) -> f64 {
    c.iter()
        .filter(|((v, r, code), _)| keep(v, r, code))
        .map(|(_, n)| n)
        .sum()
}

/// "verb resource[ code]: n/hand-over" for the largest entries.
fn breakdown(c: &Counts, by: usize) -> String {
    let mut merged: BTreeMap<String, f64> = BTreeMap::new();
    for ((v, r, code), n) in c {
        let key = if code.starts_with('2') {
            format!("{v} {r}")
        } else {
            format!("{v} {r} {code}")
        };
        *merged.entry(key).or_default() += n;
    }
    let mut v: Vec<(String, f64)> = merged.into_iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v.iter()
        .filter(|(_, n)| *n / by.max(1) as f64 >= 0.05)
        .map(|(k, n)| format!("{k} {}", per(*n, by)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// kube-apiserver's request latency p99 (seconds, and how many requests) between two scrapes.
#[derive(Debug, Default, Clone)]
struct Latency {
    lease_put: Option<(f64, u64)>,
    node_patch: Option<(f64, u64)>,
    node_list: Option<(f64, u64)>,
    all: Option<(f64, u64)>,
}

impl Latency {
    fn between(before: &Scrape, after: &Scrape) -> Latency {
        let verb_res = |verb: &'static str, res: &'static str| {
            move |l: &BTreeMap<String, String>| {
                l.get("verb").map(String::as_str) == Some(verb)
                    && l.get("resource").map(String::as_str) == Some(res)
                    && l.get("subresource").is_none_or(|s| s.is_empty())
            }
        };
        Latency {
            lease_put: after.latency_quantile(before, 0.99, verb_res("PUT", "leases")),
            node_patch: after.latency_quantile(before, 0.99, verb_res("PATCH", "nodes")),
            node_list: after.latency_quantile(before, 0.99, verb_res("LIST", "nodes")),
            all: after.latency_quantile(before, 0.99, |l| {
                !matches!(
                    l.get("verb").map(String::as_str),
                    Some("WATCH" | "WATCHLIST" | "CONNECT")
                )
            }),
        }
    }

    fn show(&self, counts: bool) -> [String; 4] {
        let l = |x: &Option<(f64, u64)>| match x {
            Some((v, n)) if counts => format!("{} ({n})", ms(Some(*v))),
            Some((v, _)) => ms(Some(*v)),
            None => "–".into(),
        };
        [
            l(&self.lease_put),
            l(&self.node_patch),
            l(&self.node_list),
            l(&self.all),
        ]
    }
}

/// One size's figures.
#[derive(Debug, Default)]
struct Row {
    nodes: usize,
    concurrency: usize,
    /// Server latency p99 over the first [`BURST_SECS`] after the sentinels.
    lat_burst: Latency,
    /// Requests per second over the rollout (audit log): (second, all clients, agents).
    requests_per_second: Vec<(u64, u64, u64)>,
    /// The most nodes in a cycle at once.
    max_in_cycle: usize,
    load: String,
    completed: usize,
    finished: bool,
    sentinel_spread: Duration,
    rollout: Duration,
    hand_overs: Vec<HandOver>,
    steady_from_pass: usize,
    steady_hand_overs: usize,
    metrics_steady: Counts,
    agents_steady: Counts,
    metrics_whole: Counts,
    agents_whole: Counts,
    watch_sample: Option<(usize, f64, BTreeMap<String, f64>)>,
    watch_events: BTreeMap<String, f64>,
    /// Server latency p99 over the steady state and over the whole rollout.
    lat_steady: Latency,
    lat_whole: Latency,
    apiserver: ProcFigures,
    etcd: ProcFigures,
    test_process: ProcFigures,
    kwok_cpu: f64,
    idle_secs: u64,
    startup_requests: f64,
    idle_agent_requests: f64,
    idle_all_requests: f64,
    idle_all_breakdown: String,
    /// The agents' Node lists and watches by purpose, steady state.
    node_reads_steady: BTreeMap<String, f64>,
    /// Failed requests over the rollout (409 aside).
    failures: Vec<String>,
    /// What kube-apiserver logged over the run: watchers closed for unresponsiveness, error
    /// lines, and where the log was kept.
    apiserver_log: String,
    /// Resource requests while idle by user (program), from the audit log.
    idle_by_client: String,
    note: String,
}

impl Row {
    fn latencies(&self, from_waiting: usize) -> Vec<f64> {
        sorted(
            self.hand_overs
                .iter()
                .filter(|h| h.waiting >= from_waiting)
                .map(|h| h.write_to_cordon)
                .collect(),
        )
    }
}

/// Waits (at most `limit`) for the 1-minute load average to drop to `max`: the machine may be
/// busy with other work.
async fn calm_down(max: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let load: f64 = load_average()
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        if load <= max || Instant::now() >= deadline {
            return;
        }
        eprintln!("load average {load:.2} > {max}: waiting");
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
}

async fn run_size(n: usize, reboot: Duration, idle_secs: u64, limit: Duration) -> Row {
    calm_down(
        env_or("KREBOOT_BENCH_MAX_LOAD", 3.0),
        Duration::from_secs(env_or("KREBOOT_BENCH_LOAD_WAIT_SECS", 300)),
    )
    .await;
    let mut row = Row {
        nodes: n,
        concurrency: concurrency_for(n),
        load: load_average(),
        idle_secs,
        ..Row::default()
    };
    eprintln!("\n=== {n} nodes (load average {}) ===", row.load);
    let names: Vec<String> = (0..n).map(|i| format!("node-{i:04}")).collect();
    let cp = fleet_control_plane(&names, NS).await;
    let admin = cp.admin_client();
    let t = Instant::now();
    create_nodes(&admin, &names, 16).await;
    let observer = Observer::start(&cp, NS);
    wait(
        "the observer to list every Node",
        Duration::from_secs(120),
        || observer.with(|t| t.nodes) >= n,
    )
    .await;
    eprintln!("{n} Nodes created in {:.1} s", t.elapsed().as_secs_f64());
    let (api_pid, etcd_pid, kwok_pid, me) = (
        cp.pid("kube-apiserver"),
        cp.pid("etcd"),
        cp.pid("kwok"),
        Some(std::process::id()),
    );

    // Idle: N agents, no sentinel.
    let concurrency = row.concurrency as u32;
    let fleet = RealFleet::new(&cp, &names, reboot, |c| c.concurrency = concurrency);
    let mut audit = AuditReader::at_end(&cp);
    let t = Instant::now();
    fleet.start_all();
    wait("every agent to go idle", Duration::from_secs(300), || {
        fleet.in_state("idle") >= n
    })
    .await;
    eprintln!(
        "{n} agents idle {:.1} s after their start",
        t.elapsed().as_secs_f64()
    );
    // "idle" is reported before the start-up requests are through: start-up ends with each
    // agent's one idle watch (its own Node) open, as the audit log shows.
    let mut startup = Vec::new();
    let mut watching = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(900);
    while watching.len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
        for e in audit.read() {
            if e.verb == "watch"
                && e.resource == "nodes"
                && let Some(node) = agent_node(&e.user)
            {
                watching.insert(node.to_owned());
            }
            startup.push(e);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    startup.extend(audit.read());
    eprintln!(
        "{} of {n} agents watching their Node {:.1} s after their start",
        watching.len(),
        t.elapsed().as_secs_f64()
    );
    row.startup_requests = audit_counts(&startup).values().sum::<f64>() + 0.0;
    let idle_before = Scrape::take(&admin).await;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle_after = Scrape::take(&admin).await;
    let idle_entries = audit.read();
    row.idle_agent_requests = audit_counts(&idle_entries).values().sum::<f64>() + 0.0;
    let idle_all = metric_counts(&idle_after, &idle_before);
    row.idle_all_requests = idle_all.values().sum::<f64>() + 0.0;
    row.idle_all_breakdown = breakdown(&idle_all, 1);
    let mut by_user: BTreeMap<String, u64> = BTreeMap::new();
    for e in idle_entries.iter().filter(|e| !e.resource.is_empty()) {
        let who = if agent_node(&e.user).is_some() {
            "agents".to_owned()
        } else {
            format!("{} ({})", e.user, e.client)
        };
        *by_user.entry(who).or_default() += 1;
    }
    row.idle_by_client = by_user
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "idle {idle_secs} s: agents made {} requests ({} at start-up); all clients: {} ({}); audit by user: {}",
        row.idle_agent_requests,
        row.startup_requests,
        row.idle_all_requests,
        row.idle_all_breakdown,
        row.idle_by_client
    );

    // The rollout.
    let watches = |s: &Scrape| {
        s.sum("apiserver_longrunning_requests", |l| {
            l.get("verb").map(String::as_str) == Some("WATCH")
        })
    };
    let watches_by = |s: &Scrape| {
        s.delta_by(
            &Scrape::default(),
            "apiserver_longrunning_requests",
            &["resource"],
            |l| l.get("verb").map(String::as_str) == Some("WATCH"),
        )
        .into_iter()
        .map(|(k, v)| (k[0].clone(), v))
        .collect::<BTreeMap<String, f64>>()
    };
    let base_watches = watches(&idle_after);
    let base_by = watches_by(&idle_after);
    // The sample with the most agents engaged (waiting or in a cycle) is kept.
    let sample_watches = |row: &mut Row, s: &Scrape, engaged: usize| {
        if row.watch_sample.as_ref().is_some_and(|(e, _, _)| engaged <= *e) {
            return;
        }
        let held = watches(s) - base_watches;
        let by: BTreeMap<String, f64> = watches_by(s)
            .into_iter()
            .map(|(r, v)| {
                let b = base_by.get(&r).copied().unwrap_or(0.0);
                (r, v - b)
            })
            .filter(|(_, v)| v.abs() > 0.5)
            .collect();
        row.watch_sample = Some((engaged, held, by));
    };
    let start = idle_after;
    row.apiserver = ProcFigures::start(api_pid);
    row.etcd = ProcFigures::start(etcd_pid);
    row.test_process = ProcFigures::start(me);
    let kwok_cpu = kwok_pid.and_then(cpu_seconds).unwrap_or(0.0);
    let t0 = Instant::now();
    let t0_wall = chrono::Utc::now();
    row.sentinel_spread = fleet.require_reboot_all();
    let mut burst_measured = false;
    let mut steady: Option<(Scrape, usize)> = None;
    let mut agents_ramp = Vec::new();
    let mut last_scrape = Instant::now();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (completed, free, waiting, in_cycle, passes, errors) = observer.with(|t| {
            (
                t.completed.len(),
                t.holders.is_empty(),
                t.waiting,
                t.in_cycle,
                t.lease_passes(),
                t.errors,
            )
        });
        let sample_fds = last_print.elapsed() >= Duration::from_secs(2);
        row.apiserver.sample(api_pid, sample_fds);
        row.etcd.sample(etcd_pid, false);
        row.test_process.sample(me, sample_fds);
        if steady.is_none() && waiting + in_cycle + completed >= n && in_cycle >= 1 {
            // Every node queued (or through): from here on, hand-overs in the steady state.
            let s = Scrape::take(&admin).await;
            agents_ramp = audit.read();
            let (passes_now, engaged) = observer.with(|t| (t.lease_passes(), t.waiting + t.in_cycle));
            sample_watches(&mut row, &s, engaged);
            eprintln!(
                "all {n} queued after {:.1} s ({passes_now} hand-overs so far)",
                t0.elapsed().as_secs_f64()
            );
            steady = Some((s, passes_now));
        }
        if !burst_measured && t0.elapsed() >= Duration::from_secs(BURST_SECS) {
            burst_measured = true;
            let s = Scrape::take(&admin).await;
            row.lat_burst = Latency::between(&start, &s);
        }
        if last_scrape.elapsed() >= Duration::from_secs(10) {
            last_scrape = Instant::now();
            let s = Scrape::take(&admin).await;
            let engaged = observer.with(|t| t.waiting + t.in_cycle);
            sample_watches(&mut row, &s, engaged);
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "{:>5.0} s: {completed}/{n} rebooted, {waiting} waiting, {in_cycle} in a cycle, {passes} hand-overs, agents running {}, apiserver fds {}, test process fds {}, observer watch errors {errors}",
                t0.elapsed().as_secs_f64(),
                fleet.running(),
                row.apiserver.fds_peak,
                row.test_process.fds_peak,
            );
        }
        if completed >= n && free {
            row.finished = true;
            break;
        }
        if t0.elapsed() >= limit {
            row.note = format!(
                "stopped after {} s: {completed} of {n} rebooted, {waiting} still waiting",
                limit.as_secs()
            );
            break;
        }
    }
    row.rollout = t0.elapsed();
    let end = Scrape::take(&admin).await;
    row.apiserver.finish(api_pid);
    row.etcd.finish(etcd_pid);
    row.test_process.finish(me);
    row.kwok_cpu = kwok_pid.and_then(cpu_seconds).unwrap_or(0.0) - kwok_cpu;
    let agents_steady = audit.read();
    let timeline = observer.timeline.lock().unwrap_or_else(|e| e.into_inner());
    row.completed = timeline.completed.len();
    row.max_in_cycle = timeline.max_in_cycle;
    row.hand_overs = timeline.hand_overs();
    drop(timeline);
    row.metrics_whole = metric_counts(&end, &start);
    // Every request of the rollout (all users; the agents' are picked by user).
    let mut all_agents = agents_ramp;
    all_agents.extend(agents_steady.iter().cloned());
    row.agents_whole = audit_counts(&all_agents);
    row.requests_per_second = per_second(&all_agents, t0_wall);
    write_series(&row, t0);
    if let Some((s, passes)) = &steady {
        row.steady_from_pass = *passes;
        row.metrics_steady = metric_counts(&end, s);
        row.agents_steady = audit_counts(&agents_steady);
        row.node_reads_steady = node_reads(&agents_steady);
        row.steady_hand_overs = row.hand_overs.len().saturating_sub(*passes);
    } else {
        // Not every node queued up: the whole rollout stands in for the steady state.
        row.metrics_steady = row.metrics_whole.clone();
        row.agents_steady = row.agents_whole.clone();
        row.node_reads_steady = node_reads(&all_agents);
        row.steady_hand_overs = row.hand_overs.len();
        row.note
            .push_str("; not every node queued up: request counts over the whole rollout");
    }
    row.watch_events = end
        .delta_by(
            &start,
            "apiserver_watch_events_total",
            &["resource", "kind"],
            |_| true,
        )
        .into_iter()
        .map(|(k, v)| {
            (
                if k[0].is_empty() {
                    k[1].clone()
                } else {
                    k[0].clone()
                },
                v,
            )
        })
        .collect();
    row.lat_whole = Latency::between(&start, &end);
    row.lat_steady = Latency::between(steady.as_ref().map_or(&start, |(s, _)| s), &end);
    row.failures = failures(&all_agents);
    // kube-apiserver's own account: watchers it closed because they did not keep up, errors.
    let log = cp.log("kube-apiserver");
    let unresponsive = log
        .lines()
        .filter(|l| l.contains("due to unresponsiveness"))
        .count();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with('E') && !l.contains("The manifest file is empty"))
        .collect();
    let kept = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/real-k8s/bench-real-{n}-kube-apiserver.log"));
    let _ = std::fs::write(&kept, &log);
    row.apiserver_log = format!(
        "{unresponsive} watchers closed for unresponsiveness, {} error lines{}",
        errors.len(),
        errors
            .first()
            .map(|e| format!(" (first: `{}`)", e.chars().take(200).collect::<String>()))
            .unwrap_or_default()
    );
    eprintln!(
        "  kube-apiserver log (kept in {}): {}",
        kept.display(),
        row.apiserver_log
    );
    print_row(&row);
    drop(fleet);
    drop(observer);
    drop(cp);
    row
}

async fn wait(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn lease_writes(c: &Counts) -> f64 {
    count(c, |v, r, code| {
        r == "leases" && is_write(v) && code.starts_with('2')
    })
}

fn conflicts(c: &Counts, resource: Option<&str>) -> f64 {
    count(c, |_, r, code| code == "409" && resource.is_none_or(|x| x == r))
}

fn writes(c: &Counts) -> f64 {
    count(c, |v, r, _| is_write(v) && r != "events")
}

fn print_row(r: &Row) {
    let lat = r.latencies(0);
    let half = r.latencies(r.nodes / 2);
    eprintln!(
        "--- {} nodes: {} ---",
        r.nodes,
        if r.finished { "completed" } else { &r.note }
    );
    eprintln!(
        "rollout {:.1} s, {} rebooted, sentinels set within {:?}; {} hand-overs measured; hand-over (hand-off write → next cordon) p50 {} p99 {} max {}; with ≥ {} waiting: p50 {} p99 {} ({} hand-overs)",
        r.rollout.as_secs_f64(),
        r.completed,
        r.sentinel_spread,
        lat.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(lat.last().copied()),
        r.nodes / 2,
        ms(pct(&half, 0.5)),
        ms(pct(&half, 0.99)),
        half.len(),
    );
    let phase = |f: &dyn Fn(&HandOver) -> Option<f64>| {
        let v = sorted(r.hand_overs.iter().filter_map(f).collect());
        format!("p50 {} p99 {}", ms(pct(&v, 0.5)), ms(pct(&v, 0.99)))
    };
    eprintln!(
        "  concurrency {}, at most {} nodes in a cycle at once; {}",
        r.concurrency,
        r.max_in_cycle,
        burst_summary(r)
    );
    eprintln!(
        "  phases: holder's uncordon → hand-off write {}; hand-off write → claim {}",
        phase(&|h| h.end_to_write),
        phase(&|h| h.write_to_claim),
    );
    let h = r.steady_hand_overs;
    eprintln!(
        "  steady state ({h} hand-overs), apiserver_request_total per hand-over: lease writes {}, 409 {} (leases {}), writes w/o events {}; {}",
        per(lease_writes(&r.metrics_steady), h),
        per(conflicts(&r.metrics_steady, None), h),
        per(conflicts(&r.metrics_steady, Some("leases")), h),
        per(writes(&r.metrics_steady), h),
        breakdown(&r.metrics_steady, h)
    );
    eprintln!(
        "  steady state, the agents' own requests (audit) per hand-over: lease writes {}, 409 {}, writes w/o events {}; {}",
        per(lease_writes(&r.agents_steady), h),
        per(conflicts(&r.agents_steady, None), h),
        per(writes(&r.agents_steady), h),
        breakdown(&r.agents_steady, h)
    );
    let hw = r.hand_overs.len();
    eprintln!(
        "  whole rollout ({hw} hand-overs) per hand-over: lease writes {}, 409 {}; agents: {}",
        per(lease_writes(&r.metrics_whole), hw),
        per(conflicts(&r.metrics_whole, None), hw),
        breakdown(&r.agents_whole, hw)
    );
    if let Some((engaged, held, by)) = &r.watch_sample {
        eprintln!(
            "  watches held: {held:.0} more than before the rollout with {engaged} agents engaged = {} per engaged agent; by resource {by:?}",
            per(*held, *engaged)
        );
    }
    eprintln!("  watch events sent over the rollout: {:?}", r.watch_events);
    eprintln!(
        "  the agents' Node lists and watches by purpose, steady state, per hand-over: {}",
        r.node_reads_steady
            .iter()
            .map(|(k, v)| format!("{k} {}", per(*v, h)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for f in &r.failures {
        eprintln!("  failed: {f}");
    }
    for (what, lat) in [("steady state", &r.lat_steady), ("whole rollout", &r.lat_whole)] {
        let [lease, patch, list, all] = lat.show(true);
        eprintln!(
            "  apiserver p99 ({what}): update leases {lease}, patch nodes {patch}, list nodes {list}, all non-watch {all}"
        );
    }
    eprintln!(
        "  CPU s over the rollout: kube-apiserver {:.1}, etcd {:.1}, test process (agents) {:.1}, kwok {:.1}; RSS peak: kube-apiserver {} MiB, etcd {} MiB, test process {} MiB; fds peak: kube-apiserver {}, test process {}",
        r.apiserver.cpu(),
        r.etcd.cpu(),
        r.test_process.cpu(),
        r.kwok_cpu,
        r.apiserver.rss_peak_kib / 1024,
        r.etcd.rss_peak_kib / 1024,
        r.test_process.rss_peak_kib / 1024,
        r.apiserver.fds_peak,
        r.test_process.fds_peak,
    );
}

/// The burst in words: the peak requests per second in the first [`BURST_SECS`] after the
/// sentinels (all clients, and the agents' at that second) and the p99 latency over them.
fn burst_summary(r: &Row) -> String {
    let peak = r
        .requests_per_second
        .iter()
        .take(BURST_SECS as usize)
        .max_by_key(|(_, all, _)| *all);
    let [lease, patch, list, all] = r.lat_burst.show(false);
    match peak {
        Some((s, all_req, agents)) => format!(
            "burst (first {BURST_SECS} s): peak {all_req} requests/s ({agents} of them the agents') in second {s}; p99 update leases {lease}, patch nodes {patch}, list nodes {list}, all but watches {all}"
        ),
        None => format!("burst: no audited request in the first {BURST_SECS} s"),
    }
}

/// The CPU model and the number of cores, for a benchmark's header.
fn machine() -> (String, usize) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    (cpu, std::thread::available_parallelism().map_or(0, |n| n.get()))
}

fn markdown(rows: &[Row], reboot: Duration, nofile: u64) -> String {
    let (cpu, cores) = machine();
    let sizes: Vec<String> = rows.iter().map(|r| r.nodes.to_string()).collect();
    let mut md = String::new();
    let _ = writeln!(md, "{SECTION} (KWOK Nodes, in-process agents)\n");
    let _ = writeln!(
        md,
        "Measured by `KREBOOT_BENCH_NODES={} cargo test --release --test bench_real -- --ignored --nocapture` on {cpu} ({cores} cores), {}; {}, {}, KWOK v0.8.0. The machine was shared with other builds: the load average before each size is in the table.\n",
        sizes.join(","),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        first_line("kube-apiserver").replace("Kubernetes ", "kube-apiserver "),
        first_line("etcd").replace("etcd Version: ", "etcd "),
    );
    let _ = writeln!(
        md,
        "Per size a fresh control plane (`tests/common/real.rs`: etcd on tmpfs without fsync, RBAC, an audit log of every request written in blocking mode); N Ready KWOK Nodes without pods; N agents (`agent::run`) in the test process on 2 tokio worker threads, each with its own kube client, connections and static token (in `system:masters`, which API Priority and Fairness exempts), concurrency 1, open-file limit {nofile}. Every sentinel is set in one pass (well within a second). A reboot is the harness playing the machine: the agent task is aborted, the sentinel cleared, the Node's status gets a new bootID and NotReady, {} ms later Ready, and a new agent starts. Timestamps come from the benchmark's own watches of the Leases and Nodes (on a thread of its own), on arrival; request counts from kube-apiserver's `/metrics` (all clients: agents, the harness's kubelet writes, KWOK, kube-controller-manager) and, for the agents alone, from its audit log.\n",
        reboot.as_millis()
    );
    let _ = writeln!(
        md,
        "Hand-over = the previous holder's Lease write naming the next node (or clearing it) → that node's cordon (`kreboot.io/phase` appears). Targets: p99 < 250 ms with 100 waiting, < 1 s with 1,000.\n"
    );
    let _ = writeln!(
        md,
        "| nodes | load avg before | rebooted | rollout | per node | hand-overs | p50 | p99 | p99 while ≥ N/2 waited | uncordon → hand-off write p50 | hand-off write → claim p50 |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let lat = r.latencies(0);
        let half = r.latencies(r.nodes / 2);
        let p50 = |f: &dyn Fn(&HandOver) -> Option<f64>| {
            ms(pct(&sorted(r.hand_overs.iter().filter_map(f).collect()), 0.5))
        };
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {:.0} s | {:.2} s | {} | {} | {} | {} | {} | {} |",
            r.nodes,
            r.load,
            r.completed,
            if r.finished { "" } else { " (stopped)" },
            r.rollout.as_secs_f64(),
            r.rollout.as_secs_f64() / r.completed.max(1) as f64,
            lat.len(),
            ms(pct(&lat, 0.5)),
            ms(pct(&lat, 0.99)),
            ms(pct(&half, 0.99)),
            p50(&|h| h.end_to_write),
            p50(&|h| h.write_to_claim),
        );
    }
    let _ = writeln!(
        md,
        "\n### API requests per hand-over (kube-apiserver's `apiserver_request_total`)\n\nCounted from the moment every node had queued up to the end (the start-up race for the first, not yet existing Lease excluded; the whole rollout in the last column). Target: ≤ 3 API writes per hand-over with 1,000 waiting. Writes exclude Events.\n"
    );
    let _ = writeln!(
        md,
        "| nodes | hand-overs | Lease writes | 409 (all) | 409 on Leases | writes, all clients | writes, agents (audit) | the agents' requests (audit), per hand-over | Lease writes / 409, whole rollout |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let h = r.steady_hand_overs;
        let hw = r.hand_overs.len();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            r.nodes,
            h,
            per(lease_writes(&r.metrics_steady), h),
            per(conflicts(&r.metrics_steady, None), h),
            per(conflicts(&r.metrics_steady, Some("leases")), h),
            per(writes(&r.metrics_steady), h),
            per(writes(&r.agents_steady), h),
            breakdown(&r.agents_steady, h),
            per(lease_writes(&r.metrics_whole), hw),
            per(conflicts(&r.metrics_whole, None), hw),
        );
    }
    let _ = writeln!(md);
    for r in rows {
        let h = r.steady_hand_overs;
        let reads = r
            .node_reads_steady
            .iter()
            .map(|(k, v)| format!("{k} {}", per(*v, h)))
            .collect::<Vec<_>>()
            .join(", ");
        let failed = if r.failures.is_empty() {
            "none".to_owned()
        } else {
            r.failures.join("; ")
        };
        let _ = writeln!(
            md,
            "- {} nodes: concurrency {}, at most {} nodes in a cycle at once; {}. The agents' Node lists and watches per hand-over, by purpose: {reads}. Failed requests over the rollout (409 aside): {failed}. kube-apiserver's log: {}.",
            r.nodes,
            r.concurrency,
            r.max_in_cycle,
            burst_summary(r),
            r.apiserver_log
        );
    }
    let _ = writeln!(
        md,
        "\n### Watches, server latency, CPU and memory over the rollout\n\nWatches held: `apiserver_longrunning_requests{{verb=\"WATCH\"}}` minus its value before the rollout, sampled when every node had queued and every 10 s after; the sample with the most agents engaged (waiting or in a cycle) is shown. Watch events: `apiserver_watch_events_total` over the rollout, i.e. the fan-out of every write to every watcher. Request latency p99 from `apiserver_request_duration_seconds` buckets (interpolated) over the steady state (over the whole rollout, start-up burst included, in parentheses).\n"
    );
    let _ = writeln!(
        md,
        "| nodes | watches per engaged agent | watch events sent per hand-over | p99 update lease | p99 patch node | p99 list nodes | p99 all but watches | CPU s kube-apiserver / etcd / agents' process | CPU ms per hand-over, same order | peak RSS kube-apiserver / etcd / agents' process |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let watches = match &r.watch_sample {
            Some((engaged, held, by)) => format!(
                "{} ({held:.0} with {engaged} engaged: {})",
                per(*held, *engaged),
                by.iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "–".into(),
        };
        let events = r
            .watch_events
            .iter()
            .filter(|(_, v)| **v >= 0.5 * r.hand_overs.len() as f64)
            .map(|(k, v)| format!("{k} {}", per(*v, r.hand_overs.len())))
            .collect::<Vec<_>>()
            .join(", ");
        let steady = r.lat_steady.show(false);
        let whole = r.lat_whole.show(false);
        let l = |i: usize| format!("{} ({})", steady[i], whole[i]);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} / {:.0} / {:.0} | {} / {} / {} | {} / {} / {} MiB |",
            r.nodes,
            watches,
            events,
            l(0),
            l(1),
            l(2),
            l(3),
            r.apiserver.cpu(),
            r.etcd.cpu(),
            r.test_process.cpu(),
            per(r.apiserver.cpu() * 1000.0, r.hand_overs.len()),
            per(r.etcd.cpu() * 1000.0, r.hand_overs.len()),
            per(r.test_process.cpu() * 1000.0, r.hand_overs.len()),
            r.apiserver.rss_peak_kib / 1024,
            r.etcd.rss_peak_kib / 1024,
            r.test_process.rss_peak_kib / 1024,
        );
    }
    let _ = writeln!(
        md,
        "\n### Idle agents on the real kube-apiserver\n\nN agents started without a sentinel; requests counted after every agent reported `idle`. KWOK and kube-controller-manager run as `kreboot-test-admin`; `system:apiserver` is kube-apiserver itself.\n"
    );
    let _ = writeln!(
        md,
        "| nodes | agents' requests at start-up (audit) | agents' requests while idle (audit) | all clients while idle (`apiserver_request_total`) |"
    );
    let _ = writeln!(md, "|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} in {} s | {:.0} in {} s{} |",
            r.nodes,
            r.startup_requests,
            r.idle_agent_requests,
            r.idle_secs,
            r.idle_all_requests,
            r.idle_secs,
            if r.idle_all_breakdown.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}; by client (audit): {}",
                    r.idle_all_breakdown, r.idle_by_client
                )
            },
        );
    }
    md
}

/// Replaces (or appends) this benchmark's section of BENCHMARKS.md, keeping every other one.
fn write_section(md: &str) {
    write_named_section(SECTION, md);
}

/// Replaces (or appends) the section of BENCHMARKS.md whose heading starts with `section`.
fn write_named_section(section: &str, md: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new = match old.find(section) {
        Some(start) => {
            let rest = &old[start + section.len()..];
            let end = rest
                .find("\n## ")
                .map_or(old.len(), |i| start + section.len() + i + 1);
            format!("{}{md}{}", &old[..start], &old[end..])
        }
        None => format!("{}\n{md}", old.trim_end_matches('\n').to_owned() + "\n"),
    };
    if let Err(e) = std::fs::write(&path, new) {
        eprintln!("cannot write {}: {e}", path.display());
    } else {
        eprintln!("wrote the section to {}", path.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn lock_hand_over_on_the_real_kube_apiserver() {
    let sizes: Vec<usize> = std::env::var("KREBOOT_BENCH_NODES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reboot = Duration::from_millis(env_or("KREBOOT_BENCH_REBOOT_MS", 200));
    let idle_secs = env_or("KREBOOT_BENCH_IDLE_SECS", 60);
    let limit = Duration::from_secs(env_or("KREBOOT_BENCH_LIMIT_SECS", 600));
    // Several connections per agent, both ends on this machine; the components inherit it.
    let nofile = raise_nofile(1 << 20);
    eprintln!("open-file limit {nofile}; sizes {sizes:?}");
    let mut rows = Vec::new();
    for n in sizes {
        rows.push(run_size(n, reboot, idle_secs, limit).await);
    }
    let md = markdown(&rows, reboot, nofile);
    println!("\n{md}");
    if std::env::var("KREBOOT_BENCH_WRITE").as_deref() != Ok("0") {
        write_section(&md);
    }
}

/// BENCHMARKS.md's section of the kured-like poller on the real server.
const POLLER_SECTION: &str = "## kured-like poller on the real kube-apiserver";

/// One size of the kured-like poller: N waiters, each with its own client, read the lock Lease
/// once per `period` (each at its own random phase, as N kured pods started at different times)
/// and take it when free. Each sample frees the lock and times how long until a waiter holds it.
struct PollerRow {
    waiters: usize,
    period: Duration,
    latencies: Vec<f64>,
    lease_reads_per_s: f64,
    conflicts_per_handover: f64,
}

async fn poller_size(waiters: usize, period: Duration, samples: usize) -> PollerRow {
    use k8s_openapi::api::coordination::v1::Lease;
    use rand::{RngExt, SeedableRng, rngs::StdRng};
    let cp = ControlPlane::start(real::Options::default()).await;
    let admin = cp.admin_client();
    let _ = Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap(),
        )
        .await;
    let api: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let lease: Lease = serde_json::from_value(serde_json::json!({
        "metadata": {"name": kured_like::LOCK},
        "spec": {"holderIdentity": "bench"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &lease)
        .await
        .expect("create the lock");
    let taken = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut rng = StdRng::seed_from_u64(42);
    let mut tasks = Vec::new();
    for i in 0..waiters {
        // Its own client, connections and all, as a kured pod on its own node has.
        let api: Api<Lease> = Api::namespaced(cp.admin_client(), NS);
        let phase = period.mul_f64(rng.random::<f64>());
        let taken = taken.clone();
        // The read-modify-write on the version read: a second taker gets 409.
        tasks.push(tokio::spawn(kured_like::poll_lock(
            api,
            format!("waiter-{i}"),
            phase,
            period,
            taken,
        )));
    }
    // Every poller past its first phase; then one whole period with nobody else asking: the
    // pollers' steady read rate.
    tokio::time::sleep(period).await;
    let quiet_start = Scrape::take(&admin).await;
    let quiet = Instant::now();
    tokio::time::sleep(period).await;
    let quiet_end = Scrape::take(&admin).await;
    let quiet_secs = quiet.elapsed().as_secs_f64();
    let before = Scrape::take(&admin).await;
    let mut latencies = Vec::new();
    for _ in 0..samples {
        let mut l = api.get(kured_like::LOCK).await.expect("read the lock");
        if let Some(s) = l.spec.as_mut() {
            s.holder_identity = None;
        }
        api.replace(kured_like::LOCK, &PostParams::default(), &l)
            .await
            .expect("free the lock");
        let t = Instant::now();
        if tokio::time::timeout(period * 3, taken.notified()).await.is_err() {
            eprintln!("{waiters} pollers: nobody took the lock within {:?}", period * 3);
            break;
        }
        latencies.push(t.elapsed().as_secs_f64());
    }
    let after = Scrape::take(&admin).await;
    for t in tasks {
        t.abort();
    }
    let leases = |from: &Scrape, to: &Scrape, verb: &'static str, code: Option<&'static str>| {
        let keep = move |l: &BTreeMap<String, String>| {
            l.get("resource").map(String::as_str) == Some("leases")
                && l.get("verb").map(String::as_str) == Some(verb)
                && code.is_none_or(|c| l.get("code").map(String::as_str) == Some(c))
        };
        to.sum("apiserver_request_total", keep) - from.sum("apiserver_request_total", keep)
    };
    let handovers = latencies.len().max(1) as f64;
    PollerRow {
        waiters,
        period,
        latencies: sorted(latencies),
        lease_reads_per_s: leases(&quiet_start, &quiet_end, "GET", None) / quiet_secs,
        conflicts_per_handover: leases(&before, &after, "PUT", Some("409")) / handovers,
    }
}

/// Seconds as milliseconds below 10 s, as seconds above.
fn span(secs: f64) -> String {
    if secs < 10.0 {
        ms(Some(secs))
    } else {
        format!("{secs:.0} s")
    }
}

fn poller_markdown(rows: &[PollerRow], samples: usize) -> String {
    let mut md = String::new();
    let (cpu, cores) = machine();
    let _ = writeln!(
        md,
        "{POLLER_SECTION} (the baseline)\n\nMeasured by `cargo test --test bench_real kured_like -- --ignored --nocapture` (a debug build: a poller's own work is one GET a period; kube-apiserver is the same compiled binary either way) (`KREBOOT_BENCH_POLLER_NODES`, default `100,1000`; `KREBOOT_BENCH_POLLER_PERIOD_SECS`, default 10) on {cpu} ({cores} cores), {}; {}.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        first_line("kube-apiserver").replace("Kubernetes ", "kube-apiserver "),
    );
    let _ = writeln!(
        md,
        "What kured does while a node waits for its lock, on the same real kube-apiserver as kreboot's rows above: each waiting node reads the lock once per `--period` at its own phase and writes it when it finds it free (a read-modify-write: a second taker in the same moment gets 409). Per size a fresh control plane, N pollers each with its own client, {samples} hand-overs: the lock is freed and the time until a poller holds it is taken. Expected, for N pollers at uniformly spread phases: the first read after the release comes after period / (N + 1) on average, and the lock is read N / period times a second whether or not anyone waits for it to change. The 1-hour rows (kured's default `--period`) are that formula, checked against the measured rows at the short period; they are not measured (one sample would take up to an hour).\n"
    );
    let _ = writeln!(
        md,
        "| waiting nodes | period | hand-over p50 | p99 | expected mean period/(N+1) | measured mean | lock reads/s (over one period, no hand-over) | 409 per hand-over |\n|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        let mean = r.latencies.iter().sum::<f64>() / r.latencies.len().max(1) as f64;
        let p = r.period.as_secs_f64();
        let _ = writeln!(
            md,
            "| {} | {} s | {} | {} | {} | {} | {:.1} | {:.2} |",
            r.waiters,
            p,
            ms(pct(&r.latencies, 0.5)),
            ms(pct(&r.latencies, 0.99)),
            span(p / (r.waiters as f64 + 1.0)),
            span(mean),
            r.lease_reads_per_s,
            r.conflicts_per_handover
        );
    }
    for r in rows {
        let hour = 3600.0;
        let _ = writeln!(
            md,
            "| {} | 3600 s (kured's default; computed) | | | {} | | {:.2} | |",
            r.waiters,
            span(hour / (r.waiters as f64 + 1.0)),
            r.waiters as f64 / hour
        );
    }
    let _ = writeln!(
        md,
        "\nThe poller's hand-over is fast only because many pollers share the period: the last node of a rollout waits alone and gets the lock up to one whole period (1 h) after it is freed, and every waiting node reads the lock all night. kreboot's waiters make no request while they wait (they hold a watch) and the holder hands the lock to the longest waiter by name."
    );
    md
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn kured_like_poller_on_the_real_kube_apiserver() {
    let sizes: Vec<usize> = std::env::var("KREBOOT_BENCH_POLLER_NODES")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let period = Duration::from_secs(env_or("KREBOOT_BENCH_POLLER_PERIOD_SECS", 10));
    let samples = env_or("KREBOOT_BENCH_POLLER_SAMPLES", 10);
    raise_nofile(1 << 20);
    let mut rows = Vec::new();
    for n in sizes {
        eprintln!("=== kured-like poller: {n} waiters, period {period:?} ===");
        let row = poller_size(n, period, samples).await;
        assert!(
            !row.latencies.is_empty(),
            "no hand-over measured with {n} pollers"
        );
        rows.push(row);
    }
    let md = poller_markdown(&rows, samples);
    println!("\n{md}");
    if std::env::var("KREBOOT_BENCH_WRITE").as_deref() != Ok("0") {
        write_named_section(POLLER_SECTION, &md);
    }
}
