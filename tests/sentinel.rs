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
