//! The kured-like baseline the benchmarks measure kreboot against: a waiting node that reads
//! the lock once per period (kured's `--period`) and takes it when it finds it free.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, api::PostParams};

/// The Lease the pollers share.
pub const LOCK: &str = "kured-lock";

/// One waiting node: after `phase`, reads Lease [`LOCK`] through `api` every `period` and, when
/// it has no holder, names `identity` in a read-modify-write on the version read (a second taker
/// in the same moment gets 409); `taken` is notified when this poller's write wins. Runs until
/// aborted.
pub async fn poll_lock(
    api: Api<Lease>,
    identity: String,
    phase: Duration,
    period: Duration,
    taken: Arc<tokio::sync::Notify>,
) {
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let Ok(mut l) = api.get(LOCK).await else {
            continue;
        };
        let free = l
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_none_or(str::is_empty);
        if free {
            if let Some(s) = l.spec.as_mut() {
                s.holder_identity = Some(identity.clone());
            }
            if api.replace(LOCK, &PostParams::default(), &l).await.is_ok() {
                taken.notify_one();
            }
        }
    }
}
