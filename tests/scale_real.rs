//! A short scale run on the real control plane: `KREBOOT_SCALE_NODES` (default 200) KWOK Nodes
//! behind a real kube-apiserver, one in-process agent per node with its own client and token
//! (`tests/common/real_fleet.rs`), concurrency nodes/50, every sentinel set in the same pass.
//!
//! It fails if the lock's promise breaks at scale: never more nodes cordoned (by anyone) or in
//! a cycle than the concurrency, checked on every Node event by an observer with its own
//! client; every node rebooted exactly once; nothing left cordoned or waiting. It prints how
//! long the rollout took and the hand-over latencies, but asserts nothing about time beyond a
//! generous limit for the whole run (a rollout that stalls fails).

mod common;

use std::time::{Duration, Instant};

use common::real_fleet::{Observer, RealFleet, create_nodes, fleet_control_plane, raise_nofile};

const NS: &str = "kube-system";

/// The whole rollout must end within this; far beyond what it takes (about 2 minutes for 200
/// nodes on 2 cores), so only a stall fails it.
const LIMIT: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kwok_nodes_roll_within_the_concurrency_on_the_real_kube_apiserver() {
    let n: usize = std::env::var("KREBOOT_SCALE_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let concurrency = (n / 50).max(1);
    raise_nofile(20_000);
    let names: Vec<String> = (0..n).map(|i| format!("node-{i:04}")).collect();
    let cp = fleet_control_plane(&names, NS).await;
    let admin = cp.admin_client();
    create_nodes(&admin, &names, 16).await;
    let observer = Observer::start(&cp, NS);
    common::wait_until(Duration::from_secs(120), "the observer lists every Node", || {
        let listed = observer.with(|t| t.nodes) >= n;
        async move { listed }
    })
    .await;

    let fleet = RealFleet::new(&cp, &names, Duration::from_millis(200), |c| {
        c.concurrency = concurrency as u32;
    });
    fleet.start_all();
    common::wait_until(Duration::from_secs(300), "every agent idle", || {
        let idle = fleet.in_state("idle") >= n;
        async move { idle }
    })
    .await;

    let started = Instant::now();
    fleet.require_reboot_all();
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (completed, waiting, in_cycle, cordoned, max_in_cycle, max_cordoned, free) = observer.with(|t| {
            (
                t.completed.len(),
                t.waiting,
                t.in_cycle,
                t.cordoned,
                t.max_in_cycle,
                t.max_cordoned,
                t.holders.is_empty(),
            )
        });
        assert!(
            max_in_cycle <= concurrency && max_cordoned <= concurrency,
            "{max_in_cycle} nodes in a cycle and {max_cordoned} cordoned at once, with concurrency {concurrency}"
        );
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            eprintln!(
                "{:>4.0} s: {completed}/{n} rebooted, {waiting} waiting, {in_cycle} in a cycle, {cordoned} cordoned",
                started.elapsed().as_secs_f64()
            );
        }
        if completed >= n && free && cordoned == 0 && waiting == 0 {
            break;
        }
        assert!(
            started.elapsed() < LIMIT,
            "the rollout stalled: {completed} of {n} rebooted after {LIMIT:?} ({waiting} waiting, {in_cycle} in a cycle)"
        );
    }
    let rollout = started.elapsed();
    let once: Vec<(String, u32)> = names
        .iter()
        .map(|name| (name.clone(), fleet.reboots_of(name)))
        .filter(|(_, r)| *r != 1)
        .collect();
    assert!(once.is_empty(), "nodes not rebooted exactly once: {once:?}");
    let (max_in_cycle, max_cordoned, events, hand_overs) =
        observer.with(|t| (t.max_in_cycle, t.max_cordoned, t.events, t.hand_overs()));
    let mut latencies: Vec<f64> = hand_overs.iter().map(|h| h.write_to_cordon).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .map_or("–".to_owned(), |v| format!("{:.0} ms", v * 1000.0))
    };
    let summary = format!(
        "scale_real: {n} KWOK nodes, concurrency {concurrency}: every node rebooted once in {:.1} s; at most {max_in_cycle} in a cycle and {max_cordoned} cordoned at once (checked on {events} watch events); {} hand-overs, p50 {} p99 {}",
        rollout.as_secs_f64(),
        latencies.len(),
        pct(0.5),
        pct(0.99),
    );
    println!("{summary}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("scale_real-summary.txt"), format!("{summary}\n"));
}
