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
/// Upstream's metrics port with TLS.
pub(crate) const METRICS_PORT: u16 = 8443;
/// Pods the metrics Service selects (upstream's label and value).
pub(crate) const PROMETHEUS_LABEL: &str = "prometheus.hostpathprovisioner.kubevirt.io";
/// The metrics Service (upstream's name, so the operator's is replaced, not doubled).
pub(crate) const METRICS_SERVICE: &str = "hpp-prometheus-metrics";
/// The ServiceAccount of the pvcTemplate pool mounters.
pub(crate) const MOUNTER_SA: &str = "hostpath-csi-mounter";
/// OpenShift: the SCC a pod must be admitted under.
pub(crate) const REQUIRED_SCC_ANNOTATION: &str = "openshift.io/required-scc";

pub(crate) struct Context<'a> {
    pub namespace: &'a str,
    pub image: &'a str,
    pub pull_policy: &'a str,
    pub workload: Workload,
    pub openshift: bool,
    /// The snapshot-controller labels snapshot contents with their node.
    pub distributed_snapshotting: bool,
    /// Some pool has a pvcTemplate, so there are mounter pods.
    pub mounters: bool,
    /// The CSIDriver offers inline ephemeral volumes.
    pub ephemeral: bool,
}

/// Requests as upstream's (daemonset.go): each container 10m CPU, 150Mi.
pub(crate) fn requests(memory: &str) -> Value {
    json!({"requests": {"cpu": "10m", "memory": memory}})
}

/// OpenShift admits the pod only under this driver's SCC.
pub(crate) fn pod_annotations(ctx: &Context<'_>) -> Option<Value> {
    ctx.openshift
        .then(|| json!({ REQUIRED_SCC_ANNOTATION: super::openshift::SCC_NAME }))
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
    /// Where upstream's operator puts a snapshot provider's snapshots, so
    /// the Go driver's are found (and never taken for a volume).
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_path: Option<String>,
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
            snapshot_path: p
                .snapshot_provider
                .as_ref()
                .map(|_| format!("{}/{}", p.csi_path, crate::config::GO_SNAPSHOT_DIR)),
            snapshot_provider: p.snapshot_provider.as_deref(),
        })
        .collect();
    serde_json::to_string(&entries).expect("pool list serializes")
}

/// Everything up to the DaemonSet: Namespace, CSIDriver, ServiceAccounts, RBAC.
pub(crate) fn install_objects(ctx: &Context<'_>, _pools: &[Pool<'_>]) -> Vec<Value> {
    let mut objects = vec![
        namespace(ctx),
        csi_driver(ctx.ephemeral),
        json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("rbac")},
        }),
    ];
    if ctx.mounters {
        // Not `default`: the SCC grant names it, and it needs no API token.
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": MOUNTER_SA, "namespace": ctx.namespace, "labels": labels("rbac")},
            "automountServiceAccountToken": false,
        }));
    }
    objects.extend([
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
    ]);
    objects
}

fn namespace(ctx: &Context<'_>) -> Value {
    let mut ns = json!({
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
    });
    if ctx.openshift {
        // The platform Prometheus only reads ServiceMonitors and rules in
        // namespaces that carry this label (openshift-cnv does).
        ns["metadata"]["labels"]["openshift.io/cluster-monitoring"] = json!("true");
    }
    ns
}

fn csi_driver(ephemeral: bool) -> Value {
    // Inline ephemeral volumes are sized by pod authors: only when asked.
    let modes: &[&str] = if ephemeral {
        &["Persistent", "Ephemeral"]
    } else {
        &["Persistent"]
    };
    json!({
        "apiVersion": "storage.k8s.io/v1",
        "kind": "CSIDriver",
        "metadata": {"name": DEFAULT_DRIVER_NAME, "labels": labels("driver")},
        "spec": {
            "attachRequired": false,
            "podInfoOnMount": true,
            "storageCapacity": true,
            "fsGroupPolicy": "File",
            "volumeLifecycleModes": modes,
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
            // csi-resizer watches every pod (--handle-volume-inuse-error, on
            // by default) and starts no worker until that cache syncs.
            rule("", &["pods"], READ),
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

/// A sidecar on the socket. Privileged where upstream (and OpenShift's own
/// CSI node plugins) make it so: under SELinux an unprivileged container
/// cannot use the privileged driver's socket or write the registration dir.
fn sidecar(
    ctx: &Context<'_>,
    name: &str,
    image: &str,
    args: &[&str],
    env: Vec<Value>,
    privileged: bool,
) -> Value {
    let mut c = json!({
        "name": name,
        "image": image,
        "imagePullPolicy": ctx.pull_policy,
        "args": args,
        "resources": requests("150Mi"),
        "volumeMounts": [socket_mount()],
    });
    if !env.is_empty() {
        c["env"] = Value::Array(env);
    }
    if privileged {
        c["securityContext"] = json!({"privileged": true});
    }
    c
}

fn socket_host_dir() -> String {
    format!("{KUBELET_DIR}/plugins/{DEFAULT_DRIVER_NAME}")
}

/// Host volumes of the pod, and the driver's mounts of them.
fn host_volumes(pools: &[Pool<'_>]) -> (Vec<Value>, Vec<Value>) {
    let mut driver_mounts = vec![
        socket_mount(),
        json!({"name": "kubelet-dir", "mountPath": KUBELET_DIR, "mountPropagation": "Bidirectional"}),
        json!({"name": "dev-dir", "mountPath": "/dev"}),
    ];
    let mut volumes = vec![
        host_path_volume("socket-dir", &socket_host_dir(), "DirectoryOrCreate"),
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
    (volumes, driver_mounts)
}

fn driver_container(ctx: &Context<'_>, pools: &[Pool<'_>], mounts: Vec<Value>) -> Value {
    json!({
        "name": "hostpath-csi",
        "image": ctx.image,
        "imagePullPolicy": ctx.pull_policy,
        "command": ["hostpath-csi"],
        "args": [
            "serve",
            "--endpoint", format!("unix://{SOCKET}"),
            "--nodeid", "$(NODE_NAME)",
            "--drivername", DEFAULT_DRIVER_NAME,
            "--datadir", datadir_json(pools),
            "--node-only-expansion",
            // HTTPS on [::]:8443 with a self-signed certificate, as upstream.
            "--metrics-tls-version=VersionTLS13",
        ],
        "env": [
            env_field("NODE_NAME", "spec.nodeName"),
            // The self-signed certificate names the pod and the Service.
            env_field("POD_IP", "status.podIP"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            {"name": "SERVICE_NAME", "value": METRICS_SERVICE},
        ],
        "securityContext": {"privileged": true},
        "resources": requests("150Mi"),
        "ports": [
            {"name": "healthz", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "healthz"},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 5,
        },
        "volumeMounts": mounts,
    })
}

/// Snapshots are taken by the node that holds the volume: csi-snapshotter
/// with --node-deployment only sees contents labelled with its node. The
/// snapshot-controller sets that label with distributed snapshotting;
/// where it does not (OpenShift), `hostpath-csi snapshot-labeler` does.
fn snapshot_containers(ctx: &Context<'_>, csi_address: &str) -> Vec<Value> {
    let mut containers = vec![sidecar(
        ctx,
        "csi-snapshotter",
        SNAPSHOTTER_IMAGE,
        &[csi_address, "--node-deployment"],
        vec![env_field("NODE_NAME", "spec.nodeName")],
        true,
    )];
    if !ctx.distributed_snapshotting {
        let labeler = json!({
            "name": "snapshot-labeler",
            "image": ctx.image,
            "imagePullPolicy": ctx.pull_policy,
            "command": ["hostpath-csi"],
            "args": [
                "snapshot-labeler",
                "--endpoint", format!("unix://{SOCKET}"),
                "--node", "$(NODE_NAME)",
            ],
            "env": [env_field("NODE_NAME", "spec.nodeName")],
            "resources": requests("20Mi"),
            "securityContext": {"privileged": true},
            "volumeMounts": [socket_mount()],
        });
        containers.push(labeler);
    }
    containers
}

fn sidecars(ctx: &Context<'_>) -> Vec<Value> {
    let registration_path = format!("--kubelet-registration-path={}/csi.sock", socket_host_dir());
    let csi_address = format!("--csi-address={SOCKET}");
    let health_port = format!("--health-port={HEALTH_PORT}");
    let mut registrar = sidecar(
        ctx,
        "node-driver-registrar",
        REGISTRAR_IMAGE,
        &[&csi_address, &registration_path],
        vec![env_field("KUBE_NODE_NAME", "spec.nodeName")],
        true,
    );
    registrar["volumeMounts"]
        .as_array_mut()
        .expect("mounts are an array")
        .push(json!({"name": "registration-dir", "mountPath": "/registration"}));
    let mut containers = vec![
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
            true,
        ),
        registrar,
        sidecar(
            ctx,
            "liveness-probe",
            LIVENESSPROBE_IMAGE,
            &[&csi_address, &health_port],
            vec![],
            false,
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
            true,
        ),
    ];
    containers.extend(snapshot_containers(ctx, &csi_address));
    containers
}

pub(crate) fn daemon_set(ctx: &Context<'_>, pools: &[Pool<'_>]) -> Value {
    let (volumes, driver_mounts) = host_volumes(pools);
    let mut containers = vec![driver_container(ctx, pools, driver_mounts)];
    containers.extend(sidecars(ctx));
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
    let mut pod_labels = labels("node-plugin");
    pod_labels[PROMETHEUS_LABEL] = json!("true");
    let mut pod_meta = json!({"labels": pod_labels});
    if let Some(a) = pod_annotations(ctx) {
        pod_meta["annotations"] = a;
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": APP_NAME, "namespace": ctx.namespace, "labels": labels("node-plugin")},
        "spec": {
            "selector": {"matchLabels": selector},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": pod_meta,
                "spec": pod,
            },
        },
    })
}

pub(crate) fn host_path_volume(name: &str, path: &str, kind: &str) -> Value {
    json!({"name": name, "hostPath": {"path": path, "type": kind}})
}
