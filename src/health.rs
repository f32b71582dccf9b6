//! The health gate of a rebooted node: what still keeps it from handing its lock slot on. A
//! plain function of the Node's Ready condition and the pods bound to it, so the rule is
//! tested without a cluster; the agent watches the pods (only while the gate holds) and
//! decides with [`crate::node::decide`].
//!
//! Healthy means: the Node is Ready, and every pod of a DaemonSet bound to it that is meant to
//! run (not finished, not being deleted) is Ready. DaemonSet pods are the node's own services
//! (CNI, storage and log agents): a node whose network plugin does not come back is not fit to
//! take workloads, and rebooting the next node would make things worse. Other pods are not
//! waited for: after the drain they are scheduled elsewhere, or come back at the scheduler's
//! pace.
//!
//! With the rule's `healthGate.disruptionBudgets` (on by default with a gate) the pods the drain
//! evicted count too, through their PodDisruptionBudgets: the drain records on the Node which
//! budgets selected a pod it evicted ([`touched_budgets`], [`encode_budgets`]; the agent that
//! runs the gate after the reboot is a new process), and the gate holds until each of them is
//! as healthy as before the drain, and at least at its desired health ([`budgets_unhealthy`]).
//! A budget is what the application's owner declared as "enough of us": rebooting the next
//! node while the pods the drain took are not back spends the margin the budget was written to
//! keep.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{core::v1::Pod, policy::v1::PodDisruptionBudget},
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};

/// Whether `pod` is owned by a DaemonSet (its controller).
fn daemonset_pod(pod: &Pod) -> bool {
    pod.metadata.owner_references.as_ref().is_some_and(|o| {
        o.iter()
            .any(|r| r.kind == "DaemonSet" && r.controller.unwrap_or(true))
    })
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// What is not healthy yet, one entry each (`node not Ready`, `pod kube-system/cni-x not
/// Ready`); empty: healthy. `pods` None: the pods bound to the node are not known yet (their
/// watch has not finished its first list), which is not healthy either.
pub fn unhealthy(node_ready: bool, pods: Option<&[Pod]>) -> Vec<String> {
    let mut out = Vec::new();
    if !node_ready {
        out.push("node not Ready".to_owned());
    }
    let Some(pods) = pods else {
        out.push("pods not listed yet".to_owned());
        return out;
    };
    let mut waiting: Vec<String> = pods
        .iter()
        .filter(|p| daemonset_pod(p) && p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .filter(|p| !ready(p))
        .map(|p| {
            format!(
                "pod {}/{} not Ready",
                p.metadata.namespace.as_deref().unwrap_or(""),
                p.metadata.name.as_deref().unwrap_or("")
            )
        })
        .collect();
    waiting.sort();
    out.extend(waiting);
    out
}

/// What a rule's `healthGate.query` says: None when it returned no series (the gate may open),
/// else why the gate stays closed: the series it returned (the first few, by their labels), or
/// why it could not be evaluated (an unreachable Prometheus or a query error keeps the gate
/// closed: a check that did not happen is not a pass).
pub fn query_verdict(
    result: &Result<Vec<std::collections::BTreeMap<String, String>>, String>,
) -> Option<String> {
    match result {
        Ok(series) if series.is_empty() => None,
        Ok(series) => {
            let shown: Vec<String> = series
                .iter()
                .take(3)
                .map(|labels| {
                    let name = labels.get("__name__").map_or("", String::as_str);
                    let rest: Vec<String> = labels
                        .iter()
                        .filter(|(k, _)| *k != "__name__")
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect();
                    format!("{name}{{{}}}", rest.join(","))
                })
                .collect();
            let more = series.len().saturating_sub(shown.len());
            let mut out = format!("query returned {} series: {}", series.len(), shown.join(", "));
            if more > 0 {
                out.push_str(&format!(" and {more} more"));
            }
            Some(out)
        }
        Err(e) => Some(format!("cannot evaluate healthGate.query: {e}")),
    }
}

/// A PodDisruptionBudget the drain touched, as recorded on the Node: one budget, every budget
/// of a namespace, or every budget (the record outgrew its bound, or the budgets could not be
/// listed at drain time: then the namespaces of the evicted pods are recorded).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BudgetRef {
    /// `namespace/name`.
    One(String, String),
    /// `namespace/*`.
    Namespace(String),
    /// `*`.
    All,
}

impl std::fmt::Display for BudgetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BudgetRef::One(ns, name) => write!(f, "{ns}/{name}"),
            BudgetRef::Namespace(ns) => write!(f, "{ns}/*"),
            BudgetRef::All => f.write_str("*"),
        }
    }
}

impl BudgetRef {
    fn covers(&self, ns: &str, name: &str) -> bool {
        match self {
            BudgetRef::One(n, m) => n == ns && m == name,
            BudgetRef::Namespace(n) => n == ns,
            BudgetRef::All => true,
        }
    }
}

/// The budgets a drain touched, each with its `status.currentHealthy` just before the drain
/// (None when unknown: the budget had no status yet, or the entry is a wildcard).
pub type Touched = BTreeMap<BudgetRef, Option<i32>>;

/// The longest record of touched budgets (`kreboot.io/drained-budgets`). A node runs at most a
/// few hundred pods; past this the record falls back to namespaces, then to `*`, so it stays
/// small on the Node and still covers every budget touched.
pub const MAX_BUDGETS_RECORD: usize = 2048;

/// Whether `s` can be a namespace or object name (DNS subdomain characters).
fn name_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

fn join(budgets: &Touched) -> String {
    budgets
        .iter()
        .map(|(r, before)| match before {
            Some(n) => format!("{r}={n}"),
            None => r.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The record of `budgets` for the Node annotation: `ns/name=healthy-before,…`, sorted; past
/// [`MAX_BUDGETS_RECORD`] the namespaces (`ns/*`, the counts dropped), and past that `*`.
pub fn encode_budgets(budgets: &Touched) -> String {
    let exact = join(budgets);
    if exact.len() <= MAX_BUDGETS_RECORD {
        return exact;
    }
    let namespaces: Touched = budgets
        .keys()
        .map(|b| match b {
            BudgetRef::One(ns, _) | BudgetRef::Namespace(ns) => (BudgetRef::Namespace(ns.clone()), None),
            BudgetRef::All => (BudgetRef::All, None),
        })
        .collect();
    let wide = join(&namespaces);
    if wide.len() <= MAX_BUDGETS_RECORD && !namespaces.contains_key(&BudgetRef::All) {
        wide
    } else {
        "*".to_owned()
    }
}

/// The record read back: the budgets, and the entries that are not a budget reference (for
/// the operator; they are ignored).
pub fn parse_budgets(record: &str) -> (Touched, Vec<String>) {
    let mut refs = Touched::new();
    let mut bad = Vec::new();
    for entry in record.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (reference, before) = match entry.split_once('=') {
            None => (entry, Some(None)),
            Some((r, n)) => (r, n.parse::<i32>().ok().filter(|n| *n >= 0).map(Some)),
        };
        let parsed = match reference.split_once('/') {
            None if reference == "*" => Some(BudgetRef::All),
            Some((ns, "*")) if name_like(ns) => Some(BudgetRef::Namespace(ns.to_owned())),
            Some((ns, name)) if name_like(ns) && name_like(name) => {
                Some(BudgetRef::One(ns.to_owned(), name.to_owned()))
            }
            _ => None,
        };
        match (parsed, before) {
            (Some(r), Some(before)) => {
                refs.insert(r, before);
            }
            _ => bad.push(entry.to_owned()),
        }
    }
    (refs, bad)
}

/// Whether a PodDisruptionBudget's `spec.selector` selects a pod with `labels`. In policy/v1 a
/// missing selector selects nothing and an empty one selects every pod of the namespace.
pub fn selector_matches(selector: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = selector else {
        return false;
    };
    let labels_ok = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let exprs_ok = sel
        .match_expressions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                // The API server admits no other operator; should one appear, count the budget as
                // touched: waiting for a budget too many is safe, missing one is not.
                _ => true,
            }
        });
    labels_ok && exprs_ok
}

/// The budgets that select any of `evicted` (pods the drain evicts), with their
/// `currentHealthy` as listed before the drain.
pub fn touched_budgets(evicted: &[&Pod], budgets: &[PodDisruptionBudget]) -> Touched {
    let empty = BTreeMap::new();
    budgets
        .iter()
        .filter(|b| {
            let ns = b.metadata.namespace.as_deref().unwrap_or_default();
            let selector = b.spec.as_ref().and_then(|s| s.selector.as_ref());
            evicted.iter().any(|p| {
                p.metadata.namespace.as_deref().unwrap_or_default() == ns
                    && selector_matches(selector, p.metadata.labels.as_ref().unwrap_or(&empty))
            })
        })
        .map(|b| {
            (
                BudgetRef::One(
                    b.metadata.namespace.clone().unwrap_or_default(),
                    b.metadata.name.clone().unwrap_or_default(),
                ),
                b.status.as_ref().map(|s| s.current_healthy),
            )
        })
        .collect()
}

/// What keeps the recorded budgets from being healthy, one entry per budget (`pdb apps/web 1/2
/// healthy`); empty: every one is back. A budget is back when the disruption controller has
/// seen its current spec (`status.observedGeneration >= metadata.generation`) and counts
/// `currentHealthy >= desiredHealthy` and, when its health before the drain was recorded, at
/// least as many healthy pods as then (no more than it now expects, `expectedPods`): an
/// eviction the budget allowed leaves it at `desiredHealthy` or above by construction, so only
/// the count from before tells that the evicted pods are back. A recorded budget that no longer
/// exists protects nothing and is not waited for. `budgets` None: not listed yet, which is not
/// healthy.
pub fn budgets_unhealthy(recorded: &Touched, budgets: Option<&[PodDisruptionBudget]>) -> Vec<String> {
    if recorded.is_empty() {
        return Vec::new();
    }
    let Some(budgets) = budgets else {
        return vec!["disruption budgets not listed yet".to_owned()];
    };
    let mut out: Vec<String> = budgets
        .iter()
        .filter_map(|b| {
            let ns = b.metadata.namespace.as_deref().unwrap_or_default();
            let name = b.metadata.name.as_deref().unwrap_or_default();
            if !recorded.keys().any(|r| r.covers(ns, name)) {
                return None;
            }
            let Some(status) = b.status.as_ref() else {
                return Some(format!("pdb {ns}/{name} has no status yet"));
            };
            let generation = b.metadata.generation.unwrap_or(0);
            let observed = status.observed_generation.unwrap_or(0);
            if observed < generation {
                return Some(format!(
                    "pdb {ns}/{name} status not current (generation {generation}, observed {observed})"
                ));
            }
            let before = recorded
                .get(&BudgetRef::One(ns.to_owned(), name.to_owned()))
                .copied()
                .flatten()
                .map_or(0, |n| n.min(status.expected_pods));
            let wanted = status.desired_healthy.max(before);
            (status.current_healthy < wanted)
                .then(|| format!("pdb {ns}/{name} {}/{wanted} healthy", status.current_healthy))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pdb(
        ns: &str,
        name: &str,
        selector: serde_json::Value,
        health: Option<(i32, i32, i64, i64)>,
    ) -> PodDisruptionBudget {
        let mut b = json!({
            "metadata": { "name": name, "namespace": ns, "generation": 1 },
            "spec": { "minAvailable": 1 },
        });
        if !selector.is_null() {
            b["spec"]["selector"] = selector;
        }
        if let Some((current, desired, generation, observed)) = health {
            b["metadata"]["generation"] = json!(generation);
            b["status"] = json!({
                "currentHealthy": current, "desiredHealthy": desired, "disruptionsAllowed": 0,
                "expectedPods": 3, "observedGeneration": observed,
            });
        }
        serde_json::from_value(b).unwrap()
    }

    fn app_pod(ns: &str, name: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns, "labels": labels}}))
            .unwrap()
    }

    fn one(ns: &str, name: &str) -> BudgetRef {
        BudgetRef::One(ns.into(), name.into())
    }

    #[test]
    fn the_budgets_selecting_an_evicted_pod_are_the_touched_ones() {
        let budgets = [
            pdb(
                "apps",
                "web",
                json!({"matchLabels": {"app": "web"}}),
                Some((3, 2, 1, 1)),
            ),
            pdb("apps", "db", json!({"matchLabels": {"app": "db"}}), None),
            pdb("other", "web", json!({"matchLabels": {"app": "web"}}), None),
            pdb("apps", "all", json!({}), None),
            pdb("apps", "none", serde_json::Value::Null, None),
            pdb(
                "apps",
                "tier",
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["front"]}]}),
                None,
            ),
            pdb(
                "apps",
                "not-batch",
                json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["batch"]}, {"key": "gone", "operator": "DoesNotExist"}]}),
                None,
            ),
        ];
        let web = app_pod("apps", "web-1", json!({"app": "web", "tier": "front"}));
        let batch = app_pod("apps", "batch-1", json!({"app": "batch"}));
        assert_eq!(
            touched_budgets(&[&web], &budgets),
            [
                (one("apps", "all"), None),
                (one("apps", "not-batch"), None),
                (one("apps", "tier"), None),
                (one("apps", "web"), Some(3)),
            ]
            .into(),
            "same namespace only; an empty selector selects all, a missing one none; the health before"
        );
        assert_eq!(
            touched_budgets(&[&batch], &budgets),
            [(one("apps", "all"), None)].into()
        );
        assert!(touched_budgets(&[], &budgets).is_empty());
    }

    #[test]
    fn the_record_is_bounded_and_still_covers_every_budget() {
        let few: Touched = [(one("apps", "web"), Some(2)), (one("db", "pg"), None)].into();
        assert_eq!(encode_budgets(&few), "apps/web=2,db/pg");
        assert_eq!(parse_budgets("apps/web=2,db/pg"), (few, vec![]));
        // Many budgets: the namespaces.
        let many: Touched = (0..200)
            .map(|i| {
                (
                    one(
                        if i % 2 == 0 { "apps" } else { "db" },
                        &format!("budget-number-{i}"),
                    ),
                    Some(5),
                )
            })
            .collect();
        let record = encode_budgets(&many);
        assert_eq!(record, "apps/*,db/*");
        let (back, bad) = parse_budgets(&record);
        assert!(bad.is_empty());
        for b in many.keys() {
            let BudgetRef::One(ns, name) = b else {
                unreachable!()
            };
            assert!(back.keys().any(|r| r.covers(ns, name)), "{b} covered");
        }
        // Many namespaces too: everything.
        let wide: Touched = (0..300)
            .map(|i| (one(&format!("namespace-{i}"), "b"), None))
            .collect();
        assert_eq!(encode_budgets(&wide), "*");
        assert_eq!(parse_budgets("*").0, [(BudgetRef::All, None)].into());
        assert!(encode_budgets(&Touched::new()).is_empty());
        // Hand-edited garbage is reported, the rest kept.
        let (refs, bad) = parse_budgets("apps/web=1, Not A Name ,x/,/y,apps/*,db/pg=-1,db/x=two");
        assert_eq!(
            refs,
            [
                (one("apps", "web"), Some(1)),
                (BudgetRef::Namespace("apps".into()), None)
            ]
            .into()
        );
        assert_eq!(bad, ["Not A Name", "x/", "/y", "db/pg=-1", "db/x=two"]);
    }

    #[test]
    fn the_gate_waits_for_each_touched_budget_to_be_healthy_and_current() {
        let sel = json!({});
        let budgets = [
            pdb("apps", "web", sel.clone(), Some((1, 2, 1, 1))),
            pdb("apps", "db", sel.clone(), Some((2, 2, 1, 1))),
            pdb("apps", "new", sel.clone(), None),
            pdb("apps", "edited", sel.clone(), Some((3, 2, 2, 1))),
            pdb("other", "x", sel.clone(), Some((0, 1, 1, 1))),
        ];
        let recorded: Touched = [
            (one("apps", "web"), None),
            (one("apps", "db"), None),
            (one("apps", "gone"), None),
        ]
        .into();
        assert_eq!(
            budgets_unhealthy(&recorded, Some(&budgets)),
            ["pdb apps/web 1/2 healthy"]
        );
        assert_eq!(
            budgets_unhealthy(
                &[(BudgetRef::Namespace("apps".into()), None)].into(),
                Some(&budgets)
            ),
            [
                "pdb apps/edited status not current (generation 2, observed 1)",
                "pdb apps/new has no status yet",
                "pdb apps/web 1/2 healthy",
            ]
        );
        assert_eq!(
            budgets_unhealthy(&[(BudgetRef::All, None)].into(), Some(&budgets)).len(),
            4
        );
        assert_eq!(
            budgets_unhealthy(&recorded, None),
            ["disruption budgets not listed yet"],
            "unknown is not healthy"
        );
        assert!(
            budgets_unhealthy(&Touched::new(), None).is_empty(),
            "nothing recorded, nothing to wait for"
        );
        let healed = [pdb("apps", "web", sel, Some((2, 2, 1, 1)))];
        assert!(budgets_unhealthy(&recorded, Some(&healed)).is_empty());
    }

    /// A budget that allowed the eviction is at `desiredHealthy` or above right after it: what
    /// says the evicted pods are back is the health it had before the drain (capped at what it
    /// expects now: a pod nobody replaces is not waited for).
    #[test]
    fn the_gate_waits_for_the_health_the_budget_had_before_the_drain() {
        let sel = json!({});
        // minAvailable 1 of 3: evicting one leaves 2 >= 1; the replacement is not Ready yet.
        let after = [pdb("apps", "web", sel.clone(), Some((2, 1, 1, 1)))];
        let before3: Touched = [(one("apps", "web"), Some(3))].into();
        assert_eq!(
            budgets_unhealthy(&before3, Some(&after)),
            ["pdb apps/web 2/3 healthy"]
        );
        let back = [pdb("apps", "web", sel.clone(), Some((3, 1, 1, 1)))];
        assert!(budgets_unhealthy(&before3, Some(&back)).is_empty());
        // Unhealthy already before the drain: back to that, not more.
        let before2: Touched = [(one("apps", "web"), Some(2))].into();
        assert!(budgets_unhealthy(&before2, Some(&after)).is_empty());
        // More healthy before than it now expects (scaled down, or bare pods not replaced).
        let before9: Touched = [(one("apps", "web"), Some(9))].into();
        assert_eq!(
            budgets_unhealthy(&before9, Some(&after)),
            ["pdb apps/web 2/3 healthy"]
        );
        assert!(budgets_unhealthy(&before9, Some(&back)).is_empty());
    }

    fn pod(name: &str, owner: Option<&str>, ready: Option<bool>, phase: &str) -> Pod {
        let mut p = json!({
            "metadata": { "name": name, "namespace": "kube-system" },
            "status": { "phase": phase },
        });
        if let Some(kind) = owner {
            p["metadata"]["ownerReferences"] = json!([{ "apiVersion": "apps/v1", "kind": kind, "name": "x", "uid": "u", "controller": true }]);
        }
        if let Some(r) = ready {
            p["status"]["conditions"] =
                json!([{ "type": "Ready", "status": if r { "True" } else { "False" } }]);
        }
        serde_json::from_value(p).unwrap()
    }

    #[test]
    fn the_gate_query_passes_only_on_no_series() {
        let series = |n: usize| -> Vec<std::collections::BTreeMap<String, String>> {
            (0..n)
                .map(|i| {
                    [
                        ("__name__".to_string(), "up".to_string()),
                        ("instance".to_string(), format!("n{i}")),
                    ]
                    .into()
                })
                .collect()
        };
        assert_eq!(query_verdict(&Ok(vec![])), None);
        assert_eq!(
            query_verdict(&Ok(series(1))).as_deref(),
            Some("query returned 1 series: up{instance=\"n0\"}")
        );
        assert_eq!(
            query_verdict(&Ok(series(5))).as_deref(),
            Some(
                "query returned 5 series: up{instance=\"n0\"}, up{instance=\"n1\"}, up{instance=\"n2\"} and 2 more"
            )
        );
        assert_eq!(
            query_verdict(&Err("connection refused".into())).as_deref(),
            Some("cannot evaluate healthGate.query: connection refused"),
            "an unanswered query keeps the gate closed"
        );
    }

    #[test]
    fn only_the_node_and_its_daemonset_pods_count() {
        let pods = vec![
            pod("cni", Some("DaemonSet"), Some(true), "Running"),
            pod("logs", Some("DaemonSet"), Some(false), "Running"),
            pod("csi", Some("DaemonSet"), None, "Pending"),
            pod("job", Some("DaemonSet"), Some(false), "Succeeded"),
            pod("web", Some("ReplicaSet"), Some(false), "Running"),
            pod("bare", None, Some(false), "Running"),
        ];
        assert_eq!(
            unhealthy(true, Some(&pods)),
            ["pod kube-system/csi not Ready", "pod kube-system/logs not Ready"]
        );
        assert_eq!(unhealthy(true, Some(&pods[..1])), Vec::<String>::new());
        assert_eq!(unhealthy(false, Some(&[])), ["node not Ready"]);
        assert_eq!(
            unhealthy(true, None),
            ["pods not listed yet"],
            "unknown is not healthy"
        );
        let mut gone = pod("old", Some("DaemonSet"), Some(false), "Running");
        gone.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
        ));
        assert!(
            unhealthy(true, Some(&[gone])).is_empty(),
            "a pod being deleted is not waited for"
        );
    }
}
