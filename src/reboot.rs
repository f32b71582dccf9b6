//! The reboot itself: the configured command (default `systemctl reboot`) run on the host,
//! or SIGRTMIN+5 to the host's PID 1.
//!
//! CONTRACT (used by the agent; keep these signatures): the agent holds an
//! `Arc<dyn Rebooter>`; the simulated cluster's harness supplies its own implementation.

use futures::future::BoxFuture;

use crate::host::HostExec;

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
}

/// Something that can reboot this node.
pub trait Rebooter: Send + Sync {
    /// Requests the reboot. Returns once the request was accepted; the machine goes down later.
    fn reboot(&self) -> BoxFuture<'_, Result<(), RebootError>>;
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
            let status =
                self.exec
                    .command(&self.command)
                    .status()
                    .await
                    .map_err(|e| RebootError::Command {
                        command: self.command.clone(),
                        message: e.to_string(),
                    })?;
            if status.success() {
                Ok(())
            } else {
                Err(RebootError::Command {
                    command: self.command.clone(),
                    message: format!("exited with {status}"),
                })
            }
        })
    }
}
