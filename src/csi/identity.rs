//! The Identity service. Everything here answers inline, without waiting
//! for any lane: the liveness probe and the sidecars must always get an
//! answer, however busy the node is.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::CsiService;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::service::Type as ServiceType;
use crate::proto::plugin_capability::volume_expansion::Type as ExpansionType;
use crate::proto::plugin_capability::{Service, Type as CapabilityType, VolumeExpansion};
use crate::proto::*;

fn service(t: ServiceType) -> PluginCapability {
    PluginCapability {
        r#type: Some(CapabilityType::Service(Service { r#type: t as i32 })),
    }
}

#[tonic::async_trait]
impl Identity for CsiService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: self.version.clone(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(ServiceType::ControllerService),
                service(ServiceType::VolumeAccessibilityConstraints),
                service(ServiceType::GroupControllerService),
                PluginCapability {
                    r#type: Some(CapabilityType::VolumeExpansion(VolumeExpansion {
                        r#type: ExpansionType::Online as i32,
                    })),
                },
            ],
        }))
    }

    /// Ready whenever the service answers: a pool that is not ready yet (a
    /// pvcTemplate pool waiting for its mount) makes only that pool refuse
    /// work and report no capacity; it must not fail the liveness probe.
    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let started = Instant::now();
        let waiting: Vec<&str> = self
            .core
            .pools()
            .iter()
            .filter(|p| !p.is_initialized())
            .map(|p| p.name.as_str())
            .collect();
        if !waiting.is_empty() {
            tracing::debug!(pools = ?waiting, "probe: pools not ready yet");
        }
        let response = Ok(ProbeResponse { ready: Some(true) });
        self.metrics
            .observe_rpc("Probe", tonic::Code::Ok, started.elapsed());
        response.map(Response::new)
    }
}
