//! Reboot policy: the `config.yaml` schema of ConfigMap `kreboot-config`, its validation
//! ([`parse`](Policy::parse), in `parse.rs`), which rule applies to a node, and the window
//! arithmetic (is a reboot allowed at instant `now`, and when does that answer next change).
//! It owns no I/O: every function here is a plain function of the policy, a node's labels and
//! an instant.
//!
//! Semantics:
//! - A node takes the first rule (`rules[i]`) whose `nodeSelector` selects it; a node that no
//!   rule selects takes the top-level windows. A rule without `timezone` uses the top-level
//!   one. Top-level blackouts apply to every node (a freeze is a freeze); a rule's own
//!   blackouts add to them. Top-level `windows`, `monthly` and `cron` apply only to nodes that
//!   no rule selects.
//! - A reboot is allowed when `now` is inside any window of the node's schedule (weekly,
//!   monthly or cron) and on no blackout date. A schedule with no windows at all is open at
//!   any time, except in blackouts.
//! - A weekly window is `[start, end)` in the schedule's time zone, on each listed day; when
//!   `end <= start` it crosses midnight and ends on the next day (it belongs to the day it
//!   starts on). `end: "24:00"` means midnight at the end of the day. With `everyWeeks: N` and
//!   `startDate`, it applies only in the weeks (Monday to Sunday) k*N after the week of
//!   `startDate`, k = 0, 1, …; `startDate` alone means "from that week on".
//! - Monthly, relative-monthly and cron windows open at a local wall-clock time and last
//!   `duration` of real (elapsed) time. `dayOfMonth` past the end of a month means the month's
//!   last day (31 → 28 or 29 February, 30 April): every month gets its window. `week: last`
//!   is the last such weekday of the month. A cron expression is evaluated minute by minute on
//!   the local wall clock of the schedule's zone; overlapping occurrences merge.
//! - Daylight-saving time: a start or end time that does not exist on a spring-forward day
//!   (02:30 in Europe/Berlin on the last Sunday of March) is moved to the first instant after
//!   the gap (03:00); a time that occurs twice on a fall-back day means its first occurrence.
//!   So a 02:00–03:00 weekly window on the fall-back day lasts two real hours (it spans the
//!   repeated hour), and a cron `30 2 * * *` fires once on both days.
//! - Blackout dates are inclusive, in the time zone of the node's schedule, and win over every
//!   window.
//! - A rule's `concurrency` is a number of nodes or a percentage (`"25%"`) of the nodes that
//!   share its slots (its pool: [`Policy::same_pool`]); [`slots`] turns it into a slot count
//!   for a pool of a given size. Counting the pool is the agent's business (it lists Nodes).
//! - A rule's `lockGroup.maxConcurrent` is likewise a number or a percentage, of the nodes the
//!   rule selects over all its groups ([`Policy::rule_pool_size`]), rounded down, at least 1.
//! - A rule's `soak` (1s..7d) is the least time between a release of one of its slots and the
//!   next start (cordon) of a node of the same slot set; the agent reads the release times from
//!   the Leases (`kreboot.io/released-at`).
//! - A rule's `healthGate: {timeout}` keeps a rebooted node's slot until the node is Ready and
//!   its DaemonSet pods are Ready; past the timeout the cycle fails and the slot is kept. With
//!   `query` (PromQL), the slot is also kept while the query returns any series. With
//!   `disruptionBudgets` (on by default with a gate) it is also kept until every
//!   PodDisruptionBudget that selected a pod the drain evicted is as healthy as before the drain.
//! - Unknown keys are rejected: a typo must not silently widen a window.

mod parse;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, fmt};

use chrono::{
    DateTime, Datelike, Days, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone, Utc,
    Weekday,
};
use chrono_tz::Tz;

/// Intervals of windows by the local date they start on.
type IntervalCache = BTreeMap<NaiveDate, Vec<(DateTime<Utc>, DateTime<Utc>)>>;

/// Labels of a Node, as used for per-pool policy rules.
pub type Labels = BTreeMap<String, String>;

/// How far ahead [`Policy::next_transition`] looks.
pub const HORIZON_DAYS: u64 = 400;

/// The time zone a schedule is written in: an IANA zone, or a fixed offset from UTC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Zone {
    /// An IANA zone such as `Europe/Berlin`, with its daylight-saving rules.
    Named(Tz),
    /// A fixed offset such as `+05:30`: no daylight-saving time.
    Fixed(FixedOffset),
}

impl Default for Zone {
    fn default() -> Zone {
        Zone::Named(Tz::UTC)
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Zone::Named(tz) => write!(f, "{}", tz.name()),
            Zone::Fixed(off) => write!(f, "UTC{off}"),
        }
    }
}

impl Zone {
    /// The instant of local date-time `naive`: the first occurrence of a repeated time, the
    /// first instant after a gap for a time that does not exist. None only past chrono's range.
    pub fn resolve(self, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self {
            Zone::Fixed(off) => off
                .from_local_datetime(&naive)
                .earliest()
                .map(|t| t.with_timezone(&Utc)),
            Zone::Named(tz) => {
                let mut probe = naive;
                // DST gaps are at most a few hours; step minute by minute to the first valid
                // local time.
                for _ in 0..(6 * 60) {
                    if let Some(t) = tz.from_local_datetime(&probe).earliest() {
                        return Some(t.with_timezone(&Utc));
                    }
                    probe = probe.checked_add_signed(chrono::Duration::minutes(1))?;
                }
                None
            }
        }
    }

    /// The local wall-clock date and time of instant `t`; None at the very ends of chrono's
    /// range, where the local time is not representable (chrono's own conversion would panic).
    pub fn local(self, t: DateTime<Utc>) -> Option<NaiveDateTime> {
        let offset = match self {
            Zone::Named(tz) => tz.offset_from_utc_datetime(&t.naive_utc()).fix(),
            Zone::Fixed(off) => off,
        };
        t.naive_utc().checked_add_offset(offset)
    }

    /// `t` formatted with a chrono format string in this zone (`%Z`: the zone's abbreviation);
    /// in UTC where the local time is not representable.
    pub fn format(self, t: DateTime<Utc>, fmt: &str) -> String {
        if self.local(t).is_none() {
            return t.format(fmt).to_string();
        }
        match self {
            Zone::Named(tz) => t.with_timezone(&tz).format(fmt).to_string(),
            Zone::Fixed(off) => t.with_timezone(&off).format(fmt).to_string(),
        }
    }
}

/// A validated reboot policy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// The schedule of nodes that no rule selects.
    default: Schedule,
    rules: Vec<Rule>,
}

/// Everything that decides when one node may reboot.
#[derive(Debug, Clone, PartialEq, Default)]
struct Schedule {
    zone: Zone,
    windows: Vec<Window>,
    /// Inclusive local date ranges.
    blackouts: Vec<(NaiveDate, NaiveDate)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Window {
    Weekly(Weekly),
    /// Opens at `start` on the days `on` names and lasts `duration`.
    Monthly {
        on: MonthDay,
        start: NaiveTime,
        duration: chrono::Duration,
    },
    /// Opens at each minute the expression matches and lasts `duration`.
    Cron {
        cron: Box<croner::Cron>,
        duration: chrono::Duration,
    },
}

/// A weekly window.
#[derive(Debug, Clone, PartialEq)]
struct Weekly {
    days: Vec<Weekday>,
    start: NaiveTime,
    /// None: midnight at the end of the day ("24:00").
    end: Option<NaiveTime>,
    /// Some: only every `weeks` weeks counted from the Monday `from`, not before it.
    every: Option<Every>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Every {
    weeks: u32,
    /// The Monday of the week of `startDate`.
    from: NaiveDate,
}

/// Which day of a month a monthly window is on.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MonthDay {
    /// Day 1..=31; past the month's end, its last day.
    Day(u32),
    /// The `n`th (1..=4) weekday of the month, or the last one (None).
    Nth(Option<u32>, Weekday),
}

/// One `rules[i]` entry.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    name: String,
    selector: Selector,
    schedule: Schedule,
    concurrency: Option<Budget>,
    lock_group: Option<LockGroup>,
    /// The pause between a release of one of the rule's slots and the next start.
    soak: Option<chrono::Duration>,
    /// `healthGate.timeout`: how long a rebooted node may take to become healthy.
    health_gate: Option<chrono::Duration>,
    /// `healthGate.query`: PromQL that must return no series before the slot goes on.
    health_query: Option<String>,
    /// `healthGate.disruptionBudgets` (default true with a gate): the slot is also kept until
    /// every PodDisruptionBudget the drain touched is as healthy as before the drain.
    health_budgets: bool,
}

/// A rule's `concurrency`: how many nodes sharing its slots may be out at once, as a number, or
/// as a share of the nodes that share them (the rule's nodes; with a lock group, the group's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// `concurrency: 2`: that many nodes, whatever the pool's size.
    Nodes(u32),
    /// `concurrency: "25%"` (1..=100): that share of the pool, rounded down, at least 1.
    Percent(u32),
}

impl Budget {
    /// Whether the number of slots depends on the size of the pool (a percentage).
    pub fn needs_pool(self) -> bool {
        matches!(self, Budget::Percent(_))
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Nodes(n) => write!(f, "{n}"),
            Budget::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// How many lock slots `budget` gives a pool of `pool_size` nodes. A percentage is rounded down
/// (25% of 7 nodes is 1, never 2: the budget is a ceiling on disruption) but is at least 1, so
/// that a small pool still makes progress; a pool of unknown or zero size gets 1 slot as well.
pub fn slots(budget: Budget, pool_size: usize) -> u32 {
    match budget {
        Budget::Nodes(n) => n.max(1),
        Budget::Percent(p) => {
            let share = (pool_size as u128 * u128::from(p)) / 100;
            u32::try_from(share).unwrap_or(u32::MAX).max(1)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct LockGroup {
    by_label: String,
    max_concurrent: Option<Budget>,
}

/// A Kubernetes label selector (`matchLabels` and `matchExpressions`); empty selects all.
#[derive(Debug, Clone, PartialEq, Default)]
struct Selector {
    match_labels: BTreeMap<String, String>,
    match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Operator,
    values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// Whether `s` can be written into a label-selector query as is: the characters of label keys
/// and values. Anything else (a policy may name any text) makes [`Selector::query`] give up
/// rather than build a query the API server would misread or refuse.
fn query_safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

impl Selector {
    /// The selector as a `labelSelector` query (`k=v,k in (a,b),!k`), for the API server to
    /// narrow a list with; None when a key or value cannot be written safely (then the caller
    /// lists without a selector and filters with [`Selector::matches`]). Empty selects all.
    fn query(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (k, v) in &self.match_labels {
            if !query_safe(k) || !(v.is_empty() || query_safe(v)) {
                return None;
            }
            parts.push(format!("{k}={v}"));
        }
        for r in &self.match_expressions {
            if !query_safe(&r.key) || !r.values.iter().all(|v| query_safe(v)) {
                return None;
            }
            parts.push(match r.op {
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            });
        }
        Some(parts.join(","))
    }

    fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.op {
                    Operator::In => value.is_some_and(|v| r.values.contains(v)),
                    Operator::NotIn => value.is_none_or(|v| !r.values.contains(v)),
                    Operator::Exists => value.is_some(),
                    Operator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// Which rule applies to a node, and what it says about the lock. For the lock side: a node
/// with `concurrency: Some(n)` competes for `n` slots shared by the nodes of the same rule (of
/// the same lock group, when there is one) instead of the agent's `--concurrency`; with a lock
/// group, at most `max_concurrent` nodes of the rule are out at once across all its groups.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleView {
    /// The rule's `name`; None for a node that no rule selects (the top-level windows).
    pub name: Option<String>,
    /// The rule's position in `rules`.
    pub index: Option<usize>,
    /// The time zone of the node's schedule.
    pub zone: Zone,
    /// How many nodes of the rule (of its lock group) may reboot at once; None: the agent's
    /// `--concurrency`. A percentage needs the pool's size: see [`Policy::pool_selector`] and
    /// [`Policy::same_pool`].
    pub concurrency: Option<Budget>,
    /// The rule's lock group, if it has one.
    pub lock_group: Option<LockGroupView>,
    /// The rule's `soak`: after a node of its slot set releases its slot, the next one starts
    /// no sooner than this.
    pub soak: Option<chrono::Duration>,
    /// The rule's `healthGate` timeout: after its reboot a node keeps its slot until it is
    /// Ready and its DaemonSet pods are Ready; past this, the cycle fails and the slot is kept.
    pub health_gate: Option<chrono::Duration>,
    /// The rule's `healthGate.query`: after the checks above pass, the node keeps its slot while
    /// this PromQL returns any series (evaluated against the agent's `--prometheus-url`).
    pub health_query: Option<String>,
    /// The rule's `healthGate.disruptionBudgets`: the node also keeps its slot until every
    /// PodDisruptionBudget that selected a pod its drain evicted is as healthy as before the
    /// drain (and at least `desiredHealthy`). False without a gate.
    pub health_budgets: bool,
}

/// A rule's `lockGroup` as seen by one node.
#[derive(Debug, Clone, PartialEq)]
pub struct LockGroupView {
    /// The label whose value names the group (e.g. `agentpool`).
    pub label: String,
    /// The node's value of that label; None: the node lacks it (all such nodes form one group).
    pub value: Option<String>,
    /// At most this many nodes of the rule, over all its groups, at once: a number, or a share
    /// of the rule's nodes (all its groups: [`Policy::rule_pool_selector`],
    /// [`Policy::rule_pool_size`]).
    pub max_concurrent: Option<Budget>,
}

pub use parse::PolicyError;

/// Whether `d` is the `n`th (1-based) `weekday` of its month; `n` None: the last one.
fn is_nth_weekday(d: NaiveDate, n: Option<u32>, weekday: Weekday) -> bool {
    if d.weekday() != weekday {
        return false;
    }
    match n {
        Some(n) => (d.day() - 1) / 7 + 1 == n,
        None => d
            .checked_add_days(Days::new(7))
            .is_none_or(|next| next.month() != d.month()),
    }
}

fn days_in_month(d: NaiveDate) -> u32 {
    // The day before the first of the next month; December's next month is January.
    let (y, m) = if d.month() == 12 {
        (d.year().saturating_add(1), 1)
    } else {
        (d.year(), d.month() + 1)
    };
    NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|first| first.pred_opt())
        .map_or(31, |last| last.day())
}

impl MonthDay {
    fn matches(self, d: NaiveDate) -> bool {
        match self {
            MonthDay::Day(n) => d.day() == n.min(days_in_month(d)),
            MonthDay::Nth(n, weekday) => is_nth_weekday(d, n, weekday),
        }
    }
}

impl Weekly {
    fn applies_on(&self, d: NaiveDate) -> bool {
        if !self.days.contains(&d.weekday()) {
            return false;
        }
        let Some(every) = self.every else {
            return true;
        };
        let Some(monday) = d.checked_sub_days(Days::new(u64::from(d.weekday().num_days_from_monday())))
        else {
            return false;
        };
        let weeks = (monday - every.from).num_days().div_euclid(7);
        weeks >= 0 && weeks % i64::from(every.weeks) == 0
    }
}

impl Window {
    /// How many days before `d` a window that covers part of `d` may have started.
    fn lookback_days(&self) -> u64 {
        match self {
            Window::Weekly(_) => 1,
            // Plus one for the start-of-day offset, plus one for a DST shift.
            Window::Monthly { duration, .. } | Window::Cron { duration, .. } => {
                u64::try_from(duration.num_days()).unwrap_or(0) + 2
            }
        }
    }

    /// Appends the intervals of this window that start on local date `d`.
    fn intervals_on(&self, zone: Zone, d: NaiveDate, out: &mut Vec<(DateTime<Utc>, DateTime<Utc>)>) {
        match self {
            Window::Weekly(w) => {
                if !w.applies_on(d) {
                    return;
                }
                let end_date = match w.end {
                    Some(e) if e > w.start => Some((d, e)),
                    Some(e) => d.checked_add_days(Days::new(1)).map(|n| (n, e)),
                    None => d.checked_add_days(Days::new(1)).map(|n| (n, NaiveTime::MIN)),
                };
                let (Some(start), Some((ed, et))) = (zone.resolve(d.and_time(w.start)), end_date) else {
                    return;
                };
                if let Some(end) = zone.resolve(ed.and_time(et))
                    && end > start
                {
                    out.push((start, end));
                }
            }
            Window::Monthly { on, start, duration } => {
                if !on.matches(d) {
                    return;
                }
                if let Some(s) = zone.resolve(d.and_time(*start))
                    && let Some(e) = s.checked_add_signed(*duration)
                {
                    out.push((s, e));
                }
            }
            Window::Cron { cron, duration } => cron_intervals_on(cron, *duration, zone, d, out),
        }
    }
}

/// The intervals of a cron window starting on local date `d`, overlapping ones merged (so
/// `* * * * *` is one interval a day, not 1440).
fn cron_intervals_on(
    cron: &croner::Cron,
    duration: chrono::Duration,
    zone: Zone,
    d: NaiveDate,
    out: &mut Vec<(DateTime<Utc>, DateTime<Utc>)>,
) {
    let p = &cron.pattern;
    // croner answers the field questions; the wall clock → instant mapping is ours, so that
    // cron follows the same DST rules as every other window. Its errors only come from
    // out-of-range arguments, which these are not: treat them as "no match".
    let day = p.month_match(d.month()).unwrap_or(false)
        && p.day_match(
            d.year(),
            d.month(),
            d.day(),
            croner::Weekday::from_days_from_sunday(d.weekday().num_days_from_sunday()),
        )
        .unwrap_or(false);
    if !day {
        return;
    }
    let mut current: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    for h in (0..24).filter(|h| p.hour_match(*h).unwrap_or(false)) {
        for m in (0..60).filter(|m| p.minute_match(*m).unwrap_or(false)) {
            let Some(time) = NaiveTime::from_hms_opt(h, m, 0) else {
                continue;
            };
            let Some(s) = zone.resolve(d.and_time(time)) else {
                continue;
            };
            let Some(e) = s.checked_add_signed(duration) else {
                continue;
            };
            current = match current {
                Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
                Some(prev) => {
                    out.push(prev);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
    }
    out.extend(current);
}

impl Schedule {
    fn local_date(&self, t: DateTime<Utc>) -> Option<NaiveDate> {
        self.zone.local(t).map(|l| l.date())
    }

    fn lookback_days(&self) -> u64 {
        self.windows.iter().map(Window::lookback_days).max().unwrap_or(1)
    }

    /// Also true where the local date is not representable: closed, the cautious answer.
    fn in_blackout(&self, t: DateTime<Utc>) -> bool {
        let Some(d) = self.local_date(t) else {
            return true;
        };
        self.blackouts.iter().any(|(from, to)| *from <= d && d <= *to)
    }

    /// The intervals of the windows starting on local date `d`.
    fn intervals_on(&self, d: NaiveDate) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        for w in &self.windows {
            w.intervals_on(self.zone, d, &mut out);
        }
        out
    }

    /// `cache` keeps the intervals of each local date already computed: a search asks about
    /// the same few days over and over, and a busy cron expression costs 1440 matches a day.
    fn in_window(&self, t: DateTime<Utc>, cache: &mut IntervalCache) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let Some(d) = self.local_date(t) else {
            return false;
        };
        (0..=self.lookback_days())
            .filter_map(|back| d.checked_sub_days(Days::new(back)))
            .any(|d| {
                cache
                    .entry(d)
                    .or_insert_with(|| self.intervals_on(d))
                    .iter()
                    .any(|(s, e)| *s <= t && t < *e)
            })
    }

    fn is_open(&self, t: DateTime<Utc>) -> bool {
        self.is_open_with(t, &mut IntervalCache::new())
    }

    fn is_open_with(&self, t: DateTime<Utc>, cache: &mut IntervalCache) -> bool {
        !self.in_blackout(t) && self.in_window(t, cache)
    }

    /// The instants at which `is_open` may change, for windows and blackouts of local date `d`.
    fn boundaries_on(&self, d: NaiveDate, cache: &mut IntervalCache) -> Vec<DateTime<Utc>> {
        let mut out: Vec<DateTime<Utc>> = cache
            .entry(d)
            .or_insert_with(|| self.intervals_on(d))
            .iter()
            .flat_map(|(s, e)| [*s, *e])
            .collect();
        for (from, to) in &self.blackouts {
            if *from == d {
                out.extend(self.zone.resolve(d.and_time(NaiveTime::MIN)));
            }
            if let Some(after) = to.checked_add_days(Days::new(1))
                && after == d
            {
                out.extend(self.zone.resolve(d.and_time(NaiveTime::MIN)));
            }
        }
        out
    }

    fn next_transition(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut cache = IntervalCache::new();
        let open = self.is_open_with(now, &mut cache);
        // Windows that started up to `lookback` days ago may still end after `now`.
        let first = self
            .local_date(now)?
            .checked_sub_days(Days::new(self.lookback_days()))?;
        let mut candidates: Vec<DateTime<Utc>> = Vec::new();
        for offset in 0..(HORIZON_DAYS + self.lookback_days()) {
            let d = first.checked_add_days(Days::new(offset))?;
            candidates.extend(self.boundaries_on(d, &mut cache).into_iter().filter(|t| *t > now));
            // Boundaries of later days are no earlier than the start of the next day, but an
            // end may lie days later: decide only on candidates up to that start, in order.
            candidates.sort_unstable();
            candidates.dedup();
            let horizon = self
                .zone
                .resolve(d.checked_add_days(Days::new(1))?.and_time(NaiveTime::MIN))?;
            let decided = candidates.partition_point(|t| *t <= horizon);
            for t in candidates.drain(..decided) {
                if self.is_open_with(t, &mut cache) != open {
                    return Some(t);
                }
            }
        }
        None
    }

    fn upcoming_windows(&self, now: DateTime<Utc>, n: usize) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        let mut t = now;
        let Some(horizon) = now.checked_add_signed(chrono::Duration::days(HORIZON_DAYS as i64)) else {
            return out;
        };
        while out.len() < n && t < horizon {
            if self.is_open(t) {
                let end = self.next_transition(t).unwrap_or(horizon);
                out.push((t, end));
                t = end;
            } else {
                match self.next_transition(t) {
                    Some(start) => t = start,
                    None => break,
                }
            }
        }
        out
    }
}

/// The policy document of the ConfigMap `cm` (named `namespace/name` in errors): see
/// [`document_in`].
pub fn document_of<'a>(name: &str, cm: &'a k8s_openapi::api::core::v1::ConfigMap) -> Result<&'a str, String> {
    let binary: Vec<&str> = cm
        .binary_data
        .iter()
        .flat_map(|d| d.keys())
        .map(String::as_str)
        .collect();
    document_in(name, cm.data.as_ref(), &binary)
}

/// The key of the policy ConfigMap that holds the policy document.
pub const CONFIG_KEY: &str = "config.yaml";

/// Longest list of other keys quoted in [`document_in`]'s error.
const MAX_KEYS_LISTED: usize = 10;

/// The policy document of ConfigMap `name` (`namespace/name`), given its `data` and the keys of
/// its `binaryData`: the text under [`CONFIG_KEY`], or an error that names the expected key and
/// the keys found (`config.yml`, `policy.yaml` are the usual slips), so the operator sees at
/// once what to rename. The caller treats the error like an invalid policy: the last good
/// policy stays in force (none yet: no reboots), with an Event and `kreboot_config_valid 0`.
pub fn document_in<'a>(
    name: &str,
    data: Option<&'a std::collections::BTreeMap<String, String>>,
    binary_keys: &[&str],
) -> Result<&'a str, String> {
    if let Some(doc) = data.and_then(|d| d.get(CONFIG_KEY)) {
        return Ok(doc);
    }
    let mut found: Vec<String> = data
        .into_iter()
        .flat_map(|d| d.keys())
        .map(|k| format!("{:?}", parse::bounded_key(k)))
        .collect();
    found.extend(
        binary_keys
            .iter()
            .map(|k| format!("{:?} (binaryData)", parse::bounded_key(k))),
    );
    let listed = if found.is_empty() {
        "it has no keys".to_owned()
    } else {
        let more = found.len().saturating_sub(MAX_KEYS_LISTED);
        found.truncate(MAX_KEYS_LISTED);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        format!("keys found: {}{tail}", found.join(", "))
    };
    Err(format!(
        "ConfigMap {name} has no key {CONFIG_KEY:?} ({listed}); the policy must be under {CONFIG_KEY:?}"
    ))
}

impl Policy {
    /// Parses and validates a `config.yaml` document.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key path and the problem.
    pub fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        parse::parse(yaml)
    }

    /// The first rule that selects `labels`, if any.
    fn rule(&self, labels: &Labels) -> Option<(usize, &Rule)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.selector.matches(labels))
    }

    fn schedule_for(&self, labels: &Labels) -> &Schedule {
        self.rule(labels).map_or(&self.default, |(_, r)| &r.schedule)
    }

    /// Which rule applies to a node with `labels`, with its lock settings.
    pub fn rule_for(&self, labels: &Labels) -> RuleView {
        match self.rule(labels) {
            None => RuleView {
                name: None,
                index: None,
                zone: self.default.zone,
                concurrency: None,
                lock_group: None,
                soak: None,
                health_gate: None,
                health_query: None,
                health_budgets: false,
            },
            Some((i, r)) => RuleView {
                name: Some(r.name.clone()),
                index: Some(i),
                zone: r.schedule.zone,
                concurrency: r.concurrency,
                lock_group: r.lock_group.as_ref().map(|g| LockGroupView {
                    label: g.by_label.clone(),
                    value: labels.get(&g.by_label).cloned(),
                    max_concurrent: g.max_concurrent,
                }),
                soak: r.soak,
                health_gate: r.health_gate,
                health_query: r.health_query.clone(),
                health_budgets: r.health_gate.is_some() && r.health_budgets,
            },
        }
    }

    /// A label selector that every node of the pool of a node with `labels` matches (the nodes
    /// that share its lock slots: its rule's, and with a lock group, its group's), to narrow the
    /// Node list the pool is counted from. A superset: nodes an earlier rule takes match it too,
    /// [`Policy::same_pool`] filters them out. Empty: list every Node.
    pub fn pool_selector(&self, labels: &Labels) -> String {
        let Some((_, rule)) = self.rule(labels) else {
            return String::new();
        };
        let Some(mut query) = rule.selector.query() else {
            return String::new();
        };
        if let Some(g) = &rule.lock_group
            && query_safe(&g.by_label)
        {
            let group = match labels.get(&g.by_label) {
                Some(v) if query_safe(v) => format!("{}={v}", g.by_label),
                Some(_) => return query,
                // Nodes without the label form one group.
                None => format!("!{}", g.by_label),
            };
            if !query.is_empty() {
                query.push(',');
            }
            query.push_str(&group);
        }
        query
    }

    /// Whether nodes with labels `a` and `b` share lock slots under this policy: the same rule
    /// and, with a lock group, the same group (the same value of its label, or both without it).
    pub fn same_pool(&self, a: &Labels, b: &Labels) -> bool {
        match (self.rule(a), self.rule(b)) {
            (None, None) => true,
            (Some((i, r)), Some((j, _))) if i == j => match &r.lock_group {
                None => true,
                Some(g) => a.get(&g.by_label) == b.get(&g.by_label),
            },
            _ => false,
        }
    }

    /// A label selector that every node of the rule of a node with `labels` matches, whatever
    /// its lock group: the pool a percentage `lockGroup.maxConcurrent` is a share of. A
    /// superset, as [`Policy::pool_selector`]; empty: list every Node.
    pub fn rule_pool_selector(&self, labels: &Labels) -> String {
        self.rule(labels)
            .and_then(|(_, r)| r.selector.query())
            .unwrap_or_default()
    }

    /// How many of `nodes` (their labels) the rule of a node labelled `me` selects (the first
    /// rule that selects them is `me`'s), over all its lock groups. 0 for a node no rule selects.
    pub fn rule_pool_size<'a>(&self, me: &Labels, nodes: impl IntoIterator<Item = &'a Labels>) -> usize {
        let Some((i, _)) = self.rule(me) else {
            return 0;
        };
        nodes
            .into_iter()
            .filter(|n| self.rule(n).is_some_and(|(j, _)| j == i))
            .count()
    }

    /// How many of `nodes` (their labels) share lock slots with a node labelled `me`: the pool
    /// a percentage `concurrency` is a share of.
    pub fn pool_size<'a>(&self, me: &Labels, nodes: impl IntoIterator<Item = &'a Labels>) -> usize {
        nodes.into_iter().filter(|n| self.same_pool(me, n)).count()
    }

    /// The key paths of the rules' `healthGate.query` (`rules[2].healthGate.query`): each needs
    /// a Prometheus to ask. An agent without `--prometheus-url` rejects a policy that has one,
    /// rather than hold every rebooted node in its gate until the timeout.
    pub fn gate_queries(&self) -> Vec<String> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.health_query.is_some())
            .map(|(i, _)| format!("rules[{i}].healthGate.query"))
            .collect()
    }

    /// The time zone of the top-level schedule (the nodes that no rule selects).
    pub fn zone(&self) -> Zone {
        self.default.zone
    }

    /// Whether the top-level schedule (the nodes that no rule selects) allows a reboot at `now`.
    pub fn top_level_is_open(&self, now: DateTime<Utc>) -> bool {
        self.default.is_open(now)
    }

    /// How many `rules` the policy has.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Whether a node with `labels` may reboot at `now`.
    pub fn is_open(&self, labels: &Labels, now: DateTime<Utc>) -> bool {
        self.schedule_for(labels).is_open(now)
    }

    /// The next instant after `now` at which `is_open` changes, if any within about a year.
    pub fn next_transition(&self, labels: &Labels, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.schedule_for(labels).next_transition(now)
    }

    /// The next `n` open intervals `[start, end)` for a node with `labels`, from `now` on. An
    /// interval open at `now` is reported from `now`. An interval that never closes within the
    /// horizon ([`HORIZON_DAYS`]) ends at the horizon.
    pub fn upcoming_windows(
        &self,
        labels: &Labels,
        now: DateTime<Utc>,
        n: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        self.schedule_for(labels).upcoming_windows(now, n)
    }
}
