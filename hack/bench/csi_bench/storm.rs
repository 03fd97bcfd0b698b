//! The storm (issue 13, item 3): does the driver keep answering Probe and
//! publishing other volumes while stats walks of a huge volume and big
//! clones run? Measured first without the storm, then under it, in one run.
//!
//! Each load has its own connection, as the liveness probe, kubelet and the
//! provisioner have in a cluster.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostpath_csi::client::Clients;
use hostpath_csi::proto::identity_client::IdentityClient;
use hostpath_csi::proto::node_client::NodeClient;
use hostpath_csi::proto::*;
use serde_json::json;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::blockio::{delete, fill, published_block};
use crate::phase::Phase;
use crate::volumes::NodeVolume;
use crate::w1::create_tracked;
use crate::Ctx;

/// The storm's sizes, all overridable so a smoke run is quick.
#[derive(clap::Args, Clone, Debug)]
pub struct StormArgs {
    /// Empty files in the stats volume, spread over subdirectories.
    #[arg(long, default_value_t = 500_000)]
    pub files: usize,
    /// Data in the clone source (MiB); the source is exactly this big.
    #[arg(long, default_value_t = 1024)]
    pub clone_mib: u64,
    /// Concurrent clones of the source.
    #[arg(long, default_value_t = 16)]
    pub clones: usize,
    /// Concurrent NodeGetVolumeStats calls per wave on the stats volume.
    #[arg(long, default_value_t = 128)]
    pub stats_calls: usize,
    /// Waves of stats calls start at most this often (ms), so cached
    /// answers do not turn the client into the load.
    #[arg(long, default_value_t = 100)]
    pub stats_interval_ms: u64,
    /// How long the quiet measurement runs (s).
    #[arg(long, default_value_t = 5)]
    pub baseline_seconds: u64,
    /// The storm runs at least this long (s), and until every clone is done.
    #[arg(long, default_value_t = 5)]
    pub min_storm_seconds: u64,
    #[arg(long, default_value = "/tmp/csi-bench-targets")]
    pub target_dir: PathBuf,
}

const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Pause between publish+unpublish cycles of the extra volume.
const CYCLE_PAUSE: Duration = Duration::from_millis(20);

/// Probe every 10 ms, each call on its own (open loop, as a liveness probe
/// fires whether or not the last one answered), until `stop`.
async fn sample_probes(ident: IdentityClient<Channel>, stop: Arc<AtomicBool>, name: &str) -> Phase {
    let started = Instant::now();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut calls = JoinSet::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut id = ident.clone();
        calls.spawn(async move {
            let t = Instant::now();
            let r = id.probe(ProbeRequest {}).await;
            (t.elapsed(), r)
        });
    }
    let mut phase = Phase::new(name);
    phase.wall = started.elapsed();
    while let Some(done) = calls.join_next().await {
        let (lat, r) = done.expect("probe task");
        phase.latencies.push(lat);
        if let Err(s) = r {
            phase.record_error(&s);
        }
    }
    phase
}

/// Publishes and unpublishes `vol` in a loop until `stop`.
async fn publish_cycles(
    node: NodeClient<Channel>,
    vol: NodeVolume,
    stop: Arc<AtomicBool>,
    tag: &str,
) -> [Phase; 2] {
    let started = Instant::now();
    let mut publish = Phase::new(&format!("{tag}-publish"));
    let mut unpublish = Phase::new(&format!("{tag}-unpublish"));
    while !stop.load(Ordering::Relaxed) {
        for (phase, publishing) in [(&mut publish, true), (&mut unpublish, false)] {
            let t = Instant::now();
            let r = if publishing {
                vol.publish(node.clone()).await
            } else {
                vol.unpublish(node.clone()).await
            };
            phase.latencies.push(t.elapsed());
            if let Err(s) = r {
                phase.record_error(&s);
            }
        }
        tokio::time::sleep(CYCLE_PAUSE).await;
    }
    publish.wall = started.elapsed();
    unpublish.wall = publish.wall;
    [publish, unpublish]
}

/// Waves of `calls` concurrent NodeGetVolumeStats on `vol` until `stop`;
/// a wave already sent is always waited for.
async fn stats_waves(
    node: NodeClient<Channel>,
    vol: NodeVolume,
    calls: usize,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> (Phase, usize) {
    let started = Instant::now();
    let mut phase = Phase::new("storm-stats");
    // An operation already pending on the volume is a legal answer.
    phase.expected = vec![Code::Aborted];
    let mut waves = 0;
    while !stop.load(Ordering::Relaxed) {
        let wave_start = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..calls {
            let (mut node, req) = (
                node.clone(),
                NodeGetVolumeStatsRequest {
                    volume_id: vol.id.clone(),
                    volume_path: vol.target.clone(),
                    staging_target_path: vol.staging.clone().unwrap_or_default(),
                },
            );
            set.spawn(async move {
                let t = Instant::now();
                let r = node.node_get_volume_stats(req).await;
                (t.elapsed(), r)
            });
        }
        while let Some(done) = set.join_next().await {
            let (lat, r) = done.expect("stats task");
            phase.latencies.push(lat);
            if let Err(s) = r {
                phase.record_error(&s);
            }
        }
        waves += 1;
        tokio::time::sleep(every.saturating_sub(wave_start.elapsed())).await;
    }
    phase.wall = started.elapsed();
    (phase, waves)
}

/// `n` empty files under `root`, 1,000 per subdirectory.
fn make_files(root: &Path, n: usize) -> std::io::Result<()> {
    for i in 0..n {
        let dir = root.join(format!("d{:04}", i / 1000));
        if i % 1000 == 0 {
            std::fs::create_dir(&dir)?;
        }
        std::fs::File::create_new(dir.join(format!("f{i}")))?;
    }
    Ok(())
}

/// The volumes of a storm: (a) stats, (b) clone source, (c) publish loop.
struct Setup {
    files: NodeVolume,
    source: NodeVolume,
    extra: NodeVolume,
    fill_files_s: f64,
}

/// Makes the storm's volumes; each one made goes in `made` first, so a
/// failure half way can undo them.
async fn set_up(
    ctx: &Ctx,
    c: &Clients,
    a: &StormArgs,
    dir: &Path,
    made: &mut Vec<NodeVolume>,
) -> Result<Setup, Status> {
    let stages = c.node_stages().await?;
    let mount_volume = |name: String| {
        let req = ctx.spec.create(&name, ctx.size, false);
        async move {
            let made = create_tracked(c.controller.clone(), req, &ctx.ledger).await?;
            Ok::<_, Status>(NodeVolume::new(&made, dir, &name, false, stages))
        }
    };
    let files = mount_volume(format!("bench-{}-storm-files", ctx.run)).await?;
    made.push(files.clone());
    files.attach(&c.node).await?;
    let (root, n) = (files.target_path(), a.files);
    let t = Instant::now();
    tokio::task::spawn_blocking(move || make_files(&root, n))
        .await
        .expect("file task")
        .map_err(|e| Status::internal(format!("filling the stats volume: {e}")))?;
    let fill_files_s = t.elapsed().as_secs_f64();
    let src_name = format!("bench-{}-storm-src", ctx.run);
    let source = published_block(ctx, c, &src_name, (a.clone_mib as i64) << 20, dir).await?;
    made.push(source.clone());
    let (dev, mib) = (source.target_path(), a.clone_mib);
    tokio::task::spawn_blocking(move || fill(&dev, mib, mib, 1))
        .await
        .expect("fill task")
        .map_err(|e| Status::internal(format!("filling the clone source: {e}")))?;
    source.detach(&c.node).await?;
    let extra = mount_volume(format!("bench-{}-storm-extra", ctx.run)).await?;
    made.push(extra.clone());
    extra.stage(c.node.clone()).await?;
    Ok(Setup {
        files,
        source,
        extra,
        fill_files_s,
    })
}

/// Probe and publish latency with no other load, for `seconds`.
async fn quiet(probe: &Clients, node: &Clients, extra: &NodeVolume, seconds: u64) -> Vec<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let probes = tokio::spawn(sample_probes(
        probe.identity.clone(),
        stop.clone(),
        "baseline-probe",
    ));
    let cycles = tokio::spawn(publish_cycles(
        node.node.clone(),
        extra.clone(),
        stop.clone(),
        "baseline",
    ));
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let [p, u] = cycles.await.expect("publish loop");
    vec![probes.await.expect("probe sampler"), p, u]
}

/// Connections for each load: probe, publish loop, stats, clones.
async fn connections(ctx: &Ctx) -> Result<[Clients; 4], Status> {
    let mut out = Vec::new();
    for _ in 0..4 {
        out.push(ctx.connect().await?);
    }
    Ok(out.try_into().unwrap_or_else(|_| unreachable!()))
}

/// What the storm measured besides its phases.
struct StormFacts {
    clone_wall_s: f64,
    storm_s: f64,
    stats_waves: usize,
    clone_ids: Vec<String>,
}

/// Clones of the source, all at once; each ID goes in the ledger.
async fn clone_burst(ctx: &Ctx, c: &Clients, a: &StormArgs, source: &str) -> (Phase, Vec<String>) {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..a.clones {
        let name = format!("bench-{}-storm-clone-{i}", ctx.run);
        let req = ctx
            .spec
            .clone_of(&name, source, (a.clone_mib as i64) << 20, true);
        let (ctrl, ledger) = (c.controller.clone(), ctx.ledger.clone());
        set.spawn(async move {
            let t = Instant::now();
            let r = create_tracked(ctrl, req, &ledger).await;
            (t.elapsed(), r)
        });
    }
    let mut phase = Phase::new("storm-clone");
    let mut ids = Vec::new();
    while let Some(done) = set.join_next().await {
        let (lat, r) = done.expect("clone task");
        phase.latencies.push(lat);
        match r {
            Ok(made) => ids.push(made.id),
            Err(s) => phase.record_error(&s),
        }
    }
    phase.wall = started.elapsed();
    (phase, ids)
}

/// Stats waves and clones, with Probe sampled and the extra volume cycled,
/// until the clones are done, `min_storm_seconds` passed, and the last
/// wave of stats answered.
async fn storm_run(
    ctx: &Ctx,
    conns: &[Clients; 4],
    a: &StormArgs,
    s: &Setup,
) -> (Vec<Phase>, StormFacts) {
    let [probe, node, stats, clones] = conns;
    let (sampling, storming) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let started = Instant::now();
    let probes = tokio::spawn(sample_probes(
        probe.identity.clone(),
        sampling.clone(),
        "storm-probe",
    ));
    let cycles = tokio::spawn(publish_cycles(
        node.node.clone(),
        s.extra.clone(),
        sampling.clone(),
        "storm",
    ));
    let waves = tokio::spawn(stats_waves(
        stats.node.clone(),
        s.files.clone(),
        a.stats_calls,
        Duration::from_millis(a.stats_interval_ms),
        storming.clone(),
    ));
    let (clone_phase, clone_ids) = clone_burst(ctx, clones, a, &s.source.id).await;
    let clone_wall_s = started.elapsed().as_secs_f64();
    let rest = Duration::from_secs(a.min_storm_seconds).saturating_sub(started.elapsed());
    tokio::time::sleep(rest).await;
    storming.store(true, Ordering::Relaxed);
    let (stats_phase, stats_waves) = waves.await.expect("stats waves");
    sampling.store(true, Ordering::Relaxed);
    let storm_s = started.elapsed().as_secs_f64();
    let [p, u] = cycles.await.expect("publish loop");
    let phases = vec![
        probes.await.expect("probe sampler"),
        p,
        u,
        stats_phase,
        clone_phase,
    ];
    let facts = StormFacts {
        clone_wall_s,
        storm_s,
        stats_waves,
        clone_ids,
    };
    (phases, facts)
}

/// Unpublishes, unstages and deletes everything the storm made; the time
/// the 500k-file volume's delete took is worth knowing.
async fn tear_down(ctx: &Ctx, c: &Clients, s: &Setup, clone_ids: &[String]) -> f64 {
    for id in clone_ids {
        delete(ctx, c, id).await;
    }
    delete(ctx, c, &s.source.id).await;
    ctx.ledger.cleanup(
        "unstage the extra volume",
        s.extra.unstage(c.node.clone()).await,
    );
    delete(ctx, c, &s.extra.id).await;
    ctx.ledger
        .cleanup("detach the stats volume", s.files.detach(&c.node).await);
    let t = Instant::now();
    delete(ctx, c, &s.files.id).await;
    t.elapsed().as_secs_f64()
}

/// Calls slower than the 1 s a liveness probe waits.
fn over_1s(p: &Phase) -> usize {
    p.latencies.iter().filter(|l| l.as_secs_f64() > 1.0).count()
}

pub async fn storm(ctx: &Ctx, a: &StormArgs, dir: &Path) -> (Vec<Phase>, serde_json::Value) {
    let conns = match connections(ctx).await {
        Ok(c) => c,
        Err(s) => {
            ctx.ledger.problem(format!("storm: connect: {s}"));
            return (Vec::new(), json!({}));
        }
    };
    let c = &conns[0];
    let mut made = Vec::new();
    let setup = match set_up(ctx, c, a, dir, &mut made).await {
        Ok(s) => s,
        Err(s) => {
            ctx.ledger.problem(format!("storm setup: {s}"));
            for v in made {
                // Best effort: a step that never happened fails harmlessly.
                let _ = v.detach(&c.node).await;
                let _ = v.unstage(c.node.clone()).await;
                delete(ctx, c, &v.id).await;
            }
            return (Vec::new(), json!({}));
        }
    };
    eprintln!(
        "storm: {} files made in {:.1} s; measuring without the storm",
        a.files, setup.fill_files_s
    );
    let mut phases = quiet(&conns[0], &conns[1], &setup.extra, a.baseline_seconds).await;
    eprintln!(
        "storm: now with {} stats calls per wave and {} clones",
        a.stats_calls, a.clones
    );
    let (storm_phases, facts) = storm_run(ctx, &conns, a, &setup).await;
    phases.extend(storm_phases);
    // The extra volume may be left published if the last cycle's unpublish failed.
    ctx.ledger.cleanup(
        "unpublish the extra volume",
        setup.extra.unpublish(c.node.clone()).await,
    );
    let delete_files_s = tear_down(ctx, c, &setup, &facts.clone_ids).await;
    let named = |name: &str| {
        phases
            .iter()
            .find(|p| p.name == name)
            .expect("a storm phase")
    };
    let extra = json!({
        "files": a.files,
        "clone_mib": a.clone_mib,
        "clones": a.clones,
        "stats_calls_per_wave": a.stats_calls,
        "stats_waves": facts.stats_waves,
        "stats_calls": named("storm-stats").latencies.len(),
        "clone_wall_s": facts.clone_wall_s,
        "storm_s": facts.storm_s,
        "fill_files_s": setup.fill_files_s,
        "delete_files_volume_s": delete_files_s,
        "baseline_probe_over_1s": over_1s(named("baseline-probe")),
        "storm_probe_over_1s": over_1s(named("storm-probe")),
        "storm_publish_over_1s": over_1s(named("storm-publish")),
        "storm_unpublish_over_1s": over_1s(named("storm-unpublish")),
    });
    (phases, extra)
}
