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
    /// A namespace file could not be opened (usually a missing CAP_SYS_PTRACE).
    #[error("cannot open the {ns} namespace of process {pid}: {source} (needs CAP_SYS_PTRACE)")]
    OpenNamespace {
        /// The pid.
        pid: i32,
        /// Which namespace.
        ns: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
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
        let mut fds: Vec<(OwnedFd, CloneFlags)> = Vec::new();
        for (ns, flag) in NAMESPACES {
            let file = File::open(format!("/proc/{pid}/ns/{ns}"))
                .map_err(|source| HostError::OpenNamespace { pid, ns, source })?;
            fds.push((OwnedFd::from(file), flag));
        }
        cmd.env_clear().env("PATH", HOST_PATH).env("LANG", "C.UTF-8");
        enter_namespaces(&mut cmd, fds);
        Ok(cmd)
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
