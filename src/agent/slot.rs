//! Taking a lock slot (`Action::AcquireLock`): the slot set a node competes for (its lock
//! group's or rule's slots, then the rule's cap slots; a percentage budget counted over its
//! pool), a free slot taken after a short random delay and a fresh look at its holder, or the
//! queue joined and waited in (the holder hands its slot to the longest waiter).

use super::*;

/// How old a count of a node's pool (for a percentage `concurrency`) may be while the node
/// waits for a slot: a waiter counts again at most this often (and at least this often, to see
/// a pool that grew). One metadata-only Node list, served from the API server's watch cache.
const POOL_MAX_AGE: Duration = Duration::from_secs(60);

/// How old that count may be when the node is about to take a slot: a shrunken pool must not
/// hand out a slot it no longer has, so the count is redone unless it is this fresh.
const POOL_FRESH: Duration = Duration::from_secs(2);

/// How long a count of the lock queue ([`Cycle::queue_at_least`]) stands while the node
/// waits.
const QUEUE_COUNT_MAX_AGE: Duration = Duration::from_secs(60);

/// Upper bound of the random delay before trying a free lock slot (see
/// [`Cycle::take_free_slot`]).
const FREE_SLOT_JITTER_MS: u64 = 200;

/// The last count of this node's pool, for a percentage `concurrency`; valid for the policy
/// and the labels it was made for.
pub(super) struct PoolCount {
    policy: Policy,
    labels: crate::policy::Labels,
    size: usize,
    at: Instant,
}

impl PoolCount {
    /// The pool's size, counted again when the last count is older than `max_age` or was made
    /// for another policy or other labels. `whole_rule`: the rule's nodes over all its groups
    /// (a percentage `maxConcurrent`) instead of the nodes sharing this node's slots; a cache
    /// holds one kind only.
    async fn size(
        cache: &mut Option<PoolCount>,
        agent: &Agent,
        policy: &Policy,
        labels: &crate::policy::Labels,
        max_age: Duration,
        whole_rule: bool,
    ) -> Result<(usize, Instant), kube::Error> {
        if let Some(c) = cache.as_ref()
            && c.at.elapsed() <= max_age
            && c.policy == *policy
            && c.labels == *labels
        {
            return Ok((c.size, c.at));
        }
        let size = agent.count_pool(policy, labels, whole_rule).await?;
        let at = Instant::now();
        *cache = Some(PoolCount {
            policy: policy.clone(),
            labels: labels.clone(),
            size,
            at,
        });
        Ok((size, at))
    }
}

impl Agent {
    /// The slots a node with `labels` competes for under `policy` (lock groups and per-rule
    /// concurrency have their own); `pool` is the size of its pool, for a percentage budget.
    pub(super) fn slots_for(
        &self,
        policy: Option<&Policy>,
        labels: &crate::policy::Labels,
        pool: Option<usize>,
    ) -> Vec<String> {
        let rule = policy.map(|p| p.rule_for(labels));
        lock::slot_set(&self.cfg.lock_name, self.cfg.concurrency, rule.as_ref(), pool)
    }

    /// Counts the nodes that share lock slots with a node labelled `labels` (for a percentage
    /// `concurrency`). The agent keeps no Node cache (an idle agent holds no watch, and a
    /// waiter watches only lock holders), so it lists: metadata only (no status, no spec: about
    /// a tenth of a full Node), narrowed by the rule's selector (and the group's label), and at
    /// resourceVersion 0, so the API server answers from its watch cache without reading etcd.
    /// It is asked only by a node that competes for a slot or hands one over, at most once a
    /// [`POOL_MAX_AGE`] while it waits.
    ///
    /// `whole_rule`: counts instead the nodes of the rule over all its lock groups (the pool of a
    /// percentage `lockGroup.maxConcurrent`).
    pub(super) async fn count_pool(
        &self,
        policy: &Policy,
        labels: &crate::policy::Labels,
        whole_rule: bool,
    ) -> Result<usize, kube::Error> {
        let selector = if whole_rule {
            policy.rule_pool_selector(labels)
        } else {
            policy.pool_selector(labels)
        };
        let params = ListParams::default().labels(&selector).match_any();
        let list = self.node_api().list_metadata(&params).await?;
        let empty = BTreeMap::new();
        let nodes = list
            .items
            .iter()
            .map(|n| n.metadata.labels.as_ref().unwrap_or(&empty));
        Ok(if whole_rule {
            policy.rule_pool_size(labels, nodes)
        } else {
            policy.pool_size(labels, nodes)
        })
    }

    /// Whether a node with `labels` has a percentage `lockGroup.maxConcurrent` under `policy`
    /// (its cap slots depend on the number of the rule's nodes).
    pub(super) fn needs_rule_pool(policy: Option<&Policy>, labels: &crate::policy::Labels) -> bool {
        policy
            .and_then(|p| p.rule_for(labels).lock_group)
            .and_then(|g| g.max_concurrent)
            .is_some_and(crate::policy::Budget::needs_pool)
    }

    /// Whether a node with `labels` has a percentage budget under `policy` (its slots depend on
    /// the size of its pool).
    pub(super) fn needs_pool(policy: Option<&Policy>, labels: &crate::policy::Labels) -> bool {
        policy
            .and_then(|p| p.rule_for(labels).concurrency)
            .is_some_and(crate::policy::Budget::needs_pool)
    }
}

/// `slots` and every other Lease of the lock, sorted (the slot set follows the policy; a slot
/// of an earlier set may still be held).
pub(super) fn all_slots(slots: &[String], leases: &BTreeMap<String, Lease>) -> Vec<String> {
    let mut all: BTreeSet<String> = slots.iter().cloned().collect();
    all.extend(leases.keys().cloned());
    all.into_iter().collect()
}

impl Cycle<'_> {
    /// Takes a slot (`Action::AcquireLock`): a group slot handed over to a node that waits
    /// for a cap slot is claimed first; else the node competes for a slot of its set and takes
    /// a free one, or queues for one.
    pub(super) async fn take_slot(&mut self, t: &Turn) -> Stepped {
        let agent = self.agent;
        if t.partial
            && let Some((slot, lease)) = t
                .held
                .as_ref()
                .and_then(|h| t.leases.get(h).map(|l| (h, l)))
                .filter(|(_, l)| agent.lease_lock().needs_claim(l))
        {
            return Ok(self.claim_handed_over(t, slot, lease).await);
        }
        let (slots, counted_at) = self.slots_to_compete(t).await?;
        let in_my_order = lock::preference_order(&slots, &agent.cfg.node_name);
        let picked = lock::pick_slot(&in_my_order, &t.leases, &t.seen, t.now, Instant::now(), |h| {
            self.w.holder_node(h)
        });
        if picked.is_some() && counted_at.is_some_and(|at| at.elapsed() > POOL_FRESH) {
            // About to take a slot on an old count: count again first (a pool that
            // shrank has fewer slots), then decide again.
            self.pool_count = None;
            self.rule_pool_count = None;
            return Err(Next::Decide);
        }
        match picked {
            Some(slot) => self.take_free_slot(t, slot).await,
            None => self.queue_for_slot(t, &slots, counted_at).await,
        }
    }

    /// The group's slot was handed over (short duration): claim it with the full TTL before
    /// waiting for a cap slot, or it would expire meanwhile.
    async fn claim_handed_over(&self, t: &Turn, slot: &String, lease: &Lease) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        match agent.lease_lock().acquire(slot, Some(lease), t.now).await {
            Ok(l) => {
                info!(node = %me, lease = %slot, "lock handed over and claimed; waiting for a cap slot");
                self.w.set_lease(l, Instant::now());
                agent
                    .events
                    .node(Reason::LockAcquired, format!("reboot lock {slot} handed over"));
                Ok(())
            }
            Err(lock::LockError::Conflict { .. }) => wait_briefly(&self.w, &self.run.shutdown).await,
            Err(e) => Err(StepError::Api(e.to_string())),
        }
    }

    /// The slots this node competes for, and when its pool was counted (for a percentage
    /// budget). A count that fails ends the turn after the back-off: no count, no slot.
    async fn slots_to_compete(&mut self, t: &Turn) -> Result<(Vec<String>, Option<Instant>), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let labels = &t.view.labels;
        let pooled = !t.partial && Agent::needs_pool(t.policy.as_ref(), labels);
        match t.policy.as_ref().filter(|_| pooled) {
            // Holding the group's slot: compete for a cap slot; a percentage cap is a
            // share of the rule's nodes, counted (as the group's pool is) first.
            None if t.partial => match t
                .policy
                .as_ref()
                .filter(|p| Agent::needs_rule_pool(Some(p), labels))
            {
                None => Ok((t.cap_slots.clone().unwrap_or_default(), None)),
                Some(p) => {
                    match PoolCount::size(&mut self.rule_pool_count, agent, p, labels, POOL_MAX_AGE, true)
                        .await
                    {
                        Ok((size, at)) => {
                            let rule = p.rule_for(labels);
                            let cap = lock::cap_slot_set(&agent.cfg.lock_name, Some(&rule), Some(size));
                            Ok((cap.unwrap_or_default(), Some(at)))
                        }
                        Err(e) => {
                            // No count, no cap slot: the cap cannot be known.
                            warn!(node = %me, error = %e, "cannot count the nodes of the rule");
                            self.back_off().await?;
                            Err(Next::Decide)
                        }
                    }
                }
            },
            None => Ok((t.slots.clone(), None)),
            Some(p) => {
                match PoolCount::size(&mut self.pool_count, agent, p, labels, POOL_MAX_AGE, false).await {
                    Ok((size, at)) => Ok((agent.slots_for(t.policy.as_ref(), labels, Some(size)), Some(at))),
                    Err(e) => {
                        // No count, no slot: the budget cannot be known.
                        warn!(node = %me, error = %e, "cannot count the nodes of the rule's pool");
                        self.back_off().await?;
                        Err(Next::Decide)
                    }
                }
            }
        }
    }

    /// Takes the free (or expired) `slot`. Slots normally pass from holder to waiter
    /// directly; a free slot means start-up or a holder that could not hand over. A short
    /// random delay keeps many waiters from racing for it at once: whoever goes first is seen
    /// through the watch by the others.
    async fn take_free_slot(&mut self, t: &Turn, slot: String) -> Stepped {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let jitter = Duration::from_millis(rand::random_range(0..FREE_SLOT_JITTER_MS));
        let mut lease_rx = self.w.leases.subscribe();
        tokio::select! {
            _ = self.run.shutdown.cancelled() => return Err(Next::Shutdown),
            _ = lease_rx.changed() => return Err(Next::Decide),
            _ = tokio::time::sleep(jitter) => {}
        }
        self.check_expired_holder(t, &slot).await?;
        match agent
            .lease_lock()
            .acquire(&slot, t.leases.get(&slot), t.now)
            .await
        {
            Ok(lease) => {
                info!(node = %me, lease = %slot, "lock acquired");
                self.w.set_lease(lease, Instant::now());
                agent
                    .events
                    .node(Reason::LockAcquired, format!("acquired reboot lock {slot}"));
                Ok(Ok(()))
            }
            Err(lock::LockError::Conflict { .. }) => {
                debug!(node = %me, lease = %slot, "lost the race for the lock");
                Ok(wait_briefly(&self.w, &self.run.shutdown).await)
            }
            Err(e) => Ok(Err(StepError::Api(e.to_string()))),
        }
    }

    /// Taking over another node's slot (expired, or its Node gone): the watches said its
    /// holder is idle or gone, but a watch can lag (a slow or restarted API server, etcd
    /// stopped): read the holder's Node afresh, and take the slot only if it really records no
    /// cycle. Found by the chaos run on the real control plane: a waiter took an expired slot
    /// whose holder had cordoned itself 13 ms after taking it, a cordon its watch had not yet
    /// delivered: three nodes out of two. `Ok` when the slot may be taken.
    async fn check_expired_holder(&mut self, t: &Turn, slot: &String) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let Some(holder) = t
            .leases
            .get(slot)
            .and_then(lock::holder)
            .filter(|h| *h != me.as_str())
        else {
            return Ok(());
        };
        match agent.node_api().get_opt(holder).await {
            Ok(Some(n)) if watches::holder_state(&n) != lock::HolderNode::Idle => {
                info!(node = %me, lease = %slot, %holder, "the expired slot's holder is still in its cycle; not taking it");
                if wait_briefly(&self.w, &self.run.shutdown).await.is_err() {
                    return Err(Next::Shutdown);
                }
                Err(Next::Decide)
            }
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(node = %me, %holder, error = %e, "cannot read the expired slot's holder");
                self.sleep_backoff().await;
                Err(Next::Decide)
            }
        }
    }

    /// Dozes in a long queue (see [`lock::doze_period`]) until a slot is handed to this node,
    /// `until`, a change of the sentinel or the policy, or shutdown; then looks at the whole
    /// lock again. Only the node's own Node, the policy and the Leases handed to this node are
    /// watched meanwhile.
    async fn doze(&mut self, until: Option<Instant>) -> Stepped {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        self.w.doze();
        debug!(node = %me, wakes_in = ?until.map(|u| u.saturating_duration_since(Instant::now())), "dozing in the lock queue until a slot is handed over");
        let (handed_tx, mut handed) = watch::channel(false);
        let _handed_watch = AbortOnDrop(tokio::spawn(watch_handed_to(
            Api::namespaced(agent.client.clone(), &agent.cfg.namespace),
            format!(
                "{}={},{}={me}",
                lock::LOCK_LABEL,
                agent.cfg.lock_name,
                lock::LABEL_HANDED_TO
            ),
            me.clone(),
            handed_tx,
        )));
        // The ConfigMap's watch republishes the same policy at each renewal: only a change
        // (a new policy, a pause or a resume) ends the doze.
        let mut policy = self.w.policy.subscribe();
        let before = {
            let p = policy.borrow_and_update();
            (p.policy.clone(), p.paused.clone())
        };
        let run = &mut *self.run;
        let sleep = async {
            match until {
                Some(u) => tokio::time::sleep_until(u).await,
                None => std::future::pending().await,
            }
        };
        let shutdown = tokio::select! {
            _ = run.shutdown.cancelled() => true,
            _ = handed.wait_for(|h| *h) => false,
            _ = sleep => false,
            // A closed sentinel channel changes nothing (and must not end every doze at once).
            _ = async {
                if run.sentinel.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => false,
            _ = policy.wait_for(|p| (&p.policy, &p.paused) != (&before.0, &before.1)) => false,
        };
        agent.wake(&mut self.w);
        if shutdown {
            return Err(Next::Shutdown);
        }
        Err(Next::Decide)
    }

    /// No slot free: join the queue (a holder hands its slot to one of the longest waiters)
    /// and wait: in a long queue by dozing (see [`Cycle::doze`]); else for a Lease change, a
    /// slot's expiry, the window's next transition, a look at the holders' Nodes, or a recount
    /// of the pool.
    async fn queue_for_slot(&mut self, t: &Turn, slots: &[String], counted_at: Option<Instant>) -> Stepped {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let now = t.now;
        let mut queued = view.waiting;
        if !queued {
            // Join the queue: a holder hands its slot to one of the longest waiters.
            let patch = agent.taint_change(node::waiting_patch(Some(now)), view, &t.node, true);
            match agent.patch_node(&patch).await {
                Ok(n) => {
                    self.w.set_node(n);
                    queued = true;
                }
                Err(e) => warn!(node = %me, error = %e, "failed to join the lock queue"),
            }
        }
        agent.metrics.set_state("waiting_for_lock");
        agent.metrics.set_blocked(Some("lock_held_elsewhere"));
        let next_window = t
            .policy
            .as_ref()
            .and_then(|p| p.next_transition(&view.labels, now));
        // A percentage budget: count the pool again now and then, to see
        // it grow (a new slot) without a Lease change.
        let recount = counted_at.map(|at| at + POOL_MAX_AGE);
        let may_doze = queued && t.held.is_none() && t.held_cap.is_none() && lock::fits_label(me);
        let mut queue = lock::queue_length(slots, &t.leases);
        if may_doze && queue < lock::DOZE_MIN_QUEUE {
            queue = queue.max(self.queue_at_least().await);
        }
        if may_doze && let Some(period) = lock::doze_period(queue, rand::random()) {
            let until = next_window
                .map(|d| instant_at(now, d))
                .into_iter()
                .chain(recount)
                .chain([Instant::now() + period])
                .min();
            return self.doze(until).await;
        }
        let look_again = self.w.watch_holders(
            &agent.client,
            &lock::holders(slots, &t.leases, &t.seen, now, Instant::now(), me),
        );
        let expiry = lock::next_expiry(slots, &t.leases, &t.seen, now, Instant::now());
        let deadline = [expiry, next_window]
            .into_iter()
            .flatten()
            .min()
            .map(|d| instant_at(now, d))
            .into_iter()
            .chain(look_again)
            .chain(recount)
            .min();
        self.wait_for_change(deadline).await?;
        Ok(Ok(()))
    }

    /// At least how many other nodes wait in the lock queue, counted up to a long queue's
    /// length ([`lock::DOZE_MIN_QUEUE`]); 0 when the count fails (no doze). The queue's length
    /// is recorded by its hand-offs, and there are none yet at the start of a rollout, when
    /// every node needs its reboot in the same minute: without a count each of them would
    /// watch the whole lock until the first hand-offs, so that every write of the first
    /// holders' cycles went to every node (BENCHMARKS.md: the burst, at 1,000 and 5,000). One
    /// metadata list of the waiting Nodes, cut after that many (kube-apiserver answers one
    /// page and says whether more are left), at most once a [`QUEUE_COUNT_MAX_AGE`]. It counts
    /// the waiters of every lock group and rule, more than compete for this node's slots:
    /// dozing where the queue is in fact shorter delays only the noticing of a slot freed
    /// without a hand-off.
    async fn queue_at_least(&mut self) -> usize {
        if let Some((n, at)) = self.queue_count
            && at.elapsed() <= QUEUE_COUNT_MAX_AGE
        {
            return n;
        }
        let params = ListParams::default()
            .labels(&node::waiting_selector())
            .limit(u32::try_from(lock::DOZE_MIN_QUEUE + 1).unwrap_or(u32::MAX));
        let n = match self.agent.node_api().list_metadata(&params).await {
            Ok(list) => lock::waiters_at_least(
                list.items.iter().filter_map(|n| n.metadata.name.as_deref()),
                list.metadata.continue_.as_deref().is_some_and(|c| !c.is_empty()),
                &self.agent.cfg.node_name,
            ),
            Err(e) => {
                debug!(error = %e, "cannot count the lock queue; not dozing");
                0
            }
        };
        self.queue_count = Some((n, Instant::now()));
        n
    }
}

/// Watches the Leases labelled as handed to `me` (`selector`) and says on `handed` when one of
/// them names `me` as its holder. kube-apiserver sends this watch only those Leases: the other
/// writes of the lock do not reach a dozing waiter.
async fn watch_handed_to(api: Api<Lease>, selector: String, me: String, handed: watch::Sender<bool>) {
    let stream = watcher(
        api,
        watches::from_cache(watcher::Config::default().labels(&selector)),
    )
    .default_backoff();
    futures::pin_mut!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::InitApply(l) | watcher::Event::Apply(l))
                if lock::holder(&l) == Some(me.as_str()) =>
            {
                handed.send_replace(true);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "watch of the Leases handed to this node failed; retrying with back-off")
            }
        }
    }
}
