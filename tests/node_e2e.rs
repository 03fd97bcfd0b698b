//! Node e2e: the rendered DaemonSet's driver container, run with podman from
//! the image `hack/image.sh` built, on a fake node (a temp dir for its root,
//! the real /dev), driven the way kubelet and the CSI sidecars drive it.
//! The host's view is what is checked: the published mounts and devices
//! must reach it through the rendered mount propagation.
//!
//!   bash hack/image.sh && cargo test --test node_e2e -- --ignored --test-threads 2
//!
//! Needs root, podman and runc (hack/test.sh installs them).

mod e2e;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use e2e::kubelet::{Kind, Pod, Pv};
use e2e::{mounted, snapshot_source, volume_source, Cluster, Steps, MIB};
use hostpath_csi::proto::volume_capability::AccessType;

/// Bytes that differ at every offset and between seeds.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Writes a file and fsyncs it: a snapshot of a mounted image volume is
/// crash-consistent, so only data on disk is in it.
fn write_synced(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap();
    std::io::Write::write_all(&mut f, data).unwrap();
    f.sync_all().unwrap();
}

fn size_of(path: &Path) -> u64 {
    File::open(path).unwrap().seek(SeekFrom::End(0)).unwrap()
}

/// Size of the filesystem mounted at `path`, from the host.
fn fs_size(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).unwrap();
    st.blocks() * st.fragment_size()
}

/// The host sees a bind mount of a block device at `target`.
fn assert_host_sees_device(target: &Path) {
    assert!(
        mounted(target).is_some(),
        "{} is not mounted on the host",
        target.display()
    );
    let st = std::fs::metadata(target).unwrap();
    assert!(
        st.file_type().is_block_device(),
        "{} is not a block device",
        target.display()
    );
}

// ----------------------------------------------------------------- flows

/// A directory volume: the pool directory, bind-mounted into the pod.
async fn directory(k: &mut Cluster, steps: &Steps) {
    let class = k.class(false);
    let mut pv = k.create(Kind::Filesystem, &class, 64 * MIB, None).await;
    let dir = k.volume_file(&pv);
    assert!(
        dir.is_dir(),
        "{} is not a directory on the host",
        dir.display()
    );
    steps.step("directory: CreateVolume with the rendered class made the pool directory");
    let pod = k.pod();
    k.stage(&pv).await;
    let target = k.publish(&pv, &pod).await;
    assert!(
        mounted(&target).is_some(),
        "host does not see {}",
        target.display()
    );
    std::fs::write(target.join("hello"), b"from the host").unwrap();
    assert_eq!(std::fs::read(dir.join("hello")).unwrap(), b"from the host");
    steps.step("directory: staged, published; the host sees the mount; host write reads back from the pool dir");
    k.stats(&pv, &pod).await;
    k.expand(&mut pv, &pod, 128 * MIB).await;
    steps.step("directory: stats healthy; expanded to 128 MiB");
    let snap = k.snapshot(&pv).await;
    let restored = k
        .create(
            Kind::Filesystem,
            &class,
            128 * MIB,
            Some(snapshot_source(&snap)),
        )
        .await;
    let clone = k
        .create(
            Kind::Filesystem,
            &class,
            128 * MIB,
            Some(volume_source(&pv.handle)),
        )
        .await;
    for v in [&restored, &clone] {
        assert_eq!(
            std::fs::read(k.volume_file(v).join("hello")).unwrap(),
            b"from the host"
        );
    }
    steps.step("directory: snapshot, restore and clone hold the file");
    k.unpublish(&pv, &pod).await;
    k.unstage(&pv).await;
    for v in [&restored, &clone, &pv] {
        k.delete(v).await;
    }
    k.delete_snapshot(&snap).await;
    steps.step("directory: unpublished, unstaged, deleted");
}

/// A Block volume: a pool file on a loop device, bind-mounted as a device node.
async fn block(k: &mut Cluster, steps: &Steps) {
    let class = k.class(false);
    let mut pv = k.create(Kind::Block, &class, 64 * MIB, None).await;
    let file = k.volume_file(&pv);
    assert_eq!(size_of(&file), 64 << 20);
    let pod = k.pod();
    k.stage(&pv).await;
    let target = k.publish(&pv, &pod).await;
    assert_host_sees_device(&target);
    assert_eq!(
        k.node.attached_loops().len(),
        1,
        "one loop device on the volume"
    );
    let data = pattern(7, 1 << 20);
    write_at(&target, 3 << 20, &data);
    assert_eq!(read_at(&file, 3 << 20, data.len()), data);
    steps.step("block: created, staged, published; the host sees the device; host write reads back from the pool file");
    k.stats(&pv, &pod).await;
    k.expand(&mut pv, &pod, 96 * MIB).await;
    assert_eq!(size_of(&target), 96 << 20, "the host sees the grown device");
    steps.step("block: stats healthy; expanded to 96 MiB, seen by the host");
    let snap = k.snapshot(&pv).await;
    let clone = k
        .create(
            Kind::Block,
            &class,
            96 * MIB,
            Some(volume_source(&pv.handle)),
        )
        .await;
    let restored = k
        .create(Kind::Block, &class, 96 * MIB, Some(snapshot_source(&snap)))
        .await;
    for v in [&clone, &restored] {
        assert_eq!(read_at(&k.volume_file(v), 3 << 20, data.len()), data);
    }
    steps.step("block: snapshot, restore and clone hold the data");
    k.unpublish(&pv, &pod).await;
    k.unstage(&pv).await;
    assert_eq!(
        k.node.settled_loops().await,
        Vec::<u32>::new(),
        "loop device detached"
    );
    for v in [&clone, &restored, &pv] {
        k.delete(v).await;
    }
    k.delete_snapshot(&snap).await;
    steps.step("block: unpublished (loop device detached), unstaged, deleted");
}

/// Stages and publishes an image volume; returns the host's target.
async fn stage_and_publish_image(k: &Cluster, pv: &Pv, pod: &Pod) -> std::path::PathBuf {
    k.stage(pv).await;
    let staging = k.node.host(&k.kubelet.staging(pv));
    let m = mounted(&staging).unwrap_or_else(|| panic!("host does not see {}", staging.display()));
    let fs_type = match &pv.capability.access_type {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => m.fs_type.as_str(),
        _ => "xfs",
    };
    assert_eq!(m.fs_type, fs_type);
    let target = k.publish(pv, pod).await;
    assert!(
        mounted(&target).is_some(),
        "host does not see {}",
        target.display()
    );
    target
}

/// A `layout: image` volume: an XFS image made by the image's mkfs.xfs,
/// loop-mounted at staging, grown by its xfs_growfs.
async fn image(k: &mut Cluster, steps: &Steps) {
    let class = k.class(true);
    let mut pv = k.create(Kind::Filesystem, &class, 320 * MIB, None).await;
    let pod = k.pod();
    let target = stage_and_publish_image(k, &pv, &pod).await;
    assert_eq!(
        read_at(&k.volume_file(&pv), 0, 4),
        b"XFSB",
        "the pool file holds XFS"
    );
    write_synced(&target.join("hello"), b"image data");
    let staging = k.node.host(&k.kubelet.staging(&pv));
    assert_eq!(std::fs::read(staging.join("hello")).unwrap(), b"image data");
    steps.step("image: created, staged (mkfs.xfs in the image), published; host sees both mounts; data reads back");
    k.stats(&pv, &pod).await;
    let before = fs_size(&target);
    k.expand(&mut pv, &pod, 512 * MIB).await;
    assert!(
        fs_size(&target) > before + (150 << 20),
        "the host sees the grown filesystem"
    );
    steps.step("image: stats healthy; expanded to 512 MiB (xfs_growfs in the image)");
    let snap = k.snapshot(&pv).await;
    let clone = k
        .create(
            Kind::Filesystem,
            &class,
            512 * MIB,
            Some(snapshot_source(&snap)),
        )
        .await;
    let pod2 = k.pod();
    let clone_target = stage_and_publish_image(k, &clone, &pod2).await;
    assert_eq!(
        std::fs::read(clone_target.join("hello")).unwrap(),
        b"image data"
    );
    k.unpublish(&clone, &pod2).await;
    k.unstage(&clone).await;
    k.delete(&clone).await;
    steps.step("image: snapshot restored, staged and published: data there; torn down");
    k.unpublish(&pv, &pod).await;
    k.unstage(&pv).await;
    assert_eq!(
        k.node.settled_loops().await,
        Vec::<u32>::new(),
        "loop device detached"
    );
    k.delete(&pv).await;
    k.delete_snapshot(&snap).await;
    steps.step("image: unpublished, unstaged (loop device detached), deleted");
}

/// An ext4 `layout: image` volume (a class with `csi.storage.k8s.io/fstype:
/// ext4`): mkfs.ext4 from the image.
async fn image_ext4(k: &mut Cluster, steps: &Steps) {
    let mut class = k.class(true);
    class.insert("csi.storage.k8s.io/fstype".into(), "ext4".into());
    let pv = k.create(Kind::Filesystem, &class, 64 * MIB, None).await;
    let pod = k.pod();
    let target = stage_and_publish_image(k, &pv, &pod).await;
    write_synced(&target.join("hello"), b"ext4 data");
    let staging = k.node.host(&k.kubelet.staging(&pv));
    assert_eq!(std::fs::read(staging.join("hello")).unwrap(), b"ext4 data");
    k.stats(&pv, &pod).await;
    k.unpublish(&pv, &pod).await;
    k.unstage(&pv).await;
    assert_eq!(
        k.node.settled_loops().await,
        Vec::<u32>::new(),
        "loop device detached"
    );
    k.delete(&pv).await;
    steps.step("image ext4: created, staged (mkfs.ext4 in the image), published, written, read back, torn down");
}

/// The full flows of a directory, a Block and an XFS image volume.
async fn directory_block_image(k: &mut Cluster, steps: &Steps) {
    directory(k, steps).await;
    block(k, steps).await;
    image(k, steps).await;
}

async fn finish(k: Cluster, steps: &Steps) {
    k.finish().await;
    steps.step("driver stopped: no containers, mounts, loop devices or volumes left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image from hack/image.sh, podman and root: run with --ignored"]
async fn rendered_daemonset_serves_kubelet() {
    let steps = Steps::new("lifecycle");
    let mut k = Cluster::start("life").await;
    steps.step("driver container from the render is up");
    directory_block_image(&mut k, &steps).await;
    image_ext4(&mut k, &steps).await;
    finish(k, &steps).await;
}

/// Path A: kubevirt's operator keeps its DaemonSet and only the image is
/// swapped. Its container gets the Go driver's arguments (no subcommand,
/// `--v`, a relative `PV_DIR`, `--metrics-tls-version`), the pool at
/// `/local-data-dir`, the kubelet dir as two mounts, and no `/dev`: loop
/// devices attached after the start exist only in the host's /dev, so the
/// driver makes their nodes in its own. The same flows must work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image from hack/image.sh, podman and root: run with --ignored"]
async fn operator_daemonset_serves_kubelet() {
    let steps = Steps::new("operator");
    let mut k = Cluster::start_as_operator("op").await;
    assert!(
        !k.spec
            .mounts
            .iter()
            .any(|m| m.container.starts_with("/dev")),
        "the operator mounts no /dev"
    );
    steps.step("driver container as the operator's DaemonSet runs it is up");
    directory_block_image(&mut k, &steps).await;
    finish(k, &steps).await;
}

/// A DaemonSet rolling update while volumes are published: the old
/// container gets SIGTERM, the host keeps using the volumes while no driver
/// runs, and the new container reports them healthy and tears them down
/// (detaching the loop devices the old one attached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image from hack/image.sh, podman and root: run with --ignored"]
async fn restart_in_place_keeps_published_volumes() {
    let steps = Steps::new("restart");
    let mut k = Cluster::start("rst").await;
    let (plain, image_class) = (k.class(false), k.class(true));
    let vols = [
        k.create(Kind::Filesystem, &plain, 64 * MIB, None).await,
        k.create(Kind::Block, &plain, 64 * MIB, None).await,
        k.create(Kind::Filesystem, &image_class, 320 * MIB, None)
            .await,
    ];
    let pods = [k.pod(), k.pod(), k.pod()];
    let mut targets = Vec::new();
    for (pv, pod) in vols.iter().zip(&pods) {
        k.stage(pv).await;
        targets.push(k.publish(pv, pod).await);
    }
    let data = pattern(3, 1 << 20);
    std::fs::write(targets[0].join("before"), b"dir").unwrap();
    write_at(&targets[1], 0, &data);
    std::fs::write(targets[2].join("before"), b"image").unwrap();
    assert_eq!(
        k.node.attached_loops().len(),
        2,
        "block and image volumes on loop devices"
    );
    steps.step("directory, block and image volumes published and written from the host");

    k.restart(|k| {
        // No driver runs now: the volumes must not notice.
        for t in &targets {
            assert!(
                mounted(t).is_some(),
                "{} went away with the driver",
                t.display()
            );
        }
        assert_eq!(std::fs::read(targets[0].join("before")).unwrap(), b"dir");
        std::fs::write(targets[0].join("during"), b"dir").unwrap();
        assert_eq!(read_at(&targets[1], 0, data.len()), data);
        write_at(&targets[1], 2 << 20, &data);
        assert_eq!(std::fs::read(targets[2].join("before")).unwrap(), b"image");
        std::fs::write(targets[2].join("during"), b"image").unwrap();
        assert_eq!(k.node.attached_loops().len(), 2);
    })
    .await;
    steps.step("SIGTERM: socket removed; the host used all three volumes while no driver ran; new container ready");

    for (pv, pod) in vols.iter().zip(&pods) {
        k.stats(pv, pod).await;
    }
    assert_eq!(read_at(&k.volume_file(&vols[1]), 2 << 20, data.len()), data);
    steps.step("NodeGetVolumeStats from the new container: all three healthy");

    for (pv, pod) in vols.iter().zip(&pods) {
        k.unpublish(pv, pod).await;
        k.unstage(pv).await;
        let file = k.volume_file(pv);
        assert_eq!(
            k.node.settled_loops_on(&file).await,
            Vec::<u32>::new(),
            "{} still on a loop device",
            pv.name
        );
        k.delete(pv).await;
    }
    steps.step("unpublish, unstage (loop devices detached) and delete through the new container");
    finish(k, &steps).await;
}
