//! `kreboot policy check`: validates a policy file offline and shows what it means for one node.
//! The report is a plain function of the document, the labels and the instant ([`report`]);
//! [`run`] only reads the file and prints.

use std::process::ExitCode;

use chrono::{DateTime, Utc};

use crate::{
    cli::{PolicyArgs, PolicyCheckArgs, PolicyCommand},
    policy::{Budget, HORIZON_DAYS, Labels, LockGroupView, Policy, PolicyError, RuleView, Zone},
};

/// Exit code of an invalid (or unreadable) policy file: the same as for bad usage.
const EXIT_INVALID: u8 = 2;

const LOCAL: &str = "%Y-%m-%d %H:%M %Z";
const UTC: &str = "%Y-%m-%dT%H:%M:%SZ";

fn both(zone: Zone, t: DateTime<Utc>) -> String {
    format!("{} ({})", t.format(UTC), zone.format(t, LOCAL))
}

/// What `policy check` prints for a valid `doc`.
///
/// # Errors
/// The [`PolicyError`] of an invalid document.
pub fn report(doc: &str, labels: &Labels, at: DateTime<Utc>, count: usize) -> Result<String, PolicyError> {
    let policy = Policy::parse(doc)?;
    let rule = policy.rule_for(labels);
    let zone = rule.zone;
    let mut out = String::from("policy is valid\n");
    match (&rule.name, rule.index) {
        (Some(name), Some(i)) => out += &format!("rule: {name} (rules[{i}])\n"),
        _ => out += "rule: none selects these labels: the top-level windows apply\n",
    }
    out += &format!("time zone: {zone}\n");
    if rule.name.is_some() {
        out += &rule_settings(&rule);
    }
    let open = policy.is_open(labels, at);
    out += &format!(
        "at {}: reboot {}",
        both(zone, at),
        if open { "allowed" } else { "not allowed" }
    );
    match policy.next_transition(labels, at) {
        Some(t) => out += &format!("; next change at {}\n", both(zone, t)),
        None => out += &format!("; no change within {HORIZON_DAYS} days\n"),
    }
    let windows = policy.upcoming_windows(labels, at, count);
    if windows.is_empty() {
        out += &format!("no window within {HORIZON_DAYS} days\n");
        return Ok(out);
    }
    out += &format!("upcoming windows (start -> end, {zone} | UTC):\n");
    out += &window_lines(zone, at, &windows);
    Ok(out)
}

/// The lines of a rule's settings: concurrency, soak, health gate, lock group.
fn rule_settings(rule: &RuleView) -> String {
    let mut out = String::new();
    match rule.concurrency {
        Some(b @ Budget::Percent(_)) => {
            let pool = if rule.lock_group.is_some() {
                "the lock group's nodes"
            } else {
                "the rule's nodes"
            };
            out += &format!("concurrency: {b} of {pool} (rounded down, at least 1)\n");
        }
        Some(n) => out += &format!("concurrency: {n}\n"),
        None => out += "concurrency: the agent's --concurrency\n",
    }
    if let Some(soak) = rule.soak.and_then(|d| d.to_std().ok()) {
        out += &format!(
            "soak: {} between a release of one of the rule's slots and the next node's start\n",
            humantime::format_duration(soak)
        );
    }
    if let Some(timeout) = rule.health_gate.and_then(|d| d.to_std().ok()) {
        out += &format!(
            "health gate: after its reboot the node keeps its slot until it and its DaemonSet pods are Ready; after {} the rollout stops\n",
            humantime::format_duration(timeout)
        );
    }
    if rule.health_budgets {
        out += "health gate budgets: the slot is also kept until every PodDisruptionBudget that selected a pod the drain evicted is as healthy as before the drain (and at least desiredHealthy)\n";
    }
    if let Some(q) = &rule.health_query {
        out += &format!(
            "health gate query: the slot is kept while `{q}` returns any series (asked of the agents' --prometheus-url; an agent without it rejects this policy)\n"
        );
    }
    if let Some(g) = &rule.lock_group {
        out += &lock_group_line(g);
    }
    out
}

/// The `lock group:` line.
fn lock_group_line(g: &LockGroupView) -> String {
    let value = g.value.as_deref().unwrap_or("(label absent)");
    let mut out = format!("lock group: {}={value}", g.label);
    match g.max_concurrent {
        Some(max @ Budget::Percent(_)) => {
            out += &format!(
                ", at most {max} of the rule's nodes (rounded down, at least 1) at once across the rule's groups"
            );
        }
        Some(max) => out += &format!(", at most {max} at once across the rule's groups"),
        None => {}
    }
    out += "\n";
    out
}

/// One line per upcoming window, in the zone and in UTC; a window still open at the horizon
/// says so instead of an end.
fn window_lines(zone: Zone, at: DateTime<Utc>, windows: &[(DateTime<Utc>, DateTime<Utc>)]) -> String {
    let mut out = String::new();
    let horizon = at.checked_add_signed(chrono::Duration::days(HORIZON_DAYS as i64));
    for &(start, end) in windows {
        let (local_end, utc_end) = if Some(end) == horizon {
            let open_end = format!("(still open after {HORIZON_DAYS} days)");
            (open_end.clone(), open_end)
        } else {
            (zone.format(end, LOCAL), end.format(UTC).to_string())
        };
        out += &format!(
            "  {} -> {local_end} | {} -> {utc_end}\n",
            zone.format(start, LOCAL),
            start.format(UTC),
        );
    }
    out
}

/// The policy text of a file given to `policy check`: the file itself, or, when it is a
/// ConfigMap manifest (`kubectl get configmap kreboot-config -o yaml > f`, a chart's
/// rendering), the document under its [`crate::policy::CONFIG_KEY`] key, as the agents read
/// it. A ConfigMap with the policy under another key (`config.yml`, `policy.yaml`) is the
/// error the agents report, naming the expected key and the keys found.
///
/// # Errors
/// The ConfigMap has no `config.yaml` key.
pub fn policy_text(doc: &str) -> Result<std::borrow::Cow<'_, str>, String> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        kind: Option<String>,
        #[serde(default)]
        metadata: Meta,
        data: Option<std::collections::BTreeMap<String, String>>,
        #[serde(rename = "binaryData")]
        binary_data: Option<std::collections::BTreeMap<String, String>>,
    }
    #[derive(serde::Deserialize, Default)]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
    }
    // Not a manifest (any policy, or text that is not YAML): the policy parser says what is
    // wrong with it.
    let Ok(m) = serde_saphyr::from_str::<Manifest>(doc) else {
        return Ok(doc.into());
    };
    if m.kind.as_deref() != Some("ConfigMap") {
        return Ok(doc.into());
    }
    let name = format!(
        "{}/{}",
        m.metadata.namespace.as_deref().unwrap_or("-"),
        m.metadata.name.as_deref().unwrap_or("-")
    );
    let binary: Vec<&str> = m
        .binary_data
        .iter()
        .flat_map(|d| d.keys())
        .map(String::as_str)
        .collect();
    crate::policy::document_in(&name, m.data.as_ref(), &binary).map(|d| d.to_owned().into())
}

/// Runs `kreboot policy ...`.
pub fn run(args: &PolicyArgs) -> ExitCode {
    match &args.command {
        PolicyCommand::Check(check) => run_check(check),
    }
}

fn run_check(args: &PolicyCheckArgs) -> ExitCode {
    let doc = match std::fs::read_to_string(&args.file) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.file.display());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let doc = match policy_text(&doc) {
        Ok(d) => d.into_owned(),
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let labels = args.labels.clone().unwrap_or_default();
    let at = args.at.unwrap_or_else(Utc::now);
    match report(&doc, &labels, at, args.count as usize) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", args.file.display());
            ExitCode::from(EXIT_INVALID)
        }
    }
}
