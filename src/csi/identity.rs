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

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        self.run("Probe", "", |core| {
            let missing: Vec<String> = core
                .pools()
                .iter()
                .filter(|p| !p.is_accessible())
                .map(|p| format!("{} ({})", p.name, p.root.display()))
                .collect();
            if !missing.is_empty() {
                tracing::warn!(pools = ?missing, "probe: pools not accessible");
            }
            Ok(ProbeResponse {
                ready: Some(missing.is_empty()),
            })
        })
        .await
    }
}
