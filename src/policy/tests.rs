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
    let p = Policy::parse("windows:\n  - days: [fri]\n    start: \"22:00\"\n    end: \"04:00\"\n").unwrap();
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
    let p = Policy::parse(
        "timezone: America/New_York\nwindows:\n  - days: [sun]\n    start: \"02:30\"\n    end: \"04:00\"\n",
    )
    .unwrap();
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
        // Shape errors name their key too (an unknown key, a list where a map belongs).
        ("window: []", "window"),
        (
            "windows: [{days: [mon], start: \"01:00\", end: \"02:00\", strat: x}]",
            "windows[0].strat",
        ),
        (
            "rules: [{name: a}, {name: b, windows: {days: mon}}]",
            "rules[1].windows",
        ),
        ("rules: 5", "rules"),
        ("- a\n- b", "config.yaml"),
        ("windows: [mon: [", "config.yaml"),
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

fn policy(doc: &str) -> Policy {
    Policy::parse(doc).unwrap_or_else(|e| panic!("{e}\n{doc}"))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One hand-checked expectation: from `from`, `next_transition` must return `transitions` in
/// turn ("none": no further transition), and `is_open` must give `open` at each instant.
struct Case {
    name: &'static str,
    doc: &'static str,
    from: &'static str,
    transitions: &'static [&'static str],
    open: &'static [(&'static str, bool)],
}

const CASES: &[Case] = &[
    Case {
        name: "weekly window crossing midnight",
        doc: "windows: [{days: [fri], start: \"22:00\", end: \"04:00\"}]",
        from: "2026-11-27T12:00:00Z",
        transitions: &[
            "2026-11-27T22:00:00Z",
            "2026-11-28T04:00:00Z",
            "2026-12-04T22:00:00Z",
        ],
        open: &[("2026-11-28T03:59:00Z", true), ("2026-11-28T22:30:00Z", false)],
    },
    Case {
        name: "dayOfMonth 31 is the last day of February and April",
        doc: "monthly: [{dayOfMonth: 31, start: \"01:00\", duration: 2h}]",
        from: "2026-02-01T00:00:00Z",
        transitions: &[
            "2026-02-28T01:00:00Z",
            "2026-02-28T03:00:00Z",
            "2026-03-31T01:00:00Z",
            "2026-03-31T03:00:00Z",
            "2026-04-30T01:00:00Z",
            "2026-04-30T03:00:00Z",
            "2026-05-31T01:00:00Z",
        ],
        open: &[("2026-04-29T02:00:00Z", false), ("2026-04-30T02:59:00Z", true)],
    },
    Case {
        name: "leap year: dayOfMonth 30 is 29 February 2028",
        doc: "monthly: [{dayOfMonth: 30, start: \"01:00\", duration: 90m}]",
        from: "2028-02-01T00:00:00Z",
        transitions: &[
            "2028-02-29T01:00:00Z",
            "2028-02-29T02:30:00Z",
            "2028-03-30T01:00:00Z",
        ],
        open: &[("2028-02-28T01:30:00Z", false), ("2028-02-29T02:29:00Z", true)],
    },
    Case {
        name: "leap day as a weekly Tuesday",
        doc: "windows: [{days: [tuesday], start: \"00:00\", end: \"24:00\"}]",
        from: "2028-02-28T12:00:00Z",
        transitions: &["2028-02-29T00:00:00Z", "2028-03-01T00:00:00Z"],
        open: &[("2028-02-29T23:59:59Z", true)],
    },
    Case {
        name: "last Sunday of the month",
        doc: "monthly: [{week: last, day: sunday, start: \"03:00\", duration: 1h}]",
        from: "2026-11-01T00:00:00Z",
        transitions: &[
            "2026-11-29T03:00:00Z",
            "2026-11-29T04:00:00Z",
            "2026-12-27T03:00:00Z",
            "2026-12-27T04:00:00Z",
            "2027-01-31T03:00:00Z",
        ],
        open: &[("2026-11-22T03:30:00Z", false)],
    },
    Case {
        name: "first Tuesday",
        doc: "monthly: [{week: first, day: tue, start: \"03:00\", duration: 1h}]",
        from: "2026-11-04T00:00:00Z",
        transitions: &[
            "2026-12-01T03:00:00Z",
            "2026-12-01T04:00:00Z",
            "2027-01-05T03:00:00Z",
        ],
        open: &[],
    },
    Case {
        name: "Berlin spring forward: last Sunday 02:30 does not exist, opens at 03:00 CEST",
        doc: "timezone: Europe/Berlin\nmonthly: [{week: last, day: sun, start: \"02:30\", duration: 1h}]",
        from: "2026-03-01T00:00:00Z",
        transitions: &[
            "2026-03-29T01:00:00Z",
            "2026-03-29T02:00:00Z",
            "2026-04-26T00:30:00Z",
        ],
        open: &[("2026-03-29T00:59:00Z", false)],
    },
    Case {
        name: "Berlin fall back: 02:00-03:00 spans the repeated hour (two real hours)",
        doc: "timezone: Europe/Berlin\nwindows: [{days: [sun], start: \"02:00\", end: \"03:00\"}]",
        from: "2026-10-24T22:00:00Z",
        transitions: &[
            "2026-10-25T00:00:00Z",
            "2026-10-25T02:00:00Z",
            "2026-11-01T01:00:00Z",
        ],
        open: &[("2026-10-25T01:30:00Z", true)],
    },
    Case {
        name: "Berlin cron at 02:30: moved to 03:00 in spring",
        doc: "timezone: Europe/Berlin\ncron: [{schedule: \"30 2 * * *\", duration: 1h}]",
        from: "2026-03-28T00:00:00Z",
        transitions: &[
            "2026-03-28T01:30:00Z",
            "2026-03-28T02:30:00Z",
            "2026-03-29T01:00:00Z",
            "2026-03-29T02:00:00Z",
            "2026-03-30T00:30:00Z",
        ],
        open: &[],
    },
    Case {
        name: "Berlin cron at 02:30: once, the first occurrence, in autumn",
        doc: "timezone: Europe/Berlin\ncron: [{schedule: \"30 2 * * *\", duration: 1h}]",
        from: "2026-10-24T02:00:00Z",
        transitions: &[
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:30:00Z",
            "2026-10-26T01:30:00Z",
        ],
        open: &[("2026-10-25T01:45:00Z", false)],
    },
    Case {
        name: "New York spring forward: second Sunday of March 02:30 opens at 03:00 EDT",
        doc: "timezone: America/New_York\nmonthly: [{week: second, day: sunday, start: \"02:30\", duration: 1h}]",
        from: "2026-03-01T12:00:00Z",
        transitions: &[
            "2026-03-08T07:00:00Z",
            "2026-03-08T08:00:00Z",
            "2026-04-12T06:30:00Z",
        ],
        open: &[],
    },
    Case {
        name: "New York fall back: 01:00-02:00 spans the repeated hour",
        doc: "timezone: America/New_York\nwindows: [{days: [sun], start: \"01:00\", end: \"02:00\"}]",
        from: "2026-10-31T12:00:00Z",
        transitions: &[
            "2026-11-01T05:00:00Z",
            "2026-11-01T07:00:00Z",
            "2026-11-08T06:00:00Z",
        ],
        open: &[("2026-11-01T06:30:00Z", true)],
    },
    Case {
        name: "every two weeks from the week of startDate, not before it",
        doc: "windows: [{days: [sat], start: \"01:00\", end: \"03:00\", everyWeeks: 2, startDate: \"2026-11-04\"}]",
        from: "2026-10-25T00:00:00Z",
        transitions: &[
            "2026-11-07T01:00:00Z",
            "2026-11-07T03:00:00Z",
            "2026-11-21T01:00:00Z",
            "2026-11-21T03:00:00Z",
            "2026-12-05T01:00:00Z",
        ],
        open: &[("2026-10-31T02:00:00Z", false), ("2026-11-14T02:00:00Z", false)],
    },
    Case {
        name: "cron on weekdays with a duration",
        doc: "cron: [{schedule: \"0 2 * * 1-5\", duration: 4h}]",
        from: "2026-11-27T00:00:00Z",
        transitions: &[
            "2026-11-27T02:00:00Z",
            "2026-11-27T06:00:00Z",
            "2026-11-30T02:00:00Z",
            "2026-11-30T06:00:00Z",
        ],
        open: &[("2026-11-28T03:00:00Z", false)],
    },
    Case {
        name: "overlapping cron occurrences merge, across midnight",
        doc: "cron: [{schedule: \"0,30 23 * * *\", duration: 1h}]",
        from: "2026-11-27T12:00:00Z",
        transitions: &[
            "2026-11-27T23:00:00Z",
            "2026-11-28T00:30:00Z",
            "2026-11-28T23:00:00Z",
        ],
        open: &[],
    },
    Case {
        name: "cron every minute is always open",
        doc: "cron: [{schedule: \"* * * * *\", duration: 1m}]",
        from: "2026-11-27T12:00:00Z",
        transitions: &["none"],
        open: &[("2027-03-01T00:00:30Z", true)],
    },
    Case {
        name: "fixed offset +05:30",
        doc: "timezone: \"+05:30\"\nwindows: [{days: [mon], start: \"02:00\", end: \"03:00\"}]",
        from: "2026-11-29T00:00:00Z",
        transitions: &[
            "2026-11-29T20:30:00Z",
            "2026-11-29T21:30:00Z",
            "2026-12-06T20:30:00Z",
        ],
        open: &[],
    },
    Case {
        name: "fixed offset UTC-03:00 with cron",
        doc: "timezone: UTC-03:00\ncron: [{schedule: \"0 2 * * *\", duration: 1h}]",
        from: "2026-11-27T00:00:00Z",
        transitions: &[
            "2026-11-27T05:00:00Z",
            "2026-11-27T06:00:00Z",
            "2026-11-28T05:00:00Z",
        ],
        open: &[],
    },
    Case {
        name: "single blackout date in Berlin, no windows",
        doc: "timezone: Europe/Berlin\nblackouts: [{date: \"2026-12-24\"}]",
        from: "2026-12-23T12:00:00Z",
        transitions: &["2026-12-23T23:00:00Z", "2026-12-24T23:00:00Z", "none"],
        open: &[("2026-12-24T22:59:00Z", false)],
    },
];

#[test]
fn table_of_hand_checked_transitions() {
    for case in CASES {
        let p = policy(case.doc);
        let mut t = utc(case.from);
        for expected in case.transitions {
            let got = p.next_transition(NONE, t);
            if *expected == "none" {
                assert_eq!(got, None, "{}: after {t}", case.name);
                break;
            }
            let want = utc(expected);
            assert_eq!(got, Some(want), "{}: after {t}", case.name);
            assert_ne!(
                p.is_open(NONE, want),
                p.is_open(NONE, want - chrono::Duration::seconds(1)),
                "{}: flips at {want}",
                case.name
            );
            t = want;
        }
        for (when, open) in case.open {
            assert_eq!(p.is_open(NONE, utc(when)), *open, "{}: at {when}", case.name);
        }
    }
}

const RULES: &str = r#"
timezone: Europe/Berlin
windows: [{days: [sat], start: "01:00", end: "05:00"}]
blackouts: [{date: "2026-12-24"}]
rules:
  - name: db
    nodeSelector: {matchLabels: {pool: db}}
    windows: [{days: [sun], start: "01:00", end: "05:00"}]
    concurrency: 1
  - name: workers
    nodeSelector:
      matchLabels: {tier: app}
      matchExpressions:
        - {key: pool, operator: In, values: [db, web, batch]}
        - {key: frozen, operator: DoesNotExist}
    timezone: UTC
    cron: [{schedule: "0 2 * * *", duration: 2h}]
    concurrency: 2
    lockGroup: {byLabel: pool}
"#;

#[test]
fn first_matching_rule_wins_and_the_rest_take_the_default() {
    let p = policy(RULES);
    let db = labels(&[("pool", "db"), ("tier", "app")]);
    let web = labels(&[("pool", "web"), ("tier", "app")]);
    let frozen = labels(&[("pool", "web"), ("tier", "app"), ("frozen", "yes")]);
    let other = labels(&[("pool", "gpu")]);
    // The db node also matches "workers", but "db" comes first.
    let view = p.rule_for(&db);
    assert_eq!((view.name.as_deref(), view.index), (Some("db"), Some(0)));
    assert_eq!(view.concurrency, Some(Budget::Nodes(1)));
    assert_eq!(view.lock_group, None);
    let view = p.rule_for(&web);
    assert_eq!(view.name.as_deref(), Some("workers"));
    assert_eq!(view.zone.to_string(), "UTC");
    assert_eq!(
        view.lock_group,
        Some(LockGroupView {
            label: "pool".into(),
            value: Some("web".into()),
            max_concurrent: None
        })
    );
    assert_eq!(p.rule_for(&frozen).name, None, "DoesNotExist excludes it");
    let view = p.rule_for(&other);
    assert_eq!((view.name, view.concurrency), (None, None));
    assert_eq!(view.zone.to_string(), "Europe/Berlin");

    // 2026-11-29 is a Sunday: 01:30 Berlin is 00:30 UTC.
    let sunday = utc("2026-11-29T00:30:00Z");
    assert!(p.is_open(&db, sunday));
    assert!(!p.is_open(&web, sunday));
    assert!(!p.is_open(&other, sunday));
    assert!(p.is_open(&web, utc("2026-11-29T02:30:00Z")), "UTC cron");
    assert!(
        p.is_open(&other, utc("2026-11-28T00:30:00Z")),
        "default: Saturday"
    );
    assert!(
        p.is_open(&frozen, utc("2026-11-28T00:30:00Z")),
        "default: Saturday"
    );
    // Top-level blackouts hold for every rule (24 December in the rule's own zone, UTC).
    assert!(!p.is_open(&web, utc("2026-12-24T02:30:00Z")));
    assert_eq!(
        p.next_transition(&web, utc("2026-12-24T00:00:00Z")),
        Some(utc("2026-12-25T02:00:00Z"))
    );
    // An empty selector selects every node.
    let p = policy("rules: [{name: all, nodeSelector: {}, concurrency: 4}]");
    assert_eq!(p.rule_for(NONE).concurrency, Some(Budget::Nodes(4)));
}

#[test]
fn new_fields_errors_name_the_key() {
    for (doc, path, words) in [
        (
            "rules: [{name: a, nodeSelector: {}}, {name: b, nodeSelector: {}, monthly: [{week: fifth, day: tuesday, start: \"01:00\", duration: 1h}]}]",
            "rules[1].monthly[0].week",
            "\"fifth\" is not one of first, second, third, fourth, last",
        ),
        (
            "monthly: [{dayOfMonth: 32, start: \"01:00\", duration: 1h}]",
            "monthly[0].dayOfMonth",
            "from 1 to 31",
        ),
        (
            "monthly: [{dayOfMonth: x, start: \"01:00\", duration: 1h}]",
            "monthly[0].dayOfMonth",
            "whole number",
        ),
        (
            "monthly: [{dayOfMonth: 3, week: last, day: mon, start: \"01:00\", duration: 1h}]",
            "monthly[0].dayOfMonth",
            "not both",
        ),
        (
            "monthly: [{start: \"01:00\", duration: 1h}]",
            "monthly[0]",
            "needs",
        ),
        (
            "monthly: [{week: last, start: \"01:00\", duration: 1h}]",
            "monthly[0].day",
            "required",
        ),
        (
            "monthly: [{week: last, day: someday, start: \"01:00\", duration: 1h}]",
            "monthly[0].day",
            "not a day",
        ),
        (
            "monthly: [{dayOfMonth: 1, start: \"01:00\"}]",
            "monthly[0].duration",
            "required",
        ),
        (
            "monthly: [{dayOfMonth: 1, start: \"01:00\", duration: forever}]",
            "monthly[0].duration",
            "not a duration",
        ),
        (
            "monthly: [{dayOfMonth: 1, start: \"01:00\", duration: 8d}]",
            "monthly[0].duration",
            "longer than 7 days",
        ),
        (
            "monthly: [{dayOfMonth: 1, start: \"01:00\", duration: 10s}]",
            "monthly[0].duration",
            "shorter",
        ),
        (
            "monthly: [{dayOfMonth: 1, start: \"24:00\", duration: 1h}]",
            "monthly[0].start",
            "HH:MM",
        ),
        (
            "cron: [{schedule: \"0 2 * *\", duration: 1h}]",
            "cron[0].schedule",
            "5-field cron",
        ),
        (
            "cron: [{schedule: \"0 0 2 * * *\", duration: 1h}]",
            "cron[0].schedule",
            "5-field cron",
        ),
        (
            "cron: [{schedule: \"0 25 * * *\", duration: 1h}]",
            "cron[0].schedule",
            "5-field cron",
        ),
        ("cron: [{duration: 1h}]", "cron[0].schedule", "required"),
        (
            "windows: [{days: [mon], start: \"01:00\", end: \"02:00\", everyWeeks: 2}]",
            "windows[0].startDate",
            "required",
        ),
        (
            "windows: [{days: [mon], start: \"01:00\", end: \"02:00\", everyWeeks: 0, startDate: \"2026-01-01\"}]",
            "windows[0].everyWeeks",
            "from 1 to 52",
        ),
        (
            "windows: [{days: [mon], start: \"01:00\", end: \"02:00\", everyWeeks: 2, startDate: \"2026-02-30\"}]",
            "windows[0].startDate",
            "not a date",
        ),
        (
            "blackouts: [{date: \"2026-13-01\"}]",
            "blackouts[0].date",
            "not a date",
        ),
        (
            "blackouts: [{date: \"2026-12-01\", from: \"2026-12-01\"}]",
            "blackouts[0].date",
            "not both",
        ),
        (
            "blackouts: [{from: \"2026-12-01\"}]",
            "blackouts[0].to",
            "required",
        ),
        ("blackouts: [{}]", "blackouts[0]", "needs"),
        ("timezone: \"+19:00\"", "timezone", "UTC offset"),
        ("timezone: \"UTC+5:7\"", "timezone", "UTC offset"),
        ("timezone: \"+05:60\"", "timezone", "UTC offset"),
        ("rules: [{nodeSelector: {}}]", "rules[0].name", "required"),
        (
            "rules: [{name: a, nodeSelector: {}}, {name: a, nodeSelector: {}}]",
            "rules[1].name",
            "earlier rule",
        ),
        ("rules: [{name: a}]", "rules[0].nodeSelector", "required"),
        (
            "rules: [{name: a, nodeSelector: {matchExpressions: [{key: k, operator: Has}]}}]",
            "rules[0].nodeSelector.matchExpressions[0].operator",
            "not one of In, NotIn, Exists, DoesNotExist",
        ),
        (
            "rules: [{name: a, nodeSelector: {matchExpressions: [{key: k, operator: In}]}}]",
            "rules[0].nodeSelector.matchExpressions[0].values",
            "at least one",
        ),
        (
            "rules: [{name: a, nodeSelector: {matchExpressions: [{key: k, operator: Exists, values: [x]}]}}]",
            "rules[0].nodeSelector.matchExpressions[0].values",
            "empty",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, concurrency: 0}]",
            "rules[0].concurrency",
            "from 1 to 10000",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, concurrency: \"0%\"}]",
            "rules[0].concurrency",
            "percentage from 1% to 100%",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, concurrency: \"150%\"}]",
            "rules[0].concurrency",
            "percentage from 1% to 100%",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, concurrency: \"12.5%\"}]",
            "rules[0].concurrency",
            "whole percent",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, healthGate: {timeout: never}}]",
            "rules[0].healthGate.timeout",
            "not a duration",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, healthGate: {query: \"  \"}}]",
            "rules[0].healthGate.query",
            "is empty",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, healthGate: {timeuot: 5m}}]",
            "rules[0].healthGate.timeuot",
            "timeuot",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, soak: soon}]",
            "rules[0].soak",
            "not a duration",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, soak: 0s}]",
            "rules[0].soak",
            "shorter than a second",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, soak: 8d}]",
            "rules[0].soak",
            "longer than 7 days",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, concurrency: quarter}]",
            "rules[0].concurrency",
            "nor a percentage",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, lockGroup: {maxConcurrent: 2}}]",
            "rules[0].lockGroup.byLabel",
            "required",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, lockGroup: {byLabel: pool, maxConcurrent: -1}}]",
            "rules[0].lockGroup.maxConcurrent",
            "whole number",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, lockGroup: {byLabel: pool, maxConcurrent: \"150%\"}}]",
            "rules[0].lockGroup.maxConcurrent",
            "percentage from 1% to 100%",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, timezone: Moon/Base}]",
            "rules[0].timezone",
            "IANA",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, windows: [{days: [mon], start: \"1\", end: \"02:00\"}]}]",
            "rules[0].windows[0].start",
            "HH:MM",
        ),
        (
            "rules: [{name: a, nodeSelector: {}, blackouts: [{date: soon}]}]",
            "rules[0].blackouts[0].date",
            "not a date",
        ),
    ] {
        let e = Policy::parse(doc).unwrap_err();
        assert_eq!(e.path, path, "{doc}: {e}");
        assert!(e.message.contains(words), "{doc}: {e}");
    }
}

#[test]
fn fixed_offsets_are_read_in_every_spelling() {
    for (text, minutes) in [
        ("+05:30", 330),
        ("UTC+05:30", 330),
        ("utc-03:00", -180),
        ("GMT+1", 60),
        ("-0", 0),
        ("+14:00", 840),
    ] {
        let p = policy(&format!("timezone: \"{text}\""));
        assert_eq!(
            p.rule_for(NONE).zone,
            Zone::Fixed(FixedOffset::east_opt(minutes * 60).unwrap()),
            "{text}"
        );
    }
    // An IANA name still wins: Etc/GMT+5 is five hours *behind* UTC.
    assert_eq!(
        policy("timezone: Etc/GMT+5").rule_for(NONE).zone.to_string(),
        "Etc/GMT+5"
    );
}

#[test]
fn extreme_instants_do_not_panic() {
    let docs = [
        "timezone: Europe/Berlin\nwindows: [{days: [sun], start: \"02:30\", end: \"01:00\", everyWeeks: 3, startDate: \"2026-01-01\"}]",
        "timezone: \"-12:00\"\nmonthly: [{week: last, day: sun, start: \"23:59\", duration: 7d}]\nblackouts: [{date: \"+262142-12-31\"}]",
        "timezone: \"+14:00\"\ncron: [{schedule: \"*/7 * L * *\", duration: 3d}]",
    ];
    let instants = [
        DateTime::<Utc>::MIN_UTC,
        DateTime::<Utc>::MAX_UTC,
        DateTime::<Utc>::MIN_UTC + chrono::Duration::days(1),
        DateTime::<Utc>::MAX_UTC - chrono::Duration::days(1),
        DateTime::<Utc>::MAX_UTC - chrono::Duration::days(HORIZON_DAYS as i64 + 3),
    ];
    for doc in docs {
        let p = policy(doc);
        for t in instants {
            let _ = p.is_open(NONE, t);
            let _ = p.next_transition(NONE, t);
            let _ = p.upcoming_windows(NONE, t, 3);
        }
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Keys of the schema (and near misses), for documents that are almost right.
    const KEYS: &[&str] = &[
        "version",
        "timezone",
        "windows",
        "monthly",
        "cron",
        "blackouts",
        "rules",
        "days",
        "start",
        "end",
        "everyWeeks",
        "startDate",
        "dayOfMonth",
        "week",
        "day",
        "duration",
        "schedule",
        "from",
        "to",
        "date",
        "name",
        "nodeSelector",
        "matchLabels",
        "matchExpressions",
        "key",
        "operator",
        "values",
        "concurrency",
        "lockGroup",
        "byLabel",
        "maxConcurrent",
        "strat",
    ];
    const VALUES: &[&str] = &[
        "1",
        "2",
        "0",
        "-1",
        "31",
        "99999999999999999999",
        "1.5",
        "true",
        "~",
        "mon",
        "sunday",
        "fifth",
        "last",
        "\"24:00\"",
        "\"25:00\"",
        "\"02:30\"",
        "\"00:00\"",
        "4h",
        "0s",
        "7d",
        "8d",
        "99999999999h",
        "\"2026-02-29\"",
        "\"2028-02-29\"",
        "\"+262142-12-31\"",
        "\"-262143-01-01\"",
        "Europe/Berlin",
        "\"+05:30\"",
        "UTC-18:00",
        "\"* * * * *\"",
        "\"0 2 * * 1-5\"",
        "\"0 0 L * *\"",
        "\"@daily\"",
        "\"0 0 * * 5#5\"",
        "In",
        "Exists",
        "\"\"",
        "\"\\u0000\"",
    ];

    fn yamlish() -> impl Strategy<Value = String> {
        let leaf = prop::sample::select(VALUES).prop_map(str::to_owned);
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..5).prop_map(|kv| {
                    let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("{{{}}}", body.join(", "))
                }),
            ]
        })
    }

    fn hhmm() -> impl Strategy<Value = String> {
        (0u32..24, prop::sample::select(vec![0u32, 15, 30, 45, 59]))
            .prop_map(|(h, m)| format!("\"{h:02}:{m:02}\""))
    }

    fn date() -> impl Strategy<Value = NaiveDate> {
        (0u64..(365 * 4)).prop_map(|d| NaiveDate::from_ymd_opt(2025, 1, 1).unwrap() + Days::new(d))
    }

    fn duration() -> impl Strategy<Value = String> {
        (1u32..(3 * 24 * 60)).prop_map(|m| format!("{m}m"))
    }

    /// One window of any kind, as a `(list key, flow mapping)` pair.
    fn window() -> impl Strategy<Value = (&'static str, String)> {
        let days = prop::sample::subsequence(vec!["mon", "tue", "wed", "thu", "fri", "sat", "sun"], 1..=7);
        let weekly = (
            days,
            hhmm(),
            prop_oneof![hhmm(), Just("\"24:00\"".to_owned())],
            1u32..4,
            date(),
        )
            .prop_filter("end differs from start", |(_, s, e, _, _)| s != e)
            .prop_map(|(days, s, e, every, from)| {
                let every = if every > 1 {
                    format!(", everyWeeks: {every}, startDate: \"{from}\"")
                } else {
                    String::new()
                };
                (
                    "windows",
                    format!("{{days: [{}], start: {s}, end: {e}{every}}}", days.join(", ")),
                )
            });
        let monthly = (1u32..=31, hhmm(), duration()).prop_map(|(d, s, dur)| {
            (
                "monthly",
                format!("{{dayOfMonth: {d}, start: {s}, duration: {dur}}}"),
            )
        });
        let nth = (
            prop::sample::select(vec!["first", "second", "third", "fourth", "last"]),
            prop::sample::select(vec!["mon", "sun", "wed"]),
            hhmm(),
            duration(),
        )
            .prop_map(|(w, d, s, dur)| {
                (
                    "monthly",
                    format!("{{week: {w}, day: {d}, start: {s}, duration: {dur}}}"),
                )
            });
        let cron = (
            prop::sample::select(vec![
                "0 2 * * 1-5",
                "30 2 * * *",
                "*/20 1-3 * * *",
                "0 0 L * *",
                "15 23 * * 6,0",
                "0 3 1,15 * *",
                "45 1 * 3,10 0",
            ]),
            duration(),
        )
            .prop_map(|(c, dur)| ("cron", format!("{{schedule: \"{c}\", duration: {dur}}}")));
        prop_oneof![weekly, monthly, nth, cron]
    }

    fn valid_policy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec![
                "UTC",
                "Europe/Berlin",
                "America/New_York",
                "Australia/Lord_Howe",
                "\"+05:30\"",
                "UTC-03:00",
            ]),
            prop::collection::vec(window(), 0..4),
            prop::collection::vec((date(), 0u64..20), 0..3),
        )
            .prop_map(|(tz, windows, blackouts)| {
                let mut doc = format!("timezone: {tz}\n");
                for key in ["windows", "monthly", "cron"] {
                    let items: Vec<&str> = windows
                        .iter()
                        .filter(|(k, _)| *k == key)
                        .map(|(_, v)| v.as_str())
                        .collect();
                    if !items.is_empty() {
                        doc += &format!("{key}: [{}]\n", items.join(", "));
                    }
                }
                if !blackouts.is_empty() {
                    let items: Vec<String> = blackouts
                        .iter()
                        .map(|(from, len)| {
                            format!("{{from: \"{from}\", to: \"{}\"}}", *from + Days::new(*len))
                        })
                        .collect();
                    doc += &format!("blackouts: [{}]\n", items.join(", "));
                }
                doc
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn parse_never_panics_on_any_string(s in any::<String>()) {
            let _ = Policy::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_yamlish_documents(
            doc in prop::collection::vec((prop::sample::select(KEYS), yamlish()), 0..6)
        ) {
            let text: String = doc.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
            let _ = Policy::parse(&text);
            let wrapped = format!("rules: [{{name: r, nodeSelector: {{}}, {}}}]", doc.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "));
            let _ = Policy::parse(&wrapped);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn next_transition_is_later_and_is_open_flips_there(
            doc in valid_policy(),
            secs in 1_735_689_600i64..1_861_920_000, // 2025-01-01 .. 2029-01-01
            frac in 0.0f64..1.0,
        ) {
            let p = Policy::parse(&doc).map_err(|e| TestCaseError::fail(format!("{e}\n{doc}")))?;
            let now = DateTime::from_timestamp(secs, 0).unwrap();
            let open = p.is_open(NONE, now);
            if let Some(next) = p.next_transition(NONE, now) {
                prop_assert!(next > now, "{doc}: {next} after {now}");
                prop_assert_ne!(p.is_open(NONE, next), open, "{}: no flip at {} (from {})", doc, next, now);
                let before = next - chrono::Duration::seconds(1);
                prop_assert_eq!(p.is_open(NONE, before), open, "{}: flip before {} (from {})", doc, next, now);
                let span = (next - now).num_seconds();
                let mid = now + chrono::Duration::seconds((span as f64 * frac) as i64);
                prop_assert_eq!(p.is_open(NONE, mid), open, "{}: flip at {} before {}", doc, mid, next);
            }
        }
    }
}

#[test]
fn percentage_budgets_parse_and_round_down() {
    let p = policy(
        "rules: [{name: a, nodeSelector: {}, concurrency: \"25%\"}, {name: b, nodeSelector: {}, concurrency: \" 100 % \"}]",
    );
    assert_eq!(p.rule_for(NONE).concurrency, Some(Budget::Percent(25)));
    assert_eq!(Budget::Percent(25).to_string(), "25%");
    assert!(Budget::Percent(25).needs_pool() && !Budget::Nodes(3).needs_pool());
    for (budget, pool, want) in [
        (Budget::Percent(25), 8, 2),
        (Budget::Percent(25), 11, 2),
        (Budget::Percent(25), 12, 3),
        (Budget::Percent(25), 3, 1),
        (Budget::Percent(25), 0, 1),
        (Budget::Percent(1), 5000, 50),
        (Budget::Percent(100), 7, 7),
        (Budget::Percent(50), usize::MAX, u32::MAX),
        (Budget::Nodes(3), 0, 3),
        (Budget::Nodes(3), 100, 3),
    ] {
        assert_eq!(slots(budget, pool), want, "{budget} of {pool}");
    }
}

#[test]
fn pools_are_the_nodes_sharing_slots() {
    let p = policy(RULES);
    let db = labels(&[("pool", "db"), ("tier", "app")]);
    let web = labels(&[("pool", "web"), ("tier", "app")]);
    let web2 = labels(&[("pool", "web"), ("tier", "app"), ("zone", "b")]);
    let batch = labels(&[("pool", "batch"), ("tier", "app")]);
    let other = labels(&[("pool", "gpu")]);
    // The server narrows by the rule's selector and the group's value; first-match is ours.
    assert_eq!(
        p.pool_selector(&web),
        "tier=app,pool in (db,web,batch),!frozen,pool=web"
    );
    assert_eq!(p.pool_selector(&db), "pool=db");
    assert_eq!(p.pool_selector(&other), "", "no rule: every Node");
    assert!(p.same_pool(&web, &web2));
    assert!(!p.same_pool(&web, &batch), "another lock group");
    assert!(!p.same_pool(&web, &db), "db is taken by the first rule");
    assert!(p.same_pool(&other, &labels(&[])), "both under the top level");
    let all = [&db, &web, &web2, &batch, &other];
    assert_eq!(p.pool_size(&web, all), 2);
    assert_eq!(p.pool_size(&db, all), 1);
    // Nodes without the group's label form one group; values the query cannot carry are
    // filtered by us instead.
    let g = policy(
        "rules: [{name: g, nodeSelector: {matchLabels: {\"odd key!\": x}}, lockGroup: {byLabel: pool}}]",
    );
    let odd = labels(&[("odd key!", "x")]);
    assert_eq!(g.pool_selector(&odd), "");
    let g = policy("rules: [{name: g, nodeSelector: {}, lockGroup: {byLabel: pool}}]");
    assert_eq!(g.pool_selector(&labels(&[])), "!pool");
    assert_eq!(g.pool_selector(&labels(&[("pool", "a")])), "pool=a");
}

#[test]
fn soak_is_a_duration_per_rule() {
    let p = policy(
        "rules: [{name: a, nodeSelector: {matchLabels: {role: db}}, soak: 10m}, {name: b, nodeSelector: {}, soak: 1h30m}]",
    );
    assert_eq!(
        p.rule_for(&labels(&[("role", "db")])).soak,
        Some(chrono::Duration::minutes(10))
    );
    assert_eq!(p.rule_for(NONE).soak, Some(chrono::Duration::minutes(90)));
    assert_eq!(
        policy("rules: [{name: a, nodeSelector: {}}]").rule_for(NONE).soak,
        None
    );
    assert_eq!(Policy::default().rule_for(NONE).soak, None);
}

#[test]
fn max_concurrent_caps_a_rule_across_its_groups() {
    let p = policy(
        "rules: [{name: a, nodeSelector: {}, concurrency: 1, lockGroup: {byLabel: pool, maxConcurrent: 3}}]",
    );
    assert_eq!(
        p.rule_for(&labels(&[("pool", "x")])).lock_group,
        Some(LockGroupView {
            label: "pool".into(),
            value: Some("x".into()),
            max_concurrent: Some(Budget::Nodes(3))
        })
    );
}

#[test]
fn max_concurrent_may_be_a_share_of_the_rules_nodes() {
    let p = policy(
        "rules:\n  - {name: db, nodeSelector: {matchLabels: {role: db}}, concurrency: 1, lockGroup: {byLabel: pool, maxConcurrent: \"50%\"}}\n  - {name: rest, nodeSelector: {}}\n",
    );
    let me = labels(&[("role", "db"), ("pool", "a")]);
    assert_eq!(
        p.rule_for(&me).lock_group.and_then(|g| g.max_concurrent),
        Some(Budget::Percent(50))
    );
    // The pool of the cap is the rule's nodes over every group, not the node's own group, and
    // not the nodes of another rule.
    let nodes = [
        labels(&[("role", "db"), ("pool", "a")]),
        labels(&[("role", "db"), ("pool", "a")]),
        labels(&[("role", "db"), ("pool", "b")]),
        labels(&[("role", "db")]),
        labels(&[("role", "web"), ("pool", "a")]),
    ];
    assert_eq!(p.rule_pool_size(&me, &nodes), 4);
    assert_eq!(p.pool_size(&me, &nodes), 2, "the group's own pool is smaller");
    assert_eq!(p.rule_pool_selector(&me), "role=db");
    // A node of the catch-all rule counts that rule's nodes: the web node.
    assert_eq!(p.rule_pool_size(&labels(&[]), &nodes), 1);
    // 50% of 4 is 2; of 3, rounded down, 1; never less than 1.
    assert_eq!(slots(Budget::Percent(50), 4), 2);
    assert_eq!(slots(Budget::Percent(50), 3), 1);
    assert_eq!(slots(Budget::Percent(50), 0), 1);
    for (bad, why) in [
        ("\"0%\"", "percentage from 1% to 100%"),
        ("\"101%\"", "percentage"),
        ("0", "whole number from 1"),
    ] {
        let e = Policy::parse(&format!(
            "rules: [{{name: a, nodeSelector: {{}}, lockGroup: {{byLabel: pool, maxConcurrent: {bad}}}}}]"
        ))
        .unwrap_err();
        assert_eq!(e.path, "rules[0].lockGroup.maxConcurrent", "{bad}");
        assert!(e.message.contains(why), "{bad}: {}", e.message);
    }
}

#[test]
fn health_gate_has_a_timeout_with_a_default() {
    let p = policy(
        "rules: [{name: a, nodeSelector: {matchLabels: {role: db}}, healthGate: {timeout: 90s}}, {name: b, nodeSelector: {}, healthGate: {}}]",
    );
    assert_eq!(
        p.rule_for(&labels(&[("role", "db")])).health_gate,
        Some(chrono::Duration::seconds(90))
    );
    assert_eq!(p.rule_for(NONE).health_gate, Some(chrono::Duration::minutes(10)));
    assert_eq!(Policy::default().rule_for(NONE).health_gate, None);
}

/// Issue 17: the policy under the wrong key of the ConfigMap: the error names the expected key
/// and the keys found, bounded however many and however long they are.
#[test]
fn the_document_under_the_wrong_key_names_the_expected_key_and_those_found() {
    use std::collections::BTreeMap;
    let data = BTreeMap::from([("config.yml".to_string(), "timezone: UTC".to_string())]);
    let e = document_in("kube-system/kreboot-config", Some(&data), &["policy.yaml"]).unwrap_err();
    assert_eq!(
        e,
        "ConfigMap kube-system/kreboot-config has no key \"config.yaml\" (keys found: \"config.yml\", \
         \"policy.yaml\" (binaryData)); the policy must be under \"config.yaml\""
    );
    assert!(
        document_in("ns/cm", None, &[])
            .unwrap_err()
            .contains("(it has no keys)")
    );
    let many: BTreeMap<String, String> = (0..50)
        .map(|i| (format!("k{i:02}{}", "x".repeat(500)), String::new()))
        .collect();
    let e = document_in("ns/cm", Some(&many), &[]).unwrap_err();
    assert!(e.contains("and 40 more") && e.len() < 2000, "{}", e.len());
    let good = BTreeMap::from([(CONFIG_KEY.to_string(), "timezone: UTC".to_string())]);
    assert_eq!(document_in("ns/cm", Some(&good), &[]), Ok("timezone: UTC"));
}

#[test]
fn health_gate_query_is_kept_per_rule_and_listed() {
    let p = policy(
        "rules:\n  - {name: a, nodeSelector: {matchLabels: {role: db}}, healthGate: {query: 'sum(rate(errors_total[5m])) > 1'}}\n  - {name: b, nodeSelector: {}, healthGate: {timeout: 2m}}\n",
    );
    let db = p.rule_for(&labels(&[("role", "db")]));
    assert_eq!(
        db.health_query.as_deref(),
        Some("sum(rate(errors_total[5m])) > 1")
    );
    // A query alone gets the default timeout: the gate is never without one.
    assert_eq!(db.health_gate, Some(chrono::Duration::minutes(10)));
    assert_eq!(p.rule_for(NONE).health_query, None);
    assert_eq!(p.gate_queries(), ["rules[0].healthGate.query"]);
    assert!(Policy::default().gate_queries().is_empty());
    let long = format!(
        "rules: [{{name: a, nodeSelector: {{}}, healthGate: {{query: '{}'}}}}]",
        "x".repeat(5000)
    );
    let e = Policy::parse(&long).unwrap_err();
    assert_eq!(e.path, "rules[0].healthGate.query");
}

/// `healthGate.disruptionBudgets`: on by default with a gate (the safe choice), off when asked,
/// never without a gate; anything but true or false is an error naming the key.
#[test]
fn health_gate_disruption_budgets_default_on_with_a_gate() {
    let p = policy(
        "rules:\n  - {name: a, nodeSelector: {matchLabels: {role: db}}, healthGate: {}}\n  - {name: b, nodeSelector: {matchLabels: {role: web}}, healthGate: {disruptionBudgets: false}}\n  - {name: c, nodeSelector: {matchLabels: {role: x}}, healthGate: {timeout: 1m, disruptionBudgets: true}}\n  - {name: d, nodeSelector: {}}\n",
    );
    assert!(p.rule_for(&labels(&[("role", "db")])).health_budgets);
    assert!(!p.rule_for(&labels(&[("role", "web")])).health_budgets);
    assert!(p.rule_for(&labels(&[("role", "x")])).health_budgets);
    assert!(!p.rule_for(NONE).health_budgets, "no gate, no budget check");
    assert!(!Policy::default().rule_for(NONE).health_budgets);
    for bad in ["yes please", "1", "\"\""] {
        let e = Policy::parse(&format!(
            "rules: [{{name: a, nodeSelector: {{}}, healthGate: {{disruptionBudgets: {bad}}}}}]"
        ))
        .unwrap_err();
        assert_eq!(e.path, "rules[0].healthGate.disruptionBudgets", "{bad}");
        assert!(e.message.contains("is not true or false"), "{bad}: {}", e.message);
    }
    let e = Policy::parse("rules: [{name: a, nodeSelector: {}, healthGate: {disruptionBudget: true}}]")
        .unwrap_err();
    assert!(
        e.path.starts_with("rules[0].healthGate"),
        "a typo is rejected: {e:?}"
    );
}

/// An empty key (`"": 1`, which the fuzzer finds now and then) is named, not an empty path.
#[test]
fn an_empty_key_is_named() {
    let e = Policy::parse("\"\": 1").unwrap_err();
    assert_eq!(e.path, "\"\"");
    assert!(e.message.contains("unknown field"), "{}", e.message);
    let e = Policy::parse("rules: [{\"\": 1}]").unwrap_err();
    assert_eq!(e.path, "rules[0].\"\"");
}
