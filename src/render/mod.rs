//! `hostpath-csi render`: a HostPathProvisioner CR (plus node names) in, the
//! Kubernetes objects that run it out, as multi-document YAML. The output
//! depends on nothing but the inputs, so it can be checked into Git.

mod monitoring;
mod names;
mod node;
mod openshift;
mod pools;
mod yaml11;

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

use crate::config::cr::{HostPathProvisioner, PvcTemplate, CSI_SUBDIR, LEGACY_POOL};
use crate::config::ConfigError;

pub use names::{object_name, upstream_pool_claim, upstream_shared_claim};

pub const DEFAULT_NAMESPACE: &str = "hostpath-provisioner";
/// Name of the ServiceAccount, RBAC objects and DaemonSet.
pub const APP_NAME: &str = "hostpath-csi";
/// Sidecars, pinned to releases that support CSI 1.x and node deployment.
pub const PROVISIONER_IMAGE: &str = "registry.k8s.io/sig-storage/csi-provisioner:v5.3.0";
pub const REGISTRAR_IMAGE: &str = "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.15.0";
pub const LIVENESSPROBE_IMAGE: &str = "registry.k8s.io/sig-storage/livenessprobe:v2.17.0";
pub const RESIZER_IMAGE: &str = "registry.k8s.io/sig-storage/csi-resizer:v1.14.0";
pub const SNAPSHOTTER_IMAGE: &str = "registry.k8s.io/sig-storage/csi-snapshotter:v8.3.0";

/// The driver image when `--image` is not given (what deploy/Containerfile builds).
pub fn default_image() -> String {
    format!("localhost/hostpath-csi:{}", env!("CARGO_PKG_VERSION"))
}

/// The cluster the install is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Platform {
    /// Plain Kubernetes: no OpenShift objects.
    #[default]
    Kubernetes,
    /// OpenShift: SecurityContextConstraints and their grants, the
    /// required-scc annotation, cluster monitoring, driver-labelled snapshots.
    Openshift,
}

/// What besides the CR shapes the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderOptions {
    pub namespace: String,
    pub image: String,
    /// Nodes that get a PVC and a mounter per pvcTemplate pool.
    pub nodes: Vec<String>,
    pub platform: Platform,
    /// ServiceMonitor, PrometheusRule and the Prometheus RBAC (they need the
    /// Prometheus operator's CRDs); always on for OpenShift.
    pub monitoring: bool,
    /// Namespace of the `prometheus-k8s` ServiceAccount that scrapes;
    /// `monitoring` on Kubernetes, `openshift-monitoring` on OpenShift.
    pub monitoring_namespace: Option<String>,
    /// Whether the cluster's snapshot-controller runs with
    /// `--enable-distributed-snapshotting` (it labels each snapshot content
    /// with its node). When it does not (OpenShift's), the driver pods label
    /// them. Default: yes on Kubernetes, no on OpenShift.
    pub distributed_snapshotting: Option<bool>,
    /// Offer CSI inline ephemeral volumes (pod authors size them; the driver
    /// caps and enforces their size). Off unless asked.
    pub ephemeral: bool,
}

impl Default for RenderOptions {
    fn default() -> Self {
        RenderOptions {
            namespace: DEFAULT_NAMESPACE.into(),
            image: default_image(),
            nodes: Vec::new(),
            platform: Platform::Kubernetes,
            monitoring: false,
            monitoring_namespace: None,
            distributed_snapshotting: None,
            ephemeral: false,
        }
    }
}

impl RenderOptions {
    fn openshift(&self) -> bool {
        self.platform == Platform::Openshift
    }

    fn monitoring_objects(&self) -> bool {
        self.monitoring || self.openshift()
    }

    fn monitoring_namespace(&self) -> String {
        self.monitoring_namespace
            .clone()
            .unwrap_or_else(|| match self.platform {
                Platform::Kubernetes => "monitoring".into(),
                Platform::Openshift => "openshift-monitoring".into(),
            })
    }

    fn distributed_snapshotting(&self) -> bool {
        self.distributed_snapshotting.unwrap_or(!self.openshift())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("invalid HostPathProvisioner: {0}")]
    Config(#[from] ConfigError),
    #[error("{flag}: {message}")]
    Option { flag: String, message: String },
    #[error(
        "{kind} {name:?} would be rendered twice (from {first} and {second}); rename one of them"
    )]
    NameClash {
        kind: String,
        name: String,
        first: String,
        second: String,
    },
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    #[error("{0}")]
    Internal(String),
}

/// The rendered objects, and warnings for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub documents: Vec<Value>,
    pub warnings: Vec<String>,
}

/// One pool as render needs it.
pub(crate) struct Pool<'a> {
    /// Field path of the pool in the CR, for messages.
    pub at: String,
    pub name: String,
    /// The pool directory on the host (`spec.storagePools[].path`).
    pub host_path: String,
    /// Where the volumes live: `<host_path>/csi`.
    pub csi_path: String,
    pub shared: bool,
    pub snapshot_provider: Option<String>,
    pub overlay_class_name: Option<String>,
    pub template: Option<&'a PvcTemplate>,
}

fn pools(cr: &HostPathProvisioner) -> Vec<Pool<'_>> {
    if let (Some(pc), true) = (&cr.spec.path_config, cr.spec.storage_pools.is_empty()) {
        return vec![Pool {
            at: "spec.pathConfig".into(),
            name: LEGACY_POOL.into(),
            host_path: host_path(&pc.path),
            csi_path: csi_path(&pc.path),
            shared: false,
            snapshot_provider: None,
            overlay_class_name: None,
            template: None,
        }];
    }
    cr.spec
        .storage_pools
        .iter()
        .enumerate()
        .map(|(i, p)| Pool {
            at: format!("spec.storagePools[{i}]"),
            name: p.name.clone(),
            host_path: host_path(&p.path),
            csi_path: csi_path(&p.path),
            shared: p.pvc_template.as_ref().is_some_and(PvcTemplate::is_shared),
            snapshot_provider: p.snapshot_provider.clone(),
            overlay_class_name: p.overlay_class_name.clone(),
            template: p.pvc_template.as_ref(),
        })
        .collect()
}

/// Validation rules out `/`, so trimming never empties the path.
fn host_path(path: &str) -> String {
    path.trim_end_matches('/').to_owned()
}

fn csi_path(path: &str) -> String {
    PathBuf::from(host_path(path))
        .join(CSI_SUBDIR)
        .to_string_lossy()
        .into_owned()
}

fn option_error(flag: impl Into<String>, message: impl Into<String>) -> RenderError {
    RenderError::Option {
        flag: flag.into(),
        message: message.into(),
    }
}

fn check_options(opts: &RenderOptions) -> Result<(), RenderError> {
    if !names::is_dns_label(&opts.namespace) {
        return Err(option_error(
            "--namespace",
            format!(
                "{:?} is not a valid namespace name (lower-case letters, digits and '-', at most 63)",
                opts.namespace
            ),
        ));
    }
    if opts.image.is_empty() || opts.image.chars().any(char::is_whitespace) {
        return Err(option_error(
            "--image",
            format!("{:?} is not an image reference", opts.image),
        ));
    }
    if let Some(ns) = &opts.monitoring_namespace {
        if !names::is_dns_label(ns) {
            return Err(option_error(
                "--monitoring-namespace",
                format!("{ns:?} is not a valid namespace name"),
            ));
        }
    }
    for (i, node) in opts.nodes.iter().enumerate() {
        if !names::is_dns_subdomain(node) {
            return Err(option_error(
                format!("--nodes[{i}]"),
                format!("{node:?} is not a valid node name"),
            ));
        }
        if opts.nodes[..i].contains(node) {
            return Err(option_error(
                format!("--nodes[{i}]"),
                format!("{node:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

/// Renders every object for `cr`. The CR is validated first.
pub fn render(cr: &HostPathProvisioner, opts: &RenderOptions) -> Result<Rendered, RenderError> {
    let mut warnings = cr.validate()?;
    check_options(opts)?;
    let pools = pools(cr);
    let ctx = node::Context {
        namespace: &opts.namespace,
        image: &opts.image,
        pull_policy: cr
            .spec
            .image_pull_policy
            .as_deref()
            .unwrap_or("IfNotPresent"),
        workload: cr.spec.workload.clone().unwrap_or_default(),
        openshift: opts.openshift(),
        distributed_snapshotting: opts.distributed_snapshotting(),
        mounters: pools.iter().any(|p| p.template.is_some()),
        ephemeral: opts.ephemeral,
    };
    let mut documents = node::install_objects(&ctx, &pools);
    if ctx.openshift {
        documents.extend(openshift::objects(&ctx));
    }
    documents.push(node::daemon_set(&ctx, &pools));
    documents.push(monitoring::service(&ctx));
    if opts.monitoring_objects() {
        documents.extend(monitoring::objects(&ctx, &opts.monitoring_namespace()));
    }
    documents.extend(pools::pool_objects(
        &ctx,
        &pools,
        &opts.nodes,
        &mut warnings,
    )?);
    check_unique(&documents)?;
    Ok(Rendered {
        documents,
        warnings,
    })
}

/// Two objects of one kind and namespace must not share a name.
fn check_unique(documents: &[Value]) -> Result<(), RenderError> {
    let mut seen = BTreeSet::new();
    for doc in documents {
        let key = (
            doc["kind"].as_str().unwrap_or_default().to_owned(),
            doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            doc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        if !seen.insert(key.clone()) {
            let from = |d: &Value| {
                d["metadata"]["annotations"][pools::POOL_ANNOTATION]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned()
            };
            let first = documents
                .iter()
                .find(|d| {
                    d["kind"] == doc["kind"]
                        && d["metadata"]["name"] == doc["metadata"]["name"]
                        && d["metadata"]["namespace"] == doc["metadata"]["namespace"]
                })
                .map(from)
                .unwrap_or_default();
            return Err(RenderError::NameClash {
                kind: key.0,
                name: key.2,
                first,
                second: from(doc),
            });
        }
    }
    Ok(())
}

/// Multi-document YAML: a header comment, then `---` before each object.
pub fn to_yaml(documents: &[Value]) -> Result<String, RenderError> {
    let mut out = String::from(
        "# Rendered by `hostpath-csi render` from a HostPathProvisioner CR. Do not edit by hand.\n",
    );
    for doc in documents {
        let yaml = yaml11::quote_for_yaml11(doc, serde_norway::to_string(doc)?);
        // The quoting must not change what the document says.
        let back: Value = serde_norway::from_str(&yaml)?;
        if back != *doc {
            return Err(RenderError::Internal(format!(
                "YAML for {} {} does not read back the same",
                doc["kind"], doc["metadata"]["name"]
            )));
        }
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}

/// Parses, validates and renders a CR given as YAML text.
pub fn render_yaml(
    cr_yaml: &str,
    opts: &RenderOptions,
) -> Result<(String, Vec<String>), RenderError> {
    let (cr, _) = HostPathProvisioner::from_yaml(cr_yaml)?;
    let rendered = render(&cr, opts)?;
    Ok((to_yaml(&rendered.documents)?, rendered.warnings))
}

/// `hostpath-csi render`
#[derive(clap::Args, Debug)]
pub struct RenderArgs {
    /// The HostPathProvisioner CR (YAML file).
    #[arg(long)]
    pub cr: PathBuf,
    /// Namespace for the driver, its RBAC and the pool mounters.
    #[arg(long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Driver image [default: localhost/hostpath-csi:<version>].
    #[arg(long)]
    pub image: Option<String>,
    /// Nodes that get a PVC and a mounter per pvcTemplate pool (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// The cluster: `openshift` adds SecurityContextConstraints and their
    /// grants, cluster monitoring and driver-labelled snapshots.
    #[arg(long, value_enum, default_value_t = Platform::Kubernetes)]
    pub platform: Platform,
    /// Also emit ServiceMonitor, PrometheusRule and the Prometheus RBAC
    /// (needs the Prometheus operator's CRDs; always on for openshift).
    #[arg(long)]
    pub monitoring: bool,
    /// Namespace of the scraping `prometheus-k8s` ServiceAccount
    /// [default: monitoring; openshift-monitoring for openshift].
    #[arg(long)]
    pub monitoring_namespace: Option<String>,
    /// Whether the snapshot-controller runs with
    /// --enable-distributed-snapshotting [default: true; false for openshift,
    /// whose controller does not: the driver pods then label snapshots].
    #[arg(long)]
    pub distributed_snapshotting: Option<bool>,
    /// Offer CSI inline ephemeral volumes (`csi:` volumes in pod specs).
    /// Pod authors size them, so the driver caps them
    /// (`serve --max-ephemeral-size`); off unless asked.
    #[arg(long)]
    pub ephemeral: bool,
}

/// Why `render` failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot read --cr {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Render { path: PathBuf, source: RenderError },
    #[error("cannot write to stdout: {0}")]
    Write(std::io::Error),
}

/// Runs `render`: YAML on stdout, warnings on stderr.
pub fn run(args: RenderArgs) -> Result<(), RunError> {
    let text = std::fs::read_to_string(&args.cr).map_err(|source| RunError::Read {
        path: args.cr.clone(),
        source,
    })?;
    let opts = RenderOptions {
        namespace: args.namespace,
        image: args.image.unwrap_or_else(default_image),
        nodes: args.nodes.into_iter().filter(|n| !n.is_empty()).collect(),
        platform: args.platform,
        monitoring: args.monitoring,
        monitoring_namespace: args.monitoring_namespace,
        distributed_snapshotting: args.distributed_snapshotting,
        ephemeral: args.ephemeral,
    };
    let (yaml, warnings) = render_yaml(&text, &opts).map_err(|source| RunError::Render {
        path: args.cr.clone(),
        source,
    })?;
    for w in warnings {
        eprintln!("warning: {}: {w}", args.cr.display());
    }
    use std::io::Write;
    std::io::stdout()
        .write_all(yaml.as_bytes())
        .map_err(RunError::Write)
}
