//! csi-bench: a load generator for any CSI endpoint.
//!
//! W1 provisions N volumes then deletes them with concurrency C; W2 publishes
//! and unpublishes K volumes. Each workload prints one JSON line and a human
//! table; `--baseline-dir` also times the same filesystem steps without gRPC,
//! and `--pid` samples the driver's RSS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hostpath_csi::client::{default_staging_path, Clients};
use hostpath_csi::proto::volume_capability::access_mode::Mode;
use hostpath_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use hostpath_csi::proto::*;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Load generator for CSI drivers")]
struct Args {
    /// CSI endpoint, unix:///path/to/csi.sock
    #[arg(long)]
    endpoint: String,
    /// Driver process to sample RSS from.
    #[arg(long)]
    pid: Option<u32>,
    /// StorageClass parameter key=value (repeatable).
    #[arg(long = "param")]
    params: Vec<String>,
    /// Ask for this node in accessibility requirements.
    #[arg(long)]
    node: Option<String>,
    /// Topology key for --node.
    #[arg(long, default_value = "topology.hostpath.csi/node")]
    topology_key: String,
    /// Volume size in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    size: i64,
    /// Use Block access type.
    #[arg(long)]
    block: bool,
    /// Connections to spread requests over (1 = one multiplexed connection, as kubelet and the sidecars use).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Also time the bare filesystem steps of a create/delete in this directory.
    #[arg(long)]
    baseline_dir: Option<PathBuf>,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Subcommand, Clone)]
enum Workload {
    /// Provision: N creates then N deletes.
    W1 {
        #[arg(short = 'n', long, default_value_t = 500)]
        count: usize,
        #[arg(short = 'c', long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Publish: K volumes published then unpublished.
    W2 {
        #[arg(short = 'k', long, default_value_t = 100)]
        count: usize,
        #[arg(short = 'c', long, default_value_t = 8)]
        concurrency: usize,
        /// Directory for publish targets.
        #[arg(long, default_value = "/tmp/csi-bench-targets")]
        target_dir: PathBuf,
    },
    /// W3 clone: a Block source with `--data-mib` of data spread over it,
    /// then `-k` clones of it (CreateVolume with a volume source).
    W3 {
        #[arg(short = 'k', long, default_value_t = 5)]
        count: usize,
        #[arg(long, default_value_t = 1024)]
        data_mib: u64,
        #[arg(long, default_value = "/tmp/csi-bench-targets")]
        target_dir: PathBuf,
    },
    /// W4 block I/O: sequential O_DIRECT write then read of `--mib` through
    /// a published Block volume (bs 1 MiB).
    W4 {
        #[arg(long, default_value_t = 2048)]
        mib: u64,
        #[arg(long, default_value = "/tmp/csi-bench-targets")]
        target_dir: PathBuf,
    },
    /// W1 then W2, repeated for a duration (soak), printing RSS and fd trends.
    Soak {
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(short = 'n', long, default_value_t = 200)]
        count: usize,
        #[arg(short = 'c', long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value = "/tmp/csi-bench-targets")]
        target_dir: PathBuf,
    },
}

/// Latencies and error codes of one phase.
#[derive(Default)]
struct Phase {
    name: String,
    latencies: Vec<Duration>,
    errors: BTreeMap<String, usize>,
    wall: Duration,
}

impl Phase {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let mut v = self.latencies.clone();
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    }

    fn ops_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "phase": self.name,
            "ops": self.latencies.len(),
            "ops_per_sec": (self.ops_per_sec() * 10.0).round() / 10.0,
            "p50_ms": self.percentile(0.50),
            "p99_ms": self.percentile(0.99),
            "max_ms": self.percentile(1.0),
            "errors": self.errors,
        })
    }

    fn row(&self) -> String {
        format!(
            "{:<18} {:>7} {:>11.1} {:>9.3} {:>9.3} {:>9.3}  {:?}",
            self.name,
            self.latencies.len(),
            self.ops_per_sec(),
            self.percentile(0.5),
            self.percentile(0.99),
            self.percentile(1.0),
            self.errors
        )
    }
}

fn capability(block: bool) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume::default())
        }),
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` tasks, timing each call.
async fn run_phase<F, Fut>(name: &str, n: usize, concurrency: usize, op: F) -> Phase
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errs: BTreeMap<String, usize> = BTreeMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                let r = op(i).await;
                lat.push(t.elapsed());
                if let Err(s) = r {
                    *errs.entry(format!("{:?}", s.code())).or_default() += 1;
                }
            }
            (lat, errs)
        }));
    }
    let mut phase = Phase {
        name: name.to_owned(),
        ..Default::default()
    };
    for t in tasks {
        let (lat, errs) = t.await.expect("bench task");
        phase.latencies.extend(lat);
        for (k, v) in errs {
            *phase.errors.entry(k).or_default() += v;
        }
    }
    phase.wall = started.elapsed();
    phase
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// CPU seconds (user + system) the driver has used.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Client CPU seconds (user + system) so far.
fn own_cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    tv(u.user_time()) + tv(u.system_time())
}

/// Samples the driver's peak RSS while a workload runs.
fn rss_sampler(
    pid: Option<u32>,
) -> (
    Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (p, s) = (peak.clone(), stop.clone());
    let handle = tokio::spawn(async move {
        let Some(pid) = pid else { return };
        while !s.load(Ordering::Relaxed) {
            if let Some(r) = rss_kib(pid) {
                p.fetch_max(r, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    (peak, handle, stop)
}

fn name_for(run: &str, i: usize) -> String {
    format!("bench-{run}-{i:06}")
}

async fn w1(
    args: &Args,
    cs: &[Clients],
    run: &str,
    count: usize,
    concurrency: usize,
) -> Vec<Phase> {
    let parameters: std::collections::HashMap<String, String> = args
        .params
        .iter()
        .filter_map(|p| p.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let requirement = args.node.as_ref().map(|n| {
        let t = Topology {
            segments: [(args.topology_key.clone(), n.clone())].into(),
        };
        TopologyRequirement {
            requisite: vec![t.clone()],
            preferred: vec![t],
        }
    });
    let (size, block, run_s) = (args.size, args.block, run.to_owned());
    let ctrls: Vec<_> = cs.iter().map(|c| c.controller.clone()).collect();
    let create = run_phase("create", count, concurrency, move |i| {
        let mut ctrl = ctrls[i % ctrls.len()].clone();
        let req = CreateVolumeRequest {
            name: name_for(&run_s, i),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(block)],
            parameters: parameters.clone(),
            accessibility_requirements: requirement.clone(),
            ..Default::default()
        };
        async move { ctrl.create_volume(req).await.map(|_| ()) }
    })
    .await;
    let (ctrls, run_s): (Vec<_>, _) = (
        cs.iter().map(|c| c.controller.clone()).collect(),
        run.to_owned(),
    );
    let delete = run_phase("delete", count, concurrency, move |i| {
        let mut ctrl = ctrls[i % ctrls.len()].clone();
        let req = DeleteVolumeRequest {
            volume_id: name_for(&run_s, i),
            ..Default::default()
        };
        async move { ctrl.delete_volume(req).await.map(|_| ()) }
    })
    .await;
    // The floor: the cheapest RPC there is, at the same concurrency, shows
    // what gRPC and the client cost before the driver does any work.
    let ids: Vec<_> = cs.iter().map(|c| c.identity.clone()).collect();
    let floor = run_phase("rpc-floor(probe)", count, concurrency, move |i| {
        let mut id = ids[i % ids.len()].clone();
        async move { id.probe(ProbeRequest {}).await.map(|_| ()) }
    })
    .await;
    vec![create, delete, floor]
}

async fn w2(
    args: &Args,
    cs: &[Clients],
    run: &str,
    count: usize,
    concurrency: usize,
    target_dir: &Path,
) -> Vec<Phase> {
    std::fs::create_dir_all(target_dir).expect("create target dir");
    let c = &cs[0];
    let mut ctrl = c.controller.clone();
    let mut contexts = Vec::new();
    for i in 0..count {
        let r = ctrl
            .create_volume(CreateVolumeRequest {
                name: name_for(run, i),
                capacity_range: Some(CapacityRange {
                    required_bytes: args.size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability(args.block)],
                ..Default::default()
            })
            .await
            .expect("create volume for W2");
        contexts.push(r.into_inner().volume.unwrap_or_default().volume_context);
    }
    let contexts = Arc::new(contexts);
    // Kubelet's flow: NodeStageVolume first when the driver asks for it.
    let stages = c.node_stages().await.expect("NodeGetCapabilities");
    let target_of = {
        let dir = target_dir.to_path_buf();
        move |name: &str| dir.join(name).to_string_lossy().into_owned()
    };
    let mut phases = Vec::new();
    if stages {
        let (node, run_s, target_of, block) = (
            c.node.clone(),
            run.to_owned(),
            target_of.clone(),
            args.block,
        );
        let contexts = contexts.clone();
        phases.push(
            run_phase("stage", count, concurrency, move |i| {
                let mut node = node.clone();
                let name = name_for(&run_s, i);
                let req = NodeStageVolumeRequest {
                    staging_target_path: default_staging_path(&target_of(&name)),
                    volume_id: name,
                    volume_capability: Some(capability(block)),
                    volume_context: contexts[i].clone(),
                    ..Default::default()
                };
                async move { node.node_stage_volume(req).await.map(|_| ()) }
            })
            .await,
        );
    }
    let (node, run_s, publish_target_of, block) = (
        c.node.clone(),
        run.to_owned(),
        target_of.clone(),
        args.block,
    );
    let publish = run_phase("publish", count, concurrency, move |i| {
        let mut node = node.clone();
        let name = name_for(&run_s, i);
        let target = publish_target_of(&name);
        let req = NodePublishVolumeRequest {
            volume_id: name,
            staging_target_path: if stages {
                default_staging_path(&target)
            } else {
                String::new()
            },
            target_path: target,
            volume_capability: Some(capability(block)),
            volume_context: contexts[i].clone(),
            ..Default::default()
        };
        async move { node.node_publish_volume(req).await.map(|_| ()) }
    })
    .await;
    let nodes: Vec<_> = cs.iter().map(|c| c.node.clone()).collect();
    let (run_s, dir) = (run.to_owned(), target_dir.to_path_buf());
    let unpublish = run_phase("unpublish", count, concurrency, move |i| {
        let mut node = nodes[i % nodes.len()].clone();
        let req = NodeUnpublishVolumeRequest {
            volume_id: name_for(&run_s, i),
            target_path: dir.join(name_for(&run_s, i)).to_string_lossy().into_owned(),
        };
        async move { node.node_unpublish_volume(req).await.map(|_| ()) }
    })
    .await;
    phases.extend([publish, unpublish]);
    if stages {
        let (node, run_s) = (c.node.clone(), run.to_owned());
        phases.push(
            run_phase("unstage", count, concurrency, move |i| {
                let mut node = node.clone();
                let name = name_for(&run_s, i);
                let req = NodeUnstageVolumeRequest {
                    staging_target_path: default_staging_path(&target_of(&name)),
                    volume_id: name,
                };
                async move { node.node_unstage_volume(req).await.map(|_| ()) }
            })
            .await,
        );
    }
    for i in 0..count {
        let _ = ctrl
            .delete_volume(DeleteVolumeRequest {
                volume_id: name_for(run, i),
                ..Default::default()
            })
            .await;
    }
    phases
}

/// The same steps a durable create and delete take, straight on the filesystem.
fn baseline(dir: &Path, count: usize, concurrency: usize) -> Vec<Phase> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join("tmp");
    let meta = dir.join("meta");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&meta).unwrap();
    let root = std::fs::File::open(dir).unwrap();
    let phase = |name: &str, step: &(dyn Fn(usize) + Sync)| {
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        let lat = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..concurrency.max(1) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let t = Instant::now();
                    step(i);
                    lat.lock().unwrap().push(t.elapsed());
                });
            }
        });
        Phase {
            name: name.into(),
            latencies: lat.into_inner().unwrap(),
            errors: BTreeMap::new(),
            wall: started.elapsed(),
        }
    };
    let create = phase("baseline-create", &|i| {
        let staged = tmp.join(format!("v{i}"));
        std::fs::create_dir(&staged).unwrap();
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o777)).unwrap();
        let m = meta.join(format!(".v{i}.tmp"));
        std::fs::write(&m, br#"{"id":"v","capacity_bytes":1073741824}"#).unwrap();
        std::fs::rename(&m, meta.join(format!("v{i}.json"))).unwrap();
        nix::unistd::fsync(&root).unwrap();
        std::fs::rename(&staged, dir.join(format!("v{i}"))).unwrap();
        nix::unistd::fsync(&root).unwrap();
    });
    let delete = phase("baseline-delete", &|i| {
        let doomed = tmp.join(format!("d{i}"));
        std::fs::rename(dir.join(format!("v{i}")), &doomed).unwrap();
        std::fs::remove_file(meta.join(format!("v{i}.json"))).unwrap();
        nix::unistd::fsync(&root).unwrap();
        std::fs::remove_dir(&doomed).unwrap();
    });
    // What the Go driver does for a create: one mkdir, nothing durable. No
    // driver that does at least this can create faster than this phase.
    let bare = phase("baseline-mkdir-only", &|i| {
        std::fs::create_dir(dir.join(format!("bare{i}"))).unwrap();
    });
    for i in 0..count {
        let _ = std::fs::remove_dir(dir.join(format!("bare{i}")));
    }
    vec![create, delete, bare]
}

/// A 1 MiB buffer aligned for O_DIRECT, filled with a pattern (touched
/// before any timing, as this VM charges for first touches).
struct AlignedBuffer {
    raw: Vec<u8>,
    offset: usize,
}

impl AlignedBuffer {
    const LEN: usize = 1 << 20;

    fn new() -> Self {
        let mut raw = vec![0u8; Self::LEN + 4096];
        let offset = raw.as_ptr().align_offset(4096);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        AlignedBuffer { raw, offset }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + Self::LEN]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + Self::LEN]
    }
}

/// Writes then reads `mib` MiB sequentially with O_DIRECT; MB/s each way.
fn direct_io(path: &Path, mib: u64, stride_mib: u64) -> (f64, f64) {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let buf = AlignedBuffer::new();
    let mut read_buf = AlignedBuffer::new();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .expect("open the published device");
    let started = Instant::now();
    for i in 0..mib {
        file.write_all_at(buf.bytes(), (i * stride_mib) << 20)
            .expect("write");
    }
    let write = (mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
    let started = Instant::now();
    for i in 0..mib {
        file.read_exact_at(read_buf.bytes_mut(), (i * stride_mib) << 20)
            .expect("read");
    }
    let read = (mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
    (write, read)
}

/// Creates and publishes a Block volume; returns its target path.
async fn published_block(c: &Clients, name: &str, size: i64, dir: &Path) -> PathBuf {
    let (mut ctrl, mut node) = (c.controller.clone(), c.node.clone());
    ctrl.create_volume(CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(true)],
        ..Default::default()
    })
    .await
    .expect("create the Block volume");
    std::fs::create_dir_all(dir).expect("create target dir");
    let target = dir.join(name);
    let staging = default_staging_path(&target.to_string_lossy());
    let stages = c.node_stages().await.expect("NodeGetCapabilities");
    if stages {
        node.node_stage_volume(NodeStageVolumeRequest {
            volume_id: name.into(),
            staging_target_path: staging.clone(),
            volume_capability: Some(capability(true)),
            ..Default::default()
        })
        .await
        .expect("stage the Block volume");
    }
    node.node_publish_volume(NodePublishVolumeRequest {
        volume_id: name.into(),
        target_path: target.to_string_lossy().into_owned(),
        staging_target_path: if stages { staging } else { String::new() },
        volume_capability: Some(capability(true)),
        ..Default::default()
    })
    .await
    .expect("publish the Block volume");
    target
}

async fn release(c: &Clients, name: &str, target: &Path) {
    let (mut ctrl, mut node) = (c.controller.clone(), c.node.clone());
    let _ = node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: name.into(),
            target_path: target.to_string_lossy().into_owned(),
        })
        .await;
    let _ = ctrl
        .delete_volume(DeleteVolumeRequest {
            volume_id: name.into(),
            ..Default::default()
        })
        .await;
}

async fn w3(
    c: &Clients,
    run: &str,
    count: usize,
    data_mib: u64,
    dir: &Path,
) -> (Vec<Phase>, serde_json::Value) {
    // Data in 16 runs spread over a file 10x its size, as a VM disk image.
    let size = ((data_mib.max(16) * 10) as i64) << 20;
    let source = format!("bench-{run}-w3src");
    let target = published_block(c, &source, size, dir).await;
    let runs = 16;
    let per_run = data_mib.max(16) / runs;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open source");
        let buf = AlignedBuffer::new();
        for r in 0..runs {
            for m in 0..per_run {
                file.write_all_at(buf.bytes(), ((r * (size as u64 >> 20) / runs) + m) << 20)
                    .expect("fill");
            }
        }
        file.sync_all().expect("flush source");
    }
    release_publish_only(c, &source, &target).await;
    let ctrl = c.controller.clone();
    let (src, run_s) = (source.clone(), run.to_owned());
    let phase = run_phase("clone", count, 1, move |i| {
        let mut ctrl = ctrl.clone();
        let req = CreateVolumeRequest {
            name: format!("bench-{run_s}-w3clone-{i}"),
            capacity_range: Some(CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![capability(true)],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(volume_content_source::Type::Volume(
                    volume_content_source::VolumeSource {
                        volume_id: src.clone(),
                    },
                )),
            }),
            ..Default::default()
        };
        async move { ctrl.create_volume(req).await.map(|_| ()) }
    })
    .await;
    let mut ctrl = c.controller.clone();
    for i in 0..count {
        let _ = ctrl
            .delete_volume(DeleteVolumeRequest {
                volume_id: format!("bench-{run}-w3clone-{i}"),
                ..Default::default()
            })
            .await;
    }
    let _ = ctrl
        .delete_volume(DeleteVolumeRequest {
            volume_id: source,
            ..Default::default()
        })
        .await;
    (
        vec![phase],
        json!({"virtual_mib": size >> 20, "data_mib": per_run * runs}),
    )
}

async fn release_publish_only(c: &Clients, name: &str, target: &Path) {
    let mut node = c.node.clone();
    let _ = node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: name.into(),
            target_path: target.to_string_lossy().into_owned(),
        })
        .await;
}

async fn w4(c: &Clients, run: &str, mib: u64, dir: &Path) -> serde_json::Value {
    let name = format!("bench-{run}-w4");
    let target = published_block(c, &name, (mib as i64) << 20, dir).await;
    let t = target.clone();
    let (write, read) = tokio::task::spawn_blocking(move || direct_io(&t, mib, 1))
        .await
        .expect("I/O task");
    release(c, &name, &target).await;
    json!({"mib": mib, "write_mb_s": write.round(), "read_mb_s": read.round()})
}

fn report(workload: &str, phases: &[Phase], extra: serde_json::Value) {
    let line = json!({
        "workload": workload,
        "phases": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        "extra": extra,
    });
    println!("{line}");
    eprintln!(
        "{:<18} {:>7} {:>11} {:>9} {:>9} {:>9}  errors",
        "phase", "ops", "ops/s", "p50 ms", "p99 ms", "max ms"
    );
    for p in phases {
        eprintln!("{}", p.row());
    }
    // The driver's own phases (not the baselines) used the measured CPU.
    let driver_ops: usize = phases
        .iter()
        .filter(|p| !p.name.starts_with("baseline"))
        .map(|p| p.latencies.len())
        .sum();
    let per_op = |key: &str| {
        extra[key].as_f64().map(|s| {
            format!(
                "{s:.2} s ({:.0} µs per timed op)",
                s * 1e6 / driver_ops.max(1) as f64
            )
        })
    };
    if let Some(client) = per_op("client_cpu_s") {
        let driver = per_op("driver_cpu_s").unwrap_or_else(|| "unknown (no --pid)".into());
        eprintln!("CPU: client {client}, driver {driver}");
    }
    for (key, label) in [
        ("driver_idle_rss_kib", "idle"),
        ("driver_peak_rss_kib", "peak"),
    ] {
        if let Some(kib) = extra[key].as_u64().filter(|k| *k > 0) {
            eprintln!("driver RSS {label}: {:.1} MiB", kib as f64 / 1024.0);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let mut cs = Vec::new();
    for _ in 0..args.connections.max(1) {
        cs.push(
            Clients::connect(&args.endpoint)
                .await
                .unwrap_or_else(|e| panic!("{e}")),
        );
    }
    let c = &cs;
    let run = format!("{:x}", std::process::id());
    let idle_rss = args.pid.and_then(rss_kib);
    let cpu_before = own_cpu_seconds();
    let driver_cpu_before = args.pid.and_then(process_cpu_seconds);
    let (peak, sampler, stop) = rss_sampler(args.pid);
    match args.workload.clone() {
        Workload::W1 { count, concurrency } => {
            let mut phases = w1(&args, c, &run, count, concurrency).await;
            let client_cpu = own_cpu_seconds() - cpu_before;
            let driver_cpu = driver_cpu_before
                .zip(args.pid.and_then(process_cpu_seconds))
                .map(|(a, b)| b - a);
            let mut extra = json!({});
            if let Some(dir) = &args.baseline_dir {
                let base_dir = dir.join(format!("baseline-{run}"));
                std::fs::create_dir_all(&base_dir).unwrap();
                let (n, cc) = (count, concurrency);
                let bd = base_dir.clone();
                let base = tokio::task::spawn_blocking(move || baseline(&bd, n, cc))
                    .await
                    .unwrap();
                let _ = std::fs::remove_dir_all(&base_dir);
                extra = json!({
                    "create_ratio_vs_baseline": phases[0].ops_per_sec() / base[0].ops_per_sec(),
                    "delete_ratio_vs_baseline": phases[1].ops_per_sec() / base[1].ops_per_sec(),
                });
                phases.extend(base);
            }
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            extra["client_cpu_s"] = json!(client_cpu);
            extra["driver_cpu_s"] = json!(driver_cpu);
            extra["driver_idle_rss_kib"] = json!(idle_rss);
            extra["driver_peak_rss_kib"] = json!(peak.load(Ordering::Relaxed));
            report("W1", &phases, extra);
        }
        Workload::W2 {
            count,
            concurrency,
            target_dir,
        } => {
            let phases = w2(&args, c, &run, count, concurrency, &target_dir).await;
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            report(
                "W2",
                &phases,
                json!({
                    "client_cpu_s": own_cpu_seconds() - cpu_before,
                    "driver_cpu_s": driver_cpu_before
                        .zip(args.pid.and_then(process_cpu_seconds))
                        .map(|(a, b)| b - a),
                    "driver_idle_rss_kib": idle_rss,
                    "driver_peak_rss_kib": peak.load(Ordering::Relaxed),
                }),
            );
        }
        Workload::W3 {
            count,
            data_mib,
            target_dir,
        } => {
            let (phases, mut extra) = w3(&c[0], &run, count, data_mib, &target_dir).await;
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            extra["driver_peak_rss_kib"] = json!(peak.load(Ordering::Relaxed));
            report("W3", &phases, extra);
        }
        Workload::W4 { mib, target_dir } => {
            let extra = w4(&c[0], &run, mib, &target_dir).await;
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
            println!("{}", json!({"workload": "W4", "extra": extra}));
            eprintln!("W4 block I/O through a published volume: {extra}");
        }
        Workload::Soak {
            seconds,
            count,
            concurrency,
            target_dir,
        } => {
            let started = Instant::now();
            let mut round = 0;
            eprintln!("round  elapsed_s  rss_kib  open_fds");
            while started.elapsed().as_secs() < seconds {
                let tag = format!("{run}r{round}");
                let mut phases = w1(&args, c, &tag, count, concurrency).await;
                phases.extend(
                    w2(
                        &args,
                        c,
                        &tag,
                        count.min(100),
                        concurrency.min(8),
                        &target_dir,
                    )
                    .await,
                );
                let rss = args.pid.and_then(rss_kib);
                let fds = args.pid.and_then(open_fds);
                let errors: usize = phases
                    .iter()
                    .map(|p| p.errors.values().sum::<usize>())
                    .sum();
                println!(
                    "{}",
                    json!({"workload": "soak", "round": round, "elapsed_s": started.elapsed().as_secs(), "rss_kib": rss, "open_fds": fds, "errors": errors})
                );
                eprintln!(
                    "{round:>5}  {:>9}  {:>7?}  {:>8?}",
                    started.elapsed().as_secs(),
                    rss,
                    fds
                );
                round += 1;
            }
            stop.store(true, Ordering::Relaxed);
            let _ = sampler.await;
        }
    }
}
