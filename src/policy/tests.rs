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
