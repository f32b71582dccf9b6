//! kreboot's test machinery, kept out of the binary that runs on nodes: the simulated cluster
//! (a Kubernetes-API-compatible server with simulated kubelets), the in-process fleet of agents,
//! the demo and the benchmark.
//!
//! The product crate (`kreboot`) does not depend on this crate; its tests and this crate's
//! binaries (`kreboot-demo`, `kreboot-bench`) do.
#![deny(unsafe_code)]

pub mod kured_like;
pub mod procfs;
pub mod sim;
