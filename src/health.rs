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

use k8s_openapi::api::core::v1::Pod;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
