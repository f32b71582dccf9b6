//! One engagement of the agent: the loop's turn — read the caches, ask [`node::decide`], carry
//! the action out ([`Cycle::turn`]) — and what every turn does around the action: why the
//! reboot is held back (on the Node), the metrics, the announcement of a required reboot, and
//! the back-off after a step that failed ([`Cycle::settle`]).
//!
//! What a turn sees is in `observe`; the actions are in `steps` (wait, cordon, drain, reboot,
//! uncordon, the health gate's end, abandon), `slot` (take a slot) and `hand_over` (release,
//! hand over). A [`Cycle`] lives while the agent is engaged: dropping it stops the watches and
//! the renewer of held slots.

use super::*;

/// How a turn ends before its step's result is settled.
pub(super) enum Next {
    /// Read the caches and decide again at once. The back-off is left as it is: nothing
    /// succeeded or failed for it.
    Decide,
    /// Nothing to do and nothing held: drop the watches and wait for the sentinel.
    Disengage,
    /// Shutdown was requested.
    Shutdown,
}

/// A step's outcome: `Err(next)` ends the turn at once; `Ok(result)` is settled by
/// [`Cycle::settle`] (back-off reset, or re-read and retry).
pub(super) type Stepped = Result<Result<(), StepError>, Next>;

/// The state of [`run`] that outlives an engagement.
pub(super) struct Run {
    pub(super) sentinel: watch::Receiver<SentinelState>,
    pub(super) shutdown: CancellationToken,
    /// Whether the Node carries an operator's request (`kreboot reboot`), for the metrics.
    pub(super) requested: watch::Sender<bool>,
    /// Failed attempts in a row, for [`backoff`]; reset by a step that went through.
    pub(super) attempt: u32,
    pub(super) host_access: HostAccess,
}

/// An engaged agent: the watches its decisions are made on, and what its turns remember.
pub(super) struct Cycle<'r> {
    pub(super) agent: &'r Agent,
    pub(super) run: &'r mut Run,
    pub(super) w: Watches,
    changes: Changes,
    _renewer: AbortOnDrop,
    /// The `RebootRequired` Event was sent for the reboot now required.
    announced_required: bool,
    /// The annotation problems last reported (reported again only when they change).
    reported_problems: Vec<String>,
    /// The last answer of the blockers' check.
    pub(super) block_cache: Option<(Instant, Option<String>)>,
    /// The last answer of the rule's gate query (health gate).
    pub(super) gate_query_cache: Option<(Instant, Option<String>)>,
    /// The gate query is being asked (the wait wakes to ask it again).
    pub(super) gate_query_pending: bool,
    /// The last count of this node's pool (a percentage `concurrency`).
    pub(super) pool_count: Option<PoolCount>,
    /// The same for the rule's nodes over all its groups (a percentage `maxConcurrent`).
    pub(super) rule_pool_count: Option<PoolCount>,
    /// The last count of the lock queue's waiters (up to a long queue's length), and when.
    pub(super) queue_count: Option<(usize, Instant)>,
}

impl<'r> Cycle<'r> {
    /// Engages: starts the watches, and the renewer of the slots this node holds.
    pub(super) fn engage(agent: &'r Agent, run: &'r mut Run) -> Cycle<'r> {
        let w = agent.engage();
        let changes = Changes::new(&w);
        let renewer = AbortOnDrop(spawn_renewer(agent.clone(), w.leases.clone()));
        Cycle {
            agent,
            run,
            w,
            changes,
            _renewer: renewer,
            announced_required: false,
            reported_problems: Vec::new(),
            block_cache: None,
            gate_query_cache: None,
            gate_query_pending: false,
            pool_count: None,
            rule_pool_count: None,
            queue_count: None,
        }
    }

    /// One turn: gather the observations, decide, carry the action out. `Ok` when the step's
    /// result was settled (decide again).
    pub(super) async fn turn(&mut self) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        self.changes.mark_seen();
        if !self.w.synced() {
            self.wait_for_change(None).await?;
            return Err(Next::Decide);
        }
        let now = agent.clock.now();
        let Some(node_obj) = self.w.node.borrow().node.clone() else {
            warn!(node = %me, "own Node object does not exist; waiting for it");
            self.wait_for_change(None).await?;
            return Err(Next::Decide);
        };
        let view = node::view(&node_obj);
        self.report_problems(&view, now);
        let t = self.look(now, node_obj, view);
        self.pass_on_extra_slot(&t).await?;
        let mut obs = self.observe(&t).await;
        let action = self.decide(&t, &mut obs).await;
        self.record_held_back(&t, &obs, &action).await?;
        self.publish_metrics(&t, &action);
        debug!(node = %me, phase = t.view.recorded.phase.name(), ?action, "decided");
        self.announce_required(&t).await;
        if agent.cfg.dry_run && !matches!(action, Action::Wait { .. }) {
            info!(node = %me, ?action, "dry run: would act; writing nothing");
            agent.metrics.set_state("pending");
            self.wait_for_change(None).await?;
            return Err(Next::Decide);
        }
        let result = self.act(&t, &obs, action).await?;
        self.settle(result).await
    }

    /// Carries out `action`: each step named as in the README's "How a node goes through a
    /// reboot".
    async fn act(&mut self, t: &Turn, obs: &Observations, action: Action) -> Stepped {
        match action {
            Action::Wait { reason, until } => self.wait(t, obs, reason, until).await,
            Action::AcquireLock => self.take_slot(t).await,
            Action::Cordon => self.cordon(t).await,
            Action::Drain => Ok(self.drain(t).await),
            Action::Reboot => Ok(self.reboot(t).await),
            Action::Complete => Ok(self.uncordon(t).await),
            Action::Verified => Ok(self.verified(t).await),
            Action::FailHealthGate => Ok(self.fail_health_gate(t, obs).await),
            Action::Abort(reason) => Ok(self.abandon(t, reason).await),
            Action::ReleaseLock => Ok(release(self.agent, &self.w).await),
        }
    }

    /// After a step: a success resets the back-off; a 409 re-reads the Node; an API error
    /// waits out the back-off.
    async fn settle(&mut self, result: Result<(), StepError>) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        match result {
            Ok(()) => self.run.attempt = 0,
            Err(StepError::Stale) => {
                // Our view was out of date: re-read the Node and decide again.
                if let Ok(n) = agent.node_api().get(me).await {
                    self.w.set_node(n);
                }
            }
            Err(StepError::Shutdown) => return Err(Next::Shutdown),
            Err(StepError::Api(message)) => {
                warn!(node = %me, error = %message, retry_in = ?backoff(self.run.attempt), "API call failed; retrying");
                self.back_off().await?;
            }
        }
        Ok(())
    }

    /// Sleeps until `deadline` (if any) or a change of a cache or the sentinel.
    pub(super) async fn wait_for_change(&mut self, deadline: Option<Instant>) -> Result<(), Next> {
        let run = &mut *self.run;
        if self
            .changes
            .wait(&mut run.sentinel, deadline, &run.shutdown)
            .await
        {
            Ok(())
        } else {
            Err(Next::Shutdown)
        }
    }

    /// Waits out the back-off (cut short by shutdown) and counts the attempt.
    pub(super) async fn back_off(&mut self) -> Result<(), Next> {
        tokio::select! {
            _ = self.run.shutdown.cancelled() => return Err(Next::Shutdown),
            _ = tokio::time::sleep(backoff(self.run.attempt)) => {}
        }
        self.run.attempt += 1;
        Ok(())
    }

    /// Waits out the back-off (not cut short by shutdown: the loop looks at it next) and
    /// counts the attempt.
    pub(super) async fn sleep_backoff(&mut self) {
        tokio::time::sleep(backoff(self.run.attempt)).await;
        self.run.attempt += 1;
    }

    /// Hand-edited garbage in kreboot's annotations: each is read the safe way (see
    /// `node::parse_recorded` and `node::time_problems`); the operator is told once per
    /// change, in the log and with a `BadAnnotation` Event on the Node.
    fn report_problems(&mut self, view: &node::NodeView, now: DateTime<Utc>) {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let mut problems = view.recorded.problems.clone();
        problems.extend(node::time_problems(&view.recorded, now));
        if problems != self.reported_problems {
            for p in &problems {
                warn!(node = %me, problem = %p, "unexpected kreboot annotation");
            }
            if !problems.is_empty() {
                agent.events.node(Reason::BadAnnotation, problems.join("; "));
            }
            self.reported_problems = problems;
        }
    }

    /// Why the reboot is held back, on the Node for operators; written only on change (and
    /// then the turn ends: the loop decides again on the Node written).
    async fn record_held_back(&mut self, t: &Turn, obs: &Observations, action: &Action) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let held_back = held_back(action, obs);
        let recorded_held_back = t
            .node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(node::ANN_BLOCKED_BY))
            .cloned();
        if held_back == recorded_held_back || agent.cfg.dry_run {
            return Ok(());
        }
        if let Some(p) = t
            .paused
            .as_ref()
            .filter(|_| held_back.as_deref() == Some("paused"))
        {
            agent.events.node(
                Reason::RebootsPaused,
                format!(
                    "reboot held back: reboots are paused {} (kreboot resume lifts it)",
                    p.describe()
                ),
            );
            info!(node = %me, pause = %p.describe(), "reboot held back: reboots are paused");
        }
        if let Some(reason) = obs.blocked_by.as_deref().filter(|_| held_back.is_some()) {
            agent
                .events
                .node(Reason::RebootBlocked, format!("reboot held back by {reason}"));
            info!(node = %me, %reason, "reboot held back");
        }
        match agent
            .patch_node(&node::blocked_by_patch(held_back.as_deref()))
            .await
        {
            Ok(n) => {
                self.w.set_node(n);
                return Err(Next::Decide);
            }
            Err(e) => warn!(node = %me, error = %e, "failed to record why the reboot waits"),
        }
        Ok(())
    }

    /// The gauges that follow the turn's observations and decision.
    fn publish_metrics(&self, t: &Turn, action: &Action) {
        let metrics = &self.agent.metrics;
        let view = &t.view;
        metrics.set(&metrics.window_open, i64::from(t.window_open));
        // Only while this node has a reboot to do: a pause that holds nothing back is no news.
        metrics.set(&metrics.paused, i64::from(t.paused.is_some() && t.required));
        metrics.set(&metrics.lock_held, i64::from(t.held.is_some()));
        metrics.set(
            &metrics.cordoned,
            i64::from(view.unschedulable && view.recorded.cordoned_by_kreboot),
        );
        metrics.set(
            &metrics.health_gate_failed,
            i64::from(view.recorded.phase == Phase::Verifying && view.recorded.health_gate_failed.is_some()),
        );
        metrics.set(
            &metrics.reboot_loop_backoff,
            i64::from(matches!(
                action,
                Action::Wait {
                    reason: WaitReason::RebootLoopBackoff,
                    ..
                }
            )),
        );
    }

    /// A reboot newly required (the sentinel, or an operator's request): the
    /// `RebootRequired` Event, `kreboot_reboot_required_info`, and since when and why on the
    /// Node. Once per required reboot; forgotten when none is required.
    async fn announce_required(&mut self, t: &Turn) {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        if t.required && !self.announced_required && t.view.recorded.phase == Phase::Idle {
            self.announced_required = true;
            let sentinel = &t.sentinel;
            let packages = sentinel.packages.join(", ");
            agent
                .events
                .node(Reason::RebootRequired, required_note(t, &packages));
            // `kreboot_reboot_required_info{reason}`: the packages, and `requested` for an
            // operator's request (the sentinel's series keep their labels).
            let mut reasons = Vec::new();
            if sentinel.required {
                reasons.push(crate::events::truncate(&packages, 200));
            }
            if t.requested.is_some() {
                reasons.push("requested".to_owned());
            }
            for r in &reasons {
                agent
                    .metrics
                    .required_reason
                    .with_label_values(&[me.as_str(), r])
                    .set(1);
            }
            let reason = match &t.requested {
                Some(r) if packages.is_empty() => r.describe(),
                Some(r) => format!("{packages} ({})", r.describe()),
                None => packages,
            };
            let recorded = t.node.metadata.annotations.as_ref();
            if !agent.cfg.dry_run
                && recorded
                    .and_then(|a| a.get(node::ANN_REBOOT_REQUIRED_SINCE))
                    .is_none()
            {
                // For operators (`kubectl get node -o yaml`, `kreboot status`): since when and why.
                let patch = serde_json::json!({ "metadata": { "annotations": {
                    node::ANN_REBOOT_REQUIRED_SINCE: node::format_time(t.now),
                    node::ANN_REBOOT_REASON: crate::events::truncate(&reason, 1000),
                }}});
                match agent.patch_node(&patch).await {
                    Ok(n) => self.w.set_node(n),
                    Err(e) => warn!(node = %me, error = %e, "failed to record why a reboot is needed"),
                }
            }
        }
        if !t.required {
            self.announced_required = false;
            agent.metrics.required_reason.reset();
        }
    }
}

/// The `RebootRequired` Event's note: who asks (the host, an operator) and for which packages.
fn required_note(t: &Turn, packages: &str) -> String {
    let mut note = match (&t.requested, t.sentinel.required) {
        (Some(r), false) => format!("an operator asked for a reboot ({})", r.describe()),
        (Some(r), true) => format!(
            "an operator asked for a reboot ({}); the host requires one",
            r.describe()
        ),
        (None, _) => "the host requires a reboot".to_owned(),
    };
    if !packages.is_empty() {
        note.push_str(&format!(" for: {packages}"));
    }
    note
}

/// Why the reboot is held back by `action`, as recorded on the Node (None: it is not).
fn held_back(action: &Action, obs: &Observations) -> Option<String> {
    match action {
        Action::Wait {
            reason: WaitReason::Blocked,
            ..
        } => obs.blocked_by.clone(),
        Action::Wait {
            reason:
                r @ (WaitReason::WindowClosed
                | WaitReason::RebootLoopBackoff
                | WaitReason::FailureBackoff
                | WaitReason::HostAccess
                | WaitReason::Paused
                | WaitReason::OperatorDrained),
            ..
        } => Some(r.label().to_owned()),
        Action::Wait {
            reason: WaitReason::HealthGate,
            ..
        } => Some(crate::events::truncate(
            &format!(
                "health_gate: {}",
                obs.health_gate
                    .as_ref()
                    .map(|g| g.unhealthy.join(", "))
                    .unwrap_or_default()
            ),
            200,
        )),
        Action::Wait {
            reason: WaitReason::Soaking,
            until,
        } => Some(match until {
            Some(t) => format!("soaking until {}", node::format_time(*t)),
            None => "soaking".to_owned(),
        }),
        _ => None,
    }
}

/// Receivers of every cache an engaged agent decides on, kept for the whole engagement so that
/// a change between reading the caches and waiting is never lost.
struct Changes {
    node: watch::Receiver<NodeState>,
    leases: watch::Receiver<LeaseState>,
    policy: watch::Receiver<PolicyState>,
    holders: watch::Receiver<BTreeMap<String, lock::HolderNode>>,
    labelled: watch::Receiver<BTreeMap<String, Labelled>>,
    pods: watch::Receiver<Option<Vec<Pod>>>,
    budgets: watch::Receiver<Option<Vec<PodDisruptionBudget>>>,
}

impl Changes {
    fn new(w: &Watches) -> Changes {
        Changes {
            node: w.node.subscribe(),
            leases: w.leases.subscribe(),
            policy: w.policy.subscribe(),
            holders: w.holder_nodes.subscribe(),
            labelled: w.labelled_holders.subscribe(),
            pods: w.pods.subscribe(),
            budgets: w.budgets.subscribe(),
        }
    }

    /// Marks everything as seen. Called before the caches are read for a decision: whatever
    /// changes after this wakes the next wait.
    fn mark_seen(&mut self) {
        self.node.mark_unchanged();
        self.leases.mark_unchanged();
        self.policy.mark_unchanged();
        self.holders.mark_unchanged();
        self.labelled.mark_unchanged();
        self.pods.mark_unchanged();
        self.budgets.mark_unchanged();
    }

    /// Sleeps until `deadline` (if any) or until a change arrives on one of the receivers, or
    /// shutdown. Returns false on shutdown.
    async fn wait(
        &mut self,
        sentinel: &mut watch::Receiver<SentinelState>,
        deadline: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> bool {
        let Changes {
            node,
            leases,
            policy,
            holders: gone,
            labelled,
            pods,
            budgets,
        } = self;
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = node.changed() => true,
            _ = leases.changed() => true,
            _ = policy.changed() => true,
            _ = gone.changed() => true,
            _ = labelled.changed() => true,
            _ = pods.changed() => true,
            _ = budgets.changed() => true,
            _ = sentinel.changed() => true,
            _ = sleep => true,
        }
    }
}
