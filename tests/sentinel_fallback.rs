//! The sentinel watch survives an exhausted inotify, with the real fault and no mock.
//!
//! The real `kreboot agent` binary runs against the simulated cluster as an unprivileged uid
//! (65534) whose inotify budget a helper process of the same uid has used up with real system
//! calls: `inotify_init1` until EMFILE (`fs.inotify.max_user_instances`), or
//! `inotify_add_watch` until ENOSPC (`fs.inotify.max_user_watches`). The agent must stay up,
//! say so (one WARN line naming the errno and the sysctl, the `SentinelPolling` Event,
//! `kreboot_sentinel_watch_mode{mode="poll"} 1`), see the sentinel within the poll interval,
//! and, once the helper frees the budget, be back on inotify within the (shortened) retry period
//! and see a change in under a second. Before the fall-back existed the agent exited 1 at
//! start-up ("cannot watch the sentinel ... Too many open files"), which fails these tests.
//!
//! The agent runs as another uid and the helper changes uid, so these tests need root; without
//! it they fail under CI and say SKIPPED elsewhere. They share uid 65534's budget and so run one at a time.
//! A filesystem that delivers no events at all (`/proc`) is covered without root, and so is the
//! start-up review's other change: a metrics port that cannot be bound only degrades the agent.
//!
//! `cargo test --test sentinel_fallback -- --nocapture` prints the measured latencies.

use std::{
    ffi::CString,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

mod common;

use common::{
    BLACKOUT_EVERY_DAY, Killed, SimHost, event_reasons, free_port, put_policy, sample,
    scrape_metrics as scrape,
};
use kreboot::sentinel::{SentinelWatch, WatchMode, WatchOptions};
use kreboot_testkit::sim::SimConfig;

/// The unprivileged uid (and gid) of the agent and of the helper.
const UID: u32 = 65534;
/// `--sentinel-poll-interval` of the agent under test.
const POLL: Duration = Duration::from_secs(2);
/// The hidden inotify retry period of the agent under test (5 min in production).
const RETRY: Duration = Duration::from_secs(3);
/// What inotify must achieve once it is back.
const INOTIFY_BOUND: Duration = Duration::from_secs(1);

/// uid 65534's inotify budget is shared: one test at a time uses it.
static UID_BUDGET: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The tests of this file run one at a time: the no-events test watches `/proc`, where the other
/// tests' agents starting and stopping could deliver the very events whose absence it detects.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn sysctl(name: &str) -> u64 {
    let path = format!("/proc/sys/fs/inotify/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the helper uses up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exhaust {
    /// inotify instances (EMFILE).
    Instances,
    /// inotify watches (ENOSPC).
    Watches,
}

impl Exhaust {
    fn errno(self) -> &'static str {
        match self {
            Exhaust::Instances => "EMFILE",
            Exhaust::Watches => "ENOSPC",
        }
    }

    fn sysctl(self) -> &'static str {
        match self {
            Exhaust::Instances => "fs.inotify.max_user_instances",
            Exhaust::Watches => "fs.inotify.max_user_watches",
        }
    }
}

/// A forked process of uid [`UID`] holding that uid's inotify instances or watches until it is
/// released (killed: the kernel frees them with its file descriptors).
struct Hog {
    pid: nix::unistd::Pid,
    /// Instances or watches it got before the kernel refused.
    held: u64,
    /// The errno of the refusal.
    errno: i32,
}

impl Hog {
    /// Forks the helper; returns once it has used up the budget. For watches, `files` is a
    /// directory for the files watched (each watch needs an inode the uid can read; several
    /// instances watching the same files multiply the watches).
    fn start(what: Exhaust, files: &Path) -> Hog {
        const INSTANCES_FOR_WATCHES: usize = 32;
        let mut paths: Vec<CString> = Vec::new();
        if what == Exhaust::Watches {
            let per_instance = sysctl("max_user_watches") as usize / INSTANCES_FOR_WATCHES + 16;
            std::fs::create_dir_all(files).expect("files dir");
            std::fs::set_permissions(files, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            for i in 0..per_instance {
                let p = files.join(format!("f{i}"));
                std::fs::write(&p, "").expect("file");
                paths.push(CString::new(p.into_os_string().into_encoded_bytes()).expect("path"));
            }
        }
        // Above the instance limit, so that EMFILE can only mean the uid's instances.
        let nofile = sysctl("max_user_instances") + 256;
        let ptrs: Vec<*const libc::c_char> = paths.iter().map(|p| p.as_ptr()).collect();
        let (report_r, report_w) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child makes only async-signal-safe system calls (setrlimit, setgroups,
        // setgid, setuid, inotify_*, write, pause, _exit) on memory prepared before the fork.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => unsafe {
                use std::os::fd::AsRawFd;
                let out = report_w.as_raw_fd();
                let mut held: u64 = 0;
                let errno: i32;
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(UID) != 0
                    || libc::setuid(UID) != 0
                {
                    errno = -*libc::__errno_location();
                } else if what == Exhaust::Instances {
                    loop {
                        if libc::inotify_init1(libc::IN_CLOEXEC) < 0 {
                            errno = *libc::__errno_location();
                            break;
                        }
                        held += 1;
                    }
                } else {
                    let mut e = 0;
                    'instances: for _ in 0..INSTANCES_FOR_WATCHES {
                        let fd = libc::inotify_init1(libc::IN_CLOEXEC);
                        if fd < 0 {
                            e = *libc::__errno_location();
                            break;
                        }
                        for p in &ptrs {
                            if libc::inotify_add_watch(fd, *p, libc::IN_MODIFY) < 0 {
                                e = *libc::__errno_location();
                                break 'instances;
                            }
                            held += 1;
                        }
                    }
                    errno = e;
                }
                let mut msg = [0u8; 12];
                msg[..8].copy_from_slice(&held.to_le_bytes());
                msg[8..].copy_from_slice(&errno.to_le_bytes());
                libc::write(out, msg.as_ptr().cast(), msg.len());
                loop {
                    libc::pause();
                }
            },
            nix::unistd::ForkResult::Parent { child } => {
                drop(report_w);
                let mut msg = [0u8; 12];
                let mut got = 0;
                while got < msg.len() {
                    match nix::unistd::read(&report_r, &mut msg[got..]) {
                        Ok(0) => panic!("the helper died before reporting"),
                        Ok(n) => got += n,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => panic!("reading the helper's report: {e}"),
                    }
                }
                let held = u64::from_le_bytes(msg[..8].try_into().expect("8 bytes"));
                let errno = i32::from_le_bytes(msg[8..].try_into().expect("4 bytes"));
                let hog = Hog {
                    pid: child,
                    held,
                    errno,
                };
                assert!(
                    errno > 0,
                    "the helper could not become uid {UID}: {}",
                    nix::errno::Errno::from_raw(-errno)
                );
                hog
            }
        }
    }

    /// Frees the budget: the helper dies, the kernel closes its inotify instances.
    fn release(&mut self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(self.pid, None);
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        self.release();
    }
}

/// Scrapes every 10 ms until `series` has `value`; the time it took, or the last scrape.
/// Panics with the agent's log if the agent exits meanwhile.
async fn until(
    agent: &mut Killed,
    log: &Path,
    port: u16,
    series: &str,
    value: f64,
    limit: Duration,
) -> Result<Duration, String> {
    let t = Instant::now();
    let mut last = String::new();
    loop {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            panic!(
                "the agent exited ({status}) instead of working on:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if let Some(m) = scrape(port).await {
            if sample(&m, series) == Some(value) {
                return Ok(t.elapsed());
            }
            last = m;
        }
        if t.elapsed() > limit {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn mode_series(mode: &str) -> String {
    format!("kreboot_sentinel_watch_mode{{mode=\"{mode}\",node=\"n1\"}}")
}

const REQUIRED: &str = "kreboot_reboot_required{node=\"n1\"}";

async fn agent_falls_back_to_polling_and_returns_to_inotify(what: Exhaust) {
    if !is_root() {
        common::cannot_run(
            "the inotify fall-back test",
            &format!(
                "needs root (the agent runs as uid {UID}, and a helper becomes uid {UID} to use up its inotify budget)"
            ),
        );
        return;
    }
    let _budget = UID_BUDGET.lock().await;
    let host = SimHost::start(SimConfig::default()).await;
    let sim = &host.sim;
    // A blackout covering every day: the reboot stays pending, nothing else happens.
    put_policy(sim, BLACKOUT_EVERY_DAY);
    let sentinel = host.open_to_other_uids();
    let log = host.agent_log();

    let mut hog = Hog::start(what, &host.path("files"));
    eprintln!(
        "helper (uid {UID}) holds {} inotify {} (max_user_instances = {}, max_user_watches = {}), then: {}",
        hog.held,
        if what == Exhaust::Instances {
            "instances"
        } else {
            "watches"
        },
        sysctl("max_user_instances"),
        sysctl("max_user_watches"),
        nix::errno::Errno::from_raw(hog.errno),
    );
    assert_eq!(
        nix::errno::Errno::from_raw(hog.errno).to_string(),
        nix::errno::Errno::from_raw(match what {
            Exhaust::Instances => libc::EMFILE,
            Exhaust::Watches => libc::ENOSPC,
        })
        .to_string(),
        "the helper ran into the limit it was meant to"
    );

    let port = free_port();
    // The poll interval and the retry period through the environment, so that a build without
    // them (which exits at start-up) fails on the fault and not on an unknown flag.
    let mut agent = Killed::spawn(
        host.agent(&sentinel)
            .args(["--reboot-command", "false"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .env(
                "KREBOOT_SENTINEL_POLL_INTERVAL",
                humantime::format_duration(POLL).to_string(),
            )
            .env(
                "KREBOOT_SENTINEL_INOTIFY_RETRY",
                humantime::format_duration(RETRY).to_string(),
            )
            .env("RUST_LOG", "info")
            .current_dir(host.dir.path())
            .uid(UID)
            .gid(UID)
            .stderr(std::fs::File::create(&log).expect("log file")),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Up, and polling.
    if let Err(m) = until(
        &mut agent,
        &log,
        port,
        &mode_series("poll"),
        1.0,
        Duration::from_secs(20),
    )
    .await
    {
        panic!("the mode gauge never said poll:\n{m}\n{}", log_text());
    }
    let warnings: Vec<String> = log_text()
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot watch the sentinel with inotify"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warnings.len(), 1, "one WARN line:\n{}", log_text());
    assert!(
        warnings[0].contains(what.errno()) && warnings[0].contains(what.sysctl()),
        "the WARN line names {} and {}: {}",
        what.errno(),
        what.sysctl(),
        warnings[0]
    );
    eprintln!("WARN line: {}", warnings[0]);
    let t = Instant::now();
    while !event_reasons(sim, "n1").iter().any(|r| r == "SentinelPolling") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no SentinelPolling Event: {:?}",
            event_reasons(sim, "n1")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The sentinel is seen within the poll interval.
    std::fs::write(&sentinel, "*** System restart required ***\n").expect("sentinel");
    let polled = match until(&mut agent, &log, port, REQUIRED, 1.0, POLL * 3).await {
        Ok(d) => d,
        Err(m) => panic!("polling never saw the sentinel:\n{m}\n{}", log_text()),
    };
    eprintln!(
        "{what:?}, poll mode (interval {POLL:?}): sentinel -> kreboot_reboot_required 1 after {polled:?}"
    );
    // The poll interval, plus slack for scheduling on a busy machine (a retry period or no
    // detection at all would be far beyond it).
    assert!(
        polled <= POLL + Duration::from_secs(1),
        "seen within the poll interval ({POLL:?}): {polled:?}"
    );
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(sample(&m, &mode_series("poll")), Some(1.0), "still polling:\n{m}");

    // The budget is freed: back on inotify within the retry period.
    hog.release();
    let freed = Instant::now();
    let back = match until(
        &mut agent,
        &log,
        port,
        &mode_series("inotify"),
        1.0,
        RETRY + POLL * 2,
    )
    .await
    {
        Ok(d) => d,
        Err(m) => panic!("never back on inotify:\n{m}\n{}", log_text()),
    };
    eprintln!("{what:?}: budget freed -> back on inotify after {back:?} (retry period {RETRY:?})");
    assert!(
        freed.elapsed() <= RETRY + Duration::from_secs(1),
        "within the retry period"
    );
    assert!(log_text().contains("inotify works again"), "{}", log_text());

    // A second sentinel (after the first is removed) in under a second, more than once.
    let mut worst = Duration::ZERO;
    for round in 0..3 {
        std::fs::remove_file(&sentinel).expect("remove");
        let gone = until(&mut agent, &log, port, REQUIRED, 0.0, POLL * 3)
            .await
            .unwrap_or_else(|m| panic!("removal never seen:\n{m}"));
        std::fs::write(&sentinel, format!("*** System restart required ({round}) ***\n")).expect("sentinel");
        let seen = until(&mut agent, &log, port, REQUIRED, 1.0, POLL * 3)
            .await
            .unwrap_or_else(|m| panic!("second sentinel never seen:\n{m}"));
        eprintln!(
            "{what:?}, inotify mode, round {round}: removal seen after {gone:?}, new sentinel after {seen:?}"
        );
        worst = worst.max(gone).max(seen);
    }
    assert!(
        worst < INOTIFY_BOUND,
        "back on inotify, changes are seen in under {INOTIFY_BOUND:?}: worst {worst:?}"
    );
    let m = scrape(port).await.unwrap_or_default();
    assert_eq!(sample(&m, &mode_series("poll")), Some(0.0), "{m}");
    assert_eq!(
        log_text()
            .lines()
            .filter(|l| l.contains("cannot watch the sentinel with inotify"))
            .count(),
        1,
        "failed retries are not WARN lines:\n{}",
        log_text()
    );

    // Still a well-behaved process: SIGTERM ends it cleanly.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = agent.0.try_wait().expect("try_wait") {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "SIGTERM obeyed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit: {status:?}\n{}", log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_instances_used_up_emfile() {
    let _serial = SERIAL.lock().await;
    agent_falls_back_to_polling_and_returns_to_inotify(Exhaust::Instances).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inotify_watches_used_up_enospc() {
    let _serial = SERIAL.lock().await;
    agent_falls_back_to_polling_and_returns_to_inotify(Exhaust::Watches).await;
}

/// `/proc` accepts inotify watches but never reports an entry appearing or going: the watch
/// notices a change that no event explained and polls from then on.
///
/// CI once failed this when the sentinel was `/proc/<pid>`: every `ps` opens `/proc`, and the
/// watch then took that opening for a possible change, re-read the file and saw the change
/// without polling. The watch now ignores openings and reads (`sentinel::may_change`), and the
/// sentinel is an open file's entry in this test process's `/proc/<pid>/fd`, which hardly
/// anything else touches. Should an event still explain the change, the attempt is repeated:
/// the fall-back must show in one of three attempts.
#[tokio::test]
async fn a_filesystem_without_events_is_polled() {
    let _serial = SERIAL.lock().await;
    let mut seen = Vec::new();
    for attempt in 1..=3 {
        match no_event_attempt().await {
            Ok(()) => return,
            Err(why) => {
                eprintln!("attempt {attempt}: {why}");
                seen.push(why);
            }
        }
    }
    panic!("never fell back to polling: {seen:#?}");
}

/// One watch of an open file's entry in `/proc/<pid>/fd`, which then is closed. `Err` when
/// something other than the audit saw the change (an event; or a watch thread so late that its
/// first look came after the close); panics on what no outside reader can cause.
///
/// The entry is a symlink to a regular file, so it is a reboot request while it exists (a
/// directory, such as a thread's `/proc/<pid>/task/<tid>`, the sentinel of an earlier version
/// of this test, is not: see `sentinel::examine`). A high descriptor number, so that nothing
/// else this process opens meanwhile takes the number again after the close.
async fn no_event_attempt() -> Result<(), String> {
    use std::os::fd::AsRawFd;
    const HIGH_FD: i32 = 777;
    let file = tempfile::tempfile().expect("a temporary file");
    // SAFETY: dup2 onto a number this process does not use (far above what the test opens);
    // the descriptor is closed below, and `file` keeps its own.
    let fd = unsafe { libc::dup2(file.as_raw_fd(), HIGH_FD) };
    assert_eq!(fd, HIGH_FD, "dup2: {}", std::io::Error::last_os_error());
    let path = PathBuf::from(format!("/proc/{}/fd/{HIGH_FD}", std::process::id()));
    let opts = WatchOptions {
        poll_interval: Duration::from_secs(1),
        inotify_retry: Duration::from_secs(1),
    };
    let w = SentinelWatch::start_with(path, opts).expect("watch");
    let mut rx = w.receiver();
    let mode = w.mode();
    assert!(rx.borrow().required, "the open file's entry is a request");
    assert_eq!(mode.borrow().mode, WatchMode::Inotify, "/proc takes the watch");
    // The watch's thread takes a first look when it starts (for a change between the first
    // read and the watch); the entry must go after that look, or the look sees it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: HIGH_FD is the duplicate made above, closed once.
    assert_eq!(unsafe { libc::close(HIGH_FD) }, 0, "close");
    let t = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| !s.required)).await;
    assert!(matches!(r, Ok(Ok(_))), "the change was never noticed");
    eprintln!("no-event filesystem: change noticed after {:?}", t.elapsed());
    let m = mode.borrow().clone();
    if m.mode != WatchMode::Poll {
        return Err(format!(
            "noticed after {:?} through an event, still {m:?}",
            t.elapsed()
        ));
    }
    assert_eq!(m.fallbacks, 1);
    assert!(
        m.last_fallback
            .as_deref()
            .is_some_and(|f| f.contains("no events")),
        "{m:?}"
    );
    // Retrying inotify would not help: it stays on polling.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(mode.borrow().mode, WatchMode::Poll);
    Ok(())
}

/// The flag is documented like every other, with its environment variable; the README lists
/// the Event reason, the metric and the alert.
#[test]
fn flag_event_metric_and_alert_are_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_kreboot"))
        .args(["agent", "--help"])
        .output()
        .expect("kreboot runs");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--sentinel-poll-interval"), "{help}");
    assert!(help.contains("KREBOOT_SENTINEL_POLL_INTERVAL"), "{help}");
    assert!(
        !help.contains("--sentinel-inotify-retry"),
        "the retry period is hidden: {help}"
    );
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    for needle in [
        "`SentinelPolling`",
        "`kreboot_sentinel_watch_mode{node,mode}`",
        "### KrebootSentinelPolling",
        "`--sentinel-poll-interval`",
        "fs.inotify.max_user_instances",
        "fs.inotify.max_user_watches",
    ] {
        assert!(readme.contains(needle), "README lacks {needle}");
    }
    assert_eq!(
        kreboot::events::Reason::SentinelPolling.as_str(),
        "SentinelPolling"
    );
}

/// Start-up review: a metrics address that cannot be bound no longer stops the agent; it works
/// on (here: sees the sentinel and records it on the Node) and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_metrics_port_only_degrades() {
    let _serial = SERIAL.lock().await;
    let host = SimHost::start(SimConfig::default()).await;
    let sim = &host.sim;
    put_policy(sim, BLACKOUT_EVERY_DAY);
    let sentinel = host.path("reboot-required");
    let log = host.agent_log();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let mut agent = Killed::spawn(
        host.agent(&sentinel)
            .args(["--reboot-command", "false"])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .stderr(std::fs::File::create(&log).expect("log file")),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let t = Instant::now();
    while !log_text().contains("kreboot agent started") {
        if let Some(status) = agent.0.try_wait().expect("try_wait") {
            panic!(
                "the agent exited ({status}) for a busy metrics port:\n{}",
                log_text()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "never started:\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        log_text().contains("cannot serve metrics; working on without them"),
        "{}",
        log_text()
    );
    std::fs::write(&sentinel, "").expect("sentinel");
    let t = Instant::now();
    while !event_reasons(sim, "n1").iter().any(|r| r == "RebootRequired") {
        assert!(
            agent.0.try_wait().expect("try_wait").is_none(),
            "the agent exited:\n{}",
            log_text()
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the sentinel was not acted on: {:?}\n{}",
            event_reasons(sim, "n1"),
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(busy);
}
