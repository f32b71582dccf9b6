//! What holds a reboot back besides the maintenance window: pods on the node that match a
//! blocking selector (`--blocking-pod-selector`), and firing Prometheus alerts
//! (`--prometheus-url`, filtered as kured filters them). The agent checks them right before it
//! takes the lock, before the drain and before the reboot; the reason shows as
//! `kreboot_reboot_blocked{reason}`, a `RebootBlocked` Event and the Node annotation
//! `kreboot.io/blocked-by`.
//!
//! A blocker that cannot be checked (Prometheus unreachable, the pod list failing) blocks: a
//! reboot is never started on the strength of a check that did not happen.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ListParams, ResourceExt},
};
use regex::Regex;
use serde::Deserialize;

/// How long one Prometheus query may take.
const PROMETHEUS_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many names are listed in a reason.
const MAX_NAMES: usize = 5;

/// The blockers configured for an agent.
#[derive(Debug, Clone, Default)]
pub struct BlockerConfig {
    /// Label selectors; a running pod on the node matching any of them blocks.
    pub pod_selectors: Vec<String>,
    /// Prometheus alerts that block.
    pub prometheus: Option<AlertBlocker>,
    /// How often a blocked node checks again.
    pub interval: Duration,
}

impl BlockerConfig {
    /// Whether any blocker is configured.
    pub fn any(&self) -> bool {
        !self.pod_selectors.is_empty() || self.prometheus.is_some()
    }
}

/// Prometheus alerts as blockers, with kured's filter semantics.
#[derive(Debug, Clone)]
pub struct AlertBlocker {
    /// Base URL, e.g. `http://prometheus.monitoring:9090`.
    pub url: String,
    /// Alert names matching this are ignored (or, with `match_only`, the only ones counted).
    pub filter: Option<Regex>,
    /// Count only alerts whose names match `filter`.
    pub match_only: bool,
    /// Count only firing alerts (not pending ones).
    pub firing_only: bool,
}

/// One alert as Prometheus's `/api/v1/alerts` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Alert {
    /// The alert's labels (`alertname` among them).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// `firing` or `pending`.
    #[serde(default)]
    pub state: String,
}

#[derive(Deserialize)]
struct AlertsResponse {
    status: String,
    #[serde(default)]
    data: Option<AlertsData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct AlertsData {
    #[serde(default)]
    alerts: Vec<Alert>,
}

/// The names of the alerts that block, sorted and unique.
pub fn blocking_alerts(alerts: &[Alert], b: &AlertBlocker) -> Vec<String> {
    let mut names: Vec<String> = alerts
        .iter()
        .filter(|a| !b.firing_only || a.state == "firing")
        .filter_map(|a| a.labels.get("alertname"))
        .filter(|name| match (&b.filter, b.match_only) {
            (None, _) => true,
            (Some(re), true) => re.is_match(name),
            (Some(re), false) => !re.is_match(name),
        })
        .cloned()
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Whether a pod still runs (finished pods do not block).
fn running(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed")) && pod.metadata.deletion_timestamp.is_none()
}

/// A reason text listing at most [`MAX_NAMES`] names.
pub fn reason(kind: &str, names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(MAX_NAMES).map(String::as_str).collect();
    let more = names.len().saturating_sub(MAX_NAMES);
    if more > 0 {
        format!("{kind}: {} and {more} more", shown.join(", "))
    } else {
        format!("{kind}: {}", shown.join(", "))
    }
}

/// The metric label of a reason text (`blocking_pods`, `alerts`, `blocker_error`).
pub fn metric_label(reason: &str) -> &'static str {
    if reason.starts_with("pods:") {
        "blocking_pods"
    } else if reason.starts_with("alerts:") {
        "alerts"
    } else {
        "blocker_error"
    }
}

/// Checks every blocker; `Ok(None)` when nothing blocks, `Ok(Some(reason))` when something does
/// (including a blocker that could not be checked).
pub async fn check(client: &Client, node: &str, cfg: &BlockerConfig) -> Option<String> {
    if !cfg.pod_selectors.is_empty() {
        let pods: Api<Pod> = Api::all(client.clone());
        let mut names = Vec::new();
        for selector in &cfg.pod_selectors {
            let lp = ListParams::default()
                .labels(selector)
                .fields(&format!("spec.nodeName={node}"));
            match pods.list(&lp).await {
                Ok(list) => names.extend(
                    list.items
                        .iter()
                        .filter(|p| running(p))
                        .map(|p| format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())),
                ),
                Err(e) => return Some(format!("cannot list pods matching {selector:?}: {e}")),
            }
        }
        names.sort();
        names.dedup();
        if !names.is_empty() {
            return Some(reason("pods", &names));
        }
    }
    if let Some(p) = &cfg.prometheus {
        // A client per check: checks are minutes apart and only while a reboot is pending.
        let http = match reqwest::Client::builder().build() {
            Ok(h) => h,
            Err(e) => return Some(format!("cannot query Prometheus alerts: {e}")),
        };
        match query_alerts(&http, &p.url).await {
            Ok(alerts) => {
                let names = blocking_alerts(&alerts, p);
                if !names.is_empty() {
                    return Some(reason("alerts", &names));
                }
            }
            Err(e) => return Some(format!("cannot query Prometheus alerts: {e}")),
        }
    }
    None
}

/// Reads `/api/v1/alerts`.
///
/// # Errors
/// A transport error, a non-success status or an answer that is not Prometheus's.
pub async fn query_alerts(http: &reqwest::Client, base: &str) -> Result<Vec<Alert>, String> {
    let url = format!("{}/api/v1/alerts", base.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .timeout(PROMETHEUS_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body: AlertsResponse = resp
        .json()
        .await
        .map_err(|e| format!("{url}: HTTP {status}, not a Prometheus answer: {e}"))?;
    if body.status != "success" {
        return Err(format!(
            "{url}: {}",
            body.error.unwrap_or_else(|| format!("status {}", body.status))
        ));
    }
    Ok(body.data.map(|d| d.alerts).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(name: &str, state: &str) -> Alert {
        Alert {
            labels: [("alertname".to_string(), name.to_string())].into(),
            state: state.into(),
        }
    }

    fn blocker(filter: Option<&str>, match_only: bool, firing_only: bool) -> AlertBlocker {
        AlertBlocker {
            url: String::new(),
            filter: filter.map(|f| Regex::new(f).unwrap()),
            match_only,
            firing_only,
        }
    }

    #[test]
    fn kured_filter_semantics() {
        let alerts = [
            alert("Watchdog", "firing"),
            alert("NodeDown", "firing"),
            alert("DiskFilling", "pending"),
            alert("NodeDown", "firing"),
        ];
        // No filter: everything, unique and sorted.
        assert_eq!(
            blocking_alerts(&alerts, &blocker(None, false, false)),
            ["DiskFilling", "NodeDown", "Watchdog"]
        );
        // The filter drops matching alerts...
        assert_eq!(
            blocking_alerts(&alerts, &blocker(Some("^Watchdog$"), false, false)),
            ["DiskFilling", "NodeDown"]
        );
        // ...or, match-only, keeps only them.
        assert_eq!(
            blocking_alerts(&alerts, &blocker(Some("^Node"), true, false)),
            ["NodeDown"]
        );
        // Firing only: pending alerts do not block.
        assert_eq!(
            blocking_alerts(&alerts, &blocker(Some("^Watchdog$"), false, true)),
            ["NodeDown"]
        );
        assert!(blocking_alerts(&[], &blocker(None, false, false)).is_empty());
    }

    #[test]
    fn reasons_are_bounded_and_labelled() {
        let names: Vec<String> = (0..8).map(|i| format!("ns/p{i}")).collect();
        let r = reason("pods", &names);
        assert_eq!(r, "pods: ns/p0, ns/p1, ns/p2, ns/p3, ns/p4 and 3 more");
        assert_eq!(metric_label(&r), "blocking_pods");
        assert_eq!(metric_label("alerts: A"), "alerts");
        assert_eq!(
            metric_label("cannot query Prometheus alerts: refused"),
            "blocker_error"
        );
    }
}
