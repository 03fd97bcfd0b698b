//! csi-bench: a load generator for any CSI endpoint.
//!
//! W1 provisions N volumes then deletes them with concurrency C; W2 publishes
//! and unpublishes K volumes; `storm` measures Probe and publish latency
//! under stats walks and clones; `list` times ListVolumes paging. Each
//! workload prints one JSON line and a human table; `--baseline-dir` also
//! times the same filesystem steps without gRPC, and `--pid` samples the
//! driver's RSS.
//!
//! Every request after CreateVolume names the volume by the ID the driver
//! returned, never by the name asked for. Every workload ends by checking
//! ListVolumes for anything it created and left behind, and exits non-zero
//! when it did, or when a call failed with an error no correct driver gives.

#[path = "csi_bench/blockio.rs"]
mod blockio;
#[path = "csi_bench/ledger.rs"]
mod ledger;
#[path = "csi_bench/list.rs"]
mod list;
#[path = "csi_bench/phase.rs"]
mod phase;
#[path = "csi_bench/procfs.rs"]
mod procfs;
#[path = "csi_bench/storm.rs"]
mod storm;
#[path = "csi_bench/volumes.rs"]
mod volumes;
#[path = "csi_bench/w1.rs"]
mod w1;
#[path = "csi_bench/w2.rs"]
mod w2;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use hostpath_csi::client::Clients;
use serde_json::json;
use tonic::Status;

use ledger::Ledger;
use phase::{report, Phase};
use procfs::{open_fds, own_cpu_seconds, process_cpu_seconds, rss_kib, RssSampler};
use volumes::Spec;

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
    /// Touch (and free) this much memory before the workload starts.
    #[arg(long, default_value_t = 0)]
    pretouch_mib: u64,
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
    /// Probe and publish latency, quiet then under a storm of stats calls
    /// on a volume of many files and of concurrent clones.
    Storm(storm::StormArgs),
    /// ListVolumes: `--count` volumes listed in pages of `--page`, then in one listing.
    List {
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 100)]
        page: i32,
        #[arg(short = 'c', long, default_value_t = 16)]
        concurrency: usize,
    },
}

/// What every workload shares.
pub struct Ctx {
    pub endpoint: String,
    pub cs: Vec<Clients>,
    pub spec: Spec,
    pub size: i64,
    pub block: bool,
    /// Unique per run, in every name the run asks for.
    pub run: String,
    pub ledger: Arc<Ledger>,
}

impl Ctx {
    /// A new connection; the controller takes listings of any size (a
    /// driver that does not cap its pages answers one message for all).
    pub async fn connect(&self) -> Result<Clients, Status> {
        let mut c = Clients::connect(&self.endpoint)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        c.controller = c.controller.max_decoding_message_size(1 << 30);
        Ok(c)
    }
}

/// A directory of its own for this run's targets; removed at the end if
/// the driver left it empty (never recursively: a mount may be left).
fn run_dir(target_dir: &Path, run: &str) -> PathBuf {
    let dir = target_dir.join(format!("bench-{run}"));
    std::fs::create_dir_all(&dir).expect("create the target directory");
    dir
}

fn remove_run_dir(ctx: &Ctx, dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            // Staging directories the CO would remove; anything else stays.
            let _ = std::fs::remove_dir(e.path());
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        ctx.ledger
            .problem(format!("targets left in {}: {e}", dir.display()));
    }
}

/// Client and driver CPU, and the driver's RSS, over a workload.
struct Usage {
    pid: Option<u32>,
    idle_rss: Option<u64>,
    cpu_before: f64,
    driver_cpu_before: Option<f64>,
    sampler: RssSampler,
}

impl Usage {
    fn start(pid: Option<u32>) -> Usage {
        Usage {
            pid,
            idle_rss: pid.and_then(rss_kib),
            cpu_before: own_cpu_seconds(),
            driver_cpu_before: pid.and_then(process_cpu_seconds),
            sampler: RssSampler::start(pid),
        }
    }

    /// Adds the CPU and RSS figures to `extra`.
    async fn finish(self, extra: &mut serde_json::Value) {
        extra["client_cpu_s"] = json!(own_cpu_seconds() - self.cpu_before);
        extra["driver_cpu_s"] = json!(self
            .driver_cpu_before
            .zip(self.pid.and_then(process_cpu_seconds))
            .map(|(a, b)| b - a));
        extra["driver_idle_rss_kib"] = json!(self.idle_rss);
        extra["driver_peak_rss_kib"] = json!(self.sampler.finish().await);
    }
}

async fn run_w1(ctx: &Ctx, args: &Args, count: usize, concurrency: usize) {
    let usage = Usage::start(args.pid);
    let mut phases = w1::w1(ctx, &ctx.run, count, concurrency).await;
    ctx.ledger.check_phases(&phases);
    let mut extra = json!({});
    usage.finish(&mut extra).await;
    if let Some(dir) = &args.baseline_dir {
        let base_dir = dir.join(format!("baseline-{}", ctx.run));
        std::fs::create_dir_all(&base_dir).expect("create the baseline directory");
        let bd = base_dir.clone();
        let base = tokio::task::spawn_blocking(move || w1::baseline(&bd, count, concurrency))
            .await
            .expect("baseline task");
        let _ = std::fs::remove_dir_all(&base_dir);
        extra["create_ratio_vs_baseline"] = json!(phases[0].ops_per_sec() / base[0].ops_per_sec());
        extra["delete_ratio_vs_baseline"] = json!(phases[1].ops_per_sec() / base[1].ops_per_sec());
        ctx.ledger.check_phases(&base);
        phases.extend(base);
    }
    report("W1", &phases, extra);
}

/// Runs a workload whose phases all belong to the driver, and reports it.
async fn run_simple(
    ctx: &Ctx,
    args: &Args,
    name: &str,
    phases: impl std::future::Future<Output = (Vec<Phase>, serde_json::Value)>,
) {
    let usage = Usage::start(args.pid);
    let (phases, mut extra) = phases.await;
    ctx.ledger.check_phases(&phases);
    usage.finish(&mut extra).await;
    report(name, &phases, extra);
}

async fn run_soak(
    ctx: &Ctx,
    args: &Args,
    seconds: u64,
    count: usize,
    concurrency: usize,
    dir: &Path,
) {
    let started = Instant::now();
    let mut round = 0;
    eprintln!("round  elapsed_s  rss_kib  open_fds");
    while started.elapsed().as_secs() < seconds {
        let tag = format!("{}r{round}", ctx.run);
        let mut phases = w1::w1(ctx, &tag, count, concurrency).await;
        phases.extend(w2::w2(ctx, &tag, count.min(100), concurrency.min(8), dir).await);
        ctx.ledger.check_phases(&phases);
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
}

async fn run(ctx: &Ctx, args: &Args) {
    match args.workload.clone() {
        Workload::W1 { count, concurrency } => run_w1(ctx, args, count, concurrency).await,
        Workload::W2 {
            count,
            concurrency,
            target_dir,
        } => {
            let dir = run_dir(&target_dir, &ctx.run);
            let phases = async {
                (
                    w2::w2(ctx, &ctx.run, count, concurrency, &dir).await,
                    json!({}),
                )
            };
            run_simple(ctx, args, "W2", phases).await;
            remove_run_dir(ctx, &dir);
        }
        Workload::W3 {
            count,
            data_mib,
            target_dir,
        } => {
            let dir = run_dir(&target_dir, &ctx.run);
            run_simple(ctx, args, "W3", blockio::w3(ctx, count, data_mib, &dir)).await;
            remove_run_dir(ctx, &dir);
        }
        Workload::W4 { mib, target_dir } => {
            let dir = run_dir(&target_dir, &ctx.run);
            let extra = blockio::w4(ctx, mib, &dir).await;
            println!("{}", json!({"workload": "W4", "extra": extra}));
            eprintln!("W4 block I/O through a published volume: {extra}");
            remove_run_dir(ctx, &dir);
        }
        Workload::Soak {
            seconds,
            count,
            concurrency,
            target_dir,
        } => {
            let dir = run_dir(&target_dir, &ctx.run);
            run_soak(ctx, args, seconds, count, concurrency, &dir).await;
            remove_run_dir(ctx, &dir);
        }
        Workload::Storm(a) => {
            let dir = run_dir(&a.target_dir, &ctx.run);
            run_simple(ctx, args, "storm", storm::storm(ctx, &a, &dir)).await;
            remove_run_dir(ctx, &dir);
        }
        Workload::List {
            count,
            page,
            concurrency,
        } => run_simple(ctx, args, "list", list::list(ctx, count, page, concurrency)).await,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let mut ctx = Ctx {
        endpoint: args.endpoint.clone(),
        cs: Vec::new(),
        spec: Spec::new(&args.params, args.node.as_deref(), &args.topology_key),
        size: args.size,
        block: args.block,
        run: format!("{:x}", std::process::id()),
        ledger: Arc::new(Ledger::default()),
    };
    for _ in 0..args.connections.max(1) {
        let c = ctx.connect().await.unwrap_or_else(|e| {
            eprintln!("csi-bench: {}", e.message());
            std::process::exit(2)
        });
        ctx.cs.push(c);
    }
    if args.pretouch_mib > 0 {
        procfs::pretouch(args.pretouch_mib);
    }
    run(&ctx, &args).await;
    ctx.ledger.check_leftovers(&ctx.cs[0].controller).await;
    ctx.ledger.finish();
}
