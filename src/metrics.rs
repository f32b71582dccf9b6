//! The agent's Prometheus metrics and the HTTP endpoint that serves them.
//!
//! One [`Metrics`] value per agent, with its own registry (so several agents can run in one
//! process, as the demo and the tests do), passed to whoever updates it; never a global. Every
//! name starts with `kreboot_` and follows Prometheus conventions (`_seconds`, `_total`).

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::sync::watch;

/// Lifecycle states reported by `kreboot_state`.
pub const STATES: &[&str] = &[
    "idle",
    "pending",
    "waiting_for_lock",
    "draining",
    "rebooting",
    "verifying",
];

/// Ways of watching the sentinel reported by `kreboot_sentinel_watch_mode`.
pub const SENTINEL_WATCH_MODES: &[&str] = &["inotify", "poll"];

/// All metrics of one agent.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    node: String,
    /// 1 while the sentinel says a reboot is needed.
    pub reboot_required: IntGaugeVec,
    /// Unix time at which the reboot became required (0 when not required).
    pub reboot_required_since: GaugeVec,
    /// 1 for the current lifecycle state.
    pub state: IntGaugeVec,
    /// 1 while the maintenance window is open for this node.
    pub window_open: IntGaugeVec,
    /// 1 while something blocks the reboot, by reason.
    pub blocked: IntGaugeVec,
    /// 1 while this node holds a lock slot.
    pub lock_held: IntGaugeVec,
    /// `kreboot_node_cordoned`.
    pub cordoned: IntGaugeVec,
    /// 1 while the last ConfigMap was valid.
    pub config_valid: IntGaugeVec,
    /// Unix time of the last successful policy load.
    pub config_last_reload: GaugeVec,
    /// This host's clock minus the API server's (from its `Date` header), in seconds.
    pub clock_skew: GaugeVec,
    /// 1 while the reboot-loop back-off holds a reboot back.
    pub reboot_loop_backoff: IntGaugeVec,
    /// Duration of drains.
    pub drain_duration: HistogramVec,
    /// Pods evicted.
    pub evictions: IntCounterVec,
    /// Evictions refused (PDB, 5xx) and retried.
    pub eviction_retries: IntCounterVec,
    /// Reboots requested by kreboot.
    pub reboots: IntCounterVec,
    /// Reboots seen completed (counted by the agent that runs after the reboot, so no scrape
    /// misses it when the reboot kills the process that asked for it).
    pub reboots_completed: IntCounterVec,
    /// Failures by lifecycle step and reason.
    pub failures: IntCounterVec,
    /// Build information.
    pub build_info: IntGaugeVec,
    /// The host's operating system and kernel.
    pub node_info: IntGaugeVec,
    /// 1, labelled with why the node needs a reboot (bounded package list), while it does.
    pub required_reason: IntGaugeVec,
    /// Operator notifications by target kind and result (`sent`, `failed`, `dropped`).
    pub notifications: IntCounterVec,
    /// 1 for the way the sentinel is watched ([`SENTINEL_WATCH_MODES`]).
    pub sentinel_watch_mode: IntGaugeVec,
    /// 1 when the last preflight proved the reboot can reach the host, 0 when refused.
    pub host_access_ok: IntGaugeVec,
    /// 1 while this node needs a reboot and reboots are paused (`kreboot pause`).
    pub paused: IntGaugeVec,
    /// 1 while a rebooted node holds its slot past its rule's health gate timeout.
    pub health_gate_failed: IntGaugeVec,
}

/// A metric's name, help text and label names.
struct Def {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
}

/// Every metric but the drain histogram, in the order [`Metrics::new`] registers them.
mod def {
    use super::Def;

    const NODE: &[&str] = &["node"];

    pub(super) const REBOOT_REQUIRED: Def = Def {
        name: "kreboot_reboot_required",
        help: "1 when the node needs a reboot.",
        labels: NODE,
    };

    pub(super) const REBOOT_REQUIRED_SINCE: Def = Def {
        name: "kreboot_reboot_required_since_timestamp_seconds",
        help: "Unix time at which the node started needing a reboot (0 when it does not).",
        labels: NODE,
    };

    pub(super) const STATE: Def = Def {
        name: "kreboot_state",
        help: "1 for the node's current lifecycle state.",
        labels: &["node", "state"],
    };

    pub(super) const WINDOW_OPEN: Def = Def {
        name: "kreboot_window_open",
        help: "1 while a maintenance window is open for the node.",
        labels: NODE,
    };

    pub(super) const BLOCKED: Def = Def {
        name: "kreboot_reboot_blocked",
        help: "1 while a reboot is held back, by reason.",
        labels: &["node", "reason"],
    };

    pub(super) const LOCK_HELD: Def = Def {
        name: "kreboot_lock_held",
        help: "1 while the node holds a reboot lock slot.",
        labels: NODE,
    };

    pub(super) const CORDONED: Def = Def {
        name: "kreboot_node_cordoned",
        help: "1 while the node is cordoned by kreboot (not by an administrator).",
        labels: NODE,
    };

    pub(super) const CONFIG_VALID: Def = Def {
        name: "kreboot_config_valid",
        help: "1 when the last policy ConfigMap was valid.",
        labels: NODE,
    };

    pub(super) const CONFIG_LAST_RELOAD: Def = Def {
        name: "kreboot_config_last_reload_timestamp_seconds",
        help: "Unix time of the last successful policy load.",
        labels: NODE,
    };

    pub(super) const REBOOT_LOOP_BACKOFF: Def = Def {
        name: "kreboot_reboot_loop_backoff",
        help: "1 while a reboot is held back because the node rebooted recently and still needs one.",
        labels: NODE,
    };

    pub(super) const EVICTIONS: Def = Def {
        name: "kreboot_evictions_total",
        help: "Pods evicted.",
        labels: NODE,
    };

    pub(super) const EVICTION_RETRIES: Def = Def {
        name: "kreboot_eviction_retries_total",
        help: "Evictions refused and retried.",
        labels: NODE,
    };

    pub(super) const REBOOTS: Def = Def {
        name: "kreboot_reboots_total",
        help: "Reboots requested.",
        labels: NODE,
    };

    pub(super) const REBOOTS_COMPLETED: Def = Def {
        name: "kreboot_reboots_completed_total",
        help: "Reboots completed (the node came back with a new boot id and the cycle ended).",
        labels: NODE,
    };

    pub(super) const FAILURES: Def = Def {
        name: "kreboot_failures_total",
        help: "Failed lifecycle steps.",
        labels: &["node", "step", "reason"],
    };

    pub(super) const BUILD_INFO: Def = Def {
        name: "kreboot_build_info",
        help: "Build information.",
        labels: &["version"],
    };

    pub(super) const REQUIRED_REASON: Def = Def {
        name: "kreboot_reboot_required_info",
        help: "1 while a reboot is needed, labelled with the reason (bounded list of packages).",
        labels: &["node", "reason"],
    };

    pub(super) const NODE_INFO: Def = Def {
        name: "kreboot_node_info",
        help: "The host's operating system and running kernel.",
        labels: &["node", "os", "os_version", "kernel"],
    };

    pub(super) const NOTIFICATIONS: Def = Def {
        name: "kreboot_notifications_total",
        help: "Operator notifications (--notify-url) by target kind and result (sent, failed, dropped).",
        labels: &["target_kind", "result"],
    };

    pub(super) const HEALTH_GATE_FAILED: Def = Def {
        name: "kreboot_health_gate_failed",
        help: "1 while the node, rebooted, is past its rule's health gate timeout and keeps its lock slot (the rollout is stopped): the Node or a DaemonSet pod on it is not Ready.",
        labels: NODE,
    };

    pub(super) const HOST_ACCESS_OK: Def = Def {
        name: "kreboot_host_access_ok",
        help: "1 when the last preflight proved the reboot can reach the host (its namespaces open, PID 1 may be signalled); 0 when refused.",
        labels: NODE,
    };

    pub(super) const PAUSED: Def = Def {
        name: "kreboot_paused",
        help: "1 while this node needs a reboot and an operator has paused reboots cluster-wide (kreboot pause); 0 otherwise.",
        labels: NODE,
    };

    pub(super) const CLOCK_SKEW: Def = Def {
        name: "kreboot_clock_skew_seconds",
        help: "This host's clock minus the API server's, from its Date header (whole seconds, so within about 1 s); positive: this host is ahead.",
        labels: NODE,
    };

    pub(super) const SENTINEL_WATCH_MODE: Def = Def {
        name: "kreboot_sentinel_watch_mode",
        help: "1 for the way the sentinel file is watched: inotify, or poll (inotify unavailable).",
        labels: &["node", "mode"],
    };
}

fn gauge(r: &Registry, def: &Def) -> IntGaugeVec {
    let name = def.name;
    let g = IntGaugeVec::new(Opts::new(name, def.help), def.labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn fgauge(r: &Registry, def: &Def) -> GaugeVec {
    let name = def.name;
    let g =
        GaugeVec::new(Opts::new(name, def.help), def.labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn counter(r: &Registry, def: &Def) -> IntCounterVec {
    let name = def.name;
    let c = IntCounterVec::new(Opts::new(name, def.help), def.labels)
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

/// `kreboot_drain_duration_seconds`, by outcome.
fn drain_histogram(r: &Registry) -> HistogramVec {
    let drain_duration = HistogramVec::new(
        HistogramOpts::new("kreboot_drain_duration_seconds", "Time taken by drains.")
            .buckets(vec![1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]),
        &["node", "outcome"],
    )
    .unwrap_or_else(|e| panic!("drain histogram: {e}"));
    r.register(Box::new(drain_duration.clone()))
        .unwrap_or_else(|e| panic!("drain histogram: {e}"));
    drain_duration
}

impl Metrics {
    /// Registers every metric for `node`.
    ///
    /// # Panics
    /// Only on a programming error in the metric definitions (names are constants), which
    /// the unit tests exercise.
    pub fn new(node: &str) -> Metrics {
        let r = Registry::new();
        let drain_duration = drain_histogram(&r);
        let m = Metrics {
            node: node.to_owned(),
            reboot_required: gauge(&r, &def::REBOOT_REQUIRED),
            reboot_required_since: fgauge(&r, &def::REBOOT_REQUIRED_SINCE),
            state: gauge(&r, &def::STATE),
            window_open: gauge(&r, &def::WINDOW_OPEN),
            blocked: gauge(&r, &def::BLOCKED),
            lock_held: gauge(&r, &def::LOCK_HELD),
            cordoned: gauge(&r, &def::CORDONED),
            config_valid: gauge(&r, &def::CONFIG_VALID),
            config_last_reload: fgauge(&r, &def::CONFIG_LAST_RELOAD),
            reboot_loop_backoff: gauge(&r, &def::REBOOT_LOOP_BACKOFF),
            drain_duration,
            evictions: counter(&r, &def::EVICTIONS),
            eviction_retries: counter(&r, &def::EVICTION_RETRIES),
            reboots: counter(&r, &def::REBOOTS),
            reboots_completed: counter(&r, &def::REBOOTS_COMPLETED),
            failures: counter(&r, &def::FAILURES),
            build_info: gauge(&r, &def::BUILD_INFO),
            required_reason: gauge(&r, &def::REQUIRED_REASON),
            node_info: gauge(&r, &def::NODE_INFO),
            notifications: counter(&r, &def::NOTIFICATIONS),
            health_gate_failed: gauge(&r, &def::HEALTH_GATE_FAILED),
            host_access_ok: gauge(&r, &def::HOST_ACCESS_OK),
            paused: gauge(&r, &def::PAUSED),
            clock_skew: fgauge(&r, &def::CLOCK_SKEW),
            sentinel_watch_mode: gauge(&r, &def::SENTINEL_WATCH_MODE),
            registry: r,
        };
        m.set_initial_values();
        m
    }

    /// The values every series starts from.
    fn set_initial_values(&self) {
        let node = self.node.as_str();
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self.config_valid.with_label_values(&[node]).set(1);
        self.set_state("idle");
        self.reboot_required.with_label_values(&[node]).set(0);
        self.paused.with_label_values(&[node]).set(0);
        // Counters from zero at start, not from their first increment: every agent restarts
        // with its node, and a series that appears only with its first event (often in a process
        // the reboot then kills) gives `increase()` nothing to compare, and a dashboard nothing.
        self.reboots.with_label_values(&[node]).inc_by(0);
        self.reboots_completed.with_label_values(&[node]).inc_by(0);
        self.evictions.with_label_values(&[node]).inc_by(0);
        for outcome in ["success", "failure"] {
            let _ = self.drain_duration.with_label_values(&[node, outcome]);
        }
    }

    /// The node label value.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Sets `kreboot_state` to `state` (one of [`STATES`]).
    pub fn set_state(&self, state: &str) {
        for s in STATES {
            self.state
                .with_label_values(&[self.node.as_str(), s])
                .set(i64::from(*s == state));
        }
    }

    /// Sets the blocked-by gauge: `reason` 1, every other reason seen before 0.
    pub fn set_blocked(&self, reason: Option<&str>) {
        for r in [
            "window_closed",
            "blocking_pods",
            "alerts",
            "blocker_error",
            "reboot_loop_backoff",
            "failure_backoff",
            "lock_held_elsewhere",
            "host_access",
            "paused",
            "operator_drained",
            "soaking",
            "health_gate",
        ] {
            self.blocked
                .with_label_values(&[self.node.as_str(), r])
                .set(i64::from(Some(r) == reason));
        }
    }

    /// Sets `kreboot_sentinel_watch_mode` to `mode` (one of [`SENTINEL_WATCH_MODES`]).
    pub fn set_sentinel_watch_mode(&self, mode: &str) {
        for m in SENTINEL_WATCH_MODES {
            self.sentinel_watch_mode
                .with_label_values(&[self.node.as_str(), m])
                .set(i64::from(*m == mode));
        }
    }

    /// Counts a failure of `step` for `reason`.
    pub fn fail(&self, step: &str, reason: &str) {
        self.failures
            .with_label_values(&[self.node.as_str(), step, reason])
            .inc();
    }

    /// A node-labelled gauge set to `v`.
    pub fn set(&self, g: &IntGaugeVec, v: i64) {
        g.with_label_values(&[self.node.as_str()]).set(v);
    }

    /// Renders the registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: Metrics,
    ready: watch::Receiver<bool>,
}

async fn metrics_handler(State(s): State<Arc<ServerState>>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
}

async fn ready_handler(State(s): State<Arc<ServerState>>) -> impl IntoResponse {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Serves `/metrics`, `/healthz` (alive) and `/readyz` (caches synced) on `addr`.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let state = Arc::new(ServerState { metrics, ready });
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(state);
    tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(local)
}

/// How often [`serve_or_retry`] tries again to bind the metrics address.
pub const SERVE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves like [`serve`], but a metrics address that cannot be bound does not stop the agent:
/// the failure is logged and binding is tried again every `retry` in the background until it
/// works or `shutdown` is cancelled. (The liveness probe, on the same port, decides whether the
/// pod is restarted meanwhile.)
pub async fn serve_or_retry(
    addr: SocketAddr,
    metrics: Metrics,
    ready: watch::Receiver<bool>,
    shutdown: tokio_util::sync::CancellationToken,
    retry: std::time::Duration,
) {
    match serve(addr, metrics.clone(), ready.clone(), shutdown.clone()).await {
        Ok(bound) => tracing::info!(addr = %bound, "serving metrics"),
        Err(e) => {
            tracing::error!(addr = %addr, error = %e, retry_in = ?retry,
                "cannot serve metrics; working on without them and trying again");
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    match serve(addr, metrics.clone(), ready.clone(), shutdown.clone()).await {
                        Ok(bound) => {
                            tracing::info!(addr = %bound, "serving metrics");
                            return;
                        }
                        Err(e) => tracing::debug!(addr = %addr, error = %e, "still cannot serve metrics"),
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_node_labelled_metrics() {
        let m = Metrics::new("n1");
        m.set(&m.reboot_required, 1);
        m.set_state("draining");
        m.fail("drain", "drain_timeout");
        let text = m.render();
        assert!(text.contains("kreboot_reboot_required{node=\"n1\"} 1"), "{text}");
        assert!(
            text.contains("kreboot_state{node=\"n1\",state=\"draining\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kreboot_state{node=\"n1\",state=\"idle\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("kreboot_failures_total{node=\"n1\",reason=\"drain_timeout\",step=\"drain\"} 1"),
            "{text}"
        );
        assert!(text.contains("kreboot_config_valid{node=\"n1\"} 1"), "{text}");
        m.notifications.with_label_values(&["slack", "sent"]).inc();
        assert!(
            m.render()
                .contains("kreboot_notifications_total{result=\"sent\",target_kind=\"slack\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn sentinel_watch_mode_is_one_of_two() {
        let m = Metrics::new("n1");
        m.set_sentinel_watch_mode("poll");
        let text = m.render();
        assert!(
            text.contains("kreboot_sentinel_watch_mode{mode=\"poll\",node=\"n1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kreboot_sentinel_watch_mode{mode=\"inotify\",node=\"n1\"} 0"),
            "{text}"
        );
        m.set_sentinel_watch_mode("inotify");
        assert!(
            m.render()
                .contains("kreboot_sentinel_watch_mode{mode=\"inotify\",node=\"n1\"} 1")
        );
    }
}
