//! End to end on a real Linux VM: kreboot reboots a Debian guest through systemd, and the guest
//! comes back.
//!
//! The guest (qemu under software emulation, Debian bookworm built by `tests/vm/build-image.sh`
//! and cached under `target/vm/`) runs the static musl kreboot the way the DaemonSet runs it: in
//! its own mount namespace whose root holds nothing but the binary (systemd `RootDirectory=`),
//! the kubeconfig and the host's /var/run read-only, with PID 1 visible. `systemctl` cannot be
//! reached from there: the reboot only works through `setns` into PID 1's namespaces (method
//! `command`), or SIGRTMIN+5 to PID 1 (method `signal`). The test plays the kubelet from outside
//! the guest: on every boot it reports the boot id the guest printed on its console, and Ready.
//!
//! The API server is the real control plane (tests/common/real.rs: kube-apiserver, etcd,
//! kube-controller-manager, KWOK for the pods) on 127.0.0.1, serving TLS with a certificate that
//! also names 10.0.2.100. qemu's user network runs with `restrict=on`: the guest reaches nothing
//! but one `guestfwd` rule, 10.0.2.100:6443, whose connections qemu hands to a relay (bash's
//! /dev/tcp) to kube-apiserver's port. Everything is real except the kubelet: the test reports
//! the guest's real boot id, KWOK runs the (fake) application pods.
//!
//! The guest runs AppArmor (Debian's kernel and `apparmor` package) with a profile that confines
//! as the container runtimes' default does. A first run confines the agent with it, as a pod
//! that says nothing about AppArmor runs on an Ubuntu node: the preflight must refuse before
//! any disruption. The two cycles run the agent as the chart does (AppArmor `Unconfined`).
//!
//! Without root, qemu-system-x86_64 or debootstrap (scripts/test installs them) it fails under CI
//! and says SKIPPED, loudly, elsewhere.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{
    artifact::{run, static_kreboot},
    cannot_run, found,
    real::{self, ControlPlane},
};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Pod},
    events::v1::Event,
};
use kreboot::node::{ANN_LAST_REBOOT, ANN_PHASE, PREFIX};
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams, PostParams},
};
use serde_json::json;

const NODE: &str = "kreboot-vm";

const BUILD_SCRIPT: &str = include_str!("vm/build-image.sh");

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// FNV-1a: a hash that is the same on every machine and toolchain (the image cache key).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The cached image directory (disk.ext4, vmlinuz, initrd.img), built when missing. It lives
/// outside the clone (`$KREBOOT_CACHE`, else `~/.cache/kreboot`), keyed by the build script's
/// hash, so a fresh clone on a warm machine builds nothing (scripts/test computes the same path).
fn image() -> PathBuf {
    let cache = std::env::var_os("KREBOOT_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/kreboot"),
        PathBuf::from,
    );
    let dir = cache.join(format!("vm-image-{:016x}", fnv1a(BUILD_SCRIPT.as_bytes())));
    if dir.join("disk.ext4").is_file() {
        eprintln!("[vm] image: cached {dir:?}");
        return dir;
    }
    let started = Instant::now();
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    let out = run(
        Command::new("bash")
            .arg(manifest_dir().join("tests/vm/build-image.sh"))
            .arg(&dir),
        "tests/vm/build-image.sh",
        Duration::from_secs(20 * 60),
    );
    eprintln!("[vm] {}", out.trim());
    eprintln!("[vm] phase image build: {:.1?}", started.elapsed());
    dir
}

/// A running qemu; killed by its PID when dropped (end of test, timeout, panic).
struct Vm {
    child: Child,
    console: PathBuf,
}

impl Vm {
    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        eprintln!("[vm] qemu (pid {pid}) stopped");
    }
}

/// The boot ids the guest printed on its console, in order.
fn console_boot_ids(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.split("VMTEST: boot_id=").nth(1))
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() == 36)
        .collect()
}

/// What the test reads of the cluster, all through the API.
#[derive(Debug, Default)]
struct Seen {
    lock_holder: Option<String>,
    boot_id: String,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    cordoned: bool,
    /// Pods bound to the node (terminating ones included).
    pods_on_node: usize,
    /// The message of the agent's `HostAccessDenied` Event about the node, once there is one.
    host_access_denied: Option<String>,
}

async fn look(client: &kube::Client) -> Seen {
    let mut seen = Seen::default();
    if let Ok(Some(n)) = Api::<Node>::all(client.clone()).get_opt(NODE).await {
        seen.boot_id = n
            .status
            .and_then(|s| s.node_info)
            .map(|i| i.boot_id)
            .unwrap_or_default();
        seen.annotations = n.metadata.annotations.unwrap_or_default();
        seen.labels = n.metadata.labels.unwrap_or_default();
        seen.cordoned = n.spec.and_then(|s| s.unschedulable).unwrap_or(false);
    }
    if let Ok(Some(l)) = Api::<Lease>::namespaced(client.clone(), "kube-system")
        .get_opt("kreboot-lock")
        .await
    {
        seen.lock_holder = l.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty());
    }
    if let Ok(pods) = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await
    {
        seen.pods_on_node = pods.items.len();
    }
    if let Ok(events) = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        seen.host_access_denied = events
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("HostAccessDenied"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(NODE))
            .find_map(|e| e.note);
    }
    seen
}

/// Reads the cluster every 100 ms until `cond` holds; panics with the console's tail after
/// `limit`.
async fn wait_for(
    vm: &Vm,
    client: &kube::Client,
    what: &str,
    limit: Duration,
    mut cond: impl FnMut(&Seen) -> bool,
) -> Duration {
    let start = Instant::now();
    while !cond(&look(client).await) {
        if start.elapsed() > limit {
            let console = vm.console();
            let tail: Vec<&str> = console.lines().rev().take(60).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "timed out after {limit:?} waiting for: {what}\n--- console (last 60 lines) ---\n{}",
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

/// Plays the kubelet's part, from outside the guest (which has no kubelet): once the guest has
/// printed the boot id of its `nth` boot (0: the first) on its console, reports it in the
/// Node's status with Ready=True, as a kubelet reports its machine's boot id after a boot.
/// Returns the boot id and how long the boot took to print it.
async fn report_boot(vm: &Vm, client: &kube::Client, nth: usize) -> (String, Duration) {
    let t = wait_for(
        vm,
        client,
        &format!("boot {}: its boot id on the console", nth + 1),
        Duration::from_secs(300),
        |_| console_boot_ids(&vm.console()).len() > nth,
    )
    .await;
    let boot_id = console_boot_ids(&vm.console())[nth].clone();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let status = json!({
        "status": {
            "nodeInfo": { "bootID": boot_id },
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "reported by the VM test for the guest", "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }
    });
    Api::<Node>::all(client.clone())
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("report the guest's boot id in its Node's status");
    (boot_id, t)
}

/// A guest booting from a fresh copy of the image, and the control plane it reports to.
struct Booted {
    // Dropped first: qemu stops before its API server does.
    vm: Vm,
    client: kube::Client,
    _cp: ControlPlane,
}

/// The guest's watcher of the agent (see `boot`): straight to the console, not through
/// journald, so it speaks even when journald does not. Per thread of the agent: state, kernel
/// wait channel and the top of its kernel stack; then the agent's TCP sockets to port 6443
/// (0x192B) with their send and receive queues, and journald's own state.
const DIAG_UNIT: &str = "[Unit]
Description=VM test: what the agent waits on, every 20 s
After=kreboot-agent.service

[Service]
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
ExecStart=/bin/sh /usr/local/sbin/vmtest-diag.sh

[Install]
WantedBy=multi-user.target
";

/// The script of [`DIAG_UNIT`].
const DIAG_SCRIPT: &str = r#"while sleep 20; do
  p=$(systemctl show -p MainPID --value kreboot-agent.service)
  j=$(systemctl show -p MainPID --value systemd-journald.service)
  [ "$p" -gt 0 ] 2>/dev/null || continue
  for t in /proc/$p/task/*; do
    echo "VMDIAG agent $p thread ${t##*/} state=$(cut -d' ' -f3 $t/stat) wchan=$(cat $t/wchan) stack: $(head -5 $t/stack | cut -d' ' -f2 | tr '\n' ' ')"
  done
  grep -i ':192B ' /proc/net/tcp | while read -r sl l r st q rest; do echo "VMDIAG tcp $l -> $r st=$st tx:rx=$q"; done
  echo "VMDIAG journald $j state=$(cut -d' ' -f3 /proc/$j/stat) wchan=$(cat /proc/$j/wchan)"
done
"#;

/// The Node's boot id before this machine's kubelet first reported (a stale one).
const FAKE_BOOT_ID: &str = "00000000-0000-4000-8000-000000000000";

/// How the agent's unit is confined in a run.
#[derive(Clone, Copy, PartialEq)]
enum Confinement {
    /// As the chart runs it: AppArmor `Unconfined` (the unit sets no profile).
    Chart,
    /// As a pod that asks for nothing on an AppArmor node: the runtime's default profile
    /// (the image's `cri-containerd.apparmor.d`), through a drop-in with `AppArmorProfile=`.
    RuntimeDefault,
}

/// Starts a control plane (the VM's Node and two pods on it) and boots a fresh copy of the image
/// with the agent using `method` (command or signal), confined as `confinement` says.
async fn boot(
    image: &Path,
    kreboot: &Path,
    run_name: &str,
    method: &str,
    confinement: Confinement,
) -> Booted {
    let dir = manifest_dir().join("target/vm").join(format!("run-{run_name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.ext4");
    run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(image.join("disk.ext4"))
            .arg(&disk),
        "copying the image",
        Duration::from_secs(120),
    );
    // The control plane, its certificate valid for the guestfwd address too.
    let cp = ControlPlane::start(real::Options {
        extra_ips: vec!["10.0.2.100".into()],
        ..real::Options::default()
    })
    .await;
    let client = cp.admin_client();
    let port: u16 = cp.url.rsplit(':').next().unwrap().parse().unwrap();
    for ns in ["kube-system", "apps"] {
        let _ = Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await;
    }
    // The Node as it was before this machine's kubelet first reported (a stale boot id).
    let fake_boot_id = FAKE_BOOT_ID;
    Api::<Node>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": { "name": NODE, "labels": { "kubernetes.io/hostname": NODE } },
                "status": {
                    "nodeInfo": {
                        "architecture": "amd64", "bootID": fake_boot_id, "containerRuntimeVersion": "",
                        "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "",
                        "machineID": NODE, "operatingSystem": "linux", "osImage": "", "systemUUID": NODE,
                    },
                    "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
                                     "message": "registered by the test" }],
                },
            }))
            .unwrap(),
        )
        .await
        .expect("create the VM's Node");
    for name in ["web", "db"] {
        Api::<Pod>::namespaced(client.clone(), "apps")
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": {
                        "nodeName": NODE, "serviceAccountName": "default",
                        "automountServiceAccountToken": false, "terminationGracePeriodSeconds": 2,
                        "containers": [{ "name": "app", "image": "registry.invalid/app:1" }],
                    },
                }))
                .unwrap(),
            )
            .await
            .expect("create a pod on the VM's node");
    }

    // The binary goes into the agent's empty root, and the kubeconfig (kube-apiserver at the
    // guestfwd address, its CA, a token) replaces the image's.
    let kubeconfig = dir.join("kubeconfig");
    let written = cp.write_kubeconfig("vm", real::ADMIN_TOKEN);
    let text = std::fs::read_to_string(&written)
        .unwrap()
        .replace(&cp.url, "https://10.0.2.100:6443");
    std::fs::write(&kubeconfig, text).unwrap();
    let mut cmds_text = format!(
        "cd /opt/kreboot-root\nwrite {} kreboot\nsif kreboot mode 0100755\ncd /etc/kreboot\nrm kubeconfig\nwrite {} kubeconfig\n",
        kreboot.display(),
        kubeconfig.display()
    );
    // The agent logs its own steps at debug level (on the console through journald), and a
    // watcher that does not go through journald prints, every 20 s, what each of the agent's
    // threads waits on in the kernel and what sits unread in its API connections: a guest
    // whose agent falls silent says whether it is frozen (blocked in a write, its sockets
    // filling) or waiting for an answer that never comes.
    let diag_dropin = dir.join("diag.conf");
    std::fs::write(
        &diag_dropin,
        "[Service]\nEnvironment=RUST_LOG=info,kreboot=debug\n",
    )
    .unwrap();
    let diag_unit = dir.join("vmtest-diag.service");
    std::fs::write(&diag_unit, DIAG_UNIT).unwrap();
    let diag_script = dir.join("vmtest-diag.sh");
    std::fs::write(&diag_script, DIAG_SCRIPT).unwrap();
    cmds_text.push_str(&format!(
        "mkdir /etc/systemd/system/kreboot-agent.service.d\ncd /etc/systemd/system/kreboot-agent.service.d\nwrite {} diag.conf\ncd /etc/systemd/system\nwrite {} vmtest-diag.service\ncd /usr/local/sbin\nwrite {} vmtest-diag.sh\ncd /etc/systemd/system/multi-user.target.wants\nsymlink vmtest-diag.service /etc/systemd/system/vmtest-diag.service\n",
        diag_dropin.display(),
        diag_unit.display(),
        diag_script.display()
    ));
    if confinement == Confinement::RuntimeDefault {
        let dropin = dir.join("apparmor.conf");
        std::fs::write(&dropin, "[Service]\nAppArmorProfile=cri-containerd.apparmor.d\n").unwrap();
        cmds_text.push_str(&format!(
            "cd /etc/systemd/system/kreboot-agent.service.d\nwrite {} apparmor.conf\n",
            dropin.display()
        ));
    }
    let cmds = dir.join("debugfs.cmds");
    std::fs::write(&cmds, cmds_text).unwrap();
    run(
        Command::new("debugfs").arg("-w").arg("-f").arg(&cmds).arg(&disk),
        "debugfs (writing kreboot into the image)",
        Duration::from_secs(60),
    );
    let stat = run(
        Command::new("debugfs")
            .arg("-R")
            .arg("stat /opt/kreboot-root/kreboot")
            .arg(&disk),
        "debugfs stat",
        Duration::from_secs(60),
    );
    let size = std::fs::metadata(kreboot).unwrap().len();
    assert!(
        stat.contains(&format!("Size: {size}")) && stat.contains("Mode:  0755"),
        "kreboot not written into the image:\n{stat}"
    );

    // Every guest connection to 10.0.2.100:6443 gets its own relay to kube-apiserver (qemu runs
    // it with the connection on stdin/stdout); when either side ends, both do. A background
    // job's stdin is /dev/null unless redirected: hence fd 4.
    let relay = dir.join("relay.sh");
    std::fs::write(
        &relay,
        format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} 4<&0 || exit 1\ncat <&3 & r=$!\ncat <&4 >&3 & w=$!\nwait -n\nkill $r $w 2>/dev/null\n"
        ),
    )
    .unwrap();
    let console = dir.join("console.log");
    let qemu_log = std::fs::File::create(dir.join("qemu.log")).unwrap();
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initrd.img"))
        .arg("-append")
        .arg(format!(
            "root=/dev/vda rw console=ttyS0 fsck.mode=skip systemd.setenv=KREBOOT_REBOOT_METHOD={method}"
        ))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:6443-cmd:/bin/bash {}",
            relay.display()
        ))
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(qemu_log.try_clone().unwrap())
        .stderr(qemu_log)
        .spawn()
        .expect("qemu starts");
    let vm = Vm { child, console };
    eprintln!(
        "[vm:{run_name}] qemu pid {} (console: {:?})",
        vm.child.id(),
        vm.console
    );
    Booted { vm, client, _cp: cp }
}

/// One full cycle in a fresh copy of the image with `method` (command or signal), the agent
/// confined as the chart confines it.
async fn cycle(image: &Path, kreboot: &Path, method: &str) {
    let total = Instant::now();
    let Booted { vm, client, _cp: cp } = boot(image, kreboot, method, method, Confinement::Chart).await;
    let fake_boot_id = FAKE_BOOT_ID;

    // First boot: its real boot id reported.
    let (boot1, t) = report_boot(&vm, &client, 0).await;
    assert_ne!(boot1, fake_boot_id);
    eprintln!("[vm:{method}] phase first boot: {t:.1?} (boot id {boot1})");

    // The cycle: lease, cordon, evictions, then the recorded reboot.
    let (mut lease_at, mut cordon_at, mut evicted_at) = (None, None, None);
    let started = Instant::now();
    let t = wait_for(
        &vm,
        &client,
        "lease, cordon, drain and phase=rebooting",
        Duration::from_secs(180),
        |s| {
            if lease_at.is_none() && s.lock_holder.as_deref() == Some(NODE) {
                lease_at = Some(started.elapsed());
            }
            if cordon_at.is_none() && s.cordoned {
                cordon_at = Some(started.elapsed());
            }
            if evicted_at.is_none() && s.pods_on_node == 0 {
                evicted_at = Some(started.elapsed());
            }
            s.annotations.get(ANN_PHASE).map(String::as_str) == Some("rebooting")
        },
    )
    .await;
    eprintln!(
        "[vm:{method}] phase cycle (sentinel seen -> reboot requested): {t:.1?} (lease at {lease_at:.1?}, cordoned at {cordon_at:.1?}, pods evicted at {evicted_at:.1?})"
    );
    let s = look(&client).await;
    assert_eq!(s.lock_holder.as_deref(), Some(NODE), "lease held while rebooting");
    assert!(s.cordoned, "cordoned while rebooting");
    assert_eq!(s.pods_on_node, 0, "pods evicted before the reboot");
    assert_eq!(
        s.annotations.get(kreboot::node::ANN_PRE_REBOOT_BOOT_ID),
        Some(&boot1),
        "the boot id before the reboot is recorded"
    );

    // The reboot: systemd takes the machine down, the kernel restarts it.
    let t = wait_for(
        &vm,
        &client,
        "the guest kernel restarting",
        Duration::from_secs(180),
        |_| vm.console().contains("reboot: Restarting system"),
    )
    .await;
    eprintln!("[vm:{method}] phase reboot (requested -> kernel restart): {t:.1?}");

    // Second boot: a new boot id, reported.
    let (boot2, t) = report_boot(&vm, &client, 1).await;
    eprintln!("[vm:{method}] phase second boot: {t:.1?} (boot id {boot2})");

    // kreboot, started again by systemd, sees the new boot id: uncordon, clear, release.
    let t = wait_for(
        &vm,
        &client,
        "uncordon, annotations cleared, lease released",
        Duration::from_secs(180),
        |s| {
            s.annotations.contains_key(ANN_LAST_REBOOT)
                && !s.annotations.contains_key(ANN_PHASE)
                && !s.cordoned
                && s.lock_holder.is_none()
        },
    )
    .await;
    eprintln!("[vm:{method}] phase uncordon (boot id seen -> lease free): {t:.1?}");

    // Everything, from kube-apiserver.
    let s = look(&client).await;
    assert_ne!(boot1, boot2, "the boot id changed");
    assert_ne!(boot1, fake_boot_id);
    assert!(!s.cordoned, "uncordoned");
    assert_eq!(s.lock_holder, None, "lease free");
    assert_eq!(s.pods_on_node, 0, "the evicted pods stay gone");
    let ours: Vec<String> = s
        .annotations
        .into_keys()
        .filter(|k| k.starts_with(PREFIX))
        .collect();
    assert_eq!(ours, [ANN_LAST_REBOOT], "only the last-reboot record is left");
    let labels = s.labels;
    assert!(
        !labels.keys().any(|k| k.starts_with(PREFIX)),
        "kreboot's labels removed: {labels:?}"
    );

    // And from the console: two boots, the sentinel only on the first, systemd's reboot path.
    let console = vm.console();
    let ids = console_boot_ids(&console);
    assert_eq!(ids, [boot1.clone(), boot2.clone()], "two boots on the console");
    for needle in [
        "VMTEST: first boot, sentinel created",
        "VMTEST: later boot, no sentinel",
        "kreboot agent started",
        "reboot: Restarting system",
    ] {
        assert!(console.contains(needle), "console lacks {needle:?}");
    }
    assert!(
        console.contains("System Reboot"),
        "console lacks systemd's reboot (systemd-reboot.service)"
    );
    assert!(
        !console.contains("kexec"),
        "systemd was asked for kexec, not a reboot (the wrong signal number?)"
    );
    assert_eq!(
        console.matches("Linux version").count(),
        2,
        "exactly two kernels booted"
    );
    drop(vm);
    drop(cp);
    eprintln!("[vm:{method}] cycle passed in {:.1?}", total.elapsed());
}

/// The agent confined as a pod that asks for nothing is on an AppArmor node: the preflight
/// finds that the host's PID 1 is out of reach and nothing is disrupted: no lease, no cordon,
/// no eviction, no reboot; the Event names AppArmor, the profile and the chart value.
async fn refused_under_the_runtime_default_profile(image: &Path, kreboot: &Path) {
    let total = Instant::now();
    let run_name = "apparmor-default";
    let b = boot(image, kreboot, run_name, "command", Confinement::RuntimeDefault).await;
    let (vm, client) = (&b.vm, &b.client);
    let (_, t) = report_boot(vm, client, 0).await;
    eprintln!("[vm:{run_name}] phase first boot: {t:.1?}");
    let console = vm.console();
    assert!(
        console.contains("VMTEST: apparmor enabled=Y runtime-default-loaded=1"),
        "the guest's AppArmor is not enabled with the runtime default profile loaded:\n{}",
        console
            .lines()
            .filter(|l| l.contains("VMTEST"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let t = wait_for(
        vm,
        client,
        "the HostAccessDenied Event",
        Duration::from_secs(180),
        |s| {
            // Nothing may be disrupted on the way to the refusal.
            assert!(
                !s.cordoned,
                "cordoned under a profile that forbids the reboot: {s:?}"
            );
            assert_eq!(s.lock_holder, None, "took the lock: {s:?}");
            s.host_access_denied.is_some()
        },
    )
    .await;
    let message = look(client).await.host_access_denied.unwrap();
    eprintln!("[vm:{run_name}] preflight refused {t:.1?} after the boot was reported: {message}");
    for needle in [
        "AppArmor",
        "cri-containerd.apparmor.d",
        "agent.appArmorProfile",
        "Unconfined",
    ] {
        assert!(
            message.contains(needle),
            "the Event does not name {needle:?}: {message}"
        );
    }
    // And it stays that way: the agent waits (it rechecks every minute) rather than trying.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(15) {
        let s = look(client).await;
        assert!(!s.cordoned, "cordoned: {s:?}");
        assert_eq!(s.lock_holder, None, "took the lock: {s:?}");
        assert_eq!(s.pods_on_node, 2, "pods evicted: {s:?}");
        assert!(!s.annotations.contains_key(ANN_PHASE), "a cycle began: {s:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let console = vm.console();
    assert!(
        console.contains("kreboot agent started"),
        "the agent never started"
    );
    assert!(
        !console.contains("reboot: Restarting system"),
        "the guest rebooted"
    );
    drop(b);
    eprintln!("[vm:{run_name}] refusal shown in {:.1?}", total.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_vm_is_rebooted_through_systemd_and_comes_back() {
    if !nix::unistd::Uid::effective().is_root() {
        cannot_run(
            "the VM test",
            "not root (building the image needs debootstrap and chroot)",
        );
        return;
    }
    for program in ["qemu-system-x86_64", "debootstrap"] {
        if !found(program) {
            cannot_run(
                "the VM test",
                &format!("{program} not found (scripts/test installs it)"),
            );
            return;
        }
    }
    for program in ["mkfs.ext4", "debugfs"] {
        assert!(found(program), "{program} not found: install e2fsprogs");
    }
    // The two long builds of a cold cache run side by side.
    let (kreboot, image) = std::thread::scope(|s| {
        let image = s.spawn(image);
        let kreboot = static_kreboot();
        let image = image.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (kreboot, image)
    });
    refused_under_the_runtime_default_profile(&image, &kreboot).await;
    cycle(&image, &kreboot, "command").await;
    cycle(&image, &kreboot, "signal").await;
}
