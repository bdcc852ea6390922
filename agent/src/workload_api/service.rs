//! The SPIFFE Workload API service: header check → caller attestation (once
//! per connection, liveness re-checked per call) → entries → SVID cache →
//! response. Status codes follow the spec; every one the API answers with is
//! listed here (the SVID streams' are chosen in `svid_stream.rs`):
//!
//! | condition | code |
//! |---|---|
//! | missing/incorrect `workload.spiffe.io` header, empty mandatory field, bad token | InvalidArgument |
//! | no entry matches the caller (also mid-stream after an entry change) | PermissionDenied |
//! | the fleet authority refuses every identity the caller matches | PermissionDenied |
//! | agent starting/stopping, attestation could not run | Unavailable |
//! | the caller process exited or changed since it connected | Unauthenticated |
//! | WIT-SVID profile asked of an agent whose signer has no WIT-SVID keys (a fleet authority without `wit.key`) | Unimplemented |
//! | FetchWITSVID for a `spiffe_id` the caller has no entry for | PermissionDenied |

use std::sync::Arc;
use tokio::time::Instant;

use tessera_workload_api as pb;
use tonic::{Request, Response, Status};

use super::bundle_stream::BundleStream;
use super::messages::{bundle_map, wit_bundles_response};
use super::state::{ApiState, Opened, refused_all};
use super::svid_stream::{SvidKind, SvidStream, WitKind, X509Kind};
use crate::caller::no_identity;
use crate::entries::{Identity, federated_domains};
use crate::identity::{SignError, TrustBundle};
use crate::metrics::OpenStream;
use crate::transport::grpc_stream::{BoxStream, FirstOutcome, Outcome};

pub struct WorkloadApi {
    state: Arc<ApiState>,
}

impl WorkloadApi {
    pub fn new(state: Arc<ApiState>) -> Self {
        Self { state }
    }

    fn record<T>(&self, method: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.state.callers.metrics.record_rpc(method, code, started);
    }

    /// The common start of every streaming RPC: header, caller, entitlement
    /// (a caller with no identity gets neither SVIDs nor bundles), then the
    /// stream that `stream` makes.
    async fn open_stream<T, M>(
        &self,
        method: &'static str,
        request: &Request<T>,
        stream: impl FnOnce(Arc<ApiState>, Opened, OpenStream, Outcome) -> BoxStream<M>,
    ) -> Result<Response<BoxStream<M>>, Status> {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(request).await?;
            // The entries are matched once here; the stream starts from this
            // match and re-matches only when they change.
            let mut entries = self.state.callers.entries.clone();
            let identities = entries.borrow_and_update().identities_for(&peer.selectors);
            if identities.is_empty() {
                return Err(no_identity());
            }
            let opened = Opened {
                peer,
                entries,
                identities,
            };
            let metrics = &self.state.callers.metrics;
            Ok(stream(
                self.state.clone(),
                opened,
                OpenStream::new(metrics, method),
                Outcome {
                    metrics: metrics.clone(),
                    method,
                    started,
                },
            ))
        }
        .await;
        // A stream's outcome is recorded when its first message is known.
        if result.is_err() {
            self.record(method, started, &result);
        }
        result.map(Response::new)
    }
}

/// A stream of `K`'s SVIDs (of `wanted` only, when given; an invalid
/// `wanted` is the stream's one message).
fn svid_stream<K: SvidKind>(
    state: Arc<ApiState>,
    opened: Opened,
    wanted: Result<Option<spiffe::SpiffeId>, Status>,
    open: OpenStream,
    outcome: Outcome,
) -> BoxStream<K::Message> {
    Box::pin(SvidStream::<K>::new(
        state,
        opened,
        wanted,
        open,
        FirstOutcome::new(outcome),
    ))
}

/// A bundle stream of the messages `build` makes.
fn bundles<M: Clone + PartialEq + Send + Unpin + 'static>(
    state: Arc<ApiState>,
    opened: Opened,
    open: OpenStream,
    outcome: Outcome,
    build: impl Fn(&str, &[Identity], &TrustBundle) -> M + Send + Unpin + 'static,
) -> BoxStream<M> {
    Box::pin(BundleStream::new(
        state,
        opened,
        build,
        open,
        FirstOutcome::new(outcome),
    ))
}

#[tonic::async_trait]
impl pb::server::SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;
    type FetchWITSVIDStream = BoxStream<pb::WitsvidResponse>;
    type FetchWITBundlesStream = BoxStream<pb::WitBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.open_stream("FetchX509SVID", &request, |state, opened, open, outcome| {
            svid_stream::<X509Kind>(state, opened, Ok(None), open, outcome)
        })
        .await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.open_stream(
            "FetchX509Bundles",
            &request,
            |state, opened, open, outcome| {
                bundles(state, opened, open, outcome, |td, ids, b| {
                    pb::X509BundlesResponse {
                        crl: Vec::new(),
                        bundles: bundle_map(td, ids, b, |b| b.x509.clone(), |f| f.x509.clone()),
                    }
                })
            },
        )
        .await
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.open_stream(
            "FetchJWTBundles",
            &request,
            |state, opened, open, outcome| {
                bundles(state, opened, open, outcome, |td, ids, b| {
                    pb::JwtBundlesResponse {
                        bundles: bundle_map(td, ids, b, |b| b.jwks.clone(), |f| f.jwt_jwks.clone()),
                    }
                })
            },
        )
        .await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(&request).await?;
            let req = request.get_ref();
            if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            let wanted = match req.spiffe_id.as_str() {
                "" => None,
                id => Some(
                    spiffe::SpiffeId::new(id)
                        .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?,
                ),
            };
            let mut identities = self.state.callers.identities(&peer);
            if let Some(wanted) = &wanted {
                identities.retain(|i| &i.spiffe_id == wanted);
            }
            if identities.is_empty() {
                return Err(no_identity());
            }
            let mut svids = Vec::with_capacity(identities.len());
            let mut refused = Vec::new();
            for ident in identities {
                let jwt = match self
                    .state
                    .cache
                    .jwt(&ident.spiffe_id, &req.audience, ident.jwt_ttl)
                    .await
                {
                    Ok(jwt) => jwt,
                    Err(SignError::Refused(why)) => {
                        tracing::warn!(spiffe_id = %ident.spiffe_id, reason = %why, "the fleet authority refuses an identity the caller matches");
                        refused.push(why);
                        continue;
                    }
                    Err(e) => {
                        return Err(Status::unavailable(format!("could not sign JWT-SVID: {e}")));
                    }
                };
                svids.push(pb::Jwtsvid {
                    spiffe_id: ident.spiffe_id.to_string(),
                    svid: jwt.token,
                    hint: ident.hint.unwrap_or_default(),
                });
            }
            if svids.is_empty() {
                return Err(refused_all(&refused));
            }
            Ok(Response::new(pb::JwtsvidResponse { svids }))
        }
        .await;
        self.record("FetchJWTSVID", started, &result);
        result
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let started = Instant::now();
        let result = async {
            pb::check_security_header(request.metadata())?;
            let peer = self.state.caller(&request).await?;
            let req = request.get_ref();
            if req.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if req.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            // Tokens of foreign trust domains validate for callers whose
            // entries federate with them, as their bundles reach only them.
            let identities = self.state.callers.identities(&peer);
            let (id, claims) = self
                .state
                .cache
                .trust_store()
                .validate_jwt_trusting(&req.svid, &[&req.audience], federated_domains(&identities))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(pb::ValidateJwtsvidResponse {
                spiffe_id: id.to_string(),
                claims: Some(pb::json_object_to_struct(&claims)),
            }))
        }
        .await;
        self.record("ValidateJWTSVID", started, &result);
        result
    }

    async fn fetch_witsvid(
        &self,
        request: Request<pb::WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        const METHOD: &str = "FetchWITSVID";
        let started = Instant::now();
        if let Err(status) = self.wit_profile_served(&request) {
            let result = Err(status);
            self.record(METHOD, started, &result);
            return result;
        }
        let wanted = match request.get_ref().spiffe_id.as_str() {
            "" => Ok(None),
            id => spiffe::SpiffeId::new(id)
                .map(Some)
                .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}"))),
        };
        self.open_stream(METHOD, &request, |state, opened, open, outcome| {
            svid_stream::<WitKind>(state, opened, wanted, open, outcome)
        })
        .await
    }

    async fn fetch_wit_bundles(
        &self,
        request: Request<pb::WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        const METHOD: &str = "FetchWITBundles";
        let started = Instant::now();
        if let Err(status) = self.wit_profile_served(&request) {
            let result = Err(status);
            self.record(METHOD, started, &result);
            return result;
        }
        self.open_stream(METHOD, &request, |state, opened, open, outcome| {
            bundles(state, opened, open, outcome, wit_bundles_response)
        })
        .await
    }
}

impl WorkloadApi {
    /// The WIT-SVID profile's gate (Workload API spec §7): after the
    /// security header, a signer without WIT-SVID keys answers
    /// Unimplemented, which clients take as "not supported" and stop.
    fn wit_profile_served<T>(&self, request: &Request<T>) -> Result<(), Status> {
        pb::check_security_header(request.metadata())?;
        if self.state.cache.signer().serves_wit() {
            Ok(())
        } else {
            Err(Status::unimplemented(
                crate::identity::signer::WIT_UNSUPPORTED,
            ))
        }
    }
}
