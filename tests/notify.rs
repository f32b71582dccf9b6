//! Operator notifications against a local HTTP receiver: the body each format gets, retries,
//! unreachable targets, a full queue, templates, flag validation, and the agent sending drain,
//! reboot and uncordon notices during a real cycle against the simulated cluster.

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    http::{HeaderMap, Method, StatusCode, Uri},
};
use common::{cluster, completed, kreboot_alone, wait_for};
use kreboot::{
    metrics::Metrics,
    notify::{Notifier, NotifyConfig, NotifyEvent, QUEUE, Template, parse_target},
};
use serde_json::{Value, json};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: Option<String>,
    content_type: String,
    body: Value,
}

/// A local HTTP server that records every request and answers with one fixed status.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Receiver {
    async fn start(status: u16) -> Receiver {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let status = StatusCode::from_u16(status).expect("valid status");
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let record = record.clone();
            async move {
                record.lock().unwrap().push(Seen {
                    method,
                    path: uri.path().to_owned(),
                    query: uri.query().map(str::to_owned),
                    content_type: headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned(),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                status
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, seen }
    }

    fn url(&self, prefix: &str, path: &str) -> String {
        format!("{prefix}http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn config(urls: &[String]) -> NotifyConfig {
    NotifyConfig {
        targets: urls.iter().map(|u| parse_target(u).expect("valid URL")).collect(),
        ..NotifyConfig::default()
    }
}

fn start(cfg: &NotifyConfig) -> (Notifier, Metrics) {
    let metrics = Metrics::new("n1");
    let notifier = Notifier::start(cfg, "n1", metrics.clone()).expect("notifier starts");
    assert!(notifier.enabled());
    (notifier, metrics)
}

fn count(m: &Metrics, kind: &str, result: &str) -> u64 {
    m.notifications.with_label_values(&[kind, result]).get()
}

const LIMIT: Duration = Duration::from_secs(15);

#[tokio::test]
async fn generic_webhook_body() {
    let r = Receiver::start(200).await;
    let (n, m) = start(&config(&[r.url("", "/hooks/kreboot")]));
    n.send(NotifyEvent::Drain, "linux-image-generic, openssl");
    wait_for(LIMIT, "sent", || count(&m, "webhook", "sent") == 1).await;
    let seen = r.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.method, Method::POST);
    assert_eq!(s.path, "/hooks/kreboot");
    assert_eq!(s.content_type, "application/json");
    let time = s.body["time"].as_str().expect("time is a string");
    let parsed = chrono::DateTime::parse_from_rfc3339(time).expect("time is RFC 3339");
    assert!(
        (chrono::Utc::now() - parsed.to_utc()).num_seconds().abs() < 60,
        "{time}"
    );
    assert_eq!(
        s.body,
        json!({
            "event": "drain",
            "node": "n1",
            "message": "Draining node n1",
            "time": time,
            "reason": "linux-image-generic, openssl",
        })
    );
    assert_eq!(count(&m, "webhook", "failed"), 0);
    assert!(n.flush(Duration::from_secs(1)).await);
}

#[tokio::test]
async fn slack_body_with_username_and_channel() {
    let r = Receiver::start(200).await;
    let (n, m) = start(&config(&[r.url(
        "slack+",
        "/services/T000/B000/XXXX?username=kreboot&channel=%23ops",
    )]));
    n.send(NotifyEvent::Reboot, "kernel");
    wait_for(LIMIT, "sent", || count(&m, "slack", "sent") == 1).await;
    let seen = r.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/services/T000/B000/XXXX");
    assert_eq!(seen[0].query, None, "username and channel go into the body");
    assert_eq!(seen[0].content_type, "application/json");
    assert_eq!(
        seen[0].body,
        json!({"text": "Rebooting node n1", "username": "kreboot", "channel": "#ops"})
    );
}

#[tokio::test]
async fn slack_body_plain() {
    let r = Receiver::start(200).await;
    let (n, m) = start(&config(&[r.url("slack+", "/s")]));
    n.send(NotifyEvent::Uncordon, "");
    wait_for(LIMIT, "sent", || count(&m, "slack", "sent") == 1).await;
    assert_eq!(r.seen()[0].body, json!({"text": "Node n1 rebooted and is back"}));
}

#[tokio::test]
async fn teams_adaptive_card_body() {
    let r = Receiver::start(200).await;
    let (n, m) = start(&config(&[r.url("teams+", "/workflows/abc")]));
    n.send(NotifyEvent::Reboot, "linux-image-generic");
    wait_for(LIMIT, "sent", || count(&m, "teams", "sent") == 1).await;
    let seen = r.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, "/workflows/abc");
    assert_eq!(seen[0].content_type, "application/json");
    assert_eq!(
        seen[0].body,
        json!({
            "type": "message",
            "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive",
                "contentUrl": null,
                "content": {
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard",
                    "version": "1.4",
                    "body": [
                        { "type": "TextBlock", "text": "Rebooting node n1", "wrap": true, "weight": "Bolder" },
                        { "type": "FactSet", "facts": [
                            { "title": "Node", "value": "n1" },
                            { "title": "Event", "value": "reboot" },
                            { "title": "Reason", "value": "linux-image-generic" },
                        ]},
                    ],
                },
            }],
        })
    );
}

#[tokio::test]
async fn every_target_gets_its_own_format() {
    let a = Receiver::start(200).await;
    let b = Receiver::start(200).await;
    let (n, m) = start(&config(&[a.url("webhook+", "/a"), b.url("slack+", "/b")]));
    n.send_detail(NotifyEvent::DrainFailed, "pkg", Some("drain timed out after 30m"));
    wait_for(LIMIT, "both sent", || {
        count(&m, "webhook", "sent") == 1 && count(&m, "slack", "sent") == 1
    })
    .await;
    assert_eq!(a.seen()[0].body["event"], "drain_failed");
    assert_eq!(
        a.seen()[0].body["message"],
        "Draining node n1 failed: drain timed out after 30m"
    );
    assert_eq!(
        b.seen()[0].body,
        json!({"text": "Draining node n1 failed: drain timed out after 30m"})
    );
}

#[tokio::test]
async fn server_error_is_retried_once_then_counted_as_failed() {
    let r = Receiver::start(500).await;
    let (n, m) = start(&config(&[r.url("", "/x")]));
    n.send(NotifyEvent::Drain, "");
    wait_for(LIMIT, "failed", || count(&m, "webhook", "failed") == 1).await;
    assert_eq!(r.seen().len(), 2, "one try and one retry");
    assert_eq!(count(&m, "webhook", "sent"), 0);
    // No third attempt arrives later.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(r.seen().len(), 2);
}

#[tokio::test]
async fn client_error_is_not_retried() {
    let r = Receiver::start(404).await;
    let (n, m) = start(&config(&[r.url("", "/x")]));
    n.send(NotifyEvent::Drain, "");
    wait_for(LIMIT, "failed", || count(&m, "webhook", "failed") == 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(r.seen().len(), 1);
}

#[tokio::test]
async fn unreachable_target_never_blocks_the_sender() {
    // A port that was just free: connections are refused.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (n, m) = start(&config(&[format!("http://127.0.0.1:{port}/hook")]));
    let started = Instant::now();
    n.send(NotifyEvent::Drain, "");
    n.send(NotifyEvent::Reboot, "");
    assert!(
        started.elapsed() < Duration::from_millis(50),
        "send returned after {:?}",
        started.elapsed()
    );
    // The runtime stays free for other work meanwhile.
    let tick = Instant::now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(tick.elapsed() < Duration::from_millis(500));
    wait_for(LIMIT, "both failed", || count(&m, "webhook", "failed") == 2).await;
    assert_eq!(count(&m, "webhook", "sent"), 0);
    assert!(n.flush(Duration::from_secs(1)).await, "nothing left queued");
    let text = m.render();
    assert!(
        text.contains("kreboot_notifications_total{result=\"failed\",target_kind=\"webhook\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    // A receiver that accepts connections and never answers: the first delivery hangs until
    // the request times out, so the queue fills.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let (n, m) = start(&config(&[format!("http://{addr}/")]));
    let started = Instant::now();
    // Single-threaded test runtime: the delivery task cannot take anything off the queue while
    // this loop runs, so exactly QUEUE fit.
    for _ in 0..QUEUE + 10 {
        n.send(NotifyEvent::Drain, "");
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(count(&m, "webhook", "dropped"), 10);
    assert!(
        !n.flush(Duration::from_millis(100)).await,
        "flush gives up after its limit"
    );
}

#[tokio::test]
async fn templates_are_substituted() {
    let r = Receiver::start(200).await;
    let mut cfg = config(&[r.url("", "/")]);
    cfg.drain = Template::parse("{node}: draining for {reason} {{ok}}").unwrap();
    cfg.reboot = Template::parse("Rebooting {node} now").unwrap();
    cfg.uncordon = Template::parse("{node} is back ({reason})").unwrap();
    let (n, m) = start(&cfg);
    n.send(NotifyEvent::Drain, "openssl");
    n.send(NotifyEvent::Reboot, "openssl");
    n.send(NotifyEvent::Uncordon, "openssl");
    wait_for(LIMIT, "three sent", || count(&m, "webhook", "sent") == 3).await;
    let messages: Vec<Value> = r.seen().iter().map(|s| s.body["message"].clone()).collect();
    assert_eq!(
        messages,
        [
            "n1: draining for openssl {ok}",
            "Rebooting n1 now",
            "n1 is back (openssl)"
        ]
    );
}

#[tokio::test]
async fn disabled_notifier_sends_nothing() {
    let n = Notifier::disabled();
    assert!(!n.enabled());
    n.send(NotifyEvent::Drain, "");
    assert!(n.flush(Duration::ZERO).await);
    let off = Notifier::start(&NotifyConfig::default(), "n1", Metrics::new("n1")).unwrap();
    assert!(!off.enabled(), "no targets: disabled");
}

#[test]
fn bad_urls_and_templates_are_rejected_at_start() {
    let out = kreboot_alone()
        .args([
            "agent",
            "--node-name",
            "n1",
            "--message-template-drain",
            "Draining {hostname}",
        ])
        .env(
            "KREBOOT_NOTIFY_URL",
            "https://ok.example.com/a,gopher://secret-token",
        )
        .env("KREBOOT_MESSAGE_TEMPLATE_REBOOT", "Rebooting {node")
        .output()
        .expect("kreboot runs");
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("--notify-url (number 2)"), "{text}");
    assert!(!text.contains("secret-token"), "URLs are not echoed: {text}");
    assert!(text.contains("--message-template-drain"), "{text}");
    assert!(text.contains("{hostname}"), "{text}");
    assert!(text.contains("--message-template-reboot"), "{text}");
    assert!(!text.contains("--message-template-uncordon"), "{text}");
}

/// The agent notifies drain, reboot and uncordon during a real cycle, with the reason the
/// sentinel gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_notifies_a_full_cycle() {
    let r = Receiver::start(200).await;
    let url = r.url("", "/cycle");
    let (sim, fleet) = cluster(1, move |c| c.notify = config(std::slice::from_ref(&url))).await;
    fleet.start_all();
    fleet.require_reboot("n0");
    wait_for(Duration::from_secs(30), "n0 completes its reboot", || {
        completed(&sim, "n0")
    })
    .await;
    wait_for(LIMIT, "the uncordon notice", || {
        r.seen().iter().any(|s| s.body["event"] == "uncordon")
    })
    .await;
    // A little longer: a second notice of any step would arrive by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = r.seen();
    // Exactly one of each, in order: a doubled notice is a bug operators see in their chat.
    let events: Vec<&str> = seen.iter().filter_map(|s| s.body["event"].as_str()).collect();
    assert_eq!(events, ["drain", "reboot", "uncordon"], "{seen:?}");
    for s in &seen {
        assert_eq!(s.body["node"], "n0");
        assert_eq!(s.body["reason"], "linux-image-generic");
    }
    assert_eq!(seen[0].body["message"], "Draining node n0");
}

#[test]
fn help_does_not_show_the_webhook_secret_from_the_environment() {
    let out = kreboot_alone()
        .args(["agent", "--help"])
        .env(
            "KREBOOT_NOTIFY_URL",
            "https://hooks.slack.com/services/T/B/SECRET",
        )
        .output()
        .expect("kreboot runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--notify-url"), "{text}");
    assert!(!text.contains("SECRET"), "{text}");
}
