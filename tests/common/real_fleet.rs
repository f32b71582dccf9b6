//! A fleet of in-process kreboot agents on the real control plane ([`super::real`]), and what a
//! benchmark reads around it: a watch of Leases and Nodes stamped on arrival, kube-apiserver's
//! own `/metrics`, its audit log, and `/proc` of the components.
//!
//! Each agent is the production [`agent::run`] with its own kube-rs client (its own
//! connections) to kube-apiserver. What the harness supplies is what a host would: the sentinel
//! (a channel standing in for the inotify watch) and the machine. The agent's [`Rebooter`] plays
//! the machine: the agent dies with it, the sentinel goes (a fresh /var/run), the kubelet reports
//! a new bootID (NotReady, then Ready after the configured reboot time, unless KWOK makes it
//! Ready first) and a new agent starts, as the DaemonSet would start it.
//!
//! Every actor has its own static token (all in `system:masters`), so the audit log tells the
//! agents' requests from the harness's: see [`bench_tokens`].

#![allow(dead_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Seek, SeekFrom},
    path::PathBuf,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::{coordination::v1::Lease, core::v1::Node};
use kreboot::{
    agent::{self, Agent, Clock},
    cli::AgentConfig,
    events::Events,
    lock,
    metrics::Metrics,
    node::{ANN_LAST_REBOOT, ANN_PHASE, LABEL_WAITING},
    notify::Notifier,
    reboot::{RebootError, Rebooter},
    sentinel::SentinelState,
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    backend::{kwok_node, ready_condition, uuid},
    real::ControlPlane,
};

/// The agents' users: this prefix and the node name (one static token per agent).
pub const AGENT_USER_PREFIX: &str = "kreboot-bench-agent:";

pub fn agent_token(node: &str) -> String {
    format!("kreboot-bench-agent-{node}-token")
}

/// The node whose agent `user` is, if it is one.
pub fn agent_node(user: &str) -> Option<&str> {
    user.strip_prefix(AGENT_USER_PREFIX)
}
/// The user that plays the kubelets (the machines' status writes).
pub const KUBELET_USER: &str = "kreboot-bench-kubelet";
const KUBELET_TOKEN: &str = "kreboot-bench-kubelet-token";
/// The benchmark's own watch of Leases and Nodes.
pub const OBSERVER_USER: &str = "kreboot-bench-observer";
const OBSERVER_TOKEN: &str = "kreboot-bench-observer-token";

/// The static tokens of the agents of `nodes` (one each), the kubelets and the observer, for
/// [`super::real::Options`].
pub fn bench_tokens(nodes: &[String]) -> Vec<(String, String, String, String)> {
    let actor = |token: String, user: String| (token, user.clone(), user, "system:masters".to_string());
    let mut tokens: Vec<_> = nodes
        .iter()
        .map(|n| actor(agent_token(n), format!("{AGENT_USER_PREFIX}{n}")))
        .collect();
    tokens.push(actor(KUBELET_TOKEN.into(), KUBELET_USER.into()));
    tokens.push(actor(OBSERVER_TOKEN.into(), OBSERVER_USER.into()));
    tokens
}

/// A fresh control plane for a fleet of `names`: their agents' tokens (see [`bench_tokens`]),
/// and the namespaces `default` and `namespace` (the agents' Leases and policy).
pub async fn fleet_control_plane(names: &[String], namespace: &str) -> ControlPlane {
    let cp = ControlPlane::start(super::real::Options {
        tokens: bench_tokens(names),
        ..super::real::Options::default()
    })
    .await;
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(cp.admin_client());
    for name in ["default", namespace] {
        let _ = ns
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).expect("a Namespace"),
            )
            .await;
    }
    cp
}

/// Raises this process's open-file limit (soft and hard) to `want`, or as far as allowed; the
/// control plane's processes started afterwards inherit it. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(cur.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            // Not privileged: up to the hard limit.
            let soft = libc::rlimit {
                rlim_cur: want.min(cur.rlim_max),
                rlim_max: cur.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
    }
    cur.rlim_cur
}

/// Creates Ready KWOK Nodes with a bootID (as `backend::Backend::add_node` does on the real
/// backend), `parallel` at a time.
pub async fn create_nodes(client: &Client, names: &[String], parallel: usize) {
    let api: Api<Node> = Api::all(client.clone());
    futures::stream::iter(names.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                let labels = BTreeMap::from([("kubernetes.io/hostname".to_string(), name.clone())]);
                let node = kwok_node(&name, &labels);
                api.create(&PostParams::default(), &serde_json::from_value(node).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("create Node {name}: {e}"));
            }
        })
        .buffer_unordered(parallel)
        .collect::<Vec<()>>()
        .await;
}

// ---------------------------------------------------------------------------------------------
// The fleet.

struct Member {
    cfg: AgentConfig,
    sentinel: watch::Sender<SentinelState>,
    task: Option<(JoinHandle<()>, CancellationToken)>,
    metrics: Metrics,
    starts: u32,
    reboots: u32,
}

struct Inner {
    /// The control plane's kube-rs configuration for a token; each agent start builds its own
    /// client with its node's token.
    config: Box<dyn Fn(&str) -> kube::Config + Send + Sync>,
    /// The kubelets' client (one, shared: it plays every machine's kubelet).
    kubelet: Client,
    reboot: Duration,
    members: Mutex<BTreeMap<String, Member>>,
}

/// One agent per node, each with its own client, supervised like a DaemonSet (see the module
/// doc).
pub struct RealFleet {
    inner: Arc<Inner>,
}

/// The machine of one node, as its agent sees it.
struct Machine {
    fleet: Weak<Inner>,
    node: String,
}

impl Rebooter for Machine {
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>> {
        Box::pin(async move {
            // The request is accepted; the machine goes down a moment later (and the agent
            // with it), as systemd's shutdown would do.
            if let Some(inner) = self.fleet.upgrade() {
                tokio::spawn(reboot_machine(inner, self.node.clone()));
            }
            Ok(())
        })
    }
}

async fn patch_status(client: &Client, node: &str, patch: serde_json::Value) {
    let api: Api<Node> = Api::all(client.clone());
    for attempt in 0..20u64 {
        match api
            .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => return,
            Err(e) => {
                eprintln!("kubelet of {node}: status patch failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
            }
        }
    }
}

async fn reboot_machine(inner: Arc<Inner>, node: String) {
    {
        let mut ms = inner.members.lock().unwrap_or_else(|e| e.into_inner());
        let Some(m) = ms.get_mut(&node) else { return };
        // The agent dies with the machine; /var/run is a tmpfs: the sentinel is gone.
        if let Some((t, _)) = m.task.take() {
            t.abort();
        }
        m.sentinel.send_replace(SentinelState::default());
        m.reboots += 1;
    }
    // The kubelet reports the new boot while the node starts; Ready once it is up (KWOK's node
    // stage may make it Ready sooner, as it does for any NotReady Node it manages).
    let down = json!({"status": {
        "conditions": [ready_condition(false)],
        "nodeInfo": { "bootID": uuid() },
    }});
    patch_status(&inner.kubelet, &node, down).await;
    tokio::time::sleep(inner.reboot).await;
    let up = json!({"status": {"conditions": [ready_condition(true)]}});
    patch_status(&inner.kubelet, &node, up).await;
    let mut ms = inner.members.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(m) = ms.get_mut(&node) {
        start_member(&inner, m);
    }
}

fn start_member(inner: &Arc<Inner>, m: &mut Member) {
    if let Some((t, _)) = m.task.take() {
        t.abort();
    }
    // Its own client: its own connection pool, as a separate process would have.
    let node = m.cfg.node_name.clone();
    // The product's client (HTTP/2 to kube-apiserver), as the agent binary builds it.
    let client = kreboot::connect::client((inner.config)(&agent_token(&node))).expect("agent client");
    let agent = Agent {
        events: Events::start(client.clone(), &node, None),
        notifier: Notifier::disabled(),
        rebooter: Arc::new(Machine {
            fleet: Arc::downgrade(inner),
            node: node.clone(),
        }),
        cfg: m.cfg.clone(),
        client,
        metrics: m.metrics.clone(),
        clock: Clock::default(),
        // A KWOK node has no kernel of its own: only the Node's bootID changes.
        kernel_boot_id: Arc::new(|| None),
    };
    let token = CancellationToken::new();
    let rx = m.sentinel.subscribe();
    let t = token.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = agent::run(agent, rx, t).await {
            eprintln!("agent of {node} failed: {e}");
        }
    });
    m.starts += 1;
    m.task = Some((task, token));
}

impl RealFleet {
    /// One agent per node of `names` (not started), with `kreboot_testkit::sim::fleet::agent_config`'s
    /// defaults changed by `tweak`; the machines reboot in `reboot`.
    pub fn new(
        cp: &ControlPlane,
        names: &[String],
        reboot: Duration,
        tweak: impl Fn(&mut AgentConfig),
    ) -> RealFleet {
        RealFleet::via(cp, &cp.url, names, reboot, tweak)
    }

    /// As [`RealFleet::new`], but the agents reach kube-apiserver at `url` (e.g. a proxy that
    /// presents the control plane's serving certificate); the kubelets talk to it directly.
    pub fn via(
        cp: &ControlPlane,
        url: &str,
        names: &[String],
        reboot: Duration,
        tweak: impl Fn(&mut AgentConfig),
    ) -> RealFleet {
        let url: http::Uri = url.parse().expect("agents' server URL");
        let members = names
            .iter()
            .map(|name| {
                let mut cfg = kreboot_testkit::sim::fleet::agent_config(name);
                tweak(&mut cfg);
                let (tx, _) = watch::channel(SentinelState::default());
                (
                    name.clone(),
                    Member {
                        metrics: Metrics::new(name),
                        cfg,
                        sentinel: tx,
                        task: None,
                        starts: 0,
                        reboots: 0,
                    },
                )
            })
            .collect();
        RealFleet {
            inner: Arc::new(Inner {
                config: {
                    let mut base = cp.config(KUBELET_TOKEN);
                    base.cluster_url = url;
                    Box::new(move |token: &str| {
                        let mut c = base.clone();
                        c.auth_info.token = Some(token.to_string().into());
                        c
                    })
                },
                // HTTP/2 as the agents: thousands of concurrent status writes on one connection.
                kubelet: kreboot::connect::client(cp.config(KUBELET_TOKEN)).expect("kubelet client"),
                reboot,
                members: Mutex::new(members),
            }),
        }
    }

    fn members(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Member>> {
        self.inner.members.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts every agent that is not running.
    pub fn start_all(&self) {
        let mut ms = self.members();
        for m in ms.values_mut() {
            if m.task.is_none() {
                start_member(&self.inner, m);
            }
        }
    }

    /// Creates every node's sentinel, in one pass; returns how long the pass took.
    pub fn require_reboot_all(&self) -> Duration {
        let started = Instant::now();
        let ms = self.members();
        for m in ms.values() {
            m.sentinel.send_replace(SentinelState {
                required: true,
                packages: vec!["linux-image-generic".into()],
            });
        }
        started.elapsed()
    }

    /// Kills `node`'s agent where it is (its task aborted at whatever await it was in: no
    /// clean-up runs, as with SIGKILL); returns whether it was running.
    pub fn kill(&self, node: &str) -> bool {
        let mut ms = self.members();
        let Some(m) = ms.get_mut(node) else { return false };
        match m.task.take() {
            Some((t, _)) => {
                let running = !t.is_finished();
                t.abort();
                running
            }
            None => false,
        }
    }

    /// Starts `node`'s agent (again), as the DaemonSet would.
    pub fn start(&self, node: &str) {
        let mut ms = self.members();
        if let Some(m) = ms.get_mut(node) {
            start_member(&self.inner, m);
        }
    }

    /// Whether `node`'s agent runs now.
    pub fn is_running(&self, node: &str) -> bool {
        self.members()
            .get(node)
            .is_some_and(|m| m.task.as_ref().is_some_and(|(t, _)| !t.is_finished()))
    }

    /// Creates `node`'s sentinel.
    pub fn require_reboot(&self, node: &str) {
        if let Some(m) = self.members().get(node) {
            m.sentinel.send_replace(SentinelState {
                required: true,
                packages: vec!["linux-image-generic".into()],
            });
        }
    }

    /// Whether `node`'s sentinel is there.
    pub fn reboot_required(&self, node: &str) -> bool {
        self.members()
            .get(node)
            .is_some_and(|m| m.sentinel.borrow().required)
    }

    /// Machine reboots of `node` so far.
    pub fn reboots_of(&self, node: &str) -> u32 {
        self.members().get(node).map_or(0, |m| m.reboots)
    }

    /// How many agents report `kreboot_state` = `state`.
    pub fn in_state(&self, state: &str) -> usize {
        self.members()
            .values()
            .filter(|m| {
                m.metrics
                    .state
                    .with_label_values(&[m.cfg.node_name.as_str(), state])
                    .get()
                    == 1
            })
            .count()
    }

    /// Agents running now.
    pub fn running(&self) -> usize {
        self.members()
            .values()
            .filter(|m| m.task.as_ref().is_some_and(|(t, _)| !t.is_finished()))
            .count()
    }

    /// Machine reboots so far.
    pub fn reboots(&self) -> u32 {
        self.members().values().map(|m| m.reboots).sum()
    }

    /// Agent starts so far.
    pub fn starts(&self) -> u32 {
        self.members().values().map(|m| m.starts).sum()
    }
}

impl Drop for RealFleet {
    fn drop(&mut self) {
        let mut ms = self.members();
        for m in ms.values_mut() {
            if let Some((t, _)) = m.task.take() {
                t.abort();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The observer: one watch of the lock Leases and one of all Nodes, stamped on arrival, on a
// thread and runtime of its own (not queued behind the agents' tasks).

/// A change of a lock Lease, as seen.
#[derive(Debug, Clone)]
pub enum LeaseChange {
    /// A holder where there was none (created, or taken while free).
    Acquired { at: Instant, to: String },
    /// The holder named another node (the hand-off write).
    HandedOff {
        at: Instant,
        from: String,
        to: String,
        /// Nodes labelled as waiting at that moment.
        waiting: usize,
    },
    /// The new holder rewrote a handed-off Lease with its own duration.
    Claimed { at: Instant, node: String },
    /// The holder cleared it.
    Released {
        at: Instant,
        from: String,
        waiting: usize,
    },
}

/// What the observer saw.
#[derive(Debug, Default)]
pub struct Timeline {
    /// Nodes seen at least once.
    pub nodes: usize,
    /// Lease changes in arrival order.
    pub leases: Vec<LeaseChange>,
    /// Node entered a cycle (`kreboot.io/phase` appeared: the cordon write).
    pub cordons: Vec<(Instant, String)>,
    /// Node left a cycle (the phase annotation removed: uncordon).
    pub ends: Vec<(Instant, String)>,
    /// Nodes whose cycle ended with a recorded reboot.
    pub completed: BTreeSet<String>,
    /// Nodes labelled as waiting for the lock now.
    pub waiting: usize,
    /// Nodes in a cycle now.
    pub in_cycle: usize,
    /// The most nodes in a cycle at once, over every Node event seen.
    pub max_in_cycle: usize,
    /// Nodes cordoned (`spec.unschedulable`) now, whoever cordoned them.
    pub cordoned: usize,
    /// The most nodes cordoned at once, over every Node event seen.
    pub max_cordoned: usize,
    /// Current holder of each lock Lease.
    pub holders: BTreeMap<String, String>,
    /// Watch errors (re-established by back-off).
    pub errors: u64,
    /// Events received.
    pub events: u64,
}

/// The observer's thread.
pub struct Observer {
    pub timeline: Arc<Mutex<Timeline>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct NodeSeen {
    phase: bool,
    waiting: bool,
    cordoned: bool,
}

impl Observer {
    /// Starts watching the lock Leases of `namespace` and every Node.
    pub fn start(cp: &ControlPlane, namespace: &str) -> Observer {
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let stop = CancellationToken::new();
        let config = cp.config(OBSERVER_TOKEN);
        let ns = namespace.to_owned();
        let (tl, st) = (timeline.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("bench-observer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("observer runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = observe(config, ns, tl) => {}
                    }
                });
            })
            .expect("observer thread");
        Observer {
            timeline,
            stop,
            thread: Some(thread),
        }
    }

    /// Reads the timeline.
    pub fn with<R>(&self, f: impl FnOnce(&Timeline) -> R) -> R {
        f(&self.timeline.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn observe(config: kube::Config, ns: String, tl: Arc<Mutex<Timeline>>) {
    let client = Client::try_from(config).expect("observer client");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<Node> = Api::all(client);
    let lease_stream = watcher(leases, watcher::Config::default().labels(lock::LOCK_LABEL)).default_backoff();
    let node_stream = watcher(nodes, watcher::Config::default()).default_backoff();
    futures::pin_mut!(lease_stream);
    futures::pin_mut!(node_stream);
    // (holder, leaseDurationSeconds) per Lease.
    let mut lease_state: BTreeMap<String, (Option<String>, Option<i32>)> = BTreeMap::new();
    let mut node_state: BTreeMap<String, NodeSeen> = BTreeMap::new();
    loop {
        tokio::select! {
            ev = lease_stream.next() => {
                let Some(ev) = ev else { return };
                let at = Instant::now();
                let mut t = tl.lock().unwrap_or_else(|e| e.into_inner());
                t.events += 1;
                let lease = match ev {
                    Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => l,
                    Ok(watcher::Event::Delete(l)) => {
                        lease_state.remove(&l.name_any());
                        t.holders.remove(&l.name_any());
                        continue;
                    }
                    Ok(_) => continue,
                    Err(_) => {
                        t.errors += 1;
                        continue;
                    }
                };
                let name = lease.name_any();
                let holder = lock::holder(&lease).map(str::to_owned);
                let duration = lease.spec.as_ref().and_then(|s| s.lease_duration_seconds);
                let (before, before_duration) = lease_state
                    .insert(name.clone(), (holder.clone(), duration))
                    .unwrap_or((None, None));
                let waiting = t.waiting;
                match (&before, &holder) {
                    (None, Some(to)) => t.leases.push(LeaseChange::Acquired { at, to: to.clone() }),
                    (Some(from), Some(to)) if from != to => t.leases.push(LeaseChange::HandedOff {
                        at,
                        from: from.clone(),
                        to: to.clone(),
                        waiting,
                    }),
                    (Some(from), None) => t.leases.push(LeaseChange::Released {
                        at,
                        from: from.clone(),
                        waiting,
                    }),
                    (Some(b), Some(h))
                        if b == h
                            && before_duration == Some(lock::HANDOFF_SECONDS)
                            && duration != Some(lock::HANDOFF_SECONDS) =>
                    {
                        t.leases.push(LeaseChange::Claimed { at, node: h.clone() })
                    }
                    _ => {}
                }
                match holder {
                    Some(h) => t.holders.insert(name, h),
                    None => t.holders.remove(&name),
                };
            }
            ev = node_stream.next() => {
                let Some(ev) = ev else { return };
                let at = Instant::now();
                let mut t = tl.lock().unwrap_or_else(|e| e.into_inner());
                t.events += 1;
                let node = match ev {
                    Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => n,
                    Ok(_) => continue,
                    Err(_) => {
                        t.errors += 1;
                        continue;
                    }
                };
                let name = node.name_any();
                let phase = node.annotations().contains_key(ANN_PHASE);
                let waiting = node.labels().contains_key(LABEL_WAITING);
                let cordoned = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.unschedulable)
                    .unwrap_or(false);
                let seen = node_state.entry(name.clone()).or_insert_with(|| {
                    t.nodes += 1;
                    NodeSeen::default()
                });
                if phase && !seen.phase {
                    t.cordons.push((at, name.clone()));
                    t.in_cycle += 1;
                    t.max_in_cycle = t.max_in_cycle.max(t.in_cycle);
                } else if !phase && seen.phase {
                    t.ends.push((at, name.clone()));
                    t.in_cycle -= 1;
                    if node.annotations().contains_key(ANN_LAST_REBOOT) {
                        t.completed.insert(name.clone());
                    }
                }
                if waiting != seen.waiting {
                    if waiting {
                        t.waiting += 1;
                    } else {
                        t.waiting -= 1;
                    }
                }
                if cordoned != seen.cordoned {
                    if cordoned {
                        t.cordoned += 1;
                        t.max_cordoned = t.max_cordoned.max(t.cordoned);
                    } else {
                        t.cordoned -= 1;
                    }
                }
                seen.phase = phase;
                seen.waiting = waiting;
                seen.cordoned = cordoned;
            }
        }
    }
}

/// One hand-over, reconstructed from the timeline: the previous holder's Lease write (hand-off
/// or release) → the next node's cordon.
#[derive(Debug, Clone)]
pub struct HandOver {
    /// When the hand-off or release write arrived.
    pub at: Instant,
    /// Nodes waiting when the Lease was written.
    pub waiting: usize,
    /// Previous holder's cycle end (uncordon) → its hand-off/release write, seconds.
    pub end_to_write: Option<f64>,
    /// Hand-off/release write → the next holder's claim, seconds (hand-offs only).
    pub write_to_claim: Option<f64>,
    /// Hand-off/release write → the next node's cordon, seconds: the hand-over latency.
    pub write_to_cordon: f64,
}

impl Timeline {
    /// Every hand-over that completed (the next node cordoned), in order.
    pub fn hand_overs(&self) -> Vec<HandOver> {
        let mut out = Vec::new();
        for (i, c) in self.leases.iter().enumerate() {
            let (at, from, to, waiting) = match c {
                LeaseChange::HandedOff {
                    at,
                    from,
                    to,
                    waiting,
                } => (*at, from, Some(to), *waiting),
                LeaseChange::Released { at, from, waiting } => (*at, from, None, *waiting),
                _ => continue,
            };
            // The next node: the one named, or whoever cordons next.
            let cordon = self
                .cordons
                .iter()
                .find(|(t, n)| *t >= at && to.is_none_or(|to| to == n))
                .map(|(t, _)| *t);
            let Some(cordon) = cordon else { continue };
            // A release at the end of the rollout is followed by no cordon; one followed by a
            // cordon only after a later hand-off is not this one's.
            if to.is_none()
                && self.leases[i + 1..].iter().any(|l| match l {
                    LeaseChange::HandedOff { at: t, .. } | LeaseChange::Released { at: t, .. } => {
                        *t <= cordon
                    }
                    _ => false,
                })
            {
                continue;
            }
            let claim = to.and_then(|to| {
                self.leases[i + 1..].iter().find_map(|l| match l {
                    LeaseChange::Claimed { at: t, node } if node == to => Some(*t),
                    _ => None,
                })
            });
            let end = self
                .ends
                .iter()
                .rev()
                .find(|(t, n)| *t <= at && n == from)
                .map(|(t, _)| *t);
            out.push(HandOver {
                at,
                waiting,
                end_to_write: end.map(|e| (at - e).as_secs_f64()),
                write_to_claim: claim.map(|c| c.saturating_duration_since(at).as_secs_f64()),
                write_to_cordon: (cordon - at).as_secs_f64(),
            });
        }
        out
    }

    /// Hand-off or release writes seen so far.
    pub fn lease_passes(&self) -> usize {
        self.leases
            .iter()
            .filter(|l| matches!(l, LeaseChange::HandedOff { .. } | LeaseChange::Released { .. }))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// kube-apiserver's /metrics.

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape of kube-apiserver's `/metrics` (only the families a benchmark reads are kept).
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

const KEPT: &[&str] = &[
    "apiserver_request_total",
    "apiserver_longrunning_requests",
    "apiserver_request_duration_seconds_bucket",
    "apiserver_watch_events_total",
    "apiserver_registered_watchers",
];

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        let key = key.trim_start_matches(',').trim().to_owned();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => {}
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
    }
}

impl Scrape {
    /// Parses the text format.
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..name_end];
            if !KEPT.contains(&name) {
                continue;
            }
            let (labels, rest) = if line[name_end..].starts_with('{') {
                let close = line.rfind('}').unwrap_or(line.len() - 1);
                (parse_labels(&line[name_end + 1..close]), &line[close + 1..])
            } else {
                (BTreeMap::new(), &line[name_end..])
            };
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else {
                continue;
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Scrape { samples }
    }

    /// Scrapes kube-apiserver through `client`.
    /// Scrapes kube-apiserver's `/metrics`. An overloaded server may time out one scrape (it
    /// did at 5,000 nodes): tried up to 10 times, 5 s apart, before the benchmark gives up.
    pub async fn take(client: &Client) -> Scrape {
        let mut attempt = 1;
        loop {
            let req = http::Request::get("/metrics").body(Vec::new()).expect("request");
            match client.request_text(req).await {
                Ok(text) => return Scrape::parse(&text),
                Err(e) if attempt < 10 => {
                    eprintln!("[bench] kube-apiserver /metrics, attempt {attempt}: {e}; trying again in 5 s");
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                }
                Err(e) => panic!("kube-apiserver /metrics failed 10 times: {e}"),
            }
        }
    }

    /// Sum of `name` over the samples whose labels pass `keep`.
    pub fn sum(&self, name: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && keep(&s.labels))
            .map(|s| s.value)
            .sum()
    }

    /// `self - before` for the counter `name`, by the labels `by`, over samples passing `keep`.
    pub fn delta_by(
        &self,
        before: &Scrape,
        name: &str,
        by: &[&str],
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<Vec<String>, f64> {
        let mut out: BTreeMap<Vec<String>, f64> = BTreeMap::new();
        for (scrape, sign) in [(self, 1.0), (before, -1.0)] {
            for s in scrape
                .samples
                .iter()
                .filter(|s| s.name == name && keep(&s.labels))
            {
                let key = by
                    .iter()
                    .map(|l| s.labels.get(*l).cloned().unwrap_or_default())
                    .collect();
                *out.entry(key).or_default() += sign * s.value;
            }
        }
        out.retain(|_, v| v.abs() > 0.5);
        out
    }

    /// The `q` quantile of `apiserver_request_duration_seconds` over the requests made between
    /// `before` and `self` passing `keep` (linear within a bucket, as Prometheus'
    /// `histogram_quantile`), and how many requests that is. `None` without requests;
    /// `f64::INFINITY` when the quantile is in the last (+Inf) bucket.
    pub fn latency_quantile(
        &self,
        before: &Scrape,
        q: f64,
        keep: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Option<(f64, u64)> {
        let buckets = self.delta_by(before, "apiserver_request_duration_seconds_bucket", &["le"], keep);
        let mut b: Vec<(f64, f64)> = buckets
            .into_iter()
            .filter_map(|(k, v)| {
                let le = if k[0] == "+Inf" {
                    f64::INFINITY
                } else {
                    k[0].parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let total = b.last().filter(|(le, _)| le.is_infinite())?.1;
        if total < 0.5 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for (le, count) in b {
            if count >= rank {
                if le.is_infinite() {
                    return Some((f64::INFINITY, total as u64));
                }
                let within = if count > prev.1 {
                    (rank - prev.1) / (count - prev.1)
                } else {
                    1.0
                };
                return Some((prev.0 + (le - prev.0) * within, total as u64));
            }
            prev = (le, count);
        }
        None
    }
}

// ---------------------------------------------------------------------------------------------
// The audit log.

/// One audited request.
#[derive(Debug, Clone)]
pub struct Audited {
    pub user: String,
    /// The client's program: the User-Agent up to its first `/`.
    pub client: String,
    pub verb: String,
    /// `resource` or `resource/subresource` (empty for non-resource URLs).
    pub resource: String,
    pub code: u16,
    /// The request URI (path and query).
    pub uri: String,
    /// The response's message, for a failed request.
    pub message: String,
    /// kube-apiserver's time of the counted stage (`stageTimestamp`).
    pub at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Reads kube-apiserver's audit log from where it was last read.
pub struct AuditReader {
    path: PathBuf,
    offset: u64,
}

impl AuditReader {
    /// Starts at the current end of the log (what was logged before is skipped).
    pub fn at_end(cp: &ControlPlane) -> AuditReader {
        let path = cp.dir.join("audit.log");
        let offset = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        AuditReader { path, offset }
    }

    /// The requests logged since the last read (complete lines only): every request once, as
    /// it completed, and every watch once, as it started.
    pub fn read(&mut self) -> Vec<Audited> {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let Some(last_newline) = buf.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        self.offset += last_newline as u64 + 1;
        let mut out = Vec::new();
        for line in buf[..last_newline].split(|b| *b == b'\n') {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            let verb = v["verb"].as_str().unwrap_or("").to_owned();
            let stage = v["stage"].as_str().unwrap_or("");
            let counted = if verb == "watch" {
                stage == "ResponseStarted"
            } else {
                stage == "ResponseComplete"
            };
            if !counted {
                continue;
            }
            let object = &v["objectRef"];
            let mut resource = object["resource"].as_str().unwrap_or("").to_owned();
            if let Some(sub) = object["subresource"].as_str() {
                resource = format!("{resource}/{sub}");
            }
            out.push(Audited {
                user: v["user"]["username"].as_str().unwrap_or("").to_owned(),
                client: v["userAgent"]
                    .as_str()
                    .unwrap_or("")
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_owned(),
                verb,
                resource,
                code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                uri: v["requestURI"].as_str().unwrap_or("").to_owned(),
                message: v["responseStatus"]["message"].as_str().unwrap_or("").to_owned(),
                at: v["stageTimestamp"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&chrono::Utc)),
            });
        }
        out
    }
}
