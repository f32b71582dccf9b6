//! The shipped artifacts the tests run: the static musl release binary (the one the image and
//! the VM carry), built once per tree and checked to be static.

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command to completion within `limit`, killing it on expiry; panics on failure.
pub fn run(cmd: &mut Command, what: &str, limit: Duration) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what}: still running after {limit:?}, killed:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    assert!(status.success(), "{what} failed ({status}):\n{output}");
    output
}

/// True when the ELF file asks for no program interpreter (a static or static-pie binary).
pub fn elf_is_static(path: &Path) -> bool {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "{path:?} is not ELF");
    assert_eq!(bytes[4], 2, "{path:?} is not a 64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    // PT_INTERP = 3: the dynamic loader a dynamically linked program needs.
    !(0..phnum).any(|i| u32::from_le_bytes(bytes[phoff + i * phentsize..][..4].try_into().unwrap()) == 3)
}

/// The static kreboot, built (or found up to date, e.g. after scripts/test built it) in the
/// worktree's own target/.
pub fn static_kreboot() -> PathBuf {
    static_binary("kreboot", "kreboot")
}

/// Binary `bin` of workspace package `package`, built static for x86_64 musl with the release
/// profile.
fn static_binary(package: &str, bin: &str) -> PathBuf {
    let root = manifest_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let started = Instant::now();
    let mut cmd = Command::new(cargo);
    // What `cargo test` sets for the test binary is not what scripts/test's build saw: ring's
    // build script tracks CARGO_MANIFEST_DIR, and its change would rebuild ring and everything
    // above it (minutes, on every run).
    for (k, _) in std::env::vars_os() {
        if k.to_str()
            .is_some_and(|k| k.starts_with("CARGO_") && k != "CARGO_HOME")
        {
            cmd.env_remove(k);
        }
    }
    run(
        cmd.current_dir(&root)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "x86_64-unknown-linux-musl",
                "--package",
                package,
                "--bin",
                bin,
                "--target-dir",
            ])
            .arg(root.join("target")),
        &format!("cargo build (static musl {bin})"),
        Duration::from_secs(30 * 60),
    );
    let path = root.join("target/x86_64-unknown-linux-musl/release").join(bin);
    assert!(
        elf_is_static(&path),
        "{path:?} needs a dynamic loader: not static"
    );
    eprintln!(
        "[artifact] static {bin} {path:?} ({} KiB), built or checked in {:.1?}",
        std::fs::metadata(&path).unwrap().len() / 1024,
        started.elapsed()
    );
    path
}
