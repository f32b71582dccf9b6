//! The `kreboot` binary's command line, run as a black box: bad input gets a clear message and
//! exit code 2; an unreachable API server is retried with back-off, never a panic.

mod common;

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::kreboot_alone;

fn run(args: &[&str]) -> (i32, String) {
    let out = kreboot_alone().args(args).output().expect("kreboot runs");
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let (code, text) = run(&["agent", "--node-name", "n1", "--reboot-sooner"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--reboot-sooner"), "{text}");
}

#[test]
fn bad_duration_is_a_usage_error() {
    let (code, text) = run(&["agent", "--node-name", "n1", "--drain-timeout", "forever"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--drain-timeout"), "{text}");
    assert!(text.contains("30m"), "the message shows valid examples: {text}");
}

#[test]
fn bad_duration_from_the_environment_is_a_usage_error() {
    let out = kreboot_alone()
        .args(["agent", "--node-name", "n1"])
        .env("KREBOOT_LOCK_TTL", "a while")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lock-ttl"));
}

#[test]
fn missing_node_name_is_explained() {
    let (code, text) = run(&["agent"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no node name"), "{text}");
    assert!(text.contains("NODE_NAME"), "{text}");
}

#[test]
fn help_explains_every_flag() {
    let (code, text) = run(&["agent", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--node-name",
        "--namespace",
        "--config-map",
        "--lock-name",
        "--concurrency",
        "--sentinel-file",
        "--reboot-command",
        "--host-namespaces",
        "--drain-timeout",
        "--drain-grace-period",
        "--force-reboot",
        "--lock-ttl",
        "--reboot-delay",
        "--metrics-addr",
        "--log-format",
        "--dry-run",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}");
    }
    assert!(
        text.contains("KREBOOT_DRAIN_TIMEOUT"),
        "env names are shown: {text}"
    );
}

#[test]
fn unreachable_api_server_is_retried_with_backoff() {
    let dir = tempfile::tempdir().unwrap();
    // Port 1 on loopback: nothing listens there, connections are refused at once.
    let kubeconfig = common::unreachable_kubeconfig(dir.path());
    let mut child = kreboot_alone()
        .args([
            "agent",
            "--node-name",
            "n1",
            "--metrics-addr",
            "off",
            "--host-namespaces=false",
            "--sentinel-file",
        ])
        .arg(dir.path().join("reboot-required"))
        .env("KUBECONFIG", &kubeconfig)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(child.try_wait().unwrap().is_none(), "the agent keeps running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGTERM is obeyed promptly"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(status.success(), "clean exit after SIGTERM: {status:?}\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    let retries = log.matches("cannot reach the API server; retrying").count();
    assert!(retries >= 2, "retries are logged ({retries}):\n{log}");
    assert!(log.contains("retry_in=2s"), "back-off grows:\n{log}");
}

/// Run as the kubectl plugin (a file named `kubectl-kreboot`, as kubectl finds plugins), the
/// binary takes the same commands and its help names what the user typed.
#[test]
fn runs_as_the_kubectl_plugin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plugin = dir.path().join("kubectl-kreboot");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_kreboot"), &plugin).expect("symlink");
    let run_as = |args: &[&str]| {
        let out = Command::new(&plugin)
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("KREBOOT_NODE_NAME")
            .output()
            .expect("kubectl-kreboot runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    };
    let (code, text) = run_as(&["--help"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Usage: kubectl kreboot <COMMAND>"), "{text}");
    for sub in ["status", "drain", "pause", "resume", "reboot"] {
        assert!(text.contains(sub), "{sub} listed: {text}");
    }
    let (code, text) = run_as(&["agent"]);
    assert_eq!(code, 2, "same validation as kreboot: {text}");
    assert!(text.contains("no node name"), "{text}");
    let (code, text) = run_as(&["reboot"]);
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("kubectl kreboot reboot"),
        "usage names the plugin: {text}"
    );
    // The plain binary keeps its own name.
    let (_, text) = run(&["--help"]);
    assert!(text.contains("Usage: kreboot <COMMAND>"), "{text}");
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef kreboot"),
        ("fish", "complete -c kreboot"),
    ] {
        let (code, text) = run(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {text}");
        assert!(text.contains(marker), "{shell}: {}", &text[..text.len().min(300)]);
        for sub in ["pause", "resume", "reboot", "status", "selector"] {
            assert!(text.contains(sub), "{shell} completes {sub}");
        }
    }
    let (code, text) = run(&["completions", "powershell-7"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("possible values: bash, zsh, fish"), "{text}");
}

#[test]
fn man_page_is_roff_and_lists_the_commands() {
    let (code, text) = run(&["man"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.starts_with(".ie \\n(.g .ds Aq") || text.contains(".TH kreboot 1"),
        "{}",
        &text[..text.len().min(300)]
    );
    assert!(text.contains(".TH kreboot 1"), "a section-1 page");
    for sub in ["pause", "resume", "reboot", "status", "drain"] {
        assert!(text.contains(sub), "the page names {sub}");
    }
}
