//! Envoy's Secret Discovery Service (SDS v3) on the Workload API socket, so
//! Envoy (and anything that speaks SDS: Istio's proxies, gRPC's xDS
//! clients) gets its certificate and trust bundles from Tessera directly.
//!
//! Resource names follow SPIRE's agent, the interface Envoy configurations
//! are written against:
//!
//! | name | resource |
//! |---|---|
//! | a SPIFFE ID the caller holds (`spiffe://example.org/front`) | `TlsCertificate`: that X509-SVID and its key |
//! | `default` (`default_svid_name`) | `TlsCertificate`: the caller's first X509-SVID |
//! | a trust domain ID (`spiffe://example.org`) | validation context: that domain's bundle |
//! | `ROOTCA` (`default_bundle_name`) | validation context: this trust domain's bundle |
//! | `ALL` (`default_all_bundles_name`) | validation context: every bundle the caller may see, one SPIFFE validator |
//! | no names at all | every certificate and every bundle the caller may see |
//!
//! Validation contexts carry Envoy's SPIFFE certificate validator
//! (`SPIFFECertValidatorConfig`: each trust domain's CAs verify only that
//! domain's IDs) unless the Envoy is older than 1.18 or sets
//! `disable_spiffe_cert_validation` in its node metadata (or the agent
//! config does); then a plain `trusted_ca`.
//!
//! The rules are the Workload API's: the caller is attested from its kernel
//! credentials (no `workload.spiffe.io` header, which the spec does not ask
//! of SDS), a caller with no identity gets nothing (PermissionDenied), the
//! per-caller request budget counts every request message, the connection
//! caps and idle timeout are the socket's, and an update is pushed only
//! after re-checking that the process that opened the stream is still there.
//!
//! * [`config`]: the resource names and the validator default.
//! * [`resources`]: which resources a request names and the `Secret`s built
//!   for them (pure, tested without sockets).
//! * [`bundles`]: the bundles a caller may see, and their change signal.
//! * [`xds`]: the state-of-the-world handshake: versions, nonces, ACK/NACK.
//! * [`service`]: attestation, FetchSecrets and the StreamSecrets body.
//! * [`route`]: the three methods' HTTP/2 framing (no per-stream buffers).

pub mod bundles;
pub mod config;
pub mod resources;
pub mod route;
pub mod service;
pub mod xds;

pub use config::SdsConfig;
pub use route::SdsRoutes;
pub use service::{Sds, SdsState};
