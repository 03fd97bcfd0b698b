//! `hostpath-csi pool mount|unmount` against real loop devices and
//! directories. Needs root; every loop device and mount is undone by a guard,
//! also when an assertion fails.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hostpath_csi::fstools::{self as xfs, ImageFs, Probe};
use hostpath_csi::mount;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");
/// mkfs.xfs refuses filesystems under 300 MB.
const DEVICE_SIZE: u64 = 320 << 20;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!("skipped: needs root for loop devices and mounts");
            return;
        }
    };
}

/// A loop device over a sparse file; detached on drop.
struct Loop {
    device: PathBuf,
}

impl Loop {
    /// Attaches `file` with `losetup --find --show`.
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The guard exists before any assertion can fail.
        let l = Loop {
            device: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        };
        assert!(
            l.device.to_string_lossy().starts_with("/dev/loop"),
            "{:?}",
            l.device
        );
        l
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Unmounts everything stacked on a path on drop.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = mount::unmount_all(&self.0);
    }
}

/// A temp dir holding a sparse backing file and a target; guards drop in
/// reverse order of declaration, so mounts go before the loop device.
struct Fixture {
    _unmount_target: Unmount,
    _loop: Option<Loop>,
    target: PathBuf,
    device: Option<PathBuf>,
    dir: TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = TempDir::new().unwrap();
        let target = dir.path().join("pool/csi");
        Fixture {
            _unmount_target: Unmount(target.clone()),
            _loop: None,
            target,
            device: None,
            dir,
        }
    }

    /// Adds a loop device; `prepare` writes to its backing file first.
    fn with_device(mut self, prepare: impl FnOnce(&Path)) -> Fixture {
        let file = self.dir.path().join("disk.img");
        let f = fs::File::create(&file).unwrap();
        f.set_len(DEVICE_SIZE).unwrap();
        drop(f);
        prepare(&file);
        let l = Loop::attach(&file);
        self.device = Some(l.device.clone());
        self._loop = Some(l);
        self
    }

    fn device(&self) -> &Path {
        self.device.as_deref().unwrap()
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run hostpath-csi")
}

fn pool_mount(source: &Path, target: &Path) -> Output {
    run(&[
        "pool",
        "mount",
        "--source",
        source.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
    ])
}

fn pool_unmount(target: &Path) -> Output {
    run(&["pool", "unmount", "--target", target.to_str().unwrap()])
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

#[track_caller]
fn refused(o: Output) -> String {
    assert!(
        !o.status.success(),
        "expected a failure\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stderr(&o)
}

fn fs_type_at(target: &Path) -> Option<String> {
    mount::mount_at(target).unwrap().map(|m| m.fs_type)
}

fn blkid_value(device: &Path, key: &str) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", key])
        .arg(device)
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!v.is_empty()).then_some(v)
}

/// Formats `device` and leaves `marker` with `content` on it.
fn filesystem_with_marker(device: &Path, fs_type: &str, content: &str) {
    ImageFs::parse(fs_type)
        .expect("xfs or ext4")
        .make(device)
        .unwrap();
    let scratch = TempDir::new().unwrap();
    let _guard = Unmount(scratch.path().to_owned());
    mount::mount_device(
        device,
        scratch.path(),
        fs_type,
        nix::mount::MsFlags::empty(),
        "",
    )
    .unwrap();
    fs::write(scratch.path().join("marker"), content).unwrap();
    mount::unmount(scratch.path()).unwrap();
}

#[test]
fn blank_device_is_formatted_xfs_mounted_and_unmounted() {
    require_root!();
    let fx = Fixture::new().with_device(|_| {});
    assert_eq!(xfs::probe(fx.device()).unwrap(), Probe::Blank);

    let out = ok(pool_mount(fx.device(), &fx.target));
    assert!(out.contains("mounted xfs, newly formatted"), "{out}");
    assert_eq!(
        xfs::probe(fx.device()).unwrap(),
        Probe::Filesystem("xfs".into())
    );
    assert_eq!(fs_type_at(&fx.target).as_deref(), Some("xfs"));
    fs::write(fx.target.join("data"), "kept").unwrap();

    // Again: nothing changes, the data stays.
    let uuid = blkid_value(fx.device(), "UUID");
    let out = ok(pool_mount(fx.device(), &fx.target));
    assert!(out.contains("already mounted"), "{out}");
    assert_eq!(blkid_value(fx.device(), "UUID"), uuid);
    assert_eq!(fs::read_to_string(fx.target.join("data")).unwrap(), "kept");
    let stacked = mount::mounts()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point == fx.target)
        .count();
    assert_eq!(stacked, 1);

    let out = ok(pool_unmount(&fx.target));
    assert!(out.contains("unmounted"), "{out}");
    assert_eq!(fs_type_at(&fx.target), None);
    let out = ok(pool_unmount(&fx.target));
    assert!(out.contains("not mounted"), "{out}");
}

#[test]
fn existing_xfs_is_mounted_not_reformatted() {
    require_root!();
    let fx = Fixture::new().with_device(|_| {});
    filesystem_with_marker(fx.device(), "xfs", "xfs data");
    let uuid = blkid_value(fx.device(), "UUID").unwrap();

    let out = ok(pool_mount(fx.device(), &fx.target));
    assert!(!out.contains("formatted"), "{out}");
    assert_eq!(fs_type_at(&fx.target).as_deref(), Some("xfs"));
    assert_eq!(
        fs::read_to_string(fx.target.join("marker")).unwrap(),
        "xfs data"
    );
    assert_eq!(blkid_value(fx.device(), "UUID").unwrap(), uuid);
    ok(pool_unmount(&fx.target));
}

#[test]
fn ext4_is_mounted_not_reformatted() {
    require_root!();
    let fx = Fixture::new().with_device(|_| {});
    filesystem_with_marker(fx.device(), "ext4", "ext4 data");
    let uuid = blkid_value(fx.device(), "UUID").unwrap();

    let out = ok(pool_mount(fx.device(), &fx.target));
    assert!(out.contains("mounted ext4"), "{out}");
    assert_eq!(fs_type_at(&fx.target).as_deref(), Some("ext4"));
    assert_eq!(
        fs::read_to_string(fx.target.join("marker")).unwrap(),
        "ext4 data"
    );
    assert_eq!(blkid_value(fx.device(), "UUID").unwrap(), uuid);
    assert!(ok(pool_mount(fx.device(), &fx.target)).contains("already mounted"));
    ok(pool_unmount(&fx.target));
}

/// Writes an MS-DOS partition table with one Linux partition: with sfdisk
/// when it is installed, else by hand (boot signature 0x55AA, one entry).
fn write_partition_table(file: &Path) {
    let sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(file)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Ok(mut child) = sfdisk {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: dos\nstart=2048, type=83\n")
            .unwrap();
        if child.wait().unwrap().success() {
            return;
        }
    }
    let mut sector = [0u8; 512];
    let entry = &mut sector[446..462];
    entry[4] = 0x83; // Linux
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&((DEVICE_SIZE / 512 - 2048) as u32).to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xAA;
    let mut f = fs::OpenOptions::new().write(true).open(file).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&sector).unwrap();
}

#[test]
fn partition_table_is_refused_and_left_alone() {
    require_root!();
    let fx = Fixture::new().with_device(write_partition_table);
    assert_eq!(
        xfs::probe(fx.device()).unwrap(),
        Probe::PartitionTable("dos".into())
    );
    let err = refused(pool_mount(fx.device(), &fx.target));
    assert!(err.contains("partition table"), "{err}");
    assert!(err.contains("refusing"), "{err}");
    assert_eq!(fs_type_at(&fx.target), None);
    assert_eq!(
        xfs::probe(fx.device()).unwrap(),
        Probe::PartitionTable("dos".into())
    );
}

#[test]
fn directory_source_is_bind_mounted() {
    require_root!();
    let fx = Fixture::new();
    let source = fx.dir.path().join("source");
    fs::create_dir(&source).unwrap();
    fs::write(source.join("existing"), "from the PV").unwrap();

    let out = ok(pool_mount(&source, &fx.target));
    assert!(out.contains("bind mounted"), "{out}");
    assert_eq!(
        fs::read_to_string(fx.target.join("existing")).unwrap(),
        "from the PV"
    );
    fs::write(fx.target.join("new"), "x").unwrap();
    assert!(source.join("new").exists());

    assert!(ok(pool_mount(&source, &fx.target)).contains("already mounted"));
    ok(pool_unmount(&fx.target));
    assert!(!fx.target.join("existing").exists());
    assert!(source.join("new").exists());
}

#[test]
fn unmount_is_refused_while_a_volume_is_published() {
    require_root!();
    let fx = Fixture::new().with_device(|_| {});
    ok(pool_mount(fx.device(), &fx.target));
    // What NodePublishVolume leaves behind: a bind mount of a volume dir.
    let volume = fx.target.join("pvc-1");
    fs::create_dir(&volume).unwrap();
    let published = fx.dir.path().join("pod-mount");
    fs::create_dir(&published).unwrap();
    let publish_guard = Unmount(published.clone());
    mount::bind_mount(&volume, &published, nix::mount::MsFlags::empty()).unwrap();

    let err = refused(pool_unmount(&fx.target));
    assert!(err.contains("published volumes"), "{err}");
    assert!(err.contains("pvc-1"), "{err}");
    assert_eq!(fs_type_at(&fx.target).as_deref(), Some("xfs"));

    drop(publish_guard);
    ok(pool_unmount(&fx.target));
    assert_eq!(fs_type_at(&fx.target), None);
}

#[test]
fn unmount_is_refused_while_a_block_volume_is_attached() {
    require_root!();
    let fx = Fixture::new();
    let source = fx.dir.path().join("source");
    fs::create_dir(&source).unwrap();
    ok(pool_mount(&source, &fx.target));
    let image = fx.target.join("pvc-block");
    fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let attached = Loop::attach(&image);

    let err = refused(pool_unmount(&fx.target));
    assert!(err.contains(attached.device.to_str().unwrap()), "{err}");
    drop(attached);
    // A detach the kernel deferred (a udev probe holding the device) is
    // waited for by `pool unmount` itself.
    ok(pool_unmount(&fx.target));
}

#[test]
fn host_root_prefixes_the_target() {
    require_root!();
    let fx = Fixture::new();
    let host = fx.dir.path().join("host");
    let on_host = host.join("var/pool/csi");
    let _guard = Unmount(on_host.clone());
    let source = fx.dir.path().join("source");
    fs::create_dir(&source).unwrap();

    let args = |verb: &'static str| -> Vec<String> {
        let mut v = vec![
            "pool".to_owned(),
            verb.to_owned(),
            "--target".into(),
            "/var/pool/csi".into(),
            "--host-root".into(),
            host.to_str().unwrap().into(),
        ];
        if verb == "mount" {
            v.extend(["--source".into(), source.to_str().unwrap().into()]);
        }
        v
    };
    let out = ok(Command::new(BIN).args(args("mount")).output().unwrap());
    assert!(out.contains("bind mounted"), "{out}");
    assert!(mount::mount_at(&on_host).unwrap().is_some());
    ok(Command::new(BIN).args(args("unmount")).output().unwrap());
    assert!(mount::mount_at(&on_host).unwrap().is_none());
}

#[test]
fn wrong_sources_are_refused() {
    require_root!();
    let fx = Fixture::new();
    let err = refused(pool_mount(&fx.dir.path().join("missing"), &fx.target));
    assert!(err.contains("does not exist"), "{err}");
    let file = fx.dir.path().join("file");
    fs::write(&file, "x").unwrap();
    let err = refused(pool_mount(&file, &fx.target));
    assert!(
        err.contains("neither a block device nor a directory"),
        "{err}"
    );
    let err = refused(pool_mount(fx.dir.path(), &fx.target));
    assert!(err.contains("contains the target"), "{err}");
    let err = refused(pool_mount(&file, Path::new("relative/csi")));
    assert!(err.contains("absolute"), "{err}");
    assert_eq!(fs_type_at(&fx.target), None);
}

#[test]
fn a_different_mount_on_the_target_is_not_stacked_over() {
    require_root!();
    let fx = Fixture::new();
    let (a, b) = (fx.dir.path().join("a"), fx.dir.path().join("b"));
    fs::create_dir(&a).unwrap();
    fs::create_dir(&b).unwrap();
    ok(pool_mount(&a, &fx.target));
    let err = refused(pool_mount(&b, &fx.target));
    assert!(err.contains("refusing to stack"), "{err}");
    ok(pool_unmount(&fx.target));
}

/// Kills and reaps a child process on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn watch_mode_remounts_and_stops_on_sigterm() {
    require_root!();
    let fx = Fixture::new().with_device(|_| {});
    let mut child = Reap(
        Command::new(BIN)
            .args(["pool", "mount", "--watch", "--interval-secs", "1"])
            .arg("--source")
            .arg(fx.device())
            .arg("--target")
            .arg(&fx.target)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the first mount", || fs_type_at(&fx.target).is_some());
    mount::unmount(&fx.target).unwrap();
    wait_for("the remount", || fs_type_at(&fx.target).is_some());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Stopping the watcher leaves the pool mounted for the driver.
    assert_eq!(fs_type_at(&fx.target).as_deref(), Some("xfs"));
    ok(pool_unmount(&fx.target));
}
