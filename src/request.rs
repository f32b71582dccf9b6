//! `kreboot reboot NODE... | --selector SEL`: ask for a reboot without the sentinel.
//!
//! The request is the Node annotation [`ANN_REBOOT_REQUESTED`] (`{"by", "at"}`), which the
//! node's agent treats exactly like the sentinel: the window, the lock, the blockers and the
//! PodDisruptionBudgets apply, and the request is removed with the cycle's other annotations
//! once the reboot completed (a new boot id). A failed or abandoned cycle keeps it, so the node
//! tries again after its back-off. `--cancel` withdraws a request that has not been served.
//!
//! The agent sees the request through its own Node: an engaged agent already watches it, and an
//! idle agent keeps one watch of its own Node for this (see `agent`).

use std::process::ExitCode;

use chrono::Utc;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api,
    api::{Patch, PatchParams, ResourceExt},
};
use serde_json::{Value, json};

use crate::{
    cli::RebootArgs,
    node::{ANN_REBOOT_REQUESTED, RebootRequest, format_time},
};

/// The merge patch that records `request` (Some) or withdraws it (None).
pub fn patch(request: Option<&RebootRequest>) -> Value {
    let value = request.map(|r| serde_json::to_string(r).unwrap_or_default());
    json!({ "metadata": { "annotations": { ANN_REBOOT_REQUESTED: value } } })
}

/// What the command says about one node, from what it found there.
pub fn outcome(name: &str, before: Option<&RebootRequest>, cancel: bool) -> String {
    match (cancel, before) {
        (false, None) => format!("{name}: reboot requested"),
        (false, Some(b)) => format!(
            "{name}: reboot requested (it was already {}; replaced)",
            b.describe()
        ),
        (true, Some(b)) => format!("{name}: request withdrawn (it was {})", b.describe()),
        (true, None) => format!("{name}: no reboot request to withdraw"),
    }
}

/// Runs `kreboot reboot`: 0 when every node carries (or, with `--cancel`, no longer carries) the
/// request; 1 when a node is missing or a write failed (the others are still done).
pub async fn run(args: &RebootArgs) -> ExitCode {
    let client = match crate::drain_cli::client().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let api: Api<Node> = Api::all(client.clone());
    let nodes = match crate::drain_cli::resolve(&api, &args.targets).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let request = RebootRequest {
        by: match &args.by {
            Some(by) => by.clone(),
            None => crate::pause::whoami(&client).await,
        },
        at: format_time(Utc::now()),
    };
    let mut failed = false;
    for n in &nodes {
        let name = n.name_any();
        let before = n
            .annotations()
            .get(ANN_REBOOT_REQUESTED)
            .and_then(|v| RebootRequest::parse(v));
        if args.cancel && before.is_none() {
            println!("{}", outcome(&name, None, true));
            continue;
        }
        let body = patch((!args.cancel).then_some(&request));
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => println!("{}", outcome(&name, before.as_ref(), args.cancel)),
            Err(e) => {
                eprintln!(
                    "error: {name}: cannot patch the node: {}",
                    crate::drain_cli::describe(&e)
                );
                failed = true;
            }
        }
    }
    if !args.cancel && !failed {
        eprintln!(
            "the agents reboot these nodes as for the sentinel: in a window, one lock slot at a time, PDBs respected; `kreboot status` follows them"
        );
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patch_round_trips_and_withdraws() {
        let r = RebootRequest {
            by: "alice".into(),
            at: "2026-12-01T10:00:00Z".into(),
        };
        let p = patch(Some(&r));
        let v = p["metadata"]["annotations"][ANN_REBOOT_REQUESTED]
            .as_str()
            .unwrap();
        assert_eq!(RebootRequest::parse(v), Some(r.clone()));
        assert_eq!(
            patch(None)["metadata"]["annotations"][ANN_REBOOT_REQUESTED],
            Value::Null
        );
        assert_eq!(outcome("n1", None, false), "n1: reboot requested");
        assert!(outcome("n1", Some(&r), false).contains("already requested by alice"));
        assert_eq!(outcome("n1", None, true), "n1: no reboot request to withdraw");
        assert!(outcome("n1", Some(&r), true).starts_with("n1: request withdrawn"));
    }
}
