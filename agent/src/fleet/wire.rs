//! JSON bodies between agents and the authority (HTTP/1.1 over mTLS).
//! DER is standard base64; JWKs use the RFC 7517 EC form.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/attest` (no client certificate): prove the node, get a node SVID
/// over the CSR's key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// `k8s_psat` or `join_token`.
    pub method: String,
    pub token: String,
    /// PKCS#10 DER, base64.
    pub csr: String,
}

/// `POST /v1/renew` (node SVID as client certificate): a fresh node SVID.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub csr: String,
}

/// Answer to attest and renew.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeSvidResponse {
    pub node_id: String,
    /// Leaf DER, base64.
    pub svid: String,
    pub bundle: BundleDoc,
}

/// `GET /v1/bundle`: everything relying parties need, for the whole trust domain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleDoc {
    /// CA certificates (DER, base64), every one currently published.
    pub x509_authorities: Vec<String>,
    /// JWT-SVID keys (JWKs).
    pub jwt_keys: Vec<Value>,
    /// Task access-token keys (JWKs).
    pub access_keys: Vec<Value>,
}

/// Most items (X.509 plus JWT) in one `POST /v1/sign`; agents split larger
/// renewal batches.
pub const MAX_BATCH: usize = 500;

/// `POST /v1/sign` (node SVID): a batch of workload SVIDs.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    #[serde(default)]
    pub x509: Vec<X509Request>,
    #[serde(default)]
    pub jwt: Vec<JwtRequest>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Request {
    /// PKCS#10 DER, base64; its one URI SAN is the requested SPIFFE ID.
    pub csr: String,
    pub ttl_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRequest {
    pub spiffe_id: String,
    pub audience: Vec<String>,
    pub ttl_seconds: u64,
}

/// One answer per request item, in order.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SignResponse {
    pub x509: Vec<Signed>,
    pub jwt: Vec<Signed>,
}

/// Either a signed credential (leaf DER base64, or a compact JWT) or why not.
#[derive(Debug, Serialize, Deserialize)]
pub struct Signed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /v1/access-token` (node SVID): sign a task access token's claims.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessTokenRequest {
    pub claims: Value,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccessTokenResponse {
    pub token: String,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
