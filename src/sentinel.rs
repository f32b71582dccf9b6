//! Reboot-required detection from the sentinel file, watched with inotify (`notify`), or polled
//! where inotify cannot be used.
//!
//! There is no polling period while inotify works: the watch is on the sentinel's directory (or,
//! while that does not exist yet, on its nearest existing ancestor, re-armed deeper as
//! directories appear), so a file created, removed, re-created or renamed into place is seen
//! within milliseconds. The packages listed in `<sentinel>.pkgs` (Ubuntu's
//! `reboot-required.pkgs`) are the reason, bounded so that a long list cannot bloat a label, an
//! annotation or an Event.
//!
//! Where inotify refuses (EMFILE: the uid's `fs.inotify.max_user_instances` used up; ENOSPC:
//! its `fs.inotify.max_user_watches`; ENOSYS), or the filesystem delivers no events (noticed
//! when the file differs from what was last reported and no event explains it), the same
//! directories are scanned by `notify`'s `PollWatcher` every poll interval instead, and inotify
//! is tried again every few minutes ([`WatchOptions`]). The agent never stops for this; the
//! mode is reported ([`SentinelWatch::mode`], [`spawn_mode_reporter`]).
//!
//! `notify` delivers events on its own thread, and re-arming a watch from inside its event
//! handler would deadlock the inotify loop; a small thread of ours receives a nudge per event,
//! re-arms if needed and re-reads the state.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use notify::{
    EventKind, RecursiveMode, Watcher,
    event::{AccessKind, AccessMode},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

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

/// What is at the sentinel's path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Nothing.
    Absent,
    /// A file (or another non-directory: a FIFO, a socket), directly or through a symlink:
    /// a reboot is required, whatever it contains (as in kured, whose test is "exists").
    File,
    /// A directory: not a reboot request. Nothing that asks for a reboot makes one (apt,
    /// needs-restarting and kured's users `touch` a file); the usual way one appears is a
    /// hostPath volume of the sentinel *file* whose file was absent, which the kubelet creates
    /// as an empty directory, again at every pod start. Read as "required" it would reboot the
    /// node, and every node so mounted, in a loop; so it is ignored with a warning.
    Directory,
    /// A symlink whose target does not exist: absent (the target is what would say it).
    DanglingSymlink(PathBuf),
    /// The path cannot be examined (permission denied, a looping symlink, an I/O error): not a
    /// reboot request, with a warning; the watch re-reads it at every change and poll.
    Unreadable(String),
}

impl Found {
    /// Whether this means "reboot required".
    pub fn required(&self) -> bool {
        matches!(self, Found::File)
    }

    /// The warning for an operator when the path holds something unexpected.
    pub fn warning(&self, path: &Path) -> Option<String> {
        let p = path.display();
        match self {
            Found::Absent | Found::File => None,
            Found::Directory => Some(format!(
                "sentinel {p} is a directory, not a file: not read as a reboot request (a hostPath volume of a missing file creates a directory; mount its parent directory instead, and remove it)"
            )),
            Found::DanglingSymlink(target) => Some(format!(
                "sentinel {p} is a symlink to {}, which does not exist: no reboot required until it does",
                target.display()
            )),
            Found::Unreadable(e) => Some(format!(
                "sentinel {p} cannot be examined ({e}): not read as a reboot request"
            )),
        }
    }
}

/// Looks at the sentinel's path (following symlinks) without reading it.
pub fn examine(path: &Path) -> Found {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Found::Directory,
        Ok(_) => Found::File,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::symlink_metadata(path) {
            // The link itself exists, its target does not.
            Ok(m) if m.file_type().is_symlink() => {
                Found::DanglingSymlink(std::fs::read_link(path).unwrap_or_default())
            }
            _ => Found::Absent,
        },
        Err(e) => Found::Unreadable(e.to_string()),
    }
}

/// Reads the sentinel's state from the filesystem.
pub fn read_state(path: &Path) -> SentinelState {
    let required = examine(path).required();
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

/// Whether an event may mean the sentinel changed. Opening, reading or closing unwritten a file
/// or the directory itself changes nothing; on a busy directory (`/run`, `/var/run`) every `ls`
/// and every reader would otherwise cost a re-read. A close after writing does count: a sentinel
/// rewritten in place shows only as that and a modify.
fn may_change(kind: &EventKind) -> bool {
    !matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Close(AccessMode::Read | AccessMode::Execute)
        )
    )
}

/// A watcher that nudges `tx` on every event that may mean a change, and on every error.
fn new_watcher(tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match &res {
            Err(e) => warn!(error = %e, "sentinel watch error"),
            Ok(event) if !may_change(&event.kind) => return,
            Ok(_) => {}
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

/// Default of `--sentinel-poll-interval`: how often a polling watch scans the sentinel's
/// directory.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Default of the hidden `--sentinel-inotify-retry`: how often a polling watch tries inotify
/// again.
pub const DEFAULT_INOTIFY_RETRY: Duration = Duration::from_secs(300);
/// How long a change that inotify did not report is given for its event to arrive before the
/// watch concludes that the filesystem delivers none.
const EVENT_GRACE: Duration = Duration::from_secs(1);
/// How often an idle watch thread with nothing to wait for checks that it is still wanted.
const IDLE_WAKE: Duration = Duration::from_secs(60);

/// How the sentinel is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify: a change is seen within milliseconds.
    Inotify,
    /// `notify`'s `PollWatcher`: a change is seen within the poll interval.
    Poll,
}

impl WatchMode {
    /// The `mode` label of `kreboot_sentinel_watch_mode`.
    pub fn as_str(self) -> &'static str {
        match self {
            WatchMode::Inotify => "inotify",
            WatchMode::Poll => "poll",
        }
    }
}

/// The watch mode, as the watch thread reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModeState {
    /// The current mode.
    pub mode: WatchMode,
    /// How many times the watch has fallen back to polling (each is one WARN line and one Event).
    pub fallbacks: u64,
    /// Why it fell back the last time (kept after a return to inotify).
    pub last_fallback: Option<String>,
}

/// Timings of the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// How often a polling watch scans (`--sentinel-poll-interval`). A watch on inotify also
    /// compares the file with what it last reported this often: a difference that no event
    /// explains means the filesystem delivers no events, and the watch polls from then on.
    pub poll_interval: Duration,
    /// How often a polling watch tries inotify again (hidden `--sentinel-inotify-retry`).
    pub inotify_retry: Duration,
}

impl Default for WatchOptions {
    fn default() -> WatchOptions {
        WatchOptions {
            poll_interval: DEFAULT_POLL_INTERVAL,
            inotify_retry: DEFAULT_INOTIFY_RETRY,
        }
    }
}

/// Why inotify cannot be used: the errno, the sysctl that helps, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The errno's name (`EMFILE`, `ENOSPC`, `ENOSYS`, ...), or `no-events`.
    pub errno: String,
    /// The sysctl to raise, when raising one helps.
    pub sysctl: Option<&'static str>,
    /// What happened.
    pub detail: String,
    /// Whether trying inotify again later can help.
    pub retry: bool,
}

impl Refusal {
    /// Classifies an error of `inotify_init1` or `inotify_add_watch` (through `notify`).
    pub fn from_error(e: &notify::Error) -> Refusal {
        let raw = match &e.kind {
            // `notify` reports ENOSPC from inotify_add_watch as this kind, without the errno.
            notify::ErrorKind::MaxFilesWatch => Some(libc::ENOSPC),
            notify::ErrorKind::Io(io) => io.raw_os_error(),
            _ => None,
        };
        let (sysctl, what) = match raw {
            Some(libc::EMFILE) => (
                Some("fs.inotify.max_user_instances"),
                "the inotify instances of the agent's uid are used up (or the process's open-file limit is reached)",
            ),
            Some(libc::ENOSPC) => (
                Some("fs.inotify.max_user_watches"),
                "the inotify watches of the agent's uid are used up",
            ),
            Some(libc::ENOSYS) => (None, "the kernel has no inotify"),
            _ => (None, "inotify refused the watch"),
        };
        Refusal {
            errno: raw.map_or_else(
                || "unknown".to_owned(),
                |n| format!("{:?}", nix::errno::Errno::from_raw(n)),
            ),
            sysctl,
            detail: format!("{what}: {e}"),
            retry: true,
        }
    }

    /// The sentinel changed and inotify reported nothing: its filesystem delivers no events
    /// (a network filesystem, `/proc`). Trying again would not help.
    fn no_events() -> Refusal {
        Refusal {
            errno: "no-events".into(),
            sysctl: None,
            detail: "the sentinel changed and inotify reported nothing: its filesystem delivers no events"
                .into(),
            retry: false,
        }
    }

    fn no_ancestor() -> Refusal {
        Refusal {
            errno: "none".into(),
            sysctl: None,
            detail: "no existing directory above the sentinel to watch".into(),
            retry: true,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.errno, self.detail)?;
        if let Some(sysctl) = self.sysctl {
            write!(f, "; raise the sysctl {sysctl}")?;
        }
        Ok(())
    }
}

/// Whether a failed watch means only that the directory vanished between the look and the watch.
fn vanished(e: &notify::Error) -> bool {
    match &e.kind {
        notify::ErrorKind::PathNotFound => true,
        notify::ErrorKind::Io(io) => io.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// The watcher in use (held for as long as it is to watch: dropping it stops it).
enum Active {
    Inotify {
        _watcher: notify::RecommendedWatcher,
    },
    /// `None` only if the poll watcher could not be created (then retries are all there is).
    Poll {
        _watcher: Option<notify::PollWatcher>,
    },
}

/// The watch thread's state.
struct Worker {
    path: PathBuf,
    opts: WatchOptions,
    nudge_tx: mpsc::Sender<()>,
    nudge_rx: mpsc::Receiver<()>,
    state: watch::Sender<SentinelState>,
    mode: watch::Sender<ModeState>,
    active: Active,
    armed: Armed,
    /// When a polling watch next tries inotify (`None`: on inotify, or never).
    next_retry: Option<Instant>,
    /// The last warning logged about what is at the path (each is logged once, when it
    /// appears, not at every poll).
    warned: std::cell::RefCell<Option<String>>,
}

impl Worker {
    /// A fresh inotify instance watching `target` (and its parent).
    fn inotify(&self, target: &Path) -> notify::Result<(notify::RecommendedWatcher, Armed)> {
        let mut watcher = new_watcher(self.nudge_tx.clone())?;
        let mut armed = Armed::default();
        armed.arm(&mut watcher, target)?;
        Ok((watcher, armed))
    }

    /// A `PollWatcher` scanning `target` (and its parent) every poll interval.
    fn poll(&self, target: Option<&Path>) -> (Option<notify::PollWatcher>, Armed) {
        let tx = self.nudge_tx.clone();
        let handler = move |res: notify::Result<notify::Event>| {
            if let Err(e) = &res {
                debug!(error = %e, "sentinel poll error");
            }
            let _ = tx.send(());
        };
        let config = notify::Config::default().with_poll_interval(self.opts.poll_interval);
        let mut armed = Armed::default();
        match notify::PollWatcher::new(handler, config) {
            Ok(mut w) => {
                if let Some(t) = target
                    && let Err(e) = armed.arm(&mut w, t)
                {
                    warn!(dir = %t.display(), error = %e, "cannot poll the sentinel's directory");
                }
                (Some(w), armed)
            }
            Err(e) => {
                warn!(error = %e, "cannot create the sentinel's poll watcher");
                (None, armed)
            }
        }
    }

    /// Re-reads the sentinel and publishes a change.
    fn publish(&self) {
        let warning = examine(&self.path).warning(&self.path);
        if *self.warned.borrow() != warning {
            match &warning {
                Some(w) => warn!(path = %self.path.display(), "{w}"),
                None if self.warned.borrow().is_some() => {
                    info!(path = %self.path.display(), "sentinel path is back to a file or nothing")
                }
                None => {}
            }
            self.warned.replace(warning);
        }
        let now = read_state(&self.path);
        self.state.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    /// Switches to polling: one WARN line, and the mode channel counts the fall-back (the
    /// reporter turns that into the gauge and one Event).
    fn fall_back(&mut self, why: &Refusal) {
        let target = watch_target(&self.path);
        let (watcher, armed) = self.poll(target.as_deref());
        self.active = Active::Poll { _watcher: watcher };
        self.armed = armed;
        self.next_retry = why.retry.then(|| Instant::now() + self.opts.inotify_retry);
        let interval = humantime::format_duration(self.opts.poll_interval).to_string();
        let retry = if why.retry {
            format!(
                "trying inotify again every {}",
                humantime::format_duration(self.opts.inotify_retry)
            )
        } else {
            "not trying inotify again until the agent restarts".to_owned()
        };
        let sysctl = why.sysctl.unwrap_or("-");
        warn!(
            path = %self.path.display(),
            errno = %why.errno,
            sysctl,
            poll_interval = %interval,
            "cannot watch the sentinel with inotify ({why}); polling it every {interval} instead, {retry}"
        );
        let note = format!("{why}; polling the sentinel every {interval}, {retry}");
        self.mode.send_modify(|m| {
            m.mode = WatchMode::Poll;
            m.fallbacks += 1;
            m.last_fallback = Some(note);
        });
        // The poll watcher's first scan is its baseline: read now what changed before it.
        self.publish();
    }

    /// A polling watch tries inotify again.
    fn retry_inotify(&mut self) {
        let tried = watch_target(&self.path)
            .ok_or_else(|| notify::Error::generic("no existing directory above the sentinel"))
            .and_then(|t| self.inotify(&t));
        match tried {
            Ok((watcher, armed)) => {
                self.active = Active::Inotify { _watcher: watcher };
                self.armed = armed;
                self.next_retry = None;
                info!(path = %self.path.display(), "inotify works again: the sentinel is watched with inotify");
                self.mode.send_modify(|m| m.mode = WatchMode::Inotify);
                // Look again at once: a change between the last scan and the new watch.
                let _ = self.nudge_tx.send(());
            }
            Err(e) => {
                debug!(error = %e, "inotify is still unavailable; polling on");
                self.next_retry = Some(Instant::now() + self.opts.inotify_retry);
            }
        }
    }

    /// Re-arms until the target is stable: a directory created between our look and the new
    /// watch would otherwise go unnoticed (its event came before the watch existed), so look
    /// again after every re-arm.
    fn rearm(&mut self) {
        let mut failures = 0u32;
        while let Some(now) = watch_target(&self.path).filter(|now| !self.armed.is_current(now)) {
            if matches!(self.active, Active::Poll { .. }) {
                let (watcher, armed) = self.poll(Some(&now));
                self.active = Active::Poll { _watcher: watcher };
                self.armed = armed;
                continue;
            }
            // A fresh inotify instance each time: `notify` forgets a removed directory's watch
            // by path when it processes the removal, which can come after, and cancel, a new
            // watch of a re-created directory.
            match self.inotify(&now) {
                Ok((watcher, armed)) => {
                    self.active = Active::Inotify { _watcher: watcher };
                    self.armed = armed;
                    failures = 0;
                    debug!(dir = %now.display(), "sentinel watch re-armed");
                }
                Err(e) if vanished(&e) => {
                    // The directory vanished between the look and the watch: look again
                    // shortly (the ancestor above it is then the target).
                    failures += 1;
                    if failures % 100 == 1 {
                        warn!(dir = %now.display(), error = %e, "cannot re-arm the sentinel watch; retrying");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => self.fall_back(&Refusal::from_error(&e)),
            }
        }
    }

    /// Handles a burst of nudges.
    fn changed(&mut self) {
        // Coalesce a burst of events into one re-read.
        while self.nudge_rx.try_recv().is_ok() {}
        self.rearm();
        self.publish();
    }

    /// On inotify, every poll interval: the file must say what was last reported, or inotify
    /// missed the change.
    fn audit(&mut self) {
        if read_state(&self.path) == *self.state.borrow() {
            return;
        }
        // Its event may be on its way.
        match self.nudge_rx.recv_timeout(EVENT_GRACE) {
            Ok(()) => self.changed(),
            Err(_) => self.fall_back(&Refusal::no_events()),
        }
    }

    fn run(mut self) {
        loop {
            let timeout = match self.active {
                Active::Inotify { .. } => self.opts.poll_interval,
                Active::Poll { .. } => self
                    .next_retry
                    .map_or(IDLE_WAKE, |t| t.saturating_duration_since(Instant::now())),
            };
            match self.nudge_rx.recv_timeout(timeout) {
                Ok(()) => self.changed(),
                Err(mpsc::RecvTimeoutError::Timeout) => match self.active {
                    Active::Inotify { .. } => self.audit(),
                    Active::Poll { .. } => {
                        if self.next_retry.is_some_and(|t| t <= Instant::now()) {
                            self.retry_inotify();
                        }
                    }
                },
                // Cannot happen while `self` holds a sender.
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if self.state.is_closed() {
                return;
            }
        }
    }
}

/// A running watch of one sentinel file.
pub struct SentinelWatch {
    rx: watch::Receiver<SentinelState>,
    mode: watch::Receiver<ModeState>,
}

impl SentinelWatch {
    /// Starts watching `path` with the default timings (see [`SentinelWatch::start_with`]).
    ///
    /// # Errors
    /// [`SentinelError`] only when the watch thread cannot be started.
    pub fn start(path: PathBuf) -> Result<SentinelWatch, SentinelError> {
        SentinelWatch::start_with(path, WatchOptions::default())
    }

    /// Starts watching `path`: with inotify where it works; where it does not (EMFILE, ENOSPC,
    /// ENOSYS, a filesystem that delivers no events) by polling every `opts.poll_interval`,
    /// trying inotify again every `opts.inotify_retry`. [`SentinelWatch::mode`] tells which.
    ///
    /// # Errors
    /// [`SentinelError`] only when the watch thread cannot be started.
    pub fn start_with(path: PathBuf, opts: WatchOptions) -> Result<SentinelWatch, SentinelError> {
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir().map(|d| d.join(&path)).unwrap_or(path)
        };
        let (nudge_tx, nudge_rx) = mpsc::channel::<()>();
        let (state, rx) = watch::channel(read_state(&path));
        let (mode, mode_rx) = watch::channel(ModeState {
            mode: WatchMode::Inotify,
            fallbacks: 0,
            last_fallback: None,
        });
        let mut worker = Worker {
            path,
            opts,
            nudge_tx,
            nudge_rx,
            state,
            mode,
            active: Active::Poll { _watcher: None },
            armed: Armed::default(),
            next_retry: None,
            warned: std::cell::RefCell::new(None),
        };
        match watch_target(&worker.path).map(|t| worker.inotify(&t)) {
            Some(Ok((watcher, armed))) => {
                worker.active = Active::Inotify { _watcher: watcher };
                worker.armed = armed;
            }
            Some(Err(e)) => worker.fall_back(&Refusal::from_error(&e)),
            None => worker.fall_back(&Refusal::no_ancestor()),
        }
        // A first look from the thread: a directory or file that appeared between the state
        // read above and the watch.
        let _ = worker.nudge_tx.send(());
        std::thread::Builder::new()
            .name("sentinel".into())
            .spawn(move || worker.run())
            .map_err(|e| SentinelError::Watch {
                path: PathBuf::new(),
                source: notify::Error::io(e),
            })?;
        Ok(SentinelWatch { rx, mode: mode_rx })
    }

    /// A receiver of the current state and every change.
    pub fn receiver(&self) -> watch::Receiver<SentinelState> {
        self.rx.clone()
    }

    /// A receiver of the watch mode and every change of it.
    pub fn mode(&self) -> watch::Receiver<ModeState> {
        self.mode.clone()
    }
}

/// Keeps `kreboot_sentinel_watch_mode` in step with the watch, and records one Event
/// (`SentinelPolling`) on the Node for each fall-back to polling.
pub fn spawn_mode_reporter(
    mut rx: watch::Receiver<ModeState>,
    metrics: crate::metrics::Metrics,
    events: crate::events::Events,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut reported = 0u64;
        loop {
            let m = rx.borrow_and_update().clone();
            metrics.set_sentinel_watch_mode(m.mode.as_str());
            if m.fallbacks > reported {
                reported = m.fallbacks;
                let why = m.last_fallback.unwrap_or_default();
                events.node(
                    crate::events::Reason::SentinelPolling,
                    format!("The sentinel cannot be watched with inotify ({why})."),
                );
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
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
    fn refusals_name_the_errno_and_the_sysctl() {
        let emfile = Refusal::from_error(&notify::Error::io(std::io::Error::from_raw_os_error(
            libc::EMFILE,
        )));
        assert_eq!(emfile.errno, "EMFILE");
        assert_eq!(emfile.sysctl, Some("fs.inotify.max_user_instances"));
        assert!(emfile.retry);
        assert!(
            emfile
                .to_string()
                .ends_with("raise the sysctl fs.inotify.max_user_instances"),
            "{emfile}"
        );
        // `notify` turns ENOSPC from inotify_add_watch into its own kind, without the errno.
        let enospc = Refusal::from_error(&notify::Error::new(notify::ErrorKind::MaxFilesWatch));
        assert_eq!(enospc.errno, "ENOSPC");
        assert_eq!(enospc.sysctl, Some("fs.inotify.max_user_watches"));
        let enosys = Refusal::from_error(&notify::Error::io(std::io::Error::from_raw_os_error(
            libc::ENOSYS,
        )));
        assert_eq!((enosys.errno.as_str(), enosys.sysctl), ("ENOSYS", None));
        let other = Refusal::from_error(&notify::Error::io(std::io::Error::from_raw_os_error(
            libc::EACCES,
        )));
        assert_eq!((other.errno.as_str(), other.sysctl), ("EACCES", None));
        assert!(
            !Refusal::no_events().retry,
            "a filesystem without events stays without"
        );
        assert!(vanished(&notify::Error::path_not_found()));
        assert!(!vanished(&notify::Error::new(notify::ErrorKind::MaxFilesWatch)));
    }

    #[test]
    fn only_events_that_may_change_the_sentinel_nudge() {
        use notify::event::{CreateKind, ModifyKind, RemoveKind};
        for quiet in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert!(!may_change(&quiet), "{quiet:?}");
        }
        for change in [
            EventKind::Create(CreateKind::File),
            EventKind::Remove(RemoveKind::File),
            EventKind::Modify(ModifyKind::Any),
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            EventKind::Any,
            EventKind::Other,
        ] {
            assert!(may_change(&change), "{change:?}");
        }
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
