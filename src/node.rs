//! The Node as kreboot's durable memory, and the pure decision of what to do next.
//!
//! Every lifecycle step is recorded in annotations under `kreboot.io/` on the Node itself, so
//! an agent that crashes at any point resumes from the Node's recorded state: it never repeats
//! a completed step and never skips one. [`decide`] turns what the agent observes into the one
//! next [`Action`]; it reads no clock and does no I/O, so every branch is covered by table tests.
//!
//! Invariants kept here:
//! - kreboot uncordons only a node that it cordoned itself (`cordoned-by-kreboot`);
//! - a reboot is recognised by a changed `status.nodeInfo.bootID` (or a changed kernel boot id),
//!   never by the agent's memory; a recorded reboot whose kernel boot id already changed is never
//!   issued again, even while the kubelet still reports the old bootID;
//! - a sentinel still present right after a reboot kreboot caused does not start a new cycle at
//!   once (reboot-loop back-off).

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde_json::{Value, json};

/// Prefix of every annotation kreboot writes.
pub const PREFIX: &str = "kreboot.io/";
/// The lifecycle phase in progress (absent = idle).
pub const ANN_PHASE: &str = "kreboot.io/phase";
/// `"true"` when kreboot set `spec.unschedulable`, `"false"` when an administrator had.
pub const ANN_CORDONED_BY_KREBOOT: &str = "kreboot.io/cordoned-by-kreboot";
/// The Lease slot held for this cycle.
pub const ANN_LOCK: &str = "kreboot.io/lock";
/// `status.nodeInfo.bootID` just before the reboot was requested.
pub const ANN_PRE_REBOOT_BOOT_ID: &str = "kreboot.io/pre-reboot-boot-id";
/// The kernel's boot id just before the reboot was requested (when the host exposes it).
pub const ANN_PRE_REBOOT_KERNEL_BOOT_ID: &str = "kreboot.io/pre-reboot-kernel-boot-id";
/// When the last reboot that kreboot caused completed (RFC 3339).
pub const ANN_LAST_REBOOT: &str = "kreboot.io/last-reboot";
/// When the last cycle failed (RFC 3339), for the failure back-off.
pub const ANN_LAST_FAILURE: &str = "kreboot.io/last-failure";
/// Why the last cycle failed.
pub const ANN_LAST_FAILURE_REASON: &str = "kreboot.io/last-failure-reason";
/// Since when this node needs a reboot (RFC 3339); for operators and `kreboot status`.
pub const ANN_REBOOT_REQUIRED_SINCE: &str = "kreboot.io/reboot-required-since";
/// Why this node needs a reboot (bounded package list), for operators.
pub const ANN_REBOOT_REASON: &str = "kreboot.io/reboot-reason";
/// Label set (`"true"`) while the node waits for a lock slot: the releasing node lists the
/// waiters by this label and hands its slot to the one waiting longest.
pub const LABEL_WAITING: &str = "kreboot.io/waiting";

/// The label selector of the Nodes queued for a lock slot ([`LABEL_WAITING`]).
pub fn waiting_selector() -> String {
    format!("{LABEL_WAITING}=true")
}

/// Label set (`"true"`) while the node holds a lock slot and is in a cycle: waiting nodes watch
/// the labelled Nodes (one watch for all holders) to notice a holder that disappears.
pub const LABEL_HOLDER: &str = "kreboot.io/lock-holder";
/// Since when the rebooted node is in its rule's health gate (phase `verifying`).
pub const ANN_VERIFYING_SINCE: &str = "kreboot.io/verifying-since";
/// When the health gate timed out in this cycle (the Event and metric were sent; the slot is
/// kept until the node is healthy).
pub const ANN_HEALTH_GATE_FAILED: &str = "kreboot.io/health-gate-failed";
/// What the drain before this cycle's reboot took, `{"millis", "evicted"}` as JSON, written with
/// the rebooting phase. The process that drained is the one the reboot kills, often before
/// Prometheus scrapes it again; the agent that sees the reboot complete (a process that lives
/// on) reports it in `kreboot_drain_duration_seconds` and `kreboot_evictions_total`, and the
/// cycle's end removes it.
pub const ANN_DRAINED: &str = "kreboot.io/drained";
/// The PodDisruptionBudgets that selected a pod this cycle's drain evicted, each with its
/// `currentHealthy` before the drain (`ns/name=3,…`, or
/// `ns/*` and `*` when bounded, see [`crate::health::encode_budgets`]), written before the
/// evictions when the node's rule has a health gate with `disruptionBudgets`. The gate after the
/// reboot runs in a new process: it learns from this which budgets to wait for.
pub const ANN_DRAINED_BUDGETS: &str = "kreboot.io/drained-budgets";
/// Since when the node waits for a lock slot (RFC 3339 with microseconds): the queue order.
pub const ANN_WAITING_SINCE: &str = "kreboot.io/waiting-since";
/// An operator asked for a reboot (`kreboot reboot`), `{"by", "at"}` as JSON. Treated exactly
/// like the sentinel (window, lock, blockers and PDBs apply) and removed with the cycle's other
/// annotations when the reboot completes. Any other non-empty value (`kubectl annotate node N
/// kreboot.io/reboot-requested=yes`) is a request too: whoever wrote it meant one.
pub const ANN_REBOOT_REQUESTED: &str = "kreboot.io/reboot-requested";

/// An operator's reboot request ([`ANN_REBOOT_REQUESTED`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RebootRequest {
    /// Who asked.
    #[serde(default)]
    pub by: String,
    /// When (RFC 3339, as written; empty when unknown).
    #[serde(default)]
    pub at: String,
}

impl RebootRequest {
    /// Reads the annotation's value: JSON as `kreboot reboot` writes it, else a request by
    /// `unknown` (None for an empty value).
    pub fn parse(value: &str) -> Option<RebootRequest> {
        if value.trim().is_empty() {
            return None;
        }
        let r = serde_json::from_str::<RebootRequest>(value).unwrap_or_else(|_| RebootRequest {
            by: "unknown".into(),
            at: String::new(),
        });
        // Its words go into Events, notifications and logs: bounded.
        Some(RebootRequest {
            by: bounded(r.by),
            at: bounded(r.at),
        })
    }

    /// `requested by alice at 2026-12-01T10:00:00Z`.
    pub fn describe(&self) -> String {
        let by = if self.by.is_empty() { "unknown" } else { &self.by };
        match self.at.as_str() {
            "" => format!("requested by {by}"),
            at => format!("requested by {by} at {at}"),
        }
    }
}

/// The step of the lifecycle a node is in, as recorded on the Node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    /// No cycle in progress.
    #[default]
    Idle,
    /// The lock is held and the node is cordoned; pods are being evicted.
    Draining,
    /// The drain finished and the reboot was (or is about to be) requested.
    Rebooting,
    /// Rebooted and uncordoned, still holding the lock slot: the rule's health gate waits for
    /// the Node and its DaemonSet pods to be Ready before the slot goes to the next node.
    Verifying,
}

impl Phase {
    /// The annotation value of this phase (`None` for idle: the annotation is removed).
    pub fn as_annotation(&self) -> Option<&'static str> {
        match self {
            Phase::Idle => None,
            Phase::Draining => Some("draining"),
            Phase::Rebooting => Some("rebooting"),
            Phase::Verifying => Some("verifying"),
        }
    }

    /// A stable lower-case name for logs and metrics.
    pub fn name(&self) -> &'static str {
        self.as_annotation().unwrap_or("idle")
    }
}

/// What kreboot recorded on the Node, parsed. Unknown or malformed values are reported in
/// `problems` rather than guessed at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Recorded phase.
    pub phase: Phase,
    /// Whether kreboot (not an administrator) cordoned the node in this cycle.
    pub cordoned_by_kreboot: bool,
    /// The Lease slot named for this cycle.
    pub lock: Option<String>,
    /// bootID before the reboot.
    pub pre_reboot_boot_id: Option<String>,
    /// Kernel boot id before the reboot.
    pub pre_reboot_kernel_boot_id: Option<String>,
    /// When the last kreboot reboot completed.
    pub last_reboot: Option<DateTime<Utc>>,
    /// When the last cycle failed.
    pub last_failure: Option<DateTime<Utc>>,
    /// Why the node needs a reboot ([`ANN_REBOOT_REASON`]; empty when not recorded).
    pub reboot_reason: String,
    /// An operator's reboot request ([`ANN_REBOOT_REQUESTED`]).
    pub reboot_requested: Option<RebootRequest>,
    /// An operator drained the node with `kreboot drain` (`kreboot.io/drained-by`): the agent
    /// neither reboots nor uncordons it until the operator uncordons it or asks for the reboot.
    pub operator_drained: bool,
    /// Since when the node is in the health gate ([`ANN_VERIFYING_SINCE`]).
    pub verifying_since: Option<DateTime<Utc>>,
    /// When the health gate timed out, if it did in this cycle ([`ANN_HEALTH_GATE_FAILED`]).
    pub health_gate_failed: Option<DateTime<Utc>>,
    /// The drain before this cycle's reboot ([`ANN_DRAINED`]).
    pub drained: Option<DrainRecord>,
    /// The budgets this cycle's drain touched ([`ANN_DRAINED_BUDGETS`]).
    pub drained_budgets: crate::health::Touched,
    /// Annotations that could not be understood.
    pub problems: Vec<String>,
}

/// What the agent knows about its Node, read from the API object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// kreboot's recorded state.
    pub recorded: Recorded,
    /// `spec.unschedulable`.
    pub unschedulable: bool,
    /// `status.nodeInfo.bootID` (empty when unknown).
    pub boot_id: String,
    /// The Ready condition is True.
    pub ready: bool,
    /// The node's labels (for per-pool policy).
    pub labels: BTreeMap<String, String>,
    /// `metadata.resourceVersion`, for optimistic-concurrency patches.
    pub resource_version: Option<String>,
    /// The node is queued for a lock slot ([`LABEL_WAITING`]).
    pub waiting: bool,
}

/// How much of a bad annotation value a problem quotes: annotations may hold 256 kB, and a
/// log line, an Event or `kreboot status` must not.
const QUOTED: usize = 80;

/// `value`, quoted, cut to [`QUOTED`] bytes.
pub fn quote(value: &str) -> String {
    if value.len() <= QUOTED {
        return format!("{value:?}");
    }
    let mut cut = QUOTED;
    while !value.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{:?}… ({} bytes)", &value[..cut], value.len())
}

/// Longest text kept from an operator's free-form value (a reboot request's `by` and `at`,
/// the reboot reason) before it goes into Events, notifications and logs.
const MAX_FREE_TEXT: usize = 256;

fn bounded(mut text: String) -> String {
    if text.len() > MAX_FREE_TEXT {
        let mut cut = MAX_FREE_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// A drain no longer than this is believable; a longer one in [`ANN_DRAINED`] is garbage.
const MAX_DRAIN_MILLIS: u64 = 7 * 24 * 3600 * 1000;
/// Pods evicted in one drain beyond which [`ANN_DRAINED`] is garbage (a Node runs at most a
/// few hundred).
const MAX_DRAIN_EVICTED: u64 = 100_000;

fn parse_time(value: &str, key: &str, problems: &mut Vec<String>) -> Option<DateTime<Utc>> {
    match DateTime::parse_from_rfc3339(value.trim()) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(e) => {
            problems.push(format!(
                "{key}={} is not an RFC 3339 time ({e}); ignored",
                quote(value)
            ));
            None
        }
    }
}

/// A recorded time this far ahead of this node's clock is not clock skew but a wrong value.
pub const FUTURE_TOLERANCE: Duration = Duration::minutes(5);

/// Recorded times in the future of `now` (hand-edited, or written by a node whose clock was
/// wrong). They are obeyed the safe way, as written: a back-off runs until the time plus the
/// back-off, a health gate's deadline moves out accordingly; no reboot happens earlier than
/// the annotation says. The problem tells the operator to fix or remove it.
pub fn time_problems(r: &Recorded, now: DateTime<Utc>) -> Vec<String> {
    [
        (
            ANN_LAST_REBOOT,
            r.last_reboot,
            "the reboot-loop back-off holds the node until then",
        ),
        (
            ANN_LAST_FAILURE,
            r.last_failure,
            "the failure back-off holds the node until then",
        ),
        (
            ANN_VERIFYING_SINCE,
            r.verifying_since,
            "the health gate's deadline counts from then",
        ),
        (ANN_HEALTH_GATE_FAILED, r.health_gate_failed, "recorded as failed"),
    ]
    .into_iter()
    .filter_map(|(key, t, effect)| {
        let t = t?;
        (t > now + FUTURE_TOLERANCE).then(|| {
            format!(
                "{key}={} is in the future (this node's clock says {}): {effect}; fix or remove it",
                format_time(t),
                format_time(now)
            )
        })
    })
    .collect()
}

/// Parses kreboot's annotations.
pub fn parse_recorded(annotations: &BTreeMap<String, String>) -> Recorded {
    let mut r = Recorded::default();
    let get = |k: &str| annotations.get(k).map(String::as_str);
    r.phase = parse_phase(get(ANN_PHASE), &mut r.problems);
    r.cordoned_by_kreboot = parse_cordoned_by_kreboot(get(ANN_CORDONED_BY_KREBOOT), &mut r.problems);
    r.lock = get(ANN_LOCK).map(str::to_owned);
    r.pre_reboot_boot_id = get(ANN_PRE_REBOOT_BOOT_ID).map(str::to_owned);
    r.pre_reboot_kernel_boot_id = get(ANN_PRE_REBOOT_KERNEL_BOOT_ID).map(str::to_owned);
    r.reboot_reason = bounded(get(ANN_REBOOT_REASON).unwrap_or_default().to_owned());
    r.reboot_requested = get(ANN_REBOOT_REQUESTED).and_then(RebootRequest::parse);
    r.operator_drained = get(crate::drain_cli::ANN_DRAINED_BY).is_some_and(|v| !v.is_empty());
    let mut problems = std::mem::take(&mut r.problems);
    r.last_reboot = get(ANN_LAST_REBOOT).and_then(|v| parse_time(v, ANN_LAST_REBOOT, &mut problems));
    r.last_failure = get(ANN_LAST_FAILURE).and_then(|v| parse_time(v, ANN_LAST_FAILURE, &mut problems));
    r.verifying_since =
        get(ANN_VERIFYING_SINCE).and_then(|v| parse_time(v, ANN_VERIFYING_SINCE, &mut problems));
    r.health_gate_failed =
        get(ANN_HEALTH_GATE_FAILED).and_then(|v| parse_time(v, ANN_HEALTH_GATE_FAILED, &mut problems));
    r.drained = get(ANN_DRAINED).and_then(|v| parse_drain_record(v, &mut problems));
    if let Some(v) = get(ANN_DRAINED_BUDGETS) {
        r.drained_budgets = parse_drained_budgets(v, &mut problems);
    }
    r.problems = problems;
    r
}

/// The phase annotation; absent is idle.
fn parse_phase(value: Option<&str>, problems: &mut Vec<String>) -> Phase {
    match value {
        None => Phase::Idle,
        Some("draining") => Phase::Draining,
        Some("rebooting") => Phase::Rebooting,
        Some("verifying") => Phase::Verifying,
        Some(other) => {
            // An unknown phase (e.g. written by a newer version) is treated as draining: the
            // safe interpretation, because the drain step is idempotent and ends either in a
            // reboot or in an uncordon of what kreboot cordoned.
            problems.push(format!(
                "{ANN_PHASE}={} is not a known phase; resuming as draining",
                quote(other)
            ));
            Phase::Draining
        }
    }
}

/// Whether kreboot cordoned the node; absent is false.
fn parse_cordoned_by_kreboot(value: Option<&str>, problems: &mut Vec<String>) -> bool {
    match value {
        None | Some("false") => false,
        Some("true") => true,
        // Anything else: kreboot did not cordon (as far as it can tell), so it never uncordons
        // the node: an administrator's cordon is never lifted by mistake.
        Some(other) => {
            problems.push(format!(
                "{ANN_CORDONED_BY_KREBOOT}={} is neither true nor false; taken as false (kreboot will not uncordon the node)",
                quote(other)
            ));
            false
        }
    }
}

/// The drain record, if it is one and within range.
fn parse_drain_record(v: &str, problems: &mut Vec<String>) -> Option<DrainRecord> {
    match serde_json::from_str::<DrainRecord>(v) {
        Ok(d) if d.millis <= MAX_DRAIN_MILLIS && d.evicted <= MAX_DRAIN_EVICTED => Some(d),
        Ok(_) => {
            problems.push(format!("{ANN_DRAINED}={} is out of range; ignored", quote(v)));
            None
        }
        Err(_) => {
            problems.push(format!(
                "{ANN_DRAINED}={} is not a drain record; ignored",
                quote(v)
            ));
            None
        }
    }
}

/// The budgets the drain touched.
fn parse_drained_budgets(v: &str, problems: &mut Vec<String>) -> crate::health::Touched {
    let (mut refs, bad) = crate::health::parse_budgets(v);
    if !bad.is_empty() {
        // Which budgets those meant is unknown: the gate waits for every budget rather
        // than for none of them (a check that cannot be narrowed is widened).
        problems.push(format!(
            "{ANN_DRAINED_BUDGETS} has entries that are not PodDisruptionBudgets ({}); the health gate waits for every budget",
            quote(&bad.join(","))
        ));
        refs.insert(crate::health::BudgetRef::All, None);
    }
    refs
}

/// What a drain took: recorded on the Node for the agent that completes the cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainRecord {
    /// Milliseconds from the first eviction request to the last pod gone.
    pub millis: u64,
    /// Pods evicted.
    pub evicted: u64,
}

/// Adds the drain's record to the patch that enters the rebooting phase.
pub fn with_drain_record(mut patch: Value, record: DrainRecord) -> Value {
    patch["metadata"]["annotations"][ANN_DRAINED] = json!(serde_json::to_string(&record).unwrap_or_default());
    patch
}

/// Reads a [`NodeView`] from a Node object.
pub fn view(node: &Node) -> NodeView {
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let status = node.status.as_ref();
    NodeView {
        recorded: parse_recorded(&annotations),
        unschedulable: node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false),
        boot_id: status
            .and_then(|s| s.node_info.as_ref())
            .map(|i| i.boot_id.clone())
            .unwrap_or_default(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True"),
        waiting: node
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get(LABEL_WAITING).map(String::as_str) == Some("true")),
        labels: node.metadata.labels.clone().unwrap_or_default(),
        resource_version: node.metadata.resource_version.clone(),
    }
}

/// Formats a time the way kreboot's annotations store it.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone)]
pub struct Observations {
    /// The current time (passed in, never read inside the decision).
    pub now: DateTime<Utc>,
    /// The Node as last seen.
    pub node: NodeView,
    /// The sentinel says a reboot is needed.
    pub reboot_required: bool,
    /// The policy allows a reboot now.
    pub window_open: bool,
    /// Something holds the reboot back (blocking pods, alerts); the reason.
    pub blocked_by: Option<String>,
    /// The Lease slot this node holds right now, if any.
    pub held_lock: Option<String>,
    /// The kernel's boot id on this host, when readable.
    pub kernel_boot_id: Option<String>,
    /// How long a sentinel present right after a kreboot reboot is ignored.
    pub reboot_loop_backoff: Duration,
    /// How long to wait after a failed cycle before trying again.
    pub failure_backoff: Duration,
    /// The preflight proved that the reboot can reach the host (its namespaces can be opened,
    /// PID 1 may be signalled). When false the node is never taken out of service.
    pub host_access_ok: bool,
    /// An operator paused reboots cluster-wide (`kreboot pause`): no new cycle starts; one in
    /// progress finishes (see [`crate::pause`] for why).
    pub paused: bool,
    /// The rule's soak: no node of its slot set starts before this instant (the last release
    /// of one of its slots plus `soak`). Only set once the slot this node holds is claimed:
    /// a handed-over slot must be claimed first, or it would expire during the soak.
    pub soak_until: Option<DateTime<Utc>>,
    /// The rule's health gate, if it has one (else a rebooted node releases at once).
    pub health_gate: Option<HealthGate>,
}

/// A rule's health gate as the agent sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthGate {
    /// How long after the uncordon the node may take to become healthy.
    pub timeout: Duration,
    /// What is not healthy yet (`node not Ready`, `pod ns/name not Ready`); empty: healthy.
    /// Not known yet (the pods' watch has not listed them) counts as not healthy.
    pub unhealthy: Vec<String>,
}

/// Why the agent does nothing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// No reboot needed.
    NotRequired,
    /// Outside every maintenance window (or in a blackout).
    WindowClosed,
    /// A blocker holds the reboot back.
    Blocked,
    /// A reboot happened recently and the sentinel is back: possible reboot loop.
    RebootLoopBackoff,
    /// The last cycle failed recently.
    FailureBackoff,
    /// The reboot is under way, or the node has rebooted but is not Ready yet.
    AwaitingReboot,
    /// The preflight failed: the agent cannot reach the host to reboot it (an LSM or a missing
    /// capability refuses), so it does not cordon or drain.
    HostAccess,
    /// An operator paused reboots cluster-wide (`kreboot pause`).
    Paused,
    /// An operator drained the node (`kreboot drain`) and has not uncordoned it or asked for
    /// the reboot (`kreboot reboot`).
    OperatorDrained,
    /// The node holds a lock slot but the rule's `soak` after the last release has not ended:
    /// it starts (cordons) when it has.
    Soaking,
    /// Rebooted and holding the slot: waiting for the Node and its DaemonSet pods to be Ready.
    HealthGate,
}

impl WaitReason {
    /// A stable label for metrics and Events.
    pub fn label(self) -> &'static str {
        match self {
            WaitReason::NotRequired => "not_required",
            WaitReason::WindowClosed => "window_closed",
            WaitReason::Blocked => "blocked",
            WaitReason::RebootLoopBackoff => "reboot_loop_backoff",
            WaitReason::FailureBackoff => "failure_backoff",
            WaitReason::AwaitingReboot => "awaiting_reboot",
            WaitReason::HostAccess => "host_access",
            WaitReason::Paused => "paused",
            WaitReason::OperatorDrained => "operator_drained",
            WaitReason::Soaking => "soaking",
            WaitReason::HealthGate => "health_gate",
        }
    }
}

/// Why a cycle in progress is abandoned (the node is uncordoned if kreboot cordoned it, and the
/// lock released).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The window closed before the reboot could be issued.
    WindowClosed,
    /// The sentinel went away: no reboot is needed any more.
    NoLongerRequired,
    /// The Lease slot is no longer held by this node (expired and taken over).
    LockLost,
    /// A blocker appeared before the reboot.
    Blocked,
    /// The preflight failed mid-cycle: the reboot could not reach the host.
    HostAccess,
    /// An operator drained the node mid-cycle (`kreboot drain` took the cordon over): the node is
    /// theirs until they uncordon it or ask for the reboot.
    OperatorDrained,
}

impl AbortReason {
    /// A stable label for metrics and Events.
    pub fn label(self) -> &'static str {
        match self {
            AbortReason::WindowClosed => "window_closed",
            AbortReason::NoLongerRequired => "no_longer_required",
            AbortReason::LockLost => "lock_lost",
            AbortReason::Blocked => "blocked",
            AbortReason::HostAccess => "host_access",
            AbortReason::OperatorDrained => "operator_drained",
        }
    }
}

/// The one next thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until something changes (or `until`, if given).
    Wait {
        /// Why.
        reason: WaitReason,
        /// When the reason expires by itself.
        until: Option<DateTime<Utc>>,
    },
    /// Try to take a Lease slot.
    AcquireLock,
    /// Cordon (recording whether kreboot did it) and enter the draining phase.
    Cordon,
    /// Evict the node's pods (resumable).
    Drain,
    /// Record the boot ids and request the reboot.
    Reboot,
    /// The reboot happened and the node is Ready: uncordon if kreboot cordoned, clear the
    /// annotations, release the lock.
    Complete,
    /// Abandon the cycle: uncordon if kreboot cordoned, clear the phase, release the lock.
    Abort(AbortReason),
    /// The health gate passed (or no longer applies): clear the phase, release the lock.
    Verified,
    /// The health gate timed out: record it, report it (Event, metric), keep the lock.
    FailHealthGate,
    /// Idle but still holding a Lease slot (a crash between steps): give it back.
    ReleaseLock,
}

fn until(since: Option<DateTime<Utc>>, backoff: Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let end = since?.checked_add_signed(backoff)?;
    (end > now).then_some(end)
}

/// The operator drained the node and has not asked for its reboot: the agent keeps its hands off.
fn operator_holds(r: &Recorded) -> bool {
    r.operator_drained && r.reboot_requested.is_none()
}

/// Decides the next action from the observations alone.
pub fn decide(o: &Observations) -> Action {
    match o.node.recorded.phase {
        Phase::Verifying => decide_verifying(o),
        Phase::Rebooting => decide_rebooting(o),
        Phase::Draining => decide_draining(o),
        Phase::Idle => decide_idle(o),
    }
}

fn wait(reason: WaitReason, until: Option<DateTime<Utc>>) -> Action {
    Action::Wait { reason, until }
}

/// Rebooted: the health gate decides when the cycle is over.
fn decide_verifying(o: &Observations) -> Action {
    let r = &o.node.recorded;
    match &o.health_gate {
        // The gate was removed from the policy, the node is healthy, or the slot is gone
        // (nothing left to hold back): the cycle is over.
        None => Action::Verified,
        Some(g) if g.unhealthy.is_empty() || o.held_lock.is_none() => Action::Verified,
        Some(g) => {
            let deadline = r.verifying_since.and_then(|s| s.checked_add_signed(g.timeout));
            match deadline {
                Some(d) if o.now >= d && r.health_gate_failed.is_none() => Action::FailHealthGate,
                // Failed already: keep the slot (the rollout stops) until the node is
                // healthy; the alert tells the operator.
                Some(d) if o.now >= d => wait(WaitReason::HealthGate, None),
                Some(d) => wait(WaitReason::HealthGate, Some(d)),
                None => wait(WaitReason::HealthGate, None),
            }
        }
    }
}

/// The reboot was recorded: has it happened, or must it be issued (again) or abandoned?
fn decide_rebooting(o: &Observations) -> Action {
    let r = &o.node.recorded;
    let node_rebooted = r
        .pre_reboot_boot_id
        .as_deref()
        .is_some_and(|before| !o.node.boot_id.is_empty() && before != o.node.boot_id);
    let kernel_rebooted = matches!(
        (&r.pre_reboot_kernel_boot_id, &o.kernel_boot_id),
        (Some(before), Some(now)) if before != now
    );
    if node_rebooted {
        if o.node.ready {
            Action::Complete
        } else {
            wait(WaitReason::AwaitingReboot, None)
        }
    } else if kernel_rebooted || !o.node.ready {
        // The host has a new boot but the kubelet has not reported it yet, or the node
        // is going down: never reboot again on the strength of a stale Node status.
        wait(WaitReason::AwaitingReboot, None)
    } else if o.held_lock.is_none() {
        Action::Abort(AbortReason::LockLost)
    } else if operator_holds(r) {
        Action::Abort(AbortReason::OperatorDrained)
    } else if !o.window_open {
        Action::Abort(AbortReason::WindowClosed)
    } else if o.blocked_by.is_some() {
        Action::Abort(AbortReason::Blocked)
    } else if !o.host_access_ok {
        Action::Abort(AbortReason::HostAccess)
    } else {
        // Recorded but not (yet) rebooted: the agent stopped between recording and the
        // reboot taking effect. Issue it (again); a second request is harmless.
        Action::Reboot
    }
}

/// Cordoned and draining: go on, or abandon the cycle.
fn decide_draining(o: &Observations) -> Action {
    if o.held_lock.is_none() {
        Action::Abort(AbortReason::LockLost)
    } else if operator_holds(&o.node.recorded) {
        // `kreboot drain` took the cordon over mid-cycle: the node is the operator's.
        Action::Abort(AbortReason::OperatorDrained)
    } else if !o.reboot_required {
        Action::Abort(AbortReason::NoLongerRequired)
    } else if !o.window_open {
        Action::Abort(AbortReason::WindowClosed)
    } else if o.blocked_by.is_some() {
        Action::Abort(AbortReason::Blocked)
    } else if !o.host_access_ok {
        // The drain would end in a reboot that cannot happen: give the node back.
        Action::Abort(AbortReason::HostAccess)
    } else {
        Action::Drain
    }
}

/// No cycle in progress: wait, give back a slot, or start one.
fn decide_idle(o: &Observations) -> Action {
    match (idle_wait(o), &o.held_lock) {
        (Some(_), Some(_)) => Action::ReleaseLock,
        (Some(w), None) => w,
        // The slot is kept through the soak: the next node is this one, whoever asks.
        (None, Some(_)) => match o.soak_until.filter(|t| *t > o.now) {
            Some(t) => wait(WaitReason::Soaking, Some(t)),
            None => Action::Cordon,
        },
        (None, None) => Action::AcquireLock,
    }
}

/// Why an idle node must not start a cycle now, if it must not.
fn idle_wait(o: &Observations) -> Option<Action> {
    let r = &o.node.recorded;
    if !o.reboot_required {
        Some(wait(WaitReason::NotRequired, None))
    } else if o.paused {
        // First among the reasons to wait: the operator's word is the news, whatever
        // the window or the back-offs say. Only a node with no cycle in progress waits:
        // a slot handed over meanwhile is given back unused (`decide_idle`).
        Some(wait(WaitReason::Paused, None))
    } else if operator_holds(r) {
        Some(wait(WaitReason::OperatorDrained, None))
    } else if let Some(t) =
        until(r.last_reboot, o.reboot_loop_backoff, o.now).filter(|_| r.reboot_requested.is_none())
    {
        // The loop protection is about a sentinel that comes back by itself; an
        // operator who asks for a reboot has looked at the node.
        Some(wait(WaitReason::RebootLoopBackoff, Some(t)))
    } else if let Some(t) = until(r.last_failure, o.failure_backoff, o.now) {
        Some(wait(WaitReason::FailureBackoff, Some(t)))
    } else if !o.host_access_ok {
        // Before any lock or cordon: a node that cannot be rebooted is not drained.
        Some(wait(WaitReason::HostAccess, None))
    } else if !o.window_open {
        Some(wait(WaitReason::WindowClosed, None))
    } else if o.blocked_by.is_some() {
        Some(wait(WaitReason::Blocked, None))
    } else {
        None
    }
}

/// The merge patch that cordons (when the node is schedulable) and enters the draining phase,
/// in one write so that "kreboot cordoned it" can never be lost between two writes.
pub fn cordon_patch(node: &NodeView, lock: &str) -> Value {
    let we_cordon = !node.unschedulable;
    let mut patch = json!({
        "metadata": {
            "annotations": {
                ANN_PHASE: Phase::Draining.as_annotation(),
                ANN_CORDONED_BY_KREBOOT: we_cordon.to_string(),
                ANN_LOCK: lock,
                ANN_WAITING_SINCE: null,
            },
            "labels": { LABEL_WAITING: null, LABEL_HOLDER: "true" },
        }
    });
    if we_cordon {
        patch["spec"] = json!({ "unschedulable": true });
    }
    with_resource_version(patch, node)
}

/// The merge patch that records the reboot about to be requested.
pub fn rebooting_patch(node: &NodeView, kernel_boot_id: Option<&str>) -> Value {
    let patch = json!({
        "metadata": {
            "annotations": {
                ANN_PHASE: Phase::Rebooting.as_annotation(),
                ANN_PRE_REBOOT_BOOT_ID: node.boot_id,
                ANN_PRE_REBOOT_KERNEL_BOOT_ID: kernel_boot_id,
            }
        }
    });
    with_resource_version(patch, node)
}

/// The merge patch that ends a cycle: uncordon only if kreboot cordoned, clear the cycle's
/// annotations, and record either the completed reboot or the failure.
pub fn end_cycle_patch(node: &NodeView, outcome: CycleEnd<'_>, now: DateTime<Utc>) -> Value {
    let mut annotations = serde_json::Map::new();
    for key in [
        ANN_PHASE,
        ANN_CORDONED_BY_KREBOOT,
        ANN_LOCK,
        ANN_PRE_REBOOT_BOOT_ID,
        ANN_PRE_REBOOT_KERNEL_BOOT_ID,
        ANN_WAITING_SINCE,
        ANN_DRAINED,
        ANN_DRAINED_BUDGETS,
    ] {
        annotations.insert(key.to_owned(), Value::Null);
    }
    if outcome == CycleEnd::Rebooted {
        // The request is served; a failed or abandoned cycle keeps it for the next attempt.
        annotations.insert(ANN_REBOOT_REQUESTED.to_owned(), Value::Null);
    }
    match outcome {
        CycleEnd::Rebooted => {
            annotations.insert(ANN_LAST_REBOOT.to_owned(), json!(format_time(now)));
            annotations.insert(ANN_LAST_FAILURE.to_owned(), Value::Null);
            annotations.insert(ANN_LAST_FAILURE_REASON.to_owned(), Value::Null);
            annotations.insert(ANN_REBOOT_REQUIRED_SINCE.to_owned(), Value::Null);
            annotations.insert(ANN_REBOOT_REASON.to_owned(), Value::Null);
        }
        CycleEnd::Failed(reason) => {
            annotations.insert(ANN_LAST_FAILURE.to_owned(), json!(format_time(now)));
            annotations.insert(ANN_LAST_FAILURE_REASON.to_owned(), json!(reason));
        }
        CycleEnd::Abandoned => {}
    }
    let mut patch = json!({ "metadata": { "annotations": annotations, "labels": { LABEL_WAITING: null, LABEL_HOLDER: null } } });
    // Never lift an operator's drain, whatever the cordon record says.
    if node.recorded.cordoned_by_kreboot && node.unschedulable && !node.recorded.operator_drained {
        patch["spec"] = json!({ "unschedulable": false });
    }
    with_resource_version(patch, node)
}

/// The patch that ends the reboot as [`end_cycle_patch`] does (uncordon, last reboot), but keeps
/// the node in the cycle, phase `verifying`, holding `lock`: the rule's health gate.
pub fn verifying_patch(node: &NodeView, lock: &str, now: DateTime<Utc>) -> Value {
    let mut patch = end_cycle_patch(node, CycleEnd::Rebooted, now);
    let a = &mut patch["metadata"]["annotations"];
    a[ANN_PHASE] = json!(Phase::Verifying.as_annotation());
    a[ANN_LOCK] = json!(lock);
    a[ANN_VERIFYING_SINCE] = json!(format_time(now));
    a[ANN_HEALTH_GATE_FAILED] = Value::Null;
    // The gate waits for the budgets the drain touched: kept until it passes.
    if let Some(a) = a.as_object_mut() {
        a.remove(ANN_DRAINED_BUDGETS);
    }
    // Still a holder in a cycle: waiters keep watching it, and never take its slot over.
    patch["metadata"]["labels"][LABEL_HOLDER] = json!("true");
    patch
}

/// The patch that ends the health gate: the cycle is over.
pub fn verified_patch(node: &NodeView) -> Value {
    with_resource_version(
        json!({ "metadata": {
            "annotations": {
                ANN_PHASE: null, ANN_LOCK: null, ANN_VERIFYING_SINCE: null,
                ANN_HEALTH_GATE_FAILED: null, ANN_BLOCKED_BY: null, ANN_DRAINED_BUDGETS: null,
            },
            "labels": { LABEL_HOLDER: null },
        }}),
        node,
    )
}

/// The patch that records the budgets the drain is about to touch ([`ANN_DRAINED_BUDGETS`]),
/// added to those already recorded in this cycle (a drain resumed after a crash evicts fewer
/// pods than the first attempt did). None when there is nothing new to record.
pub fn drained_budgets_patch(node: &NodeView, touched: &crate::health::Touched) -> Option<Value> {
    let recorded = &node.recorded.drained_budgets;
    if touched.keys().all(|k| recorded.contains_key(k)) {
        return None;
    }
    // A budget already recorded keeps its count: the first attempt saw its health before the
    // drain.
    let mut all = touched.clone();
    all.extend(recorded.iter().map(|(k, v)| (k.clone(), *v)));
    Some(with_resource_version(
        json!({ "metadata": { "annotations": { ANN_DRAINED_BUDGETS: crate::health::encode_budgets(&all) } } }),
        node,
    ))
}

/// The patch that records the health gate's timeout.
pub fn health_gate_failed_patch(node: &NodeView, now: DateTime<Utc>) -> Value {
    with_resource_version(
        json!({ "metadata": { "annotations": { ANN_HEALTH_GATE_FAILED: format_time(now) } } }),
        node,
    )
}

/// Why a pending reboot is held back, for operators (`kreboot status`): a blocker's reason,
/// `window_closed`, or a back-off.
pub const ANN_BLOCKED_BY: &str = "kreboot.io/blocked-by";

/// The patch that records (or, with None, clears) why a pending reboot is held back.
pub fn blocked_by_patch(reason: Option<&str>) -> Value {
    json!({ "metadata": { "annotations": { ANN_BLOCKED_BY: reason } } })
}

/// Adds label changes to `patch`: the `set` labels, and the `remove` keys not also set.
pub fn with_label_changes<'a>(
    mut patch: Value,
    set: &BTreeMap<String, String>,
    remove: impl IntoIterator<Item = &'a String>,
) -> Value {
    for k in remove {
        if !set.contains_key(k) {
            patch["metadata"]["labels"][k.as_str()] = Value::Null;
        }
    }
    for (k, v) in set {
        patch["metadata"]["labels"][k.as_str()] = json!(v);
    }
    patch
}

/// Adds to `patch` the taints of the node with the PreferNoSchedule taint `key` present or
/// absent, if that changes them. A merge patch replaces the whole list, so the patch then also
/// carries the resourceVersion: a taint someone else adds meanwhile is never overwritten (the
/// write fails with a conflict and is redone on the fresh Node).
pub fn with_prefer_no_schedule(
    mut patch: Value,
    node: &NodeView,
    taints: &[k8s_openapi::api::core::v1::Taint],
    key: &str,
    present: bool,
) -> Value {
    let has = taints
        .iter()
        .any(|t| t.key == key && t.effect == "PreferNoSchedule");
    if has == present {
        return patch;
    }
    let mut list: Vec<Value> = taints
        .iter()
        .filter(|t| !(t.key == key && t.effect == "PreferNoSchedule"))
        .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
        .filter(|v| !v.is_null())
        .collect();
    if present {
        list.push(json!({ "key": key, "effect": "PreferNoSchedule" }));
    }
    patch["spec"]["taints"] = Value::Array(list);
    with_resource_version(patch, node)
}

/// The merge patch that queues the node for a lock slot (`Some(since)`) or takes it out of the
/// queue (`None`).
pub fn waiting_patch(since: Option<DateTime<Utc>>) -> Value {
    match since {
        Some(t) => json!({ "metadata": {
            "labels": { LABEL_WAITING: "true" },
            "annotations": { ANN_WAITING_SINCE: t.to_rfc3339_opts(SecondsFormat::Micros, true) },
        }}),
        None => json!({ "metadata": {
            "labels": { LABEL_WAITING: null },
            "annotations": { ANN_WAITING_SINCE: null },
        }}),
    }
}

/// The node a releasing holder hands `slot` to: of the `spread` waiters that have waited
/// longest (ties broken by name; waiters without a readable `waiting-since` go last), other
/// than `me` and the nodes in `holders`, the one that ranks `slot` highest (rendezvous
/// hashing). With `spread` 1, the longest waiter.
///
/// Why a spread: holders that finish at the same moment each pick from the queue as their own
/// watch shows it, and a hand-off reaches the others' watches only after a lag. Measured on the
/// real kube-apiserver with 1,000 nodes at concurrency 20: all picking *the* longest waiter,
/// up to 9 holders handed their slots to the same node within half a second, which kept one
/// and passed the others on, and so on (about 5 hand-offs per node rebooted). Spread over the
/// longest waiters, simultaneous hand-offs of different slots go to different nodes; a node is
/// overtaken by at most `spread - 1` later ones.
pub fn pick_successor(
    waiters: &[ObjectMeta],
    me: &str,
    holders: &[String],
    slot: &str,
    spread: usize,
) -> Option<String> {
    let mut longest: Vec<(bool, Option<DateTime<Utc>>, String)> = waiters
        .iter()
        .filter_map(|n| {
            let name = n.name.as_deref()?;
            // Not ourselves, and not a node that already holds a slot (a slot handed to it
            // would sit idle).
            (name != me && !holders.iter().any(|h| h == name)).then_some(())?;
            let since = n
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANN_WAITING_SINCE))
                .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
                .map(|t| t.with_timezone(&Utc));
            Some((since.is_none(), since, name.to_owned()))
        })
        .collect();
    longest.sort();
    longest.truncate(spread.max(1));
    longest
        .into_iter()
        .map(|(_, _, name)| name)
        .max_by_key(|name| crate::lock::rendezvous(name, slot))
}

/// How a cycle ends, for [`end_cycle_patch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleEnd<'a> {
    /// The reboot happened.
    Rebooted,
    /// A step failed (the reason is recorded and starts the failure back-off).
    Failed(&'a str),
    /// The cycle was abandoned for a reason that needs no back-off (window closed, …).
    Abandoned,
}

/// Adds `metadata.resourceVersion` so that the API server rejects the patch with 409 if the
/// Node changed since it was read: a decision is only carried out on the state it was made on.
fn with_resource_version(mut patch: Value, node: &NodeView) -> Value {
    if let Some(rv) = &node.resource_version {
        patch["metadata"]["resourceVersion"] = json!(rv);
    }
    patch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_record_survives_the_reboot_and_ends_with_the_cycle() {
        let record = DrainRecord {
            millis: 12_345,
            evicted: 3,
        };
        let patch = with_drain_record(json!({"metadata": {"annotations": {}}}), record);
        let text = patch["metadata"]["annotations"][ANN_DRAINED]
            .as_str()
            .unwrap()
            .to_owned();
        let r = parse_recorded(&BTreeMap::from([(ANN_DRAINED.to_owned(), text)]));
        assert_eq!(r.drained, Some(record));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Hand-edited garbage is reported, not guessed at, and never fails the agent.
        let r = parse_recorded(&BTreeMap::from([(ANN_DRAINED.to_owned(), "12s".to_owned())]));
        assert_eq!(r.drained, None);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        let view = NodeView::default();
        let end = end_cycle_patch(&view, CycleEnd::Rebooted, Utc::now());
        assert!(end["metadata"]["annotations"][ANN_DRAINED].is_null());
        assert!(
            end["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key(ANN_DRAINED)
        );
    }

    /// The budgets the drain touched: added to (never replacing) what the cycle recorded, kept
    /// through the reboot into the gate, removed when the gate passes or the cycle ends.
    #[test]
    fn the_touched_budgets_survive_the_reboot_and_end_with_the_gate() {
        use crate::health::BudgetRef;
        let web = BudgetRef::One("apps".into(), "web".into());
        let db = BudgetRef::One("apps".into(), "db".into());
        let mut view = NodeView::default();
        let patch =
            drained_budgets_patch(&view, &[(web.clone(), Some(2))].into()).expect("something to record");
        let text = patch["metadata"]["annotations"][ANN_DRAINED_BUDGETS]
            .as_str()
            .unwrap();
        assert_eq!(text, "apps/web=2");
        view.recorded = parse_recorded(&BTreeMap::from([(
            ANN_DRAINED_BUDGETS.to_owned(),
            text.to_owned(),
        )]));
        assert_eq!(view.recorded.drained_budgets, [(web.clone(), Some(2))].into());
        assert!(
            drained_budgets_patch(&view, &[(web.clone(), Some(1))].into()).is_none(),
            "nothing new: a resumed drain sees the budget lower, the first count stands"
        );
        assert!(drained_budgets_patch(&view, &Default::default()).is_none());
        let more = drained_budgets_patch(&view, &[(db, None), (web.clone(), Some(1))].into()).unwrap();
        assert_eq!(
            more["metadata"]["annotations"][ANN_DRAINED_BUDGETS],
            "apps/db,apps/web=2"
        );
        let verifying = verifying_patch(&view, "kreboot-lock", Utc::now());
        assert!(
            !verifying["metadata"]["annotations"]
                .as_object()
                .unwrap()
                .contains_key(ANN_DRAINED_BUDGETS),
            "the gate needs them"
        );
        for end in [
            verified_patch(&view),
            end_cycle_patch(&view, CycleEnd::Rebooted, Utc::now()),
            end_cycle_patch(&view, CycleEnd::Failed("x"), Utc::now()),
        ] {
            let a = end["metadata"]["annotations"].as_object().unwrap();
            assert!(a.get(ANN_DRAINED_BUDGETS).is_some_and(Value::is_null), "{end}");
        }
        let r = parse_recorded(&BTreeMap::from([(
            ANN_DRAINED_BUDGETS.to_owned(),
            "apps/web,BAD".to_owned(),
        )]));
        assert_eq!(
            r.drained_budgets,
            [(web, None), (BudgetRef::All, None)].into(),
            "garbage widens the check"
        );
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn obs() -> Observations {
        Observations {
            now: t("2026-11-24T22:00:00Z"),
            node: NodeView {
                boot_id: "boot-a".into(),
                ready: true,
                ..NodeView::default()
            },
            reboot_required: true,
            window_open: true,
            blocked_by: None,
            held_lock: None,
            kernel_boot_id: None,
            reboot_loop_backoff: Duration::minutes(30),
            failure_backoff: Duration::minutes(10),
            host_access_ok: true,
            paused: false,
            soak_until: None,
            health_gate: None,
        }
    }

    #[test]
    fn the_health_gate_holds_the_slot_then_fails_then_passes() {
        let mut o = obs();
        o.node.recorded.phase = Phase::Verifying;
        o.node.recorded.verifying_since = Some(t("2026-11-24T21:58:00Z"));
        o.held_lock = Some("kreboot-lock".into());
        let gate = |unhealthy: &[&str]| {
            Some(HealthGate {
                timeout: Duration::minutes(10),
                unhealthy: unhealthy.iter().map(|s| s.to_string()).collect(),
            })
        };
        o.health_gate = gate(&["pod kube-system/cni-x not Ready"]);
        assert_eq!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::HealthGate,
                until: Some(t("2026-11-24T22:08:00Z"))
            }
        );
        o.now = t("2026-11-24T22:08:00Z");
        assert_eq!(decide(&o), Action::FailHealthGate, "timed out");
        o.node.recorded.health_gate_failed = Some(o.now);
        assert_eq!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::HealthGate,
                until: None
            },
            "reported once; the slot is kept"
        );
        o.health_gate = gate(&[]);
        assert_eq!(decide(&o), Action::Verified, "healthy at last");
        o.health_gate = None;
        assert_eq!(decide(&o), Action::Verified, "gate removed from the policy");
        o.health_gate = gate(&["node not Ready"]);
        o.held_lock = None;
        assert_eq!(decide(&o), Action::Verified, "no slot left to hold");
        // A sentinel back already does not skip the gate: the phase decides.
        o.held_lock = Some("kreboot-lock".into());
        o.node.recorded.health_gate_failed = None;
        o.now = t("2026-11-24T22:00:00Z");
        o.reboot_required = true;
        assert!(matches!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::HealthGate,
                ..
            }
        ));
    }

    #[test]
    fn verifying_keeps_the_lock_and_uncordons() {
        let view = NodeView {
            unschedulable: true,
            recorded: Recorded {
                phase: Phase::Rebooting,
                cordoned_by_kreboot: true,
                ..Recorded::default()
            },
            ..NodeView::default()
        };
        let p = verifying_patch(&view, "kreboot-lock", t("2026-11-24T22:00:00Z"));
        assert_eq!(p["spec"]["unschedulable"], json!(false));
        assert_eq!(p["metadata"]["annotations"][ANN_PHASE], json!("verifying"));
        assert_eq!(p["metadata"]["annotations"][ANN_LOCK], json!("kreboot-lock"));
        assert_eq!(
            p["metadata"]["annotations"][ANN_LAST_REBOOT],
            json!("2026-11-24T22:00:00Z")
        );
        assert_eq!(p["metadata"]["labels"][LABEL_HOLDER], json!("true"));
        let mut a = BTreeMap::new();
        a.insert(ANN_PHASE.to_string(), "verifying".to_string());
        a.insert(
            ANN_VERIFYING_SINCE.to_string(),
            "2026-11-24T22:00:00Z".to_string(),
        );
        let r = parse_recorded(&a);
        assert_eq!(
            (r.phase, r.verifying_since),
            (Phase::Verifying, Some(t("2026-11-24T22:00:00Z")))
        );
        assert!(r.problems.is_empty());
        let p = verified_patch(&view);
        assert_eq!(p["metadata"]["annotations"][ANN_PHASE], Value::Null);
        assert_eq!(p["metadata"]["labels"][LABEL_HOLDER], Value::Null);
    }

    #[test]
    fn a_holder_soaks_before_it_starts() {
        let mut o = obs();
        o.held_lock = Some("kreboot-lock".into());
        o.soak_until = Some(t("2026-11-24T22:05:00Z"));
        assert_eq!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::Soaking,
                until: Some(t("2026-11-24T22:05:00Z"))
            }
        );
        o.now = t("2026-11-24T22:05:00Z");
        assert_eq!(decide(&o), Action::Cordon, "the soak has ended");
        // A closed window still gives the slot back: soaking never holds a slot for nothing.
        o.now = t("2026-11-24T22:00:00Z");
        o.window_open = false;
        assert_eq!(decide(&o), Action::ReleaseLock);
        // Without a slot there is nothing to soak on: the node competes for one first.
        o.window_open = true;
        o.held_lock = None;
        assert_eq!(decide(&o), Action::AcquireLock);
        // A node in a cycle is never held back by a soak.
        o.held_lock = Some("kreboot-lock".into());
        o.node.recorded.phase = Phase::Draining;
        assert_eq!(decide(&o), Action::Drain);
    }

    fn rebooting(mut o: Observations, before: &str) -> Observations {
        o.node.recorded.phase = Phase::Rebooting;
        o.node.recorded.pre_reboot_boot_id = Some(before.into());
        o.held_lock = Some("kreboot-lock".into());
        o
    }

    fn wait(reason: WaitReason) -> Action {
        Action::Wait { reason, until: None }
    }

    #[test]
    fn idle_decisions() {
        let base = obs();
        type Change = Box<dyn Fn(&mut Observations)>;
        let cases: Vec<(&str, Change, Action)> = vec![
            ("needed, open, free", Box::new(|_| {}), Action::AcquireLock),
            (
                "not needed",
                Box::new(|o| o.reboot_required = false),
                wait(WaitReason::NotRequired),
            ),
            (
                "window closed",
                Box::new(|o| o.window_open = false),
                wait(WaitReason::WindowClosed),
            ),
            (
                "blocked",
                Box::new(|o| o.blocked_by = Some("pod".into())),
                wait(WaitReason::Blocked),
            ),
            (
                "lock already held",
                Box::new(|o| o.held_lock = Some("l".into())),
                Action::Cordon,
            ),
            (
                "lock held but not needed",
                Box::new(|o| {
                    o.held_lock = Some("l".into());
                    o.reboot_required = false;
                }),
                Action::ReleaseLock,
            ),
            (
                "lock held but window closed",
                Box::new(|o| {
                    o.held_lock = Some("l".into());
                    o.window_open = false;
                }),
                Action::ReleaseLock,
            ),
            (
                "host access refused: wait, never take a lock",
                Box::new(|o| o.host_access_ok = false),
                wait(WaitReason::HostAccess),
            ),
            (
                "host access refused with a slot handed over: give it back",
                Box::new(|o| {
                    o.host_access_ok = false;
                    o.held_lock = Some("l".into());
                }),
                Action::ReleaseLock,
            ),
            (
                "host access refused outside the window: the window is not the news",
                Box::new(|o| {
                    o.host_access_ok = false;
                    o.window_open = false;
                }),
                wait(WaitReason::HostAccess),
            ),
            (
                "host access refused but nothing needed",
                Box::new(|o| {
                    o.host_access_ok = false;
                    o.reboot_required = false;
                }),
                wait(WaitReason::NotRequired),
            ),
            (
                "paused: wait, never take a lock",
                Box::new(|o| o.paused = true),
                wait(WaitReason::Paused),
            ),
            (
                "paused outside the window: the pause is the news",
                Box::new(|o| {
                    o.paused = true;
                    o.window_open = false;
                }),
                wait(WaitReason::Paused),
            ),
            (
                "paused with a slot handed over before the cycle began: give it back",
                Box::new(|o| {
                    o.paused = true;
                    o.held_lock = Some("l".into());
                }),
                Action::ReleaseLock,
            ),
            (
                "paused but nothing needed",
                Box::new(|o| {
                    o.paused = true;
                    o.reboot_required = false;
                }),
                wait(WaitReason::NotRequired),
            ),
            (
                "old reboot does not hold back",
                Box::new(|o| o.node.recorded.last_reboot = Some(t("2026-11-24T21:00:00Z"))),
                Action::AcquireLock,
            ),
        ];
        for (name, change, want) in cases {
            let mut o = base.clone();
            change(&mut o);
            assert_eq!(decide(&o), want, "{name}");
        }
    }

    #[test]
    fn an_operators_drain_is_respected_unless_they_ask_for_the_reboot() {
        let drained = |mut o: Observations| {
            o.node.recorded.operator_drained = true;
            o.node.unschedulable = true;
            o
        };
        let request = Some(RebootRequest {
            by: "alice".into(),
            at: String::new(),
        });
        // Idle: waits, never takes a lock; a slot handed over is given back.
        assert_eq!(decide(&drained(obs())), wait(WaitReason::OperatorDrained));
        let mut o = drained(obs());
        o.held_lock = Some("l".into());
        assert_eq!(decide(&o), Action::ReleaseLock);
        // Mid-cycle (the drain took the cordon over): the cycle is abandoned.
        let mut o = drained(obs());
        o.node.recorded.phase = Phase::Draining;
        o.held_lock = Some("l".into());
        assert_eq!(decide(&o), Action::Abort(AbortReason::OperatorDrained));
        assert_eq!(
            decide(&rebooting(drained(obs()), "boot-a")),
            Action::Abort(AbortReason::OperatorDrained)
        );
        // ... but a reboot that already happened completes (and, below, keeps the cordon).
        assert_eq!(decide(&rebooting(drained(obs()), "boot-old")), Action::Complete);
        // The operator asks for the reboot: it goes ahead, as for the sentinel.
        let mut o = drained(obs());
        o.node.recorded.reboot_requested = request.clone();
        assert_eq!(decide(&o), Action::AcquireLock);
        let mut o = rebooting(drained(obs()), "boot-a");
        o.node.recorded.reboot_requested = request;
        assert_eq!(decide(&o), Action::Reboot);
        // The end of any cycle never uncordons a drained node.
        let mut n = drained(obs()).node;
        n.recorded.cordoned_by_kreboot = true;
        let p = end_cycle_patch(&n, CycleEnd::Rebooted, t("2026-11-24T22:00:00Z"));
        assert!(p.get("spec").is_none(), "{p}");
    }

    #[test]
    fn a_reboot_request_is_read_leniently_and_cleared_only_by_the_reboot() {
        assert_eq!(RebootRequest::parse(""), None);
        assert_eq!(
            RebootRequest::parse(r#"{"by":"alice","at":"2026-12-01T10:00:00Z"}"#)
                .unwrap()
                .describe(),
            "requested by alice at 2026-12-01T10:00:00Z"
        );
        assert_eq!(
            RebootRequest::parse("yes").unwrap().describe(),
            "requested by unknown"
        );
        let a = BTreeMap::from([(ANN_REBOOT_REQUESTED.to_owned(), "yes".to_owned())]);
        assert!(parse_recorded(&a).reboot_requested.is_some());
        let n = NodeView::default();
        let now = t("2026-11-24T22:00:00Z");
        let done = end_cycle_patch(&n, CycleEnd::Rebooted, now);
        assert_eq!(done["metadata"]["annotations"][ANN_REBOOT_REQUESTED], Value::Null);
        for end in [CycleEnd::Failed("drain"), CycleEnd::Abandoned] {
            let p = end_cycle_patch(&n, end, now);
            assert!(
                p["metadata"]["annotations"].get(ANN_REBOOT_REQUESTED).is_none(),
                "{p}"
            );
        }
        // A request is not held back by the reboot-loop protection (the operator looked).
        let mut o = obs();
        o.node.recorded.last_reboot = Some(t("2026-11-24T21:50:00Z"));
        o.node.recorded.reboot_requested = Some(RebootRequest::default());
        assert_eq!(decide(&o), Action::AcquireLock);
    }

    #[test]
    fn reboot_loop_and_failure_backoff_wait_until_expiry() {
        let mut o = obs();
        o.node.recorded.last_reboot = Some(t("2026-11-24T21:50:00Z"));
        assert_eq!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::RebootLoopBackoff,
                until: Some(t("2026-11-24T22:20:00Z"))
            }
        );
        let mut o = obs();
        o.node.recorded.last_failure = Some(t("2026-11-24T21:55:00Z"));
        assert_eq!(
            decide(&o),
            Action::Wait {
                reason: WaitReason::FailureBackoff,
                until: Some(t("2026-11-24T22:05:00Z"))
            }
        );
        // The loop back-off does not matter when no reboot is needed.
        let mut o = obs();
        o.reboot_required = false;
        o.node.recorded.last_reboot = Some(t("2026-11-24T21:50:00Z"));
        assert_eq!(decide(&o), wait(WaitReason::NotRequired));
    }

    #[test]
    fn draining_resumes_or_aborts() {
        let mut o = obs();
        o.node.recorded.phase = Phase::Draining;
        o.held_lock = Some("kreboot-lock".into());
        assert_eq!(decide(&o), Action::Drain);
        let mut closed = o.clone();
        closed.window_open = false;
        assert_eq!(decide(&closed), Action::Abort(AbortReason::WindowClosed));
        let mut lost = o.clone();
        lost.held_lock = None;
        assert_eq!(decide(&lost), Action::Abort(AbortReason::LockLost));
        let mut gone = o.clone();
        gone.reboot_required = false;
        assert_eq!(decide(&gone), Action::Abort(AbortReason::NoLongerRequired));
        let mut refused = o.clone();
        refused.host_access_ok = false;
        assert_eq!(decide(&refused), Action::Abort(AbortReason::HostAccess));
        // A pause lets a cycle in progress finish: abandoning a half-drained node is riskier.
        let mut paused = o.clone();
        paused.paused = true;
        assert_eq!(decide(&paused), Action::Drain);
        assert_eq!(decide(&rebooting(paused, "boot-a")), Action::Reboot);
        let mut paused = rebooting(obs(), "boot-old");
        paused.paused = true;
        assert_eq!(decide(&paused), Action::Complete);
    }

    #[test]
    fn rebooting_is_recognised_by_boot_id() {
        // Same bootID: the agent crashed before the reboot took effect -> reboot again.
        assert_eq!(decide(&rebooting(obs(), "boot-a")), Action::Reboot);
        // New bootID and Ready -> complete.
        assert_eq!(decide(&rebooting(obs(), "boot-old")), Action::Complete);
        // New bootID, not Ready -> wait.
        let mut o = rebooting(obs(), "boot-old");
        o.node.ready = false;
        assert_eq!(decide(&o), wait(WaitReason::AwaitingReboot));
        // Kernel says rebooted, kubelet still reports the old bootID -> never reboot again.
        let mut o = rebooting(obs(), "boot-a");
        o.node.recorded.pre_reboot_kernel_boot_id = Some("k1".into());
        o.kernel_boot_id = Some("k2".into());
        assert_eq!(decide(&o), wait(WaitReason::AwaitingReboot));
        // Same bootID but NotReady: the node is going down; do not ask again.
        let mut o = rebooting(obs(), "boot-a");
        o.node.ready = false;
        assert_eq!(decide(&o), wait(WaitReason::AwaitingReboot));
        // Window closed before the reboot was issued -> abort, never reboot outside it.
        let mut o = rebooting(obs(), "boot-a");
        o.window_open = false;
        assert_eq!(decide(&o), Action::Abort(AbortReason::WindowClosed));
        // The preflight refuses right before the reboot -> abort (uncordon, release).
        let mut o = rebooting(obs(), "boot-a");
        o.host_access_ok = false;
        assert_eq!(decide(&o), Action::Abort(AbortReason::HostAccess));
        // ... but a reboot that already happened completes whatever the preflight says.
        let mut o = rebooting(obs(), "boot-old");
        o.host_access_ok = false;
        assert_eq!(decide(&o), Action::Complete);
        // Rebooted even though the lease expired meanwhile -> still complete.
        let mut o = rebooting(obs(), "boot-old");
        o.held_lock = None;
        assert_eq!(decide(&o), Action::Complete);
    }

    #[test]
    fn annotations_round_trip_and_bad_values_are_reported() {
        let mut a = BTreeMap::new();
        a.insert(ANN_PHASE.into(), "rebooting".into());
        a.insert(ANN_CORDONED_BY_KREBOOT.into(), "true".into());
        a.insert(ANN_PRE_REBOOT_BOOT_ID.into(), "b1".into());
        a.insert(ANN_LAST_REBOOT.into(), "yesterday".into());
        let r = parse_recorded(&a);
        assert_eq!(r.phase, Phase::Rebooting);
        assert!(r.cordoned_by_kreboot);
        assert_eq!(r.pre_reboot_boot_id.as_deref(), Some("b1"));
        assert_eq!(r.last_reboot, None);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        a.insert(ANN_PHASE.into(), "exploding".into());
        assert_eq!(parse_recorded(&a).phase, Phase::Draining);
    }

    #[test]
    fn cordon_patch_records_who_cordoned() {
        let mut n = NodeView {
            resource_version: Some("7".into()),
            ..NodeView::default()
        };
        let p = cordon_patch(&n, "kreboot-lock");
        assert_eq!(p["spec"]["unschedulable"], json!(true));
        assert_eq!(
            p["metadata"]["annotations"][ANN_CORDONED_BY_KREBOOT],
            json!("true")
        );
        assert_eq!(p["metadata"]["resourceVersion"], json!("7"));
        n.unschedulable = true; // an administrator cordoned it
        let p = cordon_patch(&n, "kreboot-lock");
        assert!(p.get("spec").is_none());
        assert_eq!(
            p["metadata"]["annotations"][ANN_CORDONED_BY_KREBOOT],
            json!("false")
        );
    }

    #[test]
    fn successor_is_the_longest_waiter() {
        let waiter = |name: &str, since: Option<&str>| ObjectMeta {
            name: Some(name.into()),
            annotations: since.map(|s| BTreeMap::from([(ANN_WAITING_SINCE.to_string(), s.to_string())])),
            ..Default::default()
        };
        let ws = vec![
            waiter("c", Some("2026-11-24T10:00:00.000002Z")),
            waiter("b", Some("2026-11-24T10:00:00.000001Z")),
            waiter("a", None),
            waiter("me", Some("2026-11-24T09:00:00Z")),
        ];
        assert_eq!(pick_successor(&ws, "me", &[], "l", 1).as_deref(), Some("b"));
        assert_eq!(
            pick_successor(&ws, "me", &["b".to_string()], "l", 1).as_deref(),
            Some("c")
        );
        assert_eq!(pick_successor(&ws[2..3], "me", &[], "l", 1).as_deref(), Some("a"));
        assert_eq!(pick_successor(&ws[3..], "me", &[], "l", 1), None);
        // With a spread, one of the `spread` longest waiters: never a later one.
        for slot in ["l", "l-1", "l-2", "l-3"] {
            let picked = pick_successor(&ws, "me", &[], slot, 2);
            assert!(matches!(picked.as_deref(), Some("b" | "c")), "{picked:?}");
        }
        // Twenty slots handed at once over the 80 longest of 1,000 waiters: they go to many
        // different nodes (all to one before the spread).
        let many: Vec<ObjectMeta> = (0..1000)
            .map(|i| {
                waiter(
                    &format!("n{i:04}"),
                    Some(&format!("2026-11-24T10:00:{:02}.{i:06}Z", i % 60)),
                )
            })
            .collect();
        let picked: std::collections::BTreeSet<String> = (0..20)
            .filter_map(|s| pick_successor(&many, "me", &[], &format!("kreboot-lock-{s}"), 80))
            .collect();
        assert!(
            picked.len() >= 12,
            "{} distinct successors for 20 slots",
            picked.len()
        );
        let p = waiting_patch(None);
        assert_eq!(p["metadata"]["labels"][LABEL_WAITING], Value::Null);
    }

    #[test]
    fn end_cycle_uncordons_only_what_kreboot_cordoned() {
        let now = t("2026-11-24T22:00:00Z");
        let mut n = NodeView {
            unschedulable: true,
            ..NodeView::default()
        };
        let p = end_cycle_patch(&n, CycleEnd::Rebooted, now);
        assert!(p.get("spec").is_none(), "administrator's cordon kept");
        assert_eq!(
            p["metadata"]["annotations"][ANN_LAST_REBOOT],
            json!("2026-11-24T22:00:00Z")
        );
        n.recorded.cordoned_by_kreboot = true;
        let p = end_cycle_patch(&n, CycleEnd::Failed("drain timeout"), now);
        assert_eq!(p["spec"]["unschedulable"], json!(false));
        assert_eq!(
            p["metadata"]["annotations"][ANN_LAST_FAILURE_REASON],
            json!("drain timeout")
        );
        assert_eq!(p["metadata"]["annotations"][ANN_PHASE], Value::Null);
    }

    /// Every annotation the agent reads.
    const READ: &[&str] = &[
        ANN_PHASE,
        ANN_CORDONED_BY_KREBOOT,
        ANN_LOCK,
        ANN_PRE_REBOOT_BOOT_ID,
        ANN_PRE_REBOOT_KERNEL_BOOT_ID,
        ANN_LAST_REBOOT,
        ANN_LAST_FAILURE,
        ANN_LAST_FAILURE_REASON,
        ANN_REBOOT_REQUIRED_SINCE,
        ANN_REBOOT_REASON,
        ANN_REBOOT_REQUESTED,
        ANN_VERIFYING_SINCE,
        ANN_HEALTH_GATE_FAILED,
        ANN_DRAINED,
        ANN_WAITING_SINCE,
        ANN_BLOCKED_BY,
        crate::drain_cli::ANN_DRAINED_BY,
        crate::drain_cli::ANN_DRAINED_AT,
    ];

    /// Issue 17: hand-edited garbage in every annotation the agent reads. Never a panic; each
    /// problem quotes a bounded part of the value; and whatever the garbage, the decision for
    /// an idle node whose lock is not held is never a step that takes it out of service
    /// (cordon, drain, reboot) — at most asking for the lock.
    #[test]
    fn garbage_in_any_annotation_never_panics_nor_takes_the_node_out() {
        use proptest::prelude::*;
        let garbage = prop_oneof![
            Just(String::new()),
            Just("{".to_string()),
            Just("null".to_string()),
            Just("[1,2,3]".to_string()),
            Just(r#"{"millis": -1, "evicted": 1}"#.to_string()),
            Just(r#"{"millis": 18446744073709551615, "evicted": 18446744073709551615}"#.to_string()),
            Just(r#"{"millis": 1e400}"#.to_string()),
            Just(r#"{"by": 5, "at": []}"#.to_string()),
            Just("-9223372036854775808".to_string()),
            Just("9999-12-31T23:59:59Z".to_string()),
            Just("+262143-01-01T00:00:00Z".to_string()),
            Just("2026-13-45T99:99:99Z".to_string()),
            Just("x".repeat(300_000)),
            Just("é".repeat(100_000)),
            any::<String>(),
        ];
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 2000,
            failure_persistence: None,
            ..Default::default()
        });
        runner
            .run(
                &(
                    proptest::sample::subsequence(READ.to_vec(), 1..=4),
                    prop::collection::vec(garbage, 4),
                ),
                |(keys, values)| {
                    let a: BTreeMap<String, String> = keys
                        .iter()
                        .zip(values.iter().cycle())
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect();
                    let r = parse_recorded(&a);
                    let mut problems = r.problems.clone();
                    problems.extend(time_problems(&r, t("2026-11-24T22:00:00Z")));
                    for p in &problems {
                        prop_assert!(p.len() < 600, "unbounded problem: {} bytes", p.len());
                    }
                    if let Some(q) = &r.reboot_requested {
                        prop_assert!(q.describe().len() < 700);
                    }
                    prop_assert!(r.reboot_reason.len() <= 260);
                    let mut o = obs();
                    o.node.recorded = r.clone();
                    let action = decide(&o);
                    if r.phase == Phase::Idle {
                        prop_assert!(
                            matches!(action, Action::Wait { .. } | Action::AcquireLock),
                            "{action:?} for {a:.200?}"
                        );
                    } else {
                        // Mid-cycle without the lock: the cycle ends (never a drain or a
                        // reboot without the lock).
                        prop_assert!(
                            !matches!(action, Action::Cordon | Action::Drain | Action::Reboot),
                            "{action:?} for {a:.200?}"
                        );
                    }
                    let _ = end_cycle_patch(&o.node, CycleEnd::Failed("x"), o.now);
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn each_kind_of_garbage_is_read_the_documented_way() {
        let now = t("2026-11-24T22:00:00Z");
        let one = |k: &str, v: &str| parse_recorded(&BTreeMap::from([(k.to_owned(), v.to_owned())]));
        // cordoned-by-kreboot: anything but "true" is false (never uncordon an admin's cordon).
        let r = one(ANN_CORDONED_BY_KREBOOT, "yes");
        assert!(!r.cordoned_by_kreboot);
        assert!(
            r.problems[0].contains("neither true nor false"),
            "{:?}",
            r.problems
        );
        assert!(one(ANN_CORDONED_BY_KREBOOT, "false").problems.is_empty());
        // Times that are not times: ignored, reported.
        let r = one(ANN_LAST_FAILURE, "last tuesday");
        assert_eq!(r.last_failure, None);
        assert!(r.problems[0].contains("not an RFC 3339 time"));
        // A huge value is quoted in part.
        let r = one(ANN_PHASE, &"z".repeat(200_000));
        assert!(
            r.problems[0].len() < 300 && r.problems[0].contains("200000 bytes"),
            "{}",
            r.problems[0]
        );
        // A drain record out of range: ignored (it only feeds metrics).
        let r = one(ANN_DRAINED, r#"{"millis": 18446744073709551615, "evicted": 3}"#);
        assert_eq!(r.drained, None);
        assert!(r.problems[0].contains("out of range"));
        // A reboot request's words are bounded.
        let r = one(
            ANN_REBOOT_REQUESTED,
            &format!(r#"{{"by": "{}", "at": ""}}"#, "a".repeat(10_000)),
        );
        assert!(r.reboot_requested.unwrap().by.len() <= 260);
        // Times in the future: obeyed as written (the node waits), and reported.
        let r = one(ANN_LAST_REBOOT, "9999-12-31T23:59:59Z");
        assert!(r.problems.is_empty());
        let p = time_problems(&r, now);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].contains("is in the future") && p[0].contains("9999-12-31"),
            "{}",
            p[0]
        );
        let mut o = obs();
        o.node.recorded = r;
        assert!(
            matches!(
                decide(&o),
                Action::Wait {
                    reason: WaitReason::RebootLoopBackoff,
                    ..
                }
            ),
            "{:?}",
            decide(&o)
        );
        // A few minutes ahead is clock skew, not garbage.
        let r = one(ANN_LAST_FAILURE, "2026-11-24T22:04:00Z");
        assert!(time_problems(&r, now).is_empty());
    }
}
