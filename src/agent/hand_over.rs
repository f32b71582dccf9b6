//! Releasing a lock slot and handing it over: the slots this node holds go to one of the nodes
//! that have waited longest for that very slot (one write, no race; see
//! [`node::pick_successor`]), or are freed when nobody waits, the cluster is paused, or the
//! slot no longer exists for the pool as it is now.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

/// Hands on (or releases) every slot this node holds: its cap slot first, then its group's
/// (while the cap slot is still held, its group slot cannot be taken by a group waiter that
/// then finds the cap full because of this very node).
pub(super) async fn release(agent: &Agent, w: &Watches) -> Result<(), StepError> {
    let mut held = w.leases.borrow().held_by(&agent.cfg.node_name);
    held.sort_by_key(|l| !lock::is_cap_slot(&agent.cfg.lock_name, &l.name_any()));
    for lease in held {
        pass_on(agent, w, lease).await?;
    }
    Ok(())
}

/// The size of the pool a percentage budget is a share of, counted for a hand-over (the rule's
/// nodes over all its groups when `whole_rule`, for a cap slot). None when it cannot be counted:
/// the hand-over then knows of slot 0 only, the cautious answer.
async fn pool_for_hand_over(
    agent: &Agent,
    policy: &Policy,
    labels: &crate::policy::Labels,
    whole_rule: bool,
) -> Option<usize> {
    match agent.count_pool(policy, labels, whole_rule).await {
        Ok(n) => Some(n),
        Err(e) => {
            let (what, slot) = if whole_rule {
                ("the rule's nodes", "cap slot 0")
            } else {
                ("the rule's pool", "slot 0")
            };
            warn!(error = %e, "cannot count {what}; handing over {slot} only");
            None
        }
    }
}

/// Who holds the lock's slots: of any slot, and of cap slots alone.
struct Holders {
    any: Vec<String>,
    cap: Vec<String>,
}

impl Holders {
    /// The holders as the Leases' cache has them.
    fn of(w: &Watches, lock_name: &str) -> Holders {
        let s = w.leases.borrow();
        let of = |cap: Option<bool>| -> Vec<String> {
            s.leases
                .values()
                .filter(|l| cap.is_none_or(|c| lock::is_cap_slot(lock_name, &l.name_any()) == c))
                .filter_map(|l| lock::holder(l).map(str::to_owned))
                .collect()
        };
        Holders {
            any: of(None),
            cap: of(Some(true)),
        }
    }
}

/// Hands `lease` (held by this node) to one of the longest waiters, or releases it if nobody
/// waits.
async fn pass_on(agent: &Agent, w: &Watches, lease: Lease) -> Result<(), StepError> {
    let lock = agent.lease_lock();
    let holders = Holders::of(w, &agent.cfg.lock_name);
    let (policy, paused) = {
        let p = w.policy.borrow();
        (p.policy.clone(), p.paused.is_some())
    };
    let my_labels = w
        .node
        .borrow()
        .node
        .as_ref()
        .map(|n| n.labels().clone())
        .unwrap_or_default();
    // A percentage budget: the slots that exist for the pool as it is now. A slot beyond them
    // (the pool shrank) is handed to nobody (no waiter's set contains it) and is released.
    let pool = match policy.as_ref() {
        Some(p) if Agent::needs_pool(Some(p), &my_labels) => {
            pool_for_hand_over(agent, p, &my_labels, false).await
        }
        _ => None,
    };
    let now = agent.clock.now();
    if paused {
        // Paused: a waiter handed this slot would only give it back (and hand it to the next,
        // and so on). Free it; after the resume the waiters take it as a free slot.
        return release_only(agent, w, &lock, lease, now).await;
    }
    // Hand the slot to the node that has waited longest, if any: one write, no race. Their
    // metadata only (names, labels, since when they wait): every hand-over lists every waiter,
    // and a whole Node is several times its metadata.
    let waiting = ListParams::default().labels(&node::waiting_selector());
    match agent.node_api().list_metadata(&waiting).await {
        Ok(list) => {
            let slot = lease.name_any();
            let (next, eligible) = successor(
                agent,
                &slot,
                list.items.into_iter().map(|n| n.metadata).collect(),
                policy.as_ref(),
                &my_labels,
                pool,
                &holders,
            )
            .await;
            if let Some(next) = next {
                // The others still waiting for this slot: the waiters doze when it is long.
                let queue = eligible.saturating_sub(1);
                match lock.hand_off(&lease, &next, queue, now).await {
                    Ok(l) => {
                        info!(node = %agent.cfg.node_name, lease = %l.name_any(), successor = %next, "lock handed over");
                        w.set_lease(l, Instant::now());
                        return Ok(());
                    }
                    Err(lock::LockError::Conflict { .. }) => return Err(StepError::Stale),
                    Err(e) => warn!(error = %e, "hand-over failed; releasing instead"),
                }
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list waiting nodes; releasing the lock instead of handing it over")
        }
    }
    release_only(agent, w, &lock, lease, now).await
}

/// The waiter `slot` is handed to, from the `waiting` Nodes: one of the longest waiters among
/// those that compete for this very slot (`my_labels` and `pool`: this node's labels and the size of
/// its pool, for a percentage budget); and how many Nodes wait for it (the chosen one included).
async fn successor(
    agent: &Agent,
    slot: &String,
    waiting: Vec<ObjectMeta>,
    policy: Option<&Policy>,
    my_labels: &crate::policy::Labels,
    pool: Option<usize>,
    holders: &Holders,
) -> (Option<String>, usize) {
    let lock_name = &agent.cfg.lock_name;
    if lock::is_cap_slot(lock_name, slot) {
        // A cap slot: only to a waiter of the same rule that holds its group's slot
        // and waits for a cap slot (it starts at once). A percentage cap: the slots
        // that exist for the rule's nodes as they are now (a cap slot beyond them, the
        // rule having shrunk, is handed to nobody and released).
        let rule_pool = match policy {
            Some(p) if Agent::needs_rule_pool(Some(p), my_labels) => {
                pool_for_hand_over(agent, p, my_labels, true).await
            }
            _ => None,
        };
        let eligible: Vec<ObjectMeta> = waiting
            .into_iter()
            .filter(|n| {
                let rule = policy.map(|p| p.rule_for(labels_of(n)));
                lock::cap_slot_set(lock_name, rule.as_ref(), rule_pool).is_some_and(|c| c.contains(slot))
                    && n.name.as_ref().is_some_and(|name| holders.any.contains(name))
            })
            .collect();
        (
            node::pick_successor(
                &eligible,
                &agent.cfg.node_name,
                &holders.cap,
                slot,
                spread(holders.cap.len()),
            ),
            eligible.len(),
        )
    } else {
        // Only a waiter that competes for this very slot (same lock group or rule).
        let eligible: Vec<ObjectMeta> = waiting
            .into_iter()
            .filter(|n| agent.slots_for(policy, labels_of(n), pool).contains(slot))
            .collect();
        (
            node::pick_successor(
                &eligible,
                &agent.cfg.node_name,
                &holders.any,
                slot,
                spread(holders.any.len()),
            ),
            eligible.len(),
        )
    }
}

/// The labels of a waiter's metadata (none: an empty set).
fn labels_of(n: &ObjectMeta) -> &crate::policy::Labels {
    static NONE: crate::policy::Labels = BTreeMap::new();
    n.labels.as_ref().unwrap_or(&NONE)
}

/// Over how many of the longest waiters a hand-off is spread (see [`node::pick_successor`]),
/// given how many slots are held: one slot hands to the longest waiter (nothing is handed at
/// the same moment); several, over four times as many waiters.
fn spread(slots_held: usize) -> usize {
    if slots_held <= 1 { 1 } else { 4 * slots_held }
}

/// Frees `lease` (held by this node) without naming a successor.
async fn release_only(
    agent: &Agent,
    w: &Watches,
    lock: &LeaseLock,
    lease: Lease,
    now: DateTime<Utc>,
) -> Result<(), StepError> {
    match lock.release(&lease, now).await {
        Ok(Some(l)) => {
            info!(node = %agent.cfg.node_name, lease = %l.name_any(), "lock released");
            w.set_lease(l, Instant::now());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(lock::LockError::Conflict { .. }) => Err(StepError::Stale),
        Err(e) => Err(StepError::Api(e.to_string())),
    }
}

impl Cycle<'_> {
    /// Two holders finishing at once may both hand their slot to this node: keep one (and one
    /// cap slot), pass any other on at once (and end the turn). `Ok` when there is none.
    pub(super) async fn pass_on_extra_slot(&mut self, t: &Turn) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let Some(extra) = all_slots(&t.slots, &t.leases)
            .iter()
            .filter(|n| Some(*n) != t.held.as_ref() && Some(*n) != t.held_cap.as_ref())
            .find(|n| t.leases.get(*n).and_then(lock::holder) == Some(me.as_str()))
            .and_then(|n| t.leases.get(n).cloned())
            .filter(|_| !agent.cfg.dry_run)
        else {
            return Ok(());
        };
        info!(node = %me, lease = %extra.name_any(), "handed a second slot; passing it on");
        match pass_on(agent, &self.w, extra).await {
            Ok(()) | Err(StepError::Shutdown) => {}
            Err(StepError::Stale) => {
                if wait_briefly(&self.w, &self.run.shutdown).await.is_err() {
                    return Err(Next::Shutdown);
                }
            }
            Err(StepError::Api(e)) => {
                warn!(node = %me, error = %e, "failed to pass on a second slot");
                self.sleep_backoff().await;
            }
        }
        Err(Next::Decide)
    }
}
