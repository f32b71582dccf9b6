//! `kreboot status`: what kreboot is doing across the cluster, for an operator.
//!
//! This module owns the status report. [`build`] turns the Nodes (kreboot's annotations and
//! labels on them), the lock Leases and the policy document into a [`ClusterStatus`]: plain
//! data, printed as JSON or YAML as it is. [`render_table`] prints it kubectl-style. Both are
//! plain functions of their inputs and of the instant `now` passed in: they read no clock and
//! do no I/O. [`run`] is the thin shell that reads the cluster with the user's own credentials
//! (any kubeconfig) and prints.

use std::{collections::BTreeMap, fmt::Write as _, process::ExitCode, time::Duration as StdDuration};

use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{ConfigMap, Node},
};
use kube::{Api, api::ListParams};
use serde::{Serialize, Serializer};

use crate::{
    cli::{StatusArgs, StatusFormat},
    lock::{self, CLOCK_SKEW_ALLOWANCE, SlotStatus},
    node::{
        self, ANN_BLOCKED_BY, ANN_LAST_FAILURE_REASON, ANN_PHASE, ANN_REBOOT_REQUIRED_SINCE,
        ANN_WAITING_SINCE,
    },
    policy::{HORIZON_DAYS, Labels, Policy},
};

/// Longest text shown in a table cell; the JSON and YAML output carry the whole value.
const CELL_MAX: usize = 40;

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The instant the report is about (relative ages are computed from it).
    #[serde(serialize_with = "ser_time")]
    pub now: DateTime<Utc>,
    /// Every Node, by name.
    pub nodes: Vec<NodeStatus>,
    /// The lock slots (Leases), slot 0 first.
    pub locks: Vec<LockSlot>,
    /// The nodes waiting for a lock slot, first served first.
    pub queue: Vec<QueueEntry>,
    /// The policy in force.
    pub policy: PolicyStatus,
    /// An operator's cluster-wide pause (`kreboot pause`; None: not paused).
    pub paused: Option<crate::pause::Pause>,
    /// Counts over the nodes and slots.
    pub summary: Summary,
}

/// One Node as kreboot sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    /// The Node's name.
    pub name: String,
    /// `idle`, `pending` (needs a reboot, not queued), `waiting` (queued for a lock slot), or
    /// the recorded phase of a cycle in progress (`draining`, `rebooting`).
    pub state: String,
    /// A reboot is required (`reboot-required-since` recorded) or a cycle is in progress.
    pub needs_reboot: bool,
    /// Since when a reboot is required.
    #[serde(serialize_with = "ser_opt_time")]
    pub since: Option<DateTime<Utc>>,
    /// Why a reboot is required (the packages, or an operator's request).
    pub reason: Option<String>,
    /// An operator's reboot request (`kreboot reboot`), until the reboot completes.
    pub reboot_requested: Option<node::RebootRequest>,
    /// What holds the pending reboot back (`kreboot.io/blocked-by`).
    pub blocked_by: Option<String>,
    /// Since when the node waits for a lock slot.
    #[serde(serialize_with = "ser_opt_time")]
    pub waiting_since: Option<DateTime<Utc>>,
    /// The lock slot named for the cycle in progress.
    pub lock: Option<String>,
    /// When the last reboot kreboot caused completed.
    #[serde(serialize_with = "ser_opt_time")]
    pub last_reboot: Option<DateTime<Utc>>,
    /// When the last cycle failed.
    #[serde(serialize_with = "ser_opt_time")]
    pub last_failure: Option<DateTime<Utc>>,
    /// Why the last cycle failed.
    pub last_failure_reason: Option<String>,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// kreboot cordoned it in the cycle in progress (and will uncordon it); a node cordoned
    /// otherwise is left alone.
    pub cordoned_by_kreboot: bool,
    /// The Ready condition is True.
    pub ready: bool,
    /// The policy rule that selects the node (None: the top-level windows, or no valid policy).
    pub rule: Option<String>,
    /// The node's schedule allows a reboot now (None: no valid policy to tell).
    pub window_open: Option<bool>,
    /// Start of the current or next window (`now` when open; None: none within the horizon or
    /// no valid policy).
    #[serde(serialize_with = "ser_opt_time")]
    pub next_window: Option<DateTime<Utc>>,
    /// End of that window (None: it does not close within the horizon).
    #[serde(serialize_with = "ser_opt_time")]
    pub next_window_end: Option<DateTime<Utc>>,
    /// kreboot annotations that could not be understood.
    pub problems: Vec<String>,
}

/// One lock slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LockSlot {
    /// The Lease's name.
    pub name: String,
    /// The node holding it.
    pub holder: Option<String>,
    /// `free`, `held` or `expired` (the holder stopped renewing: other nodes may take it over
    /// once the holder is out of its cycle).
    pub state: String,
    /// When the holder last renewed it (or acquired it).
    #[serde(serialize_with = "ser_opt_time")]
    pub renewed: Option<DateTime<Utc>>,
    /// An estimate of when it expires unless renewed: renewal + lease duration + the
    /// clock-skew allowance (None: free, or no times recorded). The agents judge expiry by
    /// how long they have watched the Lease unchanged, not by this (see `lock`).
    #[serde(serialize_with = "ser_opt_time")]
    pub expires: Option<DateTime<Utc>>,
    /// Expired at `now`.
    pub expired: bool,
    /// The holder names no existing Node (a ghost lock: taken over at once by a waiter).
    pub holder_gone: bool,
}

/// One node in the queue for a lock slot.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueEntry {
    /// 1 = next to get a slot.
    pub position: usize,
    /// The node.
    pub node: String,
    /// Since when it waits.
    #[serde(serialize_with = "ser_opt_time")]
    pub since: Option<DateTime<Utc>>,
}

/// The policy ConfigMap as read.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// Where it was read from (`namespace/name`), when known.
    pub source: Option<String>,
    /// The ConfigMap exists.
    pub present: bool,
    /// It parsed and validated (a missing ConfigMap is valid: reboots at any time).
    pub valid: bool,
    /// Why it was rejected. Agents then keep the last good policy they saw (none: no reboots).
    pub error: Option<String>,
    /// Time zone of the top-level schedule.
    pub time_zone: Option<String>,
    /// The top-level schedule (nodes that no rule selects) allows a reboot now.
    pub open_now: Option<bool>,
    /// Number of per-pool rules.
    pub rules: usize,
}

/// Counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Nodes.
    pub nodes: usize,
    /// Nodes that need a reboot (any state but idle).
    pub needs_reboot: usize,
    /// Pending, not queued.
    pub pending: usize,
    /// Queued for a lock slot.
    pub waiting: usize,
    /// In a cycle (draining, rebooting).
    pub in_cycle: usize,
    /// Unschedulable.
    pub cordoned: usize,
    /// Unschedulable because kreboot cordoned them.
    pub cordoned_by_kreboot: usize,
    /// Not Ready.
    pub not_ready: usize,
    /// Lock slots that exist.
    pub lock_slots: usize,
    /// Lock slots held (expired ones included).
    pub locks_held: usize,
}

fn ser_time<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&node::format_time(*t))
}

fn ser_opt_time<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_some(&node::format_time(*t)),
        None => s.serialize_none(),
    }
}

/// The policy document as found.
#[derive(Debug, Clone, Copy)]
pub enum PolicyInput<'a> {
    /// No ConfigMap: reboots allowed at any time.
    Missing,
    /// The `config.yaml` document.
    Document(&'a str),
    /// The ConfigMap exists but is unusable for another reason (e.g. no `config.yaml` key).
    Unusable(&'a str),
}

/// The report for `nodes`, the lock `leases` and the policy document (None: no ConfigMap).
pub fn build(
    nodes: &[Node],
    leases: &[Lease],
    policy_doc: Option<&str>,
    now: DateTime<Utc>,
) -> ClusterStatus {
    build_with(
        nodes,
        leases,
        policy_doc.map_or(PolicyInput::Missing, PolicyInput::Document),
        now,
    )
}

/// [`build`], telling an unusable ConfigMap apart.
pub fn build_with(
    nodes: &[Node],
    leases: &[Lease],
    input: PolicyInput<'_>,
    now: DateTime<Utc>,
) -> ClusterStatus {
    let (policy, mut policy_status) = policy_status(input, now);
    let mut windows = BTreeMap::new();
    let mut node_rows: Vec<NodeStatus> = nodes
        .iter()
        .map(|n| node_status(n, policy.as_ref(), &mut windows, now))
        .collect();
    node_rows.sort_by(|a, b| a.name.cmp(&b.name));
    let mut queue: Vec<&NodeStatus> = node_rows.iter().filter(|n| n.state == "waiting").collect();
    // Unknown times last, then by name: the agents' own order is by waiting-since.
    queue.sort_by(|a, b| {
        (a.waiting_since.is_none(), a.waiting_since, &a.name).cmp(&(
            b.waiting_since.is_none(),
            b.waiting_since,
            &b.name,
        ))
    });
    let queue = queue
        .into_iter()
        .enumerate()
        .map(|(i, n)| QueueEntry {
            position: i + 1,
            node: n.name.clone(),
            since: n.waiting_since,
        })
        .collect();
    let mut locks: Vec<LockSlot> = leases.iter().map(|l| lock_slot(l, &node_rows, now)).collect();
    locks.sort_by(|a, b| slot_order(&a.name).cmp(&slot_order(&b.name)));
    let summary = summarise(&node_rows, &locks);
    policy_status.rules = policy.as_ref().map_or(0, Policy::rule_count);
    ClusterStatus {
        now,
        nodes: node_rows,
        locks,
        queue,
        policy: policy_status,
        paused: None,
        summary,
    }
}

fn policy_status(input: PolicyInput<'_>, now: DateTime<Utc>) -> (Option<Policy>, PolicyStatus) {
    let mut status = PolicyStatus {
        source: None,
        present: true,
        valid: false,
        error: None,
        time_zone: None,
        open_now: None,
        rules: 0,
    };
    let policy = match input {
        PolicyInput::Missing => {
            status.present = false;
            Ok(Policy::default())
        }
        PolicyInput::Document(doc) => Policy::parse(doc).map_err(|e| e.to_string()),
        PolicyInput::Unusable(why) => Err(why.to_owned()),
    };
    match policy {
        Ok(p) => {
            status.valid = true;
            status.time_zone = Some(p.zone().to_string());
            status.open_now = Some(p.top_level_is_open(now));
            (Some(p), status)
        }
        Err(e) => {
            status.error = Some(e);
            (None, status)
        }
    }
}

/// (open now, first window start, its end) by rule index: nodes of one rule share a schedule.
type WindowCache = BTreeMap<Option<usize>, (bool, Option<DateTime<Utc>>, Option<DateTime<Utc>>)>;

fn parse_time(
    annotations: &BTreeMap<String, String>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<DateTime<Utc>> {
    let value = annotations.get(key)?;
    match DateTime::parse_from_rfc3339(value) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(e) => {
            problems.push(format!(
                "{key}={} is not an RFC 3339 time: {e}",
                node::quote(value)
            ));
            None
        }
    }
}

fn non_empty(annotations: &BTreeMap<String, String>, key: &str) -> Option<String> {
    annotations
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn node_status(
    n: &Node,
    policy: Option<&Policy>,
    windows: &mut WindowCache,
    now: DateTime<Utc>,
) -> NodeStatus {
    let view = node::view(n);
    let annotations = n.metadata.annotations.clone().unwrap_or_default();
    let mut problems = view.recorded.problems.clone();
    problems.extend(node::time_problems(&view.recorded, now));
    let since = parse_time(&annotations, ANN_REBOOT_REQUIRED_SINCE, &mut problems);
    let waiting_since = parse_time(&annotations, ANN_WAITING_SINCE, &mut problems);
    let phase = non_empty(&annotations, ANN_PHASE);
    let requested = view.recorded.reboot_requested.clone();
    let needs_reboot =
        annotations.contains_key(ANN_REBOOT_REQUIRED_SINCE) || phase.is_some() || requested.is_some();
    // A request the agent has not taken up yet: pending since it was made.
    let since = since.or_else(|| {
        requested
            .as_ref()
            .and_then(|r| DateTime::parse_from_rfc3339(&r.at).ok())
            .map(|t| t.with_timezone(&Utc))
    });
    let state = match (&phase, view.waiting, needs_reboot) {
        // The phase as recorded, even one this version does not know.
        (Some(p), ..) => p.clone(),
        (None, true, _) => "waiting".to_owned(),
        (None, false, true) => "pending".to_owned(),
        (None, false, false) => "idle".to_owned(),
    };
    let (rule, window_open, next_window, next_window_end) = match policy {
        None => (None, None, None, None),
        Some(p) => {
            let labels: &Labels = &view.labels;
            let rule = p.rule_for(labels);
            let (open, start, end) = *windows.entry(rule.index).or_insert_with(|| {
                let horizon = now.checked_add_signed(Duration::days(HORIZON_DAYS as i64));
                let first = p.upcoming_windows(labels, now, 1).into_iter().next();
                let start = first.map(|(s, _)| s);
                // An interval that reaches the horizon never closes as far as we can tell.
                let end = first.map(|(_, e)| e).filter(|e| horizon.is_none_or(|h| *e < h));
                (p.is_open(labels, now), start, end)
            });
            (rule.name, Some(open), start, end)
        }
    };
    NodeStatus {
        name: n.metadata.name.clone().unwrap_or_default(),
        state,
        needs_reboot,
        since,
        // The agent records the request as the reason when it takes it up; until then, the
        // request itself says why.
        reason: Some(view.recorded.reboot_reason.trim().to_owned())
            .filter(|r| !r.is_empty())
            .or_else(|| requested.as_ref().map(node::RebootRequest::describe)),
        reboot_requested: requested,
        blocked_by: non_empty(&annotations, ANN_BLOCKED_BY),
        waiting_since,
        lock: view.recorded.lock.clone().filter(|l| !l.is_empty()),
        last_reboot: view.recorded.last_reboot,
        last_failure: view.recorded.last_failure,
        last_failure_reason: non_empty(&annotations, ANN_LAST_FAILURE_REASON),
        cordoned: view.unschedulable,
        cordoned_by_kreboot: view.unschedulable && view.recorded.cordoned_by_kreboot,
        ready: view.ready,
        rule,
        window_open,
        next_window,
        next_window_end,
        problems,
    }
}

/// `kreboot-lock` < `kreboot-lock-1` < `kreboot-lock-2` < `kreboot-lock-10`.
fn slot_order(name: &str) -> (&str, u64) {
    match name.rsplit_once('-') {
        Some((stem, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            (stem, n.parse::<u64>().map_or(u64::MAX, |n| n.saturating_add(1)))
        }
        _ => (name, 0),
    }
}

fn lock_slot(lease: &Lease, nodes: &[NodeStatus], now: DateTime<Utc>) -> LockSlot {
    let spec = lease.spec.as_ref();
    let renewed = spec
        .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .and_then(|t| DateTime::from_timestamp_micros(t.0.as_microsecond()));
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .map(|s| Duration::seconds(i64::from(s)));
    let holder = lock::holder(lease).map(str::to_owned);
    // This report has seen each Lease only now: expiry by its own timestamps, as an agent
    // that has just started judges it.
    let (state, expired) = match lock::slot_status(Some(lease), None, now) {
        SlotStatus::Missing | SlotStatus::Free => ("free", false),
        SlotStatus::Held { .. } => ("held", false),
        SlotStatus::Expired { .. } => ("expired", true),
    };
    let expires = match (&holder, renewed, duration) {
        (Some(_), Some(r), Some(d)) => r.checked_add_signed(d + CLOCK_SKEW_ALLOWANCE),
        _ => None,
    };
    LockSlot {
        name: lease.metadata.name.clone().unwrap_or_default(),
        holder_gone: holder
            .as_ref()
            .is_some_and(|h| !nodes.iter().any(|n| &n.name == h)),
        renewed: holder.as_ref().and(renewed),
        holder,
        state: state.to_owned(),
        expires,
        expired,
    }
}

fn summarise(nodes: &[NodeStatus], locks: &[LockSlot]) -> Summary {
    let count = |f: &dyn Fn(&NodeStatus) -> bool| nodes.iter().filter(|n| f(n)).count();
    Summary {
        nodes: nodes.len(),
        needs_reboot: count(&|n| n.needs_reboot),
        pending: count(&|n| n.state == "pending"),
        waiting: count(&|n| n.state == "waiting"),
        in_cycle: count(&|n| !matches!(n.state.as_str(), "idle" | "pending" | "waiting")),
        cordoned: count(&|n| n.cordoned),
        cordoned_by_kreboot: count(&|n| n.cordoned_by_kreboot),
        not_ready: count(&|n| !n.ready),
        lock_slots: locks.len(),
        locks_held: locks.iter().filter(|l| l.holder.is_some()).count(),
    }
}

/// A duration the way kubectl prints ages: its two largest units (`45s`, `5m30s`, `2h13m`,
/// `3d4h`), a single one when the second is zero.
pub fn human_duration(d: Duration) -> String {
    let secs = d.num_seconds().max(0);
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    for (i, (size, name)) in units.iter().enumerate() {
        if secs >= *size || *size == 1 {
            let big = secs / size;
            let mut out = format!("{big}{name}");
            if let Some((next, next_name)) = units.get(i + 1) {
                let small = (secs % size) / next;
                if small > 0 {
                    let _ = write!(out, "{small}{next_name}");
                }
            }
            return out;
        }
    }
    "0s".to_owned()
}

/// `2h13m ago` or `in 2h13m`; `-` for none.
fn relative(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    match t {
        None => "-".to_owned(),
        Some(t) if t <= now => format!("{} ago", human_duration(now - t)),
        Some(t) => format!("in {}", human_duration(t - now)),
    }
}

/// How long ago (kubectl's AGE): `2h13m`; `-` for none.
fn age(t: Option<DateTime<Utc>>, now: DateTime<Utc>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| human_duration(now - t))
}

/// One line, at most `max` characters (`...` marks a cut); `-` for nothing.
fn cell(text: Option<&str>, max: usize) -> String {
    let Some(text) = text else {
        return "-".to_owned();
    };
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() {
        return "-".to_owned();
    }
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(3)).collect();
    cut.truncate(cut.trim_end().len());
    cut + "..."
}

/// Aligned columns, three spaces apart, no trailing spaces.
fn columns(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("   ");
            }
            let _ = write!(line, "{c:<w$}");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn window_cell(n: &NodeStatus, now: DateTime<Utc>) -> String {
    match (n.window_open, n.next_window, n.next_window_end) {
        (None, ..) => "-".to_owned(),
        (Some(true), _, None) => "open".to_owned(),
        (Some(true), _, Some(end)) => format!("open ({} left)", human_duration(end - now)),
        (Some(false), Some(start), _) => relative(Some(start), now),
        (Some(false), None, _) => format!("none within {HORIZON_DAYS}d"),
    }
}

fn cordon_cell(n: &NodeStatus) -> &'static str {
    match (n.cordoned, n.cordoned_by_kreboot) {
        (false, _) => "-",
        (true, true) => "kreboot",
        (true, false) => "admin",
    }
}

fn failure_cell(n: &NodeStatus, now: DateTime<Utc>) -> String {
    match (n.last_failure, &n.last_failure_reason) {
        (None, None) => "-".to_owned(),
        (t, reason) => {
            let when = relative(t, now);
            let text = match reason {
                Some(r) => format!("{when}: {r}"),
                None => when,
            };
            cell(Some(&text), 32)
        }
    }
}

/// The report as kubectl-like text: the nodes, then the LOCK, QUEUE and POLICY sections and a
/// summary line.
pub fn render_table(s: &ClusterStatus) -> String {
    let mut out = String::new();
    render_paused(&mut out, s);
    render_nodes(&mut out, s);
    render_warnings(&mut out, s);
    out.push('\n');
    render_locks(&mut out, s);
    out.push('\n');
    render_queue(&mut out, s);
    out.push('\n');
    out.push_str(&policy_line(&s.policy));
    out.push_str(&summary_line(&s.summary));
    out
}

/// The PAUSED banner, when reboots are paused.
fn render_paused(out: &mut String, s: &ClusterStatus) {
    let now = s.now;
    if let Some(p) = &s.paused {
        // First: it explains every `paused` below.
        let ago =
            p.at.map(|at| format!(" ({} ago)", age(Some(at), now)))
                .unwrap_or_default();
        let _ = writeln!(
            out,
            "PAUSED: reboots are paused {}{ago}; no node starts a reboot until `kreboot resume`
",
            cell(Some(&p.describe()), 200)
        );
    }
}

/// The nodes' table.
fn render_nodes(out: &mut String, s: &ClusterStatus) {
    let now = s.now;
    if s.nodes.is_empty() {
        out.push_str("No nodes.\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.state.clone(),
                    if n.ready { "True" } else { "False" }.to_owned(),
                    cordon_cell(n).to_owned(),
                    match (n.needs_reboot, n.since) {
                        (false, _) => "-".to_owned(),
                        (true, None) => "?".to_owned(),
                        (true, since) => age(since, now),
                    },
                    cell(n.reason.as_deref(), 28),
                    // Wide enough for a health gate's reason (`health_gate: pdb apps/web 1/2 healthy`).
                    cell(n.blocked_by.as_deref(), 48),
                    relative(n.last_reboot, now),
                    failure_cell(n, now),
                    cell(n.rule.as_deref(), 20),
                    window_cell(n, now),
                ]
            })
            .collect();
        out.push_str(&columns(
            &[
                "NAME",
                "STATE",
                "READY",
                "CORDONED",
                "PENDING",
                "REASON",
                "BLOCKED BY",
                "LAST REBOOT",
                "LAST FAILURE",
                "RULE",
                "NEXT WINDOW",
            ],
            &rows,
        ));
    }
}

/// The WARNINGS section, when a node has problems.
fn render_warnings(out: &mut String, s: &ClusterStatus) {
    let problems: Vec<String> = s
        .nodes
        .iter()
        .flat_map(|n| n.problems.iter().map(move |p| format!("  {}: {p}", n.name)))
        .collect();
    if !problems.is_empty() {
        out.push_str("\nWARNINGS\n");
        for p in problems {
            out.push_str(&p);
            out.push('\n');
        }
    }
}

/// The LOCK section: one row per lock Lease.
fn render_locks(out: &mut String, s: &ClusterStatus) {
    let now = s.now;
    if s.locks.is_empty() {
        out.push_str("LOCK: no lock Lease yet (the first node to reboot creates it)\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .locks
            .iter()
            .map(|l| {
                let state = if l.holder_gone {
                    format!("{} (holder Node gone)", l.state)
                } else {
                    l.state.clone()
                };
                vec![
                    l.name.clone(),
                    cell(l.holder.as_deref(), CELL_MAX),
                    relative(l.renewed, now),
                    relative(l.expires, now),
                    state,
                ]
            })
            .collect();
        out.push_str(&columns(
            &["LOCK", "HOLDER", "RENEWED", "EXPIRES", "STATE"],
            &rows,
        ));
    }
}

/// The QUEUE section: the nodes waiting for a slot.
fn render_queue(out: &mut String, s: &ClusterStatus) {
    let now = s.now;
    if s.queue.is_empty() {
        out.push_str("QUEUE: empty\n");
    } else {
        let rows: Vec<Vec<String>> = s
            .queue
            .iter()
            .map(|q| vec![q.position.to_string(), q.node.clone(), age(q.since, now)])
            .collect();
        out.push_str(&columns(&["QUEUE", "NODE", "WAITING"], &rows));
    }
}

fn policy_line(p: &PolicyStatus) -> String {
    let source = p
        .source
        .as_deref()
        .map_or_else(|| "ConfigMap".to_owned(), |s| format!("ConfigMap {s}"));
    if !p.present {
        return format!("POLICY: none ({source} not found): reboots allowed at any time\n");
    }
    if !p.valid {
        let error = p.error.as_deref().unwrap_or("rejected");
        return format!(
            "POLICY: {source} is INVALID: {error}\n        agents keep the last good policy they saw (none: no reboots)\n"
        );
    }
    let mut line = format!(
        "POLICY: {source} valid, time zone {}",
        p.time_zone.as_deref().unwrap_or("UTC")
    );
    match p.open_now {
        Some(true) => line.push_str(", top-level windows open now"),
        Some(false) => line.push_str(", top-level windows closed now"),
        None => {}
    }
    match p.rules {
        0 => {}
        1 => line.push_str(", 1 rule"),
        n => {
            let _ = write!(line, ", {n} rules");
        }
    }
    line.push('\n');
    line
}

fn summary_line(s: &Summary) -> String {
    format!(
        "SUMMARY: {} node{}, {} need a reboot ({} pending, {} waiting, {} in a cycle), {} cordoned ({} by kreboot), {} not Ready; {} of {} lock slots held\n",
        s.nodes,
        if s.nodes == 1 { "" } else { "s" },
        s.needs_reboot,
        s.pending,
        s.waiting,
        s.in_cycle,
        s.cordoned,
        s.cordoned_by_kreboot,
        s.not_ready,
        s.locks_held,
        s.lock_slots,
    )
}

/// Whether `lease` is a slot of lock `lock_name`: labelled so, or named `<lock_name>` or
/// `<lock_name>-<i>`.
pub fn is_slot_of(lease: &Lease, lock_name: &str) -> bool {
    let labelled = lease
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(lock::LOCK_LABEL))
        .is_some_and(|v| v == lock_name);
    let name = lease.metadata.name.as_deref().unwrap_or_default();
    let named = name == lock_name
        || name
            .strip_prefix(lock_name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
    labelled || named
}

/// A failed API call, with what it was for and a hint for the usual causes.
fn api_error(what: &str, e: kube::Error) -> anyhow::Error {
    let hint = match &e {
        kube::Error::Api(s) if s.code == 401 => " (the credentials were refused: check the kubeconfig)",
        kube::Error::Api(s) if s.code == 403 => {
            " (kreboot status needs list on nodes, list on leases and get on configmaps in the namespace)"
        }
        _ => "",
    };
    anyhow::anyhow!("cannot {what}: {e}{hint}")
}

async fn gather(args: &StatusArgs) -> anyhow::Result<ClusterStatus> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    // A one-shot command: fail in bounded time rather than hang on an unreachable server.
    config.connect_timeout = Some(StdDuration::from_secs(10));
    config.read_timeout = Some(StdDuration::from_secs(30));
    let client = crate::connect::client(config).context("cannot build the Kubernetes client")?;
    let ns = args.namespace.as_str();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error("list Nodes", e))?
        .items;
    let leases: Vec<Lease> = Api::<Lease>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(&format!("list Leases in namespace {ns}"), e))?
        .items
        .into_iter()
        .filter(|l| is_slot_of(l, &args.lock_name))
        .collect();
    let cm = Api::<ConfigMap>::namespaced(client, ns)
        .get_opt(&args.config_map)
        .await
        .map_err(|e| api_error(&format!("read ConfigMap {ns}/{}", args.config_map), e))?;
    let now = args.now.unwrap_or_else(Utc::now);
    let no_key;
    let input = match &cm {
        None => PolicyInput::Missing,
        Some(cm) => match crate::policy::document_of(&format!("{ns}/{}", args.config_map), cm) {
            Ok(doc) => PolicyInput::Document(doc),
            Err(e) => {
                no_key = e;
                PolicyInput::Unusable(&no_key)
            }
        },
    };
    let mut status = build_with(&nodes, &leases, input, now);
    status.paused = crate::pause::of_config_map(cm.as_ref());
    status.policy.source = Some(format!("{ns}/{}", args.config_map));
    Ok(status)
}

/// Runs `kreboot status`: 0 when the report was printed, 1 (message on stderr) when the
/// cluster could not be read.
pub async fn run(args: &StatusArgs) -> ExitCode {
    let status = match gather(args).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let text = match args.output {
        StatusFormat::Table => Ok(render_table(&status)),
        StatusFormat::Json => serde_json::to_string_pretty(&status)
            .map(|j| j + "\n")
            .map_err(|e| e.to_string()),
        StatusFormat::Yaml => serde_saphyr::to_string(&status).map_err(|e| e.to_string()),
    };
    match text {
        Ok(t) => {
            print!("{t}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot format the status: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const NOW: &str = "2026-11-25T10:00:00Z";

    /// A Node from its annotations, labels, cordon and readiness.
    fn node(
        name: &str,
        annotations: &[(&str, &str)],
        labels: &[(&str, &str)],
        cordoned: bool,
        ready: bool,
    ) -> Node {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        serde_json::from_value(json!({
            "metadata": { "name": name, "annotations": map(annotations), "labels": map(labels) },
            "spec": { "unschedulable": cordoned },
            "status": { "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }] },
        }))
        .unwrap()
    }

    fn lease(name: &str, holder: Option<&str>, renewed: &str, secs: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": { "name": name, "labels": { lock::LOCK_LABEL: "kreboot-lock" } },
            "spec": {
                "holderIdentity": holder,
                "renewTime": holder.map(|_| renewed),
                "leaseDurationSeconds": secs,
            },
        }))
        .unwrap()
    }

    fn fleet() -> Vec<Node> {
        vec![
            node("idle", &[], &[], false, true),
            node(
                "pending",
                &[
                    (ANN_REBOOT_REQUIRED_SINCE, "2026-11-25T07:47:00Z"),
                    (node::ANN_REBOOT_REASON, "linux-image-6.8.0-49-generic"),
                    (ANN_BLOCKED_BY, "window_closed"),
                ],
                &[],
                false,
                true,
            ),
            node(
                "waiter-late",
                &[
                    (ANN_REBOOT_REQUIRED_SINCE, "2026-11-25T09:00:00Z"),
                    (ANN_WAITING_SINCE, "2026-11-25T09:30:00.000002Z"),
                ],
                &[(node::LABEL_WAITING, "true")],
                false,
                true,
            ),
            node(
                "waiter-early",
                &[
                    (ANN_REBOOT_REQUIRED_SINCE, "2026-11-25T09:00:00Z"),
                    (ANN_WAITING_SINCE, "2026-11-25T09:30:00.000001Z"),
                ],
                &[(node::LABEL_WAITING, "true")],
                false,
                true,
            ),
            node(
                "draining",
                &[
                    (ANN_REBOOT_REQUIRED_SINCE, "2026-11-24T10:00:00Z"),
                    (ANN_PHASE, "draining"),
                    (node::ANN_CORDONED_BY_KREBOOT, "true"),
                    (node::ANN_LOCK, "kreboot-lock"),
                ],
                &[(node::LABEL_HOLDER, "true")],
                true,
                true,
            ),
            node("admin", &[], &[], true, false),
            node(
                "failed",
                &[
                    (node::ANN_LAST_FAILURE, "2026-11-25T09:20:00Z"),
                    (
                        ANN_LAST_FAILURE_REASON,
                        "drain timed out after 30m: pod apps/db-0 refused by its PodDisruptionBudget",
                    ),
                    (node::ANN_LAST_REBOOT, "2026-11-20T08:00:00Z"),
                ],
                &[],
                false,
                true,
            ),
        ]
    }

    fn by_name<'a>(s: &'a ClusterStatus, name: &str) -> &'a NodeStatus {
        s.nodes.iter().find(|n| n.name == name).unwrap()
    }

    #[test]
    fn status_node_states_and_queue() {
        let s = build(&fleet(), &[], None, t(NOW));
        let names: Vec<_> = s.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "admin",
                "draining",
                "failed",
                "idle",
                "pending",
                "waiter-early",
                "waiter-late"
            ]
        );
        let states: Vec<_> = s.nodes.iter().map(|n| n.state.as_str()).collect();
        assert_eq!(
            states,
            [
                "idle", "draining", "idle", "idle", "pending", "waiting", "waiting"
            ]
        );
        let p = by_name(&s, "pending");
        assert!(p.needs_reboot);
        assert_eq!(p.since, Some(t("2026-11-25T07:47:00Z")));
        assert_eq!(p.blocked_by.as_deref(), Some("window_closed"));
        assert_eq!(p.reason.as_deref(), Some("linux-image-6.8.0-49-generic"));
        assert!(!by_name(&s, "idle").needs_reboot);
        let d = by_name(&s, "draining");
        assert!(d.cordoned && d.cordoned_by_kreboot && d.needs_reboot);
        assert_eq!(d.lock.as_deref(), Some("kreboot-lock"));
        let a = by_name(&s, "admin");
        assert!(a.cordoned && !a.cordoned_by_kreboot && !a.ready);
        let f = by_name(&s, "failed");
        assert_eq!(f.last_failure, Some(t("2026-11-25T09:20:00Z")));
        assert_eq!(f.last_reboot, Some(t("2026-11-20T08:00:00Z")));
        // First come, first served, to the microsecond.
        let queue: Vec<_> = s.queue.iter().map(|q| (q.position, q.node.as_str())).collect();
        assert_eq!(queue, [(1, "waiter-early"), (2, "waiter-late")]);
        assert_eq!(
            s.summary,
            Summary {
                nodes: 7,
                needs_reboot: 4,
                pending: 1,
                waiting: 2,
                in_cycle: 1,
                cordoned: 2,
                cordoned_by_kreboot: 1,
                not_ready: 1,
                lock_slots: 0,
                locks_held: 0,
            }
        );
    }

    #[test]
    fn status_phase_alone_means_a_reboot_is_needed_and_unknown_phase_is_shown_as_is() {
        let nodes = [
            node("a", &[(ANN_PHASE, "rebooting")], &[], true, false),
            node("b", &[(ANN_PHASE, "resizing")], &[], false, true),
        ];
        let s = build(&nodes, &[], None, t(NOW));
        assert_eq!(s.nodes[0].state, "rebooting");
        assert!(s.nodes[0].needs_reboot);
        assert_eq!(s.nodes[1].state, "resizing");
        assert!(
            s.nodes[1].problems[0].contains("not a known phase"),
            "{:?}",
            s.nodes[1].problems
        );
        assert_eq!(s.summary.in_cycle, 2);
    }

    #[test]
    fn status_bad_annotations_are_reported_not_guessed() {
        let nodes = [node(
            "n",
            &[
                (ANN_REBOOT_REQUIRED_SINCE, "yesterday"),
                (node::ANN_LAST_REBOOT, "soon"),
            ],
            &[],
            false,
            true,
        )];
        let s = build(&nodes, &[], None, t(NOW));
        let n = &s.nodes[0];
        assert!(n.needs_reboot, "the annotation is there even if unreadable");
        assert_eq!(n.since, None);
        assert_eq!(n.problems.len(), 2, "{:?}", n.problems);
        let table = render_table(&s);
        assert!(table.contains("\nWARNINGS\n  n: kreboot.io/"), "{table}");
        assert!(
            table.contains("\n  n: kreboot.io/reboot-required-since=\"yesterday\" is not"),
            "{table}"
        );
        assert!(
            table.contains("\n  n: kreboot.io/last-reboot=\"soon\" is not"),
            "{table}"
        );
        assert!(table.lines().nth(1).unwrap().contains(" ? "), "{table}");
    }

    #[test]
    fn status_lock_slots() {
        let leases = [
            lease("kreboot-lock-10", None, NOW, 1800),
            lease("kreboot-lock-1", Some("gone-node"), "2026-11-25T09:59:00Z", 1800),
            lease("kreboot-lock", Some("draining"), "2026-11-25T09:58:00Z", 1800),
            lease("kreboot-lock-2", Some("admin"), "2026-11-25T09:00:00Z", 1800),
        ];
        let s = build(&fleet(), &leases, None, t(NOW));
        let slots: Vec<_> = s
            .locks
            .iter()
            .map(|l| {
                (
                    l.name.as_str(),
                    l.holder.as_deref(),
                    l.state.as_str(),
                    l.expired,
                    l.holder_gone,
                )
            })
            .collect();
        assert_eq!(
            slots,
            [
                ("kreboot-lock", Some("draining"), "held", false, false),
                ("kreboot-lock-1", Some("gone-node"), "held", false, true),
                ("kreboot-lock-2", Some("admin"), "expired", true, false),
                ("kreboot-lock-10", None, "free", false, false),
            ]
        );
        // renewed + 30m + the 60 s clock-skew allowance.
        assert_eq!(s.locks[0].expires, Some(t("2026-11-25T10:29:00Z")));
        assert_eq!(s.locks[0].renewed, Some(t("2026-11-25T09:58:00Z")));
        assert_eq!(s.locks[3].renewed, None);
        assert_eq!(s.locks[3].expires, None);
        assert_eq!((s.summary.lock_slots, s.summary.locks_held), (4, 3));
        let table = render_table(&s);
        let lock_lines: Vec<&str> = table
            .lines()
            .skip_while(|l| !l.starts_with("LOCK"))
            .take_while(|l| !l.is_empty())
            .collect();
        assert_eq!(
            lock_lines,
            [
                "LOCK              HOLDER      RENEWED   EXPIRES   STATE",
                "kreboot-lock      draining    2m ago    in 29m    held",
                "kreboot-lock-1    gone-node   1m ago    in 30m    held (holder Node gone)",
                "kreboot-lock-2    admin       1h ago    29m ago   expired",
                "kreboot-lock-10   -           -         -         free",
            ]
        );
    }

    #[test]
    fn status_lock_slot_names() {
        let l = |name: &str, label: Option<&str>| -> Lease {
            serde_json::from_value(json!({
                "metadata": { "name": name, "labels": label.map(|v| json!({ lock::LOCK_LABEL: v })) },
            }))
            .unwrap()
        };
        assert!(is_slot_of(&l("kreboot-lock", None), "kreboot-lock"));
        assert!(is_slot_of(&l("kreboot-lock-3", None), "kreboot-lock"));
        assert!(is_slot_of(&l("renamed", Some("kreboot-lock")), "kreboot-lock"));
        assert!(!is_slot_of(&l("kreboot-lock-x", None), "kreboot-lock"));
        assert!(!is_slot_of(&l("kreboot-lock-", None), "kreboot-lock"));
        assert!(!is_slot_of(&l("kube-controller-manager", None), "kreboot-lock"));
        assert!(!is_slot_of(&l("other", Some("other-lock")), "kreboot-lock"));
    }

    const POLICY: &str = r#"
timezone: Europe/Berlin
windows:
  - days: [Wed]
    start: "23:00"
    end: "05:00"
rules:
  - name: db
    nodeSelector:
      matchLabels: { pool: db }
    windows:
      - days: [Wed]
        start: "09:00"
        end: "12:00"
"#;

    #[test]
    fn status_policy_windows_per_node() {
        let nodes = [
            node("web", &[], &[], false, true),
            node("db", &[], &[("pool", "db")], false, true),
        ];
        // 2026-11-25 is a Wednesday; 10:00Z is 11:00 in Berlin.
        let s = build(&nodes, &[], Some(POLICY), t(NOW));
        assert!(s.policy.present && s.policy.valid && s.policy.error.is_none());
        assert_eq!(s.policy.time_zone.as_deref(), Some("Europe/Berlin"));
        assert_eq!(s.policy.open_now, Some(false));
        assert_eq!(s.policy.rules, 1);
        let db = by_name(&s, "db");
        assert_eq!(db.rule.as_deref(), Some("db"));
        assert_eq!(db.window_open, Some(true));
        assert_eq!(db.next_window, Some(t(NOW)));
        assert_eq!(db.next_window_end, Some(t("2026-11-25T11:00:00Z")));
        let web = by_name(&s, "web");
        assert_eq!(web.rule, None);
        assert_eq!(web.window_open, Some(false));
        assert_eq!(web.next_window, Some(t("2026-11-25T22:00:00Z")));
        let table = render_table(&s);
        assert!(
            table.contains(
                "POLICY: ConfigMap valid, time zone Europe/Berlin, top-level windows closed now, 1 rule\n"
            ),
            "{table}"
        );
        let db_line = table.lines().find(|l| l.starts_with("db ")).unwrap();
        assert!(db_line.ends_with("   db     open (1h left)"), "{db_line:?}");
        let web_line = table.lines().find(|l| l.starts_with("web ")).unwrap();
        assert!(web_line.ends_with("   -      in 12h"), "{web_line:?}");
    }

    #[test]
    fn status_without_or_with_a_bad_policy() {
        let nodes = [node("n", &[], &[], false, true)];
        let s = build(&nodes, &[], None, t(NOW));
        assert!(!s.policy.present && s.policy.valid);
        assert_eq!(s.policy.open_now, Some(true));
        assert_eq!(s.nodes[0].window_open, Some(true));
        assert_eq!(s.nodes[0].next_window_end, None, "never closes");
        let table = render_table(&s);
        assert!(table.lines().nth(1).unwrap().ends_with("   open"), "{table}");
        assert!(table.contains("POLICY: none (ConfigMap not found): reboots allowed at any time\n"));

        let s = build(&nodes, &[], Some("windows:\n  - days: [Funday]\n"), t(NOW));
        assert!(s.policy.present && !s.policy.valid);
        let error = s.policy.error.as_deref().unwrap();
        assert!(error.contains("windows[0]"), "{error}");
        assert_eq!(s.nodes[0].window_open, None);
        assert_eq!(s.nodes[0].next_window, None);
        let table = render_table(&s);
        assert!(
            table.contains("POLICY: ConfigMap is INVALID: invalid policy at windows[0]"),
            "{table}"
        );
        assert!(table.lines().nth(1).unwrap().ends_with("   -"), "{table}");

        let s = build_with(&nodes, &[], PolicyInput::Unusable("no key config.yaml"), t(NOW));
        assert!(s.policy.present && !s.policy.valid);
        assert_eq!(s.policy.error.as_deref(), Some("no key config.yaml"));
    }

    #[test]
    fn status_table_layout() {
        let leases = [lease(
            "kreboot-lock",
            Some("draining"),
            "2026-11-25T09:58:00Z",
            1800,
        )];
        let s = build(&fleet(), &leases, None, t(NOW));
        let table = render_table(&s);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "NAME           STATE      READY   CORDONED   PENDING   REASON                         BLOCKED BY      LAST REBOOT   LAST FAILURE                       RULE   NEXT WINDOW"
        );
        assert_eq!(
            lines[5],
            "pending        pending    True    -          2h13m     linux-image-6.8.0-49-generic   window_closed   -             -                                  -      open"
        );
        assert!(
            lines[3].contains("   5d2h ago      40m ago: drain timed out afte...   "),
            "{}",
            lines[3]
        );
        // Every row of the node table is aligned with its header.
        let col = lines[0].find("NEXT WINDOW").unwrap();
        for l in &lines[1..8] {
            assert_eq!(l.get(col..col + 4), Some("open"), "{l}");
        }
        assert!(table.contains("\nQUEUE   NODE           WAITING\n1       waiter-early   29m59s\n2       waiter-late    29m59s\n"), "{table}");
        assert!(table.ends_with(
            "SUMMARY: 7 nodes, 4 need a reboot (1 pending, 2 waiting, 1 in a cycle), 2 cordoned (1 by kreboot), 1 not Ready; 1 of 1 lock slots held\n"
        ), "{table}");
        assert!(!table.lines().any(|l| l.ends_with(' ')), "no trailing spaces");
    }

    #[test]
    fn status_shows_a_pause_first_and_in_json() {
        let mut s = build(&fleet(), &[], None, t(NOW));
        assert!(!render_table(&s).contains("PAUSED"));
        s.paused = Some(crate::pause::Pause {
            by: "alice".into(),
            at: Some(t(NOW) - Duration::minutes(5)),
            reason: Some("kernel\nregression".into()),
            problem: None,
        });
        let table = render_table(&s);
        assert!(
            table.starts_with(&format!(
                "PAUSED: reboots are paused by alice at {}: kernel regression (5m ago); no node starts a reboot until `kreboot resume`\n\n",
                node::format_time(t(NOW) - Duration::minutes(5))
            )),
            "{table}"
        );
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["paused"]["by"], "alice");
        assert_eq!(j["paused"]["reason"], "kernel\nregression");
    }

    #[test]
    fn status_empty_cluster() {
        let table = render_table(&build(&[], &[], None, t(NOW)));
        assert!(
            table.starts_with("No nodes.\n\nLOCK: no lock Lease yet"),
            "{table}"
        );
        assert!(table.contains("\nQUEUE: empty\n"), "{table}");
    }

    #[test]
    fn status_human_durations() {
        let d = |s: i64| human_duration(Duration::seconds(s));
        assert_eq!(d(0), "0s");
        assert_eq!(d(-5), "0s");
        assert_eq!(d(45), "45s");
        assert_eq!(d(60), "1m");
        assert_eq!(d(330), "5m30s");
        assert_eq!(d(2 * 3600 + 13 * 60 + 59), "2h13m");
        assert_eq!(d(3 * 86_400 + 4 * 3600), "3d4h");
        assert_eq!(d(400 * 86_400), "400d");
        assert_eq!(relative(Some(t(NOW) + Duration::minutes(5)), t(NOW)), "in 5m");
        assert_eq!(relative(Some(t(NOW) - Duration::minutes(5)), t(NOW)), "5m ago");
        assert_eq!(relative(None, t(NOW)), "-");
    }

    #[test]
    fn status_cells_are_one_line_and_bounded() {
        assert_eq!(cell(None, 10), "-");
        assert_eq!(cell(Some("  "), 10), "-");
        assert_eq!(cell(Some("a\nb"), 10), "a b");
        assert_eq!(cell(Some("abcdefghijk"), 10), "abcdefg...");
        assert_eq!(cell(Some("abcdef    hijk"), 10), "abcdef...");
        assert_eq!(cell(Some("äöüäöüäöüäöü"), 5), "äö...");
    }

    #[test]
    fn status_json_shape() {
        let s = build(&fleet(), &[], None, t(NOW));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["now"], "2026-11-25T10:00:00Z");
        let pending = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "pending")
            .unwrap();
        assert_eq!(pending["needsReboot"], true);
        assert_eq!(pending["since"], "2026-11-25T07:47:00Z");
        assert_eq!(pending["blockedBy"], "window_closed");
        assert_eq!(pending["lastReboot"], serde_json::Value::Null);
        assert_eq!(v["queue"][0]["node"], "waiter-early");
        assert_eq!(v["policy"]["present"], false);
        assert_eq!(v["summary"]["needsReboot"], 4);
        let yaml = serde_saphyr::to_string(&s).unwrap();
        assert!(yaml.contains("blockedBy: window_closed"), "{yaml}");
    }
}
