//! Test harness: the real `hostpath-csi serve` binary on a temp Unix socket,
//! with temp pools, a tonic client, and guards that undo mounts and loop
//! devices even when a test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostpath_csi::client::Clients;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use hostpath_csi::proto::*;
use tempfile::TempDir;

pub const GIB: i64 = 1 << 30;
pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "test-node";

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

pub fn mount_cap_fs(fs_type: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn rwo() -> VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

pub fn create_req(name: &str, required: i64, cap: VolumeCapability) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Unmounts everything below `root` (deepest first) and detaches loop
/// devices whose backing file is below it.
pub fn cleanup_kernel_state(root: &Path) {
    for _ in 0..4 {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = hostpath_csi::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(root))
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for dev in hostpath_csi::block::list_attached() {
        if dev.backing_file.starts_with(root) {
            let _ = Command::new("losetup").arg("-d").arg(&dev.path).status();
        }
    }
}

/// Loop devices whose backing file lies below `root`.
pub fn loops_under(root: &Path) -> Vec<PathBuf> {
    hostpath_csi::block::list_attached()
        .into_iter()
        .filter(|d| d.backing_file.starts_with(root))
        .map(|d| d.backing_file)
        .collect()
}

/// Mount points below `root`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    hostpath_csi::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(root))
        .collect()
}

/// A real XFS (reflink), btrfs or ext4 filesystem on a loop-mounted sparse file.
pub struct LoopFs {
    pub dir: TempDir,
    pub mount_point: PathBuf,
    device: PathBuf,
}

impl LoopFs {
    pub fn new(fs_type: &str, size_mib: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("hpc-fs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("fs.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(size_mib << 20).unwrap();
        drop(f);
        let ok = match fs_type {
            "xfs" => Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&image)
                .status(),
            "btrfs" => Command::new("mkfs.btrfs")
                .args(["-q", "-f"])
                .arg(&image)
                .status(),
            _ => Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&image)
                .status(),
        }
        .expect("run mkfs")
        .success();
        assert!(ok, "mkfs.{fs_type} failed");
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup failed");
        let device = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).unwrap();
        let fs = LoopFs {
            dir,
            mount_point: mount_point.clone(),
            device: device.clone(),
        };
        let ok = Command::new("mount")
            .arg("-t")
            .arg(fs_type)
            .arg(&device)
            .arg(&mount_point)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount failed");
        fs
    }

    /// A btrfs subvolume of this filesystem: its files report their own
    /// device number, unlike the filesystem's root.
    pub fn subvolume(&self, name: &str) -> PathBuf {
        let path = self.mount_point.join(name);
        let ok = Command::new("btrfs")
            .args(["-q", "subvolume", "create"])
            .arg(&path)
            .status()
            .expect("run btrfs")
            .success();
        assert!(ok, "btrfs subvolume create failed");
        path
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        cleanup_kernel_state(&self.mount_point);
        let _ = nix::mount::umount2(&self.mount_point, nix::mount::MntFlags::MNT_DETACH);
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// The driver under test, running as a child process.
pub struct Driver {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub pools_json: String,
    pub pool_paths: Vec<PathBuf>,
    child: Option<Child>,
    pub c: Clients,
}

impl Driver {
    /// Starts the driver with one pool per entry (`None` = a dir under the temp dir).
    pub async fn start_with(pools: &[(&str, Option<PathBuf>)]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("hpc-test-")
            .tempdir()
            .unwrap();
        let mut entries = Vec::new();
        let mut pool_paths = Vec::new();
        for (name, path) in pools {
            let p = path
                .clone()
                .unwrap_or_else(|| dir.path().join(format!("pool-{name}")));
            entries.push(serde_json::json!({"name": name, "path": p}));
            pool_paths.push(p);
        }
        let pools_json = serde_json::Value::Array(entries).to_string();
        let socket = dir.path().join("csi.sock");
        let child = spawn(&socket, &pools_json, dir.path());
        let c = wait_connect(&socket).await;
        Driver {
            dir,
            socket,
            pools_json,
            pool_paths,
            child: Some(child),
            c,
        }
    }

    /// Starts the driver with a raw `--datadir` JSON (e.g. with `snapshotPath`).
    pub async fn start_with_datadir(pools_json: &str) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("hpc-test-")
            .tempdir()
            .unwrap();
        let parsed: serde_json::Value = serde_json::from_str(pools_json).unwrap();
        let pool_paths = parsed
            .as_array()
            .unwrap()
            .iter()
            .map(|p| PathBuf::from(p["path"].as_str().unwrap()))
            .collect();
        let socket = dir.path().join("csi.sock");
        let child = spawn(&socket, pools_json, dir.path());
        let c = wait_connect(&socket).await;
        Driver {
            dir,
            socket,
            pools_json: pools_json.to_owned(),
            pool_paths,
            child: Some(child),
            c,
        }
    }

    pub async fn start() -> Driver {
        Driver::start_with(&[("local", None)]).await
    }

    pub fn pool(&self) -> &Path {
        &self.pool_paths[0]
    }

    /// A path for publish targets inside the test's temp dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// kill -9, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the driver again with the same pools.
    pub async fn restart(&mut self) {
        self.kill9();
        self.child = Some(spawn(&self.socket, &self.pools_json, self.dir.path()));
        self.c = wait_connect(&self.socket).await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("driver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill9();
        cleanup_kernel_state(self.dir.path());
        for p in &self.pool_paths {
            cleanup_kernel_state(p);
        }
    }
}

fn spawn(socket: &Path, pools_json: &str, dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("driver.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--nodeid")
        .arg(NODE)
        .arg("--datadir")
        .arg(pools_json)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start hostpath-csi serve")
}

async fn wait_connect(socket: &Path) -> Clients {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket());
        if ready {
            if let Ok(c) = Clients::connect(&format!("unix://{}", socket.display())).await {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "driver did not start listening on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The gRPC code of a result.
pub fn code<T>(r: &Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Every path below `root`, to prove nothing was created outside a pool.
pub fn tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&d) {
            for e in entries.flatten() {
                let p = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(p.clone());
                }
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A path as the string a CSI request carries.
/// A staging path to go with a publish target. Directory and Block volumes
/// need no staged mount, but the driver has STAGE_UNSTAGE_VOLUME, so a CO
/// always names one.
pub fn staging_for(target: &Path) -> String {
    format!("{}.staging", target.display())
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn unpublish_req(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
    }
}

pub fn unstage_req(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
    }
}

pub fn delete_req(id: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    }
}

pub fn stats_req(id: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: s(path),
        ..Default::default()
    }
}
