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
    if multiplexed(&cfg) {
        return http2_client(cfg);
    }
    kube::Client::try_from(cfg)
}

/// Whether the client for `cfg` is built here to speak HTTP/2 (see [`http2_client`]): a TLS
/// server reached directly. Through a proxy, or with credentials from an exec plugin (whose
/// certificate kube-rs renews), kube-rs builds the client itself (HTTP/1.1).
fn multiplexed(cfg: &kube::Config) -> bool {
    cfg.cluster_url.scheme_str() == Some("https") && cfg.proxy_url.is_none() && cfg.auth_info.exec.is_none()
}

/// How often an HTTP/2 connection with nothing to read is pinged, and how long the answer may
/// take before the connection (and every request on it) is given up: client-go's values
/// (`ReadIdleTimeout` 30 s, `PingTimeout` 15 s). A connection to an API server that vanished
/// without a FIN (a node of the control plane lost, a load balancer's flow dropped) is found
/// within 45 s, instead of a watch waiting for its 290-s timeout on a dead socket.
const HTTP2_PING_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
const HTTP2_PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// The longest a request may wait for the start of its answer (the connection, TLS, and the
/// response's headers; a watch's events afterwards are not bounded by it). The pings find a
/// dead connection, not a live one on which an answer never comes, or a handshake that
/// stalls: without a bound, one such request would hold the agent silently (kube-rs' own
/// client bounds every socket read by its `read_timeout`, 295 s). kube-apiserver answers
/// 504 to a request it could not serve in its `--request-timeout` (60 s), so a bound a little
/// above that never cuts off an answer the server was still going to give. A shorter
/// `read_timeout` in the configuration wins.
pub const RESPONSE_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// A client that offers HTTP/2 (ALPN `h2`, then `http/1.1`), as client-go does: every request
/// and watch of the agent shares one connection to kube-apiserver instead of one connection
/// each. kube-rs 5 builds HTTP/1.1 only, where each open watch holds a connection of its own:
/// an engaged agent holds 4 to 6, which at 5,000 nodes is 20,000 to 30,000 TLS connections into
/// kube-apiserver (BENCHMARKS.md: 6,124 of its file descriptors with 1,000 agents). The layers
/// are kube-rs' own (base URI, retries when configured, authentication, extra headers), in its
/// order; kube-rs' request tracing spans (debug level) are left out.
fn http2_client(cfg: kube::Config) -> Result<kube::Client, kube::Error> {
    use kube::client::ConfigExt;
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(cfg.connect_timeout);
    let tls = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(cfg.rustls_client_config()?)
        .https_or_http();
    let tls = match cfg.tls_server_name.as_deref() {
        Some(name) => {
            let name = rustls_pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| kube::Error::Service(format!("invalid tls-server-name {name:?}: {e}").into()))?;
            tls.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => tls,
    };
    let connector = tls.enable_all_versions().wrap_connector(http);
    let transport = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .http2_keep_alive_interval(HTTP2_PING_EVERY)
        .http2_keep_alive_timeout(HTTP2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let answer_within = cfg
        .read_timeout
        .map_or(RESPONSE_START_TIMEOUT, |t| t.min(RESPONSE_START_TIMEOUT));
    let retry = cfg
        .default_retry
        .then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(cfg.base_uri_layer())
        .option_layer(retry)
        .option_layer(cfg.auth_layer()?)
        .layer(cfg.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .layer(tower::timeout::TimeoutLayer::new(answer_within))
        .service(transport);
    Ok(kube::Client::new(service, cfg.default_namespace))
}

/// Whether the configuration talks to its server without TLS.
fn plain_http(cfg: &kube::Config) -> bool {
    cfg.cluster_url.scheme_str() == Some("http")
}

/// Skew beyond which the agent warns (log, `ClockSkew` Event). The lock does not depend on
/// clocks agreeing (see `lock`), but maintenance windows, back-offs and the recorded times do.
pub const CLOCK_SKEW_WARN: chrono::Duration = chrono::Duration::seconds(30);

/// How long one probe of the API server may take.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often the clock is compared with the API server's once it answered.
pub const SKEW_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// This host's clock minus the server's, from an HTTP `Date` header (`sent` and `received`:
/// this host's clock around the request). The header has whole seconds, the server stamps
/// somewhere inside its second: compare with the middle of that second and of the round trip.
/// None when the header is not an HTTP date.
pub fn clock_skew(
    date_header: &str,
    sent: chrono::DateTime<chrono::Utc>,
    received: chrono::DateTime<chrono::Utc>,
) -> Option<chrono::Duration> {
    let server = chrono::DateTime::parse_from_rfc2822(date_header.trim()).ok()?;
    let server_mid = server.with_timezone(&chrono::Utc) + chrono::Duration::milliseconds(500);
    let local_mid = sent + (received - sent) / 2;
    Some(local_mid - server_mid)
}

/// Whether `skew` is worth telling the operator about.
pub fn skew_is_large(skew: chrono::Duration) -> bool {
    skew.abs() > CLOCK_SKEW_WARN
}

/// Asks the API server for `/version` and returns the clock skew its `Date` header shows
/// (None without a usable header). Any answer proves the server reachable.
///
/// # Errors
/// The request failed (no connection, TLS, a timeout).
pub async fn probe(
    client: &kube::Client,
    clock: crate::agent::Clock,
) -> Result<Option<chrono::Duration>, kube::Error> {
    let request = axum::http::Request::get("/version")
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
    let sent = clock.now();
    let response = client.send(request.map(kube::client::Body::from)).await?;
    let received = clock.now();
    Ok(response
        .headers()
        .get(axum::http::header::DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|d| clock_skew(d, sent, received)))
}

/// Waits until the API server answers, then reports ready and keeps an eye on the clock.
///
/// The agent's own loops retry the API on their own; this is what `/readyz` says: not ready
/// (HTTP 503) until the API server has answered once, so an agent pointed at an unreachable
/// server is visibly not working, while `/healthz` stays OK (the process is alive and
/// retrying: a liveness restart would not help and would crash-loop it). Retries back off
/// from 1 s to 30 s. After that the skew is measured every [`SKEW_CHECK_EVERY`]: the
/// `kreboot_clock_skew_seconds` gauge, and a log line and a `ClockSkew` Event when it is over
/// [`CLOCK_SKEW_WARN`] (once per crossing, not at every check).
pub async fn ready_when_reachable(
    client: kube::Client,
    clock: crate::agent::Clock,
    metrics: crate::metrics::Metrics,
    events: crate::events::Events,
    ready: tokio::sync::watch::Sender<bool>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut delay = std::time::Duration::from_secs(1);
    let mut warned = false;
    loop {
        // An address that drops packets would hold a request until the client's own timeouts
        // (minutes); the answer of a reachable server takes milliseconds.
        let answer = tokio::time::timeout(PROBE_TIMEOUT, probe(&client, clock)).await;
        match answer.unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer within {PROBE_TIMEOUT:?}").into(),
            ))
        }) {
            Ok(skew) => {
                if !*ready.borrow() {
                    tracing::info!("API server reachable; ready");
                    ready.send_replace(true);
                }
                if let Some(skew) = skew {
                    let secs = skew.num_milliseconds() as f64 / 1000.0;
                    metrics.clock_skew.with_label_values(&[metrics.node()]).set(secs);
                    let large = skew_is_large(skew);
                    if large && !warned {
                        let note = format!(
                            "this host's clock is {secs:+.1} s off the API server's (more than {} s): maintenance windows, back-offs and recorded times are read on this clock; the lock is not affected",
                            CLOCK_SKEW_WARN.num_seconds()
                        );
                        tracing::warn!(skew_seconds = secs, "{note}");
                        events.node(crate::events::Reason::ClockSkew, note);
                    } else if !large && warned {
                        tracing::info!(skew_seconds = secs, "clock skew back within bounds");
                    }
                    warned = large;
                }
                delay = SKEW_CHECK_EVERY;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "API server not reachable; not ready, retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        if !*ready.borrow() {
            delay = (delay * 2).min(std::time::Duration::from_secs(30));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    /// A server that accepts the connection and then never answers (a stalled relay, a hung
    /// TLS terminator): the request must fail within the configured bound, not wait forever.
    #[tokio::test]
    async fn a_server_that_never_answers_fails_the_request() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                open.push(socket);
            }
        });
        let mut cfg = kube::Config::new(format!("https://127.0.0.1:{port}").parse().unwrap());
        cfg.root_cert = Some(Vec::new());
        cfg.read_timeout = Some(std::time::Duration::from_millis(500));
        let client = client(cfg).unwrap();
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(20), client.apiserver_version()).await;
        held.abort();
        let error = answer
            .expect("the request was still waiting after 20 s")
            .expect_err("a server that never answers gave an answer");
        assert!(format!("{error:?}").contains("Elapsed"), "{error:?}");
    }

    #[test]
    fn skew_from_the_date_header() {
        let sent = t("2026-12-02T10:10:00.200Z");
        let received = t("2026-12-02T10:10:00.400Z");
        // The server's clock is 10 minutes behind this host's.
        let skew = clock_skew("Wed, 02 Dec 2026 10:00:00 GMT", sent, received).unwrap();
        assert_eq!(skew, chrono::Duration::milliseconds(599_800));
        assert!(skew_is_large(skew));
        assert!(skew_is_large(-skew), "behind counts as much as ahead");
        // In step (within the header's one-second resolution).
        let skew = clock_skew("Wed, 02 Dec 2026 10:10:00 GMT", sent, received).unwrap();
        assert!(skew.abs() < chrono::Duration::seconds(1), "{skew}");
        assert!(!skew_is_large(skew));
        assert_eq!(clock_skew("yesterday", sent, received), None);
        assert_eq!(clock_skew("", sent, received), None);
    }

    #[test]
    fn only_http_servers_are_plain() {
        let http = kube::Config::new("http://127.0.0.1:8080".parse().unwrap());
        let https = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        assert!(plain_http(&http));
        assert!(!plain_http(&https));
    }
}
