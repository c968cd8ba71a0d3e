//! gRPC server reflection as `grpcurl list` uses it (no proto files at hand).

use anyhow::{anyhow, bail};
use tonic::transport::Channel;
use tonic_reflection::pb::v1::{
    server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
    server_reflection_response::MessageResponse, ServerReflectionRequest,
};

/// The fully qualified names of the services the server on `channel` lists.
pub async fn reflected_services(channel: Channel) -> anyhow::Result<Vec<String>> {
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await?
        .into_inner();
    let response = stream
        .message()
        .await?
        .ok_or_else(|| anyhow!("the reflection stream ended without an answer"))?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        bail!("unexpected reflection answer: {response:?}");
    };
    Ok(list.service.into_iter().map(|s| s.name).collect())
}
