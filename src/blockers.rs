//! What holds a reboot back besides the maintenance window: pods on the node that match a
//! blocking selector (`--blocking-pod-selector`), and firing Prometheus alerts
//! (`--prometheus-url`, filtered as kured filters them). The agent checks them right before it
//! takes the lock, before the drain and before the reboot; the reason shows as
//! `kreboot_reboot_blocked{reason}`, a `RebootBlocked` Event and the Node annotation
//! `kreboot.io/blocked-by`.
//!
//! A blocker that cannot be checked (Prometheus unreachable, the pod list failing) blocks: a
//! reboot is never started on the strength of a check that did not happen.
//!
//! With `--alertmanager-url`, an alert that Alertmanager has silenced or inhibited does not
//! block (kured #499: an operator who silenced an alert has said it is known and harmless).
//! Prometheus stays the source of what fires; Alertmanager is only asked which of those alerts
//! are suppressed ([`unsuppressed`]). An alert Alertmanager does not know (not sent yet, a
//! pending alert, relabelled on its way) still blocks, and an Alertmanager that cannot be asked
//! blocks, as an unreachable Prometheus does.

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
    /// Alertmanager's base URL (`--alertmanager-url`): alerts it reports as silenced or
    /// inhibited do not block. None: every alert Prometheus reports counts (kured's behaviour).
    pub alertmanager: Option<String>,
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

/// One alert as Alertmanager's `GET /api/v2/alerts` reports it.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
pub struct AmAlert {
    /// The labels Prometheus sent (its alert's labels, plus Prometheus's external labels).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Whether Alertmanager suppresses it, and by what.
    #[serde(default)]
    pub status: AmStatus,
}

/// `status` of an Alertmanager alert.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AmStatus {
    /// `active`, `suppressed` or `unprocessed`.
    #[serde(default)]
    pub state: String,
    /// The ids of the silences that mute it.
    #[serde(default)]
    pub silenced_by: Vec<String>,
    /// The fingerprints of the alerts that inhibit it.
    #[serde(default)]
    pub inhibited_by: Vec<String>,
}

impl AmAlert {
    /// Silenced or inhibited. Only those two: an alert muted by a time interval (newer
    /// Alertmanagers) is merely not notified at that hour, which says nothing about it being
    /// harmless, so it still blocks.
    fn suppressed(&self) -> bool {
        self.status.state == "suppressed"
            && (!self.status.silenced_by.is_empty() || !self.status.inhibited_by.is_empty())
    }

    /// Whether this is Alertmanager's copy of Prometheus alert `a`: it carries every label of
    /// `a` with the same value. Alertmanager's copy may carry more (Prometheus adds its
    /// `external_labels` when it sends), never fewer or different ones.
    fn copy_of(&self, a: &Alert) -> bool {
        a.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// The alerts of `alerts` (Prometheus's) that Alertmanager does not suppress: an alert is
/// dropped only when Alertmanager knows it (at least one copy, see [`AmAlert::copy_of`]) and
/// every copy it has is silenced or inhibited. Unknown to Alertmanager (not sent yet, pending,
/// relabelled): kept, it blocks. Two copies (two Prometheus replicas with different external
/// labels) of which one is active: kept, as Alertmanager would notify for that one.
pub fn unsuppressed(alerts: &[Alert], am: &[AmAlert]) -> Vec<Alert> {
    alerts
        .iter()
        .filter(|a| {
            let mut copies = am.iter().filter(|m| m.copy_of(a)).peekable();
            copies.peek().is_none() || !copies.all(AmAlert::suppressed)
        })
        .cloned()
        .collect()
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
        return alert_reason(p).await;
    }
    None
}

/// What the alerts hold a reboot back by: `alerts: A, B`, a reason why they could not be
/// checked, or None when no alert blocks.
pub async fn alert_reason(p: &AlertBlocker) -> Option<String> {
    // A client per check: checks are minutes apart and only while a reboot is pending.
    let http = match reqwest::Client::builder().build() {
        Ok(h) => h,
        Err(e) => return Some(format!("cannot query Prometheus alerts: {e}")),
    };
    let alerts = match query_alerts(&http, &p.url).await {
        Ok(alerts) => alerts,
        Err(e) => return Some(format!("cannot query Prometheus alerts: {e}")),
    };
    // Alertmanager is asked only when something would block: with nothing firing its answer
    // cannot change the outcome, and an Alertmanager that is down then holds nothing back.
    let mut names = blocking_alerts(&alerts, p);
    if let Some(am) = p.alertmanager.as_deref()
        && !names.is_empty()
    {
        match query_alertmanager(&http, am).await {
            Ok(am_alerts) => names = blocking_alerts(&unsuppressed(&alerts, &am_alerts), p),
            Err(e) => return Some(format!("cannot query Alertmanager for silences: {e}")),
        }
    }
    (!names.is_empty()).then(|| reason("alerts", &names))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryResponse {
    status: String,
    #[serde(default)]
    data: Option<QueryData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueryData {
    result_type: String,
    #[serde(default)]
    result: serde_json::Value,
}

#[derive(Deserialize)]
struct QuerySeries {
    #[serde(default)]
    metric: std::collections::BTreeMap<String, String>,
}

/// Evaluates PromQL `query` at Prometheus's present (`/api/v1/query`) and returns the label
/// sets of the series it returns (a vector or a matrix).
///
/// # Errors
/// A transport error, Prometheus's own error (a query it cannot parse or run), or a scalar or
/// string result: such a query always has a value, so "no series" could never be reached.
pub async fn query_series(
    http: &reqwest::Client,
    base: &str,
    query: &str,
) -> Result<Vec<std::collections::BTreeMap<String, String>>, String> {
    let (url, resp) = get(http, base, "/api/v1/query", &[("query", query)]).await?;
    let status = resp.status();
    // Prometheus answers a bad query with 400 and a JSON error: read the body either way.
    let body: QueryResponse = resp
        .json()
        .await
        .map_err(|e| format!("{url}: HTTP {status}, not a Prometheus answer: {e}"))?;
    if body.status != "success" {
        return Err(body.error.unwrap_or_else(|| format!("status {}", body.status)));
    }
    let data = body
        .data
        .ok_or_else(|| format!("{url}: a success without data"))?;
    match data.result_type.as_str() {
        "vector" | "matrix" => {
            let series: Vec<QuerySeries> = serde_json::from_value(data.result)
                .map_err(|e| format!("{url}: not a Prometheus result: {e}"))?;
            Ok(series.into_iter().map(|s| s.metric).collect())
        }
        other => Err(format!(
            "the query returns a {other}, which always has a value: write one that returns series (an instant vector, e.g. `up{{job=\"x\"}} == 0`)"
        )),
    }
}

/// Reads Alertmanager's `/api/v2/alerts` (every alert it holds: active, silenced, inhibited,
/// unprocessed).
///
/// # Errors
/// A transport error, a non-success status or an answer that is not Alertmanager's.
pub async fn query_alertmanager(http: &reqwest::Client, base: &str) -> Result<Vec<AmAlert>, String> {
    let (url, resp) = get(http, base, "/api/v2/alerts", &[]).await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    resp.json()
        .await
        .map_err(|e| format!("{url}: HTTP {status}, not an Alertmanager answer: {e}"))
}

/// GETs `path` (with the query `params`) of the server at `base`, within [`PROMETHEUS_TIMEOUT`]:
/// the URL asked (for messages) and the response, or a transport error naming the URL.
async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    params: &[(&str, &str)],
) -> Result<(String, reqwest::Response), String> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = http
        .get(&url)
        .query(params)
        .timeout(PROMETHEUS_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok((url, resp))
}

/// Reads `/api/v1/alerts`.
///
/// # Errors
/// A transport error, a non-success status or an answer that is not Prometheus's.
pub async fn query_alerts(http: &reqwest::Client, base: &str) -> Result<Vec<Alert>, String> {
    let (url, resp) = get(http, base, "/api/v1/alerts", &[]).await?;
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
            alertmanager: None,
        }
    }

    fn am(labels: &[(&str, &str)], state: &str, silenced: &[&str], inhibited: &[&str]) -> AmAlert {
        AmAlert {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            status: AmStatus {
                state: state.into(),
                silenced_by: silenced.iter().map(|s| s.to_string()).collect(),
                inhibited_by: inhibited.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    #[test]
    fn silenced_and_inhibited_alerts_do_not_block_unknown_ones_do() {
        let mut disk = alert("DiskFilling", "firing");
        disk.labels.insert("instance".into(), "n1".into());
        let alerts = [
            alert("Silenced", "firing"),
            alert("Inhibited", "firing"),
            alert("Active", "firing"),
            alert("NotSentYet", "firing"),
            alert("Pending", "pending"),
            disk,
        ];
        let am_alerts = [
            // Prometheus's external labels ride along: still the same alert.
            am(
                &[("alertname", "Silenced"), ("cluster", "prod")],
                "suppressed",
                &["s1"],
                &[],
            ),
            am(&[("alertname", "Inhibited")], "suppressed", &[], &["fp"]),
            am(&[("alertname", "Active")], "active", &[], &[]),
            // A silence on another instance's alert does not silence this one.
            am(
                &[("alertname", "DiskFilling"), ("instance", "n2")],
                "suppressed",
                &["s2"],
                &[],
            ),
        ];
        let left = unsuppressed(&alerts, &am_alerts);
        assert_eq!(
            blocking_alerts(&left, &blocker(None, false, false)),
            ["Active", "DiskFilling", "NotSentYet", "Pending"]
        );
        // Alertmanager knows nothing: everything blocks, exactly as without it.
        assert_eq!(unsuppressed(&alerts, &[]), alerts);
    }

    #[test]
    fn one_active_copy_keeps_an_alert_blocking() {
        let alerts = [alert("NodeDown", "firing")];
        // Two Prometheus replicas (external label `replica`): one copy silenced, one not.
        let copies = [
            am(
                &[("alertname", "NodeDown"), ("replica", "a")],
                "suppressed",
                &["s"],
                &[],
            ),
            am(&[("alertname", "NodeDown"), ("replica", "b")], "active", &[], &[]),
        ];
        assert_eq!(unsuppressed(&alerts, &copies), alerts);
        assert!(unsuppressed(&alerts, &copies[..1]).is_empty());
        // `suppressed` without a silence or an inhibition (a mute time interval) is not a
        // statement that the alert is harmless.
        let muted = [am(&[("alertname", "NodeDown")], "suppressed", &[], &[])];
        assert_eq!(unsuppressed(&alerts, &muted), alerts);
        let unprocessed = [am(&[("alertname", "NodeDown")], "unprocessed", &[], &[])];
        assert_eq!(unsuppressed(&alerts, &unprocessed), alerts);
    }

    #[test]
    fn an_alertmanager_answer_parses() {
        let body = r#"[{"annotations":{},"endsAt":"2026-12-02T22:00:00Z","fingerprint":"f",
            "receivers":[{"name":"none"}],"startsAt":"2026-12-02T21:00:00Z",
            "status":{"inhibitedBy":[],"silencedBy":["abc"],"state":"suppressed"},
            "updatedAt":"2026-12-02T21:00:00Z","labels":{"alertname":"A"}}]"#;
        let parsed: Vec<AmAlert> = serde_json::from_str(body).unwrap();
        assert_eq!(parsed, [am(&[("alertname", "A")], "suppressed", &["abc"], &[])]);
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
