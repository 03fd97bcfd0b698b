//! Test harness: the real `hostpath-csi serve` binary on a temp Unix socket,
//! with temp pools, a tonic client, and guards that undo mounts and loop
//! devices even when a test fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostpath_csi::client::{capability, Clients};
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use tempfile::TempDir;

pub const GIB: i64 = 1 << 30;
pub const MIB: i64 = 1 << 20;
pub const NODE: &str = "test-node";

// Capabilities, all through the library's one builder.

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    capability(mode, false, "", &[])
}

/// A single-writer Filesystem capability asking for `fs_type` ("" = the volume's own).
pub fn mount_cap_fs(fs_type: &str) -> VolumeCapability {
    capability(Mode::SingleNodeWriter, false, fs_type, &[])
}

/// A single-writer Filesystem capability with mount flags.
pub fn mount_cap_flags(flags: &[&str]) -> VolumeCapability {
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    capability(Mode::SingleNodeWriter, false, "", &flags)
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    capability(mode, true, "", &[])
}

/// Single-node writer, Filesystem.
pub fn rwo() -> VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

/// Single-node writer, Block.
pub fn block_rwo() -> VolumeCapability {
    block_cap(Mode::SingleNodeWriter)
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
    detach_loops_under(root);
}

/// Detaches every loop device whose backing file lies below `root`.
pub fn detach_loops_under(root: &Path) {
    for dev in hostpath_csi::block::list_attached() {
        if dev.backing_file.starts_with(root) {
            let _ = Command::new("losetup").arg("-d").arg(&dev.path).status();
        }
    }
}

/// Unmounts `path` for real (not lazily), retrying while it is busy for a
/// moment (a process closing a file on it).
pub fn unmount_patiently(path: &Path) -> nix::Result<()> {
    let mut last = Ok(());
    for _ in 0..100 {
        last = nix::mount::umount(path);
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
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
            // ext4 without extents: a filesystem that cannot fallocate.
            "ext4-noextent" => Command::new("mkfs.ext4")
                .args(["-q", "-F", "-O", "^extent,^64bit"])
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
            .arg(fs_type.split('-').next().unwrap())
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

impl LoopFs {
    /// A power cut as XFS sees it: `xfs_io -x -c shutdown` (no log flush),
    /// so whatever was not yet on disk is lost.
    pub fn shutdown(&self) {
        let ok = Command::new("xfs_io")
            .args(["-x", "-c", "shutdown"])
            .arg(&self.mount_point)
            .status()
            .expect("run xfs_io")
            .success();
        assert!(ok, "xfs_io shutdown {} failed", self.mount_point.display());
    }

    /// The same cut as `shutdown`, by the ioctl `xfs_io` issues
    /// (XFS_IOC_GOINGDOWN, no log flush): no process start, so a thread
    /// can cut at a precise moment.
    pub fn cut(mount_point: &Path) {
        nix::ioctl_read!(xfs_goingdown, b'X', 125, u32);
        let dir = std::fs::File::open(mount_point).unwrap();
        // XFS_FSOP_GOING_FLAGS_NOLOGFLUSH
        let mut flags: u32 = 2;
        // SAFETY: the ioctl reads one u32 from a valid pointer.
        unsafe { xfs_goingdown(std::os::fd::AsRawFd::as_raw_fd(&dir), &mut flags) }
            .unwrap_or_else(|e| panic!("XFS_IOC_GOINGDOWN {}: {e}", mount_point.display()));
    }

    /// Unmounts and mounts the filesystem again (log recovery after a
    /// shutdown). Nothing may hold it open.
    pub fn remount(&self) {
        // What is mounted below it and loop devices on its files go first;
        // the filesystem itself must really be unmounted (not detached
        // lazily) for log recovery to run on the next mount.
        let mut below: Vec<PathBuf> = mounts_under(&self.mount_point)
            .into_iter()
            .filter(|p| p != &self.mount_point)
            .collect();
        below.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in below {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
        detach_loops_under(&self.mount_point);
        let last = unmount_patiently(&self.mount_point);
        assert!(
            last.is_ok(),
            "cannot unmount {}: {last:?}",
            self.mount_point.display()
        );
        let ok = Command::new("mount")
            .arg(&self.device)
            .arg(&self.mount_point)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount {} again failed", self.device.display());
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
    /// Flags passed to `serve` beside the harness's own.
    pub extra_args: Vec<String>,
    child: Option<Child>,
    pub c: Clients,
}

impl Driver {
    /// Starts the driver with one pool per entry (`None` = a dir under the temp dir).
    pub async fn start_with(pools: &[(&str, Option<PathBuf>)]) -> Driver {
        Driver::start_args(pools, &[]).await
    }

    /// Like `start_with`, with extra `serve` flags (e.g. `--metrics-addr`).
    pub async fn start_args(pools: &[(&str, Option<PathBuf>)], extra: &[&str]) -> Driver {
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
        Driver::launch(dir, pools_json, pool_paths, extra).await
    }

    async fn launch(
        dir: TempDir,
        pools_json: String,
        pool_paths: Vec<PathBuf>,
        extra: &[&str],
    ) -> Driver {
        let socket = dir.path().join("csi.sock");
        let extra_args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut child = Reaper::new(spawn(&socket, &pools_json, dir.path(), &extra_args));
        let c = wait_connect(&socket, child.get(), dir.path()).await;
        Driver {
            dir,
            socket,
            pools_json,
            pool_paths,
            extra_args,
            child: child.take(),
            c,
        }
    }

    /// Starts the driver with a raw `--datadir` JSON (e.g. with `snapshotPath`).
    pub async fn start_with_datadir(pools_json: &str) -> Driver {
        Driver::start_with_datadir_args(pools_json, &[]).await
    }

    /// Like `start_with_datadir`, with extra `serve` flags.
    pub async fn start_with_datadir_args(pools_json: &str, extra: &[&str]) -> Driver {
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
        Driver::launch(dir, pools_json.to_owned(), pool_paths, extra).await
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
        let child = spawn(
            &self.socket,
            &self.pools_json,
            self.dir.path(),
            &self.extra_args,
        );
        // Kept in `self` first, so a start that fails is still reaped on drop.
        let child = self.child.insert(child);
        self.c = wait_connect(&self.socket, child, self.dir.path()).await;
    }

    /// The driver's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("driver is running").id()
    }

    /// True while the driver process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Panics with the driver's log unless the same process still runs.
    #[track_caller]
    pub fn assert_alive(&mut self, pid: u32, context: &str) {
        let running = self.is_running();
        assert!(
            running && self.pid() == pid,
            "{context}: the driver (pid {pid}) died; its log:\n{}",
            tail(&self.log(), 40)
        );
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
        // Trees deeper than any stack (and chattr'd files) defeat the
        // TempDir's own removal.
        remove_tree(self.dir.path());
    }
}

/// Kills and reaps a child process on drop, unless taken back.
pub struct Reaper(Option<Child>);

impl Reaper {
    pub fn new(child: Child) -> Reaper {
        Reaper(Some(child))
    }

    pub fn get(&mut self) -> &mut Child {
        self.0.as_mut().expect("child was taken")
    }

    pub fn take(&mut self) -> Option<Child> {
        self.0.take()
    }

    /// Waits up to `bound` for the child to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(status)) = self.get().try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `serve` command the harness runs, for tests that start more instances.
pub fn serve_command(socket: &Path, pools_json: &str, extra: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"));
    cmd.arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--nodeid")
        .arg(NODE)
        .arg("--datadir")
        .arg(pools_json)
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

fn spawn(socket: &Path, pools_json: &str, dir: &Path, extra: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("driver.log"))
        .unwrap();
    serve_command(socket, pools_json, extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start hostpath-csi serve")
}

/// The last `n` lines of a log.
pub fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

async fn wait_connect(socket: &Path, child: &mut Child, dir: &Path) -> Clients {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("driver.log")).unwrap_or_default();
            panic!(
                "the driver exited ({status}) before listening on {}; its log:\n{}",
                socket.display(),
                tail(&log, 40)
            );
        }
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
pub fn code<T>(r: &Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    }
}

/// Asserts a result's gRPC code, naming the case and showing the result.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    r: &Result<T, tonic::Status>,
    want: tonic::Code,
    what: &str,
) {
    assert_eq!(code(r), want, "{what}: {r:?}");
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

/// A staging path to go with a publish target. Directory and Block volumes
/// need no staged mount, but the driver has STAGE_UNSTAGE_VOLUME, so a CO
/// always names one.
pub fn staging_for(target: &Path) -> PathBuf {
    PathBuf::from(format!("{}.staging", target.display()))
}

/// A path as the string a CSI request carries.
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

// ------------------------------------------------------------ more requests

/// A publish with the staging path the harness pairs with `target`.
pub fn publish_req(id: &str, target: &Path, cap: VolumeCapability) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
        staging_target_path: s(&staging_for(target)),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// A publish that names no staging path (as a CO without STAGE_UNSTAGE would).
pub fn unstaged_publish_req(
    id: &str,
    target: &Path,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        staging_target_path: String::new(),
        ..publish_req(id, target, cap)
    }
}

pub fn stage_req(id: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: s(staging),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// Kubelet's publish of a CSI inline ephemeral volume: no stage, the pod's
/// volume attributes plus the ephemeral marker.
pub fn ephemeral_publish_req(
    id: &str,
    target: &Path,
    attributes: &[(&str, &str)],
) -> NodePublishVolumeRequest {
    let mut context = params(attributes);
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: s(target),
        volume_capability: Some(rwo()),
        volume_context: context,
        ..Default::default()
    }
}

/// Every volume ID in one unpaged listing.
pub async fn listed_ids(c: &mut Clients) -> Vec<String> {
    c.controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect()
}

/// Probe with a deadline: liveness, not speed (the bound is generous).
pub async fn probe_within(c: &mut Clients, bound: Duration) -> Result<(), String> {
    let mut req = tonic::Request::new(ProbeRequest {});
    req.set_timeout(bound);
    match tokio::time::timeout(bound, c.identity.probe(req)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(format!("Probe failed: {s:?}")),
        Err(_) => Err(format!("Probe did not answer within {bound:?}")),
    }
}

// ------------------------------------------------------------ polling

/// How long "eventually" may take before a test gives up.
pub const EVENTUALLY: Duration = Duration::from_secs(60);

/// Polls `ok` until it holds; panics with `what` (and `detail()`) after `bound`.
pub async fn eventually(
    what: &str,
    bound: Duration,
    mut ok: impl FnMut() -> bool,
    detail: impl Fn() -> String,
) {
    let deadline = Instant::now() + bound;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "not within {bound:?}: {what}\n{}",
            detail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------ pool state

/// Entries of `<pool>/.hostpath-csi/tmp` (empty when it does not exist).
pub fn tmp_entries(pool: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(pool.join(".hostpath-csi/tmp")) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Bytes in use on the filesystem holding `path` (statvfs).
pub fn used_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    (st.blocks() - st.blocks_free()) * st.fragment_size()
}

/// Whether `path` is a mount point (in this process's mount namespace).
pub fn is_mount_point(path: &Path) -> bool {
    mount_count(path) > 0
}

/// How many mounts are stacked exactly at `path`.
pub fn mount_count(path: &Path) -> usize {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    hostpath_csi::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| m.mount_point == path)
        .count()
}

// ------------------------------------------------------------ metrics

/// A free TCP port on loopback for `--metrics-addr`.
pub fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The body of `GET /metrics` (HTTP/1.0), or `None` when nothing answers.
pub fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text.split_once("\r\n\r\n")?.1.to_owned())
}

/// The value of a series, given its name and exactly these labels in any order.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let mut have: Vec<&str> = rest.split(',').filter(|p| !p.is_empty()).collect();
        let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        have.sort();
        want.sort();
        (have == want).then(|| value.parse().ok())?
    })
}

// ------------------------------------------------------------ trees

/// A chain of `depth` directories named `d` below `root`, with a file
/// `leaf` at the bottom, built by descriptor (deeper than PATH_MAX).
pub fn make_deep(root: &Path, depth: usize) {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode as Perm;
    use std::os::fd::{AsFd, OwnedFd};
    let mut fd: OwnedFd = nix::fcntl::open(
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .unwrap();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(fd.as_fd(), "d", Perm::from_bits_truncate(0o755)).unwrap();
        fd = nix::fcntl::openat(
            fd.as_fd(),
            "d",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Perm::empty(),
        )
        .unwrap();
    }
    let f = nix::fcntl::openat(
        fd.as_fd(),
        "leaf",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Perm::from_bits_truncate(0o644),
    )
    .unwrap();
    nix::unistd::write(&f, b"bottom").unwrap();
}

/// Depth of a chain made by `make_deep`; checks its leaf.
pub fn depth_of(root: &Path) -> usize {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode as Perm;
    use std::os::fd::{AsFd, OwnedFd};
    let mut fd: OwnedFd = nix::fcntl::open(
        root,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .unwrap();
    let mut depth = 0;
    while let Ok(next) = nix::fcntl::openat(
        fd.as_fd(),
        "d",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Perm::empty(),
    ) {
        fd = next;
        depth += 1;
    }
    let leaf = nix::fcntl::openat(
        fd.as_fd(),
        "leaf",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let n = nix::unistd::read(&leaf, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"bottom");
    depth
}

/// Removes a tree of any depth (by descriptor, iteratively), clearing
/// `chattr` flags first: test clean-up that a deep chain cannot defeat.
pub fn remove_tree(root: &Path) {
    let _ = Command::new("chattr")
        .args(["-R", "-f", "-i", "-a"])
        .arg(root)
        .stderr(Stdio::null())
        .status();
    // `rm` walks by descriptor and has no depth limit.
    let _ = Command::new("rm")
        .args(["-rf", "--one-file-system"])
        .arg(root)
        .stderr(Stdio::null())
        .status();
}

/// Creates `n` empty files named `f<i>` in `dir`.
pub fn make_files(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        std::fs::File::create(dir.join(format!("f{i}"))).unwrap();
    }
}

/// Number of entries directly in `dir` (0 when it is gone).
pub fn count_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|e| e.count()).unwrap_or(0)
}

// ------------------------------------------------------------ guards

/// A bind mount undone (lazily) on drop, wherever it was moved meanwhile.
pub struct MountGuard(pub PathBuf);

impl MountGuard {
    pub fn bind(source: &Path, target: &Path) -> MountGuard {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", source.display(), target.display()));
        MountGuard(target.to_path_buf())
    }

    /// A tmpfs of `bytes` at `target`.
    pub fn tmpfs(target: &Path, bytes: u64) -> MountGuard {
        std::fs::create_dir_all(target).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={bytes}").as_str()),
        )
        .unwrap();
        MountGuard(target.to_path_buf())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        cleanup_kernel_state(&self.0);
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Freezes a filesystem (`xfs_io -x -c freeze`) and always thaws it on drop.
pub struct FreezeGuard(PathBuf);

impl FreezeGuard {
    pub fn freeze(mount_point: &Path) -> FreezeGuard {
        let guard = FreezeGuard(mount_point.to_path_buf());
        let ok = Command::new("xfs_io")
            .args(["-x", "-c", "freeze"])
            .arg(mount_point)
            .status()
            .expect("run xfs_io")
            .success();
        assert!(ok, "xfs_io freeze {} failed", mount_point.display());
        guard
    }

    /// Freezes nothing, but thaws on drop whatever the driver may have
    /// frozen there.
    pub fn thaw_on_drop(mount_point: &Path) -> FreezeGuard {
        FreezeGuard(mount_point.to_path_buf())
    }

    pub fn thaw(&self) {
        let _ = Command::new("xfs_io")
            .args(["-x", "-c", "thaw"])
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Clears `chattr +i/+a` below a path on drop, so clean-up can remove it.
pub struct ClearFlags(pub PathBuf);

impl Drop for ClearFlags {
    fn drop(&mut self) {
        let _ = Command::new("chattr")
            .args(["-R", "-f", "-i", "-a"])
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
    }
}

/// `chattr <flags> path`, e.g. "+i".
pub fn chattr(path: &Path, flags: &str) {
    let ok = Command::new("chattr")
        .arg(flags)
        .arg(path)
        .status()
        .expect("run chattr")
        .success();
    assert!(ok, "chattr {flags} {} failed", path.display());
}

/// Stops a helper thread (e.g. a swapper) on drop, even when a test fails.
pub struct StopOnDrop {
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub thread: Option<std::thread::JoinHandle<u64>>,
}

impl StopOnDrop {
    /// Runs `step` in a loop on a thread until stopped; counts the steps.
    pub fn spawn(mut step: impl FnMut() + Send + 'static) -> StopOnDrop {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                step();
                n += 1;
            }
            n
        });
        StopOnDrop {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the thread and returns how many steps it made.
    pub fn finish(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Stages (creating the staging directory, as kubelet does) and
/// publishes; both must succeed.
pub async fn stage_publish(c: &mut Clients, id: &str, target: &Path, cap: VolumeCapability) {
    let staging = staging_for(target);
    std::fs::create_dir_all(&staging).unwrap();
    let r = c
        .node
        .node_stage_volume(stage_req(id, &staging, cap.clone()));
    r.await
        .unwrap_or_else(|s| panic!("NodeStageVolume {id} at {}: {s:?}", staging.display()));
    publish_ok(c, id, target, cap).await;
}

/// NodePublishVolume (with the paired staging path) that must succeed.
pub async fn publish_ok(c: &mut Clients, id: &str, target: &Path, cap: VolumeCapability) {
    let r = c.node.node_publish_volume(publish_req(id, target, cap));
    r.await
        .unwrap_or_else(|s| panic!("NodePublishVolume {id} at {}: {s:?}", target.display()));
}

/// NodeUnpublishVolume that must succeed.
pub async fn unpublish_ok(c: &mut Clients, id: &str, target: &Path) {
    let r = c.node.node_unpublish_volume(unpublish_req(id, target));
    r.await
        .unwrap_or_else(|s| panic!("NodeUnpublishVolume {id} at {}: {s:?}", target.display()));
}

/// Stages and publishes `id` as a single-writer Filesystem volume at
/// `pods/<id>`; returns (staging, target).
pub async fn mount_rwo(d: &mut Driver, id: &str) -> (PathBuf, PathBuf) {
    let target = d.path(&format!("pods/{id}"));
    stage_publish(&mut d.c, id, &target, rwo()).await;
    (staging_for(&target), target)
}

/// Unpublishes and unstages what `stage_publish` did; both must succeed.
pub async fn unpublish_unstage(c: &mut Clients, id: &str, target: &Path) {
    unpublish_ok(c, id, target).await;
    let staging = staging_for(target);
    let r = c.node.node_unstage_volume(unstage_req(id, &staging));
    r.await
        .unwrap_or_else(|s| panic!("NodeUnstageVolume {id} at {}: {s:?}", staging.display()));
}

/// Runs an RPC future with a bound: a hang is a failure, not a stuck test.
pub async fn bounded<T>(what: &str, bound: Duration, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(bound, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {bound:?} (hung)"),
    }
}

// ------------------------------------------------------------ volumes and snapshots

/// A Filesystem (directory) volume request.
pub fn dir_volume(name: &str, size: i64) -> CreateVolumeRequest {
    create_req(name, size, rwo())
}

/// A Block volume request.
pub fn block_volume(name: &str, size: i64) -> CreateVolumeRequest {
    create_req(name, size, block_cap(Mode::SingleNodeWriter))
}

/// A `layout: image` Filesystem volume request, its filesystem asked by
/// the capability's `fs_type` ("" = the driver's default, XFS).
pub fn image_volume(name: &str, size: i64, fs_type: &str) -> CreateVolumeRequest {
    with_params(
        create_req(name, size, mount_cap_fs(fs_type)),
        &[("layout", "image")],
    )
}

/// Adds StorageClass parameters to a create request.
pub fn with_params(mut r: CreateVolumeRequest, pairs: &[(&str, &str)]) -> CreateVolumeRequest {
    r.parameters.extend(params(pairs));
    r
}

/// A create request that clones volume `source`.
pub fn clone_of(mut r: CreateVolumeRequest, source: &str) -> CreateVolumeRequest {
    use hostpath_csi::proto::volume_content_source::{Type, VolumeSource};
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: source.into(),
        })),
    });
    r
}

/// A create request that restores snapshot `snapshot`.
pub fn restore_of(mut r: CreateVolumeRequest, snapshot: &str) -> CreateVolumeRequest {
    use hostpath_csi::proto::volume_content_source::{SnapshotSource, Type};
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot.into(),
        })),
    });
    r
}

pub fn snapshot_req(name: &str, source: &str) -> CreateSnapshotRequest {
    CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: source.into(),
        ..Default::default()
    }
}

pub fn delete_snapshot_req(id: &str) -> DeleteSnapshotRequest {
    DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    }
}

/// A capacity range of at least `size` bytes, no limit.
pub fn at_least(size: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes: size,
        limit_bytes: 0,
    })
}

/// CreateVolumeGroupSnapshot of these volumes.
pub fn group_req(name: &str, ids: &[&str]) -> CreateVolumeGroupSnapshotRequest {
    CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: ids.iter().map(|i| i.to_string()).collect(),
        ..Default::default()
    }
}

/// GetVolumeGroupSnapshot, naming its members if `members` is not empty.
pub fn get_group_req(id: &str, members: Vec<String>) -> GetVolumeGroupSnapshotRequest {
    GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    }
}

/// DeleteVolumeGroupSnapshot, naming its members if `members` is not empty.
pub fn delete_group_req(id: &str, members: Vec<String>) -> DeleteVolumeGroupSnapshotRequest {
    DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: members,
        ..Default::default()
    }
}

/// ControllerExpandVolume to `size` bytes, with the capability if given.
pub fn grow_req(
    id: &str,
    size: i64,
    cap: Option<VolumeCapability>,
) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: at_least(size),
        volume_capability: cap,
        ..Default::default()
    }
}

/// NodeExpandVolume at `path` to `size` bytes.
pub fn node_grow_req(id: &str, path: &Path, size: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: s(path),
        capacity_range: at_least(size),
        ..Default::default()
    }
}

/// ControllerModifyVolume with these mutable parameters.
pub fn modify_req(id: &str, pairs: &[(&str, &str)]) -> ControllerModifyVolumeRequest {
    ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params(pairs),
        ..Default::default()
    }
}

/// ListSnapshots filtered by snapshot and source ("" = any), paged.
pub fn list_snapshots_req(id: &str, source: &str, max: i32, token: &str) -> ListSnapshotsRequest {
    ListSnapshotsRequest {
        snapshot_id: id.into(),
        source_volume_id: source.into(),
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    }
}

/// CreateVolume that must succeed.
pub async fn create_ok(c: &mut Clients, r: CreateVolumeRequest) -> Volume {
    let name = r.name.clone();
    match c.controller.create_volume(r).await {
        Ok(v) => v.into_inner().volume.expect("a volume in the response"),
        Err(s) => panic!("CreateVolume {name}: {s:?}"),
    }
}

/// DeleteVolume that must succeed.
pub async fn delete_ok(c: &mut Clients, id: &str) {
    if let Err(s) = c.controller.delete_volume(delete_req(id)).await {
        panic!("DeleteVolume {id}: {s:?}");
    }
}

/// CreateSnapshot that must succeed.
pub async fn snapshot_ok(c: &mut Clients, name: &str, source: &str) -> Snapshot {
    match c
        .controller
        .create_snapshot(snapshot_req(name, source))
        .await
    {
        Ok(r) => r.into_inner().snapshot.expect("a snapshot in the response"),
        Err(s) => panic!("CreateSnapshot {name} of {source}: {s:?}"),
    }
}

/// CreateVolumeGroupSnapshot that must succeed.
pub async fn group_ok(c: &mut Clients, name: &str, ids: &[&str]) -> VolumeGroupSnapshot {
    match c
        .group
        .create_volume_group_snapshot(group_req(name, ids))
        .await
    {
        Ok(r) => r.into_inner().group_snapshot.expect("a group snapshot"),
        Err(s) => panic!("CreateVolumeGroupSnapshot {name} of {ids:?}: {s:?}"),
    }
}

/// Bytes allocated to a file (its blocks, not its length).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

/// The capacity ControllerGetVolume reports.
pub async fn reported_capacity(c: &mut Clients, id: &str) -> i64 {
    c.controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("ControllerGetVolume {id}: {s:?}"))
        .into_inner()
        .volume
        .expect("a volume in the response")
        .capacity_bytes
}

/// Every snapshot ID in one unpaged listing.
pub async fn listed_snapshot_ids(c: &mut Clients) -> Vec<String> {
    c.controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.snapshot.unwrap().snapshot_id)
        .collect()
}

/// Polls until a deleted volume's directory or file and everything in the
/// pool's temp area are gone (removal may finish after DeleteVolume).
pub async fn eventually_removed(d: &Driver, id: &str) {
    let (path, pool) = (d.pool().join(id), d.pool().to_path_buf());
    eventually(
        &format!("volume {id} and the pool's temp area are emptied"),
        EVENTUALLY,
        || std::fs::symlink_metadata(&path).is_err() && tmp_entries(&pool).is_empty(),
        || {
            format!(
                "{} exists: {}; temp area holds {:?}\ndriver log:\n{}",
                path.display(),
                std::fs::symlink_metadata(&path).is_ok(),
                tmp_entries(&pool),
                tail(&d.log(), 20)
            )
        },
    )
    .await;
}

// ------------------------------------------------------------ file contents

/// Writes `len` bytes derived from `seed` and the offset (no two 8-byte
/// words of a file, or of two seeds, alike) and fsyncs.
pub fn write_pattern(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; 1 << 20];
    let salt = seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut written = 0;
    while written < len {
        let n = (len - written).min(buf.len() as u64) as usize;
        for (k, word) in buf[..n].chunks_mut(8).enumerate() {
            let v = (salt ^ (written + 8 * k as u64)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            word.copy_from_slice(&v.to_le_bytes()[..word.len()]);
        }
        f.write_all(&buf[..n]).unwrap();
        written += n as u64;
    }
    f.sync_all().unwrap();
}

/// A digest of a file's bytes (FNV-1a over 8-byte words), and its length:
/// equal content, equal digest.
pub fn file_digest(path: &Path) -> (u64, u64) {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let (mut h, mut len) = (0xcbf2_9ce4_8422_2325u64, 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // Fill the buffer fully, so words never straddle two reads.
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]).unwrap() {
                0 => break,
                k => n += k,
            }
        }
        for chunk in buf[..n].chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word)).wrapping_mul(0x100_0000_01b3);
        }
        len += n as u64;
        if n < buf.len() {
            return (h, len);
        }
    }
}

/// Regular files below `root` (links are not followed) whose bytes hold `marker`.
pub fn files_holding(root: &Path, marker: &[u8]) -> Vec<PathBuf> {
    tree(root)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .filter(|p| {
            std::fs::read(p).is_ok_and(|data| data.windows(marker.len()).any(|w| w == marker))
        })
        .collect()
}

/// Every path below `root` with its type and (for files) content digest:
/// two equal snapshots mean nothing was changed.
pub fn fingerprint(root: &Path) -> Vec<(PathBuf, String)> {
    tree(root)
        .into_iter()
        .map(|p| {
            let what = match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => format!("file {:?}", file_digest(&p)),
                Ok(m) if m.is_dir() => "dir".to_owned(),
                Ok(m) if m.file_type().is_symlink() => {
                    format!("link {:?}", std::fs::read_link(&p).ok())
                }
                Ok(_) => "other".to_owned(),
                Err(e) => format!("gone: {e}"),
            };
            (p, what)
        })
        .collect()
}
