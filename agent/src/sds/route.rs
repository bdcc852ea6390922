//! SDS as the gRPC server registers it: the three methods framed by
//! [`grpc_frames`] rather than tonic's codec. An Envoy holds its
//! StreamSecrets streams for its whole life; through tonic each would keep
//! a buffer the size of the largest request (Envoy's first request carries
//! its whole node description) and of the largest response, while here an
//! idle stream holds neither. FetchSecrets and DeltaSecrets go the same way
//! so the one request limit holds for all three.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_workload_api::sds::{self, discovery};
use tonic::Status;
use tonic::body::Body;

use super::service::Sds;
use crate::transport::grpc_frames::{self, RequestMessages};

/// The largest DiscoveryRequest accepted. Envoy 1.40's first request on a
/// stream (with its node and the list of every extension it was built
/// with) is about 60 KiB; it is decoded and dropped at once (the unread
/// `extensions` field costs nothing), never kept with the stream.
pub const MAX_REQUEST: usize = 256 * 1024;

#[derive(Clone)]
pub struct SdsRoutes {
    sds: Arc<Sds>,
    max_request: usize,
}

impl SdsRoutes {
    pub fn new(sds: Sds, max_request: usize) -> Self {
        Self {
            sds: Arc::new(sds),
            max_request,
        }
    }
}

impl tonic::server::NamedService for SdsRoutes {
    const NAME: &'static str = sds::SERVICE_NAME;
}

enum Method {
    Stream,
    Fetch,
    Delta,
    Unknown,
}

fn method(path: &str) -> Method {
    let Some(name) = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(sds::SERVICE_NAME))
        .and_then(|p| p.strip_prefix('/'))
    else {
        return Method::Unknown;
    };
    match name {
        "StreamSecrets" => Method::Stream,
        "FetchSecrets" => Method::Fetch,
        "DeltaSecrets" => Method::Delta,
        _ => Method::Unknown,
    }
}

impl tower::Service<http::Request<Body>> for SdsRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (sds, limit) = (self.sds.clone(), self.max_request);
        Box::pin(async move {
            Ok(match method(request.uri().path()) {
                Method::Stream => stream_secrets(&sds, request, limit).await,
                Method::Fetch => fetch_secrets(&sds, request, limit).await,
                Method::Delta => {
                    Status::unimplemented("DeltaSecrets is not implemented; use StreamSecrets")
                        .into_http()
                }
                Method::Unknown => Status::unimplemented("").into_http(),
            })
        })
    }
}

async fn stream_secrets(
    sds: &Sds,
    request: http::Request<Body>,
    limit: usize,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let requests = RequestMessages::<discovery::DiscoveryRequest>::new(body, limit);
    let request = tonic::Request::from_http(http::Request::from_parts(parts, ()));
    match sds.stream_secrets(request, requests).await {
        Ok(stream) => grpc_frames::streaming_response(stream),
        Err(status) => status.into_http(),
    }
}

async fn fetch_secrets(
    sds: &Sds,
    request: http::Request<Body>,
    limit: usize,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let message: discovery::DiscoveryRequest = match grpc_frames::read_unary(body, limit).await {
        Ok(m) => m,
        Err(status) => return status.into_http(),
    };
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    match sds.fetch_secrets(request).await {
        Ok(response) => grpc_frames::streaming_response(futures_util::stream::iter([Ok(response)])),
        Err(status) => status.into_http(),
    }
}
