//! The preflight: an agent that cannot reach the host never takes a node out of service; and a
//! reboot that fails after the drain gives the node and the lock back.
//!
//! The real `kreboot agent` binary runs against the simulated cluster with a real sentinel
//! file. For the refusal it runs as an unprivileged uid (65534, no capabilities) against PID 1:
//! the kernel refuses it `/proc/1/ns/*` (a ptrace read of a root process) and `kill(1, 0)`,
//! exactly the answers an AppArmor-confined pod gets on an Ubuntu node (there because of the
//! runtime's default profile rather than the uid). The agent must then never join the lock
//! queue, take a slot or cordon; it reports `kreboot_host_access_ok 0`, the Event
//! `HostAccessDenied` with the reason, and `host_access` as what holds the reboot back (the Node's
//! `kreboot.io/blocked-by`, shown by `kreboot status`). As root the same agent proceeds to the
//! reboot. These tests need root (to switch uid, and to open PID 1's namespaces); without it
//! they say why and return.

use std::{
    collections::BTreeMap,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::{Killed as Agent, SimHost, agent_command, free_port, sample, scrape_metrics as scrape};
use kreboot::node::{ANN_BLOCKED_BY, ANN_LAST_FAILURE_REASON, ANN_PHASE};
use kreboot_testkit::sim::{SimCluster, SimConfig, SimEvent};

/// The unprivileged uid (and gid) the refused agent runs as.
const UID: u32 = 65534;
const LIMIT: Duration = Duration::from_secs(30);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The Events about `node`: (reason, note).
fn events(sim: &SimCluster, node: &str) -> Vec<(String, String)> {
    sim.events()
        .iter()
        .filter(|e| {
            let r = e.get("regarding").or_else(|| e.get("involvedObject"));
            r.and_then(|r| r.get("name")).and_then(|n| n.as_str()) == Some(node)
        })
        .filter_map(|e| {
            let reason = e.get("reason")?.as_str()?.to_owned();
            let note = e
                .get("note")
                .or_else(|| e.get("message"))
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_owned();
            Some((reason, note))
        })
        .collect()
}

fn annotations(sim: &SimCluster, node: &str) -> BTreeMap<String, String> {
    sim.node(node)
        .and_then(|n| n.metadata.annotations)
        .unwrap_or_default()
}

fn labels(sim: &SimCluster, node: &str) -> BTreeMap<String, String> {
    sim.node(node).and_then(|n| n.metadata.labels).unwrap_or_default()
}

fn unschedulable(sim: &SimCluster, node: &str) -> bool {
    sim.node(node)
        .and_then(|n| n.spec)
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

fn lease_holder(sim: &SimCluster) -> Option<String> {
    sim.lease("kube-system", "kreboot-lock")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .filter(|h| !h.is_empty())
}

/// A simulated cluster with node n1, and a directory (readable by uid 65534) holding its
/// kubeconfig and the sentinel, already present.
struct Setup {
    host: SimHost,
    sentinel: PathBuf,
}

async fn setup() -> Setup {
    let host = SimHost::start(SimConfig {
        reboot_duration: Duration::from_millis(500),
        ..SimConfig::default()
    })
    .await;
    let sentinel = host.open_to_other_uids();
    std::fs::write(&sentinel, "*** System restart required ***\n").expect("sentinel");
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    Setup { host, sentinel }
}

/// Starts `kreboot agent` for n1 with `flags` (they choose `--host-namespaces`), as `uid` (None:
/// as this process), logging to `agent.log` in the setup's directory.
fn spawn(s: &Setup, flags: &[&str], port: u16, uid: Option<u32>) -> Agent {
    let mut cmd = agent_command(&s.host.kubeconfig, &s.sentinel);
    cmd.args(flags)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "info")
        .current_dir(s.host.dir.path())
        .stderr(std::fs::File::create(log_path(s)).expect("log file"));
    if let Some(uid) = uid {
        // std drops the supplementary groups (setgroups) before setgid/setuid when root.
        cmd.uid(uid).gid(uid);
    }
    Agent::spawn(&mut cmd)
}

fn log_path(s: &Setup) -> PathBuf {
    s.host.agent_log()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Polls `cond` every 20 ms until it holds; panics with `what` and the agent's log otherwise.
async fn wait_for(s: &Setup, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let t = Instant::now();
    while !cond().await {
        assert!(
            t.elapsed() < LIMIT,
            "{what}: not within {LIMIT:?}; agent log:\n{}",
            log_text(&log_path(s))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The agent (as uid 65534) is refused the host: it reports once and never touches the node.
async fn refused(flags: &[&str], expect_in_note: &[&str]) {
    let s = setup().await;
    let port = free_port();
    let mut agent = spawn(&s, flags, port, Some(UID));
    let ok_series = "kreboot_host_access_ok{node=\"n1\"}";
    wait_for(&s, "kreboot_host_access_ok 0", async || {
        scrape(port).await.and_then(|m| sample(&m, ok_series)) == Some(0.0)
    })
    .await;
    wait_for(&s, "the HostAccessDenied Event", async || {
        events(&s.host.sim, "n1")
            .iter()
            .any(|(r, _)| r == "HostAccessDenied")
    })
    .await;
    wait_for(&s, "blocked-by host_access on the Node", async || {
        annotations(&s.host.sim, "n1")
            .get(ANN_BLOCKED_BY)
            .map(String::as_str)
            == Some("host_access")
    })
    .await;
    // The sentinel is there, the window open, the lock free: the only thing holding it back is
    // the preflight. Give it time to do something wrong.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        agent.0.try_wait().expect("try_wait").is_none(),
        "the agent keeps running"
    );
    let evs = events(&s.host.sim, "n1");
    let reasons: Vec<&str> = evs.iter().map(|(r, _)| r.as_str()).collect();
    for never in ["LockAcquired", "Cordoned", "Draining", "Rebooting"] {
        assert!(
            !reasons.contains(&never),
            "{never} despite the refusal: {reasons:?}"
        );
    }
    assert_eq!(
        reasons.iter().filter(|r| **r == "HostAccessDenied").count(),
        1,
        "reported once: {reasons:?}"
    );
    assert!(!unschedulable(&s.host.sim, "n1"), "never cordoned");
    assert_eq!(lease_holder(&s.host.sim), None, "never took the lock");
    assert!(
        !labels(&s.host.sim, "n1").contains_key("kreboot.io/waiting"),
        "never joined the lock queue"
    );
    assert!(
        !annotations(&s.host.sim, "n1").contains_key(ANN_PHASE),
        "no cycle started"
    );
    let note = &evs
        .iter()
        .find(|(r, _)| r == "HostAccessDenied")
        .expect("event")
        .1;
    for want in expect_in_note {
        assert!(note.contains(want), "the Event says {want:?}: {note}");
    }
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(
        sample(&m, "kreboot_reboot_blocked{node=\"n1\",reason=\"host_access\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "kreboot_state{node=\"n1\",state=\"pending\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(
        log_text(&log_path(&s)).contains("the reboot cannot reach the host"),
        "{}",
        log_text(&log_path(&s))
    );

    // `kreboot status` shows what holds the node back.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args(["status", "--namespace", "kube-system"])
        .env("KUBECONFIG", &s.host.kubeconfig)
        .env_remove("POD_NAMESPACE")
        .output()
        .await
        .expect("kreboot status runs");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table.lines().find(|l| l.starts_with("n1 ")).unwrap_or_default();
    assert!(row.contains("host_access"), "BLOCKED BY host_access:\n{table}");
    eprintln!("{table}");
    eprintln!("HostAccessDenied: {note}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_host_namespaces_never_cordon() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (the agent runs as uid {UID})");
        return;
    }
    refused(
        &["--host-namespaces=true", "--host-pid=1", "--reboot-command=true"],
        &[
            "cannot open the ipc namespace of process 1",
            "Permission denied",
            "needs CAP_SYS_PTRACE, which this process does not hold",
            "will not be cordoned or drained",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_signal_never_cordons() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (the agent runs as uid {UID})");
        return;
    }
    refused(
        &[
            "--host-namespaces=false",
            "--host-pid=1",
            "--reboot-method=signal",
        ],
        &[
            "cannot signal process 1 (kill with signal 0): EPERM",
            "needs to run as root (uid 0) or CAP_KILL",
        ],
    )
    .await;
}

/// As root the same agent may open the host process's namespaces: the preflight passes and the
/// cycle runs through to the reboot (a curl to the simulator, run inside those namespaces). The
/// "host" process is a child of the test (root, in the test's namespaces): in some sandboxes
/// even root with CAP_SYS_PTRACE is refused PID 1's namespaces (a Firecracker VM's init was),
/// which the preflight would rightly report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permitted_host_access_reboots() {
    if !is_root() {
        eprintln!("SKIPPED: needs root (to open /proc/1/ns/*)");
        return;
    }
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required (scripts/test installs it)");
    }
    let s = setup().await;
    let mut sim_events = s.host.sim.subscribe();
    let port = free_port();
    let reboot = format!(
        "--reboot-command=curl -sf -X POST {}/sim/v1/nodes/n1/reboot",
        s.host.sim.url()
    );
    let host = Agent(Command::new("sleep").arg("120").spawn().expect("sleep starts"));
    let host_pid = format!("--host-pid={}", host.0.id());
    let _agent = spawn(&s, &["--host-namespaces=true", &host_pid, &reboot], port, None);
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, sim_events.recv()).await {
            Ok(Ok(SimEvent::RebootStarted { node })) if node == "n1" => break,
            Ok(_) => {}
            Err(_) => panic!(
                "the reboot never reached the simulator; agent log:\n{}",
                log_text(&log_path(&s))
            ),
        }
    }
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(
        sample(&m, "kreboot_host_access_ok{node=\"n1\"}"),
        Some(1.0),
        "{m}"
    );
    let reasons: Vec<String> = events(&s.host.sim, "n1").into_iter().map(|(r, _)| r).collect();
    assert!(!reasons.iter().any(|r| r == "HostAccessDenied"), "{reasons:?}");
    for want in ["LockAcquired", "Cordoned", "Rebooting"] {
        assert!(reasons.iter().any(|r| r == want), "{want}: {reasons:?}");
    }
}

/// A reboot command that fails after the drain: the documented failure path (uncordon what
/// kreboot cordoned, record the failure, release the lock), not a retry that holds the lock and
/// the drained node. Needs no root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_reboot_uncordons_and_releases() {
    let s = setup().await;
    let port = free_port();
    let _agent = spawn(
        &s,
        &[
            "--host-namespaces=false",
            "--reboot-command=false",
            "--failure-backoff=10m",
        ],
        port,
        None,
    );
    wait_for(&s, "RebootFailed", async || {
        events(&s.host.sim, "n1").iter().any(|(r, _)| r == "RebootFailed")
    })
    .await;
    wait_for(&s, "uncordoned, cycle ended, lock released", async || {
        !unschedulable(&s.host.sim, "n1")
            && !annotations(&s.host.sim, "n1").contains_key(ANN_PHASE)
            && lease_holder(&s.host.sim).is_none()
    })
    .await;
    assert_eq!(
        annotations(&s.host.sim, "n1")
            .get(ANN_LAST_FAILURE_REASON)
            .map(String::as_str),
        Some("reboot_failed")
    );
    // The failure back-off holds: no second attempt, no lock, no cordon meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let evs = events(&s.host.sim, "n1");
    let count = |reason: &str| evs.iter().filter(|(r, _)| r == reason).count();
    assert_eq!(count("LockAcquired"), 1, "{evs:?}");
    assert_eq!(count("Rebooting"), 1, "{evs:?}");
    assert_eq!(count("RebootFailed"), 1, "{evs:?}");
    assert!(!unschedulable(&s.host.sim, "n1") && lease_holder(&s.host.sim).is_none());
    assert_eq!(
        annotations(&s.host.sim, "n1")
            .get(ANN_BLOCKED_BY)
            .map(String::as_str),
        Some("failure_backoff")
    );
    let note = &evs.iter().find(|(r, _)| r == "RebootFailed").expect("event").1;
    assert!(note.contains("lock released"), "{note}");
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(
        sample(
            &m,
            "kreboot_failures_total{node=\"n1\",reason=\"command_failed\",step=\"reboot\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// The chart (and so manifests/) lifts AppArmor's confinement; the README documents the Event,
/// the metric, the alert and the chart values.
#[test]
fn chart_and_readme_carry_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ds = std::fs::read_to_string(root.join("manifests/daemonset.yaml")).expect("daemonset");
    let sc = ds
        .split_once("          securityContext:\n")
        .map(|(_, rest)| {
            rest.split_once("          volumeMounts:")
                .map_or(rest, |(sc, _)| sc)
        })
        .expect("the container's securityContext");
    let lines: Vec<&str> = sc
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let has = |pair: &[&str]| lines.windows(pair.len()).any(|w| w == pair);
    assert!(has(&["appArmorProfile:", "type: Unconfined"]), "{sc}");
    // Every other restriction is kept.
    assert!(has(&["seccompProfile:", "type: RuntimeDefault"]), "{sc}");
    assert!(lines.contains(&"allowPrivilegeEscalation: false"), "{sc}");
    assert!(lines.contains(&"readOnlyRootFilesystem: true"), "{sc}");
    assert!(lines.contains(&"drop: [\"ALL\"]"), "{sc}");
    assert!(
        lines.contains(&"add: [\"SYS_ADMIN\", \"SYS_CHROOT\", \"SYS_PTRACE\"]"),
        "{sc}"
    );
    assert!(!sc.contains("privileged:"), "still not privileged: {sc}");
    assert!(
        !sc.contains("seLinuxOptions"),
        "SELinux options off by default: {sc}"
    );
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    for want in [
        "`HostAccessDenied`",
        "`kreboot_host_access_ok{node}`",
        "### KrebootHostAccessDenied",
        "`agent.appArmorProfile`",
        "`agent.seLinuxOptions`",
    ] {
        assert!(readme.contains(want), "README documents {want}");
    }
    assert_eq!(
        kreboot::events::Reason::HostAccessDenied.as_str(),
        "HostAccessDenied"
    );
}
