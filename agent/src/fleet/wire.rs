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
    /// The foreign trust domains the authority federates with: each one's
    /// SPIFFE bundle document as the authority last fetched it, by trust
    /// domain name. Agents install them; a workload sees those its entries
    /// name in `federates_with`. Absent from older authorities.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub federated_bundles: std::collections::BTreeMap<String, String>,
    /// WIT-SVID keys (JWKs, `use` `wit-svid`); absent when the authority
    /// has none (its agents then do not serve the WIT profile).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wit_keys: Vec<Value>,
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
    /// Sent only to an authority whose bundle has WIT-SVID keys (an older
    /// one refuses the field).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wit: Vec<WitRequest>,
}

/// A WIT-SVID over a key the node generated: `jwk` is its public half
/// (EC P-256, `alg` ES256), bound by the WIT-SVID's `cnf`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitRequest {
    pub spiffe_id: String,
    pub jwk: Value,
    pub ttl_seconds: u64,
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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wit: Vec<Signed>,
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

/// `POST /v1/revocations` (node SVID): revocations made on the node, to be
/// made fleet-wide. Answered once the fleet's store holds them.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationsRequest {
    pub revocations: Vec<crate::revocation::Record>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RevocationsAccepted {
    /// How many were stored (expired ones are dropped, known ones merged).
    pub stored: usize,
}

/// One line of `GET /v1/stream?cursor=N` (newline-delimited JSON): stored
/// revocations after the node's cursor, the `synced` marker once everything
/// the store held has been sent, and heartbeats while idle.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StreamEvent {
    /// The store's position after this event: the node resumes from it.
    pub cursor: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revocations: Vec<crate::revocation::Record>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub synced: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

/// A registration entry as the authority hands it to nodes (live entries
/// from the Kubernetes API; config-file entries stay in each side's file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDoc {
    /// Where it comes from: `ClusterWorkloadEntry/<name>` or
    /// `WorkloadEntry/<namespace>/<name>` (logs only).
    pub source: String,
    /// The SPIFFE ID template, as in a config file's `spiffe_id`.
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    pub x509_ttl_seconds: u64,
    pub jwt_ttl_seconds: u64,
    pub wit_ttl_seconds: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federates_with: Vec<String>,
}

/// One line of `GET /v1/entries` (newline-delimited JSON): the whole set of
/// live entries each time it changes (the first line too), and heartbeats
/// while idle.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EntriesEvent {
    /// Increases with every change this replica has seen (replicas count on
    /// their own: a node takes each set whole, never a difference).
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<EntryDoc>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

/// An approval waiting on a node, as the node hands it to the authority
/// (`POST /v1/approvals`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingApproval {
    /// The node's approval id (`apr_...`).
    pub id: String,
    /// Unix seconds: decide before this.
    pub deadline: u64,
    /// What would be issued (the node's `ApprovalRequest`, as its operator
    /// socket lists it).
    pub request: Value,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsRequest {
    pub pending: Vec<PendingApproval>,
}

/// A decision for one of a node's approvals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    pub id: String,
    pub approve: bool,
    /// Who decided, as the API server authenticated them (`k8s:<user>`).
    pub by: String,
}

/// One line of `GET /v1/approvals/decisions` (newline-delimited JSON).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DecisionEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<ApprovalDecision>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub heartbeat: bool,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;
    use crate::identity::jws::PublicJwk;

    /// The keys of a serialised value, sorted.
    fn keys_of(value: &impl Serialize) -> Vec<String> {
        let v = serde_json::to_value(value).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn parse<T: DeserializeOwned>(v: Value) -> Result<T, serde_json::Error> {
        serde_json::from_value(v)
    }

    fn csr_for(id: &str) -> String {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        B64.encode(params.serialize_request(&key).unwrap().der())
    }

    fn jwk(kid: &str, byte: u8) -> PublicJwk {
        PublicJwk::for_tests(kid, byte)
    }

    fn bundle() -> BundleDoc {
        BundleDoc {
            x509_authorities: vec![B64.encode(b"ca-1"), B64.encode(b"ca-2")],
            jwt_keys: vec![jwk("j1", 1).to_json("jwt-svid")],
            access_keys: vec![jwk("a1", 2).to_json("sig")],
            federated_bundles: Default::default(),
            wit_keys: Vec::new(),
        }
    }

    #[test]
    fn attest_request_uses_method_token_csr_and_round_trips() {
        let req = AttestRequest {
            method: "join_token".into(),
            token: "secret".into(),
            csr: "Q1NS".into(),
        };
        assert_eq!(keys_of(&req), ["csr", "method", "token"]);
        let back: AttestRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(
            (back.method.as_str(), back.token.as_str(), back.csr.as_str()),
            ("join_token", "secret", "Q1NS")
        );
    }

    #[test]
    fn renew_request_carries_only_the_csr() {
        let req = RenewRequest { csr: "Q1NS".into() };
        assert_eq!(serde_json::to_value(&req).unwrap(), json!({"csr": "Q1NS"}));
        let back: RenewRequest = parse(json!({"csr": "Q1NS"})).unwrap();
        assert_eq!(back.csr, "Q1NS");
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        let extra = |mut v: Value| {
            v.as_object_mut().unwrap().insert("extra".into(), json!(1));
            v
        };
        let attest = json!({"method": "k8s_psat", "token": "t", "csr": "c"});
        assert!(parse::<AttestRequest>(attest.clone()).is_ok());
        assert!(parse::<AttestRequest>(extra(attest)).is_err());
        assert!(parse::<RenewRequest>(extra(json!({"csr": "c"}))).is_err());
        assert!(parse::<SignRequest>(extra(json!({}))).is_err());
        let x509 = json!({"csr": "c", "ttl_seconds": 60});
        assert!(parse::<X509Request>(extra(x509.clone())).is_err());
        assert!(parse::<SignRequest>(json!({"x509": [extra(x509)]})).is_err());
        let jwt = json!({"spiffe_id": "spiffe://td/w", "audience": ["a"], "ttl_seconds": 60});
        assert!(parse::<JwtRequest>(extra(jwt.clone())).is_err());
        assert!(parse::<SignRequest>(json!({"jwt": [extra(jwt)]})).is_err());
        assert!(parse::<AccessTokenRequest>(extra(json!({"claims": {}}))).is_err());
    }

    #[test]
    fn requests_refuse_missing_fields() {
        assert!(parse::<AttestRequest>(json!({"method": "join_token", "token": "t"})).is_err());
        assert!(parse::<RenewRequest>(json!({})).is_err());
        assert!(parse::<X509Request>(json!({"csr": "c"})).is_err());
        assert!(
            parse::<JwtRequest>(json!({"spiffe_id": "spiffe://td/w", "ttl_seconds": 1})).is_err()
        );
        assert!(parse::<AccessTokenRequest>(json!({})).is_err());
    }

    #[test]
    fn sign_request_lists_default_to_empty() {
        let empty: SignRequest = parse(json!({})).unwrap();
        assert!(empty.x509.is_empty() && empty.jwt.is_empty());
        let jwt_only: SignRequest = parse(json!({
            "jwt": [{"spiffe_id": "spiffe://td/w", "audience": ["db", "cache"], "ttl_seconds": 300}]
        }))
        .unwrap();
        assert!(jwt_only.x509.is_empty());
        assert_eq!(jwt_only.jwt[0].spiffe_id, "spiffe://td/w");
        assert_eq!(jwt_only.jwt[0].audience, ["db", "cache"]);
        assert_eq!(jwt_only.jwt[0].ttl_seconds, 300);
    }

    #[test]
    fn sign_request_round_trips_with_documented_field_names() {
        let req = SignRequest {
            x509: vec![X509Request {
                csr: "Q1NS".into(),
                ttl_seconds: 3600,
            }],
            jwt: vec![JwtRequest {
                spiffe_id: "spiffe://td/w".into(),
                audience: vec!["db".into()],
                ttl_seconds: 300,
            }],
            wit: Vec::new(),
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({
                "x509": [{"csr": "Q1NS", "ttl_seconds": 3600}],
                "jwt": [{"spiffe_id": "spiffe://td/w", "audience": ["db"], "ttl_seconds": 300}],
            })
        );
        let back: SignRequest = parse(v).unwrap();
        assert_eq!(back.x509[0].csr, "Q1NS");
        assert_eq!(back.x509[0].ttl_seconds, 3600);
        assert_eq!(back.jwt[0].audience, ["db"]);
    }

    #[test]
    fn signed_omits_the_absent_half() {
        let ok = Signed {
            svid: Some("der".into()),
            error: None,
        };
        assert_eq!(serde_json::to_value(&ok).unwrap(), json!({"svid": "der"}));
        let refused = Signed {
            svid: None,
            error: Some("not entitled".into()),
        };
        assert_eq!(
            serde_json::to_value(&refused).unwrap(),
            json!({"error": "not entitled"})
        );
        let neither: Signed = parse(json!({})).unwrap();
        assert!(neither.svid.is_none() && neither.error.is_none());
        let back: Signed = parse(json!({"error": "not entitled"})).unwrap();
        assert_eq!(back.error.as_deref(), Some("not entitled"));
        assert!(back.svid.is_none());
    }

    #[test]
    fn sign_response_round_trips_in_order() {
        let resp = SignResponse {
            x509: vec![
                Signed {
                    svid: Some("a".into()),
                    error: None,
                },
                Signed {
                    svid: None,
                    error: Some("b".into()),
                },
            ],
            jwt: vec![Signed {
                svid: Some("t".into()),
                error: None,
            }],
            wit: Vec::new(),
        };
        let v = serde_json::to_value(&resp).unwrap();
        assert_eq!(
            v,
            json!({"x509": [{"svid": "a"}, {"error": "b"}], "jwt": [{"svid": "t"}]})
        );
        let back: SignResponse = parse(v).unwrap();
        assert_eq!(back.x509[0].svid.as_deref(), Some("a"));
        assert_eq!(back.x509[1].error.as_deref(), Some("b"));
        assert_eq!(back.jwt[0].svid.as_deref(), Some("t"));
    }

    #[test]
    fn sign_response_needs_both_lists() {
        // No `serde(default)` here: the authority always sends both.
        assert!(parse::<SignResponse>(json!({"x509": []})).is_err());
        assert!(parse::<SignResponse>(json!({"jwt": []})).is_err());
    }

    #[test]
    fn responses_accept_unknown_fields() {
        // Answers have no `deny_unknown_fields`: a newer authority may add fields.
        let doc = serde_json::to_value(bundle()).unwrap();
        let mut doc_plus = doc.clone();
        doc_plus["refresh_hint"] = json!(5);
        assert_eq!(parse::<BundleDoc>(doc_plus).unwrap(), bundle());
        let node: NodeSvidResponse =
            parse(json!({"node_id": "n", "svid": "s", "bundle": doc, "extra": true})).unwrap();
        assert_eq!(node.node_id, "n");
        assert!(parse::<SignResponse>(json!({"x509": [], "jwt": [], "extra": 1})).is_ok());
        assert!(parse::<Signed>(json!({"svid": "s", "extra": 1})).is_ok());
        assert_eq!(
            parse::<AccessTokenResponse>(json!({"token": "t", "expires_in": 60}))
                .unwrap()
                .token,
            "t"
        );
        assert_eq!(
            parse::<ErrorBody>(json!({"error": "e", "code": 7}))
                .unwrap()
                .error,
            "e"
        );
    }

    #[test]
    fn node_svid_response_round_trips_with_its_bundle() {
        let resp = NodeSvidResponse {
            node_id: "spiffe://td/tessera/node/join/n1".into(),
            svid: B64.encode(b"leaf"),
            bundle: bundle(),
        };
        assert_eq!(keys_of(&resp), ["bundle", "node_id", "svid"]);
        assert_eq!(
            keys_of(&resp.bundle),
            ["access_keys", "jwt_keys", "x509_authorities"]
        );
        let back: NodeSvidResponse =
            serde_json::from_slice(&serde_json::to_vec(&resp).unwrap()).unwrap();
        assert_eq!(back.node_id, resp.node_id);
        assert_eq!(B64.decode(back.svid).unwrap(), b"leaf");
        assert_eq!(back.bundle, resp.bundle);
    }

    #[test]
    fn federated_bundles_are_relayed_by_name_and_optional_for_older_peers() {
        let mut doc = bundle();
        doc.federated_bundles
            .insert("partner.example".into(), r#"{"keys":[]}"#.into());
        let value = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            value["federated_bundles"]["partner.example"],
            r#"{"keys":[]}"#
        );
        let back: BundleDoc = serde_json::from_value(value).unwrap();
        assert_eq!(back, doc);
        // An older authority's document has no such field.
        let old = serde_json::json!({"x509_authorities": [], "jwt_keys": [], "access_keys": []});
        let back: BundleDoc = serde_json::from_value(old).unwrap();
        assert!(back.federated_bundles.is_empty());
    }

    #[test]
    fn bundle_keys_are_rfc7517_ec_jwks_that_parse_back() {
        let doc: BundleDoc =
            serde_json::from_str(&serde_json::to_string(&bundle()).unwrap()).unwrap();
        let key = &doc.jwt_keys[0];
        for field in ["kty", "crv", "x", "y", "kid", "use"] {
            assert!(key.get(field).is_some(), "JWK field {field}");
        }
        assert_eq!(
            (key["kty"].as_str(), key["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        assert_eq!(PublicJwk::from_json(key), Some(jwk("j1", 1)));
        assert_eq!(
            PublicJwk::from_json(&doc.access_keys[0]),
            Some(jwk("a1", 2))
        );
        let cas: Vec<Vec<u8>> = doc
            .x509_authorities
            .iter()
            .map(|c| B64.decode(c).unwrap())
            .collect();
        assert_eq!(cas, [b"ca-1".to_vec(), b"ca-2".to_vec()]);
    }

    #[test]
    fn access_token_bodies_round_trip() {
        let claims = json!({"sub": "spiffe://td/w", "exp": 1, "scope": ["a", "b"]});
        let req = AccessTokenRequest {
            claims: claims.clone(),
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({ "claims": claims })
        );
        let back: AccessTokenRequest =
            serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back.claims, claims);
        let resp = AccessTokenResponse {
            token: "a.b.c".into(),
        };
        assert_eq!(
            serde_json::to_value(&resp).unwrap(),
            json!({"token": "a.b.c"})
        );
        let err = ErrorBody { error: "no".into() };
        assert_eq!(serde_json::to_value(&err).unwrap(), json!({"error": "no"}));
    }

    #[test]
    fn a_full_batch_of_typical_csrs_fits_the_servers_body_limit() {
        // `server::MAX_BODY` (private there): 1 MiB.
        const SERVER_MAX_BODY: usize = 1024 * 1024;
        assert_eq!(MAX_BATCH, 500, "the documented batch size");
        let csr = csr_for("spiffe://example.org/ns/production/sa/payments-api-worker");
        let req = SignRequest {
            x509: (0..MAX_BATCH)
                .map(|_| X509Request {
                    csr: csr.clone(),
                    ttl_seconds: 3600,
                })
                .collect(),
            jwt: Vec::new(),
            wit: Vec::new(),
        };
        let body = serde_json::to_vec(&req).unwrap();
        assert!(
            body.len() < SERVER_MAX_BODY,
            "{} bytes for {MAX_BATCH} CSRs",
            body.len()
        );
    }
}
