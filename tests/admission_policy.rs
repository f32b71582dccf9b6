//! The ValidatingAdmissionPolicies in manifests/ (rendered from the chart; one for Nodes, one
//! for Leases), evaluated with a CEL interpreter against sample admission requests: an agent may
//! modify only its own Node (and only kreboot's labels, never taints), write only its lock's
//! Leases and name another holder only when it hands over a slot it holds; other users and
//! ServiceAccounts are not matched.
//!
//! This follows the API server's evaluation order (matchConstraints, matchConditions,
//! variables in order, validations; every matching policy must allow) with the standard CEL
//! library; Kubernetes' CEL extensions are not used by the policies. The real API server's type
//! check and its verdicts on real requests are in tests/real_chart.rs.

use std::collections::BTreeMap;

use cel::{Context, Program, Value};
use serde_json::{Value as Json, json};

const AGENT: &str = "system:serviceaccount:kreboot:kreboot";
const NODE_NAME_KEY: &str = "authentication.kubernetes.io/node-name";

const NODE_POLICY: &str = "kreboot-agent-node-scope";
const LEASE_POLICY: &str = "kreboot-agent-lease-scope";

/// Every object of manifests/admissionpolicy.yaml.
fn documents() -> Vec<Json> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/admissionpolicy.yaml");
    let text = std::fs::read_to_string(&path).expect("manifests/admissionpolicy.yaml exists");
    serde_saphyr::from_multiple(&text).expect("valid YAML")
}

/// The ValidatingAdmissionPolicies (Nodes, then Leases).
fn policies() -> Vec<Json> {
    let mut p: Vec<Json> = documents()
        .into_iter()
        .filter(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .collect();
    p.sort_by_key(|d| d["metadata"]["name"] != NODE_POLICY);
    p
}

#[derive(Debug, PartialEq)]
enum Verdict {
    NotMatched,
    Allowed,
    Denied(String),
}

fn eval(expr: &str, ctx: &Context<'_, '_>) -> Value {
    let program = Program::compile(expr).unwrap_or_else(|e| panic!("CEL does not compile: {expr}: {e}"));
    program
        .execute(ctx)
        .unwrap_or_else(|e| panic!("CEL evaluation failed: {expr}: {e}"))
}

fn truthy(v: &Value, expr: &str) -> bool {
    match v {
        Value::Bool(b) => *b,
        other => panic!("{expr} gave {other:?}, not a bool"),
    }
}

fn matches_constraints(policy: &Json, request: &Json) -> bool {
    let rules = policy["spec"]["matchConstraints"]["resourceRules"]
        .as_array()
        .expect("resourceRules");
    let has = |list: &Json, item: &Json| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|x| x == item || x == "*"))
    };
    rules.iter().any(|r| {
        has(&r["apiGroups"], &request["resource"]["group"])
            && has(&r["apiVersions"], &request["resource"]["version"])
            && has(&r["resources"], &request["resource"]["resource"])
            && has(&r["operations"], &request["operation"])
    })
}

/// The verdict of every policy together: denied by the first that denies, allowed when one
/// matched and none denied.
fn admit(policies: &[Json], request: Json, object: Json, old_object: Json) -> Verdict {
    let mut verdict = Verdict::NotMatched;
    for p in policies {
        match admit_one(p, request.clone(), object.clone(), old_object.clone()) {
            Verdict::NotMatched => {}
            Verdict::Allowed => verdict = Verdict::Allowed,
            denied => return denied,
        }
    }
    verdict
}

fn admit_one(policy: &Json, request: Json, object: Json, old_object: Json) -> Verdict {
    if !matches_constraints(policy, &request) {
        return Verdict::NotMatched;
    }
    let mut ctx = Context::default();
    ctx.add_variable_from_value("request", cel::to_value(&request).expect("request converts"));
    ctx.add_variable_from_value("object", cel::to_value(&object).expect("object converts"));
    ctx.add_variable_from_value(
        "oldObject",
        cel::to_value(&old_object).expect("oldObject converts"),
    );
    for c in policy["spec"]["matchConditions"].as_array().into_iter().flatten() {
        let expr = c["expression"].as_str().expect("expression");
        if !truthy(&eval(expr, &ctx), expr) {
            return Verdict::NotMatched;
        }
    }
    let mut variables: BTreeMap<String, Json> = BTreeMap::new();
    for v in policy["spec"]["variables"].as_array().into_iter().flatten() {
        ctx.add_variable_from_value("variables", cel::to_value(&variables).expect("variables convert"));
        let expr = v["expression"].as_str().expect("expression");
        let value = eval(expr, &ctx);
        let as_json = to_json(&value).unwrap_or_else(|| panic!("variable {} is {value:?}", v["name"]));
        variables.insert(v["name"].as_str().expect("name").to_owned(), as_json);
    }
    ctx.add_variable_from_value("variables", cel::to_value(&variables).expect("variables convert"));
    for v in policy["spec"]["validations"].as_array().into_iter().flatten() {
        let expr = v["expression"].as_str().expect("expression");
        if !truthy(&eval(expr, &ctx), expr) {
            let message = match v["messageExpression"].as_str() {
                Some(m) => match eval(m, &ctx) {
                    Value::String(s) => s.to_string(),
                    other => panic!("messageExpression gave {other:?}"),
                },
                None => v["message"].as_str().unwrap_or(expr).to_owned(),
            };
            return Verdict::Denied(message);
        }
    }
    Verdict::Allowed
}

fn to_json(v: &Value) -> Option<Json> {
    Some(match v {
        Value::Bool(b) => json!(b),
        Value::String(s) => json!(s.as_str()),
        Value::List(items) => Json::Array(items.iter().map(to_json).collect::<Option<Vec<_>>>()?),
        _ => return None,
    })
}

/// The policy as the chart renders it with pre/post-reboot labels and a PreferNoSchedule taint
/// configured: the two variables it templates, set as `helm template` sets them.
fn policies_with(labels: &[&str], taint: &str) -> Vec<Json> {
    let mut ps = policies();
    for v in ps[0]["spec"]["variables"].as_array_mut().expect("variables") {
        match v["name"].as_str() {
            Some("ownLabels") => v["expression"] = json!(serde_json::to_string(labels).expect("json")),
            Some("ownTaint") => v["expression"] = json!(format!("'{taint}'")),
            _ => {}
        }
    }
    ps
}

fn request(user: &str, node: Option<&str>, operation: &str, group: &str, resource: &str) -> Json {
    let mut extra = serde_json::Map::new();
    if let Some(n) = node {
        extra.insert(NODE_NAME_KEY.into(), json!([n]));
        extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            json!(["kreboot-abcde"]),
        );
    }
    json!({
        "operation": operation,
        "resource": {"group": group, "version": "v1", "resource": resource},
        "userInfo": {"username": user, "groups": ["system:serviceaccounts"], "extra": extra},
    })
}

fn node(name: &str, labels: Json, unschedulable: bool, taints: Option<Json>) -> Json {
    let mut spec = json!({"unschedulable": unschedulable});
    if let Some(t) = taints {
        spec["taints"] = t;
    }
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {}},
        "spec": spec,
    })
}

fn base_labels() -> Json {
    json!({"kubernetes.io/hostname": "n1", "agentpool": "system"})
}

fn lease(name: &str, holder: Option<&str>) -> Json {
    let mut spec = json!({"leaseDurationSeconds": 1800});
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name, "namespace": "kreboot"}, "spec": spec})
}

fn node_update(user: &str, token_node: Option<&str>, old: Json, new: Json) -> Verdict {
    admit(
        &policies(),
        request(user, token_node, "UPDATE", "", "nodes"),
        new,
        old,
    )
}

#[test]
fn an_agent_may_cordon_and_annotate_its_own_node() {
    let old = node("n1", base_labels(), false, None);
    let mut new = node("n1", base_labels(), true, None);
    new["metadata"]["labels"]["kreboot.io/lock-holder"] = json!("true");
    new["metadata"]["annotations"]["kreboot.io/phase"] = json!("draining");
    assert_eq!(
        node_update(AGENT, Some("n1"), old.clone(), new.clone()),
        Verdict::Allowed
    );
    // ... and take kreboot's labels off again.
    assert_eq!(node_update(AGENT, Some("n1"), new, old), Verdict::Allowed);
}

#[test]
fn an_agent_may_not_touch_another_node() {
    let old = node("n2", base_labels(), false, None);
    let new = node("n2", base_labels(), true, None);
    match node_update(AGENT, Some("n1"), old, new) {
        Verdict::Denied(m) => assert!(m.contains("only its own Node n1, not n2"), "{m}"),
        v => panic!("expected a denial, got {v:?}"),
    }
}

#[test]
fn an_agent_may_not_change_other_labels_or_taints_of_its_node() {
    let old = node("n1", base_labels(), false, None);
    let mut relabelled = old.clone();
    relabelled["metadata"]["labels"]["agentpool"] = json!("gpu");
    assert!(
        matches!(node_update(AGENT, Some("n1"), old.clone(), relabelled), Verdict::Denied(m) if m.contains("labels"))
    );
    let mut unlabelled = old.clone();
    unlabelled["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("agentpool");
    assert!(
        matches!(node_update(AGENT, Some("n1"), old.clone(), unlabelled), Verdict::Denied(m) if m.contains("labels"))
    );
    let tainted = node(
        "n1",
        base_labels(),
        false,
        Some(json!([{"key": "x", "effect": "NoSchedule"}])),
    );
    assert!(
        matches!(node_update(AGENT, Some("n1"), old, tainted), Verdict::Denied(m) if m.contains("taint"))
    );
}

#[test]
fn a_token_without_a_node_name_is_refused() {
    let old = node("n1", base_labels(), false, None);
    let new = node("n1", base_labels(), true, None);
    assert!(matches!(node_update(AGENT, None, old, new), Verdict::Denied(m) if m.contains("names no node")));
}

#[test]
fn other_service_accounts_and_users_are_not_matched() {
    let old = node("n2", base_labels(), false, None);
    let new = node(
        "n2",
        base_labels(),
        true,
        Some(json!([{"key": "x", "effect": "NoSchedule"}])),
    );
    // `kreboot drain` run by an administrator, and another controller's ServiceAccount.
    assert_eq!(
        node_update("alice@example.com", None, old.clone(), new.clone()),
        Verdict::NotMatched
    );
    assert_eq!(
        node_update(
            "system:serviceaccount:kube-system:cluster-autoscaler",
            Some("n1"),
            old.clone(),
            new.clone()
        ),
        Verdict::NotMatched
    );
    // The same ServiceAccount name in another namespace is another identity.
    assert_eq!(
        node_update("system:serviceaccount:default:kreboot", Some("n1"), old, new),
        Verdict::NotMatched
    );
}

#[test]
fn evictions_are_outside_the_policy() {
    // An Eviction names the pod only; CEL cannot look up the pod's node (README).
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web-0", "namespace": "apps"}});
    assert_eq!(
        admit(
            &policies(),
            request(AGENT, Some("n1"), "CREATE", "", "pods"),
            eviction,
            Json::Null
        ),
        Verdict::NotMatched
    );
}

fn lease_write(operation: &str, old: Json, new: Json) -> Verdict {
    admit(
        &policies(),
        request(AGENT, Some("n1"), operation, "coordination.k8s.io", "leases"),
        new,
        old,
    )
}

#[test]
fn lease_writes_of_the_lock_protocol_are_allowed() {
    let cases = [
        (
            "create a slot",
            "CREATE",
            Json::Null,
            lease("kreboot-lock", Some("n1")),
        ),
        (
            "renew",
            "UPDATE",
            lease("kreboot-lock", Some("n1")),
            lease("kreboot-lock", Some("n1")),
        ),
        (
            "take over an expired slot",
            "UPDATE",
            lease("kreboot-lock-1", Some("n2")),
            lease("kreboot-lock-1", Some("n1")),
        ),
        (
            "hand over to the next node",
            "UPDATE",
            lease("kreboot-lock", Some("n1")),
            lease("kreboot-lock", Some("n3")),
        ),
        (
            "release",
            "UPDATE",
            lease("kreboot-lock", Some("n1")),
            lease("kreboot-lock", None),
        ),
    ];
    for (what, op, old, new) in cases {
        assert_eq!(lease_write(op, old, new), Verdict::Allowed, "{what}");
    }
}

#[test]
fn lease_writes_outside_the_protocol_are_denied() {
    let v = lease_write(
        "UPDATE",
        lease("kreboot-lock", Some("n2")),
        lease("kreboot-lock", Some("n3")),
    );
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("another holder (n3)")),
        "{v:?}"
    );
    let v = lease_write(
        "UPDATE",
        lease("kreboot-lock", Some("n2")),
        lease("kreboot-lock", None),
    );
    assert!(
        matches!(&v, Verdict::Denied(_)),
        "freeing another node's slot: {v:?}"
    );
    let v = lease_write("CREATE", Json::Null, lease("kreboot-lock", Some("n2")));
    assert!(
        matches!(&v, Verdict::Denied(_)),
        "creating a slot for another node: {v:?}"
    );
    let v = lease_write(
        "UPDATE",
        lease("kube-scheduler", Some("x")),
        lease("kube-scheduler", Some("n1")),
    );
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("only its lock's Leases")),
        "{v:?}"
    );
}

#[test]
fn configured_labels_and_the_taint_are_allowed_and_nothing_else() {
    let p = policies_with(&["example.com/patched"], "example.com/reboot-pending");
    let req = || request(AGENT, Some("n1"), "UPDATE", "", "nodes");
    let old = node(
        "n1",
        base_labels(),
        false,
        Some(json!([{"key": "gpu", "effect": "NoSchedule"}])),
    );
    let mut new = node(
        "n1",
        base_labels(),
        false,
        Some(
            json!([{"key": "gpu", "effect": "NoSchedule"}, {"key": "example.com/reboot-pending", "effect": "PreferNoSchedule"}]),
        ),
    );
    new["metadata"]["labels"]["example.com/patched"] = json!("true");
    assert_eq!(admit(&p, req(), new.clone(), old.clone()), Verdict::Allowed);
    assert_eq!(
        admit(&p, req(), old.clone(), new.clone()),
        Verdict::Allowed,
        "and removed again"
    );
    // Another taint, or removing the administrator's one, is still refused.
    let mut other = new.clone();
    other["spec"]["taints"] = json!([{"key": "example.com/reboot-pending", "effect": "PreferNoSchedule"}]);
    assert!(matches!(admit(&p, req(), other, old.clone()), Verdict::Denied(m) if m.contains("taint")));
    let mut label = old.clone();
    label["metadata"]["labels"]["example.com/other"] = json!("x");
    assert!(matches!(admit(&p, req(), label, old), Verdict::Denied(m) if m.contains("labels")));
}

#[test]
fn one_policy_per_kind_each_with_its_binding() {
    // The API server type-checks every expression against each kind a policy matches: a Node's
    // fields are undefined on a Lease. So each policy matches exactly one resource.
    let docs = documents();
    let ps = policies();
    let names: Vec<&str> = ps
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, [NODE_POLICY, LEASE_POLICY]);
    for (p, resource) in ps.iter().zip(["nodes", "leases"]) {
        let rules = p["spec"]["matchConstraints"]["resourceRules"].as_array().unwrap();
        let resources: Vec<&Json> = rules
            .iter()
            .flat_map(|r| r["resources"].as_array().unwrap())
            .collect();
        assert_eq!(
            resources,
            [&json!(resource)],
            "{} matches only {resource}",
            names[0]
        );
        let name = &p["metadata"]["name"];
        let bindings: Vec<&Json> = docs
            .iter()
            .filter(|d| d["kind"] == "ValidatingAdmissionPolicyBinding" && &d["spec"]["policyName"] == name)
            .collect();
        assert_eq!(bindings.len(), 1, "one binding for {name}");
        assert_eq!(bindings[0]["spec"]["validationActions"], json!(["Deny"]));
        assert_eq!(p["spec"]["failurePolicy"], "Fail");
    }
    // Every rule of the former single policy is kept: 4 for Nodes (a node name in the token,
    // own Node, labels, taints), 3 for Leases (a node name, the lock's Leases, the holder).
    assert_eq!(ps[0]["spec"]["validations"].as_array().unwrap().len(), 4);
    assert_eq!(ps[1]["spec"]["validations"].as_array().unwrap().len(), 3);
    let count = |kind: &str| docs.iter().filter(|d| d["kind"] == kind).count();
    assert_eq!(count("ValidatingAdmissionPolicy"), 2);
    assert_eq!(count("ValidatingAdmissionPolicyBinding"), 2);
}

#[test]
fn a_lease_token_without_a_node_name_is_refused() {
    let v = admit(
        &policies(),
        request(AGENT, None, "CREATE", "coordination.k8s.io", "leases"),
        lease("kreboot-lock", Some("n1")),
        Json::Null,
    );
    assert!(
        matches!(&v, Verdict::Denied(m) if m.contains("names no node")),
        "{v:?}"
    );
}
