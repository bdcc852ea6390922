//! Parsing and checking a Tessera access token (RFC 9068 JWT, ES256).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use serde_json::Value;

/// Longest token accepted; Tessera's tokens are well under 2 KiB even with a
/// delegation chain.
pub(crate) const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Deepest `act` chain we parse (the issuer bounds delegation depth far lower).
const MAX_ACT_DEPTH: usize = 32;

/// The claims of a verified access token, inserted into the request's
/// extensions for handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    /// Issuer (`iss`).
    pub iss: String,
    /// Principal the token acts for (`sub`, a SPIFFE ID for Tessera tokens).
    pub sub: String,
    /// The audience this resource server accepted the token for.
    pub aud: String,
    /// The workload that requested the token (`client_id`).
    pub client_id: String,
    /// Granted scopes (`scope`, split on spaces).
    pub scopes: Vec<String>,
    /// Task / transaction id (`txn`).
    pub txn: Option<String>,
    /// Token id (`jti`).
    pub jti: String,
    /// Issued-at, not-before and expiry, in seconds since the Unix epoch.
    pub iat: i64,
    pub nbf: Option<i64>,
    pub exp: i64,
    /// Delegation chain (`act`), most recent actor first. For audit and
    /// display only: RFC 8693 §4.1 says not to make access decisions on it.
    pub act: Option<Actor>,
    /// `cnf.x5t#S256`: the client certificate the token is bound to, if any.
    pub cnf_x5t_s256: Option<String>,
    /// Key that signed the token.
    pub kid: String,
}

impl VerifiedToken {
    /// Whether the token grants this scope.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// The delegation chain as a list of `sub`s, most recent actor first.
    pub fn actor_chain(&self) -> Vec<&str> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }
}

/// One link of an RFC 8693 `act` chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub sub: String,
    pub act: Option<Box<Actor>>,
}

/// Why a token was refused. The `Display` text is what goes into
/// `error_description` (never any part of the token itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is too long")]
    TooLong,
    #[error("unsupported token type; expected at+jwt")]
    Type,
    #[error("unsupported signing algorithm; expected ES256")]
    Algorithm,
    #[error("token header has unsupported critical parameters")]
    Critical,
    #[error("token has no key id")]
    MissingKid,
    #[error("token is signed by an unknown key")]
    UnknownKey,
    #[error("token signature is invalid")]
    Signature,
    #[error("token claim {0} is missing or invalid")]
    Claim(&'static str),
    #[error("token issuer is not trusted")]
    Issuer,
    #[error("token audience does not include this resource")]
    Audience,
    #[error("token has expired")]
    Expired,
    #[error("token is not yet valid")]
    NotYetValid,
    #[error("token is issued in the future")]
    IssuedInFuture,
    #[error("token is bound to a different client certificate")]
    CnfMismatch,
    #[error("token is bound to a client certificate, but none was presented")]
    CnfRequired,
    #[error("token is not active (revoked, expired or its task has ended)")]
    Inactive,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// A token split and its header checked; the signature is not yet verified.
pub(crate) struct Unverified<'a> {
    pub kid: String,
    pub signing_input: &'a [u8],
    pub signature: Vec<u8>,
    payload: Vec<u8>,
}

/// Splits a compact JWS and checks its header: ES256, `typ` `at+jwt`, a `kid`,
/// no `crit`. Everything else (`none`, HS*, RS*, JWE) is refused here, before
/// any key is looked up.
pub(crate) fn parse(token: &str) -> Result<Unverified<'_>, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header_bytes = B64.decode(h).map_err(|_| TokenError::Malformed)?;
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|_| TokenError::Malformed)?;
    if header.alg != "ES256" {
        return Err(TokenError::Algorithm);
    }
    // RFC 9068 §4: "at+jwt" or "application/at+jwt", compared case-insensitively.
    let typ_ok = header.typ.as_deref().is_some_and(|t| {
        t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
    });
    if !typ_ok {
        return Err(TokenError::Type);
    }
    if header.crit.is_some() {
        return Err(TokenError::Critical);
    }
    let kid = match header.kid {
        Some(k) if !k.is_empty() => k,
        _ => return Err(TokenError::MissingKid),
    };
    let payload = B64.decode(p).map_err(|_| TokenError::Malformed)?;
    let signature = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    if signature.len() != 64 {
        return Err(TokenError::Signature);
    }
    Ok(Unverified {
        kid,
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        signature,
        payload,
    })
}

/// What a token's claims are checked against.
pub(crate) struct ClaimRules<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub now: i64,
    pub skew: i64,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Option<Value>,
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    aud: Option<Value>,
    #[serde(default)]
    client_id: Option<Value>,
    #[serde(default)]
    scope: Option<Value>,
    #[serde(default)]
    iat: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    jti: Option<Value>,
    #[serde(default)]
    txn: Option<Value>,
    #[serde(default)]
    act: Option<Value>,
    #[serde(default)]
    cnf: Option<Value>,
}

fn string(v: Option<Value>, name: &'static str) -> Result<String, TokenError> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(TokenError::Claim(name)),
    }
}

fn numeric_date(v: Option<&Value>, name: &'static str) -> Result<Option<i64>, TokenError> {
    match v {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.floor() as i64)),
                    _ => Err(TokenError::Claim(name)),
                }
            }
        }
        Some(_) => Err(TokenError::Claim(name)),
    }
}

fn actor(v: &Value, depth: usize) -> Result<Actor, TokenError> {
    if depth > MAX_ACT_DEPTH {
        return Err(TokenError::Claim("act"));
    }
    let Value::Object(map) = v else {
        return Err(TokenError::Claim("act"));
    };
    let sub = match map.get("sub") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(TokenError::Claim("act")),
    };
    let act = match map.get("act") {
        None => None,
        Some(inner) => Some(Box::new(actor(inner, depth + 1)?)),
    };
    Ok(Actor { sub, act })
}

/// Checks the claims of a token whose signature has been verified.
pub(crate) fn check_claims(
    unverified: &Unverified<'_>,
    rules: &ClaimRules<'_>,
) -> Result<VerifiedToken, TokenError> {
    let claims: Claims =
        serde_json::from_slice(&unverified.payload).map_err(|_| TokenError::Malformed)?;
    let iss = string(claims.iss, "iss")?;
    if iss != rules.issuer {
        return Err(TokenError::Issuer);
    }
    // Contract: a single string. RFC 9068 also allows an array; it must then
    // contain us.
    let aud_ok = match &claims.aud {
        Some(Value::String(a)) => a == rules.audience,
        Some(Value::Array(list)) => list
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a == rules.audience)),
        _ => return Err(TokenError::Claim("aud")),
    };
    if !aud_ok {
        return Err(TokenError::Audience);
    }
    let exp = numeric_date(claims.exp.as_ref(), "exp")?.ok_or(TokenError::Claim("exp"))?;
    let iat = numeric_date(claims.iat.as_ref(), "iat")?.ok_or(TokenError::Claim("iat"))?;
    let nbf = numeric_date(claims.nbf.as_ref(), "nbf")?;
    if rules.now >= exp.saturating_add(rules.skew) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = nbf
        && rules.now < nbf.saturating_sub(rules.skew)
    {
        return Err(TokenError::NotYetValid);
    }
    if rules.now < iat.saturating_sub(rules.skew) {
        return Err(TokenError::IssuedInFuture);
    }
    let sub = string(claims.sub, "sub")?;
    let client_id = string(claims.client_id, "client_id")?;
    let jti = string(claims.jti, "jti")?;
    let scopes = match claims.scope {
        None => Vec::new(),
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        Some(_) => return Err(TokenError::Claim("scope")),
    };
    let txn = match claims.txn {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(TokenError::Claim("txn")),
    };
    let act = claims.act.as_ref().map(|a| actor(a, 0)).transpose()?;
    let cnf_x5t_s256 = match &claims.cnf {
        None => None,
        Some(Value::Object(map)) => match map.get("x5t#S256") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(TokenError::Claim("cnf")),
        },
        Some(_) => return Err(TokenError::Claim("cnf")),
    };
    Ok(VerifiedToken {
        iss,
        sub,
        aud: rules.audience.to_string(),
        client_id,
        scopes,
        txn,
        jti,
        iat,
        nbf,
        exp,
        act,
        cnf_x5t_s256,
        kid: unverified.kid.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &Value) -> String {
        B64.encode(v.to_string())
    }

    fn token(header: Value, claims: Value) -> String {
        format!(
            "{}.{}.{}",
            b64(&header),
            b64(&claims),
            B64.encode([0u8; 64])
        )
    }

    fn good_header() -> Value {
        serde_json::json!({"alg":"ES256","typ":"at+jwt","kid":"k1"})
    }

    #[test]
    fn header_rules() {
        let c = serde_json::json!({});
        assert!(parse(&token(good_header(), c.clone())).is_ok());
        let bad = |h: Value| parse(&token(h, c.clone())).err();
        assert_eq!(
            bad(serde_json::json!({"alg":"none","typ":"at+jwt","kid":"k"})),
            Some(TokenError::Algorithm)
        );
        assert_eq!(
            bad(serde_json::json!({"alg":"HS256","typ":"at+jwt","kid":"k"})),
            Some(TokenError::Algorithm)
        );
        assert_eq!(
            bad(serde_json::json!({"alg":"ES256","typ":"JWT","kid":"k"})),
            Some(TokenError::Type)
        );
        assert_eq!(
            bad(serde_json::json!({"alg":"ES256","kid":"k"})),
            Some(TokenError::Type)
        );
        assert_eq!(
            bad(serde_json::json!({"alg":"ES256","typ":"application/AT+JWT"})),
            Some(TokenError::MissingKid)
        );
        assert_eq!(
            bad(serde_json::json!({"alg":"ES256","typ":"at+jwt","kid":"k","crit":["b64"]})),
            Some(TokenError::Critical)
        );
        assert_eq!(parse("a.b").err(), Some(TokenError::Malformed));
        assert_eq!(parse("a.b.c.d").err(), Some(TokenError::Malformed));
        assert_eq!(parse("!!!.b.c").err(), Some(TokenError::Malformed));
        assert_eq!(
            parse(&"a".repeat(MAX_TOKEN_LEN + 1)).err(),
            Some(TokenError::TooLong)
        );
    }

    #[test]
    fn claim_rules() {
        let now = 1_000_000;
        let rules = ClaimRules {
            issuer: "iss",
            audience: "https://rs/mcp",
            now,
            skew: 30,
        };
        let base = serde_json::json!({
            "iss":"iss","sub":"spiffe://td/u","aud":"https://rs/mcp","client_id":"spiffe://td/c",
            "scope":"a  b","iat":now,"nbf":now,"exp":now+60,"jti":"j","txn":"t",
            "act":{"sub":"spiffe://td/p","act":{"sub":"spiffe://td/q"}},
            "cnf":{"x5t#S256":"abc"}
        });
        let check = |patch: Value| {
            let mut c = base.clone();
            for (k, v) in patch.as_object().unwrap() {
                if v.is_null() {
                    c.as_object_mut().unwrap().remove(k);
                } else {
                    c[k] = v.clone();
                }
            }
            let t = token(good_header(), c);
            check_claims(&parse(&t).unwrap(), &rules)
        };
        let ok = check(serde_json::json!({})).unwrap();
        assert_eq!(ok.scopes, ["a", "b"]);
        assert_eq!(ok.actor_chain(), ["spiffe://td/p", "spiffe://td/q"]);
        assert_eq!(ok.cnf_x5t_s256.as_deref(), Some("abc"));
        assert!(check(serde_json::json!({"aud":["x","https://rs/mcp"]})).is_ok());
        assert_eq!(
            check(serde_json::json!({"aud":["x"]})),
            Err(TokenError::Audience)
        );
        assert_eq!(
            check(serde_json::json!({"aud":"https://rs/mcp/"})),
            Err(TokenError::Audience)
        );
        assert_eq!(
            check(serde_json::json!({"iss":"other"})),
            Err(TokenError::Issuer)
        );
        assert_eq!(
            check(serde_json::json!({"exp":now-31})),
            Err(TokenError::Expired)
        );
        assert!(check(serde_json::json!({"exp":now-29})).is_ok());
        assert_eq!(
            check(serde_json::json!({"nbf":now+31})),
            Err(TokenError::NotYetValid)
        );
        assert_eq!(
            check(serde_json::json!({"iat":now+31})),
            Err(TokenError::IssuedInFuture)
        );
        assert_eq!(
            check(serde_json::json!({"exp":null})),
            Err(TokenError::Claim("exp"))
        );
        assert_eq!(
            check(serde_json::json!({"exp":"soon"})),
            Err(TokenError::Claim("exp"))
        );
        assert!(check(serde_json::json!({"exp":(now + 60) as f64 + 0.5})).is_ok());
        assert_eq!(
            check(serde_json::json!({"client_id":null})),
            Err(TokenError::Claim("client_id"))
        );
        assert_eq!(
            check(serde_json::json!({"scope":["a"]})),
            Err(TokenError::Claim("scope"))
        );
        assert_eq!(
            check(serde_json::json!({"act":{"act":{}}})),
            Err(TokenError::Claim("act"))
        );
        assert_eq!(
            check(serde_json::json!({"cnf":"x"})),
            Err(TokenError::Claim("cnf"))
        );
        let mut deep = serde_json::json!({"sub":"s"});
        for _ in 0..40 {
            deep = serde_json::json!({"sub":"s","act":deep});
        }
        assert_eq!(
            check(serde_json::json!({"act":deep})),
            Err(TokenError::Claim("act"))
        );
    }
}
