use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hostpath_csi::config::{self, HostPathProvisioner, PoolConfig};
use hostpath_csi::server::{self, ServeOptions};

mod ctl;

#[derive(Parser)]
#[command(
    name = "hostpath-csi",
    version,
    about = "Node-local CSI driver (drop-in for kubevirt's hostpath provisioner)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the CSI server (the DaemonSet container).
    Serve(ServeArgs),
    /// A small CSI client for people and scripts (JSON output).
    Ctl(ctl::CtlArgs),
    /// Print the Kubernetes objects that install a HostPathProvisioner CR.
    Render(hostpath_csi::render::RenderArgs),
    /// Mount or unmount a pvcTemplate pool (the per-node mounter).
    Pool(hostpath_csi::poolmount::PoolArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// CSI endpoint, unix:///path/to/csi.sock
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (topology value).
    #[arg(long, env = "NODE_NAME")]
    nodeid: String,
    /// Driver name reported to Kubernetes.
    #[arg(long, default_value = hostpath_csi::DEFAULT_DRIVER_NAME)]
    drivername: String,
    /// Version reported by GetPluginInfo.
    #[arg(long = "version", default_value = env!("CARGO_PKG_VERSION"))]
    driver_version: String,
    /// Pools as upstream's JSON array: [{"name":"local","path":"/dir"}]
    #[arg(long, conflicts_with = "config")]
    datadir: Option<String>,
    /// A HostPathProvisioner custom resource (YAML) naming the pools.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:8080); off by default.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Do not advertise ControllerExpandVolume: with one cluster-wide
    /// csi-resizer, expansion then happens in NodeExpandVolume on the
    /// volume's node (what `render` deploys).
    #[arg(long)]
    node_only_expansion: bool,
    /// Largest inline ephemeral volume a pod may ask for (a quantity).
    #[arg(long, default_value = "1Gi", value_parser = parse_size)]
    max_ephemeral_size: u64,
    /// Longest a group snapshot may keep a filesystem frozen, in seconds.
    #[arg(long, default_value_t = 10)]
    freeze_timeout: u64,
    /// Strict capacity accounting: GetCapacity reports only free space as
    /// the largest volume, and creates beyond it are refused.
    #[arg(long)]
    strict_capacity: bool,
}

fn parse_size(q: &str) -> Result<u64, String> {
    hostpath_csi::config::cr::parse_quantity(q)
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| format!("{q:?} is not a quantity (e.g. 512Mi, 1Gi)"))
}

fn load_pools(args: &ServeArgs) -> Result<Vec<PoolConfig>, String> {
    match (&args.datadir, &args.config) {
        (Some(json), None) => {
            config::parse_datadir(json).map_err(|e| format!("invalid pool configuration: {e}"))
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read --config {}: {e}", file.display()))?;
            let (cr, warnings) = HostPathProvisioner::from_yaml(&text)
                .map_err(|e| format!("invalid HostPathProvisioner in {}: {e}", file.display()))?;
            for w in warnings {
                tracing::warn!(file = %file.display(), "{w}");
            }
            Ok(cr.pools())
        }
        _ => Err("give exactly one of --datadir or --config".into()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight RPCs"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight RPCs"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Few malloc arenas: blocking threads come and go, and one arena each
    // would let the idle footprint creep up under load.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(async {
            let pools = load_pools(&args)?;
            server::serve(
                ServeOptions {
                    endpoint: args.endpoint,
                    node_id: args.nodeid,
                    driver_name: args.drivername,
                    version: args.driver_version,
                    pools,
                    metrics_addr: args.metrics_addr,
                    node_only_expansion: args.node_only_expansion,
                    settings: hostpath_csi::volume::Settings {
                        max_ephemeral_size: args.max_ephemeral_size,
                        freeze_timeout: std::time::Duration::from_secs(args.freeze_timeout),
                        strict_capacity: args.strict_capacity,
                    },
                },
                shutdown_signal(),
            )
            .await
            .map_err(|e| e.to_string())
        }),
        Command::Ctl(args) => runtime.block_on(ctl::run(args)).map_err(|e| e.to_string()),
        Command::Render(args) => hostpath_csi::render::run(args),
        Command::Pool(args) => runtime.block_on(hostpath_csi::poolmount::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostpath-csi: {e}");
            ExitCode::FAILURE
        }
    }
}
