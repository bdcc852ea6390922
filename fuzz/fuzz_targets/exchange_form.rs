//! Token exchange request bodies (`POST /token`,
//! `application/x-www-form-urlencoded`): `Form::parse` then
//! `TokenRequest::from_form`, and `parse_scopes` on its own.
//!
//! Input: the request body.
//!
//! Properties beyond "no panic": a request that parses has 1 to 32 distinct,
//! valid scope tokens that re-join (space-separated) into a string that
//! parses back to the same scopes; its target is non-empty, at most 2048
//! bytes, without control characters; ids are printable ASCII; tokens are at
//! most 16 KiB; a requested TTL is positive. `parse_scopes` is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::exchange::request::{Form, Grant, Target, TokenRequest, check_id, parse_scopes};

fuzz_target!(|data: &[u8]| {
    let form = Form::parse(data);
    if let Ok(req) = TokenRequest::from_form(&form) {
        assert!(
            !req.scopes.is_empty() && req.scopes.len() <= 32,
            "{:?}",
            req.scopes
        );
        let joined = req.scopes.join(" ");
        let again = parse_scopes(&joined).expect("joined scopes parse");
        assert_eq!(again, req.scopes, "scopes do not re-join losslessly");
        let t = req.target.as_str();
        assert!(!t.is_empty() && t.len() <= 2048 && !t.chars().any(char::is_control));
        if let Target::Resource(uri) = &req.target {
            assert!(uri.contains(':') && !uri.contains('#'), "{uri:?}");
        }
        for id in [&req.task_id, &req.approval_id].into_iter().flatten() {
            assert!(check_id("id", id).is_ok(), "{id:?}");
        }
        assert!(!req.svid.is_empty() && req.svid.len() <= 16 * 1024);
        if let Some(a) = &req.delegating_token {
            assert!(!a.is_empty() && a.len() <= 16 * 1024);
            // Only a token exchange delegates.
            assert_eq!(req.grant, Grant::TokenExchange);
        }
        if let Some(ttl) = req.requested_ttl {
            assert!(!ttl.is_zero());
        }
    }

    let text = String::from_utf8_lossy(data);
    if let Ok(scopes) = parse_scopes(&text) {
        assert!(scopes.len() <= 32);
        let joined = scopes.join(" ");
        assert_eq!(parse_scopes(&joined).expect("joined scopes parse"), scopes);
        for (i, s) in scopes.iter().enumerate() {
            assert!(!s.is_empty() && s.len() <= 128 && !s.contains(' '));
            assert!(!scopes[..i].contains(s), "duplicate scope {s:?}");
        }
    }
});
