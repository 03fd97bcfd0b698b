//! Per-pool objects: a StorageClass each, and for pvcTemplate pools a PVC
//! and a privileged mounter Deployment per node (§6 of the design).

use serde_json::{json, Value};

use super::names::{
    is_dns_subdomain, object_name, upstream_pool_claim, upstream_pool_label, upstream_shared_claim,
};
use super::node::{
    host_path_volume, labels, place, pod_annotations, requests, Context, MOUNTER_SA,
};
use super::{Pool, RenderError, APP_NAME};
use crate::config::cr::{PvcTemplate, Workload};
use crate::config::ConfigError;
use crate::DEFAULT_DRIVER_NAME;

/// Annotation naming the pool an object was rendered for.
pub(crate) const POOL_ANNOTATION: &str = "hostpath.csi/pool";
const NODE_ANNOTATION: &str = "hostpath.csi/node";
/// Where the mounter sees the host's root.
const HOST_ROOT: &str = "/host";
const BLOCK_SOURCE: &str = "/dev/data";
const DIR_SOURCE: &str = "/source";
/// Upstream's label on pool claims (its status reads claims by it).
const POOL_LABEL: &str = "kubevirt.io.hostpath-provisioner/storagePool";
/// Upstream's StorageClass for a shared pool when overlayClassName is unset.
const DEFAULT_OVERLAY_CLASS: &str = "hpp-overlay";

/// The claim upstream's operator made, so migration reuses the pool disk
/// that holds the data. A name the API server would refuse (a pool name
/// with `_` or capitals) upstream could never have made: then a sanitized
/// name, with a warning.
fn claim_name(upstream: String, parts: &[&str], at: &str, warnings: &mut Vec<String>) -> String {
    if is_dns_subdomain(&upstream) {
        return upstream;
    }
    let fallback = object_name(parts);
    warnings.push(format!(
        "{at}: {upstream:?} is not a valid object name, so the claim is named {fallback:?} (upstream's operator could not have made one for this pool)"
    ));
    fallback
}

pub(crate) fn storage_class_name(pool: &str) -> String {
    object_name(&[APP_NAME, pool])
}

pub(crate) fn pool_objects(
    ctx: &Context<'_>,
    pools: &[Pool<'_>],
    nodes: &[String],
    warnings: &mut Vec<String>,
) -> Result<Vec<Value>, RenderError> {
    let class_names: Vec<String> = pools.iter().map(|p| storage_class_name(&p.name)).collect();
    let mut out: Vec<Value> = pools
        .iter()
        .zip(&class_names)
        .map(|(p, sc)| storage_class(p, sc))
        .collect();
    for pool in pools {
        let Some(template) = pool.template else {
            continue;
        };
        if let Some(sc) = &template.storage_class_name {
            if class_names.contains(sc) {
                return Err(ConfigError::new(
                    format!("{}.pvcTemplate.storageClassName", pool.at),
                    format!("{sc:?} is a class of this provisioner; a pool cannot live on its own volumes"),
                )
                .into());
            }
        }
        if nodes.is_empty() {
            warnings.push(format!(
                "{}: pool {:?} has a pvcTemplate but no --nodes were given, so no PVC or mounter is rendered for it",
                pool.at, pool.name
            ));
        }
        let shared_claim = pool.shared.then(|| {
            claim_name(
                upstream_shared_claim(&pool.name),
                &["hpp-pool", &pool.name, "shared"],
                &pool.at,
                warnings,
            )
        });
        if let (Some(claim), false) = (&shared_claim, nodes.is_empty()) {
            out.push(claim_object(ctx, pool, template, claim, None));
            out.push(overlay_class(pool));
        }
        for node in nodes {
            let name = claim_name(
                upstream_pool_claim(&pool.name, node),
                &["hpp-pool", &pool.name, node],
                &pool.at,
                warnings,
            );
            let claim = match &shared_claim {
                Some(shared) => shared.clone(),
                None => {
                    out.push(claim_object(ctx, pool, template, &name, Some(node)));
                    name.clone()
                }
            };
            out.push(mounter(ctx, pool, template, &name, &claim, node));
        }
    }
    Ok(out)
}

fn annotations(pool: &Pool<'_>, node: Option<&str>) -> Value {
    let mut a = json!({ POOL_ANNOTATION: pool.name });
    if let Some(node) = node {
        a[NODE_ANNOTATION] = json!(node);
    }
    a
}

fn storage_class(pool: &Pool<'_>, name: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": name,
            "labels": labels("storage-class"),
            "annotations": annotations(pool, None),
        },
        "provisioner": DEFAULT_DRIVER_NAME,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
        "allowVolumeExpansion": true,
        "parameters": {"storagePool": pool.name},
    })
}

/// The Immediate-binding class upstream makes for a shared pool: its
/// volumes are on every node, so they need no topology.
fn overlay_class(pool: &Pool<'_>) -> Value {
    let name = pool
        .overlay_class_name
        .as_deref()
        .unwrap_or(DEFAULT_OVERLAY_CLASS);
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {
            "name": name,
            "labels": labels("storage-class"),
            "annotations": annotations(pool, None),
        },
        "provisioner": DEFAULT_DRIVER_NAME,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
        "parameters": {"storagePool": pool.name, "overlayCSI": "true"},
    })
}

fn claim_object(
    ctx: &Context<'_>,
    pool: &Pool<'_>,
    t: &PvcTemplate,
    name: &str,
    node: Option<&str>,
) -> Value {
    let mut spec = json!({
        "accessModes": if t.access_modes.is_empty() { vec!["ReadWriteOnce".to_owned()] } else { t.access_modes.clone() },
        "volumeMode": t.volume_mode.as_deref().unwrap_or("Filesystem"),
        "resources": serde_json::to_value(&t.resources).expect("resources serialize"),
    });
    if let Some(sc) = &t.storage_class_name {
        spec["storageClassName"] = json!(sc);
    }
    if let Some(selector) = &t.selector {
        spec["selector"] = selector.clone();
    }
    // Passed on as upstream does: the whole template is the claim's spec.
    if let Some(v) = &t.data_source {
        spec["dataSource"] = v.clone();
    }
    if let Some(v) = &t.data_source_ref {
        spec["dataSourceRef"] = v.clone();
    }
    if let Some(v) = &t.volume_name {
        spec["volumeName"] = json!(v);
    }
    if let Some(v) = &t.volume_attributes_class_name {
        spec["volumeAttributesClassName"] = json!(v);
    }
    let mut claim_labels = labels("pool-storage");
    // Upstream's labels: its status lists a pool's claims by these, so after
    // a rollback to the operator it finds (and reuses) them.
    claim_labels[POOL_LABEL] = json!(upstream_pool_label(&pool.name));
    claim_labels["k8s-app"] = json!("hostpath-provisioner");
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": name,
            "namespace": ctx.namespace,
            "labels": claim_labels,
            "annotations": annotations(pool, node),
        },
        "spec": spec,
    })
}

/// Pins a pod to `node` by node name through the scheduler (not `nodeName`),
/// so WaitForFirstConsumer claims still bind; ANDed with any CR affinity.
fn pin_to_node(workload: &Workload, node: &str) -> Value {
    let field = json!({"key": "metadata.name", "operator": "In", "values": [node]});
    let mut affinity = workload.affinity.clone().unwrap_or_else(|| json!({}));
    if !affinity.is_object() {
        affinity = json!({});
    }
    let terms = &mut affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    match terms.as_array_mut() {
        Some(list) if !list.is_empty() => {
            for term in list {
                if !term["matchFields"].is_array() {
                    term["matchFields"] = json!([]);
                }
                term["matchFields"]
                    .as_array_mut()
                    .expect("just made an array")
                    .push(field.clone());
            }
        }
        _ => *terms = json!([{ "matchFields": [field] }]),
    }
    affinity
}

fn pod_meta_annotations(ctx: &Context<'_>, pool: &Pool<'_>, node: &str) -> Value {
    let mut a = annotations(pool, Some(node));
    if let Some(Value::Object(scc)) = pod_annotations(ctx) {
        a.as_object_mut()
            .expect("annotations are a map")
            .extend(scc);
    }
    a
}

fn mounter(
    ctx: &Context<'_>,
    pool: &Pool<'_>,
    t: &PvcTemplate,
    name: &str,
    claim: &str,
    node: &str,
) -> Value {
    let block = t.volume_mode.as_deref() == Some("Block");
    let source = if block { BLOCK_SOURCE } else { DIR_SOURCE };
    let mut container = json!({
        "name": "mounter",
        "image": ctx.image,
        "imagePullPolicy": ctx.pull_policy,
        "command": ["hostpath-csi"],
        "args": [
            "pool", "mount",
            "--source", source,
            "--target", pool.csi_path,
            "--host-root", HOST_ROOT,
            "--watch",
        ],
        "securityContext": {"privileged": true, "runAsUser": 0},
        "lifecycle": {
            // Refused (and so harmless) while volumes of the pool are published.
            "preStop": {"exec": {"command": [
                "hostpath-csi", "pool", "unmount",
                "--target", pool.csi_path,
                "--host-root", HOST_ROOT,
            ]}},
        },
        "resources": requests("100Mi"),
        "volumeMounts": [
            {"name": "host-root", "mountPath": HOST_ROOT, "mountPropagation": "Bidirectional"},
        ],
    });
    if block {
        container["volumeDevices"] = json!([{"name": "data", "devicePath": BLOCK_SOURCE}]);
    } else {
        container["volumeMounts"]
            .as_array_mut()
            .expect("mounts are an array")
            .push(json!({"name": "data", "mountPath": DIR_SOURCE}));
    }
    let mut pod = json!({
        "serviceAccountName": MOUNTER_SA,
        "automountServiceAccountToken": false,
        "containers": [container],
        "volumes": [
            host_path_volume("host-root", "/", "Directory"),
            {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
        ],
    });
    place(&mut pod, &ctx.workload);
    pod["affinity"] = pin_to_node(&ctx.workload, node);
    let mut pod_labels = labels("pool-mounter");
    pod_labels["app.kubernetes.io/instance"] = json!(name);
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": ctx.namespace,
            "labels": labels("pool-mounter"),
            "annotations": annotations(pool, Some(node)),
        },
        "spec": {
            "replicas": 1,
            // Never two mounters of one claim at once.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {
                "app.kubernetes.io/name": APP_NAME,
                "app.kubernetes.io/component": "pool-mounter",
                "app.kubernetes.io/instance": name,
            }},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_meta_annotations(ctx, pool, node)},
                "spec": pod,
            },
        },
    })
}
