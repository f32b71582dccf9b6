//! The reboot itself: the configured command (default `systemctl reboot`) run on the host, or
//! SIGRTMIN+5 sent to the host's PID 1 (systemd's "reboot" signal; the fallback where no
//! systemctl can be run).
//!
//! The agent holds an `Arc<dyn Rebooter>`; the simulated cluster's harness supplies its own.
//! A failure is returned, never swallowed: the agent reports it (Event, metric, log) and ends
//! the cycle as for a failed drain (uncordon if kreboot cordoned, release the lock, wait
//! `--failure-backoff`). [`Rebooter::preflight`] proves beforehand, without side effects, that
//! the reboot may reach the host at all.

use std::{sync::Arc, time::Duration};

use clap::ValueEnum;
use futures::future::BoxFuture;

use crate::host::{HostError, HostExec};

/// How long the reboot command may take to accept the request.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the reboot could not be requested.
#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// The reboot command could not be started or failed.
    #[error("reboot command {command:?} failed: {message}")]
    Command {
        /// The command line.
        command: Vec<String>,
        /// What happened.
        message: String,
    },
    /// The signal could not be delivered.
    #[error("cannot send SIGRTMIN+5 to process {pid}: {source}{hint}")]
    Signal {
        /// Target.
        pid: i32,
        /// Cause.
        #[source]
        source: nix::Error,
        /// For a refusal: what refused it and how to fix it (` (...)`), else empty.
        hint: String,
    },
}

/// How to reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RebootMethod {
    /// Run `--reboot-command` on the host.
    Command,
    /// Send SIGRTMIN+5 to the host's PID 1 (systemd reboots on it).
    Signal,
}

/// Something that can reboot this node.
pub trait Rebooter: Send + Sync {
    /// Requests the reboot. Returns once the request was accepted; the machine goes down later.
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>>;

    /// Proves, without side effects, that [`Rebooter::reboot`] would be allowed to reach the
    /// host (the preflight run before the node is taken out of service). `Err` says what
    /// refused it and how to fix it. The default (a simulated host) always may.
    fn preflight(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Reboots by running a command through [`HostExec`].
pub struct CommandRebooter {
    /// The command line, program first.
    pub command: Vec<String>,
    /// Where it runs.
    pub exec: HostExec,
}

impl Rebooter for CommandRebooter {
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>> {
        Box::pin(async move {
            let fail = |message: String| RebootError::Command {
                command: self.command.clone(),
                message,
            };
            match self.exec.run(&self.command, COMMAND_TIMEOUT).await {
                Ok(f) if f.code == Some(0) => Ok(()),
                Ok(f) => Err(fail(format!(
                    "exited with {}{}",
                    f.code.map_or("a signal".to_owned(), |c| format!("code {c}")),
                    if f.stderr.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", f.stderr)
                    }
                ))),
                Err(e @ HostError::Timeout { .. }) => Err(fail(e.to_string())),
                Err(e) => Err(fail(e.to_string())),
            }
        })
    }

    /// The command runs in the host's namespaces (with `--host-namespaces`): their files must
    /// open. Nothing is entered or run.
    fn preflight(&self) -> Result<(), String> {
        self.exec.check_access().map_err(|e| e.to_string())
    }
}

/// Reboots by sending SIGRTMIN+5 to the target process (systemd's PID 1).
pub struct SignalRebooter {
    /// The target process.
    pub pid: i32,
}

/// SIGRTMIN+5 as systemd numbers it: signal 39, which its PID 1 treats as "reboot".
///
/// systemd is built against glibc, whose SIGRTMIN is 34 (the kernel's 32 plus two signals glibc
/// keeps for itself). musl keeps three, so `libc::SIGRTMIN() + 5` in the static musl binary is
/// 40: systemd's SIGRTMIN+6, "kexec" (found by tests/vm.rs: the guest went down through
/// systemd-kexec.service, and only rebooted because no kexec kernel was loaded).
pub fn reboot_signal() -> i32 {
    const GLIBC_SIGRTMIN: i32 = 34;
    GLIBC_SIGRTMIN + 5
}

impl Rebooter for SignalRebooter {
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>> {
        Box::pin(async move { send_signal(self.pid, reboot_signal()) })
    }

    /// kill(pid, 0): the kernel checks the permission to signal (uid or CAP_KILL, then the LSM:
    /// AppArmor mediates signal 0 as "exists") and sends nothing.
    fn preflight(&self) -> Result<(), String> {
        send_signal(self.pid, 0).map_err(|e| match e {
            RebootError::Signal { pid, source, hint } => {
                format!("cannot signal process {pid} (kill with signal 0): {source}{hint}")
            }
            other => other.to_string(),
        })
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: i32, signal: i32) -> Result<(), RebootError> {
    // nix's `Signal` enum has no real-time signals, so kill(2) is called directly.
    // SAFETY: kill(2) takes two integers and touches no memory of ours; any pid/signal pair is
    // defined behaviour (an invalid one returns an error, read from errno below).
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        let source = nix::Error::last();
        let hint = if matches!(source, nix::Error::EPERM | nix::Error::EACCES) {
            let held = nix::unistd::geteuid().is_root() || crate::host::has_capability(crate::host::CAP_KILL);
            format!(
                " ({})",
                crate::host::denied_hint(
                    crate::host::Access::Signal,
                    &std::io::Error::from(source),
                    held,
                    crate::host::read_own_lsm_label().as_ref(),
                )
            )
        } else {
            String::new()
        };
        Err(RebootError::Signal { pid, source, hint })
    }
}

/// The rebooter for `method`.
pub fn rebooter(method: RebootMethod, command: Vec<String>, exec: HostExec) -> Arc<dyn Rebooter> {
    match method {
        RebootMethod::Command => Arc::new(CommandRebooter { command, exec }),
        RebootMethod::Signal => Arc::new(SignalRebooter { pid: exec.host_pid }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> HostExec {
        HostExec {
            host_namespaces: false,
            host_pid: 1,
        }
    }

    #[tokio::test]
    async fn a_failing_command_is_an_error_with_its_output() {
        let r = CommandRebooter {
            command: vec!["sh".into(), "-c".into(), "echo no bus >&2; exit 3".into()],
            exec: own(),
        };
        let e = r.reboot().await.unwrap_err().to_string();
        assert!(e.contains("code 3") && e.contains("no bus"), "{e}");
        let r = CommandRebooter {
            command: vec!["/nonexistent/reboot".into()],
            exec: own(),
        };
        assert!(r.reboot().await.unwrap_err().to_string().contains("cannot start"));
        let r = CommandRebooter {
            command: vec!["true".into()],
            exec: own(),
        };
        r.reboot().await.unwrap();
    }

    #[test]
    fn the_reboot_signal_is_systemds_whatever_the_libc() {
        assert_eq!(reboot_signal(), 39);
    }

    #[test]
    fn preflight_checks_without_side_effects() {
        // Signal 0 to ourselves: allowed, nothing delivered.
        let myself = SignalRebooter {
            pid: std::process::id() as i32,
        };
        myself.preflight().expect("may signal itself");
        let gone = SignalRebooter { pid: i32::MAX - 1 };
        let e = gone.preflight().unwrap_err();
        assert!(e.contains("ESRCH"), "{e}");
        let cmd = CommandRebooter {
            command: vec!["true".into()],
            exec: HostExec {
                host_namespaces: true,
                host_pid: i32::MAX - 1,
            },
        };
        assert!(cmd.preflight().unwrap_err().contains("does not exist"));
        let cmd = CommandRebooter {
            command: vec!["true".into()],
            exec: own(),
        };
        cmd.preflight().expect("own namespaces: nothing to check");
    }

    #[tokio::test]
    async fn signal_to_a_missing_process_is_an_error() {
        let e = SignalRebooter { pid: i32::MAX - 1 }.reboot().await.unwrap_err();
        assert!(e.to_string().contains("SIGRTMIN+5"), "{e}");
    }
}
