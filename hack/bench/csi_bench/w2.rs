//! W2: kubelet's node flow on K volumes, timed per step: stage, publish,
//! unpublish, unstage (stage steps only when the driver stages).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use hostpath_csi::proto::node_client::NodeClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::phase::{run_phase, Phase};
use crate::volumes::NodeVolume;
use crate::w1::{create_many, delete_many, name_for};
use crate::Ctx;

/// Runs `step` on every volume, `concurrency` at once, spread over the connections.
async fn node_phase<F, Fut>(
    ctx: &Ctx,
    name: &str,
    vols: &Arc<Vec<NodeVolume>>,
    concurrency: usize,
    step: F,
) -> Phase
where
    F: Fn(NodeVolume, NodeClient<Channel>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let nodes: Vec<_> = ctx.cs.iter().map(|c| c.node.clone()).collect();
    let vols = vols.clone();
    run_phase(name, vols.len(), concurrency, move |i| {
        step(vols[i].clone(), nodes[i % nodes.len()].clone())
    })
    .await
    .0
}

pub async fn w2(
    ctx: &Ctx,
    tag: &str,
    count: usize,
    concurrency: usize,
    target_dir: &Path,
) -> Vec<Phase> {
    let (setup, created) =
        create_many(ctx, "create(setup)", tag, count, concurrency, ctx.block).await;
    ctx.ledger.check_phases(&[setup]);
    let stages = match ctx.cs[0].node_stages().await {
        Ok(s) => s,
        Err(s) => {
            ctx.ledger.problem(format!("NodeGetCapabilities: {s}"));
            false
        }
    };
    let vols: Arc<Vec<NodeVolume>> = Arc::new(
        created
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.as_ref()?;
                Some(NodeVolume::new(
                    c,
                    target_dir,
                    &name_for(tag, i),
                    ctx.block,
                    stages,
                ))
            })
            .collect(),
    );
    let mut phases = Vec::new();
    if stages {
        phases.push(
            node_phase(ctx, "stage", &vols, concurrency, |v, n| async move {
                v.stage(n).await
            })
            .await,
        );
    }
    phases.push(
        node_phase(ctx, "publish", &vols, concurrency, |v, n| async move {
            v.publish(n).await
        })
        .await,
    );
    phases.push(
        node_phase(ctx, "unpublish", &vols, concurrency, |v, n| async move {
            v.unpublish(n).await
        })
        .await,
    );
    if stages {
        phases.push(
            node_phase(ctx, "unstage", &vols, concurrency, |v, n| async move {
                v.unstage(n).await
            })
            .await,
        );
    }
    let ids = vols.iter().map(|v| v.id.clone()).collect();
    let delete = delete_many(ctx, "delete(cleanup)", ids, concurrency).await;
    ctx.ledger.check_phases(&[delete]);
    phases
}
