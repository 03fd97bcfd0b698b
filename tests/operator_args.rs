//! Path A: the image under upstream's operator, unchanged. The binary is
//! started with exactly the argument vector the operator's DaemonSet gives
//! the CSI container (no subcommand), expanded by the environment as kubelet
//! does, from `/` as the working directory and with upstream's relative
//! `PV_DIR`. It must serve CSI on the socket, and metrics where upstream's
//! driver serves them: HTTPS on :8443 with `--metrics-tls-version` (current
//! operator), plain HTTP on :8080 without (the 2025 releases), carrying the
//! series upstream's `HPPSharingPoolPathWithOS` alert matches.
//!
//! As root, each driver runs in its own network namespace so the fixed
//! ports cannot collide with anything on the machine; the test talks to it
//! from a thread that joins that namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hostpath-csi");

/// kubevirt/hostpath-provisioner-operator v0.25.2 (19e72bf84f20), and main
/// at 03d4d6711f6a: pkg/controller/hostpathprovisioner/daemonset.go,
/// createCSIDaemonSetObject, the `hostpath-provisioner` container's Args.
/// The TLS version is the APIServer's profile minimum; VersionTLS13 is the
/// default (pkg/util/cryptopolicy GetTLSMinVersionString).
const CURRENT_OPERATOR_ARGS: &[&str] = &[
    "--drivername=kubevirt.io.hostpath-provisioner",
    "--v=3",
    "--endpoint=$(CSI_ENDPOINT)",
    "--nodeid=$(NODE_NAME)",
    "--version=$(VERSION)",
    "--datadir=$(PV_DIR)",
    "--metrics-tls-version=VersionTLS13",
];

/// kubevirt/hostpath-provisioner-operator v0.24.0 (fa7a3214dacc, 2025-12-03;
/// v0.22.0 and v0.23.0 of 2025 are the same): the same container's Args.
const OPERATOR_2025_ARGS: &[&str] = &[
    "--drivername=kubevirt.io.hostpath-provisioner",
    "--v=3",
    "--endpoint=$(CSI_ENDPOINT)",
    "--nodeid=$(NODE_NAME)",
    "--version=$(VERSION)",
    "--datadir=$(PV_DIR)",
];

/// The operator's CSI_ENDPOINT value is `unix:///csi/csi.sock`; here the
/// socket lives in the test's directory.
const NODE: &str = "worker-0.example.com";
const VERSION: &str = "v4.99.0-test";

/// kubelet's `$(VAR)` expansion of container args from the container's env.
fn expand(arg: &str, env: &[(&str, String)]) -> String {
    env.iter()
        .fold(arg.to_owned(), |a, (k, v)| a.replace(&format!("$({k})"), v))
}

/// A directory right below `/`, so that a relative PV_DIR resolved against
/// `/` lands in it; removed on drop.
struct RootTempDir(PathBuf);

impl RootTempDir {
    fn new(tag: &str) -> RootTempDir {
        let name = format!(
            "hpc-test-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let dir = Path::new("/").join(name);
        std::fs::create_dir(&dir).unwrap();
        RootTempDir(dir)
    }

    /// The name relative to `/`.
    fn relative(&self) -> String {
        self.0.file_name().unwrap().to_string_lossy().into_owned()
    }
}

impl Drop for RootTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills and reaps the driver on drop.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sets `lo` up in the calling process's (fresh) network namespace.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain syscalls on a zeroed ifreq and a socket we close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

struct Started {
    driver: Reap,
    socket: PathBuf,
    log: PathBuf,
    /// The driver's network namespace, when it has its own.
    netns: Option<PathBuf>,
}

/// Starts the binary as the operator's DaemonSet would, with `args`.
fn start(args: &[&str], dir: &RootTempDir) -> Started {
    // The pool as upstream mounts it: /<pool>-data-dir, with PV_DIR naming
    // `<pool>-data-dir/csi` relative to `/`.
    let mount = format!("{}/local-data-dir", dir.relative());
    std::fs::create_dir_all(dir.0.join("local-data-dir")).unwrap();
    let socket = dir.0.join("csi.sock");
    let env = [
        ("CSI_ENDPOINT", format!("unix://{}", socket.display())),
        ("NODE_NAME", NODE.to_owned()),
        (
            "PV_DIR",
            format!(r#"[{{"name":"local","path":"{mount}/csi","shared":false}}]"#),
        ),
        ("VERSION", VERSION.to_owned()),
    ];
    let argv: Vec<String> = args.iter().map(|a| expand(a, &env)).collect();
    assert!(argv.iter().all(|a| !a.contains("$(")), "{argv:?}");
    let log = dir.0.join("driver.log");
    let mut cmd = Command::new(BIN);
    cmd.args(&argv)
        .current_dir("/")
        .env("POD_IP", "127.0.0.1")
        .env("POD_NAMESPACE", "openshift-cnv")
        .env("SERVICE_NAME", "hpp-prometheus-metrics")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let own_netns = is_root();
    if own_netns {
        // SAFETY: only syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                loopback_up()
            });
        }
    }
    let driver = Reap(cmd.spawn().unwrap());
    let netns = own_netns.then(|| PathBuf::from(format!("/proc/{}/ns/net", driver.0.id())));
    Started {
        driver,
        socket,
        log,
        netns,
    }
}

impl Started {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `f` on a thread inside the driver's network namespace.
    fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let netns = self.netns.clone();
        std::thread::spawn(move || {
            if let Some(ns) = netns {
                let file = std::fs::File::open(ns).unwrap();
                // setns on a network namespace changes this thread only.
                // SAFETY: a valid descriptor of a namespace file.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap()
    }

    fn wait_for_socket(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Ok(Some(status)) = self.driver.0.try_wait() {
                panic!("driver exited ({status}); log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "no socket; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("ctl")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap()
    }
}

/// Accepts any server certificate: the endpoint's is self-signed, as
/// upstream's (the ServiceMonitor scrapes with insecureSkipVerify).
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn tls_client(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

const REQUEST: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";

/// One GET /metrics over TLS; returns the protocol version and the response.
fn https_get(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(rustls::ProtocolVersion, String)> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(REQUEST)?;
    let mut text = String::new();
    match tls.read_to_string(&mut text) {
        Ok(_) => {}
        // A peer that closes without close_notify after a whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !text.is_empty() => {}
        Err(e) => return Err(e),
    }
    let version = tls.conn.protocol_version().expect("handshake done");
    Ok((version, text))
}

fn http_get(port: u16) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.write_all(REQUEST)?;
    let mut text = String::new();
    tcp.read_to_string(&mut text)?;
    Ok(text)
}

/// The value of the series named `series` exactly (name and labels).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// What both releases must serve: CSI on the socket with the operator's
/// driver name and version, volumes in the relative pool under `/`.
fn check_csi(started: &mut Started, dir: &RootTempDir) {
    started.wait_for_socket();
    let info = started.ctl(&["info"]);
    let stdout = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(
        stdout.contains("kubevirt.io.hostpath-provisioner"),
        "{stdout}"
    );
    assert!(stdout.contains(VERSION), "{stdout}");
    let created = started.ctl(&["create-volume", "pvc-op-1", "--size", "1Mi"]);
    assert!(
        created.status.success(),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&created.stderr),
        started.log()
    );
    assert!(
        dir.0.join("local-data-dir/csi/pvc-op-1").is_dir(),
        "the volume is not in /{}/local-data-dir/csi; log:\n{}",
        dir.relative(),
        started.log()
    );
}

/// The pool and the socket share the temp dir's filesystem, so upstream's
/// meaning gives 1, and `kubevirt_hpp_pool_path_shared_with_os == 1` (the
/// alert's whole expression, no label matchers) selects it.
fn check_alert_series(body: &str) {
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("# TYPE kubevirt_hpp_pool_path_shared_with_os gauge"),
        "{body}"
    );
    assert_eq!(
        value(
            body,
            r#"kubevirt_hpp_pool_path_shared_with_os{pool="local"}"#
        ),
        Some(1.0),
        "{body}"
    );
}

#[test]
fn the_current_operators_arguments_serve_csi_and_https_metrics_on_8443() {
    let dir = RootTempDir::new("current");
    let mut started = start(CURRENT_OPERATOR_ARGS, &dir);
    check_csi(&mut started, &dir);
    if started.netns.is_none() {
        eprintln!("not root: skipping the metrics checks on the fixed ports");
        return;
    }
    let (version, body) = started.in_netns(|| {
        let config = tls_client(&[&rustls::version::TLS13, &rustls::version::TLS12]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match https_get(8443, config.clone()) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("no HTTPS on :8443: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    assert_eq!(version, rustls::ProtocolVersion::TLSv1_3);
    check_alert_series(&body);
    // VersionTLS13 is a minimum: a TLS 1.2-only client is refused.
    let old = started.in_netns(|| https_get(8443, tls_client(&[&rustls::version::TLS12])));
    assert!(old.is_err(), "a TLS 1.2 client got an answer: {old:?}");
    // No plain HTTP anywhere in this form.
    let plain = started.in_netns(|| http_get(8080));
    assert!(plain.is_err(), "{plain:?}");
    let log = started.log();
    assert!(log.contains("Go driver's command line"), "{log}");
}

#[test]
fn the_2025_operators_arguments_serve_csi_and_plain_metrics_on_8080() {
    let dir = RootTempDir::new("2025");
    let mut started = start(OPERATOR_2025_ARGS, &dir);
    check_csi(&mut started, &dir);
    if started.netns.is_none() {
        eprintln!("not root: skipping the metrics checks on the fixed ports");
        return;
    }
    let body = started.in_netns(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match http_get(8080) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("no HTTP on :8080: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    check_alert_series(&body);
    let tls = started.in_netns(|| https_get(8443, tls_client(&[&rustls::version::TLS13])));
    assert!(tls.is_err(), "{tls:?}");
}

#[test]
fn given_certificate_files_are_served_and_verify_against_their_ca() {
    let dir = RootTempDir::new("certs");
    // A certificate for localhost, trusted by the client as its own root.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_file, key_file) = (dir.0.join("tls.crt"), dir.0.join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let cert_arg = format!("--metrics-cert-file={}", cert_file.display());
    let key_arg = format!("-metrics-key-file={}", key_file.display());
    let mut args = CURRENT_OPERATOR_ARGS.to_vec();
    args.extend([
        cert_arg.as_str(),
        key_arg.as_str(),
        "-logtostderr",
        "-alsologtostderr=false",
    ]);
    let mut started = start(&args, &dir);
    check_csi(&mut started, &dir);
    if started.netns.is_none() {
        return;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let (_, body) = started.in_netns(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match https_get(8443, config.clone()) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("no verified HTTPS: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    check_alert_series(&body);
    let log = started.log();
    assert!(log.contains("logtostderr"), "klog flags are noted: {log}");
}

#[test]
fn a_bad_go_command_line_exits_2_as_gos_flag_package() {
    let out = Command::new(BIN)
        .args(["--drivername=x", "--nodeid"])
        .current_dir("/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("flag needs an argument: -nodeid"),
        "{stderr}"
    );
}

#[test]
fn serve_keeps_its_flags_and_has_no_metrics_endpoint_unless_asked() {
    let dir = RootTempDir::new("serve");
    let pool = dir.0.join("pool");
    std::fs::create_dir(&pool).unwrap();
    let socket = dir.0.join("csi.sock");
    let log = dir.0.join("driver.log");
    let mut started = Started {
        driver: Reap(
            Command::new(BIN)
                .args(["serve", "--nodeid", NODE, "--endpoint"])
                .arg(format!("unix://{}", socket.display()))
                .arg("--datadir")
                .arg(format!(r#"[{{"name":"p","path":"{}"}}]"#, pool.display()))
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ),
        socket,
        log,
        netns: None,
    };
    started.wait_for_socket();
    let created = started.ctl(&["create-volume", "pvc-serve-1", "--size", "1Mi"]);
    assert!(created.status.success());
    assert!(pool.join("pvc-serve-1").is_dir());
    assert!(
        !started.log().contains("serving metrics"),
        "{}",
        started.log()
    );
}

/// `render` turns the metrics endpoint on: the rendered driver container's
/// own arguments (with kubelet's expansion) serve HTTPS on 8443, where the
/// rendered Service and ServiceMonitor point.
#[test]
fn the_rendered_daemonsets_driver_arguments_serve_https_metrics() {
    let dir = RootTempDir::new("render");
    let pool = dir.0.join("pool");
    let cr = dir.0.join("hpp.yaml");
    std::fs::write(
        &cr,
        format!(
            "apiVersion: hostpathprovisioner.kubevirt.io/v1beta1\nkind: HostPathProvisioner\nmetadata: {{name: hpp}}\nspec:\n  storagePools:\n  - {{name: local, path: {}}}\n",
            pool.display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["render", "--platform", "openshift", "--cr"])
        .arg(&cr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    let ds: serde_json::Value = yaml
        .split("\n---\n")
        .skip(1)
        .map(|d| serde_norway::from_str::<serde_json::Value>(d).unwrap())
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let driver = &ds["spec"]["template"]["spec"]["containers"][0];
    let socket = dir.0.join("csi.sock");
    let env = [
        ("NODE_NAME", NODE.to_owned()),
        ("POD_NAMESPACE", "hostpath-provisioner".to_owned()),
    ];
    let args: Vec<String> = driver["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap(), &env))
        // The socket lives in the test's directory, not the pod's /csi.
        .map(|a| {
            a.replace(
                "unix:///csi/csi.sock",
                &format!("unix://{}", socket.display()),
            )
        })
        .collect();
    assert!(
        args.contains(&"--metrics-tls-version=VersionTLS13".to_owned()),
        "{args:?}"
    );
    let log = dir.0.join("driver.log");
    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null());
    let own_netns = is_root();
    if own_netns {
        // SAFETY: only syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                loopback_up()
            });
        }
    }
    let driver = Reap(cmd.spawn().unwrap());
    let netns = own_netns.then(|| PathBuf::from(format!("/proc/{}/ns/net", driver.0.id())));
    let mut started = Started {
        driver,
        socket,
        log,
        netns,
    };
    started.wait_for_socket();
    if started.netns.is_none() {
        return;
    }
    let port = ds["spec"]["template"]["spec"]["containers"][0]["ports"][1]["containerPort"]
        .as_u64()
        .unwrap() as u16;
    let (_, body) = started.in_netns(move || {
        let config = tls_client(&[&rustls::version::TLS13]);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match https_get(port, config.clone()) {
                Ok(v) => return v,
                Err(e) if Instant::now() > deadline => panic!("no HTTPS on :{port}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"kubevirt_hpp_pool_path_shared_with_os{pool="local"}"#),
        "{body}"
    );
}
