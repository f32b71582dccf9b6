//! `kreboot-demo` (`cargo demo`): a rolling reboot of a simulated cluster, shown as it happens.
//!
//! Starts the simulated cluster in-process, gives every node a few application pods and a
//! DaemonSet pod, marks every node as needing a reboot, runs one real agent per node against
//! the simulator over HTTP, and prints each node's progress from a watch of the Nodes (as an
//! operator with kubectl would see it), ending with a summary.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

use super::{SimCluster, SimConfig, fleet::Fleet};
use clap::Parser;
use kreboot::{
    cli::parse_duration,
    node::{self, ANN_LAST_REBOOT, Phase},
};

/// Flags of `kreboot-demo`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "kreboot-demo",
    version,
    about = "Run a rolling reboot of a simulated cluster in-process and show it as it happens"
)]
pub struct DemoArgs {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub nodes: u32,
    /// Nodes rebooted at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5000))]
    pub concurrency: u32,
    /// How long a simulated reboot takes.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub reboot_duration: Duration,
    /// Application pods per node.
    #[arg(long, default_value_t = 4)]
    pub pods_per_node: u32,
}

/// What the demo shows of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Shown {
    Waiting,
    Draining { we_cordoned: bool },
    Rebooting,
    Down,
    BackUp,
    Done,
}

fn shown(n: &Node) -> Shown {
    let v = node::view(n);
    match (v.recorded.phase, v.ready) {
        (_, false) => Shown::Down,
        (Phase::Draining, true) => Shown::Draining {
            we_cordoned: v.recorded.cordoned_by_kreboot,
        },
        (Phase::Rebooting, true) if v.recorded.pre_reboot_boot_id.as_deref() != Some(v.boot_id.as_str()) => {
            Shown::BackUp
        }
        (Phase::Rebooting, true) => Shown::Rebooting,
        (Phase::Verifying, true) => Shown::BackUp,
        (Phase::Idle, true)
            if n.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(ANN_LAST_REBOOT)) =>
        {
            Shown::Done
        }
        (Phase::Idle, true) => Shown::Waiting,
    }
}

/// Runs the demo.
///
/// # Errors
/// When the simulator cannot start or the rollout does not finish in time.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let count = args.nodes as usize;
    let sim = SimCluster::start(SimConfig {
        reboot_duration: args.reboot_duration,
        ..SimConfig::default()
    })
    .await
    .context("starting the simulated cluster")?;
    let width = count.to_string().len().max(2);
    let names: Vec<String> = (1..=count).map(|i| format!("node-{i:0width$}")).collect();
    let mut configs = Vec::new();
    for name in &names {
        sim.add_node(name, BTreeMap::new());
        for p in 0..args.pods_per_node {
            sim.add_pod(
                super::pod("apps", &format!("{name}-web-{p}"), name)
                    .labels([("app", "web")])
                    .grace(30)
                    .shutdown_seconds(0.3)
                    .build(),
            );
        }
        sim.add_pod(
            super::pod("kube-system", &format!("{name}-kreboot"), name)
                .daemonset()
                .build(),
        );
        let mut cfg = super::fleet::agent_config(name);
        cfg.concurrency = args.concurrency;
        cfg.lock_ttl = Duration::from_secs(300);
        configs.push(cfg);
    }
    println!(
        "kreboot demo: {count} simulated nodes, concurrency {}, reboot takes {}, {} pods per node",
        args.concurrency,
        humantime::format_duration(args.reboot_duration),
        args.pods_per_node
    );
    println!("simulated API server at {}\n", sim.url());

    let fleet = Fleet::new(&sim, configs);
    fleet.start_all();
    let started = Instant::now();
    for n in &names {
        fleet.require_reboot(n);
    }

    let api: Api<Node> = Api::all(sim.client().await);
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(stream);
    let mut state: BTreeMap<String, Shown> = BTreeMap::new();
    let mut out: BTreeSet<String> = BTreeSet::new();
    let mut max_out = 0;
    let limit = Duration::from_secs(30)
        + (args.reboot_duration + Duration::from_secs(3)) * (args.nodes.div_ceil(args.concurrency));
    let deadline = tokio::time::Instant::now() + limit;
    while state.values().filter(|s| **s == Shown::Done).count() < count {
        let next = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| anyhow::anyhow!("the rollout did not finish within {limit:?}"))?;
        let Some(item) = next else {
            anyhow::bail!("the watch of Nodes ended")
        };
        let n = match item {
            Ok(n) => n,
            Err(e) => {
                eprintln!("watch error (retrying): {e}");
                continue;
            }
        };
        let name = n.metadata.name.clone().unwrap_or_default();
        let now = shown(&n);
        if state.get(&name) == Some(&now) {
            continue;
        }
        let t = started.elapsed().as_secs_f64();
        let line = match &now {
            Shown::Waiting => None,
            Shown::Draining { we_cordoned: true } => Some("cordoned, draining (lock taken)".to_owned()),
            Shown::Draining { we_cordoned: false } => {
                Some("draining (already cordoned by an admin)".to_owned())
            }
            Shown::Rebooting => Some("drained, rebooting".to_owned()),
            Shown::Down => Some("down (NotReady)".to_owned()),
            Shown::BackUp => Some("back up with a new boot id".to_owned()),
            Shown::Done => Some("uncordoned, lock released".to_owned()),
        };
        if let Some(line) = line {
            println!("[{t:7.2}s] {name:<12} {line}");
        }
        if matches!(now, Shown::Waiting | Shown::Done) {
            out.remove(&name);
        } else {
            out.insert(name.clone());
        }
        max_out = max_out.max(out.len());
        state.insert(name, now);
    }
    let wall = started.elapsed();
    let counts = sim.request_counts();
    println!(
        "\nsummary: {count} nodes rebooted in {:.1}s; at most {max_out} out at once (concurrency {}); {} API requests",
        wall.as_secs_f64(),
        args.concurrency,
        counts.total()
    );
    // Stop the agents and send their last Events before the server goes: the demo ends clean.
    fleet.shutdown(Duration::from_secs(5)).await;
    drop(fleet);
    sim.shutdown().await;
    Ok(())
}
