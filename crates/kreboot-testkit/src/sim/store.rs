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
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use axum::body::Bytes;

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
    /// The watch event line `{"type":…,"object":…}` of this change as it is, serialized by the
    /// first watch that sends it and shared by all others (and by replays from the history).
    line: Arc<OnceLock<Bytes>>,
}

impl Change {
    fn new(kind: Kind, type_: &'static str, object: Arc<Value>, old: Option<Arc<Value>>, rv: u64) -> Change {
        Change {
            kind,
            type_,
            object,
            old,
            rv,
            line: Arc::default(),
        }
    }

    /// The watch event line of this change (its type, its object), serialized once.
    pub fn line(&self) -> Bytes {
        self.line
            .get_or_init(|| event_line(self.type_, &self.object))
            .clone()
    }
}

/// A watch event line: `{"type":"…","object":…}` and a newline.
pub fn event_line(type_: &str, object: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"type\":");
    // A type is a plain word; serde_json escapes it anyway.
    let _ = serde_json::to_writer(&mut out, type_);
    out.extend_from_slice(b",\"object\":");
    let _ = serde_json::to_writer(&mut out, object);
    out.extend_from_slice(b"}\n");
    Bytes::from(out)
}

/// Which changes a watch is sent: every change of its kind, or only those of objects with one
/// name or (pods) bound to one node. A watch whose field selector pins `metadata.name` (or a
/// pod's `spec.nodeName`) can match nothing else, so the narrower subscription loses nothing and
/// spares the other watches' receivers a wake-up per change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every change of every kind (for harnesses following the whole store).
    All,
    /// Every change of the kind.
    Kind(Kind),
    /// Changes of objects of the kind with this name (any namespace).
    Name(Kind, String),
    /// Changes of pods bound to this node before or after the change.
    NodeName(String),
}

impl Scope {
    /// The narrowest scope for a watch of `kind` whose field selector requires `field = value`
    /// for each `(field, value)` of `equalities`.
    pub fn for_watch<'a>(kind: Kind, equalities: impl IntoIterator<Item = (&'a str, &'a str)>) -> Scope {
        let mut scope = Scope::Kind(kind);
        for (field, value) in equalities {
            match field {
                "metadata.name" => return Scope::Name(kind, value.to_owned()),
                "spec.nodeName" if kind == Kind::Pod => scope = Scope::NodeName(value.to_owned()),
                _ => {}
            }
        }
        scope
    }

    /// The keyed scopes (not [`Scope::Kind`]) a change is sent to.
    fn keys(c: &Change) -> impl Iterator<Item = Scope> {
        let name = meta_str(&c.object, "name").map(|n| Scope::Name(c.kind, n.to_owned()));
        let node_of = |o: &Value| {
            o.pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        };
        let (now, before) = if c.kind == Kind::Pod {
            let now = node_of(&c.object);
            let before = c
                .old
                .as_deref()
                .and_then(node_of)
                .filter(|b| Some(b) != now.as_ref());
            (now.map(Scope::NodeName), before.map(Scope::NodeName))
        } else {
            (None, None)
        };
        name.into_iter().chain(now).chain(before)
    }
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

/// Live watches of one keyed scope: created by the first, dropped when the last is gone.
const KEYED_CAPACITY: usize = 1024;

/// The store.
pub struct Store {
    inner: Mutex<Inner>,
    /// Every change, to harnesses following the whole store.
    all: broadcast::Sender<Change>,
    /// Changes by kind, to the watches of a whole kind.
    by_kind: HashMap<Kind, broadcast::Sender<Change>>,
    /// Changes by name or node, to the watches narrowed to one ([`Scope`]). Locked inside
    /// `inner` (a change is sent in the order of its resourceVersion).
    keyed: Mutex<HashMap<Scope, broadcast::Sender<Change>>>,
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
        Store {
            inner: Mutex::new(Inner::default()),
            all: broadcast::channel(65536).0,
            by_kind: Kind::ALL
                .into_iter()
                .map(|k| (k, broadcast::channel(65536).0))
                .collect(),
            keyed: Mutex::default(),
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

    /// The object of `kind` named `name` in `ns`, as a list of at most one, with the list's
    /// resourceVersion (a list narrowed to one name, without a scan).
    pub fn list_named(&self, kind: Kind, ns: &str, name: &str) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let item = inner
            .objects
            .get(&kind)
            .and_then(|m| m.get(&(ns.to_owned(), name.to_owned())))
            .cloned();
        (item.into_iter().collect(), inner.rv)
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

    /// Subscribes to every change after `from`: the history since then, and a live receiver.
    ///
    /// # Errors
    /// 410 Gone when `from` is older than the history kept.
    pub fn watch_from(&self, from: u64) -> Result<(Vec<Change>, broadcast::Receiver<Change>), StoreError> {
        self.watch_scope(from, &Scope::All)
    }

    /// Subscribes to the changes of `scope` after `from`: those of the history since then (of
    /// the scope's kind; the caller filters further), and a live receiver.
    ///
    /// # Errors
    /// 410 Gone when `from` is older than the history kept.
    pub fn watch_scope(
        &self,
        from: u64,
        scope: &Scope,
    ) -> Result<(Vec<Change>, broadcast::Receiver<Change>), StoreError> {
        let inner = self.lock();
        let oldest = inner.history.front().map_or(inner.rv, |c| c.rv.saturating_sub(1));
        if from < oldest {
            return Err(StoreError::new(
                410,
                "Expired",
                format!("too old resource version: {from} ({oldest})"),
            ));
        }
        let kind = match scope {
            Scope::All => None,
            Scope::Kind(k) | Scope::Name(k, _) => Some(*k),
            Scope::NodeName(_) => Some(Kind::Pod),
        };
        let rx = match scope {
            Scope::All => self.all.subscribe(),
            Scope::Kind(k) => self.by_kind[k].subscribe(),
            keyed => self
                .keyed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(keyed.clone())
                .or_insert_with(|| broadcast::channel(KEYED_CAPACITY).0)
                .subscribe(),
        };
        // The history is in resourceVersion order: start after `from` without a scan.
        let first = inner.history.partition_point(|c| c.rv <= from);
        let replay = inner
            .history
            .range(first..)
            .filter(|c| kind.is_none_or(|k| c.kind == k))
            .cloned()
            .collect();
        Ok((replay, rx))
    }

    fn record(&self, inner: &mut Inner, change: Change) {
        inner.history.push_back(change.clone());
        while inner.history.len() > self.history_size {
            inner.history.pop_front();
        }
        {
            let mut keyed = self.keyed.lock().unwrap_or_else(|e| e.into_inner());
            if !keyed.is_empty() {
                for key in Scope::keys(&change) {
                    if let Some(tx) = keyed.get(&key)
                        && tx.send(change.clone()).is_err()
                    {
                        // Nobody watches this name any more.
                        keyed.remove(&key);
                    }
                }
            }
        }
        if self.all.receiver_count() > 0 {
            let _ = self.all.send(change.clone());
        }
        // No receiver is fine: nobody watches.
        let _ = self.by_kind[&change.kind].send(change);
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
        self.record(&mut inner, Change::new(kind, "ADDED", obj.clone(), None, rv));
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
            Change::new(kind, "MODIFIED", new.clone(), Some(old), rv),
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
        self.record(&mut inner, Change::new(kind, "DELETED", gone.clone(), None, rv));
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
        let all = Scope::Kind(Kind::ConfigMap);
        assert_eq!(s.watch_scope(0, &all).unwrap_err().code, 410);
        let (replay, _) = s.watch_scope(4, &all).unwrap();
        assert_eq!(s.watch_from(4).unwrap().0.len(), 2);
        assert_eq!(replay.len(), 2);
        assert_eq!(
            s.delete(Kind::ConfigMap, "ns", "a").unwrap()["metadata"]["resourceVersion"],
            "7"
        );
        assert_eq!(s.delete(Kind::ConfigMap, "ns", "a").unwrap_err().code, 404);
    }

    #[test]
    fn keyed_watches_get_their_changes_only() {
        let s = Store::new(100);
        let (_, mut named) = s.watch_scope(0, &Scope::Name(Kind::Node, "a".into())).unwrap();
        let (_, mut on_n1) = s.watch_scope(0, &Scope::NodeName("n1".into())).unwrap();
        let (_, mut nodes) = s.watch_scope(0, &Scope::Kind(Kind::Node)).unwrap();
        s.create(Kind::Node, "", json!({"metadata": {"name": "b"}}))
            .unwrap();
        s.create(Kind::Node, "", json!({"metadata": {"name": "a"}}))
            .unwrap();
        let pod = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "n1"}});
        s.create(Kind::Pod, "ns", pod).unwrap();
        // Moved to another node: the watch of n1 sees it leave.
        s.update(Kind::Pod, "ns", "p", |o| {
            let mut o = o.clone();
            o["spec"]["nodeName"] = json!("n2");
            Ok(o)
        })
        .unwrap();
        assert_eq!(named.try_recv().unwrap().object["metadata"]["name"], "a");
        assert!(named.try_recv().is_err());
        assert_eq!(on_n1.try_recv().unwrap().type_, "ADDED");
        assert_eq!(on_n1.try_recv().unwrap().type_, "MODIFIED");
        assert!(on_n1.try_recv().is_err());
        assert_eq!(nodes.try_recv().unwrap().object["metadata"]["name"], "b");
        assert_eq!(nodes.try_recv().unwrap().object["metadata"]["name"], "a");
        assert!(nodes.try_recv().is_err());
        // The line of a change is its type and object.
        let (replay, _) = s.watch_scope(0, &Scope::Kind(Kind::Pod)).unwrap();
        let line: Value = serde_json::from_slice(&replay[0].line()).unwrap();
        assert_eq!(line, json!({"type": "ADDED", "object": *replay[0].object}));
    }

    #[test]
    fn scope_of_a_watch() {
        assert_eq!(
            Scope::for_watch(Kind::Node, [("metadata.name", "a")]),
            Scope::Name(Kind::Node, "a".into())
        );
        assert_eq!(
            Scope::for_watch(Kind::Pod, [("spec.nodeName", "n")]),
            Scope::NodeName("n".into())
        );
        assert_eq!(
            Scope::for_watch(Kind::Node, [("spec.nodeName", "n")]),
            Scope::Kind(Kind::Node)
        );
        assert_eq!(Scope::for_watch(Kind::Lease, []), Scope::Kind(Kind::Lease));
    }
}
