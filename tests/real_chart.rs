//! The chart installed for real: `manifests/` and the chart rendered with every feature on,
//! applied server-side to a real kube-apiserver (tests/common/real.rs); its admission policies
//! type-checked by the real server; and agents running as the chart's ServiceAccount, with
//! bound tokens of pods on their nodes, through a whole rollout under exactly the chart's RBAC
//! and admission policies, the audit log showing every request of theirs allowed. Also: what
//! the policies refuse on the real server, and `kreboot status` with the read-only permissions
//! the README names for it.
//!
//! Real backend only: without the components (scripts/k8s-components) or the chart's Python
//! tools (target/py-venv, or `$KREBOOT_PYTHON`) these tests fail; they never skip.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    OutMonitor,
    backend::{Backend, Machine},
    real::{self, ControlPlane},
};
use k8s_openapi::api::{
    admissionregistration::v1::ValidatingAdmissionPolicy,
    apps::v1::DaemonSet,
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Pod},
};
use kreboot::node::{ANN_LAST_REBOOT, ANN_PHASE};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value as Json, json};

/// The chart's release and namespace, as `manifests/` is rendered.
const NS: &str = "kreboot";
const SA_USER: &str = "system:serviceaccount:kreboot:kreboot";
const NODE_POLICY: &str = "kreboot-agent-node-scope";
const LEASE_POLICY: &str = "kreboot-agent-lease-scope";
const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";
/// A user for `kreboot status` (static token), with only the read permissions it needs.
const STATUS_TOKEN: &str = "kreboot-status-reader-token";
const STATUS_USER: &str = "kreboot-status-reader";
const LIMIT: Duration = Duration::from_secs(120);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn cp(b: &Backend) -> &ControlPlane {
    match b {
        Backend::Real(cp) => cp,
        Backend::Sim(..) => unreachable!("real backend only"),
    }
}

/// The Python that runs scripts/check_chart.py (Helm through helm-python-sdk): `$KREBOOT_PYTHON`,
/// else the venv scripts/test makes in target/py-venv.
fn chart_python() -> PathBuf {
    let p = std::env::var_os("KREBOOT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/py-venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: the chart cannot be rendered (scripts/test creates target/py-venv from \
         scripts/requirements.txt; or set KREBOOT_PYTHON to a Python that has them)",
        p.display()
    );
    p
}

/// The chart rendered with every feature on, as scripts/check_chart.py renders it
/// (`ALL_FEATURES`), as a `List` with the Namespace first; the objects of custom resources
/// whose CRDs are not installed here (ServiceMonitor, PodMonitor, PrometheusRule) are set aside.
fn render_all_features() -> (Json, Vec<String>) {
    let script = "import json, sys\nsys.path.insert(0, 'scripts')\nimport check_chart as c\n\
                  print(json.dumps([d for t in c.render(c.ALL_FEATURES).values() for d in c.docs(t)]))\n";
    let out = Command::new(chart_python())
        .args(["-c", script])
        .current_dir(root())
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "rendering the chart with every feature on failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Json> = serde_json::from_slice(&out.stdout).expect("the render is JSON");
    let (custom, mut items): (Vec<Json>, Vec<Json>) = objects.into_iter().partition(|o| {
        o["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
    });
    items.sort_by_key(|o| o["kind"] != "Namespace");
    let set_aside = custom
        .iter()
        .map(|o| format!("{} {}", o["kind"].as_str().unwrap_or("?"), o["metadata"]["name"]))
        .collect();
    (
        json!({"apiVersion": "v1", "kind": "List", "items": items}),
        set_aside,
    )
}

/// Waits (60 s at most) until the type checker (kube-controller-manager's
/// validatingadmissionpolicy-status-controller) has checked the current generation of every
/// ValidatingAdmissionPolicy in `names`, and returns each one's expression warnings.
async fn type_check(client: &Client, names: &[&str]) -> BTreeMap<String, Vec<String>> {
    let api: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut out = BTreeMap::new();
    for name in names {
        loop {
            let p = api
                .get_opt(name)
                .await
                .expect("get ValidatingAdmissionPolicy")
                .unwrap_or_else(|| panic!("ValidatingAdmissionPolicy {name} was not installed"));
            let status = p.status.clone().unwrap_or_default();
            if status.observed_generation.is_some() && status.observed_generation == p.metadata.generation {
                let warnings = status
                    .type_checking
                    .and_then(|t| t.expression_warnings)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| format!("{}: {}", w.field_ref, w.warning))
                    .collect();
                out.insert(name.to_string(), warnings);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ValidatingAdmissionPolicy {name}: status.observedGeneration {:?} never reached \
                 generation {:?} in 60 s (is the type checker running?)",
                status.observed_generation,
                p.metadata.generation
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    out
}

/// Every installed ValidatingAdmissionPolicy type-checks cleanly against the kinds it matches.
async fn assert_policies_type_check(client: &Client, what: &str) {
    let api: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .expect("list ValidatingAdmissionPolicies")
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let warnings = type_check(client, &names).await;
    let bad: Vec<String> = warnings
        .iter()
        .flat_map(|(p, ws)| ws.iter().map(move |w| format!("  {p}: {w}")))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: the real API server's type check of the admission policies reports:\n{}",
        bad.join("\n")
    );
    assert_eq!(
        names.iter().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([NODE_POLICY, LEASE_POLICY]),
        "{what}: the chart's two admission policies"
    );
    eprintln!("{what}: {names:?} type-check cleanly");
}

/// `manifests/` and the chart with every feature on apply server-side to a real API server, and
/// their admission policies type-check there (status.typeChecking, filled by the real type
/// checker): no expression refers to a field its kind does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_applies_and_its_policies_type_check() {
    let cp = ControlPlane::start(real::Options {
        kwok: false,
        ..real::Options::default()
    })
    .await;
    let client = cp.admin_client();

    cp.kubectl_apply(&root().join("manifests"), None);
    assert_policies_type_check(&client, "manifests/").await;

    let (list, set_aside) = render_all_features();
    eprintln!("every feature on: set aside (CRDs not installed): {set_aside:?}");
    assert_eq!(
        set_aside.len(),
        3,
        "ServiceMonitor, PodMonitor, PrometheusRule: {set_aside:?}"
    );
    cp.kubectl_apply(Path::new("-"), Some(&serde_json::to_string(&list).expect("JSON")));
    // With every feature on, the node policy carries the pre/post-reboot labels and the taint.
    let node_policy = Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .get(NODE_POLICY)
        .await
        .expect("node policy");
    let vars = serde_json::to_string(&node_policy.spec).expect("JSON");
    assert!(
        vars.contains("example.com/reboot-pending") && vars.contains("example.com/patched"),
        "the render with every feature on was applied: {vars}"
    );
    assert_policies_type_check(&client, "every feature on").await;
}

/// The code and message of a refused request; panics when it was not refused.
fn refusal<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message.clone()),
        Err(e) => panic!("{what}: unexpected error {e}"),
        Ok(v) => panic!("{what}: admitted, expected a refusal: {v:?}"),
    }
}

/// Asserts a 403 from `policy` with `message` in it.
fn assert_denied<T: std::fmt::Debug>(r: Result<T, kube::Error>, what: &str, policy: &str, message: &str) {
    let (code, m) = refusal(r, what);
    assert_eq!(code, 403, "{what}: {m}");
    assert!(
        m.contains(&format!("ValidatingAdmissionPolicy '{policy}'")) && m.contains(message),
        "{what}: refused by {policy} with {message:?}? got: {m}"
    );
    eprintln!("{what}: 403 {m}");
}

fn str_of<'a>(v: &'a Json, path: &[&str]) -> &'a str {
    path.iter().fold(v, |v, k| &v[*k]).as_str().unwrap_or("")
}

/// The audit events (final stage) of the chart's ServiceAccount with a token of one of `pods`.
fn audit_of_pods(cp: &ControlPlane, pods: &[&str]) -> Vec<Json> {
    cp.audit()
        .into_iter()
        .filter(|e| e["stage"] == "ResponseComplete" && str_of(e, &["user", "username"]) == SA_USER)
        .filter(|e| {
            e["user"]["extra"][POD_NAME_KEY]
                .as_array()
                .and_then(|a| a.first())
                .and_then(Json::as_str)
                .is_some_and(|p| pods.contains(&p))
        })
        .collect()
}

fn describe(e: &Json) -> String {
    format!(
        "{} {} -> {} ({}; pod {})",
        str_of(e, &["verb"]),
        str_of(e, &["requestURI"]),
        e["responseStatus"]["code"],
        str_of(e, &["annotations", "authorization.k8s.io/decision"]),
        e["user"]["extra"][POD_NAME_KEY],
    )
}

/// (apiGroup, resource[/subresource], verb, namespace) of an audit event.
fn call_of(e: &Json) -> (String, String, String, String) {
    let r = &e["objectRef"];
    let mut resource = str_of(r, &["resource"]).to_string();
    if let Some(sub) = r["subresource"].as_str() {
        resource = format!("{resource}/{sub}");
    }
    (
        str_of(r, &["apiGroup"]).to_string(),
        resource,
        str_of(e, &["verb"]).to_string(),
        str_of(r, &["namespace"]).to_string(),
    )
}

/// The node completed its cycle: a reboot recorded, no phase, holding no slot.
async fn completed(admin: &Client, node: &str) -> bool {
    let n = Api::<Node>::all(admin.clone()).get(node).await.expect("get node");
    let ann = n.metadata.annotations.unwrap_or_default();
    let holding = lease_holders(admin).await.iter().any(|h| h == node);
    ann.contains_key(ANN_LAST_REBOOT) && !ann.contains_key(ANN_PHASE) && !holding
}

async fn lease_holders(admin: &Client) -> Vec<String> {
    Api::<Lease>::namespaced(admin.clone(), NS)
        .list(&ListParams::default().labels(kreboot::lock::LOCK_LABEL))
        .await
        .expect("list leases")
        .items
        .into_iter()
        .filter_map(|l| l.spec?.holder_identity.filter(|h| !h.is_empty()))
        .collect()
}

/// Agents as the chart's ServiceAccount, on bound tokens of pods on their nodes, under exactly
/// the chart's RBAC and admission policies (manifests/ applied as they are):
/// (a) a rollout of two nodes completes and the audit log shows every request of theirs allowed
///     by the real RBAC and admitted, and every grant of the chart's roles used;
/// (b) n0's token is refused (403, the policy's message) for another Node, a label outside
///     kreboot.io/, a taint, a Lease outside the lock, a slot named for or freed from another
///     node; an unbound token of the ServiceAccount (no node name) is refused; taking over a
///     live slot is admitted (no clock in CEL); the audit log records each refusal;
/// (c) `kreboot status` works with exactly the read permissions the README names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_as_the_charts_service_account() {
    let b = Backend::Real(Box::new(
        ControlPlane::start(real::Options {
            kwok: true,
            tokens: vec![(
                STATUS_TOKEN.into(),
                STATUS_USER.into(),
                STATUS_USER.into(),
                String::new(),
            )],
            ..real::Options::default()
        })
        .await,
    ));
    let cp = cp(&b);
    let admin = cp.admin_client();
    cp.kubectl_apply(&root().join("manifests"), None);
    assert_policies_type_check(&admin, "manifests/").await;
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "apps"}})).unwrap(),
        )
        .await
        .expect("namespace apps");

    let ds = Api::<DaemonSet>::namespaced(admin.clone(), NS)
        .get("kreboot")
        .await
        .expect("the chart's DaemonSet");
    let nodes = ["n0", "n1"];
    let mut tokens = BTreeMap::new();
    for node in nodes {
        b.add_node(node, &[("agentpool", "system")]).await;
        for p in 0..2 {
            b.add_pod("apps", &format!("{node}-app-{p}"), node, &[("app", "web")])
                .await;
        }
        let pod = real::agent_pod(&admin, NS, &ds, node).await;
        tokens.insert(node, real::sa_token(&admin, NS, Some(&pod)).await);
    }
    // A probe: another pod on n0, whose token shows when the admission policies are in force
    // (the API server loads them from an informer, a moment after they are created).
    let probe_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "kreboot-probe"},
        "spec": {"nodeName": "n0", "serviceAccountName": "kreboot",
                 "containers": [{"name": "probe", "image": "registry.invalid/probe:1"}]},
    }))
    .unwrap();
    let probe_pod = Api::<Pod>::namespaced(admin.clone(), NS)
        .create(&PostParams::default(), &probe_pod)
        .await
        .expect("probe pod");
    let probe = cp.client(&real::sa_token(&admin, NS, Some(&probe_pod)).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = Api::<Node>::all(probe.clone())
            .patch(
                "n1",
                &PatchParams {
                    dry_run: true,
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"metadata": {"annotations": {"kreboot.io/probe": "x"}}})),
            )
            .await;
        match r {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(NODE_POLICY) => break,
            other => assert!(
                Instant::now() < deadline,
                "the node policy is not in force after 60 s: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Gone before the rollout: n0's drain would evict it (it has no DaemonSet owner).
    Api::<Pod>::namespaced(admin.clone(), NS)
        .delete("kreboot-probe", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the probe pod");
    b.wait_pods_ready("apps").await;

    // The token carries the node name (what the policies read).
    {
        let n0 = cp.client(&tokens["n0"]);
        Api::<Node>::all(n0)
            .patch(
                "n0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"kreboot.io/token-check": "ok"}}})),
            )
            .await
            .expect("an agent may annotate its own Node with kreboot.io/");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let seen = audit_of_pods(cp, &["kreboot-n0"]);
        let e = seen
            .iter()
            .find(|e| e["verb"] == "patch")
            .expect("the audit log records the patch");
        assert_eq!(e["user"]["extra"][NODE_NAME_KEY], json!(["n0"]), "{e}");
        Api::<Node>::all(admin.clone())
            .patch(
                "n0",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"kreboot.io/token-check": null}}})),
            )
            .await
            .expect("admin removes the annotation");
    }

    // A health gate with its budget check (on by default), so the rollout makes every call the
    // chart grants for it: the drain lists the PodDisruptionBudgets, the gate watches them.
    b.add_pdb("apps", "web", &[("app", "web")], 0).await;
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(admin.clone(), NS)
        .patch(
            "kreboot-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"config.yaml":
                "timezone: UTC\nrules:\n  - {name: all, nodeSelector: {}, healthGate: {timeout: 1m}}\n"}})),
        )
        .await
        .expect("policy with a health gate");

    // (a) A whole rollout with the agents on those tokens.
    let mut machines: Vec<Machine> = nodes
        .iter()
        .map(|n| {
            let mut m = Machine::new(n, &cp.write_kubeconfig(n, &tokens[n]), &[]);
            m.namespace = NS.into();
            m
        })
        .collect();
    let monitor = OutMonitor::watch(admin.clone());
    for m in machines.iter_mut() {
        m.require_reboot();
        m.start();
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        for m in machines.iter_mut() {
            m.supervise(&b).await;
        }
        let mut done = true;
        for n in nodes {
            done &= completed(&admin, n).await;
        }
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not complete in {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for m in &machines {
        assert_eq!(m.reboots, 1, "{} rebooted once", m.node);
        assert!(!b.unschedulable(&m.node).await, "{} uncordoned", m.node);
    }
    assert_eq!(monitor.max(), 1, "one node out at a time");
    let apps = Api::<Pod>::namespaced(admin.clone(), "apps")
        .list(&ListParams::default())
        .await
        .expect("list apps pods");
    assert!(apps.items.is_empty(), "every app pod was evicted");
    for m in machines.iter_mut() {
        m.kill();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every request of the agents: allowed by the real RBAC, admitted by the real policies.
    let agent_pods = ["kreboot-n0", "kreboot-n1"];
    let events = audit_of_pods(cp, &agent_pods);
    assert!(
        events.len() > 20,
        "the agents' requests are in the audit log: {}",
        events.len()
    );
    let refused: Vec<String> = events
        .iter()
        .filter(|e| {
            matches!(e["responseStatus"]["code"].as_u64(), Some(401 | 403))
                || e["annotations"]["authorization.k8s.io/decision"] != "allow"
        })
        .map(describe)
        .collect();
    assert!(
        refused.is_empty(),
        "requests of the agents refused by the real API server:\n{}",
        refused.join("\n")
    );
    // ... and every grant of the chart's ClusterRole and Role was used (as tests/rbac.rs checks
    // on the simulated cluster; `patch events` is used only when an Event repeats).
    let calls: BTreeSet<(String, String, String, String)> = events.iter().map(call_of).collect();
    let rbac: Vec<Json> =
        serde_saphyr::from_multiple(&std::fs::read_to_string(root().join("manifests/rbac.yaml")).unwrap())
            .expect("manifests/rbac.yaml");
    let mut unused = Vec::new();
    for role in rbac
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let ns = str_of(role, &["metadata", "namespace"]);
        for rule in role["rules"].as_array().expect("rules") {
            for group in rule["apiGroups"].as_array().unwrap() {
                for res in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        let (g, r, v) = (
                            group.as_str().unwrap(),
                            res.as_str().unwrap(),
                            verb.as_str().unwrap(),
                        );
                        let used = calls
                            .iter()
                            .any(|c| c.0 == g && c.1 == r && c.2 == v && (ns.is_empty() || c.3 == ns));
                        let exempt = r == "events" && v == "patch";
                        if !used && !exempt {
                            unused.push(format!("{} {g}/{r} {v}", role["kind"].as_str().unwrap()));
                        }
                    }
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "grants the agents never used on the real server: {unused:?}\ncalls: {calls:#?}"
    );
    // The drains evicted the application pods only: the agents' own (DaemonSet) pods stay, and
    // with them the tokens bound to them.
    let evicted_ns: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c.1 == "pods/eviction")
        .map(|c| c.3.as_str())
        .collect();
    assert_eq!(
        evicted_ns,
        BTreeSet::from(["apps"]),
        "evictions only in namespace apps"
    );
    eprintln!(
        "rollout: {} requests of the agents, all allowed; calls: {calls:?}",
        events.len()
    );

    // (b) What the policies refuse, with n0's token.
    let n0 = cp.client(&tokens["n0"]);
    let n0_nodes: Api<Node> = Api::all(n0.clone());
    let pp = PatchParams::default();
    assert_denied(
        n0_nodes
            .patch("n1", &pp, &Patch::Merge(json!({"spec": {"unschedulable": true}})))
            .await,
        "n0 cordons n1",
        NODE_POLICY,
        "may modify only its own Node n0, not n1",
    );
    assert_denied(
        n0_nodes
            .patch(
                "n0",
                &pp,
                &Patch::Merge(json!({"metadata": {"labels": {"example.com/role": "x"}}})),
            )
            .await,
        "n0 sets a label outside kreboot.io/ on its own Node",
        NODE_POLICY,
        "may change only kreboot.io/ labels",
    );
    assert_denied(
        n0_nodes
            .patch(
                "n0",
                &pp,
                &Patch::Merge(json!({"metadata": {"labels": {"agentpool": null}}})),
            )
            .await,
        "n0 removes an administrator's label of its own Node",
        NODE_POLICY,
        "may change only kreboot.io/ labels",
    );
    assert_denied(
        n0_nodes
            .patch(
                "n0",
                &pp,
                &Patch::Merge(json!({"spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}})),
            )
            .await,
        "n0 taints its own Node",
        NODE_POLICY,
        "may change only its own PreferNoSchedule taint",
    );
    // Its own Node, kreboot's labels: admitted (the refusals above are the policy's, not RBAC's).
    n0_nodes
        .patch(
            "n0",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"kreboot.io/check": "x"}}})),
        )
        .await
        .expect("n0 may set a kreboot.io/ label on its own Node");

    // Leases: n1 holds slot kreboot-lock (its own token names it), alive (renewed now).
    let leases_admin: Api<Lease> = Api::namespaced(admin.clone(), NS);
    let leases_n1: Api<Lease> = Api::namespaced(cp.client(&tokens["n1"]), NS);
    let leases_n0: Api<Lease> = Api::namespaced(n0.clone(), NS);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let mut slot = leases_admin
        .get("kreboot-lock")
        .await
        .expect("slot 0 exists after the rollout");
    let spec = slot.spec.get_or_insert_with(Default::default);
    spec.holder_identity = Some("n1".into());
    spec.renew_time = Some(serde_json::from_value(json!(now)).unwrap());
    spec.acquire_time = Some(serde_json::from_value(json!(now)).unwrap());
    let held = leases_n1
        .replace("kreboot-lock", &PostParams::default(), &slot)
        .await
        .expect("n1 may take a free slot for itself");
    let with_holder = |holder: Option<&str>| {
        let mut l = held.clone();
        l.spec.as_mut().unwrap().holder_identity = holder.map(str::to_owned);
        l
    };
    assert_denied(
        leases_n0
            .replace("kreboot-lock", &PostParams::default(), &with_holder(Some("n2")))
            .await,
        "n0 names another node as holder of n1's slot",
        LEASE_POLICY,
        "may name another holder (n2) only when handing over a slot it holds; it runs on n0",
    );
    assert_denied(
        leases_n0
            .replace("kreboot-lock", &PostParams::default(), &with_holder(None))
            .await,
        "n0 frees n1's slot",
        LEASE_POLICY,
        "may name another holder () only when handing over a slot it holds",
    );
    let other_slot: Lease = serde_json::from_value(json!({
        "metadata": {"name": "kreboot-lock-1", "labels": {kreboot::lock::LOCK_LABEL: "kreboot-lock"}},
        "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 1800},
    }))
    .unwrap();
    assert_denied(
        leases_n0.create(&PostParams::default(), &other_slot).await,
        "n0 creates a slot held by n1",
        LEASE_POLICY,
        "may name another holder (n1)",
    );
    let foreign: Lease = serde_json::from_value(json!({
        "metadata": {"name": "kube-scheduler"},
        "spec": {"holderIdentity": "n0", "leaseDurationSeconds": 15},
    }))
    .unwrap();
    assert_denied(
        leases_n0.create(&PostParams::default(), &foreign).await,
        "n0 creates a Lease outside the lock",
        LEASE_POLICY,
        "may write only its lock's Leases (kreboot-lock*)",
    );
    // Taking over n1's live slot (n0 names itself) is admitted: whether the holder's Lease
    // expired depends on the time, and an admission policy's CEL has no clock (README,
    // "Admission policy"). The agents take a slot over only when it expired or its holder's
    // Node is gone. Dry run: n1 keeps the slot.
    leases_n0
        .replace(
            "kreboot-lock",
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &with_holder(Some("n0")),
        )
        .await
        .expect("a take-over naming itself is not judged by the policy (no clock in CEL)");
    assert_eq!(lease_holders(&admin).await, ["n1"], "n1 still holds its slot");

    // A token of the same ServiceAccount that names no node (not bound to a pod).
    let unbound = cp.client(&real::sa_token(&admin, NS, None).await);
    assert_denied(
        Api::<Node>::all(unbound.clone())
            .patch(
                "n0",
                &pp,
                &Patch::Merge(json!({"metadata": {"annotations": {"kreboot.io/x": "y"}}})),
            )
            .await,
        "an unbound token patches a Node",
        NODE_POLICY,
        "token names no node",
    );
    assert_denied(
        Api::<Lease>::namespaced(unbound, NS)
            .create(&PostParams::default(), &other_slot)
            .await,
        "an unbound token creates a slot",
        LEASE_POLICY,
        "token names no node",
    );
    // Outside the chart's RBAC (no delete on nodes): refused by RBAC itself.
    let (code, m) = refusal(
        n0_nodes.delete("n1", &DeleteParams::default()).await,
        "n0 deletes n1",
    );
    assert!(
        code == 403 && m.contains("cannot delete resource \"nodes\"") && !m.contains("AdmissionPolicy"),
        "n0 deletes n1: refused by RBAC? {code} {m}"
    );
    // The audit log shows these refusals (the check of (a) would have seen them), the last one
    // as RBAC's decision.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n0_refused: Vec<Json> = audit_of_pods(cp, &["kreboot-n0"])
        .into_iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .collect();
    assert_eq!(
        n0_refused.len(),
        9,
        "n0's refused requests in the audit log: {:#?}",
        n0_refused.iter().map(describe).collect::<Vec<_>>()
    );
    let forbidden_by_rbac: Vec<String> = n0_refused
        .iter()
        .filter(|e| e["annotations"]["authorization.k8s.io/decision"] == "forbid")
        .map(describe)
        .collect();
    assert_eq!(forbidden_by_rbac.len(), 1, "{forbidden_by_rbac:?}");
    assert!(
        forbidden_by_rbac[0].starts_with("delete /api/v1/nodes/n1"),
        "{forbidden_by_rbac:?}"
    );

    // (c) `kreboot status` with the read permissions the README names: list nodes, list leases
    // and get configmaps in kreboot's namespace.
    let reader = json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": "kreboot-status-reader"},
             "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": "kreboot-status-reader"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kreboot-status-reader"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": STATUS_USER}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "kreboot-status-reader", "namespace": NS},
             "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["list"]},
                       {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "kreboot-status-reader", "namespace": NS},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kreboot-status-reader"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": STATUS_USER}]},
        ],
    });
    cp.kubectl_apply(Path::new("-"), Some(&reader.to_string()));
    let kubeconfig = cp.write_kubeconfig("status", STATUS_TOKEN);
    // RBAC's informers take the new bindings a moment after they are created.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_kreboot"))
            .args(["status", "--namespace", NS])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAMESPACE")
            .output()
            .expect("kreboot status runs");
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kreboot status with the read-only permissions failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("kreboot status:\n{stdout}");
    for node in nodes {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{node} "))),
            "status shows {node}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("kreboot-lock"),
        "status shows the lock slot:\n{stdout}"
    );
    assert!(
        stdout.contains("POLICY: ConfigMap kreboot/kreboot-config valid"),
        "status read the policy ConfigMap:\n{stdout}"
    );
    // Exactly those three reads, all allowed (the retries above may have met a 403 while the
    // bindings propagated; the last run's requests are allowed).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status_events: Vec<Json> = cp
        .audit()
        .into_iter()
        .filter(|e| e["stage"] == "ResponseComplete" && str_of(e, &["user", "username"]) == STATUS_USER)
        .collect();
    let last: Vec<&Json> = status_events.iter().rev().take(3).collect();
    let mut last_calls: Vec<(String, String, String, String)> = last.iter().map(|e| call_of(e)).collect();
    last_calls.sort();
    let call =
        |g: &str, r: &str, v: &str, ns: &str| (g.to_string(), r.to_string(), v.to_string(), ns.to_string());
    assert_eq!(
        last_calls,
        [
            call("", "configmaps", "get", NS),
            call("", "nodes", "list", ""),
            call("coordination.k8s.io", "leases", "list", NS),
        ],
        "kreboot status makes exactly the three reads the README names"
    );
    for e in last {
        assert_eq!(e["responseStatus"]["code"], 200, "{}", describe(e));
    }
    let writes = status_events
        .iter()
        .filter(|e| !matches!(str_of(e, &["verb"]), "get" | "list" | "watch"))
        .count();
    assert_eq!(writes, 0, "kreboot status writes nothing");
}
