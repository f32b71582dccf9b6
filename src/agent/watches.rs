//! The watches that feed an engaged agent's observations: its own Node, the lock Leases, the
//! policy ConfigMap, the lock holders' Nodes (one shared watch of labelled holders, one watch by
//! name per unlabelled one), and, while the health gate holds, the pods bound to the node and
//! the PodDisruptionBudgets. Each publishes what it knows on a `tokio::sync::watch` channel;
//! the lifecycle loop (`super::run`) reads them as one snapshot and decides from that.
//!
//! What it owns: the caches and their rules (never move a cached object backwards, see
//! `newer`; when a holder that left the labelled watch gets a watch by name, see
//! `Labelled::Left`), and starting and stopping the watch tasks (dropped with [`Watches`]).

use super::*;
/// How long a lock holder may go without its holder label before a waiter watches its Node on
/// its own (a kreboot holder labels its Node in the cordon write, right after taking the lock),
/// when the holder's slot is the waiter's first choice or has expired ([`lock::Urgency::Soon`]).
/// Not for a holder that *left* the watch of labelled holders: that one waits [`LEFT_GRACE`] (see
/// [`Labelled::Left`]).
pub(super) const UNLABELLED_GRACE: Duration = Duration::from_secs(2);

/// [`UNLABELLED_GRACE`] for the other waiters ([`lock::Urgency::Later`]). Measured on the real
/// kube-apiserver with 1,000 and 5,000 nodes: under the load of a whole fleet's burst a holder's
/// label arrives later than 2 s, and every waiter then listed and watched the new holder's Node
/// (about 240 Node reads per node rolled, 34,974 abandoned Node LISTs at 5,000). A deleted
/// holder is still found after [`UNLABELLED_GRACE`] by the waiters that would take its slot.
pub(super) const UNLABELLED_GRACE_OTHER_SLOT: Duration = Duration::from_secs(30);

/// How long a holder that left the labelled watch may stay named by a Lease before a waiter
/// watches its Node by name: longer than the hand-over write that follows the label's removal,
/// short enough that a deleted holder's slot is freed within about a second.
pub(super) const LEFT_GRACE: Duration = Duration::from_millis(500);

/// The policy as the agent knows it.
#[derive(Debug, Clone, Default)]
pub(super) struct PolicyState {
    /// The first list finished.
    pub(super) synced: bool,
    /// The policy in force (None: an invalid ConfigMap and no good one seen yet: no reboots).
    pub(super) policy: Option<Policy>,
    /// An operator's pause recorded on the ConfigMap (read whether or not the policy is valid).
    pub(super) paused: Option<Pause>,
}

/// The lock Leases as the agent knows them.
#[derive(Debug, Clone, Default)]
pub(super) struct LeaseState {
    pub(super) synced: bool,
    pub(super) leases: BTreeMap<String, Lease>,
    /// When this agent first saw each lease's current version, on its monotonic clock (expiry
    /// is judged by that alone, never by another node's wall clock: see `lock`).
    pub(super) seen: lock::Seen,
}

impl LeaseState {
    /// Every lock Lease `me` holds (a node may hold its group's slot and a cap slot).
    pub(super) fn held_by(&self, me: &str) -> Vec<Lease> {
        self.leases
            .values()
            .filter(|l| lock::holder(l) == Some(me))
            .cloned()
            .collect()
    }

    /// Stores `l` unless an older version; records when a new version was first seen.
    pub(super) fn put(&mut self, l: Lease, now: Instant) {
        let name = l.name_any();
        let current = self.leases.get(&name);
        if !newer(
            current.and_then(|o| o.metadata.resource_version.as_deref()),
            l.metadata.resource_version.as_deref(),
        ) {
            return;
        }
        if current.and_then(|o| o.metadata.resource_version.as_ref()) != l.metadata.resource_version.as_ref()
        {
            self.seen.insert(name.clone(), now);
        }
        self.leases.insert(name, l);
    }
}

/// This agent's Node as it knows it.
#[derive(Debug, Clone, Default)]
pub(super) struct NodeState {
    pub(super) synced: bool,
    pub(super) node: Option<Node>,
}

/// Resource versions are opaque strings; in practice (etcd and the simulator) they are
/// integers. Keep the newer of two versions of an object, so that our own write's response and
/// the watch's (possibly older) event never move the cache backwards. When either version is
/// not an integer (or is missing), nothing can be compared: the incoming one is taken.
pub(super) fn newer(current: Option<&str>, incoming: Option<&str>) -> bool {
    match (
        current.and_then(|c| c.parse::<u64>().ok()),
        incoming.and_then(|i| i.parse::<u64>().ok()),
    ) {
        (Some(c), Some(i)) => i >= c,
        _ => true,
    }
}

/// What the shared watch of labelled lock holders knows of one Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Labelled {
    /// The Node carries the lock-holder label; its state.
    Holding(lock::HolderNode),
    /// The Node carried the label and then left the watch (DELETED, or gone from a relist).
    /// That is *not* "Node deleted": when an object stops matching a label selector, the API
    /// server sends DELETED carrying the previous object, label included (watch cache,
    /// `convertToWatchEvent`), so a holder that ends its cycle and drops its label looks exactly
    /// like a deleted one. Reading it as deleted made every waiter race for the slot the holder
    /// is about to hand over (conflicting Lease writes; the winner not the longest waiter). Such
    /// a holder, while a Lease still names it, gets its own watch by name after [`LEFT_GRACE`],
    /// which tells a real deletion (a ghost lock, freed within a second) from a dropped label.
    Left,
}

/// The watches an engaged agent runs; dropped (and their tasks aborted) when it disengages.
pub(super) struct Watches {
    pub(super) node: watch::Sender<NodeState>,
    pub(super) leases: watch::Sender<LeaseState>,
    pub(super) policy: watch::Sender<PolicyState>,
    /// What is known of unlabelled lock holders' Nodes (one watch each).
    pub(super) holder_nodes: watch::Sender<BTreeMap<String, lock::HolderNode>>,
    /// What is known of the Nodes labelled as lock holders (one shared watch), and which left
    /// that watch.
    pub(super) labelled_holders: watch::Sender<BTreeMap<String, Labelled>>,
    /// Since when each unlabelled holder has been seen without its label.
    pub(super) unlabelled_since: BTreeMap<String, Instant>,
    pub(super) holder_tasks: BTreeMap<String, JoinHandle<()>>,
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// The watches of the whole lock (its Leases, its labelled holders), stopped while the
    /// agent dozes in a long queue.
    pub(super) lock_tasks: Vec<JoinHandle<()>>,
    /// The pods bound to this node (None until listed), watched only while the health gate
    /// holds (phase `verifying`): the watch starts with the gate, not before.
    pub(super) pods: watch::Sender<Option<Vec<Pod>>>,
    pub(super) pods_watched: bool,
    /// The PodDisruptionBudgets (None until listed), watched only while a health gate waits
    /// for the budgets its drain touched.
    pub(super) budgets: watch::Sender<Option<Vec<PodDisruptionBudget>>>,
    pub(super) budgets_watched: bool,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in self
            .tasks
            .drain(..)
            .chain(self.lock_tasks.drain(..))
            .chain(std::mem::take(&mut self.holder_tasks).into_values())
        {
            t.abort();
        }
    }
}

impl Watches {
    /// Stops the watches of the whole lock, and of holders by name, while the agent dozes in a
    /// long queue ([`lock::doze_period`]); [`Agent::wake`] restarts them. The Leases count as not
    /// listed until then, so no decision is made on what was seen before the doze.
    pub(super) fn doze(&mut self) {
        for t in self
            .lock_tasks
            .drain(..)
            .chain(std::mem::take(&mut self.holder_tasks).into_values())
        {
            t.abort();
        }
        self.leases.send_if_modified(|s| {
            s.synced = false;
            false
        });
    }

    pub(super) fn synced(&self) -> bool {
        self.node.borrow().synced && self.leases.borrow().synced && self.policy.borrow().synced
    }

    pub(super) fn set_node(&self, n: Node) {
        self.node.send_modify(|s| {
            if newer(
                s.node
                    .as_ref()
                    .and_then(|o| o.metadata.resource_version.as_deref()),
                n.metadata.resource_version.as_deref(),
            ) {
                s.node = Some(n);
            }
        });
    }

    pub(super) fn set_lease(&self, l: Lease, now: Instant) {
        self.leases.send_modify(|s| s.put(l, now));
    }

    /// What is known of holder `h`'s Node: from the watch of labelled holders while it carries
    /// the label, else from a watch of that one Node (Unknown until that watch has listed it:
    /// a holder that left the labelled watch is never taken for gone on that alone).
    pub(super) fn holder_node(&self, h: &str) -> lock::HolderNode {
        match self.labelled_holders.borrow().get(h) {
            Some(Labelled::Holding(state)) => *state,
            Some(Labelled::Left) | None => self
                .holder_nodes
                .borrow()
                .get(h)
                .copied()
                .unwrap_or(lock::HolderNode::Unknown),
        }
    }

    /// Makes sure every lock holder's Node is watched, to free a ghost lock at once. kreboot
    /// holders label their Node while they hold (`kreboot.io/lock-holder`), and every engaged
    /// agent watches those labelled Nodes with one shared watch. A holder gets a watch of its
    /// own (by name, which sees a real deletion) when it left the labelled watch and a Lease
    /// still names it after [`LEFT_GRACE`] (it was deleted, or it dropped its label at the end of
    /// its cycle and has not handed over yet, see [`Labelled::Left`]),
    /// or when it stays unlabelled for [`UNLABELLED_GRACE`] (another tool's lease, or a holder
    /// that crashed between taking the lock and cordoning; [`UNLABELLED_GRACE_OTHER_SLOT`] when
    /// its slot is not this waiter's first choice). Returns when to look again, if a grace
    /// period is running.
    pub(super) fn watch_holders(
        &mut self,
        client: &Client,
        listed: &[(String, lock::Urgency)],
    ) -> Option<Instant> {
        let holders: Vec<String> = listed.iter().map(|(h, _)| h.clone()).collect();
        let holders = holders.as_slice();
        // Forget the Nodes that left the labelled watch and no Lease names any more. Nothing
        // decides on them, so the waiters are not woken for it (`false`: no notification; the
        // change is kept).
        self.labelled_holders.send_if_modified(|m| {
            m.retain(|h, l| *l != Labelled::Left || holders.contains(h));
            false
        });
        let labelled = self.labelled_holders.borrow().clone();
        let holding = |h: &String| matches!(labelled.get(h), Some(Labelled::Holding(_)));
        let now = Instant::now();
        self.unlabelled_since
            .retain(|h, _| holders.contains(h) && !holding(h));
        let mut next_look = None;
        let mut need_own_watch = Vec::new();
        for (h, urgency) in listed.iter().filter(|(h, _)| !holding(h)) {
            // A holder that left the labelled watch gets only a short grace: a holder ending its
            // cycle hands its slot over in its next write, and the Lease then names another
            // node (no watch needed; without the grace every waiter would list and watch the
            // old holder at each hand-over); a deleted one is found within the grace.
            let grace = match (labelled.get(h), urgency) {
                (Some(Labelled::Left), _) => LEFT_GRACE,
                (_, lock::Urgency::Soon) => UNLABELLED_GRACE,
                (_, lock::Urgency::Later) => UNLABELLED_GRACE_OTHER_SLOT,
            };
            let since = *self.unlabelled_since.entry(h.clone()).or_insert(now);
            if now >= since + grace {
                need_own_watch.push(h.clone());
            } else {
                let at = since + grace;
                next_look = Some(next_look.map_or(at, |n: Instant| n.min(at)));
            }
        }
        let holders = need_own_watch;
        let wanted: BTreeSet<&String> = holders.iter().collect();
        self.holder_tasks.retain(|h, t| {
            let keep = wanted.contains(h);
            if !keep {
                t.abort();
            }
            keep
        });
        self.holder_nodes.send_if_modified(|m| {
            let before = m.len();
            m.retain(|h, _| wanted.contains(h));
            m.len() != before
        });
        for h in &holders {
            if self.holder_tasks.contains_key(h) {
                continue;
            }
            let api: Api<Node> = Api::all(client.clone());
            let states = self.holder_nodes.clone();
            let name = h.clone();
            let task = tokio::spawn(follow_named(api, name.clone(), "lock holder's Node", move |n| {
                let state = n.as_ref().map_or(lock::HolderNode::Gone, holder_state);
                states.send_if_modified(|g| g.insert(name.clone(), state) != Some(state));
            }));
            self.holder_tasks.insert(h.clone(), task);
        }
        next_look
    }
}

impl Agent {
    /// Starts the watches of an engaged agent: the Nodes labelled as lock holders, its own
    /// Node, the lock Leases, the policy ConfigMap (the pods and the budgets start with a
    /// health gate, see [`Agent::watch_pods`]).
    pub(super) fn engage(&self) -> Watches {
        let (node_tx, _) = watch::channel(NodeState::default());
        let (lease_tx, _) = watch::channel(LeaseState::default());
        let (policy_tx, _) = watch::channel(PolicyState::default());
        let (holders_tx, _) = watch::channel(BTreeMap::new());
        let (labelled_tx, _) = watch::channel(BTreeMap::<String, Labelled>::new());
        let lock_tasks = self.lock_watches(&lease_tx, &labelled_tx);
        let tasks = vec![
            tokio::spawn(follow_own_node(
                self.node_api(),
                self.cfg.node_name.clone(),
                node_tx.clone(),
            )),
            tokio::spawn(follow_named(
                Api::<ConfigMap>::namespaced(self.client.clone(), &self.cfg.namespace),
                self.cfg.config_map.clone(),
                "policy ConfigMap",
                self.policy_applier(policy_tx.clone()),
            )),
        ];
        let (pods_tx, _) = watch::channel(None);
        let (budgets_tx, _) = watch::channel(None);
        Watches {
            node: node_tx,
            leases: lease_tx,
            policy: policy_tx,
            holder_nodes: holders_tx,
            labelled_holders: labelled_tx,
            unlabelled_since: BTreeMap::new(),
            holder_tasks: BTreeMap::new(),
            tasks,
            lock_tasks,
            pods: pods_tx,
            pods_watched: false,
            budgets: budgets_tx,
            budgets_watched: false,
        }
    }

    /// Starts the watches of the whole lock: its Leases, and the Nodes labelled as its holders.
    fn lock_watches(
        &self,
        leases: &watch::Sender<LeaseState>,
        labelled: &watch::Sender<BTreeMap<String, Labelled>>,
    ) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(watch_labelled_holders(self.node_api(), labelled.clone())),
            tokio::spawn(watch_leases(
                Api::namespaced(self.client.clone(), &self.cfg.namespace),
                format!("{}={}", lock::LOCK_LABEL, self.cfg.lock_name),
                leases.clone(),
            )),
        ]
    }

    /// Restarts the watches of the whole lock after a doze (see [`Watches::doze`]). The Leases
    /// are listed again before the next decision; what was seen of each Lease's version is kept,
    /// so a version unchanged since before the doze keeps its age (expiry is judged by it).
    pub(super) fn wake(&self, w: &mut Watches) {
        if w.lock_tasks.is_empty() {
            w.lock_tasks = self.lock_watches(&w.leases, &w.labelled_holders);
        }
    }

    /// What the policy ConfigMap's watch does with each version: the pause (read whether or
    /// not the policy is valid), and the policy if valid; an invalid one is reported (log,
    /// Event, `config_valid 0`) and the last good policy stays in force.
    fn policy_applier(&self, tx: watch::Sender<PolicyState>) -> impl FnMut(Option<ConfigMap>) + use<> {
        let cm_name = self.cfg.config_map.clone();
        let metrics = self.metrics.clone();
        let events = self.events.clone();
        let namespace = self.cfg.namespace.clone();
        let me = self.cfg.node_name.clone();
        let has_prometheus = self.cfg.blockers.prometheus.is_some();
        move |cm: Option<ConfigMap>| {
            let cm = cm.as_ref();
            let paused = pause::of_config_map(cm);
            if paused != tx.borrow().paused {
                match &paused {
                    Some(p) => info!(node = %me, pause = %p.describe(), "reboots paused"),
                    None => info!(node = %me, "reboots not paused"),
                }
            }
            match read_policy(&namespace, &cm_name, cm, has_prometheus) {
                Ok(p) => {
                    info!(configmap = %cm_name, present = cm.is_some(), "policy loaded");
                    metrics.set(&metrics.config_valid, 1);
                    metrics
                        .config_last_reload
                        .with_label_values(&[metrics.node()])
                        .set(Utc::now().timestamp() as f64);
                    tx.send_modify(|s| {
                        s.synced = true;
                        s.policy = Some(p);
                        s.paused = paused;
                    });
                }
                Err(message) => {
                    error!(configmap = %cm_name, %message, "policy rejected; the last good policy stays in force");
                    metrics.set(&metrics.config_valid, 0);
                    events.about(
                        Reason::ConfigInvalid,
                        format!("{message}; the last good policy stays in force"),
                        ObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("ConfigMap".into()),
                            name: Some(cm_name.clone()),
                            namespace: Some(namespace.clone()),
                            ..ObjectReference::default()
                        },
                    );
                    tx.send_modify(|s| {
                        s.synced = true;
                        s.paused = paused;
                    });
                }
            }
        }
    }

    /// Starts the watch of the pods bound to this node (for the health gate), once.
    pub(super) fn watch_pods(&self, w: &mut Watches) {
        if w.pods_watched {
            return;
        }
        w.pods_watched = true;
        let selector = format!("spec.nodeName={}", self.cfg.node_name);
        w.tasks.push(tokio::spawn(publish_list(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&selector),
            w.pods.clone(),
            "the node's pods",
        )));
    }

    /// Starts the watch of the PodDisruptionBudgets (for the health gate's budget check), once.
    /// Every namespace: the budgets the drain touched may be anywhere, and the gate holds only
    /// for minutes.
    pub(super) fn watch_budgets(&self, w: &mut Watches) {
        if w.budgets_watched {
            return;
        }
        w.budgets_watched = true;
        w.tasks.push(tokio::spawn(publish_list(
            Api::<PodDisruptionBudget>::all(self.client.clone()),
            watcher::Config::default(),
            w.budgets.clone(),
            "PodDisruptionBudgets",
        )));
    }
}

/// The policy in the ConfigMap `namespace/cm_name` (the default policy without one), or why
/// it is refused.
fn read_policy(
    namespace: &str,
    cm_name: &str,
    cm: Option<&ConfigMap>,
    has_prometheus: bool,
) -> Result<Policy, String> {
    let parsed = match cm {
        None => Ok(Policy::default()),
        Some(cm) => crate::policy::document_of(&format!("{namespace}/{cm_name}"), cm)
            .and_then(|doc| Policy::parse(doc).map_err(|e| e.to_string())),
    };
    // A gate query needs a Prometheus to ask. Without one every rebooted node of the
    // rule would sit in its gate until the timeout and stop the rollout there: refuse
    // the policy now, where the operator sees it (Event, config_valid 0).
    parsed.and_then(|p| match p.gate_queries().first() {
        Some(path) if !has_prometheus => Err(format!(
            "invalid policy at {path}: a gate query needs the agent's --prometheus-url, which is not set"
        )),
        _ => Ok(p),
    })
}

/// Nodes labelled as lock holders: their cycle state while they carry the label.
async fn watch_labelled_holders(api: Api<Node>, tx: watch::Sender<BTreeMap<String, Labelled>>) {
    let selector = format!("{}=true", node::LABEL_HOLDER);
    let stream = watcher(api, from_cache(watcher::Config::default().labels(&selector))).default_backoff();
    futures::pin_mut!(stream);
    let holding = |n: &Node| Labelled::Holding(holder_state(n));
    let mut listing = BTreeMap::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(n)) => {
                listing.insert(n.name_any(), holding(&n));
            }
            Ok(watcher::Event::InitDone) => tx.send_modify(|m| {
                // A Node labelled before and missing from the new list left the watch
                // while it was down: deleted or unlabelled, as a DELETED event.
                let mut fresh = std::mem::take(&mut listing);
                for name in m.keys() {
                    fresh.entry(name.clone()).or_insert(Labelled::Left);
                }
                *m = fresh;
            }),
            Ok(watcher::Event::Apply(n)) => {
                let st = holding(&n);
                tx.send_if_modified(|m| m.insert(n.name_any(), st) != Some(st));
            }
            Ok(watcher::Event::Delete(n)) => {
                // Deleted, or merely no longer labelled: the event cannot tell (it
                // carries the last labelled state either way). See `Labelled::Left`.
                tx.send_if_modified(|m| m.insert(n.name_any(), Labelled::Left) != Some(Labelled::Left));
            }
            Err(e) => debug!(error = %e, "watch of lock holders' Nodes failed; retrying"),
        }
    }
}

/// The agent's own Node (never moved backwards, see [`newer`]).
async fn follow_own_node(api: Api<Node>, name: String, tx: watch::Sender<NodeState>) {
    follow_named(api, name, "own Node", move |n| {
        tx.send_modify(|s| {
            s.synced = true;
            match n {
                Some(n) => {
                    let current = s
                        .node
                        .as_ref()
                        .and_then(|o| o.metadata.resource_version.as_deref());
                    if newer(current, n.metadata.resource_version.as_deref()) {
                        s.node = Some(n);
                    }
                }
                None => s.node = None,
            }
        })
    })
    .await
}

/// The lock's Leases (those labelled `selector`), each kept at its newest version.
async fn watch_leases(api: Api<Lease>, selector: String, tx: watch::Sender<LeaseState>) {
    let stream = watcher(api, from_cache(watcher::Config::default().labels(&selector))).default_backoff();
    futures::pin_mut!(stream);
    let mut listing = BTreeMap::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(l)) => {
                listing.insert(l.name_any(), l);
            }
            Ok(watcher::Event::InitDone) => tx.send_modify(|s| {
                s.synced = true;
                let now = Instant::now();
                s.leases.retain(|name, _| listing.contains_key(name));
                for l in std::mem::take(&mut listing).into_values() {
                    s.put(l, now);
                }
            }),
            Ok(watcher::Event::Apply(l)) => tx.send_modify(|s| s.put(l, Instant::now())),
            Ok(watcher::Event::Delete(l)) => tx.send_modify(|s| {
                s.leases.remove(&l.name_any());
            }),
            Err(e) => warn!(error = %e, "watch of lock Leases failed; retrying with back-off"),
        }
    }
}

/// What a waiter makes of a lock holder's Node.
pub(super) fn holder_state(n: &Node) -> lock::HolderNode {
    if node::view(n).recorded.phase == Phase::Idle {
        lock::HolderNode::Idle
    } else {
        lock::HolderNode::InCycle
    }
}

/// Follows one named object through a watch: `on(Some(object))` for every version seen,
/// `on(None)` when it does not exist (a list without it, or a deletion). Runs until aborted;
/// watch errors are retried with back-off.
pub(super) async fn follow_named<K>(api: Api<K>, name: String, what: &'static str, on: impl FnMut(Option<K>))
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    follow_named_for(api, name, what, None, on).await;
}

/// [`follow_named`] with the watch renewed every `timeout_secs` (kube-rs' 290 s when None).
pub(super) async fn follow_named_for<K>(
    api: Api<K>,
    name: String,
    what: &'static str,
    timeout_secs: Option<u32>,
    mut on: impl FnMut(Option<K>),
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut config = from_cache(watcher::Config::default().fields(&format!("metadata.name={name}")));
    config.timeout = timeout_secs.or(config.timeout);
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut seen = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                seen = true;
                on(Some(o));
            }
            Ok(watcher::Event::InitDone) if !seen => on(None),
            Ok(watcher::Event::InitDone) => {}
            Ok(watcher::Event::Delete(_)) => on(None),
            Err(e) => warn!(error = %e, what, %name, "watch failed; retrying with back-off"),
        }
    }
}

/// `cfg` with its lists served from kube-apiserver's watch cache (`resourceVersion=0`), as
/// client-go's informers list. Without it every list of a watch is a consistent read, which
/// kube-apiserver serves only once its cache has caught up with etcd (else from etcd itself):
/// measured with 5,000 agents engaging in the same second on the real kube-apiserver, those
/// lists (the labelled holders' Nodes, holders by name) failed by the thousand with 500 and
/// were retried, and in 3 minutes no node took a slot. A list a moment old is safe for these
/// watches: the watch goes on from it to the present, a decision is carried out by a write
/// conditional on the version it was made on, and a slot is taken over only after a fresh read
/// of its holder's Node (`Cycle::check_expired_holder`).
pub(super) fn from_cache(cfg: watcher::Config) -> watcher::Config {
    let mut cfg = cfg.any_semantic();
    // kube-rs sends `resourceVersion=0` only in a list without a page size (it leaves it out
    // of a paged one). These lists are small: a lock's Leases and holders, one object by name.
    cfg.page_size = None;
    cfg
}

/// Lists and watches `api` (narrowed by `cfg`) and publishes the whole collection on `tx`:
/// once listed, then on every change (never a half-done relist). Runs until aborted; watch
/// errors are retried with back-off.
pub(super) async fn publish_list<K>(
    api: Api<K>,
    cfg: watcher::Config,
    tx: watch::Sender<Option<Vec<K>>>,
    what: &'static str,
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let stream = watcher(api, cfg).default_backoff();
    futures::pin_mut!(stream);
    let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
    let mut items: BTreeMap<(String, String), K> = BTreeMap::new();
    let mut listing = BTreeMap::new();
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(o)) => {
                listing.insert(key(&o), o);
                continue;
            }
            Ok(watcher::Event::InitDone) => items = std::mem::take(&mut listing),
            Ok(watcher::Event::Apply(o)) => {
                items.insert(key(&o), o);
            }
            Ok(watcher::Event::Delete(o)) => {
                items.remove(&key(&o));
            }
            Err(e) => {
                warn!(error = %e, "watch of {what} failed; retrying with back-off");
                continue;
            }
        }
        tx.send_replace(Some(items.values().cloned().collect()));
    }
}
