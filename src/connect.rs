//! How every kreboot command connects to the API server: one place that turns a
//! [`kube::Config`] (kubeconfig or in-cluster) into a client.

/// Builds the client for `cfg`.
///
/// A plain `http://` server is reached without TLS, so it needs no trust store. kube-rs builds
/// its TLS settings even then, and with no CA in the configuration it asks the platform's
/// verifier for the system's roots, which fails in a root without any ("No CA certificates were
/// loaded from the system"): the image carries only its CA bundle, a distroless or scratch root
/// none. An empty set of roots of our own keeps it from asking; it is never used over http.
///
/// # Errors
/// What kube-rs reports (a bad client certificate or key, an unreadable CA).
pub fn client(mut cfg: kube::Config) -> Result<kube::Client, kube::Error> {
    if plain_http(&cfg) && cfg.root_cert.is_none() {
        cfg.root_cert = Some(Vec::new());
    }
    kube::Client::try_from(cfg)
}

/// Whether the configuration talks to its server without TLS.
fn plain_http(cfg: &kube::Config) -> bool {
    cfg.cluster_url.scheme_str() == Some("http")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_servers_are_plain() {
        let http = kube::Config::new("http://127.0.0.1:8080".parse().unwrap());
        let https = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(plain_http(&http));
        assert!(!plain_http(&https));
    }
}
