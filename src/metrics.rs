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

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn fgauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(g.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    g
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c =
        IntCounterVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic!("metric {name}: {e}"));
    r.register(Box::new(c.clone()))
        .unwrap_or_else(|e| panic!("metric {name}: {e}"));
    c
}

impl Metrics {
    /// Registers every metric for `node`.
    ///
    /// # Panics
    /// Only on a programming error in the metric definitions below (names are constants), which
    /// the unit tests exercise.
    pub fn new(node: &str) -> Metrics {
        let r = Registry::new();
        let n = &["node"];
        let drain_duration = HistogramVec::new(
            HistogramOpts::new("kreboot_drain_duration_seconds", "Time taken by drains.")
                .buckets(vec![1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0]),
            &["node", "outcome"],
        )
        .unwrap_or_else(|e| panic!("drain histogram: {e}"));
        r.register(Box::new(drain_duration.clone()))
            .unwrap_or_else(|e| panic!("drain histogram: {e}"));
        let m = Metrics {
            node: node.to_owned(),
            reboot_required: gauge(
                &r,
                "kreboot_reboot_required",
                "1 when the node needs a reboot.",
                n,
            ),
            reboot_required_since: fgauge(
                &r,
                "kreboot_reboot_required_since_timestamp_seconds",
                "Unix time at which the node started needing a reboot (0 when it does not).",
                n,
            ),
            state: gauge(
                &r,
                "kreboot_state",
                "1 for the node's current lifecycle state.",
                &["node", "state"],
            ),
            window_open: gauge(
                &r,
                "kreboot_window_open",
                "1 while a maintenance window is open for the node.",
                n,
            ),
            blocked: gauge(
                &r,
                "kreboot_reboot_blocked",
                "1 while a reboot is held back, by reason.",
                &["node", "reason"],
            ),
            lock_held: gauge(
                &r,
                "kreboot_lock_held",
                "1 while the node holds a reboot lock slot.",
                n,
            ),
            cordoned: gauge(
                &r,
                "kreboot_node_cordoned",
                "1 while the node is cordoned by kreboot (not by an administrator).",
                n,
            ),
            config_valid: gauge(
                &r,
                "kreboot_config_valid",
                "1 when the last policy ConfigMap was valid.",
                n,
            ),
            config_last_reload: fgauge(
                &r,
                "kreboot_config_last_reload_timestamp_seconds",
                "Unix time of the last successful policy load.",
                n,
            ),
            reboot_loop_backoff: gauge(
                &r,
                "kreboot_reboot_loop_backoff",
                "1 while a reboot is held back because the node rebooted recently and still needs one.",
                n,
            ),
            drain_duration,
            evictions: counter(&r, "kreboot_evictions_total", "Pods evicted.", n),
            eviction_retries: counter(
                &r,
                "kreboot_eviction_retries_total",
                "Evictions refused and retried.",
                n,
            ),
            reboots: counter(&r, "kreboot_reboots_total", "Reboots requested.", n),
            reboots_completed: counter(
                &r,
                "kreboot_reboots_completed_total",
                "Reboots completed (the node came back with a new boot id and the cycle ended).",
                n,
            ),
            failures: counter(
                &r,
                "kreboot_failures_total",
                "Failed lifecycle steps.",
                &["node", "step", "reason"],
            ),
            build_info: gauge(&r, "kreboot_build_info", "Build information.", &["version"]),
            required_reason: gauge(
                &r,
                "kreboot_reboot_required_info",
                "1 while a reboot is needed, labelled with the reason (bounded list of packages).",
                &["node", "reason"],
            ),
            node_info: gauge(
                &r,
                "kreboot_node_info",
                "The host's operating system and running kernel.",
                &["node", "os", "os_version", "kernel"],
            ),
            notifications: counter(
                &r,
                "kreboot_notifications_total",
                "Operator notifications (--notify-url) by target kind and result (sent, failed, dropped).",
                &["target_kind", "result"],
            ),
            health_gate_failed: gauge(
                &r,
                "kreboot_health_gate_failed",
                "1 while the node, rebooted, is past its rule's health gate timeout and keeps its lock slot (the rollout is stopped): the Node or a DaemonSet pod on it is not Ready.",
                n,
            ),
            host_access_ok: gauge(
                &r,
                "kreboot_host_access_ok",
                "1 when the last preflight proved the reboot can reach the host (its namespaces open, PID 1 may be signalled); 0 when refused.",
                n,
            ),
            paused: gauge(
                &r,
                "kreboot_paused",
                "1 while this node needs a reboot and an operator has paused reboots cluster-wide (kreboot pause); 0 otherwise.",
                n,
            ),
            clock_skew: fgauge(
                &r,
                "kreboot_clock_skew_seconds",
                "This host's clock minus the API server's, from its Date header (whole seconds, so within about 1 s); positive: this host is ahead.",
                n,
            ),
            sentinel_watch_mode: gauge(
                &r,
                "kreboot_sentinel_watch_mode",
                "1 for the way the sentinel file is watched: inotify, or poll (inotify unavailable).",
                &["node", "mode"],
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.config_valid.with_label_values(&[node]).set(1);
        m.set_state("idle");
        m.reboot_required.with_label_values(&[node]).set(0);
        m.paused.with_label_values(&[node]).set(0);
        // Counters from zero at start, not from their first increment: every agent restarts
        // with its node, and a series that appears only with its first event (often in a process
        // the reboot then kills) gives `increase()` nothing to compare, and a dashboard nothing.
        m.reboots.with_label_values(&[node]).inc_by(0);
        m.reboots_completed.with_label_values(&[node]).inc_by(0);
        m.evictions.with_label_values(&[node]).inc_by(0);
        for outcome in ["success", "failure"] {
            let _ = m.drain_duration.with_label_values(&[node, outcome]);
        }
        m
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
