//! The agent: gathers observations, asks [`node::decide`] for the next action, carries it out.
//!
//! The agent holds no API watch while its node is idle and needs no reboot: it waits on the
//! sentinel alone, so an idle node makes no API requests at all. When the sentinel appears (or
//! the Node records a cycle in progress, or the node holds a lock slot), it *engages*: it
//! watches its own Node, the lock Leases and the policy ConfigMap, and from then on every
//! decision is made on caches that finished their first list — never on an empty cache. While
//! a health gate holds (phase `verifying`) it also watches the pods bound to its node and, when
//! its drain recorded PodDisruptionBudgets, the budgets.
//!
//! Each action is one atomic write recorded on the Node or the Lease, so a SIGTERM or a crash
//! between two actions leaves a state that [`node::decide`] resumes from. SIGTERM is obeyed only
//! between writes; a drain in progress is abandoned (it is resumable), the lock and the cordon
//! are kept (a reboot's shutdown SIGTERMs the agent too, and they must survive it).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node, ObjectReference, Pod},
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, ResourceExt},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::Value;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    blockers,
    cli::AgentConfig,
    drain::{self, DrainConfig},
    events::{Events, Reason},
    health,
    lock::{self, LeaseLock},
    metrics::Metrics,
    node::{self, Action, CycleEnd, HealthGate, Observations, Phase, WaitReason},
    notify::{Notifier, NotifyEvent},
    pause::{self, Pause},
    policy::Policy,
    reboot::Rebooter,
    sentinel::SentinelState,
};

mod watches;
use watches::*;

/// The key of the policy document in the ConfigMap.
pub const CONFIG_KEY: &str = crate::policy::CONFIG_KEY;

/// How long the agent waits for the host to go down after the reboot request was accepted,
/// before it reports the reboot as failed and requests it again.
pub const REBOOT_WAIT: Duration = Duration::from_secs(300);

/// How old a count of a node's pool (for a percentage `concurrency`) may be while the node
/// waits for a slot: a waiter counts again at most this often (and at least this often, to see
/// a pool that grew). One metadata-only Node list, served from the API server's watch cache.
const POOL_MAX_AGE: Duration = Duration::from_secs(60);

/// How old that count may be when the node is about to take a slot: a shrunken pool must not
/// hand out a slot it no longer has, so the count is redone unless it is this fresh.
const POOL_FRESH: Duration = Duration::from_secs(2);

/// Upper bound of the random delay before trying a free lock slot (see the AcquireLock arm).
const FREE_SLOT_JITTER_MS: u64 = 200;

/// Longest pause between retries of a failed API call.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How often a node whose preflight was refused checks again while a reboot is pending.
pub const HOST_ACCESS_RECHECK: Duration = Duration::from_secs(60);

/// The preflight's last outcome: reported once when it starts failing (Event, ERROR log), the
/// metric kept current on every check.
#[derive(Default)]
struct HostAccess {
    refused: Option<String>,
}

impl HostAccess {
    /// Runs the rebooter's preflight (no side effects) and reports a change. True when the
    /// reboot can reach the host.
    fn check(&mut self, agent: &Agent) -> bool {
        let me = &agent.cfg.node_name;
        match agent.rebooter.preflight() {
            Ok(()) => {
                agent.metrics.set(&agent.metrics.host_access_ok, 1);
                if self.refused.take().is_some() {
                    info!(node = %me, "preflight: the host can be reached again");
                }
                true
            }
            Err(message) => {
                agent.metrics.set(&agent.metrics.host_access_ok, 0);
                if self.refused.is_none() {
                    agent.events.node(
                        Reason::HostAccessDenied,
                        format!("{message}; the node will not be cordoned or drained until this is fixed"),
                    );
                }
                if self.refused.as_deref() != Some(message.as_str()) {
                    error!(
                        node = %me,
                        error = %message,
                        recheck_in = ?HOST_ACCESS_RECHECK,
                        "preflight: the reboot cannot reach the host; the node will not be cordoned or drained"
                    );
                }
                self.refused = Some(message);
                false
            }
        }
    }
}

/// A wall clock that can be skewed (the chaos test gives some agents a wrong clock).
#[derive(Debug, Clone, Copy, Default)]
pub struct Clock {
    /// Added to the system time.
    pub skew: chrono::Duration,
}

impl Clock {
    /// Now, as this agent believes.
    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.skew
    }
}

/// How [`run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown was requested (SIGTERM); everything recorded is consistent.
    Shutdown,
}

/// Everything the agent needs, built once by `main` (or a test harness).
#[derive(Clone)]
pub struct Agent {
    /// Validated settings.
    pub cfg: AgentConfig,
    /// API client; must not retry 429 on its own (`default_retry = false`).
    pub client: Client,
    /// This agent's metrics.
    pub metrics: Metrics,
    /// Event publisher.
    pub events: Events,
    /// Operator notifications (`--notify-url`).
    pub notifier: Notifier,
    /// How to reboot.
    pub rebooter: Arc<dyn Rebooter>,
    /// This agent's clock.
    pub clock: Clock,
    /// Reads the kernel's boot id (None where not available).
    pub kernel_boot_id: Arc<dyn Fn() -> Option<String> + Send + Sync>,
}

/// The last count of this node's pool, for a percentage `concurrency`; valid for the policy
/// and the labels it was made for.
struct PoolCount {
    policy: Policy,
    labels: crate::policy::Labels,
    size: usize,
    at: Instant,
}

impl PoolCount {
    /// The pool's size, counted again when the last count is older than `max_age` or was made
    /// for another policy or other labels. `whole_rule`: the rule's nodes over all its groups
    /// (a percentage `maxConcurrent`) instead of the nodes sharing this node's slots; a cache
    /// holds one kind only.
    async fn size(
        cache: &mut Option<PoolCount>,
        agent: &Agent,
        policy: &Policy,
        labels: &crate::policy::Labels,
        max_age: Duration,
        whole_rule: bool,
    ) -> Result<(usize, Instant), kube::Error> {
        if let Some(c) = cache.as_ref()
            && c.at.elapsed() <= max_age
            && c.policy == *policy
            && c.labels == *labels
        {
            return Ok((c.size, c.at));
        }
        let size = agent.count_pool(policy, labels, whole_rule).await?;
        let at = Instant::now();
        *cache = Some(PoolCount {
            policy: policy.clone(),
            labels: labels.clone(),
            size,
            at,
        });
        Ok((size, at))
    }
}

impl Agent {
    fn node_api(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn lease_lock(&self) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(self.client.clone(), &self.cfg.namespace),
            lock_name: self.cfg.lock_name.clone(),
            identity: self.cfg.node_name.clone(),
            ttl: chrono::Duration::from_std(self.cfg.lock_ttl).unwrap_or(chrono::Duration::minutes(30)),
        }
    }

    /// The slots a node with `labels` competes for under `policy` (lock groups and per-rule
    /// concurrency have their own); `pool` is the size of its pool, for a percentage budget.
    fn slots_for(
        &self,
        policy: Option<&Policy>,
        labels: &crate::policy::Labels,
        pool: Option<usize>,
    ) -> Vec<String> {
        let rule = policy.map(|p| p.rule_for(labels));
        lock::slot_set(&self.cfg.lock_name, self.cfg.concurrency, rule.as_ref(), pool)
    }

    /// Counts the nodes that share lock slots with a node labelled `labels` (for a percentage
    /// `concurrency`). The agent keeps no Node cache (an idle agent holds no watch, and a
    /// waiter watches only lock holders), so it lists: metadata only (no status, no spec: about
    /// a tenth of a full Node), narrowed by the rule's selector (and the group's label), and at
    /// resourceVersion 0, so the API server answers from its watch cache without reading etcd.
    /// It is asked only by a node that competes for a slot or hands one over, at most once a
    /// [`POOL_MAX_AGE`] while it waits.
    ///
    /// `whole_rule`: counts instead the nodes of the rule over all its lock groups (the pool of a
    /// percentage `lockGroup.maxConcurrent`).
    async fn count_pool(
        &self,
        policy: &Policy,
        labels: &crate::policy::Labels,
        whole_rule: bool,
    ) -> Result<usize, kube::Error> {
        let selector = if whole_rule {
            policy.rule_pool_selector(labels)
        } else {
            policy.pool_selector(labels)
        };
        let params = ListParams::default().labels(&selector).match_any();
        let list = self.node_api().list_metadata(&params).await?;
        let empty = BTreeMap::new();
        let nodes = list
            .items
            .iter()
            .map(|n| n.metadata.labels.as_ref().unwrap_or(&empty));
        Ok(if whole_rule {
            policy.rule_pool_size(labels, nodes)
        } else {
            policy.pool_size(labels, nodes)
        })
    }

    /// Whether a node with `labels` has a percentage `lockGroup.maxConcurrent` under `policy`
    /// (its cap slots depend on the number of the rule's nodes).
    fn needs_rule_pool(policy: Option<&Policy>, labels: &crate::policy::Labels) -> bool {
        policy
            .and_then(|p| p.rule_for(labels).lock_group)
            .and_then(|g| g.max_concurrent)
            .is_some_and(crate::policy::Budget::needs_pool)
    }

    /// Whether a node with `labels` has a percentage budget under `policy` (its slots depend on
    /// the size of its pool).
    fn needs_pool(policy: Option<&Policy>, labels: &crate::policy::Labels) -> bool {
        policy
            .and_then(|p| p.rule_for(labels).concurrency)
            .is_some_and(crate::policy::Budget::needs_pool)
    }

    /// The budgets that select a pod the drain of this node is about to evict. When the budgets
    /// cannot be listed, every budget of the evicted pods' namespaces (the gate then waits for
    /// those: a check that cannot be narrowed is widened, not skipped).
    async fn budgets_to_touch(&self) -> Result<health::Touched, kube::Error> {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={}", self.cfg.node_name)))
            .await?;
        let (evict, _) = drain::plan(&list.items);
        if evict.is_empty() {
            return Ok(health::Touched::new());
        }
        let budgets: Api<PodDisruptionBudget> = Api::all(self.client.clone());
        match budgets.list(&ListParams::default()).await {
            Ok(b) => Ok(health::touched_budgets(&evict, &b.items)),
            Err(e) => {
                warn!(node = %self.cfg.node_name, error = %e, "cannot list PodDisruptionBudgets; the health gate will wait for every budget of the drained namespaces");
                Ok(evict
                    .iter()
                    .map(|p| {
                        (
                            health::BudgetRef::Namespace(p.namespace().unwrap_or_default()),
                            None,
                        )
                    })
                    .collect())
            }
        }
    }

    /// Adds the `--prefer-no-schedule-taint` change to `patch` (present while the node waits
    /// for the lock), when that flag is set.
    fn taint_change(&self, patch: Value, view: &node::NodeView, node: &Node, present: bool) -> Value {
        match &self.cfg.prefer_no_schedule_taint {
            Some(key) => {
                let taints = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_deref())
                    .unwrap_or_default();
                node::with_prefer_no_schedule(patch, view, taints, key, present)
            }
            None => patch,
        }
    }

    async fn patch_node(&self, patch: &Value) -> Result<Node, kube::Error> {
        self.node_api()
            .patch(&self.cfg.node_name, &PatchParams::default(), &Patch::Merge(patch))
            .await
    }

    /// The startup check of an idle-looking node: does it record a cycle, or hold a slot?
    async fn needs_engagement(&self) -> Result<bool, kube::Error> {
        let node = self.node_api().get(&self.cfg.node_name).await?;
        let recorded = node::view(&node).recorded;
        if recorded.phase != Phase::Idle || recorded.reboot_requested.is_some() {
            return Ok(true);
        }
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let list = leases
            .list(&ListParams::default().labels(&format!("{}={}", lock::LOCK_LABEL, self.cfg.lock_name)))
            .await?;
        Ok(list
            .items
            .iter()
            .any(|l| lock::holder(l) == Some(self.cfg.node_name.as_str())))
    }
}

/// Keeps `kreboot_reboot_required` in step with the sentinel and an operator's request
/// (`requested`), independently of the lifecycle loop (so the metric follows the file within
/// milliseconds even while a drain runs).
pub fn spawn_sentinel_metrics(
    metrics: Metrics,
    mut rx: watch::Receiver<SentinelState>,
    mut requested: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut was = None;
        // A closed request channel (no sender) leaves the sentinel alone in charge.
        let mut requests_open = true;
        loop {
            let required = rx.borrow_and_update().required || *requested.borrow_and_update();
            if was != Some(required) {
                metrics.set(&metrics.reboot_required, i64::from(required));
                let since = if required {
                    Utc::now().timestamp() as f64
                } else {
                    0.0
                };
                metrics
                    .reboot_required_since
                    .with_label_values(&[metrics.node()])
                    .set(since);
                was = Some(required);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = requested.changed(), if requests_open => if r.is_err() { requests_open = false },
            }
        }
    })
}

/// Renews the slot this node holds every third of the lease duration, for as long as the
/// agent runs engaged.
fn spawn_renewer(agent: Agent, leases: watch::Sender<LeaseState>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let lock = agent.lease_lock();
        let period = agent.cfg.lock_ttl / 3;
        loop {
            tokio::time::sleep(period).await;
            // Any of the lock's Leases (the slot set may have changed with the policy), and
            // all of them: a node may hold its group's slot and a cap slot.
            let held: Vec<Lease> = leases
                .borrow()
                .leases
                .values()
                .filter(|l| lock::holder(l) == Some(agent.cfg.node_name.as_str()))
                .cloned()
                .collect();
            for lease in held {
                match lock.renew(&lease, agent.clock.now()).await {
                    Ok(l) => leases.send_modify(|s| s.put(l, Instant::now())),
                    Err(e) => warn!(error = %e, "failed to renew the lock"),
                }
            }
        }
    })
}

fn backoff(attempt: u32) -> Duration {
    let secs = 1u64.checked_shl(attempt.min(5)).unwrap_or(32);
    Duration::from_secs(secs).min(MAX_BACKOFF)
}

/// Receivers of every cache an engaged agent decides on, kept for the whole engagement so that
/// a change between reading the caches and waiting is never lost.
struct Changes {
    node: watch::Receiver<NodeState>,
    leases: watch::Receiver<LeaseState>,
    policy: watch::Receiver<PolicyState>,
    holders: watch::Receiver<BTreeMap<String, lock::HolderNode>>,
    labelled: watch::Receiver<BTreeMap<String, Labelled>>,
    pods: watch::Receiver<Option<Vec<Pod>>>,
    budgets: watch::Receiver<Option<Vec<PodDisruptionBudget>>>,
}

impl Changes {
    fn new(w: &Watches) -> Changes {
        Changes {
            node: w.node.subscribe(),
            leases: w.leases.subscribe(),
            policy: w.policy.subscribe(),
            holders: w.holder_nodes.subscribe(),
            labelled: w.labelled_holders.subscribe(),
            pods: w.pods.subscribe(),
            budgets: w.budgets.subscribe(),
        }
    }

    /// Marks everything as seen. Called before the caches are read for a decision: whatever
    /// changes after this wakes the next wait.
    fn mark_seen(&mut self) {
        self.node.mark_unchanged();
        self.leases.mark_unchanged();
        self.policy.mark_unchanged();
        self.holders.mark_unchanged();
        self.labelled.mark_unchanged();
        self.pods.mark_unchanged();
        self.budgets.mark_unchanged();
    }
}

/// Sleeps until `deadline` (if any) or until a change arrives on one of the receivers, or
/// shutdown. Returns false on shutdown.
async fn wait_for_change(
    c: &mut Changes,
    sentinel: &mut watch::Receiver<SentinelState>,
    deadline: Option<Instant>,
    shutdown: &CancellationToken,
) -> bool {
    let Changes {
        node,
        leases,
        policy,
        holders: gone,
        labelled,
        pods,
        budgets,
    } = c;
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = node.changed() => true,
        _ = leases.changed() => true,
        _ = policy.changed() => true,
        _ = gone.changed() => true,
        _ = labelled.changed() => true,
        _ = pods.changed() => true,
        _ = budgets.changed() => true,
        _ = sentinel.changed() => true,
        _ = sleep => true,
    }
}

fn instant_at(now: DateTime<Utc>, t: DateTime<Utc>) -> Instant {
    let d = (t - now).to_std().unwrap_or(Duration::ZERO);
    // Cap far-away wake-ups; the loop simply decides again.
    Instant::now() + d.min(Duration::from_secs(24 * 3600))
}

/// Runs the agent until shutdown.
///
/// # Errors
/// Only for problems that retrying cannot fix; API errors are retried with back-off.
pub async fn run(
    agent: Agent,
    mut sentinel: watch::Receiver<SentinelState>,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    let me = agent.cfg.node_name.clone();
    // Whether the Node carries an operator's request (`kreboot reboot`), for the metrics.
    let (requested_tx, requested_rx) = watch::channel(false);
    let _sentinel_metrics = AbortOnDrop(spawn_sentinel_metrics(
        agent.metrics.clone(),
        sentinel.clone(),
        requested_rx,
    ));
    let mut attempt = 0u32;
    // The preflight at start-up: a pod that cannot reboot its node says so at once, long before
    // a reboot is needed (it runs again right before every step that disrupts the node).
    let mut host_access = HostAccess::default();
    host_access.check(&agent);

    // Disengaged: wait for the sentinel unless the cluster records work for this node.
    'outer: loop {
        let required = sentinel.borrow_and_update().required;
        if !required {
            match agent.needs_engagement().await {
                Ok(false) => {
                    attempt = 0;
                    agent.metrics.set_state("idle");
                    agent.metrics.set_blocked(None);
                    agent.metrics.set(&agent.metrics.paused, 0);
                    requested_tx.send_if_modified(|r| std::mem::replace(r, false));
                    debug!(node = %me, "idle: waiting for the sentinel or an operator's request");
                    // The one watch of an idle agent: its own Node, for `kreboot reboot`. Served
                    // from the API server's watch cache; no polling.
                    let (request_tx, mut request_rx) = watch::channel(false);
                    let _requests = AbortOnDrop(tokio::spawn(follow_named(
                        agent.node_api(),
                        me.clone(),
                        "own Node (reboot requests)",
                        move |n: Option<Node>| {
                            let asked = n.is_some_and(|n| node::view(&n).recorded.reboot_requested.is_some());
                            request_tx.send_if_modified(|r| std::mem::replace(r, asked) != asked);
                        },
                    )));
                    // False once the watch task ended (it does not, short of a panic): the
                    // sentinel still works, and a closed channel must not be polled in a loop.
                    let mut requests_open = true;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                            r = sentinel.changed() => if r.is_err() { return Ok(Outcome::Shutdown) } else { break },
                            r = request_rx.changed(), if requests_open => {
                                if r.is_err() {
                                    requests_open = false;
                                } else if *request_rx.borrow() {
                                    info!(node = %me, "an operator asked for a reboot");
                                    break;
                                }
                            }
                        }
                    }
                    continue 'outer;
                }
                Ok(true) => {}
                Err(e) => {
                    warn!(node = %me, error = %e, retry_in = ?backoff(attempt), "cannot reach the API server; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                    attempt += 1;
                    continue 'outer;
                }
            }
        }

        let mut w = agent.engage();
        let mut changes = Changes::new(&w);
        let _renewer = AbortOnDrop(spawn_renewer(agent.clone(), w.leases.clone()));
        let mut announced_required = false;
        let mut reported_problems: Vec<String> = Vec::new();
        let mut block_cache: Option<(Instant, Option<String>)> = None;
        // The last answer of the rule's gate query (health gate), and whether it is being asked.
        let mut gate_query_cache: Option<(Instant, Option<String>)> = None;
        let mut gate_query_pending;
        let mut pool_count: Option<PoolCount> = None;
        // The same for the rule's nodes over all its groups (a percentage `maxConcurrent`).
        let mut rule_pool_count: Option<PoolCount> = None;
        loop {
            changes.mark_seen();
            if !w.synced() {
                if !wait_for_change(&mut changes, &mut sentinel, None, &shutdown).await {
                    return Ok(Outcome::Shutdown);
                }
                continue;
            }
            let now = agent.clock.now();
            let Some(node_obj) = w.node.borrow().node.clone() else {
                warn!(node = %me, "own Node object does not exist; waiting for it");
                if !wait_for_change(&mut changes, &mut sentinel, None, &shutdown).await {
                    return Ok(Outcome::Shutdown);
                }
                continue;
            };
            let view = node::view(&node_obj);
            // Hand-edited garbage in kreboot's annotations: each is read the safe way (see
            // `node::parse_recorded` and `node::time_problems`); the operator is told once per
            // change, in the log and with a `BadAnnotation` Event on the Node.
            let mut problems = view.recorded.problems.clone();
            problems.extend(node::time_problems(&view.recorded, now));
            if problems != reported_problems {
                for p in &problems {
                    warn!(node = %me, problem = %p, "unexpected kreboot annotation");
                }
                if !problems.is_empty() {
                    agent.events.node(Reason::BadAnnotation, problems.join("; "));
                }
                reported_problems = problems;
            }
            let sentinel_state = sentinel.borrow_and_update().clone();
            let (policy, paused) = {
                let p = w.policy.borrow();
                (p.policy.clone(), p.paused.clone())
            };
            let window_open = policy.as_ref().is_some_and(|p| p.is_open(&view.labels, now));
            // Without the pool's size (a percentage budget), slot 0 only: enough to know which
            // slot this node holds (every Lease of the lock is looked at for that); the pool is
            // counted when the node competes for a slot (the AcquireLock arm).
            let slots = agent.slots_for(policy.as_ref(), &view.labels, None);
            let (leases, seen) = {
                let s = w.leases.borrow();
                (s.leases.clone(), s.seen.clone())
            };
            // A rule with `lockGroup.maxConcurrent`: a node also needs one of the rule's cap
            // slots to start, taken after its group's slot (see `lock::cap_slot_set`).
            // A percentage cap is counted only when a cap slot is competed for (below): slot 0
            // is enough to know which cap slot this node holds (every Lease is looked at).
            let cap_slots = lock::cap_slot_set(
                &agent.cfg.lock_name,
                policy.as_ref().map(|p| p.rule_for(&view.labels)).as_ref(),
                None,
            );
            let is_cap = |n: &String| lock::is_cap_slot(&agent.cfg.lock_name, n);
            // A slot held from before a policy change still counts as held.
            let group_all: Vec<String> = all_slots(&slots, &leases)
                .into_iter()
                .filter(|n| !is_cap(n))
                .collect();
            let held = lock::held_slot(&group_all, &leases, &me);
            let cap_all: Vec<String> = all_slots(cap_slots.as_deref().unwrap_or_default(), &leases)
                .into_iter()
                .filter(|n| is_cap(n))
                .collect();
            // A cap slot counts only beside a slot of the group (it is taken second).
            let held_cap = lock::held_slot(&cap_all, &leases, &me).filter(|_| held.is_some());
            // Holding the group's slot but not yet a cap slot: not ready to start.
            let partial = cap_slots.is_some()
                && view.recorded.phase == Phase::Idle
                && held.is_some()
                && held_cap.is_none();
            // Two holders finishing at once may both hand their slot to this node: keep one
            // (and one cap slot), pass any other on at once.
            if let Some(extra) = all_slots(&slots, &leases)
                .iter()
                .filter(|n| Some(*n) != held.as_ref() && Some(*n) != held_cap.as_ref())
                .find(|n| leases.get(*n).and_then(lock::holder) == Some(me.as_str()))
                .and_then(|n| leases.get(n).cloned())
                && !agent.cfg.dry_run
            {
                info!(node = %me, lease = %extra.name_any(), "handed a second slot; passing it on");
                match pass_on(&agent, &w, extra).await {
                    Ok(()) | Err(StepError::Shutdown) => {}
                    Err(StepError::Stale) => {
                        if wait_briefly(&w, &shutdown).await.is_err() {
                            return Ok(Outcome::Shutdown);
                        }
                    }
                    Err(StepError::Api(e)) => {
                        warn!(node = %me, error = %e, "failed to pass on a second slot");
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                    }
                }
                continue;
            }
            let requested = view.recorded.reboot_requested.clone();
            requested_tx
                .send_if_modified(|r| std::mem::replace(r, requested.is_some()) != requested.is_some());
            let required = sentinel_state.required || requested.is_some();
            let mut obs = Observations {
                now,
                node: view.clone(),
                reboot_required: required,
                window_open,
                blocked_by: None,
                // Without its cap slot a node has no lock to start on (it competes for one);
                // a node already in its cycle goes on with its group's slot.
                held_lock: if partial { None } else { held.clone() },
                kernel_boot_id: (agent.kernel_boot_id)(),
                reboot_loop_backoff: chrono::Duration::from_std(agent.cfg.reboot_loop_backoff)
                    .unwrap_or(chrono::Duration::zero()),
                failure_backoff: chrono::Duration::from_std(agent.cfg.failure_backoff)
                    .unwrap_or(chrono::Duration::zero()),
                host_access_ok: true,
                paused: paused.is_some(),
                soak_until: None,
                health_gate: None,
            };
            gate_query_pending = false;
            if view.recorded.phase != Phase::Verifying {
                // A new gate starts with a fresh answer.
                gate_query_cache = None;
            }
            if view.recorded.phase == Phase::Verifying {
                // The health gate: the Node's Ready condition (own Node watch) and the pods
                // bound to it (a watch that runs only while the gate holds).
                agent.watch_pods(&mut w);
                let pods = w.pods.borrow().clone();
                let rule = policy.as_ref().map(|p| p.rule_for(&view.labels));
                obs.health_gate = rule
                    .as_ref()
                    .and_then(|r| r.health_gate)
                    .map(|timeout| HealthGate {
                        timeout,
                        unhealthy: health::unhealthy(view.ready, pods.as_deref()),
                    });
                // The budgets the drain touched, as healthy as before the drain (a watch of the
                // budgets, again only while the gate holds).
                if let Some(gate) = obs.health_gate.as_mut()
                    && rule.as_ref().is_some_and(|r| r.health_budgets)
                    && !view.recorded.drained_budgets.is_empty()
                {
                    agent.watch_budgets(&mut w);
                    let budgets = w.budgets.borrow().clone();
                    gate.unhealthy.extend(health::budgets_unhealthy(
                        &view.recorded.drained_budgets,
                        budgets.as_deref(),
                    ));
                }
                // The rule's gate query, once the node and its DaemonSet pods are Ready: asked
                // again after --blocker-check-interval (the wait below wakes for it), a
                // recent answer reused when something else woke the loop.
                if let Some(gate) = obs.health_gate.as_mut()
                    && gate.unhealthy.is_empty()
                    && let Some(query) = rule.as_ref().and_then(|r| r.health_query.as_deref())
                {
                    gate_query_pending = true;
                    let cached = gate_query_cache
                        .as_ref()
                        .filter(|(t, _)| t.elapsed() < agent.cfg.blockers.interval)
                        .map(|(_, r)| r.clone());
                    let verdict = match cached {
                        Some(v) => v,
                        None => {
                            let v = gate_query(&agent, query).await;
                            gate_query_cache = Some((Instant::now(), v.clone()));
                            v
                        }
                    };
                    gate.unhealthy.extend(verdict);
                }
            }
            // The rule's soak, counted from the last release of a slot of this node's set (the
            // Leases it watches already carry it). Only for a claimed slot: a slot handed over
            // is claimed (full TTL) first, or it would expire while the node soaks.
            if let Some(slot) = held.as_ref()
                && let Some(soak) = policy.as_ref().and_then(|p| p.rule_for(&view.labels).soak)
                && [Some(slot), held_cap.as_ref()]
                    .into_iter()
                    .flatten()
                    .all(|s| leases.get(s).is_some_and(|l| !agent.lease_lock().needs_claim(l)))
            {
                obs.soak_until = lock::soak_until(&slots[0], &leases, soak);
            }
            let mut action = node::decide(&obs);
            if matches!(
                action,
                Action::AcquireLock | Action::Cordon | Action::Drain | Action::Reboot
            ) && !host_access.check(&agent)
            {
                // Right before a lock slot is taken or the node is touched: the preflight.
                obs.host_access_ok = false;
                action = node::decide(&obs);
            }
            if agent.cfg.blockers.any()
                && matches!(
                    action,
                    Action::AcquireLock | Action::Cordon | Action::Drain | Action::Reboot
                )
            {
                // Right before a step that takes the node out of service the check is fresh;
                // while the node waits in the queue a recent answer will do.
                let fresh = !matches!(action, Action::AcquireLock);
                let cached = block_cache
                    .as_ref()
                    .filter(|(t, _)| !fresh && t.elapsed() < agent.cfg.blockers.interval)
                    .map(|(_, r)| r.clone());
                let blocked = match cached {
                    Some(r) => r,
                    None => {
                        let r = blockers::check(&agent.client, &me, &agent.cfg.blockers).await;
                        block_cache = Some((Instant::now(), r.clone()));
                        r
                    }
                };
                if let Some(reason) = blocked {
                    debug!(node = %me, %reason, "reboot blocked");
                    obs.blocked_by = Some(reason);
                    action = node::decide(&obs);
                }
            }
            // A node holding only its group's slot that may not go on gives it back (it would
            // hold its group up for nothing).
            if partial && matches!(action, Action::Wait { .. }) {
                action = Action::ReleaseLock;
            }
            // Why the reboot is held back, on the Node for operators; written only on change.
            let held_back = match &action {
                Action::Wait {
                    reason: WaitReason::Blocked,
                    ..
                } => obs.blocked_by.clone(),
                Action::Wait {
                    reason:
                        r @ (WaitReason::WindowClosed
                        | WaitReason::RebootLoopBackoff
                        | WaitReason::FailureBackoff
                        | WaitReason::HostAccess
                        | WaitReason::Paused
                        | WaitReason::OperatorDrained),
                    ..
                } => Some(r.label().to_owned()),
                Action::Wait {
                    reason: WaitReason::HealthGate,
                    ..
                } => Some(crate::events::truncate(
                    &format!(
                        "health_gate: {}",
                        obs.health_gate
                            .as_ref()
                            .map(|g| g.unhealthy.join(", "))
                            .unwrap_or_default()
                    ),
                    200,
                )),
                Action::Wait {
                    reason: WaitReason::Soaking,
                    until,
                } => Some(match until {
                    Some(t) => format!("soaking until {}", node::format_time(*t)),
                    None => "soaking".to_owned(),
                }),
                _ => None,
            };
            let recorded_held_back = node_obj
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(node::ANN_BLOCKED_BY))
                .cloned();
            if held_back != recorded_held_back && !agent.cfg.dry_run {
                if let Some(p) = paused.as_ref().filter(|_| held_back.as_deref() == Some("paused")) {
                    agent.events.node(
                        Reason::RebootsPaused,
                        format!(
                            "reboot held back: reboots are paused {} (kreboot resume lifts it)",
                            p.describe()
                        ),
                    );
                    info!(node = %me, pause = %p.describe(), "reboot held back: reboots are paused");
                }
                if let Some(reason) = obs.blocked_by.as_deref().filter(|_| held_back.is_some()) {
                    agent
                        .events
                        .node(Reason::RebootBlocked, format!("reboot held back by {reason}"));
                    info!(node = %me, %reason, "reboot held back");
                }
                match agent
                    .patch_node(&node::blocked_by_patch(held_back.as_deref()))
                    .await
                {
                    Ok(n) => {
                        w.set_node(n);
                        continue;
                    }
                    Err(e) => warn!(node = %me, error = %e, "failed to record why the reboot waits"),
                }
            }
            agent
                .metrics
                .set(&agent.metrics.window_open, i64::from(window_open));
            // Only while this node has a reboot to do: a pause that holds nothing back is no news.
            agent
                .metrics
                .set(&agent.metrics.paused, i64::from(paused.is_some() && required));
            agent
                .metrics
                .set(&agent.metrics.lock_held, i64::from(held.is_some()));
            agent.metrics.set(
                &agent.metrics.cordoned,
                i64::from(view.unschedulable && view.recorded.cordoned_by_kreboot),
            );
            agent.metrics.set(
                &agent.metrics.health_gate_failed,
                i64::from(
                    view.recorded.phase == Phase::Verifying && view.recorded.health_gate_failed.is_some(),
                ),
            );
            agent.metrics.set(
                &agent.metrics.reboot_loop_backoff,
                i64::from(matches!(
                    action,
                    Action::Wait {
                        reason: WaitReason::RebootLoopBackoff,
                        ..
                    }
                )),
            );
            debug!(node = %me, phase = view.recorded.phase.name(), ?action, "decided");

            if required && !announced_required && view.recorded.phase == Phase::Idle {
                announced_required = true;
                let packages = sentinel_state.packages.join(", ");
                let mut note = match (&requested, sentinel_state.required) {
                    (Some(r), false) => format!("an operator asked for a reboot ({})", r.describe()),
                    (Some(r), true) => format!(
                        "an operator asked for a reboot ({}); the host requires one",
                        r.describe()
                    ),
                    (None, _) => "the host requires a reboot".to_owned(),
                };
                if !packages.is_empty() {
                    note.push_str(&format!(" for: {packages}"));
                }
                agent.events.node(Reason::RebootRequired, note);
                // `kreboot_reboot_required_info{reason}`: the packages, and `requested` for an
                // operator's request (the sentinel's series keep their labels).
                let mut reasons = Vec::new();
                if sentinel_state.required {
                    reasons.push(crate::events::truncate(&packages, 200));
                }
                if requested.is_some() {
                    reasons.push("requested".to_owned());
                }
                for r in &reasons {
                    agent
                        .metrics
                        .required_reason
                        .with_label_values(&[me.as_str(), r])
                        .set(1);
                }
                let reason = match &requested {
                    Some(r) if packages.is_empty() => r.describe(),
                    Some(r) => format!("{packages} ({})", r.describe()),
                    None => packages,
                };
                let recorded = node_obj.metadata.annotations.as_ref();
                if !agent.cfg.dry_run
                    && recorded
                        .and_then(|a| a.get(node::ANN_REBOOT_REQUIRED_SINCE))
                        .is_none()
                {
                    // For operators (`kubectl get node -o yaml`, `kreboot status`): since when and why.
                    let patch = serde_json::json!({ "metadata": { "annotations": {
                        node::ANN_REBOOT_REQUIRED_SINCE: node::format_time(now),
                        node::ANN_REBOOT_REASON: crate::events::truncate(&reason, 1000),
                    }}});
                    match agent.patch_node(&patch).await {
                        Ok(n) => w.set_node(n),
                        Err(e) => warn!(node = %me, error = %e, "failed to record why a reboot is needed"),
                    }
                }
            }
            if !required {
                announced_required = false;
                agent.metrics.required_reason.reset();
            }

            if agent.cfg.dry_run && !matches!(action, Action::Wait { .. }) {
                info!(node = %me, ?action, "dry run: would act; writing nothing");
                agent.metrics.set_state("pending");
                if !wait_for_change(&mut changes, &mut sentinel, None, &shutdown).await {
                    return Ok(Outcome::Shutdown);
                }
                continue;
            }

            let result: Result<(), StepError> = match action {
                Action::Wait { reason, until } => {
                    if reason == WaitReason::NotRequired
                        && held.is_none()
                        && view.recorded.phase == Phase::Idle
                    {
                        // Nothing to do and nothing held: drop the watches.
                        drop(w);
                        continue 'outer;
                    }
                    if view.waiting {
                        // No longer eligible: leave the queue so no slot is handed to us.
                        let patch = agent.taint_change(node::waiting_patch(None), &view, &node_obj, false);
                        match agent.patch_node(&patch).await {
                            Ok(n) => w.set_node(n),
                            Err(e) => warn!(node = %me, error = %e, "failed to leave the lock queue"),
                        }
                    }
                    let state = match reason {
                        WaitReason::AwaitingReboot => "rebooting",
                        WaitReason::HealthGate => "verifying",
                        _ => "pending",
                    };
                    agent.metrics.set_state(state);
                    agent.metrics.set_blocked(match reason {
                        WaitReason::NotRequired | WaitReason::AwaitingReboot => None,
                        WaitReason::Blocked => obs.blocked_by.as_deref().map(blockers::metric_label),
                        r => Some(r.label()),
                    });
                    let next_window = policy.as_ref().and_then(|p| p.next_transition(&view.labels, now));
                    // A blocked node looks at its blockers again after the interval.
                    let recheck = match reason {
                        WaitReason::Blocked => Some(Instant::now() + agent.cfg.blockers.interval),
                        // A refused preflight is tried again on a back-off.
                        WaitReason::HostAccess => Some(Instant::now() + HOST_ACCESS_RECHECK),
                        // A gate query is asked again (Prometheus sends no news).
                        WaitReason::HealthGate if gate_query_pending => {
                            Some(Instant::now() + agent.cfg.blockers.interval)
                        }
                        _ => None,
                    };
                    let deadline = [until, next_window]
                        .into_iter()
                        .flatten()
                        .min()
                        .map(|t| instant_at(now, t))
                        .into_iter()
                        .chain(recheck)
                        .min();
                    if !wait_for_change(&mut changes, &mut sentinel, deadline, &shutdown).await {
                        return Ok(Outcome::Shutdown);
                    }
                    Ok(())
                }
                Action::AcquireLock
                    if partial
                        && let Some((slot, lease)) = held
                            .as_ref()
                            .and_then(|h| leases.get(h).map(|l| (h, l)))
                            .filter(|(_, l)| agent.lease_lock().needs_claim(l)) =>
                {
                    // The group's slot was handed over (short duration): claim it with the full
                    // TTL before waiting for a cap slot, or it would expire meanwhile.
                    match agent.lease_lock().acquire(slot, Some(lease), now).await {
                        Ok(l) => {
                            info!(node = %me, lease = %slot, "lock handed over and claimed; waiting for a cap slot");
                            w.set_lease(l, Instant::now());
                            agent
                                .events
                                .node(Reason::LockAcquired, format!("reboot lock {slot} handed over"));
                            Ok(())
                        }
                        Err(lock::LockError::Conflict { .. }) => wait_briefly(&w, &shutdown).await,
                        Err(e) => Err(StepError::Api(e.to_string())),
                    }
                }
                Action::AcquireLock => {
                    let pooled = !partial && Agent::needs_pool(policy.as_ref(), &view.labels);
                    let mut counted_at = None;
                    let slots = match policy.as_ref().filter(|_| pooled) {
                        // Holding the group's slot: compete for a cap slot; a percentage cap is a
                        // share of the rule's nodes, counted (as the group's pool is) first.
                        None if partial => match policy
                            .as_ref()
                            .filter(|p| Agent::needs_rule_pool(Some(p), &view.labels))
                        {
                            None => cap_slots.clone().unwrap_or_default(),
                            Some(p) => match PoolCount::size(
                                &mut rule_pool_count,
                                &agent,
                                p,
                                &view.labels,
                                POOL_MAX_AGE,
                                true,
                            )
                            .await
                            {
                                Ok((size, at)) => {
                                    counted_at = Some(at);
                                    lock::cap_slot_set(
                                        &agent.cfg.lock_name,
                                        Some(&p.rule_for(&view.labels)),
                                        Some(size),
                                    )
                                    .unwrap_or_default()
                                }
                                Err(e) => {
                                    // No count, no cap slot: the cap cannot be known.
                                    warn!(node = %me, error = %e, "cannot count the nodes of the rule");
                                    tokio::select! {
                                        _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                                        _ = tokio::time::sleep(backoff(attempt)) => {}
                                    }
                                    attempt += 1;
                                    continue;
                                }
                            },
                        },
                        None => slots,
                        Some(p) => {
                            match PoolCount::size(
                                &mut pool_count,
                                &agent,
                                p,
                                &view.labels,
                                POOL_MAX_AGE,
                                false,
                            )
                            .await
                            {
                                Ok((size, at)) => {
                                    counted_at = Some(at);
                                    agent.slots_for(policy.as_ref(), &view.labels, Some(size))
                                }
                                Err(e) => {
                                    // No count, no slot: the budget cannot be known.
                                    warn!(node = %me, error = %e, "cannot count the nodes of the rule's pool");
                                    tokio::select! {
                                        _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                                        _ = tokio::time::sleep(backoff(attempt)) => {}
                                    }
                                    attempt += 1;
                                    continue;
                                }
                            }
                        }
                    };
                    let picked =
                        lock::pick_slot(&slots, &leases, &seen, now, Instant::now(), |h| w.holder_node(h));
                    if picked.is_some() && counted_at.is_some_and(|t| t.elapsed() > POOL_FRESH) {
                        // About to take a slot on an old count: count again first (a pool that
                        // shrank has fewer slots), then decide again.
                        pool_count = None;
                        rule_pool_count = None;
                        continue;
                    }
                    match picked {
                        Some(slot) => {
                            // Slots normally pass from holder to waiter directly; a free slot
                            // means start-up or a holder that could not hand over. A short
                            // random delay keeps many waiters from racing for it at once:
                            // whoever goes first is seen through the watch by the others.
                            let jitter = Duration::from_millis(rand::random_range(0..FREE_SLOT_JITTER_MS));
                            let mut lease_rx = w.leases.subscribe();
                            tokio::select! {
                                _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                                _ = lease_rx.changed() => continue,
                                _ = tokio::time::sleep(jitter) => {}
                            }
                            // Taking over another node's slot (expired, or its Node gone):
                            // the watches said its holder is idle or gone, but a watch can lag
                            // (a slow or restarted API server, etcd stopped): read the holder's
                            // Node afresh, and take the slot only if it really records no cycle.
                            // Found by the chaos run on the real control plane: a waiter took an
                            // expired slot whose holder had cordoned itself 13 ms after taking it,
                            // a cordon its watch had not yet delivered: three nodes out of two.
                            if let Some(holder) = leases
                                .get(&slot)
                                .and_then(lock::holder)
                                .filter(|h| *h != me.as_str())
                            {
                                match agent.node_api().get_opt(holder).await {
                                    Ok(Some(n)) if watches::holder_state(&n) != lock::HolderNode::Idle => {
                                        info!(node = %me, lease = %slot, %holder, "the expired slot's holder is still in its cycle; not taking it");
                                        if wait_briefly(&w, &shutdown).await.is_err() {
                                            return Ok(Outcome::Shutdown);
                                        }
                                        continue;
                                    }
                                    Ok(_) => {}
                                    Err(e) => {
                                        warn!(node = %me, %holder, error = %e, "cannot read the expired slot's holder");
                                        tokio::time::sleep(backoff(attempt)).await;
                                        attempt += 1;
                                        continue;
                                    }
                                }
                            }
                            match agent.lease_lock().acquire(&slot, leases.get(&slot), now).await {
                                Ok(lease) => {
                                    info!(node = %me, lease = %slot, "lock acquired");
                                    w.set_lease(lease, Instant::now());
                                    agent
                                        .events
                                        .node(Reason::LockAcquired, format!("acquired reboot lock {slot}"));
                                    Ok(())
                                }
                                Err(lock::LockError::Conflict { .. }) => {
                                    debug!(node = %me, lease = %slot, "lost the race for the lock");
                                    wait_briefly(&w, &shutdown).await
                                }
                                Err(e) => Err(StepError::Api(e.to_string())),
                            }
                        }
                        None => {
                            if !view.waiting {
                                // Join the queue: the holder hands its slot to the longest waiter.
                                let patch = agent.taint_change(
                                    node::waiting_patch(Some(now)),
                                    &view,
                                    &node_obj,
                                    true,
                                );
                                match agent.patch_node(&patch).await {
                                    Ok(n) => w.set_node(n),
                                    Err(e) => warn!(node = %me, error = %e, "failed to join the lock queue"),
                                }
                            }
                            agent.metrics.set_state("waiting_for_lock");
                            agent.metrics.set_blocked(Some("lock_held_elsewhere"));
                            let look_again = w.watch_holders(
                                &agent.client,
                                &lock::holders(&slots, &leases, &seen, now, Instant::now()),
                            );
                            let expiry = lock::next_expiry(&slots, &leases, &seen, now, Instant::now());
                            let next_window =
                                policy.as_ref().and_then(|p| p.next_transition(&view.labels, now));
                            // A percentage budget: count the pool again now and then, to see
                            // it grow (a new slot) without a Lease change.
                            let recount = counted_at.map(|t| t + POOL_MAX_AGE);
                            let deadline = [expiry, next_window]
                                .into_iter()
                                .flatten()
                                .min()
                                .map(|t| instant_at(now, t))
                                .into_iter()
                                .chain(look_again)
                                .chain(recount)
                                .min();
                            if !wait_for_change(&mut changes, &mut sentinel, deadline, &shutdown).await {
                                return Ok(Outcome::Shutdown);
                            }
                            Ok(())
                        }
                    }
                }
                Action::Cordon => {
                    let slot = held.clone().unwrap_or_default();
                    let lock = agent.lease_lock();
                    // Each slot held is first claimed with our full TTL (when handed to us by the
                    // previous holder) and marked as the slot of our cycle (`lock::ANN_CYCLE_OF`),
                    // before the cordon: the conditional Lease write is the fence that keeps a
                    // waiter from taking the slot over while our cordon is on its way. With a
                    // soak the claim comes first and the mark after the soak (a soaking node is
                    // not out); without one, both in one write.
                    let soaks = policy
                        .as_ref()
                        .is_some_and(|p| p.rule_for(&view.labels).soak.is_some());
                    let to_write = [Some(&slot), held_cap.as_ref()]
                        .into_iter()
                        .flatten()
                        .find_map(|s| {
                            leases
                                .get(s)
                                .filter(|l| lock.needs_claim(l) || !lock::cycle_started(l))
                                .map(|l| (s.clone(), l))
                        });
                    if let Some((claim, lease)) = to_write {
                        let handed_over = lock.needs_claim(lease);
                        let written = if handed_over && soaks {
                            lock.acquire(&claim, Some(lease), now).await
                        } else {
                            lock.start_cycle(lease, now).await
                        };
                        match written {
                            Ok(l) => {
                                if handed_over {
                                    info!(node = %me, lease = %claim, "lock handed over and claimed");
                                    agent.events.node(
                                        Reason::LockAcquired,
                                        format!("reboot lock {claim} handed over"),
                                    );
                                } else {
                                    debug!(node = %me, lease = %claim, "cycle recorded on the lock");
                                }
                                w.set_lease(l, Instant::now());
                                continue;
                            }
                            Err(lock::LockError::Conflict { .. }) => {
                                if wait_briefly(&w, &shutdown).await.is_err() {
                                    return Ok(Outcome::Shutdown);
                                }
                                continue;
                            }
                            Err(e) => {
                                warn!(node = %me, error = %e, "failed to claim the handed-over lock");
                                tokio::time::sleep(backoff(attempt)).await;
                                attempt += 1;
                                continue;
                            }
                        }
                    }
                    let patch = node::with_label_changes(
                        agent.taint_change(node::cordon_patch(&view, &slot), &view, &node_obj, false),
                        &agent.cfg.pre_reboot_labels,
                        [],
                    );
                    match agent.patch_node(&patch).await {
                        Ok(n) => {
                            w.set_node(n);
                            agent.metrics.set_state("draining");
                            if view.unschedulable {
                                info!(node = %me, "node was already cordoned by an administrator; it will stay cordoned");
                                agent.events.node(Reason::Draining, "draining (node was already cordoned by someone else; kreboot will leave it cordoned)");
                            } else {
                                info!(node = %me, "cordoned");
                                agent
                                    .events
                                    .node(Reason::Cordoned, "cordoned by kreboot for a reboot");
                            }
                            Ok(())
                        }
                        Err(e) => Err(node_write_error(e)),
                    }
                }
                Action::Drain => {
                    let budgets = policy
                        .as_ref()
                        .is_some_and(|p| p.rule_for(&view.labels).health_budgets);
                    run_drain(&agent, &w, &view, budgets, &shutdown).await
                }
                Action::Reboot => run_reboot(&agent, &w, &view, policy.as_ref(), &shutdown).await,
                Action::Complete => {
                    // With a health gate the node is uncordoned but keeps its slot (phase
                    // `verifying`) until it is healthy.
                    let gate = policy
                        .as_ref()
                        .and_then(|p| p.rule_for(&view.labels).health_gate)
                        .and(held.as_ref());
                    let end = match gate {
                        Some(slot) => node::verifying_patch(&view, slot, now),
                        None => node::end_cycle_patch(&view, CycleEnd::Rebooted, now),
                    };
                    match agent
                        .patch_node(&node::with_label_changes(
                            agent.taint_change(end, &view, &node_obj, false),
                            &agent.cfg.post_reboot_labels,
                            agent.cfg.pre_reboot_labels.keys(),
                        ))
                        .await
                    {
                        Ok(n) => {
                            w.set_node(n);
                            agent
                                .metrics
                                .reboots_completed
                                .with_label_values(&[me.as_str()])
                                .inc();
                            if let Some(d) = view.recorded.drained {
                                agent
                                    .metrics
                                    .drain_duration
                                    .with_label_values(&[me.as_str(), "success"])
                                    .observe(d.millis as f64 / 1000.0);
                                agent
                                    .metrics
                                    .evictions
                                    .with_label_values(&[me.as_str()])
                                    .inc_by(d.evicted);
                            }
                            if view.recorded.cordoned_by_kreboot {
                                agent
                                    .events
                                    .node(Reason::Uncordoned, "node rebooted and Ready; uncordoned");
                            }
                            agent.events.node(
                                Reason::RebootCompleted,
                                format!("rebooted; new boot id {}", view.boot_id),
                            );
                            agent
                                .notifier
                                .send(NotifyEvent::Uncordon, &view.recorded.reboot_reason);
                            info!(node = %me, boot_id = %view.boot_id, "reboot completed");
                            if gate.is_some() {
                                info!(node = %me, "health gate: keeping the lock until the node and its DaemonSet pods are Ready");
                                Ok(())
                            } else {
                                release(&agent, &w).await
                            }
                        }
                        Err(e) => Err(node_write_error(e)),
                    }
                }
                Action::Verified => match agent.patch_node(&node::verified_patch(&view)).await {
                    Ok(n) => {
                        w.set_node(n);
                        info!(node = %me, "health gate passed; handing the lock on");
                        release(&agent, &w).await
                    }
                    Err(e) => Err(node_write_error(e)),
                },
                Action::FailHealthGate => {
                    match agent
                        .patch_node(&node::health_gate_failed_patch(&view, now))
                        .await
                    {
                        Ok(n) => {
                            w.set_node(n);
                            let what = obs
                                .health_gate
                                .as_ref()
                                .map(|g| g.unhealthy.join(", "))
                                .unwrap_or_default();
                            error!(node = %me, %what, "health gate timed out; keeping the lock: the rollout stops here");
                            agent.metrics.fail("health_gate", "timeout");
                            agent.events.node(
                                Reason::HealthGateFailed,
                                format!(
                                    "not healthy within the health gate timeout ({what}); the node keeps its lock slot, so no other node starts until it is healthy"
                                ),
                            );
                            Ok(())
                        }
                        Err(e) => Err(node_write_error(e)),
                    }
                }
                Action::Abort(reason) => {
                    let end = match reason {
                        node::AbortReason::LockLost => CycleEnd::Failed("lock lost"),
                        node::AbortReason::HostAccess => CycleEnd::Failed("host_access"),
                        _ => CycleEnd::Abandoned,
                    };
                    let patch = node::with_label_changes(
                        agent.taint_change(node::end_cycle_patch(&view, end, now), &view, &node_obj, false),
                        &BTreeMap::new(),
                        agent.cfg.pre_reboot_labels.keys(),
                    );
                    match agent.patch_node(&patch).await {
                        Ok(n) => {
                            w.set_node(n);
                            warn!(node = %me, reason = reason.label(), "cycle abandoned; node uncordoned if kreboot cordoned it");
                            agent.metrics.fail("cycle", reason.label());
                            agent.events.node(
                                Reason::CycleAborted,
                                format!("reboot cycle abandoned: {}", reason.label().replace('_', " ")),
                            );
                            release(&agent, &w).await
                        }
                        Err(e) => Err(node_write_error(e)),
                    }
                }
                Action::ReleaseLock => release(&agent, &w).await,
            };
            match result {
                Ok(()) => attempt = 0,
                Err(StepError::Stale) => {
                    // Our view was out of date: re-read the Node and decide again.
                    if let Ok(n) = agent.node_api().get(&me).await {
                        w.set_node(n);
                    }
                }
                Err(StepError::Shutdown) => return Ok(Outcome::Shutdown),
                Err(StepError::Api(message)) => {
                    warn!(node = %me, error = %message, retry_in = ?backoff(attempt), "API call failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Outcome::Shutdown),
                        _ = tokio::time::sleep(backoff(attempt)) => {}
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// Why a step did not complete.
enum StepError {
    /// 409: decide again on fresh state.
    Stale,
    /// Shutdown requested mid-step.
    Shutdown,
    /// Retry with back-off.
    Api(String),
}

fn node_write_error(e: kube::Error) -> StepError {
    match &e {
        kube::Error::Api(s) if s.code == 409 => StepError::Stale,
        _ => StepError::Api(e.to_string()),
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After losing a race, wait for the watch to bring the winner's write (or a second).
async fn wait_briefly(w: &Watches, shutdown: &CancellationToken) -> Result<(), StepError> {
    let mut leases = w.leases.subscribe();
    tokio::select! {
        _ = shutdown.cancelled() => Err(StepError::Shutdown),
        _ = leases.changed() => Ok(()),
        _ = tokio::time::sleep(Duration::from_secs(1)) => Ok(()),
    }
}

/// Hands on (or releases) every slot this node holds: its cap slot first, then its group's
/// (while the cap slot is still held, its group slot cannot be taken by a group waiter that
/// then finds the cap full because of this very node).
async fn release(agent: &Agent, w: &Watches) -> Result<(), StepError> {
    let mut held: Vec<Lease> = w
        .leases
        .borrow()
        .leases
        .values()
        .filter(|l| lock::holder(l) == Some(agent.cfg.node_name.as_str()))
        .cloned()
        .collect();
    held.sort_by_key(|l| !lock::is_cap_slot(&agent.cfg.lock_name, &l.name_any()));
    for lease in held {
        pass_on(agent, w, lease).await?;
    }
    Ok(())
}

/// `slots` and every other Lease of the lock, sorted (the slot set follows the policy; a slot
/// of an earlier set may still be held).
/// Evaluates a rule's `healthGate.query` against `--prometheus-url`: None when it returns no
/// series, else why the gate stays closed (see [`health::query_verdict`]).
async fn gate_query(agent: &Agent, query: &str) -> Option<String> {
    let Some(prometheus) = agent.cfg.blockers.prometheus.as_ref() else {
        // Refused at policy load; kept closed here too should it ever get this far.
        return Some("cannot evaluate healthGate.query: the agent has no --prometheus-url".to_owned());
    };
    let result = match reqwest::Client::builder().build() {
        Ok(http) => blockers::query_series(&http, &prometheus.url, query).await,
        Err(e) => Err(e.to_string()),
    };
    let verdict = health::query_verdict(&result);
    if let Some(v) = &verdict {
        debug!(node = %agent.cfg.node_name, verdict = %v, "health gate query holds the slot");
    }
    verdict
}

fn all_slots(slots: &[String], leases: &BTreeMap<String, Lease>) -> Vec<String> {
    let mut all: BTreeSet<String> = slots.iter().cloned().collect();
    all.extend(leases.keys().cloned());
    all.into_iter().collect()
}

/// Hands `lease` (held by this node) to the longest waiter, or releases it if nobody waits.
/// The size of the pool a percentage budget is a share of, counted for a hand-over (the rule's
/// nodes over all its groups when `whole_rule`, for a cap slot). None when it cannot be counted:
/// the hand-over then knows of slot 0 only, the cautious answer.
async fn pool_for_hand_over(
    agent: &Agent,
    policy: &Policy,
    labels: &crate::policy::Labels,
    whole_rule: bool,
) -> Option<usize> {
    match agent.count_pool(policy, labels, whole_rule).await {
        Ok(n) => Some(n),
        Err(e) => {
            let (what, slot) = if whole_rule {
                ("the rule's nodes", "cap slot 0")
            } else {
                ("the rule's pool", "slot 0")
            };
            warn!(error = %e, "cannot count {what}; handing over {slot} only");
            None
        }
    }
}

async fn pass_on(agent: &Agent, w: &Watches, lease: Lease) -> Result<(), StepError> {
    let lock = agent.lease_lock();
    let lock_name = &agent.cfg.lock_name;
    // Holders of any slot, and of cap slots alone.
    let (holders, cap_holders): (Vec<String>, Vec<String>) = {
        let s = w.leases.borrow();
        let of = |cap: Option<bool>| -> Vec<String> {
            s.leases
                .values()
                .filter(|l| cap.is_none_or(|c| lock::is_cap_slot(lock_name, &l.name_any()) == c))
                .filter_map(|l| lock::holder(l).map(str::to_owned))
                .collect()
        };
        (of(None), of(Some(true)))
    };
    let (policy, paused) = {
        let p = w.policy.borrow();
        (p.policy.clone(), p.paused.is_some())
    };
    let slot = lease.name_any();
    let my_labels = w
        .node
        .borrow()
        .node
        .as_ref()
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    // A percentage budget: the slots that exist for the pool as it is now. A slot beyond them
    // (the pool shrank) is handed to nobody (no waiter's set contains it) and is released.
    let pool = match policy.as_ref() {
        Some(p) if Agent::needs_pool(Some(p), &my_labels) => {
            pool_for_hand_over(agent, p, &my_labels, false).await
        }
        _ => None,
    };
    let now = agent.clock.now();
    if paused {
        // Paused: a waiter handed this slot would only give it back (and hand it to the next,
        // and so on). Free it; after the resume the waiters take it as a free slot.
        return release_only(agent, w, &lock, lease, now).await;
    }
    // Hand the slot to the node that has waited longest, if any: one write, no race.
    let waiting = ListParams::default().labels(&format!("{}=true", node::LABEL_WAITING));
    match agent.node_api().list(&waiting).await {
        Ok(list) => {
            let successor = if lock::is_cap_slot(lock_name, &slot) {
                // A cap slot: only to a waiter of the same rule that holds its group's slot
                // and waits for a cap slot (it starts at once). A percentage cap: the slots
                // that exist for the rule's nodes as they are now (a cap slot beyond them, the
                // rule having shrunk, is handed to nobody and released).
                let rule_pool = match policy.as_ref() {
                    Some(p) if Agent::needs_rule_pool(Some(p), &my_labels) => {
                        pool_for_hand_over(agent, p, &my_labels, true).await
                    }
                    _ => None,
                };
                let eligible: Vec<Node> = list
                    .items
                    .into_iter()
                    .filter(|n| {
                        let rule = policy.as_ref().map(|p| p.rule_for(n.labels()));
                        lock::cap_slot_set(lock_name, rule.as_ref(), rule_pool)
                            .is_some_and(|c| c.contains(&slot))
                            && holders.contains(&n.name_any())
                    })
                    .collect();
                node::pick_successor(&eligible, &agent.cfg.node_name, &cap_holders)
            } else {
                // Only a waiter that competes for this very slot (same lock group or rule).
                let eligible: Vec<Node> = list
                    .items
                    .into_iter()
                    .filter(|n| {
                        agent
                            .slots_for(policy.as_ref(), &n.labels().clone(), pool)
                            .contains(&slot)
                    })
                    .collect();
                node::pick_successor(&eligible, &agent.cfg.node_name, &holders)
            };
            if let Some(next) = successor {
                match lock.hand_off(&lease, &next, now).await {
                    Ok(l) => {
                        info!(node = %agent.cfg.node_name, lease = %l.name_any(), successor = %next, "lock handed over");
                        w.set_lease(l, Instant::now());
                        return Ok(());
                    }
                    Err(lock::LockError::Conflict { .. }) => return Err(StepError::Stale),
                    Err(e) => warn!(error = %e, "hand-over failed; releasing instead"),
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list waiting nodes; releasing the lock instead of handing it over")
        }
    }
    release_only(agent, w, &lock, lease, now).await
}

/// Frees `lease` (held by this node) without naming a successor.
async fn release_only(
    agent: &Agent,
    w: &Watches,
    lock: &LeaseLock,
    lease: Lease,
    now: DateTime<Utc>,
) -> Result<(), StepError> {
    match lock.release(&lease, now).await {
        Ok(Some(l)) => {
            info!(node = %agent.cfg.node_name, lease = %l.name_any(), "lock released");
            w.set_lease(l, Instant::now());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(lock::LockError::Conflict { .. }) => Err(StepError::Stale),
        Err(e) => Err(StepError::Api(e.to_string())),
    }
}

async fn run_drain(
    agent: &Agent,
    w: &Watches,
    view: &node::NodeView,
    budgets: bool,
    shutdown: &CancellationToken,
) -> Result<(), StepError> {
    let me = &agent.cfg.node_name;
    if budgets {
        // Before the first eviction, so that whatever happens next (a crash, the reboot) the
        // gate after the reboot knows which budgets to wait for.
        let touched = tokio::select! {
            _ = shutdown.cancelled() => return Err(StepError::Shutdown),
            t = agent.budgets_to_touch() => t.map_err(|e| StepError::Api(format!("listing the node's pods: {e}")))?,
        };
        if let Some(patch) = node::drained_budgets_patch(view, &touched) {
            let n = agent.patch_node(&patch).await.map_err(node_write_error)?;
            info!(node = %me, budgets = %health::encode_budgets(&touched), "recorded the disruption budgets the drain touches");
            w.set_node(n);
        }
    }
    agent.metrics.set_state("draining");
    agent.events.node(Reason::Draining, "evicting pods");
    agent
        .notifier
        .send(NotifyEvent::Drain, &view.recorded.reboot_reason);
    let cfg = DrainConfig {
        timeout: agent.cfg.drain_timeout,
        grace_period: agent.cfg.drain_grace_period,
        eviction_retry: agent.cfg.eviction_retry,
    };
    let started = Instant::now();
    let metrics = agent.metrics.clone();
    let on_retry = move || {
        metrics
            .eviction_retries
            .with_label_values(&[metrics.node()])
            .inc()
    };
    let result = tokio::select! {
        _ = shutdown.cancelled() => return Err(StepError::Shutdown),
        r = drain::drain(&agent.client, me, &cfg, &on_retry) => r,
    };
    let elapsed = started.elapsed().as_secs_f64();
    let now = agent.clock.now();
    match result {
        Ok(report) => {
            // Reported by the agent that sees the reboot complete (see node::ANN_DRAINED).
            let record = node::DrainRecord {
                millis: (elapsed * 1000.0).round() as u64,
                evicted: report.evicted as u64,
            };
            info!(node = %me, evicted = report.evicted, retries = report.retries, seconds = elapsed, "drained");
            let kernel = (agent.kernel_boot_id)();
            let n = agent
                .patch_node(&node::with_drain_record(
                    node::rebooting_patch(view, kernel.as_deref()),
                    record,
                ))
                .await
                .map_err(node_write_error)?;
            w.set_node(n);
            Ok(())
        }
        Err(e) => {
            agent
                .metrics
                .drain_duration
                .with_label_values(&[me.as_str(), "failure"])
                .observe(elapsed);
            agent.metrics.fail("drain", e.metric_label());
            if agent.cfg.force_reboot {
                warn!(node = %me, error = %e, "drain failed; rebooting anyway (--force-reboot)");
                agent.events.node(
                    Reason::DrainFailed,
                    format!("{e}; rebooting anyway (--force-reboot)"),
                );
                agent.notifier.send_detail(
                    NotifyEvent::DrainFailed,
                    &view.recorded.reboot_reason,
                    Some(&format!("{e}; rebooting anyway")),
                );
                let kernel = (agent.kernel_boot_id)();
                let n = agent
                    .patch_node(&node::rebooting_patch(view, kernel.as_deref()))
                    .await
                    .map_err(node_write_error)?;
                w.set_node(n);
                return Ok(());
            }
            error!(node = %me, error = %e, "drain failed; uncordoning and releasing the lock");
            agent.events.node(
                Reason::DrainFailed,
                format!("{e}; node uncordoned (if kreboot cordoned it) and lock released"),
            );
            agent.notifier.send_detail(
                NotifyEvent::DrainFailed,
                &view.recorded.reboot_reason,
                Some(&e.to_string()),
            );
            let n = agent
                .patch_node(&node::with_label_changes(
                    node::end_cycle_patch(view, CycleEnd::Failed(e.metric_label()), now),
                    &BTreeMap::new(),
                    agent.cfg.pre_reboot_labels.keys(),
                ))
                .await
                .map_err(node_write_error)?;
            w.set_node(n);
            release(agent, w).await
        }
    }
}

async fn run_reboot(
    agent: &Agent,
    w: &Watches,
    view: &node::NodeView,
    policy: Option<&Policy>,
    shutdown: &CancellationToken,
) -> Result<(), StepError> {
    let me = &agent.cfg.node_name;
    agent.metrics.set_state("rebooting");
    if !agent.cfg.reboot_delay.is_zero() {
        tokio::select! {
            _ = shutdown.cancelled() => return Err(StepError::Shutdown),
            _ = tokio::time::sleep(agent.cfg.reboot_delay) => {}
        }
    }
    // The window is checked again immediately before the reboot command runs.
    if !policy.is_some_and(|p| p.is_open(&view.labels, agent.clock.now())) {
        info!(node = %me, "window closed just before the reboot; deciding again");
        return Ok(());
    }
    info!(node = %me, command = ?agent.cfg.reboot_command, "rebooting");
    agent.events.node(Reason::Rebooting, "rebooting the node");
    agent
        .notifier
        .send(NotifyEvent::Reboot, &view.recorded.reboot_reason);
    agent.metrics.reboots.with_label_values(&[me.as_str()]).inc();
    match agent.rebooter.reboot().await {
        Ok(()) => {
            // The host is going down; the shutdown will SIGTERM us. Keep the lock and the
            // cordon. If nothing happens within REBOOT_WAIT, say so and decide again (which
            // requests the reboot again).
            tokio::select! {
                _ = shutdown.cancelled() => Err(StepError::Shutdown),
                _ = tokio::time::sleep(REBOOT_WAIT) => {
                    agent.metrics.fail("reboot", "host_did_not_reboot");
                    let detail = format!("the reboot was requested but the host was still up after {}s", REBOOT_WAIT.as_secs());
                    agent.notifier.send_detail(NotifyEvent::RebootFailed, &view.recorded.reboot_reason, Some(&detail));
                    agent.events.node(Reason::RebootFailed, detail);
                    error!(node = %me, "the host did not go down after the reboot request; retrying");
                    Ok(())
                }
            }
        }
        Err(e) => {
            // The request was refused: the host is not going down. The documented failure
            // path, as for a failed drain: uncordon (if kreboot cordoned), record the failure
            // (it starts --failure-backoff), release the lock. Never hold the lock and the
            // drained node while retrying.
            agent.metrics.fail("reboot", "command_failed");
            error!(node = %me, error = %e, "reboot failed; uncordoning and releasing the lock");
            agent.events.node(
                Reason::RebootFailed,
                format!("{e}; node uncordoned (if kreboot cordoned it) and lock released"),
            );
            agent.notifier.send_detail(
                NotifyEvent::RebootFailed,
                &view.recorded.reboot_reason,
                Some(&e.to_string()),
            );
            let n = agent
                .patch_node(&node::with_label_changes(
                    node::end_cycle_patch(view, CycleEnd::Failed("reboot_failed"), agent.clock.now()),
                    &BTreeMap::new(),
                    agent.cfg.pre_reboot_labels.keys(),
                ))
                .await
                .map_err(node_write_error)?;
            w.set_node(n);
            release(agent, w).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_never_moves_backwards() {
        assert!(newer(Some("5"), Some("6")));
        assert!(newer(Some("5"), Some("5")));
        assert!(!newer(Some("6"), Some("5")));
        assert!(newer(None, Some("1")));
        assert!(
            newer(Some("opaque"), Some("other")),
            "non-numeric versions: take the incoming one"
        );
        // resourceVersions are opaque strings: whenever either is not an integer, the
        // incoming version wins (never a parse error, never a stuck cache).
        assert!(newer(Some("7"), Some("a1b2")));
        assert!(newer(Some("a1b2"), Some("3")));
        assert!(newer(Some(""), Some("3")));
        assert!(
            newer(Some("18446744073709551616"), Some("1")),
            "beyond u64: opaque"
        );
        assert!(newer(Some("5"), None));
    }

    #[test]
    fn backoff_is_bounded() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
