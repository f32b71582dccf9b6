//! `kreboot drain` and `kreboot uncordon`: an operator cordons and drains whole nodes (e.g. an
//! old node pool during a migration), and undoes it.
//!
//! This module owns:
//! - choosing the nodes (names or a label selector), resolved before anything is changed;
//! - the operator's cordon record: `spec.unschedulable` plus `kreboot.io/drained-by:
//!   kreboot-cli` and `kreboot.io/drained-at`, never `kreboot.io/cordoned-by-kreboot=true`
//!   (that tells an agent it may uncordon; an operator's drain must not be undone by an agent).
//!   If an agent is mid-cycle on the node and cordoned it itself, the operator takes the cordon
//!   over (`cordoned-by-kreboot` becomes `"false"`), so the agent leaves it cordoned at the end;
//! - the order: every node is cordoned first (evicted pods must not land on a node about to be
//!   drained), then the nodes are drained one after another, so a PodDisruptionBudget covering
//!   pods on several nodes is honoured; the first failure stops the command;
//! - the progress display (stderr), the dry-run plan and the JSON report (stdout), the exit
//!   codes (0 all drained, 1 failed or timed out, 2 bad usage);
//! - `uncordon`'s refusal of a node kreboot's agent is in the middle of a cycle on
//!   (`kreboot.io/phase` present) unless `--force`.
//!
//! The drain itself is the agent's ([`crate::drain`]). The decisions (patches, plan, lines of
//! output) are pure functions; [`run_drain`] and [`run_uncordon`] are the I/O around them. Node
//! writes carry the `resourceVersion` they were decided on and are re-decided on a 409.

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, ResourceExt},
};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::{
    cli::{DrainArgs, NodeTargets, OutputFormat, UncordonArgs},
    drain::{self, DrainConfig, DrainProgress, Skip},
    node::{ANN_CORDONED_BY_KREBOOT, ANN_PHASE, format_time},
};

/// Who drained the node (an operator's `kreboot drain`).
pub const ANN_DRAINED_BY: &str = "kreboot.io/drained-by";
/// When the operator's drain cordoned the node (RFC 3339).
pub const ANN_DRAINED_AT: &str = "kreboot.io/drained-at";
/// The value of [`ANN_DRAINED_BY`] written by this command.
pub const DRAINED_BY_CLI: &str = "kreboot-cli";

/// Exit code of a failed or timed-out drain, a refused uncordon, or an API failure (bad
/// usage exits with 2, from clap).
const EXIT_FAILED: u8 = 1;
/// Attempts of a node write that keeps meeting 409 Conflict.
const CONFLICT_ATTEMPTS: usize = 5;

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

fn unschedulable(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
}

fn with_resource_version(mut patch: Value, node: &Node) -> Value {
    if let Some(rv) = &node.metadata.resource_version {
        patch["metadata"]["resourceVersion"] = json!(rv);
    }
    patch
}

/// The merge patch of an operator's cordon: unschedulable, recorded as `drained-by:
/// kreboot-cli`. An agent's own cordon (mid-cycle) is taken over, never claimed.
pub fn cordon_patch(node: &Node, now: DateTime<Utc>) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(ANN_DRAINED_BY.into(), json!(DRAINED_BY_CLI));
    annotations.insert(ANN_DRAINED_AT.into(), json!(format_time(now)));
    if annotation(node, ANN_CORDONED_BY_KREBOOT) == Some("true") {
        annotations.insert(ANN_CORDONED_BY_KREBOOT.into(), json!("false"));
    }
    with_resource_version(
        json!({ "metadata": { "annotations": annotations }, "spec": { "unschedulable": true } }),
        node,
    )
}

/// The merge patch of `kreboot uncordon`, or why the node is refused.
///
/// # Errors
/// The explanation, when kreboot's agent is in the middle of a cycle on the node and `force`
/// is not given.
pub fn uncordon_patch(node: &Node, force: bool) -> Result<Value, String> {
    if let Some(phase) = annotation(node, ANN_PHASE)
        && !force
    {
        return Err(format!(
            "kreboot's agent is in the middle of a reboot cycle on this node ({ANN_PHASE}={phase}); \
             it uncordons the node itself when the cycle ends (if it cordoned it). Pass --force to \
             uncordon anyway: pods may then be scheduled onto a node that is about to reboot"
        ));
    }
    Ok(with_resource_version(
        json!({
            "metadata": { "annotations": { ANN_DRAINED_BY: null, ANN_DRAINED_AT: null } },
            "spec": { "unschedulable": false },
        }),
        node,
    ))
}

/// Why a pod is left alone, for people.
pub fn skip_reason(skip: Skip) -> &'static str {
    match skip {
        Skip::DaemonSet => "DaemonSet pod",
        Skip::Mirror => "mirror pod (static, owned by the kubelet)",
        Skip::Finished => "finished (Succeeded or Failed)",
        Skip::Terminating => "already terminating (waited for)",
    }
}

/// A pod left alone, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedPod {
    /// namespace/name.
    pub pod: String,
    /// Why.
    pub reason: &'static str,
}

/// What a drain of one node would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodePlan {
    /// The node.
    pub node: String,
    /// Already cordoned.
    pub cordoned: bool,
    /// The phase of a reboot cycle kreboot's agent is in on this node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_phase: Option<String>,
    /// Pods that would be evicted (namespace/name).
    pub evict: Vec<String>,
    /// Pods left alone, and why (already terminating pods are waited for).
    pub skip: Vec<SkippedPod>,
}

fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

/// The plan of one node's drain, from the node and its pods (sorted by namespace/name).
pub fn plan_node(node: &Node, pods: &[Pod]) -> NodePlan {
    let mut evict = Vec::new();
    let mut skip = Vec::new();
    for pod in pods {
        match drain::classify(pod) {
            None => evict.push(pod_key(pod)),
            Some(s) => skip.push(SkippedPod {
                pod: pod_key(pod),
                reason: skip_reason(s),
            }),
        }
    }
    evict.sort();
    skip.sort_by(|a, b| a.pod.cmp(&b.pod));
    NodePlan {
        node: node.name_any(),
        cordoned: unschedulable(node),
        agent_phase: annotation(node, ANN_PHASE).map(str::to_owned),
        evict,
        skip,
    }
}

/// The dry-run plan as text.
pub fn format_plan(plans: &[NodePlan]) -> String {
    let mut out = String::from("dry run: nothing is changed\n");
    for p in plans {
        let mut state = vec![if p.cordoned {
            "already cordoned".to_owned()
        } else {
            "would be cordoned".to_owned()
        }];
        if let Some(phase) = &p.agent_phase {
            state.push(format!("kreboot agent in phase {phase}"));
        }
        out.push_str(&format!("node {} ({}):\n", p.node, state.join(", ")));
        if p.evict.is_empty() && p.skip.is_empty() {
            out.push_str("  no pods\n");
        }
        for pod in &p.evict {
            out.push_str(&format!("  evict  {pod}\n"));
        }
        for s in &p.skip {
            out.push_str(&format!("  skip   {} ({})\n", s.pod, s.reason));
        }
    }
    let evict: usize = plans.iter().map(|p| p.evict.len()).sum();
    let skip: usize = plans.iter().map(|p| p.skip.len()).sum();
    out.push_str(&format!(
        "would drain {} node(s) one after another: evict {evict} pod(s), skip {skip}\n",
        plans.len()
    ));
    out
}

/// One progress line (stderr) for a step of a drain.
pub fn progress_line(p: &DrainProgress) -> String {
    match p {
        DrainProgress::Started {
            node,
            evict,
            skipped,
            wait,
        } => {
            let terminating = wait.saturating_sub(*evict);
            let mut line = format!("draining {node}: {evict} pod(s) to evict, {skipped} skipped");
            if terminating > 0 {
                line.push_str(&format!(", {terminating} already terminating"));
            }
            line
        }
        DrainProgress::Evicted { pod } => format!("  evicted  {pod}"),
        DrainProgress::Retrying { pod, message } => {
            format!("  retrying {pod}: eviction refused: {message}")
        }
        DrainProgress::Gone { pod } => format!("  gone     {pod}"),
    }
}

/// How one node's drain ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeResult {
    /// The node.
    pub node: String,
    /// `drained`, `failed`, or `cordoned` (cordoned, not drained: an earlier node failed).
    pub status: &'static str,
    /// Pods evicted.
    pub evicted: usize,
    /// Pods left alone.
    pub skipped: usize,
    /// Eviction attempts refused and retried.
    pub retries: usize,
    /// Duration of the drain in seconds.
    pub seconds: f64,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Pods still on the node after a failure (namespace/name).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remaining: Vec<String>,
}

/// A readable message for an API error.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let hint = match s.code {
                401 => " (check the kubeconfig's credentials)",
                403 => " (the account lacks a permission; see Permissions in the README)",
                _ => "",
            };
            format!("{} ({} {}){hint}", s.message, s.code, s.reason)
        }
        kube::Error::Service(_) | kube::Error::HyperError(_) => {
            format!("{e} (is the API server in the kubeconfig reachable?)")
        }
        other => other.to_string(),
    }
}

pub(crate) async fn client() -> Result<Client, String> {
    let mut cfg = kube::Config::infer()
        .await
        .map_err(|e| format!("no Kubernetes configuration (in-cluster or KUBECONFIG): {e}"))?;
    // kreboot owns the retries of refused evictions: the client's own retry of 429 would make
    // --timeout meaningless.
    cfg.default_retry = false;
    crate::connect::client(cfg).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

/// The nodes named or selected, sorted by name; an error if one is missing or none match.
pub(crate) async fn resolve(api: &Api<Node>, targets: &NodeTargets) -> Result<Vec<Node>, String> {
    let mut nodes = match &targets.selector {
        Some(sel) => {
            let list = api
                .list(&ListParams::default().labels(sel))
                .await
                .map_err(|e| format!("cannot list nodes with selector {sel:?}: {}", describe(&e)))?;
            if list.items.is_empty() {
                return Err(format!("no node matches the selector {sel:?}"));
            }
            list.items
        }
        None => {
            let mut nodes = Vec::new();
            let mut missing = Vec::new();
            for name in &targets.nodes {
                match api.get_opt(name).await {
                    Ok(Some(n)) => nodes.push(n),
                    Ok(None) => missing.push(name.as_str()),
                    Err(e) => return Err(format!("cannot read node {name}: {}", describe(&e))),
                }
            }
            if !missing.is_empty() {
                return Err(format!("no such node: {}", missing.join(", ")));
            }
            nodes
        }
    };
    nodes.sort_by_key(|n| n.name_any());
    nodes.dedup_by_key(|n| n.name_any());
    Ok(nodes)
}

/// Reads the node, decides the patch and writes it with the resourceVersion it was decided on;
/// a 409 (the node changed meanwhile) means deciding again.
async fn patch_node(
    api: &Api<Node>,
    name: &str,
    decide: impl Fn(&Node) -> Result<Value, String>,
) -> Result<Node, String> {
    let mut last = String::new();
    for _ in 0..CONFLICT_ATTEMPTS {
        let node = api
            .get(name)
            .await
            .map_err(|e| format!("cannot read node {name}: {}", describe(&e)))?;
        let patch = decide(&node)?;
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(n) => return Ok(n),
            Err(kube::Error::Api(s)) if s.code == 409 => last = s.message.clone(),
            Err(e) => return Err(format!("cannot update node {name}: {}", describe(&e))),
        }
    }
    Err(format!("cannot update node {name}: it kept changing ({last})"))
}

async fn pods_on(client: &Client, node: &str) -> Result<Vec<Pod>, String> {
    let api: Api<Pod> = Api::all(client.clone());
    api.list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map(|l| l.items)
        .map_err(|e| format!("cannot list the pods on {node}: {}", describe(&e)))
}

fn print_json(v: &impl Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot format the report: {e}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// `kreboot drain`.
pub async fn run_drain(args: &DrainArgs) -> ExitCode {
    let client = match client().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let api: Api<Node> = Api::all(client.clone());
    let nodes = match resolve(&api, &args.targets).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            // A selector the API server rejects is bad usage too, but it cannot be told from
            // other API errors reliably; missing nodes and API failures are failures.
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if args.dry_run {
        return dry_run(&client, &nodes, args.output).await;
    }
    let names: Vec<String> = nodes.iter().map(ResourceExt::name_any).collect();
    let started = Instant::now();
    if !cordon_all(&api, &names).await {
        return ExitCode::from(EXIT_FAILED);
    }
    let cfg = DrainConfig {
        timeout: args.timeout,
        grace_period: (args.grace_period >= 0).then_some(args.grace_period),
        eviction_retry: args.eviction_retry,
    };
    let (results, failed) = drain_in_turn(&client, &names, &cfg).await;
    print_drain_summary(&results, failed, names.len(), started);
    match args.output {
        OutputFormat::Json => print_json(&json!({ "nodes": results, "drained": !failed })),
        OutputFormat::Text => {}
    }
    if failed {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

/// Cordons every node before any is drained; false (said on stderr) at the first failure.
async fn cordon_all(api: &Api<Node>, names: &[String]) -> bool {
    let now = Utc::now();
    for name in names {
        if let Err(e) = patch_node(api, name, |n| Ok(cordon_patch(n, now))).await {
            eprintln!("error: {e}");
            eprintln!(
                "nothing was drained; nodes cordoned so far stay cordoned (kreboot uncordon NODE undoes it)"
            );
            return false;
        }
        eprintln!("cordoned {name}");
    }
    true
}

/// Drains the nodes one after the other, stopping at the first that fails: those after it are
/// reported `cordoned`. Also says whether one failed.
async fn drain_in_turn(client: &Client, names: &[String], cfg: &DrainConfig) -> (Vec<NodeResult>, bool) {
    let mut results = Vec::new();
    let mut failed = false;
    for name in names {
        if failed {
            results.push(NodeResult {
                node: name.clone(),
                status: "cordoned",
                evicted: 0,
                skipped: 0,
                retries: 0,
                seconds: 0.0,
                error: None,
                remaining: Vec::new(),
            });
            continue;
        }
        let result = drain_one(client, name, cfg).await;
        failed = result.status != "drained";
        results.push(result);
    }
    (results, failed)
}

/// The closing lines on stderr: the nodes left undrained, and the totals.
fn print_drain_summary(results: &[NodeResult], failed: bool, nodes: usize, started: Instant) {
    let evicted: usize = results.iter().map(|r| r.evicted).sum();
    let skipped: usize = results.iter().map(|r| r.skipped).sum();
    let drained = results.iter().filter(|r| r.status == "drained").count();
    if failed {
        let not_drained: Vec<&str> = results
            .iter()
            .filter(|r| r.status == "cordoned")
            .map(|r| r.node.as_str())
            .collect();
        if !not_drained.is_empty() {
            eprintln!(
                "not drained (stopped at the failure; cordoned): {}",
                not_drained.join(", ")
            );
        }
        eprintln!(
            "FAILED: drained {drained} of {nodes} node(s): evicted {evicted}, skipped {skipped}, took {}",
            secs(started.elapsed())
        );
    } else {
        eprintln!(
            "done: drained {drained} node(s): evicted {evicted}, skipped {skipped}, took {}",
            secs(started.elapsed())
        );
    }
}

async fn drain_one(client: &Client, name: &str, cfg: &DrainConfig) -> NodeResult {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        let mut skipped = 0;
        while let Some(p) = rx.recv().await {
            if let DrainProgress::Started { skipped: s, .. } = &p {
                skipped = *s;
            }
            eprintln!("{}", progress_line(&p));
        }
        skipped
    });
    let started = Instant::now();
    let outcome = drain::drain_with_progress(client, name, cfg, &|| {}, Some(&tx)).await;
    drop(tx);
    let skipped = printer.await.unwrap_or(0);
    let took = started.elapsed();
    match outcome {
        Ok(report) => {
            eprintln!(
                "drained {name}: evicted {}, skipped {skipped}, took {}",
                report.evicted,
                secs(took)
            );
            NodeResult {
                node: name.to_owned(),
                status: "drained",
                evicted: report.evicted,
                skipped,
                retries: report.retries,
                seconds: took.as_secs_f64(),
                error: None,
                remaining: Vec::new(),
            }
        }
        Err(e) => {
            eprintln!("error: draining {name} failed: {e}");
            eprintln!("{name} stays cordoned (you asked for it; `kreboot uncordon {name}` undoes it)");
            let remaining = match pods_on(client, name).await {
                Ok(pods) => {
                    let (_, wait_for) = drain::plan(&pods);
                    wait_for.iter().map(|p| pod_key(p)).collect::<Vec<_>>()
                }
                Err(e) => {
                    eprintln!("{e}");
                    Vec::new()
                }
            };
            if remaining.is_empty() {
                eprintln!("left on {name}: no evictable pod");
            } else {
                eprintln!("left on {name}: {}", remaining.join(", "));
            }
            NodeResult {
                node: name.to_owned(),
                status: "failed",
                evicted: 0,
                skipped,
                retries: 0,
                seconds: took.as_secs_f64(),
                error: Some(e.to_string()),
                remaining,
            }
        }
    }
}

async fn dry_run(client: &Client, nodes: &[Node], output: OutputFormat) -> ExitCode {
    let mut plans = Vec::new();
    for node in nodes {
        match pods_on(client, &node.name_any()).await {
            Ok(pods) => plans.push(plan_node(node, &pods)),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    match output {
        OutputFormat::Text => print!("{}", format_plan(&plans)),
        OutputFormat::Json => print_json(&json!({ "dryRun": true, "nodes": plans })),
    }
    ExitCode::SUCCESS
}

/// `kreboot uncordon`.
pub async fn run_uncordon(args: &UncordonArgs) -> ExitCode {
    let client = match client().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let api: Api<Node> = Api::all(client);
    let nodes = match resolve(&api, &args.targets).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let mut ok = true;
    for node in &nodes {
        let name = node.name_any();
        match patch_node(&api, &name, |n| uncordon_patch(n, args.force)).await {
            Ok(_) => println!("uncordoned {name}"),
            Err(e) => {
                ok = false;
                eprintln!("error: not uncordoning {name}: {e}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::{
        api::core::v1::NodeSpec,
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
    };

    fn node(annotations: &[(&str, &str)], cordoned: bool) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                resource_version: Some("42".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(cordoned),
                ..NodeSpec::default()
            }),
            ..Node::default()
        }
    }

    fn pod(ns: &str, name: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    fn t() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn drain_cordon_is_the_operators_never_the_agents() {
        let p = cordon_patch(&node(&[], false), t());
        assert_eq!(p["spec"]["unschedulable"], true);
        assert_eq!(p["metadata"]["annotations"][ANN_DRAINED_BY], "kreboot-cli");
        assert_eq!(
            p["metadata"]["annotations"][ANN_DRAINED_AT],
            "2026-03-01T10:00:00Z"
        );
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        assert!(
            p["metadata"]["annotations"]
                .get(ANN_CORDONED_BY_KREBOOT)
                .is_none()
        );
        // An agent mid-cycle cordoned it: the operator takes the cordon over, so the agent
        // does not uncordon at the end of its cycle.
        let mid = node(
            &[(ANN_PHASE, "draining"), (ANN_CORDONED_BY_KREBOOT, "true")],
            true,
        );
        let p = cordon_patch(&mid, t());
        assert_eq!(p["metadata"]["annotations"][ANN_CORDONED_BY_KREBOOT], "false");
        let mut after = serde_json::to_value(&mid).unwrap();
        json_patch::merge(&mut after, &p);
        let after: Node = serde_json::from_value(after).unwrap();
        let recorded = crate::node::view(&after).recorded;
        assert!(!recorded.cordoned_by_kreboot);
        assert_eq!(recorded.phase, crate::node::Phase::Draining);
    }

    #[test]
    fn uncordon_refuses_a_node_mid_cycle_unless_forced() {
        let drained = node(&[(ANN_DRAINED_BY, "kreboot-cli"), (ANN_DRAINED_AT, "x")], true);
        let p = uncordon_patch(&drained, false).unwrap();
        assert_eq!(p["spec"]["unschedulable"], false);
        assert!(p["metadata"]["annotations"][ANN_DRAINED_BY].is_null());
        assert!(p["metadata"]["annotations"][ANN_DRAINED_AT].is_null());
        assert_eq!(p["metadata"]["resourceVersion"], "42");
        let mid = node(&[(ANN_PHASE, "rebooting")], true);
        let err = uncordon_patch(&mid, false).unwrap_err();
        assert!(
            err.contains("kreboot.io/phase=rebooting") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(
            uncordon_patch(&mid, true).unwrap()["spec"]["unschedulable"],
            false
        );
    }

    #[test]
    fn dry_run_plan_lists_evictions_and_skips_with_reasons() {
        let mut ds = pod("kube-system", "agent");
        ds.metadata.owner_references = Some(vec![OwnerReference {
            kind: "DaemonSet".into(),
            controller: Some(true),
            ..OwnerReference::default()
        }]);
        let pods = vec![pod("apps", "web-1"), ds, pod("apps", "web-0")];
        let plan = plan_node(&node(&[(ANN_PHASE, "draining")], true), &pods);
        assert_eq!(plan.evict, ["apps/web-0", "apps/web-1"]);
        assert_eq!(plan.skip.len(), 1);
        assert_eq!(plan.skip[0].reason, "DaemonSet pod");
        let text = format_plan(&[plan]);
        assert_eq!(
            text,
            "dry run: nothing is changed\n\
             node n1 (already cordoned, kreboot agent in phase draining):\n  \
             evict  apps/web-0\n  \
             evict  apps/web-1\n  \
             skip   kube-system/agent (DaemonSet pod)\n\
             would drain 1 node(s) one after another: evict 2 pod(s), skip 1\n"
        );
    }

    #[test]
    fn progress_lines() {
        let started = DrainProgress::Started {
            node: "n1".into(),
            evict: 2,
            wait: 3,
            skipped: 1,
        };
        assert_eq!(
            progress_line(&started),
            "draining n1: 2 pod(s) to evict, 1 skipped, 1 already terminating"
        );
        let retry = DrainProgress::Retrying {
            pod: "apps/web-0".into(),
            message: "Cannot evict pod".into(),
        };
        assert_eq!(
            progress_line(&retry),
            "  retrying apps/web-0: eviction refused: Cannot evict pod"
        );
    }
}
