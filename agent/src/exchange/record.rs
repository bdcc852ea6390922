//! What one exchange signs and records, as typed values serialised in one
//! pass: the access token's claims and the exchange's audit record.
//! Building them as `serde_json::Value` trees (a map entry, a key string
//! and a value per member, then serialising the tree) was most of the
//! exchange's own work beside the decision and the signature.
//!
//! The audit record's members are declared in alphabetical order, the
//! order the log wrote when records were JSON maps, so lines look as before.

use serde::Serialize;
use serde_json::Value;

use super::client::{Caller, CallerRecord};

/// The audit record of one `token.exchange`; each stage fills in what it
/// learnt.
#[derive(Serialize)]
pub struct ExchangeRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<Actor>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_id: Option<String>,
    pub caller: CallerRecord<'a>,
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    pub event: &'static str,
    pub grant_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub granted: Option<Granted<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_approved_scopes: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    pub requested: Requested<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
}

impl<'a> ExchangeRecord<'a> {
    pub fn new(grant_type: &'static str, caller: &'a Caller, requested: Requested<'a>) -> Self {
        Self {
            actor: None,
            approval_id: None,
            caller: CallerRecord(caller),
            decision: "",
            denied_scopes: None,
            error: None,
            error_description: None,
            event: "token.exchange",
            grant_type,
            granted: None,
            jti: None,
            not_approved_scopes: None,
            policies: None,
            principal: None,
            requested,
            subject: None,
            task_id: None,
            token_sha256: None,
        }
    }
}

/// What the request asked for (absent parameters are `null`).
#[derive(Serialize)]
pub struct Requested<'a> {
    pub audience: &'a str,
    pub may_act: Option<&'a str>,
    pub scope_mode: &'static str,
    pub scopes: &'a [String],
    pub task_id: Option<&'a str>,
    pub ttl: Option<u64>,
}

/// The delegation a delegated exchange continues.
#[derive(Serialize)]
pub struct Actor {
    pub delegator: String,
    pub depth: u32,
    pub parent_jti: String,
}

/// What was issued.
#[derive(Serialize)]
pub struct Granted<'a> {
    pub audience: &'a str,
    pub bound_to_certificate: bool,
    pub scopes: Vec<String>,
    pub ttl: u64,
    pub ttl_bound_by: &'static str,
}

/// The claims of an access token (RFC 9068, plus `txn`, `cnf`, `act`,
/// `delegated_from` and `may_act`).
#[derive(Serialize)]
pub struct AccessClaims<'a> {
    pub iss: &'a str,
    pub sub: &'a str,
    pub aud: &'a str,
    pub client_id: &'a str,
    pub scope: &'a str,
    pub iat: u64,
    pub nbf: u64,
    pub exp: u64,
    pub jti: &'a str,
    pub txn: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Act<'a>>,
    #[serde(rename = "delegated_from", skip_serializing_if = "Option::is_none")]
    pub delegated_from: Option<Vec<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub may_act: Option<MayAct<'a>>,
}

/// RFC 8705 §3.1: the certificate the token is bound to.
#[derive(Serialize)]
pub struct Confirmation {
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

/// RFC 8693 §4.1: the current actor, and the chain before it.
#[derive(Serialize)]
pub struct Act<'a> {
    pub sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<&'a Value>,
}

/// RFC 8693 §4.4.
#[derive(Serialize)]
pub struct MayAct<'a> {
    pub sub: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::client::RemoteCaller;

    #[test]
    fn a_remote_caller_is_recorded_by_what_it_proved() {
        let caller = Caller::Remote(RemoteCaller {
            addr: Some("192.0.2.7:4431".parse().unwrap()),
            certificate: None,
            proven: vec!["spiffe://example.org/a".into()],
        });
        assert_eq!(
            serde_json::to_value(CallerRecord(&caller)).unwrap(),
            serde_json::json!({
                "certificate": null,
                "remote": "192.0.2.7:4431",
                "spiffe_ids": ["spiffe://example.org/a"],
            })
        );
    }

    #[test]
    fn absent_members_are_left_out_and_requested_ones_are_null() {
        let caller = Caller::Remote(RemoteCaller::default());
        let scopes = vec!["a".to_string()];
        let mut record = ExchangeRecord::new(
            "client_credentials",
            &caller,
            Requested {
                audience: "https://rs.example",
                may_act: None,
                scope_mode: "exact",
                scopes: &scopes,
                task_id: None,
                ttl: None,
            },
        );
        record.decision = "denied";
        let line = serde_json::to_string(&record).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["caller", "decision", "event", "grant_type", "requested"]
        );
        assert_eq!(v["requested"]["ttl"], Value::Null);
        assert_eq!(v["event"], "token.exchange");
        // Alphabetical, as the log wrote JSON maps.
        let at = |k: &str| line.find(&format!("\"{k}\":")).unwrap();
        assert!(at("caller") < at("decision") && at("grant_type") < at("requested"));
    }
}
