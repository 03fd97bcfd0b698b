//! Start-up: configuration errors, the socket, and the HostPathProvisioner CR.

mod common;

use std::process::Command;

use common::*;
use hostpath_csi::proto::*;

fn serve(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .arg("serve")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn invalid_datadir_names_the_field_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix://{}/csi.sock", dir.path().display());
    let cases = [
        // Relative paths are taken from `/` (as upstream's operator passes
        // them), so only one that climbs out is refused.
        (
            r#"[{"name":"a","path":"../relative"}]"#,
            "--datadir[0].path",
        ),
        (
            r#"[{"name":"a","path":"/x"},{"name":"a","path":"/y"}]"#,
            "--datadir[1].name",
        ),
        (r#"[]"#, "--datadir"),
        (r#"not json"#, "--datadir"),
    ];
    for (json, field) in cases {
        let out = serve(&["--endpoint", &sock, "--nodeid", "n", "--datadir", json]);
        assert!(!out.status.success(), "{json}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(field), "{json}: {err}");
    }
    let out = serve(&["--endpoint", &sock, "--nodeid", "n"]);
    assert!(!out.status.success());
    let pool = dir.path().join("pool");
    let json = format!(r#"[{{"name":"a","path":"{}"}}]"#, pool.display());
    let out = serve(&["--endpoint", &sock, "--nodeid", " ", "--datadir", &json]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nodeid"));
}

#[test]
fn invalid_cr_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cr = dir.path().join("hpp.yaml");
    std::fs::write(
        &cr,
        "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\nspec:\n  storagePools:\n  - name: a\n    path: /ok\n  - name: b\n    path: not-absolute\n",
    )
    .unwrap();
    let sock = format!("unix://{}/csi.sock", dir.path().display());
    let out = serve(&[
        "--endpoint",
        &sock,
        "--nodeid",
        "n",
        "--config",
        cr.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spec.storagePools[1].path"), "{err}");
}

#[test]
fn unwritable_socket_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    // Root ignores permission bits, so make the directory a read-only mount.
    nix::mount::mount(
        Some("tmpfs"),
        &ro,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .unwrap();
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(ro.clone());
    let pool = dir.path().join("pool");
    let datadir = format!(r#"[{{"name":"p","path":"{}"}}]"#, pool.display());
    let sock = format!("unix://{}/csi.sock", ro.display());
    let out = serve(&["--endpoint", &sock, "--nodeid", "n", "--datadir", &datadir]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not writable"), "{err}");
}

#[tokio::test]
async fn stale_socket_is_replaced_and_cr_pools_serve_from_csi_subdir() {
    let dir = tempfile::Builder::new()
        .prefix("hpc-test-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("csi.sock");
    // A stale socket from a crashed run.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let base = dir.path().join("var-myvolumes");
    let cr = dir.path().join("hpp.yaml");
    std::fs::write(
        &cr,
        format!(
            "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\nmetadata:\n  name: hostpath-provisioner\nspec:\n  imagePullPolicy: IfNotPresent\n  storagePools:\n  - name: any_name\n    path: \"{}\"\nworkload:\n  nodeSelector:\n    kubernetes.io/os: linux\n",
            base.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .args(["serve", "--nodeid", "n1", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .arg("--config")
        .arg(&cr)
        .stderr(log)
        .spawn()
        .unwrap();
    let mut clients = None;
    for _ in 0..200 {
        if let Ok(c) =
            hostpath_csi::client::Clients::connect(&format!("unix://{}", sock.display())).await
        {
            if c.clone().identity.probe(ProbeRequest {}).await.is_ok() {
                clients = Some(c);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let mut c = clients.expect("driver did not replace the stale socket");
    let mut req = create_req("pvc-cr", GIB, rwo());
    req.parameters = params(&[("storagePool", "any_name")]);
    c.controller.create_volume(req).await.unwrap();
    assert!(base.join("csi/pvc-cr").is_dir());
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(
        log.contains("spec.workload"),
        "misplaced workload must be warned about: {log}"
    );
}

/// `--node-only-expansion` (what `render` deploys): no controller expansion
/// is advertised, and NodeExpandVolume alone grows the volume.
#[tokio::test]
async fn node_only_expansion_hides_controller_expansion() {
    use hostpath_csi::proto::controller_service_capability::rpc::Type as Cap;
    let dir = tempfile::Builder::new()
        .prefix("hpc-test-")
        .tempdir()
        .unwrap();
    let sock = dir.path().join("csi.sock");
    let datadir = format!(
        r#"[{{"name":"p","path":"{}"}}]"#,
        dir.path().join("pool").display()
    );
    let child = Command::new(env!("CARGO_BIN_EXE_hostpath-csi"))
        .args([
            "serve",
            "--nodeid",
            "n1",
            "--node-only-expansion",
            "--datadir",
            &datadir,
            "--endpoint",
        ])
        .arg(format!("unix://{}", sock.display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(child);
    let mut c = None;
    for _ in 0..200 {
        if sock.exists() {
            if let Ok(cl) =
                hostpath_csi::client::Clients::connect(&format!("unix://{}", sock.display())).await
            {
                c = Some(cl);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let mut c = c.expect("driver did not start");
    let caps = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let types: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    assert!(!types.contains(&(Cap::ExpandVolume as i32)));
    assert!(types.contains(&(Cap::CreateDeleteVolume as i32)));
    create_ok(&mut c, dir_volume("pvc-grow", GIB)).await;
    let target = dir.path().join("t");
    publish_ok(&mut c, "pvc-grow", &target, rwo()).await;
    let r = c
        .node
        .node_expand_volume(node_grow_req("pvc-grow", &target, 2 * GIB));
    assert_eq!(r.await.unwrap().into_inner().capacity_bytes, 2 * GIB);
    unpublish_ok(&mut c, "pvc-grow", &target).await;
}
