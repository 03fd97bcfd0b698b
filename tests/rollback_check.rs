//! `hostpath-csi rollback-check`: pools filled by the real driver (a
//! directory volume, a Block volume, a snapshot), plus what the driver makes
//! that needs mkfs on 300 MB (an image volume's metadata, written here in
//! the driver's format) and snapshots in both layouts. The check must name
//! exactly what the Go driver could not serve, exit 1 for it, 0 for a pool
//! of directories, and change nothing on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");

struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(socket: &Path, args: &[&str]) {
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the real driver on `pool`, makes volumes and a snapshot, stops it.
fn fill_with_the_driver(dir: &Path, pool: &Path) {
    let socket = dir.join("csi.sock");
    let mut driver = Reap(
        Command::new(BIN)
            .args(["serve", "--nodeid", "rb-node", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--datadir")
            .arg(format!(
                r#"[{{"name":"local","path":"{}"}}]"#,
                pool.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(driver.0.try_wait().unwrap().is_none(), "driver exited");
        assert!(Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    ctl(&socket, &["create-volume", "pvc-dir", "--size", "1Mi"]);
    ctl(
        &socket,
        &["create-volume", "pvc-block", "--size", "1Mi", "--block"],
    );
    ctl(&socket, &["create-snapshot", "snap-ours", "pvc-dir"]);
    driver.0.kill().unwrap();
    driver.0.wait().unwrap();
}

/// Every path under `root` with its size and modification time.
fn state(root: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.insert(p.clone(), (m.size(), m.mtime(), m.mtime_nsec()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn check(datadir: &str, json: bool) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["rollback-check", "--datadir", datadir]);
    if json {
        cmd.arg("--json");
    }
    cmd.output().unwrap()
}

#[test]
fn what_the_go_driver_cannot_serve_is_listed_and_fails_the_check() {
    let dir = TempDir::new().unwrap();
    let pool = dir.path().join("pool");
    fill_with_the_driver(dir.path(), &pool);
    // An image volume as the driver records it (mkfs needs 300 MB, so the
    // record is written here): metadata plus the backing file.
    std::fs::write(
        pool.join(".hostpath-csi/volumes/pvc-image.json"),
        r#"{"id":"pvc-image","pool":"local","capacity_bytes":1048576,"mode":"filesystem","layout":"image","fs_type":"xfs","block_size":512,"preallocated":false,"created_unix":1}"#,
    )
    .unwrap();
    std::fs::write(pool.join("pvc-image"), b"").unwrap();
    // A file nobody described: a Block volume made some other way.
    std::fs::write(pool.join("stray-disk.img"), b"x").unwrap();
    // The Go driver's snapshotPath with one snapshot of its own layout and
    // one of this driver's.
    let snaps = dir.path().join("snapshots");
    std::fs::create_dir_all(snaps.join("snap-go/data")).unwrap();
    std::fs::create_dir_all(snaps.join("snap-go/pvc-dir")).unwrap();
    std::fs::create_dir_all(snaps.join("snap-in-go-path/data")).unwrap();
    std::fs::write(snaps.join("snap-in-go-path/meta.json"), b"{}").unwrap();
    let datadir = format!(
        r#"[{{"name":"local","path":"{}","snapshotPath":"{}"}}]"#,
        pool.display(),
        snaps.display()
    );

    let before = state(dir.path());
    let out = check(&datadir, false);
    let after = state(dir.path());
    assert_eq!(before, after, "rollback-check changed the pools");

    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let breaks: Vec<&str> = text.lines().filter(|l| l.starts_with("BREAKS")).collect();
    let named = |id: &str| breaks.iter().any(|l| l.contains(&format!(" {id}: ")));
    for id in [
        "pvc-block",
        "pvc-image",
        "stray-disk.img",
        "snap-ours",
        "snap-in-go-path",
    ] {
        assert!(named(id), "{id} not reported:\n{text}");
    }
    assert_eq!(breaks.len(), 5, "{text}");
    assert!(!named("pvc-dir"), "{text}");
    assert!(!named("snap-go"), "{text}");
    assert!(text.contains("private area"), "{text}");
    assert!(
        text.contains("5 volume(s) or snapshot(s) would break"),
        "{text}"
    );

    let json = check(&datadir, true);
    assert_eq!(json.status.code(), Some(1));
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&json.stdout).unwrap();
    let block = findings
        .iter()
        .find(|f| f["object"] == "pvc-block")
        .unwrap();
    assert_eq!(block["severity"], "breaks");
    assert_eq!(block["pool"], "local");
}

#[test]
fn a_pool_of_directories_passes_with_a_notice() {
    let dir = TempDir::new().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(pool.join("pvc-a")).unwrap();
    std::fs::create_dir_all(pool.join(".hostpath-csi/volumes")).unwrap();
    std::fs::write(
        pool.join(".hostpath-csi/volumes/pvc-a.json"),
        r#"{"id":"pvc-a","pool":"p","capacity_bytes":1,"mode":"filesystem","layout":"directory"}"#,
    )
    .unwrap();
    let missing = dir.path().join("not-mounted");
    let out = check(
        &format!(
            r#"[{{"name":"p","path":"{}"}},{{"name":"q","path":"{}"}}]"#,
            pool.display(),
            missing.display()
        ),
        false,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("nothing would break"), "{text}");
    assert!(text.contains("notice  pool p"), "{text}");
    assert!(text.contains("notice  pool q"), "{text}");
    assert!(!missing.exists(), "the check created a pool directory");
}
