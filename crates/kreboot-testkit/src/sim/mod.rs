//! The simulated cluster: a Kubernetes-API-compatible HTTP server with simulated kubelets.
//!
//! The fast tests, chaos, `cargo demo` and the benchmarks' simulated column run against this
//! server (the scenarios run on the real kube-apiserver too: `tests/common/real.rs`). kreboot talks to it only through kube-rs over HTTP,
//! exactly as to a real cluster. It keeps the semantics kreboot depends on: resourceVersions and
//! 409 conflicts, status subresources, list with selectors and pagination, watches with
//! bookmarks and 410 Gone (an object that stops matching a watch's selectors leaves it as
//! DELETED carrying its previous state, as the real watch cache sends it), the Eviction
//! subresource answering 429 when a PodDisruptionBudget forbids the disruption and 500 when two
//! budgets select the pod, Leases (MicroTime validated, updates only with a resourceVersion, a
//! positive duration), ConfigMaps, Events (those about Nodes only in `default`/`kube-system`),
//! no creates in a namespace that does not exist (404). Simulated kubelets terminate pods after
//! their grace period and reboot nodes (NotReady, pods gone, back Ready with a new bootID).
//! Faults (errors, latency, conflicts, dropped watches) can be injected, and requests are
//! counted by verb and by refusal code.
//!
//! Nothing in the agent's code path uses this module.

pub mod demo;
mod discovery;
pub mod fleet;
pub mod rbac;
mod select;
mod server;
pub mod store;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::response::IntoResponse;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::{sync::broadcast, task::JoinHandle};

use self::store::{Kind, Store, StoreError, now_rfc3339};

/// Settings of a simulated cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// How long a node stays down when rebooted.
    pub reboot_duration: Duration,
    /// Multiplies every simulated duration (pod termination, reboot): 0.1 runs ten times faster.
    pub time_scale: f64,
    /// Interval of BOOKMARK events on watches that ask for them.
    pub bookmark_interval: Duration,
    /// Changes kept for resuming watches (older versions get 410 Gone).
    pub history_size: usize,
    /// Seed of the fault injection.
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> SimConfig {
        SimConfig {
            reboot_duration: Duration::from_secs(2),
            time_scale: 1.0,
            bookmark_interval: Duration::from_secs(5),
            history_size: 100_000,
            seed: 1,
        }
    }
}

/// Faults injected into API requests.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Fraction of non-watch requests answered 500 or 503.
    pub error_rate: f64,
    /// Fraction of writes answered 409 Conflict.
    pub conflict_rate: f64,
    /// Added to every request.
    pub latency: Duration,
    /// A random extra delay up to this much.
    pub jitter: Duration,
    /// Watch streams are closed after a random time up to this much.
    pub watch_drop_after: Option<Duration>,
}

/// What happened to simulated nodes, for harnesses that play the machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEvent {
    /// The node went down for a reboot.
    RebootStarted {
        /// Node name.
        node: String,
    },
    /// The node is Ready again after a reboot.
    NodeReady {
        /// Node name.
        node: String,
        /// Its new bootID.
        boot_id: String,
    },
}

/// Requests counted by verb and by resource.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// get, list, watch, create, update, patch, delete, evict.
    pub by_verb: BTreeMap<String, u64>,
    /// `verb resource`, e.g. `patch nodes`.
    pub by_verb_resource: BTreeMap<String, u64>,
    /// Requests answered with an error, by `verb resource code`, e.g. `update leases 409`
    /// (injected faults included).
    pub refusals: BTreeMap<String, u64>,
}

impl RequestCounts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.by_verb.values().sum()
    }

    /// Writes (create, update, patch, delete, evict).
    pub fn writes(&self) -> u64 {
        ["create", "update", "patch", "delete", "evict"]
            .iter()
            .map(|v| self.by_verb.get(*v).copied().unwrap_or(0))
            .sum()
    }

    /// Requests of `verb resource` (e.g. `update leases`) answered with `code`.
    pub fn refused(&self, verb_resource: &str, code: u16) -> u64 {
        self.refusals
            .get(&format!("{verb_resource} {code}"))
            .copied()
            .unwrap_or(0)
    }
}

/// One kind of API call as RBAC sees it: verb, API group, resource (with subresource, e.g.
/// `pods/eviction`) and namespace (None: cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    /// RBAC verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Resource, `plural` or `plural/subresource`.
    pub resource: String,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            &self.group
        };
        match &self.namespace {
            Some(ns) => write!(f, "{} {group}/{} in {ns}", self.verb, self.resource),
            None => write!(f, "{} {group}/{} (cluster)", self.verb, self.resource),
        }
    }
}

/// State shared by the server and the control API.
pub(crate) struct Shared {
    store: Store,
    config: SimConfig,
    counts: Mutex<RequestCounts>,
    accesses: Mutex<std::collections::BTreeSet<Access>>,
    faults: Mutex<(Faults, StdRng)>,
    /// Extra latency of one kind of request, by `verb resource` (e.g. `list nodes`).
    slow: Mutex<BTreeMap<String, Duration>>,
    events: broadcast::Sender<SimEvent>,
    rebooting: Mutex<std::collections::BTreeSet<String>>,
    /// Faults injected so far (errors, conflicts, dropped watches).
    faults_injected: std::sync::atomic::AtomicU64,
    /// Watch events sent to clients so far (BOOKMARKs included), and their bytes.
    watch_events: std::sync::atomic::AtomicU64,
    watch_bytes: std::sync::atomic::AtomicU64,
    /// Serialises evictions: the PDB check and the delete are one step, as the API server's
    /// update of the PDB status (with its resourceVersion) makes them. Without it two
    /// concurrent evictions could both see one allowed disruption.
    evictions: Mutex<()>,
}

impl Shared {
    fn record_access(&self, access: Access) {
        self.accesses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(access);
    }

    fn count(&self, verb: &str, resource: &str) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.by_verb.entry(verb.to_owned()).or_default() += 1;
        *c.by_verb_resource
            .entry(format!("{verb} {resource}"))
            .or_default() += 1;
    }

    fn count_watch_event(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.watch_events.fetch_add(1, Relaxed);
        self.watch_bytes.fetch_add(bytes as u64, Relaxed);
    }

    fn count_refusal(&self, verb: &str, resource: &str, code: u16) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.refusals.entry(format!("{verb} {resource} {code}")).or_default() += 1;
    }

    fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.config.time_scale.max(0.0))
    }

    /// Applies latency and may answer with an injected error.
    async fn inject_fault(&self, verb: &str, resource: &str) -> Option<axum::response::Response> {
        let slow = self
            .slow
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&format!("{verb} {resource}"))
            .copied()
            .unwrap_or_default();
        let (delay, fail) = {
            let mut g = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            let (f, rng) = &mut *g;
            let jitter = if f.jitter.is_zero() {
                Duration::ZERO
            } else {
                f.jitter.mul_f64(rng.random::<f64>())
            };
            let write = matches!(verb, "create" | "update" | "patch" | "delete" | "evict");
            let fail = if verb != "watch" && rng.random::<f64>() < f.error_rate {
                Some(if rng.random::<bool>() { 500 } else { 503 })
            } else if write && rng.random::<f64>() < f.conflict_rate {
                Some(409)
            } else {
                None
            };
            (f.latency + jitter + slow, fail)
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let code = fail?;
        self.faults_injected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (reason, message) = match code {
            409 => ("Conflict", "injected conflict: the object has been modified"),
            503 => ("ServiceUnavailable", "injected fault: service unavailable"),
            _ => ("InternalError", "injected fault: internal error"),
        };
        Some(
            (
                axum::http::StatusCode::from_u16(code)
                    .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR),
                [("content-type", "application/json")],
                store::status_body(code, reason, message).to_string(),
            )
                .into_response(),
        )
    }

    fn watch_drop_after(&self) -> Option<Duration> {
        let mut g = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let (f, rng) = &mut *g;
        f.watch_drop_after.map(|d| {
            // Counted when scheduled: every such watch is cut (or ends earlier by itself).
            self.faults_injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            d.mul_f64(rng.random::<f64>())
        })
    }

    fn node_ready(&self, node: &str) -> bool {
        self.store.get(Kind::Node, "", node).is_some_and(|n| {
            n.pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
        })
    }

    /// Deletes a pod the way the kubelet does: marked terminating, removed after its
    /// termination time. A pod not on a Ready node goes at once (nobody runs its shutdown).
    fn delete_pod(
        self: &Arc<Self>,
        ns: &str,
        name: &str,
        grace: Option<i64>,
    ) -> Result<Arc<Value>, StoreError> {
        let Some(pod) = self.store.get(Kind::Pod, ns, name) else {
            return Err(StoreError::new(
                404,
                "NotFound",
                format!("pods \"{name}\" not found"),
            ));
        };
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(pod);
        }
        let node = pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or("");
        let grace = grace
            .or_else(|| {
                pod.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            })
            .unwrap_or(30)
            .max(0);
        if grace == 0 || node.is_empty() || !self.node_ready(node) {
            return self.store.delete(Kind::Pod, ns, name);
        }
        let own = pod
            .pointer("/metadata/annotations/sim.kreboot.io~1shutdown-seconds")
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(grace as f64);
        let terminate_after = self.scaled(Duration::from_secs_f64(own.clamp(0.0, grace as f64)));
        let marked = self.store.update(Kind::Pod, ns, name, |old| {
            let mut p = old.clone();
            p["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
            p["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
            Ok(p)
        })?;
        let uid = marked.pointer("/metadata/uid").cloned();
        let me = self.clone();
        let (ns, name) = (ns.to_owned(), name.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(terminate_after).await;
            if me
                .store
                .get(Kind::Pod, &ns, &name)
                .is_some_and(|p| p.pointer("/metadata/uid") == uid.as_ref())
            {
                let _ = me.store.delete(Kind::Pod, &ns, &name);
            }
        });
        Ok(marked)
    }

    /// The Eviction subresource: refused with 429 when a PodDisruptionBudget allows no
    /// disruption, with 500 when more than one PodDisruptionBudget selects the pod (as
    /// kube-apiserver's `pkg/registry/core/pod/storage/eviction.go`), otherwise a graceful
    /// delete.
    fn evict(self: &Arc<Self>, ns: &str, name: &str, grace: Option<i64>) -> Result<(), StoreError> {
        let _one_at_a_time = self.evictions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pod) = self.store.get(Kind::Pod, ns, name) else {
            return Err(StoreError::new(
                404,
                "NotFound",
                format!("pods \"{name}\" not found"),
            ));
        };
        if pod.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(());
        }
        let labels = select::labels_of(&pod);
        let (pdbs, _) = self.store.list(Kind::Pdb, Some(ns));
        let pdbs: Vec<Arc<Value>> = pdbs.into_iter().filter(|p| pdb_selects(p, &labels)).collect();
        if pdbs.len() > 1 {
            return Err(StoreError::new(
                500,
                "",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        let (pods, _) = self.store.list(Kind::Pod, Some(ns));
        if let Some(pdb) = pdbs.first() {
            let matching: Vec<&Arc<Value>> = pods
                .iter()
                .filter(|p| pdb_selects(pdb, &select::labels_of(p)))
                .collect();
            let healthy = matching.iter().filter(|p| healthy(p)).count() as i64;
            let expected = matching.len() as i64;
            let allowed = if let Some(min) = pdb.pointer("/spec/minAvailable").and_then(Value::as_i64) {
                healthy - min
            } else if let Some(max) = pdb.pointer("/spec/maxUnavailable").and_then(Value::as_i64) {
                max - (expected - healthy)
            } else {
                1
            };
            if allowed < 1 {
                return Err(StoreError {
                    code: 429,
                    reason: "TooManyRequests",
                    message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
                });
            }
        }
        self.delete_pod(ns, name, grace).map(|_| ())
    }

    /// Starts a reboot of `node`; false when it does not exist or is already rebooting.
    fn reboot_node(self: &Arc<Self>, node: &str) -> bool {
        if self.store.get(Kind::Node, "", node).is_none() {
            return false;
        }
        if !self
            .rebooting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_owned())
        {
            return false;
        }
        let _ = self.store.update(Kind::Node, "", node, |old| {
            let mut n = old.clone();
            set_ready(&mut n, false);
            Ok(n)
        });
        // The machine is gone: its pods die with it; DaemonSet pods come back with it.
        let (pods, _) = self.store.list(Kind::Pod, None);
        for p in pods {
            if p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node) && !is_daemonset(&p) {
                let ns = p
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let name = p.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("");
                let _ = self.store.delete(Kind::Pod, ns, name);
            }
        }
        let _ = self.events.send(SimEvent::RebootStarted {
            node: node.to_owned(),
        });
        let me = self.clone();
        let node = node.to_owned();
        let down = self.scaled(self.config.reboot_duration);
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            let boot_id = new_boot_id();
            let updated = me.store.update(Kind::Node, "", &node, |old| {
                let mut n = old.clone();
                set_ready(&mut n, true);
                n["status"]["nodeInfo"]["bootID"] = json!(boot_id);
                Ok(n)
            });
            me.rebooting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&node);
            if updated.is_ok() {
                let _ = me.events.send(SimEvent::NodeReady { node, boot_id });
            }
        });
        true
    }
}

fn healthy(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_none()
        && p.pointer("/status/phase").and_then(Value::as_str) == Some("Running")
        && p.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

fn is_daemonset(p: &Value) -> bool {
    p.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .is_some_and(|o| o.iter().any(|r| r["kind"] == "DaemonSet"))
}

fn pdb_selects(pdb: &Value, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = pdb.pointer("/spec/selector") else {
        return false;
    };
    let ml_ok = sel.get("matchLabels").and_then(Value::as_object).is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
    });
    let me_ok = sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .is_none_or(|exprs| {
            exprs.iter().all(|e| {
                let key = e["key"].as_str().unwrap_or("");
                let values: Vec<&str> = e["values"]
                    .as_array()
                    .map(|v| v.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                match e["operator"].as_str() {
                    Some("In") => labels.get(key).is_some_and(|l| values.contains(&l.as_str())),
                    Some("NotIn") => labels.get(key).is_none_or(|l| !values.contains(&l.as_str())),
                    Some("Exists") => labels.contains_key(key),
                    Some("DoesNotExist") => !labels.contains_key(key),
                    _ => false,
                }
            })
        });
    ml_ok && me_ok
}

fn set_ready(node: &mut Value, ready: bool) {
    let now = now_rfc3339();
    node["status"]["conditions"] = json!([{
        "type": "Ready",
        "status": if ready { "True" } else { "False" },
        "reason": if ready { "KubeletReady" } else { "NodeStatusUnknown" },
        "message": if ready { "kubelet is posting ready status" } else { "Kubelet stopped posting node status." },
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }]);
}

fn new_boot_id() -> String {
    let mut rng = rand::rng();
    let a: u64 = rng.random();
    let b: u64 = rng.random();
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// A handle on a running simulated cluster.
#[derive(Clone)]
pub struct SimCluster {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: Arc<JoinHandle<()>>,
    /// The HTTP application the TCP server serves, also called in memory by
    /// [`SimCluster::in_memory_client`].
    app: axum::Router,
}

impl SimCluster {
    /// Starts the server on 127.0.0.1 (a free port).
    ///
    /// # Errors
    /// When the port cannot be bound.
    pub async fn start(config: SimConfig) -> std::io::Result<SimCluster> {
        let (events, _) = broadcast::channel(65536);
        let shared = Arc::new(Shared {
            store: Store::new(config.history_size),
            faults: Mutex::new((Faults::default(), StdRng::seed_from_u64(config.seed))),
            slow: Mutex::default(),
            config,
            counts: Mutex::new(RequestCounts::default()),
            accesses: Mutex::default(),
            events,
            rebooting: Mutex::new(Default::default()),
            faults_injected: Default::default(),
            watch_events: Default::default(),
            watch_bytes: Default::default(),
            evictions: Mutex::default(),
        });
        for ns in ["default", "kube-system"] {
            let _ = shared
                .store
                .create(Kind::Namespace, "", json!({"metadata": {"name": ns}}));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(server::handle)
            .with_state(shared.clone());
        let served = app.clone();
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, served).await {
                tracing::error!(error = %e, "simulated API server failed");
            }
        });
        Ok(SimCluster {
            shared,
            addr,
            server: Arc::new(server),
            app,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube-rs configuration for this server (plain HTTP, no client-side retries).
    pub fn client_config(&self) -> kube::Config {
        let mut c = kube::Config::new(self.url().parse().unwrap_or_default());
        c.default_retry = false;
        c
    }

    /// A kube-rs client for this server.
    ///
    /// # Panics
    /// Never for the configuration built here (plain HTTP).
    pub async fn client(&self) -> kube::Client {
        kube::Client::try_from(self.client_config())
            .unwrap_or_else(|e| panic!("client for the simulator: {e}"))
    }

    /// A kube-rs client that calls the simulator's HTTP application in memory, without a
    /// socket: the request goes through the same handler as over TCP (routing, request counting,
    /// access recording, injected faults and latency, dropped watches), and watch responses
    /// stream as they do over HTTP. No client-side retries (as [`SimCluster::client_config`]).
    /// The fleet's agents use it, so thousands of them need no file descriptors.
    pub fn in_memory_client(&self) -> kube::Client {
        // The Router is a tower Service for any request body kube-rs sends (axum wraps it in
        // its own `Body`); its response bodies (watch streams included) are passed on as they
        // are produced.
        kube::Client::new(self.app.clone(), "default")
    }

    /// Writes a kubeconfig for this server (usable by kubectl and `KUBECONFIG`).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: sim\n  cluster:\n    server: {}\ncontexts:\n- name: sim\n  context:\n    cluster: sim\n    user: sim\ncurrent-context: sim\nusers:\n- name: sim\n  user: {{}}\n",
                self.url()
            ),
        )
    }

    /// Adds a Ready node.
    pub fn add_node(&self, name: &str, labels: BTreeMap<String, String>) {
        let mut node = json!({
            "metadata": { "name": name, "labels": labels },
            "spec": {},
            "status": {
                "nodeInfo": {
                    "architecture": "amd64", "bootID": new_boot_id(), "containerRuntimeVersion": "containerd://1.7.0",
                    "kernelVersion": "6.8.0-sim", "kubeProxyVersion": "v1.33.0", "kubeletVersion": "v1.33.0",
                    "machineID": name, "operatingSystem": "linux", "osImage": "Ubuntu 24.04 LTS (simulated)",
                    "systemUUID": name,
                },
            },
        });
        set_ready(&mut node, true);
        let _ = self.shared.store.create(Kind::Node, "", node);
    }

    /// Creates namespace `ns` unless it exists (the API server refuses objects in a namespace
    /// that does not exist; the helpers below create theirs on the way).
    pub fn ensure_namespace(&self, ns: &str) {
        if self.shared.store.get(Kind::Namespace, "", ns).is_none() {
            let _ = self
                .shared
                .store
                .create(Kind::Namespace, "", json!({"metadata": {"name": ns}}));
        }
    }

    /// Adds a pod (Running and Ready unless its status says otherwise), creating its namespace
    /// if needed.
    pub fn add_pod(&self, pod: Pod) {
        let mut v = serde_json::to_value(&pod).unwrap_or_else(|_| json!({}));
        if v.pointer("/status/phase").is_none() {
            v["status"] = json!({
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": "True" }],
            });
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        self.ensure_namespace(&ns);
        let _ = self.shared.store.create(Kind::Pod, &ns, v);
    }

    /// Adds a PodDisruptionBudget, creating its namespace if needed.
    pub fn add_pdb(
        &self,
        ns: &str,
        name: &str,
        match_labels: BTreeMap<String, String>,
        min_available: Option<i32>,
        max_unavailable: Option<i32>,
    ) {
        let mut spec = json!({ "selector": { "matchLabels": match_labels } });
        if let Some(m) = min_available {
            spec["minAvailable"] = json!(m);
        }
        if let Some(m) = max_unavailable {
            spec["maxUnavailable"] = json!(m);
        }
        self.ensure_namespace(ns);
        let _ = self.shared.store.create(
            Kind::Pdb,
            ns,
            json!({ "metadata": { "name": name }, "spec": spec }),
        );
    }

    /// An administrator's cordon (or uncordon).
    pub fn set_unschedulable(&self, node: &str, on: bool) {
        let _ = self.shared.store.update(Kind::Node, "", node, |old| {
            let mut n = old.clone();
            n["spec"]["unschedulable"] = json!(on);
            Ok(n)
        });
    }

    /// Deletes a node object.
    pub fn delete_node(&self, node: &str) {
        let _ = self.shared.store.delete(Kind::Node, "", node);
    }

    /// Reboots a node: NotReady, its pods gone, Ready again with a new bootID after
    /// `reboot_duration`. False if it does not exist or is already rebooting.
    pub fn reboot_node(&self, node: &str) -> bool {
        self.shared.reboot_node(node)
    }

    /// Node reboots and returns.
    pub fn subscribe(&self) -> broadcast::Receiver<SimEvent> {
        self.shared.events.subscribe()
    }

    fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
        serde_json::from_value(v.clone()).ok()
    }

    /// A node.
    pub fn node(&self, name: &str) -> Option<Node> {
        Self::typed(&*self.shared.store.get(Kind::Node, "", name)?)
    }

    /// The pods bound to a node.
    pub fn pods_on(&self, node: &str) -> Vec<Pod> {
        self.shared
            .store
            .list(Kind::Pod, None)
            .0
            .iter()
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .filter_map(|p| Self::typed(p))
            .collect()
    }

    /// A Lease.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Lease> {
        Self::typed(&*self.shared.store.get(Kind::Lease, ns, name)?)
    }

    /// Every Lease of a namespace.
    pub fn leases(&self, ns: &str) -> Vec<Lease> {
        self.shared
            .store
            .list(Kind::Lease, Some(ns))
            .0
            .iter()
            .filter_map(|l| Self::typed(l))
            .collect()
    }

    /// Creates or replaces a ConfigMap (creating its namespace if needed).
    pub fn configmap_put(&self, ns: &str, name: &str, data: BTreeMap<String, String>) {
        self.ensure_namespace(ns);
        let store = &self.shared.store;
        let updated = store.update(Kind::ConfigMap, ns, name, |old| {
            let mut c = old.clone();
            c["data"] = json!(data);
            Ok(c)
        });
        if updated.is_err() {
            let _ = store.create(
                Kind::ConfigMap,
                ns,
                json!({ "metadata": { "name": name }, "data": data }),
            );
        }
    }

    /// Deletes a ConfigMap.
    pub fn configmap_delete(&self, ns: &str, name: &str) {
        let _ = self.shared.store.delete(Kind::ConfigMap, ns, name);
    }

    /// Every Event of both APIs.
    pub fn events(&self) -> Vec<Value> {
        let mut all: Vec<Value> = self
            .shared
            .store
            .list(Kind::Event, None)
            .0
            .iter()
            .map(|v| (**v).clone())
            .collect();
        all.extend(
            self.shared
                .store
                .list(Kind::CoreEvent, None)
                .0
                .iter()
                .map(|v| (**v).clone()),
        );
        all
    }

    /// Every distinct kind of API call made so far (for checking the RBAC rules).
    pub fn accesses(&self) -> std::collections::BTreeSet<Access> {
        self.shared
            .accesses
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests counted so far.
    pub fn request_counts(&self) -> RequestCounts {
        self.shared
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts counting from zero.
    pub fn reset_request_counts(&self) {
        *self.shared.counts.lock().unwrap_or_else(|e| e.into_inner()) = RequestCounts::default();
    }

    /// Adds `delay` to every request of `verb_resource` (e.g. `list nodes`), or removes the
    /// delay (`Duration::ZERO`). For tests that need one kind of request to be slow.
    pub fn set_slow(&self, verb_resource: &str, delay: Duration) {
        let mut slow = self.shared.slow.lock().unwrap_or_else(|e| e.into_inner());
        if delay.is_zero() {
            slow.remove(verb_resource);
        } else {
            slow.insert(verb_resource.to_owned(), delay);
        }
    }

    /// Sets the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.faults.lock().unwrap_or_else(|e| e.into_inner()).0 = faults;
    }

    /// How many faults were injected so far.
    pub fn faults_injected(&self) -> u64 {
        self.shared
            .faults_injected
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Watch events sent to clients so far (BOOKMARKs included) and their bytes: what the
    /// watches of all clients together cost the server.
    pub fn watch_events_sent(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.shared.watch_events.load(Relaxed),
            self.shared.watch_bytes.load(Relaxed),
        )
    }

    /// The store, for direct inspection.
    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Stops the server.
    pub async fn shutdown(self) {
        self.server.abort();
    }
}

/// A pod for [`SimCluster::add_pod`].
pub fn pod(ns: &str, name: &str, node: &str) -> PodBuilder {
    PodBuilder {
        value: json!({
            "metadata": { "name": name, "namespace": ns, "labels": {}, "annotations": {} },
            "spec": { "nodeName": node, "containers": [{ "name": "main", "image": "registry.example/app:1" }] },
        }),
    }
}

/// Builds a pod.
pub struct PodBuilder {
    value: Value,
}

impl PodBuilder {
    /// Adds labels.
    pub fn labels<'a>(mut self, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> PodBuilder {
        for (k, v) in labels {
            self.value["metadata"]["labels"][k] = json!(v);
        }
        self
    }

    /// `spec.terminationGracePeriodSeconds`.
    pub fn grace(mut self, seconds: i64) -> PodBuilder {
        self.value["spec"]["terminationGracePeriodSeconds"] = json!(seconds);
        self
    }

    /// How long the pod takes to shut down once asked (capped by the grace period).
    pub fn shutdown_seconds(mut self, seconds: f64) -> PodBuilder {
        self.value["metadata"]["annotations"]["sim.kreboot.io/shutdown-seconds"] = json!(seconds.to_string());
        self
    }

    /// Owned by a DaemonSet.
    pub fn daemonset(mut self) -> PodBuilder {
        self.value["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds", "uid": "ds-uid", "controller": true,
        }]);
        self
    }

    /// A static pod's mirror.
    pub fn mirror(mut self) -> PodBuilder {
        self.value["metadata"]["annotations"]["kubernetes.io/config.mirror"] = json!("mirror");
        self
    }

    /// A pod in `phase` (e.g. Succeeded).
    pub fn phase(mut self, phase: &str) -> PodBuilder {
        self.value["status"] = json!({ "phase": phase });
        self
    }

    /// The pod.
    ///
    /// # Panics
    /// Never: the JSON built here is a valid Pod.
    pub fn build(self) -> Pod {
        serde_json::from_value(self.value).unwrap_or_else(|e| panic!("pod builder: {e}"))
    }
}
