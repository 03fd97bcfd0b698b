//! The cluster-wide part of an install: Namespace, CSIDriver, RBAC and the
//! DaemonSet that runs the driver with its sidecars on every node.

use serde::Serialize;
use serde_json::{json, Value};

use super::{
    Pool, APP_NAME, LIVENESSPROBE_IMAGE, PROVISIONER_IMAGE, REGISTRAR_IMAGE, RESIZER_IMAGE,
    SNAPSHOTTER_IMAGE,
};
use crate::config::cr::Workload;
use crate::DEFAULT_DRIVER_NAME;

const KUBELET_DIR: &str = "/var/lib/kubelet";
const SOCKET_DIR: &str = "/csi";
const SOCKET: &str = "/csi/csi.sock";
const HEALTH_PORT: u16 = 9898;

pub(crate) struct Context<'a> {
    pub namespace: &'a str,
    pub image: &'a str,
    pub pull_policy: &'a str,
    pub workload: Workload,
}

pub(crate) fn labels(component: &str) -> Value {
    json!({
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": APP_NAME,
    })
}

/// Adds the CR's `spec.workload` placement to a pod spec.
pub(crate) fn place(pod: &mut Value, workload: &Workload) {
    if !workload.node_selector.is_empty() {
        pod["nodeSelector"] = json!(workload.node_selector);
    }
    if let Some(affinity) = &workload.affinity {
        pod["affinity"] = affinity.clone();
    }
    if !workload.tolerations.is_empty() {
        pod["tolerations"] = json!(workload.tolerations);
    }
}

/// One entry of `--datadir`, the driver's upstream-compatible pool list.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DataDir<'a> {
    name: &'a str,
    path: &'a str,
    shared: bool,
    /// pvcTemplate pools: the driver waits for the mounter's mount.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    require_mount: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_provider: Option<&'a str>,
}

pub(crate) fn datadir_json(pools: &[Pool<'_>]) -> String {
    let entries: Vec<DataDir<'_>> = pools
        .iter()
        .map(|p| DataDir {
            name: &p.name,
            path: &p.csi_path,
            shared: p.shared,
            require_mount: p.template.is_some(),
            snapshot_provider: p.snapshot_provider.as_deref(),
        })
        .collect();
    serde_json::to_string(&entries).expect("pool list serializes")
}

pub(crate) fn install_objects(ctx: &Context<'_>, pools: &[Pool<'_>]) -> Vec<Value> {
    vec![
        namespace(ctx),
        csi_driver(),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("rbac")},
        }),
        cluster_role(),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": APP_NAME, "labels": labels("rbac")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": APP_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": APP_NAME, "namespace": ctx.namespace}],
        }),
        role(ctx),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("rbac")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": APP_NAME},
            "subjects": [{"kind": "ServiceAccount", "name": APP_NAME, "namespace": ctx.namespace}],
        }),
        daemon_set(ctx, pools),
    ]
}

fn namespace(ctx: &Context<'_>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": ctx.namespace,
            "labels": {
                "app.kubernetes.io/part-of": APP_NAME,
                // The driver and the pool mounters are privileged pods.
                "pod-security.kubernetes.io/enforce": "privileged",
            },
        },
    })
}

fn csi_driver() -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIDriver",
        "metadata": {"name": DEFAULT_DRIVER_NAME, "labels": labels("driver")},
        "spec": {
            "attachRequired": false,
            "podInfoOnMount": true,
            "storageCapacity": true,
            "fsGroupPolicy": "File",
            "volumeLifecycleModes": ["Persistent", "Ephemeral"],
        },
    })
}

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": [group], "resources": resources, "verbs": verbs})
}

const READ: &[&str] = &["get", "list", "watch"];

/// What csi-provisioner, csi-resizer and csi-snapshotter need cluster-wide.
fn cluster_role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": APP_NAME, "labels": labels("rbac")},
        "rules": [
            rule("", &["persistentvolumes"], &["get", "list", "watch", "create", "delete", "update", "patch"]),
            rule("", &["persistentvolumeclaims"], &["get", "list", "watch", "update", "patch"]),
            rule("", &["persistentvolumeclaims/status"], &["update", "patch"]),
            rule("", &["events"], &["get", "list", "watch", "create", "update", "patch"]),
            rule("", &["nodes"], READ),
            rule("storage.k8s.io", &["storageclasses", "csinodes", "volumeattachments", "volumeattributesclasses"], READ),
            rule("snapshot.storage.k8s.io", &["volumesnapshotclasses"], READ),
            rule("snapshot.storage.k8s.io", &["volumesnapshots"], &["get", "list", "watch", "update", "patch"]),
            rule("snapshot.storage.k8s.io", &["volumesnapshotcontents"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
            rule("snapshot.storage.k8s.io", &["volumesnapshotcontents/status"], &["update", "patch"]),
        ],
    })
}

/// Namespaced needs: storage capacity objects (owned by the DaemonSet), and
/// the resizer's leader election lease.
fn role(ctx: &Context<'_>) -> Value {
    let all = &[
        "get", "list", "watch", "create", "update", "patch", "delete",
    ];
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("rbac")},
        "rules": [
            rule("storage.k8s.io", &["csistoragecapacities"], all),
            rule("coordination.k8s.io", &["leases"], all),
            rule("", &["pods"], &["get"]),
            rule("apps", &["daemonsets"], &["get"]),
        ],
    })
}

fn env_field(name: &str, path: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}})
}

fn socket_mount() -> Value {
    json!({"name": "socket-dir", "mountPath": SOCKET_DIR})
}

fn sidecar(ctx: &Context<'_>, name: &str, image: &str, args: &[&str], env: Vec<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "image": image,
        "imagePullPolicy": ctx.pull_policy,
        "args": args,
        "volumeMounts": [socket_mount()],
    });
    if !env.is_empty() {
        c["env"] = Value::Array(env);
    }
    c
}

fn daemon_set(ctx: &Context<'_>, pools: &[Pool<'_>]) -> Value {
    let socket_host_dir = format!("{KUBELET_DIR}/plugins/{DEFAULT_DRIVER_NAME}");
    let registration_path = format!("--kubelet-registration-path={socket_host_dir}/csi.sock");
    let csi_address = format!("--csi-address={SOCKET}");
    let health_port = format!("--health-port={HEALTH_PORT}");
    let endpoint = format!("unix://{SOCKET}");
    let datadir = datadir_json(pools);

    let mut driver_mounts = vec![
        socket_mount(),
        json!({"name": "kubelet-dir", "mountPath": KUBELET_DIR, "mountPropagation": "Bidirectional"}),
        json!({"name": "dev-dir", "mountPath": "/dev"}),
    ];
    let mut volumes = vec![
        host_path_volume("socket-dir", &socket_host_dir, "DirectoryOrCreate"),
        host_path_volume(
            "registration-dir",
            &format!("{KUBELET_DIR}/plugins_registry"),
            "Directory",
        ),
        host_path_volume("kubelet-dir", KUBELET_DIR, "Directory"),
        host_path_volume("dev-dir", "/dev", "Directory"),
    ];
    for (i, pool) in pools.iter().enumerate() {
        let name = format!("pool-{i}");
        // HostToContainer, so a pvcTemplate mounter's later mount shows up here.
        driver_mounts.push(json!({
            "name": name,
            "mountPath": pool.host_path,
            "mountPropagation": "HostToContainer",
        }));
        volumes.push(host_path_volume(
            &name,
            &pool.host_path,
            "DirectoryOrCreate",
        ));
    }

    let driver = json!({
        "name": "hostpath-csi",
        "image": ctx.image,
        "imagePullPolicy": ctx.pull_policy,
        "command": ["hostpath-csi"],
        "args": [
            "serve",
            "--endpoint", endpoint,
            "--nodeid", "$(NODE_NAME)",
            "--drivername", DEFAULT_DRIVER_NAME,
            "--datadir", datadir,
            "--node-only-expansion",
        ],
        "env": [env_field("NODE_NAME", "spec.nodeName")],
        "securityContext": {"privileged": true},
        "ports": [{"name": "healthz", "containerPort": HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "healthz"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 5,
        },
        "volumeMounts": driver_mounts,
    });

    let mut registrar = sidecar(
        ctx,
        "node-driver-registrar",
        REGISTRAR_IMAGE,
        &[&csi_address, &registration_path],
        vec![env_field("KUBE_NODE_NAME", "spec.nodeName")],
    );
    registrar["volumeMounts"]
        .as_array_mut()
        .expect("mounts are an array")
        .push(json!({"name": "registration-dir", "mountPath": "/registration"}));

    let containers = vec![
        driver,
        sidecar(
            ctx,
            "csi-provisioner",
            PROVISIONER_IMAGE,
            &[
                &csi_address,
                "--node-deployment",
                "--enable-capacity",
                "--capacity-for-immediate-binding",
                "--strict-topology",
                "--immediate-topology=false",
                "--extra-create-metadata",
                "--default-fstype=xfs",
            ],
            vec![
                env_field("NODE_NAME", "spec.nodeName"),
                env_field("NAMESPACE", "metadata.namespace"),
                env_field("POD_NAME", "metadata.name"),
            ],
        ),
        registrar,
        sidecar(
            ctx,
            "liveness-probe",
            LIVENESSPROBE_IMAGE,
            &[&csi_address, &health_port],
            vec![],
        ),
        // The resizer has no per-node mode: one leader serves the cluster.
        sidecar(
            ctx,
            "csi-resizer",
            RESIZER_IMAGE,
            &[
                &csi_address,
                "--leader-election",
                "--leader-election-namespace=$(NAMESPACE)",
            ],
            vec![env_field("NAMESPACE", "metadata.namespace")],
        ),
        // Per-node snapshots need the snapshot-controller's
        // --enable-distributed-snapshotting.
        sidecar(
            ctx,
            "csi-snapshotter",
            SNAPSHOTTER_IMAGE,
            &[&csi_address, "--node-deployment"],
            vec![env_field("NODE_NAME", "spec.nodeName")],
        ),
    ];

    let selector = json!({
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/component": "node-plugin",
    });
    let mut pod = json!({
        "serviceAccountName": APP_NAME,
        "priorityClassName": "system-node-critical",
        "containers": containers,
        "volumes": volumes,
    });
    place(&mut pod, &ctx.workload);
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("node-plugin")},
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels("node-plugin")},
                "spec": pod,
            },
        },
    })
}

pub(crate) fn host_path_volume(name: &str, path: &str, kind: &str) -> Value {
    json!({"name": name, "hostPath": {"path": path, "type": kind}})
}
