//! What a turn of the loop sees ([`Turn`]: the caches read once, and which slots this node
//! holds), the [`Observations`] built from it (the health gate's pods, budgets and query; the
//! soak), and the decision with the checks made right before a step that disrupts the node
//! (the preflight, the blockers).
//!
//! Nothing here writes to the cluster: the only calls out are reads (the blockers' check, the
//! gate query), each cached so that a waiting node does not repeat them on every wake-up.

use super::*;

/// What one turn sees: the caches read once, and what follows from them for this node.
pub(super) struct Turn {
    pub(super) now: DateTime<Utc>,
    /// The own Node, as cached.
    pub(super) node: Node,
    pub(super) view: node::NodeView,
    pub(super) sentinel: SentinelState,
    pub(super) policy: Option<Policy>,
    pub(super) paused: Option<Pause>,
    pub(super) window_open: bool,
    /// The node's slot set, without the pool's size (slot 0 only for a percentage budget).
    pub(super) slots: Vec<String>,
    pub(super) leases: BTreeMap<String, Lease>,
    pub(super) seen: lock::Seen,
    /// The rule's cap slots (`lockGroup.maxConcurrent`), cap slot 0 only for a percentage.
    pub(super) cap_slots: Option<Vec<String>>,
    /// The group slot this node holds.
    pub(super) held: Option<String>,
    /// The cap slot this node holds (beside a group slot).
    pub(super) held_cap: Option<String>,
    /// Holding the group's slot but not yet a cap slot: not ready to start.
    pub(super) partial: bool,
    /// An operator's request recorded on the Node.
    pub(super) requested: Option<node::RebootRequest>,
    /// The sentinel or an operator asks for a reboot.
    pub(super) required: bool,
}

impl Cycle<'_> {
    /// Reads the sentinel, the policy and the Leases for this turn.
    pub(super) fn look(&mut self, now: DateTime<Utc>, node: Node, view: node::NodeView) -> Turn {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let sentinel = self.run.sentinel.borrow_and_update().clone();
        let (policy, paused) = {
            let p = self.w.policy.borrow();
            (p.policy.clone(), p.paused.clone())
        };
        let window_open = policy.as_ref().is_some_and(|p| p.is_open(&view.labels, now));
        // Without the pool's size (a percentage budget), slot 0 only: enough to know which
        // slot this node holds (every Lease of the lock is looked at for that); the pool is
        // counted when the node competes for a slot (`Cycle::take_slot`).
        let slots = agent.slots_for(policy.as_ref(), &view.labels, None);
        let (leases, seen) = {
            let s = self.w.leases.borrow();
            (s.leases.clone(), s.seen.clone())
        };
        // A rule with `lockGroup.maxConcurrent`: a node also needs one of the rule's cap
        // slots to start, taken after its group's slot (see `lock::cap_slot_set`).
        // A percentage cap is counted only when a cap slot is competed for (below): slot 0
        // is enough to know which cap slot this node holds (every Lease is looked at).
        let cap_slots = lock::cap_slot_set(
            &agent.cfg.lock_name,
            policy.as_ref().map(|p| p.rule_for(&view.labels)).as_ref(),
            None,
        );
        let is_cap = |n: &String| lock::is_cap_slot(&agent.cfg.lock_name, n);
        // A slot held from before a policy change still counts as held.
        let group_all: Vec<String> = all_slots(&slots, &leases)
            .into_iter()
            .filter(|n| !is_cap(n))
            .collect();
        let held = lock::held_slot(&group_all, &leases, me);
        let cap_all: Vec<String> = all_slots(cap_slots.as_deref().unwrap_or_default(), &leases)
            .into_iter()
            .filter(|n| is_cap(n))
            .collect();
        // A cap slot counts only beside a slot of the group (it is taken second).
        let held_cap = lock::held_slot(&cap_all, &leases, me).filter(|_| held.is_some());
        let partial =
            cap_slots.is_some() && view.recorded.phase == Phase::Idle && held.is_some() && held_cap.is_none();
        let requested = view.recorded.reboot_requested.clone();
        let required = sentinel.required || requested.is_some();
        Turn {
            now,
            node,
            view,
            sentinel,
            policy,
            paused,
            window_open,
            slots,
            leases,
            seen,
            cap_slots,
            held,
            held_cap,
            partial,
            requested,
            required,
        }
    }

    /// The observations [`node::decide`] is asked on.
    pub(super) async fn observe(&mut self, t: &Turn) -> Observations {
        let agent = self.agent;
        let requested = t.requested.is_some();
        self.run
            .requested
            .send_if_modified(|r| std::mem::replace(r, requested) != requested);
        let view = &t.view;
        let mut obs = Observations {
            now: t.now,
            node: view.clone(),
            reboot_required: t.required,
            window_open: t.window_open,
            blocked_by: None,
            // Without its cap slot a node has no lock to start on (it competes for one);
            // a node already in its cycle goes on with its group's slot.
            held_lock: if t.partial { None } else { t.held.clone() },
            kernel_boot_id: (agent.kernel_boot_id)(),
            reboot_loop_backoff: chrono::Duration::from_std(agent.cfg.reboot_loop_backoff)
                .unwrap_or(chrono::Duration::zero()),
            failure_backoff: chrono::Duration::from_std(agent.cfg.failure_backoff)
                .unwrap_or(chrono::Duration::zero()),
            host_access_ok: true,
            paused: t.paused.is_some(),
            soak_until: None,
            health_gate: None,
        };
        self.gate_query_pending = false;
        if view.recorded.phase != Phase::Verifying {
            // A new gate starts with a fresh answer.
            self.gate_query_cache = None;
        }
        if view.recorded.phase == Phase::Verifying {
            self.observe_health_gate(t, &mut obs).await;
        }
        // The rule's soak, counted from the last release of a slot of this node's set (the
        // Leases it watches already carry it). Only for a claimed slot: a slot handed over
        // is claimed (full TTL) first, or it would expire while the node soaks.
        if let Some(slot) = t.held.as_ref()
            && let Some(soak) = t.policy.as_ref().and_then(|p| p.rule_for(&view.labels).soak)
            && [Some(slot), t.held_cap.as_ref()].into_iter().flatten().all(|s| {
                t.leases
                    .get(s)
                    .is_some_and(|l| !agent.lease_lock().needs_claim(l))
            })
        {
            obs.soak_until = lock::soak_until(&t.slots[0], &t.leases, soak);
        }
        obs
    }

    /// The health gate: the Node's Ready condition (own Node watch) and the pods bound to it
    /// (a watch that runs only while the gate holds), the budgets its drain touched, the
    /// rule's gate query.
    async fn observe_health_gate(&mut self, t: &Turn, obs: &mut Observations) {
        let agent = self.agent;
        let view = &t.view;
        agent.watch_pods(&mut self.w);
        let pods = self.w.pods.borrow().clone();
        let rule = t.policy.as_ref().map(|p| p.rule_for(&view.labels));
        obs.health_gate = rule
            .as_ref()
            .and_then(|r| r.health_gate)
            .map(|timeout| HealthGate {
                timeout,
                unhealthy: health::unhealthy(view.ready, pods.as_deref()),
            });
        // The budgets the drain touched, as healthy as before the drain (a watch of the
        // budgets, again only while the gate holds).
        if let Some(gate) = obs.health_gate.as_mut()
            && rule.as_ref().is_some_and(|r| r.health_budgets)
            && !view.recorded.drained_budgets.is_empty()
        {
            agent.watch_budgets(&mut self.w);
            let budgets = self.w.budgets.borrow().clone();
            gate.unhealthy.extend(health::budgets_unhealthy(
                &view.recorded.drained_budgets,
                budgets.as_deref(),
            ));
        }
        // The rule's gate query, once the node and its DaemonSet pods are Ready: asked
        // again after --blocker-check-interval (the wait wakes for it), a recent answer
        // reused when something else woke the loop.
        if let Some(gate) = obs.health_gate.as_mut()
            && gate.unhealthy.is_empty()
            && let Some(query) = rule.as_ref().and_then(|r| r.health_query.as_deref())
        {
            self.gate_query_pending = true;
            let cached = self
                .gate_query_cache
                .as_ref()
                .filter(|(t, _)| t.elapsed() < agent.cfg.blockers.interval)
                .map(|(_, r)| r.clone());
            let verdict = match cached {
                Some(v) => v,
                None => {
                    let v = gate_query(agent, query).await;
                    self.gate_query_cache = Some((Instant::now(), v.clone()));
                    v
                }
            };
            gate.unhealthy.extend(verdict);
        }
    }

    /// Asks [`node::decide`]; right before a lock slot is taken or the node is touched, with
    /// the preflight and the blockers checked (and decides again on what they say).
    pub(super) async fn decide(&mut self, t: &Turn, obs: &mut Observations) -> Action {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let mut action = node::decide(obs);
        if matches!(
            action,
            Action::AcquireLock | Action::Cordon | Action::Drain | Action::Reboot
        ) && !self.run.host_access.check(agent)
        {
            // Right before a lock slot is taken or the node is touched: the preflight.
            obs.host_access_ok = false;
            action = node::decide(obs);
        }
        if agent.cfg.blockers.any()
            && matches!(
                action,
                Action::AcquireLock | Action::Cordon | Action::Drain | Action::Reboot
            )
        {
            // Right before a step that takes the node out of service the check is fresh;
            // while the node waits in the queue a recent answer will do.
            let fresh = !matches!(action, Action::AcquireLock);
            let cached = self
                .block_cache
                .as_ref()
                .filter(|(t, _)| !fresh && t.elapsed() < agent.cfg.blockers.interval)
                .map(|(_, r)| r.clone());
            let blocked = match cached {
                Some(r) => r,
                None => {
                    let r = blockers::check(&agent.client, me, &agent.cfg.blockers).await;
                    self.block_cache = Some((Instant::now(), r.clone()));
                    r
                }
            };
            if let Some(reason) = blocked {
                debug!(node = %me, %reason, "reboot blocked");
                obs.blocked_by = Some(reason);
                action = node::decide(obs);
            }
        }
        // A node holding only its group's slot that may not go on gives it back (it would
        // hold its group up for nothing).
        if t.partial && matches!(action, Action::Wait { .. }) {
            action = Action::ReleaseLock;
        }
        action
    }
}

/// Evaluates a rule's `healthGate.query` against `--prometheus-url`: None when it returns no
/// series, else why the gate stays closed (see [`health::query_verdict`]).
async fn gate_query(agent: &Agent, query: &str) -> Option<String> {
    let Some(prometheus) = agent.cfg.blockers.prometheus.as_ref() else {
        // Refused at policy load; kept closed here too should it ever get this far.
        return Some("cannot evaluate healthGate.query: the agent has no --prometheus-url".to_owned());
    };
    let result = match reqwest::Client::builder().build() {
        Ok(http) => blockers::query_series(&http, &prometheus.url, query).await,
        Err(e) => Err(e.to_string()),
    };
    let verdict = health::query_verdict(&result);
    if let Some(v) = &verdict {
        debug!(node = %agent.cfg.node_name, verdict = %v, "health gate query holds the slot");
    }
    verdict
}
