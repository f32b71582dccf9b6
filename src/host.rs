//! Running commands on the host: inside PID 1's (or `--host-pid`'s) namespaces via `setns`
//! in the spawned child, or in the agent's own namespaces when `--host-namespaces=false`.
//!
//! CONTRACT (used by the agent and `reboot`; keep these signatures):
//! `HostExec::command(argv)` returns a ready-to-spawn `tokio::process::Command`.

/// Where host commands run.
#[derive(Debug, Clone)]
pub struct HostExec {
    /// Enter the target process's namespaces before exec.
    pub host_namespaces: bool,
    /// The target process (PID 1 of the host by default).
    pub host_pid: i32,
}

impl HostExec {
    /// A command for `argv` (program first) that runs where this `HostExec` says.
    pub fn command(&self, argv: &[String]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    }
}
