//! Issue 9 item 6: one driver per pool and per socket. A second `serve` on
//! a pool already served, or on a socket that accepts connections, refuses
//! to start (instead of sweeping the first one's in-flight work away or
//! stealing its socket); a stale socket is still replaced.

mod common;

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use hostpath_csi::client::Clients;

/// How long a refused second instance may take to exit (a liveness bound).
const EXIT_BOUND: Duration = Duration::from_secs(15);
/// Size of the clone in flight while a second instance starts.
const INFLIGHT_BYTES: u64 = 768 << 20;

/// Starts another `serve` on `socket` with `pools_json`; its stderr goes to
/// `log`. Returns whether it exited (and how) within the bound.
fn second_instance(
    socket: &Path,
    pools_json: &str,
    log: &Path,
) -> Option<std::process::ExitStatus> {
    let err = fs::File::create(log).unwrap();
    let child = serve_command(socket, pools_json, &[])
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start a second hostpath-csi serve");
    let mut child = Reaper::new(child);
    child.wait_exit(EXIT_BOUND)
}

#[track_caller]
fn assert_refused(status: Option<std::process::ExitStatus>, log: &Path, what: &str) {
    let text = fs::read_to_string(log).unwrap_or_default();
    match status {
        None => panic!(
            "{what}: the second instance still runs after {EXIT_BOUND:?}; its log:\n{}",
            tail(&text, 20)
        ),
        Some(s) => assert!(
            !s.success(),
            "{what}: the second instance exited with success:\n{text}"
        ),
    }
}

/// The first instance still answers on its socket and still has `id`.
async fn first_still_serves(d: &mut Driver, id: &str) {
    let st = fs::symlink_metadata(&d.socket).expect("the first instance's socket is gone");
    assert!(st.file_type().is_socket());
    let mut fresh = Clients::connect(&d.endpoint())
        .await
        .expect("connect to the first instance");
    probe_within(&mut fresh, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        listed_ids(&mut fresh).await.contains(&id.to_owned()),
        "the socket no longer reaches the first instance"
    );
}

/// A second instance on a pool already served (on another socket) exits
/// non-zero and says the pool is in use; the first keeps serving.
#[tokio::test]
async fn second_instance_on_a_served_pool_refuses_to_start() {
    let mut d = Driver::start().await;
    let pid = d.pid();
    create_ok(&mut d.c, dir_volume("v", GIB)).await;
    let log = d.path("second.log");
    let status = second_instance(&d.path("second.sock"), &d.pools_json.clone(), &log);
    assert_refused(status, &log, "second instance on the same pool");
    let text = fs::read_to_string(&log).unwrap_or_default().to_lowercase();
    assert!(
        text.contains("in use"),
        "the refusal does not say the pool is in use:\n{text}"
    );
    d.assert_alive(pid, "a second instance started on its pool");
    first_still_serves(&mut d, "v").await;
}

/// A second instance on a socket that accepts connections (with another
/// pool) exits non-zero and leaves the socket to the first instance.
#[tokio::test]
async fn second_instance_on_a_live_socket_refuses_to_start() {
    let mut d = Driver::start().await;
    let pid = d.pid();
    create_ok(&mut d.c, dir_volume("v", GIB)).await;
    let other = serde_json::json!([{"name": "other", "path": d.path("other-pool")}]).to_string();
    let log = d.path("second.log");
    let status = second_instance(&d.socket.clone(), &other, &log);
    assert_refused(status, &log, "second instance on a live socket");
    d.assert_alive(pid, "a second instance started on its socket");
    first_still_serves(&mut d, "v").await;
}

/// A socket file nobody listens on (left by a kill -9) is still replaced.
#[tokio::test]
async fn stale_socket_is_still_replaced() {
    let mut d = Driver::start().await;
    create_ok(&mut d.c, dir_volume("v", GIB)).await;
    d.kill9();
    let st = fs::symlink_metadata(&d.socket).expect("kill -9 leaves the socket file");
    assert!(st.file_type().is_socket());
    d.restart().await;
    first_still_serves(&mut d, "v").await;
}

/// A second instance started while the first is cloning must not sweep
/// the clone's work in progress away: the clone completes whole.
#[tokio::test]
async fn second_instance_leaves_an_inflight_clone_alone() {
    let fs = LoopFs::new("ext4", 3072);
    let mut d = Driver::start_with(&[("p", Some(fs.mount_point.join("pool")))]).await;
    create_ok(&mut d.c, block_volume("src", INFLIGHT_BYTES as i64)).await;
    write_pattern(&d.pool().join("src"), INFLIGHT_BYTES, 9);
    let want = file_digest(&d.pool().join("src"));
    let mut c = d.c.clone();
    let clone = tokio::spawn(async move {
        c.controller
            .create_volume(clone_of(block_volume("copy", INFLIGHT_BYTES as i64), "src"))
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while tmp_entries(d.pool()).is_empty() {
        assert!(
            !clone.is_finished(),
            "the clone finished before a second instance could start"
        );
        assert!(Instant::now() < deadline, "the clone never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let log = d.path("second.log");
    let status = second_instance(&d.path("second.sock"), &d.pools_json.clone(), &log);
    let r = bounded("the clone", Duration::from_secs(120), clone)
        .await
        .unwrap();
    assert!(
        r.is_ok(),
        "the clone failed after a second instance started: {r:?}"
    );
    assert_eq!(
        file_digest(&d.pool().join("copy")),
        want,
        "the clone's content"
    );
    assert_refused(status, &log, "second instance during a clone");
}
