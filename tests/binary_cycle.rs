//! The real `kreboot` binary through one full cycle, as the DaemonSet runs it: configuration
//! from KUBECONFIG and flags, a real sentinel file watched with inotify, metrics scraped over
//! HTTP, and a reboot command (curl to the simulator's reboot endpoint) run as a real process.
//! The test plays the machine: when the simulated node goes down it kills the agent and removes
//! the sentinel (a tmpfs), and starts the agent again when the node is Ready.

mod common;

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use common::{Killed, SimHost, free_port};
use kreboot::node::{ANN_LAST_REBOOT, ANN_PHASE};
use kreboot_testkit::sim::{self, SimConfig, SimEvent};

/// The agent as the DaemonSet runs it for n1, its reboot command a POST to `reboot_url`.
fn spawn_agent(host: &SimHost, sentinel: &Path, reboot_url: &str, port: u16) -> Killed {
    Killed::spawn(
        host.agent(sentinel)
            .arg("--reboot-command")
            .arg(format!("curl -sf -X POST {reboot_url}"))
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .args(["--log-format", "json"]),
    )
}

async fn scrape(port: u16) -> Option<String> {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_full_cycle_with_real_sentinel_and_reboot_command() {
    if Command::new("curl").arg("--version").output().is_err() {
        panic!("curl is required (scripts/test installs it)");
    }
    let host = SimHost::start(SimConfig {
        reboot_duration: Duration::from_millis(500),
        ..SimConfig::default()
    })
    .await;
    let sim = &host.sim;
    sim.add_pod(
        sim::pod("apps", "web", "n1")
            .grace(1)
            .shutdown_seconds(0.1)
            .build(),
    );
    let sentinel = host.path("run/reboot-required");
    let reboot_url = format!("{}/sim/v1/nodes/n1/reboot", sim.url());
    let port = free_port();
    let mut events = sim.subscribe();
    let mut agent = spawn_agent(&host, &sentinel, &reboot_url, port);

    // The sentinel's directory does not exist yet; the agent copes and reports 0.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = scrape(port).await
            && m.contains("kreboot_reboot_required{node=\"n1\"} 0")
        {
            break;
        }
        assert!(Instant::now() < deadline, "metrics endpoint never came up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::create_dir_all(sentinel.parent().unwrap()).unwrap();
    std::fs::write(&sentinel, "*** System restart required ***\n").unwrap();
    let created = Instant::now();
    loop {
        if let Some(m) = scrape(port).await
            && m.contains("kreboot_reboot_required{node=\"n1\"} 1")
        {
            break;
        }
        assert!(
            created.elapsed() < Duration::from_secs(5),
            "metric never followed the sentinel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "sentinel -> metric seen after {:?} (scraping every 10 ms)",
        created.elapsed()
    );

    // The agent drains and runs the reboot command; the simulated node goes down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(SimEvent::RebootStarted { node })) if node == "n1" => break,
            Ok(_) => {}
            Err(_) => panic!("the reboot command never reached the simulator"),
        }
    }
    // The machine went down: the agent dies with it, /var/run is a fresh tmpfs afterwards.
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    std::fs::remove_file(&sentinel).unwrap();
    assert_eq!(
        sim.node("n1")
            .unwrap()
            .metadata
            .annotations
            .unwrap()
            .get(ANN_PHASE)
            .map(String::as_str),
        Some("rebooting")
    );
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(SimEvent::NodeReady { node, .. })) if node == "n1" => break,
            Ok(_) => {}
            Err(_) => panic!("the node never came back"),
        }
    }
    let mut agent = spawn_agent(&host, &sentinel, &reboot_url, port);
    let back = Instant::now();
    loop {
        let n = sim.node("n1").unwrap();
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        if ann.contains_key(ANN_LAST_REBOOT) && !ann.contains_key(ANN_PHASE) {
            assert_ne!(n.spec.and_then(|s| s.unschedulable), Some(true), "uncordoned");
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the cycle never completed: {ann:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "restarted agent -> uncordoned after {:?} (includes process start)",
        back.elapsed()
    );
    // The lock is released right after the Node's record is cleared (two writes).
    let released = Instant::now();
    while sim
        .lease("kube-system", "kreboot-lock")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
        .is_some_and(|h| !h.is_empty())
    {
        assert!(released.elapsed() < Duration::from_secs(5), "lock never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "graceful exit on SIGTERM: {status:?}");
}
