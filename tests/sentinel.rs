//! The sentinel watch with real inotify on real files: creation, removal, re-creation, an
//! atomic rename into place, a parent directory that appears later. Each change must reach the
//! receiver promptly (asserted with a generous bound; the benchmark measures the real figure).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use kreboot::sentinel::{SentinelState, SentinelWatch};
use tokio::sync::watch;

const BOUND: Duration = Duration::from_secs(1);

async fn until(
    rx: &mut watch::Receiver<SentinelState>,
    what: &str,
    want: impl Fn(&SentinelState) -> bool,
) -> Duration {
    let t = Instant::now();
    let r = tokio::time::timeout(BOUND, rx.wait_for(|s| want(s))).await;
    assert!(matches!(r, Ok(Ok(_))), "{what}: not seen within {BOUND:?}");
    let took = t.elapsed();
    eprintln!("{what}: {took:?}");
    took
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test]
async fn create_delete_recreate_and_rename() {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("reboot-required");
    let w = SentinelWatch::start(sentinel.clone()).unwrap();
    let mut rx = w.receiver();
    assert!(!rx.borrow().required);

    write(&sentinel, "*** System restart required ***\n");
    until(&mut rx, "created", |s| s.required).await;
    std::fs::remove_file(&sentinel).unwrap();
    until(&mut rx, "removed", |s| !s.required).await;
    write(&sentinel, "again\n");
    until(&mut rx, "re-created", |s| s.required).await;
    std::fs::remove_file(&sentinel).unwrap();
    until(&mut rx, "removed again", |s| !s.required).await;

    // An atomic rename into place, with the package list written first (as apt does).
    write(
        &dir.path().join("reboot-required.pkgs"),
        "linux-image-6.8.0-50-generic\nlibc6\n",
    );
    let tmp = dir.path().join(".reboot-required.tmp");
    write(&tmp, "*** System restart required ***\n");
    std::fs::rename(&tmp, &sentinel).unwrap();
    until(&mut rx, "renamed into place", |s| s.required).await;
    assert_eq!(
        rx.borrow().packages,
        vec!["linux-image-6.8.0-50-generic", "libc6"]
    );
}

#[tokio::test]
async fn missing_parent_directory_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("run/deeper/reboot-required");
    let w = SentinelWatch::start(sentinel.clone()).unwrap();
    let mut rx = w.receiver();
    std::fs::create_dir(dir.path().join("run")).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::create_dir(dir.path().join("run/deeper")).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    write(&sentinel, "x\n");
    until(&mut rx, "created under new directories", |s| s.required).await;
    // The whole directory disappears and comes back (a tmpfs remounted, say).
    std::fs::remove_dir_all(dir.path().join("run")).unwrap();
    until(&mut rx, "directory removed", |s| !s.required).await;
    std::fs::create_dir_all(dir.path().join("run/deeper")).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    write(&sentinel, "x\n");
    until(&mut rx, "created again", |s| s.required).await;
}

#[tokio::test]
async fn a_long_package_list_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("reboot-required");
    let pkgs: String = (0..500).map(|i| format!("package-number-{i}\n")).collect();
    write(&dir.path().join("reboot-required.pkgs"), &pkgs);
    write(&sentinel, "x\n");
    let w = SentinelWatch::start(sentinel).unwrap();
    let s = w.receiver().borrow().clone();
    assert!(s.required);
    assert_eq!(s.packages.len(), kreboot::sentinel::MAX_PACKAGES + 1);
    assert_eq!(s.packages.last().unwrap(), "and 480 more");
}

/// Issue 17: the sentinel path holds something other than a file. What `examine` says for
/// each, on real files: a directory and a dangling symlink are not reboot requests (each with
/// a warning naming what was found), a symlink to a file and a FIFO are.
#[test]
fn what_is_at_the_sentinel_path_decides_and_is_named() {
    use kreboot::sentinel::{Found, examine, read_state};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("reboot-required");
    assert_eq!(examine(&p), Found::Absent);
    assert_eq!(Found::Absent.warning(&p), None);

    std::fs::create_dir(&p).unwrap();
    assert_eq!(examine(&p), Found::Directory);
    assert!(!read_state(&p).required, "a directory is not a reboot request");
    let w = examine(&p).warning(&p).unwrap();
    assert!(w.contains("is a directory, not a file"), "{w}");
    std::fs::remove_dir(&p).unwrap();

    let target = dir.path().join("real-sentinel");
    std::os::unix::fs::symlink(&target, &p).unwrap();
    assert_eq!(examine(&p), Found::DanglingSymlink(target.clone()));
    assert!(!read_state(&p).required, "a dangling symlink is absent");
    let w = examine(&p).warning(&p).unwrap();
    assert!(w.contains("symlink to") && w.contains("real-sentinel"), "{w}");
    write(&target, "x\n");
    assert_eq!(examine(&p), Found::File, "the symlink's target appeared");
    assert!(read_state(&p).required);
    std::fs::remove_file(&p).unwrap();

    // A symlink to a directory is a directory.
    std::fs::create_dir(dir.path().join("d")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("d"), &p).unwrap();
    assert_eq!(examine(&p), Found::Directory);
    std::fs::remove_file(&p).unwrap();

    // A symlink loop cannot be examined: not a request, and said so.
    std::os::unix::fs::symlink(&p, &p).unwrap();
    assert!(matches!(examine(&p), Found::Unreadable(_)), "{:?}", examine(&p));
    assert!(!read_state(&p).required);
    std::fs::remove_file(&p).unwrap();

    // Any other non-directory exists: a request, as in kured.
    let status = std::process::Command::new("mkfifo").arg(&p).status().unwrap();
    assert!(status.success());
    assert_eq!(examine(&p), Found::File);
    assert!(read_state(&p).required);
}

/// The watch follows the same rules: a directory created at the path is not published as a
/// reboot request, the file that replaces it is.
#[tokio::test]
async fn a_directory_at_the_path_is_not_a_request_but_the_file_after_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = dir.path().join("reboot-required");
    let w = SentinelWatch::start(sentinel.clone()).unwrap();
    let mut rx = w.receiver();
    std::fs::create_dir(&sentinel).unwrap();
    // Time for the watch to see it (it reports changes within milliseconds).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rx.borrow().required, "a directory was read as a reboot request");
    std::fs::remove_dir(&sentinel).unwrap();
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &sentinel).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !rx.borrow().required,
        "a dangling symlink was read as a reboot request"
    );
    write(&dir.path().join("nowhere"), "x\n");
    // The target appearing is an event on the same directory.
    until(&mut rx, "the symlink's target appeared", |s| s.required).await;
}
