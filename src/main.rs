//! The `hostpath-csi` binary: `serve` (the DaemonSet container, also
//! started with the Go driver's flags and no subcommand), `ctl`, `render`,
//! `pool`, `rollback-check` and `snapshot-labeler`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use hostpath_csi::config::{self, HostPathProvisioner, PoolConfig};
use hostpath_csi::metrics;
use hostpath_csi::server::{self, ServeOptions};

mod ctl;
mod goflags;

#[derive(Parser)]
#[command(
    name = "hostpath-csi",
    version,
    about = "Node-local CSI driver (drop-in for kubevirt's hostpath provisioner)",
    after_help = "Started with flags and no subcommand, as upstream's operator starts the Go driver \
(--drivername=… --v=3 --endpoint=… --nodeid=… --version=… --datadir=… [--metrics-tls-version=…]), \
it reads them in Go's flag syntax and serves exactly as `serve`."
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
    /// Read a node's pools (never writing) and list what the Go driver could
    /// not serve after a rollback; exit 1 when something would break.
    RollbackCheck(hostpath_csi::rollback::RollbackCheckArgs),
    /// Label this node's VolumeSnapshotContents for a node-deployment
    /// csi-snapshotter, where the snapshot-controller does not (OpenShift).
    SnapshotLabeler(hostpath_csi::snaplabel::LabelerArgs),
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
    /// Pools as upstream's JSON array: [{"name":"local","path":"/dir"}];
    /// relative paths are taken from `/`, as the Go driver's image does.
    #[arg(long, conflicts_with = "config")]
    datadir: Option<String>,
    /// A HostPathProvisioner custom resource (YAML) naming the pools.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:8080); off by default
    /// in `serve` unless TLS is asked for (then [::]:8443). The Go driver's
    /// command line always serves them, as upstream: [::]:8443 with TLS,
    /// [::]:8080 without.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Serve metrics over HTTPS with this minimum TLS version (VersionTLS12,
    /// VersionTLS13; upstream's names).
    #[arg(long)]
    metrics_tls_version: Option<String>,
    /// PEM certificate for the HTTPS metrics endpoint (with --metrics-key-file);
    /// self-signed when not given.
    #[arg(long)]
    metrics_cert_file: Option<PathBuf>,
    /// PEM private key for the HTTPS metrics endpoint.
    #[arg(long)]
    metrics_key_file: Option<PathBuf>,
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

/// A size flag that is not a quantity.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a quantity (e.g. 512Mi, 1Gi)")]
struct BadSize(String);

fn parse_size(q: &str) -> Result<u64, BadSize> {
    config::cr::parse_quantity(q)
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| BadSize(q.to_owned()))
}

/// Why the driver cannot start.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Args(#[from] goflags::ArgsError),
    #[error("invalid pool configuration: {0}")]
    Pools(#[from] config::ConfigError),
    #[error("cannot read --config {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid HostPathProvisioner in {path}: {source}")]
    Cr {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("give exactly one of --datadir or --config")]
    NoPools,
    #[error("{0}")]
    Serve(String),
    #[error("cannot check the pools: {0}")]
    Check(#[from] hostpath_csi::rollback::CheckError),
    #[error("{0} volume(s) or snapshot(s) would break on a rollback")]
    RollbackBreaks(usize),
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// 2 for a command line that cannot be used (as Go's flag package) or
    /// pools that cannot be read by rollback-check; 1 otherwise.
    fn exit_code(&self) -> u8 {
        match self {
            StartError::Args(_) | StartError::Check(_) => 2,
            _ => 1,
        }
    }
}

fn load_pools(args: &ServeArgs) -> Result<Vec<PoolConfig>, StartError> {
    pools_from(&args.datadir, &args.config)
}

fn pools_from(
    datadir: &Option<String>,
    config: &Option<PathBuf>,
) -> Result<Vec<PoolConfig>, StartError> {
    match (datadir, config) {
        (Some(json), None) => Ok(config::parse_datadir(json)?),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|source| StartError::ReadConfig {
                path: file.clone(),
                source,
            })?;
            let (cr, warnings) =
                HostPathProvisioner::from_yaml(&text).map_err(|source| StartError::Cr {
                    path: file.clone(),
                    source,
                })?;
            for w in warnings {
                tracing::warn!(file = %file.display(), "{w}");
            }
            Ok(cr.pools())
        }
        _ => Err(StartError::NoPools),
    }
}

/// Where metrics are served. `go_form` is the Go driver's command line,
/// whose endpoint is always on, as upstream's: HTTPS on :8443 when
/// `--metrics-tls-version` is given (the current operator), else HTTP on
/// :8080 (the operator releases of 2025).
fn metrics_endpoint(args: &ServeArgs, go_form: bool) -> Option<metrics::Endpoint> {
    let any = |port| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    let wants_tls = args.metrics_tls_version.is_some()
        || args.metrics_cert_file.is_some()
        || args.metrics_key_file.is_some();
    let tls = wants_tls.then(|| metrics::TlsSettings {
        min_version: args
            .metrics_tls_version
            .as_deref()
            .map(metrics::MinTlsVersion::from_go_name)
            .unwrap_or(metrics::MinTlsVersion::Tls13),
        cert: metrics::CertSource::from_flags(
            args.metrics_cert_file.clone(),
            args.metrics_key_file.clone(),
        ),
    });
    let addr = match (args.metrics_addr, &tls) {
        (Some(addr), _) => addr,
        (None, Some(_)) => any(8443),
        (None, None) if go_form => any(8080),
        (None, None) => return None,
    };
    Some(metrics::Endpoint { addr, tls })
}

async fn run_serve(args: ServeArgs, go_form: bool) -> Result<(), StartError> {
    let pools = load_pools(&args)?;
    let metrics = metrics_endpoint(&args, go_form);
    server::serve(
        ServeOptions {
            endpoint: args.endpoint,
            node_id: args.nodeid,
            driver_name: args.drivername,
            version: args.driver_version,
            pools,
            metrics,
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
    .map_err(|e| StartError::Serve(e.to_string()))
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

/// The command line, read either as subcommands or as the Go driver's flags.
enum Invocation {
    Cli(Cli),
    /// The Go driver's command line: `serve` arguments and klog's settings.
    Go(ServeArgs, goflags::GoArgs),
}

fn parse_command_line() -> Result<Invocation, StartError> {
    let argv: Vec<String> = std::env::args().collect();
    let (program, rest) = argv.split_first().expect("argv[0]");
    if !goflags::is_go_command_line(rest) {
        return Ok(Invocation::Cli(Cli::parse()));
    }
    let go = goflags::GoArgs::parse(rest)?;
    let serve_argv = [program.clone(), "serve".into()]
        .into_iter()
        .chain(go.serve.iter().cloned());
    match Cli::parse_from(serve_argv).command {
        Command::Serve(args) => Ok(Invocation::Go(args, go)),
        _ => unreachable!("parsed as serve"),
    }
}

fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn runtime() -> tokio::runtime::Runtime {
    // Few malloc arenas: blocking threads come and go, and one arena each
    // would let the idle footprint creep up under load.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(32)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn rollback_check(args: hostpath_csi::rollback::RollbackCheckArgs) -> Result<(), StartError> {
    use hostpath_csi::rollback;
    let pools = pools_from(&args.datadir, &args.config)?;
    let findings = rollback::check(&pools)?;
    if args.json {
        let json = serde_json::to_string_pretty(&findings).expect("findings serialize");
        println!("{json}");
    } else {
        print!("{}", rollback::report(&findings));
    }
    match findings
        .iter()
        .filter(|f| f.severity == rollback::Severity::Breaks)
        .count()
    {
        0 => Ok(()),
        n => Err(StartError::RollbackBreaks(n)),
    }
}

fn run(invocation: Invocation) -> Result<(), StartError> {
    let runtime = runtime();
    match invocation {
        Invocation::Go(args, go) => {
            tracing::info!("started with the Go driver's command line (no subcommand): serving");
            for note in &go.notes {
                tracing::info!("{note}");
            }
            runtime.block_on(run_serve(args, true))
        }
        Invocation::Cli(cli) => match cli.command {
            Command::Serve(args) => runtime.block_on(run_serve(args, false)),
            Command::Ctl(args) => runtime
                .block_on(ctl::run(args))
                .map_err(|e| StartError::Other(e.to_string())),
            Command::Render(args) => {
                hostpath_csi::render::run(args).map_err(|e| StartError::Other(e.to_string()))
            }
            Command::Pool(args) => runtime
                .block_on(hostpath_csi::poolmount::run(args))
                .map_err(|e| StartError::Other(e.to_string())),
            Command::RollbackCheck(args) => rollback_check(args),
            Command::SnapshotLabeler(args) => runtime
                .block_on(hostpath_csi::snaplabel::run(args))
                .map_err(|e| StartError::Other(e.to_string())),
        },
    }
}

fn main() -> ExitCode {
    let invocation = match parse_command_line() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("hostpath-csi: {e}");
            // Go's flag package exits 2 on a bad command line.
            return ExitCode::from(2);
        }
    };
    let filter = match &invocation {
        Invocation::Go(_, go) => go.log_filter().unwrap_or("info"),
        Invocation::Cli(_) => "info",
    };
    init_logging(filter);
    match run(invocation) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hostpath-csi: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
