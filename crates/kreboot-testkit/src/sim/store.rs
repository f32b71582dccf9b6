//! The simulated API server's object store: every object as JSON, one global resourceVersion,
//! an event history for resuming watches, and a broadcast of changes to live watches.
//!
//! Semantics kept from the real server: a create of an existing name is 409 AlreadyExists; an
//! update (or a patch carrying `metadata.resourceVersion`) whose version is not the stored one
//! is 409 Conflict; writes to the main resource keep `status`, writes to `/status` keep
//! everything else; a watch resumed from a version older than the history is answered with
//! 410 Gone.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The kinds of object the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Pod.
    Pod,
    /// core/v1 ConfigMap.
    ConfigMap,
    /// core/v1 Event.
    CoreEvent,
    /// events.k8s.io/v1 Event.
    Event,
    /// coordination.k8s.io/v1 Lease.
    Lease,
    /// policy/v1 PodDisruptionBudget.
    Pdb,
    /// core/v1 Namespace (cluster-scoped).
    Namespace,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 8] = [
        Kind::Node,
        Kind::Pod,
        Kind::ConfigMap,
        Kind::CoreEvent,
        Kind::Event,
        Kind::Lease,
        Kind::Pdb,
        Kind::Namespace,
    ];

    /// `(group, version, plural, kind, namespaced)`.
    pub fn info(self) -> (&'static str, &'static str, &'static str, &'static str, bool) {
        match self {
            Kind::Node => ("", "v1", "nodes", "Node", false),
            Kind::Pod => ("", "v1", "pods", "Pod", true),
            Kind::ConfigMap => ("", "v1", "configmaps", "ConfigMap", true),
            Kind::CoreEvent => ("", "v1", "events", "Event", true),
            Kind::Event => ("events.k8s.io", "v1", "events", "Event", true),
            Kind::Lease => ("coordination.k8s.io", "v1", "leases", "Lease", true),
            Kind::Pdb => (
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
            ),
            Kind::Namespace => ("", "v1", "namespaces", "Namespace", false),
        }
    }

    /// `apiVersion` of objects of this kind.
    pub fn api_version(self) -> String {
        let (g, v, ..) = self.info();
        if g.is_empty() {
            v.to_owned()
        } else {
            format!("{g}/{v}")
        }
    }

    /// The kind from a group and plural resource name.
    pub fn from_path(group: &str, plural: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| {
            let (g, _, p, ..) = k.info();
            g == group && p == plural
        })
    }

    /// Whether objects of this kind have a status subresource.
    pub fn has_status(self) -> bool {
        matches!(self, Kind::Node | Kind::Pod | Kind::Pdb)
    }
}

/// A change, as a watch sees it.
#[derive(Debug, Clone)]
pub struct Change {
    /// The kind of the object.
    pub kind: Kind,
    /// ADDED, MODIFIED or DELETED.
    pub type_: &'static str,
    /// The object after the change (before, for DELETED).
    pub object: Arc<Value>,
    /// The object before the change (MODIFIED only), for selector transitions: a watch sends
    /// it (with the new resourceVersion) as DELETED when the change makes the object stop
    /// matching.
    pub old: Option<Arc<Value>>,
    /// The resourceVersion of the change.
    pub rv: u64,
}

/// A write refused by the store, as a Kubernetes Status.
#[derive(Debug, Clone)]
pub struct StoreError {
    /// HTTP code.
    pub code: u16,
    /// Status reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

impl StoreError {
    /// A Status object for this error.
    pub fn status(&self) -> Value {
        status_body(self.code, self.reason, &self.message)
    }

    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> StoreError {
        StoreError {
            code,
            reason,
            message: message.into(),
        }
    }
}

/// A `Status` body.
pub fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    })
}

type Key = (String, String);

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: HashMap<Kind, BTreeMap<Key, Arc<Value>>>,
    history: VecDeque<Change>,
    uid: u64,
}

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Change>,
    history_size: usize,
}

/// The current time as the API server writes it.
pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

impl Store {
    /// A store keeping `history_size` changes for watch resumption.
    pub fn new(history_size: usize) -> Store {
        let (tx, _) = broadcast::channel(65536);
        Store {
            inner: Mutex::new(Inner::default()),
            tx,
            history_size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    /// One object.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.lock()
            .objects
            .get(&kind)?
            .get(&(ns.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every object of `kind` (in `ns`, if given), with the list's resourceVersion.
    pub fn list(&self, kind: Kind, ns: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .get(&kind)
            .map(|m| {
                m.iter()
                    .filter(|((n, _), _)| ns.is_none_or(|ns| ns == n))
                    .map(|(_, v)| v.clone())
                    .collect()
            })
            .unwrap_or_default();
        (items, inner.rv)
    }

    /// Subscribes to changes after `from`: the history since then, and a live receiver.
    ///
    /// # Errors
    /// 410 Gone when `from` is older than the history kept.
    pub fn watch_from(&self, from: u64) -> Result<(Vec<Change>, broadcast::Receiver<Change>), StoreError> {
        let inner = self.lock();
        let rx = self.tx.subscribe();
        let oldest = inner.history.front().map_or(inner.rv, |c| c.rv.saturating_sub(1));
        if from < oldest {
            return Err(StoreError::new(
                410,
                "Expired",
                format!("too old resource version: {from} ({oldest})"),
            ));
        }
        let replay = inner.history.iter().filter(|c| c.rv > from).cloned().collect();
        Ok((replay, rx))
    }

    fn record(&self, inner: &mut Inner, change: Change) {
        inner.history.push_back(change.clone());
        while inner.history.len() > self.history_size {
            inner.history.pop_front();
        }
        // No receiver is fine: nobody watches.
        let _ = self.tx.send(change);
    }

    /// Creates `obj` of `kind` in `ns`.
    ///
    /// # Errors
    /// 409 AlreadyExists, 422 Invalid when there is no name.
    pub fn create(&self, kind: Kind, ns: &str, mut obj: Value) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        if !obj.is_object() {
            return Err(StoreError::new(400, "BadRequest", "the body is not an object"));
        }
        if obj.get("metadata").is_none_or(|m| !m.is_object()) {
            obj["metadata"] = json!({});
        }
        let name = match meta_str(&obj, "name") {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta_str(&obj, "generateName") {
                Some(prefix) => {
                    inner.uid += 1;
                    format!("{prefix}{:05x}", inner.uid)
                }
                None => {
                    return Err(StoreError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            },
        };
        let key = (ns.to_owned(), name.clone());
        if inner.objects.get(&kind).is_some_and(|m| m.contains_key(&key)) {
            let (_, _, plural, ..) = kind.info();
            return Err(StoreError::new(
                409,
                "AlreadyExists",
                format!("{plural} \"{name}\" already exists"),
            ));
        }
        inner.rv += 1;
        inner.uid += 1;
        let rv = inner.rv;
        let (_, _, _, kind_name, namespaced) = kind.info();
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind_name);
        let meta = &mut obj["metadata"];
        meta["name"] = json!(name);
        if namespaced {
            meta["namespace"] = json!(ns);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", inner.uid));
        meta["creationTimestamp"] = json!(now_rfc3339());
        let obj = Arc::new(obj);
        inner.objects.entry(kind).or_default().insert(key, obj.clone());
        self.record(
            &mut inner,
            Change {
                kind,
                type_: "ADDED",
                object: obj.clone(),
                old: None,
                rv,
            },
        );
        Ok(obj)
    }

    /// Replaces an object with the result of `f` applied to the stored one, checking
    /// `expected_rv` (if any) against the stored version.
    ///
    /// # Errors
    /// 404 NotFound, 409 Conflict, or whatever `f` refuses.
    pub fn update(
        &self,
        kind: Kind,
        ns: &str,
        name: &str,
        f: impl FnOnce(&Value) -> Result<Value, StoreError>,
    ) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let Some(old) = inner.objects.get(&kind).and_then(|m| m.get(&key)).cloned() else {
            let (_, _, plural, ..) = kind.info();
            return Err(StoreError::new(
                404,
                "NotFound",
                format!("{plural} \"{name}\" not found"),
            ));
        };
        let mut new = f(&old)?;
        if !new.is_object() {
            return Err(StoreError::new(400, "BadRequest", "the result is not an object"));
        }
        if let Some(want) = meta_str(&new, "resourceVersion").filter(|v| !v.is_empty())
            && Some(want) != meta_str(&old, "resourceVersion")
        {
            let (_, _, plural, ..) = kind.info();
            return Err(StoreError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; \
                     please apply your changes to the latest version and try again"
                ),
            ));
        }
        // Identity fields cannot change.
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
        ] {
            if let Some(v) = old["metadata"].get(f) {
                new["metadata"][f] = v.clone();
            }
        }
        if new == *old.as_ref() {
            return Ok(old);
        }
        inner.rv += 1;
        let rv = inner.rv;
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        new["apiVersion"] = json!(kind.api_version());
        new["kind"] = json!(kind.info().3);
        let new = Arc::new(new);
        inner.objects.entry(kind).or_default().insert(key, new.clone());
        self.record(
            &mut inner,
            Change {
                kind,
                type_: "MODIFIED",
                object: new.clone(),
                old: Some(old),
                rv,
            },
        );
        Ok(new)
    }

    /// Removes an object.
    ///
    /// # Errors
    /// 404 NotFound.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> Result<Arc<Value>, StoreError> {
        let mut inner = self.lock();
        let key = (ns.to_owned(), name.to_owned());
        let Some(old) = inner.objects.get_mut(&kind).and_then(|m| m.remove(&key)) else {
            let (_, _, plural, ..) = kind.info();
            return Err(StoreError::new(
                404,
                "NotFound",
                format!("{plural} \"{name}\" not found"),
            ));
        };
        inner.rv += 1;
        let rv = inner.rv;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        let gone = Arc::new(gone);
        self.record(
            &mut inner,
            Change {
                kind,
                type_: "DELETED",
                object: gone.clone(),
                old: None,
                rv,
            },
        );
        Ok(gone)
    }
}

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (_, Some(_)) => {
            *target = json!({});
            merge_patch(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        merge_patch(
            &mut t,
            &json!({"a": null, "b": {"c": 5}, "l": [3], "n": {"x": 1}}),
        );
        assert_eq!(t, json!({"b": {"c": 5, "d": 3}, "l": [3], "n": {"x": 1}}));
    }

    #[test]
    fn versions_conflicts_and_history() {
        let s = Store::new(3);
        let a = s
            .create(Kind::ConfigMap, "ns", json!({"metadata": {"name": "a"}}))
            .unwrap();
        assert_eq!(a["metadata"]["resourceVersion"], "1");
        assert_eq!(
            s.create(Kind::ConfigMap, "ns", json!({"metadata": {"name": "a"}}))
                .unwrap_err()
                .code,
            409
        );
        let stale = json!({"metadata": {"name": "a", "resourceVersion": "0"}});
        assert_eq!(
            s.update(Kind::ConfigMap, "ns", "a", |_| Ok(stale.clone()))
                .unwrap_err()
                .code,
            409
        );
        for i in 0..5 {
            s.update(Kind::ConfigMap, "ns", "a", |o| {
                let mut o = o.clone();
                o["data"] = json!({"i": i.to_string()});
                Ok(o)
            })
            .unwrap();
        }
        assert_eq!(s.watch_from(0).unwrap_err().code, 410);
        let (replay, _) = s.watch_from(4).unwrap();
        assert_eq!(replay.len(), 2);
        assert_eq!(
            s.delete(Kind::ConfigMap, "ns", "a").unwrap()["metadata"]["resourceVersion"],
            "7"
        );
        assert_eq!(s.delete(Kind::ConfigMap, "ns", "a").unwrap_err().code, 404);
    }
}
