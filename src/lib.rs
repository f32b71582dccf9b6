//! kreboot: a Kubernetes node reboot daemon.
//!
//! Each module owns one concern. The decisions are plain functions over plain data
//! (see [`node::decide`]); the async shells around them only gather observations and
//! carry out actions, so that every decision is testable without I/O.
#![deny(unsafe_code)]

pub mod agent;
pub mod blockers;
pub mod cli;
pub mod connect;
pub mod drain;
pub mod drain_cli;
pub mod events;
pub mod health;
pub mod host;
pub mod lock;
pub mod metrics;
pub mod node;
pub mod notify;
pub mod pause;
pub mod policy;
pub mod policy_check;
pub mod reboot;
pub mod request;
pub mod sentinel;
pub mod status;
