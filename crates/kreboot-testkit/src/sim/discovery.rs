//! API discovery documents, enough for kubectl to find the resources the simulator serves.

use serde_json::{Value, json};

use super::store::Kind;

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// `/apis`: the API groups.
pub fn groups() -> Value {
    let mut names: Vec<(&str, &str)> = Kind::ALL
        .iter()
        .map(|k| (k.info().0, k.info().1))
        .filter(|(g, _)| !g.is_empty())
        .collect();
    names.sort_unstable();
    names.dedup();
    let groups: Vec<Value> = names
        .iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/api/v1` or `/apis/{group}/{version}`: the resources of a group version.
pub fn resources(group: &str, version: &str) -> Value {
    let mut list = Vec::new();
    for k in Kind::ALL {
        let (g, v, plural, kind, namespaced) = k.info();
        if g != group || v != version {
            continue;
        }
        list.push(json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced, "kind": kind, "verbs": VERBS}));
        if k.has_status() {
            list.push(json!({"name": format!("{plural}/status"), "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": ["get", "patch", "update"]}));
        }
        if k == Kind::Pod {
            list.push(json!({"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}));
        }
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": list})
}
