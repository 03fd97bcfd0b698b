//! Scrapes `serve --metrics-addr` while the driver works, and checks that
//! the series exist with the right values. The tmpfs pool needs root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");
const TMPFS_BYTES: u64 = 64 << 20;

/// Kills and reaps the driver on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Unmounts on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = hostpath_csi::mount::unmount_all(&self.0);
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One HTTP/1.0 GET; returns (status line, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    ))
}

fn ctl(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

/// The value of the series whose name and labels are exactly `series`.
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[track_caller]
fn expect(body: &str, series: &str, want: f64) {
    assert_eq!(value(body, series), Some(want), "{series} in:\n{body}");
}

#[test]
fn the_endpoint_serves_pool_volume_and_rpc_series() {
    let root = nix::unistd::geteuid().is_root();
    let dir = TempDir::new().unwrap();
    let os_pool = dir.path().join("os");
    std::fs::create_dir(&os_pool).unwrap();
    let mut pools = vec![format!(r#"{{"name":"os","path":"{}"}}"#, os_pool.display())];
    let tmpfs_pool = dir.path().join("tmpfs");
    let _unmount = Unmount(tmpfs_pool.clone());
    if root {
        // A pool on its own filesystem of a known size.
        std::fs::create_dir(&tmpfs_pool).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &tmpfs_pool,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={TMPFS_BYTES}").as_str()),
        )
        .unwrap();
        pools.push(format!(
            r#"{{"name":"tmpfs","path":"{}"}}"#,
            tmpfs_pool.display()
        ));
        // Volumes on their own filesystem, snapshots on the OS's: shared.
        pools.push(format!(
            r#"{{"name":"tmpfs-snap","path":"{}","snapshotPath":"{}"}}"#,
            tmpfs_pool.join("with-snapshots").display(),
            dir.path().join("snapshots").display()
        ));
    } else {
        eprintln!("not root: skipping the tmpfs pool");
    }

    let socket = dir.path().join("csi.sock");
    let addr = free_port();
    let log = std::fs::File::create(dir.path().join("driver.log")).unwrap();
    let _driver = Reap(
        Command::new(BIN)
            .args(["serve", "--nodeid", "metrics-node", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--datadir")
            .arg(format!("[{}]", pools.join(",")))
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        match get(addr, "/metrics") {
            Ok((status, body)) if socket.exists() => {
                assert!(status.contains("200"), "{status}");
                break body;
            }
            _ if Instant::now() > deadline => panic!(
                "no metrics endpoint; driver log:\n{}",
                std::fs::read_to_string(dir.path().join("driver.log")).unwrap_or_default()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    // Upstream's meaning: 1 when the pool is on the filesystem of the CSI
    // socket's directory (a kubelet dir on the node's OS disk); the socket
    // is in `dir` here, beside the "os" pool.
    expect(
        &body,
        r#"kubevirt_hpp_pool_path_shared_with_os{pool="os"}"#,
        1.0,
    );
    expect(
        &body,
        r#"hostpath_csi_volumes{pool="os",mode="filesystem"}"#,
        0.0,
    );

    let created = ctl(&socket, &["create-volume", "fs-1", "--size", "1Mi"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let pool_param = if root {
        "storagePool=tmpfs"
    } else {
        "storagePool=os"
    };
    let block = ctl(
        &socket,
        &[
            "create-volume",
            "block-1",
            "--size",
            "1Mi",
            "--block",
            "--param",
            pool_param,
        ],
    );
    assert!(
        block.status.success(),
        "{}",
        String::from_utf8_lossy(&block.stderr)
    );
    let bad = ctl(&socket, &["create-volume", "..", "--size", "1Mi"]);
    assert!(!bad.status.success());

    let (_, body) = get(addr, "/metrics").unwrap();
    expect(
        &body,
        r#"hostpath_csi_volumes{pool="os",mode="filesystem"}"#,
        1.0,
    );
    let block_pool = if root { "tmpfs" } else { "os" };
    expect(
        &body,
        &format!(r#"hostpath_csi_volumes{{pool="{block_pool}",mode="block"}}"#),
        1.0,
    );
    expect(
        &body,
        r#"hostpath_csi_rpc_duration_seconds_count{method="CreateVolume",code="Ok"}"#,
        2.0,
    );
    expect(
        &body,
        r#"hostpath_csi_rpc_duration_seconds_count{method="CreateVolume",code="InvalidArgument"}"#,
        1.0,
    );
    let bucket = value(
        &body,
        r#"hostpath_csi_rpc_duration_seconds_bucket{le="+Inf",method="CreateVolume",code="Ok"}"#,
    )
    .or_else(|| {
        value(
            &body,
            r#"hostpath_csi_rpc_duration_seconds_bucket{method="CreateVolume",code="Ok",le="+Inf"}"#,
        )
    });
    assert_eq!(bucket, Some(2.0), "{body}");

    let os_capacity = value(&body, r#"hostpath_csi_pool_capacity_bytes{pool="os"}"#).unwrap();
    let os_available = value(&body, r#"hostpath_csi_pool_available_bytes{pool="os"}"#).unwrap();
    assert!(os_capacity > 0.0 && os_available <= os_capacity, "{body}");
    if root {
        expect(
            &body,
            r#"kubevirt_hpp_pool_path_shared_with_os{pool="tmpfs"}"#,
            0.0,
        );
        expect(
            &body,
            r#"kubevirt_hpp_pool_path_shared_with_os{pool="tmpfs-snap"}"#,
            1.0,
        );
        expect(
            &body,
            r#"hostpath_csi_pool_capacity_bytes{pool="tmpfs"}"#,
            TMPFS_BYTES as f64,
        );
        let available = value(&body, r#"hostpath_csi_pool_available_bytes{pool="tmpfs"}"#).unwrap();
        // The 1 MiB block volume is sparse, so little of the tmpfs is used.
        assert!(
            available > (TMPFS_BYTES as f64) * 0.9 && available <= TMPFS_BYTES as f64,
            "{available}"
        );
    }

    let (status, _) = get(addr, "/other").unwrap();
    assert!(status.contains("404"), "{status}");
}

#[test]
fn metrics_are_off_unless_asked_for() {
    let out = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--metrics-addr"), "{help}");
    assert!(help.contains("off by default"), "{help}");
}
