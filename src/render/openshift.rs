//! OpenShift admission: a SecurityContextConstraints shaped like upstream's
//! `hostpath-provisioner-csi`, granted by RBAC `use` to the driver's and the
//! mounters' ServiceAccounts (pods name it in `openshift.io/required-scc`).

use serde_json::{json, Value};

use super::node::{labels, Context, MOUNTER_SA};
use super::APP_NAME;

/// The SCC's name, which pods require by annotation.
pub(crate) const SCC_NAME: &str = APP_NAME;
const SCC_ROLE: &str = "hostpath-csi-scc";

pub(crate) fn objects(ctx: &Context<'_>) -> Vec<Value> {
    let mut subjects =
        vec![json!({"kind": "ServiceAccount", "name": APP_NAME, "namespace": ctx.namespace})];
    if ctx.mounters {
        subjects.push(
            json!({"kind": "ServiceAccount", "name": MOUNTER_SA, "namespace": ctx.namespace}),
        );
    }
    vec![
        scc(),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": SCC_ROLE, "labels": labels("rbac")},
            "rules": [{
                "apiGroups": ["security.openshift.io"],
                "resources": ["securitycontextconstraints"],
                "resourceNames": [SCC_NAME],
                "verbs": ["use"],
            }],
        }),
        // A namespaced binding: the grant holds for pods in this namespace only.
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": SCC_ROLE, "namespace": ctx.namespace, "labels": labels("rbac")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": SCC_ROLE},
            "subjects": subjects,
        }),
    ]
}

/// Privileged, host directories, any user/SELinux context/groups, every
/// volume type: what the driver and the mounters need, as upstream's SCC.
/// Unlike upstream's it does not force dropping MKNOD: the driver creates
/// loop device nodes the container's /dev lacks. The grant is RBAC, so
/// `users` and `groups` stay empty.
fn scc() -> Value {
    json!({
        "apiVersion": "security.openshift.io/v1",
        "kind": "SecurityContextConstraints",
        "metadata": {
            "name": SCC_NAME,
            "labels": labels("rbac"),
            "annotations": {
                "kubernetes.io/description": "hostpath-csi: the CSI driver and the pvcTemplate pool mounters (privileged, host paths).",
            },
        },
        "allowPrivilegedContainer": true,
        "allowPrivilegeEscalation": true,
        "allowHostDirVolumePlugin": true,
        "allowHostIPC": false,
        "allowHostNetwork": false,
        "allowHostPID": false,
        "allowHostPorts": false,
        "readOnlyRootFilesystem": false,
        "allowedCapabilities": null,
        "defaultAddCapabilities": null,
        "requiredDropCapabilities": ["KILL", "SETUID", "SETGID"],
        "priority": null,
        "runAsUser": {"type": "RunAsAny"},
        "seLinuxContext": {"type": "RunAsAny"},
        "fsGroup": {"type": "RunAsAny"},
        "supplementalGroups": {"type": "RunAsAny"},
        "volumes": ["*"],
        "users": [],
        "groups": [],
    })
}
