//! Command-line interface: what the user typed ([`Cli`], clap) and the validated settings the
//! agent runs with ([`AgentConfig`]).
//!
//! Every agent flag can also be given as the environment variable `KREBOOT_<FLAG>` (e.g.
//! `KREBOOT_DRAIN_TIMEOUT`); `--node-name` also reads `NODE_NAME` (the downward API) and
//! `--namespace` falls back to `POD_NAMESPACE`, then `kube-system`. This module is the only place
//! that reads the environment. Bad values are reported all at once with exit code 2.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::{
    notify::{self, NotifyConfig},
    reboot::RebootMethod,
};

/// kreboot: reboots Kubernetes nodes safely after the host asks for it.
#[derive(Debug, Parser)]
#[command(name = "kreboot", version, about, long_about = None)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent (the DaemonSet process).
    Agent(Box<AgentArgs>),
    /// Work with a reboot policy (config.yaml of ConfigMap kreboot-config) offline.
    Policy(PolicyArgs),
    /// Cordon nodes and drain them one after another through the Eviction API (PDBs
    /// respected), e.g. an old node pool during a migration. Exit code 0: all drained; 1: a
    /// drain failed or timed out (that node stays cordoned); 2: bad usage.
    Drain(DrainArgs),
    /// Make nodes schedulable again (undoes `kreboot drain`). Refuses a node kreboot's agent is
    /// in the middle of a reboot cycle on, unless --force.
    Uncordon(UncordonArgs),
    /// Show what kreboot is doing across the cluster: each node's state, the lock, the queue
    /// and the policy (reads the cluster with your kubeconfig; writes nothing).
    Status(StatusArgs),
    /// Pause reboots cluster-wide: no node starts a reboot until `kreboot resume` (nodes already
    /// draining or rebooting finish their cycle). Recorded on the policy ConfigMap, which every
    /// agent with a reboot to do watches: they stop within a second.
    Pause(PauseArgs),
    /// Lift a pause: waiting nodes go on as the policy allows.
    Resume(ResumeArgs),
    /// Ask for nodes to be rebooted without the sentinel: their agents treat the request like
    /// the sentinel (window, lock, blockers, PDBs) and remove it once the reboot completed.
    /// Also lets an agent reboot a node drained with `kreboot drain`.
    Reboot(RebootArgs),
    /// Print a shell completion script: `source <(kreboot completions bash)`, or write it where
    /// the shell loads completions from (README, "Shell completion and man page").
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `kreboot man > kreboot.1 && man ./kreboot.1`.
    Man,
    /// Run a command in the host's namespaces, as the agent runs its reboot command (for
    /// checking a node's set-up; prints the command's output and exits with its code).
    #[command(hide = true)]
    HostExec(HostExecArgs),
}

/// `kreboot policy ...`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// What to do with the policy.
    #[command(subcommand)]
    pub command: PolicyCommand,
}

/// The subcommands of `kreboot policy`.
#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file and show which rule applies to a node, whether it may reboot
    /// now, and its next windows. Exit code 0: valid; 2: invalid (the error on stderr).
    Check(PolicyCheckArgs),
}

/// Flags of `kreboot policy check`.
#[derive(Debug, Clone, Args)]
pub struct PolicyCheckArgs {
    /// The policy file (the config.yaml key of the ConfigMap).
    pub file: PathBuf,
    /// The node's labels, as k=v,k2=v2 (for rule selection).
    #[arg(long, value_parser = parse_labels)]
    pub labels: Option<crate::policy::Labels>,
    /// The instant to check, RFC 3339 (e.g. 2026-11-27T22:30:00Z) [default: now].
    #[arg(long, value_parser = parse_instant)]
    pub at: Option<chrono::DateTime<chrono::Utc>>,
    /// How many upcoming windows to show.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub count: u32,
}

fn parse_labels(s: &str) -> Result<crate::policy::Labels, String> {
    let mut out = crate::policy::Labels::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} is not key=value (example: agentpool=db,zone=a)"))?;
        if k.trim().is_empty() {
            return Err(format!("{pair:?} has an empty key"));
        }
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e} (example: 2026-11-27T22:30:00Z or 2026-11-27T23:30:00+01:00)"))
}

/// Output format of `kreboot drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Readable lines.
    Text,
    /// One JSON document on stdout (progress stays on stderr).
    Json,
}

/// Which nodes a command works on: names, or a label selector (exactly one of the two).
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct NodeTargets {
    /// The nodes, by name.
    #[arg(value_name = "NODE")]
    pub nodes: Vec<String>,
    /// A label selector instead of names, passed to the API server as it is (e.g. pool=old or
    /// 'pool in (a,b),zone!=c').
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
}

/// Flags of `kreboot drain`.
#[derive(Debug, Clone, Args)]
pub struct DrainArgs {
    /// The nodes.
    #[command(flatten)]
    pub targets: NodeTargets,
    /// Upper bound of each node's drain; on expiry the command stops with exit code 1 and the
    /// node stays cordoned.
    #[arg(long, default_value = "10m", value_parser = parse_nonzero_duration)]
    pub timeout: Duration,
    /// Grace period in seconds given to evicted pods (-1: each pod's own).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-1..))]
    pub grace_period: i64,
    /// Interval between retries of an eviction refused by a PodDisruptionBudget.
    #[arg(long, default_value = "5s", value_parser = parse_nonzero_duration)]
    pub eviction_retry: Duration,
    /// List the nodes and, per node, the pods that would be evicted and those skipped (and
    /// why); change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Output format (progress always goes to stderr as text).
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// Flags of `kreboot uncordon`.
#[derive(Debug, Clone, Args)]
pub struct UncordonArgs {
    /// The nodes.
    #[command(flatten)]
    pub targets: NodeTargets,
    /// Uncordon even a node that kreboot's agent is in the middle of a reboot cycle on.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `kreboot status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Namespace of the lock Leases and the policy ConfigMap [default: $POD_NAMESPACE, else kreboot].
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "kreboot",
        hide_env = true,
        hide_default_value = true
    )]
    pub namespace: String,
    /// Name of the policy ConfigMap (key config.yaml).
    #[arg(long, default_value = "kreboot-config")]
    pub config_map: String,
    /// Name of the lock Lease (slot 0; slot i is <name>-<i>).
    #[arg(long, default_value = "kreboot-lock")]
    pub lock_name: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = StatusFormat::Table)]
    pub output: StatusFormat,
    /// The instant ages and windows are computed from, RFC 3339 (for tests) [default: now].
    #[arg(long, hide = true, value_parser = parse_instant)]
    pub now: Option<chrono::DateTime<chrono::Utc>>,
}

/// Where the pause is recorded: the policy ConfigMap.
#[derive(Debug, Clone, Args)]
pub struct ConfigMapTarget {
    /// Namespace of the agents' policy ConfigMap [default: $POD_NAMESPACE, else kreboot].
    #[arg(
        long,
        env = "POD_NAMESPACE",
        default_value = "kreboot",
        hide_env = true,
        hide_default_value = true
    )]
    pub namespace: String,
    /// Name of the policy ConfigMap (created, with an empty policy, if it does not exist).
    #[arg(long, default_value = "kreboot-config")]
    pub config_map: String,
}

/// Flags of `kreboot pause`.
#[derive(Debug, Clone, Args)]
pub struct PauseArgs {
    /// Where.
    #[command(flatten)]
    pub target: ConfigMapTarget,
    /// Why, shown by `kreboot status` and in the agents' Events.
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Who pauses [default: the user the API server knows you as, else $USER].
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
}

/// Flags of `kreboot reboot`.
#[derive(Debug, Clone, Args)]
pub struct RebootArgs {
    /// The nodes.
    #[command(flatten)]
    pub targets: NodeTargets,
    /// Withdraw the request instead (a reboot already under way goes on).
    #[arg(long)]
    pub cancel: bool,
    /// Who asks [default: the user the API server knows you as, else $USER].
    #[arg(long, value_name = "NAME")]
    pub by: Option<String>,
}

/// Flags of `kreboot completions`.
#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells `kreboot completions` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

/// The name kreboot is known by when started as `argv0`: `kubectl kreboot` when run as the
/// kubectl plugin (a file named `kubectl-kreboot` on the PATH, which kubectl runs for `kubectl
/// kreboot ...`), else `kreboot`. Help, usage and completions then show what the user typed.
pub fn bin_name(argv0: Option<&std::ffi::OsStr>) -> &'static str {
    let base = argv0
        .map(std::path::Path::new)
        .and_then(std::path::Path::file_name)
        .and_then(|n| n.to_str())
        .unwrap_or("kreboot");
    // kubectl finds plugins by the prefix `kubectl-` and the name up to an extension
    // (`kubectl-kreboot.exe` elsewhere); anything else is the plain binary.
    if base == "kubectl-kreboot" || base.starts_with("kubectl-kreboot.") {
        "kubectl kreboot"
    } else {
        "kreboot"
    }
}

/// Flags of `kreboot resume`.
#[derive(Debug, Clone, Args)]
pub struct ResumeArgs {
    /// Where.
    #[command(flatten)]
    pub target: ConfigMapTarget,
}

/// Output format of `kreboot status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    /// Aligned columns, for people.
    Table,
    /// JSON, for scripts.
    Json,
    /// YAML.
    Yaml,
}

/// Flags of `kreboot host-exec`.
#[derive(Debug, Clone, Args)]
pub struct HostExecArgs {
    /// The process whose namespaces are entered.
    #[arg(long, default_value_t = 1)]
    pub host_pid: i32,
    /// Run in the agent's own namespaces instead.
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub host_namespaces: bool,
    /// The command.
    #[arg(required = true, trailing_var_arg = true)]
    pub command: Vec<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 90s, 30m, 1h30m)"))
}

fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be more than 0".to_owned()),
        d => Ok(d),
    }
}

/// Flags of `kreboot agent`.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Name of the Node this agent runs on (from the downward API: env NODE_NAME).
    #[arg(long, env = "KREBOOT_NODE_NAME")]
    pub node_name: Option<String>,
    /// Namespace of the lock Leases and the policy ConfigMap [default: $POD_NAMESPACE, else kube-system].
    #[arg(long, env = "KREBOOT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Name of the policy ConfigMap (key config.yaml). Missing = reboots allowed at any time.
    #[arg(long, env = "KREBOOT_CONFIG_MAP", default_value = "kreboot-config")]
    pub config_map: String,
    /// Name of the lock Lease (slot 0; slot i is <name>-<i>).
    #[arg(long, env = "KREBOOT_LOCK_NAME", default_value = "kreboot-lock")]
    pub lock_name: String,
    /// How many nodes may be out for a reboot at once (number of lock slots).
    #[arg(long, env = "KREBOOT_CONCURRENCY", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub concurrency: u32,
    /// File whose existence means a reboot is required (watched with inotify).
    #[arg(
        long,
        env = "KREBOOT_SENTINEL_FILE",
        default_value = "/var/run/reboot-required"
    )]
    pub sentinel_file: PathBuf,
    /// Command that reboots the host (split like a shell would, run in the host's namespaces).
    #[arg(long, env = "KREBOOT_REBOOT_COMMAND", default_value = "systemctl reboot")]
    pub reboot_command: String,
    /// How to reboot: run --reboot-command, or send SIGRTMIN+5 to the host's PID 1.
    #[arg(long, env = "KREBOOT_REBOOT_METHOD", value_enum, default_value_t = RebootMethod::Command)]
    pub reboot_method: RebootMethod,
    /// A command run on the host every --check-interval: exit 0 means a reboot is needed, 1 not
    /// (anything else is reported and counts as not needed), as in kured.
    #[arg(long, env = "KREBOOT_SENTINEL_COMMAND")]
    pub sentinel_command: Option<String>,
    /// Swap exit codes 0 and 1 of --sentinel-command (for `needs-restarting -r`, which exits 1
    /// when a reboot is needed).
    #[arg(long, env = "KREBOOT_SENTINEL_COMMAND_INVERT", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub sentinel_command_invert: bool,
    /// Also need a reboot when a newer kernel is installed (host /lib/modules) than the one running.
    #[arg(long, env = "KREBOOT_KERNEL_CHECK", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub kernel_check: bool,
    /// How often --sentinel-command and --kernel-check run (the sentinel file needs no interval:
    /// it is watched).
    #[arg(long, env = "KREBOOT_CHECK_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// How often the sentinel file is scanned when inotify cannot be used (its instances or
    /// watches used up: EMFILE, ENOSPC), until inotify works again.
    #[arg(long, env = "KREBOOT_SENTINEL_POLL_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub sentinel_poll_interval: Duration,
    /// How often a polling sentinel watch tries inotify again (for tests).
    #[arg(long, hide = true, env = "KREBOOT_SENTINEL_INOTIFY_RETRY", default_value = "5m", value_parser = parse_duration)]
    pub sentinel_inotify_retry: Duration,
    /// Run host commands inside PID 1's namespaces (false: in the agent's own namespaces).
    #[arg(long, env = "KREBOOT_HOST_NAMESPACES", default_value_t = true, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub host_namespaces: bool,
    /// The host process whose namespaces host commands enter.
    #[arg(long, env = "KREBOOT_HOST_PID", default_value_t = 1)]
    pub host_pid: i32,
    /// Upper bound of a drain; on expiry the node is uncordoned and the lock released
    /// (unless --force-reboot).
    #[arg(long, env = "KREBOOT_DRAIN_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Grace period in seconds given to evicted pods (-1: each pod's own).
    #[arg(long, env = "KREBOOT_DRAIN_GRACE_PERIOD", default_value_t = -1, allow_negative_numbers = true)]
    pub drain_grace_period: i64,
    /// Reboot even when the drain failed or timed out.
    #[arg(long, env = "KREBOOT_FORCE_REBOOT", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub force_reboot: bool,
    /// Lease duration of the lock; must cover a reboot (the holder cannot renew while down).
    #[arg(long, env = "KREBOOT_LOCK_TTL", default_value = "30m", value_parser = parse_duration)]
    pub lock_ttl: Duration,
    /// Pause between the end of the drain and the reboot.
    #[arg(long, env = "KREBOOT_REBOOT_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub reboot_delay: Duration,
    /// Address of the /metrics, /healthz and /readyz endpoint ("off" to disable).
    #[arg(long, env = "KREBOOT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: String,
    /// Log format.
    #[arg(long, env = "KREBOOT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Observe and log what would be done, but write nothing to the cluster and never reboot.
    #[arg(long, env = "KREBOOT_DRY_RUN", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub dry_run: bool,
    /// After a reboot kreboot caused, ignore a sentinel that is still there for this long
    /// (reboot-loop protection).
    #[arg(long, env = "KREBOOT_REBOOT_LOOP_BACKOFF", default_value = "30m", value_parser = parse_duration)]
    pub reboot_loop_backoff: Duration,
    /// After a failed cycle (drain failure, reboot command failure), wait this long before
    /// trying again.
    #[arg(long, env = "KREBOOT_FAILURE_BACKOFF", default_value = "10m", value_parser = parse_duration)]
    pub failure_backoff: Duration,
    /// Interval between retries of an eviction refused by a PodDisruptionBudget.
    #[arg(long, env = "KREBOOT_EVICTION_RETRY", default_value = "5s", value_parser = parse_duration)]
    pub eviction_retry: Duration,
    /// Send a notification before a drain, before the reboot and when the node is back, to this
    /// URL (repeatable; the environment variable takes a comma-separated list). The URL picks
    /// the format: hooks.slack.com or slack://… Slack, *.webhook.office.com or *.logic.azure.com
    /// Teams, other http(s):// generic JSON; a slack+, teams+ or webhook+ prefix forces one.
    #[arg(
        long = "notify-url",
        env = "KREBOOT_NOTIFY_URL",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub notify_url: Vec<String>,
    /// Message sent when the drain starts ({node}: the node's name, {reason}: why it reboots).
    #[arg(long, env = "KREBOOT_MESSAGE_TEMPLATE_DRAIN", default_value = notify::DEFAULT_TEMPLATE_DRAIN)]
    pub message_template_drain: String,
    /// Message sent right before the reboot ({node}, {reason}).
    #[arg(long, env = "KREBOOT_MESSAGE_TEMPLATE_REBOOT", default_value = notify::DEFAULT_TEMPLATE_REBOOT)]
    pub message_template_reboot: String,
    /// Message sent when the node is back after its reboot ({node}, {reason}).
    #[arg(long, env = "KREBOOT_MESSAGE_TEMPLATE_UNCORDON", default_value = notify::DEFAULT_TEMPLATE_UNCORDON)]
    pub message_template_uncordon: String,
    /// Hold the reboot back while a running pod on this node matches this label selector
    /// (repeatable; e.g. app=etcd-backup).
    #[arg(
        long = "blocking-pod-selector",
        env = "KREBOOT_BLOCKING_POD_SELECTOR",
        value_delimiter = ';'
    )]
    pub blocking_pod_selector: Vec<String>,
    /// Hold the reboot back while Prometheus at this URL has active alerts (see the filters).
    #[arg(long, env = "KREBOOT_PROMETHEUS_URL")]
    pub prometheus_url: Option<String>,
    /// Alertmanager base URL: a Prometheus alert that this Alertmanager reports as silenced or
    /// inhibited does not hold the reboot back (one it does not know yet still does; an
    /// Alertmanager that cannot be asked holds it back). Needs --prometheus-url.
    #[arg(long, env = "KREBOOT_ALERTMANAGER_URL")]
    pub alertmanager_url: Option<String>,
    /// Alerts whose names match this regular expression are ignored (or, with
    /// --alert-filter-match-only, the only ones that count).
    #[arg(long, env = "KREBOOT_ALERT_FILTER_REGEXP")]
    pub alert_filter_regexp: Option<String>,
    /// Only alerts matching --alert-filter-regexp hold the reboot back.
    #[arg(long, env = "KREBOOT_ALERT_FILTER_MATCH_ONLY", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub alert_filter_match_only: bool,
    /// Only firing alerts hold the reboot back (not pending ones).
    #[arg(long, env = "KREBOOT_ALERT_FIRING_ONLY", default_value_t = false, action = ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub alert_firing_only: bool,
    /// How often a blocked node checks its blockers again.
    #[arg(long, env = "KREBOOT_BLOCKER_CHECK_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub blocker_check_interval: Duration,
    /// Labels set on the Node when kreboot cordons it (k=v,k2=v2).
    #[arg(long, env = "KREBOOT_PRE_REBOOT_NODE_LABELS", default_value = "")]
    pub pre_reboot_node_labels: String,
    /// Labels set on the Node when it is back after the reboot (k=v,k2=v2); the pre-reboot
    /// labels are removed then.
    #[arg(long, env = "KREBOOT_POST_REBOOT_NODE_LABELS", default_value = "")]
    pub post_reboot_node_labels: String,
    /// Taint the node with this key (effect PreferNoSchedule) while it waits for the lock, so
    /// that new pods prefer other nodes (empty: off).
    #[arg(long, env = "KREBOOT_PREFER_NO_SCHEDULE_TAINT", default_value = "")]
    pub prefer_no_schedule_taint: String,
}

/// Parses `k=v,k2=v2` into labels; `what` names the flag in errors.
pub fn parse_label_list(s: &str, what: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("{what}: {pair:?} is not key=value"));
        };
        let (k, v) = (k.trim(), v.trim());
        let name = k.rsplit('/').next().unwrap_or(k);
        let valid = |x: &str, max: usize| {
            x.len() <= max
                && x.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && x.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
                && x.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
        };
        if name.is_empty() || !valid(name, 63) || !valid(v, 63) || k.len() > 253 {
            return Err(format!("{what}: {pair:?} is not a valid Kubernetes label"));
        }
        if k.starts_with("kreboot.io/") {
            return Err(format!("{what}: {k:?}: the kreboot.io/ prefix is kreboot's own"));
        }
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node.
    pub node_name: String,
    /// Namespace of Leases and ConfigMap.
    pub namespace: String,
    /// Policy ConfigMap name.
    pub config_map: String,
    /// Lock name.
    pub lock_name: String,
    /// Lock slots.
    pub concurrency: u32,
    /// Sentinel file.
    pub sentinel_file: PathBuf,
    /// Reboot command line.
    pub reboot_command: Vec<String>,
    /// Reboot method.
    pub reboot_method: RebootMethod,
    /// Sentinel command line.
    pub sentinel_command: Option<Vec<String>>,
    /// Swap its exit codes 0 and 1.
    pub sentinel_command_invert: bool,
    /// Kernel check.
    pub kernel_check: bool,
    /// Interval of the sentinel command and the kernel check.
    pub check_interval: Duration,
    /// Enter the host's namespaces for host commands.
    pub host_namespaces: bool,
    /// Target of `setns`.
    pub host_pid: i32,
    /// Drain bound.
    pub drain_timeout: Duration,
    /// Eviction grace period (None: the pod's own).
    pub drain_grace_period: Option<i64>,
    /// Reboot even after a failed drain.
    pub force_reboot: bool,
    /// Lease duration.
    pub lock_ttl: Duration,
    /// Pause before rebooting.
    pub reboot_delay: Duration,
    /// Metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// Write nothing.
    pub dry_run: bool,
    /// Reboot-loop back-off.
    pub reboot_loop_backoff: Duration,
    /// Back-off after a failed cycle.
    pub failure_backoff: Duration,
    /// Eviction retry interval.
    pub eviction_retry: Duration,
    /// Operator notifications (no targets: off).
    pub notify: NotifyConfig,
    /// What holds a reboot back besides the window.
    pub blockers: crate::blockers::BlockerConfig,
    /// Labels set when kreboot cordons the node.
    pub pre_reboot_labels: std::collections::BTreeMap<String, String>,
    /// Labels set when the node is back.
    pub post_reboot_labels: std::collections::BTreeMap<String, String>,
    /// Taint key (PreferNoSchedule) while waiting for the lock.
    pub prefer_no_schedule_taint: Option<String>,
}

/// Looks up an environment variable (the one place that does).
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl AgentArgs {
    /// Validates the flags into an [`AgentConfig`], reporting every problem at once.
    ///
    /// # Errors
    /// A message listing each invalid setting.
    pub fn validate(&self) -> Result<AgentConfig, String> {
        let mut problems = Vec::new();
        let node_name = self.node_name_or_env(&mut problems);
        let namespace = self
            .namespace
            .clone()
            .or_else(|| env("POD_NAMESPACE"))
            .unwrap_or_else(|| "kube-system".to_owned());
        let reboot_command = self.reboot_argv(&mut problems);
        let sentinel_command = self.sentinel_argv(&mut problems);
        self.check_intervals(&mut problems);
        let metrics_addr = self.metrics_socket(&mut problems);
        self.check_lock_and_drain(&mut problems);
        let notify = NotifyConfig::from_flags(
            &self.notify_url,
            &self.message_template_drain,
            &self.message_template_reboot,
            &self.message_template_uncordon,
            &mut problems,
        );
        let blockers = self.blocker_config(&mut problems);
        let pre_reboot_labels = labels_or_problem(
            &self.pre_reboot_node_labels,
            "--pre-reboot-node-labels",
            &mut problems,
        );
        let post_reboot_labels = labels_or_problem(
            &self.post_reboot_node_labels,
            "--post-reboot-node-labels",
            &mut problems,
        );
        let prefer_no_schedule_taint = self.taint_key(&mut problems);
        match (problems.is_empty(), node_name) {
            (true, Some(node_name)) => Ok(AgentConfig {
                node_name,
                namespace,
                config_map: self.config_map.clone(),
                lock_name: self.lock_name.clone(),
                concurrency: self.concurrency,
                sentinel_file: self.sentinel_file.clone(),
                reboot_command,
                reboot_method: self.reboot_method,
                sentinel_command,
                sentinel_command_invert: self.sentinel_command_invert,
                kernel_check: self.kernel_check,
                check_interval: self.check_interval,
                host_namespaces: self.host_namespaces,
                host_pid: self.host_pid,
                drain_timeout: self.drain_timeout,
                drain_grace_period: (self.drain_grace_period >= 0).then_some(self.drain_grace_period),
                force_reboot: self.force_reboot,
                lock_ttl: self.lock_ttl,
                reboot_delay: self.reboot_delay,
                metrics_addr,
                dry_run: self.dry_run,
                reboot_loop_backoff: self.reboot_loop_backoff,
                failure_backoff: self.failure_backoff,
                eviction_retry: self.eviction_retry,
                notify,
                blockers,
                pre_reboot_labels,
                post_reboot_labels,
                prefer_no_schedule_taint,
            }),
            _ => Err(problems.join("\n")),
        }
    }

    /// `--node-name`, else `NODE_NAME`.
    fn node_name_or_env(&self, problems: &mut Vec<String>) -> Option<String> {
        let node_name = self.node_name.clone().or_else(|| env("NODE_NAME"));
        if node_name.is_none() {
            problems.push(
                "no node name: pass --node-name, or set NODE_NAME (in a DaemonSet, from the downward API \
                 fieldRef spec.nodeName)"
                    .to_owned(),
            );
        }
        node_name
    }

    /// `--reboot-command` split into its argv.
    fn reboot_argv(&self, problems: &mut Vec<String>) -> Vec<String> {
        match shlex::split(&self.reboot_command) {
            Some(argv) if !argv.is_empty() => argv,
            _ => {
                problems.push(format!(
                    "--reboot-command {:?} is empty or badly quoted",
                    self.reboot_command
                ));
                Vec::new()
            }
        }
    }

    /// `--sentinel-command`, if given, split into its argv.
    fn sentinel_argv(&self, problems: &mut Vec<String>) -> Option<Vec<String>> {
        match self.sentinel_command.as_deref().map(shlex::split) {
            None => None,
            Some(Some(argv)) if !argv.is_empty() => Some(argv),
            Some(_) => {
                problems.push(format!(
                    "--sentinel-command {:?} is empty or badly quoted",
                    self.sentinel_command
                ));
                None
            }
        }
    }

    /// The sentinel's polling periods.
    fn check_intervals(&self, problems: &mut Vec<String>) {
        if self.check_interval < Duration::from_secs(1) {
            problems.push("--check-interval must be at least 1s".to_owned());
        }
        if self.sentinel_poll_interval < Duration::from_secs(1) {
            problems.push("--sentinel-poll-interval must be at least 1s".to_owned());
        }
        if self.sentinel_inotify_retry < Duration::from_secs(1) {
            problems.push("--sentinel-inotify-retry must be at least 1s".to_owned());
        }
    }

    /// `--metrics-addr`: a socket address, or `off`.
    fn metrics_socket(&self, problems: &mut Vec<String>) -> Option<SocketAddr> {
        if self.metrics_addr == "off" {
            return None;
        }
        match self.metrics_addr.parse() {
            Ok(a) => Some(a),
            Err(e) => {
                problems.push(format!(
                    "--metrics-addr {:?}: {e} (e.g. 0.0.0.0:8080, or off)",
                    self.metrics_addr
                ));
                None
            }
        }
    }

    /// The lease's TTL, the drain's bounds and the host's pid.
    fn check_lock_and_drain(&self, problems: &mut Vec<String>) {
        if self.lock_ttl < Duration::from_secs(10) {
            problems.push(format!(
                "--lock-ttl {} is too short: the lease must survive a reboot (at least 10s)",
                humantime::format_duration(self.lock_ttl)
            ));
        }
        if self.drain_timeout.is_zero() {
            problems.push("--drain-timeout must be more than 0".to_owned());
        }
        if self.drain_grace_period < -1 {
            problems.push(format!(
                "--drain-grace-period {} must be -1 or more",
                self.drain_grace_period
            ));
        }
        if self.host_pid < 1 {
            problems.push(format!("--host-pid {} is not a process id", self.host_pid));
        }
    }

    /// What holds a reboot back: blocking pods and, through Prometheus, firing alerts.
    fn blocker_config(&self, problems: &mut Vec<String>) -> crate::blockers::BlockerConfig {
        let pod_selectors = self
            .blocking_pod_selector
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if self.blocker_check_interval < Duration::from_secs(1) {
            problems.push("--blocker-check-interval must be at least 1s".to_owned());
        }
        crate::blockers::BlockerConfig {
            pod_selectors,
            prometheus: self.alert_blocker(problems),
            interval: self.blocker_check_interval,
        }
    }

    /// `--alert-filter-regexp`, compiled.
    fn alert_filter(&self, problems: &mut Vec<String>) -> Option<regex::Regex> {
        let filter = match self.alert_filter_regexp.as_deref().filter(|r| !r.is_empty()) {
            None => None,
            Some(r) => match regex::Regex::new(r) {
                Ok(re) => Some(re),
                Err(e) => {
                    problems.push(format!("--alert-filter-regexp {r:?}: {e}"));
                    None
                }
            },
        };
        if self.alert_filter_match_only && filter.is_none() {
            problems.push("--alert-filter-match-only needs --alert-filter-regexp".to_owned());
        }
        filter
    }

    /// The alert blocker, when `--prometheus-url` is set.
    fn alert_blocker(&self, problems: &mut Vec<String>) -> Option<crate::blockers::AlertBlocker> {
        let filter = self.alert_filter(problems);
        let http_url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        let alertmanager = match self.alertmanager_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) if http_url(url) => Some(url.to_owned()),
            Some(url) => {
                problems.push(format!("--alertmanager-url {url:?} is not an http(s) URL"));
                None
            }
            None => None,
        };
        match self.prometheus_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) if http_url(url) => Some(crate::blockers::AlertBlocker {
                url: url.to_owned(),
                filter,
                match_only: self.alert_filter_match_only,
                firing_only: self.alert_firing_only,
                alertmanager,
            }),
            Some(url) => {
                problems.push(format!("--prometheus-url {url:?} is not an http(s) URL"));
                None
            }
            // Alertmanager only ever lifts a block that Prometheus's alerts set: alone it would
            // silently do nothing.
            None if alertmanager.is_some() => {
                problems.push("--alertmanager-url needs --prometheus-url".to_owned());
                None
            }
            None => None,
        }
    }

    /// `--prefer-no-schedule-taint`, trimmed; `None` when empty.
    fn taint_key(&self, problems: &mut Vec<String>) -> Option<String> {
        let taint = self.prefer_no_schedule_taint.trim();
        if !taint.is_empty() && parse_label_list(&format!("{taint}=x"), "--prefer-no-schedule-taint").is_err()
        {
            problems.push(format!(
                "--prefer-no-schedule-taint {taint:?} is not a valid taint key"
            ));
        }
        (!taint.is_empty()).then(|| taint.to_owned())
    }
}

/// A label-list flag parsed, or its problem recorded and no labels.
fn labels_or_problem(
    s: &str,
    what: &str,
    problems: &mut Vec<String>,
) -> std::collections::BTreeMap<String, String> {
    parse_label_list(s, what).unwrap_or_else(|e| {
        problems.push(e);
        Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kreboot").chain(args.iter().copied()))
    }

    fn agent(args: &[&str]) -> AgentArgs {
        match parse(&[&["agent"], args].concat()).unwrap().command {
            Command::Agent(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn kubectl_plugin_is_recognised_by_its_file_name() {
        let name = |s: &str| bin_name(Some(std::ffi::OsStr::new(s)));
        assert_eq!(name("/usr/local/bin/kubectl-kreboot"), "kubectl kreboot");
        assert_eq!(name("kubectl-kreboot"), "kubectl kreboot");
        assert_eq!(name("kubectl-kreboot.exe"), "kubectl kreboot");
        assert_eq!(name("/usr/bin/kreboot"), "kreboot");
        assert_eq!(name("kubectl-krebootx"), "kreboot");
        assert_eq!(name(""), "kreboot");
        assert_eq!(bin_name(None), "kreboot");
    }

    #[test]
    fn defaults_and_flags() {
        let c = agent(&["--node-name", "n1", "--namespace", "ns"])
            .validate()
            .unwrap();
        assert_eq!(c.reboot_command, vec!["systemctl", "reboot"]);
        assert!(c.host_namespaces);
        assert_eq!(c.concurrency, 1);
        assert_eq!(c.drain_grace_period, None);
        assert_eq!(c.lock_name, "kreboot-lock");
        let c = agent(&[
            "--node-name=n1",
            "--host-namespaces=false",
            "--drain-timeout",
            "90s",
            "--drain-grace-period",
            "5",
            "--force-reboot",
            "--reboot-command",
            "sh -c 'echo bye'",
        ])
        .validate()
        .unwrap();
        assert!(!c.host_namespaces);
        assert!(c.force_reboot);
        assert_eq!(c.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.drain_grace_period, Some(5));
        assert_eq!(c.reboot_command, vec!["sh", "-c", "echo bye"]);
    }

    #[test]
    fn bad_values_exit_with_usage_code() {
        let e = parse(&["agent", "--drain-timeout", "soon"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&["agent", "--no-such-flag"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let e = parse(&["agent", "--concurrency", "0"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = agent(&[
            "--node-name",
            "n1",
            "--lock-ttl",
            "1s",
            "--metrics-addr",
            "nowhere",
            "--reboot-command",
            "'",
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("--lock-ttl"), "{err}");
        assert!(err.contains("--metrics-addr"), "{err}");
        assert!(err.contains("--reboot-command"), "{err}");
    }

    #[test]
    fn alertmanager_url_needs_prometheus_and_is_kept_with_it() {
        let c = agent(&["--node-name", "n1", "--prometheus-url", "http://p:9090"])
            .validate()
            .unwrap();
        assert_eq!(
            c.blockers.prometheus.unwrap().alertmanager,
            None,
            "off by default"
        );
        let c = agent(&[
            "--node-name",
            "n1",
            "--prometheus-url",
            "http://p:9090",
            "--alertmanager-url",
            "http://am:9093",
        ])
        .validate()
        .unwrap();
        assert_eq!(
            c.blockers.prometheus.unwrap().alertmanager.as_deref(),
            Some("http://am:9093")
        );
        let err = agent(&["--node-name", "n1", "--alertmanager-url", "http://am:9093"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--alertmanager-url needs --prometheus-url"), "{err}");
        let err = agent(&[
            "--node-name",
            "n1",
            "--prometheus-url",
            "http://p:9090",
            "--alertmanager-url",
            "am:9093",
        ])
        .validate()
        .unwrap_err();
        assert!(
            err.contains("--alertmanager-url \"am:9093\" is not an http(s) URL"),
            "{err}"
        );
    }

    #[test]
    fn notify_flags() {
        let c = agent(&["--node-name", "n1"]).validate().unwrap();
        assert!(c.notify.targets.is_empty());
        assert_eq!(c.notify.drain.render("n1", ""), "Draining node n1");
        let c = agent(&[
            "--node-name",
            "n1",
            "--notify-url",
            "https://hooks.slack.com/services/T/B/X",
            "--notify-url=teams+http://127.0.0.1:1/t,http://127.0.0.1:2/w",
            "--message-template-reboot",
            "{node}: reboot for {reason}",
        ])
        .validate()
        .unwrap();
        let kinds: Vec<_> = c.notify.targets.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["slack", "teams", "webhook"]);
        assert_eq!(c.notify.reboot.render("n1", "kernel"), "n1: reboot for kernel");
        let err = agent(&[
            "--node-name",
            "n1",
            "--notify-url",
            "smtp://mail.example.com",
            "--message-template-drain",
            "Draining {host}",
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("--notify-url"), "{err}");
        assert!(
            err.contains("--message-template-drain") && err.contains("{host}"),
            "{err}"
        );
    }
}
