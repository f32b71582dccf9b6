//! kreboot's test machinery, kept out of the binary that runs on nodes: the simulated cluster
//! (a Kubernetes-API-compatible server with simulated kubelets), the in-process fleet of agents,
//! the demo, the benchmark and the kubelet stand-in of the VM test.
//!
//! The product crate (`kreboot`) does not depend on this crate; its tests and this crate's
//! binaries (`kreboot-demo`, `kreboot-bench`, `kreboot-kubelet-sim`) do.
#![deny(unsafe_code)]

pub mod kubelet_sim;
pub mod kured_like;
pub mod procfs;
pub mod sim;
