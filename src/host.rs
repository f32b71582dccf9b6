//! Running commands on the host, and reading what the host is.
//!
//! The agent's image holds one static binary and nothing else: there is no nsenter, no shell,
//! no systemctl. A host command therefore runs in a spawned child that, between fork and exec,
//! enters the IPC, UTS, network, PID and mount namespaces of `--host-pid` (PID 1 of the host,
//! seen thanks to `hostPID: true`) with `setns`, and then execs the program through a standard
//! PATH inside the host's filesystem. The namespace files are opened in the parent, before the
//! fork, so the child only makes `setns` calls (async-signal-safe) before `exec`; a tokio
//! process could not enter a mount namespace itself (`setns(CLONE_NEWNS)` fails with EINVAL in a
//! multi-threaded process).
//!
//! Capabilities this needs (checked by `tests/host_namespaces.rs`, which drops each in turn):
//! - `CAP_SYS_PTRACE`: opening another process's `/proc/<pid>/ns/*` is a ptrace-mode access
//!   check, and the host's PID 1 holds capabilities the container does not;
//! - `CAP_SYS_ADMIN`: `setns` into IPC, UTS, network, PID and mount namespaces;
//! - `CAP_SYS_CHROOT`: joining a mount namespace changes the root directory.
//!
//! With `--host-namespaces=false` commands run in the agent's own namespaces.
//!
//! Capabilities are not all: a Linux security module may refuse what they allow. Under a
//! container runtime's default AppArmor profile the open of `/proc/1/ns/*` (a ptrace read of the
//! unconfined PID 1) fails with EACCES although CAP_SYS_PTRACE is held. [`denied_hint`] says
//! which module refused, from the process's own label ([`read_own_lsm_label`]), and the chart
//! value that fixes it; [`HostExec::check_access`] is the agent's side-effect-free preflight.

use std::{
    fs::File,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

/// The PATH host commands are resolved with (the agent's image has none of its own).
pub const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The namespaces entered, in order: the mount namespace last, because after it `/proc` may
/// be another one (the files are opened beforehand anyway).
const NAMESPACES: [(&str, CloneFlags); 5] = [
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// Where host commands run.
#[derive(Debug, Clone)]
pub struct HostExec {
    /// Enter the target process's namespaces before exec.
    pub host_namespaces: bool,
    /// The target process (PID 1 of the host by default).
    pub host_pid: i32,
}

/// Why a host command could not be prepared or run.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No command was given.
    #[error("empty command")]
    EmptyCommand,
    /// The target process does not exist.
    #[error("host process {pid} does not exist (is hostPID: true set?)")]
    NoSuchProcess {
        /// The pid.
        pid: i32,
    },
    /// A namespace file could not be opened: a missing CAP_SYS_PTRACE, or a Linux security
    /// module (AppArmor, SELinux) that refuses the ptrace-read of the target.
    #[error("cannot open the {ns} namespace of process {pid}: {source} ({hint})")]
    OpenNamespace {
        /// The pid.
        pid: i32,
        /// Which namespace.
        ns: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
        /// What refused it and how to fix it ([`denied_hint`]).
        hint: String,
    },
    /// `setns` was refused.
    #[error(
        "cannot enter the namespaces of process {pid}: {source} (needs CAP_SYS_ADMIN and CAP_SYS_CHROOT)"
    )]
    EnterNamespaces {
        /// The pid.
        pid: i32,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The command could not be started (e.g. not found).
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The command did not finish in time (it was killed).
    #[error("{program:?} did not finish within {timeout:?}")]
    Timeout {
        /// The program.
        program: String,
        /// The bound.
        timeout: Duration,
    },
}

/// The outcome of a finished host command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded and cut to 4 KiB.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
}

fn cut(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    text.trim_end().to_owned()
}

impl HostExec {
    /// The target's root directory as seen from the agent (for reading host files).
    pub fn host_root(&self) -> PathBuf {
        if self.host_namespaces {
            PathBuf::from(format!("/proc/{}/root", self.host_pid))
        } else {
            PathBuf::from("/")
        }
    }

    /// A command for `argv` (program first) that runs where this `HostExec` says.
    ///
    /// # Errors
    /// [`HostError`] when the command is empty, the host process does not exist or its
    /// namespaces cannot be opened.
    pub fn command(&self, argv: &[String]) -> Result<tokio::process::Command, HostError> {
        let (program, args) = argv.split_first().ok_or(HostError::EmptyCommand)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).kill_on_drop(true);
        if !self.host_namespaces {
            return Ok(cmd);
        }
        let pid = self.host_pid;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(HostError::NoSuchProcess { pid });
        }
        let fds = open_namespaces(pid)?;
        cmd.env_clear().env("PATH", HOST_PATH).env("LANG", "C.UTF-8");
        enter_namespaces(&mut cmd, fds);
        Ok(cmd)
    }

    /// Proves, without side effects, that a host command could enter the target's namespaces:
    /// opens `/proc/<pid>/ns/{ipc,uts,net,pid,mnt}` (the ptrace-read that a missing
    /// CAP_SYS_PTRACE or an LSM refuses) and closes them again; no `setns`, nothing run.
    /// Without `host_namespaces` there is nothing to check.
    ///
    /// # Errors
    /// [`HostError::NoSuchProcess`] or [`HostError::OpenNamespace`] (naming what refused).
    pub fn check_access(&self) -> Result<(), HostError> {
        if !self.host_namespaces {
            return Ok(());
        }
        let pid = self.host_pid;
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return Err(HostError::NoSuchProcess { pid });
        }
        open_namespaces(pid).map(drop)
    }

    /// Runs `argv` to completion within `timeout`, capturing its output.
    ///
    /// # Errors
    /// [`HostError`] when it cannot start or does not finish in time.
    pub async fn run(&self, argv: &[String], timeout: Duration) -> Result<Finished, HostError> {
        let mut cmd = self.command(argv)?;
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let program = argv.first().cloned().unwrap_or_default();
        let child = cmd.spawn().map_err(|source| {
            if self.host_namespaces && source.raw_os_error() == Some(libc::EPERM) {
                HostError::EnterNamespaces {
                    pid: self.host_pid,
                    source,
                }
            } else {
                HostError::Spawn {
                    program: program.clone(),
                    source,
                }
            }
        })?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            // Dropping the future drops the child, which kills it (kill_on_drop).
            Err(_) => Err(HostError::Timeout { program, timeout }),
            Ok(Err(source)) => Err(HostError::Spawn { program, source }),
            Ok(Ok(out)) => Ok(Finished {
                code: out.status.code(),
                stdout: cut(&out.stdout),
                stderr: cut(&out.stderr),
            }),
        }
    }
}

/// Opens the namespace files of `pid` in [`NAMESPACES`] order.
fn open_namespaces(pid: i32) -> Result<Vec<(OwnedFd, CloneFlags)>, HostError> {
    let mut fds = Vec::new();
    for (ns, flag) in NAMESPACES {
        let file = File::open(format!("/proc/{pid}/ns/{ns}")).map_err(|source| {
            let hint = denied_hint(
                Access::Namespaces,
                &source,
                has_capability(CAP_SYS_PTRACE),
                read_own_lsm_label().as_ref(),
            );
            HostError::OpenNamespace {
                pid,
                ns,
                source,
                hint,
            }
        })?;
        fds.push((OwnedFd::from(file), flag));
    }
    Ok(fds)
}

/// `CAP_SYS_PTRACE`'s bit in the capability sets.
pub const CAP_SYS_PTRACE: u32 = 19;
/// `CAP_KILL`'s bit.
pub const CAP_KILL: u32 = 5;

/// Whether this process's effective capability set holds `cap` (from `/proc/self/status`);
/// false when it cannot be read.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .is_some_and(|eff| eff & (1u64 << cap) != 0)
}

/// The `CapEff:` mask of a `/proc/PID/status` text.
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The Linux security module label a process runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LsmLabel {
    /// An AppArmor profile and mode, e.g. `cri-containerd.apparmor.d (enforce)`, or `unconfined`.
    AppArmor(String),
    /// An SELinux context, e.g. `system_u:system_r:container_t:s0:c12,c34`.
    SeLinux(String),
}

impl LsmLabel {
    /// Whether the label confines the process (AppArmor: a profile other than `unconfined`, in
    /// enforce mode; SELinux: a type other than the unconfined `spc_t`, `unconfined_t`, …).
    pub fn confining(&self) -> bool {
        match self {
            LsmLabel::AppArmor(l) => {
                l != "unconfined" && !l.ends_with("(complain)") && !l.ends_with("(unconfined)")
            }
            LsmLabel::SeLinux(c) => !matches!(
                c.split(':').nth(2),
                Some("spc_t" | "unconfined_t" | "kernel_t" | "init_t" | "super_t")
            ),
        }
    }
}

/// Classifies the label texts of `/proc/PID/attr/apparmor/current` (present on kernels with LSM
/// stacking) and `/proc/PID/attr/current` (the first "display" module's label).
pub fn classify_lsm_label(apparmor_current: Option<&str>, current: Option<&str>) -> Option<LsmLabel> {
    let clean = |s: &str| {
        s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_owned()
    };
    let apparmor = apparmor_current.map(clean).filter(|s| !s.is_empty());
    let current = current.map(clean).filter(|s| !s.is_empty());
    let selinux = current.as_ref().filter(|c| {
        let parts: Vec<&str> = c.split(':').collect();
        parts.len() >= 4 && parts[2].ends_with("_t")
    });
    match (apparmor, selinux) {
        (Some(a), _) if a != "unconfined" => Some(LsmLabel::AppArmor(a)),
        (_, Some(c)) => Some(LsmLabel::SeLinux(c.clone())),
        (Some(a), None) => Some(LsmLabel::AppArmor(a)),
        (None, None) => current
            .filter(|c| c == "unconfined" || c.ends_with(')'))
            .map(LsmLabel::AppArmor),
    }
}

/// This process's LSM label, when the kernel exposes one.
pub fn read_own_lsm_label() -> Option<LsmLabel> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    classify_lsm_label(
        read("/proc/self/attr/apparmor/current").as_deref(),
        read("/proc/self/attr/current").as_deref(),
    )
}

/// What access to the host's process was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Opening `/proc/PID/ns/*` (a ptrace-read: CAP_SYS_PTRACE).
    Namespaces,
    /// Signalling PID 1 (same uid, i.e. root, or CAP_KILL).
    Signal,
}

/// Explains why an access to the host's process failed and what fixes it: when the errno is
/// EACCES/EPERM although the permission is held (`permission_held`: CAP_SYS_PTRACE for
/// namespaces; uid 0 or CAP_KILL for a signal), it was a Linux security module, named here
/// from the process's own `label`, with the chart value that lifts it.
pub fn denied_hint(
    access: Access,
    error: &std::io::Error,
    permission_held: bool,
    label: Option<&LsmLabel>,
) -> String {
    let needs = match access {
        Access::Namespaces => "needs CAP_SYS_PTRACE",
        Access::Signal => "needs to run as root (uid 0) or CAP_KILL",
    };
    let refused = matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM));
    if !refused {
        return needs.to_owned();
    }
    if !permission_held {
        return match access {
            Access::Namespaces => "needs CAP_SYS_PTRACE, which this process does not hold".to_owned(),
            Access::Signal => {
                "needs to run as root (uid 0) or CAP_KILL, which this process does not".to_owned()
            }
        };
    }
    let (held, what) = match access {
        Access::Namespaces => (
            "CAP_SYS_PTRACE is held",
            "reading PID 1's namespaces (a ptrace read)",
        ),
        Access::Signal => ("the agent runs as root", "signalling PID 1"),
    };
    match label {
        Some(l @ LsmLabel::AppArmor(profile)) if l.confining() => format!(
            "{held}, so AppArmor refused it: this process runs under the profile \"{profile}\", \
             and a container runtime's default profile allows ptrace and signals only within \
             that profile, not to the unconfined PID 1; give the agent \
             securityContext.appArmorProfile type Unconfined (the chart value \
             agent.appArmorProfile, its default)"
        ),
        Some(l @ LsmLabel::SeLinux(context)) if l.confining() => format!(
            "{held}, so SELinux refused it: this process runs as \"{context}\", a container type \
             not allowed {what}; give the agent an SELinux type that is, e.g. spc_t (the chart \
             value agent.seLinuxOptions: {{type: spc_t}})"
        ),
        other => format!(
            "{held} and the process is not confined by AppArmor or SELinux ({}): another Linux \
             security module, or a user namespace (hostUsers: false), refused {what}",
            other.map_or_else(
                || "no label".to_owned(),
                |l| match l {
                    LsmLabel::AppArmor(p) => format!("AppArmor \"{p}\""),
                    LsmLabel::SeLinux(c) => format!("SELinux \"{c}\""),
                }
            )
        ),
    }
}

/// Installs the `setns` calls that run in the child between fork and exec.
#[allow(unsafe_code)]
fn enter_namespaces(cmd: &mut tokio::process::Command, fds: Vec<(OwnedFd, CloneFlags)>) {
    // SAFETY: the closure runs in the forked child before exec. It only calls setns(2) on file
    // descriptors opened before the fork (no allocation, no locks: async-signal-safe), and
    // returns the error for std to report to the parent. The fds are owned by the closure and
    // opened with O_CLOEXEC, so the exec'd program does not inherit them.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, flag) in &fds {
                setns(fd.as_fd(), *flag).map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// What the host's `os-release` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsInfo {
    /// `ID` (ubuntu, azurelinux, mariner, …; "unknown" when unreadable).
    pub id: String,
    /// `VERSION_ID`.
    pub version_id: String,
    /// `PRETTY_NAME`.
    pub pretty_name: String,
    /// The family kreboot knows.
    pub family: OsFamily,
}

/// Host operating systems kreboot recognises.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OsFamily {
    /// Ubuntu (unattended-upgrades writes the sentinel).
    Ubuntu,
    /// Azure Linux 3 and its former name CBL-Mariner (AKS writes the sentinel).
    AzureLinux,
    /// Anything else: the defaults apply.
    #[default]
    Unknown,
}

/// Parses the text of an `os-release` file.
pub fn parse_os_release(text: &str) -> OsInfo {
    let mut fields = std::collections::BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            fields.insert(k.trim().to_owned(), v.to_owned());
        }
    }
    let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let id = get("ID").to_ascii_lowercase();
    let family = match id.as_str() {
        "ubuntu" => OsFamily::Ubuntu,
        "azurelinux" | "mariner" => OsFamily::AzureLinux,
        _ => OsFamily::Unknown,
    };
    OsInfo {
        id: if id.is_empty() { "unknown".into() } else { id },
        version_id: get("VERSION_ID"),
        pretty_name: get("PRETTY_NAME"),
        family,
    }
}

/// Reads the host's `os-release` under `root` (`/etc/os-release`, else `/usr/lib/os-release`).
pub fn read_os_release(root: &Path) -> OsInfo {
    for p in ["etc/os-release", "usr/lib/os-release"] {
        if let Ok(text) = std::fs::read_to_string(root.join(p)) {
            return parse_os_release(&text);
        }
    }
    parse_os_release("")
}

/// The running kernel's release (`uname -r`; a container shares the host's kernel).
pub fn running_kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The kernel's boot id (`/proc/sys/kernel/random/boot_id`; the host's, even in a container).
pub fn kernel_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Orders kernel release strings by their numeric parts (`6.8.0-50-generic` < `6.8.0-51-generic`,
/// `5.15.0-9` < `5.15.0-10`).
pub fn kernel_version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(u64::MAX))
        .collect()
}

/// The newest kernel installed under `root/lib/modules`, if newer than `running`: the host
/// booted an older kernel than it has, so it needs a reboot.
pub fn newer_kernel_installed(root: &Path, running: &str) -> Option<String> {
    let entries = std::fs::read_dir(root.join("lib/modules")).ok()?;
    let newest = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .max_by_key(|name| kernel_version_key(name))?;
    (kernel_version_key(&newest) > kernel_version_key(running)).then_some(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_order_numerically() {
        assert!(kernel_version_key("6.8.0-51-generic") > kernel_version_key("6.8.0-50-generic"));
        assert!(kernel_version_key("5.15.0-10") > kernel_version_key("5.15.0-9"));
        assert!(kernel_version_key("6.6.57.1-1.azl3") > kernel_version_key("6.6.51.1-5.azl3"));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            newer_kernel_installed(dir.path(), "6.8.0-50-generic"),
            None,
            "no modules dir"
        );
        for k in ["6.8.0-49-generic", "6.8.0-51-generic", "6.8.0-50-generic"] {
            std::fs::create_dir_all(dir.path().join("lib/modules").join(k)).unwrap();
        }
        assert_eq!(
            newer_kernel_installed(dir.path(), "6.8.0-50-generic").as_deref(),
            Some("6.8.0-51-generic")
        );
        assert_eq!(newer_kernel_installed(dir.path(), "6.8.0-51-generic"), None);
    }

    #[test]
    fn lsm_labels_are_classified() {
        let aa = classify_lsm_label(Some("cri-containerd.apparmor.d (enforce)\n"), Some("ignored"));
        assert_eq!(
            aa,
            Some(LsmLabel::AppArmor("cri-containerd.apparmor.d (enforce)".into()))
        );
        assert!(aa.unwrap().confining());
        // Older kernels: only attr/current, with AppArmor's "profile (mode)" form.
        let aa = classify_lsm_label(None, Some("docker-default (enforce)\0"));
        assert_eq!(aa, Some(LsmLabel::AppArmor("docker-default (enforce)".into())));
        let un = classify_lsm_label(Some("unconfined"), Some("unconfined")).unwrap();
        assert!(!un.confining());
        let se = classify_lsm_label(None, Some("system_u:system_r:container_t:s0:c12,c34")).unwrap();
        assert!(matches!(se, LsmLabel::SeLinux(_)) && se.confining());
        // Stacked: AppArmor unconfined, SELinux the display module.
        let se = classify_lsm_label(Some("unconfined"), Some("system_u:system_r:spc_t:s0")).unwrap();
        assert_eq!(se, LsmLabel::SeLinux("system_u:system_r:spc_t:s0".into()));
        assert!(!se.confining());
        assert_eq!(classify_lsm_label(None, None), None);
        assert_eq!(
            parse_cap_eff("Name:\tx\nCapEff:\t00000000a80c25fb\n"),
            Some(0xa80c_25fb)
        );
    }

    #[test]
    fn a_refusal_names_the_security_module_and_the_chart_value() {
        let eacces = std::io::Error::from_raw_os_error(libc::EACCES);
        let eperm = std::io::Error::from_raw_os_error(libc::EPERM);
        let aa = LsmLabel::AppArmor("cri-containerd.apparmor.d (enforce)".into());
        let text = denied_hint(Access::Namespaces, &eacces, true, Some(&aa));
        assert_eq!(
            text,
            "CAP_SYS_PTRACE is held, so AppArmor refused it: this process runs under the profile \
             \"cri-containerd.apparmor.d (enforce)\", and a container runtime's default profile \
             allows ptrace and signals only within that profile, not to the unconfined PID 1; give \
             the agent securityContext.appArmorProfile type Unconfined (the chart value \
             agent.appArmorProfile, its default)"
        );
        let text = denied_hint(Access::Signal, &eperm, true, Some(&aa));
        assert!(
            text.starts_with("the agent runs as root, so AppArmor refused it"),
            "{text}"
        );
        let se = LsmLabel::SeLinux("system_u:system_r:container_t:s0:c1,c2".into());
        let text = denied_hint(Access::Namespaces, &eacces, true, Some(&se));
        assert!(
            text.contains("SELinux refused it")
                && text.contains("container_t")
                && text.contains("agent.seLinuxOptions: {type: spc_t}"),
            "{text}"
        );
        // Without the capability the capability is to blame, whatever the label.
        let text = denied_hint(Access::Namespaces, &eacces, false, Some(&aa));
        assert_eq!(text, "needs CAP_SYS_PTRACE, which this process does not hold");
        let text = denied_hint(Access::Signal, &eperm, false, None);
        assert!(text.contains("uid 0") && text.contains("CAP_KILL"), "{text}");
        // Held, but nothing confines: say so rather than blame the capability.
        let text = denied_hint(
            Access::Namespaces,
            &eacces,
            true,
            Some(&LsmLabel::AppArmor("unconfined".into())),
        );
        assert!(
            text.contains("not confined by AppArmor or SELinux") && text.contains("user namespace"),
            "{text}"
        );
        // Not a refusal: the plain requirement.
        let enoent = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(
            denied_hint(Access::Namespaces, &enoent, true, Some(&aa)),
            "needs CAP_SYS_PTRACE"
        );
    }

    #[test]
    fn access_check_opens_without_entering() {
        let own = HostExec {
            host_namespaces: false,
            host_pid: i32::MAX - 1,
        };
        own.check_access()
            .expect("nothing to check without host namespaces");
        let me = HostExec {
            host_namespaces: true,
            host_pid: std::process::id() as i32,
        };
        me.check_access().expect("a process may open its own namespaces");
        let gone = HostExec {
            host_namespaces: true,
            host_pid: i32::MAX - 1,
        };
        assert!(matches!(
            gone.check_access(),
            Err(HostError::NoSuchProcess { .. })
        ));
    }

    #[test]
    fn empty_command_and_missing_process_are_errors() {
        let own = HostExec {
            host_namespaces: false,
            host_pid: 1,
        };
        assert!(matches!(own.command(&[]), Err(HostError::EmptyCommand)));
        let gone = HostExec {
            host_namespaces: true,
            host_pid: i32::MAX - 1,
        };
        assert!(matches!(
            gone.command(&["true".into()]),
            Err(HostError::NoSuchProcess { .. })
        ));
    }
}
