//! Chaos against the **real** control plane (issue 17): kreboot agents rolling KWOK nodes on a
//! real etcd + kube-apiserver + kube-controller-manager while faults rain on every layer, with
//! the safety invariant checked on every watch event by an independent observer.
//!
//! What it proves: with concurrency 2 and sentinels set again and again, through every fault
//! below, (1) never more than 2 nodes are out of service at once (in a kreboot phase, cordoned
//! by anyone but the administrator, or not Ready), checked on **every Node event** of a watch,
//! not sampled between steps; (2) the node an administrator cordoned is never uncordoned; (3) every reboot request is
//! served by exactly one reboot; (4) at the end no node is in a cycle or cordoned by kreboot.
//!
//! Fault classes (every one is counted, and the test fails unless each happened):
//! - `proxy-*`: every agent talks to kube-apiserver through a TLS-terminating proxy in this test
//!   (it presents the control plane's own serving certificate, so the agents verify it as they
//!   would the server) that injects, per request: connection resets (the connection dropped
//!   without an answer), HTTP 500/502/503/504, HTTP 429 with `Retry-After`, latency (50–600 ms),
//!   and cuts watch streams mid-body after 1–8 s. These cheap faults make up the count.
//! - `apiserver-restart`: kube-apiserver SIGKILLed mid-cycle and started again with the same
//!   flags, ports and certificates; every watch is cut, and the fresh watch cache answers old
//!   resourceVersions with 410 Gone.
//! - `etcd-stop`: etcd SIGSTOPped for 2–5 s, then SIGCONT (requests hang, Lease renewals stall).
//! - `etcd-compaction`: etcd compacted at its current revision through its gRPC gateway
//!   (`/v3/kv/range` for the revision, `/v3/kv/compaction`), then every watch through the proxy
//!   cut. kube-apiserver runs with the watch cache off for Leases
//!   (`--watch-cache-sizes=leases.coordination.k8s.io#0`, a supported setting), so the agents'
//!   Lease watches resume straight from etcd and get 410 Gone ("too old resource version") on a
//!   compacted revision; with the cache on, compaction would never reach a client. The 410s are
//!   counted in the streams the proxy relays and on the observer's own watches, and the test
//!   fails if none was seen.
//! - `agent-kill`: an agent's task aborted at whatever await it is in (no clean-up runs, as with
//!   SIGKILL) at every step of the cycle (idle, pending, waiting, holding the lock, draining,
//!   rebooting, verifying; the step of each kill is printed) and started again 0–500 ms later.
//! - `stalled-holder`: a Lease holder's agent, for the lock TTL + 2 s, either stopped (then
//!   started afresh) or partitioned: the proxy holds its requests, answers and watch events, so
//!   it goes on afterwards from what it knew, its writes arriving late (alternately).
//!
//! The agents run in-process (`common::real_fleet::RealFleet`, the production `agent::run`, each
//! with its own kube client and connections), not as binaries: the test plays each machine (the
//! sentinel, the reboot, the new bootID) and counts reboots exactly per node, and it kills an
//! agent at any await point in microseconds, which makes hundreds of kills per run affordable on
//! two cores. The binary's own process handling is covered by tests/bad_input.rs and
//! tests/binary_cycle.rs.
//!
//! The observer runs on a thread and runtime of its own with its own client, straight to
//! kube-apiserver (no proxy): it re-watches (re-lists) after every error, counts the gaps, and
//! fails the test if its watches fail for 60 s in a row; at the end its view is compared with a
//! fresh list, so a watch that silently stopped cannot pass.
//!
//! Seeded: the seed is printed; `KREBOOT_CHAOS_REAL_SEED=<n>` replays the sequence of faults (the
//! interleaving of real processes still varies). `KREBOOT_CHAOS_REAL_FAULTS` sets the number of
//! faults (1,000 by default; the long run is
//! `KREBOOT_CHAOS_REAL_FAULTS=10000 cargo test --test chaos_real -- --nocapture`).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    backend::NS,
    real::{self, ADMIN_TOKEN, ControlPlane},
    real_fleet::{RealFleet, agent_token, bench_tokens, create_nodes},
};
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Frame, Incoming};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kreboot::{
    lock::{self, LOCK_LABEL},
    node::{ANN_CORDONED_BY_KREBOOT, ANN_PHASE, LABEL_WAITING},
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use rand::{RngExt, SeedableRng, rngs::StdRng};
use serde_json::json;
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

const CONCURRENCY: usize = 2;
const LOCK_TTL: Duration = Duration::from_secs(8);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Injected faults by class.
#[derive(Default)]
struct Counts(Mutex<BTreeMap<&'static str, u64>>);

impl Counts {
    fn add(&self, class: &'static str) {
        *self.0.lock().unwrap().entry(class).or_default() += 1;
    }
    fn get(&self, class: &str) -> u64 {
        self.0.lock().unwrap().get(class).copied().unwrap_or(0)
    }
    fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }
    fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().unwrap().clone()
    }
}

const PROXY_CLASSES: [&str; 5] = [
    "proxy-reset",
    "proxy-5xx",
    "proxy-429",
    "proxy-latency",
    "proxy-watch-cut",
];
const HEAVY_CLASSES: [&str; 4] = [
    "apiserver-restart",
    "etcd-stop",
    "etcd-compaction",
    "stalled-holder",
];

// ---------------------------------------------------------------------------------------------
// The fault-injecting proxy.

type Body = UnsyncBoxBody<Bytes, io::Error>;

struct Proxy {
    upstream: reqwest::Client,
    base: String,
    rng: Mutex<StdRng>,
    /// Faults are injected only while on (off in the calm phase at the end).
    on: AtomicBool,
    counts: Arc<Counts>,
    /// Bumped to cut every watch stream in flight at once.
    cut_all: tokio::sync::watch::Sender<u64>,
    /// `Authorization` values whose requests and watch events are held: a partitioned agent.
    held: tokio::sync::watch::Sender<BTreeSet<String>>,
    /// 410 Gone seen in an answer or inside a watch stream relayed to an agent.
    gone: AtomicU64,
    /// Requests relayed, and requests kube-apiserver could not be reached for.
    requests: AtomicU64,
    upstream_errors: AtomicU64,
}

enum Fault {
    None,
    Reset,
    Status(u16),
    TooMany,
    Latency(Duration),
}

fn status_body(code: u16, reason: &str) -> Body {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("injected by the chaos proxy: {code}"), "reason": reason, "code": code,
    });
    Full::new(Bytes::from(status.to_string()))
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn hop_by_hop(name: &hyper::header::HeaderName) -> bool {
    use hyper::header::*;
    [
        CONNECTION,
        TRANSFER_ENCODING,
        CONTENT_LENGTH,
        HOST,
        UPGRADE,
        TE,
        TRAILER,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

impl Proxy {
    /// The fault for one request (per mille: 40 resets, 40 5xx, 40 429, 80 latency) and, for a
    /// watch, when to cut it.
    fn draw(&self, watch: bool) -> (Fault, Option<Duration>) {
        if !self.on.load(Ordering::SeqCst) {
            return (Fault::None, None);
        }
        let mut rng = self.rng.lock().unwrap();
        let fault = match rng.random_range(0..1000) {
            0..40 => Fault::Reset,
            40..80 => Fault::Status([500, 502, 503, 504][rng.random_range(0..4)]),
            80..120 => Fault::TooMany,
            120..200 => Fault::Latency(Duration::from_millis(rng.random_range(50..600))),
            _ => Fault::None,
        };
        let cut = watch.then(|| Duration::from_millis(rng.random_range(1000..8000)));
        (fault, cut)
    }

    /// Waits while the requests of `auth` are held.
    async fn pass(&self, auth: &str) {
        let mut rx = self.held.subscribe();
        let _ = rx.wait_for(|h| !h.contains(auth)).await;
    }

    async fn handle(
        self: Arc<Self>,
        req: hyper::Request<Incoming>,
    ) -> Result<hyper::Response<Body>, io::Error> {
        let auth = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        self.pass(&auth).await;
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let watch = path.contains("watch=true") || path.contains("/watch/");
        let (fault, cut_after) = self.draw(watch);
        match fault {
            Fault::Reset => {
                self.counts.add("proxy-reset");
                // hyper closes the connection without an answer.
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "injected reset"));
            }
            Fault::Status(code) => {
                self.counts.add("proxy-5xx");
                let mut r = hyper::Response::new(status_body(code, "InternalError"));
                *r.status_mut() = hyper::StatusCode::from_u16(code).expect("status");
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                return Ok(r);
            }
            Fault::TooMany => {
                self.counts.add("proxy-429");
                let mut r = hyper::Response::new(status_body(429, "TooManyRequests"));
                *r.status_mut() = hyper::StatusCode::TOO_MANY_REQUESTS;
                r.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
                return Ok(r);
            }
            Fault::Latency(d) => {
                self.counts.add("proxy-latency");
                tokio::time::sleep(d).await;
            }
            Fault::None => {}
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
        let mut up = self
            .upstream
            .request(parts.method, format!("{}{path}", self.base));
        for (k, v) in &parts.headers {
            if !hop_by_hop(k) {
                up = up.header(k, v);
            }
        }
        let resp = match up.body(body).send().await {
            Ok(r) => r,
            Err(e) => {
                // kube-apiserver down (restarting) or etcd stopped: the agent sees its connection
                // dropped, as through a load balancer whose backend died.
                self.upstream_errors.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::other(e));
            }
        };
        // An answer that arrives while its agent is partitioned waits as well.
        self.pass(&auth).await;
        if resp.status().as_u16() == 410 {
            self.gone.fetch_add(1, Ordering::SeqCst);
        }
        let mut out = hyper::Response::builder().status(resp.status());
        for (k, v) in resp.headers() {
            if !hop_by_hop(k) {
                out = out.header(k, v);
            }
        }
        let deadline = cut_after.map(|d| tokio::time::Instant::now() + d);
        let cut = watch.then(|| self.cut_all.subscribe());
        let stream = futures::stream::unfold(
            Some((resp, self.clone(), cut, deadline, Vec::<u8>::new(), auth)),
            |state| async move {
                let (mut resp, proxy, mut cut, deadline, tail, auth) = state?;
                let until = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                let all = async {
                    match cut.as_mut() {
                        Some(rx) => {
                            let _ = rx.changed().await;
                        }
                        None => std::future::pending().await,
                    }
                };
                let chunk = tokio::select! {
                    c = resp.chunk() => c,
                    _ = until, if proxy.on.load(Ordering::SeqCst) => {
                        proxy.counts.add("proxy-watch-cut");
                        return Some((Err(io::Error::other("injected watch cut")), None));
                    }
                    _ = all => return Some((Err(io::Error::other("watch cut (compaction)")), None)),
                };
                match chunk {
                    Ok(Some(bytes)) => {
                        // A watch's ERROR event with a 410 (too old resource version); the tail
                        // of the previous chunk catches one split between two chunks.
                        let mut scan = tail;
                        scan.extend_from_slice(&bytes);
                        if find(&scan, b"\"code\":410") {
                            proxy.gone.fetch_add(1, Ordering::SeqCst);
                            scan.clear();
                        }
                        let keep = scan.len().saturating_sub(16);
                        let tail = scan.split_off(keep);
                        // A partitioned agent sees no events either.
                        proxy.pass(&auth).await;
                        let state = (resp, proxy, cut, deadline, tail, auth);
                        Some((Ok(Frame::data(bytes)), Some(state)))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(io::Error::other(e)), None)),
                }
            },
        );
        out.body(StreamBody::new(stream).boxed_unsync())
            .map_err(io::Error::other)
    }
}

/// Starts the proxy on a free port of 127.0.0.1 with the control plane's serving certificate;
/// returns it and its URL.
fn start_proxy(cp: &ControlPlane, seed: u64, counts: Arc<Counts>) -> (Arc<Proxy>, String) {
    let certs = CertificateDer::pem_file_iter(cp.dir.join("serving.crt"))
        .expect("serving.crt")
        .collect::<Result<Vec<_>, _>>()
        .expect("serving certificate");
    let key = PrivateKeyDer::from_pem_file(cp.dir.join("serving.key")).expect("serving.key");
    let mut tls =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("TLS server configuration");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let upstream = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cp.ca_pem.as_bytes()).expect("CA"))
        .no_proxy()
        .build()
        .expect("upstream client");
    let proxy = Arc::new(Proxy {
        upstream,
        base: cp.url.clone(),
        rng: Mutex::new(StdRng::seed_from_u64(seed ^ 0x5eed_f9a0_c5c5)),
        on: AtomicBool::new(true),
        counts,
        cut_all: tokio::sync::watch::channel(0).0,
        held: tokio::sync::watch::channel(BTreeSet::new()).0,
        gone: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        upstream_errors: AtomicU64::new(0),
    });
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy port");
    std_listener.set_nonblocking(true).expect("non-blocking");
    let port = std_listener.local_addr().expect("address").port();
    let listener = tokio::net::TcpListener::from_std(std_listener).expect("proxy listener");
    let p = proxy.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, p) = (acceptor.clone(), p.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| p.clone().handle(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (proxy, format!("https://127.0.0.1:{port}"))
}

// ---------------------------------------------------------------------------------------------
// The observer.

/// Out of service: in a kreboot phase, not Ready, or cordoned by anyone but the administrator.
/// Only `admin` is cordoned by the test, so any other cordon is kreboot's, whatever its
/// annotations say: a cordon kreboot forgot (its record cleared, the node left unschedulable)
/// counts, which the `cordoned-by-kreboot` annotation alone would miss.
fn is_out(n: &Node, admin: &str) -> bool {
    let v = kreboot::node::view(n);
    let ann = n.metadata.annotations.clone().unwrap_or_default();
    let kreboots_cordon = v.unschedulable
        && (n.name_any() != admin || ann.get(ANN_CORDONED_BY_KREBOOT).map(String::as_str) == Some("true"));
    ann.contains_key(ANN_PHASE) || !v.ready || kreboots_cordon
}

fn unschedulable(n: &Node) -> bool {
    n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false)
}

#[derive(Default)]
struct Seen {
    nodes: BTreeMap<String, Node>,
    /// Lock slot → holder.
    holders: BTreeMap<String, String>,
    violations: Vec<String>,
    events: u64,
    checks: u64,
    errors: u64,
    /// Errors after a success: the watch broke and was re-established.
    gaps: u64,
    relists: u64,
    /// 410 Gone on the observer's own watches.
    gone: u64,
    max_out: usize,
    /// The watches failed for 60 s in a row.
    failed: Option<String>,
}

struct Observer {
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Observer {
    fn start(config: kube::Config, admin_node: String) -> Observer {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("chaos-observer".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("observer runtime");
                rt.block_on(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = observe(config, admin_node, s.clone()) => {
                            s.lock().unwrap().failed = Some("the observer's watches ended".into());
                        }
                    }
                });
            })
            .expect("observer thread");
        Observer {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&self.seen.lock().unwrap())
    }

    fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Tracks one watch's errors: a streak of errors with no success for 60 s fails the test.
#[derive(Default)]
struct Streak {
    since: Option<Instant>,
    ok_before: bool,
}

impl Streak {
    fn ok(&mut self) {
        self.since = None;
        self.ok_before = true;
    }
    fn err(&mut self, s: &mut Seen, what: &str, e: &watcher::Error) {
        s.errors += 1;
        let text = format!("{e}");
        if text.contains("410") || text.contains("too old resource version") || text.contains("Expired") {
            s.gone += 1;
        }
        if self.ok_before {
            s.gaps += 1;
            self.ok_before = false;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > Duration::from_secs(60) && s.failed.is_none() {
            s.failed = Some(format!("the {what} watch failed for 60 s in a row: {text}"));
        }
    }
}

/// The invariant, on the observer's current view.
fn check(s: &mut Seen, admin: &str, why: &str) {
    s.checks += 1;
    let out: Vec<&String> = s
        .nodes
        .iter()
        .filter(|(_, n)| is_out(n, admin))
        .map(|(name, _)| name)
        .collect();
    s.max_out = s.max_out.max(out.len());
    if out.len() > CONCURRENCY {
        // Why each one is out, and who holds the slots, so that a failure can be diagnosed
        // from the message (the audit log has no bodies).
        let detail: Vec<String> = out
            .iter()
            .map(|name| {
                let n = &s.nodes[*name];
                let v = kreboot::node::view(n);
                let kreboot_ann: BTreeMap<&String, &String> = n
                    .annotations()
                    .iter()
                    .filter(|(k, _)| k.starts_with("kreboot.io/"))
                    .collect();
                format!(
                    "{name} (rv {}): ready {}, unschedulable {}, {kreboot_ann:?}",
                    n.resource_version().unwrap_or_default(),
                    v.ready,
                    v.unschedulable
                )
            })
            .collect();
        let v = format!(
            "{} nodes out at once after {why}: {out:?}\n    {}\n    slots: {:?}",
            out.len(),
            detail.join("\n    "),
            s.holders
        );
        s.violations.push(v);
    }
    if let Some(n) = s.nodes.get(admin)
        && !unschedulable(n)
    {
        let v = format!("the administrator's cordon on {admin} was lifted (after {why})");
        s.violations.push(v);
    }
}

async fn observe(config: kube::Config, admin: String, seen: Arc<Mutex<Seen>>) {
    let client = Client::try_from(config).expect("observer client");
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client, NS);
    let node_stream = watcher(nodes, watcher::Config::default()).default_backoff();
    let lease_stream = watcher(leases, watcher::Config::default().labels(LOCK_LABEL)).default_backoff();
    futures::pin_mut!(node_stream);
    futures::pin_mut!(lease_stream);
    let (mut node_streak, mut lease_streak) = (Streak::default(), Streak::default());
    // During a re-list the view mixes old and new objects: it is checked once the list is in.
    let mut listing = false;
    let mut relisted: BTreeMap<String, Node> = BTreeMap::new();
    loop {
        tokio::select! {
            ev = node_stream.next() => {
                let Some(ev) = ev else { return };
                let mut s = seen.lock().unwrap();
                s.events += 1;
                match ev {
                    Ok(watcher::Event::Init) => {
                        node_streak.ok();
                        s.relists += 1;
                        listing = true;
                        relisted.clear();
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        node_streak.ok();
                        relisted.insert(n.name_any(), n);
                    }
                    Ok(watcher::Event::InitDone) => {
                        node_streak.ok();
                        listing = false;
                        s.nodes = std::mem::take(&mut relisted);
                        check(&mut s, &admin, "a re-list");
                    }
                    Ok(watcher::Event::Apply(n)) => {
                        node_streak.ok();
                        let name = n.name_any();
                        s.nodes.insert(name.clone(), n);
                        if !listing {
                            check(&mut s, &admin, &format!("an event of {name}"));
                        }
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        node_streak.ok();
                        s.nodes.remove(&n.name_any());
                    }
                    Err(e) => node_streak.err(&mut s, "Node", &e),
                }
            }
            ev = lease_stream.next() => {
                let Some(ev) = ev else { return };
                let mut s = seen.lock().unwrap();
                s.events += 1;
                match ev {
                    Ok(watcher::Event::Init) => {
                        lease_streak.ok();
                        s.relists += 1;
                        s.holders.clear();
                    }
                    Ok(watcher::Event::InitApply(l) | watcher::Event::Apply(l)) => {
                        lease_streak.ok();
                        match lock::holder(&l) {
                            Some(h) => s.holders.insert(l.name_any(), h.to_owned()),
                            None => s.holders.remove(&l.name_any()),
                        };
                    }
                    Ok(watcher::Event::Delete(l)) => {
                        lease_streak.ok();
                        s.holders.remove(&l.name_any());
                    }
                    Ok(watcher::Event::InitDone) => lease_streak.ok(),
                    Err(e) => lease_streak.err(&mut s, "Lease", &e),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// etcd through its gRPC gateway.

/// Compacts etcd at its current revision; returns the revision.
async fn compact_etcd(http: &reqwest::Client, etcd: &str) -> Result<i64, String> {
    let range: serde_json::Value = http
        .post(format!("{etcd}/v3/kv/range"))
        .json(&json!({"key": "AA=="}))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let rev: i64 = range["header"]["revision"]
        .as_str()
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| format!("no revision in {range}"))?;
    let r = http
        .post(format!("{etcd}/v3/kv/compaction"))
        .json(&json!({"revision": rev.to_string(), "physical": true}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(rev)
    } else {
        Err(format!("compaction at {rev}: {status} {text}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The test.

/// Two application pods on `node` (evicted by its drain; made again before each request).
async fn add_pods(admin: &Client, node: &str, round: u32) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "apps");
    for i in 0..2 {
        let pod = json!({
            "metadata": { "name": format!("{node}-app-{round}-{i}"), "labels": {"app": "web"} },
            "spec": {
                "nodeName": node,
                "serviceAccountName": "default",
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 1,
                "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
                "tolerations": [{ "operator": "Exists" }],
            },
        });
        // The API may be down (a fault): the drain then has fewer pods, which is fine.
        let _ = pods
            .create(&PostParams::default(), &serde_json::from_value(pod).unwrap())
            .await;
    }
}

/// Which step of the cycle `node` is in, as the observer sees it.
fn step_of(o: &Observer, fleet: &RealFleet, node: &str) -> String {
    o.with(|s| {
        let n = s.nodes.get(node);
        if let Some(phase) = n.and_then(|n| n.annotations().get(ANN_PHASE).cloned()) {
            return phase;
        }
        if s.holders.values().any(|h| h == node) {
            return "holding".into();
        }
        if n.is_some_and(|n| n.labels().contains_key(LABEL_WAITING)) {
            return "waiting".into();
        }
        if fleet.reboot_required(node) {
            "pending".into()
        } else {
            "idle".into()
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_invariant_under_real_control_plane_chaos() {
    // Only a passing run leaves a summary.
    let _ = std::fs::remove_file(SUMMARY_FILE);
    let seed: u64 = env_or("KREBOOT_CHAOS_REAL_SEED", rand::random::<u64>() % 1_000_000);
    let target: u64 = env_or("KREBOOT_CHAOS_REAL_FAULTS", 1000);
    let nodes: usize = env_or("KREBOOT_CHAOS_REAL_NODES", 6);
    // Heavy faults of each class at least this often (more in a long run: one per interval).
    let heavy_min: u64 = env_or("KREBOOT_CHAOS_REAL_HEAVY", 2);
    let limit = Duration::from_secs(env_or("KREBOOT_CHAOS_REAL_SECONDS", 240 * target.div_ceil(1000)));
    eprintln!(
        "chaos_real: seed {seed}, {nodes} nodes, concurrency {CONCURRENCY}, at least {target} faults \
         (replay: KREBOOT_CHAOS_REAL_SEED={seed} cargo test --test chaos_real -- --nocapture)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let names = common::names(nodes);
    let mut cp = ControlPlane::start(real::Options {
        tokens: bench_tokens(&names),
        // Lease watches straight from etcd, so that a compaction reaches the agents (module doc).
        apiserver_flags: vec!["--watch-cache-sizes=leases.coordination.k8s.io#0".into()],
        ..real::Options::default()
    })
    .await;
    let admin = cp.admin_client();
    let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    for name in ["default", NS, "apps"] {
        let _ = ns
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await;
    }
    create_nodes(&admin, &names, 4).await;
    // An administrator cordoned this one: it may reboot, but must stay cordoned.
    let admin_node = names[1].clone();
    Api::<Node>::all(admin.clone())
        .patch(
            &admin_node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("the administrator's cordon");
    let mut round = 0;
    for n in &names {
        add_pods(&admin, n, round).await;
    }

    let counts = Arc::new(Counts::default());
    let (proxy, proxy_url) = start_proxy(&cp, seed, counts.clone());
    let observer = Observer::start(cp.config(ADMIN_TOKEN), admin_node.clone());
    let fleet = RealFleet::via(&cp, &proxy_url, &names, Duration::from_millis(500), |c| {
        c.concurrency = CONCURRENCY as u32;
        c.lock_ttl = LOCK_TTL;
        c.drain_timeout = Duration::from_secs(10);
        c.failure_backoff = Duration::from_secs(1);
        c.reboot_loop_backoff = Duration::from_millis(500);
        c.eviction_retry = Duration::from_millis(100);
    });
    fleet.start_all();

    let etcd_http = reqwest::Client::new();
    let mut requested: BTreeMap<String, u32> = names.iter().map(|n| (n.clone(), 0)).collect();
    let mut kill_steps: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut next_heavy = Instant::now() + Duration::from_secs(3);
    let mut next_report = Instant::now() + Duration::from_secs(15);
    let mut heavy_log = Vec::new();
    let mut gone_by: BTreeMap<&str, u64> = BTreeMap::new();
    let mut gone_before = 0;
    let mut last_heavy: Option<&str> = None;
    loop {
        let pick = names[rng.random_range(0..names.len())].clone();
        match rng.random_range(0..100) {
            0..30 => {
                // A new request only once the last one was served (one reboot per request).
                if fleet.reboots_of(&pick) == requested[&pick] && !fleet.reboot_required(&pick) {
                    round += 1;
                    add_pods(&admin, &pick, round).await;
                    *requested.get_mut(&pick).unwrap() += 1;
                    fleet.require_reboot(&pick);
                }
            }
            30..45 => {
                let step = step_of(&observer, &fleet, &pick);
                if fleet.kill(&pick) {
                    counts.add("agent-kill");
                    *kill_steps.entry(step).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
                fleet.start(&pick);
            }
            _ => tokio::time::sleep(Duration::from_millis(rng.random_range(50..250))).await,
        }

        if Instant::now() >= next_heavy {
            // The class done least so far (the seed breaks ties).
            let least = HEAVY_CLASSES.iter().map(|c| counts.get(c)).min().unwrap_or(0);
            let due: Vec<&str> = HEAVY_CLASSES
                .iter()
                .copied()
                .filter(|c| counts.get(c) == least)
                .collect();
            let class = due[rng.random_range(0..due.len())];
            let at = started.elapsed().as_secs_f64();
            // The 410s seen since the last heavy fault are that fault's doing (nothing else
            // makes a watch's resourceVersion too old within a run).
            let gone_now = proxy.gone.load(Ordering::SeqCst) + observer.with(|s| s.gone);
            if let Some(last) = last_heavy {
                *gone_by.entry(last).or_default() += gone_now - gone_before;
            }
            gone_before = gone_now;
            last_heavy = Some(class);
            match class {
                "apiserver-restart" => {
                    let down = cp.restart("kube-apiserver").await;
                    counts.add(class);
                    heavy_log.push(format!("{at:.0}s kube-apiserver restarted, down {down:.1?}"));
                }
                "etcd-stop" => {
                    let pause = Duration::from_millis(rng.random_range(2000..5000));
                    cp.signal("etcd", nix::sys::signal::Signal::SIGSTOP);
                    tokio::time::sleep(pause).await;
                    cp.signal("etcd", nix::sys::signal::Signal::SIGCONT);
                    counts.add(class);
                    heavy_log.push(format!("{at:.0}s etcd stopped for {pause:.1?}"));
                }
                "etcd-compaction" => match compact_etcd(&etcd_http, &cp.etcd_url).await {
                    Ok(rev) => {
                        proxy.cut_all.send_modify(|g| *g += 1);
                        counts.add(class);
                        heavy_log.push(format!("{at:.0}s etcd compacted at revision {rev}, watches cut"));
                    }
                    Err(e) => heavy_log.push(format!("{at:.0}s compaction failed: {e}")),
                },
                _ => {
                    // A holder that is not rebooting first: the slot of one that is out
                    // (draining, rebooting) must not be taken, that of one still in service may.
                    let running: Vec<String> = observer.with(|s| {
                        s.holders
                            .values()
                            .filter(|h| fleet.is_running(h))
                            .cloned()
                            .collect()
                    });
                    let holder = running
                        .iter()
                        .find(|h| step_of(&observer, &fleet, h) != "rebooting")
                        .or(running.first())
                        .cloned();
                    match holder {
                        Some(h) => {
                            let step = step_of(&observer, &fleet, &h);
                            let how = if counts.get(class) % 2 == 0 {
                                // Stopped: it starts afresh from what the API server records.
                                fleet.kill(&h);
                                tokio::time::sleep(LOCK_TTL + Duration::from_secs(2)).await;
                                fleet.start(&h);
                                "stopped"
                            } else {
                                // Partitioned: it keeps running on what it knew; its requests
                                // and watch events wait in the proxy and go on afterwards, late.
                                let auth = format!("Bearer {}", agent_token(&h));
                                proxy.held.send_modify(|held| {
                                    held.insert(auth.clone());
                                });
                                tokio::time::sleep(LOCK_TTL + Duration::from_secs(2)).await;
                                proxy.held.send_modify(|held| {
                                    held.remove(&auth);
                                });
                                "partitioned"
                            };
                            counts.add(class);
                            heavy_log.push(format!(
                                "{at:.0}s lock holder {h} ({step}) {how} for the TTL + 2 s"
                            ));
                        }
                        None => {
                            // Nobody holds a slot: ask for reboots and try again soon.
                            for n in names.iter().take(3) {
                                if fleet.reboots_of(n) == requested[n] && !fleet.reboot_required(n) {
                                    *requested.get_mut(n).unwrap() += 1;
                                    fleet.require_reboot(n);
                                }
                            }
                            next_heavy = Instant::now() + Duration::from_secs(2);
                            continue;
                        }
                    }
                }
            }
            eprintln!("chaos_real: {}", heavy_log.last().unwrap());
            next_heavy = Instant::now() + Duration::from_millis(rng.random_range(5000..10000));
        }

        if Instant::now() >= next_report {
            next_report = Instant::now() + Duration::from_secs(15);
            let (max_out, events) = observer.with(|s| (s.max_out, s.events));
            eprintln!(
                "chaos_real: {:.0}s: {} faults {:?}; {} reboots; {} requests relayed; observer: {events} events, max {max_out} out",
                started.elapsed().as_secs_f64(),
                counts.total(),
                counts.snapshot(),
                fleet.reboots(),
                proxy.requests.load(Ordering::Relaxed),
            );
        }

        // The observer checks every event; here its verdict is read (and its health).
        let violations = observer.with(|s| s.violations.clone());
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        assert!(observer.alive(), "seed {seed}: the observer stopped");
        if let Some(f) = observer.with(|s| s.failed.clone()) {
            panic!("seed {seed}: {f}");
        }

        let heavy_done = HEAVY_CLASSES.iter().all(|c| counts.get(c) >= heavy_min);
        if counts.total() >= target && heavy_done && requested.values().all(|r| *r >= 1) {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "seed {seed}: chaos did not reach {target} faults in {limit:?}: {:?}",
            counts.snapshot()
        );
    }
    let chaos_time = started.elapsed();
    if let Some(last) = last_heavy {
        let gone_now = proxy.gone.load(Ordering::SeqCst) + observer.with(|s| s.gone);
        *gone_by.entry(last).or_default() += gone_now - gone_before;
    }

    // Calm: no more faults; every request must be served and every node back in service.
    proxy.on.store(false, Ordering::SeqCst);
    fleet.start_all();
    let calm = Instant::now();
    loop {
        let served = names
            .iter()
            .all(|n| fleet.reboots_of(n) == requested[n] && !fleet.reboot_required(n));
        let settled = observer
            .with(|s| s.nodes.len() == names.len() && !s.nodes.values().any(|n| is_out(n, &admin_node)));
        if served && settled {
            break;
        }
        let violations = observer.with(|s| s.violations.clone());
        assert!(violations.is_empty(), "seed {seed}: {violations:#?}");
        if calm.elapsed() > Duration::from_secs(90) {
            let out: Vec<String> = observer.with(|s| {
                s.nodes
                    .iter()
                    .filter(|(_, n)| is_out(n, &admin_node))
                    .map(|(k, n)| format!("{k}: {:?}", n.annotations()))
                    .collect()
            });
            let reboots: BTreeMap<&String, u32> = names.iter().map(|n| (n, fleet.reboots_of(n))).collect();
            panic!(
                "seed {seed}: not settled 90 s after the faults stopped: requested {requested:?}, \
                 rebooted {reboots:?}, out {out:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The observer's view against a fresh list: a watch that silently stopped would differ.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = Api::<Node>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .expect("list Nodes");
    for n in &listed.items {
        let name = n.name_any();
        let ann = n.annotations();
        assert!(!ann.contains_key(ANN_PHASE), "seed {seed}: {name} left mid-cycle");
        if name == admin_node {
            assert!(
                unschedulable(n),
                "seed {seed}: the administrator's cordon was lifted"
            );
        } else {
            assert!(!unschedulable(n), "seed {seed}: {name} left cordoned");
        }
        let seen_rv = observer.with(|s| s.nodes.get(&name).map(|o| o.resource_version()));
        assert_eq!(
            seen_rv,
            Some(n.resource_version()),
            "seed {seed}: the observer's view of {name} is stale"
        );
    }
    for n in &names {
        assert_eq!(
            fleet.reboots_of(n),
            requested[n],
            "seed {seed}: {n} was not rebooted exactly once per request"
        );
    }
    let violations = observer.with(|s| s.violations.clone());
    assert!(violations.is_empty(), "seed {seed}: {violations:#?}");

    let snapshot = counts.snapshot();
    let (events, checks, errors, gaps, relists, seen_gone, max_out) =
        observer.with(|s| (s.events, s.checks, s.errors, s.gaps, s.relists, s.gone, s.max_out));
    let proxy_gone = proxy.gone.load(Ordering::SeqCst);
    let summary = format!(
        "chaos_real: seed {seed}: {} faults in {:.0}s of chaos ({:.0}s in all): {snapshot:?}\n  \
         agent kills by step: {kill_steps:?}\n  heavy: {heavy_log:#?}\n  \
         {} reboots for {} requests; at most {max_out} out at once (limit {CONCURRENCY})\n  \
         proxy: {} requests relayed, {} could not reach kube-apiserver, {proxy_gone} answers with 410 Gone\n  \
         observer: {events} events, {checks} invariant checks, {errors} watch errors, {gaps} gaps, \
         {relists} lists, {seen_gone} 410 Gone\n  410 Gone after each kind of heavy fault: {gone_by:?}",
        counts.total(),
        chaos_time.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        fleet.reboots(),
        requested.values().sum::<u32>(),
        proxy.requests.load(Ordering::Relaxed),
        proxy.upstream_errors.load(Ordering::Relaxed),
    );
    eprintln!("{summary}");
    for c in PROXY_CLASSES.iter().chain(&HEAVY_CLASSES).chain(&["agent-kill"]) {
        assert!(
            counts.get(c) > 0,
            "seed {seed}: no fault of class {c} was injected"
        );
    }
    assert!(
        counts.total() >= target,
        "seed {seed}: only {} faults",
        counts.total()
    );
    assert!(
        proxy_gone + seen_gone > 0,
        "seed {seed}: no 410 Gone was seen: the compactions and restarts did not reach a watch"
    );
    assert!(
        gone_by.get("etcd-compaction").copied().unwrap_or(0) > 0,
        "seed {seed}: no 410 Gone followed a compaction: the compaction fault did not happen \
         ({gone_by:?})"
    );
    let in_cycle: u64 = kill_steps
        .iter()
        .filter(|(k, _)| !["idle", "pending", "waiting"].contains(&k.as_str()))
        .map(|(_, v)| v)
        .sum();
    assert!(
        in_cycle > 0,
        "seed {seed}: no agent was killed inside a cycle: {kill_steps:?}"
    );
    drop(fleet);
    drop(observer);
    // A passing run leaves its seed and counts where scripts/test prints them (cargo test shows
    // a passing test's output to nobody).
    let _ = std::fs::write(SUMMARY_FILE, summary + "\n");
}

/// Where a passing run writes its seed and fault counts, for scripts/test to print.
const SUMMARY_FILE: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/chaos_real-summary.txt");
