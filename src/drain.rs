//! Draining a node through the Eviction API, so PodDisruptionBudgets are respected.
//!
//! Like `kubectl drain`: DaemonSet-owned pods (their controller would recreate them at once),
//! mirror pods (the kubelet owns them) and finished pods are skipped; every other pod is evicted
//! concurrently. A 429 (a PDB forbids the disruption now), a 409 (the budget's status changed
//! under the API server's check) or a transient 5xx is retried at a fixed interval; a 404 means
//! the pod is already gone. A pod that more than one PodDisruptionBudget selects cannot be
//! evicted at all (the API server answers 500 saying so): that fails the drain at once, with
//! the reason, instead of retrying until the timeout. The drain then waits, through a watch of
//! the node's pods, until every evicted pod is gone — by name *and* uid, as `kubectl drain`
//! does: a StatefulSet's replacement has the evicted pod's name but is another pod. The whole
//! drain is bounded by `--drain-timeout`: on expiry it fails and the caller decides (uncordon
//! and release, or force the reboot).
//!
//! The Eviction body is posted as a real `policy/v1` `Eviction` object: kube-rs 5's `evict`
//! serialises `delete_options` in snake case, which the API server drops, losing the grace
//! period (see API-NOTES). The client used here must not retry 429 on its own (kreboot builds
//! its clients with `default_retry = false`), or the timeout would mean nothing.
//!
//! [`drain_with_progress`] also reports each step ([`DrainProgress`]) for a display (`kreboot
//! drain`); [`drain`], the agent's entry point, is the same drain without a display.

use std::{collections::BTreeSet, time::Duration};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, PostParams, ResourceExt},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio::{sync::mpsc::UnboundedSender, time::Instant};
use tracing::{debug, info, warn};

/// How long to wait before retrying an eviction refused with 429 or a 5xx. Five seconds is what
/// `kubectl drain` and brupop use: PDB status changes on the order of seconds.
pub const DEFAULT_EVICTION_RETRY: Duration = Duration::from_secs(5);

/// How many evictions are in flight at once; enough to drain a full node (110 pods) in a
/// couple of round trips without flooding the API server.
pub const EVICTION_CONCURRENCY: usize = 32;

/// Why a pod is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Owned by a DaemonSet.
    DaemonSet,
    /// A static pod's mirror.
    Mirror,
    /// Succeeded or Failed.
    Finished,
    /// Already terminating (will be gone by itself; still waited for).
    Terminating,
}

/// What to do with one pod.
pub fn classify(pod: &Pod) -> Option<Skip> {
    if pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return Some(Skip::Mirror);
    }
    if pod.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.kind == "DaemonSet" && r.controller.unwrap_or(true))
    }) {
        return Some(Skip::DaemonSet);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Some(Skip::Finished);
    }
    if pod.metadata.deletion_timestamp.is_some() {
        return Some(Skip::Terminating);
    }
    None
}

/// The pods that must be evicted, and those that must be gone before the drain is done
/// (evicted plus already terminating).
pub fn plan(pods: &[Pod]) -> (Vec<&Pod>, Vec<&Pod>) {
    let mut evict = Vec::new();
    let mut wait_for = Vec::new();
    for pod in pods {
        match classify(pod) {
            None => {
                evict.push(pod);
                wait_for.push(pod);
            }
            Some(Skip::Terminating) => wait_for.push(pod),
            Some(_) => {}
        }
    }
    (evict, wait_for)
}

/// Settings of one drain.
#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// Upper bound of the whole drain.
    pub timeout: Duration,
    /// Grace period given to evicted pods (None: each pod's own).
    pub grace_period: Option<i64>,
    /// Interval between retries of a refused eviction.
    pub eviction_retry: Duration,
}

/// What a finished drain did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Pods evicted.
    pub evicted: usize,
    /// Eviction attempts refused (429/5xx) and retried.
    pub retries: usize,
}

/// One step of a drain, for a progress display. Pods are `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainProgress {
    /// The node's pods were listed: `evict` will be evicted, `wait` (evicted plus already
    /// terminating) must be gone, `skipped` are left alone.
    Started {
        /// The node.
        node: String,
        /// Pods to evict.
        evict: usize,
        /// Pods waited for.
        wait: usize,
        /// Pods left alone (DaemonSet, mirror, finished).
        skipped: usize,
    },
    /// The API server accepted the eviction (or the pod was already gone).
    Evicted {
        /// The pod.
        pod: String,
    },
    /// The eviction was refused for now (429: a PodDisruptionBudget; or a 5xx) and is retried
    /// after the retry interval.
    Retrying {
        /// The pod.
        pod: String,
        /// The API server's message.
        message: String,
    },
    /// The pod no longer exists.
    Gone {
        /// The pod.
        pod: String,
    },
}

/// Why a drain failed.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// `--drain-timeout` elapsed; `remaining` pods were still there.
    #[error("drain timed out after {timeout:?} with {remaining} pod(s) left ({blocked})")]
    Timeout {
        /// The configured bound.
        timeout: Duration,
        /// Pods not gone.
        remaining: usize,
        /// The last refusal seen, e.g. a PDB message.
        blocked: String,
    },
    /// Listing or watching the node's pods failed.
    #[error("failed to list pods on node {node}: {source}")]
    List {
        /// The node.
        node: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// An eviction was refused for a reason retrying cannot fix (e.g. 403).
    #[error("eviction of {pod} refused: {message}")]
    Refused {
        /// namespace/name.
        pod: String,
        /// The API server's message.
        message: String,
    },
}

impl DrainError {
    /// A stable label for the failure metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DrainError::Timeout { .. } => "drain_timeout",
            DrainError::List { .. } => "drain_list_failed",
            DrainError::Refused { .. } => "eviction_refused",
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// One pod instance: `namespace/name` and uid. A pod recreated under the same name (a
/// StatefulSet's) has a new uid: it is not the pod that was evicted.
fn pod_instance(pod: &Pod) -> (String, String) {
    (pod_key(pod), pod.uid().unwrap_or_default())
}

/// The API server's answer to an eviction of a pod that two or more PodDisruptionBudgets select
/// (a 500, `pkg/registry/core/pod/storage/eviction.go`); retrying cannot help.
const MULTIPLE_BUDGETS: &str = "more than one PodDisruptionBudget";

/// The `policy/v1` Eviction body for `pod`.
pub fn eviction_body(pod: &Pod, grace_period: Option<i64>) -> Value {
    let mut body = json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": { "name": pod.name_any(), "namespace": pod.namespace().unwrap_or_default() },
    });
    if let Some(g) = grace_period {
        body["deleteOptions"] = json!({ "gracePeriodSeconds": g });
    }
    body
}

enum EvictOutcome {
    Done,
    Retry(String),
    Fatal(String),
}

async fn evict_once(client: &Client, pod: &Pod, grace: Option<i64>) -> EvictOutcome {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let body = eviction_body(pod, grace);
    match api
        .create_subresource::<_, Value>("eviction", &pod.name_any(), &PostParams::default(), &body)
        .await
    {
        Ok(_) => EvictOutcome::Done,
        Err(kube::Error::Api(s)) if s.code == 404 => EvictOutcome::Done,
        // Overlapping budgets: only an operator can fix that. Said plainly, at once.
        Err(kube::Error::Api(s)) if s.code == 500 && s.message.contains(MULTIPLE_BUDGETS) => {
            EvictOutcome::Fatal(format!(
                "{} ({}); make at most one PodDisruptionBudget select the pod",
                s.message, s.code
            ))
        }
        // 409: the eviction lost a race (the budget's status was updated meanwhile); the pod
        // is still there. Not done: try again.
        Err(kube::Error::Api(s)) if s.code == 429 || s.code == 409 || s.code >= 500 => {
            EvictOutcome::Retry(s.message.clone())
        }
        Err(kube::Error::Api(s)) => EvictOutcome::Fatal(format!("{} ({})", s.message, s.code)),
        // Transport errors (connection reset, timeout) are transient.
        Err(e) => EvictOutcome::Retry(e.to_string()),
    }
}

/// Evicts one pod, retrying refusals at `cfg.eviction_retry` until it is accepted (the caller
/// bounds the whole drain with its deadline).
async fn evict_until_done(
    client: &Client,
    pod: Pod,
    cfg: &DrainConfig,
    on_retry: &(dyn Fn() + Sync),
    last_refusal: &std::sync::Mutex<String>,
    retries: &std::sync::atomic::AtomicUsize,
    progress: Option<&UnboundedSender<DrainProgress>>,
) -> Result<(), DrainError> {
    let report = |p: DrainProgress| {
        if let Some(tx) = progress {
            // A display that went away must not stop the drain.
            let _ = tx.send(p);
        }
    };
    loop {
        match evict_once(client, &pod, cfg.grace_period).await {
            EvictOutcome::Done => {
                report(DrainProgress::Evicted { pod: pod_key(&pod) });
                return Ok(());
            }
            EvictOutcome::Fatal(message) => {
                return Err(DrainError::Refused {
                    pod: pod_key(&pod),
                    message,
                });
            }
            EvictOutcome::Retry(message) => {
                debug!(pod = %pod_key(&pod), %message, "eviction refused, retrying");
                retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                on_retry();
                *last_refusal.lock().unwrap_or_else(|e| e.into_inner()) =
                    format!("{}: {message}", pod_key(&pod));
                report(DrainProgress::Retrying {
                    pod: pod_key(&pod),
                    message,
                });
                tokio::time::sleep(cfg.eviction_retry).await;
            }
        }
    }
}

/// Evicts every evictable pod on `node` and waits until they are gone, within `cfg.timeout`.
///
/// `on_retry` is called for every refused attempt (for the metric).
///
/// # Errors
/// [`DrainError`] on timeout, on a non-retryable refusal, or when the pods cannot be listed.
pub async fn drain(
    client: &Client,
    node: &str,
    cfg: &DrainConfig,
    on_retry: &(dyn Fn() + Sync),
) -> Result<DrainReport, DrainError> {
    drain_with_progress(client, node, cfg, on_retry, None).await
}

/// [`drain`], reporting each step to `progress` (when given) as it happens.
///
/// # Errors
/// As [`drain`].
pub async fn drain_with_progress(
    client: &Client,
    node: &str,
    cfg: &DrainConfig,
    on_retry: &(dyn Fn() + Sync),
    progress: Option<&UnboundedSender<DrainProgress>>,
) -> Result<DrainReport, DrainError> {
    let run = DrainRun::new(client, node, cfg, on_retry, progress);
    let pods = run.list_pods().await?;
    let (to_evict, wait_for) = plan(&pods);
    // By name and uid: see `pod_instance`.
    let mut remaining: BTreeSet<(String, String)> = wait_for.iter().map(|p| pod_instance(p)).collect();
    info!(node, evict = to_evict.len(), wait = remaining.len(), "draining");
    run.report(DrainProgress::Started {
        node: node.to_owned(),
        evict: to_evict.len(),
        wait: remaining.len(),
        skipped: pods.len() - remaining.len(),
    });
    run.evict_all(&to_evict, remaining.len()).await?;
    // Whether the watch finished or the deadline cut it short, what is left decides.
    let _ = tokio::time::timeout_at(run.deadline, run.wait_until_gone(&mut remaining)).await;
    if remaining.is_empty() {
        Ok(DrainReport {
            evicted: to_evict.len(),
            retries: run.retries.into_inner(),
        })
    } else {
        Err(run.timed_out(remaining.len()))
    }
}

/// One drain under way: its settings, its deadline, and what its evictions share.
struct DrainRun<'a> {
    client: &'a Client,
    node: &'a str,
    cfg: &'a DrainConfig,
    on_retry: &'a (dyn Fn() + Sync),
    progress: Option<&'a UnboundedSender<DrainProgress>>,
    deadline: Instant,
    /// Pods in every namespace, narrowed to the node by `selector`.
    all: Api<Pod>,
    selector: String,
    /// The last refused eviction, `namespace/name: message`, for the timeout's reason.
    last_refusal: std::sync::Mutex<String>,
    retries: std::sync::atomic::AtomicUsize,
}

impl<'a> DrainRun<'a> {
    fn new(
        client: &'a Client,
        node: &'a str,
        cfg: &'a DrainConfig,
        on_retry: &'a (dyn Fn() + Sync),
        progress: Option<&'a UnboundedSender<DrainProgress>>,
    ) -> Self {
        let deadline = Instant::now() + cfg.timeout;
        DrainRun {
            client,
            node,
            cfg,
            on_retry,
            progress,
            deadline,
            all: Api::all(client.clone()),
            selector: format!("spec.nodeName={node}"),
            last_refusal: std::sync::Mutex::new(String::new()),
            retries: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn report(&self, p: DrainProgress) {
        if let Some(tx) = self.progress {
            let _ = tx.send(p);
        }
    }

    /// The pods on the node, listed within the deadline.
    async fn list_pods(&self) -> Result<Vec<Pod>, DrainError> {
        let list = tokio::time::timeout_at(
            self.deadline,
            self.all.list(&ListParams::default().fields(&self.selector)),
        )
        .await
        .map_err(|_| DrainError::Timeout {
            timeout: self.cfg.timeout,
            remaining: 0,
            blocked: "listing pods did not finish".into(),
        })?
        .map_err(|source| DrainError::List {
            node: self.node.into(),
            source,
        })?;
        Ok(list.items)
    }

    /// Evicts `to_evict` concurrently, each until accepted, within the deadline; `remaining`
    /// is what a timeout reports as left.
    async fn evict_all(&self, to_evict: &[&Pod], remaining: usize) -> Result<(), DrainError> {
        // Owned pods: a closure over `&Pod` makes the drain future not `Send` (a known
        // higher-ranked-lifetime limitation of async closures in streams).
        let owned: Vec<Pod> = to_evict.iter().map(|p| (*p).clone()).collect();
        let evictions = stream::iter(owned)
            .map(|pod| {
                evict_until_done(
                    self.client,
                    pod,
                    self.cfg,
                    self.on_retry,
                    &self.last_refusal,
                    &self.retries,
                    self.progress,
                )
            })
            .buffer_unordered(EVICTION_CONCURRENCY)
            .try_collect::<Vec<()>>();
        match tokio::time::timeout_at(self.deadline, evictions).await {
            Err(_) => Err(self.timed_out(remaining)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Waits for the pods to be gone, through a watch (no polling): the watcher's initial list
    /// tells which of them still exist (the same name with another uid is another pod), and
    /// Delete events strike them off.
    async fn wait_until_gone(&self, remaining: &mut BTreeSet<(String, String)>) {
        let stream = watcher(
            self.all.clone(),
            watcher::Config::default().fields(&self.selector),
        )
        .default_backoff();
        futures::pin_mut!(stream);
        let mut listing: Option<BTreeSet<(String, String)>> = None;
        while !remaining.is_empty() {
            match stream.next().await {
                Some(Ok(watcher::Event::Init)) => listing = Some(BTreeSet::new()),
                Some(Ok(watcher::Event::InitApply(p))) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(pod_instance(&p));
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    if let Some(l) = listing.take() {
                        self.keep_listed(remaining, &l);
                    }
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    let instance = pod_instance(&p);
                    if remaining.remove(&instance) {
                        self.report(DrainProgress::Gone { pod: instance.0 });
                    }
                }
                Some(Ok(watcher::Event::Apply(_))) => {}
                Some(Err(e)) => warn!(node = self.node, error = %e, "pod watch failed, retrying"),
                None => break,
            }
        }
    }

    /// Strikes off the pods a fresh listing no longer has.
    fn keep_listed(&self, remaining: &mut BTreeSet<(String, String)>, listing: &BTreeSet<(String, String)>) {
        remaining.retain(|instance| {
            let there = listing.contains(instance);
            if !there {
                self.report(DrainProgress::Gone {
                    pod: instance.0.clone(),
                });
            }
            there
        });
    }

    /// The timeout, with the last refusal as its reason.
    fn timed_out(&self, remaining: usize) -> DrainError {
        let msg = self
            .last_refusal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let blocked = if msg.is_empty() {
            "waiting for pods to terminate".to_owned()
        } else {
            msg
        };
        DrainError::Timeout {
            timeout: self.cfg.timeout,
            remaining,
            blocked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    fn pod(name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn classification_follows_kubectl_drain() {
        let plain = pod("app");
        assert_eq!(classify(&plain), None);

        let mut ds = pod("ds");
        ds.metadata.owner_references = Some(vec![OwnerReference {
            kind: "DaemonSet".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        assert_eq!(classify(&ds), Some(Skip::DaemonSet));

        let mut rs = pod("rs");
        rs.metadata.owner_references = Some(vec![OwnerReference {
            kind: "ReplicaSet".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        assert_eq!(classify(&rs), None);

        let mut mirror = pod("static");
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_string(), "x".to_string())].into());
        assert_eq!(classify(&mirror), Some(Skip::Mirror));

        let mut done = pod("job");
        done.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some("Succeeded".into()),
            ..Default::default()
        });
        assert_eq!(classify(&done), Some(Skip::Finished));

        let mut dying = pod("dying");
        dying.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        assert_eq!(classify(&dying), Some(Skip::Terminating));

        let pods = vec![plain, ds, rs, mirror, done, dying];
        let (evict, wait) = plan(&pods);
        let names = |v: Vec<&Pod>| v.iter().map(|p| p.name_any()).collect::<Vec<_>>();
        assert_eq!(names(evict), vec!["app", "rs"]);
        assert_eq!(names(wait), vec!["app", "rs", "dying"]);
    }

    #[test]
    fn eviction_body_is_a_policy_v1_eviction_with_camel_case_delete_options() {
        let body = eviction_body(&pod("web"), Some(7));
        assert_eq!(body["apiVersion"], "policy/v1");
        assert_eq!(body["kind"], "Eviction");
        assert_eq!(body["deleteOptions"]["gracePeriodSeconds"], 7);
        assert!(body.get("delete_options").is_none());
        assert!(eviction_body(&pod("web"), None).get("deleteOptions").is_none());
    }
}
