//! Reboot policy: the `config.yaml` schema of ConfigMap `kreboot-config`, its validation,
//! and the window arithmetic (is a reboot allowed at instant `now` for a node with these labels,
//! and when does that answer next change).
//!
//! CONTRACT (used by the agent; keep these signatures):
//! - `Policy::default()` allows reboots at any time (a missing ConfigMap).
//! - `Policy::parse(yaml)` validates the whole document or fails with a precise error.
//! - `Policy::is_open(labels, now)` and `Policy::next_transition(labels, now)` are pure.
//! - `Policy::upcoming_windows(labels, now, n)` lists the next `n` open intervals.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

/// Labels of a Node, as used for per-pool policy rules.
pub type Labels = BTreeMap<String, String>;

/// A validated reboot policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {}

/// Why a `config.yaml` was rejected.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy at {path}: {message}")]
pub struct PolicyError {
    /// Key path of the offending value, e.g. `windows[0].start`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl Policy {
    /// Parses and validates a `config.yaml` document.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key path and the problem.
    pub fn parse(_yaml: &str) -> Result<Policy, PolicyError> {
        Ok(Policy::default())
    }

    /// Whether a node with `labels` may reboot at `now`.
    pub fn is_open(&self, _labels: &Labels, _now: DateTime<Utc>) -> bool {
        true
    }

    /// The next instant after `now` at which `is_open` may change, if any.
    pub fn next_transition(&self, _labels: &Labels, _now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        None
    }

    /// The next `n` open intervals `[start, end)` for a node with `labels`, from `now` on.
    pub fn upcoming_windows(
        &self,
        _labels: &Labels,
        _now: DateTime<Utc>,
        _n: usize,
    ) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        Vec::new()
    }
}
