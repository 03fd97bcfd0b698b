//! What a run created and what went wrong, and the check that a workload
//! left nothing behind: every volume (and snapshot) ID CreateVolume (or
//! CreateSnapshot) returned must be gone from ListVolumes (ListSnapshots).

use std::collections::BTreeSet;
use std::sync::Mutex;

use hostpath_csi::proto::controller_client::ControllerClient;
use hostpath_csi::proto::controller_service_capability::{rpc::Type as RpcType, Type as Cap};
use hostpath_csi::proto::*;
use tonic::transport::Channel;
use tonic::Status;

use crate::phase::Phase;

#[derive(Default)]
pub struct Ledger {
    /// IDs CreateVolume returned.
    volumes: Mutex<BTreeSet<String>>,
    /// Names whose CreateVolume failed: the driver may still have made them
    /// under an ID we never learned; checked as IDs, which finds them on
    /// drivers whose IDs are the names.
    failed_names: Mutex<BTreeSet<String>>,
    snapshots: Mutex<BTreeSet<String>>,
    problems: Mutex<Vec<String>>,
}

impl Ledger {
    pub fn created(&self, id: &str) {
        self.volumes.lock().unwrap().insert(id.to_owned());
    }

    pub fn create_failed(&self, name: &str) {
        self.failed_names.lock().unwrap().insert(name.to_owned());
    }

    #[allow(dead_code)] // no workload takes snapshots yet; the check is ready for one
    pub fn snapshot_created(&self, id: &str) {
        self.snapshots.lock().unwrap().insert(id.to_owned());
    }

    /// Something that makes the run fail, said once at the end.
    pub fn problem(&self, what: impl Into<String>) {
        let what = what.into();
        eprintln!("csi-bench: {what}");
        self.problems.lock().unwrap().push(what);
    }

    /// Records the phases' errors that no correct driver should answer.
    pub fn check_phases(&self, phases: &[Phase]) {
        for p in phases {
            for line in p.unexpected() {
                self.problem(line);
            }
        }
    }

    /// A cleanup step's error is a problem: it may leave something behind.
    pub fn cleanup<T>(&self, what: &str, r: Result<T, Status>) {
        if let Err(s) = r {
            self.problem(format!("cleanup: {what}: {:?} {}", s.code(), s.message()));
        }
    }

    /// Lists what is left of this run's volumes and snapshots; each one
    /// left is a problem.
    pub async fn check_leftovers(&self, ctrl: &ControllerClient<Channel>) {
        let caps = match controller_caps(ctrl).await {
            Ok(c) => c,
            Err(s) => return self.problem(format!("leftover check: {s}")),
        };
        if !caps.contains(&RpcType::ListVolumes) {
            eprintln!("csi-bench: leftover check skipped: the driver lacks LIST_VOLUMES");
        } else {
            let mut mine: BTreeSet<String> = self.volumes.lock().unwrap().clone();
            mine.extend(self.failed_names.lock().unwrap().iter().cloned());
            match list_volume_ids(ctrl, 0).await {
                Ok((ids, _)) => self.report_left("volume", &mine, ids),
                Err(s) => self.problem(format!("leftover check: ListVolumes: {s}")),
            }
        }
        let snaps = self.snapshots.lock().unwrap().clone();
        if !snaps.is_empty() && caps.contains(&RpcType::ListSnapshots) {
            match list_snapshot_ids(ctrl).await {
                Ok(ids) => self.report_left("snapshot", &snaps, ids),
                Err(s) => self.problem(format!("leftover check: ListSnapshots: {s}")),
            }
        }
    }

    fn report_left(&self, kind: &str, mine: &BTreeSet<String>, listed: Vec<String>) {
        let left: Vec<String> = listed.into_iter().filter(|id| mine.contains(id)).collect();
        if !left.is_empty() {
            let shown: Vec<&str> = left.iter().take(20).map(String::as_str).collect();
            self.problem(format!(
                "left behind {} {kind}(s) this run created: {}{}",
                left.len(),
                shown.join(" "),
                if left.len() > shown.len() { " …" } else { "" }
            ));
        }
    }

    /// Exits non-zero, naming every problem, if there was one.
    pub fn finish(&self) {
        let problems = self.problems.lock().unwrap();
        if !problems.is_empty() {
            eprintln!("csi-bench: FAILED ({} problem(s)):", problems.len());
            for p in problems.iter() {
                eprintln!("  - {p}");
            }
            std::process::exit(1);
        }
    }
}

pub async fn controller_caps(ctrl: &ControllerClient<Channel>) -> Result<Vec<RpcType>, Status> {
    let caps = ctrl
        .clone()
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner();
    Ok(caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Cap::Rpc(r)) => RpcType::try_from(r.r#type).ok(),
            _ => None,
        })
        .collect())
}

/// Every volume ID, following next_token pages of `page` entries (0: the
/// driver's choice); also how many pages that took.
pub async fn list_volume_ids(
    ctrl: &ControllerClient<Channel>,
    page: i32,
) -> Result<(Vec<String>, usize), Status> {
    let mut ctrl = ctrl.clone();
    let (mut ids, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let r = ctrl
            .list_volumes(ListVolumesRequest {
                max_entries: page,
                starting_token: token,
            })
            .await?
            .into_inner();
        pages += 1;
        ids.extend(
            r.entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id)),
        );
        if r.next_token.is_empty() {
            return Ok((ids, pages));
        }
        token = r.next_token;
    }
}

async fn list_snapshot_ids(ctrl: &ControllerClient<Channel>) -> Result<Vec<String>, Status> {
    let mut ctrl = ctrl.clone();
    let (mut ids, mut token) = (Vec::new(), String::new());
    loop {
        let r = ctrl
            .list_snapshots(ListSnapshotsRequest {
                starting_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        ids.extend(
            r.entries
                .into_iter()
                .filter_map(|e| e.snapshot.map(|s| s.snapshot_id)),
        );
        if r.next_token.is_empty() {
            return Ok(ids);
        }
        token = r.next_token;
    }
}
