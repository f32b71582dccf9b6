//! One set of scenarios, two Kubernetes backends: the simulated cluster (`kreboot_testkit::sim`) and the
//! real control plane (`real`: kube-apiserver, etcd, kube-controller-manager, KWOK). A scenario
//! is written once against [`Backend`] and runs on both (`scenario!` in tests/scenarios.rs); it
//! sets the cluster up and reads it only through these methods and the Kubernetes API, and
//! runs the real `kreboot` binary as one process per node ([`Machine`]).

#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Namespace, Node, Pod},
    policy::v1::PodDisruptionBudget,
};
use kreboot_testkit::sim::{self, SimCluster, SimConfig};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::real::{self, ControlPlane};

/// Which backend a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sim,
    Real,
}

/// The namespace the agents run in (their Leases and policy ConfigMap live there).
pub const NS: &str = "kube-system";

/// A cluster of either kind.
pub enum Backend {
    Sim(SimCluster, tempfile::TempDir),
    Real(Box<ControlPlane>),
}

impl Backend {
    /// Starts an empty cluster of `kind` (namespaces `default`, `kube-system` and `apps`).
    pub async fn start(kind: Kind) -> Backend {
        Backend::start_with(kind, true).await
    }

    /// As [`Backend::start`]; with `kubelets: false` the real control plane runs without KWOK,
    /// so Node statuses written by the test stay as written (KWOK turns every NotReady Node
    /// Ready again) and nothing plays the pods. The simulator's kubelets never change a Node
    /// by themselves.
    pub async fn start_with(kind: Kind, kubelets: bool) -> Backend {
        let b = match kind {
            Kind::Sim => Backend::Sim(
                SimCluster::start(SimConfig {
                    reboot_duration: Duration::from_millis(300),
                    ..SimConfig::default()
                })
                .await
                .expect("simulator starts"),
                tempfile::tempdir().expect("temp dir"),
            ),
            Kind::Real => Backend::Real(Box::new(
                ControlPlane::start(real::Options {
                    kwok: kubelets,
                    ..real::Options::default()
                })
                .await,
            )),
        };
        let ns: Api<Namespace> = Api::all(b.client());
        for name in ["default", "kube-system", "apps"] {
            let _ = ns
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
                )
                .await;
        }
        b
    }

    pub fn kind(&self) -> Kind {
        match self {
            Backend::Sim(..) => Kind::Sim,
            Backend::Real(_) => Kind::Real,
        }
    }

    /// An administrator's client.
    pub fn client(&self) -> Client {
        match self {
            Backend::Sim(s, _) => Client::try_from(s.client_config()).expect("sim client"),
            Backend::Real(cp) => cp.admin_client(),
        }
    }

    /// An administrator's kubeconfig (for the kreboot binary and kubectl).
    pub fn kubeconfig(&self) -> PathBuf {
        match self {
            Backend::Sim(s, dir) => {
                let p = dir.path().join("kubeconfig");
                if !p.exists() {
                    s.write_kubeconfig(&p).expect("kubeconfig");
                }
                p
            }
            Backend::Real(cp) => cp.dir.join("kubeconfig-admin"),
        }
    }

    /// A Ready node with a boot id (on the real backend KWOK then keeps it Ready).
    pub async fn add_node(&self, name: &str, labels: &[(&str, &str)]) {
        let mut labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.insert("kubernetes.io/hostname".into(), name.into());
        match self {
            Backend::Sim(s, _) => s.add_node(name, labels),
            Backend::Real(_) => {
                let nodes: Api<Node> = Api::all(self.client());
                let node = kwok_node(name, &labels);
                nodes
                    .create(&PostParams::default(), &serde_json::from_value(node).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("create Node {name}: {e}"));
            }
        }
    }

    /// An application pod bound to `node`, Running and Ready (KWOK makes it so on the real
    /// backend; this waits until it is).
    pub async fn add_pod(&self, ns: &str, name: &str, node: &str, labels: &[(&str, &str)]) {
        match self {
            Backend::Sim(s, _) => s.add_pod(
                sim::pod(ns, name, node)
                    .labels(labels.iter().copied())
                    .grace(1)
                    .shutdown_seconds(0.1)
                    .build(),
            ),
            Backend::Real(_) => {
                let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
                let pods: Api<Pod> = Api::namespaced(self.client(), ns);
                let pod = json!({
                    "metadata": { "name": name, "labels": labels },
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": "default",
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
                        "tolerations": [{ "operator": "Exists" }],
                    },
                });
                pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("create Pod {ns}/{name}: {e}"));
            }
        }
    }

    /// Waits until every pod of `ns` is Running and Ready (the real kubelets are KWOK's).
    pub async fn wait_pods_ready(&self, ns: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client(), ns);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let list = pods.list(&ListParams::default()).await.expect("list pods");
            if list.items.iter().all(pod_ready) {
                return;
            }
            assert!(Instant::now() < deadline, "pods of {ns} never became Ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PodDisruptionBudget with an integer `minAvailable`.
    pub async fn add_pdb(&self, ns: &str, name: &str, labels: &[(&str, &str)], min_available: i32) {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(self.client(), ns);
        let pdb = json!({
            "metadata": { "name": name },
            "spec": { "minAvailable": min_available, "selector": { "matchLabels": labels } },
        });
        pdbs.create(&PostParams::default(), &serde_json::from_value(pdb).unwrap())
            .await
            .unwrap_or_else(|e| panic!("create PDB {ns}/{name}: {e}"));
    }

    /// The machine reboots: NotReady, a new boot id, Ready again (the simulator's kubelet on
    /// the sim; on the real backend the test writes the Node status as a kubelet would).
    pub async fn reboot(&self, node: &str) {
        match self {
            Backend::Sim(s, _) => {
                let before = self.boot_id(node).await;
                assert!(s.reboot_node(node), "sim reboot of {node}");
                let deadline = Instant::now() + Duration::from_secs(20);
                while !(self.ready(node).await && self.boot_id(node).await != before) {
                    assert!(Instant::now() < deadline, "{node} never came back");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Backend::Real(_) => {
                let nodes: Api<Node> = Api::all(self.client());
                let pp = PatchParams::default();
                // The machine is down, then its kubelet reports the new boot while it starts
                // (KWOK's node stage makes a NotReady Node Ready again, as a kubelet would).
                let down = json!({"status": {
                    "conditions": [ready_condition(false)],
                    "nodeInfo": { "bootID": uuid() },
                }});
                nodes
                    .patch_status(node, &pp, &Patch::Strategic(&down))
                    .await
                    .expect("node NotReady with a new boot id");
                tokio::time::sleep(Duration::from_millis(300)).await;
                let up = json!({"status": {"conditions": [ready_condition(true)]}});
                nodes
                    .patch_status(node, &pp, &Patch::Strategic(&up))
                    .await
                    .expect("node Ready");
            }
        }
    }

    /// An administrator's cordon.
    pub async fn cordon(&self, node: &str) {
        let nodes: Api<Node> = Api::all(self.client());
        nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"unschedulable": true}})),
            )
            .await
            .expect("cordon");
    }

    pub async fn delete_node(&self, node: &str) {
        let nodes: Api<Node> = Api::all(self.client());
        nodes
            .delete(node, &DeleteParams::default())
            .await
            .expect("delete node");
    }

    pub async fn node(&self, name: &str) -> Option<Node> {
        Api::<Node>::all(self.client())
            .get_opt(name)
            .await
            .expect("get node")
    }

    pub async fn annotation(&self, node: &str, key: &str) -> Option<String> {
        self.node(node).await?.metadata.annotations?.get(key).cloned()
    }

    pub async fn unschedulable(&self, node: &str) -> bool {
        self.node(node)
            .await
            .and_then(|n| n.spec)
            .and_then(|s| s.unschedulable)
            .unwrap_or(false)
    }

    pub async fn boot_id(&self, node: &str) -> String {
        self.node(node)
            .await
            .and_then(|n| n.status)
            .and_then(|s| s.node_info)
            .map(|i| i.boot_id)
            .unwrap_or_default()
    }

    pub async fn ready(&self, node: &str) -> bool {
        self.node(node)
            .await
            .and_then(|n| n.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }

    /// kreboot's lock Leases (a real kube-apiserver keeps its own identity Leases in
    /// kube-system too).
    pub async fn leases(&self) -> Vec<Lease> {
        Api::<Lease>::namespaced(self.client(), NS)
            .list(&ListParams::default().labels(kreboot::lock::LOCK_LABEL))
            .await
            .expect("list leases")
            .items
    }

    /// The nodes holding a lock slot.
    pub async fn holders(&self) -> Vec<String> {
        self.leases()
            .await
            .into_iter()
            .filter_map(|l| l.spec?.holder_identity.filter(|h| !h.is_empty()))
            .collect()
    }

    /// Creates or replaces the policy ConfigMap `kreboot-config`.
    pub async fn set_policy(&self, yaml: &str) {
        self.put_configmap(NS, "kreboot-config", &[("config.yaml", yaml)])
            .await;
    }

    /// Creates or replaces ConfigMap `ns/name` with `data`.
    pub async fn put_configmap(&self, ns: &str, name: &str, data: &[(&str, &str)]) {
        let cms: Api<ConfigMap> = Api::namespaced(self.client(), ns);
        let data: BTreeMap<String, String> =
            data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match cms.get_opt(name).await.expect("get ConfigMap") {
            Some(mut cm) => {
                cm.data = Some(data);
                cms.replace(name, &PostParams::default(), &cm)
                    .await
                    .unwrap_or_else(|e| panic!("replace ConfigMap {ns}/{name}: {e}"));
            }
            None => {
                let cm = ConfigMap {
                    metadata: kube::api::ObjectMeta {
                        name: Some(name.into()),
                        ..Default::default()
                    },
                    data: Some(data),
                    ..Default::default()
                };
                cms.create(&PostParams::default(), &cm)
                    .await
                    .unwrap_or_else(|e| panic!("create ConfigMap {ns}/{name}: {e}"));
            }
        }
    }

    /// The Events about Nodes (namespace `default`), as JSON.
    pub async fn node_events(&self) -> Vec<serde_json::Value> {
        self.events("default").await
    }

    /// The Events (events.k8s.io/v1) of namespace `ns`, as JSON.
    pub async fn events(&self, ns: &str) -> Vec<serde_json::Value> {
        let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(self.client(), ns);
        api.list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .map(|e| serde_json::to_value(e).unwrap())
            .collect()
    }

    /// Creates namespace `ns` (it may exist).
    pub async fn create_namespace(&self, ns: &str) {
        let api: Api<Namespace> = Api::all(self.client());
        if api.get_opt(ns).await.expect("get namespace").is_none() {
            api.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("create namespace {ns}: {e}"));
        }
    }

    /// A JSON merge patch of a Node's metadata or spec (as an administrator or an agent
    /// writes them).
    pub async fn patch_node(&self, node: &str, patch: serde_json::Value) -> Node {
        Api::<Node>::all(self.client())
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch Node {node}: {e}"))
    }

    /// The Node's Ready condition, written to its status as its kubelet would (on the real
    /// backend KWOK turns a NotReady Node Ready again at once, unless started without it).
    pub async fn set_ready(&self, node: &str, ready: bool) {
        let patch = json!({"status": {"conditions": [ready_condition(ready)]}});
        Api::<Node>::all(self.client())
            .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
            .unwrap_or_else(|e| panic!("Node {node} Ready={ready}: {e}"));
    }

    /// Creates a Lease in `ns` from its JSON.
    pub async fn create_lease(&self, ns: &str, lease: serde_json::Value) {
        Api::<Lease>::namespaced(self.client(), ns)
            .create(&PostParams::default(), &serde_json::from_value(lease).unwrap())
            .await
            .unwrap_or_else(|e| panic!("create Lease in {ns}: {e}"));
    }

    /// The pods of `ns` (terminating ones included).
    pub async fn pods(&self, ns: &str) -> Vec<Pod> {
        Api::<Pod>::namespaced(self.client(), ns)
            .list(&ListParams::default())
            .await
            .expect("list pods")
            .items
    }

    /// A DaemonSet's pod bound to `node`, Running and Ready (no DaemonSet object: nothing
    /// checks the owner, and no controller recreates the pod).
    pub async fn add_daemonset_pod(&self, ns: &str, name: &str, node: &str) {
        match self {
            Backend::Sim(s, _) => s.add_pod(sim::pod(ns, name, node).daemonset().build()),
            Backend::Real(_) => {
                let pods: Api<Pod> = Api::namespaced(self.client(), ns);
                let pod = json!({
                    "metadata": {
                        "name": name,
                        "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "ds",
                            "uid": "6b1f5a8e-0d5c-4c56-9a43-000000000001", "controller": true,
                        }],
                    },
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": "default",
                        "automountServiceAccountToken": false,
                        "containers": [{ "name": "agent", "image": "registry.invalid/ds:1" }],
                        "tolerations": [{ "operator": "Exists" }],
                    },
                });
                pods.create(&PostParams::default(), &serde_json::from_value(pod).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("create Pod {ns}/{name}: {e}"));
            }
        }
    }

    /// Sets a PodDisruptionBudget's integer `minAvailable`.
    pub async fn set_pdb_min_available(&self, ns: &str, name: &str, min_available: i32) {
        Api::<PodDisruptionBudget>::namespaced(self.client(), ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"minAvailable": min_available}})),
            )
            .await
            .unwrap_or_else(|e| panic!("patch PDB {ns}/{name}: {e}"));
    }
}

pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A Ready Node that KWOK manages, with a fresh boot id (what a kubelet registers).
pub fn kwok_node(name: &str, labels: &BTreeMap<String, String>) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "labels": labels,
            // KWOK's marker: a fake node it manages.
            "annotations": { "kwok.x-k8s.io/node": "fake" },
        },
        "spec": {},
        "status": {
            "nodeInfo": {
                "architecture": "amd64", "bootID": uuid(), "containerRuntimeVersion": "kwok",
                "kernelVersion": "6.8.0-kwok", "kubeProxyVersion": "", "kubeletVersion": "kwok",
                "machineID": name, "operatingSystem": "linux", "osImage": "Ubuntu 24.04 LTS (KWOK)",
                "systemUUID": name,
            },
            "conditions": [ready_condition(true)],
            "capacity": { "cpu": "8", "memory": "32Gi", "pods": "110" },
            "allocatable": { "cpu": "8", "memory": "32Gi", "pods": "110" },
        },
    })
}

/// The Ready condition a kubelet reports.
pub fn ready_condition(ready: bool) -> serde_json::Value {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    json!({
        "type": "Ready",
        "status": if ready { "True" } else { "False" },
        "reason": if ready { "KubeletReady" } else { "KubeletNotReady" },
        "message": "set by the kreboot test harness",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    })
}

/// A random boot id (the kernel's format).
pub fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// One node's machine: the real `kreboot agent` binary with a sentinel file on "disk" and a
/// reboot command that leaves a mark. [`Machine::supervise`] plays the machine: when the agent
/// asks for a reboot, the process dies with the machine, the sentinel goes (a fresh
/// /var/run), the Node comes back with a new boot id and the agent starts again.
pub struct Machine {
    pub node: String,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// The agent's `--namespace` (its Leases and policy ConfigMap): [`NS`] unless set.
    pub namespace: String,
    pub extra_args: Vec<String>,
    pub metrics_port: u16,
    pub child: Option<Child>,
    pub reboots: u32,
    /// A program (with its arguments) the agent is started through, which ends by exec'ing
    /// the agent's command line (given as further arguments); empty: none.
    pub launcher: Vec<String>,
}

impl Machine {
    pub fn new(node: &str, kubeconfig: &Path, extra_args: &[&str]) -> Machine {
        let dir = tempfile::tempdir().expect("machine dir");
        std::fs::create_dir_all(dir.path().join("run")).expect("run dir");
        Machine {
            node: node.into(),
            dir,
            kubeconfig: kubeconfig.into(),
            namespace: NS.into(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            metrics_port: super::free_port(),
            child: None,
            reboots: 0,
            launcher: Vec::new(),
        }
    }

    pub fn sentinel(&self) -> PathBuf {
        self.dir.path().join("run/reboot-required")
    }

    fn reboot_mark(&self) -> PathBuf {
        self.dir.path().join("rebooted")
    }

    /// The packages asked for a reboot.
    pub fn require_reboot(&self) {
        std::fs::write(self.sentinel(), "*** System restart required ***\n").expect("sentinel");
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "agent of {} already running", self.node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        // `extra_args` may replace the sentinel file and the reboot command.
        let given = |flag: &str| {
            self.extra_args
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(env!("CARGO_BIN_EXE_kreboot"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_kreboot")),
        };
        cmd.args([
            "agent",
            "--node-name",
            &self.node,
            "--namespace",
            &self.namespace,
            "--host-namespaces=false",
        ]);
        if !given("--sentinel-file") {
            cmd.arg("--sentinel-file").arg(self.sentinel());
        }
        if !given("--reboot-command") {
            // Counts every run of the reboot command, then leaves the mark.
            cmd.arg("--reboot-command").arg(format!(
                "sh -c 'echo reboot >> {}; touch {}'",
                self.reboot_count_file().display(),
                self.reboot_mark().display()
            ));
        }
        let child = cmd
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(["--log-format", "json"])
            .args(&self.extra_args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("NODE_NAME")
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("log"))
            .spawn()
            .expect("kreboot agent starts");
        self.child = Some(child);
    }

    /// SIGKILL (a crash, or the machine going down).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn reboot_count_file(&self) -> PathBuf {
        self.dir.path().join("reboot-commands")
    }

    /// How many times the agent ran its reboot command (each run is counted, whether or not
    /// the machine then rebooted).
    pub fn reboot_commands(&self) -> usize {
        std::fs::read_to_string(self.reboot_count_file())
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// The agent ran its reboot command and the machine has not acted on it yet (the mark is
    /// left for [`Machine::take_reboot_request`] or [`Machine::supervise`]).
    pub fn reboot_requested(&self) -> bool {
        self.reboot_mark().exists()
    }

    /// True once: the agent ran its reboot command since the last call.
    pub fn take_reboot_request(&self) -> bool {
        std::fs::remove_file(self.reboot_mark()).is_ok()
    }

    /// If the agent asked for a reboot: kill it, clear the sentinel, reboot the Node through
    /// `backend`, start the agent again. Returns whether a reboot happened.
    pub async fn supervise(&mut self, backend: &Backend) -> bool {
        if !self.take_reboot_request() {
            return false;
        }
        self.kill();
        let _ = std::fs::remove_file(self.sentinel());
        backend.reboot(&self.node).await;
        self.reboots += 1;
        self.start();
        true
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log of {} (last 40 lines) ---", self.node);
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
        }
        self.kill();
    }
}
