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
//!
//! Where each part lives: [`run`] and the idle wait here; one engagement's loop in `cycle`
//! (a turn: observe, decide, act), what a turn sees in `observe`, the steps of a reboot in
//! `steps` (wait, cordon, drain, reboot, uncordon...), taking a slot in `slot`, releasing and
//! handing over in `hand_over`, the caches the observations come from in `watches`.

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

mod cycle;
mod hand_over;
mod observe;
mod slot;
mod steps;
mod watches;
use cycle::*;
use hand_over::*;
use observe::*;
use slot::*;
use watches::*;

/// The key of the policy document in the ConfigMap.
pub const CONFIG_KEY: &str = crate::policy::CONFIG_KEY;

/// How long the agent waits for the host to go down after the reboot request was accepted,
/// before it reports the reboot as failed and requests it again.
pub const REBOOT_WAIT: Duration = Duration::from_secs(300);

/// How long an idle agent's one watch (its own Node, for `kreboot reboot`) runs before it is
/// renewed. kube-rs renews every 290 s, which is one request per idle node every 5 minutes:
/// 17 requests a second from 5,000 idle nodes, measured on the real kube-apiserver. Renewed
/// every 30 minutes (kube-apiserver's own default `--min-request-timeout`) that is 2.8 a
/// second. A silently dead connection is still found within 45 s by the HTTP/2 pings (see
/// `connect`); over HTTP/1.1 (a proxy) only at the renewal, which delays a `kreboot reboot`
/// request, never a sentinel (inotify).
const IDLE_WATCH_SECS: u32 = 1800;

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
            let held = leases.borrow().held_by(&agent.cfg.node_name);
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
    sentinel: watch::Receiver<SentinelState>,
    shutdown: CancellationToken,
) -> anyhow::Result<Outcome> {
    // Whether the Node carries an operator's request (`kreboot reboot`), for the metrics.
    let (requested, requested_rx) = watch::channel(false);
    let mut run = Run {
        sentinel,
        shutdown,
        requested,
        attempt: 0,
        host_access: HostAccess::default(),
    };
    let _sentinel_metrics = AbortOnDrop(spawn_sentinel_metrics(
        agent.metrics.clone(),
        run.sentinel.clone(),
        requested_rx,
    ));
    // The preflight at start-up: a pod that cannot reboot its node says so at once, long before
    // a reboot is needed (it runs again right before every step that disrupts the node).
    run.host_access.check(&agent);
    loop {
        // Disengaged: wait for the sentinel unless the cluster records work for this node.
        if !run.sentinel.borrow_and_update().required {
            match idle(&agent, &mut run).await {
                Idle::Engage => {}
                Idle::LookAgain => continue,
                Idle::Shutdown => return Ok(Outcome::Shutdown),
            }
        }
        // Engaged: decide on the caches and act, until nothing is left to do.
        let mut cycle = Cycle::engage(&agent, &mut run);
        loop {
            match cycle.turn().await {
                Ok(()) | Err(Next::Decide) => {}
                Err(Next::Disengage) => break,
                Err(Next::Shutdown) => return Ok(Outcome::Shutdown),
            }
        }
    }
}

/// How a disengaged agent's wait ends.
enum Idle {
    /// The cluster records work for this node (a cycle, a slot held): engage.
    Engage,
    /// The sentinel changed, an operator asked for a reboot, or the API server could not be
    /// asked: look again.
    LookAgain,
    /// Shutdown was requested.
    Shutdown,
}

/// The disengaged agent: unless the Node records a cycle or holds a slot, it waits for the
/// sentinel or an operator's request, with no API watch but its own Node's.
async fn idle(agent: &Agent, run: &mut Run) -> Idle {
    let me = &agent.cfg.node_name;
    match agent.needs_engagement().await {
        Ok(false) => {}
        Ok(true) => return Idle::Engage,
        Err(e) => {
            warn!(node = %me, error = %e, retry_in = ?backoff(run.attempt), "cannot reach the API server; retrying");
            tokio::select! {
                _ = run.shutdown.cancelled() => return Idle::Shutdown,
                _ = tokio::time::sleep(backoff(run.attempt)) => {}
            }
            run.attempt += 1;
            return Idle::LookAgain;
        }
    }
    run.attempt = 0;
    agent.metrics.set_state("idle");
    agent.metrics.set_blocked(None);
    agent.metrics.set(&agent.metrics.paused, 0);
    run.requested.send_if_modified(|r| std::mem::replace(r, false));
    debug!(node = %me, "idle: waiting for the sentinel or an operator's request");
    // The one watch of an idle agent: its own Node, for `kreboot reboot`. Served
    // from the API server's watch cache; no polling.
    let (request_tx, mut request_rx) = watch::channel(false);
    let _requests = AbortOnDrop(tokio::spawn(follow_named_for(
        agent.node_api(),
        me.clone(),
        "own Node (reboot requests)",
        Some(IDLE_WATCH_SECS),
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
            _ = run.shutdown.cancelled() => return Idle::Shutdown,
            r = run.sentinel.changed() => if r.is_err() { return Idle::Shutdown } else { break },
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
    Idle::LookAgain
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
