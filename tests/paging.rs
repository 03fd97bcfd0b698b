//! Issue 13 item 5: listing is linear and bounded. 20,000 volumes made
//! cheaply (directories the Go driver would have made, created before the
//! driver starts, plus a few made through CreateVolume), listed in pages of
//! 100 and unpaged; tokens across adds and deletes; a bogus token. The same
//! for ListSnapshots with fewer entries.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use common::*;
use hostpath_csi::client::Clients;
use hostpath_csi::proto::*;
use prost::Message;
use tonic::Code;

/// Volumes in the pool (all but `CREATED` are legacy directories).
const VOLUMES: usize = 20_000;
/// Volumes made through CreateVolume among them.
const CREATED: usize = 50;
const PAGE: i32 = 100;
/// Snapshots for the ListSnapshots paging (each is a real copy).
const SNAPSHOTS: usize = 200;
const SNAPSHOT_PAGE: i32 = 7;
/// The message size gRPC clients accept by default (tonic, grpc-go).
const CLIENT_LIMIT: usize = 4 << 20;
/// A long pool name, so entries are big enough for 20,000 of them to
/// exceed what a client accepts in one message.
const POOL: &str = "pool-with-a-long-name-for-paging-tests-x";
const LIST_BOUND: Duration = Duration::from_secs(60);

/// A volume name of the maximum length (128 bytes), sorted by `i`.
fn long_name(i: usize) -> String {
    let head = format!("pvc-{i:06}-");
    format!("{head}{}", "x".repeat(128 - head.len()))
}

async fn page(
    c: &mut Clients,
    max: i32,
    token: &str,
) -> Result<ListVolumesResponse, tonic::Status> {
    let req = ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    bounded("ListVolumes", LIST_BOUND, c.controller.list_volumes(req))
        .await
        .map(|r| r.into_inner())
}

fn ids_of(r: &ListVolumesResponse) -> Vec<String> {
    r.entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect()
}

/// Follows tokens from `token` to the end; returns every ID in order and
/// the encoded size of all entries.
async fn walk(c: &mut Clients, max: i32, mut token: String) -> (Vec<String>, usize) {
    let (mut ids, mut bytes) = (Vec::new(), 0);
    for _ in 0..VOLUMES * 2 {
        let r = page(c, max, &token)
            .await
            .unwrap_or_else(|s| panic!("page after {token:?}: {s:?}"));
        if max > 0 {
            assert!(
                r.entries.len() <= max as usize,
                "a page of {} entries",
                r.entries.len()
            );
        }
        bytes += r.entries.iter().map(|e| e.encoded_len()).sum::<usize>();
        ids.extend(ids_of(&r));
        if r.next_token.is_empty() {
            return (ids, bytes);
        }
        token = r.next_token;
    }
    panic!("the listing never ended");
}

/// Each ID at most once; returns the duplicates.
fn duplicates(ids: &[String]) -> Vec<String> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *seen.entry(id).or_default() += 1;
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| id.to_owned())
        .collect()
}

/// A driver whose pool holds `VOLUMES` volumes; the pool's temp dir is
/// returned first, so it is removed after the driver is gone.
async fn big_pool() -> (tempfile::TempDir, Driver, BTreeSet<String>) {
    let root = tempfile::Builder::new()
        .prefix("hpc-paging-")
        .tempdir()
        .unwrap();
    let pool = root.path().join("pool");
    fs::create_dir(&pool).unwrap();
    for i in CREATED..VOLUMES {
        fs::create_dir(pool.join(long_name(i))).unwrap();
    }
    let mut d = Driver::start_with(&[(POOL, Some(pool))]).await;
    for i in 0..CREATED {
        create_ok(&mut d.c, dir_volume(&long_name(i), GIB)).await;
    }
    let all = (0..VOLUMES).map(long_name).collect();
    (root, d, all)
}

/// Unpaged and paged listings of 20,000 volumes: every volume exactly once,
/// pages of at most 100, and an unpaged answer a client accepts (capped,
/// with a next_token, when everything would not fit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_volumes_page_and_list_unpaged() {
    let (_root, mut d, all) = big_pool().await;
    let first = page(&mut d.c, 0, "").await;
    let first = first
        .unwrap_or_else(|s| panic!("an unpaged ListVolumes of {VOLUMES} volumes failed: {s:?}"));
    let (unpaged, _) = walk(&mut d.c, 0, String::new()).await;
    assert!(
        duplicates(&unpaged).is_empty(),
        "unpaged duplicates: {:?}",
        duplicates(&unpaged)
    );
    let unpaged_set: BTreeSet<String> = unpaged.into_iter().collect();
    assert_eq!(
        unpaged_set.len(),
        all.len(),
        "the unpaged listing lost volumes"
    );
    assert_eq!(unpaged_set, all);

    let (paged, bytes) = walk(&mut d.c, PAGE, String::new()).await;
    assert!(
        duplicates(&paged).is_empty(),
        "paged duplicates: {:?}",
        duplicates(&paged)
    );
    let paged_set: BTreeSet<String> = paged.into_iter().collect();
    assert_eq!(
        paged_set, all,
        "pages of {PAGE} did not return every volume"
    );
    if bytes > CLIENT_LIMIT {
        assert!(
            !first.next_token.is_empty(),
            "the listing is {bytes} bytes, more than a client accepts, but the unpaged page has no next_token"
        );
    }
    eprintln!(
        "{VOLUMES} volumes, {bytes} bytes of entries; unpaged first page {} entries",
        first.entries.len()
    );
}

/// A token stays valid across adds and deletes: no ID comes twice and every
/// volume that stayed is listed; a bogus token is ABORTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_survive_adds_and_deletes_and_bogus_tokens_are_aborted() {
    let (_root, mut d, all) = big_pool().await;
    let p1 = page(&mut d.c, PAGE, "").await.unwrap();
    let first = ids_of(&p1);
    assert_eq!(first.len(), PAGE as usize);
    assert!(!p1.next_token.is_empty());
    // Delete the page's last entry and the next few; add before and after.
    let mut gone = vec![first.last().unwrap().clone()];
    gone.extend((PAGE as usize..PAGE as usize + 10).map(long_name));
    for id in &gone {
        delete_ok(&mut d.c, id).await;
    }
    for name in [
        "aaa-added-before",
        "pvc-000150-added-between",
        "zzz-added-after",
    ] {
        create_ok(&mut d.c, dir_volume(name, GIB)).await;
    }
    let (rest, _) = walk(&mut d.c, PAGE, p1.next_token).await;
    let mut seen = first.clone();
    seen.extend(rest);
    assert!(
        duplicates(&seen).is_empty(),
        "duplicates across pages: {:?}",
        duplicates(&seen)
    );
    let seen: BTreeSet<String> = seen.into_iter().collect();
    let missing: Vec<&String> = all
        .iter()
        .filter(|id| !gone.contains(id) && !seen.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} volumes missing, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    for bogus in ["not-a-token", "aGVsbG8", "%%%", "\u{0}"] {
        let r = page(&mut d.c, PAGE, bogus).await;
        assert_eq!(
            r.as_ref().map(|_| ()).map_err(|s| s.code()),
            Err(Code::Aborted),
            "token {bogus:?}"
        );
    }
}

// ------------------------------------------------------------ snapshots

async fn snap_page(
    c: &mut Clients,
    max: i32,
    token: &str,
) -> Result<ListSnapshotsResponse, tonic::Status> {
    let req = list_snapshots_req("", "", max, token);
    bounded(
        "ListSnapshots",
        LIST_BOUND,
        c.controller.list_snapshots(req),
    )
    .await
    .map(|r| r.into_inner())
}

async fn snap_walk(c: &mut Clients, max: i32, mut token: String) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..SNAPSHOTS * 2 {
        let r = snap_page(c, max, &token)
            .await
            .unwrap_or_else(|s| panic!("page after {token:?}: {s:?}"));
        if max > 0 {
            assert!(r.entries.len() <= max as usize);
        }
        ids.extend(
            r.entries
                .iter()
                .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone()),
        );
        if r.next_token.is_empty() {
            return ids;
        }
        token = r.next_token;
    }
    panic!("the snapshot listing never ended");
}

/// ListSnapshots pages return every snapshot once, tokens survive adds and
/// deletes, and a bogus token is ABORTED.
#[tokio::test]
async fn snapshots_page_with_stable_tokens() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("src", GIB)).await;
    fs::write(d.pool().join("src/f"), b"x").unwrap();
    let all: BTreeSet<String> = (0..SNAPSHOTS).map(|i| format!("snap-{i:04}")).collect();
    for id in &all {
        snapshot_ok(&mut d.c, id, "src").await;
    }
    let unpaged = snap_walk(&mut d.c, 0, String::new()).await;
    assert!(duplicates(&unpaged).is_empty());
    assert_eq!(unpaged.into_iter().collect::<BTreeSet<_>>(), all);
    let paged = snap_walk(&mut d.c, SNAPSHOT_PAGE, String::new()).await;
    assert!(
        duplicates(&paged).is_empty(),
        "duplicates: {:?}",
        duplicates(&paged)
    );
    assert_eq!(paged.into_iter().collect::<BTreeSet<_>>(), all);

    let p1 = snap_page(&mut d.c, SNAPSHOT_PAGE, "").await.unwrap();
    let first: Vec<String> = p1
        .entries
        .iter()
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    let mut gone = vec![first.last().unwrap().clone()];
    gone.extend(
        (SNAPSHOT_PAGE as usize..SNAPSHOT_PAGE as usize + 3).map(|i| format!("snap-{i:04}")),
    );
    for id in &gone {
        d.c.controller
            .delete_snapshot(delete_snapshot_req(id))
            .await
            .unwrap();
    }
    for id in ["aaa-snap", "snap-0010-between", "zzz-snap"] {
        snapshot_ok(&mut d.c, id, "src").await;
    }
    let mut seen = first;
    seen.extend(snap_walk(&mut d.c, SNAPSHOT_PAGE, p1.next_token).await);
    assert!(
        duplicates(&seen).is_empty(),
        "duplicates across pages: {:?}",
        duplicates(&seen)
    );
    let missing: Vec<&String> = all
        .iter()
        .filter(|id| !gone.contains(id) && !seen.contains(id))
        .collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    for bogus in ["not-a-token", "aGVsbG8", "%%%"] {
        let r = snap_page(&mut d.c, SNAPSHOT_PAGE, bogus).await;
        assert_eq!(
            r.as_ref().map(|_| ()).map_err(|s| s.code()),
            Err(Code::Aborted),
            "token {bogus:?}"
        );
    }
}
