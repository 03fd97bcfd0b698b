//! Monitoring: the metrics Service (always), and, where the Prometheus
//! operator's CRDs exist, a ServiceMonitor, the alert rules and the Role
//! that lets `prometheus-k8s` discover the targets. Names are upstream's, so
//! applying over an operator install replaces its objects instead of
//! scraping the pods twice.

use serde_json::{json, Value};

use super::node::{labels, Context, METRICS_PORT, METRICS_SERVICE, PROMETHEUS_LABEL};
use super::APP_NAME;

const MONITORING_RBAC: &str = "hostpath-provisioner-monitoring";
const SERVICE_MONITOR: &str = "service-monitor-hpp";
const PROMETHEUS_RULE: &str = "prometheus-hpp-rules";
const RUNBOOKS: &str = "https://kubevirt.io/monitoring/runbooks/";
/// The gauge the driver exports for volumes whose condition is abnormal.
pub(crate) const ABNORMAL_VOLUMES_METRIC: &str = "hostpath_csi_abnormal_volumes";

fn monitoring_labels(component: &str) -> Value {
    let mut l = labels(component);
    l[PROMETHEUS_LABEL] = json!("true");
    l
}

pub(crate) fn service(ctx: &Context<'_>) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": METRICS_SERVICE,
            "namespace": ctx.namespace,
            "labels": monitoring_labels("monitoring"),
        },
        "spec": {
            "selector": {PROMETHEUS_LABEL: "true"},
            "ports": [{
                "name": "metrics",
                "port": METRICS_PORT,
                "targetPort": "metrics",
                "protocol": "TCP",
            }],
        },
    })
}

pub(crate) fn objects(ctx: &Context<'_>, prometheus_namespace: &str) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": MONITORING_RBAC, "namespace": ctx.namespace, "labels": monitoring_labels("monitoring")},
            "rules": [{"apiGroups": [""], "resources": ["services", "endpoints", "pods"], "verbs": ["get", "list", "watch"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": MONITORING_RBAC, "namespace": ctx.namespace, "labels": monitoring_labels("monitoring")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": MONITORING_RBAC},
            "subjects": [{"kind": "ServiceAccount", "name": "prometheus-k8s", "namespace": prometheus_namespace}],
        }),
        service_monitor(ctx),
        prometheus_rule(ctx),
    ]
}

fn service_monitor(ctx: &Context<'_>) -> Value {
    let mut l = monitoring_labels("monitoring");
    l["openshift.io/cluster-monitoring"] = json!("");
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": SERVICE_MONITOR, "namespace": ctx.namespace, "labels": l},
        "spec": {
            "selector": {"matchLabels": {PROMETHEUS_LABEL: "true"}},
            "namespaceSelector": {"matchNames": [ctx.namespace]},
            "endpoints": [{
                "port": "metrics",
                "path": "/metrics",
                "scheme": "https",
                // The driver's certificate is self-signed, as upstream's.
                "tlsConfig": {"insecureSkipVerify": true, "minVersion": "TLS13"},
            }],
        },
    })
}

/// Labels upstream puts on its alerts, so existing routing keeps working.
fn alert_labels(severity: &str, health_impact: &str) -> Value {
    json!({
        "severity": severity,
        "operator_health_impact": health_impact,
        "kubernetes_operator_part_of": "kubevirt",
        "kubernetes_operator_component": "hostpath-provisioner-operator",
    })
}

fn alert(name: &str, expr: String, duration: &str, summary: &str, labels: Value) -> Value {
    json!({
        "alert": name,
        "expr": expr,
        "for": duration,
        "annotations": {"summary": summary, "runbook_url": format!("{RUNBOOKS}{name}")},
        "labels": labels,
    })
}

fn prometheus_rule(ctx: &Context<'_>) -> Value {
    let ns = ctx.namespace;
    let ds = format!(r#"namespace="{ns}",daemonset="{APP_NAME}""#);
    let not_ready = format!(
        "(kube_daemonset_status_number_ready{{{ds}}} < kube_daemonset_status_desired_number_scheduled{{{ds}}}) or (up{{namespace=\"{ns}\",service=\"{METRICS_SERVICE}\"}} == 0)"
    );
    let rules = vec![
        alert(
            "HPPSharingPoolPathWithOS",
            "kubevirt_hpp_pool_path_shared_with_os == 1".into(),
            "1m",
            "A storage pool (or its snapshot path) is on the node's OS filesystem; its volumes can fill the OS disk.",
            alert_labels("warning", "warning"),
        ),
        alert(
            "HPPNotReady",
            not_ready,
            "5m",
            "Some nodes' hostpath CSI driver pods are not ready, or their metrics cannot be scraped; volumes cannot be provisioned or mounted there.",
            alert_labels("warning", "critical"),
        ),
        alert(
            "HPPAbnormalVolumes",
            format!("max by (namespace, pod, pool) ({ABNORMAL_VOLUMES_METRIC}) > 0"),
            "5m",
            "The hostpath CSI driver reports volumes whose backing directory, file or loop device is missing.",
            alert_labels("warning", "warning"),
        ),
    ];
    json!({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": PROMETHEUS_RULE, "namespace": ns, "labels": monitoring_labels("monitoring")},
        "spec": {"groups": [{"name": "hostpath-csi.rules", "rules": rules}]},
    })
}
