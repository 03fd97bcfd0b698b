//! hostpath-csi: a node-local CSI driver, drop-in for kubevirt's hostpath provisioner.

pub mod block;
pub mod client;
pub mod config;
pub mod copy;
pub mod csi;
pub mod dirfd;
pub mod error;
pub mod fstools;
pub mod kube;
pub mod metrics;
pub mod mount;
pub mod names;
pub mod pool;
pub mod poolmount;
pub mod render;
pub mod rollback;
pub mod server;
pub mod snaplabel;
pub mod tree;
pub mod volume;

/// Generated CSI v1.12 types and services.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// Default driver name (kubevirt's hostpath provisioner).
pub const DEFAULT_DRIVER_NAME: &str = "kubevirt.io.hostpath-provisioner";
/// Topology key this driver reports and honours.
pub const TOPOLOGY_KEY: &str = "topology.hostpath.csi/node";
