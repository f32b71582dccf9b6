//! The real `kreboot` binary run as one node's agent against the simulated cluster, the way the
//! DaemonSet runs it: a simulated cluster with the node, a directory standing in for the node's
//! host (the kubeconfig, the sentinel, the agent's log), and the agent's command line. The tests
//! that start the binary differ in their flags and in what they check, not in this.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use kreboot_testkit::sim::{SimCluster, SimConfig};

/// The node the agent runs as.
pub const NODE: &str = "n1";

/// A policy whose blackout covers every day: a required reboot stays pending and nothing else
/// happens, so a test sees the waiting agent for as long as it likes.
pub const BLACKOUT_EVERY_DAY: &str = "blackouts:\n  - from: \"2000-01-01\"\n    to: \"2099-12-31\"\n";

/// Puts `doc` as the policy (`config.yaml` of the ConfigMap `kube-system/kreboot-config`).
pub fn put_policy(sim: &SimCluster, doc: &str) {
    sim.configmap_put(
        "kube-system",
        "kreboot-config",
        BTreeMap::from([("config.yaml".to_string(), doc.to_string())]),
    );
}

/// The `kreboot` binary without the environment that could configure it from outside the test
/// (the node's name, a kubeconfig, the pod's namespace): what it does comes from its arguments.
pub fn kreboot_alone() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kreboot"));
    for var in ["NODE_NAME", "KREBOOT_NODE_NAME", "KUBECONFIG", "POD_NAMESPACE"] {
        cmd.env_remove(var);
    }
    cmd
}

/// `kreboot agent` for [`NODE`] in `kube-system`, reaching the cluster through `kubeconfig` and
/// watching `sentinel`, without `--host-namespaces`: for a test whose flags choose where the
/// reboot runs. `NODE_NAME` is removed so that the flag, not the test's environment, names the
/// node; stdout and stderr go nowhere until the caller says otherwise. The caller adds its own
/// flags and environment and spawns it (see [`super::Killed::spawn`]).
pub fn agent_command(kubeconfig: &Path, sentinel: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kreboot"));
    cmd.args(["agent", "--node-name", NODE, "--namespace", "kube-system"])
        .arg("--sentinel-file")
        .arg(sentinel)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NODE_NAME")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// [`agent_command`] with its host commands run in the test's own namespaces
/// (`--host-namespaces=false`): the test plays the host, and its reboot command stands in for
/// the machine's.
pub fn agent_process(kubeconfig: &Path, sentinel: &Path) -> Command {
    let mut cmd = agent_command(kubeconfig, sentinel);
    cmd.arg("--host-namespaces=false");
    cmd
}

/// A simulated cluster and a fresh directory holding its kubeconfig: what a process outside the
/// test (the agent, the `kreboot` CLI) needs to reach the cluster. The directory stands in for
/// the node's host: the sentinel and the agent's log go there too.
pub struct SimHost {
    pub sim: SimCluster,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl SimHost {
    /// A simulator with `config` and the node [`NODE`] (no labels).
    pub async fn start(config: SimConfig) -> SimHost {
        let sim = SimCluster::start(config).await.expect("simulator starts");
        sim.add_node(NODE, BTreeMap::new());
        SimHost::new(sim)
    }

    /// `sim` as it is, with its kubeconfig written to a new temporary directory.
    pub fn new(sim: SimCluster) -> SimHost {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        SimHost { sim, dir, kubeconfig }
    }

    /// A path in the host's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Where a test sends the agent's log.
    pub fn agent_log(&self) -> PathBuf {
        self.path("agent.log")
    }

    /// Lets an agent of another uid in: the directory and a new `run/` in it searchable, the
    /// kubeconfig readable by all. Returns the sentinel's path, `run/reboot-required` (not
    /// created).
    pub fn open_to_other_uids(&self) -> PathBuf {
        let readable = |path: &Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        readable(self.dir.path(), 0o755);
        readable(&self.kubeconfig, 0o644);
        let run = self.path("run");
        std::fs::create_dir(&run).expect("run dir");
        readable(&run, 0o755);
        run.join("reboot-required")
    }

    /// [`agent_process`] on this cluster, watching `sentinel`.
    pub fn agent(&self, sentinel: &Path) -> Command {
        agent_process(&self.kubeconfig, sentinel)
    }
}
