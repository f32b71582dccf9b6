//! The steps of a reboot cycle, one function each, named as in the README's "How a node goes
//! through a reboot": wait, cordon, drain, reboot, uncordon, the health gate's end (verified,
//! failed) and abandoning a cycle. Taking a slot is in `slot`; releasing and handing over in
//! `hand_over`.
//!
//! Each step is one write recorded on the Node (or the Lease), so a crash or a SIGTERM between
//! two steps leaves a record [`node::decide`] resumes from.

use super::*;

impl Cycle<'_> {
    /// Waits (`Action::Wait`): for a change of the caches or the sentinel, the reason's end,
    /// the window's next transition or a recheck. A node with nothing to do and nothing held
    /// disengages instead.
    pub(super) async fn wait(
        &mut self,
        t: &Turn,
        obs: &Observations,
        reason: WaitReason,
        until: Option<DateTime<Utc>>,
    ) -> Stepped {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        if reason == WaitReason::NotRequired && t.held.is_none() && view.recorded.phase == Phase::Idle {
            // Nothing to do and nothing held: drop the watches.
            return Err(Next::Disengage);
        }
        if view.waiting {
            // No longer eligible: leave the queue so no slot is handed to us.
            let patch = agent.taint_change(node::waiting_patch(None), view, &t.node, false);
            match agent.patch_node(&patch).await {
                Ok(n) => self.w.set_node(n),
                Err(e) => warn!(node = %me, error = %e, "failed to leave the lock queue"),
            }
        }
        let state = match reason {
            WaitReason::AwaitingReboot => "rebooting",
            WaitReason::HealthGate => "verifying",
            _ => "pending",
        };
        agent.metrics.set_state(state);
        agent.metrics.set_blocked(match reason {
            WaitReason::NotRequired | WaitReason::AwaitingReboot => None,
            WaitReason::Blocked => obs.blocked_by.as_deref().map(blockers::metric_label),
            r => Some(r.label()),
        });
        let next_window = t
            .policy
            .as_ref()
            .and_then(|p| p.next_transition(&view.labels, t.now));
        // A blocked node looks at its blockers again after the interval.
        let recheck = match reason {
            WaitReason::Blocked => Some(Instant::now() + agent.cfg.blockers.interval),
            // A refused preflight is tried again on a back-off.
            WaitReason::HostAccess => Some(Instant::now() + HOST_ACCESS_RECHECK),
            // A gate query is asked again (Prometheus sends no news).
            WaitReason::HealthGate if self.gate_query_pending => {
                Some(Instant::now() + agent.cfg.blockers.interval)
            }
            _ => None,
        };
        let now = t.now;
        let deadline = [until, next_window]
            .into_iter()
            .flatten()
            .min()
            .map(|d| instant_at(now, d))
            .into_iter()
            .chain(recheck)
            .min();
        self.wait_for_change(deadline).await?;
        Ok(Ok(()))
    }

    /// Cordons the node (`Action::Cordon`), recording whether kreboot did it, and enters the
    /// draining phase; the slots held are first claimed and marked (see
    /// [`Cycle::record_cycle_on_lock`]).
    pub(super) async fn cordon(&mut self, t: &Turn) -> Stepped {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let slot = t.held.clone().unwrap_or_default();
        self.record_cycle_on_lock(t, &slot).await?;
        let patch = node::with_label_changes(
            agent.taint_change(node::cordon_patch(view, &slot), view, &t.node, false),
            &agent.cfg.pre_reboot_labels,
            [],
        );
        match agent.patch_node(&patch).await {
            Ok(n) => {
                self.w.set_node(n);
                agent.metrics.set_state("draining");
                if view.unschedulable {
                    info!(node = %me, "node was already cordoned by an administrator; it will stay cordoned");
                    agent.events.node(Reason::Draining, "draining (node was already cordoned by someone else; kreboot will leave it cordoned)");
                } else {
                    info!(node = %me, "cordoned");
                    agent
                        .events
                        .node(Reason::Cordoned, "cordoned by kreboot for a reboot");
                }
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(node_write_error(e))),
        }
    }

    /// Before the cordon: each slot held is first claimed with our full TTL (when handed to us
    /// by the previous holder) and marked as the slot of our cycle (`lock::ANN_CYCLE_OF`):
    /// the conditional Lease write is the fence that keeps a waiter from taking the slot over
    /// while our cordon is on its way. With a soak the claim comes first and the mark after
    /// the soak (a soaking node is not out); without one, both in one write. `Ok` when there
    /// is nothing left to write; else one write, and the turn ends.
    async fn record_cycle_on_lock(&mut self, t: &Turn, slot: &String) -> Result<(), Next> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let lock = agent.lease_lock();
        let soaks = t
            .policy
            .as_ref()
            .is_some_and(|p| p.rule_for(&t.view.labels).soak.is_some());
        let to_write = [Some(slot), t.held_cap.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|s| {
                t.leases
                    .get(s)
                    .filter(|l| lock.needs_claim(l) || !lock::cycle_started(l))
                    .map(|l| (s.clone(), l))
            });
        let Some((claim, lease)) = to_write else {
            return Ok(());
        };
        let handed_over = lock.needs_claim(lease);
        let written = if handed_over && soaks {
            lock.acquire(&claim, Some(lease), t.now).await
        } else {
            lock.start_cycle(lease, t.now).await
        };
        match written {
            Ok(l) => {
                if handed_over {
                    info!(node = %me, lease = %claim, "lock handed over and claimed");
                    agent
                        .events
                        .node(Reason::LockAcquired, format!("reboot lock {claim} handed over"));
                } else {
                    debug!(node = %me, lease = %claim, "cycle recorded on the lock");
                }
                self.w.set_lease(l, Instant::now());
            }
            Err(lock::LockError::Conflict { .. }) => {
                if wait_briefly(&self.w, &self.run.shutdown).await.is_err() {
                    return Err(Next::Shutdown);
                }
            }
            Err(e) => {
                warn!(node = %me, error = %e, "failed to claim the handed-over lock");
                self.sleep_backoff().await;
            }
        }
        Err(Next::Decide)
    }

    /// Drains the node (`Action::Drain`, the Eviction API): records the budgets it touches
    /// first (for a rule's health gate), then evicts; on success enters the rebooting phase
    /// (with the boot ids), on failure ends the cycle (see [`Cycle::drain_failed`]).
    pub(super) async fn drain(&self, t: &Turn) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let budgets = t
            .policy
            .as_ref()
            .is_some_and(|p| p.rule_for(&view.labels).health_budgets);
        if budgets {
            self.record_touched_budgets(view).await?;
        }
        agent.metrics.set_state("draining");
        agent.events.node(Reason::Draining, "evicting pods");
        agent
            .notifier
            .send(NotifyEvent::Drain, &view.recorded.reboot_reason);
        let cfg = DrainConfig {
            timeout: agent.cfg.drain_timeout,
            grace_period: agent.cfg.drain_grace_period,
            eviction_retry: agent.cfg.eviction_retry,
        };
        let started = Instant::now();
        let metrics = agent.metrics.clone();
        let on_retry = move || {
            metrics
                .eviction_retries
                .with_label_values(&[metrics.node()])
                .inc()
        };
        let result = tokio::select! {
            _ = self.run.shutdown.cancelled() => return Err(StepError::Shutdown),
            r = drain::drain(&agent.client, me, &cfg, &on_retry) => r,
        };
        let elapsed = started.elapsed().as_secs_f64();
        let now = agent.clock.now();
        match result {
            Ok(report) => {
                // Reported by the agent that sees the reboot complete (see node::ANN_DRAINED).
                let record = node::DrainRecord {
                    millis: (elapsed * 1000.0).round() as u64,
                    evicted: report.evicted as u64,
                };
                info!(node = %me, evicted = report.evicted, retries = report.retries, seconds = elapsed, "drained");
                let kernel = (agent.kernel_boot_id)();
                let n = agent
                    .patch_node(&node::with_drain_record(
                        node::rebooting_patch(view, kernel.as_deref()),
                        record,
                    ))
                    .await
                    .map_err(node_write_error)?;
                self.w.set_node(n);
                Ok(())
            }
            Err(e) => self.drain_failed(view, e, elapsed, now).await,
        }
    }

    /// Before the first eviction, so that whatever happens next (a crash, the reboot) the
    /// gate after the reboot knows which budgets to wait for.
    async fn record_touched_budgets(&self, view: &node::NodeView) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let touched = tokio::select! {
            _ = self.run.shutdown.cancelled() => return Err(StepError::Shutdown),
            t = agent.budgets_to_touch() => t.map_err(|e| StepError::Api(format!("listing the node's pods: {e}")))?,
        };
        if let Some(patch) = node::drained_budgets_patch(view, &touched) {
            let n = agent.patch_node(&patch).await.map_err(node_write_error)?;
            info!(node = %me, budgets = %health::encode_budgets(&touched), "recorded the disruption budgets the drain touches");
            self.w.set_node(n);
        }
        Ok(())
    }

    /// A drain that failed or ran out of time: reboot anyway (`--force-reboot`), or uncordon
    /// (if kreboot cordoned), record the failure (it starts `--failure-backoff`) and release.
    async fn drain_failed(
        &self,
        view: &node::NodeView,
        e: drain::DrainError,
        elapsed: f64,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        agent
            .metrics
            .drain_duration
            .with_label_values(&[me.as_str(), "failure"])
            .observe(elapsed);
        agent.metrics.fail("drain", e.metric_label());
        if agent.cfg.force_reboot {
            warn!(node = %me, error = %e, "drain failed; rebooting anyway (--force-reboot)");
            agent.events.node(
                Reason::DrainFailed,
                format!("{e}; rebooting anyway (--force-reboot)"),
            );
            agent.notifier.send_detail(
                NotifyEvent::DrainFailed,
                &view.recorded.reboot_reason,
                Some(&format!("{e}; rebooting anyway")),
            );
            let kernel = (agent.kernel_boot_id)();
            let n = agent
                .patch_node(&node::rebooting_patch(view, kernel.as_deref()))
                .await
                .map_err(node_write_error)?;
            self.w.set_node(n);
            return Ok(());
        }
        error!(node = %me, error = %e, "drain failed; uncordoning and releasing the lock");
        agent.events.node(
            Reason::DrainFailed,
            format!("{e}; node uncordoned (if kreboot cordoned it) and lock released"),
        );
        agent.notifier.send_detail(
            NotifyEvent::DrainFailed,
            &view.recorded.reboot_reason,
            Some(&e.to_string()),
        );
        self.give_back(view, e.metric_label(), now).await
    }

    /// Reboots (`Action::Reboot`): after `--reboot-delay` and a last look at the window,
    /// requests the reboot and waits for the shutdown it brings (see [`REBOOT_WAIT`]).
    pub(super) async fn reboot(&self, t: &Turn) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let shutdown = &self.run.shutdown;
        agent.metrics.set_state("rebooting");
        if !agent.cfg.reboot_delay.is_zero() {
            tokio::select! {
                _ = shutdown.cancelled() => return Err(StepError::Shutdown),
                _ = tokio::time::sleep(agent.cfg.reboot_delay) => {}
            }
        }
        // The window is checked again immediately before the reboot command runs.
        if !t
            .policy
            .as_ref()
            .is_some_and(|p| p.is_open(&view.labels, agent.clock.now()))
        {
            info!(node = %me, "window closed just before the reboot; deciding again");
            return Ok(());
        }
        info!(node = %me, command = ?agent.cfg.reboot_command, "rebooting");
        agent.events.node(Reason::Rebooting, "rebooting the node");
        agent
            .notifier
            .send(NotifyEvent::Reboot, &view.recorded.reboot_reason);
        agent.metrics.reboots.with_label_values(&[me.as_str()]).inc();
        match agent.rebooter.reboot().await {
            Ok(()) => {
                // The host is going down; the shutdown will SIGTERM us. Keep the lock and the
                // cordon. If nothing happens within REBOOT_WAIT, say so and decide again (which
                // requests the reboot again).
                tokio::select! {
                    _ = shutdown.cancelled() => Err(StepError::Shutdown),
                    _ = tokio::time::sleep(REBOOT_WAIT) => {
                        agent.metrics.fail("reboot", "host_did_not_reboot");
                        let detail = format!("the reboot was requested but the host was still up after {}s", REBOOT_WAIT.as_secs());
                        agent.notifier.send_detail(NotifyEvent::RebootFailed, &view.recorded.reboot_reason, Some(&detail));
                        agent.events.node(Reason::RebootFailed, detail);
                        error!(node = %me, "the host did not go down after the reboot request; retrying");
                        Ok(())
                    }
                }
            }
            Err(e) => self.reboot_failed(view, e).await,
        }
    }

    /// The reboot request was refused: the host is not going down. The documented failure
    /// path, as for a failed drain: uncordon (if kreboot cordoned), record the failure (it
    /// starts --failure-backoff), release the lock. Never hold the lock and the drained node
    /// while retrying.
    async fn reboot_failed(
        &self,
        view: &node::NodeView,
        e: crate::reboot::RebootError,
    ) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        agent.metrics.fail("reboot", "command_failed");
        error!(node = %me, error = %e, "reboot failed; uncordoning and releasing the lock");
        agent.events.node(
            Reason::RebootFailed,
            format!("{e}; node uncordoned (if kreboot cordoned it) and lock released"),
        );
        agent.notifier.send_detail(
            NotifyEvent::RebootFailed,
            &view.recorded.reboot_reason,
            Some(&e.to_string()),
        );
        self.give_back(view, "reboot_failed", agent.clock.now()).await
    }

    /// After a failed drain or reboot: ends the cycle on the Node as failed (`reason`, the
    /// metric's label), which uncordons it if kreboot cordoned it and drops the pre-reboot
    /// labels, then releases the lock.
    async fn give_back(
        &self,
        view: &node::NodeView,
        reason: &'static str,
        now: DateTime<Utc>,
    ) -> Result<(), StepError> {
        let agent = self.agent;
        let n = agent
            .patch_node(&node::with_label_changes(
                node::end_cycle_patch(view, CycleEnd::Failed(reason), now),
                &BTreeMap::new(),
                agent.cfg.pre_reboot_labels.keys(),
            ))
            .await
            .map_err(node_write_error)?;
        self.w.set_node(n);
        release(agent, &self.w).await
    }

    /// The reboot happened and the node is Ready (`Action::Complete`): uncordon (only if
    /// kreboot cordoned), end the cycle, release the lock. With a health gate the node is
    /// uncordoned but keeps its slot (phase `verifying`) until it is healthy.
    pub(super) async fn uncordon(&self, t: &Turn) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let gate = t
            .policy
            .as_ref()
            .and_then(|p| p.rule_for(&view.labels).health_gate)
            .and(t.held.as_ref());
        let end = match gate {
            Some(slot) => node::verifying_patch(view, slot, t.now),
            None => node::end_cycle_patch(view, CycleEnd::Rebooted, t.now),
        };
        let n = agent
            .patch_node(&node::with_label_changes(
                agent.taint_change(end, view, &t.node, false),
                &agent.cfg.post_reboot_labels,
                agent.cfg.pre_reboot_labels.keys(),
            ))
            .await
            .map_err(node_write_error)?;
        self.w.set_node(n);
        self.report_rebooted(view);
        if gate.is_some() {
            info!(node = %me, "health gate: keeping the lock until the node and its DaemonSet pods are Ready");
            Ok(())
        } else {
            release(agent, &self.w).await
        }
    }

    /// A completed reboot: its metrics (with the drain's, recorded before the reboot), its
    /// Events, the notification.
    fn report_rebooted(&self, view: &node::NodeView) {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        agent
            .metrics
            .reboots_completed
            .with_label_values(&[me.as_str()])
            .inc();
        if let Some(d) = view.recorded.drained {
            agent
                .metrics
                .drain_duration
                .with_label_values(&[me.as_str(), "success"])
                .observe(d.millis as f64 / 1000.0);
            agent
                .metrics
                .evictions
                .with_label_values(&[me.as_str()])
                .inc_by(d.evicted);
        }
        if view.recorded.cordoned_by_kreboot {
            agent
                .events
                .node(Reason::Uncordoned, "node rebooted and Ready; uncordoned");
        }
        agent.events.node(
            Reason::RebootCompleted,
            format!("rebooted; new boot id {}", view.boot_id),
        );
        agent
            .notifier
            .send(NotifyEvent::Uncordon, &view.recorded.reboot_reason);
        info!(node = %me, boot_id = %view.boot_id, "reboot completed");
    }

    /// The health gate passed (`Action::Verified`): clear the phase, hand the lock on.
    pub(super) async fn verified(&self, t: &Turn) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        match agent.patch_node(&node::verified_patch(&t.view)).await {
            Ok(n) => {
                self.w.set_node(n);
                info!(node = %me, "health gate passed; handing the lock on");
                release(agent, &self.w).await
            }
            Err(e) => Err(node_write_error(e)),
        }
    }

    /// The health gate timed out (`Action::FailHealthGate`): record and report it, keep the
    /// lock (the rollout stops here).
    pub(super) async fn fail_health_gate(&self, t: &Turn, obs: &Observations) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        match agent
            .patch_node(&node::health_gate_failed_patch(&t.view, t.now))
            .await
        {
            Ok(n) => {
                self.w.set_node(n);
                let what = obs
                    .health_gate
                    .as_ref()
                    .map(|g| g.unhealthy.join(", "))
                    .unwrap_or_default();
                error!(node = %me, %what, "health gate timed out; keeping the lock: the rollout stops here");
                agent.metrics.fail("health_gate", "timeout");
                agent.events.node(
                    Reason::HealthGateFailed,
                    format!(
                        "not healthy within the health gate timeout ({what}); the node keeps its lock slot, so no other node starts until it is healthy"
                    ),
                );
                Ok(())
            }
            Err(e) => Err(node_write_error(e)),
        }
    }

    /// Abandons the cycle (`Action::Abort`): uncordon if kreboot cordoned, clear the phase,
    /// release the lock.
    pub(super) async fn abandon(&self, t: &Turn, reason: node::AbortReason) -> Result<(), StepError> {
        let agent = self.agent;
        let me = &agent.cfg.node_name;
        let view = &t.view;
        let end = match reason {
            node::AbortReason::LockLost => CycleEnd::Failed("lock lost"),
            node::AbortReason::HostAccess => CycleEnd::Failed("host_access"),
            _ => CycleEnd::Abandoned,
        };
        let patch = node::with_label_changes(
            agent.taint_change(node::end_cycle_patch(view, end, t.now), view, &t.node, false),
            &BTreeMap::new(),
            agent.cfg.pre_reboot_labels.keys(),
        );
        match agent.patch_node(&patch).await {
            Ok(n) => {
                self.w.set_node(n);
                warn!(node = %me, reason = reason.label(), "cycle abandoned; node uncordoned if kreboot cordoned it");
                agent.metrics.fail("cycle", reason.label());
                agent.events.node(
                    Reason::CycleAborted,
                    format!("reboot cycle abandoned: {}", reason.label().replace('_', " ")),
                );
                release(agent, &self.w).await
            }
            Err(e) => Err(node_write_error(e)),
        }
    }
}
