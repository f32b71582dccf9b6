//! The demo as a new user runs it (`cargo demo`, README "Two commands").

use std::process::Command;

/// What a new user runs first (README, "Two commands"): the demo finishes, and ends clean —
/// no ERROR or WARN line (it once ended with a client error and a failed Event because the
/// simulated cluster stopped before the last Event was sent).
#[test]
fn the_demo_ends_clean() {
    let out = Command::new(env!("CARGO_BIN_EXE_kreboot-demo"))
        .args(["--nodes", "3", "--reboot-duration", "1s"])
        .env_remove("RUST_LOG")
        .output()
        .expect("kreboot-demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("summary: 3 nodes rebooted"), "{stdout}");
    let bad: Vec<&str> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.split_whitespace().any(|w| w == "ERROR" || w == "WARN"))
        .collect();
    assert!(bad.is_empty(), "the demo logged:\n{}", bad.join("\n"));
}
