//! CSI spec MUSTs for every advertised RPC, against the real server over a
//! real Unix socket (the same checks csi-sanity makes, and more).

mod common;

use common::*;
use hostpath_csi::proto::controller_service_capability::rpc::Type as CtrlCap;
use hostpath_csi::proto::node_service_capability::rpc::Type as NodeCap;
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::volume_content_source::{SnapshotSource, Type as Src, VolumeSource};
use hostpath_csi::proto::*;
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
            .create_volume(create_req("pvc-late", GIB, rwo()))
            .await;
    assert_eq!(code(&r), Code::Unavailable, "{r:?}");
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
    let r =
        d.c.controller
            .create_volume(CreateVolumeRequest::default())
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.controller
            .create_volume(CreateVolumeRequest {
                name: "no-caps".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    // Capability without access type or access mode.
    let mut req = create_req("bad-cap", GIB, rwo());
    req.volume_capabilities[0].access_type = None;
    assert_eq!(
        code(&d.c.controller.create_volume(req).await),
        Code::InvalidArgument
    );
    let mut req = create_req("bad-mode", GIB, rwo());
    req.volume_capabilities[0].access_mode = None;
    assert_eq!(
        code(&d.c.controller.create_volume(req).await),
        Code::InvalidArgument
    );
    assert!(tree(d.pool())
        .iter()
        .all(|p| p.to_string_lossy().contains(".hostpath-csi")));
}

#[tokio::test]
async fn create_volume_returns_requested_capacity_and_context() {
    let mut d = Driver::start().await;
    let v =
        d.c.controller
            .create_volume(exact("pvc-exact", SIZE))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
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
    let v =
        d.c.controller
            .create_volume(create_req("pvc-odd", 1000, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.capacity_bytes, 4096);
    // No range: capacity unknown (0) for a directory.
    let mut r = create_req("pvc-norange", 0, rwo());
    r.capacity_range = None;
    let v =
        d.c.controller
            .create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.capacity_bytes, 0);
}

#[tokio::test]
async fn create_volume_is_idempotent_and_detects_conflicts() {
    let mut d = Driver::start().await;
    let a =
        d.c.controller
            .create_volume(create_req("pvc-same", SIZE, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let b =
        d.c.controller
            .create_volume(create_req("pvc-same", SIZE, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(a, b);
    let r =
        d.c.controller
            .create_volume(exact("pvc-same", 2 * SIZE))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    let r =
        d.c.controller
            .create_volume(create_req(
                "pvc-same",
                GIB,
                block_cap(Mode::SingleNodeWriter),
            ))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists);
    let long = "a".repeat(128);
    let v =
        d.c.controller
            .create_volume(create_req(&long, SIZE, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.volume_id, long);
    // The same name with another content source, block size or image
    // filesystem is another volume: ALREADY_EXISTS.
    let mut cloned = create_req("pvc-same", SIZE, rwo());
    cloned.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: long.clone(),
        })),
    });
    assert_eq!(
        code(&d.c.controller.create_volume(cloned).await),
        Code::AlreadyExists
    );
    let mut plain_of_clone = create_req("pvc-clone", SIZE, rwo());
    plain_of_clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: "pvc-same".into(),
        })),
    });
    d.c.controller.create_volume(plain_of_clone).await.unwrap();
    assert_eq!(
        code(
            &d.c.controller
                .create_volume(create_req("pvc-clone", SIZE, rwo()))
                .await
        ),
        Code::AlreadyExists,
        "an empty volume asked under a clone's name"
    );
    let mut blk = create_req("pvc-blk", GIB, block_cap(Mode::SingleNodeWriter));
    d.c.controller.create_volume(blk.clone()).await.unwrap();
    blk.parameters = params(&[("blockSize", "4096")]);
    assert_eq!(
        code(&d.c.controller.create_volume(blk).await),
        Code::AlreadyExists
    );
    let mut img = create_req("pvc-img", 512 * MIB, mount_cap_fs("ext4"));
    img.parameters = params(&[("layout", "image")]);
    d.c.controller.create_volume(img.clone()).await.unwrap();
    d.c.controller.create_volume(img.clone()).await.unwrap();
    img.volume_capabilities = vec![mount_cap_fs("xfs")];
    assert_eq!(
        code(&d.c.controller.create_volume(img).await),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn create_volume_range_errors() {
    let mut d = Driver::start().await;
    let mut r = create_req("neg", -1, rwo());
    assert_eq!(
        code(&d.c.controller.create_volume(r.clone()).await),
        Code::InvalidArgument
    );
    r.capacity_range = Some(CapacityRange {
        required_bytes: 2 * GIB,
        limit_bytes: GIB,
    });
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
    let huge = create_req("huge", i64::MAX / 2, rwo());
    assert_eq!(
        code(&d.c.controller.create_volume(huge).await),
        Code::OutOfRange
    );
    assert!(!d.pool().join("huge").exists());
}

#[tokio::test]
async fn create_volume_pool_and_topology_rules() {
    let mut d = Driver::start_with(&[("fast", None), ("slow", None)]).await;
    let mut r = create_req("pvc-slow", GIB, rwo());
    r.parameters = params(&[("storagePool", "slow")]);
    let v =
        d.c.controller
            .create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.volume_context["storagePool"], "slow");
    assert!(d.pool_paths[1].join("pvc-slow").is_dir());
    let mut r = create_req("pvc-none", GIB, rwo());
    r.parameters = params(&[("storagePool", "nope")]);
    let e = d.c.controller.create_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("fast") && e.message().contains("slow"),
        "{}",
        e.message()
    );
    // Same name in another pool conflicts.
    let mut r = create_req("pvc-slow", GIB, rwo());
    r.parameters = params(&[("storagePool", "fast")]);
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::AlreadyExists
    );
    // Topology that excludes this node.
    let mut r = create_req("pvc-elsewhere", GIB, rwo());
    r.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: params(&[("topology.hostpath.csi/node", "other-node")]),
        }],
        preferred: vec![],
    });
    assert_eq!(
        code(&d.c.controller.create_volume(r.clone()).await),
        Code::ResourceExhausted
    );
    r.accessibility_requirements.as_mut().unwrap().requisite[0].segments =
        params(&[("topology.hostpath.csi/node", NODE)]);
    assert_eq!(code(&d.c.controller.create_volume(r).await), Code::Ok);
    // Multi-node modes are refused on a node-local pool.
    let r = create_req("pvc-rwx", GIB, mount_cap(Mode::MultiNodeMultiWriter));
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn delete_volume_rules() {
    let mut d = Driver::start().await;
    let r =
        d.c.controller
            .delete_volume(DeleteVolumeRequest::default())
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: "fake-vol-id".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::Ok);
    d.c.controller
        .create_volume(create_req("pvc-del", GIB, rwo()))
        .await
        .unwrap();
    std::fs::write(d.pool().join("pvc-del/data"), b"x").unwrap();
    for _ in 0..2 {
        let r =
            d.c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: "pvc-del".into(),
                    ..Default::default()
                })
                .await;
        assert_eq!(code(&r), Code::Ok);
    }
    assert!(!d.pool().join("pvc-del").exists());
    assert!(!d.pool().join(".hostpath-csi/volumes/pvc-del.json").exists());
    // Volume in use: FAILED_PRECONDITION, and the pod's data stays put.
    d.c.controller
        .create_volume(create_req("pvc-busy", GIB, rwo()))
        .await
        .unwrap();
    let target = d.path("pods/busy");
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    d.c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-busy".into(),
            target_path: s(&target),
            staging_target_path: s(&d.path("staging/busy")),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await
        .unwrap();
    std::fs::write(target.join("precious"), b"data").unwrap();
    let r = d.c.controller.delete_volume(delete_req("pvc-busy")).await;
    assert_eq!(code(&r), Code::FailedPrecondition, "{r:?}");
    assert!(r.unwrap_err().message().contains(&s(&target)));
    assert_eq!(std::fs::read(target.join("precious")).unwrap(), b"data");
    d.c.node
        .node_unpublish_volume(unpublish_req("pvc-busy", &target))
        .await
        .unwrap();
    d.c.controller
        .delete_volume(delete_req("pvc-busy"))
        .await
        .unwrap();
    assert!(!d.pool().join("pvc-busy").exists());
}

#[tokio::test]
async fn validate_volume_capabilities_rules() {
    let mut d = Driver::start().await;
    let v =
        d.c.controller
            .create_volume(create_req("pvc-val", GIB, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let req = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(
            &d.c.controller
                .validate_volume_capabilities(req("", vec![rwo()]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.controller
                .validate_volume_capabilities(req("pvc-val", vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.controller
                .validate_volume_capabilities(req("fake-vol-id-1", vec![rwo()]))
                .await
        ),
        Code::NotFound
    );
    let ok =
        d.c.controller
            .validate_volume_capabilities(req("pvc-val", vec![rwo()]))
            .await
            .unwrap()
            .into_inner();
    assert!(!ok.confirmed.unwrap().volume_capabilities.is_empty());
    let no = d
        .c
        .controller
        .validate_volume_capabilities(req("pvc-val", vec![mount_cap(Mode::MultiNodeMultiWriter)]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());
    let no =
        d.c.controller
            .validate_volume_capabilities(req("pvc-val", vec![block_cap(Mode::SingleNodeWriter)]))
            .await
            .unwrap()
            .into_inner();
    assert!(no.confirmed.is_none());
}

#[tokio::test]
async fn list_volumes_pages_with_stable_tokens() {
    let mut d = Driver::start().await;
    for i in 0..5 {
        d.c.controller
            .create_volume(create_req(&format!("vol-{i}"), GIB, rwo()))
            .await
            .unwrap();
    }
    let all =
        d.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert_eq!(all.entries.len(), 5);
    assert!(all.next_token.is_empty());
    let p1 =
        d.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(p1.entries.len(), 2);
    assert!(!p1.next_token.is_empty());
    // Delete the last entry of the page and add a new volume: the token still works.
    d.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "vol-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    d.c.controller
        .create_volume(create_req("vol-9", GIB, rwo()))
        .await
        .unwrap();
    let p2 =
        d.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: p1.next_token,
            })
            .await
            .unwrap()
            .into_inner();
    let ids: Vec<String> = p2
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(ids, ["vol-2", "vol-3", "vol-4", "vol-9"]);
    let r =
        d.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: "invalid-token".into(),
            })
            .await;
    assert_eq!(code(&r), Code::Aborted);
    let r =
        d.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
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
    assert_eq!(
        d.c.controller
            .get_capacity(other)
            .await
            .unwrap()
            .into_inner()
            .available_capacity,
        0
    );
    let bad = GetCapacityRequest {
        parameters: params(&[("storagePool", "missing")]),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.controller.get_capacity(bad).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn controller_get_volume_and_expand() {
    let mut d = Driver::start().await;
    let r =
        d.c.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "missing".into(),
            })
            .await;
    assert_eq!(code(&r), Code::NotFound);
    d.c.controller
        .create_volume(create_req("pvc-grow", SIZE, rwo()))
        .await
        .unwrap();
    let got =
        d.c.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-grow".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert!(got.status.is_some());
    assert_eq!(got.volume.unwrap().capacity_bytes, SIZE);
    let r =
        d.c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "pvc-grow".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "pvc-grow".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: SIZE + GIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(rwo()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    assert!(!r.node_expansion_required);
    let shrink = ControllerExpandVolumeRequest {
        volume_id: "pvc-grow".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: GIB,
            limit_bytes: GIB,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.controller.controller_expand_volume(shrink).await),
        Code::OutOfRange
    );
    let missing = ControllerExpandVolumeRequest {
        volume_id: "missing".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: GIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.controller.controller_expand_volume(missing).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn modify_volume_rules() {
    let mut d = Driver::start().await;
    let mut r = create_req("pvc-mod", GIB, rwo());
    r.mutable_parameters = params(&[("XXX_FakeKey", "x")]);
    assert_eq!(
        code(&d.c.controller.create_volume(r).await),
        Code::InvalidArgument
    );
    d.c.controller
        .create_volume(create_req("pvc-mod", GIB, rwo()))
        .await
        .unwrap();
    let m = |id: &str, p: &[(&str, &str)]| ControllerModifyVolumeRequest {
        volume_id: id.into(),
        mutable_parameters: params(p),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.controller.controller_modify_volume(m("", &[])).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.controller
                .controller_modify_volume(m("non-existing-volume-id", &[]))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            &d.c.controller
                .controller_modify_volume(m("pvc-mod", &[("XXX_FakeKey", "x")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.controller
                .controller_modify_volume(m("pvc-mod", &[]))
                .await
        ),
        Code::Ok
    );
    // mutable_parameters take precedence over parameters in CreateVolume.
    let mut thin = create_req("pvc-thin", 16 * MIB, block_cap(Mode::SingleNodeWriter));
    thin.parameters = params(&[("preallocation", "true")]);
    thin.mutable_parameters = params(&[("preallocation", "false")]);
    d.c.controller.create_volume(thin).await.unwrap();
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
    let v =
        d.c.controller
            .create_volume(exact("pvc-node", SIZE))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let mount_dir = d.path("csi-mount");
    let staging = d.path("csi-staging");
    std::fs::create_dir(&mount_dir).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let target = mount_dir.join("target");
    for _ in 0..3 {
        d.c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(rwo()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let publish = NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(rwo()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..10 {
        d.c.node.node_publish_volume(publish.clone()).await.unwrap();
    }
    assert_eq!(
        mounts_under(&target).len(),
        1,
        "repeated publish must not stack mounts"
    );
    std::fs::write(target.join("hello"), vec![1u8; 256 * 1024]).unwrap();
    assert!(d.pool().join("pvc-node/hello").exists());
    // Read-only publish of the same target is a conflict.
    let mut ro = publish.clone();
    ro.readonly = true;
    assert_eq!(
        code(&d.c.node.node_publish_volume(ro).await),
        Code::AlreadyExists
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
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::NotFound);
    for _ in 0..2 {
        d.c.node
            .node_unpublish_volume(unpublish_req(&v.volume_id, &target))
            .await
            .unwrap();
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
    d.c.controller
        .delete_volume(delete_req(&v.volume_id))
        .await
        .unwrap();
    assert!(std::fs::read_dir(&mount_dir).unwrap().next().is_none());
}

#[tokio::test]
async fn node_publish_validation_and_read_only() {
    let mut d = Driver::start().await;
    let pubreq = |id: &str, target: &str, cap: Option<VolumeCapability>| NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
        staging_target_path: format!("{target}.staging"),
        volume_capability: cap,
        ..Default::default()
    };
    let t = d.path("t").to_string_lossy().into_owned();
    assert_eq!(
        code(
            &d.c.node
                .node_publish_volume(pubreq("", &t, Some(rwo())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_publish_volume(pubreq("fake-vol", "", Some(rwo())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_publish_volume(pubreq("fake-vol", &t, None))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_publish_volume(pubreq("fake-vol", &t, Some(rwo())))
                .await
        ),
        Code::NotFound
    );
    d.c.controller
        .create_volume(create_req("pvc-ro", GIB, rwo()))
        .await
        .unwrap();
    // STAGE_UNSTAGE_VOLUME is advertised: no staging path is the spec's
    // FAILED_PRECONDITION, after the existence check (NOT_FOUND first).
    let unstaged = |id: &str| NodePublishVolumeRequest {
        staging_target_path: String::new(),
        ..pubreq(id, &t, Some(rwo()))
    };
    assert_eq!(
        code(&d.c.node.node_publish_volume(unstaged("fake-vol")).await),
        Code::NotFound
    );
    assert_eq!(
        code(&d.c.node.node_publish_volume(unstaged("pvc-ro")).await),
        Code::FailedPrecondition
    );
    assert!(!std::path::Path::new(&t).exists());
    assert_eq!(
        code(
            &d.c.node
                .node_publish_volume(pubreq("pvc-ro", "relative/path", Some(rwo())))
                .await
        ),
        Code::InvalidArgument
    );
    let mut ro = pubreq("pvc-ro", &t, Some(rwo()));
    ro.readonly = true;
    d.c.node.node_publish_volume(ro.clone()).await.unwrap();
    let err = std::fs::write(d.path("t/x"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    d.c.node.node_publish_volume(ro).await.unwrap();
    // mount_flags are applied.
    let mut flagged = pubreq("pvc-ro", &d.path("t2").to_string_lossy(), Some(rwo()));
    if let Some(volume_capability::AccessType::Mount(m)) =
        &mut flagged.volume_capability.as_mut().unwrap().access_type
    {
        m.mount_flags = vec!["noexec".into()];
    }
    d.c.node.node_publish_volume(flagged).await.unwrap();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mi
        .lines()
        .find(|l| l.contains(&*d.path("t2").to_string_lossy()))
        .unwrap();
    assert!(line.contains("noexec"), "{line}");
    // Unpublish rules.
    let un = |id: &str, target: &str| NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
    };
    assert_eq!(
        code(&d.c.node.node_unpublish_volume(un("", &t)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.node.node_unpublish_volume(un("pvc-ro", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.node.node_unpublish_volume(un("pvc-ro", &t)).await),
        Code::Ok
    );
    assert_eq!(
        code(
            &d.c.node
                .node_unpublish_volume(un("pvc-ro", &d.path("t2").to_string_lossy()))
                .await
        ),
        Code::Ok
    );
    assert_eq!(
        code(
            &d.c.node
                .node_unpublish_volume(un("never-published", &d.path("nothing").to_string_lossy()))
                .await
        ),
        Code::Ok
    );
}

#[tokio::test]
async fn single_writer_refuses_a_second_target() {
    let mut d = Driver::start().await;
    let cap = mount_cap(Mode::SingleNodeSingleWriter);
    d.c.controller
        .create_volume(create_req("pvc-rwop", GIB, cap.clone()))
        .await
        .unwrap();
    let req = |t: &str| NodePublishVolumeRequest {
        volume_id: "pvc-rwop".into(),
        target_path: t.into(),
        staging_target_path: format!("{t}.staging"),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    d.c.node
        .node_publish_volume(req(&d.path("a").to_string_lossy()))
        .await
        .unwrap();
    let r =
        d.c.node
            .node_publish_volume(req(&d.path("b").to_string_lossy()))
            .await;
    assert_eq!(code(&r), Code::FailedPrecondition);
}

#[tokio::test]
async fn node_stage_and_expand_validation() {
    let mut d = Driver::start().await;
    let staging = d.path("stage").to_string_lossy().into_owned();
    let st = |id: &str, path: &str, cap: Option<VolumeCapability>| NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
        volume_capability: cap,
        ..Default::default()
    };
    assert_eq!(
        code(
            &d.c.node
                .node_stage_volume(st("", &staging, Some(rwo())))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_stage_volume(st("fake", "", Some(rwo())))
                .await
        ),
        Code::InvalidArgument
    );
    d.c.controller
        .create_volume(create_req("pvc-st", GIB, rwo()))
        .await
        .unwrap();
    assert_eq!(
        code(
            &d.c.node
                .node_stage_volume(st("pvc-st", &staging, None))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_stage_volume(st("fake-vol", &staging, Some(rwo())))
                .await
        ),
        Code::NotFound
    );
    let unst = |id: &str, path: &str| NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: path.into(),
    };
    assert_eq!(
        code(&d.c.node.node_unstage_volume(unst("", &staging)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.node.node_unstage_volume(unst("fake", "")).await),
        Code::InvalidArgument
    );
    let ex = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.node.node_expand_volume(ex("", &staging)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.node.node_expand_volume(ex("pvc-st", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_expand_volume(ex("fake-vol", "some/path"))
                .await
        ),
        Code::NotFound
    );
    // A limit below the volume's size cannot be met: volumes never shrink.
    let mut below = ex("pvc-st", &s(d.dir.path()));
    below.capacity_range = Some(CapacityRange {
        required_bytes: 0,
        limit_bytes: MIB,
    });
    assert_eq!(
        code(&d.c.node.node_expand_volume(below).await),
        Code::OutOfRange
    );
    // A capability of another access type than the volume's.
    let mut as_block = ex("pvc-st", &s(d.dir.path()));
    as_block.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    assert_eq!(
        code(&d.c.node.node_expand_volume(as_block).await),
        Code::InvalidArgument
    );
    let stats = |id: &str, path: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.node.node_get_volume_stats(stats("", "some/path")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.node.node_get_volume_stats(stats("fake", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.node
                .node_get_volume_stats(stats("fake-vol", "some/path"))
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn stats_report_abnormal_when_backing_directory_is_gone() {
    let mut d = Driver::start().await;
    d.c.controller
        .create_volume(create_req("pvc-gone", GIB, rwo()))
        .await
        .unwrap();
    let t = d.path("t");
    d.c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: "pvc-gone".into(),
            target_path: t.to_string_lossy().into(),
            staging_target_path: s(&staging_for(&t)),
            volume_capability: Some(rwo()),
            ..Default::default()
        })
        .await
        .unwrap();
    // The metadata stays; the directory vanishes under the mount.
    std::fs::rename(
        d.pool().join("pvc-gone"),
        d.pool().join(".hostpath-csi/tmp/stolen"),
    )
    .unwrap();
    let r =
        d.c.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "pvc-gone".into(),
                volume_path: t.to_string_lossy().into(),
                ..Default::default()
            })
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
            volume_id: "pvc-legacy".into(),
            target_path: t.to_string_lossy().into(),
            staging_target_path: s(&staging_for(&t)),
            volume_capability: Some(rwo()),
            volume_context: v.volume_context,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read(t.join("disk.img")).unwrap(), b"vm disk");
    // Re-creating it (the provisioner retrying) returns it unchanged.
    let again =
        d.c.controller
            .create_volume(create_req("pvc-legacy", GIB, rwo()))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
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
            .create_volume(create_req(
                "pvc-bare",
                GIB,
                block_cap(Mode::SingleNodeWriter),
            ))
            .await;
    assert_eq!(code(&r), Code::AlreadyExists, "{r:?}");
}

#[tokio::test]
async fn snapshots_create_list_get_delete_restore() {
    let mut d = Driver::start().await;
    d.c.controller
        .create_volume(exact("pvc-src", GIB))
        .await
        .unwrap();
    std::fs::write(d.pool().join("pvc-src/data"), b"original").unwrap();
    let snap = |name: &str, src: &str| CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: src.into(),
        ..Default::default()
    };
    assert_eq!(
        code(&d.c.controller.create_snapshot(snap("", "testId")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(&d.c.controller.create_snapshot(snap("name", "")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            &d.c.controller
                .create_snapshot(snap("snap-x", "missing-vol"))
                .await
        ),
        Code::NotFound
    );
    let s1 =
        d.c.controller
            .create_snapshot(snap("snap-1", "pvc-src"))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    assert!(s1.ready_to_use && s1.creation_time.is_some());
    assert_eq!(s1.source_volume_id, "pvc-src");
    assert_eq!(s1.size_bytes, GIB);
    let again =
        d.c.controller
            .create_snapshot(snap("snap-1", "pvc-src"))
            .await
            .unwrap()
            .into_inner()
            .snapshot
            .unwrap();
    assert_eq!(again, s1);
    d.c.controller
        .create_volume(exact("pvc-other", GIB))
        .await
        .unwrap();
    assert_eq!(
        code(
            &d.c.controller
                .create_snapshot(snap("snap-1", "pvc-other"))
                .await
        ),
        Code::AlreadyExists
    );
    for i in 2..6 {
        d.c.controller
            .create_snapshot(snap(&format!("snap-{i}"), "pvc-other"))
            .await
            .unwrap();
    }
    let list = |id: &str, src: &str, max: i32, token: &str| ListSnapshotsRequest {
        snapshot_id: id.into(),
        source_volume_id: src.into(),
        max_entries: max,
        starting_token: token.into(),
        ..Default::default()
    };
    let all =
        d.c.controller
            .list_snapshots(list("", "", 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(all.entries.len(), 5);
    let one =
        d.c.controller
            .list_snapshots(list("snap-3", "", 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(one.entries.len(), 1);
    let none =
        d.c.controller
            .list_snapshots(list("none-exist-id", "", 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert!(none.entries.is_empty());
    let by_src =
        d.c.controller
            .list_snapshots(list("", "pvc-src", 0, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(by_src.entries.len(), 1);
    let p1 =
        d.c.controller
            .list_snapshots(list("", "", 2, ""))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(p1.entries.len(), 2);
    let p2 =
        d.c.controller
            .list_snapshots(list("", "", 0, &p1.next_token))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(p2.entries.len(), 3);
    assert_eq!(
        code(
            &d.c.controller
                .list_snapshots(list("", "", 0, "bogus"))
                .await
        ),
        Code::Aborted
    );
    let got =
        d.c.controller
            .get_snapshot(GetSnapshotRequest {
                snapshot_id: "snap-1".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(got.snapshot.unwrap().snapshot_id, "snap-1");
    assert_eq!(
        code(
            &d.c.controller
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: "nope".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    // Restore, and the source can change or go away independently.
    std::fs::write(d.pool().join("pvc-src/data"), b"changed").unwrap();
    let mut restore = exact("pvc-restored", GIB);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Snapshot(SnapshotSource {
            snapshot_id: "snap-1".into(),
        })),
    });
    let v =
        d.c.controller
            .create_volume(restore)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert!(v.content_source.is_some());
    assert_eq!(
        std::fs::read(d.pool().join("pvc-restored/data")).unwrap(),
        b"original"
    );
    let mut bad = exact("pvc-bad", GIB);
    bad.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Snapshot(SnapshotSource {
            snapshot_id: "non-existing-snapshot-id".into(),
        })),
    });
    assert_eq!(
        code(&d.c.controller.create_volume(bad).await),
        Code::NotFound
    );
    d.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-src".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        code(
            &d.c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: String::new(),
                    ..Default::default()
                })
                .await
        ),
        Code::InvalidArgument
    );
    for _ in 0..2 {
        assert_eq!(
            code(
                &d.c.controller
                    .delete_snapshot(DeleteSnapshotRequest {
                        snapshot_id: "snap-1".into(),
                        ..Default::default()
                    })
                    .await
            ),
            Code::Ok
        );
    }
    assert_eq!(
        code(
            &d.c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: "reallyfakesnapshotid".into(),
                    ..Default::default()
                })
                .await
        ),
        Code::Ok
    );
}

#[tokio::test]
async fn clone_volume_copies_content() {
    let mut d = Driver::start().await;
    d.c.controller
        .create_volume(exact("pvc-a", GIB))
        .await
        .unwrap();
    std::fs::create_dir(d.pool().join("pvc-a/sub")).unwrap();
    std::fs::write(d.pool().join("pvc-a/sub/f"), b"payload").unwrap();
    let mut c = exact("pvc-b", 2 * GIB);
    c.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: "pvc-a".into(),
        })),
    });
    let v =
        d.c.controller
            .create_volume(c)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.capacity_bytes, 2 * GIB);
    assert_eq!(
        std::fs::read(d.pool().join("pvc-b/sub/f")).unwrap(),
        b"payload"
    );
    let mut missing = exact("pvc-c", GIB);
    missing.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: "fake-vol-id-12345".into(),
        })),
    });
    assert_eq!(
        code(&d.c.controller.create_volume(missing).await),
        Code::NotFound
    );
    let mut smaller = exact("pvc-d", GIB / 2);
    smaller.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: "pvc-a".into(),
        })),
    });
    assert_eq!(
        code(&d.c.controller.create_volume(smaller).await),
        Code::OutOfRange
    );
    assert!(!d.pool().join("pvc-c").exists() && !d.pool().join("pvc-d").exists());
    // What a failed create built is removed in the background.
    let tmp = d.pool().join(".hostpath-csi/tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&tmp).unwrap().next().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "leftovers stay in {}",
            tmp.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn concurrent_creates_of_one_name_make_one_volume() {
    let d = Driver::start().await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = d.c.controller.clone();
        tasks.push(tokio::spawn(async move {
            c.create_volume(create_req("pvc-race", GIB, rwo())).await
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
    let target = d.path("pods/uid/volumes/scratch");
    let mut context = params(&[
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "vm-launcher"),
        ("size", "1Gi"),
    ]);
    let req = NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(rwo()),
        volume_context: context.clone(),
        ..Default::default()
    };
    d.c.node.node_publish_volume(req.clone()).await.unwrap();
    d.c.node.node_publish_volume(req.clone()).await.unwrap();
    std::fs::write(target.join("scratch"), b"tmp").unwrap();
    // Pod authors size it, so it is a hard limit: an image volume.
    assert!(d.pool().join("csi-0123456789abcdef").is_file());
    assert_eq!(mounts_under(&target), vec![target.clone()]);
    let v =
        d.c.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "csi-0123456789abcdef".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(v.volume.unwrap().capacity_bytes, GIB);
    d.c.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: "csi-0123456789abcdef".into(),
            target_path: target.to_string_lossy().into(),
        })
        .await
        .unwrap();
    assert!(
        !d.pool().join("csi-0123456789abcdef").exists(),
        "ephemeral volume removed with its last publish"
    );
    assert!(!target.exists());
    // Above the node's cap (serve --max-ephemeral-size, 1Gi by default).
    context.insert("size".into(), "2Gi".into());
    let mut bad = req;
    bad.volume_context = context;
    assert_eq!(
        code(&d.c.node.node_publish_volume(bad).await),
        Code::InvalidArgument
    );
    assert!(!d.pool().join("csi-0123456789abcdef").exists());
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
    let r =
        d.c.group
            .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest::default())
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.group
            .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                name: "g".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::InvalidArgument, "no source volumes");
    let r =
        d.c.group
            .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest::default())
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.group
            .get_volume_group_snapshot(GetVolumeGroupSnapshotRequest {
                group_snapshot_id: "fake-vol-id".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::NotFound);
    let r =
        d.c.group
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest::default())
            .await;
    assert_eq!(code(&r), Code::InvalidArgument);
    let r =
        d.c.group
            .delete_volume_group_snapshot(DeleteVolumeGroupSnapshotRequest {
                group_snapshot_id: "fake-vol-id".into(),
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::Ok);
    let r =
        d.c.group
            .create_volume_group_snapshot(CreateVolumeGroupSnapshotRequest {
                name: "g".into(),
                source_volume_ids: vec!["missing-vol".into()],
                ..Default::default()
            })
            .await;
    assert_eq!(code(&r), Code::NotFound);
}

/// csi-sanity's node flow with `--csi.testvolumeaccesstype=block`.
#[tokio::test]
async fn node_full_cycle_with_block_access() {
    let mut d = Driver::start().await;
    let cap = block_cap(Mode::SingleNodeWriter);
    let mut req = exact("pvc-node-block", SIZE);
    req.volume_capabilities = vec![cap.clone()];
    let v =
        d.c.controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    let mount_dir = d.path("csi-mount");
    let staging = d.path("csi-staging");
    std::fs::create_dir(&mount_dir).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let target = mount_dir.join("target");
    for _ in 0..10 {
        d.c.node
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_string_lossy().into(),
                volume_capability: Some(cap.clone()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let publish = NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..10 {
        d.c.node.node_publish_volume(publish.clone()).await.unwrap();
    }
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
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: SIZE + GIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    assert!(r.node_expansion_required);
    let r =
        d.c.node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                volume_path: target.to_string_lossy().into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: SIZE + GIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, SIZE + GIB);
    d.c.node
        .node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    assert!(
        !target.exists(),
        "unpublish must remove the file it created"
    );
    d.c.node
        .node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    assert!(loops_under(d.pool()).is_empty());
    d.c.controller
        .delete_volume(delete_req(&v.volume_id))
        .await
        .unwrap();
}

/// csi-sanity's node flow with `--csi.testvolumeparameters` asking for
/// `layout: image` (a loop-mounted XFS with a hard size limit).
#[tokio::test]
async fn node_full_cycle_with_image_layout() {
    let mut d = Driver::start().await;
    let mut req = exact("pvc-node-image", SIZE);
    req.parameters = params(&[("layout", "image")]);
    let v =
        d.c.controller
            .create_volume(req.clone())
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
    assert_eq!(v.capacity_bytes, SIZE);
    // Creating it again returns the same volume.
    d.c.controller.create_volume(req).await.unwrap();
    let staging = d.path("csi-staging");
    let mount_dir = d.path("csi-mount");
    std::fs::create_dir(&staging).unwrap();
    std::fs::create_dir(&mount_dir).unwrap();
    let target = mount_dir.join("target");
    let stage = NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(rwo()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..10 {
        d.c.node.node_stage_volume(stage.clone()).await.unwrap();
    }
    let publish = NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: target.to_string_lossy().into(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(rwo()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..10 {
        d.c.node.node_publish_volume(publish.clone()).await.unwrap();
    }
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
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: SIZE + GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    d.c.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.to_string_lossy().into(),
            capacity_range: Some(CapacityRange {
                required_bytes: SIZE + GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let fs_size = nix::sys::statvfs::statvfs(&target).unwrap();
    assert!(
        fs_size.blocks() * fs_size.fragment_size() > SIZE as u64,
        "the filesystem grew online"
    );
    d.c.node
        .node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    assert!(!target.exists());
    d.c.node
        .node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    assert!(mounts_under(d.dir.path()).is_empty());
    assert!(loops_under(d.pool()).is_empty());
    d.c.controller
        .delete_volume(delete_req(&v.volume_id))
        .await
        .unwrap();
}
