//! The cluster-wide reboot lock: `coordination.k8s.io/v1` Leases, one per concurrency slot.
//!
//! Slot 0 is named `--lock-name` itself (`kreboot-lock`), slot `i > 0` is `<lock-name>-<i>`, so
//! raising `--concurrency` keeps the existing slot. A slot is free when it has no holder, when
//! its holder stopped renewing for longer than the lease duration, or when its holder Node no
//! longer exists (kured's "ghost lock"). Every take-over is a replace carrying the
//! resourceVersion the decision was made on, so of several racing nodes exactly one wins and the
//! others get 409 Conflict; a Lease without one is never written (the API server refuses an
//! unconditional Lease update, and it would not be safe), nor a duration under one second.
//!
//! Expiry never trusts a wall clock: a lease counts as expired only when this agent has seen no
//! new version of it for the lease duration, measured on its own monotonic clock from the
//! moment it first saw the current version (as client-go's leader election does). The Lease's
//! `renewTime` is the holder's wall clock and the comparison would be with ours: a node whose
//! clock runs 10 minutes ahead (or a holder whose clock runs behind) would see every lease as
//! expired and take a slot that is being renewed, putting two nodes out at once. An agent that
//! has just started therefore waits one lease duration before it takes over a stale slot; a
//! slot whose holder Node is gone is still freed at once. The pure part ([`slot_status`],
//! [`pick_slot`], [`held_slot`]) reads no clock; [`LeaseLock`] does the API calls.
//!
//! A policy rule may have slots of its own (`{lock}-r-{rule}`, per lock group `{lock}-g-{value}`,
//! as many as its `concurrency`, a number or a share of its pool), and with
//! `lockGroup.maxConcurrent` a second set over all its groups (`{lock}-c-{rule}`, see
//! [`cap_slot_set`]). Releases are stamped on the Lease ([`ANN_RELEASED_AT`]) for the rule's
//! `soak`.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api,
    api::{PostParams, ResourceExt},
};
use tokio::time::Instant;

/// How far apart two nodes' clocks may be before a lease's own timestamps could mislead. Only
/// `kreboot status` (which has not watched the Leases) judges by `renewTime`, older than the
/// lease duration plus this; the agents never do (see the module's notes).
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::seconds(60);

/// When this agent first saw the current version of each Lease (by name), on its own monotonic
/// clock: immune to wall-clock skew and to the wall clock being stepped (NTP, an operator).
pub type Seen = BTreeMap<String, Instant>;

/// How long ago this agent first saw `name`'s current version, on its monotonic clock at
/// `mono`. A version not recorded counts as seen just now: the safe side.
fn seen_for(seen: &Seen, name: &str, mono: Instant) -> std::time::Duration {
    seen.get(name)
        .map_or(std::time::Duration::ZERO, |t| mono.saturating_duration_since(*t))
}

/// Label carried by every Lease kreboot creates; its value is the lock name.
pub const LOCK_LABEL: &str = "kreboot.io/lock";

/// Annotation on a slot's Lease: when its holder last released it or handed it on (RFC 3339,
/// microseconds, the releasing node's clock). Waiters of a rule with a `soak` read it from the
/// Leases they already watch: no new request, no polling.
pub const ANN_RELEASED_AT: &str = "kreboot.io/released-at";

/// Annotation on a slot's Lease: the holder that started its cycle (cordon, drain, reboot) on
/// this slot, written by that holder in a conditional Lease write *before* its cordon. It fences
/// a take-over: a waiter never takes over an expired slot whose Lease says its holder started a
/// cycle (the holder may be out of service, or its cordon may still be on its way to the API
/// server), and a take-over's own conditional write makes a holder's late mark fail with 409, so
/// that holder never cordons. The holder's Node is another object, written later and watched
/// with a lag: it cannot fence. Cleared by every write that starts a new tenure (take, hand-off,
/// release).
pub const ANN_CYCLE_OF: &str = "kreboot.io/cycle-of";

/// Lease duration of a slot handed to a waiter: the waiter claims it with the full `--lock-ttl`
/// as soon as it sees it. If the waiter is gone, the slot frees itself after this long, instead
/// of after a whole TTL.
pub const HANDOFF_SECONDS: i32 = 10;

/// Label on a slot's Lease: the node it was last handed to (written in the hand-off itself). A
/// waiter that dozes (see [`doze_period`]) watches only the Leases with its own name here, so a
/// hand-over wakes the one waiter it names instead of every waiter.
pub const LABEL_HANDED_TO: &str = "kreboot.io/handed-to";

/// Annotation on a slot's Lease: how many other nodes waited for this slot when it was last
/// handed on (written in the hand-off itself), from the holder's list of waiting Nodes.
pub const ANN_QUEUE_LENGTH: &str = "kreboot.io/queue-length";

/// A queue at least this long makes its waiters doze (see [`doze_period`]). Below it every
/// waiter watches the whole lock: the fan-out of a Lease write to 50 waiters is cheap, and a
/// ghost holder or a freed slot is seen at once.
pub const DOZE_MIN_QUEUE: usize = 50;

/// How long a waiter of a queue of `queue` nodes dozes before it looks at the whole lock again
/// (None: too short a queue to doze), with `jitter` in `[0, 1)` spreading the looks of the
/// waiters.
///
/// Why dozing: every waiter watching every lock Lease and every lock holder's Node means each
/// write of a hand-over is sent to, and decoded by, every waiter. Measured on the real
/// kube-apiserver with 1,000 nodes at concurrency 20, that fan-out took both cores (about 0.3
/// nodes rebooted a second), and at 5,000 kube-apiserver dropped its watchers. A dozing waiter
/// keeps its own Node's watch and the policy's, and a watch of the Leases handed to it (kube-
/// apiserver filters the others out before sending them): a hand-over, which names the longest
/// waiter, wakes that one waiter. What a hand-over does not announce (a slot freed because the
/// hand-over could not be made, a holder whose Lease expired or whose Node was deleted, a
/// resumed rollout) is found by the waiters' periodic looks: each waiter looks every
/// 100 ms × queue length (1 minute to 30 minutes), so the queue as a whole looks about once a
/// second at 50 waiters and ten times a second from 600 to 18,000.
pub fn doze_period(queue: usize, jitter: f64) -> Option<std::time::Duration> {
    if queue < DOZE_MIN_QUEUE {
        return None;
    }
    let base = std::time::Duration::from_millis(100)
        .saturating_mul(u32::try_from(queue).unwrap_or(u32::MAX))
        .clamp(
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(1800),
        );
    Some(base.mul_f64(0.5 + jitter.clamp(0.0, 1.0)))
}

/// The longest queue the hand-offs of `slots` recorded ([`ANN_QUEUE_LENGTH`]); 0 when none did.
pub fn queue_length(slots: &[String], leases: &BTreeMap<String, Lease>) -> usize {
    slots
        .iter()
        .filter_map(|s| {
            leases
                .get(s)?
                .metadata
                .annotations
                .as_ref()?
                .get(ANN_QUEUE_LENGTH)
        })
        .filter_map(|v| v.parse::<usize>().ok())
        .max()
        .unwrap_or(0)
}

/// At least how many nodes other than `me` wait, from one page of the waiting Nodes' `names`
/// (`more`: the API server said more are left; counted as one more).
pub fn waiters_at_least<'a>(names: impl Iterator<Item = &'a str>, more: bool, me: &str) -> usize {
    names.filter(|n| *n != me).count() + usize::from(more)
}

/// Whether `name` can be a label value ([`LABEL_HANDED_TO`]): at most 63 characters,
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric. A node whose name cannot be
/// is never named by the label, and never dozes.
pub fn fits_label(name: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    !name.is_empty()
        && name.len() <= 63
        && alnum(name.chars().next())
        && alnum(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The slots a node competes for, given the policy rule that selects it (None: no policy):
/// with a `lockGroup`, its group's own `concurrency` slots (`{lock}-g-{group}`, …); with only a
/// rule `concurrency`, the rule's own slots (`{lock}-r-{rule}`, …); otherwise the cluster-wide
/// `--concurrency` slots. A percentage `concurrency` is a share of `pool_size`, the number of
/// nodes that share these slots (None: not known, which gives one slot: the cautious answer).
pub fn slot_set(
    lock_name: &str,
    default_concurrency: u32,
    rule: Option<&crate::policy::RuleView>,
    pool_size: Option<usize>,
) -> Vec<String> {
    let Some(rule) = rule else {
        return slot_names(lock_name, default_concurrency);
    };
    let concurrency = rule.concurrency.map_or(default_concurrency, |b| {
        crate::policy::slots(b, pool_size.unwrap_or(0))
    });
    match (&rule.lock_group, &rule.name) {
        // Each group (value of the label) has its own slots: groups progress side by side.
        (Some(g), _) => slot_names(
            &format!("{lock_name}-g-{}", name_part(g.value.as_deref().unwrap_or(""))),
            concurrency,
        ),
        // A rule with its own concurrency has its own slots.
        (None, Some(name)) if rule.concurrency.is_some() => {
            slot_names(&format!("{lock_name}-r-{}", name_part(name)), concurrency)
        }
        _ => slot_names(lock_name, default_concurrency),
    }
}

/// The rule-wide cap slots of a rule with `lockGroup.maxConcurrent`: `maxConcurrent` slots
/// `{lock}-c-{rule}`, … shared by every group of the rule. A node of such a rule starts only
/// while it holds a slot of its group *and* one of these; it takes them in that order (the
/// group's first), so a cap slot is only ever held by a node that holds its group's slot, and
/// two nodes never hold one each of what the other waits for. None: no cap. A percentage
/// `maxConcurrent` is a share of `rule_pool`, the number of nodes the rule selects over all its
/// groups (None: not known, which gives one slot: the cautious answer).
pub fn cap_slot_set(
    lock_name: &str,
    rule: Option<&crate::policy::RuleView>,
    rule_pool: Option<usize>,
) -> Option<Vec<String>> {
    let rule = rule?;
    let max = rule.lock_group.as_ref()?.max_concurrent?;
    let name = rule.name.as_deref()?;
    Some(slot_names(
        &format!("{lock_name}-c-{}", name_part(name)),
        crate::policy::slots(max, rule_pool.unwrap_or(0)),
    ))
}

/// Whether Lease `name` is a cap slot of lock `lock_name` (of any rule).
pub fn is_cap_slot(lock_name: &str, name: &str) -> bool {
    name.strip_prefix(lock_name)
        .is_some_and(|rest| rest.starts_with("-c-"))
}

/// A label value or rule name as part of a Lease name: kept when it is already a lowercase DNS
/// label (readable: `kreboot-lock-g-db`), else a stable hash of it (FNV-1a), so that different
/// values never share slots. The empty value (nodes without the label) is `none`.
fn name_part(s: &str) -> String {
    if s.is_empty() {
        return "none".to_owned();
    }
    let dns = s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if dns {
        return s.to_owned();
    }
    let hash = s.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("x{hash:08x}")
}

/// The slot names `lock_name`, `lock_name-1`, … for `concurrency` slots.
pub fn slot_names(lock_name: &str, concurrency: u32) -> Vec<String> {
    (0..concurrency.max(1))
        .map(|i| {
            if i == 0 {
                lock_name.to_owned()
            } else {
                format!("{lock_name}-{i}")
            }
        })
        .collect()
}

/// Whether Lease `name` is one of the slots of the set whose slot 0 is `stem` (`stem`,
/// `stem-1`, `stem-2`, …), whatever the set's current size.
pub fn in_set(stem: &str, name: &str) -> bool {
    name == stem
        || name
            .strip_prefix(stem)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

/// When `lease` was last released or handed on, if recorded.
pub fn released_at(lease: &Lease) -> Option<DateTime<Utc>> {
    lease
        .metadata
        .annotations
        .as_ref()?
        .get(ANN_RELEASED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// The end of the soak of the slot set whose slot 0 is `stem`: the latest release of any of
/// its slots plus `soak`. None when no slot was ever released (nothing to soak after).
pub fn soak_until(stem: &str, leases: &BTreeMap<String, Lease>, soak: Duration) -> Option<DateTime<Utc>> {
    leases
        .iter()
        .filter(|(name, _)| in_set(stem, name))
        .filter_map(|(_, l)| released_at(l))
        .max()
        .and_then(|t| t.checked_add_signed(soak))
}

/// The state of one slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    /// The Lease does not exist yet.
    Missing,
    /// Nobody holds it.
    Free,
    /// Held and renewed in time.
    Held {
        /// The holder's node name.
        holder: String,
        /// When it expires unless renewed.
        expires: DateTime<Utc>,
    },
    /// Held, but the holder stopped renewing.
    Expired {
        /// The former holder.
        holder: String,
    },
}

/// The holder of a Lease, if any.
pub fn holder(lease: &Lease) -> Option<&str> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .filter(|h| !h.is_empty())
}

/// The holder that started its cycle on `lease`, when that is its current holder (a mark left
/// by an earlier tenure does not count).
pub fn cycle_started(lease: &Lease) -> bool {
    let marked = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_CYCLE_OF))
        .map(String::as_str);
    marked.is_some() && marked == holder(lease)
}

/// `lease` without the cycle mark: a new tenure starts with no cycle.
fn clear_cycle_mark(lease: &mut Lease) {
    if let Some(a) = lease.metadata.annotations.as_mut() {
        a.remove(ANN_CYCLE_OF);
    }
}

/// The status of slot `lease` at `now`.
///
/// `seen_for` is how long ago this agent first saw the Lease's current version, on its own
/// monotonic clock: the lease is expired when that reaches its duration, whatever its
/// `renewTime` says (another machine's clock). `None` only for a report that has not watched
/// the Lease (`kreboot status`): it judges by `renewTime` plus [`CLOCK_SKEW_ALLOWANCE`], which
/// is an estimate, never the ground for a take-over.
pub fn slot_status(
    lease: Option<&Lease>,
    seen_for: Option<std::time::Duration>,
    now: DateTime<Utc>,
) -> SlotStatus {
    let Some(lease) = lease else {
        return SlotStatus::Missing;
    };
    let Some(holder) = holder(lease) else {
        return SlotStatus::Free;
    };
    let spec = lease.spec.as_ref();
    let renewed = spec
        .and_then(|s| s.renew_time.as_ref().or(s.acquire_time.as_ref()))
        .and_then(|t| from_jiff(&t.0));
    let duration = spec
        .and_then(|s| s.lease_duration_seconds)
        .map(|s| Duration::seconds(i64::from(s)));
    let expires = match (seen_for, renewed, duration) {
        // What this agent saw: the time left on its own clock, mapped onto `now`.
        (Some(age), Some(_), Some(duration)) => Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_add_signed(duration - age))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        (None, Some(renewed), Some(duration)) => renewed
            .checked_add_signed(duration + CLOCK_SKEW_ALLOWANCE)
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        // A Lease with a holder but no times or no duration was not written by kreboot (it
        // always writes both): treat it as held forever rather than steal it; an operator can
        // delete it. Its times are only checked for being there, never compared with a clock.
        _ => DateTime::<Utc>::MAX_UTC,
    };
    if expires > now {
        SlotStatus::Held {
            holder: holder.to_owned(),
            expires,
        }
    } else {
        SlotStatus::Expired {
            holder: holder.to_owned(),
        }
    }
}

/// The slot `me` holds, if any (an expired slot that nobody took over is still ours to renew).
pub fn held_slot(slots: &[String], leases: &BTreeMap<String, Lease>, me: &str) -> Option<String> {
    slots
        .iter()
        .find(|name| leases.get(*name).and_then(holder) == Some(me))
        .cloned()
}

/// `slots` in the order node `me` tries them when several are free: an order of its own
/// (rendezvous hashing: the highest hash of node and slot first), so that nodes finding free
/// slots at the same moment spread over them instead of all racing for the first. That moment
/// is real: after a night of updates every sentinel appears within seconds. Measured on the
/// real kube-apiserver with 5,000 nodes and 100 slots, all racing for the first free slot gave
/// over 1,300 refused Lease creates every 5 s, minutes into the rollout; spread, about 50 nodes
/// contend for each slot, once. Only the order of equally good slots changes (see
/// [`pick_slot`]), so nodes of different versions disagreeing on it is harmless.
pub fn preference_order(slots: &[String], me: &str) -> Vec<String> {
    let mut ranked: Vec<(u64, &String)> = slots.iter().map(|s| (rendezvous(me, s), s)).collect();
    ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, s)| s.clone()).collect()
}

/// How highly `node` and `slot` rank each other (rendezvous hashing): the same for every node
/// of this version, different for each pair. Used to spread nodes over slots
/// ([`preference_order`]) and slots over waiters (`node::pick_successor`).
pub fn rendezvous(node: &str, slot: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (node, slot).hash(&mut h);
    h.finish()
}

/// The slot to try to take, given which holders' Nodes are known to be gone.
///
/// Of equally good slots, the first in `slots`' order (see [`preference_order`]).
/// Free and missing slots come first, then expired ones, then held ones whose holder Node no
/// longer exists. `None` when every slot is legitimately held.
pub fn pick_slot(
    slots: &[String],
    leases: &BTreeMap<String, Lease>,
    seen: &Seen,
    now: DateTime<Utc>,
    mono: Instant,
    holder_node: impl Fn(&str) -> HolderNode,
) -> Option<String> {
    let mut best: Option<(u8, &String)> = None;
    for name in slots {
        let rank = match slot_status(leases.get(name), Some(seen_for(seen, name, mono)), now) {
            SlotStatus::Missing | SlotStatus::Free => 0,
            // Its holder started a cycle on it (the Lease says so, in the Lease's own
            // version): it may be out of service, or its cordon still on its way, whatever its
            // Node looks like from here. Not taken (see `ANN_CYCLE_OF`), unless its Node is gone.
            SlotStatus::Expired { ref holder }
                if leases.get(name).is_some_and(cycle_started) && holder_node(holder) != HolderNode::Gone =>
            {
                continue;
            }
            SlotStatus::Expired { holder } => match holder_node(&holder) {
                HolderNode::Idle | HolderNode::Gone => 1,
                // Its holder is out (draining or rebooting) but stopped renewing: it did not
                // come back. Taking its slot would put one more node out; the rollout stops
                // instead, and the "lock held too long" alert tells the operator.
                HolderNode::InCycle | HolderNode::Unknown => continue,
            },
            SlotStatus::Held { holder, .. } if holder_node(&holder) == HolderNode::Gone => 2,
            SlotStatus::Held { .. } => continue,
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, name));
        }
    }
    best.map(|(_, n)| n.clone())
}

/// What a waiter knows of a lock holder's Node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HolderNode {
    /// Not known yet (its watch has not listed it).
    Unknown,
    /// The Node no longer exists: its slot is free at once.
    Gone,
    /// The Node records a kreboot cycle in progress (it is out of service).
    InCycle,
    /// The Node exists and records no cycle.
    Idle,
}

/// The earliest instant at which a held slot expires (to wake a waiter without polling).
pub fn next_expiry(
    slots: &[String],
    leases: &BTreeMap<String, Lease>,
    seen: &Seen,
    now: DateTime<Utc>,
    mono: Instant,
) -> Option<DateTime<Utc>> {
    slots
        .iter()
        .filter_map(
            |n| match slot_status(leases.get(n), Some(seen_for(seen, n, mono)), now) {
                SlotStatus::Held { expires, .. } => Some(expires),
                _ => None,
            },
        )
        .min()
}

/// How soon a waiter needs to know whether a holder's Node still exists, when the holder does
/// not carry the holder label (see `agent::watches`): a deleted holder's slot is freed at once,
/// but each waiter that looks reads that Node, and at a hand-over under load every waiter would
/// look at the new holder before its label arrives. So only the waiters that would take that
/// slot first look soon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// The slot is the waiter's first choice ([`preference_order`]), or it has expired: look
    /// after a short grace.
    Soon,
    /// Another slot is the waiter's first choice: look after a longer grace; the waiters that
    /// prefer this slot look soon.
    Later,
}

/// Holders of currently held slots (whose Nodes a waiter watches for deletion), with how soon
/// waiter `me` looks at each. A slot handed to a waiter that has not claimed it yet (its Lease
/// runs for [`HANDOFF_SECONDS`]) is left out: it frees itself within those seconds if that
/// waiter is gone, and is listed again once claimed (or expired).
pub fn holders(
    slots: &[String],
    leases: &BTreeMap<String, Lease>,
    seen: &Seen,
    now: DateTime<Utc>,
    mono: Instant,
    me: &str,
) -> Vec<(String, Urgency)> {
    let first_choice = preference_order(slots, me).into_iter().next();
    let urgency = |slot: &String| {
        if first_choice.as_ref() == Some(slot) {
            Urgency::Soon
        } else {
            Urgency::Later
        }
    };
    let handed_over = |lease: Option<&Lease>| {
        lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.lease_duration_seconds)
            .is_some_and(|d| d <= HANDOFF_SECONDS)
    };
    slots
        .iter()
        .filter_map(|n| {
            let lease = leases.get(n);
            match slot_status(lease, Some(seen_for(seen, n, mono)), now) {
                SlotStatus::Held { .. } if handed_over(lease) => None,
                SlotStatus::Held { holder, .. } => Some((holder, urgency(n))),
                SlotStatus::Expired { holder } => Some((holder, Urgency::Soon)),
                _ => None,
            }
        })
        .collect()
}

/// Why a lock operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another node changed the Lease first (409): re-read and decide again.
    #[error("lost the race for lease {lease}")]
    Conflict {
        /// The Lease.
        lease: String,
    },
    /// The Lease as this node knows it carries no `metadata.resourceVersion`, so a replace of
    /// it would be unconditional (and the API server refuses those for Leases: 422). Nothing
    /// was sent; re-read the Lease.
    #[error("lease {lease} has no resourceVersion; not writing it")]
    Unversioned {
        /// The Lease.
        lease: String,
    },
    /// The API call failed; retry with back-off.
    #[error("failed to write lease {lease}: {source}")]
    Api {
        /// The Lease.
        lease: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

impl LockError {
    fn from_kube(lease: &str, e: kube::Error) -> LockError {
        match &e {
            kube::Error::Api(s) if s.code == 409 => LockError::Conflict { lease: lease.into() },
            _ => LockError::Api {
                lease: lease.into(),
                source: e,
            },
        }
    }
}

/// Lease operations for one node.
#[derive(Clone)]
pub struct LeaseLock {
    /// Leases in the agent's namespace.
    pub api: Api<Lease>,
    /// The lock name (label value and slot-name stem).
    pub lock_name: String,
    /// This node's name: the holder identity.
    pub identity: String,
    /// Lease duration written into the spec.
    pub ttl: Duration,
}

/// Records on `lease` that it was released (or handed on) at `now`, in the same write.
/// `lease` with the hand-off's label and annotation: the waiter it goes to
/// ([`LABEL_HANDED_TO`], left out when that name cannot be a label value) and how many others
/// still wait ([`ANN_QUEUE_LENGTH`]).
fn handed_off(lease: &Lease, successor: &str, queue: usize) -> Lease {
    let mut lease = lease.clone();
    let labels = lease.metadata.labels.get_or_insert_with(BTreeMap::new);
    if fits_label(successor) {
        labels.insert(LABEL_HANDED_TO.to_owned(), successor.to_owned());
    } else {
        labels.remove(LABEL_HANDED_TO);
    }
    lease
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANN_QUEUE_LENGTH.to_owned(), queue.to_string());
    lease
}

fn mark_released(lease: &mut Lease, now: DateTime<Utc>) {
    lease
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(
            ANN_RELEASED_AT.to_owned(),
            now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        );
}

/// k8s-openapi stores times as `jiff` timestamps; kreboot computes with `chrono`.
fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros()).unwrap_or_default())
}

/// The `chrono` form of a `jiff` timestamp from the API.
fn from_jiff(t: &k8s_openapi::jiff::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(t.as_microsecond())
}

impl LeaseLock {
    /// `spec.leaseDurationSeconds` for `ttl`: whole seconds, at least 1 (the API server refuses
    /// a duration that is not positive; `--lock-ttl` is at least 10 s anyway).
    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.ttl.num_seconds()).unwrap_or(i32::MAX).max(1)
    }

    /// Replaces `lease` (named `name`) only if it carries the resourceVersion the decision was
    /// made on: the write is then conditional (409 when someone else wrote first), and the API
    /// server refuses a Lease update without one anyway.
    async fn replace_versioned(&self, name: &str, lease: &Lease) -> Result<Lease, LockError> {
        if lease
            .metadata
            .resource_version
            .as_deref()
            .is_none_or(str::is_empty)
        {
            return Err(LockError::Unversioned { lease: name.into() });
        }
        self.api
            .replace(name, &PostParams::default(), lease)
            .await
            .map_err(|e| LockError::from_kube(name, e))
    }

    fn spec(&self, holder: Option<&str>, acquire: Option<DateTime<Utc>>, now: DateTime<Utc>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: acquire.map(micro),
            renew_time: holder.map(|_| micro(now)),
            ..LeaseSpec::default()
        }
    }

    /// Takes slot `name`, whose last seen version is `current` (None: create it).
    ///
    /// # Errors
    /// [`LockError::Conflict`] when another node got there first.
    pub async fn acquire(
        &self,
        name: &str,
        current: Option<&Lease>,
        now: DateTime<Utc>,
    ) -> Result<Lease, LockError> {
        let spec = self.spec(Some(&self.identity), Some(now), now);
        let result = match current {
            Some(lease) => {
                let mut lease = lease.clone();
                lease.spec = Some(spec);
                clear_cycle_mark(&mut lease);
                return self.replace_versioned(name, &lease).await;
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        labels: Some(BTreeMap::from([(LOCK_LABEL.to_owned(), self.lock_name.clone())])),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        result.map_err(|e| LockError::from_kube(name, e))
    }

    /// Renews slot `lease`, which this node holds.
    ///
    /// # Errors
    /// [`LockError::Conflict`] when the Lease changed under us (it may have been taken over).
    pub async fn renew(&self, lease: &Lease, now: DateTime<Utc>) -> Result<Lease, LockError> {
        let name = lease.name_any();
        let mut lease = lease.clone();
        let acquire = lease
            .spec
            .as_ref()
            .and_then(|s| s.acquire_time.as_ref())
            .and_then(|t| from_jiff(&t.0));
        lease.spec = Some(self.spec(Some(&self.identity), acquire.or(Some(now)), now));
        self.replace_versioned(&name, &lease).await
    }

    /// Whether `lease` (held by this node) still carries a hand-off duration rather than the
    /// full TTL, i.e. must be claimed before the cycle goes on.
    pub fn needs_claim(&self, lease: &Lease) -> bool {
        lease.spec.as_ref().and_then(|s| s.lease_duration_seconds) != Some(self.duration_seconds())
    }

    /// Records on slot `lease`, which this node holds, that it starts its cycle (see
    /// [`ANN_CYCLE_OF`]), with the full TTL (so it also claims a handed-over slot). Conditional
    /// on the version held: a take-over that came first makes it fail, and the node then does
    /// not cordon.
    ///
    /// # Errors
    /// [`LockError::Conflict`] when the Lease changed under us.
    pub async fn start_cycle(&self, lease: &Lease, now: DateTime<Utc>) -> Result<Lease, LockError> {
        let mut marked = lease.clone();
        marked
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANN_CYCLE_OF.to_owned(), self.identity.clone());
        // A renewal (full TTL, same acquire time) that carries the mark in the same write.
        self.renew(&marked, now).await
    }

    /// Hands slot `lease`, held by this node, straight to `successor` (one write instead of a
    /// release followed by a race of every waiter).
    ///
    /// # Errors
    /// [`LockError::Conflict`] when the Lease changed under us.
    pub async fn hand_off(
        &self,
        lease: &Lease,
        successor: &str,
        queue: usize,
        now: DateTime<Utc>,
    ) -> Result<Lease, LockError> {
        let name = lease.name_any();
        let mut lease = handed_off(lease, successor, queue);
        let mut spec = self.spec(Some(successor), Some(now), now);
        spec.lease_duration_seconds = Some(HANDOFF_SECONDS);
        lease.spec = Some(spec);
        mark_released(&mut lease, now);
        clear_cycle_mark(&mut lease);
        self.replace_versioned(&name, &lease).await
    }

    /// Releases slot `lease` if (and only if) this node still holds it in that version.
    ///
    /// # Errors
    /// [`LockError::Conflict`] when the Lease changed under us; re-read before retrying.
    pub async fn release(&self, lease: &Lease, now: DateTime<Utc>) -> Result<Option<Lease>, LockError> {
        if holder(lease) != Some(self.identity.as_str()) {
            return Ok(None);
        }
        let name = lease.name_any();
        let mut lease = lease.clone();
        lease.spec = Some(self.spec(None, None, now));
        mark_released(&mut lease, now);
        clear_cycle_mark(&mut lease);
        self.replace_versioned(&name, &lease).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_groups_have_their_own_slots() {
        use crate::policy::{Policy, RuleView};
        let p = Policy::parse(
            "rules:\n  - name: pools\n    nodeSelector: {matchExpressions: [{key: pool, operator: Exists}]}\n    concurrency: 1\n    lockGroup: {byLabel: pool}\n  - name: DB_Rule\n    nodeSelector: {matchLabels: {role: db}}\n    concurrency: 2\n",
        )
        .unwrap();
        let labels = |k: &str, v: &str| [(k.to_string(), v.to_string())].into();
        let rule = |l| -> RuleView { p.rule_for(&l) };
        let set = |l| slot_set("kreboot-lock", 3, Some(&rule(l)), None);
        assert_eq!(set(labels("pool", "a")), ["kreboot-lock-g-a"]);
        assert_eq!(set(labels("pool", "b")), ["kreboot-lock-g-b"]);
        assert_ne!(
            set(labels("pool", "Web_1")),
            set(labels("pool", "web-1")),
            "no collision"
        );
        assert_eq!(set(labels("role", "db")).len(), 2);
        assert!(set(labels("role", "db"))[0].starts_with("kreboot-lock-r-x"));
        assert_eq!(
            set(labels("other", "x")),
            ["kreboot-lock", "kreboot-lock-1", "kreboot-lock-2"]
        );
        assert_eq!(
            slot_set("kreboot-lock", 2, None, None),
            ["kreboot-lock", "kreboot-lock-1"]
        );
    }

    #[test]
    fn a_cap_over_groups_has_slots_of_its_own() {
        use crate::policy::Policy;
        let p = Policy::parse(
            "rules:\n  - name: pools\n    nodeSelector: {}\n    concurrency: 1\n    lockGroup: {byLabel: pool, maxConcurrent: 2}\n  - name: free\n    nodeSelector: {}\n    lockGroup: {byLabel: pool}\n",
        )
        .unwrap();
        let a = p.rule_for(&[("pool".to_string(), "a".to_string())].into());
        let caps = cap_slot_set("kreboot-lock", Some(&a), None).unwrap();
        assert_eq!(caps, ["kreboot-lock-c-pools", "kreboot-lock-c-pools-1"]);
        assert!(caps.iter().all(|c| is_cap_slot("kreboot-lock", c)));
        assert!(
            slot_set("kreboot-lock", 1, Some(&a), None)
                .iter()
                .all(|g| !is_cap_slot("kreboot-lock", g)),
            "group slots are not cap slots"
        );
        assert!(!is_cap_slot("kreboot-lock", "kreboot-lock-g-c"));
        assert!(!is_cap_slot("kreboot-lock", "other-c-pools"));
        let no_cap =
            Policy::parse("rules: [{name: free, nodeSelector: {}, lockGroup: {byLabel: pool}}]").unwrap();
        assert_eq!(
            cap_slot_set("kreboot-lock", Some(&no_cap.rule_for(&BTreeMap::new())), None),
            None
        );
        assert_eq!(cap_slot_set("kreboot-lock", None, None), None);
    }

    #[test]
    fn a_percentage_budget_follows_the_pool() {
        use crate::policy::Policy;
        let p = Policy::parse(
            "rules:\n  - name: web\n    nodeSelector: {matchLabels: {role: web}}\n    concurrency: \"25%\"\n",
        )
        .unwrap();
        let rule = p.rule_for(&[("role".to_string(), "web".to_string())].into());
        let set = |pool| slot_set("kreboot-lock", 5, Some(&rule), pool);
        assert_eq!(set(Some(8)), ["kreboot-lock-r-web", "kreboot-lock-r-web-1"]);
        assert_eq!(set(Some(12)).len(), 3, "the pool grew");
        assert_eq!(set(Some(7)).len(), 1, "rounded down");
        assert_eq!(set(Some(2)).len(), 1, "at least one");
        assert_eq!(set(None), ["kreboot-lock-r-web"], "unknown pool: one slot");
        // Slot 0 keeps its name whatever the size: a holder's slot survives a resize.
        assert_eq!(set(Some(8))[0], set(Some(40))[0]);
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn lease(name: &str, holder: Option<&str>, renewed: &str, secs: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(micro(t(renewed))),
                lease_duration_seconds: Some(secs),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn soak_follows_the_latest_release_of_the_set() {
        let mut leases = BTreeMap::new();
        let mut released = |name: &str, at: &str| {
            let mut l = lease(name, None, "2026-11-24T09:00:00Z", 60);
            mark_released(&mut l, t(at));
            leases.insert(name.to_owned(), l);
        };
        released("kreboot-lock-r-web", "2026-11-24T10:00:00Z");
        released("kreboot-lock-r-web-1", "2026-11-24T10:02:00Z");
        released("kreboot-lock-r-web-x", "2026-11-24T10:09:00Z");
        released("kreboot-lock", "2026-11-24T10:08:00Z");
        let soak = Duration::minutes(10);
        assert_eq!(
            soak_until("kreboot-lock-r-web", &leases, soak),
            Some(t("2026-11-24T10:12:00Z")),
            "the latest release of the set's own slots, not another set's"
        );
        assert_eq!(
            soak_until("kreboot-lock-r-db", &leases, soak),
            None,
            "never released"
        );
        assert!(in_set("l", "l") && in_set("l", "l-12"));
        assert!(!in_set("l", "l-") && !in_set("l", "l-a") && !in_set("l", "l2"));
        assert_eq!(
            released_at(&leases["kreboot-lock"]),
            Some(t("2026-11-24T10:08:00Z"))
        );
    }

    #[test]
    fn slot_names_keep_slot_zero_stable() {
        assert_eq!(slot_names("kreboot-lock", 1), vec!["kreboot-lock"]);
        assert_eq!(slot_names("l", 3), vec!["l", "l-1", "l-2"]);
        assert_eq!(slot_names("l", 0), vec!["l"], "concurrency 0 is treated as 1");
    }

    fn secs(n: u64) -> std::time::Duration {
        std::time::Duration::from_secs(n)
    }

    #[test]
    fn status_of_slots() {
        let now = t("2026-11-24T10:00:00Z");
        assert_eq!(slot_status(None, None, now), SlotStatus::Missing);
        let free = lease("l", None, "2026-11-24T09:00:00Z", 60);
        assert_eq!(slot_status(Some(&free), Some(secs(999)), now), SlotStatus::Free);
        let held = lease("l", Some("n1"), "2026-11-24T09:59:30Z", 60);
        assert_eq!(
            slot_status(Some(&held), Some(secs(30)), now),
            SlotStatus::Held {
                holder: "n1".into(),
                expires: t("2026-11-24T10:00:30Z")
            },
            "the time left is the duration less what this agent has watched"
        );
        assert_eq!(
            slot_status(Some(&held), Some(secs(60)), now),
            SlotStatus::Expired { holder: "n1".into() },
            "unchanged for the whole duration on this agent's own clock"
        );
        let empty_holder = lease("l", Some(""), "2026-11-24T09:59:30Z", 60);
        assert_eq!(slot_status(Some(&empty_holder), None, now), SlotStatus::Free);
        // A report that has not watched the Leases estimates from the timestamps.
        let ancient = lease("l", Some("n1"), "2026-11-24T09:00:00Z", 60);
        assert!(matches!(
            slot_status(Some(&ancient), None, now),
            SlotStatus::Expired { .. }
        ));
        assert!(matches!(
            slot_status(Some(&held), None, now),
            SlotStatus::Held { .. }
        ));
        // A holder but no duration, or no times: not kreboot's; never taken.
        let mut odd = held.clone();
        odd.spec.as_mut().unwrap().lease_duration_seconds = None;
        assert!(matches!(
            slot_status(Some(&odd), Some(secs(1_000_000)), now),
            SlotStatus::Held { .. }
        ));
        let mut odd = held.clone();
        odd.spec.as_mut().unwrap().renew_time = None;
        assert!(matches!(
            slot_status(Some(&odd), Some(secs(1_000_000)), now),
            SlotStatus::Held { .. }
        ));
    }

    /// Issue 17: one node's clock is 10 minutes off. Whatever the offset and its sign, and
    /// however old or new the holder's `renewTime` looks, a lease this agent saw renewed within
    /// its duration is held, and one it saw unchanged for the duration is expired.
    #[test]
    fn a_clock_ten_minutes_off_cannot_take_a_renewed_slot() {
        let true_now = t("2026-11-24T10:00:00Z");
        // Two hours on: every `mono - secs(..)` below stays after the process started.
        let mono = Instant::now() + secs(7200);
        let slots = slot_names("l", 1);
        // The holder renewed 5 s ago by its own (correct) clock; it renews every few seconds.
        let leases: BTreeMap<String, Lease> = [(
            "l".to_string(),
            lease("l", Some("n1"), "2026-11-24T09:59:55Z", 60),
        )]
        .into();
        for offset_min in [-10i64, -1, 0, 1, 10, 600] {
            let observer_now = true_now + Duration::minutes(offset_min);
            // This agent saw the version 5 s ago on its monotonic clock.
            let seen: Seen = [("l".to_string(), mono - secs(5))].into();
            assert_eq!(
                pick_slot(&slots, &leases, &seen, observer_now, mono, |_| HolderNode::Idle),
                None,
                "an observer {offset_min} min off took a slot renewed 5 s ago"
            );
            assert!(matches!(
                slot_status(leases.get("l"), Some(secs(5)), observer_now),
                SlotStatus::Held { .. }
            ));
            // The holder's clock is the wrong one: its renewTime looks 10 min old (or new).
            let mut skewed = leases.clone();
            let stamp = (true_now + Duration::minutes(offset_min)).to_rfc3339();
            skewed.insert("l".into(), lease("l", Some("n1"), &stamp, 60));
            assert_eq!(
                pick_slot(&slots, &skewed, &seen, true_now, mono, |_| HolderNode::Idle),
                None,
                "a holder {offset_min} min off lost a slot it renews"
            );
            // Seen unchanged for the whole duration: expired, whatever the clocks say.
            let stale: Seen = [("l".to_string(), mono - secs(61))].into();
            assert_eq!(
                pick_slot(&slots, &skewed, &stale, observer_now, mono, |_| HolderNode::Idle).as_deref(),
                Some("l"),
                "offset {offset_min} min"
            );
        }
    }

    /// The old rule ("or renewTime older than the duration plus 60 s") let an agent whose clock
    /// runs 10 minutes ahead expire a lease it had just seen renewed; the timestamps no longer
    /// matter to an agent.
    #[test]
    fn a_stale_renew_time_alone_never_frees_a_slot() {
        let now = t("2026-11-24T10:00:00Z");
        let ancient = lease("l", Some("n1"), "2026-11-24T09:00:00Z", 60);
        assert!(matches!(
            slot_status(Some(&ancient), Some(secs(0)), now),
            SlotStatus::Held { .. }
        ));
        assert!(matches!(
            slot_status(Some(&ancient), Some(secs(59)), now),
            SlotStatus::Held { .. }
        ));
        // Not recorded in `seen` (cannot happen in the agent): counts as seen just now.
        let slots = slot_names("l", 1);
        let leases: BTreeMap<String, Lease> = [("l".to_string(), ancient)].into();
        assert_eq!(
            pick_slot(&slots, &leases, &Seen::new(), now, Instant::now(), |_| {
                HolderNode::Idle
            }),
            None
        );
    }

    #[test]
    fn nodes_spread_over_free_slots_and_each_keeps_its_order() {
        let slots: Vec<String> = (0..100).map(|i| format!("kreboot-lock-{i}")).collect();
        let mut first_choice: BTreeMap<String, usize> = BTreeMap::new();
        for n in 0..5000 {
            let me = format!("node-{n:04}");
            let order = preference_order(&slots, &me);
            assert_eq!(order, preference_order(&slots, &me), "the same order every time");
            let mut sorted = order.clone();
            sorted.sort();
            let mut all = slots.clone();
            all.sort();
            assert_eq!(sorted, all, "every slot, once");
            *first_choice.entry(order[0].clone()).or_default() += 1;
        }
        // 50 per slot on average; all racing for the first slot would put 5,000 on one.
        assert_eq!(first_choice.len(), 100, "every slot is some node's first choice");
        let most = first_choice.values().max().copied().unwrap_or(0);
        assert!(most <= 100, "{most} nodes prefer the same slot");
        // Its first choice held (renewed just now, seen just now): its second.
        let now = t("2026-11-24T10:00:00Z");
        let mono = Instant::now() + secs(7200);
        let order = preference_order(&slots, "node-0001");
        let leases = BTreeMap::from([(
            order[0].clone(),
            lease(&order[0], Some("n9"), "2026-11-24T09:59:59Z", 60),
        )]);
        let seen: Seen = [(order[0].clone(), mono - secs(1))].into();
        assert_eq!(
            pick_slot(&order, &leases, &seen, now, mono, |_| HolderNode::Idle).as_deref(),
            Some(order[1].as_str()),
        );
    }

    #[test]
    fn pick_prefers_free_then_expired_then_ghost() {
        let now = t("2026-11-24T10:00:00Z");
        // Two hours on: every `mono - secs(..)` below stays after the process started.
        let mono = Instant::now() + secs(7200);
        let slots = slot_names("l", 2);
        // This agent has been watching all along: it saw each version when it was written.
        let mut seen: Seen = [("l".to_string(), mono - secs(30))].into();
        let mut leases = BTreeMap::new();
        leases.insert("l".into(), lease("l", Some("n1"), "2026-11-24T09:59:30Z", 60));
        // Slot l-1 missing: take it.
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Idle).as_deref(),
            Some("l-1")
        );
        leases.insert("l-1".into(), lease("l-1", Some("n2"), "2026-11-24T09:00:00Z", 60));
        seen.insert("l-1".into(), mono - secs(3600));
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Idle).as_deref(),
            Some("l-1"),
            "expired"
        );
        leases.insert("l-1".into(), lease("l-1", Some("n2"), "2026-11-24T09:59:59Z", 60));
        seen.insert("l-1".into(), mono - secs(1));
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Idle),
            None,
            "all held"
        );
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |h| if h == "n1" {
                HolderNode::Gone
            } else {
                HolderNode::Idle
            })
            .as_deref(),
            Some("l"),
            "ghost"
        );
        // An expired slot whose holder is still out (mid-cycle) is not taken.
        leases.insert("l-1".into(), lease("l-1", Some("n2"), "2026-11-24T09:00:00Z", 60));
        seen.insert("l-1".into(), mono - secs(3600));
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::InCycle),
            None
        );
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Unknown),
            None
        );
        // An expired slot whose Lease says its holder started a cycle is not taken, however
        // idle its Node looks from here (the watch may lag behind the holder's cordon)...
        let mut marked = lease("l-1", Some("n2"), "2026-11-24T09:00:00Z", 60);
        marked
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANN_CYCLE_OF.into(), "n2".into());
        assert!(cycle_started(&marked));
        leases.insert("l-1".into(), marked.clone());
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Idle),
            None
        );
        // ...unless its Node is gone;
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |h| if h == "n2" {
                HolderNode::Gone
            } else {
                HolderNode::Idle
            })
            .as_deref(),
            Some("l-1")
        );
        // and a mark left by another holder (an earlier tenure) does not count.
        marked
            .metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(ANN_CYCLE_OF.into(), "n7".into());
        assert!(!cycle_started(&marked));
        leases.insert("l-1".into(), marked);
        assert_eq!(
            pick_slot(&slots, &leases, &seen, now, mono, |_| HolderNode::Idle).as_deref(),
            Some("l-1")
        );
        assert_eq!(held_slot(&slots, &leases, "n2").as_deref(), Some("l-1"));
        assert_eq!(held_slot(&slots, &leases, "n3"), None);
        assert_eq!(
            next_expiry(&slots, &leases, &seen, now, mono),
            Some(t("2026-11-24T10:00:30Z"))
        );
        let urgency = |first: &str, slot: &str| {
            if slot == first {
                Urgency::Soon
            } else {
                Urgency::Later
            }
        };
        // n1's slot is held: soon only for a waiter whose first choice it is; n2's has
        // expired: soon for every waiter.
        for waiter in ["n7", "n8", "n9"] {
            let first = preference_order(&slots, waiter)[0].clone();
            assert_eq!(
                holders(&slots, &leases, &seen, now, mono, waiter),
                vec![
                    ("n1".to_string(), urgency(&first, "l")),
                    ("n2".to_string(), Urgency::Soon)
                ]
            );
        }
    }

    #[test]
    fn dozing_needs_a_long_queue_and_spreads_the_looks() {
        assert_eq!(doze_period(0, 0.5), None);
        assert_eq!(doze_period(DOZE_MIN_QUEUE - 1, 0.5), None);
        let s = std::time::Duration::from_secs;
        assert_eq!(doze_period(DOZE_MIN_QUEUE, 0.5), Some(s(60)));
        assert_eq!(doze_period(1000, 0.5), Some(s(100)));
        assert_eq!(doze_period(1000, 0.0), Some(s(50)));
        assert_eq!(doze_period(1_000_000, 0.5), Some(s(1800)));
        // The queue as a whole looks at least once a second, at most ten times.
        for queue in [100, 1000, 5000] {
            let per_second = queue as f64 / doze_period(queue, 0.5).unwrap().as_secs_f64();
            assert!(
                (1.0..=10.0).contains(&per_second),
                "{queue}: {per_second} looks/s"
            );
        }
    }

    #[test]
    fn a_page_of_waiters_counts_the_others_and_one_more_if_more_are_left() {
        let page = ["a", "me", "b"];
        assert_eq!(waiters_at_least(page.into_iter(), false, "me"), 2);
        assert_eq!(waiters_at_least(page.into_iter(), true, "me"), 3);
        assert_eq!(waiters_at_least(page.into_iter(), false, "z"), 3);
        assert_eq!(waiters_at_least(std::iter::empty(), false, "me"), 0);
    }

    #[test]
    fn a_hand_off_names_its_waiter_and_the_queue() {
        let l = handed_off(&lease("l", Some("n1"), "2026-11-24T09:59:00Z", 60), "n2", 120);
        assert_eq!(l.metadata.labels.as_ref().unwrap()[LABEL_HANDED_TO], "n2");
        let mut leases = BTreeMap::from([("l".to_string(), l)]);
        leases.insert("l-1".into(), lease("l-1", Some("n3"), "2026-11-24T09:59:00Z", 60));
        let slots = slot_names("l", 2);
        assert_eq!(queue_length(&slots, &leases), 120);
        assert_eq!(queue_length(&slots[1..], &leases), 0);
        // A name too long for a label value is not written (the hand-off still is).
        let long = "n".repeat(64);
        let l = handed_off(&leases["l"], &long, 3);
        assert!(!l.metadata.labels.as_ref().unwrap().contains_key(LABEL_HANDED_TO));
        for (name, ok) in [
            ("node-1", true),
            ("a.b_c", true),
            ("-a", false),
            ("a-", false),
            ("", false),
        ] {
            assert_eq!(fits_label(name), ok, "{name}");
        }
    }

    /// At a hand-over only the waiters whose first choice is the slot look soon at the new
    /// holder, and nobody looks before it claimed the slot: with 5,000 waiters and 100 slots,
    /// about 50 look soon instead of 5,000.
    #[test]
    fn few_waiters_look_soon_at_a_new_holder() {
        let now = t("2026-11-24T10:00:00Z");
        let mono = Instant::now();
        let seen = Seen::new();
        let slots: Vec<String> = (0..100).map(|i| format!("l-{i}")).collect();
        let mut leases = BTreeMap::new();
        for (i, slot) in slots.iter().enumerate() {
            leases.insert(
                slot.clone(),
                lease(slot, Some(&format!("h{i}")), "2026-11-24T09:59:50Z", 1800),
            );
        }
        let soon_for_l0 = (0..5000)
            .filter(|w| {
                holders(&slots, &leases, &seen, now, mono, &format!("w{w}"))
                    .iter()
                    .any(|(h, u)| h == "h0" && *u == Urgency::Soon)
            })
            .count();
        assert!(
            (1..=150).contains(&soon_for_l0),
            "{soon_for_l0} of 5,000 waiters look soon at one new holder"
        );
        // Handed over and not claimed yet: nobody looks; the hand-off's short Lease frees it.
        leases.insert(
            "l-0".into(),
            lease("l-0", Some("h0"), "2026-11-24T09:59:58Z", HANDOFF_SECONDS),
        );
        for w in 0..100 {
            let listed = holders(&slots, &leases, &seen, now, mono, &format!("w{w}"));
            assert!(
                !listed.iter().any(|(h, _)| h == "h0"),
                "the handed-over slot is listed"
            );
            assert_eq!(listed.len(), 99);
        }
        // Expired (seen 120 s ago, a 60-s Lease): every waiter looks soon.
        leases.insert("l-0".into(), lease("l-0", Some("h0"), "2026-11-24T09:58:00Z", 60));
        let seen: Seen = [("l-0".to_string(), mono)].into();
        let later = mono + std::time::Duration::from_secs(120);
        for w in 0..100 {
            assert!(
                holders(&slots, &leases, &seen, now, later, &format!("w{w}"))
                    .contains(&("h0".to_string(), Urgency::Soon))
            );
        }
    }
}
