//! The simulated cluster: a Kubernetes-API-compatible HTTP server with simulated kubelets.

pub mod demo;
