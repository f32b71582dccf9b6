//! `kreboot policy check`, run as a black box on files: a valid policy prints the rule, the
//! answer for `--at` and the next windows; an invalid one exits 2 naming the key path.

use std::process::Command;

fn check(doc: &str, args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, doc).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args(["policy", "check"])
        .arg(&file)
        .args(args)
        .output()
        .expect("kreboot runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const POLICY: &str = r#"
version: 1
timezone: Europe/Berlin
windows:
  - days: [sat]
    start: "01:00"
    end: "05:00"
blackouts:
  - date: "2026-12-24"
rules:
  - name: db
    nodeSelector:
      matchLabels: {agentpool: db}
    monthly:
      - week: last
        day: sunday
        start: "02:30"
        duration: 2h
    concurrency: 1
  - name: workers
    nodeSelector:
      matchExpressions:
        - {key: agentpool, operator: In, values: [web, batch]}
    cron:
      - schedule: "0 2 * * 1-5"
        duration: 2h
    concurrency: 2
    lockGroup: {byLabel: agentpool}
"#;

#[test]
fn valid_policy_shows_rule_answer_and_windows_in_both_zones() {
    let (code, out, err) = check(
        POLICY,
        &[
            "--labels",
            "agentpool=db,kubernetes.io/os=linux",
            "--at",
            "2026-03-01T00:00:00Z",
            "--count",
            "2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rule: db (rules[0])"), "{out}");
    assert!(out.contains("concurrency: 1"), "{out}");
    assert!(out.contains("reboot not allowed"), "{out}");
    // The last Sunday of March 2026 is the spring-forward day: 02:30 does not exist, 03:00 CEST.
    let windows: Vec<&str> = out.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(
        windows,
        [
            "  2026-03-29 03:00 CEST -> 2026-03-29 05:00 CEST | 2026-03-29T01:00:00Z -> 2026-03-29T03:00:00Z",
            "  2026-04-26 02:30 CEST -> 2026-04-26 04:30 CEST | 2026-04-26T00:30:00Z -> 2026-04-26T02:30:00Z",
        ],
        "{out}"
    );

    let (code, out, _) = check(
        POLICY,
        &[
            "--labels",
            "agentpool=web",
            "--at",
            "2026-11-27T01:30:00Z",
            "--count",
            "1",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule: workers (rules[1])"), "{out}");
    assert!(out.contains("lock group: agentpool=web\n"), "{out}");
    assert!(
        out.contains("reboot allowed; next change at 2026-11-27T03:00:00Z (2026-11-27 04:00 CET)"),
        "{out}"
    );
    // A window open at --at is shown from --at.
    assert!(
        out.contains(
            "  2026-11-27 02:30 CET -> 2026-11-27 04:00 CET | 2026-11-27T01:30:00Z -> 2026-11-27T03:00:00Z"
        ),
        "{out}"
    );

    let (code, out, _) = check(POLICY, &["--at", "2026-12-23T12:00:00Z", "--count", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule: none selects these labels"), "{out}");
    // Saturday 26 December (the 24th is a Thursday, so the blackout does not touch it).
    assert!(
        out.contains("2026-12-26T00:00:00Z -> 2026-12-26T04:00:00Z"),
        "{out}"
    );
}

/// Issue 17: the policy under the wrong key of the ConfigMap. `policy check` reads a ConfigMap
/// manifest as the agents read the ConfigMap, and names the expected key and the keys found.
#[test]
fn a_configmap_with_the_policy_under_the_wrong_key_names_both() {
    let indented: String = POLICY.lines().map(|l| format!("    {l}\n")).collect();
    let manifest = |key: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: kreboot-config\n  namespace: kube-system\ndata:\n  {key}: |\n{indented}  other: x\n"
        )
    };
    for wrong in ["config.yml", "policy.yaml"] {
        let (code, out, err) = check(&manifest(wrong), &[]);
        assert_eq!(code, 2, "{out}{err}");
        assert!(
            err.contains(&format!(
                "ConfigMap kube-system/kreboot-config has no key \"config.yaml\" (keys found: \"{wrong}\", \"other\"); the policy must be under \"config.yaml\""
            )) || err.contains(&format!(
                "ConfigMap kube-system/kreboot-config has no key \"config.yaml\" (keys found: \"other\", \"{wrong}\"); the policy must be under \"config.yaml\""
            )),
            "{err}"
        );
    }
    // Under the right key, the manifest is checked like the bare document.
    let (code, out, err) = check(&manifest("config.yaml"), &["--at", "2026-11-28T01:30:00Z"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, bare, _) = check(POLICY, &["--at", "2026-11-28T01:30:00Z"]);
    assert_eq!(out, bare);
    // A manifest with no data at all.
    let (code, _, err) = check("kind: ConfigMap\nmetadata: {name: kreboot-config}\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("(it has no keys)"), "{err}");
}

#[test]
fn invalid_policy_exits_2_naming_the_key() {
    let bad = POLICY.replace("week: last", "week: fifth");
    let (code, out, err) = check(&bad, &[]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("rules[0].monthly[0].week: \"fifth\" is not one of first, second, third, fourth, last"),
        "{err}"
    );
    let bad = POLICY.replace("\"0 2 * * 1-5\"", "\"0 2 * *\"");
    let (code, _, err) = check(&bad, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("rules[1].cron[0].schedule"), "{err}");
}

#[test]
fn bad_flags_are_usage_errors() {
    let (code, _, err) = check(POLICY, &["--at", "tomorrow"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--at"), "{err}");
    let (code, _, err) = check(POLICY, &["--labels", "agentpool"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("key=value"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args(["policy", "check", "/nonexistent/config.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn budgets_and_soak_are_summarised() {
    let doc = "rules:\n  - name: web\n    nodeSelector: {matchLabels: {role: web}}\n    concurrency: \"25%\"\n    soak: 10m\n  - name: pools\n    nodeSelector: {}\n    concurrency: \"50%\"\n    lockGroup: {byLabel: pool}\n";
    let (code, out, err) = check(doc, &["--labels", "role=web", "--count", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("concurrency: 25% of the rule's nodes (rounded down, at least 1)\n"),
        "{out}"
    );
    assert!(
        out.contains("soak: 10m between a release of one of the rule's slots and the next node's start\n"),
        "{out}"
    );
    let (code, out, _) = check(doc, &["--labels", "pool=a", "--count", "1"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("concurrency: 50% of the lock group's nodes (rounded down, at least 1)\n"),
        "{out}"
    );
    assert!(!out.contains("soak"), "{out}");
    let (code, out, _) = check(
        "rules: [{name: g, nodeSelector: {}, healthGate: {timeout: 15m}}]",
        &["--count", "1"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("health gate: after its reboot the node keeps its slot until it and its DaemonSet pods are Ready; after 15m the rollout stops\n"),
        "{out}"
    );
    assert!(
        out.contains("health gate budgets: the slot is also kept until every PodDisruptionBudget that selected a pod the drain evicted is as healthy as before the drain (and at least desiredHealthy)\n"),
        "the budget check is on by default with a gate: {out}"
    );
    let (code, out, _) = check(
        "rules: [{name: g, nodeSelector: {}, healthGate: {disruptionBudgets: false}}]",
        &["--count", "1"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("health gate budgets"), "switched off: {out}");
    let (code, out, _) = check(
        "rules: [{name: g, nodeSelector: {}, healthGate: {query: 'up == 0'}}]",
        &["--count", "1"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("health gate query: the slot is kept while `up == 0` returns any series"),
        "{out}"
    );
    let (code, _, err) = check(&doc.replace("\"25%\"", "\"25.5%\""), &["--labels", "role=web"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("rules[0].concurrency: \"25.5%\" is not a percentage from 1% to 100%"),
        "{err}"
    );
}
