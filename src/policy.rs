//! Reboot policy: the `config.yaml` schema of ConfigMap `kreboot-config`, its validation,
//! and the window arithmetic (is a reboot allowed at instant `now`, and when does that answer
//! next change).
//!
//! Semantics:
//! - A weekly window is `[start, end)` in the policy's time zone, on each listed day; when
//!   `end <= start` it crosses midnight and ends on the next day (it belongs to the day it
//!   starts on). `end: "24:00"` means midnight at the end of the day.
//! - Daylight-saving time: a start or end time that does not exist on a spring-forward day
//!   (02:30 in Europe/Berlin on the last Sunday of March) is moved to the first instant after
//!   the gap (03:00); a time that occurs twice on a fall-back day means its first occurrence.
//!   So a 02:00–03:00 window on the fall-back day lasts two real hours (it spans the repeated
//!   hour).
//! - Blackout dates are inclusive, in the policy's time zone, and win over every window.
//! - No windows at all (or an absent ConfigMap) means reboots are allowed at any time, except in
//!   blackouts.
//! - Unknown keys are rejected: a typo must not silently widen a window.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Days, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;

/// Labels of a Node, as used for per-pool policy rules.
pub type Labels = BTreeMap<String, String>;

/// How far ahead [`Policy::next_transition`] looks.
const HORIZON_DAYS: u64 = 400;

/// A validated reboot policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    tz: Tz,
    windows: Vec<Weekly>,
    blackouts: Vec<(NaiveDate, NaiveDate)>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            tz: Tz::UTC,
            windows: Vec::new(),
            blackouts: Vec::new(),
        }
    }
}

/// A weekly window.
#[derive(Debug, Clone, PartialEq)]
struct Weekly {
    days: Vec<Weekday>,
    start: NaiveTime,
    /// None: midnight at the end of the day ("24:00").
    end: Option<NaiveTime>,
}

/// Why a `config.yaml` was rejected.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy at {path}: {message}")]
pub struct PolicyError {
    /// Key path of the offending value, e.g. `windows[0].start`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> PolicyError {
    PolicyError {
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: Option<u32>,
    timezone: Option<String>,
    windows: Option<Vec<RawWindow>>,
    blackouts: Option<Vec<RawBlackout>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindow {
    days: Vec<String>,
    start: String,
    end: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlackout {
    from: String,
    to: String,
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

fn parse_date(s: &str, path: &str) -> Result<NaiveDate, PolicyError> {
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
        .map_err(|e| err(path, format!("{s:?} is not a date YYYY-MM-DD: {e}")))
}

/// The instant of local date-time `naive` in `tz`: the first occurrence of a repeated time, the
/// first instant after a gap for a time that does not exist.
fn resolve(tz: Tz, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
    let mut probe = naive;
    // DST gaps are at most a few hours; step minute by minute to the first valid local time.
    for _ in 0..(6 * 60) {
        if let Some(t) = tz.from_local_datetime(&probe).earliest() {
            return Some(t.with_timezone(&Utc));
        }
        probe = probe.checked_add_signed(chrono::Duration::minutes(1))?;
    }
    None
}

impl Policy {
    /// Parses and validates a `config.yaml` document.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key path and the problem.
    pub fn parse(yaml: &str) -> Result<Policy, PolicyError> {
        if yaml.trim().is_empty() {
            return Ok(Policy::default());
        }
        let raw: RawPolicy = serde_saphyr::from_str(yaml).map_err(|e| err("config.yaml", e.to_string()))?;
        if let Some(v) = raw.version
            && v != 1
        {
            return Err(err("version", format!("{v} is not supported (only 1)")));
        }
        let tz = match raw.timezone.as_deref() {
            None => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                err(
                    "timezone",
                    format!("{name:?} is not an IANA time zone (e.g. Europe/Berlin, UTC)"),
                )
            })?,
        };
        let mut windows = Vec::new();
        for (i, w) in raw.windows.unwrap_or_default().into_iter().enumerate() {
            let path = format!("windows[{i}]");
            if w.days.is_empty() {
                return Err(err(format!("{path}.days"), "must list at least one day"));
            }
            let mut days = Vec::new();
            for (j, d) in w.days.iter().enumerate() {
                let day = parse_day(d).ok_or_else(|| {
                    err(
                        format!("{path}.days[{j}]"),
                        format!("{d:?} is not a day (mon..sun)"),
                    )
                })?;
                days.push(day);
            }
            let start = parse_time(&w.start, &format!("{path}.start"), false)?
                .ok_or_else(|| err(format!("{path}.start"), "24:00 is not a start time"))?;
            let end = parse_time(&w.end, &format!("{path}.end"), true)?;
            if end == Some(start) {
                return Err(err(
                    format!("{path}.end"),
                    "equals start: the window would be empty",
                ));
            }
            windows.push(Weekly { days, start, end });
        }
        let mut blackouts = Vec::new();
        for (i, b) in raw.blackouts.unwrap_or_default().into_iter().enumerate() {
            let from = parse_date(&b.from, &format!("blackouts[{i}].from"))?;
            let to = parse_date(&b.to, &format!("blackouts[{i}].to"))?;
            if to < from {
                return Err(err(
                    format!("blackouts[{i}].to"),
                    format!("{to} is before from ({from})"),
                ));
            }
            blackouts.push((from, to));
        }
        Ok(Policy {
            tz,
            windows,
            blackouts,
        })
    }

    fn local_date(&self, t: DateTime<Utc>) -> NaiveDate {
        t.with_timezone(&self.tz).date_naive()
    }

    fn in_blackout(&self, t: DateTime<Utc>) -> bool {
        let d = self.local_date(t);
        self.blackouts.iter().any(|(from, to)| *from <= d && d <= *to)
    }

    /// The intervals of the windows starting on local date `d`.
    fn intervals_on(&self, d: NaiveDate) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        for w in self.windows.iter().filter(|w| w.days.contains(&d.weekday())) {
            let end_date = match w.end {
                Some(e) if e > w.start => Some((d, e)),
                Some(e) => d.checked_add_days(Days::new(1)).map(|n| (n, e)),
                None => d.checked_add_days(Days::new(1)).map(|n| (n, NaiveTime::MIN)),
            };
            let (Some(start), Some((ed, et))) = (resolve(self.tz, d.and_time(w.start)), end_date) else {
                continue;
            };
            if let Some(end) = resolve(self.tz, ed.and_time(et))
                && end > start
            {
                out.push((start, end));
            }
        }
        out
    }

    fn in_window(&self, t: DateTime<Utc>) -> bool {
        if self.windows.is_empty() {
            return true;
        }
        let d = self.local_date(t);
        [d.pred_opt(), Some(d)]
            .into_iter()
            .flatten()
            .flat_map(|d| self.intervals_on(d))
            .any(|(s, e)| s <= t && t < e)
    }

    /// Whether a node with `labels` may reboot at `now`.
    pub fn is_open(&self, _labels: &Labels, now: DateTime<Utc>) -> bool {
        !self.in_blackout(now) && self.in_window(now)
    }

    /// The instants at which `is_open` may change, for windows and blackouts of local date `d`.
    fn boundaries_on(&self, d: NaiveDate) -> Vec<DateTime<Utc>> {
        let mut out: Vec<DateTime<Utc>> = self
            .intervals_on(d)
            .into_iter()
            .flat_map(|(s, e)| [s, e])
            .collect();
        for (from, to) in &self.blackouts {
            if *from == d {
                out.extend(resolve(self.tz, d.and_time(NaiveTime::MIN)));
            }
            if let Some(after) = to.checked_add_days(Days::new(1))
                && after == d
            {
                out.extend(resolve(self.tz, d.and_time(NaiveTime::MIN)));
            }
        }
        out
    }

    /// The next instant after `now` at which `is_open` changes, if any within about a year.
    pub fn next_transition(&self, labels: &Labels, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let open = self.is_open(labels, now);
        let first = self.local_date(now).pred_opt()?;
        let mut candidates: Vec<DateTime<Utc>> = Vec::new();
        for offset in 0..HORIZON_DAYS {
            let d = first.checked_add_days(Days::new(offset))?;
            candidates.extend(self.boundaries_on(d).into_iter().filter(|t| *t > now));
            // Boundaries of later days are later than those of this day's windows' starts, but
            // a crossing-midnight end lies on the next day: decide only on candidates that are
            // before the earliest possible boundary of the next days.
            candidates.sort_unstable();
            let horizon = resolve(
                self.tz,
                d.checked_add_days(Days::new(1))?.and_time(NaiveTime::MIN),
            )?;
            while let Some(t) = candidates.first().copied().filter(|t| *t <= horizon) {
                candidates.remove(0);
                if self.is_open(labels, t) != open {
                    return Some(t);
                }
            }
        }
        None
    }

    /// The next `n` open intervals `[start, end)` for a node with `labels`, from `now` on. An
    /// interval open at `now` is reported from `now`. An interval that never closes within the
    /// horizon ends at the horizon.
    pub fn upcoming_windows(
        &self,
        labels: &Labels,
        now: DateTime<Utc>,
        n: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let mut out = Vec::new();
        let mut t = now;
        let horizon = now + chrono::Duration::days(HORIZON_DAYS as i64);
        while out.len() < n && t < horizon {
            if self.is_open(labels, t) {
                let end = self.next_transition(labels, t).unwrap_or(horizon);
                out.push((t, end));
                t = end;
            } else {
                match self.next_transition(labels, t) {
                    Some(start) => t = start,
                    None => break,
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tz: Tz, s: &str) -> DateTime<Utc> {
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        tz.from_local_datetime(&naive)
            .earliest()
            .unwrap()
            .with_timezone(&Utc)
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    const NONE: &Labels = &BTreeMap::new();

    #[test]
    fn missing_or_empty_policy_is_always_open() {
        let p = Policy::parse("").unwrap();
        assert!(p.is_open(NONE, utc("2026-11-24T03:00:00Z")));
        assert_eq!(p.next_transition(NONE, utc("2026-11-24T03:00:00Z")), None);
        assert!(Policy::default().is_open(NONE, utc("2026-11-24T03:00:00Z")));
    }

    #[test]
    fn window_crossing_midnight() {
        let p =
            Policy::parse("windows:\n  - days: [fri]\n    start: \"22:00\"\n    end: \"04:00\"\n").unwrap();
        // 2026-11-27 is a Friday.
        for (when, open) in [
            ("2026-11-27T21:59:00Z", false),
            ("2026-11-27T22:00:00Z", true),
            ("2026-11-28T03:59:00Z", true),
            ("2026-11-28T04:00:00Z", false),
            ("2026-11-28T22:30:00Z", false),
        ] {
            assert_eq!(p.is_open(NONE, utc(when)), open, "{when}");
        }
        assert_eq!(
            p.next_transition(NONE, utc("2026-11-27T12:00:00Z")),
            Some(utc("2026-11-27T22:00:00Z"))
        );
        assert_eq!(
            p.next_transition(NONE, utc("2026-11-27T23:00:00Z")),
            Some(utc("2026-11-28T04:00:00Z"))
        );
        assert_eq!(
            p.next_transition(NONE, utc("2026-11-28T05:00:00Z")),
            Some(utc("2026-12-04T22:00:00Z"))
        );
    }

    #[test]
    fn dst_in_berlin_and_new_york() {
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        // Spring forward 2026-03-29 (Sunday): 02:00..03:00 does not exist; a 02:30 start opens
        // at 03:00 local.
        let p = Policy::parse(
            "timezone: Europe/Berlin\nwindows:\n  - days: [sun]\n    start: \"02:30\"\n    end: \"05:00\"\n",
        )
        .unwrap();
        assert_eq!(
            p.next_transition(NONE, at(berlin, "2026-03-29 00:00")),
            Some(at(berlin, "2026-03-29 03:00"))
        );
        assert!(p.is_open(NONE, at(berlin, "2026-03-29 04:59")));
        // Fall back 2026-10-25: 02:00..03:00 happens twice; a 02:00-03:00 window spans both.
        let p = Policy::parse(
            "timezone: Europe/Berlin\nwindows:\n  - days: [sun]\n    start: \"02:00\"\n    end: \"03:00\"\n",
        )
        .unwrap();
        let start = p.next_transition(NONE, at(berlin, "2026-10-25 00:00")).unwrap();
        assert_eq!(
            start,
            utc("2026-10-25T00:00:00Z"),
            "first 02:00 is 00:00 UTC (CEST)"
        );
        let end = p.next_transition(NONE, start).unwrap();
        assert_eq!(
            end,
            utc("2026-10-25T02:00:00Z"),
            "03:00 CET is 02:00 UTC: two real hours"
        );
        let ny: Tz = "America/New_York".parse().unwrap();
        let p = Policy::parse("timezone: America/New_York\nwindows:\n  - days: [sun]\n    start: \"02:30\"\n    end: \"04:00\"\n").unwrap();
        // 2026-03-08: 02:00 -> 03:00.
        assert_eq!(
            p.next_transition(NONE, at(ny, "2026-03-08 00:00")),
            Some(at(ny, "2026-03-08 03:00"))
        );
        // 2026-11-01: 01:00..02:00 twice; 02:30 exists once (EST).
        assert_eq!(
            p.next_transition(NONE, at(ny, "2026-11-01 00:00")),
            Some(utc("2026-11-01T07:30:00Z"))
        );
    }

    #[test]
    fn blackouts_win_and_cross_year_end() {
        let p = Policy::parse(
            "timezone: UTC\nwindows:\n  - days: [mon, tue, wed, thu, fri, sat, sun]\n    start: \"00:00\"\n    end: \"24:00\"\nblackouts:\n  - from: \"2026-12-20\"\n    to: \"2027-01-05\"\n",
        )
        .unwrap();
        assert!(p.is_open(NONE, utc("2026-12-19T23:59:00Z")));
        assert!(!p.is_open(NONE, utc("2026-12-20T00:00:00Z")));
        assert!(!p.is_open(NONE, utc("2027-01-05T23:59:00Z")));
        assert!(p.is_open(NONE, utc("2027-01-06T00:00:00Z")));
        assert_eq!(
            p.next_transition(NONE, utc("2026-12-25T00:00:00Z")),
            Some(utc("2027-01-06T00:00:00Z"))
        );
        let w = p.upcoming_windows(NONE, utc("2026-12-19T12:00:00Z"), 2);
        assert_eq!(w[0], (utc("2026-12-19T12:00:00Z"), utc("2026-12-20T00:00:00Z")));
        assert_eq!(w[1].0, utc("2027-01-06T00:00:00Z"));
    }

    #[test]
    fn errors_name_the_key() {
        for (doc, path) in [
            (
                "windows: [{days: [someday], start: \"01:00\", end: \"02:00\"}]",
                "windows[0].days[0]",
            ),
            (
                "windows: [{days: [mon], start: \"25:00\", end: \"02:00\"}]",
                "windows[0].start",
            ),
            (
                "windows: [{days: [mon], start: \"01:00\", end: \"1:5\"}]",
                "windows[0].end",
            ),
            (
                "windows: [{days: [], start: \"01:00\", end: \"02:00\"}]",
                "windows[0].days",
            ),
            (
                "windows: [{days: [mon], start: \"01:00\", end: \"01:00\"}]",
                "windows[0].end",
            ),
            ("timezone: Mars/Olympus", "timezone"),
            (
                "blackouts: [{from: \"2026-12-20\", to: \"2026-12-01\"}]",
                "blackouts[0].to",
            ),
            (
                "blackouts: [{from: \"20.12.2026\", to: \"2026-12-21\"}]",
                "blackouts[0].from",
            ),
            ("version: 2", "version"),
            ("window: []", "config.yaml"),
            (
                "windows: [{days: [mon], start: \"01:00\", end: \"02:00\", strat: x}]",
                "config.yaml",
            ),
        ] {
            let e = Policy::parse(doc).unwrap_err();
            assert_eq!(e.path, path, "{doc}: {e}");
        }
    }

    #[test]
    fn no_input_panics_and_transitions_are_exact() {
        use rand::{RngExt, SeedableRng, rngs::StdRng};
        let mut rng = StdRng::seed_from_u64(7);
        let valid = "timezone: Europe/Berlin\nwindows:\n  - days: [mon, sun]\n    start: \"02:30\"\n    end: \"01:00\"\nblackouts:\n  - from: \"2026-03-01\"\n    to: \"2026-03-02\"\n";
        for _ in 0..2000 {
            let mut bytes = valid.as_bytes().to_vec();
            for _ in 0..rng.random_range(1..6) {
                let i = rng.random_range(0..bytes.len());
                bytes[i] = rng.random();
            }
            let _ = Policy::parse(&String::from_utf8_lossy(&bytes));
        }
        let p = Policy::parse(valid).unwrap();
        let mut t = utc("2026-02-20T00:00:00Z");
        for _ in 0..40 {
            let next = p.next_transition(NONE, t).unwrap();
            let before = next - chrono::Duration::seconds(1);
            assert_ne!(p.is_open(NONE, before), p.is_open(NONE, next), "flip at {next}");
            assert_eq!(
                p.is_open(NONE, t),
                p.is_open(NONE, before),
                "no flip between {t} and {next}"
            );
            t = next;
        }
    }
}
