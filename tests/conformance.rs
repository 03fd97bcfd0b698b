//! CSI spec MUSTs for every advertised RPC, against the real server over a
//! real Unix socket (the same checks csi-sanity makes, and more).

mod common;

use common::*;
use hostpath_csi::proto::controller_service_capability::rpc::Type as CtrlCap;
use hostpath_csi::proto::node_service_capability::rpc::Type as NodeCap;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::*;
use std::path::{Path, PathBuf};
use tonic::Code;

const SIZE: i64 = 10 * GIB;

fn exact(name: &str, size: i64) -> CreateVolumeRequest {
    let mut r = create_req(name, size, rwo());
    r.capacity_range = Some(CapacityRange {
        required_bytes: size,
        limit_bytes: size,
    });
    r
}

/// The node requests csi-sanity sends: the volume's context, a staging
/// directory `csi-staging` and a target `csi-mount/target` whose parent exists.
fn sanity_node_requests(
    d: &Driver,
    v: &Volume,
    cap: VolumeCapability,
) -> (NodeStageVolumeRequest, NodePublishVolumeRequest) {
    let (mount_dir, staging) = (d.path("csi-mount"), d.path("csi-staging"));
    std::fs::create_dir(&mount_dir).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let stage = NodeStageVolumeRequest {
        volume_context: v.volume_context.clone(),
        ..stage_req(&v.volume_id, &staging, cap.clone())
    };
    let publish = NodePublishVolumeRequest {
        staging_target_path: s(&staging),
        volume_context: v.volume_context.clone(),
        ..publish_req(&v.volume_id, &mount_dir.join("target"), cap)
    };
    (stage, publish)
}

/// Stages `stages` times, then publishes `publishes` times (both
/// idempotent); returns (staging, target).
async fn stage_publish_repeatedly(
    d: &mut Driver,
    (stage, publish): &(NodeStageVolumeRequest, NodePublishVolumeRequest),
    stages: usize,
    publishes: usize,
) -> (PathBuf, PathBuf) {
    for _ in 0..stages {
        d.c.node.node_stage_volume(stage.clone()).await.unwrap();
    }
    for _ in 0..publishes {
        d.c.node.node_publish_volume(publish.clone()).await.unwrap();
    }
    (
        PathBuf::from(&stage.staging_target_path),
        PathBuf::from(&publish.target_path),
    )
}

#[tokio::test]
async fn identity_reports_name_capabilities_and_readiness() {
    let mut d = Driver::start().await;
    let info =
        d.c.identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(info.name, "kubevirt.io.hostpath-provisioner");
    assert!(!info.vendor_version.is_empty());
    let caps =
        d.c.identity
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(caps.capabilities.len() >= 2);
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    // A pool that disappears must not fail the liveness probe: Probe stays
    // ready, and the pool itself refuses work until it is back.
    std::fs::rename(d.pool(), d.path("moved-pool")).unwrap();
    let probe =
        d.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(probe.ready, Some(true));
    let r =
        d.c.controller
            .create_volume(dir_volume("pvc-late", GIB))
            .await;
    assert_code(&r, Code::Unavailable, "a create in a pool that is gone");
}

#[tokio::test]
async fn capabilities_are_known_values_and_consistent() {
    let mut d = Driver::start().await;
    let ctrl =
        d.c.controller
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    let types: Vec<i32> = ctrl
        .capabilities
        .iter()
        .map(|c| match &c.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => 0,
        })
        .collect();
    assert!(types
        .iter()
        .all(|t| *t != 0 && CtrlCap::try_from(*t).is_ok()));
    for needed in [
        CtrlCap::CreateDeleteVolume,
        CtrlCap::ListVolumes,
        CtrlCap::GetCapacity,
    ] {
        assert!(types.contains(&(needed as i32)), "{needed:?}");
    }
    // Not advertised, so not implemented.
    let r =
        d.c.controller
            .controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await;
    assert!(!types.contains(&(CtrlCap::PublishUnpublishVolume as i32)));
    assert_eq!(code(&r), Code::Unimplemented);
    let node =
        d.c.node
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(node.capabilities.iter().all(|c| match &c.r#type {
        Some(node_service_capability::Type::Rpc(r)) =>
            r.r#type != 0 && NodeCap::try_from(r.r#type).is_ok(),
        None => false,
    }));
    let info =
        d.c.node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(info.node_id, NODE);
    assert_eq!(
        info.accessible_topology
            .unwrap()
            .segments
            .get("topology.hostpath.csi/node")
            .map(String::as_str),
        Some(NODE)
    );
}

#[tokio::test]
async fn create_volume_validates_required_fields() {
    let mut d = Driver::start().await;
    let no_type = VolumeCapability {
        access_type: None,
        ..rwo()
    };
    let no_mode = VolumeCapability {
        access_mode: None,
        ..rwo()
    };
    let no_caps = CreateVolumeRequest {
        name: "no-caps".into(),
        ..Default::default()
    };
    for (what, req, want) in [
        (
            "empty request",
            CreateVolumeRequest::default(),
            Code::InvalidArgument,
        ),
        ("no capabilities", no_caps, Code::InvalidArgument),
        (
            "no access type",
            create_req("bad-cap", GIB, no_type),
            Code::InvalidArgument,
        ),
        (
            "no access mode",
            create_req("bad-mode", GIB, no_mode),
            Code::InvalidArgument,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
    assert!(tree(d.pool())
        .iter()
        .all(|p| p.to_string_lossy().contains(".hostpath-csi")));
}

#[tokio::test]
async fn create_volume_returns_requested_capacity_and_context() {
    let mut d = Driver::start().await;
    let v = create_ok(&mut d.c, exact("pvc-exact", SIZE)).await;
    assert_eq!(v.volume_id, "pvc-exact");
    assert_eq!(v.capacity_bytes, SIZE);
    assert_eq!(
        v.volume_context.get("storagePool").map(String::as_str),
        Some("local")
    );
    assert_eq!(v.accessible_topology.len(), 1);
    assert_eq!(
        v.accessible_topology[0]
            .segments
            .get("topology.hostpath.csi/node")
            .map(String::as_str),
        Some(NODE)
    );
    assert!(d.pool().join("pvc-exact").is_dir());
    // Rounded up to 4 KiB.
    let v = create_ok(&mut d.c, dir_volume("pvc-odd", 1000)).await;
    assert_eq!(v.capacity_bytes, 4096);
    // No range: capacity unknown (0) for a directory.
    let no_range = CreateVolumeRequest {
        capacity_range: None,
        ..dir_volume("pvc-norange", 0)
    };
    assert_eq!(create_ok(&mut d.c, no_range).await.capacity_bytes, 0);
}

#[tokio::test]
async fn create_volume_is_idempotent_and_detects_conflicts() {
    let mut d = Driver::start().await;
    let a = create_ok(&mut d.c, dir_volume("pvc-same", SIZE)).await;
    let b = create_ok(&mut d.c, dir_volume("pvc-same", SIZE)).await;
    assert_eq!(a, b);
    let long = "a".repeat(128);
    let v = create_ok(&mut d.c, dir_volume(&long, SIZE)).await;
    assert_eq!(v.volume_id, long);
    create_ok(
        &mut d.c,
        clone_of(dir_volume("pvc-clone", SIZE), "pvc-same"),
    )
    .await;
    let blk = block_volume("pvc-blk", GIB);
    create_ok(&mut d.c, blk.clone()).await;
    let img = image_volume("pvc-img", 512 * MIB, "ext4");
    create_ok(&mut d.c, img.clone()).await;
    create_ok(&mut d.c, img.clone()).await;
    // The same name with another size, access type, content source, block
    // size or image filesystem is another volume: ALREADY_EXISTS.
    for (what, req, want) in [
        (
            "a larger exact size",
            exact("pvc-same", 2 * SIZE),
            Code::AlreadyExists,
        ),
        (
            "block access",
            block_volume("pvc-same", GIB),
            Code::AlreadyExists,
        ),
        (
            "a clone under a plain volume's name",
            clone_of(dir_volume("pvc-same", SIZE), &long),
            Code::AlreadyExists,
        ),
        (
            "an empty volume asked under a clone's name",
            dir_volume("pvc-clone", SIZE),
            Code::AlreadyExists,
        ),
        (
            "another blockSize",
            with_params(blk, &[("blockSize", "4096")]),
            Code::AlreadyExists,
        ),
        (
            "another image filesystem",
            CreateVolumeRequest {
                volume_capabilities: vec![mount_cap_fs("xfs")],
                ..img
            },
            Code::AlreadyExists,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
}

#[tokio::test]
async fn create_volume_range_errors() {
    let mut d = Driver::start().await;
    let mut limit_below = dir_volume("neg", -1);
    limit_below.capacity_range = Some(CapacityRange {
        required_bytes: 2 * GIB,
        limit_bytes: GIB,
    });
    for (what, req, want) in [
        (
            "negative size",
            dir_volume("neg", -1),
            Code::InvalidArgument,
        ),
        ("limit below required", limit_below, Code::InvalidArgument),
        (
            "more than the pool",
            dir_volume("huge", i64::MAX / 2),
            Code::OutOfRange,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
    assert!(!d.pool().join("huge").exists());
}

#[tokio::test]
async fn create_volume_pool_and_topology_rules() {
    let mut d = Driver::start_with(&[("fast", None), ("slow", None)]).await;
    let in_pool =
        |name: &str, pool: &str| with_params(dir_volume(name, GIB), &[("storagePool", pool)]);
    let v = create_ok(&mut d.c, in_pool("pvc-slow", "slow")).await;
    assert_eq!(v.volume_context["storagePool"], "slow");
    assert!(d.pool_paths[1].join("pvc-slow").is_dir());
    let e =
        d.c.controller
            .create_volume(in_pool("pvc-none", "nope"))
            .await
            .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("fast") && e.message().contains("slow"),
        "{}",
        e.message()
    );
    let on_node = |node: &str| CreateVolumeRequest {
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![Topology {
                segments: params(&[("topology.hostpath.csi/node", node)]),
            }],
            preferred: vec![],
        }),
        ..dir_volume("pvc-elsewhere", GIB)
    };
    for (what, req, want) in [
        (
            "the same name in another pool",
            in_pool("pvc-slow", "fast"),
            Code::AlreadyExists,
        ),
        (
            "a topology that excludes this node",
            on_node("other-node"),
            Code::ResourceExhausted,
        ),
        ("a topology of this node", on_node(NODE), Code::Ok),
        (
            "a multi-node mode on a node-local pool",
            create_req("pvc-rwx", GIB, mount_cap(Mode::MultiNodeMultiWriter)),
            Code::InvalidArgument,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
}

#[tokio::test]
async fn delete_volume_rules() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-del", GIB)).await;
    std::fs::write(d.pool().join("pvc-del/data"), b"x").unwrap();
    for (what, req, want) in [
        (
            "no volume id",
            DeleteVolumeRequest::default(),
            Code::InvalidArgument,
        ),
        ("an unknown volume", delete_req("fake-vol-id"), Code::Ok),
        ("a volume", delete_req("pvc-del"), Code::Ok),
        ("the same volume again", delete_req("pvc-del"), Code::Ok),
    ] {
        assert_code(&d.c.controller.delete_volume(req).await, want, what);
    }
    assert!(!d.pool().join("pvc-del").exists());
    assert!(!d.pool().join(".hostpath-csi/volumes/pvc-del.json").exists());
    // Volume in use: FAILED_PRECONDITION, and the pod's data stays put.
    create_ok(&mut d.c, dir_volume("pvc-busy", GIB)).await;
    let target = d.path("pods/busy");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    d.c.node
        .node_publish_volume(NodePublishVolumeRequest {
            staging_target_path: s(&d.path("staging/busy")),
            ..publish_req("pvc-busy", &target, rwo())
        })
        .await
        .unwrap();
    std::fs::write(target.join("precious"), b"data").unwrap();
    let r = d.c.controller.delete_volume(delete_req("pvc-busy")).await;
    assert_code(&r, Code::FailedPrecondition, "a published volume");
    assert!(r.unwrap_err().message().contains(&s(&target)));
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"data");
    unpublish_ok(&mut d.c, "pvc-busy", &target).await;
    delete_ok(&mut d.c, "pvc-busy").await;
    assert!(!d.pool().join("pvc-busy").exists());
}

#[tokio::test]
async fn validate_volume_capabilities_rules() {
    let mut d = Driver::start().await;
    let v = create_ok(&mut d.c, dir_volume("pvc-val", GIB)).await;
    let req = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for (what, req, want) in [
        ("no volume id", req("", vec![rwo()]), Code::InvalidArgument),
        (
            "no capabilities",
            req("pvc-val", vec![]),
            Code::InvalidArgument,
        ),
        (
            "an unknown volume",
            req("fake-vol-id-1", vec![rwo()]),
            Code::NotFound,
        ),
    ] {
        let r = d.c.controller.validate_volume_capabilities(req).await;
        assert_code(&r, want, what);
    }
    let mut confirmed = async |caps: Vec<VolumeCapability>| {
        d.c.controller
            .validate_volume_capabilities(req("pvc-val", caps))
            .await
            .unwrap()
            .into_inner()
    };
    let ok = confirmed(vec![rwo()]).await;
    assert!(!ok.confirmed.unwrap().volume_capabilities.is_empty());
    let no = confirmed(vec![mount_cap(Mode::MultiNodeMultiWriter)]).await;
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    let no = confirmed(vec![block_rwo()]).await;
    assert!(no.confirmed.is_none());
}

#[tokio::test]
async fn list_volumes_pages_with_stable_tokens() {
    let mut d = Driver::start().await;
    for i in 0..5 {
        create_ok(&mut d.c, dir_volume(&format!("vol-{i}"), GIB)).await;
    }
    let page = |max_entries, token: &str| ListVolumesRequest {
        max_entries,
        starting_token: token.into(),
    };
    let all = d.c.controller.list_volumes(page(0, "")).await;
    let all = all.unwrap().into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    let p1 = d.c.controller.list_volumes(page(2, "")).await;
    let p1 = p1.unwrap().into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    // Delete the last entry of the page and add a new volume: the token still works.
    delete_ok(&mut d.c, "vol-1").await;
    create_ok(&mut d.c, dir_volume("vol-9", GIB)).await;
    let p2 = d.c.controller.list_volumes(page(0, &p1.next_token)).await;
    let ids: Vec<String> = p2
        .unwrap()
        .into_inner()
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, ["vol-2", "vol-3", "vol-4", "vol-9"]);
    for (what, req, want) in [
        ("a bogus token", page(0, "invalid-token"), Code::Aborted),
        ("negative max_entries", page(-1, ""), Code::InvalidArgument),
    ] {
        assert_code(&d.c.controller.list_volumes(req).await, want, what);
    }
    // The private area is never a volume.
    assert!(ids.iter().all(|i| !i.starts_with('.')));
}

#[tokio::test]
async fn get_capacity_reports_pool_space_for_this_node_only() {
    let mut d = Driver::start().await;
    let r =
        d.c.controller
            .get_capacity(GetCapacityRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(r.available_capacity > 0);
    assert!(r.maximum_volume_size.unwrap() > 0);
    let other = GetCapacityRequest {
        accessible_topology: Some(Topology {
            segments: params(&[("topology.hostpath.csi/node", "elsewhere")]),
        }),
        ..Default::default()
    };
    let r = d.c.controller.get_capacity(other).await.unwrap();
    assert_eq!(r.into_inner().available_capacity, 0);
    let bad = GetCapacityRequest {
        parameters: params(&[("storagePool", "missing")]),
        ..Default::default()
    };
    let r = d.c.controller.get_capacity(bad).await;
    assert_code(&r, Code::InvalidArgument, "an unknown pool");
}

#[tokio::test]
async fn controller_get_volume_and_expand() {
    let mut d = Driver::start().await;
    let get = |id: &str| ControllerGetVolumeRequest {
        volume_id: id.into(),
    };
    let r = d.c.controller.controller_get_volume(get("missing")).await;
    assert_code(&r, Code::NotFound, "an unknown volume");
    create_ok(&mut d.c, dir_volume("pvc-grow", SIZE)).await;
    let got = d.c.controller.controller_get_volume(get("pvc-grow")).await;
    let got = got.unwrap().into_inner();
    assert!(got.status.is_some());
    assert_eq!(got.volume.unwrap().capacity_bytes, SIZE);
    let r =
        d.c.controller
            .controller_expand_volume(grow_req("pvc-grow", SIZE + GIB, Some(rwo())))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    assert!(!r.node_expansion_required);
    let no_range = ControllerExpandVolumeRequest {
        volume_id: "pvc-grow".into(),
        ..Default::default()
    };
    let mut shrink = grow_req("pvc-grow", GIB, None);
    shrink.capacity_range.as_mut().unwrap().limit_bytes = GIB;
    for (what, req, want) in [
        ("no capacity range", no_range, Code::InvalidArgument),
        ("a shrink", shrink, Code::OutOfRange),
        (
            "an unknown volume",
            grow_req("missing", GIB, None),
            Code::NotFound,
        ),
    ] {
        let r = d.c.controller.controller_expand_volume(req).await;
        assert_code(&r, want, what);
    }
}

#[tokio::test]
async fn modify_volume_rules() {
    let mut d = Driver::start().await;
    let mut r = dir_volume("pvc-mod", GIB);
    r.mutable_parameters = params(&[("XXX_FakeKey", "x")]);
    let r = d.c.controller.create_volume(r).await;
    assert_code(
        &r,
        Code::InvalidArgument,
        "an unknown mutable parameter at create",
    );
    create_ok(&mut d.c, dir_volume("pvc-mod", GIB)).await;
    for (what, req, want) in [
        ("no volume id", modify_req("", &[]), Code::InvalidArgument),
        (
            "an unknown volume",
            modify_req("non-existing-volume-id", &[]),
            Code::NotFound,
        ),
        (
            "an unknown mutable parameter",
            modify_req("pvc-mod", &[("XXX_FakeKey", "x")]),
            Code::InvalidArgument,
        ),
        ("no parameters", modify_req("pvc-mod", &[]), Code::Ok),
    ] {
        let r = d.c.controller.controller_modify_volume(req).await;
        assert_code(&r, want, what);
    }
    // mutable_parameters take precedence over parameters in CreateVolume.
    let mut thin = with_params(
        block_volume("pvc-thin", 16 * MIB),
        &[("preallocation", "true")],
    );
    thin.mutable_parameters = params(&[("preallocation", "false")]);
    create_ok(&mut d.c, thin).await;
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(d.pool().join("pvc-thin"))
        .unwrap()
        .blocks()
        * 512;
    assert!(
        allocated < MIB as u64,
        "{allocated} bytes allocated: not thin"
    );
}

/// csi-sanity's node flow: parent dir exists, the driver makes and removes `target`.
#[tokio::test]
async fn node_full_cycle_with_stats_and_idempotency() {
    let mut d = Driver::start().await;
    let v = create_ok(&mut d.c, exact("pvc-node", SIZE)).await;
    let reqs = sanity_node_requests(&d, &v, rwo());
    let (staging, target) = stage_publish_repeatedly(&mut d, &reqs, 3, 10).await;
    assert_eq!(
        mounts_under(&target).len(),
        1,
        "repeated publish must not stack mounts"
    );
    std::fs::write(target.join("hello"), vec![1u8; 256 * 1024]).unwrap();
    assert!(d.pool().join("pvc-node/hello").exists());
    // Read-only publish of the same target is a conflict.
    let ro = NodePublishVolumeRequest {
        readonly: true,
        ..reqs.1.clone()
    };
    let r = d.c.node.node_publish_volume(ro).await;
    assert_code(
        &r,
        Code::AlreadyExists,
        "read-only publish of a published target",
    );
    let stats =
        d.c.node
            .node_get_volume_stats(stats_req(&v.volume_id, &target))
            .await
            .unwrap()
            .into_inner();
    let bytes = &stats.usage[0];
    assert_eq!(bytes.total, SIZE);
    assert!(
        bytes.used >= 256 * 1024 && bytes.used < 4 * MIB,
        "volume's own usage, not the pool's: {bytes:?}"
    );
    assert!(!stats.volume_condition.unwrap().abnormal);
    let inodes = &stats.usage[1];
    assert_eq!(inodes.used, 2);
    let r =
        d.c.node
            .node_get_volume_stats(stats_req(&v.volume_id, Path::new("some/path")))
            .await;
    assert_code(&r, Code::NotFound, "stats of a path the volume is not at");
    for _ in 0..2 {
        unpublish_ok(&mut d.c, &v.volume_id, &target).await;
    }
    assert!(
        !target.exists(),
        "unpublish must remove the target it created"
    );
    for _ in 0..2 {
        d.c.node
            .node_unstage_volume(unstage_req(&v.volume_id, &staging))
            .await
            .unwrap();
    }
    assert!(mounts_under(d.dir.path()).is_empty());
    delete_ok(&mut d.c, &v.volume_id).await;
    assert!(std::fs::read_dir(d.path("csi-mount"))
        .unwrap()
        .next()
        .is_none());
}

#[tokio::test]
async fn node_publish_validation_and_read_only() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-ro", GIB)).await;
    let t = d.path("t");
    let no_cap = NodePublishVolumeRequest {
        volume_capability: None,
        ..publish_req("fake-vol", &t, rwo())
    };
    // STAGE_UNSTAGE_VOLUME is advertised: no staging path is the spec's
    // FAILED_PRECONDITION, after the existence check (NOT_FOUND first).
    let unstaged = |id: &str| unstaged_publish_req(id, &t, rwo());
    for (what, req, want) in [
        (
            "no volume id",
            publish_req("", &t, rwo()),
            Code::InvalidArgument,
        ),
        (
            "no target",
            publish_req("fake-vol", Path::new(""), rwo()),
            Code::InvalidArgument,
        ),
        ("no capability", no_cap, Code::InvalidArgument),
        (
            "an unknown volume",
            publish_req("fake-vol", &t, rwo()),
            Code::NotFound,
        ),
        (
            "an unknown volume, unstaged",
            unstaged("fake-vol"),
            Code::NotFound,
        ),
        (
            "no staging path",
            unstaged("pvc-ro"),
            Code::FailedPrecondition,
        ),
        (
            "a relative target",
            publish_req("pvc-ro", Path::new("relative/path"), rwo()),
            Code::InvalidArgument,
        ),
    ] {
        assert_code(&d.c.node.node_publish_volume(req).await, want, what);
    }
    assert!(!t.exists());
    let ro = NodePublishVolumeRequest {
        readonly: true,
        ..publish_req("pvc-ro", &t, rwo())
    };
    d.c.node.node_publish_volume(ro.clone()).await.unwrap();
    let err = std::fs::write(d.path("t/x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    d.c.node.node_publish_volume(ro).await.unwrap();
    // mount_flags are applied.
    let t2 = d.path("t2");
    publish_ok(&mut d.c, "pvc-ro", &t2, mount_cap_flags(&["noexec"])).await;
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mi.lines().find(|l| l.contains(&*s(&t2))).unwrap();
    assert!(line.contains("noexec"), "{line}");
    // Unpublish rules.
    for (what, req, want) in [
        ("no volume id", unpublish_req("", &t), Code::InvalidArgument),
        (
            "no target",
            unpublish_req("pvc-ro", Path::new("")),
            Code::InvalidArgument,
        ),
        (
            "a read-only publication",
            unpublish_req("pvc-ro", &t),
            Code::Ok,
        ),
        (
            "a publication with flags",
            unpublish_req("pvc-ro", &t2),
            Code::Ok,
        ),
        (
            "a volume never published",
            unpublish_req("never-published", &d.path("nothing")),
            Code::Ok,
        ),
    ] {
        assert_code(&d.c.node.node_unpublish_volume(req).await, want, what);
    }
}

#[tokio::test]
async fn single_writer_refuses_a_second_target() {
    let mut d = Driver::start().await;
    let cap = mount_cap(Mode::SingleNodeSingleWriter);
    create_ok(&mut d.c, create_req("pvc-rwop", GIB, cap.clone())).await;
    let (a, b) = (d.path("a"), d.path("b"));
    publish_ok(&mut d.c, "pvc-rwop", &a, cap.clone()).await;
    let r =
        d.c.node
            .node_publish_volume(publish_req("pvc-rwop", &b, cap));
    let r = r.await;
    assert_code(&r, Code::FailedPrecondition, "a second target");
}

#[tokio::test]
async fn node_stage_and_expand_validation() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-st", GIB)).await;
    let staging = d.path("stage");
    let none = Path::new("");
    let no_cap = NodeStageVolumeRequest {
        volume_capability: None,
        ..stage_req("pvc-st", &staging, rwo())
    };
    for (what, req, want) in [
        (
            "no volume id",
            stage_req("", &staging, rwo()),
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            stage_req("fake", none, rwo()),
            Code::InvalidArgument,
        ),
        ("no capability", no_cap, Code::InvalidArgument),
        (
            "an unknown volume",
            stage_req("fake-vol", &staging, rwo()),
            Code::NotFound,
        ),
    ] {
        assert_code(&d.c.node.node_stage_volume(req).await, want, what);
    }
    for (what, req, want) in [
        (
            "no volume id",
            unstage_req("", &staging),
            Code::InvalidArgument,
        ),
        (
            "no staging path",
            unstage_req("fake", none),
            Code::InvalidArgument,
        ),
    ] {
        assert_code(&d.c.node.node_unstage_volume(req).await, want, what);
    }
    let ex = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    // A limit below the volume's size cannot be met: volumes never shrink.
    let below = NodeExpandVolumeRequest {
        capacity_range: Some(CapacityRange {
            required_bytes: 0,
            limit_bytes: MIB,
        }),
        ..ex("pvc-st", &s(d.dir.path()))
    };
    // A capability of another access type than the volume's.
    let as_block = NodeExpandVolumeRequest {
        volume_capability: Some(block_rwo()),
        ..ex("pvc-st", &s(d.dir.path()))
    };
    for (what, req, want) in [
        ("no volume id", ex("", &s(&staging)), Code::InvalidArgument),
        ("no volume path", ex("pvc-st", ""), Code::InvalidArgument),
        (
            "an unknown volume",
            ex("fake-vol", "some/path"),
            Code::NotFound,
        ),
        ("a limit below the size", below, Code::OutOfRange),
        ("a block capability", as_block, Code::InvalidArgument),
    ] {
        assert_code(&d.c.node.node_expand_volume(req).await, want, what);
    }
    let some = Path::new("some/path");
    for (what, req, want) in [
        ("no volume id", stats_req("", some), Code::InvalidArgument),
        (
            "no volume path",
            stats_req("fake", none),
            Code::InvalidArgument,
        ),
        (
            "an unknown volume",
            stats_req("fake-vol", some),
            Code::NotFound,
        ),
    ] {
        assert_code(&d.c.node.node_get_volume_stats(req).await, want, what);
    }
}

#[tokio::test]
async fn stats_report_abnormal_when_backing_directory_is_gone() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("pvc-gone", GIB)).await;
    let t = d.path("t");
    publish_ok(&mut d.c, "pvc-gone", &t, rwo()).await;
    // The metadata stays; the directory vanishes under the mount.
    std::fs::rename(
        d.pool().join("pvc-gone"),
        d.pool().join(".hostpath-csi/tmp/stolen"),
    )
    .unwrap();
    let r =
        d.c.node
            .node_get_volume_stats(stats_req("pvc-gone", &t))
            .await;
    let cond = r.unwrap().into_inner().volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("missing"), "{}", cond.message);
}

#[tokio::test]
async fn go_driver_volume_is_listed_and_publishable() {
    let mut d = Driver::start().await;
    // The Go driver makes a bare directory named after the PV.
    std::fs::create_dir(d.pool().join("pvc-legacy")).unwrap();
    std::fs::write(d.pool().join("pvc-legacy/disk.img"), b"vm disk").unwrap();
    let list =
        d.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
    let v = list.entries[0].volume.clone().unwrap();
    assert_eq!(v.volume_id, "pvc-legacy");
    assert_eq!(v.capacity_bytes, 0);
    let t = d.path("legacy-target");
    d.c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_context: v.volume_context,
            ..publish_req("pvc-legacy", &t, rwo())
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read(t.join("disk.img")).unwrap(), b"vm disk");
    // Re-creating it (the provisioner retrying) returns it unchanged.
    let again = create_ok(&mut d.c, dir_volume("pvc-legacy", GIB)).await;
    assert_eq!(again.volume_id, "pvc-legacy");
    // Adopted with an honest capacity: what was asked, never less.
    assert!(again.capacity_bytes >= GIB, "{}", again.capacity_bytes);
    assert_eq!(std::fs::read(t.join("disk.img")).unwrap(), b"vm disk");
    // A bare file is its own size: a request it cannot satisfy is refused.
    std::fs::File::create(d.pool().join("pvc-bare"))
        .unwrap()
        .set_len(64 * MIB as u64)
        .unwrap();
    let r =
        d.c.controller
            .create_volume(block_volume("pvc-bare", GIB))
            .await;
    assert_code(&r, Code::AlreadyExists, "a bare file smaller than asked");
    // A bare directory asked for as a clone or restore: nothing says it
    // holds the source's content (the Go driver fills it after making it),
    // so it is never acknowledged as one.
    create_ok(&mut d.c, dir_volume("pvc-src", GIB)).await;
    std::fs::write(d.pool().join("pvc-src/disk.img"), b"whole disk").unwrap();
    std::fs::create_dir(d.pool().join("pvc-half")).unwrap();
    std::fs::write(d.pool().join("pvc-half/disk.img"), b"wh").unwrap();
    let r =
        d.c.controller
            .create_volume(clone_of(dir_volume("pvc-half", GIB), "pvc-src"))
            .await;
    assert_code(&r, Code::AlreadyExists, "a bare directory as a clone");
    assert_eq!(
        std::fs::read(d.pool().join("pvc-half/disk.img")).unwrap(),
        b"wh"
    );
}

#[tokio::test]
async fn snapshots_create_list_get_delete_restore() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, exact("pvc-src", GIB)).await;
    create_ok(&mut d.c, exact("pvc-other", GIB)).await;
    std::fs::write(d.pool().join("pvc-src/data"), b"original").unwrap();
    let s1 = snapshot_ok(&mut d.c, "snap-1", "pvc-src").await;
    assert!(s1.ready_to_use && s1.creation_time.is_some());
    assert_eq!(s1.source_volume_id, "pvc-src");
    assert_eq!(s1.size_bytes, GIB);
    assert_eq!(snapshot_ok(&mut d.c, "snap-1", "pvc-src").await, s1);
    for (what, req, want) in [
        ("no name", snapshot_req("", "testId"), Code::InvalidArgument),
        ("no source", snapshot_req("name", ""), Code::InvalidArgument),
        (
            "an unknown source",
            snapshot_req("snap-x", "missing-vol"),
            Code::NotFound,
        ),
        (
            "a name taken by another source",
            snapshot_req("snap-1", "pvc-other"),
            Code::AlreadyExists,
        ),
    ] {
        assert_code(&d.c.controller.create_snapshot(req).await, want, what);
    }
    for i in 2..6 {
        snapshot_ok(&mut d.c, &format!("snap-{i}"), "pvc-other").await;
    }
    let mut listed = async |id: &str, src: &str, max: i32, token: &str| {
        let r =
            d.c.controller
                .list_snapshots(list_snapshots_req(id, src, max, token));
        r.await.unwrap().into_inner()
    };
    assert_eq!(listed("", "", 0, "").await.entries.len(), 5);
    assert_eq!(listed("snap-3", "", 0, "").await.entries.len(), 1);
    assert!(listed("none-exist-id", "", 0, "").await.entries.is_empty());
    assert_eq!(listed("", "pvc-src", 0, "").await.entries.len(), 1);
    let p1 = listed("", "", 2, "").await;
    assert_eq!(p1.entries.len(), 2);
    assert_eq!(listed("", "", 0, &p1.next_token).await.entries.len(), 3);
    let r =
        d.c.controller
            .list_snapshots(list_snapshots_req("", "", 0, "bogus"))
            .await;
    assert_code(&r, Code::Aborted, "a bogus token");
    let get = |id: &str| GetSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let got = d.c.controller.get_snapshot(get("snap-1")).await.unwrap();
    assert_eq!(got.into_inner().snapshot.unwrap().snapshot_id, "snap-1");
    let r = d.c.controller.get_snapshot(get("nope")).await;
    assert_code(&r, Code::NotFound, "an unknown snapshot");
    // Restore, and the source can change or go away independently.
    std::fs::write(d.pool().join("pvc-src/data"), b"changed").unwrap();
    let v = create_ok(&mut d.c, restore_of(exact("pvc-restored", GIB), "snap-1")).await;
    assert!(v.content_source.is_some());
    assert_eq!(
        std::fs::read(d.pool().join("pvc-restored/data")).unwrap(),
        b"original"
    );
    let bad = restore_of(exact("pvc-bad", GIB), "non-existing-snapshot-id");
    let r = d.c.controller.create_volume(bad).await;
    assert_code(&r, Code::NotFound, "a restore of an unknown snapshot");
    delete_ok(&mut d.c, "pvc-src").await;
    for (what, id, want) in [
        ("no snapshot id", "", Code::InvalidArgument),
        ("a snapshot of a deleted source", "snap-1", Code::Ok),
        ("the same snapshot again", "snap-1", Code::Ok),
        ("an unknown snapshot", "reallyfakesnapshotid", Code::Ok),
    ] {
        let r =
            d.c.controller
                .delete_snapshot(delete_snapshot_req(id))
                .await;
        assert_code(&r, want, what);
    }
}

#[tokio::test]
async fn clone_volume_copies_content() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, exact("pvc-a", GIB)).await;
    std::fs::create_dir(d.pool().join("pvc-a/sub")).unwrap();
    std::fs::write(d.pool().join("pvc-a/sub/f"), b"payload").unwrap();
    let v = create_ok(&mut d.c, clone_of(exact("pvc-b", 2 * GIB), "pvc-a")).await;
    assert_eq!(v.capacity_bytes, 2 * GIB);
    assert_eq!(
        std::fs::read(d.pool().join("pvc-b/sub/f")).unwrap(),
        b"payload"
    );
    for (what, req, want) in [
        (
            "a clone of an unknown volume",
            clone_of(exact("pvc-c", GIB), "fake-vol-id-12345"),
            Code::NotFound,
        ),
        (
            "a clone smaller than its source",
            clone_of(exact("pvc-d", GIB / 2), "pvc-a"),
            Code::OutOfRange,
        ),
    ] {
        assert_code(&d.c.controller.create_volume(req).await, want, what);
    }
    assert!(!d.pool().join("pvc-c").exists() && !d.pool().join("pvc-d").exists());
    // What a failed create built is removed in the background.
    let tmp = d.pool().join(".hostpath-csi/tmp");
    eventually(
        "a failed create's leftovers are removed",
        EVENTUALLY,
        || std::fs::read_dir(&tmp).unwrap().next().is_none(),
        || format!("leftovers stay in {}", tmp.display()),
    )
    .await;
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let d = Driver::start().await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = d.c.controller.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(dir_volume("pvc-race", GIB)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().volume.unwrap().capacity_bytes, GIB);
                ok += 1;
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted),
        }
    }
    assert!(ok >= 1);
    let entries: Vec<_> = std::fs::read_dir(d.pool())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}"); // pvc-race and .hostpath-csi
}

#[tokio::test]
async fn socket_is_not_world_accessible_and_sigterm_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    let d = Driver::start().await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "socket mode {mode:o}");
    let out = std::process::Command::new("pkill")
        .arg("-TERM")
        .arg("-f")
        .arg(d.socket.to_string_lossy().as_ref())
        .status()
        .unwrap();
    assert!(out.success());
    for _ in 0..100 {
        if !d.socket.exists() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!d.socket.exists(), "socket must be removed on SIGTERM");
}

/// CSI ephemeral inline volumes: kubelet publishes without CreateVolume.
#[tokio::test]
async fn ephemeral_inline_volume_lives_from_publish_to_unpublish() {
    let mut d = Driver::start().await;
    let (id, target) = ("csi-0123456789abcdef", d.path("pods/uid/volumes/scratch"));
    let sized = |size| {
        ephemeral_publish_req(
            id,
            &target,
            &[
                ("csi.storage.k8s.io/pod.name", "vm-launcher"),
                ("size", size),
            ],
        )
    };
    d.c.node.node_publish_volume(sized("1Gi")).await.unwrap();
    d.c.node.node_publish_volume(sized("1Gi")).await.unwrap();
    std::fs::write(target.join("scratch"), b"tmp").unwrap();
    // Pod authors size it, so it is a hard limit: an image volume.
    assert!(d.pool().join(id).is_file());
    assert_eq!(mounts_under(&target), vec![target.clone()]);
    assert_eq!(reported_capacity(&mut d.c, id).await, GIB);
    unpublish_ok(&mut d.c, id, &target).await;
    assert!(
        !d.pool().join(id).exists(),
        "ephemeral volume removed with its last publish"
    );
    assert!(!target.exists());
    // Above the node's cap (serve --max-ephemeral-size, 1Gi by default).
    let r = d.c.node.node_publish_volume(sized("2Gi")).await;
    assert_code(
        &r,
        Code::InvalidArgument,
        "an ephemeral volume above the cap",
    );
    assert!(!d.pool().join(id).exists());
}

/// The GroupController checks csi-sanity makes.
#[tokio::test]
async fn group_controller_argument_rules() {
    let mut d = Driver::start().await;
    let caps =
        d.c.group
            .group_controller_get_capabilities(GroupControllerGetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(caps.capabilities.len(), 1);
    for (what, req, want) in [
        (
            "an empty request",
            group_req("", &[]),
            Code::InvalidArgument,
        ),
        (
            "no source volumes",
            group_req("g", &[]),
            Code::InvalidArgument,
        ),
        (
            "an unknown source volume",
            group_req("g", &["missing-vol"]),
            Code::NotFound,
        ),
    ] {
        let r = d.c.group.create_volume_group_snapshot(req).await;
        assert_code(&r, want, what);
    }
    let get = |id: &str| get_group_req(id, vec![]);
    for (what, req, want) in [
        ("no id", get(""), Code::InvalidArgument),
        (
            "an unknown group snapshot",
            get("fake-vol-id"),
            Code::NotFound,
        ),
    ] {
        let r = d.c.group.get_volume_group_snapshot(req).await;
        assert_code(&r, want, what);
    }
    let delete = |id: &str| delete_group_req(id, vec![]);
    for (what, req, want) in [
        ("no id", delete(""), Code::InvalidArgument),
        ("an unknown group snapshot", delete("fake-vol-id"), Code::Ok),
    ] {
        let r = d.c.group.delete_volume_group_snapshot(req).await;
        assert_code(&r, want, what);
    }
}

/// csi-sanity's node flow with `--csi.testvolumeaccesstype=block`.
#[tokio::test]
async fn node_full_cycle_with_block_access() {
    let mut d = Driver::start().await;
    let req = CreateVolumeRequest {
        volume_capabilities: vec![block_rwo()],
        ..exact("pvc-node-block", SIZE)
    };
    let v = create_ok(&mut d.c, req).await;
    let reqs = sanity_node_requests(&d, &v, block_rwo());
    let (staging, target) = stage_publish_repeatedly(&mut d, &reqs, 10, 10).await;
    assert_eq!(
        mounts_under(&target).len(),
        1,
        "repeated publish must not stack mounts"
    );
    assert_eq!(loops_under(d.pool()).len(), 1);
    let stats =
        d.c.node
            .node_get_volume_stats(stats_req(&v.volume_id, &target))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(stats.usage[0].total, SIZE);
    let r =
        d.c.controller
            .controller_expand_volume(grow_req(&v.volume_id, SIZE + GIB, None))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    assert!(r.node_expansion_required);
    let r =
        d.c.node
            .node_expand_volume(node_grow_req(&v.volume_id, &target, SIZE + GIB))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    unpublish_ok(&mut d.c, &v.volume_id, &target).await;
    assert!(
        !target.exists(),
        "unpublish must remove the file it created"
    );
    d.c.node
        .node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    assert!(loops_under(d.pool()).is_empty());
    delete_ok(&mut d.c, &v.volume_id).await;
}

/// csi-sanity's node flow with `--csi.testvolumeparameters` asking for
/// `layout: image` (a loop-mounted XFS with a hard size limit).
#[tokio::test]
async fn node_full_cycle_with_image_layout() {
    let mut d = Driver::start().await;
    let req = with_params(exact("pvc-node-image", SIZE), &[("layout", "image")]);
    let v = create_ok(&mut d.c, req.clone()).await;
    assert_eq!(v.capacity_bytes, SIZE);
    // Creating it again returns the same volume.
    create_ok(&mut d.c, req).await;
    let reqs = sanity_node_requests(&d, &v, rwo());
    let (staging, target) = stage_publish_repeatedly(&mut d, &reqs, 10, 10).await;
    assert_eq!(mounts_under(&target).len(), 1);
    std::fs::write(target.join("f"), b"inside the image").unwrap();
    let stats =
        d.c.node
            .node_get_volume_stats(stats_req(&v.volume_id, &target))
            .await
            .unwrap()
            .into_inner();
    assert!(stats.usage[0].total > SIZE * 9 / 10 && stats.usage[0].total <= SIZE);
    d.c.controller
        .controller_expand_volume(grow_req(&v.volume_id, SIZE + GIB, None))
        .await
        .unwrap();
    d.c.node
        .node_expand_volume(node_grow_req(&v.volume_id, &target, SIZE + GIB))
        .await
        .unwrap();
    let fs_size = nix::sys::statvfs::statvfs(&target).unwrap();
    assert!(
        fs_size.blocks() * fs_size.fragment_size() > SIZE as u64,
        "the filesystem grew online"
    );
    unpublish_ok(&mut d.c, &v.volume_id, &target).await;
    assert!(!target.exists());
    d.c.node
        .node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
    assert!(loops_under(d.pool()).is_empty());
    delete_ok(&mut d.c, &v.volume_id).await;
}
