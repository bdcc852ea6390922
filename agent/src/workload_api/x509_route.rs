//! FetchX509SVID served without tonic's response encoder.
//!
//! An X509-SVID stream idles for hours between rotations, and a node can hold
//! tens of thousands of them. tonic encodes every response stream through a
//! per-stream buffer that keeps the allocation of the largest message sent
//! (about 1 KiB for one SVID and its bundle) until the stream ends. Here the
//! messages are framed by [`grpc_frames`], so an idle stream holds no encoded
//! bytes at all.
//!
//! Only the transport differs: the request is read and checked as tonic
//! would, and the stream itself is [`WorkloadApi::fetch_x509svid`], so header
//! checks, attestation, status codes and metrics are the same code as for
//! every other method. Every other path goes to the generated server.
//!
//! The request limit given to [`WorkloadApiRoutes::new`] bounds both paths
//! alike (a test below sends the same oversized request down each), and a
//! layer added with `Server::builder().layer(..)` wraps this whole service,
//! so it sees every method, FetchX509SVID included.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_workload_api as pb;
use tessera_workload_api::server::SpiffeWorkloadApi;
use tonic::body::Body;

use super::service::WorkloadApi;
use crate::transport::grpc_frames;

const FETCH_X509_SVID: &str = "/SpiffeWorkloadAPI/FetchX509SVID";

/// The Workload API service as registered with the server: FetchX509SVID
/// here, everything else in the generated server.
#[derive(Clone)]
pub struct WorkloadApiRoutes {
    api: Arc<WorkloadApi>,
    generated: pb::server::SpiffeWorkloadApiServer<WorkloadApi>,
    max_request: usize,
}

impl WorkloadApiRoutes {
    /// `max_request` bounds a request message, as the generated server's
    /// `max_decoding_message_size` does for the other methods.
    pub fn new(api: WorkloadApi, max_request: usize) -> Self {
        let api = Arc::new(api);
        Self {
            generated: pb::server::SpiffeWorkloadApiServer::from_arc(api.clone())
                .max_decoding_message_size(max_request),
            api,
            max_request,
        }
    }
}

impl tonic::server::NamedService for WorkloadApiRoutes {
    const NAME: &'static str = pb::SERVICE_NAME;
}

impl tower::Service<http::Request<Body>> for WorkloadApiRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == FETCH_X509_SVID {
            let (api, limit) = (self.api.clone(), self.max_request);
            Box::pin(async move { Ok(fetch_x509svid(&api, request, limit).await) })
        } else {
            tower::Service::call(&mut self.generated, request)
        }
    }
}

async fn fetch_x509svid(
    api: &WorkloadApi,
    request: http::Request<Body>,
    limit: usize,
) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let message: pb::X509svidRequest = match grpc_frames::read_unary(body, limit).await {
        Ok(m) => m,
        Err(status) => return status.into_http(),
    };
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));
    match api.fetch_x509svid(request).await {
        Ok(response) => grpc_frames::streaming_response(response.into_inner()),
        Err(status) => status.into_http(),
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;
    use prost::Message;
    use prost::bytes::Bytes;

    use super::*;

    /// The Workload API as the server registers it, over a memory-only
    /// authority; no request carries peer credentials, so any request that
    /// passes the transport reaches the service and is refused there.
    fn routes(max_request: usize) -> WorkloadApiRoutes {
        use crate::caller::Callers;
        use crate::clock::SystemClock;
        use crate::identity::{AuthoritySettings, LocalAuthority, SvidCache};
        let clock = Arc::new(SystemClock);
        let authority = LocalAuthority::load(
            AuthoritySettings {
                trust_domain: spiffe::TrustDomain::new("example.org").unwrap(),
                ca_ttl: std::time::Duration::from_secs(3600),
                jwt_key_ttl: std::time::Duration::from_secs(3600),
                jwt_key_type: Default::default(),
                state_dir: None,
                ca_files: None,
            },
            clock.clone(),
        )
        .unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let trust = authority.trust_store().clone();
        let callers = Arc::new(Callers {
            attestor: tessera_attestor::WorkloadAttestor::new(
                tessera_attestor::ProcRoot::new("/proc"),
                Vec::new(),
            ),
            entries: tokio::sync::watch::channel(crate::entries::EntrySet::default()).1,
            metrics: metrics.clone(),
            ready: std::sync::atomic::AtomicBool::new(true),
            shutdown: tokio_util::sync::CancellationToken::new(),
            limiter: crate::rate_limit::RateLimiter::new(crate::rate_limit::Budget {
                rate: 1000.0,
                burst: 1000.0,
            }),
        });
        let cache = SvidCache::new(authority, trust, clock, metrics);
        WorkloadApiRoutes::new(
            WorkloadApi::new(super::super::ApiState::new(callers, cache)),
            max_request,
        )
    }

    /// The gRPC status of a response: trailers-only in the headers, else in
    /// the body's trailers.
    async fn grpc_status(response: http::Response<Body>) -> tonic::Code {
        let from = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from)
        };
        if let Some(code) = from(response.headers()) {
            return code;
        }
        let collected = response.into_body().collect().await.unwrap();
        from(collected.trailers().expect("trailers")).expect("grpc-status")
    }

    fn call(path: &str, message: Vec<u8>) -> http::Request<Body> {
        let mut framed = vec![0];
        framed.extend((message.len() as u32).to_be_bytes());
        framed.extend(message);
        http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("workload.spiffe.io", "true")
            .body(Body::new(http_body_util::Full::new(Bytes::from(framed))))
            .unwrap()
    }

    /// FetchX509SVID is framed here, every other method by the generated
    /// server: the request limit given to the routes must hold for both, and
    /// a request within it must reach the same service code.
    #[tokio::test]
    async fn the_request_limit_and_the_service_are_the_same_for_both_paths() {
        let limit = 256;
        let mut routes = routes(limit);
        // An unknown field (number 15, bytes) pads a request past the limit.
        let padded = |extra: usize| {
            let mut m = vec![0x7a];
            let len = extra;
            m.push(0x80 | (len & 0x7f) as u8);
            m.push((len >> 7) as u8);
            m.extend(std::iter::repeat_n(b'x', len));
            m
        };
        let jwt = |extra: usize| {
            let mut m = pb::JwtsvidRequest {
                audience: vec!["a".into()],
                spiffe_id: String::new(),
            }
            .encode_to_vec();
            m.extend(padded(extra));
            m
        };
        for (path, big, small) in [
            (FETCH_X509_SVID, padded(limit), padded(10)),
            ("/SpiffeWorkloadAPI/FetchJWTSVID", jwt(limit), jwt(10)),
        ] {
            let over = tower::Service::call(&mut routes, call(path, big))
                .await
                .unwrap();
            assert_eq!(grpc_status(over).await, tonic::Code::OutOfRange, "{path}");
            let within = tower::Service::call(&mut routes, call(path, small))
                .await
                .unwrap();
            // Reached the service: refused there for want of peer credentials.
            assert_eq!(grpc_status(within).await, tonic::Code::Internal, "{path}");
        }
    }
}
