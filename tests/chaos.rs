//! Chaos: many real agents on the simulated cluster while faults rain on them, with the safety
//! invariant checked after every step.
//!
//! Faults: agents killed at random points and restarted (and some stopped with SIGTERM), API
//! 5xx and 409 answers, latency, dropped watches, lock holders kept down past the lease TTL,
//! a lock holder's Node deleted, clocks skewed by ±30 s on some agents, maintenance windows that
//! open and close every minute.
//!
//! Invariants, after every step: never more nodes out of service than the concurrency; an
//! administrator-cordoned node is never uncordoned; no reboot outside a window (on the rebooting
//! agent's own clock); no reboot that was not needed. At the end: every reboot request was
//! served by exactly one reboot, and no node is left cordoned by kreboot.
//!
//! Seeded and reproducible as far as the interleaving of real tasks allows: the seed is printed
//! and `KREBOOT_CHAOS_SEED=<seed>` replays its sequence of faults. The short version runs in CI;
//! the long one (at least 10,000 injected faults) is
//! `KREBOOT_CHAOS_FAULTS=10000 KREBOOT_CHAOS_NODES=12 cargo test --release --test chaos -- --nocapture`.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Timelike, Utc};
use common::*;
use kreboot::{
    node::{ANN_CORDONED_BY_KREBOOT, ANN_PHASE},
    policy::Policy,
};
use kreboot_testkit::sim::{self, Faults, SimCluster, SimConfig, SimEvent, fleet::Fleet};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Windows open in even minutes (UTC), closed in odd ones.
fn alternating_policy() -> String {
    let mut doc = String::from("timezone: UTC\nwindows:\n");
    for m in (0..1440).step_by(2) {
        let (h, mm) = (m / 60, m % 60);
        let end = if m + 1 == 1440 {
            "24:00".to_owned()
        } else {
            format!("{:02}:{:02}", (m + 1) / 60, (m + 1) % 60)
        };
        doc.push_str(&format!(
            "  - days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"{h:02}:{mm:02}\"\n    end: \"{end}\"\n"
        ));
    }
    doc
}

#[derive(Default)]
struct Ledger {
    /// Per node: a reboot was requested and not yet served.
    pending: BTreeMap<String, bool>,
    requested: BTreeMap<String, u32>,
    rebooted: BTreeMap<String, u32>,
    violations: Vec<String>,
}

fn is_out(n: &k8s_openapi::api::core::v1::Node) -> bool {
    let v = kreboot::node::view(n);
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    ann.contains_key(ANN_PHASE)
        || !v.ready
        || (v.unschedulable && ann.get(ANN_CORDONED_BY_KREBOOT).map(String::as_str) == Some("true"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_invariant_under_chaos() {
    let seed: u64 = env_or("KREBOOT_CHAOS_SEED", rand::random::<u64>() % 1_000_000);
    let nodes: usize = env_or("KREBOOT_CHAOS_NODES", 8);
    let concurrency: u32 = env_or("KREBOOT_CHAOS_CONCURRENCY", 2);
    let target_faults: u64 = env_or("KREBOOT_CHAOS_FAULTS", 800);
    let limit = Duration::from_secs(env_or("KREBOOT_CHAOS_SECONDS", 240));
    eprintln!(
        "chaos: seed {seed}, {nodes} nodes, concurrency {concurrency}, at least {target_faults} faults \
         (replay: KREBOOT_CHAOS_SEED={seed} cargo test --test chaos -- --nocapture)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let sim = SimCluster::start(SimConfig {
        reboot_duration: Duration::from_millis(300),
        bookmark_interval: Duration::from_secs(1),
        seed,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let policy_doc = alternating_policy();
    let policy = Policy::parse(&policy_doc).unwrap();
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([("config.yaml".to_string(), policy_doc)]),
    );

    let names = names(nodes);
    let mut skews = BTreeMap::new();
    let mut configs = Vec::new();
    for name in &names {
        sim.add_node(name, BTreeMap::new());
        for i in 0..2 {
            sim.add_pod(
                sim::pod("apps", &format!("{name}-app-{i}"), name)
                    .grace(1)
                    .shutdown_seconds(0.05)
                    .build(),
            );
        }
        sim.add_pod(
            sim::pod("kube-system", &format!("{name}-ds"), name)
                .daemonset()
                .build(),
        );
        let mut cfg = kreboot_testkit::sim::fleet::agent_config(name);
        cfg.concurrency = concurrency;
        cfg.lock_ttl = Duration::from_secs(4);
        cfg.drain_timeout = Duration::from_secs(5);
        cfg.failure_backoff = Duration::from_secs(1);
        cfg.reboot_loop_backoff = Duration::from_millis(500);
        cfg.eviction_retry = Duration::from_millis(100);
        configs.push(cfg);
    }
    // An administrator cordoned this one: it may reboot, but must stay cordoned.
    let admin = names[1].clone();
    sim.set_unschedulable(&admin, true);
    let fleet = Fleet::new(&sim, configs);
    for name in &names {
        let skew = match rng.random_range(0..4) {
            0 => chrono::Duration::seconds(30),
            1 => chrono::Duration::seconds(-30),
            _ => chrono::Duration::zero(),
        };
        fleet.set_clock_skew(name, skew);
        skews.insert(name.clone(), skew);
    }
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    {
        let mut l = ledger.lock().unwrap();
        for n in &names {
            l.pending.insert(n.clone(), false);
        }
    }

    // Reboots are checked as they happen.
    let mut events = sim.subscribe();
    let watcher_ledger = ledger.clone();
    let skews_for_events = skews.clone();
    let policy_for_events = policy.clone();
    let checker = tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if let SimEvent::RebootStarted { node } = ev {
                let now = Utc::now();
                let agent_now = now + skews_for_events.get(&node).copied().unwrap_or_default();
                let mut l = watcher_ledger.lock().unwrap();
                *l.rebooted.entry(node.clone()).or_default() += 1;
                if !l.pending.get(&node).copied().unwrap_or(false) {
                    l.violations
                        .push(format!("{node} rebooted at {now} without a pending request"));
                }
                l.pending.insert(node.clone(), false);
                // The agent checked its window an instant before: allow one second for the
                // request to reach the simulator.
                let none = BTreeMap::new();
                let open = |t: DateTime<Utc>| policy_for_events.is_open(&none, t);
                if !open(agent_now) && !open(agent_now - chrono::Duration::seconds(1)) {
                    l.violations.push(format!(
                        "{node} rebooted outside its window at {agent_now} (its clock; minute {})",
                        agent_now.minute()
                    ));
                }
            }
        }
    });

    sim.set_faults(Faults {
        error_rate: 0.08,
        conflict_rate: 0.05,
        latency: Duration::ZERO,
        jitter: Duration::from_millis(5),
        watch_drop_after: Some(Duration::from_secs(3)),
    });
    fleet.start_all();
    let started = Instant::now();
    let mut steps = 0u64;
    let mut deleted: Option<String> = None;
    let episodes_per_node: u32 = env_or("KREBOOT_CHAOS_EPISODES", 2);
    let mut max_out = 0;
    loop {
        steps += 1;
        let live: Vec<String> = names
            .iter()
            .filter(|n| Some(*n) != deleted.as_ref())
            .cloned()
            .collect();
        let pick = live[rng.random_range(0..live.len())].clone();
        match rng.random_range(0..100) {
            0..30 => {
                let mut l = ledger.lock().unwrap();
                let asked = l.requested.get(&pick).copied().unwrap_or(0);
                if !l.pending[&pick] && (asked < episodes_per_node || sim.faults_injected() < target_faults) {
                    l.pending.insert(pick.clone(), true);
                    *l.requested.entry(pick.clone()).or_default() += 1;
                    drop(l);
                    fleet.require_reboot(&pick);
                }
            }
            30..45 => {
                // Crash at whatever step it is in; restart like the DaemonSet (a node that is
                // down gets its agent back from the fleet when it is Ready again).
                fleet.kill(&pick);
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
                if node_ready(&sim, &pick) {
                    fleet.start(&pick);
                }
            }
            45..50 => {
                fleet.stop(&pick).await;
                if node_ready(&sim, &pick) {
                    fleet.start(&pick);
                }
            }
            50..52 => {
                // A lock holder down for longer than the lease TTL.
                let holder = sim
                    .leases("kube-system")
                    .into_iter()
                    .filter_map(|l| l.spec.and_then(|s| s.holder_identity))
                    .find(|h| live.contains(h));
                if let Some(h) = holder {
                    fleet.kill(&h);
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    if node_ready(&sim, &h) {
                        fleet.start(&h);
                    }
                }
            }
            52 if deleted.is_none() && steps > 50 => {
                // A lock holder's Node deleted (the node pool scaled down under it).
                let holder = sim
                    .leases("kube-system")
                    .into_iter()
                    .filter_map(|l| l.spec.and_then(|s| s.holder_identity))
                    .find(|h| live.contains(h) && *h != admin);
                if let Some(h) = holder {
                    fleet.kill(&h);
                    sim.delete_node(&h);
                    ledger.lock().unwrap().pending.insert(h.clone(), false);
                    eprintln!("chaos: deleted lock holder {h}");
                    deleted = Some(h);
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.random_range(10..80))).await,
        }

        // The invariant, after every step.
        let out: Vec<String> = live
            .iter()
            .filter(|n| sim.node(n).is_some_and(|node| is_out(&node)))
            .cloned()
            .collect();
        max_out = max_out.max(out.len());
        {
            let mut l = ledger.lock().unwrap();
            if out.len() > concurrency as usize {
                l.violations
                    .push(format!("step {steps}: {} nodes out at once: {out:?}", out.len()));
            }
            if !unschedulable(&sim, &admin) {
                l.violations.push(format!(
                    "step {steps}: the administrator's cordon on {admin} was lifted"
                ));
            }
            assert!(l.violations.is_empty(), "seed {seed}: {:#?}", l.violations);
        }

        let faults = sim.faults_injected();
        let all_requested = {
            let l = ledger.lock().unwrap();
            live.iter()
                .all(|n| l.requested.get(n).copied().unwrap_or(0) >= episodes_per_node)
        };
        if faults >= target_faults && all_requested {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "seed {seed}: chaos did not finish in {limit:?} ({faults} faults)"
        );
    }

    // Calm: no more faults; every outstanding request must be served.
    let faults = sim.faults_injected();
    sim.set_faults(Faults::default());
    fleet.start_all();
    let calm = Instant::now();
    loop {
        let done = {
            let l = ledger.lock().unwrap();
            l.pending.values().all(|p| !p)
        };
        let settled = names
            .iter()
            .filter(|n| Some(*n) != deleted.as_ref())
            .all(|n| sim.node(n).is_some_and(|node| !is_out(&node)));
        if done && settled {
            break;
        }
        assert!(
            calm.elapsed() < Duration::from_secs(120),
            "seed {seed}: requests still pending after the faults stopped: {:?}",
            ledger.lock().unwrap().pending
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = ledger.lock().unwrap();
    assert!(l.violations.is_empty(), "seed {seed}: {:#?}", l.violations);
    for n in names.iter().filter(|n| Some(*n) != deleted.as_ref()) {
        assert_eq!(
            l.rebooted.get(n).copied().unwrap_or(0),
            l.requested.get(n).copied().unwrap_or(0),
            "seed {seed}: {n} was not rebooted exactly once per request"
        );
        let ann = sim.node(n).unwrap().metadata.annotations.unwrap_or_default();
        assert!(!ann.contains_key(ANN_PHASE), "seed {seed}: {n} left mid-cycle");
        if *n != admin {
            assert!(!unschedulable(&sim, n), "seed {seed}: {n} left cordoned");
        }
    }
    assert!(unschedulable(&sim, &admin));
    let reboots: u32 = l.rebooted.values().sum();
    eprintln!(
        "chaos: seed {seed}: {steps} steps, {faults} faults injected, {reboots} reboots, at most {max_out} out at once, \
         {:.1}s",
        started.elapsed().as_secs_f64()
    );
    checker.abort();
    drop(fleet);
}
