//! `list`: ListVolumes over many volumes, paged (small pages, following
//! next_token) against one full listing (max_entries 0, following any
//! next_token a driver that caps its pages returns).

use std::collections::BTreeMap;
use std::time::Instant;

use hostpath_csi::proto::controller_client::ControllerClient;
use hostpath_csi::proto::*;
use serde_json::json;
use tonic::transport::Channel;

use crate::phase::Phase;
use crate::w1::{create_many, delete_many};
use crate::Ctx;

/// Every volume ID, `page` at a time, each page timed.
async fn timed_listing(
    ctrl: &ControllerClient<Channel>,
    page: i32,
    name: &str,
) -> (Phase, Vec<String>) {
    let mut ctrl = ctrl.clone();
    let mut phase = Phase::new(name);
    let (mut ids, mut token) = (Vec::new(), String::new());
    let started = Instant::now();
    loop {
        let t = Instant::now();
        let r = ctrl
            .list_volumes(ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await;
        phase.latencies.push(t.elapsed());
        match r {
            Ok(r) => {
                let r = r.into_inner();
                ids.extend(
                    r.entries
                        .into_iter()
                        .filter_map(|e| e.volume.map(|v| v.volume_id)),
                );
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            Err(s) => {
                phase.record_error(&s);
                break;
            }
        }
    }
    phase.wall = started.elapsed();
    (phase, ids)
}

/// A listing must hold each of `mine` exactly once.
fn verify(ctx: &Ctx, what: &str, mine: &[String], listed: &[String]) {
    let mut seen: BTreeMap<&str, usize> = mine.iter().map(|id| (id.as_str(), 0)).collect();
    for id in listed {
        if let Some(n) = seen.get_mut(id.as_str()) {
            *n += 1;
        }
    }
    let missing = seen.values().filter(|n| **n == 0).count();
    let repeated = seen.values().filter(|n| **n > 1).count();
    if missing + repeated > 0 {
        ctx.ledger.problem(format!(
            "{what}: of {} volumes this run made, {missing} missing and {repeated} listed more than once",
            mine.len()
        ));
    }
}

pub async fn list(
    ctx: &Ctx,
    count: usize,
    page: i32,
    concurrency: usize,
) -> (Vec<Phase>, serde_json::Value) {
    let tag = format!("{}l", ctx.run);
    let (create, created) =
        create_many(ctx, "create(setup)", &tag, count, concurrency, ctx.block).await;
    let ids: Vec<String> = created.into_iter().flatten().map(|c| c.id).collect();
    let ctrl = &ctx.cs[0].controller;
    let (paged, paged_ids) = timed_listing(ctrl, page, &format!("list-page-{page}")).await;
    verify(ctx, "paged listing", &ids, &paged_ids);
    let (full, full_ids) = timed_listing(ctrl, 0, "list-full").await;
    verify(ctx, "full listing", &ids, &full_ids);
    let extra = json!({
        "volumes": ids.len(),
        "listed": full_ids.len(),
        "page": page,
        "paged_s": paged.wall.as_secs_f64(),
        "paged_pages": paged.latencies.len(),
        "full_s": full.wall.as_secs_f64(),
        "full_pages": full.latencies.len(),
    });
    let delete = delete_many(ctx, "delete(cleanup)", ids, concurrency).await;
    (vec![create, paged, full, delete], extra)
}
