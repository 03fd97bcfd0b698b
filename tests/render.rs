//! `hostpath-csi render` and HostPathProvisioner validation: a table of bad
//! CRs with the exact field each error names, golden files for the seeds'
//! CRs, determinism, and deploy/base kept equal to its example's render.
//!
//! Regenerate golden files and deploy/base with `UPDATE_GOLDEN=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use hostpath_csi::config::{self, HostPathProvisioner};
use hostpath_csi::render::{self, Platform, RenderError, RenderOptions};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");
const GOLDEN_IMAGE: &str = "quay.io/example/hostpath-csi:golden";
const NODES: &[&str] = &["node-a", "node-b.example.com"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

fn golden_opts() -> RenderOptions {
    RenderOptions {
        image: GOLDEN_IMAGE.into(),
        nodes: NODES.iter().map(|n| n.to_string()).collect(),
        ..RenderOptions::default()
    }
}

/// `render --platform openshift --namespace openshift-cnv`, the namespace
/// OpenShift Virtualization installs the operator's objects in.
fn openshift_opts() -> RenderOptions {
    RenderOptions {
        namespace: "openshift-cnv".into(),
        platform: Platform::Openshift,
        ..golden_opts()
    }
}

/// Compares with a checked-in file, or rewrites it under UPDATE_GOLDEN=1.
#[track_caller]
fn check_golden(path: &str, actual: &str) {
    let file = repo(path);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, actual).unwrap();
        return;
    }
    let expected = fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{path}: {e}; create it with UPDATE_GOLDEN=1"));
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{path} differs from the render at line {}:\n  file:   {:?}\n  render: {:?}\nIf the change is intended, run with UPDATE_GOLDEN=1.",
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .skip(1)
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect()
}

fn render_docs(cr_yaml: &str, opts: &RenderOptions) -> (Vec<Value>, Vec<String>) {
    let (cr, _) = HostPathProvisioner::from_yaml(cr_yaml).unwrap();
    let r = render::render(&cr, opts).unwrap();
    (r.documents, r.warnings)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn all<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn container<'a>(pod_owner: &'a Value, name: &str) -> &'a Value {
    pod_owner["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

fn flag_value(args: &[String], flag: &str) -> String {
    let i = args.iter().position(|a| a == flag).unwrap();
    args[i + 1].clone()
}

// ---------------------------------------------------------------- validation

const BASE: &str = r#"
apiVersion: hostpathprovisioner.kubevirt.io/v1beta1
kind: HostPathProvisioner
metadata:
  name: hpp
spec:
  storagePools:
  - name: first
    path: /var/first
"#;

/// A CR with one good pool followed by `pool` (YAML flow mapping).
fn with_second_pool(pool: &str) -> String {
    format!("{BASE}  - {pool}\n")
}

fn template_pool(template: &str) -> String {
    with_second_pool(&format!(
        "{{name: t, path: /var/t, pvcTemplate: {template}}}"
    ))
}

#[track_caller]
fn expect_field(yaml: &str, field: &str) {
    match HostPathProvisioner::from_yaml(yaml) {
        Ok(_) => panic!("accepted, expected an error at {field}:\n{yaml}"),
        Err(e) => {
            assert_eq!(e.field, field, "{e}\n{yaml}");
            assert!(e.to_string().starts_with(&format!("{field}: ")), "{e}");
        }
    }
}

#[test]
fn every_rule_names_its_field() {
    let long_name = "n".repeat(51);
    let long_path = format!("/{}", "p".repeat(255));
    let cases: Vec<(String, &str)> = vec![
        (
            BASE.replace("hostpathprovisioner.kubevirt.io/v1beta1", "v1"),
            "apiVersion",
        ),
        (BASE.replace("kind: HostPathProvisioner", "kind: Pod"), "kind"),
        (
            BASE.replace("spec:\n", "spec:\n  imagePullPolicy: Sometimes\n"),
            "spec.imagePullPolicy",
        ),
        (
            BASE.replace("spec:\n", "spec:\n  pathConfig: {path: /var/legacy}\n"),
            "spec.pathConfig",
        ),
        (
            "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\nspec: {}\n".into(),
            "spec.storagePools",
        ),
        (
            "kind: HostPathProvisioner\nspec:\n  pathConfig: {path: relative}\n".into(),
            "spec.pathConfig.path",
        ),
        (with_second_pool("{name: '', path: /var/b}"), "spec.storagePools[1].name"),
        (
            with_second_pool(&format!("{{name: {long_name}, path: /var/b}}")),
            "spec.storagePools[1].name",
        ),
        (with_second_pool("{name: 'a b', path: /var/b}"), "spec.storagePools[1].name"),
        (with_second_pool("{name: a/b, path: /var/b}"), "spec.storagePools[1].name"),
        (with_second_pool("{name: first, path: /var/b}"), "spec.storagePools[1].name"),
        (with_second_pool("{name: b, path: var/b}"), "spec.storagePools[1].path"),
        (with_second_pool("{name: b, path: ''}"), "spec.storagePools[1].path"),
        (with_second_pool("{name: b, path: /}"), "spec.storagePools[1].path"),
        (with_second_pool("{name: b, path: //}"), "spec.storagePools[1].path"),
        (with_second_pool("{name: b, path: /var/../etc}"), "spec.storagePools[1].path"),
        (
            with_second_pool(&format!("{{name: b, path: {long_path}}}")),
            "spec.storagePools[1].path",
        ),
        (with_second_pool("{name: b, path: /var/first}"), "spec.storagePools[1].path"),
        (with_second_pool("{name: b, path: /var/first/}"), "spec.storagePools[1].path"),
        (
            template_pool("{volumeMode: Raw, resources: {requests: {storage: 1Gi}}}"),
            "spec.storagePools[1].pvcTemplate.volumeMode",
        ),
        (
            template_pool(
                "{accessModes: [ReadWriteOnce, ReadWriteSometimes], resources: {requests: {storage: 1Gi}}}",
            ),
            "spec.storagePools[1].pvcTemplate.accessModes[1]",
        ),
        (
            template_pool("{resources: {}}"),
            "spec.storagePools[1].pvcTemplate.resources.requests.storage",
        ),
        (
            template_pool("{resources: {requests: {storage: 5GB}}}"),
            "spec.storagePools[1].pvcTemplate.resources.requests.storage",
        ),
        (
            template_pool("{resources: {requests: {storage: -1Gi}}}"),
            "spec.storagePools[1].pvcTemplate.resources.requests.storage",
        ),
        (
            template_pool("{resources: {requests: {storage: 0}}}"),
            "spec.storagePools[1].pvcTemplate.resources.requests.storage",
        ),
        (
            template_pool("{resources: {requests: {storage: lots}}}"),
            "spec.storagePools[1].pvcTemplate.resources.requests.storage",
        ),
        ("spec: [not, a, map]\n".into(), "(document)"),
    ];
    for (yaml, field) in &cases {
        expect_field(yaml, field);
    }
}

#[test]
fn limits_are_inclusive_and_quantities_are_int_or_string() {
    let name50 = "n".repeat(50);
    let path255 = format!("/{}", "p".repeat(254));
    for pool in [
        format!("{{name: {name50}, path: /var/b}}"),
        format!("{{name: b, path: {path255}}}"),
        "{name: A-b_c.9, path: /var/b/}".into(),
        "{name: t, path: /var/t, pvcTemplate: {resources: {requests: {storage: 1073741824}}}}"
            .into(),
        "{name: t, path: /var/t, pvcTemplate: {resources: {requests: {storage: 1.5Ti}}}}".into(),
        "{name: t, path: /var/t, pvcTemplate: {resources: {requests: {storage: 1e9}}}}".into(),
    ] {
        let yaml = with_second_pool(&pool);
        HostPathProvisioner::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    }
}

#[test]
fn a_pool_on_its_own_storage_class_is_refused() {
    let yaml = template_pool(
        "{storageClassName: hostpath-csi-first, resources: {requests: {storage: 1Gi}}}",
    );
    let (cr, _) = HostPathProvisioner::from_yaml(&yaml).unwrap();
    match render::render(&cr, &golden_opts()) {
        Err(RenderError::Config(e)) => {
            assert_eq!(e.field, "spec.storagePools[1].pvcTemplate.storageClassName")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_options_name_the_flag() {
    let (cr, _) = HostPathProvisioner::from_yaml(BASE).unwrap();
    let cases: Vec<(RenderOptions, &str)> = vec![
        (
            RenderOptions {
                namespace: "Hostpath".into(),
                ..golden_opts()
            },
            "--namespace",
        ),
        (
            RenderOptions {
                image: "has space".into(),
                ..golden_opts()
            },
            "--image",
        ),
        (
            RenderOptions {
                nodes: vec!["a".into(), "under_score".into()],
                ..golden_opts()
            },
            "--nodes[1]",
        ),
        (
            RenderOptions {
                nodes: vec!["a".into(), "a".into()],
                ..golden_opts()
            },
            "--nodes[1]",
        ),
    ];
    for (opts, flag) in cases {
        match render::render(&cr, &opts) {
            Err(RenderError::Option { flag: f, .. }) => assert_eq!(f, flag),
            other => panic!("{flag}: {other:?}"),
        }
    }
}

#[test]
fn names_that_clash_after_sanitizing_are_refused() {
    let yaml = with_second_pool("{name: First, path: /var/b}");
    let (cr, _) = HostPathProvisioner::from_yaml(&yaml).unwrap();
    let err = render::render(&cr, &golden_opts()).unwrap_err();
    assert!(
        matches!(&err, RenderError::NameClash { kind, name, .. } if kind == "StorageClass" && name == "hostpath-csi-first"),
        "{err}"
    );
}

// ---------------------------------------------------------------- golden files

#[test]
fn golden_files() {
    for (input, golden) in [
        (
            "deploy/examples/hpp-basic-pool.yaml",
            "tests/golden/hpp-basic-pool.yaml",
        ),
        (
            "deploy/examples/hpp-pvc-template-pool.yaml",
            "tests/golden/hpp-pvc-template-pool.yaml",
        ),
        (
            "tests/golden/inputs/hpp-mixed.yaml",
            "tests/golden/hpp-mixed.yaml",
        ),
        (
            "tests/golden/inputs/hpp-legacy-pathconfig.yaml",
            "tests/golden/hpp-legacy-pathconfig.yaml",
        ),
    ] {
        let (yaml, _) = render::render_yaml(&read(input), &golden_opts()).unwrap();
        check_golden(golden, &yaml);
    }
    for (input, golden) in [
        (
            "deploy/examples/hpp-pvc-template-pool.yaml",
            "tests/golden/openshift/hpp-pvc-template-pool.yaml",
        ),
        (
            "tests/golden/inputs/hpp-mixed.yaml",
            "tests/golden/openshift/hpp-mixed.yaml",
        ),
        (
            "deploy/examples/hpp-basic.yaml",
            "tests/golden/openshift/hpp-basic.yaml",
        ),
    ] {
        let (yaml, _) = render::render_yaml(&read(input), &openshift_opts()).unwrap();
        check_golden(golden, &yaml);
    }
}

#[test]
fn deploy_base_is_the_render_of_its_example() {
    let (yaml, warnings) = render::render_yaml(
        &read("deploy/examples/hpp-basic.yaml"),
        &RenderOptions::default(),
    )
    .unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    check_golden("deploy/base/hostpath-csi.yaml", &yaml);
}

#[test]
fn deploy_examples_keep_the_seeds_verbatim() {
    let seeds = repo("../shared/seed-examples");
    if !seeds.is_dir() {
        eprintln!("skipped: {} is not here", seeds.display());
        return;
    }
    for name in [
        "hpp-basic-pool.yaml",
        "hpp-pvc-template-pool.yaml",
        "storageclass-csi.yaml",
    ] {
        assert_eq!(
            read(&format!("deploy/examples/{name}")),
            fs::read_to_string(seeds.join(name)).unwrap(),
            "deploy/examples/{name} differs from the seed"
        );
    }
}

#[test]
fn output_is_deterministic() {
    let cr = read("tests/golden/inputs/hpp-mixed.yaml");
    let first = render::render_yaml(&cr, &golden_opts()).unwrap().0;
    for _ in 0..5 {
        assert_eq!(render::render_yaml(&cr, &golden_opts()).unwrap().0, first);
    }
    let run = || {
        Command::new(BIN)
            .args(["render", "--cr"])
            .arg(repo("tests/golden/inputs/hpp-mixed.yaml"))
            .args(["--image", GOLDEN_IMAGE, "--nodes", &NODES.join(",")])
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(String::from_utf8(a.stdout).unwrap(), first);
}

// ---------------------------------------------------------------- content

#[test]
fn misplaced_workload_warns_and_still_renders() {
    let out = Command::new(BIN)
        .args(["render", "--cr"])
        .arg(repo("deploy/examples/hpp-basic-pool.yaml"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning"), "{stderr}");
    assert!(stderr.contains("spec.workload"), "{stderr}");
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    // Ignored, as the API server would prune it.
    assert!(ds["spec"]["template"]["spec"]["nodeSelector"].is_null());
    find(&docs, "StorageClass", "hostpath-csi-any-name");
}

#[test]
fn the_install_has_every_object_in_order() {
    let (docs, warnings) = render_docs(
        &read("deploy/examples/hpp-pvc-template-pool.yaml"),
        &golden_opts(),
    );
    assert!(warnings.is_empty(), "{warnings:?}");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "CSIDriver",
            "ServiceAccount",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "DaemonSet",
            "Service",
            "StorageClass",
            "PersistentVolumeClaim",
            "Deployment",
            "PersistentVolumeClaim",
            "Deployment",
        ]
    );
    for d in &docs {
        let namespaced = !matches!(
            d["kind"].as_str().unwrap(),
            "Namespace" | "CSIDriver" | "ClusterRole" | "ClusterRoleBinding" | "StorageClass"
        );
        assert_eq!(
            d["metadata"]["namespace"].as_str() == Some("hostpath-provisioner"),
            namespaced,
            "{}",
            d["kind"]
        );
    }
    let driver = find(&docs, "CSIDriver", "kubevirt.io.hostpath-provisioner");
    assert_eq!(
        driver["spec"],
        serde_json::json!({
            "attachRequired": false,
            "podInfoOnMount": true,
            "storageCapacity": true,
            "fsGroupPolicy": "File",
            "volumeLifecycleModes": ["Persistent"],
        })
    );
    // Inline ephemeral volumes only when asked: pod authors size them.
    let opts = RenderOptions {
        ephemeral: true,
        ..golden_opts()
    };
    let (with, _) = render_docs(&read("deploy/examples/hpp-pvc-template-pool.yaml"), &opts);
    assert_eq!(
        find(&with, "CSIDriver", "kubevirt.io.hostpath-provisioner")["spec"]
            ["volumeLifecycleModes"],
        serde_json::json!(["Persistent", "Ephemeral"])
    );
    let sc = find(&docs, "StorageClass", "hostpath-csi-my-storage-pool");
    assert_eq!(sc["provisioner"], "kubevirt.io.hostpath-provisioner");
    assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(sc["allowVolumeExpansion"], true);
    assert_eq!(sc["parameters"]["storagePool"], "my-storage-pool");
}

#[test]
fn the_daemonset_runs_the_driver_and_sidecars() {
    let (docs, _) = render_docs(
        &read("deploy/examples/hpp-pvc-template-pool.yaml"),
        &golden_opts(),
    );
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    let names: Vec<String> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "hostpath-csi",
            "csi-provisioner",
            "node-driver-registrar",
            "liveness-probe",
            "csi-resizer",
            "csi-snapshotter"
        ]
    );
    for c in pod["containers"].as_array().unwrap() {
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        let image = c["image"].as_str().unwrap();
        if c["name"] != "hostpath-csi" {
            assert!(image.starts_with("registry.k8s.io/sig-storage/"), "{image}");
            assert!(image.contains(":v"), "unpinned {image}");
        }
    }

    let driver = container(ds, "hostpath-csi");
    assert_eq!(driver["image"], GOLDEN_IMAGE);
    assert_eq!(driver["securityContext"]["privileged"], true);
    let args = strings(&driver["args"]);
    assert_eq!(args[0], "serve");
    assert_eq!(flag_value(&args, "--endpoint"), "unix:///csi/csi.sock");
    assert_eq!(flag_value(&args, "--nodeid"), "$(NODE_NAME)");
    assert_eq!(driver["env"][0]["name"], "NODE_NAME");
    assert_eq!(
        driver["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    let pools = config::parse_datadir(&flag_value(&args, "--datadir")).unwrap();
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].name, "my-storage-pool");
    assert_eq!(pools[0].path, Path::new("/var/myvolumes/csi"));
    assert!(!pools[0].shared);

    let mounts = driver["volumeMounts"].as_array().unwrap();
    let kubelet = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/kubelet")
        .unwrap();
    assert_eq!(kubelet["mountPropagation"], "Bidirectional");
    let pool = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/myvolumes")
        .unwrap();
    assert_eq!(pool["mountPropagation"], "HostToContainer");

    let provisioner = strings(&container(ds, "csi-provisioner")["args"]);
    for flag in [
        "--node-deployment",
        "--enable-capacity",
        "--capacity-for-immediate-binding",
        "--strict-topology",
        "--immediate-topology=false",
        "--extra-create-metadata",
        "--default-fstype=xfs",
    ] {
        assert!(provisioner.iter().any(|a| a == flag), "{flag} missing");
    }
    let registrar = strings(&container(ds, "node-driver-registrar")["args"]);
    assert!(registrar.contains(
        &"--kubelet-registration-path=/var/lib/kubelet/plugins/kubevirt.io.hostpath-provisioner/csi.sock"
            .to_owned()
    ));
}

#[test]
fn pvc_template_pools_get_a_claim_and_a_pinned_mounter_per_node() {
    let (docs, _) = render_docs(
        &read("deploy/examples/hpp-pvc-template-pool.yaml"),
        &golden_opts(),
    );
    for node in NODES {
        let name = render::upstream_pool_claim("my-storage-pool", node);
        let pvc = find(&docs, "PersistentVolumeClaim", &name);
        assert_eq!(pvc["spec"]["volumeMode"], "Block");
        assert_eq!(pvc["spec"]["storageClassName"], "my-storage-class");
        assert_eq!(pvc["spec"]["resources"]["requests"]["storage"], "5Gi");
        let deploy = find(&docs, "Deployment", &name);
        assert_eq!(deploy["spec"]["replicas"], 1);
        let pod = &deploy["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
        let term = &pod["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
            ["matchFields"][0];
        assert_eq!(term["key"], "metadata.name");
        assert_eq!(term["values"][0], *node);
        assert_eq!(
            pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
            name
        );
        let c = container(deploy, "mounter");
        assert_eq!(c["securityContext"]["privileged"], true);
        let args = strings(&c["args"]);
        assert_eq!(&args[..2], ["pool", "mount"]);
        assert_eq!(flag_value(&args, "--source"), "/dev/data");
        assert_eq!(flag_value(&args, "--target"), "/var/myvolumes/csi");
        assert_eq!(flag_value(&args, "--host-root"), "/host");
        assert!(args.contains(&"--watch".to_owned()));
        assert_eq!(c["volumeDevices"][0]["devicePath"], "/dev/data");
        assert_eq!(c["volumeMounts"][0]["mountPropagation"], "Bidirectional");
    }
}

#[test]
fn rwx_templates_share_one_claim_and_placement_reaches_every_pod() {
    let (docs, _) = render_docs(&read("tests/golden/inputs/hpp-mixed.yaml"), &golden_opts());
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    let args = strings(&container(ds, "hostpath-csi")["args"]);
    let pools = config::parse_datadir(&flag_value(&args, "--datadir")).unwrap();
    let (cr, _) =
        HostPathProvisioner::from_yaml(&read("tests/golden/inputs/hpp-mixed.yaml")).unwrap();
    assert_eq!(pools, cr.pools());
    assert_eq!(
        pools.iter().map(|p| p.shared).collect::<Vec<_>>(),
        [false, false, true]
    );

    let shared_claims: Vec<_> = all(&docs, "PersistentVolumeClaim")
        .into_iter()
        .filter(|p| p["metadata"]["annotations"]["hostpath.csi/pool"] == "shared")
        .collect();
    assert_eq!(shared_claims.len(), 1);
    assert_eq!(
        shared_claims[0]["metadata"]["name"],
        "hpp-pool-shared-shared"
    );
    assert_eq!(
        shared_claims[0]["spec"]["selector"]["matchLabels"]["tier"],
        "bulk"
    );
    assert_eq!(
        all(&docs, "PersistentVolumeClaim").len(),
        1 + NODES.len(),
        "one shared claim plus one per node for the RWO pool"
    );

    let fs_pvc = find(
        &docs,
        "PersistentVolumeClaim",
        "hpp-pool-fs-template-node-a",
    );
    assert_eq!(fs_pvc["spec"]["volumeMode"], "Filesystem");
    assert_eq!(
        fs_pvc["spec"]["resources"]["requests"]["storage"],
        "107374182400"
    );

    let deployments = all(&docs, "Deployment");
    assert_eq!(deployments.len(), 2 * NODES.len());
    for d in deployments.iter().chain([&ds]) {
        let pod = &d["spec"]["template"]["spec"];
        assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
        assert_eq!(
            pod["tolerations"][0]["key"],
            "node-role.kubernetes.io/control-plane"
        );
        let term = &pod["affinity"]["nodeAffinity"]
            ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0];
        assert_eq!(term["matchExpressions"][0]["key"], "storage");
        for c in pod["containers"].as_array().unwrap() {
            assert_eq!(c["imagePullPolicy"], "Always");
        }
    }
    let shared_mounter = find(&docs, "Deployment", "hpp-pool-shared-node-b.example.com");
    let pod = &shared_mounter["spec"]["template"]["spec"];
    assert_eq!(
        pod["volumes"][1]["persistentVolumeClaim"]["claimName"],
        "hpp-pool-shared-shared"
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
        "node-b.example.com"
    );
    let c = container(shared_mounter, "mounter");
    assert_eq!(flag_value(&strings(&c["args"]), "--source"), "/source");
    assert_eq!(
        flag_value(&strings(&c["args"]), "--target"),
        "/var/shared-pool/csi"
    );
    assert!(c["volumeDevices"].is_null());
    assert_eq!(c["volumeMounts"][1]["mountPath"], "/source");
}

/// Pool claim names equal what upstream's operator made for the same pool
/// and node, so a migration binds the claim that holds the pool's data.
///
/// Upstream (hostpath-provisioner-operator storagepool.go and util.go):
/// name = getResourceNameWithMaxLength("hpp-pool", "<pool>-<node>", 63):
///   1. n = "hpp-pool-<pool>-<node>"; if len(n) <= 63 the name is n, dots kept.
///   2. else baseLength = 63 - 10 - len("<pool>-<node>"), which is < 0 because
///      len(suffix) = len(n) - 9 > 54; so prefix = "hpp-pool"[:min(8, 54)]
///      = "hpp-pool" and the name is "hpp-pool-" + FNV-1a-32(n) as 8 hex
///      digits (Go's hash/fnv New32a, "%08x"), cut to 63 (17 characters).
///
/// The hashes below were computed with a Python one-off of FNV-1a 32
/// (offset 0x811c9dc5, prime 0x01000193) over the bytes of n.
#[test]
fn pool_claim_names_are_upstreams() {
    let table: &[(&str, &str, &str)] = &[
        // n = "hpp-pool-local-node1", 20 <= 63: n itself.
        ("local", "node1", "hpp-pool-local-node1"),
        // 39 characters: n itself, dots kept.
        (
            "local",
            "worker-0.ocp.example.com",
            "hpp-pool-local-worker-0.ocp.example.com",
        ),
        // 63 characters exactly: n itself.
        (
            "local",
            "worker-0000000000000000000000000.ocp.example.com",
            "hpp-pool-local-worker-0000000000000000000000000.ocp.example.com",
        ),
        // 64 characters: FNV-1a-32(n) = 89438bf5.
        (
            "local",
            "worker-00000000000000000000000000.ocp.example.com",
            "hpp-pool-89438bf5",
        ),
        // 77 characters: FNV-1a-32(n) = b3be2514.
        (
            "local",
            "compute-1.very-long-cluster-name.region-1.internal.example.com",
            "hpp-pool-b3be2514",
        ),
        // A 50-character pool name (the longest allowed): 62 characters, n itself.
        (
            "pppppppppppppppppppppppppppppppppppppppppppppppppp",
            "n1",
            "hpp-pool-pppppppppppppppppppppppppppppppppppppppppppppppppp-n1",
        ),
    ];
    for (pool, node, want) in table {
        assert_eq!(
            render::upstream_pool_claim(pool, node),
            *want,
            "{pool} {node}"
        );
        let yaml = format!(
            "{BASE}  - {{name: {pool}, path: /var/t, pvcTemplate: {{resources: {{requests: {{storage: 1Gi}}}}}}}}\n"
        );
        let opts = RenderOptions {
            nodes: vec![node.to_string()],
            ..golden_opts()
        };
        let (docs, warnings) = render_docs(&yaml, &opts);
        assert!(warnings.is_empty(), "{warnings:?}");
        let pvc = find(&docs, "PersistentVolumeClaim", want);
        assert_eq!(pvc["metadata"]["namespace"], "hostpath-provisioner");
        // Upstream's label on its claims: getResourceNameWithMaxLength(pool, "hpp", 63).
        assert_eq!(
            pvc["metadata"]["labels"]["kubevirt.io.hostpath-provisioner/storagePool"],
            format!("{pool}-hpp")
        );
        let mounter = find(&docs, "Deployment", want);
        assert_eq!(
            mounter["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"]["claimName"],
            *want
        );
    }
    // getResourceNameWithMaxLength("hpp-pool", "nfs-backend-shared", 63).
    assert_eq!(
        render::upstream_shared_claim("nfs-backend"),
        "hpp-pool-nfs-backend-shared"
    );
}

#[test]
fn the_namespace_is_where_the_claims_go() {
    // Under OpenShift Virtualization the operator's claims are in openshift-cnv.
    let opts = RenderOptions {
        namespace: "openshift-cnv".into(),
        ..golden_opts()
    };
    let (docs, _) = render_docs(&read("deploy/examples/hpp-pvc-template-pool.yaml"), &opts);
    let pvc = find(
        &docs,
        "PersistentVolumeClaim",
        "hpp-pool-my-storage-pool-node-b.example.com",
    );
    assert_eq!(pvc["metadata"]["namespace"], "openshift-cnv");
}

#[test]
fn pool_names_upstream_could_not_use_get_a_valid_name_and_a_warning() {
    let (docs, warnings) = render_docs(&read("tests/golden/inputs/hpp-mixed.yaml"), &golden_opts());
    find(
        &docs,
        "PersistentVolumeClaim",
        "hpp-pool-fs-template-node-a",
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("hpp-pool-fs_template-node-a")),
        "{warnings:?}"
    );
}

#[test]
fn template_fields_upstream_passes_on_are_kept() {
    let yaml = template_pool(
        "{resources: {requests: {storage: 1Gi}}, volumeAttributesClassName: fast, dataSource: {kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io, name: golden}, dataSourceRef: {kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io, name: golden}, volumeName: pv-1, accessModes: [ReadWriteMany], futureField: 1}",
    );
    let (docs, warnings) = render_docs(&yaml, &golden_opts());
    let pvc = find(&docs, "PersistentVolumeClaim", "hpp-pool-t-shared");
    assert_eq!(pvc["spec"]["volumeAttributesClassName"], "fast");
    assert_eq!(pvc["spec"]["dataSource"]["name"], "golden");
    assert_eq!(pvc["spec"]["dataSourceRef"]["kind"], "VolumeSnapshot");
    assert_eq!(pvc["spec"]["volumeName"], "pv-1");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("pvcTemplate.futureField")),
        "unknown fields are warned about: {warnings:?}"
    );
    // A shared pool also gets upstream's Immediate class, named by overlayClassName.
    let sc = find(&docs, "StorageClass", "hpp-overlay");
    assert_eq!(sc["volumeBindingMode"], "Immediate");
    assert_eq!(sc["parameters"]["overlayCSI"], "true");
    let named = yaml.replace("{name: t,", "{name: t, overlayClassName: nfs-overlay,");
    let (docs, _) = render_docs(&named, &golden_opts());
    find(&docs, "StorageClass", "nfs-overlay");
}

#[test]
fn no_nodes_means_no_mounters_and_a_warning() {
    let (docs, warnings) = render_docs(
        &read("deploy/examples/hpp-pvc-template-pool.yaml"),
        &RenderOptions::default(),
    );
    assert!(all(&docs, "Deployment").is_empty());
    assert!(all(&docs, "PersistentVolumeClaim").is_empty());
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("--nodes"), "{warnings:?}");
}

#[test]
fn the_legacy_path_config_renders_one_pool() {
    let (docs, warnings) = render_docs(
        &read("tests/golden/inputs/hpp-legacy-pathconfig.yaml"),
        &golden_opts(),
    );
    assert!(
        warnings.iter().any(|w| w.contains("deprecated")),
        "{warnings:?}"
    );
    let sc = find(&docs, "StorageClass", "hostpath-csi-legacy");
    assert_eq!(sc["parameters"]["storagePool"], "legacy");
}

#[test]
fn yaml_1_1_specials_are_quoted_for_kubectl() {
    // kubectl reads YAML 1.1: unquoted, these would be a bool and a number.
    let yaml = format!(
        "{BASE}  - {{name: 'on', path: /var/on}}\n  workload:\n    nodeSelector: {{disk: 'yes', rack: '1_000'}}\n"
    );
    let (out, _) = render::render_yaml(&yaml, &golden_opts()).unwrap();
    assert!(out.contains("storagePool: 'on'"), "{out}");
    assert!(out.contains("disk: 'yes'"), "{out}");
    assert!(out.contains("rack: '1_000'"), "{out}");
    assert!(out.contains("name: hostpath-csi-on\n"), "{out}");
    let docs = documents(&out);
    let sc = find(&docs, "StorageClass", "hostpath-csi-on");
    assert_eq!(sc["parameters"]["storagePool"], "on");
}

// ---------------------------------------------------------------- OpenShift

const OPENSHIFT_KINDS: &[&str] = &[
    "SecurityContextConstraints",
    "ServiceMonitor",
    "PrometheusRule",
];

#[test]
fn vanilla_output_has_no_openshift_or_prometheus_operator_objects() {
    for input in [
        "deploy/examples/hpp-pvc-template-pool.yaml",
        "tests/golden/inputs/hpp-mixed.yaml",
    ] {
        let (docs, _) = render_docs(&read(input), &golden_opts());
        for d in &docs {
            let kind = d["kind"].as_str().unwrap();
            assert!(!OPENSHIFT_KINDS.contains(&kind), "{input}: {kind}");
            assert!(
                !serde_json::to_string(d).unwrap().contains("openshift.io"),
                "{input}: {kind} {}",
                d["metadata"]["name"]
            );
        }
        // The metrics Service is plain Kubernetes and ships everywhere.
        find(&docs, "Service", "hpp-prometheus-metrics");
    }
    // --monitoring adds the Prometheus operator objects, still no SCC.
    let opts = RenderOptions {
        monitoring: true,
        ..golden_opts()
    };
    let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), &opts);
    find(&docs, "ServiceMonitor", "service-monitor-hpp");
    find(&docs, "PrometheusRule", "prometheus-hpp-rules");
    let rb = find(&docs, "RoleBinding", "hostpath-provisioner-monitoring");
    assert_eq!(rb["subjects"][0]["namespace"], "monitoring");
    assert!(all(&docs, "SecurityContextConstraints").is_empty());
}

#[test]
fn openshift_admits_the_driver_and_the_mounters_under_one_scc() {
    let (docs, _) = render_docs(
        &read("deploy/examples/hpp-pvc-template-pool.yaml"),
        &openshift_opts(),
    );
    let scc = find(&docs, "SecurityContextConstraints", "hostpath-csi");
    assert_eq!(scc["apiVersion"], "security.openshift.io/v1");
    assert_eq!(scc["allowPrivilegedContainer"], true);
    assert_eq!(scc["allowHostDirVolumePlugin"], true);
    for strategy in [
        "runAsUser",
        "seLinuxContext",
        "fsGroup",
        "supplementalGroups",
    ] {
        assert_eq!(scc[strategy]["type"], "RunAsAny", "{strategy}");
    }
    assert_eq!(scc["volumes"], serde_json::json!(["*"]));
    let drops = strings(&scc["requiredDropCapabilities"]);
    assert!(
        !drops.contains(&"MKNOD".to_owned()),
        "loop nodes need mknod"
    );

    let role = find(&docs, "ClusterRole", "hostpath-csi-scc");
    assert_eq!(role["rules"][0]["verbs"], serde_json::json!(["use"]));
    assert_eq!(
        role["rules"][0]["resourceNames"],
        serde_json::json!(["hostpath-csi"])
    );
    let binding = find(&docs, "RoleBinding", "hostpath-csi-scc");
    assert_eq!(binding["metadata"]["namespace"], "openshift-cnv");
    let subjects: Vec<&str> = binding["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["hostpath-csi", "hostpath-csi-mounter"]);

    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    let mounters = all(&docs, "Deployment");
    assert_eq!(mounters.len(), NODES.len());
    for owner in mounters.iter().copied().chain([ds]) {
        let meta = &owner["spec"]["template"]["metadata"];
        assert_eq!(
            meta["annotations"]["openshift.io/required-scc"],
            "hostpath-csi"
        );
    }
    for m in &mounters {
        let pod = &m["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "hostpath-csi-mounter");
        let c = container(m, "mounter");
        assert_eq!(c["securityContext"]["runAsUser"], 0);
        assert_eq!(c["resources"]["requests"]["memory"], "100Mi");
    }
    find(&docs, "ServiceAccount", "hostpath-csi-mounter");
    let ns = find(&docs, "Namespace", "openshift-cnv");
    assert_eq!(
        ns["metadata"]["labels"]["openshift.io/cluster-monitoring"],
        "true"
    );
}

#[test]
fn sidecars_on_the_socket_are_privileged_and_every_container_has_requests() {
    let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), &openshift_opts());
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    for c in ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
    {
        let name = c["name"].as_str().unwrap();
        assert_eq!(c["resources"]["requests"]["cpu"], "10m", "{name}");
        let privileged = c["securityContext"]["privileged"] == true;
        // As upstream: the liveness probe is the one unprivileged container.
        assert_eq!(privileged, name != "liveness-probe", "{name}");
    }
}

#[test]
fn monitoring_ships_with_the_openshift_install() {
    let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), &openshift_opts());
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    let driver = container(ds, "hostpath-csi");
    let args = strings(&driver["args"]);
    assert!(
        args.contains(&"--metrics-tls-version=VersionTLS13".to_owned()),
        "{args:?}"
    );
    assert_eq!(driver["ports"][1]["name"], "metrics");
    assert_eq!(driver["ports"][1]["containerPort"], 8443);
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        pod_labels["prometheus.hostpathprovisioner.kubevirt.io"],
        "true"
    );

    let svc = find(&docs, "Service", "hpp-prometheus-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8443);
    assert_eq!(
        svc["spec"]["selector"]["prometheus.hostpathprovisioner.kubevirt.io"],
        "true"
    );
    let sm = find(&docs, "ServiceMonitor", "service-monitor-hpp");
    assert_eq!(sm["spec"]["endpoints"][0]["scheme"], "https");
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"][0],
        "openshift-cnv"
    );
    let rb = find(&docs, "RoleBinding", "hostpath-provisioner-monitoring");
    assert_eq!(rb["subjects"][0]["name"], "prometheus-k8s");
    assert_eq!(rb["subjects"][0]["namespace"], "openshift-monitoring");

    let rule = find(&docs, "PrometheusRule", "prometheus-hpp-rules");
    let rules = rule["spec"]["groups"][0]["rules"].as_array().unwrap();
    let by_name = |n: &str| rules.iter().find(|r| r["alert"] == n).unwrap();
    let shared = by_name("HPPSharingPoolPathWithOS");
    assert_eq!(shared["expr"], "kubevirt_hpp_pool_path_shared_with_os == 1");
    assert_eq!(shared["for"], "1m");
    assert_eq!(shared["labels"]["severity"], "warning");
    assert_eq!(
        shared["annotations"]["runbook_url"],
        "https://kubevirt.io/monitoring/runbooks/HPPSharingPoolPathWithOS"
    );
    let not_ready = by_name("HPPNotReady")["expr"].as_str().unwrap();
    assert!(
        not_ready.contains(r#"daemonset="hostpath-csi""#),
        "{not_ready}"
    );
    assert!(
        not_ready.contains(r#"namespace="openshift-cnv""#),
        "{not_ready}"
    );
    let abnormal = by_name("HPPAbnormalVolumes")["expr"].as_str().unwrap();
    assert!(
        abnormal.contains("hostpath_csi_abnormal_volumes"),
        "{abnormal}"
    );
}

#[test]
fn openshift_snapshots_are_labelled_by_the_driver_pods() {
    let names = |opts: &RenderOptions| -> Vec<String> {
        let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), opts);
        let ds = find(&docs, "DaemonSet", "hostpath-csi");
        ds["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(names(&openshift_opts()).contains(&"snapshot-labeler".to_owned()));
    assert!(!names(&golden_opts()).contains(&"snapshot-labeler".to_owned()));
    // A cluster with distributed snapshotting needs no labeler.
    let distributed = RenderOptions {
        distributed_snapshotting: Some(true),
        ..openshift_opts()
    };
    assert!(!names(&distributed).contains(&"snapshot-labeler".to_owned()));
    let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), &openshift_opts());
    let ds = find(&docs, "DaemonSet", "hostpath-csi");
    let labeler = container(ds, "snapshot-labeler");
    let args = strings(&labeler["args"]);
    assert_eq!(args[0], "snapshot-labeler");
    assert_eq!(flag_value(&args, "--node"), "$(NODE_NAME)");
    let snapshotter = strings(&container(ds, "csi-snapshotter")["args"]);
    assert!(snapshotter.contains(&"--node-deployment".to_owned()));
}

#[test]
fn the_shipped_storage_profile_moves_disks_across_nodes() {
    // CDI never falls back to a host-assisted copy when a CSI clone is
    // refused, and the driver clones only on the source's node.
    let profile: Value =
        serde_norway::from_str(&read("deploy/examples/storageprofile.yaml")).unwrap();
    assert_eq!(profile["metadata"]["name"], "hostpath-csi");
    assert_eq!(profile["spec"]["cloneStrategy"], "copy");
    let same_node = read("deploy/examples/storageprofile-same-node-clone.yaml");
    let docs: Vec<Value> = same_node
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).unwrap())
        .collect();
    let class = docs.iter().find(|d| d["kind"] == "StorageClass").unwrap();
    let profile = docs.iter().find(|d| d["kind"] == "StorageProfile").unwrap();
    assert_eq!(profile["metadata"]["name"], class["metadata"]["name"]);
    assert_eq!(profile["spec"]["cloneStrategy"], "csi-clone");
}

#[test]
fn the_crd_has_upstreams_status_and_template_fields() {
    let crd: Value = serde_norway::from_str(&read("deploy/crd/hostpathprovisioner.yaml")).unwrap();
    let version = &crd["spec"]["versions"][0];
    // Upstream's operator writes status with a plain update: no subresource.
    assert!(
        version["subresources"].is_null(),
        "{}",
        version["subresources"]
    );
    let schema = &version["schema"]["openAPIV3Schema"]["properties"];
    let status = &schema["status"]["properties"];
    let mut keys: Vec<&str> = status
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "conditions",
            "observedVersion",
            "operatorVersion",
            "storagePoolStatuses",
            "targetVersion"
        ]
    );
    assert_eq!(
        status["conditions"]["items"]["required"],
        serde_json::json!(["status", "type"])
    );
    let pool_status = &status["storagePoolStatuses"]["items"];
    assert_eq!(
        pool_status["required"],
        serde_json::json!(["name", "phase"])
    );
    for k in ["desiredReady", "currentReady", "claimStatuses"] {
        assert!(!pool_status["properties"][k].is_null(), "{k}");
    }
    let claim = &pool_status["properties"]["claimStatuses"]["items"];
    assert_eq!(claim["required"], serde_json::json!(["name", "status"]));
    assert!(!claim["properties"]["status"]["properties"]["phase"].is_null());

    let pool = &schema["spec"]["properties"]["storagePools"]["items"]["properties"];
    assert_eq!(pool["overlayClassName"]["type"], "string");
    let template = &pool["pvcTemplate"]["properties"];
    for k in [
        "accessModes",
        "dataSource",
        "dataSourceRef",
        "resources",
        "selector",
        "storageClassName",
        "volumeAttributesClassName",
        "volumeMode",
        "volumeName",
    ] {
        assert!(!template[k].is_null(), "pvcTemplate.{k} missing");
    }
}

/// csi-resizer (with its default --handle-volume-inuse-error) lists and
/// watches pods cluster-wide and starts no worker before that cache syncs:
/// without the grant no PVC is ever expanded.
#[test]
fn the_sidecars_may_watch_pods_cluster_wide() {
    let (docs, _) = render_docs(&read("deploy/examples/hpp-basic.yaml"), &golden_opts());
    let role = find(&docs, "ClusterRole", "hostpath-csi");
    let grants_pods = role["rules"].as_array().unwrap().iter().any(|r| {
        strings(&r["resources"]).contains(&"pods".to_owned())
            && ["list", "watch"]
                .iter()
                .all(|v| strings(&r["verbs"]).contains(&v.to_string()))
    });
    assert!(grants_pods, "{role}");
}
