//! A fleet of real kreboot agents, one per simulated node, supervised like a DaemonSet.
//!
//! Each agent is the production [`agent::run`] with its own kube-rs client calling the simulated
//! cluster's HTTP application in memory ([`SimCluster::in_memory_client`]: the same handler,
//! faults and request counting as over TCP, without a socket, so the fleet's size is not bound
//! by the process's file descriptors). What the harness supplies is only what a real host would: the sentinel
//! (a channel standing in for the inotify watch, so thousands of agents fit in one process —
//! the inotify path itself is tested on its own), and the reboot: the agent's rebooter asks the
//! simulator to reboot the node; when the simulator reports that the node went down, the
//! harness kills the agent (as the machine's death would) and clears the sentinel (it lives on
//! a tmpfs); when the node is Ready again, the harness starts a new agent, as the DaemonSet
//! would.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::{SimCluster, SimEvent};
use kreboot::{
    agent::{self, Agent, Clock},
    cli::AgentConfig,
    events::Events,
    metrics::Metrics,
    notify::Notifier,
    reboot::{RebootError, Rebooter},
    sentinel::SentinelState,
};

/// Asks the simulator to reboot one node.
struct SimRebooter {
    sim: SimCluster,
    node: String,
}

impl Rebooter for SimRebooter {
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>> {
        Box::pin(async move {
            self.sim.reboot_node(&self.node);
            Ok(())
        })
    }
}

/// The default agent settings for a simulated node (short timers so tests run quickly).
pub fn agent_config(node: &str) -> AgentConfig {
    AgentConfig {
        node_name: node.to_owned(),
        namespace: "kube-system".into(),
        config_map: "kreboot-config".into(),
        lock_name: "kreboot-lock".into(),
        concurrency: 1,
        sentinel_file: "/var/run/reboot-required".into(),
        reboot_command: vec!["simulated".into()],
        reboot_method: kreboot::reboot::RebootMethod::Command,
        sentinel_command: None,
        sentinel_command_invert: false,
        kernel_check: false,
        check_interval: Duration::from_secs(300),
        host_namespaces: false,
        host_pid: 1,
        drain_timeout: Duration::from_secs(60),
        drain_grace_period: None,
        force_reboot: false,
        lock_ttl: Duration::from_secs(60),
        reboot_delay: Duration::ZERO,
        metrics_addr: None,
        dry_run: false,
        reboot_loop_backoff: Duration::from_secs(600),
        failure_backoff: Duration::from_secs(600),
        eviction_retry: Duration::from_millis(200),
        notify: kreboot::notify::NotifyConfig::default(),
        blockers: kreboot::blockers::BlockerConfig {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
        pre_reboot_labels: Default::default(),
        post_reboot_labels: Default::default(),
        prefer_no_schedule_taint: None,
    }
}

struct Member {
    cfg: AgentConfig,
    sentinel: watch::Sender<SentinelState>,
    task: Option<(JoinHandle<()>, CancellationToken)>,
    metrics: Metrics,
    clock: Clock,
    starts: u32,
    /// The Event publisher of the running agent (kept to flush it on [`Fleet::shutdown`]).
    events: Option<Events>,
}

/// The fleet.
#[derive(Clone)]
pub struct Fleet {
    sim: SimCluster,
    members: Arc<Mutex<BTreeMap<String, Member>>>,
    supervisor: Arc<JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if Arc::strong_count(&self.supervisor) == 1 {
            self.supervisor.abort();
            let mut members = self.members.lock().unwrap_or_else(|e| e.into_inner());
            for m in members.values_mut() {
                if let Some((t, _)) = m.task.take() {
                    t.abort();
                }
            }
        }
    }
}

impl Fleet {
    /// Creates a fleet with one agent per entry of `configs` (not started yet) and starts
    /// supervising reboots.
    pub fn new(sim: &SimCluster, configs: Vec<AgentConfig>) -> Fleet {
        let members: BTreeMap<String, Member> = configs
            .into_iter()
            .map(|cfg| {
                let (tx, _) = watch::channel(SentinelState::default());
                let metrics = Metrics::new(&cfg.node_name);
                (
                    cfg.node_name.clone(),
                    Member {
                        cfg,
                        sentinel: tx,
                        task: None,
                        metrics,
                        clock: Clock::default(),
                        starts: 0,
                        events: None,
                    },
                )
            })
            .collect();
        let members = Arc::new(Mutex::new(members));
        let mut events = sim.subscribe();
        let sup_members = members.clone();
        let sup_sim = sim.clone();
        let supervisor = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(SimEvent::RebootStarted { node }) => {
                        let mut ms = sup_members.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(m) = ms.get_mut(&node) {
                            if let Some((t, _)) = m.task.take() {
                                t.abort();
                            }
                            // /var/run is a tmpfs: the sentinel is gone after the reboot.
                            m.sentinel.send_replace(SentinelState::default());
                        }
                    }
                    Ok(SimEvent::NodeReady { node, .. }) => {
                        let mut ms = sup_members.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(m) = ms.get_mut(&node) {
                            start_member(&sup_sim, m);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!(missed = n, "fleet supervisor lagged behind simulator events");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Fleet {
            sim: sim.clone(),
            members,
            supervisor: Arc::new(supervisor),
        }
    }

    fn with<R>(&self, node: &str, f: impl FnOnce(&mut Member) -> R) -> Option<R> {
        let mut ms = self.members.lock().unwrap_or_else(|e| e.into_inner());
        ms.get_mut(node).map(f)
    }

    /// Starts every agent that is not running.
    pub fn start_all(&self) {
        let mut ms = self.members.lock().unwrap_or_else(|e| e.into_inner());
        for m in ms.values_mut() {
            if m.task.is_none() {
                start_member(&self.sim, m);
            }
        }
    }

    /// Starts (or restarts) the agent of `node`.
    pub fn start(&self, node: &str) {
        let sim = self.sim.clone();
        self.with(node, |m| start_member(&sim, m));
    }

    /// Kills the agent of `node` at once, as `kill -9` would.
    pub fn kill(&self, node: &str) {
        self.with(node, |m| {
            if let Some((t, _)) = m.task.take() {
                t.abort();
            }
        });
    }

    /// Stops the agent of `node` gracefully (SIGTERM) and waits for it.
    pub async fn stop(&self, node: &str) {
        let task = self.with(node, |m| m.task.take()).flatten();
        if let Some((t, token)) = task {
            token.cancel();
            let _ = t.await;
        }
    }

    /// Stops the whole fleet cleanly, before the simulated cluster goes away: no agent is
    /// restarted any more, every agent is stopped as by SIGTERM (a write in progress finishes)
    /// and the Events they queued are sent, at most `limit` for those. Without this the last
    /// Events of a run would meet a stopped server (a client error in the log).
    pub async fn shutdown(&self, limit: Duration) {
        self.supervisor.abort();
        let (tasks, events): (Vec<_>, Vec<_>) = {
            let mut ms = self.members.lock().unwrap_or_else(|e| e.into_inner());
            ms.values_mut().map(|m| (m.task.take(), m.events.take())).unzip()
        };
        for (task, token) in tasks.into_iter().flatten() {
            token.cancel();
            let _ = task.await;
        }
        let deadline = tokio::time::Instant::now() + limit;
        for e in events.into_iter().flatten() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !e.flush(left).await {
                warn!("Events still queued when the fleet stopped");
                return;
            }
        }
    }

    /// Whether the agent of `node` runs.
    pub fn running(&self, node: &str) -> bool {
        self.with(node, |m| m.task.as_ref().is_some_and(|(t, _)| !t.is_finished()))
            .unwrap_or(false)
    }

    /// How many times the agent of `node` was started.
    pub fn starts(&self, node: &str) -> u32 {
        self.with(node, |m| m.starts).unwrap_or(0)
    }

    /// Creates the sentinel of `node` (the host needs a reboot).
    pub fn require_reboot(&self, node: &str) {
        self.with(node, |m| {
            m.sentinel.send_replace(SentinelState {
                required: true,
                packages: vec!["linux-image-generic".into()],
            })
        });
    }

    /// Removes the sentinel of `node`.
    pub fn clear_sentinel(&self, node: &str) {
        self.with(node, |m| m.sentinel.send_replace(SentinelState::default()));
    }

    /// Whether the sentinel of `node` is present.
    pub fn sentinel_present(&self, node: &str) -> bool {
        self.with(node, |m| m.sentinel.borrow().required).unwrap_or(false)
    }

    /// The metrics of `node`'s agent.
    pub fn metrics(&self, node: &str) -> Option<Metrics> {
        self.with(node, |m| m.metrics.clone())
    }

    /// Sets the clock skew of `node`'s agent (applies from its next start).
    pub fn set_clock_skew(&self, node: &str, skew: chrono::Duration) {
        self.with(node, |m| m.clock = Clock { skew });
    }

    /// Changes the settings of `node`'s agent (applies from its next start).
    pub fn configure(&self, node: &str, f: impl FnOnce(&mut AgentConfig)) {
        self.with(node, |m| f(&mut m.cfg));
    }

    /// Node names.
    pub fn nodes(&self) -> Vec<String> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

fn start_member(sim: &SimCluster, m: &mut Member) {
    if let Some((t, _)) = m.task.take() {
        t.abort();
    }
    // In memory: the same handler as over HTTP (faults included), no socket per connection.
    let client = sim.in_memory_client();
    // Disabled unless a test configures notification targets.
    let notifier = Notifier::start(&m.cfg.notify, &m.cfg.node_name, m.metrics.clone()).unwrap_or_else(|e| {
        warn!(node = %m.cfg.node_name, error = %e, "notifications disabled");
        Notifier::disabled()
    });
    let events = Events::start(client.clone(), &m.cfg.node_name, None);
    m.events = Some(events.clone());
    let agent = Agent {
        events,
        notifier,
        rebooter: Arc::new(SimRebooter {
            sim: sim.clone(),
            node: m.cfg.node_name.clone(),
        }),
        cfg: m.cfg.clone(),
        client,
        metrics: m.metrics.clone(),
        clock: m.clock,
        // A simulated node has no kernel of its own: only the Node's bootID changes.
        kernel_boot_id: Arc::new(|| None),
    };
    let token = CancellationToken::new();
    let rx = m.sentinel.subscribe();
    let span = info_span!("agent", node = %m.cfg.node_name);
    let t = token.clone();
    let task = tokio::spawn(
        async move {
            if let Err(e) = agent::run(agent, rx, t).await {
                warn!(error = %e, "agent failed");
            }
        }
        .instrument(span),
    );
    m.starts += 1;
    m.task = Some((task, token));
}
