//! RBAC rule evaluation over ClusterRole/Role objects, for checking that the shipped
//! permissions grant exactly the calls kreboot makes (see `tests/rbac.rs`).
//!
//! Only what kreboot's manifests use is modelled: rules with `apiGroups`, `resources` and
//! `verbs` (with `*` wildcards), ClusterRoles bound cluster-wide and Roles bound in their own
//! namespace. `resourceNames` and `nonResourceURLs` are rejected rather than misread.

use serde_json::Value;

use super::Access;

/// One rule of a Role or ClusterRole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// API groups (`""` core, `*` any).
    pub groups: Vec<String>,
    /// Resources, with subresources (`pods/eviction`).
    pub resources: Vec<String>,
    /// Verbs.
    pub verbs: Vec<String>,
    /// None: a ClusterRole's rule (any namespace, and cluster-scoped resources); Some: a
    /// Role's rule, valid in that namespace only.
    pub namespace: Option<String>,
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>, String> {
    match v.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or(format!("{key}: {i} is not a string"))
            })
            .collect(),
        Some(other) => Err(format!("{key}: {other} is not a list")),
    }
}

/// The rules of every ClusterRole and Role among `objects` (other kinds are ignored).
///
/// # Errors
/// A rule this evaluator does not model (resourceNames, nonResourceURLs) or a malformed one.
pub fn rules(objects: &[Value]) -> Result<Vec<Rule>, String> {
    let mut out = Vec::new();
    for o in objects {
        let namespace = match o.get("kind").and_then(Value::as_str) {
            Some("ClusterRole") => None,
            Some("Role") => Some(
                o.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .ok_or("a Role without a namespace")?
                    .to_owned(),
            ),
            _ => continue,
        };
        for r in o.get("rules").and_then(Value::as_array).into_iter().flatten() {
            if r.get("resourceNames").is_some() || r.get("nonResourceURLs").is_some() {
                return Err(format!("unsupported rule (resourceNames/nonResourceURLs): {r}"));
            }
            out.push(Rule {
                groups: strings(r, "apiGroups")?,
                resources: strings(r, "resources")?,
                verbs: strings(r, "verbs")?,
                namespace: namespace.clone(),
            });
        }
    }
    Ok(out)
}

fn matches(list: &[String], item: &str) -> bool {
    list.iter().any(|x| x == "*" || x == item)
}

impl Rule {
    /// Whether this rule grants `access`, with Roles' namespace read as `role_namespace`'s
    /// stand-in: a Role installed in namespace R grants calls in the agent's namespace
    /// `agent_namespace` (the tests may run agents in another namespace than the manifests').
    pub fn grants(&self, access: &Access, agent_namespace: &str) -> bool {
        let scope_ok = match (&self.namespace, &access.namespace) {
            (None, _) => true,
            (Some(_), Some(ns)) => ns == agent_namespace,
            (Some(_), None) => false,
        };
        scope_ok
            && matches(&self.groups, &access.group)
            && matches(&self.resources, &access.resource)
            && matches(&self.verbs, &access.verb)
    }
}

/// The accesses no rule grants.
pub fn denied<'a>(
    rules: &[Rule],
    accesses: impl IntoIterator<Item = &'a Access>,
    agent_namespace: &str,
) -> Vec<Access> {
    accesses
        .into_iter()
        .filter(|a| !rules.iter().any(|r| r.grants(a, agent_namespace)))
        .cloned()
        .collect()
}

/// The `(rule index, group, resource, verb)` grants that no access used.
pub fn unused<'a>(
    rules: &[Rule],
    accesses: impl IntoIterator<Item = &'a Access> + Clone,
    agent_namespace: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for r in rules {
        for g in &r.groups {
            for res in &r.resources {
                for v in &r.verbs {
                    let single = Rule {
                        groups: vec![g.clone()],
                        resources: vec![res.clone()],
                        verbs: vec![v.clone()],
                        namespace: r.namespace.clone(),
                    };
                    if !accesses
                        .clone()
                        .into_iter()
                        .any(|a| single.grants(a, agent_namespace))
                    {
                        out.push(format!("{v} {g}/{res}"));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn access(verb: &str, group: &str, resource: &str, ns: Option<&str>) -> Access {
        Access {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: ns.map(Into::into),
        }
    }

    #[test]
    fn roles_are_namespaced_and_cluster_roles_are_not() {
        let objs = vec![
            json!({"kind": "ClusterRole", "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]}),
            json!({"kind": "Role", "metadata": {"namespace": "kreboot"},
                   "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["update"]}]}),
        ];
        let rules = rules(&objs).unwrap();
        let ok = [
            access("patch", "", "nodes", None),
            access("update", "coordination.k8s.io", "leases", Some("ns1")),
        ];
        assert!(denied(&rules, &ok, "ns1").is_empty());
        let bad = [
            access("delete", "", "nodes", None),
            access("patch", "", "nodes/status", None),
            access("update", "coordination.k8s.io", "leases", Some("other")),
            access("update", "", "leases", Some("ns1")),
        ];
        assert_eq!(denied(&rules, &bad, "ns1").len(), 4);
        assert_eq!(
            unused(&rules, &ok[..1], "ns1"),
            vec!["get /nodes", "update coordination.k8s.io/leases"]
        );
    }

    #[test]
    fn resource_names_are_not_silently_ignored() {
        let objs = vec![
            json!({"kind": "ClusterRole", "rules": [{"apiGroups": [""], "resources": ["nodes"], "resourceNames": ["a"], "verbs": ["get"]}]}),
        ];
        assert!(rules(&objs).is_err());
    }
}
