//! `config.yaml` → [`Policy`]: the raw serde shapes and their validation. Leaf values are read
//! as [`Scalar`] text and checked here rather than by serde, so that a wrong type is reported
//! with its key path (`rules[1].monthly[0].dayOfMonth`) like any other bad value.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike as _, Days, FixedOffset, NaiveDate, NaiveTime, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Deserializer};

use super::{
    Budget, Every, LockGroup, MonthDay, Operator, Policy, Requirement, Rule, Schedule, Selector, Weekly,
    Window, Zone,
};

/// The longest `duration` a monthly or cron window may have. Bounded so that a lookup needs to
/// look back only a few days for windows still open.
const MAX_DURATION_DAYS: i64 = 7;
/// Upper bound of `concurrency` and `maxConcurrent` (the same as `--concurrency`).
const MAX_CONCURRENCY: u32 = 10_000;

/// Why a `config.yaml` was rejected.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy at {path}: {message}")]
pub struct PolicyError {
    /// Key path of the offending value, e.g. `windows[0].start`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

/// Longest message or key path kept in a [`PolicyError`]: the messages quote the bad value,
/// and a pasted 100 kB value must not become a 100 kB log line, Event or metric label.
const MAX_ERROR_TEXT: usize = 300;

fn bounded(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let total = text.len();
        let mut cut = MAX_ERROR_TEXT;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(&format!("… ({total} bytes in all)"));
    }
    text
}

/// A key as quoted in an error: at most 100 bytes.
pub(super) fn bounded_key(key: &str) -> String {
    let mut cut = key.len().min(100);
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < key.len() {
        format!("{}…", &key[..cut])
    } else {
        key.to_owned()
    }
}

fn err(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: bounded(path.into()),
        message: bounded(message.into()),
    }
}

/// Any YAML scalar, kept as its text (`5`, `"5"`, `true` → "5", "5", "true").
#[derive(Debug, Clone)]
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a single value (string or number)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Scalar, E> {
                Ok(Scalar(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i128<E: serde::de::Error>(self, v: i128) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u128<E: serde::de::Error>(self, v: u128) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Option<Scalar>,
    timezone: Option<Scalar>,
    windows: Option<Vec<RawWindow>>,
    monthly: Option<Vec<RawMonthly>>,
    cron: Option<Vec<RawCron>>,
    blackouts: Option<Vec<RawBlackout>>,
    rules: Option<Vec<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    name: Option<Scalar>,
    node_selector: Option<RawSelector>,
    timezone: Option<Scalar>,
    windows: Option<Vec<RawWindow>>,
    monthly: Option<Vec<RawMonthly>>,
    cron: Option<Vec<RawCron>>,
    blackouts: Option<Vec<RawBlackout>>,
    concurrency: Option<Scalar>,
    lock_group: Option<RawLockGroup>,
    soak: Option<Scalar>,
    health_gate: Option<RawHealthGate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHealthGate {
    timeout: Option<Scalar>,
    query: Option<Scalar>,
    disruption_budgets: Option<Scalar>,
}

/// The longest `healthGate.query` accepted: a gate expression is a condition, not a program,
/// and the query travels in a URL.
const MAX_QUERY_LEN: usize = 4096;

/// A `healthGate.query`: PromQL text, not empty. Its syntax is Prometheus's to judge (a query
/// it refuses keeps the gate closed, with Prometheus's error as the reason).
fn gate_query(s: &str, path: &str) -> Result<String, PolicyError> {
    let q = s.trim();
    if q.is_empty() {
        return Err(err(path, "is empty (leave query out for no gate expression)"));
    }
    if q.len() > MAX_QUERY_LEN {
        return Err(err(path, format!("is longer than {MAX_QUERY_LEN} characters")));
    }
    Ok(q.to_owned())
}

/// `healthGate.timeout` when not given: long enough for DaemonSet pods to pull their images
/// and start after a boot.
const DEFAULT_HEALTH_GATE_TIMEOUT_MINUTES: i64 = 10;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSelector {
    match_labels: Option<BTreeMap<String, Scalar>>,
    match_expressions: Option<Vec<RawRequirement>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirement {
    key: Option<Scalar>,
    operator: Option<Scalar>,
    values: Option<Vec<Scalar>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLockGroup {
    by_label: Option<Scalar>,
    max_concurrent: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWindow {
    days: Option<Vec<Scalar>>,
    start: Option<Scalar>,
    end: Option<Scalar>,
    every_weeks: Option<Scalar>,
    start_date: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawMonthly {
    day_of_month: Option<Scalar>,
    week: Option<Scalar>,
    day: Option<Scalar>,
    start: Option<Scalar>,
    duration: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCron {
    schedule: Option<Scalar>,
    duration: Option<Scalar>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlackout {
    from: Option<Scalar>,
    to: Option<Scalar>,
    date: Option<Scalar>,
}

/// A required key: its text, or an error naming it.
fn required<'a>(v: &'a Option<Scalar>, path: &str) -> Result<&'a str, PolicyError> {
    v.as_ref()
        .map(|s| s.0.as_str())
        .ok_or_else(|| err(path, "is required"))
}

fn parse_day(s: &str) -> Option<Weekday> {
    Some(match s.trim().to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Mon,
        "tue" | "tuesday" => Weekday::Tue,
        "wed" | "wednesday" => Weekday::Wed,
        "thu" | "thursday" => Weekday::Thu,
        "fri" | "friday" => Weekday::Fri,
        "sat" | "saturday" => Weekday::Sat,
        "sun" | "sunday" => Weekday::Sun,
        _ => return None,
    })
}

fn day(s: &str, path: &str) -> Result<Weekday, PolicyError> {
    parse_day(s).ok_or_else(|| err(path, format!("{s:?} is not a day (mon..sun or monday..sunday)")))
}

/// Parses `HH:MM`; `allow_24` accepts `24:00` (returned as None).
fn parse_time(s: &str, path: &str, allow_24: bool) -> Result<Option<NaiveTime>, PolicyError> {
    let bad = || err(path, format!("{s:?} is not a time of day HH:MM (00:00 to 23:59)"));
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: u32 = h.parse().map_err(|_| bad())?;
    let m: u32 = m.parse().map_err(|_| bad())?;
    if allow_24 && h == 24 && m == 0 {
        return Ok(None);
    }
    NaiveTime::from_hms_opt(h, m, 0).map(Some).ok_or_else(bad)
}

fn start_time(v: &Option<Scalar>, path: &str) -> Result<NaiveTime, PolicyError> {
    parse_time(required(v, path)?, path, false)?.ok_or_else(|| err(path, "24:00 is not a start time"))
}

fn parse_date(s: &str, path: &str) -> Result<NaiveDate, PolicyError> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|e| err(path, format!("{s:?} is not a date YYYY-MM-DD: {e}")))
}

fn number(s: &str, path: &str, min: u32, max: u32) -> Result<u32, PolicyError> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| err(path, format!("{s:?} is not a whole number from {min} to {max}")))
}

/// A `concurrency`: a whole number of nodes, or a percentage `"25%"` of the pool (1% to 100%).
fn budget(s: &str, path: &str) -> Result<Budget, PolicyError> {
    let t = s.trim();
    match t.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .map(Budget::Percent)
            .ok_or_else(|| {
                err(
                    path,
                    format!("{s:?} is not a percentage from 1% to 100% (whole percent, e.g. \"25%\")"),
                )
            }),
        None => t
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_CONCURRENCY).contains(n))
            .map(Budget::Nodes)
            .ok_or_else(|| {
                err(
                    path,
                    format!(
                        "{s:?} is not a whole number from 1 to {MAX_CONCURRENCY} nor a percentage of the \
                         rule's nodes such as \"25%\""
                    ),
                )
            }),
    }
}

fn duration(v: &Option<Scalar>, path: &str) -> Result<chrono::Duration, PolicyError> {
    let s = required(v, path)?;
    let bad = |why: &str| err(path, format!("{s:?} {why}"));
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| bad(&format!("is not a duration ({e}; examples: 4h, 90m, 1h30m)")))?;
    let d = chrono::Duration::from_std(d).map_err(|_| bad("is too long"))?;
    if d < chrono::Duration::minutes(1) {
        return Err(bad("is shorter than a minute"));
    }
    if d > chrono::Duration::days(MAX_DURATION_DAYS) {
        return Err(bad(&format!("is longer than {MAX_DURATION_DAYS} days")));
    }
    Ok(d)
}

/// A rule's `soak` or `healthGate.timeout`: 1s to 7 days. Shorter than a window's minute, because a soak is a pause
/// between two nodes, not a schedule.
fn bounded_duration(s: &str, path: &str) -> Result<chrono::Duration, PolicyError> {
    let bad = |why: &str| err(path, format!("{s:?} {why}"));
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| bad(&format!("is not a duration ({e}; examples: 10m, 90s, 1h)")))?;
    let d = chrono::Duration::from_std(d).map_err(|_| bad("is too long"))?;
    if d < chrono::Duration::seconds(1) {
        return Err(bad("is shorter than a second (leave soak out for none)"));
    }
    if d > chrono::Duration::days(MAX_DURATION_DAYS) {
        return Err(bad(&format!("is longer than {MAX_DURATION_DAYS} days")));
    }
    Ok(d)
}

/// An IANA zone name, or a fixed offset `±HH:MM`, `±HH`, optionally after `UTC` or `GMT`.
fn parse_zone(s: &str, path: &str) -> Result<Zone, PolicyError> {
    let s = s.trim();
    if let Ok(tz) = s.parse::<Tz>() {
        return Ok(Zone::Named(tz));
    }
    let bad = || {
        err(
            path,
            format!(
                "{s:?} is not an IANA time zone (e.g. Europe/Berlin, UTC) nor a UTC offset (e.g. +05:30, UTC-03:00)"
            ),
        )
    };
    let upper = s.to_ascii_uppercase();
    let rest = upper
        .strip_prefix("UTC")
        .or_else(|| upper.strip_prefix("GMT"))
        .unwrap_or(&upper);
    let (sign, rest) = match rest.as_bytes().first() {
        Some(b'+') => (1, &rest[1..]),
        Some(b'-') => (-1, &rest[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "00"));
    if h.is_empty()
        || h.len() > 2
        || m.len() != 2
        || !(h.bytes().chain(m.bytes()).all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    // ±18:00 is the widest offset ISO 8601 tools accept; real ones are within -12:00..+14:00.
    if m > 59 || h * 60 + m > 18 * 60 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60))
        .map(Zone::Fixed)
        .ok_or_else(bad)
}

fn weekly(w: &RawWindow, path: &str) -> Result<Weekly, PolicyError> {
    let days_path = format!("{path}.days");
    let raw_days = w.days.as_ref().ok_or_else(|| err(&days_path, "is required"))?;
    if raw_days.is_empty() {
        return Err(err(days_path, "must list at least one day"));
    }
    let days = raw_days
        .iter()
        .enumerate()
        .map(|(j, d)| day(&d.0, &format!("{path}.days[{j}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let start = start_time(&w.start, &format!("{path}.start"))?;
    let end_path = format!("{path}.end");
    let end = parse_time(required(&w.end, &end_path)?, &end_path, true)?;
    if end == Some(start) {
        return Err(err(end_path, "equals start: the window would be empty"));
    }
    let weeks = match &w.every_weeks {
        None => 1,
        Some(n) => number(&n.0, &format!("{path}.everyWeeks"), 1, 52)?,
    };
    let start_date = match &w.start_date {
        None if weeks > 1 => {
            return Err(err(
                format!("{path}.startDate"),
                "is required with everyWeeks: it says which weeks count",
            ));
        }
        None => None,
        Some(s) => Some(parse_date(&s.0, &format!("{path}.startDate"))?),
    };
    let every = match start_date {
        None => None,
        Some(date) => {
            let monday = date
                .checked_sub_days(Days::new(u64::from(date.weekday().num_days_from_monday())))
                .ok_or_else(|| err(format!("{path}.startDate"), "is too far in the past"))?;
            Some(Every { weeks, from: monday })
        }
    };
    Ok(Weekly {
        days,
        start,
        end,
        every,
    })
}

fn monthly(m: &RawMonthly, path: &str) -> Result<Window, PolicyError> {
    let on = match (&m.day_of_month, &m.week, &m.day) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(err(
                format!("{path}.dayOfMonth"),
                "give either dayOfMonth, or week and day, not both",
            ));
        }
        (Some(n), None, None) => MonthDay::Day(number(&n.0, &format!("{path}.dayOfMonth"), 1, 31)?),
        (None, Some(_), None) => return Err(err(format!("{path}.day"), "is required with week")),
        (None, None, Some(_)) => return Err(err(format!("{path}.week"), "is required with day")),
        (None, None, None) => {
            return Err(err(path, "needs dayOfMonth, or week and day"));
        }
        (None, Some(w), Some(d)) => {
            let n = match w.0.trim().to_ascii_lowercase().as_str() {
                "first" => Some(1),
                "second" => Some(2),
                "third" => Some(3),
                "fourth" => Some(4),
                "last" => None,
                _ => {
                    return Err(err(
                        format!("{path}.week"),
                        format!("{:?} is not one of first, second, third, fourth, last", w.0),
                    ));
                }
            };
            MonthDay::Nth(n, day(&d.0, &format!("{path}.day"))?)
        }
    };
    Ok(Window::Monthly {
        on,
        start: start_time(&m.start, &format!("{path}.start"))?,
        duration: duration(&m.duration, &format!("{path}.duration"))?,
    })
}

fn cron(c: &RawCron, path: &str) -> Result<Window, PolicyError> {
    let sched_path = format!("{path}.schedule");
    let s = required(&c.schedule, &sched_path)?;
    // Five fields only (no seconds, no year): windows are minute-grained.
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build();
    let expr = parser.parse(s).map_err(|e| {
        err(
            &sched_path,
            format!("{s:?} is not a 5-field cron expression: {e}"),
        )
    })?;
    Ok(Window::Cron {
        cron: Box::new(expr),
        duration: duration(&c.duration, &format!("{path}.duration"))?,
    })
}

fn blackout(b: &RawBlackout, path: &str) -> Result<(NaiveDate, NaiveDate), PolicyError> {
    match (&b.date, &b.from, &b.to) {
        (Some(d), None, None) => {
            let d = parse_date(&d.0, &format!("{path}.date"))?;
            Ok((d, d))
        }
        (Some(_), _, _) => Err(err(
            format!("{path}.date"),
            "give either date, or from and to, not both",
        )),
        (None, None, None) => Err(err(path, "needs date, or from and to")),
        (None, from, to) => {
            let from = parse_date(required(from, &format!("{path}.from"))?, &format!("{path}.from"))?;
            let to = parse_date(required(to, &format!("{path}.to"))?, &format!("{path}.to"))?;
            if to < from {
                return Err(err(format!("{path}.to"), format!("{to} is before from ({from})")));
            }
            Ok((from, to))
        }
    }
}

/// `prefix` is "" at the top level, "rules[i]." in a rule.
fn schedule(
    prefix: &str,
    zone: Zone,
    windows: &Option<Vec<RawWindow>>,
    monthlies: &Option<Vec<RawMonthly>>,
    crons: &Option<Vec<RawCron>>,
    blackouts: &Option<Vec<RawBlackout>>,
) -> Result<Schedule, PolicyError> {
    let mut out = Schedule {
        zone,
        ..Schedule::default()
    };
    for (i, w) in windows.iter().flatten().enumerate() {
        out.windows
            .push(Window::Weekly(weekly(w, &format!("{prefix}windows[{i}]"))?));
    }
    for (i, m) in monthlies.iter().flatten().enumerate() {
        out.windows.push(monthly(m, &format!("{prefix}monthly[{i}]"))?);
    }
    for (i, c) in crons.iter().flatten().enumerate() {
        out.windows.push(cron(c, &format!("{prefix}cron[{i}]"))?);
    }
    for (i, b) in blackouts.iter().flatten().enumerate() {
        out.blackouts
            .push(blackout(b, &format!("{prefix}blackouts[{i}]"))?);
    }
    Ok(out)
}

fn selector(s: &Option<RawSelector>, path: &str) -> Result<Selector, PolicyError> {
    let s = s
        .as_ref()
        .ok_or_else(|| err(path, "is required ({} selects every node)"))?;
    let mut out = Selector::default();
    for (k, v) in s.match_labels.iter().flatten() {
        if k.trim().is_empty() {
            return Err(err(format!("{path}.matchLabels"), "a label key is empty"));
        }
        out.match_labels.insert(k.clone(), v.0.clone());
    }
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let p = format!("{path}.matchExpressions[{i}]");
        let key = required(&r.key, &format!("{p}.key"))?;
        if key.trim().is_empty() {
            return Err(err(format!("{p}.key"), "is empty"));
        }
        let op_text = required(&r.operator, &format!("{p}.operator"))?;
        let op = match op_text {
            "In" => Operator::In,
            "NotIn" => Operator::NotIn,
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            _ => {
                return Err(err(
                    format!("{p}.operator"),
                    format!("{op_text:?} is not one of In, NotIn, Exists, DoesNotExist"),
                ));
            }
        };
        let values: Vec<String> = r.values.iter().flatten().map(|v| v.0.clone()).collect();
        match op {
            Operator::In | Operator::NotIn if values.is_empty() => {
                return Err(err(
                    format!("{p}.values"),
                    format!("must list at least one value for {op_text}"),
                ));
            }
            Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
                return Err(err(format!("{p}.values"), format!("must be empty for {op_text}")));
            }
            _ => {}
        }
        out.match_expressions.push(Requirement {
            key: key.to_owned(),
            op,
            values,
        });
    }
    Ok(out)
}

/// Reads the document's shape. In two steps so that every error names where it is: YAML that
/// does not parse has no key path (the message gives the line and column; the path is
/// `config.yaml`), and a shape error (an unknown key, a list where a map belongs) is reported
/// at its key path, e.g. `rules[1].windows[0].strat`, instead of serde's bare message.
fn raw_policy(yaml: &str) -> Result<RawPolicy, PolicyError> {
    let value: serde_json::Value =
        serde_saphyr::from_str(yaml).map_err(|e| err("config.yaml", e.to_string()))?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        // The document itself (a list, a number) has the path "."; an empty key has an empty
        // last segment, which is shown as `""` so that the path still says where.
        let path = match path.as_str() {
            "." => "config.yaml".to_owned(),
            "" => "\"\"".to_owned(),
            p if p.ends_with('.') => format!("{p}\"\""),
            _ => path,
        };
        err(path, e.into_inner().to_string())
    })
}

pub(super) fn parse(yaml: &str) -> Result<Policy, PolicyError> {
    if yaml.trim().is_empty() {
        return Ok(Policy::default());
    }
    let raw = raw_policy(yaml)?;
    // Every addition to the schema is optional and old documents keep their meaning, so the
    // version stays 1; an older agent rejects the new keys as unknown instead of misreading them.
    if let Some(v) = &raw.version
        && v.0.trim() != "1"
    {
        return Err(err("version", format!("{:?} is not supported (only 1)", v.0)));
    }
    let zone = match &raw.timezone {
        None => Zone::default(),
        Some(name) => parse_zone(&name.0, "timezone")?,
    };
    let top_blackouts = schedule("", zone, &None, &None, &None, &raw.blackouts)?.blackouts;
    let mut default = schedule("", zone, &raw.windows, &raw.monthly, &raw.cron, &None)?;
    default.blackouts = top_blackouts.clone();
    let mut rules = Vec::new();
    let mut names = BTreeSet::new();
    for (i, r) in raw.rules.iter().flatten().enumerate() {
        rules.push(rule(&format!("rules[{i}]"), r, zone, &top_blackouts, &mut names)?);
    }
    Ok(Policy { default, rules })
}

/// One rule, at `p` (`rules[i]`); `names` are the earlier rules' names.
fn rule(
    p: &str,
    r: &RawRule,
    zone: Zone,
    top_blackouts: &[(NaiveDate, NaiveDate)],
    names: &mut BTreeSet<String>,
) -> Result<Rule, PolicyError> {
    let name = rule_name(p, r, names)?;
    let selector = selector(&r.node_selector, &format!("{p}.nodeSelector"))?;
    let rule_zone = match &r.timezone {
        None => zone,
        Some(z) => parse_zone(&z.0, &format!("{p}.timezone"))?,
    };
    let mut schedule = schedule(
        &format!("{p}."),
        rule_zone,
        &r.windows,
        &r.monthly,
        &r.cron,
        &r.blackouts,
    )?;
    // Top-level blackouts are a freeze for every node.
    schedule.blackouts.extend(top_blackouts.iter().copied());
    let concurrency = match &r.concurrency {
        None => None,
        Some(n) => Some(budget(&n.0, &format!("{p}.concurrency"))?),
    };
    let lock_group = match &r.lock_group {
        None => None,
        Some(g) => Some(lock_group(p, g)?),
    };
    let soak = match &r.soak {
        None => None,
        Some(d) => Some(bounded_duration(&d.0, &format!("{p}.soak"))?),
    };
    let (health_gate, health_query, health_budgets) = health_gate(p, r.health_gate.as_ref())?;
    Ok(Rule {
        name,
        selector,
        schedule,
        concurrency,
        lock_group,
        soak,
        health_gate,
        health_query,
        health_budgets,
    })
}

/// The rule's name: given, not empty, and not an earlier rule's.
fn rule_name(p: &str, r: &RawRule, names: &mut BTreeSet<String>) -> Result<String, PolicyError> {
    let name = required(&r.name, &format!("{p}.name"))?.trim().to_owned();
    if name.is_empty() {
        return Err(err(format!("{p}.name"), "is empty"));
    }
    if !names.insert(name.clone()) {
        return Err(err(
            format!("{p}.name"),
            format!("{name:?} is the name of an earlier rule"),
        ));
    }
    Ok(name)
}

/// The rule's `lockGroup`.
fn lock_group(p: &str, g: &RawLockGroup) -> Result<LockGroup, PolicyError> {
    let label = required(&g.by_label, &format!("{p}.lockGroup.byLabel"))?.trim();
    if label.is_empty() {
        return Err(err(format!("{p}.lockGroup.byLabel"), "is empty"));
    }
    // A number, or a share of the rule's nodes over all its groups: parsed as
    // `concurrency` is, with the same bounds.
    let max_concurrent = match &g.max_concurrent {
        None => None,
        Some(n) => Some(budget(&n.0, &format!("{p}.lockGroup.maxConcurrent"))?),
    };
    Ok(LockGroup {
        by_label: label.to_owned(),
        max_concurrent,
    })
}

/// The rule's `healthGate`: its timeout, its query, and whether it waits for the budgets the
/// drain touched.
fn health_gate(
    p: &str,
    g: Option<&RawHealthGate>,
) -> Result<(Option<chrono::Duration>, Option<String>, bool), PolicyError> {
    let timeout = match g {
        None => None,
        Some(g) => Some(match &g.timeout {
            None => chrono::Duration::minutes(DEFAULT_HEALTH_GATE_TIMEOUT_MINUTES),
            Some(t) => bounded_duration(&t.0, &format!("{p}.healthGate.timeout"))?,
        }),
    };
    let query = match g.and_then(|g| g.query.as_ref()) {
        None => None,
        Some(q) => Some(gate_query(&q.0, &format!("{p}.healthGate.query"))?),
    };
    // On unless switched off: an operator expects the rollout to wait while a budget the
    // drain touched is still below its desired health (see `Rule::health_budgets`).
    let budgets = match g.and_then(|g| g.disruption_budgets.as_ref()) {
        None => timeout.is_some(),
        Some(b) => match b.0.trim() {
            "true" => true,
            "false" => false,
            other => {
                return Err(err(
                    format!("{p}.healthGate.disruptionBudgets"),
                    format!("{other:?} is not true or false"),
                ));
            }
        },
    };
    Ok((timeout, query, budgets))
}
