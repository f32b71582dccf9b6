//! The HTTP face of the simulated cluster: Kubernetes REST paths, verbs, list/watch, patches,
//! subresources, discovery, fault injection and request counting.

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use futures::channel::mpsc;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{
    Shared,
    select::{FieldSelector, LabelSelector},
    store::{Change, Kind, Scope, StoreError, event_line, merge_patch, status_body},
};

/// Where a request goes.
#[derive(Debug)]
enum Route {
    Version,
    CoreVersions,
    Groups,
    Resources(String, String),
    Object {
        kind: Kind,
        ns: Option<String>,
        name: Option<String>,
        sub: Option<String>,
    },
    SimReboot(String),
}

fn route(path: &str) -> Option<Route> {
    let seg: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, version, rest) = match seg.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::CoreVersions),
        ["apis"] => return Some(Route::Groups),
        ["api", "v1"] => return Some(Route::Resources(String::new(), "v1".into())),
        ["apis", g, v] => return Some(Route::Resources((*g).into(), (*v).into())),
        ["sim", "v1", "nodes", name, "reboot"] => return Some(Route::SimReboot((*name).into())),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let owned = |s: &&str| Some((*s).to_owned());
    let (plural, ns, name, sub) = match rest {
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 2 => (
            *plural,
            owned(ns),
            tail.first().and_then(owned),
            tail.get(1).and_then(owned),
        ),
        [plural, tail @ ..] if tail.len() <= 2 => (
            *plural,
            None,
            tail.first().and_then(owned),
            tail.get(1).and_then(owned),
        ),
        _ => return None,
    };
    let kind = Kind::from_path(group, plural)?;
    if kind.info().1 != version {
        return None;
    }
    Some(Route::Object { kind, ns, name, sub })
}

fn respond(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [("content-type", "application/json")], body.to_string()).into_response()
}

fn err(e: &StoreError) -> Response {
    respond(e.code, &e.status())
}

fn bad(message: impl Into<String>) -> Response {
    err(&StoreError::new(400, "BadRequest", message))
}

fn verb_of(
    method: &Method,
    name: &Option<String>,
    sub: &Option<String>,
    q: &HashMap<String, String>,
) -> &'static str {
    let watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    match *method {
        Method::GET if watch => "watch",
        Method::GET if name.is_none() => "list",
        Method::GET => "get",
        Method::POST if sub.as_deref() == Some("eviction") => "evict",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

/// The single handler behind every path.
pub async fn handle(
    State(sim): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(r) = route(uri.path()) else {
        return err(&StoreError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({})",
                uri.path()
            ),
        ));
    };
    let (kind, ns, name, sub) = match r {
        Route::Version => {
            return respond(
                200,
                &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kreboot-sim", "platform": "linux/amd64"}),
            );
        }
        Route::CoreVersions => {
            return respond(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            );
        }
        Route::Groups => return respond(200, &super::discovery::groups()),
        Route::Resources(g, v) => return respond(200, &super::discovery::resources(&g, &v)),
        Route::SimReboot(node) => {
            return if method == Method::POST {
                if sim.reboot_node(&node) {
                    respond(
                        202,
                        &status_body(202, "Accepted", &format!("node {node} is rebooting")),
                    )
                } else {
                    err(&StoreError::new(
                        404,
                        "NotFound",
                        format!("node {node} not found or already rebooting"),
                    ))
                }
            } else {
                err(&StoreError::new(405, "MethodNotAllowed", "POST only"))
            };
        }
        Route::Object { kind, ns, name, sub } => (kind, ns, name, sub),
    };
    let verb = verb_of(&method, &name, &sub, &q);
    sim.count(verb, kind.info().2);
    let (group, _, plural, _, _) = kind.info();
    sim.record_access(super::Access {
        // An eviction is a `create` of the pods/eviction subresource.
        verb: if verb == "evict" { "create" } else { verb }.to_owned(),
        group: group.to_owned(),
        resource: match &sub {
            Some(sub) => format!("{plural}/{sub}"),
            None => plural.to_owned(),
        },
        namespace: ns.clone(),
    });

    let resp = serve(
        &sim, verb, kind, ns, name, sub, &method, &uri, &headers, &q, &body,
    )
    .await;
    let code = resp.status().as_u16();
    if code >= 400 {
        sim.count_refusal(verb, plural, code);
    }
    resp
}

/// Answers one request to an object path (after routing and counting).
#[allow(clippy::too_many_arguments)]
async fn serve(
    sim: &Arc<Shared>,
    verb: &'static str,
    kind: Kind,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
    body: &Bytes,
) -> Response {
    // Fault injection (never on the Rust control API, which does not pass through here).
    if let Some(resp) = sim.inject_fault(verb, kind.info().2).await {
        return resp;
    }

    let ns_str = ns.clone().unwrap_or_default();
    match (method.clone(), name, sub.as_deref()) {
        (Method::GET, None, None) => {
            if verb == "watch" {
                watch(sim.clone(), kind, ns, q)
            } else {
                list(sim, kind, ns.as_deref(), q)
            }
        }
        (Method::GET, Some(name), None | Some("status")) => match sim.store.get(kind, &ns_str, &name) {
            Some(o) => respond(200, &o),
            None => err(&StoreError::new(
                404,
                "NotFound",
                format!("{} \"{name}\" not found", kind.info().2),
            )),
        },
        (Method::POST, None, None) => {
            let Ok(obj) = serde_json::from_slice::<Value>(body) else {
                return bad("the request body is not JSON");
            };
            // The NamespaceLifecycle admission plugin (which runs before validation): no
            // object is created in a namespace that does not exist.
            if kind.info().4 && sim.store.get(Kind::Namespace, "", &ns_str).is_none() {
                return err(&StoreError::new(
                    404,
                    "NotFound",
                    format!("namespaces \"{ns_str}\" not found"),
                ));
            }
            if let Err(e) = validate(kind, &ns_str, &obj) {
                return err(&e);
            }
            match sim.store.create(kind, &ns_str, obj) {
                Ok(o) => respond(201, &o),
                Err(e) => err(&e),
            }
        }
        (Method::POST, Some(name), Some("eviction")) if kind == Kind::Pod => {
            let grace = serde_json::from_slice::<Value>(body).ok().and_then(|b| {
                b.pointer("/deleteOptions/gracePeriodSeconds")
                    .and_then(Value::as_i64)
            });
            match sim.evict(&ns_str, &name, grace) {
                Ok(()) => respond(201, &status_body(201, "", "")),
                Err(e) => err(&e),
            }
        }
        (Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let Ok(obj) = serde_json::from_slice::<Value>(body) else {
                return bad("the request body is not JSON");
            };
            let status_only = sub.is_some();
            // As the API server: 404 for a missing object first, then the resourceVersion
            // requirement, then the object's validation.
            match sim.store.update(kind, &ns_str, &name, |old| {
                require_version(kind, &name, &obj)?;
                validate(kind, &ns_str, &obj)?;
                Ok(split_status(kind, old, obj, status_only))
            }) {
                Ok(o) => respond(200, &o),
                Err(e) => err(&e),
            }
        }
        (Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let ctype = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let status_only = sub.is_some();
            let result = sim.store.update(kind, &ns_str, &name, |old| {
                let mut new = (*old).clone();
                // The resourceVersion of a patch is only a precondition when the patch sets it.
                if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
                    m.remove("resourceVersion");
                }
                apply_patch(&mut new, &ctype, body)?;
                validate(kind, &ns_str, &new)?;
                Ok(split_status(kind, old, new, status_only))
            });
            match result {
                Ok(o) => respond(200, &o),
                Err(e) => err(&e),
            }
        }
        (Method::DELETE, Some(name), None) => {
            let grace = serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|b| b.get("gracePeriodSeconds").and_then(Value::as_i64))
                .or_else(|| q.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            let result = if kind == Kind::Pod {
                sim.delete_pod(&ns_str, &name, grace)
            } else {
                sim.store.delete(kind, &ns_str, &name)
            };
            match result {
                Ok(o) => respond(200, &o),
                Err(e) => err(&e),
            }
        }
        _ => err(&StoreError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", uri.path()),
        )),
    }
}

/// Keeps the stored `status` on writes to the main resource, and only the `status` on writes to
/// `/status`, as the API server does for kinds with a status subresource.
fn split_status(kind: Kind, old: &Value, mut new: Value, status_only: bool) -> Value {
    if !kind.has_status() {
        return new;
    }
    if status_only {
        let mut kept = old.clone();
        kept["status"] = new.get("status").cloned().unwrap_or(Value::Null);
        if let Some(rv) = new.pointer("/metadata/resourceVersion").cloned() {
            kept["metadata"]["resourceVersion"] = rv;
        } else if let Some(m) = kept.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        kept
    } else {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        new
    }
}

fn apply_patch(doc: &mut Value, ctype: &str, body: &[u8]) -> Result<(), StoreError> {
    let invalid = |m: String| StoreError::new(400, "BadRequest", m);
    if ctype.starts_with("application/json-patch+json") {
        let p: json_patch::Patch =
            serde_json::from_slice(body).map_err(|e| invalid(format!("invalid JSON patch: {e}")))?;
        json_patch::patch(doc, &p).map_err(|e| {
            StoreError::new(
                422,
                "Invalid",
                format!("the JSON patch could not be applied: {e}"),
            )
        })
    } else if ctype.starts_with("application/merge-patch+json")
        // Strategic merge is treated as a JSON merge patch: lists are replaced, not merged by key.
        || ctype.starts_with("application/strategic-merge-patch+json")
    {
        let p: Value =
            serde_json::from_slice(body).map_err(|e| invalid(format!("invalid merge patch: {e}")))?;
        merge_patch(doc, &p);
        Ok(())
    } else if ctype.starts_with("application/apply-patch+yaml") {
        // Server-side apply simplified to a merge of the applied configuration (no field
        // ownership, no conflicts between managers).
        let text = std::str::from_utf8(body).map_err(|e| invalid(format!("apply body is not UTF-8: {e}")))?;
        let p: Value =
            serde_saphyr::from_str(text).map_err(|e| invalid(format!("invalid apply body: {e}")))?;
        merge_patch(doc, &p);
        Ok(())
    } else {
        Err(StoreError::new(
            415,
            "UnsupportedMediaType",
            format!("the patch content type {ctype:?} is not supported"),
        ))
    }
}

fn micro_time_ok(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return v.is_null() };
    let Some((_, frac)) = s.split_once('.') else {
        return false;
    };
    let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
    digits.len() == 6 && chrono::DateTime::parse_from_rfc3339(s).is_ok()
}

/// An update (PUT) of a kind whose strategy refuses unconditional updates must carry
/// `metadata.resourceVersion`: the API server answers 422 otherwise (Leases:
/// `AllowUnconditionalUpdate` is false in `pkg/registry/coordination/lease/strategy.go`).
fn require_version(kind: Kind, name: &str, obj: &Value) -> Result<(), StoreError> {
    let given = obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .is_some_and(|v| !v.is_empty() && v != "0");
    if kind == Kind::Lease && !given {
        return Err(StoreError::new(
            422,
            "Invalid",
            format!(
                "Lease.coordination.k8s.io \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0: must be specified for an update"
            ),
        ));
    }
    Ok(())
}

/// Validation the real API server performs and kreboot could get wrong.
fn validate(kind: Kind, ns: &str, obj: &Value) -> Result<(), StoreError> {
    match kind {
        Kind::Lease => {
            if let Some(d) = obj.pointer("/spec/leaseDurationSeconds")
                && d.as_i64().is_none_or(|d| d <= 0)
                && !d.is_null()
            {
                let name = obj
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                return Err(StoreError::new(
                    422,
                    "Invalid",
                    format!(
                        "Lease.coordination.k8s.io \"{name}\" is invalid: spec.leaseDurationSeconds: Invalid value: {d}: must be greater than 0"
                    ),
                ));
            }
            for f in ["acquireTime", "renewTime"] {
                if let Some(v) = obj.pointer(&format!("/spec/{f}"))
                    && !micro_time_ok(v)
                {
                    return Err(StoreError::new(
                        422,
                        "Invalid",
                        format!(
                            "Lease.coordination.k8s.io is invalid: spec.{f}: Invalid value: {v}: must be a MicroTime (RFC 3339 with 6 fractional digits)"
                        ),
                    ));
                }
            }
            Ok(())
        }
        Kind::Event | Kind::CoreEvent => {
            let about = obj.get("regarding").or_else(|| obj.get("involvedObject"));
            let about_node = about.and_then(|r| r.get("kind")).and_then(Value::as_str) == Some("Node");
            if about_node && ns != "default" && ns != "kube-system" {
                return Err(StoreError::new(
                    422,
                    "Invalid",
                    format!(
                        "Event is invalid: involvedObject.namespace: Invalid value: \"{ns}\": does not match event.namespace (events about Nodes belong in default or kube-system)"
                    ),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The label and field selectors of a list or watch (400 when malformed).
fn selectors(q: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), String> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map_or("", String::as_str))?;
    Ok((labels, fields))
}

/// The objects a list or watch of `kind` (in `ns`) with `fields` may match, with the store's
/// resourceVersion: the one named object when the field selector names it and its namespace is
/// known (no scan of the kind), else every object of the kind (in `ns`).
fn candidates(sim: &Shared, kind: Kind, ns: Option<&str>, fields: &FieldSelector) -> (Vec<Arc<Value>>, u64) {
    let named = fields
        .equalities()
        .find(|(f, _)| *f == "metadata.name")
        .map(|(_, n)| n);
    let namespaced = kind.info().4;
    match (named, ns) {
        (Some(name), Some(ns)) if namespaced => sim.store.list_named(kind, ns, name),
        (Some(name), _) if !namespaced => sim.store.list_named(kind, "", name),
        _ => sim.store.list(kind, ns),
    }
}

fn list(sim: &Shared, kind: Kind, ns: Option<&str>, q: &HashMap<String, String>) -> Response {
    let (labels, fields) = match selectors(q) {
        Ok(x) => x,
        Err(e) => return bad(e),
    };
    let (items, rv) = candidates(sim, kind, ns, &fields);
    let matching: Vec<&Arc<Value>> = items
        .iter()
        .filter(|o| labels.matches_object(o) && fields.matches(o))
        .collect();
    let offset: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let page: Vec<&Value> = matching
        .iter()
        .skip(offset)
        .take(limit)
        .map(|v| v.as_ref())
        .collect();
    let next = offset.saturating_add(page.len());
    let mut meta = json!({ "resourceVersion": rv.to_string() });
    if next < matching.len() {
        meta["continue"] = json!(next.to_string());
    }
    // Serialized from the stored objects as they are (a `json!` body would copy every item).
    #[derive(serde::Serialize)]
    struct ListBody<'a> {
        kind: String,
        #[serde(rename = "apiVersion")]
        api_version: String,
        metadata: Value,
        items: Vec<&'a Value>,
    }
    let body = ListBody {
        kind: format!("{}List", kind.info().3),
        api_version: kind.api_version(),
        metadata: meta,
        items: page,
    };
    match serde_json::to_vec(&body) {
        Ok(b) => (StatusCode::OK, [("content-type", "application/json")], b).into_response(),
        Err(e) => err(&StoreError::new(500, "InternalError", e.to_string())),
    }
}

fn watch(sim: Arc<Shared>, kind: Kind, ns: Option<String>, q: &HashMap<String, String>) -> Response {
    let (labels, fields) = match selectors(q) {
        Ok(x) => x,
        Err(e) => return bad(e),
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let from: u64 = q.get("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(0);
    let scope = Scope::for_watch(kind, fields.equalities());
    let listed = (from == 0).then(|| candidates(&sim, kind, ns.as_deref(), &fields));
    let matches = move |o: &Value| {
        (ns.is_none() || o.pointer("/metadata/namespace").and_then(Value::as_str) == ns.as_deref())
            && labels.matches_object(o)
            && fields.matches(o)
    };

    // Synthetic ADDED events for what exists, when no version is given.
    let (initial, start) = match listed {
        Some((items, rv)) => (items.into_iter().filter(|o| matches(o)).collect::<Vec<_>>(), rv),
        None => (Vec::new(), from),
    };
    let (replay, mut rx) = match sim.store.watch_scope(start, &scope) {
        Ok(x) => x,
        Err(e) => {
            // The real server answers a too-old version inside a 200 watch stream. Counted as a
            // refusal, so a test can tell that resumes really met it.
            sim.count_refusal("watch", kind.info().2, e.code);
            let line = json!({"type": "ERROR", "object": e.status()}).to_string() + "\n";
            return (StatusCode::OK, [("content-type", "application/json")], line).into_response();
        }
    };
    let (mut tx, body_rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let drop_after = sim.watch_drop_after();
    let bookmark_every = sim.config.bookmark_interval;
    tokio::spawn(async move {
        use futures::SinkExt;
        let counted = |b: Bytes| {
            sim.count_watch_event(b.len());
            Ok(b)
        };
        for o in &initial {
            if tx.send(counted(event_line("ADDED", o))).await.is_err() {
                return;
            }
        }
        let mut last = start;
        // The line to send for a change, if this watch is to see it: the change's own line
        // (serialized once for all watches) unless the change moves the object into or out of
        // the selectors.
        let deliver = |c: &Change, last: &mut u64| -> Option<Bytes> {
            if c.kind != kind || c.rv <= *last {
                return None;
            }
            *last = c.rv;
            let now = matches(&c.object);
            let before = c.old.as_ref().map(|o| matches(o));
            match (c.type_, before, c.old.as_ref(), now) {
                // An object that stops matching the selectors leaves the watch as DELETED
                // carrying its *previous* state (the one that still matched, labels and all)
                // with the change's resourceVersion, as kube-apiserver's watch cache does
                // (`convertToWatchEvent`): a client cannot tell it from a real deletion.
                ("MODIFIED", Some(true), Some(old), false) => {
                    Some(event_line("DELETED", &left_watch(old, c.rv)))
                }
                ("MODIFIED", Some(false), _, true) => Some(event_line("ADDED", &c.object)),
                (_, _, _, true) => Some(c.line()),
                _ => None,
            }
        };
        for c in &replay {
            if let Some(b) = deliver(c, &mut last)
                && tx.send(counted(b)).await.is_err()
            {
                return;
            }
        }
        let end = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let dropped = async {
            match drop_after {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(end, dropped);
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut end => return,
                _ = &mut dropped => return,
                _ = tick.tick(), if bookmarks => {
                    let rv = sim.store.rv().max(last);
                    let bm = json!({"kind": kind.info().3, "apiVersion": kind.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(counted(event_line("BOOKMARK", &bm))).await.is_err() {
                        return;
                    }
                }
                c = rx.recv() => match c {
                    Ok(c) => {
                        if let Some(b) = deliver(&c, &mut last)
                            && tx.send(counted(b)).await.is_err()
                        {
                            return;
                        }
                    }
                    // Too slow to keep up, or shutting down: end the stream; the client
                    // resumes from its last version (or relists after a 410).
                    Err(RecvError::Lagged(_) | RecvError::Closed) => return,
                },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(body_rx))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `old` (an object's state before a change) with the change's resourceVersion: what a watch
/// sends as DELETED when the change makes the object stop matching its selectors.
fn left_watch(old: &Value, rv: u64) -> Arc<Value> {
    let mut o = old.clone();
    if o.get("metadata").is_some_and(Value::is_object) {
        o["metadata"]["resourceVersion"] = json!(rv.to_string());
    }
    Arc::new(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(
            route("/api/v1/nodes/n1"),
            Some(Route::Object {
                kind: Kind::Node,
                ns: None,
                name: Some(_),
                sub: None
            })
        ));
        assert!(matches!(
            route("/api/v1/namespaces/a/pods/p/eviction"),
            Some(Route::Object {
                kind: Kind::Pod,
                sub: Some(_),
                ..
            })
        ));
        assert!(matches!(
            route("/apis/coordination.k8s.io/v1/namespaces/ks/leases"),
            Some(Route::Object {
                kind: Kind::Lease,
                name: None,
                ..
            })
        ));
        assert!(matches!(
            route("/api/v1/namespaces/x"),
            Some(Route::Object {
                kind: Kind::Namespace,
                ..
            })
        ));
        assert!(matches!(
            route("/api/v1/pods"),
            Some(Route::Object {
                kind: Kind::Pod,
                ns: None,
                ..
            })
        ));
        assert!(route("/apis/coordination.k8s.io/v2/leases").is_none());
        assert!(route("/nonsense").is_none());
    }

    #[test]
    fn micro_time() {
        assert!(micro_time_ok(&json!("2026-11-24T18:00:00.000000Z")));
        assert!(!micro_time_ok(&json!("2026-11-24T18:00:00Z")));
        assert!(!micro_time_ok(&json!("2026-11-24T18:00:00.000Z")));
    }
}
