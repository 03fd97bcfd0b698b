//! The driver container of the rendered DaemonSet, read the way kubelet reads
//! a pod spec: its image, command and args (with `$(VAR)` expanded), env
//! (with `fieldRef`s filled in), hostPath mounts and their propagation, and
//! privileges. The e2e takes everything from `hostpath-csi render` output, so
//! a change to the render is what gets tested.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `mountPropagation` of a volumeMount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    /// The default: private.
    None,
    HostToContainer,
    Bidirectional,
}

/// A volumeMount of the driver container, backed by a hostPath volume.
#[derive(Debug, Clone)]
pub struct HostPathMount {
    pub name: String,
    /// Path on the node.
    pub host: PathBuf,
    /// `hostPath.type`: `Directory`, `DirectoryOrCreate`, ...
    pub host_type: String,
    /// Path in the container.
    pub container: PathBuf,
    pub propagation: Propagation,
    pub read_only: bool,
}

/// What kubelet would run, and what the sidecars would send.
#[derive(Debug, Clone)]
pub struct DriverSpec {
    pub image: String,
    /// `command` (replaces the image's entrypoint), `$(VAR)` expanded.
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<HostPathMount>,
    pub privileged: bool,
    pub host_network: bool,
    /// The CSIDriver's name.
    pub driver_name: String,
    /// The CSI socket, as a path on the node.
    pub socket: PathBuf,
    /// The kubelet directory (the Bidirectional mount), on the node; kubelet
    /// sends paths below it, and the container mounts it at the same path.
    pub kubelet_dir: PathBuf,
    /// csi-provisioner's `--default-fstype`, which it puts into every
    /// Filesystem volume's capability and the PV.
    pub default_fs_type: String,
    /// The rendered StorageClass's parameters.
    pub class_parameters: BTreeMap<String, String>,
}

/// The documents of a manifest file, with `IMAGE` replaced by `image`.
pub fn manifests(file: &Path, image: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(file).unwrap();
    text.replace("image: IMAGE", &format!("image: {image}"))
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_norway::from_str(d).expect("manifest YAML parses"))
        .collect()
}

/// Runs `hostpath-csi render` on `cr` for one node, with `image`.
pub fn render(cr: &Path, node: &str, image: &str) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .arg("render")
        .arg("--cr")
        .arg(cr)
        .args(["--nodes", node, "--image", image])
        .output()
        .expect("run hostpath-csi render");
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    yaml.split("\n---\n")
        .skip(1)
        .map(|d| serde_norway::from_str(d).expect("rendered YAML parses"))
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn string(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_owned()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(string).collect())
        .unwrap_or_default()
}

/// kubelet's `$(VAR)` expansion in command and args: defined variables are
/// replaced, `$$` is a literal `$`, anything else stays as written.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail
            .strip_prefix("$(")
            .and_then(|t| t.find(')').map(|j| (&t[..j], &t[j + 1..])))
        {
            match env.iter().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// A container's env with `fieldRef`s resolved for a pod on `node`.
fn resolve_env(container: &Value, node: &str, namespace: &str, pod: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = string(&e["name"]);
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else {
            let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str();
            match field {
                Some("spec.nodeName") => node.to_owned(),
                Some("metadata.namespace") => namespace.to_owned(),
                Some("metadata.name") => pod.to_owned(),
                // The fake node's pod has no network of its own: loopback.
                Some("status.podIP") => "127.0.0.1".to_owned(),
                other => panic!("env {name}: the e2e cannot fill in {other:?}"),
            }
        };
        env.push((name, value));
    }
    env
}

fn mounts(container: &Value, pod: &Value) -> Vec<HostPathMount> {
    let volumes = pod["volumes"].as_array().expect("pod volumes");
    let mut out = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = string(&m["name"]);
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name.as_str())
            .unwrap_or_else(|| panic!("volumeMount {name} has no volume"));
        let host = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("volume {name} is not a hostPath volume"));
        let propagation = match m["mountPropagation"].as_str() {
            None | Some("None") => Propagation::None,
            Some("HostToContainer") => Propagation::HostToContainer,
            Some("Bidirectional") => Propagation::Bidirectional,
            Some(other) => panic!("mountPropagation {other:?}"),
        };
        assert!(
            m["subPath"].is_null(),
            "volumeMount {name}: subPath is not simulated"
        );
        out.push(HostPathMount {
            name,
            host: PathBuf::from(host),
            host_type: volume["hostPath"]["type"].as_str().unwrap_or("").to_owned(),
            container: PathBuf::from(string(&m["mountPath"])),
            propagation,
            read_only: m["readOnly"].as_bool().unwrap_or(false),
        });
    }
    out
}

/// The value of `--flag VALUE` or `--flag=VALUE` in an argument list.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&eq).map(str::to_owned)
        }
    })
}

/// A path in the container as a path on the node, through the mounts.
pub fn node_path(mounts: &[HostPathMount], in_container: &Path) -> PathBuf {
    let m = mounts
        .iter()
        .filter(|m| in_container.starts_with(&m.container))
        .max_by_key(|m| m.container.as_os_str().len())
        .unwrap_or_else(|| panic!("{} is on no hostPath mount", in_container.display()));
    m.host
        .join(in_container.strip_prefix(&m.container).unwrap())
}

/// The deepest directory holding every path.
fn common_ancestor<'a>(mut paths: impl Iterator<Item = &'a Path>) -> PathBuf {
    let mut common = paths.next().expect("a path").to_owned();
    for p in paths {
        while !p.starts_with(&common) {
            common.pop();
        }
    }
    common
}

/// Reads the driver container (the one running `image`) and the sidecars'
/// settings out of a render.
pub fn driver_spec(docs: &[Value], node: &str, image: &str) -> DriverSpec {
    let ds = find(docs, "DaemonSet");
    assert_eq!(ds.len(), 1, "one DaemonSet");
    let ds = ds[0];
    let namespace = string(&ds["metadata"]["namespace"]);
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    let driver = containers
        .iter()
        .find(|c| c["image"] == image)
        .unwrap_or_else(|| panic!("no container runs {image}"));
    let env = resolve_env(driver, node, &namespace, "hostpath-csi-e2e");
    let command = driver["command"].as_array().map(|_| {
        strings(&driver["command"])
            .iter()
            .map(|a| expand(a, &env))
            .collect()
    });
    let args: Vec<String> = strings(&driver["args"])
        .iter()
        .map(|a| expand(a, &env))
        .collect();
    let mounts = mounts(driver, pod);
    let endpoint = flag(&args, "--endpoint").unwrap_or_else(|| "unix:///csi/csi.sock".into());
    let socket = node_path(
        &mounts,
        Path::new(
            endpoint
                .strip_prefix("unix://")
                .expect("a unix:// endpoint"),
        ),
    );
    // The kubelet dir: one Bidirectional mount (the render) or several
    // below it (the operator mounts `plugins` and `pods`). kubelet sends its
    // own paths; they resolve in the container only when each is mounted at
    // the same path.
    let shared: Vec<&HostPathMount> = mounts
        .iter()
        .filter(|m| m.propagation == Propagation::Bidirectional)
        .collect();
    assert!(
        !shared.is_empty(),
        "a Bidirectional mount for the kubelet dir"
    );
    for m in &shared {
        assert_eq!(m.host, m.container, "kubelet dir mounted elsewhere");
    }
    let kubelet_dir = common_ancestor(shared.iter().map(|m| m.host.as_path()));
    let provisioner = containers
        .iter()
        .find(|c| {
            strings(&c["args"])
                .iter()
                .any(|a| a == "--extra-create-metadata" || a == "--extra-create-metadata=true")
        })
        .expect("a csi-provisioner with --extra-create-metadata");
    let classes = find(docs, "StorageClass");
    assert!(!classes.is_empty(), "a StorageClass");
    let class_parameters = classes[0]["parameters"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| (k.clone(), string(v))).collect())
        .unwrap_or_default();
    DriverSpec {
        image: image.to_owned(),
        command,
        args,
        env,
        privileged: driver["securityContext"]["privileged"].as_bool() == Some(true),
        host_network: pod["hostNetwork"].as_bool() == Some(true),
        driver_name: string(&find(docs, "CSIDriver")[0]["metadata"]["name"]),
        socket,
        kubelet_dir,
        default_fs_type: flag(&strings(&provisioner["args"]), "--default-fstype")
            .unwrap_or_default(),
        class_parameters,
        mounts,
    }
}

#[test]
fn the_kubelet_dir_is_the_common_ancestor() {
    let paths = [
        Path::new("/var/lib/kubelet/plugins"),
        Path::new("/var/lib/kubelet/pods"),
    ];
    assert_eq!(
        common_ancestor(paths.into_iter()),
        Path::new("/var/lib/kubelet")
    );
    assert_eq!(
        common_ancestor([Path::new("/var/lib/kubelet")].into_iter()),
        Path::new("/var/lib/kubelet")
    );
}

#[test]
fn expand_follows_kubelet() {
    let env = vec![("NODE_NAME".to_owned(), "n1".to_owned())];
    assert_eq!(expand("--nodeid=$(NODE_NAME)", &env), "--nodeid=n1");
    assert_eq!(expand("$(MISSING)-$(NODE_NAME)", &env), "$(MISSING)-n1");
    assert_eq!(expand("$$(NODE_NAME) $5 $", &env), "$(NODE_NAME) $5 $");
}
