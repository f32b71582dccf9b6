//! A real Prometheus (Debian's `prometheus` package) scrapes a real `kreboot agent` process
//! running against the simulated cluster, evaluates the chart's alert rules (rendered by
//! scripts/check_chart.py with a threshold of 2 s instead of 48 h) and reports
//! KrebootRebootPendingTooLong firing for the node through its HTTP API. The same scrape passes
//! `promtool check metrics`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{BLACKOUT_EVERY_DAY, Killed, SimHost, free_port, put_policy, which};
use kreboot_testkit::sim::SimConfig;

fn short_rules() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chart-check/kreboot-rules-short.yaml");
    assert!(
        p.exists(),
        "{} is missing: scripts/check_chart.py renders it from the chart (./scripts/test runs it first)",
        p.display()
    );
    p
}

fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "2", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_reboot_pending_too_long_from_a_real_scrape() {
    let promtool = which("promtool");
    let rules = short_rules();

    let host = SimHost::start(SimConfig::default()).await;
    // A blackout covering every day: the reboot stays pending.
    put_policy(&host.sim, BLACKOUT_EVERY_DAY);
    let sentinel = host.path("reboot-required");
    std::fs::File::create(&sentinel).expect("sentinel");
    let metrics_port = free_port();
    let _agent = Killed::spawn(
        host.agent(&sentinel)
            .args(["--reboot-command", "false"])
            .arg(format!("--metrics-addr=127.0.0.1:{metrics_port}")),
    );

    let config = host.path("prometheus.yml");
    let mut f = std::fs::File::create(&config).expect("config");
    write!(
        f,
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: kreboot-metrics\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
        rules.display()
    )
    .expect("write config");
    let (_prom, prom_port) = common::start_prometheus(&config, host.dir.path());

    // The scrape itself is well-formed.
    let start = Instant::now();
    let text = loop {
        if let Some(t) = curl(&format!("http://127.0.0.1:{metrics_port}/metrics"))
            && t.contains("kreboot_reboot_required{node=\"n1\"} 1")
        {
            break t;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never reported the pending reboot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = check.wait_with_output().expect("promtool finishes");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The alert, through Prometheus's API.
    let start = Instant::now();
    loop {
        if let Some(body) = curl(&format!("http://127.0.0.1:{prom_port}/api/v1/alerts")) {
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from Prometheus");
            let firing = v["data"]["alerts"].as_array().into_iter().flatten().any(|a| {
                a["labels"]["alertname"] == "KrebootRebootPendingTooLong"
                    && a["labels"]["node"] == "n1"
                    && a["state"] == "firing"
            });
            if firing {
                eprintln!("firing after {:?}: {body}", start.elapsed());
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "KrebootRebootPendingTooLong did not fire within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Prometheus also sees why: the window is closed.
    let q = curl(&format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=kreboot_reboot_blocked%7Bnode%3D%22n1%22%7D%3D%3D1"
    ))
    .expect("query answers");
    assert!(
        q.contains("window_closed"),
        "blocked reason visible in Prometheus: {q}"
    );
}
