//! A fake node: a temp directory stands for the node's root, except `/dev`,
//! which is the real one (loop devices appear only there). The driver runs
//! in podman from the built image with the rendered mounts mapped onto it.
//! Dropping the node removes its containers, mounts and loop devices, even
//! when a test fails.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hostpath_csi::block::FileId;
use hostpath_csi::client::Clients;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use tempfile::TempDir;

use super::spec::{DriverSpec, Propagation};

/// Runs podman with an argument vector; panics with its stderr on failure.
pub fn podman(args: &[&str]) -> Output {
    let out = Command::new("podman")
        .args(args)
        .output()
        .expect("run podman (apt-get install podman runc)");
    assert!(
        out.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Loads the OCI archive `hack/image.sh` wrote, so `image` runs without a
/// registry.
pub fn load_image(archive: &Path, image: &str) {
    assert!(
        archive.exists(),
        "{} is missing: run `bash hack/image.sh` first",
        archive.display()
    );
    podman(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    podman(&["image", "exists", image]);
}

pub struct Node {
    root: TempDir,
    pub name: String,
    /// In every container name, volume and snapshot name of this node.
    pub tag: String,
    containers: Vec<String>,
    /// Every file a loop device may sit on.
    backing: Vec<FileId>,
}

impl Node {
    /// A node whose root is a fresh temp dir, bound onto itself and made
    /// rshared: `/` is private here, and a Bidirectional mount only reaches
    /// the host from a shared mount.
    pub fn new(name: &str, tag: &str) -> Node {
        let root = tempfile::Builder::new()
            .prefix(&format!("hpc-e2e-{tag}-"))
            .tempdir()
            .unwrap();
        let p = root.path();
        mount(Some(p), p, None::<&str>, MsFlags::MS_BIND, None::<&str>).expect("bind node root");
        mount(
            None::<&str>,
            p,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
        .expect("make node root rshared");
        Node {
            root,
            name: name.to_owned(),
            tag: tag.to_owned(),
            containers: Vec::new(),
            backing: Vec::new(),
        }
    }

    /// Where a path of the node lives on this machine.
    pub fn host(&self, node_path: &Path) -> PathBuf {
        if node_path.starts_with("/dev") {
            return node_path.to_owned();
        }
        self.root
            .path()
            .join(node_path.strip_prefix("/").unwrap_or(node_path))
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Remembers a file that loop devices may be attached to, so cleanup
    /// finds them by inode (their path is the one the container saw).
    pub fn track_backing(&mut self, host_file: &Path) {
        if let Ok(Some(id)) = FileId::of_path(host_file) {
            if !self.backing.contains(&id) {
                self.backing.push(id);
            }
        }
    }

    /// Loop devices on any tracked file.
    pub fn attached_loops(&self) -> Vec<u32> {
        hostpath_csi::block::list_attached()
            .into_iter()
            .filter(|d| self.backing.contains(&d.file))
            .map(|d| d.number)
            .collect()
    }

    /// Loop devices on tracked files once detaches settle: a detach the
    /// driver asked for while another process had the device open for a
    /// moment (another driver's start-up scan, udev, lsblk) completes at
    /// that process's close, an instant later.
    pub async fn settled_loops(&self) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.attached_loops();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `loops_on` once detaches settle (see `settled_loops`).
    pub async fn settled_loops_on(&self, host_file: &Path) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.loops_on(host_file);
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loop devices on one file (by device and inode: the kernel keeps the
    /// path the container saw).
    pub fn loops_on(&self, host_file: &Path) -> Vec<u32> {
        let Ok(Some(id)) = FileId::of_path(host_file) else {
            return Vec::new();
        };
        hostpath_csi::block::list_attached()
            .into_iter()
            .filter(|d| d.file == id)
            .map(|d| d.number)
            .collect()
    }

    /// Starts the driver container as kubelet would from `spec`; returns its name.
    pub fn start_driver(&mut self, spec: &DriverSpec) -> String {
        let name = format!("hpc-e2e-{}-{}", self.tag, self.containers.len());
        let args = self.run_args(spec, &name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.containers.push(name.clone());
        podman(&args);
        name
    }

    fn run_args(&self, spec: &DriverSpec, name: &str) -> Vec<String> {
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .expect("getrlimit");
        let mut a: Vec<String> = [
            "run",
            "--detach",
            "--name",
            name,
            "--pull",
            "never",
            "--runtime",
            "runc",
            "--log-driver",
            "k8s-file",
            "--ulimit",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Root here lacks CAP_SYS_RESOURCE: podman must not raise limits.
        a.push(format!("nofile={hard}:{hard}"));
        a.extend(["--ulimit".into(), "nproc=32768:32768".into()]);
        a.extend([
            "--network".into(),
            if spec.host_network { "host" } else { "none" }.into(),
        ]);
        if spec.privileged {
            a.push("--privileged".into());
        }
        for (k, v) in &spec.env {
            a.extend(["--env".into(), format!("{k}={v}")]);
        }
        for m in &spec.mounts {
            let host = self.host(&m.host);
            match m.host_type.as_str() {
                "DirectoryOrCreate" => std::fs::create_dir_all(&host).unwrap(),
                "Directory" => assert!(host.is_dir(), "hostPath {} must exist", m.host.display()),
                other => panic!("hostPath type {other:?} is not simulated"),
            }
            let propagation = match m.propagation {
                Propagation::None => "rprivate",
                Propagation::HostToContainer => "rslave",
                Propagation::Bidirectional => "rshared",
            };
            let ro = if m.read_only { "ro," } else { "" };
            a.extend([
                "--volume".into(),
                format!(
                    "{}:{}:{ro}{propagation}",
                    host.display(),
                    m.container.display()
                ),
            ]);
        }
        if let Some(command) = &spec.command {
            a.extend([
                "--entrypoint".into(),
                serde_json::to_string(&command[..1]).unwrap(),
            ]);
        }
        a.push(spec.image.clone());
        if let Some(command) = &spec.command {
            a.extend(command[1..].iter().cloned());
        }
        a.extend(spec.args.iter().cloned());
        a
    }

    /// Waits until the driver answers Probe with ready on its socket.
    pub async fn connect(&self, spec: &DriverSpec, container: &str) -> Clients {
        let socket = self.host(&spec.socket);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let is_socket =
                std::fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket());
            if is_socket {
                if let Ok(c) = Clients::connect(&format!("unix://{}", socket.display())).await {
                    let probe = c
                        .identity
                        .clone()
                        .probe(hostpath_csi::proto::ProbeRequest {})
                        .await;
                    if probe.is_ok_and(|r| r.into_inner().ready != Some(false)) {
                        return c;
                    }
                }
            }
            assert!(
                self.running(container),
                "driver container exited:\n{}",
                logs(container)
            );
            assert!(
                Instant::now() < deadline,
                "driver not ready:\n{}",
                logs(container)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn running(&self, container: &str) -> bool {
        let out = podman(&["inspect", "--format", "{{.State.Running}}", container]);
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    /// SIGTERM, as kubelet stops a container in a rolling update; waits for it.
    pub fn stop(&self, container: &str) {
        podman(&["stop", "--time", "30", container]);
    }

    /// Containers of this node that podman still knows.
    pub fn leftover_containers(&self) -> Vec<String> {
        let out = podman(&[
            "ps",
            "--all",
            "--format",
            "{{.Names}}",
            "--filter",
            &format!("name=hpc-e2e-{}-", self.tag),
        ]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Removes the containers (keeping nothing behind), as the end of a test does.
    pub fn remove_containers(&mut self) {
        for c in self.containers.drain(..) {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0", &c])
                .output();
        }
    }

    /// Mount points below the node root, the root's own bind excluded.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        hostpath_csi::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(self.root()) && p != self.root())
            .collect()
    }
}

pub fn logs(container: &str) -> String {
    let out = Command::new("podman").args(["logs", container]).output();
    out.map(|o| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
    .unwrap_or_default()
}

/// Unmounts everything below `root`, deepest first, `root` itself last.
fn unmount_below(root: &Path) {
    for _ in 0..4 {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = hostpath_csi::mount::parse_mountinfo(&text)
            .into_iter()
            .map(|m| m.mount_point)
            .filter(|p| p.starts_with(root))
            .collect();
        if points.is_empty() {
            break;
        }
        points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for p in points {
            let _ = umount2(&p, MntFlags::MNT_DETACH);
        }
    }
}

fn detach(loops: &[u32]) {
    for n in loops {
        let _ = Command::new("losetup")
            .arg("-d")
            .arg(format!("/dev/loop{n}"))
            .status();
    }
}

/// The run tag in a node dir's name (`hpc-e2e-<tag>-<random>`), and the pid
/// of the test process it ends with.
fn stale_tag(dir_name: &str) -> Option<(String, String)> {
    let (tag, _) = dir_name.strip_prefix("hpc-e2e-")?.rsplit_once('-')?;
    let pid = tag.trim_start_matches(|c: char| !c.is_ascii_digit());
    (!pid.is_empty()).then(|| (tag.to_owned(), pid.to_owned()))
}

/// Cleans up after e2e runs that were killed before their guards ran
/// (SIGKILL, an abort): their containers, mounts, loop devices and dirs.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let Some((tag, pid)) = stale_tag(&e.file_name().to_string_lossy()) else {
            continue;
        };
        if Path::new("/proc").join(&pid).exists() {
            continue;
        }
        let out = Command::new("podman")
            .args(["ps", "--all", "--format", "{{.Names}}", "--filter"])
            .arg(format!("name=hpc-e2e-{tag}-"))
            .output();
        let names = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        for c in names.unwrap_or_default().lines() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0", c])
                .output();
        }
        unmount_below(&e.path());
        let files: Vec<FileId> = walk_files(&e.path())
            .iter()
            .filter_map(|f| FileId::of_path(f).ok().flatten())
            .collect();
        let loops: Vec<u32> = hostpath_csi::block::list_attached()
            .into_iter()
            .filter(|d| files.contains(&d.file))
            .map(|d| d.number)
            .collect();
        detach(&loops);
        let _ = std::fs::remove_dir_all(e.path());
    }
}

fn walk_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Not eprintln!: a closed stderr must not turn this into an abort.
            for c in &self.containers {
                let _ = writeln!(std::io::stderr(), "---- logs of {c}:\n{}", logs(c));
            }
        }
        self.remove_containers();
        unmount_below(self.root.path());
        detach(&self.attached_loops());
    }
}
