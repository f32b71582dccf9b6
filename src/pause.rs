//! `kreboot pause` / `kreboot resume`: stop new reboots cluster-wide, and let them go on.
//!
//! **Where the pause lives.** An annotation [`ANN_PAUSED`] on the policy ConfigMap
//! (`kreboot-config` in the agents' namespace), holding `{"by", "at", "reason"}` as JSON. Every
//! agent that has a reboot to do (an *engaged* agent) already watches that ConfigMap by name
//! for its policy, so a pause reaches each of them through a watch event within a round trip:
//! no new watch, no polling, no new permission for the agents, and an idle agent still makes no
//! request (it reads the ConfigMap, pause included, on its first list when a reboot becomes
//! needed, before any decision). An annotation rather than a key in `data`: `config.yaml` is the
//! policy document people edit and check with `kreboot policy check`; a pause is an operator's
//! switch that must work even while that document is invalid, and must not be lost when someone
//! replaces the document (`kubectl apply` of the data keeps other annotations).
//!
//! **What a pause does** (decided in [`crate::node::decide`]): a node that holds no lock slot
//! never starts a cycle (it waits with reason `paused` and leaves the lock queue); a node that
//! already holds a slot and is draining or rebooting finishes its cycle, because abandoning a
//! half-drained node (uncordon, pods rescheduled back onto it) is riskier than letting a cycle
//! the policy allowed complete. A slot freed while paused is released, not handed on.
//!
//! Reading: an annotation that is not valid JSON still means *paused* (someone meant to pause;
//! the safe reading), with the problem shown.

use std::process::ExitCode;

use chrono::{DateTime, Utc};
use k8s_openapi::api::{authentication::v1::SelfSubjectReview, core::v1::ConfigMap};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{
    agent::CONFIG_KEY,
    cli::{PauseArgs, ResumeArgs},
    node::format_time,
};

/// The annotation on the policy ConfigMap that pauses reboots cluster-wide.
pub const ANN_PAUSED: &str = "kreboot.io/paused";

/// The policy document written when `kreboot pause` has to create the ConfigMap: it means what
/// a missing ConfigMap means (reboots at any time), so the pause changes nothing else.
pub const EMPTY_POLICY: &str = "# Created by `kreboot pause`: no windows, reboots allowed at any time (as without this\n# ConfigMap). Edit to add a policy; `kreboot resume` removes only the pause.\nversion: 1\n";

/// A pause as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Pause {
    /// Who paused (the API server's name for the operator's credentials).
    #[serde(default)]
    pub by: String,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_time")]
    pub at: Option<DateTime<Utc>>,
    /// Why, as the operator said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The annotation could not be read as a pause record (it still pauses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

mod opt_time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&crate::node::format_time(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        Ok(s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
            .map(|t| t.with_timezone(&Utc)))
    }
}

impl Pause {
    /// One line for people: `by alice at 2026-12-01T10:00:00Z: kernel regression`.
    pub fn describe(&self) -> String {
        let mut s = format!("by {}", if self.by.is_empty() { "unknown" } else { &self.by });
        if let Some(at) = self.at {
            s.push_str(&format!(" at {}", format_time(at)));
        }
        if let Some(r) = self.reason.as_deref().filter(|r| !r.is_empty()) {
            s.push_str(&format!(": {r}"));
        }
        if let Some(p) = &self.problem {
            s.push_str(&format!(" ({p})"));
        }
        s
    }
}

/// The pause recorded in `annotations` of the policy ConfigMap (None: not paused).
pub fn parse(annotations: Option<&std::collections::BTreeMap<String, String>>) -> Option<Pause> {
    let value = annotations?.get(ANN_PAUSED)?;
    Some(match serde_json::from_str::<Pause>(value) {
        Ok(p) => Pause { problem: None, ..p },
        Err(e) => Pause {
            problem: Some(format!(
                "{ANN_PAUSED} is not a pause record ({e}); taken as paused"
            )),
            ..Pause::default()
        },
    })
}

/// The pause of a ConfigMap (None: none, or no ConfigMap).
pub fn of_config_map(cm: Option<&ConfigMap>) -> Option<Pause> {
    parse(cm.and_then(|c| c.metadata.annotations.as_ref()))
}

/// The merge patch that records `pause` (Some) or removes it (None).
pub fn patch(pause: Option<&Pause>) -> Value {
    let value = pause.map(|p| serde_json::to_string(p).unwrap_or_default());
    json!({ "metadata": { "annotations": { ANN_PAUSED: value } } })
}

/// The ConfigMap `kreboot pause` creates when there is none: the empty policy and the pause.
pub fn new_config_map(name: &str, pause: &Pause) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(
                [(
                    ANN_PAUSED.to_owned(),
                    serde_json::to_string(pause).unwrap_or_default(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        data: Some([(CONFIG_KEY.to_owned(), EMPTY_POLICY.to_owned())].into()),
        ..Default::default()
    }
}

async fn client() -> Result<Client, String> {
    let mut config = kube::Config::infer().await.map_err(|e| {
        format!("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster): {e}")
    })?;
    // A one-shot command: fail in bounded time rather than hang on an unreachable server.
    config.connect_timeout = Some(std::time::Duration::from_secs(10));
    config.read_timeout = Some(std::time::Duration::from_secs(30));
    Client::try_from(config).map_err(|e| format!("cannot build the Kubernetes client: {e}"))
}

/// Who the operator is: the API server's own answer (SelfSubjectReview, allowed to every
/// authenticated user), else `$USER`, else `unknown`.
pub(crate) async fn whoami(client: &Client) -> String {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    if let Ok(r) = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        && let Some(name) = r.status.and_then(|s| s.user_info).and_then(|u| u.username)
        && !name.is_empty()
    {
        return name;
    }
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn api_error(what: &str, e: kube::Error) -> String {
    match &e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "cannot {what}: forbidden ({}); pause and resume need get, create and patch on configmaps in kreboot's namespace",
            s.message
        ),
        kube::Error::Api(s) => format!("cannot {what}: {} ({})", s.message, s.code),
        _ => format!("cannot {what}: {e}"),
    }
}

/// Runs `kreboot pause`: 0 when recorded, 1 (message on stderr) when the cluster could not be
/// written.
pub async fn run_pause(args: &PauseArgs) -> ExitCode {
    match pause(args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn pause(args: &PauseArgs) -> Result<String, String> {
    let client = client().await?;
    let (ns, name) = (args.target.namespace.as_str(), args.target.config_map.as_str());
    let p = Pause {
        by: match &args.by {
            Some(by) => by.clone(),
            None => whoami(&client).await,
        },
        at: Some(Utc::now()),
        reason: args.reason.clone().filter(|r| !r.trim().is_empty()),
        problem: None,
    };
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| api_error(&format!("read ConfigMap {ns}/{name}"), e))?;
    let before = of_config_map(existing.as_ref());
    match existing {
        Some(_) => {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch(Some(&p))))
                .await
                .map_err(|e| api_error(&format!("patch ConfigMap {ns}/{name}"), e))?;
        }
        None => {
            api.create(&PostParams::default(), &new_config_map(name, &p))
                .await
                .map_err(|e| api_error(&format!("create ConfigMap {ns}/{name}"), e))?;
        }
    }
    let was = before.map_or(String::new(), |b| {
        format!(" (it was already paused {}; replaced)", b.describe())
    });
    Ok(format!(
        "reboots paused {} (ConfigMap {ns}/{name}){was}: no node starts a reboot until `kreboot resume`; nodes already draining or rebooting finish their cycle",
        p.describe()
    ))
}

/// Runs `kreboot resume`: 0 when no pause is left (also when there was none), 1 on an API error.
pub async fn run_resume(args: &ResumeArgs) -> ExitCode {
    match resume(args).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn resume(args: &ResumeArgs) -> Result<String, String> {
    let client = client().await?;
    let (ns, name) = (args.target.namespace.as_str(), args.target.config_map.as_str());
    let api: Api<ConfigMap> = Api::namespaced(client, ns);
    let existing = api
        .get_opt(name)
        .await
        .map_err(|e| api_error(&format!("read ConfigMap {ns}/{name}"), e))?;
    let Some(before) = of_config_map(existing.as_ref()) else {
        return Ok(format!(
            "reboots were not paused (ConfigMap {ns}/{name}); nothing to do"
        ));
    };
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch(None)))
        .await
        .map_err(|e| api_error(&format!("patch ConfigMap {ns}/{name}"), e))?;
    Ok(format!(
        "reboots resumed (the pause {} is removed from ConfigMap {ns}/{name})",
        before.describe()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ann(v: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(ANN_PAUSED.to_owned(), v.to_owned())])
    }

    #[test]
    fn pause_round_trips_through_the_patch() {
        let p = Pause {
            by: "alice".into(),
            at: Some(
                DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
            reason: Some("kernel 6.8.0-50 regression".into()),
            problem: None,
        };
        let patch = patch(Some(&p));
        let value = patch["metadata"]["annotations"][ANN_PAUSED].as_str().unwrap();
        assert_eq!(parse(Some(&ann(value))), Some(p.clone()));
        assert_eq!(
            p.describe(),
            "by alice at 2026-12-01T10:00:00Z: kernel 6.8.0-50 regression"
        );
        assert_eq!(
            super::patch(None)["metadata"]["annotations"][ANN_PAUSED],
            Value::Null
        );
    }

    #[test]
    fn no_annotation_is_not_paused() {
        assert_eq!(parse(None), None);
        assert_eq!(parse(Some(&BTreeMap::new())), None);
        assert_eq!(of_config_map(None), None);
    }

    #[test]
    fn an_unreadable_pause_still_pauses() {
        for v in ["yes", "", "{\"by\": 3}"] {
            let p = parse(Some(&ann(v))).expect("paused");
            assert!(
                p.problem
                    .as_deref()
                    .is_some_and(|m| m.contains("taken as paused")),
                "{v:?}: {p:?}"
            );
            assert!(p.describe().starts_with("by unknown"), "{}", p.describe());
        }
        // Missing fields and a bad time are tolerated: the record is still a pause.
        let p = parse(Some(&ann(r#"{"at": "yesterday"}"#))).expect("paused");
        assert_eq!(p, Pause::default());
    }

    #[test]
    fn the_created_config_map_means_reboots_at_any_time() {
        let cm = new_config_map("kreboot-config", &Pause::default());
        let doc = &cm.data.as_ref().unwrap()[CONFIG_KEY];
        let policy = crate::policy::Policy::parse(doc).expect("the empty policy is valid");
        let now = Utc::now();
        assert!(policy.top_level_is_open(now));
        assert!(of_config_map(Some(&cm)).is_some());
    }
}
