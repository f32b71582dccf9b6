//! Kubernetes Events on the Node for every lifecycle step, so `kubectl describe node` tells the
//! story.
//!
//! Events are published from a background task through a bounded queue: a slow or failing
//! events API never delays a drain or a reboot (a full queue drops the Event with a log line).
//! Events about a Node are created in namespace `default` (kube-rs's `Recorder` does this for
//! cluster-scoped objects), the only namespace besides `kube-system` the API server accepts them
//! in.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Declares [`Reason`] and [`Reason::ALL`] from one list of variants, so that no reason can be
/// added without being in `ALL`: the README check (tests/events.rs) walks `ALL`, and a reason it
/// missed would go undocumented unnoticed.
macro_rules! reasons {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$variant_meta:meta])* $variant:ident,)* }) => {
        $(#[$meta])*
        $vis enum $name {
            $($(#[$variant_meta])* $variant,)*
        }

        impl $name {
            /// Every reason, in the order declared.
            pub const ALL: &[$name] = &[$($name::$variant,)*];
        }
    };
}

reasons! {
    /// Stable Event reasons.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Reason {
        /// The sentinel appeared.
        RebootRequired,
        /// A reboot is needed but held back.
        RebootBlocked,
        /// A lock slot was taken.
        LockAcquired,
        /// kreboot cordoned the node.
        Cordoned,
        /// Eviction of the node's pods started.
        Draining,
        /// The drain failed or timed out.
        DrainFailed,
        /// The reboot is being requested.
        Rebooting,
        /// The reboot request failed.
        RebootFailed,
        /// The node came back and was made schedulable again.
        Uncordoned,
        /// The cycle finished after the reboot.
        RebootCompleted,
        /// The cycle was abandoned (window closed, sentinel gone, lock lost).
        CycleAborted,
        /// The policy ConfigMap was rejected.
        ConfigInvalid,
        /// The sentinel cannot be watched with inotify and is polled instead.
        SentinelPolling,
        /// The preflight failed: the agent cannot reach the host to reboot it (its namespaces or
        /// PID 1's signal refused), so it does not take the node out of service.
        HostAccessDenied,
        /// A reboot is needed but an operator paused reboots cluster-wide (`kreboot pause`).
        RebootsPaused,
        /// A rebooted node did not become healthy (Ready, DaemonSet pods Ready) within its rule's
        /// health gate timeout; it keeps its lock slot, so the rollout stops.
        HealthGateFailed,
        /// A `kreboot.io/` annotation on the Node could not be understood (hand-edited?); the
        /// message says how the agent reads it instead.
        BadAnnotation,
        /// This host's clock differs from the API server's by more than the threshold.
        ClockSkew,
    }
}

impl Reason {
    /// The reason string as it appears in the Event.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::RebootRequired => "RebootRequired",
            Reason::RebootBlocked => "RebootBlocked",
            Reason::LockAcquired => "LockAcquired",
            Reason::Cordoned => "Cordoned",
            Reason::Draining => "Draining",
            Reason::DrainFailed => "DrainFailed",
            Reason::Rebooting => "Rebooting",
            Reason::RebootFailed => "RebootFailed",
            Reason::Uncordoned => "Uncordoned",
            Reason::RebootCompleted => "RebootCompleted",
            Reason::CycleAborted => "CycleAborted",
            Reason::ConfigInvalid => "ConfigInvalid",
            Reason::SentinelPolling => "SentinelPolling",
            Reason::HostAccessDenied => "HostAccessDenied",
            Reason::RebootsPaused => "RebootsPaused",
            Reason::HealthGateFailed => "HealthGateFailed",
            Reason::BadAnnotation => "BadAnnotation",
            Reason::ClockSkew => "ClockSkew",
        }
    }

    fn warning(self) -> bool {
        matches!(
            self,
            Reason::DrainFailed
                | Reason::RebootFailed
                | Reason::CycleAborted
                | Reason::ConfigInvalid
                | Reason::SentinelPolling
                | Reason::HostAccessDenied
                | Reason::HealthGateFailed
                | Reason::BadAnnotation
                | Reason::ClockSkew
        )
    }
}

/// How many Events may wait to be published before new ones are dropped.
const QUEUE: usize = 64;

/// Publishes Events in the background.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<(Reason, String, ObjectReference)>,
    node_ref: ObjectReference,
    /// Events queued or being sent: [`Events::flush`] waits for this to reach zero, so a caller
    /// that stops the API server (the demo) does not cut the last Event off.
    pending: Arc<AtomicUsize>,
}

impl Events {
    /// Starts the publishing task for `node`.
    pub fn start(client: Client, node: &str, reporter_instance: Option<String>) -> Events {
        let (tx, mut rx) = mpsc::channel::<(Reason, String, ObjectReference)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "kreboot".into(),
                instance: reporter_instance,
            },
        );
        let pending = Arc::new(AtomicUsize::new(0));
        let sent = pending.clone();
        tokio::spawn(async move {
            while let Some((reason, note, reference)) = rx.recv().await {
                let ev = Event {
                    type_: if reason.warning() {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.as_str().into(),
                    note: Some(truncate(&note, 1000)),
                    action: reason.as_str().into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    warn!(reason = reason.as_str(), error = %e, "failed to publish event");
                }
                sent.fetch_sub(1, Ordering::AcqRel);
            }
        });
        Events {
            tx,
            node_ref: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.into()),
                ..ObjectReference::default()
            },
            pending,
        }
    }

    /// Waits until every queued Event was sent (or failed), at most `limit`. True when none is
    /// left. For a caller about to stop the API server the Events go to (the demo).
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::Acquire) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Queues an Event about the node.
    pub fn node(&self, reason: Reason, note: impl Into<String>) {
        self.send(reason, note.into(), self.node_ref.clone());
    }

    /// Queues an Event about another object (e.g. the policy ConfigMap).
    pub fn about(&self, reason: Reason, note: impl Into<String>, reference: ObjectReference) {
        self.send(reason, note.into(), reference);
    }

    fn send(&self, reason: Reason, note: String, reference: ObjectReference) {
        debug!(reason = reason.as_str(), %note, "event");
        // Counted before the send: the publisher may finish it before try_send returns.
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send((reason, note, reference)).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            warn!(reason = reason.as_str(), "event queue full, event dropped");
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary (the Events API limits notes to 1 kB).
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason has a string of its own: a copied `as_str` arm would make two reasons one
    /// in `kubectl describe node` and in the README check.
    #[test]
    fn every_reason_has_its_own_string() {
        let strings: std::collections::BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(strings.len(), Reason::ALL.len(), "two reasons share a string");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("ääää", 3), "ä…");
    }
}
