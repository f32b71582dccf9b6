//! Operator notifications (chat or webhook messages) for the lifecycle steps an operator wants
//! to hear about: a node about to be drained, about to reboot, back after its reboot, and the
//! failure of a drain or a reboot. The counterpart of kured's `--notify-url`.
//!
//! This module owns the notification targets (`--notify-url`, parsed by [`parse_target`]), the
//! message templates (`--message-template-*`, parsed by [`Template::parse`]), the body each
//! target kind receives ([`body`]) and their delivery.
//!
//! # Which format a URL gets
//! Checked in this order:
//! 1. An explicit prefix picks the format and is removed: `slack+http(s)://…` (Slack),
//!    `teams+http(s)://…` (Microsoft Teams), `webhook+http(s)://…` (generic JSON).
//! 2. `slack://[username@]T000/B000/XXXX[?channel=…]` (kured's / shoutrrr's short form) is the
//!    Slack incoming webhook `https://hooks.slack.com/services/T000/B000/XXXX`.
//! 3. `http(s)://` URLs whose host is `hooks.slack.com` are Slack; hosts containing
//!    `webhook.office.com` or `logic.azure.com` (Teams connectors and Workflows) are Teams.
//! 4. Any other `http(s)://` URL gets the generic JSON body.
//!
//! For Slack targets the query parameters `username` and `channel` are taken out of the URL and
//! put into the message body. Any other scheme is rejected when the flags are validated.
//!
//! # Bodies (all `Content-Type: application/json`)
//! - Slack: `{"text": "…", "username": "…", "channel": "…"}` (the last two only when given).
//! - Teams: one Adaptive Card (version 1.4) in a message envelope, which both the Workflows
//!   webhooks (`logic.azure.com`) and the older connectors (`webhook.office.com`) accept:
//!   `{"type":"message","attachments":[{"contentType":"application/vnd.microsoft.card.adaptive",
//!   "contentUrl":null,"content":{"type":"AdaptiveCard","version":"1.4",…,"body":[TextBlock with
//!   the message, FactSet with node, event and reason]}}]}`.
//! - Generic: `{"event":"drain","node":"…","message":"…","time":"<RFC 3339>","reason":"…"}`.
//!
//! # Delivery
//! [`Notifier::send`] never waits: it puts the notice on a bounded queue ([`QUEUE`]; when full
//! the notice is dropped, logged and counted) and a background task delivers it to every target
//! at once, with a [`TIMEOUT`] per request and one retry after a 5xx answer, a timeout or a
//! connection error. Every outcome is counted in `kreboot_notifications_total{target_kind,
//! result}` (`sent`, `failed`, `dropped`); failures are logged without the URL (webhook URLs
//! carry secrets). [`Notifier::flush`] gives queued notices a bounded time on shutdown, so the
//! "rebooting" message leaves before the host goes down.

use std::{fmt, sync::Arc, time::Duration};

use chrono::{SecondsFormat, Utc};
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// How many notices may wait for delivery before new ones are dropped.
pub const QUEUE: usize = 32;

/// Bound of one HTTP request (connecting included).
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Pause before the one retry.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Default of `--message-template-drain`.
pub const DEFAULT_TEMPLATE_DRAIN: &str = "Draining node {node}";
/// Default of `--message-template-reboot`.
pub const DEFAULT_TEMPLATE_REBOOT: &str = "Rebooting node {node}";
/// Default of `--message-template-uncordon`.
pub const DEFAULT_TEMPLATE_UNCORDON: &str = "Node {node} rebooted and is back";

/// The lifecycle steps that are notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyEvent {
    /// The node is about to be drained.
    Drain,
    /// The node is about to reboot.
    Reboot,
    /// The node is back after its reboot (and uncordoned, unless someone else had cordoned it).
    Uncordon,
    /// The drain failed or timed out.
    DrainFailed,
    /// The reboot request failed, or the host did not go down.
    RebootFailed,
}

impl NotifyEvent {
    /// The `event` field of the generic body.
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::Drain => "drain",
            NotifyEvent::Reboot => "reboot",
            NotifyEvent::Uncordon => "uncordon",
            NotifyEvent::DrainFailed => "drain_failed",
            NotifyEvent::RebootFailed => "reboot_failed",
        }
    }
}

/// The body format of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// Slack incoming webhook.
    Slack,
    /// Microsoft Teams incoming webhook (Adaptive Card).
    Teams,
    /// Generic JSON webhook.
    Webhook,
}

impl TargetKind {
    /// The `target_kind` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Slack => "slack",
            TargetKind::Teams => "teams",
            TargetKind::Webhook => "webhook",
        }
    }
}

/// One place notices go to.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    /// Body format.
    pub kind: TargetKind,
    /// The URL posted to (prefix removed, Slack's `username` and `channel` taken out).
    pub url: Url,
    /// Slack: the name the message is posted as.
    pub username: Option<String>,
    /// Slack: the channel it is posted to.
    pub channel: Option<String>,
}

impl Target {
    /// Scheme and host only: webhook URLs carry their secret in the path.
    pub fn redacted(&self) -> String {
        format!(
            "{} {}://{}",
            self.kind.as_str(),
            self.url.scheme(),
            self.url.host_str().unwrap_or("")
        )
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({})", self.redacted())
    }
}

/// What a `--notify-url` that could not be parsed looks like in an error: the scheme only.
fn redact_raw(raw: &str) -> String {
    match raw.split_once("://") {
        Some((scheme, _)) => format!("{scheme}://…"),
        None => "…".to_owned(),
    }
}

/// Parses one `--notify-url` (see the module documentation for the rules).
///
/// # Errors
/// A message (without the URL's secret parts) when the URL is malformed or its scheme unknown.
pub fn parse_target(raw: &str) -> Result<Target, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("empty URL".to_owned());
    }
    let (scheme, rest) = raw
        .split_once("://")
        .ok_or_else(|| format!("{}: not a URL (expected e.g. https://…)", redact_raw(raw)))?;
    let scheme = scheme.to_ascii_lowercase();
    let mut short_user = None;
    let (forced, url) = match scheme.as_str() {
        "slack" => {
            let (url, user) = slack_short_form(rest)?;
            short_user = user;
            (Some(TargetKind::Slack), url)
        }
        "http" | "https" => (None, raw.to_owned()),
        other => {
            let (prefix, inner) = other.split_once('+').unwrap_or((other, ""));
            let kind = match prefix {
                "slack" => TargetKind::Slack,
                "teams" => TargetKind::Teams,
                "webhook" => TargetKind::Webhook,
                _ => return Err(unsupported(other)),
            };
            if inner != "http" && inner != "https" {
                return Err(unsupported(other));
            }
            (Some(kind), format!("{inner}://{rest}"))
        }
    };
    let mut url = Url::parse(&url).map_err(|e| format!("{}: {e}", redact_raw(raw)))?;
    let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
        return Err(format!("{}: no host", redact_raw(raw)));
    };
    let kind = forced.unwrap_or(if host == "hooks.slack.com" {
        TargetKind::Slack
    } else if host.contains("webhook.office.com") || host.contains("logic.azure.com") {
        TargetKind::Teams
    } else {
        TargetKind::Webhook
    });
    let (mut username, mut channel) = (None, None);
    if kind == TargetKind::Slack && url.query().is_some() {
        let mut kept = Vec::new();
        for (k, v) in url.query_pairs() {
            match k.as_ref() {
                "username" => username = Some(v.into_owned()).filter(|s| !s.is_empty()),
                "channel" => channel = Some(v.into_owned()).filter(|s| !s.is_empty()),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
    }
    Ok(Target {
        kind,
        url,
        username: username.or(short_user),
        channel,
    })
}

fn unsupported(scheme: &str) -> String {
    format!(
        "{scheme}://…: unsupported scheme (use http(s)://, slack://, or a slack+, teams+ or webhook+ \
         prefix before http(s)://)"
    )
}

/// `slack://[username@]T/B/X[?query]` → `https://hooks.slack.com/services/T/B/X[?query]`, and
/// the username.
fn slack_short_form(rest: &str) -> Result<(String, Option<String>), String> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (user, tokens) = match path.split_once('@') {
        Some((u, t)) => (Some(u.to_owned()).filter(|u| !u.is_empty()), t),
        None => (None, path),
    };
    let parts: Vec<&str> = tokens.trim_end_matches('/').split('/').collect();
    let well_formed = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()));
    if !well_formed {
        return Err(
            "slack://…: expected slack://[username@]T…/B…/token (the three parts of the \
                    webhook URL after /services/)"
                .to_owned(),
        );
    }
    let mut url = format!("https://hooks.slack.com/services/{}", parts.join("/"));
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    Ok((url, user))
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Node,
    Reason,
}

/// A message template: text with `{node}` (the node's name) and `{reason}` (why it needs a
/// reboot, e.g. the package list) placeholders; `{{` and `}}` stand for literal braces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

impl Template {
    /// Parses a template.
    ///
    /// # Errors
    /// A message naming an unknown placeholder or an unclosed `{`.
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err("unclosed '{' (placeholders are {node} and {reason}; write {{ \
                                            for a literal brace)"
                                    .to_owned());
                            }
                        }
                    }
                    let piece = match name.trim() {
                        "node" => Piece::Node,
                        "reason" => Piece::Reason,
                        _ => {
                            return Err(format!(
                                "unknown placeholder {{{name}}} (known: {{node}}, {{reason}})"
                            ));
                        }
                    };
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(piece);
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Template(pieces))
    }

    /// The message for `node` and `reason`.
    pub fn render(&self, node: &str, reason: &str) -> String {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Node => out.push_str(node),
                Piece::Reason => out.push_str(reason),
            }
        }
        out
    }
}

/// Validated notification settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Where notices go (none: notifications off).
    pub targets: Vec<Target>,
    /// Message when a drain starts.
    pub drain: Template,
    /// Message right before the reboot.
    pub reboot: Template,
    /// Message when the node is back.
    pub uncordon: Template,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        let t = |s: &str| Template::parse(s).unwrap_or_else(|_| Template(vec![Piece::Text(s.to_owned())]));
        NotifyConfig {
            targets: Vec::new(),
            drain: t(DEFAULT_TEMPLATE_DRAIN),
            reboot: t(DEFAULT_TEMPLATE_REBOOT),
            uncordon: t(DEFAULT_TEMPLATE_UNCORDON),
        }
    }
}

impl NotifyConfig {
    /// Validates the flag values, adding one line per problem to `problems`.
    pub fn from_flags(
        urls: &[String],
        drain: &str,
        reboot: &str,
        uncordon: &str,
        problems: &mut Vec<String>,
    ) -> NotifyConfig {
        let mut cfg = NotifyConfig::default();
        for (i, raw) in urls.iter().enumerate() {
            if raw.trim().is_empty() {
                continue;
            }
            match parse_target(raw) {
                Ok(t) => cfg.targets.push(t),
                Err(e) => problems.push(format!("--notify-url (number {}): {e}", i + 1)),
            }
        }
        for (flag, text, slot) in [
            ("--message-template-drain", drain, &mut cfg.drain),
            ("--message-template-reboot", reboot, &mut cfg.reboot),
            ("--message-template-uncordon", uncordon, &mut cfg.uncordon),
        ] {
            match Template::parse(text) {
                Ok(t) => *slot = t,
                Err(e) => problems.push(format!("{flag} {text:?}: {e}")),
            }
        }
        cfg
    }
}

/// One notice, as queued.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The step.
    pub event: NotifyEvent,
    /// The node.
    pub node: String,
    /// The rendered message.
    pub message: String,
    /// Why the node needs a reboot.
    pub reason: String,
    /// When the step happened (RFC 3339, UTC).
    pub time: String,
}

/// The JSON body `kind` receives for `notice`.
pub fn body(kind: TargetKind, target: Option<&Target>, notice: &Notice) -> Value {
    match kind {
        TargetKind::Slack => {
            let mut b = json!({ "text": notice.message });
            if let Some(u) = target.and_then(|t| t.username.as_ref()) {
                b["username"] = json!(u);
            }
            if let Some(c) = target.and_then(|t| t.channel.as_ref()) {
                b["channel"] = json!(c);
            }
            b
        }
        TargetKind::Teams => {
            let mut facts = vec![
                json!({ "title": "Node", "value": notice.node }),
                json!({ "title": "Event", "value": notice.event.as_str() }),
            ];
            if !notice.reason.is_empty() {
                facts.push(json!({ "title": "Reason", "value": notice.reason }));
            }
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
                            { "type": "TextBlock", "text": notice.message, "wrap": true, "weight": "Bolder" },
                            { "type": "FactSet", "facts": facts },
                        ],
                    },
                }],
            })
        }
        TargetKind::Webhook => json!({
            "event": notice.event.as_str(),
            "node": notice.node,
            "message": notice.message,
            "time": notice.time,
            "reason": notice.reason,
        }),
    }
}

struct Inner {
    tx: mpsc::Sender<Notice>,
    node: String,
    cfg: NotifyConfig,
    metrics: Metrics,
    /// Notices queued or being delivered.
    pending: watch::Sender<usize>,
}

/// Sends notices in the background; cheap to clone. [`Notifier::disabled`] sends nothing.
#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

impl Notifier {
    /// A notifier that sends nothing (no `--notify-url`, or a test harness).
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// Starts the delivery task for `node` (disabled when `cfg` has no targets). Must be called
    /// within a Tokio runtime.
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS set-up).
    pub fn start(cfg: &NotifyConfig, node: &str, metrics: Metrics) -> Result<Notifier, String> {
        if cfg.targets.is_empty() {
            return Ok(Notifier::disabled());
        }
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kreboot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the notification HTTP client: {e}"))?;
        let (tx, mut rx) = mpsc::channel::<Notice>(QUEUE);
        let (pending, _) = watch::channel(0usize);
        let inner = Arc::new(Inner {
            tx,
            node: node.to_owned(),
            cfg: cfg.clone(),
            metrics: metrics.clone(),
            pending,
        });
        let targets = cfg.targets.clone();
        // The task holds only a weak reference: once the last Notifier is dropped it delivers
        // what is still queued and ends.
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(notice) = rx.recv().await {
                let deliveries = targets.iter().map(|t| deliver(&client, t, &notice, &metrics));
                futures::future::join_all(deliveries).await;
                if let Some(inner) = weak.upgrade() {
                    inner.pending.send_modify(|n| *n = n.saturating_sub(1));
                }
            }
        });
        Ok(Notifier { inner: Some(inner) })
    }

    /// Whether notices go anywhere.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Queues a notice for `event`; `reason` is why the node needs a reboot (may be empty).
    /// Never waits.
    pub fn send(&self, event: NotifyEvent, reason: &str) {
        self.send_detail(event, reason, None);
    }

    /// Queues a notice for `event`, with `detail` (an error) appended to failure messages.
    /// Never waits.
    pub fn send_detail(&self, event: NotifyEvent, reason: &str, detail: Option<&str>) {
        let Some(inner) = &self.inner else { return };
        let node = inner.node.as_str();
        let mut message = match event {
            NotifyEvent::Drain => inner.cfg.drain.render(node, reason),
            NotifyEvent::Reboot => inner.cfg.reboot.render(node, reason),
            NotifyEvent::Uncordon => inner.cfg.uncordon.render(node, reason),
            NotifyEvent::DrainFailed => format!("Draining node {node} failed"),
            NotifyEvent::RebootFailed => format!("Rebooting node {node} failed"),
        };
        if let Some(d) = detail.filter(|d| !d.is_empty()) {
            message.push_str(": ");
            message.push_str(d);
        }
        let notice = Notice {
            event,
            node: node.to_owned(),
            message,
            reason: reason.to_owned(),
            time: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        };
        debug!(event = event.as_str(), message = %notice.message, "notification queued");
        inner.pending.send_modify(|n| *n += 1);
        if inner.tx.try_send(notice).is_err() {
            inner.pending.send_modify(|n| *n = n.saturating_sub(1));
            warn!(
                event = event.as_str(),
                "notification queue full, notification dropped"
            );
            for t in &inner.cfg.targets {
                count(&inner.metrics, t.kind, "dropped");
            }
        }
    }

    /// Waits until every queued notice has been delivered (or given up on), at most `limit`.
    /// Returns whether the queue emptied in time.
    pub async fn flush(&self, limit: Duration) -> bool {
        let Some(inner) = &self.inner else { return true };
        let mut rx = inner.pending.subscribe();
        matches!(
            tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await,
            Ok(Ok(_))
        )
    }
}

fn count(metrics: &Metrics, kind: TargetKind, result: &str) {
    metrics
        .notifications
        .with_label_values(&[kind.as_str(), result])
        .inc();
}

/// Why one attempt failed, and whether it is worth another.
struct Failure {
    message: String,
    retry: bool,
}

async fn attempt(client: &reqwest::Client, target: &Target, body: &Value) -> Result<(), Failure> {
    match client.post(target.url.clone()).json(body).send().await {
        Ok(resp) if resp.status().is_success() => Ok(()),
        Ok(resp) => Err(Failure {
            message: format!("HTTP {}", resp.status()),
            retry: resp.status().is_server_error(),
        }),
        Err(e) => Err(Failure {
            retry: e.is_connect() || e.is_timeout() || e.is_request(),
            // Without the URL: it carries the webhook's secret.
            message: e.without_url().to_string(),
        }),
    }
}

async fn deliver(client: &reqwest::Client, target: &Target, notice: &Notice, metrics: &Metrics) {
    let body = body(target.kind, Some(target), notice);
    let mut result = attempt(client, target, &body).await;
    if let Err(f) = &result
        && f.retry
    {
        debug!(target = %target.redacted(), error = %f.message, "notification failed; retrying once");
        tokio::time::sleep(RETRY_DELAY).await;
        result = attempt(client, target, &body).await;
    }
    match result {
        Ok(()) => {
            debug!(target = %target.redacted(), event = notice.event.as_str(), "notification sent");
            count(metrics, target.kind, "sent");
        }
        Err(f) => {
            warn!(target = %target.redacted(), event = notice.event.as_str(), error = %f.message, "notification failed");
            count(metrics, target.kind, "failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(raw: &str) -> TargetKind {
        parse_target(raw).unwrap_or_else(|e| panic!("{raw}: {e}")).kind
    }

    #[test]
    fn url_decides_the_format() {
        assert_eq!(
            kind("https://hooks.slack.com/services/T1/B2/x3"),
            TargetKind::Slack
        );
        assert_eq!(
            kind("HTTPS://Hooks.Slack.com/services/T1/B2/x3"),
            TargetKind::Slack
        );
        assert_eq!(
            kind("https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/x/y"),
            TargetKind::Teams
        );
        assert_eq!(
            kind(
                "https://prod-01.westeurope.logic.azure.com:443/workflows/abc/triggers/manual/paths/invoke?api-version=2016-06-01&sig=s"
            ),
            TargetKind::Teams
        );
        assert_eq!(kind("https://example.com/hook"), TargetKind::Webhook);
        assert_eq!(kind("http://10.0.0.1:9000/"), TargetKind::Webhook);
        // A host that merely mentions slack is no Slack webhook.
        assert_eq!(kind("https://hooks.slack.com.example.org/x"), TargetKind::Webhook);
    }

    #[test]
    fn explicit_prefixes_win_and_are_removed() {
        let t = parse_target("slack+http://127.0.0.1:8080/s").unwrap();
        assert_eq!(t.kind, TargetKind::Slack);
        assert_eq!(t.url.as_str(), "http://127.0.0.1:8080/s");
        let t = parse_target("teams+https://example.com/t").unwrap();
        assert_eq!(t.kind, TargetKind::Teams);
        assert_eq!(t.url.as_str(), "https://example.com/t");
        let t = parse_target("webhook+http://hooks.slack.com/services/a").unwrap();
        assert_eq!(t.kind, TargetKind::Webhook);
        assert_eq!(t.url.as_str(), "http://hooks.slack.com/services/a");
    }

    #[test]
    fn slack_short_form_and_options() {
        let t = parse_target("slack://kreboot@T000/B000/XXXX?channel=%23ops").unwrap();
        assert_eq!(t.kind, TargetKind::Slack);
        assert_eq!(t.url.as_str(), "https://hooks.slack.com/services/T000/B000/XXXX");
        assert_eq!(t.username.as_deref(), Some("kreboot"));
        assert_eq!(t.channel.as_deref(), Some("#ops"));
        let t = parse_target("slack://T000/B000/XXXX").unwrap();
        assert_eq!(t.username, None);
        assert_eq!(t.channel, None);
        let t = parse_target("https://hooks.slack.com/services/T/B/X?username=bot&keep=1").unwrap();
        assert_eq!(t.username.as_deref(), Some("bot"));
        assert_eq!(t.url.as_str(), "https://hooks.slack.com/services/T/B/X?keep=1");
        // Generic targets keep their query as it is.
        let t = parse_target("https://example.com/h?username=x").unwrap();
        assert_eq!(t.url.as_str(), "https://example.com/h?username=x");
    }

    #[test]
    fn bad_urls_are_rejected_without_leaking_them() {
        for raw in [
            "",
            "hooks.slack.com/services/T/B/X",
            "ftp://example.com/x",
            "slack+ftp://example.com/x",
            "teams://secret-token",
            "slack://only/two",
            "slack://T/B/X/extra",
            "https://",
            "http://exa mple.com/secret",
            "mailto://secret@example.com",
        ] {
            let e = parse_target(raw).expect_err(raw);
            assert!(!e.contains("secret"), "{raw}: {e}");
            assert!(!e.is_empty());
        }
    }

    #[test]
    fn debug_output_hides_the_secret_path() {
        let t = parse_target("https://hooks.slack.com/services/T/B/SECRET").unwrap();
        let shown = format!("{t:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("hooks.slack.com"), "{shown}");
    }

    #[test]
    fn templates_substitute_and_reject_unknown_placeholders() {
        let t = Template::parse("Node {node} reboots for {reason} {{literal}}").unwrap();
        assert_eq!(
            t.render("n1", "linux-image"),
            "Node n1 reboots for linux-image {literal}"
        );
        assert_eq!(
            Template::parse("no placeholders").unwrap().render("n", "r"),
            "no placeholders"
        );
        let e = Template::parse("Draining {host}").unwrap_err();
        assert!(e.contains("{host}") && e.contains("{node}"), "{e}");
        assert!(
            Template::parse("Draining {node")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(Template::parse("%s").is_ok());
    }

    #[test]
    fn flags_collect_every_problem() {
        let mut problems = Vec::new();
        let cfg = NotifyConfig::from_flags(
            &["https://ok.example.com/".into(), "gopher://x".into(), " ".into()],
            "{nodename}",
            DEFAULT_TEMPLATE_REBOOT,
            "{node} back {",
            &mut problems,
        );
        assert_eq!(cfg.targets.len(), 1);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("--notify-url (number 2)"), "{problems:?}");
        assert!(problems[1].contains("--message-template-drain"), "{problems:?}");
        assert!(
            problems[2].contains("--message-template-uncordon"),
            "{problems:?}"
        );
    }

    #[test]
    fn bodies_have_the_documented_shape() {
        let n = Notice {
            event: NotifyEvent::Reboot,
            node: "n1".into(),
            message: "Rebooting node n1".into(),
            reason: "linux-image".into(),
            time: "2024-01-01T00:00:00Z".into(),
        };
        assert_eq!(
            body(TargetKind::Webhook, None, &n),
            json!({"event": "reboot", "node": "n1", "message": "Rebooting node n1",
                   "time": "2024-01-01T00:00:00Z", "reason": "linux-image"})
        );
        assert_eq!(
            body(TargetKind::Slack, None, &n),
            json!({"text": "Rebooting node n1"})
        );
        let teams = body(TargetKind::Teams, None, &n);
        assert_eq!(teams["type"], "message");
        assert_eq!(
            teams["attachments"][0]["content"]["body"][0]["text"],
            "Rebooting node n1"
        );
    }
}
