//! A real Kubernetes control plane for the tests: etcd, kube-apiserver, kube-controller-manager
//! and KWOK (the kubelets), compiled from their Go modules by `scripts/k8s-components` and
//! started here on loopback.
//!
//! - etcd keeps its data on tmpfs (`/dev/shm`) without fsync: a control plane starts in seconds,
//!   so each test gets its own.
//! - kube-apiserver serves TLS on 127.0.0.1 with a CA made here, authenticates static tokens
//!   (one admin in `system:masters`) and ServiceAccount tokens, authorises through RBAC, runs the
//!   default admission plugins (ValidatingAdmissionPolicy included) and writes an audit log of
//!   every request (who, verb, URI, code), so a test can count exactly what an agent did.
//! - kube-controller-manager runs the disruption controller (real PDB status, so evictions are
//!   allowed or refused by the real rules) and the ValidatingAdmissionPolicy type checker.
//! - KWOK plays every kubelet: Nodes Ready, bound pods Running and Ready, terminating pods
//!   deleted.
//!
//! Every process is stopped by PID when the [`ControlPlane`] is dropped, also while a test
//! panics, and dies with the test process (parent-death signal) if that is killed. The
//! components' logs stay under `target/real-k8s/` when a test failed, and are removed otherwise.

#![allow(dead_code)]

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::free_port;

/// The admin's bearer token (user `kreboot-test-admin`, group `system:masters`).
pub const ADMIN_TOKEN: &str = "kreboot-test-admin-token";

/// The directory holding kube-apiserver, kube-controller-manager, kubectl, etcd and kwok:
/// `$KREBOOT_K8S_BIN`, or what `scripts/k8s-components` builds (once; cached by version).
///
/// # Panics
/// When the components cannot be had: a test that needs them must fail, never skip.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("KREBOOT_K8S_BIN") {
        return PathBuf::from(dir);
    }
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/k8s-components");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: the real control plane cannot be built",
            script.display()
        );
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .lines()
                .last()
                .unwrap_or(""),
        )
    })
    .clone()
}

/// A component binary, e.g. `kubectl`.
pub fn tool(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing (scripts/k8s-components builds it)",
        p.display()
    );
    p
}

/// Options of a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Run KWOK as the kubelet of every Node.
    pub kwok: bool,
    /// Extra static tokens: (token, user, uid, groups).
    pub tokens: Vec<(String, String, String, String)>,
    /// Extra IP addresses of the serving certificate (a VM reaches the server through one).
    pub extra_ips: Vec<String>,
    /// Extra kube-apiserver flags, after the defaults (e.g. `--watch-cache-sizes=…`).
    pub apiserver_flags: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            kwok: true,
            tokens: Vec::new(),
            extra_ips: Vec::new(),
            apiserver_flags: Vec::new(),
        }
    }
}

/// A running control plane (see the module doc).
pub struct ControlPlane {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// Working directory: certificates, keys, kubeconfigs, logs, audit log.
    pub dir: PathBuf,
    /// The CA that signed the serving certificate (PEM), for kubeconfigs.
    pub ca_pem: String,
    /// etcd's client URL (`http://127.0.0.1:PORT`; its gRPC gateway answers `/v3/...` there).
    pub etcd_url: String,
    etcd_dir: PathBuf,
    children: Vec<(&'static str, Child)>,
    /// How each component was started (binary, arguments), so that [`ControlPlane::restart`]
    /// starts it again exactly so.
    specs: Vec<(&'static str, PathBuf, Vec<String>)>,
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Spawns a component with its output in `log`; it gets SIGKILL if the test process dies.
fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    spawn_logging(bin, args, std::fs::File::create(log).expect("component log file"))
}

/// [`spawn`] with its output appended to `out`.
fn spawn_logging(bin: &Path, args: &[String], out: std::fs::File) -> Child {
    let err = out.try_clone().expect("log file handle");
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()))
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (waits for `/readyz`), kube-controller-manager and, if
    /// asked, KWOK.
    ///
    /// # Panics
    /// When a component is missing or does not become ready in time (its log is kept).
    pub async fn start(opts: Options) -> ControlPlane {
        let bin = bin_dir();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/real-k8s");
        std::fs::create_dir_all(&root).expect("target/real-k8s");
        let dir = tempfile::Builder::new()
            .prefix("cp-")
            .tempdir_in(&root)
            .expect("control plane directory")
            .keep();
        let etcd_dir = tempfile::Builder::new()
            .prefix("kreboot-etcd-")
            .tempdir_in(if Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .expect("etcd data directory")
            .keep();
        let mut cp = ControlPlane {
            url: String::new(),
            dir: dir.clone(),
            ca_pem: String::new(),
            etcd_url: String::new(),
            etcd_dir: etcd_dir.clone(),
            children: Vec::new(),
            specs: Vec::new(),
        };

        // A CA and a serving certificate for 127.0.0.1; one key for ServiceAccount tokens.
        let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=kreboot-test-ca",
                    "-keyout",
                    &d("ca.key"),
                    "-out",
                    &d("ca.crt"),
                ])
                .stderr(Stdio::piped()),
        );
        run_ok(
            Command::new("openssl")
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-subj",
                    "/CN=127.0.0.1",
                    "-keyout",
                    &d("serving.key"),
                    "-out",
                    &d("serving.csr"),
                ])
                .stderr(Stdio::piped()),
        );
        let extra: String = opts.extra_ips.iter().map(|ip| format!(",IP:{ip}")).collect();
        std::fs::write(
            dir.join("san.ext"),
            format!("subjectAltName=IP:127.0.0.1,DNS:localhost{extra}\nbasicConstraints=CA:FALSE\n"),
        )
        .expect("san.ext");
        run_ok(
            Command::new("openssl")
                .args([
                    "x509",
                    "-req",
                    "-in",
                    &d("serving.csr"),
                    "-CA",
                    &d("ca.crt"),
                    "-CAkey",
                    &d("ca.key"),
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &d("san.ext"),
                    "-out",
                    &d("serving.crt"),
                ])
                .stderr(Stdio::piped()),
        );
        run_ok(
            Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-out",
                    &d("sa.key"),
                ])
                .stderr(Stdio::piped()),
        );
        run_ok(
            Command::new("openssl")
                .args(["pkey", "-in", &d("sa.key"), "-pubout", "-out", &d("sa.pub")])
                .stderr(Stdio::piped()),
        );
        cp.ca_pem = std::fs::read_to_string(dir.join("ca.crt")).expect("ca.crt");

        let mut tokens = format!("{ADMIN_TOKEN},kreboot-test-admin,kreboot-test-admin,system:masters\n");
        for (token, user, uid, groups) in &opts.tokens {
            tokens.push_str(&format!("{token},{user},{uid},\"{groups}\"\n"));
        }
        std::fs::write(dir.join("tokens.csv"), tokens).expect("tokens.csv");
        std::fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )
        .expect("audit policy");

        // etcd.
        let client_port = free_port();
        let peer_port = free_port();
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let etcd_args = vec![
            format!("--data-dir={}", etcd_dir.display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        cp.etcd_url = etcd_url.clone();
        cp.launch("etcd", bin.join("etcd"), etcd_args);

        // kube-apiserver.
        let port = free_port();
        cp.url = format!("https://127.0.0.1:{port}");
        let api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--tls-cert-file={}", d("serving.crt")),
            format!("--tls-private-key-file={}", d("serving.key")),
            format!("--cert-dir={}", d("certs")),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            // No ServiceAccount controller runs (pods name their ServiceAccount themselves), and
            // no node-lifecycle controller would lift the not-ready taint of new Nodes.
            "--disable-admission-plugins=ServiceAccount,TaintNodesByCondition".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", d("audit.log")),
            "--audit-log-mode=blocking".into(),
            // Never rotated (its default rotates at 100 MB): the benchmark reads the whole
            // rollout from it.
            "--audit-log-maxsize=100000".into(),
            "--v=1".into(),
        ];
        let api_args = [api_args, opts.apiserver_flags.clone()].concat();
        cp.launch("kube-apiserver", bin.join("kube-apiserver"), api_args);
        cp.wait_ready().await;

        let admin = cp.write_kubeconfig("admin", ADMIN_TOKEN);
        let kcm_args = vec![
            format!("--kubeconfig={}", admin.display()),
            "--controllers=disruption,validatingadmissionpolicy-status-controller".into(),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ];
        cp.launch(
            "kube-controller-manager",
            bin.join("kube-controller-manager"),
            kcm_args,
        );
        if opts.kwok {
            let kwok_args = vec![
                format!("--kubeconfig={}", admin.display()),
                "--manage-all-nodes=true".into(),
                format!("--config={}", bin.join("kwok-stages.yaml").display()),
                "--node-lease-duration-seconds=0".into(),
                format!("--server-address=127.0.0.1:{}", free_port()),
            ];
            cp.launch("kwok", bin.join("kwok"), kwok_args);
        }
        cp
    }

    /// Starts component `name` with its log in `dir/NAME.log`, and remembers how.
    fn launch(&mut self, name: &'static str, bin: PathBuf, args: Vec<String>) {
        let child = spawn(&bin, &args, &self.dir.join(format!("{name}.log")));
        self.children.push((name, child));
        self.specs.push((name, bin, args));
    }

    /// Kills component `name` (SIGKILL, as a crash or an OOM kill would) and starts it again
    /// with the same binary, flags, ports and certificates, its log appended to the old one; for
    /// kube-apiserver, waits until `/readyz` answers again. Returns how long it was down.
    ///
    /// # Panics
    /// When `name` is not a component of this control plane, or does not come back.
    pub async fn restart(&mut self, name: &str) -> Duration {
        let started = Instant::now();
        let i = self
            .children
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no component {name}"));
        let (_, child) = &mut self.children[i];
        let _ = child.kill();
        let _ = child.wait();
        let (n, bin, args) = self
            .specs
            .iter()
            .find(|(n, ..)| *n == name)
            .cloned()
            .expect("a component's start is remembered");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.join(format!("{n}.log")))
            .expect("component log file");
        self.children[i] = (n, spawn_logging(&bin, &args, log));
        if n == "kube-apiserver" {
            self.wait_ready().await;
        }
        started.elapsed()
    }

    /// Sends `signal` to component `name` (e.g. SIGSTOP, then SIGCONT).
    pub fn signal(&self, name: &str, signal: nix::sys::signal::Signal) {
        let pid = self.pid(name).unwrap_or_else(|| panic!("no component {name}"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("signal {signal} to {name}: {e}"));
    }

    async fn wait_ready(&mut self) {
        let client = self.admin_client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = http::Request::get("/readyz").body(Vec::new()).expect("request");
            if client.request_text(req).await.is_ok() {
                return;
            }
            for (name, child) in &mut self.children {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{name} exited during start-up ({status}); its log is in {}",
                        self.dir.display()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready after 60 s; logs in {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A kubeconfig for `token` at `dir/kubeconfig-<name>` (for kreboot, kubectl, a test).
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\ncontexts:\n- name: real\n  context:\n    cluster: real\n    user: {name}\ncurrent-context: real\nusers:\n- name: {name}\n  user:\n    token: {token}\n",
                self.url
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// `kubectl --kubeconfig=ADMIN apply --server-side -f FILE` (`-` reads `stdin`).
    pub fn kubectl_apply(&self, file: &Path, stdin: Option<&str>) {
        use std::io::Write as _;
        let admin = self.dir.join("kubeconfig-admin");
        let mut child = Command::new(tool("kubectl"))
            .arg(format!("--kubeconfig={}", admin.display()))
            .args(["apply", "--server-side", "--field-manager=kreboot-test", "-f"])
            .arg(file)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl starts");
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(text.as_bytes())
                .expect("write to kubectl");
        }
        let out = child.wait_with_output().expect("kubectl runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "kubectl apply --server-side -f {} failed:\n{stdout}\n{stderr}",
            file.display()
        );
        eprintln!("kubectl apply --server-side -f {}:\n{stdout}", file.display());
    }

    /// A kube-rs configuration for `token` (no client-side retries, as kreboot's own).
    pub fn config(&self, token: &str) -> kube::Config {
        let mut c = kube::Config::new(self.url.parse().expect("server URL"));
        c.root_cert = Some(vec![pem_der(&self.ca_pem)]);
        c.auth_info.token = Some(token.to_string().into());
        c.default_retry = false;
        c
    }

    /// A client with the admin's token.
    pub fn admin_client(&self) -> kube::Client {
        kube::Client::try_from(self.config(ADMIN_TOKEN)).expect("admin client")
    }

    /// A client with `token`.
    pub fn client(&self, token: &str) -> kube::Client {
        kube::Client::try_from(self.config(token)).expect("client")
    }

    /// The audit log: one JSON object per request.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// kube-apiserver's own `/metrics` (Prometheus text).
    pub async fn metrics(&self) -> String {
        let req = http::Request::get("/metrics").body(Vec::new()).expect("request");
        self.admin_client()
            .request_text(req)
            .await
            .expect("kube-apiserver /metrics")
    }

    /// The log of a component (`etcd`, `kube-apiserver`, `kube-controller-manager`, `kwok`).
    pub fn log(&self, component: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{component}.log"))).unwrap_or_default()
    }

    /// The process id of a component (`etcd`, `kube-apiserver`, `kube-controller-manager`,
    /// `kwok`), for reading its CPU time and memory under `/proc`.
    pub fn pid(&self, component: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(name, _)| *name == component)
            .map(|(_, child)| child.id())
    }
}

/// The DER bytes of the first certificate of a PEM text.
fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("CA certificate PEM")
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Stop in reverse order: the kubelets and controllers first, etcd last.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.etcd_dir);
        if std::thread::panicking() {
            eprintln!(
                "real control plane: the components' logs and the audit log are kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A bound token of the chart's ServiceAccount `kreboot` in `ns` for the pod `pod` (it carries
/// the pod's node name, which the admission policies check), or, with no pod, an unbound one.
pub async fn sa_token(
    admin: &kube::Client,
    ns: &str,
    pod: Option<&k8s_openapi::api::core::v1::Pod>,
) -> String {
    use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
    let mut spec = serde_json::json!({"expirationSeconds": 3600});
    if let Some(p) = pod {
        spec["boundObjectRef"] = serde_json::json!({
            "kind": "Pod", "apiVersion": "v1",
            "name": p.metadata.name, "uid": p.metadata.uid,
        });
    }
    let req: TokenRequest = serde_json::from_value(serde_json::json!({"spec": spec})).expect("TokenRequest");
    let tr: TokenRequest = kube::Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create_subresource("token", "kreboot", &kube::api::PostParams::default(), &req)
        .await
        .expect("TokenRequest for the chart's ServiceAccount");
    tr.status.expect("token issued").token
}

/// A stand-in for the DaemonSet's pod on `node`: the chart's ServiceAccount, owned by the
/// chart's DaemonSet `ds` (so the drain leaves it, as it leaves DaemonSet pods; no DaemonSet
/// controller runs here to make the real ones).
pub async fn agent_pod(
    admin: &kube::Client,
    ns: &str,
    ds: &k8s_openapi::api::apps::v1::DaemonSet,
    node: &str,
) -> k8s_openapi::api::core::v1::Pod {
    let pod = serde_json::json!({
        "metadata": {
            "name": format!("kreboot-{node}"),
            "labels": {"app.kubernetes.io/name": "kreboot", "app.kubernetes.io/instance": "kreboot"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "kreboot",
                "uid": ds.metadata.uid, "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": "kreboot",
            "containers": [{"name": "agent", "image": "registry.invalid/kreboot:test"}],
            "tolerations": [{"operator": "Exists"}],
        },
    });
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(admin.clone(), ns)
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(pod).unwrap(),
        )
        .await
        .unwrap_or_else(|e| panic!("create the agent pod on {node}: {e}"))
}
