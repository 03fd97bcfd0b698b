//! W1 provisioning: N creates then N deletes (by the IDs the creates
//! returned), the RPC floor, and a bare-filesystem baseline of the same steps.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hostpath_csi::proto::controller_client::ControllerClient;
use hostpath_csi::proto::*;
use tonic::transport::Channel;
use tonic::Status;

use crate::ledger::Ledger;
use crate::phase::{run_phase, Phase};
use crate::volumes::Created;
use crate::Ctx;

pub fn name_for(run: &str, i: usize) -> String {
    format!("bench-{run}-{i:06}")
}

/// Creates `count` volumes named `name_for(tag, i)` with `concurrency`
/// calls in flight; each ID returned goes in the ledger.
pub async fn create_many(
    ctx: &Ctx,
    phase: &str,
    tag: &str,
    count: usize,
    concurrency: usize,
    block: bool,
) -> (Phase, Vec<Option<Created>>) {
    let ctrls: Vec<_> = ctx.cs.iter().map(|c| c.controller.clone()).collect();
    let (spec, ledger, tag, size) = (
        ctx.spec.clone(),
        ctx.ledger.clone(),
        tag.to_owned(),
        ctx.size,
    );
    run_phase(phase, count, concurrency, move |i| {
        let name = name_for(&tag, i);
        let req = spec.create(&name, size, block);
        let (ctrl, ledger) = (ctrls[i % ctrls.len()].clone(), ledger.clone());
        async move { create_tracked(ctrl, req, &ledger).await }
    })
    .await
}

/// CreateVolume; the ID returned goes in the ledger, or the name when it failed.
pub async fn create_tracked(
    mut ctrl: ControllerClient<Channel>,
    req: CreateVolumeRequest,
    ledger: &Ledger,
) -> Result<Created, Status> {
    let r = ctrl.create_volume(req.clone()).await;
    let created = r.and_then(|r| Created::from_response(r.into_inner()));
    match &created {
        Ok(c) => ledger.created(&c.id),
        Err(_) => ledger.create_failed(&req.name),
    }
    created
}

/// Deletes the volumes with these IDs, `concurrency` calls in flight.
pub async fn delete_many(ctx: &Ctx, phase: &str, ids: Vec<String>, concurrency: usize) -> Phase {
    let ctrls: Vec<_> = ctx.cs.iter().map(|c| c.controller.clone()).collect();
    let ids = Arc::new(ids);
    let n = ids.len();
    run_phase(phase, n, concurrency, move |i| {
        let mut ctrl = ctrls[i % ctrls.len()].clone();
        let req = DeleteVolumeRequest {
            volume_id: ids[i].clone(),
            ..Default::default()
        };
        async move { ctrl.delete_volume(req).await.map(|_| ()) }
    })
    .await
    .0
}

pub async fn w1(ctx: &Ctx, tag: &str, count: usize, concurrency: usize) -> Vec<Phase> {
    let (create, created) = create_many(ctx, "create", tag, count, concurrency, ctx.block).await;
    let ids: Vec<String> = created.into_iter().flatten().map(|c| c.id).collect();
    let delete = delete_many(ctx, "delete", ids, concurrency).await;
    // The floor: the cheapest RPC there is, at the same concurrency, shows
    // what gRPC and the client cost before the driver does any work.
    let idents: Vec<_> = ctx.cs.iter().map(|c| c.identity.clone()).collect();
    let (floor, _) = run_phase("rpc-floor(probe)", count, concurrency, move |i| {
        let mut id = idents[i % idents.len()].clone();
        async move { id.probe(ProbeRequest {}).await.map(|_| ()) }
    })
    .await;
    vec![create, delete, floor]
}

/// Runs `step(i)` for i in 0..count on `concurrency` threads, timed.
fn timed_threads(
    name: &str,
    count: usize,
    concurrency: usize,
    step: &(dyn Fn(usize) -> std::io::Result<()> + Sync),
) -> Phase {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let lat = std::sync::Mutex::new(Vec::new());
    let errors = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let r = step(i);
                lat.lock().unwrap().push(t.elapsed());
                if let Err(e) = r {
                    *errors.lock().unwrap().entry(e.to_string()).or_default() += 1;
                }
            });
        }
    });
    let mut phase = Phase::new(name);
    phase.latencies = lat.into_inner().unwrap();
    for (e, n) in errors.into_inner().unwrap() {
        for _ in 0..n {
            phase.record_error(&Status::internal(e.clone()));
        }
    }
    phase.wall = started.elapsed();
    phase
}

/// The same steps a durable create and delete take, straight on the filesystem.
pub fn baseline(dir: &Path, count: usize, concurrency: usize) -> Vec<Phase> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join("tmp");
    let meta = dir.join("meta");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::create_dir_all(&meta).unwrap();
    let root = std::fs::File::open(dir).unwrap();
    let create = timed_threads("baseline-create", count, concurrency, &|i| {
        let staged = tmp.join(format!("v{i}"));
        std::fs::create_dir(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o777))?;
        let m = meta.join(format!(".v{i}.tmp"));
        std::fs::write(&m, br#"{"id":"v","capacity_bytes":1073741824}"#)?;
        std::fs::rename(&m, meta.join(format!("v{i}.json")))?;
        root.sync_all()?;
        std::fs::rename(&staged, dir.join(format!("v{i}")))?;
        root.sync_all()
    });
    let delete = timed_threads("baseline-delete", count, concurrency, &|i| {
        let doomed = tmp.join(format!("d{i}"));
        std::fs::rename(dir.join(format!("v{i}")), &doomed)?;
        std::fs::remove_file(meta.join(format!("v{i}.json")))?;
        root.sync_all()?;
        std::fs::remove_dir(&doomed)
    });
    // What the Go driver does for a create: one mkdir, nothing durable. No
    // driver that does at least this can create faster than this phase.
    let bare = timed_threads("baseline-mkdir-only", count, concurrency, &|i| {
        std::fs::create_dir(dir.join(format!("bare{i}")))
    });
    for i in 0..count {
        let _ = std::fs::remove_dir(dir.join(format!("bare{i}")));
    }
    vec![create, delete, bare]
}
