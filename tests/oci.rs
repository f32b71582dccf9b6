//! The image operators run, built without a container engine and run under a real OCI runtime
//! with exactly the DaemonSet's securityContext, against the real control plane.
//!
//! `scripts/oci-image` assembles the OCI image layout from the static musl release binary and
//! the Dockerfile's final stage (labels, user, entrypoint, cmd), twice, in two directories: the
//! index digests must be equal. skopeo, a reader that is not ours, must read it back. Its layer
//! is unpacked into a bundle whose `config.json` (from `runc spec`) is shaped as the kubelet and
//! containerd shape the DaemonSet's container: read-only root filesystem, root with exactly
//! SYS_ADMIN, SYS_CHROOT and SYS_PTRACE (bounding, effective and permitted; nothing inheritable
//! or ambient), no new privileges, the host's PID namespace, the sentinel's directory mounted
//! read-only at `/host/var/run`, the ServiceAccount's token, `ca.crt` and `namespace` mounted
//! read-only where the kubelet mounts them, and `KUBERNETES_SERVICE_HOST`/`_PORT` so the agent
//! uses its in-cluster configuration. Two things differ from a pod, and say so: the container
//! shares the host's network namespace (no CNI here; the API server is on the host's loopback),
//! and no seccomp filter is loaded.
//!
//! Shown: the agent starts under Debian's runc, `/healthz` and `/metrics` answer, the sentinel is
//! seen (`kreboot_reboot_required 1`), the preflight finds the host reachable
//! (`kreboot_host_access_ok 1`), and `kreboot host-exec` run inside the container enters the
//! host's namespaces (its mount namespace is the host process's, see below). The container's process, read from the
//! host, holds exactly the three capabilities, no new privileges, and a read-only root.
//!
//! The host's PID 1 here is not the test's to enter: this machine runs the test in a user
//! namespace below PID 1's, and the kernel refuses even the test's own root a ptrace read of
//! PID 1 (`ls -l /proc/1/ns` fails). The agent's preflight refuses it too, and says so (it names
//! a user namespace among the causes). So the "host" is a process of the test's own namespaces
//! (`sleep`), given to the agent and to `host-exec` with `--host-pid` (the DaemonSet leaves it
//! at 1); the container reaches it exactly as it would reach PID 1: through the host PID
//! namespace, `/proc/PID/ns/*` and `setns`.
//!
//! The policy ConfigMap holds a blackout that covers every day: the agent sees the sentinel and
//! waits; the reboot command is `true` besides, so nothing could reboot the machine running the
//! test.
//!
//! Needs root, runc and skopeo (`scripts/test` installs them): without them it fails under CI
//! (`CI` set) and says SKIPPED otherwise.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

mod common;

use common::{
    Killed,
    artifact::{run, static_kreboot},
    backend::kwok_node,
    cannot_run, found, free_port,
    real::{self, ControlPlane},
    sample, scrape_metrics,
};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Node};
use kube::{Api, api::PostParams};
use serde_json::{Value as Json, json};

/// The agents' namespace in the shipped manifests.
const NS: &str = "kreboot";
const NODE: &str = "oci-node";
const CONTAINER: &str = "kreboot-oci-test";
/// Bits of CAP_SYS_CHROOT (18), CAP_SYS_PTRACE (19) and CAP_SYS_ADMIN (21).
const THREE_CAPS: u64 = (1 << 18) | (1 << 19) | (1 << 21);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the image layout into `out` (emptied first); returns the index digest.
fn oci_image(out: &Path, binary: &Path) -> String {
    let _ = std::fs::remove_dir_all(out);
    let printed = run(
        Command::new(root().join("scripts/oci-image"))
            .arg("--out")
            .arg(out)
            .arg(format!("--binary=amd64={}", binary.display())),
        "scripts/oci-image",
        Duration::from_secs(120),
    );
    eprintln!("[oci] {}", printed.trim().replace('\n', "\n[oci] "));
    printed
        .lines()
        .find_map(|l| l.strip_prefix("index "))
        .expect("scripts/oci-image prints the index digest")
        .to_owned()
}

/// `runc --root STATE ARGS...`: its output, or a panic with it.
fn runc(state: &Path, args: &[&str]) -> String {
    let out = Command::new("runc")
        .arg("--root")
        .arg(state)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("runc runs");
    assert!(
        out.status.success(),
        "runc {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes the container however the test ends.
struct Container {
    state: PathBuf,
    log: PathBuf,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", CONTAINER])
            .output();
        if std::thread::panicking() {
            eprintln!(
                "--- the agent's output ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// The `config.json` of the bundle: `runc spec`'s defaults shaped as the DaemonSet's container.
fn shape_config(
    spec: &mut Json,
    sentinel_dir: &Path,
    sa_dir: &Path,
    image_config: &Json,
    port: u16,
    api_port: u16,
    host_pid: u32,
) {
    let caps = json!(["CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE"]);
    let mut args: Vec<Json> = image_config["Entrypoint"].as_array().expect("Entrypoint").clone();
    // The DaemonSet's `args` replace the image's Cmd (`agent`) with the chart's flags.
    args.extend(
        [
            "agent",
            "--sentinel-file=/host/var/run/reboot-required",
            &format!("--metrics-addr=127.0.0.1:{port}"),
            "--reboot-command=true",
            "--check-interval=1s",
            &format!("--host-pid={host_pid}"),
        ]
        .map(Json::from),
    );
    spec["process"] = json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": [
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            format!("NODE_NAME={NODE}"),
            format!("POD_NAMESPACE={NS}"),
            format!("POD_NAME=kreboot-{NODE}"),
            "KUBERNETES_SERVICE_HOST=127.0.0.1",
            format!("KUBERNETES_SERVICE_PORT={api_port}"),
        ],
        "cwd": "/",
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": [], "ambient": [],
        },
        "noNewPrivileges": true,
    });
    spec["root"] = json!({"path": "rootfs", "readonly": true});
    spec["hostname"] = json!(format!("kreboot-{NODE}"));
    let mounts = spec["mounts"].as_array_mut().expect("mounts");
    mounts.push(json!({
        "destination": "/host/var/run", "type": "bind", "source": sentinel_dir,
        "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
    }));
    mounts.push(json!({
        "destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind",
        "source": sa_dir, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
    }));
    // hostPID: no PID namespace of its own; no pod network here: the host's.
    let namespaces = spec["linux"]["namespaces"].as_array_mut().expect("namespaces");
    namespaces.retain(|n| !matches!(n["type"].as_str(), Some("pid" | "network")));
}

/// One `Key:\tvalue` line of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_under_runc_as_the_daemonset_runs_it() {
    if !nix::unistd::Uid::effective().is_root() {
        cannot_run("the OCI runtime test", "not root (runc needs it)");
        return;
    }
    for program in ["runc", "skopeo"] {
        if !found(program) {
            cannot_run(
                "the OCI runtime test",
                &format!("{program} not found (scripts/test installs it)"),
            );
            return;
        }
    }
    let work = root().join("target/oci");
    std::fs::create_dir_all(&work).unwrap();

    // The image, twice: the same binary gives the same index digest.
    let binary = static_kreboot();
    let layout = work.join("layout");
    let digest = oci_image(&layout, &binary);
    assert_eq!(
        oci_image(&work.join("layout-again"), &binary),
        digest,
        "two builds of the image from one binary differ"
    );
    // A reader that is not ours.
    let inspected = run(
        Command::new("skopeo")
            .args(["inspect", "--config"])
            .arg(format!("oci:{}", layout.display())),
        "skopeo inspect",
        Duration::from_secs(60),
    );
    let inspected: Json = serde_json::from_str(&inspected).expect("skopeo prints the config");
    let image_config = inspected["config"].clone();
    assert_eq!(image_config["Entrypoint"], json!(["/kreboot"]), "{inspected}");
    assert_eq!(image_config["User"], json!("0:0"), "{inspected}");
    assert_eq!(inspected["architecture"], json!("amd64"));

    // The bundle: the image's one layer as the root filesystem.
    let checked = run(
        Command::new(root().join("scripts/oci-image"))
            .arg("--check")
            .arg(&layout),
        "scripts/oci-image --check",
        Duration::from_secs(60),
    );
    let checked: Json = serde_json::from_str(&checked).expect("--check prints JSON");
    let layer = checked["amd64"]["layer"].as_str().expect("the amd64 layer");
    let bundle = work.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(layer)
            .arg("-C")
            .arg(bundle.join("rootfs")),
        "unpacking the layer",
        Duration::from_secs(60),
    );
    let mut files: Vec<String> = walk(&bundle.join("rootfs"));
    files.sort();
    assert_eq!(
        files,
        ["etc/ssl/certs/ca-certificates.crt", "kreboot"],
        "the image holds the binary and the CA bundle, nothing else"
    );

    // The cluster: the shipped manifests, a Node, the agent's pod (its token is bound to it,
    // as the admission policies require), a policy that blacks out every day.
    let cp = ControlPlane::start(real::Options {
        kwok: false,
        ..real::Options::default()
    })
    .await;
    let admin = cp.admin_client();
    cp.kubectl_apply(&root().join("manifests"), None);
    let policy = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "kreboot-config", "namespace": NS},
        "data": {"config.yaml": "blackouts:\n  - from: \"2000-01-01\"\n    to: \"2099-12-31\"\n"},
    });
    cp.kubectl_apply(Path::new("-"), Some(&policy.to_string()));
    Api::<Node>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(kwok_node(NODE, &BTreeMap::new())).unwrap(),
        )
        .await
        .expect("create the Node");
    let ds = Api::<DaemonSet>::namespaced(admin.clone(), NS)
        .get("kreboot")
        .await
        .expect("the manifests' DaemonSet");
    let pod = real::agent_pod(&admin, NS, &ds, NODE).await;
    let token = real::sa_token(&admin, NS, Some(&pod)).await;
    let sa_dir = work.join("serviceaccount");
    let _ = std::fs::remove_dir_all(&sa_dir);
    std::fs::create_dir_all(&sa_dir).unwrap();
    std::fs::write(sa_dir.join("token"), &token).unwrap();
    std::fs::write(sa_dir.join("ca.crt"), &cp.ca_pem).unwrap();
    std::fs::write(sa_dir.join("namespace"), NS).unwrap();
    let sentinel_dir = work.join("host-var-run");
    let _ = std::fs::remove_dir_all(&sentinel_dir);
    std::fs::create_dir_all(&sentinel_dir).unwrap();
    std::fs::write(
        sentinel_dir.join("reboot-required"),
        "*** System restart required ***\n",
    )
    .unwrap();

    // The host's PID 1 stand-in: see the module's doc.
    let host = Killed(Command::new("sleep").arg("3600").spawn().expect("sleep starts"));
    let host_pid = host.0.id();

    // The container.
    let state = work.join("runc-state");
    std::fs::create_dir_all(&state).unwrap();
    let _ = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["delete", "--force", CONTAINER])
        .output();
    runc(&state, &["spec", "--bundle", bundle.to_str().unwrap()]);
    let config_path = bundle.join("config.json");
    let mut spec: Json = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let port = free_port();
    let api_port: u16 = cp.url.rsplit(':').next().unwrap().parse().unwrap();
    shape_config(
        &mut spec,
        &sentinel_dir,
        &sa_dir,
        &image_config,
        port,
        api_port,
        host_pid,
    );
    std::fs::write(&config_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let log = work.join("agent.log");
    let container = Container {
        state: state.clone(),
        log: log.clone(),
    };
    let log_file = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let status = Command::new("runc")
        .arg("--root")
        .arg(&state)
        .args(["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(CONTAINER)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .expect("runc run");
    assert!(
        status.success(),
        "runc run failed: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let listed: Json = serde_json::from_str(&runc(&state, &["state", CONTAINER])).expect("runc state");
    let pid = listed["pid"].as_u64().expect("the container's pid") as u32;
    eprintln!("[oci] container {CONTAINER} running, pid {pid}");

    // The agent answers, has seen the sentinel and finds the host reachable.
    let deadline = Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let healthz = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await;
        if let (Ok(h), Some(m)) = (healthz, scrape_metrics(port).await)
            && h.status().is_success()
            && sample(&m, &format!("kreboot_reboot_required{{node=\"{NODE}\"}}")) == Some(1.0)
            && sample(&m, &format!("kreboot_host_access_ok{{node=\"{NODE}\"}}")) == Some(1.0)
        {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the agent in the container never reported the sentinel and host access; last scrape:\n{}",
            scrape_metrics(port).await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "[oci] /healthz and /metrics answer, sentinel seen, host reachable: {:.1?} after runc run",
        started.elapsed()
    );
    assert!(metrics.contains("kreboot_"), "{metrics}");

    // `kreboot host-exec` from inside the container enters the host's namespaces.
    let pid_flag = format!("--host-pid={host_pid}");
    let host_exec = |cmd: &[&str]| {
        let mut args = vec![
            "exec",
            CONTAINER,
            "/kreboot",
            "host-exec",
            pid_flag.as_str(),
            "--",
        ];
        args.extend_from_slice(cmd);
        runc(&state, &args)
    };
    host_exec(&["true"]);
    let host_mnt =
        std::fs::read_link(format!("/proc/{host_pid}/ns/mnt")).expect("the host's mount namespace");
    let seen = host_exec(&["readlink", "/proc/self/ns/mnt"]);
    assert_eq!(
        seen.trim(),
        host_mnt.to_string_lossy(),
        "host-exec did not run in the host process's mount namespace"
    );
    let own_mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        own_mnt, host_mnt,
        "the container has a mount namespace of its own"
    );

    // The container's confinement, read from the host.
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        let v = u64::from_str_radix(&status_field(pid, key), 16).unwrap();
        assert_eq!(
            v, THREE_CAPS,
            "{key} {v:#x}: not exactly SYS_ADMIN, SYS_CHROOT, SYS_PTRACE"
        );
    }
    for key in ["CapInh", "CapAmb"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, key), 16).unwrap(),
            0,
            "{key}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
        std::fs::read_link("/proc/self/ns/pid").unwrap(),
        "the host's PID namespace"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .expect("the container's root mount");
    let options = root_mount.split(' ').nth(5).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro"),
        "the root filesystem is writable: {root_mount}"
    );
    // Nothing was disrupted: the blackout holds the node back.
    let node = Api::<Node>::all(admin.clone()).get(NODE).await.unwrap();
    assert!(
        !node.spec.and_then(|s| s.unschedulable).unwrap_or(false),
        "the node was cordoned inside a blackout"
    );
    drop(container);
    drop(host);
    drop(cp);
}

/// Regular files under `dir`, relative to it.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}
