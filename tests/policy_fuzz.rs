//! Issue 17: the policy (`config.yaml` of ConfigMap `kreboot-config`) as operators get it wrong.
//! Property tests over [`Policy::parse`]: arbitrary text and YAML-ish noise, and a complete valid
//! document with one value replaced by something wrong (a wrong type, an out-of-range or huge
//! number, a huge string, a bad duration, cron expression, date, time or timezone) or one unknown
//! key added. Never a panic (neither in the parser nor in using what it accepted), and every
//! error names the key path of what is wrong (`rules[0].windows[0].days[1]`), not just the file.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use kreboot::policy::Policy;
use proptest::prelude::*;
use serde_json::{Value, json};

/// Every key of the schema with a valid value.
fn base() -> Value {
    json!({
        "version": 1,
        "timezone": "Europe/Berlin",
        "windows": [{"days": ["mon", "tue"], "start": "22:00", "end": "04:00",
                     "everyWeeks": 2, "startDate": "2026-11-02"}],
        "monthly": [{"week": "last", "day": "sunday", "start": "02:30", "duration": "1h"},
                    {"dayOfMonth": 15, "start": "01:00", "duration": "90m"}],
        "cron": [{"schedule": "0 2 * * 1-5", "duration": "2h"}],
        "blackouts": [{"from": "2026-12-20", "to": "2027-01-05"}, {"date": "2026-12-31"}],
        "rules": [{
            "name": "db",
            "nodeSelector": {"matchLabels": {"pool": "db"},
                             "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
            "timezone": "UTC",
            "windows": [{"days": ["sat"], "start": "01:00", "end": "03:00"}],
            "cron": [{"schedule": "30 3 * * *", "duration": "30m"}],
            "blackouts": [{"date": "2026-12-24"}],
            "concurrency": "25%",
            "lockGroup": {"byLabel": "zone", "maxConcurrent": 2},
            "soak": "10m",
            "healthGate": {"timeout": "15m"}
        }, {
            "name": "web",
            "nodeSelector": {},
            "concurrency": 3
        }]
    })
}

/// Every value in `v` with its key path, in the parser's notation.
fn paths(v: &Value, here: String, out: &mut Vec<(String, bool)>) {
    match v {
        Value::Object(m) => {
            out.push((here.clone(), true));
            for (k, child) in m {
                let p = if here.is_empty() {
                    k.clone()
                } else {
                    format!("{here}.{k}")
                };
                paths(child, p, out);
            }
        }
        Value::Array(a) => {
            out.push((here.clone(), false));
            for (i, child) in a.iter().enumerate() {
                paths(child, format!("{here}[{i}]"), out);
            }
        }
        _ => out.push((here, false)),
    }
}

fn at<'a>(v: &'a mut Value, path: &str) -> &'a mut Value {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, idx) = match part.split_once('[') {
            Some((k, rest)) => (k, Some(rest)),
            None => (part, None),
        };
        cur = &mut cur[key];
        if let Some(rest) = idx {
            for i in rest.split('[') {
                cur = &mut cur[i.trim_end_matches(']').parse::<usize>().unwrap()];
            }
        }
    }
    cur
}

/// Wrong values an operator could write in place of a right one.
fn bad_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!(null)),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!(["a", {"b": 1}])),
        Just(json!({"nested": {"deeper": [1, 2]}})),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        Just(json!("")),
        Just(json!("x".repeat(100_000))),
        Just(json!("25:61")),
        Just(json!("24:00")),
        Just(json!("-1h")),
        Just(json!("9999999999999999999h")),
        Just(json!("1000000d")),
        Just(json!("0s")),
        Just(json!("1 2 3")),
        Just(json!("* * * * * * *")),
        Just(json!("61 25 32 13 8")),
        Just(json!("@reboot")),
        Just(json!("Mars/Olympus")),
        Just(json!("UTC+99:00")),
        Just(json!("../../etc/passwd")),
        Just(json!("2026-02-30")),
        Just(json!("+262143-12-31")),
        Just(json!("0000-01-01")),
        Just(json!("101%")),
        Just(json!("0%")),
        Just(json!("NaN")),
        Just(json!("funday")),
        Just(json!("NotIn")),
        // Printable text: YAML itself forbids control characters in a document, and one that
        // has them is refused as a whole (at `config.yaml`, with its line and column).
        "[ -~\u{a0}-\u{d7ff}]{0,40}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
    ]
}

fn check_error(doc: &str, err: &kreboot::policy::PolicyError, want_prefix: &str) {
    assert!(!err.path.is_empty(), "empty key path for {doc:.200}: {err}");
    assert!(!err.message.is_empty(), "empty message for {doc:.200}");
    assert!(
        err.path.starts_with(want_prefix),
        "error at {:?}, expected under {want_prefix:?}: {err}\ndocument: {doc:.300}",
        err.path
    );
    assert!(
        err.to_string().len() < 4096,
        "unbounded error message: {:.200}",
        err
    );
}

/// Uses an accepted policy the way the agent does, at a few instants, to find panics there.
fn exercise(p: &Policy) {
    let labels_sets = [
        BTreeMap::new(),
        BTreeMap::from([
            ("pool".to_string(), "db".to_string()),
            ("zone".to_string(), "a".to_string()),
        ]),
    ];
    let t0: DateTime<Utc> = "2026-03-29T00:30:00Z".parse().unwrap();
    for labels in &labels_sets {
        for t in [
            t0,
            t0 + Duration::days(200),
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
        ] {
            let _ = p.is_open(labels, t);
            let _ = p.next_transition(labels, t);
        }
        let _ = p.rule_for(labels);
        let _ = p.upcoming_windows(labels, t0, 3);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    /// Any text at all: a result, never a panic; an error always says where.
    #[test]
    fn arbitrary_text_never_panics(doc in prop_oneof![
        any::<String>(),
        "[a-z{}\\[\\]:,\"' \\n\\t0-9*%./-]{0,300}",
        "(timezone|windows|rules|cron|days|start|end|monthly|blackouts|name|soak|- |: |\\n  )*",
    ]) {
        match Policy::parse(&doc) {
            Ok(p) => exercise(&p),
            Err(e) => check_error(&doc, &e, ""),
        }
    }

    /// A valid document with one value replaced by a wrong one: the error is at that key (or
    /// its parent, for a check across siblings such as a blackout whose end is before its
    /// start), never just "config.yaml".
    #[test]
    fn one_wrong_value_is_reported_at_its_key(pick in any::<prop::sample::Index>(), bad in bad_value()) {
        let mut doc = base();
        let mut all = Vec::new();
        paths(&doc, String::new(), &mut all);
        all.retain(|(p, _)| !p.is_empty());
        let (path, _) = all[pick.index(all.len())].clone();
        *at(&mut doc, &path) = bad;
        let text = serde_json::to_string_pretty(&doc).unwrap();
        match Policy::parse(&text) {
            Ok(p) => exercise(&p),
            Err(e) => {
                // The parent of the replaced value (`rules[0].windows[0]` for
                // `rules[0].windows[0].start`; `rules[0]` for `rules[0].windows[0]`).
                let parent = match path.rfind(['.', '[']) {
                    Some(i) => &path[..i],
                    None => "",
                };
                check_error(&text, &e, parent);
                prop_assert_ne!(e.path.as_str(), "config.yaml", "{}", e);
            }
        }
    }

    /// An unknown key anywhere (a typo, a key from another tool) is named with its full path.
    #[test]
    fn an_unknown_key_is_named_with_its_path(pick in any::<prop::sample::Index>(), key in "[a-zA-Z][a-zA-Z0-9_]{0,20}") {
        let mut doc = base();
        let mut all = Vec::new();
        paths(&doc, String::new(), &mut all);
        // Maps whose keys are free (labels) take any key.
        all.retain(|(p, is_map)| *is_map && !p.ends_with("matchLabels"));
        let (path, _) = all[pick.index(all.len())].clone();
        let target = at(&mut doc, &path);
        prop_assume!(target.get(&key).is_none());
        target[&key] = json!("x");
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let e = Policy::parse(&text).expect_err("an unknown key is rejected");
        let want = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        prop_assert_eq!(&e.path, &want, "{}", e);
        prop_assert!(e.message.contains(&key), "{}", e);
    }
}

#[test]
fn the_base_document_is_valid() {
    let text = serde_json::to_string_pretty(&base()).unwrap();
    let p = Policy::parse(&text).unwrap_or_else(|e| panic!("{e}"));
    exercise(&p);
}
