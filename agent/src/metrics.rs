//! Prometheus metrics. Recording is a few atomic operations, so the Workload
//! API path never waits on metrics; gauges that are derived from state (expiry,
//! cached identities) are computed at scrape time instead of on the hot path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrustDomainLabels {
    pub trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FederationLabels {
    pub trust_domain: String,
    pub result: &'static str,
}

/// Federation: foreign bundle fetches. Registered in the agent's registry
/// and in the fleet authority's (whichever fetches).
#[derive(Clone, Debug, Default)]
pub struct FederationMetrics {
    /// Fetches by trust domain and result (`updated`, `unchanged`,
    /// `fetch_error`, `invalid`, `stale`).
    pub refreshes: Family<FederationLabels, Counter>,
    /// Unix time of the last successful fetch, per trust domain.
    pub last_success: Family<TrustDomainLabels, Gauge>,
    /// `spiffe_sequence` of the bundle in use, per trust domain.
    pub sequence: Family<TrustDomainLabels, Gauge>,
}

impl FederationMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "federation_bundle_refreshes",
            "Foreign bundle fetches by trust domain and result (updated, unchanged, fetch_error, invalid, stale)",
            self.refreshes.clone(),
        );
        registry.register(
            "federation_bundle_last_success_timestamp_seconds",
            "Unix time of the last successful fetch of a foreign trust domain's bundle",
            self.last_success.clone(),
        );
        registry.register(
            "federation_bundle_sequence",
            "spiffe_sequence of the foreign bundle in use (0 if it has none)",
            self.sequence.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    pub federation: FederationMetrics,
    pub rpcs: Family<RpcLabels, Counter>,
    pub rpc_seconds: Family<MethodLabels, Histogram>,
    pub open_streams: Family<MethodLabels, Gauge>,
    pub svids_issued_x509: Counter,
    pub svids_issued_jwt: Counter,
    pub svids_issued_wit: Counter,
    pub rotations: Counter,
    pub attestations: Family<ResultLabels, Counter>,
    pub ca_expiry_seconds: Gauge,
    pub svid_expiry_seconds: Gauge,
    pub cached_identities: Gauge,
    /// Token exchange decisions, by outcome (`issued`, `denied`, `pending`, `error`).
    pub exchanges: Family<ResultLabels, Counter>,
    pub exchange_seconds: Histogram,
    pub revocations: Family<ResultLabels, Counter>,
    pub introspections: Family<ResultLabels, Counter>,
    pub policy_reloads: Family<ResultLabels, Counter>,
    pub policies_loaded: Gauge,
    pub audit_write_errors: Counter,
    /// Denials and other records that change nothing, left out because
    /// their principal exceeded its audit budget (summarised instead).
    pub audit_records_suppressed: Counter,
    /// JWT-SVIDs presented over HTTPS a second time (refused).
    pub assertion_replays: Counter,
    /// Task ends kept in memory only (no token of the task could be live,
    /// or the principal used up its durable share after a restart).
    pub task_ends_in_memory: Counter,
    pub approvals_pending: Gauge,
    /// Connections closed at accept because the socket was at its limit.
    pub connections_refused: Family<MethodLabels, Counter>,
    /// Requests refused because their caller exceeded its budget.
    pub rate_limited: Counter,
    /// SDS responses the client (Envoy) rejected: an xDS NACK.
    pub sds_rejections: Counter,
    /// Upstream mode: 1 while the fleet authority answers, 0 during an outage.
    pub upstream_reachable: Gauge,
    /// Upstream mode: requests to the fleet authority by outcome
    /// (`ok`, `refused`, `unreachable`).
    pub upstream_requests: Family<ResultLabels, Counter>,
    /// Upstream mode: revocations made here that a replica confirmed stored
    /// fleet-wide.
    pub fleet_revocations_published: Counter,
    /// Upstream mode: revocations received from the fleet's store.
    pub fleet_revocations_received: Counter,
    /// Upstream mode: 1 while the stream of the fleet's revocations is open.
    pub fleet_stream_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register(
            "workload_api_requests",
            "Workload API calls by method and gRPC status code",
            rpcs.clone(),
        );
        let rpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
            ])
        });
        registry.register(
            "workload_api_request_duration_seconds",
            "Time to answer a unary call, or to send the first message of a stream",
            rpc_seconds.clone(),
        );
        let open_streams = Family::<MethodLabels, Gauge>::default();
        registry.register(
            "workload_api_open_streams",
            "Workload API streams currently open",
            open_streams.clone(),
        );
        let svids_issued = Family::<MethodLabels, Counter>::default();
        let svids_issued_x509 = svids_issued
            .get_or_create(&MethodLabels { method: "x509" })
            .clone();
        let svids_issued_jwt = svids_issued
            .get_or_create(&MethodLabels { method: "jwt" })
            .clone();
        let svids_issued_wit = svids_issued
            .get_or_create(&MethodLabels { method: "wit" })
            .clone();
        registry.register(
            "svids_issued",
            "SVIDs signed, by type (label method = x509|jwt|wit)",
            svids_issued,
        );
        let rotations = Counter::default();
        registry.register(
            "svid_rotations",
            "X509-SVIDs and WIT-SVIDs renewed by the rotation worker",
            rotations.clone(),
        );
        let attestations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "attestations",
            "Caller attestations by result",
            attestations.clone(),
        );
        let ca_expiry_seconds = Gauge::default();
        registry.register(
            "ca_expiry_seconds",
            "Seconds until the signing CA expires",
            ca_expiry_seconds.clone(),
        );
        let svid_expiry_seconds = Gauge::default();
        registry.register(
            "svid_expiry_seconds",
            "Seconds until the soonest cached X509-SVID expires (0 if none)",
            svid_expiry_seconds.clone(),
        );
        let cached_identities = Gauge::default();
        registry.register(
            "cached_identities",
            "SPIFFE IDs with a cached X509-SVID",
            cached_identities.clone(),
        );
        let exchanges = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_exchanges",
            "Token exchange decisions by result (issued, denied, pending, error)",
            exchanges.clone(),
        );
        let exchange_seconds = Histogram::new([
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
        ]);
        registry.register(
            "token_exchange_duration_seconds",
            "Time to decide and answer a token exchange (including the audit fsync)",
            exchange_seconds.clone(),
        );
        let revocations = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_revocations",
            "Revocation requests by kind (token, task) and refusals",
            revocations.clone(),
        );
        let introspections = Family::<ResultLabels, Counter>::default();
        registry.register(
            "token_introspections",
            "Introspection answers by result (active, inactive)",
            introspections.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy directory reloads by result (ok, error)",
            policy_reloads.clone(),
        );
        let policies_loaded = Gauge::default();
        registry.register(
            "policies_loaded",
            "Cedar policies in the active set",
            policies_loaded.clone(),
        );
        let audit_write_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit records that could not be made durable (the exchange was refused)",
            audit_write_errors.clone(),
        );
        let audit_records_suppressed = Counter::default();
        registry.register(
            "audit_records_suppressed",
            "Denial records a principal sent beyond exchange.denial_records_per_minute (counted in audit.suppressed summaries)",
            audit_records_suppressed.clone(),
        );
        let assertion_replays = Counter::default();
        registry.register(
            "token_assertion_replays",
            "JWT-SVIDs presented to the HTTPS token endpoint a second time (refused)",
            assertion_replays.clone(),
        );
        let task_ends_in_memory = Counter::default();
        registry.register(
            "task_ends_in_memory",
            "Task ends kept in memory only, because no token of the task could be live",
            task_ends_in_memory.clone(),
        );
        let approvals_pending = Gauge::default();
        registry.register(
            "approvals_pending",
            "Exchanges waiting for an operator's approval",
            approvals_pending.clone(),
        );
        let connections_refused = Family::<MethodLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept because the socket was at its connection limit (label method = socket)",
            connections_refused.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited_requests",
            "Requests refused because the calling process exceeded limits.requests_per_second",
            rate_limited.clone(),
        );
        let sds_rejections = Counter::default();
        registry.register(
            "sds_rejections",
            "SDS responses the client (Envoy) rejected (xDS NACKs); the agent log says why",
            sds_rejections.clone(),
        );
        let upstream_reachable = Gauge::default();
        registry.register(
            "upstream_reachable",
            "Upstream mode: 1 while a fleet authority replica answers; 0 while SVIDs are served from cache only",
            upstream_reachable.clone(),
        );
        let upstream_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "upstream_requests",
            "Upstream mode: requests to the fleet authority by result (ok, refused, unreachable)",
            upstream_requests.clone(),
        );
        let fleet_revocations_published = Counter::default();
        registry.register(
            "fleet_revocations_published",
            "Upstream mode: revocations made on this node that the fleet's store holds",
            fleet_revocations_published.clone(),
        );
        let fleet_revocations_received = Counter::default();
        registry.register(
            "fleet_revocations_received",
            "Upstream mode: revocations received from the fleet's store (this node's own included)",
            fleet_revocations_received.clone(),
        );
        let fleet_stream_connected = Gauge::default();
        registry.register(
            "fleet_stream_connected",
            "Upstream mode: 1 while the stream of the fleet's revocations is open",
            fleet_stream_connected.clone(),
        );
        let federation = FederationMetrics::default();
        federation.register(&mut registry);
        Self {
            registry,
            federation,
            upstream_reachable,
            upstream_requests,
            fleet_revocations_published,
            fleet_revocations_received,
            fleet_stream_connected,
            rate_limited,
            sds_rejections,
            connections_refused,
            exchanges,
            exchange_seconds,
            revocations,
            introspections,
            policy_reloads,
            policies_loaded,
            audit_write_errors,
            audit_records_suppressed,
            assertion_replays,
            task_ends_in_memory,
            approvals_pending,
            rpcs,
            rpc_seconds,
            open_streams,
            svids_issued_x509,
            svids_issued_jwt,
            svids_issued_wit,
            rotations,
            attestations,
            ca_expiry_seconds,
            svid_expiry_seconds,
            cached_identities,
        }
    }

    pub fn record_rpc(
        &self,
        method: &'static str,
        code: tonic::Code,
        started: tokio::time::Instant,
    ) {
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        if code == tonic::Code::Ok {
            self.rpc_seconds
                .get_or_create(&MethodLabels { method })
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A guard that keeps a stream counted as open until dropped.
pub struct OpenStream {
    gauge: Gauge,
}

impl OpenStream {
    pub fn new(metrics: &Metrics, method: &'static str) -> Self {
        let gauge = metrics
            .open_streams
            .get_or_create(&MethodLabels { method })
            .clone();
        gauge.inc();
        Self { gauge }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
