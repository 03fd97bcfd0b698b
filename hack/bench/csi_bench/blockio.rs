//! Block volumes with data: W3 (clones of a Block volume holding data) and
//! W4 (O_DIRECT I/O through a published Block volume), and the helpers the
//! storm shares with them.

use std::path::Path;
use std::time::Instant;

use hostpath_csi::client::Clients;
use hostpath_csi::proto::*;
use serde_json::json;
use tonic::Status;

use crate::phase::{run_phase, Phase};
use crate::volumes::NodeVolume;
use crate::w1::create_tracked;
use crate::Ctx;

/// A 1 MiB buffer aligned for O_DIRECT, filled with a pattern (touched
/// before any timing, as this VM charges for first touches).
pub struct AlignedBuffer {
    raw: Vec<u8>,
    offset: usize,
}

impl AlignedBuffer {
    pub const LEN: usize = 1 << 20;

    pub fn new() -> Self {
        let mut raw = vec![0u8; Self::LEN + 4096];
        let offset = raw.as_ptr().align_offset(4096);
        for (i, b) in raw.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        AlignedBuffer { raw, offset }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw[self.offset..self.offset + Self::LEN]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.offset..self.offset + Self::LEN]
    }
}

/// Writes then reads `mib` MiB sequentially with O_DIRECT; MB/s each way.
fn direct_io(path: &Path, mib: u64) -> std::io::Result<(f64, f64)> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let buf = AlignedBuffer::new();
    let mut read_buf = AlignedBuffer::new();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let started = Instant::now();
    for i in 0..mib {
        file.write_all_at(buf.bytes(), i << 20)?;
    }
    let write = (mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
    let started = Instant::now();
    for i in 0..mib {
        file.read_exact_at(read_buf.bytes_mut(), i << 20)?;
    }
    let read = (mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6;
    Ok((write, read))
}

/// Writes `runs` runs of data, `mib` MiB in all, spread evenly over the
/// device at `path` of `size_mib` MiB, with O_DIRECT, then flushes.
pub fn fill(path: &Path, size_mib: u64, mib: u64, runs: u64) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    let buf = AlignedBuffer::new();
    let per_run = mib / runs;
    for r in 0..runs {
        for m in 0..per_run {
            file.write_all_at(buf.bytes(), (r * size_mib / runs + m) << 20)?;
        }
    }
    file.sync_all()
}

/// Creates a Block volume named `name` and attaches it (stage + publish)
/// under `dir`; the ID goes in the ledger.
pub async fn published_block(
    ctx: &Ctx,
    c: &Clients,
    name: &str,
    size: i64,
    dir: &Path,
) -> Result<NodeVolume, Status> {
    let req = ctx.spec.create(name, size, true);
    let created = create_tracked(c.controller.clone(), req, &ctx.ledger).await?;
    let stages = c.node_stages().await?;
    let vol = NodeVolume::new(&created, dir, name, true, stages);
    if let Err(s) = vol.attach(&c.node).await {
        release(ctx, c, &vol).await;
        return Err(s);
    }
    Ok(vol)
}

/// Detaches (unpublish, unstage) and deletes a volume; errors are problems.
pub async fn release(ctx: &Ctx, c: &Clients, vol: &NodeVolume) {
    ctx.ledger.cleanup(
        &format!("unpublish {}", vol.id),
        vol.unpublish(c.node.clone()).await,
    );
    ctx.ledger.cleanup(
        &format!("unstage {}", vol.id),
        vol.unstage(c.node.clone()).await,
    );
    delete(ctx, c, &vol.id).await;
}

pub async fn delete(ctx: &Ctx, c: &Clients, id: &str) {
    let r = c
        .controller
        .clone()
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.to_owned(),
            ..Default::default()
        })
        .await;
    ctx.ledger.cleanup(&format!("delete {id}"), r);
}

pub async fn w3(
    ctx: &Ctx,
    count: usize,
    data_mib: u64,
    dir: &Path,
) -> (Vec<Phase>, serde_json::Value) {
    let c = &ctx.cs[0];
    // Data in 16 runs spread over a file 10x its size, as a VM disk image.
    let size_mib = data_mib.max(16) * 10;
    let size = (size_mib as i64) << 20;
    let (runs, data_mib) = (16, data_mib.max(16) / 16 * 16);
    let source = match published_block(ctx, c, &format!("bench-{}-w3src", ctx.run), size, dir).await
    {
        Ok(v) => v,
        Err(s) => {
            ctx.ledger.problem(format!("W3 source: {s}"));
            return (Vec::new(), json!({}));
        }
    };
    let target = source.target_path();
    let filled = tokio::task::spawn_blocking(move || fill(&target, size_mib, data_mib, runs))
        .await
        .expect("fill task");
    if let Err(e) = filled {
        ctx.ledger.problem(format!("W3: filling the source: {e}"));
    }
    ctx.ledger
        .cleanup("unpublish the W3 source", source.detach(&c.node).await);
    let (ctrl, spec, ledger, src, run) = (
        c.controller.clone(),
        ctx.spec.clone(),
        ctx.ledger.clone(),
        source.id.clone(),
        ctx.run.clone(),
    );
    let (phase, clones) = run_phase("clone", count, 1, move |i| {
        let name = format!("bench-{run}-w3clone-{i}");
        let req = spec.clone_of(&name, &src, size, true);
        let (ctrl, ledger) = (ctrl.clone(), ledger.clone());
        async move { create_tracked(ctrl, req, &ledger).await }
    })
    .await;
    for clone in clones.into_iter().flatten() {
        delete(ctx, c, &clone.id).await;
    }
    delete(ctx, c, &source.id).await;
    (
        vec![phase],
        json!({"virtual_mib": size_mib, "data_mib": data_mib}),
    )
}

pub async fn w4(ctx: &Ctx, mib: u64, dir: &Path) -> serde_json::Value {
    let c = &ctx.cs[0];
    let name = format!("bench-{}-w4", ctx.run);
    let vol = match published_block(ctx, c, &name, (mib as i64) << 20, dir).await {
        Ok(v) => v,
        Err(s) => {
            ctx.ledger.problem(format!("W4 volume: {s}"));
            return json!({});
        }
    };
    let t = vol.target_path();
    let io = tokio::task::spawn_blocking(move || direct_io(&t, mib))
        .await
        .expect("I/O task");
    release(ctx, c, &vol).await;
    match io {
        Ok((write, read)) => {
            json!({"mib": mib, "write_mb_s": write.round(), "read_mb_s": read.round()})
        }
        Err(e) => {
            ctx.ledger.problem(format!("W4 I/O: {e}"));
            json!({"mib": mib})
        }
    }
}
