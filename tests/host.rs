//! Host integration, for real: commands run inside another process's namespaces (real mount and
//! UTS namespaces made with `unshare`), the capabilities that needs (each dropped in turn with
//! `setpriv`), the reboot signal delivered to a process that records it, the sentinel command's
//! exit codes and failures, and the host OS read from os-release samples.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use kreboot::{
    host::{HostError, HostExec, OsFamily, read_os_release},
    reboot::{Rebooter, SignalRebooter},
    sentinel::{CommandVerdict, run_sentinel_command},
};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            common::cannot_run(module_path!(), "needs root (CI runs as root)");
            return;
        }
    };
}

/// A process in its own mount, UTS, IPC and network namespaces, with a tmpfs holding a proof
/// file and its own hostname. Killed on drop.
struct Isolated {
    child: Child,
}

impl Isolated {
    fn start() -> Isolated {
        let child = Command::new("unshare")
            .args(["--mount", "--uts", "--ipc", "--net", "--", "sh", "-c"])
            .arg(
                "mount -t tmpfs kreboot-test /mnt && echo inside-the-namespace > /mnt/kreboot-proof \
                 && hostname kreboot-ns-test && touch /mnt/ready && exec sleep 120",
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("unshare starts");
        let pid = child.id();
        let started = Instant::now();
        // The proof file is visible only inside; read it through /proc/<pid>/root.
        while !Path::new(&format!("/proc/{pid}/root/mnt/ready")).exists() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the isolated process never got ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Isolated { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn run(exec: &HostExec, argv: &[&str]) -> Result<(Option<i32>, String), HostError> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    exec.run(&argv, Duration::from_secs(10))
        .await
        .map(|f| (f.code, f.stdout))
}

#[tokio::test]
async fn commands_run_inside_the_target_namespaces() {
    require_root!();
    let target = Isolated::start();
    let inside = HostExec {
        host_namespaces: true,
        host_pid: target.pid(),
    };
    let own = HostExec {
        host_namespaces: false,
        host_pid: target.pid(),
    };
    assert_eq!(
        run(&inside, &["cat", "/mnt/kreboot-proof"]).await.unwrap(),
        (Some(0), "inside-the-namespace".into())
    );
    assert_eq!(
        run(&inside, &["hostname"]).await.unwrap(),
        (Some(0), "kreboot-ns-test".into())
    );
    let (code, _) = run(&own, &["cat", "/mnt/kreboot-proof"]).await.unwrap();
    assert_ne!(code, Some(0), "the agent's own namespace does not see the tmpfs");
    let (_, name) = run(&own, &["hostname"]).await.unwrap();
    assert_ne!(name, "kreboot-ns-test");
    // The network namespace too: a fresh one has only a loopback device, and it is down.
    let (_, links) = run(&inside, &["cat", "/proc/net/dev"]).await.unwrap();
    assert_eq!(
        links.lines().filter(|l| l.contains(':')).count(),
        1,
        "only lo inside:\n{links}"
    );
}

fn host_exec_with_caps(pid: i32, caps: &str, argv: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .arg(format!("--bounding-set=-all,{caps}"))
        .arg("--inh-caps=-all")
        .arg(env!("CARGO_BIN_EXE_kreboot"))
        .args(["host-exec", "--host-pid", &pid.to_string(), "--"])
        .args(argv)
        .output()
        .expect("setpriv runs")
}

#[test]
fn the_capabilities_needed_are_sys_admin_sys_chroot_and_sys_ptrace() {
    require_root!();
    let target = Isolated::start();
    let all = "+sys_admin,+sys_chroot,+sys_ptrace";
    let ok = host_exec_with_caps(target.pid(), all, &["hostname"]);
    assert!(
        ok.status.success(),
        "with {all}: {}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "kreboot-ns-test");
    for (dropped, rest) in [
        ("sys_admin", "+sys_chroot,+sys_ptrace"),
        ("sys_chroot", "+sys_admin,+sys_ptrace"),
        ("sys_ptrace", "+sys_admin,+sys_chroot"),
    ] {
        let out = host_exec_with_caps(target.pid(), rest, &["hostname"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("without {dropped}: {}", stderr.trim());
        assert!(!out.status.success(), "host-exec worked without {dropped}");
        assert!(
            stderr.contains("error:"),
            "a clear error without {dropped}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_signal_method_delivers_sigrtmin_plus_5() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("got-signal");
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap 'echo $(kill -l RTMIN+5) > {}; exit 0' RTMIN+5; touch {}.ready; while true; do sleep 0.05; done",
            flag.display(),
            flag.display()
        ))
        .spawn()
        .unwrap();
    let ready = dir.path().join("got-signal.ready");
    let started = Instant::now();
    while !ready.exists() {
        assert!(started.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
    SignalRebooter {
        pid: child.id() as i32,
    }
    .reboot()
    .await
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "the trap ran and exited 0");
    let got: i32 = std::fs::read_to_string(&flag).unwrap().trim().parse().unwrap();
    assert_eq!(got, kreboot::reboot::reboot_signal(), "SIGRTMIN+5 arrived");
}

#[tokio::test]
async fn sentinel_command_outcomes_and_bad_input() {
    let own = HostExec {
        host_namespaces: false,
        host_pid: 1,
    };
    let argv = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let t = Duration::from_secs(5);
    assert_eq!(
        run_sentinel_command(&own, &argv(&["true"]), t, false).await,
        CommandVerdict::Required
    );
    assert_eq!(
        run_sentinel_command(&own, &argv(&["false"]), t, false).await,
        CommandVerdict::NotRequired
    );
    assert_eq!(
        run_sentinel_command(&own, &argv(&["false"]), t, true).await,
        CommandVerdict::Required
    );
    let CommandVerdict::Error(e) = run_sentinel_command(&own, &argv(&["sh", "-c", "exit 2"]), t, false).await
    else {
        panic!("exit 2 is an error")
    };
    assert!(e.contains("code 2"), "{e}");
    let CommandVerdict::Error(e) = run_sentinel_command(&own, &argv(&["/no/such/command"]), t, false).await
    else {
        panic!("a missing command is an error")
    };
    assert!(e.contains("cannot start"), "{e}");
    let started = Instant::now();
    let CommandVerdict::Error(e) =
        run_sentinel_command(&own, &argv(&["sleep", "30"]), Duration::from_millis(300), false).await
    else {
        panic!("a hanging command is an error")
    };
    assert!(e.contains("did not finish"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the hanging command was cut off"
    );
    let missing = HostExec {
        host_namespaces: true,
        host_pid: i32::MAX - 7,
    };
    let e = missing.run(&argv(&["true"]), t).await.unwrap_err();
    assert!(matches!(e, HostError::NoSuchProcess { .. }), "{e}");
    assert!(
        e.to_string().contains("hostPID"),
        "the message says what to check: {e}"
    );
}

#[test]
fn os_release_samples() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/os-release");
    for (file, id, version, family) in [
        ("ubuntu-22.04", "ubuntu", "22.04", OsFamily::Ubuntu),
        ("ubuntu-24.04", "ubuntu", "24.04", OsFamily::Ubuntu),
        ("azurelinux-2.0", "mariner", "2.0", OsFamily::AzureLinux),
        ("azurelinux-3.0", "azurelinux", "3.0", OsFamily::AzureLinux),
        ("unknown", "somelinux", "", OsFamily::Unknown),
    ] {
        let root = dir.path().join(file);
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::copy(fixtures.join(file), root.join("etc/os-release")).unwrap();
        let info = read_os_release(&root);
        assert_eq!(
            (info.id.as_str(), info.version_id.as_str(), info.family),
            (id, version, family),
            "{file}"
        );
    }
    let empty = read_os_release(&dir.path().join("nothing-here"));
    assert_eq!((empty.id.as_str(), empty.family), ("unknown", OsFamily::Unknown));
}
