//! Reboot-required detection from the sentinel file, watched with inotify (`notify`).
//!
//! There is no polling period: the watch is on the sentinel's directory (or, while that does
//! not exist yet, on its nearest existing ancestor, re-armed deeper as directories appear), so a
//! file created, removed, re-created or renamed into place is seen within milliseconds. The
//! packages listed in `<sentinel>.pkgs` (Ubuntu's `reboot-required.pkgs`) are the reason,
//! bounded so that a long list cannot bloat a label, an annotation or an Event.
//!
//! `notify` delivers events on its own thread, and re-arming a watch from inside its event
//! handler would deadlock the inotify loop; a small thread of ours receives a nudge per event,
//! re-arms if needed and re-reads the state.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
};

use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use tracing::{debug, warn};

/// At most this many package names are reported.
pub const MAX_PACKAGES: usize = 20;
/// At most this many bytes of package names are reported.
pub const MAX_PACKAGE_BYTES: usize = 1024;

/// What the sentinel says right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentinelState {
    /// The sentinel file exists.
    pub required: bool,
    /// Packages from `<sentinel>.pkgs`, bounded (the last entry may read "and N more").
    pub packages: Vec<String>,
}

/// Failure to set up the watch.
#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    /// The inotify watch could not be created.
    #[error("failed to watch {path}: {source}")]
    Watch {
        /// Watched path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: notify::Error,
    },
    /// The path has no existing ancestor to watch (a relative path with no parent, say).
    #[error("cannot watch {path}: no existing directory above it")]
    NoAncestor {
        /// The sentinel path.
        path: PathBuf,
    },
}

/// Bounds a package list: at most [`MAX_PACKAGES`] names and [`MAX_PACKAGE_BYTES`] bytes; what
/// is left out is summarised as "and N more".
pub fn bound_packages(text: &str) -> Vec<String> {
    let all: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let mut out = Vec::new();
    let mut bytes = 0;
    for name in &all {
        let name: String = name.chars().take(128).collect();
        if out.len() == MAX_PACKAGES || bytes + name.len() > MAX_PACKAGE_BYTES {
            break;
        }
        bytes += name.len();
        out.push(name);
    }
    if out.len() < all.len() {
        out.push(format!("and {} more", all.len() - out.len()));
    }
    out
}

/// Reads the sentinel's state from the filesystem.
pub fn read_state(path: &Path) -> SentinelState {
    let required = path.exists();
    let mut pkgs = path.as_os_str().to_owned();
    pkgs.push(".pkgs");
    let packages = if required {
        std::fs::read_to_string(&pkgs)
            .map(|t| bound_packages(&t))
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    SentinelState { required, packages }
}

/// The directory to watch: the sentinel's parent if it exists, else its nearest existing
/// ancestor.
fn watch_target(path: &Path) -> Option<PathBuf> {
    let mut dir = path.parent()?;
    loop {
        if dir.is_dir() {
            return Some(dir.to_path_buf());
        }
        dir = dir.parent()?;
    }
}

/// A watcher that nudges `tx` on every event.
fn new_watcher(tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Err(e) = &res {
            warn!(error = %e, "sentinel watch error");
        }
        // The receiver is gone only when the watch is being torn down.
        let _ = tx.send(());
    })
}

/// The identity (device, inode) of a directory, to notice one removed and re-created.
fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// The directories watched: the target (the sentinel's directory or its nearest existing
/// ancestor) and the target's parent, whose events tell when the target itself is removed (the
/// kernel drops a watch on a removed directory without an event that `notify` passes on).
#[derive(Default)]
struct Armed {
    target: PathBuf,
    dirs: Vec<(PathBuf, Option<(u64, u64)>)>,
}

impl Armed {
    /// Whether `target` is what is watched, as the same directory (inode) as when armed.
    fn is_current(&self, target: &Path) -> bool {
        self.target == target && self.dirs.iter().all(|(d, id)| dir_id(d) == *id)
    }

    fn arm(&mut self, watcher: &mut impl Watcher, target: &Path) -> notify::Result<()> {
        self.dirs.clear();
        let mut dirs = vec![target.to_path_buf()];
        dirs.extend(target.parent().map(Path::to_path_buf));
        for d in dirs {
            let id = dir_id(&d);
            watcher.watch(&d, RecursiveMode::NonRecursive)?;
            self.dirs.push((d, id));
        }
        self.target = target.to_path_buf();
        Ok(())
    }
}

/// What a sentinel command said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandVerdict {
    /// A reboot is needed.
    Required,
    /// No reboot is needed.
    NotRequired,
    /// The command failed; treated as "not needed", as kured does, and reported.
    Error(String),
}

/// Interprets a sentinel command's exit code: 0 = reboot needed, 1 = not needed, anything else
/// an error. `invert` swaps 0 and 1, for commands such as `needs-restarting -r` that exit 1 when
/// a reboot is needed.
pub fn verdict(code: Option<i32>, invert: bool) -> CommandVerdict {
    match (code, invert) {
        (Some(0), false) | (Some(1), true) => CommandVerdict::Required,
        (Some(1), false) | (Some(0), true) => CommandVerdict::NotRequired,
        (Some(c), _) => CommandVerdict::Error(format!("exited with code {c} (expected 0 or 1)")),
        (None, _) => CommandVerdict::Error("killed by a signal".into()),
    }
}

/// Runs the sentinel command on the host, bounded by `timeout`.
pub async fn run_sentinel_command(
    exec: &crate::host::HostExec,
    argv: &[String],
    timeout: std::time::Duration,
    invert: bool,
) -> CommandVerdict {
    match exec.run(argv, timeout).await {
        Ok(f) => verdict(f.code, invert),
        Err(e) => CommandVerdict::Error(e.to_string()),
    }
}

/// Checks besides the sentinel file, which have no event to watch and so run on an interval.
#[derive(Debug, Clone)]
pub struct ExtraChecks {
    /// Where host commands run.
    pub exec: crate::host::HostExec,
    /// `--sentinel-command`, if any.
    pub command: Option<Vec<String>>,
    /// Swap the meaning of exit codes 0 and 1.
    pub invert: bool,
    /// Compare the running kernel with the newest one installed.
    pub kernel_check: bool,
    /// How often these run.
    pub interval: std::time::Duration,
}

/// Combines the file watch with the extra checks: the node needs a reboot if any says so.
/// Without extra checks the file watch's receiver is returned as it is.
pub fn combine(file: watch::Receiver<SentinelState>, checks: ExtraChecks) -> watch::Receiver<SentinelState> {
    if checks.command.is_none() && !checks.kernel_check {
        return file;
    }
    let (tx, rx) = watch::channel(file.borrow().clone());
    let mut file = file;
    tokio::spawn(async move {
        let mut extra: Option<String> = None;
        let mut tick = tokio::time::interval(checks.interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    extra = None;
                    if let Some(argv) = &checks.command {
                        match run_sentinel_command(&checks.exec, argv, std::time::Duration::from_secs(30), checks.invert).await {
                            CommandVerdict::Required => extra = Some(format!("sentinel command {argv:?}")),
                            CommandVerdict::NotRequired => {}
                            CommandVerdict::Error(e) => warn!(command = ?argv, error = %e, "sentinel command failed; treated as no reboot needed"),
                        }
                    }
                    if extra.is_none() && checks.kernel_check {
                        let running = crate::host::running_kernel();
                        if let Some(newer) = crate::host::newer_kernel_installed(&checks.exec.host_root(), &running) {
                            extra = Some(format!("kernel {newer} installed, {running} running"));
                        }
                    }
                }
                r = file.changed() => if r.is_err() { return },
            }
            let mut state = file.borrow().clone();
            if let Some(reason) = &extra {
                state.required = true;
                state.packages.push(reason.clone());
            }
            tx.send_if_modified(|s| {
                let changed = *s != state;
                *s = state;
                changed
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// A running watch of one sentinel file.
pub struct SentinelWatch {
    rx: watch::Receiver<SentinelState>,
}

impl SentinelWatch {
    /// Starts watching `path`.
    ///
    /// # Errors
    /// [`SentinelError`] when inotify refuses or nothing above the path exists.
    pub fn start(path: PathBuf) -> Result<SentinelWatch, SentinelError> {
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path)
        };
        let (nudge_tx, nudge_rx) = mpsc::channel::<()>();
        let mut watcher = new_watcher(nudge_tx.clone()).map_err(|source| SentinelError::Watch {
            path: path.clone(),
            source,
        })?;
        let first = watch_target(&path).ok_or_else(|| SentinelError::NoAncestor { path: path.clone() })?;
        let mut armed = Armed::default();
        armed
            .arm(&mut watcher, &first)
            .map_err(|source| SentinelError::Watch {
                path: first.clone(),
                source,
            })?;
        let (tx, rx) = watch::channel(read_state(&path));
        std::thread::Builder::new()
            .name("sentinel".into())
            .spawn(move || {
                let mut failures = 0u32;
                while nudge_rx.recv().is_ok() {
                    // Coalesce a burst of events into one re-read.
                    while nudge_rx.try_recv().is_ok() {}
                    // Re-arm until the target is stable: a directory created between our look
                    // and the new watch would otherwise go unnoticed (its event came before the
                    // watch existed), so look again after every re-arm.
                    while let Some(now) = watch_target(&path).filter(|now| !armed.is_current(now)) {
                        // A fresh inotify instance each time: `notify` forgets a removed
                        // directory's watch by path when it processes the removal, which can
                        // come after, and cancel, a new watch of a re-created directory.
                        let fresh = new_watcher(nudge_tx.clone())
                            .and_then(|mut w| armed.arm(&mut w, &now).map(|()| w));
                        if let Err(e) = fresh.map(|w| watcher = w) {
                            // Usually the directory vanished between the look and the watch:
                            // look again shortly (the ancestor above it is then the target).
                            failures += 1;
                            if failures % 100 == 1 {
                                warn!(dir = %now.display(), error = %e, "cannot re-arm the sentinel watch; retrying");
                            }
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            continue;
                        }
                        failures = 0;
                        debug!(dir = %now.display(), "sentinel watch re-armed");
                    }
                    let state = read_state(&path);
                    tx.send_if_modified(|s| {
                        let changed = *s != state;
                        *s = state;
                        changed
                    });
                    if tx.is_closed() {
                        return;
                    }
                }
            })
            .map_err(|e| SentinelError::Watch {
                path: PathBuf::new(),
                source: notify::Error::io(e),
            })?;
        Ok(SentinelWatch { rx })
    }

    /// A receiver of the current state and every change.
    pub fn receiver(&self) -> watch::Receiver<SentinelState> {
        self.rx.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_exit_codes() {
        assert_eq!(verdict(Some(0), false), CommandVerdict::Required);
        assert_eq!(verdict(Some(1), false), CommandVerdict::NotRequired);
        assert_eq!(
            verdict(Some(1), true),
            CommandVerdict::Required,
            "needs-restarting -r"
        );
        assert!(matches!(verdict(Some(2), false), CommandVerdict::Error(_)));
        assert!(matches!(verdict(None, true), CommandVerdict::Error(_)));
    }

    #[test]
    fn packages_are_bounded() {
        let many: String = (0..500).map(|i| format!("linux-package-{i}\n")).collect();
        let p = bound_packages(&many);
        assert_eq!(p.len(), MAX_PACKAGES + 1);
        assert_eq!(p.last().map(String::as_str), Some("and 480 more"));
        assert!(p.iter().map(String::len).sum::<usize>() < MAX_PACKAGE_BYTES + 20);
        assert_eq!(bound_packages("a\n\n b \n"), vec!["a", "b"]);
        assert!(bound_packages("").is_empty());
    }

    #[test]
    fn watch_target_is_the_nearest_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/reboot-required");
        assert_eq!(watch_target(&deep).as_deref(), Some(dir.path()));
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        assert_eq!(watch_target(&deep), Some(dir.path().join("a/b")));
    }
}
